//! `$TESTGROUND_HOME`: where plans, outputs, work files, tasks and logs live.
//!
//! Layout (kept from the original):
//! ```text
//! $TESTGROUND_HOME/
//!   .env.toml
//!   plans/<plan>/manifest.toml          (symlinks or copies made by `plan import`)
//!   data/outputs/<runner>/<plan>/<run_id>/<group>/<index>/
//!   data/work/                          (artifacts, build dirs, unpacked requests)
//!   data/daemon/<task_id>.out           (task logs, one JSON chunk per line)
//!   tasks.db                            (SQLite task store)
//! ```
//!
//! The home and its `data/` are created mode 0700: they hold tokens (`.env.toml`), uploaded
//! sources, artifacts and outputs that other users of a shared machine have no business reading.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Creates `path` and its missing parents mode 0700 (before the umask, which can only remove
/// bits). An existing directory keeps its mode. For the run temp directories too.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `$TESTGROUND_HOME`, else `$XDG_CONFIG_HOME/testground`, else `~/.config/testground`.
    pub fn resolve() -> io::Result<Home> {
        let root = if let Some(h) = std::env::var_os("TESTGROUND_HOME").filter(|h| !h.is_empty()) {
            PathBuf::from(h)
        } else if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|h| !h.is_empty()) {
            PathBuf::from(x).join("testground")
        } else if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            PathBuf::from(h).join(".config").join("testground")
        } else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "cannot find a home directory: set TESTGROUND_HOME",
            ));
        };
        Ok(Home::at(root))
    }

    /// A home at an explicit path (tests, `--home`).
    pub fn at(root: impl Into<PathBuf>) -> Home {
        let root: PathBuf = root.into();
        let root = if root.is_absolute() {
            root
        } else {
            std::env::current_dir()
                .map(|d| d.join(&root))
                .unwrap_or(root)
        };
        Home { root }
    }

    /// Creates the directory tree if missing, the home and `data/` mode 0700 (directories that
    /// already exist keep their mode). Returns true when the home itself was created.
    pub fn ensure(&self) -> io::Result<bool> {
        let created = !self.root.exists();
        create_private_dir(&self.root)?;
        create_private_dir(&self.root.join("data"))?;
        for d in [
            self.plans_dir(),
            self.outputs_dir(),
            self.work_dir(),
            self.daemon_dir(),
        ] {
            std::fs::create_dir_all(d)?;
        }
        Ok(created)
    }

    /// Removes the uploaded sources (`data/work/requests/<task_id>`) of finished tasks that were
    /// last modified more than `max_age` ago. `is_final(task_id)` says whether a task has ended
    /// (sources of queued and running tasks are kept whatever their age). Returns the ids whose
    /// sources were removed. Meant to be called periodically by the engine with
    /// `[daemon] keep_sources`.
    pub fn remove_old_requests(
        &self,
        max_age: Duration,
        is_final: impl Fn(&str) -> bool,
    ) -> io::Result<Vec<String>> {
        self.remove_old_requests_at(SystemTime::now(), max_age, is_final)
    }

    /// [`Home::remove_old_requests`] as seen at `now`.
    pub fn remove_old_requests_at(
        &self,
        now: SystemTime,
        max_age: Duration,
        is_final: impl Fn(&str) -> bool,
    ) -> io::Result<Vec<String>> {
        let dir = self.work_dir().join("requests");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut removed = Vec::new();
        for entry in entries {
            let entry = entry?;
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            // `symlink_metadata`: a link planted in the directory is judged (and removed) as
            // itself, never followed.
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or(Duration::ZERO);
            if age < max_age || !is_final(&id) {
                continue;
            }
            let res = if meta.is_dir() {
                std::fs::remove_dir_all(entry.path())
            } else {
                std::fs::remove_file(entry.path())
            };
            match res {
                Ok(()) => removed.push(id),
                // Removed meanwhile (another sweep): nothing left to do.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        removed.sort();
        Ok(removed)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn env_toml(&self) -> PathBuf {
        self.root.join(".env.toml")
    }
    pub fn plans_dir(&self) -> PathBuf {
        self.root.join("plans")
    }
    pub fn outputs_dir(&self) -> PathBuf {
        self.root.join("data").join("outputs")
    }
    pub fn work_dir(&self) -> PathBuf {
        self.root.join("data").join("work")
    }
    pub fn daemon_dir(&self) -> PathBuf {
        self.root.join("data").join("daemon")
    }
    pub fn tasks_db(&self) -> PathBuf {
        self.root.join("tasks.db")
    }
    pub fn task_log(&self, task_id: &str) -> PathBuf {
        self.daemon_dir().join(format!("{task_id}.out"))
    }
    /// Where a request's uploaded plan sources are unpacked.
    pub fn request_dir(&self, task_id: &str) -> PathBuf {
        self.work_dir().join("requests").join(task_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_home_and_its_data_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::at(tmp.path().join("a/home"));
        assert!(home.ensure().unwrap());
        for d in [home.root().to_path_buf(), home.root().join("data")] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        assert!(home.work_dir().is_dir() && home.plans_dir().is_dir());
        // A second call finds it.
        assert!(!home.ensure().unwrap());
    }

    #[test]
    fn old_sources_of_finished_tasks_are_removed_and_the_rest_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::at(tmp.path());
        home.ensure().unwrap();
        for id in ["done-old", "done-new", "running-old"] {
            let d = home.request_dir(id);
            std::fs::create_dir_all(d.join("src")).unwrap();
            std::fs::write(d.join("src/main.go"), "package main").unwrap();
        }
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 3600);
        // Make two of them two days old.
        for id in ["done-old", "running-old"] {
            std::fs::File::open(home.request_dir(id))
                .unwrap()
                .set_modified(now - 2 * day)
                .unwrap();
        }
        let is_final = |id: &str| id.starts_with("done");
        let removed = home.remove_old_requests_at(now, day, is_final).unwrap();
        assert_eq!(removed, vec!["done-old".to_string()]);
        assert!(!home.request_dir("done-old").exists());
        assert!(home.request_dir("done-new").exists());
        assert!(home.request_dir("running-old").exists());
        // A zero age removes every finished task's sources.
        let removed = home
            .remove_old_requests_at(now + Duration::from_secs(1), Duration::ZERO, is_final)
            .unwrap();
        assert_eq!(removed, vec!["done-new".to_string()]);
        assert!(home.request_dir("running-old").exists());
        // No requests directory at all is not an error.
        let empty = Home::at(tmp.path().join("other"));
        assert!(empty.remove_old_requests(day, |_| true).unwrap().is_empty());
    }
}
