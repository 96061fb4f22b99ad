//! The set mode: an admin client that sets, resets and imports a few of the load's counters at
//! random moments while their increments go on, and the audit trail that says which sets were
//! applied, in which order, over which value.
//!
//! A set travels through its counter's Kafka partition like an increment: it replaces
//! everything before it in the log, and what comes after adds on top. Its `202` carries the
//! `audit_id` of the row the aggregator writes when it applies it. Each request is sent once:
//! - `202`: the set must be applied exactly once, its `audit_id` in the trail exactly once;
//! - `503`, another `5xx`, a timeout: applied once or never;
//! - a `4xx`, or never sent: never applied.
//!
//! Every request carries a reason of its own, so every audit row is traced back to the request
//! that made it, even an indeterminate one whose `audit_id` the client never saw. The checker
//! then derives the increments applied to each such counter from the trail
//! ([`crate::checker::check_final_with_sets`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom as _;
use rand::{Rng as _, SeedableRng as _};

use crate::checker::Violation;
use crate::client::{AuditRow, SetAnswer, TallyClient};
use crate::history::{AppliedSet, SetOutcome, SetRecord};

/// The admin token every Tally process of the suite is started with.
pub const ADMIN_TOKEN: &str = "tally-faults-admin-token";

/// Rows per page of the audit trail: small, so a scenario's trail takes several pages and the
/// paging itself is exercised.
pub const AUDIT_PAGE_SIZE: i64 = 25;

/// The set client's pace and values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SetLoad {
    /// Pause between two requests, drawn uniformly from this range in milliseconds: a set now
    /// and then, between many increments of the same counter.
    pub think_time_ms: (u64, u64),
    /// Values are drawn from `0..=max_value`: never negative, so a set can only lower a
    /// counter as far as 0, and the read bounds stay simple.
    pub max_value: i64,
    /// Share of requests that are resets and imports; the rest are sets.
    pub reset_share: f64,
    pub import_share: f64,
}

impl SetLoad {
    pub const SUITE: SetLoad = SetLoad {
        think_time_ms: (300, 1_200),
        max_value: 500,
        reset_share: 0.3,
        import_share: 0.15,
    };
}

/// What kind of request made a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SetKind {
    Set,
    Reset,
    Import,
}

impl SetKind {
    fn label(self) -> &'static str {
        match self {
            SetKind::Set => "set",
            SetKind::Reset => "reset",
            SetKind::Import => "import",
        }
    }
}

/// Counts of the set client's requests and of the sets they carried (an import carries one set
/// per counter).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetTally {
    /// Requests by kind.
    pub requests: BTreeMap<&'static str, u64>,
    pub acknowledged: u64,
    pub indeterminate: u64,
    pub failed: u64,
    /// Answers a valid admin request should never get (`500`, a `4xx`), by description.
    pub unexpected: BTreeMap<String, u64>,
}

/// Everything the set client did.
#[derive(Debug, Clone, Default)]
pub struct SetClientReport {
    pub sets: Vec<SetRecord>,
    pub tally: SetTally,
}

/// The set client's fixed inputs.
#[derive(Debug, Clone)]
pub struct SetClientSetup {
    /// Sends the admin token.
    pub tally: TallyClient,
    /// The load's counters it sets, each at least once.
    pub counters: Vec<String>,
    pub load: SetLoad,
    pub clock: Instant,
    pub stop: Arc<AtomicBool>,
    pub seed: u64,
    /// Makes reasons unique across scenarios.
    pub reason_prefix: String,
}

