-- What the Redis mirror (crates/tally-mirror) needs PostgreSQL to know, so that Redis coming back
-- with old or partial data is detected and healed bucket by bucket.

-- Every counter lives in one of 1024 buckets of the mirror. The bucket is the first 32 bits of
-- md5(name), modulo 1024: tally_mirror::bucket_of computes the same number.
-- `generation` is the generation of the aggregator commit that last touched the counter (see
-- consumer_offsets.generation): a bucket that lost the commits after generation G is repaired
-- from the counters whose generation is above G.
ALTER TABLE counters
    ADD COLUMN bucket integer NOT NULL
        GENERATED ALWAYS AS ((('x' || substr(md5(name), 1, 8))::bit(32)::int) & 1023) STORED,
    ADD COLUMN generation bigint NOT NULL DEFAULT 0;
DROP INDEX counters_by_partition_and_recency;
CREATE INDEX counters_by_partition_and_generation ON counters (kafka_partition, generation);
CREATE INDEX counters_by_bucket_and_generation ON counters (bucket, generation);

-- The records a window's sum came from, split by the sign of each record's `by` (a record may
-- carry retries that were dropped, so these can exceed `sum`). Redis's deltas for the window are
-- split the same way; a read adds only what the deltas hold beyond these, per sign, so a lost or
-- evicted delta can never pull a read below PostgreSQL's total. They replace `dropped`.
ALTER TABLE counter_windows
    ADD COLUMN positive bigint NOT NULL DEFAULT 0,
    ADD COLUMN negative bigint NOT NULL DEFAULT 0,
    DROP COLUMN dropped;
-- Rebuilding the mirror reads the recent windows of many counters at once.
CREATE INDEX counter_windows_by_start ON counter_windows (window_start);

-- `generation`: a number the partition's commits take, increasing (milliseconds since the epoch,
-- at least one more than the previous commit's); `previous_generation`, the one before it. An
-- aggregator copies a commit into the mirror before it makes the next one, so every bucket that
-- holds data should have the partition's previous generation: a bucket whose marker is below it
-- has lost writes (or missed them while Redis was unreachable), and readers do not trust it.
-- `mirrored_generation`: the partition's latest commit that every such bucket took.
ALTER TABLE consumer_offsets
    ADD COLUMN generation bigint NOT NULL DEFAULT 0,
    ADD COLUMN previous_generation bigint NOT NULL DEFAULT 0,
    ADD COLUMN mirrored_generation bigint NOT NULL DEFAULT 0;
-- Partitions consumed before generations existed hold counters all the same: generation 1 says
-- so, and readers then want a bucket's marker for them before they take a counter as new.
UPDATE consumer_offsets SET generation = 1, previous_generation = 1;

-- A key is applied once per use (key, counter, amount). A retry of the same use is dropped; a
-- second, different use of a key that slipped past the ingest's claim (Redis was unreachable) was
-- acknowledged too, so it counts, and so do its own retries only once.
ALTER TABLE idempotency_keys
    DROP CONSTRAINT idempotency_keys_pkey,
    ADD PRIMARY KEY (key, counter, by);
