//! The `checkpointer` binary: parse the command line, set up logging, load configuration, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use checkpointer::config::{LogFormat, Settings};

#[derive(Parser)]
#[command(
    name = "checkpointer",
    version,
    about = "Kafka windowed aggregation that resumes exactly after redeploys"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Run {
        /// YAML configuration file; CHECKPOINTER_<SECTION>__<KEY> variables override it.
        #[arg(long, short, env = "CHECKPOINTER_CONFIG")]
        config: PathBuf,
    },
    /// Run the service against an embedded broker fed by an event generator; prints the
    /// emitted windows. Nothing to install.
    Demo {
        #[arg(long, short, default_value = "config/demo.yaml")]
        config: PathBuf,
        /// Events per second.
        #[arg(long, default_value_t = 200)]
        rate: u32,
    },
    /// Validate the configuration (with environment overrides) and print it, secrets masked.
    CheckConfig {
        #[arg(long, short, env = "CHECKPOINTER_CONFIG")]
        config: PathBuf,
    },
}

const EXIT_CONFIG: u8 = 2;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

fn load(path: &std::path::Path) -> Result<Settings, ExitCode> {
    Settings::load(path, None).map_err(|e| {
        eprintln!("checkpointer: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match load(&config) {
            Err(code) => code,
            Ok(settings) => {
                for w in settings.warnings() {
                    eprintln!("warning: {w}");
                }
                match serde_json::to_string_pretty(&settings.redacted()) {
                    Ok(text) => println!("{text}"),
                    Err(e) => eprintln!("checkpointer: cannot print configuration: {e}"),
                }
                eprintln!("configuration OK: {}", config.display());
                ExitCode::SUCCESS
            }
        },
        Command::Demo { config, rate } => {
            let settings = match load(&config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            init_logging(settings.log.format);
            run_async(checkpointer::demo::run(checkpointer::demo::DemoOptions {
                config,
                rate,
            }))
        }
        Command::Run { config } => {
            let settings = match load(&config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            init_logging(settings.log.format);
            run_async(checkpointer::service::run(settings))
        }
    }
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("checkpointer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(fut);
    // background tasks (lag probes) must not delay the exit
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "checkpointer stopped");
            eprintln!("checkpointer: {e:#}");
            ExitCode::FAILURE
        }
    }
}
