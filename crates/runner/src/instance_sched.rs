//! How host-process instances (`local:exec`, `local:netns`) are scheduled, so that their
//! wake-ups do not wait behind other CPU-bound work: a shaped round trip is only as punctual as
//! the processes at both ends (see crates/sidecar/DESIGN.md, "Timing under load").
//!
//! - **A session of their own** (`setsid` instead of only a process group): with the kernel's
//!   automatic grouping, each session is one scheduling group and groups share the CPU as
//!   equals. Left in the engine's session, instances share one group with the engine and
//!   whatever was started next to it (a `stress` from the same shell): once that group has used
//!   its share, an instance's wake-up waits for the group's next turn, milliseconds under load.
//!   In its own session a mostly sleeping instance is a group owed time when it wakes. The
//!   trade-off: a CPU-bound instance gets one group's share, as any process does where
//!   automatic grouping is off (and as each container does under `local:docker`), rather than a
//!   slice of the engine's.
//! - **A short time slice** (0.1 ms, `sched_setattr` with `sched_runtime`; Linux 6.12 and
//!   later): an earlier virtual deadline, so a waking instance preempts a task running a longer
//!   slice instead of waiting for it to end. It does not change the instance's share of the CPU.
//!   Set before `exec`, it is inherited by every thread and child of the instance.
//!
//! - **One CPU group for the run's instances** (a cgroup v1 `cpu` directory,
//!   `.../testground/<run_id>`, where the engine is root and a v1 hierarchy has the controller):
//!   sessions alone scale badly. With 5,000 busy instances each in a session of its own, the
//!   engine, its sync service and its helpers (one session) would get one share in 5,001, and a
//!   run of sdk-go instances could starve the service they all wait on. In one group the run's
//!   instances together weigh as much as the engine's session, whatever their number, and they
//!   still wake ahead of CPU-bound work elsewhere (the group is owed time when it wakes). Inside
//!   a cgroup other than the root the kernel does not group tasks by session, so the session
//!   matters only where there is no such group. The engine's helper processes stay outside it.
//!
//! `TESTGROUND_INSTANCE_SCHED` in the engine's environment chooses: `on` (default, all three),
//! `off` (none: the instance stays in the engine's session and CPU group, in a process group
//! of its own, with the default slice), or a comma-separated list of `session`, `slice` and
//! `group`.
//!
//! - **A crowded run** (more than [`CROWD_PER_CPU`] instances per CPU) also gives each
//!   instance `GOMAXPROCS=1` and a 1 ms timer slack, unless the run configuration's
//!   `instance_env` and `timer_slack` say otherwise. Thousands of idle Go runtimes each wake
//!   several threads a second (sdk-go's metrics tickers, the runtime's `sysmon` polling at
//!   20 µs while a thread of its process waits for a CPU); on 2 cores 5,000 of them starved
//!   the instances at work until sdk-go's 1 s write deadlines fired. One thread per runtime
//!   and timer wake-ups the kernel may batch into one per millisecond halve that cost and let
//!   5,000 sdk-go instances pass (BENCHMARKS.md). The slack delays only timeouts (sleeps,
//!   tickers), never a wake-up by I/O; an instance's own parallelism is moot at more than
//!   500 instances per CPU. The two travel to helper processes in the same variable
//!   (`gomaxprocs1`, `slack=<ns>`).

use std::io;

/// The engine's environment variable that chooses the instances' scheduling.
pub(crate) const ENV: &str = "TESTGROUND_INSTANCE_SCHED";
/// The instances' time slice: the shortest the kernel accepts for a normal task.
pub(crate) const SLICE_NS: u64 = 100_000;
/// Instances per CPU above which a run is crowded.
pub(crate) const CROWD_PER_CPU: u64 = 500;
/// The timer slack of a crowded run's instances.
pub(crate) const CROWD_SLACK_NS: u64 = 1_000_000;

/// How instance processes are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InstanceSched {
    /// Start each instance in a session of its own (else only in a process group of its own).
    pub own_session: bool,
    /// Give each instance this time slice (ns).
    pub slice: Option<u64>,
    /// Put the run's instances in one CPU group (created by the run's tracker).
    pub cpu_group: bool,
    /// Give each instance this timer slack (ns), else the kernel's default.
    pub timer_slack: Option<u64>,
    /// Give each instance `GOMAXPROCS=1` (its own environment may still set it).
    pub one_go_proc: bool,
}

impl Default for InstanceSched {
    fn default() -> Self {
        InstanceSched {
            own_session: true,
            slice: Some(SLICE_NS),
            cpu_group: true,
            timer_slack: None,
            one_go_proc: false,
        }
    }
}

impl InstanceSched {
    /// None: as before this module existed.
    pub(crate) const OFF: InstanceSched = InstanceSched {
        own_session: false,
        slice: None,
        cpu_group: false,
        timer_slack: None,
        one_go_proc: false,
    };

