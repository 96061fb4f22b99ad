//! The faults that change what Redis holds rather than whether it answers: a restart from an
//! older snapshot, keys evicted under a memory limit, and flushes while a replay rebuilds it.
//!
//! Each one leaves Redis as it found it (no memory limit, `noeviction`, no snapshot file, no
//! filler), even when a step in the middle fails, so the next scenario meets the stack up.sh
//! started.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use crate::history::seconds;
use crate::processes::TallySettings;
use crate::stack::{Service, Stack};

/// `SAVE`, `snapshot_age` of load, `kill -9`, and `up.sh redis` `down_for` later, which loads
/// the older snapshot. The snapshot file is deleted afterwards: the other Redis faults rely on
/// a restarted Redis coming back empty.
pub async fn restart_redis_from_snapshot(
    stack: &Stack,
    snapshot_age: Duration,
    down_for: Duration,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let snapshot = stack.redis_snapshot_path();
    stack.redis_command(&["SAVE"]).await?;
    let keys_saved = stack.redis_command(&["DBSIZE"]).await?;
    tokio::time::sleep(snapshot_age).await;
    let restarted = async {
        stack.kill_redis_hard().await?;
        tokio::time::sleep(down_for).await;
        stack.start(Service::Redis).await?;
        // What the server itself loaded, not DBSIZE: Tally writes again at once.
        stack
            .redis_info_number("persistence", "rdb_last_load_keys_loaded")
            .await
    }
    .await;
    let removed = std::fs::remove_file(&snapshot)
        .with_context(|| format!("removing the snapshot {}", snapshot.display()));
    let keys_loaded = restarted?;
    removed?;
    // Without this the fault could quietly degrade into a restart from empty.
    ensure!(
        keys_loaded > 0,
        "redis came back empty: it did not load the snapshot {}",
        snapshot.display()
    );
    notes.push(format!(
        "redis restarted from a snapshot {} old: about {} keys at the SAVE, {keys_loaded} loaded back",
        seconds(snapshot_age),
        keys_saved.trim()
    ));
    Ok(())
}

/// Filler keys live outside every Tally prefix (Tally's keys all begin with `{}`).
const FILLER_PREFIX: &str = "faults-filler:";
const FILLER_VALUE_BYTES: u64 = 1024;
/// How often more filler is written while the limit holds, so Redis keeps evicting.
const FILLER_TOP_UP_EVERY: Duration = Duration::from_millis(250);
/// How often every key of one of the targeted counters is deleted while the limit holds.
const COUNTER_KEYS_DELETED_EVERY: Duration = Duration::from_secs(1);

/// `SET prefix..n` for `n` in `first..first+count`, each value `ARGV[4]` bytes long.
const WRITE_FILLER_SCRIPT: &str = "local first, count = tonumber(ARGV[2]), tonumber(ARGV[3]) \
    local value = string.rep('x', tonumber(ARGV[4])) \
    for n = first, first + count - 1 do redis.call('SET', ARGV[1] .. n, value) end \
    return count";

/// Deletes every key matching `ARGV[1]` (a glob) that mentions `ARGV[2]`, in its name or in a
/// field of a hash: what evicting all of a counter's keys looks like, whatever Tally's key
/// layout. Redis evicts whole keys, never single fields, so a hash that holds the counter goes
/// whole. Returns `{keys deleted, of which hashes holding it in a field}`.
const DELETE_COUNTER_KEYS_SCRIPT: &str = "local pattern, name = ARGV[1], ARGV[2] \
    local keys_deleted, hashes_deleted = 0, 0 \
    local cursor = '0' \
    repeat \
      local page = redis.call('SCAN', cursor, 'MATCH', pattern, 'COUNT', 1000) \
      cursor = page[1] \
      for _, key in ipairs(page[2]) do \
        if string.find(key, name, 1, true) then \
          keys_deleted = keys_deleted + redis.call('DEL', key) \
        elseif redis.call('TYPE', key)['ok'] == 'hash' then \
          local field_cursor, holds_it = '0', false \
          repeat \
            local fields = redis.call('HSCAN', key, field_cursor, 'COUNT', 1000) \
            field_cursor = fields[1] \
            for index = 1, #fields[2], 2 do \
              if string.find(fields[2][index], name, 1, true) then holds_it = true end \
            end \
          until field_cursor == '0' or holds_it \
          if holds_it then \
            local deleted = redis.call('DEL', key) \
            keys_deleted = keys_deleted + deleted \
            hashes_deleted = hashes_deleted + deleted \
          end \
        end \
      end \
    until cursor == '0' \
    return {keys_deleted, hashes_deleted}";

