//! Scheduling of the calling thread: the real-time policy and timer slack that keep the packet
//! pump's wake-ups on time when other work shares the CPU, and the facts that explain why the
//! kernel refused real-time scheduling.
//!
//! Everything here acts on the calling *thread* (Linux treats pid 0 in `sched_setscheduler` and
//! `prctl(PR_SET_TIMERSLACK)` as the calling task), never on the whole process: only the pump
//! thread is made real-time, so the engine's other threads and the instances it spawns keep
//! normal scheduling. `SCHED_RESET_ON_FORK` is set as well, so that nothing forked from a
//! real-time thread inherits the policy.

use std::fs;
use std::io;
use std::path::PathBuf;

/// A thread's scheduling policy, as `sched_getscheduler` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// `SCHED_OTHER` (the normal, fair policy), `SCHED_BATCH` or `SCHED_IDLE`.
    Normal,
    /// `SCHED_FIFO` with its priority (1 to 99).
    Fifo(i32),
    /// `SCHED_RR` with its priority.
    RoundRobin(i32),
    /// A policy this module does not name (e.g. `SCHED_DEADLINE`).
    Other(i32),
}

/// Makes the calling thread `SCHED_FIFO` at `priority` (1 to 99), with `SCHED_RESET_ON_FORK`.
/// Fails with the kernel's error (typically `EPERM`: see [`RtFacts`] for why).
pub fn set_thread_fifo(priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is an initialised `sched_param` that outlives the call, which only reads
    // it; pid 0 names the calling thread. No memory is handed to the kernel beyond the call.
    let r = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Puts the calling thread back to the normal policy (`SCHED_OTHER`, priority 0).
pub fn set_thread_normal() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: as in `set_thread_fifo`: a valid parameter read during the call only.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's scheduling policy.
pub fn thread_policy() -> io::Result<Policy> {
    // SAFETY: no arguments but the pid (0, the calling thread); nothing is written to memory.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, writable `sched_param` for the duration of the call.
    if unsafe { libc::sched_getparam(0, &mut param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(match policy & !libc::SCHED_RESET_ON_FORK {
        libc::SCHED_OTHER | libc::SCHED_BATCH | libc::SCHED_IDLE => Policy::Normal,
        libc::SCHED_FIFO => Policy::Fifo(param.sched_priority),
        libc::SCHED_RR => Policy::RoundRobin(param.sched_priority),
        p => Policy::Other(p),
    })
}

/// Sets the calling thread's timer slack: how much later than asked the kernel may fire its
/// timeouts (epoll, nanosleep) to batch wake-ups. The default is 50 µs; 1 ns is the least (0
/// would mean "back to the default").
pub fn set_timer_slack(nanos: u64) -> io::Result<()> {
    let nanos = libc::c_ulong::try_from(nanos.max(1)).unwrap_or(libc::c_ulong::MAX);
    // SAFETY: PR_SET_TIMERSLACK takes its value by integer and touches no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, nanos, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's timer slack in nanoseconds.
pub fn timer_slack() -> io::Result<u64> {
    // SAFETY: PR_GET_TIMERSLACK returns the value and touches no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0) };
    u64::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// What decides whether the calling thread may become real-time, read when the kernel said no,
/// so the message can say which one it was.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RtFacts {
    /// `/proc/sys/kernel/sched_rt_runtime_us` (-1: no limit; 0: no real-time time at all).
    pub system_runtime_us: Option<i64>,
    /// The thread's cgroup in the v1 `cpu` hierarchy, with the directory where its
    /// `cpu.rt_runtime_us` lives, when that hierarchy is mounted and the file exists (kernels
    /// with `CONFIG_RT_GROUP_SCHED`). A cgroup with 0 has no real-time budget: the kernel then
    /// refuses `SCHED_FIFO` for its threads, even to root.
    pub cgroup: Option<(String, PathBuf, i64)>,
    /// `RLIMIT_RTPRIO` (soft): the highest priority an unprivileged thread may take.
    pub rtprio_limit: Option<u64>,
    /// Whether the process has `CAP_SYS_NICE` in its effective set (which overrides the limit).
    pub cap_sys_nice: Option<bool>,
}

impl RtFacts {
    /// Reads the facts for the calling thread. Anything unreadable is `None`.
    pub fn read() -> RtFacts {
        RtFacts {
            system_runtime_us: fs::read_to_string("/proc/sys/kernel/sched_rt_runtime_us")
                .ok()
                .and_then(|s| s.trim().parse().ok()),
            cgroup: cpu_cgroup_budget(),
            rtprio_limit: rlimit_rtprio(),
            cap_sys_nice: cap_sys_nice(),
        }
    }

    /// Why `SCHED_FIFO` at `priority` was refused with `err`, and how to allow it, in one line.
    pub fn explain(&self, priority: i32, err: &io::Error) -> String {
        if self.system_runtime_us == Some(0) {
            return format!(
                "{err}: the kernel gives real-time threads no time \
                 (/proc/sys/kernel/sched_rt_runtime_us = 0; set it to e.g. 950000)"
            );
        }
        if let Some((cg, dir, 0)) = &self.cgroup {
            return format!(
                "{err}: this thread's cpu cgroup {cg} has no real-time budget \
                 ({}/cpu.rt_runtime_us = 0; give it one, e.g. 100000, after its parent cgroups)",
                dir.display()
            );
        }
        let privileged = self.cap_sys_nice == Some(true);
        if !privileged
            && self
                .rtprio_limit
                .is_some_and(|l| l < u64::try_from(priority).unwrap_or(0))
        {
            return format!(
                "{err}: without CAP_SYS_NICE a thread may take real-time priority {} at most \
                 (RLIMIT_RTPRIO; raise it, e.g. `ulimit -r {priority}` or `rtprio` in \
                 /etc/security/limits.conf, or grant CAP_SYS_NICE)",
                self.rtprio_limit.unwrap_or(0)
            );
        }
        format!("{err}")
    }
}

/// The thread's v1 `cpu` cgroup and its `cpu.rt_runtime_us`, if that hierarchy is mounted.
fn cpu_cgroup_budget() -> Option<(String, PathBuf, i64)> {
    let membership = fs::read_to_string("/proc/thread-self/cgroup").ok()?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let dir = cpu_cgroup_dir(&membership, &mountinfo)?;
    let budget = fs::read_to_string(dir.1.join("cpu.rt_runtime_us"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some((dir.0, dir.1, budget))
}

/// The v1 `cpu` cgroup path named in a `/proc/<pid>/cgroup` text and its directory under the
/// mount that `mountinfo` lists for that hierarchy (which may be mounted from a sub-cgroup, as
/// in a container: the mount's root is then cut from the path).
fn cpu_cgroup_dir(membership: &str, mountinfo: &str) -> Option<(String, PathBuf)> {
    let path = membership.lines().find_map(|line| {
        // "<id>:<controllers>:<path>"; the v2 line has no controllers.
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "cpu")
            .then(|| path.to_string())
    })?;
    let (root, mount) = mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut fs_fields = right.split(' ');
        if fs_fields.next()? != "cgroup" {
            return None;
        }
        let super_opts = fs_fields.nth(1)?;
        if !super_opts.split(',').any(|o| o == "cpu") {
            return None;
        }
        let mut fields = left.split(' ');
        let root = crate::cgroup::unescape(fields.nth(3)?);
        let mount = crate::cgroup::unescape(fields.next()?);
        Some((root, mount))
    })?;
    let rel = if root == "/" {
        path.as_str()
    } else {
        path.strip_prefix(root.as_str()).unwrap_or(path.as_str())
    };
    let dir = PathBuf::from(mount).join(rel.trim_start_matches('/'));
    Some((path, dir))
}

fn rlimit_rtprio() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable `rlimit` for the duration of the call.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_RTPRIO, &mut lim) };
    (r == 0).then_some(lim.rlim_cur)
}

