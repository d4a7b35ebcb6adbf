//! Turning a Kafka message (key, payload, timestamp) into a record, or a reason it is invalid.

use crate::event_time::EventTime;
use serde_json::Value;

/// Where the grouping key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldSource {
    MessageKey,
    Pointer(String),
}

/// Where the event time comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeSource {
    MessageTimestamp,
    Pointer(String),
}

/// Event times outside years 0001..=9999 (epoch ms) are refused as `bad_timestamp`: they are
/// unit mistakes (microseconds sent as milliseconds) that would otherwise overflow window
/// arithmetic or push the watermark past all real data.
pub const MIN_TS: i64 = -62_135_596_800_000;
pub const MAX_TS: i64 = 253_402_300_799_999;

/// A decoded input record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub key: String,
    pub value: Option<f64>,
    /// Event time, epoch milliseconds.
    pub ts: EventTime,
}

/// Why a message was skipped. The label is the `reason` of `checkpointer_records_invalid_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidReason {
    EmptyPayload,
    InvalidJson,
    MissingKey,
    NullKey,
    BadKey,
    MissingValue,
    BadValue,
    MissingTimestamp,
    BadTimestamp,
}

impl InvalidReason {
    pub const ALL: [InvalidReason; 9] = [
        InvalidReason::EmptyPayload,
        InvalidReason::InvalidJson,
        InvalidReason::MissingKey,
        InvalidReason::NullKey,
        InvalidReason::BadKey,
        InvalidReason::MissingValue,
        InvalidReason::BadValue,
        InvalidReason::MissingTimestamp,
        InvalidReason::BadTimestamp,
    ];

    pub fn label(self) -> &'static str {
        match self {
            InvalidReason::EmptyPayload => "empty_payload",
            InvalidReason::InvalidJson => "invalid_json",
            InvalidReason::MissingKey => "missing_key",
            InvalidReason::NullKey => "null_key",
            InvalidReason::BadKey => "bad_key",
            InvalidReason::MissingValue => "missing_value",
            InvalidReason::BadValue => "bad_value",
            InvalidReason::MissingTimestamp => "missing_timestamp",
            InvalidReason::BadTimestamp => "bad_timestamp",
        }
    }
}

/// Decodes messages per the `input:` settings.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub key: FieldSource,
    pub value: Option<String>,
    pub timestamp: TimeSource,
}

