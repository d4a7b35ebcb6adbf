//! Per-window accumulators. One accumulator keeps count, sum, min and max; mean is derived, so
//! every configured aggregate is exact and mergeable.

use serde::{Deserialize, Serialize};

/// An aggregate a user can ask for in `aggregates:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregateKind {
    Count,
    Sum,
    Min,
    Max,
    Mean,
}

impl AggregateKind {
    /// Whether this aggregate reads the record's numeric value.
    pub fn needs_value(self) -> bool {
        !matches!(self, AggregateKind::Count)
    }
}

/// The running aggregate of one window and key.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Acc {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl Default for Acc {
    fn default() -> Self {
        Acc {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Acc {
    pub fn of(value: Option<f64>) -> Self {
        let mut acc = Acc::default();
        acc.add(value);
        acc
    }

    pub fn add(&mut self, value: Option<f64>) {
        self.count += 1;
        if let Some(v) = value {
            self.sum += v;
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
    }

    pub fn merge(&mut self, other: &Acc) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulates_count_sum_min_max_mean() {
        let mut acc = Acc::default();
        for v in [3.0, -1.0, 10.0] {
            acc.add(Some(v));
        }
        assert_eq!(acc.count, 3);
        assert_eq!(acc.sum, 12.0);
        assert_eq!(acc.min, -1.0);
        assert_eq!(acc.max, 10.0);
        assert_eq!(acc.mean(), Some(4.0));
    }

    #[test]
    fn merge_equals_adding_everything() {
        let mut a = Acc::of(Some(1.0));
        a.add(Some(5.0));
        let mut b = Acc::of(Some(-2.0));
        b.add(Some(7.0));
        a.merge(&b);
        let mut all = Acc::default();
        for v in [1.0, 5.0, -2.0, 7.0] {
            all.add(Some(v));
        }
        assert_eq!(a, all);
    }

    #[test]
    fn count_only_records_leave_value_aggregates_untouched() {
        let mut acc = Acc::default();
        acc.add(None);
        acc.add(None);
        assert_eq!(acc.count, 2);
        assert_eq!(acc.sum, 0.0);
    }
}
