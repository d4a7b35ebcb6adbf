//! The state changelog: a Kafka topic to which every durable checkpoint publishes its
//! per-partition changes, so that an instance assigned a partition whose newest state it does
//! not hold restores it from there (`protocol` and `plan`, pure; `kafka`, the producer and
//! reader).

pub mod kafka;
pub mod plan;
pub mod protocol;
