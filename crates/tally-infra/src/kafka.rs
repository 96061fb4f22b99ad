//! Kafka clients, configured for the promises: the producer waits for every in-sync replica
//! (`acks=all`) and is idempotent, so its own retries never write a record twice; the consumer
//! never commits offsets to Kafka, because the aggregator stores them in PostgreSQL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::metadata::{Metadata, MetadataTopic};
use rdkafka::producer::{BaseProducer, FutureProducer, Producer as _};
use tracing::{debug, info, warn};

use crate::config::{PipelineConfig, StoreConfig};

/// The producer the ingest writes increments with.
pub fn producer(store: &StoreConfig, pipeline: &PipelineConfig) -> anyhow::Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", &store.kafka_brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        // The producer must give up on a record by the produce deadline: windows close on the
        // assumption that no record stamped with a window reaches the log later than that.
        .set(
            "message.timeout.ms",
            pipeline.produce_timeout_ms.to_string(),
        )
        // No lingering: group commit already gathers a hot counter's increments while its
        // records are in flight, so waiting longer here would only add latency to every request.
        .set("linger.ms", "0")
        .set("compression.type", "lz4")
        .create()
        .context("failed to create the Kafka producer")
}

/// A bare client used only to ask for cluster metadata (readiness, partition counts).
pub fn metadata_client(store: &StoreConfig) -> anyhow::Result<BaseProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", &store.kafka_brokers)
        .set("socket.connection.setup.timeout.ms", "2000")
        // Asking about a topic must never create it: a broker that auto-creates topics would
        // make it with CreateTime timestamps, which closed windows cannot rest on.
        .set("allow.auto.create.topics", "false")
        .create()
        .context("failed to create the Kafka metadata client")
}

/// Asks the brokers for the topic's metadata and returns its partition count. Blocking: call it
/// from `spawn_blocking` or a thread of its own.
pub fn fetch_partition_count(
    client: &BaseProducer,
    topic: &str,
    timeout: Duration,
) -> anyhow::Result<usize> {
    let metadata = client
        .client()
        .fetch_metadata(Some(topic), timeout)
        .context("Kafka did not answer a metadata request")?;
    partition_count_in(&metadata, topic)
}

/// The same for a consumer.
pub fn fetch_partition_count_of<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> anyhow::Result<usize> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .context("Kafka did not answer a metadata request")?;
    partition_count_in(&metadata, topic)
}

fn partition_count_in(metadata: &Metadata, topic: &str) -> anyhow::Result<usize> {
    Ok(topic_in(metadata, topic)?.partitions().len())
}

/// The topic's part of a metadata answer, or what Kafka said was wrong with it.
fn topic_in<'m>(metadata: &'m Metadata, topic: &str) -> anyhow::Result<&'m MetadataTopic> {
    let topic_metadata = metadata
        .topics()
        .iter()
        .find(|candidate| candidate.name() == topic)
        .with_context(|| format!("Kafka has no metadata for topic {topic}"))?;
    if let Some(error) = topic_metadata.error() {
        anyhow::bail!("Kafka reports an error for topic {topic}: {error:?}");
    }
    Ok(topic_metadata)
}

/// The value `message.timestamp.type` must have.
const LOG_APPEND_TIME: &str = "LogAppendTime";

/// How long to wait for a topic Tally just created to show in the metadata and configs.
const TOPIC_VISIBLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates the increments topic if it does not exist, then checks that the topic (new or not)
/// has the settings the promises rest on, and fails naming the first one it does not:
/// - `message.timestamp.type=LogAppendTime`: records carry the broker's append time, from which
///   the aggregator tells which windows are closed;
/// - `min.insync.replicas` at least min(2, replication factor): an `acks=all` acknowledgement,
///   and so a `202`, means the increment is on two brokers whenever there are two replicas.
///
/// A topic Tally creates also gets `unclean.leader.election.enable=false`, so a replica that
/// missed acknowledged records never becomes the leader; on an existing topic a `true` there is
/// only logged, since operators may have chosen availability on purpose.
pub async fn ensure_topic(store: &StoreConfig) -> anyhow::Result<()> {
    let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(
        ClientConfig::new()
            .set("bootstrap.servers", &store.kafka_brokers)
            .create()
            .context("failed to create the Kafka admin client")?,
    );
    create_topic_if_missing(&admin, store).await?;
    check_topic_config(&admin, &store.kafka_topic).await
}

