//! The strict counter routes. Everything a client sends is validated here, before PostgreSQL is
//! asked anything; every error is a problem+json document.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tally_core::amount::{deserialize_optional_whole_number, deserialize_whole_number};
use tally_core::{CounterName, CounterNameError, IdempotencyKey};
use tally_infra::Problem;
use tally_infra::counter_path::{counter_name_from_path, invalid_counter_name};
use tally_infra::json_body::parse_body;
use tracing::instrument;

use crate::metrics;
use crate::rules::{Attempt, Decision, Limits, Operation, Outcome};
use crate::service::{Creation, Definition, StrictCounter, StrictError, StrictService};

pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The body of `PUT /v1/strict/{name}`: the counter's definition.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DefineRequest {
    /// The initial value; it must lie within `min` and `max`.
    #[serde(deserialize_with = "deserialize_whole_number")]
    pub value: i64,
    /// The lowest value the counter may take; absent or `null`: unbounded (the `i64` range).
    #[serde(default, deserialize_with = "deserialize_optional_whole_number")]
    pub min: Option<i64>,
    /// The highest value the counter may take; absent or `null`: unbounded (the `i64` range).
    #[serde(default, deserialize_with = "deserialize_optional_whole_number")]
    pub max: Option<i64>,
}

/// The body of `POST /v1/strict/{name}/add`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    /// A nonzero integer; negative takes away.
    #[schema(schema_with = nonzero_i64_schema)]
    #[serde(deserialize_with = "deserialize_whole_number")]
    pub by: i64,
}

/// The body of `POST /v1/strict/{name}/cas`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompareAndSetRequest {
    /// The value the counter must hold for the set to happen.
    #[serde(deserialize_with = "deserialize_whole_number")]
    pub expected: i64,
    /// The new value; it must lie within the counter's `min` and `max`.
    #[serde(deserialize_with = "deserialize_whole_number")]
    pub value: i64,
}

/// A strict counter: its value, limits and version.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StrictCounterBody {
    pub counter: String,
    pub value: i64,
    /// `null`: unbounded below.
    pub min: Option<i64>,
    /// `null`: unbounded above.
    pub max: Option<i64>,
    /// Goes up by exactly one per accepted add or compare-and-set; 0 at creation.
    pub version: i64,
}

/// A strict counter after an accepted write.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StrictValueBody {
    pub counter: String,
    pub value: i64,
    pub version: i64,
}

fn nonzero_i64_schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
    let range = |minimum: i64, maximum: i64| {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(minimum))
            .maximum(Some(maximum))
    };
    OneOfBuilder::new()
        .item(range(i64::MIN, -1))
        .item(range(1, i64::MAX))
        .description(Some("A nonzero 64-bit integer; negative takes away."))
        .into()
}

/// Creates a strict counter, or confirms it exists with this definition.
#[utoipa::path(
    put,
    path = "/v1/strict/{name}",
    params(("name" = inline(tally_infra::openapi::CounterNameSchema), Path, description = "Counter name, percent-encoded")),
    request_body(content = DefineRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Created", body = StrictCounterBody),
        (status = 200, description = "The counter already exists with this definition; its current state", body = StrictCounterBody),
        (status = 400, description = "Bad name or JSON, unknown member, wrong type", content_type = "application/problem+json"),
        (status = 401, description = "API keys are configured (`TALLY_API_KEYS`) and none, or a wrong one, was sent", content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 409, description = "The counter exists with another definition, given in `definition`", content_type = "application/problem+json"),
        (status = 413, description = "Body too large", content_type = "application/problem+json"),
        (status = 415, description = "A body not sent as `application/json`", content_type = "application/problem+json"),
        (status = 422, description = "`value` outside `min` and `max`, or `min` above `max`", content_type = "application/problem+json"),
        (status = 429, description = "This client is over its write rate limit", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "PostgreSQL did not answer", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("api_key" = []), ()),
    tag = "strict counters"
)]
#[instrument(skip_all, fields(counter.name))]
pub async fn define(
    State(service): State<Arc<StrictService>>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let name = counter_name_from_path(name)?;
    tracing::Span::current().record("counter.name", name.as_str());
    let request: DefineRequest = parse_body(&headers, body)?;
    let definition = Definition {
        initial_value: request.value,
        limits: Limits {
            min: request.min,
            max: request.max,
        },
    };
    if !definition.limits.is_consistent() {
        return Err(invalid_definition(format!(
            "`min` ({}) is above `max` ({})",
            json!(request.min),
            json!(request.max)
        )));
    }
    if !definition.limits.admits(definition.initial_value) {
        return Err(invalid_definition(format!(
            "`value` {} is outside [{}, {}]",
            request.value,
            bound(request.min),
            bound(request.max)
        )));
    }
    let creation = service
        .create(&name, definition)
        .await
        .inspect_err(|error| {
            metrics::count("create", "unavailable");
            log_unavailable("create", error);
        })
        .map_err(strict_problem)?;
    Ok(match creation {
        Creation::Created(counter) => {
            metrics::count("create", "created");
            (StatusCode::CREATED, Json(counter_body(&name, &counter))).into_response()
        }
        Creation::AlreadyDefined(counter) => {
            metrics::count("create", "unchanged");
            (StatusCode::OK, Json(counter_body(&name, &counter))).into_response()
        }
        Creation::DefinedOtherwise(counter) => {
            metrics::count("create", "exists");
            let existing = counter.definition;
            Problem::new(
                StatusCode::CONFLICT,
                "strict-counter-exists",
                "A strict counter with this name exists with another definition",
                format!(
                    "`{}` was created with value {}, min {}, max {}",
                    name.as_str(),
                    existing.initial_value,
                    json!(existing.limits.min),
                    json!(existing.limits.max)
                ),
            )
            .with_extension(
                "definition",
                json!({
                    "value": existing.initial_value,
                    "min": existing.limits.min,
                    "max": existing.limits.max,
                }),
            )
            .into_response()
        }
    })
}

