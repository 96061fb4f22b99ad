//! Redis is a cache of the truth: losing it loses no count. Each test runs its own redis-server
//! so it can flush or restart it without touching other tests.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{
    OwnRedis, TestApp, random_suffix, redis_command, start, test_args, use_fresh_database,
    wait_until,
};
use tokio::sync::Mutex;

const NAMES: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flushing_redis_during_load_loses_nothing() {
    let mut redis = OwnRedis::start();
    let app = Arc::new(spawn_app_on(redis.url()).await);
    let outcome = run_load_with_fault(app.clone(), || {
        let url = redis.url();
        async move {
            let client = redis::Client::open(url).unwrap();
            let mut connection = client.get_multiplexed_async_connection().await.unwrap();
            redis::cmd("FLUSHALL")
                .query_async::<()>(&mut connection)
                .await
                .unwrap();
        }
    })
    .await;
    check_after_replay(&app, &outcome).await;
    redis.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarting_redis_empty_during_load_loses_nothing() {
    let redis = Arc::new(std::sync::Mutex::new(OwnRedis::start()));
    let redis_url = redis.lock().unwrap().url();
    let app = Arc::new(spawn_app_on(redis_url).await);
    let outcome = run_load_with_fault(app.clone(), || {
        let redis = redis.clone();
        async move {
            redis.lock().unwrap().stop();
            // Down for a second: writes still get 202, reads come from PostgreSQL.
            tokio::time::sleep(Duration::from_secs(1)).await;
            redis.lock().unwrap().restart_empty();
        }
    })
    .await;
    check_after_replay(&app, &outcome).await;
}

async fn spawn_app_on(redis_url: String) -> TestApp {
    spawn_app_healing(redis_url, false).await
}

/// With `auto_replay` off, only the operator's replay heals Redis.
async fn spawn_app_healing(redis_url: String, auto_replay: bool) -> TestApp {
    let suffix = random_suffix();
    let mut args = test_args(&suffix);
    use_fresh_database(&mut args, &suffix).await;
    args.store.redis_url = redis_url;
    args.auto_replay = auto_replay;
    start(args).await
}

/// Increments `name` by `by` and waits until PostgreSQL has it and a Redis read shows `expected`.
async fn increment_until_aggregated(app: &TestApp, name: &str, by: i64, expected: i64) {
    assert_eq!(app.increment(name, by).await.status(), 202);
    wait_until(
        Duration::from_secs(30),
        &format!("{name} is {expected} in postgres and in redis"),
        || async {
            app.postgres_totals().await.get(name) == Some(&expected) && {
                let read = app.read(name, true).await;
                read["source"] == "redis" && read["value"] == expected
            }
        },
    )
    .await;
}

/// Reads `name` for `duration`: no read may show anything but `truth` unless it is flagged
/// stale, and a stale read never shows less than PostgreSQL's total. Returns how many reads were
/// stale and how many came from Redis.
async fn watch_reads(app: &TestApp, name: &str, truth: i64, duration: Duration) -> (usize, usize) {
    let (mut stale, mut from_redis) = (0, 0);
    let deadline = std::time::Instant::now() + duration;
    while std::time::Instant::now() < deadline {
        let read = app.read(name, true).await;
        if read["stale"] == true {
            assert_eq!(
                read["value"], truth,
                "a stale read still shows postgres's total: {read}"
            );
            stale += 1;
        } else {
            assert_eq!(
                read["value"], truth,
                "a read not flagged stale shows an old or made-up value: {read}"
            );
            from_redis += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (stale, from_redis)
}

/// Redis with RDB persistence, restarted from a snapshot taken before the last increments were
/// aggregated: what it loads looks valid, but is older than PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_from_an_older_snapshot_never_shows_old_values_as_fresh() {
    let mut redis = OwnRedis::start_persistent();
    let app = spawn_app_healing(redis.url(), true).await;
    increment_until_aggregated(&app, "snapshot", 10, 10).await;
    let _: String = redis_command(&redis.url(), &redis::cmd("SAVE")).await;
    increment_until_aggregated(&app, "snapshot", 5, 15).await;
    redis.restart_from_snapshot();
    let (stale, from_redis) = watch_reads(&app, "snapshot", 15, Duration::from_secs(8)).await;
    wait_until(
        Duration::from_secs(30),
        "redis serves the exact value again",
        || async {
            let read = app.read("snapshot", true).await;
            read["source"] == "redis" && read["value"] == 15
        },
    )
    .await;
    println!("after the restart from the snapshot: {stale} stale reads, {from_redis} from redis");
}

/// Redis down for a few windows, its data intact (saved at the stop, loaded at the start): the
/// ingest's deltas of those windows are lost, and the aggregator's commits never reached the
/// summaries. When Redis is back, no read may take its old summaries plus its incomplete deltas
/// for fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_missed_commits_while_down_is_not_trusted_until_it_caught_up() {
    let mut redis = OwnRedis::start_persistent();
    let app = spawn_app_healing(redis.url(), true).await;
    increment_until_aggregated(&app, "missed", 10, 10).await;
    let _: String = redis_command(&redis.url(), &redis::cmd("SAVE")).await;
    redis.stop();
    // Acknowledged by Kafka; its delta cannot reach Redis.
    assert_eq!(app.increment("missed", 5).await.status(), 202);
    wait_until(
        Duration::from_secs(30),
        "postgres applied the increment made while redis was down",
        || async {
            app.postgres_totals_of(&["missed".to_owned()])
                .await
                .get("missed")
                == Some(&15)
        },
    )
    .await;
    // A few more windows, each committed while Redis cannot take it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.restart_from_snapshot();
    let (stale, from_redis) = watch_reads(&app, "missed", 15, Duration::from_secs(6)).await;
    wait_until(
        Duration::from_secs(30),
        "redis serves the exact value again",
        || async {
            let read = app.read("missed", true).await;
            read["source"] == "redis" && read["value"] == 15
        },
    )
    .await;
    println!("after redis came back: {stale} stale reads, {from_redis} from redis");
}

/// A counter whose Redis keys were evicted (as `maxmemory` with an LRU policy does to a cache)
/// is never read as 0: Tally notices, answers from PostgreSQL, and heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_whose_keys_were_evicted_never_reads_zero_as_fresh() {
    let redis = OwnRedis::start();
    let app = spawn_app_healing(redis.url(), true).await;
    increment_until_aggregated(&app, "evicted", 7, 7).await;
    let evicted = evict_keys_mentioning(&redis.url(), "evicted").await;
    assert!(evicted > 0, "some key should hold the counter");
    let (stale, from_redis) = watch_reads(&app, "evicted", 7, Duration::from_secs(8)).await;
    wait_until(
        Duration::from_secs(30),
        "redis serves the exact value again",
        || async {
            let read = app.read("evicted", true).await;
            read["source"] == "redis" && read["value"] == 7
        },
    )
    .await;
    println!("after evicting {evicted} keys: {stale} stale reads, {from_redis} from redis");
}

