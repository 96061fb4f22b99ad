-- Idempotency keys the aggregator has applied. A key is claimed in the same transaction as the
-- count it belongs to, so a retried increment counts once even after Redis is lost, the
-- aggregator crashes, or Redis is rebuilt.
CREATE TABLE idempotency_keys (
    key text PRIMARY KEY,
    counter text NOT NULL,
    by bigint NOT NULL,
    applied_at timestamptz NOT NULL
);

-- Expired keys are pruned oldest first in small batches, through this index, never by a scan.
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (applied_at);
