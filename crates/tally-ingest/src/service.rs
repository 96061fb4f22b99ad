//! Where an increment enters: claim its idempotency key, produce to Kafka, wait for the
//! acknowledgement, then add it to the Redis mirror's deltas. Only then may the caller answer
//! `202`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use rand::Rng as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tally_core::{
    CounterName, IncrementRecord, KeyUse, KeyedIncrement, SetAudit, SetRecord, WindowSpec,
};
use tally_infra::clock::now_ms;
use tally_infra::config::{IngestConfig, PipelineConfig, StoreConfig};
use tally_mirror::{DeltaPipeline, DeltaWriter, KeySpace, PendingSets};
use tracing::{debug, warn};

use crate::group_commit::{self, GroupCommit};
use crate::hot_names::HotNames;
use crate::idempotency::{ClaimedKey, KeyClaims, KeyState};
use crate::metrics;
use crate::record::request_outcome;
pub use crate::record::{CounterIncrements, ProduceError};

/// One increment as the API received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncrementItem {
    pub name: CounterName,
    pub by: i64,
    pub idempotency_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Unavailable(#[from] ProduceError),
    /// An idempotency key came back with another counter or amount than it was first used for.
    #[error(
        "the idempotency key `{key}` was first used for counter `{}` with by {}; a retry must send the same counter and amount",
        first_use.counter, first_use.by
    )]
    KeyReused {
        index: usize,
        key: String,
        first_use: KeyUse,
    },
    /// Another request with the same idempotency key is being produced right now.
    #[error(
        "a request with the idempotency key `{key}` is in flight; retry once it has been answered"
    )]
    KeyInFlight { index: usize, key: String },
}

pub struct IngestService {
    producer: FutureProducer,
    redis: ConnectionManager,
    pool: PgPool,
    topic: String,
    window: WindowSpec,
    produce_timeout: Duration,
    idempotency_window_secs: u64,
    deltas: DeltaWriter,
    pending_sets: PendingSets,
    claims: KeyClaims,
    /// std Mutex: held only for a map update, never across an await.
    hot_names: Mutex<HotNames>,
    group_commit: GroupCommit,
    redis_failure_log: LogThrottle,
    pub(crate) batch_max_items: usize,
}

/// Lets one log line through per interval.
#[derive(Default)]
struct LogThrottle {
    last_logged_ms: std::sync::atomic::AtomicI64,
}

impl LogThrottle {
    const INTERVAL_MS: i64 = 10_000;

