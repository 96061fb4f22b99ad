//! Idempotency keys under races: a key is claimed in Redis before its increment is produced, so
//! while one use is in flight every other request with the key gets `409` and nothing of it is
//! counted; a batch is refused whole (`409` or `422`) when one of its items is. With Redis
//! unreachable there is no claim, so two different uses of one key are both acknowledged and
//! both counted, and the aggregator says so in `tally_idempotency_conflicts_total`.

mod common;

use std::time::Duration;

use common::{
    OwnRedis, TestApp, encode, random_suffix, redis_command, spawn_app, start, test_args,
    use_fresh_database, wait_until,
};
use futures_util::future::join_all;
use serde_json::{Value, json};

/// What Tally answered, with the headers these tests look at.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: Option<String>,
    retry_after: Option<String>,
    body: Value,
}

impl Answer {
    async fn from(response: reqwest::Response) -> Self {
        let header = |name: reqwest::header::HeaderName| {
            response
                .headers()
                .get(name)
                .map(|value| value.to_str().unwrap().to_owned())
        };
        let content_type = header(reqwest::header::CONTENT_TYPE);
        let retry_after = header(reqwest::header::RETRY_AFTER);
        Self {
            status: response.status().as_u16(),
            content_type,
            retry_after,
            body: response.json().await.unwrap(),
        }
    }

    fn is_first_use(&self) -> bool {
        self.status == 202 && self.body["duplicate"] == json!(false)
    }

    fn is_duplicate(&self) -> bool {
        self.status == 202 && self.body["duplicate"] == json!(true)
    }

    /// Asserts this is the problem+json `409` of a key in flight, with a `Retry-After`.
    fn assert_in_flight(&self) {
        assert_eq!(self.status, 409, "{self:?}");
        assert_eq!(
            self.content_type.as_deref(),
            Some("application/problem+json"),
            "{self:?}"
        );
        assert_eq!(
            self.body["type"], "/problems/idempotency-key-in-flight",
            "{self:?}"
        );
        let retry_after: u64 = self
            .retry_after
            .as_deref()
            .expect("a 409 should say when to retry")
            .parse()
            .expect("Retry-After should be a number of seconds");
        assert!(retry_after >= 1, "{self:?}");
    }
}

async fn spawn_app_on(redis: &OwnRedis) -> TestApp {
    let suffix = random_suffix();
    let mut args = test_args(&suffix);
    use_fresh_database(&mut args, &suffix).await;
    args.store.redis_url = redis.url();
    start(args).await
}

async fn increment_with_key(app: &TestApp, name: &str, by: i64, key: &str) -> Answer {
    let response = app
        .http
        .post(app.url(&format!("/v1/counters/{}/increment", encode(name))))
        .header("Idempotency-Key", key)
        .json(&json!({ "by": by }))
        .send()
        .await
        .expect("the request should reach tally");
    Answer::from(response).await
}

async fn send_batch(app: &TestApp, batch: &Value) -> Answer {
    let response = app
        .http
        .post(app.url("/v1/increments"))
        .json(batch)
        .send()
        .await
        .expect("the request should reach tally");
    Answer::from(response).await
}

/// The Redis key that holds an idempotency key's claim (see tally-ingest's `idempotency.rs`).
fn claim_key(app: &TestApp, key: &str) -> String {
    format!("{{}}{}:i:{key}", app.args.store.redis_prefix)
}

