//! # tally-ingest
//!
//! Where an increment enters Tally. [`routes`] validates the request; [`service`] claims its
//! idempotency keys (`idempotency`), produces one Kafka record per counter (key = counter name,
//! `acks=all`, idempotent producer), waits for the acknowledgement, then adds it to one of the
//! counter's delta shards in the Redis mirror, picked at random among as many as the counter's
//! write rate calls for (`hot_names`). Increments of one counter that arrive while its previous
//! records are in flight travel together (`group_commit`).
//!
//! The ingest must never answer `202` before Kafka acknowledged, and never treat Redis as the
//! truth: a failed delta costs freshness until the window is applied, never a count.

pub mod admin;
mod group_commit;
mod hot_names;
mod idempotency;
mod metrics;
mod record;
pub mod routes;
pub mod service;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

pub use service::{
    CounterIncrements, IncrementItem, IngestError, IngestService, ProduceError, SetError,
    SetRequest,
};

/// The admin routes that set plain counters and read the audit trail, with a body limit that
/// fits a full import. The caller puts them behind the admin token.
pub fn admin_router(service: Arc<IngestService>) -> Router {
    Router::new()
        .route("/v1/admin/counters/{name}/set", post(admin::set_counter))
        .route(
            "/v1/admin/counters/{name}/reset",
            post(admin::reset_counter),
        )
        // An empty name has no segment for the router to match; answer it as a bad name.
        .route("/v1/admin/counters//set", post(admin::empty_name))
        .route("/v1/admin/counters//reset", post(admin::empty_name))
        .route("/v1/admin/import", post(admin::import))
        .route("/v1/admin/audit", get(admin::audit))
        .layer(DefaultBodyLimit::max(admin::IMPORT_BODY_MAX_BYTES))
        .with_state(service)
}

/// The write routes, with the body size limit applied.
pub fn router(service: Arc<IngestService>, body_max_bytes: usize) -> Router {
    Router::new()
        .route("/v1/counters/{name}/increment", post(routes::increment_one))
        .route("/v1/increments", post(routes::increment_batch))
        .layer(DefaultBodyLimit::max(body_max_bytes))
        .with_state(service)
}