    /// The choice in [`ENV`] (`None`: unset); an invalid value is an error naming the values.
    pub(crate) fn parse(value: Option<&str>) -> Result<InstanceSched, String> {
        let Some(v) = value.map(str::trim) else {
            return Ok(InstanceSched::default());
        };
        match v.to_ascii_lowercase().as_str() {
            "" | "on" | "true" | "1" | "yes" => return Ok(InstanceSched::default()),
            "off" | "false" | "0" | "no" => return Ok(InstanceSched::OFF),
            _ => {}
        }
        let mut sched = InstanceSched::OFF;
        for part in v.split(',').map(|p| p.trim().to_ascii_lowercase()) {
            match part.as_str() {
                "on" => {
                    sched = InstanceSched {
                        timer_slack: sched.timer_slack,
                        one_go_proc: sched.one_go_proc,
                        ..InstanceSched::default()
                    }
                }
                "off" => {}
                "session" => sched.own_session = true,
                "slice" => sched.slice = Some(SLICE_NS),
                "group" => sched.cpu_group = true,
                "gomaxprocs1" => sched.one_go_proc = true,
                p if slack_ns(p).is_some() => sched.timer_slack = slack_ns(p),
                _ => {
                    return Err(format!(
                        "{ENV}={v} is neither on, off, nor a comma-separated list of session, \
                         slice and group; using on"
                    ));
                }
            }
        }
        Ok(sched)
    }

    /// The value of [`ENV`] that [`InstanceSched::parse`] reads back as `self` (to hand the
    /// engine's settled choice to helper processes).
    pub(crate) fn env_value(&self) -> String {
        let base = InstanceSched {
            timer_slack: None,
            one_go_proc: false,
            ..*self
        };
        let mut parts: Vec<String> = if base == InstanceSched::default() {
            vec!["on".into()]
        } else {
            [
                (self.own_session, "session"),
                (self.slice.is_some(), "slice"),
                (self.cpu_group, "group"),
            ]
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, name)| name.to_string())
            .collect()
        };
        if parts.is_empty() {
            parts.push("off".into());
        }
        if self.one_go_proc {
            parts.push("gomaxprocs1".into());
        }
        if let Some(ns) = self.timer_slack {
            parts.push(format!("slack={ns}"));
        }
        parts.join(",")
    }

    /// Applies the run configuration's `timer_slack` (zero: the kernel's default) and, for a
    /// crowded run of `total` instances on `cpus` CPUs, the crowd's settings. Returns the run
    /// log's line that says so, for a crowded run.
    pub(crate) fn settle_crowd(
        &mut self,
        total: u32,
        cpus: usize,
        timer_slack: Option<std::time::Duration>,
    ) -> Option<String> {
        if let Some(d) = timer_slack {
            let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            self.timer_slack = (ns > 0).then_some(ns);
        }
        if !crowded(total, cpus) {
            return None;
        }
        self.one_go_proc = true;
        if timer_slack.is_none() {
            self.timer_slack = Some(CROWD_SLACK_NS);
        }
        Some(format!(
            "{total} instances on {cpus} CPUs (more than {CROWD_PER_CPU} per CPU): instances get \
             GOMAXPROCS=1 (unless instance_env sets it) and a {} timer slack (run config \
             timer_slack), so that idle runtimes leave the CPU to the instances at work",
            match self.timer_slack {
                Some(ns) => format!("{} ms", ns as f64 / 1e6),
                None => "default".into(),
            }
        ))
    }

    /// The engine's choice: [`ENV`], then a check that the kernel gives the slice (on a
    /// scratch thread). Returns it with lines for the run log: an invalid value, or a refused
    /// slice with the reason (the instances then keep the default slice).
    pub(crate) fn settle_from_env() -> (InstanceSched, Vec<String>) {
        let mut lines = Vec::new();
        let mut sched =
            InstanceSched::parse(std::env::var(ENV).ok().as_deref()).unwrap_or_else(|e| {
                lines.push(e);
                InstanceSched::default()
            });
        if let Some(slice) = sched.slice
            && let Err(e) = tg_sys::sched::probe_slice(slice)
        {
            lines.push(refused_line(slice, &e));
            sched.slice = None;
        }
        (sched, lines)
    }

    /// Arranges `cmd` (an instance's command) accordingly: a session or a process group of its
    /// own, and the slice.
    pub(crate) fn apply(&self, cmd: &mut impl tg_sys::spawn::PreExec) {
        if self.own_session {
            tg_sys::sched::own_session_on_exec(cmd);
        } else {
            tg_sys::sched::own_process_group_on_exec(cmd);
        }
        if let Some(slice) = self.slice {
            tg_sys::sched::slice_on_exec(cmd, slice);
        }
        if let Some(ns) = self.timer_slack {
            tg_sys::sched::timer_slack_on_exec(cmd, ns);
        }
    }
}

