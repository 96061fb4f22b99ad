//! The `loadgen` command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// The scenarios of a comparison run, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScenarioId {
    /// Naive single-row PostgreSQL `UPDATE ... SET count = count + 1`, durable commits.
    PgRow,
    /// The same with `SET synchronous_commit = off` in every session.
    PgRowAsync,
    /// The same spread over `--pg-shards` rows (16), durable commits.
    PgSharded,
    /// Raw Redis `INCR`, one command per round trip.
    RedisIncr,
    /// Raw Redis `INCR`, `--redis-pipeline-depth` (16) commands per round trip.
    RedisIncrPipelined,
    /// Tally single increments of one hot counter.
    TallyHot,
    /// Tally single increments over `--zipf-names` names drawn from a Zipf distribution.
    TallyZipf,
    /// The Tally batch API, `--batch-size` Zipf-drawn names per request.
    TallyBatch,
    /// Reads of a hot counter (through Tally's read cache) while it is written.
    TallyReadCached,
    /// Reads of a hot counter with `?fresh=true` (skipping the cache) while it is written.
    TallyReadFresh,
    /// `POST /v1/strict/{name}/add {"by":-1}` on one strict counter (synchronous in PostgreSQL).
    StrictAdd,
    /// Read-modify-write of one strict counter: `GET`, then `cas`, again on a mismatch.
    StrictCas,
}

impl ScenarioId {
    pub fn name(self) -> String {
        self.to_possible_value()
            .expect("no scenario is skipped")
            .get_name()
            .to_string()
    }

    pub fn uses_tally(self) -> bool {
        matches!(
            self,
            ScenarioId::TallyHot
                | ScenarioId::TallyZipf
                | ScenarioId::TallyBatch
                | ScenarioId::TallyReadCached
                | ScenarioId::TallyReadFresh
                | ScenarioId::StrictAdd
                | ScenarioId::StrictCas
        )
    }
}

fn default_output_parent() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results")
}

fn default_tally_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/tally")
}

fn parse_duration(text: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(text)
}