/// Reads a strict counter straight from PostgreSQL: every write answered before the read began
/// is in it.
#[utoipa::path(
    get,
    path = "/v1/strict/{name}",
    params(("name" = inline(tally_infra::openapi::CounterNameSchema), Path, description = "Counter name, percent-encoded")),
    responses(
        (status = 200, description = "The counter", body = StrictCounterBody),
        (status = 400, description = "Bad name", content_type = "application/problem+json"),
        (status = 404, description = "No strict counter has this name", content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL did not answer", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    tag = "strict counters"
)]
#[instrument(skip_all, fields(counter.name))]
pub async fn read(
    State(service): State<Arc<StrictService>>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<StrictCounterBody>, Problem> {
    let name = counter_name_from_path(name)?;
    tracing::Span::current().record("counter.name", name.as_str());
    match service.get(&name).await {
        Ok(counter) => {
            metrics::count("get", "found");
            Ok(Json(counter_body(&name, &counter)))
        }
        Err(error) => {
            metrics::count("get", error_label(&error));
            log_unavailable("get", &error);
            Err(strict_problem(error))
        }
    }
}

/// Adds `by` to a strict counter, unless the result would pass its `min` or `max`.
#[utoipa::path(
    post,
    path = "/v1/strict/{name}/add",
    params(
        ("name" = inline(tally_infra::openapi::CounterNameSchema), Path, description = "Counter name, percent-encoded"),
        ("Idempotency-Key" = Option<tally_infra::openapi::IdempotencyKeyHeaderSchema>, Header, description = "Makes retries count once for 24 hours: a retry of the same key, counter and amount answers the first outcome again"),
    ),
    request_body(content = AddRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Added; the counter after the add", body = StrictValueBody),
        (status = 400, description = "Bad name, key or JSON, unknown member, wrong type", content_type = "application/problem+json"),
        (status = 401, description = "API keys are configured (`TALLY_API_KEYS`) and none, or a wrong one, was sent", content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 404, description = "No strict counter has this name", content_type = "application/problem+json"),
        (status = 409, description = "The add would pass `min` or `max` (or the 64-bit range); nothing changed. Carries the counter's `value`, `min`, `max` and `version`", content_type = "application/problem+json"),
        (status = 413, description = "Body too large", content_type = "application/problem+json"),
        (status = 415, description = "A body not sent as `application/json`", content_type = "application/problem+json"),
        (status = 422, description = "`by` is 0, or the idempotency key was first used with another counter or amount", content_type = "application/problem+json"),
        (status = 429, description = "This client is over its write rate limit", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "PostgreSQL did not answer; the add may or may not have happened: retry with the same Idempotency-Key", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("api_key" = []), ()),
    tag = "strict counters"
)]
#[instrument(skip_all, fields(counter.name))]
pub async fn add(
    State(service): State<Arc<StrictService>>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<StrictValueBody>, Problem> {
    let name = counter_name_from_path(name)?;
    tracing::Span::current().record("counter.name", name.as_str());
    let request: AddRequest = parse_body(&headers, body)?;
    if request.by == 0 {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-amount",
            "Invalid amount",
            "`by` must not be 0",
        ));
    }
    let idempotency_key = match headers.get(IDEMPOTENCY_KEY_HEADER) {
        None => None,
        Some(value) => Some(
            IdempotencyKey::parse(value.as_bytes())
                .map_err(|error| {
                    Problem::new(
                        StatusCode::BAD_REQUEST,
                        "invalid-idempotency-key",
                        "Invalid idempotency key",
                        error.to_string(),
                    )
                })?
                .into_string(),
        ),
    };
    let operation = Operation::Add {
        by: request.by,
        idempotency_key,
    };
    answer_write("add", &name, service.write(&name, operation).await)
}

