//! Talking to Tally, and turning each answer into what it means for the count.
//!
//! The classification follows the README's "What each status code promises":
//! - `202`: acknowledged, counted exactly once (`"duplicate": true`: a retry of a use already
//!   acknowledged, counted once, the first time);
//! - `409` `/problems/idempotency-key-in-flight`: another use of the key is in flight, nothing
//!   counted, retry later with the same key;
//! - `422` `/problems/idempotency-key-reused`: the key was first used for another counter or
//!   amount, nothing counted;
//! - any other `4xx`: rejected, nothing counted;
//! - `503`, any other `5xx`, a timeout, a connection lost after sending: indeterminate;
//! - a connection that could not even be opened: the request never left, nothing counted.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;

/// Longest wait for one answer. Above the suite's 2 s produce timeout, so a Kafka outage shows
/// as Tally's own `503`; a request that takes longer than this is indeterminate.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What one increment request (single or batch) came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptResult {
    /// `202`. `duplicates` counts the items Tally recognised as retries of an idempotency key it
    /// had already acknowledged (`"duplicate": true`, or a batch's `"duplicates"`).
    Acknowledged { duplicates: u64 },
    /// `409` `/problems/idempotency-key-in-flight`: another request with the same key was still
    /// in flight. Nothing was counted; the same key may be sent again after `retry_after`.
    KeyInFlight { retry_after: Option<Duration> },
    /// `422` `/problems/idempotency-key-reused`: the key was first used for another counter or
    /// amount. Nothing was counted.
    KeyReused { detail: String },
    /// Any other `4xx`: nothing was counted.
    Rejected { status: u16, detail: String },
    /// The connection could not be opened: the request was never sent, nothing was counted.
    NotSent { cause: String },
    /// Tally may or may not have counted it. `unexpected` names an answer other than the
    /// documented `503` or a transport failure (for example a `500`), worth a look.
    Indeterminate {
        cause: String,
        unexpected: Option<String>,
        retry_after: Option<Duration>,
    },
}

/// One successful read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CounterRead {
    pub value: i64,
    pub source: String,
    pub stale: bool,
}

/// One item of a batch increment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchItem {
    pub counter: String,
    pub by: i64,
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone)]
pub struct TallyClient {
    http: reqwest::Client,
    base_url: String,
    /// Sent as `Authorization: Bearer` on the admin routes.
    admin_token: Option<String>,
}

/// What one admin set, reset or import came to (the same classification as an increment's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetAnswer {
    /// `202`: the `audit_id` of each counter's set.
    Acknowledged { audit_ids: BTreeMap<String, String> },
    /// Applied once or never. `unexpected` names an answer other than `503` or a transport
    /// failure.
    Indeterminate {
        cause: String,
        unexpected: Option<String>,
    },
    /// A `4xx`, or never sent: nothing applied. `unexpected` names a `4xx`, which a valid
    /// request should never get.
    Failed { unexpected: Option<String> },
}

/// One row of `GET /v1/admin/audit` (the fields the checker uses).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AuditRow {
    pub seq: i64,
    pub audit_id: String,
    pub counter: String,
    pub reason: String,
    pub old_value: i64,
    pub new_value: i64,
}

/// One page of the audit trail, newest first.
#[derive(Debug, Clone, Deserialize)]
pub struct AuditPage {
    pub entries: Vec<AuditRow>,
    pub next_before: Option<i64>,
}

#[derive(Deserialize)]
struct SetAccepted {
    counter: String,
    audit_id: String,
}

#[derive(Deserialize)]
struct ImportAccepted {
    counters: Vec<SetAccepted>,
}

#[derive(Deserialize)]
struct SingleAccepted {
    /// Missing before idempotency keys existed: then nothing is ever a duplicate.
    #[serde(default)]
    duplicate: bool,
}

#[derive(Deserialize)]
struct BatchAccepted {
    #[serde(default)]
    duplicates: u64,
}

