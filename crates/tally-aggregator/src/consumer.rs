//! The consumer loop. It runs on a thread of its own because librdkafka's poll blocks, and the
//! rebalance callback runs inside poll: keeping both on one thread means the pending window is
//! never touched by two threads at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Message, Timestamp};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tally_core::{CounterName, CounterRecord, WindowSpec};
use tally_infra::clock::now_ms;
use tally_mirror::{
    BUCKETS, CommitToMirror, CommittedCounter, Mirror, PartitionMark, RepairPolicy,
    SUMMARY_WINDOW_MARGIN,
};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::commit::{self, CommitOutcome};
use crate::metrics;
use crate::pending::{
    Added, PendingWindow, ReadRecord, RecordIncrement, RecordSet, StoredPartition,
};

/// Everything the consumer thread and its rebalance callback share.
pub(crate) struct Shared {
    pub(crate) runtime: Handle,
    pub(crate) pool: PgPool,
    pub(crate) redis: ConnectionManager,
    pub(crate) mirror: Mirror,
    pub(crate) pending_sets: tally_mirror::PendingSets,
    pub(crate) group: String,
    pub(crate) topic: String,
    pub(crate) window: WindowSpec,
    pub(crate) delta_ttl_ms: i64,
    pub(crate) idempotency_window_secs: u64,
    /// Repair buckets of the mirror that lost data (else they wait for `tally replay`).
    pub(crate) auto_repair: bool,
    /// Pause consuming once this many rows wait for a commit (PostgreSQL is down or slow).
    pub(crate) max_pending_rows: usize,
    pub(crate) cancel: CancellationToken,
    /// std Mutex, not tokio's: it is only ever locked on the consumer thread, never across an
    /// await.
    pub(crate) pending: Mutex<PendingWindow>,
    /// Set by an assignment: commit (and publish closed windows) on the next loop rather than
    /// a whole window later, so reads can use Redis right after a start or a rebalance.
    pub(crate) flush_soon: AtomicBool,
    /// Consumption is paused because too many rows wait for a commit.
    pub(crate) paused_for_memory: AtomicBool,
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
            shared.paused_for_memory.store(false, Ordering::Relaxed);
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
        let Some(stored) = load_partitions_until_available(shared, &assigned) else {
            return;
        };
        let mut pending = lock(&shared.pending);
        pending.revoke_all();
        for partition in &assigned {
            let stored = stored.get(partition).copied().unwrap_or_default();
            pending.assign(*partition, stored);
            if let Err(error) = partitions.set_partition_offset(
                &shared.topic,
                *partition,
                Offset::Offset(stored.next_offset),
            ) {
                error!(%error, kafka.partition = partition, "failed to set a start offset");
            }
        }
        drop(pending);
        shared.paused_for_memory.store(false, Ordering::Relaxed);
        if let Err(error) = consumer.assign(partitions) {
            error!(%error, "failed to assign partitions");
            return;
        }
        shared.flush_soon.store(true, Ordering::Relaxed);
        info!(kafka.partitions = ?assigned, "partitions assigned from the offsets in postgres");
    }
}