/// Runs the set client until `stop` is set. The second request is always an import of every
/// target counter, so each scenario has one whatever the draws.
pub async fn run_set_client(setup: SetClientSetup) -> SetClientReport {
    let mut rng = StdRng::seed_from_u64(setup.seed ^ 0x5e75_5e75_5e75_5e75);
    let mut report = SetClientReport::default();
    let mut request_number = 0u64;
    while !setup.stop.load(Ordering::Relaxed) {
        let pause = rng.random_range(setup.load.think_time_ms.0..=setup.load.think_time_ms.1);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if setup.stop.load(Ordering::Relaxed) {
            break;
        }
        request_number += 1;
        let draw: f64 = rng.random();
        let kind = if request_number == 2 || draw < setup.load.import_share {
            SetKind::Import
        } else if draw < setup.load.import_share + setup.load.reset_share {
            SetKind::Reset
        } else {
            SetKind::Set
        };
        let reason = format!(
            "tally-faults {} {} #{request_number}",
            setup.reason_prefix,
            kind.label()
        );
        let targets: Vec<(String, i64)> = match kind {
            SetKind::Import => setup
                .counters
                .iter()
                .map(|counter| (counter.clone(), rng.random_range(0..=setup.load.max_value)))
                .collect(),
            SetKind::Reset => vec![(
                setup.counters.choose(&mut rng).cloned().unwrap_or_default(),
                0,
            )],
            SetKind::Set => vec![(
                setup.counters.choose(&mut rng).cloned().unwrap_or_default(),
                rng.random_range(0..=setup.load.max_value),
            )],
        };
        let invoked_at = setup.clock.elapsed();
        let answer = match kind {
            SetKind::Import => setup.tally.import(&targets, &reason).await,
            SetKind::Reset => setup.tally.reset_counter(&targets[0].0, &reason).await,
            SetKind::Set => {
                setup
                    .tally
                    .set_counter(&targets[0].0, targets[0].1, &reason)
                    .await
            }
        };
        let answered_at = setup.clock.elapsed();
        *report.tally.requests.entry(kind.label()).or_default() += 1;
        let sets = targets.len() as u64;
        let mut outcome_of = |counter: &str| match &answer {
            SetAnswer::Acknowledged { audit_ids } => match audit_ids.get(counter) {
                Some(audit_id) => SetOutcome::Acknowledged {
                    acked_at: answered_at,
                    audit_id: audit_id.clone(),
                },
                None => {
                    // The 202 is the acknowledgement; without its audit_id the trail cannot be
                    // held to it, so it may count or not.
                    *report
                        .tally
                        .unexpected
                        .entry(format!("202 without an audit_id on a {}", kind.label()))
                        .or_default() += 1;
                    SetOutcome::Indeterminate
                }
            },
            SetAnswer::Indeterminate { .. } => SetOutcome::Indeterminate,
            SetAnswer::Failed { .. } => SetOutcome::Failed,
        };
        for (counter, value) in &targets {
            let outcome = outcome_of(counter);
            report.sets.push(SetRecord {
                counter: counter.clone(),
                value: *value,
                reason: reason.clone(),
                invoked_at,
                outcome,
            });
        }
        match &answer {
            SetAnswer::Acknowledged { .. } => report.tally.acknowledged += sets,
            SetAnswer::Indeterminate { unexpected, .. } => {
                report.tally.indeterminate += sets;
                if let Some(unexpected) = unexpected {
                    *report
                        .tally
                        .unexpected
                        .entry(format!("{unexpected} on a {}", kind.label()))
                        .or_default() += 1;
                }
            }
            SetAnswer::Failed { unexpected, .. } => {
                report.tally.failed += sets;
                if let Some(unexpected) = unexpected {
                    *report
                        .tally
                        .unexpected
                        .entry(format!("{unexpected} on a {}", kind.label()))
                        .or_default() += 1;
                }
            }
        }
    }
    report
}

/// The whole audit trail, newest first, page by page through `next_before`.
pub async fn read_audit_trail(tally: &TallyClient) -> anyhow::Result<(Vec<AuditRow>, usize)> {
    let mut rows = Vec::new();
    let mut before = None;
    let mut pages = 0usize;
    loop {
        let page = tally
            .audit_page(AUDIT_PAGE_SIZE, before)
            .await
            .with_context(|| format!("reading page {} of the audit trail", pages + 1))?;
        pages += 1;
        if let (Some(last), Some(next)) = (rows.last(), page.entries.first()) {
            let (last, next): (&AuditRow, &AuditRow) = (last, next);
            anyhow::ensure!(
                next.seq < last.seq,
                "the audit trail's page {pages} starts at seq {} after seq {}: not newest first",
                next.seq,
                last.seq
            );
        }
        rows.extend(page.entries);
        match page.next_before {
            Some(next) => before = Some(next),
            None => return Ok((rows, pages)),
        }
    }
}

/// One counter's audit rows held to its set requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MatchedSets {
    /// The applied sets in `seq` order, each with its request's times.
    pub applied: Vec<AppliedSet>,
    pub violations: Vec<Violation>,
}

