//! The key-reuse mode: two uses of one fresh `Idempotency-Key`, sent at the same moment, and
//! what their answers mean for the count.
//!
//! Tally claims a key in Redis before it produces the increment, so of two racing uses:
//! - `202 {"duplicate": false}` is counted exactly once, even when both uses get one (Redis
//!   was unreachable and could not tell them apart: then both count);
//! - `409` (the other use was in flight) and `422` (the key was first used for another counter
//!   or amount) count nothing;
//! - `503` or a timeout may count once or not at all;
//! - `202 {"duplicate": true}` says "already counted, the first time". For a use that differs
//!   from the other one (another counter or amount) that cannot be true: the client was told
//!   its increment was counted when it was counted nowhere. The checker reports it.
//!
//! Sending the same increment twice at once is a concurrent retry: one intended increment,
//! acknowledged as soon as either use gets a `202`.

use std::time::Duration;

use rand::Rng;
use rand::seq::IndexedRandom as _;

use crate::checker::Violation;
use crate::client::{AttemptResult, BatchItem, TallyClient};
use crate::history::{AttemptTally, IncrementOutcome, IncrementRecord};

/// How the two uses of one key differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairShape {
    /// Same amount, two counters.
    TwoCounters,
    /// One counter, two amounts.
    TwoAmounts,
    /// The same counter and amount: a retry racing its first attempt.
    SameIncrementTwice,
}

impl PairShape {
    fn label(self) -> &'static str {
        match self {
            PairShape::TwoCounters => "two counters",
            PairShape::TwoAmounts => "two amounts",
            PairShape::SameIncrementTwice => "same increment twice",
        }
    }
}

/// One use of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUse {
    pub counter: String,
    pub by: i64,
    /// Sent as a one-item `POST /v1/increments` rather than `POST .../increment`, so both
    /// routes' claims race.
    pub via_batch: bool,
}

/// One use's answer, with when it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UseAnswer {
    pub result: AttemptResult,
    pub completed_at: Duration,
}

/// What one pair came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedPair {
    /// One record per intended increment: two for differing uses, one for the same increment.
    pub increments: Vec<IncrementRecord>,
    pub violations: Vec<Violation>,
    pub attempts: AttemptTally,
}

/// Draws a pair over `counters` (at least two) with amounts in `1..=max_by` (at least 2).
pub fn draw_pair(rng: &mut impl Rng, counters: &[String], max_by: i64) -> (PairShape, [KeyUse; 2]) {
    let shape = match rng.random_range(0..10) {
        0..4 => PairShape::TwoCounters,
        4..8 => PairShape::TwoAmounts,
        _ => PairShape::SameIncrementTwice,
    };
    let mut via_batch = || rng.random_bool(0.25);
    let (first_via_batch, second_via_batch) = (via_batch(), via_batch());
    let two: Vec<&String> = counters.choose_multiple(rng, 2).collect();
    let first_by = rng.random_range(1..=max_by);
    let (second_counter, second_by) = match shape {
        PairShape::TwoCounters => (two[1].clone(), first_by),
        PairShape::TwoAmounts => {
            // Any other amount in range: shift by 1..max_by-1, wrapping within 1..=max_by.
            let shift = rng.random_range(1..max_by);
            (two[0].clone(), (first_by - 1 + shift) % max_by + 1)
        }
        PairShape::SameIncrementTwice => (two[0].clone(), first_by),
    };
    (
        shape,
        [
            KeyUse {
                counter: two[0].clone(),
                by: first_by,
                via_batch: first_via_batch,
            },
            KeyUse {
                counter: second_counter,
                by: second_by,
                via_batch: second_via_batch,
            },
        ],
    )
}

/// Sends one use of `key`.
pub async fn send_use(tally: &TallyClient, key: &str, key_use: &KeyUse) -> AttemptResult {
    if key_use.via_batch {
        tally
            .increment_batch(&[BatchItem {
                counter: key_use.counter.clone(),
                by: key_use.by,
                idempotency_key: Some(key.to_owned()),
            }])
            .await
    } else {
        tally
            .increment(&key_use.counter, key_use.by, Some(key))
            .await
    }
}

