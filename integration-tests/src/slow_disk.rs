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
    /// [`SlowDisk::set`]; `config` gets the environment that loads it.
    pub fn attach(config: &mut ServiceConfig, control: &Path) -> Result<SlowDisk> {
        let library = library()?;
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
fn library() -> Result<PathBuf> {
    static LIB: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    LIB.get_or_init(|| build().map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|err| anyhow!(err))
}

/// Builds the library into the temporary directory under a name made from its source, so
/// that every test process of one source shares one file (the tests leave nothing else
/// behind), written under a name of its own first and then renamed into place, so that a
/// process never loads one that another is still writing.
fn build() -> Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/fault/slow_sync.c");
    let text = std::fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
    let out = std::env::temp_dir().join(format!("checkpointer-slow-sync-{:016x}.so", fnv1a(&text)));
    if out.exists() {
        return Ok(out);
    }
    let partial = out.with_extension(format!("{}.partial", std::process::id()));
    let output = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&partial)
        .arg(&source)
        .arg("-ldl")
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

/// The 64-bit FNV-1a hash of `bytes` (stable across builds, unlike the standard hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
