//! Scheduling of the calling thread: the real-time policy and timer slack that keep the packet
//! pump's wake-ups on time when other work shares the CPU, the facts that explain why the
//! kernel refused real-time scheduling, and the custom time slice that lets test instances wake
//! up ahead of CPU-bound work without a larger share of the CPU.
//!
//! Everything here acts on the calling *thread* (Linux treats pid 0 in `sched_setscheduler`,
//! `sched_setattr` and `prctl(PR_SET_TIMERSLACK)` as the calling task), never on the whole
//! process: only the pump thread is made real-time, so the engine's other threads and the
//! instances it spawns keep normal scheduling. `SCHED_RESET_ON_FORK` is set as well, so that
//! nothing forked from a real-time thread inherits the policy. A time slice, by contrast, is
//! meant to be inherited: it is set in an instance's process before `exec` ([`slice_on_exec`])
//! and passes to every thread and child it starts.
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

/// Sets the calling thread's nice value (Linux keeps one per thread). Raising it is always
/// allowed; lowering it below the current value needs `CAP_SYS_NICE`.
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: plain system calls on values; gettid names the calling thread, which exists.
    let r = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's nice value.
pub fn thread_nice() -> io::Result<i32> {
    // SAFETY: as in `set_thread_nice`. getpriority may return -1 legitimately, so errno is
    // cleared first and read after.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, tid);
        if n == -1 && *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n)
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

/// The shortest and the longest time slice the kernel accepts for a normal task (it clamps
/// `sched_runtime` to this range).
pub const SLICE_RANGE: std::ops::RangeInclusive<u64> = 100_000..=100_000_000;

/// `struct sched_attr` of `include/uapi/linux/sched/types.h`, its first version
/// (`SCHED_ATTR_SIZE_VER0`, 48 bytes): the utilization clamps that follow are left out, so the
/// kernel neither reads nor writes them.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

const SCHED_ATTR_SIZE_VER0: u32 = 48;

fn getattr(tid: i32) -> io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    // SAFETY: `attr` is a writable `SchedAttr` of the size passed (48 bytes, VER0), valid for
    // the duration of the call; the kernel writes at most that many bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut attr as *mut SchedAttr,
            SCHED_ATTR_SIZE_VER0,
            0,
        )
    };
    if r == 0 {
        Ok(attr)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Gives the calling thread a time slice of `nanos` (the kernel clamps it to [`SLICE_RANGE`]),
/// keeping its policy and nice value.
///
/// Since Linux 6.12 (EEVDF) a normal task's `sched_runtime` is its requested slice: a shorter
/// slice gives it an earlier virtual deadline, so when it wakes up it preempts a task that is
/// using a longer one (a CPU-bound loop) at once, instead of waiting for that task's slice to
/// end; its share of the CPU (its weight, from the nice value) stays the same. Older kernels
/// accept and ignore the value for normal tasks: [`thread_slice`] then does not report it.
/// Fails with `EINVAL` for a thread that is not `SCHED_OTHER` or `SCHED_BATCH` (a real-time
/// thread has no slice). Async-signal-safe (two system calls on the stack, no allocation but
/// an error value from a raw errno), so it may run between `fork` and `exec`.
pub fn set_thread_slice(nanos: u64) -> io::Result<()> {
    let mut attr = getattr(0)?;
    let policy = attr.policy as i32;
    if policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    attr.size = SCHED_ATTR_SIZE_VER0;
    // Keeps SCHED_RESET_ON_FORK if it was set; nothing else is a flag of a normal task.
    attr.flags &= libc::SCHED_FLAG_RESET_ON_FORK as u64;
    attr.priority = 0;
    attr.runtime = nanos;
    attr.deadline = 0;
    attr.period = 0;
    // SAFETY: `attr` is an initialised `SchedAttr` of the size it states, read by the kernel
    // during the call only; pid 0 names the calling thread.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The time slice of thread `tid` (0: the calling thread) in nanoseconds, as `sched_getattr`
/// reports it for a normal task: its custom slice if it has one, else the kernel's default
/// (0.7 ms × (1 + log2 CPUs) with EEVDF); `None` for a real-time thread.
pub fn thread_slice(tid: i32) -> io::Result<Option<u64>> {
    let attr = getattr(tid)?;
    let policy = attr.policy as i32;
    Ok((policy == libc::SCHED_OTHER || policy == libc::SCHED_BATCH).then_some(attr.runtime))
}

/// Checks that this kernel gives a normal thread a custom time slice of `nanos`, on a scratch
/// thread (the caller's own scheduling is not touched): the slice must be accepted and then
/// reported back. Fails with the kernel's error, or with `Unsupported` when the kernel accepts
/// the value without using it (before Linux 6.12).
pub fn probe_slice(nanos: u64) -> io::Result<()> {
    let want = nanos.clamp(*SLICE_RANGE.start(), *SLICE_RANGE.end());
    let probe = std::thread::Builder::new()
        .name("tg-slice-probe".into())
        .spawn(move || -> io::Result<Option<u64>> {
            set_thread_slice(want)?;
            thread_slice(0)
        })?;
    let got = probe
        .join()
        .map_err(|_| io::Error::other("the time slice probe panicked"))??;
    if got == Some(want) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "this kernel does not give normal tasks a custom time slice (it needs Linux \
                 6.12 or later; asked for {want} ns, the thread reports {})",
                got.map_or_else(|| "no slice".to_string(), |g| format!("{g} ns"))
            ),
        ))
    }
}