/// Deletes every key matching `ARGV[1]`; returns how many.
const DELETE_MATCHING_SCRIPT: &str = "local deleted, cursor = 0, '0' \
    repeat \
      local page = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000) \
      cursor = page[1] \
      for _, key in ipairs(page[2]) do deleted = deleted + redis.call('UNLINK', key) end \
    until cursor == '0' \
    return deleted";

/// What the eviction fault targets.
#[derive(Debug, Clone)]
pub struct EvictionTargets {
    /// The scenario's Redis prefix: only its keys are deleted by name.
    pub redis_prefix: String,
    /// Counters whose keys are all deleted now and then, one after the other.
    pub counters: Vec<String>,
}

/// Fills Redis with `filler_bytes` of filler, then for `evicting_for` holds it under a
/// `maxmemory` of half the filler below what it uses, with `allkeys-lru`: Redis evicts the
/// least recently used keys, filler mostly, Tally's cold keys too. Meanwhile every key of one
/// target counter is deleted each second (the hot keys LRU would spare). Then lifts the limit.
pub async fn evict_redis_keys(
    stack: &Stack,
    filler_bytes: u64,
    evicting_for: Duration,
    targets: &EvictionTargets,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let evicted_before = stack.redis_info_number("stats", "evicted_keys").await?;
    let filler_keys = filler_bytes / FILLER_VALUE_BYTES;
    write_filler(stack, 0, filler_keys).await?;
    let used = stack.redis_info_number("memory", "used_memory").await?;
    let limit = used.saturating_sub(filler_bytes / 2);
    let evicting = hold_memory_limit(stack, limit, filler_keys, evicting_for, targets).await;
    // Whatever happened while the limit held, lift it and drop the filler.
    let restored = async {
        stack
            .redis_command(&["CONFIG", "SET", "maxmemory", "0"])
            .await?;
        stack
            .redis_command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
            .await?;
        let pattern = format!("{FILLER_PREFIX}*");
        stack
            .redis_command(&["EVAL", DELETE_MATCHING_SCRIPT, "0", &pattern])
            .await
    }
    .await;
    let deletions = evicting?;
    restored?;
    let evicted = stack
        .redis_info_number("stats", "evicted_keys")
        .await?
        .saturating_sub(evicted_before);
    // Without evictions the fault did not happen, and the scenario would prove nothing.
    ensure!(
        evicted > 0,
        "redis evicted no key under maxmemory {limit} (used_memory was {used})"
    );
    notes.push(format!(
        "redis evicted {evicted} keys under maxmemory {} KiB (used {} KiB with {} KiB of filler); every key of a counter deleted {} times: {} keys, {} of them hashes holding it in a field",
        limit / 1024,
        used / 1024,
        filler_bytes / 1024,
        deletions.rounds,
        deletions.keys,
        deletions.hashes
    ));
    Ok(())
}

#[derive(Debug, Default)]
struct CounterKeyDeletions {
    rounds: u64,
    keys: u64,
    hashes: u64,
}

