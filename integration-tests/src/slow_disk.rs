//! A slow disk on demand for the service under test: a small shared library
//! (`src/fault/slow_sync.c`, built here with the system C compiler) that the service loads
//! through `LD_PRELOAD` and that delays every `fsync`, `fdatasync` and `sync_file_range` by the
//! milliseconds a control file holds. The binary is the real one; only its disk is slow.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};

use crate::ServiceConfig;

/// The control file the library reads, and its switch.
pub struct SlowDisk {
    control: PathBuf,
}

impl SlowDisk {
    /// A slow disk controlled by `control` (created and removed here), off until
    /// [`SlowDisk::set`]; `config` gets the environment that loads it. The library is built
    /// in `build_dir` (a test passes `env!("CARGO_TARGET_TMPDIR")`, the build's own directory,
    /// so that nothing is left in the system's temporary directory and nothing another user
    /// put there is loaded).
    pub fn attach(
        config: &mut ServiceConfig,
        control: &Path,
        build_dir: &Path,
    ) -> Result<SlowDisk> {
        let library = library(build_dir)?;
        config
            .env
            .insert("LD_PRELOAD".into(), library.display().to_string());
        config
            .env
            .insert("SLOW_SYNC_CONTROL".into(), control.display().to_string());
        let disk = SlowDisk {
            control: control.to_path_buf(),
        };
        disk.off()?;
        Ok(disk)
    }

    /// Every sync of the service from now on takes `delay` longer.
    pub fn set(&self, delay: Duration) -> Result<()> {
        std::fs::write(&self.control, delay.as_millis().to_string())
            .with_context(|| format!("writing {}", self.control.display()))
    }

    /// Syncs are as fast as the disk again.
    pub fn off(&self) -> Result<()> {
        match std::fs::remove_file(&self.control) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", self.control.display())),
        }
    }
}

/// The library, built once per test process.
fn library(build_dir: &Path) -> Result<PathBuf> {
    static LIB: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    LIB.get_or_init(|| build(build_dir).map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|err| anyhow!(err))
}

/// How the library is compiled (the source and output paths go around these).
const CC_ARGS: [&str; 4] = ["-shared", "-fPIC", "-O2", "-ldl"];

/// Builds the library into `dir` under a name made from its source and compiler flags, so
/// that the test processes of one build share one file, written under a name of its own
/// first and then renamed into place, so that a process never loads one that another is
/// still writing.
fn build(dir: &Path) -> Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/fault/slow_sync.c");
    let text = std::fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
    // the standard hasher with its fixed keys: a toolchain that hashes otherwise only builds
    // the library once more
    let name = std::hash::BuildHasher::hash_one(
        &std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default(),
        (&text, CC_ARGS),
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = dir.join(format!("slow-sync-{name:016x}.so"));
    if out.exists() {
        return Ok(out);
    }
    let partial = out.with_extension(format!("{}.partial", std::process::id()));
    let output = Command::new("cc")
        .args(&CC_ARGS[..3])
        .arg("-o")
        .arg(&partial)
        .arg(&source)
        .args(&CC_ARGS[3..])
        .output()
        .context("running cc (the slow-disk fault needs a C compiler)")?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&partial);
    }
    ensure!(
        output.status.success(),
        "building {}: {}",
        source.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::rename(&partial, &out)
        .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
    Ok(out)
}
