//! The read path's metrics.

use std::sync::LazyLock;

use prometheus::{IntCounterVec, register_int_counter_vec};

pub(crate) static VALUES_SERVED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tally_read_values_total",
        "Counter values served, by source: cache, redis or postgres",
        &["source"]
    )
    .expect("the metric should register once")
});

pub(crate) static POSTGRES_FALLBACKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tally_read_postgres_fallbacks_total",
        "Reads answered from PostgreSQL because Redis could not be trusted, by reason",
        &["reason"]
    )
    .expect("the metric should register once")
});
