//! The one place an increment or a set becomes durable in PostgreSQL: one transaction per window
//! that checks the partitions' offsets, then runs ONE statement that claims the idempotency
//! keys, upserts the window sums, the counter totals and the new offsets, and writes the sets'
//! audit rows, together.

use std::collections::BTreeMap;

use sqlx::PgPool;
use tally_mirror::{CommittedCounter, WindowRecords};

use crate::pending::{CommitRows, StoredPartition};

#[derive(Debug)]
pub(crate) enum CommitOutcome {
    /// Committed. Every counter the commit touched, as PostgreSQL now has it.
    Committed(CommittedWindow),
    /// Another aggregator moved these partitions' offsets: it owns them now, and what was read
    /// here must be dropped.
    Fenced(Vec<i32>),
}

#[derive(Debug, Default)]
pub(crate) struct CommittedWindow {
    pub(crate) counters: Vec<CommittedCounter>,
    /// Keyed increments dropped because the same use of the key was applied before.
    pub(crate) duplicates_absorbed: u64,
    /// Keyed increments counted although their key was applied before with another counter or
    /// amount: both uses were acknowledged.
    pub(crate) conflicts: u64,
}

/// Claims the commit's key uses in `idempotency_keys` (a use already applied, and not expired,
/// is taken out of its window's sum before anything is added), then upserts `counter_windows`,
/// `counters` and `consumer_offsets`. Sums are added as `numeric` and clamped into the `bigint`
/// range, so a counter saturates rather than wraps or fails the whole window.
///
/// A counter with a set takes the set's value plus the commit's sums as its total, and the set's
/// window takes `value - old total` on top of its sum, so the counter's windows still add up to
/// its total (unless the jump passes the `bigint` range and the window's sum is clamped). A set
/// whose audit id was applied before is a retry, and changes nothing. The old total is the total before the statement (its snapshot does not see the
/// statement's own writes): the pending window only takes a set into a commit that holds
/// nothing read before it for that counter, so that is everything before the set, and it is
/// also the audit row's old value.
const WINDOW_UPSERT: &str = r#"
WITH keyed AS (
    SELECT * FROM unnest($12::text[], $13::text[], $14::bigint[], $15::bigint[])
         AS t(key, name, window_start_ms, by)
),
claimed AS (
    INSERT INTO idempotency_keys AS i (key, counter, by, applied_at)
    SELECT key, name, by, now() FROM keyed
    ON CONFLICT (key, counter, by) DO UPDATE SET applied_at = excluded.applied_at
        WHERE i.applied_at <= now() - make_interval(secs => $16)
    RETURNING key, counter, by
),
applied_before AS (
    SELECT k.name, k.window_start_ms, sum(k.by) AS by, count(*) AS increments
    FROM keyed k
    WHERE NOT EXISTS (
        SELECT 1 FROM claimed c WHERE c.key = k.key AND c.counter = k.name AND c.by = k.by)
    GROUP BY k.name, k.window_start_ms
),
-- Uses applied now of a key applied before with another counter or amount (the statement's
-- snapshot does not see the rows it inserts itself; a retry of such a use is not applied now,
-- so it is not counted again).
conflicts AS (
    SELECT count(*) AS uses FROM claimed c
    WHERE EXISTS (
        SELECT 1 FROM idempotency_keys i
        WHERE i.key = c.key AND (i.counter <> c.counter OR i.by <> c.by)
          AND i.applied_at > now() - make_interval(secs => $16))
),
sets AS (
    SELECT s.*, coalesce(c.total, 0) AS old_value
    FROM unnest($18::text[], $19::bigint[], $20::bigint[], $21::text[], $22::text[], $23::text[],
                $24::text[], $25::bigint[])
         AS s(name, window_start_ms, value, audit_id, actor, client, reason, requested_ms)
    LEFT JOIN counters c ON c.name = s.name
),
-- A set is applied once per audit id: a retry of a set (the same Idempotency-Key, counter and
-- value) lands as a record of its own, and only the first is applied.
audits AS (
    INSERT INTO counter_audit (audit_id, counter, actor, client, reason, requested_at,
                               old_value, new_value)
    SELECT audit_id, name, actor, client, reason, to_timestamp(requested_ms / 1000.0),
           old_value, value
    FROM sets
    ON CONFLICT (audit_id) DO NOTHING
    RETURNING audit_id
),
applied_sets AS (
    SELECT s.* FROM sets s JOIN audits a ON a.audit_id = s.audit_id
),
input AS (
    SELECT r.name, to_timestamp(r.window_start_ms / 1000.0) AS window_start,
           r.delta - coalesce(a.by, 0) AS delta,
           coalesce(s.value::numeric - s.old_value, 0) AS set_adjustment,
           r.positive, r.negative, r.kafka_partition
    FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::int[])
         AS r(name, window_start_ms, delta, positive, negative, kafka_partition)
    LEFT JOIN applied_before a
           ON a.name = r.name AND a.window_start_ms = r.window_start_ms
    LEFT JOIN applied_sets s ON s.name = r.name AND s.window_start_ms = r.window_start_ms
),
windows AS (
    INSERT INTO counter_windows AS w (name, window_start, sum, positive, negative)
    SELECT name, window_start,
           LEAST(GREATEST(delta + set_adjustment, -9223372036854775808),
                 9223372036854775807)::bigint,
           positive, negative
    FROM input
    ON CONFLICT (name, window_start) DO UPDATE
        SET sum = LEAST(GREATEST(w.sum::numeric + excluded.sum, -9223372036854775808),
                        9223372036854775807)::bigint,
            positive = LEAST(w.positive::numeric + excluded.positive, 9223372036854775807)::bigint,
            negative = GREATEST(w.negative::numeric + excluded.negative,
                                -9223372036854775808)::bigint
    RETURNING name, (extract(epoch FROM window_start) * 1000)::bigint AS window_start_ms,
              positive, negative
),
totals AS (
    INSERT INTO counters AS c (name, total, version, kafka_partition, last_window_start,
                               generation)
    SELECT i.name,
           LEAST(GREATEST(coalesce(max(s.value), 0) + sum(i.delta), -9223372036854775808),
                 9223372036854775807)::bigint,
           1, min(i.kafka_partition), max(i.window_start), $11
    FROM input i
    LEFT JOIN applied_sets s ON s.name = i.name
    GROUP BY i.name
    ON CONFLICT (name) DO UPDATE
        SET total = CASE
                WHEN EXISTS (SELECT 1 FROM applied_sets s WHERE s.name = c.name)
                    THEN excluded.total
                ELSE LEAST(GREATEST(c.total::numeric + excluded.total, -9223372036854775808),
                           9223372036854775807)::bigint
            END,
            version = c.version + 1,
            kafka_partition = excluded.kafka_partition,
            last_window_start = GREATEST(c.last_window_start, excluded.last_window_start),
            generation = excluded.generation,
            updated_at = now()
    RETURNING name, total, version, kafka_partition
),
offsets AS (
    INSERT INTO consumer_offsets AS o
        (consumer_group, topic, kafka_partition, next_offset, closed_window_start, generation)
    SELECT $7, $8, kafka_partition, next_offset, to_timestamp(closed_ms / 1000.0), $11
    FROM unnest($9::int[], $10::bigint[], $17::bigint[]) AS t(kafka_partition, next_offset, closed_ms)
    ON CONFLICT (consumer_group, topic, kafka_partition) DO UPDATE
        SET next_offset = excluded.next_offset,
            closed_window_start = GREATEST(o.closed_window_start, excluded.closed_window_start),
            previous_generation = o.generation,
            generation = excluded.generation,
            updated_at = now()
    RETURNING kafka_partition
)
SELECT t.name, t.total, t.version, t.kafka_partition,
       array_agg(w.window_start_ms ORDER BY w.window_start_ms) AS window_starts,
       array_agg(w.positive ORDER BY w.window_start_ms) AS positives,
       array_agg(w.negative ORDER BY w.window_start_ms) AS negatives,
       (SELECT coalesce(sum(increments), 0) FROM applied_before)::bigint AS duplicates_absorbed,
       (SELECT uses FROM conflicts)::bigint AS conflicts
