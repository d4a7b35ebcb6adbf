//! checkpointer: consume Kafka, aggregate in event-time windows, checkpoint offsets and state
//! atomically to sled, resume exactly after redeploys.

pub mod board;
pub mod changelog;
pub mod checkpoint;
pub mod checkpoint_id;
pub mod clock;
pub mod config;
pub mod demo;
pub mod engine;
pub mod event_time;
pub mod generator;
pub mod http;
pub mod kafka_log;
pub mod lock;
pub mod metrics;
pub mod ops;
pub mod position;
pub mod ratelimit;
pub mod service;
pub mod sink;
pub mod source;
pub mod store;

/// jemalloc: the state path allocates and frees many small values (window keys, group copies);
/// glibc's allocator spent a quarter of the service's CPU on them and held more memory.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
