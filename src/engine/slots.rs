//! A key's fixed windows as the group table keeps them: the slot of one window or pane (also
//! the body of an open session, in `state`), and the arithmetic of the definitions over a
//! key's slots (which windows a pane counts in, which have closed, how many are open, each
//! window's value combined from its slot and panes). See `fixed` for the table and for why
//! hopping windows are kept as panes.

use super::aggregate::Acc;
use super::window::{WindowDef, WindowKind};

/// One open window or pane of a key (and, with an end beside it, an open session): 40 bytes.
/// The definition index sits in the top 16 bits of the record count, and a pane bit below it,
/// so that a key's four windows fit a 192-byte allocation, not 224: a window or pane counts up
/// to 2^47 - 1 records of a key (140 trillion; it stays there past that), where a separate
/// index would add 8 bytes of padding to every window of every key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Slot {
    /// The window's start, or the pane's.
    pub(super) start: i64,
    /// Definition index (top 16 bits), pane bit (bit 47) and record count (low 47 bits).
    pub(super) tag: u64,
    pub(super) sum: f64,
    pub(super) min: f64,
    pub(super) max: f64,
}

/// The most records a slot counts.
pub(super) const MAX_COUNT: u64 = (1 << 47) - 1;
const PANE: u64 = 1 << 47;

/// What a slot is, in the top bits of its tag: definition index and pane bit.
pub(super) fn head(window: u16, pane: bool) -> u64 {
    (u64::from(window) << 1) | u64::from(pane)
}

impl Slot {
    pub(super) fn new(window: u16, start: i64, acc: Acc) -> Slot {
        Slot {
            start,
            tag: (u64::from(window) << 48) | acc.count.min(MAX_COUNT),
            sum: acc.sum,
            min: acc.min,
            max: acc.max,
        }
    }

    pub(super) fn pane(window: u16, start: i64, acc: Acc) -> Slot {
        let mut s = Slot::new(window, start, acc);
        s.tag |= PANE;
        s
    }

    pub(super) fn window(&self) -> u16 {
        (self.tag >> 48) as u16
    }

    pub(super) fn is_pane(&self) -> bool {
        self.tag & PANE != 0
    }

    pub(super) fn head(&self) -> u64 {
        self.tag >> 47
    }

    pub(super) fn acc(&self) -> Acc {
        Acc {
            count: self.tag & MAX_COUNT,
            sum: self.sum,
            min: self.min,
            max: self.max,
        }
    }

