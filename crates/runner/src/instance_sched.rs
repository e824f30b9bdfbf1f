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
//! `TESTGROUND_INSTANCE_SCHED` in the engine's environment chooses: `on` (default, both),
//! `session`, `slice`, or `off` (neither: the instance stays in the engine's session, in a
//! process group of its own, with the default slice).

use std::io;

/// The engine's environment variable that chooses the instances' scheduling.
pub(crate) const ENV: &str = "TESTGROUND_INSTANCE_SCHED";
/// The instances' time slice: the shortest the kernel accepts for a normal task.
pub(crate) const SLICE_NS: u64 = 100_000;

/// How instance processes are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InstanceSched {
    /// Start each instance in a session of its own (else only in a process group of its own).
    pub own_session: bool,
    /// Give each instance this time slice (ns).
    pub slice: Option<u64>,
}

impl Default for InstanceSched {
    fn default() -> Self {
        InstanceSched {
            own_session: true,
            slice: Some(SLICE_NS),
        }
    }
}

impl InstanceSched {
    /// Neither: as before this module existed.
    pub(crate) const OFF: InstanceSched = InstanceSched {
        own_session: false,
        slice: None,
    };

    /// The choice in [`ENV`] (`None`: unset); an invalid value is an error naming the values.
    pub(crate) fn parse(value: Option<&str>) -> Result<InstanceSched, String> {
        let Some(v) = value.map(str::trim) else {
            return Ok(InstanceSched::default());
        };
        let slice = Some(SLICE_NS);
        Ok(match v.to_ascii_lowercase().as_str() {
            "" | "on" | "true" | "1" | "yes" => InstanceSched::default(),
            "off" | "false" | "0" | "no" => InstanceSched::OFF,
            "session" => InstanceSched {
                own_session: true,
                slice: None,
            },
            "slice" => InstanceSched {
                own_session: false,
                slice,
            },
            _ => {
                return Err(format!(
                    "{ENV}={v} is none of on, off, session, slice; using on"
                ));
            }
        })
    }

    /// The value of [`ENV`] that [`InstanceSched::parse`] reads back as `self` (to hand the
    /// engine's settled choice to helper processes).
    pub(crate) fn env_value(&self) -> &'static str {
        match (self.own_session, self.slice.is_some()) {
            (true, true) => "on",
            (true, false) => "session",
            (false, true) => "slice",
            (false, false) => "off",
        }
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
    }
}

/// The run log's line when the kernel does not give the slice.
fn refused_line(slice: u64, e: &io::Error) -> String {
    format!(
        "instances run with the kernel's default time slice, so under CPU load their wake-ups \
         can wait longer for other work: a {} ms slice (sched_setattr) was refused: {e}; \
         {ENV}=session does without it and silences this",
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
        for v in ["on", "off", "session", "slice"] {
            let s = InstanceSched::parse(Some(v)).unwrap();
            assert_eq!(s.env_value(), v);
            assert_eq!(InstanceSched::parse(Some(s.env_value())), Ok(s));
        }
        let e = InstanceSched::parse(Some("fast")).unwrap_err();
        assert!(e.contains(ENV) && e.contains("session"), "{e}");
    }

    #[test]
    fn a_refusal_says_what_it_costs_and_how_to_silence_it() {
        let line = refused_line(SLICE_NS, &io::Error::from_raw_os_error(1));
        assert!(line.contains("0.1 ms slice"), "{line}");
        assert!(line.contains("Operation not permitted"), "{line}");
        assert!(line.contains("TESTGROUND_INSTANCE_SCHED=session"), "{line}");
    }

    /// Runs `sh` as an instance is started (`exec::instance_command`: `tg_sys::spawn`, with
    /// `sched` applied); it reports its pid, process group, session, its time slice and a
    /// forked child's (`/proc/<pid>/sched`, `se.slice`).
    async fn report(sched: InstanceSched) -> Vec<u64> {
        let mut cmd = crate::exec::instance_command(
            "/bin/sh".as_ref(),
            std::iter::empty::<(&str, &str)>(),
            sched,
        );
        cmd.arg("-c").arg(
            "s=$(cut -d' ' -f5,6 /proc/$$/stat); \
             a=$(grep '^se.slice' /proc/$$/sched | tr -dc 0-9); \
             b=$(cat /proc/self/sched | grep '^se.slice' | tr -dc 0-9); \
             echo $$ $s $a $b",
        );
        let mut child = tg_sys::spawn::AsyncChild::new(cmd.spawn().unwrap()).unwrap();
        let out = child.take_stdout().unwrap();
        let status = child.wait().await.unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(out), &mut text).unwrap();
        assert!(status.success(), "{status:?}: {text}");
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
