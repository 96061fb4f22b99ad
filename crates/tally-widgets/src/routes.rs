//! The widget routes. Every answer carries `Access-Control-Allow-Origin: *`: widgets run on
//! other people's pages.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tally_core::CounterName;
use tally_infra::Problem;
use tally_infra::counter_path::{counter_name_from_path, invalid_counter_name};
use tally_ingest::IncrementItem;

use crate::WidgetService;
use crate::badge::{self, BadgeLook, CountFormat};

/// The query of `GET /badge/{file}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BadgeQuery {
    /// The left-hand text; `views` by default. At most 64 characters.
    #[param(max_length = 64, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub label: Option<String>,
    /// The right-hand color: a name (`blue`, `brightgreen`, `orange`...) or a hex code.
    #[param(min_length = 1, max_length = 32, pattern = "^[#A-Za-z0-9]{1,32}$")]
    pub color: Option<String>,
    /// The left-hand color.
    #[param(min_length = 1, max_length = 32, pattern = "^[#A-Za-z0-9]{1,32}$")]
    pub label_color: Option<String>,
    /// `flat` (the default), `flat-square`, `plastic`, `social` or `for-the-badge`.
    #[param(pattern = "^(flat|flat-square|plastic|social|for-the-badge)$")]
    pub style: Option<String>,
    /// `metric` (`1.2k`, the default) or `full` (`1,234`).
    #[param(inline)]
    pub format: Option<CountFormat>,
    /// `1` or `true`: count this view first (the write rate limit applies), then show it.
    #[param(pattern = "^(0|1|true|false)$")]
    pub incr: Option<String>,
}

/// The query of `GET /v1/counters/{name}/shields`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ShieldsQuery {
    /// The label; `views` by default. At most 64 characters.
    #[param(max_length = 64, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub label: Option<String>,
    /// The message color: a name or a hex code.
    #[param(min_length = 1, max_length = 32, pattern = "^[#A-Za-z0-9]{1,32}$")]
    pub color: Option<String>,
    /// `metric` (`1.2k`, the default) or `full` (`1,234`).
    #[param(inline)]
    pub format: Option<CountFormat>,
}

/// What `img.shields.io/endpoint?url=...` reads.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShieldsEndpoint {
    /// Always 1.
    pub schema_version: u8,
    pub label: String,
    pub message: String,
    pub color: String,
}

/// The data of a live counter's `value` event.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LiveValue {
    pub counter: String,
    pub value: i64,
    /// When the value was read, RFC 3339.
    pub as_of: String,
}

/// A CountAPI answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CountApiValue {
    pub value: i64,
}

/// A counter's value as a shields-style SVG badge.
#[utoipa::path(
    get,
    path = "/badge/{file}",
    params(
        ("file" = String, Path, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]{1,256}\\.svg$", description = "The counter name, percent-encoded, then `.svg`"),
        BadgeQuery,
        ("If-None-Match" = Option<String>, Header, description = "An ETag of an earlier answer: `304` if the badge is the same"),
    ),
    responses(
        (status = 200, description = "The badge", content_type = "image/svg+xml", body = String,
            headers(("ETag" = String, description = "Strong validator of the badge"), ("Cache-Control" = String, description = "`no-cache, max-age=0`"))),
        (status = 304, description = "The badge is the one the `If-None-Match` names"),
        (status = 400, description = "Bad name or query", content_type = "application/problem+json"),
        (status = 404, description = "The file does not end in `.svg`", content_type = "application/problem+json"),
        (status = 429, description = "`incr=1` over this client's write rate limit", content_type = "application/problem+json"),
        (status = 503, description = "The view could not be counted, or the counter read", content_type = "application/problem+json"),
    ),
    tag = "widgets"
)]
pub async fn badge(
    State(service): State<Arc<WidgetService>>,
    file: Result<Path<String>, PathRejection>,
    query: Result<Query<BadgeQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let Path(file) = file.map_err(|rejection| invalid_query(rejection.body_text()))?;
    let Some(name) = file.strip_suffix(".svg") else {
        return Err(Problem::not_found(format!(
            "no badge at `/badge/{file}`; a badge is `/badge/NAME.svg`"
        )));
    };
    let name = CounterName::parse(name).map_err(|error| invalid_counter_name(&error))?;
    let Query(query) = query.map_err(|rejection| invalid_query(rejection.body_text()))?;
    let look = BadgeLook::parse(
        query.label,
        query.color,
        query.label_color,
        query.style.as_deref(),
        query.format,
    )
    .map_err(invalid_query)?;
    let count_view = match query.incr.as_deref() {
        None | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(other) => {
            return Err(invalid_query(format!(
                "`incr` is `{other}`; send `1` to count the view"
            )));
        }
    };
    let value = if count_view {
        service.count_and_read(name).await?
    } else {
        service.read(name).await?
    };
    let svg = look.render(value);
    let etag = badge::etag(&svg);
    let cache = [
        (
            header::CACHE_CONTROL,
            HeaderValue::from_static(badge::CACHE_CONTROL),
        ),
        (header::ETAG, etag.clone()),
        (
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        ),
    ];
    if badge::not_modified(&headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, cache).into_response());
    }
    Ok((
        cache,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("image/svg+xml"),
        )],
        svg,
    )
        .into_response())
}

