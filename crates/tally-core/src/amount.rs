//! Increment amounts: a nonzero `i64` with an absolute value of at most 10^12.

/// The largest absolute amount one increment may carry.
pub const MAX_ABS_AMOUNT: i64 = 1_000_000_000_000;

/// A validated increment amount. Negative amounts are allowed (an unlike).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Amount(i64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("`by` must not be 0")]
    Zero,
    #[error("`by` is {0}; its absolute value must be at most 10^12")]
    OutOfRange(String),
    #[error("`by` must be an integer, got {0}")]
    NotAnInteger(String),
}

impl Amount {
    pub const ONE: Amount = Amount(1);

    pub fn new(by: i64) -> Result<Self, AmountError> {
        if by == 0 {
            return Err(AmountError::Zero);
        }
        if by.unsigned_abs() > MAX_ABS_AMOUNT as u64 {
            return Err(AmountError::OutOfRange(by.to_string()));
        }
        Ok(Self(by))
    }

    /// Validates a JSON value exactly as the API receives it, so that `1.5`, `"3"` and
    /// `1e30` each get an error that names what was wrong.
    ///
    /// A number written with a fraction or exponent that is still a whole number (`5.0`, `2e3`)
    /// is that integer: JSON Schema's `integer`, which the OpenAPI document states, counts it
    /// as one, and every amount in range is exact in an `f64`.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, AmountError> {
        let serde_json::Value::Number(number) = value else {
            return Err(AmountError::NotAnInteger(value.to_string()));
        };
        if let Some(by) = number.as_i64() {
            return Self::new(by);
        }
        if number.as_u64().is_some() {
            return Err(AmountError::OutOfRange(number.to_string()));
        }
        // A float: a whole one is its integer (1e30 is then out of range), the rest are not
        // integers.
        match number.as_f64() {
            Some(float) if float.fract() == 0.0 => {
                if float.abs() > MAX_ABS_AMOUNT as f64 {
                    return Err(AmountError::OutOfRange(number.to_string()));
                }
                Self::new(float as i64)
            }
            _ => Err(AmountError::NotAnInteger(number.to_string())),
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// Clamps a wide sum into `i64`. Returns the clamped value and whether clamping happened, so
/// the caller can report it: a counter must never wrap silently.
pub fn clamp_to_i64(wide: i128) -> (i64, bool) {
    if wide > i64::MAX as i128 {
        (i64::MAX, true)
    } else if wide < i64::MIN as i128 {
        (i64::MIN, true)
    } else {
        (wide as i64, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_amounts() {
        assert_eq!(Amount::new(1).unwrap().get(), 1);
        assert_eq!(Amount::new(-MAX_ABS_AMOUNT).unwrap().get(), -MAX_ABS_AMOUNT);
        assert_eq!(Amount::new(0), Err(AmountError::Zero));
        assert!(matches!(
            Amount::new(MAX_ABS_AMOUNT + 1),
            Err(AmountError::OutOfRange(_))
        ));
        assert!(matches!(
            Amount::new(i64::MIN),
            Err(AmountError::OutOfRange(_))
        ));
    }

    #[test]
    fn json_amounts_name_their_problem() {
        assert_eq!(Amount::from_json(&json!(5)).unwrap().get(), 5);
        assert!(matches!(
            Amount::from_json(&json!(1.5)),
            Err(AmountError::NotAnInteger(_))
        ));
        assert!(matches!(
            Amount::from_json(&json!("3")),
            Err(AmountError::NotAnInteger(_))
        ));
        assert!(matches!(
            Amount::from_json(&json!(null)),
            Err(AmountError::NotAnInteger(_))
        ));
        assert!(matches!(
            Amount::from_json(&json!(1e30)),
            Err(AmountError::OutOfRange(_))
        ));
        assert!(matches!(
            Amount::from_json(&json!(u64::MAX)),
            Err(AmountError::OutOfRange(_))
        ));
        assert_eq!(Amount::from_json(&json!(0)), Err(AmountError::Zero));
        assert_eq!(
            Amount::from_json(&json!(-381322.0)).unwrap().get(),
            -381_322
        );
        assert_eq!(
            Amount::from_json(&json!(1e12)).unwrap().get(),
            MAX_ABS_AMOUNT
        );
        assert!(matches!(
            Amount::from_json(&json!(1e12 + 1.0)),
            Err(AmountError::OutOfRange(_))
        ));
        assert_eq!(Amount::from_json(&json!(-0.0)), Err(AmountError::Zero));
    }

    #[test]
    fn clamps_without_wrapping() {
        assert_eq!(clamp_to_i64(5), (5, false));
        assert_eq!(clamp_to_i64(i64::MAX as i128 + 1), (i64::MAX, true));
        assert_eq!(clamp_to_i64(i64::MIN as i128 - 1), (i64::MIN, true));
    }
}