/// Reads the stored offsets, waiting out a PostgreSQL outage: consuming without them could
/// count records twice. Returns None when the aggregator is shutting down.
fn load_partitions_until_available(
    shared: &Shared,
    partitions: &[i32],
) -> Option<BTreeMap<i32, StoredPartition>> {
    loop {
        let loaded = shared.runtime.block_on(commit::load_partitions(
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

/// How soon after reading a set the aggregator commits: reads show a set once it is
/// committed, and sets that arrive together (an import) still share a commit.
const SET_COMMIT_DELAY: Duration = Duration::from_millis(200);

/// Polls Kafka and commits a window every window length until cancelled, then commits once
/// more so a clean shutdown leaves nothing for the next owner to redo.
pub(crate) fn run_blocking(consumer: BaseConsumer<AggregatorContext>, partition_count: usize) {
    let shared = Arc::clone(&consumer.context().shared);
    let window_length = Duration::from_millis(shared.window.length_ms as u64);
    let mut next_flush = Instant::now() + window_length;
    while !shared.cancel.is_cancelled() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => match add_message(&shared, &message) {
                Added::Taken | Added::Skipped => {}
                Added::TakenSet => next_flush = next_flush.min(Instant::now() + SET_COMMIT_DELAY),
                Added::HeldForCommit => next_flush = Instant::now(),
            },
            Some(Err(error)) => warn!(%error, "kafka consumer error"),
            None => {}
        }
        pause_when_too_much_is_pending(&consumer, &shared);
        let assigned_just_now = shared.flush_soon.swap(false, Ordering::Relaxed);
        if assigned_just_now || Instant::now() >= next_flush {
            flush(&consumer, &shared, partition_count);
            next_flush = Instant::now() + window_length;
        }
    }
    flush(&consumer, &shared, partition_count);
    info!("aggregator stopped");
}

/// While commits fail (PostgreSQL is down), what was read piles up in memory: past the limit,
/// stop fetching until a commit goes through. Nothing is lost; the records wait in Kafka.
fn pause_when_too_much_is_pending(consumer: &BaseConsumer<AggregatorContext>, shared: &Shared) {
    if shared.paused_for_memory.load(Ordering::Relaxed) {
        return;
    }
    let pending_rows = lock(&shared.pending).pending_rows();
    if pending_rows < shared.max_pending_rows {
        return;
    }
    match consumer.assignment() {
        Ok(assignment) => match consumer.pause(&assignment) {
            Ok(()) => {
                shared.paused_for_memory.store(true, Ordering::Relaxed);
                metrics::CONSUMPTION_PAUSED.set(1);
                warn!(
                    pending.rows = pending_rows,
                    "too much read and not committed; pausing consumption until a commit succeeds"
                );
            }
            Err(error) => warn!(%error, "failed to pause consumption"),
        },
        Err(error) => warn!(%error, "failed to read the assignment"),
    }
}

/// Resumes what [`pause_when_too_much_is_pending`] paused, except partitions refused for a gap.
fn resume_after_commit(consumer: &BaseConsumer<AggregatorContext>, shared: &Shared) {
    if !shared.paused_for_memory.swap(false, Ordering::Relaxed) {
        return;
    }
    metrics::CONSUMPTION_PAUSED.set(0);
    let mut resumable = TopicPartitionList::new();
    for (partition, progress) in &lock(&shared.pending).partitions {
        if !progress.refused_for_gap {
            resumable.add_partition(&shared.topic, *partition);
        }
    }
    match consumer.resume(&resumable) {
        Ok(()) => info!("a commit went through; consumption resumed"),
        Err(error) => warn!(%error, "failed to resume consumption"),
    }
}

fn add_message(shared: &Shared, message: &BorrowedMessage<'_>) -> Added {
    let append_ms = match message.timestamp() {
        Timestamp::LogAppendTime(milliseconds) => Some(milliseconds),
        _ => None,
    };
    let record = decode(message);
    if record.is_none() {
        metrics::MALFORMED_RECORDS.inc();
        warn!(
            kafka.partition = message.partition(),
            kafka.offset = message.offset(),
            "skipping a record that is neither an increment nor a set"
        );
    }
    lock(&shared.pending).add(message.partition(), message.offset(), append_ms, record)
}

fn decode(message: &BorrowedMessage<'_>) -> Option<ReadRecord> {
    let name = CounterName::parse_bytes(message.key()?).ok()?.into_string();
    Some(match CounterRecord::decode(message.payload()?).ok()? {
        CounterRecord::Increment(record) => ReadRecord::Increment(RecordIncrement {
            name,
            window_start_ms: record.window_start_ms,
            by: record.by,
            keyed: record.keyed,
        }),
        CounterRecord::Set(record) => ReadRecord::Set(RecordSet {
            name,
            window_start_ms: record.window_start_ms,
            value: record.set,
            audit: record.audit.storable(),
        }),
    })
}

/// Commits what was read since the last flush, then copies the commit into the mirror.
fn flush(consumer: &BaseConsumer<AggregatorContext>, shared: &Shared, partition_count: usize) {
    let started = Instant::now();
    check_the_log(consumer, shared);

    let (rows, records, duplicates_in_window, conflicts_in_window) = {
        let pending = lock(&shared.pending);
        if pending.partitions.is_empty() {
            return;
        }
        (
            pending.commit_rows(now_ms()),
            pending.records,
            pending.duplicates_in_window,
            pending.conflicts_in_window,
        )
    };

    let outcome = shared.runtime.block_on(commit::commit_window(
        &shared.pool,
        &shared.group,
        &shared.topic,
        &rows,
        shared.idempotency_window_secs,
    ));
    let committed = match outcome {
        Ok(CommitOutcome::Committed(committed)) => committed,
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
            error!(%error, batch.size = rows.windows.len(), "failed to commit a window to postgres");
            return;
        }
    };
    let released = lock(&shared.pending).committed(rows.generation);
    for (partition, offset) in released {
        // The set this partition was held at comes first in the next commit. The records
        // after it were skipped, so they must be read again: if the seek fails, start over
        // from what PostgreSQL holds.
        if let Err(error) = consumer.seek(
            &shared.topic,
            partition,
            Offset::Offset(offset),
            Duration::from_secs(5),
        ) {
            warn!(%error, kafka.partition = partition, "failed to seek back to a set; rereading from postgres");
            reseek_from_postgres(consumer, shared);
            break;
        }
    }
    resume_after_commit(consumer, shared);
    metrics::WINDOW_FLUSH_SECONDS.observe(started.elapsed().as_secs_f64());
    metrics::WINDOW_FLUSH_ROWS.observe(rows.windows.len() as f64);
    metrics::RECORDS_APPLIED.inc_by(records);
    metrics::DUPLICATES_ABSORBED.inc_by(committed.duplicates_absorbed + duplicates_in_window);
    let conflicts = committed.conflicts + conflicts_in_window;
    if conflicts > 0 {
        metrics::IDEMPOTENCY_CONFLICTS.inc_by(conflicts);
        warn!(
            idempotency.conflicts = conflicts,
            "idempotency keys used for two different increments were both counted: both were acknowledged while redis could not claim the key"
        );
    }
    for name in &rows.clamped {
        metrics::CLAMPED_SUMS.inc();
        warn!(counter.name = %name, "a window sum did not fit in i64 and was clamped");
    }
    for counter in &committed.counters {
        if counter.total == i64::MAX || counter.total == i64::MIN {
            metrics::CLAMPED_SUMS.inc();
            warn!(counter.name = %counter.name, counter.value = counter.total, "a counter reached the i64 limit and is clamped there");
        }
    }
    let sets: Vec<&str> = rows.sets.iter().map(|set| set.name.as_str()).collect();
    shared.runtime.block_on(update_mirror(
        shared,
        &committed.counters,
        &sets,
        rows.generation,
        partition_count,
    ));
}

/// Per partition, works out the latest window no increment can still arrive for, and refuses a
/// partition whose log no longer holds the next record to read.
fn check_the_log(consumer: &BaseConsumer<AggregatorContext>, shared: &Shared) {
    let partitions: Vec<(i32, i64, bool)> = lock(&shared.pending)
        .partitions
        .iter()
        .map(|(partition, progress)| (*partition, progress.next_offset, progress.refused_for_gap))
        .collect();
    for (partition, next_offset, refused) in partitions {
        // Taken before the request, so every record appended before this moment is below the
        // high watermark the broker answers with.
        let asked_at_ms = now_ms();
        let watermarks =
            match consumer.fetch_watermarks(&shared.topic, partition, Duration::from_secs(2)) {
                Ok(watermarks) => watermarks,
                Err(error) => {
                    warn!(%error, kafka.partition = partition, "failed to fetch watermarks");
                    continue;
                }
            };
        let (low, high) = watermarks;
        metrics::CONSUMER_LAG
            .with_label_values(&[&partition.to_string()])
            .set((high - next_offset).max(0));
        if next_offset < low && !refused {
            refuse_partition(consumer, shared, partition, next_offset, low);
            continue;
        }
        let caught_up_at_ms = (next_offset >= high).then_some(asked_at_ms);
        let mut pending = lock(&shared.pending);
        let Some(progress) = pending.partitions.get_mut(&partition) else {
            continue;
        };
        if progress.refused_for_gap {
            continue;
        }
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

/// The records from `next_offset` up to the log's start are gone (retention deleted them before
/// they were applied): applying what follows would count the partition without them and say
/// nothing. Stop consuming the partition, loudly; its closed window stops, so reads of its
/// counters fall back to PostgreSQL once their deltas expire.
fn refuse_partition(
    consumer: &BaseConsumer<AggregatorContext>,
    shared: &Shared,
    partition: i32,
    next_offset: i64,
    low: i64,
) {
    if let Some(progress) = lock(&shared.pending).partitions.get_mut(&partition) {
        progress.refused_for_gap = true;
    }
    metrics::OFFSET_GAP_RECORDS
        .with_label_values(&[&partition.to_string()])
        .set(low - next_offset);
    let mut paused = TopicPartitionList::new();
    paused.add_partition(&shared.topic, partition);
    if let Err(error) = consumer.pause(&paused) {
        warn!(%error, kafka.partition = partition, "failed to pause a partition with a gap");
    }
    error!(
        kafka.partition = partition,
        kafka.next_offset = next_offset,
        kafka.low_watermark = low,
        records.missing = low - next_offset,
        "the log no longer holds records this partition has not applied (retention deleted them); refusing to consume it: see docs/ARCHITECTURE.md, 'A gap in the log'"
    );
}

fn reseek_from_postgres(consumer: &BaseConsumer<AggregatorContext>, shared: &Shared) {
    let assigned: Vec<i32> = lock(&shared.pending).partitions.keys().copied().collect();
    let Some(stored) = load_partitions_until_available(shared, &assigned) else {
        return;
    };
    let mut pending = lock(&shared.pending);
    pending.revoke_all();
    for partition in assigned {
        let stored = stored.get(&partition).copied().unwrap_or_default();
        pending.assign(partition, stored);
        let seek = consumer.seek(
            &shared.topic,
            partition,
            Offset::Offset(stored.next_offset),
            Duration::from_secs(5),
        );
        if let Err(error) = seek {
            warn!(%error, kafka.partition = partition, "failed to seek; the partition was probably revoked");
        }
    }
}

/// Copies a commit into the mirror. When every bucket took it, records it as mirrored in
/// PostgreSQL and publishes the partitions' closed windows: readers trust a closed window to be
/// in the summaries.
async fn update_mirror(
    shared: &Shared,
    counters: &[CommittedCounter],
    sets: &[&str],
    generation: i64,
    partition_count: usize,
) {
    let (marks, oldest_closed) = {
        let pending = lock(&shared.pending);
        let marks: Vec<PartitionMark> = pending
            .partitions
            .iter()
            .map(|(partition, progress)| PartitionMark {
                partition: *partition,
                known_generation: progress.known_generation,
                mirrored_generation: progress.mirrored_generation,
            })
            .collect();
        // Readers combine window records with deltas for every window after the closed window
        // they know of, which is the one published, not the one just computed: records may only
        // be dropped well before the oldest published one. Before this aggregator published
        // one, the closed window PostgreSQL held at the assignment stands in: the previous owner
        // published up to about it. Unknown: keep them all.
        let oldest_closed = pending
            .partitions
            .values()
            .map(|progress| progress.published_closed_ms.or(progress.closed_window_ms))
            .collect::<Option<Vec<i64>>>()
            .and_then(|closed| closed.into_iter().min());
        (marks, oldest_closed)
    };
    let length = shared.window.length_ms;
    let prune_before_ms = oldest_closed
        .map(|closed| closed - SUMMARY_WINDOW_MARGIN * length)
        .unwrap_or_else(|| now_ms() - shared.delta_ttl_ms);
    let next_window_ms = shared.window.start_of(now_ms()) + length;
    let never_mirrored = mirror_never_existed(shared, &marks).await;
    let policy = RepairPolicy {
        recreate_lost_buckets: shared.auto_repair,
        // Nothing was ever mirrored, so no delta can have been lost before now.
        new_bucket_valid_from_ms: if never_mirrored { 0 } else { next_window_ms },
        rolled_back_valid_from_ms: next_window_ms,
        now_ms: now_ms(),
    };
    let commit = CommitToMirror {
        generation,
        partitions: &marks,
        counters,
        prune_before_ms,
    };
    let owned: Vec<i32> = marks.iter().map(|mark| mark.partition).collect();
    let mut redis = shared.redis.clone();
    let report = shared
        .mirror
        .apply_commit(&mut redis, &shared.pool, &commit, &policy)
        .await;
    {
        // Whatever happened, the buckets that missed this commit are found behind next time.
        let mut pending = lock(&shared.pending);
        for progress in pending.partitions.values_mut() {
            progress.known_generation = generation;
        }
    }
    let report = match report {
        Ok(report) => report,
        Err(error) => {
            metrics::MIRROR_FAILURES.inc();
            warn!(%error, "failed to copy a commit into redis; the buckets that missed it are repaired with the next one");
            return;
        }
    };
    metrics::record_mirror_report(&report);
    if report.needed_repair() {
        log_repair(&report, never_mirrored);
    }
    if !report.complete() {
        return;
    }
    // Every bucket that holds data has the commit's sets now: readers may trust their counters
    // again. (Marks left behind by a failure here only last until their windows close.)
    if let Err(error) = shared.pending_sets.unmark(&mut redis, sets).await {
        warn!(%error, "failed to unmark applied sets in redis; their counters read from postgres until their windows close");
    }
    // Mirrored means every bucket that holds data took the commit; a bucket left for the
    // replay is being rebuilt from some snapshot, so the record waits until none is left. The
    // aggregator tells a rollback from a late rebuild by it.
    if report.buckets_left == 0 {
        match tally_mirror::store::record_mirrored(
            &shared.pool,
            &shared.group,
            &shared.topic,
            &owned,
            generation,
        )
        .await
        {
            Ok(()) => {
                for progress in lock(&shared.pending).partitions.values_mut() {
                    progress.mirrored_generation = progress.mirrored_generation.max(generation);
                }
            }
            Err(error) => warn!(%error, "failed to record the mirrored generation in postgres"),
        }
    }
    let closed: Vec<(i32, i64)> = lock(&shared.pending)
        .partitions
        .iter()
        .filter_map(|(partition, progress)| {
            progress.closed_window_ms.map(|closed| (*partition, closed))
        })
        .collect();
    if closed.is_empty() {
        return;
    }
    match tally_mirror::publish_closed_windows(
        &mut redis,
        shared.mirror.keys(),
        partition_count,
        &closed,
    )
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

/// Whether no partition of the topic was ever mirrored: the first start of a deployment.
async fn mirror_never_existed(shared: &Shared, marks: &[PartitionMark]) -> bool {
    if marks.iter().any(|mark| mark.mirrored_generation > 0) {
        return false;
    }
    match tally_mirror::store::partition_generations(&shared.pool, &shared.group, &shared.topic)
        .await
    {
        Ok(generations) => generations
            .partitions
            .iter()
            .all(|partition| partition.mirrored_generation == 0),
        // Unknown: assume the mirror existed, which only delays trusting new buckets.
        Err(_) => false,
    }
}

fn log_repair(report: &tally_mirror::ApplyReport, never_mirrored: bool) {
    if never_mirrored && report.buckets_lost == BUCKETS as usize {
        info!(
            mirror.buckets = report.buckets_lost,
            "first start: created the redis mirror's buckets"
        );
        return;
    }
    let how = if report.buckets_lost == BUCKETS as usize {
        "redis lost every bucket of the mirror"
    } else if report.buckets_rolled_back > 0 {
        "redis came back with older data in some buckets (a restart from a snapshot, or a failover that lost writes)"
    } else if report.buckets_lost > 0 {
        "redis lost some buckets (evicted, or emptied)"
    } else {
        "some buckets of the redis mirror missed commits"
    };
    if report.buckets_left > 0 {
        warn!(
            mirror.buckets_lost = report.buckets_lost,
            "{how}; automatic replay is off, so reads of their counters come from postgres until `tally replay` runs"
        );
        return;
    }
    warn!(
        mirror.buckets_lost = report.buckets_lost,
        mirror.buckets_behind = report.buckets_behind,
        mirror.buckets_rolled_back = report.buckets_rolled_back,
        mirror.buckets_with_gaps = report.buckets_with_gaps,
        mirror.buckets_repaired = report.repair.buckets_repaired,
        mirror.buckets_failed = report.buckets_failed,
        mirror.counters_rewritten = report.repair.summaries_written,
        "{how}; repaired them from postgres"
    );
}
