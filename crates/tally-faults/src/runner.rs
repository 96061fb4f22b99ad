//! Runs one scenario: fresh Tally processes on a fresh database, topic, consumer group and
//! Redis prefix; load from every client mode (and the wide load, where the scenario has one);
//! the scenario's faults; the drain; the checks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::postgres::PgPoolOptions;

use crate::checker::{
    FinalValues, IncrementSums, PipelineTiming, ReadLag, StalenessAllowances, Violation,
    check_final, check_final_with_sets, check_reads, check_reads_with_sets,
};
use crate::client::{AuditRow, TallyClient};
use crate::drain::{KafkaProgress, drain};
use crate::history::{AttemptTally, ClientMode, FaultKind, FaultRecord, seconds};
use crate::load::{ClientReport, ClientSetup, LoadSettings, counter_names, run_client};
use crate::memory::{AggregatorMemoryBound, RssPeaks, RssSample, bound_broken, peaks, sample_rss};
use crate::processes::{RoleSet, TallyProcess, TallySettings, wait_until_serving};
use crate::redis_faults::{
    EvictionTargets, evict_redis_keys, flush_redis_during_replay, restart_redis_from_snapshot,
};
use crate::scenarios::{FaultAction, Scenario};
use crate::sets::{
    ADMIN_TOKEN, SetClientReport, SetClientSetup, SetLoad, SetTally, match_sets, read_audit_trail,
    run_set_client,
};
use crate::stack::{Service, Stack};
use crate::wide::{
    WIDE_NAME_PATTERN, WideClientSetup, WideResult, WideTally, check_wide_totals, run_wide_client,
};

/// How long a fresh Tally may take to serve reads from Redis: migrations are done, but the
/// aggregator must join its group, run the first replay and close a first window.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a SIGTERMed Tally may take to stop (its own shutdown timeout is 10 s).
const SHUTDOWN_PATIENCE: Duration = Duration::from_secs(20);

/// How often the runner checks that no Tally process died on its own.
const SUPERVISION_INTERVAL: Duration = Duration::from_millis(250);

/// Everything the scenarios share.
pub struct Suite {
    pub stack: Stack,
    pub tally_binary: PathBuf,
    /// Logs of every process, one directory per scenario.
    pub work_dir: PathBuf,
    /// Makes databases, topics, groups and prefixes unique to this run.
    pub run_id: String,
    pub seed: u64,
    pub load: LoadSettings,
    pub timing: PipelineTiming,
    pub kafka_partitions: u32,
    pub drain_timeout: Duration,
}

/// One client mode's part of a scenario, summed over its counters.
#[derive(Debug, Clone)]
pub struct ModeResult {
    pub mode: ClientMode,
    pub attempts: AttemptTally,
    pub reads: usize,
    pub read_errors: BTreeMap<String, u64>,
    pub sums: IncrementSums,
    /// Sums over the counters; `None` when a store had no value for some counter.
    pub postgres: i64,
    pub redis: Option<i64>,
    pub read: Option<i64>,
    pub max_lag: Option<ReadLag>,
    pub violations: Vec<Violation>,
    /// Over the mode's counters with sets: final value minus the increments applied, which is
    /// what the sets added to the final value (so the expected range moves by it).
    pub set_shift: i64,
}

/// The set mode's part of a scenario: its requests, the audit trail, and the counters checked
/// against it.
#[derive(Debug, Clone, Default)]
pub struct SetResult {
    pub tally: SetTally,
    /// Audit rows matched to our requests.
    pub applied: usize,
    /// Every row of the trail, and the pages it took.
    pub trail_rows: usize,
    pub trail_pages: usize,
    /// Counters checked with the trail (those the set client targeted), the pieces of their
    /// logs between sets, and their reads bounded per set.
    pub counters_checked: usize,
    pub segments_checked: usize,
    pub reads_across_sets: usize,
    /// Over those counters: acknowledged increments missing from what the trail and the final
    /// totals say was applied, and what was applied beyond every increment that may count.
    pub increments_lost: i64,
    pub increments_doubled: i64,
    /// Acknowledged sets missing from the trail, and requests in it more than once.
    pub sets_lost: usize,
    pub sets_doubled: usize,
    /// Rows for counters the set client never set.
    pub violations: Vec<Violation>,
}

