//! Strict counters in PostgreSQL: creation, reads, and the writes, group-committed per counter.
//!
//! Every write to one counter takes its row lock, so a hot counter can commit no faster than
//! one transaction per WAL flush. To go past that, the writes of one counter that arrive while
//! its previous transaction is running wait, and then go together in the next one: the row is
//! locked once, [`rules::decide`] answers each of them in arrival order exactly as if each had
//! its own transaction, and one statement writes the row and the new idempotency keys. A
//! request answers only after the transaction holding it committed.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tally_core::CounterName;
use tally_infra::config::PipelineConfig;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics;
use crate::rules::{self, Attempt, CounterState, Decision, KeyUse, Limits, Operation, Outcome};

/// Most writes one transaction carries; the rest wait for the next.
const MAX_BATCH_OPERATIONS: usize = 512;
/// Most writes that may wait for one counter: past this, a write is refused at once (`503`)
/// instead of queueing for longer than any client waits.
const MAX_WAITING_OPERATIONS: usize = 20_000;

/// How often a batch is decided again after another request took one of its idempotency keys
/// for another counter at the same moment; each retry sees that key, so one is nearly always
/// enough.
const KEY_RACE_ATTEMPTS: usize = 3;

/// How often expired idempotency keys are pruned, and how many at most per statement.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
const PRUNE_BATCH: i64 = 10_000;

/// A counter's definition: what `PUT /v1/strict/{name}` sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Definition {
    pub initial_value: i64,
    pub limits: Limits,
}

/// A counter as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StrictCounter {
    pub definition: Definition,
    pub state: CounterState,
}

