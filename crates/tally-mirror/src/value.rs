//! How a read turns a counter's summary and its Redis deltas into one value.
//!
//! PostgreSQL is the truth for every record the aggregator has applied. For a window `W` closed
//! in the counter's partition (every record stamped `<= W` is applied), the summary's `total`
//! holds all of the windows up to `W` and part of the later ones. For a later window, the
//! deltas hold what the ingest added to Redis and the summary what the aggregator applied, each
//! split by the sign of the records. A read adds what the deltas hold beyond the applied records,
//! sign by sign:
//!
//! ```text
//! value = total + Σ over windows w > W of ( max(Δ⁺(w) − A⁺(w), 0) + min(Δ⁻(w) − A⁻(w), 0) )
//! ```
//!
//! When the deltas are complete, `Δ ≥ A` per sign and this is the total plus the records not
//! applied yet. When a delta was lost (an `INCRBY` that failed after the `202`, a key evicted, a
//! Redis rolled back), the term is clamped at zero: the read misses that record until its window
//! is applied, but never shows less than PostgreSQL holds. Retries the aggregator dropped are in
//! the applied records (they may be in the deltas too), so they cancel out.

use std::cmp::{max, min};

use tally_core::clamp_to_i64;

use crate::summary::CounterSummary;

/// One window's deltas, summed over the counter's shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowDeltas {
    pub positive: i128,
    pub negative: i128,
}

/// Combines a counter's summary (None for a counter PostgreSQL does not have yet) with the
/// deltas of the windows after `closed_window_ms`. `windows` may start earlier than that (a
/// reader reads from the oldest closed window over all partitions); those windows are in the
/// total already and are skipped.
pub fn combine_value(
    summary: Option<&CounterSummary>,
    closed_window_ms: i64,
    windows: &[(i64, WindowDeltas)],
) -> i64 {
    let mut value = summary.map_or(0, |summary| summary.total as i128);
    let open_windows = windows
        .iter()
        .filter(|(window_start_ms, _)| *window_start_ms > closed_window_ms);
    for (window_start_ms, deltas) in open_windows {
        let applied = summary
            .and_then(|summary| summary.windows.get(window_start_ms))
            .copied()
            .unwrap_or_default();
        value += max(deltas.positive - applied.positive as i128, 0);
        value += min(deltas.negative - applied.negative as i128, 0);
    }
    clamp_to_i64(value).0
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::summary::WindowRecords;

    fn summary(total: i64, windows: &[(i64, i64, i64)]) -> CounterSummary {
        CounterSummary {
            version: 3,
            total,
            partition: 0,
            complete_from_ms: 0,
            windows: windows
                .iter()
                .map(|(start, positive, negative)| {
                    (
                        *start,
                        WindowRecords {
                            positive: *positive,
                            negative: *negative,
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn deltas(positive: i128, negative: i128) -> WindowDeltas {
        WindowDeltas { positive, negative }
    }

    #[test]
    fn open_windows_add_only_what_postgres_does_not_have_yet() {
        // 30 before window 10_000, closed. Window 10_000 got +8 and -1, of which the aggregator
        // applied +5; window 15_000 got +4, none applied.
        let summary = summary(35, &[(10_000, 5, 0)]);
        let windows = [(10_000, deltas(8, -1)), (15_000, deltas(4, 0))];
        assert_eq!(
            combine_value(Some(&summary), 5_000, &windows),
            30 + 8 - 1 + 4
        );
    }

    #[test]
    fn a_lost_delta_never_pulls_a_read_below_postgres() {
        // The aggregator applied +5 and -3 of window 10_000, but Redis lost those deltas (an
        // evicted key, a failed INCRBY): the read shows what PostgreSQL has.
        let summary = summary(42, &[(10_000, 5, -3)]);
        assert_eq!(
            combine_value(Some(&summary), 5_000, &[(10_000, deltas(0, 0))]),
            42
        );
        // A later +2 in the same window, after the key came back empty, still shows... once the
        // deltas exceed the applied records again. Until then the read lags, never drops.
        assert_eq!(
            combine_value(Some(&summary), 5_000, &[(10_000, deltas(2, 0))]),
            42
        );
        assert_eq!(
            combine_value(Some(&summary), 5_000, &[(10_000, deltas(7, -4))]),
            42 + 2 - 1
        );
    }

    #[test]
    fn a_dropped_retry_cancels_out() {
        // A retry of +4 was dropped by the aggregator (not in the total) but the ingest had
        // added it to the deltas; the applied records include it.
        let summary = summary(10, &[(10_000, 4, 0)]);
        assert_eq!(
            combine_value(Some(&summary), 5_000, &[(10_000, deltas(4, 0))]),
            10
        );
    }

    #[test]
    fn windows_closed_in_the_counters_partition_come_from_the_total_only() {
        let summary = summary(38, &[]);
        let windows = [(10_000, deltas(8, 0)), (15_000, deltas(4, 0))];
        assert_eq!(combine_value(Some(&summary), 10_000, &windows), 42);
    }

    #[test]
    fn a_counter_postgres_does_not_have_is_its_deltas() {
        assert_eq!(combine_value(None, 0, &[]), 0);
        assert_eq!(
            combine_value(None, 0, &[(5_000, deltas(3, -1)), (10_000, deltas(2, 0))]),
            4
        );
    }
}