FROM totals t
JOIN windows w ON w.name = t.name
GROUP BY t.name, t.total, t.version, t.kafka_partition
"#;

/// One row of the statement's result: a counter with the windows the commit touched.
type CommittedRow = (
    String,
    i64,
    i64,
    i32,
    Vec<i64>,
    Vec<i64>,
    Vec<i64>,
    i64,
    i64,
);

pub(crate) async fn commit_window(
    pool: &PgPool,
    group: &str,
    topic: &str,
    rows: &CommitRows,
    idempotency_window_secs: u64,
) -> Result<CommitOutcome, sqlx::Error> {
    let mut transaction = pool.begin().await?;

    // Lock the partitions' offset rows and check nobody else moved them since we read them.
    let partitions: Vec<i32> = rows.offsets.iter().map(|row| row.partition).collect();
    let stored: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT kafka_partition, next_offset FROM consumer_offsets
         WHERE consumer_group = $1 AND topic = $2 AND kafka_partition = ANY($3)
         ORDER BY kafka_partition
         FOR UPDATE",
    )
    .bind(group)
    .bind(topic)
    .bind(&partitions)
    .fetch_all(&mut *transaction)
    .await?;
    let stored: BTreeMap<i32, i64> = stored.into_iter().collect();
    let fenced: Vec<i32> = rows
        .offsets
        .iter()
        .filter(|row| stored.get(&row.partition) != Some(&row.expected_offset))
        .map(|row| row.partition)
        .collect();
    if !fenced.is_empty() {
        transaction.rollback().await?;
        return Ok(CommitOutcome::Fenced(fenced));
    }

    // The typed rows become the statement's column arrays here, and only here.
    let windows = &rows.windows;
    let key_uses = &rows.key_uses;
    let returned: Vec<CommittedRow> = sqlx::query_as(WINDOW_UPSERT)
        .bind(column(windows, |row| row.name.as_str()))
        .bind(column(windows, |row| row.window_start_ms))
        .bind(column(windows, |row| row.sum))
        .bind(column(windows, |row| row.positive))
        .bind(column(windows, |row| row.negative))
        .bind(column(windows, |row| row.partition))
        .bind(group)
        .bind(topic)
        .bind(&partitions)
        .bind(column(&rows.offsets, |row| row.next_offset))
        .bind(rows.generation)
        .bind(column(key_uses, |row| row.key.as_str()))
        .bind(column(key_uses, |row| row.counter.as_str()))
        .bind(column(key_uses, |row| row.window_start_ms))
        .bind(column(key_uses, |row| row.by))
        .bind(idempotency_window_secs as f64)
        .bind(column(&rows.offsets, |row| row.closed_window_ms))
        .bind(column(&rows.sets, |row| row.name.as_str()))
        .bind(column(&rows.sets, |row| row.window_start_ms))
        .bind(column(&rows.sets, |row| row.value))
        .bind(column(&rows.sets, |row| row.audit.id.as_str()))
        .bind(column(&rows.sets, |row| row.audit.actor.as_str()))
        .bind(column(&rows.sets, |row| row.audit.client.as_str()))
        .bind(column(&rows.sets, |row| row.audit.reason.as_str()))
        .bind(column(&rows.sets, |row| row.audit.requested_at_ms))
        .fetch_all(&mut *transaction)
        .await?;
    transaction.commit().await?;

    let mut committed = CommittedWindow::default();
    for (name, total, version, partition, starts, positives, negatives, duplicates, conflicts) in
        returned
    {
        committed.duplicates_absorbed = duplicates as u64;
        committed.conflicts = conflicts as u64;
        let touched_windows = starts
            .into_iter()
            .zip(positives.into_iter().zip(negatives))
            .map(|(start, (positive, negative))| (start, WindowRecords { positive, negative }))
            .collect();
        committed.counters.push(CommittedCounter {
            name,
            version,
            total,
            partition,
            touched_windows,
        });
    }
    Ok(CommitOutcome::Committed(committed))
}