/// What a `PUT` did.
#[derive(Debug)]
pub enum Creation {
    Created(StrictCounter),
    /// The counter already had exactly this definition.
    AlreadyDefined(StrictCounter),
    /// The counter exists with another definition.
    DefinedOtherwise(StrictCounter),
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum StrictError {
    #[error("no strict counter has this name; create it with PUT first")]
    NotFound,
    /// `public` is what the client is told; `reason`, PostgreSQL's own words, goes to the log
    /// only (it may name tables, constraints or hosts).
    #[error("{public}")]
    Unavailable {
        public: &'static str,
        reason: String,
    },
    /// Nothing was written.
    #[error("too many writes of this counter are waiting for postgres; nothing was written")]
    Overloaded,
}

impl StrictError {
    fn unavailable(public: &'static str, reason: impl Into<String>) -> Self {
        StrictError::Unavailable {
            public,
            reason: reason.into(),
        }
    }
}

impl From<sqlx::Error> for StrictError {
    fn from(error: sqlx::Error) -> Self {
        let public = match &error {
            sqlx::Error::PoolTimedOut => {
                "postgres gave no connection in time; nothing is known to be written"
            }
            sqlx::Error::Database(database) => match database.code().as_deref() {
                // lock_not_available: the row stayed locked past the lock timeout.
                Some("55P03") => {
                    "the counter stayed locked by other writes past the lock timeout; nothing was written"
                }
                // query_canceled: the statement timeout.
                Some("57014") => {
                    "postgres did not finish the write within the statement timeout; nothing was written"
                }
                _ => "postgres refused the write; nothing was written",
            },
            _ => "postgres could not be reached; the write may or may not have happened",
        };
        StrictError::unavailable(public, error.to_string())
    }
}

type Reply = Result<Decision, StrictError>;

struct PendingWrite {
    operation: Operation,
    reply_tx: oneshot::Sender<Reply>,
}

pub struct StrictService {
    pool: PgPool,
    idempotency_window_secs: u64,
    /// The writes waiting for each counter whose transaction is running. A counter is in the
    /// map exactly while its writer task runs; std's Mutex, as no await happens under it.
    waiting: Mutex<HashMap<String, Vec<PendingWrite>>>,
}

impl StrictService {
    pub fn new(pool: PgPool, pipeline: &PipelineConfig) -> Self {
        Self {
            pool,
            idempotency_window_secs: pipeline.idempotency_window_secs,
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// Creates the counter, or says how it compares with the existing one.
    pub async fn create(
        &self,
        name: &CounterName,
        definition: Definition,
    ) -> Result<Creation, StrictError> {
        let created: Option<CounterRow> = sqlx::query_as(
            "INSERT INTO strict_counters (name, value, min, max, initial_value, version)
             VALUES ($1, $2, $3, $4, $2, 0)
             ON CONFLICT (name) DO NOTHING
             RETURNING value, min, max, version, initial_value",
        )
        .bind(name.as_str())
        .bind(definition.initial_value)
        .bind(definition.limits.min)
        .bind(definition.limits.max)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = created {
            return Ok(Creation::Created(row.into()));
        }
        // The insert waited for any concurrent creator to commit, so the row is there now.
        let existing = self.get(name).await?;
        if existing.definition == definition {
            Ok(Creation::AlreadyDefined(existing))
        } else {
            Ok(Creation::DefinedOtherwise(existing))
        }
    }

    /// The counter straight from PostgreSQL: every write answered before this read began is
    /// in it.
    pub async fn get(&self, name: &CounterName) -> Result<StrictCounter, StrictError> {
        let row: Option<CounterRow> = sqlx::query_as(
            "SELECT value, min, max, version, initial_value FROM strict_counters WHERE name = $1",
        )
        .bind(name.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(StrictCounter::from).ok_or(StrictError::NotFound)
    }

    /// Applies one add or compare-and-set, together with the other writes of the same counter
    /// waiting at the time, and answers once the transaction committed.
    pub async fn write(
        self: &Arc<Self>,
        name: &CounterName,
        operation: Operation,
    ) -> Result<Decision, StrictError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let pending = PendingWrite {
            operation,
            reply_tx,
        };
        let start_writer = {
            let mut waiting = self.waiting.lock().expect("no code panics holding it");
            match waiting.entry(name.as_str().to_owned()) {
                Entry::Occupied(mut queue) => {
                    // PostgreSQL is slower than the writes to this counter: refuse at once
                    // rather than answer minutes late.
                    if queue.get().len() >= MAX_WAITING_OPERATIONS {
                        return Err(StrictError::Overloaded);
                    }
                    queue.get_mut().push(pending);
                    false
                }
                Entry::Vacant(slot) => {
                    slot.insert(vec![pending]);
                    true
                }
            }
        };
        if start_writer {
            // A task of its own: a client that hangs up must not stop the writes of others.
            tokio::spawn(Arc::clone(self).write_until_idle(name.as_str().to_owned()));
        }
        reply_rx.await.unwrap_or_else(|_| {
            Err(StrictError::unavailable(
                "the counter's writer stopped; the write may or may not have happened",
                "the writer task ended without answering",
            ))
        })
    }

    /// Runs one transaction after another for the counter until nothing waits for it.
    async fn write_until_idle(self: Arc<Self>, name: String) {
        let _leave = LeaveQueueOnPanic {
            service: &self,
            name: &name,
        };
        loop {
            let batch: Vec<PendingWrite> = {
                let mut waiting = self.waiting.lock().expect("no code panics holding it");
                let queue = waiting
                    .get_mut(&name)
                    .expect("a counter stays in the map while its writer runs");
                if queue.is_empty() {
                    waiting.remove(&name);
                    return;
                }
                let taken = queue.len().min(MAX_BATCH_OPERATIONS);
                // A request whose client hung up before its write began is not written: the
                // client saw no answer and may well send it again.
                queue
                    .drain(..taken)
                    .filter(|pending| !pending.reply_tx.is_closed())
                    .collect()
            };
            if batch.is_empty() {
                continue;
            }
            metrics::BATCH_OPERATIONS.observe(batch.len() as f64);
            let operations: Vec<&Operation> =
                batch.iter().map(|pending| &pending.operation).collect();
            let replies: Vec<Reply> = match self.commit_batch(&name, &operations).await {
                Ok(decisions) => decisions.into_iter().map(Ok).collect(),
                Err(error) => {
                    if let StrictError::Unavailable { reason, .. } = &error {
                        warn!(counter.name = %name, batch.size = batch.len(), %reason, "strict counter write failed");
                    }
                    vec![Err(error); batch.len()]
                }
            };
            for (pending, reply) in batch.into_iter().zip(replies) {
                // A client that hung up has no one to answer; its write stands.
                let _ = pending.reply_tx.send(reply);
            }
        }
    }

    async fn commit_batch(
        &self,
        name: &str,
        operations: &[&Operation],
    ) -> Result<Vec<Decision>, StrictError> {
        for _ in 0..KEY_RACE_ATTEMPTS {
            if let Some(decisions) = self.try_commit_batch(name, operations).await? {
                return Ok(decisions);
            }
            debug!(counter.name = %name, "an idempotency key was taken meanwhile; deciding again");
        }
        Err(StrictError::unavailable(
            "idempotency keys of this write kept being taken by concurrent requests; nothing was written",
            format!("gave up after {KEY_RACE_ATTEMPTS} attempts"),
        ))
    }

    /// One transaction: lock the row, read the keys, decide, write. `None` when a new key of
    /// the batch turned out to be taken by a concurrent request for another counter; nothing
    /// was written then.
    async fn try_commit_batch(
        &self,
        name: &str,
        operations: &[&Operation],
    ) -> Result<Option<Vec<Decision>>, StrictError> {
        // The reads below rely on READ COMMITTED (each statement sees what the previous holders
        // of the row lock committed), whatever the database's default.
        let mut transaction = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await?;
        // A lock or a statement that hangs fails the batch, rather than stalling the counter
        // for good.
        sqlx::query(
            "SELECT set_config('lock_timeout', '5s', true),
                    set_config('statement_timeout', '10s', true)",
        )
        .execute(&mut *transaction)
        .await?;
        let row: Option<CounterRow> = sqlx::query_as(
            "SELECT value, min, max, version, initial_value FROM strict_counters
             WHERE name = $1 FOR UPDATE",
        )
        .bind(name)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(row) = row else {
            return Err(StrictError::NotFound);
        };
        let before = StrictCounter::from(row).state;

        // Read after the lock, in a statement of its own: it sees every key committed by the
        // previous holders of the row.
        let keys: Vec<&str> = operations
            .iter()
            .filter_map(|operation| operation.idempotency_key())
            .collect();
        let known_keys = if keys.is_empty() {
            HashMap::new()
        } else {
            let rows: Vec<KeyRow> = sqlx::query_as(
                "SELECT key, counter, by, outcome, value, version, min, max
                 FROM strict_idempotency
                 WHERE key = ANY($1) AND applied_at > now() - make_interval(secs => $2)",
            )
            .bind(&keys)
            .bind(self.idempotency_window_secs as f64)
            .fetch_all(&mut *transaction)
            .await?;
            rows.into_iter().map(KeyRow::into_key_use).collect()
        };

        let mut decided = rules::decide(name, before, operations, &known_keys);
        if decided.state != before || !decided.new_key_uses.is_empty() {
            // Inserted in key order: two batches that take some of the same keys then lock
            // them in the same order, and cannot deadlock each other.
            decided
                .new_key_uses
                .sort_unstable_by(|(left, _), (right, _)| left.cmp(right));
            let new_keys = &decided.new_key_uses;
            let outcomes: Vec<StoredOutcome> = new_keys
                .iter()
                .map(|(_, key_use)| StoredOutcome::of(&key_use.outcome))
                .collect();
            let stored_keys: i64 = sqlx::query_scalar(WRITE_BATCH)
                .bind(name)
                .bind(decided.state.value)
                .bind(decided.state.version)
                .bind(column(new_keys, |(key, _)| key.as_str()))
                .bind(column(new_keys, |(_, key_use)| key_use.by))
                .bind(column(&outcomes, |outcome| outcome.kind))
                .bind(column(&outcomes, |outcome| outcome.value))
                .bind(column(&outcomes, |outcome| outcome.version))
                .bind(column(&outcomes, |outcome| outcome.limits.min))
                .bind(column(&outcomes, |outcome| outcome.limits.max))
                .bind(self.idempotency_window_secs as f64)
                .fetch_one(&mut *transaction)
                .await?;
            if stored_keys != new_keys.len() as i64 {
                transaction.rollback().await?;
                return Ok(None);
            }
        }
        transaction.commit().await?;
        Ok(Some(decided.decisions))
    }

    /// Deletes idempotency keys past the window, oldest first, in bounded batches through the
    /// `applied_at` index. One process at a time: each batch runs only under a
    /// transaction-scoped advisory lock, and a process that does not get it leaves the work to
    /// the one that did.
    pub async fn prune_expired_keys(&self) -> Result<u64, sqlx::Error> {
        let mut pruned = 0;
        loop {
            let mut transaction = self.pool.begin().await?;
            let locked: bool = sqlx::query_scalar(
                "SELECT pg_try_advisory_xact_lock(hashtext('tally: prune strict idempotency keys'))",
            )
            .fetch_one(&mut *transaction)
            .await?;
            if !locked {
                return Ok(pruned);
            }
            let deleted = sqlx::query(
                // The outer condition again: a key renewed by its next use while this runs is
                // re-checked on the row's new version, and kept.
                "DELETE FROM strict_idempotency WHERE key IN (
                     SELECT key FROM strict_idempotency
                     WHERE applied_at <= now() - make_interval(secs => $1)
                     ORDER BY applied_at LIMIT $2)
                 AND applied_at <= now() - make_interval(secs => $1)",
            )
            .bind(self.idempotency_window_secs as f64)
            .bind(PRUNE_BATCH)
            .execute(&mut *transaction)
            .await?
            .rows_affected();
            transaction.commit().await?;
            pruned += deleted;
            if deleted < PRUNE_BATCH as u64 {
                return Ok(pruned);
            }
        }
    }

    /// Prunes expired keys once a minute until `cancel` fires.
    pub async fn prune_expired_keys_periodically(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(PRUNE_INTERVAL) => {}
            }
            match self.prune_expired_keys().await {
                Ok(0) => {}
                Ok(pruned) => debug!(
                    keys.pruned = pruned,
                    "pruned expired strict idempotency keys"
                ),
                Err(error) => {
                    warn!(%error, "pruning strict idempotency keys failed; retrying in a minute")
                }
            }
        }
    }
}

