//! Where a counter is read: the in-process cache, then Redis, then PostgreSQL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared, join_all};
use redis::aio::ConnectionManager;
use serde::Serialize;
use sqlx::PgPool;
use tally_core::{CounterName, KeySpace, WindowSpec};
use tally_infra::clock::now_ms;
use tally_infra::config::{PipelineConfig, ReadConfig, StoreConfig};
use tally_infra::summaries::{self, Watermark, WatermarkMissing};
use tracing::warn;

use crate::metrics;
use crate::redis_values::{RedisValues, Untrusted};

/// How long a read reuses what it learned about the closed window. An older closed window only
/// makes a read look at more windows, never at wrong ones; a lost Redis is still noticed on every
/// read, because each read checks the epoch.
const WATERMARK_REUSE: Duration = Duration::from_millis(250);

/// Where a value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// This process's read cache (at most the cache TTL old).
    Cache,
    /// Redis: PostgreSQL's totals plus the open windows' deltas.
    Redis,
    /// PostgreSQL alone, because Redis was unreachable or lost its data. It lags by the
    /// increments not yet aggregated, so it is flagged stale.
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

struct CacheEntry {
    created: Instant,
    read: SharedRead,
}

pub struct ReadService {
    redis: ConnectionManager,
    pool: PgPool,
    keys: KeySpace,
    window: WindowSpec,
    delta_ttl_ms: i64,
    cache_ttl: Duration,
    cache_capacity: usize,
    pub(crate) max_names: usize,
    /// std Mutexes: held only to look up or insert, never across an await.
    cache: Mutex<HashMap<CounterName, CacheEntry>>,
    watermark: Mutex<Option<(Instant, Watermark)>>,
}

impl ReadService {
    pub fn new(
        redis: ConnectionManager,
        pool: PgPool,
        store: &StoreConfig,
        pipeline: &PipelineConfig,
        config: &ReadConfig,
    ) -> Self {
        Self {
            redis,
            pool,
            keys: store.key_space(),
            window: pipeline.window_spec(),
            delta_ttl_ms: (pipeline.delta_ttl_secs * 1_000) as i64,
            cache_ttl: Duration::from_millis(config.read_cache_ttl_ms),
            cache_capacity: config.read_cache_capacity,
            max_names: config.read_max_names,
            cache: Mutex::new(HashMap::new()),
            watermark: Mutex::new(None),
        }
    }

