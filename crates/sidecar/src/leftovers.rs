//! Leftovers of runs whose owner died.
//!
//! Namespaces and interfaces need no record: they are held only by the owner's descriptors
//! and by the instances' processes, so the kernel frees them once both are gone. Processes are
//! what can outlive a killed owner: `PR_SET_PDEATHSIG` kills an instance's first process with
//! its owner, but not what that process started in turn. So each run records its owner and every instance's pid with its namespace inode in
//! `<state_dir>/<run_id>.pids`; the next run (or engine start) kills what is still inside those
//! namespaces when the owner is gone.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The start time of `pid` in clock ticks since boot (field 22 of `/proc/PID/stat`): with the
/// pid it identifies a process even after the pid is reused.
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// The record of one run, appended to as instances start.
#[derive(Debug)]
pub struct Record {
    path: PathBuf,
    file: fs::File,
}

impl Record {
    /// `temp_dir` is the run's own scratch directory (its instances' `TEST_TEMP_PATH`s): a
    /// killed owner cannot remove it, so the next cleaner does.
    pub fn create(state_dir: &Path, run_id: &str, temp_dir: Option<&Path>) -> io::Result<Record> {
        fs::create_dir_all(state_dir)?;
        let path = state_dir.join(format!("{run_id}.pids"));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        let me = std::process::id() as i32;
        writeln!(file, "owner {me} {}", start_time(me).unwrap_or(0))?;
        if let Some(dir) = temp_dir {
            // Last field, so that a path with spaces survives.
            writeln!(file, "dir {}", dir.display())?;
        }
        Ok(Record { path, file })
    }

    /// Notes an instance process and the namespace it lives in.
    pub fn instance(&mut self, pid: i32, netns_inode: u64) -> io::Result<()> {
        writeln!(self.file, "pid {pid} {netns_inode}")
    }

    /// The run ended cleanly: nothing to recover.
    pub fn remove(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Kills what remains of runs whose owner is gone; returns how many processes were killed.
pub fn clean(state_dir: &Path) -> io::Result<usize> {
    let entries = match fs::read_dir(state_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pids") {
            continue;
        }
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let mut owner_alive = false;
        let mut instances = Vec::new();
        let mut dirs = Vec::new();
        for line in text.lines() {
            if let Some(dir) = line.strip_prefix("dir ") {
                dirs.push(PathBuf::from(dir));
                continue;
            }
            let f: Vec<&str> = line.split(' ').collect();
            match f.as_slice() {
                ["owner", pid, started] => {
                    let (Ok(pid), Ok(started)) = (pid.parse::<i32>(), started.parse::<u64>())
                    else {
                        continue;
                    };
                    owner_alive = start_time(pid) == Some(started);
                }
                ["pid", pid, inode] => {
                    if let (Ok(pid), Ok(inode)) = (pid.parse::<i32>(), inode.parse::<u64>()) {
                        instances.push((pid, inode));
                    }
                }
                _ => {}
            }
        }
        if owner_alive {
            continue;
        }
        let inodes: std::collections::BTreeSet<u64> = instances.iter().map(|i| i.1).collect();
        killed += kill_in_namespaces(&inodes);
        for dir in dirs {
            // Only what a run created for itself: a `tg-<run_id>-*` temp directory.
            let ours = dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("tg-"));
            if ours {
                let _ = fs::remove_dir_all(&dir);
            }
        }
        let _ = fs::remove_file(&path);
    }
    Ok(killed)
}

/// Kills (SIGKILL) every process living in one of the network namespaces `inodes`.
pub fn kill_in_namespaces(inodes: &std::collections::BTreeSet<u64>) -> usize {
    if inodes.is_empty() {
        return 0;
    }
    let mut killed = 0;
    let Ok(procs) = fs::read_dir("/proc") else {
        return 0;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(inode) = tg_sys::netns_inode_of(pid)
            && inodes.contains(&inode)
            && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
        {
            killed += 1;
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_readable() {
        assert!(start_time(std::process::id() as i32).is_some());
        assert_eq!(start_time(i32::MAX), None);
    }

    #[test]
    fn a_live_owner_keeps_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Record::create(dir.path(), "run1", None).unwrap();
        r.instance(i32::MAX, 1).unwrap();
        assert_eq!(clean(dir.path()).unwrap(), 0);
        assert!(dir.path().join("run1.pids").exists());
        r.remove();
        assert!(!dir.path().join("run1.pids").exists());
    }

    #[test]
    fn a_dead_owner_temp_dir_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let temp = dir.path().join("tg-run2-abc");
        let other = dir.path().join("not-ours");
        fs::create_dir_all(temp.join("single/0")).unwrap();
        fs::create_dir_all(&other).unwrap();
        fs::write(
            dir.path().join("run2.pids"),
            format!(
                "owner 1 12345678\ndir {}\ndir {}\n",
                temp.display(),
                other.display()
            ),
        )
        .unwrap();
        clean(dir.path()).unwrap();
        assert!(!temp.exists(), "the dead run's temp dir is gone");
        assert!(other.exists(), "a directory the run did not create is kept");
    }

    #[test]
    fn a_dead_owner_record_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        // pid 1's start time is never 12345678 ticks on a machine that just ran this test.
        fs::write(
            dir.path().join("old.pids"),
            "owner 1 12345678\npid 2147483647 4026531840\n",
        )
        .unwrap();
        assert_eq!(clean(dir.path()).unwrap(), 0);
        assert!(!dir.path().join("old.pids").exists());
    }
}
