//! No `202` is ever given for an increment Kafka did not acknowledge. This test stops the local
//! Kafka broker itself (with the project's own scripts) and starts it again, so it lives alone
//! in its own test binary: nothing else runs while the broker is down.

mod common;

use std::time::{Duration, Instant};

use common::{spawn_app_with, wait_until};

fn local_script(name: &str) -> String {
    format!("{}/../../deploy/local/{name}", env!("CARGO_MANIFEST_DIR"))
}

async fn run_script(name: &str, service: &str) {
    let status = tokio::process::Command::new(local_script(name))
        .arg(service)
        .status()
        .await
        .unwrap();
    assert!(status.success(), "{name} {service} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_broker_down_writes_get_503_never_202() {
    let app = spawn_app_with(|args| args.auto_replay = true).await;
    let name = "while-kafka-is-down";
    let (mut acknowledged, mut indeterminate) = (0, 0);
    for _ in 0..5 {
        assert_eq!(app.increment(name, 1).await.status(), 202);
        acknowledged += 1;
    }

    run_script("down.sh", "kafka").await;
    let started = Instant::now();
    let attempts: Vec<_> = (0..10).map(|_| app.increment(name, 1)).collect();
    let statuses: Vec<u16> = futures_util::future::join_all(attempts)
        .await
        .iter()
        .map(|response| response.status().as_u16())
        .collect();
    println!(
        "with the broker down: {statuses:?} in {:?}",
        started.elapsed()
    );
    assert!(
        statuses.iter().all(|status| *status == 503),
        "only 503s while kafka is down: {statuses:?}"
    );
    indeterminate += statuses.len() as i64;
    let response = app.increment(name, 1).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["type"], "/problems/kafka-unavailable");
    assert!(
        body["detail"].as_str().unwrap().contains("indeterminate"),
        "{body}"
    );
    indeterminate += 1;

    run_script("up.sh", "kafka").await;
    // The producer reconnects by itself; until it has, answers stay 503 (indeterminate).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut after_restart = 0;
    while after_restart < 5 {
        assert!(
            Instant::now() < deadline,
            "writes never recovered after kafka came back"
        );
        match app.increment(name, 1).await.status().as_u16() {
            202 => {
                acknowledged += 1;
                after_restart += 1;
            }
            503 => indeterminate += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    wait_until(
        Duration::from_secs(60),
        "postgres holds every acknowledged increment",
        || async {
            let total: Option<i64> =
                sqlx::query_scalar("SELECT total FROM counters WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&app.pool)
                    .await
                    .unwrap();
            total.is_some_and(|total| total >= acknowledged)
        },
    )
    .await;
    // Give indeterminate records that did land time to be applied, then check the bound.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let total: i64 = sqlx::query_scalar("SELECT total FROM counters WHERE name = $1")
        .bind(name)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    println!("acknowledged {acknowledged}, indeterminate {indeterminate}, counted {total}");
    assert!(
        (acknowledged..=acknowledged + indeterminate).contains(&total),
        "the count {total} must lie within [{acknowledged}, {}]",
        acknowledged + indeterminate
    );
}
