//! Repairing buckets: full summaries read from one PostgreSQL snapshot, written with a
//! compare-and-set on the bucket's epoch, then the bucket's markers raised.
//!
//! Both the aggregator (for the buckets its commits found lost or behind) and the rebuild job use
//! it, and they may run at the same time as each other and as commits: summaries only ever move
//! to a newer version, markers only ever rise, and a marker rises to a generation only when the
//! snapshot the summaries came from holds every commit up to it.

use std::collections::BTreeMap;

use rand::Rng as _;
use redis::aio::ConnectionLike;
use sqlx::PgPool;

use crate::bucket::BUCKETS;
use crate::keys::KeySpace;
use crate::scripts;
use crate::store::{self, RepairSelection};
use crate::summary::NamedSummary;

/// Buckets read from PostgreSQL per statement: the snapshot stays one, memory stays bounded.
const BUCKETS_PER_QUERY: usize = 64;
/// Summaries per script call and per pipeline, so no call holds Redis for long and no round
/// trip outlasts the response timeout: the ingest's and the readers' commands share Redis.
const SUMMARIES_PER_CALL: usize = 2_000;

/// Below every generation: counters last touched before generations existed have 0, and
/// commits take the time in milliseconds.
pub(crate) const FROM_THE_START: i64 = -1;

/// One bucket to repair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BucketRepair {
    pub(crate) bucket: u32,
    /// The epoch the bucket had when the repair began; the writes are conditional on it.
    pub(crate) epoch: String,
    /// Counters touched by a commit after this generation are rewritten
    /// ([`FROM_THE_START`]: every counter of the bucket).
    pub(crate) after_generation: i64,
    /// Raise the bucket's `valid_from` to this (Redis lost deltas along with the writes).
    pub(crate) raise_valid_from_ms: Option<i64>,
}

/// What the markers rise to once a bucket's summaries are written.
pub(crate) enum MarkerTargets<'a> {
    /// These partitions, to these generations: the caller committed them before the snapshot.
    Given(&'a [(i32, i64)]),
    /// Every partition of the consumer group, to its latest commit in the snapshot.
    CommittedInSnapshot { group: &'a str, topic: &'a str },
}

/// How a repair went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepairOutcome {
    pub buckets_repaired: usize,
    /// Buckets that lost their data again while they were repaired; they stay untrusted.
    pub buckets_overtaken: usize,
    pub counters_read: usize,
    pub summaries_written: usize,
}

pub(crate) enum RepairError {
    Postgres(sqlx::Error),
    Redis(redis::RedisError),
}

impl From<sqlx::Error> for RepairError {
    fn from(error: sqlx::Error) -> Self {
        RepairError::Postgres(error)
    }
}

impl From<redis::RedisError> for RepairError {
    fn from(error: redis::RedisError) -> Self {
        RepairError::Redis(error)
    }
}

impl std::fmt::Display for RepairError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepairError::Postgres(error) => write!(formatter, "postgres: {error}"),
            RepairError::Redis(error) => write!(formatter, "redis: {error}"),
        }
    }
}

/// A new random epoch.
pub(crate) fn new_epoch() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

/// Gives each bucket an epoch, creating one (with `valid_from_ms`) where it has none. Returns
/// the epochs in force, by bucket, and how many were created.
pub(crate) async fn ensure_epochs(
    redis: &mut impl ConnectionLike,
    keys: &KeySpace,
    buckets: &[u32],
    valid_from_ms: i64,
    now_ms: i64,
) -> redis::RedisResult<(BTreeMap<u32, String>, usize)> {
    let script = redis::Script::new(scripts::CREATE_BUCKET);
    let mut epochs = BTreeMap::new();
    let mut created = 0;
    for chunk in buckets.chunks(BUCKETS as usize) {
        let mut pipeline = pipeline_loading(scripts::CREATE_BUCKET);
        for bucket in chunk {
            let mut invocation = script.key(keys.bucket(*bucket));
            invocation.arg(new_epoch()).arg(valid_from_ms).arg(now_ms);
            pipeline.invoke_script(&invocation);
        }
        let replies: Vec<(String, i64)> = pipeline.query_async(redis).await?;
        for (bucket, (epoch, was_created)) in chunk.iter().zip(replies) {
            created += was_created as usize;
            epochs.insert(*bucket, epoch);
        }
    }
    Ok((epochs, created))
}

