//! How many statements Tally ran against PostgreSQL while a scenario wrote, from
//! `pg_stat_statements`: the proof that PostgreSQL's write load follows the aggregation window,
//! not the increment rate. Counts are the difference between a snapshot taken before the
//! scenario's first phase and one taken once PostgreSQL held every acknowledged increment, for
//! the statements run in Tally's database only.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// Every statement's cumulative calls and rows at one moment, by query id.
#[derive(Debug, Clone, Default)]
pub struct StatementSnapshot {
    by_query_id: HashMap<i64, (String, i64, i64)>,
}

/// What the statements of one scenario added up to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatementCounts {
    /// From the first snapshot to the second.
    pub elapsed_secs: f64,
    /// Tally's aggregation window.
    pub window_secs: f64,
    /// Increments acknowledged in the scenario.
    pub increments: u64,
    /// Most calls first.
    pub statements: Vec<StatementCount>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatementCount {
    /// What the statement does, for the table.
    pub label: String,
    /// The statement's normalized text, shortened to one line.
    pub query: String,
    pub calls: u64,
    pub rows: u64,
}

/// The statement that makes a window durable (crates/tally-aggregator/src/commit.rs).
const WINDOW_UPSERT_PREFIX: &str = "WITH keyed AS";
pub const WINDOW_UPSERT_LABEL: &str = "window upsert";
/// The load tool's own convergence checks run in Tally's database too; they are not Tally's load.
pub const LOAD_TOOL_LABEL: &str = "load tool's check";

impl StatementCounts {
    pub fn window_upserts(&self) -> u64 {
        self.statements
            .iter()
            .filter(|statement| statement.label == WINDOW_UPSERT_LABEL)
            .map(|statement| statement.calls)
            .sum()
    }

    /// Every statement Tally ran (the load tool's own checks left out).
    pub fn tally_calls(&self) -> u64 {
        self.statements
            .iter()
            .filter(|statement| statement.label != LOAD_TOOL_LABEL)
            .map(|statement| statement.calls)
            .sum()
    }

    /// Windows that began while the scenario ran, rounded up.
    pub fn windows_elapsed(&self) -> f64 {
        (self.elapsed_secs / self.window_secs).ceil()
    }
}

/// Takes a snapshot of the statements run in `database`. `Ok(None)`: `pg_stat_statements` is
/// not installed in the database `stats` connects to (deploy/local/up.sh installs it when the
/// package has it), and the scenario reports no counts.
pub async fn snapshot(stats: &PgPool, database: &str) -> anyhow::Result<Option<StatementSnapshot>> {
    let installed: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements')",
    )
    .fetch_one(stats)
    .await?;
    if !installed {
        return Ok(None);
    }
    let rows: Vec<(Option<i64>, Option<String>, i64, i64)> = sqlx::query_as(
        "SELECT s.queryid, s.query, s.calls, s.rows
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
         WHERE d.datname = $1",
    )
    .bind(database)
    .fetch_all(stats)
    .await?;
    let mut by_query_id = HashMap::new();
    for (query_id, query, calls, rows) in rows {
        let (Some(query_id), Some(query)) = (query_id, query) else {
            continue;
        };
        // The same statement can appear once per user and top-level flag: add them up.
        let entry = by_query_id.entry(query_id).or_insert((query, 0, 0));
        entry.1 += calls;
        entry.2 += rows;
    }
    Ok(Some(StatementSnapshot { by_query_id }))
}

/// The statements called between two snapshots.
pub fn difference(
    before: &StatementSnapshot,
    after: &StatementSnapshot,
    elapsed_secs: f64,
    window_secs: f64,
    increments: u64,
) -> StatementCounts {
    let mut statements: Vec<StatementCount> = after
        .by_query_id
        .iter()
        .filter_map(|(query_id, (query, calls, rows))| {
            let (calls_before, rows_before) = before
                .by_query_id
                .get(query_id)
                .map_or((0, 0), |(_, calls, rows)| (*calls, *rows));
            // A reset between the snapshots makes the counts smaller: then count from zero.
            let (calls, rows) = if *calls >= calls_before {
                (calls - calls_before, rows - rows_before)
            } else {
                (*calls, *rows)
            };
            (calls > 0).then(|| StatementCount {
                label: label_of(query),
                query: one_line(query, 90),
                calls: calls as u64,
                rows: rows.max(0) as u64,
            })
        })
        .collect();
    statements.sort_by(|a, b| b.calls.cmp(&a.calls).then_with(|| a.query.cmp(&b.query)));
    StatementCounts {
        elapsed_secs,
        window_secs,
        increments,
        statements,
    }
}

