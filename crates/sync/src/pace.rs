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
//! steps of [`POLL`], at most [`MAX_WAIT`] per chunk and until the fan-out's deadline
//! ([`fanout_budget`]: 10 s, more for more than 2,500 connections), so that unrelated load
//! slows a fan-out but never stops it. While the host is overloaded, the tasks that write the
//! parts of one fan-out take turns, one chunk each. A fan-out the host keeps up with (the
//! sync benchmark's 10,000 waiters in one client process) never waits: only the runnable
//! count is read, once per chunk.
//!
//! The wait must outlast the woken instances' work: capped at a few milliseconds, a release
//! of 1,000 sdk-go waiters still reached 2,000 runnable threads and failed as often as an
//! unpaced one (BENCHMARKS.md, "Barrier release herds").

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio::time::Instant;

/// Writes between two looks at the host's load.
pub(crate) const CHUNK: usize = 32;

/// How often an overloaded host is looked at again.
const POLL: Duration = Duration::from_millis(1);

/// Longest wait before one chunk.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Longest total wait of a fan-out to at most [`FANOUT_BUDGET`] / [`BUDGET_PER_CONN`]
/// connections (2,500).
const FANOUT_BUDGET: Duration = Duration::from_secs(10);

/// What each connection adds to a larger fan-out's budget. A paced release waits for the
/// released instances' own work, which grows with their number: 5,000 sdk-go instances ending
/// after their last barrier kept 2 cores busy for about 8 s, longer than the flat 10 s
/// allowed once the fan-out's parts had waited (BENCHMARKS.md, "5,000 sdk-go instances").
const BUDGET_PER_CONN: Duration = Duration::from_millis(4);

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
    /// Fan-outs that reached their deadline with the host still overloaded and let the rest
    /// go at once.
    overruns: Arc<AtomicU64>,
    /// Fan-outs given a pacer ([`Pacer::for_fanout`]): one per fan-out, however many tasks
    /// write its parts.
    fanouts: Arc<AtomicU64>,
}

/// The pacing of one fan-out ([`Pacer::for_fanout`]), shared by every task that writes part
/// of it.
#[derive(Debug, Clone)]
pub(crate) struct FanoutPacer {
    pacer: Pacer,
    /// When the fan-out stops waiting. A deadline rather than
    /// an amount to spend, because the parts of one fan-out wait side by side: charged per
    /// part, six parts spent a 20 s budget in about 3 s and released the rest as one herd.
    until: Instant,
    /// Taken by a part of the fan-out from the time it finds the host overloaded until it has
    /// written its next chunk, so that the parts release their chunks in turns while the host
    /// is overloaded (side by side, each part's look at the load let its own chunk go, and six
    /// parts overshot the limit many times over), and side by side while it keeps up.
    turn: Arc<Mutex<()>>,
    /// Connections of the whole fan-out, and whether its deadline has been reported.
    conns: usize,
    overrun: Arc<AtomicBool>,
}

/// A part's turn to write its next chunk while the host is overloaded.
pub(crate) type Turn = OwnedMutexGuard<()>;

impl Pacer {
    pub(crate) fn new(limit: u32, source: RunnableSource) -> Pacer {
        Pacer {
            limit,
            source,
            pauses: Arc::default(),
            overruns: Arc::default(),
            fanouts: Arc::default(),
        }
    }

    /// The pacer of one fan-out to `conns` connections: the same limit and counter, and a
    /// deadline [`fanout_budget`] from now shared by every task that writes part of it.
    pub(crate) fn for_fanout(&self, conns: usize) -> FanoutPacer {
        self.fanouts.fetch_add(1, Ordering::Relaxed);
        FanoutPacer {
            pacer: self.clone(),
            until: Instant::now() + fanout_budget(conns),
            turn: Arc::default(),
            conns,
            overrun: Arc::default(),
        }
    }

