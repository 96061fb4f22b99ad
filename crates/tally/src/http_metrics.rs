//! Request counts and latencies for every route, labelled by the route's pattern (never the raw
//! path, which would make one series per counter name).

use std::sync::LazyLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{HistogramVec, IntCounterVec, register_histogram_vec, register_int_counter_vec};

static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tally_http_requests_total",
        "HTTP requests, by route, method and status",
        &["route", "method", "status"]
    )
    .expect("the metric should register once")
});

static REQUEST_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "tally_http_request_duration_seconds",
        "HTTP request latency, by route, in seconds",
        &["route"],
        tally_infra::metrics::latency_buckets()
    )
    .expect("the metric should register once")
});

pub(crate) async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    REQUESTS
        .with_label_values(&[&route, &method, response.status().as_str()])
        .inc();
    REQUEST_SECONDS
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    response
}
