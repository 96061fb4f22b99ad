//! The mirror's Redis key layout.
//!
//! | key | type | written by | holds |
//! |---|---|---|---|
//! | `{P:b:B}` | hash | aggregator, rebuild; ingest (`s:` only) | bucket `B`: the summaries of its counters (`c:NAME`), its markers (`m:epoch`, `m:valid_from`, `m:created`, `m:g:PARTITION`), and the marks of sets in flight (`s:NAME`) |
//! | `{}P:d:W:S:NAME` | hash | ingest | deltas of window `W` on shard `S`: `p` and `m`, the sums of the positive and negative records; on shard 0 also `n`, the window's shard count when above 1 |
//! | `{}P:closed` | hash | aggregator, rebuild | per partition, the latest closed window; `partitions`, their count |
//!
//! A bucket key is all hash tag, so in Redis Cluster each bucket is one slot and a script touches
//! one slot. Every other key starts with an empty hash tag `{}`, so Redis Cluster hashes the whole
//! key: a `{` in a counter name can never pin a hot counter's shards to one node, and they spread
//! over the slots. The counter name always comes last, so a `:` in a name cannot make two keys
//! collide; in a bucket, names are fields behind `c:`, markers are fields behind `m:`, and set marks behind `s:`.

/// Field prefix of the mark of a counter's sets in flight, in its bucket.
pub(crate) const PENDING_SET_FIELD_PREFIX: &str = "s:";
/// Field prefix of a counter's summary in its bucket.
pub(crate) const COUNTER_FIELD_PREFIX: &str = "c:";
/// Marker: the bucket's identity. A bucket without one has lost its data (or never had any).
pub(crate) const EPOCH_FIELD: &str = "m:epoch";
/// Marker: the first window whose deltas the bucket's counters may be read with.
pub(crate) const VALID_FROM_FIELD: &str = "m:valid_from";
/// Marker: when the bucket got its epoch (Unix ms). A bucket that was not there yet when a
/// commit was mirrored cannot have lost that commit: it was rebuilt without it.
pub(crate) const CREATED_FIELD: &str = "m:created";
/// Marker prefix: `m:g:P` is the generation up to which partition `P`'s commits are in the bucket.
pub(crate) const GENERATION_FIELD_PREFIX: &str = "m:g:";

/// Delta fields: the sums of the records with a positive and with a negative `by`.
pub(crate) const DELTA_POSITIVE_FIELD: &str = "p";
pub(crate) const DELTA_NEGATIVE_FIELD: &str = "m";
/// Delta field of shard 0: the window's shard count, when the counter uses more than one shard.
pub(crate) const SHARD_COUNT_FIELD: &str = "n";

/// The field of the closed hash that holds the topic's partition count.
pub(crate) const CLOSED_PARTITIONS_FIELD: &str = "partitions";

/// Builds the Redis keys of one Tally deployment (one key prefix).
#[derive(Clone, Debug)]
pub struct KeySpace {
    prefix: String,
}

impl KeySpace {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn bucket(&self, bucket: u32) -> String {
        format!("{{{}:b:{bucket}}}", self.prefix)
    }

    pub fn delta(&self, name: &str, window_start_ms: i64, shard: u32) -> String {
        format!("{{}}{}:d:{window_start_ms}:{shard}:{name}", self.prefix)
    }

    pub fn closed(&self) -> String {
        format!("{{}}{}:closed", self.prefix)
    }
}

pub(crate) fn counter_field(name: &str) -> String {
    format!("{COUNTER_FIELD_PREFIX}{name}")
}

pub(crate) fn pending_set_field(name: &str) -> String {
    format!("{PENDING_SET_FIELD_PREFIX}{name}")
}

pub(crate) fn generation_field(partition: i32) -> String {
    format!("{GENERATION_FIELD_PREFIX}{partition}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_put_the_name_last_and_buckets_in_a_hash_tag() {
        let keys = KeySpace::new("tally");
        assert_eq!(keys.delta("a:{b}", 5_000, 3), "{}tally:d:5000:3:a:{b}");
        assert_eq!(keys.bucket(17), "{tally:b:17}");
        assert_eq!(keys.closed(), "{}tally:closed");
        assert_eq!(counter_field("a:b"), "c:a:b");
        assert_eq!(generation_field(2), "m:g:2");
    }
}
