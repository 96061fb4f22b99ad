//! Where a counter is read: the in-process cache, then Redis, then PostgreSQL.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
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
use tally_mirror::{ClosedWindows, KeySpace, Mirror, Untrusted};
use tracing::{debug, warn};

use crate::metrics;

/// How long a read reuses what it learned about the closed windows. An older closed window only
/// makes a read look at more windows, never at wrong ones.
const CLOSED_WINDOWS_REUSE: Duration = Duration::from_millis(250);

/// How often PostgreSQL's mirrored generations are read again. A bucket that lost writes is
/// found once the generation it lost is in this view: within this long of the loss, or at once
/// by the aggregator's next commit, whichever comes first.
const MIRRORED_REFRESH: Duration = Duration::from_secs(1);

/// How long a read waits for the first view of the mirrored generations before it reads Redis
/// without it (PostgreSQL may be down; the aggregators still find lost writes).
const MIRRORED_FIRST_LOAD: Duration = Duration::from_secs(1);

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

/// PostgreSQL's mirrored generation per partition, as last read.
#[derive(Default)]
struct MirroredView {
    generations: Mutex<Option<(Instant, BTreeMap<i32, i64>)>>,
    refreshing: AtomicBool,
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
    /// std Mutex: held only to copy or replace the value, never across an await.
    closed_windows: Mutex<Option<(Instant, ClosedWindows)>>,
    mirrored: Arc<MirroredView>,
    /// The Redis connection id the mirrored view was last checked against. tokio's Mutex: a
    /// read that finds the connection new holds it while it reads PostgreSQL, so the reads behind
    /// it wait for that view instead of trusting the new server without one.
    checked_connection: tokio::sync::Mutex<Option<i64>>,
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
            closed_windows: Mutex::new(None),
            mirrored: Arc::default(),
            checked_connection: tokio::sync::Mutex::new(None),
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
        for ((outcome, (_, from_cache)), name) in outcomes.into_iter().zip(&reads).zip(&names) {
            match outcome {
                Ok(mut value) => {
                    if *from_cache {
                        value.source = Source::Cache;
                        metrics::VALUES_SERVED.with_label_values(&["cache"]).inc();
                    }
                    values.push(value);
                }
                Err(error) => {
                    // Never keep a failure: the next read tries the stores again.
                    self.cache.invalidate(name);
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
        let Some(closed) = self.closed_windows(&mut redis).await? else {
            return Ok(Err(Untrusted::NoClosedWindows));
        };
        let mirrored = self.mirrored_generations().await;
        let wanted: Vec<&str> = names.iter().map(CounterName::as_str).collect();
        let mut read = self
            .mirror
            .read_values(&mut redis, &closed, mirrored.as_ref(), &wanted, now_ms())
            .await?;
        if read.values.is_ok() && !self.connection_checked(read.connection_id).await {
            // A new connection may lead to a Redis that restarted from an older snapshot, or
            // a replica that missed the last writes: only a view of the mirrored generations
            // taken now can tell. Read again against it.
            let mirrored = self.refresh_mirrored_now(read.connection_id).await;
            read = self
                .mirror
                .read_values(&mut redis, &closed, mirrored.as_ref(), &wanted, now_ms())
                .await?;
        }
        let per_name = match read.values {
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

    async fn closed_windows(
        &self,
        redis: &mut ConnectionManager,
    ) -> redis::RedisResult<Option<ClosedWindows>> {
        {
            let cached = self
                .closed_windows
                .lock()
                .expect("the closed windows lock should never be poisoned");
            if let Some((read_at, closed)) = cached.as_ref()
                && read_at.elapsed() < CLOSED_WINDOWS_REUSE
            {
                return Ok(Some(closed.clone()));
            }
        }
        let closed = tally_mirror::read_closed_windows(redis, self.mirror.keys()).await?;
        if let Some(closed) = &closed {
            *self
                .closed_windows
                .lock()
                .expect("the closed windows lock should never be poisoned") =
                Some((Instant::now(), closed.clone()));
        }
        Ok(closed)
    }

    /// PostgreSQL's mirrored generations, as recently as [`MIRRORED_REFRESH`]. The first read
    /// waits for them briefly; later ones use what is there and refresh it in the background.
    async fn mirrored_generations(&self) -> Option<BTreeMap<i32, i64>> {
        let current = self
            .mirrored
            .generations
            .lock()
            .expect("the mirrored view lock should never be poisoned")
            .clone();
        match current {
            Some((read_at, generations)) => {
                if read_at.elapsed() >= MIRRORED_REFRESH
                    && !self.mirrored.refreshing.swap(true, Ordering::AcqRel)
                {
                    let view = Arc::clone(&self.mirrored);
                    let (pool, group, topic) =
                        (self.pool.clone(), self.group.clone(), self.topic.clone());
                    tokio::spawn(async move {
                        refresh_mirrored(&view, &pool, &group, &topic).await;
                        view.refreshing.store(false, Ordering::Release);
                    });
                }
                Some(generations)
            }
            None => {
                let first = refresh_mirrored(&self.mirrored, &self.pool, &self.group, &self.topic);
                let _ = tokio::time::timeout(MIRRORED_FIRST_LOAD, first).await;
                self.mirrored
                    .generations
                    .lock()
                    .expect("the mirrored view lock should never be poisoned")
                    .as_ref()
                    .map(|(_, generations)| generations.clone())
            }
        }
    }

    /// Whether the mirrored view was checked against this Redis connection already.
    async fn connection_checked(&self, connection_id: i64) -> bool {
        *self.checked_connection.lock().await == Some(connection_id)
    }

    /// Reads the mirrored generations now, for a Redis connection not seen before, and
    /// remembers the connection once the view is taken. When PostgreSQL cannot answer, the
    /// connection is still remembered: the aggregators' commits find lost writes by themselves.
    async fn refresh_mirrored_now(&self, connection_id: i64) -> Option<BTreeMap<i32, i64>> {
        let mut checked = self.checked_connection.lock().await;
        if *checked != Some(connection_id) {
            let _ = tokio::time::timeout(
                MIRRORED_FIRST_LOAD,
                refresh_mirrored(&self.mirrored, &self.pool, &self.group, &self.topic),
            )
            .await;
            *checked = Some(connection_id);
        }
        drop(checked);
        self.mirrored
            .generations
            .lock()
            .expect("the mirrored view lock should never be poisoned")
            .as_ref()
            .map(|(_, generations)| generations.clone())
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

async fn refresh_mirrored(view: &MirroredView, pool: &PgPool, group: &str, topic: &str) {
    match tally_mirror::store::partition_generations(pool, group, topic).await {
        Ok(partitions) => {
            let generations = partitions
                .into_iter()
                .map(|partition| (partition.partition, partition.mirrored_generation))
                .collect();
            *view
                .generations
                .lock()
                .expect("the mirrored view lock should never be poisoned") =
                Some((Instant::now(), generations));
        }
        Err(error) => debug!(%error, "could not read the mirrored generations from postgres"),
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
