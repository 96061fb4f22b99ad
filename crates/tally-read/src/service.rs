//! Where a counter is read: the in-process cache, then Redis, then PostgreSQL.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared, join_all};
use redis::aio::ConnectionManager;
use serde::Serialize;
use sqlx::PgPool;
use tally_core::CounterName;
use tally_infra::clock::now_ms;
use tally_infra::config::{AggregatorConfig, PipelineConfig, ReadConfig, StoreConfig};
use tally_mirror::{KeySpace, Mirror, PartitionGenerations, RedisView, Untrusted};
use tracing::{debug, warn};

use crate::metrics;

/// How long a read reuses what it learned about the closed windows and the Redis server. An
/// older closed window only makes a read look at more windows, never at wrong ones.
const REDIS_VIEW_REUSE: Duration = Duration::from_millis(250);

/// How long a read trusts its view of PostgreSQL's generations. A bucket that lost writes is
/// found once the generations it lost are in the view: within this long of the loss, at once
/// when the Redis server changed, and by the aggregator's next commit in any case.
const GENERATIONS_REUSE: Duration = Duration::from_secs(1);

/// How long a read waits for PostgreSQL's generations before it reads Redis without them.
const GENERATIONS_PATIENCE: Duration = Duration::from_secs(1);

/// Where a value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// This process's read cache (at most the cache TTL old).
    Cache,
    /// Redis: PostgreSQL's totals plus the open windows' deltas.
    Redis,
    /// PostgreSQL alone, because Redis was unreachable or could not be trusted for this counter.
    /// It lags by the increments not yet aggregated, so it is flagged stale.
    Postgres,
}

/// One counter's value.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct CounterValue {
    pub counter: String,
    pub value: i64,
    pub source: Source,
    /// True when the value may lag acknowledged increments by more than the usual second.
    pub stale: bool,
    /// When the value was read from its source, RFC 3339.
    pub as_of: String,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ReadError {
    #[error("neither redis nor postgres could be read: {0}")]
    StoresUnavailable(String),
}

type SharedRead = Shared<BoxFuture<'static, Result<CounterValue, ReadError>>>;

/// PostgreSQL's view of the partitions, and the Redis server it was taken for.
struct GenerationsView {
    read_at: Instant,
    server_run_id: String,
    generations: BTreeMap<i32, PartitionGenerations>,
}

pub struct ReadService {
    redis: ConnectionManager,
    pool: PgPool,
    mirror: Mirror,
    group: String,
    topic: String,
    cache_ttl: Duration,
    pub(crate) max_names: usize,
    /// A value being fetched or fetched less than the TTL ago, per name. Concurrent reads of a
    /// name share the entry, so a hammered name costs one fetch per TTL per process.
    cache: moka::sync::Cache<CounterName, SharedRead>,
    /// std Mutexes: held only to copy or replace the value, never across an await.
    redis_view: Mutex<Option<(Instant, RedisView)>>,
    generations: Mutex<Option<GenerationsView>>,
    /// tokio's Mutex: one read at a time asks PostgreSQL for the generations, and the reads
    /// behind it wait for that view rather than trusting Redis without one.
    generations_refresh: tokio::sync::Mutex<()>,
}

impl ReadService {
    pub fn new(
        redis: ConnectionManager,
        pool: PgPool,
        store: &StoreConfig,
        pipeline: &PipelineConfig,
        aggregator: &AggregatorConfig,
        config: &ReadConfig,
    ) -> Self {
        let cache_ttl = Duration::from_millis(config.read_cache_ttl_ms);
        Self {
            redis,
            pool,
            mirror: Mirror::new(
                KeySpace::new(store.redis_prefix.clone()),
                pipeline.window_spec(),
                pipeline.delta_ttl_ms(),
            ),
            group: aggregator.aggregator_group.clone(),
            topic: store.kafka_topic.clone(),
            cache_ttl,
            max_names: config.read_max_names,
            cache: moka::sync::Cache::builder()
                .max_capacity(config.read_cache_capacity as u64)
                .time_to_live(cache_ttl.max(Duration::from_millis(1)))
                .build(),
            redis_view: Mutex::new(None),
            generations: Mutex::new(None),
            generations_refresh: tokio::sync::Mutex::new(()),
        }
    }

