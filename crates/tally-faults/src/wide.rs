//! The wide load: batches of increments of 1 spread over 100,000 names, so that a PostgreSQL
//! outage leaves the aggregator holding a row per `(counter, window)` for a great many counters.
//!
//! Reading 100,000 names back over HTTP would take longer than the scenario, so the wide names
//! are checked once, after the drain, against one `SELECT name, total FROM counters`: per name,
//! PostgreSQL's total must lie in `[acknowledged, acknowledged + indeterminate]`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::checker::Violation;
use crate::client::{AttemptResult, BatchItem, TallyClient};
use crate::history::AttemptTally;

/// How wide, and how fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WideLoad {
    pub names: usize,
    pub batch_items: usize,
    pub clients: usize,
    /// Pause between two batches of one client.
    pub pause_between_batches: Duration,
}

/// Distinct from every client mode's counter prefix, so the modes' checks never see a wide name.
const WIDE_NAME_PREFIX: &str = "wide-";

/// The `LIKE` pattern of every wide name, for the final query.
pub const WIDE_NAME_PATTERN: &str = "wide-%";

pub fn wide_name(index: usize) -> String {
    format!("{WIDE_NAME_PREFIX}{index}")
}

fn wide_index(name: &str) -> Option<usize> {
    let digits = name.strip_prefix(WIDE_NAME_PREFIX)?;
    // `wide-007` is not a name we send; only the canonical spelling maps back.
    let index: usize = digits.parse().ok()?;
    (wide_name(index) == name).then_some(index)
}

/// How many batches ended each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcomes {
    pub acknowledged: u64,
    pub failed: u64,
    pub indeterminate: u64,
}

/// What the wide clients sent, per name: every item adds 1, so a count is also a sum.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WideTally {
    pub acknowledged: Vec<u32>,
    pub indeterminate: Vec<u32>,
    pub batches: BatchOutcomes,
    /// Per item, as the modes count their attempts.
    pub attempts: AttemptTally,
}

impl WideTally {
    pub fn new(names: usize) -> Self {
        WideTally {
            acknowledged: vec![0; names],
            indeterminate: vec![0; names],
            ..WideTally::default()
        }
    }

    pub fn merge(&mut self, other: &WideTally) {
        for (sum, more) in self.acknowledged.iter_mut().zip(&other.acknowledged) {
            *sum += more;
        }
        for (sum, more) in self.indeterminate.iter_mut().zip(&other.indeterminate) {
            *sum += more;
        }
        self.batches.acknowledged += other.batches.acknowledged;
        self.batches.failed += other.batches.failed;
        self.batches.indeterminate += other.batches.indeterminate;
        self.attempts.merge(&other.attempts);
    }

    /// Records one batch over `indexes`.
    pub fn record(&mut self, indexes: &[usize], result: &AttemptResult) {
        let items = indexes.len() as u64;
        self.attempts.attempts += items;
        match result {
            AttemptResult::Acknowledged { duplicates } => {
                self.batches.acknowledged += 1;
                self.attempts.acknowledged += items;
                for &index in indexes {
                    self.acknowledged[index] += 1;
                }
                if *duplicates > 0 {
                    // No item carries a key, so nothing can be a duplicate.
                    self.attempts
                        .note_unexpected("\"duplicates\" on a batch without keys", *duplicates);
                }
            }
            AttemptResult::Indeterminate { unexpected, .. } => {
                self.batches.indeterminate += 1;
                self.attempts.indeterminate += items;
                for &index in indexes {
                    self.indeterminate[index] += 1;
                }
                if let Some(unexpected) = unexpected {
                    self.attempts
                        .note_unexpected(format!("{unexpected} on a wide batch"), items);
                }
            }
            AttemptResult::NotSent { .. } => {
                self.batches.failed += 1;
                self.attempts.failed += items;
            }
            AttemptResult::KeyInFlight { .. }
            | AttemptResult::KeyReused { .. }
            | AttemptResult::Rejected { .. } => {
                self.batches.failed += 1;
                self.attempts.failed += items;
                self.attempts
                    .note_unexpected("a 4xx on a wide batch without keys", items);
            }
        }
    }
}

/// One wide client's fixed inputs.
#[derive(Debug, Clone)]
pub struct WideClientSetup {
    pub index: usize,
    pub load: WideLoad,
    pub tally: TallyClient,
    pub stop: Arc<AtomicBool>,
}

/// Sends batches until `stop` is set. Each client sweeps the names in order from its own
/// starting point, so every name is touched and a batch never names one counter twice; one
/// attempt per batch, no idempotency key (a retry could only blur what was acknowledged).
pub async fn run_wide_client(setup: WideClientSetup) -> WideTally {
    let load = setup.load;
    let mut tally = WideTally::new(load.names);
    let mut cursor = setup.index * load.names / load.clients.max(1);
    while !setup.stop.load(Ordering::Relaxed) {
        let indexes: Vec<usize> = (0..load.batch_items.min(load.names))
            .map(|offset| (cursor + offset) % load.names)
            .collect();
        cursor = (cursor + indexes.len()) % load.names;
        let items: Vec<BatchItem> = indexes
            .iter()
            .map(|&index| BatchItem {
                counter: wide_name(index),
                by: 1,
                idempotency_key: None,
            })
            .collect();
        let result = setup.tally.increment_batch(&items).await;
        tally.record(&indexes, &result);
        tokio::time::sleep(load.pause_between_batches).await;
    }
    tally
}