/// What one repair does.
pub(crate) struct RepairPlan<'a> {
    pub(crate) repairs: &'a [BucketRepair],
    /// Only the counters of these partitions (the repairing aggregator's); None for all.
    pub(crate) partitions: Option<&'a [i32]>,
    pub(crate) markers: MarkerTargets<'a>,
    /// Partitions whose markers need not hold a repair's starting generation: nothing was ever
    /// committed for them when the repair was planned, so they may have no marker at all.
    pub(crate) partitions_without_floor: &'a [i32],
    /// Window records from this window on go into the summaries.
    pub(crate) windows_from_ms: i64,
}

/// Reads the buckets' counters from one PostgreSQL snapshot and writes them, a chunk of buckets
/// at a time. `progress` hears about every chunk written.
pub(crate) async fn repair_buckets(
    redis: &mut impl ConnectionLike,
    keys: &KeySpace,
    pool: &PgPool,
    plan: RepairPlan<'_>,
    progress: &mut dyn FnMut(&RepairOutcome),
) -> Result<RepairOutcome, RepairError> {
    let RepairPlan {
        repairs,
        partitions,
        markers,
        partitions_without_floor,
        windows_from_ms,
    } = plan;
    let mut outcome = RepairOutcome::default();
    if repairs.is_empty() {
        return Ok(outcome);
    }
    let mut snapshot = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *snapshot)
        .await?;
    let marker_targets: Vec<(i32, i64)> = match markers {
        MarkerTargets::Given(targets) => targets.to_vec(),
        MarkerTargets::CommittedInSnapshot { group, topic } => {
            store::partition_generations(&mut *snapshot, group, topic)
                .await?
                .partitions
                .into_iter()
                .map(|partition| (partition.partition, partition.generation))
                .collect()
        }
    };
    let mut recent_windows = None;
    let writer = ChunkWriter {
        keys,
        script: redis::Script::new(scripts::REPAIR_BUCKET),
        marker_targets: &marker_targets,
        partitions_without_floor,
    };
    let chunks: Vec<&[BucketRepair]> = repairs.chunks(BUCKETS_PER_QUERY).collect();
    let load = |chunk: &[BucketRepair]| RepairSelection {
        buckets: chunk
            .iter()
            .map(|repair| (repair.bucket, repair.after_generation))
            .collect(),
        partitions: partitions.map(<[i32]>::to_vec),
        windows_from_ms,
    };
    let mut loaded =
        store::load_summaries(&mut snapshot, &load(chunks[0]), &mut recent_windows).await?;
    for (index, chunk) in chunks.iter().enumerate() {
        outcome.counters_read += loaded.len();
        // Reading the next chunk from PostgreSQL while this one goes to Redis: the two stores
        // work at the same time, and the rebuild takes about the longer of the two.
        let next = chunks.get(index + 1).map(|next| load(next));
        let (written, next_loaded) = tokio::join!(
            writer.write(redis, chunk, std::mem::take(&mut loaded)),
            async {
                match &next {
                    Some(selection) => {
                        store::load_summaries(&mut snapshot, selection, &mut recent_windows)
                            .await
                            .map(Some)
                    }
                    None => Ok(None),
                }
            }
        );
        let written = written?;
        outcome.summaries_written += written.summaries_written;
        outcome.buckets_repaired += written.buckets_repaired;
        outcome.buckets_overtaken += written.buckets_overtaken;
        progress(&outcome);
        if let Some(next_loaded) = next_loaded? {
            loaded = next_loaded;
        }
    }
    snapshot.commit().await?;
    Ok(outcome)
}

/// Writes chunks of repaired buckets into Redis.
struct ChunkWriter<'a> {
    keys: &'a KeySpace,
    script: redis::Script,
    marker_targets: &'a [(i32, i64)],
    partitions_without_floor: &'a [i32],
}

