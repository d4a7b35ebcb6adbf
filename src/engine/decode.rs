//! Turning a Kafka message (key, payload, timestamp) into a record, or a reason it is invalid.

use std::borrow::Cow;

use serde_json::{Number, Value};

use crate::event_time::EventTime;

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

/// A decoded input record; its key borrows from the message where it can.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<'a> {
    pub key: Cow<'a, str>,
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
    /// Event time further ahead of the wall clock than `watermark.max_future_skew`.
    FutureTimestamp,
    /// A value beyond ±1e288 (`MAX_VALUE`): sums of such values could overflow to infinity.
    ValueOutOfRange,
}

/// The largest magnitude of a value: the sum of as many values as a window can count
/// (2^64) stays finite (below 1.8e307, where `f64::MAX` is 1.8e308), so that no sum or
/// mean overflows to infinity and is written as `null`.
pub const MAX_VALUE: f64 = 1e288;

impl InvalidReason {
    pub const ALL: [InvalidReason; 11] = [
        InvalidReason::EmptyPayload,
        InvalidReason::InvalidJson,
        InvalidReason::MissingKey,
        InvalidReason::NullKey,
        InvalidReason::BadKey,
        InvalidReason::MissingValue,
        InvalidReason::BadValue,
        InvalidReason::MissingTimestamp,
        InvalidReason::BadTimestamp,
        InvalidReason::FutureTimestamp,
        InvalidReason::ValueOutOfRange,
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
            InvalidReason::FutureTimestamp => "future_timestamp",
            InvalidReason::ValueOutOfRange => "value_out_of_range",
        }
    }
}

/// Decodes messages per the `input:` settings. The configured JSON pointers are compiled once:
/// a message is parsed in one pass (two when the typed pass over a top-level object leaves it
/// to the general walk) that validates the whole document but keeps only the configured
/// fields, borrowing strings from the payload (no tree of values).
#[derive(Debug, Clone)]
pub struct Decoder {
    pub key: FieldSource,
    pub value: Option<String>,
    pub timestamp: TimeSource,
    plan: Plan,
}

/// The three fields a record is made of, in capture order.
const KEY: usize = 0;
const VALUE: usize = 1;
const TS: usize = 2;

/// How the payload is read.
#[derive(Debug, Clone)]
enum Plan {
    /// Every pointer names a member of the top-level object (the usual configuration): a
    /// typed pass first (see [`Decoder::flat`]), and the walk of the trie if that pass meets
    /// anything it does not expect.
    Flat(Node),
    /// One pass over the document, capturing the fields at the trie's leaves.
    Walk(Node),
    /// Into a tree of values first (a pointer that is a prefix of another, or the whole
    /// document): rare configurations, same results.
    Tree,
}

/// A node of the trie of configured pointers: the field it captures, or its children.
#[derive(Debug, Clone, Default)]
struct Node {
    capture: Option<usize>,
    children: Vec<(String, Node)>,
    /// Every field captured in this subtree (reset when the subtree is read again).
    below: Vec<usize>,
}

/// The unescaped segments of a JSON pointer; `None` when it does not start with `/`.
fn segments(pointer: &str) -> Option<Vec<String>> {
    let rest = pointer.strip_prefix('/')?;
    Some(
        rest.split('/')
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect(),
    )
}

