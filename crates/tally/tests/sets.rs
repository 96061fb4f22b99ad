//! Audited set, reset and import of plain counters, against the real stack: a set replaces
//! everything before it in the counter's partition, increments after it add on top, and the
//! audit trail says what the value was right before it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use common::{TestApp, encode, redis_command, spawn_app_with};
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "admin-secret";

async fn spawn() -> TestApp {
    spawn_app_with(|args| args.security.admin_token = Some(ADMIN_TOKEN.into())).await
}

async fn admin_post(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    let response = app
        .http
        .post(app.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn set(app: &TestApp, name: &str, value: i64, reason: &str) -> Value {
    let (status, body) = admin_post(
        app,
        &format!("/v1/admin/counters/{}/set", encode(name)),
        json!({"value": value, "reason": reason}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["counter"], name);
    assert_eq!(body["value"], value);
    body
}

async fn audit(app: &TestApp, query: &str) -> Value {
    let response = app
        .http
        .get(app.url(&format!("/v1/admin/audit?{query}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Waits until the audit trail has `count` entries for the counter, and returns them.
async fn wait_for_audit(app: &TestApp, name: &str, count: usize) -> Vec<Value> {
    let query = format!("counter={}", encode(name));
    common::wait_until(
        Duration::from_secs(30),
        &format!("{count} audit entries for {name}"),
        || async {
            audit(app, &query).await["entries"]
                .as_array()
                .unwrap()
                .len()
                == count
        },
    )
    .await;
    audit(app, &query).await["entries"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_set_replaces_what_came_before_and_later_increments_add_on_top() {
    let app = spawn().await;
    for _ in 0..5 {
        assert_eq!(app.increment("page", 1).await.status(), 202);
    }
    app.wait_for_exact("page", 5).await;

    let accepted = set(&app, "page", 100, "migrated from the old counter").await;
    let audit_id = accepted["audit_id"].as_str().unwrap().to_owned();
    assert_eq!(app.increment("page", 3).await.status(), 202);
    app.wait_for_exact("page", 103).await;
    // The set's window carries the jump, so the windows still add up to the total.
    let windows_sum: i64 =
        sqlx::query_scalar("SELECT sum(sum)::bigint FROM counter_windows WHERE name = 'page'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(windows_sum, 103);

    let entries = wait_for_audit(&app, "page", 1).await;
    let entry = &entries[0];
    assert_eq!(entry["audit_id"], audit_id.as_str());
    assert_eq!(entry["old_value"], 5);
    assert_eq!(entry["new_value"], 100);
    assert_eq!(entry["reason"], "migrated from the old counter");
    assert_eq!(entry["actor"], "admin");
    assert_eq!(entry["client"], "127.0.0.1");
    assert!(entry["requested_at"].as_str().unwrap().ends_with('Z'));

    // A reset is a set to 0, audited the same way; the trail lists the newest first.
    let (status, body) = admin_post(
        &app,
        "/v1/admin/counters/page/reset",
        json!({"reason": "new season"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["value"], 0);
    app.wait_for_exact("page", 0).await;
    let entries = wait_for_audit(&app, "page", 2).await;
    assert_eq!(
        (
            entries[0]["old_value"].as_i64(),
            entries[0]["new_value"].as_i64()
        ),
        (Some(103), Some(0))
    );
    assert!(entries[0]["seq"].as_i64() > entries[1]["seq"].as_i64());
    app.stop().await;
}

#[tokio::test]
async fn a_set_under_concurrent_increments_is_exact_in_log_order() {
    let app = Arc::new(spawn().await);
    let name = "racing";
    let acknowledged = Arc::new(AtomicI64::new(0));
    let mut writers = Vec::new();
    for _ in 0..8 {
        let app = Arc::clone(&app);
        let acknowledged = Arc::clone(&acknowledged);
        writers.push(tokio::spawn(async move {
            for _ in 0..150 {
                if app.increment(name, 1).await.status() == 202 {
                    acknowledged.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Let some increments land first, then set while the writers keep going.
    common::wait_until(
        Duration::from_secs(30),
        "some increments acknowledged",
        || {
            let acknowledged = Arc::clone(&acknowledged);
            async move { acknowledged.load(Ordering::Relaxed) >= 200 }
        },
    )
    .await;
    set(&app, name, 10_000, "mid-flight").await;
    for writer in writers {
        writer.await.unwrap();
    }
    let acknowledged = acknowledged.load(Ordering::Relaxed);
    assert_eq!(
        acknowledged, 1_200,
        "every increment should be acknowledged"
    );

    // What came before the set is in the audit row's old value; what came after is on top of
    // the set. Together they are every acknowledged increment, each once.
    let entries = wait_for_audit(&app, name, 1).await;
    let before = entries[0]["old_value"].as_i64().unwrap();
    let expected = 10_000 + (acknowledged - before);
    app.wait_for_exact(name, expected).await;
    println!(
        "{acknowledged} increments raced a set: {before} before it, {} after it; value {expected}",
        acknowledged - before
    );
    assert!(before >= 200 && before <= acknowledged, "before = {before}");
    Arc::into_inner(app).unwrap().stop().await;
}

#[tokio::test]
async fn a_set_survives_a_replay_and_a_retry_from_before_it_is_not_counted_again() {
    let app = spawn().await;
    let name = "replayed";
    let keyed = |key: &'static str| {
        app.http
            .post(app.url(&format!("/v1/counters/{name}/increment")))
            .header("Idempotency-Key", key)
            .json(&json!({"by": 7}))
            .send()
    };
    assert_eq!(keyed("before-the-set").await.unwrap().status(), 202);
    app.wait_for_exact(name, 7).await;
    set(&app, name, 50, "correction").await;
    app.wait_for_exact(name, 50).await;

    // A retry of an increment acknowledged before the set was counted then: not again now.
    let retry = keyed("before-the-set").await.unwrap();
    assert_eq!(retry.status(), 202);
    assert_eq!(retry.json::<Value>().await.unwrap()["duplicate"], true);
    assert_eq!(keyed("after-the-set").await.unwrap().status(), 202);
    app.wait_for_exact(name, 57).await;

    // Redis loses the counter's bucket; the replay rebuilds it from PostgreSQL.
    let url = &app.args.store.redis_url;
    let pattern = format!("{}*", app.args.store.redis_prefix);
    let keys: Vec<String> = redis_command(url, redis::cmd("KEYS").arg(&pattern)).await;
    for key in keys {
        let _: i64 = redis_command(url, redis::cmd("DEL").arg(&key)).await;
    }
    app.replay().await;
    app.wait_for_exact(name, 57).await;
    app.stop().await;
}

#[tokio::test]
async fn an_import_sets_many_counters_at_once_and_bad_ones_set_nothing() {
    let app = spawn().await;
    assert_eq!(app.increment("imported-a", 9).await.status(), 202);
    let (status, body) = admin_post(
        &app,
        "/v1/admin/import",
        json!({"counters": [
            {"counter": "imported-a", "value": 1_000},
            {"counter": "imported-b", "value": 2_000},
            {"counter": "imported-c", "value": -5},
        ], "reason": "moved from countapi"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["counters"].as_array().unwrap().len(), 3);
    app.wait_for_exact("imported-a", 1_000).await;
    app.wait_for_exact("imported-b", 2_000).await;
    app.wait_for_exact("imported-c", -5).await;
    let entries = wait_for_audit(&app, "imported-b", 1).await;
    assert_eq!(entries[0]["reason"], "moved from countapi");
    assert_eq!(entries[0]["old_value"], 0);

    // One bad item refuses the whole import, and says which.
    let (status, body) = admin_post(
        &app,
        "/v1/admin/import",
        json!({"counters": [
            {"counter": "imported-a", "value": 1},
            {"counter": "", "value": 3},
            {"counter": "imported-d", "value": 1.5},
        ]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let indexes: Vec<i64> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|error| error["index"].as_i64().unwrap())
        .collect();
    assert_eq!(indexes, vec![1, 2], "{body}");
    // A counter named twice is well formed but ambiguous.
    let (status, body) = admin_post(
        &app,
        "/v1/admin/import",
        json!({"counters": [
            {"counter": "imported-a", "value": 1},
            {"counter": "imported-e", "value": 2.0},
            {"counter": "imported-a", "value": 2},
        ]}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["type"], "/problems/repeated-counter");
    assert_eq!(body["errors"][0]["index"], 2, "{body}");
    assert_eq!(app.postgres_total("imported-a").await, Some(1_000));
    app.stop().await;
}

#[tokio::test]
async fn set_routes_refuse_bad_input_and_missing_tokens_with_problems() {
    let app = spawn().await;
    let cases = [
        (json!({"value": 1}), "invalid-body"),
        (json!({"value": 1, "reason": "   "}), "invalid-reason"),
        (json!({"value": "1", "reason": "x"}), "invalid-value"),
        (
            json!({"value": 9_223_372_036_854_775_808u64, "reason": "x"}),
            "invalid-value",
        ),
        (
            json!({"value": 1, "reason": "x", "extra": true}),
            "invalid-body",
        ),
        (json!({"reason": "x"}), "invalid-value"),
        (
            json!({"value": 1, "reason": "x".repeat(501)}),
            "invalid-reason",
        ),
        (json!({"value": 1, "reason": "a\0b"}), "invalid-reason"),
        (
            json!({"value": 1, "reason": "two\nlines"}),
            "invalid-reason",
        ),
        (json!({"value": 1.5, "reason": "x"}), "invalid-value"),
    ];
    for (body, problem) in cases {
        let (status, answer) = admin_post(&app, "/v1/admin/counters/c/set", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(
            answer["type"],
            format!("/problems/{problem}"),
            "{body} -> {answer}"
        );
    }
    let response = app
        .http
        .post(app.url("/v1/admin/counters/c/set"))
        .json(&json!({"value": 1, "reason": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let (status, answer) = admin_post(
        &app,
        "/v1/admin/counters//set",
        json!({"value": 1, "reason": "x"}),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["type"], "/problems/invalid-counter-name");
    let response = app
        .http
        .get(app.url("/v1/admin/audit?limit=0"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    app.stop().await;
}

#[tokio::test]
async fn reads_never_show_the_value_from_before_a_set_as_fresh() {
    let app = spawn().await;
    let name = "fresh-after-set";
    assert_eq!(app.increment(name, 40).await.status(), 202);
    app.wait_for_exact(name, 40).await;
    for round in 0..5 {
        let value = 1_000 * (round + 1);
        set(&app, name, value, "read right after").await;
        // From the 202 on, a fresh read shows the set or says it is stale: never 40 (or an
        // earlier set) as if it were the counter's value now.
        let mut stale_reads = 0;
        loop {
            let read = app.read(name, true).await;
            if read["value"] == value {
                break;
            }
            assert_eq!(
                read["stale"], true,
                "round {round}: a read showed {read} as fresh after a set to {value}"
            );
            stale_reads += 1;
        }
        println!("set to {value}: {stale_reads} stale reads before it showed");
    }
    app.wait_for_exact(name, 5_000).await;
    app.stop().await;
}

#[tokio::test]
async fn a_retried_set_with_an_idempotency_key_applies_once() {
    let app = spawn().await;
    let name = "retried-set";
    let send = || {
        app.http
            .post(app.url(&format!("/v1/admin/counters/{name}/set")))
            .bearer_auth(ADMIN_TOKEN)
            .header("Idempotency-Key", "set-once")
            .json(&json!({"value": 100, "reason": "retried"}))
            .send()
    };
    let first: Value = send().await.unwrap().json().await.unwrap();
    app.wait_for_exact(name, 100).await;
    assert_eq!(app.increment(name, 3).await.status(), 202);
    // The retry lands after the increment; applied again, it would wipe it.
    let retry: Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(retry["audit_id"], first["audit_id"], "{retry}");
    assert_eq!(app.increment(name, 1).await.status(), 202);
    app.wait_for_exact(name, 104).await;
    assert_eq!(wait_for_audit(&app, name, 1).await.len(), 1);
    app.stop().await;
}