/// Makes `cmd`'s child take a time slice of `nanos` before it executes anything, so that the
/// program and every thread and process it starts have it (the kernel copies it on `fork` and
/// `clone`, unless `SCHED_RESET_ON_FORK` is set). Best effort: a refusal leaves the child with
/// the default slice and the spawn goes on; callers learn whether the kernel allows it from
/// [`probe_slice`] first. Composes with other `pre_exec` hooks (each runs in the order it was
/// added).
pub fn slice_on_exec(cmd: &mut impl crate::spawn::PreExec, nanos: u64) {
    // SAFETY: the closure runs in the child before exec and only makes the two system calls
    // of `set_thread_slice` on its stack: no allocation (its error, dropped here, is a raw
    // errno), no lock, no write outside its stack, so it is async-signal-safe and suits a
    // child that shares our memory (`spawn::Command`).
    unsafe {
        cmd.pre_exec_hook(move || {
            let _ = set_thread_slice(nanos);
            Ok(())
        });
    }
}

/// The kernel's CPU latency request file (PM QoS): while a process holds it open with a value
/// written, no CPU enters an idle state whose exit latency exceeds that many microseconds.
pub const CPU_LATENCY_FILE: &str = "/dev/cpu_dma_latency";

/// A CPU latency request, in force while this value lives (the kernel drops it when the file
/// is closed, so a dead process leaves nothing behind).
#[derive(Debug)]
pub struct CpuLatencyHold {
    _file: fs::File,
}

/// Asks that no CPU take longer than `micros` µs to leave its idle state. With 0, idle CPUs
/// poll instead of halting, so a wake-up (a timer, a packet, another thread's signal) finds
/// them running: on a VM, where a halted virtual CPU waits for the host to run it again, that
/// takes a hundred microseconds or more off each wake-up of an idle machine, at the cost of
/// the idle CPUs' time. Needs root (the file is mode 0600).
pub fn hold_cpu_latency(micros: i32) -> io::Result<CpuLatencyHold> {
    use std::io::Write;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(CPU_LATENCY_FILE)
        .map_err(|e| io::Error::new(e.kind(), format!("open {CPU_LATENCY_FILE}: {e}")))?;
    // The kernel takes a binary s32 in the machine's byte order.
    file.write_all(&micros.to_ne_bytes())
        .map_err(|e| io::Error::new(e.kind(), format!("write {CPU_LATENCY_FILE}: {e}")))?;
    Ok(CpuLatencyHold { _file: file })
}

