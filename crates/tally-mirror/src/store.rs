//! What the mirror reads from and records in PostgreSQL: full summaries for repairs, and each
//! partition's generations.

use std::collections::{BTreeMap, HashMap};

use sqlx::{PgConnection, PgExecutor, PgPool};

use crate::summary::{CounterSummary, NamedSummary, WindowRecords};

/// Where one partition's commits stand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionGenerations {
    pub partition: i32,
    /// The generation of the partition's latest commit to PostgreSQL (0: never committed).
    pub generation: i64,
    /// The generation of the commit before it: every bucket that holds data must have it, since
    /// an aggregator copies a commit into the mirror before it makes the next one.
    pub previous_generation: i64,
    /// The generation of its latest commit copied into every bucket that holds data.
    pub mirrored_generation: i64,
    /// Every record stamped with this window or earlier is applied.
    pub closed_window_ms: Option<i64>,
    /// When the latest commit was made, by PostgreSQL's clock (Unix ms).
    pub committed_at_ms: i64,
}

/// Every partition's generations, and PostgreSQL's clock when they were read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Generations {
    pub partitions: Vec<PartitionGenerations>,
    pub postgres_now_ms: i64,
}

/// Every partition of the consumer group's topic that has ever been assigned.
pub async fn partition_generations(
    executor: impl PgExecutor<'_>,
    group: &str,
    topic: &str,
) -> Result<Generations, sqlx::Error> {
    type Row = (i32, i64, i64, i64, Option<i64>, i64, i64);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT kafka_partition, generation, previous_generation, mirrored_generation,
                (extract(epoch FROM closed_window_start) * 1000)::bigint,
                (extract(epoch FROM updated_at) * 1000)::bigint,
                (extract(epoch FROM now()) * 1000)::bigint
         FROM consumer_offsets WHERE consumer_group = $1 AND topic = $2
         ORDER BY kafka_partition",
    )
    .bind(group)
    .bind(topic)
    .fetch_all(executor)
    .await?;
    let postgres_now_ms = rows.first().map_or(0, |row| row.6);
    let partitions = rows
        .into_iter()
        .map(
            |(
                partition,
                generation,
                previous_generation,
                mirrored_generation,
                closed_window_ms,
                committed_at_ms,
                _,
            )| PartitionGenerations {
                partition,
                generation,
                previous_generation,
                mirrored_generation,
                closed_window_ms,
                committed_at_ms,
            },
        )
        .collect();
    Ok(Generations {
        partitions,
        postgres_now_ms,
    })
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

/// Window records by counter name.
pub type WindowsByName = HashMap<String, BTreeMap<i64, WindowRecords>>;

/// From this many counters in one chunk on, a repair reads every recent window record at once
/// (one range scan, shared by the chunks that follow) rather than counter by counter.
const COUNTERS_FOR_ONE_WINDOW_SCAN: usize = 5_000;

/// Full summaries of the selected counters, with the bucket each belongs to. Their window
/// records are read counter by counter for a small selection, and for a large one from every
/// recent window record, read once into `recent_windows` and kept for the next call. Call it
/// inside one transaction (REPEATABLE READ) with whatever else must agree with it.
pub async fn load_summaries(
    connection: &mut PgConnection,
    selection: &RepairSelection,
    recent_windows: &mut Option<WindowsByName>,
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
    if recent_windows.is_none() && counters.len() >= COUNTERS_FOR_ONE_WINDOW_SCAN {
        *recent_windows = Some(load_recent_windows(connection, selection.windows_from_ms).await?);
    }
    let read_here;
    let windows = match recent_windows {
        Some(windows) => &*windows,
        None => {
            let names: Vec<&str> = counters.iter().map(|counter| counter.0.as_str()).collect();
            read_here = windows_of(connection, &names, selection.windows_from_ms).await?;
            &read_here
        }
    };
    Ok(counters
        .into_iter()
        .map(|(name, total, version, partition, bucket)| {
            let windows = windows.get(&name).cloned().unwrap_or_default();
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

/// The window records of the named counters from `windows_from_ms` on: one probe of the
/// `counter_windows` primary key per counter, cheap for a few buckets.
async fn windows_of(
    connection: &mut PgConnection,
    names: &[&str],
    windows_from_ms: i64,
) -> Result<WindowsByName, sqlx::Error> {
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT w.name, (extract(epoch FROM w.window_start) * 1000)::bigint, w.positive, w.negative
         FROM unnest($1::text[]) AS n(name)
         JOIN counter_windows w ON w.name = n.name
                               AND w.window_start >= to_timestamp($2::bigint / 1000.0)",
    )
    .bind(names)
    .bind(windows_from_ms)
    .fetch_all(connection)
    .await?;
    Ok(group_windows(rows))
}

/// Every counter's window records from `windows_from_ms` on, in one range scan of
/// `counter_windows_by_start`: cheaper than a probe per counter once a repair covers many
/// counters, since only recently active counters have recent windows.
async fn load_recent_windows(
    connection: &mut PgConnection,
    windows_from_ms: i64,
) -> Result<WindowsByName, sqlx::Error> {
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT name, (extract(epoch FROM window_start) * 1000)::bigint, positive, negative
         FROM counter_windows WHERE window_start >= to_timestamp($1::bigint / 1000.0)",
    )
    .bind(windows_from_ms)
    .fetch_all(connection)
    .await?;
    Ok(group_windows(rows))
}

fn group_windows(rows: Vec<(String, i64, i64, i64)>) -> WindowsByName {
    let mut windows: WindowsByName = HashMap::new();
    for (name, start, positive, negative) in rows {
        windows
            .entry(name)
            .or_default()
            .insert(start, WindowRecords { positive, negative });
    }
    windows
}
