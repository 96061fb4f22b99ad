//! Runs one phase of load: every worker on its own task, closed loop or open loop, and merges
//! what they measured.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::histogram::LatencyHistogram;
use crate::report::{Pacing, PhaseReport};
use crate::schedule::{OpenLoopSchedule, open_loop_latency};
use crate::targets::LoadTarget;

/// Longest wait for one answer. Past it the request counts as failed ("timeout"); it is far
/// above any healthy latency here, so it only cuts off a hung connection.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy)]
pub enum PhasePacing {
    /// Each worker sends its next request as soon as the previous one answered, until the
    /// phase's time is up.
    ClosedLoop,
    /// Requests are due on a fixed schedule; the workers take them in order. A request that
    /// found every worker busy at its due time is sent late and charged for the wait (see
    /// [`open_loop_latency`]).
    OpenLoop(OpenLoopSchedule),
}

/// What one worker measured in a phase.
#[derive(Default)]
struct WorkerTally {
    latency: LatencyHistogram,
    requests_succeeded: u64,
    increments_acknowledged: u64,
    failures: BTreeMap<String, u64>,
}

impl WorkerTally {
    async fn perform_and_record(
        &mut self,
        target: &mut LoadTarget,
        latency_measured_from: impl FnOnce() -> Duration,
    ) {
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, target.perform()).await;
        match outcome {
            Ok(Ok(increments)) => {
                self.latency.record(latency_measured_from());
                self.requests_succeeded += 1;
                self.increments_acknowledged += increments;
            }
            Ok(Err(reason)) => *self.failures.entry(reason).or_default() += 1,
            Err(_elapsed) => *self.failures.entry("timeout".to_string()).or_default() += 1,
        }
    }
}

/// Runs `targets` (one per worker) for one phase and gives them back for the next phase, so
/// connections are opened once per scenario.
pub async fn run_phase(
    targets: Vec<LoadTarget>,
    pacing: PhasePacing,
    duration: Duration,
) -> (Vec<LoadTarget>, PhaseReport) {
    let clients = targets.len();
    let phase_start = Instant::now();
    let deadline = phase_start + duration;
    let next_request_index = Arc::new(AtomicU64::new(0));

    let mut workers = Vec::with_capacity(clients);
    for mut target in targets {
        let next_request_index = Arc::clone(&next_request_index);
        workers.push(tokio::spawn(async move {
            let mut tally = WorkerTally::default();
            match pacing {
                PhasePacing::ClosedLoop => {
                    while Instant::now() < deadline {
                        let sent = Instant::now();
                        tally
                            .perform_and_record(&mut target, || sent.elapsed())
                            .await;
                    }
                }
                PhasePacing::OpenLoop(schedule) => loop {
                    let request_index = next_request_index.fetch_add(1, Ordering::Relaxed);
                    if request_index >= schedule.total_requests() {
                        break;
                    }
                    let due = schedule.due_offset(request_index);
                    let worker_free = phase_start.elapsed();
                    tokio::time::sleep_until((phase_start + due).into()).await;
                    let sent = phase_start.elapsed();
                    tally
                        .perform_and_record(&mut target, || {
                            open_loop_latency(due, worker_free, sent, phase_start.elapsed())
                        })
                        .await;
                },
            }
            (target, tally)
        }));
    }

    let mut targets = Vec::with_capacity(clients);
    let mut merged = WorkerTally::default();
    for worker in workers {
        let (target, tally) = worker.await.expect("a load worker panicked");
        targets.push(target);
        merged.latency.merge(&tally.latency);
        merged.requests_succeeded += tally.requests_succeeded;
        merged.increments_acknowledged += tally.increments_acknowledged;
        for (reason, count) in tally.failures {
            *merged.failures.entry(reason).or_default() += count;
        }
    }
    // Until the last answer: the tail of the phase is part of what it took.
    let elapsed_secs = phase_start.elapsed().as_secs_f64();
    let requests_failed = merged.failures.values().sum();
    let report = PhaseReport {
        pacing: match pacing {
            PhasePacing::ClosedLoop => Pacing::ClosedLoop { clients },
            PhasePacing::OpenLoop(schedule) => Pacing::OpenLoop {
                target_requests_per_second: schedule.requests_per_second(),
            },
        },
        elapsed_secs,
        requests_succeeded: merged.requests_succeeded,
        requests_failed,
        failures: merged.failures,
        increments_acknowledged: merged.increments_acknowledged,
        requests_per_second: merged.requests_succeeded as f64 / elapsed_secs,
        increments_per_second: merged.increments_acknowledged as f64 / elapsed_secs,
        latency: merged.latency.summary(),
    };
    (targets, report)
}
