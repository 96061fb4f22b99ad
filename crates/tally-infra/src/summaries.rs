//! Copies of PostgreSQL state in Redis: counter summaries, closed windows and the meta hash.
//!
//! The aggregator and the replay job both write them; the read path reads them. What they
//! mean is explained in `tally_core::value` and `tally_core::keys`; this module only moves them
//! between the two stores, always through the version-checked scripts of `tally_core::scripts`.

use redis::aio::ConnectionManager;
use sqlx::{PgExecutor, Row};
use tally_core::keys::{CLOSED_PARTITIONS_FIELD, META_EPOCH_FIELD, META_VALID_FROM_FIELD};
use tally_core::{KeySpace, scripts};

/// One counter's summary as read from PostgreSQL or returned by an aggregator commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterSummaryRow {
    pub name: String,
    pub version: i64,
    pub total: i64,
    pub partition: i32,
    /// (window_start_ms, window_sum) pairs.
    pub windows: Vec<(i64, i64)>,
}

/// Summaries per pipeline. A window of a busy aggregator touches hundreds of thousands of
/// counters; sent as one pipeline, Redis would spend seconds on it while everyone else's commands
/// wait, and the round trip would outlast the response timeout. Chunks of this size take a few
/// milliseconds each.
const SUMMARIES_PER_PIPELINE: usize = 2_000;

/// Applies aggregator commits to the summaries, a chunk per round trip. Returns the names whose
/// summary was not at the previous version; the caller must rewrite those in full.
pub async fn apply_commits(
    connection: &mut ConnectionManager,
    keys: &KeySpace,
    commits: &[CounterSummaryRow],
    prune_before_ms: i64,
) -> redis::RedisResult<Vec<String>> {
    let script = redis::Script::new(scripts::APPLY_SUMMARY_COMMIT);
    let mut stale = Vec::new();
    for chunk in commits.chunks(SUMMARIES_PER_PIPELINE) {
        let mut pipeline = pipeline_with_script(scripts::APPLY_SUMMARY_COMMIT);
        for commit in chunk {
            let mut invocation = script.key(keys.summary(&commit.name));
            invocation
                .arg(commit.version)
                .arg(commit.total)
                .arg(commit.partition)
                .arg(prune_before_ms);
            for (window_start_ms, sum) in &commit.windows {
                invocation.arg(window_start_ms).arg(sum);
            }
            pipeline.invoke_script(&invocation);
        }
        let outcomes: Vec<i64> = pipeline.query_async(connection).await?;
        stale.extend(
            chunk
                .iter()
                .zip(outcomes)
                .filter(|(_, outcome)| *outcome < 0)
                .map(|(commit, _)| commit.name.clone()),
        );
    }
    Ok(stale)
}

/// Replaces summaries with full copies from PostgreSQL, skipping any that Redis holds in a
/// newer version. Returns how many were written.
pub async fn replace(
    connection: &mut ConnectionManager,
    keys: &KeySpace,
    summaries: &[CounterSummaryRow],
) -> redis::RedisResult<usize> {
    let script = redis::Script::new(scripts::REPLACE_SUMMARY);
    let mut written = 0;
    for chunk in summaries.chunks(SUMMARIES_PER_PIPELINE) {
        let mut pipeline = pipeline_with_script(scripts::REPLACE_SUMMARY);
        for summary in chunk {
            let mut invocation = script.key(keys.summary(&summary.name));
            invocation
                .arg(summary.version)
                .arg(summary.total)
                .arg(summary.partition);
            for (window_start_ms, sum) in &summary.windows {
                invocation.arg(window_start_ms).arg(sum);
            }
            pipeline.invoke_script(&invocation);
        }
        let outcomes: Vec<i64> = pipeline.query_async(connection).await?;
        written += outcomes.into_iter().filter(|outcome| *outcome == 1).count();
    }
    Ok(written)
}

/// A pipeline that first loads `script`. Pipelined invocations use EVALSHA and, unlike single
/// ones, do not retry with the source when Redis answers NOSCRIPT (as a restarted Redis does), so
/// every pipeline loads its script itself; loading a loaded script is a no-op.
pub fn pipeline_with_script(script: &str) -> redis::Pipeline {
    let mut pipeline = redis::pipe();
    pipeline.cmd("SCRIPT").arg("LOAD").arg(script).ignore();
    pipeline
}

