//! Counts as badges show them: `999`, `1.2k`, `12k`, `3.4M`, the metric prefixes shields.io
//! uses, so a badge stays short whatever the count.

const PREFIXES: [&str; 6] = ["k", "M", "G", "T", "P", "E"];

/// `value` with at most two significant digits before a metric prefix past 999, and one
/// decimal below 10 of a unit (`1.2k`, `12k`, `123k`, `1.2M`). Rounds down, so a badge never
/// shows more than was counted.
pub fn metric(value: i64) -> String {
    let sign = if value < 0 { "-" } else { "" };
    let magnitude = value.unsigned_abs();
    if magnitude < 1_000 {
        return format!("{sign}{magnitude}");
    }
    let mut unit: u64 = 1_000;
    for prefix in PREFIXES {
        let next = unit.saturating_mul(1_000);
        if magnitude < next || prefix == "E" {
            let whole = magnitude / unit;
            if whole < 10 {
                let tenths = magnitude % unit * 10 / unit;
                if tenths == 0 {
                    return format!("{sign}{whole}{prefix}");
                }
                return format!("{sign}{whole}.{tenths}{prefix}");
            }
            return format!("{sign}{whole}{prefix}");
        }
        unit = next;
    }
    unreachable!("the last prefix takes every magnitude left")
}

/// `value` in full, with thin groups (`1,234,567`).
pub fn full(value: i64) -> String {
    let digits = value.unsigned_abs().to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if value < 0 {
        grouped.push('-');
    }
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_keep_two_significant_digits_and_round_down() {
        let cases = [
            (0, "0"),
            (7, "7"),
            (999, "999"),
            (1_000, "1k"),
            (1_049, "1k"),
            (1_250, "1.2k"),
            (1_999, "1.9k"),
            (12_345, "12k"),
            (999_999, "999k"),
            (1_000_000, "1M"),
            (3_456_789, "3.4M"),
            (-1_250, "-1.2k"),
            (i64::MAX, "9.2E"),
            (i64::MIN, "-9.2E"),
        ];
        for (value, shown) in cases {
            assert_eq!(metric(value), shown, "{value}");
        }
    }

    #[test]
    fn full_counts_are_grouped_by_thousands() {
        assert_eq!(full(0), "0");
        assert_eq!(full(999), "999");
        assert_eq!(full(1_234_567), "1,234,567");
        assert_eq!(full(-1_000), "-1,000");
        assert_eq!(full(i64::MIN), "-9,223,372,036,854,775,808");
    }
}
