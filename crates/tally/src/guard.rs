//! What stands in front of the routes: header size caps, API keys and rate limits on the write
//! routes, and the admin token on the admin routes. Every refusal is a problem+json.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use subtle::{Choice, ConstantTimeEq as _};
use tally_infra::Problem;
use tally_infra::config::SecurityConfig;

/// Guards the write routes: an API key when keys are configured, then the per-client rate limit.
pub struct WriteGuard {
    api_keys: Vec<String>,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
}

impl WriteGuard {
    pub fn new(config: &SecurityConfig) -> Self {
        let limiter = NonZeroU32::new(config.rate_limit_per_second).map(|per_second| {
            let burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(per_second);
            RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
        });
        let api_keys = config
            .api_keys
            .iter()
            .filter(|key| !key.is_empty())
            .cloned()
            .collect();
        Self { api_keys, limiter }
    }

    /// Forgets clients that have not written lately, so the limiter's memory stays bounded.
    pub fn forget_idle_clients(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    fn check(&self, headers: &HeaderMap, client: Option<SocketAddr>) -> Result<(), Problem> {
        let presented = bearer_token(headers);
        if !self.api_keys.is_empty() {
            let Some(presented) = presented else {
                return Err(unauthorized(
                    "write routes need `Authorization: Bearer API_KEY`",
                ));
            };
            // Every key is compared, not just those up to the first match, so the time taken
            // does not tell which key matched either.
            let matched = self.api_keys.iter().fold(Choice::from(0), |matched, key| {
                matched | constant_time_eq(presented.as_bytes(), key.as_bytes())
            });
            if !bool::from(matched) {
                return Err(unauthorized("the API key is not valid"));
            }
        }
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        // An authenticated client is limited by its key, wherever it connects from.
        let client_key = match (self.api_keys.is_empty(), presented, client) {
            (false, Some(key), _) => format!("key:{key}"),
            (_, _, Some(address)) => format!("ip:{}", address.ip()),
            _ => "unknown".to_owned(),
        };
        limiter.check_key(&client_key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let retry_after_secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
                format!("this client is over its write rate limit; retry in {wait:?}"),
            )
            .with_retry_after(retry_after_secs.max(1))
        })
    }
}

pub async fn guard_writes(
    State(guard): State<Arc<WriteGuard>>,
    request: Request,
    next: Next,
) -> Response {
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| *address);
    match guard.check(request.headers(), client) {
        Ok(()) => next.run(request).await,
        Err(problem) => problem.into_response(),
    }
}

/// Guards the admin routes with the admin token; without a configured token they are off.
pub async fn guard_admin(
    State(admin_token): State<Option<Arc<str>>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(admin_token) = admin_token else {
        return Problem::new(
            StatusCode::FORBIDDEN,
            "admin-disabled",
            "Admin routes are disabled",
            "set TALLY_ADMIN_TOKEN to enable the admin routes",
        )
        .into_response();
    };
    match bearer_token(request.headers()) {
        Some(presented)
            if constant_time_eq(presented.as_bytes(), admin_token.as_bytes()).into() =>
        {
            next.run(request).await
        }
        Some(_) => unauthorized("the admin token is not valid").into_response(),
        None => {
            unauthorized("admin routes need `Authorization: Bearer ADMIN_TOKEN`").into_response()
        }
    }
}

/// Guards the widget requests that count a view (a CountAPI hit, a badge with `incr=1`) like
/// the write routes; the widget requests that only read pass.
pub async fn guard_counting_widgets(
    State(guard): State<Arc<WriteGuard>>,
    request: Request,
    next: Next,
) -> Response {
    if !tally_widgets::is_counting(&request) {
        return next.run(request).await;
    }
    guard_writes(State(guard), request, next).await
}

