//! A cgroup (v2) per run: the one handle on a run's processes that neither `setsid`, a double
//! fork, nor a move into another namespace escapes, and that can never name an unrelated
//! process (a pid in `cgroup.procs` is a member now, not a number that may have been reused).
//!
//! Runs live under `<cgroup2 mount>/testground/<name>`. The mount is found in
//! `/proc/self/mountinfo`: `/sys/fs/cgroup` on pure-v2 hosts, `/sys/fs/cgroup/unified` on hybrid
//! ones (v1 controllers beside an empty v2 hierarchy, which is enough: membership and
//! `cgroup.kill` need no controller).
//!
//! A child joins the cgroup between `fork` and `exec` by writing `0` ("myself") to the cgroup's
//! `cgroup.procs` through a descriptor opened before the fork, so it only makes one `write`
//! system call there (async-signal-safe, see [`crate::jail`]). Everything it then forks is born
//! in the cgroup.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::with_context;

/// The directory under the cgroup2 mount that holds every run's cgroup.
const PARENT: &str = "testground";

/// How long [`Cgroup::remove`] waits for killed members to be gone before it gives up.
const REMOVE_WAIT: Duration = Duration::from_secs(5);

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo`, or `None` when it is
/// not mounted (a pure-v1 host, or a container without it).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_mount(&info)
}

/// The mount point of the first `cgroup2` line of a mountinfo text.
fn parse_cgroup2_mount(info: &str) -> Option<PathBuf> {
    info.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fs type> ..."
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(unescape(left.split(' ').nth(4)?)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
pub(crate) fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && b.get(i + 1..i + 4)
                .is_some_and(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)))
        {
            let o = &b[i + 1..i + 4];
            out.push((o[0] - b'0') * 64 + (o[1] - b'0') * 8 + (o[2] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The parent directory of every run's cgroup (`<mount>/testground`), if cgroup v2 is mounted.
pub fn runs_root() -> Option<PathBuf> {
    cgroup2_mount().map(|m| m.join(PARENT))
}

/// The parent directory of every run's CPU group: `testground` beside this process in the
/// cgroup v1 hierarchy that has the `cpu` controller (`/sys/fs/cgroup/cpu/testground` for a
/// process in its root), or `None` when no v1 hierarchy has it (a pure-v2 host).
///
/// Why a group: with the kernel's automatic grouping each session is a scheduling group and
/// groups share the CPU as equals, so thousands of busy instances in sessions of their own
/// would leave the engine (and its sync service) one share in thousands. One group for all of
/// a run's instances weighs as much as the engine's session, whatever their number; tasks in a
/// cgroup other than the root are not grouped by session.
pub fn cpu_runs_root() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    parse_cpu_runs_root(&info, &own)
}

/// [`cpu_runs_root`] from the texts of `/proc/self/mountinfo` and `/proc/self/cgroup`.
fn parse_cpu_runs_root(info: &str, own: &str) -> Option<PathBuf> {
    let has_cpu = |list: &str| list.split(',').any(|c| c == "cpu");
    let (root, mount) = info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        // "<fs type> <source> <super options>"
        let mut r = right.split(' ');
        if r.next()? != "cgroup" || !has_cpu(r.nth(1)?) {
            return None;
        }
        let mut l = left.split(' ');
        let root = unescape(l.nth(3)?);
        Some((root, PathBuf::from(unescape(l.next()?))))
    })?;
    // "<hierarchy id>:<controllers>:<path>"; the path is relative to the hierarchy's root,
    // which the mount may show only a part of (a container's).
    let path = own.lines().find_map(|line| {
        let mut f = line.splitn(3, ':');
        f.next()?;
        has_cpu(f.next()?).then(|| f.next().map(str::to_string))?
    })?;
    let rel = path.strip_prefix(root.trim_end_matches('/'))?;
    if !(rel.is_empty() || rel.starts_with('/')) {
        return None;
    }
    Some(mount.join(rel.trim_start_matches('/')).join(PARENT))
}

/// One cgroup and a descriptor of its `cgroup.procs` (what children write to join it).
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
    // Shared with every pre_exec closure, so the descriptor stays open until each command
    // that joins has been spawned, even if the `Cgroup` is dropped first.
    procs: Arc<OwnedFd>,
}

impl Cgroup {
    /// Creates (or reuses) the run cgroup `<cgroup2 mount>/testground/<name>`. Fails when
    /// cgroup v2 is not mounted (`Unsupported`), `name` is not a plain name (`InvalidInput`), or
    /// the hierarchy is not writable (`PermissionDenied`, `ReadOnlyFilesystem`).
    pub fn create(name: &str) -> io::Result<Cgroup> {
        let root = runs_root().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "cgroup v2 is not mounted (no cgroup2 line in /proc/self/mountinfo)",
            )
        });
        Cgroup::create_in(root, name)
    }

    /// Creates (or reuses) the run's CPU group `<cpu v1 hierarchy>/<ours>/testground/<name>`
    /// (see [`cpu_runs_root`]): a plain cgroup v1 directory whose members share one weight.
    /// Fails as [`Cgroup::create`] does, with `Unsupported` when no v1 hierarchy has the `cpu`
    /// controller.
    pub fn create_cpu(name: &str) -> io::Result<Cgroup> {
        let root = cpu_runs_root().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "no cgroup v1 hierarchy with the cpu controller (in /proc/self/mountinfo and \
                 /proc/self/cgroup)",
            )
        });
        Cgroup::create_in(root, name)
    }

    fn create_in(root: io::Result<PathBuf>, name: &str) -> io::Result<Cgroup> {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0', '\n']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cgroup name {name:?} must be a single path component"),
            ));
        }
        let path = root?.join(name);
        // The shared parent may be removed by another run's `remove` between our two mkdirs
        // (it goes when it is empty); then the second one fails with NotFound: try again.
        let mut tries = 0;
        loop {
            match fs::create_dir_all(&path) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 5 => tries += 1,
                Err(e) => {
                    return Err(with_context(e, format!("create cgroup {}", path.display())));
                }
            }
        }
        Cgroup::open(&path)
    }

    /// Opens an existing cgroup directory (the leftover cleaner's way in).
    pub fn open(path: &Path) -> io::Result<Cgroup> {
        let procs_path = path.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(|e| with_context(e, format!("open {}", procs_path.display())))?;
        Ok(Cgroup {
            path: path.to_path_buf(),
            procs: Arc::new(OwnedFd::from(procs)),
        })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `cmd`'s child join this cgroup before it executes anything, so that all it ever
    /// starts is a member too. Composes with other `pre_exec` hooks (each runs in the order it
    /// was added); if joining fails, the spawn fails with that errno.
    pub fn join_on_exec(&self, cmd: &mut impl crate::spawn::PreExec) {
        let procs = Arc::clone(&self.procs);
        let join = move || join(&procs);
        // SAFETY: `join` runs in the child before exec and only calls write(2) on a descriptor
        // opened before the spawn, with a static buffer: no allocation, no lock, no write to
        // memory, so it is async-signal-safe and suits a child that shares our memory.
        unsafe {
            cmd.pre_exec_hook(join);
        }
    }

    /// Moves the running process `pid` into this cgroup.
    pub fn add(&self, pid: i32) -> io::Result<()> {
        let path = self.path.join("cgroup.procs");
        fs::write(&path, pid.to_string())
            .map_err(|e| with_context(e, format!("move {pid} into {}", self.path.display())))
    }

    /// Every process in this cgroup and its descendants.
    pub fn pids(&self) -> io::Result<Vec<i32>> {
        let mut pids = Vec::new();
        for dir in self.tree()? {
            let text = match fs::read_to_string(dir.join("cgroup.procs")) {
                Ok(t) => t,
                // A child cgroup removed while we walk.
                Err(e) if e.kind() == io::ErrorKind::NotFound && dir != self.path => continue,
                Err(e) => {
                    return Err(with_context(e, format!("read {}", dir.display())));
                }
            };
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        Ok(pids)
    }

    /// Whether no process is left in this cgroup or its descendants (`populated 0` in
    /// `cgroup.events`; a v1 cgroup has no such file: no member listed; a gone cgroup is
    /// empty).
    pub fn is_empty(&self) -> bool {
        match fs::read_to_string(self.path.join("cgroup.events")) {
            Ok(events) => !events.lines().any(|l| l.trim() == "populated 1"),
            Err(_) => self.pids().map_or(!self.path.exists(), |p| p.is_empty()),
        }
    }

    /// SIGKILLs every process of this cgroup and its descendants: `cgroup.kill` (Linux 5.14+),
    /// else freeze, kill each member, thaw (a frozen cgroup cannot fork new members meanwhile,
    /// and SIGKILL ends frozen processes once thawed).
    pub fn kill_all(&self) -> io::Result<()> {
        let kill = self.path.join("cgroup.kill");
        if kill.exists() {
            return fs::write(&kill, "1")
                .map_err(|e| with_context(e, format!("write {}", kill.display())));
        }
        self.freeze_and_kill()
    }

    /// [`Cgroup::kill_all`] for kernels before 5.14.
    fn freeze_and_kill(&self) -> io::Result<()> {
        let freeze = self.path.join("cgroup.freeze");
        let frozen = fs::write(&freeze, "1").is_ok();
        if frozen {
            // Freezing is asynchronous: a member may still fork until `frozen 1` is reported.
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline
                && !fs::read_to_string(self.path.join("cgroup.events"))
                    .is_ok_and(|e| e.lines().any(|l| l.trim() == "frozen 1"))
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let result = (|| {
            for pid in self.pids()? {
                match nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                ) {
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                    Err(e) => {
                        return Err(crate::error::nix_context(e, format!("kill {pid}")));
                    }
                }
            }
            Ok(())
        })();
        if frozen {
            let _ = fs::write(&freeze, "0");
        }
        result
    }

    /// Kills every member, waits (a little) until the cgroup is empty, then removes it and its
    /// descendants. A cgroup already gone is fine.
    pub fn remove(self) -> io::Result<()> {
        if !self.path.exists() {
            return Ok(());
        }
        let deadline = Instant::now() + REMOVE_WAIT;
        loop {
            self.kill_all()?;
            if self.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "cgroup {} still has processes {:?} after being killed",
                        self.path.display(),
                        self.pids().unwrap_or_default()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Deepest first: a cgroup with children cannot be removed.
        let mut dirs = self.tree()?;
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(with_context(e, format!("remove {}", dir.display()))),
            }
        }
        // The shared `testground` parent goes with its last run, so a host keeps nothing; the
        // kernel refuses (EBUSY) while another run's cgroup is in it.
        if let Some(parent) = self.path.parent()
            && parent.file_name().is_some_and(|n| n == PARENT)
        {
            let _ = fs::remove_dir(parent);
        }
        Ok(())
    }

    /// This cgroup's directory and every descendant cgroup directory.
    fn tree(&self) -> io::Result<Vec<PathBuf>> {
        let mut out = vec![self.path.clone()];
        let mut i = 0;
        while i < out.len() {
            let dir = out[i].clone();
            i += 1;
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(with_context(e, format!("list {}", dir.display()))),
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(entry.path());
                }
            }
        }
        Ok(out)
    }
}

/// The child side of [`Cgroup::join_on_exec`]: must stay async-signal-safe.
fn join(procs: &OwnedFd) -> io::Result<()> {
    // "0" means the writing process itself.
    let mut file = BorrowedWriter(procs.as_raw_fd());
    file.write_all(b"0")
}

/// `write(2)` on a raw descriptor without taking ownership (no close, no allocation).
struct BorrowedWriter(std::os::fd::RawFd);

impl Write for BorrowedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: the descriptor is kept open by the `Arc<OwnedFd>` the caller holds, and `buf`
        // is a valid slice for `buf.len()` bytes.
        let n = unsafe { libc::write(self.0, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_beside_v1() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let v1 = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(v1), None);
        let spaced = "41 31 0:38 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(spaced),
            Some(PathBuf::from("/mnt/my cg"))
        );
    }

    #[test]
    fn finds_the_cpu_hierarchy_and_our_place_in_it() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      33 31 0:30 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n\
                      32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let at_root = "3:cpuset:/\n1:cpu:/\n0::/\n";
        assert_eq!(
            parse_cpu_runs_root(hybrid, at_root),
            Some(PathBuf::from("/sys/fs/cgroup/cpu/testground"))
        );
        // cpu and cpuacct mounted together, the engine in a service's cgroup.
        let joint = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let in_service = "4:cpu,cpuacct:/system.slice/tg.service\n";
        assert_eq!(
            parse_cpu_runs_root(joint, in_service),
            Some(PathBuf::from(
                "/sys/fs/cgroup/cpu,cpuacct/system.slice/tg.service/testground"
            ))
        );
        // A container that sees only its own part of the hierarchy.
        let part = "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            parse_cpu_runs_root(part, "1:cpu:/docker/abc/x\n"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu/x/testground"))
        );
        assert_eq!(parse_cpu_runs_root(part, "1:cpu:/docker/abcd\n"), None);
        // cpuacct alone is not cpu; a pure-v2 host has no v1 hierarchy at all.
        let acct = "32 31 0:29 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n";
        assert_eq!(parse_cpu_runs_root(acct, "2:cpuacct:/\n"), None);
        let pure = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_cpu_runs_root(pure, "0::/user.slice\n"), None);
    }

    /// Whether this test may run: root and `hierarchy` (mounted, for `what`); else it says
    /// why it skips, or fails under `TG_REQUIRE_PRIVILEGED=1`.
    fn privileged(hierarchy: bool, what: &str) -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if root && hierarchy {
            return true;
        }
        if std::env::var("TG_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") {
            panic!("TG_REQUIRE_PRIVILEGED=1 but there is no root and {what} here");
        }
        eprintln!("skipping privileged test: needs root and {what}");
        false
    }

    /// The fallback of kernels without `cgroup.kill` (this one has it) kills a forking tree too.
    #[test]
    fn freezing_and_killing_reaches_every_member() {
        if !privileged(cgroup2_mount().is_some(), "cgroup v2") {
            return;
        }
        let cg = Cgroup::create(&format!("sys-unit-freeze-{}", std::process::id())).unwrap();
        let mut cmd = std::process::Command::new("sh");
        // Forks as fast as it can: without the freeze, new members would appear while the
        // others are being killed.
        cmd.args([
            "-c",
            "setsid sh -c 'while :; do sleep 600 & done' & sleep 600",
        ]);
        cg.join_on_exec(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while cg.pids().unwrap().len() < 20 {
            assert!(Instant::now() < deadline, "the tree did not grow");
            std::thread::sleep(Duration::from_millis(5));
        }
        cg.freeze_and_kill().unwrap();
        child.wait().unwrap();
        while !cg.is_empty() {
            assert!(Instant::now() < deadline, "left: {:?}", cg.pids());
            std::thread::sleep(Duration::from_millis(5));
        }
        cg.remove().unwrap();
    }

    /// A child that joins the CPU group on exec is listed there (and so is what it starts);
    /// removing the group kills its members, then the directory goes.
    #[test]
    fn a_cpu_group_takes_the_child_and_goes_when_empty() {
        if !privileged(cpu_runs_root().is_some(), "a cgroup v1 cpu hierarchy") {
            return;
        }
        let name = format!("sys-unit-cpu-{}", std::process::id());
        let cg = Cgroup::create_cpu(&name).unwrap();
        assert_eq!(cg.path(), cpu_runs_root().unwrap().join(&name));
        let mut cmd = std::process::Command::new("sh");
        cmd.args([
            "-c",
            "sleep 600 & grep -E '^[0-9]+:([^:]*,)?cpu(,[^:]*)?:' /proc/self/cgroup; wait",
        ]);
        cmd.stdout(std::process::Stdio::piped());
        cg.join_on_exec(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(
            line.trim_end().ends_with(&format!("/testground/{name}")),
            "{line}"
        );
        let pids = cg.pids().unwrap();
        assert!(pids.contains(&(child.id() as i32)), "{pids:?}");
        assert!(pids.len() >= 2, "sh and its sleep at least: {pids:?}");
        assert!(!cg.is_empty());
        let path = cg.path().to_path_buf();
        cg.clone().remove().unwrap();
        child.wait().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn names_must_be_one_component() {
        for bad in ["", ".", "..", "a/b", "a\nb"] {
            let e = Cgroup::create(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}: {e}");
        }
    }
}
