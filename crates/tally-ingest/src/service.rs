//! Where an increment enters: produce to Kafka, wait for the acknowledgement, then `INCRBY` one
//! of the counter's Redis shard keys. Only then may the caller answer `202`.

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
    CounterName, IncrementRecord, KeySpace, KeyUse, KeyedIncrement, WindowSpec, scripts,
};
use tally_infra::clock::now_ms;
use tally_infra::config::{IngestConfig, PipelineConfig, StoreConfig};
use tracing::{debug, warn};

use crate::group_commit::{self, GroupCommit};
use crate::hot_names::HotNames;
use crate::metrics;

/// One increment as the API received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncrementItem {
    pub name: CounterName,
    pub by: i64,
    pub idempotency_key: Option<String>,
}

/// Increments of one counter that travel as one Kafka record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterIncrements {
    pub name: CounterName,
    pub by: i64,
    pub increments: u32,
    pub keyed: Vec<KeyedIncrement>,
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

/// Built once: building a script hashes its source, which is no work for every record.
static DECLARE_SHARD_COUNT_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(scripts::DECLARE_SHARD_COUNT));

pub struct IngestService {
    producer: FutureProducer,
    redis: ConnectionManager,
    pool: PgPool,
    keys: KeySpace,
    topic: String,
    window: WindowSpec,
    produce_timeout: Duration,
    delta_ttl_secs: u64,
    idempotency_window_secs: u64,
    /// std Mutex: held only for a map update, never across an await.
    hot_names: Mutex<HotNames>,
    group_commit: GroupCommit,
    redis_failure_log: LogThrottle,
    pub(crate) batch_max_items: usize,
}

