//! The readers' side of the mirror: counter values from Redis alone, and for each counter
//! whether its bucket can be trusted. A counter whose bucket cannot be trusted is the caller's
//! to read from PostgreSQL; it is never guessed from what Redis happens to hold.
//!
//! A bucket is trusted for a counter when:
//! - it has an epoch, the same before and after the read (it did not lose its data meanwhile);
//! - its marker for the counter's partition is at least the partition's floor ([`MarkerFloors`]):
//!   the previous generation in PostgreSQL, since an aggregator copies a commit into every bucket
//!   before it makes the next, so a bucket below it came back from an older snapshot, lost writes
//!   in a failover, or missed commits while Redis was unreachable (and with them, deltas the
//!   ingest could not add); and the latest generation for a commit made before the Redis server
//!   was first seen, since a server that restarted or took over may have lost even that one. For
//!   a counter it has no summary of, every committed partition's marker must be there and at its
//!   floor, which proves the counter is new rather than lost;
//! - its `valid_from` is no later than the first window the read takes from the deltas (the
//!   deltas of windows open when the bucket was lost may be missing writes);
//! - the summary still has the window records of every window the read needs;
//! - no set of the counter may still be on its way into the summary ([`crate::pending_sets`]).

use std::collections::{BTreeMap, HashMap};

use redis::aio::ConnectionLike;

use crate::Mirror;
use crate::bucket::bucket_of;
use crate::closed::ClosedWindows;
use crate::keys::{
    DELTA_NEGATIVE_FIELD, DELTA_POSITIVE_FIELD, EPOCH_FIELD, SHARD_COUNT_FIELD, VALID_FROM_FIELD,
    counter_field, generation_field, pending_set_field,
};
use crate::pending_sets::PendingSetMark;
use crate::store::PartitionGenerations;
use crate::summary::CounterSummary;
use crate::value::{WindowDeltas, combine_value};

/// Most windows one read sums deltas over. Normally a few (the close delay over the window
/// length); past this, the aggregator is far behind and PostgreSQL answers instead.
const MAX_WINDOWS_PER_READ: usize = 120;

/// Why a counter was not read from Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Untrusted {
    /// No aggregator has published closed windows for every partition (yet, or since Redis lost
    /// them).
    NoClosedWindows,
    /// The aggregator is further behind than deltas live.
    DeltasExpired,
    /// The counter's bucket has no epoch, or lost it during the read.
    BucketLost,
    /// The bucket's marker is below the partition's previous generation: Redis lost writes, or
    /// missed commits while it was unreachable.
    BucketBehind,
    /// The aggregator is so far behind that a read would have to sum too many windows.
    AggregatorFarBehind,
    /// The bucket was rebuilt recently: the deltas the read needs may be incomplete.
    DeltasNotYetValid,
    /// The summary no longer has the window records the read needs.
    SummaryIncomplete,
    /// The summary does not parse.
    CorruptSummary,
    /// A set of the counter was accepted and may not be in the summary yet.
    SetInFlight,
}

impl Untrusted {
    pub fn as_label(self) -> &'static str {
        match self {
            Untrusted::NoClosedWindows => "no_closed_windows",
            Untrusted::DeltasExpired => "deltas_expired",
            Untrusted::BucketLost => "bucket_lost",
            Untrusted::BucketBehind => "bucket_behind",
            Untrusted::AggregatorFarBehind => "aggregator_far_behind",
            Untrusted::DeltasNotYetValid => "deltas_not_yet_valid",
            Untrusted::SummaryIncomplete => "summary_incomplete",
            Untrusted::CorruptSummary => "corrupt_summary",
            Untrusted::SetInFlight => "set_in_flight",
        }
    }
}

/// What a bucket said about itself in one read.
struct BucketState {
    epoch: Option<String>,
    valid_from_ms: i64,
    /// Marker per partition, by number (None when absent).
    markers: Vec<Option<i64>>,
}

/// One counter's part of the first round trip.
struct CounterReplies {
    summary: Result<Option<CounterSummary>, Untrusted>,
    pending_set: Option<PendingSetMark>,
    /// Per window: (shard count, shard 0's deltas).
    windows: Vec<(u32, WindowDeltas)>,
}