impl SetResult {
    /// One line: what the set mode sent, what the trail holds, and what the checks found.
    pub fn summary(&self) -> String {
        let requests: Vec<String> = self
            .tally
            .requests
            .iter()
            .map(|(kind, count)| format!("{count} {kind}"))
            .collect();
        format!(
            "sets ({}): {} acknowledged, {} indeterminate, {} failed; {} applied (audit trail: {} rows in {} page{}); {} counters checked ({} log segments, {} reads across sets): increments lost {}, doubled {}; sets lost {}, doubled {}",
            requests.join(", "),
            self.tally.acknowledged,
            self.tally.indeterminate,
            self.tally.failed,
            self.applied,
            self.trail_rows,
            self.trail_pages,
            if self.trail_pages == 1 { "" } else { "s" },
            self.counters_checked,
            self.segments_checked,
            self.reads_across_sets,
            self.increments_lost,
            self.increments_doubled,
            self.sets_lost,
            self.sets_doubled
        )
    }
}

#[derive(Debug, Clone)]
pub struct ScenarioResult {
    pub name: String,
    pub description: String,
    pub modes: Vec<ModeResult>,
    pub faults: Vec<FaultRecord>,
    /// Things worth a look that are not counting errors: a process that died on its own, a
    /// non-zero exit after SIGTERM, a drain that timed out.
    pub notes: Vec<String>,
    pub drained: bool,
    pub drain_waited: Duration,
    /// The harness itself failed (a fault could not be injected, Tally did not start).
    pub harness_error: Option<String>,
    pub elapsed: Duration,
    /// The wide load and its final check, where the scenario has one.
    pub wide: Option<WideResult>,
    /// The aggregator's memory around the PostgreSQL outage, where the scenario bounds it.
    pub memory: Option<MemoryResult>,
    /// Checks other than the counting rules that failed (the aggregator's memory bound).
    pub failures: Vec<String>,
    /// The set mode and the audit trail.
    pub sets: Option<SetResult>,
}

/// The aggregator's `VmRSS` peaks around the outage, and the bound they were held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryResult {
    pub bound: AggregatorMemoryBound,
    pub peaks: RssPeaks,
    pub samples: usize,
}

impl ScenarioResult {
    pub fn passed(&self) -> bool {
        self.harness_error.is_none()
            && self.drained
            && self.failures.is_empty()
            && self.modes.iter().all(|mode| mode.violations.is_empty())
            && self
                .wide
                .as_ref()
                .is_none_or(|wide| wide.check.violations.is_empty())
            && self
                .sets
                .as_ref()
                .is_none_or(|sets| sets.violations.is_empty())
    }
}

/// Runs `scenario` and checks it. Never panics on a Tally failure: everything ends up in the
/// result.
pub async fn run_scenario(suite: &Suite, scenario: &Scenario) -> ScenarioResult {
    let started = Instant::now();
    let mut result = ScenarioResult {
        name: scenario.name.to_owned(),
        description: scenario.description.clone(),
        modes: Vec::new(),
        faults: Vec::new(),
        notes: Vec::new(),
        drained: false,
        drain_waited: Duration::ZERO,
        harness_error: None,
        elapsed: Duration::ZERO,
        wide: None,
        memory: None,
        failures: Vec::new(),
        sets: None,
    };
    if let Err(error) = run_and_check(suite, scenario, &mut result).await {
        result.harness_error = Some(format!("{error:#}"));
    }
    result.elapsed = started.elapsed();
    result
}

/// The Tally processes of one scenario.
struct Processes {
    ingest: TallyProcess,
    aggregators: Vec<TallyProcess>,
}

