//! Closed windows: per Kafka partition, the latest window whose every record the aggregator has
//! applied and copied into the buckets. Readers take a window's value from the summary's total
//! once it is closed in the counter's partition, and from the deltas before that.

use redis::aio::ConnectionLike;

use crate::keys::{CLOSED_PARTITIONS_FIELD, KeySpace};
use crate::scripts;

/// The published closed windows, as a reader sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosedWindows {
    /// The closed window of each partition, by partition number.
    pub by_partition: Vec<i64>,
    /// The oldest of them: the closed window of a counter whose partition is not known.
    pub oldest_ms: i64,
}

impl ClosedWindows {
    /// The closed window that applies to a counter of `partition` (the oldest over all
    /// partitions when the partition is unknown).
    pub fn closed_for(&self, partition: Option<i32>) -> i64 {
        partition
            .and_then(|partition| usize::try_from(partition).ok())
            .and_then(|partition| self.by_partition.get(partition).copied())
            .unwrap_or(self.oldest_ms)
    }

    pub fn partition_count(&self) -> usize {
        self.by_partition.len()
    }
}

/// Raises the published closed window of the given partitions.
pub async fn publish_closed_windows(
    connection: &mut impl ConnectionLike,
    keys: &KeySpace,
    partition_count: usize,
    closed: &[(i32, i64)],
) -> redis::RedisResult<()> {
    let script = redis::Script::new(scripts::PUBLISH_CLOSED_WINDOWS);
    let mut invocation = script.key(keys.closed());
    invocation.arg(partition_count);
    for (partition, closed_window_ms) in closed {
        invocation.arg(partition).arg(closed_window_ms);
    }
    invocation.invoke_async::<i64>(connection).await.map(|_| ())
}

/// The published closed windows, or None while some partition has none (after Redis lost the
/// hash, until the aggregators publish again).
pub async fn read_closed_windows(
    connection: &mut impl ConnectionLike,
    keys: &KeySpace,
) -> redis::RedisResult<Option<ClosedWindows>> {
    let fields: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(keys.closed())
        .query_async(connection)
        .await?;
    Ok(parse_closed_windows(&fields))
}

/// The `run_id` line of `INFO server`.
pub(crate) fn run_id_in(server_info: &str) -> String {
    server_info
        .lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn parse_closed_windows(fields: &[(String, String)]) -> Option<ClosedWindows> {
    let field = |wanted: &str| {
        fields
            .iter()
            .find(|(name, _)| name == wanted)
            .and_then(|(_, value)| value.parse::<i64>().ok())
    };
    let partition_count = usize::try_from(field(CLOSED_PARTITIONS_FIELD)?).ok()?;
    let by_partition = (0..partition_count)
        .map(|partition| field(&partition.to_string()))
        .collect::<Option<Vec<i64>>>()?;
    let oldest_ms = by_partition.iter().copied().min()?;
    Some(ClosedWindows {
        by_partition,
        oldest_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn the_oldest_partition_is_the_fallback() {
        let closed = parse_closed_windows(&pairs(&[
            ("partitions", "2"),
            ("0", "15000"),
            ("1", "10000"),
        ]))
        .unwrap();
        assert_eq!(closed.by_partition, vec![15_000, 10_000]);
        assert_eq!(closed.closed_for(Some(0)), 15_000);
        assert_eq!(closed.closed_for(None), 10_000);
    }

    #[test]
    fn a_partition_without_a_closed_window_means_none() {
        assert_eq!(
            parse_closed_windows(&pairs(&[("partitions", "2"), ("0", "15000")])),
            None
        );
        assert_eq!(parse_closed_windows(&[]), None);
    }
}
