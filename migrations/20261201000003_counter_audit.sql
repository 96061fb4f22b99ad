-- Audited sets (and resets, a set to 0) of plain counters. A set travels through the counter's
-- Kafka partition like an increment; the aggregator writes its row here in the same transaction
-- that applies it, so the trail and the totals never disagree. `old_value` is the counter's
-- value just before the set in the partition's order.
CREATE TABLE counter_audit (
    -- Orders the trail: a counter's rows in the order its sets were applied (the rows of
    -- different partitions' commits may interleave either way).
    seq bigserial PRIMARY KEY,
    -- Given by the ingest when it accepts the set: a record read twice is audited once.
    audit_id text NOT NULL UNIQUE,
    counter text NOT NULL,
    actor text NOT NULL,
    client text NOT NULL,
    reason text NOT NULL,
    requested_at timestamptz NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    old_value bigint NOT NULL,
    new_value bigint NOT NULL
);
CREATE INDEX counter_audit_by_counter ON counter_audit (counter, seq);