    pub(crate) fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Relaxed)
    }

    pub(crate) fn overruns(&self) -> u64 {
        self.overruns.load(Ordering::Relaxed)
    }

    pub(crate) fn fanouts(&self) -> u64 {
        self.fanouts.load(Ordering::Relaxed)
    }

    /// Whether the host is over the limit now.
    pub(crate) fn host_overloaded(&self) -> bool {
        (self.source)().is_some_and(|r| overloaded(self.limit, r))
    }
}

impl FanoutPacer {
    /// Whether the host is over the limit now.
    pub(crate) fn host_overloaded(&self) -> bool {
        self.pacer.host_overloaded()
    }

    /// Waits, up to [`MAX_WAIT`] and the fan-out's deadline, until the host is no longer over
    /// the limit; counts one pause if it found the host overloaded. Returns the turn to hold
    /// while writing the next chunk when it waited (the other parts wait for it, up to the
    /// deadline).
    pub(crate) async fn wait_for_cpu(&self) -> Option<Turn> {
        if !self.host_overloaded() {
            return None;
        }
        if Instant::now() >= self.until {
            self.note_overrun();
            return None;
        }
        self.pacer.pauses.fetch_add(1, Ordering::Relaxed);
        let turn = tokio::time::timeout_at(self.until, Arc::clone(&self.turn).lock_owned()).await;
        let Ok(turn) = turn else {
            self.note_overrun();
            return None;
        };
        // The part before us may have brought the load down meanwhile.
        if !self.host_overloaded() {
            return Some(turn);
        }
        let end = self.until.min(Instant::now() + MAX_WAIT);
        while Instant::now() < end {
            tokio::time::sleep(POLL.min(end - Instant::now())).await;
            if !self.host_overloaded() {
                break;
            }
        }
        Some(turn)
    }

    /// Counts and reports, once per fan-out, that its deadline passed while the host was
    /// still overloaded: the rest of it is written at once, the herd pacing is there to
    /// avoid. Said, because a test's instances may then miss their own deadlines.
    fn note_overrun(&self) {
        if !self.overrun.swap(true, Ordering::Relaxed) {
            self.pacer.overruns.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                connections = self.conns,
                budget_secs = fanout_budget(self.conns).as_secs_f64(),
                "sync: a fan-out (a barrier's release or a topic's item) to {} connections \
                 waited its whole pacing budget for the overloaded host's CPUs; the rest of \
                 it goes out at once",
                self.conns
            );
        }
    }
}

/// The longest a fan-out to `conns` connections may wait in all: [`FANOUT_BUDGET`], or
/// [`BUDGET_PER_CONN`] per connection when that is more.
pub(crate) fn fanout_budget(conns: usize) -> Duration {
    let per_conn = BUDGET_PER_CONN.saturating_mul(u32::try_from(conns).unwrap_or(u32::MAX));
    FANOUT_BUDGET.max(per_conn)
}

/// Whether a host with `runnable` runnable tasks is over `limit` (the pure core).
pub(crate) fn overloaded(limit: u32, runnable: u32) -> bool {
    runnable > limit
}

