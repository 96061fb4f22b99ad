//! The command line: `tally serve`, `tally migrate`, `tally replay`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use tally_infra::config::{
    AggregatorConfig, HttpConfig, IngestConfig, PipelineConfig, ReadConfig, SecurityConfig,
    StoreConfig,
};

/// Tally: an exact, fast distributed counter service.
#[derive(Debug, Parser)]
#[command(name = "tally", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API and the chosen roles (all of them by default) in this process.
    Serve(ServeArgs),
    /// Apply the PostgreSQL migrations. Running it again is a no-op.
    Migrate(MigrateArgs),
    /// Rebuild the Redis mirror from PostgreSQL, while traffic goes on. Safe to run at any time.
    Replay(ReplayArgs),
}

/// A role one process can play. Roles are stateless except for the aggregator's partitions,
/// so each can be scaled on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The write routes: Kafka, then Redis, then 202.
    Ingest,
    /// The read routes: cache, Redis, or PostgreSQL.
    Read,
    /// The Kafka consumer that writes PostgreSQL once per window.
    Aggregator,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured only when stderr is a terminal.
    Text,
    /// One JSON object per line, for a log collector.
    Json,
}

/// The logging flags every subcommand takes (the filter itself is `TALLY_LOG`).
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Format of the log lines on stderr: `text`, or `json` for a log collector.
    #[arg(long, env = "TALLY_LOG_FORMAT", value_parser = parse_log_format, default_value = "text")]
    pub log_format: LogFormat,
}

/// Like clap's own enum parser, but the error names the variable too: the value usually comes
/// from `TALLY_LOG_FORMAT`, and a typo there must stop the start, not fall back to text.
fn parse_log_format(value: &str) -> Result<LogFormat, String> {
    LogFormat::from_str(value, false)
        .map_err(|_| "TALLY_LOG_FORMAT (--log-format) must be `text` or `json`".to_owned())
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Roles to run, comma separated.
    #[arg(
        long,
        env = "TALLY_ROLES",
        value_delimiter = ',',
        default_value = "ingest,read,aggregator"
    )]
    pub roles: Vec<Role>,

    /// Apply the migrations before serving.
    #[arg(long, env = "TALLY_MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,

    /// With the aggregator role: repair the buckets of the Redis mirror that lost data by
    /// itself. Off, they wait for `tally replay`, and reads of their counters use PostgreSQL.
    #[arg(long, env = "TALLY_AUTO_REPLAY", default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_replay: bool,

    /// Longest time a clean shutdown may take, in seconds, before the process exits anyway.
    #[arg(long, env = "TALLY_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,

    #[command(flatten)]
    pub http: HttpConfig,
    #[command(flatten)]
    pub store: StoreConfig,
    #[command(flatten)]
    pub pipeline: PipelineConfig,
    #[command(flatten)]
    pub ingest: IngestConfig,
    #[command(flatten)]
    pub read: ReadConfig,
    #[command(flatten)]
    pub aggregator: AggregatorConfig,
    #[command(flatten)]
    pub security: SecurityConfig,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub store: StoreConfig,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Rewrite every counter's summary, not only those of the buckets that lost data or missed
    /// commits.
    #[arg(long)]
    pub full: bool,

    #[command(flatten)]
    pub store: StoreConfig,
    #[command(flatten)]
    pub pipeline: PipelineConfig,
    #[command(flatten)]
    pub aggregator: AggregatorConfig,
    #[command(flatten)]
    pub log: LogArgs,
}

impl Command {
    pub fn log_format(&self) -> LogFormat {
        match self {
            Command::Serve(args) => args.log.log_format,
            Command::Migrate(args) => args.log.log_format,
            Command::Replay(args) => args.log.log_format,
        }
    }
}

impl ServeArgs {
    /// The settings every flag and variable defaults to, as on the local stack.
    pub fn defaults() -> Self {
        match Cli::parse_from(["tally", "serve"]).command {
            Command::Serve(args) => args,
            _ => unreachable!("`tally serve` should parse as the serve command"),
        }
    }

    pub fn runs(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}
