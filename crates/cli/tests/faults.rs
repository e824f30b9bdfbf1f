//! Faults: an engine killed with SIGKILL (during start and mid-run), under `local:exec` and
//! `local:netns`, leaves nothing of its run once the engine starts again: no process (not even
//! a `setsid` grandchild or a child that moved to its own network namespace), no temp dir, and
//! its task is shown canceled. Unrelated processes survive the cleanup.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, Home, free_port, processes_of_run, text};

/// Whether privileged tests may run here; prints why not.
fn privileged(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    let tun = Path::new("/dev/net/tun").exists();
    if root && tun {
        return true;
    }
    let why = if root {
        "/dev/net/tun is missing"
    } else {
        "not root"
    };
    if std::env::var("TG_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test}: {why}, and TG_REQUIRE_PRIVILEGED=1");
    }
    eprintln!("skipping {test}: {why}");
    false
}

/// A plan whose instances leave processes behind the way real systems do: a grandchild in its
/// own session that forks again, and (under local:netns) a child in a network namespace of its
/// own. Each instance then waits.
fn import_stubborn_plan(home: &Home) {
    let plan = home.path().join("stubborn");
    std::fs::create_dir_all(&plan).unwrap();
    std::fs::write(
        plan.join("run.sh"),
        r#"#!/bin/sh
setsid sh -c 'sleep 600 & sleep 600' &
if [ "$TEST_SIDECAR" = "true" ]; then unshare -n sleep 600 & fi
echo '{"ts":1,"event":{"message_event":{"message":"ready"}}}'
sleep 600
"#,
    )
    .unwrap();
    std::fs::write(
        plan.join("manifest.toml"),
        "name = \"stubborn\"\n[builders.\"exec:generic\"]\nexec = \"sh run.sh\"\n\
         [runners.\"local:exec\"]\n[runners.\"local:netns\"]\n\
         [[testcases]]\nname = \"stay\"\ninstances = { min = 1, max = 500 }\n",
    )
    .unwrap();
    let out = home.tg(&["plan", "import", "--from", plan.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
}

fn start_run(home: &Home, runner: &str, instances: u32) -> Child {
    home.cmd()
        .args([
            "run",
            "single",
            "--plan",
            "stubborn",
            "--testcase",
            "stay",
            "--builder",
            "exec:generic",
            "--runner",
            runner,
            "-i",
            &instances.to_string(),
            "--wait",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The id of the one task in `processing`, once at least `min_processes` of its processes
/// run.
fn wait_for_processes(home: &Home, child: &mut Child, min_processes: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = home.tg(&["tasks"]);
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        if let Some(line) = s.lines().find(|l| l.contains("processing")) {
            let id = line.split_whitespace().next().unwrap().to_string();
            if processes_of_run(&id).len() >= min_processes {
                return id;
            }
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("the run did not start: {s}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn temp_dirs_of(run_id: &str) -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(&format!("tg-{run_id}-")))
        .collect()
}

/// Kills the engine (the embedded CLI) with SIGKILL, starts an engine again, and checks that
/// nothing of the run is left while an unrelated process in its own network namespace lives.
fn kill_and_check(home: &Home, mut child: Child, run_id: &str) {
    let bystander = Command::new("unshare")
        .args(["-n", "sleep", "600"])
        .stdin(Stdio::null())
        .spawn();
    child.kill().unwrap();
    child.wait().unwrap();
    // What a killed engine leaves until the next start.
    assert!(
        !processes_of_run(run_id).is_empty(),
        "the test expects a killed engine to leave its instances to the next start"
    );
    // The next start of an engine on this home.
    let out = home.tg(&["tasks"]);
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_of_run(run_id).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = processes_of_run(run_id);
    assert!(left.is_empty(), "processes of run {run_id} left: {left:?}");
    assert!(
        temp_dirs_of(run_id).is_empty(),
        "{:?}",
        temp_dirs_of(run_id)
    );
    let out = home.tg(&["status", "-t", run_id]);
    let status = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(status.contains("canceled"), "{}", text(&out));
    if let Ok(mut b) = bystander {
        assert!(
            b.try_wait().unwrap().is_none(),
            "an unrelated process with its own network namespace was killed"
        );
        let _ = b.kill();
        let _ = b.wait();
    }
}

#[test]
fn sigkill_of_the_engine_mid_run_under_local_exec_leaves_nothing() {
    let home = Home::new();
    import_stubborn_plan(&home);
    let mut child = start_run(&home, "local:exec", 3);
    // Each instance: its shell, its sleep and the setsid pair.
    let id = wait_for_processes(&home, &mut child, 3 * 4);
    kill_and_check(&home, child, &id);
}

#[test]
fn sigkill_of_the_engine_during_start_under_local_exec_leaves_nothing() {
    let home = Home::new();
    import_stubborn_plan(&home);
    let mut child = start_run(&home, "local:exec", 300);
    // Killed as soon as one instance has started its escapees (a shell, its sleep and the
    // setsid pair), while the others are still starting: without them, the instances die with
    // the engine at once (pdeathsig) and there would be nothing left to clean.
    let id = wait_for_processes(&home, &mut child, 4);
    kill_and_check(&home, child, &id);
}

#[test]
fn sigkill_of_the_engine_mid_run_under_local_netns_leaves_nothing() {
    if !privileged("sigkill_of_the_engine_mid_run_under_local_netns_leaves_nothing") {
        return;
    }
    let home = Home::new();
    import_stubborn_plan(&home);
    let mut child = start_run(&home, "local:netns", 2);
    let id = wait_for_processes(&home, &mut child, 2 * 5);
    kill_and_check(&home, child, &id);
}

#[test]
fn sigkill_of_the_engine_during_start_under_local_netns_leaves_nothing() {
    if !privileged("sigkill_of_the_engine_during_start_under_local_netns_leaves_nothing") {
        return;
    }
    let home = Home::new();
    import_stubborn_plan(&home);
    let mut child = start_run(&home, "local:netns", 40);
    // As above, plus the instance's child in its own network namespace.
    let id = wait_for_processes(&home, &mut child, 5);
    kill_and_check(&home, child, &id);
}

#[test]
fn bad_run_config_fails_before_any_build_naming_the_key() {
    let home = Home::new();
    import_stubborn_plan(&home);
    for (cfg, key) in [
        ("captrue=true", "captrue"),
        ("run_timeout=soon", "run_timeout"),
        ("seed=-4", "seed"),
    ] {
        let out = home.tg(&[
            "run",
            "single",
            "--plan",
            "stubborn",
            "--testcase",
            "stay",
            "--builder",
            "exec:generic",
            "--runner",
            "local:netns",
            "-i",
            "1",
            "--run-cfg",
            cfg,
            "--wait",
        ]);
        let all = text(&out);
        assert!(!out.status.success(), "{all}");
        assert!(all.contains(key), "{cfg}: {all}");
        assert!(
            !all.contains("performing build"),
            "{cfg}: built anyway: {all}"
        );
    }
}

/// In a home shared with a daemon: an embedded CLI killed mid-run leaves a task `processing`
/// that the daemon did not run. The daemon notices its owner is gone (pid and start time):
/// `logs -f` ends instead of hanging, and the task is shown canceled.
#[test]
fn a_killed_embedded_task_is_shown_canceled_by_a_daemon_sharing_the_home() {
    let home = Home::new();
    import_stubborn_plan(&home);
    let port = free_port();
    std::fs::write(
        home.path().join(".env.toml"),
        format!("[daemon]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let daemon = Daemon::start(&home, port);
    // Embedded: no endpoint configured for the client.
    let mut child = start_run(&home, "local:exec", 2);
    let id = wait_for_processes(&home, &mut child, 2);
    child.kill().unwrap();
    child.wait().unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    // It ends: the daemon sees the task's owner is gone.
    home.cmd()
        .args(["--endpoint", &endpoint, "logs", "-t", &id, "-f"])
        .output()
        .unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "logs -f waited {:?}",
        t0.elapsed()
    );
    let out = home
        .cmd()
        .args(["--endpoint", &endpoint, "status", "-t", &id])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(status.contains("canceled"), "{}", text(&out));
    // The daemon's next run (here: the status request does not run anything, so ask
    // terminate, which cleans what dead engines left) removes the instances.
    let out = home
        .cmd()
        .args([
            "--endpoint",
            &endpoint,
            "terminate",
            "--runner",
            "local:exec",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let left = processes_of_run(&id);
    assert!(left.is_empty(), "processes of run {id} left: {left:?}");
    drop(daemon);
}

/// The original's regression test for its issue 1349: under a runner with a sidecar, an
/// instance that prints success but never publishes it on the sync service does not pass.
#[test]
fn printed_success_without_a_published_one_fails_under_local_netns() {
    if !privileged("printed_success_without_a_published_one_fails_under_local_netns") {
        return;
    }
    let home = Home::new();
    let plan = home.path().join("liar");
    std::fs::create_dir_all(&plan).unwrap();
    std::fs::write(
        plan.join("say.sh"),
        "echo '{\"ts\":1,\"event\":{\"success_event\":{\"group\":\"single\"}}}'\n",
    )
    .unwrap();
    std::fs::write(
        plan.join("manifest.toml"),
        "name = \"liar\"\n[builders.\"exec:generic\"]\nexec = \"sh say.sh\"\n\
         [runners.\"local:exec\"]\n[runners.\"local:netns\"]\n\
         [[testcases]]\nname = \"say-ok\"\ninstances = { min = 1, max = 5 }\n",
    )
    .unwrap();
    let out = home.tg(&["plan", "import", "--from", plan.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let run = |runner: &str| {
        home.tg(&[
            "run",
            "single",
            "--plan",
            "liar",
            "--testcase",
            "say-ok",
            "--builder",
            "exec:generic",
            "--runner",
            runner,
            "-i",
            "1",
            "--wait",
        ])
    };
    // local:exec keeps stdout as the evidence.
    let out = run("local:exec");
    assert!(out.status.success(), "{}", text(&out));
    let out = run("local:netns");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        stdout.contains("outcome = failure (single:0/1)"),
        "{}",
        text(&out)
    );
    assert!(stdout.contains("run_events"), "{}", text(&out));
}
