//! Byte layout of the store. Fixed-width big-endian integers so that keys sort by window,
//! then start time, then key; signed values have their sign bit flipped to sort correctly.

use crate::engine::StateKey;

pub const STATE_PREFIX: &[u8] = b"state/";
pub const HISTORY_PREFIX: &[u8] = b"hist/";
pub const META_CURRENT: &[u8] = b"meta/current";
pub const META_VERSION: &[u8] = b"meta/version";

/// Version of everything this build writes. Bump with a migration when the layout changes.
pub const FORMAT_VERSION: u32 = 1;

fn i64_sortable(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

fn i64_from_sortable(b: [u8; 8]) -> i64 {
    (u64::from_be_bytes(b) ^ (1 << 63)) as i64
}

pub fn state_key(k: &StateKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(STATE_PREFIX.len() + 10 + k.key.len());
    out.extend_from_slice(STATE_PREFIX);
    out.extend_from_slice(&k.window.to_be_bytes());
    out.extend_from_slice(&i64_sortable(k.start));
    out.extend_from_slice(k.key.as_bytes());
    out
}

pub fn decode_state_key(raw: &[u8]) -> Option<StateKey> {
    let rest = raw.strip_prefix(STATE_PREFIX)?;
    if rest.len() < 10 {
        return None;
    }
    let window = u16::from_be_bytes([rest[0], rest[1]]);
    let mut start = [0u8; 8];
    start.copy_from_slice(&rest[2..10]);
    let key = std::str::from_utf8(&rest[10..]).ok()?.to_string();
    Some(StateKey {
        window,
        start: i64_from_sortable(start),
        key,
    })
}

pub fn history_key(id: u64) -> Vec<u8> {
    let mut out = HISTORY_PREFIX.to_vec();
    out.extend_from_slice(&id.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn state_keys_round_trip(window in any::<u16>(), start in any::<i64>(), key in ".*") {
            let k = StateKey { window, start, key };
            prop_assert_eq!(decode_state_key(&state_key(&k)), Some(k));
        }

        #[test]
        fn encoded_keys_sort_like_state_keys(a in any::<i64>(), b in any::<i64>()) {
            let ka = StateKey { window: 1, start: a, key: "k".into() };
            let kb = StateKey { window: 1, start: b, key: "k".into() };
            prop_assert_eq!(state_key(&ka).cmp(&state_key(&kb)), a.cmp(&b));
        }
    }
}
