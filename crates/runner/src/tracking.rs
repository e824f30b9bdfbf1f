//! Per-run process tracking: nothing of a run survives its engine, even a SIGKILLed one.
//!
//! Each run leaves a record `<state_dir>/<run_id>.json` naming its owner (pid and start time,
//! so a reused pid is not taken for the owner), when it started, its cgroup and its temp
//! directories. Its instances are put into the run's cgroup (cgroup v2, when the engine is root
//! and the hierarchy is mounted): membership is inherited by everything they start, whatever
//! they do (`setsid`, double forks, a network namespace of their own), and a member can never be
//! an unrelated process. Without a cgroup the run is in marker mode: an instance's environment
//! carries `TEST_RUN=<run_id>`, and a process is the run's only if its initial environment holds
//! exactly that entry and it started after the run did.
//!
//! A run that ends kills what remains of it ([`RunTracker::finish`]); a run whose owner was
//! killed is cleaned at the next engine start or run ([`clean_leftovers`]), which never touches
//! a run whose owner is alive.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tg_sys::Cgroup;

/// The environment variable whose value marks a run's processes (`TEST_RUN=<run_id>`).
const MARKER: &str = "TEST_RUN";

/// The on-disk record of a run (`<state_dir>/<run_id>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub run_id: String,
    /// The engine process that owns the run.
    pub owner_pid: i32,
    /// The owner's start time, in clock ticks since boot (`/proc/PID/stat` field 22).
    pub owner_start: u64,
    /// When the run started: clock ticks since boot (comparable with a process's start time)
    /// and, for people reading the record, Unix milliseconds.
    pub start_ticks: u64,
    pub started_unix_ms: u64,
    /// The run's cgroup directory, when it has one.
    pub cgroup: Option<PathBuf>,
    /// Directories the run created for itself (each name contains the run id).
    #[serde(default)]
    pub temp_dirs: Vec<PathBuf>,
    /// The run's CPU group (cgroup v1 `cpu`), when its instances share one
    /// (`instance_sched.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_group: Option<PathBuf>,
}

impl Record {
    /// The record of a run starting now, owned by this process, written to `state_dir`.
    fn new(state_dir: &Path, run_id: &str, cgroup: Option<&Cgroup>) -> io::Result<Record> {
        check_run_id(run_id)?;
        fs::create_dir_all(state_dir)?;
        let started_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let record = Record {
            run_id: run_id.to_string(),
            owner_pid: std::process::id() as i32,
            owner_start: tg_sys::proc::own_start_time()?,
            start_ticks: now_ticks()?,
            started_unix_ms,
            cgroup: cgroup.map(|c| c.path().to_path_buf()),
            temp_dirs: Vec::new(),
            cpu_group: None,
        };
        record.write(state_dir)?;
        Ok(record)
    }

    fn path(state_dir: &Path, run_id: &str) -> PathBuf {
        state_dir.join(format!("{run_id}.json"))
    }

    fn tmp_path(state_dir: &Path, run_id: &str) -> PathBuf {
        state_dir.join(format!(".{run_id}.json.tmp"))
    }

    /// Writes the record atomically (a reader never sees half of it).
    fn write(&self, state_dir: &Path) -> io::Result<()> {
        let path = Record::path(state_dir, &self.run_id);
        let tmp = Record::tmp_path(state_dir, &self.run_id);
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        fs::write(&tmp, json)?;
        fs::rename(&tmp, &path)
    }

    /// Whether the owner still runs: same pid and same start time.
    fn owner_alive(&self) -> bool {
        tg_sys::lifetime::is_alive(self.owner_pid as u32, self.owner_start)
    }
}

/// A run id names files and a cgroup: one plain path component, and no `=` (it is also the
/// value of the `TEST_RUN=<id>` marker).
fn check_run_id(run_id: &str) -> io::Result<()> {
    let bad =
        run_id.is_empty() || run_id.starts_with('.') || run_id.contains(['/', '\0', '\n', '=']);
    if bad {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("run id {run_id:?} cannot name a run record"),
        ));
    }
    Ok(())
}