impl ChunkWriter<'_> {
    /// One script call per bucket (more for a bucket above [`SUMMARIES_PER_CALL`] counters), in
    /// pipelines of about [`SUMMARIES_PER_CALL`] summaries.
    async fn write(
        &self,
        redis: &mut impl ConnectionLike,
        chunk: &[BucketRepair],
        loaded: Vec<(u32, NamedSummary)>,
    ) -> redis::RedisResult<RepairOutcome> {
        let mut by_bucket: BTreeMap<u32, Vec<NamedSummary>> = BTreeMap::new();
        for (bucket, summary) in loaded {
            by_bucket.entry(bucket).or_default().push(summary);
        }
        let mut pipelines: Vec<(redis::Pipeline, Vec<u32>)> = Vec::new();
        let mut pipeline = pipeline_loading(scripts::REPAIR_BUCKET);
        let mut calls: Vec<u32> = Vec::new();
        let mut summaries_in_pipeline = 0;
        for repair in chunk {
            let summaries = by_bucket.remove(&repair.bucket).unwrap_or_default();
            let summary_chunks: Vec<&[NamedSummary]> = if summaries.is_empty() {
                vec![&[]]
            } else {
                summaries.chunks(SUMMARIES_PER_CALL).collect()
            };
            let last = summary_chunks.len() - 1;
            for (index, summaries) in summary_chunks.into_iter().enumerate() {
                let invocation = self.invocation(repair, summaries, index == last);
                if summaries_in_pipeline + summaries.len() > SUMMARIES_PER_CALL && !calls.is_empty()
                {
                    let full =
                        std::mem::replace(&mut pipeline, pipeline_loading(scripts::REPAIR_BUCKET));
                    pipelines.push((full, std::mem::take(&mut calls)));
                    summaries_in_pipeline = 0;
                }
                pipeline.invoke_script(&invocation);
                calls.push(repair.bucket);
                summaries_in_pipeline += summaries.len();
            }
        }
        pipelines.push((pipeline, calls));
        let mut outcome = RepairOutcome::default();
        // Per bucket: whether any of its calls found the epoch changed.
        let mut overtaken: BTreeMap<u32, bool> = BTreeMap::new();
        for (pipeline, calls) in pipelines {
            let written: Vec<i64> = pipeline.query_async(redis).await?;
            for (bucket, written) in calls.into_iter().zip(written) {
                let entry = overtaken.entry(bucket).or_insert(false);
                if written < 0 {
                    *entry = true;
                } else {
                    outcome.summaries_written += written as usize;
                }
            }
        }
        for was_overtaken in overtaken.into_values() {
            if was_overtaken {
                outcome.buckets_overtaken += 1;
            } else {
                outcome.buckets_repaired += 1;
            }
        }
        Ok(outcome)
    }

    /// One script call: some of a bucket's summaries, and with the last call of the bucket its
    /// markers and `valid_from`, once every summary is in.
    fn invocation<'s>(
        &'s self,
        repair: &BucketRepair,
        summaries: &[NamedSummary],
        final_call: bool,
    ) -> redis::ScriptInvocation<'s> {
        let mut invocation = self.script.key(self.keys.bucket(repair.bucket));
        invocation.arg(&repair.epoch);
        match repair.raise_valid_from_ms.filter(|_| final_call) {
            Some(valid_from_ms) => invocation.arg(valid_from_ms),
            None => invocation.arg(""),
        };
        // Every call checks the floors: the bucket must still hold what the repair did not
        // read, up to its starting generation. The markers rise with the last call only.
        invocation.arg(self.marker_targets.len());
        for (partition, generation) in self.marker_targets {
            invocation.arg(partition);
            if repair.after_generation == FROM_THE_START
                || self.partitions_without_floor.contains(partition)
            {
                invocation.arg("");
            } else {
                invocation.arg(repair.after_generation);
            }
            if final_call {
                invocation.arg(*generation);
            } else {
                invocation.arg("");
            }
        }
        for named in summaries {
            invocation.arg(&named.name).arg(named.summary.encode());
        }
        invocation
    }
}

/// A pipeline that first loads `script`. Pipelined invocations use EVALSHA and, unlike single
/// ones, do not retry with the source when Redis answers NOSCRIPT (as a restarted Redis does), so
/// every pipeline loads its script itself; loading a loaded script is a no-op.
pub(crate) fn pipeline_loading(script: &str) -> redis::Pipeline {
    let mut pipeline = redis::pipe();
    pipeline.cmd("SCRIPT").arg("LOAD").arg(script).ignore();
    pipeline
}
