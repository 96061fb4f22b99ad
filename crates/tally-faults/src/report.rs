//! The markdown report: one table row per scenario and client mode, then the details that make a
//! failing row actionable.

use std::fmt::Write as _;

use crate::history::{ClientMode, seconds};
use crate::runner::{MemoryResult, ModeResult, ScenarioResult, SetResult};
use crate::wide::WideResult;

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
        if let Some(sets) = &result.sets {
            let _ = writeln!(out, "{}", sets_row(result, sets));
        }
        if let Some(wide) = &result.wide {
            let _ = writeln!(out, "{}", wide_row(result, wide));
        }
        if let Some(memory) = &result.memory {
            let _ = writeln!(out, "{}", memory_row(result, memory));
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "`increments`, `ok`, `failed`, `indeterminate` count attempts (a batch counts once per item; a retry is another attempt). \
         `expected` is the range the final PostgreSQL value must lie in (`=` when every increment was retried with its Idempotency-Key until acknowledged). \
         Values are summed over the mode's counters; each counter is checked on its own. \
         The first counter of every mode also gets admin sets, resets and imports: its increments applied are derived from the audit trail and its final value, and `expected` is moved by what the sets added to the final value. \
         `sets` rows count sets (an import sets several counters): `increments` requested, `ok` acknowledged, `expected` how many the audit trail holds and how many counters were checked against it. \
         `wide batches` rows sum 100,000 names, each checked on its own in PostgreSQL only; `aggregator memory` rows compare the aggregator's peak VmRSS during and after the PostgreSQL outage with its bound."
    );
    for result in results {
        details(&mut out, result);
    }
    out
}

