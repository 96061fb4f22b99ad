//! Idempotency keys: a retried increment counts once, however and whenever it is retried, and
//! even when Redis lost everything in between.

mod common;

use std::time::Duration;

use common::{OwnRedis, TestApp, random_suffix, start, test_args, use_fresh_database, wait_until};
use serde_json::{Value, json};

async fn spawn_app_on(redis: &OwnRedis) -> TestApp {
    let suffix = random_suffix();
    let mut args = test_args(&suffix);
    use_fresh_database(&mut args, &suffix).await;
    args.store.redis_url = redis.url();
    start(args).await
}

async fn increment_with_key(app: &TestApp, name: &str, by: i64, key: &str) -> (u16, Value) {
    let response = app
        .http
        .post(app.url(&format!("/v1/counters/{name}/increment")))
        .header("Idempotency-Key", key)
        .json(&json!({ "by": by }))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn flush(redis: &OwnRedis) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut connection)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_key_counts_once_and_says_so() {
    let redis = OwnRedis::start();
    let app = spawn_app_on(&redis).await;
    let (status, body) = increment_with_key(&app, "likes", 7, "order-1").await;
    assert_eq!(
        (status, body["duplicate"].clone()),
        (202, json!(false)),
        "{body}"
    );
    for _ in 0..3 {
        let (status, body) = increment_with_key(&app, "likes", 7, "order-1").await;
        assert_eq!(
            (status, body["duplicate"].clone()),
            (202, json!(true)),
            "{body}"
        );
    }
    // Reusing the key for another amount or another counter is a client bug.
    let (status, body) = increment_with_key(&app, "likes", 8, "order-1").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["type"], "/problems/idempotency-key-reused");
    assert!(
        body["detail"].as_str().unwrap().contains("order-1"),
        "{body}"
    );
    let (status, _) = increment_with_key(&app, "shares", 7, "order-1").await;
    assert_eq!(status, 422);
    app.wait_for_exact("likes", 7).await;
    assert_eq!(app.postgres_total("shares").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_items_with_keys_count_once_within_and_across_batches() {
    let redis = OwnRedis::start();
    let app = spawn_app_on(&redis).await;
    let batch = json!({ "increments": [
        { "counter": "views", "by": 2, "idempotency_key": "b-1" },
        { "counter": "views", "by": 2, "idempotency_key": "b-1" },
        { "counter": "views", "by": 3, "idempotency_key": "b-2" },
        { "counter": "views", "by": 1 },
    ]});
    let send = || async {
        app.http
            .post(app.url("/v1/increments"))
            .json(&batch)
            .send()
            .await
            .unwrap()
    };
    let body: Value = send().await.json().await.unwrap();
    assert_eq!(body, json!({ "accepted": 4, "duplicates": 1 }));
    let body: Value = send().await.json().await.unwrap();
    assert_eq!(
        body,
        json!({ "accepted": 4, "duplicates": 3 }),
        "only the unkeyed item counts again"
    );
    let conflicting =
        json!({ "increments": [{ "counter": "views", "by": 9, "idempotency_key": "b-2" }] });
    let response = app
        .http
        .post(app.url("/v1/increments"))
        .json(&conflicting)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    app.wait_for_exact("views", 2 + 3 + 1 + 1).await;
}

/// Redis loses the fast path twice: once before the aggregator applied the key (the aggregator
/// drops the second copy), once after (PostgreSQL answers that the key is a duplicate). A replay
/// in between changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dedup_survives_redis_loss_and_replay() {
    let redis = OwnRedis::start();
    let app = spawn_app_on(&redis).await;
    let (status, _) = increment_with_key(&app, "downloads", 4, "dl-1").await;
    assert_eq!(status, 202);
    // Lost before the aggregator applied it: the retry is produced again.
    flush(&redis).await;
    let (status, _) = increment_with_key(&app, "downloads", 4, "dl-1").await;
    assert_eq!(status, 202);
    wait_until(
        Duration::from_secs(30),
        "postgres applied the key once",
        || async { app.postgres_total("downloads").await == Some(4) },
    )
    .await;
    // Lost after: PostgreSQL knows the key.
    flush(&redis).await;
    let (status, body) = increment_with_key(&app, "downloads", 4, "dl-1").await;
    assert_eq!(
        (status, body["duplicate"].clone()),
        (202, json!(true)),
        "{body}"
    );
    app.replay().await;
    app.wait_for_exact("downloads", 4).await;
    let absorbed = reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        absorbed.contains("tally_aggregator_duplicates_absorbed_total"),
        "the metric should exist"
    );
}

/// Two requests with one idempotency key, sent at the same moment, for two counters or for two
/// amounts. Whatever each answers, every `202` with `"duplicate": false` must be counted exactly
/// once, and a key reused for another increment must never answer `202` twice as a first use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_uses_of_one_key_never_lose_an_acknowledged_increment() {
    let redis = OwnRedis::start();
    let app = std::sync::Arc::new(spawn_app_on(&redis).await);
    let pairs = 200;
    let mut expected: std::collections::HashMap<String, i64> = Default::default();
    let mut statuses: std::collections::BTreeMap<u16, usize> = Default::default();
    let mut double_first_uses = 0;
    for pair in 0..pairs {
        let key = format!("race-{pair}");
        // Even pairs: one key, two counters. Odd pairs: one key, one counter, amounts 1 and 2.
        let (first, second) = if pair % 2 == 0 {
            (("race-a".to_owned(), 1), ("race-b".to_owned(), 1))
        } else {
            (("race-c".to_owned(), 1), ("race-c".to_owned(), 2))
        };
        let (a, b) = tokio::join!(
            increment_with_key(&app, &first.0, first.1, &key),
            increment_with_key(&app, &second.0, second.1, &key)
        );
        let mut first_uses = 0;
        for ((status, body), (name, by)) in [(a, first), (b, second)] {
            *statuses.entry(status).or_default() += 1;
            if status == 202 && body["duplicate"] == json!(false) {
                first_uses += 1;
                *expected.entry(name).or_default() += by;
            } else {
                assert!(
                    [202, 409, 422].contains(&status),
                    "a racing reuse of a key answers 202, 409 or 422: {status} {body}"
                );
            }
        }
        if first_uses > 1 {
            double_first_uses += 1;
        }
    }
    println!("{pairs} racing pairs answered {statuses:?}");
    for (name, value) in &expected {
        app.wait_for_exact(name, *value).await;
    }
    for name in ["race-a", "race-b", "race-c"] {
        if !expected.contains_key(name) {
            assert_eq!(app.postgres_total(name).await.unwrap_or(0), 0, "{name}");
        }
    }
    assert_eq!(
        double_first_uses, 0,
        "with Redis up, a key is claimed before it is produced: only one of two racing uses may be acknowledged as new"
    );
}
