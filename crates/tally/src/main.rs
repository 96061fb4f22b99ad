//! `tally`: parse the command line, set up logging, dispatch.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use tally::App;
use tally::cli::{Cli, Command, MigrateArgs, ReplayArgs};
use tally_replay::ReplayJob;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Measured in benches/README.md: the batch API spent about a third of the ingest's CPU in the
/// system allocator's `malloc` and `free`, and mimalloc's thread-local free lists raised its
/// throughput by about 40% in side-by-side runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG")
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => {
            let cancel = CancellationToken::new();
            tokio::spawn(cancel_on_signal(cancel.clone()));
            App::build(args, cancel).await?.run_until_stopped().await
        }
        Command::Migrate(args) => migrate(args).await,
        Command::Replay(args) => replay(args).await,
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

async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let pool = tally_infra::postgres::connect(&args.store)?;
    let redis = tally_infra::redis_store::connect(&args.store)?;
    let job = ReplayJob::new(
        &args.store,
        &args.pipeline,
        &args.aggregator,
        pool,
        redis,
        Duration::from_secs(args.wait_secs),
    );
    let summary = job.run(|line| println!("{line}")).await?;
    println!(
        "replay done: {} counters rebuilt ({} summaries written), {} records replayed, redis {}, in {:.1}s",
        summary.counters_rebuilt,
        summary.summaries_written,
        summary.records_replayed,
        if summary.redis_was_lost {
            "had lost its data"
        } else {
            "was intact"
        },
        summary.duration.as_secs_f64()
    );
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
