//! The mirror against the real local Redis and PostgreSQL: commits copied into buckets, lost and
//! rolled-back buckets found and repaired, the readers' trust rules, and a rebuild that Redis
//! empties halfway. Each test has its own key prefix and database.

use std::collections::BTreeMap;

use rand::Rng as _;
use redis::aio::MultiplexedConnection;
use sqlx::PgPool;
use tally_core::WindowSpec;
use tally_mirror::{
    BUCKETS, ClosedWindows, CommitToMirror, CommittedCounter, CounterSummary, KeySpace,
    MarkerFloors, Mirror, PartitionMark, RebuildSettings, RepairPolicy, Untrusted, WindowRecords,
    bucket_of,
};

const WINDOW_MS: i64 = 1_000;
const GROUP: &str = "group";
const TOPIC: &str = "topic";

struct Setup {
    mirror: Mirror,
    keys: KeySpace,
    redis: MultiplexedConnection,
    pool: PgPool,
}

async fn setup() -> Setup {
    let suffix = format!("{:012x}", rand::rng().random::<u64>() >> 16);
    let admin = PgPool::connect("postgres://tally:tally@127.0.0.1:5432/tally")
        .await
        .expect("the local PostgreSQL should be up: run deploy/local/up.sh");
    sqlx::query(&format!("CREATE DATABASE mirror_test_{suffix}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let pool = PgPool::connect(&format!(
        "postgres://tally:tally@127.0.0.1:5432/mirror_test_{suffix}"
    ))
    .await
    .unwrap();
    tally_infra::postgres::migrate(&pool).await.unwrap();
    let redis = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("the local Redis should be up: run deploy/local/up.sh");
    let keys = KeySpace::new(format!("mirrortest{suffix}"));
    let mirror = Mirror::new(keys.clone(), WindowSpec::new(WINDOW_MS, 0), 3_600_000);
    Setup {
        mirror,
        keys,
        redis,
        pool,
    }
}

