//! The open-loop schedule: request `i` is due at `start + i / rate`, whatever happened to the
//! requests before it.
//!
//! A closed-loop client waits for each answer before sending the next request, so when the
//! server stalls it simply sends less and the stall hides in a few slow samples: "coordinated
//! omission". An open-loop client keeps the arrival rate fixed and measures each request from
//! the moment it was *due*, so a request that had to wait for a free connection counts that
//! wait too (the wrk2 approach). This module computes only the due times; the driver sleeps
//! until them.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpenLoopSchedule {
    requests_per_second: f64,
    total_requests: u64,
}

impl OpenLoopSchedule {
    /// A schedule of `requests_per_second` for `duration`: `floor(rate × duration)` requests.
    ///
    /// # Panics
    /// When the rate is not a positive finite number: a configuration mistake.
    pub fn new(requests_per_second: f64, duration: Duration) -> Self {
        assert!(
            requests_per_second.is_finite() && requests_per_second > 0.0,
            "an open-loop rate must be a positive number of requests per second, got {requests_per_second}"
        );
        let total_requests = (requests_per_second * duration.as_secs_f64()).floor() as u64;
        Self {
            requests_per_second,
            total_requests,
        }
    }

    pub fn requests_per_second(&self) -> f64 {
        self.requests_per_second
    }

    pub fn total_requests(&self) -> u64 {
        self.total_requests
    }

    /// When request `index` (0-based) is due, counted from the start of the phase. Computed from
    /// the index rather than by adding intervals, so rounding never accumulates into drift.
    pub fn due_offset(&self, request_index: u64) -> Duration {
        Duration::from_secs_f64(request_index as f64 / self.requests_per_second)
    }
}

/// The latency of one open-loop request; all times are counted from the start of the phase.
///
/// - When its worker was still busy with the previous request at the due time, the request went
///   out late because the system was slow: it is charged from its due time, wait included. This
///   is what removes coordinated omission.
/// - When its worker was idle and slept until the due time, it is charged from when it was
///   actually sent: the sleep's overshoot is the load tool's timer granularity (1 ms in tokio),
///   which would otherwise add up to a millisecond to every sub-millisecond answer.
pub fn open_loop_latency(
    due: Duration,
    worker_free: Duration,
    sent: Duration,
    answered: Duration,
) -> Duration {
    let charged_from = if worker_free >= due { due } else { sent };
    answered.saturating_sub(charged_from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(value: u64) -> Duration {
        Duration::from_millis(value)
    }

    fn micros(value: u64) -> Duration {
        Duration::from_micros(value)
    }

    #[test]
    fn requests_are_evenly_spaced_from_zero() {
        let schedule = OpenLoopSchedule::new(1_000.0, Duration::from_secs(2));
        assert_eq!(schedule.total_requests(), 2_000);
        assert_eq!(schedule.due_offset(0), Duration::ZERO);
        assert_eq!(schedule.due_offset(1), Duration::from_millis(1));
        assert_eq!(schedule.due_offset(250), Duration::from_millis(250));
        assert_eq!(schedule.requests_per_second(), 1_000.0);
    }

    #[test]
    fn fractional_intervals_do_not_drift() {
        let schedule = OpenLoopSchedule::new(3.0, Duration::from_secs(1));
        assert_eq!(schedule.total_requests(), 3);
        let one_third = schedule.due_offset(1);
        assert!(one_third.abs_diff(Duration::from_nanos(333_333_333)) <= Duration::from_nanos(1));
        // A million intervals later the schedule is still exactly on the second.
        let far = schedule.due_offset(3_000_000);
        assert!(far.abs_diff(Duration::from_secs(1_000_000)) < Duration::from_micros(1));
    }

    #[test]
    fn a_partial_last_interval_sends_nothing_extra() {
        let schedule = OpenLoopSchedule::new(2_500.0, Duration::from_millis(1_999));
        assert_eq!(schedule.total_requests(), 4_997);
        let last_due = schedule.due_offset(schedule.total_requests() - 1);
        assert!(last_due < Duration::from_millis(1_999));
    }

    #[test]
    fn a_request_delayed_by_a_busy_worker_is_charged_from_its_due_time() {
        // Due at 10 ms; its worker was busy until 40 ms, sent it then, answer at 41 ms: the
        // client waited 31 ms for its counter, not 1 ms.
        let latency = open_loop_latency(millis(10), millis(40), millis(40), millis(41));
        assert_eq!(latency, millis(31));
        // Busy until exactly the due time still counts as on time.
        let latency = open_loop_latency(millis(10), millis(10), millis(10), millis(12));
        assert_eq!(latency, millis(2));
    }

    #[test]
    fn the_timer_overshoot_of_an_idle_worker_is_not_charged() {
        // Idle since 5 ms, slept until the 10 ms due time, woke at 10.9 ms: the 0.9 ms is the
        // load tool's timer, so only the 0.3 ms round trip counts.
        let latency = open_loop_latency(millis(10), millis(5), micros(10_900), micros(11_200));
        assert_eq!(latency, micros(300));
        // The clock is not trusted blindly: an answer "before" the send is zero, not a panic.
        assert_eq!(
            open_loop_latency(millis(10), millis(5), millis(11), millis(10)),
            Duration::ZERO
        );
    }

    #[test]
    #[should_panic(expected = "positive number")]
    fn a_zero_rate_is_refused() {
        let _ = OpenLoopSchedule::new(0.0, Duration::from_secs(1));
    }
}
