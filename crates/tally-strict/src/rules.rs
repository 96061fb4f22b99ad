//! The rules of a strict counter, as pure functions: given the row as PostgreSQL holds it (under
//! its row lock) and the operations waiting for it, in order, what each operation answers and
//! what the row becomes. Nothing here does I/O, so every rule is unit tested.

use std::collections::HashMap;

/// A counter's bounds; `None` is unbounded on that side (the `i64` range still applies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub min: Option<i64>,
    pub max: Option<i64>,
}

impl Limits {
    pub fn admits(&self, value: i64) -> bool {
        self.min.is_none_or(|min| min <= value) && self.max.is_none_or(|max| value <= max)
    }

    /// A pair of bounds that leaves room for at least one value.
    pub fn is_consistent(&self) -> bool {
        match (self.min, self.max) {
            (Some(min), Some(max)) => min <= max,
            _ => true,
        }
    }
}

/// The counter's row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterState {
    pub value: i64,
    pub limits: Limits,
    pub version: i64,
}

/// One write to a strict counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Adds a nonzero `by`, unless the result would leave the limits.
    Add {
        by: i64,
        idempotency_key: Option<String>,
    },
    /// Sets `value` if the counter holds `expected`, unless `value` is outside the limits.
    CompareAndSet { expected: i64, value: i64 },
}

impl Operation {
    pub fn idempotency_key(&self) -> Option<&str> {
        match self {
            Operation::Add {
                idempotency_key, ..
            } => idempotency_key.as_deref(),
            Operation::CompareAndSet { .. } => None,
        }
    }
}

/// What a refused operation tried to do, so its answer can say why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    Add(i64),
    Set(i64),
}

/// What one operation answers. `value` and `version` are the counter's after an applied
/// operation, and as the operation found them otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied {
        value: i64,
        version: i64,
    },
    /// The result would have left the limits (or the `i64` range); nothing changed.
    LimitReached {
        value: i64,
        version: i64,
        limits: Limits,
        attempt: Attempt,
    },
    /// A compare-and-set found another value; nothing changed.
    Mismatch {
        value: i64,
        version: i64,
    },
    /// The idempotency key was first used with another counter or amount; nothing changed.
    KeyReused {
        first_counter: String,
        first_by: i64,
    },
}

/// An outcome, and whether it is the replay of a first outcome stored under its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub replayed: bool,
}

/// A key's first use and its outcome (always `Applied` or `LimitReached`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyUse {
    pub counter: String,
    pub by: i64,
    pub outcome: Outcome,
}

/// What a batch decided.
#[derive(Debug)]
pub struct BatchDecision {
    /// One per operation, in order.
    pub decisions: Vec<Decision>,
    /// The row after the batch; its version moved by the number of applied operations.
    pub state: CounterState,
    /// The key uses first seen in this batch, to be stored in the same transaction.
    pub new_key_uses: Vec<(String, KeyUse)>,
}

/// Applies `operations` to the counter one after the other, as if each had its own
/// transaction. `known_keys` are the key uses stored within the idempotency window.
pub fn decide(
    counter: &str,
    mut state: CounterState,
    operations: &[&Operation],
    known_keys: &HashMap<String, KeyUse>,
) -> BatchDecision {
    let mut decisions = Vec::with_capacity(operations.len());
    let mut new_key_uses: Vec<(String, KeyUse)> = Vec::new();
    for operation in operations {
        let decision = match operation {
            Operation::Add {
                by,
                idempotency_key: Some(key),
            } => {
                let first_use = new_key_uses
                    .iter()
                    .find(|(new_key, _)| new_key == key)
                    .map(|(_, key_use)| key_use)
                    .or_else(|| known_keys.get(key));
                match first_use {
                    Some(first) if first.counter == counter && first.by == *by => Decision {
                        outcome: first.outcome.clone(),
                        replayed: true,
                    },
                    Some(first) => fresh(Outcome::KeyReused {
                        first_counter: first.counter.clone(),
                        first_by: first.by,
                    }),
                    None => {
                        let outcome = add(&mut state, *by);
                        let key_use = KeyUse {
                            counter: counter.to_owned(),
                            by: *by,
                            outcome: outcome.clone(),
                        };
                        new_key_uses.push((key.clone(), key_use));
                        fresh(outcome)
                    }
                }
            }
            Operation::Add {
                by,
                idempotency_key: None,
            } => fresh(add(&mut state, *by)),
            Operation::CompareAndSet { expected, value } => {
                fresh(compare_and_set(&mut state, *expected, *value))
            }
        };
        decisions.push(decision);
    }
    BatchDecision {
        decisions,
        state,
        new_key_uses,
    }
}

