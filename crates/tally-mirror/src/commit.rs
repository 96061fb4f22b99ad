//! The aggregator's side of the mirror: after each PostgreSQL commit, copy it into every bucket,
//! and repair the buckets that turn out to have lost data.
//!
//! Every commit visits every bucket, even those none of its counters live in: the visit raises
//! the bucket's marker for each of the aggregator's partitions to the commit's generation. A
//! bucket's marker for a partition is therefore the generation up to which it holds that
//! partition's commits, and a bucket that comes back with less than it had (a restart from an
//! older snapshot, a failover that lost writes, an eviction) is found by the next commit, or by a
//! reader comparing the marker with the partition's previous generation in PostgreSQL.

use std::collections::BTreeMap;

use redis::aio::ConnectionLike;
use sqlx::PgPool;
use tracing::warn;

use crate::Mirror;
use crate::bucket::{BUCKETS, bucket_of};
use crate::repair::{self, BucketRepair, FROM_THE_START, MarkerTargets, RepairOutcome, RepairPlan};
use crate::scripts;
use crate::summary::CommittedCounter;

/// Buckets per pipeline: a commit of a few hundred thousand counters takes a few milliseconds of
/// Redis per pipeline, so the ingest's and the readers' commands never queue behind it for long.
const BUCKETS_PER_PIPELINE: usize = 128;

/// One of the committing aggregator's partitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionMark {
    pub partition: i32,
    /// The generation every bucket is known to hold for the partition: the aggregator's last
    /// commit it copied everywhere, or, after an assignment, the partition's latest commit.
    pub known_generation: i64,
    /// What PostgreSQL records as mirrored: a bucket created before it whose marker is below it
    /// had that commit and lost it (rolled back), rather than being rebuilt without it.
    pub mirrored_generation: i64,
}

/// One aggregator commit, as the mirror needs it.
#[derive(Clone, Copy, Debug)]
pub struct CommitToMirror<'a> {
    pub generation: i64,
    pub partitions: &'a [PartitionMark],
    pub counters: &'a [CommittedCounter],
    /// Window records older than this leave the summaries; repairs copy windows from here on.
    pub prune_before_ms: i64,
}

/// What the aggregator may do about buckets that lost data.
#[derive(Clone, Copy, Debug)]
pub struct RepairPolicy {
    /// Give lost buckets (no epoch) a new epoch and fill them from PostgreSQL. Off, they are
    /// left for `tally replay`, and readers fall back for their counters meanwhile. A bucket
    /// that still has its epoch but missed commits is always brought up to date: that is the
    /// aggregator's own copying, finished late.
    pub recreate_lost_buckets: bool,
    /// The first window whose deltas a bucket created now may be read with.
    pub new_bucket_valid_from_ms: i64,
    /// The same, for a bucket found rolled back: its deltas may have lost writes too.
    pub rolled_back_valid_from_ms: i64,
    /// The time (Unix ms), recorded in the buckets created now.
    pub now_ms: i64,
}

/// What copying one commit did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub buckets_applied: usize,
    /// Buckets with no epoch: Redis lost them (or never had them: a first start).
    pub buckets_lost: usize,
    /// Buckets whose markers were below what they were known to hold.
    pub buckets_behind: usize,
    /// Of those, the ones whose marker was below what PostgreSQL recorded as mirrored: Redis
    /// rolled back or lost writes.
    pub buckets_rolled_back: usize,
    /// Buckets where a counter missed a commit.
    pub buckets_with_gaps: usize,
    /// Lost buckets left for `tally replay`, because the policy does not recreate them (and
    /// buckets the replay recreated but has not filled with these partitions yet).
    pub buckets_left: usize,
    pub repair: RepairOutcome,
    /// Buckets that could not be repaired (PostgreSQL failed, or the bucket was lost again).
    pub buckets_failed: usize,
}

impl ApplyReport {
    /// Every bucket either holds the commit or is marked as lost: PostgreSQL may record the
    /// commit as mirrored, and its closed windows may be published.
    pub fn complete(&self) -> bool {
        self.buckets_failed == 0
    }

