//! Read freshness lag: how far behind the acknowledged increments a read was, as a time.
//!
//! The writers log the running acknowledged total each time an increment is acknowledged. A
//! read sent at time `t` that shows value `v` is compared with the increments acknowledged
//! *before `t`* (the ones a perfectly fresh read must show): if it shows them all the lag is
//! zero; otherwise the lag is how long ago the oldest increment it misses was acknowledged.
//! So a lag of 800 ms means "this read missed increments that had been acknowledged for 0.8 s".
//!
//! Comparing with the send time rather than the answer time keeps the read's own latency out
//! of the lag, and never blames a read for increments acknowledged while it was in flight.

use std::time::Duration;

/// The running acknowledged total of one counter over time. Entries must be appended in time
/// order with positive increments (the writers append under one lock), so both columns are
/// sorted and can be binary-searched.
#[derive(Debug, Clone, Default)]
pub struct AcknowledgementTimeline {
    /// (when the acknowledgement arrived, counted from the start of the run; total after it).
    entries: Vec<(Duration, i64)>,
}

/// What one read missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreshnessLag {
    /// Increments acknowledged before the read was sent that it did not show (0 when fresh).
    pub missing_increments: i64,
    /// How long before the read was sent the oldest missing increment had been acknowledged.
    pub lag: Duration,
}

impl AcknowledgementTimeline {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `increments` more were acknowledged at `acknowledged_at`.
    ///
    /// # Panics
    /// When the time goes backwards or the increment is not positive: the binary searches
    /// below would then give wrong answers silently.
    pub fn record(&mut self, acknowledged_at: Duration, increments: i64) {
        assert!(increments > 0, "only positive increments can be timed");
        let (last_time, last_total) = self.entries.last().copied().unwrap_or_default();
        assert!(
            acknowledged_at >= last_time,
            "acknowledgements must be recorded in time order"
        );
        self.entries
            .push((acknowledged_at, last_total + increments));
    }

    /// The acknowledged total at `at` (acknowledgements at exactly `at` included).
    pub fn acknowledged_total_at(&self, at: Duration) -> i64 {
        let acknowledged_by_then = self.entries.partition_point(|&(time, _)| time <= at);
        match acknowledged_by_then {
            0 => 0,
            count => self.entries[count - 1].1,
        }
    }

    pub fn final_total(&self) -> i64 {
        self.entries.last().map_or(0, |&(_, total)| total)
    }

    /// How stale a read was that was sent at `read_sent_at` and showed `value_read`.
    pub fn lag_of_read(&self, read_sent_at: Duration, value_read: i64) -> FreshnessLag {
        let acknowledged_before_read = self.acknowledged_total_at(read_sent_at);
        if value_read >= acknowledged_before_read {
            return FreshnessLag {
                missing_increments: 0,
                lag: Duration::ZERO,
            };
        }
        // The first acknowledgement that took the total past what the read showed is the
        // oldest increment the read is missing.
        let first_missing = self
            .entries
            .partition_point(|&(_, total)| total <= value_read);
        let (oldest_missing_acknowledged_at, _) = self.entries[first_missing];
        FreshnessLag {
            missing_increments: acknowledged_before_read - value_read,
            lag: read_sent_at.saturating_sub(oldest_missing_acknowledged_at),
        }
    }
}

/// The nearest-rank percentile of sorted values (`quantile` in 0..=1); 0 when there are none.
pub fn nearest_rank_percentile(sorted_values: &[i64], quantile: f64) -> i64 {
    if sorted_values.is_empty() {
        return 0;
    }
    let rank = (quantile * sorted_values.len() as f64).ceil() as usize;
    sorted_values[rank.clamp(1, sorted_values.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(value: u64) -> Duration {
        Duration::from_millis(value)
    }

    /// One increment acknowledged every 10 ms from 10 ms to 100 ms: total 10 at 100 ms.
    fn ten_acknowledgements() -> AcknowledgementTimeline {
        let mut timeline = AcknowledgementTimeline::new();
        for step in 1..=10 {
            timeline.record(millis(step * 10), 1);
        }
        timeline
    }

    #[test]
    fn the_acknowledged_total_steps_up_at_each_acknowledgement() {
        let timeline = ten_acknowledgements();
        assert_eq!(timeline.acknowledged_total_at(millis(0)), 0);
        assert_eq!(timeline.acknowledged_total_at(millis(9)), 0);
        assert_eq!(timeline.acknowledged_total_at(millis(10)), 1);
        assert_eq!(timeline.acknowledged_total_at(millis(55)), 5);
        assert_eq!(timeline.acknowledged_total_at(millis(1_000)), 10);
        assert_eq!(timeline.final_total(), 10);
    }

    #[test]
    fn a_read_showing_everything_acknowledged_has_no_lag() {
        let timeline = ten_acknowledgements();
        let fresh = timeline.lag_of_read(millis(55), 5);
        assert_eq!(fresh.missing_increments, 0);
        assert_eq!(fresh.lag, Duration::ZERO);
        // Ingest writes Redis before the client sees the 202, so a read may run ahead.
        let ahead = timeline.lag_of_read(millis(55), 7);
        assert_eq!(ahead.lag, Duration::ZERO);
    }

    #[test]
    fn a_stale_read_lags_by_the_age_of_the_oldest_missing_increment() {
        let timeline = ten_acknowledgements();
        // Sent at 95 ms (9 acknowledged), showing 6: it misses the 7th, 8th and 9th increments,
        // the oldest of which was acknowledged at 70 ms, 25 ms before the read.
        let stale = timeline.lag_of_read(millis(95), 6);
        assert_eq!(stale.missing_increments, 3);
        assert_eq!(stale.lag, millis(25));
        // A read showing nothing at all misses everything since the first acknowledgement.
        let empty = timeline.lag_of_read(millis(100), 0);
        assert_eq!(empty.missing_increments, 10);
        assert_eq!(empty.lag, millis(90));
    }

    #[test]
    fn batch_sized_acknowledgements_are_located_by_total() {
        let mut timeline = AcknowledgementTimeline::new();
        timeline.record(millis(100), 50);
        timeline.record(millis(200), 50);
        // Showing 60 of 100: part of the second batch is missing, acknowledged at 200 ms.
        let lag = timeline.lag_of_read(millis(500), 60);
        assert_eq!(lag.missing_increments, 40);
        assert_eq!(lag.lag, millis(300));
    }

    #[test]
    fn nearest_rank_percentiles_pick_a_real_value() {
        let values: Vec<i64> = (1..=100).collect();
        assert_eq!(nearest_rank_percentile(&values, 0.5), 50);
        assert_eq!(nearest_rank_percentile(&values, 0.99), 99);
        assert_eq!(nearest_rank_percentile(&values, 1.0), 100);
        assert_eq!(nearest_rank_percentile(&values, 0.0), 1);
        assert_eq!(nearest_rank_percentile(&[7], 0.99), 7);
        assert_eq!(nearest_rank_percentile(&[], 0.5), 0);
    }

    #[test]
    #[should_panic(expected = "time order")]
    fn out_of_order_recording_is_refused() {
        let mut timeline = AcknowledgementTimeline::new();
        timeline.record(millis(20), 1);
        timeline.record(millis(10), 1);
    }
}
