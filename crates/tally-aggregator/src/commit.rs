//! The one place an increment becomes durable in PostgreSQL: one transaction per window that
//! checks the partitions' offsets, then runs ONE statement that upserts the window sums, the
//! counter totals and the new offsets together.

use std::collections::BTreeMap;

use sqlx::{PgPool, Row};
use tally_infra::summaries::CounterSummaryRow;

use crate::pending::CommitRows;

/// The offsets and closed windows a commit moves its partitions to.
#[derive(Debug, Default)]
pub(crate) struct OffsetRows {
    pub(crate) partitions: Vec<i32>,
    /// What PostgreSQL must still hold for each partition for the commit to go ahead.
    pub(crate) expected_offsets: Vec<i64>,
    pub(crate) next_offsets: Vec<i64>,
    pub(crate) closed_windows_ms: Vec<Option<i64>>,
}

#[derive(Debug)]
pub(crate) enum CommitOutcome {
    /// Committed. The summaries of the counters the commit touched, as PostgreSQL now has them:
    /// total, version, and the sums of the windows the commit touched; and how many keyed
    /// increments were dropped because their key had been applied in an earlier window.
    Committed {
        summaries: Vec<CounterSummaryRow>,
        duplicates_absorbed: u64,
    },
    /// Another aggregator moved these partitions' offsets: it owns them now, and what was read
    /// here must be dropped.
    Fenced(Vec<i32>),
}

/// Upserts `counter_windows`, `counters` and `consumer_offsets` in one statement, after claiming
/// the window's idempotency keys in `idempotency_keys`: a keyed increment whose key was already
/// applied (and has not expired) is taken out of its window's sum before anything is added. Sums
/// are added as `numeric` and clamped into the `bigint` range, so a counter saturates rather than
/// wraps or fails the whole window.
const WINDOW_UPSERT: &str = r#"
WITH keyed AS (
    SELECT * FROM unnest($10::text[], $11::text[], $12::bigint[], $13::bigint[])
         AS t(key, name, window_start_ms, by)
),
claimed AS (
    INSERT INTO idempotency_keys AS i (key, counter, by, applied_at)
    SELECT key, name, by, now() FROM keyed
    ON CONFLICT (key) DO UPDATE
        SET counter = excluded.counter, by = excluded.by, applied_at = excluded.applied_at
        WHERE i.applied_at <= now() - make_interval(secs => $14)
    RETURNING key
),
applied_before AS (
    SELECT name, window_start_ms, sum(by) AS by, count(*) AS increments
    FROM keyed
    WHERE key NOT IN (SELECT key FROM claimed)
    GROUP BY name, window_start_ms
),
input AS (
    SELECT r.name, to_timestamp(r.window_start_ms / 1000.0) AS window_start,
           r.delta - coalesce(a.by, 0) AS delta, r.dropped + coalesce(a.by, 0) AS dropped,
           r.kafka_partition
    FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::int[], $15::bigint[])
         AS r(name, window_start_ms, delta, kafka_partition, dropped)
    LEFT JOIN applied_before a
           ON a.name = r.name AND a.window_start_ms = r.window_start_ms
),
windows AS (
    INSERT INTO counter_windows AS w (name, window_start, sum, dropped)
    SELECT name, window_start,
           LEAST(GREATEST(delta, -9223372036854775808), 9223372036854775807)::bigint,
           LEAST(GREATEST(dropped, -9223372036854775808), 9223372036854775807)::bigint
    FROM input
    ON CONFLICT (name, window_start) DO UPDATE
        SET sum = LEAST(GREATEST(w.sum::numeric + excluded.sum, -9223372036854775808),
                        9223372036854775807)::bigint,
            dropped = LEAST(GREATEST(w.dropped::numeric + excluded.dropped, -9223372036854775808),
                            9223372036854775807)::bigint
    -- What Redis's deltas for the window hold that the total accounts for: the applied sum and
    -- the dropped retries (see tally_core::value).
    RETURNING name, (extract(epoch FROM window_start) * 1000)::bigint AS window_start_ms,
              LEAST(GREATEST(sum::numeric + dropped, -9223372036854775808),
                    9223372036854775807)::bigint AS sum
),
totals AS (
    INSERT INTO counters AS c (name, total, version, kafka_partition, last_window_start)
    SELECT name,
           LEAST(GREATEST(sum(delta), -9223372036854775808), 9223372036854775807)::bigint,
           1, min(kafka_partition), max(window_start)
    FROM input
    GROUP BY name
    ON CONFLICT (name) DO UPDATE
        SET total = LEAST(GREATEST(c.total::numeric + excluded.total, -9223372036854775808),
                          9223372036854775807)::bigint,
            version = c.version + 1,
            kafka_partition = excluded.kafka_partition,
            last_window_start = GREATEST(c.last_window_start, excluded.last_window_start),
            updated_at = now()
    RETURNING name, total, version, kafka_partition
),
offsets AS (
    INSERT INTO consumer_offsets AS o
        (consumer_group, topic, kafka_partition, next_offset, closed_window_start)
    SELECT $5, $6, kafka_partition, next_offset, to_timestamp(closed_ms / 1000.0)
    FROM unnest($7::int[], $8::bigint[], $9::bigint[]) AS t(kafka_partition, next_offset, closed_ms)
    ON CONFLICT (consumer_group, topic, kafka_partition) DO UPDATE
        SET next_offset = excluded.next_offset,
            closed_window_start = GREATEST(o.closed_window_start, excluded.closed_window_start),
            updated_at = now()
    RETURNING kafka_partition
)
SELECT 'window' AS kind, name, window_start_ms, sum AS value, 0::bigint AS version,
       0 AS kafka_partition