/// Per partition, the lowest marker a bucket may have and still be trusted for the partition's
/// counters. A partition nothing was committed for has no floor: a bucket needs no marker for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MarkerFloors(pub BTreeMap<i32, i64>);

impl MarkerFloors {
    /// The floors for reading a Redis server first seen at `server_seen_ms`, both by
    /// PostgreSQL's clock. A commit made before the server was seen must be in it whole; for a
    /// later one, the commit before it must (the latest may still be on its way into the
    /// buckets, and the aggregator makes it only after copying the one before).
    pub fn for_server(partitions: &[PartitionGenerations], server_seen_ms: i64) -> Self {
        Self(
            partitions
                .iter()
                .filter(|partition| partition.generation > 0)
                .map(|partition| {
                    let floor = if partition.committed_at_ms < server_seen_ms {
                        partition.generation
                    } else {
                        partition.previous_generation
                    };
                    (partition.partition, floor)
                })
                .collect(),
        )
    }
}

/// What one read from Redis came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorRead {
    /// The `run_id` of the Redis server that answered. A caller whose floors were made for
    /// another server must make them anew and read again: this one may hold older data.
    pub server_run_id: String,
    /// The outer error is for the whole read; the inner, per counter.
    pub values: Result<Vec<Result<i64, Untrusted>>, Untrusted>,
}

