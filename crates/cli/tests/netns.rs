//! End-to-end tests of the `local:netns` runner through the real `testground` binary: the
//! seed's ping-pong plan (Go, sdk-go), a plan on the published sdk-rust crate, our SDK's
//! examples, packet capture and seeds, and cleanup after success, failure, timeout, Ctrl-C,
//! `terminate` and a killed engine, checked by looking for the run's own objects: its processes,
//! cgroup, host link, mounts, and whatever lived in its namespaces. Nothing else on the host is
//! compared, so Docker or other tests creating namespaces, links and mounts meanwhile do not
//! matter.
//!
//! Needs root: skips with a reason otherwise, fails instead when `TG_REQUIRE_PRIVILEGED=1`.
//! The tests take a lock so that their runs do not compete for the machine's cores.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Home, host_link_of, ping_rtts, processes_of_run, temp_dirs, text};
use tg_sys::proc::start_time;

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

/// A zombie runs nothing any more (it only waits for its parent to reap it).
fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.get(s.rfind(')')? + 2..)?.starts_with('Z')))
        .unwrap_or(false)
}

/// Every process (pid, start time) living in one of the run's network namespaces, sampled while
/// the run holds them: their inode numbers then name them and nothing else (an inode is reused
/// only once its namespace is freed, which is why they are not compared after the run).
fn namespace_members(run_id: &str) -> BTreeSet<(i32, u64)> {
    let netns = |pid: i32| tg_sys::netns_inode_of(pid).ok();
    let ours: BTreeSet<_> = processes_of_run(run_id)
        .into_iter()
        .filter_map(|p| netns(p as i32))
        .collect();
    let mut members = BTreeSet::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if netns(pid).is_some_and(|n| ours.contains(&n))
            && let Some(t) = start_time(pid)
        {
            members.insert((pid, t));
        }
    }
    members
}

/// What is left of run `run_id`, found by its own names only: processes marked
/// `TEST_RUN=<id>`, its cgroup, its host link, mounts naming it (its temp dir holds the
/// instances' hosts file), and `members` (processes seen in its namespaces while it ran) still
/// alive. With those and the engine gone, nothing holds the run's namespaces any more.
///
/// `killed`: the run's engine was killed and no run has started since; its cgroup may then still
/// be there (the next engine removes it, as its record), but empty.
fn leftovers_of(
    run_id: &str,
    host_link: Option<&str>,
    members: &BTreeSet<(i32, u64)>,
    killed: bool,
) -> Vec<String> {
    let mut left = Vec::new();
    let procs = processes_of_run(run_id);
    if !procs.is_empty() {
        left.push(format!("processes {procs:?}"));
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if let Some(i) = fields.iter().position(|f| *f == "-")
            && fields.get(i + 1) == Some(&"cgroup2")
        {
            let cgroup = std::path::Path::new(fields[4])
                .join("testground")
                .join(run_id);
            let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
            if cgroup.exists() && !(killed && procs.trim().is_empty()) {
                left.push(format!("cgroup {} with {procs:?}", cgroup.display()));
            }
        }
        if line.contains(run_id) {
            left.push(format!("mount {line}"));
        }
    }
    if let Some(link) = host_link
        && std::path::Path::new("/sys/class/net").join(link).exists()
    {
        left.push(format!("host link {link}"));
    }
    let alive: Vec<_> = members
        .iter()
        .filter(|(pid, t)| start_time(*pid) == Some(*t) && !zombie(*pid))
        .collect();
    if !alive.is_empty() {
        left.push(format!("processes of its namespaces {alive:?}"));
    }
    left
}

/// Nothing of run `run_id` is left (see [`leftovers_of`]). The kernel tears a namespace's
/// interfaces down asynchronously, so this waits a little for them.
fn assert_nothing_left(run_id: &str, host_link: Option<&str>, members: &BTreeSet<(i32, u64)>) {
    assert_left_only_records(run_id, host_link, members, false)
}

