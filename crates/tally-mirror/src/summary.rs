//! A counter's summary: what PostgreSQL holds for it, as its bucket keeps it.
//!
//! The summary is one field of the bucket hash, in a small text form the Lua scripts can merge
//! without arithmetic (Lua numbers are doubles; totals may not fit in 53 bits, so scripts only
//! copy them, and only compare versions and window starts):
//!
//! ```text
//! VERSION TOTAL PARTITION COMPLETE_FROM;WINDOW POSITIVE NEGATIVE;WINDOW POSITIVE NEGATIVE...
//! ```

use std::collections::BTreeMap;

/// How much of a window's records the aggregator has applied, split by the sign of each record's
/// `by`, retries it dropped included (they may sit in the window's deltas all the same).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowRecords {
    pub positive: i64,
    pub negative: i64,
}

/// A counter as PostgreSQL holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterSummary {
    /// `counters.version`: one more per aggregator commit that touched the counter.
    pub version: i64,
    pub total: i64,
    /// The Kafka partition of the counter's records, whose closed window applies to it.
    pub partition: i32,
    /// Every window starting at or after this one that has applied records is in `windows`.
    /// Older windows may have been pruned: a read that needs one cannot use this summary.
    pub complete_from_ms: i64,
    /// Window start (Unix ms) to the window's applied records.
    pub windows: BTreeMap<i64, WindowRecords>,
}

/// A summary field that does not parse: a read must not turn it into a plausible number.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a counter summary in redis is corrupt: {0:?}")]
pub struct CorruptSummary(pub String);

impl CounterSummary {
    pub fn encode(&self) -> String {
        use std::fmt::Write as _;
        let mut encoded = format!(
            "{} {} {} {}",
            self.version, self.total, self.partition, self.complete_from_ms
        );
        for (start, records) in &self.windows {
            write!(
                encoded,
                ";{start} {} {}",
                records.positive, records.negative
            )
            .expect("writing to a String should not fail");
        }
        encoded
    }

    pub fn decode(encoded: &str) -> Result<Self, CorruptSummary> {
        let corrupt = || CorruptSummary(encoded.to_owned());
        let mut parts = encoded.split(';');
        let header: Vec<&str> = parts.next().ok_or_else(corrupt)?.split(' ').collect();
        let [version, total, partition, complete_from_ms] = header[..] else {
            return Err(corrupt());
        };
        let mut summary = CounterSummary {
            version: version.parse().map_err(|_| corrupt())?,
            total: total.parse().map_err(|_| corrupt())?,
            partition: partition.parse().map_err(|_| corrupt())?,
            complete_from_ms: complete_from_ms.parse().map_err(|_| corrupt())?,
            windows: BTreeMap::new(),
        };
        for window in parts {
            let fields: Vec<&str> = window.split(' ').collect();
            let [start, positive, negative] = fields[..] else {
                return Err(corrupt());
            };
            summary.windows.insert(
                start.parse().map_err(|_| corrupt())?,
                WindowRecords {
                    positive: positive.parse().map_err(|_| corrupt())?,
                    negative: negative.parse().map_err(|_| corrupt())?,
                },
            );
        }
        Ok(summary)
    }
}

/// A counter's summary with its name: a row to write into its bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedSummary {
    pub name: String,
    pub summary: CounterSummary,
}

/// What one aggregator commit changed for one counter: its new total and version, and the new
/// records of the windows it touched. Older windows are already in the bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedCounter {
    pub name: String,
    pub version: i64,
    pub total: i64,
    pub partition: i32,
    pub touched_windows: Vec<(i64, WindowRecords)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_round_trip() {
        let summary = CounterSummary {
            version: 7,
            total: i64::MIN,
            partition: 2,
            complete_from_ms: 1_700_000_000_000,
            windows: BTreeMap::from([
                (
                    1_700_000_005_000,
                    WindowRecords {
                        positive: 5,
                        negative: -2,
                    },
                ),
                (
                    1_700_000_010_000,
                    WindowRecords {
                        positive: i64::MAX,
                        negative: 0,
                    },
                ),
            ]),
        };
        let encoded = summary.encode();
        assert_eq!(
            encoded,
            "7 -9223372036854775808 2 1700000000000;1700000005000 5 -2;1700000010000 9223372036854775807 0"
        );
        assert_eq!(CounterSummary::decode(&encoded).unwrap(), summary);
    }

    #[test]
    fn garbage_is_corrupt_not_zero() {
        for garbage in ["", "1 2 3", "1 2 3 x", "1 2 3 4;5 6", "1 2 3 4;a b c"] {
            assert!(CounterSummary::decode(garbage).is_err(), "{garbage:?}");
        }
    }
}
