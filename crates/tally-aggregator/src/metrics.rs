//! The aggregator's metrics.

use std::sync::LazyLock;

use prometheus::{
    Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, register_histogram,
    register_int_counter, register_int_counter_vec, register_int_gauge, register_int_gauge_vec,
};

pub(crate) static WINDOW_FLUSH_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "tally_aggregator_window_flush_seconds",
        "Time to commit one window to PostgreSQL, in seconds",
        tally_infra::metrics::latency_buckets()
    )
    .expect("the metric should register once")
});

pub(crate) static WINDOW_FLUSH_ROWS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "tally_aggregator_window_flush_rows",
        "(counter, window) rows in one window's upsert",
        vec![
            0.0,
            1.0,
            10.0,
            100.0,
            1_000.0,
            10_000.0,
            100_000.0,
            1_000_000.0
        ]
    )
    .expect("the metric should register once")
});

pub(crate) static RECORDS_APPLIED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_aggregator_records_applied_total",
        "Kafka records applied to PostgreSQL"
    )
    .expect("the metric should register once")
});

pub(crate) static MALFORMED_RECORDS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_aggregator_malformed_records_total",
        "Kafka records skipped because their key or value was not an increment"
    )
    .expect("the metric should register once")
});

pub(crate) static CLAMPED_SUMS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_aggregator_clamped_total",
        "Window sums or totals clamped to the i64 range instead of wrapping"
    )
    .expect("the metric should register once")
});

pub(crate) static FENCED_COMMITS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_aggregator_fenced_commits_total",
        "Commits abandoned because another aggregator had moved the partition's offset"
    )
    .expect("the metric should register once")
});

pub(crate) static FAILED_COMMITS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_aggregator_failed_commits_total",
        "Window commits that PostgreSQL did not take; the window is retried"
    )
    .expect("the metric should register once")
});

pub(crate) static DUPLICATES_ABSORBED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_aggregator_duplicates_absorbed_total",
        "Keyed increments not counted because their idempotency key was already applied"
    )
    .expect("the metric should register once")
});

pub(crate) static CONSUMER_LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "tally_aggregator_consumer_lag_records",
        "Records in the partition not yet applied to PostgreSQL",
        &["partition"]
    )
    .expect("the metric should register once")
});

pub(crate) static IDEMPOTENCY_CONFLICTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_idempotency_conflicts_total",
        "Keyed increments counted although their key was used for another counter or amount: both uses were acknowledged while Redis could not claim the key"
    )
    .expect("the metric should register once")
});

pub(crate) static CONSUMPTION_PAUSED: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tally_aggregator_consumption_paused",
        "1 while the aggregator holds too much uncommitted data and has stopped consuming"
    )
    .expect("the metric should register once")
});

pub(crate) static OFFSET_GAP_RECORDS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "tally_aggregator_offset_gap_records",
        "Records of the partition that retention deleted before they were applied; the partition is not consumed while this is above 0",
        &["partition"]
    )
    .expect("the metric should register once")
});

pub(crate) static MIRROR_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tally_mirror_copy_failures_total",
        "Commits that could not be copied into Redis; the next commit repairs what they missed"
    )
    .expect("the metric should register once")
});

pub(crate) static MIRROR_BUCKETS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tally_mirror_buckets_total",
        "Buckets of the Redis mirror found by the aggregator's commits, by state: lost, behind, rolled_back, gaps, repaired, failed, left",
        &["state"]
    )
    .expect("the metric should register once")
});

pub(crate) fn record_mirror_report(report: &tally_mirror::ApplyReport) {
    for (state, count) in [
        ("lost", report.buckets_lost),
        ("behind", report.buckets_behind),
        ("rolled_back", report.buckets_rolled_back),
        ("gaps", report.buckets_with_gaps),
        ("repaired", report.repair.buckets_repaired),
        ("failed", report.buckets_failed),
        ("left", report.buckets_left),
    ] {
        if count > 0 {
            MIRROR_BUCKETS
                .with_label_values(&[state])
                .inc_by(count as u64);
        }
    }
}
