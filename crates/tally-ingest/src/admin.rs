//! The admin routes that change plain counters: audited set, reset and import, and the audit
//! trail. A set is produced to the counter's Kafka partition like an increment, so it is
//! ordered with them: it replaces everything before it, and what comes after adds on top. The
//! aggregator applies it and writes its audit row in the same transaction (see
//! `tally-aggregator`'s `pending` and `commit`). These routes sit behind the admin token.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{Extensions, HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tally_core::amount::whole_number;
use tally_core::{CounterName, IdempotencyKey};
use tally_infra::Problem;
use tally_infra::counter_path::{counter_name_from_path, invalid_counter_name};

use crate::routes::IDEMPOTENCY_KEY_HEADER;
use crate::routes::{
    body_rejection, ingest_problem, invalid_body, json_kind, json_object, reject_unknown_members,
};
use crate::service::{IngestError, IngestService, SetError, SetRequest};

/// The identity the admin token stands for: Tally has one admin token.
pub const ADMIN_ACTOR: &str = "admin";
/// At most this many counters per import.
pub const IMPORT_MAX_COUNTERS: usize = 10_000;
/// A full import with long names fits.
pub const IMPORT_BODY_MAX_BYTES: usize = 8 * 1024 * 1024;
/// At most this many characters of reason.
pub const REASON_MAX_CHARS: usize = 500;
/// The largest page of the audit trail.
pub const AUDIT_MAX_LIMIT: i64 = 1_000;

/// The body of `POST /v1/admin/counters/{name}/set`.
#[derive(Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // Documents the wire format; parsing goes through serde_json::Value.
pub struct SetCounterRequest {
    /// The value the counter takes: any 64-bit signed integer.
    pub value: i64,
    /// Why: kept in the audit trail. 1 to 500 characters, no control characters, not only whitespace.
    #[schema(
        min_length = 1,
        max_length = 500,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    pub reason: String,
}

/// The body of `POST /v1/admin/counters/{name}/reset`.
#[derive(Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ResetCounterRequest {
    /// Why: kept in the audit trail. 1 to 500 characters, no control characters, not only whitespace.
    #[schema(
        min_length = 1,
        max_length = 500,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    pub reason: String,
}

/// One counter of an import.
#[derive(Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ImportItem {
    /// The counter's name; each name at most once per import.
    #[schema(schema_with = tally_infra::openapi::counter_name_schema)]
    pub counter: String,
    /// The value the counter takes.
    pub value: i64,
}

/// The body of `POST /v1/admin/import`.
#[derive(Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ImportRequest {
    /// 1 to 10,000 counters, each name at most once.
    #[schema(min_items = 1, max_items = 10_000)]
    pub counters: Vec<ImportItem>,
    /// Why: kept in the audit trail of every counter. Defaults to `import`; `null` is refused.
    #[schema(
        nullable = false,
        min_length = 1,
        max_length = 500,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    pub reason: Option<String>,
}

/// `202` for a set: Kafka acknowledged it. Reads show it once the aggregator applied it,
/// within the usual freshness.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SetAccepted {
    pub counter: String,
    pub value: i64,
    /// The key of the set's row in the audit trail.
    pub audit_id: String,
}

/// `202` for an import.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ImportAccepted {
    pub counters: Vec<SetAccepted>,
}

/// One applied set, as the audit trail keeps it.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Increases in the order sets were applied.
    pub seq: i64,
    pub audit_id: String,
    pub counter: String,
    /// The identity the request authenticated as.
    pub actor: String,
    /// The client's address.
    pub client: String,
    pub reason: String,
    /// When the set was accepted, RFC 3339 in UTC.
    pub requested_at: String,
    /// When the aggregator applied it, RFC 3339 in UTC.
    pub applied_at: String,
    /// The counter's value right before the set, in its partition's order.
    pub old_value: i64,
    pub new_value: i64,
}

/// `200` for the audit trail, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    pub next_before: Option<i64>,
}

/// The query of `GET /v1/admin/audit`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only this counter's sets.
    #[param(
        min_length = 1,
        max_length = 256,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]{1,256}$"
    )]
    pub counter: Option<String>,
    /// Entries per page, 1 to 1000; 100 by default.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// Only entries older than this `seq` (the previous page's `next_before`).
    #[param(minimum = 1)]
    pub before: Option<i64>,
}

