//! Tying helper processes (toolchains, build commands) to the lifetime of their owner.
//!
//! Three pieces, used together by the builders:
//! - [`die_with_parent`]: the kernel kills a child when the thread that started it dies, even by
//!   SIGKILL, which no user-space cleanup survives.
//! - [`is_alive`] (with [`crate::proc::start_time`]): identify a process by pid *and* start time, so that a
//!   reused pid is never taken for the original owner.
//! - [`kill_marked`]: kill every process whose environment carries a marker variable. Children
//!   that left the process group (`setsid`, double forks) keep their environment, so this finds
//!   what a process-group kill misses. The kill goes through a pidfd, which cannot reach a
//!   different process that reused the pid.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Makes the kernel SIGKILL the child started by `cmd` when its parent dies.
///
/// Linux delivers the signal when the *thread* that forked the child exits, not only the
/// process; spawn from a thread that lives as long as the child should (the main thread or a
/// tokio worker, not a short-lived blocking-pool thread). Only the direct child is covered:
/// its own children need [`kill_marked`] or a process-group kill.
pub fn die_with_parent(cmd: &mut impl crate::spawn::PreExec) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the child before exec and only calls prctl(2), getppid(2)
    // and reads errno, which are async-signal-safe; it allocates nothing (its errors are raw
    // errnos), so it also suits a child that shares our memory (`spawn::Command`).
    unsafe {
        cmd.pre_exec_hook(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl; then no signal will come.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Whether the process that had `pid` and started at `start_time` is still running.
pub fn is_alive(pid: u32, start_time: u64) -> bool {
    crate::proc::start_time(pid as i32) == Some(start_time)
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory
    // is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub(crate) fn pidfd_signal(fd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: the descriptor is valid for the call; a null siginfo is allowed and means "as
    // kill(2) would send it".
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until the process behind `fd` has exited (a pidfd turns readable then), at most
/// until `deadline`. Returns whether it exited.
fn wait_exited(fd: &OwnedFd, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and we pass a count of 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            return true;
        }
        if r == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Whether `pid` carries the marker: `key` set to one of `values` in its environment, and a
/// start at or after `since` (clock ticks since boot; 0 for any).
fn marked(pid: i32, key: &str, values: &HashSet<String>, since: u64) -> bool {
    crate::proc::environ_value(pid, key).is_some_and(|v| values.contains(&v))
        && (since == 0 || crate::proc::start_time(pid).is_some_and(|t| t >= since))
}

/// Pids of the live processes whose environment has `key` set to one of `values` and that
/// started at or after `since` (clock ticks since boot, as [`crate::proc::start_time`]; 0 for
/// any).
pub fn pids_marked(key: &str, values: &HashSet<String>, since: u64) -> io::Result<Vec<i32>> {
    let me = std::process::id() as i32;
    Ok(crate::proc::all_pids()?
        .into_iter()
        .filter(|&pid| pid != me && marked(pid, key, values, since))
        .collect())
}

/// SIGKILLs every process whose environment has `key` set to one of `values` and that started
/// at or after `since` (0 for any), then waits (at most `wait`) until they have exited. Returns
/// how many were killed.
///
/// Each candidate is first pinned with a pidfd, then its environment is read, then it is
/// checked to be still alive through that pidfd before the kill: a pid reused in between
/// refers to another process, which the pidfd cannot signal. On kernels without pidfds the
/// start time is compared before and after reading the environment instead.
///
/// A process in the middle of `execve` shows an empty environment for an instant, and one
/// forked while the scan runs is not listed yet; so the scan runs at least twice, and again as
/// long as the previous pass found someone.
pub fn kill_marked(
    key: &str,
    values: &HashSet<String>,
    since: u64,
    wait: Duration,
) -> io::Result<usize> {
    const MAX_PASSES: usize = 4;
    if values.is_empty() {
        return Ok(0);
    }
    let mut killed = Vec::new();
    // A killed process stays listed (and marked) until it is gone: count each once.
    let mut seen = HashSet::new();
    let mut count = 0;
    for pass in 0..MAX_PASSES {
        let found = kill_pass(key, values, since, &mut killed, &mut seen)?;
        count += found;
        if pass > 0 && found == 0 {
            break;
        }
    }
    let deadline = Instant::now() + wait;
    for fd in &killed {
        wait_exited(fd, deadline);
    }
    Ok(count)
}

/// One scan of `/proc` for [`kill_marked`]; pidfds of the killed processes go to `killed`.
fn kill_pass(
    key: &str,
    values: &HashSet<String>,
    since: u64,
    killed: &mut Vec<OwnedFd>,
    seen: &mut HashSet<i32>,
) -> io::Result<usize> {
    let me = std::process::id() as i32;
    let mut count = 0;
    for pid in crate::proc::all_pids()? {
        if pid == me || seen.contains(&pid) {
            continue;
        }
        match pidfd_open(pid) {
            Ok(fd) => {
                // Signal 0 checks that the pinned process still exists, so the environment
                // just read was its own.
                if marked(pid, key, values, since)
                    && pidfd_signal(&fd, 0).is_ok()
                    && pidfd_signal(&fd, libc::SIGKILL).is_ok()
                {
                    count += 1;
                    seen.insert(pid);
                    killed.push(fd);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                let Some(before) = crate::proc::start_time(pid) else {
                    continue;
                };
                if marked(pid, key, values, since)
                    && crate::proc::start_time(pid) == Some(before)
                    && nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    )
                    .is_ok()
                {
                    count += 1;
                    seen.insert(pid);
                }
            }
            // Gone already, or not ours to see.
            Err(_) => {}
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn start_time_identifies_this_process() {
        let me = std::process::id();
        let t = crate::proc::own_start_time().unwrap();
        assert!(is_alive(me, t));
        assert!(!is_alive(me, t + 1));
        assert_eq!(crate::proc::start_time(i32::MAX), None);
    }

    #[test]
    fn marked_processes_are_killed_even_in_their_own_session() {
        let marker = format!("tg-lifetime-test-{}", std::process::id());
        let values: HashSet<String> = [marker.clone()].into();
        // `setsid` puts the sleep out of reach of a process-group kill; only the marker finds it.
        let mut child = Command::new("setsid")
            .args(["sleep", "300"])
            .env("TG_LIFETIME_TEST", &marker)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // The marker is visible once the child has exec'd; /proc shows the parent's copy before.
        let started = Instant::now();
        while pids_marked("TG_LIFETIME_TEST", &values, 0).unwrap() != vec![pid] {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "child never showed up"
            );
            std::thread::yield_now();
        }
        let other: HashSet<String> = ["something-else".to_owned()].into();
        assert_eq!(
            kill_marked("TG_LIFETIME_TEST", &other, 0, Duration::ZERO).unwrap(),
            0
        );
        assert_eq!(
            kill_marked("TG_LIFETIME_TEST", &values, 0, Duration::from_secs(5)).unwrap(),
            1
        );
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert!(
            pids_marked("TG_LIFETIME_TEST", &values, 0)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_child_dies_with_its_parent() {
        // The kernel tracks the forking thread: when it ends, the child gets the signal. That
        // is the same event as the death of a whole engine, without killing the test.
        let handle = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("300").stdin(Stdio::null());
            die_with_parent(&mut cmd);
            cmd.spawn().unwrap()
        });
        let mut child = handle.join().unwrap();
        // The spawning thread has exited, so the kernel sends SIGKILL to the child.
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }
}
