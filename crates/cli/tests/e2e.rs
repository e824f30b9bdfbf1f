//! End-to-end tests: the real `testground` binary, real builds of the example plans, real
//! instances, each test in its own temporary `$TESTGROUND_HOME`.

mod common;

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{
    Daemon, Home, color_escapes, free_port, processes_of_run, queued_id, run_in_pty, text,
    tgz_entries,
};

fn assert_no_process_left(run_id: &str) {
    let left = processes_of_run(run_id);
    assert!(left.is_empty(), "processes of run {run_id} left: {left:?}");
}

#[test]
fn go_placebo_cases_give_the_right_outcome_and_exit_code() {
    let home = Home::new();
    home.import("placebo");

    // ok, three instances: success, the scraped lines, no process left.
    let out = home.tg(&[
        "run",
        "single",
        "--plan",
        "placebo",
        "--testcase",
        "ok",
        "--builder",
        "exec:go",
        "--runner",
        "local:exec",
        "--instances",
        "3",
        "--wait",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let id = queued_id(&out);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("run finished with outcome = success (single:3/3)"),
        "{s}"
    );
    for i in 0..3 {
        assert!(s.contains(&format!("OK << single[{i:03}] >>")), "{s}");
    }
    let finished = s
        .lines()
        .find(|l| l.contains("finished run with ID: "))
        .expect("finished line");
    assert_eq!(finished.split_whitespace().nth(8), Some(id.as_str()));
    assert!(s.contains(&format!("result default[{id}]: success")), "{s}");
    assert_no_process_left(&id);
    for i in 0..3 {
        let dir = home
            .path()
            .join(format!("data/outputs/local_exec/placebo/{id}/single/{i}"));
        let run_out = std::fs::read_to_string(dir.join("run.out")).unwrap();
        assert!(run_out.contains("success_event"), "{run_out}");
        assert!(dir.join("run.err").exists());
    }

    // Failing cases: exit 1, outcome failure, nothing left running.
    for (case, extra) in [
        ("fail", vec![]),
        ("panic", vec![]),
        ("no-terminal", vec![]),
        ("stall", vec!["--run-cfg", "run_timeout=3s"]),
    ] {
        let started = Instant::now();
        let mut args = vec![
            "run",
            "single",
            "--plan",
            "placebo",
            "--testcase",
            case,
            "--builder",
            "exec:go",
            "--runner",
            "local:exec",
            "--instances",
            "2",
            "--wait",
        ];
        args.extend(extra);
        let out = home.tg(&args);
        assert_eq!(out.status.code(), Some(1), "{case}: {}", text(&out));
        let id = queued_id(&out);
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(
            s.contains("run finished with outcome = failure (single:0/2)"),
            "{case}: {s}"
        );
        assert!(
            s.contains(&format!("result default[{id}]: failure")),
            "{case}: {s}"
        );
        assert_no_process_left(&id);
        if case == "stall" {
            assert!(
                s.contains("run canceled after reaching the task timeout"),
                "{s}"
            );
            assert!(started.elapsed() < Duration::from_secs(120));
        }
    }

    // Params: manifest defaults pass, a bad value fails, precedence of --tp over defaults.
    let params = |tp: &[&str]| {
        let mut args = vec![
            "run",
            "single",
            "--plan",
            "placebo",
            "--testcase",
            "params",
            "--builder",
            "exec:go",
            "--runner",
            "local:exec",
            "--instances",
            "1",
            "--wait",
        ];
        for p in tp {
            args.push("--tp");
            args.push(p);
        }
        home.tg(&args)
    };
    assert!(params(&[]).status.success());
    assert_eq!(params(&["answer=41"]).status.code(), Some(1));
    assert!(params(&["answer=41", "word=any"]).status.success());

    // `status` and `tasks` know the runs (`id` is the first, successful run).
    let out = home.tg(&["status", "-t", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("Status:\t\tcomplete"), "{s}");
    assert!(s.contains("Outcome:\tsuccess"), "{s}");
    let out = home.tg(&["tasks"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));
}

#[test]
fn two_group_composition_gives_each_group_its_params_and_count() {
    let home = Home::new();
    home.import("example-python");
    let comp = home.path().join("two-groups.toml");
    std::fs::write(
        &comp,
        r#"
[metadata]
name = "two-groups"

[global]
plan = "example-python"
case = "params"
builder = "exec:generic"
runner = "local:exec"
total_instances = 3

[[groups]]
id = "left"
instances = { count = 2 }
  [groups.run]
  test_params = { greeting = "from-left" }

[[groups]]
id = "right"
instances = { count = 1 }
  [groups.run]
  test_params = { greeting = "from-right" }
"#,
    )
    .unwrap();
    let out = home.tg(&["run", "composition", "-f", comp.to_str().unwrap(), "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let id = queued_id(&out);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("run finished with outcome = success (left:2/2, right:1/1)"),
        "{s}"
    );
    let base = home
        .path()
        .join(format!("data/outputs/local_exec/example-python/{id}"));
    for (group, n, greeting) in [("left", 2, "from-left"), ("right", 1, "from-right")] {
        let dirs: Vec<_> = std::fs::read_dir(base.join(group)).unwrap().collect();
        assert_eq!(dirs.len(), n, "{group}");
        for i in 0..n {
            let run_out =
                std::fs::read_to_string(base.join(group).join(i.to_string()).join("run.out"))
                    .unwrap();
            assert!(run_out.contains(greeting), "{group}[{i}]: {run_out}");
        }
    }
}

#[test]
fn collect_yields_the_archive_layout() {
    let home = Home::new();
    home.import("example-python");
    let archive = home.path().join("out.tgz");
    let out = home.tg(&[
        "run",
        "single",
        "--plan",
        "example-python",
        "--testcase",
        "ok",
        "--builder",
        "exec:generic",
        "--runner",
        "local:exec",
        "-i",
        "2",
        "--collect",
        "-o",
        archive.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let id = queued_id(&out);
    let entries = tgz_entries(&archive);
    for i in 0..2 {
        let want = format!("{id}/single/{i}/run.out");
        assert!(entries.contains(&want), "{want} not in {entries:?}");
    }

    // `collect` of the same run gives the same layout; an unknown run is an error.
    let again = home.path().join("again.tgz");
    let out = home.tg(&[
        "collect",
        &id,
        "--runner",
        "local:exec",
        "-o",
        again.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(tgz_entries(&again).contains(&format!("{id}/single/1/run.out")));
    let out = home.tg(&["collect", "cv0000000000000000aa", "--runner", "local:exec"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn rust_plan_builds_with_exec_rust_and_the_second_build_is_cached() {
    let home = Home::new();
    home.import("example-rust");
    let run = || {
        home.tg(&[
            "run",
            "single",
            "--plan",
            "example-rust",
            "--testcase",
            "ok",
            "--builder",
            "exec:rust",
            "--runner",
            "local:exec",
            "-i",
            "2",
            "--build-cfg",
            "profile=dev",
            "--wait",
        ])
    };
    let first = run();
    assert!(first.status.success(), "{}", text(&first));
    assert!(String::from_utf8_lossy(&first.stdout).contains("\"cached\": false"));
    let second = run();
    assert!(second.status.success(), "{}", text(&second));
    let s = String::from_utf8_lossy(&second.stdout);
    assert!(s.contains("\"cached\": true"), "{s}");
    assert!(
        s.contains("run finished with outcome = success (single:2/2)"),
        "{s}"
    );
}

#[test]
fn bad_run_requests_fail_with_one_clear_line() {
    let home = Home::new();
    home.import("example-python");
    // Instance count outside the test case's range.
    let out = home.tg(&[
        "run",
        "single",
        "--plan",
        "example-python",
        "--testcase",
        "ok",
        "--builder",
        "exec:generic",
        "--runner",
        "local:exec",
        "-i",
        "5000",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("outside of allowable range"), "{all}");
    assert!(!all.contains("panicked"), "{all}");
    // Unknown test case.
    let out = home.tg(&[
        "run",
        "single",
        "--plan",
        "example-python",
        "--testcase",
        "nope",
        "--builder",
        "exec:generic",
        "--runner",
        "local:exec",
        "-i",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("nope"), "{all}");
    // A runner we do not have: a clear not-supported error.
    let out = home.tg(&[
        "run",
        "single",
        "--plan",
        "example-python",
        "--testcase",
        "ok",
        "--builder",
        "exec:generic",
        "--runner",
        "local:docker",
        "-i",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("local:docker"), "{all}");
}

// ---- daemon mode ------------------------------------------------------------------------

#[test]
fn daemon_keeps_tasks_across_a_restart_and_checks_tokens() {
    let home = Home::new();
    let port = free_port();
    std::fs::write(
        home.path().join(".env.toml"),
        format!(
            "[daemon]\nlisten = \"127.0.0.1:{port}\"\ntokens = [\"s3cret\"]\n\n[client]\nendpoint = \"http://127.0.0.1:{port}\"\ntoken = \"s3cret\"\n"
        ),
    )
    .unwrap();
    home.import("example-python");
    let daemon = Daemon::start(&home, port);

    // Two runs queued without waiting: the CLI returns once each is queued.
    let mut ids = Vec::new();
    for case in ["ok", "fail"] {
        let out = home.tg(&[
            "run",
            "single",
            "--plan",
            "example-python",
            "--testcase",
            case,
            "--builder",
            "exec:generic",
            "--runner",
            "local:exec",
            "-i",
            "1",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        ids.push(queued_id(&out));
    }
    // Wait for both to finish through `status`.
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in &ids {
        loop {
            let out = home.tg(&["status", "-t", id]);
            let s = String::from_utf8_lossy(&out.stdout).to_string();
            if s.contains("Status:\t\tcomplete") {
                break;
            }
            assert!(Instant::now() < deadline, "{id} did not finish: {s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // A wrong token is refused.
    let out = home.tg(&["--endpoint", &format!("http://127.0.0.1:{port}"), "tasks"]);
    assert!(out.status.success(), "{}", text(&out));
    let raw = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg(format!("http://127.0.0.1:{port}/tasks"))
        .output();
    if let Ok(raw) = raw {
        assert_eq!(String::from_utf8_lossy(&raw.stdout), "403");
    }
    daemon.stop();

    // After a restart both tasks are still listed with their final state and outcome.
    let daemon = Daemon::start(&home, port);
    let out = home.tg(&["tasks"]);
    assert!(out.status.success(), "{}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    for id in &ids {
        let line = s
            .lines()
            .find(|l| l.contains(id.as_str()))
            .unwrap_or_else(|| panic!("{id} missing:\n{s}"));
        assert!(line.contains("complete"), "{line}");
    }
    let out = home.tg(&["status", "-t", &ids[0]]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Outcome:\tsuccess"));
    let out = home.tg(&["status", "-t", &ids[1]]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Outcome:\tfailure"));
    // Logs survive too.
    let out = home.tg(&["logs", "-t", &ids[0]]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("run finished with outcome = success"));
    daemon.stop();
}

#[test]
fn terminate_kills_a_running_embedded_run() {
    let home = Home::new();
    home.import("example-python");
    // A stalling instance: exec:generic with a sleeping command.
    let plan = home.path().join("sleeper");
    std::fs::create_dir_all(&plan).unwrap();
    std::fs::write(
        plan.join("manifest.toml"),
        "name = \"sleeper\"\n[builders.\"exec:generic\"]\nexec = \"sleep 600\"\n[runners.\"local:exec\"]\n[[testcases]]\nname = \"sleep\"\ninstances = { min = 1, max = 10 }\n",
    )
    .unwrap();
    let out = home.tg(&["plan", "import", "--from", plan.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let mut child = home
        .cmd()
        .args([
            "run",
            "single",
            "--plan",
            "sleeper",
            "--testcase",
            "sleep",
            "--builder",
            "exec:generic",
            "--runner",
            "local:exec",
            "-i",
            "3",
            "--wait",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until its three instances run.
    let deadline = Instant::now() + Duration::from_secs(60);
    let run_id = loop {
        let out = home.tg(&["tasks"]);
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        if let Some(line) = s.lines().find(|l| l.contains("processing")) {
            let id = line.split_whitespace().next().unwrap().to_string();
            if processes_of_run(&id).len() >= 3 {
                break id;
            }
        }
        if Instant::now() > deadline {
            // Show why: the run's own output.
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("run did not start: {s}\n--- the run:\n{}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = home.tg(&["terminate", "--runner", "local:exec"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_no_process_left(&run_id);
    let out = home.tg(&["status", "-t", &run_id]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Outcome:\tcanceled"),
        "{}",
        text(&out)
    );
}

#[test]
fn rust_sdk_example_plan_runs_through_the_engine() {
    let home = Home::new();
    home.import("example-sdk");
    let run = |case: &str, n: &str| {
        home.tg(&[
            "run",
            "single",
            "--plan",
            "example-sdk",
            "--testcase",
            case,
            "--builder",
            "exec:rust",
            "--runner",
            "local:exec",
            "-i",
            n,
            "--build-cfg",
            "profile=dev",
            "--wait",
        ])
    };
    // Barriers and all-to-all pub/sub through the engine's sync service.
    let out = run("sync", "5");
    assert!(out.status.success(), "{}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("run finished with outcome = success (single:5/5)"),
        "{s}"
    );
    // Typed params from the manifest defaults, metrics files in the outputs.
    let out = run("params", "1");
    assert!(out.status.success(), "{}", text(&out));
    let out = run("metrics", "1");
    assert!(out.status.success(), "{}", text(&out));
    let id = queued_id(&out);
    let results = std::fs::read_to_string(home.path().join(format!(
        "data/outputs/local_exec/example-sdk/{id}/single/0/results.out"
    )))
    .unwrap();
    assert!(results.contains("\"measures\""), "{results}");
    // A panic is a crash: not ok.
    let out = run("panic", "2");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("run finished with outcome = failure (single:0/2)"),
        "{s}"
    );
    assert!(s.contains("CRASH << single[000] >>"), "{s}");
    // The first to end tells that the other may now wait for it, once.
    assert_eq!(
        s.matches("ended without success while 1 other instance(s) have not ended")
            .count(),
        1,
        "{s}"
    );
}

#[test]
fn ctrl_c_during_heavy_output_cancels_the_run_at_once() {
    ctrl_c_cancels(&Home::new(), Duration::from_secs(2));
}

#[test]
fn ctrl_c_of_a_daemon_client_cancels_its_run_at_once() {
    let home = Home::new();
    let port = free_port();
    std::fs::write(
        home.path().join(".env.toml"),
        format!(
            "[daemon]\nlisten = \"127.0.0.1:{port}\"\n[sync]\nport = 0\n[client]\nendpoint = \"http://127.0.0.1:{port}\"\n"
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&home, port);
    // The daemon records the end of a canceled run once it has written out what its instances
    // printed, which takes seconds on a loaded machine: the CLI waits for that, up to its grace.
    ctrl_c_cancels(&home, Duration::from_secs(12));
    daemon.stop();
}

/// Imports `chatty`: instances printing 200-byte lines in bursts, so that the CLI is busy
/// printing all the time (when a listener made anew on each pass of its loop lost Ctrl-C).
fn import_chatty(home: &Home) {
    let plan = home.path().join("chatty");
    std::fs::create_dir_all(&plan).unwrap();
    std::fs::write(
        plan.join("spam.sh"),
        "line=$(printf '%0200d' 0)\nwhile :; do\n  i=0\n  while [ $i -lt 200 ]; do echo \"$line\"; i=$((i+1)); done\n  sleep 0.01\ndone\n",
    )
    .unwrap();
    std::fs::write(
        plan.join("manifest.toml"),
        "name = \"chatty\"\n[builders.\"exec:generic\"]\nexec = \"sh spam.sh\"\n[runners.\"local:exec\"]\n[[testcases]]\nname = \"spam\"\ninstances = { min = 1, max = 10 }\n",
    )
    .unwrap();
    let out = home.tg(&["plan", "import", "--from", plan.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
}

const CHATTY_RUN: [&str; 13] = [
    "run",
    "single",
    "--plan",
    "chatty",
    "--testcase",
    "spam",
    "--builder",
    "exec:generic",
    "--runner",
    "local:exec",
    "-i",
    "2",
    "--wait",
];

#[test]
fn a_closed_stdout_cancels_an_embedded_run() {
    let home = Home::new();
    import_chatty(&home);
    // A pipe whose reader has gone: the first output fails with EPIPE.
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let started = Instant::now();
    let mut child = home
        .cmd()
        .args(CHATTY_RUN)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("the CLI did not end with its stdout closed\n{}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The run was canceled and waited for: its status, and no instance left behind.
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("outcome: canceled"), "{stderr}");
    let out = home.tg(&["tasks"]);
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    let line = listing
        .lines()
        .find(|l| l.contains("chatty"))
        .unwrap_or_else(|| panic!("no chatty task in {listing}"));
    let run_id = line.split_whitespace().next().unwrap();
    assert!(line.contains("canceled"), "{line}");
    assert_no_process_left(run_id);
}

/// Runs a plan that prints heavily with `--wait`, sends the CLI SIGINT, and checks that it
/// exits `within` with the canceled run's status and that no instance is left.
fn ctrl_c_cancels(home: &Home, within: Duration) {
    import_chatty(home);
    let mut child = home
        .cmd()
        .args(CHATTY_RUN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read stdout as fast as it comes; report the run id and the number of lines seen.
    let stdout = child.stdout.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (id_tx, id_rx) = std::sync::mpsc::channel();
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut tail = Vec::new();
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.split("run is queued with ID: ").nth(1) {
                    let _ = id_tx.send(rest.trim().to_string());
                }
                lines.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if !line.ends_with("0000000000") {
                    tail.push(line);
                }
            }
            tail
        })
    };
    let stop = |mut child: Child, why: &str| -> ! {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!("{why}\n{}", text(&out));
    };
    let Ok(run_id) = id_rx.recv_timeout(Duration::from_secs(60)) else {
        stop(child, "the run was not queued");
    };
    // Both instances run and their output streams through the CLI.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = lines.load(std::sync::atomic::Ordering::Relaxed);
        if processes_of_run(&run_id).len() >= 2 && seen > 5_000 {
            break;
        }
        if Instant::now() > deadline {
            stop(child, &format!("no heavy output after 60 s ({seen} lines)"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let interrupted = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if interrupted.elapsed() > within {
            stop(
                child,
                &format!("the CLI did not exit within {within:?} of SIGINT"),
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = interrupted.elapsed();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let tail = reader.join().unwrap().join("\n");
    assert_no_process_left(&run_id);
    // The first Ctrl-C canceled the run, which then ended: the run's status, not a crash.
    assert_eq!(
        status.code(),
        Some(1),
        "after {elapsed:?}\n{tail}\n--- stderr\n{stderr}"
    );
    assert!(tail.contains("interrupted: canceling task"), "{tail}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let out = home.tg(&["status", "-t", &run_id]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Outcome:\tcanceled"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_daemon_removes_the_uploaded_sources_of_finished_tasks() {
    let home = Home::new();
    let port = free_port();
    std::fs::write(
        home.path().join(".env.toml"),
        format!(
            "[daemon]\nlisten = \"127.0.0.1:{port}\"\nkeep_sources = \"0s\"\n[sync]\nport = 0\n[client]\nendpoint = \"http://127.0.0.1:{port}\"\n"
        ),
    )
    .unwrap();
    home.import("example-python");
    let daemon = Daemon::start(&home, port);
    let out = home.tg(&[
        "run",
        "single",
        "--plan",
        "example-python",
        "--testcase",
        "ok",
        "--builder",
        "exec:generic",
        "--runner",
        "local:exec",
        "-i",
        "1",
        "--wait",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let id = queued_id(&out);
    // The sources were uploaded for this task; with keep_sources = 0s the next sweep (every
    // second) removes them once the task has ended.
    let sources = home.path().join("data/work/requests").join(&id);
    let deadline = Instant::now() + Duration::from_secs(20);
    while sources.exists() {
        assert!(
            Instant::now() < deadline,
            "{} still there after 20 s",
            sources.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = daemon.stop();
    assert!(
        log.lines().any(
            |l| l.contains("removed the uploaded sources of finished tasks") && l.contains(&id)
        ),
        "{log}"
    );
}

// ---- presentation: terminal and non-terminal output -------------------------------------------

/// `run single` of example-python's `ok` case with two instances (exec:generic: no compiler).
fn python_ok_args() -> Vec<&'static str> {
    vec![
        "run",
        "single",
        "-p",
        "example-python",
        "-t",
        "ok",
        "-b",
        "exec:generic",
        "-r",
        "local:exec",
        "-i",
        "2",
        "--wait",
    ]
}

/// A line of output with what changes from run to run masked: the time stamp, the home, the
/// run id, elapsed times and content hashes.
fn masked(line: &str, home: &str, id: &str) -> String {
    let mut l = line.to_string();
    // `Jan  6 08:15:50.651158\t`: the original's time.StampMicro.
    if l.len() > 22 && l.as_bytes()[22] == b'\t' && l.as_bytes()[15] == b'.' {
        l = format!("TS{}", &l[22..]);
    }
    l = l.replace(home, "HOME").replace(id, "ID");
    // The run's temporary directory, `tg-<id>-<random>`.
    if let Some(i) = l.find("tg-ID-") {
        l = format!("{}tg-ID-RANDOM", &l[..i]);
    }
    let mut out = String::new();
    // Digits and hex runs of 6 or more characters become `#`.
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let digits = |w: &str| !w.is_empty() && w.chars().all(|c| c.is_ascii_digit());
        let hex = word.len() >= 6 && word.chars().all(|c| c.is_ascii_hexdigit());
        if digits(word) || hex {
            out.push('#');
        } else if word.strip_suffix('s').is_some_and(digits) {
            out.push_str("#s");
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in l.chars() {
        if c.is_ascii_alphanumeric() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

#[test]
fn output_off_a_terminal_is_todays_lines_byte_for_byte() {
    let home = Home::new();
    home.import("example-python");
    let out = home.tg(&python_ok_args());
    assert!(out.status.success(), "{}", text(&out));
    let raw = String::from_utf8(out.stdout.clone()).unwrap();
    // No colors, no bars, no summary table off a terminal, whatever NO_COLOR says.
    assert!(!raw.contains('\x1b'), "{raw}");
    assert!(!raw.contains("RUN  "), "{raw}");
    let id = queued_id(&out);
    let h = home.path().to_str().unwrap();
    let mut got: Vec<String> = raw.lines().map(|l| masked(l, h, &id)).collect();
    let hd = "TS\tINFO\t";
    let fields = "{\"run_id\": \"ID\", \"plan\": \"example-python\", \"case\": \"ok\", \"runner\": \"local:exec\", \"instances\": #}";
    let mut want: Vec<String> = vec![
        format!("{hd}using home directory: HOME"),
        format!("{hd}no .env.toml found at HOME/.env.toml; running with defaults"),
        format!(
            "{hd}created a synthetic composition file for this job; all instances will run under singleton group \"single\""
        ),
        format!("{hd}testground client initialized\t{{\"addr\": \"embedded\"}}"),
        format!("{hd}test plan source at: HOME/plans/example-python"),
        String::new(),
        ">>> Result:".into(),
        format!("{hd}run is queued with ID: ID"),
        String::new(),
        ">>> Server output:".into(),
        format!(
            "{hd}performing build for groups\t{{\"plan\": \"example-python\", \"groups\": [\"single\"], \"builder\": \"exec:generic\"}}"
        ),
        format!(
            "{hd}build succeeded\t{{\"plan\": \"example-python\", \"groups\": [\"single\"], \"builder\": \"exec:generic\", \"artifact\": \"HOME/data/work/exec-generic--example-python-#\", \"cached\": false, \"took\": \"#.#s\"}}"
        ),
        format!("{hd}starting run\t{fields}"),
        format!("{hd}starting # instances of example-python:ok (run ID)"),
        format!("{hd}started #/# instances"),
        format!("{hd}started #/# instances"),
        format!("{hd}   #.#s    MESSAGE << single[#] >> example-python ok"),
        format!("{hd}   #.#s         OK << single[#] >> "),
        format!("{hd}   #.#s    MESSAGE << single[#] >> example-python ok"),
        format!("{hd}   #.#s         OK << single[#] >> "),
        // The run's temp dir is removed after the outcome, off the run log.
        format!("{hd}run finished with outcome = success (single:#/#)\t{fields}"),
        String::new(),
        ">>> Result:".into(),
        format!("{hd}finished run with ID: ID"),
        format!("{hd}result default[ID]: success"),
    ];
    // The order of the lines is today's, except between the two instances' lines.
    let order = |v: &[String]| -> Vec<String> {
        v.iter()
            .filter(|l| !l.contains(" << single["))
            .cloned()
            .collect()
    };
    assert_eq!(order(&got), order(&want), "{raw}");
    got.sort();
    want.sort();
    assert_eq!(got, want, "{raw}");
}

#[test]
fn a_run_on_a_terminal_shows_progress_bars_colors_and_a_summary() {
    let home = Home::new();
    home.import("example-python");
    let mut cmd = home.cmd();
    cmd.args(python_ok_args()).env_remove("NO_COLOR");
    let (code, s) = run_in_pty(cmd, Duration::from_secs(120));
    assert_eq!(code, Some(0), "{s}");
    // The bar of started instances replaces the `started N/M instances` lines.
    assert!(s.contains("] 2/2 instances"), "{s}");
    assert!(!s.contains("\tstarted 2/2 instances"), "{s}");
    // The build's spinner says how it ended.
    assert!(s.contains("build succeeded"), "{s}");
    // Instance lines keep their text; their class and the levels are colored.
    assert!(s.contains("\x1b[32mOK\x1b[0m << single[000] >> "), "{s}");
    assert!(
        s.contains("\x1b[36mMESSAGE\x1b[0m << single[001] >> example-python ok"),
        "{s}"
    );
    assert!(s.contains("\t\x1b[34mINFO\x1b[0m\t"), "{s}");
    // The original's result line, then the summary per group.
    let result = s.find("result default[").expect("result line");
    let table = s
        .find("RUN      GROUP   OK  TOTAL  OUTCOME  TOOK")
        .expect("summary");
    assert!(result < table, "{s}");
    assert!(
        s[table..].contains("default  single  2   2      success"),
        "{s}"
    );
}

#[test]
fn no_color_and_the_no_color_flag_turn_colors_off_on_a_terminal() {
    let home = Home::new();
    home.import("example-python");
    let mut cmd = home.cmd();
    cmd.args(python_ok_args()).env("NO_COLOR", "1");
    let (code, s) = run_in_pty(cmd, Duration::from_secs(120));
    assert_eq!(code, Some(0), "{s}");
    assert_eq!(color_escapes(&s), Vec::<String>::new(), "{s}");
    // Still a terminal: the bars stay.
    assert!(s.contains("] 2/2 instances"), "{s}");
    assert!(s.contains("   OK << single[000] >> "), "{s}");

    let mut cmd = home.cmd();
    cmd.arg("--no-color")
        .args(python_ok_args())
        .env_remove("NO_COLOR");
    let (code, s) = run_in_pty(cmd, Duration::from_secs(120));
    assert_eq!(code, Some(0), "{s}");
    assert_eq!(color_escapes(&s), Vec::<String>::new(), "{s}");
    assert!(s.contains("] 2/2 instances"), "{s}");

    // An empty NO_COLOR does not count (no-color.org).
    let mut cmd = home.cmd();
    cmd.args(python_ok_args()).env("NO_COLOR", "");
    let (_, s) = run_in_pty(cmd, Duration::from_secs(120));
    assert!(!color_escapes(&s).is_empty(), "{s}");
}

#[test]
fn a_daemon_on_the_homes_listen_address_is_found_and_used() {
    let home = Home::new();
    home.import("example-python");
    let port = free_port();
    std::fs::write(
        home.path().join(".env.toml"),
        format!("[daemon]\nlisten = \"127.0.0.1:{port}\"\n[sync]\nport = 0\n"),
    )
    .unwrap();
    let daemon = Daemon::start(&home, port);
    let endpoint = format!("http://127.0.0.1:{port}");

    // On a terminal, through the daemon: the same bars and colors as embedded.
    let mut cmd = home.cmd();
    cmd.args(python_ok_args())
        .env_remove("TESTGROUND_EMBEDDED")
        .env_remove("NO_COLOR");
    let (code, s) = run_in_pty(cmd, Duration::from_secs(120));
    assert_eq!(code, Some(0), "{s}");
    assert!(s.contains(&format!("found a daemon at {endpoint}")), "{s}");
    assert!(s.contains(&format!("{{\"addr\": \"{endpoint}\"}}")), "{s}");
    assert!(s.contains("] 2/2 instances"), "{s}");
    assert!(s.contains("\x1b[32mOK\x1b[0m << single[000] >> "), "{s}");

    // The daemon has the task; `--endpoint ''` runs in this process and does not see it.
    let out = home
        .cmd()
        .arg("tasks")
        .env_remove("TESTGROUND_EMBEDDED")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("example-python"), "{listing}");
    assert!(listing.contains("success (single:2/2)"), "{listing}");
    let out = home
        .cmd()
        .args(["--endpoint", "", "tasks"])
        .env_remove("TESTGROUND_EMBEDDED")
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("{\"addr\": \"embedded\"}"), "{s}");
    assert!(!s.contains("found a daemon"), "{s}");
    daemon.stop();

    // Nobody on the address: embedded, without a word about a daemon.
    let out = home
        .cmd()
        .arg("tasks")
        .env_remove("TESTGROUND_EMBEDDED")
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("{\"addr\": \"embedded\"}"), "{s}");
    assert!(!s.contains("found a daemon"), "{s}");
}

#[test]
fn the_result_file_is_the_originals_csv() {
    let home = Home::new();
    home.import("example-python");
    let comp = home.path().join("c.toml");
    std::fs::write(
        &comp,
        r#"
[metadata]
name = "csv"

[global]
plan = "example-python"
case = "fail"
builder = "exec:generic"
runner = "local:exec"
total_instances = 1

[[groups]]
id = "g"
instances = { count = 1 }
"#,
    )
    .unwrap();
    let csv = home.path().join("results.csv");
    let out = home.tg(&[
        "run",
        "composition",
        "-f",
        comp.to_str().unwrap(),
        "--wait",
        "--result-file",
        csv.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let id = queued_id(&out);
    assert_eq!(
        std::fs::read_to_string(&csv).unwrap(),
        format!("run_id,task_id,outcome,error\ndefault,{id},failure,\n")
    );
    // The original has no --result-file on run single.
    let out = home.run(&[
        "run",
        "single",
        "-p",
        "example-python",
        "-t",
        "ok",
        "-b",
        "exec:generic",
        "-r",
        "local:exec",
        "-i",
        "1",
        "--result-file",
        "x.csv",
    ]);
    assert_eq!(out.code, Some(2), "{out}");
}

/// A plan in `sh` whose instances write `n` numbered lines to stdout and to stderr,
/// interleaved, then a success event.
const SH_MANIFEST: &str = r#"name = "sh-streams"

[defaults]
builder = "exec:generic"
runner = "local:exec"

[builders."exec:generic"]
enabled = true
exec = "sh main.sh"

[runners."local:exec"]
enabled = true

[[testcases]]
name = "streams"
instances = { min = 1, max = 10000, default = 1 }
"#;

const SH_MAIN: &str = r#"i=0
while [ $i -lt 300 ]; do
  echo "out $i"
  echo "err $i" >&2
  i=$((i+1))
done
echo '{"ts":1,"event":{"success_event":{"group":"single"}}}'
"#;

/// A home with the `sh-streams` plan imported, its `main.sh` being `main`.
fn sh_plan(main: &str) -> Home {
    let home = Home::new();
    let src = home.plan_src("sh-streams", SH_MANIFEST);
    std::fs::write(src.join("main.sh"), main).unwrap();
    let out = home.tg(&["plan", "import", "--from", src.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    home
}

/// Runs `instances` of `sh-streams` under local:exec, through helpers of `share` instances
/// each when given, with the engine's default instance scheduling.
fn run_sh(home: &Home, instances: u32, share: Option<u32>) -> std::process::Output {
    run_sh_with(home, instances, share, &[])
}

/// [`run_sh`] with more arguments (`--run-cfg ...`).
fn run_sh_with(
    home: &Home,
    instances: u32,
    share: Option<u32>,
    args: &[&str],
) -> std::process::Output {
    let mut cmd = home.cmd();
    if let Some(n) = share {
        cmd.env("TESTGROUND_EXEC_HELPER_SHARE", n.to_string());
    }
    cmd.env_remove("TESTGROUND_INSTANCE_SCHED")
        .args([
            "run",
            "single",
            "--plan",
            "sh-streams",
            "--testcase",
            "streams",
            "--builder",
            "exec:generic",
            "--runner",
            "local:exec",
            "--instances",
            &instances.to_string(),
            "--wait",
        ])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn instances_through_helpers_keep_stdout_and_stderr_apart_and_complete() {
    let home = sh_plan(SH_MAIN);
    // Two instances per helper: five instances take three helpers.
    let out = run_sh(&home, 5, Some(2));
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    assert!(s.contains("through 3 helper processes"), "{s}");
    assert!(s.contains("outcome = success (single:5/5)"), "{s}");
    let id = queued_id(&out);
    assert_no_process_left(&id);
    for i in 0..5 {
        let dir = home.path().join(format!(
            "data/outputs/local_exec/sh-streams/{id}/single/{i}"
        ));
        let run_out = std::fs::read_to_string(dir.join("run.out")).unwrap();
        let run_err = std::fs::read_to_string(dir.join("run.err")).unwrap();
        let want_out: Vec<String> = (0..300).map(|n| format!("out {n}")).collect();
        let want_err: Vec<String> = (0..300).map(|n| format!("err {n}")).collect();
        let got_out: Vec<&str> = run_out.lines().filter(|l| !l.starts_with('{')).collect();
        assert_eq!(got_out, want_out, "instance {i}: stdout");
        assert!(run_out.contains("success_event"), "{run_out}");
        assert_eq!(
            run_err.lines().collect::<Vec<_>>(),
            want_err,
            "instance {i}: stderr"
        );
    }
}

/// Prints the cpu line of its own `/proc/<pid>/cgroup` and of its parent's (the engine, or the
/// helper that started it).
const CPU_GROUP_MAIN: &str = r#"cpu() { grep -E '^[0-9]+:([^:]*,)?cpu(,[^:]*)?:' /proc/$1/cgroup | cut -d: -f3; }
echo "self $(cpu $$)"
echo "parent $(cpu $PPID)"
echo '{"ts":1,"event":{"success_event":{"group":"single"}}}'
"#;

/// A run's instances share one CPU group, started directly or through helpers (which stay
/// out of it, with the engine), and the group goes with the run.
#[test]
fn instances_share_the_run_s_cpu_group_and_helpers_stay_out() {
    let required = std::env::var("TG_REQUIRE_PRIVILEGED").as_deref() == Ok("1");
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("not root")
    } else if tg_sys::cgroup::cpu_runs_root().is_none() {
        Some("no cgroup v1 hierarchy with the cpu controller")
    } else {
        None
    };
    if let Some(r) = reason {
        assert!(!required, "TG_REQUIRE_PRIVILEGED=1 but {r}");
        eprintln!("skipping privileged test: {r}");
        return;
    }
    let home = sh_plan(CPU_GROUP_MAIN);
    for share in [None, Some(1)] {
        let out = run_sh(&home, 2, share);
        let s = text(&out);
        assert!(out.status.success(), "{s}");
        assert!(s.contains("outcome = success (single:2/2)"), "{s}");
        assert!(!s.contains("not in a CPU group"), "{s}");
        let id = queued_id(&out);
        let group = format!("/testground/{id}");
        for i in 0..2 {
            let run_out = std::fs::read_to_string(home.path().join(format!(
                "data/outputs/local_exec/sh-streams/{id}/single/{i}/run.out"
            )))
            .unwrap();
            let line = |what: &str| {
                run_out
                    .lines()
                    .find_map(|l| l.strip_prefix(what))
                    .unwrap_or_else(|| panic!("no {what:?} line: {run_out}"))
                    .to_string()
            };
            assert!(line("self ").ends_with(&group), "{share:?}: {run_out}");
            // The engine or the helper: outside the group.
            assert!(
                !line("parent ").contains("/testground/"),
                "{share:?}: {run_out}"
            );
        }
        let dir = tg_sys::cgroup::cpu_runs_root().unwrap().join(&id);
        assert!(!dir.exists(), "{} is left", dir.display());
        assert_no_process_left(&id);
    }
}

const ENV_MAIN: &str = r#"echo "foo=$FOO gmp=${GOMAXPROCS-unset} slack=$(cat /proc/self/timerslack_ns)"
echo '{"ts":1,"event":{"success_event":{"group":"single"}}}'
"#;

/// `instance_env` and `timer_slack` reach every instance, started directly or through helpers;
/// a run that is not crowded gets no `GOMAXPROCS` of the engine's; a variable of the runner's
/// is refused, naming it.
#[test]
fn instance_env_and_timer_slack_reach_every_instance() {
    let home = sh_plan(ENV_MAIN);
    let line_of = |id: &str, i: u32| {
        let run_out = std::fs::read_to_string(home.path().join(format!(
            "data/outputs/local_exec/sh-streams/{id}/single/{i}/run.out"
        )))
        .unwrap();
        run_out
            .lines()
            .find(|l| l.starts_with("foo="))
            .unwrap_or_else(|| panic!("no foo= line: {run_out}"))
            .to_string()
    };
    let out = run_sh(&home, 1, None);
    assert!(out.status.success(), "{}", text(&out));
    let line = line_of(&queued_id(&out), 0);
    assert!(line.starts_with("foo= gmp=unset slack="), "{line}");
    for share in [None, Some(1)] {
        let out = run_sh_with(
            &home,
            2,
            share,
            &[
                "--run-cfg",
                "instance_env=FOO=bar baz,GOMAXPROCS=3",
                "--run-cfg",
                "timer_slack=2ms",
            ],
        );
        let s = text(&out);
        assert!(s.contains("outcome = success (single:2/2)"), "{s}");
        let id = queued_id(&out);
        for i in 0..2 {
            assert_eq!(
                line_of(&id, i),
                "foo=bar baz gmp=3 slack=2000000",
                "{share:?}"
            );
        }
    }
    let out = run_sh_with(&home, 1, None, &["--run-cfg", "instance_env=TEST_RUN=x"]);
    let s = text(&out);
    assert!(!out.status.success(), "{s}");
    assert!(s.contains("TEST_RUN is set by the runner"), "{s}");
}

#[test]
fn a_run_beyond_the_open_file_limit_fails_at_once_naming_it() {
    let home = sh_plan(SH_MAIN);
    // 300 open files, hard: 60 instances need more even through helpers.
    let mut cmd = std::process::Command::new("prlimit");
    cmd.arg("--nofile=300:300")
        .arg("--")
        .arg(home.cmd().get_program())
        .args([
            "run",
            "single",
            "--plan",
            "sh-streams",
            "--testcase",
            "streams",
            "--builder",
            "exec:generic",
            "--runner",
            "local:exec",
            "--instances",
            "60",
            "--wait",
        ])
        .envs(home.cmd().get_envs().filter_map(|(k, v)| v.map(|v| (k, v))))
        .env_remove("LOG_LEVEL")
        .env_remove("RUST_LOG")
        .current_dir(home.path())
        .stdin(Stdio::null());
    let out = cmd.output().unwrap();
    let s = text(&out);
    assert!(!out.status.success(), "{s}");
    assert!(s.contains("60 instances need about"), "{s}");
    assert!(s.contains("limit is 300"), "{s}");
    assert!(s.contains("ulimit -Hn"), "{s}");
    assert!(!s.contains("started 1/60"), "no instance starts: {s}");
}

#[test]
fn healthcheck_warns_when_host_limits_are_too_low_for_the_count() {
    let home = Home::new();
    let out = home.tg(&[
        "healthcheck",
        "--runner",
        "local:exec",
        "--instances",
        "100000000",
    ]);
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    assert!(s.contains("- open-files: failed;"), "{s}");
    assert!(s.contains("ulimit -Hn"), "{s}");
    assert!(
        s.contains("- pid-max: failed;") && s.contains("sysctl -w kernel.pid_max"),
        "{s}"
    );
    let out = home.tg(&["healthcheck", "--runner", "local:exec", "--instances", "2"]);
    let s = text(&out);
    assert!(s.contains("- open-files: ok;"), "{s}");
    // A virtual machine's host is only told about for a small run, never warned about.
    assert!(
        !s.contains("- cpu-steal: failed;") && !s.contains("- vm-memory: failed;"),
        "{s}"
    );
}
