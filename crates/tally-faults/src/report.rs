//! The markdown report: one table row per scenario and client mode, then the details that make a
//! failing row actionable.

use std::fmt::Write as _;

use crate::history::{ClientMode, seconds};
use crate::runner::{ModeResult, ScenarioResult};

/// The most violations printed per scenario and mode; the count in the verdict is complete.
const VIOLATIONS_SHOWN: usize = 8;

pub fn markdown(results: &[ScenarioResult], header: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{header}\n");
    let _ = writeln!(
        out,
        "| scenario | mode | increments | ok | failed | indeterminate | duplicates absorbed | reads | expected | final postgres | final redis | final read | max read lag | verdict |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|"
    );
    for result in results {
        if let Some(error) = &result.harness_error {
            let _ = writeln!(
                out,
                "| {} | — | | | | | | | | | | | | ERROR: {} |",
                result.name,
                one_line(error)
            );
            continue;
        }
        for mode in &result.modes {
            let _ = writeln!(out, "{}", row(result, mode));
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "`increments`, `ok`, `failed`, `indeterminate` count attempts (a batch counts once per item; a retry is another attempt). \
         `expected` is the range the final PostgreSQL value must lie in (`=` when every increment was retried with its Idempotency-Key until acknowledged). \
         Values are summed over the mode's counters; each counter is checked on its own."
    );
    for result in results {
        details(&mut out, result);
    }
    out
}

fn row(result: &ScenarioResult, mode: &ModeResult) -> String {
    let attempts = &mode.attempts;
    let expected = match mode.mode {
        ClientMode::SingleAttempt => {
            format!("{}..={}", mode.sums.acknowledged, mode.sums.upper_bound())
        }
        ClientMode::RetryWithSameKey => format!("= {}", mode.sums.intended),
    };
    let lag = mode.max_lag.as_ref().map_or_else(
        || "—".to_owned(),
        |lag| format!("{} ({})", seconds(lag.lag), lag.source),
    );
    let verdict = if !mode.violations.is_empty() {
        format!("FAIL ({} violations)", mode.violations.len())
    } else if !result.drained {
        "FAIL (not drained)".to_owned()
    } else {
        "ok".to_owned()
    };
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        result.name,
        mode.mode,
        attempts.attempts,
        attempts.acknowledged,
        attempts.failed,
        attempts.indeterminate,
        attempts.duplicates_absorbed,
        mode.reads,
        expected,
        mode.postgres,
        optional(mode.redis),
        optional(mode.read),
        lag,
        verdict
    )
}

fn details(out: &mut String, result: &ScenarioResult) {
    let _ = writeln!(
        out,
        "\n### {}: {}\n\nran {:.0}s; drain {:.1}s{}",
        result.name,
        result.description,
        result.elapsed.as_secs_f64(),
        result.drain_waited.as_secs_f64(),
        if result.drained {
            ""
        } else {
            " (did not drain)"
        }
    );
    if !result.faults.is_empty() {
        let faults: Vec<String> = result
            .faults
            .iter()
            .map(|fault| {
                format!(
                    "{} {}–{}",
                    fault.kind.name(),
                    seconds(fault.started_at),
                    seconds(fault.healed_at)
                )
            })
            .collect();
        let _ = writeln!(out, "\n- faults: {}", faults.join("; "));
    }
    if let Some(error) = &result.harness_error {
        let _ = writeln!(out, "- harness error: {error}");
    }
    for note in &result.notes {
        let _ = writeln!(out, "- note: {note}");
    }
    for mode in &result.modes {
        for (what, count) in &mode.attempts.unexpected {
            let _ = writeln!(out, "- {}: unexpected answer: {what} × {count}", mode.mode);
        }
        if !mode.read_errors.is_empty() {
            let errors: Vec<String> = mode
                .read_errors
                .iter()
                .map(|(cause, count)| format!("{cause} × {count}"))
                .collect();
            let _ = writeln!(out, "- {}: failed reads: {}", mode.mode, errors.join(", "));
        }
        for violation in mode.violations.iter().take(VIOLATIONS_SHOWN) {
            let _ = writeln!(out, "- {}: VIOLATION {violation}", mode.mode);
        }
        if mode.violations.len() > VIOLATIONS_SHOWN {
            let _ = writeln!(
                out,
                "- {}: … and {} more violations",
                mode.mode,
                mode.violations.len() - VIOLATIONS_SHOWN
            );
        }
    }
}

fn optional(value: Option<i64>) -> String {
    value.map_or_else(|| "—".to_owned(), |value| value.to_string())
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '|'], " ")
}
