//! The consumer loop. It runs on a thread of its own because librdkafka's poll blocks, and the
//! rebalance callback runs inside poll: keeping both on one thread means the pending window is
//! never touched by two threads at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Message, Timestamp};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tally_core::{CounterName, IncrementRecord, KeySpace, WindowSpec};
use tally_infra::clock::now_ms;
use tally_infra::summaries::{self, CounterSummaryRow};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::commit::{self, CommitOutcome, OffsetRows};
use crate::metrics;
use crate::pending::{PendingWindow, RecordIncrement};

/// How many windows before the oldest closed one a summary keeps its window sums for. Readers
/// only need the windows after the closed one; the margin covers readers whose view of the
/// closed window is a little old.
const SUMMARY_WINDOW_MARGIN: i64 = 12;

/// Everything the consumer thread and its rebalance callback share.
pub(crate) struct Shared {
    pub(crate) runtime: Handle,
    pub(crate) pool: PgPool,
    pub(crate) redis: ConnectionManager,
    pub(crate) keys: KeySpace,
    pub(crate) group: String,
    pub(crate) topic: String,
    pub(crate) window: WindowSpec,
    pub(crate) delta_ttl_ms: i64,
    pub(crate) idempotency_window_secs: u64,
    pub(crate) cancel: CancellationToken,
    /// std Mutex, not tokio's: it is only ever locked on the consumer thread, never across an
    /// await.
    pub(crate) pending: Mutex<PendingWindow>,
    /// Set by an assignment: commit (and publish closed windows) on the next loop rather than
    /// a whole window later, so reads can use Redis right after a start or a rebalance.
    pub(crate) flush_soon: std::sync::atomic::AtomicBool,
}

pub(crate) struct AggregatorContext {
    pub(crate) shared: Arc<Shared>,
}

impl ClientContext for AggregatorContext {}

impl ConsumerContext for AggregatorContext {
    /// Assignments start from the offsets stored in PostgreSQL, never from Kafka's committed
    /// offsets; revocations drop everything not yet committed, for the next owner to read again.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        let shared = &self.shared;
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS {
            if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                warn!(error = ?err, "kafka rebalance failed; dropping the assignment");
            }
            lock(&shared.pending).revoke_all();
            if let Err(error) = consumer.unassign() {
                warn!(%error, "failed to unassign partitions");
            }
            info!("partitions revoked");
            return;
        }
        let assigned: Vec<i32> = partitions
            .elements_for_topic(&shared.topic)
            .iter()
            .map(|element| element.partition())
            .collect();
        let Some(stored) = load_offsets_until_available(shared, &assigned) else {
            return;
        };
        let mut pending = lock(&shared.pending);
        pending.revoke_all();
        for partition in &assigned {
            let (next_offset, closed) = stored.get(partition).copied().unwrap_or((0, None));
            pending.assign(*partition, next_offset, closed);
            if let Err(error) = partitions.set_partition_offset(
                &shared.topic,
                *partition,
                Offset::Offset(next_offset),
            ) {
                error!(%error, kafka.partition = partition, "failed to set a start offset");
            }
        }
        drop(pending);
        if let Err(error) = consumer.assign(partitions) {
            error!(%error, "failed to assign partitions");
            return;
        }
        shared
            .flush_soon
            .store(true, std::sync::atomic::Ordering::Relaxed);
        info!(kafka.partitions = ?assigned, "partitions assigned from the offsets in postgres");
    }
}