impl Processes {
    async fn start(settings: &TallySettings, aggregators: usize) -> anyhow::Result<Self> {
        let mut started = Vec::new();
        for index in 0..aggregators {
            started.push(
                TallyProcess::start(
                    &format!("aggregator-{index}"),
                    RoleSet::Aggregator,
                    settings,
                )
                .await?,
            );
        }
        Ok(Processes {
            ingest: TallyProcess::start("ingest", RoleSet::IngestAndRead, settings).await?,
            aggregators: started,
        })
    }

    fn all_mut(&mut self) -> impl Iterator<Item = &mut TallyProcess> {
        std::iter::once(&mut self.ingest).chain(self.aggregators.iter_mut())
    }

    /// Acts as a supervisor: a process that exited without us stopping it is noted and started
    /// again.
    fn restart_the_exited(
        &mut self,
        clock: Instant,
        notes: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        for process in self.all_mut() {
            if let Some(status) = process.exited_by_itself() {
                notes.push(format!(
                    "{} exited by itself ({status}) at {}; restarted it (see its log)",
                    process.name,
                    seconds(clock.elapsed())
                ));
                process.spawn()?;
            }
        }
        Ok(())
    }

    async fn stop_all(&mut self, notes: &mut Vec<String>) {
        for process in self.all_mut() {
            if !process.is_running() {
                continue;
            }
            match process.terminate(SHUTDOWN_PATIENCE).await {
                Ok(status) if status.success() => {}
                Ok(status) => notes.push(format!(
                    "{} exited with {status} after SIGTERM at the end",
                    process.name
                )),
                Err(error) => {
                    notes.push(format!("{} could not be stopped: {error:#}", process.name))
                }
            }
        }
    }
}