/// Sets a plain counter's value, ordered with its increments, and audits it.
#[utoipa::path(
    post,
    path = "/v1/admin/counters/{name}/set",
    params(
        ("name" = inline(tally_infra::openapi::CounterNameSchema), Path, description = "Counter name, percent-encoded"),
        ("Idempotency-Key" = Option<tally_infra::openapi::IdempotencyKeyHeaderSchema>, Header, description = "Makes a retry of the same set (same counter and value) apply once: 1 to 128 printable ASCII characters"),
    ),
    request_body(content = SetCounterRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Kafka acknowledged the set", body = SetAccepted),
        (status = 400, description = "Bad name, value, reason or JSON", content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong admin token", content_type = "application/problem+json"),
        (status = 403, description = "Admin routes are disabled", content_type = "application/problem+json"),
        (status = 413, description = "Body too large", content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", content_type = "application/problem+json"),
        (status = 503, description = "Redis could not mark the set (nothing was set), or Kafka did not acknowledge in time (the set is indeterminate: retry with the same Idempotency-Key)", content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])),
    tag = "admin"
)]
pub async fn set_counter(
    State(service): State<Arc<IngestService>>,
    extensions: Extensions,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<SetAccepted>), Problem> {
    let name = counter_name_from_path(name)?;
    let body = body.map_err(body_rejection)?;
    let object = json_object(&headers, &body)?;
    reject_unknown_members(&object, &["value", "reason"])?;
    let value = required_value(&object, "value")?;
    let reason = reason(&object)?.ok_or_else(|| invalid_body("`reason` is required"))?;
    let request = set_request(reason, &headers, &extensions)?;
    set_one(&service, name, value, &request).await
}

/// The set and reset routes with an empty name.
pub async fn empty_name() -> Problem {
    invalid_counter_name(&tally_core::CounterNameError::Empty)
}

/// Sets a plain counter to 0, ordered with its increments, and audits it.
#[utoipa::path(
    post,
    path = "/v1/admin/counters/{name}/reset",
    params(
        ("name" = inline(tally_infra::openapi::CounterNameSchema), Path, description = "Counter name, percent-encoded"),
        ("Idempotency-Key" = Option<tally_infra::openapi::IdempotencyKeyHeaderSchema>, Header, description = "Makes a retry of the same set (same counter and value) apply once: 1 to 128 printable ASCII characters"),
    ),
    request_body(content = ResetCounterRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Kafka acknowledged the reset", body = SetAccepted),
        (status = 400, description = "Bad name, reason or JSON", content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong admin token", content_type = "application/problem+json"),
        (status = 403, description = "Admin routes are disabled", content_type = "application/problem+json"),
        (status = 413, description = "Body too large", content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", content_type = "application/problem+json"),
        (status = 503, description = "Redis could not mark the reset (nothing was set), or Kafka did not acknowledge in time (the reset is indeterminate: retry with the same Idempotency-Key)", content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])),
    tag = "admin"
)]
pub async fn reset_counter(
    State(service): State<Arc<IngestService>>,
    extensions: Extensions,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<SetAccepted>), Problem> {
    let name = counter_name_from_path(name)?;
    let body = body.map_err(body_rejection)?;
    let object = json_object(&headers, &body)?;
    reject_unknown_members(&object, &["reason"])?;
    let reason = reason(&object)?.ok_or_else(|| invalid_body("`reason` is required"))?;
    let request = set_request(reason, &headers, &extensions)?;
    set_one(&service, name, 0, &request).await
}

async fn set_one(
    service: &IngestService,
    name: CounterName,
    value: i64,
    request: &SetRequest,
) -> Result<(StatusCode, Json<SetAccepted>), Problem> {
    let sets = [(name, value)];
    let mut audit_ids = service
        .set_counters(&sets, request)
        .await
        .map_err(set_problem)?;
    let [(name, value)] = sets;
    Ok((
        StatusCode::ACCEPTED,
        Json(SetAccepted {
            counter: name.into_string(),
            value,
            audit_id: audit_ids.pop().expect("one audit id per set"),
        }),
    ))
}

