//! Which bucket of the mirror a counter lives in.
//!
//! A bucket is one Redis hash holding the summaries of its counters together with the markers
//! that say how far they are complete (see [`crate::keys`]). Loss is detected, and healed, one
//! bucket at a time: Redis evicts a hash whole, and in Redis Cluster a bucket lives on one node.

use md5::{Digest as _, Md5};

/// How many buckets there are. PostgreSQL computes the same bucket for every counter
/// (`counters.bucket`, a generated column); changing this number needs a migration.
pub const BUCKETS: u32 = 1024;

/// The first 32 bits of `md5(name)`, big-endian, modulo [`BUCKETS`]: exactly what the
/// `counters.bucket` column computes as `('x' || substr(md5(name), 1, 8))::bit(32)::int & 1023`.
pub fn bucket_of(name: &str) -> u32 {
    let digest = Md5::digest(name.as_bytes());
    let first_four = [digest[0], digest[1], digest[2], digest[3]];
    u32::from_be_bytes(first_four) & (BUCKETS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_what_postgres_computes() {
        // md5('page:home') = ff6e164e…, md5('a') = 0cc175b9…, as PostgreSQL's md5() says.
        assert_eq!(bucket_of("page:home"), 0xff6e164e & 1023);
        assert_eq!(bucket_of("page:home"), 590);
        assert_eq!(bucket_of("a"), 441);
        assert_eq!(bucket_of("👍 likes"), 696);
    }

    #[test]
    fn buckets_are_below_the_bucket_count() {
        assert!((0..10_000).all(|i| bucket_of(&format!("n{i}")) < BUCKETS));
    }
}