async fn run_and_check(
    suite: &Suite,
    scenario: &Scenario,
    result: &mut ScenarioResult,
) -> anyhow::Result<()> {
    let scenario_dir = suite.work_dir.join(scenario.name);
    // Per scenario: scenarios running side by side have processes of the same names.
    let pid_dir = suite.work_dir.join("pids").join(scenario.name);
    std::fs::create_dir_all(&scenario_dir)?;
    std::fs::create_dir_all(&pid_dir)?;
    let isolation = format!("{}-{}", suite.run_id, scenario.name);
    let database = format!("faults_{}", isolation.replace('-', "_"));
    create_database(&suite.stack, &database).await?;
    let settings = TallySettings {
        binary: suite.tally_binary.clone(),
        redis_url: suite.stack.redis_url(),
        database_url: suite.stack.database_url(&database),
        kafka_brokers: suite.stack.kafka_brokers(),
        kafka_topic: format!("faults.{isolation}"),
        kafka_partitions: suite.kafka_partitions,
        redis_prefix: format!("faults-{isolation}"),
        aggregator_group: format!("faults-{isolation}"),
        timing: suite.timing,
        log_dir: scenario_dir,
        pid_dir,
        aggregator_max_pending: scenario
            .aggregator_memory
            .map(|bound| bound.max_pending_rows),
    };
    settings.migrate().await?;
    let mut processes = Processes::start(&settings, scenario.aggregators).await?;
    let tally = TallyClient::new(processes.ingest.base_url())?;
    wait_until_serving(&tally, STARTUP_TIMEOUT)
        .await
        .with_context(|| format!("see the logs in {}", settings.log_dir.display()))?;

    // The load, from every mode at once, while the faults run.
    let clock = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let _stop_sampling_on_any_exit = SetOnDrop(Arc::clone(&stop_sampling));
    // Sampled through the drain too: the catch-up after an outage is when a commit of
    // everything held at once would show.
    let memory_sampler = scenario.aggregator_memory.map(|_| {
        tokio::spawn(sample_rss(
            processes.aggregators[0].pid_path(),
            settings.binary.clone(),
            clock,
            Arc::clone(&stop_sampling),
        ))
    });
    let mut wide_clients = Vec::new();
    if let Some(load) = scenario.wide_load {
        for index in 0..load.clients {
            wide_clients.push(tokio::spawn(run_wide_client(WideClientSetup {
                index,
                load,
                tally: tally.clone(),
                stop: Arc::clone(&stop),
            })));
        }
    }
    let mut clients = Vec::new();
    for mode in ClientMode::ALL {
        for index in 0..suite.load.clients_per_mode {
            clients.push(tokio::spawn(run_client(ClientSetup {
                index,
                mode,
                tally: tally.clone(),
                settings: suite.load.clone(),
                clock,
                stop: Arc::clone(&stop),
                seed: suite.seed,
                key_prefix: isolation.clone(),
            })));
        }
    }
    // The set mode: one admin client over the first counter of every mode, so each mode's rules
    // meet sets, and its other counters keep the plain checks.
    let set_client = tokio::spawn(run_set_client(SetClientSetup {
        tally: tally.clone().with_admin_token(ADMIN_TOKEN),
        counters: set_counters(suite.load.counters_per_mode),
        load: SetLoad::SUITE,
        clock,
        stop: Arc::clone(&stop),
        seed: suite.seed,
        reason_prefix: isolation.clone(),
    }));
    let faults_outcome = run_faults(
        suite,
        scenario,
        &settings,
        &mut processes,
        &tally,
        clock,
        result,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut reports = Vec::new();
    for client in clients {
        reports.push(client.await.context("a load client panicked")?);
    }
    let set_report = set_client.await.context("the set client panicked")?;
    let mut wide_sent = scenario.wide_load.map(|load| WideTally::new(load.names));
    for client in wide_clients {
        let sent = client.await.context("a wide load client panicked")?;
        if let Some(wide_sent) = &mut wide_sent {
            wide_sent.merge(&sent);
        }
    }
    faults_outcome?;
    processes.restart_the_exited(clock, &mut result.notes)?;

    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&settings.database_url)
        .await?;
    let kafka = KafkaProgress::new(
        &settings.kafka_brokers,
        &settings.kafka_topic,
        settings.kafka_partitions,
        &settings.aggregator_group,
    )?;
    let all_counters: Vec<String> = ClientMode::ALL
        .iter()
        .flat_map(|mode| counter_names(*mode, suite.load.counters_per_mode))
        .collect();
    let drained = drain(
        &tally,
        &pool,
        &kafka,
        &all_counters,
        suite.timing.window,
        suite.drain_timeout + scenario.extra_drain_time,
    )
    .await;
    result.drained = drained.drained;
    result.drain_waited = drained.waited;
    if let Some(problem) = &drained.problem {
        result.notes.push(format!(
            "did not drain within {:.0}s: {problem}",
            drained.waited.as_secs_f64()
        ));
    }
    processes.restart_the_exited(clock, &mut result.notes)?;
    stop_sampling.store(true, Ordering::Relaxed);
    if let (Some(load), Some(sent)) = (scenario.wide_load, &wide_sent) {
        // One query for every wide name, after the drain (every Kafka record applied).
        let totals: Vec<(String, i64)> =
            sqlx::query_as("SELECT name, total FROM counters WHERE name LIKE $1")
                .bind(WIDE_NAME_PATTERN)
                .fetch_all(&pool)
                .await
                .context("reading the wide names' totals")?;
        result.wide = Some(WideResult {
            load,
            batches: sent.batches,
            attempts: sent.attempts.clone(),
            check: check_wide_totals(sent, &totals),
        });
    }
    // Read through the API, while the ingest still runs, once everything is applied.
    let (trail, trail_pages) = read_audit_trail(&tally.clone().with_admin_token(ADMIN_TOKEN))
        .await
        .context("reading the audit trail after the drain")?;
    processes.stop_all(&mut result.notes).await;
    pool.close().await;
    if let (Some(bound), Some(sampler)) = (scenario.aggregator_memory, memory_sampler) {
        let samples = sampler.await.context("the memory sampler panicked")?;
        check_memory(bound, &samples, result);
    }

    let allowances = StalenessAllowances::for_timing(&suite.timing);
    let mut sets = SetResult {
        tally: set_report.tally.clone(),
        trail_rows: trail.len(),
        trail_pages,
        ..SetResult::default()
    };
    for mode in ClientMode::ALL {
        result.modes.push(check_mode(
            mode,
            &reports,
            &result.faults,
            &drained.finals,
            &allowances,
            suite.load.counters_per_mode,
            (&set_report, &trail),
            &mut sets,
        ));
    }
    let targets = set_counters(suite.load.counters_per_mode);
    for row in trail.iter().filter(|row| !targets.contains(&row.counter)) {
        sets.violations.push(Violation::SetNotRequested {
            counter: row.counter.clone(),
            seq: row.seq,
            reason: row.reason.clone(),
        });
    }
    result.sets = Some(sets);
    Ok(())
}

