//! Rebuilding the mirror from PostgreSQL (`tally replay`), while traffic goes on.
//!
//! Every bucket is checked: a bucket without an epoch gets a new one, a bucket whose markers
//! are below what PostgreSQL records as mirrored is marked as having lost deltas too, and every
//! bucket gets the counters committed after its lowest marker (all of them for a new bucket, none
//! for a bucket that lost nothing), read from one PostgreSQL snapshot. Its markers then rise to
//! each partition's latest commit in that snapshot. Commits that land meanwhile are copied by the
//! aggregators as usual; the version checks make the order of the two writers irrelevant.
//!
//! Running it again changes nothing. A bucket that loses its data again while it is rebuilt is
//! left untrusted by the epoch check and rebuilt in the next pass.

use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use sqlx::PgPool;

use crate::Mirror;
use crate::bucket::BUCKETS;
use crate::closed::publish_closed_windows;
use crate::keys::{CREATED_FIELD, EPOCH_FIELD, generation_field};
use crate::repair::{
    self, BucketRepair, FROM_THE_START, MarkerTargets, RepairError, RepairOutcome, RepairPlan,
};
use crate::store;

/// A rebuild gives up after this many passes that each found a bucket lost again.
const MAX_PASSES: usize = 3;

/// What the rebuild needs to know beyond the mirror itself.
#[derive(Clone, Copy, Debug)]
pub struct RebuildSettings<'a> {
    pub group: &'a str,
    pub topic: &'a str,
    /// The topic's partition count, from Kafka (0 when Kafka could not say: then the partitions
    /// PostgreSQL knows are used).
    pub partition_count: usize,
    /// Rewrite every counter, not just those committed after each bucket's markers.
    pub full: bool,
    /// How many windows before the oldest closed one the summaries keep window records for.
    pub summary_window_margin: i64,
}

/// How far a rebuild has got, for a progress bar.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RebuildProgress {
    pub buckets_done: usize,
    pub buckets_total: usize,
    pub counters_read: usize,
}