/// What a request of several records answers, given each record's outcome.
fn request_outcome(outcomes: Vec<Result<(), ProduceError>>) -> Result<(), ProduceError> {
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

impl IngestService {
    pub fn new(
        producer: FutureProducer,
        redis: ConnectionManager,
        pool: PgPool,
        store: &StoreConfig,
        pipeline: &PipelineConfig,
        config: &IngestConfig,
    ) -> Self {
        Self {
            producer,
            redis,
            pool,
            keys: store.key_space(),
            topic: store.kafka_topic.clone(),
            window: pipeline.window_spec(),
            produce_timeout: pipeline.produce_timeout(),
            delta_ttl_secs: pipeline.delta_ttl_secs,
            idempotency_window_secs: pipeline.idempotency_window_secs,
            hot_names: Mutex::new(HotNames::new(config.shard_policy())),
            group_commit: GroupCommit::default(),
            redis_failure_log: LogThrottle::default(),
            batch_max_items: config.batch_max_items,
        }
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Accepts the increments of one request. Returns, per item, whether it was a retry of an
    /// idempotency key already acknowledged (and so not counted again).
    pub async fn accept_items(
        self: &Arc<Self>,
        items: &[IncrementItem],
    ) -> Result<Vec<bool>, IngestError> {
        let mut key_uses = self.known_key_uses(items).await;
        let mut duplicates = vec![false; items.len()];
        let mut records: Vec<CounterIncrements> = Vec::new();
        let mut record_of_counter: HashMap<&CounterName, usize> = HashMap::new();
        for (index, item) in items.iter().enumerate() {
            if let Some(key) = &item.idempotency_key {
                let this_use = KeyUse {
                    counter: item.name.to_string(),
                    by: item.by,
                };
                match key_uses.get(key) {
                    Some(first_use) if *first_use == this_use => {
                        duplicates[index] = true;
                        continue;
                    }
                    Some(first_use) => {
                        return Err(IngestError::KeyReused {
                            index,
                            key: key.clone(),
                            first_use: first_use.clone(),
                        });
                    }
                    None => {
                        key_uses.insert(key.clone(), this_use);
                    }
                }
            }
            let record = *record_of_counter.entry(&item.name).or_insert_with(|| {
                records.push(CounterIncrements {
                    name: item.name.clone(),
                    by: 0,
                    increments: 0,
                    keyed: Vec::new(),
                });
                records.len() - 1
            });
            let record = &mut records[record];
            // At most 10,000 items of at most 10^12 each: the sum fits in i64.
            record.by += item.by;
            record.increments += 1;
            if let Some(key) = &item.idempotency_key {
                record.keyed.push(KeyedIncrement {
                    key: key.clone(),
                    by: item.by,
                });
            }
        }
        if !records.is_empty() {
            self.accept(&records).await?;
        }
        Ok(duplicates)
    }

    /// What the request's idempotency keys were used for, where that is known: Redis answers
    /// for keys acknowledged recently, PostgreSQL for keys already applied. A key neither knows
    /// is new here; if it is in fact in flight, the aggregator still applies it only once.
    async fn known_key_uses(&self, items: &[IncrementItem]) -> HashMap<String, KeyUse> {
        let mut keys: Vec<&str> = items
            .iter()
            .filter_map(|item| item.idempotency_key.as_deref())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let mut known = HashMap::new();
        if keys.is_empty() {
            return known;
        }
        let mut redis = self.redis.clone();
        let redis_keys: Vec<String> = keys.iter().map(|key| self.keys.idempotency(key)).collect();
        match redis::cmd("MGET")
            .arg(&redis_keys)
            .query_async::<Vec<Option<String>>>(&mut redis)
            .await
        {
            Ok(uses) => {
                for (key, encoded) in keys.iter().zip(uses) {
                    if let Some(key_use) = encoded.as_deref().and_then(KeyUse::decode) {
                        known.insert((*key).to_owned(), key_use);
                    }
                }
            }
            Err(error) => debug!(%error, "redis could not say which idempotency keys it knows"),
        }
        let unknown: Vec<&str> = keys
            .into_iter()
            .filter(|key| !known.contains_key(*key))
            .collect();
        if unknown.is_empty() {
            return known;
        }
        let applied: Result<Vec<(String, String, i64)>, sqlx::Error> = sqlx::query_as(
            "SELECT key, counter, by FROM idempotency_keys
             WHERE key = ANY($1) AND applied_at > now() - make_interval(secs => $2)",
        )
        .bind(&unknown)
        .bind(self.idempotency_window_secs as f64)
        .fetch_all(&self.pool)
        .await;
        match applied {
            Ok(rows) => {
                for (key, counter, by) in rows {
                    known.insert(key, KeyUse { counter, by });
                }
            }
            Err(error) => {
                debug!(%error, "postgres could not say which idempotency keys it applied")
            }
        }
        known
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

    /// One record: produce it, wait for the acknowledgement, then `INCRBY`.
    async fn produce_and_count(&self, increments: &CounterIncrements) -> Result<(), ProduceError> {
        let window_start_ms = self.window.start_of(now_ms());
        self.produce(increments, window_start_ms).await?;
        self.add_to_redis(std::slice::from_ref(increments), window_start_ms)
            .await;
        metrics::RECORDS_PRODUCED.inc();
        metrics::INCREMENTS_ACCEPTED.inc_by(increments.increments as u64);
        Ok(())
    }

    /// One record per counter, all in flight together, then one `INCRBY` pipeline for the
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
        let record = FutureRecord::to(&self.topic)
            .key(increments.name.as_str())
            .payload(&payload);
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

    /// One pipelined round trip for the whole batch. A failure here loses nothing: the records
    /// are in Kafka, and reads take the window from PostgreSQL once it closes.
    async fn add_to_redis(&self, batch: &[CounterIncrements], window_start_ms: i64) {
        let now = now_ms();
        let mut pipeline = redis::pipe();
        let mut commands = 0;
        // Pipelined scripts run by EVALSHA only: load the script first, in the same pipeline, in
        // case Redis restarted since the last time.
        let mut script_loaded = false;
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
                    pipeline
                        .set_ex(
                            self.keys.idempotency(&keyed.key),
                            key_use.encode(),
                            self.idempotency_window_secs,
                        )
                        .ignore();
                    commands += 1;
                }
                if counter.by == 0 {
                    continue;
                }
                let choice =
                    hot_names.observe(name, counter.increments as u64, now, window_start_ms);
                metrics::SHARD_COUNT.observe(choice.shard_count as f64);
                if choice.declare {
                    if !script_loaded {
                        pipeline
                            .cmd("SCRIPT")
                            .arg("LOAD")
                            .arg(scripts::DECLARE_SHARD_COUNT)
                            .ignore();
                        script_loaded = true;
                    }
                    let mut invocation = DECLARE_SHARD_COUNT_SCRIPT
                        .key(self.keys.shard_count(name, window_start_ms));
                    invocation.arg(choice.shard_count).arg(self.delta_ttl_secs);
                    pipeline.invoke_script(&invocation).ignore();
                }
                let shard = random.random_range(0..choice.shard_count);
                let key = self.keys.delta(name, window_start_ms, shard);
                pipeline.incr(&key, counter.by).ignore();
                pipeline.expire(&key, self.delta_ttl_secs as i64).ignore();
                commands += 1;
            }
        }
        if commands == 0 {
            return;
        }
        let mut redis = self.redis.clone();
        if let Err(error) = pipeline.query_async::<()>(&mut redis).await {
            metrics::REDIS_FAILURES.inc_by(commands);
            // While Redis is down every request fails here: say so once in a while, not per
            // request; the metric counts them all.
            if self.redis_failure_log.should_log(now) {
                warn!(%error, batch.size = commands, "redis incrby failed; reads catch up when the window closes");
            } else {
                debug!(%error, "redis incrby failed");
            }
        }
    }
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
}
