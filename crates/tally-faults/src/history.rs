//! What one scenario saw: every increment with its outcome, every read with its value, and the
//! faults the runner injected, each with when it started and ended.
//!
//! Times are offsets from the moment the scenario's load started (one monotonic clock for the
//! whole scenario), so the checker can compare them directly.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// How a group of clients treats an increment whose outcome it does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClientMode {
    /// No idempotency key, one attempt per increment. An indeterminate increment stays
    /// indeterminate, so the checker only knows it counted zero times or once.
    SingleAttempt,
    /// Every increment carries an `Idempotency-Key` and is retried with the same key until Tally
    /// acknowledges it, so the final value must equal the exact sum of every intended increment.
    RetryWithSameKey,
    /// Every operation sends two requests with one fresh `Idempotency-Key` at the same moment:
    /// for two counters, for two amounts of one counter, or the same increment twice. Each use is
    /// sent once; the checker holds every `202` that was not a duplicate to exactly one count.
    ConcurrentKeyReuse,
}

impl ClientMode {
    /// Every mode runs in every scenario. The key-reuse mode too: racing claims matter most
    /// when a fault hits the claim's own path (Redis paused or lost, so both racing uses may be
    /// acknowledged and must then both count; Kafka slow, so the first use stays in flight and
    /// the second gets `409`), and its counters cost the checker nothing extra.
    pub const ALL: [ClientMode; 3] = [
        ClientMode::SingleAttempt,
        ClientMode::RetryWithSameKey,
        ClientMode::ConcurrentKeyReuse,
    ];

    /// The prefix of the counter names this mode's clients use.
    pub fn counter_prefix(self) -> &'static str {
        match self {
            ClientMode::SingleAttempt => "single-attempt",
            ClientMode::RetryWithSameKey => "retry-same-key",
            ClientMode::ConcurrentKeyReuse => "key-reuse",
        }
    }
}

impl fmt::Display for ClientMode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.counter_prefix())
    }
}

/// What finally became of one intended increment (over all its attempts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncrementOutcome {
    /// Tally answered `202` at `acked_at`: it must be counted exactly once.
    Acknowledged { acked_at: Duration },
    /// Tally answered `4xx`, or the request was never sent (connection refused): it must not be
    /// counted at all.
    Failed,
    /// `503`, another `5xx`, a timeout or a connection lost after sending: it may count once or
    /// not at all, never twice.
    Indeterminate,
}

/// One intended increment of one counter. For a retried increment, `invoked_at` is when its
/// first attempt was sent and the outcome is the best any attempt reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncrementRecord {
    pub counter: String,
    /// Always positive in the checked workload, so every bound only ever grows.
    pub by: i64,
    pub invoked_at: Duration,
    pub outcome: IncrementOutcome,
}

impl IncrementRecord {
    pub fn acked_at(&self) -> Option<Duration> {
        match self.outcome {
            IncrementOutcome::Acknowledged { acked_at } => Some(acked_at),
            _ => None,
        }
    }

    /// Whether this increment may be part of a value: acknowledged or indeterminate.
    pub fn may_count(&self) -> bool {
        !matches!(self.outcome, IncrementOutcome::Failed)
    }
}

/// One successful `GET /v1/counters/{name}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRecord {
    pub counter: String,
    pub invoked_at: Duration,
    pub completed_at: Duration,
    pub value: i64,
    /// `cache`, `redis` or `postgres`.
    pub source: String,
    /// `true` when Tally says the value comes from PostgreSQL and lags the increments not yet
    /// aggregated.
    pub stale: bool,
    /// Whether the read asked for `?fresh=true` (skip the in-process cache).
    pub fresh: bool,
}

/// What became of one counter's set (a set, a reset, or one item of an import).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetOutcome {
    /// `202` at `acked_at`: Kafka has the set record, so it must be applied exactly once, and
    /// its `audit_id` must be in the audit trail exactly once.
    Acknowledged {
        acked_at: Duration,
        audit_id: String,
    },
    /// `503`, another `5xx`, a timeout, a connection lost after sending: applied once or never.
    Indeterminate,
    /// A `4xx`, or never sent: it must never be applied.
    Failed,
}

/// One set of one counter, as the set client asked for it. Every request carries a reason of
/// its own, so each audit row can be traced back to the request that made it, even when the
/// request's answer (with its `audit_id`) never came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetRecord {
    pub counter: String,
    pub value: i64,
    /// Unique per request (an import's items share it, one per counter).
    pub reason: String,
    pub invoked_at: Duration,
    pub outcome: SetOutcome,
}

