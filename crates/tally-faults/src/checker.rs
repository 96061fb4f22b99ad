//! The Jepsen counter rules, applied to one counter's history.
//!
//! With only positive increments, a read is correct when it lies between
//! - the **lower bound**: the sum of the acknowledged increments acknowledged more than the
//!   allowed staleness before the read started (a read may lag, but only by so much), and
//! - the **upper bound**: the sum of the acknowledged and indeterminate increments sent before
//!   the read completed (a read can never see an increment twice, or one not yet sent).
//!
//! After the load, once the pipeline has drained, the final value must lie in
//! `[sum acknowledged, sum acknowledged + sum indeterminate]`; when clients retried every
//! indeterminate increment with its idempotency key until it was acknowledged, it must equal the
//! exact sum of every intended increment.
//!
//! Idempotency answers (see [`crate::key_reuse`]): a `202` that is not a duplicate is
//! acknowledged; `409` (key in flight) and `422` (key reused) are failed, never counted; a `503`
//! or a timeout is indeterminate. A `202 {"duplicate": true}` for a use unlike every other use
//! of its key, and a `422` for a use exactly like the first one, are violations of their own.
//!
//! Counters with admin sets (see [`crate::sets`]): a set replaces everything before it in the
//! counter's log, so the value alone no longer sums the increments. The audit trail gives every
//! applied set, in log order, with the value right before it; with sets `s_1..s_k`, `new_0 = 0`,
//! the increments applied are `Σ (old_i − new_{i−1}) + (final − new_k)`, held to the same rules
//! as a counter without sets. Each term is also held to the increments that can lie between
//! those two sets in the log, from when they were acknowledged and sent ([`set_segments`]), which
//! catches an increment applied on the wrong side of a set and a wrong `old_value`. Reads are
//! bounded per set they may or may not see ([`check_reads_with_sets`]): a reset lowers a counter,
//! so the plain bounds hold only for reads before the counter's first set.

use std::fmt;
use std::time::Duration;

use crate::history::{
    AppliedSet, ClientMode, FaultRecord, IncrementOutcome, IncrementRecord, ReadRecord, seconds,
};

/// The Tally settings the allowances derive from. The runner passes the same values to every
/// Tally process it starts, so the checker and the system agree on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineTiming {
    /// `--window-ms`: the aggregator commits once per window.
    pub window: Duration,
    /// `--produce-timeout-ms`: no record of a window reaches Kafka later than this after it.
    pub produce_timeout: Duration,
    /// `--clock-skew-ms`: windows close this much later still.
    pub clock_skew: Duration,
    /// `--read-cache-ttl-ms`: a `cache` read is at most this old.
    pub read_cache_ttl: Duration,
    /// The aggregator's Kafka `session.timeout.ms` (fixed at 10 s in tally-aggregator). A member
    /// killed with `kill -9` keeps its partitions until its session expires, so a restarted
    /// aggregator may wait this long before it consumes again.
    pub aggregator_session_timeout: Duration,
}

impl PipelineTiming {
    /// The suite's settings: short windows so every scenario drains in seconds.
    pub const SUITE: PipelineTiming = PipelineTiming {
        window: Duration::from_millis(1_000),
        produce_timeout: Duration::from_millis(2_000),
        clock_skew: Duration::from_millis(200),
        read_cache_ttl: Duration::from_millis(1_000),
        aggregator_session_timeout: Duration::from_secs(10),
    };

    /// A window closes this long after it ends: every record stamped with it is in Kafka by then.
    pub fn window_close_delay(&self) -> Duration {
        self.produce_timeout + self.clock_skew
    }
}

/// Time this 2-core machine, shared with other test runs, may add between an event and our
/// clock reading: an HTTP round trip, a task waiting for a CPU.
pub const SCHEDULING_SLACK: Duration = Duration::from_secs(1);

/// Extra time for the aggregator's commit of a closed window to reach PostgreSQL: one
/// transaction plus the Redis summary copies, on a loaded machine.
pub const COMMIT_SLACK: Duration = Duration::from_secs(3);

/// Time for a restarted Tally process to start, connect to the stores and load its topic
/// metadata before it does anything useful.
pub const PROCESS_START_SLACK: Duration = Duration::from_secs(3);

/// `TALLY_REDIS_TIMEOUT_MS` (500 ms by default): an `INCRBY` begun just before a Redis fault
/// healed may still fail this much later.
pub const REDIS_COMMAND_TIMEOUT: Duration = Duration::from_millis(500);

/// How far behind the increments a read may be. Every allowance is explicit, with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StalenessAllowances {
    /// A read that is not flagged stale (`redis`, or a `cache` copy of one): Redis has an
    /// acknowledged increment before its `202`, so only the read cache's TTL separates them.
    pub fresh_read: Duration,
    /// A read flagged `stale: true` (`postgres`, or a `cache` copy of one), and any read of an
    /// increment whose Redis delta may have been lost to a Redis fault: PostgreSQL has an
    /// increment once its window has closed and the aggregator has committed it.
    pub stale_read: Duration,
    /// An increment acknowledged up to this long after a Redis fault healed may still have lost
    /// its Redis delta.
    pub redis_delta_loss_margin: Duration,
    /// Added, on top of the fault's own length, for every fault that stalled the aggregation
    /// between an increment's acknowledgement and a read that depends on PostgreSQL.
    pub aggregation_recovery: Duration,
}

impl StalenessAllowances {
    pub fn for_timing(timing: &PipelineTiming) -> Self {
        StalenessAllowances {
            fresh_read: timing.read_cache_ttl + SCHEDULING_SLACK,
            // The increment's own window (up to one window long), the close delay, one more
            // window because the aggregator commits once per window, and the commit itself.
            stale_read: timing.window
                + timing.window_close_delay()
                + timing.window
                + COMMIT_SLACK
                + SCHEDULING_SLACK,
            redis_delta_loss_margin: REDIS_COMMAND_TIMEOUT + SCHEDULING_SLACK,
            // A killed aggregator's partitions are handed over only when its session expires.
            aggregation_recovery: timing.aggregator_session_timeout + PROCESS_START_SLACK,
        }
    }

    /// How long after `acked_at` the increment must show in `read`, given the faults injected.
    pub fn allowed_staleness(
        &self,
        acked_at: Duration,
        read: &ReadRecord,
        faults: &[FaultRecord],
    ) -> Duration {
        let redis_delta_may_be_lost = self.redis_delta_may_be_lost(acked_at, faults);
        self.allowed_staleness_knowing(acked_at, redis_delta_may_be_lost, read, faults)
    }

    /// Whether an increment acknowledged at `acked_at` may have lost its Redis delta to a Redis
    /// fault (the ingest's `INCRBY` failed, yet it answered `202`; or the delta was evicted,
    /// flushed, or written after the snapshot Redis came back from).
    ///
    /// A fault that can silently lose deltas written before it began (eviction) reaches back by
    /// `stale_read`: a read depends on a delta only until the delta's window has closed and the
    /// aggregator has committed it, which is what `stale_read` bounds. Older increments are in
    /// PostgreSQL and in their counter's summary, and a read missing them is wrong.
    pub fn redis_delta_may_be_lost(&self, acked_at: Duration, faults: &[FaultRecord]) -> bool {
        faults.iter().any(|fault| {
            let reach_back = if fault.kind.may_drop_redis_deltas_written_before_it() {
                self.stale_read
            } else {
                Duration::ZERO
            };
            fault.kind.may_drop_redis_deltas()
                && acked_at + reach_back >= fault.started_at
                && acked_at <= fault.healed_at + self.redis_delta_loss_margin
        })
    }