/// Takes a counter out of the map if its writer panics, so the next write starts a new writer
/// instead of waiting forever; the writes that were waiting get `503` as their senders drop.
struct LeaveQueueOnPanic<'a> {
    service: &'a StrictService,
    name: &'a str,
}

impl Drop for LeaveQueueOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut waiting = self
                .service
                .waiting
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            waiting.remove(self.name);
        }
    }
}

/// Writes the row (when it changed) and the batch's new keys in one statement. A new key may
/// replace only a row whose window expired; a live one means another request took the key
/// meanwhile, which the count of stored keys tells the caller.
const WRITE_BATCH: &str = "
WITH counter AS (
    UPDATE strict_counters SET value = $2, version = $3, updated_at = now()
    WHERE name = $1 AND version <> $3
), stored AS (
    INSERT INTO strict_idempotency AS previous
        (key, counter, by, outcome, value, version, min, max, applied_at)
    SELECT key, $1, by, outcome, value, version, min, max, now()
    FROM unnest($4::text[], $5::bigint[], $6::text[], $7::bigint[], $8::bigint[],
                $9::bigint[], $10::bigint[]) AS fresh(key, by, outcome, value, version, min, max)
    ON CONFLICT (key) DO UPDATE SET
        counter = excluded.counter, by = excluded.by, outcome = excluded.outcome,
        value = excluded.value, version = excluded.version, min = excluded.min,
        max = excluded.max, applied_at = excluded.applied_at
    WHERE previous.applied_at <= now() - make_interval(secs => $11)
    RETURNING 1
)
SELECT count(*) FROM stored";

