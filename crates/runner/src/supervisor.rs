//! The one place that knows every instance's state. Instance tasks (and the sync-event
//! forwarder) send [`InstanceReport`]s; the supervisor turns them into [`InstanceLine`]s and, at
//! the end, into per-group tallies. Keeping the state in one owner means the outcome rule is
//! applied in one place, whatever order stdout events, exits and sync events arrive in.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tg_api::events::Event;
use tg_api::task::GroupOutcome;
use tokio::sync::mpsc;

use crate::{InstanceLine, LineKind, RunGroup, RunnerEvent};

/// The supervisor's input.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum InstanceReport {
    /// A stdout line of instance `instance` (its position in the run, groups in input order),
    /// with its decoded event when it is an event line.
    Stdout {
        instance: usize,
        elapsed: Duration,
        line: String,
        event: Option<Event>,
    },
    /// A stderr line.
    Stderr {
        instance: usize,
        elapsed: Duration,
        line: String,
    },
    /// The instance is gone and its pipes are drained: always its last report.
    Exited {
        instance: usize,
        elapsed: Duration,
        exit: Exit,
    },
    /// An event published on the run's `run_events` topic. It carries a group, not an
    /// instance.
    Sync(Event),
}

/// How an instance process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub termination: Termination,
    /// Set when the runner stopped the instance.
    pub stopped: Option<StopReason>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    Code(i32),
    Signal(i32),
    /// The exit status could not be read (or the supervising task failed).
    Unknown,
}

/// Why the runner stopped instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Timeout,
    Canceled,
}

#[derive(Debug, Default)]
struct InstanceState {
    group: usize,
    index: u32,
    /// A success_event was printed.
    success: bool,
    /// A failure_event or crash_event was printed (counted once however many, trap T13).
    failed: bool,
    exit: Option<Exit>,
    /// Credited with a success published on the sync service only.
    sync_credited: bool,
}

impl InstanceState {
    fn exited_cleanly(&self) -> bool {
        matches!(
            self.exit,
            Some(Exit {
                termination: Termination::Code(0),
                stopped: None
            })
        )
    }

    fn ok(&self) -> bool {
        self.exited_cleanly() && !self.failed && (self.success || self.sync_credited)
    }
}

pub(crate) struct Supervisor {
    group_ids: Vec<String>,
    instances: Vec<InstanceState>,
    exited: usize,
    sync_successes: HashMap<String, u32>,
    events: mpsc::UnboundedSender<RunnerEvent>,
}

impl Supervisor {
    pub(crate) fn new(groups: &[RunGroup], events: mpsc::UnboundedSender<RunnerEvent>) -> Self {
        let mut instances = Vec::new();
        for (g, group) in groups.iter().enumerate() {
            instances.extend((0..group.instances).map(|index| InstanceState {
                group: g,
                index,
                ..Default::default()
            }));
        }
        Supervisor {
            group_ids: groups.iter().map(|g| g.id.clone()).collect(),
            instances,
            exited: 0,
            sync_successes: HashMap::new(),
            events,
        }
    }

    pub(crate) fn exited(&self) -> usize {
        self.exited
    }

    pub(crate) fn has_exited(&self, instance: usize) -> bool {
        self.instances
            .get(instance)
            .is_some_and(|s| s.exit.is_some())
    }

    pub(crate) fn handle(&mut self, report: InstanceReport) {
        match report {
            InstanceReport::Stdout {
                instance,
                elapsed,
                line,
                event,
            } => {
                let Some(state) = self.instances.get_mut(instance) else {
                    return;
                };
                let (kind, text) = match event {
                    None => (LineKind::Other, line),
                    Some(Event::Start { runenv }) => (LineKind::Start, runenv.to_string()),
                    Some(Event::Message { message }) => (LineKind::Message, message),
                    Some(Event::Success { .. }) => {
                        state.success = true;
                        (LineKind::Ok, String::new())
                    }
                    Some(Event::Failure { error, .. }) => {
                        state.failed = true;
                        (LineKind::Fail, error)
                    }
                    Some(Event::Crash {
                        error, stacktrace, ..
                    }) => {
                        state.failed = true;
                        let text = if stacktrace.is_empty() {
                            error
                        } else {
                            format!("{error}\n{stacktrace}")
                        };
                        (LineKind::Crash, text)
                    }
                    Some(Event::StageStart { name, .. }) => {
                        (LineKind::Message, format!("stage started: {name}"))
                    }
                    Some(Event::StageEnd { name, .. }) => {
                        (LineKind::Message, format!("stage ended: {name}"))
                    }
                };
                self.emit(instance, elapsed, kind, text);
            }
            InstanceReport::Stderr {
                instance,
                elapsed,
                line,
            } => {
                if instance < self.instances.len() {
                    self.emit(instance, elapsed, LineKind::Error, line);
                }
            }
            InstanceReport::Exited {
                instance,
                elapsed,
                exit,
            } => {
                let Some(state) = self.instances.get_mut(instance) else {
                    return;
                };
                if state.exit.is_some() {
                    return;
                }
                state.exit = Some(exit);
                self.exited += 1;
                if let Some((kind, text)) = exit_line(state, exit) {
                    self.emit(instance, elapsed, kind, text);
                }
            }
            InstanceReport::Sync(Event::Success { group }) => {
                *self.sync_successes.entry(group).or_default() += 1;
            }
            // Failures and crashes published on the sync service are also printed by every
            // SDK, and sdk-go may publish a crash twice (T13): stdout is the reliable source.
            InstanceReport::Sync(_) => {}
        }
    }

