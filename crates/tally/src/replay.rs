//! `tally replay`: rebuilds the Redis mirror from PostgreSQL while traffic goes on, with a
//! progress bar on a terminal and a line per chunk otherwise. The work itself is
//! `tally_mirror::rebuild`'s.

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Context as _;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tally_infra::clock::now_ms;
use tally_infra::config::{AggregatorConfig, PipelineConfig, StoreConfig};
use tally_mirror::{
    KeySpace, Mirror, RebuildProgress, RebuildReport, RebuildSettings, SUMMARY_WINDOW_MARGIN,
};

use crate::cli::ReplayArgs;

/// Without a terminal, a progress line every this many counters.
const COUNTERS_PER_PROGRESS_LINE: usize = 100_000;

/// Rebuilds every bucket of the mirror that needs it (every bucket with `full`).
pub async fn rebuild_mirror(
    store: &StoreConfig,
    pipeline: &PipelineConfig,
    aggregator: &AggregatorConfig,
    pool: &PgPool,
    redis: &ConnectionManager,
    full: bool,
    progress: &mut dyn FnMut(RebuildProgress),
) -> anyhow::Result<RebuildReport> {
    let mirror = Mirror::new(
        KeySpace::new(store.redis_prefix.clone()),
        pipeline.window_spec(),
        pipeline.delta_ttl_ms(),
    );
    let settings = RebuildSettings {
        group: &aggregator.aggregator_group,
        topic: &store.kafka_topic,
        partition_count: topic_partition_count(store).await,
        full,
        summary_window_margin: SUMMARY_WINDOW_MARGIN,
    };
    let mut redis = redis.clone();
    let report = mirror
        .rebuild(&mut redis, pool, &settings, now_ms, progress)
        .await?;
    anyhow::ensure!(
        report.buckets_left_lost == 0,
        "{} buckets were lost again in each of {} passes while the replay ran; run it again once redis is stable",
        report.buckets_left_lost,
        report.passes
    );
    Ok(report)
}

/// The topic's partition count from Kafka, or 0 when Kafka does not answer: the rebuild then
/// uses the partitions PostgreSQL knows, which are every partition ever consumed.
async fn topic_partition_count(store: &StoreConfig) -> usize {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let client = tally_infra::kafka::metadata_client(&store).ok()?;
        tally_infra::kafka::fetch_partition_count(
            &client,
            &store.kafka_topic,
            Duration::from_secs(5),
        )
        .ok()
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(0)
}

/// The `tally replay` command.
pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let pool = tally_infra::postgres::connect(&args.store)?;
    let redis = tally_infra::redis_store::connect(&args.store)?;
    let mut reporter = ProgressReporter::new();
    let report = rebuild_mirror(
        &args.store,
        &args.pipeline,
        &args.aggregator,
        &pool,
        &redis,
        args.full,
        &mut |progress| reporter.show(progress),
    )
    .await
    .context("the replay failed")?;
    reporter.finish();
    println!(
        "replay done: {} buckets checked, {} had lost their data, {} had rolled back; {} counters read from postgres, {} summaries written, in {:.1}s",
        tally_mirror::BUCKETS,
        report.buckets_lost,
        report.buckets_rolled_back,
        report.repair.counters_read,
        report.repair.summaries_written,
        report.duration.as_secs_f64()
    );
    Ok(())
}

/// A progress bar on a terminal; otherwise a plain line now and then, for a log.
struct ProgressReporter {
    bar: Option<indicatif::ProgressBar>,
    next_line_at: usize,
}

impl ProgressReporter {
    fn new() -> Self {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(u64::from(tally_mirror::BUCKETS));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "replay {bar:40} {pos}/{len} buckets, {msg} [{elapsed}]",
                )
                .expect("the progress template should parse"),
            );
            bar
        });
        Self {
            bar,
            next_line_at: COUNTERS_PER_PROGRESS_LINE,
        }
    }

    fn show(&mut self, progress: RebuildProgress) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(progress.buckets_total as u64);
                bar.set_position(progress.buckets_done as u64);
                bar.set_message(format!("{} counters", progress.counters_read));
            }
            None if progress.counters_read >= self.next_line_at
                || progress.buckets_done == progress.buckets_total =>
            {
                println!(
                    "replay: {}/{} buckets, {} counters read",
                    progress.buckets_done, progress.buckets_total, progress.counters_read
                );
                self.next_line_at = progress.counters_read + COUNTERS_PER_PROGRESS_LINE;
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
