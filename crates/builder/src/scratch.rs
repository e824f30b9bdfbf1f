//! Per-build scratch directories and the cleanup of what killed builds left behind.
//!
//! Every build gets its own directory `<work_dir>/.tmp-build-<pid>-<start>-<n>-<build id>`,
//! named after its owner (the engine process: pid and start time) and holding an exclusive
//! `flock` on itself for its whole life. Everything temporary a build writes (copies of the
//! sources, half-written artifacts) lives in it, and every process the build starts carries
//! `TESTGROUND_BUILD_ID=<the directory's token>` in its environment. (`exec:generic` builds in
//! the artifact's final `<artifact>.d` instead, since build commands bake paths in; the cache
//! key's lock makes it the build's own, and an unfinished one is removed by the cleaner.)
//!
//! A build that ends normally removes its directory and kills whatever its commands left
//! running. A build whose engine was SIGKILLed can do neither, so each new build first runs
//! [`clean_stale`]: a directory whose owner is gone (pid and start time no longer match a live
//! process) and whose lock nobody holds is stale; the processes carrying its marker are killed
//! and the directory removed. The name check is exact (a reused pid has another start time);
//! the lock covers owners in another pid namespace, whose pids mean nothing here.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

use crate::{BuildError, cache};

/// Environment variable naming the build a process belongs to.
pub const BUILD_ID_ENV: &str = "TESTGROUND_BUILD_ID";

const PREFIX: &str = ".tmp-build-";

/// How long to wait for killed processes to exit before removing their directory.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Temporary entries of earlier versions, which carried no owner: `exec:go` build directories
/// and half-written artifacts. They are removed once untouched for [`LEGACY_AGE`], long past
/// any build an old engine could still be running on the same work dir.
const LEGACY_PREFIXES: &[&str] = &[".tmp-exec-go-", ".tmp-install-"];
const LEGACY_AGE: Duration = Duration::from_secs(3600);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A build's own directory; removed, and its processes killed, on drop.
#[derive(Debug)]
pub(crate) struct BuildDir {
    path: PathBuf,
    token: String,
    /// Held for the build's life: a locked directory is never stale.
    _lock: Flock<File>,
    /// Whether any process was started with this build's marker (only then is a /proc scan
    /// worth it on drop).
    spawned: AtomicBool,
}

/// Keeps build ids (xids in practice, but they come from callers) tame in a file name.
fn tame(id: &str) -> String {
    id.chars()
        .take(40)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

impl BuildDir {
    /// Creates a fresh build directory in `work_dir` (which must exist).
    pub(crate) fn create(work_dir: &Path, build_id: &str) -> Result<Self, BuildError> {
        let pid = std::process::id();
        let start = tg_sys::proc::own_start_time()
            .map_err(|e| BuildError::io("identify the engine process via", "/proc/self", e))?;
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let token = format!("{pid}-{start}-{n}-{}", tame(build_id));
            let path = work_dir.join(format!("{PREFIX}{token}"));
            match fs::create_dir(&path) {
                Ok(()) => {}
                // A leftover of an earlier process with our pid and start time cannot exist,
                // but a name is cheap: take the next one.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(BuildError::io("create build directory", &path, e)),
            }
            // Until the lock is taken the name alone marks the directory live: its owner is us.
            let lock = File::open(&path)
                .map_err(|e| BuildError::io("open", &path, e))
                .and_then(|f| {
                    Flock::lock(f, FlockArg::LockExclusiveNonblock)
                        .map_err(|(_, e)| BuildError::io("lock", &path, e.into()))
                });
            return match lock {
                Ok(lock) => Ok(BuildDir {
                    path,
                    token,
                    _lock: lock,
                    spawned: AtomicBool::new(false),
                }),
                Err(e) => {
                    let _ = fs::remove_dir_all(&path);
                    Err(e)
                }
            };
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Kills every process of this build still running (they carry its marker), wherever they
    /// moved to (another process group, another session). Best effort.
    pub(crate) async fn kill_processes(&self) {
        let marked: HashSet<String> = [self.token.clone()].into();
        let res = tokio::task::spawn_blocking(move || {
            tg_sys::lifetime::kill_marked(BUILD_ID_ENV, &marked, 0, KILL_WAIT)
        })
        .await;
        match res {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not look for leftover build processes"),
            Err(e) => tracing::warn!(error = %e, "could not look for leftover build processes"),
        }
    }

    /// The token naming this build (its directory's name without the prefix); image builders
    /// label their step containers with it, so that [`is_live`] can tell whether their build
    /// still runs.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// The value of [`BUILD_ID_ENV`] for this build's processes; records that one was started.
    pub(crate) fn marker(&self) -> &str {
        self.spawned.store(true, Ordering::Relaxed);
        &self.token
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        if self.spawned.load(Ordering::Relaxed) {
            // Process-group kills miss children that started their own session; the marker
            // does not.
            let marked: HashSet<String> = [self.token.clone()].into();
            if let Err(e) = tg_sys::lifetime::kill_marked(BUILD_ID_ENV, &marked, 0, KILL_WAIT) {
                tracing::warn!(error = %e, "could not look for leftover build processes");
            }
        }
        match fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(path = %self.path.display(), error = %e,
                    "could not remove build directory; the next build will");
            }
            _ => {}
        }
    }
}