    /// Reads counters, in the order asked. Concurrent reads of a name share one fetch, and a
    /// fetched value is reused for the cache TTL, so a hammered name costs the stores at most one
    /// fetch per TTL per process. `fresh` skips the cache.
    pub async fn read(
        self: &Arc<Self>,
        names: Vec<CounterName>,
        fresh: bool,
    ) -> Result<Vec<CounterValue>, ReadError> {
        if fresh || self.cache_ttl.is_zero() {
            return self.fetch(&names).await;
        }
        let now = Instant::now();
        let mut reads: Vec<(SharedRead, bool)> = Vec::with_capacity(names.len());
        let mut missing: Vec<(usize, CounterName)> = Vec::new();
        {
            let cache = self
                .cache
                .lock()
                .expect("the read cache lock should never be poisoned");
            for (index, name) in names.iter().enumerate() {
                match cache.get(name) {
                    Some(entry) if now.duration_since(entry.created) < self.cache_ttl => {
                        reads.push((entry.read.clone(), true));
                    }
                    _ => {
                        // Placeholder; replaced below once the batch fetch exists.
                        reads.push((futures_util::future::pending().boxed().shared(), false));
                        missing.push((index, name.clone()));
                    }
                }
            }
        }
        if !missing.is_empty() {
            let mut unique: Vec<CounterName> =
                missing.iter().map(|(_, name)| name.clone()).collect();
            unique.sort();
            unique.dedup();
            let service = Arc::clone(self);
            let batch_names = unique.clone();
            let batch = async move { service.fetch(&batch_names).await }
                .boxed()
                .shared();
            let mut per_name: HashMap<CounterName, SharedRead> = HashMap::new();
            for (position, name) in unique.into_iter().enumerate() {
                let read = batch
                    .clone()
                    .map(move |values| values.map(|values| values[position].clone()))
                    .boxed()
                    .shared();
                per_name.insert(name, read);
            }
            let mut cache = self
                .cache
                .lock()
                .expect("the read cache lock should never be poisoned");
            if cache.len() + per_name.len() > self.cache_capacity {
                cache.retain(|_, entry| now.duration_since(entry.created) < self.cache_ttl);
                if cache.len() + per_name.len() > self.cache_capacity {
                    cache.clear();
                }
            }
            for (index, name) in &missing {
                let read = per_name[name].clone();
                reads[*index] = (read.clone(), false);
                cache.insert(name.clone(), CacheEntry { created: now, read });
            }
        }
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
                    self.cache
                        .lock()
                        .expect("the read cache lock should never be poisoned")
                        .remove(name);
                    return Err(error);
                }
            }
        }
        Ok(values)
    }

    /// Reads from Redis when it can be trusted, else from PostgreSQL.
    async fn fetch(&self, names: &[CounterName]) -> Result<Vec<CounterValue>, ReadError> {
        let redis_error = match self.fetch_from_redis(names).await {
            Ok(Ok(values)) => return Ok(values),
            Ok(Err(untrusted)) => {
                metrics::POSTGRES_FALLBACKS
                    .with_label_values(&[untrusted.as_label()])
                    .inc();
                format!("redis cannot be trusted: {untrusted:?}")
            }
            Err(error) => {
                metrics::POSTGRES_FALLBACKS
                    .with_label_values(&["unreachable"])
                    .inc();
                format!("redis is unreachable: {error}")
            }
        };
        self.fetch_from_postgres(names).await.map_err(|error| {
            warn!(%error, redis.error = %redis_error, "a read failed on both stores");
            ReadError::StoresUnavailable(format!("{redis_error}; postgres: {error}"))
        })
    }

    async fn fetch_from_redis(
        &self,
        names: &[CounterName],
    ) -> redis::RedisResult<Result<Vec<CounterValue>, Untrusted>> {
        let mut redis = self.redis.clone();
        let watermark = match self.watermark(&mut redis).await? {
            Ok(watermark) => watermark,
            Err(WatermarkMissing::NoMeta) => return Ok(Err(Untrusted::DataLost)),
            Err(WatermarkMissing::NoClosedWindows) => return Ok(Err(Untrusted::NoClosedWindows)),
        };
        let reader = RedisValues {
            keys: &self.keys,
            window: self.window,
            delta_ttl_ms: self.delta_ttl_ms,
        };
        let values = match reader
            .values(&mut redis, &watermark, names, now_ms())
            .await?
        {
            Ok(values) => values,
            Err(untrusted) => {
                if untrusted == Untrusted::DataLost {
                    *self
                        .watermark
                        .lock()
                        .expect("the watermark lock should never be poisoned") = None;
                }
                return Ok(Err(untrusted));
            }
        };
        let as_of = now_rfc3339();
        metrics::VALUES_SERVED
            .with_label_values(&["redis"])
            .inc_by(names.len() as u64);
        Ok(Ok(names
            .iter()
            .zip(values)
            .map(|(name, value)| CounterValue {
                counter: name.to_string(),
                value,
                source: Source::Redis,
                stale: false,
                as_of: as_of.clone(),
            })
            .collect()))
    }

    async fn watermark(
        &self,
        redis: &mut ConnectionManager,
    ) -> redis::RedisResult<Result<Watermark, WatermarkMissing>> {
        {
            let cached = self
                .watermark
                .lock()
                .expect("the watermark lock should never be poisoned");
            if let Some((read_at, watermark)) = cached.as_ref()
                && read_at.elapsed() < WATERMARK_REUSE
            {
                return Ok(Ok(watermark.clone()));
            }
        }
        let watermark = summaries::read_watermark(redis, &self.keys).await?;
        if let Ok(watermark) = &watermark {
            *self
                .watermark
                .lock()
                .expect("the watermark lock should never be poisoned") =
                Some((Instant::now(), watermark.clone()));
        }
        Ok(watermark)
    }

    async fn fetch_from_postgres(
        &self,
        names: &[CounterName],
    ) -> Result<Vec<CounterValue>, sqlx::Error> {
        let wanted: Vec<&str> = names.iter().map(CounterName::as_str).collect();
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT name, total FROM counters WHERE name = ANY($1)")
                .bind(&wanted)
                .fetch_all(&self.pool)
                .await?;
        let totals: HashMap<String, i64> = rows.into_iter().collect();
        let as_of = now_rfc3339();
        metrics::VALUES_SERVED
            .with_label_values(&["postgres"])
            .inc_by(names.len() as u64);
        Ok(names
            .iter()
            .map(|name| CounterValue {
                counter: name.to_string(),
                value: totals.get(name.as_str()).copied().unwrap_or(0),
                source: Source::Postgres,
                stale: true,
                as_of: as_of.clone(),
            })
            .collect())
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
