//! Kafka clients, configured for the promises: the producer waits for every in-sync replica
//! (`acks=all`) and is idempotent, so its own retries never write a record twice; the consumer
//! never commits offsets to Kafka, because the aggregator stores them in PostgreSQL.

use std::time::Duration;

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::metadata::Metadata;
use rdkafka::producer::{BaseProducer, FutureProducer, Producer as _};

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
    let topic_metadata = metadata
        .topics()
        .iter()
        .find(|candidate| candidate.name() == topic)
        .with_context(|| format!("Kafka has no metadata for topic {topic}"))?;
    if let Some(error) = topic_metadata.error() {
        anyhow::bail!("Kafka reports an error for topic {topic}: {error:?}");
    }
    Ok(topic_metadata.partitions().len())
}

/// Creates the increments topic if it does not exist. Records get the broker's append time as
/// their timestamp (`LogAppendTime`): the aggregator uses it to tell which windows are closed.
pub async fn ensure_topic(store: &StoreConfig) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &store.kafka_brokers)
        .create()
        .context("failed to create the Kafka admin client")?;
    let topic = NewTopic::new(
        &store.kafka_topic,
        store.kafka_partitions,
        TopicReplication::Fixed(store.kafka_replication),
    )
    .set("message.timestamp.type", "LogAppendTime");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .context("failed to ask Kafka to create the topic")?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("Kafka could not create topic {name}: {code}"),
        }
    }
    Ok(())
}
