//! JSON request bodies: how every route that takes one reads it, and the problem each way of
//! getting it wrong is answered with, so that the same mistake gets the same answer on every
//! route.
//!
//! The rules:
//! - **A JSON content type.** The `Content-Type` must be `application/json` or another `+json`
//!   type (parameters such as `charset` are ignored); anything else, or none, is `415
//!   unsupported-media-type`.
//! - **Readable, and not too large.** A body over the route's limit is `413 body-too-large`; one
//!   that cannot be read is `400 unreadable-body`.
//! - **Valid JSON.** Otherwise `400 malformed-json`, with the parser's position.
//! - **An object.** `[1]`, `3` or `null` are `400 invalid-body`, naming what was sent instead:
//!   serde would otherwise read a struct from an array, so `[1]` would pass for `{"by": 1}`.
//! - **Known members only.** A member the route does not know is `400 invalid-body` naming it,
//!   so a misspelt `"bye"` is never silently ignored.
//! - **Each error names the problem.** A missing member, a wrong type or a bad value is
//!   `400 invalid-body` whose `detail` names the member and what was wrong with it.
//!
//! Routes that check members one by one use [`json_object`] and [`reject_unknown_members`];
//! routes with a typed body use [`parse_body`], whose types must `deny_unknown_fields`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, Error as _, IntoDeserializer, MapAccess,
    Visitor,
};
use serde_json::{Map, Value};

use crate::Problem;

/// Refuses a body that is not sent as JSON.
pub fn require_json(headers: &HeaderMap) -> Result<(), Problem> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok());
    let is_json = content_type.is_some_and(|value| {
        let media_type = value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        media_type == "application/json" || media_type.ends_with("+json")
    });
    if is_json {
        return Ok(());
    }
    Err(Problem::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
        "The body must be JSON",
        format!(
            "the Content-Type is {}; send application/json",
            content_type.map_or("missing".to_owned(), |value| format!("`{value}`"))
        ),
    ))
}

/// Checks the content type and parses the body as a JSON object.
pub fn json_object(headers: &HeaderMap, body: &[u8]) -> Result<Map<String, Value>, Problem> {
    require_json(headers)?;
    match serde_json::from_slice(body).map_err(malformed_json)? {
        Value::Object(object) => Ok(object),
        other => Err(not_an_object(&other)),
    }
}

/// Checks the content type and parses the body into `T`: not JSON is `malformed-json`; not an
/// object, an unknown member (`T` must `deny_unknown_fields`), a missing one or a wrong type is
/// `invalid-body`, and a wrong type names its member.
pub fn parse_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Problem> {
    let body = body.map_err(body_rejection)?;
    let object = json_object(headers, &body)?;
    T::deserialize(Members(object)).map_err(|error| invalid_body(error.to_string()))
}

