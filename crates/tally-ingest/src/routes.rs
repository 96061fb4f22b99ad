//! The write routes. Everything a client sends is validated here, before anything is produced:
//! a request either gets `202` with every increment durable, or an error and nothing counted
//! (`503` is the one exception: its increments are indeterminate).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};
use tally_core::{Amount, CounterName, IdempotencyKey};

use crate::service::ProduceError;
use tally_infra::Problem;
use tally_infra::counter_path::counter_name_from_path;
// `crate::admin` reads its bodies through these too.
pub(crate) use tally_infra::json_body::{
    body_rejection, invalid_body, json_kind, json_object, reject_unknown_members, require_json,
};
use tracing::instrument;

use crate::service::{IncrementItem, IngestError, IngestService};

pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// `202` for one increment.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IncrementAccepted {
    /// The counter's name.
    pub counter: String,
    /// The amount added.
    pub by: i64,
    /// True when this was a retry of an idempotency key already acknowledged: it was counted
    /// once, the first time.
    pub duplicate: bool,
}

/// `202` for a batch.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchAccepted {
    /// How many increments were accepted.
    pub accepted: usize,
    /// How many of them were retries of idempotency keys already acknowledged.
    pub duplicates: usize,
}

/// The optional body of `POST /v1/counters/{name}/increment`.
#[derive(Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Documents the wire format; parsing goes through serde_json::Value.
pub struct IncrementRequest {
    /// A nonzero integer with |by| <= 10^12. Defaults to 1; `null` is refused.
    #[schema(schema_with = tally_infra::openapi::amount_schema)]
    pub by: Option<i64>,
}

/// One item of a batch.
#[derive(Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct BatchItem {
    /// The counter's name: 1 to 256 characters, no control characters.
    #[schema(schema_with = tally_infra::openapi::counter_name_schema)]
    pub counter: String,
    /// A nonzero integer with |by| <= 10^12. Defaults to 1; `null` is refused.
    #[schema(schema_with = tally_infra::openapi::amount_schema)]
    pub by: Option<i64>,
    /// 1 to 128 printable ASCII characters; `null` is the same as leaving it out.
    #[schema(schema_with = tally_infra::openapi::nullable_idempotency_key_schema)]
    pub idempotency_key: Option<String>,
}

/// The body of `POST /v1/increments`.
#[derive(Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct BatchRequest {
    /// 1 to 10,000 increments (`TALLY_BATCH_MAX_ITEMS`), in at most 1 MiB of JSON
    /// (`TALLY_BODY_MAX_BYTES`). The same counter may appear more than once; items that share
    /// an idempotency key must repeat its counter and amount.
    #[schema(min_items = 1, max_items = 10_000)]
    pub increments: Vec<BatchItem>,
}

/// Adds `by` (default 1) to one counter.
#[utoipa::path(
    post,
    path = "/v1/counters/{name}/increment",
    params(
        ("name" = inline(tally_infra::openapi::CounterNameSchema), Path, description = "Counter name, percent-encoded"),
        ("Idempotency-Key" = Option<tally_infra::openapi::IdempotencyKeyHeaderSchema>, Header, description = "Makes retries count once for 24 hours: 1 to 128 printable ASCII characters"),
    ),
    request_body(
        content = inline(IncrementRequest),
        content_type = "application/json",
        description = "Optional: an empty body adds 1. A body must be a JSON object sent as `application/json`.",
    ),
    responses(
        (status = 202, description = "Kafka acknowledged the increment", body = IncrementAccepted),
        (status = 400, description = "Bad name, amount, key or JSON", content_type = "application/problem+json"),
        (status = 401, description = "API keys are configured (`TALLY_API_KEYS`) and none, or a wrong one, was sent", content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 409, description = "Another request with the same idempotency key is in flight; nothing was counted, retry after `Retry-After`", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 413, description = "Body over 1 MiB (`TALLY_BODY_MAX_BYTES`)", content_type = "application/problem+json"),
        (status = 415, description = "A body not sent as `application/json`", content_type = "application/problem+json"),
        (status = 422, description = "The idempotency key was first used with another counter or amount", content_type = "application/problem+json"),
        (status = 429, description = "This client is over its write rate limit; nothing was counted", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "Kafka did not acknowledge in time; the increment is indeterminate", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("api_key" = []), ()),
    tag = "increments"
)]
#[instrument(skip_all, fields(counter.name))]
pub async fn increment_one(
    State(service): State<Arc<IngestService>>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<IncrementAccepted>), Problem> {
    let name = counter_name_from_path(name)?;
    tracing::Span::current().record("counter.name", name.as_str());
    let body = body.map_err(body_rejection)?;
    let by = if body.is_empty() {
        Amount::ONE
    } else {
        let object = json_object(&headers, &body)?;
        reject_unknown_members(&object, &["by"])?;
        match object.get("by") {
            None => Amount::ONE,
            Some(by) => Amount::from_json(by).map_err(|error| invalid_amount(error.to_string()))?,
        }
    };
    let idempotency_key = match headers.get(IDEMPOTENCY_KEY_HEADER) {
        None => None,
        Some(value) => Some(
            IdempotencyKey::parse(value.as_bytes())
                .map_err(|error| invalid_idempotency_key(error.to_string()))?
                .into_string(),
        ),
    };
    let item = IncrementItem {
        name,
        by: by.get(),
        idempotency_key,
    };
    let duplicates = service
        .accept_items(std::slice::from_ref(&item))
        .await
        .map_err(ingest_problem)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(IncrementAccepted {
            counter: item.name.into_string(),
            by: item.by,
            duplicate: duplicates[0],
        }),
    ))
}