/// Whether `dir` is one the run may have created for itself: its name holds the run id. A
/// record is a file anybody with access to the state directory could edit; this keeps the
/// cleaner from removing anything else.
fn owned_dir(run_id: &str, dir: &Path) -> bool {
    !run_id.is_empty()
        && dir.is_absolute()
        && dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(run_id))
}

/// Whether `cgroup` is a run cgroup of ours (`<cgroup2 mount>/testground/<run_id>`), so that a
/// damaged record cannot make the cleaner kill another cgroup's processes.
fn owned_cgroup(run_id: &str, cgroup: &Path) -> bool {
    tg_sys::cgroup::runs_root().is_some_and(|root| cgroup == root.join(run_id))
}

/// Whether `dir` is a run CPU group of ours (`<cpu v1 hierarchy>/.../testground/<run_id>`).
fn owned_cpu_group(run_id: &str, dir: &Path) -> bool {
    tg_sys::cgroup::cpu_runs_root().is_some_and(|root| dir == root.join(run_id))
}

/// Clock ticks since boot now (the unit of a process's start time), rounded down so that a
/// process started from now on never compares below it.
fn now_ticks() -> io::Result<u64> {
    let uptime = tg_sys::proc::uptime()?;
    Ok((uptime * tg_sys::proc::clock_ticks_per_second() as f64).floor() as u64)
}

/// Tracks one run's processes and temp directories; see the module docs.
#[derive(Debug)]
pub(crate) struct RunTracker {
    state_dir: PathBuf,
    record: Record,
    cgroup: Option<Cgroup>,
    /// The CPU group the instances join, when they share one.
    cpu_group: Option<Cgroup>,
    /// False once finished (so that `Drop` does nothing).
    live: bool,
}

impl RunTracker {
    /// Writes the run's record and creates its cgroup when possible (root and cgroup v2);
    /// otherwise the run is tracked in marker mode.
    pub(crate) fn create(state_dir: &Path, run_id: &str) -> io::Result<RunTracker> {
        check_run_id(run_id)?;
        let cgroup = if nix::unistd::geteuid().is_root() {
            match Cgroup::create(run_id) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::info!(error = %e, run_id, "no cgroup for the run: tracking it by marker");
                    None
                }
            }
        } else {
            None
        };
        RunTracker::with_cgroup(state_dir, run_id, cgroup)
    }

    /// Writes the record of a run tracked by `cgroup` (removed again if that fails).
    fn with_cgroup(
        state_dir: &Path,
        run_id: &str,
        cgroup: Option<Cgroup>,
    ) -> io::Result<RunTracker> {
        match Record::new(state_dir, run_id, cgroup.as_ref()) {
            Ok(record) => Ok(RunTracker {
                state_dir: state_dir.to_path_buf(),
                record,
                cgroup,
                cpu_group: None,
                live: true,
            }),
            Err(e) => {
                if let Some(c) = cgroup {
                    let _ = c.remove();
                }
                Err(e)
            }
        }
    }

    /// Notes a directory the run created for itself, to be removed should the owner die. Its
    /// name must contain the run id (the cleaner removes nothing else).
    pub(crate) fn add_temp_dir(&mut self, dir: &Path) -> io::Result<()> {
        let dir = std::path::absolute(dir)?;
        if !owned_dir(&self.record.run_id, &dir) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "temp dir {} does not name run {}",
                    dir.display(),
                    self.record.run_id
                ),
            ));
        }
        self.record.temp_dirs.push(dir);
        self.record.write(&self.state_dir)
    }

    /// Creates the CPU group the run's instances join (`instance_sched.rs`), recorded so that
    /// the next engine start removes it should this one die. Root only, and only where a v1
    /// hierarchy has the `cpu` controller; the error says why not.
    pub(crate) fn add_cpu_group(&mut self) -> io::Result<()> {
        if self.cpu_group.is_some() {
            return Ok(());
        }
        if !nix::unistd::geteuid().is_root() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the engine is not root",
            ));
        }
        let group = Cgroup::create_cpu(&self.record.run_id)?;
        self.record.cpu_group = Some(group.path().to_path_buf());
        if let Err(e) = self.record.write(&self.state_dir) {
            self.record.cpu_group = None;
            let _ = group.remove();
            return Err(e);
        }
        self.cpu_group = Some(group);
        Ok(())
    }

    /// The CPU group's directory, when the run has one.
    pub(crate) fn cpu_group(&self) -> Option<&Cgroup> {
        self.cpu_group.as_ref()
    }

    /// Makes an instance's command join the run's cgroup, and its CPU group when it has one.
    /// The cgroup part is a no-op in marker mode: instances carry `TEST_RUN=<run_id>` in their
    /// environment already, and that is the marker.
    pub(crate) fn apply(&self, cmd: &mut impl tg_sys::spawn::PreExec) {
        self.apply_tracking(cmd);
        if let Some(c) = &self.cpu_group {
            c.join_on_exec(cmd);
        }
    }

    /// Makes the command's child join the run's cgroup only: for the engine's own helper
    /// processes, which are scheduled with the engine, not with the instances.
    pub(crate) fn apply_tracking(&self, cmd: &mut impl tg_sys::spawn::PreExec) {
        if let Some(c) = &self.cgroup {
            c.join_on_exec(cmd);
        }
    }

    /// Whether the run's processes are tracked by a cgroup (else by marker).
    pub(crate) fn uses_cgroup(&self) -> bool {
        self.cgroup.is_some()
    }

    /// Kills every remaining process of the run and removes its cgroup; returns what it did,
    /// for the run log. Removing its temp dirs, then its record, is left to the cleanup thread
    /// (`cleanup.rs`), so that the run's outcome does not wait for the disk: until the record
    /// is gone, the next engine start would finish the job.
    pub(crate) async fn finish(mut self) -> Vec<String> {
        self.live = false;
        let record = self.record.clone();
        let cgroup = self.cgroup.take();
        let state_dir = self.state_dir.clone();
        let killed = tokio::task::spawn_blocking(move || {
            let (lines, cgroup_kept) = kill_run(&record, cgroup);
            crate::cleanup::defer(move || {
                for line in remove_rest(&state_dir, &record, cgroup_kept) {
                    tracing::info!("{line}");
                }
            });
            lines
        })
        .await;
        killed.unwrap_or_else(|e| vec![format!("cleaning the run's processes failed: {e}")])
    }
}