/// What a rebuild did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RebuildReport {
    /// Buckets that had no epoch: Redis had lost them, or never had them.
    pub buckets_lost: usize,
    /// Buckets whose markers were below what PostgreSQL recorded as mirrored.
    pub buckets_rolled_back: usize,
    pub repair: RepairOutcome,
    /// Passes made; more than one when a bucket was lost again during a pass.
    pub passes: usize,
    /// Buckets still untrusted at the end because they kept being lost.
    pub buckets_left_lost: usize,
    pub duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("failed to read postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("failed to reach redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl From<RepairError> for RebuildError {
    fn from(error: RepairError) -> Self {
        match error {
            RepairError::Postgres(error) => RebuildError::Postgres(error),
            RepairError::Redis(error) => RebuildError::Redis(error),
        }
    }
}

impl Mirror {
    /// Rebuilds every bucket that needs it. `progress` hears about every chunk of buckets.
    pub async fn rebuild(
        &self,
        redis: &mut impl ConnectionLike,
        pool: &PgPool,
        settings: &RebuildSettings<'_>,
        now_ms: impl Fn() -> i64,
        progress: &mut dyn FnMut(RebuildProgress),
    ) -> Result<RebuildReport, RebuildError> {
        let started = Instant::now();
        let mut report = RebuildReport::default();
        let generations = store::partition_generations(pool, settings.group, settings.topic)
            .await?
            .partitions;
        let partition_count = generations
            .iter()
            .map(|partition| partition.partition as usize + 1)
            .max()
            .unwrap_or(0)
            .max(settings.partition_count);
        let generations_of = |partition: i32| {
            generations
                .iter()
                .find(|generations| generations.partition == partition)
                .copied()
        };
        let mirrored = |partition: i32| {
            generations_of(partition).map_or(0, |generations| generations.mirrored_generation)
        };
        // A partition nothing was ever committed for has no marker anywhere, and needs none.
        let committed = |partition: i32| {
            generations_of(partition).is_some_and(|generations| generations.generation > 0)
        };
        let never_mirrored = generations
            .iter()
            .all(|partition| partition.mirrored_generation == 0);
        let length = self.window.length_ms;
        let closed_windows: Vec<(i32, i64)> = generations
            .iter()
            .filter_map(|partition| {
                partition
                    .closed_window_ms
                    .map(|closed| (partition.partition, closed))
            })
            .collect();
        let oldest_closed = (closed_windows.len() == partition_count)
            .then(|| closed_windows.iter().map(|(_, closed)| *closed).min())
            .flatten();
        let windows_from_ms = oldest_closed.map_or_else(
            || now_ms() - self.delta_ttl_ms,
            |closed| closed - settings.summary_window_margin * length,
        );

        let uncommitted: Vec<i32> = (0..partition_count as i32)
            .filter(|partition| !committed(*partition))
            .collect();
        let mut remaining: Vec<u32> = (0..BUCKETS).collect();
        while !remaining.is_empty() && report.passes < MAX_PASSES {
            report.passes += 1;
            let next_window_ms = self.window.start_of(now_ms()) + length;
            let markers = self
                .read_markers(redis, &remaining, partition_count)
                .await?;
            let lost: Vec<u32> = markers
                .iter()
                .filter(|bucket| bucket.epoch.is_none())
                .map(|bucket| bucket.bucket)
                .collect();
            report.buckets_lost += lost.len();
            // A mirror that never existed cannot have lost a delta.
            let new_bucket_valid_from = if never_mirrored { 0 } else { next_window_ms };
            let (created, _) =
                repair::ensure_epochs(redis, &self.keys, &lost, new_bucket_valid_from, now_ms())
                    .await?;
            let mut repairs = Vec::with_capacity(remaining.len());
            for BucketMarkers {
                bucket,
                epoch,
                created_ms,
                markers: bucket_markers,
            } in markers
            {
                let (epoch, after_generation, raise_valid_from_ms) = match epoch {
                    Some(epoch) => {
                        // Rolled back: it had a commit that was mirrored, and lost it.
                        let rolled_back =
                            bucket_markers
                                .iter()
                                .enumerate()
                                .any(|(partition, marker)| {
                                    let mirrored = mirrored(partition as i32);
                                    created_ms < mirrored
                                        && marker.is_some_and(|marker| marker < mirrored)
                                });
                        report.buckets_rolled_back += rolled_back as usize;
                        let lowest = bucket_markers
                            .iter()
                            .enumerate()
                            .filter(|(partition, _)| committed(*partition as i32))
                            .map(|(_, marker)| marker.unwrap_or(FROM_THE_START))
                            .min()
                            .unwrap_or(FROM_THE_START);
                        (epoch, lowest, rolled_back.then_some(next_window_ms))
                    }
                    None => (created[&bucket].clone(), FROM_THE_START, None),
                };
                repairs.push(BucketRepair {
                    bucket,
                    epoch,
                    after_generation: if settings.full {
                        FROM_THE_START
                    } else {
                        after_generation
                    },
                    raise_valid_from_ms,
                });
            }
            let buckets_total = repairs.len();
            let counters_before = report.repair.counters_read;
            let plan = RepairPlan {
                repairs: &repairs,
                partitions: None,
                markers: MarkerTargets::CommittedInSnapshot {
                    group: settings.group,
                    topic: settings.topic,
                },
                partitions_without_floor: &uncommitted,
                windows_from_ms,
            };
            let outcome = repair::repair_buckets(redis, &self.keys, pool, plan, &mut |outcome| {
                progress(RebuildProgress {
                    buckets_done: outcome.buckets_repaired + outcome.buckets_overtaken,
                    buckets_total,
                    counters_read: counters_before + outcome.counters_read,
                })
            })
            .await?;
            report.repair.buckets_repaired += outcome.buckets_repaired;
            report.repair.counters_read += outcome.counters_read;
            report.repair.summaries_written += outcome.summaries_written;
            // The buckets lost again are found by reading the markers once more.
            remaining = if outcome.buckets_overtaken == 0 {
                Vec::new()
            } else {
                self.read_markers(redis, &remaining, 0)
                    .await?
                    .into_iter()
                    .filter(|bucket| bucket.epoch.is_none())
                    .map(|bucket| bucket.bucket)
                    .collect()
            };
        }
        report.buckets_left_lost = remaining.len();
        if !closed_windows.is_empty() {
            publish_closed_windows(redis, &self.keys, partition_count, &closed_windows).await?;
        }
        report.duration = started.elapsed();
        Ok(report)
    }

    /// Each bucket's epoch, creation time and marker for each partition.
    async fn read_markers(
        &self,
        redis: &mut impl ConnectionLike,
        buckets: &[u32],
        partition_count: usize,
    ) -> redis::RedisResult<Vec<BucketMarkers>> {
        let mut pipeline = redis::pipe();
        for bucket in buckets {
            let command = pipeline.cmd("HMGET").arg(self.keys.bucket(*bucket));
            command.arg(EPOCH_FIELD).arg(CREATED_FIELD);
            for partition in 0..partition_count {
                command.arg(generation_field(partition as i32));
            }
        }
        let replies: Vec<Vec<Option<String>>> = pipeline.query_async(redis).await?;
        Ok(buckets
            .iter()
            .zip(replies)
            .map(|(bucket, fields)| {
                let mut fields = fields.into_iter();
                let epoch = fields.next().flatten();
                let created_ms = fields
                    .next()
                    .flatten()
                    .and_then(|created| created.parse().ok())
                    .unwrap_or(0);
                let markers = fields
                    .map(|marker| marker.and_then(|marker| marker.parse().ok()))
                    .collect();
                BucketMarkers {
                    bucket: *bucket,
                    epoch,
                    created_ms,
                    markers,
                }
            })
            .collect())
    }
}

/// What a bucket's markers say, as the rebuild reads them.
struct BucketMarkers {
    bucket: u32,
    epoch: Option<String>,
    /// When the bucket got its epoch (0: before buckets recorded it).
    created_ms: i64,
    /// Per partition, by number; None when absent.
    markers: Vec<Option<i64>>,
}
