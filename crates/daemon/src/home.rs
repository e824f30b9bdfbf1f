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

use std::io;
use std::path::{Path, PathBuf};

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

    /// Creates the directory tree if missing. Returns true when the home itself was created.
    pub fn ensure(&self) -> io::Result<bool> {
        let created = !self.root.exists();
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
