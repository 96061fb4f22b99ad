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
        tally_ingest::admin::set_counter,
        tally_ingest::admin::reset_counter,
        tally_ingest::admin::import,
        tally_ingest::admin::audit,
        crate::health::healthz,
        crate::health::readyz,
        metrics,
        openapi_json,
    ),
    components(schemas(ProblemDocument)),
    modifiers(&AdminTokenScheme)
)]
pub struct ApiDoc;

/// The admin routes' bearer token (`TALLY_ADMIN_TOKEN`).
struct AdminTokenScheme;

impl utoipa::Modify for AdminTokenScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

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
