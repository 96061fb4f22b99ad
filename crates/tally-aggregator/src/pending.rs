//! What the aggregator has consumed but not yet committed: per partition, the offsets it has
//! read; per `(counter, window)`, the sum of the increments. Pure bookkeeping, no I/O.

use std::collections::{BTreeMap, HashMap};

use tally_core::{KeyedIncrement, clamp_to_i64};

/// One assigned partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PartitionProgress {
    /// The `next_offset` PostgreSQL holds for this partition. A commit checks it is still there,
    /// which fences off an aggregator that lost the partition without noticing.
    pub(crate) committed_offset: i64,
    /// The offset of the next record to read.
    pub(crate) next_offset: i64,
    /// The broker's append time of the latest record read, when the topic uses append times.
    pub(crate) last_append_ms: Option<i64>,
    /// The latest closed window this aggregator knows of for the partition.
    pub(crate) closed_window_ms: Option<i64>,
    /// The closed window this aggregator last published to Redis for the partition: what
    /// readers may be using. Window sums after it must stay in the summaries.
    pub(crate) published_closed_ms: Option<i64>,
    /// Redis summaries may lag PostgreSQL for this partition until they are rewritten.
    pub(crate) summaries_need_repair: bool,
}

/// A sum of increments of one counter in one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WindowSum {
    pub(crate) sum: i128,
    /// Retries dropped in this window: not counted, but maybe in the window's Redis deltas.
    pub(crate) dropped: i128,
    pub(crate) partition: i32,
}

/// The first increment read in this window for an idempotency key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeyedRow {
    pub(crate) name: String,
    pub(crate) window_start_ms: i64,
    pub(crate) by: i64,
}

/// One record's increments, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RecordIncrement {
    pub(crate) name: String,
    pub(crate) window_start_ms: i64,
    pub(crate) by: i64,
    pub(crate) keyed: Vec<KeyedIncrement>,
}

#[derive(Debug, Default)]
pub(crate) struct PendingWindow {
    pub(crate) partitions: BTreeMap<i32, PartitionProgress>,
    pub(crate) sums: HashMap<(String, i64), WindowSum>,
    /// Keyed increments read in this window, by key. A key seen twice in one window counts
    /// once here; keys applied in earlier windows are dropped by the commit.
    pub(crate) keyed: HashMap<String, KeyedRow>,
    pub(crate) records: u64,
    pub(crate) duplicates_in_window: u64,
}

/// The rows of one commit: sums clamped into `i64`, in a stable order.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct CommitRows {
    pub(crate) names: Vec<String>,
    pub(crate) window_starts_ms: Vec<i64>,
    pub(crate) sums: Vec<i64>,
    /// Per row: retries dropped within this window (see `WindowSum::dropped`).
    pub(crate) dropped: Vec<i64>,
    pub(crate) partitions: Vec<i32>,
    /// Counters whose window sum did not fit in `i64` and was clamped.
    pub(crate) clamped: Vec<String>,
    pub(crate) keys: Vec<String>,
    pub(crate) key_names: Vec<String>,
    pub(crate) key_window_starts_ms: Vec<i64>,
    pub(crate) key_amounts: Vec<i64>,
}

impl PendingWindow {
    /// Starts tracking a partition from the offset PostgreSQL holds for it.
    pub(crate) fn assign(&mut self, partition: i32, committed_offset: i64, closed: Option<i64>) {
        self.partitions.insert(
            partition,
            PartitionProgress {
                committed_offset,
                next_offset: committed_offset,
                last_append_ms: None,
                closed_window_ms: closed,
                published_closed_ms: None,
                summaries_need_repair: true,
            },
        );
    }

    /// Forgets every partition and everything read from them: their next owner reads them
    /// again from the offsets in PostgreSQL, so nothing read here may be committed any more.
    pub(crate) fn revoke_all(&mut self) {
        self.partitions.clear();
        self.clear_read();
    }

    fn clear_read(&mut self) {
        self.sums.clear();
        self.keyed.clear();
        self.records = 0;
        self.duplicates_in_window = 0;
    }

    /// Adds one record. Records of partitions not assigned here are ignored: they belong to
    /// whoever owns the partition now.
    pub(crate) fn add(
        &mut self,
        partition: i32,
        offset: i64,
        append_ms: Option<i64>,
        increment: Option<RecordIncrement>,
    ) -> bool {
        let Some(progress) = self.partitions.get_mut(&partition) else {
            return false;
        };
        if offset < progress.next_offset {
            // Already counted: a re-delivery after a seek.
            return false;
        }
        progress.next_offset = offset + 1;
        if append_ms.is_some() {
            progress.last_append_ms = append_ms;
        }
        if let Some(increment) = increment {
            let mut by = increment.by as i128;
            let mut dropped = 0;
            for keyed in increment.keyed {
                if self.keyed.contains_key(&keyed.key) {
                    // A retry read in the same window as the original: count the original only.
                    by -= keyed.by as i128;
                    dropped += keyed.by as i128;
                    self.duplicates_in_window += 1;
                    continue;
                }
                let row = KeyedRow {
                    name: increment.name.clone(),
                    window_start_ms: increment.window_start_ms,
                    by: keyed.by,
                };
                self.keyed.insert(keyed.key, row);
            }
            let entry = self
                .sums
                .entry((increment.name, increment.window_start_ms))
                .or_default();
            entry.sum += by;
            entry.dropped += dropped;
            entry.partition = partition;
        }
        self.records += 1;
        true
    }