impl Plan {
    fn new(key: &FieldSource, value: Option<&str>, timestamp: &TimeSource) -> Plan {
        let mut paths: Vec<(usize, Vec<String>)> = Vec::new();
        let mut add = |field: usize, pointer: &str| -> bool {
            match segments(pointer) {
                Some(s) => {
                    paths.push((field, s));
                    true
                }
                None => false,
            }
        };
        let mut walkable = true;
        if let FieldSource::Pointer(p) = key {
            walkable &= add(KEY, p);
        }
        if let Some(p) = value {
            walkable &= add(VALUE, p);
        }
        if let TimeSource::Pointer(p) = timestamp {
            walkable &= add(TS, p);
        }
        let prefix = paths.iter().any(|(i, a)| {
            paths
                .iter()
                .any(|(j, b)| i != j && b.len() >= a.len() && b[..a.len()] == a[..])
        });
        if !walkable || prefix {
            return Plan::Tree;
        }
        let mut root = Node::default();
        for (field, path) in paths {
            let mut node = &mut root;
            node.below.push(field);
            for seg in path {
                let at = match node.children.iter().position(|(name, _)| *name == seg) {
                    Some(at) => at,
                    None => {
                        node.children.push((seg, Node::default()));
                        node.children.len() - 1
                    }
                };
                node = &mut node.children[at].1;
                node.below.push(field);
            }
            node.capture = Some(field);
        }
        if root
            .children
            .iter()
            .all(|(_, child)| child.children.is_empty())
        {
            Plan::Flat(root)
        } else {
            Plan::Walk(root)
        }
    }
}

impl Decoder {
    pub fn new(key: FieldSource, value: Option<String>, timestamp: TimeSource) -> Decoder {
        let plan = Plan::new(&key, value.as_deref(), &timestamp);
        Decoder {
            key,
            value,
            timestamp,
            plan,
        }
    }

    pub fn decode<'a>(
        &self,
        message_key: Option<&'a [u8]>,
        payload: Option<&'a [u8]>,
        message_ts: Option<i64>,
    ) -> Result<Record<'a>, InvalidReason> {
        let payload = match payload {
            Some(p) if !p.iter().all(u8::is_ascii_whitespace) => p,
            _ => return Err(InvalidReason::EmptyPayload),
        };
        let mut found: [Field<'a>; 3] = [Field::Missing, Field::Missing, Field::Missing];
        match &self.plan {
            Plan::Flat(root) | Plan::Walk(root) => {
                // the whole payload is checked as UTF-8 in one pass: the parser of a `str`
                // then checks no string again, where the parser of bytes checks each one
                let text = std::str::from_utf8(payload).map_err(|_| InvalidReason::InvalidJson)?;
                if let Plan::Flat(root) = &self.plan {
                    if let Some(record) = self.flat(root, text, message_key, message_ts) {
                        return record;
                    }
                }
                let mut de = serde_json::Deserializer::from_str(text);
                serde::de::DeserializeSeed::deserialize(
                    Walk {
                        node: root,
                        found: &mut found,
                        root: true,
                    },
                    &mut de,
                )
                .map_err(|_| InvalidReason::InvalidJson)?;
                de.end().map_err(|_| InvalidReason::InvalidJson)?;
            }
            Plan::Tree => {
                let doc: Value =
                    serde_json::from_slice(payload).map_err(|_| InvalidReason::InvalidJson)?;
                if !doc.is_object() {
                    return Err(InvalidReason::InvalidJson);
                }
                let mut take = |field: usize, pointer: &str| {
                    found[field] = doc.pointer(pointer).map_or(Field::Missing, Field::of_value);
                };
                if let FieldSource::Pointer(p) = &self.key {
                    take(KEY, p);
                }
                if let Some(p) = &self.value {
                    take(VALUE, p);
                }
                if let TimeSource::Pointer(p) = &self.timestamp {
                    take(TS, p);
                }
            }
        }
        let [key, value, ts] = found;
        let key = match &self.key {
            FieldSource::MessageKey => message_key_of(message_key)?,
            FieldSource::Pointer(_) => match key {
                Field::Missing => return Err(InvalidReason::MissingKey),
                Field::Null => return Err(InvalidReason::NullKey),
                Field::Str(s) => s,
                Field::Num(n) => Cow::Owned(n.to_string()),
                Field::Bool(b) => Cow::Owned(b.to_string()),
                Field::Other => return Err(InvalidReason::BadKey),
            },
        };
        let value = match &self.value {
            None => None,
            Some(_) => match value {
                Field::Missing | Field::Null => return Err(InvalidReason::MissingValue),
                Field::Num(n) => Some(value_in_range(n.as_f64())?),
                _ => return Err(InvalidReason::BadValue),
            },
        };
        let ts = match &self.timestamp {
            TimeSource::MessageTimestamp => message_ts.ok_or(InvalidReason::MissingTimestamp)?,
            TimeSource::Pointer(_) => match ts {
                Field::Missing | Field::Null => return Err(InvalidReason::MissingTimestamp),
                Field::Num(n) => n.as_i64().ok_or(InvalidReason::BadTimestamp)?,
                _ => return Err(InvalidReason::BadTimestamp),
            },
        };
        record(key, value, ts)
    }

    /// The typed pass of a [`Plan::Flat`]: the record, or the reason it is invalid, if every
    /// configured field has the type a valid record gives it (a key that is a string, a number
    /// or a boolean; a number for the value; an integer that fits an `i64` for the event time)
    /// and the document parses; `None` otherwise, and the walk then finds what is wrong, if
    /// anything (this pass stops at the first value of an unexpected type). A member on no
    /// pointer is read as the walk reads it (every check of the parser), and a member repeated
    /// replaces what it held.
    fn flat<'a>(
        &self,
        root: &Node,
        text: &'a str,
        message_key: Option<&'a [u8]>,
        message_ts: Option<i64>,
    ) -> Option<Result<Record<'a>, InvalidReason>> {
        let mut out = Flat::default();
        let mut de = serde_json::Deserializer::from_str(text);
        serde::Deserializer::deserialize_map(
            &mut de,
            FlatWalk {
                node: root,
                out: &mut out,
            },
        )
        .ok()?;
        de.end().ok()?;
        let key = match &self.key {
            FieldSource::MessageKey => match message_key_of(message_key) {
                Ok(key) => key,
                Err(reason) => return Some(Err(reason)),
            },
            FieldSource::Pointer(_) => out.key?,
        };
        let value = match &self.value {
            None => None,
            Some(_) => match value_in_range(Some(out.value?)) {
                Ok(v) => Some(v),
                Err(reason) => return Some(Err(reason)),
            },
        };
        let ts = match &self.timestamp {
            TimeSource::MessageTimestamp => match message_ts {
                Some(ts) => ts,
                None => return Some(Err(InvalidReason::MissingTimestamp)),
            },
            TimeSource::Pointer(_) => out.ts?,
        };
        Some(record(key, value, ts))
    }
}

