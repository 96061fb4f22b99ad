//! The aggregator's memory through a long PostgreSQL outage.
//!
//! While PostgreSQL is down the aggregator cannot commit, so everything it consumes stays in
//! memory as pending `(counter, window)` rows. It must stop consuming once it holds
//! `TALLY_AGGREGATOR_MAX_PENDING` rows and resume after a commit, so its resident memory stays
//! bounded however long the outage lasts. The runner samples `VmRSS` from `/proc/<pid>/status`
//! once a second and checks the peaks during and after the outage against the peak before it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often the aggregator's memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// What the scenario holds the aggregator to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregatorMemoryBound {
    /// Passed to the scenario's Tally processes as `TALLY_AGGREGATOR_MAX_PENDING`.
    pub max_pending_rows: u64,
    /// How much the aggregator's `VmRSS` may grow, during the outage and the catch-up after it,
    /// above its peak under the same load before the outage.
    pub rss_growth_limit_mib: u64,
}

/// One sample: the aggregator's resident memory at a moment of the scenario clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssSample {
    pub at: Duration,
    pub rss_kib: u64,
}

/// The peak of each phase, in KiB; `None` when no sample fell in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RssPeaks {
    pub before: Option<u64>,
    pub during: Option<u64>,
    pub after: Option<u64>,
}

/// Splits `samples` around the outage `[started_at, healed_at]`.
pub fn peaks(samples: &[RssSample], started_at: Duration, healed_at: Duration) -> RssPeaks {
    let peak_of = |keep: &dyn Fn(Duration) -> bool| {
        samples
            .iter()
            .filter(|sample| keep(sample.at))
            .map(|sample| sample.rss_kib)
            .max()
    };
    RssPeaks {
        before: peak_of(&|at| at < started_at),
        during: peak_of(&|at| at >= started_at && at <= healed_at),
        after: peak_of(&|at| at > healed_at),
    }
}

/// `Some(why)` when the peaks break the bound (or cannot be judged).
pub fn bound_broken(peaks: &RssPeaks, bound: &AggregatorMemoryBound) -> Option<String> {
    let Some(before) = peaks.before else {
        return Some("no memory sample before the outage to compare with".to_owned());
    };
    let limit = before + bound.rss_growth_limit_mib * 1024;
    let worst = peaks.during.into_iter().chain(peaks.after).max()?;
    (worst > limit).then(|| {
        format!(
            "the aggregator's VmRSS reached {} MiB, above the bound of {} MiB (its peak of {} MiB before the outage + {} MiB) with TALLY_AGGREGATOR_MAX_PENDING={}",
            worst / 1024,
            limit / 1024,
            before / 1024,
            bound.rss_growth_limit_mib,
            bound.max_pending_rows
        )
    })
}

/// `VmRSS` of `/proc/<pid>/status`, in KiB.
fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// The resident memory of the process whose pid `pid_file` holds, if that process still runs
/// `binary` (a pid file of a process that is gone, or a recycled pid, gives nothing).
async fn rss_of(pid_file: &Path, binary: &Path) -> Option<u64> {
    let pid: u32 = tokio::fs::read_to_string(pid_file)
        .await
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let command_line = tokio::fs::read(format!("/proc/{pid}/cmdline")).await.ok()?;
    let binary = binary.to_string_lossy();
    if !String::from_utf8_lossy(&command_line).starts_with(binary.as_ref()) {
        return None;
    }
    let status = tokio::fs::read_to_string(format!("/proc/{pid}/status"))
        .await
        .ok()?;
    parse_vm_rss_kib(&status)
}

/// Samples the process of `pid_file` once a second until `stop` is set. The pid is read anew
/// every time, so a restarted aggregator is followed.
pub async fn sample_rss(
    pid_file: PathBuf,
    binary: PathBuf,
    clock: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<RssSample> {
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Some(rss_kib) = rss_of(&pid_file, &binary).await {
            samples.push(RssSample {
                at: clock.elapsed(),
                rss_kib,
            });
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(second: u64, mib: u64) -> RssSample {
        RssSample {
            at: Duration::from_secs(second),
            rss_kib: mib * 1024,
        }
    }

    const BOUND: AggregatorMemoryBound = AggregatorMemoryBound {
        max_pending_rows: 50_000,
        rss_growth_limit_mib: 100,
    };

    #[test]
    fn vm_rss_is_read_from_proc_status() {
        let status = "Name:\ttally\nVmPeak:\t  900 kB\nVmRSS:\t   123456 kB\nThreads:\t9\n";
        assert_eq!(parse_vm_rss_kib(status), Some(123_456));
        assert_eq!(parse_vm_rss_kib("Name:\tzombie\n"), None);
    }

    #[test]
    fn peaks_are_split_around_the_outage() {
        let samples = [sample(1, 50), sample(2, 60), sample(5, 90), sample(9, 70)];
        assert_eq!(
            peaks(&samples, Duration::from_secs(3), Duration::from_secs(8)),
            RssPeaks {
                before: Some(60 * 1024),
                during: Some(90 * 1024),
                after: Some(70 * 1024),
            }
        );
    }

    #[test]
    fn growth_above_the_limit_breaks_the_bound_wherever_it_happens() {
        let within = RssPeaks {
            before: Some(60 * 1024),
            during: Some(160 * 1024),
            after: Some(100 * 1024),
        };
        assert_eq!(bound_broken(&within, &BOUND), None);
        let during = RssPeaks {
            during: Some(161 * 1024),
            ..within
        };
        assert!(
            bound_broken(&during, &BOUND)
                .unwrap()
                .contains("reached 161 MiB, above the bound of 160 MiB")
        );
        // The catch-up after the outage counts too: one huge commit is no better.
        let after = RssPeaks {
            after: Some(400 * 1024),
            ..within
        };
        assert!(bound_broken(&after, &BOUND).is_some());
    }

    #[test]
    fn without_a_baseline_the_bound_cannot_be_judged() {
        let peaks = RssPeaks {
            before: None,
            during: Some(10),
            after: None,
        };
        assert!(bound_broken(&peaks, &BOUND).is_some());
    }
}
