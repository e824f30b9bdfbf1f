//! Helpers shared by the end-to-end test binaries: a temporary `$TESTGROUND_HOME` driving the
//! real `testground` binary, output rendering, and process listings. Each binary uses a
//! different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A temporary `$TESTGROUND_HOME`, removed on drop.
pub struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Home {
        Home {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The `testground` binary with this home, no inherited log level, no stdin.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(assert_cmd::cargo::cargo_bin("testground"));
        c.env("TESTGROUND_HOME", self.path())
            .env_remove("LOG_LEVEL")
            .stdin(Stdio::null());
        c
    }

    pub fn tg(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Imports `plans/<plan>` of this repository.
    pub fn import(&self, plan: &str) {
        let from = repo().join("plans").join(plan);
        let out = self.tg(&["plan", "import", "--from", from.to_str().unwrap()]);
        assert!(out.status.success(), "import {plan}: {}", text(&out));
    }
}

/// Exit status, stdout and stderr, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The id from `run is queued with ID: <id>`, which scripts take as awk's `$10`.
pub fn queued_id(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("run is queued with ID: "))
        .unwrap_or_else(|| panic!("no queued line in:\n{}", text(o)));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 10, "awk $10 must be the id: {line:?}");
    let id = fields[9].to_string();
    assert_eq!(id.len(), 20, "run ids are xids: {id}");
    id
}

/// Pids of live processes whose environment holds `TEST_RUN=<run_id>`.
pub fn processes_of_run(run_id: &str) -> Vec<u32> {
    let needle = format!("TEST_RUN={run_id}");
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        // Zombies have an empty environ and are no longer running anything.
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}