fn row(result: &ScenarioResult, mode: &ModeResult) -> String {
    let attempts = &mode.attempts;
    let shift = mode.set_shift;
    let expected = match mode.mode {
        ClientMode::SingleAttempt | ClientMode::ConcurrentKeyReuse => format!(
            "{}..={}",
            mode.sums.acknowledged + shift,
            mode.sums.upper_bound() + shift
        ),
        ClientMode::RetryWithSameKey => format!("= {}", mode.sums.intended + shift),
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

fn sets_row(result: &ScenarioResult, sets: &SetResult) -> String {
    let set_violations: usize = sets.violations.len();
    let verdict = if set_violations > 0 {
        format!("FAIL ({set_violations} violations)")
    } else if sets.sets_lost + sets.sets_doubled > 0
        || sets.increments_lost + sets.increments_doubled > 0
    {
        "FAIL (see the modes' violations)".to_owned()
    } else if !result.drained {
        "FAIL (not drained)".to_owned()
    } else {
        "ok".to_owned()
    };
    format!(
        "| {} | sets | {} | {} | {} | {} | — | — | {} applied, {} counters | — | — | — | — | {} |",
        result.name,
        sets.tally.acknowledged + sets.tally.indeterminate + sets.tally.failed,
        sets.tally.acknowledged,
        sets.tally.failed,
        sets.tally.indeterminate,
        sets.applied,
        sets.counters_checked,
        verdict
    )
}

fn wide_row(result: &ScenarioResult, wide: &WideResult) -> String {
    let check = &wide.check;
    let verdict = if !check.violations.is_empty() {
        format!("FAIL ({} violations)", check.violations.len())
    } else if !result.drained {
        "FAIL (not drained)".to_owned()
    } else {
        "ok".to_owned()
    };
    format!(
        "| {} | wide batches | {} | {} | {} | {} | {} | 0 | {}..={} | {} | — | — | — | {} |",
        result.name,
        wide.attempts.attempts,
        wide.attempts.acknowledged,
        wide.attempts.failed,
        wide.attempts.indeterminate,
        wide.attempts.duplicates_absorbed,
        check.acknowledged_sum,
        check.acknowledged_sum + check.indeterminate_sum,
        check.postgres_sum,
        verdict
    )
}

fn memory_row(result: &ScenarioResult, memory: &MemoryResult) -> String {
    let mib =
        |kib: Option<u64>| kib.map_or_else(|| "—".to_owned(), |kib| format!("{} MiB", kib / 1024));
    let limit = memory.peaks.before.map_or_else(
        || "—".to_owned(),
        |before| {
            format!(
                "≤ {} MiB",
                before / 1024 + memory.bound.rss_growth_limit_mib
            )
        },
    );
    let worst = memory
        .peaks
        .during
        .into_iter()
        .chain(memory.peaks.after)
        .max();
    let verdict = if result.failures.is_empty() {
        "ok"
    } else {
        "FAIL (memory bound)"
    };
    format!(
        "| {} | aggregator memory | | | | | | | {limit} | peak {} (before {}) | | | | {verdict} |",
        result.name,
        mib(worst),
        mib(memory.peaks.before)
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
    if let Some(memory) = &result.memory {
        let mib = |kib: Option<u64>| {
            kib.map_or_else(|| "—".to_owned(), |kib| format!("{} MiB", kib / 1024))
        };
        let _ = writeln!(
            out,
            "- aggregator VmRSS peaks ({} samples, TALLY_AGGREGATOR_MAX_PENDING={}, bound: peak before + {} MiB): before the outage {}, during {}, after {}",
            memory.samples,
            memory.bound.max_pending_rows,
            memory.bound.rss_growth_limit_mib,
            mib(memory.peaks.before),
            mib(memory.peaks.during),
            mib(memory.peaks.after)
        );
    }
    for failure in &result.failures {
        let _ = writeln!(out, "- FAILED: {failure}");
    }
    if let Some(sets) = &result.sets {
        let _ = writeln!(out, "- {}", sets.summary());
        for (what, count) in &sets.tally.unexpected {
            let _ = writeln!(out, "- sets: unexpected answer: {what} × {count}");
        }
        for violation in sets.violations.iter().take(VIOLATIONS_SHOWN) {
            let _ = writeln!(out, "- sets: VIOLATION {violation}");
        }
    }
    if let Some(wide) = &result.wide {
        wide_details(out, wide);
    }
    for mode in &result.modes {
        let attempts = &mode.attempts;
        if attempts.key_in_flight > 0 || attempts.key_reused > 0 {
            let _ = writeln!(
                out,
                "- {}: 409 key in flight × {}, 422 key reused × {} (nothing counted)",
                mode.mode, attempts.key_in_flight, attempts.key_reused
            );
        }
        if !attempts.pair_answers.is_empty() {
            let answers: Vec<String> = attempts
                .pair_answers
                .iter()
                .map(|(answer, count)| format!("{answer} × {count}"))
                .collect();
            let _ = writeln!(
                out,
                "- {}: pairs answered {}",
                mode.mode,
                answers.join("; ")
            );
        }
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

fn wide_details(out: &mut String, wide: &WideResult) {
    let check = &wide.check;
    let _ = writeln!(
        out,
        "- wide batches: {} clients × batches of {} over {} names: {} batches acknowledged, {} failed, {} indeterminate; {} names acknowledged; PostgreSQL sum {} (acknowledged {}, indeterminate {})",
        wide.load.clients,
        wide.load.batch_items,
        wide.load.names,
        wide.batches.acknowledged,
        wide.batches.failed,
        wide.batches.indeterminate,
        check.names_acknowledged,
        check.postgres_sum,
        check.acknowledged_sum,
        check.indeterminate_sum
    );
    for (what, count) in &wide.attempts.unexpected {
        let _ = writeln!(out, "- wide batches: unexpected answer: {what} × {count}");
    }
    for violation in check.violations.iter().take(VIOLATIONS_SHOWN) {
        let _ = writeln!(out, "- wide batches: VIOLATION {violation}");
    }
    if check.violations.len() > VIOLATIONS_SHOWN {
        let _ = writeln!(
            out,
            "- wide batches: … and {} more violations",
            check.violations.len() - VIOLATIONS_SHOWN
        );
    }
}

fn optional(value: Option<i64>) -> String {
    value.map_or_else(|| "—".to_owned(), |value| value.to_string())
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '|'], " ")
}
