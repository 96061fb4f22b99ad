//! What the mirror reads from and records in PostgreSQL: full summaries for repairs, and each
//! partition's generations.

use std::collections::{BTreeMap, HashMap};

use sqlx::{PgConnection, PgExecutor, PgPool};

use crate::summary::{CounterSummary, NamedSummary, WindowRecords};

/// Where one partition's commits stand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionGenerations {
    pub partition: i32,
    /// The generation of the partition's latest commit to PostgreSQL.
    pub generation: i64,
    /// The generation of its latest commit copied into every bucket that holds data.
    pub mirrored_generation: i64,
    /// Every record stamped with this window or earlier is applied.
    pub closed_window_ms: Option<i64>,
}

/// Every partition of the consumer group's topic that has ever been assigned.
pub async fn partition_generations(
    executor: impl PgExecutor<'_>,
    group: &str,
    topic: &str,
) -> Result<Vec<PartitionGenerations>, sqlx::Error> {
    let rows: Vec<(i32, i64, i64, Option<i64>)> = sqlx::query_as(
        "SELECT kafka_partition, generation, mirrored_generation,
                (extract(epoch FROM closed_window_start) * 1000)::bigint
         FROM consumer_offsets WHERE consumer_group = $1 AND topic = $2
         ORDER BY kafka_partition",
    )
    .bind(group)
    .bind(topic)
    .fetch_all(executor)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(partition, generation, mirrored_generation, closed_window_ms)| PartitionGenerations {
                partition,
                generation,
                mirrored_generation,
                closed_window_ms,
            },
        )
        .collect())
}

/// Records that the partitions' commits up to `generation` are in every bucket that holds data.
/// Never moves back, and never past the partition's own latest commit.
pub async fn record_mirrored(
    pool: &PgPool,
    group: &str,
    topic: &str,
    partitions: &[i32],
    generation: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE consumer_offsets
         SET mirrored_generation = GREATEST(mirrored_generation, LEAST($4, generation))
         WHERE consumer_group = $1 AND topic = $2 AND kafka_partition = ANY($3)",
    )
    .bind(group)
    .bind(topic)
    .bind(partitions)
    .bind(generation)
    .execute(pool)
    .await?;
    Ok(())
}

/// Which counters a repair reads: in each bucket, those touched by a commit after a generation.
#[derive(Clone, Debug, Default)]
pub struct RepairSelection {
    /// (bucket, generation): the counters of the bucket whose generation is above it.
    pub buckets: Vec<(u32, i64)>,
    /// Only counters of these partitions; None for all.
    pub partitions: Option<Vec<i32>>,
    /// Window sums from this window on go into the summaries.
    pub windows_from_ms: i64,
}

/// Full summaries of the selected counters, with the bucket each belongs to. Call it inside one
/// transaction (REPEATABLE READ) with whatever else must agree with it: the counters and their
/// windows are read in two statements.
pub async fn load_summaries(
    connection: &mut PgConnection,
    selection: &RepairSelection,
) -> Result<Vec<(u32, NamedSummary)>, sqlx::Error> {
    if selection.buckets.is_empty() {
        return Ok(Vec::new());
    }
    let buckets: Vec<i32> = selection
        .buckets
        .iter()
        .map(|(bucket, _)| *bucket as i32)
        .collect();
    let after: Vec<i64> = selection
        .buckets
        .iter()
        .map(|(_, generation)| *generation)
        .collect();
    // One index range scan of counters_by_bucket_and_generation per bucket, whatever the chunk:
    // the plan never depends on how far a rebuild has got.
    let counters: Vec<(String, i64, i64, i32, i32)> = sqlx::query_as(
        "SELECT c.name, c.total, c.version, c.kafka_partition, c.bucket
         FROM unnest($1::int[], $2::bigint[]) AS r(bucket, after)
         JOIN counters c ON c.bucket = r.bucket AND c.generation > r.after
         WHERE $3::int[] IS NULL OR c.kafka_partition = ANY($3)",
    )
    .bind(&buckets)
    .bind(&after)
    .bind(&selection.partitions)
    .fetch_all(&mut *connection)
    .await?;
    if counters.is_empty() {
        return Ok(Vec::new());
    }
    let windows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT w.name, (extract(epoch FROM w.window_start) * 1000)::bigint, w.positive, w.negative
         FROM unnest($1::int[], $2::bigint[]) AS r(bucket, after)
         JOIN counters c ON c.bucket = r.bucket AND c.generation > r.after
         JOIN counter_windows w ON w.name = c.name
                               AND w.window_start >= to_timestamp($4::bigint / 1000.0)
         WHERE $3::int[] IS NULL OR c.kafka_partition = ANY($3)",
    )
    .bind(&buckets)
    .bind(&after)
    .bind(&selection.partitions)
    .bind(selection.windows_from_ms)
    .fetch_all(&mut *connection)
    .await?;
    let mut windows_by_name: HashMap<String, BTreeMap<i64, WindowRecords>> = HashMap::new();
    for (name, start, positive, negative) in windows {
        windows_by_name
            .entry(name)
            .or_default()
            .insert(start, WindowRecords { positive, negative });
    }
    Ok(counters
        .into_iter()
        .map(|(name, total, version, partition, bucket)| {
            let windows = windows_by_name.remove(&name).unwrap_or_default();
            let summary = CounterSummary {
                version,
                total,
                partition,
                complete_from_ms: selection.windows_from_ms,
                windows,
            };
            (bucket as u32, NamedSummary { name, summary })
        })
        .collect())
}