/// The timer slack of a `slack=<ns>` part of [`ENV`] (ns > 0).
fn slack_ns(part: &str) -> Option<u64> {
    part.strip_prefix("slack=")?
        .parse()
        .ok()
        .filter(|ns| *ns > 0)
}

/// Whether `total` instances on `cpus` CPUs are a crowded run.
pub(crate) fn crowded(total: u32, cpus: usize) -> bool {
    u64::from(total) > CROWD_PER_CPU.saturating_mul(cpus.max(1) as u64)
}

/// The run log's line when the run's instances cannot share a CPU group.
pub(crate) fn no_group_line(e: &io::Error) -> String {
    format!(
        "instances are not in a CPU group of their own ({e}): each is scheduled as its session, \
         so thousands of busy instances can leave the engine and its sync service a small share \
         of the CPU; {ENV}=session,slice does without the group and silences this"
    )
}

/// The run log's line when the kernel does not give the slice.
fn refused_line(slice: u64, e: &io::Error) -> String {
    format!(
        "instances run with the kernel's default time slice, so under CPU load their wake-ups \
         can wait longer for other work: a {} ms slice (sched_setattr) was refused: {e}; \
         {ENV}=session,group does without it and silences this",
        slice as f64 / 1e6
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_reads_back_and_defaults_to_both() {
        assert_eq!(
            InstanceSched::parse(None).unwrap(),
            InstanceSched::default()
        );
        assert!(InstanceSched::default().own_session);
        assert_eq!(InstanceSched::default().slice, Some(SLICE_NS));
        assert_eq!(InstanceSched::parse(Some(" OFF ")), Ok(InstanceSched::OFF));
        assert!(InstanceSched::default().cpu_group);
        for v in [
            "on",
            "off",
            "session",
            "slice",
            "group",
            "session,slice",
            "slice,group",
        ] {
            let s = InstanceSched::parse(Some(v)).unwrap();
            assert_eq!(s.env_value(), v);
            assert_eq!(InstanceSched::parse(Some(&s.env_value())), Ok(s));
        }
        assert_eq!(
            InstanceSched::parse(Some("group, Session ,slice")),
            Ok(InstanceSched::default())
        );
        assert_eq!(
            InstanceSched::parse(Some("session")),
            Ok(InstanceSched {
                own_session: true,
                ..InstanceSched::OFF
            })
        );
        for bad in ["fast", "session,", "session,fast"] {
            let e = InstanceSched::parse(Some(bad)).unwrap_err();
            assert!(e.contains(ENV) && e.contains("group"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_missing_group_says_what_it_costs_and_how_to_silence_it() {
        let line = no_group_line(&io::Error::other(
            "no cgroup v1 hierarchy with the cpu controller",
        ));
        assert!(line.contains("no cgroup v1 hierarchy"), "{line}");
        assert!(line.contains("sync service"), "{line}");
        assert!(
            line.contains("TESTGROUND_INSTANCE_SCHED=session,slice"),
            "{line}"
        );
        assert_eq!(
            InstanceSched::parse(Some("session,slice")).map(|s| s.cpu_group),
            Ok(false)
        );
    }

    #[test]
    fn a_crowded_run_gets_one_go_thread_and_a_slack_unless_configured() {
        let ms = |n: u64| std::time::Duration::from_millis(n);
        // 1,000 on 2 CPUs is not crowded: nothing changes, and no line.
        let mut s = InstanceSched::default();
        assert_eq!(s.settle_crowd(1_000, 2, None), None);
        assert_eq!(s, InstanceSched::default());
        // A configured slack applies to any run; 0 is the kernel's default.
        assert_eq!(s.settle_crowd(10, 2, Some(ms(3))), None);
        assert_eq!(s.timer_slack, Some(3_000_000));
        let mut s = InstanceSched::default();
        s.settle_crowd(10, 2, Some(ms(0)));
        assert_eq!(s.timer_slack, None);
        // 1,001 on 2 CPUs is.
        let mut s = InstanceSched::default();
        let line = s
            .settle_crowd(1_001, 2, None)
            .expect("a crowded run says so");
        assert!(s.one_go_proc);
        assert_eq!(s.timer_slack, Some(CROWD_SLACK_NS));
        assert!(line.contains("1001 instances on 2 CPUs"), "{line}");
        assert!(line.contains("GOMAXPROCS=1"), "{line}");
        assert!(line.contains("1 ms timer slack"), "{line}");
        // Its slack gives way to the configured one, also to 0.
        let mut s = InstanceSched::default();
        let line = s.settle_crowd(5_000, 2, Some(ms(0))).unwrap();
        assert_eq!(s.timer_slack, None);
        assert!(s.one_go_proc);
        assert!(line.contains("default timer slack"), "{line}");
        // Both travel to helpers in the variable.
        let mut s = InstanceSched::default();
        s.settle_crowd(5_000, 4, None);
        assert_eq!(s.env_value(), "on,gomaxprocs1,slack=1000000");
        assert_eq!(InstanceSched::parse(Some(&s.env_value())), Ok(s));
        let odd = InstanceSched {
            timer_slack: Some(7),
            ..InstanceSched::OFF
        };
        assert_eq!(odd.env_value(), "off,slack=7");
        assert_eq!(InstanceSched::parse(Some("off,slack=7")), Ok(odd));
        assert!(InstanceSched::parse(Some("on,slack=x")).is_err());
        assert!(InstanceSched::parse(Some("on,slack=0")).is_err());
    }

    /// The crowd's settings as an instance gets them: `GOMAXPROCS=1` unless its own
    /// environment sets it, and the timer slack, which the kernel keeps across `exec`.
    #[tokio::test]
    async fn an_instance_gets_the_crowd_s_settings_and_its_own_env_wins() {
        let sched = InstanceSched {
            one_go_proc: true,
            timer_slack: Some(2_000_000),
            ..InstanceSched::OFF
        };
        for (env, want) in [(None, "1 2000000"), (Some("3"), "3 2000000")] {
            let text = sh_as_instance(
                sched,
                env.map(|v| ("GOMAXPROCS", v)),
                "echo ${GOMAXPROCS-unset} $(cat /proc/self/timerslack_ns)",
            )
            .await;
            assert_eq!(text.trim(), want);
        }
    }

    #[test]
    fn a_refusal_says_what_it_costs_and_how_to_silence_it() {
        let line = refused_line(SLICE_NS, &io::Error::from_raw_os_error(1));
        assert!(line.contains("0.1 ms slice"), "{line}");
        assert!(line.contains("Operation not permitted"), "{line}");
        assert!(line.contains("TESTGROUND_INSTANCE_SCHED=session"), "{line}");
    }

    /// Runs `sh -c script` as an instance is started (`exec::instance_command`:
    /// `tg_sys::spawn`, with `sched` applied and `env` set); returns its output.
    async fn sh_as_instance(
        sched: InstanceSched,
        env: Option<(&str, &str)>,
        script: &str,
    ) -> String {
        let mut cmd = crate::exec::instance_command("/bin/sh".as_ref(), env, sched);
        cmd.arg("-c").arg(script);
        let mut child = tg_sys::spawn::AsyncChild::new(cmd.spawn().unwrap()).unwrap();
        let out = child.take_stdout().unwrap();
        let status = child.wait().await.unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(out), &mut text).unwrap();
        assert!(status.success(), "{status:?}: {text}");
        text
    }

    /// An instance's pid, process group, session, its time slice and a forked child's
    /// (`/proc/<pid>/sched`, `se.slice`).
    async fn report(sched: InstanceSched) -> Vec<u64> {
        let text = sh_as_instance(
            sched,
            None,
            "s=$(cut -d' ' -f5,6 /proc/$$/stat); \
             a=$(grep '^se.slice' /proc/$$/sched | tr -dc 0-9); \
             b=$(cat /proc/self/sched | grep '^se.slice' | tr -dc 0-9); \
             echo $$ $s $a $b",
        )
        .await;
        text.split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn an_instance_leads_its_own_session_with_the_slice_and_passes_it_on() {
        let (sched, lines) = InstanceSched::settle_from_env();
        if std::env::var(ENV).is_ok() || !lines.is_empty() {
            println!("skipping the slice: {ENV} is set or the kernel refused: {lines:?}");
        }
        let r = report(InstanceSched {
            own_session: true,
            slice: sched.slice,
            ..InstanceSched::OFF
        })
        .await;
        // pid = process group = session.
        assert_eq!(r[0], r[1], "{r:?}");
        assert_eq!(r[0], r[2], "{r:?}");
        if sched.slice.is_some() && r.len() == 5 {
            // The program and its child (forked after exec) have the slice.
            assert_eq!(r[3..], [SLICE_NS, SLICE_NS], "{r:?}");
        }
    }

    #[tokio::test]
    async fn off_keeps_the_engines_session_and_the_default_slice() {
        let r = report(InstanceSched::OFF).await;
        // Its own process group, the caller's session.
        assert_eq!(r[0], r[1], "{r:?}");
        assert_ne!(r[0], r[2], "{r:?}");
        assert_eq!(
            r[2],
            u64::try_from(nix::unistd::getsid(None).unwrap().as_raw()).unwrap()
        );
        if r.len() == 5 && tg_sys::sched::probe_slice(SLICE_NS).is_ok() {
            assert_ne!(r[3], SLICE_NS, "{r:?}");
        }
    }
}
