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

/// `run single` of example-python's `metrics` case, `n` instances of `points` points each.
fn run_metrics(home: &Home, n: &str, points: &str) -> std::process::Output {
    home.tg(&[
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
        n,
        "--tp",
        &format!("points={points}"),
        "--wait",
    ])
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
            let out = run_metrics(&home, "1", "3");
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

/// `testground dashboard` with no daemon: it serves the runs an embedded CLI made on the same
/// home, follows new ones from another process, and applies the tokens.
#[test]
fn dashboard_command_serves_embedded_runs() {
    let home = Home::new();
    std::fs::write(
        home.path().join(".env.toml"),
        format!("[daemon]\ntokens = [\"{TOKEN}\"]\n"),
    )
    .unwrap();
    home.import("example-python");
    let run = |points: &str| {
        let out = run_metrics(&home, "2", points);
        assert!(out.status.success(), "{}", text(&out));
        queued_id(&out)
    };
    let first = run("4");

    let port = free_port();
    let mut dash = home
        .cmd()
        .args(["dashboard", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "dashboard did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let base = format!("http://127.0.0.1:{port}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::new();
        let get = |path: &str| c.get(format!("{base}{path}")).bearer_auth(TOKEN).send();
        let r = c.get(format!("{base}/api/v1/tasks")).send().await.unwrap();
        assert_eq!(r.status(), 403, "no token");
        let page = get("/").await.unwrap();
        assert_eq!(page.status(), 200);
        assert!(page.text().await.unwrap().contains("/assets/app.js"));

        let tasks: serde_json::Value = get("/api/v1/tasks").await.unwrap().json().await.unwrap();
        assert_eq!(tasks[0]["id"], first.as_str(), "{tasks}");
        assert_eq!(tasks[0]["outcome"], "success", "{tasks}");
        assert_eq!(tasks[0]["outcomes"]["single"]["ok"], 2, "{tasks}");
        let metrics: serde_json::Value = get(&format!("/api/v1/runs/{first}/metrics"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(metrics[0]["name"], "step", "{metrics}");
        assert_eq!(metrics[0]["points"], 8, "2 instances, 4 points: {metrics}");
        let r = get(&format!(
            "/api/v1/runs/{first}/file?path=../../../../.env.toml"
        ))
        .await
        .unwrap();
        assert_eq!(r.status(), 400, "paths stay in the run");
        let out = get(&format!("/api/v1/runs/{first}/file?path=single/1/run.out"))
            .await
            .unwrap();
        assert_eq!(out.headers()["x-done"], "true");
        assert!(out.text().await.unwrap().contains("recorded 4 points"));

        // A run of another process shows up on the event stream.
        let mut events = get("/api/v1/events").await.unwrap();
        let first_event = events.chunk().await.unwrap().unwrap();
        assert!(
            String::from_utf8_lossy(&first_event).contains("event: tasks"),
            "{first_event:?}"
        );
        // Blocking here is fine: the multi-thread runtime's other workers keep the stream.
        let second = run("1");
        let next = tokio::time::timeout(std::time::Duration::from_secs(20), events.chunk())
            .await
            .expect("an event for the new run")
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&next).contains("event: tasks"));
        let tasks: serde_json::Value = get("/api/v1/tasks").await.unwrap().json().await.unwrap();
        assert_eq!(tasks[0]["id"], second.as_str(), "{tasks}");
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dash.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = dash.wait().unwrap();
    assert!(
        status.success(),
        "dashboard exits cleanly on SIGTERM: {status:?}"
    );
}