/// Turns a pair's answers into intended increments and violations (pure, so it is tested).
pub fn resolve_pair(
    shape: PairShape,
    key: &str,
    uses: &[KeyUse; 2],
    answers: &[UseAnswer; 2],
    invoked_at: Duration,
) -> ResolvedPair {
    let mut resolved = ResolvedPair::default();
    let mut labels = Vec::new();
    for (key_use, answer) in uses.iter().zip(answers) {
        labels.push(answer_label(&answer.result));
        tally_answer(&mut resolved.attempts, &answer.result);
        if let AttemptResult::KeyReused { detail } = &answer.result {
            if shape == PairShape::SameIncrementTwice {
                resolved
                    .violations
                    .push(Violation::IdenticalUseRefusedAsReused {
                        counter: key_use.counter.clone(),
                        answered_at: answer.completed_at,
                        detail: detail.clone(),
                    });
            }
        }
    }
    labels.sort_unstable();
    resolved
        .attempts
        .pair_answers
        .insert(format!("{}: {}", shape.label(), labels.join(" + ")), 1);

    if shape == PairShape::SameIncrementTwice {
        resolved.increments.push(IncrementRecord {
            counter: uses[0].counter.clone(),
            by: uses[0].by,
            invoked_at,
            outcome: same_increment_outcome(answers),
        });
        return resolved;
    }
    for (key_use, answer) in uses.iter().zip(answers) {
        let outcome = match &answer.result {
            AttemptResult::Acknowledged { duplicates: 0 } => IncrementOutcome::Acknowledged {
                acked_at: answer.completed_at,
            },
            AttemptResult::Acknowledged { .. } => {
                resolved
                    .violations
                    .push(Violation::DuplicateOfADifferentUse {
                        counter: key_use.counter.clone(),
                        by: key_use.by,
                        key: key.to_owned(),
                        answered_at: answer.completed_at,
                    });
                // Reported above; for the bounds it may count or not, so the same fault is not
                // reported a second time as a lost increment.
                IncrementOutcome::Indeterminate
            }
            AttemptResult::KeyInFlight { .. }
            | AttemptResult::KeyReused { .. }
            | AttemptResult::Rejected { .. }
            | AttemptResult::NotSent { .. } => IncrementOutcome::Failed,
            AttemptResult::Indeterminate { .. } => IncrementOutcome::Indeterminate,
        };
        resolved.increments.push(IncrementRecord {
            counter: key_use.counter.clone(),
            by: key_use.by,
            invoked_at,
            outcome,
        });
    }
    resolved
}

/// The same increment sent twice at once is one increment: acknowledged at the first `202`
/// (a `"duplicate": true` is an acknowledgement too: "counted once, the first time"), else
/// indeterminate if either use may have landed, else failed.
fn same_increment_outcome(answers: &[UseAnswer; 2]) -> IncrementOutcome {
    let first_acknowledgement = answers
        .iter()
        .filter(|answer| matches!(answer.result, AttemptResult::Acknowledged { .. }))
        .map(|answer| answer.completed_at)
        .min();
    if let Some(acked_at) = first_acknowledgement {
        return IncrementOutcome::Acknowledged { acked_at };
    }
    if answers
        .iter()
        .any(|answer| matches!(answer.result, AttemptResult::Indeterminate { .. }))
    {
        return IncrementOutcome::Indeterminate;
    }
    IncrementOutcome::Failed
}

fn tally_answer(attempts: &mut AttemptTally, result: &AttemptResult) {
    attempts.attempts += 1;
    match result {
        AttemptResult::Acknowledged { duplicates } => {
            attempts.acknowledged += 1;
            attempts.duplicates_absorbed += duplicates;
        }
        AttemptResult::KeyInFlight { .. } => {
            attempts.failed += 1;
            attempts.key_in_flight += 1;
        }
        AttemptResult::KeyReused { .. } => {
            attempts.failed += 1;
            attempts.key_reused += 1;
        }
        AttemptResult::Rejected { status, .. } => {
            attempts.failed += 1;
            attempts.note_unexpected(format!("HTTP {status} on a key-reuse increment"), 1);
        }
        AttemptResult::NotSent { .. } => attempts.failed += 1,
        AttemptResult::Indeterminate { unexpected, .. } => {
            attempts.indeterminate += 1;
            if let Some(unexpected) = unexpected {
                attempts.note_unexpected(format!("{unexpected} on a key-reuse increment"), 1);
            }
        }
    }
}

