//! Errors as users see them: `application/problem+json` (RFC 9457).
//!
//! Every route maps its errors to a [`Problem`] here, so that every error body has the same
//! shape: a `type` that names the kind of problem, a `title`, the `status` and a `detail` that
//! names the exact problem.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    /// A short, stable slug; the `type` is `/problems/{slug}`.
    pub slug: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub retry_after_secs: Option<u64>,
    /// Extension members, such as the list of bad batch items.
    pub extensions: Map<String, Value>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            slug,
            title,
            detail: detail.into(),
            retry_after_secs: None,
            extensions: Map::new(),
        }
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_secs = Some(seconds);
        self
    }

    pub fn with_extension(mut self, member: &str, value: Value) -> Self {
        self.extensions.insert(member.to_owned(), value);
        self
    }

    pub fn type_uri(&self) -> String {
        format!("/problems/{}", self.slug)
    }

    pub fn body(&self) -> Value {
        let mut body = Map::new();
        body.insert("type".into(), Value::String(self.type_uri()));
        body.insert("title".into(), Value::String(self.title.into()));
        body.insert("status".into(), Value::from(self.status.as_u16()));
        body.insert("detail".into(), Value::String(self.detail.clone()));
        for (member, value) in &self.extensions {
            body.insert(member.clone(), value.clone());
        }
        Value::Object(body)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "No such route", detail)
    }

    pub fn method_not_allowed(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method not allowed",
            detail,
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).expect("a problem body should serialize");
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
        );
        if let Some(seconds) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
