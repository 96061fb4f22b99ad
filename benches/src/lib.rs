//! Benchmarks for Tally: the `loadgen` load tool and the comparison it runs (naive PostgreSQL
//! rows, raw Redis INCR, and Tally's write and read paths, side by side on one machine).
//!
//! The pure parts (Zipf sampler, histogram summary, open-loop schedule, freshness lag, report
//! writers) are unit tested; the rest drives the real local stack.

pub mod cli;
pub mod comparison;
pub mod driver;
pub mod freshness;
pub mod histogram;
pub mod http1;
pub mod report;
pub mod schedule;
pub mod statements;
pub mod strict;
pub mod svg;
pub mod tally_server;
pub mod targets;
pub mod zipf;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;

use crate::cli::LoadgenArgs;
use crate::report::{RunReport, latency_vs_throughput_series, markdown_report};
use crate::svg::latency_vs_throughput_svg;

fn default_output_dir(args: &LoadgenArgs) -> PathBuf {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "-");
    let duration = humantime::format_duration(args.duration)
        .to_string()
        .replace(' ', "");
    args.output_parent.join(format!("{stamp}-{duration}"))
}

/// Writes results.md and latency-vs-throughput.svg (and results.json unless it is the source)
/// into `output_dir`, and prints the markdown.
fn write_results(report: &RunReport, output_dir: &Path, write_json: bool) -> anyhow::Result<()> {
    let markdown = markdown_report(report);
    let svg = latency_vs_throughput_svg(
        "p99 latency vs throughput (one machine, one run)",
        &[
            "Rightmost point of each line: closed loop",
            "(maximum throughput; its latency is",
            "understated by coordinated omission).",
            "Other points: open loop at fixed rates,",
            "latency from the intended send time.",
        ],
        &latency_vs_throughput_series(report),
    );
    let mut files = vec![
        ("results.md", markdown.clone()),
        ("latency-vs-throughput.svg", svg),
    ];
    if write_json {
        files.push(("results.json", serde_json::to_string_pretty(report)? + "\n"));
    }
    for (file_name, contents) in files {
        let path = output_dir.join(file_name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{markdown}");
    println!("Results written to {}", output_dir.display());
    Ok(())
}

/// Runs `loadgen`: the comparison, then results.json, results.md and latency-vs-throughput.svg
/// in the output folder, and the markdown on stdout. Exit status 1 when a scenario FAILED.
pub async fn run_loadgen(args: LoadgenArgs) -> anyhow::Result<ExitCode> {
    let report = if let Some(results_json) = &args.from_json {
        let json = std::fs::read_to_string(results_json)
            .with_context(|| format!("reading {}", results_json.display()))?;
        let report: RunReport = serde_json::from_str(&json)
            .with_context(|| format!("parsing {}", results_json.display()))?;
        let output_dir = results_json.parent().unwrap_or(Path::new("."));
        write_results(&report, output_dir, false)?;
        report
    } else {
        let output_dir = args
            .output_dir
            .clone()
            .unwrap_or_else(|| default_output_dir(&args));
        std::fs::create_dir_all(&output_dir)
            .with_context(|| format!("creating {}", output_dir.display()))?;
        let report = comparison::run_comparison(args, output_dir.join("tally.log")).await?;
        write_results(&report, &output_dir, true)?;
        report
    };
    if report.scenarios.iter().any(report::ScenarioReport::failed) {
        eprintln!("FAILED: a stored total differs from the acknowledged total (see the table)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
