//! A gap in the log: when retention deleted records a partition has not applied yet (the offset
//! PostgreSQL stores for it is below the partition's low watermark), the aggregator refuses the
//! partition rather than count it without them. It reports the missing records in
//! `tally_aggregator_offset_gap_records{partition}` and applies none of the partition's later
//! records, while the other partitions go on.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::{encode, random_suffix, test_args, use_fresh_database, wait_until};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tally::cli::{Role, ServeArgs};
use tokio_util::sync::CancellationToken;

/// A Tally process in this test, started without waiting for reads to come from Redis:
/// `common::start` waits for that, and neither an app without the aggregator nor one without
/// the read routes ever gets there.
struct Process {
    address: String,
    http: reqwest::Client,
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Process {
    async fn start(args: ServeArgs) -> Self {
        let cancel = CancellationToken::new();
        let app = tally::App::build(args, cancel.clone())
            .await
            .expect("tally should start");
        let address = format!("http://{}", app.local_addr());
        let server = tokio::spawn(app.run_until_stopped());
        Self {
            address,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            cancel,
            server,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    async fn increment(&self, name: &str, by: i64) {
        let response = self
            .http
            .post(self.url(&format!("/v1/counters/{}/increment", encode(name))))
            .json(&serde_json::json!({ "by": by }))
            .send()
            .await
            .expect("the request should reach tally");
        assert_eq!(response.status(), 202, "incrementing {name}");
    }

    /// A gauge of the partition on `/metrics`, if it has been set.
    async fn partition_gauge(&self, metric: &str, partition: i32) -> Option<i64> {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let series = format!("{metric}{{partition=\"{partition}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&series))
            .map(|value| value.trim().parse().unwrap())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Reads the topic's watermarks, the way an operator's tools would.
struct Log {
    store: tally_infra::config::StoreConfig,
}

impl Log {
    fn new(args: &ServeArgs) -> Self {
        Self {
            store: args.store.clone(),
        }
    }

    /// `(low, high)` per partition: the first offset the log still holds, and the next one.
    async fn watermarks(&self) -> BTreeMap<i32, (i64, i64)> {
        common::kafka_watermarks(&self.store).await
    }

    async fn high_watermarks(&self) -> BTreeMap<i32, i64> {
        self.watermarks()
            .await
            .into_iter()
            .map(|(partition, (_, high))| (partition, high))
            .collect()
    }
}

/// Increments `name` and returns the partition its record went to: the one partition whose high
/// watermark moved, by one record.
async fn increment_and_locate(ingest: &Process, log: &Log, name: &str, by: i64) -> i32 {
    let before = log.high_watermarks().await;
    ingest.increment(name, by).await;
    wait_until(
        Duration::from_secs(10),
        "the acknowledged record shows in the watermarks",
        || async { log.high_watermarks().await != before },
    )
    .await;
    let after = log.high_watermarks().await;
    let moved: Vec<(i32, i64)> = after
        .iter()
        .map(|(partition, high)| (*partition, high - before[partition]))
        .filter(|(_, grown)| *grown != 0)
        .collect();
    assert_eq!(
        moved.len(),
        1,
        "one increment is one record in one partition: {moved:?}"
    );
    let (partition, grown) = moved[0];
    assert_eq!(grown, 1, "one increment is one record: {moved:?}");
    partition
}

/// What PostgreSQL says the aggregator applied, per partition.
async fn applied_offsets(pool: &PgPool, args: &ServeArgs) -> HashMap<i32, i64> {
    sqlx::query_as::<_, (i32, i64)>(
        "SELECT kafka_partition, next_offset FROM consumer_offsets
         WHERE consumer_group = $1 AND topic = $2",
    )
    .bind(&args.aggregator.aggregator_group)
    .bind(&args.store.kafka_topic)
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

async fn postgres_totals(pool: &PgPool) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("SELECT name, total FROM counters")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Deletes the partition's records below `before`, as retention would, and returns the new low
/// watermark the broker reports.
async fn delete_records(args: &ServeArgs, partition: i32, before: i64) -> Offset {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.store.kafka_brokers)
        .create()
        .unwrap();
    let mut offsets = TopicPartitionList::new();
    offsets
        .add_partition_offset(&args.store.kafka_topic, partition, Offset::Offset(before))
        .unwrap();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let result = admin
        .delete_records(&offsets, &options)
        .await
        .expect("kafka should delete the records");
    let element = result
        .find_partition(&args.store.kafka_topic, partition)
        .expect("the result should name the partition");
    element
        .error()
        .expect("kafka should delete the partition's records");
    element.offset()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_whose_unapplied_records_were_deleted_is_refused_and_the_others_go_on() {
    let suffix = random_suffix();
    let mut args = test_args(&suffix);
    use_fresh_database(&mut args, &suffix).await;
    // No aggregator yet: the records wait in the log, unapplied.
    args.roles = vec![Role::Ingest, Role::Read];
    let ingest = Process::start(args.clone()).await;
    let pool = tally_infra::postgres::connect(&args.store).unwrap();
    let log = Log::new(&args);

    // One record per counter, until every partition holds records of two counters at least.
    let mut counters_of: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    let partitions = log.watermarks().await.len();
    let mut written: HashMap<String, i64> = HashMap::new();
    for index in 0.. {
        let enough = counters_of.len() == partitions && counters_of.values().all(|c| c.len() >= 2);
        if enough {
            break;
        }
        assert!(
            index < 200,
            "200 names never filled {partitions} partitions"
        );
        let name = format!("gap-{index}");
        let partition = increment_and_locate(&ingest, &log, &name, 1).await;
        counters_of.entry(partition).or_default().push(name.clone());
        written.insert(name, 1);
    }
    println!("counters per partition: {counters_of:?}");

    // Retention takes the refused partition's first record: the counter that had it, `lost`,
    // is gone from the log, and `kept`, recorded after it, is still there to be read.
    let gap_partition = *counters_of.keys().next().unwrap();
    let lost = counters_of[&gap_partition][0].clone();
    let kept = counters_of[&gap_partition][1].clone();
    let before_deletion = log.watermarks().await[&gap_partition];
    assert_eq!(before_deletion.0, 0, "nothing was deleted yet");
    let low = delete_records(&args, gap_partition, 1).await;
    assert_eq!(
        low,
        Offset::Offset(1),
        "the low watermark moved past offset 0"
    );
    let (low, high) = log.watermarks().await[&gap_partition];
    assert_eq!((low, high), (1, before_deletion.1));

    let mut aggregator_args = args.clone();
    aggregator_args.roles = vec![Role::Aggregator];
    aggregator_args.http.http_addr = "127.0.0.1:0".parse().unwrap();
    let aggregator = Process::start(aggregator_args).await;

    // Records written while the aggregator runs: one more in the refused partition, one in another.
    let other_partition = *counters_of.keys().nth(1).unwrap();
    let other = counters_of[&other_partition][0].clone();
    assert_eq!(
        increment_and_locate(&ingest, &log, &kept, 100).await,
        gap_partition
    );
    assert_eq!(
        increment_and_locate(&ingest, &log, &other, 100).await,
        other_partition
    );
    *written.get_mut(&kept).unwrap() += 100;
    *written.get_mut(&other).unwrap() += 100;

    wait_until(
        Duration::from_secs(60),
        "the aggregator reports the gap in the refused partition",
        || async {
            aggregator
                .partition_gauge("tally_aggregator_offset_gap_records", gap_partition)
                .await
                .is_some_and(|missing| missing > 0)
        },
    )
    .await;
    assert_eq!(
        aggregator
            .partition_gauge("tally_aggregator_offset_gap_records", gap_partition)
            .await,
        Some(low),
        "the gauge counts the deleted records: from offset 0 to the low watermark"
    );

    // The other partitions are applied in full, twice over: every record of theirs in the log,
    // then one more written after that, so the aggregator has committed windows since it met the
    // gap.
    let expected_elsewhere = |written: &HashMap<String, i64>| -> HashMap<String, i64> {
        written
            .iter()
            .filter(|(name, _)| !counters_of[&gap_partition].contains(name))
            .map(|(name, total)| (name.clone(), *total))
            .collect()
    };
    for round in 0..2 {
        if round == 1 {
            assert_eq!(
                increment_and_locate(&ingest, &log, &other, 1_000).await,
                other_partition
            );
            *written.get_mut(&other).unwrap() += 1_000;
        }
        let highs = log.high_watermarks().await;
        let expected = expected_elsewhere(&written);
        wait_until(
            Duration::from_secs(60),
            "postgres applied every record of the partitions without a gap",
            || async {
                let applied = applied_offsets(&pool, &args).await;
                let caught_up = highs
                    .iter()
                    .filter(|(partition, _)| **partition != gap_partition)
                    .all(|(partition, high)| applied.get(partition) == Some(high));
                let totals = postgres_totals(&pool).await;
                caught_up
                    && expected
                        .iter()
                        .all(|(name, total)| totals.get(name) == Some(total))
            },
        )
        .await;
    }

    let totals = postgres_totals(&pool).await;
    for name in &counters_of[&gap_partition] {
        assert_eq!(
            totals.get(name),
            None,
            "{name} lives in the refused partition and must not be applied"
        );
    }
    assert_eq!(totals.get(&lost), None);
    assert_eq!(totals.get(&kept), None);
    let applied = applied_offsets(&pool, &args).await;
    assert_eq!(
        applied.get(&gap_partition).copied().unwrap_or(0),
        0,
        "the refused partition's offset stays where it was: {applied:?}"
    );
    assert!(
        aggregator
            .partition_gauge("tally_aggregator_offset_gap_records", gap_partition)
            .await
            .is_some_and(|missing| missing > 0),
        "the gap is still reported"
    );
    assert!(
        !aggregator.server.is_finished(),
        "the aggregator keeps running with one partition refused"
    );
    assert!(!ingest.server.is_finished());
}