    pub fn needed_repair(&self) -> bool {
        self.buckets_lost + self.buckets_behind + self.buckets_with_gaps > 0
    }
}

/// How one bucket took the commit.
enum BucketOutcome {
    Applied,
    Lost,
    /// Markers below what the bucket is known to hold, per partition (None: absent).
    Behind {
        epoch: String,
        /// When the bucket got its epoch (0: before buckets recorded it).
        created_ms: i64,
        markers: Vec<(i32, Option<i64>)>,
    },
    Gaps {
        epoch: String,
    },
}

impl Mirror {
    /// Copies a commit into every bucket, then repairs the buckets that lost data, as `policy`
    /// allows. A Redis error means the commit may be in some buckets and not in others; the
    /// caller tries again with its next commit, whose visit finds them behind.
    pub async fn apply_commit(
        &self,
        redis: &mut impl ConnectionLike,
        pool: &PgPool,
        commit: &CommitToMirror<'_>,
        policy: &RepairPolicy,
    ) -> redis::RedisResult<ApplyReport> {
        let outcomes = self.visit_every_bucket(redis, commit).await?;
        let mut report = ApplyReport::default();
        let mut new_buckets = Vec::new();
        let mut repairs = Vec::new();
        let lowest_known = commit
            .partitions
            .iter()
            .map(|mark| mark.known_generation)
            .min()
            .unwrap_or(0);
        for (bucket, outcome) in outcomes {
            match outcome {
                BucketOutcome::Applied => report.buckets_applied += 1,
                BucketOutcome::Lost => {
                    report.buckets_lost += 1;
                    new_buckets.push(bucket);
                }
                BucketOutcome::Behind { markers, .. }
                    if !policy.recreate_lost_buckets
                        && markers.iter().any(|(_, marker)| marker.is_none()) =>
                {
                    // A bucket recreated by someone else (`tally replay`) that has none of
                    // these partitions' commits yet: filling it is a rebuild, which is the
                    // replay's to finish, not a catch-up.
                    report.buckets_left += 1;
                }
                BucketOutcome::Behind {
                    epoch,
                    created_ms,
                    markers,
                } => {
                    report.buckets_behind += 1;
                    // Rolled back: it had a commit that was mirrored, and lost it. A bucket
                    // created after that commit was rebuilt from an older snapshot instead.
                    let rolled_back = markers.iter().any(|(partition, marker)| {
                        commit.partitions.iter().any(|mark| {
                            mark.partition == *partition
                                && created_ms < mark.mirrored_generation
                                && marker.is_some_and(|marker| marker < mark.mirrored_generation)
                        })
                    });
                    report.buckets_rolled_back += rolled_back as usize;
                    let lowest_marker = markers
                        .iter()
                        .map(|(_, marker)| marker.unwrap_or(FROM_THE_START))
                        .min()
                        .unwrap_or(FROM_THE_START);
                    repairs.push(BucketRepair {
                        bucket,
                        epoch,
                        after_generation: lowest_marker.min(lowest_known),
                        raise_valid_from_ms: rolled_back
                            .then_some(policy.rolled_back_valid_from_ms),
                    });
                }
                BucketOutcome::Gaps { epoch } => {
                    report.buckets_with_gaps += 1;
                    repairs.push(BucketRepair {
                        bucket,
                        epoch,
                        after_generation: lowest_known,
                        raise_valid_from_ms: None,
                    });
                }
            }
        }
        if !policy.recreate_lost_buckets {
            report.buckets_left += new_buckets.len();
            new_buckets.clear();
        }
        let (epochs, _) = repair::ensure_epochs(
            redis,
            &self.keys,
            &new_buckets,
            policy.new_bucket_valid_from_ms,
            policy.now_ms,
        )
        .await?;
        repairs.extend(epochs.into_iter().map(|(bucket, epoch)| BucketRepair {
            bucket,
            epoch,
            after_generation: FROM_THE_START,
            raise_valid_from_ms: None,
        }));
        let owned: Vec<i32> = commit
            .partitions
            .iter()
            .map(|mark| mark.partition)
            .collect();
        let targets: Vec<(i32, i64)> = owned
            .iter()
            .map(|partition| (*partition, commit.generation))
            .collect();
        let plan = RepairPlan {
            repairs: &repairs,
            partitions: Some(&owned),
            markers: MarkerTargets::Given(&targets),
            partitions_without_floor: &[],
            windows_from_ms: commit.prune_before_ms,
        };
        match repair::repair_buckets(redis, &self.keys, pool, plan, &mut |_| {}).await {
            Ok(outcome) => {
                report.buckets_failed = outcome.buckets_overtaken;
                report.repair = outcome;
            }
            Err(repair::RepairError::Redis(error)) => return Err(error),
            Err(repair::RepairError::Postgres(error)) => {
                warn!(%error, buckets = repairs.len(), "failed to read postgres to repair redis buckets; will retry");
                report.buckets_failed = repairs.len();
            }
        }
        Ok(report)
    }

