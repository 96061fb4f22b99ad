//! Increment amounts: a nonzero `i64` with an absolute value of at most 10^12. And what
//! integer a JSON number stands for ([`whole_number`]), which every integer a client sends
//! goes through.
//!
//! The OpenAPI document calls these members `integer`, and JSON Schema's `integer` counts a
//! number with a fraction or exponent that is still whole (`232.0`, `2e3`) as one: clients and
//! their generators send them, so they are accepted as that integer. `1.5`, `"3"` and `true`
//! are not integers.

use std::fmt;

use serde::de::{self, Deserializer, Unexpected, Visitor};

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

/// The integer a JSON number stands for: an integer as it is, a float with no fraction strictly
/// between -2^63 and 2^63 exactly; `None` for any other number (a fraction, or out of the `i64`
/// range).
///
/// The float -2^63 is refused although it is `i64::MIN`: serde_json reads an integer literal
/// beyond the `i64` and `u64` ranges as the nearest float, and every literal from
/// -9223372036854775809 down to -9223372036854776832 rounds to exactly -2^63, so taking it
/// would accept values below the minimum. `i64::MIN` written as an integer is taken.
pub fn whole_number(number: &serde_json::Number) -> Option<i64> {
    if let Some(integer) = number.as_i64() {
        return Some(integer);
    }
    // A u64 above i64::MAX becomes a float of at least 2^63, which whole_float refuses.
    whole_float(number.as_f64()?)
}

fn whole_float(float: f64) -> Option<i64> {
    // 2^63 is the first float past i64::MAX; every whole float smaller in size is exact in an
    // i64. NaN and the infinities fail the comparisons. -2^63: see whole_number.
    const TWO_TO_63: f64 = 9_223_372_036_854_775_808.0;
    (float.fract() == 0.0 && -TWO_TO_63 < float && float < TWO_TO_63).then_some(float as i64)
}

/// For `#[serde(deserialize_with = "...")]` on an `i64` member of a typed body: takes what
/// [`whole_number`] takes, and refuses everything else with serde's "invalid type" or "invalid
/// value" error.
pub fn deserialize_whole_number<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<i64, D::Error> {
    deserializer.deserialize_any(WholeNumber)
}

/// [`deserialize_whole_number`] for an `Option<i64>` member: `null` is `None`. Put
/// `#[serde(default)]` on the member too, so that leaving it out is `None` as well.
pub fn deserialize_optional_whole_number<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<i64>, D::Error> {
    deserializer.deserialize_option(OptionalWholeNumber)
}

struct WholeNumber;

impl<'de> Visitor<'de> for WholeNumber {
    type Value = i64;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an integer from -2^63 to 2^63 - 1")
    }

    fn visit_i64<E: de::Error>(self, integer: i64) -> Result<i64, E> {
        Ok(integer)
    }

    fn visit_u64<E: de::Error>(self, integer: u64) -> Result<i64, E> {
        i64::try_from(integer).map_err(|_| E::invalid_value(Unexpected::Unsigned(integer), &self))
    }

    fn visit_f64<E: de::Error>(self, float: f64) -> Result<i64, E> {
        whole_float(float).ok_or_else(|| E::invalid_value(Unexpected::Float(float), &self))
    }
}

struct OptionalWholeNumber;

