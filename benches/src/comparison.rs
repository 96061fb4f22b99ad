//! One comparison run: every chosen scenario, one after the other, on this machine, with the
//! same load tool, so the ratios between them mean something even where absolute numbers
//! (on 2 shared cores) do not.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use rand::Rng as _;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection as _, Executor as _};

use crate::cli::{LoadgenArgs, ScenarioId};
use crate::driver::{PhasePacing, run_phase};
use crate::freshness::nearest_rank_percentile;
use crate::histogram::{LatencyHistogram, format_micros};
use crate::http1::Http1Connection;
use crate::report::{
    CheckOutcome, PhaseReport, ReadReport, RunReport, RunSettings, ScenarioReport, format_pacing,
    format_rate,
};
use crate::schedule::OpenLoopSchedule;
use crate::statements;
use crate::tally_server::{TallyServer, TallyServerSettings};
use crate::targets::{
    AcknowledgedTotals, CounterNames, LoadTarget, SharedTimeline, TallyWriteBook, worker_rng,
};

/// Everything the scenarios of one run share.
struct RunContext {
    args: LoadgenArgs,
    /// Random hex that names this run's database, topic, prefix, group, keys and counters.
    run_id: String,
    /// The run's own database: the baselines' tables, and the started Tally's schema.
    run_database_url: String,
    run_database: PgPool,
    /// A session in the stack's own database, where `pg_stat_statements` is installed.
    statistics: PgPool,
    redis: redis::Client,
}

/// Where the Tally being measured lives.
struct TallyEndpoint {
    base_url: String,
    database: PgPool,
    /// The name of that database, whose statements `pg_stat_statements` counts.
    database_name: String,
}

fn replace_database_name(url: &str, database: &str) -> anyhow::Result<String> {
    let (server, _) = url
        .rsplit_once('/')
        .context("the database URL should end in /DATABASE")?;
    Ok(format!("{server}/{database}"))
}

fn scenario_title(args: &LoadgenArgs, scenario: ScenarioId) -> String {
    match scenario {
        ScenarioId::PgRow => "Naive PG row (sync commit on)".to_string(),
        ScenarioId::PgRowAsync => "Naive PG row (sync commit off)".to_string(),
        ScenarioId::PgSharded => format!("PG {} sharded rows (sync commit on)", args.pg_shards),
        ScenarioId::RedisIncr => "Redis INCR".to_string(),
        ScenarioId::RedisIncrPipelined => {
            format!("Redis INCR, pipelined {} deep", args.redis_pipeline_depth)
        }
        ScenarioId::TallyHot => "Tally, one hot counter".to_string(),
        ScenarioId::TallyZipf => format!(
            "Tally, Zipf({}) over {} names",
            args.zipf_exponent,
            crate::report::format_count(args.zipf_names as u64)
        ),
        ScenarioId::TallyBatch => {
            format!("Tally batch API, {} per batch, Zipf names", args.batch_size)
        }
        ScenarioId::TallyReadCached => "Tally reads of a hot counter (cached)".to_string(),
        ScenarioId::TallyReadFresh => "Tally reads of a hot counter (?fresh=true)".to_string(),
        ScenarioId::StrictAdd => "Strict counter add (one PostgreSQL row)".to_string(),
        ScenarioId::StrictCas => {
            "Strict counter read + CAS, retried on mismatch (one PostgreSQL row)".to_string()
        }
    }
}

fn log_phase(scenario: ScenarioId, phase: &PhaseReport) {
    eprintln!(
        "[{}] {}: {} increments/s, {} requests/s, p50 {}, p99 {}, max {}, {} failed",
        scenario.name(),
        format_pacing(phase.pacing),
        format_rate(phase.increments_per_second),
        format_rate(phase.requests_per_second),
        format_micros(phase.latency.p50_micros),
        format_micros(phase.latency.p99_micros),
        format_micros(phase.latency.max_micros),
        phase.requests_failed
    );
}

/// What a Tally scenario waits for between phases: PostgreSQL holding everything acknowledged.
struct TallyCatchUp<'a> {
    database: &'a PgPool,
    names: &'a CounterNames,
    acknowledged: &'a AcknowledgedTotals,
}

