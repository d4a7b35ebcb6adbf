//! Checkpoints: what one contains and how it applies (`protocol`, pure), when to take one
//! (`scheduler`, pure), what to restore at start (`restore`, pure), the record of attempts
//! (`history`), and the background task that makes them durable (`writer`).

pub mod compat;
pub mod history;
pub mod protocol;
pub mod restore;
pub mod scheduler;
pub mod writer;

pub use protocol::{
    ApplyError, Checkpoint, CheckpointMeta, InputSpec, MaterializedState, StateSpec,
};
pub use restore::{RestoreFrom, Snapshot};
pub use scheduler::{Scheduler, SchedulerSettings, TooManyFailures};