    /// Credits sync-only successes, then tallies ok/total per group. `elapsed` stamps the lines
    /// emitted for credited instances.
    pub(crate) fn finish(&mut self, elapsed: Duration) -> BTreeMap<String, GroupOutcome> {
        self.credit_sync_successes(elapsed);
        let mut outcomes: BTreeMap<String, GroupOutcome> = self
            .group_ids
            .iter()
            .map(|g| (g.clone(), GroupOutcome::default()))
            .collect();
        for state in &self.instances {
            let tally = outcomes
                .entry(self.group_ids[state.group].clone())
                .or_default();
            tally.total += 1;
            if state.ok() {
                tally.ok += 1;
            }
        }
        outcomes
    }

    /// A success published on the sync service but not printed belongs to some instance of
    /// the group that printed no outcome and exited cleanly; which one cannot be known, and
    /// does not matter for the tally.
    fn credit_sync_successes(&mut self, elapsed: Duration) {
        for (g, group_id) in self.group_ids.clone().iter().enumerate() {
            let published = self.sync_successes.get(group_id).copied().unwrap_or(0);
            let printed = self
                .instances
                .iter()
                .filter(|s| s.group == g && s.success)
                .count() as u32;
            let mut extra = published.saturating_sub(printed);
            for i in 0..self.instances.len() {
                if extra == 0 {
                    break;
                }
                let s = &mut self.instances[i];
                if s.group == g && !s.success && !s.failed && s.exited_cleanly() {
                    s.sync_credited = true;
                    extra -= 1;
                    self.emit(
                        i,
                        elapsed,
                        LineKind::Ok,
                        "success reported through the sync service".into(),
                    );
                }
            }
        }
    }

    fn emit(&self, instance: usize, elapsed: Duration, kind: LineKind, text: String) {
        let state = &self.instances[instance];
        // A closed receiver means nobody listens any more; the run itself goes on.
        let _ = self.events.send(RunnerEvent::Instance(InstanceLine {
            group: self.group_ids[state.group].clone(),
            index: state.index,
            elapsed,
            kind,
            text,
        }));
    }
}

/// The line (if any) that explains an instance's end beyond its own events.
fn exit_line(state: &InstanceState, exit: Exit) -> Option<(LineKind, String)> {
    match exit.stopped {
        Some(StopReason::Timeout) => {
            return Some((
                LineKind::Timeout,
                "killed: the run timeout elapsed".to_string(),
            ));
        }
        Some(StopReason::Canceled) => {
            return Some((LineKind::Killed, "killed: the run was canceled".to_string()));
        }
        None => {}
    }
    if !state.success && !state.failed {
        return Some((
            LineKind::Incomplete,
            format!(
                "{} without reporting an outcome",
                describe(exit.termination)
            ),
        ));
    }
    if state.failed {
        return None;
    }
    match exit.termination {
        Termination::Code(0) => None,
        Termination::Code(_) | Termination::Unknown => Some((
            LineKind::InternalErr,
            format!("reported success but {}", describe(exit.termination)),
        )),
        Termination::Signal(_) => Some((
            LineKind::Crash,
            format!("reported success but {}", describe(exit.termination)),
        )),
    }
}