/// What the final check of the wide names found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WideCheck {
    pub violations: Vec<Violation>,
    pub acknowledged_sum: i64,
    pub indeterminate_sum: i64,
    /// The sum of PostgreSQL's totals over the wide names.
    pub postgres_sum: i64,
    /// Names with at least one acknowledged increment.
    pub names_acknowledged: usize,
}

/// Checks PostgreSQL's `totals` of the wide names (rows of `counters` whose name is like
/// [`WIDE_NAME_PATTERN`]) against what the clients sent.
pub fn check_wide_totals(sent: &WideTally, totals: &[(String, i64)]) -> WideCheck {
    let mut check = WideCheck::default();
    let mut by_index: HashMap<usize, i64> = HashMap::with_capacity(totals.len());
    for (name, total) in totals {
        check.postgres_sum += total;
        match wide_index(name).filter(|index| *index < sent.acknowledged.len()) {
            Some(index) => {
                by_index.insert(index, *total);
            }
            // A wide-looking name we never sent: anything in it was counted from nothing.
            None if *total != 0 => check.violations.push(Violation::CountedTwice {
                counter: name.clone(),
                final_value: *total,
                upper_bound: 0,
            }),
            None => {}
        }
    }
    for (index, (&acknowledged, &indeterminate)) in sent
        .acknowledged
        .iter()
        .zip(&sent.indeterminate)
        .enumerate()
    {
        let acknowledged = i64::from(acknowledged);
        let upper_bound = acknowledged + i64::from(indeterminate);
        check.acknowledged_sum += acknowledged;
        check.indeterminate_sum += i64::from(indeterminate);
        if acknowledged > 0 {
            check.names_acknowledged += 1;
        }
        // A name never aggregated has no row, and counts 0.
        let total = by_index.get(&index).copied().unwrap_or(0);
        if total < acknowledged {
            check.violations.push(Violation::LostIncrements {
                counter: wide_name(index),
                final_value: total,
                acknowledged_sum: acknowledged,
            });
        }
        if total > upper_bound {
            check.violations.push(Violation::CountedTwice {
                counter: wide_name(index),
                final_value: total,
                upper_bound,
            });
        }
    }
    check
}

/// The wide load's part of a scenario, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WideResult {
    pub load: WideLoad,
    pub batches: BatchOutcomes,
    pub attempts: AttemptTally,
    pub check: WideCheck,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acknowledged() -> AttemptResult {
        AttemptResult::Acknowledged { duplicates: 0 }
    }

    fn unavailable() -> AttemptResult {
        AttemptResult::Indeterminate {
            cause: "HTTP 503".into(),
            unexpected: None,
            retry_after: None,
        }
    }

    fn totals(values: &[(usize, i64)]) -> Vec<(String, i64)> {
        values
            .iter()
            .map(|(index, total)| (wide_name(*index), *total))
            .collect()
    }

    #[test]
    fn names_map_back_to_their_index_only_in_their_own_spelling() {
        assert_eq!(wide_index(&wide_name(99_999)), Some(99_999));
        assert_eq!(wide_index("wide-007"), None);
        assert_eq!(wide_index("single-attempt-0"), None);
    }

    #[test]
    fn each_name_must_lie_between_acknowledged_and_indeterminate() {
        let mut sent = WideTally::new(4);
        sent.record(&[0, 1], &acknowledged());
        sent.record(&[1, 2], &unavailable());
        sent.record(&[3], &AttemptResult::NotSent { cause: "x".into() });
        // 0: exactly 1; 1: 1 or 2; 2: 0 or 1; 3: never.
        let good = check_wide_totals(&sent, &totals(&[(0, 1), (1, 2)]));
        assert_eq!(good.violations, vec![]);
        assert_eq!((good.acknowledged_sum, good.indeterminate_sum), (2, 2));
        assert_eq!(good.postgres_sum, 3);
        assert_eq!(
            sent.batches,
            BatchOutcomes {
                acknowledged: 1,
                failed: 1,
                indeterminate: 1,
            }
        );

        let bad = check_wide_totals(&sent, &totals(&[(1, 3), (3, 1)]));
        assert_eq!(
            bad.violations,
            vec![
                Violation::LostIncrements {
                    counter: wide_name(0),
                    final_value: 0,
                    acknowledged_sum: 1,
                },
                Violation::CountedTwice {
                    counter: wide_name(1),
                    final_value: 3,
                    upper_bound: 2,
                },
                Violation::CountedTwice {
                    counter: wide_name(3),
                    final_value: 1,
                    upper_bound: 0,
                },
            ]
        );
    }

    #[test]
    fn a_wide_name_never_sent_must_count_nothing() {
        let sent = WideTally::new(2);
        let check = check_wide_totals(&sent, &[("wide-5".into(), 2), ("wide-01".into(), 0)]);
        assert_eq!(
            check.violations,
            vec![Violation::CountedTwice {
                counter: "wide-5".into(),
                final_value: 2,
                upper_bound: 0,
            }]
        );
    }

    #[test]
    fn tallies_of_several_clients_add_up() {
        let mut first = WideTally::new(3);
        first.record(&[0, 1], &acknowledged());
        let mut second = WideTally::new(3);
        second.record(&[1, 2], &acknowledged());
        first.merge(&second);
        assert_eq!(first.acknowledged, vec![1, 2, 1]);
        assert_eq!(first.batches.acknowledged, 2);
        assert_eq!(first.attempts.acknowledged, 4);
    }
}
