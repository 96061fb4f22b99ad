//! `tally-faults`: runs the fault scenarios against an isolated stack and prints the report.
//! Normally started by `deploy/faults.sh`, which brings that stack up and down.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use rand::Rng as _;
use tally_faults::checker::PipelineTiming;
use tally_faults::load::LoadSettings;
use tally_faults::report;
use tally_faults::runner::{ScenarioResult, Suite, run_scenario};
use tally_faults::scenarios::{Scenario, SuiteLength, all_scenarios};
use tally_faults::stack::{Stack, StackPorts};

/// Fault-injection suite for Tally: load, faults, and a Jepsen-style counter check.
#[derive(Debug, Parser)]
#[command(name = "tally-faults")]
struct Cli {
    /// The long version: about a minute of load per scenario, every fault repeated.
    #[arg(long)]
    long: bool,
    /// Run only this scenario (repeatable). Default: all of them.
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Seed of every random choice (load, fault order, gaps), to repeat a run. Default: random.
    #[arg(long)]
    seed: Option<u64>,
    /// The Tally binary to run.
    #[arg(long, default_value = "target/debug/tally")]
    tally_bin: PathBuf,
    /// deploy/local of this repository, whose up.sh/down.sh restart the stack's servers.
    #[arg(long, default_value = "deploy/local")]
    scripts_dir: PathBuf,
    /// The isolated stack's state directory (never the shared <repo>/.local).
    #[arg(long, env = "TALLY_LOCAL_DIR")]
    local_dir: Option<PathBuf>,
    #[arg(long, env = "TALLY_REDIS_PORT", default_value_t = 16380)]
    redis_port: u16,
    #[arg(long, env = "TALLY_PG_PORT", default_value_t = 15433)]
    postgres_port: u16,
    #[arg(long, env = "TALLY_KAFKA_PORT", default_value_t = 19092)]
    kafka_port: u16,
    #[arg(long, env = "TALLY_KAFKA_CONTROLLER_PORT", default_value_t = 19093)]
    kafka_controller_port: u16,
    /// Where the processes' logs and the report go. Default: <local-dir>/run.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("tally-faults: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn announce(scenario: &Scenario) {
    eprintln!("▶ {}: {}", scenario.name, scenario.description);
}

fn finished(result: ScenarioResult) -> ScenarioResult {
    eprintln!(
        "  {} {} in {:.0}s",
        result.name,
        if result.passed() { "passed" } else { "FAILED" },
        result.elapsed.as_secs_f64()
    );
    if let Some(sets) = &result.sets {
        eprintln!("  {}: {}", result.name, sets.summary());
    }
    result
}

/// `Ok(true)` when every scenario passed.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    let length = if cli.long {
        SuiteLength::Long
    } else {
        SuiteLength::Short
    };
    let seed = cli.seed.unwrap_or_else(|| rand::rng().random());
    let mut scenarios = all_scenarios(length, seed);
    if cli.list {
        for scenario in &scenarios {
            println!("{:<28} {}", scenario.name, scenario.description);
        }
        return Ok(true);
    }
    if !cli.scenarios.is_empty() {
        for wanted in &cli.scenarios {
            if !scenarios.iter().any(|scenario| scenario.name == wanted) {
                bail!("no scenario named {wanted:?} (see --list)");
            }
        }
        scenarios.retain(|scenario| cli.scenarios.iter().any(|wanted| wanted == scenario.name));
    }
    let local_dir = cli
        .local_dir
        .context("--local-dir (or TALLY_LOCAL_DIR) must name the isolated stack's directory")?;
    let work_dir = cli.work_dir.unwrap_or_else(|| local_dir.join("run"));
    std::fs::create_dir_all(&work_dir)?;
    // Run a private copy: other people rebuild target/*/tally while the suite runs, and a
    // process restarted by a fault must run the same code as the one it replaces.
    let tally_binary = work_dir.join("tally");
    std::fs::copy(&cli.tally_bin, &tally_binary).with_context(|| {
        format!(
            "copying the tally binary {} (build it with `cargo build -p tally`)",
            cli.tally_bin.display()
        )
    })?;
    let tally_binary = tally_binary.canonicalize()?;
    let stack = Stack::new(
        &cli.scripts_dir,
        &local_dir,
        StackPorts {
            redis: cli.redis_port,
            postgres: cli.postgres_port,
            kafka: cli.kafka_port,
            kafka_controller: cli.kafka_controller_port,
        },
        &work_dir.join("stack.log"),
    )?;
    let suite = Suite {
        stack,
        tally_binary,
        work_dir: work_dir.clone(),
        run_id: format!("{:06x}", rand::rng().random::<u32>() & 0xff_ffff),
        seed,
        load: LoadSettings::suite_default(),
        timing: PipelineTiming::SUITE,
        kafka_partitions: 3,
        drain_timeout: if cli.long {
            Duration::from_secs(180)
        } else {
            Duration::from_secs(90)
        },
    };
    let header = format!(
        "## Tally fault-injection suite ({}, seed {seed}, run {})",
        if cli.long { "long" } else { "short" },
        suite.run_id
    );
    eprintln!("{header}; logs in {}", work_dir.display());
    let suite = Arc::new(suite);
    let mut results = Vec::new();
    // First the scenarios whose faults stay within their own Tally processes, side by side:
    // they spend most of their time waiting (for a session timeout, a pause), so together they
    // take little longer than the longest of them. Then, one at a time, those that restart or
    // pause a server of the stack, which every scenario running at the time would feel.
    let (alongside, alone): (Vec<Scenario>, Vec<Scenario>) = scenarios
        .iter()
        .cloned()
        .partition(Scenario::can_run_alongside_others);
    let mut side_by_side = tokio::task::JoinSet::new();
    for scenario in alongside {
        announce(&scenario);
        let suite = Arc::clone(&suite);
        side_by_side.spawn(async move { finished(run_scenario(&suite, &scenario).await) });
    }
    while let Some(result) = side_by_side.join_next().await {
        results.push(result.context("a scenario panicked")?);
    }
    for scenario in alone {
        announce(&scenario);
        results.push(finished(run_scenario(&suite, &scenario).await));
    }
    // Report in the suite's order, whatever order they finished in.
    results.sort_by_key(|result| {
        scenarios
            .iter()
            .position(|scenario| scenario.name == result.name)
    });
    let markdown = report::markdown(&results, &header);
    println!("{markdown}");
    let report_path = work_dir.join("report.md");
    std::fs::write(&report_path, &markdown)?;
    eprintln!("report written to {}", report_path.display());
    Ok(results.iter().all(|result| result.passed()))
}