/// One field of every row, as the array `unnest` takes it.
fn column<'r, Row, Field>(rows: &'r [Row], field: impl Fn(&'r Row) -> Field) -> Vec<Field> {
    rows.iter().map(field).collect()
}

/// Deletes idempotency keys older than the window, oldest first, in batches that each walk the
/// `applied_at` index: never a scan of the whole table, and never on the write path. One
/// aggregator at a time does it: each batch runs only while holding a transaction-scoped
/// advisory lock, and an aggregator that does not get it leaves the batch to the one that did.
pub(crate) async fn prune_expired_keys(
    pool: &PgPool,
    window_secs: u64,
) -> Result<u64, sqlx::Error> {
    const BATCH: i64 = 10_000;
    let mut pruned = 0;
    loop {
        let mut transaction = pool.begin().await?;
        let locked: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_xact_lock(hashtext('tally: prune idempotency keys'))",
        )
        .fetch_one(&mut *transaction)
        .await?;
        if !locked {
            return Ok(pruned);
        }
        let deleted = sqlx::query(
            // The outer condition again: a key use renewed by a commit while this runs is
            // re-checked on the row's new version, and kept.
            "DELETE FROM idempotency_keys WHERE (key, counter, by) IN (
                 SELECT key, counter, by FROM idempotency_keys
                 WHERE applied_at <= now() - make_interval(secs => $1)
                 ORDER BY applied_at LIMIT $2)
             AND applied_at <= now() - make_interval(secs => $1)",
        )
        .bind(window_secs as f64)
        .bind(BATCH)
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        transaction.commit().await?;
        pruned += deleted;
        if deleted < BATCH as u64 {
            return Ok(pruned);
        }
    }
}

/// Makes sure each partition has an offset row, and returns where each stands.
/// A partition seen for the first time starts at offset 0, the log's beginning.
pub(crate) async fn load_partitions(
    pool: &PgPool,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<BTreeMap<i32, StoredPartition>, sqlx::Error> {
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
    let rows: Vec<(i32, i64, Option<i64>, i64, i64)> = sqlx::query_as(
        "SELECT kafka_partition, next_offset,
                (extract(epoch FROM closed_window_start) * 1000)::bigint,
                generation, mirrored_generation
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
        .map(
            |(partition, next_offset, closed_window_ms, generation, mirrored_generation)| {
                (
                    partition,
                    StoredPartition {
                        next_offset,
                        closed_window_ms,
                        generation,
                        mirrored_generation,
                    },
                )
            },
        )
        .collect())
}