/// The CPU latency the kernel currently enforces (the smallest request held), in µs. Opening
/// the file adds a request at the default (no limit) for as long as it is open, which changes
/// nothing.
pub fn cpu_latency_target() -> io::Result<i32> {
    use std::io::Read;
    let mut buf = [0u8; 4];
    fs::File::open(CPU_LATENCY_FILE)?.read_exact(&mut buf)?;
    Ok(i32::from_ne_bytes(buf))
}

/// Makes `cmd`'s child take a timer slack of `nanos` before it executes anything; the kernel
/// keeps it across `exec` and copies it to every thread and child. Best effort, as
/// [`slice_on_exec`].
pub fn timer_slack_on_exec(cmd: &mut impl crate::spawn::PreExec, nanos: u64) {
    // SAFETY: the closure runs in the child before exec and only makes the prctl(2) call of
    // `set_timer_slack`, on its stack, without allocating (its error is a raw errno, dropped),
    // so it is async-signal-safe.
    unsafe {
        cmd.pre_exec_hook(move || {
            let _ = set_timer_slack(nanos);
            Ok(())
        });
    }
}

/// Makes `cmd`'s child start a session of its own (`setsid`) before it executes anything, so
/// that it is also its own process group (its pid is the group's id, as with
/// `process_group(0)`, which must not be set as well: a group leader cannot start a session).
///
/// Why a session: with the kernel's automatic grouping (`CONFIG_SCHED_AUTOGROUP`,
/// `/proc/sys/kernel/sched_autogroup_enabled` = 1, the default of most distributions) every
/// session is one scheduling group, and groups share the CPU as equals. A process left in its
/// parent's session competes as part of that group: when the group's other members (a
/// CPU-bound tool started from the same shell, a test's `stress`) have used its share, a
/// wake-up waits until the group's turn, milliseconds under load. In a session of its own, a
/// mostly sleeping process is a group that is owed time when it wakes, so it runs at once;
/// a CPU-bound one gets one group's share, as a process does without automatic grouping.
pub fn own_session_on_exec(cmd: &mut impl crate::spawn::PreExec) {
    // SAFETY: the closure runs in the child before exec and only calls setsid(2), which is
    // async-signal-safe; its error is a raw errno (no allocation).
    unsafe {
        cmd.pre_exec_hook(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes `cmd`'s child the leader of a process group of its own (`setpgid(0, 0)`, as
/// `process_group(0)` of the standard command) before it executes anything.
pub fn own_process_group_on_exec(cmd: &mut impl crate::spawn::PreExec) {
    // SAFETY: the closure runs in the child before exec and only calls setpgid(2), which is
    // async-signal-safe; its error is a raw errno (no allocation).
    unsafe {
        cmd.pre_exec_hook(|| {
            if libc::setpgid(0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes the calling process the leader of a new session (and process group): what
/// [`own_session_on_exec`] does for a child, for a process that stands in for one (a
/// benchmark's endpoints). Fails with `EPERM` when the process already leads a process group.
pub fn start_session() -> io::Result<()> {
    nix::unistd::setsid().map(|_| ()).map_err(io::Error::from)
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

    /// A request is in force while held and gone when dropped. Root only (the file is 0600).
    #[test]
    fn a_thread_raises_its_own_nice_value_only() {
        let before = thread_nice().unwrap();
        let (own, other) = std::thread::spawn(move || {
            // Raised (a test run under `nice` may start above 0).
            set_thread_nice(before.max(7)).unwrap();
            let own = thread_nice().unwrap();
            let other = std::thread::spawn(|| thread_nice().unwrap())
                .join()
                .unwrap();
            (own, other)
        })
        .join()
        .unwrap();
        // Its own value, inherited by a thread it starts; the test's thread keeps its own.
        assert_eq!((own, other), (before.max(7), before.max(7)));
        assert_eq!(thread_nice().unwrap(), before);
    }

    #[test]
    fn a_cpu_latency_request_lasts_as_long_as_its_hold() {
        let required = std::env::var("TG_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1");
        let before = match cpu_latency_target() {
            Ok(t) => t,
            Err(e) if !required => {
                eprintln!("skipped: cannot read {CPU_LATENCY_FILE}: {e}");
                return;
            }
            Err(e) => panic!("TG_REQUIRE_PRIVILEGED=1 but {CPU_LATENCY_FILE}: {e}"),
        };
        // Only this test in this binary makes requests; another process's would be lower.
        let asked = 7;
        if before <= asked {
            eprintln!("skipped: another process holds a CPU latency of {before} µs");
            return;
        }
        let hold = hold_cpu_latency(asked).unwrap();
        assert_eq!(cpu_latency_target().unwrap(), asked);
        drop(hold);
        assert_eq!(cpu_latency_target().unwrap(), before);
    }

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

    /// `se.slice` of `/proc/<pid>/task/<tid>/sched` (kernels with the scheduler's debug files).
    fn proc_slice(path: &str) -> Option<u64> {
        let text = fs::read_to_string(path).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("se.slice"))
            .and_then(|v| v.trim_start_matches([' ', ':']).trim().parse().ok())
    }

    #[test]
    fn a_thread_takes_a_time_slice_or_the_probe_says_why_not() {
        match probe_slice(300_000) {
            Ok(()) => std::thread::spawn(|| {
                let tid = nix::unistd::gettid().as_raw();
                set_thread_slice(300_000).unwrap();
                assert_eq!(thread_slice(0).unwrap(), Some(300_000));
                assert_eq!(thread_slice(tid).unwrap(), Some(300_000));
                if let Some(s) = proc_slice("/proc/thread-self/sched") {
                    assert_eq!(s, 300_000);
                }
                // Out of range: the kernel clamps.
                set_thread_slice(1).unwrap();
                assert_eq!(thread_slice(0).unwrap(), Some(*SLICE_RANGE.start()));
            })
            .join()
            .unwrap(),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn a_real_time_thread_has_no_slice_to_set() {
        std::thread::spawn(|| {
            if set_thread_fifo(1).is_err() {
                return;
            }
            assert_eq!(thread_slice(0).unwrap(), None);
            assert_eq!(
                set_thread_slice(300_000).unwrap_err().raw_os_error(),
                Some(libc::EINVAL)
            );
            assert_eq!(thread_policy().unwrap(), Policy::Fifo(1));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_spawned_program_and_its_children_inherit_the_slice() {
        if let Err(e) = probe_slice(400_000) {
            println!("skipping: {e}");
            return;
        }
        // The shell reports its own slice, then its child's (a forked `cat`; the trailing `:`
        // keeps the shell from exec'ing it in place).
        let mut cmd = std::process::Command::new("sh");
        cmd.args([
            "-c",
            "grep '^se.slice' /proc/$$/sched; cat /proc/self/sched | grep '^se.slice'; :",
        ]);
        slice_on_exec(&mut cmd, 400_000);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let slices: Vec<u64> = text
            .lines()
            .filter_map(|l| l.split(':').nth(1)?.trim().parse().ok())
            .collect();
        if slices.is_empty() {
            // No scheduler debug files: check the program itself through sched_getattr.
            let mut child = std::process::Command::new("sleep");
            child.arg("30");
            slice_on_exec(&mut child, 400_000);
            let mut child = child.spawn().unwrap();
            let slice = thread_slice(child.id() as i32);
            let _ = child.kill();
            let _ = child.wait();
            assert_eq!(slice.unwrap(), Some(400_000));
            return;
        }
        assert_eq!(slices, vec![400_000, 400_000], "{text}");
    }

    #[test]
    fn a_spawned_program_leads_a_session_of_its_own() {
        let mut cmd = std::process::Command::new("sh");
        // Field 6 of /proc/<pid>/stat is the session id; the shell's pid is `$$`.
        cmd.args([
            "-c",
            "echo $$ $(cut -d' ' -f6 /proc/$$/stat) $(cut -d' ' -f5 /proc/$$/stat)",
        ]);
        own_session_on_exec(&mut cmd);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let ids: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(ids.len(), 3, "{text}");
        // pid = session id = process group id.
        assert_eq!(ids[0], ids[1], "{text}");
        assert_eq!(ids[0], ids[2], "{text}");
    }
}
