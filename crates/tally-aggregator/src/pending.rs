//! What the aggregator has consumed but not yet committed: per partition, the offsets it has
//! read and where its commits stand; per counter, the sums of its records per window and the
//! set it was given, if any. Pure bookkeeping, no I/O.
//!
//! A set replaces everything before it in the counter's partition. A commit applies a counter's
//! set before its increments, so a set is only taken into a commit that holds nothing else of
//! its counter yet: otherwise the partition is held at the set's offset until the commit of
//! what came before it, and the set is read again after it.

use std::collections::{BTreeMap, HashMap, HashSet};

use tally_core::{KeyedIncrement, SetAudit, clamp_to_i64};

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
    /// readers may be using. Window records after it must stay in the summaries.
    pub(crate) published_closed_ms: Option<i64>,
    /// The generation of the partition's latest commit to PostgreSQL.
    pub(crate) generation: i64,
    /// The generation every bucket of the mirror is known to hold for the partition: the last
    /// commit this aggregator copied everywhere, or, right after the assignment, the partition's
    /// latest commit (the previous owner may have died before copying it, and the buckets that
    /// miss it are then found behind and repaired).
    pub(crate) known_generation: i64,
    /// What PostgreSQL records as mirrored for the partition.
    pub(crate) mirrored_generation: i64,
    /// The log no longer holds the records from `committed_offset` on (retention deleted them):
    /// consuming would skip them silently, so the partition is not consumed.
    pub(crate) refused_for_gap: bool,
    /// A set at this offset waits for the commit of what was read before it: records from here
    /// on are not taken, and the partition is read again from here after the commit.
    pub(crate) held_at: Option<i64>,
}

/// Where a partition's commits stood in PostgreSQL when it was assigned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct StoredPartition {
    pub(crate) next_offset: i64,
    pub(crate) closed_window_ms: Option<i64>,
    pub(crate) generation: i64,
    pub(crate) mirrored_generation: i64,
}

/// The records read for one counter in one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WindowSum {
    /// What counts: the records' `by`, less the retries dropped here.
    pub(crate) sum: i128,
    /// The records' `by`, dropped retries included, split by the sign of each record: what the
    /// ingest added to the window's positive and negative deltas.
    pub(crate) positive: i128,
    pub(crate) negative: i128,
    pub(crate) partition: i32,
}

/// One use of an idempotency key: a retry is the same use again.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct KeyUseRow {
    pub(crate) key: String,
    pub(crate) counter: String,
    pub(crate) by: i64,
    /// The window of the first record read with this use.
    pub(crate) window_start_ms: i64,
}

/// One record's increments, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RecordIncrement {
    pub(crate) name: String,
    pub(crate) window_start_ms: i64,
    pub(crate) by: i64,
    pub(crate) keyed: Vec<KeyedIncrement>,
}

/// One set record, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RecordSet {
    pub(crate) name: String,
    pub(crate) window_start_ms: i64,
    pub(crate) value: i64,
    pub(crate) audit: SetAudit,
}

/// One record of a counter's partition, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ReadRecord {
    Increment(RecordIncrement),
    Set(RecordSet),
}

/// What [`PendingWindow::add`] did with a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Added {
    /// Taken into the next commit.
    Taken,
    /// A set taken into the next commit: commit soon, so reads show it.
    TakenSet,
    /// Not ours, read before, or behind a hold.
    Skipped,
    /// A set of a counter that already has records in the next commit: the partition is held
    /// at it until that commit.
    HeldForCommit,
}

/// What the next commit holds for one counter.
#[derive(Debug, Default)]
struct PendingCounter {
    /// Per window, in the order first read (a counter rarely spans more than two).
    windows: Vec<(i64, WindowSum)>,
    /// Applied before the windows' sums.
    set: Option<RecordSet>,
}