    /// [`Self::allowed_staleness`], with [`Self::redis_delta_may_be_lost`] already known (the
    /// checker works it out once per increment, not once per read).
    fn allowed_staleness_knowing(
        &self,
        acked_at: Duration,
        redis_delta_may_be_lost: bool,
        read: &ReadRecord,
        faults: &[FaultRecord],
    ) -> Duration {
        if !read.stale && !redis_delta_may_be_lost {
            // Served from Redis's deltas: the aggregator's progress does not matter.
            return self.fresh_read;
        }
        // The value depends on what the aggregator committed to PostgreSQL, which stops moving
        // while a fault stalls the aggregation: credit every such fault between the
        // acknowledgement and the read.
        let stalled: Duration = faults
            .iter()
            .filter(|fault| {
                fault.kind.stalls_aggregation()
                    && fault.started_at < read.invoked_at
                    && fault.healed_at + self.aggregation_recovery > acked_at
            })
            .map(|fault| {
                fault.healed_at.saturating_sub(fault.started_at) + self.aggregation_recovery
            })
            .sum();
        self.stale_read + stalled
    }
}

/// The sums the final value is checked against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IncrementSums {
    pub acknowledged: i64,
    pub indeterminate: i64,
    pub failed: i64,
    /// Every increment a client meant to make, whatever became of it.
    pub intended: i64,
    /// How many increments did not end acknowledged.
    pub unresolved_count: usize,
}

impl IncrementSums {
    pub fn of(increments: &[IncrementRecord]) -> Self {
        let mut sums = IncrementSums::default();
        for increment in increments {
            sums.intended += increment.by;
            match increment.outcome {
                IncrementOutcome::Acknowledged { .. } => sums.acknowledged += increment.by,
                IncrementOutcome::Indeterminate => {
                    sums.indeterminate += increment.by;
                    sums.unresolved_count += 1;
                }
                IncrementOutcome::Failed => {
                    sums.failed += increment.by;
                    sums.unresolved_count += 1;
                }
            }
        }
        sums
    }

    /// The highest value the counter may have: every acknowledged and indeterminate increment.
    pub fn upper_bound(&self) -> i64 {
        self.acknowledged + self.indeterminate
    }
}

/// The counter's value in each store once the load stopped and the pipeline drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinalValues {
    /// `SELECT total FROM counters WHERE name = $1` (0 when the row does not exist).
    pub postgres: i64,
    /// A `?fresh=true` read that came from Redis, if any did.
    pub redis: Option<i64>,
    /// A plain read (cache allowed), if any succeeded.
    pub read: Option<i64>,
}

/// A rule the history broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A read missed increments acknowledged longer ago than the allowed staleness.
    ReadBelowLowerBound {
        counter: String,
        read: ReadRecord,
        lower_bound: i64,
    },
    /// A read saw more than every increment sent so far: something was counted twice, or
    /// counted though it failed.
    ReadAboveUpperBound {
        counter: String,
        read: ReadRecord,
        upper_bound: i64,
    },
    /// The drained value misses acknowledged increments.
    LostIncrements {
        counter: String,
        final_value: i64,
        acknowledged_sum: i64,
    },
    /// The drained value is more than every acknowledged and indeterminate increment.
    CountedTwice {
        counter: String,
        final_value: i64,
        upper_bound: i64,
    },
    /// Retried with the same idempotency key until acknowledged, yet not counted exactly once.
    NotExactAfterRetries {
        counter: String,
        final_value: i64,
        intended_sum: i64,
    },
    /// Retries with the same idempotency key never got a `202`.
    UnacknowledgedAfterRetries {
        counter: String,
        unresolved_count: usize,
    },
    /// After the drain, PostgreSQL, a fresh Redis read and a plain read did not agree.
    StoresDisagree {
        counter: String,
        values: FinalValues,
    },
    /// A use of an idempotency key unlike every other use of it (another counter or amount) was
    /// answered `202 {"duplicate": true}`: the client was told it was counted, the first time,
    /// when no use of the key was that increment.
    DuplicateOfADifferentUse {
        counter: String,
        by: i64,
        key: String,
        answered_at: Duration,
    },
    /// A use with the same counter and amount as the key's first use (a retry) was refused with
    /// `422` as if it were a reuse for another increment.
    IdenticalUseRefusedAsReused {
        /// The counter, or the batch's counters.
        counter: String,
        answered_at: Duration,
        /// Tally's problem detail.
        detail: String,
    },
    /// A counter with sets: the increments the audit trail and the final total say were applied
    /// miss acknowledged increments.
    LostAcrossSets {
        counter: String,
        applied_sum: i64,
        acknowledged_sum: i64,
        sets: usize,
    },
    /// A counter with sets: more increments applied than every acknowledged and indeterminate one.
    CountedTwiceAcrossSets {
        counter: String,
        applied_sum: i64,
        upper_bound: i64,
        sets: usize,
    },
    /// A counter with sets whose increments were retried with their keys until acknowledged:
    /// not every one applied exactly once.
    NotExactAcrossSets {
        counter: String,
        applied_sum: i64,
        intended_sum: i64,
        sets: usize,
    },
    /// Between two sets in log order (or before the first, or after the last) the trail says
    /// `applied_sum` was added, outside what the increments that can lie there allow: an
    /// increment applied on the wrong side of a set, or an `old_value` that is not the value
    /// right before the set.
    SegmentOutOfBounds {
        counter: String,
        segment: String,
        applied_sum: i64,
        lower_bound: i64,
        upper_bound: i64,
    },
    /// Tally acknowledged a set, and its `audit_id` is not in the audit trail.
    AcknowledgedSetNotApplied {
        counter: String,
        audit_id: String,
        acked_at: Duration,
    },
    /// One set request is in the audit trail more than once.
    SetAppliedTwice {
        counter: String,
        reason: String,
        times: usize,
    },
    /// An audit row no request explains: no set of ours had its reason, or that request failed
    /// (`4xx`, never sent).
    SetNotRequested {
        counter: String,
        seq: i64,
        reason: String,
    },
    /// An audit row of one of our requests with another value or `audit_id` than the request's.
    SetNotAsRequested {
        counter: String,
        seq: i64,
        detail: String,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::ReadBelowLowerBound {
                counter,
                read,
                lower_bound,
            } => write!(
                formatter,
                "{counter}: read started at {} returned {} (source {}, stale {}) below the lower bound {lower_bound}: acknowledged increments missing for longer than allowed",
                seconds(read.invoked_at),
                read.value,
                read.source,
                read.stale
            ),
            Violation::ReadAboveUpperBound {
                counter,
                read,
                upper_bound,
            } => write!(
                formatter,
                "{counter}: read completed at {} returned {} (source {}, stale {}) above the upper bound {upper_bound}: more than every increment sent so far",
                seconds(read.completed_at),
                read.value,
                read.source,
                read.stale
            ),
            Violation::LostIncrements {
                counter,
                final_value,
                acknowledged_sum,
            } => write!(
                formatter,
                "{counter}: final value {final_value} < {acknowledged_sum} acknowledged: {} acknowledged lost",
                acknowledged_sum - final_value
            ),
            Violation::CountedTwice {
                counter,
                final_value,
                upper_bound,
            } => write!(
                formatter,
                "{counter}: final value {final_value} > {upper_bound} (acknowledged + indeterminate): {} counted twice or counted though failed",
                final_value - upper_bound
            ),
            Violation::NotExactAfterRetries {
                counter,
                final_value,
                intended_sum,
            } => write!(
                formatter,
                "{counter}: final value {final_value} != {intended_sum}, the exact sum of increments retried with the same Idempotency-Key ({})",
                if final_value > intended_sum {
                    format!("{} counted twice", final_value - intended_sum)
                } else {
                    format!("{} lost", intended_sum - final_value)
                }
            ),
            Violation::UnacknowledgedAfterRetries {
                counter,
                unresolved_count,
            } => write!(
                formatter,
                "{counter}: {unresolved_count} increments never acknowledged despite retries with the same Idempotency-Key"
            ),
            Violation::StoresDisagree { counter, values } => write!(
                formatter,
                "{counter}: after the drain PostgreSQL has {} but Redis {} and a read {}",
                values.postgres,
                optional(values.redis),
                optional(values.read)
            ),
            Violation::DuplicateOfADifferentUse {
                counter,
                by,
                key,
                answered_at,
            } => write!(
                formatter,
                "{counter}: by {by} with Idempotency-Key {key} answered 202 \"duplicate\": true at {}, though no other use of the key was this increment",
                seconds(*answered_at)
            ),
            Violation::IdenticalUseRefusedAsReused {
                counter,
                answered_at,
                detail,
            } => write!(
                formatter,
                "{counter}: a retry with the same counter and amount was refused with 422 at {}: {}",
                seconds(*answered_at),
                detail.replace(['\n', '|'], " ")
            ),
            Violation::LostAcrossSets {
                counter,
                applied_sum,
                acknowledged_sum,
                sets,
            } => write!(
                formatter,
                "{counter}: across {sets} sets the audit trail and final total apply {applied_sum} of increments < {acknowledged_sum} acknowledged: {} acknowledged lost",
                acknowledged_sum - applied_sum
            ),
            Violation::CountedTwiceAcrossSets {
                counter,
                applied_sum,
                upper_bound,
                sets,
            } => write!(
                formatter,
                "{counter}: across {sets} sets the audit trail and final total apply {applied_sum} of increments > {upper_bound} (acknowledged + indeterminate): {} counted twice or counted though failed",
                applied_sum - upper_bound
            ),
            Violation::NotExactAcrossSets {
                counter,
                applied_sum,
                intended_sum,
                sets,
            } => write!(
                formatter,
                "{counter}: across {sets} sets the audit trail and final total apply {applied_sum} of increments != {intended_sum}, the exact sum of increments retried with the same Idempotency-Key ({})",
                if applied_sum > intended_sum {
                    format!("{} counted twice", applied_sum - intended_sum)
                } else {
                    format!("{} lost", intended_sum - applied_sum)
                }
            ),
            Violation::SegmentOutOfBounds {
                counter,
                segment,
                applied_sum,
                lower_bound,
                upper_bound,
            } => write!(
                formatter,
                "{counter}: {segment} the audit trail says {applied_sum} of increments were applied, outside [{lower_bound}, {upper_bound}] (the acknowledged increments that must lie there, and every one that may): an increment applied on the wrong side of a set, or a wrong old_value"
            ),
            Violation::AcknowledgedSetNotApplied {
                counter,
                audit_id,
                acked_at,
            } => write!(
                formatter,
                "{counter}: set acknowledged at {} with audit_id {audit_id} is not in the audit trail",
                seconds(*acked_at)
            ),
            Violation::SetAppliedTwice {
                counter,
                reason,
                times,
            } => write!(
                formatter,
                "{counter}: the set with reason {reason:?} is in the audit trail {times} times"
            ),
            Violation::SetNotRequested {
                counter,
                seq,
                reason,
            } => write!(
                formatter,
                "{counter}: audit row seq {seq} (reason {reason:?}) was applied though no set request that may land made it"
            ),
            Violation::SetNotAsRequested {
                counter,
                seq,
                detail,
            } => write!(formatter, "{counter}: audit row seq {seq}: {detail}"),
        }
    }
}