FROM windows
UNION ALL
SELECT 'total', name, 0::bigint, total, version, kafka_partition FROM totals
UNION ALL
SELECT 'duplicates', '', 0::bigint, coalesce(sum(increments), 0)::bigint, 0::bigint, 0
FROM applied_before
"#;

pub(crate) async fn commit_window(
    pool: &PgPool,
    group: &str,
    topic: &str,
    rows: &CommitRows,
    offsets: &OffsetRows,
    idempotency_window_secs: u64,
) -> Result<CommitOutcome, sqlx::Error> {
    let mut transaction = pool.begin().await?;

    // Lock the partitions' offset rows and check nobody else moved them since we read them.
    let stored: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT kafka_partition, next_offset FROM consumer_offsets
         WHERE consumer_group = $1 AND topic = $2 AND kafka_partition = ANY($3)
         ORDER BY kafka_partition
         FOR UPDATE",
    )
    .bind(group)
    .bind(topic)
    .bind(&offsets.partitions)
    .fetch_all(&mut *transaction)
    .await?;
    let stored: BTreeMap<i32, i64> = stored.into_iter().collect();
    let fenced: Vec<i32> = offsets
        .partitions
        .iter()
        .zip(&offsets.expected_offsets)
        .filter(|(partition, expected)| stored.get(partition) != Some(expected))
        .map(|(partition, _)| *partition)
        .collect();
    if !fenced.is_empty() {
        transaction.rollback().await?;
        return Ok(CommitOutcome::Fenced(fenced));
    }

    let returned = sqlx::query(WINDOW_UPSERT)
        .bind(&rows.names)
        .bind(&rows.window_starts_ms)
        .bind(&rows.sums)
        .bind(&rows.partitions)
        .bind(group)
        .bind(topic)
        .bind(&offsets.partitions)
        .bind(&offsets.next_offsets)
        .bind(&offsets.closed_windows_ms)
        .bind(&rows.keys)
        .bind(&rows.key_names)
        .bind(&rows.key_window_starts_ms)
        .bind(&rows.key_amounts)
        .bind(idempotency_window_secs as f64)
        .bind(&rows.dropped)
        .fetch_all(&mut *transaction)
        .await?;
    transaction.commit().await?;

    let mut summaries: BTreeMap<String, CounterSummaryRow> = BTreeMap::new();
    let mut duplicates_absorbed = 0;
    for row in &returned {
        let kind: &str = row.try_get("kind")?;
        if kind == "duplicates" {
            duplicates_absorbed = row.try_get::<i64, _>("value")? as u64;
            continue;
        }
        let name: String = row.try_get("name")?;
        let summary = summaries
            .entry(name.clone())
            .or_insert_with(|| CounterSummaryRow {
                name,
                version: 0,
                total: 0,
                partition: 0,
                windows: Vec::new(),
            });
        if kind == "total" {
            summary.total = row.try_get("value")?;
            summary.version = row.try_get("version")?;
            summary.partition = row.try_get("kafka_partition")?;
        } else {
            summary
                .windows
                .push((row.try_get("window_start_ms")?, row.try_get("value")?));
        }
    }
    Ok(CommitOutcome::Committed {
        summaries: summaries.into_values().collect(),
        duplicates_absorbed,
    })
}

/// Deletes idempotency keys older than the window, oldest first, in batches that each walk the
/// `applied_at` index: never a scan of the whole table, and never on the write path.
pub(crate) async fn prune_expired_keys(
    pool: &PgPool,
    window_secs: u64,
) -> Result<u64, sqlx::Error> {
    const BATCH: i64 = 10_000;
    let mut pruned = 0;
    loop {
        let deleted = sqlx::query(
            "DELETE FROM idempotency_keys WHERE key IN (
                 SELECT key FROM idempotency_keys
                 WHERE applied_at <= now() - make_interval(secs => $1)
                 ORDER BY applied_at LIMIT $2)",
        )
        .bind(window_secs as f64)
        .bind(BATCH)
        .execute(pool)
        .await?
        .rows_affected();
        pruned += deleted;
        if deleted < BATCH as u64 {
            return Ok(pruned);
        }
    }
}

/// Makes sure each partition has an offset row, and returns `(next_offset, closed_window_ms)`
/// for each. A partition seen for the first time starts at offset 0, the log's beginning.
pub(crate) async fn load_offsets(
    pool: &PgPool,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, (i64, Option<i64>)>, sqlx::Error> {
    sqlx::query(
        "INSERT INTO consumer_offsets (consumer_group, topic, kafka_partition, next_offset)
         SELECT $1, $2, kafka_partition, 0 FROM unnest($3::int[]) AS t(kafka_partition)
         ON CONFLICT DO NOTHING",
    )
    .bind(group)
    .bind(topic)
    .bind(partitions)
    .execute(pool)
    .await?;
    let rows: Vec<(i32, i64, Option<i64>)> = sqlx::query_as(
        "SELECT kafka_partition, next_offset,
                (extract(epoch FROM closed_window_start) * 1000)::bigint
         FROM consumer_offsets
         WHERE consumer_group = $1 AND topic = $2 AND kafka_partition = ANY($3)",
    )
    .bind(group)
    .bind(topic)
    .bind(partitions)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(partition, offset, closed)| (partition, (offset, closed)))
        .collect())
}