fn describe(t: Termination) -> String {
    match t {
        Termination::Code(c) => format!("exited with status {c}"),
        Termination::Signal(s) => match nix::sys::signal::Signal::try_from(s) {
            Ok(sig) => format!("was killed by signal {sig}"),
            Err(_) => format!("was killed by signal {s}"),
        },
        Termination::Unknown => "ended with an unknown status".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sup(counts: &[(&str, u32)]) -> (Supervisor, mpsc::UnboundedReceiver<RunnerEvent>) {
        let groups: Vec<RunGroup> = counts
            .iter()
            .map(|(id, n)| RunGroup {
                id: id.to_string(),
                instances: *n,
                artifact: String::new(),
                params: BTreeMap::new(),
                profiles: BTreeMap::new(),
            })
            .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        (Supervisor::new(&groups, tx), rx)
    }

    fn out(instance: usize, event: Event) -> InstanceReport {
        InstanceReport::Stdout {
            instance,
            elapsed: Duration::ZERO,
            line: String::new(),
            event: Some(event),
        }
    }

    fn exit(instance: usize, termination: Termination) -> InstanceReport {
        InstanceReport::Exited {
            instance,
            elapsed: Duration::ZERO,
            exit: Exit {
                termination,
                stopped: None,
            },
        }
    }

    fn kinds(rx: &mut mpsc::UnboundedReceiver<RunnerEvent>) -> Vec<(u32, LineKind)> {
        let mut v = Vec::new();
        while let Ok(RunnerEvent::Instance(l)) = rx.try_recv() {
            v.push((l.index, l.kind));
        }
        v
    }

    #[test]
    fn outcome_needs_success_no_failure_and_status_zero() {
        let (mut s, mut rx) = sup(&[("g", 5)]);
        let ok = Event::Success { group: "g".into() };
        let crash = Event::Crash {
            group: "g".into(),
            error: "e".into(),
            stacktrace: String::new(),
        };
        s.handle(out(0, ok.clone()));
        s.handle(exit(0, Termination::Code(0)));
        s.handle(out(1, ok.clone()));
        s.handle(exit(1, Termination::Code(3)));
        s.handle(out(2, crash.clone()));
        s.handle(out(2, crash));
        s.handle(exit(2, Termination::Code(0)));
        s.handle(exit(3, Termination::Code(0)));
        s.handle(out(4, ok));
        s.handle(exit(4, Termination::Signal(9)));
        assert_eq!(s.exited(), 5);
        let o = s.finish(Duration::ZERO);
        assert_eq!(o["g"], GroupOutcome { ok: 1, total: 5 });
        assert_eq!(
            kinds(&mut rx),
            vec![
                (0, LineKind::Ok),
                (1, LineKind::Ok),
                (1, LineKind::InternalErr),
                (2, LineKind::Crash),
                (2, LineKind::Crash),
                (3, LineKind::Incomplete),
                (4, LineKind::Ok),
                (4, LineKind::Crash),
            ]
        );
    }

    #[test]
    fn sync_successes_credit_only_silent_clean_instances() {
        let (mut s, mut rx) = sup(&[("a", 3), ("b", 1)]);
        s.handle(out(0, Event::Success { group: "a".into() }));
        // Published by instance 0 (also printed) and by one silent instance.
        s.handle(InstanceReport::Sync(Event::Success { group: "a".into() }));
        s.handle(InstanceReport::Sync(Event::Success { group: "a".into() }));
        s.handle(InstanceReport::Sync(Event::Crash {
            group: "a".into(),
            error: String::new(),
            stacktrace: String::new(),
        }));
        for i in 0..4 {
            s.handle(exit(i, Termination::Code(0)));
        }
        let o = s.finish(Duration::ZERO);
        assert_eq!(o["a"], GroupOutcome { ok: 2, total: 3 });
        assert_eq!(o["b"], GroupOutcome { ok: 0, total: 1 });
        let lines = kinds(&mut rx);
        assert_eq!(lines.last(), Some(&(1, LineKind::Ok)));
    }

    #[test]
    fn stopped_instances_are_not_ok_even_after_success() {
        let (mut s, mut rx) = sup(&[("g", 2)]);
        s.handle(out(0, Event::Success { group: "g".into() }));
        for (i, reason) in [(0, StopReason::Timeout), (1, StopReason::Canceled)] {
            s.handle(InstanceReport::Exited {
                instance: i,
                elapsed: Duration::ZERO,
                exit: Exit {
                    termination: Termination::Signal(15),
                    stopped: Some(reason),
                },
            });
        }
        assert_eq!(
            s.finish(Duration::ZERO)["g"],
            GroupOutcome { ok: 0, total: 2 }
        );
        assert_eq!(
            kinds(&mut rx),
            vec![
                (0, LineKind::Ok),
                (0, LineKind::Timeout),
                (1, LineKind::Killed)
            ]
        );
    }
}
