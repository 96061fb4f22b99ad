//! # tally
//!
//! The one binary of Tally. `main` parses the command line, sets up logging and dispatches;
//! everything else lives in the role crates:
//!
//! | where | what |
//! |---|---|
//! | `tally-ingest` | an increment enters: Kafka, then Redis, then `202` |
//! | `tally-aggregator` | an increment becomes durable in PostgreSQL, once per window |
//! | `tally-read` | a counter is read: cache, Redis, or PostgreSQL |
//! | `tally-mirror` | the Redis mirror of PostgreSQL: keys, scripts, the value formula, loss detection, repairs |
//! | `tally-core` | the pure model: names, amounts, windows, the wire format |
//! | `tally-infra` | connections, configuration, problem+json, metrics |
//!
//! This crate wires them together: [`cli`] for the commands and their flags, [`server`] for
//! `tally serve`, [`replay`] for `tally replay`, [`guard`] for API keys, rate limits and the
//! admin token, [`health`] and [`openapi`] for the operational routes.

pub mod cli;
pub mod guard;
pub mod health;
mod http_metrics;
pub mod openapi;
pub mod replay;
pub mod server;

pub use server::App;
