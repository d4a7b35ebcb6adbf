//! Per-partition progress (next offset, highest event time) and the service watermark.
//!
//! A partition's watermark is its highest event time minus the allowed out-of-orderness. The
//! service watermark is the minimum over assigned partitions that have data; an assigned
//! partition whose content is not known yet (no record and no end-of-partition seen) holds the
//! watermark back, so a partition that is read late cannot see its records dropped as late.
//! A partition marked idle (caught up and quiet for `watermark.idle_timeout`, decided by the
//! service) does not hold the service watermark back until its next record; when every
//! partition with data is idle, the service watermark is the highest of theirs.
//! The service watermark never moves backwards.

use foldhash::{HashMap, HashMapExt};

use crate::event_time::EventTime;
use crate::position::{NextOffset, Partition};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionProgress {
    pub next: Option<NextOffset>,
    pub max_ts: Option<EventTime>,
    pub assigned: bool,
    /// Reached the end of the partition while it had no data.
    pub caught_up_empty: bool,
    /// Caught up and quiet: holds the service watermark back no more, until its next record.
    pub idle: bool,
}

impl PartitionProgress {
    fn pending(&self) -> bool {
        self.assigned && self.max_ts.is_none() && !self.caught_up_empty
    }
}

#[derive(Debug, Default)]
pub struct Watermarks {
    parts: HashMap<Partition, PartitionProgress>,
    current: Option<EventTime>,
    out_of_orderness: i64,
}

impl Watermarks {
    pub fn new(out_of_orderness: i64) -> Self {
        Watermarks {
            parts: HashMap::new(),
            current: None,
            out_of_orderness,
        }
    }

    pub fn current(&self) -> Option<EventTime> {
        self.current
    }

    pub fn set_current(&mut self, wm: Option<EventTime>) {
        self.current = wm;
    }

    pub fn get(&self, p: &Partition) -> Option<&PartitionProgress> {
        self.parts.get(p)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Partition, &PartitionProgress)> {
        self.parts.iter()
    }

    pub fn insert(&mut self, p: Partition, progress: PartitionProgress) {
        self.parts.insert(p, progress);
    }

    pub fn assign(&mut self, p: &Partition) {
        let entry = self.parts.entry(p.clone()).or_default();
        entry.assigned = true;
        entry.caught_up_empty = false;
        // what it holds is not known yet: it holds the watermark until found idle again
        entry.idle = false;
    }

    /// Forgets `p` entirely (its state moved to another instance).
    pub fn remove(&mut self, p: &Partition) {
        self.parts.remove(p);
    }

    pub fn revoke(&mut self, p: &Partition) {
        if let Some(entry) = self.parts.get_mut(p) {
            entry.assigned = false;
        }
    }

    /// Marks `p` idle or not; returns whether that changed.
    pub fn set_idle(&mut self, p: &Partition, idle: bool) -> bool {
        match self.parts.get_mut(p) {
            Some(entry) if entry.idle != idle => {
                entry.idle = idle;
                true
            }
            _ => false,
        }
    }

    /// Moves `p`'s highest event time up to `ts` (never down), as a record would; returns
    /// whether it moved.
    pub fn raise(&mut self, p: &Partition, ts: EventTime) -> bool {
        match self.parts.get_mut(p) {
            Some(entry) if entry.max_ts.is_none_or(|m| ts > m) => {
                entry.max_ts = Some(ts);
                true
            }
            _ => false,
        }
    }

    /// Reading `p` goes on at `next` (a held position out of range moved by policy).
    pub fn move_to(&mut self, p: &Partition, next: NextOffset) {
        self.parts.entry(p.clone()).or_default().next = Some(next);
    }

    pub fn eof(&mut self, p: &Partition) {
        if let Some(entry) = self.parts.get_mut(p) {
            if entry.max_ts.is_none() {
                entry.caught_up_empty = true;
            }
        }
    }

