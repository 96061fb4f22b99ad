//! Idempotency keys at the edge: a key is claimed in Redis before its increment is produced, so
//! of two requests racing with one key only one is produced.
//!
//! A key's Redis value says where its first use stands:
//! - `P TOKEN USE`: in flight. Claimed with `SET NX` by the request that produces it (`TOKEN`
//!   is that request's), for a little longer than a produce can take. Any other request with
//!   the key gets `409` and retries later.
//! - `A USE`: acknowledged by Kafka. A retry with the same use is a duplicate (`202`, not counted
//!   again); another counter or amount gets `422`.
//! - `U USE`: a produce failed without knowing whether Kafka wrote the record (it timed out, or
//!   only part of a batch was written). The next request takes the key as if it were free, but
//!   learns that a copy may be in the log.
//!
//! (`USE` is `BY:COUNTER`.) When the produce fails, the request gives its claim back, so the
//! client's retry can go ahead. If the record may have landed after all, the aggregator drops
//! whichever copy comes second, but until it has read both a read could show both: so a retry
//! of an uncertain key is produced without adding to Redis's deltas, and reads show it once the
//! aggregator applied it.
//! Redis only speeds this up: PostgreSQL knows every use the aggregator applied, and the
//! aggregator applies a use once. When Redis cannot be reached, a request is produced without a
//! claim; two different uses of one key can then both be acknowledged, and both count (see
//! `tally_idempotency_conflicts_total`).

use std::time::Duration;

use redis::aio::ConnectionManager;
use tally_core::KeyUse;

/// Where a key stood when a request tried to claim it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KeyState {
    /// This request holds the claim now. `earlier_copy`: an earlier attempt with the key failed
    /// without knowing whether Kafka wrote it.
    Claimed { earlier_copy: bool },
    /// Another request is producing this use.
    InFlight(KeyUse),
    /// Kafka acknowledged this use.
    Acknowledged(KeyUse),
    /// Redis could not say: the request goes ahead without a claim.
    Unknown,
}

/// Claims and releases keys in Redis. Every command touches one key, so each works on any node
/// of a Redis Cluster.
pub(crate) struct KeyClaims {
    prefix: String,
    /// How long a claim outlives a request that dies holding it.
    claim_ttl: Duration,
    /// How long an acknowledged use is remembered.
    remember_for: Duration,
    claim: redis::Script,
    release: redis::Script,
    acknowledge: redis::Script,
}

/// Claims a key that is free or whose last attempt is uncertain (`U USE`), and returns what the
/// key held before: `SET NX GET`, except that an uncertain key counts as free.
/// `ARGV` = the claim, its TTL in milliseconds.
const CLAIM_KEY: &str = r#"
local current = redis.call('GET', KEYS[1])
if (not current) or string.sub(current, 1, 2) == 'U ' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return current
"#;

/// Records an acknowledged use, unless the key now stands for another use: a claim that expired
/// under a slow request may have been taken by another request since, and its answer must stand.
/// `ARGV` = the acknowledged value, the use, the TTL in seconds.
const ACKNOWLEDGE_USE: &str = r#"
local current = redis.call('GET', KEYS[1])
if current then
  local use = string.match(current, '^[AU] (.*)$') or string.match(current, '^P %S+ (.*)$') or current
  if use ~= ARGV[2] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"#;

/// Gives back a claim only if it is still the one this request made: deletes it, or, when a
/// copy of the use may be in Kafka, leaves `U USE` for the next attempt to find.
/// `ARGV` = the claim, then `U USE` and its TTL in seconds, or nothing.
const RELEASE_CLAIM: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return redis.call('DEL', KEYS[1])
"#;

impl KeyClaims {
    pub(crate) fn new(prefix: &str, claim_ttl: Duration, remember_for: Duration) -> Self {
        Self {
            prefix: prefix.to_owned(),
            claim_ttl,
            remember_for,
            claim: redis::Script::new(CLAIM_KEY),
            release: redis::Script::new(RELEASE_CLAIM),
            acknowledge: redis::Script::new(ACKNOWLEDGE_USE),
        }
    }

    fn redis_key(&self, key: &str) -> String {
        format!("{{}}{}:i:{key}", self.prefix)
    }

    fn claim_value(token: &str, key_use: &KeyUse) -> String {
        format!("P {token} {}", key_use.encode())
    }

    /// Tries to claim every key, each for its use, in one round trip.
    pub(crate) async fn claim(
        &self,
        redis: &ConnectionManager,
        token: &str,
        uses: &[(&str, KeyUse)],
    ) -> Vec<KeyState> {
        let mut pipeline = redis::pipe();
        // Pipelined scripts run by EVALSHA: load it first, in the same round trip.
        pipeline.cmd("SCRIPT").arg("LOAD").arg(CLAIM_KEY).ignore();
        for (key, key_use) in uses {
            let mut invocation = self.claim.key(self.redis_key(key));
            invocation
                .arg(Self::claim_value(token, key_use))
                .arg(self.claim_ttl.as_millis() as u64);
            pipeline.invoke_script(&invocation);
        }
        let mut redis = redis.clone();
        match pipeline
            .query_async::<Vec<Option<String>>>(&mut redis)
            .await
        {
            Ok(previous) if previous.len() == uses.len() => previous
                .iter()
                .map(|value| parse_state(value.as_deref()))
                .collect(),
            _ => vec![KeyState::Unknown; uses.len()],
        }
    }