impl TallyClient {
    pub fn new(base_url: String) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(1))
            .build()?;
        Ok(TallyClient {
            http,
            base_url,
            admin_token: None,
        })
    }

    /// The same client, sending `token` on the admin routes.
    pub fn with_admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(token.to_owned());
        self
    }

    fn admin_post(&self, path: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
        let request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .json(&body);
        match &self.admin_token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// `POST /v1/admin/counters/{counter}/set`.
    pub async fn set_counter(&self, counter: &str, value: i64, reason: &str) -> SetAnswer {
        let request = self.admin_post(
            &format!("/v1/admin/counters/{counter}/set"),
            json!({ "value": value, "reason": reason }),
        );
        single_set_answer(request.send().await).await
    }

    /// `POST /v1/admin/counters/{counter}/reset`.
    pub async fn reset_counter(&self, counter: &str, reason: &str) -> SetAnswer {
        let request = self.admin_post(
            &format!("/v1/admin/counters/{counter}/reset"),
            json!({ "reason": reason }),
        );
        single_set_answer(request.send().await).await
    }

    /// `POST /v1/admin/import`: every set applied, or none, or (indeterminate) any of them.
    pub async fn import(&self, sets: &[(String, i64)], reason: &str) -> SetAnswer {
        let counters: Vec<serde_json::Value> = sets
            .iter()
            .map(|(counter, value)| json!({ "counter": counter, "value": value }))
            .collect();
        let request = self.admin_post(
            "/v1/admin/import",
            json!({ "counters": counters, "reason": reason }),
        );
        match request.send().await {
            Ok(response) if response.status() == StatusCode::ACCEPTED => {
                let audit_ids = response
                    .json::<ImportAccepted>()
                    .await
                    .map(|body| {
                        body.counters
                            .into_iter()
                            .map(|set| (set.counter, set.audit_id))
                            .collect()
                    })
                    .unwrap_or_default();
                SetAnswer::Acknowledged { audit_ids }
            }
            Ok(response) => set_answer_of(classify_failure_status(response).await),
            Err(error) => set_answer_of(classify_transport_error(&error)),
        }
    }

    /// `GET /v1/admin/audit?limit=..&before=..`: one page of every counter's trail.
    pub async fn audit_page(&self, limit: i64, before: Option<i64>) -> anyhow::Result<AuditPage> {
        let mut url = format!("{}/v1/admin/audit?limit={limit}", self.base_url);
        if let Some(before) = before {
            url.push_str(&format!("&before={before}"));
        }
        let mut request = self.http.get(url);
        if let Some(token) = &self.admin_token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status();
        anyhow::ensure!(
            status == StatusCode::OK,
            "GET /v1/admin/audit answered {}: {}",
            status.as_u16(),
            response.text().await.unwrap_or_default()
        );
        Ok(response.json::<AuditPage>().await?)
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `POST /v1/counters/{counter}/increment`. Counter names in this suite are plain ASCII
    /// letters, digits and dashes, so they need no percent-encoding.
    pub async fn increment(
        &self,
        counter: &str,
        by: i64,
        idempotency_key: Option<&str>,
    ) -> AttemptResult {
        let mut request = self
            .http
            .post(format!("{}/v1/counters/{counter}/increment", self.base_url))
            .json(&json!({ "by": by }));
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        match request.send().await {
            Ok(response) if response.status() == StatusCode::ACCEPTED => {
                match response.json::<SingleAccepted>().await {
                    Ok(body) => AttemptResult::Acknowledged {
                        duplicates: u64::from(body.duplicate),
                    },
                    // The 202 itself is the acknowledgement; a body we could not read does
                    // not change that, but it does hide whether it was a duplicate.
                    Err(_) => AttemptResult::Acknowledged { duplicates: 0 },
                }
            }
            Ok(response) => classify_failure_status(response).await,
            Err(error) => classify_transport_error(&error),
        }
    }

    /// `POST /v1/increments`: all items are counted, or none, or (indeterminate) any of them.
    pub async fn increment_batch(&self, items: &[BatchItem]) -> AttemptResult {
        let increments: Vec<serde_json::Value> = items
            .iter()
            .map(|item| match &item.idempotency_key {
                Some(key) => {
                    json!({ "counter": item.counter, "by": item.by, "idempotency_key": key })
                }
                None => json!({ "counter": item.counter, "by": item.by }),
            })
            .collect();
        let request = self
            .http
            .post(format!("{}/v1/increments", self.base_url))
            .json(&json!({ "increments": increments }));
        match request.send().await {
            Ok(response) if response.status() == StatusCode::ACCEPTED => {
                match response.json::<BatchAccepted>().await {
                    Ok(body) => AttemptResult::Acknowledged {
                        duplicates: body.duplicates,
                    },
                    Err(_) => AttemptResult::Acknowledged { duplicates: 0 },
                }
            }
            Ok(response) => classify_failure_status(response).await,
            Err(error) => classify_transport_error(&error),
        }
    }

    /// `GET /v1/counters/{counter}`, with `?fresh=true` to skip the read cache.
    pub async fn read(&self, counter: &str, fresh: bool) -> Result<CounterRead, String> {
        let response = self
            .http
            .get(format!(
                "{}/v1/counters/{counter}?fresh={fresh}",
                self.base_url
            ))
            .send()
            .await
            .map_err(|error| transport_error_kind(&error))?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(format!("HTTP {}", status.as_u16()));
        }
        response
            .json::<CounterRead>()
            .await
            .map_err(|_| "unreadable body".to_owned())
    }

    /// `GET {path}` answers `200`.
    pub async fn answers_ok(&self, path: &str) -> bool {
        matches!(
            self.http.get(format!("{}{path}", self.base_url)).send().await,
            Ok(response) if response.status() == StatusCode::OK
        )
    }
}

async fn single_set_answer(sent: Result<reqwest::Response, reqwest::Error>) -> SetAnswer {
    match sent {
        Ok(response) if response.status() == StatusCode::ACCEPTED => {
            let audit_ids = response
                .json::<SetAccepted>()
                .await
                .map(|body| BTreeMap::from([(body.counter, body.audit_id)]))
                .unwrap_or_default();
            SetAnswer::Acknowledged { audit_ids }
        }
        Ok(response) => set_answer_of(classify_failure_status(response).await),
        Err(error) => set_answer_of(classify_transport_error(&error)),
    }
}

