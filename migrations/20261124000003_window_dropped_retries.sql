-- Keyed increments the aggregator dropped because their idempotency key was applied before. They
-- never count, but the ingest may already have added them to the window's Redis deltas, so the
-- Redis summaries report them with the window's sum: reads then subtract them from the deltas.
ALTER TABLE counter_windows ADD COLUMN dropped bigint NOT NULL DEFAULT 0;
