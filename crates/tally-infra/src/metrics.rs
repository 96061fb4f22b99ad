//! The process-wide Prometheus registry. Each role crate registers its own metrics in its own
//! `metrics.rs`; this module only renders them for `/metrics`.

use prometheus::{Encoder, TextEncoder};

pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn render() -> String {
    let families = prometheus::gather();
    let mut text = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut text)
        .expect("encoding metrics into memory should not fail");
    String::from_utf8(text).expect("the Prometheus text format should be UTF-8")
}

/// Latency buckets in seconds, from 100 µs to 10 s.
pub fn latency_buckets() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ]
}