fn answer_label(result: &AttemptResult) -> String {
    match result {
        AttemptResult::Acknowledged { duplicates: 0 } => "202 new".to_owned(),
        AttemptResult::Acknowledged { .. } => "202 duplicate".to_owned(),
        AttemptResult::KeyInFlight { .. } => "409 in flight".to_owned(),
        AttemptResult::KeyReused { .. } => "422 reused".to_owned(),
        AttemptResult::Rejected { status, .. } => format!("HTTP {status}"),
        AttemptResult::NotSent { .. } => "not sent".to_owned(),
        AttemptResult::Indeterminate { cause, .. } => cause.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;
    use rand::rngs::StdRng;

    const KEY: &str = "k-1";

    fn at(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn key_use(counter: &str, by: i64) -> KeyUse {
        KeyUse {
            counter: counter.into(),
            by,
            via_batch: false,
        }
    }

    fn answer(result: AttemptResult, completed_ms: u64) -> UseAnswer {
        UseAnswer {
            result,
            completed_at: at(completed_ms),
        }
    }

    fn new(completed_ms: u64) -> UseAnswer {
        answer(AttemptResult::Acknowledged { duplicates: 0 }, completed_ms)
    }

    fn duplicate(completed_ms: u64) -> UseAnswer {
        answer(AttemptResult::Acknowledged { duplicates: 1 }, completed_ms)
    }

    fn in_flight(completed_ms: u64) -> UseAnswer {
        answer(
            AttemptResult::KeyInFlight { retry_after: None },
            completed_ms,
        )
    }

    fn reused(completed_ms: u64) -> UseAnswer {
        answer(
            AttemptResult::KeyReused {
                detail: "first used for a".into(),
            },
            completed_ms,
        )
    }

    fn unavailable(completed_ms: u64) -> UseAnswer {
        answer(
            AttemptResult::Indeterminate {
                cause: "HTTP 503".into(),
                unexpected: None,
                retry_after: None,
            },
            completed_ms,
        )
    }

    fn outcomes(resolved: &ResolvedPair) -> Vec<(String, i64, IncrementOutcome)> {
        resolved
            .increments
            .iter()
            .map(|increment| (increment.counter.clone(), increment.by, increment.outcome))
            .collect()
    }

    #[test]
    fn a_409_and_a_422_never_count() {
        let uses = [key_use("a", 2), key_use("b", 2)];
        for refusal in [in_flight(30), reused(30)] {
            let resolved = resolve_pair(
                PairShape::TwoCounters,
                KEY,
                &uses,
                &[new(20), refusal],
                at(10),
            );
            assert_eq!(
                outcomes(&resolved),
                vec![
                    (
                        "a".into(),
                        2,
                        IncrementOutcome::Acknowledged { acked_at: at(20) }
                    ),
                    ("b".into(), 2, IncrementOutcome::Failed),
                ]
            );
            assert_eq!(resolved.violations, vec![]);
            assert_eq!(resolved.attempts.failed, 1);
        }
    }

    #[test]
    fn two_new_answers_for_differing_uses_both_count() {
        // Redis unreachable: the claims could not see each other, so both are first uses.
        let resolved = resolve_pair(
            PairShape::TwoAmounts,
            KEY,
            &[key_use("a", 1), key_use("a", 3)],
            &[new(20), new(25)],
            at(10),
        );
        assert_eq!(
            outcomes(&resolved),
            vec![
                (
                    "a".into(),
                    1,
                    IncrementOutcome::Acknowledged { acked_at: at(20) }
                ),
                (
                    "a".into(),
                    3,
                    IncrementOutcome::Acknowledged { acked_at: at(25) }
                ),
            ]
        );
        assert_eq!(
            resolved.attempts.pair_answers.keys().collect::<Vec<_>>(),
            vec!["two amounts: 202 new + 202 new"]
        );
    }

    #[test]
    fn a_duplicate_answer_for_a_differing_use_is_a_violation() {
        let resolved = resolve_pair(
            PairShape::TwoCounters,
            KEY,
            &[key_use("a", 2), key_use("b", 2)],
            &[new(20), duplicate(30)],
            at(10),
        );
        assert_eq!(
            resolved.violations,
            vec![Violation::DuplicateOfADifferentUse {
                counter: "b".into(),
                by: 2,
                key: KEY.into(),
                answered_at: at(30),
            }]
        );
        // Not reported twice: for the bounds, it may count or not.
        assert_eq!(
            resolved.increments[1].outcome,
            IncrementOutcome::Indeterminate
        );
    }

    #[test]
    fn an_unavailable_use_is_indeterminate() {
        let resolved = resolve_pair(
            PairShape::TwoCounters,
            KEY,
            &[key_use("a", 2), key_use("b", 2)],
            &[unavailable(2_000), in_flight(30)],
            at(10),
        );
        assert_eq!(
            outcomes(&resolved),
            vec![
                ("a".into(), 2, IncrementOutcome::Indeterminate),
                ("b".into(), 2, IncrementOutcome::Failed),
            ]
        );
    }

    #[test]
    fn the_same_increment_twice_is_one_increment() {
        let uses = [key_use("a", 4), key_use("a", 4)];
        let resolve = |answers: [UseAnswer; 2]| {
            resolve_pair(PairShape::SameIncrementTwice, KEY, &uses, &answers, at(10))
        };
        // New + duplicate, new + 409, and even new + new (Redis unreachable): one increment,
        // acknowledged at the first 202.
        for answers in [
            [new(40), duplicate(30)],
            [new(40), in_flight(20)],
            [new(40), new(35)],
        ] {
            let resolved = resolve(answers);
            assert_eq!(resolved.increments.len(), 1);
            assert!(matches!(
                resolved.increments[0].outcome,
                IncrementOutcome::Acknowledged { .. }
            ));
            assert_eq!(resolved.violations, vec![]);
        }
        assert_eq!(
            resolve([new(40), duplicate(30)]).increments[0].outcome,
            IncrementOutcome::Acknowledged { acked_at: at(30) }
        );
        assert_eq!(
            resolve([unavailable(2_000), in_flight(20)]).increments[0].outcome,
            IncrementOutcome::Indeterminate
        );
        assert_eq!(
            resolve([in_flight(20), in_flight(20)]).increments[0].outcome,
            IncrementOutcome::Failed
        );
    }

    #[test]
    fn a_422_for_the_same_increment_is_a_violation() {
        let resolved = resolve_pair(
            PairShape::SameIncrementTwice,
            KEY,
            &[key_use("a", 4), key_use("a", 4)],
            &[new(20), reused(30)],
            at(10),
        );
        assert_eq!(
            resolved.violations,
            vec![Violation::IdenticalUseRefusedAsReused {
                counter: "a".into(),
                answered_at: at(30),
                detail: "first used for a".into(),
            }]
        );
    }

    #[test]
    fn drawn_pairs_have_the_shape_they_claim() {
        let counters: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..500 {
            let (shape, [first, second]) = draw_pair(&mut rng, &counters, 5);
            assert!((1..=5).contains(&first.by) && (1..=5).contains(&second.by));
            match shape {
                PairShape::TwoCounters => {
                    assert_ne!(first.counter, second.counter);
                    assert_eq!(first.by, second.by);
                }
                PairShape::TwoAmounts => {
                    assert_eq!(first.counter, second.counter);
                    assert_ne!(first.by, second.by);
                }
                PairShape::SameIncrementTwice => {
                    assert_eq!((first.counter, first.by), (second.counter, second.by));
                }
            }
        }
    }
}
