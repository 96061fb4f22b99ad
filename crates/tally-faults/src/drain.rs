//! After the load: wait until the pipeline has applied everything, then take the final values.
//!
//! Drained means, all at once:
//! - the aggregator's offsets in PostgreSQL have reached every partition's high watermark in
//!   Kafka (every record in the log is applied; without this, a Redis that lost deltas could
//!   agree with a PostgreSQL that has not caught up yet);
//! - PostgreSQL's totals did not change since the previous poll, one window earlier;
//! - for every counter, a `?fresh=true` read comes from Redis, not stale, and equals
//!   PostgreSQL, and a plain read equals it too.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use sqlx::PgPool;

use crate::checker::FinalValues;
use crate::client::TallyClient;

/// What the drain ended with.
#[derive(Debug, Clone)]
pub struct DrainOutcome {
    /// The last values seen, per counter.
    pub finals: BTreeMap<String, FinalValues>,
    pub drained: bool,
    pub waited: Duration,
    /// Why it did not drain, when it did not.
    pub problem: Option<String>,
}

/// Compares the aggregator's committed offsets with Kafka's high watermarks.
pub struct KafkaProgress {
    consumer: Arc<BaseConsumer>,
    topic: String,
    partitions: u32,
    aggregator_group: String,
}

impl KafkaProgress {
    pub fn new(
        brokers: &str,
        topic: &str,
        partitions: u32,
        aggregator_group: &str,
    ) -> anyhow::Result<Self> {
        // A plain client that never joins a group: it only asks for watermarks.
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "tally-faults-watermarks")
            .create()
            .context("creating the Kafka watermark client")?;
        Ok(KafkaProgress {
            consumer: Arc::new(consumer),
            topic: topic.to_owned(),
            partitions,
            aggregator_group: aggregator_group.to_owned(),
        })
    }

    /// `Ok(None)` when every partition is applied, else a description of the first that is not.
    async fn unapplied(&self, pool: &PgPool) -> anyhow::Result<Option<String>> {
        let applied: BTreeMap<i32, i64> = sqlx::query_as::<_, (i32, i64)>(
            "SELECT kafka_partition, next_offset FROM consumer_offsets WHERE consumer_group = $1 AND topic = $2",
        )
        .bind(&self.aggregator_group)
        .bind(&self.topic)
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
        for partition in 0..self.partitions as i32 {
            let consumer = Arc::clone(&self.consumer);
            let topic = self.topic.clone();
            let (_, high_watermark) = tokio::task::spawn_blocking(move || {
                consumer.fetch_watermarks(&topic, partition, Duration::from_secs(5))
            })
            .await??;
            let next_offset = applied.get(&partition).copied().unwrap_or(0);
            if next_offset < high_watermark {
                return Ok(Some(format!(
                    "partition {partition}: applied up to offset {next_offset}, log ends at {high_watermark}"
                )));
            }
        }
        Ok(None)
    }
}

/// Polls once per `poll_every` (one window) until drained or `timeout`.
pub async fn drain(
    tally: &TallyClient,
    pool: &PgPool,
    kafka: &KafkaProgress,
    counters: &[String],
    poll_every: Duration,
    timeout: Duration,
) -> DrainOutcome {
    let started = Instant::now();
    let mut previous_postgres: Option<BTreeMap<String, i64>> = None;
    let mut finals = BTreeMap::new();
    let mut problem;
    loop {
        problem = match observe(tally, pool, kafka, counters).await {
            Ok((observed, unapplied)) => {
                let postgres: BTreeMap<String, i64> = observed
                    .iter()
                    .map(|(counter, values)| (counter.clone(), values.postgres))
                    .collect();
                let stable = previous_postgres.as_ref() == Some(&postgres);
                previous_postgres = Some(postgres);
                let disagreeing = observed.iter().find(|(_, values)| {
                    values.redis != Some(values.postgres) || values.read != Some(values.postgres)
                });
                let why = match (unapplied, disagreeing) {
                    (Some(unapplied), _) => {
                        Some(format!("not every Kafka record applied ({unapplied})"))
                    }
                    (None, Some((counter, values))) => Some(format!(
                        "{counter}: postgres {} vs redis {:?} vs read {:?}",
                        values.postgres, values.redis, values.read
                    )),
                    (None, None) if !stable => Some("postgres still changing".to_owned()),
                    (None, None) => None,
                };
                finals = observed;
                why
            }
            Err(error) => Some(format!("could not observe the stores: {error:#}")),
        };
        if problem.is_none() {
            return DrainOutcome {
                finals,
                drained: true,
                waited: started.elapsed(),
                problem: None,
            };
        }
        if started.elapsed() > timeout {
            return DrainOutcome {
                finals,
                drained: false,
                waited: started.elapsed(),
                problem,
            };
        }
        tokio::time::sleep(poll_every).await;
    }
}

/// One look at every store: per counter its PostgreSQL total, its fresh Redis value (only when
/// the read came from Redis and is not stale) and a plain read; and what Kafka still holds.
async fn observe(
    tally: &TallyClient,
    pool: &PgPool,
    kafka: &KafkaProgress,
    counters: &[String],
) -> anyhow::Result<(BTreeMap<String, FinalValues>, Option<String>)> {
    let unapplied = kafka.unapplied(pool).await?;
    let totals: BTreeMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT name, total FROM counters WHERE name = ANY($1)")
            .bind(counters)
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    let mut observed = BTreeMap::new();
    for counter in counters {
        let redis = match tally.read(counter, true).await {
            Ok(read) if read.source == "redis" && !read.stale => Some(read.value),
            _ => None,
        };
        let read = match tally.read(counter, false).await {
            Ok(read) if !read.stale => Some(read.value),
            _ => None,
        };
        observed.insert(
            counter.clone(),
            FinalValues {
                // A counter that was never aggregated has no row, and reads 0.
                postgres: totals.get(counter).copied().unwrap_or(0),
                redis,
                read,
            },
        );
    }
    Ok((observed, unapplied))
}