/// Where PostgreSQL says the aggregator stands, per partition.
async fn applied_offsets(app: &TestApp) -> std::collections::HashMap<i32, i64> {
    sqlx::query_as::<_, (i32, i64)>(
        "SELECT kafka_partition, next_offset FROM consumer_offsets
         WHERE consumer_group = $1 AND topic = $2",
    )
    .bind(&app.args.aggregator.aggregator_group)
    .bind(&app.args.store.kafka_topic)
    .fetch_all(&app.pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// Produces a sentinel increment, then waits until PostgreSQL has applied every record the log
/// holds now, the sentinel's included: whatever a refused request might have produced before it
/// would be counted by then.
async fn drain_pipeline(app: &TestApp) {
    let sentinel = format!("sentinel-{}", random_suffix());
    assert_eq!(app.increment(&sentinel, 1).await.status(), 202);
    let produced: Vec<(i32, i64)> = common::kafka_watermarks(&app.args.store)
        .await
        .into_iter()
        .map(|(partition, (_, high))| (partition, high))
        .collect();
    wait_until(
        Duration::from_secs(30),
        "postgres applied every record in the log, the sentinel's included",
        || async {
            let applied = applied_offsets(app).await;
            app.postgres_total(&sentinel).await == Some(1)
                && produced
                    .iter()
                    .all(|(partition, high)| applied.get(partition).copied().unwrap_or(0) >= *high)
        },
    )
    .await;
}

/// The value of an unlabelled counter on `/metrics`, 0 when it has not been exported yet.
async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

/// Twenty copies of one retry at once: exactly one is the first use, the others are `409` (the
/// first is in flight) or duplicates (it was acknowledged already), and the counter moves once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_copies_of_one_retry_are_counted_once() {
    let app = spawn_app().await;
    let (name, by, key) = ("storm", 7, "storm-key");
    let copies = 20;
    let answers = join_all((0..copies).map(|_| increment_with_key(&app, name, by, key))).await;
    let (mut first_uses, mut duplicates, mut in_flight) = (0, 0, 0);
    for answer in &answers {
        if answer.is_first_use() {
            first_uses += 1;
        } else if answer.is_duplicate() {
            duplicates += 1;
        } else {
            answer.assert_in_flight();
            in_flight += 1;
        }
    }
    println!(
        "{copies} racing copies: {first_uses} first use, {duplicates} duplicates, {in_flight} in flight"
    );
    assert_eq!(
        first_uses, 1,
        "with Redis up exactly one copy is acknowledged as the first use: {answers:#?}"
    );
    app.wait_for_exact(name, by).await;

    // The copies told to wait retry until they learn the first use was acknowledged.
    for _ in 0..in_flight {
        wait_until(
            Duration::from_secs(30),
            "a retry of a 409 is answered as a duplicate",
            || async {
                let answer = increment_with_key(&app, name, by, key).await;
                if answer.status == 409 {
                    answer.assert_in_flight();
                    return false;
                }
                assert!(
                    answer.is_duplicate(),
                    "a retry after the first use was acknowledged is a duplicate: {answer:?}"
                );
                true
            },
        )
        .await;
    }
    drain_pipeline(&app).await;
    app.wait_for_exact(name, by).await;
}

/// A batch one of whose keys is held by a request in flight is refused whole with `409`: none
/// of its items is counted, and the claims it made itself are given back. Once the claim is
/// gone, the same batch is accepted and counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_with_a_key_in_flight_gets_409_and_counts_nothing() {
    let redis = OwnRedis::start();
    let app = spawn_app_on(&redis).await;
    // Another request holds `order-77` while it produces `held` +5.
    let held_claim = claim_key(&app, "order-77");
    let held_value = "P 00000000deadbeef 5:held";
    redis_command::<()>(
        &redis.url(),
        redis::cmd("SET")
            .arg(&held_claim)
            .arg(held_value)
            .arg("PX")
            .arg(120_000),
    )
    .await;

    let batch = json!({ "increments": [
        { "counter": "batch-a", "by": 1 },
        { "counter": "batch-b", "by": 2, "idempotency_key": "fresh-77" },
        { "counter": "held", "by": 5, "idempotency_key": "order-77" },
        { "counter": "batch-c", "by": 3 },
    ]});
    let answer = send_batch(&app, &batch).await;
    answer.assert_in_flight();
    assert_eq!(answer.body["index"], 2, "{answer:?}");
    assert!(
        answer.body["detail"].as_str().unwrap().contains("order-77"),
        "{answer:?}"
    );
    // It gave back the claim it made for `fresh-77`, and left the other request's claim alone.
    let fresh_claims: i64 = redis_command(
        &redis.url(),
        redis::cmd("EXISTS").arg(claim_key(&app, "fresh-77")),
    )
    .await;
    assert_eq!(fresh_claims, 0, "the refused batch released its own claim");
    let held_now: Option<String> =
        redis_command(&redis.url(), redis::cmd("GET").arg(&held_claim)).await;
    assert_eq!(held_now.as_deref(), Some(held_value));

    // A single increment with the key waits too, whatever its use.
    increment_with_key(&app, "held", 5, "order-77")
        .await
        .assert_in_flight();
    increment_with_key(&app, "elsewhere", 1, "order-77")
        .await
        .assert_in_flight();

    drain_pipeline(&app).await;
    let names: Vec<String> = ["batch-a", "batch-b", "held", "batch-c", "elsewhere"]
        .map(String::from)
        .to_vec();
    assert_eq!(
        app.postgres_totals_of(&names).await,
        Default::default(),
        "nothing of a refused request is counted"
    );

    // The request holding the key failed and released it: the client's retry goes through.
    redis_command::<()>(&redis.url(), redis::cmd("DEL").arg(&held_claim)).await;
    let answer = send_batch(&app, &batch).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(answer.body, json!({ "accepted": 4, "duplicates": 0 }));
    for (name, by) in [("batch-a", 1), ("batch-b", 2), ("held", 5), ("batch-c", 3)] {
        app.wait_for_exact(name, by).await;
    }
    assert_eq!(app.postgres_total("elsewhere").await, None);
}

