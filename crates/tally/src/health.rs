//! `/healthz`: the process is up. `/readyz`: Redis, Kafka and PostgreSQL all answer.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rdkafka::producer::{BaseProducer, Producer as _};
use redis::aio::ConnectionManager;
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use tally_infra::Problem;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Dependencies {
    pub redis: ConnectionManager,
    pub pool: PgPool,
    pub kafka: Arc<BaseProducer>,
}

/// Answers 200 whenever the process can answer at all.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The process is up")), tag = "operations")]
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "up" }))
}

/// Answers 200 when Redis, Kafka and PostgreSQL are all reachable, else 503 naming what is not.
#[utoipa::path(
    get,
    path = "/readyz",
    responses(
        (status = 200, description = "Every store is reachable"),
        (status = 503, description = "Some store is unreachable; `unavailable` names them", content_type = "application/problem+json"),
    ),
    tag = "operations"
)]
pub async fn readyz(State(dependencies): State<Arc<Dependencies>>) -> Response {
    let (redis, postgres, kafka) = tokio::join!(
        check_redis(&dependencies),
        check_postgres(&dependencies),
        check_kafka(&dependencies)
    );
    let mut checks = Map::new();
    let mut unavailable = Vec::new();
    for (store, outcome) in [("redis", redis), ("kafka", kafka), ("postgres", postgres)] {
        match outcome {
            Ok(()) => {
                checks.insert(store.into(), Value::String("ok".into()));
            }
            Err(error) => {
                checks.insert(store.into(), Value::String(error));
                unavailable.push(store);
            }
        }
    }
    if unavailable.is_empty() {
        return (
            StatusCode::OK,
            Json(json!({ "status": "ready", "checks": checks })),
        )
            .into_response();
    }
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not-ready",
        "Not ready",
        format!("unreachable: {}", unavailable.join(", ")),
    )
    .with_extension("unavailable", json!(unavailable))
    .with_extension("checks", Value::Object(checks))
    .with_retry_after(1)
    .into_response()
}

async fn check_redis(dependencies: &Dependencies) -> Result<(), String> {
    let mut redis = dependencies.redis.clone();
    match tokio::time::timeout(CHECK_TIMEOUT, tally_infra::redis_store::ping(&mut redis)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(format!("unreachable: {error}")),
        Err(_) => Err("timed out".into()),
    }
}

async fn check_postgres(dependencies: &Dependencies) -> Result<(), String> {
    match tokio::time::timeout(
        CHECK_TIMEOUT,
        tally_infra::postgres::ping(&dependencies.pool),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(format!("unreachable: {error}")),
        Err(_) => Err("timed out".into()),
    }
}

async fn check_kafka(dependencies: &Dependencies) -> Result<(), String> {
    let client = Arc::clone(&dependencies.kafka);
    let metadata = tokio::task::spawn_blocking(move || {
        client
            .client()
            .fetch_metadata(None, CHECK_TIMEOUT)
            .map(|metadata| metadata.brokers().len())
    })
    .await;
    match metadata {
        Ok(Ok(brokers)) if brokers > 0 => Ok(()),
        Ok(Ok(_)) => Err("no brokers in the metadata".into()),
        Ok(Err(error)) => Err(format!("unreachable: {error}")),
        Err(error) => Err(format!("the check failed: {error}")),
    }
}
