//! The one place that knows every instance's state. Instance tasks (and the sync-event
//! forwarder) send [`InstanceReport`]s; the supervisor turns them into [`InstanceLine`]s and, at
//! the end, into per-group tallies. Keeping the state in one owner means the outcome rule is
//! applied in one place, whatever order stdout events, exits and sync events arrive in.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tg_api::events::Event;
use tg_api::task::GroupOutcome;

use crate::{InstanceLine, LineKind, RunGroup, RunnerEvent};

/// Which evidence decides that an instance succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeRule {
    /// `local:exec`: the instance's stdout events and exit status; a success published only
    /// on the sync service credits a silent instance.
    Stdout,
    /// Runners with a sidecar, as the original's container runners: a group's successes are
    /// those published on the run's `run_events` topic, and only instances that exited with
    /// status 0 without reporting a failure can be credited with one. A success that was only
    /// printed does not count (the original's regression test for issue 1349).
    SyncEvents,
}

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
    /// A short name the instance's lines carry after its index, as the original's container
    /// runners did with the container id (`single[000] (a5d263)`).
    Tag { instance: usize, tag: String },
    /// The runner found the instance cannot have passed (e.g. its sidecar refused a network
    /// configuration it asked for): it fails whatever it reports afterwards.
    Refused {
        instance: usize,
        elapsed: Duration,
        reason: String,
    },
    /// The instance's sidecar applied a `network.Config` it published (its JSON).
    NetworkApplied {
        instance: usize,
        elapsed: Duration,
        config: String,
    },
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
    /// See [`InstanceReport::Tag`].
    tag: Option<String>,
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
    rule: OutcomeRule,
    /// Lines to hand to the run's event stream; the loop drains them (and waits for room in
    /// the stream, so a slow reader slows the instances instead of growing memory).
    pending: Vec<RunnerEvent>,
    /// Whether the run log already said that the others may now wait for a failed instance.
    told_of_waits: bool,
}