/// Raises the published closed window of the given partitions.
pub async fn publish_closed_windows(
    connection: &mut ConnectionManager,
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

/// Marks Redis's deltas complete from `valid_from_ms` on, unless that was done already.
/// Returns the epoch in force.
pub async fn initialize_meta(
    connection: &mut ConnectionManager,
    keys: &KeySpace,
    epoch: &str,
    valid_from_ms: i64,
) -> redis::RedisResult<String> {
    redis::Script::new(scripts::INITIALIZE_META)
        .key(keys.meta())
        .arg(epoch)
        .arg(valid_from_ms)
        .invoke_async(connection)
        .await
}

/// What a reader needs to know before it trusts Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watermark {
    /// Changes whenever Redis is rebuilt after losing its data.
    pub epoch: String,
    /// Deltas are complete for windows starting at or after this.
    pub valid_from_ms: i64,
    /// Every increment stamped with this window or earlier is in the summaries: the oldest
    /// closed window over all partitions.
    pub closed_window_ms: i64,
    /// The closed window of each partition, by partition number.
    pub closed_by_partition: Vec<i64>,
}

impl Watermark {
    /// The closed window that applies to a counter of `partition` (the oldest over all
    /// partitions when the partition is unknown).
    pub fn closed_for(&self, partition: Option<i32>) -> i64 {
        partition
            .and_then(|partition| usize::try_from(partition).ok())
            .and_then(|partition| self.closed_by_partition.get(partition).copied())
            .unwrap_or(self.closed_window_ms)
    }
}

/// Why Redis cannot be trusted right now, when it can be reached.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WatermarkMissing {
    #[error("redis has no meta hash; it lost its data and needs a replay")]
    NoMeta,
    #[error("no aggregator has published closed windows for every partition yet")]
    NoClosedWindows,
}

/// The field/value pairs of a Redis hash.
type HashFields = Vec<(String, String)>;

pub async fn read_watermark(
    connection: &mut ConnectionManager,
    keys: &KeySpace,
) -> redis::RedisResult<Result<Watermark, WatermarkMissing>> {
    let (meta, closed): (HashFields, HashFields) = redis::pipe()
        .hgetall(keys.meta())
        .hgetall(keys.closed())
        .query_async(connection)
        .await?;
    Ok(parse_watermark(&meta, &closed))
}

fn parse_watermark(
    meta: &[(String, String)],
    closed: &[(String, String)],
) -> Result<Watermark, WatermarkMissing> {
    let field = |pairs: &[(String, String)], wanted: &str| {
        pairs
            .iter()
            .find(|(name, _)| name == wanted)
            .map(|(_, value)| value.clone())
    };
    let epoch = field(meta, META_EPOCH_FIELD).ok_or(WatermarkMissing::NoMeta)?;
    let valid_from_ms = field(meta, META_VALID_FROM_FIELD)
        .and_then(|value| value.parse().ok())
        .ok_or(WatermarkMissing::NoMeta)?;
    let partition_count: usize = field(closed, CLOSED_PARTITIONS_FIELD)
        .and_then(|value| value.parse().ok())
        .ok_or(WatermarkMissing::NoClosedWindows)?;
    let closed_by_partition = (0..partition_count)
        .map(|partition| field(closed, &partition.to_string()).and_then(|value| value.parse().ok()))
        .collect::<Option<Vec<i64>>>()
        .ok_or(WatermarkMissing::NoClosedWindows)?;
    let closed_window_ms = closed_by_partition
        .iter()
        .copied()
        .min()
        .ok_or(WatermarkMissing::NoClosedWindows)?;
    Ok(Watermark {
        epoch,
        valid_from_ms,
        closed_window_ms,
        closed_by_partition,
    })
}

