//! How a read turns what Redis holds into one counter value.
//!
//! PostgreSQL is the truth for every increment the aggregator has applied. Redis holds two
//! things for a counter:
//! - its *summary*, copied from PostgreSQL after every aggregator commit: the `total` of all
//!   applied increments and, for recent windows, how much of each window's deltas that total
//!   accounts for: the window's applied sum, plus the retries of already-applied idempotency
//!   keys that were dropped (the ingest may have added those to the deltas; they never count);
//! - the *deltas*: every acknowledged increment, per window, written by the ingest.
//!
//! For any window `W` that is closed in the counter's partition (every increment stamped `<= W`
//! is in PostgreSQL):
//!
//! ```text
//! value = total + Σ over windows w > W of (delta(w) - summary_window_sum(w))
//! ```
//!
//! because `total` minus the recent window sums is exactly the sum of the windows `<= W`, and
//! for the open windows the deltas are fresher than PostgreSQL.

use std::collections::BTreeMap;

use crate::amount::clamp_to_i64;
use crate::keys::{
    SUMMARY_PARTITION_FIELD, SUMMARY_TOTAL_FIELD, SUMMARY_VERSION_FIELD,
    SUMMARY_WINDOW_FIELD_PREFIX,
};

/// A counter's PostgreSQL summary as cached in Redis. A counter the aggregator has not seen yet
/// has the default: total 0, version 0, no window sums.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterSummary {
    pub total: i64,
    pub version: i64,
    /// The Kafka partition of the counter's records, whose closed window applies to it.
    pub partition: Option<i32>,
    /// Window start (Unix ms) to the part of `total` that came from that window.
    pub window_sums: BTreeMap<i64, i64>,
}

impl CounterSummary {
    /// Parses the field/value pairs of a summary hash. Unknown or unparsable fields are
    /// reported as an error, since a corrupt summary must not produce a plausible wrong number.
    pub fn from_hash_fields<'a>(
        fields: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, String> {
        let mut summary = Self::default();
        for (field, value) in fields {
            let parsed: i64 = value
                .parse()
                .map_err(|_| format!("summary field {field} holds {value:?}"))?;
            if field == SUMMARY_TOTAL_FIELD {
                summary.total = parsed;
            } else if field == SUMMARY_VERSION_FIELD {
                summary.version = parsed;
            } else if field == SUMMARY_PARTITION_FIELD {
                summary.partition = i32::try_from(parsed).ok();
            } else if let Some(window) = field.strip_prefix(SUMMARY_WINDOW_FIELD_PREFIX) {
                let window: i64 = window
                    .parse()
                    .map_err(|_| format!("summary field {field} is not a window"))?;
                summary.window_sums.insert(window, parsed);
            } else {
                return Err(format!("summary has an unknown field {field}"));
            }
        }
        Ok(summary)
    }
}

/// Combines a summary with the Redis deltas of the windows after `closed_window_ms`, a window
/// closed in the counter's partition. `windows` holds `(window_start_ms, sum of that window's
/// shard keys)`, oldest first; it may start earlier than the closed window (a reader reads from
/// the oldest closed window over all partitions), and those windows are already in `total`.
pub fn combine_value(
    summary: &CounterSummary,
    closed_window_ms: i64,
    windows: &[(i64, i128)],
) -> i64 {
    let mut value = summary.total as i128;
    let open_windows = windows
        .iter()
        .filter(|(window_start_ms, _)| *window_start_ms > closed_window_ms);
    for (window_start_ms, delta) in open_windows {
        let in_total = summary
            .window_sums
            .get(window_start_ms)
            .copied()
            .unwrap_or(0);
        value += delta - in_total as i128;
    }
    clamp_to_i64(value).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_summary_hash() {
        let summary = CounterSummary::from_hash_fields([
            ("total", "42"),
            ("version", "7"),
            ("partition", "2"),
            ("w:10000", "5"),
        ])
        .unwrap();
        assert_eq!(summary.total, 42);
        assert_eq!(summary.version, 7);
        assert_eq!(summary.partition, Some(2));
        assert_eq!(summary.window_sums.get(&10_000), Some(&5));
        assert!(CounterSummary::from_hash_fields([("total", "x")]).is_err());
        assert!(CounterSummary::from_hash_fields([("bogus", "1")]).is_err());
    }

    #[test]
    fn open_windows_add_only_what_postgres_does_not_have_yet() {
        // 30 increments before window 10_000 are closed. Window 10_000 got 8, of which the
        // aggregator has applied 5; window 15_000 got 4, none applied yet.
        let summary = CounterSummary {
            total: 35,
            version: 3,
            partition: Some(0),
            window_sums: BTreeMap::from([(10_000, 5)]),
        };
        assert_eq!(
            combine_value(&summary, 5_000, &[(10_000, 8), (15_000, 4)]),
            42
        );
        // With no deltas read at all the value falls back to what PostgreSQL has minus the
        // open windows' part of it, which is the closed total.
        assert_eq!(combine_value(&summary, 5_000, &[(10_000, 0)]), 30);
    }

    #[test]
    fn windows_closed_in_the_counters_partition_come_from_the_total_only() {
        // Window 10_000 is closed for this counter's partition (though not for every partition):
        // its 8 are all in the total, and its window sum may already have been pruned.
        let summary = CounterSummary {
            total: 38,
            version: 4,
            partition: Some(1),
            window_sums: BTreeMap::new(),
        };
        assert_eq!(
            combine_value(&summary, 10_000, &[(10_000, 8), (15_000, 4)]),
            42
        );
    }

    #[test]
    fn a_counter_never_seen_is_zero() {
        assert_eq!(combine_value(&CounterSummary::default(), 0, &[]), 0);
    }
}
