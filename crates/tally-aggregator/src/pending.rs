//! What the aggregator has consumed but not yet committed: per partition, the offsets it has
//! read; per `(counter, window)`, the sum of the increments. Pure bookkeeping, no I/O.

use std::collections::{BTreeMap, HashMap};

use tally_core::clamp_to_i64;

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
    /// Redis summaries may lag PostgreSQL for this partition until they are rewritten.
    pub(crate) summaries_need_repair: bool,
}

/// A sum of increments of one counter in one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WindowSum {
    pub(crate) sum: i128,
    pub(crate) partition: i32,
}

#[derive(Debug, Default)]
pub(crate) struct PendingWindow {
    pub(crate) partitions: BTreeMap<i32, PartitionProgress>,
    pub(crate) sums: HashMap<(String, i64), WindowSum>,
    pub(crate) records: u64,
}

/// The rows of one commit: sums clamped into `i64`, in a stable order.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct CommitRows {
    pub(crate) names: Vec<String>,
    pub(crate) window_starts_ms: Vec<i64>,
    pub(crate) sums: Vec<i64>,
    pub(crate) partitions: Vec<i32>,
    /// Counters whose window sum did not fit in `i64` and was clamped.
    pub(crate) clamped: Vec<String>,
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
                summaries_need_repair: true,
            },
        );
    }

    /// Forgets every partition and everything read from them: their next owner reads them
    /// again from the offsets in PostgreSQL, so nothing read here may be committed any more.
    pub(crate) fn revoke_all(&mut self) {
        self.partitions.clear();
        self.sums.clear();
        self.records = 0;
    }

    /// Adds one record. Records of partitions not assigned here are ignored: they belong to
    /// whoever owns the partition now.
    pub(crate) fn add(
        &mut self,
        partition: i32,
        offset: i64,
        append_ms: Option<i64>,
        increment: Option<(String, i64, i64)>,
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
        if let Some((name, window_start_ms, by)) = increment {
            let entry = self.sums.entry((name, window_start_ms)).or_default();
            entry.sum += by as i128;
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
            let (sum, clamped) = clamp_to_i64(window_sum.sum);
            if sum == 0 {
                continue;
            }
            if clamped {
                rows.clamped.push(key.0.clone());
            }
            rows.names.push(key.0.clone());
            rows.window_starts_ms.push(key.1);
            rows.sums.push(sum);
            rows.partitions.push(window_sum.partition);
        }
        rows
    }

    /// After a commit: what was read is now what PostgreSQL holds.
    pub(crate) fn committed(&mut self) {
        for progress in self.partitions.values_mut() {
            progress.committed_offset = progress.next_offset;
        }
        self.sums.clear();
        self.records = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_per_counter_and_window_and_skips_redelivered_offsets() {
        let mut pending = PendingWindow::default();
        pending.assign(0, 10, None);
        assert!(pending.add(0, 10, Some(1_000), Some(("a".into(), 0, 2))));
        assert!(pending.add(0, 11, Some(1_001), Some(("a".into(), 0, 3))));
        assert!(!pending.add(0, 11, Some(1_001), Some(("a".into(), 0, 3))));
        assert!(pending.add(0, 12, Some(1_002), Some(("a".into(), 5_000, -1))));
        assert!(
            !pending.add(1, 0, None, Some(("b".into(), 0, 1))),
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
    }

    #[test]
    fn sums_that_overflow_are_clamped_and_reported() {
        let mut pending = PendingWindow::default();
        pending.assign(0, 0, None);
        pending.add(0, 0, None, Some(("big".into(), 0, i64::MAX)));
        pending.add(0, 1, None, Some(("big".into(), 0, i64::MAX)));
        let rows = pending.commit_rows();
        assert_eq!(rows.sums, vec![i64::MAX]);
        assert_eq!(rows.clamped, vec!["big"]);
    }
}
