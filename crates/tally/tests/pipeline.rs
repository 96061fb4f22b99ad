//! The counting pipeline end to end, against the real local Redis, Kafka and PostgreSQL.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{spawn_app, wait_until};
use rand::Rng as _;
use tokio::sync::Mutex;

/// Concurrent single and batch increments on one hot name and 10,000 cold names. Once the
/// pipeline drains, PostgreSQL, Redis and the read API all hold exactly the sum of the
/// acknowledged amounts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_increment_is_lost_or_double_counted() {
    let app = Arc::new(spawn_app().await);
    let hot = "hot: viral/video 🎉".to_string();
    let cold: Arc<Vec<String>> = Arc::new((0..10_000).map(|i| format!("cold-{i}")).collect());
    let expected: Arc<Mutex<HashMap<String, i64>>> = Arc::new(Mutex::new(HashMap::new()));

    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (app, hot, expected) = (app.clone(), hot.clone(), expected.clone());
        clients.spawn(async move {
            for _ in 0..150 {
                let by = random_nonzero_amount();
                let response = app.increment(&hot, by).await;
                assert_eq!(
                    response.status(),
                    202,
                    "a healthy stack should accept every increment"
                );
                *expected.lock().await.entry(hot.clone()).or_default() += by;
            }
        });
    }
    for client in 0..4 {
        let (app, hot, cold, expected) = (app.clone(), hot.clone(), cold.clone(), expected.clone());
        clients.spawn(async move {
            for batch in 0..10 {
                // The first five batches of each client cover every cold name once.
                let mut items: Vec<(String, i64)> = if batch < 5 {
                    let start = (client * 5 + batch) * 500;
                    cold[start..start + 500]
                        .iter()
                        .map(|name| (name.clone(), random_nonzero_amount()))
                        .collect()
                } else {
                    (0..500)
                        .map(|_| {
                            let name = &cold[rand::rng().random_range(0..cold.len())];
                            (name.clone(), random_nonzero_amount())
                        })
                        .collect()
                };
                items.push((hot.clone(), 1_000));
                let response = app.increment_batch(&items).await;
                assert_eq!(
                    response.status(),
                    202,
                    "a healthy stack should accept every batch"
                );
                let body: serde_json::Value = response.json().await.unwrap();
                assert_eq!(body["accepted"], items.len());
                let mut expected = expected.lock().await;
                for (name, by) in items {
                    *expected.entry(name).or_default() += by;
                }
            }
        });
    }
    while let Some(client) = clients.join_next().await {
        client.unwrap();
    }
    let expected = expected.lock().await.clone();
    assert_eq!(expected.len(), 10_001);

    let drain_started = Instant::now();
    loop {
        let totals = app.postgres_totals().await;
        // A counter whose increments sum to 0 may have no row at all.
        let matches = totals.len() <= expected.len()
            && expected
                .iter()
                .all(|(name, value)| totals.get(name).copied().unwrap_or(0) == *value);
        if matches {
            break;
        }
        if drain_started.elapsed() > Duration::from_secs(90) {
            let wrong: Vec<String> = expected
                .iter()
                .filter(|(name, value)| totals.get(*name) != Some(value))
                .take(5)
                .map(|(name, value)| {
                    format!("{name}: expected {value}, postgres {:?}", totals.get(name))
                })
                .collect();
            panic!(
                "postgres never matched; {} rows, e.g. {wrong:?}",
                totals.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let names: Vec<String> = expected.keys().cloned().collect();
    wait_until(
        Duration::from_secs(30),
        "redis reads equal postgres for every name",
        || async {
            app.read_many(&names, true).await.iter().all(|read| {
                read["source"] == "redis"
                    && read["value"] == expected[read["counter"].as_str().unwrap()]
            })
        },
    )
    .await;
    let reads = app.read_many(&names, false).await;
    for read in &reads {
        assert_eq!(
            read["value"],
            expected[read["counter"].as_str().unwrap()],
            "{read}"
        );
        assert_eq!(read["stale"], false, "{read}");
    }
    println!(
        "{} names, {} increments on the hot name: postgres == redis == GET",
        expected.len(),
        expected[&hot]
    );
}

fn random_nonzero_amount() -> i64 {
    let mut random = rand::rng();
    loop {
        let by = random.random_range(-5..=20);
        if by != 0 {
            return by;
        }
    }
}