/// Refuses requests whose headers add up to more than the cap, before any handler reads them.
pub async fn cap_header_size(
    State(header_max_bytes): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > header_max_bytes {
        return Problem::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            "The request headers are too large",
            format!("the headers are {header_bytes} bytes; the limit is {header_max_bytes}"),
        )
        .into_response();
    }
    next.run(request).await
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn unauthorized(detail: &str) -> Problem {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Not authorized",
        detail,
    )
}

/// Compares a presented token with a secret in a time that does not depend on where the first
/// differing byte is, so timing cannot reveal the secret byte by byte (`subtle`).
///
/// Tokens of different lengths are unequal at once: `subtle` checks the lengths first, so the
/// timing does tell whether the lengths match, and so the secret's length. That is the accepted
/// practice: a length tells nothing of the bytes, and a secret long and random enough stays
/// unguessable when its length is known. Hiding it as well would take hashing both sides first.
fn constant_time_eq(presented: &[u8], secret: &[u8]) -> Choice {
    presented.ct_eq(secret)
}

/// The `WWW-Authenticate` challenge that goes with a 401.
pub async fn add_bearer_challenge(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if response.status() == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// How often idle clients are dropped from the rate limiter.
pub const LIMITER_CLEANUP_INTERVAL: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    fn config(api_keys: &[&str], per_second: u32, burst: u32) -> SecurityConfig {
        SecurityConfig {
            api_keys: api_keys.iter().map(|key| key.to_string()).collect(),
            admin_token: None,
            rate_limit_per_second: per_second,
            rate_limit_burst: burst,
            header_max_bytes: 16_384,
        }
    }

    fn with_bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        headers
    }

    #[test]
    fn keys_are_required_only_when_configured() {
        let open = WriteGuard::new(&config(&[], 0, 0));
        assert!(open.check(&HeaderMap::new(), None).is_ok());
        let closed = WriteGuard::new(&config(&["s3cret"], 0, 0));
        assert_eq!(
            closed.check(&HeaderMap::new(), None).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            closed
                .check(&with_bearer("wrong"), None)
                .unwrap_err()
                .status,
            StatusCode::UNAUTHORIZED
        );
        assert!(closed.check(&with_bearer("s3cret"), None).is_ok());
    }

    #[test]
    fn tokens_match_only_when_every_byte_and_the_length_match() {
        let matches = |presented: &str, secret: &str| -> bool {
            constant_time_eq(presented.as_bytes(), secret.as_bytes()).into()
        };
        assert!(matches("s3cret-token", "s3cret-token"));
        assert!(
            !matches("x3cret-token", "s3cret-token"),
            "first byte differs"
        );
        assert!(
            !matches("s3cret-tokex", "s3cret-token"),
            "last byte differs"
        );
        assert!(!matches("s3cret-toke", "s3cret-token"), "a prefix");
        assert!(!matches("s3cret-tokens", "s3cret-token"), "longer");
        assert!(!matches("", "s3cret-token"));
    }

    #[test]
    fn any_configured_key_is_accepted() {
        let guard = WriteGuard::new(&config(&["k-one", "k-two", "k-three"], 0, 0));
        for key in ["k-one", "k-two", "k-three"] {
            assert!(guard.check(&with_bearer(key), None).is_ok(), "{key}");
        }
        for key in ["k-four", "k-on", "k-onee", "K-ONE"] {
            assert_eq!(
                guard.check(&with_bearer(key), None).unwrap_err().status,
                StatusCode::UNAUTHORIZED,
                "{key}"
            );
        }
    }

    #[test]
    fn each_client_gets_its_own_budget() {
        let guard = WriteGuard::new(&config(&[], 1, 2));
        let first: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let second: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        assert!(guard.check(&HeaderMap::new(), Some(first)).is_ok());
        assert!(guard.check(&HeaderMap::new(), Some(first)).is_ok());
        let limited = guard.check(&HeaderMap::new(), Some(first)).unwrap_err();
        assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(limited.retry_after_secs.unwrap() >= 1);
        assert!(
            guard.check(&HeaderMap::new(), Some(second)).is_ok(),
            "another IP has its own budget"
        );
    }
}
