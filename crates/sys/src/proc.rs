//! Which processes live in which network namespace, read from `/proc`.
//!
//! Used for cleanup of leftovers (kill whatever still runs in a namespace) and for
//! "nothing left behind" assertions in tests. Only processes (thread-group leaders) are
//! considered: `/proc/PID/ns/net` is the leader's namespace, and a namespace that only a
//! thread or an fd holds is invisible here.

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
fn all_pids() -> io::Result<Vec<i32>> {
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

/// Every pid whose network namespace has inode `inode`.
pub fn pids_in_netns(inode: u64) -> io::Result<Vec<i32>> {
    Ok(netns_of_all()?
        .filter(|&(_, ns)| ns == inode)
        .map(|(pid, _)| pid)
        .collect())
}

/// Distinct network namespace inodes of all processes (for "nothing left" assertions
/// in tests).
pub fn all_netns_inodes() -> io::Result<BTreeSet<u64>> {
    Ok(netns_of_all()?.map(|(_, inode)| inode).collect())
}