/// Lets the system settle before a phase, so the aftermath of the previous one does not land in
/// it: a flat `--settle` pause (PostgreSQL checkpoints, Redis background saves), and for Tally
/// also the wait until the aggregator has written the previous phase to PostgreSQL. Without
/// it the first open-loop phase after a closed-loop burst measured mostly that burst's window
/// flush.
async fn settle_before_phase(context: &RunContext, catch_up: Option<&TallyCatchUp<'_>>) {
    tokio::time::sleep(context.args.settle).await;
    let Some(catch_up) = catch_up else {
        return;
    };
    let expected = catch_up.acknowledged.sum();
    let deadline = Instant::now() + context.args.convergence_timeout;
    while Instant::now() < deadline {
        let stored: Result<i64, _> = sqlx::query_scalar(
            "SELECT coalesce(sum(total), 0)::bigint FROM counters WHERE name LIKE $1",
        )
        .bind(catch_up.names.like_pattern())
        .fetch_one(catch_up.database)
        .await;
        // Equal, or past it (which the final check reports): either way nothing is pending.
        if stored.is_ok_and(|stored| stored >= expected) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("PostgreSQL did not catch up between phases; the final check will say more");
}

/// The closed-loop phase and the open-loop sweep after it (or the single `--rate` phase), each
/// after a settling pause.
async fn run_write_phases(
    context: &RunContext,
    scenario: ScenarioId,
    targets: Vec<LoadTarget>,
    catch_up: Option<&TallyCatchUp<'_>>,
) -> (Vec<LoadTarget>, Vec<PhaseReport>) {
    let duration = context.args.duration;
    let mut phases = Vec::new();
    settle_before_phase(context, catch_up).await;
    if let Some(rate) = context.args.rate {
        let (targets, phase) = run_phase(
            targets,
            PhasePacing::OpenLoop(OpenLoopSchedule::new(rate, duration)),
            duration,
        )
        .await;
        log_phase(scenario, &phase);
        phases.push(phase);
        return (targets, phases);
    }
    let (mut targets, closed_loop) = run_phase(targets, PhasePacing::ClosedLoop, duration).await;
    log_phase(scenario, &closed_loop);
    let maximum_requests_per_second = closed_loop.requests_per_second;
    phases.push(closed_loop);
    for fraction in &context.args.sweep_fractions {
        let rate = fraction * maximum_requests_per_second;
        let schedule = OpenLoopSchedule::new(rate.max(f64::MIN_POSITIVE), duration);
        if schedule.total_requests() == 0 {
            continue;
        }
        settle_before_phase(context, catch_up).await;
        let (returned, phase) = run_phase(targets, PhasePacing::OpenLoop(schedule), duration).await;
        targets = returned;
        log_phase(scenario, &phase);
        phases.push(phase);
    }
    (targets, phases)
}

fn acknowledged_in(phases: &[PhaseReport]) -> i64 {
    phases
        .iter()
        .map(|phase| phase.increments_acknowledged as i64)
        .sum()
}

fn failed_requests_in(phases: &[PhaseReport]) -> u64 {
    phases.iter().map(|phase| phase.requests_failed).sum()
}

/// A baseline's report: its store was written synchronously, so it must match at once.
fn baseline_report(
    context: &RunContext,
    scenario: ScenarioId,
    phases: Vec<PhaseReport>,
    stored: i64,
) -> ScenarioReport {
    let check = immediate_check(
        acknowledged_in(&phases),
        stored,
        failed_requests_in(&phases),
    );
    ScenarioReport {
        id: scenario.name(),
        title: scenario_title(&context.args, scenario),
        phases,
        reads: None,
        check,
        postgres_statements: None,
        warm_up: None,
    }
}

/// A baseline's check: its store was written synchronously, so it must match at once.
fn immediate_check(acknowledged: i64, stored: i64, failed_requests: u64) -> CheckOutcome {
    if acknowledged == stored {
        CheckOutcome::Passed {
            acknowledged,
            stored,
            converged_after_secs: 0.0,
        }
    } else {
        CheckOutcome::Failed {
            acknowledged,
            stored,
            detail: format!("{failed_requests} requests failed and may or may not have counted"),
        }
    }
}

async fn open_postgres_session(
    context: &RunContext,
    synchronous_commit: bool,
) -> anyhow::Result<PgConnection> {
    let mut connection = PgConnection::connect(&context.run_database_url).await?;
    if !synchronous_commit {
        // Per session, as an application would do it; the server default stays durable.
        connection.execute("SET synchronous_commit = off").await?;
    }
    Ok(connection)
}

async fn run_postgres_row_scenario(
    context: &RunContext,
    scenario: ScenarioId,
    synchronous_commit: bool,
) -> anyhow::Result<ScenarioReport> {
    let counter_name = scenario.name();
    sqlx::query("INSERT INTO naive_counters (name, count) VALUES ($1, 0)")
        .bind(&counter_name)
        .execute(&context.run_database)
        .await?;
    let mut targets = Vec::with_capacity(context.args.clients);
    for _ in 0..context.args.clients {
        targets.push(LoadTarget::PostgresSingleRow {
            connection: open_postgres_session(context, synchronous_commit).await?,
            counter_name: counter_name.clone(),
        });
    }
    let (targets, phases) = run_write_phases(context, scenario, targets, None).await;
    drop(targets);
    let stored: i64 = sqlx::query_scalar("SELECT count FROM naive_counters WHERE name = $1")
        .bind(&counter_name)
        .fetch_one(&context.run_database)
        .await?;
    Ok(baseline_report(context, scenario, phases, stored))
}

async fn run_postgres_sharded_scenario(context: &RunContext) -> anyhow::Result<ScenarioReport> {
    let scenario = ScenarioId::PgSharded;
    let counter_name = scenario.name();
    sqlx::query(
        "INSERT INTO sharded_counters (name, shard, count) \
         SELECT $1, shard, 0 FROM generate_series(0, $2 - 1) AS shard",
    )
    .bind(&counter_name)
    .bind(context.args.pg_shards)
    .execute(&context.run_database)
    .await?;
    let mut targets = Vec::with_capacity(context.args.clients);
    for worker_index in 0..context.args.clients {
        targets.push(LoadTarget::PostgresShardedRows {
            connection: open_postgres_session(context, true).await?,
            counter_name: counter_name.clone(),
            shards: context.args.pg_shards,
            rng: worker_rng(3, worker_index),
        });
    }
    let (targets, phases) = run_write_phases(context, scenario, targets, None).await;
    drop(targets);
    let stored: i64 =
        sqlx::query_scalar("SELECT sum(count)::bigint FROM sharded_counters WHERE name = $1")
            .bind(&counter_name)
            .fetch_one(&context.run_database)
            .await?;
    Ok(baseline_report(context, scenario, phases, stored))
}

fn redis_baseline_key(context: &RunContext, scenario: ScenarioId) -> String {
    format!("tally-bench:{}:{}", context.run_id, scenario.name())
}

async fn run_redis_scenario(
    context: &RunContext,
    scenario: ScenarioId,
    pipeline_depth: Option<usize>,
) -> anyhow::Result<ScenarioReport> {
    let key = redis_baseline_key(context, scenario);
    let mut targets = Vec::with_capacity(context.args.clients);
    for _ in 0..context.args.clients {
        // One connection per client, used for one request at a time: no implicit pipelining.
        let connection = context.redis.get_multiplexed_async_connection().await?;
        targets.push(match pipeline_depth {
            None => LoadTarget::RedisIncr {
                connection,
                key: key.clone(),
            },
            Some(depth) => LoadTarget::RedisPipelinedIncr {
                connection,
                key: key.clone(),
                depth,
            },
        });
    }
    let (targets, phases) = run_write_phases(context, scenario, targets, None).await;
    drop(targets);
    let mut connection = context.redis.get_multiplexed_async_connection().await?;
    let stored: Option<i64> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut connection)
        .await?;
    Ok(baseline_report(
        context,
        scenario,
        phases,
        stored.unwrap_or(0),
    ))
}

