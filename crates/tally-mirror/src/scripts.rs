//! The Lua scripts of the mirror. Each touches one key, so each runs in one slot of a Redis
//! Cluster, and each runs atomically: a bucket's summaries and its markers change together.
//!
//! Integers travel and are stored as strings. Lua numbers are doubles, so scripts compare only
//! versions, generations and window starts (all far below 2^53) and never do arithmetic on a
//! total or a sum: they copy them.

/// Applies one aggregator commit to one bucket.
///
/// `KEYS[1]` = the bucket. `ARGV[1]` = the commit's generation, `ARGV[2]` = prune_before_ms,
/// `ARGV[3]` = k, the committing aggregator's partitions, then k pairs (partition, the generation
/// every bucket is known to hold for it). Then per counter of the bucket in the commit: name,
/// version, total, partition, n, and n triples (window, positive, negative).
///
/// Returns `{1}` when applied and the markers raised to the commit's generation; `{2}` when the
/// bucket has no epoch (it lost its data): nothing is written; `{3, epoch, created, partition,
/// marker, ...}` when a partition's marker is below what the bucket is known to hold (Redis lost
/// writes, the bucket was rebuilt from an older snapshot of PostgreSQL, or the previous owner of
/// the partition never copied its last commit), with when the bucket was created and the marker
/// found (`""` when absent): nothing is written; `{4, epoch}` when some counter's stored version
/// is not the one before its own (a commit is missing): the other counters are written, the
/// markers are not raised.
pub(crate) const APPLY_COMMIT: &str = r#"
local bucket = KEYS[1]
local epoch = redis.call('HGET', bucket, 'm:epoch')
if not epoch then return {2} end
local prune_before = tonumber(ARGV[2])
local partitions = tonumber(ARGV[3])
local behind = {}
local i = 4
for _ = 1, partitions do
  local marker = redis.call('HGET', bucket, 'm:g:' .. ARGV[i])
  if tonumber(marker or '0') < tonumber(ARGV[i + 1]) then
    behind[#behind + 1] = ARGV[i]
    behind[#behind + 1] = marker or ''
  end
  i = i + 2
end
if #behind > 0 then
  return {3, epoch, redis.call('HGET', bucket, 'm:created') or '0', unpack(behind)}
end
local gaps = 0
while i <= #ARGV do
  local name, version, window_count = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 4])
  local field = 'c:' .. name
  local stored = redis.call('HGET', bucket, field)
  local stored_version, complete_from, windows = 0, ARGV[2], {}
  if stored then
    local header, rest = string.match(stored, '^([^;]*)(.*)$')
    local version_text, complete_text = string.match(header, '^(%S+) %S+ %S+ (%S+)$')
    stored_version = tonumber(version_text)
    if tonumber(complete_text) > prune_before then complete_from = complete_text end
    for start, positive, negative in string.gmatch(rest, ';([^;%s]+) ([^;%s]+) ([^;%s]+)') do
      windows[start] = positive .. ' ' .. negative
    end
  end
  if stored_version == version - 1 then
    for w = 0, window_count - 1 do
      local at = i + 5 + 3 * w
      windows[ARGV[at]] = ARGV[at + 1] .. ' ' .. ARGV[at + 2]
    end
    local starts = {}
    for start in pairs(windows) do
      if tonumber(start) >= prune_before then starts[#starts + 1] = start end
    end
    table.sort(starts, function(a, b) return tonumber(a) < tonumber(b) end)
    local parts = {ARGV[i + 1] .. ' ' .. ARGV[i + 2] .. ' ' .. ARGV[i + 3] .. ' ' .. complete_from}
    for _, start in ipairs(starts) do parts[#parts + 1] = start .. ' ' .. windows[start] end
    redis.call('HSET', bucket, field, table.concat(parts, ';'))
  elseif stored_version < version then
    gaps = gaps + 1
  end
  i = i + 5 + 3 * window_count
end
if gaps > 0 then return {4, epoch} end
i = 4
for _ = 1, partitions do
  local field = 'm:g:' .. ARGV[i]
  local marker = redis.call('HGET', bucket, field)
  if not marker or tonumber(marker) < tonumber(ARGV[1]) then
    redis.call('HSET', bucket, field, ARGV[1])
  end
  i = i + 2
end
return {1}
"#;

/// Writes full summaries read from PostgreSQL into a bucket, and raises its markers.
///
/// `KEYS[1]` = the bucket. `ARGV[1]` = the epoch the repair started from, `ARGV[2]` = a
/// `valid_from` to raise the bucket's to (`""` for none), `ARGV[3]` = k, then k triples
/// (partition, floor, generation): the partition's marker must still be at least `floor` (`""`:
/// no floor; an absent marker is below every floor), and rises to `generation` (`""`: stays).
/// Then pairs (name, encoded summary).
///
/// Returns -1 when the bucket's epoch is no longer `ARGV[1]` (it lost its data again while the
/// repair read PostgreSQL) or a marker fell below its floor (it was rolled back meanwhile: the
/// repair read only what came after the floor): nothing is written, so a repair overtaken by
/// another loss never marks a bucket complete. Else the number of summaries written; a summary
/// the bucket holds in the same or a newer version is kept.
pub(crate) const REPAIR_BUCKET: &str = r#"
local bucket = KEYS[1]
if redis.call('HGET', bucket, 'm:epoch') ~= ARGV[1] then return -1 end
local markers = tonumber(ARGV[3])
local i = 4
for _ = 1, markers do
  if ARGV[i + 1] ~= '' then
    local marker = redis.call('HGET', bucket, 'm:g:' .. ARGV[i])
    if tonumber(marker or '-1') < tonumber(ARGV[i + 1]) then return -1 end
  end
  i = i + 3
end
local written = 0
while i <= #ARGV do
  local field = 'c:' .. ARGV[i]
  local version = tonumber(string.match(ARGV[i + 1], '^(%S+)'))
  local stored = redis.call('HGET', bucket, field)
  if not stored or tonumber(string.match(stored, '^(%S+)')) < version then
    redis.call('HSET', bucket, field, ARGV[i + 1])
    written = written + 1
  end
  i = i + 2
end
i = 4
for _ = 1, markers do
  if ARGV[i + 2] ~= '' then
    local field = 'm:g:' .. ARGV[i]
    local marker = redis.call('HGET', bucket, field)
    if not marker or tonumber(marker) < tonumber(ARGV[i + 2]) then
      redis.call('HSET', bucket, field, ARGV[i + 2])
    end
  end
  i = i + 3
end
if ARGV[2] ~= '' then
  local valid_from = redis.call('HGET', bucket, 'm:valid_from')
  if not valid_from or tonumber(valid_from) < tonumber(ARGV[2]) then
    redis.call('HSET', bucket, 'm:valid_from', ARGV[2])
  end
end
return written
"#;

/// Gives a bucket that lost its data a new epoch, unless it has one.
///
/// `KEYS[1]` = the bucket. `ARGV[1]` = a new random epoch, `ARGV[2]` = the first window whose
/// deltas can be trusted, `ARGV[3]` = the time (Unix ms). Returns `{epoch in force, 1 if created
/// here}`. A bucket without an epoch holds nothing valid, so anything left in it is dropped first.
pub(crate) const CREATE_BUCKET: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'm:epoch')
if epoch then return {epoch, 0} end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'm:epoch', ARGV[1], 'm:valid_from', ARGV[2], 'm:created', ARGV[3])
return {ARGV[1], 1}
"#;