/// A tracker dropped without [`RunTracker::finish`] (its run's future was dropped) still kills
/// the run's processes at once; removing the cgroup waits for them to be gone, so that happens
/// on a thread of its own. Should this process die first, the record is still there for
/// [`clean_leftovers`].
impl Drop for RunTracker {
    fn drop(&mut self) {
        if !self.live {
            return;
        }
        if let Some(c) = &self.cgroup {
            let _ = c.kill_all();
        }
        let record = self.record.clone();
        let cgroup = self.cgroup.take();
        let state_dir = self.state_dir.clone();
        let _ = std::thread::Builder::new()
            .name("tg-run-cleanup".into())
            .spawn(move || clean_run(&state_dir, &record, cgroup));
    }
}

/// Kills what remains of the run `record` describes (cgroup members and marked processes),
/// removes its cgroup, temp dirs and record. Blocking.
fn clean_run(state_dir: &Path, record: &Record, cgroup: Option<Cgroup>) -> Vec<String> {
    let (mut done, cgroup_kept) = kill_run(record, cgroup);
    done.extend(remove_rest(state_dir, record, cgroup_kept));
    done
}

/// Kills what remains of the run (cgroup members and marked processes) and removes its cgroup.
/// Returns what it did and whether the cgroup had to be kept.
fn kill_run(record: &Record, cgroup: Option<Cgroup>) -> (Vec<String>, bool) {
    let id = &record.run_id;
    let mut done = Vec::new();
    let mut cgroup_kept = false;
    if let Some(c) = cgroup {
        let members = c.pids().map(|p| p.len()).unwrap_or(0);
        let path = c.path().to_path_buf();
        match c.remove() {
            Ok(()) if members > 0 => {
                done.push(format!(
                    "run {id}: killed {members} processes left in its cgroup"
                ));
            }
            Ok(()) => {}
            Err(e) => {
                cgroup_kept = true;
                done.push(format!(
                    "run {id}: cannot remove its cgroup {}: {e}",
                    path.display()
                ));
            }
        }
    }
    // Also in cgroup mode: a process that escaped the cgroup (only root can move one out) is
    // still marked, and marked processes started after the run began are the run's.
    let killed = kill_marked(record);
    if killed > 0 {
        done.push(format!(
            "run {id}: killed {killed} processes marked {MARKER}={id}"
        ));
    }
    // The CPU group holds only instances, which are gone by now; removing it also kills any
    // member left (only a process that left the run's cgroup could be).
    if let Some(p) = &record.cpu_group {
        if !owned_cpu_group(id, p) {
            done.push(format!(
                "run {id}: its record names CPU group {}, which is not a run CPU group; left alone",
                p.display()
            ));
        } else if let Err(e) = Cgroup::open(p).and_then(Cgroup::remove)
            && p.exists()
        {
            cgroup_kept = true;
            done.push(format!(
                "run {id}: cannot remove its CPU group {}: {e}",
                p.display()
            ));
        }
    }
    (done, cgroup_kept)
}

