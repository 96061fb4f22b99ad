//! What one load worker sends, for every system compared: one request = one call of
//! [`LoadTarget::perform`].
//!
//! Each worker owns its own connection (a PostgreSQL session, a Redis connection) so that
//! "64 clients" really means 64 sessions each waiting for its own answer, as 64 application
//! servers would. A Tally worker owns one keep-alive HTTP/1.1 connection ([`Http1Connection`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::Deserialize;
use sqlx::postgres::PgConnection;

use crate::freshness::AcknowledgementTimeline;
use crate::http1::Http1Connection;
use crate::zipf::ZipfSampler;

/// The counter names a scenario writes: `{prefix}` alone for a hot counter, or
/// `{prefix}-{rank:06}` drawn from a Zipf distribution. Names use only unreserved URL
/// characters, so they go into paths as they are, and no `_` or `%`, so `{prefix}-%` is an
/// exact SQL LIKE pattern for them.
#[derive(Debug)]
pub struct CounterNames {
    prefix: String,
    zipf: Option<ZipfSampler>,
}

impl CounterNames {
    pub fn single_hot_counter(name: String) -> Self {
        Self {
            prefix: name,
            zipf: None,
        }
    }

    pub fn zipf(prefix: String, number_of_names: usize, exponent: f64) -> Self {
        Self {
            prefix,
            zipf: Some(ZipfSampler::new(number_of_names, exponent)),
        }
    }

    pub fn count(&self) -> usize {
        self.zipf.as_ref().map_or(1, ZipfSampler::number_of_items)
    }

    pub fn name(&self, index: usize) -> String {
        match self.zipf {
            None => self.prefix.clone(),
            Some(_) => format!("{}-{index:06}", self.prefix),
        }
    }

    /// Appends the name to a buffer, without the allocation of [`CounterNames::name`].
    pub fn write_name(&self, index: usize, buffer: &mut Vec<u8>) {
        use std::io::Write as _;
        buffer.extend_from_slice(self.prefix.as_bytes());
        if self.zipf.is_some() {
            write!(buffer, "-{index:06}").expect("writing to a Vec never fails");
        }
    }

    /// The index of the next name to increment.
    pub fn choose(&self, rng: &mut StdRng) -> usize {
        self.zipf.as_ref().map_or(0, |zipf| zipf.sample(rng))
    }

    /// A SQL LIKE pattern matching exactly these names.
    pub fn like_pattern(&self) -> String {
        match self.zipf {
            None => self.prefix.clone(),
            Some(_) => format!("{}-%", self.prefix),
        }
    }
}

/// The acknowledged total of every name of a scenario: what PostgreSQL must end up with.
#[derive(Debug)]
pub struct AcknowledgedTotals {
    by_name_index: Vec<AtomicI64>,
}

impl AcknowledgedTotals {
    pub fn new(number_of_names: usize) -> Self {
        Self {
            by_name_index: (0..number_of_names).map(|_| AtomicI64::new(0)).collect(),
        }
    }

    pub fn add(&self, name_index: usize, increments: i64) {
        self.by_name_index[name_index].fetch_add(increments, Ordering::Relaxed);
    }

    pub fn get(&self, name_index: usize) -> i64 {
        self.by_name_index[name_index].load(Ordering::Relaxed)
    }

    pub fn sum(&self) -> i64 {
        self.by_name_index
            .iter()
            .map(|total| total.load(Ordering::Relaxed))
            .sum()
    }
}

/// Where a Tally write worker reports what was acknowledged.
#[derive(Debug, Clone)]
pub struct TallyWriteBook {
    pub names: Arc<CounterNames>,
    pub acknowledged: Arc<AcknowledgedTotals>,
    /// Only in the read scenarios: the running total over time, to time the reads' lag.
    pub timeline: Option<SharedTimeline>,
}

/// The acknowledgement timeline with the instant its durations count from.
#[derive(Debug, Clone)]
pub struct SharedTimeline {
    pub run_start: Instant,
    pub timeline: Arc<Mutex<AcknowledgementTimeline>>,
}

impl SharedTimeline {
    pub fn new(run_start: Instant) -> Self {
        Self {
            run_start,
            timeline: Arc::new(Mutex::new(AcknowledgementTimeline::new())),
        }
    }

    fn record(&self, increments: i64) {
        let mut timeline = self.timeline.lock().expect("no worker panics holding it");
        // The clock is read under the lock so entries are in time order.
        timeline.record(self.run_start.elapsed(), increments);
    }
}

/// One read as the reader saw it.
#[derive(Debug, Clone, Copy)]
pub struct ReadSample {
    pub sent_at: Duration,
    pub value: i64,
}