impl Decoder {
    pub fn decode(
        &self,
        message_key: Option<&[u8]>,
        payload: Option<&[u8]>,
        message_ts: Option<i64>,
    ) -> Result<Record, InvalidReason> {
        let payload = match payload {
            Some(p) if !p.iter().all(u8::is_ascii_whitespace) => p,
            _ => return Err(InvalidReason::EmptyPayload),
        };
        let doc: Value = serde_json::from_slice(payload).map_err(|_| InvalidReason::InvalidJson)?;
        if !doc.is_object() {
            return Err(InvalidReason::InvalidJson);
        }
        let key = match &self.key {
            FieldSource::MessageKey => match message_key {
                None => return Err(InvalidReason::NullKey),
                Some(bytes) => std::str::from_utf8(bytes)
                    .map_err(|_| InvalidReason::BadKey)?
                    .to_string(),
            },
            FieldSource::Pointer(p) => match doc.pointer(p) {
                None => return Err(InvalidReason::MissingKey),
                Some(Value::Null) => return Err(InvalidReason::NullKey),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(_) => return Err(InvalidReason::BadKey),
            },
        };
        let value = match &self.value {
            None => None,
            Some(p) => match doc.pointer(p) {
                None | Some(Value::Null) => return Err(InvalidReason::MissingValue),
                Some(Value::Number(n)) => match n.as_f64() {
                    Some(v) if v.is_finite() => Some(v),
                    _ => return Err(InvalidReason::BadValue),
                },
                Some(_) => return Err(InvalidReason::BadValue),
            },
        };
        let ts = match &self.timestamp {
            TimeSource::MessageTimestamp => message_ts.ok_or(InvalidReason::MissingTimestamp)?,
            TimeSource::Pointer(p) => match doc.pointer(p) {
                None | Some(Value::Null) => return Err(InvalidReason::MissingTimestamp),
                Some(Value::Number(n)) => n.as_i64().ok_or(InvalidReason::BadTimestamp)?,
                Some(_) => return Err(InvalidReason::BadTimestamp),
            },
        };
        if !(MIN_TS..=MAX_TS).contains(&ts) {
            return Err(InvalidReason::BadTimestamp);
        }
        Ok(Record {
            key,
            value,
            ts: EventTime(ts),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder() -> Decoder {
        Decoder {
            key: FieldSource::Pointer("/user".into()),
            value: Some("/amount".into()),
            timestamp: TimeSource::Pointer("/ts".into()),
        }
    }

    fn reason(payload: &str) -> InvalidReason {
        decoder()
            .decode(None, Some(payload.as_bytes()), None)
            .expect_err("invalid")
    }

    #[test]
    fn decodes_a_valid_record() {
        let r = decoder()
            .decode(None, Some(br#"{"user":"u1","amount":2.5,"ts":1000}"#), None)
            .expect("valid");
        assert_eq!(
            r,
            Record {
                key: "u1".into(),
                value: Some(2.5),
                ts: EventTime(1000)
            }
        );
    }

    #[test]
    fn numeric_keys_become_strings() {
        let r = decoder()
            .decode(None, Some(br#"{"user":42,"amount":1,"ts":1}"#), None)
            .expect("valid");
        assert_eq!(r.key, "42");
    }

    #[test]
    fn every_kind_of_bad_input_has_its_reason() {
        assert_eq!(
            decoder().decode(None, None, None),
            Err(InvalidReason::EmptyPayload)
        );
        assert_eq!(reason("  "), InvalidReason::EmptyPayload);
        assert_eq!(reason("{not json"), InvalidReason::InvalidJson);
        assert_eq!(reason("[1,2]"), InvalidReason::InvalidJson);
        assert_eq!(reason(r#"{"amount":1,"ts":1}"#), InvalidReason::MissingKey);
        assert_eq!(
            reason(r#"{"user":null,"amount":1,"ts":1}"#),
            InvalidReason::NullKey
        );
        assert_eq!(
            reason(r#"{"user":{"a":1},"amount":1,"ts":1}"#),
            InvalidReason::BadKey
        );
        assert_eq!(
            reason(r#"{"user":"u","ts":1}"#),
            InvalidReason::MissingValue
        );
        assert_eq!(
            reason(r#"{"user":"u","amount":"3","ts":1}"#),
            InvalidReason::BadValue
        );
        assert_eq!(
            reason(r#"{"user":"u","amount":3}"#),
            InvalidReason::MissingTimestamp
        );
        assert_eq!(
            reason(r#"{"user":"u","amount":3,"ts":"yesterday"}"#),
            InvalidReason::BadTimestamp
        );
        assert_eq!(
            reason(r#"{"user":"u","amount":3,"ts":1.5}"#),
            InvalidReason::BadTimestamp
        );
        // microseconds sent as milliseconds, and the i64 extremes
        assert_eq!(
            reason(r#"{"user":"u","amount":3,"ts":1700000000000000000}"#),
            InvalidReason::BadTimestamp
        );
        assert_eq!(
            reason(r#"{"user":"u","amount":3,"ts":-9223372036854775808}"#),
            InvalidReason::BadTimestamp
        );
    }

    #[test]
    fn message_key_and_timestamp_sources() {
        let d = Decoder {
            key: FieldSource::MessageKey,
            value: None,
            timestamp: TimeSource::MessageTimestamp,
        };
        let r = d
            .decode(Some(b"dev-1"), Some(b"{}"), Some(77))
            .expect("valid");
        assert_eq!(r.key, "dev-1");
        assert_eq!(r.ts, EventTime(77));
        assert_eq!(
            d.decode(None, Some(b"{}"), Some(1)),
            Err(InvalidReason::NullKey)
        );
        assert_eq!(
            d.decode(Some(&[0xff, 0xfe]), Some(b"{}"), Some(1)),
            Err(InvalidReason::BadKey)
        );
        assert_eq!(
            d.decode(Some(b"k"), Some(b"{}"), None),
            Err(InvalidReason::MissingTimestamp)
        );
    }
}