/// Reads the stored offsets, waiting out a PostgreSQL outage: consuming without them could
/// count records twice. Returns None when the aggregator is shutting down.
fn load_offsets_until_available(
    shared: &Shared,
    partitions: &[i32],
) -> Option<std::collections::BTreeMap<i32, (i64, Option<i64>)>> {
    loop {
        let loaded = shared.runtime.block_on(commit::load_offsets(
            &shared.pool,
            &shared.group,
            &shared.topic,
            partitions,
        ));
        match loaded {
            Ok(stored) => return Some(stored),
            Err(error) => {
                error!(%error, "failed to load offsets from postgres; retrying");
                if shared.cancel.is_cancelled() {
                    return None;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

fn lock(pending: &Mutex<PendingWindow>) -> std::sync::MutexGuard<'_, PendingWindow> {
    pending
        .lock()
        .expect("the pending window lock should never be poisoned")
}

/// Polls Kafka and commits a window every window length until cancelled, then commits once
/// more so a clean shutdown leaves nothing for the next owner to redo.
pub(crate) fn run_blocking(consumer: BaseConsumer<AggregatorContext>, partition_count: usize) {
    let shared = Arc::clone(&consumer.context().shared);
    let window_length = Duration::from_millis(shared.window.length_ms as u64);
    let mut next_flush = Instant::now() + window_length;
    while !shared.cancel.is_cancelled() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => add_message(&shared, &message),
            Some(Err(error)) => warn!(%error, "kafka consumer error"),
            None => {}
        }
        let assigned_just_now = shared
            .flush_soon
            .swap(false, std::sync::atomic::Ordering::Relaxed);
        if assigned_just_now || Instant::now() >= next_flush {
            flush(&consumer, &shared, partition_count);
            next_flush = Instant::now() + window_length;
        }
    }
    flush(&consumer, &shared, partition_count);
    info!("aggregator stopped");
}

fn add_message(shared: &Shared, message: &BorrowedMessage<'_>) {
    let append_ms = match message.timestamp() {
        Timestamp::LogAppendTime(milliseconds) => Some(milliseconds),
        _ => None,
    };
    let increment = decode(message);
    if increment.is_none() {
        metrics::MALFORMED_RECORDS.inc();
        warn!(
            kafka.partition = message.partition(),
            kafka.offset = message.offset(),
            "skipping a record that is not an increment"
        );
    }
    lock(&shared.pending).add(message.partition(), message.offset(), append_ms, increment);
}

fn decode(message: &BorrowedMessage<'_>) -> Option<RecordIncrement> {
    let name = CounterName::parse_bytes(message.key()?).ok()?;
    let record = IncrementRecord::decode(message.payload()?).ok()?;
    Some(RecordIncrement {
        name: name.into_string(),
        window_start_ms: record.window_start_ms,
        by: record.by,
        keyed: record.keyed,
    })
}

/// Commits what was read since the last flush, then brings Redis's copies up to date.
fn flush(consumer: &BaseConsumer<AggregatorContext>, shared: &Shared, partition_count: usize) {
    let started = Instant::now();
    advance_closed_windows(consumer, shared);

    let (rows, offsets, records, duplicates_in_window) = {
        let pending = lock(&shared.pending);
        if pending.partitions.is_empty() {
            return;
        }
        let mut offsets = OffsetRows::default();
        for (partition, progress) in &pending.partitions {
            offsets.partitions.push(*partition);
            offsets.expected_offsets.push(progress.committed_offset);
            offsets.next_offsets.push(progress.next_offset);
            offsets.closed_windows_ms.push(progress.closed_window_ms);
        }
        (
            pending.commit_rows(),
            offsets,
            pending.records,
            pending.duplicates_in_window,
        )
    };

    let outcome = shared.runtime.block_on(commit::commit_window(
        &shared.pool,
        &shared.group,
        &shared.topic,
        &rows,
        &offsets,
        shared.idempotency_window_secs,
    ));
    let committed_summaries = match outcome {
        Ok(CommitOutcome::Committed {
            summaries,
            duplicates_absorbed,
        }) => {
            metrics::DUPLICATES_ABSORBED.inc_by(duplicates_absorbed + duplicates_in_window);
            summaries
        }
        Ok(CommitOutcome::Fenced(partitions)) => {
            metrics::FENCED_COMMITS.inc();
            warn!(kafka.partitions = ?partitions, "another aggregator moved the offsets; rereading from postgres");
            reseek_from_postgres(consumer, shared);
            return;
        }
        Err(error) => {
            // The window stays pending and is retried next time. If the commit did land after
            // all, the offset check fences the retry off, so nothing is counted twice.
            metrics::FAILED_COMMITS.inc();
            error!(%error, batch.size = rows.names.len(), "failed to commit a window to postgres");
            return;
        }
    };
    lock(&shared.pending).committed();
    metrics::WINDOW_FLUSH_SECONDS.observe(started.elapsed().as_secs_f64());
    metrics::WINDOW_FLUSH_ROWS.observe(rows.names.len() as f64);
    metrics::RECORDS_APPLIED.inc_by(records);
    for name in &rows.clamped {
        metrics::CLAMPED_SUMS.inc();
        warn!(counter.name = %name, "a window sum did not fit in i64 and was clamped");
    }
    for summary in &committed_summaries {
        if summary.total == i64::MAX || summary.total == i64::MIN {
            metrics::CLAMPED_SUMS.inc();
            warn!(counter.name = %summary.name, counter.value = summary.total, "a counter reached the i64 limit and is clamped there");
        }
    }
    shared
        .runtime
        .block_on(update_redis(shared, &committed_summaries, partition_count));
}

/// Works out, per partition, the latest window no increment can still arrive for.
fn advance_closed_windows(consumer: &BaseConsumer<AggregatorContext>, shared: &Shared) {
    let partitions: Vec<(i32, i64)> = lock(&shared.pending)
        .partitions
        .iter()
        .map(|(partition, progress)| (*partition, progress.next_offset))
        .collect();
    for (partition, next_offset) in partitions {
        // Taken before the request, so every record appended before this moment is below the
        // high watermark the broker answers with.
        let asked_at_ms = now_ms();
        let caught_up_at_ms =
            match consumer.fetch_watermarks(&shared.topic, partition, Duration::from_secs(2)) {
                Ok((_, high)) => {
                    metrics::CONSUMER_LAG
                        .with_label_values(&[&partition.to_string()])
                        .set((high - next_offset).max(0));
                    (next_offset >= high).then_some(asked_at_ms)
                }
                Err(error) => {
                    warn!(%error, kafka.partition = partition, "failed to fetch watermarks");
                    None
                }
            };
        let mut pending = lock(&shared.pending);
        let Some(progress) = pending.partitions.get_mut(&partition) else {
            continue;
        };
        let horizon_ms = caught_up_at_ms.or(progress.last_append_ms);
        if let Some(horizon_ms) = horizon_ms {
            let closed = shared.window.last_closed_at(horizon_ms);
            progress.closed_window_ms = Some(
                progress
                    .closed_window_ms
                    .map_or(closed, |old| old.max(closed)),
            );
        }
    }
}

fn reseek_from_postgres(consumer: &BaseConsumer<AggregatorContext>, shared: &Shared) {
    let assigned: Vec<i32> = lock(&shared.pending).partitions.keys().copied().collect();
    let Some(stored) = load_offsets_until_available(shared, &assigned) else {
        return;
    };
    let mut pending = lock(&shared.pending);
    pending.revoke_all();
    for partition in assigned {
        let (next_offset, closed) = stored.get(&partition).copied().unwrap_or((0, None));
        pending.assign(partition, next_offset, closed);
        let seek = consumer.seek(
            &shared.topic,
            partition,
            Offset::Offset(next_offset),
            Duration::from_secs(5),
        );
        if let Err(error) = seek {
            warn!(%error, kafka.partition = partition, "failed to seek; the partition was probably revoked");
        }
    }
}

/// Copies the commit into the Redis summaries and publishes the closed windows. A partition
/// whose summaries may lag PostgreSQL is rewritten in full first, and its closed window is
/// published only once that worked: readers trust a closed window to be in the summaries.
async fn update_redis(shared: &Shared, committed: &[CounterSummaryRow], partition_count: usize) {
    let mut redis = shared.redis.clone();
    let (published_min, partitions_needing_repair) = {
        let pending = lock(&shared.pending);
        // Readers combine window sums with deltas for every window after the closed window they
        // know of, which is the one published, not the one just computed: window sums may only
        // be dropped well before the oldest published one. Unknown: keep them all.
        let published_min = pending
            .partitions
            .values()
            .map(|progress| progress.published_closed_ms)
            .collect::<Option<Vec<i64>>>()
            .and_then(|published| published.into_iter().min());
        let repair: Vec<i32> = pending
            .partitions
            .iter()
            .filter(|(_, progress)| progress.summaries_need_repair)
            .map(|(partition, _)| *partition)
            .collect();
        (published_min, repair)
    };
    let oldest_needed_ms = published_min
        .map(|closed| closed - SUMMARY_WINDOW_MARGIN * shared.window.length_ms)
        .unwrap_or_else(|| now_ms() - shared.delta_ttl_ms);

    let mut redis_ok = true;
    match summaries::apply_commits(&mut redis, &shared.keys, committed, oldest_needed_ms).await {
        Ok(gaps) if gaps.is_empty() => {}
        Ok(gaps) => {
            // These summaries missed a commit (Redis lost them, or a crash came between a commit
            // and its Redis write): rewrite them in full from PostgreSQL.
            let rewritten = async {
                let full = summaries::load_by_names(&shared.pool, &gaps, oldest_needed_ms)
                    .await
                    .map_err(|error| error.to_string())?;
                summaries::replace(&mut redis, &shared.keys, &full)
                    .await
                    .map_err(|error| error.to_string())
            };
            if let Err(error) = rewritten.await {
                warn!(%error, "failed to rewrite summaries that missed a commit");
                redis_ok = false;
            }
        }
        Err(error) => {
            warn!(%error, "failed to copy a commit into redis; will rewrite the summaries");
            redis_ok = false;
        }
    }
    if !redis_ok {
        for progress in lock(&shared.pending).partitions.values_mut() {
            progress.summaries_need_repair = true;
        }
        return;
    }

    if !partitions_needing_repair.is_empty() {
        let repaired = async {
            let full = summaries::load_recent_in_partitions(
                &shared.pool,
                &partitions_needing_repair,
                oldest_needed_ms,
            )
            .await
            .map_err(|error| error.to_string())?;
            summaries::replace(&mut redis, &shared.keys, &full)
                .await
                .map_err(|error| error.to_string())
        };
        match repaired.await {
            Ok(written) => {
                info!(kafka.partitions = ?partitions_needing_repair, summaries.written = written, "rewrote redis summaries from postgres");
                let mut pending = lock(&shared.pending);
                for partition in &partitions_needing_repair {
                    if let Some(progress) = pending.partitions.get_mut(partition) {
                        progress.summaries_need_repair = false;
                    }
                }
            }
            Err(error) => {
                warn!(%error, "failed to rewrite redis summaries; will retry");
                return;
            }
        }
    }

    let closed: Vec<(i32, i64)> = lock(&shared.pending)
        .partitions
        .iter()
        .filter(|(_, progress)| !progress.summaries_need_repair)
        .filter_map(|(partition, progress)| {
            progress.closed_window_ms.map(|closed| (*partition, closed))
        })
        .collect();
    if closed.is_empty() {
        return;
    }
    match summaries::publish_closed_windows(&mut redis, &shared.keys, partition_count, &closed)
        .await
    {
        Ok(()) => {
            let mut pending = lock(&shared.pending);
            for (partition, closed_window_ms) in closed {
                if let Some(progress) = pending.partitions.get_mut(&partition) {
                    progress.published_closed_ms = Some(closed_window_ms);
                }
            }
        }
        Err(error) => warn!(%error, "failed to publish closed windows to redis"),
    }
}
