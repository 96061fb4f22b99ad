//! The read routes.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use serde::Serialize;
use tally_core::{CounterName, CounterNameError};
use tally_infra::Problem;
use tally_infra::counter_path::{counter_name_from_path, invalid_counter_name};
use tracing::instrument;

use crate::service::{CounterValue, ReadError, ReadService};

/// The answer of a multi-get.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CounterValues {
    pub counters: Vec<CounterValue>,
}

/// Reads one counter. A name never incremented reads 0.
#[utoipa::path(
    get,
    path = "/v1/counters/{name}",
    params(
        ("name" = inline(tally_infra::openapi::CounterNameSchema), Path, description = "Counter name, percent-encoded"),
        ("fresh" = Option<bool>, Query, description = "`true` skips the in-process cache; `false` (the default) allows it. No other value, and no other parameter, is accepted"),
    ),
    responses(
        (status = 200, description = "The counter's value", body = CounterValue),
        (status = 400, description = "Bad name or query", content_type = "application/problem+json"),
        (status = 503, description = "Neither Redis nor PostgreSQL answered", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    tag = "counters"
)]
#[instrument(skip_all, fields(counter.name))]
pub async fn read_one(
    State(service): State<Arc<ReadService>>,
    name: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Json<CounterValue>, Problem> {
    let name = counter_name_from_path(name)?;
    tracing::Span::current().record("counter.name", name.as_str());
    let query = parse_query(query.as_deref().unwrap_or_default(), false)?;
    let mut values = service
        .read(vec![name], query.fresh)
        .await
        .map_err(unavailable)?;
    Ok(Json(
        values.pop().expect("one name read should give one value"),
    ))
}

/// Reads up to 1000 counters (configurable) in one round trip per store.
#[utoipa::path(
    get,
    path = "/v1/counters",
    params(
        ("name" = Vec<tally_infra::openapi::CounterNameSchema>, Query, style = Form, explode, min_items = 1, max_items = 1000,
            description = "Counter names, 1 to 1,000 (`TALLY_READ_MAX_NAMES`): repeat the parameter (`name=a&name=b`). Form-encoded: a `+` is a space, so send a `+` as `%2B`. A name may repeat"),
        ("fresh" = Option<bool>, Query, description = "`true` skips the in-process cache; `false` (the default) allows it. No other value, and no other parameter, is accepted"),
    ),
    responses(
        (status = 200, description = "The counters' values, in the order asked", body = CounterValues),
        (status = 400, description = "No names, too many, a bad name, or a bad query", content_type = "application/problem+json"),
        (status = 414, description = "The URI is longer than the HTTP server takes (64 KiB): ask for fewer names per request. Sent by the HTTP layer, with an empty body"),
        (status = 503, description = "Neither Redis nor PostgreSQL answered", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    tag = "counters"
)]
#[instrument(skip_all, fields(batch.size))]
pub async fn read_many(
    State(service): State<Arc<ReadService>>,
    RawQuery(query): RawQuery,
) -> Result<Json<CounterValues>, Problem> {
    let query = parse_query(query.as_deref().unwrap_or_default(), true)?;
    tracing::Span::current().record("batch.size", query.names.len());
    if query.names.is_empty() {
        return Err(invalid_query(
            "give at least one counter as `?name=...`".into(),
        ));
    }
    if query.names.len() > service.max_names {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "too-many-names",
            "Too many counters in one read",
            format!(
                "{} names were asked for; the limit is {}",
                query.names.len(),
                service.max_names
            ),
        ));
    }
    let counters = service
        .read(query.names, query.fresh)
        .await
        .map_err(unavailable)?;
    Ok(Json(CounterValues { counters }))
}

#[derive(Debug, Default)]
struct ReadQuery {
    names: Vec<CounterName>,
    fresh: bool,
}

/// Parses `name=...&name=...&fresh=...` as `application/x-www-form-urlencoded`: `+` is a space,
/// so a `+` in a name must be sent as `%2B`.
fn parse_query(query: &str, names_allowed: bool) -> Result<ReadQuery, Problem> {
    let mut parsed = ReadQuery::default();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode_component(key)
            .map_err(|_| invalid_query("a query parameter name is not valid UTF-8".into()))?;
        match key.as_str() {
            "name" if names_allowed => {
                let name = decode_component(value)
                    .map_err(|_| invalid_counter_name(&CounterNameError::NotUtf8))?;
                let name = CounterName::parse(name).map_err(|error| {
                    invalid_counter_name(&format!("name #{}: {error}", parsed.names.len() + 1))
                })?;
                parsed.names.push(name);
            }
            "fresh" => {
                // Only what the document calls a boolean: a client that sends `1` or `yes`
                // learns at once that it is not understood.
                parsed.fresh = match value {
                    "true" => true,
                    "false" => false,
                    other => {
                        return Err(invalid_query(format!(
                            "`fresh` must be true or false, got `{other}`"
                        )));
                    }
                }
            }
            other => return Err(invalid_query(format!("unknown query parameter `{other}`"))),
        }
    }
    Ok(parsed)
}

fn decode_component(component: &str) -> Result<String, std::str::Utf8Error> {
    let spaced = component.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|text| text.into_owned())
}

fn invalid_query(detail: String) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-query",
        "Invalid query string",
        detail,
    )
}

pub fn unavailable(error: ReadError) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "stores-unavailable",
        "Counters cannot be read right now",
        error.to_string(),
    )
    .with_retry_after(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_fresh() {
        let query = parse_query("name=a&name=b%2Fc&name=x+y%2B&fresh=true", true).unwrap();
        let names: Vec<&str> = query.names.iter().map(CounterName::as_str).collect();
        assert_eq!(names, vec!["a", "b/c", "x y+"]);
        assert!(query.fresh);
    }

    #[test]
    fn rejects_bad_queries_with_the_reason() {
        assert_eq!(
            parse_query("name=", true).unwrap_err().slug,
            "invalid-counter-name"
        );
        assert_eq!(
            parse_query("name=%FF", true).unwrap_err().slug,
            "invalid-counter-name"
        );
        assert_eq!(
            parse_query("name=a%0Ab", true).unwrap_err().slug,
            "invalid-counter-name"
        );
        assert_eq!(
            parse_query("fresh=maybe", true).unwrap_err().slug,
            "invalid-query"
        );
        for fresh in ["fresh=", "fresh", "fresh=1", "fresh=0", "fresh=TRUE"] {
            assert_eq!(
                parse_query(fresh, true).unwrap_err().slug,
                "invalid-query",
                "{fresh}"
            );
        }
        assert_eq!(
            parse_query("nam=a", true).unwrap_err().slug,
            "invalid-query"
        );
        assert_eq!(
            parse_query("name=a", false).unwrap_err().slug,
            "invalid-query"
        );
    }
}
