//! The `{name}` path segment every counter route takes, and the one problem a bad name gets.

use axum::extract::Path;
use axum::extract::rejection::PathRejection;
use axum::http::StatusCode;
use tally_core::{CounterName, CounterNameError};

use crate::Problem;

/// Turns the `{name}` path segment into a counter name, or a `400` that says what is wrong.
pub fn counter_name_from_path(
    name: Result<Path<String>, PathRejection>,
) -> Result<CounterName, Problem> {
    let name = match name {
        Ok(Path(name)) => name,
        // The router already matched the route, so the only way extraction fails is a segment
        // that is not UTF-8 once percent-decoded.
        Err(_) => return Err(invalid_counter_name(&CounterNameError::NotUtf8)),
    };
    CounterName::parse(name).map_err(|error| invalid_counter_name(&error))
}

pub fn invalid_counter_name(error: &dyn std::fmt::Display) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-counter-name",
        "Invalid counter name",
        error.to_string(),
    )
}
