//! The state a restore hands the engine: entries decoded already, and key groups still encoded
//! as they were stored, which the engine decodes as it installs them (a batch at a time, on
//! every core), so that a restore never holds the whole state decoded beside the engine it
//! builds.

use std::collections::{BTreeMap, BTreeSet};

use super::group::{entry_of, visit_blob, BlobEntry, BlobError, GroupId, GroupLayout};
use super::scope::{BuiltGroup, KeyEntry};
use super::state::{Entry, EntryStatus, StateKey};
use super::window::WindowDef;
use super::PartitionState;
use super::StateError;
use crate::event_time::EventTime;
use crate::position::Partition;

/// One key group as stored: its blob (see [`visit_blob`]), decoded when installed.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredGroup {
    pub id: GroupId,
    /// Entries the blob holds, by window index and finality, as counted when it was read.
    pub counts: Vec<(u16, bool, u64)>,
    pub blob: Vec<u8>,
}

impl StoredGroup {
    /// Reads `blob` once to count its entries by window and finality (which also checks that
    /// it decodes).
    pub fn read(id: GroupId, blob: Vec<u8>) -> Result<StoredGroup, BlobError> {
        let mut counts: BTreeMap<(u16, bool), u64> = BTreeMap::new();
        visit_blob(&blob, |(_, window, _, _, _, closed)| {
            *counts.entry((window, closed)).or_default() += 1;
        })?;
        Ok(StoredGroup {
            id,
            counts: counts.into_iter().map(|((w, c), n)| (w, c, n)).collect(),
            blob,
        })
    }

    pub fn len(&self) -> u64 {
        self.counts.iter().map(|(_, _, n)| n).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Entries of a restored state by the topic of their scope (`None`: instance scope), window
/// index and finality (`true`: final).
pub type Counts = BTreeMap<(Option<String>, u16, bool), u64>;

/// What a compatibility report changes in restored entries: windows re-numbered (open and
/// final ones apart), and the entries of other windows and of dropped topics left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Remap {
    pub open: BTreeMap<u16, u16>,
    pub closed: BTreeMap<u16, u16>,
    pub dropped_topics: BTreeSet<String>,
}

impl Remap {
    /// The index an entry of `window` in `scope` is restored under; `None`: left out.
    pub fn window(&self, scope: &Option<Partition>, window: u16, closed: bool) -> Option<u16> {
        if scope
            .as_ref()
            .is_some_and(|p| self.dropped_topics.contains(&p.topic))
        {
            return None;
        }
        let map = if closed { &self.closed } else { &self.open };
        map.get(&window).copied()
    }
}

/// The state the engine restarts from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RestoredState {
    pub partitions: Vec<PartitionState>,
    pub watermark: Option<EventTime>,
    /// Entries decoded already (savepoints, the changelog, tests).
    pub entries: Vec<(StateKey, Entry)>,
    /// Groups still encoded (a checkpoint), decoded as they are installed, a batch at a time.
    pub groups: Vec<StoredGroup>,
    /// Applied to `groups` as they are installed (`entries` are re-numbered at once).
    pub remap: Option<Remap>,
    /// Bytes the state occupies in the store it was read from (0 when not read from one).
    pub stored_bytes: u64,
}

impl RestoredState {
    /// Entries by topic, window and finality, as stored (before any `remap`).
    pub fn counts(&self) -> Counts {
        let mut out = Counts::new();
        for (k, e) in &self.entries {
            let topic = k.partition.as_ref().map(|p| p.topic.clone());
            *out.entry((topic, k.window, e.status == EntryStatus::Closed))
                .or_default() += 1;
        }
        for g in &self.groups {
            let topic = g.id.scope.as_ref().map(|p| p.topic.clone());
            for &(window, closed, n) in &g.counts {
                *out.entry((topic.clone(), window, closed)).or_default() += n;
            }
        }
        out
    }