/// The key of a message used as the grouping key.
fn message_key_of(message_key: Option<&[u8]>) -> Result<Cow<'_, str>, InvalidReason> {
    match message_key {
        None => Err(InvalidReason::NullKey),
        Some(bytes) => Ok(Cow::Borrowed(
            std::str::from_utf8(bytes).map_err(|_| InvalidReason::BadKey)?,
        )),
    }
}

/// A number read as a value (`None`: not representable), refused past [`MAX_VALUE`].
fn value_in_range(v: Option<f64>) -> Result<f64, InvalidReason> {
    match v {
        Some(v) if v.abs() <= MAX_VALUE => Ok(v),
        Some(v) if v.is_finite() => Err(InvalidReason::ValueOutOfRange),
        _ => Err(InvalidReason::BadValue),
    }
}

/// The record of decoded fields, its event time checked against [`MIN_TS`]..=[`MAX_TS`].
fn record(key: Cow<'_, str>, value: Option<f64>, ts: i64) -> Result<Record<'_>, InvalidReason> {
    if !(MIN_TS..=MAX_TS).contains(&ts) {
        return Err(InvalidReason::BadTimestamp);
    }
    Ok(Record {
        key,
        value,
        ts: EventTime(ts),
    })
}

/// What the typed pass of a [`Plan::Flat`] read of the configured members.
#[derive(Default)]
struct Flat<'a> {
    key: Option<Cow<'a, str>>,
    value: Option<f64>,
    ts: Option<i64>,
}