fn fresh(outcome: Outcome) -> Decision {
    Decision {
        outcome,
        replayed: false,
    }
}

fn add(state: &mut CounterState, by: i64) -> Outcome {
    match state.value.checked_add(by) {
        Some(value) if state.limits.admits(value) => apply(state, value),
        // Past the limits, or past the i64 range: both are a limit the counter cannot pass.
        _ => limit_reached(state, Attempt::Add(by)),
    }
}

fn compare_and_set(state: &mut CounterState, expected: i64, value: i64) -> Outcome {
    if state.value != expected {
        return Outcome::Mismatch {
            value: state.value,
            version: state.version,
        };
    }
    if !state.limits.admits(value) {
        return limit_reached(state, Attempt::Set(value));
    }
    apply(state, value)
}

fn apply(state: &mut CounterState, value: i64) -> Outcome {
    state.value = value;
    // A counter takes far fewer than 2^63 writes; saturating keeps the type honest.
    state.version = state.version.saturating_add(1);
    Outcome::Applied {
        value: state.value,
        version: state.version,
    }
}

fn limit_reached(state: &CounterState, attempt: Attempt) -> Outcome {
    Outcome::LimitReached {
        value: state.value,
        version: state.version,
        limits: state.limits,
        attempt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stock(value: i64) -> CounterState {
        CounterState {
            value,
            limits: Limits {
                min: Some(0),
                max: None,
            },
            version: 0,
        }
    }

    fn add(by: i64) -> Operation {
        Operation::Add {
            by,
            idempotency_key: None,
        }
    }

    fn keyed_add(by: i64, key: &str) -> Operation {
        Operation::Add {
            by,
            idempotency_key: Some(key.to_owned()),
        }
    }

    fn run(state: CounterState, operations: &[Operation]) -> BatchDecision {
        let operations: Vec<&Operation> = operations.iter().collect();
        decide("stock", state, &operations, &HashMap::new())
    }

    #[test]
    fn a_batch_never_passes_the_minimum() {
        let batch = run(stock(2), &[add(-1), add(-1), add(-1), add(5)]);
        let outcomes: Vec<&Outcome> = batch.decisions.iter().map(|d| &d.outcome).collect();
        assert_eq!(
            outcomes[..2],
            [
                &Outcome::Applied {
                    value: 1,
                    version: 1
                },
                &Outcome::Applied {
                    value: 0,
                    version: 2
                }
            ]
        );
        assert!(matches!(
            outcomes[2],
            Outcome::LimitReached {
                value: 0,
                version: 2,
                attempt: Attempt::Add(-1),
                ..
            }
        ));
        assert_eq!(
            outcomes[3],
            &Outcome::Applied {
                value: 5,
                version: 3
            }
        );
        assert_eq!((batch.state.value, batch.state.version), (5, 3));
    }

    #[test]
    fn the_maximum_and_the_i64_range_are_limits() {
        let capped = CounterState {
            value: 9,
            limits: Limits {
                min: None,
                max: Some(10),
            },
            version: 7,
        };
        let batch = run(capped, &[add(2), add(1), add(1)]);
        assert!(matches!(
            batch.decisions[0].outcome,
            Outcome::LimitReached { value: 9, .. }
        ));
        assert_eq!(
            batch.decisions[1].outcome,
            Outcome::Applied {
                value: 10,
                version: 8
            }
        );
        let unbounded = CounterState {
            value: i64::MAX - 1,
            limits: Limits {
                min: None,
                max: None,
            },
            version: 0,
        };
        let batch = run(unbounded, &[add(2), add(i64::MIN), add(i64::MIN)]);
        assert!(matches!(
            batch.decisions[0].outcome,
            Outcome::LimitReached {
                attempt: Attempt::Add(2),
                ..
            }
        ));
        assert_eq!(
            batch.decisions[1].outcome,
            Outcome::Applied {
                value: -2,
                version: 1
            }
        );
        assert!(matches!(
            batch.decisions[2].outcome,
            Outcome::LimitReached { value: -2, .. }
        ));
    }

    #[test]
    fn compare_and_set_checks_the_value_then_the_limits() {
        let batch = run(
            stock(5),
            &[
                Operation::CompareAndSet {
                    expected: 5,
                    value: 4,
                },
                Operation::CompareAndSet {
                    expected: 5,
                    value: 3,
                },
                Operation::CompareAndSet {
                    expected: 4,
                    value: -1,
                },
            ],
        );
        assert_eq!(
            batch.decisions[0].outcome,
            Outcome::Applied {
                value: 4,
                version: 1
            }
        );
        assert_eq!(
            batch.decisions[1].outcome,
            Outcome::Mismatch {
                value: 4,
                version: 1
            }
        );
        assert!(matches!(
            batch.decisions[2].outcome,
            Outcome::LimitReached {
                attempt: Attempt::Set(-1),
                ..
            }
        ));
    }

    #[test]
    fn a_key_counts_once_within_a_batch_and_across_batches() {
        let batch = run(
            stock(10),
            &[
                keyed_add(-3, "k"),
                keyed_add(-3, "k"),
                keyed_add(-4, "k"),
                add(-1),
            ],
        );
        assert_eq!(
            batch.decisions[0],
            Decision {
                outcome: Outcome::Applied {
                    value: 7,
                    version: 1
                },
                replayed: false
            }
        );
        assert_eq!(
            batch.decisions[1],
            Decision {
                outcome: Outcome::Applied {
                    value: 7,
                    version: 1
                },
                replayed: true
            }
        );
        assert_eq!(
            batch.decisions[2].outcome,
            Outcome::KeyReused {
                first_counter: "stock".into(),
                first_by: -3
            }
        );
        assert_eq!(batch.state.value, 6);
        assert_eq!(batch.new_key_uses.len(), 1);

        let known: HashMap<String, KeyUse> = batch.new_key_uses.into_iter().collect();
        let retry = keyed_add(-3, "k");
        let elsewhere = keyed_add(-3, "k");
        let later = decide("stock", batch.state, &[&retry], &known);
        assert!(later.decisions[0].replayed);
        assert_eq!(later.state, batch.state);
        assert!(later.new_key_uses.is_empty());
        let other_counter = decide("other", batch.state, &[&elsewhere], &known);
        assert!(matches!(
            other_counter.decisions[0].outcome,
            Outcome::KeyReused { .. }
        ));
    }

    #[test]
    fn a_refused_keyed_add_is_replayed_as_refused() {
        let batch = run(stock(0), &[keyed_add(-1, "k"), add(1), keyed_add(-1, "k")]);
        assert!(matches!(
            batch.decisions[0].outcome,
            Outcome::LimitReached { value: 0, .. }
        ));
        assert_eq!(batch.decisions[2].outcome, batch.decisions[0].outcome);
        assert!(batch.decisions[2].replayed);
        assert_eq!(batch.state.value, 1);
    }

    #[test]
    fn limits_admit_their_bounds() {
        let limits = Limits {
            min: Some(-1),
            max: Some(1),
        };
        assert!(limits.admits(-1) && limits.admits(1) && !limits.admits(2));
        assert!(
            !Limits {
                min: Some(2),
                max: Some(1)
            }
            .is_consistent()
        );
    }
}
