//! Strict counters against the real PostgreSQL: they never pass their limits, however many
//! requests race, a keyed add counts once, and every bad input gets a problem+json `4xx`.

mod common;

use std::collections::BTreeMap;

use common::{TestApp, encode, spawn_app};
use futures_util::future::join_all;
use serde_json::{Value, json};

const PROBLEM_JSON: &str = "application/problem+json";

struct Answer {
    status: u16,
    content_type: String,
    body: Value,
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request
        .send()
        .await
        .expect("the request should reach tally");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        content_type,
        body,
    }
}

fn strict_url(app: &TestApp, name: &str, action: &str) -> String {
    app.url(&format!("/v1/strict/{}{action}", encode(name)))
}

async fn define(app: &TestApp, name: &str, definition: Value) -> Answer {
    send(app.http.put(strict_url(app, name, "")).json(&definition)).await
}

async fn get(app: &TestApp, name: &str) -> Answer {
    send(app.http.get(strict_url(app, name, ""))).await
}

async fn add(app: &TestApp, name: &str, by: i64, key: Option<&str>) -> Answer {
    let mut request = app
        .http
        .post(strict_url(app, name, "/add"))
        .json(&json!({ "by": by }));
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    send(request).await
}

async fn cas(app: &TestApp, name: &str, expected: i64, value: i64) -> Answer {
    send(
        app.http
            .post(strict_url(app, name, "/cas"))
            .json(&json!({ "expected": expected, "value": value })),
    )
    .await
}

/// Asserts a problem+json answer of this status and type, and returns its body.
fn assert_problem(answer: &Answer, status: u16, slug: &str) -> Value {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.content_type, PROBLEM_JSON, "{}", answer.body);
    assert_eq!(
        answer.body["type"],
        format!("/problems/{slug}"),
        "{}",
        answer.body
    );
    assert_eq!(answer.body["status"], status);
    assert!(
        !answer.body["detail"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "a problem says what is wrong: {}",
        answer.body
    );
    answer.body.clone()
}