    fn should_log(&self, now_ms: i64) -> bool {
        use std::sync::atomic::Ordering;
        let last = self.last_logged_ms.load(Ordering::Relaxed);
        now_ms - last >= Self::INTERVAL_MS
            && self
                .last_logged_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Who asked for a set, and why: what the audit trail keeps.
#[derive(Clone, Debug)]
pub struct SetRequest {
    pub actor: String,
    pub client: String,
    pub reason: String,
    /// Makes a retry of the same set (same counter and value) apply once.
    pub idempotency_key: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetError {
    /// Nothing was produced.
    #[error("could not mark the sets in flight in redis ({0}); nothing was set")]
    MarkFailed(redis::RedisError),
    #[error(transparent)]
    Produce(#[from] ProduceError),
}

/// A set's audit id: the aggregator applies each id once. With an idempotency key it is derived
/// from the key, the counter and the value, so a retry of the same set is the same set; without
/// one, every request is a set of its own.
fn set_audit_id(idempotency_key: Option<&str>, name: &CounterName, value: i64) -> String {
    use md5::{Digest as _, Md5};
    match idempotency_key {
        None => format!("{:032x}", rand::rng().random::<u128>()),
        Some(key) => {
            let mut digest = Md5::new();
            for part in [
                key.as_bytes(),
                name.as_str().as_bytes(),
                &value.to_be_bytes(),
            ] {
                digest.update((part.len() as u64).to_be_bytes());
                digest.update(part);
            }
            let hex: String = digest
                .finalize()
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect();
            format!("k{hex}")
        }
    }
}

/// What a request's idempotency keys came to before anything is produced.
struct KeyCheck<'a> {
    /// Per item: a retry of a use already acknowledged (or of an earlier item of the request).
    duplicates: Vec<bool>,
    /// Per item: another copy of its keyed increment may reach Kafka too. Its key could not be
    /// claimed (Redis did not answer), or an earlier attempt with it may have been written.
    may_be_duplicated: Vec<bool>,
    /// The keys this request claimed, with their uses: to acknowledge or release.
    claimed: Vec<ClaimedKey<'a>>,
}

impl IngestService {
    pub fn new(
        producer: FutureProducer,
        redis: ConnectionManager,
        pool: PgPool,
        store: &StoreConfig,
        pipeline: &PipelineConfig,
        config: &IngestConfig,
    ) -> Self {
        // A claim outlives the longest a request can take: waiting in group commit behind the
        // counter's records in flight, then its own produce, each up to the produce timeout
        // plus the delivery report's trip back. It only expires under a request that died (or
        // one stuck behind far more keyed increments than fit in one record).
        let produce_at_most = pipeline.produce_timeout() + Duration::from_secs(1);
        let claim_ttl = produce_at_most * (crate::group_commit::MAX_RECORDS_IN_FLIGHT as u32 + 1)
            + Duration::from_secs(2);
        Self {
            producer,
            redis,
            pool,
            topic: store.kafka_topic.clone(),
            window: pipeline.window_spec(),
            produce_timeout: pipeline.produce_timeout(),
            idempotency_window_secs: pipeline.idempotency_window_secs,
            pending_sets: PendingSets::new(KeySpace::new(store.redis_prefix.clone())),
            deltas: DeltaWriter::new(
                KeySpace::new(store.redis_prefix.clone()),
                pipeline.delta_ttl_secs,
            ),
            claims: KeyClaims::new(
                &store.redis_prefix,
                claim_ttl,
                Duration::from_secs(pipeline.idempotency_window_secs),
            ),
            hot_names: Mutex::new(HotNames::new(config.shard_policy())),
            group_commit: GroupCommit::default(),
            redis_failure_log: LogThrottle::default(),
            batch_max_items: config.batch_max_items,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Accepts the increments of one request. Returns, per item, whether it was a retry of an
    /// idempotency key already acknowledged (and so not counted again). Nothing is produced when
    /// a key is reused for another increment or is in flight.
    pub async fn accept_items(
        self: &Arc<Self>,
        items: &[IncrementItem],
    ) -> Result<Vec<bool>, IngestError> {
        let token = format!("{:016x}", rand::rng().random::<u64>());
        let check = self.check_keys(items, &token).await?;
        let mut records: Vec<CounterIncrements> = Vec::new();
        // The record each counter's next increment joins, while it has room.
        let mut open_record: HashMap<&CounterName, usize> = HashMap::new();
        for ((item, duplicate), may_be_duplicated) in items
            .iter()
            .zip(&check.duplicates)
            .zip(&check.may_be_duplicated)
        {
            if *duplicate {
                continue;
            }
            let mut increment = CounterIncrements::empty(item.name.clone());
            increment.by = item.by;
            increment.increments = 1;
            increment.may_be_duplicated = *may_be_duplicated;
            if let Some(key) = &item.idempotency_key {
                increment.keyed.push(KeyedIncrement {
                    key: key.clone(),
                    by: item.by,
                });
            }
            match open_record.get(&item.name) {
                Some(index) if records[*index].has_room_for(&increment) => {
                    records[*index].absorb(&increment);
                }
                _ => {
                    open_record.insert(&item.name, records.len());
                    records.push(increment);
                }
            }
        }
        if !records.is_empty()
            && let Err(error) = self.accept(&records).await
        {
            self.claims
                .release(&self.redis, &token, &check.claimed, error.may_be_written())
                .await;
            return Err(error.into());
        }
        Ok(check.duplicates)
    }

    /// Claims the request's keys in Redis, then asks PostgreSQL about the ones Redis did not
    /// know. Returns an error (and has released every claim) when a key is reused for another
    /// increment or is in flight.
    async fn check_keys<'a>(
        &self,
        items: &'a [IncrementItem],
        token: &str,
    ) -> Result<KeyCheck<'a>, IngestError> {
        let mut duplicates = vec![false; items.len()];
        // Each key's first item in the request, and its use: the others must repeat it.
        let mut first_items: Vec<(&'a str, usize, KeyUse)> = Vec::new();
        let mut first_item_of_key: HashMap<&'a str, usize> = HashMap::new();
        for (index, item) in items.iter().enumerate() {
            let Some(key) = item.idempotency_key.as_deref() else {
                continue;
            };
            let this_use = KeyUse {
                counter: item.name.to_string(),
                by: item.by,
            };
            match first_item_of_key.get(key) {
                Some(first) if first_items[*first].2 == this_use => duplicates[index] = true,
                Some(first) => {
                    return Err(IngestError::KeyReused {
                        index,
                        key: key.to_owned(),
                        first_use: first_items[*first].2.clone(),
                    });
                }
                None => {
                    first_item_of_key.insert(key, first_items.len());
                    first_items.push((key, index, this_use));
                }
            }
        }
        let mut check = KeyCheck {
            duplicates,
            may_be_duplicated: vec![false; items.len()],
            claimed: Vec::new(),
        };
        if first_items.is_empty() {
            return Ok(check);
        }
        let uses: Vec<(&'a str, KeyUse)> = first_items
            .iter()
            .map(|(key, _, key_use)| (*key, key_use.clone()))
            .collect();
        let states = self.claims.claim(&self.redis, token, &uses).await;
        let mut refusal = None;
        let mut ask_postgres: Vec<usize> = Vec::new();
        for (position, state) in states.into_iter().enumerate() {
            let (key, index, this_use) = &first_items[position];
            match state {
                KeyState::Claimed { earlier_copy } => {
                    check.claimed.push(ClaimedKey {
                        key,
                        key_use: this_use.clone(),
                        earlier_copy,
                    });
                    check.may_be_duplicated[*index] = earlier_copy;
                    ask_postgres.push(position);
                }
                KeyState::Unknown => {
                    check.may_be_duplicated[*index] = true;
                    ask_postgres.push(position);
                }
                KeyState::Acknowledged(first_use) if first_use == *this_use => {
                    check.duplicates[*index] = true;
                }
                KeyState::Acknowledged(first_use) => {
                    refusal.get_or_insert(IngestError::KeyReused {
                        index: *index,
                        key: (*key).to_owned(),
                        first_use,
                    });
                }
                KeyState::InFlight(_) => {
                    refusal.get_or_insert(IngestError::KeyInFlight {
                        index: *index,
                        key: (*key).to_owned(),
                    });
                }
            }
        }
        if refusal.is_none() && !ask_postgres.is_empty() {
            let keys: Vec<&str> = ask_postgres
                .iter()
                .map(|position| first_items[*position].0)
                .collect();
            let applied = self.applied_uses(&keys).await;
            let mut known = redis::pipe();
            let mut script_loaded = false;
            for position in ask_postgres {
                let (key, index, this_use) = &first_items[position];
                let Some(uses) = applied.get(*key) else {
                    continue;
                };
                if uses.contains(this_use) {
                    check.duplicates[*index] = true;
                    self.claims
                        .acknowledge(&mut known, &mut script_loaded, key, this_use);
                } else {
                    refusal.get_or_insert(IngestError::KeyReused {
                        index: *index,
                        key: (*key).to_owned(),
                        first_use: uses[0].clone(),
                    });
                }
            }
            if refusal.is_none() {
                // PostgreSQL's answer, kept where the next retry looks first.
                let mut redis = self.redis.clone();
                let _ = known.query_async::<()>(&mut redis).await;
                check
                    .claimed
                    .retain(|claimed| !applied.contains_key(claimed.key));
            }
        }
        if let Some(refusal) = refusal {
            // Nothing was produced: each key goes back as it was found.
            self.claims
                .release(&self.redis, token, &check.claimed, false)
                .await;
            return Err(refusal);
        }
        Ok(check)
    }

    /// The uses PostgreSQL knows the aggregator applied, per key, within the idempotency window.
    /// A key neither Redis nor PostgreSQL knows is new here; if it is in fact in flight without a
    /// claim (Redis was unreachable), the aggregator still applies each use once.
    async fn applied_uses(&self, keys: &[&str]) -> HashMap<String, Vec<KeyUse>> {
        let applied: Result<Vec<(String, String, i64)>, sqlx::Error> = sqlx::query_as(
            "SELECT key, counter, by FROM idempotency_keys
             WHERE key = ANY($1) AND applied_at > now() - make_interval(secs => $2)
             ORDER BY applied_at",
        )
        .bind(keys)
        .bind(self.idempotency_window_secs as f64)
        .fetch_all(&self.pool)
        .await;
        let mut uses: HashMap<String, Vec<KeyUse>> = HashMap::new();
        match applied {
            Ok(rows) => {
                for (key, counter, by) in rows {
                    uses.entry(key).or_default().push(KeyUse { counter, by });
                }
            }
            Err(error) => {
                debug!(%error, "postgres could not say which idempotency keys it applied")
            }
        }
        uses
    }

    /// Makes the increments durable in Kafka, then adds them to Redis. Returns once the records
    /// holding them are acknowledged; on error none of them may be reported as accepted.
    ///
    /// One counter's increments join its group commit, where concurrent requests share records.
    /// Several counters' increments are a batch already: all their records are produced at once
    /// and the batch takes one Redis round trip, instead of one task and one round trip per
    /// counter.
    pub async fn accept(self: &Arc<Self>, batch: &[CounterIncrements]) -> Result<(), ProduceError> {
        if batch.len() > 1 {
            // A task of its own, as group commit's are: a client that hangs up must not stop the
            // Redis step after Kafka acknowledged.
            let this = Arc::clone(self);
            let batch = batch.to_vec();
            return tokio::spawn(async move { this.produce_batch_and_count(&batch).await })
                .await
                .unwrap_or(Err(ProduceError::Timeout(self.produce_timeout)));
        }
        let outcomes = join_all(batch.iter().map(|increments| {
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            if self.group_commit.enqueue(increments.clone(), done_tx) {
                tokio::spawn(Arc::clone(self).produce_groups(increments.name.clone()));
            }
            done_rx
        }))
        .await;
        for outcome in outcomes {
            // A closed channel means the producing task died: the record may or may not exist.
            outcome.unwrap_or(Err(ProduceError::Timeout(self.produce_timeout)))?;
        }
        Ok(())
    }

    /// Produces one counter's groups, one record at a time, until nothing waits.
    async fn produce_groups(self: Arc<Self>, name: CounterName) {
        // If this task ends any other way than by running out of work, the counter's queue must
        // not stay behind: later increments would wait for a task that no longer exists.
        struct AbandonOnUnwind<'a>(&'a GroupCommit, &'a CounterName, bool);
        impl Drop for AbandonOnUnwind<'_> {
            fn drop(&mut self) {
                if !self.2 {
                    self.0.abandon(self.1);
                }
            }
        }
        let mut guard = AbandonOnUnwind(&self.group_commit, &name, false);
        while let Some(group) = self.group_commit.next_group(&name) {
            let merged = group_commit::merge(&group);
            let outcome = self.produce_and_count(&merged).await;
            for (_, done_tx) in group {
                let _ = done_tx.send(outcome.clone());
            }
        }
        guard.2 = true;
    }

    /// One record: produce it, wait for the acknowledgement, then add it to Redis.
    async fn produce_and_count(&self, increments: &CounterIncrements) -> Result<(), ProduceError> {
        let window_start_ms = self.window.start_of(now_ms());
        self.produce(increments, window_start_ms).await?;
        self.add_to_redis(std::slice::from_ref(increments), window_start_ms)
            .await;
        metrics::RECORDS_PRODUCED.inc();
        metrics::INCREMENTS_ACCEPTED.inc_by(increments.increments as u64);
        Ok(())
    }

    /// One record per counter, all in flight together, then one Redis pipeline for the
    /// acknowledged ones. If any record failed, the whole request answers 503: its increments
    /// are indeterminate, as a single increment's are.
    async fn produce_batch_and_count(
        &self,
        batch: &[CounterIncrements],
    ) -> Result<(), ProduceError> {
        let window_start_ms = self.window.start_of(now_ms());
        let sent = batch
            .iter()
            .map(|increments| self.send(increments, window_start_ms))
            .collect();
        let outcomes = self.await_deliveries(sent).await;
        let partly_acknowledged: Vec<CounterIncrements>;
        let acknowledged = if outcomes.iter().all(Result::is_ok) {
            batch
        } else {
            partly_acknowledged = batch
                .iter()
                .zip(&outcomes)
                .filter(|(_, outcome)| outcome.is_ok())
                .map(|(increments, _)| increments.clone())
                .collect();
            &partly_acknowledged
        };
        self.add_to_redis(acknowledged, window_start_ms).await;
        metrics::RECORDS_PRODUCED.inc_by(acknowledged.len() as u64);
        metrics::INCREMENTS_ACCEPTED.inc_by(
            acknowledged
                .iter()
                .map(|increments| u64::from(increments.increments))
                .sum(),
        );
        request_outcome(outcomes)
    }

    async fn produce(
        &self,
        increments: &CounterIncrements,
        window_start_ms: i64,
    ) -> Result<(), ProduceError> {
        let sent = self.send(increments, window_start_ms);
        let mut outcomes = self.await_deliveries(vec![sent]).await;
        outcomes.pop().expect("one outcome per record")
    }

    /// Produces one set record per counter, each with its own audit id, and waits for Kafka
    /// to acknowledge them all. A set goes through its counter's partition like an increment,
    /// so it lands in order with the increments around it; the aggregator applies it.
    ///
    /// First the sets are marked in flight in the Redis mirror, so no read shows a value from
    /// before them as fresh while they travel: without the mark, nothing is produced.
    pub async fn set_counters(
        &self,
        sets: &[(CounterName, i64)],
        request: &SetRequest,
    ) -> Result<Vec<String>, SetError> {
        let now = now_ms();
        let window_start_ms = self.window.start_of(now);
        let names: Vec<&str> = sets.iter().map(|(name, _)| name.as_str()).collect();
        let mut redis = self.redis.clone();
        self.pending_sets
            .mark(&mut redis, &names, window_start_ms)
            .await
            .map_err(SetError::MarkFailed)?;
        let mut audit_ids = Vec::with_capacity(sets.len());
        let mut sent = Vec::with_capacity(sets.len());
        for (name, value) in sets {
            let audit = SetAudit {
                id: set_audit_id(request.idempotency_key.as_deref(), name, *value),
                actor: request.actor.clone(),
                client: request.client.clone(),
                reason: request.reason.clone(),
                requested_at_ms: now,
            };
            audit_ids.push(audit.id.clone());
            let payload = SetRecord::new(window_start_ms, *value, audit).encode();
            sent.push(self.send_payload(name, &payload));
        }
        let outcomes = self.await_deliveries(sent).await;
        metrics::SETS_ACCEPTED
            .inc_by(outcomes.iter().filter(|outcome| outcome.is_ok()).count() as u64);
        // A set that never left this process will never be applied: take it off its mark.
        // Any other failure may still land, and its mark stays until its window closes.
        let never_sent: Vec<&str> = names
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| matches!(outcome, Err(ProduceError::QueueFull)))
            .map(|(name, _)| *name)
            .collect();
        if let Err(error) = self.pending_sets.unmark(&mut redis, &never_sent).await {
            debug!(%error, "could not unmark sets that were never sent; their marks last until their window closes");
        }
        request_outcome(outcomes)?;
        Ok(audit_ids)
    }

    /// Hands one counter's record to the producer, which sends it in the background.
    fn send(
        &self,
        increments: &CounterIncrements,
        window_start_ms: i64,
    ) -> Result<DeliveryFuture, ProduceError> {
        let payload = IncrementRecord::new(
            window_start_ms,
            increments.by,
            increments.increments,
            increments.keyed.clone(),
        )
        .encode();
        self.send_payload(&increments.name, &payload)
    }

    fn send_payload(
        &self,
        name: &CounterName,
        payload: &[u8],
    ) -> Result<DeliveryFuture, ProduceError> {
        let record = FutureRecord::to(&self.topic)
            .key(name.as_str())
            .payload(payload);
        self.producer.send_result(record).map_err(|(error, _)| {
            if let KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) = error {
                metrics::KAFKA_FAILURES
                    .with_label_values(&["queue_full"])
                    .inc();
                return ProduceError::QueueFull;
            }
            metrics::KAFKA_FAILURES
                .with_label_values(&["rejected"])
                .inc();
            ProduceError::Rejected(error)
        })
    }

    /// Waits for records sent together, under one deadline for all of them: one timer per
    /// request, not per record. Outcomes that arrived before the deadline are kept.
    async fn await_deliveries(
        &self,
        sent: Vec<Result<DeliveryFuture, ProduceError>>,
    ) -> Vec<Result<(), ProduceError>> {
        let started = Instant::now();
        let mut outcomes: Vec<Option<Result<(), ProduceError>>> = vec![None; sent.len()];
        let mut deliveries: FuturesUnordered<_> = sent
            .into_iter()
            .enumerate()
            .map(|(index, sent)| async move {
                let outcome = match sent {
                    Ok(delivery) => self.delivery_outcome(delivery.await, started),
                    Err(error) => Err(error),
                };
                (index, outcome)
            })
            .collect();
        // The producer itself gives up at the same deadline (message.timeout.ms) and reports it
        // as MessageTimedOut; the extra second only covers the report's trip back to this task.
        let deadline = tokio::time::sleep(self.produce_timeout + Duration::from_secs(1));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                delivered = deliveries.next() => match delivered {
                    Some((index, outcome)) => outcomes[index] = Some(outcome),
                    None => break,
                },
                () = &mut deadline => break,
            }
        }
        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| {
                    metrics::KAFKA_FAILURES
                        .with_label_values(&["timeout"])
                        .inc();
                    Err(ProduceError::Timeout(self.produce_timeout))
                })
            })
            .collect()
    }

    /// `delivery` is what a [`DeliveryFuture`] resolves to; its outer error means the producer
    /// dropped the record's report channel.
    fn delivery_outcome<T, M, Dropped>(
        &self,
        delivery: Result<Result<T, (KafkaError, M)>, Dropped>,
        started: Instant,
    ) -> Result<(), ProduceError> {
        match delivery {
            Ok(Ok(_)) => {
                metrics::KAFKA_ACK_SECONDS.observe(started.elapsed().as_secs_f64());
                Ok(())
            }
            Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _))) => {
                metrics::KAFKA_FAILURES
                    .with_label_values(&["timeout"])
                    .inc();
                Err(ProduceError::Timeout(self.produce_timeout))
            }
            Ok(Err((error, _))) => {
                metrics::KAFKA_FAILURES
                    .with_label_values(&["rejected"])
                    .inc();
                Err(ProduceError::Rejected(error))
            }
            Err(_canceled) => {
                metrics::KAFKA_FAILURES
                    .with_label_values(&["canceled"])
                    .inc();
                Err(ProduceError::Timeout(self.produce_timeout))
            }
        }
    }

    /// One pipelined round trip for the whole batch: the deltas, and the acknowledged uses of
    /// its idempotency keys. A failure here loses nothing: the records are in Kafka, and reads
    /// take the window from PostgreSQL once it is applied.
    async fn add_to_redis(&self, batch: &[CounterIncrements], window_start_ms: i64) {
        let now = now_ms();
        let mut pipeline = DeltaPipeline::new();
        let mut acknowledge_loaded = false;
        let mut commands = 0;
        // Shard counts declared in this pipeline, confirmed once Redis took it.
        let mut declarations: Vec<(&str, u32)> = Vec::new();
        {
            let mut hot_names = self
                .hot_names
                .lock()
                .expect("the hot names lock should never be poisoned");
            let mut random = rand::rng();
            for counter in batch {
                let name = counter.name.as_str();
                for keyed in &counter.keyed {
                    let key_use = KeyUse {
                        counter: name.to_owned(),
                        by: keyed.by,
                    };
                    self.claims.acknowledge(
                        &mut pipeline.pipeline,
                        &mut acknowledge_loaded,
                        &keyed.key,
                        &key_use,
                    );
                    commands += 1;
                }
                if counter.by == 0 || counter.may_be_duplicated {
                    continue;
                }
                let choice =
                    hot_names.observe(name, counter.increments as u64, now, window_start_ms);
                metrics::SHARD_COUNT.observe(choice.shard_count as f64);
                if choice.declare {
                    self.deltas.declare_shard_count(
                        &mut pipeline,
                        name,
                        window_start_ms,
                        choice.shard_count,
                    );
                    declarations.push((name, choice.shard_count));
                }
                let shard = random.random_range(0..choice.shard_count);
                commands +=
                    self.deltas
                        .add(&mut pipeline, name, window_start_ms, shard, counter.by);
            }
        }
        if commands == 0 {
            return;
        }
        let mut redis = self.redis.clone();
        match pipeline.pipeline.query_async::<()>(&mut redis).await {
            Ok(()) => {
                let mut hot_names = self
                    .hot_names
                    .lock()
                    .expect("the hot names lock should never be poisoned");
                for (name, shard_count) in declarations {
                    hot_names.declared(name, window_start_ms, shard_count);
                }
            }
            Err(error) => {
                metrics::REDIS_FAILURES.inc_by(commands);
                // While Redis is down every request fails here: say so once in a while, not per
                // request; the metric counts them all.
                if self.redis_failure_log.should_log(now) {
                    warn!(%error, batch.size = commands, "redis did not take the deltas; reads catch up when the window is applied");
                } else {
                    debug!(%error, "redis did not take the deltas");
                }
            }
        }
    }
}