/// A counter as the JSON of shields.io's endpoint badge: point
/// `https://img.shields.io/endpoint?url=` at this route.
#[utoipa::path(
    get,
    path = "/v1/counters/{name}/shields",
    params(
        ("name" = inline(tally_infra::openapi::CounterNameSchema), Path, description = "Counter name, percent-encoded"),
        ShieldsQuery,
    ),
    responses(
        (status = 200, description = "shields.io endpoint JSON", body = ShieldsEndpoint),
        (status = 400, description = "Bad name or query", content_type = "application/problem+json"),
        (status = 503, description = "The counter could not be read", content_type = "application/problem+json"),
    ),
    tag = "widgets"
)]
pub async fn shields_endpoint(
    State(service): State<Arc<WidgetService>>,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<ShieldsQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let name = counter_name_from_path(name)?;
    let Query(query) = query.map_err(|rejection| invalid_query(rejection.body_text()))?;
    let look = BadgeLook::parse(query.label, query.color, None, None, query.format)
        .map_err(invalid_query)?;
    let value = service.read(name).await?;
    Ok(cors(Json(ShieldsEndpoint {
        schema_version: 1,
        message: look.format.write(value),
        color: look.color_name().to_owned(),
        label: look.label,
    })))
}

/// A counter's value as Server-Sent Events: `event: value` with `{"counter", "value", "as_of"}`
/// whenever it changes (at most one per 250 ms), its `id` being the value; `: keep-alive`
/// comments every 15 s. A reconnect with `Last-Event-ID` gets the next event only once the
/// value differs from the one it names.
#[utoipa::path(
    get,
    path = "/v1/counters/{name}/events",
    params(
        ("name" = inline(tally_infra::openapi::CounterNameSchema), Path, description = "Counter name, percent-encoded"),
        ("Last-Event-ID" = Option<String>, Header, description = "The `id` of the last event received: the value it showed"),
    ),
    responses(
        (status = 200, description = "An endless event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad name", content_type = "application/problem+json"),
    ),
    tag = "widgets"
)]
pub async fn live_events(
    State(service): State<Arc<WidgetService>>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let name = counter_name_from_path(name)?;
    let last_seen = headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let receiver = service.live.follow(name);
    let events = futures_util::stream::unfold(
        (receiver, last_seen),
        |(mut receiver, mut last_seen)| async move {
            loop {
                let latest = receiver.borrow_and_update().clone();
                if let Some(latest) = latest {
                    let id = latest.value.to_string();
                    if last_seen.as_deref() != Some(id.as_str()) {
                        last_seen = Some(id.clone());
                        let event = Event::default()
                            .event("value")
                            .id(id)
                            .json_data(LiveValue {
                                counter: latest.counter,
                                value: latest.value,
                                as_of: latest.as_of,
                            })
                            .expect("a live value serializes");
                        return Some((Ok::<_, Infallible>(event), (receiver, last_seen)));
                    }
                }
                // The watcher outlives its followers; it is gone only if it failed.
                receiver.changed().await.ok()?;
            }
        },
    );
    Ok(cors(
        Sse::new(events).keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keep-alive"),
        ),
    ))
}

/// A page for an `<iframe>` that shows the counter live (Server-Sent Events, or polling where
/// they are blocked). Query options: `label`, `color`, `size` (px), `format=full`.
#[utoipa::path(
    get,
    path = "/embed/{name}",
    params(("name" = inline(tally_infra::openapi::CounterNameSchema), Path, description = "Counter name, percent-encoded")),
    responses(
        (status = 200, description = "The page", content_type = "text/html", body = String),
        (status = 400, description = "Bad name", content_type = "application/problem+json"),
    ),
    tag = "widgets"
)]
pub async fn embed_page(name: Result<Path<String>, PathRejection>) -> Result<Response, Problem> {
    // The page reads the name from its own address; checking it here answers a bad one clearly.
    counter_name_from_path(name)?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=300"),
            ),
        ],
        include_str!("../assets/embed.html"),
    )
        .into_response())
}

