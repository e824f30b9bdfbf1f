//! End-to-end tests of the `local:netns` runner through the real `testground` binary: the
//! seed's ping-pong plan (Go, sdk-go), a plan on the published sdk-rust crate, our SDK's
//! examples, packet capture and seeds, and cleanup after success, failure, timeout, Ctrl-C,
//! `terminate` and a killed engine, checked by listing namespaces, links, mounts and processes.
//!
//! Needs root: skips with a reason otherwise, fails instead when `TG_REQUIRE_PRIVILEGED=1`.
//! The tests take a lock so that the host-wide listings of one are not disturbed by another.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Home, processes_of_run, text};

static SERIAL: Mutex<()> = Mutex::new(());

fn privileged() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        if std::env::var("TG_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
            panic!("TG_REQUIRE_PRIVILEGED=1 but the local:netns tests are not running as root");
        }
        eprintln!("skipping: local:netns needs root");
    }
    root
}

/// What the local:netns tests add to [`Home`].
trait NetnsHome {
    fn script_plan(&self, name: &str, command: &str);
    fn run_args<'a>(
        &self,
        plan: &'a str,
        case: &'a str,
        builder: &'a str,
        n: &'a str,
    ) -> Vec<&'a str>;
}

impl NetnsHome for Home {
    /// A plan whose instances run `command` (exec:generic) under either runner.
    fn script_plan(&self, name: &str, command: &str) {
        // `plan import` names the plan after its directory.
        let plan = self.path().join("src").join(name);
        std::fs::create_dir_all(&plan).unwrap();
        std::fs::write(
            plan.join("manifest.toml"),
            format!(
                "name = \"{name}\"\n[builders.\"exec:generic\"]\nexec = {command:?}\n\
                 [runners.\"local:netns\"]\n[[testcases]]\nname = \"run\"\n\
                 instances = {{ min = 1, max = 50 }}\n"
            ),
        )
        .unwrap();
        let out = self.tg(&["plan", "import", "--from", plan.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
    }

    fn run_args<'a>(
        &self,
        plan: &'a str,
        case: &'a str,
        builder: &'a str,
        n: &'a str,
    ) -> Vec<&'a str> {
        vec![
            "run",
            "single",
            "--plan",
            plan,
            "--testcase",
            case,
            "--builder",
            builder,
            "--runner",
            "local:netns",
            "-i",
            n,
            "--wait",
        ]
    }
}

fn run_id_of(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("run is queued with ID: "))
        .unwrap_or_else(|| panic!("no queued line in:\n{}", text(o)));
    line.split_whitespace().nth(9).unwrap().to_string()
}

/// What a run may leave on the host: its processes, network namespaces, host interfaces and
/// mounts.
#[derive(Debug, PartialEq, Eq)]
struct HostState {
    netns: BTreeSet<String>,
    links: BTreeSet<String>,
    mounts: usize,
}

fn host_state() -> HostState {
    let mut netns = BTreeSet::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if e.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        if let Ok(l) = std::fs::read_link(e.path().join("ns/net")) {
            netns.insert(l.to_string_lossy().into_owned());
        }
    }
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap().to_string())
        })
        .collect();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    HostState {
        netns,
        links,
        mounts,
    }
}

/// Nothing of run `run_id` is left: processes, namespaces, host links, mounts. The kernel
/// tears a namespace's interfaces down asynchronously, so this waits a little for them.
fn assert_nothing_left(run_id: &str, before: &HostState) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let procs = processes_of_run(run_id);
        let now = host_state();
        if procs.is_empty() && now == *before {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "run {run_id} left processes {procs:?}; host state before {before:?}, after {now:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every "ping RTT was <d> [..]" the ping-pong instances printed, as durations.
fn ping_rtts(stdout: &str) -> Vec<Duration> {
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

#[test]
fn seed_ping_pong_passes_with_its_rtt_in_range_and_leaves_nothing() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = Home::new();
    home.import("network");
    let before = host_state();
    let mut args = home.run_args("network", "ping-pong", "exec:go", "2");
    args.extend(["--run-cfg", "seed=42", "--run-cfg", "capture=true"]);
    let out = home.tg(&args);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("outcome = success (single:2/2)"),
        "{}",
        text(&out)
    );
    assert!(
        stdout.contains("seed 42 (repeat with --run-cfg seed=42)"),
        "{stdout}"
    );
    let rtts = ping_rtts(&stdout);
    assert_eq!(rtts.len(), 2, "{stdout}");
    for rtt in rtts {
        assert!(
            rtt >= Duration::from_millis(200) && rtt <= Duration::from_millis(250),
            "rtt {rtt:?}"
        );
    }
    let id = run_id_of(&out);
    // Each instance's data traffic, as pcap (24-byte header, then records).
    for i in 0..2 {
        let pcap = home.path().join(format!(
            "data/outputs/local_netns/network/{id}/single/{i}/data.pcap"
        ));
        let bytes = std::fs::read(&pcap).unwrap_or_else(|e| panic!("{}: {e}", pcap.display()));
        assert_eq!(&bytes[..4], &[0xd4, 0xc3, 0xb2, 0xa1], "pcap magic");
        assert!(
            bytes.len() > 24 + 16 * 6,
            "packets captured: {} bytes",
            bytes.len()
        );
    }
    assert_nothing_left(&id, &before);
}