/// Sets a strict counter to `value` if it holds `expected`.
#[utoipa::path(
    post,
    path = "/v1/strict/{name}/cas",
    params(("name" = inline(tally_infra::openapi::CounterNameSchema), Path, description = "Counter name, percent-encoded")),
    request_body(content = CompareAndSetRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Set; the counter after the set", body = StrictValueBody),
        (status = 400, description = "Bad name or JSON, unknown member, wrong type, or an `Idempotency-Key` header (`/problems/idempotency-key-not-supported`: a retry of an applied compare-and-set answers `409 cas-mismatch` with the counter's value and version instead)", content_type = "application/problem+json"),
        (status = 401, description = "API keys are configured (`TALLY_API_KEYS`) and none, or a wrong one, was sent", content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 404, description = "No strict counter has this name", content_type = "application/problem+json"),
        (status = 409, description = "The counter does not hold `expected` (`/problems/cas-mismatch`, with its current `value` and `version`), or `value` is outside `min` and `max` (`/problems/limit-reached`); nothing changed", content_type = "application/problem+json"),
        (status = 413, description = "Body too large", content_type = "application/problem+json"),
        (status = 415, description = "A body not sent as `application/json`", content_type = "application/problem+json"),
        (status = 429, description = "This client is over its write rate limit", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "PostgreSQL did not answer; the set may or may not have happened", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("api_key" = []), ()),
    tag = "strict counters"
)]
#[instrument(skip_all, fields(counter.name))]
pub async fn compare_and_set(
    State(service): State<Arc<StrictService>>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<StrictValueBody>, Problem> {
    let name = counter_name_from_path(name)?;
    tracing::Span::current().record("counter.name", name.as_str());
    if headers.contains_key("idempotency-key") {
        // Refused rather than ignored: a client sending one believes its retries are safe.
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "idempotency-key-not-supported",
            "Compare-and-set takes no Idempotency-Key",
            "a compare-and-set is not remembered by key: retry it as it is; if the first one was \
             applied, the retry answers 409 cas-mismatch with the counter's value and version, \
             which tell whether it was yours"
                .to_owned(),
        ));
    }
    let request: CompareAndSetRequest = parse_body(&headers, body)?;
    let operation = Operation::CompareAndSet {
        expected: request.expected,
        value: request.value,
    };
    answer_write("cas", &name, service.write(&name, operation).await)
}

/// `PUT`, `GET` or a write with an empty name: the router has no segment to match.
pub async fn empty_name() -> Problem {
    invalid_counter_name(&CounterNameError::Empty)
}

fn answer_write(
    operation: &'static str,
    name: &CounterName,
    decided: Result<Decision, StrictError>,
) -> Result<Json<StrictValueBody>, Problem> {
    let decision = match decided {
        Ok(decision) => decision,
        Err(error) => {
            metrics::count(operation, error_label(&error));
            return Err(strict_problem(error));
        }
    };
    let label = match (&decision.outcome, decision.replayed) {
        (_, true) => "replayed",
        (Outcome::Applied { .. }, false) => "applied",
        (Outcome::LimitReached { .. }, false) => "limit_reached",
        (Outcome::Mismatch { .. }, false) => "cas_mismatch",
        (Outcome::KeyReused { .. }, false) => "key_reused",
    };
    metrics::count(operation, label);
    match decision.outcome {
        Outcome::Applied { value, version } => Ok(Json(StrictValueBody {
            counter: name.as_str().to_owned(),
            value,
            version,
        })),
        Outcome::LimitReached {
            value,
            version,
            limits,
            attempt,
        } => {
            let detail = match attempt {
                Attempt::Add(by) => {
                    let (direction, limit) = if by < 0 {
                        ("below the minimum", limits.min)
                    } else {
                        ("above the maximum", limits.max)
                    };
                    match limit {
                        Some(limit) => format!(
                            "adding {by} to {value} would take the counter {direction} {limit}; nothing changed"
                        ),
                        None => format!(
                            "adding {by} to {value} would leave the 64-bit range; nothing changed"
                        ),
                    }
                }
                Attempt::Set(target) => format!(
                    "{target} is outside [{}, {}]; nothing changed",
                    bound(limits.min),
                    bound(limits.max)
                ),
            };
            Err(Problem::new(
                StatusCode::CONFLICT,
                "limit-reached",
                "The counter's limit was reached",
                detail,
            )
            .with_extension("value", json!(value))
            .with_extension("min", json!(limits.min))
            .with_extension("max", json!(limits.max))
            .with_extension("version", json!(version)))
        }
        Outcome::Mismatch { value, version } => Err(Problem::new(
            StatusCode::CONFLICT,
            "cas-mismatch",
            "The counter does not hold the expected value",
            format!("the counter holds {value} (version {version}); nothing changed"),
        )
        .with_extension("value", json!(value))
        .with_extension("version", json!(version))),
        Outcome::KeyReused {
            first_counter,
            first_by,
        } => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency key reused for another write",
            format!(
                "the key was first used to add {first_by} to `{first_counter}`; nothing changed"
            ),
        )),
    }
}

