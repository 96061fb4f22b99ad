//! `/healthz`: the process is up. `/readyz`: Redis, Kafka and PostgreSQL all answer, with
//! warnings about settings that cost Tally something without stopping it (Redis that may evict
//! Tally's keys).

use std::collections::HashMap;
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
use tracing::{info, warn};

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Dependencies {
    pub redis: ConnectionManager,
    pub pool: PgPool,
    pub kafka: Arc<BaseProducer>,
}

/// The body of `/healthz`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Documents the wire format; the handler builds it with json!.
pub struct Liveness {
    /// Always `up`.
    #[schema(pattern = "^up$")]
    pub status: String,
}

/// The body of `/readyz` when every store answers.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Documents the wire format; the handler builds it with json!.
pub struct Readiness {
    /// Always `ready`.
    #[schema(pattern = "^ready$")]
    pub status: String,
    /// `ok` for each of `redis`, `kafka` and `postgres`.
    pub checks: HashMap<String, String>,
    /// Whether Redis may evict Tally's keys.
    pub redis_eviction: RedisEvictionLabel,
    /// Settings that cost freshness without stopping Tally.
    pub warnings: Vec<String>,
}

/// [`RedisEviction::label`].
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // Documents the wire format.
pub enum RedisEvictionLabel {
    Off,
    On,
    Unknown,
}

/// Answers 200 whenever the process can answer at all.
#[utoipa::path(
    get,
    path = "/healthz",
    responses((status = 200, description = "The process is up", body = Liveness)),
    tag = "operations"
)]
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "up" }))
}

/// Answers 200 when Redis, Kafka and PostgreSQL are all reachable, else 503 naming what is not.
#[utoipa::path(
    get,
    path = "/readyz",
    responses(
        (status = 200, description = "Every store is reachable. `warnings` lists settings that cost freshness, such as a Redis that may evict Tally's keys; `redis_eviction` is `off`, `on` or `unknown`", body = Readiness),
        (status = 503, description = "Some store is unreachable; `unavailable` names them", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    tag = "operations"
)]
pub async fn readyz(State(dependencies): State<Arc<Dependencies>>) -> Response {
    let (redis, postgres, kafka, redis_eviction) = tokio::join!(
        check_redis(&dependencies),
        check_postgres(&dependencies),
        check_kafka(&dependencies),
        redis_eviction(dependencies.redis.clone())
    );
    let warnings: Vec<String> = redis_eviction.warning().into_iter().collect();
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
            Json(json!({
                "status": "ready",
                "checks": checks,
                "redis_eviction": redis_eviction.label(),
                "warnings": warnings,
            })),
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
    .with_extension("redis_eviction", json!(redis_eviction.label()))
    .with_extension("warnings", json!(warnings))
    .with_retry_after(1)
    .into_response()
}

async fn check_redis(dependencies: &Dependencies) -> Result<(), String> {
    let mut redis = dependencies.redis.clone();
    match tokio::time::timeout(
        CHECK_TIMEOUT,
        tally_infra::redis_store::check_server(&mut redis),
    )
    .await
    {
        Ok(outcome) => outcome,
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

/// Whether Redis may evict Tally's keys to stay under its memory limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisEviction {
    /// `maxmemory-policy noeviction`, or no memory limit (`maxmemory 0`): Redis never evicts.
    Off,
    /// Redis evicts keys by `policy` once it holds `maxmemory_bytes`.
    On {
        policy: String,
        maxmemory_bytes: u64,
    },
    /// Redis did not say: managed Redis often disables `CONFIG`, or Redis did not answer.
    Unknown { reason: String },
}

impl RedisEviction {
    /// `off`, `on` or `unknown`, as `/readyz` reports it.
    pub fn label(&self) -> &'static str {
        match self {
            RedisEviction::Off => "off",
            RedisEviction::On { .. } => "on",
            RedisEviction::Unknown { .. } => "unknown",
        }
    }

    /// What an operator should know, when eviction is on.
    pub fn warning(&self) -> Option<String> {
        let RedisEviction::On {
            policy,
            maxmemory_bytes,
        } = self
        else {
            return None;
        };
        // Every policy but noeviction can reach Tally's keys: even the volatile-* ones, which
        // evict only keys with a TTL, take window deltas and idempotency keys.
        Some(format!(
            "redis maxmemory-policy {policy} can evict tally's keys once redis holds \
             maxmemory {}; reads of an evicted counter then fall back to postgres, a few \
             seconds stale, until its keys are rebuilt; run redis with maxmemory-policy \
             noeviction to avoid it",
            redis_memory_size(*maxmemory_bytes)
        ))
    }
}

