//! Latency recording with an HDR histogram and the percentile summary the reports print.
//!
//! Each load worker owns a histogram and records without locks; the driver merges them at the
//! end of a phase. Values are microseconds with 3 significant digits, so a percentile is off by
//! at most 0.1%.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The largest value a histogram tracks exactly: one hour. Anything longer is recorded as one
/// hour (no benchmark request should take that long; if one does the max says so loudly).
const HIGHEST_TRACKABLE_MICROS: u64 = 3_600_000_000;

#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    micros: Histogram<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        Self {
            micros: Histogram::new_with_bounds(1, HIGHEST_TRACKABLE_MICROS, 3)
                .expect("constant histogram bounds are valid"),
        }
    }

    /// Records one latency (or lag), rounded down to the microsecond.
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.record_micros(micros);
    }

    pub fn record_micros(&mut self, micros: u64) {
        self.micros.saturating_record(micros);
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        self.micros
            .add(&other.micros)
            .expect("histograms with the same bounds always merge");
    }

    pub fn count(&self) -> u64 {
        self.micros.len()
    }

    pub fn summary(&self) -> LatencySummary {
        if self.micros.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.micros.len(),
            mean_micros: self.micros.mean(),
            p50_micros: self.micros.value_at_quantile(0.50),
            p99_micros: self.micros.value_at_quantile(0.99),
            p999_micros: self.micros.value_at_quantile(0.999),
            max_micros: self.micros.max(),
        }
    }
}

/// What the reports show of a latency distribution. All zeros when nothing was recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_micros: f64,
    pub p50_micros: u64,
    pub p99_micros: u64,
    pub p999_micros: u64,
    pub max_micros: u64,
}

/// Formats microseconds for a table: `850 µs`, `12.3 ms`, `4.20 s`.
pub fn format_micros(micros: u64) -> String {
    match micros {
        0..1_000 => format!("{micros} µs"),
        1_000..100_000 => format!("{:.1} ms", micros as f64 / 1_000.0),
        100_000..1_000_000 => format!("{:.0} ms", micros as f64 / 1_000.0),
        _ => format!("{:.2} s", micros as f64 / 1_000_000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HDR histograms with 3 significant digits are exact to within 0.1% of the value.
    fn assert_close(actual: u64, expected: u64) {
        let tolerance = (expected as f64 * 0.001).max(1.0);
        assert!(
            (actual as f64 - expected as f64).abs() <= tolerance,
            "{actual} is not within 0.1% of {expected}"
        );
    }

    #[test]
    fn summary_reports_percentiles_of_a_uniform_spread() {
        let mut histogram = LatencyHistogram::new();
        for micros in 1..=10_000 {
            histogram.record_micros(micros);
        }
        let summary = histogram.summary();
        assert_eq!(summary.count, 10_000);
        assert_close(summary.p50_micros, 5_000);
        assert_close(summary.p99_micros, 9_900);
        assert_close(summary.p999_micros, 9_990);
        assert_close(summary.max_micros, 10_000);
        assert!((summary.mean_micros - 5_000.5).abs() < 10.0);
    }

    #[test]
    fn a_slow_tail_shows_in_p999_and_max_but_not_p50() {
        let mut histogram = LatencyHistogram::new();
        for _ in 0..9_990 {
            histogram.record(Duration::from_millis(1));
        }
        for _ in 0..10 {
            histogram.record(Duration::from_secs(2));
        }
        let summary = histogram.summary();
        assert_close(summary.p50_micros, 1_000);
        assert_close(summary.p99_micros, 1_000);
        assert_close(summary.max_micros, 2_000_000);
        // 10 of 10,000 samples are slow: exactly at the 99.9th percentile boundary.
        assert!(summary.p999_micros <= 2_002_000);
    }

    #[test]
    fn merging_combines_the_counts_of_every_worker() {
        let mut first_worker = LatencyHistogram::new();
        let mut second_worker = LatencyHistogram::new();
        first_worker.record(Duration::from_micros(100));
        second_worker.record(Duration::from_micros(300));
        second_worker.record(Duration::from_micros(500));
        first_worker.merge(&second_worker);
        let summary = first_worker.summary();
        assert_eq!(summary.count, 3);
        assert_close(summary.p50_micros, 300);
        assert_close(summary.max_micros, 500);
    }

    #[test]
    fn empty_and_out_of_range_values_are_handled() {
        assert_eq!(LatencyHistogram::new().summary(), LatencySummary::default());
        let mut histogram = LatencyHistogram::new();
        histogram.record(Duration::ZERO);
        histogram.record(Duration::from_secs(10 * 3_600));
        let summary = histogram.summary();
        assert_eq!(summary.count, 2);
        // Zero is recordable: a perfectly fresh read has a lag of exactly 0.
        assert_eq!(summary.p50_micros, 0);
        assert_close(summary.max_micros, HIGHEST_TRACKABLE_MICROS);
    }

    #[test]
    fn micros_are_formatted_with_a_fitting_unit() {
        assert_eq!(format_micros(850), "850 µs");
        assert_eq!(format_micros(12_345), "12.3 ms");
        assert_eq!(format_micros(250_400), "250 ms");
        assert_eq!(format_micros(4_200_000), "4.20 s");
    }
}