impl Supervisor {
    pub(crate) fn new(groups: &[RunGroup], rule: OutcomeRule) -> Self {
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
            rule,
            pending: Vec::new(),
            told_of_waits: false,
        }
    }

    /// The events produced since the last call.
    pub(crate) fn drain(&mut self) -> std::vec::Drain<'_, RunnerEvent> {
        self.pending.drain(..)
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
                let ended = RunnerEvent::Exited {
                    group: self.group_ids[state.group].clone(),
                    index: state.index,
                    elapsed,
                    status: describe_exit(exit),
                    ok: state.ok(),
                };
                let failed = exit.stopped.is_none() && (state.failed || !state.exited_cleanly());
                let (group, index) = (state.group, state.index);
                if let Some((kind, text)) = exit_line(state, exit) {
                    self.emit(instance, elapsed, kind, text);
                }
                self.pending.push(ended);
                // Said once: a run whose instance died before a barrier otherwise sits silent
                // until the plan's own timeouts (10 minutes in some), which looks like a hang.
                let others = self.instances.len() - self.exited;
                if failed && others > 0 && !self.told_of_waits {
                    self.told_of_waits = true;
                    let name = &self.group_ids[group];
                    self.pending.push(RunnerEvent::Log(format!(
                        "{name}[{index}] ended without success while {others} other instance(s) have not \
                         ended; any that wait for it (at a barrier it will not reach) wait until \
                         their own timeouts: Ctrl-C (with --wait) or `testground terminate` ends \
                         the run"
                    )));
                }
            }
            InstanceReport::NetworkApplied {
                instance,
                elapsed,
                config,
            } => {
                if let Some(state) = self.instances.get(instance) {
                    self.pending.push(RunnerEvent::NetworkApplied {
                        group: self.group_ids[state.group].clone(),
                        index: state.index,
                        elapsed,
                        config,
                    });
                }
            }
            InstanceReport::Tag { instance, tag } => {
                if let Some(state) = self.instances.get_mut(instance) {
                    state.tag = Some(tag);
                }
            }
            InstanceReport::Sync(Event::Success { group }) => {
                *self.sync_successes.entry(group).or_default() += 1;
            }
            // Failures and crashes published on the sync service are also printed by every
            // SDK, and sdk-go may publish a crash twice (T13): stdout is the reliable source.
            InstanceReport::Sync(_) => {}
            InstanceReport::Refused {
                instance,
                elapsed,
                reason,
            } => {
                let Some(state) = self.instances.get_mut(instance) else {
                    return;
                };
                state.failed = true;
                self.emit(instance, elapsed, LineKind::InternalErr, reason);
            }
        }
    }

    /// Credits sync-only successes, then tallies ok/total per group. `elapsed` stamps the lines
    /// emitted for credited instances.
    pub(crate) fn finish(&mut self, elapsed: Duration) -> BTreeMap<String, GroupOutcome> {
        if self.rule == OutcomeRule::SyncEvents {
            return self.finish_from_sync_events();
        }
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

    /// [`OutcomeRule::SyncEvents`]: per group, the published successes, capped by the
    /// instances that could have earned one.
    fn finish_from_sync_events(&mut self) -> BTreeMap<String, GroupOutcome> {
        let mut outcomes = BTreeMap::new();
        for (g, group_id) in self.group_ids.clone().iter().enumerate() {
            let members = || self.instances.iter().filter(move |s| s.group == g);
            let total = members().count() as u32;
            let eligible = members()
                .filter(|s| s.exited_cleanly() && !s.failed)
                .count() as u32;
            let printed = members().filter(|s| s.success && !s.failed).count() as u32;
            let published = self.sync_successes.get(group_id).copied().unwrap_or(0);
            let ok = published.min(eligible);
            if printed > published {
                self.pending.push(RunnerEvent::Log(format!(
                    "group {group_id}: {printed} instances printed success but {published} \
                     published it on the run_events topic; only published successes count"
                )));
            }
            outcomes.insert(group_id.clone(), GroupOutcome { ok, total });
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

    fn emit(&mut self, instance: usize, elapsed: Duration, kind: LineKind, text: String) {
        let state = &self.instances[instance];
        self.pending.push(RunnerEvent::Instance(InstanceLine {
            group: self.group_ids[state.group].clone(),
            index: state.index,
            tag: state.tag.clone(),
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

/// How an instance ended, in words: the status, or why the runner stopped it.
fn describe_exit(exit: Exit) -> String {
    match exit.stopped {
        Some(StopReason::Timeout) => format!("{} (run timeout)", describe(exit.termination)),
        Some(StopReason::Canceled) => format!("{} (run canceled)", describe(exit.termination)),
        None => describe(exit.termination),
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

    /// The supervisor and where its events go.
    struct Rx(Vec<RunnerEvent>);

    fn sup(counts: &[(&str, u32)]) -> (Supervisor, Rx) {
        sup_with(counts, OutcomeRule::Stdout)
    }

    fn sup_with(counts: &[(&str, u32)], rule: OutcomeRule) -> (Supervisor, Rx) {
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
        (Supervisor::new(&groups, rule), Rx(Vec::new()))
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

    fn kinds(s: &mut Supervisor, rx: &mut Rx) -> Vec<(u32, LineKind)> {
        rx.0.extend(s.drain());
        rx.0.iter()
            .filter_map(|e| match e {
                RunnerEvent::Instance(l) => Some((l.index, l.kind)),
                _ => None,
            })
            .collect()
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
            kinds(&mut s, &mut rx),
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

    fn logs(s: &mut Supervisor, rx: &mut Rx) -> Vec<String> {
        rx.0.extend(s.drain());
        rx.0.iter()
            .filter_map(|e| match e {
                RunnerEvent::Log(l) => Some(l.clone()),
                _ => None,
            })
            .collect()
    }

    /// The first instance to end without success while others run is named once, with what
    /// the others may now do and how to end the run; clean exits, instances the run stopped
    /// and the last instance are not.
    #[test]
    fn the_first_failed_instance_is_said_once_while_others_run() {
        let (mut s, mut rx) = sup(&[("g", 4)]);
        s.handle(out(0, Event::Success { group: "g".into() }));
        s.handle(exit(0, Termination::Code(0)));
        s.handle(InstanceReport::Exited {
            instance: 1,
            elapsed: Duration::ZERO,
            exit: Exit {
                termination: Termination::Signal(15),
                stopped: Some(StopReason::Canceled),
            },
        });
        assert!(logs(&mut s, &mut rx).is_empty());
        s.handle(out(
            2,
            Event::Crash {
                group: "g".into(),
                error: "write timed out".into(),
                stacktrace: String::new(),
            },
        ));
        s.handle(exit(2, Termination::Code(2)));
        let said = logs(&mut s, &mut rx);
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].starts_with("g[2] ended without success while 1 other instance(s)")
                && said[0].contains("Ctrl-C"),
            "{}",
            said[0]
        );
        s.handle(exit(3, Termination::Code(1)));
        assert_eq!(logs(&mut s, &mut rx).len(), 1, "said once per run");

        // Nothing is left to wait for it: nothing to say.
        let (mut s, mut rx) = sup(&[("g", 1)]);
        s.handle(exit(0, Termination::Signal(9)));
        assert!(logs(&mut s, &mut rx).is_empty());
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
        let lines = kinds(&mut s, &mut rx);
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
            kinds(&mut s, &mut rx),
            vec![
                (0, LineKind::Ok),
                (0, LineKind::Timeout),
                (1, LineKind::Killed)
            ]
        );
    }
}

#[cfg(test)]
mod sync_rule_tests {
    use super::*;

    fn groups(counts: &[(&str, u32)]) -> Vec<RunGroup> {
        counts
            .iter()
            .map(|(id, n)| RunGroup {
                id: id.to_string(),
                instances: *n,
                artifact: String::new(),
                params: BTreeMap::new(),
                profiles: BTreeMap::new(),
            })
            .collect()
    }

    fn exit0(instance: usize) -> InstanceReport {
        InstanceReport::Exited {
            instance,
            elapsed: Duration::ZERO,
            exit: Exit {
                termination: Termination::Code(0),
                stopped: None,
            },
        }
    }

    fn printed_ok(instance: usize) -> InstanceReport {
        InstanceReport::Stdout {
            instance,
            elapsed: Duration::ZERO,
            line: String::new(),
            event: Some(Event::Success { group: "g".into() }),
        }
    }

    #[test]
    fn printed_success_without_a_published_one_fails() {
        let mut s = Supervisor::new(&groups(&[("g", 2)]), OutcomeRule::SyncEvents);
        s.handle(printed_ok(0));
        s.handle(printed_ok(1));
        s.handle(InstanceReport::Sync(Event::Success { group: "g".into() }));
        s.handle(exit0(0));
        s.handle(exit0(1));
        assert_eq!(
            s.finish(Duration::ZERO)["g"],
            GroupOutcome { ok: 1, total: 2 }
        );
        assert!(
            s.drain()
                .any(|e| matches!(e, RunnerEvent::Log(l) if l.contains("published")))
        );
    }

    #[test]
    fn published_successes_need_a_clean_exit_and_no_refusal() {
        let mut s = Supervisor::new(&groups(&[("g", 3)]), OutcomeRule::SyncEvents);
        for _ in 0..5 {
            s.handle(InstanceReport::Sync(Event::Success { group: "g".into() }));
        }
        s.handle(exit0(0));
        s.handle(InstanceReport::Refused {
            instance: 1,
            elapsed: Duration::ZERO,
            reason: "network config refused".into(),
        });
        s.handle(exit0(1));
        s.handle(InstanceReport::Exited {
            instance: 2,
            elapsed: Duration::ZERO,
            exit: Exit {
                termination: Termination::Code(1),
                stopped: None,
            },
        });
        assert_eq!(
            s.finish(Duration::ZERO)["g"],
            GroupOutcome { ok: 1, total: 3 }
        );
    }
}