async fn create_topic_if_missing(
    admin: &AdminClient<DefaultClientContext>,
    store: &StoreConfig,
) -> anyhow::Result<()> {
    let min_insync_replicas = min_insync_replicas_needed(store.kafka_replication).to_string();
    let topic = NewTopic::new(
        &store.kafka_topic,
        store.kafka_partitions,
        TopicReplication::Fixed(store.kafka_replication),
    )
    .set("message.timestamp.type", LOG_APPEND_TIME)
    .set("min.insync.replicas", &min_insync_replicas)
    .set("unclean.leader.election.enable", "false");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .context("failed to ask Kafka to create the topic")?;
    for result in results {
        match result {
            Ok(name) => info!(kafka.topic = %name, "created the kafka topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("Kafka could not create topic {name}: {code}"),
        }
    }
    Ok(())
}

/// The smallest `min.insync.replicas` Tally accepts for a replication factor: 2, or every
/// replica when there are fewer.
fn min_insync_replicas_needed(replication_factor: i32) -> i32 {
    replication_factor.clamp(1, 2)
}

/// A topic setting that breaks one of Tally's promises.
#[derive(Debug, thiserror::Error)]
#[error(
    "kafka topic {topic} has {setting}={found}, but tally needs {setting}={needed}: {why} \
     (fix it with kafka-configs.sh --alter --entity-type topics --entity-name {topic} \
     --add-config {setting}={needed})"
)]
pub struct TopicConfigError {
    pub topic: String,
    /// The name of the setting, as Kafka spells it.
    pub setting: &'static str,
    pub found: String,
    pub needed: String,
    why: &'static str,
}

/// The settings of a topic, as the brokers report them, that [`ensure_topic`] checks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TopicConfig {
    /// The fewest replicas any partition has.
    replication_factor: i32,
    timestamp_type: Option<String>,
    min_insync_replicas: Option<String>,
    unclean_leader_election: Option<String>,
}

impl TopicConfig {
    /// Fails on the first setting that breaks a promise.
    fn check(&self, topic: &str) -> Result<(), TopicConfigError> {
        let found = |value: &Option<String>| value.clone().unwrap_or_else(|| "(unset)".into());
        if self.timestamp_type.as_deref() != Some(LOG_APPEND_TIME) {
            return Err(TopicConfigError {
                topic: topic.to_owned(),
                setting: "message.timestamp.type",
                found: found(&self.timestamp_type),
                needed: LOG_APPEND_TIME.into(),
                why: "windows close by the broker's append time, and with producer timestamps a \
                      record could land in a window the aggregator already closed",
            });
        }
        let needed = min_insync_replicas_needed(self.replication_factor);
        let min_insync_replicas = self
            .min_insync_replicas
            .as_deref()
            .and_then(|value| value.parse::<i32>().ok());
        if min_insync_replicas.is_none_or(|value| value < needed) {
            return Err(TopicConfigError {
                topic: topic.to_owned(),
                setting: "min.insync.replicas",
                found: found(&self.min_insync_replicas),
                needed: needed.to_string(),
                why: if self.replication_factor >= 2 {
                    "with fewer, an acknowledged increment may be on one broker only, and lost \
                     with it"
                } else {
                    "an acknowledged increment must be on every replica"
                },
            });
        }
        Ok(())
    }

    fn allows_unclean_leader_election(&self) -> bool {
        self.unclean_leader_election.as_deref() == Some("true")
    }
}

