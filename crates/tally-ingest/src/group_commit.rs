//! Group commit. While [`MAX_RECORDS_IN_FLIGHT`] records of a counter are on their way to Kafka,
//! further increments of that counter wait, and then travel together as one record and one
//! `INCRBY`. An idle counter's increment leaves at once; a hot counter's increments form groups by
//! themselves, as large as the arrival rate times one Kafka acknowledgement divided by the records
//! in flight. Two records in flight keep a counter's throughput from being capped at one group
//! per acknowledgement. Each request still answers only once the record holding its
//! increment is acknowledged. A group stops growing when its keyed increments would make the
//! record too large for Kafka; the rest wait for the next record.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Mutex;

use tally_core::CounterName;
use tokio::sync::oneshot;

use crate::record::{CounterIncrements, ProduceError};

pub(crate) type Outcome = Result<(), ProduceError>;

/// An increment waiting for its group's record, and where to send the record's outcome.
pub(crate) type Waiting = (CounterIncrements, oneshot::Sender<Outcome>);

/// How many records of one counter may be waiting for Kafka at once.
///
/// Two, measured (benches/README.md): one caps a hot counter at one group per acknowledgement,
/// while more than two make smaller groups, so more records for the same increments, and the
/// broker's and librdkafka's per-record CPU then slows every request on a two-core machine.
pub(crate) const MAX_RECORDS_IN_FLIGHT: usize = 2;

#[derive(Default)]
struct CounterQueue {
    waiting: Vec<Waiting>,
    /// Tasks producing this counter's groups, each with at most one record in flight.
    producers: usize,
}

/// A counter has an entry exactly while at least one task is producing its groups.
#[derive(Default)]
pub(crate) struct GroupCommit {
    /// std Mutex: held only to push or take, never across an await.
    queues: Mutex<HashMap<CounterName, CounterQueue>>,
}

impl GroupCommit {
    /// Queues increments. Returns true when the caller must start one more task producing this
    /// counter's groups (fewer than [`MAX_RECORDS_IN_FLIGHT`] are running).
    pub(crate) fn enqueue(
        &self,
        increments: CounterIncrements,
        done_tx: oneshot::Sender<Outcome>,
    ) -> bool {
        let mut queues = self.lock();
        let queue = match queues.entry(increments.name.clone()) {
            Entry::Occupied(queue) => queue.into_mut(),
            Entry::Vacant(vacant) => vacant.insert(CounterQueue::default()),
        };
        queue.waiting.push((increments, done_tx));
        if queue.producers < MAX_RECORDS_IN_FLIGHT {
            queue.producers += 1;
            return true;
        }
        false
    }

    /// Takes the next group for a producing task: what waits, in order, as long as it fits in
    /// one record. When nothing waits, the task ends (None), and the last one to end removes the
    /// counter's entry.
    pub(crate) fn next_group(&self, name: &CounterName) -> Option<Vec<Waiting>> {
        let mut queues = self.lock();
        let queue = queues.get_mut(name)?;
        if queue.waiting.is_empty() {
            queue.producers -= 1;
            if queue.producers == 0 {
                queues.remove(name);
            }
            return None;
        }
        let mut record = CounterIncrements::empty(name.clone());
        let fitting = queue
            .waiting
            .iter()
            .take_while(|(increments, _)| {
                let fits = record.increments == 0 || record.has_room_for(increments);
                if fits {
                    record.absorb(increments);
                }
                fits
            })
            .count();
        Some(queue.waiting.drain(..fitting).collect())
    }

    /// Ends a producing task that stopped abnormally, so the counter is never left waiting for a
    /// task that no longer exists. When the last task goes, what still waits is dropped and the
    /// waiters see their channel closed.
    pub(crate) fn abandon(&self, name: &CounterName) {
        let mut queues = self.lock();
        if let Some(queue) = queues.get_mut(name) {
            queue.producers = queue.producers.saturating_sub(1);
            if queue.producers == 0 {
                queues.remove(name);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CounterName, CounterQueue>> {
        self.queues
            .lock()
            .expect("the group commit lock should never be poisoned")
    }
}

/// Merges a group into one record's worth of increments.
pub(crate) fn merge(group: &[Waiting]) -> CounterIncrements {
    let mut merged = group[0].0.clone();
    for (increments, _) in &group[1..] {
        merged.absorb(increments);
    }
    merged
}

#[cfg(test)]
mod tests {
    use tally_core::KeyedIncrement;

    use super::*;

    fn increments(by: i64, key: Option<&str>) -> CounterIncrements {
        CounterIncrements {
            name: CounterName::parse("hot").unwrap(),
            by,
            increments: 1,
            keyed: key
                .map(|key| KeyedIncrement {
                    key: key.into(),
                    by,
                })
                .into_iter()
                .collect(),
            may_be_duplicated: false,
        }
    }

    #[test]
    fn increments_beyond_the_records_in_flight_join_the_next_group() {
        let group_commit = GroupCommit::default();
        let name = CounterName::parse("hot").unwrap();
        // The first increments each start a task, up to the limit, and each task takes a group.
        for _ in 0..MAX_RECORDS_IN_FLIGHT {
            assert!(group_commit.enqueue(increments(1, None), oneshot::channel().0));
            assert_eq!(group_commit.next_group(&name).unwrap().len(), 1);
        }
        // With every task's record in flight, two more arrive; neither starts a task.
        assert!(!group_commit.enqueue(increments(2, Some("k")), oneshot::channel().0));
        assert!(!group_commit.enqueue(increments(3, None), oneshot::channel().0));
        let second = group_commit.next_group(&name).unwrap();
        let merged = merge(&second);
        assert_eq!(
            (merged.by, merged.increments, merged.keyed.len()),
            (5, 2, 1)
        );
        // Nothing more: the tasks end one by one and the last removes the entry, so the next
        // increment starts a new task.
        for _ in 0..MAX_RECORDS_IN_FLIGHT {
            assert!(group_commit.next_group(&name).is_none());
        }
        assert!(group_commit.enqueue(increments(1, None), oneshot::channel().0));
    }

    #[test]
    fn a_group_stops_where_its_keys_would_not_fit_in_one_record() {
        let group_commit = GroupCommit::default();
        let name = CounterName::parse("hot").unwrap();
        let long_key = |index: usize| format!("{index:0>120}");
        let per_increment = crate::record::keyed_bytes(&KeyedIncrement {
            key: long_key(0),
            by: 1,
        });
        let fitting = crate::record::KEYED_BYTES_PER_RECORD / per_increment;
        for index in 0..fitting + 10 {
            group_commit.enqueue(increments(1, Some(&long_key(index))), oneshot::channel().0);
        }
        let first = group_commit.next_group(&name).unwrap();
        assert_eq!(first.len(), fitting);
        assert!(merge(&first).keyed_bytes() <= crate::record::KEYED_BYTES_PER_RECORD);
        assert_eq!(group_commit.next_group(&name).unwrap().len(), 10);
    }

    #[test]
    fn an_abandoned_last_task_leaves_no_entry_behind() {
        let group_commit = GroupCommit::default();
        let name = CounterName::parse("hot").unwrap();
        assert!(group_commit.enqueue(increments(1, None), oneshot::channel().0));
        group_commit.abandon(&name);
        assert!(group_commit.next_group(&name).is_none());
        assert!(group_commit.enqueue(increments(1, None), oneshot::channel().0));
    }
}
