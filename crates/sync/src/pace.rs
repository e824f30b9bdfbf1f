//! Pacing a large fan-out (a barrier released to thousands of waiters, an item for thousands
//! of subscribers) while the host's CPUs are overcommitted.
//!
//! Why: every released instance wakes at once and needs the CPU to answer. With a thousand
//! sdk-go instances on two cores that is over 2,000 runnable threads; an instance then waits
//! long enough between taking a request's context and writing the request that sdk-go's
//! one-second write deadline fires and its websocket closes (a false failure of the test, seen
//! with 1,000 instances on this project's 2-core machines). Released in slices, each slice gets
//! the CPU while the rest still wait in their barrier, where no deadline runs. The work done is
//! the same; only its order changes.
//!
//! How: the writes are made in chunks of [`CHUNK`]; before each chunk after the first, while
//! the host has more runnable tasks (`/proc/loadavg`) than the limit, the writer sleeps in
//! steps of [`POLL`], at most [`MAX_WAIT`] per chunk and [`FANOUT_BUDGET`] per fan-out, so that
//! unrelated load slows a fan-out but never stops it. A fan-out the host keeps up with (the
//! sync benchmark's 10,000 waiters in one client process) never waits: only the runnable
//! count is read, once per chunk.
//!
//! The wait must outlast the woken instances' work: capped at a few milliseconds, a release
//! of 1,000 sdk-go waiters still reached 2,000 runnable threads and failed as often as an
//! unpaced one (BENCHMARKS.md, "Barrier release herds").

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Writes between two looks at the host's load.
pub(crate) const CHUNK: usize = 32;

/// How often an overloaded host is looked at again.
const POLL: Duration = Duration::from_millis(1);

/// Longest wait before one chunk.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Longest total wait of one fan-out.
const FANOUT_BUDGET: Duration = Duration::from_secs(10);

/// Runnable tasks per CPU above which a fan-out waits, by default: well above what unrelated
/// work makes (a build, a 2-process stress: a few per CPU), well below a herd (thousands).
pub const DEFAULT_RUNNABLE_PER_CPU: u32 = 16;

/// The default limit of runnable tasks for this host: [`DEFAULT_RUNNABLE_PER_CPU`] per CPU.
pub fn default_limit() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    DEFAULT_RUNNABLE_PER_CPU.saturating_mul(u32::try_from(cpus).unwrap_or(u32::MAX))
}

/// Where a pacer reads the number of runnable tasks ([`runnable_tasks`], or a test's).
pub type RunnableSource = fn() -> Option<u32>;

/// One service's pacing: its limit, where it reads the load, and the pauses its fan-outs took
/// (for [`crate::ServiceStats`]).
#[derive(Debug, Clone)]
pub(crate) struct Pacer {
    limit: u32,
    source: RunnableSource,
    pauses: Arc<AtomicU64>,
    /// What the current fan-out may still wait, in ms ([`Pacer::for_fanout`]).
    budget_ms: Arc<AtomicU64>,
}

impl Pacer {
    pub(crate) fn new(limit: u32, source: RunnableSource) -> Pacer {
        Pacer {
            limit,
            source,
            pauses: Arc::default(),
            budget_ms: Arc::new(AtomicU64::new(FANOUT_BUDGET.as_millis() as u64)),
        }
    }

    /// The pacer of one fan-out: the same limit and counter, a fresh [`FANOUT_BUDGET`] shared
    /// by every task that writes part of it.
    pub(crate) fn for_fanout(&self) -> Pacer {
        Pacer {
            budget_ms: Arc::new(AtomicU64::new(FANOUT_BUDGET.as_millis() as u64)),
            ..self.clone()
        }
    }

    pub(crate) fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Relaxed)
    }

    /// Whether the host is over the limit now.
    pub(crate) fn host_overloaded(&self) -> bool {
        (self.source)().is_some_and(|r| overloaded(self.limit, r))
    }

    /// Waits, up to [`MAX_WAIT`] and what is left of the fan-out's budget, until the host is
    /// no longer over the limit; counts one pause if it had to wait at all.
    pub(crate) async fn wait_for_cpu(&self) {
        if self.budget_ms.load(Ordering::Relaxed) == 0 || !self.host_overloaded() {
            return;
        }
        self.pauses.fetch_add(1, Ordering::Relaxed);
        let start = tokio::time::Instant::now();
        let mut spent = 0;
        while spent < MAX_WAIT.as_millis() as u64 {
            tokio::time::sleep(POLL).await;
            spent = start.elapsed().as_millis() as u64;
            if !self.host_overloaded() || !self.spend(spent) {
                break;
            }
        }
        self.charge(spent);
    }

    /// Whether the fan-out's budget still covers `spent` ms of this wait.
    fn spend(&self, spent: u64) -> bool {
        self.budget_ms.load(Ordering::Relaxed) > spent
    }

    fn charge(&self, spent: u64) {
        let _ = self
            .budget_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(spent))
            });
    }
}

/// Whether a host with `runnable` runnable tasks is over `limit` (the pure core).
pub(crate) fn overloaded(limit: u32, runnable: u32) -> bool {
    runnable > limit
}

/// The number of runnable tasks on the host now (`/proc/loadavg`, the fourth field's
/// numerator), or `None` where it cannot be read (then nothing is paced).
pub fn runnable_tasks() -> Option<u32> {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

fn parse_loadavg(text: &str) -> Option<u32> {
    text.split_whitespace()
        .nth(3)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_runnable_count_of_loadavg() {
        assert_eq!(parse_loadavg("0.52 0.58 0.59 3/827 12345\n"), Some(3));
        assert_eq!(
            parse_loadavg("7640.47 3413.19 1446.54 8588/26525 1542"),
            Some(8588)
        );
        assert_eq!(parse_loadavg("0.52 0.58"), None);
        assert_eq!(parse_loadavg("a b c x/1 2"), None);
        // This host's own file parses, and counts at least the reader.
        assert!(runnable_tasks().is_some_and(|r| r >= 1));
    }

    fn always_over() -> Option<u32> {
        Some(u32::MAX)
    }

    /// A host that stays overcommitted slows a fan-out by its budget at most, then lets it go.
    #[tokio::test(start_paused = true)]
    async fn a_fan_out_waits_no_longer_than_its_budget() {
        let pacer = Pacer::new(0, always_over).for_fanout();
        let start = tokio::time::Instant::now();
        for _ in 0..20 {
            pacer.wait_for_cpu().await;
        }
        let waited = start.elapsed();
        assert!(waited >= FANOUT_BUDGET, "{waited:?}");
        assert!(waited < FANOUT_BUDGET + MAX_WAIT, "{waited:?}");
        assert_eq!(pacer.pauses(), 10, "one full wait per second of budget");
        // The next fan-out has a budget of its own; the counter is the service's.
        let next = pacer.for_fanout();
        let start = tokio::time::Instant::now();
        next.wait_for_cpu().await;
        assert!(start.elapsed() >= MAX_WAIT);
        assert_eq!(pacer.pauses(), 11);
    }

    #[test]
    fn over_the_limit_only() {
        assert!(!overloaded(32, 32));
        assert!(overloaded(32, 33));
        assert!(overloaded(0, 1));
        assert!(default_limit() >= DEFAULT_RUNNABLE_PER_CPU);
    }
}
