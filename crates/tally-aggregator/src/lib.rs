//! # tally-aggregator
//!
//! Turns the Kafka log of increments into PostgreSQL's durable totals.
//!
//! A Kafka consumer group reads the topic. Every window (5 s by default) each aggregator
//! commits what it read in ONE transaction: one upsert statement adds the window sums to
//! `counter_windows` and `counters` and moves the partitions' offsets in `consumer_offsets`.
//! Offsets live only in PostgreSQL, next to the counts, so a crash anywhere either commits both
//! or neither; after a restart or a rebalance, consumption resumes from the stored offsets.
//!
//! After each commit the aggregator copies it into the Redis mirror, repairs the buckets of the
//! mirror that lost data, and publishes which windows are closed (see `tally-mirror`), so reads
//! can combine PostgreSQL's totals with the open windows' Redis deltas.
//!
//! ## Layout
//! - [`consumer`]: the consumer thread, its rebalance callback and the flush;
//! - [`commit`]: the PostgreSQL transaction;
//! - [`pending`]: the window being read, as plain data.
//!
//! The aggregator must never commit offsets to Kafka, never write a summary to Redis that
//! PostgreSQL does not hold, and never consume past a gap in the log.

mod commit;
mod consumer;
mod metrics;
mod pending;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tally_infra::config::{AggregatorConfig, PipelineConfig, StoreConfig};
use tally_mirror::{KeySpace, Mirror, PendingSets};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::consumer::{AggregatorContext, Shared};
use crate::pending::PendingWindow;

pub struct Aggregator {
    consumer: BaseConsumer<AggregatorContext>,
    topic: String,
}

impl Aggregator {
    /// `auto_repair`: repair the buckets of the Redis mirror that lost data by itself, rather
    /// than leave them for `tally replay`.
    pub fn build(
        store: &StoreConfig,
        pipeline: &PipelineConfig,
        config: &AggregatorConfig,
        pool: PgPool,
        redis: ConnectionManager,
        auto_repair: bool,
        cancel: CancellationToken,
    ) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            runtime: tokio::runtime::Handle::current(),
            pool,
            redis,
            mirror: Mirror::new(
                KeySpace::new(store.redis_prefix.clone()),
                pipeline.window_spec(),
                pipeline.delta_ttl_ms(),
            ),
            pending_sets: PendingSets::new(KeySpace::new(store.redis_prefix.clone())),
            group: config.aggregator_group.clone(),
            topic: store.kafka_topic.clone(),
            window: pipeline.window_spec(),
            delta_ttl_ms: pipeline.delta_ttl_ms(),
            idempotency_window_secs: pipeline.idempotency_window_secs,
            auto_repair,
            max_pending_rows: config.aggregator_max_pending,
            cancel,
            pending: Mutex::new(PendingWindow::default()),
            flush_soon: std::sync::atomic::AtomicBool::new(false),
            paused_for_memory: std::sync::atomic::AtomicBool::new(false),
        });
        let consumer: BaseConsumer<AggregatorContext> = ClientConfig::new()
            .set("bootstrap.servers", &store.kafka_brokers)
            .set("group.id", &config.aggregator_group)
            // Offsets are stored in PostgreSQL with the counts, never in Kafka.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Every assignment seeks to the offset stored in PostgreSQL. Should retention have
            // deleted it, resetting to the log's start would skip records without a word: this
            // makes librdkafka report it instead, and the aggregator refuses the partition.
            .set("auto.offset.reset", "error")
            // A killed aggregator's partitions move to a live one within seconds.
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            // The aggregator writes once per window, so it need not fetch every record the
            // moment it lands: asking for 64 KiB or 100 ms, whichever comes first, saves the broker
            // a fetch per produce, which on two cores gave the ingest about 13% more
            // throughput side by side (benches/README.md).
            .set("fetch.min.bytes", "65536")
            .set("fetch.wait.max.ms", "100")
            .create_with_context(AggregatorContext { shared })
            .context("failed to create the Kafka consumer")?;
        Ok(Self {
            consumer,
            topic: store.kafka_topic.clone(),
        })
    }

    /// Consumes until `cancel` fires, then commits the current window and leaves the group.
    pub async fn run(self) -> anyhow::Result<()> {
        let shared = Arc::clone(&self.consumer.context().shared);
        let pruner = tokio::spawn(prune_expired_keys_periodically(
            shared.pool.clone(),
            shared.idempotency_window_secs,
            shared.cancel.clone(),
        ));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("tally-aggregator".into())
            .spawn(move || {
                let outcome = self.consume();
                let _ = done_tx.send(outcome);
            })
            .context("failed to start the aggregator thread")?;
        let outcome = done_rx.await.context("the aggregator thread panicked")?;
        pruner.abort();
        outcome
    }

    fn consume(self) -> anyhow::Result<()> {
        let cancel = self.consumer.context().shared.cancel.clone();
        let partition_count = loop {
            match tally_infra::kafka::fetch_partition_count_of(&self.consumer, &self.topic) {
                Ok(count) => break count,
                Err(error) => {
                    warn!(%error, "waiting for the kafka topic");
                    if cancel.is_cancelled() {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        };
        self.consumer
            .subscribe(&[&self.topic])
            .context("failed to subscribe to the topic")?;
        info!(kafka.topic = %self.topic, kafka.partitions = partition_count, "aggregator consuming");
        consumer::run_blocking(self.consumer, partition_count);
        Ok(())
    }
}

/// Prunes expired idempotency keys once a minute, off the write path.
async fn prune_expired_keys_periodically(
    pool: PgPool,
    window_secs: u64,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        match commit::prune_expired_keys(&pool, window_secs).await {
            Ok(0) => {}
            Ok(pruned) => info!(
                idempotency.pruned = pruned,
                "pruned expired idempotency keys"
            ),
            Err(error) => warn!(%error, "failed to prune expired idempotency keys"),
        }
    }
}