/// Adds many increments at once. Validation is all-or-nothing.
#[utoipa::path(
    post,
    path = "/v1/increments",
    request_body(content = BatchRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Kafka acknowledged every increment", body = BatchAccepted),
        (status = 400, description = "Malformed batch, too many items, or bad items listed by index in `errors`", content_type = "application/problem+json"),
        (status = 401, description = "API keys are configured (`TALLY_API_KEYS`) and none, or a wrong one, was sent", content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 409, description = "A request with one of the idempotency keys is in flight; nothing was counted, retry after `Retry-After`", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 413, description = "Body over 1 MiB (`TALLY_BODY_MAX_BYTES`)", content_type = "application/problem+json"),
        (status = 415, description = "Body not sent as `application/json`", content_type = "application/problem+json"),
        (status = 422, description = "An idempotency key was first used with another counter or amount", content_type = "application/problem+json"),
        (status = 429, description = "This client is over its write rate limit; nothing was counted", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "Kafka did not acknowledge in time; the batch's increments are indeterminate", content_type = "application/problem+json",
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security(("api_key" = []), ()),
    tag = "increments"
)]
#[instrument(skip_all, fields(batch.size))]
pub async fn increment_batch(
    State(service): State<Arc<IngestService>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<BatchAccepted>), Problem> {
    let body = body.map_err(body_rejection)?;
    require_json(&headers)?;
    // The common case parses straight into borrowed typed items; anything unusual takes the
    // slower path through serde_json::Value, which can say exactly what is wrong and where.
    let items = match serde_json::from_slice::<TypedBatch<'_>>(&body) {
        Ok(batch) => {
            tracing::Span::current().record("batch.size", batch.increments.len());
            check_batch_size(batch.increments.len(), service.batch_max_items)?;
            validate_typed_batch(batch.increments)?
        }
        Err(_) => {
            let object = json_object(&headers, &body)?;
            reject_unknown_members(&object, &["increments"])?;
            let Some(Value::Array(items)) = object.get("increments") else {
                return Err(invalid_body("the body must have an `increments` array"));
            };
            tracing::Span::current().record("batch.size", items.len());
            check_batch_size(items.len(), service.batch_max_items)?;
            validate_batch(items)?
        }
    };
    let duplicates = service.accept_items(&items).await.map_err(ingest_problem)?;
    let duplicates = duplicates.iter().filter(|duplicate| **duplicate).count();
    Ok((
        StatusCode::ACCEPTED,
        Json(BatchAccepted {
            accepted: items.len(),
            duplicates,
        }),
    ))
}

fn check_batch_size(items: usize, batch_max_items: usize) -> Result<(), Problem> {
    if items == 0 {
        return Err(invalid_body(
            "`increments` is empty; send at least one increment",
        ));
    }
    if items > batch_max_items {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "batch-too-large",
            "Too many increments in one batch",
            format!("the batch has {items} increments; the limit is {batch_max_items}"),
        ));
    }
    Ok(())
}

/// A batch whose shape is right, with strings borrowed from the body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TypedBatch<'a> {
    #[serde(borrow)]
    increments: Vec<TypedItem<'a>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TypedItem<'a> {
    #[serde(borrow)]
    counter: std::borrow::Cow<'a, str>,
    /// Missing means 1; `null`, floats and strings fail here and take the slow path.
    #[serde(default = "default_by", deserialize_with = "integer_only")]
    by: i64,
    #[serde(borrow, default)]
    idempotency_key: Option<std::borrow::Cow<'a, str>>,
}

fn default_by() -> i64 {
    1
}

fn integer_only<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    <i64 as serde::Deserialize>::deserialize(deserializer)
}

