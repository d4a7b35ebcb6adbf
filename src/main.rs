//! The `checkpointer` binary: parse the command line, set up logging, load configuration, run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use checkpointer::config::{LogFormat, RestoreFrom, Settings};
use checkpointer::http::auth::AdminToken;
use checkpointer::ops::{offline, remote, OpsError};
use checkpointer::position::Partition;

/// Where `savepoint`, `stop` and `probe` find a running instance unless told otherwise: the
/// `CHECKPOINTER_HTTP__LISTEN` address when that is set (as a container's environment may
/// set it; all interfaces mean this host), else the default `http.listen`.
fn default_url() -> String {
    let addr = std::env::var("CHECKPOINTER_HTTP__LISTEN")
        .ok()
        .and_then(|v| v.parse::<std::net::SocketAddr>().ok());
    match addr {
        Some(mut a) => {
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{a}")
        }
        None => "http://127.0.0.1:9180".to_string(),
    }
}

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
        /// What to restore: latest, none, a checkpoint id, or savepoint:NAME (overrides
        /// checkpoint.restore_from).
        #[arg(long)]
        restore_from: Option<RestoreFrom>,
    },
    /// Run the service against an embedded broker fed by an event generator; prints the
    /// emitted windows. Nothing to install. Run it again to see it resume from its checkpoint.
    Demo {
        #[arg(long, short, default_value = "config/demo.yaml")]
        config: PathBuf,
        /// Events per second.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// Start over instead of resuming the previous demo run.
        #[arg(long)]
        fresh: bool,
    },
    /// Produce generated JSON events (user, amount, ts) to a topic until stopped: the event
    /// source of the container stack.
    Generate {
        /// Bootstrap servers.
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        #[arg(long, default_value = "events")]
        topic: String,
        /// Events per second.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// Distinct users (record keys).
        #[arg(long, default_value_t = 20)]
        keys: u64,
    },
    /// Health check for containers: exit 0 when URL answers 2xx, else 1 with the reason.
    Probe {
        #[arg(long, default_value_t = format!("{}/healthz", default_url()))]
        url: String,
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Validate the configuration (with environment overrides) and print it, secrets masked.
    CheckConfig {
        #[arg(long, short, env = "CHECKPOINTER_CONFIG")]
        config: PathBuf,
    },
    /// Pre-flight for an upgrade or a config change: what starting with NEW.yaml would restore
    /// from the checkpoint directory and what happens to each window, aggregate and topic.
    /// Changes nothing. Exit 0: the start would go ahead; 1: it would be refused (or the
    /// store cannot be read); 2: bad configuration.
    CheckRestore {
        /// The new configuration.
        #[arg(long, short, env = "CHECKPOINTER_CONFIG")]
        config: PathBuf,
        /// Checkpoint directory of the stopped instance (default: checkpoint.dir of the config).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// What the start would restore (overrides checkpoint.restore_from).
        #[arg(long)]
        restore_from: Option<RestoreFrom>,
    },
    /// Inspect the checkpoints of a stopped instance's checkpoint.dir (read-only).
    Checkpoints {
        #[command(subcommand)]
        action: CheckpointsAction,
    },
    /// Take a savepoint of a running instance; or list, export, import, delete savepoints.
    Savepoint(SavepointArgs),
    /// Move one partition's held position in a stopped instance's checkpoint directory (after
    /// its records were deleted, or to skip or replay on purpose): a new checkpoint with the
    /// same state, noted in the history. The next start reads the partition from there.
    ResetPosition {
        /// Checkpoint directory of the stopped instance.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        partition: i32,
        /// earliest or latest (the broker's offsets, asked through --config), or an offset.
        #[arg(long, value_name = "earliest|latest|OFFSET")]
        to: offline::Target,
        /// Configuration whose kafka.brokers and kafka.options reach the broker (needed for
        /// earliest and latest); its state.key_groups is the default of --key-groups.
        #[arg(long, short, env = "CHECKPOINTER_CONFIG")]
        config: Option<PathBuf>,
        /// Key groups per scope if the store is of a format before 5 and is migrated now
        /// (`state.key_groups`; 1 to 65535; default: --config's, else 256). A store that has
        /// key groups keeps its own.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        key_groups: Option<u16>,
    },
    /// Stop a running instance gracefully, optionally after a savepoint (the upgrade path).
    Stop {
        /// Admin URL of the instance.
        #[arg(long, default_value_t = default_url())]
        url: String,
        /// Take a savepoint first (named NAME, or after its checkpoint id).
        #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "NAME")]
        savepoint: Option<String>,
        /// How long to wait for the savepoint and the stop.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        wait: Duration,
        /// File holding the instance's admin token (its http.admin_token_file).
        #[arg(long, env = TOKEN_ENV)]
        admin_token_file: Option<PathBuf>,
    },
}