async fn create(app: &TestApp, name: &str, definition: Value) {
    let answer = define(app, name, definition).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_creates_once_and_compares_definitions() {
    let app = spawn_app().await;
    let created = define(&app, "sku:1", json!({"value": 100, "min": 0})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(
        created.body,
        json!({"counter": "sku:1", "value": 100, "min": 0, "max": null, "version": 0})
    );

    let repeated = define(&app, "sku:1", json!({"value": 100, "min": 0, "max": null})).await;
    assert_eq!(repeated.status, 200, "{}", repeated.body);
    assert_eq!(repeated.body, created.body);

    // The definition is what was created, not what the counter holds now.
    assert_eq!(add(&app, "sku:1", -30, None).await.status, 200);
    let after_change = define(&app, "sku:1", json!({"value": 100, "min": 0})).await;
    assert_eq!(after_change.status, 200, "{}", after_change.body);
    assert_eq!(after_change.body["value"], 70);
    assert_eq!(after_change.body["version"], 1);

    let different = define(&app, "sku:1", json!({"value": 100, "min": 0, "max": 500})).await;
    let problem = assert_problem(&different, 409, "strict-counter-exists");
    assert_eq!(
        problem["definition"],
        json!({"value": 100, "min": 0, "max": null})
    );
    let different_value = define(&app, "sku:1", json!({"value": 70, "min": 0})).await;
    assert_problem(&different_value, 409, "strict-counter-exists");

    let read = get(&app, "sku:1").await;
    assert_eq!(read.status, 200);
    assert_eq!(
        read.body,
        json!({"counter": "sku:1", "value": 70, "min": 0, "max": null, "version": 1})
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_buyers_never_oversell_a_stock_of_100() {
    let app = spawn_app().await;
    create(&app, "stock", json!({"value": 100, "min": 0})).await;

    let answers = join_all((0..1_000).map(|_| add(&app, "stock", -1, None))).await;
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for answer in &answers {
        *by_status.entry(answer.status).or_default() += 1;
        if answer.status == 409 {
            assert_problem(answer, 409, "limit-reached");
            assert_eq!(answer.body["value"], 0);
            assert_eq!(answer.body["min"], 0);
            assert_eq!(answer.body["max"], Value::Null);
            assert_eq!(answer.body["version"], 100);
        }
    }
    println!("1000 concurrent `add -1` on a stock of 100: answers by status {by_status:?}");
    assert_eq!(by_status.get(&200), Some(&100), "{by_status:?}");
    assert_eq!(by_status.get(&409), Some(&900), "{by_status:?}");

    // Every accepted add saw its own version: no two buyers got the same unit.
    let mut versions: Vec<i64> = answers
        .iter()
        .filter(|answer| answer.status == 200)
        .map(|answer| answer.body["version"].as_i64().unwrap())
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=100).collect::<Vec<i64>>());

    let read = get(&app, "stock").await;
    assert_eq!(read.body["value"], 0);
    assert_eq!(read.body["version"], 100);
    let stored: (i64, i64) =
        sqlx::query_as("SELECT value, version FROM strict_counters WHERE name = 'stock'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored, (0, 100));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_succeeds_on_the_expected_value_only() {
    let app = spawn_app().await;
    create(&app, "seats", json!({"value": 5, "min": 0, "max": 10})).await;

    let set = cas(&app, "seats", 5, 4).await;
    assert_eq!(set.status, 200, "{}", set.body);
    assert_eq!(
        set.body,
        json!({"counter": "seats", "value": 4, "version": 1})
    );

    let stale = cas(&app, "seats", 5, 3).await;
    let problem = assert_problem(&stale, 409, "cas-mismatch");
    assert_eq!(problem["value"], 4);
    assert_eq!(problem["version"], 1);

    let above = cas(&app, "seats", 4, 11).await;
    let problem = assert_problem(&above, 409, "limit-reached");
    assert_eq!(
        (&problem["value"], &problem["min"], &problem["max"]),
        (&json!(4), &json!(0), &json!(10))
    );
    assert_problem(&cas(&app, "seats", 4, -1).await, 409, "limit-reached");

    let read = get(&app, "seats").await;
    assert_eq!(
        (read.body["value"].clone(), read.body["version"].clone()),
        (json!(4), json!(1))
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_add_counts_once_however_often_it_is_sent() {
    let app = spawn_app().await;
    create(&app, "quota", json!({"value": 10, "min": 0})).await;
    create(&app, "other", json!({"value": 10, "min": 0})).await;

    let first = add(&app, "quota", -3, Some("order-1")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(
        first.body,
        json!({"counter": "quota", "value": 7, "version": 1})
    );
    assert_eq!(add(&app, "quota", -1, None).await.status, 200);

    let retry = add(&app, "quota", -3, Some("order-1")).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.body, first.body, "a retry answers the first outcome");
    assert_eq!(get(&app, "quota").await.body["value"], 6);

    let other_amount = add(&app, "quota", -4, Some("order-1")).await;
    assert_problem(&other_amount, 422, "idempotency-key-reused");
    let other_counter = add(&app, "other", -3, Some("order-1")).await;
    assert_problem(&other_counter, 422, "idempotency-key-reused");
    assert_eq!(get(&app, "quota").await.body["value"], 6);
    assert_eq!(get(&app, "other").await.body["value"], 10);

    // Twenty copies of one keyed add, all at once: one counts, all answer its outcome.
    let copies = join_all((0..20).map(|_| add(&app, "quota", -2, Some("order-2")))).await;
    for copy in &copies {
        assert_eq!(copy.status, 200, "{}", copy.body);
        assert_eq!(copy.body, copies[0].body);
    }
    assert_eq!(copies[0].body["value"], 4);
    let read = get(&app, "quota").await;
    assert_eq!(
        (read.body["value"].clone(), read.body["version"].clone()),
        (json!(4), json!(3))
    );

    // A refused add is refused again on retry, even once it would fit.
    create(&app, "empty", json!({"value": 0, "min": 0})).await;
    let refused = add(&app, "empty", -1, Some("order-3")).await;
    let problem = assert_problem(&refused, 409, "limit-reached");
    assert_eq!(add(&app, "empty", 5, None).await.status, 200);
    let refused_again = add(&app, "empty", -1, Some("order-3")).await;
    assert_eq!(
        assert_problem(&refused_again, 409, "limit-reached"),
        problem
    );
    assert_eq!(get(&app, "empty").await.body["value"], 5);

    let stored_keys: i64 = sqlx::query_scalar("SELECT count(*) FROM strict_idempotency")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored_keys, 3);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_both_ways_and_overflow_is_a_limit() {
    let app = spawn_app().await;
    create(&app, "bounded", json!({"value": 5, "min": 0, "max": 10})).await;
    let above = add(&app, "bounded", 6, None).await;
    let problem = assert_problem(&above, 409, "limit-reached");
    assert_eq!(
        (
            &problem["value"],
            &problem["min"],
            &problem["max"],
            &problem["version"]
        ),
        (&json!(5), &json!(0), &json!(10), &json!(0))
    );
    assert_eq!(add(&app, "bounded", 5, None).await.body["value"], 10);
    assert_problem(&add(&app, "bounded", 1, None).await, 409, "limit-reached");
    assert_problem(&add(&app, "bounded", -11, None).await, 409, "limit-reached");
    assert_eq!(add(&app, "bounded", -10, None).await.body["value"], 0);
    assert_problem(&add(&app, "bounded", -1, None).await, 409, "limit-reached");

    create(&app, "huge", json!({"value": i64::MAX - 1})).await;
    let overflow = add(&app, "huge", 2, None).await;
    assert_problem(&overflow, 409, "limit-reached");
    assert_eq!(add(&app, "huge", 1, None).await.body["value"], i64::MAX);
    assert_problem(
        &add(&app, "huge", i64::MAX, None).await,
        409,
        "limit-reached",
    );
    assert_eq!(add(&app, "huge", i64::MIN, None).await.body["value"], -1);

    create(&app, "tiny", json!({"value": i64::MIN + 1, "max": 0})).await;
    assert_problem(&add(&app, "tiny", -2, None).await, 409, "limit-reached");
    assert_problem(
        &add(&app, "tiny", i64::MIN, None).await,
        409,
        "limit-reached",
    );
    assert_eq!(get(&app, "tiny").await.body["value"], i64::MIN + 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_counters_are_404() {
    let app = spawn_app().await;
    assert_problem(&get(&app, "nope").await, 404, "strict-counter-not-found");
    assert_problem(
        &add(&app, "nope", 1, None).await,
        404,
        "strict-counter-not-found",
    );
    assert_problem(
        &add(&app, "nope", 1, Some("k")).await,
        404,
        "strict-counter-not-found",
    );
    assert_problem(
        &cas(&app, "nope", 0, 1).await,
        404,
        "strict-counter-not-found",
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_problem_that_names_it() {
    let app = spawn_app().await;
    create(&app, "c", json!({"value": 1, "min": 0})).await;
    let raw = |method: reqwest::Method, action: &str, body: &'static str| {
        app.http
            .request(method, strict_url(&app, "c", action))
            .header("content-type", "application/json")
            .body(body)
    };

    for (body, slug) in [
        ("{\"by\": 1", "malformed-json"),
        ("", "malformed-json"),
        ("{\"by\": 1, \"extra\": true}", "invalid-body"),
        ("{\"by\": \"1\"}", "invalid-body"),
        ("{\"by\": 1.5}", "invalid-body"),
        ("{\"by\": null}", "invalid-body"),
        ("{}", "invalid-body"),
        ("[1]", "invalid-body"),
        ("{\"by\": 9223372036854775808}", "invalid-body"),
        ("{\"by\": 1e30}", "invalid-body"),
    ] {
        let answer = send(raw(reqwest::Method::POST, "/add", body)).await;
        let problem = assert_problem(&answer, 400, slug);
        println!("POST add {body:?}: {}", problem["detail"]);
    }
    assert_problem(&add(&app, "c", 0, None).await, 422, "invalid-amount");
    assert_problem(
        &send(raw(reqwest::Method::POST, "/cas", "{\"expected\": 1}")).await,
        400,
        "invalid-body",
    );
    assert_problem(
        &send(raw(
            reqwest::Method::POST,
            "/cas",
            "{\"expected\": 1, \"value\": 2, \"by\": 3}",
        ))
        .await,
        400,
        "invalid-body",
    );
    let keyed_cas = raw(
        reqwest::Method::POST,
        "/cas",
        "{\"expected\": 1, \"value\": 2}",
    )
    .header("Idempotency-Key", "k-cas");
    assert_problem(&send(keyed_cas).await, 400, "idempotency-key-not-supported");
    assert_problem(
        &send(raw(
            reqwest::Method::PUT,
            "",
            "{\"value\": 1, \"minimum\": 0}",
        ))
        .await,
        400,
        "invalid-body",
    );
    assert_problem(
        &send(raw(reqwest::Method::PUT, "", "{\"min\": 0}")).await,
        400,
        "invalid-body",
    );
    assert_problem(
        &define(&app, "d", json!({"value": -1, "min": 0})).await,
        422,
        "invalid-definition",
    );
    assert_problem(
        &define(&app, "d", json!({"value": 11, "max": 10})).await,
        422,
        "invalid-definition",
    );
    assert_problem(
        &define(&app, "d", json!({"value": 5, "min": 6, "max": 4})).await,
        422,
        "invalid-definition",
    );
    assert_problem(&get(&app, "d").await, 404, "strict-counter-not-found");

    let not_json = app
        .http
        .post(strict_url(&app, "c", "/add"))
        .header("content-type", "text/plain")
        .body("{\"by\": 1}");
    assert_problem(&send(not_json).await, 415, "unsupported-media-type");
    let too_large = app
        .http
        .post(strict_url(&app, "c", "/add"))
        .header("content-type", "application/json")
        .body(format!(
            "{{\"by\": 1, \"pad\": \"{}\"}}",
            "x".repeat(64 * 1024)
        ));
    assert_problem(&send(too_large).await, 413, "body-too-large");

    let long_key = "k".repeat(129);
    assert_problem(
        &add(&app, "c", 1, Some(&long_key)).await,
        400,
        "invalid-idempotency-key",
    );
    let non_ascii_key = app
        .http
        .post(strict_url(&app, "c", "/add"))
        .header(
            "Idempotency-Key",
            reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        )
        .json(&json!({"by": 1}));
    assert_problem(&send(non_ascii_key).await, 400, "invalid-idempotency-key");

    for path in [
        "/v1/strict/a%00b",
        "/v1/strict/%FF",
        &format!("/v1/strict/{}", "n".repeat(257)),
    ] {
        assert_problem(
            &send(app.http.get(app.url(path))).await,
            400,
            "invalid-counter-name",
        );
    }
    assert_problem(
        &send(app.http.get(app.url("/v1/strict/"))).await,
        400,
        "invalid-counter-name",
    );
    assert_problem(
        &send(
            app.http
                .post(app.url("/v1/strict//add"))
                .json(&json!({"by": 1})),
        )
        .await,
        400,
        "invalid-counter-name",
    );
    assert_problem(
        &send(
            app.http
                .post(app.url("/v1/strict/a%0Ab/cas"))
                .json(&json!({"expected": 0, "value": 1})),
        )
        .await,
        400,
        "invalid-counter-name",
    );

    // None of it changed the counter.
    let read = get(&app, "c").await;
    assert_eq!(
        (read.body["value"].clone(), read.body["version"].clone()),
        (json!(1), json!(0))
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_are_pruned_and_then_count_again() {
    let app = spawn_app().await;
    create(&app, "pruned", json!({"value": 10})).await;
    assert_eq!(add(&app, "pruned", 1, Some("old")).await.body["value"], 11);
    // Age the key past the 24 h window, as if it had been applied two days ago.
    sqlx::query("UPDATE strict_idempotency SET applied_at = now() - interval '2 days'")
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(add(&app, "pruned", 1, Some("old")).await.body["value"], 12);
    assert_eq!(add(&app, "pruned", 1, Some("old")).await.body["value"], 12);

    sqlx::query("UPDATE strict_idempotency SET applied_at = now() - interval '2 days'")
        .execute(&app.pool)
        .await
        .unwrap();
    let service = tally_strict::StrictService::new(app.pool.clone(), &app.args.pipeline);
    assert_eq!(service.prune_expired_keys().await.unwrap(), 1);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM strict_idempotency")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_the_strict_routes() {
    let app = spawn_app().await;
    let document = send(app.http.get(app.url("/openapi.json"))).await.body;
    let paths = &document["paths"];
    for (path, method, statuses) in [
        (
            "/v1/strict/{name}",
            "put",
            &["200", "201", "400", "409", "422", "503"][..],
        ),
        (
            "/v1/strict/{name}",
            "get",
            &["200", "400", "404", "503"][..],
        ),
        (
            "/v1/strict/{name}/add",
            "post",
            &["200", "400", "404", "409", "422", "503"][..],
        ),
        (
            "/v1/strict/{name}/cas",
            "post",
            &["200", "400", "404", "409", "503"][..],
        ),
    ] {
        let responses = &paths[path][method]["responses"];
        for status in statuses {
            assert!(
                responses.get(*status).is_some(),
                "{method} {path} should document {status}: {responses}"
            );
        }
    }
    // Unknown members are refused, and the document says so.
    for schema in ["DefineRequest", "AddRequest", "CompareAndSetRequest"] {
        let schema = &document["components"]["schemas"][schema];
        assert_eq!(schema["additionalProperties"], false, "{schema}");
    }
    app.stop().await;
}

/// Two Tally processes on one database: the row lock, not any process's memory, decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_the_limits_and_the_keys() {
    let first = spawn_app().await;
    let second = common::start(first.args.clone()).await;
    create(&first, "shared", json!({"value": 50, "min": 0})).await;
    create(&first, "elsewhere", json!({"value": 50, "min": 0})).await;

    let buyers = (0..200).map(|index| {
        let app = if index % 2 == 0 { &first } else { &second };
        add(app, "shared", -1, None)
    });
    let answers = join_all(buyers).await;
    let sold = answers.iter().filter(|answer| answer.status == 200).count();
    let refused = answers.iter().filter(|answer| answer.status == 409).count();
    println!("200 buyers over two processes on a stock of 50: {sold} sold, {refused} refused");
    assert_eq!((sold, refused), (50, 150));
    assert_eq!(get(&second, "shared").await.body["value"], 0);

    // One key sent to both processes and to two counters at once: exactly one use counts.
    let copies = (0..20).map(|index| {
        let app = if index % 2 == 0 { &first } else { &second };
        let counter = if index % 4 < 2 { "shared" } else { "elsewhere" };
        add(app, counter, 5, Some("racing-key"))
    });
    let answers = join_all(copies).await;
    let applied: Vec<&Answer> = answers
        .iter()
        .filter(|answer| answer.status == 200)
        .collect();
    let reused = answers.iter().filter(|answer| answer.status == 422).count();
    assert_eq!(
        applied.len() + reused,
        20,
        "every copy is a replay or a reuse"
    );
    assert!(applied.iter().all(|answer| answer.body == applied[0].body));
    let winner = applied[0].body["counter"].as_str().unwrap();
    let loser = if winner == "shared" {
        "elsewhere"
    } else {
        "shared"
    };
    let expected_winner = if winner == "shared" { 5 } else { 55 };
    assert_eq!(get(&first, winner).await.body["value"], expected_winner);
    assert_eq!(
        get(&first, loser).await.body["value"],
        if loser == "shared" { 0 } else { 50 }
    );
    second.stop().await;
    first.stop().await;
}