    /// `admit` for a record the test knows was not read before.
    #[cfg(test)]
    pub fn observe(&mut self, p: &Partition, offset: i64, ts: Option<EventTime>) -> bool {
        self.admit(p, offset, ts).expect("a record not read before")
    }

    /// Records that `offset` was consumed on `p`, with event time `ts` if the record was valid,
    /// and returns whether the service watermark may have changed; or, if `p` was already read
    /// past `offset` (a duplicate), records nothing and returns `None`. One lookup does both.
    pub fn admit(&mut self, p: &Partition, offset: i64, ts: Option<EventTime>) -> Option<bool> {
        let (current, ooo) = (self.current, self.out_of_orderness);
        // looked up by reference first: the entry API would copy the name for every record
        let entry = match self.parts.get_mut(p) {
            Some(e) => e,
            None => self.parts.entry(p.clone()).or_default(),
        };
        if entry.next.is_some_and(|next| next.covers(offset)) {
            return None;
        }
        entry.next = Some(NextOffset::after(offset));
        // a record, valid or not: the partition holds the watermark again
        entry.idle = false;
        let Some(ts) = ts else {
            return Some(false);
        };
        Some(match entry.max_ts {
            None => {
                entry.max_ts = Some(ts);
                true
            }
            Some(old) if ts > old => {
                entry.max_ts = Some(ts);
                // the minimum can only rise if this partition was holding it
                current.is_none_or(|c| old.minus(ooo) <= c)
            }
            Some(_) => false,
        })
    }