impl<'de> Visitor<'de> for OptionalWholeNumber {
    type Value = Option<i64>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("null or an integer from -2^63 to 2^63 - 1")
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<i64>, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<i64>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<i64>, D::Error> {
        deserialize_whole_number(deserializer).map(Some)
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
    use serde_json::{Value, json};

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
    fn whole_numbers_are_integers() {
        let whole = |value: Value| match value {
            Value::Number(number) => whole_number(&number),
            other => panic!("{other} is not a number"),
        };
        assert_eq!(whole(json!(232)), Some(232));
        assert_eq!(whole(json!(232.0)), Some(232));
        assert_eq!(whole(json!(-0.0)), Some(0));
        assert_eq!(whole(json!(i64::MIN)), Some(i64::MIN));
        assert_eq!(whole(json!(i64::MAX)), Some(i64::MAX));
        assert_eq!(whole(json!(-9_223_372_036_854_775_808.0)), None);
        assert_eq!(
            whole(json!(-9_223_372_036_854_774_784.0)),
            Some(-9_223_372_036_854_774_784)
        );
        // The largest float below 2^63.
        assert_eq!(
            whole(json!(9_223_372_036_854_774_784.0)),
            Some(9_223_372_036_854_774_784)
        );
        assert_eq!(whole(json!(9_223_372_036_854_775_808.0)), None);
        assert_eq!(whole(json!(i64::MAX as u64 + 1)), None);
        assert_eq!(whole(json!(u64::MAX)), None);
        assert_eq!(whole(json!(1.5)), None);
        assert_eq!(whole(json!(-0.5)), None);
        assert_eq!(whole(json!(1e30)), None);
        let parsed = |text: &str| whole(serde_json::from_str(text).unwrap());
        assert_eq!(parsed("2e3"), Some(2000));
        assert_eq!(parsed("2E+3"), Some(2000));
        assert_eq!(parsed("25e-1"), None);
        assert_eq!(parsed("-1.0e0"), Some(-1));
        // Out of range, though serde_json rounds it to the float -2^63.
        assert_eq!(parsed("-9223372036854775809"), None);
        assert_eq!(parsed("-9223372036854776832"), None);
        assert_eq!(parsed("-9223372036854775808"), Some(i64::MIN));
    }

    #[derive(Debug, serde::Deserialize)]
    struct Typed {
        #[serde(deserialize_with = "deserialize_whole_number")]
        value: i64,
        #[serde(default, deserialize_with = "deserialize_optional_whole_number")]
        min: Option<i64>,
    }

    #[test]
    fn typed_bodies_take_whole_numbers() {
        let typed = |text: &str| serde_json::from_str::<Typed>(text).map(|t| (t.value, t.min));
        assert_eq!(typed(r#"{"value": 3}"#).unwrap(), (3, None));
        assert_eq!(typed(r#"{"value": 3.0, "min": null}"#).unwrap(), (3, None));
        assert_eq!(
            typed(r#"{"value": 2e3, "min": -1e1}"#).unwrap(),
            (2000, Some(-10))
        );
        assert_eq!(
            typed(r#"{"value": -9223372036854775808, "min": 9223372036854775807}"#).unwrap(),
            (i64::MIN, Some(i64::MAX))
        );
        // Through serde_json::Value too, as the routes read bodies.
        let from_value = serde_json::from_value::<Typed>(json!({"value": 232.0, "min": 5.0}));
        assert_eq!(
            from_value.map(|t| (t.value, t.min)).unwrap(),
            (232, Some(5))
        );
        for refused in [
            r#"{"value": 1.5}"#,
            r#"{"value": "3"}"#,
            r#"{"value": true}"#,
            r#"{"value": null}"#,
            r#"{"value": 9223372036854775808}"#,
            r#"{"value": -9223372036854775809}"#,
            r#"{"value": 1e30}"#,
            r#"{"value": 1, "min": 0.5}"#,
            r#"{"value": 1, "min": "0"}"#,
            r#"{"value": 1, "min": false}"#,
        ] {
            let error = typed(refused).unwrap_err().to_string();
            assert!(error.contains("an integer from"), "{refused}: {error}");
        }
        assert!(
            typed("{}")
                .unwrap_err()
                .to_string()
                .contains("missing field `value`")
        );
    }

    #[test]
    fn clamps_without_wrapping() {
        assert_eq!(clamp_to_i64(5), (5, false));
        assert_eq!(clamp_to_i64(i64::MAX as i128 + 1), (i64::MAX, true));
        assert_eq!(clamp_to_i64(i64::MIN as i128 - 1), (i64::MIN, true));
    }
}
