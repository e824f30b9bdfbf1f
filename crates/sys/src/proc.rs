//! What `/proc` says about processes: which network namespace each lives in, when it started,
//! and whether its environment carries a marker; and how much CPU time the machine's host took
//! (steal).
//!
//! Used to kill what still runs in a live run's namespaces, to tell a run's owner from a
//! process that reused its pid (pid plus start time), and to find a run's processes by their
//! `TEST_RUN=<id>` marker. Only processes (thread-group leaders) are considered:
//! `/proc/PID/ns/net` is the leader's namespace, and a namespace that only a thread or an fd
//! holds is invisible here.

use std::collections::BTreeSet;
use std::fs;
use std::io;

use crate::error::with_context;

/// Network-namespace inode of a process (readlink /proc/PID/ns/net → "net:[N]"), or
/// NotFound if the process does not exist.
pub fn netns_inode_of(pid: i32) -> io::Result<u64> {
    let path = format!("/proc/{pid}/ns/net");
    let target = fs::read_link(&path).map_err(|e| with_context(e, format!("readlink {path}")))?;
    let text = target.to_string_lossy();
    text.strip_prefix("net:[")
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{path} points to unexpected {text:?}"),
            )
        })
}

/// Pids of all processes, as listed in /proc at the time of the call.
pub fn all_pids() -> io::Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").map_err(|e| with_context(e, "listing /proc"))? {
        let entry = entry.map_err(|e| with_context(e, "listing /proc"))?;
        if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Namespace inode of each pid whose namespace can be read. Processes exit while we
/// scan and some may be unreadable; those are skipped rather than failing the scan.
fn netns_of_all() -> io::Result<impl Iterator<Item = (i32, u64)>> {
    Ok(all_pids()?
        .into_iter()
        .filter_map(|pid| netns_inode_of(pid).ok().map(|inode| (pid, inode))))
}

/// Every pid whose network namespace is one of `inodes`. Only meaningful while the caller holds
/// those namespaces open: the kernel reuses the inode of a freed namespace.
pub fn pids_in_any_netns(inodes: &BTreeSet<u64>) -> io::Result<Vec<i32>> {
    Ok(netns_of_all()?
        .filter(|(_, ns)| inodes.contains(ns))
        .map(|(pid, _)| pid)
        .collect())
}

/// Every pid whose network namespace has inode `inode`.
pub fn pids_in_netns(inode: u64) -> io::Result<Vec<i32>> {
    pids_in_any_netns(&BTreeSet::from([inode]))
}

/// The start time of `pid` in clock ticks since boot (field 22 of `/proc/PID/stat`), or `None`
/// if there is no such process or it is a zombie (dead, only not yet reaped). With the pid it
/// identifies a process even after the pid is reused.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/PID/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split(' ');
    // Field 3, the state: a zombie or a dead task runs nothing any more.
    if matches!(fields.next()?, "Z" | "X") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The start time of this process (see [`start_time`]).
pub fn own_start_time() -> io::Result<u64> {
    start_time(std::process::id() as i32).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "cannot read this process's start time from /proc/self/stat",
        )
    })
}

/// The value of `key` in `pid`'s initial environment (`/proc/PID/environ`), if the process
/// is there and readable.
pub fn environ_value(pid: i32, key: &str) -> Option<String> {
    let environ = fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ_lookup(&environ, key).map(|v| String::from_utf8_lossy(v).into_owned())
}

fn environ_lookup<'a>(environ: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let prefix = format!("{key}=");
    environ
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
}

/// Clock ticks per second (`_SC_CLK_TCK`), the unit of [`start_time`].
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a configuration value; it has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// Seconds since boot, from `/proc/uptime`.
pub fn uptime() -> io::Result<f64> {
    let text =
        fs::read_to_string("/proc/uptime").map_err(|e| with_context(e, "read /proc/uptime"))?;
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/uptime"))
}

/// The machine's CPU time so far, summed over its CPUs, from the `cpu` line of `/proc/stat`
/// (clock ticks). `steal` is the time a virtual machine's CPUs wanted to run but its host ran
/// something else: time in which no timer of the guest fires and no thread of it runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Every field of the line (user, nice, system, idle, iowait, irq, softirq, steal); guest
    /// time is already counted in user and nice.
    pub total: u64,
    pub steal: u64,
}

impl CpuTimes {
    /// Reads `/proc/stat`.
    pub fn now() -> io::Result<CpuTimes> {
        let text =
            fs::read_to_string("/proc/stat").map_err(|e| with_context(e, "read /proc/stat"))?;
        CpuTimes::parse(&text)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/stat"))
    }

    /// The `cpu` line of a `/proc/stat` text. Kernels before 2.6.11 have no steal field: 0.
    pub fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let fields = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|f| f.parse::<u64>().ok())
            .collect::<Option<Vec<u64>>>()?;
        if fields.len() < 4 {
            return None;
        }
        Some(CpuTimes {
            total: fields.iter().sum(),
            steal: fields.get(7).copied().unwrap_or(0),
        })
    }

    /// The share of the CPU time from `earlier` to `self` that the host took (0 to 1), or
    /// `None` when no time passed. Since boot: `steal_since(&CpuTimes::default())`.
    pub fn steal_since(&self, earlier: &CpuTimes) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let steal = self.steal.checked_sub(earlier.steal)?;
        (total > 0).then(|| steal as f64 / total as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_sum_the_cpu_line_and_take_steal_from_its_eighth_field() {
        let stat = "cpu  100 10 50 800 5 0 3 32 7 0\ncpu0 50 5 25 400 2 0 1 16 0 0\nintr 1 2\n";
        let t = CpuTimes::parse(stat).unwrap();
        // Guest time (the 9th and 10th fields) is already in user and nice.
        assert_eq!(
            t,
            CpuTimes {
                total: 1000,
                steal: 32
            }
        );
        let later = CpuTimes {
            total: 1200,
            steal: 52,
        };
        assert_eq!(later.steal_since(&t), Some(0.1));
        assert_eq!(t.steal_since(&t), None);
        assert_eq!(t.steal_since(&later), None);
        // An old kernel's line without steal.
        assert_eq!(
            CpuTimes::parse("cpu 1 2 3 4\n"),
            Some(CpuTimes {
                total: 10,
                steal: 0
            })
        );
        assert_eq!(CpuTimes::parse("cpu0 1 2 3 4\n"), None);
        assert_eq!(CpuTimes::parse("cpu 1 x 3 4\n"), None);
        let now = CpuTimes::now().unwrap();
        assert!(now.total >= now.steal);
    }

    #[test]
    fn start_time_is_field_22_counted_after_the_name() {
        let stat = "42 (a) b (c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 9876 100 200";
        assert_eq!(parse_start_time(stat), Some(9876));
        assert_eq!(parse_start_time("42 (x"), None);
        assert!(own_start_time().is_ok());
        assert_eq!(start_time(i32::MAX), None);
    }

    #[test]
    fn environ_entries_match_exactly() {
        let env = b"PATH=/bin\0TEST_RUN=abc\0X=1\0";
        assert_eq!(environ_lookup(env, "TEST_RUN"), Some(&b"abc"[..]));
        assert_ne!(environ_lookup(env, "TEST_RUN"), Some(&b"ab"[..]));
        assert_ne!(environ_lookup(env, "TEST_RUN"), Some(&b"abcd"[..]));
        assert_eq!(environ_lookup(b"XTEST_RUN=abc\0", "TEST_RUN"), None);
    }
}
