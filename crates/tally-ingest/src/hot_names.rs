//! Tracks each counter's write rate in this process, so hot counters get more shard keys.
//!
//! Two one-second generations of counts are kept; everything older is dropped, so a million cold
//! names cost memory only for the second they were written in.

use std::collections::HashMap;

use tally_core::ShardPolicy;

#[derive(Debug, Default)]
struct NameRate {
    increments: u64,
    /// The window and shard count this process last declared in Redis for the name.
    declared: Option<(i64, u32)>,
}

#[derive(Debug)]
pub(crate) struct HotNames {
    policy: ShardPolicy,
    second: i64,
    current: HashMap<String, NameRate>,
    previous: HashMap<String, u64>,
}

/// Where one record's delta goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ShardChoice {
    pub(crate) shard_count: u32,
    /// The shard count must be recorded in Redis before the delta, so reads sum every shard.
    /// Until Redis confirmed it ([`HotNames::declared`]), every record declares it again.
    pub(crate) declare: bool,
}

impl HotNames {
    pub(crate) fn new(policy: ShardPolicy) -> Self {
        Self {
            policy,
            second: i64::MIN,
            current: HashMap::new(),
            previous: HashMap::new(),
        }
    }

    pub(crate) fn observe(
        &mut self,
        name: &str,
        increments: u64,
        now_ms: i64,
        window_start_ms: i64,
    ) -> ShardChoice {
        let second = now_ms.div_euclid(1_000);
        if second != self.second {
            let finished = std::mem::take(&mut self.current);
            self.previous = if second == self.second + 1 {
                finished
                    .into_iter()
                    .map(|(name, rate)| (name, rate.increments))
                    .collect()
            } else {
                HashMap::new()
            };
            self.second = second;
        }
        let previous = self.previous.get(name).copied().unwrap_or(0);
        let rate = match self.current.get_mut(name) {
            Some(rate) => rate,
            None => self.current.entry(name.to_owned()).or_default(),
        };
        rate.increments += increments;
        let shard_count = self.policy.shards_for_rate(rate.increments.max(previous));
        let declare = shard_count > 1
            && !matches!(rate.declared, Some((window, declared)) if window == window_start_ms && declared >= shard_count);
        ShardChoice {
            shard_count,
            declare,
        }
    }

    /// Redis confirmed that `name` uses `shard_count` shards in the window: later records need
    /// not declare it again. Called only after the pipeline with the declaration succeeded, so a
    /// declaration Redis never got is made again with the next record.
    pub(crate) fn declared(&mut self, name: &str, window_start_ms: i64, shard_count: u32) {
        if let Some(rate) = self.current.get_mut(name) {
            let already = matches!(rate.declared, Some((window, declared)) if window == window_start_ms && declared >= shard_count);
            if !already {
                rate.declared = Some((window_start_ms, shard_count));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hot_names() -> HotNames {
        HotNames::new(ShardPolicy {
            max_shards: 64,
            increments_per_shard_per_second: 100,
        })
    }

    #[test]
    fn a_cold_name_keeps_one_shard() {
        let mut hot = hot_names();
        for millisecond in 0..50 {
            let choice = hot.observe("cold", 1, millisecond * 100, 0);
            assert_eq!(
                choice,
                ShardChoice {
                    shard_count: 1,
                    declare: false
                }
            );
        }
    }

    #[test]
    fn a_hot_name_grows_and_declares_each_new_count_once_per_window() {
        let mut hot = hot_names();
        let mut declared = Vec::new();
        for i in 0..1_000 {
            let choice = hot.observe("viral", 1, i, 0);
            if choice.declare {
                declared.push(choice.shard_count);
                hot.declared("viral", 0, choice.shard_count);
            }
        }
        assert_eq!(declared, vec![2, 4, 8, 16]);
        // The next second still sees last second's rate, so the count stays up.
        let choice = hot.observe("viral", 1, 1_000, 0);
        assert_eq!(choice.shard_count, 16);
        // A new window needs its own declaration.
        assert!(hot.observe("viral", 1, 1_001, 5_000).declare);
    }

    #[test]
    fn a_declaration_redis_never_confirmed_is_made_again() {
        let mut hot = hot_names();
        for i in 0..300 {
            hot.observe("viral", 1, i, 0);
        }
        // Three records in a row see more than one shard; none was confirmed.
        for i in 300..303 {
            assert!(hot.observe("viral", 1, i, 0).declare);
        }
        let choice = hot.observe("viral", 1, 303, 0);
        hot.declared("viral", 0, choice.shard_count);
        assert!(!hot.observe("viral", 1, 304, 0).declare);
    }

    #[test]
    fn a_name_that_cools_down_goes_back_to_one_shard() {
        let mut hot = hot_names();
        for i in 0..1_000 {
            hot.observe("fad", 1, i, 0);
        }
        assert_eq!(hot.observe("fad", 1, 5_000, 5_000).shard_count, 1);
    }
}
