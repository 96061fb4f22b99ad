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

/// The oldest Redis Tally works with: idempotency keys are claimed with `SET key value NX GET`,
/// which Redis 7.0 introduced (older servers refuse NX with GET).
const OLDEST_REDIS_MAJOR: u32 = 7;

/// Whether Redis answers and is recent enough; the error says which it is not.
pub async fn check_server(connection: &mut ConnectionManager) -> Result<(), String> {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(connection)
        .await
        .map_err(|error| format!("unreachable: {error}"))?;
    let version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .map(str::trim)
        .unwrap_or("unknown");
    let major: Option<u32> = version
        .split('.')
        .next()
        .and_then(|major| major.parse().ok());
    match major {
        Some(major) if major < OLDEST_REDIS_MAJOR => Err(format!(
            "redis {version} is too old: tally needs redis {OLDEST_REDIS_MAJOR}.0 or newer (it claims idempotency keys with SET NX GET)"
        )),
        _ => Ok(()),
    }
}