/// [`assert_nothing_left`], except for what a killed engine leaves for the next one (see
/// [`leftovers_of`]) when `killed`.
fn assert_left_only_records(
    run_id: &str,
    host_link: Option<&str>,
    members: &BTreeSet<(i32, u64)>,
    killed: bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = leftovers_of(run_id, host_link, members, killed);
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!("run {run_id} left {left:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`assert_nothing_left`] for a run that has ended with output `o`.
fn assert_run_left_nothing(o: &Output) {
    let link = host_link_of(o);
    assert!(link.is_some(), "the run names its host link: {}", text(o));
    assert_nothing_left(&run_id_of(o), link.as_deref(), &BTreeSet::new());
}

#[test]
fn seed_ping_pong_passes_with_its_rtt_in_range_and_leaves_nothing() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = Home::new();
    home.import("network");
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
    // The run log tells how punctual the shaping was: the pump delayed (100 ms each way) and
    // released at least the pings and their answers.
    let timing = stdout
        .lines()
        .find(|l| l.contains(" delayed packets released late by under "))
        .unwrap_or_else(|| panic!("no timing line: {stdout}"));
    let delayed: u64 = timing
        .split(" delayed packets")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{timing}"));
    assert!(delayed >= 4, "{timing}");
    assert!(
        timing.contains("for 99 %") && timing.contains("ms at most"),
        "{timing}"
    );
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
    // What the dashboard shows of the run: its seed and each instance's applied network config
    // (the plan asks for 100 ms of latency) and end, in the run's journal.
    let journal: serde_json::Value = serde_json::from_slice(
        &std::fs::read(home.path().join(format!("data/daemon/{id}.journal.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(journal["network"]["seed"], 42, "{journal}");
    let instances = journal["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2, "{journal}");
    for i in instances {
        assert_eq!(i["ok"], true, "{i}");
        assert_eq!(i["status"], "exited with status 0", "{i}");
        let configs = i["network"].as_array().unwrap();
        assert!(
            configs
                .iter()
                .any(|c| c["config"]["default"]["latency"].as_u64() == Some(100_000_000)),
            "{i}"
        );
    }
    assert_run_left_nothing(&out);
}

#[test]
fn sdk_rust_plan_connects_two_instances_over_tcp() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = Home::new();
    home.import("rust-sdk-tcp");
    let out = home.tg(&home.run_args("rust-sdk-tcp", "tcp-connect", "exec:rust", "2"));
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("outcome = success (single:2/2)"),
        "{stdout}"
    );
    assert!(stdout.contains("got pong from"), "{stdout}");
    assert_run_left_nothing(&out);
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
    let out = home.tg(&home.run_args("failing", "run", "exec:generic", "3"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("outcome = failure"),
        "{}",
        text(&out)
    );
    assert_run_left_nothing(&out);

    let mut args = home.run_args("sleeper", "run", "exec:generic", "3");
    args.extend(["--run-cfg", "run_timeout=2s"]);
    let t0 = Instant::now();
    let out = home.tg(&args);
    assert!(t0.elapsed() < Duration::from_secs(60));
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("task timeout"), "{}", text(&out));
    assert_run_left_nothing(&out);
}

/// Starts a 3-instance sleeper run in the background and waits until its instances run.
// The child is returned to the caller, which waits for it; the lint only looks at this function.
#[allow(clippy::zombie_processes)]
fn start_sleepers(home: &Home, plan: &str) -> (Child, String) {
    let mut child = home
        .cmd()
        .args(home.run_args(plan, "run", "exec:generic", "3"))
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

    // Ctrl-C on the embedded run.
    let (child, id) = start_sleepers(&home, "sleeper");
    let members = namespace_members(&id);
    assert!(members.len() >= 3, "{members:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert_nothing_left(&id, host_link_of(&out).as_deref(), &members);

    // `testground terminate` from another process.
    let (child, id) = start_sleepers(&home, "sleeper");
    let members = namespace_members(&id);
    let out = home.tg(&["terminate", "--runner", "local:netns"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_nothing_left(&id, host_link_of(&out).as_deref(), &members);

    // SIGKILL of the engine: the kernel frees what only its descriptors held, the instances
    // die with it, and the record it left is cleared by the next run.
    let (mut child, id) = start_sleepers(&home, "sleeper");
    let members = namespace_members(&id);
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let records = run_records(&home, &id);
    assert_eq!(records.len(), 1, "the killed run left its record");
    assert_eq!(temp_dirs(&id).len(), 1, "the killed run left its temp dir");
    let link = host_link_of(&out);
    assert_left_only_records(&id, link.as_deref(), &members, true);
    let mut args = home.run_args("sleeper", "run", "exec:generic", "1");
    args.extend(["--run-cfg", "run_timeout=1s"]);
    let out = home.tg(&args);
    assert!(
        run_records(&home, &id).is_empty(),
        "the next run removed it: {}",
        text(&out)
    );
    assert!(temp_dirs(&id).is_empty(), "and the killed run's temp dir");
    assert_nothing_left(&id, link.as_deref(), &members);
    assert_run_left_nothing(&out);
}

/// The record a run keeps while it goes (`<id>.json` somewhere in the home's `data/`, outside
/// the outputs), for the next engine to clean up after a killed one.
fn run_records(home: &Home, id: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![home.path().join("data")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "outputs") {
                    dirs.push(p);
                }
            } else if p.file_name().and_then(|n| n.to_str()) == Some(&format!("{id}.json")) {
                found.push(p);
            }
        }
    }
    found
}

/// An instance whose child escapes it (`setsid`, then a double fork) is not left behind by a
/// killed engine once the next run has started: the run's cgroup holds the escapees. An
/// unrelated process with a network namespace of its own survives that cleanup.
#[test]
fn a_killed_engine_leaves_no_escaped_grandchild_once_the_next_run_started() {
    if !privileged() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = Home::new();
    home.script_plan(
        "escaper",
        "sh -c \"setsid sh -c '(sleep 600 &) ; sleep 600' & exec sleep 600\"",
    );
    home.script_plan("sleeper", "sleep 600");
    let mut unrelated = Command::new("unshare")
        .args(["-n", "sleep", "600"])
        .spawn()
        .unwrap();

    let (mut child, id) = start_sleepers(&home, "escaper");
    let members = namespace_members(&id);
    // Each of the 3 instances: its sleep, the setsid one, the double-forked one (and a shell,
    // depending on which sh it is).
    let deadline = Instant::now() + Duration::from_secs(30);
    while processes_of_run(&id).len() < 9 {
        assert!(Instant::now() < deadline, "{:?}", processes_of_run(&id));
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();

    let mut args = home.run_args("sleeper", "run", "exec:generic", "1");
    args.extend(["--run-cfg", "run_timeout=1s"]);
    let next = home.tg(&args);
    assert_nothing_left(&id, host_link_of(&out).as_deref(), &members);
    assert!(temp_dirs(&id).is_empty(), "the killed run's temp dir");
    assert_run_left_nothing(&next);
    assert!(
        unrelated.try_wait().unwrap().is_none(),
        "an unrelated process with its own namespace survives"
    );
    unrelated.kill().unwrap();
    unrelated.wait().unwrap();
}