/// Asks Redis for `maxmemory-policy` and `maxmemory`. Never fails: anything Redis does not
/// answer, or refuses (`CONFIG` disabled or denied by an ACL), is [`RedisEviction::Unknown`].
pub async fn redis_eviction(mut redis: ConnectionManager) -> RedisEviction {
    let mut pipeline = redis::pipe();
    pipeline
        .cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory");
    let answer = tokio::time::timeout(
        CHECK_TIMEOUT,
        pipeline.query_async::<(HashMap<String, String>, HashMap<String, String>)>(&mut redis),
    )
    .await;
    let (policies, limits) = match answer {
        Ok(Ok(answer)) => answer,
        Ok(Err(error)) => {
            return RedisEviction::Unknown {
                reason: format!("CONFIG GET failed: {error}"),
            };
        }
        Err(_) => {
            return RedisEviction::Unknown {
                reason: "CONFIG GET timed out".into(),
            };
        }
    };
    let (Some(policy), Some(maxmemory)) =
        (policies.get("maxmemory-policy"), limits.get("maxmemory"))
    else {
        return RedisEviction::Unknown {
            reason: "CONFIG GET did not return maxmemory-policy and maxmemory".into(),
        };
    };
    let Ok(maxmemory_bytes) = maxmemory.parse::<u64>() else {
        return RedisEviction::Unknown {
            reason: format!("CONFIG GET returned maxmemory {maxmemory:?}"),
        };
    };
    if policy == "noeviction" || maxmemory_bytes == 0 {
        return RedisEviction::Off;
    }
    RedisEviction::On {
        policy: policy.clone(),
        maxmemory_bytes,
    }
}

/// For `tally serve` to call once at start: logs the eviction warning `/readyz` shows, or that
/// the settings could not be read. Returns what it found.
pub async fn warn_if_redis_can_evict(redis: ConnectionManager) -> RedisEviction {
    let eviction = redis_eviction(redis).await;
    match &eviction {
        RedisEviction::Off => {}
        RedisEviction::On { .. } => {
            if let Some(warning) = eviction.warning() {
                warn!("{warning}");
            }
        }
        RedisEviction::Unknown { reason } => info!(
            reason = %reason,
            "could not read redis's eviction settings; tally's keys may be evicted unless maxmemory-policy is noeviction"
        ),
    }
    eviction
}

/// A byte count as `redis.conf` would write it: `100mb`, `2gb`, or bytes.
fn redis_memory_size(bytes: u64) -> String {
    const KB: u64 = 1024;
    for (unit, size) in [("gb", KB * KB * KB), ("mb", KB * KB), ("kb", KB)] {
        if bytes % size == 0 {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_read_as_in_redis_conf() {
        assert_eq!(redis_memory_size(100 * 1024 * 1024), "100mb");
        assert_eq!(redis_memory_size(2 * 1024 * 1024 * 1024), "2gb");
        assert_eq!(redis_memory_size(1536 * 1024 * 1024), "1536mb");
        assert_eq!(redis_memory_size(4096), "4kb");
        assert_eq!(redis_memory_size(1000), "1000 bytes");
    }

    #[test]
    fn only_eviction_that_is_on_warns() {
        let on = RedisEviction::On {
            policy: "volatile-lru".into(),
            maxmemory_bytes: 100 * 1024 * 1024,
        };
        let warning = on.warning().unwrap();
        assert!(
            warning.starts_with("redis maxmemory-policy volatile-lru can evict tally's keys"),
            "{warning}"
        );
        assert!(warning.contains("maxmemory 100mb"), "{warning}");
        assert_eq!(RedisEviction::Off.warning(), None);
        let unknown = RedisEviction::Unknown {
            reason: "CONFIG GET failed".into(),
        };
        assert_eq!(unknown.warning(), None);
        assert_eq!(unknown.label(), "unknown");
    }
}
