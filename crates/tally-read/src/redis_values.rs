//! Computes counter values from Redis alone: each counter's summary plus the deltas of the
//! windows after the closed one (see `tally_core::value`). Returns `None` whenever Redis cannot
//! be trusted to hold the whole picture; the caller then asks PostgreSQL.

use redis::aio::ConnectionManager;
use tally_core::keys::META_EPOCH_FIELD;
use tally_core::{CounterName, CounterSummary, KeySpace, WindowSpec, combine_value};
use tally_infra::summaries::Watermark;

/// Why Redis was not used for a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Untrusted {
    /// The meta hash is gone, or changed between two round trips: Redis lost its data.
    DataLost,
    /// No closed windows are published for every partition yet.
    NoClosedWindows,
    /// Redis's deltas do not go back far enough: it lost its data recently, or the aggregator
    /// is further behind than the deltas live.
    DeltasIncomplete,
    /// A summary could not be parsed.
    CorruptSummary,
}

impl Untrusted {
    pub(crate) fn as_label(self) -> &'static str {
        match self {
            Untrusted::DataLost => "data_lost",
            Untrusted::NoClosedWindows => "no_closed_windows",
            Untrusted::DeltasIncomplete => "deltas_incomplete",
            Untrusted::CorruptSummary => "corrupt_summary",
        }
    }
}

pub(crate) struct RedisValues<'a> {
    pub(crate) keys: &'a KeySpace,
    pub(crate) window: WindowSpec,
    pub(crate) delta_ttl_ms: i64,
}

impl RedisValues<'_> {
    /// At most two round trips: summaries, shard counts and first shards for every name, then
    /// the extra shards of the hot counters.
    pub(crate) async fn values(
        &self,
        connection: &mut ConnectionManager,
        watermark: &Watermark,
        names: &[CounterName],
        now_ms: i64,
    ) -> redis::RedisResult<Result<Vec<i64>, Untrusted>> {
        let closed = watermark.closed_window_ms;
        // A window's deltas expire delta_ttl after it; leave two windows of margin.
        if now_ms - closed > self.delta_ttl_ms - 2 * self.window.length_ms {
            return Ok(Err(Untrusted::DeltasIncomplete));
        }
        // One window past now covers hosts whose clocks run a little ahead.
        let windows: Vec<i64> = self
            .window
            .starts_between(closed, now_ms + self.window.length_ms)
            .collect();
        if windows
            .first()
            .is_some_and(|first| *first < watermark.valid_from_ms)
        {
            return Ok(Err(Untrusted::DeltasIncomplete));
        }

        let mut first = redis::pipe();
        first.hget(self.keys.meta(), META_EPOCH_FIELD);
        for name in names {
            first.hgetall(self.keys.summary(name.as_str()));
            for window in &windows {
                first.get(self.keys.shard_count(name.as_str(), *window));
                first.get(self.keys.delta(name.as_str(), *window, 0));
            }
        }
        // The epoch is read again after the data: commands of a pipeline run in order, so if
        // Redis lost its data anywhere in between, the second read sees no (or a new) epoch.
        first.hget(self.keys.meta(), META_EPOCH_FIELD);
        let mut replies: std::vec::IntoIter<redis::Value> = first
            .query_async::<Vec<redis::Value>>(connection)
            .await?
            .into_iter();
        let epoch: Option<String> = redis::from_redis_value(next(&mut replies))?;
        if epoch.as_deref() != Some(watermark.epoch.as_str()) {
            return Ok(Err(Untrusted::DataLost));
        }

        let mut summaries = Vec::with_capacity(names.len());
        // Per name, per window: (shard count, delta of shard 0).
        let mut window_reads: Vec<Vec<(u32, i64)>> = Vec::with_capacity(names.len());
        for _ in names {
            let fields: Vec<(String, String)> = redis::from_redis_value(next(&mut replies))?;
            let summary = CounterSummary::from_hash_fields(
                fields
                    .iter()
                    .map(|(field, value)| (field.as_str(), value.as_str())),
            );
            let Ok(summary) = summary else {
                return Ok(Err(Untrusted::CorruptSummary));
            };
            summaries.push(summary);
            let mut per_window = Vec::with_capacity(windows.len());
            for _ in &windows {
                let shard_count: Option<u32> = redis::from_redis_value(next(&mut replies))?;
                let first_shard: Option<i64> = redis::from_redis_value(next(&mut replies))?;
                per_window.push((shard_count.unwrap_or(1).max(1), first_shard.unwrap_or(0)));
            }
            window_reads.push(per_window);
        }
        let epoch_after: Option<String> = redis::from_redis_value(next(&mut replies))?;
        if epoch_after.as_deref() != Some(watermark.epoch.as_str()) {
            return Ok(Err(Untrusted::DataLost));
        }

        let mut extra = redis::pipe();
        let mut extra_reads = 0;
        extra.hget(self.keys.meta(), META_EPOCH_FIELD);
        for (name, per_window) in names.iter().zip(&window_reads) {
            for (window, (shard_count, _)) in windows.iter().zip(per_window) {
                for shard in 1..*shard_count {
                    extra.get(self.keys.delta(name.as_str(), *window, shard));
                    extra_reads += 1;
                }
            }
        }
        extra.hget(self.keys.meta(), META_EPOCH_FIELD);
        let mut extra_replies = if extra_reads > 0 {
            let replies = extra.query_async::<Vec<redis::Value>>(connection).await?;
            let epoch_before: Option<String> = redis::from_redis_value(replies[0].clone())?;
            let epoch_after: Option<String> =
                redis::from_redis_value(replies[replies.len() - 1].clone())?;
            if epoch_before.as_deref() != Some(watermark.epoch.as_str())
                || epoch_after.as_deref() != Some(watermark.epoch.as_str())
            {
                return Ok(Err(Untrusted::DataLost));
            }
            let mut replies = replies.into_iter();
            replies.next();
            replies
        } else {
            Vec::new().into_iter()
        };

        let mut values = Vec::with_capacity(names.len());
        for (summary, per_window) in summaries.iter().zip(&window_reads) {
            let mut open_windows = Vec::with_capacity(windows.len());
            for (window, (shard_count, first_shard)) in windows.iter().zip(per_window) {
                let mut delta = *first_shard as i128;
                for _ in 1..*shard_count {
                    let shard: Option<i64> = redis::from_redis_value(next(&mut extra_replies))?;
                    delta += shard.unwrap_or(0) as i128;
                }
                open_windows.push((*window, delta));
            }
            let closed_for_counter = watermark.closed_for(summary.partition);
            values.push(combine_value(summary, closed_for_counter, &open_windows));
        }
        Ok(Ok(values))
    }
}

fn next(replies: &mut std::vec::IntoIter<redis::Value>) -> redis::Value {
    replies.next().unwrap_or(redis::Value::Nil)
}
