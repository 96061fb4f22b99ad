//! Tally's fault-injection suite: a load generator that records every operation, faults
//! injected into Tally's processes and stores, and a Jepsen-style counter checker.
//!
//! `deploy/faults.sh` brings up an isolated stack and runs the `tally-faults` binary; the
//! checker's rules are unit-tested in [`checker`] with hand-made histories.

pub mod checker;
pub mod client;
pub mod drain;
pub mod history;
pub mod load;
pub mod processes;
pub mod report;
pub mod runner;
pub mod scenarios;
pub mod stack;
