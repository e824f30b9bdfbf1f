//! Which process owns a task: a daemon or an embedded CLI sharing the home. A pid alone is not
//! an identity (Linux reuses pids), so an owner is its pid and its start time.

use std::path::Path;

/// A process, as recorded with a task it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Owner {
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/PID/stat` field 22); 0 when unknown
    /// (records written by an older version).
    pub start: u64,
}

/// The start time of `pid` in clock ticks since boot (`None` when gone or a zombie).
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    tg_sys::proc::start_time(i32::try_from(pid).ok()?)
}

impl Owner {
    /// No owner: a queued or finished task.
    pub(crate) const NONE: Owner = Owner { pid: 0, start: 0 };

    /// This process.
    pub(crate) fn me() -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            start: start_time(pid).unwrap_or(0),
        }
    }

    pub(crate) fn is_none(&self) -> bool {
        self.pid == 0
    }

    pub(crate) fn is_me(&self) -> bool {
        self.pid == std::process::id()
    }

    /// Still running: the pid exists and, when recorded, has the same start time.
    pub(crate) fn alive(&self) -> bool {
        if self.pid == 0 || !Path::new(&format!("/proc/{}", self.pid)).exists() {
            return false;
        }
        self.start == 0 || tg_sys::lifetime::is_alive(self.pid, self.start)
    }

    /// Sends SIGTERM to an embedded `testground` process so it cancels its task. Checks the
    /// identity and the command line first, so a recycled pid is never signalled.
    pub(crate) fn ask_to_cancel(&self) -> bool {
        if !self.alive() {
            return false;
        }
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid)).unwrap_or_default();
        let is_ours = cmdline
            .split(|b| *b == 0)
            .next()
            .map(|argv0| String::from_utf8_lossy(argv0).ends_with("testground"))
            .unwrap_or(false);
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        is_ours
            && nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            )
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_pid_and_start_time() {
        let me = Owner::me();
        assert!(me.alive() && me.is_me());
        assert!(me.start > 0);
        let reused = Owner {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(
            !reused.alive(),
            "same pid, other start time: another process"
        );
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let gone = Owner {
            pid,
            start: start_time(pid).unwrap_or(1),
        };
        child.wait().unwrap();
        assert!(!gone.alive());
        assert!(!Owner::NONE.alive());
    }
}
