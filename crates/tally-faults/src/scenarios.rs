//! The scenarios: one per fault, a baseline without faults, one for racing uses of one
//! idempotency key, one for a long PostgreSQL outage under load over 100,000 names, and one that
//! mixes every fault.
//!
//! A scenario is a list of fault steps run one after the other while the load goes on. Each
//! step waits `gap_before` after the previous step healed (or after the load started), so slow
//! steps (a Kafka restart takes several seconds) never overlap the next one.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};

use crate::history::FaultKind;
use crate::memory::AggregatorMemoryBound;
use crate::wide::WideLoad;

/// One fault, with how long it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// `kill -9` aggregator number `which`, start it again `down_for` later.
    KillAggregator {
        which: usize,
        down_for: Duration,
    },
    RestartKafka {
        down_for: Duration,
    },
    RestartRedisEmpty {
        down_for: Duration,
    },
    RestartPostgres {
        down_for: Duration,
    },
    /// SIGTERM the ingest and read process, wait for its clean exit, start it `down_for` later.
    SigtermIngest {
        down_for: Duration,
    },
    /// `kill -9` the ingest and read process, start it `down_for` later.
    KillIngest {
        down_for: Duration,
    },
    PauseAggregator {
        which: usize,
        paused_for: Duration,
    },
    PauseRedis {
        paused_for: Duration,
    },
    PauseKafka {
        paused_for: Duration,
    },
    /// `SAVE` Redis, `kill -9` it `snapshot_age` later, and start it `down_for` after that from
    /// the snapshot.
    RestartRedisFromSnapshot {
        snapshot_age: Duration,
        down_for: Duration,
    },
    /// Write `filler_bytes` of filler keys, then hold Redis under a `maxmemory` limit with
    /// `allkeys-lru` for `evicting_for`, deleting every key of a counter now and then.
    EvictRedisKeys {
        filler_bytes: u64,
        evicting_for: Duration,
    },
    /// `FLUSHALL`, start `tally replay`, `FLUSHALL` again `second_flush_after` later and, when
    /// set, once more `third_flush_after` after that; wait for the replay to end.
    FlushRedisDuringReplay {
        second_flush_after: Duration,
        third_flush_after: Option<Duration>,
    },
}