/// Reads the topic's replication factor from the metadata and its settings from the brokers,
/// then checks them. A topic just created may take a moment to show, so this retries until
/// [`TOPIC_VISIBLE_TIMEOUT`] while the topic is unknown.
async fn check_topic_config(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topic: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + TOPIC_VISIBLE_TIMEOUT;
    let config = loop {
        match describe_topic(admin, topic).await {
            Ok(config) => break config,
            Err(error) if Instant::now() < deadline => {
                debug!(kafka.topic = %topic, error = format!("{error:#}"), "topic not described yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error),
        }
    };
    config.check(topic)?;
    if config.replication_factor >= 2 && config.allows_unclean_leader_election() {
        warn!(
            kafka.topic = %topic,
            "unclean.leader.election.enable=true: a replica that missed acknowledged increments may become leader and lose them"
        );
    }
    Ok(())
}

async fn describe_topic(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topic: &str,
) -> anyhow::Result<TopicConfig> {
    let replication_factor = {
        let admin = Arc::clone(admin);
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let metadata = admin
                .inner()
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .context("Kafka did not answer a metadata request")?;
            replication_factor_in(&metadata, &topic)
        })
        .await
        .context("the metadata request panicked")??
    };
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
    let results = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &options)
        .await
        .with_context(|| format!("failed to describe the config of kafka topic {topic}"))?;
    let resource = match results.into_iter().next() {
        Some(Ok(resource)) => resource,
        Some(Err(code)) => {
            anyhow::bail!("Kafka could not describe the config of topic {topic}: {code}")
        }
        None => anyhow::bail!("Kafka described no config for topic {topic}"),
    };
    let value = |name: &str| resource.get(name).and_then(|entry| entry.value.clone());
    Ok(TopicConfig {
        replication_factor,
        timestamp_type: value("message.timestamp.type"),
        min_insync_replicas: value("min.insync.replicas"),
        unclean_leader_election: value("unclean.leader.election.enable"),
    })
}

fn replication_factor_in(metadata: &Metadata, topic: &str) -> anyhow::Result<i32> {
    topic_in(metadata, topic)?
        .partitions()
        .iter()
        .map(|partition| partition.replicas().len() as i32)
        .min()
        .with_context(|| format!("Kafka reports no partitions for topic {topic}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(replication_factor: i32, timestamp_type: &str, min_insync: &str) -> TopicConfig {
        TopicConfig {
            replication_factor,
            timestamp_type: Some(timestamp_type.into()),
            min_insync_replicas: Some(min_insync.into()),
            unclean_leader_election: Some("false".into()),
        }
    }

    #[test]
    fn min_insync_replicas_needed_is_two_or_every_replica() {
        assert_eq!(min_insync_replicas_needed(1), 1);
        assert_eq!(min_insync_replicas_needed(2), 2);
        assert_eq!(min_insync_replicas_needed(3), 2);
        assert_eq!(min_insync_replicas_needed(5), 2);
    }

    #[test]
    fn a_topic_with_the_needed_settings_passes() {
        assert!(config(1, "LogAppendTime", "1").check("t").is_ok());
        assert!(config(3, "LogAppendTime", "2").check("t").is_ok());
        assert!(config(3, "LogAppendTime", "3").check("t").is_ok());
    }

    #[test]
    fn create_time_fails_naming_the_setting_and_both_values() {
        let error = config(1, "CreateTime", "1").check("t").unwrap_err();
        assert_eq!(error.setting, "message.timestamp.type");
        assert_eq!(error.found, "CreateTime");
        assert_eq!(error.needed, "LogAppendTime");
        let message = error.to_string();
        assert!(
            message.contains("message.timestamp.type=CreateTime")
                && message.contains("message.timestamp.type=LogAppendTime"),
            "{message}"
        );
    }

    #[test]
    fn too_few_insync_replicas_fail_for_the_actual_replication_factor() {
        let error = config(3, "LogAppendTime", "1").check("t").unwrap_err();
        assert_eq!(error.setting, "min.insync.replicas");
        assert_eq!((error.found.as_str(), error.needed.as_str()), ("1", "2"));
        let error = config(2, "LogAppendTime", "1").check("t").unwrap_err();
        assert_eq!(error.needed, "2");
    }

    #[test]
    fn unreported_settings_fail_rather_than_pass() {
        let mut unreported = config(3, "LogAppendTime", "2");
        unreported.min_insync_replicas = None;
        assert_eq!(
            unreported.check("t").unwrap_err().found,
            "(unset)",
            "an unknown value is not taken as a good one"
        );
        unreported.timestamp_type = None;
        assert_eq!(
            unreported.check("t").unwrap_err().setting,
            "message.timestamp.type"
        );
    }
}
