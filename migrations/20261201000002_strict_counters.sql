-- Strict counters (inventory, quotas): one row per counter, written synchronously by the
-- strict routes and never through Kafka or Redis. The row is the truth; the CHECKs are a last
-- line of defence behind the rules in crates/tally-strict, which never write a value outside
-- the limits.
CREATE TABLE strict_counters (
    name text PRIMARY KEY,
    value bigint NOT NULL,
    -- NULL means unbounded on that side.
    min bigint NULL,
    max bigint NULL,
    -- The value the counter was created with: a repeat of the creating PUT is compared with
    -- the definition (initial value, min, max), not with the value the counter has come to.
    initial_value bigint NOT NULL,
    -- Goes up by exactly one per accepted add or compare-and-set.
    version bigint NOT NULL DEFAULT 0 CHECK (version >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT strict_counters_value_within_limits
        CHECK ((min IS NULL OR min <= value) AND (max IS NULL OR value <= max)),
    CONSTRAINT strict_counters_initial_value_within_limits
        CHECK ((min IS NULL OR min <= initial_value) AND (max IS NULL OR initial_value <= max))
);

-- The first outcome of every add sent with an Idempotency-Key, written in the transaction that
-- decided it: a retry of the same use (key, counter, amount) answers it again and counts
-- nothing. A key counts for the idempotency window (TALLY_IDEMPOTENCY_WINDOW_SECS, 24 h by
-- default); after that the row is ignored, replaced by the key's next use, and pruned.
CREATE TABLE strict_idempotency (
    key text PRIMARY KEY,
    counter text NOT NULL,
    by bigint NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('applied', 'limit-reached')),
    -- The counter as the outcome left it (applied) or found it (limit-reached).
    value bigint NOT NULL,
    version bigint NOT NULL,
    min bigint NULL,
    max bigint NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Expired keys are pruned oldest first in bounded batches through this index, never by a scan.
CREATE INDEX strict_idempotency_by_age ON strict_idempotency (applied_at);
