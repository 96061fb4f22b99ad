//! Sets on their way through the log. A set adds nothing to the deltas, so until the aggregator
//! applies it, a read from Redis would show the value from before it (plus the increments after
//! it) as fresh. The ingest therefore marks a counter's set in its bucket *before* producing it,
//! and readers do not trust the counter while a marked set may still be unapplied.
//!
//! The mark is the bucket field `s:NAME` = `"COUNT WINDOW"`: how many marked sets were not yet
//! seen applied, and the latest window they were made in. A set made in window `W` is in the
//! log by the time `W` closes (a record is produced within the produce timeout, like an
//! increment), and a closed window is published only after its commits are in every bucket. So
//! once the counter's partition has closed `W`, every marked set is in the summary or never
//! will be, and the mark no longer matters; until then the counter is read from PostgreSQL,
//! flagged stale. The aggregator takes one off the count for each set record it applied and
//! copied into every bucket, so a counter is usually trusted again within a commit of the set.
//!
//! The mark lives in the bucket hash, not a key of its own: Redis evicts or loses the hash
//! whole, and a bucket without its epoch is not trusted anyway. A bucket recreated after a loss
//! starts without marks, and its `valid_from` keeps the windows before the recreation (and the
//! sets made in them) from being read until they close.

use redis::aio::ConnectionLike;

use crate::keys::{KeySpace, pending_set_field};
use crate::{bucket_of, scripts};

/// Marks and unmarks sets in flight.
#[derive(Clone, Debug)]
pub struct PendingSets {
    keys: KeySpace,
}

/// One counter's mark, as a read found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PendingSetMark {
    pub(crate) count: i64,
    pub(crate) latest_window_ms: i64,
}

impl PendingSetMark {
    /// A mark that does not parse is taken as a set in flight in an unknown window: the
    /// counter is not trusted until a commit clears it.
    pub(crate) fn decode(encoded: &str) -> Self {
        let mut parts = encoded.split(' ').map(str::parse::<i64>);
        match (parts.next(), parts.next()) {
            (Some(Ok(count)), Some(Ok(latest_window_ms))) => Self {
                count,
                latest_window_ms,
            },
            _ => Self {
                count: 1,
                latest_window_ms: i64::MAX,
            },
        }
    }

    /// Whether a set it marks may still be unapplied, given the counter partition's closed
    /// window.
    pub(crate) fn in_flight(self, closed_window_ms: i64) -> bool {
        self.count > 0 && self.latest_window_ms > closed_window_ms
    }
}

impl PendingSets {
    pub fn new(keys: KeySpace) -> Self {
        Self { keys }
    }

    /// Marks a set of each counter, made in `window_start_ms`, in one round trip. The ingest
    /// produces the sets only once this succeeded.
    pub async fn mark(
        &self,
        redis: &mut impl ConnectionLike,
        names: &[&str],
        window_start_ms: i64,
    ) -> redis::RedisResult<()> {
        self.run(
            redis,
            scripts::MARK_PENDING_SET,
            names,
            Some(window_start_ms),
        )
        .await
    }

    /// Takes one set of each counter off its mark: the set was applied and is in every bucket,
    /// or it was never sent.
    pub async fn unmark(
        &self,
        redis: &mut impl ConnectionLike,
        names: &[&str],
    ) -> redis::RedisResult<()> {
        self.run(redis, scripts::UNMARK_PENDING_SET, names, None)
            .await
    }

    async fn run(
        &self,
        redis: &mut impl ConnectionLike,
        source: &str,
        names: &[&str],
        window_start_ms: Option<i64>,
    ) -> redis::RedisResult<()> {
        if names.is_empty() {
            return Ok(());
        }
        let script = redis::Script::new(source);
        let mut pipeline = redis::pipe();
        // Loaded in the same pipeline, in case Redis restarted since the last one.
        pipeline.cmd("SCRIPT").arg("LOAD").arg(source).ignore();
        for name in names {
            let mut invocation = script.key(self.keys.bucket(bucket_of(name)));
            invocation.arg(pending_set_field(name));
            if let Some(window_start_ms) = window_start_ms {
                invocation.arg(window_start_ms);
            }
            pipeline.invoke_script(&invocation).ignore();
        }
        pipeline.query_async::<()>(redis).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_matters_until_its_latest_window_closes() {
        let mark = PendingSetMark::decode("2 10000");
        assert_eq!(
            mark,
            PendingSetMark {
                count: 2,
                latest_window_ms: 10_000
            }
        );
        assert!(mark.in_flight(5_000));
        assert!(
            !mark.in_flight(10_000),
            "closed: the sets are applied or never will be"
        );
        assert!(!PendingSetMark::decode("0 10000").in_flight(5_000));
        assert!(
            PendingSetMark::decode("garbage").in_flight(i64::MAX - 1),
            "an unreadable mark is never taken as no set"
        );
    }
}