/// Sets many plain counters at once ("start from N" when migrating from another service).
#[utoipa::path(
    post,
    path = "/v1/admin/import",
    params(
        ("Idempotency-Key" = Option<tally_infra::openapi::IdempotencyKeyHeaderSchema>, Header, description = "Makes a retry of the same import apply each set once: 1 to 128 printable ASCII characters"),
    ),
    request_body(content = ImportRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Kafka acknowledged every set", body = ImportAccepted),
        (status = 400, description = "Malformed import, or bad items listed by index", content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong admin token", content_type = "application/problem+json"),
        (status = 403, description = "Admin routes are disabled", content_type = "application/problem+json"),
        (status = 413, description = "Body too large", content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON", content_type = "application/problem+json"),
        (status = 422, description = "A counter appears more than once; the items are listed by index in `errors`", content_type = "application/problem+json"),
        (status = 503, description = "Redis could not mark the sets (nothing was set), or Kafka did not acknowledge every set in time (they are indeterminate: retry with the same Idempotency-Key)", content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])),
    tag = "admin"
)]
pub async fn import(
    State(service): State<Arc<IngestService>>,
    extensions: Extensions,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ImportAccepted>), Problem> {
    let body = body.map_err(body_rejection)?;
    let object = json_object(&headers, &body)?;
    reject_unknown_members(&object, &["counters", "reason"])?;
    let reason = reason(&object)?.unwrap_or_else(|| "import".to_owned());
    let Some(Value::Array(items)) = object.get("counters") else {
        return Err(invalid_body("the body must have a `counters` array"));
    };
    if items.is_empty() {
        return Err(invalid_body(
            "`counters` is empty; send at least one counter",
        ));
    }
    if items.len() > IMPORT_MAX_COUNTERS {
        return Err(invalid_body(format!(
            "`counters` has {} items; an import takes at most {IMPORT_MAX_COUNTERS}",
            items.len()
        )));
    }
    let mut sets = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (index, item) in items.iter().enumerate() {
        match import_item(item) {
            Ok(set) => sets.push(set),
            Err(detail) => errors.push(json!({"index": index, "detail": detail})),
        }
    }
    if !errors.is_empty() {
        return Err(invalid_body(format!(
            "{} of {} counters are invalid; nothing was set",
            errors.len(),
            items.len()
        ))
        .with_extension("errors", Value::Array(errors)));
    }
    // Well formed, but which of two values should a counter take? The request must say.
    let mut seen = HashSet::with_capacity(sets.len());
    let repeated: Vec<Value> = sets
        .iter()
        .enumerate()
        .filter(|(_, (name, _))| !seen.insert(name.as_str()))
        .map(|(index, (name, _))| {
            json!({
                "index": index,
                "detail": format!("counter `{}` appears more than once; an import sets each counter once", name.as_str()),
            })
        })
        .collect();
    if !repeated.is_empty() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "repeated-counter",
            "A counter appears more than once",
            format!(
                "{} items repeat a counter named earlier in the import; nothing was set",
                repeated.len()
            ),
        )
        .with_extension("errors", Value::Array(repeated)));
    }
    let request = set_request(reason, &headers, &extensions)?;
    let audit_ids = service
        .set_counters(&sets, &request)
        .await
        .map_err(set_problem)?;
    let counters = sets
        .into_iter()
        .zip(audit_ids)
        .map(|((name, value), audit_id)| SetAccepted {
            counter: name.into_string(),
            value,
            audit_id,
        })
        .collect();
    Ok((StatusCode::ACCEPTED, Json(ImportAccepted { counters })))
}

fn import_item(item: &Value) -> Result<(CounterName, i64), String> {
    let Value::Object(object) = item else {
        return Err(format!(
            "an item must be an object with `counter` and `value`, got {}",
            json_kind(item)
        ));
    };
    if let Some(unknown) = object
        .keys()
        .find(|member| !matches!(member.as_str(), "counter" | "value"))
    {
        return Err(format!(
            "unknown member `{unknown}`; an item may only have `counter` and `value`"
        ));
    }
    let name = match object.get("counter") {
        Some(Value::String(name)) => {
            CounterName::parse(name.as_str()).map_err(|error| error.to_string())?
        }
        Some(other) => {
            return Err(format!(
                "`counter` must be a string, got {}",
                json_kind(other)
            ));
        }
        None => return Err("`counter` is required".to_owned()),
    };
    let value = integer(object.get("value"), "value").map_err(|problem| problem.detail)?;
    Ok((name, value))
}

