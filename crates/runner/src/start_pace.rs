//! Pacing the start of a run's instances while the host is overcommitted.
//!
//! Why: instances started during a herd (thousands of runnable threads on a few CPUs, e.g.
//! 5,000 idle sdk-go runtimes waking together) compete with the instances already started for
//! the CPU, and sdk-go gives each write to the sync service one second. So before each start,
//! while the host has more runnable tasks than the limit (the sync service's fan-out limit by
//! default, 16 per CPU; run config `start_pace`), the run loop waits in steps of [`STEP`]: at most [`MAX_WAIT`] before
//! one instance and [`budget`] for the whole start, so that unrelated load slows a start but
//! never stops it. A host that keeps up costs one look at `/proc/loadavg` per instance.
//!
//! The decision is a pure core ([`StartPace::should_wait`], time passed in); the run loop does
//! the sleeping.

use std::time::Duration;

use tokio::time::Instant;

/// How often an overloaded host is looked at again.
pub(crate) const STEP: Duration = Duration::from_millis(1);

/// Longest wait before one instance.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// Longest total wait of a start of at most 2,500 instances; more add [`PER_INSTANCE`] each.
const BUDGET: Duration = Duration::from_secs(10);
const PER_INSTANCE: Duration = Duration::from_millis(4);

/// The longest a start of `instances` may wait in all.
fn budget(instances: u32) -> Duration {
    BUDGET.max(PER_INSTANCE.saturating_mul(instances))
}

/// One start's pacing.
#[derive(Debug)]
pub(crate) struct StartPace {
    /// Runnable tasks on the host above which a start waits.
    limit: u32,
    /// When the whole start stops waiting.
    until: Instant,
    /// When the current wait (before one instance) stops.
    wait_until: Option<Instant>,
    waited: Duration,
    waits: u64,
    since: Option<Instant>,
}

impl StartPace {
    /// Pacing for a start of `instances` from `now`, at `per_cpu` runnable tasks per CPU of
    /// `cpus`.
    pub(crate) fn new(per_cpu: u32, cpus: u32, instances: u32, now: Instant) -> StartPace {
        StartPace {
            limit: per_cpu.saturating_mul(cpus.max(1)),
            until: now + budget(instances),
            wait_until: None,
            waited: Duration::ZERO,
            waits: 0,
            since: None,
        }
    }

    /// Whether to wait another [`STEP`] before the next instance, given the host's runnable
    /// count now (`None`: unknown, never waits). Call again after each step; a `false`
    /// ends the wait before this instance.
    pub(crate) fn should_wait(&mut self, runnable: Option<u32>, now: Instant) -> bool {
        let overloaded = runnable.is_some_and(|r| r > self.limit);
        let end = match self.wait_until {
            Some(end) => end,
            None if overloaded && now < self.until => {
                self.waits += 1;
                let end = self.until.min(now + MAX_WAIT);
                self.wait_until = Some(end);
                self.since = Some(now);
                end
            }
            None => return false,
        };
        if overloaded && now < end {
            return true;
        }
        if let Some(since) = self.since.take() {
            self.waited += now.saturating_duration_since(since);
        }
        self.wait_until = None;
        false
    }

    /// The line for the run log, when the start waited.
    pub(crate) fn summary(&self) -> Option<String> {
        (self.waits > 0).then(|| {
            format!(
                "the start waited {:.1} s in all, before {} instance(s), while the host had more \
                 than {} runnable tasks, so that the instances already started got the CPU (run \
                 config start_pace)",
                self.waited.as_secs_f64(),
                self.waits,
                self.limit,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_calm_host_never_waits() {
        let t0 = Instant::now();
        let mut p = StartPace::new(16, 2, 100, t0);
        // 16 per CPU on 2 CPUs: 32 is not over it.
        assert!(!p.should_wait(Some(32), t0));
        assert!(!p.should_wait(None, t0));
        assert_eq!(p.summary(), None);
    }

    #[test]
    fn waits_while_overloaded_and_counts_the_wait() {
        let t0 = Instant::now();
        let mut p = StartPace::new(16, 2, 100, t0);
        assert!(p.should_wait(Some(500), t0));
        assert!(p.should_wait(Some(40), t0 + Duration::from_millis(30)));
        assert!(!p.should_wait(Some(20), t0 + Duration::from_millis(60)));
        // The next instance: calm.
        assert!(!p.should_wait(Some(3), t0 + Duration::from_millis(61)));
        let s = p.summary().unwrap();
        assert!(s.contains("0.1 s in all, before 1 instance(s)"), "{s}");
        assert!(s.contains("more than 32 runnable"), "{s}");
    }

    #[test]
    fn one_instance_waits_at_most_a_second() {
        let t0 = Instant::now();
        let mut p = StartPace::new(16, 2, 100, t0);
        assert!(p.should_wait(Some(5000), t0));
        assert!(p.should_wait(Some(5000), t0 + Duration::from_millis(999)));
        assert!(!p.should_wait(Some(5000), t0 + MAX_WAIT));
        // The next instance waits again, from its own start.
        let t1 = t0 + MAX_WAIT + Duration::from_millis(1);
        assert!(p.should_wait(Some(5000), t1));
        assert!(p.should_wait(Some(5000), t1 + Duration::from_millis(500)));
    }

    #[test]
    fn the_whole_start_waits_at_most_its_budget() {
        // 100 instances: the flat 10 s; 5,000: 4 ms each.
        assert_eq!(budget(100), BUDGET);
        assert_eq!(budget(5000), Duration::from_secs(20));
        let t0 = Instant::now();
        let mut p = StartPace::new(16, 2, 100, t0);
        let mut now = t0;
        let mut instances = 0;
        // A host overloaded for good: each instance waits its second until the budget is
        // spent, then none waits.
        loop {
            let mut waited = false;
            while p.should_wait(Some(5000), now) {
                waited = true;
                now += Duration::from_millis(100);
            }
            if !waited {
                break;
            }
            instances += 1;
            assert!(instances <= 10, "waited past the budget");
        }
        assert_eq!(instances, 10);
        assert!(now <= t0 + BUDGET + Duration::from_millis(100));
        assert!(!p.should_wait(Some(5000), now + Duration::from_secs(1)));
    }
}
