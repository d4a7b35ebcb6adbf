//! Checkpoints: what one contains and how it applies (`protocol`, pure), when to take one
//! (`scheduler`, pure), which snapshot to restore at start (`choice`, pure), and the record of
//! attempts (`history`), and the limits on savepoints operators ask for (`savepoints`, pure). The
//! store makes them durable (`store::writer`).

pub mod choice;
pub mod compat;
pub mod history;
pub mod protocol;
pub mod savepoints;
pub mod scheduler;

pub use choice::{RestoreFrom, RestorePoint};
pub use protocol::{
    ApplyError, Checkpoint, CheckpointMeta, InputSpec, MaterializedState, StateSpec,
};
pub use scheduler::{Scheduler, SchedulerSettings, TooManyFailures};