impl Setup {
    /// Commits `counters` to PostgreSQL as the aggregator would (the parts the mirror reads),
    /// at `generation`, for partition 0.
    async fn commit_in_postgres(&self, generation: i64, counters: &[CommittedCounter]) {
        for counter in counters {
            sqlx::query(
                "INSERT INTO counters (name, total, version, kafka_partition, last_window_start, generation)
                 VALUES ($1, $2, $3, $4, now(), $5)
                 ON CONFLICT (name) DO UPDATE SET total = $2, version = $3, generation = $5",
            )
            .bind(&counter.name)
            .bind(counter.total)
            .bind(counter.version)
            .bind(counter.partition)
            .bind(generation)
            .execute(&self.pool)
            .await
            .unwrap();
            for (start, records) in &counter.touched_windows {
                sqlx::query(
                    "INSERT INTO counter_windows (name, window_start, sum, positive, negative)
                     VALUES ($1, to_timestamp($2 / 1000.0), $3 + $4, $3, $4)
                     ON CONFLICT (name, window_start) DO UPDATE
                         SET sum = $3 + $4, positive = $3, negative = $4",
                )
                .bind(&counter.name)
                .bind(*start as f64)
                .bind(records.positive)
                .bind(records.negative)
                .execute(&self.pool)
                .await
                .unwrap();
            }
        }
        sqlx::query(
            "INSERT INTO consumer_offsets (consumer_group, topic, kafka_partition, next_offset, closed_window_start, generation)
             VALUES ($1, $2, 0, 0, to_timestamp($3 / 1000.0), $4)
             ON CONFLICT (consumer_group, topic, kafka_partition) DO UPDATE SET generation = $4",
        )
        .bind(GROUP)
        .bind(TOPIC)
        .bind(0.0)
        .bind(generation)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    async fn apply(
        &mut self,
        generation: i64,
        known: i64,
        mirrored: i64,
        counters: &[CommittedCounter],
        recreate_lost_buckets: bool,
    ) -> tally_mirror::ApplyReport {
        self.commit_in_postgres(generation, counters).await;
        let marks = [PartitionMark {
            partition: 0,
            known_generation: known,
            mirrored_generation: mirrored,
        }];
        let commit = CommitToMirror {
            generation,
            partitions: &marks,
            counters,
            prune_before_ms: 0,
        };
        let policy = RepairPolicy {
            recreate_lost_buckets,
            new_bucket_valid_from_ms: 0,
            rolled_back_valid_from_ms: 0,
            now_ms: 0,
        };
        self.mirror
            .apply_commit(&mut self.redis, &self.pool, &commit, &policy)
            .await
            .unwrap()
    }

    async fn summary(&mut self, name: &str) -> Option<CounterSummary> {
        let encoded: Option<String> = redis::cmd("HGET")
            .arg(self.keys.bucket(bucket_of(name)))
            .arg(format!("c:{name}"))
            .query_async(&mut self.redis)
            .await
            .unwrap();
        encoded.map(|encoded| CounterSummary::decode(&encoded).expect("a summary should parse"))
    }

    /// Reads as a reader does whose floor for partition 0 is `floor`: the bucket must hold
    /// partition 0's commits up to it.
    async fn read(&mut self, names: &[&str], floor: i64) -> Vec<Result<i64, Untrusted>> {
        let closed = ClosedWindows {
            by_partition: vec![0],
            oldest_ms: 0,
        };
        let floors = MarkerFloors(BTreeMap::from([(0, floor)]));
        self.mirror
            .read_values(&mut self.redis, &closed, Some(&floors), names, 0)
            .await
            .unwrap()
            .values
            .unwrap()
    }

    async fn delete_bucket_of(&mut self, name: &str) {
        let _: i64 = redis::cmd("DEL")
            .arg(self.keys.bucket(bucket_of(name)))
            .query_async(&mut self.redis)
            .await
            .unwrap();
    }

    async fn delete_every_key(&mut self) {
        delete_keys_with_prefix(self.keys.prefix());
    }
}

/// Deletes every key of the test's prefix, on a blocking connection of its own (the shared
/// Redis holds other tests' keys too, so `KEYS` may take longer than a response timeout).
fn delete_keys_with_prefix(prefix: &str) {
    let mut connection = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{prefix}*"))
        .query(&mut connection)
        .unwrap();
    for chunk in keys.chunks(1_000) {
        let _: i64 = redis::cmd("DEL").arg(chunk).query(&mut connection).unwrap();
    }
}

fn counter(name: &str, version: i64, total: i64, windows: &[(i64, i64, i64)]) -> CommittedCounter {
    CommittedCounter {
        name: name.to_owned(),
        version,
        total,
        partition: 0,
        touched_windows: windows
            .iter()
            .map(|(start, positive, negative)| {
                (
                    *start,
                    WindowRecords {
                        positive: *positive,
                        negative: *negative,
                    },
                )
            })
            .collect(),
    }
}

#[tokio::test]
async fn commits_merge_into_the_summary_window_by_window() {
    let mut setup = setup().await;
    // The first commit finds every bucket lost (a first start) and creates them.
    let report = setup
        .apply(10, 0, 0, &[counter("a", 1, 5, &[(1_000, 5, 0)])], true)
        .await;
    assert_eq!(report.buckets_lost, BUCKETS as usize);
    assert!(report.complete());
    let report = setup
        .apply(
            11,
            10,
            10,
            &[counter("a", 2, 3, &[(1_000, 6, 0), (2_000, 0, -3)])],
            true,
        )
        .await;
    assert_eq!(report.buckets_applied, BUCKETS as usize, "{report:?}");
    let summary = setup.summary("a").await.unwrap();
    assert_eq!((summary.version, summary.total), (2, 3));
    assert_eq!(
        summary.windows,
        BTreeMap::from([
            (
                1_000,
                WindowRecords {
                    positive: 6,
                    negative: 0
                }
            ),
            (
                2_000,
                WindowRecords {
                    positive: 0,
                    negative: -3
                }
            ),
        ])
    );
    // A third commit touching one of the windows keeps the other.
    setup
        .apply(12, 11, 11, &[counter("a", 3, 4, &[(2_000, 1, -3)])], true)
        .await;
    let summary = setup.summary("a").await.unwrap();
    assert_eq!(summary.windows.len(), 2);
    assert_eq!(summary.windows[&2_000].positive, 1);
    assert_eq!(setup.read(&["a"], 12).await, vec![Ok(4)]);
}

#[tokio::test]
async fn an_evicted_bucket_is_never_read_and_the_next_commit_repairs_it() {
    let mut setup = setup().await;
    setup
        .apply(
            10,
            0,
            0,
            &[counter("evicted", 1, 7, &[(1_000, 7, 0)])],
            true,
        )
        .await;
    assert_eq!(setup.read(&["evicted"], 10).await, vec![Ok(7)]);
    setup.delete_bucket_of("evicted").await;
    assert_eq!(
        setup.read(&["evicted"], 10).await,
        vec![Err(Untrusted::BucketLost)],
        "a missing summary is never taken as zero"
    );
    // Another counter's commit visits every bucket and repairs the lost one from PostgreSQL.
    let report = setup
        .apply(
            11,
            10,
            10,
            &[counter("other", 1, 1, &[(1_000, 1, 0)])],
            true,
        )
        .await;
    assert_eq!(report.buckets_lost, 1);
    assert_eq!(report.repair.buckets_repaired, 1);
    assert_eq!(setup.read(&["evicted"], 11).await, vec![Ok(7)]);
}

#[tokio::test]
async fn a_bucket_rolled_back_to_an_older_copy_is_not_trusted_until_repaired() {
    let mut setup = setup().await;
    setup
        .apply(10, 0, 0, &[counter("old", 1, 10, &[(1_000, 10, 0)])], true)
        .await;
    let bucket = setup.keys.bucket(bucket_of("old"));
    let snapshot: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(&bucket)
        .query_async(&mut setup.redis)
        .await
        .unwrap();
    setup
        .apply(
            11,
            10,
            10,
            &[counter("old", 2, 15, &[(1_000, 15, 0)])],
            true,
        )
        .await;
    // PostgreSQL records commit 11 as mirrored; then Redis comes back with the older copy.
    let _: i64 = redis::cmd("DEL")
        .arg(&bucket)
        .query_async(&mut setup.redis)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&bucket)
        .arg(snapshot)
        .query_async(&mut setup.redis)
        .await
        .unwrap();
    assert_eq!(
        setup.read(&["old"], 11).await,
        vec![Err(Untrusted::BucketBehind)],
        "the old copy looks valid, but its marker is below what was mirrored"
    );
    let report = setup.apply(12, 11, 11, &[], true).await;
    assert_eq!((report.buckets_behind, report.buckets_rolled_back), (1, 1));
    assert_eq!(setup.read(&["old"], 12).await, vec![Ok(15)]);
}