/// `CAP_SYS_NICE` (bit 23) in the effective set, from `/proc/thread-self/status`.
fn cap_sys_nice() -> Option<bool> {
    let status = fs::read_to_string("/proc/thread-self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let caps = u64::from_str_radix(hex, 16).ok()?;
    Some(caps & (1 << 23) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_cgroup_is_found_under_its_mount() {
        let membership = "9:name=systemd:/\n4:memory:/x\n1:cpu,cpuacct:/docker/abc\n0::/\n";
        let host = "30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n\
                    31 25 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            cpu_cgroup_dir(membership, host),
            Some((
                "/docker/abc".to_string(),
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/docker/abc")
            ))
        );
        // In a container the hierarchy is mounted from the container's own cgroup.
        let container = "30 25 0:27 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cpu_cgroup_dir(membership, container).map(|d| d.1),
            Some(PathBuf::from("/sys/fs/cgroup/cpu"))
        );
        // cpuacct alone is not the cpu controller; a v2-only host has no such hierarchy.
        let acct_only = "30 25 0:27 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n";
        assert_eq!(cpu_cgroup_dir(membership, acct_only), None);
        assert_eq!(cpu_cgroup_dir("0::/user.slice\n", host), None);
    }

    #[test]
    fn a_refusal_names_its_cause_and_the_remedy() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        let no_budget = RtFacts {
            system_runtime_us: Some(950_000),
            cgroup: Some((
                "/docker/abc".into(),
                PathBuf::from("/sys/fs/cgroup/cpu/docker/abc"),
                0,
            )),
            rtprio_limit: Some(0),
            cap_sys_nice: Some(true),
        };
        let m = no_budget.explain(10, &eperm);
        assert!(m.contains("/docker/abc"), "{m}");
        assert!(
            m.contains("/sys/fs/cgroup/cpu/docker/abc/cpu.rt_runtime_us = 0"),
            "{m}"
        );
        let unprivileged = RtFacts {
            system_runtime_us: Some(950_000),
            cgroup: None,
            rtprio_limit: Some(0),
            cap_sys_nice: Some(false),
        };
        let m = unprivileged.explain(10, &eperm);
        assert!(
            m.contains("RLIMIT_RTPRIO") && m.contains("ulimit -r 10"),
            "{m}"
        );
        let none_at_all = RtFacts {
            system_runtime_us: Some(0),
            ..RtFacts::default()
        };
        assert!(
            none_at_all
                .explain(10, &eperm)
                .contains("sched_rt_runtime_us = 0")
        );
        // Nothing known: the kernel's error alone.
        assert_eq!(RtFacts::default().explain(10, &eperm), eperm.to_string());
    }

    #[test]
    fn a_thread_becomes_realtime_or_says_why_not() {
        std::thread::spawn(|| {
            set_timer_slack(1).unwrap();
            assert_eq!(timer_slack().unwrap(), 1);
            match set_thread_fifo(1) {
                Ok(()) => {
                    assert_eq!(thread_policy().unwrap(), Policy::Fifo(1));
                    set_thread_normal().unwrap();
                    assert_eq!(thread_policy().unwrap(), Policy::Normal);
                }
                Err(e) => {
                    // Refused (unprivileged, or a cgroup without budget): nothing changed.
                    assert_eq!(thread_policy().unwrap(), Policy::Normal);
                    assert!(!RtFacts::read().explain(1, &e).is_empty());
                }
            }
        })
        .join()
        .unwrap();
    }
}
