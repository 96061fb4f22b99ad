//! Benchmarks for Tally.