    /// Recomputes the service watermark; returns the new value if it advanced.
    pub fn advance(&mut self) -> Option<EventTime> {
        // the minimum over the partitions that hold it; when every one with data is idle, the
        // highest of theirs (none holds it back)
        let mut min: Option<EventTime> = None;
        let mut max_idle: Option<EventTime> = None;
        for progress in self.parts.values() {
            if progress.pending() {
                return None;
            }
            if !progress.assigned {
                continue;
            }
            if let Some(ts) = progress.max_ts {
                let wm = ts.minus(self.out_of_orderness);
                if progress.idle {
                    max_idle = Some(max_idle.map_or(wm, |m| m.max(wm)));
                } else {
                    min = Some(min.map_or(wm, |m| m.min(wm)));
                }
            }
        }
        let candidate = min.or(max_idle)?;
        if self.current.is_none_or(|c| candidate > c) {
            self.current = Some(candidate);
            Some(candidate)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> Partition {
        Partition::new("t", n)
    }

    #[test]
    fn watermark_is_min_over_assigned_partitions_with_data() {
        let mut w = Watermarks::new(10);
        w.assign(&p(0));
        w.assign(&p(1));
        w.observe(&p(0), 0, Some(EventTime(100)));
        assert_eq!(w.advance(), None, "partition 1 not known yet holds it back");
        w.observe(&p(1), 0, Some(EventTime(50)));
        assert_eq!(w.advance(), Some(EventTime(40)));
        w.observe(&p(1), 1, Some(EventTime(200)));
        assert_eq!(w.advance(), Some(EventTime(90)));
    }

    #[test]
    fn a_record_already_read_is_refused_and_changes_nothing() {
        let mut w = Watermarks::new(0);
        w.assign(&p(0));
        assert_eq!(w.admit(&p(0), 5, Some(EventTime(100))), Some(true));
        let before = w.get(&p(0)).cloned();
        assert_eq!(w.admit(&p(0), 5, Some(EventTime(900))), None);
        assert_eq!(w.admit(&p(0), 2, None), None);
        assert_eq!(w.get(&p(0)).cloned(), before);
        assert_eq!(w.admit(&p(0), 6, Some(EventTime(50))), Some(false));
        assert_eq!(
            w.get(&p(0)).and_then(|e| e.next),
            Some(NextOffset::after(6))
        );
    }

    #[test]
    fn empty_partition_stops_holding_back_after_eof() {
        let mut w = Watermarks::new(0);
        w.assign(&p(0));
        w.assign(&p(1));
        w.observe(&p(0), 0, Some(EventTime(100)));
        assert_eq!(w.advance(), None);
        w.eof(&p(1));
        assert_eq!(w.advance(), Some(EventTime(100)));
    }

    #[test]
    fn an_idle_partition_holds_the_watermark_back_no_more_until_its_next_record() {
        let mut w = Watermarks::new(0);
        w.assign(&p(0));
        w.assign(&p(1));
        w.observe(&p(0), 0, Some(EventTime(100)));
        w.observe(&p(1), 0, Some(EventTime(10)));
        assert_eq!(w.advance(), Some(EventTime(10)));
        w.observe(&p(0), 1, Some(EventTime(500)));
        assert_eq!(w.advance(), None, "partition 1 holds it at 10");
        assert!(w.set_idle(&p(1), true));
        assert!(!w.set_idle(&p(1), true), "no change");
        assert_eq!(w.advance(), Some(EventTime(500)));
        // its next record: it holds again (the watermark does not go back)
        w.observe(&p(1), 1, Some(EventTime(20)));
        assert!(!w.get(&p(1)).is_some_and(|x| x.idle));
        w.observe(&p(0), 2, Some(EventTime(900)));
        assert_eq!(w.advance(), None, "held at 500 by partition 1 at 20");
        assert_eq!(w.current(), Some(EventTime(500)));
        // assigned anew (after a rebalance), a partition is not idle any more
        w.set_idle(&p(1), true);
        w.revoke(&p(1));
        w.assign(&p(1));
        assert!(!w.get(&p(1)).is_some_and(|x| x.idle));
    }

    #[test]
    fn when_every_partition_is_idle_the_highest_one_sets_the_watermark() {
        let mut w = Watermarks::new(0);
        w.assign(&p(0));
        w.assign(&p(1));
        w.observe(&p(0), 0, Some(EventTime(900)));
        w.observe(&p(1), 0, Some(EventTime(10)));
        assert_eq!(w.advance(), Some(EventTime(10)));
        w.set_idle(&p(0), true);
        w.set_idle(&p(1), true);
        assert_eq!(w.advance(), Some(EventTime(900)));
    }

    #[test]
    fn a_raised_event_time_never_goes_down() {
        let mut w = Watermarks::new(0);
        w.assign(&p(0));
        w.observe(&p(0), 0, Some(EventTime(100)));
        assert!(w.raise(&p(0), EventTime(200)));
        assert!(!w.raise(&p(0), EventTime(150)));
        assert_eq!(w.get(&p(0)).and_then(|x| x.max_ts), Some(EventTime(200)));
    }

    #[test]
    fn watermark_never_moves_backwards() {
        let mut w = Watermarks::new(0);
        w.assign(&p(0));
        w.observe(&p(0), 0, Some(EventTime(100)));
        assert_eq!(w.advance(), Some(EventTime(100)));
        w.assign(&p(1));
        w.observe(&p(1), 0, Some(EventTime(10)));
        assert_eq!(w.advance(), None);
        assert_eq!(w.current(), Some(EventTime(100)));
    }

    #[test]
    fn revoked_partitions_do_not_count() {
        let mut w = Watermarks::new(0);
        w.assign(&p(0));
        w.assign(&p(1));
        w.observe(&p(0), 0, Some(EventTime(100)));
        w.observe(&p(1), 0, Some(EventTime(10)));
        assert_eq!(w.advance(), Some(EventTime(10)));
        w.revoke(&p(1));
        assert_eq!(w.advance(), Some(EventTime(100)));
    }

    #[test]
    fn offsets_are_next_to_read() {
        let mut w = Watermarks::new(0);
        w.observe(&p(0), 41, None);
        assert_eq!(w.get(&p(0)).and_then(|x| x.next), Some(NextOffset(42)));
    }
}
