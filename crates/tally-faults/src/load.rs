//! The load generator: clients that increment and read a few counters, and record every
//! operation with when it started, when it ended and what it came to.
//!
//! Each client belongs to one [`ClientMode`] and touches only that mode's counters, so the
//! modes run side by side in every scenario and are checked separately.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom as _;
use rand::{Rng as _, SeedableRng as _};

use crate::checker::Violation;
use crate::client::{AttemptResult, BatchItem, TallyClient};
use crate::history::{AttemptTally, ClientMode, IncrementOutcome, IncrementRecord, ReadRecord};
use crate::key_reuse::{UseAnswer, draw_pair, resolve_pair, send_use};

/// How much load, of which kind.
#[derive(Debug, Clone)]
pub struct LoadSettings {
    pub clients_per_mode: usize,
    pub counters_per_mode: usize,
    /// Pause between two operations of one client, drawn uniformly from this range in
    /// milliseconds. It bounds the load so the suite stays gentle on a shared 2-core machine.
    pub think_time_ms: (u64, u64),
    /// The same for the key-reuse mode, whose every increment operation is two requests: a
    /// longer pause keeps its share of the load near the other modes'.
    pub key_reuse_think_time_ms: (u64, u64),
    /// Share of operations that are reads.
    pub read_share: f64,
    /// Share of increments sent as a `POST /v1/increments` batch over several counters.
    pub batch_share: f64,
    /// Increments add `1..=max_by`: positive only, so the checker's bounds only grow.
    pub max_by: i64,
    /// A retrying client gives up on one increment after this long; the checker then reports
    /// it as never acknowledged.
    pub retry_give_up_after: Duration,
}

impl LoadSettings {
    pub fn suite_default() -> Self {
        LoadSettings {
            clients_per_mode: 3,
            counters_per_mode: 3,
            think_time_ms: (5, 25),
            key_reuse_think_time_ms: (20, 50),
            read_share: 0.25,
            batch_share: 0.1,
            max_by: 5,
            retry_give_up_after: Duration::from_secs(60),
        }
    }
}

/// The counters one mode's clients share.
pub fn counter_names(mode: ClientMode, counters_per_mode: usize) -> Vec<String> {
    (0..counters_per_mode)
        .map(|index| format!("{}-{index}", mode.counter_prefix()))
        .collect()
}

/// Everything one client saw.
#[derive(Debug, Clone)]
pub struct ClientReport {
    pub mode: ClientMode,
    pub increments: Vec<IncrementRecord>,
    pub reads: Vec<ReadRecord>,
    pub attempts: AttemptTally,
    /// Failed reads by cause (a read that failed tells nothing about the count).
    pub read_errors: BTreeMap<String, u64>,
    /// Rules an answer broke by itself, whatever the final values (a `"duplicate": true` for a
    /// use unlike the key's other use, a `422` for a retry).
    pub violations: Vec<Violation>,
}

/// One client's fixed inputs.
#[derive(Debug, Clone)]
pub struct ClientSetup {
    pub index: usize,
    pub mode: ClientMode,
    pub tally: TallyClient,
    pub settings: LoadSettings,
    /// The scenario's clock: every recorded time is an offset from it.
    pub clock: Instant,
    /// Set when the load phase is over. A retrying client still finishes the increment it is
    /// retrying, since giving up would leave it unresolved.
    pub stop: Arc<AtomicBool>,
    pub seed: u64,
    /// Makes idempotency keys unique across scenarios and runs.
    pub key_prefix: String,
}