    /// Records an acknowledged use, in a pipeline the caller sends (the one with the deltas).
    /// The first call for a pipeline loads the script in it: pipelined scripts run by EVALSHA.
    pub(crate) fn acknowledge(
        &self,
        pipeline: &mut redis::Pipeline,
        script_loaded: &mut bool,
        key: &str,
        key_use: &KeyUse,
    ) {
        if !*script_loaded {
            pipeline
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(ACKNOWLEDGE_USE)
                .ignore();
            *script_loaded = true;
        }
        let encoded = key_use.encode();
        let mut invocation = self.acknowledge.key(self.redis_key(key));
        invocation
            .arg(format!("A {encoded}"))
            .arg(encoded)
            .arg(self.remember_for.as_secs());
        pipeline.invoke_script(&invocation).ignore();
    }

    /// Gives back the claims this request made, so a retry can go ahead. A claim that has
    /// expired and been taken by another request is left alone. `maybe_written`: the request's
    /// records may be in Kafka after all, so each key is left uncertain rather than free.
    pub(crate) async fn release(
        &self,
        redis: &ConnectionManager,
        token: &str,
        claimed: &[ClaimedKey<'_>],
        maybe_written: bool,
    ) {
        if claimed.is_empty() {
            return;
        }
        let mut pipeline = redis::pipe();
        pipeline
            .cmd("SCRIPT")
            .arg("LOAD")
            .arg(RELEASE_CLAIM)
            .ignore();
        for claimed in claimed {
            let mut invocation = self.release.key(self.redis_key(claimed.key));
            invocation.arg(Self::claim_value(token, &claimed.key_use));
            // An earlier attempt's copy may still be in the log, whatever became of this one.
            if maybe_written || claimed.earlier_copy {
                invocation
                    .arg(format!("U {}", claimed.key_use.encode()))
                    .arg(self.remember_for.as_secs());
            }
            pipeline.invoke_script(&invocation).ignore();
        }
        let mut redis = redis.clone();
        // A claim that stays expires by itself; a retry until then gets 409.
        let _ = pipeline.query_async::<()>(&mut redis).await;
    }
}

/// A key this request claimed, with its use: to acknowledge or give back.
#[derive(Clone, Debug)]
pub(crate) struct ClaimedKey<'a> {
    pub(crate) key: &'a str,
    pub(crate) key_use: KeyUse,
    /// An earlier attempt with the key may have been written: see [`KeyState::Claimed`].
    pub(crate) earlier_copy: bool,
}

fn parse_state(value: Option<&str>) -> KeyState {
    let Some(value) = value else {
        return KeyState::Claimed {
            earlier_copy: false,
        };
    };
    if value.starts_with("U ") {
        return KeyState::Claimed { earlier_copy: true };
    }
    if let Some(acknowledged) = value.strip_prefix("A ") {
        return KeyUse::decode(acknowledged).map_or(KeyState::Unknown, KeyState::Acknowledged);
    }
    if let Some(in_flight) = value.strip_prefix("P ") {
        let key_use = in_flight
            .split_once(' ')
            .and_then(|(_, key_use)| KeyUse::decode(key_use));
        return key_use.map_or(KeyState::Unknown, KeyState::InFlight);
    }
    // Written by an older version: the bare use of an acknowledged key.
    KeyUse::decode(value).map_or(KeyState::Unknown, KeyState::Acknowledged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_use(counter: &str, by: i64) -> KeyUse {
        KeyUse {
            counter: counter.into(),
            by,
        }
    }

    #[test]
    fn states_parse() {
        assert_eq!(
            parse_state(None),
            KeyState::Claimed {
                earlier_copy: false
            }
        );
        assert_eq!(
            parse_state(Some("U 1:page:home")),
            KeyState::Claimed { earlier_copy: true }
        );
        assert_eq!(
            parse_state(Some("A -3:page:home")),
            KeyState::Acknowledged(key_use("page:home", -3))
        );
        assert_eq!(
            parse_state(Some("P 0123abcd 5:a b")),
            KeyState::InFlight(key_use("a b", 5))
        );
        assert_eq!(
            parse_state(Some("2:legacy")),
            KeyState::Acknowledged(key_use("legacy", 2))
        );
        assert_eq!(parse_state(Some("garbage")), KeyState::Unknown);
    }

    #[test]
    fn a_claim_names_its_request() {
        assert_eq!(KeyClaims::claim_value("t1", &key_use("c", 1)), "P t1 1:c");
    }
}
