//! Which producer errors are worth another try. Pure: the sink and the dead-letter writer ask
//! this about every failed delivery.

use std::time::Duration;

use rdkafka::types::RDKafkaErrorCode;

/// How long a topic may stay unknown before writes to it count as refused for good. A broker
/// restart or a topic still being created makes a topic unknown for a moment; longer than
/// this, it does not exist (or this client may not see it).
pub const UNKNOWN_TOPIC_BOUND: Duration = Duration::from_secs(60);

/// Why the broker will never take a record, however often it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Larger than the producer's `message.max.bytes` or the topic's `max.message.bytes`.
    TooLarge,
    /// The topic's ACLs do not let this client write.
    Unauthorized,
    /// The topic has been unknown for longer than [`UNKNOWN_TOPIC_BOUND`].
    UnknownTopic,
    /// The broker refuses the record itself (invalid record, invalid topic, policy, a
    /// timestamp outside the topic's `message.timestamp.*.max.ms`).
    Invalid,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::TooLarge,
        Refusal::Unauthorized,
        Refusal::UnknownTopic,
        Refusal::Invalid,
    ];

    /// The `reason` label and dead-letter header of a window refused this way.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::TooLarge => "output_too_large",
            Refusal::Unauthorized => "output_unauthorized",
            Refusal::UnknownTopic => "output_unknown_topic",
            Refusal::Invalid => "output_invalid",
        }
    }
}

/// What to do about a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Transient (broker away, leader moving, timeout): send again after a backoff.
    Retry,
    /// The record can never be written there: `output.on_error` decides.
    Refused(Refusal),
    /// The producer itself is broken (an idempotence fatal error): nothing it sends will be
    /// written; the service stops whatever the policy.
    Fatal,
}

/// The verdict on an error `code` (None: not a broker or client error code, e.g. the producer
/// dropped the delivery), the topic having been unknown for `unknown_for` when the error is
/// an unknown topic.
pub fn classify(code: Option<RDKafkaErrorCode>, unknown_for: Duration) -> Verdict {
    use RDKafkaErrorCode as E;
    match code {
        Some(E::MessageSizeTooLarge | E::MessageBatchTooLarge) => {
            Verdict::Refused(Refusal::TooLarge)
        }
        Some(E::TopicAuthorizationFailed | E::ClusterAuthorizationFailed) => {
            Verdict::Refused(Refusal::Unauthorized)
        }
        Some(E::InvalidRecord | E::InvalidTopic | E::PolicyViolation | E::InvalidTimestamp) => {
            Verdict::Refused(Refusal::Invalid)
        }
        Some(e) if is_unknown_topic(e) => {
            if unknown_for >= UNKNOWN_TOPIC_BOUND {
                Verdict::Refused(Refusal::UnknownTopic)
            } else {
                Verdict::Retry
            }
        }
        Some(E::Fatal) => Verdict::Fatal,
        _ => Verdict::Retry,
    }
}

/// The topic (or its partition) is not known to the cluster, as far as this client sees.
pub fn is_unknown_topic(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as E;
    matches!(
        code,
        E::UnknownTopic | E::UnknownTopicOrPartition | E::UnknownPartition | E::UnknownTopicId
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use RDKafkaErrorCode as E;

    const NOW: Duration = Duration::ZERO;

    #[test]
    fn size_and_authorization_are_refused_at_once() {
        for (code, refusal) in [
            (E::MessageSizeTooLarge, Refusal::TooLarge),
            (E::MessageBatchTooLarge, Refusal::TooLarge),
            (E::TopicAuthorizationFailed, Refusal::Unauthorized),
            (E::ClusterAuthorizationFailed, Refusal::Unauthorized),
            (E::InvalidRecord, Refusal::Invalid),
            (E::InvalidTopic, Refusal::Invalid),
            (E::InvalidTimestamp, Refusal::Invalid),
        ] {
            assert_eq!(
                classify(Some(code), NOW),
                Verdict::Refused(refusal),
                "{code:?}"
            );
        }
    }

    #[test]
    fn transient_errors_are_retried() {
        for code in [
            E::MessageTimedOut,
            E::AllBrokersDown,
            E::NotLeaderForPartition,
            E::NotEnoughReplicas,
            E::RequestTimedOut,
            E::BrokerTransportFailure,
        ] {
            assert_eq!(classify(Some(code), NOW), Verdict::Retry, "{code:?}");
        }
        assert_eq!(classify(None, NOW), Verdict::Retry);
    }

    #[test]
    fn an_unknown_topic_is_retried_until_the_bound_then_refused() {
        for code in [
            E::UnknownTopic,
            E::UnknownTopicOrPartition,
            E::UnknownPartition,
        ] {
            assert_eq!(classify(Some(code), NOW), Verdict::Retry);
            assert_eq!(
                classify(Some(code), UNKNOWN_TOPIC_BOUND - Duration::from_millis(1)),
                Verdict::Retry
            );
            assert_eq!(
                classify(Some(code), UNKNOWN_TOPIC_BOUND),
                Verdict::Refused(Refusal::UnknownTopic)
            );
        }
    }

    #[test]
    fn a_fatal_producer_error_stops_whatever_the_policy() {
        assert_eq!(classify(Some(E::Fatal), NOW), Verdict::Fatal);
    }

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::HashSet<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Refusal::ALL.len());
    }
}