/// The number of runnable tasks on the host now (`/proc/loadavg`, the fourth field's
/// numerator), or `None` where it cannot be read (then nothing is paced).
pub fn runnable_tasks() -> Option<u32> {
    use std::os::unix::fs::FileExt;
    // One open file, read from offset 0 each time (the kernel builds the text anew on each
    // read): about 1 µs a look against 4-5 µs to open, read and close it, and a
    // 10,000-waiter release looks about 300 times.
    static LOADAVG: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    let file = LOADAVG
        .get_or_init(|| std::fs::File::open("/proc/loadavg").ok())
        .as_ref()?;
    let mut buf = [0u8; 128];
    let n = file.read_at(&mut buf, 0).ok()?;
    parse_loadavg(std::str::from_utf8(&buf[..n]).ok()?)
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
        // Again, from the file held open since.
        assert!(runnable_tasks().is_some_and(|r| r >= 1));
    }

    fn always_over() -> Option<u32> {
        Some(u32::MAX)
    }

    /// A host that stays overcommitted slows a fan-out by its budget at most, then lets it go;
    /// parts of one fan-out that wait side by side share that deadline.
    #[tokio::test(start_paused = true)]
    async fn a_fan_out_waits_no_longer_than_its_budget() {
        let pacer = Pacer::new(0, always_over).for_fanout(100);
        let start = tokio::time::Instant::now();
        for _ in 0..20 {
            pacer.wait_for_cpu().await;
        }
        let waited = start.elapsed();
        assert!(waited >= FANOUT_BUDGET, "{waited:?}");
        assert!(waited < FANOUT_BUDGET + MAX_WAIT, "{waited:?}");
        let service = &pacer.pacer;
        assert_eq!(service.pauses(), 10, "one full wait per second of budget");
        assert_eq!(
            service.overruns(),
            1,
            "the deadline is counted once per fan-out"
        );
        // The next fan-out has a budget of its own; the counter is the service's.
        let next = service.for_fanout(100);
        let start = tokio::time::Instant::now();
        next.wait_for_cpu().await;
        assert!(start.elapsed() >= MAX_WAIT);
        assert_eq!(service.pauses(), 11);
        // Three parts waiting at once are done by the one deadline, not three budgets later.
        let fanout = service.for_fanout(100);
        let start = tokio::time::Instant::now();
        let parts: Vec<_> = (0..3)
            .map(|_| {
                let p = fanout.clone();
                tokio::spawn(async move {
                    for _ in 0..20 {
                        p.wait_for_cpu().await;
                    }
                })
            })
            .collect();
        for part in parts {
            part.await.unwrap();
        }
        let waited = start.elapsed();
        assert!(waited >= FANOUT_BUDGET, "{waited:?}");
        assert!(waited < FANOUT_BUDGET + MAX_WAIT, "{waited:?}");
        assert_eq!(
            service.overruns(),
            2,
            "one more for the third fan-out, none for the second"
        );
    }

    /// While the host is overloaded the parts of one fan-out take turns: the second waits
    /// for the first to write its chunk before its own wait begins.
    #[tokio::test(start_paused = true)]
    async fn parts_take_turns_while_the_host_is_overloaded() {
        let fanout = Pacer::new(0, always_over).for_fanout(100);
        let start = tokio::time::Instant::now();
        let first = fanout.wait_for_cpu().await.expect("a turn");
        assert_eq!(start.elapsed(), MAX_WAIT);
        let other = fanout.clone();
        let second = tokio::spawn(async move {
            let turn = other.wait_for_cpu().await;
            (turn.is_some(), start.elapsed())
        });
        // The first part writes its chunk for 5 ms, then gives the turn back.
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(first);
        let (got, when) = second.await.unwrap();
        assert!(got);
        assert_eq!(when, MAX_WAIT * 2 + Duration::from_millis(5));
        // A host that keeps up gives no turn to wait for.
        let calm = Pacer::new(u32::MAX, always_over).for_fanout(100);
        assert!(calm.wait_for_cpu().await.is_none());
        assert_eq!(calm.pacer.overruns(), 0);
    }

    /// A fan-out to thousands may wait longer, in proportion; a small one gets the floor.
    #[tokio::test(start_paused = true)]
    async fn a_large_fan_out_has_a_budget_in_proportion() {
        assert_eq!(fanout_budget(0), FANOUT_BUDGET);
        assert_eq!(fanout_budget(1_000), FANOUT_BUDGET);
        assert_eq!(fanout_budget(5_000), Duration::from_secs(20));
        let pacer = Pacer::new(0, always_over).for_fanout(5_000);
        let start = tokio::time::Instant::now();
        for _ in 0..40 {
            pacer.wait_for_cpu().await;
        }
        let waited = start.elapsed();
        assert!(waited >= Duration::from_secs(20), "{waited:?}");
        assert!(waited < Duration::from_secs(20) + MAX_WAIT, "{waited:?}");
    }

    #[test]
    fn over_the_limit_only() {
        assert!(!overloaded(32, 32));
        assert!(overloaded(32, 33));
        assert!(overloaded(0, 1));
        assert!(default_limit() >= DEFAULT_RUNNABLE_PER_CPU);
    }
}
