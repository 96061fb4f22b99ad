//! Idempotency keys: 1 to 128 printable ASCII characters.

pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdempotencyKeyError {
    #[error("the idempotency key is empty")]
    Empty,
    #[error("the idempotency key is {0} bytes long; the limit is {MAX_IDEMPOTENCY_KEY_LEN}")]
    TooLong(usize),
    #[error("the idempotency key has a byte outside printable ASCII at position {0}")]
    NotPrintableAscii(usize),
}

impl IdempotencyKey {
    pub fn parse(candidate: &[u8]) -> Result<Self, IdempotencyKeyError> {
        if candidate.is_empty() {
            return Err(IdempotencyKeyError::Empty);
        }
        if candidate.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(IdempotencyKeyError::TooLong(candidate.len()));
        }
        if let Some(position) = candidate
            .iter()
            .position(|byte| !(0x20..=0x7e).contains(byte))
        {
            return Err(IdempotencyKeyError::NotPrintableAscii(position));
        }
        let text = std::str::from_utf8(candidate).expect("printable ASCII should be valid UTF-8");
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// What an idempotency key was first used for: a retry must name the same counter and amount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyUse {
    pub counter: String,
    pub by: i64,
}

impl KeyUse {
    /// `BY:COUNTER`: the amount first, because a counter name may itself contain `:`.
    pub fn encode(&self) -> String {
        format!("{}:{}", self.by, self.counter)
    }

    pub fn decode(encoded: &str) -> Option<Self> {
        let (by, counter) = encoded.split_once(':')?;
        Some(Self {
            counter: counter.to_owned(),
            by: by.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_uses_round_trip_with_colons_in_names() {
        let used = KeyUse {
            counter: "page:home".into(),
            by: -3,
        };
        assert_eq!(used.encode(), "-3:page:home");
        assert_eq!(KeyUse::decode("-3:page:home"), Some(used));
        assert_eq!(KeyUse::decode("garbage"), None);
    }

    #[test]
    fn validates_keys() {
        assert_eq!(
            IdempotencyKey::parse(b"order-42 retry").unwrap().as_str(),
            "order-42 retry"
        );
        assert_eq!(IdempotencyKey::parse(b""), Err(IdempotencyKeyError::Empty));
        assert_eq!(
            IdempotencyKey::parse(&[b'k'; 129]),
            Err(IdempotencyKeyError::TooLong(129))
        );
        assert_eq!(
            IdempotencyKey::parse(b"ab\tc"),
            Err(IdempotencyKeyError::NotPrintableAscii(2))
        );
        assert!(IdempotencyKey::parse("é".as_bytes()).is_err());
    }
}
