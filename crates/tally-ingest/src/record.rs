//! What travels as one Kafka record, and what can go wrong producing it. Both the service and
//! group commit use these; neither owns them.

use std::time::Duration;

use rdkafka::error::KafkaError;
use tally_core::{CounterName, KeyedIncrement};

/// Increments of one counter that travel as one Kafka record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterIncrements {
    pub name: CounterName,
    pub by: i64,
    pub increments: u32,
    pub keyed: Vec<KeyedIncrement>,
    /// Some keyed increment may reach Kafka twice: it was produced without a claim (Redis could
    /// not be asked), or an earlier attempt with its key failed without knowing whether Kafka
    /// wrote it. Such a record is not added to Redis's deltas, where both copies could show
    /// (the aggregator may apply the other copy, in another window, and commit it before it
    /// reads this one); reads see it once the aggregator, which applies a use once, has.
    pub may_be_duplicated: bool,
}

/// How much of a record's size its keyed increments may take. Kafka refuses records above
/// `message.max.bytes` (1 MB by default): a hot counter whose increments all carry keys, behind
/// a slow broker, would otherwise gather more keys in one group than that.
pub(crate) const KEYED_BYTES_PER_RECORD: usize = 512 * 1024;

impl CounterIncrements {
    pub(crate) fn empty(name: CounterName) -> Self {
        Self {
            name,
            by: 0,
            increments: 0,
            keyed: Vec::new(),
            may_be_duplicated: false,
        }
    }

    /// The bytes the keyed increments take in the record's JSON, about.
    pub(crate) fn keyed_bytes(&self) -> usize {
        self.keyed.iter().map(keyed_bytes).sum()
    }

    /// Whether `other` still fits in the same record. Increments that may be duplicated travel
    /// apart from the others, which keep their place in Redis's deltas.
    pub(crate) fn has_room_for(&self, other: &CounterIncrements) -> bool {
        if self.may_be_duplicated != other.may_be_duplicated {
            return false;
        }
        self.keyed.is_empty()
            || other.keyed.is_empty()
            || self.keyed_bytes() + other.keyed_bytes() <= KEYED_BYTES_PER_RECORD
    }

    pub(crate) fn absorb(&mut self, other: &CounterIncrements) {
        // At most 10^12 per increment: a record would need 9 million of them to overflow.
        self.by = self.by.saturating_add(other.by);
        self.increments += other.increments;
        self.keyed.extend(other.keyed.iter().cloned());
        self.may_be_duplicated |= other.may_be_duplicated;
    }
}

/// `{"k":"KEY","by":-1000000000000},`
pub(crate) fn keyed_bytes(keyed: &KeyedIncrement) -> usize {
    keyed.key.len() + 32
}

/// Kafka did not acknowledge every record in time. Each affected increment is indeterminate:
/// it may or may not have been written, and it counts at most once.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("kafka did not acknowledge the increment within {0:?}; it is indeterminate")]
    Timeout(Duration),
    #[error("kafka rejected the increment: {0}")]
    Rejected(KafkaError),
    #[error("the producer queue is full; the increment was not sent")]
    QueueFull,
    /// Some of a request's records were acknowledged and others were not.
    #[error(
        "some of the request's records were written and others were not ({0}); every increment of the request is indeterminate"
    )]
    PartlyWritten(Box<ProduceError>),
}

impl ProduceError {
    /// Whether Kafka may have written the records after all: every failure but a full queue,
    /// which sent nothing.
    pub(crate) fn may_be_written(&self) -> bool {
        !matches!(self, ProduceError::QueueFull)
    }
}

/// What a request of several records answers, given each record's outcome.
pub(crate) fn request_outcome(outcomes: Vec<Result<(), ProduceError>>) -> Result<(), ProduceError> {
    let Some(first_failure) = outcomes.iter().find_map(|outcome| outcome.clone().err()) else {
        return Ok(());
    };
    if outcomes.iter().any(Result::is_ok) {
        return Err(ProduceError::PartlyWritten(Box::new(first_failure)));
    }
    // "Not sent" only if no record was: otherwise say what makes the request indeterminate.
    Err(outcomes
        .into_iter()
        .filter_map(Result::err)
        .find(|error| !matches!(error, ProduceError::QueueFull))
        .unwrap_or(first_failure))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_says_not_sent_only_when_no_record_was_sent() {
        let timeout = || ProduceError::Timeout(Duration::from_secs(5));
        assert!(request_outcome(vec![Ok(()), Ok(())]).is_ok());
        assert!(matches!(
            request_outcome(vec![
                Err(ProduceError::QueueFull),
                Err(ProduceError::QueueFull)
            ]),
            Err(ProduceError::QueueFull)
        ));
        assert!(matches!(
            request_outcome(vec![Err(ProduceError::QueueFull), Err(timeout())]),
            Err(ProduceError::Timeout(_))
        ));
        let partly = request_outcome(vec![Ok(()), Err(ProduceError::QueueFull)]).unwrap_err();
        assert!(matches!(partly, ProduceError::PartlyWritten(_)));
        assert!(partly.to_string().contains("indeterminate"), "{partly}");
    }

    #[test]
    fn keyed_increments_beyond_the_budget_do_not_fit() {
        let name = CounterName::parse("hot").unwrap();
        let keyed = |count: usize| CounterIncrements {
            name: name.clone(),
            by: count as i64,
            increments: count as u32,
            keyed: (0..count)
                .map(|index| KeyedIncrement {
                    key: format!("{index:0>96}"),
                    by: 1,
                })
                .collect(),
            may_be_duplicated: false,
        };
        let half = KEYED_BYTES_PER_RECORD / keyed_bytes(&keyed(1).keyed[0]) / 2;
        let mut record = keyed(half);
        assert!(record.has_room_for(&keyed(half)));
        record.absorb(&keyed(half));
        assert!(!record.has_room_for(&keyed(half)));
        let unkeyed = CounterIncrements::empty(name.clone());
        assert!(
            record.has_room_for(&unkeyed),
            "increments without keys always fit"
        );
    }
}