/// The top-level object, read by the typed pass: each configured member through the seed of
/// its field, every other member through the walk's [`SKIP`].
struct FlatWalk<'n, 'o, 'a> {
    node: &'n Node,
    out: &'o mut Flat<'a>,
}

impl<'de: 'a, 'a> serde::de::Visitor<'de> for FlatWalk<'_, '_, 'a> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut skipped: [Field<'a>; 3] = [Field::Missing, Field::Missing, Field::Missing];
        while let Some(field) = map.next_key_seed(KeySeed::<true>(self.node))? {
            match field {
                Some(KEY) => self.out.key = Some(map.next_value_seed(KeyField)?),
                Some(VALUE) => self.out.value = Some(map.next_value_seed(ValueField)?),
                Some(TS) => self.out.ts = Some(map.next_value_seed(TimeField)?),
                _ => map.next_value_seed(Walk {
                    node: &SKIP,
                    found: &mut skipped,
                    root: false,
                })?,
            }
        }
        Ok(())
    }
}

/// A key as the typed pass reads it: a string (borrowed unless escaped), or a number or a
/// boolean written as text, as the walk writes them.
struct KeyField;

impl<'de> serde::de::DeserializeSeed<'de> for KeyField {
    type Value = Cow<'de, str>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for KeyField {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string, a number or a boolean")
    }
    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Cow::Owned(Number::from(v).to_string()))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Cow::Owned(Number::from(v).to_string()))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Number::from_f64(v)
            .map(|n| Cow::Owned(n.to_string()))
            .ok_or_else(|| E::custom("not a finite number"))
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }
}

/// A value as the typed pass reads it: a number, as [`Number::as_f64`] gives it.
struct ValueField;

impl<'de> serde::de::DeserializeSeed<'de> for ValueField {
    type Value = f64;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<f64, D::Error> {
        d.deserialize_f64(self)
    }
}

impl serde::de::Visitor<'_> for ValueField {
    type Value = f64;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number")
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }
}

/// An event time as the typed pass reads it: an integer that fits an `i64`.
struct TimeField;

impl<'de> serde::de::DeserializeSeed<'de> for TimeField {
    type Value = i64;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<i64, D::Error> {
        d.deserialize_i64(self)
    }
}

impl serde::de::Visitor<'_> for TimeField {
    type Value = i64;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an integer")
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
        Ok(v)
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
        i64::try_from(v).map_err(|_| E::custom("beyond i64"))
    }
}

/// A captured field.
#[derive(Debug, Clone, PartialEq)]
enum Field<'a> {
    Missing,
    Null,
    Str(Cow<'a, str>),
    Num(Number),
    Bool(bool),
    /// An array or an object.
    Other,
}

impl Field<'_> {
    fn of_value(v: &Value) -> Field<'static> {
        match v {
            Value::Null => Field::Null,
            Value::String(s) => Field::Str(Cow::Owned(s.clone())),
            Value::Number(n) => Field::Num(n.clone()),
            Value::Bool(b) => Field::Bool(*b),
            Value::Array(_) | Value::Object(_) => Field::Other,
        }
    }
}

/// Reads one value at `node` of the trie: captures it at a leaf, descends into the children
/// otherwise, and skips (but validates) everything else. At the root, anything but an object
/// is an error.
struct Walk<'n, 'f, 'a> {
    node: &'n Node,
    found: &'f mut [Field<'a>; 3],
    root: bool,
}

/// What a value on no configured pointer is read with: nothing captured, but read through
/// the parser's full checks (UTF-8, escapes, nesting depth) as parsing a tree would, which
/// skipping it with `IgnoredAny` would not.
static SKIP: Node = Node {
    capture: None,
    children: Vec::new(),
    below: Vec::new(),
};

/// Names which child of a node a key is, without allocating for the key; with `CAPTURE`, the
/// field that child captures instead (the typed pass's members). Two instances, so that each
/// caller's `next_key_seed` inlines its own.
struct KeySeed<'n, const CAPTURE: bool>(&'n Node);