impl SetRecord {
    pub fn acked_at(&self) -> Option<Duration> {
        match self.outcome {
            SetOutcome::Acknowledged { acked_at, .. } => Some(acked_at),
            _ => None,
        }
    }
}

/// A set the audit trail says was applied, with the request that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedSet {
    /// The trail's order: the order the sets were applied, which is their order in the log.
    pub seq: i64,
    /// The counter's value right before the set, in log order.
    pub old_value: i64,
    pub new_value: i64,
    pub invoked_at: Duration,
    /// `None` when the request was indeterminate: the record may have reached the log any time
    /// after `invoked_at`.
    pub acked_at: Option<Duration>,
}

/// The faults the runner injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// `kill -9` an aggregator process, then start it again.
    KillAggregator,
    /// Stop the Kafka broker (SIGTERM, controlled shutdown), then start it again.
    RestartKafka,
    /// Stop Redis and start it again empty (the local Redis keeps nothing on disk).
    RestartRedisEmpty,
    /// Stop PostgreSQL (fast shutdown), then start it again.
    RestartPostgres,
    /// SIGTERM the ingest and read process under load, wait for its clean exit, start it again.
    SigtermIngest,
    /// `kill -9` the ingest and read process under load (increments Kafka acknowledged but the
    /// client never heard of are indeterminate and landed), start it again.
    KillIngest,
    /// SIGSTOP an aggregator process, then SIGCONT it.
    PauseAggregator,
    /// SIGSTOP Redis, then SIGCONT it.
    PauseRedis,
    /// SIGSTOP the Kafka broker past the produce timeout, then SIGCONT it: the broker appends
    /// records the producer already gave up on (`503`s that land, after their window closed).
    PauseKafka,
    /// `SAVE` Redis, keep the load going, then `kill -9` it and start it again from that older
    /// snapshot: everything written since the `SAVE` (deltas, summaries, closed windows,
    /// idempotency claims) silently goes back in time, while the meta hash is still there.
    RestartRedisFromSnapshot,
    /// Fill Redis past a `maxmemory` limit under `allkeys-lru` so it evicts keys, Tally's among
    /// them, and delete every key of a few counters now and then, as an eviction of exactly
    /// those keys would; then lift the limit.
    EvictRedisKeys,
    /// `FLUSHALL`, start `tally replay`, and `FLUSHALL` again while the replay runs.
    FlushRedisDuringReplay,
}

impl FaultKind {
    /// Faults during which the aggregator may commit nothing to PostgreSQL, so a value read from
    /// PostgreSQL may lag by the length of the fault plus the aggregator's recovery.
    ///
    /// The Redis faults are here too: after each commit the aggregator copies summaries to Redis,
    /// and a Redis that does not answer may hold it up; a Redis emptied or flushed also has the
    /// aggregator rewrite every summary and run its own replay. These leave the aggregation
    /// alone:
    /// - the ingest faults;
    /// - the restart from a snapshot. Its record spans the whole snapshot age (everything written
    ///   since the `SAVE` is lost), but Redis is down only for the moment between the `kill -9`
    ///   and `up.sh`, and a killed Redis refuses connections at once instead of hanging. Crediting
    ///   the snapshot age as a stall would let a read show the snapshot's values unchecked, which
    ///   is the very thing the fault is there to catch.
    /// - the eviction. Redis answers throughout (`allkeys-lru` makes room for every write), so
    ///   the aggregator commits as usual; a summary it finds evicted it rewrites from PostgreSQL
    ///   after the commit. Crediting the eviction as a stall would excuse a read that lost an
    ///   evicted summary's whole total for most of the scenario.
    pub fn stalls_aggregation(self) -> bool {
        !matches!(
            self,
            FaultKind::SigtermIngest
                | FaultKind::KillIngest
                | FaultKind::RestartRedisFromSnapshot
                | FaultKind::EvictRedisKeys
        )
    }

    /// Faults during which Redis can lose deltas of acknowledged increments: the ingest's
    /// `INCRBY` after the Kafka ack fails (Tally still answers `202`), or the delta is written and
    /// lost afterwards (evicted, flushed, or written after the snapshot Redis comes back from).
    /// Tally documents that reads then miss the increment until its window closes and the
    /// aggregator has committed it (README, "If Redis fails in step 3").
    pub fn may_drop_redis_deltas(self) -> bool {
        matches!(
            self,
            FaultKind::RestartRedisEmpty
                | FaultKind::PauseRedis
                | FaultKind::RestartRedisFromSnapshot
                | FaultKind::EvictRedisKeys
                | FaultKind::FlushRedisDuringReplay
        )
    }

