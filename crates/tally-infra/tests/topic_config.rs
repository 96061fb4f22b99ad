//! `ensure_topic` against the real local Kafka (127.0.0.1:9092): the topic Tally creates has the
//! settings the promises rest on, and an existing topic without them stops the start with an
//! error naming the setting. Each test uses topics of its own, deleted at the end.

use std::hash::{BuildHasher as _, RandomState};
use std::time::Duration;

use clap::Parser as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use tally_infra::config::StoreConfig;
use tally_infra::kafka::{TopicConfigError, ensure_topic};

const BROKERS: &str = "127.0.0.1:9092";

#[derive(clap::Parser)]
struct Settings {
    #[command(flatten)]
    store: StoreConfig,
}

/// The store settings with their defaults, on a topic of this test's own.
fn store_for(topic: &str) -> StoreConfig {
    let mut store = Settings::parse_from(["test"]).store;
    store.kafka_brokers = BROKERS.into();
    store.kafka_topic = topic.into();
    store.kafka_partitions = 2;
    store.kafka_replication = 1;
    store
}

fn random_topic(label: &str) -> String {
    format!(
        "tally.test.topic-config.{label}.{:016x}",
        RandomState::new().hash_one(std::time::SystemTime::now())
    )
}

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .expect("an admin client should be created")
}

fn options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))
}

/// Deletes the topic when the test ends, passed or failed.
struct DeleteOnDrop(String);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        let topic = self.0.clone();
        // A runtime of its own: the test's runtime may be gone or panicking.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _ = runtime.block_on(admin().delete_topics(&[&topic], &options()));
        })
        .join()
        .ok();
    }
}

async fn topic_settings(topic: &str) -> Vec<(String, Option<String>)> {
    let described = admin()
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &options())
        .await
        .unwrap();
    let resource = described.into_iter().next().unwrap().unwrap();
    resource
        .entries
        .into_iter()
        .map(|entry| (entry.name, entry.value))
        .collect()
}

fn setting<'a>(settings: &'a [(String, Option<String>)], name: &str) -> Option<&'a str> {
    settings
        .iter()
        .find(|(candidate, _)| candidate == name)
        .and_then(|(_, value)| value.as_deref())
}

#[tokio::test]
async fn a_topic_tally_creates_has_the_settings_and_passes_the_check() {
    let topic = random_topic("created");
    let _cleanup = DeleteOnDrop(topic.clone());
    let store = store_for(&topic);
    ensure_topic(&store)
        .await
        .expect("a topic tally creates should pass its own check");

    let settings = topic_settings(&topic).await;
    assert_eq!(
        setting(&settings, "message.timestamp.type"),
        Some("LogAppendTime")
    );
    // min(2, replication factor 1)
    assert_eq!(setting(&settings, "min.insync.replicas"), Some("1"));
    assert_eq!(
        setting(&settings, "unclean.leader.election.enable"),
        Some("false")
    );

    // The next start finds the topic and checks it again.
    ensure_topic(&store)
        .await
        .expect("an existing topic with the settings should pass");
}

#[tokio::test]
async fn an_existing_topic_with_create_time_stops_the_start() {
    let topic = random_topic("create-time");
    let _cleanup = DeleteOnDrop(topic.clone());
    let new_topic = NewTopic::new(&topic, 2, TopicReplication::Fixed(1))
        .set("message.timestamp.type", "CreateTime");
    for result in admin()
        .create_topics([&new_topic], &options())
        .await
        .unwrap()
    {
        result.expect("the test should create its topic");
    }

    let error = ensure_topic(&store_for(&topic))
        .await
        .expect_err("a topic with CreateTime must not pass");
    let message = format!("{error:#}");
    assert!(
        message.contains("message.timestamp.type=CreateTime")
            && message.contains("message.timestamp.type=LogAppendTime")
            && message.contains(&topic),
        "the error names the topic, the setting, the value found and the value needed: {message}"
    );
    let mismatch = error
        .downcast_ref::<TopicConfigError>()
        .expect("the error should be a TopicConfigError");
    assert_eq!(mismatch.setting, "message.timestamp.type");
    assert_eq!(mismatch.found, "CreateTime");
}

#[tokio::test]
async fn an_existing_topic_made_with_log_append_time_by_hand_passes() {
    // Kafka's broker defaults fill in the rest: min.insync.replicas=1 on a single replica.
    let topic = random_topic("by-hand");
    let _cleanup = DeleteOnDrop(topic.clone());
    let new_topic = NewTopic::new(&topic, 1, TopicReplication::Fixed(1))
        .set("message.timestamp.type", "LogAppendTime");
    for result in admin()
        .create_topics([&new_topic], &options())
        .await
        .unwrap()
    {
        result.expect("the test should create its topic");
    }
    ensure_topic(&store_for(&topic))
        .await
        .expect("a topic with LogAppendTime and one replica should pass");
}
