//! The pipeline's [`Inbox`] of events from the I/O tasks, and the narrow traits through
//! which the service's components reach Kafka: the consumer's
//! assignments, commits and positions ([`Assignments`]), the output of final windows
//! ([`Output`]), and the changelog topic ([`ChangelogIo`]). The store's side is
//! [`crate::store::Checkpoints`]. The implementations here wrap rdkafka; in-process tests use
//! the in-memory ones in `fakes`.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::mpsc;

use super::handoff::Restored;
use super::out_of_range::Probed;
use crate::changelog::kafka::PublishFailure;
use crate::changelog::kafka::{
    read_states, Batch, ChangelogError, ChangelogTopic, OnProgress, Publisher,
};
use crate::changelog::protocol::Committed;
use crate::checkpoint_id::CheckpointId;
use crate::engine::{Emission, StateKey};
use crate::http::Command;
use crate::position::{NextOffset, Partition};
use crate::sink::Sink;
use crate::source::{self, Source, SourceError};
use crate::store::writer::WriteOutcome;

/// What the pipeline receives besides records.
pub(crate) struct Inbox {
    pub outcomes: mpsc::UnboundedReceiver<WriteOutcome>,
    pub acks: mpsc::UnboundedReceiver<Vec<StateKey>>,
    pub commands: mpsc::UnboundedReceiver<Command>,
    pub released: mpsc::UnboundedReceiver<(CheckpointId, Vec<Partition>)>,
    pub failures: mpsc::UnboundedReceiver<PublishFailure>,
    /// A window or dead-letter copy that can be written nowhere: the service stops.
    pub fatal: mpsc::UnboundedReceiver<String>,
    /// The broker's offsets of the assigned partitions, asked after an out-of-range report.
    pub probes: mpsc::UnboundedReceiver<Vec<Probed>>,
    /// Changelog replays for assignments, read off the loop.
    pub restored: mpsc::UnboundedReceiver<Restored>,
}

impl Inbox {
    /// Commands queued or sent from now on are answered with an error (the requester's reply
    /// channel is dropped): the service is stopping.
    pub(crate) fn refuse_commands(&mut self) {
        drop(std::mem::replace(
            &mut self.commands,
            mpsc::unbounded_channel().1,
        ));
    }
}

/// What the pipeline and the hand-off ask of the Kafka consumer.
pub(crate) trait Assignments {
    /// Starts reading `partitions` at the positions the service holds for them.
    fn assign(&self, partitions: &[Partition]) -> Result<(), SourceError>;
    /// Lets `partitions` go to their new owner.
    fn release(&self, partitions: &[Partition]);
    /// Commits checkpointed positions to the consumer group (advisory).
    fn commit(&self, positions: &[(Partition, NextOffset)]);
    /// Low and high watermarks of `partition` (blocking, bounded).
    fn watermarks(&self, partition: &Partition) -> Option<(i64, i64)>;
    /// Reading each of `moves` (partition, offset) starts again at its offset (also after
    /// librdkafka stopped fetching it on an out-of-range report).
    fn restart_at(&self, moves: &[(Partition, i64)]) -> Result<(), SourceError>;
    /// Reads `partitions` (assigned) again from the positions held for them, whatever was
    /// fetched before.
    fn reassign(&self, partitions: &[Partition]) -> Result<(), SourceError>;
    /// Stops fetching `partitions` (back-pressure); reading resumes after the last record
    /// delivered.
    fn pause(&self, partitions: &[Partition]);
    /// Fetches `partitions` again after [`Assignments::pause`].
    fn resume(&self, partitions: &[Partition]);
}

impl Assignments for Source {
    fn assign(&self, partitions: &[Partition]) -> Result<(), SourceError> {
        source::assign(self, partitions)
    }
    fn release(&self, partitions: &[Partition]) {
        source::release(self, partitions)
    }
    fn commit(&self, positions: &[(Partition, NextOffset)]) {
        source::commit(self, positions)
    }
    fn watermarks(&self, partition: &Partition) -> Option<(i64, i64)> {
        source::watermarks(self, partition, Duration::from_secs(1))
    }
    fn restart_at(&self, moves: &[(Partition, i64)]) -> Result<(), SourceError> {
        source::restart_at(self, moves)
    }
    fn reassign(&self, partitions: &[Partition]) -> Result<(), SourceError> {
        source::reassign(self, partitions)
    }
    fn pause(&self, partitions: &[Partition]) {
        source::pause(self, partitions, true)
    }
    fn resume(&self, partitions: &[Partition]) {
        source::pause(self, partitions, false)
    }
}

/// What the pipeline drains from the consumer after a wake: what it already holds, without
/// waiting (a rebalance runs inside a receive and is queued on the consumer's `Shared`).
pub(crate) trait Receive {
    type Message<'a>: rdkafka::message::Message
    where
        Self: 'a;
    /// The next record, end of partition or error the consumer holds, or `None` if it holds
    /// nothing now.
    fn try_recv(&self) -> Option<rdkafka::error::KafkaResult<Self::Message<'_>>>;
}

impl Receive for Source {
    type Message<'a> = rdkafka::message::BorrowedMessage<'a>;

    fn try_recv(&self) -> Option<rdkafka::error::KafkaResult<Self::Message<'_>>> {
        use std::future::Future as _;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::pin!(self.recv()).poll(&mut cx) {
            std::task::Poll::Ready(msg) => Some(msg),
            std::task::Poll::Pending => None,
        }
    }
}

/// Where final windows go; acknowledgements come back on the pipeline's `acks` channel.
pub(crate) trait Output {
    fn emit(&self, windows: Emission);
}

impl Output for Sink {
    fn emit(&self, windows: Emission) {
        Sink::emit(self, windows)
    }
}

/// The changelog topic: publications out, partition states in.
pub(crate) trait ChangelogIo: Send + Sync + 'static {
    /// Hands a publication to the publisher (in order); `batch.done` answers when it is
    /// acknowledged or failed.
    fn publish(&self, batch: Batch);
    /// Replays the changelog of `partitions` and returns their states (blocking; gives up soon
    /// after `cancel` is set).
    fn read(
        &self,
        group: &str,
        partitions: &[Partition],
        on_progress: OnProgress<'_>,
        cancel: &AtomicBool,
    ) -> Result<HashMap<Partition, Committed>, ChangelogError>;
}

/// The changelog on Kafka.
pub(crate) struct KafkaChangelog {
    pub topic: ChangelogTopic,
    pub publisher: Publisher,
}

impl ChangelogIo for KafkaChangelog {
    fn publish(&self, batch: Batch) {
        self.publisher.publish(batch)
    }
    fn read(
        &self,
        group: &str,
        partitions: &[Partition],
        on_progress: OnProgress<'_>,
        cancel: &AtomicBool,
    ) -> Result<HashMap<Partition, Committed>, ChangelogError> {
        read_states(&self.topic, group, partitions, on_progress, cancel)
    }
}
