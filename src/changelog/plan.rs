//! What a durable checkpoint publishes to the changelog, decided without I/O: which owned
//! partitions it covers, full or delta per partition, the chunks, the record keys the next
//! full publication tombstones, and whether the next checkpoint must be full. The [`Ledger`]
//! is this process's memory of what it published; [`plan`] reads it and [`Ledger::apply`]
//! records a plan once it is handed to the publisher.

use std::collections::HashMap;

use super::protocol::{
    chunks, publication_kind, Chunk, GroupChange, Kind, Tag, MAX_CHUNK_BYTES, MAX_WHOLE_GROUP_BYTES,
};
use crate::checkpoint::Checkpoint;
use crate::position::Partition;

/// Groups per chunk (with [`MAX_CHUNK_BYTES`], keeps records far below Kafka's 1 MB default
/// message size).
pub const CHUNK_GROUPS: usize = 2_000;
/// A full publication of every partition after this many checkpoints, which tombstones the
/// line before it: bounds what compaction keeps and what a restore reads.
pub const FULL_EVERY: u64 = 100;

/// What this process published, per partition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ledger {
    /// Tags this process's publications (random per start, never reused).
    pub run: u64,
    /// The last publication of each partition: the base of its next delta.
    pub published: HashMap<Partition, Tag>,
    /// Keys of each partition's records since its last full publication (tombstoned by the
    /// next one).
    pub record_keys: HashMap<Partition, Vec<String>>,
    /// Publications since the last full one.
    pub since_full: u64,
}

/// One checkpoint's publication.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Records to publish, in order.
    pub chunks: Vec<Chunk>,
    /// Record keys to delete (the line a full publication replaces).
    pub tombstones: Vec<(String, Partition)>,
    /// Partitions published, with their publication's tag and kind.
    pub published: Vec<(Partition, Tag, Kind)>,
    /// An owned partition could not be published (its delta has no base here): the next
    /// checkpoint must be full, as it must every [`FULL_EVERY`] publications.
    pub need_full: bool,
    /// Whether the checkpoint was full (resets the count towards [`FULL_EVERY`]).
    pub full: bool,
}

impl Ledger {
    pub fn new(run: u64) -> Self {
        Ledger {
            run,
            ..Ledger::default()
        }
    }

    /// Records a plan handed to the publisher.
    pub fn apply(&mut self, plan: &Plan) {
        for (p, tag, kind) in &plan.published {
            let keys = self.record_keys.entry(p.clone()).or_default();
            if *kind == Kind::Full {
                keys.clear();
            }
            keys.extend(
                plan.chunks
                    .iter()
                    .filter(|c| c.tag == *tag && c.source() == p)
                    .map(Chunk::record_key),
            );
            self.published.insert(p.clone(), *tag);
        }
        self.since_full = if plan.full { 0 } else { self.since_full + 1 };
    }

    /// Whether the next checkpoint must be full: after `plan`, or after [`FULL_EVERY`]
    /// publications.
    pub fn wants_full(&self, plan: &Plan) -> bool {
        plan.need_full || self.since_full >= FULL_EVERY
    }

    /// These partitions' lines start again with a full publication (taken over, released, or
    /// a publication failed).
    pub fn forget(&mut self, partitions: &[Partition]) {
        for p in partitions {
            self.published.remove(p);
        }
    }
}