/// A batch reusing an acknowledged key for another amount is refused whole with `422`: nothing
/// of it is counted, and a new key it carried stays free for its first real use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_reusing_an_acknowledged_key_gets_422_and_counts_nothing() {
    let app = spawn_app().await;
    assert!(
        increment_with_key(&app, "paid", 3, "invoice-9")
            .await
            .is_first_use()
    );

    let batch = json!({ "increments": [
        { "counter": "extra-a", "by": 1 },
        { "counter": "extra-b", "by": 2, "idempotency_key": "fresh-9" },
        { "counter": "paid", "by": 4, "idempotency_key": "invoice-9" },
        { "counter": "paid", "by": 1 },
    ]});
    let answer = send_batch(&app, &batch).await;
    assert_eq!(answer.status, 422, "{answer:?}");
    assert_eq!(
        answer.content_type.as_deref(),
        Some("application/problem+json")
    );
    assert_eq!(answer.body["type"], "/problems/idempotency-key-reused");
    assert_eq!(answer.body["index"], 2, "{answer:?}");
    assert!(
        answer.body["detail"]
            .as_str()
            .unwrap()
            .contains("invoice-9"),
        "{answer:?}"
    );
    let fresh_claims: i64 = redis_command(
        &app.args.store.redis_url,
        redis::cmd("EXISTS").arg(claim_key(&app, "fresh-9")),
    )
    .await;
    assert_eq!(fresh_claims, 0, "the refused batch released its own claim");

    drain_pipeline(&app).await;
    assert_eq!(app.postgres_total("paid").await, Some(3));
    let extras: Vec<String> = ["extra-a", "extra-b"].map(String::from).to_vec();
    assert_eq!(
        app.postgres_totals_of(&extras).await,
        Default::default(),
        "nothing of a refused batch is counted"
    );

    // `fresh-9` was never used: its first real use, for anything, is a first use.
    assert!(
        increment_with_key(&app, "later", 6, "fresh-9")
            .await
            .is_first_use()
    );
    app.wait_for_exact("later", 6).await;
    app.wait_for_exact("paid", 3).await;
    assert_eq!(app.postgres_totals_of(&extras).await, Default::default());
}

/// With Redis unreachable nothing can claim a key: two different uses of one key sent together
/// are both acknowledged as first uses, so both must count, and the aggregator reports the
/// conflict. Once applied, PostgreSQL knows both uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_unreachable_two_uses_of_one_key_both_count() {
    let mut redis = OwnRedis::start();
    let app = spawn_app_on(&redis).await;
    let conflicts_before = metric(&app, "tally_idempotency_conflicts_total").await;
    redis.stop();

    let (a, b) = tokio::join!(
        increment_with_key(&app, "split-a", 1, "split-key"),
        increment_with_key(&app, "split-b", 2, "split-key"),
    );
    assert!(a.is_first_use(), "{a:?}");
    assert!(b.is_first_use(), "{b:?}");
    wait_until(
        Duration::from_secs(30),
        "postgres counted both acknowledged uses",
        || async {
            app.postgres_total("split-a").await == Some(1)
                && app.postgres_total("split-b").await == Some(2)
        },
    )
    .await;
    wait_until(
        Duration::from_secs(10),
        "tally_idempotency_conflicts_total counts the conflict",
        || async {
            metric(&app, "tally_idempotency_conflicts_total").await >= conflicts_before + 1.0
        },
    )
    .await;

    // Still without Redis, PostgreSQL answers for the key: both uses are duplicates now, and a
    // third use is refused.
    assert!(
        increment_with_key(&app, "split-a", 1, "split-key")
            .await
            .is_duplicate()
    );
    assert!(
        increment_with_key(&app, "split-b", 2, "split-key")
            .await
            .is_duplicate()
    );
    let third = increment_with_key(&app, "split-c", 3, "split-key").await;
    assert_eq!(third.status, 422, "{third:?}");
    drain_pipeline(&app).await;
    assert_eq!(app.postgres_total("split-a").await, Some(1));
    assert_eq!(app.postgres_total("split-b").await, Some(2));
    assert_eq!(app.postgres_total("split-c").await, None);
}