/// Runs one client until `stop` is set and returns what it saw.
pub async fn run_client(setup: ClientSetup) -> ClientReport {
    let mut client = Client {
        rng: StdRng::seed_from_u64(
            setup.seed ^ (setup.index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        ),
        counters: counter_names(setup.mode, setup.settings.counters_per_mode),
        next_key: 0,
        report: ClientReport {
            mode: setup.mode,
            increments: Vec::new(),
            reads: Vec::new(),
            attempts: AttemptTally::default(),
            read_errors: BTreeMap::new(),
            violations: Vec::new(),
        },
        setup,
    };
    let (low, high) = match client.setup.mode {
        ClientMode::ConcurrentKeyReuse => client.setup.settings.key_reuse_think_time_ms,
        ClientMode::SingleAttempt | ClientMode::RetryWithSameKey => {
            client.setup.settings.think_time_ms
        }
    };
    while !client.setup.stop.load(Ordering::Relaxed) {
        client.one_operation().await;
        let pause = client.rng.random_range(low..=high);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    client.report
}

struct Client {
    setup: ClientSetup,
    rng: StdRng,
    counters: Vec<String>,
    next_key: u64,
    report: ClientReport,
}

impl Client {
    fn now(&self) -> Duration {
        self.setup.clock.elapsed()
    }

    async fn one_operation(&mut self) {
        if self.rng.random_bool(self.setup.settings.read_share) {
            self.read().await;
            return;
        }
        if self.setup.mode == ClientMode::ConcurrentKeyReuse {
            self.increment_twice_with_one_key().await;
            return;
        }
        let batch =
            self.counters.len() > 1 && self.rng.random_bool(self.setup.settings.batch_share);
        let counters: Vec<String> = if batch {
            let size = self.rng.random_range(2..=self.counters.len());
            self.counters
                .choose_multiple(&mut self.rng, size)
                .cloned()
                .collect()
        } else {
            vec![
                self.counters
                    .choose(&mut self.rng)
                    .cloned()
                    .unwrap_or_default(),
            ]
        };
        let items: Vec<BatchItem> = counters
            .into_iter()
            .map(|counter| BatchItem {
                counter,
                by: self.rng.random_range(1..=self.setup.settings.max_by),
                idempotency_key: self.new_idempotency_key(),
            })
            .collect();
        self.increment(items).await;
    }

    fn new_idempotency_key(&mut self) -> Option<String> {
        let mode_letter = match self.setup.mode {
            ClientMode::SingleAttempt => return None,
            ClientMode::RetryWithSameKey => 'c',
            ClientMode::ConcurrentKeyReuse => 'r',
        };
        self.next_key += 1;
        Some(format!(
            "{}-{mode_letter}{}-{}",
            self.setup.key_prefix, self.setup.index, self.next_key
        ))
    }

    /// The key-reuse mode's increment: two uses of one fresh key at the same moment, each sent
    /// once (see [`crate::key_reuse`]).
    async fn increment_twice_with_one_key(&mut self) {
        let key = self
            .new_idempotency_key()
            .expect("the key-reuse mode should always have a key");
        let (shape, uses) = draw_pair(&mut self.rng, &self.counters, self.setup.settings.max_by);
        let tally = &self.setup.tally;
        let clock = self.setup.clock;
        let key_str = key.as_str();
        let answer_of = |key_use| async move {
            let result = send_use(tally, key_str, key_use).await;
            UseAnswer {
                result,
                completed_at: clock.elapsed(),
            }
        };
        let invoked_at = self.now();
        let (first, second) = tokio::join!(answer_of(&uses[0]), answer_of(&uses[1]));
        let resolved = resolve_pair(shape, &key, &uses, &[first, second], invoked_at);
        self.report.attempts.merge(&resolved.attempts);
        self.report.increments.extend(resolved.increments);
        self.report.violations.extend(resolved.violations);
    }

    async fn read(&mut self) {
        let counter = self
            .counters
            .choose(&mut self.rng)
            .cloned()
            .unwrap_or_default();
        let fresh = self.rng.random_bool(0.5);
        let invoked_at = self.now();
        match self.setup.tally.read(&counter, fresh).await {
            Ok(read) => {
                let completed_at = self.now();
                self.report.reads.push(ReadRecord {
                    counter,
                    invoked_at,
                    completed_at,
                    value: read.value,
                    source: read.source,
                    stale: read.stale,
                    fresh,
                });
            }
            Err(cause) => *self.report.read_errors.entry(cause).or_default() += 1,
        }
    }

    /// Sends one increment (one item) or one batch, retrying it in the retry mode, and records
    /// one [`IncrementRecord`] per item.
    async fn increment(&mut self, items: Vec<BatchItem>) {
        let item_count = items.len() as u64;
        let invoked_at = self.now();
        let give_up_at = invoked_at + self.setup.settings.retry_give_up_after;
        let retries = self.setup.mode == ClientMode::RetryWithSameKey;
        let mut sent_maybe_counted = false; // an earlier attempt was indeterminate
        let mut attempt_number = 0u32;
        let outcome = loop {
            attempt_number += 1;
            let result = if let [item] = items.as_slice() {
                self.setup
                    .tally
                    .increment(&item.counter, item.by, item.idempotency_key.as_deref())
                    .await
            } else {
                self.setup.tally.increment_batch(&items).await
            };
            let attempts = &mut self.report.attempts;
            attempts.attempts += item_count;
            let pause_before_retry = match result {
                AttemptResult::Acknowledged { duplicates } => {
                    attempts.acknowledged += item_count;
                    attempts.duplicates_absorbed += duplicates;
                    if attempt_number == 1 && duplicates > 0 {
                        // A key never sent before cannot be a duplicate: that increment was
                        // not counted at all.
                        attempts
                            .note_unexpected("\"duplicate\": true on a first attempt", duplicates);
                    }
                    break IncrementOutcome::Acknowledged {
                        acked_at: self.now(),
                    };
                }
                AttemptResult::KeyInFlight { retry_after } => {
                    // An earlier attempt with this key is still in flight (it timed out here but
                    // not yet in Tally). Nothing was counted; the retry mode keeps retrying with
                    // the same key until Tally acknowledges it.
                    attempts.failed += item_count;
                    attempts.key_in_flight += item_count;
                    if attempt_number == 1 {
                        // Every key is fresh: nothing else can hold it.
                        attempts
                            .note_unexpected("409 key in flight on a first attempt", item_count);
                    }
                    if !retries {
                        break outcome_after_refusal(sent_maybe_counted);
                    }
                    retry_after
                        .unwrap_or(Duration::from_millis(200))
                        .min(Duration::from_secs(1))
                }
                AttemptResult::KeyReused { detail } => {
                    // This client never changes a key's counter or amount: every attempt is
                    // exactly the key's first use, so a 422 is wrong. Retrying cannot help.
                    attempts.failed += item_count;
                    attempts.key_reused += item_count;
                    self.report
                        .violations
                        .push(Violation::IdenticalUseRefusedAsReused {
                            counter: items
                                .iter()
                                .map(|item| item.counter.as_str())
                                .collect::<Vec<_>>()
                                .join(","),
                            answered_at: self.setup.clock.elapsed(),
                            detail,
                        });
                    break outcome_after_refusal(sent_maybe_counted);
                }
                AttemptResult::Rejected { status, .. } => {
                    // Every request of the workload is valid, so any other 4xx is worth
                    // reporting.
                    attempts.failed += item_count;
                    attempts.note_unexpected(format!("HTTP {status} on an increment"), item_count);
                    break outcome_after_refusal(sent_maybe_counted);
                }
                AttemptResult::NotSent { .. } => {
                    attempts.failed += item_count;
                    if !retries {
                        break IncrementOutcome::Failed;
                    }
                    // The ingest is down (restarting): try again shortly.
                    Duration::from_millis(200)
                }
                AttemptResult::Indeterminate {
                    unexpected,
                    retry_after,
                    ..
                } => {
                    attempts.indeterminate += item_count;
                    if let Some(unexpected) = unexpected {
                        attempts
                            .note_unexpected(format!("{unexpected} on an increment"), item_count);
                    }
                    sent_maybe_counted = true;
                    if !retries {
                        break IncrementOutcome::Indeterminate;
                    }
                    // Honour Retry-After (Tally sends 1 s) like a well-behaved client would.
                    retry_after
                        .unwrap_or(Duration::from_millis(200))
                        .min(Duration::from_secs(1))
                }
            };
            if self.now() >= give_up_at {
                break outcome_after_refusal(sent_maybe_counted);
            }
            tokio::time::sleep(pause_before_retry).await;
        };
        for item in items {
            self.report.increments.push(IncrementRecord {
                counter: item.counter,
                by: item.by,
                invoked_at,
                outcome,
            });
        }
    }
}

/// What an increment comes to when its last attempt counted nothing: indeterminate if an
/// earlier attempt may have landed, else failed.
fn outcome_after_refusal(sent_maybe_counted: bool) -> IncrementOutcome {
    if sent_maybe_counted {
        IncrementOutcome::Indeterminate
    } else {
        IncrementOutcome::Failed
    }
}