/// The publication of durable checkpoint `cp` for the partitions in `owned`, by consumer group
/// `group`, given what `ledger` says was published before.
pub fn plan(ledger: &Ledger, group: &str, cp: &Checkpoint, owned: &[Partition]) -> Plan {
    let mut out = Plan {
        chunks: Vec::new(),
        tombstones: Vec::new(),
        published: Vec::new(),
        need_full: false,
        full: cp.delta.full,
    };
    for position in &cp.delta.partitions {
        let p = &position.partition;
        if !owned.contains(p) {
            continue;
        }
        let groups: Result<Vec<GroupChange>, _> = cp
            .delta
            .groups
            .iter()
            .filter(|g| g.id.scope.as_ref() == Some(p))
            .map(|g| {
                g.blob().map(|blob| GroupChange {
                    group: g.id.group,
                    blob,
                })
            })
            .collect();
        // an encoding failure is not expected (plain data into memory); the partition then
        // waits for a full publication rather than publish a part of its changes
        let Ok(groups) = groups else {
            out.need_full = true;
            continue;
        };
        let Some(kind) = publication_kind(
            cp.delta.full,
            cp.base,
            ledger.published.get(p).copied(),
            ledger.run,
        ) else {
            out.need_full = true;
            continue;
        };
        let tag = Tag {
            run: ledger.run,
            checkpoint: cp.id,
        };
        if kind == Kind::Full {
            if let Some(keys) = ledger.record_keys.get(p) {
                out.tombstones
                    .extend(keys.iter().map(|k| (k.clone(), p.clone())));
            }
        }
        out.chunks.extend(chunks(
            group,
            tag,
            kind,
            position.clone(),
            cp.delta.watermark,
            groups,
            CHUNK_GROUPS,
            MAX_CHUNK_BYTES,
            MAX_WHOLE_GROUP_BYTES,
        ));
        out.published.push((p.clone(), tag, kind));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::protocol::Changes;
    use crate::checkpoint::StateSpec;
    use crate::checkpoint_id::CheckpointId;
    use crate::engine::group::group_entries;
    use crate::engine::{
        Acc, Entry, EntryStatus, GroupLayout, PartitionState, StateDelta, StateKey,
    };
    use crate::position::NextOffset;

    fn p(n: i32) -> Partition {
        Partition::new("events", n)
    }

    fn key(partition: i32, user: &str) -> StateKey {
        StateKey {
            partition: Some(p(partition)),
            window: 0,
            start: 0,
            key: user.into(),
        }
    }

    fn entry() -> Entry {
        Entry {
            status: EntryStatus::Open,
            end: 10,
            acc: Acc::default(),
        }
    }

    fn checkpoint(
        id: u64,
        base: Option<u64>,
        partitions: &[i32],
        users: &[(i32, &str)],
    ) -> Checkpoint {
        Checkpoint {
            id: CheckpointId(id),
            base: base.map(CheckpointId),
            trigger_ms: 0,
            spec: StateSpec::default(),
            delta: StateDelta {
                full: base.is_none(),
                partitions: partitions
                    .iter()
                    .map(|n| PartitionState {
                        partition: p(*n),
                        next: Some(NextOffset(10)),
                        max_ts: None,
                    })
                    .collect(),
                watermark: None,
                groups: group_entries(
                    &GroupLayout::default(),
                    users.iter().map(|(n, u)| (key(*n, u), entry())),
                ),
                entries: users.len() as u64,
                records: 0,
            },
        }
    }

    #[test]
    fn only_owned_partitions_are_published_each_with_its_own_changes() {
        let ledger = Ledger::new(7);
        let cp = checkpoint(1, None, &[0, 1], &[(0, "a"), (1, "b"), (1, "c")]);
        let plan = plan(&ledger, "g", &cp, &[p(1)]);
        assert_eq!(
            plan.published,
            vec![(
                p(1),
                Tag {
                    run: 7,
                    checkpoint: CheckpointId(1)
                },
                Kind::Full
            )]
        );
        assert!(plan.chunks.iter().all(|c| *c.source() == p(1)));
        let mut users: Vec<String> = plan
            .chunks
            .iter()
            .flat_map(|c| match &c.changes {
                Changes::Groups(groups) => groups
                    .iter()
                    .flat_map(|g| {
                        crate::engine::group::decode_blob(&g.blob, &Some(p(1)))
                            .expect("blob")
                            .into_iter()
                            .map(|(k, _)| k.key.to_string())
                    })
                    .collect::<Vec<_>>(),
                Changes::Keys { .. } | Changes::Piece(_) => panic!("publications carry groups"),
            })
            .collect();
        users.sort();
        assert_eq!(users, vec!["b", "c"]);
        assert!(!plan.need_full);
    }

    #[test]
    fn a_delta_follows_this_runs_publication_of_its_base_and_nothing_else() {
        let mut ledger = Ledger::new(7);
        let first = plan(
            &ledger,
            "g",
            &checkpoint(1, None, &[0], &[(0, "a")]),
            &[p(0)],
        );
        ledger.apply(&first);
        let delta = plan(
            &ledger,
            "g",
            &checkpoint(2, Some(1), &[0], &[(0, "b")]),
            &[p(0)],
        );
        assert_eq!(
            delta.published,
            vec![(
                p(0),
                Tag {
                    run: 7,
                    checkpoint: CheckpointId(2)
                },
                Kind::Delta {
                    base: Tag {
                        run: 7,
                        checkpoint: CheckpointId(1)
                    }
                }
            )]
        );
        // a delta whose base this run did not publish waits for a full checkpoint
        let orphan = plan(&ledger, "g", &checkpoint(3, Some(2), &[0], &[]), &[p(0)]);
        assert!(orphan.published.is_empty() && orphan.chunks.is_empty());
        assert!(orphan.need_full);
        assert!(ledger.wants_full(&orphan));
    }

    #[test]
    fn a_full_publication_tombstones_the_records_of_the_line_before_it() {
        let mut ledger = Ledger::new(7);
        let first = plan(
            &ledger,
            "g",
            &checkpoint(1, None, &[0], &[(0, "a")]),
            &[p(0)],
        );
        ledger.apply(&first);
        let second = plan(
            &ledger,
            "g",
            &checkpoint(2, Some(1), &[0], &[(0, "b")]),
            &[p(0)],
        );
        ledger.apply(&second);
        let before: Vec<String> = first
            .chunks
            .iter()
            .chain(&second.chunks)
            .map(Chunk::record_key)
            .collect();
        assert_eq!(ledger.record_keys[&p(0)], before);
        let full = plan(
            &ledger,
            "g",
            &checkpoint(3, None, &[0], &[(0, "c")]),
            &[p(0)],
        );
        let tombstoned: Vec<String> = full.tombstones.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(tombstoned, before);
        ledger.apply(&full);
        assert_eq!(
            ledger.record_keys[&p(0)],
            full.chunks
                .iter()
                .map(Chunk::record_key)
                .collect::<Vec<_>>()
        );
        assert_eq!(ledger.since_full, 0);
    }

    #[test]
    fn every_full_every_publications_the_next_checkpoint_is_full() {
        let mut ledger = Ledger::new(7);
        let mut last = plan(&ledger, "g", &checkpoint(1, None, &[0], &[]), &[p(0)]);
        ledger.apply(&last);
        for id in 2..=FULL_EVERY + 1 {
            assert!(!ledger.wants_full(&last), "after {} publications", id - 1);
            last = plan(
                &ledger,
                "g",
                &checkpoint(id, Some(id - 1), &[0], &[]),
                &[p(0)],
            );
            ledger.apply(&last);
        }
        assert_eq!(ledger.since_full, FULL_EVERY);
        assert!(ledger.wants_full(&last));
    }

    #[test]
    fn a_forgotten_partition_waits_for_a_full_publication() {
        let mut ledger = Ledger::new(7);
        let first = plan(&ledger, "g", &checkpoint(1, None, &[0], &[]), &[p(0)]);
        ledger.apply(&first);
        ledger.forget(&[p(0)]);
        let next = plan(&ledger, "g", &checkpoint(2, Some(1), &[0], &[]), &[p(0)]);
        assert!(next.need_full);
    }
}