/// Deletes every key whose name mentions `name`, and every hash with a field that does: what
/// an LRU eviction of the counter's keys does, whatever the key layout.
async fn evict_keys_mentioning(url: &str, name: &str) -> usize {
    let keys: Vec<String> = redis_command(url, redis::cmd("KEYS").arg("*")).await;
    let mut evicted = 0;
    for key in keys {
        let kind: String = redis_command(url, redis::cmd("TYPE").arg(&key)).await;
        let mentions = key.contains(name)
            || (kind == "hash" && {
                let fields: Vec<String> = redis_command(url, redis::cmd("HKEYS").arg(&key)).await;
                fields.iter().any(|field| field.contains(name))
            });
        if mentions {
            let _: i64 = redis_command(url, redis::cmd("DEL").arg(&key)).await;
            evicted += 1;
        }
    }
    evicted
}

struct LoadOutcome {
    expected: HashMap<String, i64>,
    reads_from_postgres: usize,
    reads_from_redis: usize,
}

/// Writes to NAMES counters from two clients and reads them from a third, for six seconds, with
/// `fault` injected after two. Every write must get 202; every read must answer 200 with a
/// value that is never below what PostgreSQL held just before the read.
async fn run_load_with_fault<F, Fut>(app: Arc<TestApp>, fault: F) -> LoadOutcome
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let names: Arc<Vec<String>> = Arc::new((0..NAMES).map(|i| format!("loss-{i}")).collect());
    let expected: Arc<Mutex<HashMap<String, i64>>> = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..2 {
        let (app, names, expected, stop) =
            (app.clone(), names.clone(), expected.clone(), stop.clone());
        tasks.spawn(async move {
            let mut i = writer;
            while !stop.load(Ordering::Relaxed) {
                let name = &names[i % names.len()];
                let response = app.increment(name, 3).await;
                assert_eq!(
                    response.status(),
                    202,
                    "writes must keep getting 202 while redis is lost"
                );
                *expected.lock().await.entry(name.clone()).or_default() += 3;
                i += 2;
            }
            (0, 0)
        });
    }
    {
        let (app, names, stop) = (app.clone(), names.clone(), stop.clone());
        tasks.spawn(async move {
            let (mut from_postgres, mut from_redis) = (0, 0);
            let mut floors: HashMap<String, Vec<(std::time::Instant, i64)>> = HashMap::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = &names[i % names.len()];
                let floor: i64 = sqlx::query_scalar(
                    "SELECT coalesce(max(total), 0) FROM counters WHERE name = $1",
                )
                .bind(name)
                .fetch_one(&app.pool)
                .await
                .unwrap();
                let read = app.read(name, i % 2 == 0).await;
                let value = read["value"].as_i64().unwrap();
                // A cached value may be up to the cache TTL old, so it is held to what
                // postgres had that long ago.
                let fresh = i % 2 == 0;
                let now = std::time::Instant::now();
                floors.entry(name.clone()).or_default().push((now, floor));
                let floor = if fresh {
                    floor
                } else {
                    floors[name]
                        .iter()
                        .rev()
                        .find(|(at, _)| now.duration_since(*at) > Duration::from_millis(1_100))
                        .map_or(0, |(_, floor)| *floor)
                };
                assert!(
                    value >= floor,
                    "read {read} is below what postgres held ({floor})"
                );
                match read["source"].as_str().unwrap() {
                    "postgres" => {
                        assert_eq!(
                            read["stale"], true,
                            "a postgres read must be flagged stale: {read}"
                        );
                        from_postgres += 1;
                    }
                    "redis" | "cache" => from_redis += 1,
                    other => panic!("unknown source {other}"),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (from_postgres, from_redis)
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    fault().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut reads_from_postgres, mut reads_from_redis) = (0, 0);
    while let Some(task) = tasks.join_next().await {
        let (from_postgres, from_redis) = task.unwrap();
        reads_from_postgres += from_postgres;
        reads_from_redis += from_redis;
    }
    let expected = expected.lock().await.clone();
    LoadOutcome {
        expected,
        reads_from_postgres,
        reads_from_redis,
    }
}

/// Runs `tally replay` as an operator would, then checks that PostgreSQL, Redis and the read API
/// all hold exactly the acknowledged totals.
async fn check_after_replay(app: &TestApp, outcome: &LoadOutcome) {
    assert!(
        outcome.reads_from_postgres > 0,
        "some reads should have fallen back to postgres"
    );
    let printed = app.run_tally_replay().await;
    println!("{printed}");

    let expected = &outcome.expected;
    wait_until(
        Duration::from_secs(60),
        "postgres holds every acknowledged increment",
        || async {
            let totals = app.postgres_totals().await;
            expected
                .iter()
                .all(|(name, value)| totals.get(name) == Some(value))
        },
    )
    .await;
    let names: Vec<String> = expected.keys().cloned().collect();
    wait_until(
        Duration::from_secs(60),
        "redis serves the exact totals again",
        || async {
            let reads = app.read_many(&names, true).await;
            let wrong: Vec<&serde_json::Value> = reads
                .iter()
                .filter(|read| {
                    read["source"] != "redis"
                        || read["value"] != expected[read["counter"].as_str().unwrap()]
                })
                .collect();
            if let Some(first) = wrong.first() {
                eprintln!(
                    "{} reads not exact from redis yet, e.g. {first}",
                    wrong.len()
                );
                let metrics = reqwest::get(app.url("/metrics"))
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                for line in metrics
                    .lines()
                    .filter(|line| line.contains("fallbacks_total{") || line.contains("mirror_"))
                {
                    eprintln!("  {line}");
                }
            }
            wrong.is_empty()
        },
    )
    .await;
    for read in app.read_many(&names, false).await {
        assert_eq!(
            read["value"],
            expected[read["counter"].as_str().unwrap()],
            "{read}"
        );
    }
    println!(
        "{} reads from postgres (stale) and {} from redis during the fault; {} increments exact after replay",
        outcome.reads_from_postgres,
        outcome.reads_from_redis,
        expected.values().sum::<i64>() / 3
    );
}
