//! Counter names: 1 to 256 bytes of UTF-8 with no control characters.

use std::fmt;

/// The longest name, in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 256;

/// A validated counter name. Constructing one is the only way to get past the API edge.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CounterNameError {
    #[error("the counter name is empty; it must be 1 to {MAX_NAME_BYTES} bytes of UTF-8")]
    Empty,
    #[error("the counter name is {0} bytes long; the limit is {MAX_NAME_BYTES} bytes of UTF-8")]
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
        if candidate.len() > MAX_NAME_BYTES {
            return Err(CounterNameError::TooLong(candidate.len()));
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
        // 86 three-byte characters are 258 bytes, though only 86 characters.
        assert_eq!(
            CounterName::parse("€".repeat(86)),
            Err(CounterNameError::TooLong(258))
        );
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
