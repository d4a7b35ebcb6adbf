//! Every metric the service exports, defined here and nowhere else. Names follow
//! `checkpointer_<noun>_<unit>[_total]`; labels are bounded (never a record key).

use prometheus::{
    Counter, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::engine::InvalidReason;

pub struct Metrics {
    registry: Registry,
    /// Every family's name, in registration order.
    names: Vec<String>,
    pub records_consumed: IntCounter,
    pub records_invalid: IntCounterVec,
    pub records_late: IntCounter,
    pub records_duplicate: IntCounter,
    pub offset_out_of_range: IntCounter,
    pub offset_gap: IntCounterVec,
    pub windows_open: IntGauge,
    pub windows_pending: IntGauge,
    pub windows_emitted: IntCounter,
    pub emit_failures: IntCounter,
    pub checkpoint_duration: Histogram,
    pub checkpoint_stall: Histogram,
    pub checkpoint_size: IntGauge,
    pub checkpoint_last_id: IntGauge,
    pub checkpoint_last_time: Gauge,
    pub checkpoints_completed: IntCounter,
    pub checkpoints_failed: IntCounter,
    pub checkpoints_abandoned: IntCounter,
    pub savepoints: IntCounter,
    pub checkpoints_retained: IntGauge,
    pub restore_info: IntGaugeVec,
    pub restore_fallbacks: IntCounter,
    pub restore_dropped_entries: IntCounter,
    pub changelog_published: IntCounter,
    pub changelog_publish_failures: IntCounter,
    pub changelog_restores: IntCounter,
    pub changelog_restore_remaining: IntGaugeVec,
    pub changelog_restore_read_bytes: IntGaugeVec,
    pub restore_dropped_partitions: IntCounter,
    pub checkpoints_in_flight: IntGauge,
    pub backpressure: IntGauge,
    pub backpressure_seconds: Counter,
    pub restore_duration: Gauge,
    pub consumer_lag: IntGaugeVec,
    pub partition_watermark: GaugeVec,
    pub watermark: Gauge,
    pub ready: IntGauge,
    pub store_size: IntGauge,
    pub checkpoint_interval: Gauge,
    pub build_info: IntGaugeVec,
    pub admin_refused: IntCounterVec,
    pub memory_resident: IntGauge,
    pub memory_limit: IntGauge,
    pub partitions_idle: IntGauge,
    pub memory_paused: IntGauge,
    pub open_windows_paused: IntGauge,
    pub open_windows_limit: IntGauge,
    pub dead_letters: IntCounterVec,
    pub dead_letters_pending: IntGauge,
    pub records_skipped: IntCounterVec,
}

/// `checkpointer_records_skipped_total`'s reason for offsets skipped because a held position
/// was out of range.
pub const SKIPPED_OUT_OF_RANGE: &str = "offset_out_of_range";

/// The registry being filled, and the names registered in it (kept because the exposition
/// leaves out labelled families that have no series yet).
struct Reg {
    registry: Registry,
    names: std::cell::RefCell<Vec<String>>,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Reg, m: T) -> T {
    r.names
        .borrow_mut()
        .extend(m.desc().iter().map(|d| d.fq_name.clone()));
    // names are static and unique, so registration cannot collide
    if let Err(e) = r.registry.register(Box::new(m.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    m
}

fn counter(r: &Reg, name: &str, help: &str) -> IntCounter {
    reg(
        r,
        IntCounter::new(name, help).unwrap_or_else(|_| unreachable!("valid metric name")),
    )
}

fn int_gauge(r: &Reg, name: &str, help: &str) -> IntGauge {
    reg(
        r,
        IntGauge::new(name, help).unwrap_or_else(|_| unreachable!("valid metric name")),
    )
}

fn float_counter(r: &Reg, name: &str, help: &str) -> Counter {
    reg(
        r,
        Counter::new(name, help).unwrap_or_else(|_| unreachable!("valid metric name")),
    )
}

fn gauge(r: &Reg, name: &str, help: &str) -> Gauge {
    reg(
        r,
        Gauge::new(name, help).unwrap_or_else(|_| unreachable!("valid metric name")),
    )
}

fn int_gauge_vec(r: &Reg, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    reg(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels)
            .unwrap_or_else(|_| unreachable!("valid metric name")),
    )
}

fn histogram(r: &Reg, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets);
    reg(
        r,
        Histogram::with_opts(opts).unwrap_or_else(|_| unreachable!("valid metric name")),
    )
}

impl Metrics {
    pub fn new() -> Self {
        let r = Reg {
            registry: Registry::new(),
            names: Default::default(),
        };
        let records_invalid = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "checkpointer_records_invalid_total",
                    "Records skipped because they could not be decoded, by reason.",
                ),
                &["reason"],
            )
            .unwrap_or_else(|_| unreachable!("valid metric name")),
        );
        for reason in InvalidReason::ALL {
            records_invalid.with_label_values(&[reason.label()]);
        }
        let admin_refused = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "checkpointer_admin_requests_refused_total",
                    "Admin requests that would change the instance (savepoint, stop, delete) refused, by reason: missing_token, wrong_token, cross_site.",
                ),
                &["reason"],
            )
            .unwrap_or_else(|_| unreachable!("valid metric name")),
        );
        for reason in crate::http::auth::Denied::LABELS {
            admin_refused.with_label_values(&[reason]);
        }
        let dead_letters = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "checkpointer_dead_letters_total",
                    "Records written to input.dead_letter_topic, by reason: an invalid-record reason, late, or output_too_large, output_unauthorized, output_unknown_topic, output_invalid for windows the output refused.",
                ),
                &["reason"],
            )
            .unwrap_or_else(|_| unreachable!("valid metric name")),
        );
        for reason in InvalidReason::ALL
            .iter()
            .map(|r| r.label())
            .chain([crate::sink::dead_letter::LATE])
            .chain(crate::sink::verdict::Refusal::ALL.iter().map(|r| r.label()))
        {
            dead_letters.with_label_values(&[reason]);
        }
        let records_skipped = reg(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "checkpointer_records_skipped_total",
                    "Offsets never read because a held position was moved past them, by reason (offset_out_of_range: kafka.on_offset_out_of_range moved a partition whose held position the broker no longer had).",
                ),
                &["reason"],
            )
            .unwrap_or_else(|_| unreachable!("valid metric name")),
        );
        records_skipped.with_label_values(&[SKIPPED_OUT_OF_RANGE]);
        let secs = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0,
        ];
        let stall = vec![
            0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
        ];
        Metrics {
            records_consumed: counter(&r, "checkpointer_records_consumed_total", "Records read from the input topics (valid, invalid and late)."),
            records_invalid,
            records_late: counter(&r, "checkpointer_records_late_total", "Records dropped because all of their windows were already final."),
            records_duplicate: counter(&r, "checkpointer_records_duplicate_total", "Redelivered records at offsets already processed, ignored."),
            offset_out_of_range: counter(&r, "checkpointer_offset_out_of_range_total", "Times the broker reported a held position out of range (kafka.on_offset_out_of_range decides what happens)."),
            offset_gap: reg(&r, IntCounterVec::new(Opts::new("checkpointer_offset_gap_records_total", "Offsets skipped between the held position and a partition's first record after an assignment (compaction and transaction markers make small gaps legitimate)."), &["topic", "partition"]).unwrap_or_else(|_| unreachable!("valid metric name"))),
            windows_open: int_gauge(&r, "checkpointer_windows_open", "Window instances (window, key, start) currently accumulating."),
            windows_pending: int_gauge(&r, "checkpointer_windows_pending", "Final windows waiting for a durable checkpoint or an output acknowledgement."),
            windows_emitted: counter(&r, "checkpointer_windows_emitted_total", "Final windows acknowledged by the output topic."),
            emit_failures: counter(&r, "checkpointer_emit_failures_total", "Transient failures to write a final window to the output topic (retried; a refusal for good follows output.on_error instead)."),
            checkpoint_duration: histogram(&r, "checkpointer_checkpoint_duration_seconds", "Time from checkpoint trigger to durable (flushed) in sled.", secs),
            checkpoint_stall: histogram(&r, "checkpointer_checkpoint_stall_seconds", "Time record processing paused to take a checkpoint snapshot.", stall),
            checkpoint_size: int_gauge(&r, "checkpointer_checkpoint_size_bytes", "Bytes written by the last completed checkpoint."),
            checkpoint_last_id: int_gauge(&r, "checkpointer_checkpoint_last_completed_id", "Id of the last completed checkpoint."),
            checkpoint_last_time: gauge(&r, "checkpointer_checkpoint_last_completed_timestamp_seconds", "Unix time at which the last checkpoint completed."),
            checkpoints_completed: counter(&r, "checkpointer_checkpoints_completed_total", "Checkpoints made durable."),
            checkpoints_failed: counter(&r, "checkpointer_checkpoints_failed_total", "Checkpoint and savepoint attempts that failed (write or flush error)."),
            checkpoints_abandoned: counter(&r, "checkpointer_checkpoints_abandoned_total", "Checkpoint and savepoint attempts abandoned because they were not durable within checkpoint.timeout."),
            savepoints: counter(&r, "checkpointer_savepoints_total", "Savepoints completed."),
            checkpoints_retained: int_gauge(&r, "checkpointer_checkpoints_retained", "Complete checkpoints the store keeps restorable."),
            restore_info: int_gauge_vec(&r, "checkpointer_restore_info", "What the last start restored: kind is checkpoint, savepoint or none; always 1.", &["kind", "checkpoint_id", "savepoint"]),
            restore_fallbacks: counter(&r, "checkpointer_restore_fallbacks_total", "Snapshots found unreadable at start and skipped for an older one."),
            changelog_published: counter(&r, "checkpointer_changelog_published_total", "Partition states published to the changelog topic (one per partition per checkpoint)."),
            changelog_publish_failures: counter(&r, "checkpointer_changelog_publish_failures_total", "Changelog publications that failed; the next checkpoint publishes the partitions' full state."),
            changelog_restores: counter(&r, "checkpointer_changelog_restores_total", "Partitions whose state was restored from the changelog topic on assignment."),
            changelog_restore_remaining: int_gauge_vec(&r, "checkpointer_changelog_restore_remaining_records", "Changelog records left to read while a partition's state is restored (0 when done).", &["partition"]),
            changelog_restore_read_bytes: int_gauge_vec(&r, "checkpointer_changelog_restore_read_bytes", "Bytes (keys and values) read from the changelog partition that holds the partition, by its current or last restore.", &["partition"]),
            restore_dropped_entries: counter(&r, "checkpointer_restore_dropped_entries_total", "Open windows of the restored snapshot dropped at start because they no longer fit the configuration (checkpoint.allow_non_restored_state)."),
            restore_dropped_partitions: counter(&r, "checkpointer_restore_dropped_partitions_total", "Partition offsets of the restored snapshot dropped at start because their topic is no longer subscribed."),
            checkpoints_in_flight: int_gauge(&r, "checkpointer_checkpoints_in_flight", "Checkpoints triggered and not yet durable."),
            backpressure: int_gauge(&r, "checkpointer_backpressure", "1 while consumption is paused (back-pressure): a checkpoint writing for longer than checkpoint.interval, final windows past output.max_pending_windows, resident memory past state.max_memory, or dead-letter copies holding a checkpoint back; else 0."),
            backpressure_seconds: float_counter(&r, "checkpointer_backpressure_seconds_total", "Seconds consumption spent paused by back-pressure (slow checkpoints), summed since start."),
            restore_duration: gauge(&r, "checkpointer_restore_duration_seconds", "Time the last start took to restore its checkpoint or savepoint."),
            consumer_lag: int_gauge_vec(&r, "checkpointer_consumer_lag_records", "Records between the next offset to read and the partition's high watermark.", &["topic", "partition"]),
            partition_watermark: reg(&r, GaugeVec::new(Opts::new("checkpointer_partition_max_event_time_seconds", "Highest event time seen per partition (Unix time)."), &["topic", "partition"]).unwrap_or_else(|_| unreachable!("valid metric name"))),
            watermark: gauge(&r, "checkpointer_watermark_seconds", "Service event-time watermark (Unix time)."),
            ready: int_gauge(&r, "checkpointer_ready", "1 once state is restored and partitions are assigned."),
            store_size: int_gauge(&r, "checkpointer_store_size_bytes", "Bytes the checkpoint store occupies on disk (sled and its pack files)."),
            checkpoint_interval: gauge(&r, "checkpointer_checkpoint_interval_seconds", "The configured checkpoint.interval (alert rules compare checkpoint age with it)."),
            build_info: int_gauge_vec(&r, "checkpointer_build_info", "Always 1; the running build's version as a label.", &["version"]),
            admin_refused,
            memory_resident: int_gauge(&r, "checkpointer_memory_resident_bytes", "The process's resident memory (VmRSS), read every quarter second."),
            open_windows_paused: int_gauge(&r, "checkpointer_open_windows_paused", "1 while consumption is paused because more windows are open than state.max_open_windows (until they are below 90% of it), else 0."),
            open_windows_limit: int_gauge(&r, "checkpointer_open_windows_limit", "Open windows past which consumption pauses (state.max_open_windows); 0: no limit."),
            memory_paused: int_gauge(&r, "checkpointer_memory_paused", "1 while consumption is paused because the resident memory passed state.max_memory (until it is below 90% of it), else 0."),
            partitions_idle: int_gauge(&r, "checkpointer_partitions_idle", "Assigned partitions caught up and quiet for watermark.idle_timeout, which do not hold the watermark back until their next record."),
            memory_limit: int_gauge(&r, "checkpointer_memory_limit_bytes", "Resident memory past which consumption pauses (state.max_memory, or 80% of the container's limit); 0: no limit."),
            dead_letters,
            records_skipped,
            dead_letters_pending: int_gauge(&r, "checkpointer_dead_letters_pending", "Copies for input.dead_letter_topic not acknowledged yet; checkpoints wait for them."),
            names: r.names.take(),
            registry: r.registry,
        }
    }

    pub fn invalid(&self, reason: InvalidReason) {
        self.records_invalid
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// `n` offsets skipped, for `reason`.
    pub fn records_skipped(&self, reason: &str, n: u64) {
        self.records_skipped.with_label_values(&[reason]).inc_by(n);
    }

    /// A record written to the dead-letter topic, for `reason`.
    pub fn dead_letter(&self, reason: &str) {
        self.dead_letters.with_label_values(&[reason]).inc();
    }

    /// The name of every metric family the service exports (histograms: the base name of
    /// their `_bucket`, `_sum` and `_count` series), labelled or not, with series yet or not.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The Prometheus text exposition and its content type.
    pub fn render(&self) -> (String, Vec<u8>) {
        let encoder = TextEncoder::new();
        let mut buf = Vec::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        (encoder.format_type().to_string(), buf)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_follow_the_convention() {
        let m = Metrics::new();
        m.records_consumed.inc();
        m.invalid(InvalidReason::NullKey);
        m.consumer_lag.with_label_values(&["t", "0"]).set(3);
        let (ctype, body) = m.render();
        assert!(ctype.starts_with("text/plain"));
        let text = String::from_utf8(body).expect("utf8");
        assert!(text.contains("checkpointer_records_consumed_total 1"));
        assert!(text.contains("checkpointer_records_invalid_total{reason=\"null_key\"} 1"));
        assert!(text.contains("checkpointer_records_invalid_total{reason=\"invalid_json\"} 0"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            assert!(name.starts_with("checkpointer_"), "{name}");
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name} is a {kind}"
            );
        }
    }
}
