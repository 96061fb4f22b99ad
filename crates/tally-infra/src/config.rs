//! Configuration. Every setting is a command-line flag and a `TALLY_*` environment variable,
//! and every default matches the local stack that `deploy/local/up.sh` starts.

use std::net::SocketAddr;
use std::time::Duration;

use tally_core::{ShardPolicy, WindowSpec};

/// Where the three stores are.
#[derive(clap::Args, Clone, Debug)]
pub struct StoreConfig {
    /// Redis URL. Redis holds only a cache of the truth.
    #[arg(
        long,
        env = "TALLY_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// Prefix of every Redis key, so several deployments can share one Redis.
    #[arg(long, env = "TALLY_REDIS_PREFIX", default_value = "tally")]
    pub redis_prefix: String,

    /// Timeout of one Redis command, in milliseconds. A slow Redis must not stall writes or reads.
    #[arg(long, env = "TALLY_REDIS_TIMEOUT_MS", default_value_t = 500)]
    pub redis_timeout_ms: u64,

    /// Kafka bootstrap servers, comma separated.
    #[arg(long, env = "TALLY_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,

    /// The Kafka topic that carries increment records.
    #[arg(long, env = "TALLY_KAFKA_TOPIC", default_value = "tally.increments")]
    pub kafka_topic: String,

    /// Partitions of the topic when Tally creates it.
    #[arg(long, env = "TALLY_KAFKA_PARTITIONS", default_value_t = 6)]
    pub kafka_partitions: i32,

    /// Replication factor of the topic when Tally creates it.
    #[arg(long, env = "TALLY_KAFKA_REPLICATION", default_value_t = 1)]
    pub kafka_replication: i32,

    /// PostgreSQL URL. PostgreSQL is the durable truth.
    #[arg(
        long,
        env = "TALLY_DATABASE_URL",
        default_value = "postgres://tally:tally@127.0.0.1:5432/tally",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Largest number of PostgreSQL connections per process.
    #[arg(long, env = "TALLY_DATABASE_MAX_CONNECTIONS", default_value_t = 8)]
    pub database_max_connections: u32,
}

impl StoreConfig {
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }
}

/// The timing the counting pipeline's promises rest on. Every role of one deployment must use
/// the same values.
#[derive(clap::Args, Clone, Debug)]
pub struct PipelineConfig {
    /// Length of an aggregation window, in milliseconds. The aggregator writes PostgreSQL once
    /// per window.
    #[arg(long, env = "TALLY_WINDOW_MS", default_value_t = 5_000)]
    pub window_ms: u64,

    /// How long the ingest waits for Kafka to acknowledge an increment before it answers 503.
    /// The producer gives up on the record at the same deadline.
    #[arg(long, env = "TALLY_PRODUCE_TIMEOUT_MS", default_value_t = 5_000)]
    pub produce_timeout_ms: u64,

    /// Largest clock difference allowed between hosts running Tally and Kafka, in milliseconds.
    #[arg(long, env = "TALLY_CLOCK_SKEW_MS", default_value_t = 1_000)]
    pub clock_skew_ms: u64,

    /// How long Redis keeps a window's deltas, in seconds. Reads use PostgreSQL instead when the
    /// aggregator falls further behind than this.
    #[arg(long, env = "TALLY_DELTA_TTL_SECS", default_value_t = 3_600)]
    pub delta_ttl_secs: u64,

    /// How long an idempotency key is remembered, in seconds: a retry within this window is
    /// counted once.
    #[arg(long, env = "TALLY_IDEMPOTENCY_WINDOW_SECS", default_value_t = 86_400)]
    pub idempotency_window_secs: u64,
}

impl PipelineConfig {
    pub fn window_spec(&self) -> WindowSpec {
        WindowSpec::new(
            self.window_ms as i64,
            (self.produce_timeout_ms + self.clock_skew_ms) as i64,
        )
    }

    pub fn produce_timeout(&self) -> Duration {
        Duration::from_millis(self.produce_timeout_ms)
    }