async fn hold_memory_limit(
    stack: &Stack,
    limit: u64,
    mut filler_written: u64,
    evicting_for: Duration,
    targets: &EvictionTargets,
) -> anyhow::Result<CounterKeyDeletions> {
    stack
        .redis_command(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"])
        .await?;
    stack
        .redis_command(&["CONFIG", "SET", "maxmemory", &limit.to_string()])
        .await?;
    let started = Instant::now();
    let top_up_keys = (filler_written / 16).max(1);
    let mut deletions = CounterKeyDeletions::default();
    let mut last_deletion: Option<Instant> = None;
    let pattern = format!("*{}*", targets.redis_prefix);
    while started.elapsed() < evicting_for {
        write_filler(stack, filler_written, top_up_keys).await?;
        filler_written += top_up_keys;
        if last_deletion.is_none_or(|at| at.elapsed() >= COUNTER_KEYS_DELETED_EVERY)
            && !targets.counters.is_empty()
        {
            let counter = &targets.counters[deletions.rounds as usize % targets.counters.len()];
            let deleted = stack
                .redis_command(&["EVAL", DELETE_COUNTER_KEYS_SCRIPT, "0", &pattern, counter])
                .await?;
            let mut counts = deleted.lines().map(|line| line.trim().parse::<u64>());
            deletions.keys += counts.next().and_then(Result::ok).unwrap_or(0);
            deletions.hashes += counts.next().and_then(Result::ok).unwrap_or(0);
            deletions.rounds += 1;
            last_deletion = Some(Instant::now());
        }
        tokio::time::sleep(FILLER_TOP_UP_EVERY).await;
    }
    Ok(deletions)
}

async fn write_filler(stack: &Stack, first: u64, count: u64) -> anyhow::Result<()> {
    stack
        .redis_command(&[
            "EVAL",
            WRITE_FILLER_SCRIPT,
            "0",
            FILLER_PREFIX,
            &first.to_string(),
            &count.to_string(),
            &FILLER_VALUE_BYTES.to_string(),
        ])
        .await?;
    Ok(())
}

/// Longest wait for `tally replay`: it waits for the aggregator to close the windows before
/// the one it picked, seconds with the suite's 1 s windows; a minute means it is stuck.
const REPLAY_PATIENCE: Duration = Duration::from_secs(120);

/// `FLUSHALL`, start `tally replay`, then `FLUSHALL` again after each of `flush_again_after`
/// (each counted from the previous flush), and wait for the replay to end. It may succeed or
/// give up; either way Redis must not be trusted until it is whole again, which the reads show.
pub async fn flush_redis_during_replay(
    stack: &Stack,
    settings: &TallySettings,
    flush_again_after: &[Duration],
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    stack.redis_command(&["FLUSHALL"]).await?;
    let started = Instant::now();
    let replay = settings.start_replay()?.wait_with_output();
    // On its own task, so its output pipe is drained while the flushes go on; aborting the
    // task drops the child, which kills the replay (kill_on_drop).
    let mut replay = tokio::spawn(replay);
    let flushes = async {
        let mut flushed_at = Vec::new();
        for delay in flush_again_after {
            tokio::time::sleep(*delay).await;
            stack.redis_command(&["FLUSHALL"]).await?;
            flushed_at.push(format!("{}ms", started.elapsed().as_millis()));
        }
        anyhow::Ok(flushed_at)
    }
    .await;
    let flushed_at = match flushes {
        Ok(flushed_at) => flushed_at,
        Err(error) => {
            replay.abort();
            return Err(error);
        }
    };
    let output = match tokio::time::timeout(REPLAY_PATIENCE, &mut replay).await {
        Ok(joined) => joined
            .context("the replay task panicked")?
            .context("waiting for tally replay")?,
        Err(_) => {
            replay.abort();
            notes.push(format!(
                "tally replay did not end within {REPLAY_PATIENCE:?}; killed it"
            ));
            return Ok(());
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last_line = stdout.lines().last().unwrap_or("(nothing printed)");
    notes.push(format!(
        "flushed redis right before a tally replay and {} into it; the replay {} after {:.1}s: {}{}",
        flushed_at.join(" and "),
        if output.status.success() {
            "succeeded".to_owned()
        } else {
            format!("failed ({})", output.status)
        },
        started.elapsed().as_secs_f64(),
        last_line,
        if output.status.success() {
            ""
        } else {
            " (its error is in replay.log)"
        }
    ));
    Ok(())
}