/// The counters the set mode sets: the first of every mode's.
fn set_counters(counters_per_mode: usize) -> Vec<String> {
    ClientMode::ALL
        .iter()
        .filter_map(|mode| counter_names(*mode, counters_per_mode).into_iter().next())
        .collect()
}

/// Sets its flag when dropped, so a task it stops ends on every way out of a function.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Holds the aggregator's memory peaks around the scenario's PostgreSQL outage to `bound`.
fn check_memory(bound: AggregatorMemoryBound, samples: &[RssSample], result: &mut ScenarioResult) {
    let Some(outage) = result
        .faults
        .iter()
        .find(|fault| fault.kind == FaultKind::RestartPostgres)
    else {
        result
            .failures
            .push("no PostgreSQL outage to hold the aggregator's memory against".to_owned());
        return;
    };
    let peaks = peaks(samples, outage.started_at, outage.healed_at);
    if let Some(why) = bound_broken(&peaks, &bound) {
        result.failures.push(why);
    }
    result.memory = Some(MemoryResult {
        bound,
        peaks,
        samples: samples.len(),
    });
}

/// Creates the scenario's database, owned by `tally`, next to the stack's `tally` database.
async fn create_database(stack: &Stack, database: &str) -> anyhow::Result<()> {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&stack.database_url("tally"))
        .await
        .context("connecting to the suite's PostgreSQL")?;
    sqlx::query(&format!("CREATE DATABASE {database}"))
        .execute(&admin)
        .await
        .with_context(|| format!("creating database {database}"))?;
    admin.close().await;
    Ok(())
}

/// Runs the scenario's fault steps one after the other, then lets the load run on until its
/// minimum length and some time after the last fault healed. Records every fault in `result`.
async fn run_faults(
    suite: &Suite,
    scenario: &Scenario,
    settings: &TallySettings,
    processes: &mut Processes,
    tally: &TallyClient,
    clock: Instant,
    result: &mut ScenarioResult,
) -> anyhow::Result<()> {
    let mut last_healed = Duration::ZERO;
    for step in &scenario.steps {
        supervise_until(
            processes,
            clock,
            last_healed + step.gap_before,
            &mut result.notes,
        )
        .await?;
        let started_at = clock.elapsed();
        perform(
            suite,
            step.action,
            settings,
            processes,
            tally,
            &mut result.notes,
        )
        .await?;
        last_healed = clock.elapsed();
        result.faults.push(FaultRecord {
            kind: step.action.kind(),
            started_at,
            healed_at: last_healed,
        });
    }
    let load_until = scenario
        .min_load
        .max(last_healed + scenario.load_after_faults);
    supervise_until(processes, clock, load_until, &mut result.notes).await
}