/// The audit trail of sets and resets, newest first.
#[utoipa::path(
    get,
    path = "/v1/admin/audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "Applied sets, newest first", body = AuditPage),
        (status = 400, description = "Bad counter name or query", content_type = "application/problem+json"),
        (status = 401, description = "Missing or wrong admin token", content_type = "application/problem+json"),
        (status = 403, description = "Admin routes are disabled", content_type = "application/problem+json"),
        (status = 503, description = "PostgreSQL is unreachable", content_type = "application/problem+json"),
    ),
    security(("admin_token" = [])),
    tag = "admin"
)]
pub async fn audit(
    State(service): State<Arc<IngestService>>,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, Problem> {
    let Query(query) = query.map_err(|rejection| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-query",
            "The query string is invalid",
            rejection.body_text(),
        )
    })?;
    let counter = match query.counter {
        Some(name) => Some(
            CounterName::parse(name)
                .map_err(|error| invalid_counter_name(&error))?
                .into_string(),
        ),
        None => None,
    };
    let limit = query.limit.unwrap_or(100);
    if !(1..=AUDIT_MAX_LIMIT).contains(&limit) {
        return Err(invalid_query(format!(
            "`limit` is {limit}; it must be 1 to {AUDIT_MAX_LIMIT}"
        )));
    }
    if let Some(before) = query.before
        && before < 1
    {
        return Err(invalid_query(format!(
            "`before` is {before}; it must be at least 1"
        )));
    }
    let entries: Vec<AuditEntry> = sqlx::query_as(
        r#"SELECT seq, audit_id, counter, actor, client, reason,
                to_char(requested_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
                    AS requested_at,
                to_char(applied_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
                    AS applied_at,
                old_value, new_value
         FROM counter_audit
         WHERE ($1::text IS NULL OR counter = $1) AND ($2::bigint IS NULL OR seq < $2)
         ORDER BY seq DESC
         LIMIT $3"#,
    )
    .bind(counter)
    .bind(query.before)
    .bind(limit)
    .fetch_all(service.pool())
    .await
    .map_err(|error| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "postgres-unavailable",
            "PostgreSQL is unreachable",
            format!("could not read the audit trail: {error}"),
        )
        .with_retry_after(1)
    })?;
    let next_before = match entries.last() {
        Some(last) if entries.len() as i64 == limit => Some(last.seq),
        _ => None,
    };
    Ok(Json(AuditPage {
        entries,
        next_before,
    }))
}

fn invalid_query(detail: String) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-query",
        "The query string is invalid",
        detail,
    )
}

fn set_request(
    reason: String,
    headers: &HeaderMap,
    extensions: &Extensions,
) -> Result<SetRequest, Problem> {
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
    Ok(SetRequest {
        actor: ADMIN_ACTOR.to_owned(),
        client: extensions.get::<ConnectInfo<SocketAddr>>().map_or_else(
            || "unknown".to_owned(),
            |ConnectInfo(address)| address.ip().to_string(),
        ),
        reason,
        idempotency_key,
    })
}

fn set_problem(error: SetError) -> Problem {
    match error {
        SetError::MarkFailed(_) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "redis-unavailable",
            "Redis did not answer",
            format!("{error}; a set is marked in redis first, so reads never show the value from before it as fresh; retry later"),
        )
        .with_retry_after(1),
        SetError::Produce(error) => ingest_problem(IngestError::Unavailable(error)),
    }
}

fn required_value(object: &Map<String, Value>, member: &str) -> Result<i64, Problem> {
    integer(object.get(member), member)
}

fn integer(value: Option<&Value>, member: &str) -> Result<i64, Problem> {
    match value {
        None => Err(invalid_value(format!("`{member}` is required"))),
        Some(Value::Number(number)) => whole_number(number).ok_or_else(|| {
            invalid_value(format!(
                "`{member}` is {number}; it must be an integer from {} to {}",
                i64::MIN,
                i64::MAX
            ))
        }),
        Some(other) => Err(invalid_value(format!(
            "`{member}` must be an integer, got {}",
            json_kind(other)
        ))),
    }
}

fn invalid_value(detail: String) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-value",
        "Invalid counter value",
        detail,
    )
}

/// The reason, when present: a string of 1 to 500 characters, no control characters, not only whitespace.
fn reason(object: &Map<String, Value>) -> Result<Option<String>, Problem> {
    let invalid = |detail: String| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-reason",
            "Invalid reason",
            detail,
        )
    };
    match object.get("reason") {
        None => Ok(None),
        Some(Value::String(reason)) => {
            let chars = reason.chars().count();
            // PostgreSQL's text cannot hold NUL, and the trail is read by people: a reason is
            // one line of printable text.
            if reason.chars().any(char::is_control) {
                return Err(invalid(
                    "`reason` has control characters; send one line of printable text".to_owned(),
                ));
            }
            if reason.trim().is_empty() {
                return Err(invalid("`reason` is empty; say why".to_owned()));
            }
            if chars > REASON_MAX_CHARS {
                return Err(invalid(format!(
                    "`reason` has {chars} characters; at most {REASON_MAX_CHARS}"
                )));
            }
            Ok(Some(reason.clone()))
        }
        Some(other) => Err(invalid(format!(
            "`reason` must be a string, got {}",
            json_kind(other)
        ))),
    }
}