fn optional(value: Option<i64>) -> String {
    value.map_or_else(|| "nothing".to_owned(), |value| value.to_string())
}

/// How far behind the acknowledged increments a read was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadLag {
    pub lag: Duration,
    pub source: String,
    pub stale: bool,
}

/// What checking one counter's reads found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadCheck {
    pub violations: Vec<Violation>,
    /// The largest lag of any read, if there was a read.
    pub max_lag: Option<ReadLag>,
    /// Reads bounded per set they may see ([`check_reads_with_sets`]).
    pub reads_across_sets: usize,
}

/// Checks every read of one counter against the bounds. `increments` and `reads` must all be of
/// that counter; `faults` are every fault of the scenario.
pub fn check_reads(
    increments: &[IncrementRecord],
    reads: &[ReadRecord],
    faults: &[FaultRecord],
    allowances: &StalenessAllowances,
) -> ReadCheck {
    // Acknowledged increments in acknowledgement order, each with whether a Redis fault may have
    // cost it its delta (worked out once here rather than once per read).
    let mut acknowledged: Vec<AcknowledgedIncrement> = increments
        .iter()
        .filter_map(|increment| {
            increment.acked_at().map(|acked_at| AcknowledgedIncrement {
                acked_at,
                by: increment.by,
                redis_delta_may_be_lost: allowances.redis_delta_may_be_lost(acked_at, faults),
            })
        })
        .collect();
    acknowledged.sort_by_key(|increment| increment.acked_at);
    // The increments that may count, in the order they were sent, with running sums: the upper
    // bound of a read is the running sum up to the last one sent before the read completed.
    let mut may_count: Vec<(Duration, i64)> = increments
        .iter()
        .filter(|increment| increment.may_count())
        .map(|increment| (increment.invoked_at, increment.by))
        .collect();
    may_count.sort();
    let mut sum_of_first_sent = vec![0i64];
    for (_, by) in &may_count {
        sum_of_first_sent.push(sum_of_first_sent.last().copied().unwrap_or(0) + by);
    }

    let mut check = ReadCheck::default();
    for read in reads {
        // Increments acknowledged after the read started never count toward its lower bound.
        let lower_bound: i64 = acknowledged
            .iter()
            .take_while(|increment| increment.acked_at < read.invoked_at)
            .filter(|increment| {
                let allowed = allowances.allowed_staleness_knowing(
                    increment.acked_at,
                    increment.redis_delta_may_be_lost,
                    read,
                    faults,
                );
                increment.acked_at + allowed < read.invoked_at
            })
            .map(|increment| increment.by)
            .sum();
        let sent_before_completion =
            may_count.partition_point(|(invoked_at, _)| *invoked_at < read.completed_at);
        let upper_bound = sum_of_first_sent[sent_before_completion];
        if read.value < lower_bound {
            check.violations.push(Violation::ReadBelowLowerBound {
                counter: read.counter.clone(),
                read: read.clone(),
                lower_bound,
            });
        }
        if read.value > upper_bound {
            check.violations.push(Violation::ReadAboveUpperBound {
                counter: read.counter.clone(),
                read: read.clone(),
                upper_bound,
            });
        }
        let lag = read_lag(&acknowledged, read);
        if check.max_lag.as_ref().is_none_or(|max| lag > max.lag) {
            check.max_lag = Some(ReadLag {
                lag,
                source: read.source.clone(),
                stale: read.stale,
            });
        }
    }
    check
}