fn counter_body(name: &CounterName, counter: &StrictCounter) -> StrictCounterBody {
    StrictCounterBody {
        counter: name.as_str().to_owned(),
        value: counter.state.value,
        min: counter.state.limits.min,
        max: counter.state.limits.max,
        version: counter.state.version,
    }
}

fn bound(limit: Option<i64>) -> String {
    limit.map_or("unbounded".to_owned(), |limit| limit.to_string())
}

fn error_label(error: &StrictError) -> &'static str {
    match error {
        StrictError::NotFound => "not_found",
        StrictError::Unavailable { .. } => "unavailable",
        StrictError::Overloaded => "overloaded",
    }
}

/// PostgreSQL's own words for a failure the client only gets a summary of. (Writes are logged
/// once per batch by the counter's writer instead.)
fn log_unavailable(operation: &'static str, error: &StrictError) {
    if let StrictError::Unavailable { reason, .. } = error {
        tracing::warn!(operation, %reason, "strict counter request failed");
    }
}

fn strict_problem(error: StrictError) -> Problem {
    match error {
        StrictError::NotFound => Problem::new(
            StatusCode::NOT_FOUND,
            "strict-counter-not-found",
            "No such strict counter",
            error.to_string(),
        ),
        StrictError::Unavailable { .. } => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "postgres-unavailable",
            "Strict counters cannot be reached right now",
            error.to_string(),
        )
        .with_retry_after(1),
        StrictError::Overloaded => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "strict-counter-overloaded",
            "Too many writes of this counter are waiting",
            error.to_string(),
        )
        .with_retry_after(1),
    }
}

fn invalid_definition(detail: String) -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-definition",
        "Invalid strict counter definition",
        detail,
    )
}

#[cfg(test)]
mod tests {
    use axum::body::Bytes;
    use axum::http::header;
    use serde::de::DeserializeOwned;

    use super::*;

    fn parse<T: DeserializeOwned>(body: &str) -> Result<T, Problem> {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        parse_body(&headers, Ok(Bytes::from(body.to_owned())))
    }

    #[test]
    fn bodies_name_their_problem() {
        let unknown = parse::<AddRequest>(r#"{"by": 1, "bye": 2}"#).unwrap_err();
        assert_eq!(unknown.slug, "invalid-body");
        assert!(unknown.detail.contains("bye"), "{}", unknown.detail);
        for not_an_integer in [
            "1.5",
            r#""3""#,
            "true",
            "null",
            "1e30",
            "9223372036854775808",
        ] {
            let problem =
                parse::<AddRequest>(&format!(r#"{{"by": {not_an_integer}}}"#)).unwrap_err();
            assert_eq!(problem.slug, "invalid-body", "{not_an_integer}");
            assert!(problem.detail.contains("`by`"), "{}", problem.detail);
        }
        assert_eq!(
            parse::<AddRequest>(r#"{"by": 1"#).unwrap_err().slug,
            "malformed-json"
        );
        assert_eq!(parse::<AddRequest>("").unwrap_err().slug, "malformed-json");
        let missing = parse::<CompareAndSetRequest>(r#"{"expected": 1}"#).unwrap_err();
        assert_eq!(missing.slug, "invalid-body");
        assert!(missing.detail.contains("`value`"), "{}", missing.detail);
        let unbounded: DefineRequest = parse(r#"{"value": 3, "min": null}"#).unwrap();
        assert_eq!((unbounded.min, unbounded.max), (None, None));
        let min = parse::<DefineRequest>(r#"{"value": 3, "min": 0.5}"#).unwrap_err();
        assert!(min.detail.contains("`min`"), "{}", min.detail);
        assert_eq!(parse::<AddRequest>("[1]").unwrap_err().slug, "invalid-body");
    }

    #[test]
    fn whole_number_floats_are_integers() {
        let define: DefineRequest = parse(r#"{"value": 232.0, "min": -1e3, "max": 2e3}"#).unwrap();
        assert_eq!(
            (define.value, define.min, define.max),
            (232, Some(-1000), Some(2000))
        );
        assert_eq!(parse::<AddRequest>(r#"{"by": -5.0}"#).unwrap().by, -5);
        let cas: CompareAndSetRequest = parse(r#"{"expected": 1e1, "value": 0.0}"#).unwrap();
        assert_eq!((cas.expected, cas.value), (10, 0));
    }
}