#[derive(Debug, Default)]
pub(crate) struct PendingWindow {
    pub(crate) partitions: BTreeMap<i32, PartitionProgress>,
    counters: HashMap<String, PendingCounter>,
    /// How many `(counter, window)` rows `counters` holds.
    window_rows: usize,
    /// The key uses read since the last commit, each once, in the order read.
    key_uses: Vec<KeyUseRow>,
    /// (key, counter, by) of `key_uses`, to find a retry read since the last commit.
    seen_uses: HashSet<(String, String, i64)>,
    /// The counter and amount each key was first read with since the last commit.
    first_use_of_key: HashMap<String, (String, i64)>,
    pub(crate) records: u64,
    /// Retries of a use read earlier since the last commit: dropped.
    pub(crate) duplicates_in_window: u64,
    /// Uses of a key read earlier since the last commit with another counter or amount: both
    /// were acknowledged (Redis could not claim the key), so both count.
    pub(crate) conflicts_in_window: u64,
}

/// One `(counter, window)` row of a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WindowRow {
    pub(crate) name: String,
    pub(crate) window_start_ms: i64,
    pub(crate) sum: i64,
    pub(crate) positive: i64,
    pub(crate) negative: i64,
    pub(crate) partition: i32,
}

/// One partition's move in a commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OffsetRow {
    pub(crate) partition: i32,
    /// What PostgreSQL must still hold for the commit to go ahead.
    pub(crate) expected_offset: i64,
    pub(crate) next_offset: i64,
    pub(crate) closed_window_ms: Option<i64>,
}

/// One counter's set in a commit, applied before the commit's window sums.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SetRow {
    pub(crate) name: String,
    /// The window the set was made in; the commit has a row for it.
    pub(crate) window_start_ms: i64,
    pub(crate) value: i64,
    pub(crate) audit: SetAudit,
}

/// Everything one commit writes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct CommitRows {
    /// In a stable order, so concurrent upserts lock rows in the same order.
    pub(crate) windows: Vec<WindowRow>,
    /// Each counter with a set also has a row in `windows`.
    pub(crate) sets: Vec<SetRow>,
    pub(crate) key_uses: Vec<KeyUseRow>,
    pub(crate) offsets: Vec<OffsetRow>,
    /// Counters whose window sum did not fit in `i64` and was clamped.
    pub(crate) clamped: Vec<String>,
    /// The commit's generation: above every earlier commit of its partitions.
    pub(crate) generation: i64,
}

impl PendingWindow {
    /// Starts tracking a partition from where PostgreSQL holds it.
    pub(crate) fn assign(&mut self, partition: i32, stored: StoredPartition) {
        self.partitions.insert(
            partition,
            PartitionProgress {
                committed_offset: stored.next_offset,
                next_offset: stored.next_offset,
                last_append_ms: None,
                closed_window_ms: stored.closed_window_ms,
                published_closed_ms: None,
                generation: stored.generation,
                known_generation: stored.generation,
                mirrored_generation: stored.mirrored_generation,
                refused_for_gap: false,
                held_at: None,
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
        self.counters.clear();
        self.window_rows = 0;
        self.key_uses.clear();
        self.seen_uses.clear();
        self.first_use_of_key.clear();
        self.records = 0;
        self.duplicates_in_window = 0;
        self.conflicts_in_window = 0;
    }

    /// Adds one record. Records of partitions not assigned here are ignored: they belong to
    /// whoever owns the partition now.
    pub(crate) fn add(
        &mut self,
        partition: i32,
        offset: i64,
        append_ms: Option<i64>,
        record: Option<ReadRecord>,
    ) -> Added {
        let Some(progress) = self.partitions.get_mut(&partition) else {
            return Added::Skipped;
        };
        if progress.refused_for_gap {
            // Fetched before the partition was paused: consuming past a gap is what is refused.
            return Added::Skipped;
        }
        if offset < progress.next_offset {
            // Already counted: a re-delivery after a seek.
            return Added::Skipped;
        }
        if progress.held_at.is_some() {
            // Read again from the hold after the commit.
            return Added::Skipped;
        }
        if let Some(ReadRecord::Set(set)) = &record
            && self.counters.contains_key(&set.name)
        {
            progress.held_at = Some(offset);
            return Added::HeldForCommit;
        }
        progress.next_offset = offset + 1;
        if append_ms.is_some() {
            progress.last_append_ms = append_ms;
        }
        self.records += 1;
        match record {
            None => Added::Taken,
            Some(ReadRecord::Increment(increment)) => {
                self.add_increment(partition, increment);
                Added::Taken
            }
            Some(ReadRecord::Set(set)) => {
                let counter = self.counters.entry(set.name.clone()).or_default();
                // The set's window gets a row (of nothing) so the counter is in the commit.
                Self::window_of(
                    counter,
                    &mut self.window_rows,
                    set.window_start_ms,
                    partition,
                );
                counter.set = Some(set);
                Added::TakenSet
            }
        }
    }

    fn add_increment(&mut self, partition: i32, increment: RecordIncrement) {
        let mut counted = increment.by as i128;
        for keyed in increment.keyed {
            let identity = (keyed.key.clone(), increment.name.clone(), keyed.by);
            if self.seen_uses.contains(&identity) {
                // A retry read since the last commit: count the first copy only.
                counted -= keyed.by as i128;
                self.duplicates_in_window += 1;
                continue;
            }
            match self.first_use_of_key.get(&keyed.key) {
                Some(_) => self.conflicts_in_window += 1,
                None => {
                    self.first_use_of_key
                        .insert(keyed.key.clone(), (increment.name.clone(), keyed.by));
                }
            }
            self.seen_uses.insert(identity);
            self.key_uses.push(KeyUseRow {
                key: keyed.key,
                counter: increment.name.clone(),
                by: keyed.by,
                window_start_ms: increment.window_start_ms,
            });
        }
        let counter = self.counters.entry(increment.name).or_default();
        let entry = Self::window_of(
            counter,
            &mut self.window_rows,
            increment.window_start_ms,
            partition,
        );
        entry.sum += counted;
        if increment.by > 0 {
            entry.positive += increment.by as i128;
        } else {
            entry.negative += increment.by as i128;
        }
    }

    fn window_of<'c>(
        counter: &'c mut PendingCounter,
        window_rows: &mut usize,
        window_start_ms: i64,
        partition: i32,
    ) -> &'c mut WindowSum {
        let index = match counter
            .windows
            .iter()
            .position(|(start, _)| *start == window_start_ms)
        {
            Some(index) => index,
            None => {
                *window_rows += 1;
                counter.windows.push((
                    window_start_ms,
                    WindowSum {
                        partition,
                        ..WindowSum::default()
                    },
                ));
                counter.windows.len() - 1
            }
        };
        &mut counter.windows[index].1
    }

