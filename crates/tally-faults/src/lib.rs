//! Tally's fault-injection suite: a load generator that records every operation, faults
//! injected into Tally's processes and stores, and a Jepsen-style counter checker.
//!
//! `deploy/faults.sh` brings up an isolated stack and runs the `tally-faults` binary; the
//! checker's rules are unit-tested in [`checker`] with hand-made histories.
//!
//! # Layout
//!
//! - [`scenarios`]: what each scenario does, as data; [`runner`] runs one and checks it.
//! - [`load`] and [`client`]: the clients of every mode and how each answer is classified;
//!   [`key_reuse`]: the mode that races two uses of one idempotency key; [`wide`]: batches over
//!   100,000 names and their own final check; [`sets`]: the admin client that sets and resets
//!   some of the load's counters, and the audit trail the checker holds them to.
//! - [`processes`] (Tally), [`stack`] (Redis, PostgreSQL, Kafka), [`redis_faults`] (what Redis
//!   holds: snapshots, evictions, flushes) and [`memory`] (the aggregator's RSS): the faults.
//! - [`drain`], [`checker`], [`history`], [`report`]: what happened, and whether it was right.

pub mod checker;
pub mod client;
pub mod drain;
pub mod history;
pub mod key_reuse;
pub mod load;
pub mod memory;
pub mod processes;
pub mod redis_faults;
pub mod report;
pub mod runner;
pub mod scenarios;
pub mod sets;
pub mod stack;
pub mod wide;
