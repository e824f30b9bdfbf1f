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
//! the host has more runnable tasks than the limit (`/proc/loadavg`), the writer sleeps in
//! steps of [`POLL`], at most [`MAX_WAIT`] per chunk, so unrelated load slows a fan-out but
//! never stops it. A fan-out the host keeps up with (the sync benchmark's 10,000 waiters in one
//! client process) never waits: only the runnable count is read, once per chunk.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Writes between two looks at the host's load.
pub(crate) const CHUNK: usize = 32;

/// How often an overloaded host is looked at again.
const POLL: Duration = Duration::from_millis(1);

/// Longest wait before one chunk.
const MAX_WAIT: Duration = Duration::from_millis(20);

/// Runnable tasks per CPU above which a fan-out waits, by default: well above what unrelated
/// work makes (a build, a 2-process stress: a few per CPU), well below a herd (thousands).
pub const DEFAULT_RUNNABLE_PER_CPU: u32 = 16;

/// The default limit of runnable tasks for this host: [`DEFAULT_RUNNABLE_PER_CPU`] per CPU.
pub fn default_limit() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    DEFAULT_RUNNABLE_PER_CPU.saturating_mul(u32::try_from(cpus).unwrap_or(u32::MAX))
}

/// One service's pacing: its limit, and the pauses its fan-outs took (for
/// [`crate::ServiceStats`]).
#[derive(Debug, Clone)]
pub(crate) struct Pacer {
    limit: u32,
    pauses: Arc<AtomicU64>,
}

impl Pacer {
    pub(crate) fn new(limit: u32) -> Pacer {
        Pacer {
            limit,
            pauses: Arc::default(),
        }
    }

    pub(crate) fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Relaxed)
    }

    /// Whether the host is over the limit now.
    pub(crate) fn host_overloaded(&self) -> bool {
        runnable_tasks().is_some_and(|r| overloaded(self.limit, r))
    }

    /// Waits, up to [`MAX_WAIT`], until the host is no longer over the limit; counts one
    /// pause if it had to wait at all.
    pub(crate) async fn wait_for_cpu(&self) {
        if !self.host_overloaded() {
            return;
        }
        self.pauses.fetch_add(1, Ordering::Relaxed);
        let until = tokio::time::Instant::now() + MAX_WAIT;
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(POLL).await;
            if !self.host_overloaded() {
                return;
            }
        }
    }
}

/// Whether a host with `runnable` runnable tasks is over `limit` (the pure core).
pub(crate) fn overloaded(limit: u32, runnable: u32) -> bool {
    runnable > limit
}

/// The number of runnable tasks on the host now (`/proc/loadavg`, the fourth field's
/// numerator), or `None` where it cannot be read (then nothing is paced).
pub(crate) fn runnable_tasks() -> Option<u32> {
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

    #[test]
    fn over_the_limit_only() {
        assert!(!overloaded(32, 32));
        assert!(overloaded(32, 33));
        assert!(overloaded(0, 1));
        assert!(default_limit() >= DEFAULT_RUNNABLE_PER_CPU);
    }
}