/// Matches one counter's audit rows (any order) with the set requests made for it, by reason:
/// every acknowledged set exactly once with its `audit_id` and value, every indeterminate one at
/// most once, nothing else at all.
pub fn match_sets(counter: &str, requests: &[SetRecord], rows: &[AuditRow]) -> MatchedSets {
    let mut matched = MatchedSets::default();
    let by_reason: HashMap<&str, &SetRecord> = requests
        .iter()
        .filter(|request| request.counter == counter)
        .map(|request| (request.reason.as_str(), request))
        .collect();
    let mut rows: Vec<&AuditRow> = rows.iter().filter(|row| row.counter == counter).collect();
    rows.sort_by_key(|row| row.seq);
    let mut times_applied: HashMap<&str, usize> = HashMap::new();
    for row in rows {
        let request = by_reason
            .get(row.reason.as_str())
            .filter(|request| request.outcome != SetOutcome::Failed);
        let Some(request) = request else {
            matched.violations.push(Violation::SetNotRequested {
                counter: counter.to_owned(),
                seq: row.seq,
                reason: row.reason.clone(),
            });
            continue;
        };
        *times_applied.entry(request.reason.as_str()).or_default() += 1;
        if row.new_value != request.value {
            matched.violations.push(Violation::SetNotAsRequested {
                counter: counter.to_owned(),
                seq: row.seq,
                detail: format!(
                    "new_value {} but the request set {}",
                    row.new_value, request.value
                ),
            });
        }
        if let SetOutcome::Acknowledged { audit_id, .. } = &request.outcome {
            if *audit_id != row.audit_id {
                matched.violations.push(Violation::SetNotAsRequested {
                    counter: counter.to_owned(),
                    seq: row.seq,
                    detail: format!(
                        "audit_id {} but the request's 202 said {audit_id}",
                        row.audit_id
                    ),
                });
            }
        }
        matched.applied.push(AppliedSet {
            seq: row.seq,
            old_value: row.old_value,
            new_value: row.new_value,
            invoked_at: request.invoked_at,
            acked_at: request.acked_at(),
        });
    }
    for request in by_reason.values() {
        let times = times_applied
            .get(request.reason.as_str())
            .copied()
            .unwrap_or(0);
        if times > 1 {
            matched.violations.push(Violation::SetAppliedTwice {
                counter: counter.to_owned(),
                reason: request.reason.clone(),
                times,
            });
        }
        if let SetOutcome::Acknowledged { acked_at, audit_id } = &request.outcome {
            if times == 0 {
                matched
                    .violations
                    .push(Violation::AcknowledgedSetNotApplied {
                        counter: counter.to_owned(),
                        audit_id: audit_id.clone(),
                        acked_at: *acked_at,
                    });
            }
        }
    }
    matched
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn request(reason: &str, value: i64, invoked_ms: u64, outcome: SetOutcome) -> SetRecord {
        SetRecord {
            counter: "c".into(),
            value,
            reason: reason.into(),
            invoked_at: at(invoked_ms),
            outcome,
        }
    }

    fn acked(audit_id: &str, acked_ms: u64) -> SetOutcome {
        SetOutcome::Acknowledged {
            acked_at: at(acked_ms),
            audit_id: audit_id.into(),
        }
    }

    fn row(seq: i64, audit_id: &str, reason: &str, old_value: i64, new_value: i64) -> AuditRow {
        AuditRow {
            seq,
            audit_id: audit_id.into(),
            counter: "c".into(),
            reason: reason.into(),
            old_value,
            new_value,
        }
    }

    #[test]
    fn rows_are_matched_by_reason_and_ordered_by_seq() {
        let requests = [
            request("r1", 10, 100, acked("a1", 150)),
            request("r2", 0, 200, SetOutcome::Indeterminate),
            request("r3", 7, 300, SetOutcome::Indeterminate),
        ];
        // Newest first, as the trail lists them; r3 never landed.
        let rows = [row(9, "a2", "r2", 14, 0), row(4, "a1", "r1", 3, 10)];
        let matched = match_sets("c", &requests, &rows);
        assert_eq!(matched.violations, vec![]);
        assert_eq!(
            matched.applied,
            vec![
                AppliedSet {
                    seq: 4,
                    old_value: 3,
                    new_value: 10,
                    invoked_at: at(100),
                    acked_at: Some(at(150)),
                },
                AppliedSet {
                    seq: 9,
                    old_value: 14,
                    new_value: 0,
                    invoked_at: at(200),
                    acked_at: None,
                },
            ]
        );
    }

    #[test]
    fn a_missing_acknowledged_set_a_double_and_a_stranger_are_violations() {
        let requests = [
            request("r1", 10, 100, acked("a1", 150)),
            request("r2", 0, 200, SetOutcome::Indeterminate),
            request("r3", 5, 300, SetOutcome::Failed),
        ];
        let rows = [
            row(2, "x", "r2", 1, 0),
            row(3, "y", "r2", 4, 0),
            row(5, "z", "r3", 4, 5),
            row(6, "w", "someone else", 5, 8),
        ];
        let matched = match_sets("c", &requests, &rows);
        assert!(
            matched
                .violations
                .contains(&Violation::AcknowledgedSetNotApplied {
                    counter: "c".into(),
                    audit_id: "a1".into(),
                    acked_at: at(150),
                })
        );
        assert!(matched.violations.contains(&Violation::SetAppliedTwice {
            counter: "c".into(),
            reason: "r2".into(),
            times: 2,
        }));
        for (seq, reason) in [(5, "r3"), (6, "someone else")] {
            assert!(matched.violations.contains(&Violation::SetNotRequested {
                counter: "c".into(),
                seq,
                reason: reason.into(),
            }));
        }
        assert_eq!(matched.violations.len(), 4);
    }

    #[test]
    fn a_row_must_carry_the_requested_value_and_audit_id() {
        let requests = [request("r1", 10, 100, acked("a1", 150))];
        let matched = match_sets("c", &requests, &[row(1, "a9", "r1", 0, 11)]);
        assert_eq!(matched.violations.len(), 2, "{:?}", matched.violations);
    }
}