/// Waits until `until` on the scenario clock, restarting any process that dies meanwhile.
async fn supervise_until(
    processes: &mut Processes,
    clock: Instant,
    until: Duration,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    loop {
        processes.restart_the_exited(clock, notes)?;
        let now = clock.elapsed();
        if now >= until {
            return Ok(());
        }
        tokio::time::sleep((until - now).min(SUPERVISION_INTERVAL)).await;
    }
}

async fn perform(
    suite: &Suite,
    action: FaultAction,
    settings: &TallySettings,
    processes: &mut Processes,
    tally: &TallyClient,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let stack = &suite.stack;
    match action {
        FaultAction::KillAggregator { which, down_for } => {
            let aggregator = &mut processes.aggregators[which];
            aggregator.kill_hard().await?;
            tokio::time::sleep(down_for).await;
            aggregator.spawn()?;
        }
        FaultAction::RestartKafka { down_for } => restart(stack, Service::Kafka, down_for).await?,
        FaultAction::RestartRedisEmpty { down_for } => {
            restart(stack, Service::Redis, down_for).await?
        }
        FaultAction::RestartPostgres { down_for } => {
            restart(stack, Service::Postgres, down_for).await?
        }
        FaultAction::SigtermIngest { down_for } => {
            let status = processes.ingest.terminate(SHUTDOWN_PATIENCE).await?;
            if !status.success() {
                notes.push(format!(
                    "ingest exited with {status} after SIGTERM under load"
                ));
            }
            tokio::time::sleep(down_for).await;
            processes.ingest.spawn()?;
            wait_until_answering(tally).await?;
        }
        FaultAction::KillIngest { down_for } => {
            processes.ingest.kill_hard().await?;
            tokio::time::sleep(down_for).await;
            processes.ingest.spawn()?;
            wait_until_answering(tally).await?;
        }
        FaultAction::PauseAggregator { which, paused_for } => {
            let aggregator = &mut processes.aggregators[which];
            aggregator.pause().await?;
            tokio::time::sleep(paused_for).await;
            aggregator.resume().await?;
        }
        FaultAction::PauseRedis { paused_for } => {
            stack.pause(Service::Redis).await?;
            tokio::time::sleep(paused_for).await;
            stack.resume(Service::Redis).await?;
        }
        FaultAction::PauseKafka { paused_for } => {
            stack.pause(Service::Kafka).await?;
            tokio::time::sleep(paused_for).await;
            stack.resume(Service::Kafka).await?;
        }
        FaultAction::RestartRedisFromSnapshot {
            snapshot_age,
            down_for,
        } => restart_redis_from_snapshot(stack, snapshot_age, down_for, notes).await?,
        FaultAction::EvictRedisKeys {
            filler_bytes,
            evicting_for,
        } => {
            let targets = EvictionTargets {
                redis_prefix: settings.redis_prefix.clone(),
                // One counter of each mode, so every mode's rules meet a counter whose keys
                // are all gone.
                counters: ClientMode::ALL
                    .iter()
                    .filter_map(|mode| {
                        counter_names(*mode, suite.load.counters_per_mode)
                            .into_iter()
                            .nth(1)
                    })
                    .collect(),
            };
            evict_redis_keys(stack, filler_bytes, evicting_for, &targets, notes).await?
        }
        FaultAction::FlushRedisDuringReplay {
            second_flush_after,
            third_flush_after,
        } => {
            let flush_again_after: Vec<Duration> = std::iter::once(second_flush_after)
                .chain(third_flush_after)
                .collect();
            flush_redis_during_replay(stack, settings, &flush_again_after, notes).await?
        }
    }
    Ok(())
}

/// A restarted ingest counts as healed once it answers `/healthz` again.
async fn wait_until_answering(tally: &TallyClient) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while !tally.answers_ok("/healthz").await {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the restarted ingest never answered /healthz"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn restart(stack: &Stack, service: Service, down_for: Duration) -> anyhow::Result<()> {
    stack.stop(service).await?;
    tokio::time::sleep(down_for).await;
    stack.start(service).await
}