/// Waits until PostgreSQL holds exactly the acknowledged total of every name, as the
/// aggregator writes it once per window. Anything else after `timeout` is a failure: a fast
/// number that lost (or doubled) counts is not a result.
async fn wait_for_postgres_totals(
    database: &PgPool,
    names: &CounterNames,
    acknowledged: &AcknowledgedTotals,
    failed_requests: u64,
    timeout: Duration,
) -> anyhow::Result<CheckOutcome> {
    let load_ended = Instant::now();
    let expected = acknowledged.sum();
    let pattern = names.like_pattern();
    loop {
        let stored: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(total), 0)::bigint FROM counters WHERE name LIKE $1",
        )
        .bind(&pattern)
        .fetch_one(database)
        .await?;
        let waited = load_ended.elapsed();
        if stored == expected {
            return per_name_check(database, names, acknowledged, waited).await;
        }
        // PostgreSQL only ever grows here: past the acknowledged total it cannot come back.
        if stored > expected {
            return Ok(CheckOutcome::Failed {
                acknowledged: expected,
                stored,
                detail: format!(
                    "{} more than acknowledged; {failed_requests} requests failed and may have counted",
                    stored - expected
                ),
            });
        }
        if waited > timeout {
            return Ok(CheckOutcome::Failed {
                acknowledged: expected,
                stored,
                detail: format!(
                    "{} acknowledged increments still missing after {} s",
                    expected - stored,
                    timeout.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The sums match; now every single name must, too (a count on the wrong name is also lost).
async fn per_name_check(
    database: &PgPool,
    names: &CounterNames,
    acknowledged: &AcknowledgedTotals,
    waited: Duration,
) -> anyhow::Result<CheckOutcome> {
    let stored_by_name: HashMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT name, total FROM counters WHERE name LIKE $1")
            .bind(names.like_pattern())
            .fetch_all(database)
            .await?
            .into_iter()
            .collect();
    let mismatched_names = (0..names.count())
        .filter(|&index| {
            let stored = stored_by_name.get(&names.name(index)).copied().unwrap_or(0);
            stored != acknowledged.get(index)
        })
        .count();
    let total = acknowledged.sum();
    if mismatched_names == 0 {
        Ok(CheckOutcome::Passed {
            acknowledged: total,
            stored: total,
            converged_after_secs: waited.as_secs_f64(),
        })
    } else {
        Ok(CheckOutcome::Failed {
            acknowledged: total,
            stored: total,
            detail: format!("the sums agree but {mismatched_names} names hold a wrong total"),
        })
    }
}

fn tally_write_targets(
    context: &RunContext,
    tally: &TallyEndpoint,
    book: &TallyWriteBook,
    scenario_seed: u64,
    batch_size: Option<usize>,
) -> anyhow::Result<Vec<LoadTarget>> {
    (0..context.args.clients)
        .map(|worker_index| {
            let rng = worker_rng(scenario_seed, worker_index);
            let connection = Http1Connection::new(&tally.base_url)?;
            Ok(match batch_size {
                None => LoadTarget::TallyIncrement {
                    connection,
                    book: book.clone(),
                    rng,
                },
                Some(batch_size) => LoadTarget::TallyBatch {
                    connection,
                    book: book.clone(),
                    batch_size,
                    rng,
                    name_indexes: Vec::with_capacity(batch_size),
                },
            })
        })
        .collect()
}

/// `None` (with a note) when the counts cannot be had: they are evidence, not a requirement.
async fn statement_snapshot(
    context: &RunContext,
    tally: &TallyEndpoint,
) -> Option<statements::StatementSnapshot> {
    match statements::snapshot(&context.statistics, &tally.database_name).await {
        Ok(Some(snapshot)) => Some(snapshot),
        Ok(None) => {
            eprintln!("pg_stat_statements is not installed; no statement counts");
            None
        }
        Err(error) => {
            eprintln!("could not read pg_stat_statements: {error}");
            None
        }
    }
}

/// The database a `postgres://` URL names: its last path segment.
fn database_name_of(url: &str) -> anyhow::Result<String> {
    let without_query = url.split('?').next().unwrap_or(url);
    match without_query.rsplit_once('/') {
        Some((before, name)) if before.contains("//") && !name.is_empty() => Ok(name.to_string()),
        _ => anyhow::bail!("{url} names no database"),
    }
}

fn counter_prefix(context: &RunContext, scenario: ScenarioId) -> String {
    format!("bench-{}-{}", context.run_id, scenario.name())
}

async fn run_tally_write_scenario(
    context: &RunContext,
    tally: &TallyEndpoint,
    scenario: ScenarioId,
) -> anyhow::Result<ScenarioReport> {
    let prefix = counter_prefix(context, scenario);
    let (names, batch_size, seed) = match scenario {
        ScenarioId::TallyHot => (CounterNames::single_hot_counter(prefix), None, 5),
        ScenarioId::TallyZipf => (
            CounterNames::zipf(prefix, context.args.zipf_names, context.args.zipf_exponent),
            None,
            6,
        ),
        ScenarioId::TallyBatch => (
            CounterNames::zipf(prefix, context.args.zipf_names, context.args.zipf_exponent),
            Some(context.args.batch_size),
            7,
        ),
        other => anyhow::bail!("{} is not a Tally write scenario", other.name()),
    };
    let names = Arc::new(names);
    let acknowledged = Arc::new(AcknowledgedTotals::new(names.count()));
    let book = TallyWriteBook {
        names: Arc::clone(&names),
        acknowledged: Arc::clone(&acknowledged),
        timeline: None,
    };
    let targets = tally_write_targets(context, tally, &book, seed, batch_size)?;
    let catch_up = TallyCatchUp {
        database: &tally.database,
        names: &names,
        acknowledged: &acknowledged,
    };
    let statements_before = statement_snapshot(context, tally).await;
    let started = Instant::now();
    let (targets, warm_up) = if context.args.warm_up.is_zero() {
        (targets, None)
    } else {
        let (targets, warm_up) =
            run_phase(targets, PhasePacing::ClosedLoop, context.args.warm_up).await;
        eprintln!(
            "[{}] warm-up: {} increments/s, not measured",
            scenario.name(),
            format_rate(warm_up.increments_per_second)
        );
        (targets, Some(warm_up))
    };
    let (_targets, phases) = run_write_phases(context, scenario, targets, Some(&catch_up)).await;
    let warm_up_failures = warm_up.as_ref().map_or(0, |phase| phase.requests_failed);
    eprintln!(
        "[{}] waiting for PostgreSQL to hold the acknowledged total ({})",
        scenario.name(),
        acknowledged.sum()
    );
    let check = wait_for_postgres_totals(
        &tally.database,
        &names,
        &acknowledged,
        failed_requests_in(&phases) + warm_up_failures,
        context.args.convergence_timeout,
    )
    .await?;
    eprintln!("[{}] {check:?}", scenario.name());
    let postgres_statements = match (statements_before, statement_snapshot(context, tally).await) {
        (Some(before), Some(after)) => {
            let window_secs = context.args.tally_window_ms.unwrap_or(5_000) as f64 / 1_000.0;
            let counts = statements::difference(
                &before,
                &after,
                started.elapsed().as_secs_f64(),
                window_secs,
                acknowledged.sum() as u64,
            );
            eprintln!(
                "[{}] PostgreSQL statements: {} window upserts in {:.0} s ({} windows), {} statements in all",
                scenario.name(),
                counts.window_upserts(),
                counts.elapsed_secs,
                counts.windows_elapsed(),
                counts.tally_calls()
            );
            Some(counts)
        }
        _ => None,
    };
    Ok(ScenarioReport {
        id: scenario.name(),
        title: scenario_title(&context.args, scenario),
        phases,
        reads: None,
        check,
        postgres_statements,
        warm_up,
    })
}

/// Writers increment a hot counter at a fixed rate while readers read it as fast as they can;
/// every read is compared with the writers' acknowledgement timeline.
async fn run_tally_read_scenario(
    context: &RunContext,
    tally: &TallyEndpoint,
    scenario: ScenarioId,
) -> anyhow::Result<ScenarioReport> {
    let fresh_query = scenario == ScenarioId::TallyReadFresh;
    let names = Arc::new(CounterNames::single_hot_counter(counter_prefix(
        context, scenario,
    )));
    let acknowledged = Arc::new(AcknowledgedTotals::new(1));
    let timeline = SharedTimeline::new(Instant::now());
    let book = TallyWriteBook {
        names: Arc::clone(&names),
        acknowledged: Arc::clone(&acknowledged),
        timeline: Some(timeline.clone()),
    };
    let writers = tally_write_targets(context, tally, &book, 8, None)?;
    let counter_path = format!(
        "/v1/counters/{}{}",
        names.name(0),
        if fresh_query { "?fresh=true" } else { "" }
    );
    let readers = (0..context.args.readers)
        .map(|_| {
            Ok(LoadTarget::TallyRead {
                connection: Http1Connection::new(&tally.base_url)?,
                counter_path: counter_path.clone(),
                run_start: timeline.run_start,
                samples: Vec::new(),
                sources: BTreeMap::new(),
            })
        })
        .collect::<anyhow::Result<Vec<LoadTarget>>>()?;
    let duration = context.args.duration;
    let write_schedule = OpenLoopSchedule::new(context.args.read_scenario_write_rate, duration);
    settle_before_phase(context, None).await;
    let ((_writers, write_phase), (readers, read_phase)) = tokio::join!(
        run_phase(writers, PhasePacing::OpenLoop(write_schedule), duration),
        run_phase(readers, PhasePacing::ClosedLoop, duration),
    );
    log_phase(scenario, &write_phase);

    let timeline = timeline
        .timeline
        .lock()
        .expect("the writers are done")
        .clone();
    let mut lag = LatencyHistogram::new();
    let mut missing_increments = Vec::new();
    let mut sources = BTreeMap::new();
    for reader in readers {
        let LoadTarget::TallyRead {
            samples,
            sources: reader_sources,
            ..
        } = reader
        else {
            unreachable!("only readers were given to this phase");
        };
        for sample in samples {
            let sample_lag = timeline.lag_of_read(sample.sent_at, sample.value);
            lag.record(sample_lag.lag);
            missing_increments.push(sample_lag.missing_increments);
        }
        for (source, count) in reader_sources {
            *sources.entry(source).or_default() += count;
        }
    }
    missing_increments.sort_unstable();
    let fully_fresh_reads = missing_increments
        .iter()
        .filter(|&&missing| missing == 0)
        .count();
    let reads = ReadReport {
        fresh_query,
        readers: context.args.readers,
        reads_succeeded: read_phase.requests_succeeded,
        reads_failed: read_phase.requests_failed,
        reads_per_second: read_phase.requests_per_second,
        read_latency: read_phase.latency,
        freshness_lag: lag.summary(),
        fully_fresh_fraction: fully_fresh_reads as f64 / missing_increments.len().max(1) as f64,
        missing_increments_p50: nearest_rank_percentile(&missing_increments, 0.50),
        missing_increments_p99: nearest_rank_percentile(&missing_increments, 0.99),
        missing_increments_max: missing_increments.last().copied().unwrap_or(0),
        sources,
    };
    eprintln!(
        "[{}] reads: {} reads/s, p99 {}, lag p50 {} p99 {} max {}",
        scenario.name(),
        format_rate(reads.reads_per_second),
        format_micros(reads.read_latency.p99_micros),
        format_micros(reads.freshness_lag.p50_micros),
        format_micros(reads.freshness_lag.p99_micros),
        format_micros(reads.freshness_lag.max_micros)
    );
    let check = wait_for_postgres_totals(
        &tally.database,
        &names,
        &acknowledged,
        write_phase.requests_failed,
        context.args.convergence_timeout,
    )
    .await?;
    eprintln!("[{}] {check:?}", scenario.name());
    Ok(ScenarioReport {
        id: scenario.name(),
        title: scenario_title(&context.args, scenario),
        phases: vec![write_phase],
        reads: Some(reads),
        check,
        postgres_statements: None,
        warm_up: None,
    })
}

/// One strict counter written by every client. Synchronous in PostgreSQL, so it is checked at
/// once, like the baselines.
async fn run_strict_scenario(
    context: &RunContext,
    tally: &TallyEndpoint,
    scenario: ScenarioId,
) -> anyhow::Result<ScenarioReport> {
    use crate::strict::{StrictOperation, StrictScenario};
    let operation = match scenario {
        ScenarioId::StrictAdd => StrictOperation::Add,
        _ => StrictOperation::CompareAndSet,
    };
    let name = counter_prefix(context, scenario);
    let strict = StrictScenario::prepare(&tally.base_url, name, operation).await?;
    let targets = (0..context.args.clients)
        .map(|_| strict.target().map(LoadTarget::Strict))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (_targets, phases) = run_write_phases(context, scenario, targets, None).await;
    if operation == StrictOperation::CompareAndSet {
        let succeeded = acknowledged_in(&phases);
        eprintln!(
            "[{}] {} cas mismatches over all phases, {:.1} per successful cas",
            scenario.name(),
            strict.mismatches(),
            strict.mismatches() as f64 / succeeded.max(1) as f64
        );
    }
    let check = strict
        .check(acknowledged_in(&phases), failed_requests_in(&phases))
        .await?;
    eprintln!("[{}] {check:?}", scenario.name());
    Ok(ScenarioReport {
        id: scenario.name(),
        title: scenario_title(&context.args, scenario),
        phases,
        reads: None,
        check,
        postgres_statements: None,
        warm_up: None,
    })
}

async fn run_scenario(
    context: &RunContext,
    tally: Option<&TallyEndpoint>,
    scenario: ScenarioId,
) -> anyhow::Result<ScenarioReport> {
    eprintln!("[{}] starting", scenario.name());
    let tally = || tally.context("a Tally scenario needs a running Tally");
    match scenario {
        ScenarioId::PgRow => run_postgres_row_scenario(context, scenario, true).await,
        ScenarioId::PgRowAsync => run_postgres_row_scenario(context, scenario, false).await,
        ScenarioId::PgSharded => run_postgres_sharded_scenario(context).await,
        ScenarioId::RedisIncr => run_redis_scenario(context, scenario, None).await,
        ScenarioId::RedisIncrPipelined => {
            let depth = context.args.redis_pipeline_depth;
            run_redis_scenario(context, scenario, Some(depth)).await
        }
        ScenarioId::TallyHot | ScenarioId::TallyZipf | ScenarioId::TallyBatch => {
            run_tally_write_scenario(context, tally()?, scenario).await
        }
        ScenarioId::TallyReadCached | ScenarioId::TallyReadFresh => {
            run_tally_read_scenario(context, tally()?, scenario).await
        }
        ScenarioId::StrictAdd | ScenarioId::StrictCas => {
            run_strict_scenario(context, tally()?, scenario).await
        }
    }
}

/// Deletes every key matching `pattern`, a few hundred at a time.
async fn delete_redis_keys(redis: &redis::Client, pattern: &str) -> anyhow::Result<u64> {
    let mut connection = redis.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next_cursor, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1_000)
            .query_async(&mut connection)
            .await?;
        if !keys.is_empty() {
            deleted += keys.len() as u64;
            redis::cmd("DEL")
                .arg(&keys)
                .query_async::<i64>(&mut connection)
                .await?;
        }
        if next_cursor == 0 {
            return Ok(deleted);
        }
        cursor = next_cursor;
    }
}

fn run_settings(args: &LoadgenArgs) -> RunSettings {
    RunSettings {
        phase_duration_secs: args.duration.as_secs_f64(),
        settle_secs: args.settle.as_secs_f64(),
        warm_up_secs: args.warm_up.as_secs_f64(),
        clients: args.clients,
        sweep_fractions: args.sweep_fractions.clone(),
        fixed_rate_requests_per_second: args.rate,
        zipf_names: args.zipf_names,
        zipf_exponent: args.zipf_exponent,
        batch_size: args.batch_size,
        readers: args.readers,
        read_scenario_write_rate: args.read_scenario_write_rate,
        tally_window_ms: args.tally_window_ms,
    }
}

/// Runs every chosen scenario and returns what they measured. Tally's log goes to
/// `tally_log_file`. Everything the run created (database, Redis keys) is removed at the end
/// unless `--keep-data`; the Kafka topic stays, as Tally's own tests leave theirs.
pub async fn run_comparison(
    args: LoadgenArgs,
    tally_log_file: std::path::PathBuf,
) -> anyhow::Result<RunReport> {
    let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let run_id = format!("{:08x}", rand::rng().random::<u32>());
    let run_database_name = format!("tally_bench_{run_id}");
    let admin = PgPool::connect(&args.database_url).await.with_context(|| {
        format!(
            "connecting to {} (is deploy/local/up.sh running?)",
            args.database_url
        )
    })?;
    sqlx::query(&format!("CREATE DATABASE {run_database_name}"))
        .execute(&admin)
        .await?;
    let run_database_url = replace_database_name(&args.database_url, &run_database_name)?;
    eprintln!("run {run_id}: database {run_database_name}");

    let run_database = PgPoolOptions::new()
        .max_connections(2)
        .connect(&run_database_url)
        .await?;
    run_database
        .execute(
            "CREATE TABLE naive_counters (name text PRIMARY KEY, count bigint NOT NULL); \
             CREATE TABLE sharded_counters (name text, shard int, count bigint NOT NULL, \
                                            PRIMARY KEY (name, shard));",
        )
        .await?;
    let context = RunContext {
        redis: redis::Client::open(args.redis_url.as_str())?,
        args,
        run_id,
        run_database_url,
        run_database,
        statistics: admin.clone(),
    };

    let outcome = run_scenarios(&context, tally_log_file).await;

    if !context.args.keep_data {
        context.run_database.close().await;
        let dropped = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {run_database_name} WITH (FORCE)"
        ))
        .execute(&admin)
        .await;
        if let Err(error) = dropped {
            eprintln!("could not drop {run_database_name}: {error}");
        }
        for pattern in [
            format!("tally-bench:{}:*", context.run_id),
            format!("*tallybench{}:*", context.run_id),
        ] {
            match delete_redis_keys(&context.redis, &pattern).await {
                Ok(deleted) => eprintln!("deleted {deleted} Redis keys matching {pattern}"),
                Err(error) => eprintln!("could not delete Redis keys {pattern}: {error}"),
            }
        }
    }
    let scenarios = outcome?;
    Ok(RunReport {
        started_at,
        available_cores: std::thread::available_parallelism().map_or(1, usize::from),
        settings: run_settings(&context.args),
        scenarios,
    })
}

