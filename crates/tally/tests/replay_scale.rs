//! `tally replay` at scale: a million counters in PostgreSQL, Redis emptied, the replay run as an
//! operator runs it while increments keep coming. The time goes to the output, not into an
//! assertion: this machine is shared and noisy.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{
    OwnRedis, TestApp, random_suffix, redis_command, start, test_args, use_fresh_database,
    wait_until,
};
use rand::Rng as _;
use tokio::sync::Mutex;

const COUNTERS: i64 = 1_000_000;
/// Of them, this many have window records recent enough to go into the summaries.
const RECENTLY_ACTIVE: i64 = 50_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_of_a_million_counters_under_traffic_is_exact() {
    let redis = OwnRedis::start();
    let suffix = random_suffix();
    let mut args = test_args(&suffix);
    use_fresh_database(&mut args, &suffix).await;
    args.store.redis_url = redis.url();
    // The operator's replay is what this test measures; the aggregators must not rebuild the
    // lost buckets themselves meanwhile.
    args.auto_replay = false;
    let app = Arc::new(start(args).await);

    let seeded = Instant::now();
    seed_counters(&app).await;
    println!(
        "seeded {COUNTERS} counters ({RECENTLY_ACTIVE} recently active) in {:.1}s",
        seeded.elapsed().as_secs_f64()
    );
    let _: String = redis_command(&redis.url(), &redis::cmd("FLUSHALL")).await;

    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let traffic = tokio::spawn(send_traffic(
        Arc::clone(&app),
        Arc::clone(&stop),
        Arc::clone(&acknowledged),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let replayed = Instant::now();
    let printed = app.run_tally_replay().await;
    let replay_seconds = replayed.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    println!("{printed}");
    println!("tally replay of {COUNTERS} counters under traffic took {replay_seconds:.1}s");

    let acknowledged = acknowledged.lock().await.clone();
    let traffic_names: Vec<String> = acknowledged.keys().cloned().collect();
    wait_until(
        Duration::from_secs(60),
        "postgres holds every acknowledged increment",
        || async {
            let totals = app.postgres_totals_of(&traffic_names).await;
            acknowledged
                .iter()
                .all(|(name, value)| totals.get(name) == Some(&(seeded_total(name) + value)))
        },
    )
    .await;
    // Every counter the traffic touched, and a sample of the others, read exactly from Redis.
    let mut names = traffic_names.clone();
    let mut random = rand::rng();
    names.extend((0..2_000).map(|_| format!("scale-{}", random.random_range(1..=COUNTERS))));
    wait_until(
        Duration::from_secs(60),
        "redis serves the exact values again",
        || async {
            app.read_many(&names, true).await.iter().all(|read| {
                let name = read["counter"].as_str().unwrap();
                read["source"] == "redis"
                    && read["value"]
                        == seeded_total(name) + acknowledged.get(name).copied().unwrap_or(0)
            })
        },
    )
    .await;
}

/// The total a seeded counter starts with: its number.
fn seeded_total(name: &str) -> i64 {
    name.strip_prefix("scale-")
        .and_then(|number| number.parse().ok())
        .unwrap_or(0)
}

/// Writes the counters straight into PostgreSQL, as a long-running deployment holds them.
async fn seed_counters(app: &TestApp) {
    sqlx::query(
        // Generation 0, as counters written before generations existed have.
        "INSERT INTO counters (name, total, version, kafka_partition, last_window_start)
         SELECT 'scale-' || i, i, 1, i % 3, now() - interval '1 day'
         FROM generate_series(1, $1::bigint) AS i",
    )
    .bind(COUNTERS)
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO counter_windows (name, window_start, sum, positive, negative)
         SELECT 'scale-' || i, date_trunc('second', now()) - interval '5 seconds', 1, 1, 0
         FROM generate_series(1, $1::bigint) AS i",
    )
    .bind(RECENTLY_ACTIVE)
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE counters, counter_windows")
        .execute(&app.pool)
        .await
        .unwrap();
}

/// Increments seeded and new counters until told to stop, recording what was acknowledged.
async fn send_traffic(
    app: Arc<TestApp>,
    stop: Arc<AtomicBool>,
    acknowledged: Arc<Mutex<HashMap<String, i64>>>,
) {
    let mut index = 0u64;
    while !stop.load(Ordering::Relaxed) {
        index += 1;
        let name = if index % 2 == 0 {
            format!("scale-{}", index % 500 + 1)
        } else {
            format!("live-{}", index % 50)
        };
        let response = app.increment(&name, 1).await;
        assert_eq!(
            response.status(),
            202,
            "writes go on while redis is rebuilt"
        );
        *acknowledged.lock().await.entry(name).or_default() += 1;
    }
}
