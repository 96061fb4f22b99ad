//! # tally-read
//!
//! Where a counter is read. A value comes from, in order:
//! 1. this process's cache, at most the cache TTL (1 s) old;
//! 2. Redis: the counter's PostgreSQL summary plus the Redis deltas of the windows not yet
//!    closed, through the mirror's trust rules (`tally_mirror::read`);
//! 3. PostgreSQL, flagged `stale`, for every counter Redis is unreachable or cannot be trusted
//!    for (its bucket lost data, came back older than PostgreSQL, or its deltas do not reach back
//!    to the closed window).
//!
//! The read path must never write to any store, and never answer a value from a Redis it
//! cannot trust: an empty Redis looks like all zeros.

mod metrics;
pub mod routes;
pub mod service;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;

pub use service::{CounterValue, ReadService, Source};

pub fn router(service: Arc<ReadService>) -> Router {
    Router::new()
        .route("/v1/counters", get(routes::read_many))
        .route("/v1/counters/{name}", get(routes::read_one))
        .with_state(service)
}
