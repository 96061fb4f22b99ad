//! `spawn_app()` for end-to-end tests: a real Tally process (in-process) on port 0, against the
//! real local Redis, Kafka and PostgreSQL, isolated by a fresh database, topic, consumer group
//! and Redis key prefix per test.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rand::Rng as _;
use redis::aio::ConnectionManager;
use serde_json::Value;
use sqlx::PgPool;
use tally::App;
use tally::cli::ServeArgs;
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub address: String,
    pub http: reqwest::Client,
    pub args: ServeArgs,
    pub pool: PgPool,
    pub redis: ConnectionManager,
    cancel: CancellationToken,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Short windows so tests drain in seconds: a window closes 1 s + 2.2 s after it starts.
pub fn test_args(suffix: &str) -> ServeArgs {
    let mut args = ServeArgs::defaults();
    args.http.http_addr = "127.0.0.1:0".parse().unwrap();
    args.store.kafka_topic = format!("tally.test.{suffix}");
    args.store.kafka_partitions = 3;
    args.store.redis_prefix = format!("test{suffix}");
    args.aggregator.aggregator_group = format!("tally-test-{suffix}");
    args.pipeline.window_ms = 1_000;
    args.pipeline.produce_timeout_ms = 2_000;
    args.pipeline.clock_skew_ms = 200;
    args.shutdown_timeout_secs = 10;
    args
}

pub fn random_suffix() -> String {
    format!("{:012x}", rand::rng().random::<u64>() >> 16)
}

