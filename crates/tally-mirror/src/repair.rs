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
/// Summaries per script call, so no single call holds Redis for long.
const SUMMARIES_PER_CALL: usize = 2_000;

/// One bucket to repair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BucketRepair {
    pub(crate) bucket: u32,
    /// The epoch the bucket had when the repair began; the writes are conditional on it.
    pub(crate) epoch: String,
    /// Counters touched by a commit after this generation are rewritten.
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
) -> redis::RedisResult<(BTreeMap<u32, String>, usize)> {
    let script = redis::Script::new(scripts::CREATE_BUCKET);
    let mut epochs = BTreeMap::new();
    let mut created = 0;
    for chunk in buckets.chunks(BUCKETS as usize) {
        let mut pipeline = pipeline_loading(scripts::CREATE_BUCKET);
        for bucket in chunk {
            let mut invocation = script.key(keys.bucket(*bucket));
            invocation.arg(new_epoch()).arg(valid_from_ms);
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
                .into_iter()
                .map(|partition| (partition.partition, partition.generation))
                .collect()
        }
    };
    let script = redis::Script::new(scripts::REPAIR_BUCKET);
    for chunk in repairs.chunks(BUCKETS_PER_QUERY) {
        let selection = RepairSelection {
            buckets: chunk
                .iter()
                .map(|repair| (repair.bucket, repair.after_generation))
                .collect(),
            partitions: partitions.map(<[i32]>::to_vec),
            windows_from_ms,
        };
        let mut by_bucket: BTreeMap<u32, Vec<NamedSummary>> = BTreeMap::new();
        for (bucket, summary) in store::load_summaries(&mut snapshot, &selection).await? {
            outcome.counters_read += 1;
            by_bucket.entry(bucket).or_default().push(summary);
        }
        let mut pipeline = pipeline_loading(scripts::REPAIR_BUCKET);
        // Per bucket, the position of its last call: the one whose outcome says whether the
        // bucket held (an earlier call of the same bucket returning -1 says so too).
        let mut calls: Vec<u32> = Vec::new();
        for repair in chunk {
            let summaries = by_bucket.remove(&repair.bucket).unwrap_or_default();
            let summary_chunks: Vec<&[NamedSummary]> = if summaries.is_empty() {
                vec![&[]]
            } else {
                summaries.chunks(SUMMARIES_PER_CALL).collect()
            };
            let last = summary_chunks.len() - 1;
            for (index, summaries) in summary_chunks.into_iter().enumerate() {
                let mut invocation = script.key(keys.bucket(repair.bucket));
                invocation.arg(&repair.epoch);
                // The markers and valid_from go with the last call, once every summary is in.
                let final_call = index == last;
                match repair.raise_valid_from_ms.filter(|_| final_call) {
                    Some(valid_from_ms) => invocation.arg(valid_from_ms),
                    None => invocation.arg(""),
                };
                if final_call {
                    invocation.arg(marker_targets.len());
                    for (partition, generation) in &marker_targets {
                        invocation.arg(partition).arg(generation);
                    }
                } else {
                    invocation.arg(0);
                }
                for named in summaries {
                    invocation.arg(&named.name).arg(named.summary.encode());
                }
                pipeline.invoke_script(&invocation);
                calls.push(repair.bucket);
            }
        }
        let replies: Vec<i64> = pipeline.query_async(redis).await?;
        let mut overtaken: BTreeMap<u32, bool> = BTreeMap::new();
        for (bucket, written) in calls.into_iter().zip(replies) {
            let entry = overtaken.entry(bucket).or_insert(false);
            if written < 0 {
                *entry = true;
            } else {
                outcome.summaries_written += written as usize;
            }
        }
        for was_overtaken in overtaken.into_values() {
            if was_overtaken {
                outcome.buckets_overtaken += 1;
            } else {
                outcome.buckets_repaired += 1;
            }
        }
        progress(&outcome);
    }
    snapshot.commit().await?;
    Ok(outcome)
}

/// A pipeline that first loads `script`. Pipelined invocations use EVALSHA and, unlike single
/// ones, do not retry with the source when Redis answers NOSCRIPT (as a restarted Redis does), so
/// every pipeline loads its script itself; loading a loaded script is a no-op.
pub(crate) fn pipeline_loading(script: &str) -> redis::Pipeline {
    let mut pipeline = redis::pipe();
    pipeline.cmd("SCRIPT").arg("LOAD").arg(script).ignore();
    pipeline
}
