//! What a comparison run found, as data (serialized to JSON as is) and as markdown tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::histogram::{LatencySummary, format_micros};
use crate::statements::StatementCounts;
use crate::svg::{PlotPoint, PlotSeries};

/// The scenario every ratio is relative to: one PostgreSQL row, durable commits.
pub const BASELINE_SCENARIO_ID: &str = "pg-row";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// When the run started, RFC 3339 UTC.
    pub started_at: String,
    /// Cores the operating system reports; everything (the load tool too) shares them.
    pub available_cores: usize,
    pub settings: RunSettings,
    pub scenarios: Vec<ScenarioReport>,
}

/// The knobs of a run, recorded so a table can be reproduced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSettings {
    pub phase_duration_secs: f64,
    pub settle_secs: f64,
    #[serde(default)]
    pub warm_up_secs: f64,
    pub clients: usize,
    pub sweep_fractions: Vec<f64>,
    pub fixed_rate_requests_per_second: Option<f64>,
    pub zipf_names: usize,
    pub zipf_exponent: f64,
    pub batch_size: usize,
    pub readers: usize,
    pub read_scenario_write_rate: f64,
    pub tally_window_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioReport {
    /// Short stable name, as given to `--scenarios`.
    pub id: String,
    pub title: String,
    pub phases: Vec<PhaseReport>,
    /// Only for the read scenarios: the readers' side.
    pub reads: Option<ReadReport>,
    pub check: CheckOutcome,
    /// The unmeasured load before the phases (Tally write scenarios only).
    #[serde(default)]
    pub warm_up: Option<PhaseReport>,
    /// Only for the Tally write scenarios, when `pg_stat_statements` is installed.
    #[serde(default)]
    pub postgres_statements: Option<StatementCounts>,
}

impl ScenarioReport {
    /// The phase that measured the most the system can take: the closed-loop one, or with
    /// `--rate` the only phase there is.
    pub fn throughput_phase(&self) -> Option<&PhaseReport> {
        self.phases
            .iter()
            .find(|phase| matches!(phase.pacing, Pacing::ClosedLoop { .. }))
            .or_else(|| self.phases.first())
    }

