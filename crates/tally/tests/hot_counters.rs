//! Hot counters: concurrent increments of one counter share Kafka records (group commit), and a
//! counter's writes spread over more Redis keys as it gets hot, while cold ones keep one key.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{spawn_app_with, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_counter_is_grouped_into_fewer_records_and_spread_over_more_shards() {
    let app = Arc::new(spawn_app_with(|args| args.ingest.increments_per_shard = 50).await);
    let requests = 400;
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let app = app.clone();
        clients.spawn(async move {
            for _ in 0..requests / 50 {
                assert_eq!(app.increment("viral", 1).await.status(), 202);
            }
        });
    }
    assert_eq!(app.increment("cold", 1).await.status(), 202);
    while let Some(client) = clients.join_next().await {
        client.unwrap();
    }
    wait_until(
        Duration::from_secs(30),
        "postgres has every increment",
        || async { app.postgres_totals().await.get("viral") == Some(&(requests as i64)) },
    )
    .await;
    // Every record is applied once the offsets reach the end of the log.
    let records: i64 = sqlx::query_scalar("SELECT sum(next_offset)::bigint FROM consumer_offsets")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    println!(
        "{requests} concurrent increments of one counter travelled in {} records",
        records - 1
    );
    assert!(
        records - 1 < requests as i64,
        "group commit should put several increments in one record"
    );

    // A counter that uses more than one shard in a window says so in its shard 0 (field `n`).
    let mut redis = app.redis.clone();
    let prefix = &app.args.store.redis_prefix;
    let shard_zeros: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{}}{prefix}:d:*:0:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut spread = Vec::new();
    for key in &shard_zeros {
        let shards: Option<u32> = redis::cmd("HGET")
            .arg(key)
            .arg("n")
            .query_async(&mut redis)
            .await
            .unwrap();
        if shards.is_some_and(|shards| shards > 1) {
            spread.push(key.clone());
        }
    }
    assert!(
        spread.iter().any(|key| key.ends_with(":viral")),
        "the hot counter uses several shards: {shard_zeros:?}"
    );
    assert!(
        !spread.iter().any(|key| key.ends_with(":cold")),
        "the cold counter keeps one shard"
    );
    let read = app.read("viral", true).await;
    assert_eq!(read["value"], requests, "{read}");
}