/// The variable that names the admin token file, for the instance and for the commands that
/// call it alike.
const TOKEN_ENV: &str = "CHECKPOINTER_HTTP__ADMIN_TOKEN_FILE";

/// The token read from `file`, if one is named.
fn token(file: Option<&std::path::Path>) -> Result<Option<AdminToken>, OpsError> {
    Ok(file.map(AdminToken::read).transpose()?)
}

#[derive(Subcommand)]
enum CheckpointsAction {
    /// Checkpoint and savepoint attempts, newest first; retained ones are marked.
    List {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One attempt: status, phases, offsets and watermarks per partition (JSON).
    Show {
        id: checkpointer::checkpoint_id::CheckpointId,
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct SavepointArgs {
    #[command(subcommand)]
    action: Option<SavepointAction>,
    /// Name of the new savepoint (default: savepoint-<checkpoint id>).
    #[arg(long)]
    name: Option<String>,
    /// Admin URL of the running instance.
    #[arg(long, default_value_t = default_url())]
    url: String,
    /// How long to wait for the savepoint to be durable.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// File holding the instance's admin token (its http.admin_token_file).
    #[arg(long, env = TOKEN_ENV)]
    admin_token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum SavepointAction {
    /// List savepoints, of a running instance (--url) or a stopped one (--dir).
    List {
        #[arg(long, conflicts_with = "url", required_unless_present = "url")]
        dir: Option<PathBuf>,
        #[arg(long)]
        url: Option<String>,
    },
    /// Write a savepoint to a portable, checksummed file (service stopped).
    Export {
        name: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        dir: PathBuf,
    },
    /// Load a savepoint file into a checkpoint.dir (service stopped; the dir may be new).
    Import {
        file: PathBuf,
        #[arg(long)]
        dir: PathBuf,
        /// Store it under another name.
        #[arg(long)]
        name: Option<String>,
        /// Key groups per scope if the directory has no store yet, or its store is of a
        /// format before 5 and is migrated now (`state.key_groups`; 1 to 65535; default 256).
        /// A store that has key groups keeps its own.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        key_groups: Option<u16>,
    },
    /// Delete a savepoint, through a running instance (--url) or offline (--dir).
    Delete {
        name: String,
        #[arg(long, conflicts_with = "url", required_unless_present = "url")]
        dir: Option<PathBuf>,
        #[arg(long)]
        url: Option<String>,
        /// File holding the instance's admin token (with --url).
        #[arg(long, env = TOKEN_ENV)]
        admin_token_file: Option<PathBuf>,
        /// With --dir: key groups per scope if the store is of a format before 5 and is
        /// migrated now (`state.key_groups`; 1 to 65535; default 256). A store that has key
        /// groups keeps its own.
        #[arg(long, requires = "dir", conflicts_with = "url", value_parser = clap::value_parser!(u16).range(1..))]
        key_groups: Option<u16>,
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

/// `CHECKPOINTER_LOG__FORMAT` (json|pretty) for commands that read no configuration file.
fn log_format_from_env() -> LogFormat {
    match std::env::var("CHECKPOINTER_LOG__FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Pretty,
    }
}

fn load(path: &std::path::Path) -> Result<Settings, ExitCode> {
    Settings::load(path, None).map_err(|e| {
        eprintln!("checkpointer: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// [`load`], and the admin token it names read (a configuration error when it cannot be).
fn load_with_token(path: &std::path::Path) -> Result<Settings, ExitCode> {
    let settings = load(path)?;
    match AdminToken::load(&settings.http) {
        Ok(_) => Ok(settings),
        Err(e) => {
            eprintln!("checkpointer: {e}");
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

/// The configuration with a `--restore-from` override applied.
fn restoring(mut settings: Settings, restore_from: Option<RestoreFrom>) -> Settings {
    if let Some(from) = restore_from {
        settings.checkpoint.restore_from = from;
    }
    settings
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match load_with_token(&config) {
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
        Command::CheckRestore {
            config,
            dir,
            restore_from,
        } => {
            let settings = match load(&config).map(|s| restoring(s, restore_from)) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let dir = dir.unwrap_or_else(|| settings.checkpoint.dir.clone());
            match checkpointer::ops::preflight::preflight(&settings, &dir) {
                Ok(p) => {
                    print!("{}", p.text);
                    if p.would_start {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("checkpointer: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Checkpoints { action } => report(checkpoints(action)),
        Command::ResetPosition {
            dir,
            topic,
            partition,
            to,
            config,
            key_groups,
        } => {
            let settings = match config.as_deref().map(load).transpose() {
                Ok(s) => s,
                Err(code) => return code,
            };
            // a configuration that leaves state.key_groups unset asks for the default
            let key_groups = key_groups.or_else(|| settings.as_ref()?.state.key_groups);
            let ask = settings.as_ref().map(|s| {
                let kafka = s.kafka.clone();
                move |p: &Partition| broker_watermarks(&kafka, p)
            });
            let ask = ask.as_ref().map(|f| f as offline::Watermarks<'_>);
            report(offline::reset_position(
                &dir,
                &Partition::new(&topic, partition),
                to,
                ask,
                key_groups,
            ))
        }
        Command::Savepoint(args) => report(savepoint(args)),
        Command::Stop {
            url,
            savepoint,
            wait,
            admin_token_file,
        } => {
            let savepoint = savepoint
                .as_deref()
                .map(|n| Some(n).filter(|n| !n.is_empty()));
            report(
                token(admin_token_file.as_deref()).and_then(|t| {
                    remote::stop(url.trim_end_matches('/'), savepoint, wait, t.as_ref())
                }),
            )
        }
        Command::Probe { url, timeout } => report(remote::probe(&url, timeout)),
        Command::Generate {
            brokers,
            topic,
            rate,
            keys,
        } => {
            init_logging(log_format_from_env());
            run_async(generate(brokers, topic, rate, keys))
        }
        Command::Demo {
            config,
            rate,
            fresh,
        } => {
            let settings = match load(&config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            init_logging(settings.log.format);
            run_async(checkpointer::demo::run(checkpointer::demo::DemoOptions {
                config,
                rate,
                fresh,
            }))
        }
        Command::Run {
            config,
            restore_from,
        } => {
            let settings = match load_with_token(&config).map(|s| restoring(s, restore_from)) {
                Ok(s) => s,
                Err(code) => return code,
            };
            init_logging(settings.log.format);
            run_async(checkpointer::service::run(
                settings,
                checkpointer::service::shutdown_signal(),
            ))
        }
    }
}

async fn generate(brokers: String, topic: String, rate: u32, keys: u64) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let producer: rdkafka::producer::FutureProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .create()
        .context("cannot create the generator's producer")?;
    tracing::info!(%brokers, %topic, rate, keys, "generating events (SIGTERM stops)");
    tokio::select! {
        _ = checkpointer::generator::run(producer, topic, rate.max(1), keys) => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = terminated() => {}
    }
    Ok(())
}

async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

fn checkpoints(action: CheckpointsAction) -> Result<String, OpsError> {
    match action {
        CheckpointsAction::List { dir, limit, json } => {
            offline::list_checkpoints(&dir, limit, json)
        }
        CheckpointsAction::Show { id, dir } => offline::show_checkpoint(&dir, id),
    }
}

fn savepoint(args: SavepointArgs) -> Result<String, OpsError> {
    let base = |url: &str| url.trim_end_matches('/').to_string();
    match args.action {
        None => remote::trigger_savepoint(
            &base(&args.url),
            args.name.as_deref(),
            args.timeout,
            token(args.admin_token_file.as_deref())?.as_ref(),
        ),
        Some(SavepointAction::List { dir: Some(dir), .. }) => offline::list_savepoints(&dir),
        Some(SavepointAction::List { url, .. }) => {
            remote::list_savepoints(&base(url.unwrap_or_else(default_url).as_str()))
        }
        Some(SavepointAction::Export { name, out, dir }) => {
            offline::export_savepoint(&dir, &name, &out)
        }
        Some(SavepointAction::Import {
            file,
            dir,
            name,
            key_groups,
        }) => offline::import_savepoint(&dir, &file, name.as_deref(), key_groups),
        Some(SavepointAction::Delete {
            name,
            dir: Some(dir),
            key_groups,
            ..
        }) => offline::delete_savepoint(&dir, &name, key_groups),
        Some(SavepointAction::Delete {
            name,
            url,
            admin_token_file,
            ..
        }) => remote::delete_savepoint(
            &base(url.unwrap_or_else(default_url).as_str()),
            &name,
            token(admin_token_file.as_deref())?.as_ref(),
        ),
    }
}

fn report(result: Result<String, OpsError>) -> ExitCode {
    match result {
        Ok(text) => {
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("checkpointer: {e}");
            ExitCode::FAILURE
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

/// The earliest and latest offsets of `p`, asked of the brokers of `kafka` (bounded).
fn broker_watermarks(
    kafka: &checkpointer::config::KafkaSettings,
    p: &Partition,
) -> Result<(i64, i64), String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = checkpointer::source::base_client(&kafka.brokers, &kafka.options)
        .create()
        .map_err(|e| format!("cannot create a Kafka client for {}: {e}", kafka.brokers))?;
    consumer
        .fetch_watermarks(&p.topic, p.partition, Duration::from_secs(15))
        .map_err(|e| format!("cannot ask {} for the offsets of {p}: {e}", kafka.brokers))
}