/// Creates a fresh database next to the configured one and points `args` at it.
pub async fn use_fresh_database(args: &mut ServeArgs, suffix: &str) {
    let admin = PgPool::connect(&args.store.database_url)
        .await
        .expect("the local PostgreSQL should be up: run deploy/local/up.sh");
    let database = format!("tally_test_{suffix}");
    sqlx::query(&format!("CREATE DATABASE {database}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let (base, _) = args.store.database_url.rsplit_once('/').unwrap();
    args.store.database_url = format!("{base}/{database}");
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(tweak: impl FnOnce(&mut ServeArgs)) -> TestApp {
    let suffix = random_suffix();
    let mut args = test_args(&suffix);
    use_fresh_database(&mut args, &suffix).await;
    tweak(&mut args);
    start(args).await
}

/// Starts Tally with exactly these settings.
pub async fn start(args: ServeArgs) -> TestApp {
    let cancel = CancellationToken::new();
    let app = App::build(args.clone(), cancel.clone())
        .await
        .expect("tally should start");
    let address = format!("http://{}", app.local_addr());
    let server = tokio::spawn(app.run_until_stopped());
    let pool = tally_infra::postgres::connect(&args.store).unwrap();
    let redis = tally_infra::redis_store::connect(&args.store).unwrap();
    let test_app = TestApp {
        address,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        args,
        pool,
        redis,
        cancel,
        server: Some(server),
    };
    if !test_app.args.auto_replay {
        // Nothing else marks a new Redis as complete.
        test_app.replay().await;
    }
    // Ready once the aggregator has published closed windows and reads come from Redis.
    wait_until(Duration::from_secs(60), "reads come from redis", || async {
        test_app.read("warm-up", true).await["source"] == "redis"
    })
    .await;
    test_app
}

impl TestApp {
    /// Rebuilds the Redis mirror from PostgreSQL, as `tally replay` does.
    pub async fn replay(&self) -> tally_mirror::RebuildReport {
        tally::replay::rebuild_mirror(
            &self.args.store,
            &self.args.pipeline,
            &self.args.aggregator,
            &self.pool,
            &self.redis,
            false,
            &mut |_| {},
        )
        .await
        .expect("the replay should succeed")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn increment(&self, name: &str, by: i64) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/v1/counters/{}/increment", encode(name))))
            .json(&serde_json::json!({ "by": by }))
            .send()
            .await
            .expect("the request should reach tally")
    }

    pub async fn increment_batch(&self, items: &[(String, i64)]) -> reqwest::Response {
        let increments: Vec<Value> = items
            .iter()
            .map(|(name, by)| serde_json::json!({ "counter": name, "by": by }))
            .collect();
        self.http
            .post(self.url("/v1/increments"))
            .json(&serde_json::json!({ "increments": increments }))
            .send()
            .await
            .expect("the request should reach tally")
    }

    pub async fn read(&self, name: &str, fresh: bool) -> Value {
        let response = self
            .http
            .get(self.url(&format!("/v1/counters/{}?fresh={fresh}", encode(name))))
            .send()
            .await
            .expect("the request should reach tally");
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "reading {name} should succeed: {body}");
        body
    }

    /// Reads many counters, 1000 per request.
    pub async fn read_many(&self, names: &[String], fresh: bool) -> Vec<Value> {
        let mut values = Vec::with_capacity(names.len());
        for chunk in names.chunks(1_000) {
            let query: Vec<String> = chunk
                .iter()
                .map(|name| format!("name={}", encode(name)))
                .collect();
            let response = self
                .http
                .get(self.url(&format!("/v1/counters?{}&fresh={fresh}", query.join("&"))))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            values.extend(body["counters"].as_array().unwrap().iter().cloned());
        }
        values
    }

    /// Runs `tally replay` as an operator would, with this app's settings, and returns what it
    /// printed.
    pub async fn run_tally_replay(&self) -> String {
        let args = &self.args;
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .arg("replay")
            .args(["--redis-url", &args.store.redis_url])
            .args(["--redis-prefix", &args.store.redis_prefix])
            .args(["--kafka-brokers", &args.store.kafka_brokers])
            .args(["--kafka-topic", &args.store.kafka_topic])
            .args(["--database-url", &args.store.database_url])
            .args(["--aggregator-group", &args.aggregator.aggregator_group])
            .args(["--window-ms", &args.pipeline.window_ms.to_string()])
            .args([
                "--produce-timeout-ms",
                &args.pipeline.produce_timeout_ms.to_string(),
            ])
            .args(["--clock-skew-ms", &args.pipeline.clock_skew_ms.to_string()])
            .output()
            .await
            .expect("the tally binary should run");
        let printed = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "tally replay failed: {printed}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(printed.contains("replay done"), "{printed}");
        printed
    }

    /// PostgreSQL's total of one counter, if it has the counter.
    pub async fn postgres_total(&self, name: &str) -> Option<i64> {
        sqlx::query_scalar("SELECT total FROM counters WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
    }

    /// Waits until PostgreSQL and a fresh read from Redis both show `expected`.
    pub async fn wait_for_exact(&self, name: &str, expected: i64) {
        wait_until(
            Duration::from_secs(30),
            &format!("{name} reads {expected} in postgres and redis"),
            || async {
                let read = self.read(name, true).await;
                self.postgres_total(name).await == Some(expected)
                    && read["source"] == "redis"
                    && read["value"] == expected
            },
        )
        .await;
    }

    /// PostgreSQL's totals of the named counters (those it has).
    pub async fn postgres_totals_of(
        &self,
        names: &[String],
    ) -> std::collections::HashMap<String, i64> {
        sqlx::query_as::<_, (String, i64)>("SELECT name, total FROM counters WHERE name = ANY($1)")
            .bind(names)
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .into_iter()
            .collect()
    }

    pub async fn postgres_totals(&self) -> std::collections::HashMap<String, i64> {
        sqlx::query_as::<_, (String, i64)>("SELECT name, total FROM counters")
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .into_iter()
            .collect()
    }

    /// Stops Tally cleanly and waits for it.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Percent-encodes a path segment or query value.
pub fn encode(text: &str) -> String {
    let mut encoded = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Every partition of the topic with its (low, high) watermarks: the first offset the log still
/// holds, and the offset its next record gets.
pub async fn kafka_watermarks(
    store: &tally_infra::config::StoreConfig,
) -> std::collections::BTreeMap<i32, (i64, i64)> {
    use rdkafka::producer::Producer as _;
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let client = tally_infra::kafka::metadata_client(&store).unwrap();
        let timeout = Duration::from_secs(5);
        let partitions =
            tally_infra::kafka::fetch_partition_count(&client, &store.kafka_topic, timeout)
                .unwrap();
        (0..partitions as i32)
            .map(|partition| {
                let watermarks = client
                    .client()
                    .fetch_watermarks(&store.kafka_topic, partition, timeout)
                    .unwrap();
                (partition, watermarks)
            })
            .collect()
    })
    .await
    .unwrap()
}

/// Polls `condition` every 100 ms until it holds; panics after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A redis-server of the test's own, on a free port, so a test can flush or restart it without
/// touching other tests. Stopped by pid when dropped.
pub struct OwnRedis {
    pub port: u16,
    /// Where a persistent server keeps its `dump.rdb`; `None` for a server that keeps nothing.
    data_dir: Option<std::path::PathBuf>,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self {
            port,
            data_dir: None,
            child: None,
        };
        redis.restart_empty();
        redis
    }

    /// A server that writes `dump.rdb` when told to (`SAVE`) and loads it when it starts, as a
    /// Redis with RDB persistence does; it never saves by itself.
    pub fn start_persistent() -> Self {
        let mut redis = Self::start();
        redis.stop();
        let data_dir = std::env::temp_dir().join(format!("tally-test-redis-{}", redis.port));
        std::fs::create_dir_all(&data_dir).unwrap();
        redis.data_dir = Some(data_dir);
        redis.spawn();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (if running) and starts an empty one on the same port.
    pub fn restart_empty(&mut self) {
        self.stop();
        if let Some(data_dir) = &self.data_dir {
            let _ = std::fs::remove_file(data_dir.join("dump.rdb"));
        }
        self.spawn();
    }

    /// Kills the server without saving (as `SHUTDOWN NOSAVE` or a crash would) and starts it
    /// again from its last `dump.rdb`: every write since that snapshot is gone, and what the
    /// snapshot held looks as valid as ever.
    pub fn restart_from_snapshot(&mut self) {
        assert!(
            self.data_dir.is_some(),
            "only a persistent server has a snapshot"
        );
        self.stop();
        self.spawn();
    }

    fn spawn(&mut self) {
        let mut command = std::process::Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
        if let Some(data_dir) = &self.data_dir {
            command.arg("--dir").arg(data_dir);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server should be installed: run deploy/local/up.sh");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
        if let Some(data_dir) = &self.data_dir {
            let _ = std::fs::remove_dir_all(data_dir);
        }
    }
}

/// Runs one Redis command on a connection of its own.
pub async fn redis_command<T: redis::FromRedisValue>(url: &str, command: &redis::Cmd) -> T {
    let client = redis::Client::open(url).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    command.query_async(&mut connection).await.unwrap()
}
