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
    /// Rebuild Redis from PostgreSQL, while traffic goes on. Safe to run at any time.
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

    /// With the aggregator role: rebuild Redis by itself when it finds Redis lost its data.
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
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub store: StoreConfig,
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// How long to wait for the aggregator to apply the records not yet in PostgreSQL, in
    /// seconds.
    #[arg(long, env = "TALLY_REPLAY_WAIT_SECS", default_value_t = 600)]
    pub wait_secs: u64,

    #[command(flatten)]
    pub store: StoreConfig,
    #[command(flatten)]
    pub pipeline: PipelineConfig,
    #[command(flatten)]
    pub aggregator: AggregatorConfig,
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
