//! The scenarios: one per fault, a baseline without faults, and one that mixes them all.
//!
//! A scenario is a list of fault steps run one after the other while the load goes on. Each
//! step waits `gap_before` after the previous step healed (or after the load started), so slow
//! steps (a Kafka restart takes several seconds) never overlap the next one.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};

use crate::history::FaultKind;

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
        mixed_scenario(
            &mut rng,
            short,
            min_load,
            load_after_faults.max(LOAD_THROUGH_AGGREGATOR_TAKEOVER),
        ),
    ]
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
        assert_eq!(kinds.len(), 9);
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
