//! A Redis that may evict Tally's keys is a warning, not a failure: `/readyz` stays 200 and
//! lists it, and `tally serve` can log it once at start. Each test runs a redis-server of its
//! own, so it can change that server's settings.

mod common;

use std::sync::{Arc, Mutex};

use common::{OwnRedis, redis_command, spawn_app_with};
use serde_json::Value;
use tally::health::{RedisEviction, redis_eviction, warn_if_redis_can_evict};

/// Starts a redis-server of the test's own with these eviction settings.
async fn redis_with(maxmemory: &str, policy: &str) -> OwnRedis {
    let redis = OwnRedis::start();
    let _: () = redis_command(
        &redis.url(),
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(maxmemory)
            .arg("maxmemory-policy")
            .arg(policy),
    )
    .await;
    redis
}

fn connection(redis: &OwnRedis) -> redis::aio::ConnectionManager {
    let mut args = tally::cli::ServeArgs::defaults();
    args.store.redis_url = redis.url();
    tally_infra::redis_store::connect(&args.store).unwrap()
}

async fn readyz_against(redis: &OwnRedis) -> Value {
    let url = redis.url();
    let app = spawn_app_with(|args| args.store.redis_url = url).await;
    let response = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(
        response.status(),
        200,
        "a warning never makes tally unready"
    );
    response.json().await.unwrap()
}

#[tokio::test]
async fn readyz_warns_when_redis_can_evict_tallys_keys() {
    let redis = redis_with("100mb", "allkeys-lru").await;
    let body = readyz_against(&redis).await;
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["redis_eviction"], "on", "{body}");
    assert_eq!(
        body["warnings"],
        serde_json::json!([
            "redis maxmemory-policy allkeys-lru can evict tally's keys once redis holds \
             maxmemory 100mb; reads of an evicted counter then fall back to postgres, a few \
             seconds stale, until its keys are rebuilt; run redis with maxmemory-policy \
             noeviction to avoid it"
        ]),
        "{body}"
    );
}

#[tokio::test]
async fn readyz_has_no_warning_when_redis_never_evicts() {
    let redis = redis_with("100mb", "noeviction").await;
    let body = readyz_against(&redis).await;
    assert_eq!(body["redis_eviction"], "off", "{body}");
    assert_eq!(body["warnings"], serde_json::json!([]), "{body}");
}

#[tokio::test]
async fn an_eviction_policy_without_a_memory_limit_never_evicts() {
    let redis = redis_with("0", "allkeys-lru").await;
    assert_eq!(redis_eviction(connection(&redis)).await, RedisEviction::Off);
    let redis = redis_with("1gb", "volatile-ttl").await;
    assert_eq!(
        redis_eviction(connection(&redis)).await,
        RedisEviction::On {
            policy: "volatile-ttl".into(),
            maxmemory_bytes: 1024 * 1024 * 1024,
        }
    );
}

#[tokio::test]
async fn a_redis_that_refuses_config_is_unknown_and_never_a_failure() {
    // As on managed Redis: the client may not run CONFIG.
    let redis = redis_with("100mb", "allkeys-lru").await;
    let _: () = redis_command(
        &redis.url(),
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg("-config"),
    )
    .await;
    let eviction = redis_eviction(connection(&redis)).await;
    let RedisEviction::Unknown { reason } = &eviction else {
        panic!("CONFIG is refused, yet the check found {eviction:?}");
    };
    assert!(reason.contains("CONFIG GET failed"), "{reason}");
    assert_eq!(eviction.warning(), None);

    // A stopped Redis is unknown too.
    let mut stopped = OwnRedis::start();
    let connection_to_stopped = connection(&stopped);
    stopped.stop();
    assert_eq!(
        redis_eviction(connection_to_stopped).await.label(),
        "unknown"
    );
}

/// Collects what the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_startup_check_logs_the_warning_once() {
    let redis = redis_with("100mb", "allkeys-lru").await;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // This test's only thread runs every await below, so the default subscriber sees them.
    let _guard = tracing::subscriber::set_default(subscriber);

    let eviction = warn_if_redis_can_evict(connection(&redis)).await;
    let logged = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let warning = eviction.warning().unwrap();
    assert_eq!(logged.matches(&warning).count(), 1, "{logged}");
    assert!(logged.lines().next().unwrap().contains("WARN"), "{logged}");

    // Nothing at all when Redis never evicts.
    let quiet = redis_with("100mb", "noeviction").await;
    let before = captured.0.lock().unwrap().len();
    assert_eq!(
        warn_if_redis_can_evict(connection(&quiet)).await,
        RedisEviction::Off
    );
    assert_eq!(captured.0.lock().unwrap().len(), before);
}