/// One field of every row, as the array `unnest` takes it.
fn column<'r, Row, Field>(rows: &'r [Row], field: impl Fn(&'r Row) -> Field) -> Vec<Field> {
    rows.iter().map(field).collect()
}

#[derive(sqlx::FromRow)]
struct CounterRow {
    value: i64,
    min: Option<i64>,
    max: Option<i64>,
    version: i64,
    initial_value: i64,
}

impl From<CounterRow> for StrictCounter {
    fn from(row: CounterRow) -> Self {
        let limits = Limits {
            min: row.min,
            max: row.max,
        };
        StrictCounter {
            definition: Definition {
                initial_value: row.initial_value,
                limits,
            },
            state: CounterState {
                value: row.value,
                limits,
                version: row.version,
            },
        }
    }
}

/// How a key's first outcome is stored: its kind, and the counter as the outcome left it.
struct StoredOutcome {
    kind: &'static str,
    value: i64,
    version: i64,
    limits: Limits,
}

const APPLIED: &str = "applied";
const LIMIT_REACHED: &str = "limit-reached";

impl StoredOutcome {
    fn of(outcome: &Outcome) -> Self {
        match outcome {
            Outcome::Applied { value, version } => StoredOutcome {
                kind: APPLIED,
                value: *value,
                version: *version,
                limits: Limits {
                    min: None,
                    max: None,
                },
            },
            Outcome::LimitReached {
                value,
                version,
                limits,
                ..
            } => StoredOutcome {
                kind: LIMIT_REACHED,
                value: *value,
                version: *version,
                limits: *limits,
            },
            Outcome::Mismatch { .. } | Outcome::KeyReused { .. } => {
                unreachable!("only adds store their outcome, and an add either applies or not")
            }
        }
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    key: String,
    counter: String,
    by: i64,
    outcome: String,
    value: i64,
    version: i64,
    min: Option<i64>,
    max: Option<i64>,
}

impl KeyRow {
    fn into_key_use(self) -> (String, KeyUse) {
        let outcome = if self.outcome == LIMIT_REACHED {
            Outcome::LimitReached {
                value: self.value,
                version: self.version,
                limits: Limits {
                    min: self.min,
                    max: self.max,
                },
                attempt: Attempt::Add(self.by),
            }
        } else {
            Outcome::Applied {
                value: self.value,
                version: self.version,
            }
        };
        let key_use = KeyUse {
            counter: self.counter,
            by: self.by,
            outcome,
        };
        (self.key, key_use)
    }
}
