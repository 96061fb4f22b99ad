//! `tally`: parse the command line, set up logging, dispatch.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use tally::App;
use tally::cli::{Cli, Command, LogFormat, MigrateArgs};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// Measured in benches/README.md: the batch API spent about a third of the ingest's CPU in the
/// system allocator's `malloc` and `free`, and mimalloc's thread-local free lists raised its
/// throughput by about 40% in side-by-side runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.command.log_format();
    init_logging(log_format);
    let outcome = match cli.command {
        Command::Serve(args) => {
            let cancel = CancellationToken::new();
            tokio::spawn(cancel_on_signal(cancel.clone()));
            match App::build(args, cancel).await {
                Ok(app) => app.run_until_stopped().await,
                Err(error) => Err(error),
            }
        }
        Command::Migrate(args) => migrate(args).await,
        Command::Replay(args) => tally::replay::run(args).await,
    };
    let Err(error) = outcome else {
        return ExitCode::SUCCESS;
    };
    match log_format {
        // What `main() -> anyhow::Result` would print: the error and its causes.
        LogFormat::Text => eprintln!("Error: {error:?}"),
        // A collector reading JSON lines would choke on anyhow's multi-line report.
        LogFormat::Json => error!(error = format!("{error:#}"), "tally failed"),
    }
    ExitCode::FAILURE
}

/// Log lines go to stderr, filtered by `TALLY_LOG`. Colours only when a person is watching: a
/// collector reading a pipe or a file would store the escape codes as text.
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("TALLY_LOG").unwrap_or_else(|_| "info,sqlx=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // One object per line; the event's fields (`message` included) at the top level, where
        // collectors look for them.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_ansi(false)
            .init(),
    }
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let pool = tally_infra::postgres::connect(&args.store)?;
    tally_infra::postgres::migrate(&pool).await?;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .context("failed to count the applied migrations")?;
    println!("migrations: {applied} applied, schema up to date");
    Ok(())
}

/// SIGINT or SIGTERM starts a clean shutdown.
async fn cancel_on_signal(cancel: CancellationToken) {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler should work");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    info!("shutdown requested");
    cancel.cancel();
}