    /// Reads counters, in the order asked. Concurrent reads of a name share one fetch, and a
    /// fetched value is reused for the cache TTL, so a hammered name costs the stores at most one
    /// fetch per TTL per process; the names a read misses are fetched together. `fresh` skips
    /// the cache.
    pub async fn read(
        self: &Arc<Self>,
        names: Vec<CounterName>,
        fresh: bool,
    ) -> Result<Vec<CounterValue>, ReadError> {
        if fresh || self.cache_ttl.is_zero() {
            return self.fetch(&names).await;
        }
        let mut reads: Vec<Option<(SharedRead, bool)>> =
            names.iter().map(|name| self.cached(name)).collect();
        let mut missing: Vec<CounterName> = names
            .iter()
            .zip(&reads)
            .filter(|(_, read)| read.is_none())
            .map(|(name, _)| name.clone())
            .collect();
        if !missing.is_empty() {
            missing.sort();
            missing.dedup();
            let service = Arc::clone(self);
            let batch_names = missing.clone();
            let batch = async move { service.fetch(&batch_names).await }
                .boxed()
                .shared();
            let mut ours: HashMap<CounterName, (SharedRead, bool)> = HashMap::new();
            for (position, name) in missing.into_iter().enumerate() {
                let read = batch
                    .clone()
                    .map(move |values| values.map(|values| values[position].clone()))
                    .boxed()
                    .shared();
                // Another read may have inserted the name since we looked: share its fetch.
                let entry = self.cache.entry(name.clone()).or_insert(read);
                ours.insert(name, (entry.value().clone(), !entry.is_fresh()));
            }
            for (read, name) in reads.iter_mut().zip(&names) {
                if read.is_none() {
                    *read = ours.get(name).cloned();
                }
            }
        }
        let reads: Vec<(SharedRead, bool)> = reads
            .into_iter()
            .map(|read| read.expect("every name has a read by now"))
            .collect();
        let outcomes = join_all(reads.iter().map(|(read, _)| read.clone())).await;
        let mut values = Vec::with_capacity(outcomes.len());
        for (outcome, (_, from_cache)) in outcomes.into_iter().zip(&reads) {
            match outcome {
                Ok(mut value) => {
                    if *from_cache {
                        value.source = Source::Cache;
                        metrics::VALUES_SERVED.with_label_values(&["cache"]).inc();
                    }
                    values.push(value);
                }
                Err(error) => {
                    // Never keep a failure: the next read tries the stores again. Every name of
                    // this read shares the failed fetch (or one as young), so none is kept.
                    for name in &names {
                        self.cache.invalidate(name);
                    }
                    return Err(error);
                }
            }
        }
        Ok(values)
    }

    /// A read of `name` already cached or under way; `true` marks it as served from the cache.
    fn cached(&self, name: &CounterName) -> Option<(SharedRead, bool)> {
        self.cache.get(name).map(|read| (read, true))
    }

    /// Reads from Redis the counters it can be trusted for, and the others from PostgreSQL.
    async fn fetch(&self, names: &[CounterName]) -> Result<Vec<CounterValue>, ReadError> {
        // Per name, the value Redis can be trusted for, if any.
        let from_redis: Vec<Option<i64>> = match self.fetch_from_redis(names).await {
            Ok(Ok(per_name)) => per_name.into_iter().map(Result::ok).collect(),
            Ok(Err(untrusted)) => {
                metrics::POSTGRES_FALLBACKS
                    .with_label_values(&[untrusted.as_label()])
                    .inc_by(names.len() as u64);
                vec![None; names.len()]
            }
            Err(error) => {
                debug!(%error, "redis could not be read");
                metrics::POSTGRES_FALLBACKS
                    .with_label_values(&["unreachable"])
                    .inc_by(names.len() as u64);
                vec![None; names.len()]
            }
        };
        let as_of = now_rfc3339();
        let mut values: Vec<Option<CounterValue>> = Vec::with_capacity(names.len());
        let mut from_postgres: Vec<usize> = Vec::new();
        for (index, (name, outcome)) in names.iter().zip(from_redis).enumerate() {
            match outcome {
                Some(value) => values.push(Some(CounterValue {
                    counter: name.to_string(),
                    value,
                    source: Source::Redis,
                    stale: false,
                    as_of: as_of.clone(),
                })),
                None => {
                    values.push(None);
                    from_postgres.push(index);
                }
            }
        }
        metrics::VALUES_SERVED
            .with_label_values(&["redis"])
            .inc_by((names.len() - from_postgres.len()) as u64);
        if !from_postgres.is_empty() {
            let wanted: Vec<&CounterName> =
                from_postgres.iter().map(|index| &names[*index]).collect();
            let totals = self.fetch_from_postgres(&wanted).await.map_err(|error| {
                warn!(%error, "a read failed on both stores");
                ReadError::StoresUnavailable(format!(
                    "redis could not be used and postgres failed: {error}"
                ))
            })?;
            let as_of = now_rfc3339();
            for index in from_postgres {
                let name = &names[index];
                values[index] = Some(CounterValue {
                    counter: name.to_string(),
                    value: totals.get(name.as_str()).copied().unwrap_or(0),
                    source: Source::Postgres,
                    stale: true,
                    as_of: as_of.clone(),
                });
            }
        }
        Ok(values
            .into_iter()
            .map(|value| value.expect("every name has a value by now"))
            .collect())
    }

