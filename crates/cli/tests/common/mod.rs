//! Helpers shared by the integration test binaries: a temporary `$TESTGROUND_HOME` driving the
//! real `testground` binary, output rendering, and process listings. Each binary uses a
//! different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A temporary `$TESTGROUND_HOME`, removed on drop (or, for [`Home::shared`], by the next
/// test run that uses the same name).
pub struct Home {
    _dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Home {
    pub fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        Home {
            path: dir.path().to_path_buf(),
            _dir: Some(dir),
        }
    }

    /// A home under the build's `target/` directory, emptied first, for tests that share one
    /// home in a static (statics are never dropped, so a temporary one would stay in /tmp).
    pub fn shared(name: &str) -> Home {
        let path = repo().join("target").join(name);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Home { _dir: None, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `testground` binary with this home, no inherited log level, no stdin, run in the
    /// home (files it writes by default, such as `<task>.tgz`, land there). It never looks for
    /// a daemon on the default address (`TESTGROUND_EMBEDDED`): one started by someone else on
    /// this machine must not take the tests' tasks.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(assert_cmd::cargo::cargo_bin("testground"));
        c.env("TESTGROUND_HOME", self.path())
            .env("TESTGROUND_EMBEDDED", "1")
            .env_remove("LOG_LEVEL")
            .env_remove("RUST_LOG")
            .current_dir(self.path())
            .stdin(Stdio::null());
        c
    }

    pub fn tg(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// [`Home::tg`] with the output as text.
    pub fn run(&self, args: &[&str]) -> Out {
        let o = self.tg(args);
        Out {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// A plan directory outside the plans directory, ready to import.
    pub fn plan_src(&self, name: &str, manifest: &str) -> PathBuf {
        let dir = self.path().join("src").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("manifest.toml"), manifest).unwrap();
        dir
    }

    /// Imports `plans/<plan>` of this repository.
    pub fn import(&self, plan: &str) {
        let from = repo().join("plans").join(plan);
        let out = self.tg(&["plan", "import", "--from", from.to_str().unwrap()]);
        assert!(out.status.success(), "import {plan}: {}", text(&out));
    }
}

/// A finished command's exit code and output.
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Out {
    /// The `error: ...` line: exactly one, no panic, no backtrace.
    pub fn error_line(&self) -> &str {
        assert!(!self.stderr.contains("panicked"), "{self}");
        assert!(!self.stderr.contains("RUST_BACKTRACE"), "{self}");
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "one error line expected:\n{self}");
        assert!(lines[0].starts_with("error: "), "{self}");
        lines[0]
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

/// A free port on loopback (for a daemon's listener).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `testground daemon` on this home, killed when dropped.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    /// Starts it and waits until it listens on `port` (its `.env.toml` must say so).
    pub fn start(home: &Home, port: u16) -> Daemon {
        let child = home
            .cmd()
            .arg("daemon")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "daemon did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        Daemon { child }
    }

    /// SIGTERM, then wait: the daemon shuts down gracefully.
    pub fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("daemon did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut s = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host link of a run (`tgh<slot>`), from the network line naming it ("host link tgh12").
pub fn host_link_of(o: &Output) -> Option<String> {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let rest = all.split(", host link ").nth(1)?;
    let name = rest.split(|c: char| !c.is_ascii_alphanumeric()).next()?;
    name.starts_with("tgh").then(|| name.to_string())
}

/// The run's temp directories (`$TMPDIR/tg-<id>-*`).
pub fn temp_dirs(id: &str) -> Vec<PathBuf> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("tg-{id}-")))
        })
        .collect()
}

/// Every "ping RTT was <d> [..]" the seed's ping-pong instances printed, as durations.
pub fn ping_rtts(stdout: &str) -> Vec<Duration> {
    stdout
        .lines()
        .filter_map(|l| l.split("ping RTT was ").nth(1))
        .map(|rest| {
            let d = rest.split_whitespace().next().unwrap();
            let ms: f64 = if let Some(v) = d.strip_suffix("ms") {
                v.parse().unwrap()
            } else if let Some(v) = d.strip_suffix('s') {
                v.parse::<f64>().unwrap() * 1000.0
            } else {
                panic!("unexpected duration {d}")
            };
            Duration::from_secs_f64(ms / 1000.0)
        })
        .collect()
}

/// The entry paths of a `.tgz` archive, without trailing slashes.
pub fn tgz_entries(path: &Path) -> Vec<String> {
    let f = std::fs::File::open(path).unwrap();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    ar.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            e.path()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches('/')
                .to_string()
        })
        .collect()
}

/// The id of the first run recorded in `home` (its record in `data/runs`) for which `ready`
/// holds, waiting up to `within` while `child` (the CLI running it) lives; panics with the
/// child's output otherwise.
pub fn wait_for_run(
    home: &Home,
    child: &mut Child,
    within: Duration,
    ready: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + within;
    let runs = home.path().join("data").join("runs");
    loop {
        let id = std::fs::read_dir(&runs)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .filter(|n| !n.starts_with('.'))
                    .map(str::to_string)
            })
            .next();
        if let Some(id) = id
            && ready(&id)
        {
            return id;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let mut out = String::new();
            if let Some(mut o) = child.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            panic!("the run did not get ready:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a command printed on a terminal: it runs with stdout and stderr on a pseudo-terminal
/// (120x40), and everything it wrote there is returned once it has exited, with the terminal's
/// `\r\n` turned back into `\n`.
pub fn run_in_pty(mut cmd: Command, within: Duration) -> (Option<i32>, String) {
    use std::os::fd::OwnedFd;
    let ws = nix::pty::Winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&ws), None).unwrap();
    let slave_err: OwnedFd = pty.slave.try_clone().unwrap();
    cmd.stdout(Stdio::from(pty.slave))
        .stderr(Stdio::from(slave_err));
    let mut child = cmd.spawn().unwrap();
    // The command holds copies of the slave: drop them, so that the master reads EOF (EIO)
    // once the child and its children have closed theirs.
    drop(cmd);
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
        all
    });
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the command did not end within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap();
    let text = String::from_utf8_lossy(&out).replace("\r\n", "\n");
    (status.code(), text)
}

/// The SGR (color) sequences in `s` that set something (`\x1b[32m`; not the reset `\x1b[0m`,
/// not cursor movements such as `\x1b[2K`).
pub fn color_escapes(s: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, _) in s.match_indices("\x1b[") {
        let rest = &s[i + 2..];
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == ';'))
            .unwrap_or(rest.len());
        let params = &rest[..end];
        if rest[end..].starts_with('m') && !params.is_empty() && params != "0" {
            found.push(format!("\\x1b[{params}m"));
        }
    }
    found
}
