//! The strict counter scenarios: 64 clients on one strict counter (`/v1/strict/{name}`), each
//! with its own keep-alive connection.
//!
//! - `strict-add`: `POST .../add {"by":-1}` on a stock too large to run out during the run.
//! - `strict-cas`: read-modify-write, as a client without `add` would do it: `GET` the value,
//!   then `POST .../cas {"expected": v, "value": v - 1}`, again from the `GET` on a mismatch.
//!   One operation is one successful set, however many attempts it took; the mismatches are
//!   counted apart.
//!
//! Both are synchronous in PostgreSQL, so the check is immediate: the stock the counter lost
//! must equal the operations acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::http1::Http1Connection;
use crate::report::CheckOutcome;

/// The stock each scenario starts from: far more than any run can take away.
const INITIAL_STOCK: i64 = 1_000_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrictOperation {
    Add,
    CompareAndSet,
}

#[derive(Deserialize)]
struct StrictCounterBody {
    value: i64,
}

/// One worker of a strict scenario.
pub struct StrictTarget {
    connection: Http1Connection,
    operation: StrictOperation,
    counter_path: String,
    add_path: String,
    cas_path: String,
    mismatches: Arc<AtomicU64>,
    cas_body: Vec<u8>,
}

impl StrictTarget {
    /// One acknowledged operation: `Ok(1)`; `Err(reason)` when the request failed.
    pub async fn perform(&mut self) -> Result<u64, String> {
        match self.operation {
            StrictOperation::Add => {
                let (status, _) = self
                    .connection
                    .request("POST", &self.add_path, |body| {
                        body.extend_from_slice(br#"{"by":-1}"#)
                    })
                    .await?;
                if status != 200 {
                    return Err(format!("http {status}"));
                }
                Ok(1)
            }
            StrictOperation::CompareAndSet => loop {
                let (status, body) = self
                    .connection
                    .request("GET", &self.counter_path, |_| {})
                    .await?;
                if status != 200 {
                    return Err(format!("http {status} on the read"));
                }
                let read: StrictCounterBody = serde_json::from_slice(body)
                    .map_err(|_| "unreadable strict counter body".to_string())?;
                self.cas_body.clear();
                self.cas_body.extend_from_slice(
                    format!(
                        r#"{{"expected":{},"value":{}}}"#,
                        read.value,
                        read.value - 1
                    )
                    .as_bytes(),
                );
                let cas_body = &self.cas_body;
                let (status, _) = self
                    .connection
                    .request("POST", &self.cas_path, |body| {
                        body.extend_from_slice(cas_body)
                    })
                    .await?;
                match status {
                    200 => return Ok(1),
                    // Another client set it first: read again.
                    409 => {
                        self.mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                    other => return Err(format!("http {other} on the cas")),
                }
            },
        }
    }
}

/// One strict scenario's counter and what its workers share.
pub struct StrictScenario {
    base_url: String,
    name: String,
    operation: StrictOperation,
    mismatches: Arc<AtomicU64>,
}

impl StrictScenario {
    /// Creates the scenario's strict counter (bench names need no percent-encoding).
    pub async fn prepare(
        base_url: &str,
        name: String,
        operation: StrictOperation,
    ) -> anyhow::Result<Self> {
        let mut connection = Http1Connection::new(base_url)?;
        let definition = format!(r#"{{"value":{INITIAL_STOCK},"min":0}}"#);
        let (status, body) = connection
            .request("PUT", &format!("/v1/strict/{name}"), |body| {
                body.extend_from_slice(definition.as_bytes())
            })
            .await
            .map_err(anyhow::Error::msg)
            .context("creating the strict counter")?;
        if status != 201 {
            bail!(
                "creating strict counter {name} answered {status}: {}",
                String::from_utf8_lossy(body)
            );
        }
        Ok(Self {
            base_url: base_url.to_string(),
            name,
            operation,
            mismatches: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn target(&self) -> anyhow::Result<StrictTarget> {
        Ok(StrictTarget {
            connection: Http1Connection::new(&self.base_url)?,
            operation: self.operation,
            counter_path: format!("/v1/strict/{}", self.name),
            add_path: format!("/v1/strict/{}/add", self.name),
            cas_path: format!("/v1/strict/{}/cas", self.name),
            mismatches: Arc::clone(&self.mismatches),
            cas_body: Vec::with_capacity(64),
        })
    }

    /// Compare-and-set attempts that found another value, over every phase so far.
    pub fn mismatches(&self) -> u64 {
        self.mismatches.load(Ordering::Relaxed)
    }

    /// The stock the counter lost must be exactly the operations acknowledged.
    pub async fn check(
        &self,
        acknowledged: i64,
        failed_requests: u64,
    ) -> anyhow::Result<CheckOutcome> {
        let mut connection = Http1Connection::new(&self.base_url)?;
        let (status, body) = connection
            .request("GET", &format!("/v1/strict/{}", self.name), |_| {})
            .await
            .map_err(anyhow::Error::msg)?;
        if status != 200 {
            bail!("reading strict counter {} answered {status}", self.name);
        }
        let read: StrictCounterBody = serde_json::from_slice(body)?;
        let stored = INITIAL_STOCK - read.value;
        Ok(if stored == acknowledged {
            CheckOutcome::Passed {
                acknowledged,
                stored,
                converged_after_secs: 0.0,
            }
        } else {
            CheckOutcome::Failed {
                acknowledged,
                stored,
                detail: format!(
                    "{failed_requests} requests failed and may or may not have counted"
                ),
            }
        })
    }
}
