//! Cleanup that need not delay a run's outcome: removing its temp directories (20,000 of them
//! for 10,000 instances take many seconds) and then its tracking record. Jobs run one after
//! the other on a single thread, so cleanup never competes with itself for the disk and its
//! cost is bounded whatever the number of runs. Each job is also on record: a run's record is
//! removed only by its last job, so if this process dies first, the next engine start finds
//! the record and finishes the job (`tracking::clean_leftovers`). [`wait_for_cleanup`] lets a
//! short-lived process (the embedded CLI) finish the queue before it exits.

use std::sync::{Condvar, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send>;

struct Cleaner {
    tx: Mutex<mpsc::Sender<Job>>,
    pending: Mutex<usize>,
    idle: Condvar,
}

/// Lets a test hold the cleanup thread between jobs.
#[cfg(test)]
pub(crate) static GATE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cleaner() -> &'static Cleaner {
    static CLEANER: OnceLock<Cleaner> = OnceLock::new();
    CLEANER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("tg-cleanup".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    #[cfg(test)]
                    let gate = GATE.blocking_lock();
                    job();
                    #[cfg(test)]
                    drop(gate);
                    let c = cleaner();
                    let mut p = c.pending.lock().unwrap_or_else(|e| e.into_inner());
                    *p = p.saturating_sub(1);
                    if *p == 0 {
                        c.idle.notify_all();
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the cleanup thread; cleaning inline");
        }
        Cleaner {
            tx: Mutex::new(tx),
            pending: Mutex::new(0),
            idle: Condvar::new(),
        }
    })
}

/// Runs `job` on the cleanup thread, after the jobs queued before it.
pub(crate) fn defer(job: impl FnOnce() + Send + 'static) {
    let c = cleaner();
    *c.pending.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    let sent =
        c.tx.lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Box::new(job));
    if let Err(mpsc::SendError(job)) = sent {
        // No cleanup thread: do it here rather than not at all.
        job();
        *c.pending.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
    }
}

/// Waits until every queued cleanup job is done, at most `timeout`. Returns whether the queue
/// is empty; what is left is on record for the next engine start.
pub fn wait_for_cleanup(timeout: Duration) -> bool {
    let c = cleaner();
    let deadline = Instant::now() + timeout;
    let mut p = c.pending.lock().unwrap_or_else(|e| e.into_inner());
    while *p > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        p = match c.idle.wait_timeout(p, left) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        };
    }
    true
}
