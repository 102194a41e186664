//! Repeated measurements of one figure, kept whole so that a report can
//! give the median with its spread, not a single run.

use std::time::Duration;

/// The values of one figure over several runs, in one unit (the owner's
/// field name says which), sorted.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    sorted: Vec<f64>,
}

impl Samples {
    /// Samples from values in any order; NaNs are left out.
    pub fn new(mut values: Vec<f64>) -> Samples {
        values.retain(|v| !v.is_nan());
        values.sort_by(f64::total_cmp);
        Samples { sorted: values }
    }

    /// Durations in milliseconds.
    pub fn ms(values: &[Duration]) -> Samples {
        Samples::new(values.iter().map(|d| d.as_secs_f64() * 1e3).collect())
    }

    /// How many runs.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// The `q`-quantile (0 to 1), nearest rank; 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.sorted.is_empty() {
            return 0.0;
        }
        let last = self.sorted.len() - 1;
        let i = ((last as f64) * q.clamp(0.0, 1.0)).round() as usize;
        self.sorted[i.min(last)]
    }

    /// The median.
    pub fn median(&self) -> f64 {
        self.quantile(0.5)
    }

    /// The smallest value.
    pub fn min(&self) -> f64 {
        self.quantile(0.0)
    }

    /// The largest value.
    pub fn max(&self) -> f64 {
        self.quantile(1.0)
    }

    /// The values, smallest first.
    pub fn sorted(&self) -> &[f64] {
        &self.sorted
    }

    /// Every value divided by `by` (a per-connection figure from a total).
    pub fn scaled(&self, by: f64) -> Samples {
        Samples::new(self.sorted.iter().map(|v| v / by).collect())
    }

    /// "median (min–max)" with `digits` decimals.
    pub fn spread(&self, digits: usize) -> String {
        format!(
            "{:.digits$} ({:.digits$}–{:.digits$})",
            self.median(),
            self.min(),
            self.max()
        )
    }

    /// "median (p10–p90)" with `digits` decimals, for long distributions.
    pub fn deciles(&self, digits: usize) -> String {
        format!(
            "{:.digits$} (p10 {:.digits$}, p90 {:.digits$})",
            self.median(),
            self.quantile(0.1),
            self.quantile(0.9)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let s = Samples::new(vec![5.0, 1.0, 3.0, f64::NAN, 2.0, 4.0]);
        assert_eq!(s.len(), 5);
        assert_eq!((s.min(), s.median(), s.max()), (1.0, 3.0, 5.0));
        assert_eq!(s.spread(1), "3.0 (1.0–5.0)");
        assert_eq!(Samples::default().median(), 0.0);
        assert_eq!(s.scaled(2.0).median(), 1.5);
    }
}
