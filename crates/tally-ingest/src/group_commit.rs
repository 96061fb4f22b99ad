//! Group commit. While a record of a counter is on its way to Kafka, further increments of that
//! counter wait, and then travel together as one record and one `INCRBY`. An idle counter's
//! increment leaves at once; a hot counter's increments form groups by themselves, as large as
//! the arrival rate times one Kafka acknowledgement. Each request still answers only once the
//! record holding its increment is acknowledged.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Mutex;

use tally_core::CounterName;
use tokio::sync::oneshot;

use crate::service::{CounterIncrements, ProduceError};

pub(crate) type Outcome = Result<(), ProduceError>;

/// An increment waiting for its group's record, and where to send the record's outcome.
pub(crate) type Waiting = (CounterIncrements, oneshot::Sender<Outcome>);

/// A counter has an entry exactly while a task is producing its groups.
#[derive(Default)]
pub(crate) struct GroupCommit {
    /// std Mutex: held only to push or take, never across an await.
    queues: Mutex<HashMap<CounterName, Vec<Waiting>>>,
}

impl GroupCommit {
    /// Queues increments. Returns true when no task is producing this counter's groups yet: the
    /// caller must start one.
    pub(crate) fn enqueue(
        &self,
        increments: CounterIncrements,
        done_tx: oneshot::Sender<Outcome>,
    ) -> bool {
        let mut queues = self
            .queues
            .lock()
            .expect("the group commit lock should never be poisoned");
        match queues.entry(increments.name.clone()) {
            Entry::Occupied(mut waiting) => {
                waiting.get_mut().push((increments, done_tx));
                false
            }
            Entry::Vacant(vacant) => {
                vacant.insert(vec![(increments, done_tx)]);
                true
            }
        }
    }

    /// Takes the next group. When nothing waits, the counter's entry is removed, which ends its
    /// task: the next increment starts a new one.
    pub(crate) fn next_group(&self, name: &CounterName) -> Option<Vec<Waiting>> {
        let mut queues = self
            .queues
            .lock()
            .expect("the group commit lock should never be poisoned");
        let waiting = queues.get_mut(name)?;
        if waiting.is_empty() {
            queues.remove(name);
            return None;
        }
        Some(std::mem::take(waiting))
    }

    /// Drops a counter's entry and everything waiting in it; the waiters see their channel
    /// closed. Used when a producing task ends abnormally, so the counter is never stuck.
    pub(crate) fn abandon(&self, name: &CounterName) {
        let mut queues = self
            .queues
            .lock()
            .expect("the group commit lock should never be poisoned");
        queues.remove(name);
    }
}

/// Merges a group into one record's worth of increments.
pub(crate) fn merge(group: &[Waiting]) -> CounterIncrements {
    let mut merged = group[0].0.clone();
    for (increments, _) in &group[1..] {
        // At most 10^12 per increment: a group would need 9 million of them to overflow.
        merged.by = merged.by.saturating_add(increments.by);
        merged.increments += increments.increments;
        merged.keyed.extend(increments.keyed.iter().cloned());
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
        }
    }

    #[test]
    fn the_first_increment_starts_a_task_and_later_ones_join_its_next_group() {
        let group_commit = GroupCommit::default();
        let name = CounterName::parse("hot").unwrap();
        assert!(group_commit.enqueue(increments(1, None), oneshot::channel().0));
        let first = group_commit.next_group(&name).unwrap();
        assert_eq!(first.len(), 1);
        // While the first group is produced, two more arrive; neither starts a task.
        assert!(!group_commit.enqueue(increments(2, Some("k")), oneshot::channel().0));
        assert!(!group_commit.enqueue(increments(3, None), oneshot::channel().0));
        let second = group_commit.next_group(&name).unwrap();
        let merged = merge(&second);
        assert_eq!(
            (merged.by, merged.increments, merged.keyed.len()),
            (5, 2, 1)
        );
        // Nothing more: the entry goes, and the next increment starts a new task.
        assert!(group_commit.next_group(&name).is_none());
        assert!(group_commit.enqueue(increments(1, None), oneshot::channel().0));
    }
}
