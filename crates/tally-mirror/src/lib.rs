//! # tally-mirror
//!
//! Redis holds a mirror of PostgreSQL that reads can use without asking PostgreSQL: per counter,
//! a summary of what PostgreSQL holds, and per window the deltas the ingest added after Kafka
//! acknowledged them. This crate owns that mirror, whole: the key layout ([`keys`]), the Lua
//! scripts ([`scripts`]), the value formula ([`value`]), the summaries ([`summary`]), closed
//! windows ([`closed`]), the ingest's deltas ([`deltas`]) and marks of sets in flight
//! ([`pending_sets`]), the aggregator's copies and repairs
//! ([`commit`], [`repair`]), the readers' trust rules ([`read`]) and the rebuild ([`rebuild`]).
//! No other crate reads or writes a mirror key.
//!
//! ## The invariants it keeps
//! 1. **Redis never decides a count.** The summaries are copies of PostgreSQL rows, written only
//!    from a commit's result or a PostgreSQL snapshot; a summary only moves to a newer version.
//! 2. **A read never shows less than PostgreSQL holds.** Per window and per sign, a read adds
//!    only what the deltas hold beyond the records the aggregator applied ([`value`]): a lost or
//!    evicted delta costs freshness until its window is applied, never a count.
//! 3. **A bucket that lost data is never trusted.** Counters live in 1024 buckets ([`bucket`]),
//!    each one Redis hash holding its counters' summaries and its markers: an epoch, the first
//!    window its deltas are complete from, and per Kafka partition the generation up to which
//!    that partition's commits are in it. Redis evicts a hash whole, and a restart, a rollback or
//!    a failover takes the markers back with the summaries, so:
//!    - no epoch: lost (flushed, evicted, an empty restart);
//!    - a marker below the partition's previous generation in PostgreSQL: rolled back, or it
//!      missed commits while Redis was unreachable;
//!    - a counter missing from a trusted bucket: new, never lost.
//!
//!    Readers answer from PostgreSQL, flagged stale, for the counters of an untrusted bucket
//!    ([`read`]); a reader that finds it talks to another Redis server (a restart, a failover)
//!    checks the markers against a view of PostgreSQL taken after that.
//! 4. **Loss is healed bucket by bucket.** Every aggregator commit visits every bucket and finds
//!    the lost and rolled-back ones; the aggregator repairs them from PostgreSQL ([`commit`]), as
//!    does `tally replay` ([`rebuild`]). A repair writes only while the bucket keeps the epoch it
//!    started from, so a bucket lost again mid-repair is never marked complete.
//! 5. **A closed window is published only once its commits are in every bucket**, so a read that
//!    takes a window from the summary's total finds it there.
//! 6. **A set is never hidden by the deltas.** A set adds no delta; a read does not trust a
//!    counter whose set may still be on its way into the summary ([`pending_sets`]).

pub mod bucket;
pub mod closed;
pub mod commit;
pub mod deltas;
pub mod keys;
pub mod pending_sets;
pub mod read;
pub mod rebuild;
mod repair;
mod scripts;
pub mod store;
pub mod summary;
pub mod value;

pub use bucket::{BUCKETS, bucket_of};
pub use closed::{ClosedWindows, publish_closed_windows, read_closed_windows};
pub use commit::{ApplyReport, CommitToMirror, PartitionMark, RepairPolicy};
pub use deltas::{DeltaPipeline, DeltaWriter};
pub use keys::KeySpace;
pub use pending_sets::PendingSets;
pub use read::{MarkerFloors, MirrorRead, Untrusted};
pub use rebuild::{RebuildError, RebuildProgress, RebuildReport, RebuildSettings};
pub use repair::RepairOutcome;
pub use store::{Generations, PartitionGenerations};
pub use summary::{CommittedCounter, CounterSummary, WindowRecords};

use tally_core::WindowSpec;

/// How many windows before the oldest closed one summaries keep window records for. Readers
/// only need the windows after the closed one they know; the margin covers readers whose view of
/// it is a little old.
pub const SUMMARY_WINDOW_MARGIN: i64 = 12;

/// The mirror of one Tally deployment: its keys and the timing its rules rest on.
#[derive(Clone, Debug)]
pub struct Mirror {
    keys: KeySpace,
    window: WindowSpec,
    delta_ttl_ms: i64,
}

impl Mirror {
    pub fn new(keys: KeySpace, window: WindowSpec, delta_ttl_ms: i64) -> Self {
        Self {
            keys,
            window,
            delta_ttl_ms,
        }
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }
}