    /// `(counter, window)` rows read since the last commit: what bounds the memory.
    pub(crate) fn pending_rows(&self) -> usize {
        self.window_rows + self.key_uses.len()
    }

    /// The rows of the next commit, at a generation above every earlier commit of the
    /// partitions (and at least `now_ms`, so generations also order commits in time).
    pub(crate) fn commit_rows(&self, now_ms: i64) -> CommitRows {
        let mut names: Vec<&String> = self.counters.keys().collect();
        names.sort();
        let mut rows = CommitRows::default();
        for name in names {
            let counter = &self.counters[name];
            if let Some(set) = &counter.set {
                rows.sets.push(SetRow {
                    name: name.clone(),
                    window_start_ms: set.window_start_ms,
                    value: set.value,
                    audit: set.audit.clone(),
                });
            }
            debug_assert!(
                counter.set.as_ref().is_none_or(|set| counter
                    .windows
                    .iter()
                    .any(|(start, _)| *start == set.window_start_ms)),
                "a set's window has a row in the commit"
            );
            let mut windows: Vec<&(i64, WindowSum)> = counter.windows.iter().collect();
            windows.sort_by_key(|(start, _)| *start);
            for (window_start_ms, window_sum) in windows {
                // A zero sum is still written: a keyed increment in it may have to be taken out.
                let (sum, clamped) = clamp_to_i64(window_sum.sum);
                if clamped {
                    rows.clamped.push(name.clone());
                }
                rows.windows.push(WindowRow {
                    name: name.clone(),
                    window_start_ms: *window_start_ms,
                    sum,
                    positive: clamp_to_i64(window_sum.positive).0,
                    negative: clamp_to_i64(window_sum.negative).0,
                    partition: window_sum.partition,
                });
            }
        }
        rows.key_uses = self.key_uses.clone();
        rows.offsets = self
            .partitions
            .iter()
            .map(|(partition, progress)| OffsetRow {
                partition: *partition,
                expected_offset: progress.committed_offset,
                next_offset: progress.next_offset,
                closed_window_ms: progress.closed_window_ms,
            })
            .collect();
        let latest = self
            .partitions
            .values()
            .map(|progress| progress.generation)
            .max()
            .unwrap_or(0);
        rows.generation = now_ms.max(latest + 1);
        rows
    }