    pub fn failed(&self) -> bool {
        matches!(self.check, CheckOutcome::Failed { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pacing {
    /// `clients` workers, each sending its next request as soon as the previous one answered.
    ClosedLoop { clients: usize },
    /// A fixed arrival rate; latency counted from each request's due time.
    OpenLoop { target_requests_per_second: f64 },
}

/// One timed stretch of load at one pacing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseReport {
    pub pacing: Pacing,
    pub elapsed_secs: f64,
    pub requests_succeeded: u64,
    pub requests_failed: u64,
    /// Failed requests by reason ("http 503", "timeout", ...).
    pub failures: BTreeMap<String, u64>,
    /// Increments acknowledged (a batch or a pipeline acknowledges many per request).
    pub increments_acknowledged: u64,
    pub requests_per_second: f64,
    pub increments_per_second: f64,
    /// Of the succeeded requests only.
    pub latency: LatencySummary,
}

/// The readers' side of a read scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadReport {
    /// Whether the reads skipped Tally's in-process cache (`?fresh=true`).
    pub fresh_query: bool,
    pub readers: usize,
    pub reads_succeeded: u64,
    pub reads_failed: u64,
    pub reads_per_second: f64,
    pub read_latency: LatencySummary,
    /// Freshness lag in microseconds (see `freshness`): the summary of every read's lag.
    pub freshness_lag: LatencySummary,
    /// Share of reads that showed every increment acknowledged before they were sent.
    pub fully_fresh_fraction: f64,
    pub missing_increments_p50: i64,
    pub missing_increments_p99: i64,
    pub missing_increments_max: i64,
    /// How many reads came from each source (`cache`, `redis`, `postgres`).
    pub sources: BTreeMap<String, u64>,
}

/// Whether the durable store ended up with exactly the acknowledged total.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum CheckOutcome {
    Passed {
        acknowledged: i64,
        stored: i64,
        /// From the end of the load until the store showed the total.
        converged_after_secs: f64,
    },
    Failed {
        acknowledged: i64,
        stored: i64,
        detail: String,
    },
    Skipped {
        reason: String,
    },
}

/// `12345678` → `12,345,678`.
pub fn format_count(value: u64) -> String {
    let digits = value.to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (position, digit) in digits.chars().enumerate() {
        if position > 0 && (digits.len() - position) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

/// A rate for a table: whole numbers with thousands separators, one decimal under 100.
pub fn format_rate(per_second: f64) -> String {
    if per_second < 100.0 {
        format!("{per_second:.1}")
    } else {
        format_count(per_second.round() as u64)
    }
}

/// `8.3x`, `42x`, `0.47x`: two significant digits are all a shared 2-core machine supports.
pub fn format_ratio(ratio: f64) -> String {
    if ratio >= 10.0 {
        format!("{ratio:.0}x")
    } else if ratio >= 1.0 {
        format!("{ratio:.1}x")
    } else {
        format!("{ratio:.2}x")
    }
}

fn format_check(check: &CheckOutcome) -> String {
    match check {
        CheckOutcome::Passed {
            stored,
            converged_after_secs,
            ..
        } => format!(
            "PASS: stored = acknowledged = {} ({converged_after_secs:.1} s after load)",
            format_count((*stored).max(0) as u64)
        ),
        CheckOutcome::Failed {
            acknowledged,
            stored,
            detail,
        } => format!("**FAILED**: stored {stored} ≠ acknowledged {acknowledged}: {detail}"),
        CheckOutcome::Skipped { reason } => format!("not checked: {reason}"),
    }
}

fn format_failures(phase: &PhaseReport) -> String {
    if phase.requests_failed == 0 {
        return "0".to_string();
    }
    let reasons: Vec<String> = phase
        .failures
        .iter()
        .map(|(reason, count)| format!("{} {reason}", format_count(*count)))
        .collect();
    format!(
        "{} ({})",
        format_count(phase.requests_failed),
        reasons.join(", ")
    )
}

pub fn format_pacing(pacing: Pacing) -> String {
    match pacing {
        Pacing::ClosedLoop { clients } => format!("closed loop, {clients} clients"),
        Pacing::OpenLoop {
            target_requests_per_second,
        } => format!(
            "open loop, {} req/s",
            format_rate(target_requests_per_second)
        ),
    }
}

/// The markdown the run prints and writes: the throughput table with ratios to the baseline,
/// the open-loop latency table, and the read table when reads were measured.
pub fn markdown_report(report: &RunReport) -> String {
    let mut markdown = String::new();
    let baseline_increments_per_second = report
        .scenarios
        .iter()
        .find(|scenario| scenario.id == BASELINE_SCENARIO_ID && !scenario.failed())
        .and_then(ScenarioReport::throughput_phase)
        .map(|phase| phase.increments_per_second)
        .filter(|rate| *rate > 0.0);

    let settings = &report.settings;
    let _ = writeln!(
        markdown,
        "Run of {} on {} cores shared by everything; {} s per phase, {} clients, {} s of unmeasured warm-up before each Tally write scenario.\n",
        report.started_at,
        report.available_cores,
        settings.phase_duration_secs,
        settings.clients,
        settings.warm_up_secs
    );

    markdown.push_str("### Throughput\n\n");
    markdown.push_str(
        "| Scenario | Pacing | Increments/s | vs naive PG row | Requests/s | p50 | p99 | p99.9 | max | Failed requests | PostgreSQL / store check |\n",
    );
    markdown.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|---|---|\n");
    // The read scenarios write at a fixed rate on purpose; their row is in the read table.
    let write_scenarios = || {
        report
            .scenarios
            .iter()
            .filter(|scenario| scenario.reads.is_none())
    };
    for scenario in write_scenarios() {
        let Some(phase) = scenario.throughput_phase() else {
            continue;
        };
        // A fast number that lost counts is not a result: strike it and give no ratio.
        let (increments, ratio) = if scenario.failed() {
            (
                format!("~~{}~~", format_rate(phase.increments_per_second)),
                "FAILED".to_string(),
            )
        } else {
            let ratio = baseline_increments_per_second.map_or("n/a".to_string(), |baseline| {
                format_ratio(phase.increments_per_second / baseline)
            });
            (format_rate(phase.increments_per_second), ratio)
        };
        let _ = writeln!(
            markdown,
            "| {} | {} | {increments} | {ratio} | {} | {} | {} | {} | {} | {} | {} |",
            scenario.title,
            format_pacing(phase.pacing),
            format_rate(phase.requests_per_second),
            format_micros(phase.latency.p50_micros),
            format_micros(phase.latency.p99_micros),
            format_micros(phase.latency.p999_micros),
            format_micros(phase.latency.max_micros),
            format_failures(phase),
            format_check(&scenario.check),
        );
    }

    let open_loop_rows: Vec<(&ScenarioReport, &PhaseReport)> = write_scenarios()
        .flat_map(|scenario| scenario.phases.iter().map(move |phase| (scenario, phase)))
        .filter(|(_, phase)| matches!(phase.pacing, Pacing::OpenLoop { .. }))
        .collect();
    if !open_loop_rows.is_empty() {
        markdown.push_str(
            "\n### Latency at fixed arrival rates (open loop, measured from the intended send time)\n\n",
        );
        markdown.push_str(
            "| Scenario | Target req/s | Achieved req/s | Increments/s | p50 | p99 | p99.9 | max | Failed requests |\n",
        );
        markdown.push_str("|---|--:|--:|--:|--:|--:|--:|--:|---|\n");
        for (scenario, phase) in open_loop_rows {
            let Pacing::OpenLoop {
                target_requests_per_second,
            } = phase.pacing
            else {
                continue;
            };
            let _ = writeln!(
                markdown,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                scenario.title,
                format_rate(target_requests_per_second),
                format_rate(phase.requests_per_second),
                format_rate(phase.increments_per_second),
                format_micros(phase.latency.p50_micros),
                format_micros(phase.latency.p99_micros),
                format_micros(phase.latency.p999_micros),
                format_micros(phase.latency.max_micros),
                format_failures(phase),
            );
        }
    }

    let read_rows: Vec<(&ScenarioReport, &ReadReport)> = report
        .scenarios
        .iter()
        .filter_map(|scenario| scenario.reads.as_ref().map(|reads| (scenario, reads)))
        .collect();
    if !read_rows.is_empty() {
        markdown.push_str("\n### Reads of a hot counter while it is written\n\n");
        markdown.push_str(
            "| Scenario | Writes/s | Write p99 | Readers | Reads/s | Read p50 | Read p99 | Read p99.9 | Read max | Lag p50 | Lag p99 | Lag max | Fully fresh reads | Missing increments p99 | Sources | Failed reads | PostgreSQL check |\n",
        );
        markdown
            .push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|---|\n");
        for (scenario, reads) in read_rows {
            let sources: Vec<String> = reads
                .sources
                .iter()
                .map(|(source, count)| format!("{source} {}", format_count(*count)))
                .collect();
            let (writes_per_second, write_p99) =
                scenario
                    .phases
                    .first()
                    .map_or(("n/a".to_string(), "n/a".to_string()), |writes| {
                        (
                            format_rate(writes.increments_per_second),
                            format_micros(writes.latency.p99_micros),
                        )
                    });
            let _ = writeln!(
                markdown,
                "| {} | {writes_per_second} | {write_p99} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2}% | {} | {} | {} | {} |",
                scenario.title,
                reads.readers,
                format_rate(reads.reads_per_second),
                format_micros(reads.read_latency.p50_micros),
                format_micros(reads.read_latency.p99_micros),
                format_micros(reads.read_latency.p999_micros),
                format_micros(reads.read_latency.max_micros),
                format_micros(reads.freshness_lag.p50_micros),
                format_micros(reads.freshness_lag.p99_micros),
                format_micros(reads.freshness_lag.max_micros),
                reads.fully_fresh_fraction * 100.0,
                format_count(reads.missing_increments_p99.max(0) as u64),
                sources.join(", "),
                format_count(reads.reads_failed),
                format_check(&scenario.check),
            );
        }
    }

    let statement_rows: Vec<(&ScenarioReport, &StatementCounts)> = report
        .scenarios
        .iter()
        .filter_map(|scenario| {
            scenario
                .postgres_statements
                .as_ref()
                .map(|counts| (scenario, counts))
        })
        .collect();
    if !statement_rows.is_empty() {
        markdown.push_str(
            "\n### PostgreSQL statements while Tally was written (pg_stat_statements)\n\n",
        );
        markdown.push_str(
            "| Scenario | Increments | Seconds | Windows | Window upserts | Upserts per window | Increments per upsert | All statements | Statements by kind |\n",
        );
        markdown.push_str("|---|--:|--:|--:|--:|--:|--:|--:|---|\n");
        for (scenario, counts) in statement_rows {
            let upserts = counts.window_upserts();
            let kinds: Vec<String> = counts
                .statements
                .iter()
                .map(|statement| format!("{} {}", statement.label, format_count(statement.calls)))
                .collect();
            let _ = writeln!(
                markdown,
                "| {} | {} | {:.0} | {:.0} | {} | {:.2} | {} | {} | {} |",
                scenario.title,
                format_count(counts.increments),
                counts.elapsed_secs,
                counts.windows_elapsed(),
                format_count(upserts),
                upserts as f64 / counts.windows_elapsed().max(1.0),
                format_count(counts.increments / upserts.max(1)),
                format_count(counts.tally_calls()),
                kinds.join(", "),
            );
        }
    }

    let failed: Vec<&str> = report
        .scenarios
        .iter()
        .filter(|scenario| scenario.failed())
        .map(|scenario| scenario.id.as_str())
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(
            markdown,
            "\n**FAILED scenarios (stored total ≠ acknowledged total): {}**",
            failed.join(", ")
        );
    }
    markdown
}

/// The plot's data: one line per write scenario through all its phases. The read scenarios
/// are left out: their writes run at a fixed rate and their reads are not increments.
pub fn latency_vs_throughput_series(report: &RunReport) -> Vec<PlotSeries> {
    report
        .scenarios
        .iter()
        .filter(|scenario| scenario.reads.is_none())
        .map(|scenario| PlotSeries {
            label: if scenario.failed() {
                format!("{} (FAILED)", scenario.title)
            } else {
                scenario.title.clone()
            },
            points: scenario
                .phases
                .iter()
                .map(|phase| PlotPoint {
                    increments_per_second: phase.increments_per_second,
                    p99_millis: phase.latency.p99_micros as f64 / 1_000.0,
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(p50_micros: u64, p99_micros: u64) -> LatencySummary {
        LatencySummary {
            count: 100,
            mean_micros: p50_micros as f64,
            p50_micros,
            p99_micros,
            p999_micros: p99_micros * 2,
            max_micros: p99_micros * 3,
        }
    }

    fn phase(pacing: Pacing, increments_per_second: f64) -> PhaseReport {
        PhaseReport {
            pacing,
            elapsed_secs: 5.0,
            requests_succeeded: (increments_per_second * 5.0) as u64,
            requests_failed: 0,
            failures: BTreeMap::new(),
            increments_acknowledged: (increments_per_second * 5.0) as u64,
            requests_per_second: increments_per_second,
            increments_per_second,
            latency: latency(800, 4_000),
        }
    }

    fn passed(total: i64) -> CheckOutcome {
        CheckOutcome::Passed {
            acknowledged: total,
            stored: total,
            converged_after_secs: 9.5,
        }
    }

    fn scenario(id: &str, title: &str, increments_per_second: f64) -> ScenarioReport {
        ScenarioReport {
            id: id.to_string(),
            title: title.to_string(),
            phases: vec![
                phase(Pacing::ClosedLoop { clients: 64 }, increments_per_second),
                phase(
                    Pacing::OpenLoop {
                        target_requests_per_second: increments_per_second / 2.0,
                    },
                    increments_per_second / 2.0,
                ),
            ],
            postgres_statements: None,
            warm_up: None,
            reads: None,
            check: passed((increments_per_second * 5.0) as i64),
        }
    }

    fn run(scenarios: Vec<ScenarioReport>) -> RunReport {
        RunReport {
            started_at: "2026-01-01T00:00:00Z".to_string(),
            available_cores: 2,
            settings: RunSettings {
                phase_duration_secs: 5.0,
                settle_secs: 2.0,
                warm_up_secs: 5.0,
                clients: 64,
                sweep_fractions: vec![0.5],
                fixed_rate_requests_per_second: None,
                zipf_names: 100_000,
                zipf_exponent: 0.99,
                batch_size: 100,
                readers: 8,
                read_scenario_write_rate: 500.0,
                tally_window_ms: None,
            },
            scenarios,
        }
    }

    #[test]
    fn numbers_are_formatted_for_people() {
        assert_eq!(format_count(0), "0");
        assert_eq!(format_count(999), "999");
        assert_eq!(format_count(1_000), "1,000");
        assert_eq!(format_count(12_345_678), "12,345,678");
        assert_eq!(format_rate(42.25), "42.2");
        assert_eq!(format_rate(12_345.6), "12,346");
        assert_eq!(format_ratio(8.34), "8.3x");
        assert_eq!(format_ratio(41.6), "42x");
        assert_eq!(format_ratio(0.474), "0.47x");
    }

    #[test]
    fn the_throughput_table_gives_ratios_to_the_naive_postgres_row() {
        let markdown = markdown_report(&run(vec![
            scenario("pg-row", "Naive PG row", 1_000.0),
            scenario("tally-hot", "Tally hot counter", 8_300.0),
        ]));
        let table_rows: Vec<&str> = markdown
            .lines()
            .filter(|line| line.starts_with("| ") && line.contains("closed loop"))
            .collect();
        assert_eq!(table_rows.len(), 2, "{markdown}");
        assert!(
            table_rows[0].starts_with("| Naive PG row | closed loop, 64 clients | 1,000 | 1.0x |")
        );
        assert!(
            table_rows[1]
                .starts_with("| Tally hot counter | closed loop, 64 clients | 8,300 | 8.3x |")
        );
        assert!(table_rows[1].contains("| 800 µs | 4.0 ms | 8.0 ms | 12.0 ms |"));
        assert!(table_rows[1].contains("PASS: stored = acknowledged = 41,500"));
        // Each header has as many columns as its separator line and its rows.
        let header = markdown
            .lines()
            .find(|line| line.starts_with("| Scenario | Pacing"))
            .unwrap();
        let columns = header.matches('|').count();
        assert!(
            table_rows
                .iter()
                .all(|row| row.matches('|').count() == columns)
        );
    }

    #[test]
    fn open_loop_phases_get_their_own_table() {
        let markdown = markdown_report(&run(vec![scenario("redis-incr", "Redis INCR", 40_000.0)]));
        assert!(markdown.contains("### Latency at fixed arrival rates"));
        assert!(markdown.contains("| Redis INCR | 20,000 | 20,000 | 20,000 | 800 µs |"));
        assert!(!markdown.contains("### Reads"));
        // Without the baseline in the run there is nothing to divide by.
        assert!(markdown.contains("| 40,000 | n/a |"));
    }

    #[test]
    fn a_scenario_that_lost_counts_is_marked_failed_and_gets_no_ratio() {
        let mut lossy = scenario("tally-hot", "Tally hot counter", 9_000.0);
        lossy.check = CheckOutcome::Failed {
            acknowledged: 45_000,
            stored: 44_990,
            detail: "10 acknowledged increments missing after 60 s".to_string(),
        };
        let markdown = markdown_report(&run(vec![
            scenario("pg-row", "Naive PG row", 1_000.0),
            lossy,
        ]));
        let row = markdown
            .lines()
            .find(|line| line.starts_with("| Tally hot counter | closed"))
            .unwrap();
        assert!(row.contains("| ~~9,000~~ | FAILED |"), "{row}");
        assert!(row.contains("**FAILED**: stored 44990 ≠ acknowledged 45000"));
        assert!(
            markdown
                .contains("**FAILED scenarios (stored total ≠ acknowledged total): tally-hot**")
        );
    }

    #[test]
    fn the_plot_has_a_line_per_write_scenario_and_flags_failures() {
        let mut lossy = scenario("tally-zipf", "Tally Zipf", 2_000.0);
        lossy.check = CheckOutcome::Failed {
            acknowledged: 1,
            stored: 0,
            detail: "lost".to_string(),
        };
        let mut reads = scenario("tally-read-cached", "Tally reads", 500.0);
        reads.reads = Some(ReadReport {
            fresh_query: false,
            readers: 1,
            reads_succeeded: 0,
            reads_failed: 0,
            reads_per_second: 0.0,
            read_latency: LatencySummary::default(),
            freshness_lag: LatencySummary::default(),
            fully_fresh_fraction: 0.0,
            missing_increments_p50: 0,
            missing_increments_p99: 0,
            missing_increments_max: 0,
            sources: BTreeMap::new(),
        });
        let series = latency_vs_throughput_series(&run(vec![
            scenario("pg-row", "Naive PG row", 1_000.0),
            lossy,
            reads,
        ]));
        assert_eq!(series.len(), 2);
        assert_eq!(series[0].label, "Naive PG row");
        assert_eq!(series[1].label, "Tally Zipf (FAILED)");
        assert_eq!(
            series[0].points,
            vec![
                PlotPoint {
                    increments_per_second: 1_000.0,
                    p99_millis: 4.0
                },
                PlotPoint {
                    increments_per_second: 500.0,
                    p99_millis: 4.0
                },
            ]
        );
    }

    #[test]
    fn a_report_survives_a_json_round_trip_for_replotting() {
        let mut lossy = scenario("tally-hot", "Tally hot counter", 9_000.0);
        lossy.check = CheckOutcome::Failed {
            acknowledged: 2,
            stored: 1,
            detail: "lost one".to_string(),
        };
        let original = run(vec![scenario("pg-row", "Naive PG row", 1_000.0), lossy]);
        let json = serde_json::to_string(&original).unwrap();
        assert!(json.contains(r#""outcome":"failed""#));
        assert!(json.contains(r#""closed_loop":{"clients":64}"#));
        let parsed: RunReport = serde_json::from_str(&json).unwrap();
        assert_eq!(markdown_report(&parsed), markdown_report(&original));
    }

    #[test]
    fn failures_are_listed_by_reason() {
        let mut with_failures = scenario("tally-hot", "Tally hot counter", 100.0);
        with_failures.phases[0].requests_failed = 3;
        with_failures.phases[0].failures =
            BTreeMap::from([("http 503".to_string(), 2), ("timeout".to_string(), 1)]);
        let markdown = markdown_report(&run(vec![with_failures]));
        assert!(
            markdown.contains("| 3 (2 http 503, 1 timeout) |"),
            "{markdown}"
        );
    }

    #[test]
    fn read_scenarios_report_latency_and_freshness_lag() {
        let mut reads = scenario("tally-read", "Tally reads (cached)", 500.0);
        reads.reads = Some(ReadReport {
            fresh_query: false,
            readers: 8,
            reads_succeeded: 10_000,
            reads_failed: 0,
            reads_per_second: 2_000.0,
            read_latency: latency(300, 2_000),
            freshness_lag: latency(400_000, 1_100_000),
            fully_fresh_fraction: 0.125,
            missing_increments_p50: 150,
            missing_increments_p99: 560,
            missing_increments_max: 600,
            sources: BTreeMap::from([("cache".to_string(), 9_990), ("redis".to_string(), 10)]),
        });
        let markdown = markdown_report(&run(vec![reads]));
        let row = markdown
            .lines()
            .find(|line| line.starts_with("| Tally reads (cached) |"))
            .unwrap();
        // The writers' open-loop rate and p99 first, then the readers.
        assert!(
            row.starts_with("| Tally reads (cached) | 500 | 4.0 ms | 8 |"),
            "{row}"
        );
        assert!(
            row.contains("| 2,000 | 300 µs | 2.0 ms | 4.0 ms | 6.0 ms | 400 ms | 1.10 s | 3.30 s | 12.50% | 560 | cache 9,990, redis 10 | 0 | PASS"),
            "{row}"
        );
        // A read scenario's fixed write rate is not a throughput result.
        let rows_of_the_scenario = markdown
            .lines()
            .filter(|line| line.starts_with("| Tally reads (cached) |"))
            .count();
        assert_eq!(rows_of_the_scenario, 1, "{markdown}");
        assert!(!markdown.contains("### Latency at fixed arrival rates"));
    }
}