impl Mirror {
    /// Reads counters from Redis: at most two round trips (buckets and first shards, then the
    /// other shards of hot counters). `floors` come from PostgreSQL's view of each partition
    /// ([`MarkerFloors::for_server`]; None when PostgreSQL could not be read: then lost writes
    /// are only found by the aggregators' commits).
    pub async fn read_values(
        &self,
        redis: &mut impl ConnectionLike,
        closed: &ClosedWindows,
        floors: Option<&MarkerFloors>,
        names: &[&str],
        now_ms: i64,
    ) -> redis::RedisResult<MirrorRead> {
        let length = self.window.length_ms;
        let untrusted = |reason| MirrorRead {
            server_run_id: String::new(),
            values: Err(reason),
        };
        // A window's deltas expire delta_ttl after it; leave two windows of margin.
        if now_ms - closed.oldest_ms > self.delta_ttl_ms - 2 * length {
            return Ok(untrusted(Untrusted::DeltasExpired));
        }
        // One window past now covers hosts whose clocks run a little ahead.
        let windows: Vec<i64> = self
            .window
            .starts_between(closed.oldest_ms, now_ms + length)
            .collect();
        // Every window costs a command per counter: a partition whose aggregator is far behind
        // (or refused for a gap in the log) must not make every read cost hundreds of them.
        if windows.len() > MAX_WINDOWS_PER_READ {
            return Ok(untrusted(Untrusted::AggregatorFarBehind));
        }
        let partitions = closed.partition_count() as i32;
        let buckets: Vec<u32> = names.iter().map(|name| bucket_of(name)).collect();
        let mut names_by_bucket: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (index, bucket) in buckets.iter().enumerate() {
            names_by_bucket.entry(*bucket).or_default().push(index);
        }

        let mut first = redis::pipe();
        // Which server answers, in the same round trip: a restart or a failover between the
        // caller's view and this read would otherwise go unseen.
        first.cmd("INFO").arg("server");
        for (bucket, indexes) in &names_by_bucket {
            let command = first.cmd("HMGET").arg(self.keys.bucket(*bucket));
            command.arg(EPOCH_FIELD).arg(VALID_FROM_FIELD);
            for partition in 0..partitions {
                command.arg(generation_field(partition));
            }
            for index in indexes {
                command
                    .arg(counter_field(names[*index]))
                    .arg(pending_set_field(names[*index]));
            }
        }
        for name in names {
            for window in &windows {
                first
                    .cmd("HMGET")
                    .arg(self.keys.delta(name, *window, 0))
                    .arg(DELTA_POSITIVE_FIELD)
                    .arg(DELTA_NEGATIVE_FIELD)
                    .arg(SHARD_COUNT_FIELD);
            }
        }
        // Read again after the data: the commands of a pipeline run in order, so a bucket lost
        // anywhere in between shows here.
        for bucket in names_by_bucket.keys() {
            first.hget(self.keys.bucket(*bucket), EPOCH_FIELD);
        }
        let mut replies = Replies::new(first.query_async(redis).await?);
        let server_info: String = replies.next_value()?;
        let server_run_id = crate::closed::run_id_in(&server_info);

        let mut states: HashMap<u32, BucketState> = HashMap::new();
        let mut summaries: Vec<Result<Option<CounterSummary>, Untrusted>> =
            vec![Ok(None); names.len()];
        let mut pending_sets: Vec<Option<PendingSetMark>> = vec![None; names.len()];
        for (bucket, indexes) in &names_by_bucket {
            let mut fields = replies.next_array()?.into_iter();
            let mut next_field = || fields.next().flatten();
            let epoch = next_field();
            let valid_from_ms = next_field()
                .and_then(|value| value.parse().ok())
                .unwrap_or(0);
            let markers = (0..partitions)
                .map(|_| next_field().and_then(|value| value.parse().ok()))
                .collect();
            for index in indexes {
                summaries[*index] = match next_field() {
                    None => Ok(None),
                    Some(encoded) => CounterSummary::decode(&encoded)
                        .map(Some)
                        .map_err(|_| Untrusted::CorruptSummary),
                };
                pending_sets[*index] = next_field().map(|encoded| PendingSetMark::decode(&encoded));
            }
            states.insert(
                *bucket,
                BucketState {
                    epoch,
                    valid_from_ms,
                    markers,
                },
            );
        }
        let mut counters = Vec::with_capacity(names.len());
        for (summary, pending_set) in summaries.into_iter().zip(pending_sets) {
            let mut per_window = Vec::with_capacity(windows.len());
            for _ in &windows {
                let mut fields = replies.next_array()?.into_iter();
                let mut next_number = || {
                    fields
                        .next()
                        .flatten()
                        .and_then(|value| value.parse::<i64>().ok())
                };
                let positive = next_number().unwrap_or(0);
                let negative = next_number().unwrap_or(0);
                let shard_count = next_number().unwrap_or(1).clamp(1, u32::MAX as i64) as u32;
                per_window.push((
                    shard_count,
                    WindowDeltas {
                        positive: positive as i128,
                        negative: negative as i128,
                    },
                ));
            }
            counters.push(CounterReplies {
                summary,
                pending_set,
                windows: per_window,
            });
        }
        for bucket in names_by_bucket.keys() {
            let epoch_after: Option<String> = replies.next_value()?;
            let state = states
                .get_mut(bucket)
                .expect("every bucket read has a state");
            if state.epoch != epoch_after {
                state.epoch = None;
            }
        }

        // The other shards of hot counters, and the epochs of their buckets once more.
        let mut extra = redis::pipe();
        let mut extra_buckets: Vec<u32> = Vec::new();
        for (index, name) in names.iter().enumerate() {
            let mut any = false;
            for (window, (shard_count, _)) in windows.iter().zip(&counters[index].windows) {
                for shard in 1..*shard_count {
                    extra
                        .cmd("HMGET")
                        .arg(self.keys.delta(name, *window, shard))
                        .arg(DELTA_POSITIVE_FIELD)
                        .arg(DELTA_NEGATIVE_FIELD);
                    any = true;
                }
            }
            if any && !extra_buckets.contains(&buckets[index]) {
                extra_buckets.push(buckets[index]);
            }
        }
        if !extra_buckets.is_empty() {
            for bucket in &extra_buckets {
                extra.hget(self.keys.bucket(*bucket), EPOCH_FIELD);
            }
            let mut extra_replies = Replies::new(extra.query_async(redis).await?);
            for counter in counters.iter_mut() {
                for (shard_count, deltas) in counter.windows.iter_mut() {
                    for _ in 1..*shard_count {
                        let mut fields = extra_replies.next_array()?.into_iter();
                        let mut next_number = || {
                            fields
                                .next()
                                .flatten()
                                .and_then(|value| value.parse::<i64>().ok())
                        };
                        deltas.positive += next_number().unwrap_or(0) as i128;
                        deltas.negative += next_number().unwrap_or(0) as i128;
                    }
                }
            }
            for bucket in &extra_buckets {
                let epoch_after: Option<String> = extra_replies.next_value()?;
                let state = states
                    .get_mut(bucket)
                    .expect("every bucket read has a state");
                if state.epoch != epoch_after {
                    state.epoch = None;
                }
            }
        }

        let values = counters
            .into_iter()
            .zip(&buckets)
            .map(|(counter, bucket)| {
                let state = &states[bucket];
                let summary = counter.summary?;
                let closed_window_ms =
                    closed.closed_for(summary.as_ref().map(|summary| summary.partition));
                self.check_trust(state, summary.as_ref(), closed_window_ms, floors)?;
                if counter
                    .pending_set
                    .is_some_and(|mark| mark.in_flight(closed_window_ms))
                {
                    return Err(Untrusted::SetInFlight);
                }
                let open: Vec<(i64, WindowDeltas)> = windows
                    .iter()
                    .copied()
                    .zip(counter.windows.iter().map(|(_, deltas)| *deltas))
                    .collect();
                Ok(combine_value(summary.as_ref(), closed_window_ms, &open))
            })
            .collect();
        Ok(MirrorRead {
            server_run_id,
            values: Ok(values),
        })
    }