#[derive(Debug, Deserialize)]
struct CounterReadBody {
    value: i64,
    source: String,
}

/// One worker's connection and state. An enum rather than a trait object: the set of systems
/// is closed, and a `match` keeps each request's code in plain sight.
pub enum LoadTarget {
    /// `UPDATE ... SET count = count + 1` on one row.
    PostgresSingleRow {
        connection: PgConnection,
        counter_name: String,
    },
    /// The same on one of `shards` rows chosen at random; the total is their sum.
    PostgresShardedRows {
        connection: PgConnection,
        counter_name: String,
        shards: i32,
        rng: StdRng,
    },
    /// `INCR`, waiting for each answer before sending the next.
    RedisIncr {
        connection: redis::aio::MultiplexedConnection,
        key: String,
    },
    /// `depth` `INCR`s sent in one round trip.
    RedisPipelinedIncr {
        connection: redis::aio::MultiplexedConnection,
        key: String,
        depth: usize,
    },
    /// `POST /v1/counters/{name}/increment`.
    TallyIncrement {
        connection: Http1Connection,
        book: TallyWriteBook,
        rng: StdRng,
    },
    /// `POST /v1/increments` with `batch_size` items of `by: 1`, names drawn independently.
    TallyBatch {
        connection: Http1Connection,
        book: TallyWriteBook,
        batch_size: usize,
        rng: StdRng,
        /// The names of the batch in flight, reused from one batch to the next.
        name_indexes: Vec<usize>,
    },
    /// `GET /v1/counters/{name}`, noting what each read showed.
    TallyRead {
        connection: Http1Connection,
        counter_path: String,
        run_start: Instant,
        samples: Vec<ReadSample>,
        sources: BTreeMap<String, u64>,
    },
    /// An add or a read-modify-write of one strict counter (`crate::strict`).
    Strict(crate::strict::StrictTarget),
}

/// A deterministic per-worker random source: runs are repeatable, workers are independent.
pub fn worker_rng(scenario_seed: u64, worker_index: usize) -> StdRng {
    StdRng::seed_from_u64(scenario_seed.wrapping_mul(1_000_003) + worker_index as u64)
}

fn describe_status(status: u16) -> String {
    format!("http {status}")
}

impl LoadTarget {
    /// Sends one request and waits for its answer. `Ok(n)`: `n` increments were acknowledged
    /// (0 for a read). `Err(reason)`: the request failed, and whether it counted is unknown.
    pub async fn perform(&mut self) -> Result<u64, String> {
        match self {
            LoadTarget::PostgresSingleRow {
                connection,
                counter_name,
            } => {
                sqlx::query("UPDATE naive_counters SET count = count + 1 WHERE name = $1")
                    .bind(counter_name.as_str())
                    .execute(&mut *connection)
                    .await
                    .map_err(|error| format!("postgres: {}", short_sqlx_error(&error)))?;
                Ok(1)
            }
            LoadTarget::PostgresShardedRows {
                connection,
                counter_name,
                shards,
                rng,
            } => {
                let shard = rng.random_range(0..*shards);
                sqlx::query(
                    "UPDATE sharded_counters SET count = count + 1 WHERE name = $1 AND shard = $2",
                )
                .bind(counter_name.as_str())
                .bind(shard)
                .execute(&mut *connection)
                .await
                .map_err(|error| format!("postgres: {}", short_sqlx_error(&error)))?;
                Ok(1)
            }
            LoadTarget::RedisIncr { connection, key } => {
                redis::cmd("INCR")
                    .arg(key.as_str())
                    .query_async::<i64>(connection)
                    .await
                    .map_err(|error| format!("redis: {:?}", error.kind()))?;
                Ok(1)
            }
            LoadTarget::RedisPipelinedIncr {
                connection,
                key,
                depth,
            } => {
                let mut pipeline = redis::pipe();
                for _ in 0..*depth {
                    pipeline.cmd("INCR").arg(key.as_str());
                }
                pipeline
                    .query_async::<Vec<i64>>(connection)
                    .await
                    .map_err(|error| format!("redis: {:?}", error.kind()))?;
                Ok(*depth as u64)
            }
            LoadTarget::TallyIncrement {
                connection,
                book,
                rng,
            } => {
                let name_index = book.names.choose(rng);
                let path = format!("/v1/counters/{}/increment", book.names.name(name_index));
                // No body: `by` defaults to 1, the smallest request a client can send.
                let (status, _) = connection.request("POST", &path, |_| {}).await?;
                if status != 202 {
                    return Err(describe_status(status));
                }
                book.acknowledged.add(name_index, 1);
                if let Some(timeline) = &book.timeline {
                    timeline.record(1);
                }
                Ok(1)
            }
            LoadTarget::TallyBatch {
                connection,
                book,
                batch_size,
                rng,
                name_indexes,
            } => {
                name_indexes.clear();
                name_indexes.extend((0..*batch_size).map(|_| book.names.choose(rng)));
                let names = &book.names;
                let (status, _) = connection
                    .request("POST", "/v1/increments", |body| {
                        write_batch_body(body, names, name_indexes)
                    })
                    .await?;
                if status != 202 {
                    return Err(describe_status(status));
                }
                for &index in name_indexes.iter() {
                    book.acknowledged.add(index, 1);
                }
                Ok(*batch_size as u64)
            }
            LoadTarget::TallyRead {
                connection,
                counter_path,
                run_start,
                samples,
                sources,
            } => {
                let sent_at = run_start.elapsed();
                let (status, body) = connection.request("GET", counter_path, |_| {}).await?;
                if status != 200 {
                    return Err(describe_status(status));
                }
                let body: CounterReadBody =
                    serde_json::from_slice(body).map_err(|_| "unreadable read body".to_string())?;
                samples.push(ReadSample {
                    sent_at,
                    value: body.value,
                });
                *sources.entry(body.source).or_default() += 1;
                Ok(0)
            }
            LoadTarget::Strict(target) => target.perform().await,
        }
    }
}