/// Checks one mode's counters: every read against the bounds, every final value against the
/// sums; and sums everything up for the report.
#[allow(clippy::too_many_arguments)]
fn check_mode(
    mode: ClientMode,
    reports: &[ClientReport],
    faults: &[FaultRecord],
    finals: &BTreeMap<String, FinalValues>,
    allowances: &StalenessAllowances,
    counters_per_mode: usize,
    (set_report, trail): (&SetClientReport, &[AuditRow]),
    sets: &mut SetResult,
) -> ModeResult {
    let reports: Vec<&ClientReport> = reports
        .iter()
        .filter(|report| report.mode == mode)
        .collect();
    let mut result = ModeResult {
        mode,
        attempts: AttemptTally::default(),
        reads: 0,
        read_errors: BTreeMap::new(),
        sums: IncrementSums::default(),
        postgres: 0,
        redis: Some(0),
        read: Some(0),
        max_lag: None,
        violations: Vec::new(),
        set_shift: 0,
    };
    for report in &reports {
        result.attempts.merge(&report.attempts);
        result.violations.extend(report.violations.iter().cloned());
        result.reads += report.reads.len();
        for (cause, count) in &report.read_errors {
            *result.read_errors.entry(cause.clone()).or_default() += count;
        }
    }
    for counter in counter_names(mode, counters_per_mode) {
        let increments: Vec<_> = reports
            .iter()
            .flat_map(|report| &report.increments)
            .filter(|increment| increment.counter == counter)
            .cloned()
            .collect();
        let reads: Vec<_> = reports
            .iter()
            .flat_map(|report| &report.reads)
            .filter(|read| read.counter == counter)
            .cloned()
            .collect();
        let has_sets = set_report.sets.iter().any(|set| set.counter == counter);
        let matched = has_sets.then(|| match_sets(&counter, &set_report.sets, trail));
        let read_check = match &matched {
            Some(matched) => {
                check_reads_with_sets(&increments, &reads, &matched.applied, faults, allowances)
            }
            None => check_reads(&increments, &reads, faults, allowances),
        };
        result.violations.extend(read_check.violations);
        sets.reads_across_sets += read_check.reads_across_sets;
        if let Some(lag) = read_check.max_lag {
            if result.max_lag.as_ref().is_none_or(|max| lag.lag > max.lag) {
                result.max_lag = Some(lag);
            }
        }
        let sums = IncrementSums::of(&increments);
        result.sums.acknowledged += sums.acknowledged;
        result.sums.indeterminate += sums.indeterminate;
        result.sums.failed += sums.failed;
        result.sums.intended += sums.intended;
        result.sums.unresolved_count += sums.unresolved_count;
        // The drain saw every counter; a missing one means it could not observe the stores.
        let values = finals.get(&counter).copied().unwrap_or(FinalValues {
            postgres: 0,
            redis: None,
            read: None,
        });
        result.postgres += values.postgres;
        result.redis = result
            .redis
            .zip(values.redis)
            .map(|(sum, value)| sum + value);
        result.read = result.read.zip(values.read).map(|(sum, value)| sum + value);
        match matched {
            Some(matched) => {
                let check =
                    check_final_with_sets(mode, &counter, &increments, &matched.applied, &values);
                result.set_shift += values.postgres - check.applied_sum;
                sets.counters_checked += 1;
                sets.applied += matched.applied.len();
                sets.segments_checked += check.segments;
                sets.increments_lost += check.lost;
                sets.increments_doubled += check.doubled;
                for violation in &matched.violations {
                    match violation {
                        Violation::AcknowledgedSetNotApplied { .. } => sets.sets_lost += 1,
                        Violation::SetAppliedTwice { .. } => sets.sets_doubled += 1,
                        _ => {}
                    }
                }
                result.violations.extend(matched.violations);
                result.violations.extend(check.violations);
            }
            None => result
                .violations
                .extend(check_final(mode, &counter, &increments, &values)),
        }
    }
    result
}