    async fn visit_every_bucket(
        &self,
        redis: &mut impl ConnectionLike,
        commit: &CommitToMirror<'_>,
    ) -> redis::RedisResult<Vec<(u32, BucketOutcome)>> {
        let mut by_bucket: BTreeMap<u32, Vec<&CommittedCounter>> = BTreeMap::new();
        for counter in commit.counters {
            by_bucket
                .entry(bucket_of(&counter.name))
                .or_default()
                .push(counter);
        }
        let script = redis::Script::new(scripts::APPLY_COMMIT);
        let buckets: Vec<u32> = (0..BUCKETS).collect();
        let mut outcomes = Vec::with_capacity(BUCKETS as usize);
        for chunk in buckets.chunks(BUCKETS_PER_PIPELINE) {
            let mut pipeline = repair::pipeline_loading(scripts::APPLY_COMMIT);
            for bucket in chunk {
                let mut invocation = script.key(self.keys.bucket(*bucket));
                invocation
                    .arg(commit.generation)
                    .arg(commit.prune_before_ms)
                    .arg(commit.partitions.len());
                for mark in commit.partitions {
                    invocation.arg(mark.partition).arg(mark.known_generation);
                }
                for counter in by_bucket.get(bucket).into_iter().flatten() {
                    invocation
                        .arg(&counter.name)
                        .arg(counter.version)
                        .arg(counter.total)
                        .arg(counter.partition)
                        .arg(counter.touched_windows.len());
                    for (start, records) in &counter.touched_windows {
                        invocation
                            .arg(start)
                            .arg(records.positive)
                            .arg(records.negative);
                    }
                }
                pipeline.invoke_script(&invocation);
            }
            let replies: Vec<Vec<redis::Value>> = pipeline.query_async(redis).await?;
            for (bucket, reply) in chunk.iter().zip(replies) {
                outcomes.push((*bucket, parse_apply_reply(reply)?));
            }
        }
        Ok(outcomes)
    }
}

fn parse_apply_reply(reply: Vec<redis::Value>) -> redis::RedisResult<BucketOutcome> {
    let unexpected = || {
        redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unexpected reply from the apply script",
        ))
    };
    let mut reply = reply.into_iter();
    let status: i64 = redis::from_redis_value(reply.next().ok_or_else(unexpected)?)?;
    match status {
        1 => Ok(BucketOutcome::Applied),
        2 => Ok(BucketOutcome::Lost),
        3 => {
            let epoch: String = redis::from_redis_value(reply.next().ok_or_else(unexpected)?)?;
            let created: String = redis::from_redis_value(reply.next().ok_or_else(unexpected)?)?;
            let mut markers = Vec::new();
            while let Some(partition) = reply.next() {
                let partition: i32 = redis::from_redis_value(partition)?;
                let marker: String = redis::from_redis_value(reply.next().ok_or_else(unexpected)?)?;
                markers.push((partition, marker.parse().ok()));
            }
            Ok(BucketOutcome::Behind {
                epoch,
                created_ms: created.parse().unwrap_or(0),
                markers,
            })
        }
        4 => {
            let epoch: String = redis::from_redis_value(reply.next().ok_or_else(unexpected)?)?;
            Ok(BucketOutcome::Gaps { epoch })
        }
        _ => Err(unexpected()),
    }
}
