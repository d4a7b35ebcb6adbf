//! When each key group of a scope has windows to close: a time per group, at or before the end
//! of each of its open windows, and the groups ordered by it, so that the watermark visits
//! exactly the groups whose time it passed and closing never scans every group.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Per group with open windows, a time at or before the end of each of them (its earliest
/// end, or earlier: sessions that grew keep their older bound until closing reaches it), and
/// the groups ordered by that time: the groups a watermark reaches come first.
#[derive(Debug, Default)]
pub(crate) struct Due {
    /// By group: its time, `i64::MAX` for none (no window ends there: event times are years
    /// 1 to 9999, windows at most 100 years long).
    bounds: Vec<i64>,
    /// (time, group), earliest first. A group's time only moves earlier while it waits (a
    /// window opening), so an entry left behind by a move is skipped when it comes up.
    heap: BinaryHeap<Reverse<(i64, u16)>>,
}

impl Due {
    /// A window of `group` ending at `end` is open: the group is due when the watermark
    /// reaches `end`, if not earlier.
    pub(crate) fn note(&mut self, group: u16, end: i64) {
        let i = usize::from(group);
        if i >= self.bounds.len() {
            self.bounds.resize(i + 1, i64::MAX);
        }
        if end < self.bounds[i] {
            self.bounds[i] = end;
            self.heap.push(Reverse((end, group)));
        }
    }

    /// Takes the groups whose time is at or before `limit` into `out`, ascending.
    pub(crate) fn take(&mut self, limit: i64, out: &mut Vec<u16>) {
        while let Some(&Reverse((end, group))) = self.heap.peek() {
            if end > limit {
                break;
            }
            self.heap.pop();
            if let Some(bound) = self.bounds.get_mut(usize::from(group)) {
                if *bound == end {
                    *bound = i64::MAX;
                    out.push(group);
                }
            }
        }
        out.sort_unstable();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_groups_come_once_each_when_their_earliest_time_is_reached() {
        let mut due = Due::default();
        due.note(7, 50);
        due.note(3, 40);
        // a window opening earlier moves group 7 earlier; a later one changes nothing
        due.note(7, 30);
        due.note(7, 60);
        due.note(500, 45);
        let mut out = Vec::new();
        due.take(29, &mut out);
        assert!(out.is_empty());
        due.take(45, &mut out);
        assert_eq!(out, vec![3, 7, 500], "ascending, group 7 once");
        // taken groups wait for a new time; the entry left behind by the move is skipped
        out.clear();
        due.take(100, &mut out);
        assert!(out.is_empty());
        due.note(7, 50);
        due.take(100, &mut out);
        assert_eq!(out, vec![7]);
    }
}
