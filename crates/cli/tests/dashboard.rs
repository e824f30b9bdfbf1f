//! The dashboard in a real browser: a daemon with a token, a run with metrics and a failing
//! instance, then `browser/dashboard.mjs` drives Debian's headless Chromium through
//! playwright-core and checks the task list, live updates, the run page (outcome, the failing
//! instance's log, the metric plot's points) and the plan's history. Screenshots are kept in
//! `target/test-artifacts/dashboard/`.
//!
//! Needs `node`, `/usr/bin/chromium` and the npm package (installed here with `npm ci` when
//! missing). Without them the test skips with the reason, except under
//! `TG_REQUIRE_PRIVILEGED=1` (CI), where it fails.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{Daemon, Home, free_port, queued_id, repo, text};

const TOKEN: &str = "dashboard-test-token";

fn required() -> bool {
    std::env::var("TG_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1")
}

fn skip(reason: &str) {
    assert!(!required(), "TG_REQUIRE_PRIVILEGED=1 but {reason}");
    eprintln!("SKIP dashboard browser test: {reason}");
}

fn chromium() -> Option<PathBuf> {
    let p = std::env::var_os("TG_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    p.exists().then_some(p)
}

/// `browser/node_modules`, installed from the lock file when missing.
fn browser_dir() -> Result<PathBuf, String> {
    let dir = repo().join("crates/cli/tests/browser");
    if dir.join("node_modules/playwright-core").is_dir() {
        return Ok(dir);
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .output()
        .map_err(|e| format!("cannot run npm: {e}"))?;
    if !out.status.success() {
        return Err(format!("npm ci failed: {}", text(&out)));
    }
    Ok(dir)
}

fn composition(path: &Path) {
    std::fs::write(
        path,
        r#"[global]
plan = "example-python"
case = "metrics"
builder = "exec:generic"
runner = "local:exec"
total_instances = 3

[[groups]]
id = "good"
instances = { count = 2 }
[groups.run.test_params]
points = "5"

[[groups]]
id = "bad"
instances = { count = 1 }
[groups.run.test_params]
points = "5"
fail = "true"
"#,
    )
    .unwrap();
}

#[test]
fn dashboard_in_a_real_browser() {
    if Command::new("node").arg("--version").output().is_err() {
        return skip("node is not installed");
    }
    let Some(chromium) = chromium() else {
        return skip("/usr/bin/chromium is not installed (apt-get install chromium)");
    };
    let browser = match browser_dir() {
        Ok(d) => d,
        Err(e) => return skip(&e),
    };

    let home = Home::new();
    let port = free_port();
    std::fs::write(
        home.path().join(".env.toml"),
        format!(
            "[daemon]\nlisten = \"127.0.0.1:{port}\"\ntokens = [\"{TOKEN}\"]\n\n\
             [client]\nendpoint = \"http://127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\n"
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&home, port);
    home.import("example-python");
    let comp = home.path().join("comp.toml");
    composition(&comp);
    let out = home.tg(&["run", "composition", "-f", comp.to_str().unwrap(), "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the bad group fails: {}",
        text(&out)
    );
    let task = queued_id(&out);

    let shots = repo().join("target/test-artifacts/dashboard");
    let mut node = Command::new("node")
        .arg(browser.join("dashboard.mjs"))
        .current_dir(&browser)
        .env("TG_URL", format!("http://127.0.0.1:{port}"))
        .env("TG_TOKEN", TOKEN)
        .env("TG_TASK", &task)
        // 2 good and 1 bad instance, 5 points each.
        .env("TG_EXPECT_POINTS", "15")
        .env("TG_SCREENSHOT_DIR", &shots)
        .env("TG_CHROMIUM", &chromium)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(node.stdout.take().unwrap());
    let mut seen = Vec::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        eprintln!("browser: {line}");
        if line == "READY" {
            // The page is open on the list: a new run must appear there by itself.
            let out = home.tg(&[
                "run",
                "single",
                "--plan",
                "example-python",
                "--testcase",
                "metrics",
                "--builder",
                "exec:generic",
                "--runner",
                "local:exec",
                "-i",
                "1",
                "--tp",
                "points=3",
                "--wait",
            ]);
            assert!(out.status.success(), "{}", text(&out));
        }
        seen.push(line);
    }
    let status = node.wait().unwrap();
    daemon.stop();
    assert!(
        status.success() && seen.iter().any(|l| l == "DONE"),
        "browser checks failed:\n{}",
        seen.join("\n")
    );
    for shot in [
        "dashboard-tasks.png",
        "dashboard-run.png",
        "dashboard-history.png",
    ] {
        let len = std::fs::metadata(shots.join(shot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 1000, "screenshot {shot} saved ({len} bytes)");
    }
    eprintln!("screenshots in {}", shots.display());
}
