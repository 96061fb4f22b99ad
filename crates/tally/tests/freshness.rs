//! Freshness: under steady load a read lags the acknowledged total by at most two seconds. In a
//! file of its own so no other test competes for the CPU while it measures.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::spawn_app;
use tokio::sync::Mutex;

/// Under steady load, a cached read lags the acknowledged total by at most 2 seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_lag_the_acknowledged_total_by_at_most_two_seconds() {
    let app = Arc::new(spawn_app().await);
    let name = "freshness";
    let started = Instant::now();
    let load_for = Duration::from_secs(8);

    // (time acknowledged, acknowledged total so far)
    let acknowledged: Arc<Mutex<Vec<(Duration, i64)>>> = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (app, acknowledged) = (app.clone(), acknowledged.clone());
        tokio::spawn(async move {
            let mut total = 0;
            while started.elapsed() < load_for {
                let response = app.increment(name, 1).await;
                assert_eq!(response.status(), 202);
                total += 1;
                acknowledged.lock().await.push((started.elapsed(), total));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut reads = Vec::new();
    while started.elapsed() < load_for {
        let read = app.read(name, false).await;
        reads.push((started.elapsed(), read["value"].as_i64().unwrap()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer.await.unwrap();

    // A read's lag: how long before the read the first increment it does not show was
    // acknowledged (0 when it shows everything acknowledged by then).
    let acknowledged = acknowledged.lock().await.clone();
    let mut lags: Vec<Duration> = reads
        .iter()
        .map(|(read_at, value)| {
            acknowledged
                .iter()
                .find(|(acked_at, total)| *total > *value && acked_at <= read_at)
                .map_or(Duration::ZERO, |(acked_at, _)| *read_at - *acked_at)
        })
        .collect();
    lags.sort();
    let percentile = |p: f64| lags[((lags.len() as f64 - 1.0) * p) as usize];
    println!(
        "freshness over {} reads: p50 {:?}, p99 {:?}, max {:?} ({} increments acknowledged)",
        lags.len(),
        percentile(0.5),
        percentile(0.99),
        lags.last().unwrap(),
        acknowledged.len()
    );
    assert!(
        *lags.last().unwrap() <= Duration::from_secs(2),
        "a read lagged by {:?}",
        lags.last().unwrap()
    );
}