fn label_of(query: &str) -> String {
    let query = query.trim_start();
    if query.starts_with(WINDOW_UPSERT_PREFIX) {
        return WINDOW_UPSERT_LABEL.to_string();
    }
    let lower = query.to_ascii_lowercase();
    if lower.contains("consumer_offsets") && lower.contains("for update") {
        return "offset fence".to_string();
    }
    if lower.starts_with("delete from idempotency_keys") {
        return "expired key pruning".to_string();
    }
    if lower.contains("from counters where name like") {
        return LOAD_TOOL_LABEL.to_string();
    }
    if lower == "begin" || lower == "commit" {
        return format!("window transaction {lower}");
    }
    match lower.split_whitespace().next() {
        Some(verb) => format!("other {verb}"),
        None => "other".to_string(),
    }
}

fn one_line(query: &str, max_chars: usize) -> String {
    let line = query.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= max_chars {
        return line;
    }
    let cut: String = line.chars().take(max_chars).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_of(entries: &[(i64, &str, i64, i64)]) -> StatementSnapshot {
        StatementSnapshot {
            by_query_id: entries
                .iter()
                .map(|(id, query, calls, rows)| (*id, (query.to_string(), *calls, *rows)))
                .collect(),
        }
    }

    #[test]
    fn counts_the_calls_between_snapshots_and_names_the_window_upsert() {
        let before = snapshot_of(&[
            (1, "WITH keyed AS (\n SELECT * FROM unnest($1))", 10, 100),
            (
                2,
                "SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1 FOR UPDATE",
                10,
                60,
            ),
        ]);
        let after = snapshot_of(&[
            (1, "WITH keyed AS (\n SELECT * FROM unnest($1))", 13, 400),
            (
                2,
                "SELECT partition, next_offset FROM consumer_offsets WHERE topic = $1 FOR UPDATE",
                13,
                78,
            ),
            (
                3,
                "DELETE FROM idempotency_keys WHERE key IN (SELECT ...)",
                1,
                0,
            ),
            (
                5,
                "SELECT name, total FROM counters WHERE name LIKE $1",
                2,
                7,
            ),
            (4, "UPDATE naive_counters SET count = count + $1", 5, 5),
        ]);
        let counts = difference(&before, &snapshot_of(&[]), 1.0, 5.0, 0);
        assert!(counts.statements.is_empty());
        let mut after_without_baseline = after.clone();
        after_without_baseline.by_query_id.remove(&4);
        let counts = difference(&before, &after_without_baseline, 14.0, 5.0, 1_000_000);
        let labels: Vec<(&str, u64, u64)> = counts
            .statements
            .iter()
            .map(|statement| (statement.label.as_str(), statement.calls, statement.rows))
            .collect();
        assert_eq!(
            labels,
            [
                ("offset fence", 3, 18),
                (WINDOW_UPSERT_LABEL, 3, 300),
                (LOAD_TOOL_LABEL, 2, 7),
                ("expired key pruning", 1, 0),
            ]
        );
        assert_eq!(counts.window_upserts(), 3);
        assert_eq!(counts.tally_calls(), 7);
        assert_eq!(counts.windows_elapsed(), 3.0);
        assert_eq!(
            counts.statements[1].query,
            "WITH keyed AS ( SELECT * FROM unnest($1))"
        );
    }

    #[test]
    fn a_reset_between_snapshots_counts_from_zero() {
        let before = snapshot_of(&[(1, "WITH keyed AS ()", 50, 500)]);
        let after = snapshot_of(&[(1, "WITH keyed AS ()", 2, 20)]);
        assert_eq!(
            difference(&before, &after, 10.0, 5.0, 1).window_upserts(),
            2
        );
    }

    #[test]
    fn long_statements_are_shortened_to_one_line() {
        assert_eq!(one_line("SELECT\n  a,\n  b", 90), "SELECT a, b");
        assert_eq!(one_line("abcdef", 3), "abc…");
        assert_eq!(label_of("  select 1"), "other select");
        assert_eq!(label_of("COMMIT"), "window transaction commit");
    }
}
