//! The operational routes: health, readiness, metrics, the OpenAPI document, and `tally migrate`.

mod common;

use common::{OwnRedis, random_suffix, spawn_app, test_args, use_fresh_database};
use serde_json::Value;
use tally::App;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn healthz_and_readyz_answer_200_when_everything_is_up() {
    let app = spawn_app().await;
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(
        body["checks"],
        serde_json::json!({ "redis": "ok", "kafka": "ok", "postgres": "ok" })
    );
}

/// Starts a read-only Tally (no topic to create, no migrations) against the given stores and
/// returns what `/readyz` says.
async fn readyz_with(
    redis_url: String,
    kafka_brokers: &str,
    database_url: Option<&str>,
) -> (u16, Value, Option<String>) {
    let suffix = random_suffix();
    let mut args = test_args(&suffix);
    use_fresh_database(&mut args, &suffix).await;
    args.store.redis_url = redis_url;
    args.store.kafka_brokers = kafka_brokers.to_owned();
    if let Some(database_url) = database_url {
        args.store.database_url = database_url.to_owned();
    }
    args.migrate_on_start = false;
    args.roles = vec![tally::cli::Role::Read];
    let cancel = CancellationToken::new();
    let app = App::build(args, cancel.clone()).await.unwrap();
    let url = format!("http://{}/readyz", app.local_addr());
    let server = tokio::spawn(app.run_until_stopped());
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().unwrap().to_owned());
    let body = response.json().await.unwrap();
    cancel.cancel();
    server.await.unwrap().unwrap();
    (status, body, content_type)
}

fn dead_port() -> u16 {
    // Bound and dropped: nothing listens there afterwards.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn readyz_names_a_stopped_redis() {
    let mut redis = OwnRedis::start();
    let url = redis.url();
    redis.stop();
    let (status, body, content_type) = readyz_with(url, "127.0.0.1:9092", None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    assert_eq!(body["unavailable"], serde_json::json!(["redis"]), "{body}");
    assert!(body["detail"].as_str().unwrap().contains("redis"), "{body}");
}

#[tokio::test]
async fn readyz_names_a_stopped_kafka() {
    let redis = OwnRedis::start();
    let (status, body, _) =
        readyz_with(redis.url(), &format!("127.0.0.1:{}", dead_port()), None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["unavailable"], serde_json::json!(["kafka"]), "{body}");
}

#[tokio::test]
async fn readyz_names_a_stopped_postgres() {
    let redis = OwnRedis::start();
    let database_url = format!("postgres://tally:tally@127.0.0.1:{}/tally", dead_port());
    let (status, body, _) = readyz_with(redis.url(), "127.0.0.1:9092", Some(&database_url)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["unavailable"],
        serde_json::json!(["postgres"]),
        "{body}"
    );
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_the_pipeline_series() {
    let app = spawn_app().await;
    assert_eq!(app.increment("metered", 2).await.status(), 202);
    app.read("metered", true).await;
    let response = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    for series in [
        "tally_http_requests_total",
        "tally_ingest_kafka_ack_seconds_bucket",
        "tally_ingest_increments_accepted_total",
        "tally_aggregator_window_flush_seconds_bucket",
        "tally_aggregator_window_flush_rows_bucket",
        "tally_aggregator_consumer_lag_records",
        "tally_read_values_total",
        "tally_ingest_shard_count_bucket",
    ] {
        assert!(text.contains(series), "/metrics lacks {series}");
    }
}

#[tokio::test]
async fn the_openapi_document_covers_every_route() {
    let app = spawn_app().await;
    let document: Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    for (path, method) in [
        ("/v1/counters/{name}/increment", "post"),
        ("/v1/increments", "post"),
        ("/v1/counters/{name}", "get"),
        ("/v1/counters", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
    ] {
        assert!(
            document["paths"][path][method].is_object(),
            "the document lacks {method} {path}"
        );
    }
}

#[tokio::test]
async fn tally_migrate_is_idempotent() {
    let suffix = random_suffix();
    let mut args = test_args(&suffix);
    use_fresh_database(&mut args, &suffix).await;
    for _ in 0..2 {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["migrate", "--database-url", &args.store.database_url])
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let printed = String::from_utf8_lossy(&output.stdout);
        let migrations = tally_infra::postgres::MIGRATOR.iter().count();
        assert!(
            printed.contains(&format!("{migrations} applied, schema up to date")),
            "{printed}"
        );
    }
}

#[tokio::test]
async fn every_subcommand_has_help() {
    for subcommand in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["migrate", "--help"],
        vec!["replay", "--help"],
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(&subcommand)
            .output()
            .await
            .unwrap();
        assert!(output.status.success());
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(help.contains("Usage: tally"), "{help}");
        if subcommand[0] == "serve" {
            assert!(
                help.contains("TALLY_HTTP_ADDR") && help.contains("127.0.0.1:8080"),
                "{help}"
            );
        }
    }
}
