//! The ingest's side of the mirror: each acknowledged record's `by` goes into one shard of its
//! window's deltas, in the field of its sign, so a read can tell what the aggregator has not
//! applied yet (see [`crate::value`]).

use crate::keys::{DELTA_NEGATIVE_FIELD, DELTA_POSITIVE_FIELD, KeySpace};
use crate::scripts;

/// Writes deltas into pipelines the ingest sends after Kafka acknowledged the records.
pub struct DeltaWriter {
    keys: KeySpace,
    ttl_secs: u64,
    declare_shard_count: redis::Script,
}

/// A pipeline being filled with deltas (and whatever else the caller adds to it).
pub struct DeltaPipeline {
    pub pipeline: redis::Pipeline,
    /// Pipelined scripts run by EVALSHA only: the script is loaded once per pipeline, in the
    /// pipeline, in case Redis restarted since the last one.
    script_loaded: bool,
}

impl DeltaPipeline {
    pub fn new() -> Self {
        Self {
            pipeline: redis::pipe(),
            script_loaded: false,
        }
    }
}

impl Default for DeltaPipeline {
    fn default() -> Self {
        Self::new()
    }
}

impl DeltaWriter {
    /// `ttl_secs`: how long a window's deltas live; reads fall back to PostgreSQL when the
    /// aggregator is further behind than that.
    pub fn new(keys: KeySpace, ttl_secs: u64) -> Self {
        Self {
            keys,
            ttl_secs,
            declare_shard_count: redis::Script::new(scripts::DECLARE_SHARD_COUNT),
        }
    }

    /// Adds one acknowledged record's `by` to shard `shard` of its window. Returns the number
    /// of commands added that carry a count (0 for a record whose increments cancel out).
    pub fn add(
        &self,
        pipeline: &mut DeltaPipeline,
        name: &str,
        window_start_ms: i64,
        shard: u32,
        by: i64,
    ) -> u64 {
        let field = match by.signum() {
            1 => DELTA_POSITIVE_FIELD,
            -1 => DELTA_NEGATIVE_FIELD,
            _ => return 0,
        };
        let key = self.keys.delta(name, window_start_ms, shard);
        pipeline.pipeline.hincr(&key, field, by).ignore();
        pipeline
            .pipeline
            .expire(&key, self.ttl_secs as i64)
            .ignore();
        1
    }

    /// Records that `name` uses `shard_count` shards in this window. It must come before the
    /// deltas of shards above 0 in the same pipeline, so a read never sums fewer shards than hold
    /// records.
    pub fn declare_shard_count(
        &self,
        pipeline: &mut DeltaPipeline,
        name: &str,
        window_start_ms: i64,
        shard_count: u32,
    ) {
        if !pipeline.script_loaded {
            pipeline
                .pipeline
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(scripts::DECLARE_SHARD_COUNT)
                .ignore();
            pipeline.script_loaded = true;
        }
        let mut invocation =
            self.declare_shard_count
                .key(self.keys.delta(name, window_start_ms, 0));
        invocation.arg(shard_count).arg(self.ttl_secs);
        pipeline.pipeline.invoke_script(&invocation).ignore();
    }
}
