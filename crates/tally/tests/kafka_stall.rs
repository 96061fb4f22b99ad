//! A keyed increment whose produce timed out while the broker was stalled, then retried: the
//! first copy reaches the log once the broker wakes (it was on the socket already), and the
//! retry is produced too, in a later window. The aggregator applies the use once; a read must
//! never show it twice meanwhile. Both would show if the aggregator committed the first copy
//! before reading the retry while Redis held the retry's delta: a race of a few milliseconds
//! that this test cannot force, so it checks what closes it, that the timed-out key is left
//! uncertain and the retry never shows twice. This test stops the local Kafka broker with SIGSTOP (by its
//! pid file), so it lives alone in its own test binary: nothing else runs while it is stalled.

mod common;

use std::time::{Duration, Instant};

use common::{encode, redis_command, spawn_app, wait_until};
use serde_json::json;

/// The broker stopped with SIGSTOP; dropping this wakes it, even when the test panics.
struct StalledBroker {
    pid: String,
}

impl StalledBroker {
    fn stall() -> Self {
        let local = std::env::var("TALLY_LOCAL_DIR")
            .unwrap_or_else(|_| format!("{}/../../.local", env!("CARGO_MANIFEST_DIR")));
        let pid = std::fs::read_to_string(format!("{local}/kafka/kafka.pid"))
            .expect("the local Kafka should be up: run deploy/local/up.sh");
        let pid = pid.lines().next().unwrap_or_default().trim().to_owned();
        signal("STOP", &pid);
        Self { pid }
    }
}

impl Drop for StalledBroker {
    fn drop(&mut self) {
        signal("CONT", &self.pid);
    }
}

fn signal(name: &str, pid: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_after_a_stalled_produce_never_shows_twice() {
    let app = spawn_app().await;
    let name = "retried-through-a-stall";
    let key = format!("stall-{}", common::random_suffix());
    let increment = || async {
        app.http
            .post(app.url(&format!("/v1/counters/{}/increment", encode(name))))
            .header("Idempotency-Key", &key)
            .json(&json!({ "by": 1 }))
            .send()
            .await
            .expect("the request should reach tally")
    };
    // The producer's connection is up before the stall, so the record goes onto its socket.
    assert_eq!(app.increment("warm-up", 1).await.status(), 202);

    let broker = StalledBroker::stall();
    let stalled = increment().await;
    assert_eq!(stalled.status(), 503, "the produce should time out");
    let claim: Option<String> = redis_command(
        &app.args.store.redis_url,
        redis::cmd("GET").arg(format!("{{}}{}:i:{key}", app.args.store.redis_prefix)),
    )
    .await;
    assert_eq!(
        claim.as_deref(),
        Some("U 1:retried-through-a-stall"),
        "a timed-out produce leaves its key uncertain, not free"
    );
    drop(broker);

    // Retry until the producer is through; then read as a widget would, until the aggregator
    // has applied both copies.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut statuses = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "the retry never got through");
        let status = increment().await.status().as_u16();
        statuses.push(status);
        if status == 202 {
            break;
        }
        assert_eq!(status, 503, "{statuses:?}");
    }
    let mut highest = 0;
    let mut reads = 0;
    let settled = Instant::now() + Duration::from_secs(8);
    while Instant::now() < settled {
        let value = app.read(name, false).await["value"].as_i64().unwrap();
        highest = highest.max(value);
        reads += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("retries {statuses:?}; {reads} reads, the highest {highest}");
    assert!(highest <= 1, "a read showed the increment twice: {highest}");
    wait_until(
        Duration::from_secs(30),
        "postgres holds the increment",
        || async { app.postgres_total(name).await == Some(1) },
    )
    .await;
    assert_eq!(app.read(name, false).await["value"], 1);
    app.stop().await;
}
