//! checkpointer: consume Kafka, aggregate in event-time windows, checkpoint offsets and state
//! atomically to sled, resume exactly after redeploys.

pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod position;
pub mod store;