    /// [`Acc::add`], in place: the record path's hottest line (going through `acc()` and
    /// `Slot::new` instead cost a quarter of `decode_aggregate`'s throughput). The test below
    /// holds the two to the same result.
    pub(super) fn add(&mut self, value: Option<f64>) {
        if self.tag & MAX_COUNT < MAX_COUNT {
            self.tag += 1;
        }
        if let Some(v) = value {
            self.sum += v;
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
    }
}

/// The most panes a window is combined from. A checkpoint lists every open window of a
/// changed group, each combined from its panes again, so that listing a key costs up to
/// `(size/hop)^2` merges: past this ratio a hopping window keeps a slot per window.
const MAX_PANES_PER_WINDOW: i64 = 16;

/// How the windows of one fixed definition are kept.
#[derive(Debug, Clone, Copy)]
pub(super) enum Fixed {
    Tumbling {
        size: i64,
    },
    /// Size 2 to 16 times the hop: panes.
    Panes {
        size: i64,
        hop: i64,
    },
    /// Any other hopping window: one slot per window.
    Hopping {
        size: i64,
        hop: i64,
    },
}

/// The fixed window definitions, shared by every group of a scope.
#[derive(Debug)]
pub(super) struct Defs {
    /// Index and kind of each tumbling or hopping definition.
    pub(super) fixed: Vec<(u16, Fixed)>,
    /// Length by window index (0 for sessions).
    sizes: Vec<i64>,
    /// Distance between two window starts by window index: the hop of hopping windows (1
    /// otherwise, where a slot is a single window).
    hops: Vec<i64>,
}

/// `t` rounded down to a multiple of `step`.
fn align(t: i64, step: i64) -> i64 {
    t.saturating_sub(t.rem_euclid(step))
}

impl Defs {
    pub(super) fn new(windows: &[WindowDef]) -> Self {
        let fixed: Vec<(u16, Fixed)> = windows
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                let kind = match w.kind {
                    WindowKind::Tumbling { size } => Fixed::Tumbling { size },
                    WindowKind::Hopping { size, hop }
                        if hop > 0
                            && size % hop == 0
                            && (2..=MAX_PANES_PER_WINDOW).contains(&(size / hop)) =>
                    {
                        Fixed::Panes { size, hop }
                    }
                    WindowKind::Hopping { size, hop } => Fixed::Hopping { size, hop },
                    WindowKind::Session { .. } => return None,
                };
                Some((i as u16, kind))
            })
            .collect();
        Defs {
            fixed,
            sizes: windows.iter().map(|w| w.kind.size().unwrap_or(0)).collect(),
            hops: windows
                .iter()
                .map(|w| match w.kind {
                    WindowKind::Hopping { hop, .. } => hop.max(1),
                    _ => 1,
                })
                .collect(),
        }
    }

    pub(super) fn size(&self, window: u16) -> i64 {
        self.sizes.get(usize::from(window)).copied().unwrap_or(0)
    }

    pub(super) fn hop(&self, window: u16) -> i64 {
        self.hops.get(usize::from(window)).copied().unwrap_or(1)
    }

    /// The bounds of a close or a listing, per definition: every window ending at or before
    /// `closed` has closed, and only windows ending at or before `until` are listed.
    pub(super) fn bounds(&self, closed: Option<i64>, until: Option<i64>, out: &mut Vec<Bound>) {
        out.clear();
        out.extend(
            self.sizes
                .iter()
                .zip(&self.hops)
                .map(|(&size, &hop)| Bound {
                    first_end: closed.map_or(i64::MIN, |c| align(c, hop).saturating_add(hop)),
                    last_start: until.map_or(i64::MAX, |u| align(u.saturating_sub(size), hop)),
                }),
        );
    }

    /// End of the first window a slot still counts in: a window's own end; for a pane, that
    /// of the first window holding it that is still open.
    pub(super) fn first_end(&self, s: &Slot, bounds: &[Bound]) -> i64 {
        let w = usize::from(s.window());
        let size = self.sizes.get(w).copied().unwrap_or(0);
        if !s.is_pane() {
            return s.start.saturating_add(size);
        }
        let hop = self.hops.get(w).copied().unwrap_or(1);
        let after = bounds.get(w).map_or(i64::MIN, |b| b.first_end);
        s.start.saturating_add(hop).max(after)
    }

    /// End of the last window a slot counts in (a pane's last window starts with it).
    pub(super) fn last_end(&self, s: &Slot) -> i64 {
        s.start.saturating_add(self.size(s.window()))
    }

    /// The windows a key's slots count in within `bounds`, as runs of starts (definition
    /// index, first start, last start), sorted and merged per definition; a window held by
    /// several slots is listed once.
    pub(super) fn spans(&self, slots: &[Slot], bounds: &[Bound], out: &mut Vec<Span>) {
        out.clear();
        for s in slots {
            let window = s.window();
            let lo = self.first_end(s, bounds) - self.size(window);
            let hi = bounds
                .get(usize::from(window))
                .map_or(s.start, |b| s.start.min(b.last_start));
            if lo <= hi {
                out.push(Span { window, lo, hi });
            }
        }
        if out.len() < 2 {
            return;
        }
        out.sort_unstable_by_key(|s| (s.window, s.lo));
        let mut merged = 0;
        for i in 1..out.len() {
            let next = out[i];
            let last = &mut out[merged];
            if next.window == last.window && next.lo <= last.hi {
                last.hi = last.hi.max(next.hi);
            } else {
                merged += 1;
                out[merged] = next;
            }
        }
        out.truncate(merged + 1);
    }

    /// How many open windows that a key does not count in yet a new slot of it adds (every
    /// window holding a new pane is open: see `FixedWindows::add`).
    pub(super) fn opened_by(&self, existing: &[Slot], new: &Slot) -> usize {
        let w = new.window();
        let (size, hop) = (self.size(w), self.hop(w));
        let mut panes = existing
            .iter()
            .filter(|s| s.window() == w && s.is_pane())
            .peekable();
        if panes.peek().is_none() && !new.is_pane() {
            return 1;
        }
        if !new.is_pane() {
            let held = panes.any(|q| q.start >= new.start && q.start < new.start + size);
            return usize::from(!held);
        }
        // the windows holding the pane are [p - size + hop, p]; panes below and above it
        // already count the ends of that run
        let p = new.start;
        let (mut first, mut last) = (p - size + hop, p);
        for q in panes {
            if q.start < p {
                first = first.max(q.start + hop);
            } else if q.start > p {
                last = last.min(q.start - size);
            }
        }
        if first > last {
            return 0;
        }
        let own = existing
            .iter()
            .filter(|s| s.window() == w && !s.is_pane() && (first..=last).contains(&s.start))
            .count();
        (((last - first) / hop) as usize + 1).saturating_sub(own)
    }

    /// How many windows the spans hold.
    pub(super) fn count(&self, spans: &[Span]) -> usize {
        spans
            .iter()
            .map(|s| ((s.hi - s.lo) / self.hop(s.window)) as usize + 1)
            .sum()
    }

    /// How many distinct open windows a key's slots count in.
    pub(super) fn open_windows(
        &self,
        slots: &[Slot],
        bounds: &[Bound],
        scratch: &mut Vec<Span>,
    ) -> usize {
        if !slots.iter().any(Slot::is_pane) {
            return slots.len();
        }
        self.spans(slots, bounds, scratch);
        self.count(scratch)
    }

    /// Every window of the spans, with its value: its own slot, if it has one, combined with
    /// the panes it holds (the key's slots are sorted: see `fixed::sorted`).
    pub(super) fn each_window(
        &self,
        slots: &[Slot],
        spans: &[Span],
        mut f: impl FnMut(u16, i64, i64, Acc),
    ) {
        for span in spans {
            let (size, hop) = (self.size(span.window), self.hop(span.window));
            // the definition's windows, then its panes, each by start (slots are few: a scan)
            let run = |from: usize, h: u64| {
                let first = from + slots[from..].iter().take_while(|s| s.head() < h).count();
                let last = first + slots[first..].iter().take_while(|s| s.head() == h).count();
                first..last
            };
            let own = run(0, head(span.window, false));
            let panes = &slots[run(own.end, head(span.window, true))];
            let own = &slots[own];
            let mut start = span.lo;
            let next = |start: i64| (start < span.hi).then(|| start.saturating_add(hop));
            if let ([], [pane]) = (own, panes) {
                // one pane: each window is its accumulator
                let acc = pane.acc();
                let mut at = Some(start);
                while let Some(start) = at {
                    f(span.window, start, start.saturating_add(size), acc);
                    at = next(start);
                }
                continue;
            }
            let (mut o, mut first, mut last) = (0, 0, 0);
            loop {
                let mut acc = Acc::default();
                while own.get(o).is_some_and(|s| s.start < start) {
                    o += 1;
                }
                if let Some(s) = own.get(o).filter(|s| s.start == start) {
                    acc.merge(&s.acc());
                }
                let end = start.saturating_add(size);
                while panes.get(first).is_some_and(|s| s.start < start) {
                    first += 1;
                }
                last = last.max(first);
                while panes.get(last).is_some_and(|s| s.start < end) {
                    last += 1;
                }
                for s in &panes[first..last] {
                    acc.merge(&s.acc());
                }
                f(span.window, start, end, acc);
                match next(start) {
                    Some(n) => start = n,
                    None => break,
                }
            }
        }
    }
}