impl<'de, const CAPTURE: bool> serde::de::DeserializeSeed<'de> for KeySeed<'_, CAPTURE> {
    type Value = Option<usize>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, const CAPTURE: bool> serde::de::Visitor<'de> for KeySeed<'_, CAPTURE> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<usize>, E> {
        let v = v.as_bytes();
        // byte by byte: member names are short, and a call to `memcmp` per name and member
        // costs more than the comparison
        let same = |name: &str| name.len() == v.len() && name.bytes().zip(v).all(|(a, &b)| a == b);
        let children = &self.0.children;
        let at = children.iter().position(|(name, _)| same(name));
        Ok(if CAPTURE {
            at.and_then(|at| children[at].1.capture)
        } else {
            at
        })
    }
}

impl<'de: 'a, 'a> serde::de::DeserializeSeed<'de> for Walk<'_, '_, 'a> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'a> Walk<'_, '_, 'a> {
    fn leaf<E: serde::de::Error>(self, field: Field<'a>) -> Result<(), E> {
        if self.root {
            return Err(E::custom("not an object"));
        }
        if let Some(i) = self.node.capture {
            self.found[i] = field;
        }
        Ok(())
    }
}

impl<'de: 'a, 'a> serde::de::Visitor<'de> for Walk<'_, '_, 'a> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.leaf(Field::Bool(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.leaf(Field::Num(v.into()))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.leaf(Field::Num(v.into()))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        // serde_json only produces finite numbers
        match Number::from_f64(v) {
            Some(n) => self.leaf(Field::Num(n)),
            None => self.leaf(Field::Other),
        }
    }
    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<(), E> {
        self.leaf(Field::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        // a string with escapes: unescaped into a buffer of the parser's
        if self.node.capture.is_none() {
            return self.leaf(Field::Other);
        }
        self.leaf(Field::Str(Cow::Owned(v.to_string())))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.leaf(Field::Null)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.leaf(Field::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.root {
            return Err(serde::de::Error::custom("not an object"));
        }
        if let Some(i) = self.node.capture {
            self.found[i] = Field::Other;
        }
        let mut index = 0usize;
        loop {
            // an element whose index is a child's segment (as JSON pointers write indices)
            let child = self
                .node
                .children
                .iter()
                .find(|(name, _)| index_of(name) == Some(index));
            let more = match child {
                Some((_, node)) => {
                    for f in &node.below {
                        self.found[*f] = Field::Missing;
                    }
                    seq.next_element_seed(Walk {
                        node,
                        found: &mut *self.found,
                        root: false,
                    })?
                    .is_some()
                }
                None => seq
                    .next_element_seed(Walk {
                        node: &SKIP,
                        found: &mut *self.found,
                        root: false,
                    })?
                    .is_some(),
            };
            if !more {
                return Ok(());
            }
            index += 1;
        }
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if let Some(i) = self.node.capture {
            self.found[i] = Field::Other;
        }
        while let Some(child) = map.next_key_seed(KeySeed::<false>(self.node))? {
            match child {
                Some(at) => {
                    let node = &self.node.children[at].1;
                    // a key seen again replaces what it held, as in a parsed object
                    for f in &node.below {
                        self.found[*f] = Field::Missing;
                    }
                    map.next_value_seed(Walk {
                        node,
                        found: &mut *self.found,
                        root: false,
                    })?;
                }
                None => map.next_value_seed(Walk {
                    node: &SKIP,
                    found: &mut *self.found,
                    root: false,
                })?,
            }
        }
        Ok(())
    }
}

/// An array index as JSON pointers write it (no sign, no leading zero).
fn index_of(segment: &str) -> Option<usize> {
    if segment.starts_with('+') || (segment.starts_with('0') && segment.len() != 1) {
        return None;
    }
    segment.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decoder() -> Decoder {
        Decoder::new(
            FieldSource::Pointer("/user".into()),
            Some("/amount".into()),
            TimeSource::Pointer("/ts".into()),
        )
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
        // two of these would sum to infinity
        assert_eq!(
            reason(r#"{"user":"u","amount":1.5e308,"ts":1}"#),
            InvalidReason::ValueOutOfRange
        );
        assert_eq!(
            reason(r#"{"user":"u","amount":-1e289,"ts":1}"#),
            InvalidReason::ValueOutOfRange
        );
        let largest = decoder()
            .decode(None, Some(br#"{"user":"u","amount":1e288,"ts":1}"#), None)
            .expect("the largest value is valid");
        assert_eq!(largest.value, Some(1e288));
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
        let d = Decoder::new(FieldSource::MessageKey, None, TimeSource::MessageTimestamp);
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

    /// Any JSON value, as text, whose objects may repeat keys.
    fn json() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            (-1e20f64..1e20).prop_map(|f| format!("{f:?}")),
            Just("1.0".to_string()),
            Just("1e3".to_string()),
            "[a-z\\\"/é ]{0,6}".prop_map(|s| serde_json::to_string(&s).expect("string")),
            Just(r#""esc\u00e9aped\n""#.to_string()),
            Just(r#""\ud800""#.to_string()),
        ];
        leaf.prop_recursive(3, 24, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec(
                    (
                        prop::sample::select(vec!["user", "amount", "ts", "a", "b", "0", "x/y"]),
                        inner
                    ),
                    0..6
                )
                .prop_map(|members| {
                    let body: Vec<String> = members
                        .into_iter()
                        .map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).expect("key")))
                        .collect();
                    format!("{{{}}}", body.join(","))
                }),
            ]
        })
    }

    /// A top-level object like an input record: members named as the configured pointers
    /// (with values of the type a valid record has, or of any type), others, repeated members,
    /// in any order.
    fn record_like() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            3 => "[a-z0-9]{0,8}".prop_map(|s| format!("\"{s}\"")),
            1 => Just(r#""esc\taped""#.to_string()),
            1 => Just("123456789012345678901234567890".to_string()),
            1 => any::<i64>().prop_map(|n| n.to_string()),
            1 => (-1e20f64..1e20).prop_map(|f| format!("{f:?}")),
            1 => any::<bool>().prop_map(|b| b.to_string()),
            1 => json(),
        ];
        let value = prop_oneof![
            3 => (-1e20f64..1e20).prop_map(|f| format!("{f:?}")),
            1 => any::<i64>().prop_map(|n| n.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            1 => prop::sample::select(vec![
                "1e288",
                "-1e289",
                "1.5e308",
                "1e400",
                "-0",
                "0.0",
                "18446744073709551616",
            ])
            .prop_map(str::to_string),
            1 => json(),
        ];
        let ts = prop_oneof![
            3 => (MIN_TS - 10..MAX_TS + 10).prop_map(|n| n.to_string()),
            1 => any::<i64>().prop_map(|n| n.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            1 => prop::sample::select(vec![
                "1.0",
                "1e3",
                "-0",
                "9223372036854775808",
                "18446744073709551615",
            ])
                .prop_map(str::to_string),
            1 => json(),
        ];
        let member = prop_oneof![
            3 => key.prop_map(|v| format!(r#""user":{v}"#)),
            3 => value.prop_map(|v| format!(r#""amount":{v}"#)),
            3 => ts.prop_map(|v| format!(r#""ts":{v}"#)),
            1 => json().prop_map(|v| format!(r#""other":{v}"#)),
            1 => json().prop_map(|v| format!(r#""us\u0065r":{v}"#)),
        ];
        (prop::collection::vec(member, 0..6), any::<bool>()).prop_map(|(m, spaced)| {
            if spaced {
                format!("{{ {} }}", m.join(" ,\n\t"))
            } else {
                format!("{{{}}}", m.join(","))
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The one-pass reader gives exactly what reading the whole document into a tree gives,
        /// for any document and top-level or nested pointers; for top-level pointers, so does
        /// the walk the typed pass falls back to.
        #[test]
        fn one_pass_decoding_equals_decoding_a_tree(doc in json(), nested in any::<bool>()) {
            let (key, value, ts) = if nested {
                ("/a/b", "/a/0", "/x~1y/1")
            } else {
                ("/user", "/amount", "/ts")
            };
            let fast = Decoder::new(FieldSource::Pointer(key.into()), Some(value.into()), TimeSource::Pointer(ts.into()));
            let walk = match &fast.plan {
                Plan::Flat(root) if !nested => Decoder { plan: Plan::Walk(root.clone()), ..fast.clone() },
                Plan::Walk(_) if nested => fast.clone(),
                other => panic!("{other:?} for nested = {nested}"),
            };
            let tree = Decoder { plan: Plan::Tree, ..fast.clone() };
            let want = tree.decode(None, Some(doc.as_bytes()), None);
            prop_assert_eq!(&fast.decode(None, Some(doc.as_bytes()), None), &want, "{}", doc);
            prop_assert_eq!(&walk.decode(None, Some(doc.as_bytes()), None), &want, "{}", doc);
        }

        /// The typed pass over a record-like object gives exactly what the tree gives, whether
        /// it finishes or falls back to the walk, with the key and the event time from the
        /// payload or from the message.
        #[test]
        fn the_typed_pass_decodes_as_the_tree_does(
            doc in record_like(),
            from_message in any::<bool>(),
            has_value in any::<bool>(),
        ) {
            let (key, ts) = if from_message {
                (FieldSource::MessageKey, TimeSource::MessageTimestamp)
            } else {
                (FieldSource::Pointer("/user".into()), TimeSource::Pointer("/ts".into()))
            };
            let fast = Decoder::new(key, has_value.then(|| "/amount".to_string()), ts);
            prop_assert!(matches!(fast.plan, Plan::Flat(_)));
            let tree = Decoder { plan: Plan::Tree, ..fast.clone() };
            let raw = doc.as_bytes();
            for (mkey, mts) in [(Some(&b"m"[..]), Some(5)), (None, None)] {
                prop_assert_eq!(
                    fast.decode(mkey, Some(raw), mts),
                    tree.decode(mkey, Some(raw), mts),
                    "{}", doc
                );
            }
        }
    }

    #[test]
    fn the_typed_pass_reads_a_valid_record_and_leaves_the_rest_to_the_walk() {
        let d = decoder();
        let Plan::Flat(root) = &d.plan else {
            panic!("{:?}", d.plan)
        };
        let typed = |doc: &'static str| d.flat(root, doc, None, None);
        // finished by the typed pass, valid or not
        assert_eq!(
            typed(r#"{"ts":7,"x":[{"y":null}],"user":"u","amount":2}"#),
            Some(Ok(Record {
                key: "u".into(),
                value: Some(2.0),
                ts: EventTime(7)
            }))
        );
        assert_eq!(
            typed(r#"{"user":17,"amount":-1.5,"ts":1}"#).map(|r| r.map(|r| r.key)),
            Some(Ok("17".into()))
        );
        assert_eq!(
            typed(r#"{"user":"u","amount":1e289,"ts":1}"#),
            Some(Err(InvalidReason::ValueOutOfRange))
        );
        assert_eq!(
            typed(r#"{"user":"u","amount":1,"ts":1700000000000000000}"#),
            Some(Err(InvalidReason::BadTimestamp))
        );
        // an escaped member name is the member it names, and whitespace is skipped
        assert_eq!(
            typed("{ \"us\\u0065r\" : \"u\",\n\"amount\":1 ,\"ts\":\t1 }")
                .map(|r| r.map(|r| r.key)),
            Some(Ok("u".into()))
        );
        // left to the walk: a missing member, a type the pass does not take, bad JSON; the walk
        // names the reason
        for (doc, reason) in [
            (
                r#"{"user":"u","amount":1}"#,
                InvalidReason::MissingTimestamp,
            ),
            (r#"{"user":null,"amount":1,"ts":1}"#, InvalidReason::NullKey),
            (
                r#"{"user":"u","amount":"1","ts":1}"#,
                InvalidReason::BadValue,
            ),
            (
                r#"{"user":"u","amount":1,"ts":1.5}"#,
                InvalidReason::BadTimestamp,
            ),
            (
                r#"{"user":"u","amount":1,"ts":1,"junk":"\ud800"}"#,
                InvalidReason::InvalidJson,
            ),
            (
                r#"{"user":"u","amount":1,"ts":1} x"#,
                InvalidReason::InvalidJson,
            ),
            (r#"[1]"#, InvalidReason::InvalidJson),
        ] {
            assert_eq!(typed(doc), None, "{doc}");
            assert_eq!(
                d.decode(None, Some(doc.as_bytes()), None),
                Err(reason),
                "{doc}"
            );
        }
        // left to the walk and valid: a member of an unexpected type replaced by a later one
        let doc = r#"{"user":null,"user":"u","amount":1,"ts":1}"#;
        assert_eq!(typed(doc), None);
        assert_eq!(
            d.decode(None, Some(doc.as_bytes()), None).map(|r| r.key),
            Ok("u".into())
        );
    }

    #[test]
    fn a_pointer_inside_another_reads_a_tree_and_still_decodes() {
        let d = Decoder::new(
            FieldSource::Pointer("/u".into()),
            Some("/u/n".into()),
            TimeSource::Pointer("/ts".into()),
        );
        assert!(matches!(d.plan, Plan::Tree));
        assert_eq!(
            d.decode(None, Some(br#"{"u":{"n":1},"ts":5}"#), None),
            Err(InvalidReason::BadKey)
        );
    }

    #[test]
    fn keys_borrow_from_the_payload_unless_escaped() {
        let payload = br#"{"user":"plain","amount":1,"ts":1}"#;
        let r = decoder().decode(None, Some(payload), None).expect("valid");
        assert!(matches!(r.key, Cow::Borrowed("plain")));
        let payload = br#"{"user":"tab\tbed","amount":1,"ts":1}"#;
        let r = decoder().decode(None, Some(payload), None).expect("valid");
        assert_eq!(r.key, "tab\tbed");
    }

    #[test]
    fn fields_on_no_pointer_are_checked_as_a_tree_would_check_them() {
        let d = decoder();
        let tree = Decoder {
            plan: Plan::Tree,
            ..d.clone()
        };
        let mut bad_utf8 = br#"{"user":"u","amount":1,"ts":1,"junk":""#.to_vec();
        bad_utf8.extend_from_slice(&[0xff, 0xfe]);
        bad_utf8.extend_from_slice(br#""}"#);
        let mut bad_utf8_key = br#"{"user":"u"#.to_vec();
        bad_utf8_key.extend_from_slice(&[0xc3]);
        bad_utf8_key.extend_from_slice(br#"","amount":1,"ts":1}"#);
        let deep = format!(
            r#"{{"user":"u","amount":1,"ts":1,"junk":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let cases: Vec<Vec<u8>> = vec![
            bad_utf8,
            bad_utf8_key,
            br#"{"user":"u","amount":1,"ts":1,"junk":"\ud800"}"#.to_vec(),
            br#"{"user":"u","amount":1,"ts":1,"junk":{"a":"\ud800x"}}"#.to_vec(),
            deep.into_bytes(),
        ];
        for raw in cases {
            let want = tree.decode(None, Some(&raw), None);
            assert_eq!(
                want,
                Err(InvalidReason::InvalidJson),
                "{}",
                String::from_utf8_lossy(&raw)
            );
            assert_eq!(
                d.decode(None, Some(&raw), None),
                want,
                "{}",
                String::from_utf8_lossy(&raw)
            );
        }
    }
}
