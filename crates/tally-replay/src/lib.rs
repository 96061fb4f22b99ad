//! # tally-replay
//!
//! Rebuilds Redis from PostgreSQL while traffic goes on. Safe to run at any time and any number
//! of times: every summary it writes carries the PostgreSQL version it was read at, and Redis
//! keeps whichever copy is newer.
//!
//! When Redis lost its data, its deltas for the windows open at the time are incomplete, so the
//! read path answers from PostgreSQL until those windows are closed. The replay therefore:
//! 1. notes the Kafka high watermarks and picks `valid_from`, the first window that starts after
//!    the replay did: every increment of that window or later reaches Redis after the loss;
//! 2. copies every counter's summary from one consistent PostgreSQL snapshot into Redis;
//! 3. waits until the aggregator has applied every Kafka record that existed when the replay
//!    started (the records not yet aggregated) and closed every window before `valid_from`;
//! 4. publishes the snapshot's closed windows and marks Redis complete from `valid_from` on.
//!
//! The replay must never write a count: only copies of what PostgreSQL holds.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::Rng as _;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tally_core::KeySpace;
use tally_core::WindowSpec;
use tally_infra::clock::now_ms;
use tally_infra::config::{AggregatorConfig, PipelineConfig, StoreConfig};
use tally_infra::summaries;

/// Counters copied per page (one PostgreSQL query and one Redis pipeline each).
const PAGE_SIZE: i64 = 5_000;
/// How many windows before the oldest closed one summaries keep window sums for.
const SUMMARY_WINDOW_MARGIN: i64 = 12;

pub struct ReplayJob {
    pub pool: PgPool,
    pub redis: ConnectionManager,
    pub keys: KeySpace,
    pub kafka_brokers: String,
    pub topic: String,
    pub group: String,
    pub window: WindowSpec,
    pub delta_ttl_ms: i64,
    /// How long to wait for the aggregator to catch up before giving up.
    pub wait_timeout: Duration,
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    pub counters_rebuilt: u64,
    /// Summaries actually written; the others were already newer in Redis.
    pub summaries_written: u64,
    /// Kafka records that were not yet in PostgreSQL when the replay started, and that the
    /// replay waited for the aggregator to apply.
    pub records_replayed: u64,
    /// Whether Redis had lost its data (no meta hash) when the replay started.
    pub redis_was_lost: bool,
    pub valid_from_ms: i64,
    pub duration: Duration,
}

impl ReplayJob {
    pub fn new(
        store: &StoreConfig,
        pipeline: &PipelineConfig,
        aggregator: &AggregatorConfig,
        pool: PgPool,
        redis: ConnectionManager,
        wait_timeout: Duration,
    ) -> Self {
        Self {
            pool,
            redis,
            keys: store.key_space(),
            kafka_brokers: store.kafka_brokers.clone(),
            topic: store.kafka_topic.clone(),
            group: aggregator.aggregator_group.clone(),
            window: pipeline.window_spec(),
            delta_ttl_ms: (pipeline.delta_ttl_secs * 1_000) as i64,
            wait_timeout,
        }
    }

    /// Runs the replay, reporting progress lines through `progress`.
    pub async fn run(&self, mut progress: impl FnMut(String)) -> anyhow::Result<ReplaySummary> {
        let started = Instant::now();
        let mut redis = self.redis.clone();
        let redis_was_lost = !redis::cmd("EXISTS")
            .arg(self.keys.meta())
            .query_async::<bool>(&mut redis)
            .await
            .context("failed to reach redis")?;
        let valid_from_ms = self.window.start_of(now_ms()) + self.window.length_ms;
        let high_watermarks = self.high_watermarks().await?;
        let topic_is_empty = high_watermarks.iter().all(|high| *high == 0);
        progress(format!(
            "replay: redis {}; {} partitions; kafka holds {} records",
            if redis_was_lost {
                "lost its data"
            } else {
                "is intact"
            },
            high_watermarks.len(),
            high_watermarks.iter().sum::<i64>()
        ));

        // One snapshot for offsets, closed windows and every summary.
        let mut snapshot = self
            .pool
            .begin()
            .await
            .context("failed to start a postgres transaction")?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *snapshot)
            .await
            .context("failed to start a snapshot")?;
        let offsets = self.offsets(&mut snapshot).await?;
        let records_not_applied: i64 = high_watermarks
            .iter()
            .enumerate()
            .map(|(partition, high)| {
                let applied = offsets
                    .get(&(partition as i32))
                    .map_or(0, |(next, _)| *next);
                (high - applied).max(0)
            })
            .sum();
        let closed_min = (0..high_watermarks.len() as i32)
            .map(|partition| offsets.get(&partition).and_then(|(_, closed)| *closed))
            .collect::<Option<Vec<i64>>>()
            .and_then(|closed| closed.into_iter().min());
        let windows_from_ms = closed_min
            .map(|closed| closed - SUMMARY_WINDOW_MARGIN * self.window.length_ms)
            .unwrap_or_else(|| now_ms() - self.delta_ttl_ms);