/// Removes the run's temp dirs, then its record (kept while its cgroup is).
fn remove_rest(state_dir: &Path, record: &Record, cgroup_kept: bool) -> Vec<String> {
    let id = &record.run_id;
    let mut done = Vec::new();
    for dir in &record.temp_dirs {
        if owned_dir(id, dir) && dir.exists() {
            match fs::remove_dir_all(dir) {
                Ok(()) => done.push(format!("run {id}: removed {}", dir.display())),
                Err(e) => done.push(format!("run {id}: cannot remove {}: {e}", dir.display())),
            }
        }
    }
    // A cgroup that could not be removed keeps the record, for another try.
    if !cgroup_kept {
        let _ = fs::remove_file(Record::path(state_dir, id));
        // What an owner killed in the middle of rewriting its record left.
        let _ = fs::remove_file(Record::tmp_path(state_dir, id));
    }
    done
}

/// How long the cleaner waits for killed marked processes to be gone.
const MARKED_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// SIGKILLs every process marked with the run's `TEST_RUN` that started at or after the run.
fn kill_marked(record: &Record) -> usize {
    let ids = std::collections::HashSet::from([record.run_id.clone()]);
    tg_sys::lifetime::kill_marked(MARKER, &ids, record.start_ticks, MARKED_EXIT_WAIT).unwrap_or(0)
}

/// Where runs keep their records: `<data_dir>/runs` (`$TESTGROUND_HOME/data/runs`).
pub fn runs_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("runs")
}

