//! # tally-infra
//!
//! What every role of Tally needs to talk to the outside world, in one place:
//! - [`config`]: every setting, as a flag and a `TALLY_*` environment variable;
//! - [`kafka`], [`redis_store`], [`postgres`]: how to connect, with the settings the promises
//!   depend on (acks=all, the idempotent producer, manual offsets, timeouts);
//! - [`problem`]: the one mapping from errors users see to `application/problem+json`, and
//!   [`counter_path`] for the `{name}` segment every counter route takes, and [`openapi`] for
//!   the rules on names, amounts and keys as the OpenAPI document states them;
//! - [`json_body`]: how a JSON request body is read, and the problem each way of getting it
//!   wrong is answered with (content type, an object, known members only);
//! - [`metrics`]: the Prometheus registry rendered by `/metrics`;
//! - [`clock`]: wall-clock milliseconds.
//!
//! This crate knows nothing about counting. It must never decide what a count is.

pub mod clock;
pub mod config;
pub mod counter_path;
pub mod json_body;
pub mod kafka;
pub mod metrics;
pub mod openapi;
pub mod postgres;
pub mod problem;
pub mod redis_store;

pub use problem::Problem;
