//! Counter names: 1 to 256 characters (Unicode scalar values) with no control characters.
//!
//! The limit counts characters, not bytes, because that is what JSON Schema's `maxLength`
//! counts: the OpenAPI document states the rule as [`NAME_PATTERN`] with `minLength` 1 and
//! `maxLength` [`MAX_NAME_CHARS`], and a client that checks a name against the document must
//! reach the same verdict as the server.

use std::fmt;

/// The longest name, in characters (Unicode scalar values).
pub const MAX_NAME_CHARS: usize = 256;

/// The most bytes a valid name's UTF-8 can take: four per character.
pub const MAX_NAME_BYTES: usize = MAX_NAME_CHARS * 4;

/// The rule as an ECMA-262 regular expression, for the OpenAPI document: 1 to 256 characters,
/// none of them a control character (general category `Cc`: U+0000 to U+001F and U+007F to
/// U+009F, exactly what [`char::is_control`] refuses).
pub const NAME_PATTERN: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]{1,256}$";

/// A validated counter name. Constructing one is the only way to get past the API edge.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CounterNameError {
    #[error("the counter name is empty; it must be 1 to {MAX_NAME_CHARS} characters")]
    Empty,
    #[error("the counter name is {0} characters long; the limit is {MAX_NAME_CHARS} characters")]
    TooLong(usize),
    #[error("the counter name contains the control character U+{code:04X} at byte {byte_offset}")]
    ControlCharacter { code: u32, byte_offset: usize },
    #[error("the counter name is not valid UTF-8 once percent-decoded")]
    NotUtf8,
}

impl CounterName {
    pub fn parse(candidate: impl Into<String>) -> Result<Self, CounterNameError> {
        let candidate = candidate.into();
        if candidate.is_empty() {
            return Err(CounterNameError::Empty);
        }
        let characters = candidate.chars().count();
        if characters > MAX_NAME_CHARS {
            return Err(CounterNameError::TooLong(characters));
        }
        if let Some((byte_offset, character)) = candidate
            .char_indices()
            .find(|(_, character)| character.is_control())
        {
            return Err(CounterNameError::ControlCharacter {
                code: character as u32,
                byte_offset,
            });
        }
        Ok(Self(candidate))
    }

    /// Validates raw bytes, as they come out of a Kafka key or a percent-decoded path.
    pub fn parse_bytes(candidate: &[u8]) -> Result<Self, CounterNameError> {
        let text = std::str::from_utf8(candidate).map_err(|_| CounterNameError::NotUtf8)?;
        Self::parse(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for CounterName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl AsRef<str> for CounterName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_unicode_and_punctuation() {
        for name in [
            "views",
            "page:/home?x=1",
            "👍 likes",
            "a b/c%d{e}",
            &"x".repeat(256),
        ] {
            assert_eq!(CounterName::parse(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn rejects_empty_long_and_control() {
        assert_eq!(CounterName::parse(""), Err(CounterNameError::Empty));
        assert_eq!(
            CounterName::parse("x".repeat(257)),
            Err(CounterNameError::TooLong(257))
        );
        // The limit counts characters: 256 four-byte characters are fine, 257 are not.
        assert!(CounterName::parse("👍".repeat(256)).is_ok());
        assert_eq!(
            CounterName::parse("€".repeat(257)),
            Err(CounterNameError::TooLong(257))
        );
        assert!(
            CounterName::parse("\u{85}").is_err(),
            "C1 controls are controls too"
        );
        assert!(
            CounterName::parse("\u{a0}").is_ok(),
            "U+00A0 is not a control"
        );
    }

    #[test]
    fn the_pattern_states_the_same_limit() {
        assert!(NAME_PATTERN.ends_with(&format!("]{{1,{MAX_NAME_CHARS}}}$")));
        // Every control character, and nothing else, is in the pattern's excluded ranges.
        for code in 0..=0x10ffff_u32 {
            let Some(character) = char::from_u32(code) else {
                continue;
            };
            let excluded = code <= 0x1f || (0x7f..=0x9f).contains(&code);
            assert_eq!(character.is_control(), excluded, "U+{code:04X}");
        }
        assert_eq!(
            CounterName::parse("ab\ncd"),
            Err(CounterNameError::ControlCharacter {
                code: 0x0a,
                byte_offset: 2
            })
        );
        assert_eq!(
            CounterName::parse("\u{7f}"),
            Err(CounterNameError::ControlCharacter {
                code: 0x7f,
                byte_offset: 0
            })
        );
        assert_eq!(
            CounterName::parse_bytes(&[0x66, 0xff]),
            Err(CounterNameError::NotUtf8)
        );
    }
}