impl FaultAction {
    pub fn kind(&self) -> FaultKind {
        match self {
            FaultAction::KillAggregator { .. } => FaultKind::KillAggregator,
            FaultAction::RestartKafka { .. } => FaultKind::RestartKafka,
            FaultAction::RestartRedisEmpty { .. } => FaultKind::RestartRedisEmpty,
            FaultAction::RestartPostgres { .. } => FaultKind::RestartPostgres,
            FaultAction::SigtermIngest { .. } => FaultKind::SigtermIngest,
            FaultAction::KillIngest { .. } => FaultKind::KillIngest,
            FaultAction::PauseAggregator { .. } => FaultKind::PauseAggregator,
            FaultAction::PauseRedis { .. } => FaultKind::PauseRedis,
            FaultAction::PauseKafka { .. } => FaultKind::PauseKafka,
            FaultAction::RestartRedisFromSnapshot { .. } => FaultKind::RestartRedisFromSnapshot,
            FaultAction::EvictRedisKeys { .. } => FaultKind::EvictRedisKeys,
            FaultAction::FlushRedisDuringReplay { .. } => FaultKind::FlushRedisDuringReplay,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultStep {
    pub gap_before: Duration,
    pub action: FaultAction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    pub name: &'static str,
    pub description: String,
    /// Aggregator processes; with two, a paused or killed one's partitions move to the other.
    pub aggregators: usize,
    pub steps: Vec<FaultStep>,
    /// The load runs at least this long...
    pub min_load: Duration,
    /// ...and at least this long after the last fault healed, so recovery happens under load.
    pub load_after_faults: Duration,
    /// Batches over many names beside the modes' clients, where the aggregator's memory is the
    /// point; checked on their own after the drain.
    pub wide_load: Option<WideLoad>,
    /// The aggregator's memory bound, checked around the scenario's PostgreSQL outage.
    pub aggregator_memory: Option<AggregatorMemoryBound>,
    /// Added to the suite's drain timeout: the backlog of a long outage under a heavy load has
    /// to be caught up first.
    pub extra_drain_time: Duration,
}

impl Scenario {
    /// Whether the scenario's faults stay within its own Tally processes, so it can run side by
    /// side with other such scenarios (each has its own processes, database, topic, group and
    /// Redis prefix) without disturbing them.
    pub fn can_run_alongside_others(&self) -> bool {
        !self
            .steps
            .iter()
            .any(|step| step.action.kind().hits_a_stack_server())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuiteLength {
    /// A few seconds of load per scenario; the whole suite in a few minutes.
    Short,
    /// About a minute of load per scenario, faults repeated, the mix three times over.
    Long,
}

/// Longer than the aggregator's 10 s Kafka session timeout: the group hands the paused
/// aggregator's partitions to the other one, and when it continues, its commit must be fenced
/// by the offsets in PostgreSQL.
const PAUSE_PAST_SESSION_TIMEOUT: Duration = Duration::from_secs(12);

/// A killed aggregator keeps its partitions until its 10 s Kafka session expires; only then does
/// the restarted one take them over and catch up the backlog in one go. Reads during that
/// catch-up are the ones that can see summaries and closed windows out of step, so scenarios
/// that kill aggregators keep the load, and its reads, going this long after the last fault.
const LOAD_THROUGH_AGGREGATOR_TAKEOVER: Duration = Duration::from_secs(14);

/// Longer than the suite's 2 s produce timeout (plus the ingest's extra second for the delivery
/// report): increments time out with `503` while the stopped broker still holds their records,
/// which it appends when it continues, after their window was due to close.
const PAUSE_PAST_PRODUCE_TIMEOUT: Duration = Duration::from_secs(4);

/// How old the snapshot Redis restarts from is. Longer than the checker's stale allowance
/// (`StalenessAllowances::stale_read`, 8.2 s with the suite's timing) with room to spare: a read
/// that shows the snapshot's values misses increments acknowledged longer ago than any read may
/// lag, flagged stale or not, so the checker catches it. (A test below keeps it so.)
const SNAPSHOT_AGE: Duration = Duration::from_secs(12);

/// After a fault that changes what Redis holds, Tally must notice, answer from PostgreSQL, and
/// heal Redis (the aggregator's own replay waits for a few windows to close). The load, and its
/// reads, go on this long so that whole stretch is checked.
const LOAD_THROUGH_REDIS_HEAL: Duration = Duration::from_secs(8);

/// Load before the first eviction or flush. For the eviction: longer than the checker's reach
/// back over deltas an eviction may lose (the stale allowance, 8.2 s), so every counter has
/// increments no eviction excuses, and a read that lost them with an evicted summary is caught.
/// For the flush: long enough for PostgreSQL to hold totals the replay must rebuild.
const HISTORY_BEFORE_REDIS_LOSS_MS: u64 = 10_000;

/// Filler for the eviction fault: several MiB, so half of it under the limit leaves Redis a few
/// MiB to evict from, the scenario's own keys being well under 1 MiB.
const EVICTION_FILLER_BYTES: u64 = 8 * 1024 * 1024;

/// The wide load: 100,000 names, two clients sending batches of 500 items of 1. On this 2-core
/// machine a debug build takes about 12,000 items a second, so every name is touched every ten
/// seconds or so and each window holds thousands of distinct counters.
const WIDE_LOAD: WideLoad = WideLoad {
    names: 100_000,
    batch_items: 500,
    clients: 2,
    pause_between_batches: Duration::from_millis(20),
};

/// How far the aggregator may grow through the PostgreSQL outage. See `postgres-down-wide`.
const WIDE_OUTAGE_MEMORY: AggregatorMemoryBound = AggregatorMemoryBound {
    max_pending_rows: 50_000,
    rss_growth_limit_mib: 192,
};

fn millis(value: u64) -> Duration {
    Duration::from_millis(value)
}

fn step(gap_before_ms: u64, action: FaultAction) -> FaultStep {
    FaultStep {
        gap_before: millis(gap_before_ms),
        action,
    }
}

/// Every scenario of the suite, in the order they run. `seed` drives the random parts (the mixed
/// scenario's order and the long version's gaps), so a run can be repeated.
pub fn all_scenarios(length: SuiteLength, seed: u64) -> Vec<Scenario> {
    let mut rng = StdRng::seed_from_u64(seed);
    let short = length == SuiteLength::Short;
    // In the long version every fault repeats: this many times, with random gaps.
    let repeats = if short { 1 } else { 6 };
    let mut repeated =
        |action: FaultAction, first_gap_ms: u64, gap_ms: (u64, u64)| -> Vec<FaultStep> {
            (0..repeats)
                .map(|index| {
                    let gap = if index == 0 {
                        first_gap_ms
                    } else {
                        rng.random_range(gap_ms.0..=gap_ms.1)
                    };
                    step(gap, action)
                })
                .collect()
        };
    let load_after_faults = if short { millis(2_000) } else { millis(5_000) };
    let min_load = if short { millis(4_000) } else { millis(60_000) };
    let scenario = |name, description: &str, aggregators, steps| Scenario {
        name,
        description: description.to_owned(),
        aggregators,
        steps,
        min_load,
        load_after_faults,
        wide_load: None,
        aggregator_memory: None,
        extra_drain_time: Duration::ZERO,
    };

    let kill_aggregator = FaultAction::KillAggregator {
        which: 0,
        down_for: millis(500),
    };
    // Each kill lands within the previous process's 10 s Kafka session, so the partitions stay
    // with dead members and nothing is aggregated for ~20 s: more than the 12 windows of window
    // sums a summary keeps, so the takeover's catch-up prunes windows readers still need.
    let mut kill_steps = vec![
        step(1_000, kill_aggregator),
        step(2_500, kill_aggregator),
        step(2_500, kill_aggregator),
        step(2_500, kill_aggregator),
    ];
    if !short {
        kill_steps.extend(repeated(kill_aggregator, 3_000, (2_000, 8_000)));
    }
    let mut pause_aggregator_steps = vec![step(
        1_000,
        FaultAction::PauseAggregator {
            which: 0,
            paused_for: PAUSE_PAST_SESSION_TIMEOUT,
        },
    )];
    if !short {
        // Short pauses too: the aggregator keeps its partitions and simply resumes.
        pause_aggregator_steps.extend(repeated(
            FaultAction::PauseAggregator {
                which: 1,
                paused_for: millis(3_000),
            },
            3_000,
            (2_000, 6_000),
        ));
        pause_aggregator_steps.push(step(
            3_000,
            FaultAction::PauseAggregator {
                which: 1,
                paused_for: PAUSE_PAST_SESSION_TIMEOUT,
            },
        ));
    }

    vec![
        scenario("baseline", "no fault", 1, vec![]),
        Scenario {
            // Load on through the takeover, when the restarted aggregator catches up a backlog.
            load_after_faults: load_after_faults.max(LOAD_THROUGH_AGGREGATOR_TAKEOVER),
            ..scenario(
                "kill-aggregator",
                "kill -9 the aggregator, restart it 0.5 s later, several times",
                1,
                kill_steps,
            )
        },
        scenario(
            "restart-kafka",
            "stop the Kafka broker (controlled shutdown), start it 1 s later",
            1,
            repeated(
                FaultAction::RestartKafka {
                    down_for: millis(1_000),
                },
                1_000,
                (3_000, 8_000),
            ),
        ),
        scenario(
            "restart-redis-empty",
            "stop Redis, start it again empty 1 s later",
            1,
            repeated(
                FaultAction::RestartRedisEmpty {
                    down_for: millis(1_000),
                },
                1_000,
                (3_000, 8_000),
            ),
        ),
        scenario(
            "restart-postgres",
            "stop PostgreSQL (fast shutdown), start it 2 s later",
            1,
            repeated(
                FaultAction::RestartPostgres {
                    down_for: millis(2_000),
                },
                1_000,
                (3_000, 8_000),
            ),
        ),
        scenario(
            "sigterm-ingest",
            "SIGTERM the ingest+read process under load, start it 1 s after it exited",
            1,
            repeated(
                FaultAction::SigtermIngest {
                    down_for: millis(1_000),
                },
                1_500,
                (3_000, 8_000),
            ),
        ),
        scenario(
            "kill-ingest",
            "kill -9 the ingest+read process under load, start it 0.5 s later",
            1,
            repeated(
                FaultAction::KillIngest {
                    down_for: millis(500),
                },
                1_500,
                (3_000, 8_000),
            ),
        ),
        scenario(
            "pause-aggregator",
            "two aggregators; SIGSTOP one for 12 s (past its 10 s session timeout), then SIGCONT",
            2,
            pause_aggregator_steps,
        ),
        scenario(
            "pause-redis",
            "SIGSTOP Redis for 2 s, then SIGCONT",
            1,
            repeated(
                FaultAction::PauseRedis {
                    paused_for: millis(2_000),
                },
                1_000,
                (3_000, 8_000),
            ),
        ),
        scenario(
            "pause-kafka",
            "SIGSTOP the Kafka broker for 4 s (past the 2 s produce timeout), then SIGCONT",
            1,
            repeated(
                FaultAction::PauseKafka {
                    paused_for: PAUSE_PAST_PRODUCE_TIMEOUT,
                },
                1_000,
                (3_000, 8_000),
            ),
        ),
        Scenario {
            // More pairs than the baseline gives: with every store up, nothing but the claim
            // itself can explain a lost or doubled use.
            min_load: min_load.max(millis(10_000)),
            ..scenario(
                "key-reuse",
                "no fault: two uses of one fresh Idempotency-Key at once, for two counters, two amounts or the same increment (the key-reuse mode also runs in every other scenario)",
                1,
                vec![],
            )
        },
        Scenario {
            load_after_faults: load_after_faults.max(LOAD_THROUGH_REDIS_HEAL),
            ..scenario(
                "restart-redis-from-snapshot",
                "SAVE redis, 12 s of load, kill -9 it and start it from that older snapshot",
                1,
                repeated(
                    FaultAction::RestartRedisFromSnapshot {
                        snapshot_age: SNAPSHOT_AGE,
                        down_for: millis(500),
                    },
                    1_000,
                    (3_000, 8_000),
                ),
            )
        },
        Scenario {
            load_after_faults: load_after_faults.max(LOAD_THROUGH_REDIS_HEAL),
            ..scenario(
                "evict-redis-keys",
                "fill redis with 8 MiB, hold it under maxmemory with allkeys-lru so it evicts, and delete every key of a counter each second, then lift the limit",
                1,
                repeated(
                    FaultAction::EvictRedisKeys {
                        filler_bytes: EVICTION_FILLER_BYTES,
                        evicting_for: if short { millis(4_000) } else { millis(8_000) },
                    },
                    HISTORY_BEFORE_REDIS_LOSS_MS,
                    (3_000, 8_000),
                ),
            )
        },
        Scenario {
            load_after_faults: load_after_faults.max(LOAD_THROUGH_REDIS_HEAL),
            ..scenario(
                "flush-redis-during-replay",
                "FLUSHALL, start tally replay, FLUSHALL again tens to hundreds of ms into it (sometimes twice), wait for it to end",
                1,
                flush_during_replay_steps(&mut rng, repeats),
            )
        },
        postgres_down_wide_scenario(short, load_after_faults),
        mixed_scenario(
            &mut rng,
            short,
            min_load,
            load_after_faults.max(LOAD_THROUGH_AGGREGATOR_TAKEOVER),
        ),
    ]
}

/// `repeats` flushes during a replay, each with its own random delays.
fn flush_during_replay_steps(rng: &mut StdRng, repeats: usize) -> Vec<FaultStep> {
    (0..repeats)
        .map(|index| {
            let gap = if index == 0 {
                HISTORY_BEFORE_REDIS_LOSS_MS
            } else {
                rng.random_range(3_000..=8_000)
            };
            step(
                gap,
                FaultAction::FlushRedisDuringReplay {
                    second_flush_after: millis(rng.random_range(20..=300)),
                    third_flush_after: rng
                        .random_bool(0.5)
                        .then(|| millis(rng.random_range(50..=500))),
                },
            )
        })
        .collect()
}

/// PostgreSQL down under the wide load, with the aggregator's memory bounded.
///
/// The bound: `TALLY_AGGREGATOR_MAX_PENDING=50000` rows, and at most 192 MiB of `VmRSS` above the
/// aggregator's peak under the same load before the outage (66 to 95 MiB on a debug build), held
/// during the outage and through the catch-up after it. What a bounded aggregator may add:
/// - 50,000 pending rows, about 12 MiB (a name of ~11 bytes in a hash map, a window, sums);
/// - the commit's copies of them, as many again;
/// - librdkafka's queue of records fetched ahead, up to its 64 MiB `queued.max.messages.kbytes`
///   when the aggregator is behind (as it is in the catch-up);
/// - the mirror writes of the catch-up's commits, and the allocator keeping freed pages.
///
/// Measured with a bounded aggregator: +5 MiB during the outage, +103 and +123 MiB at the peak
/// of the catch-up; the bound leaves room for a slower, busier machine. An aggregator that keeps
/// consuming holds a row per name and window for the whole outage instead: the wide load sends
/// about 12,000 items a second, nearly all distinct rows, 300,000 in the short outage (+73 and
/// +91 MiB during it), and its one commit of all of them afterwards took it to +267 and +316 MiB;
/// in the long outage it grew +288 MiB while PostgreSQL was still down, +590 MiB after.
///
/// 25 s in the short suite, 60 s in the long one: the short suite's whole run must stay well
/// under the CI budget, and 25 s already holds six times the pending limit.
fn postgres_down_wide_scenario(short: bool, load_after_faults: Duration) -> Scenario {
    let down_for = if short {
        millis(25_000)
    } else {
        millis(60_000)
    };
    Scenario {
        name: "postgres-down-wide",
        description: format!(
            "load over 100,000 names in batches of 500; stop PostgreSQL for {} s with the aggregator's pending rows capped at {}; its RSS may grow at most {} MiB",
            down_for.as_secs(),
            WIDE_OUTAGE_MEMORY.max_pending_rows,
            WIDE_OUTAGE_MEMORY.rss_growth_limit_mib
        ),
        aggregators: 1,
        // First a stretch under the wide load with PostgreSQL up: the memory baseline.
        steps: vec![step(10_000, FaultAction::RestartPostgres { down_for })],
        min_load: millis(4_000),
        // The catch-up of the backlog happens under load too.
        load_after_faults: load_after_faults.max(millis(10_000)),
        wide_load: Some(WIDE_LOAD),
        aggregator_memory: Some(WIDE_OUTAGE_MEMORY),
        // An aggregator paused at its pending limit catches up the outage's backlog (some
        // hundreds of thousands of rows) in limit-sized commits after it: on a debug build that
        // took about as long again as the outage.
        extra_drain_time: down_for,
    }
}

/// Every fault once (three rounds in the long version), in a random order, with two
/// aggregators so kills and pauses also move partitions.
fn mixed_scenario(
    rng: &mut StdRng,
    short: bool,
    min_load: Duration,
    load_after_faults: Duration,
) -> Scenario {
    let rounds = if short { 1 } else { 3 };
    let mut steps = Vec::new();
    for _ in 0..rounds {
        let mut actions = vec![
            FaultAction::KillAggregator {
                which: rng.random_range(0..2),
                down_for: millis(500),
            },
            FaultAction::RestartKafka {
                down_for: millis(1_000),
            },
            FaultAction::RestartRedisEmpty {
                down_for: millis(1_000),
            },
            FaultAction::RestartPostgres {
                down_for: millis(1_000),
            },
            FaultAction::SigtermIngest {
                down_for: millis(500),
            },
            FaultAction::PauseAggregator {
                which: rng.random_range(0..2),
                paused_for: millis(3_000),
            },
            FaultAction::PauseRedis {
                paused_for: millis(1_500),
            },
            FaultAction::KillIngest {
                down_for: millis(500),
            },
            FaultAction::PauseKafka {
                paused_for: PAUSE_PAST_PRODUCE_TIMEOUT,
            },
            // Shorter than in its own scenario, to keep the mix short; there it is checked
            // against the stale allowance, here how it combines with the other faults.
            FaultAction::RestartRedisFromSnapshot {
                snapshot_age: millis(4_000),
                down_for: millis(500),
            },
            FaultAction::EvictRedisKeys {
                filler_bytes: EVICTION_FILLER_BYTES,
                evicting_for: millis(3_000),
            },
            FaultAction::FlushRedisDuringReplay {
                second_flush_after: millis(rng.random_range(20..=300)),
                third_flush_after: None,
            },
        ];
        actions.shuffle(rng);
        for action in actions {
            let gap = if short {
                1_000
            } else {
                rng.random_range(1_000..=5_000)
            };
            steps.push(step(gap, action));
        }
    }
    let order: Vec<&str> = steps.iter().map(|step| step.action.kind().name()).collect();
    Scenario {
        name: "mixed",
        description: format!("two aggregators; one after the other: {}", order.join(", ")),
        aggregators: 2,
        steps,
        min_load,
        load_after_faults,
        wide_load: None,
        aggregator_memory: None,
        extra_drain_time: Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_kind_has_a_scenario_and_the_mix_has_them_all() {
        let scenarios = all_scenarios(SuiteLength::Short, 7);
        let mixed = scenarios
            .iter()
            .find(|scenario| scenario.name == "mixed")
            .unwrap();
        let kinds: std::collections::HashSet<FaultKind> =
            mixed.steps.iter().map(|step| step.action.kind()).collect();
        assert_eq!(kinds.len(), 12);
        for kind in kinds {
            assert!(
                scenarios
                    .iter()
                    .filter(|scenario| scenario.name != "mixed")
                    .any(|scenario| scenario.steps.iter().any(|step| step.action.kind() == kind)),
                "{kind:?} has no scenario of its own"
            );
        }
    }

    #[test]
    fn the_snapshot_is_older_than_any_read_may_lag() {
        use crate::checker::{PipelineTiming, StalenessAllowances};
        let allowances = StalenessAllowances::for_timing(&PipelineTiming::SUITE);
        // Past the stale allowance by more than the restart itself takes, and the restart from
        // a snapshot credits no stall (FaultKind::stalls_aggregation).
        assert!(SNAPSHOT_AGE > allowances.stale_read + Duration::from_secs(2));
        assert!(!FaultKind::RestartRedisFromSnapshot.stalls_aggregation());
    }

    #[test]
    fn scenarios_that_change_a_server_run_alone() {
        for scenario in all_scenarios(SuiteLength::Short, 1) {
            let alone = matches!(
                scenario.name,
                "restart-kafka"
                    | "restart-redis-empty"
                    | "restart-postgres"
                    | "pause-redis"
                    | "pause-kafka"
                    | "restart-redis-from-snapshot"
                    | "evict-redis-keys"
                    | "flush-redis-during-replay"
                    | "postgres-down-wide"
                    | "mixed"
            );
            assert_eq!(
                scenario.can_run_alongside_others(),
                !alone,
                "{}",
                scenario.name
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_scenarios() {
        assert_eq!(
            all_scenarios(SuiteLength::Long, 42),
            all_scenarios(SuiteLength::Long, 42)
        );
    }

    #[test]
    fn aggregator_faults_only_name_aggregators_that_exist() {
        for length in [SuiteLength::Short, SuiteLength::Long] {
            for scenario in all_scenarios(length, 3) {
                for step in &scenario.steps {
                    if let FaultAction::KillAggregator { which, .. }
                    | FaultAction::PauseAggregator { which, .. } = step.action
                    {
                        assert!(which < scenario.aggregators, "{}", scenario.name);
                    }
                }
            }
        }
    }
}