/// See [`Defs::bounds`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Bound {
    /// End of the first window ending after the last close (panes only).
    first_end: i64,
    /// Start of the last window listed.
    last_start: i64,
}

/// A run of window starts of one definition, `hop` apart: `lo..=hi`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Span {
    window: u16,
    lo: i64,
    hi: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_forty_bytes_and_keeps_its_window_and_accumulator() {
        assert_eq!(std::mem::size_of::<Slot>(), 40);
        let mut acc = Acc::of(Some(-2.5));
        acc.add(Some(7.0));
        for window in [0, 1, 300, u16::MAX] {
            let mut slot = Slot::new(window, -17, acc);
            assert_eq!((slot.window(), slot.start, slot.acc()), (window, -17, acc));
            let mut more = acc;
            for value in [None, Some(-40.0), Some(3.5), Some(100.0)] {
                slot.add(value);
                more.add(value);
                assert_eq!((slot.window(), slot.acc()), (window, more));
            }
        }
        // a count at the bound stays there and leaves the index alone
        let full = Acc {
            count: MAX_COUNT,
            ..Acc::of(None)
        };
        let mut slot = Slot::new(u16::MAX, 0, full);
        slot.add(Some(1.0));
        assert_eq!(slot.window(), u16::MAX);
        assert_eq!(slot.acc().count, MAX_COUNT);
        assert_eq!(slot.acc().sum, 1.0);
    }
}
