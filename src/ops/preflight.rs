//! `check-restore`: what a start with a configuration would restore from a checkpoint
//! directory and what the configuration does to it, without starting anything. Reads only: an
//! older store format is checked on a migrated copy.

use crate::checkpoint::compat::Target;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::service::restore;
use crate::store::{Open, Store, StoreError};

/// What `check-restore` found.
pub struct Preflight {
    pub text: String,
    /// Whether a start with this configuration would go ahead.
    pub would_start: bool,
}

/// `check-restore`: what a start with `settings` would restore from `dir` and what the new
/// configuration does to it. Reads only: an older format is checked on a migrated copy.
pub fn preflight(settings: &Settings, dir: &std::path::Path) -> anyhow::Result<Preflight> {
    let spec = settings.state_spec()?;
    let c = &settings.checkpoint;
    let request = restore::Request {
        from: &c.restore_from,
        prefer_checkpoint: c.prefer_checkpoint_for_recovery,
        target: Target {
            spec: &spec,
            topics: &settings.kafka.topics,
            auto_offset_reset: settings.kafka.reset(),
        },
        allow_non_restored_state: c.allow_non_restored_state,
    };
    let head = format!("checkpoint.dir {}", dir.display());
    let store = match Store::open(dir, Open::Inspect) {
        Err(StoreError::Missing { .. }) => {
            return Ok(Preflight {
                text: format!("{head}: no checkpoint store yet; the start would begin empty\n"),
                would_start: true,
            })
        }
        other => other?,
    };
    match restore::restore(&store, &request, &Metrics::new()) {
        Ok(restored) => {
            let Some(report) = &restored.report else {
                return Ok(Preflight {
                    text: format!(
                        "{head}: nothing to restore (restore_from: {}); the start would begin empty\n",
                        c.restore_from
                    ),
                    would_start: true,
                });
            };
            let dropped = report.incompatible_open_windows();
            let verdict = if dropped > 0 {
                format!("the start would go ahead and drop {dropped} open windows (checkpoint.allow_non_restored_state is true)")
            } else {
                "the start would go ahead".to_string()
            };
            Ok(Preflight {
                text: format!(
                    "{head}: would restore {}\n{report}verdict: {verdict}\n",
                    restored.describe()
                ),
                would_start: true,
            })
        }
        Err(restore::RestoreError::Incompatible(inc)) => Ok(Preflight {
                text: format!(
                    "{head}: would restore {}\n{}verdict: the start would be refused: {} open windows do not fit the new configuration; keep the previous configuration for them, or set checkpoint.allow_non_restored_state: true to drop them\n",
                    inc.snapshot, inc.report, inc.open
                ),
            would_start: false,
        }),
        Err(other) => Err(other.into()),
    }
}