async fn run_scenarios(
    context: &RunContext,
    tally_log_file: std::path::PathBuf,
) -> anyhow::Result<Vec<ScenarioReport>> {
    let mut reports = Vec::new();
    // The baselines run before Tally starts, so they have the machine to themselves (but for the
    // stack, which runs all the time).
    for scenario in context
        .args
        .scenarios
        .iter()
        .filter(|scenario| !scenario.uses_tally())
    {
        reports.push(run_scenario(context, None, *scenario).await?);
    }
    let tally_scenarios: Vec<ScenarioId> = context
        .args
        .scenarios
        .iter()
        .copied()
        .filter(|scenario| scenario.uses_tally())
        .collect();
    if tally_scenarios.is_empty() {
        return Ok(reports);
    }

    let (endpoint, started_server) =
        match (&context.args.tally_url, &context.args.tally_database_url) {
            (Some(base_url), Some(database_url)) => (
                TallyEndpoint {
                    base_url: base_url.trim_end_matches('/').to_string(),
                    database: PgPool::connect(database_url).await?,
                    database_name: database_name_of(database_url)?,
                },
                None,
            ),
            _ => {
                let settings = TallyServerSettings {
                    binary: context.args.tally_bin.clone(),
                    database_url: context.run_database_url.clone(),
                    redis_url: context.args.redis_url.clone(),
                    redis_prefix: format!("tallybench{}", context.run_id),
                    kafka_topic: format!("tally.bench.{}", context.run_id),
                    aggregator_group: format!("tally-bench-{}", context.run_id),
                    window_ms: context.args.tally_window_ms,
                    log_file: tally_log_file,
                };
                eprintln!(
                    "starting {} (log: {})",
                    settings.binary.display(),
                    settings.log_file.display()
                );
                let server = TallyServer::start(&settings).await?;
                eprintln!("Tally ready at {}", server.base_url);
                let endpoint = TallyEndpoint {
                    base_url: server.base_url.clone(),
                    database_name: database_name_of(&context.run_database_url)?,
                    database: PgPoolOptions::new()
                        .max_connections(2)
                        .connect(&context.run_database_url)
                        .await?,
                };
                (endpoint, Some(server))
            }
        };
    let mut outcome = Ok(());
    for scenario in tally_scenarios {
        match run_scenario(context, Some(&endpoint), scenario).await {
            Ok(report) => reports.push(report),
            Err(error) => {
                outcome = Err(error);
                break;
            }
        }
    }
    endpoint.database.close().await;
    if let Some(server) = started_server {
        eprintln!("stopping Tally");
        server.stop().await;
    }
    outcome.map(|()| reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_the_last_path_segment() {
        assert_eq!(
            database_name_of("postgres://tally:tally@127.0.0.1:5432/tally_bench_1?sslmode=disable")
                .unwrap(),
            "tally_bench_1"
        );
        assert!(database_name_of("postgres://127.0.0.1:5432/").is_err());
    }

    #[test]
    fn the_run_database_replaces_the_last_path_segment() {
        assert_eq!(
            replace_database_name(
                "postgres://tally:tally@127.0.0.1:5432/tally",
                "tally_bench_1"
            )
            .unwrap(),
            "postgres://tally:tally@127.0.0.1:5432/tally_bench_1"
        );
        assert!(replace_database_name("no-slash", "x").is_err());
    }

    #[test]
    fn a_synchronous_baseline_must_match_at_once() {
        assert!(matches!(
            immediate_check(10, 10, 0),
            CheckOutcome::Passed { stored: 10, .. }
        ));
        assert!(matches!(
            immediate_check(10, 9, 1),
            CheckOutcome::Failed { stored: 9, .. }
        ));
    }
}
