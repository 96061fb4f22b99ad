//! # tally-widgets
//!
//! What view-count widgets use, on top of the plain counters:
//! - `GET /badge/NAME.svg`: a shields-style SVG badge ([`badge`]), drawn by the `shields` crate
//!   (shields.io's own layout and font widths), humanized counts ([`humanize`]), never cached
//!   stale by an image proxy, and with `?incr=1` counting the view it shows;
//! - `GET /v1/counters/NAME/shields`: the JSON `img.shields.io/endpoint` reads;
//! - `GET /v1/counters/NAME/events`: the counter live, as Server-Sent Events, from one watcher
//!   per counter and process however many clients follow it ([`live`]);
//! - `GET /embed/NAME` and `GET /embed.js`: a page for an `<iframe>` and a script for a `<span>`
//!   that show a counter live, falling back to polling where event streams are blocked;
//! - `GET /hit/NAMESPACE/KEY` and `GET /get/NAMESPACE/KEY`: CountAPI's routes, so pages written
//!   for that service work against Tally; `NAMESPACE:KEY` is the Tally counter.
//!
//! A widget counts through the ingest and reads through the read service, so it keeps their
//! promises: a counted view is durable before it is shown, and a value read is never a wrong
//! value shown as fresh. Counting answers to the write rate limit like any increment; the caller
//! puts [`is_counting`] requests behind the write guard.

pub mod badge;
pub mod humanize;
pub mod live;
pub mod routes;

use std::sync::Arc;

use axum::Router;
use axum::http::Request;
use axum::routing::get;
use tally_ingest::IngestService;
use tally_read::ReadService;

/// The services a widget uses. Without the ingest role in this process, widgets only read.
pub struct WidgetService {
    pub read: Arc<ReadService>,
    pub ingest: Option<Arc<IngestService>>,
    pub live: Arc<live::LiveCounters>,
}

impl WidgetService {
    pub fn new(read: Arc<ReadService>, ingest: Option<Arc<IngestService>>) -> Self {
        Self {
            live: Arc::new(live::LiveCounters::new(Arc::clone(&read))),
            read,
            ingest,
        }
    }
}

pub fn router(service: Arc<WidgetService>) -> Router {
    Router::new()
        .route("/badge/{file}", get(routes::badge))
        .route("/v1/counters/{name}/shields", get(routes::shields_endpoint))
        .route("/v1/counters/{name}/events", get(routes::live_events))
        .route("/embed/{name}", get(routes::embed_page))
        .route("/embed.js", get(routes::embed_script))
        .route("/hit/{namespace}/{key}", get(routes::countapi_hit))
        .route("/get/{namespace}/{key}", get(routes::countapi_get))
        .with_state(service)
}

/// Whether a widget request counts a view: a CountAPI hit, or a badge with `incr=1`. The query
/// is decoded as the handler decodes it, so `?%69ncr=%31` is counting too.
pub fn is_counting<B>(request: &Request<B>) -> bool {
    let uri = request.uri();
    if uri.path().starts_with("/hit/") {
        return true;
    }
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(&part.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    uri.query().is_some_and(|query| {
        query.split('&').any(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            decode(key) == "incr" && matches!(decode(value).as_str(), "1" | "true")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counting_requests_are_found_however_their_query_is_encoded() {
        let counting = |uri: &str| is_counting(&Request::get(uri).body(()).unwrap());
        assert!(counting("/hit/site/home"));
        assert!(counting("/badge/a.svg?incr=1"));
        assert!(counting("/badge/a.svg?label=x&incr=true"));
        assert!(counting("/badge/a.svg?%69ncr=%31"));
        assert!(!counting("/badge/a.svg?incr=0"));
        assert!(!counting("/badge/a.svg?label=incr%3D1"));
        assert!(!counting("/get/site/home"));
    }
}