/// Cleans what runs whose owner is gone left behind: for each record in `state_dir` whose owner
/// (pid and start time) no longer runs, kills the run's processes (all members of its cgroup,
/// and every process marked `TEST_RUN=<run_id>` that started after the run), removes its cgroup,
/// temp dirs and record. Never touches a run whose owner is alive. Returns what it did.
///
/// Call it at every engine start and before each run.
pub fn clean_leftovers(state_dir: &Path) -> Vec<String> {
    let entries = match fs::read_dir(state_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => return vec![format!("cannot list {}: {e}", state_dir.display())],
    };
    let mut done = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let record: Record = match fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(r) => r,
            Err(e) => {
                done.push(format!("ignoring run record {}: {e}", path.display()));
                continue;
            }
        };
        if path.file_stem().and_then(|s| s.to_str()) != Some(record.run_id.as_str()) {
            done.push(format!(
                "ignoring run record {}: it names run {}",
                path.display(),
                record.run_id
            ));
            continue;
        }
        if record.owner_alive() {
            continue;
        }
        let cgroup = match &record.cgroup {
            Some(p) if !owned_cgroup(&record.run_id, p) => {
                done.push(format!(
                    "run {}: its record names cgroup {}, which is not a run cgroup; left alone",
                    record.run_id,
                    p.display()
                ));
                None
            }
            Some(p) if p.exists() => match Cgroup::open(p) {
                Ok(c) => Some(c),
                Err(e) => {
                    done.push(format!(
                        "run {}: cannot open its cgroup: {e}",
                        record.run_id
                    ));
                    None
                }
            },
            _ => None,
        };
        let mut lines = clean_run(state_dir, &record, cgroup);
        if !lines.is_empty() {
            done.push(format!(
                "run {}: its owner (pid {}) is gone; cleaning up",
                record.run_id, record.owner_pid
            ));
        }
        done.append(&mut lines);
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    fn record(dir: &Path, id: &str) -> Record {
        serde_json::from_slice(&fs::read(Record::path(dir, id)).unwrap()).unwrap()
    }

    #[test]
    fn the_record_names_owner_start_cgroup_and_temp_dirs() {
        let state = tempfile::tempdir().unwrap();
        let mut t = RunTracker::with_cgroup(state.path(), "rec1", None).unwrap();
        let r = record(state.path(), "rec1");
        assert_eq!(r.run_id, "rec1");
        assert_eq!(r.owner_pid, std::process::id() as i32);
        assert_eq!(r.owner_start, tg_sys::proc::own_start_time().unwrap());
        assert!(
            r.start_ticks >= r.owner_start,
            "the run starts after its owner"
        );
        assert!(r.started_unix_ms > 0);
        assert_eq!(r.cgroup, None);
        assert!(!t.uses_cgroup());
        let dir = state.path().join("tg-rec1-abc");
        t.add_temp_dir(&dir).unwrap();
        assert_eq!(record(state.path(), "rec1").temp_dirs, vec![dir]);
        let e = t.add_temp_dir(&state.path().join("other")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // The JSON keys are the record's contract with older and newer engines.
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(Record::path(state.path(), "rec1")).unwrap()).unwrap();
        for key in [
            "run_id",
            "owner_pid",
            "owner_start",
            "start_ticks",
            "started_unix_ms",
            "cgroup",
            "temp_dirs",
        ] {
            assert!(json.get(key).is_some(), "{key} in {json}");
        }
        assert!(RunTracker::with_cgroup(state.path(), "../x", None).is_err());
        t.live = false;
    }

    #[test]
    fn a_live_owner_keeps_its_run() {
        let state = tempfile::tempdir().unwrap();
        let temp = state.path().join("tg-live1-x");
        fs::create_dir_all(&temp).unwrap();
        let mut t = RunTracker::with_cgroup(state.path(), "live1", None).unwrap();
        t.add_temp_dir(&temp).unwrap();
        assert_eq!(clean_leftovers(state.path()), Vec::<String>::new());
        assert!(Record::path(state.path(), "live1").exists());
        assert!(temp.exists());
        t.live = false;
    }

    #[test]
    fn a_reused_owner_pid_is_a_dead_owner() {
        let state = tempfile::tempdir().unwrap();
        let temp = state.path().join("tg-dead1-x");
        let other = state.path().join("not-ours");
        fs::create_dir_all(temp.join("single/0")).unwrap();
        fs::create_dir_all(&other).unwrap();
        let mut t = RunTracker::with_cgroup(state.path(), "dead1", None).unwrap();
        t.add_temp_dir(&temp).unwrap();
        t.live = false;
        // Same pid as a live process (this one), another start time: the owner is gone.
        let mut r = record(state.path(), "dead1");
        r.owner_start += 1;
        r.temp_dirs.push(other.clone());
        r.write(state.path()).unwrap();
        let lines = clean_leftovers(state.path());
        assert!(!temp.exists(), "the dead run's temp dir is gone: {lines:?}");
        assert!(
            other.exists(),
            "a directory not named after the run is kept"
        );
        assert!(!Record::path(state.path(), "dead1").exists());
        assert!(lines.iter().any(|l| l.contains("dead1")), "{lines:?}");
    }

    #[test]
    fn damaged_records_are_left_alone() {
        let state = tempfile::tempdir().unwrap();
        fs::write(state.path().join("bad.json"), "{").unwrap();
        let lines = clean_leftovers(state.path());
        assert!(lines[0].contains("bad.json"), "{lines:?}");
        assert!(state.path().join("bad.json").exists());
    }

    /// Whether `pid` is gone (or a zombie, which runs nothing any more).
    fn dead(pid: i32) -> bool {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(s) => s
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A child that starts a `setsid` grandchild which double-forks: the processes a killed
    /// engine used to leave behind.
    const ESCAPING: &str = "setsid sh -c '(sleep 600 &) ; sleep 600' & sleep 600";

    /// Starts `sh -c script` with only `env` (and PATH) in its environment.
    fn escaping_tree(
        script: &str,
        env: &[(&str, &str)],
        prepare: impl FnOnce(&mut tokio::process::Command),
    ) -> Child {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", script])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        prepare(&mut cmd);
        cmd.into_std().spawn().unwrap()
    }

    /// A process that is not the run's, with its own network namespace (what the old
    /// namespace-inode cleaner confused with a run's) when `unshare` works here.
    fn unrelated(env: &[(&str, &str)]) -> Child {
        let root = nix::unistd::geteuid().is_root();
        let mut cmd = if root {
            let mut c = Command::new("unshare");
            c.args(["-n", "sleep", "600"]);
            c
        } else {
            let mut c = Command::new("sleep");
            c.arg("600");
            c
        };
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .spawn()
            .unwrap()
    }

    #[test]
    fn marker_mode_kills_marked_processes_of_a_dead_owner_only() {
        let state = tempfile::tempdir().unwrap();
        let id = format!("mark{}", std::process::id());
        let t = RunTracker::with_cgroup(state.path(), &id, None).unwrap();
        let ids = std::collections::HashSet::from([id.clone()]);
        let mut tree = escaping_tree(ESCAPING, &[("TEST_RUN", &id)], |_| {});
        // Same prefix, another run: exact matching keeps it.
        let other_id = format!("{id}x");
        let mut other = unrelated(&[("TEST_RUN", &other_id)]);
        let start = record(state.path(), &id).start_ticks;
        // sh, setsid sh, sleep, sleep (double-forked), sleep.
        wait_until("the tree has started", || {
            tg_sys::lifetime::pids_marked(MARKER, &ids, start)
                .unwrap()
                .len()
                >= 5
        });
        let members = tg_sys::lifetime::pids_marked(MARKER, &ids, start).unwrap();
        // The engine is "killed": the tracker never finishes, its record stays.
        std::mem::forget(t);
        let mut r = record(state.path(), &id);
        r.owner_start += 1;
        r.write(state.path()).unwrap();

        let lines = clean_leftovers(state.path());
        assert!(lines.iter().any(|l| l.contains("killed")), "{lines:?}");
        let status = tree.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        wait_until("every marked process is dead", || {
            members.iter().all(|&p| dead(p))
        });
        assert!(
            other.try_wait().unwrap().is_none(),
            "the unrelated process lives"
        );
        assert!(!Record::path(state.path(), &id).exists());
        other.kill().unwrap();
        other.wait().unwrap();
    }

    /// Root and cgroup v2, or the reason why not (a failure under TG_REQUIRE_PRIVILEGED=1).
    fn cgroups() -> bool {
        let required = std::env::var("TG_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1");
        let reason = if !nix::unistd::geteuid().is_root() {
            Some("not root".to_string())
        } else if tg_sys::cgroup::cgroup2_mount().is_none() {
            Some("cgroup v2 is not mounted".to_string())
        } else {
            None
        };
        match reason {
            None => true,
            Some(r) if required => panic!("TG_REQUIRE_PRIVILEGED=1 but {r}"),
            Some(r) => {
                eprintln!("skipping privileged test: {r}");
                false
            }
        }
    }

    /// Whether a v1 hierarchy has the cpu controller (for the run's CPU group); where none
    /// does (a pure-v2 host) the tests say so and leave the group out.
    fn cpu_group_here() -> bool {
        let here = tg_sys::cgroup::cpu_runs_root().is_some();
        if !here {
            eprintln!("no cgroup v1 hierarchy with the cpu controller: not checking the CPU group");
        }
        here
    }

    /// Whether the CPU group at `dir` lists every pid of `pids`.
    fn in_cpu_group(dir: &Path, pids: &[i32]) -> bool {
        let listed = fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        let listed: Vec<i32> = listed.lines().filter_map(|l| l.parse().ok()).collect();
        pids.iter().all(|p| listed.contains(p))
    }

    #[test]
    fn a_dead_owner_s_cgroup_is_killed_and_unrelated_namespaces_survive() {
        if !cgroups() {
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let id = format!("cg{}", std::process::id());
        let mut t = RunTracker::create(state.path(), &id).unwrap();
        assert!(t.uses_cgroup());
        let cpu = cpu_group_here();
        if cpu {
            t.add_cpu_group().unwrap();
        }
        let cg_path = record(state.path(), &id).cgroup.unwrap();
        let cpu_path = record(state.path(), &id).cpu_group;
        assert_eq!(cpu_path.is_some(), cpu);
        // Not marked: only cgroup membership can find these, including one that moved into a
        // network namespace of its own.
        let script = format!("unshare -n sleep 600 & {ESCAPING}");
        let mut tree = escaping_tree(&script, &[], |cmd| t.apply(cmd));
        let mut other = unrelated(&[]);
        let cg = Cgroup::open(&cg_path).unwrap();
        wait_until("the tree has started", || cg.pids().unwrap().len() >= 6);
        let members = cg.pids().unwrap();
        assert!(!members.contains(&(other.id() as i32)));
        let own_netns = tg_sys::netns_inode_of(std::process::id() as i32).unwrap();
        // `unshare` joins the cgroup before it enters its namespace: wait for that too.
        wait_until("a member lives in a namespace of its own", || {
            cg.pids()
                .unwrap()
                .iter()
                .any(|&p| tg_sys::netns_inode_of(p).is_ok_and(|n| n != own_netns))
        });
        let members = cg.pids().unwrap();
        // Every process of the tree also joined the run's CPU group.
        if let Some(p) = &cpu_path {
            assert!(in_cpu_group(p, &members), "{members:?}");
        }
        std::mem::forget(t);
        let mut r = record(state.path(), &id);
        r.owner_start += 1;
        r.write(state.path()).unwrap();

        let lines = clean_leftovers(state.path());
        assert!(lines.iter().any(|l| l.contains("cgroup")), "{lines:?}");
        tree.wait().unwrap();
        wait_until("every member is dead", || members.iter().all(|&p| dead(p)));
        assert!(!cg_path.exists(), "the run's cgroup is removed");
        if let Some(p) = &cpu_path {
            assert!(!p.exists(), "the run's CPU group is removed");
        }
        assert!(!Record::path(state.path(), &id).exists());
        assert!(
            other.try_wait().unwrap().is_none(),
            "the unrelated process lives"
        );
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finish_kills_the_run_and_removes_everything() {
        if !cgroups() {
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let id = format!("fin{}", std::process::id());
        let temp = std::env::temp_dir().join(format!("tg-{id}-t"));
        fs::create_dir_all(&temp).unwrap();
        let mut t = RunTracker::create(state.path(), &id).unwrap();
        t.add_temp_dir(&temp).unwrap();
        let cpu = cpu_group_here();
        if cpu {
            t.add_cpu_group().unwrap();
        }
        let cg_path = record(state.path(), &id).cgroup.unwrap();
        let cpu_path = record(state.path(), &id).cpu_group;
        // A helper joins the run's cgroup but not its CPU group.
        let mut helper = tokio::process::Command::new("sleep");
        helper.arg("600");
        t.apply_tracking(&mut helper);
        let mut helper = helper.spawn().unwrap();
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "setsid sleep 600 & sleep 600"]);
        t.apply(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let cg = Cgroup::open(&cg_path).unwrap();
        tokio::task::block_in_place(|| {
            wait_until("both sleeps run", || cg.pids().unwrap().len() >= 4)
        });
        let members = cg.pids().unwrap();
        let helper_pid = helper.id().unwrap() as i32;
        assert!(members.contains(&helper_pid), "{members:?}");
        if let Some(p) = &cpu_path {
            let instance: Vec<i32> = members
                .iter()
                .copied()
                .filter(|&m| m != helper_pid)
                .collect();
            assert!(in_cpu_group(p, &instance), "{instance:?}");
            assert!(!in_cpu_group(p, &[helper_pid]), "the helper stays out");
        }
        let lines = t.finish().await;
        assert!(lines.iter().any(|l| l.contains("killed")), "{lines:?}");
        child.wait().await.unwrap();
        helper.wait().await.unwrap();
        assert!(members.iter().all(|&p| dead(p)));
        assert!(!cg_path.exists());
        if let Some(p) = &cpu_path {
            assert!(!p.exists(), "the run's CPU group is removed");
        }
        // Temp dirs and the record go on the cleanup thread, after the outcome.
        assert!(crate::cleanup::wait_for_cleanup(Duration::from_secs(60)));
        assert!(!temp.exists());
        assert!(!Record::path(state.path(), &id).exists());
    }
}