#[tokio::test]
async fn a_new_counter_in_a_trusted_bucket_reads_its_deltas() {
    let mut setup = setup().await;
    setup.apply(10, 0, 0, &[], true).await;
    let mut pipeline = tally_mirror::DeltaPipeline::new();
    let writer = tally_mirror::DeltaWriter::new(setup.keys.clone(), 60);
    writer.add(&mut pipeline, "fresh", 1_000, 0, 4);
    writer.add(&mut pipeline, "fresh", 1_000, 0, -1);
    let _: () = pipeline
        .pipeline
        .query_async(&mut setup.redis)
        .await
        .unwrap();
    assert_eq!(setup.read(&["fresh"], 10).await, vec![Ok(3)]);
}

#[tokio::test]
async fn lost_buckets_wait_for_the_replay_when_the_aggregator_may_not_recreate_them() {
    let mut setup = setup().await;
    setup
        .apply(10, 0, 0, &[counter("left", 1, 2, &[(1_000, 2, 0)])], true)
        .await;
    setup.delete_every_key().await;
    let report = setup.apply(11, 10, 10, &[], false).await;
    assert_eq!(report.buckets_left, BUCKETS as usize);
    assert!(report.complete());
    assert_eq!(
        setup.read(&["left"], 11).await,
        vec![Err(Untrusted::BucketLost)]
    );
}

#[tokio::test]
async fn a_rebuild_emptied_halfway_never_leaves_a_bucket_trusted_with_missing_counters() {
    let mut setup = setup().await;
    let names: Vec<String> = (0..3_000).map(|index| format!("n{index}")).collect();
    let counters: Vec<CommittedCounter> = names
        .iter()
        .enumerate()
        .map(|(index, name)| counter(name, 1, index as i64 + 1, &[]))
        .collect();
    setup.apply(10, 0, 0, &counters, true).await;
    setup.delete_every_key().await;
    let settings = RebuildSettings {
        group: GROUP,
        topic: TOPIC,
        partition_count: 1,
        full: false,
        summary_window_margin: 12,
    };
    // Redis is emptied once, after the rebuild's first chunk of buckets.
    let prefix = setup.keys.prefix().to_owned();
    let mut emptied = false;
    let mut flush_once = |_progress: tally_mirror::RebuildProgress| {
        if !emptied {
            emptied = true;
            delete_keys_with_prefix(&prefix);
        }
    };
    let mut redis = setup.redis.clone();
    let report = setup
        .mirror
        .rebuild(&mut redis, &setup.pool, &settings, || 0, &mut flush_once)
        .await
        .unwrap();
    assert!(
        report.passes >= 2,
        "the emptied buckets are rebuilt: {report:?}"
    );
    assert_eq!(report.buckets_left_lost, 0);
    let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
    let values = setup.read(&wanted, 10).await;
    for (index, value) in values.iter().enumerate() {
        assert_eq!(*value, Ok(index as i64 + 1), "{}", names[index]);
    }
}

#[tokio::test]
async fn a_bucket_without_a_committed_partitions_marker_proves_no_counter_new() {
    let mut setup = setup().await;
    // A bucket with an epoch but no marker for partition 0 (created by another partition's
    // owner, or by a rebuild that has not reached it yet): a counter missing from it may well be
    // a counter of partition 0 not copied in yet.
    let bucket = setup.keys.bucket(bucket_of("cold"));
    let _: () = redis::cmd("HSET")
        .arg(&bucket)
        .arg("m:epoch")
        .arg("e")
        .arg("m:valid_from")
        .arg(0)
        .query_async(&mut setup.redis)
        .await
        .unwrap();
    assert_eq!(
        setup.read(&["cold"], 1).await,
        vec![Err(Untrusted::BucketBehind)],
        "never a made-up zero"
    );
}