    /// The rows of the next commit.
    pub(crate) fn commit_rows(&self) -> CommitRows {
        let mut keys: Vec<&(String, i64)> = self.sums.keys().collect();
        // A stable order makes concurrent upserts lock rows in the same order.
        keys.sort();
        let mut rows = CommitRows::default();
        for key in keys {
            let window_sum = self.sums[key];
            // A zero sum is still written: a keyed increment in it may have to be taken out.
            let (sum, clamped) = clamp_to_i64(window_sum.sum);
            if clamped {
                rows.clamped.push(key.0.clone());
            }
            rows.names.push(key.0.clone());
            rows.window_starts_ms.push(key.1);
            rows.sums.push(sum);
            rows.dropped.push(clamp_to_i64(window_sum.dropped).0);
            rows.partitions.push(window_sum.partition);
        }
        let mut keys: Vec<&String> = self.keyed.keys().collect();
        keys.sort();
        for key in keys {
            let row = &self.keyed[key];
            rows.keys.push(key.clone());
            rows.key_names.push(row.name.clone());
            rows.key_window_starts_ms.push(row.window_start_ms);
            rows.key_amounts.push(row.by);
        }
        rows
    }

    /// After a commit: what was read is now what PostgreSQL holds.
    pub(crate) fn committed(&mut self) {
        for progress in self.partitions.values_mut() {
            progress.committed_offset = progress.next_offset;
        }
        self.clear_read();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(name: &str, window_start_ms: i64, by: i64) -> Option<RecordIncrement> {
        Some(RecordIncrement {
            name: name.into(),
            window_start_ms,
            by,
            keyed: Vec::new(),
        })
    }

    #[test]
    fn a_key_read_twice_in_one_window_counts_once() {
        let mut pending = PendingWindow::default();
        pending.assign(0, 0, None);
        let keyed = |by| {
            Some(RecordIncrement {
                name: "a".into(),
                window_start_ms: 0,
                by: by + 10,
                keyed: vec![KeyedIncrement {
                    key: "k".into(),
                    by,
                }],
            })
        };
        // Each record carries the keyed 5 plus 10 without a key.
        pending.add(0, 0, None, keyed(5));
        pending.add(0, 1, None, keyed(5));
        let rows = pending.commit_rows();
        assert_eq!(rows.sums, vec![25]);
        assert_eq!(
            rows.dropped,
            vec![5],
            "the dropped retry is reported for the window"
        );
        assert_eq!(rows.keys, vec!["k"]);
        assert_eq!(rows.key_amounts, vec![5]);
        assert_eq!(pending.duplicates_in_window, 1);
    }

    #[test]
    fn sums_per_counter_and_window_and_skips_redelivered_offsets() {
        let mut pending = PendingWindow::default();
        pending.assign(0, 10, None);
        assert!(pending.add(0, 10, Some(1_000), plain("a", 0, 2)));
        assert!(pending.add(0, 11, Some(1_001), plain("a", 0, 3)));
        assert!(!pending.add(0, 11, Some(1_001), plain("a", 0, 3)));
        assert!(pending.add(0, 12, Some(1_002), plain("a", 5_000, -1)));
        assert!(
            !pending.add(1, 0, None, plain("b", 0, 1)),
            "partition 1 is not ours"
        );
        let rows = pending.commit_rows();
        assert_eq!(rows.names, vec!["a", "a"]);
        assert_eq!(rows.window_starts_ms, vec![0, 5_000]);
        assert_eq!(rows.sums, vec![5, -1]);
        assert_eq!(pending.partitions[&0].next_offset, 13);
        assert_eq!(pending.partitions[&0].last_append_ms, Some(1_002));
        pending.committed();
        assert_eq!(pending.partitions[&0].committed_offset, 13);
        assert!(pending.commit_rows().names.is_empty());
        // A window whose increments cancel out is still written.
        pending.add(0, 13, None, plain("a", 0, 4));
        pending.add(0, 14, None, plain("a", 0, -4));
        assert_eq!(pending.commit_rows().sums, vec![0]);
    }

    #[test]
    fn sums_that_overflow_are_clamped_and_reported() {
        let mut pending = PendingWindow::default();
        pending.assign(0, 0, None);
        pending.add(0, 0, None, plain("big", 0, i64::MAX));
        pending.add(0, 1, None, plain("big", 0, i64::MAX));
        let rows = pending.commit_rows();
        assert_eq!(rows.sums, vec![i64::MAX]);
        assert_eq!(rows.clamped, vec!["big"]);
    }
}