    /// Faults that can also lose deltas written *before* they began, with nothing in Redis to
    /// say so at once: an evicted delta key leaves no trace, unlike a restart or a flush, which
    /// take the meta hash with them (so Tally knows at once that Redis lost its data). The
    /// checker extends the delta-loss allowance back over the time a delta still matters to
    /// reads. (A restart from a snapshot needs no such reach: its record begins at the `SAVE`,
    /// and everything before the `SAVE` is in the snapshot.)
    pub fn may_drop_redis_deltas_written_before_it(self) -> bool {
        matches!(self, FaultKind::EvictRedisKeys)
    }

    /// Faults that restart, pause or change a server of the suite's stack (Kafka, Redis,
    /// PostgreSQL). Every scenario running at the time would feel them, so a scenario with one
    /// runs alone.
    pub fn hits_a_stack_server(self) -> bool {
        matches!(
            self,
            FaultKind::RestartKafka
                | FaultKind::RestartRedisEmpty
                | FaultKind::RestartPostgres
                | FaultKind::PauseRedis
                | FaultKind::PauseKafka
                | FaultKind::RestartRedisFromSnapshot
                | FaultKind::EvictRedisKeys
                | FaultKind::FlushRedisDuringReplay
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillAggregator => "kill -9 aggregator",
            FaultKind::RestartKafka => "restart kafka",
            FaultKind::RestartRedisEmpty => "restart redis empty",
            FaultKind::RestartPostgres => "restart postgres",
            FaultKind::SigtermIngest => "sigterm ingest",
            FaultKind::KillIngest => "kill -9 ingest",
            FaultKind::PauseAggregator => "pause aggregator",
            FaultKind::PauseRedis => "pause redis",
            FaultKind::PauseKafka => "pause kafka",
            FaultKind::RestartRedisFromSnapshot => "restart redis from snapshot",
            FaultKind::EvictRedisKeys => "evict redis keys",
            FaultKind::FlushRedisDuringReplay => "flush redis during replay",
        }
    }
}

/// One injected fault: from the moment it began to the moment the runner had undone it (the
/// process restarted, the server up again, the process continued).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRecord {
    pub kind: FaultKind,
    pub started_at: Duration,
    pub healed_at: Duration,
}

/// Counts of increment attempts, for the report. A batch attempt counts once per item.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptTally {
    pub attempts: u64,
    pub acknowledged: u64,
    pub failed: u64,
    pub indeterminate: u64,
    /// `202` answers that said `"duplicate": true`: a retry Tally recognised and counted once.
    pub duplicates_absorbed: u64,
    /// `409` `/problems/idempotency-key-in-flight`: another use of the key was in flight, nothing
    /// was counted. Also counted in `failed`.
    pub key_in_flight: u64,
    /// `422` `/problems/idempotency-key-reused`: the key was first used for another counter or
    /// amount, nothing was counted. Also counted in `failed`.
    pub key_reused: u64,
    /// Answers our valid requests should never get (`500`, a `4xx`, a duplicate on a first
    /// attempt), by description.
    pub unexpected: BTreeMap<String, u64>,
    /// The key-reuse mode: how each pair of racing uses was answered, by description (for
    /// example `two counters: 202 new + 409`), so the report shows the race was really run.
    pub pair_answers: BTreeMap<String, u64>,
}

impl AttemptTally {
    pub fn merge(&mut self, other: &AttemptTally) {
        self.attempts += other.attempts;
        self.acknowledged += other.acknowledged;
        self.failed += other.failed;
        self.indeterminate += other.indeterminate;
        self.duplicates_absorbed += other.duplicates_absorbed;
        self.key_in_flight += other.key_in_flight;
        self.key_reused += other.key_reused;
        for (what, count) in &other.unexpected {
            *self.unexpected.entry(what.clone()).or_default() += count;
        }
        for (what, count) in &other.pair_answers {
            *self.pair_answers.entry(what.clone()).or_default() += count;
        }
    }

    pub fn note_unexpected(&mut self, what: impl Into<String>, items: u64) {
        *self.unexpected.entry(what.into()).or_default() += items;
    }
}

/// Formats an offset from the start of the load as seconds, e.g. `3.214s`.
pub fn seconds(offset: Duration) -> String {
    format!("{:.3}s", offset.as_secs_f64())
}