    /// Entries the engine will hold: those decoded, and those of the groups `remap` keeps.
    pub fn len(&self) -> u64 {
        let kept = |g: &StoredGroup| -> u64 {
            g.counts
                .iter()
                .filter(|(w, c, _)| {
                    self.remap
                        .as_ref()
                        .is_none_or(|r| r.window(&g.id.scope, *w, *c).is_some())
                })
                .map(|(_, _, n)| n)
                .sum()
        };
        self.entries.len() as u64 + self.groups.iter().map(kept).sum::<u64>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, decoded (the groups' with `remap` applied), sorted by key.
    pub fn into_entries(self) -> Result<Vec<(StateKey, Entry)>, BlobError> {
        let mut out = self.entries;
        for g in &self.groups {
            visit_blob(&g.blob, |e| {
                if let Some(e) = remapped(self.remap.as_ref(), &g.id.scope, e) {
                    out.push(entry_of(&g.id.scope, e));
                }
            })?;
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// This state with its entries in stored groups under `layout`, as a restore of a
    /// checkpoint reads them.
    #[cfg(test)]
    pub(crate) fn into_stored(self, layout: &super::GroupLayout) -> RestoredState {
        let groups = super::group::group_entries(layout, self.entries.clone())
            .into_iter()
            .map(|g| StoredGroup::read(g.id.clone(), g.blob().expect("blob")).expect("read"))
            .collect();
        RestoredState {
            entries: Vec::new(),
            groups,
            ..self
        }
    }
}

/// A stored entry of `scope` as `remap` restores it: its window re-numbered, or `None` when it
/// is left out.
pub(crate) fn remapped<'a>(
    remap: Option<&Remap>,
    scope: &Option<Partition>,
    e: BlobEntry<'a>,
) -> Option<BlobEntry<'a>> {
    let (key, window, start, end, acc, closed) = e;
    let window = match remap {
        Some(r) => r.window(scope, window, closed)?,
        None => window,
    };
    Some((key, window, start, end, acc, closed))
}

/// Reads a stored group key by key, decoded as it is read: `put` takes each key with its
/// entries (a blob lists a key's entries together), re-numbered by `remap` (entries it leaves
/// out are skipped).
pub(super) fn read_group(
    layout: GroupLayout,
    g: &StoredGroup,
    remap: Option<&Remap>,
    mut put: impl FnMut(&str, &[KeyEntry]),
) -> Result<(), StateError> {
    let scope = &g.id.scope;
    let mut key = String::new();
    let mut entries: Vec<KeyEntry> = Vec::new();
    let read = visit_blob(&g.blob, |e| {
        // the group the writer filed the entries under; the engine's layout is the store's
        // (`service::start`), so a key lands where its later records look for it
        debug_assert_eq!(
            layout.group_of(e.0),
            g.id.group,
            "key {:?} filed in another group",
            e.0
        );
        if let Some((k, window, start, end, acc, closed)) = remapped(remap, scope, e) {
            if k != key {
                if !entries.is_empty() {
                    put(&key, &entries);
                    entries.clear();
                }
                key.clear();
                key.push_str(k);
            }
            entries.push((window, start, end, acc, closed));
        }
    });
    if !entries.is_empty() {
        put(&key, &entries);
    }
    read.map_err(|source| StateError::Damaged {
        scope: scope.clone(),
        group: g.id.group,
        source,
    })?;
    Ok(())
}

/// A stored group rebuilt apart from the engine, on any thread (`Engine::install_groups`).
pub(super) fn build_group(
    layout: GroupLayout,
    windows: &[WindowDef],
    g: &StoredGroup,
    remap: Option<&Remap>,
) -> Result<BuiltGroup, StateError> {
    let mut built = BuiltGroup::new(g.id.group, windows, &g.id.scope);
    let mut failed = None;
    read_group(layout, g, remap, |key, entries| {
        if failed.is_none() {
            failed = built.restore(windows, key, entries).err();
        }
    })?;
    failed.map_or(Ok(built), Err)
}
