//! What the service shows of itself: readiness (decided by [`readiness`], pure), event-time
//! progress and the state gauges, written to the admin board that HTTP reads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::board::{EventTimeProgress, StatusBoard};
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::store::Checkpoints;

/// Whether the service is ready, and why (the `/readyz` text).
pub(crate) fn readiness(
    broker_error: Option<&str>,
    limit_pause: Option<&str>,
    assigned: usize,
    assignment_seen: bool,
    restoring: usize,
) -> (bool, String) {
    if let Some(e) = broker_error {
        (false, format!("broker unreachable: {e}"))
    } else if let Some(why) = limit_pause {
        (false, why.to_string())
    } else if restoring > 0 {
        (
            false,
            format!("restoring {restoring} partitions from the changelog"),
        )
    } else if assigned == 0 && !assignment_seen {
        (
            false,
            "restored; waiting for partition assignment".to_string(),
        )
    } else {
        (true, format!("{assigned} partitions assigned"))
    }
}

pub(crate) struct Status {
    board: Arc<StatusBoard>,
    metrics: Arc<Metrics>,
    /// The readiness last published says the brokers are unreachable.
    broker_down: bool,
    /// Why consumption is paused for a limit (memory, open windows), while it is.
    limit_pause: Option<String>,
    last_gauges: Instant,
}

impl Status {
    pub(crate) fn new(board: Arc<StatusBoard>, metrics: Arc<Metrics>) -> Self {
        Status {
            board,
            metrics,
            broker_down: false,
            limit_pause: None,
            last_gauges: Instant::now(),
        }
    }

    /// Publishes readiness from the consumer's view of the brokers and the assignment.
    pub(crate) fn refresh(&mut self, assigned: usize, assignment_seen: bool, restoring: usize) {
        let broker_error = self.board.broker_error();
        self.broker_down = broker_error.is_some();
        let (ready, reason) = readiness(
            broker_error.as_deref(),
            self.limit_pause.as_deref(),
            assigned,
            assignment_seen,
            restoring,
        );
        self.board.set_ready(ready, &reason);
    }

    /// A record arrived: an outage reported before is over.
    pub(crate) fn record_arrived(
        &mut self,
        assigned: usize,
        assignment_seen: bool,
        restoring: usize,
    ) {
        if self.broker_down {
            self.broker_down = false;
            self.board.set_broker_error(None);
            tracing::info!("receiving records again");
            self.refresh(assigned, assignment_seen, restoring);
        }
    }

    /// Why consumption is paused for a limit, while it is.
    pub(crate) fn limit_pause(&self) -> Option<&str> {
        self.limit_pause.as_deref()
    }

    /// Consumption is paused for a limit (`Some`, why) or not; returns whether the reason
    /// changed (readiness is then stale).
    pub(crate) fn set_limit_pause(&mut self, why: Option<String>) -> bool {
        let changed = self.limit_pause != why;
        self.limit_pause = why;
        changed
    }

    /// Whether the consumer's view of the brokers changed since readiness was published.
    pub(crate) fn stale(&self) -> bool {
        self.board.broker_error().is_some() != self.broker_down
    }

    pub(crate) fn stopping(&self) {
        self.board.set_ready(false, "stopping");
    }

    /// Refreshes gauges and event-time progress, at most once a second.
    pub(crate) fn gauges(&mut self, engine: &Engine, in_flight: usize, store: &dyn Checkpoints) {
        if self.last_gauges.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_gauges = Instant::now();
        let m = &self.metrics;
        m.windows_open.set(engine.open_windows() as i64);
        m.windows_pending.set(engine.pending_emissions() as i64);
        m.checkpoints_in_flight.set(in_flight as i64);
        if let Some(wm) = engine.watermark() {
            m.watermark.set(wm.seconds());
        }
        let mut progress = EventTimeProgress {
            watermark: engine.watermark(),
            ..EventTimeProgress::default()
        };
        for (p, partition) in engine.progress() {
            if let Some(ts) = partition.max_ts {
                m.partition_watermark
                    .with_label_values(&[&p.topic, &p.partition.to_string()])
                    .set(ts.seconds());
                progress.max_event_time.insert(p.clone(), ts);
            }
        }
        self.board.set_progress(progress);
        if let Ok(size) = store.size_on_disk() {
            m.store_size.set(size as i64);
        }
        if let Some(Ok(ids)) = store.checkpoint_ids_now() {
            m.checkpoints_retained.set(ids.len() as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::readiness;

    #[test]
    fn an_unreachable_broker_makes_the_service_unready_whatever_it_holds() {
        assert_eq!(
            readiness(Some("all brokers down"), None, 4, true, 0),
            (false, "broker unreachable: all brokers down".to_string())
        );
    }

    #[test]
    fn ready_once_an_assignment_arrived_even_an_empty_one() {
        assert_eq!(
            readiness(None, None, 0, false, 0),
            (
                false,
                "restored; waiting for partition assignment".to_string()
            )
        );
        assert_eq!(
            readiness(None, None, 0, true, 0),
            (true, "0 partitions assigned".to_string())
        );
        assert_eq!(
            readiness(None, None, 3, true, 0),
            (true, "3 partitions assigned".to_string())
        );
    }

    #[test]
    fn a_pause_for_memory_makes_the_service_unready_with_its_reason() {
        assert_eq!(
            readiness(None, Some("memory: over state.max_memory"), 3, true, 0),
            (false, "memory: over state.max_memory".to_string())
        );
    }

    #[test]
    fn a_changelog_replay_in_flight_makes_the_service_unready() {
        assert_eq!(
            readiness(None, None, 3, true, 2),
            (
                false,
                "restoring 2 partitions from the changelog".to_string()
            )
        );
    }
}
