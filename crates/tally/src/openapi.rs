//! The OpenAPI 3.1 document, generated from the route handlers and their types.

use axum::Json;
use serde_json::Value;
use utoipa::OpenApi;

/// An RFC 9457 problem document, the body of every error.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // Documents the wire format; tally_infra::Problem builds it.
pub struct ProblemDocument {
    /// `/problems/{slug}`, naming the kind of problem.
    #[schema(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// What exactly was wrong.
    pub detail: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tally",
        description = "An exact, fast distributed counter service."
    ),
    paths(
        tally_ingest::routes::increment_one,
        tally_ingest::routes::increment_batch,
        tally_read::routes::read_one,
        tally_read::routes::read_many,
        crate::health::healthz,
        crate::health::readyz,
        metrics,
        openapi_json,
    ),
    components(schemas(ProblemDocument))
)]
pub struct ApiDoc;

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")), tag = "operations")]
pub async fn metrics() -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            tally_infra::metrics::PROMETHEUS_CONTENT_TYPE,
        )],
        tally_infra::metrics::render(),
    )
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "The OpenAPI 3.1 document")), tag = "operations")]
pub async fn openapi_json() -> Json<Value> {
    Json(serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document should serialize"))
}