    /// After a commit: what was read is now what PostgreSQL holds, at `generation`. Returns
    /// the partitions that were held for a set, with the offset to read them again from.
    pub(crate) fn committed(&mut self, generation: i64) -> Vec<(i32, i64)> {
        let mut released = Vec::new();
        for (partition, progress) in &mut self.partitions {
            progress.committed_offset = progress.next_offset;
            progress.generation = generation;
            if let Some(offset) = progress.held_at.take() {
                released.push((*partition, offset));
            }
        }
        self.clear_read();
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(name: &str, window_start_ms: i64, by: i64) -> Option<ReadRecord> {
        Some(ReadRecord::Increment(RecordIncrement {
            name: name.into(),
            window_start_ms,
            by,
            keyed: Vec::new(),
        }))
    }

    fn set(name: &str, window_start_ms: i64, value: i64) -> Option<ReadRecord> {
        Some(ReadRecord::Set(RecordSet {
            name: name.into(),
            window_start_ms,
            value,
            audit: SetAudit {
                id: format!("{name}-{value}"),
                actor: "admin".into(),
                client: "127.0.0.1".into(),
                reason: "test".into(),
                requested_at_ms: 0,
            },
        }))
    }

    fn keyed(name: &str, key: &str, by: i64, unkeyed: i64) -> Option<ReadRecord> {
        Some(ReadRecord::Increment(RecordIncrement {
            name: name.into(),
            window_start_ms: 0,
            by: by + unkeyed,
            keyed: vec![KeyedIncrement {
                key: key.into(),
                by,
            }],
        }))
    }

    fn assigned() -> PendingWindow {
        let mut pending = PendingWindow::default();
        pending.assign(0, StoredPartition::default());
        pending
    }

    #[test]
    fn a_retry_read_twice_counts_once_but_stays_in_the_records() {
        let mut pending = assigned();
        // Each record carries the keyed 5 plus 10 without a key.
        pending.add(0, 0, None, keyed("a", "k", 5, 10));
        pending.add(0, 1, None, keyed("a", "k", 5, 10));
        let rows = pending.commit_rows(0);
        assert_eq!(rows.windows[0].sum, 25);
        assert_eq!(
            rows.windows[0].positive, 30,
            "the ingest added both records to the deltas"
        );
        assert_eq!(rows.key_uses.len(), 1);
        assert_eq!(pending.duplicates_in_window, 1);
    }

    #[test]
    fn two_different_uses_of_one_key_both_count() {
        let mut pending = assigned();
        pending.add(0, 0, None, keyed("a", "k", 1, 0));
        pending.add(0, 1, None, keyed("b", "k", 1, 0));
        pending.add(0, 2, None, keyed("a", "k", 2, 0));
        let rows = pending.commit_rows(0);
        let sums: Vec<(&str, i64)> = rows
            .windows
            .iter()
            .map(|row| (row.name.as_str(), row.sum))
            .collect();
        assert_eq!(sums, vec![("a", 3), ("b", 1)]);
        assert_eq!(rows.key_uses.len(), 3, "each use is claimed");
        assert_eq!(pending.conflicts_in_window, 2);
        assert_eq!(pending.duplicates_in_window, 0);
    }

    #[test]
    fn records_split_by_sign() {
        let mut pending = assigned();
        pending.add(0, 0, None, plain("a", 0, 4));
        pending.add(0, 1, None, plain("a", 0, -3));
        pending.add(0, 2, None, plain("a", 0, 2));
        let row = &pending.commit_rows(0).windows[0];
        assert_eq!((row.sum, row.positive, row.negative), (3, 6, -3));
    }

    #[test]
    fn sums_per_counter_and_window_and_skips_redelivered_offsets() {
        let mut pending = PendingWindow::default();
        pending.assign(
            0,
            StoredPartition {
                next_offset: 10,
                ..StoredPartition::default()
            },
        );
        assert_eq!(
            pending.add(0, 10, Some(1_000), plain("a", 0, 2)),
            Added::Taken
        );
        assert_eq!(
            pending.add(0, 11, Some(1_001), plain("a", 0, 3)),
            Added::Taken
        );
        assert_eq!(
            pending.add(0, 11, Some(1_001), plain("a", 0, 3)),
            Added::Skipped
        );
        assert_eq!(
            pending.add(0, 12, Some(1_002), plain("a", 5_000, -1)),
            Added::Taken
        );
        assert_eq!(
            pending.add(1, 0, None, plain("b", 0, 1)),
            Added::Skipped,
            "partition 1 is not ours"
        );
        let rows = pending.commit_rows(0);
        let windows: Vec<(&str, i64, i64)> = rows
            .windows
            .iter()
            .map(|row| (row.name.as_str(), row.window_start_ms, row.sum))
            .collect();
        assert_eq!(windows, vec![("a", 0, 5), ("a", 5_000, -1)]);
        assert_eq!(pending.partitions[&0].next_offset, 13);
        assert_eq!(pending.partitions[&0].last_append_ms, Some(1_002));
        pending.committed(rows.generation);
        assert_eq!(pending.partitions[&0].committed_offset, 13);
        assert!(pending.commit_rows(0).windows.is_empty());
        // A window whose increments cancel out is still written.
        pending.add(0, 13, None, plain("a", 0, 4));
        pending.add(0, 14, None, plain("a", 0, -4));
        assert_eq!(pending.commit_rows(0).windows[0].sum, 0);
    }

    #[test]
    fn a_set_of_a_counter_without_records_in_the_commit_is_taken_before_its_increments() {
        let mut pending = assigned();
        pending.add(0, 0, None, plain("other", 0, 7));
        assert_eq!(pending.add(0, 1, None, set("a", 0, 100)), Added::TakenSet);
        pending.add(0, 2, None, plain("a", 5_000, 3));
        let rows = pending.commit_rows(0);
        assert_eq!(rows.sets.len(), 1);
        assert_eq!((rows.sets[0].name.as_str(), rows.sets[0].value), ("a", 100));
        let windows: Vec<(&str, i64, i64)> = rows
            .windows
            .iter()
            .map(|row| (row.name.as_str(), row.window_start_ms, row.sum))
            .collect();
        assert_eq!(
            windows,
            vec![("a", 0, 0), ("a", 5_000, 3), ("other", 0, 7)],
            "the set's window has a row so the counter is in the commit"
        );
    }

    #[test]
    fn a_set_after_records_of_its_counter_holds_the_partition_until_they_are_committed() {
        let mut pending = assigned();
        pending.add(0, 0, None, plain("a", 0, 5));
        assert_eq!(
            pending.add(0, 1, None, set("a", 0, 0)),
            Added::HeldForCommit
        );
        assert_eq!(
            pending.add(0, 2, None, plain("b", 0, 1)),
            Added::Skipped,
            "nothing after the hold is taken, of any counter"
        );
        let rows = pending.commit_rows(0);
        assert!(rows.sets.is_empty());
        assert_eq!(
            rows.offsets[0].next_offset, 1,
            "the commit ends before the set"
        );
        assert_eq!(pending.committed(rows.generation), vec![(0, 1)]);
        // Read again from the hold: now the set is the first thing of its counter.
        assert_eq!(pending.add(0, 1, None, set("a", 0, 0)), Added::TakenSet);
        assert_eq!(pending.add(0, 2, None, plain("b", 0, 1)), Added::Taken);
        assert_eq!(
            pending.add(0, 3, None, set("a", 0, 9)),
            Added::HeldForCommit
        );
        let rows = pending.commit_rows(0);
        assert_eq!(rows.sets[0].value, 0);
        assert_eq!(pending.committed(rows.generation), vec![(0, 3)]);
    }

    #[test]
    fn generations_rise_even_when_the_clock_does_not() {
        let mut pending = assigned();
        let first = pending.commit_rows(1_000).generation;
        pending.committed(first);
        let second = pending.commit_rows(500).generation;
        assert_eq!((first, second), (1_000, 1_001));
    }

    #[test]
    fn sums_that_overflow_are_clamped_and_reported() {
        let mut pending = assigned();
        pending.add(0, 0, None, plain("big", 0, i64::MAX));
        pending.add(0, 1, None, plain("big", 0, i64::MAX));
        let rows = pending.commit_rows(0);
        assert_eq!(rows.windows[0].sum, i64::MAX);
        assert_eq!(rows.clamped, vec!["big"]);
    }
}
