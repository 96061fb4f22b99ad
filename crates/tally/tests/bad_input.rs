//! Every kind of bad input gets a 4xx problem+json that names the problem, and counts nothing.

mod common;

use std::time::Duration;

use common::{spawn_app_with, wait_until};
use reqwest::Method;
use serde_json::Value;

struct Case {
    what: &'static str,
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    headers: Vec<(&'static str, Vec<u8>)>,
    status: u16,
    problem: &'static str,
    detail_mentions: &'static str,
}

fn post(
    what: &'static str,
    path: &str,
    body: &str,
    status: u16,
    problem: &'static str,
    mentions: &'static str,
) -> Case {
    Case {
        what,
        method: Method::POST,
        path: path.to_owned(),
        content_type: Some("application/json"),
        body: body.as_bytes().to_vec(),
        headers: Vec::new(),
        status,
        problem,
        detail_mentions: mentions,
    }
}

fn get(
    what: &'static str,
    path: &str,
    status: u16,
    problem: &'static str,
    mentions: &'static str,
) -> Case {
    Case {
        method: Method::GET,
        content_type: None,
        body: Vec::new(),
        ..post(what, path, "", status, problem, mentions)
    }
}

fn cases() -> Vec<Case> {
    let one = "/v1/counters/victim/increment";
    let long_name = "x".repeat(257);
    let oversized = format!(r#"{{"by": 1, "pad": "{}"}}"#, "x".repeat(1_100_000));
    let oversized_batch = format!(
        r#"{{"increments": [{{"counter": "{}"}}]}}"#,
        "x".repeat(1_100_000)
    );
    vec![
        post(
            "empty name",
            "/v1/counters//increment",
            "",
            400,
            "invalid-counter-name",
            "empty",
        ),
        post(
            "name too long",
            &format!("/v1/counters/{long_name}/increment"),
            "",
            400,
            "invalid-counter-name",
            "257 characters",
        ),
        post(
            "control character in name",
            "/v1/counters/vic%0Atim/increment",
            "",
            400,
            "invalid-counter-name",
            "U+000A",
        ),
        post(
            "invalid UTF-8 in name",
            "/v1/counters/vic%FFtim/increment",
            "",
            400,
            "invalid-counter-name",
            "UTF-8",
        ),
        post(
            "by = 0",
            one,
            r#"{"by": 0}"#,
            400,
            "invalid-amount",
            "must not be 0",
        ),
        post(
            "non-integer by",
            one,
            r#"{"by": 1.5}"#,
            400,
            "invalid-amount",
            "integer",
        ),
        post(
            "by as a string",
            one,
            r#"{"by": "3"}"#,
            400,
            "invalid-amount",
            "integer",
        ),
        post(
            "by out of range",
            one,
            r#"{"by": 1000000000001}"#,
            400,
            "invalid-amount",
            "10^12",
        ),
        post(
            "by far out of range",
            one,
            r#"{"by": 1e30}"#,
            400,
            "invalid-amount",
            "10^12",
        ),
        post(
            "by below i64",
            one,
            r#"{"by": -99999999999999999999}"#,
            400,
            "invalid-amount",
            "10^12",
        ),
        post(
            "malformed JSON",
            one,
            r#"{"by": "#,
            400,
            "malformed-json",
            "EOF",
        ),
        post(
            "unknown member",
            one,
            r#"{"bye": 1}"#,
            400,
            "invalid-body",
            "bye",
        ),
        post(
            "body is not an object",
            one,
            "[1]",
            400,
            "invalid-body",
            "array",
        ),
        Case {
            content_type: Some("text/plain"),
            ..post(
                "wrong content type",
                one,
                r#"{"by": 1}"#,
                415,
                "unsupported-media-type",
                "text/plain",
            )
        },
        Case {
            content_type: None,
            ..post(
                "missing content type",
                one,
                r#"{"by": 1}"#,
                415,
                "unsupported-media-type",
                "missing",
            )
        },
        post(
            "oversized body",
            one,
            &oversized,
            413,
            "body-too-large",
            "length limit",
        ),
        Case {
            headers: vec![("idempotency-key", vec![b'k'; 129])],
            ..post(
                "idempotency key too long",
                one,
                "",
                400,
                "invalid-idempotency-key",
                "128",
            )
        },
        Case {
            headers: vec![("idempotency-key", "clé".as_bytes().to_vec())],
            ..post(
                "idempotency key not ASCII",
                one,
                "",
                400,
                "invalid-idempotency-key",
                "printable ASCII",
            )
        },
        post(
            "batch with one bad item",
            "/v1/increments",
            r#"{"increments": [{"counter": "victim", "by": 2}, {"counter": "victim", "by": 0}, {"counter": "victim"}]}"#,
            400,
            "invalid-batch",
            "item 1",
        ),
        post(
            "batch with a bad name",
            "/v1/increments",
            r#"{"increments": [{"counter": ""}]}"#,
            400,
            "invalid-batch",
            "empty",
        ),
        post(
            "batch item not an object",
            "/v1/increments",
            r#"{"increments": [7]}"#,
            400,
            "invalid-batch",
            "object",
        ),
        post(
            "batch without increments",
            "/v1/increments",
            r#"{"items": []}"#,
            400,
            "invalid-body",
            "items",
        ),
        post(
            "empty batch",
            "/v1/increments",
            r#"{"increments": []}"#,
            400,
            "invalid-body",
            "empty",
        ),
        post(
            "batch over the item limit",
            "/v1/increments",
            r#"{"increments": [{"counter": "victim"}, {"counter": "victim"}, {"counter": "victim"}, {"counter": "victim"}, {"counter": "victim"}, {"counter": "victim"}]}"#,
            400,
            "batch-too-large",
            "limit is 5",
        ),
        post(
            "oversized batch",
            "/v1/increments",
            &oversized_batch,
            413,
            "body-too-large",
            "length limit",
        ),
        post(
            "malformed batch JSON",
            "/v1/increments",
            "{",
            400,
            "malformed-json",
            "EOF",
        ),
        get(
            "empty name on read",
            "/v1/counters/",
            400,
            "invalid-counter-name",
            "empty",
        ),
        get(
            "invalid UTF-8 on read",
            "/v1/counters/%C3%28",
            400,
            "invalid-counter-name",
            "UTF-8",
        ),
        get(
            "multi-get without names",
            "/v1/counters",
            400,
            "invalid-query",
            "at least one",
        ),
        get(
            "multi-get with an empty name",
            "/v1/counters?name=",
            400,
            "invalid-counter-name",
            "empty",
        ),
        get(
            "unknown query parameter",
            "/v1/counters/victim?fersh=true",
            400,
            "invalid-query",
            "fersh",
        ),
        get(
            "bad fresh flag",
            "/v1/counters/victim?fresh=maybe",
            400,
            "invalid-query",
            "maybe",
        ),
        get(
            "unknown route",
            "/v2/counters",
            404,
            "not-found",
            "/v2/counters",
        ),
        Case {
            method: Method::DELETE,
            ..get(
                "wrong method",
                "/v1/counters/victim",
                405,
                "method-not-allowed",
                "method",
            )
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_problem_that_names_it_and_counts_nothing() {
    let app = spawn_app_with(|args| args.ingest.batch_max_items = 5).await;
    let mut table = Vec::new();
    for case in cases() {
        let mut request = app
            .http
            .request(case.method.clone(), app.url(&case.path))
            .body(case.body.clone());
        if let Some(content_type) = case.content_type {
            request = request.header("content-type", content_type);
        }
        for (name, value) in &case.headers {
            request = request.header(
                *name,
                reqwest::header::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|value| value.to_str().unwrap().to_owned());
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, case.status, "{}: {body}", case.what);
        assert_eq!(
            content_type.as_deref(),
            Some("application/problem+json"),
            "{}",
            case.what
        );
        assert_eq!(
            body["type"],
            format!("/problems/{}", case.problem),
            "{}: {body}",
            case.what
        );
        assert_eq!(body["status"], case.status, "{}", case.what);
        assert!(
            body["title"]
                .as_str()
                .is_some_and(|title| !title.is_empty()),
            "{}",
            case.what
        );
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(case.detail_mentions),
            "{}: detail {detail:?} should mention {:?}",
            case.what,
            case.detail_mentions
        );
        table.push(format!(
            "| {} | {} | {} | {} |",
            case.what, status, case.problem, detail
        ));
        if case.problem == "invalid-batch" && case.what == "batch with one bad item" {
            let errors = body["errors"].as_array().unwrap();
            assert_eq!(errors.len(), 1, "{body}");
            assert_eq!(errors[0]["index"], 1);
            assert_eq!(errors[0]["field"], "by");
        }
    }
    println!("{}", table.join("\n"));

    // Nothing above reached Kafka: after one good increment the topic holds exactly one record,
    // and PostgreSQL holds exactly that increment.
    let response = app.increment("sentinel", 1).await;
    assert_eq!(response.status(), 202);
    wait_until(
        Duration::from_secs(30),
        "the aggregator applied the one record",
        || async {
            let applied: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap();
            applied == 1
        },
    )
    .await;
    let totals = app.postgres_totals().await;
    assert_eq!(totals, [("sentinel".to_string(), 1)].into_iter().collect());
}
