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
        tally_strict::routes::define,
        tally_strict::routes::read,
        tally_strict::routes::add,
        tally_strict::routes::compare_and_set,
        tally_ingest::admin::set_counter,
        tally_ingest::admin::reset_counter,
        tally_ingest::admin::import,
        tally_ingest::admin::audit,
        crate::server::admin_status,
        tally_widgets::routes::badge,
        tally_widgets::routes::shields_endpoint,
        tally_widgets::routes::live_events,
        tally_widgets::routes::embed_page,
        tally_widgets::routes::embed_script,
        tally_widgets::routes::countapi_hit,
        tally_widgets::routes::countapi_get,
        crate::health::healthz,
        crate::health::readyz,
        metrics,
        openapi_json,
    ),
    components(schemas(
        ProblemDocument,
        tally_infra::openapi::CounterNameSchema,
        tally_infra::openapi::IdempotencyKeyHeaderSchema
    )),
    modifiers(&AdminTokenScheme, &EdgeResponses)
)]
pub struct ApiDoc;

/// What the layers in front of every route add to its answers (`crate::guard`), and the body of
/// every error: so that each operation lists every status it can answer, with its schema.
/// - `api_key`: the write routes' bearer API key (`TALLY_API_KEYS`), optional unless keys are
///   configured;
/// - `431` on every operation: headers over the cap (`TALLY_HEADER_MAX_BYTES`);
/// - every `application/problem+json` body is a [`ProblemDocument`].
struct EdgeResponses;

impl utoipa::Modify for EdgeResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key of `TALLY_API_KEYS`. Without configured keys the write \
                         routes take any request.",
                    ))
                    .build(),
            ),
        );
        // utoipa makes an optional body nullable as well; this one may be left out, never null.
        if let Some(request_body) = openapi
            .paths
            .paths
            .get_mut("/v1/counters/{name}/increment")
            .and_then(|path_item| path_item.post.as_mut())
            .and_then(|operation| operation.request_body.as_mut())
        {
            request_body.required = Some(utoipa::openapi::Required::False);
        }
        let problem_schema = || RefOr::Ref(Ref::from_schema_name("ProblemDocument"));
        for path_item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut path_item.get,
                &mut path_item.put,
                &mut path_item.post,
                &mut path_item.delete,
                &mut path_item.options,
                &mut path_item.head,
                &mut path_item.patch,
                &mut path_item.trace,
            ];
            for operation in operations.into_iter().flatten() {
                let responses = &mut operation.responses.responses;
                responses.entry("431".to_owned()).or_insert_with(|| {
                    ResponseBuilder::new()
                        .description(
                            "The request's headers add up to more than 16 KiB \
                             (`TALLY_HEADER_MAX_BYTES`)",
                        )
                        .content(
                            tally_infra::problem::PROBLEM_CONTENT_TYPE,
                            ContentBuilder::new().schema(Some(problem_schema())).build(),
                        )
                        .into()
                });
                for response in responses.values_mut() {
                    let RefOr::T(response) = response else {
                        continue;
                    };
                    if let Some(content) = response
                        .content
                        .get_mut(tally_infra::problem::PROBLEM_CONTENT_TYPE)
                        && content.schema.is_none()
                    {
                        content.schema = Some(problem_schema());
                    }
                }
            }
        }
    }
}

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
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")), tag = "operations")]
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
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "The OpenAPI 3.1 document", body = Object, content_type = "application/json")), tag = "operations")]
pub async fn openapi_json() -> Json<Value> {
    Json(serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document should serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` in the document names a schema it defines: a client (or a fuzzer) that
    /// follows one finds it.
    #[test]
    fn every_reference_resolves() {
        fn collect<'v>(value: &'v Value, references: &mut Vec<&'v str>) {
            match value {
                Value::Object(members) => {
                    for (key, member) in members {
                        match (key.as_str(), member) {
                            ("$ref", Value::String(reference)) => references.push(reference),
                            _ => collect(member, references),
                        }
                    }
                }
                Value::Array(items) => items.iter().for_each(|item| collect(item, references)),
                _ => {}
            }
        }
        let document = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let mut references = Vec::new();
        collect(&document, &mut references);
        assert!(!references.is_empty());
        for reference in references {
            let name = reference
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected reference {reference}"));
            assert!(
                document["components"]["schemas"].get(name).is_some(),
                "{reference} is not defined"
            );
        }
    }
}
