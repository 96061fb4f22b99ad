//! The strict counters' metrics.

use std::sync::LazyLock;

use prometheus::{Histogram, IntCounterVec, register_histogram, register_int_counter_vec};

pub(crate) static OPERATIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tally_strict_operations_total",
        "Strict counter operations answered, by operation (create, get, add, cas) and outcome",
        &["operation", "outcome"]
    )
    .expect("the metric should register once")
});

pub(crate) static BATCH_OPERATIONS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "tally_strict_batch_operations",
        "Writes of one strict counter committed together in one PostgreSQL transaction",
        vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]
    )
    .expect("the metric should register once")
});

pub(crate) fn count(operation: &str, outcome: &str) {
    OPERATIONS.with_label_values(&[operation, outcome]).inc();
}