fn validate_typed_batch(items: Vec<TypedItem<'_>>) -> Result<Vec<IncrementItem>, Problem> {
    let total = items.len();
    let mut errors = Vec::new();
    let mut valid = Vec::with_capacity(total);
    for (index, item) in items.into_iter().enumerate() {
        let name = CounterName::parse(item.counter.into_owned())
            .map_err(|error| ("counter", error.to_string()));
        let by = Amount::new(item.by).map_err(|error| ("by", error.to_string()));
        let key = item
            .idempotency_key
            .map(|key| IdempotencyKey::parse(key.as_bytes()).map(IdempotencyKey::into_string))
            .transpose()
            .map_err(|error| ("idempotency_key", error.to_string()));
        match (name, by, key) {
            (Ok(name), Ok(by), Ok(idempotency_key)) => valid.push(IncrementItem {
                name,
                by: by.get(),
                idempotency_key,
            }),
            (Err((field, detail)), _, _)
            | (_, Err((field, detail)), _)
            | (_, _, Err((field, detail))) => {
                errors.push(json!({ "index": index, "field": field, "detail": detail }));
            }
        }
    }
    if !errors.is_empty() {
        return Err(invalid_batch(errors, total));
    }
    Ok(valid)
}

/// Validates every item; one bad item rejects the whole batch.
fn validate_batch(items: &[Value]) -> Result<Vec<IncrementItem>, Problem> {
    let mut errors = Vec::new();
    let mut valid = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        match validate_item(item) {
            Ok((name, by, idempotency_key)) => valid.push(IncrementItem {
                name,
                by,
                idempotency_key,
            }),
            Err((field, detail)) => {
                errors.push(json!({ "index": index, "field": field, "detail": detail }))
            }
        }
    }
    if !errors.is_empty() {
        return Err(invalid_batch(errors, items.len()));
    }
    Ok(valid)
}

fn invalid_batch(errors: Vec<Value>, total: usize) -> Problem {
    let detail = format!(
        "{} of {total} increments are invalid; nothing was counted (first: item {}: {})",
        errors.len(),
        errors[0]["index"],
        errors[0]["detail"].as_str().unwrap_or_default()
    );
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-batch",
        "Some increments in the batch are invalid",
        detail,
    )
    .with_extension("errors", Value::Array(errors))
}

type ItemError = (&'static str, String);

fn validate_item(item: &Value) -> Result<(CounterName, i64, Option<String>), ItemError> {
    let Value::Object(item) = item else {
        return Err(("item", "an increment must be a JSON object".into()));
    };
    if let Some(unknown) = item
        .keys()
        .find(|member| !["counter", "by", "idempotency_key"].contains(&member.as_str()))
    {
        return Err(("item", format!("unknown member `{unknown}`")));
    }
    let name = match item.get("counter") {
        Some(Value::String(name)) => {
            CounterName::parse(name.as_str()).map_err(|error| ("counter", error.to_string()))?
        }
        Some(other) => {
            return Err((
                "counter",
                format!("`counter` must be a string, got {other}"),
            ));
        }
        None => return Err(("counter", "`counter` is missing".into())),
    };
    let by = match item.get("by") {
        None => Amount::ONE,
        Some(by) => Amount::from_json(by).map_err(|error| ("by", error.to_string()))?,
    };
    let key = match item.get("idempotency_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(key)) => Some(
            IdempotencyKey::parse(key.as_bytes())
                .map_err(|error| ("idempotency_key", error.to_string()))?
                .into_string(),
        ),
        Some(other) => {
            return Err((
                "idempotency_key",
                format!("`idempotency_key` must be a string, got {other}"),
            ));
        }
    };
    Ok((name, by.get(), key))
}

fn invalid_amount(detail: String) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-amount",
        "Invalid increment amount",
        detail,
    )
}

fn invalid_idempotency_key(detail: String) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-idempotency-key",
        "Invalid idempotency key",
        detail,
    )
}

pub fn ingest_problem(error: IngestError) -> Problem {
    let error = match error {
        IngestError::KeyReused { index, .. } => {
            return Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency key reused for another increment",
                error.to_string(),
            )
            .with_extension("index", json!(index));
        }
        IngestError::KeyInFlight { index, .. } => {
            return Problem::new(
                StatusCode::CONFLICT,
                "idempotency-key-in-flight",
                "A request with this idempotency key is in flight",
                error.to_string(),
            )
            .with_extension("index", json!(index))
            .with_retry_after(1);
        }
        IngestError::Unavailable(error) => error,
    };
    let detail = match &error {
        ProduceError::QueueFull => format!("{error}; retry later"),
        _ => format!("{error}; retry with the same Idempotency-Key"),
    };
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "kafka-unavailable",
        "Kafka did not acknowledge",
        detail,
    )
    .with_retry_after(1)
}
