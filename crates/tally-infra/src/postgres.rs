//! PostgreSQL: the durable truth. Connections and migrations.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::config::StoreConfig;

/// The migrations in the repository's `migrations/` folder, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// A pool that connects lazily, so a process starts even while PostgreSQL is down.
pub fn connect(config: &StoreConfig) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy(&config.database_url)
        .context("invalid PostgreSQL URL")
}

/// Applies every migration not applied yet. Running it again is a no-op.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("failed to apply the migrations")
}

pub async fn ping(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(pool).await.map(|_| ())
}
