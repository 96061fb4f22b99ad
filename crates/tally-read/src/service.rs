//! Where a counter is read: the in-process cache, then Redis, then PostgreSQL.

use std::collections::HashMap;
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
use tally_mirror::{ClosedWindows, Generations, KeySpace, MarkerFloors, Mirror, Untrusted};
use tracing::{debug, warn};

use crate::metrics;

/// How long a read reuses what it learned about the closed windows. An older closed window only
/// makes a read look at more windows, never at wrong ones.
const CLOSED_WINDOWS_REUSE: Duration = Duration::from_millis(250);

/// How long a read trusts its view of PostgreSQL's generations. A bucket that lost writes is
/// found once the generations it lost are in the view: within this long of the loss, at once
/// when the Redis server changed, and by the aggregator's next commit in any case.
const GENERATIONS_REUSE: Duration = Duration::from_secs(1);

/// How long a read waits for PostgreSQL's generations before it reads Redis without a new view;
/// after a failed attempt, reads use the last view this long before asking again.
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

/// PostgreSQL's view of the partitions, and the Redis server the floors are made for.
#[derive(Clone)]
struct GenerationsView {
    read_at: Instant,
    /// The Redis server (`run_id`) these floors are for, and when it was first seen, by
    /// PostgreSQL's clock: its commits from before then must all be in it.
    server_run_id: String,
    server_seen_ms: i64,
    generations: Generations,
}

impl GenerationsView {
    fn floors(&self) -> MarkerFloors {
        MarkerFloors::for_server(&self.generations.partitions, self.server_seen_ms)
    }
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
    closed_windows: Mutex<Option<(Instant, ClosedWindows)>>,
    generations: Mutex<Option<GenerationsView>>,
    /// When asking PostgreSQL for the generations last failed.
    generations_failed_at: Mutex<Option<Instant>>,
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
            closed_windows: Mutex::new(None),
            generations: Mutex::new(None),
            generations_failed_at: Mutex::new(None),
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
        let Some(closed) = self.closed_windows(&mut redis).await? else {
            return Ok(Err(Untrusted::NoClosedWindows));
        };
        let wanted: Vec<&str> = names.iter().map(CounterName::as_str).collect();
        let view = self.generations_view(None).await;
        let floors = view.as_ref().map(GenerationsView::floors);
        let mut read = self
            .mirror
            .read_values(&mut redis, &closed, floors.as_ref(), &wanted, now_ms())
            .await?;
        let floors_for_another_server = view
            .as_ref()
            .is_some_and(|view| view.server_run_id != read.server_run_id);
        if read.values.is_ok() && (view.is_none() || floors_for_another_server) {
            // A server not seen before: a Redis that restarted (maybe from an older snapshot)
            // or a replica that took over (maybe without the last writes). Only floors made for
            // it can tell: read again with them.
            let view = self.generations_view(Some(&read.server_run_id)).await;
            let floors = view.as_ref().map(GenerationsView::floors);
            read = self
                .mirror
                .read_values(&mut redis, &closed, floors.as_ref(), &wanted, now_ms())
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

    /// The view of PostgreSQL's generations: at most [`GENERATIONS_REUSE`] old, and, when
    /// `new_server` names a server the view was not made for, made for it, seen now. When
    /// PostgreSQL does not answer, the last view (if any) is used for a while.
    async fn generations_view(&self, new_server: Option<&str>) -> Option<GenerationsView> {
        let current = |this: &Self| {
            let view = this
                .generations
                .lock()
                .expect("the generations lock should never be poisoned")
                .clone();
            view.filter(|view| {
                view.read_at.elapsed() < GENERATIONS_REUSE
                    && new_server.is_none_or(|server| view.server_run_id == server)
            })
        };
        if let Some(view) = current(self) {
            return Some(view);
        }
        let last = || {
            self.generations
                .lock()
                .expect("the generations lock should never be poisoned")
                .clone()
        };
        let failed_recently = self
            .generations_failed_at
            .lock()
            .expect("the generations lock should never be poisoned")
            .is_some_and(|failed_at| failed_at.elapsed() < GENERATIONS_PATIENCE);
        if failed_recently {
            return last();
        }
        let _refreshing = self.generations_refresh.lock().await;
        // Another read may have made it while this one waited.
        if let Some(view) = current(self) {
            return Some(view);
        }
        let query =
            tally_mirror::store::partition_generations(&self.pool, &self.group, &self.topic);
        let generations = match tokio::time::timeout(GENERATIONS_PATIENCE, query).await {
            Ok(Ok(generations)) => generations,
            outcome => {
                if let Ok(Err(error)) = outcome {
                    debug!(%error, "could not read the partitions' generations from postgres");
                }
                *self
                    .generations_failed_at
                    .lock()
                    .expect("the generations lock should never be poisoned") = Some(Instant::now());
                return last();
            }
        };
        let previous = last();
        let (server_run_id, server_seen_ms) = match (new_server, &previous) {
            (Some(server), _) => (server.to_owned(), generations.postgres_now_ms),
            (None, Some(previous)) => (previous.server_run_id.clone(), previous.server_seen_ms),
            // The first view: the server is seen now.
            (None, None) => (String::new(), generations.postgres_now_ms),
        };
        let view = GenerationsView {
            read_at: Instant::now(),
            server_run_id,
            server_seen_ms,
            generations,
        };
        *self
            .generations
            .lock()
            .expect("the generations lock should never be poisoned") = Some(view.clone());
        Some(view)
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