    fn check_trust(
        &self,
        state: &BucketState,
        summary: Option<&CounterSummary>,
        closed_window_ms: i64,
        floors: Option<&MarkerFloors>,
    ) -> Result<(), Untrusted> {
        if state.epoch.is_none() {
            return Err(Untrusted::BucketLost);
        }
        if let Some(MarkerFloors(floors)) = floors {
            let holds = |partition: i32, floor: i64| {
                usize::try_from(partition)
                    .ok()
                    .and_then(|index| state.markers.get(index).copied())
                    .flatten()
                    .is_some_and(|marker| marker >= floor)
            };
            let behind = match summary {
                Some(summary) => floors
                    .get(&summary.partition)
                    .is_some_and(|floor| !holds(summary.partition, *floor)),
                None => floors
                    .iter()
                    .any(|(partition, floor)| !holds(*partition, *floor)),
            };
            if behind {
                return Err(Untrusted::BucketBehind);
            }
        }
        let first_open_window = closed_window_ms + self.window.length_ms;
        if first_open_window < state.valid_from_ms {
            return Err(Untrusted::DeltasNotYetValid);
        }
        if summary.is_some_and(|summary| first_open_window < summary.complete_from_ms) {
            return Err(Untrusted::SummaryIncomplete);
        }
        Ok(())
    }
}

/// The replies of a pipeline, taken in order. A reply that is missing is an error, never a
/// plausible nil or zero.
struct Replies(std::vec::IntoIter<redis::Value>);

impl Replies {
    fn new(values: Vec<redis::Value>) -> Self {
        Self(values.into_iter())
    }

    fn next_value<T: redis::FromRedisValue>(&mut self) -> redis::RedisResult<T> {
        let value = self.0.next().ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "a pipeline returned fewer replies than commands",
            ))
        })?;
        Ok(redis::from_redis_value(value)?)
    }

    fn next_array(&mut self) -> redis::RedisResult<Vec<Option<String>>> {
        self.next_value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(
        partition: i32,
        generation: i64,
        previous: i64,
        committed_at_ms: i64,
    ) -> PartitionGenerations {
        PartitionGenerations {
            partition,
            generation,
            previous_generation: previous,
            mirrored_generation: 0,
            closed_window_ms: None,
            committed_at_ms,
        }
    }

    #[test]
    fn floors_want_every_commit_made_before_the_server_was_seen() {
        let partitions = [
            // Committed before the server was first seen (at 1_000): it must hold the latest.
            partition(0, 900, 800, 900),
            // Committed since: the latest may be on its way; the one before must be in.
            partition(1, 1_500, 1_400, 1_500),
            // Never committed: no marker needed.
            partition(2, 0, 0, 0),
        ];
        let floors = MarkerFloors::for_server(&partitions, 1_000);
        assert_eq!(floors.0, BTreeMap::from([(0, 900), (1, 1_400)]));
    }

    #[test]
    fn a_missing_reply_is_an_error_not_a_nil() {
        let mut replies = Replies::new(vec![redis::Value::Int(7)]);
        assert_eq!(replies.next_value::<i64>().unwrap(), 7);
        assert!(
            replies.next_value::<Option<String>>().is_err(),
            "a short pipeline must not read as an absent key"
        );
    }
}