    async fn fetch_from_redis(
        &self,
        names: &[CounterName],
    ) -> redis::RedisResult<Result<Vec<Result<i64, Untrusted>>, Untrusted>> {
        let mut redis = self.redis.clone();
        let view = self.redis_view(&mut redis).await?;
        let Some(closed) = view.closed else {
            return Ok(Err(Untrusted::NoClosedWindows));
        };
        let generations = self.generations_for(&view.server_run_id).await;
        let wanted: Vec<&str> = names.iter().map(CounterName::as_str).collect();
        let per_name = match self
            .mirror
            .read_values(&mut redis, &closed, generations.as_ref(), &wanted, now_ms())
            .await?
        {
            Ok(per_name) => per_name,
            Err(untrusted) => return Ok(Err(untrusted)),
        };
        for outcome in &per_name {
            if let Err(untrusted) = outcome {
                metrics::POSTGRES_FALLBACKS
                    .with_label_values(&[untrusted.as_label()])
                    .inc();
            }
        }
        Ok(Ok(per_name))
    }

    async fn redis_view(&self, redis: &mut ConnectionManager) -> redis::RedisResult<RedisView> {
        {
            let cached = self
                .redis_view
                .lock()
                .expect("the redis view lock should never be poisoned");
            if let Some((read_at, view)) = cached.as_ref()
                && read_at.elapsed() < REDIS_VIEW_REUSE
            {
                return Ok(view.clone());
            }
        }
        let view = tally_mirror::read_view(redis, self.mirror.keys()).await?;
        *self
            .redis_view
            .lock()
            .expect("the redis view lock should never be poisoned") =
            Some((Instant::now(), view.clone()));
        Ok(view)
    }

    /// PostgreSQL's generations, read at most [`GENERATIONS_REUSE`] ago and for this Redis
    /// server: a server that changed may hold older data than the view was checked against.
    /// When PostgreSQL does not answer, the last view (if any) is used.
    async fn generations_for(
        &self,
        server_run_id: &str,
    ) -> Option<BTreeMap<i32, PartitionGenerations>> {
        if let Some(current) = self.current_generations(server_run_id) {
            return Some(current);
        }
        let _refreshing = self.generations_refresh.lock().await;
        // Another read may have refreshed it while this one waited.
        if let Some(current) = self.current_generations(server_run_id) {
            return Some(current);
        }
        let query =
            tally_mirror::store::partition_generations(&self.pool, &self.group, &self.topic);
        match tokio::time::timeout(GENERATIONS_PATIENCE, query).await {
            Ok(Ok(partitions)) => {
                let generations: BTreeMap<i32, PartitionGenerations> = partitions
                    .into_iter()
                    .map(|partition| (partition.partition, partition))
                    .collect();
                *self
                    .generations
                    .lock()
                    .expect("the generations lock should never be poisoned") =
                    Some(GenerationsView {
                        read_at: Instant::now(),
                        server_run_id: server_run_id.to_owned(),
                        generations: generations.clone(),
                    });
                Some(generations)
            }
            Ok(Err(error)) => {
                debug!(%error, "could not read the partitions' generations from postgres");
                self.last_generations()
            }
            Err(_) => {
                debug!("postgres did not give the partitions' generations in time");
                self.last_generations()
            }
        }
    }

    fn current_generations(
        &self,
        server_run_id: &str,
    ) -> Option<BTreeMap<i32, PartitionGenerations>> {
        let view = self
            .generations
            .lock()
            .expect("the generations lock should never be poisoned");
        view.as_ref()
            .filter(|view| {
                view.server_run_id == server_run_id && view.read_at.elapsed() < GENERATIONS_REUSE
            })
            .map(|view| view.generations.clone())
    }

    fn last_generations(&self) -> Option<BTreeMap<i32, PartitionGenerations>> {
        self.generations
            .lock()
            .expect("the generations lock should never be poisoned")
            .as_ref()
            .map(|view| view.generations.clone())
    }

    async fn fetch_from_postgres(
        &self,
        names: &[&CounterName],
    ) -> Result<HashMap<String, i64>, sqlx::Error> {
        let wanted: Vec<&str> = names.iter().map(|name| name.as_str()).collect();
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT name, total FROM counters WHERE name = ANY($1)")
                .bind(&wanted)
                .fetch_all(&self.pool)
                .await?;
        metrics::VALUES_SERVED
            .with_label_values(&["postgres"])
            .inc_by(names.len() as u64);
        Ok(rows.into_iter().collect())
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