        let mut counters_rebuilt = 0u64;
        let mut summaries_written = 0u64;
        let mut after_name = String::new();
        loop {
            let page =
                summaries::load_page(&mut *snapshot, &after_name, PAGE_SIZE, windows_from_ms)
                    .await
                    .context("failed to read counters from postgres")?;
            let Some(last) = page.last() else {
                break;
            };
            after_name = last.name.clone();
            summaries_written += summaries::replace(&mut redis, &self.keys, &page)
                .await
                .context("failed to write summaries to redis")?
                as u64;
            counters_rebuilt += page.len() as u64;
            progress(format!("replay: {counters_rebuilt} counters rebuilt"));
        }
        snapshot
            .commit()
            .await
            .context("failed to end the snapshot")?;

        if redis_was_lost && !topic_is_empty {
            self.wait_for_aggregator(&high_watermarks, valid_from_ms, &mut progress)
                .await?;
        }

        let closed: Vec<(i32, i64)> = offsets
            .iter()
            .filter_map(|(partition, (_, closed))| closed.map(|closed| (*partition, closed)))
            .collect();
        summaries::publish_closed_windows(&mut redis, &self.keys, high_watermarks.len(), &closed)
            .await
            .context("failed to publish closed windows")?;
        // An empty topic means no increment was ever acknowledged, so nothing can be missing.
        let valid_from_ms = if topic_is_empty { 0 } else { valid_from_ms };
        let epoch = format!("{:016x}", rand::rng().random::<u64>());
        summaries::initialize_meta(&mut redis, &self.keys, &epoch, valid_from_ms)
            .await
            .context("failed to mark redis complete")?;

        Ok(ReplaySummary {
            counters_rebuilt,
            summaries_written,
            records_replayed: records_not_applied as u64,
            redis_was_lost,
            valid_from_ms,
            duration: started.elapsed(),
        })
    }

    async fn high_watermarks(&self) -> anyhow::Result<Vec<i64>> {
        let brokers = self.kafka_brokers.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<i64>> {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .context("failed to create a kafka client")?;
            let partition_count = tally_infra::kafka::fetch_partition_count_of(&consumer, &topic)?;
            (0..partition_count as i32)
                .map(|partition| {
                    consumer
                        .fetch_watermarks(&topic, partition, Duration::from_secs(5))
                        .map(|(_, high)| high)
                        .with_context(|| {
                            format!("failed to read partition {partition}'s high watermark")
                        })
                })
                .collect()
        })
        .await
        .context("the kafka watermark task panicked")?
    }

    async fn offsets(
        &self,
        executor: &mut sqlx::PgConnection,
    ) -> anyhow::Result<std::collections::BTreeMap<i32, (i64, Option<i64>)>> {
        let rows: Vec<(i32, i64, Option<i64>)> = sqlx::query_as(
            "SELECT kafka_partition, next_offset,
                    (extract(epoch FROM closed_window_start) * 1000)::bigint
             FROM consumer_offsets WHERE consumer_group = $1 AND topic = $2",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .fetch_all(executor)
        .await
        .context("failed to read the aggregator's offsets")?;
        Ok(rows
            .into_iter()
            .map(|(partition, next, closed)| (partition, (next, closed)))
            .collect())
    }

    /// Waits until PostgreSQL holds every record Kafka had when the replay started, and every
    /// window before `valid_from_ms` is closed.
    async fn wait_for_aggregator(
        &self,
        high_watermarks: &[i64],
        valid_from_ms: i64,
        progress: &mut impl FnMut(String),
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.wait_timeout;
        let must_be_closed_ms = valid_from_ms - self.window.length_ms;
        loop {
            let mut connection = self
                .pool
                .acquire()
                .await
                .context("failed to reach postgres")?;
            let offsets = self.offsets(&mut connection).await?;
            drop(connection);
            let mut records_left = 0;
            let mut windows_open = 0;
            for (partition, high) in high_watermarks.iter().enumerate() {
                let (next, closed) = offsets
                    .get(&(partition as i32))
                    .copied()
                    .unwrap_or((0, None));
                records_left += (high - next).max(0);
                if closed.is_none_or(|closed| closed < must_be_closed_ms) {
                    windows_open += 1;
                }
            }
            if records_left == 0 && windows_open == 0 {
                return Ok(());
            }
            progress(format!(
                "replay: waiting for the aggregator: {records_left} records to apply, {windows_open} partitions with windows still open"
            ));
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "the aggregator did not catch up within {:?}; is it running?",
                    self.wait_timeout
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