/// Raises the closed window of some partitions; a closed window never moves back.
///
/// `KEYS[1]` = the closed hash. `ARGV` = partition count, then pairs (partition, closed_window_ms).
pub(crate) const PUBLISH_CLOSED_WINDOWS: &str = r#"
redis.call('HSET', KEYS[1], 'partitions', ARGV[1])
for i = 2, #ARGV, 2 do
  local stored = redis.call('HGET', KEYS[1], ARGV[i])
  if not stored or tonumber(stored) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"#;

/// Records that a window of a counter uses more than one shard; the count never shrinks within
/// a window, so a read always sums every shard that may hold records.
///
/// `KEYS[1]` = shard 0's delta hash. `ARGV` = shard count, TTL in seconds.
pub(crate) const DECLARE_SHARD_COUNT: &str = r#"
local stored = tonumber(redis.call('HGET', KEYS[1], 'n') or '1')
if tonumber(ARGV[1]) > stored then
  redis.call('HSET', KEYS[1], 'n', ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// Marks one more set of a counter as in flight (see `pending_sets`).
///
/// `KEYS[1]` = the counter's bucket. `ARGV[1]` = the mark's field, `ARGV[2]` = the window the
/// set was made in. The mark keeps the latest window of the sets it counts.
pub(crate) const MARK_PENDING_SET: &str = r#"
local stored = redis.call('HGET', KEYS[1], ARGV[1])
local count, window = 0, ARGV[2]
if stored then
  local stored_count, stored_window = string.match(stored, '^(%S+) (%S+)$')
  count = tonumber(stored_count) or 0
  if tonumber(stored_window) and tonumber(stored_window) > tonumber(window) then
    window = stored_window
  end
end
redis.call('HSET', KEYS[1], ARGV[1], (count + 1) .. ' ' .. window)
return 1
"#;

/// Takes one set of a counter off its mark, and drops the mark at zero.
///
/// `KEYS[1]` = the counter's bucket. `ARGV[1]` = the mark's field.
pub(crate) const UNMARK_PENDING_SET: &str = r#"
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if not stored then return 0 end
local stored_count, stored_window = string.match(stored, '^(%S+) (%S+)$')
local count = (tonumber(stored_count) or 1) - 1
if count <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], count .. ' ' .. stored_window)
end
return 1
"#;
