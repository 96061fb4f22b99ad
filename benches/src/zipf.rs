//! A Zipf-distributed choice among `n` items: item of rank `k` (0-based) is chosen with
//! probability proportional to `1 / (k + 1)^exponent`.
//!
//! Real counter traffic is skewed: a few names (the front page, a viral post) take most of the
//! increments while a long tail is touched rarely. Zipf with an exponent near 1 is the usual
//! model for that (YCSB uses 0.99), so the "many names" scenario draws its names from here.

use rand::Rng;

/// Samples ranks by inverting a precomputed cumulative distribution with a binary search:
/// O(n) memory once (800 KB for 100,000 names), O(log n) per sample, and exact for any
/// exponent, which the rejection-based samplers are not for exponents at or below 1.
#[derive(Debug, Clone)]
pub struct ZipfSampler {
    /// `cumulative_probabilities[k]` is the probability of drawing a rank `<= k`. The last
    /// entry is 1 up to rounding.
    cumulative_probabilities: Vec<f64>,
}

impl ZipfSampler {
    /// A sampler over ranks `0..number_of_items`.
    ///
    /// # Panics
    /// When `number_of_items` is 0 or `exponent` is negative or not finite: both are mistakes in
    /// the benchmark's own configuration, not conditions to recover from.
    pub fn new(number_of_items: usize, exponent: f64) -> Self {
        assert!(
            number_of_items > 0,
            "a Zipf sampler needs at least one item"
        );
        assert!(
            exponent.is_finite() && exponent >= 0.0,
            "the Zipf exponent must be a finite number >= 0, got {exponent}"
        );
        let weights: Vec<f64> = (1..=number_of_items)
            .map(|rank_from_one| 1.0 / (rank_from_one as f64).powf(exponent))
            .collect();
        let total_weight: f64 = weights.iter().sum();
        let mut running_sum = 0.0;
        let cumulative_probabilities = weights
            .iter()
            .map(|weight| {
                running_sum += weight;
                running_sum / total_weight
            })
            .collect();
        Self {
            cumulative_probabilities,
        }
    }

    pub fn number_of_items(&self) -> usize {
        self.cumulative_probabilities.len()
    }

    /// The exact probability that [`Self::sample`] returns `rank`.
    pub fn probability_of_rank(&self, rank: usize) -> f64 {
        let below = match rank {
            0 => 0.0,
            _ => self.cumulative_probabilities[rank - 1],
        };
        self.cumulative_probabilities[rank] - below
    }

    /// A rank in `0..number_of_items`, 0 being the most popular.
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let uniform: f64 = rng.random();
        let rank = self
            .cumulative_probabilities
            .partition_point(|&cumulative| cumulative <= uniform);
        // Rounding can leave the last cumulative value a hair under 1.
        rank.min(self.cumulative_probabilities.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn harmonic_number(number_of_items: usize, exponent: f64) -> f64 {
        (1..=number_of_items)
            .map(|rank| 1.0 / (rank as f64).powf(exponent))
            .sum()
    }

    #[test]
    fn probabilities_follow_the_zipf_law_and_sum_to_one() {
        let sampler = ZipfSampler::new(1_000, 1.0);
        let harmonic = harmonic_number(1_000, 1.0);
        assert!((sampler.probability_of_rank(0) - 1.0 / harmonic).abs() < 1e-12);
        assert!((sampler.probability_of_rank(9) - 1.0 / (10.0 * harmonic)).abs() < 1e-12);
        // Rank 1 is exactly half as likely as rank 0 with exponent 1.
        let ratio = sampler.probability_of_rank(0) / sampler.probability_of_rank(1);
        assert!((ratio - 2.0).abs() < 1e-9, "ratio was {ratio}");
        let total: f64 = (0..1_000)
            .map(|rank| sampler.probability_of_rank(rank))
            .sum();
        assert!((total - 1.0).abs() < 1e-9, "total was {total}");
    }

    #[test]
    fn samples_stay_in_range_and_match_the_expected_frequencies() {
        let number_of_items = 100_000;
        let sampler = ZipfSampler::new(number_of_items, 0.99);
        let mut rng = StdRng::seed_from_u64(7);
        let draws = 200_000;
        let mut counts = vec![0u64; number_of_items];
        for _ in 0..draws {
            let rank = sampler.sample(&mut rng);
            assert!(rank < number_of_items);
            counts[rank] += 1;
        }
        for rank in [0, 1, 9] {
            let expected = sampler.probability_of_rank(rank) * draws as f64;
            let observed = counts[rank] as f64;
            // Five standard deviations of a binomial count: fails by chance ~1 in 3 million.
            let tolerance = 5.0 * expected.sqrt();
            assert!(
                (observed - expected).abs() < tolerance,
                "rank {rank}: observed {observed}, expected {expected} ± {tolerance}"
            );
        }
        // The head dominates the tail: the top 1% of names take far more than 1% of draws.
        let top_one_percent: u64 = counts[..number_of_items / 100].iter().sum();
        assert!(top_one_percent as f64 > 0.5 * draws as f64);
    }

    #[test]
    fn exponent_zero_is_uniform() {
        let sampler = ZipfSampler::new(4, 0.0);
        for rank in 0..4 {
            assert!((sampler.probability_of_rank(rank) - 0.25).abs() < 1e-12);
        }
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = [0u64; 4];
        for _ in 0..40_000 {
            counts[sampler.sample(&mut rng)] += 1;
        }
        for count in counts {
            assert!((9_500..=10_500).contains(&count), "counts were {counts:?}");
        }
    }

    #[test]
    fn a_single_item_is_always_chosen() {
        let sampler = ZipfSampler::new(1, 1.2);
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(sampler.number_of_items(), 1);
        assert!((0..100).all(|_| sampler.sample(&mut rng) == 0));
    }

    #[test]
    #[should_panic(expected = "at least one item")]
    fn zero_items_is_refused() {
        let _ = ZipfSampler::new(0, 1.0);
    }
}
