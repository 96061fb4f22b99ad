//! # tally-core
//!
//! The pure heart of Tally. Everything here is plain data and arithmetic, so it can be
//! unit-tested without Redis, Kafka or PostgreSQL.
//!
//! ## Layout
//! - [`name`]: what a counter name is ([`CounterName`]).
//! - [`amount`]: what an increment amount is ([`Amount`]) and clamping to `i64`.
//! - [`idempotency`]: what an `Idempotency-Key` is.
//! - [`window`]: how wall-clock time maps to 5-second aggregation windows, and when a window is
//!   closed.
//! - [`record`]: the Kafka wire format of one increment record.
//! - [`keys`]: the Redis key layout shared by ingest, aggregator, read and replay.
//! - [`shards`]: how many Redis shard keys a counter uses for a given write rate.
//! - [`scripts`]: the Lua scripts that keep Redis copies of PostgreSQL consistent.
//! - [`value`]: how a read combines the PostgreSQL summary with the open-window Redis deltas.
//!
//! This crate must never do I/O, read the clock, or spawn tasks: callers pass the time in.

pub mod amount;
pub mod idempotency;
pub mod keys;
pub mod name;
pub mod record;
pub mod scripts;
pub mod shards;
pub mod value;
pub mod window;

pub use amount::{Amount, AmountError, clamp_to_i64};
pub use idempotency::{IdempotencyKey, IdempotencyKeyError, KeyUse};
pub use keys::KeySpace;
pub use name::{CounterName, CounterNameError};
pub use record::{IncrementRecord, KeyedIncrement, RecordError};
pub use shards::ShardPolicy;
pub use value::{CounterSummary, combine_value};
pub use window::WindowSpec;
