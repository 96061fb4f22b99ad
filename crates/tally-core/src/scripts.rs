//! The Lua scripts that keep Redis's copies of PostgreSQL consistent. They are part of the
//! model, not of any one role: the aggregator and the replay job both write summaries, and a
//! summary must never go backwards or skip a commit.
//!
//! Integers travel as strings and are stored as strings; Lua compares only versions and window
//! starts, which stay far below 2^53.

/// Applies one aggregator commit to a counter's summary.
///
/// `KEYS[1]` = summary key. `ARGV` = version, total, partition, prune_before_ms, then pairs of
/// (window_start_ms, window_sum) for the windows the commit touched.
///
/// Returns 1 when applied, 0 when the summary already has this version or a newer one, and -1
/// when the summary is not at `version - 1`: the caller then rewrites it in full from PostgreSQL,
/// because the windows touched by the missing commits would otherwise be missing.
pub const APPLY_SUMMARY_COMMIT: &str = r#"
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local version = tonumber(ARGV[1])
if stored >= version then return 0 end
if stored ~= version - 1 then return -1 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'total', ARGV[2], 'partition', ARGV[3])
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], 'w:' .. ARGV[i], ARGV[i + 1])
end
local prune_before = tonumber(ARGV[4])
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, 2) == 'w:' and tonumber(string.sub(field, 3)) < prune_before then
    redis.call('HDEL', KEYS[1], field)
  end
end
return 1
"#;

/// Replaces a counter's summary with a full copy read from PostgreSQL, unless Redis already
/// holds a newer version.
///
/// `KEYS[1]` = summary key. `ARGV` = version, total, partition, then pairs of
/// (window_start_ms, window_sum) for every recent window. Returns 1 when written, 0 when skipped.
pub const REPLACE_SUMMARY: &str = r#"
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if stored > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'total', ARGV[2], 'partition', ARGV[3])
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[1], 'w:' .. ARGV[i], ARGV[i + 1])
end
return 1
"#;

/// Raises the closed window of some partitions; a closed window never moves back.
///
/// `KEYS[1]` = closed hash. `ARGV` = partition count, then pairs of (partition, closed_window_ms).
pub const PUBLISH_CLOSED_WINDOWS: &str = r#"
redis.call('HSET', KEYS[1], 'partitions', ARGV[1])
for i = 2, #ARGV, 2 do
  local stored = redis.call('HGET', KEYS[1], ARGV[i])
  if not stored or tonumber(stored) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"#;

/// Marks Redis as complete for deltas from a window on, unless another replay already did.
///
/// `KEYS[1]` = meta hash. `ARGV` = epoch, valid_from_ms. Returns the epoch in force.
pub const INITIALIZE_META: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch then return epoch end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'valid_from', ARGV[2])
return ARGV[1]
"#;

/// Records that a window of a counter uses more than one shard key; the count never shrinks
/// within a window, so a read always sums every shard that may hold increments.
///
/// `KEYS[1]` = shard count key. `ARGV` = shard count, TTL in seconds.
pub const DECLARE_SHARD_COUNT: &str = r#"
local stored = tonumber(redis.call('GET', KEYS[1]) or '1')
if tonumber(ARGV[1]) > stored then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
return 1
"#;
