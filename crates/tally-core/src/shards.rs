//! How many Redis keys one counter's increments are spread over.
//!
//! A cold counter uses one key, so a read costs one `GET` per open window. A hot counter's
//! writes are spread over more keys as its rate grows (powers of two, up to a maximum), so that in
//! Redis Cluster no single node takes all of a viral counter's `INCRBY`s.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardPolicy {
    pub max_shards: u32,
    /// The write rate one shard key is meant to absorb.
    pub increments_per_shard_per_second: u64,
}

impl ShardPolicy {
    pub fn shards_for_rate(&self, increments_per_second: u64) -> u32 {
        let per_shard = self.increments_per_shard_per_second.max(1);
        let needed = increments_per_second.div_ceil(per_shard).max(1);
        let max_shards = self.max_shards.max(1) as u64;
        needed.next_power_of_two().min(max_shards) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_names_use_one_shard_and_hot_names_grow_to_the_maximum() {
        let policy = ShardPolicy {
            max_shards: 64,
            increments_per_shard_per_second: 2_000,
        };
        assert_eq!(policy.shards_for_rate(0), 1);
        assert_eq!(policy.shards_for_rate(2_000), 1);
        assert_eq!(policy.shards_for_rate(2_001), 2);
        assert_eq!(policy.shards_for_rate(10_000), 8);
        assert_eq!(policy.shards_for_rate(100_000), 64);
        assert_eq!(policy.shards_for_rate(u64::MAX), 64);
    }
}
