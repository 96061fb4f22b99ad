//! The ingest's metrics.

use std::sync::LazyLock;

use prometheus::{
    Histogram, IntCounter, IntCounterVec, register_histogram, register_int_counter,
    register_int_counter_vec,
};

pub(crate) static INCREMENTS_ACCEPTED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_ingest_increments_accepted_total",
        "Increments acknowledged by Kafka and answered with 202"
    )
    .expect("the metric should register once")
});

pub(crate) static SETS_ACCEPTED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_ingest_sets_accepted_total",
        "Audited sets of plain counters acknowledged by Kafka"
    )
    .expect("the metric should register once")
});

pub(crate) static RECORDS_PRODUCED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_ingest_records_produced_total",
        "Kafka records acknowledged; each holds one counter's increments of one group commit"
    )
    .expect("the metric should register once")
});

pub(crate) static KAFKA_ACK_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "tally_ingest_kafka_ack_seconds",
        "Time from producing a record to Kafka's acknowledgement, in seconds",
        tally_infra::metrics::latency_buckets()
    )
    .expect("the metric should register once")
});

pub(crate) static KAFKA_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tally_ingest_kafka_failures_total",
        "Records Kafka did not acknowledge in time, by reason",
        &["reason"]
    )
    .expect("the metric should register once")
});

pub(crate) static REDIS_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_ingest_redis_failures_total",
        "Acknowledged increments whose Redis INCRBY failed; reads catch up when the window closes"
    )
    .expect("the metric should register once")
});

pub(crate) static SHARD_COUNT: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "tally_ingest_shard_count",
        "Redis shard keys of the counter each record was written to",
        vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]
    )
    .expect("the metric should register once")
});
