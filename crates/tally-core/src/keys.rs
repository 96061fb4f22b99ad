//! The Redis key layout, shared by every role.
//!
//! Every key starts with `{}`. Redis Cluster hashes only the part between the first `{` and the
//! next `}` when that part is non-empty; an empty `{}` makes it hash the whole key instead. That
//! stops a `{` in a user's counter name from acting as a hash tag and pinning all of a hot
//! counter's shard keys to one node. The counter name always comes last, so a `:` inside a name
//! can never make two keys collide.
//!
//! | key | type | written by | meaning |
//! |---|---|---|---|
//! | `{}P:d:W:S:NAME` | string | ingest (`INCRBY`) | increments of window `W` on shard `S` |
//! | `{}P:n:W:NAME` | string | ingest | shard count of window `W` when above 1 |
//! | `{}P:s:NAME` | hash | aggregator, replay | PostgreSQL summary: `total`, `version`, `partition`, `w:W` window sums |
//! | `{}P:closed` | hash | aggregator, replay | per partition: latest closed window; `partitions` |
//! | `{}P:meta` | hash | replay | `epoch` and `valid_from`: deltas are complete from this window on |
//! | `{}P:i:KEY` | string | ingest | `BY:COUNTER` of an idempotency key already acknowledged |

/// The names of the fields in a summary hash.
pub const SUMMARY_TOTAL_FIELD: &str = "total";
pub const SUMMARY_VERSION_FIELD: &str = "version";
pub const SUMMARY_PARTITION_FIELD: &str = "partition";
pub const SUMMARY_WINDOW_FIELD_PREFIX: &str = "w:";
/// The names of the fields in the meta hash.
pub const META_EPOCH_FIELD: &str = "epoch";
pub const META_VALID_FROM_FIELD: &str = "valid_from";
/// The field of the closed hash that holds the topic's partition count.
pub const CLOSED_PARTITIONS_FIELD: &str = "partitions";

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

    pub fn delta(&self, name: &str, window_start_ms: i64, shard: u32) -> String {
        format!("{{}}{}:d:{window_start_ms}:{shard}:{name}", self.prefix)
    }

    pub fn shard_count(&self, name: &str, window_start_ms: i64) -> String {
        format!("{{}}{}:n:{window_start_ms}:{name}", self.prefix)
    }

    pub fn summary(&self, name: &str) -> String {
        format!("{{}}{}:s:{name}", self.prefix)
    }

    pub fn closed(&self) -> String {
        format!("{{}}{}:closed", self.prefix)
    }

    pub fn meta(&self) -> String {
        format!("{{}}{}:meta", self.prefix)
    }

    pub fn idempotency(&self, key: &str) -> String {
        format!("{{}}{}:i:{key}", self.prefix)
    }
}

pub fn summary_window_field(window_start_ms: i64) -> String {
    format!("{SUMMARY_WINDOW_FIELD_PREFIX}{window_start_ms}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_put_the_name_last_behind_an_empty_hash_tag() {
        let keys = KeySpace::new("tally");
        assert_eq!(keys.delta("a:{b}", 5_000, 3), "{}tally:d:5000:3:a:{b}");
        assert_eq!(keys.shard_count("x", 0), "{}tally:n:0:x");
        assert_eq!(keys.summary("x"), "{}tally:s:x");
        assert_eq!(keys.meta(), "{}tally:meta");
        assert_eq!(summary_window_field(10_000), "w:10000");
    }
}