/// `{"increments":[{"counter":"NAME"},...]}`: `by` defaults to 1. Bench names are URL- and
/// JSON-safe (see [`CounterNames`]), so they need no escaping.
fn write_batch_body(body: &mut Vec<u8>, names: &CounterNames, name_indexes: &[usize]) {
    body.extend_from_slice(br#"{"increments":["#);
    for (position, &index) in name_indexes.iter().enumerate() {
        if position > 0 {
            body.push(b',');
        }
        body.extend_from_slice(br#"{"counter":""#);
        names.write_name(index, body);
        body.extend_from_slice(br#""}"#);
    }
    body.extend_from_slice(b"]}");
}

/// The kind of a sqlx error without the query text, so failure counts group well.
fn short_sqlx_error(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(database_error) => database_error
            .code()
            .map_or("database error".to_string(), |code| {
                format!("sqlstate {code}")
            }),
        sqlx::Error::Io(_) => "io error".to_string(),
        sqlx::Error::PoolTimedOut => "pool timed out".to_string(),
        _ => "error".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_counter_names_are_one_exact_name() {
        let names = CounterNames::single_hot_counter("bench-1a2b-hot".to_string());
        let mut rng = worker_rng(1, 0);
        assert_eq!(names.count(), 1);
        assert_eq!(names.choose(&mut rng), 0);
        assert_eq!(names.name(0), "bench-1a2b-hot");
        assert_eq!(names.like_pattern(), "bench-1a2b-hot");
    }

    #[test]
    fn zipf_names_are_numbered_under_the_prefix() {
        let names = CounterNames::zipf("bench-1a2b-zipf".to_string(), 100_000, 0.99);
        assert_eq!(names.count(), 100_000);
        assert_eq!(names.name(42), "bench-1a2b-zipf-000042");
        assert_eq!(names.like_pattern(), "bench-1a2b-zipf-%");
        let mut rng = worker_rng(2, 3);
        assert!((0..1_000).all(|_| names.choose(&mut rng) < 100_000));
    }

    #[test]
    fn batch_bodies_are_the_json_the_api_documents() {
        let names = CounterNames::zipf("bench-z".to_string(), 100, 0.99);
        let mut body = Vec::new();
        write_batch_body(&mut body, &names, &[3, 42]);
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"increments": [
                {"counter": "bench-z-000003"},
                {"counter": "bench-z-000042"},
            ]})
        );
    }

    #[test]
    fn acknowledged_totals_add_up_per_name() {
        let totals = AcknowledgedTotals::new(3);
        totals.add(0, 5);
        totals.add(2, 1);
        totals.add(2, 1);
        assert_eq!((totals.get(0), totals.get(1), totals.get(2)), (5, 0, 2));
        assert_eq!(totals.sum(), 7);
    }

    #[test]
    fn worker_random_sources_are_repeatable_and_distinct() {
        let first: Vec<u64> = (0..4).map(|_| worker_rng(9, 0).random()).collect();
        assert!(first.windows(2).all(|pair| pair[0] == pair[1]));
        let other_worker: u64 = worker_rng(9, 1).random();
        assert_ne!(first[0], other_worker);
    }
}