/// Load generator for Tally and the baselines it is compared with (PostgreSQL rows, Redis
/// INCR). Runs the chosen scenarios one after the other against the local stack and writes
/// results.json, results.md and latency-vs-throughput.svg.
///
/// Each write scenario runs a closed-loop phase (`--clients` workers as fast as they can: the
/// maximum throughput), then open-loop phases at fractions of that throughput (a fixed arrival
/// rate, latency measured from each request's intended send time). Every Tally scenario ends by
/// waiting until PostgreSQL holds exactly the acknowledged total; a scenario where it does not
/// is marked FAILED and the command exits with status 1.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen", version)]
pub struct LoadgenArgs {
    /// Scenarios to run, comma separated; all of them by default.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [
        ScenarioId::PgRow, ScenarioId::PgRowAsync, ScenarioId::PgSharded,
        ScenarioId::RedisIncr, ScenarioId::RedisIncrPipelined,
        ScenarioId::TallyHot, ScenarioId::TallyZipf, ScenarioId::TallyBatch,
        ScenarioId::TallyReadCached, ScenarioId::TallyReadFresh,
        ScenarioId::StrictAdd, ScenarioId::StrictCas,
    ])]
    pub scenarios: Vec<ScenarioId>,

    /// Length of each phase (`5s` for a smoke run, `60s` for published numbers).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub duration: Duration,

    /// Pause before each phase so the previous one's aftermath settles; Tally scenarios also
    /// wait until PostgreSQL has caught up with everything acknowledged so far.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub settle: Duration,

    /// Unmeasured closed-loop load before each Tally write scenario. Kafka's JVM compiles its
    /// hot paths during the first seconds of load, and a scenario that ran during that time
    /// measured the compiler. What the warm-up acknowledges still counts in the PostgreSQL check.
    /// `0s` turns it off.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub warm_up: Duration,

    /// Concurrent clients (connections) of each write scenario.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,

    /// Open-loop phases after the closed-loop one, as fractions of its request rate. Give the
    /// flag with no value to run the closed-loop phase only.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_values_t = [0.25, 0.5, 0.75])]
    pub sweep_fractions: Vec<f64>,

    /// Run each write scenario as one open-loop phase at this many requests per second
    /// (batches per second for the batch API) instead of closed loop plus sweep.
    #[arg(long)]
    pub rate: Option<f64>,

    /// Distinct counter names of the Zipf scenarios.
    #[arg(long, default_value_t = 100_000)]
    pub zipf_names: usize,

    /// Exponent of the Zipf distribution (0.99 as in YCSB; 0 is uniform).
    #[arg(long, default_value_t = 0.99)]
    pub zipf_exponent: f64,

    /// Increments per request of the batch scenario.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,

    /// Concurrent readers of the read scenarios.
    #[arg(long, default_value_t = 8)]
    pub readers: usize,

    /// Open-loop increments per second written to the hot counter during the read scenarios.
    #[arg(long, default_value_t = 1_000.0)]
    pub read_scenario_write_rate: f64,

    /// Rows of the sharded PostgreSQL scenario.
    #[arg(long, default_value_t = 16)]
    pub pg_shards: i32,

    /// INCRs per round trip of the pipelined Redis scenario.
    #[arg(long, default_value_t = 16)]
    pub redis_pipeline_depth: usize,

    /// The Tally binary to start (build it with `cargo build --release -p tally`).
    #[arg(long, default_value_os_t = default_tally_binary())]
    pub tally_bin: PathBuf,

    /// Aggregation window of the started Tally; Tally's own default (5000) when not given.
    #[arg(long)]
    pub tally_window_ms: Option<u64>,

    /// Measure an already running Tally at this URL instead of starting one.
    #[arg(long, requires = "tally_database_url")]
    pub tally_url: Option<String>,

    /// The database of the Tally given by --tally-url, to check its totals.
    #[arg(long)]
    pub tally_database_url: Option<String>,

    /// PostgreSQL to create the run's own database in (it is dropped at the end).
    #[arg(long, default_value = "postgres://tally:tally@127.0.0.1:5432/tally")]
    pub database_url: String,

    /// Redis of the baselines and of the started Tally.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// How long to wait after the load for PostgreSQL to hold the acknowledged total.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub convergence_timeout: Duration,

    /// Where to write the results; a new folder under benches/results by default.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,

    /// Parent of the default output folder.
    #[arg(long, default_value_os_t = default_output_parent(), hide = true)]
    pub output_parent: PathBuf,

    /// Run nothing: rewrite results.md and latency-vs-throughput.svg from this results.json
    /// of an earlier run (after a change to the report writers), in the same folder.
    #[arg(long, value_name = "RESULTS_JSON")]
    pub from_json: Option<PathBuf>,

    /// Keep the run's database and Redis keys for inspection instead of removing them.
    #[arg(long)]
    pub keep_data: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_smoke_run() {
        let args = LoadgenArgs::try_parse_from(["loadgen"]).unwrap();
        assert_eq!(args.scenarios.len(), 12);
        assert_eq!(args.scenarios[0], ScenarioId::PgRow);
        assert_eq!(args.duration, Duration::from_secs(5));
        assert_eq!(args.clients, 64);
        assert_eq!(args.sweep_fractions, vec![0.25, 0.5, 0.75]);
        assert!(args.rate.is_none());
    }

    #[test]
    fn scenarios_and_sweeps_can_be_narrowed() {
        let args = LoadgenArgs::try_parse_from([
            "loadgen",
            "--scenarios",
            "tally-hot,redis-incr-pipelined",
            "--duration",
            "60s",
            "--sweep-fractions",
        ])
        .unwrap();
        assert_eq!(
            args.scenarios,
            vec![ScenarioId::TallyHot, ScenarioId::RedisIncrPipelined]
        );
        assert_eq!(args.duration, Duration::from_secs(60));
        assert!(args.sweep_fractions.is_empty());
        assert_eq!(
            ScenarioId::RedisIncrPipelined.name(),
            "redis-incr-pipelined"
        );
        assert!(ScenarioId::TallyReadFresh.uses_tally() && !ScenarioId::PgSharded.uses_tally());
    }

    #[test]
    fn an_external_tally_needs_its_database_for_the_check() {
        let without_database =
            LoadgenArgs::try_parse_from(["loadgen", "--tally-url", "http://127.0.0.1:8080"]);
        assert!(without_database.is_err());
    }
}