const SUMMARY_SELECT: &str = "
    SELECT c.name, c.total, c.version, c.kafka_partition,
           coalesce(array_agg((extract(epoch FROM w.window_start) * 1000)::bigint
                              ORDER BY w.window_start) FILTER (WHERE w.name IS NOT NULL),
                    '{}') AS window_starts,
           coalesce(array_agg(LEAST(GREATEST(w.sum::numeric + w.dropped, -9223372036854775808),
                                    9223372036854775807)::bigint
                              ORDER BY w.window_start) FILTER (WHERE w.name IS NOT NULL),
                    '{}') AS window_sums
    FROM counters c
    LEFT JOIN counter_windows w
           ON w.name = c.name AND w.window_start >= to_timestamp($1::bigint / 1000.0)";

fn summary_from_row(row: &sqlx::postgres::PgRow) -> Result<CounterSummaryRow, sqlx::Error> {
    let window_starts: Vec<i64> = row.try_get("window_starts")?;
    let window_sums: Vec<i64> = row.try_get("window_sums")?;
    Ok(CounterSummaryRow {
        name: row.try_get("name")?,
        total: row.try_get("total")?,
        version: row.try_get("version")?,
        partition: row.try_get("kafka_partition")?,
        windows: window_starts.into_iter().zip(window_sums).collect(),
    })
}

/// Full summaries of the named counters, with windows from `windows_from_ms` on.
pub async fn load_by_names(
    executor: impl PgExecutor<'_>,
    names: &[String],
    windows_from_ms: i64,
) -> Result<Vec<CounterSummaryRow>, sqlx::Error> {
    let sql = format!("{SUMMARY_SELECT} WHERE c.name = ANY($2) GROUP BY c.name");
    let rows = sqlx::query(&sql)
        .bind(windows_from_ms)
        .bind(names)
        .fetch_all(executor)
        .await?;
    rows.iter().map(summary_from_row).collect()
}

/// Full summaries of the counters of some partitions that were active from `active_since_ms`.
pub async fn load_recent_in_partitions(
    executor: impl PgExecutor<'_>,
    partitions: &[i32],
    active_since_ms: i64,
) -> Result<Vec<CounterSummaryRow>, sqlx::Error> {
    let sql = format!(
        "{SUMMARY_SELECT} WHERE c.kafka_partition = ANY($2)
           AND c.last_window_start >= to_timestamp($1::bigint / 1000.0)
         GROUP BY c.name"
    );
    let rows = sqlx::query(&sql)
        .bind(active_since_ms)
        .bind(partitions)
        .fetch_all(executor)
        .await?;
    rows.iter().map(summary_from_row).collect()
}

/// One page of every counter's summary, in name order, after `after_name`.
pub async fn load_page(
    executor: impl PgExecutor<'_>,
    after_name: &str,
    page_size: i64,
    windows_from_ms: i64,
) -> Result<Vec<CounterSummaryRow>, sqlx::Error> {
    let sql =
        format!("{SUMMARY_SELECT} WHERE c.name > $2 GROUP BY c.name ORDER BY c.name LIMIT $3");
    let rows = sqlx::query(&sql)
        .bind(windows_from_ms)
        .bind(after_name)
        .bind(page_size)
        .fetch_all(executor)
        .await?;
    rows.iter().map(summary_from_row).collect()
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
    fn the_watermark_is_the_oldest_partition() {
        let meta = pairs(&[("epoch", "e1"), ("valid_from", "0")]);
        let closed = pairs(&[("partitions", "2"), ("0", "15000"), ("1", "10000")]);
        assert_eq!(
            parse_watermark(&meta, &closed),
            Ok(Watermark {
                epoch: "e1".into(),
                valid_from_ms: 0,
                closed_window_ms: 10_000,
                closed_by_partition: vec![15_000, 10_000],
            })
        );
    }

    #[test]
    fn a_missing_partition_or_meta_means_redis_is_not_trusted() {
        let meta = pairs(&[("epoch", "e1"), ("valid_from", "0")]);
        let closed = pairs(&[("partitions", "2"), ("0", "15000")]);
        assert_eq!(
            parse_watermark(&meta, &closed),
            Err(WatermarkMissing::NoClosedWindows)
        );
        assert_eq!(parse_watermark(&[], &closed), Err(WatermarkMissing::NoMeta));
    }
}
