//! Redis connections. Redis is a cache: every caller must treat an error or a timeout as
//! "Redis is lost" and carry on without it.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::StoreConfig;

/// A multiplexed connection that reconnects by itself after Redis restarts. Creating it does not
/// connect, so a process starts even while Redis is down.
pub fn connect(config: &StoreConfig) -> anyhow::Result<ConnectionManager> {
    use anyhow::Context as _;
    let client = redis::Client::open(config.redis_url.as_str())
        .with_context(|| format!("invalid Redis URL {}", config.redis_url))?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.redis_timeout()))
        .set_response_timeout(Some(config.redis_timeout()))
        // Fail fast and let the caller fall back; the next command tries to reconnect again.
        .set_number_of_retries(1);
    ConnectionManager::new_lazy_with_config(client, manager_config)
        .context("failed to create the Redis connection manager")
}

pub async fn ping(connection: &mut ConnectionManager) -> redis::RedisResult<()> {
    redis::cmd("PING")
        .query_async::<String>(connection)
        .await
        .map(|_| ())
}