    pub fn delta_ttl_ms(&self) -> i64 {
        (self.delta_ttl_secs * 1_000) as i64
    }
}

/// The HTTP listener.
#[derive(clap::Args, Clone, Debug)]
pub struct HttpConfig {
    /// Address the HTTP API listens on.
    #[arg(long, env = "TALLY_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
}

/// Settings of the ingest role.
#[derive(clap::Args, Clone, Debug)]
pub struct IngestConfig {
    /// Most Redis shard keys one hot counter is spread over.
    #[arg(long, env = "TALLY_MAX_SHARDS", default_value_t = 64)]
    pub max_shards: u32,

    /// Write rate one shard key absorbs before a counter gets more shards, per second.
    #[arg(long, env = "TALLY_INCREMENTS_PER_SHARD", default_value_t = 2_000)]
    pub increments_per_shard: u64,

    /// Most items in one `POST /v1/increments` batch.
    #[arg(long, env = "TALLY_BATCH_MAX_ITEMS", default_value_t = 10_000)]
    pub batch_max_items: usize,

    /// Largest request body, in bytes.
    #[arg(long, env = "TALLY_BODY_MAX_BYTES", default_value_t = 1_048_576)]
    pub body_max_bytes: usize,
}

impl IngestConfig {
    pub fn shard_policy(&self) -> ShardPolicy {
        ShardPolicy {
            max_shards: self.max_shards,
            increments_per_shard_per_second: self.increments_per_shard,
        }
    }
}

/// Settings of the read role.
#[derive(clap::Args, Clone, Debug)]
pub struct ReadConfig {
    /// How long a value stays in the in-process read cache, in milliseconds (at most 1000).
    #[arg(long, env = "TALLY_READ_CACHE_TTL_MS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub read_cache_ttl_ms: u64,

    /// Most counters kept in the in-process read cache.
    #[arg(long, env = "TALLY_READ_CACHE_CAPACITY", default_value_t = 100_000)]
    pub read_cache_capacity: usize,

    /// Most names in one `GET /v1/counters` multi-get.
    #[arg(long, env = "TALLY_READ_MAX_NAMES", default_value_t = 1_000)]
    pub read_max_names: usize,
}

/// Settings of the aggregator role.
#[derive(clap::Args, Clone, Debug)]
pub struct AggregatorConfig {
    /// Kafka consumer group of the aggregators. Partitions are spread over its members.
    #[arg(
        long,
        env = "TALLY_AGGREGATOR_GROUP",
        default_value = "tally-aggregator"
    )]
    pub aggregator_group: String,

    /// Rows (counter-windows and idempotency key uses) an aggregator may hold read but not yet
    /// committed. Past it, it stops consuming until a commit succeeds, so a PostgreSQL outage
    /// under many distinct names costs lag, not unbounded memory.
    #[arg(
        long,
        env = "TALLY_AGGREGATOR_MAX_PENDING",
        default_value_t = 1_000_000
    )]
    pub aggregator_max_pending: usize,
}

/// Who may write, and how fast.
#[derive(clap::Args, Clone, Debug)]
pub struct SecurityConfig {
    /// API keys accepted on the write routes as `Authorization: Bearer KEY`, comma separated.
    /// Empty: writes need no key.
    #[arg(
        long,
        env = "TALLY_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// Token the admin routes require as `Authorization: Bearer TOKEN`. Unset: admin routes are
    /// disabled.
    #[arg(long, env = "TALLY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Write requests per second each client (API key, else IP address) may send. 0 turns the
    /// limit off.
    #[arg(long, env = "TALLY_RATE_LIMIT_PER_SECOND", default_value_t = 0)]
    pub rate_limit_per_second: u32,

    /// Requests a client may send at once above its steady rate.
    #[arg(long, env = "TALLY_RATE_LIMIT_BURST", default_value_t = 1_000)]
    pub rate_limit_burst: u32,

    /// Largest total size of a request's headers, in bytes.
    #[arg(long, env = "TALLY_HEADER_MAX_BYTES", default_value_t = 16_384)]
    pub header_max_bytes: usize,
}