struct AcknowledgedIncrement {
    acked_at: Duration,
    by: i64,
    redis_delta_may_be_lost: bool,
}

/// How long before the read started the oldest acknowledged increment the read's value does not
/// cover was acknowledged: taking increments in acknowledgement order, the value covers them as
/// long as their running sum stays within it. Zero when it covers all of them. (Indeterminate
/// increments that landed can hide some lag; this is a measure, not a rule.)
fn read_lag(acknowledged_in_order: &[AcknowledgedIncrement], read: &ReadRecord) -> Duration {
    let mut covered = 0i64;
    for increment in acknowledged_in_order {
        if increment.acked_at >= read.invoked_at {
            break;
        }
        covered += increment.by;
        if covered > read.value {
            return read.invoked_at - increment.acked_at;
        }
    }
    Duration::ZERO
}

/// Checks one counter's drained values against its increments.
pub fn check_final(
    mode: ClientMode,
    counter: &str,
    increments: &[IncrementRecord],
    values: &FinalValues,
) -> Vec<Violation> {
    let sums = IncrementSums::of(increments);
    let mut violations = Vec::new();
    if values.redis != Some(values.postgres) || values.read != Some(values.postgres) {
        violations.push(Violation::StoresDisagree {
            counter: counter.to_owned(),
            values: *values,
        });
    }
    match mode {
        // Unretried increments, and uses of a key that are never retried: each acknowledged one
        // counts once, each indeterminate one at most once, each failed one never.
        ClientMode::SingleAttempt | ClientMode::ConcurrentKeyReuse => {
            if values.postgres < sums.acknowledged {
                violations.push(Violation::LostIncrements {
                    counter: counter.to_owned(),
                    final_value: values.postgres,
                    acknowledged_sum: sums.acknowledged,
                });
            }
            if values.postgres > sums.upper_bound() {
                violations.push(Violation::CountedTwice {
                    counter: counter.to_owned(),
                    final_value: values.postgres,
                    upper_bound: sums.upper_bound(),
                });
            }
        }
        ClientMode::RetryWithSameKey => {
            if sums.unresolved_count > 0 {
                violations.push(Violation::UnacknowledgedAfterRetries {
                    counter: counter.to_owned(),
                    unresolved_count: sums.unresolved_count,
                });
            }
            if values.postgres != sums.intended {
                violations.push(Violation::NotExactAfterRetries {
                    counter: counter.to_owned(),
                    final_value: values.postgres,
                    intended_sum: sums.intended,
                });
            }
        }
    }
    violations
}

/// When a set's record was in the log at the latest: its acknowledgement, or never known for an
/// indeterminate one (a stalled broker may append it any time later).
fn appended_by(set: &AppliedSet) -> Option<Duration> {
    set.acked_at
}

/// Whether `increment` may lie after `set` in the log: not if it was acknowledged before the
/// set was sent (it was in the log then). Whatever copy of a retried increment counts is the
/// first in the log, no later than its acknowledged one.
fn may_follow(increment: &IncrementRecord, set: &AppliedSet) -> bool {
    increment
        .acked_at()
        .is_none_or(|acked_at| acked_at >= set.invoked_at)
}

/// Whether `increment` must lie after `set` in the log: its first attempt was sent after the
/// set was acknowledged.
fn must_follow(increment: &IncrementRecord, set: &AppliedSet) -> bool {
    appended_by(set).is_some_and(|appended| increment.invoked_at >= appended)
}

/// Whether `increment` may lie before `set` in the log: it was sent before the set's record
/// was appended, which is before the set's acknowledgement.
fn may_precede(increment: &IncrementRecord, set: &AppliedSet) -> bool {
    appended_by(set).is_none_or(|appended| increment.invoked_at <= appended)
}

/// Whether `increment` must lie before `set` in the log: acknowledged before the set was sent.
fn must_precede(increment: &IncrementRecord, set: &AppliedSet) -> bool {
    increment
        .acked_at()
        .is_some_and(|acked_at| acked_at < set.invoked_at)
}

/// The increments applied between two consecutive sets in log order, per the audit trail, with
/// what the history allows there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSegment {
    /// The set the segment starts after (`None`: the counter's beginning).
    pub after_seq: Option<i64>,
    /// The set the segment ends before (`None`: the final value).
    pub before_seq: Option<i64>,
    /// `old` of the set it ends before (or the final value) minus `new` of the set it starts
    /// after (or 0).
    pub applied_sum: i64,
    /// Acknowledged increments that must lie in it.
    pub lower_bound: i64,
    /// Acknowledged and indeterminate increments that may lie in it.
    pub upper_bound: i64,
}

impl SetSegment {
    fn describe(&self) -> String {
        match (self.after_seq, self.before_seq) {
            (None, Some(before)) => format!("before the first set (seq {before})"),
            (Some(after), Some(before)) => format!("between sets seq {after} and seq {before}"),
            (Some(after), None) => format!("after the last set (seq {after})"),
            (None, None) => "with no set".to_owned(),
        }
    }
}

/// Cuts one counter's log at its applied sets (`applied` in `seq` order) and bounds each piece.
pub fn set_segments(
    increments: &[IncrementRecord],
    applied: &[AppliedSet],
    final_value: i64,
) -> Vec<SetSegment> {
    (0..=applied.len())
        .map(|index| {
            let after = index.checked_sub(1).map(|previous| &applied[previous]);
            let before = applied.get(index);
            let start = after.map_or(0, |set| set.new_value);
            let end = before.map_or(final_value, |set| set.old_value);
            let lower_bound = increments
                .iter()
                .filter(|increment| increment.acked_at().is_some())
                .filter(|increment| after.is_none_or(|set| must_follow(increment, set)))
                .filter(|increment| before.is_none_or(|set| must_precede(increment, set)))
                .map(|increment| increment.by)
                .sum();
            let upper_bound = increments
                .iter()
                .filter(|increment| increment.may_count())
                .filter(|increment| after.is_none_or(|set| may_follow(increment, set)))
                .filter(|increment| before.is_none_or(|set| may_precede(increment, set)))
                .map(|increment| increment.by)
                .sum();
            SetSegment {
                after_seq: after.map(|set| set.seq),
                before_seq: before.map(|set| set.seq),
                applied_sum: end.saturating_sub(start),
                lower_bound,
                upper_bound,
            }
        })
        .collect()
}

/// `Σ (old_i − new_{i−1}) + (final − new_k)`: the increments applied to a counter whose applied
/// sets are `applied`, in `seq` order.
pub fn increments_applied_across_sets(applied: &[AppliedSet], final_value: i64) -> i64 {
    let mut previous_new = 0i64;
    let mut sum = 0i64;
    for set in applied {
        sum += set.old_value - previous_new;
        previous_new = set.new_value;
    }
    sum + (final_value - previous_new)
}

/// What the final check of a counter with sets found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetFinalCheck {
    /// [`increments_applied_across_sets`].
    pub applied_sum: i64,
    /// Acknowledged increments missing from `applied_sum` (the exact sum's, in the retry mode).
    pub lost: i64,
    /// What `applied_sum` has beyond every increment that may count (beyond the exact sum, in
    /// the retry mode).
    pub doubled: i64,
    /// Pieces of the log between sets held to their bounds.
    pub segments: usize,
    pub violations: Vec<Violation>,
}