/// Whether the build with directory token `token` still runs: its directory exists and its
/// lock is held (by any process, in any pid namespace). A build holds the lock from before it
/// starts anything until after it stopped everything, so a step container whose build is not
/// live is a leftover.
pub(crate) fn is_live(work_dir: &Path, token: &str) -> bool {
    if token.is_empty()
        || !token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return false;
    }
    let Ok(dir) = File::open(work_dir.join(format!("{PREFIX}{token}"))) else {
        return false;
    };
    // Taking the lock proves nobody holds it; it is released again right away.
    Flock::lock(dir, FlockArg::LockExclusiveNonblock).is_err()
}

/// The owner `(pid, start time)` and token encoded in a build directory's name.
fn parse_name(name: &str) -> Option<(u32, u64, &str)> {
    let token = name.strip_prefix(PREFIX)?;
    let mut parts = token.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((pid, start, token))
}

/// Removes the directories of builds whose engine died, after killing the processes those
/// builds started; also removes `exec:generic` build directories that no installed artifact
/// uses and no build holds. Best effort: what cannot be cleaned now is tried again next time.
pub(crate) fn clean_stale(work_dir: &Path) {
    let Ok(entries) = fs::read_dir(work_dir) else {
        return;
    };
    let mut stale = Vec::new();
    let mut generic = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((pid, start, token)) = parse_name(name) {
            if tg_sys::lifetime::is_alive(pid, start) {
                continue;
            }
            let path = entry.path();
            // Held by an owner we cannot see (another pid namespace): not stale.
            let Ok(lock) = File::open(&path)
                .map_err(drop)
                .and_then(|f| Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(drop))
            else {
                continue;
            };
            stale.push((path, token.to_owned(), lock));
        } else if cache::is_generic_build_dir(name) {
            generic.push(entry.path());
        } else if LEGACY_PREFIXES.iter().any(|p| name.starts_with(p)) {
            remove_legacy(&entry);
        }
    }
    if !stale.is_empty() {
        let tokens: HashSet<String> = stale.iter().map(|(_, t, _)| t.clone()).collect();
        match tg_sys::lifetime::kill_marked(BUILD_ID_ENV, &tokens, 0, KILL_WAIT) {
            Ok(0) => {}
            Ok(n) => tracing::info!(processes = n, "killed processes of dead builds"),
            Err(e) => tracing::warn!(error = %e, "could not look for processes of dead builds"),
        }
        for (path, _, _lock) in &stale {
            match fs::remove_dir_all(path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a dead build's directory")
                }
                Err(e) => tracing::warn!(path = %path.display(), error = %e,
                    "could not remove a dead build's directory"),
            }
        }
    }
    for dir in generic {
        cache::remove_orphan_generic_dir(&dir);
    }
}

