//! Aggregation windows.
//!
//! The ingest stamps every increment with the start of the window it arrived in
//! (`window_start_ms`, a multiple of the window length since the Unix epoch). The aggregator sums
//! increments per `(counter, window_start_ms)` and the read path uses a window's stamp to decide
//! whether the increment is already in PostgreSQL's total or still only in a Redis delta.
//!
//! A window is *closed* once no increment stamped with it can still reach Kafka. An increment
//! stamped `w` is produced before `w + length`, and the producer gives up on it after the produce
//! timeout, so it is in the log before `w + length + produce_timeout` (plus clock skew between
//! hosts). A consumer that has read everything appended up to a time `horizon` has therefore seen
//! every increment of every window that ends at least `close_delay` before `horizon`.

/// Window length and the delay after which a window can no longer receive increments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSpec {
    pub length_ms: i64,
    /// The producer's message timeout plus the clock skew allowed between hosts.
    pub close_delay_ms: i64,
}

impl WindowSpec {
    pub fn new(length_ms: i64, close_delay_ms: i64) -> Self {
        assert!(length_ms > 0, "a window length should be positive");
        assert!(close_delay_ms >= 0, "a close delay should not be negative");
        Self {
            length_ms,
            close_delay_ms,
        }
    }

    /// The start of the window that contains `time_ms`.
    pub fn start_of(&self, time_ms: i64) -> i64 {
        time_ms - time_ms.rem_euclid(self.length_ms)
    }

    /// The latest window that is closed, given that every record appended to the log before
    /// `horizon_ms` has been consumed.
    pub fn last_closed_at(&self, horizon_ms: i64) -> i64 {
        // W is closed when W + length + close_delay <= horizon, so the latest W is the largest
        // multiple of the length that is <= horizon - close_delay - length.
        self.start_of(horizon_ms - self.close_delay_ms - self.length_ms)
    }

    /// The window starts in `(after, through]`, oldest first.
    pub fn starts_between(&self, after: i64, through: i64) -> impl Iterator<Item = i64> + use<> {
        let length = self.length_ms;
        let first = self.start_of(after) + length;
        let last = self.start_of(through);
        (0..)
            .map(move |step| first + step * length)
            .take_while(move |start| *start <= last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_are_multiples_of_the_length() {
        let spec = WindowSpec::new(5_000, 6_000);
        assert_eq!(spec.start_of(0), 0);
        assert_eq!(spec.start_of(4_999), 0);
        assert_eq!(spec.start_of(5_000), 5_000);
        assert_eq!(spec.start_of(-1), -5_000);
    }

    #[test]
    fn a_window_closes_after_its_end_plus_the_close_delay() {
        let spec = WindowSpec::new(5_000, 6_000);
        // Window [10_000, 15_000) can receive records until 21_000.
        assert_eq!(spec.last_closed_at(20_999), 5_000);
        assert_eq!(spec.last_closed_at(21_000), 10_000);
        assert_eq!(spec.last_closed_at(25_999), 10_000);
        assert_eq!(spec.last_closed_at(26_000), 15_000);
    }

    #[test]
    fn lists_the_windows_between_two_times() {
        let spec = WindowSpec::new(5_000, 0);
        let starts: Vec<i64> = spec.starts_between(10_000, 26_000).collect();
        assert_eq!(starts, vec![15_000, 20_000, 25_000]);
        assert_eq!(spec.starts_between(25_000, 26_000).count(), 0);
        assert_eq!(spec.starts_between(25_000, 24_000).count(), 0);
    }
}