/// [`check_final`] for a counter with sets: the same rules, for the increments the audit trail
/// and the final total say were applied, and for each piece of the log between two sets.
pub fn check_final_with_sets(
    mode: ClientMode,
    counter: &str,
    increments: &[IncrementRecord],
    applied: &[AppliedSet],
    values: &FinalValues,
) -> SetFinalCheck {
    let sums = IncrementSums::of(increments);
    let applied_sum = increments_applied_across_sets(applied, values.postgres);
    let mut check = SetFinalCheck {
        applied_sum,
        ..SetFinalCheck::default()
    };
    if values.redis != Some(values.postgres) || values.read != Some(values.postgres) {
        check.violations.push(Violation::StoresDisagree {
            counter: counter.to_owned(),
            values: *values,
        });
    }
    let sets = applied.len();
    match mode {
        ClientMode::SingleAttempt | ClientMode::ConcurrentKeyReuse => {
            check.lost = (sums.acknowledged - applied_sum).max(0);
            check.doubled = (applied_sum - sums.upper_bound()).max(0);
            if check.lost > 0 {
                check.violations.push(Violation::LostAcrossSets {
                    counter: counter.to_owned(),
                    applied_sum,
                    acknowledged_sum: sums.acknowledged,
                    sets,
                });
            }
            if check.doubled > 0 {
                check.violations.push(Violation::CountedTwiceAcrossSets {
                    counter: counter.to_owned(),
                    applied_sum,
                    upper_bound: sums.upper_bound(),
                    sets,
                });
            }
        }
        ClientMode::RetryWithSameKey => {
            check.lost = (sums.intended - applied_sum).max(0);
            check.doubled = (applied_sum - sums.intended).max(0);
            if sums.unresolved_count > 0 {
                check
                    .violations
                    .push(Violation::UnacknowledgedAfterRetries {
                        counter: counter.to_owned(),
                        unresolved_count: sums.unresolved_count,
                    });
            }
            if applied_sum != sums.intended {
                check.violations.push(Violation::NotExactAcrossSets {
                    counter: counter.to_owned(),
                    applied_sum,
                    intended_sum: sums.intended,
                    sets,
                });
            }
        }
    }
    let segments = set_segments(increments, applied, values.postgres);
    check.segments = segments.len();
    for segment in segments {
        if segment.applied_sum < segment.lower_bound || segment.applied_sum > segment.upper_bound {
            check.violations.push(Violation::SegmentOutOfBounds {
                counter: counter.to_owned(),
                segment: segment.describe(),
                applied_sum: segment.applied_sum,
                lower_bound: segment.lower_bound,
                upper_bound: segment.upper_bound,
            });
        }
    }
    check
}