/// An admin request's failure, classified like an increment's.
fn set_answer_of(result: AttemptResult) -> SetAnswer {
    match result {
        AttemptResult::Indeterminate {
            cause, unexpected, ..
        } => SetAnswer::Indeterminate { cause, unexpected },
        AttemptResult::NotSent { .. } => SetAnswer::Failed { unexpected: None },
        AttemptResult::Rejected { status, .. } => SetAnswer::Failed {
            unexpected: Some(format!("HTTP {status}")),
        },
        AttemptResult::KeyInFlight { .. } => SetAnswer::Failed {
            unexpected: Some("HTTP 409".to_owned()),
        },
        AttemptResult::KeyReused { .. } => SetAnswer::Failed {
            unexpected: Some("HTTP 422".to_owned()),
        },
        AttemptResult::Acknowledged { .. } => SetAnswer::Acknowledged {
            audit_ids: BTreeMap::new(),
        },
    }
}

async fn classify_failure_status(response: reqwest::Response) -> AttemptResult {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let detail = response.text().await.unwrap_or_default();
    if status.is_client_error() {
        return classify_client_error(status, detail, retry_after);
    }
    let cause = format!("HTTP {}", status.as_u16());
    let unexpected = (status != StatusCode::SERVICE_UNAVAILABLE).then(|| cause.clone());
    AttemptResult::Indeterminate {
        cause,
        unexpected,
        retry_after,
    }
}

/// Problem types of the idempotency answers, as Tally's problem+json `type` ends.
const KEY_IN_FLIGHT_PROBLEM: &str = "/problems/idempotency-key-in-flight";
const KEY_REUSED_PROBLEM: &str = "/problems/idempotency-key-reused";

#[derive(Deserialize)]
struct ProblemType {
    #[serde(rename = "type")]
    problem_type: String,
}

/// A `4xx`: nothing was counted. A `409` or `422` is told apart by its problem type, so a
/// status reused for another problem one day is not mistaken for an idempotency answer.
fn classify_client_error(
    status: StatusCode,
    detail: String,
    retry_after: Option<Duration>,
) -> AttemptResult {
    let problem_type = serde_json::from_str::<ProblemType>(&detail)
        .map(|problem| problem.problem_type)
        .unwrap_or_default();
    if status == StatusCode::CONFLICT && problem_type.ends_with(KEY_IN_FLIGHT_PROBLEM) {
        return AttemptResult::KeyInFlight { retry_after };
    }
    if status == StatusCode::UNPROCESSABLE_ENTITY && problem_type.ends_with(KEY_REUSED_PROBLEM) {
        return AttemptResult::KeyReused { detail };
    }
    AttemptResult::Rejected {
        status: status.as_u16(),
        detail,
    }
}

fn classify_transport_error(error: &reqwest::Error) -> AttemptResult {
    if error.is_connect() {
        // Failing to open the connection means no byte of the request reached Tally.
        AttemptResult::NotSent {
            cause: transport_error_kind(error),
        }
    } else {
        // Sent, or perhaps sent: a timeout, a reset, a connection closed mid-answer.
        AttemptResult::Indeterminate {
            cause: transport_error_kind(error),
            unexpected: None,
            retry_after: None,
        }
    }
}

fn transport_error_kind(error: &reqwest::Error) -> String {
    if error.is_connect() {
        "connection refused".to_owned()
    } else if error.is_timeout() {
        "timeout".to_owned()
    } else {
        "connection lost".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_answers_are_told_apart_by_their_problem_type() {
        let in_flight =
            r#"{"type":"/problems/idempotency-key-in-flight","title":"t","status":409}"#;
        assert_eq!(
            classify_client_error(
                StatusCode::CONFLICT,
                in_flight.to_owned(),
                Some(Duration::from_secs(1))
            ),
            AttemptResult::KeyInFlight {
                retry_after: Some(Duration::from_secs(1))
            }
        );
        let reused = r#"{"type":"/problems/idempotency-key-reused","title":"t","status":422}"#;
        assert_eq!(
            classify_client_error(StatusCode::UNPROCESSABLE_ENTITY, reused.to_owned(), None),
            AttemptResult::KeyReused {
                detail: reused.to_owned()
            }
        );
    }

    #[test]
    fn a_409_or_422_of_another_problem_is_a_plain_rejection() {
        let other = r#"{"type":"/problems/something-else","status":409}"#;
        assert_eq!(
            classify_client_error(StatusCode::CONFLICT, other.to_owned(), None),
            AttemptResult::Rejected {
                status: 409,
                detail: other.to_owned()
            }
        );
        assert_eq!(
            classify_client_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "not json".to_owned(),
                None
            ),
            AttemptResult::Rejected {
                status: 422,
                detail: "not json".to_owned()
            }
        );
    }
}