fn remove_legacy(entry: &fs::DirEntry) {
    let Ok(meta) = entry.metadata() else { return };
    let old = meta
        .modified()
        .ok()
        .and_then(|m| m.elapsed().ok())
        .is_some_and(|age| age >= LEGACY_AGE);
    if !old {
        return;
    }
    let path = entry.path();
    let res = if meta.is_dir() {
        fs::remove_dir_all(&path)
    } else {
        fs::remove_file(&path)
    };
    match res {
        Ok(()) => tracing::info!(path = %path.display(), "removed a leftover of an old build"),
        Err(e) => tracing::warn!(path = %path.display(), error = %e,
            "could not remove a leftover of an old build"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_leftovers_of_earlier_versions_are_removed() {
        let work = tempfile::tempdir().unwrap();
        let (old_dir, new_dir) = (
            work.path().join(".tmp-exec-go-abc"),
            work.path().join(".tmp-exec-go-def"),
        );
        let old_file = work.path().join(".tmp-install-xyz");
        fs::create_dir_all(old_dir.join("plan")).unwrap();
        fs::create_dir_all(&new_dir).unwrap();
        fs::write(&old_file, "half").unwrap();
        let long_ago = std::time::SystemTime::now() - LEGACY_AGE - Duration::from_secs(60);
        for p in [&old_dir, &old_file] {
            File::open(p).unwrap().set_modified(long_ago).unwrap();
        }
        clean_stale(work.path());
        assert!(!old_dir.exists() && !old_file.exists());
        assert!(
            new_dir.exists(),
            "a recent one may belong to a running old engine"
        );
    }

    #[test]
    fn names_carry_owner_and_token() {
        assert_eq!(
            parse_name(".tmp-build-12-345-0-abc"),
            Some((12, 345, "12-345-0-abc"))
        );
        assert_eq!(parse_name(".tmp-build-12-345"), None);
        assert_eq!(parse_name(".tmp-build-x-345-0-a"), None);
        assert_eq!(parse_name("exec-go--p-0123"), None);
        assert_eq!(tame("a/b c"), "a_b_c");
    }

    #[test]
    fn live_directories_are_kept_and_dead_ones_removed() {
        let work = tempfile::tempdir().unwrap();
        let live = BuildDir::create(work.path(), "b1").unwrap();
        assert!(live.path().is_dir());
        // An owner that cannot exist: pid 0 never has a /proc entry.
        let dead = work.path().join(format!("{PREFIX}0-1-0-b2"));
        fs::create_dir_all(dead.join("plan")).unwrap();
        fs::write(dead.join("plan/file"), "x").unwrap();
        clean_stale(work.path());
        assert!(live.path().is_dir(), "a live build keeps its directory");
        assert!(!dead.exists(), "a dead build's directory is removed");

        // A dead owner's directory that someone still holds locked stays.
        let held = work.path().join(format!("{PREFIX}0-1-1-b3"));
        fs::create_dir(&held).unwrap();
        let lock = Flock::lock(File::open(&held).unwrap(), FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .unwrap();
        clean_stale(work.path());
        assert!(held.is_dir());
        drop(lock);
        clean_stale(work.path());
        assert!(!held.exists());

        let token = live.token().to_owned();
        assert!(is_live(work.path(), &token));
        assert!(!is_live(work.path(), "0-1-1-b3"));
        assert!(!is_live(work.path(), "../x"));
        let path = live.path().to_owned();
        drop(live);
        assert!(!is_live(work.path(), &token));
        assert!(!path.exists(), "a finished build removes its directory");
    }
}