/// [`check_reads`] for a counter with sets (`applied`: the sets the audit trail holds; a set
/// that never landed changes nothing). Reads that completed before the first applied set was
/// sent get the plain bounds and the lag measure. A later read shows some prefix of the log
/// applied, plus the increments after it that the deltas hold; so:
/// - **upper bound**: the most any set it may see (sent before it completed), or none, leaves
///   it: that set's value plus every increment that may follow the set and was sent before the
///   read completed;
/// - **lower bound**: the acknowledged increments, older than their allowed staleness, that no
///   set it may see can have replaced: sent after every such set was in the log. None, once it
///   may see a set whose request was indeterminate (nobody knows when that reached the log).
pub fn check_reads_with_sets(
    increments: &[IncrementRecord],
    reads: &[ReadRecord],
    applied: &[AppliedSet],
    faults: &[FaultRecord],
    allowances: &StalenessAllowances,
) -> ReadCheck {
    let first_set_sent = applied.iter().map(|set| set.invoked_at).min();
    let (before_sets, after_sets): (Vec<ReadRecord>, Vec<ReadRecord>) = reads
        .iter()
        .cloned()
        .partition(|read| first_set_sent.is_none_or(|sent| read.completed_at <= sent));
    let mut check = check_reads(increments, &before_sets, faults, allowances);
    check.reads_across_sets = after_sets.len();
    let acknowledged: Vec<(&IncrementRecord, Duration, bool)> = increments
        .iter()
        .filter_map(|increment| {
            let acked_at = increment.acked_at()?;
            Some((
                increment,
                acked_at,
                allowances.redis_delta_may_be_lost(acked_at, faults),
            ))
        })
        .collect();
    for read in &after_sets {
        let visible: Vec<&AppliedSet> = applied
            .iter()
            .filter(|set| set.invoked_at < read.completed_at)
            .collect();
        let sent_before_completion =
            |increment: &&IncrementRecord| increment.invoked_at < read.completed_at;
        let without_a_set: i64 = increments
            .iter()
            .filter(|increment| increment.may_count())
            .filter(sent_before_completion)
            .map(|increment| increment.by)
            .sum();
        let upper_bound = visible
            .iter()
            .map(|set| {
                set.new_value
                    + increments
                        .iter()
                        .filter(|increment| increment.may_count())
                        .filter(sent_before_completion)
                        .filter(|increment| may_follow(increment, set))
                        .map(|increment| increment.by)
                        .sum::<i64>()
            })
            .fold(without_a_set, i64::max);
        // Every visible set must be in the log before an increment counts toward the bound.
        let barrier: Option<Duration> = visible.iter().try_fold(Duration::ZERO, |latest, set| {
            appended_by(set).map(|appended| latest.max(appended))
        });
        let lower_bound: i64 = barrier.map_or(0, |barrier| {
            acknowledged
                .iter()
                .filter(|(increment, acked_at, delta_may_be_lost)| {
                    increment.invoked_at >= barrier
                        && *acked_at
                            + allowances.allowed_staleness_knowing(
                                *acked_at,
                                *delta_may_be_lost,
                                read,
                                faults,
                            )
                            < read.invoked_at
                })
                .map(|(increment, _, _)| increment.by)
                .sum()
        });
        if read.value < lower_bound {
            check.violations.push(Violation::ReadBelowLowerBound {
                counter: read.counter.clone(),
                read: read.clone(),
                lower_bound,
            });
        }
        if read.value > upper_bound {
            check.violations.push(Violation::ReadAboveUpperBound {
                counter: read.counter.clone(),
                read: read.clone(),
                upper_bound,
            });
        }
    }
    check
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::FaultKind;

    const COUNTER: &str = "c";

    fn at(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn acknowledged(by: i64, invoked_ms: u64, acked_ms: u64) -> IncrementRecord {
        IncrementRecord {
            counter: COUNTER.into(),
            by,
            invoked_at: at(invoked_ms),
            outcome: IncrementOutcome::Acknowledged {
                acked_at: at(acked_ms),
            },
        }
    }

    fn indeterminate(by: i64, invoked_ms: u64) -> IncrementRecord {
        IncrementRecord {
            counter: COUNTER.into(),
            by,
            invoked_at: at(invoked_ms),
            outcome: IncrementOutcome::Indeterminate,
        }
    }

    fn failed(by: i64, invoked_ms: u64) -> IncrementRecord {
        IncrementRecord {
            counter: COUNTER.into(),
            by,
            invoked_at: at(invoked_ms),
            outcome: IncrementOutcome::Failed,
        }
    }

    fn read(value: i64, invoked_ms: u64, completed_ms: u64, stale: bool) -> ReadRecord {
        ReadRecord {
            counter: COUNTER.into(),
            invoked_at: at(invoked_ms),
            completed_at: at(completed_ms),
            value,
            source: if stale { "postgres" } else { "redis" }.into(),
            stale,
            fresh: true,
        }
    }

    fn fault(kind: FaultKind, started_ms: u64, healed_ms: u64) -> FaultRecord {
        FaultRecord {
            kind,
            started_at: at(started_ms),
            healed_at: at(healed_ms),
        }
    }

    /// Round numbers, independent of the suite's settings, so the tests read easily.
    fn allowances() -> StalenessAllowances {
        StalenessAllowances {
            fresh_read: at(2_000),
            stale_read: at(8_000),
            redis_delta_loss_margin: at(1_000),
            aggregation_recovery: at(10_000),
        }
    }

    fn agreeing(value: i64) -> FinalValues {
        FinalValues {
            postgres: value,
            redis: Some(value),
            read: Some(value),
        }
    }

    fn reads_violations(
        increments: &[IncrementRecord],
        reads: &[ReadRecord],
        faults: &[FaultRecord],
    ) -> Vec<Violation> {
        check_reads(increments, reads, faults, &allowances()).violations
    }

    #[test]
    fn a_correct_history_has_no_violation() {
        let increments = [acknowledged(5, 0, 100), acknowledged(3, 200, 300)];
        let reads = [
            read(0, 50, 60, false),
            read(5, 150, 160, false),
            read(8, 4_000, 4_010, false),
        ];
        assert_eq!(reads_violations(&increments, &reads, &[]), vec![]);
        assert_eq!(
            check_final(
                ClientMode::SingleAttempt,
                COUNTER,
                &increments,
                &agreeing(8)
            ),
            vec![]
        );
    }

    #[test]
    fn a_lost_acknowledged_increment_fails_the_final_check() {
        let increments = [acknowledged(5, 0, 100), acknowledged(3, 200, 300)];
        let violations = check_final(
            ClientMode::SingleAttempt,
            COUNTER,
            &increments,
            &agreeing(5),
        );
        assert_eq!(
            violations,
            vec![Violation::LostIncrements {
                counter: COUNTER.into(),
                final_value: 5,
                acknowledged_sum: 8,
            }]
        );
        assert!(violations[0].to_string().contains("3 acknowledged lost"));
    }

    #[test]
    fn a_lost_increment_also_fails_the_retry_mode_check() {
        let increments = [acknowledged(5, 0, 100), acknowledged(3, 200, 300)];
        let violations = check_final(
            ClientMode::RetryWithSameKey,
            COUNTER,
            &increments,
            &agreeing(5),
        );
        assert_eq!(
            violations,
            vec![Violation::NotExactAfterRetries {
                counter: COUNTER.into(),
                final_value: 5,
                intended_sum: 8,
            }]
        );
        assert!(violations[0].to_string().contains("3 lost"));
    }

    #[test]
    fn a_double_count_fails_the_final_check_in_both_modes() {
        // Single attempt: 5 acknowledged + 2 indeterminate allow at most 7.
        let single = [acknowledged(5, 0, 100), indeterminate(2, 200)];
        assert_eq!(
            check_final(ClientMode::SingleAttempt, COUNTER, &single, &agreeing(9)),
            vec![Violation::CountedTwice {
                counter: COUNTER.into(),
                final_value: 9,
                upper_bound: 7,
            }]
        );
        // Retried with its key until acknowledged, then counted twice (a 503 that had landed
        // plus the retry): exact sum 7, final 9.
        let retried = [acknowledged(5, 0, 100), acknowledged(2, 200, 2_500)];
        let violations = check_final(
            ClientMode::RetryWithSameKey,
            COUNTER,
            &retried,
            &agreeing(9),
        );
        assert_eq!(
            violations,
            vec![Violation::NotExactAfterRetries {
                counter: COUNTER.into(),
                final_value: 9,
                intended_sum: 7,
            }]
        );
        assert!(violations[0].to_string().contains("2 counted twice"));
    }

    #[test]
    fn an_indeterminate_increment_may_land_or_not() {
        let increments = [acknowledged(5, 0, 100), indeterminate(3, 200)];
        for landed in [5, 8] {
            assert_eq!(
                check_final(
                    ClientMode::SingleAttempt,
                    COUNTER,
                    &increments,
                    &agreeing(landed)
                ),
                vec![],
                "final {landed} is within [5, 8]"
            );
        }
        // A read may see it once it was sent...
        assert_eq!(
            reads_violations(&increments, &[read(8, 1_000, 1_010, false)], &[]),
            vec![]
        );
        // ...but not before it was sent.
        let too_early = read(8, 150, 180, false);
        assert_eq!(
            reads_violations(&increments, std::slice::from_ref(&too_early), &[]),
            vec![Violation::ReadAboveUpperBound {
                counter: COUNTER.into(),
                read: too_early,
                upper_bound: 5,
            }]
        );
    }

    #[test]
    fn a_failed_increment_must_not_count() {
        let increments = [acknowledged(5, 0, 100), failed(3, 200)];
        assert_eq!(
            check_final(
                ClientMode::SingleAttempt,
                COUNTER,
                &increments,
                &agreeing(8)
            ),
            vec![Violation::CountedTwice {
                counter: COUNTER.into(),
                final_value: 8,
                upper_bound: 5,
            }]
        );
        let counted = read(8, 1_000, 1_010, false);
        assert_eq!(
            reads_violations(&increments, std::slice::from_ref(&counted), &[]).len(),
            1
        );
    }

    #[test]
    fn a_read_below_the_lower_bound_is_a_violation() {
        let increments = [acknowledged(5, 0, 100), acknowledged(3, 200, 300)];
        // 3 s after both acknowledgements, a non-stale read (allowed 2 s) still shows only 5.
        let lagging = read(5, 3_300, 3_310, false);
        assert_eq!(
            reads_violations(&increments, std::slice::from_ref(&lagging), &[]),
            vec![Violation::ReadBelowLowerBound {
                counter: COUNTER.into(),
                read: lagging,
                lower_bound: 8,
            }]
        );
        // Within the allowance it may lag.
        assert_eq!(
            reads_violations(&increments, &[read(5, 2_000, 2_010, false)], &[]),
            vec![]
        );
    }

    #[test]
    fn a_stale_read_gets_the_larger_allowance_but_not_more() {
        let increments = [acknowledged(5, 0, 100)];
        assert_eq!(
            reads_violations(&increments, &[read(0, 5_000, 5_010, true)], &[]),
            vec![],
            "5 s is within the stale allowance of 8 s"
        );
        assert_eq!(
            reads_violations(&increments, &[read(0, 9_000, 9_010, true)], &[]).len(),
            1,
            "9 s is beyond it"
        );
    }

    #[test]
    fn a_fault_that_stalls_the_aggregation_extends_only_the_stale_allowance() {
        let increments = [acknowledged(5, 0, 100)];
        // The aggregator was down from 1 s to 3 s: 2 s + 10 s recovery are credited.
        let faults = [fault(FaultKind::KillAggregator, 1_000, 3_000)];
        assert_eq!(
            reads_violations(&increments, &[read(0, 15_000, 15_010, true)], &faults),
            vec![],
            "8 + 2 + 10 = 20 s allowed"
        );
        assert_eq!(
            reads_violations(&increments, &[read(0, 21_000, 21_010, true)], &faults).len(),
            1
        );
        // Reads from Redis do not depend on the aggregator.
        assert_eq!(
            reads_violations(&increments, &[read(0, 3_000, 3_010, false)], &faults).len(),
            1
        );
    }

    #[test]
    fn an_increment_acknowledged_during_a_redis_fault_may_be_missed_until_its_window_closes() {
        let during_fault = acknowledged(5, 1_500, 1_600);
        let faults = [fault(FaultKind::PauseRedis, 1_000, 2_000)];
        let allowances = allowances();
        let non_stale = read(0, 6_000, 6_010, false);
        assert_eq!(
            allowances.allowed_staleness(at(1_600), &non_stale, &faults),
            // stale allowance + the pause itself (Redis faults may hold up the aggregator) +
            // recovery
            at(8_000) + at(1_000) + at(10_000)
        );
        assert_eq!(
            reads_violations(std::slice::from_ref(&during_fault), &[non_stale], &faults),
            vec![]
        );
        // One acknowledged well after the fault healed gets the plain fresh allowance.
        let after_fault = acknowledged(5, 4_000, 4_100);
        assert_eq!(
            reads_violations(&[after_fault], &[read(0, 6_200, 6_210, false)], &faults).len(),
            1
        );
    }

    #[test]
    fn a_retried_increment_seen_twice_by_a_read_is_above_the_upper_bound() {
        // Sent at 1.0 s, a 503, retried with the same key and acknowledged at 5.0 s: one
        // increment of 4, however many attempts. A read that sees it twice (the late-landing
        // first attempt and the retry) is wrong even if the final value is right.
        let increments = [acknowledged(10, 0, 100), acknowledged(4, 1_000, 5_000)];
        let twice = read(18, 6_000, 6_010, false);
        assert_eq!(
            reads_violations(&increments, std::slice::from_ref(&twice), &[]),
            vec![Violation::ReadAboveUpperBound {
                counter: COUNTER.into(),
                read: twice,
                upper_bound: 14,
            }]
        );
        assert_eq!(
            check_final(
                ClientMode::RetryWithSameKey,
                COUNTER,
                &increments,
                &agreeing(14)
            ),
            vec![]
        );
    }

    #[test]
    fn retry_mode_requires_every_increment_acknowledged() {
        let increments = [acknowledged(5, 0, 100), indeterminate(3, 200)];
        assert_eq!(
            check_final(
                ClientMode::RetryWithSameKey,
                COUNTER,
                &increments,
                &agreeing(8)
            ),
            vec![Violation::UnacknowledgedAfterRetries {
                counter: COUNTER.into(),
                unresolved_count: 1,
            }]
        );
    }

    #[test]
    fn stores_that_disagree_after_the_drain_are_a_violation() {
        let increments = [acknowledged(5, 0, 100)];
        let values = FinalValues {
            postgres: 5,
            redis: Some(4),
            read: Some(5),
        };
        assert_eq!(
            check_final(ClientMode::SingleAttempt, COUNTER, &increments, &values),
            vec![Violation::StoresDisagree {
                counter: COUNTER.into(),
                values,
            }]
        );
    }

    #[test]
    fn lag_is_measured_from_the_oldest_increment_a_read_misses() {
        let increments = [
            acknowledged(5, 0, 1_000),
            acknowledged(3, 1_000, 2_000),
            acknowledged(2, 2_000, 3_000),
        ];
        let check = |value| {
            check_reads(
                &increments,
                &[read(value, 3_500, 3_510, false)],
                &[],
                &allowances(),
            )
            .max_lag
            .unwrap()
            .lag
        };
        assert_eq!(check(10), Duration::ZERO);
        assert_eq!(
            check(8),
            at(500),
            "misses the increment acknowledged at 3.0 s"
        );
        assert_eq!(check(5), at(1_500), "misses those from 2.0 s on");
        assert_eq!(check(0), at(2_500));
    }

    #[test]
    fn key_reuse_counters_follow_the_unretried_rules() {
        // A 202 of 3, a 409 of 2 (failed) and a 503 of 4 (indeterminate): [3, 7].
        let increments = [acknowledged(3, 0, 100), failed(2, 0), indeterminate(4, 0)];
        let check = |value| {
            check_final(
                ClientMode::ConcurrentKeyReuse,
                COUNTER,
                &increments,
                &agreeing(value),
            )
        };
        assert_eq!(check(3), vec![]);
        assert_eq!(check(7), vec![]);
        assert_eq!(
            check(9),
            vec![Violation::CountedTwice {
                counter: COUNTER.into(),
                final_value: 9,
                upper_bound: 7,
            }],
            "the 409's 2 counted"
        );
        assert_eq!(
            check(2),
            vec![Violation::LostIncrements {
                counter: COUNTER.into(),
                final_value: 2,
                acknowledged_sum: 3,
            }]
        );
    }

    #[test]
    fn a_409_never_raises_the_upper_bound_of_a_read() {
        let increments = [acknowledged(3, 0, 100), failed(2, 50)];
        let counted = read(5, 1_000, 1_010, false);
        assert_eq!(
            reads_violations(&increments, std::slice::from_ref(&counted), &[]),
            vec![Violation::ReadAboveUpperBound {
                counter: COUNTER.into(),
                read: counted,
                upper_bound: 3,
            }]
        );
    }

    #[test]
    fn eviction_reaches_back_over_deltas_still_in_use_but_no_further() {
        let allowances = allowances();
        let faults = [fault(FaultKind::EvictRedisKeys, 20_000, 25_000)];
        // Acknowledged 5 s before the eviction began: its delta may still be read, and evicted.
        assert!(allowances.redis_delta_may_be_lost(at(15_000), &faults));
        // 9 s before: its window is closed and committed (stale allowance 8 s); a read that
        // misses it is wrong whatever Redis lost.
        assert!(!allowances.redis_delta_may_be_lost(at(11_000), &faults));
        // A restart (empty or from a snapshot) begins where its loss begins: no reach back.
        for kind in [
            FaultKind::RestartRedisEmpty,
            FaultKind::RestartRedisFromSnapshot,
            FaultKind::FlushRedisDuringReplay,
        ] {
            let faults = [fault(kind, 20_000, 25_000)];
            assert!(!allowances.redis_delta_may_be_lost(at(15_000), &faults));
            assert!(allowances.redis_delta_may_be_lost(at(20_500), &faults));
        }
    }

    #[test]
    fn a_read_showing_a_snapshot_older_than_the_stale_allowance_is_caught() {
        // SAVE at 10 s, 12 s of load (increments of 1 every second), kill -9 and restart from
        // the snapshot at 22 s, back at 22.5 s. A read at 23 s that shows the snapshot's value
        // misses increments acknowledged up to 13 s earlier: past the 8 s stale allowance, and
        // the restart credits no stall.
        let increments: Vec<IncrementRecord> = (0..22)
            .map(|second| acknowledged(1, second * 1_000, second * 1_000 + 50))
            .collect();
        let faults = [fault(FaultKind::RestartRedisFromSnapshot, 10_000, 22_500)];
        let snapshot_value = 10; // the increments acknowledged before 10 s
        for stale in [false, true] {
            let violations = reads_violations(
                &increments,
                &[read(snapshot_value, 23_000, 23_010, stale)],
                &faults,
            );
            assert_eq!(violations.len(), 1, "stale {stale}: {violations:?}");
        }
        // A value up to date but for the last 8 s is within the allowance.
        assert_eq!(
            reads_violations(&increments, &[read(15, 23_000, 23_010, true)], &faults),
            vec![]
        );
    }

    #[test]
    fn the_new_idempotency_violations_say_what_happened() {
        let duplicate = Violation::DuplicateOfADifferentUse {
            counter: "b".into(),
            by: 2,
            key: "k".into(),
            answered_at: at(1_500),
        };
        assert!(
            duplicate
                .to_string()
                .contains("\"duplicate\": true at 1.500s")
        );
        let refused = Violation::IdenticalUseRefusedAsReused {
            counter: "a".into(),
            answered_at: at(2_000),
            detail: "first used for x".into(),
        };
        assert!(refused.to_string().contains("refused with 422"));
    }

    #[test]
    fn increment_sums_split_by_outcome() {
        let sums = IncrementSums::of(&[acknowledged(5, 0, 1), indeterminate(3, 2), failed(2, 3)]);
        assert_eq!(
            sums,
            IncrementSums {
                acknowledged: 5,
                indeterminate: 3,
                failed: 2,
                intended: 10,
                unresolved_count: 2,
            }
        );
        assert_eq!(sums.upper_bound(), 8);
    }

    fn applied(
        seq: i64,
        old_value: i64,
        new_value: i64,
        invoked_ms: u64,
        acked_ms: Option<u64>,
    ) -> AppliedSet {
        AppliedSet {
            seq,
            old_value,
            new_value,
            invoked_at: at(invoked_ms),
            acked_at: acked_ms.map(at),
        }
    }

    #[test]
    fn increments_applied_across_sets_follow_the_audit_trail() {
        // 5 and 3 before a reset (old 8), 2 after it, then a set to 100 (old 2), then 4: 104.
        let increments = [
            acknowledged(5, 0, 100),
            acknowledged(3, 200, 300),
            acknowledged(2, 1_200, 1_300),
            acknowledged(4, 2_200, 2_300),
        ];
        let sets = [
            applied(1, 8, 0, 1_000, Some(1_100)),
            applied(2, 2, 100, 2_000, Some(2_100)),
        ];
        assert_eq!(increments_applied_across_sets(&sets, 104), 14);
        let check = check_final_with_sets(
            ClientMode::SingleAttempt,
            COUNTER,
            &increments,
            &sets,
            &agreeing(104),
        );
        assert_eq!(check.violations, vec![]);
        assert_eq!((check.applied_sum, check.lost, check.doubled), (14, 0, 0));
        // The retry mode holds it to the exact sum.
        let exact = check_final_with_sets(
            ClientMode::RetryWithSameKey,
            COUNTER,
            &increments,
            &sets,
            &agreeing(104),
        );
        assert_eq!(exact.violations, vec![]);
    }

    #[test]
    fn a_lost_or_doubled_increment_across_sets_is_a_violation() {
        let increments = [acknowledged(5, 0, 100), acknowledged(2, 1_200, 1_300)];
        let sets = [applied(1, 5, 0, 1_000, Some(1_100))];
        // The 2 after the reset is missing from the final value.
        let lost = check_final_with_sets(
            ClientMode::SingleAttempt,
            COUNTER,
            &increments,
            &sets,
            &agreeing(0),
        );
        assert_eq!(lost.lost, 2);
        assert!(lost.violations.contains(&Violation::LostAcrossSets {
            counter: COUNTER.into(),
            applied_sum: 5,
            acknowledged_sum: 7,
            sets: 1,
        }));
        // Counted twice after the reset.
        let doubled = check_final_with_sets(
            ClientMode::SingleAttempt,
            COUNTER,
            &increments,
            &sets,
            &agreeing(4),
        );
        assert_eq!(doubled.doubled, 2);
        assert!(
            doubled.violations[0]
                .to_string()
                .contains("2 counted twice")
        );
    }

    #[test]
    fn an_increment_applied_on_the_wrong_side_of_a_set_is_caught() {
        // Acknowledged at 0.1 s, before the reset was sent at 1.0 s: it must be replaced by the
        // reset. A final value of 5 (it came back after the reset) with old_value 0 keeps the
        // total equation true, but not the pieces.
        let increments = [acknowledged(5, 0, 100)];
        let sets = [applied(1, 0, 0, 1_000, Some(1_100))];
        let check = check_final_with_sets(
            ClientMode::SingleAttempt,
            COUNTER,
            &increments,
            &sets,
            &agreeing(5),
        );
        assert_eq!(check.applied_sum, 5);
        assert_eq!(
            check.violations,
            vec![
                Violation::SegmentOutOfBounds {
                    counter: COUNTER.into(),
                    segment: "before the first set (seq 1)".into(),
                    applied_sum: 0,
                    lower_bound: 5,
                    upper_bound: 5,
                },
                Violation::SegmentOutOfBounds {
                    counter: COUNTER.into(),
                    segment: "after the last set (seq 1)".into(),
                    applied_sum: 5,
                    lower_bound: 0,
                    upper_bound: 0,
                },
            ]
        );
    }

    #[test]
    fn an_indeterminate_set_or_increment_may_fall_on_either_side() {
        // The set's answer never came: the increment sent at 1.5 s may be before or after it.
        let increments = [acknowledged(5, 0, 100), acknowledged(3, 1_500, 1_600)];
        let sets = [applied(1, 8, 0, 1_000, None)];
        for (old_value, final_value) in [(8, 0), (5, 3)] {
            let sets = [applied(1, old_value, 0, 1_000, None)];
            let check = check_final_with_sets(
                ClientMode::SingleAttempt,
                COUNTER,
                &increments,
                &sets,
                &agreeing(final_value),
            );
            assert_eq!(
                check.violations,
                vec![],
                "old {old_value}, final {final_value}"
            );
        }
        let segments = set_segments(&increments, &sets, 0);
        assert_eq!((segments[1].lower_bound, segments[1].upper_bound), (0, 3));
    }

    #[test]
    fn reads_are_bounded_per_set_they_may_see() {
        let increments = [
            acknowledged(5, 0, 100),
            acknowledged(3, 200, 300),
            acknowledged(2, 2_000, 2_100),
        ];
        let sets = [applied(1, 8, 0, 1_000, Some(1_100))];
        let check = |value, invoked_ms, stale| {
            check_reads_with_sets(
                &increments,
                &[read(value, invoked_ms, invoked_ms + 10, stale)],
                &sets,
                &[],
                &allowances(),
            )
            .violations
        };
        // Before the reset was sent: the plain bounds.
        assert_eq!(check(8, 900, false), vec![]);
        assert_eq!(check(9, 900, false).len(), 1, "above every increment sent");
        // After it, a reset legitimately lowers the counter...
        assert_eq!(check(2, 5_000, false), vec![]);
        // ...and a read that has not seen it yet may still show the old value and the 2.
        assert_eq!(check(10, 2_500, false), vec![]);
        // But the 2, sent after the reset was acknowledged, must show once old enough.
        assert_eq!(check(0, 5_000, false).len(), 1);
        // And nothing may exceed the most any set leaves: 8 + 2 = 10 without the reset.
        assert_eq!(check(11, 5_000, false).len(), 1);
    }
}