#[test]
fn sdk_rust_plan_connects_two_instances_over_tcp() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = Home::new();
    home.import("rust-sdk-tcp");
    let before = host_state();
    let out = home.tg(&home.run_args("rust-sdk-tcp", "tcp-connect", "exec:rust", "2"));
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("outcome = success (single:2/2)"),
        "{stdout}"
    );
    assert!(stdout.contains("got pong from"), "{stdout}");
    assert_nothing_left(&run_id_of(&out), &before);
}

#[test]
fn sdk_examples_show_latency_partitions_and_per_link_shaping() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = Home::new();
    home.import("netns-examples");
    for (case, n, expect) in [
        ("latency", "2", "rtt min="),
        ("partition", "3", "drop: connect to"),
        ("per-link", "3", "rtt to instance 3"),
    ] {
        let mut args = home.run_args("netns-examples", case, "exec:rust", n);
        args.extend(["--build-cfg", "profile=dev"]);
        let out = home.tg(&args);
        assert!(out.status.success(), "{case}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("(single:{n}/{n})")),
            "{case}: {stdout}"
        );
        assert!(stdout.contains(expect), "{case}: {stdout}");
    }
}

#[test]
fn failure_and_timeout_leave_nothing() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = Home::new();
    home.script_plan("failing", "sh -c 'exit 3'");
    home.script_plan("sleeper", "sleep 600");
    let out = home.tg(&["healthcheck", "--runner", "local:netns"]);
    let report = String::from_utf8_lossy(&out.stdout);
    for check in ["- root: ok", "- tun-device: ok", "- nft: ok"] {
        assert!(report.contains(check), "{check}: {}", text(&out));
    }
    let before = host_state();
    let out = home.tg(&home.run_args("failing", "run", "exec:generic", "3"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("outcome = failure"),
        "{}",
        text(&out)
    );
    assert_nothing_left(&run_id_of(&out), &before);

    let mut args = home.run_args("sleeper", "run", "exec:generic", "3");
    args.extend(["--run-cfg", "run_timeout=2s"]);
    let t0 = Instant::now();
    let out = home.tg(&args);
    assert!(t0.elapsed() < Duration::from_secs(60));
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("task timeout"), "{}", text(&out));
    assert_nothing_left(&run_id_of(&out), &before);
}

/// Starts a 3-instance sleeper run in the background and waits until its instances run.
// The child is returned to the caller, which waits for it; the lint only looks at this function.
#[allow(clippy::zombie_processes)]
fn start_sleepers(home: &Home) -> (Child, String) {
    let mut child = home
        .cmd()
        .args(home.run_args("sleeper", "run", "exec:generic", "3"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = home.tg(&["tasks"]);
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        if let Some(line) = s.lines().find(|l| l.contains("processing")) {
            let id = line.split_whitespace().next().unwrap().to_string();
            if processes_of_run(&id).len() >= 3 {
                return (child, id);
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("run did not start: {s}\n--- the run:\n{}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ctrl_c_terminate_and_a_killed_engine_leave_nothing() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = Home::new();
    home.script_plan("sleeper", "sleep 600");
    let before = host_state();

    // Ctrl-C on the embedded run.
    let (child, id) = start_sleepers(&home);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert_nothing_left(&id, &before);

    // `testground terminate` from another process.
    let (child, id) = start_sleepers(&home);
    let out = home.tg(&["terminate", "--runner", "local:netns"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_nothing_left(&id, &before);

    // SIGKILL of the engine: the kernel frees what only its descriptors held, the instances
    // die with it, and the record it left is cleared by the next run.
    let (mut child, id) = start_sleepers(&home);
    child.kill().unwrap();
    child.wait().unwrap();
    let record = home.path().join(format!("data/netns/{id}.pids"));
    assert!(record.exists(), "the killed run left its record");
    let temp_dirs = || -> Vec<std::path::PathBuf> {
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
    };
    assert_eq!(temp_dirs().len(), 1, "the killed run left its temp dir");
    assert_nothing_left(&id, &before);
    let mut args = home.run_args("sleeper", "run", "exec:generic", "1");
    args.extend(["--run-cfg", "run_timeout=1s"]);
    let out = home.tg(&args);
    assert!(!record.exists(), "the next run removed it: {}", text(&out));
    assert!(temp_dirs().is_empty(), "and the killed run's temp dir");
    assert_nothing_left(&run_id_of(&out), &before);
}
