//! # tally-strict
//!
//! Strict counters: inventory and quota counters that never oversell. Each is one row of
//! `strict_counters` in PostgreSQL, written synchronously by the request that changes it; they
//! are never sharded and never go through Kafka or Redis. This crate owns their whole protocol:
//! [`rules`] decides what each write answers, [`service`] runs the transactions, [`routes`]
//! speaks HTTP.
//!
//! The invariants, which every change here must keep:
//! 1. **Never past the limits.** A counter's value always lies within its `min` and `max` (and
//!    the `i64` range): a write that would leave them is refused with `409` and changes nothing.
//!    The decision is taken under the row's lock, on the value PostgreSQL holds, and the table's
//!    CHECK backs it.
//! 2. **An add counts at most once per idempotency key.** The first outcome of an add sent with
//!    an `Idempotency-Key` (applied or refused) is stored in the same transaction that decided
//!    it; every retry of the same key, counter and amount within the idempotency window answers
//!    that outcome again and changes nothing, however many copies race; the same key with
//!    another counter or amount is refused with `422`.
//! 3. **The version goes up by exactly one per change.** Each accepted add or compare-and-set
//!    adds one; refusals, replays and reads leave it.
//! 4. **A `200` means committed.** A write answers only after the transaction that holds it
//!    committed, and a read comes straight from PostgreSQL, so it shows every write answered
//!    before it began.
//!
//! This crate must never cache a value, and never decide a write outside the row's lock.

mod metrics;
pub mod routes;
pub mod rules;
pub mod service;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};

pub use service::{StrictError, StrictService};

/// Strict bodies are a few numbers; anything larger is a mistake.
const BODY_MAX_BYTES: usize = 16 * 1024;

/// The routes that change strict counters. The caller puts them behind the write guard.
pub fn write_router(service: Arc<StrictService>) -> Router {
    Router::new()
        .route("/v1/strict/{name}", put(routes::define))
        .route("/v1/strict/{name}/add", post(routes::add))
        .route("/v1/strict/{name}/cas", post(routes::compare_and_set))
        .layer(DefaultBodyLimit::max(BODY_MAX_BYTES))
        .with_state(service)
}

/// The read route, and the answer to an empty name (which no `{name}` segment matches).
pub fn read_router(service: Arc<StrictService>) -> Router {
    Router::new()
        .route("/v1/strict/{name}", get(routes::read))
        .route(
            "/v1/strict/",
            get(routes::empty_name).put(routes::empty_name),
        )
        .route("/v1/strict//add", post(routes::empty_name))
        .route("/v1/strict//cas", post(routes::empty_name))
        .with_state(service)
}