/// A script that turns every `<span data-tally="NAME">` of a page into NAME's live value.
#[utoipa::path(
    get,
    path = "/embed.js",
    responses((status = 200, description = "The script", content_type = "text/javascript", body = String)),
    tag = "widgets"
)]
pub async fn embed_script() -> Response {
    cors((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/javascript; charset=utf-8"),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=300"),
            ),
        ],
        include_str!("../assets/embed.js"),
    ))
}

/// CountAPI's `hit`: counts one and answers the new value. `/hit/NAMESPACE/KEY` is the Tally
/// counter `NAMESPACE:KEY`.
#[utoipa::path(
    get,
    path = "/hit/{namespace}/{key}",
    params(
        ("namespace" = String, Path, min_length = 1, max_length = 64, pattern = "^[^:\\u0000-\\u001F\\u007F-\\u009F]{1,64}$", description = "No `:`"),
        ("key" = String, Path, min_length = 1, max_length = 191, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]{1,191}$"),
    ),
    responses(
        (status = 200, description = "Counted; the counter's value", body = CountApiValue),
        (status = 400, description = "Bad namespace or key", content_type = "application/problem+json"),
        (status = 429, description = "Over this client's write rate limit", content_type = "application/problem+json"),
        (status = 503, description = "The hit is indeterminate, or the counter could not be read", content_type = "application/problem+json"),
    ),
    tag = "widgets"
)]
pub async fn countapi_hit(
    State(service): State<Arc<WidgetService>>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, Problem> {
    let name = countapi_name(path)?;
    let value = service.count_and_read(name).await?;
    Ok(cors(Json(CountApiValue { value })))
}

/// CountAPI's `get`: the counter's value. A counter never hit reads 0.
#[utoipa::path(
    get,
    path = "/get/{namespace}/{key}",
    params(
        ("namespace" = String, Path, min_length = 1, max_length = 64, pattern = "^[^:\\u0000-\\u001F\\u007F-\\u009F]{1,64}$", description = "No `:`"),
        ("key" = String, Path, min_length = 1, max_length = 191, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]{1,191}$"),
    ),
    responses(
        (status = 200, description = "The counter's value", body = CountApiValue),
        (status = 400, description = "Bad namespace or key", content_type = "application/problem+json"),
        (status = 503, description = "The counter could not be read", content_type = "application/problem+json"),
    ),
    tag = "widgets"
)]
pub async fn countapi_get(
    State(service): State<Arc<WidgetService>>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, Problem> {
    let name = countapi_name(path)?;
    let value = service.read(name).await?;
    Ok(cors(Json(CountApiValue { value })))
}

/// The longest CountAPI namespace, and key: `NAMESPACE:KEY` stays a valid counter name.
const MAX_NAMESPACE_CHARS: usize = 64;
const MAX_KEY_CHARS: usize = 191;

fn countapi_name(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<CounterName, Problem> {
    let Path((namespace, key)) = path.map_err(|rejection| invalid_query(rejection.body_text()))?;
    if namespace.is_empty()
        || namespace.chars().count() > MAX_NAMESPACE_CHARS
        || namespace.contains(':')
    {
        return Err(invalid_counter_name(&format!(
            "the namespace must be 1 to {MAX_NAMESPACE_CHARS} characters without `:`"
        )));
    }
    if key.chars().count() > MAX_KEY_CHARS {
        return Err(invalid_counter_name(&format!(
            "the key must be at most {MAX_KEY_CHARS} characters"
        )));
    }
    CounterName::parse(format!("{namespace}:{key}")).map_err(|error| invalid_counter_name(&error))
}

fn cors(answer: impl IntoResponse) -> Response {
    (
        [(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        )],
        answer,
    )
        .into_response()
}

fn invalid_query(detail: String) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-query",
        "The query string is invalid",
        detail,
    )
}

impl WidgetService {
    async fn read(&self, name: CounterName) -> Result<i64, Problem> {
        let mut values = self
            .read
            .read(vec![name], false)
            .await
            .map_err(tally_read::routes::unavailable)?;
        Ok(values.pop().expect("one name read gives one value").value)
    }

    /// Counts one view, then reads the counter past the cache: the view is in Redis's deltas
    /// before its `202`, so the value read includes it.
    async fn count_and_read(&self, name: CounterName) -> Result<i64, Problem> {
        let Some(ingest) = &self.ingest else {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "counting-unavailable",
                "This process does not count",
                "counting a view needs the ingest role in the process that serves the widget",
            ));
        };
        let item = IncrementItem {
            name: name.clone(),
            by: 1,
            idempotency_key: None,
        };
        ingest
            .accept_items(std::slice::from_ref(&item))
            .await
            .map_err(tally_ingest::routes::ingest_problem)?;
        let mut values = self
            .read
            .read(vec![name], true)
            .await
            .map_err(tally_read::routes::unavailable)?;
        Ok(values.pop().expect("one name read gives one value").value)
    }
}
