-- The durable truth of Tally. The aggregator writes all three tables in one transaction per
-- window, so the counts and the Kafka offsets they came from can never disagree.

-- One row per counter: the sum of every increment the aggregator has applied.
CREATE TABLE counters (
    name text PRIMARY KEY,
    total bigint NOT NULL,
    -- Bumped by every aggregator commit that touches the counter. Redis copies of the row carry
    -- it, so an older copy can never overwrite a newer one.
    version bigint NOT NULL,
    -- The Kafka partition the counter's records live in (records are keyed by name).
    kafka_partition integer NOT NULL,
    -- The latest window this counter got increments in.
    last_window_start timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Lets an aggregator find the recently active counters of the partitions it was just assigned.
CREATE INDEX counters_by_partition_and_recency ON counters (kafka_partition, last_window_start);

-- Per-window sums: the part of each counter's total that came from each 5-second window.
CREATE TABLE counter_windows (
    name text NOT NULL,
    window_start timestamptz NOT NULL,
    sum bigint NOT NULL,
    PRIMARY KEY (name, window_start)
);

-- Where each consumer group is in each partition, committed with the counts.
CREATE TABLE consumer_offsets (
    consumer_group text NOT NULL,
    topic text NOT NULL,
    kafka_partition integer NOT NULL,
    -- The offset of the next record to apply.
    next_offset bigint NOT NULL,
    -- Every increment stamped with this window or an earlier one has been applied.
    closed_window_start timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, kafka_partition)
);