/// What a JSON value is, for details such as "must be an integer, got a string".
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Refuses an object with a member not in `known`, naming it and the members allowed.
pub fn reject_unknown_members(object: &Map<String, Value>, known: &[&str]) -> Result<(), Problem> {
    match object
        .keys()
        .find(|member| !known.contains(&member.as_str()))
    {
        Some(unknown) => Err(invalid_body(format!(
            "unknown member `{unknown}`; the body may only have {}",
            known
                .iter()
                .map(|member| format!("`{member}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        None => Ok(()),
    }
}

/// `400 invalid-body`: JSON of the wrong shape.
pub fn invalid_body(detail: impl Into<String>) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-body",
        "The body has the wrong shape",
        detail,
    )
}

/// The problem for a body axum could not collect: too large, or cut off.
pub fn body_rejection(rejection: BytesRejection) -> Problem {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "The body is too large",
            rejection.body_text(),
        );
    }
    Problem::new(
        StatusCode::BAD_REQUEST,
        "unreadable-body",
        "The body could not be read",
        rejection.body_text(),
    )
}

fn malformed_json(error: serde_json::Error) -> Problem {
    Problem::new(
        StatusCode::BAD_REQUEST,
        "malformed-json",
        "The body is not valid JSON",
        error.to_string(),
    )
}

fn not_an_object(value: &Value) -> Problem {
    invalid_body(format!(
        "the body must be a JSON object, got {}",
        json_kind(value)
    ))
}

/// A body's members, read into a typed struct so that an error in a member's value names the
/// member: serde's own message ("invalid type: string \"3\", expected i64") does not.
struct Members(Map<String, Value>);

impl<'de> Deserializer<'de> for Members {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_map(MemberAccess {
            members: self.0.into_iter(),
            pending: None,
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

struct MemberAccess {
    members: serde_json::map::IntoIter,
    /// The member whose key was just read, waiting for its value to be.
    pending: Option<(String, Value)>,
}

impl<'de> MapAccess<'de> for MemberAccess {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let Some((member, value)) = self.members.next() else {
            return Ok(None);
        };
        let key = seed.deserialize(IntoDeserializer::<serde_json::Error>::into_deserializer(
            member.as_str(),
        ))?;
        self.pending = Some((member, value));
        Ok(Some(key))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let (member, value) = self
            .pending
            .take()
            .ok_or_else(|| de::Error::custom("a value was asked for before its member"))?;
        seed.deserialize(value)
            .map_err(|error| serde_json::Error::custom(format_args!("`{member}`: {error}")))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.members.len())
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Add {
        by: i64,
        #[serde(default)]
        note: Option<String>,
    }

    fn headers(content_type: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(content_type) = content_type {
            headers.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
        }
        headers
    }

    fn parse(body: &str) -> Result<Add, Problem> {
        parse_body(
            &headers(Some("application/json")),
            Ok(Bytes::from(body.to_owned())),
        )
    }

    #[test]
    fn json_content_types_only() {
        assert!(require_json(&headers(Some("application/json"))).is_ok());
        assert!(require_json(&headers(Some("Application/JSON; charset=utf-8"))).is_ok());
        assert!(require_json(&headers(Some("application/merge-patch+json"))).is_ok());
        for refused in [Some("text/plain"), Some("application/jsonx"), None] {
            let problem = require_json(&headers(refused)).unwrap_err();
            assert_eq!(problem.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
            assert_eq!(problem.slug, "unsupported-media-type");
        }
        assert!(
            require_json(&headers(None))
                .unwrap_err()
                .detail
                .contains("missing")
        );
    }

    #[test]
    fn typed_bodies_name_their_problem() {
        let add = parse(r#"{"by": -3, "note": null}"#).unwrap();
        assert_eq!((add.by, add.note), (-3, None));

        let unknown = parse(r#"{"by": 1, "bye": 2}"#).unwrap_err();
        assert_eq!(unknown.slug, "invalid-body");
        assert!(unknown.detail.contains("`bye`"), "{}", unknown.detail);
        let missing = parse("{}").unwrap_err();
        assert_eq!(missing.slug, "invalid-body");
        assert!(missing.detail.contains("`by`"), "{}", missing.detail);
        for wrong in [r#"{"by": "3"}"#, r#"{"by": 1.5}"#, r#"{"by": true}"#] {
            let problem = parse(wrong).unwrap_err();
            assert_eq!(problem.slug, "invalid-body");
            assert!(problem.detail.starts_with("`by`: "), "{}", problem.detail);
        }
        for not_an_object in ["[1]", "3", "null", r#""by""#] {
            let problem = parse(not_an_object).unwrap_err();
            assert_eq!(problem.slug, "invalid-body");
            assert!(
                problem.detail.starts_with("the body must be a JSON object"),
                "{}",
                problem.detail
            );
        }
        assert_eq!(parse(r#"{"by": 1"#).unwrap_err().slug, "malformed-json");
        assert_eq!(parse("").unwrap_err().slug, "malformed-json");
        let not_json = parse_body::<Add>(&headers(None), Ok(Bytes::from("{}")));
        assert_eq!(
            not_json.unwrap_err().status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
    }

    #[test]
    fn unknown_members_are_named() {
        let object = json_object(
            &headers(Some("application/json")),
            br#"{"counter": "a", "extra": 1}"#,
        )
        .unwrap();
        assert!(reject_unknown_members(&object, &["counter", "extra"]).is_ok());
        let problem = reject_unknown_members(&object, &["counter"]).unwrap_err();
        assert_eq!(problem.slug, "invalid-body");
        assert_eq!(
            problem.detail,
            "unknown member `extra`; the body may only have `counter`"
        );
    }
}
