//! # tally-core
//!
//! The pure heart of Tally. Everything here is plain data and arithmetic, so it can be
//! unit-tested without Redis, Kafka or PostgreSQL.
//!
//! ## Layout
//! - [`name`]: what a counter name is ([`CounterName`]).
//! - [`amount`]: what an increment amount is ([`Amount`]), what integer a JSON number stands
//!   for, and clamping to `i64`.
//! - [`idempotency`]: what an `Idempotency-Key` is.
//! - [`window`]: how wall-clock time maps to 5-second aggregation windows, and when a window is
//!   closed.
//! - [`record`]: the Kafka wire format of a counter's records (increments and sets).
//! - [`shards`]: how many Redis shard keys a counter uses for a given write rate.
//!
//! How Redis mirrors PostgreSQL (keys, scripts, the value a read computes) is `tally-mirror`'s.
//!
//! This crate must never do I/O, read the clock, or spawn tasks: callers pass the time in.

pub mod amount;
pub mod idempotency;
pub mod name;
pub mod record;
pub mod shards;
pub mod window;

pub use amount::{Amount, AmountError, clamp_to_i64};
pub use idempotency::{IdempotencyKey, IdempotencyKeyError, KeyUse};
pub use name::{CounterName, CounterNameError};
pub use record::{
    CounterRecord, IncrementRecord, KeyedIncrement, RecordError, SetAudit, SetRecord,
};
pub use shards::ShardPolicy;
pub use window::WindowSpec;
