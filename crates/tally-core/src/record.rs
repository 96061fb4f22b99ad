//! The Kafka wire format of a counter's records: increments and sets.
//!
//! The record key is the counter name's UTF-8 bytes, so every record of one counter lands in
//! one partition and stays in order. The value is a small JSON object. One increment record may
//! carry the sum of several increments of the same counter (a batch, or coalesced requests); the
//! ones that carry an idempotency key are listed with their own amounts, so the aggregator can
//! drop exactly the ones it has applied before. A set record replaces the counter's value with
//! its own: what came before it in the partition is replaced, what comes after adds on top.

use serde::{Deserialize, Serialize};

/// The current version of the value format.
const FORMAT_VERSION: u8 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncrementRecord {
    #[serde(rename = "v")]
    pub format_version: u8,
    /// Start of the window the increments arrived in, in Unix milliseconds.
    #[serde(rename = "w")]
    pub window_start_ms: i64,
    /// The sum of the increments this record carries.
    pub by: i64,
    /// How many API increments this record carries.
    #[serde(rename = "n")]
    pub increments: u32,
    /// The increments of `by` that carry an idempotency key.
    #[serde(rename = "keys", default, skip_serializing_if = "Vec::is_empty")]
    pub keyed: Vec<KeyedIncrement>,
}

/// One increment that carries an idempotency key: it counts once however often it is sent.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyedIncrement {
    #[serde(rename = "k")]
    pub key: String,
    pub by: i64,
}

/// An audited set of a counter's value (a reset is a set to 0).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRecord {
    #[serde(rename = "v")]
    pub format_version: u8,
    /// Start of the window the set arrived in, in Unix milliseconds.
    #[serde(rename = "w")]
    pub window_start_ms: i64,
    /// The value the counter takes.
    pub set: i64,
    /// What the audit trail keeps of the request.
    pub audit: SetAudit,
}

/// Who asked for a set, when and why: the aggregator writes it to the audit trail in the same
/// transaction that applies the set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAudit {
    /// Unique per request: the audit row's key, so a record read twice is audited once.
    pub id: String,
    /// The identity the request authenticated as.
    pub actor: String,
    /// The client's address.
    pub client: String,
    pub reason: String,
    /// When the request was accepted, in Unix milliseconds.
    pub requested_at_ms: i64,
}

/// One record of a counter's partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CounterRecord {
    Increment(IncrementRecord),
    Set(SetRecord),
}

impl CounterRecord {
    /// Decodes either kind in one pass: only a set has a `set` member.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        #[derive(Deserialize)]
        struct Wire {
            v: u8,
            w: i64,
            by: Option<i64>,
            n: Option<u32>,
            #[serde(default)]
            keys: Vec<KeyedIncrement>,
            set: Option<i64>,
            audit: Option<SetAudit>,
        }
        let wire: Wire = serde_json::from_slice(bytes)?;
        if wire.v != FORMAT_VERSION {
            return Err(RecordError::UnknownVersion(wire.v));
        }
        match (wire.set, wire.audit, wire.by, wire.n) {
            (Some(value), Some(audit), None, None) => Ok(Self::Set(SetRecord {
                format_version: wire.v,
                window_start_ms: wire.w,
                set: value,
                audit,
            })),
            (None, None, Some(by), Some(increments)) => Ok(Self::Increment(IncrementRecord {
                format_version: wire.v,
                window_start_ms: wire.w,
                by,
                increments,
                keyed: wire.keys,
            })),
            _ => Err(RecordError::NeitherKind),
        }
    }
}

impl SetAudit {
    /// The audit with every NUL replaced: PostgreSQL's text cannot hold one, and a record the
    /// commit could never write would stop its partition for good. The ingest refuses control
    /// characters; this covers records written by anything else.
    pub fn storable(self) -> Self {
        let clean = |text: String| {
            if text.contains('\0') {
                text.replace('\0', "\u{FFFD}")
            } else {
                text
            }
        };
        Self {
            id: clean(self.id),
            actor: clean(self.actor),
            client: clean(self.client),
            reason: clean(self.reason),
            requested_at_ms: self.requested_at_ms,
        }
    }
}

impl SetRecord {
    pub fn new(window_start_ms: i64, value: i64, audit: SetAudit) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            window_start_ms,
            set: value,
            audit,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a set record should always serialize")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("the record value is not a valid record: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("the record is neither an increment (`by` and `n`) nor a set (`set` and `audit`)")]
    NeitherKind,
    #[error("the record has format version {0}, which this build does not know")]
    UnknownVersion(u8),
}

impl IncrementRecord {
    pub fn new(window_start_ms: i64, by: i64, increments: u32, keyed: Vec<KeyedIncrement>) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            window_start_ms,
            by,
            increments,
            keyed,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an increment record should always serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        match CounterRecord::decode(bytes)? {
            CounterRecord::Increment(record) => Ok(record),
            CounterRecord::Set(_) => Err(RecordError::NeitherKind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let keyed = vec![KeyedIncrement {
            key: "k1".into(),
            by: -4,
        }];
        let record = IncrementRecord::new(1_700_000_000_000, -3, 2, keyed);
        let bytes = record.encode();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"v":1,"w":1700000000000,"by":-3,"n":2,"keys":[{"k":"k1","by":-4}]}"#
        );
        assert_eq!(IncrementRecord::decode(&bytes).unwrap(), record);
    }

    #[test]
    fn sets_and_increments_decode_as_their_kind() {
        let audit = SetAudit {
            id: "a1".into(),
            actor: "admin".into(),
            client: "127.0.0.1".into(),
            reason: "migrated".into(),
            requested_at_ms: 5,
        };
        let set = SetRecord::new(1_000, 42, audit);
        assert_eq!(
            CounterRecord::decode(&set.encode()).unwrap(),
            CounterRecord::Set(set)
        );
        let increment = IncrementRecord::new(1_000, 3, 1, Vec::new());
        assert_eq!(
            CounterRecord::decode(&increment.encode()).unwrap(),
            CounterRecord::Increment(increment)
        );
        assert!(matches!(
            CounterRecord::decode(br#"{"v":9,"w":0,"by":1,"n":1}"#),
            Err(RecordError::UnknownVersion(9))
        ));
        assert!(matches!(
            CounterRecord::decode(br#"{"v":1,"w":0}"#),
            Err(RecordError::NeitherKind)
        ));
        assert!(matches!(
            CounterRecord::decode(br#"{"v":1,"w":0,"by":1,"n":1,"set":3}"#),
            Err(RecordError::NeitherKind)
        ));
    }

    #[test]
    fn an_audit_is_made_storable_in_postgres() {
        let audit = SetAudit {
            id: "a\0".into(),
            actor: "admin".into(),
            client: "::1".into(),
            reason: "x\0y".into(),
            requested_at_ms: 1,
        }
        .storable();
        assert_eq!(
            (audit.id.as_str(), audit.reason.as_str()),
            ("a\u{FFFD}", "x\u{FFFD}y")
        );
    }

    #[test]
    fn rejects_garbage_and_unknown_versions() {
        assert!(IncrementRecord::decode(b"not json").is_err());
        assert!(matches!(
            IncrementRecord::decode(br#"{"v":9,"w":0,"by":1,"n":1}"#),
            Err(RecordError::UnknownVersion(9))
        ));
    }
}
