//! The `local:exec` runner against small shell-script "plans".

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tg_api::task::{GroupOutcome, Outcome};
use tg_runner::{
    InstanceLine, LineKind, RunError, RunGroup, RunInput, RunOutput, RunnerEvent, collect_outputs,
    outputs_dir, run,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const OK: &str = r#"echo '{"ts":1,"event":{"success_event":{"group":"g"}}}'"#;

/// Guards against a hanging run only; no test asserts on durations.
const HANG_GUARD: Duration = Duration::from_secs(120);

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn outputs_root(&self) -> PathBuf {
        self.path().join("outputs")
    }

    /// Writes an executable `#!/bin/sh` script and returns its absolute path.
    fn script(&self, name: &str, body: &str) -> String {
        let path = self.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.to_str().unwrap().to_string()
    }

    fn input(&self, run_id: &str, groups: Vec<RunGroup>) -> RunInput {
        RunInput {
            run_id: run_id.to_string(),
            plan: "plan".into(),
            case: "case".into(),
            runner: "local:exec".into(),
            total_instances: groups.iter().map(|g| g.instances).sum(),
            groups,
            run_config: serde_json::Map::new(),
            outputs_root: self.outputs_root(),
            sync_host: "127.0.0.1".into(),
            sync_port: 5151,
            disable_metrics: true,
            timeout: Duration::from_secs(600),
            sync_service: None,
        }
    }
}

fn group(id: &str, instances: u32, artifact: &str) -> RunGroup {
    RunGroup {
        id: id.to_string(),
        instances,
        artifact: artifact.to_string(),
        params: BTreeMap::new(),
        profiles: BTreeMap::new(),
    }
}

async fn run_all(input: RunInput) -> (Result<RunOutput, RunError>, Vec<RunnerEvent>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let result = tokio::time::timeout(HANG_GUARD, run(input, tx, CancellationToken::new()))
        .await
        .expect("the run must end");
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    (result, events)
}

fn lines(events: &[RunnerEvent]) -> Vec<&InstanceLine> {
    events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Instance(l) => Some(l),
            _ => None,
        })
        .collect()
}

fn kinds_of(events: &[RunnerEvent], group: &str) -> Vec<LineKind> {
    lines(events)
        .into_iter()
        .filter(|l| l.group == group)
        .map(|l| l.kind)
        .collect()
}

fn outcome(ok: u32, total: u32) -> GroupOutcome {
    GroupOutcome { ok, total }
}

/// Alive means present and not a zombie (a zombie waits for a reaper we do not control).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
        }
        Err(_) => false,
    }
}

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn outcomes_follow_events_and_exit_status() {
    let f = Fixture::new();
    let ok = f.script("ok.sh", OK);
    let fail = f.script(
        "fail.sh",
        r#"echo '{"ts":1,"msg":"","group_id":"fail","run_id":"r","event":{"failure_event":{"group":"fail","error":"boom"}}}'"#,
    );
    // sdk-go may report a crash twice (T13); sdk-rust spells the group key `groups`.
    let crash = f.script(
        "crash.sh",
        r#"echo '{"ts":1,"event":{"crash_event":{"groups":"crash","error":"panic","stacktrace":"here"}}}'
echo '{"ts":2,"event":{"crash_event":{"groups":"crash","error":"panic","stacktrace":"here"}}}'"#,
    );
    let silent = f.script(
        "silent.sh",
        r#"echo '{"event":{"message_event":{"message":"hi"}}}'"#,
    );
    let late_fail = f.script("late.sh", &format!("{OK}\nexit 3"));
    let input = f.input(
        "outcomes",
        vec![
            group("ok", 2, &ok),
            group("fail", 1, &fail),
            group("crash", 1, &crash),
            group("silent", 1, &silent),
            group("late", 1, &late_fail),
        ],
    );
    let (out, events) = run_all(input).await;
    let out = out.unwrap();
    assert_eq!(out.result.outcome, Outcome::Failure);
    let expected: BTreeMap<String, GroupOutcome> = [
        ("ok", outcome(2, 2)),
        ("fail", outcome(0, 1)),
        ("crash", outcome(0, 1)),
        ("silent", outcome(0, 1)),
        ("late", outcome(0, 1)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(out.result.outcomes, expected);
    assert_eq!(kinds_of(&events, "ok"), vec![LineKind::Ok, LineKind::Ok]);
    assert_eq!(kinds_of(&events, "fail"), vec![LineKind::Fail]);
    assert_eq!(
        kinds_of(&events, "crash"),
        vec![LineKind::Crash, LineKind::Crash]
    );
    assert_eq!(
        kinds_of(&events, "silent"),
        vec![LineKind::Message, LineKind::Incomplete]
    );
    assert_eq!(
        kinds_of(&events, "late"),
        vec![LineKind::Ok, LineKind::InternalErr]
    );
    let fail_line = lines(&events)
        .into_iter()
        .find(|l| l.group == "fail")
        .unwrap();
    assert_eq!(fail_line.text, "boom");
    assert!(fail_line.render().ends_with("FAIL << fail[000] >> boom"));
    assert_eq!(
        out.outputs_dir,
        outputs_dir(&f.outputs_root(), "local:exec", "plan", "outcomes")
    );
}

#[tokio::test]
async fn all_ok_is_success_and_progress_is_reported() {
    let f = Fixture::new();
    let ok = f.script("ok.sh", OK);
    let (out, events) = run_all(f.input("allok", vec![group("g", 3, &ok)])).await;
    let out = out.unwrap();
    assert_eq!(out.result.outcome, Outcome::Success);
    assert_eq!(out.result.outcomes["g"], outcome(3, 3));
    assert_eq!(
        events
            .iter()
            .filter_map(|e| match e {
                RunnerEvent::Started { started, total } => Some((*started, *total)),
                _ => None,
            })
            .next_back(),
        Some((3, 3))
    );
}

#[tokio::test]
async fn timeout_kills_stalled_instances_and_fails_the_run() {
    let f = Fixture::new();
    let pids = f.path().join("pids");
    std::fs::create_dir(&pids).unwrap();
    let stall = f.script(
        "stall.sh",
        &format!(
            "echo $$ > {p}/sh.$TEST_GROUP_ID\nsleep 300 &\necho $! > {p}/sleep.$TEST_GROUP_ID\nwait",
            p = pids.display()
        ),
    );
    let ok = f.script("ok.sh", OK);
    let mut input = f.input(
        "timeout",
        vec![group("stall", 1, &stall), group("ok", 1, &ok)],
    );
    input.timeout = Duration::from_secs(2);
    let (out, events) = run_all(input).await;
    let out = out.unwrap();
    assert_eq!(out.result.outcome, Outcome::Failure);
    assert_eq!(out.result.outcomes["stall"], outcome(0, 1));
    assert_eq!(out.result.outcomes["ok"], outcome(1, 1));
    assert!(events.contains(&RunnerEvent::Log(
        "run canceled after reaching the task timeout".into()
    )));
    assert_eq!(kinds_of(&events, "stall"), vec![LineKind::Timeout]);
    for name in ["sh.stall", "sleep.stall"] {
        let pid = read_pid(&pids.join(name));
        assert!(!alive(pid), "{name} ({pid}) survived the run");
    }
}

#[tokio::test]
async fn a_background_child_holding_stdout_does_not_hang_the_run() {
    let f = Fixture::new();
    let bg = f.path().join("bg.pid");
    let script = f.script(
        "bg.sh",
        &format!("sleep 300 &\necho $! > {}\n{OK}\nexit 0", bg.display()),
    );
    let (out, events) = run_all(f.input("background", vec![group("g", 1, &script)])).await;
    let out = out.unwrap();
    assert_eq!(out.result.outcome, Outcome::Success);
    assert_eq!(kinds_of(&events, "g"), vec![LineKind::Ok]);
    let pid = read_pid(&bg);
    assert!(!alive(pid), "background child {pid} survived the run");
}

#[tokio::test]
async fn environment_contract() {
    let f = Fixture::new();
    // /proc/$$/environ is exactly what the runner passed, before the shell adds anything.
    let script = f.script(
        "env.sh",
        &format!(
            "tr '\\0' '\\n' < /proc/$$/environ > \"$TEST_OUTPUTS_PATH/env.txt\"\n\
             test -d \"$TEST_TEMP_PATH\" && touch \"$TEST_OUTPUTS_PATH/temp-existed\"\n{OK}"
        ),
    );
    let mut g = group("envgroup", 2, &script);
    g.params = [("b", "2"), ("a", "x=y")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    g.profiles = [("cpu".to_string(), "true".to_string())].into();
    let input = f.input("c7fjstge5te621cen4i0", vec![g]);
    let (out, _) = run_all(input).await;
    let out = out.unwrap();
    assert_eq!(out.result.outcome, Outcome::Success);

    let dir = out.outputs_dir.join("envgroup").join("1");
    let env: BTreeMap<String, String> = std::fs::read_to_string(dir.join("env.txt"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut expected_keys: BTreeSet<&str> = [
        "TEST_PLAN",
        "TEST_CASE",
        "TEST_RUN",
        "TEST_INSTANCE_COUNT",
        "TEST_GROUP_ID",
        "TEST_GROUP_INSTANCE_COUNT",
        "TEST_INSTANCE_PARAMS",
        "TEST_INSTANCE_ROLE",
        "TEST_SIDECAR",
        "TEST_SUBNET",
        "TEST_START_TIME",
        "TEST_OUTPUTS_PATH",
        "TEST_TEMP_PATH",
        "TEST_CAPTURE_PROFILES",
        "TEST_DISABLE_METRICS",
        "TEST_REPO",
        "TEST_BRANCH",
        "TEST_TAG",
        "SYNC_SERVICE_HOST",
        "SYNC_SERVICE_PORT",
        "REDIS_HOST",
        "INFLUXDB_URL",
        "HOSTNAME",
    ]
    .into();
    for inherited in ["PATH", "HOME"] {
        if std::env::var_os(inherited).is_some() {
            expected_keys.insert(inherited);
        }
    }
    assert_eq!(
        env.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        expected_keys
    );
    assert_eq!(
        expected_keys
            .iter()
            .filter(|k| k.starts_with("TEST_"))
            .count(),
        18
    );
    let v = |k: &str| env[k].as_str();
    assert_eq!(v("TEST_PLAN"), "plan");
    assert_eq!(v("TEST_CASE"), "case");
    assert_eq!(v("TEST_RUN"), "c7fjstge5te621cen4i0");
    assert_eq!(v("TEST_INSTANCE_COUNT"), "2");
    assert_eq!(v("TEST_GROUP_ID"), "envgroup");
    assert_eq!(v("TEST_GROUP_INSTANCE_COUNT"), "2");
    assert_eq!(v("TEST_INSTANCE_PARAMS"), "a=x=y|b=2");
    assert_eq!(v("TEST_INSTANCE_ROLE"), "");
    assert_eq!(v("TEST_SIDECAR"), "false");
    assert_eq!(v("TEST_SUBNET"), "127.1.0.0/16");
    assert!(chrono::DateTime::parse_from_rfc3339(v("TEST_START_TIME")).is_ok());
    assert_eq!(Path::new(v("TEST_OUTPUTS_PATH")), dir);
    assert_eq!(v("TEST_CAPTURE_PROFILES"), "cpu=true");
    assert_eq!(v("TEST_DISABLE_METRICS"), "true");
    assert_eq!(v("TEST_REPO"), "");
    assert_eq!(v("TEST_BRANCH"), "");
    assert_eq!(v("TEST_TAG"), "");
    assert_eq!(v("SYNC_SERVICE_HOST"), "127.0.0.1");
    assert_eq!(v("SYNC_SERVICE_PORT"), "5151");
    assert_eq!(v("REDIS_HOST"), "localhost");
    assert_eq!(v("INFLUXDB_URL"), "");
    assert_eq!(v("HOSTNAME"), "envgroup-1-c7fjstge");
    // The temp dir existed for the instance and is gone once the run's cleanup is done
    // (it runs after the outcome, on the cleanup thread).
    assert!(dir.join("temp-existed").exists());
    assert!(tg_runner::wait_for_cleanup(std::time::Duration::from_secs(
        60
    )));
    assert!(!Path::new(v("TEST_TEMP_PATH")).exists());
}

#[tokio::test]
async fn groups_get_their_own_params_and_counts() {
    let f = Fixture::new();
    let script = f.script(
        "params.sh",
        &format!(
            "echo \"$TEST_GROUP_ID $TEST_GROUP_INSTANCE_COUNT $TEST_INSTANCE_COUNT $TEST_INSTANCE_PARAMS\" > \"$TEST_OUTPUTS_PATH/params\"\n{OK}"
        ),
    );
    let mut a = group("a", 2, &script);
    a.params = [("size".to_string(), "1".to_string())].into();
    let mut b = group("b", 3, &script);
    b.params = [("size".to_string(), "2".to_string())].into();
    let (out, _) = run_all(f.input("groups", vec![a, b])).await;
    let out = out.unwrap();
    assert_eq!(out.result.outcomes["a"], outcome(2, 2));
    assert_eq!(out.result.outcomes["b"], outcome(3, 3));
    for (g, n, size) in [("a", 2, 1), ("b", 3, 2)] {
        for i in 0..n {
            let got =
                std::fs::read_to_string(out.outputs_dir.join(g).join(i.to_string()).join("params"))
                    .unwrap();
            assert_eq!(got.trim(), format!("{g} {n} 5 size={size}"));
        }
    }
}

#[tokio::test]
async fn stdout_and_stderr_are_kept_in_run_out_and_run_err() {
    let f = Fixture::new();
    let captured = f.script(
        "captured.sh",
        &format!("echo hello\n{OK}\necho oops >&2\nprintf 'no newline' >&2"),
    );
    let own = f.script(
        "own.sh",
        &format!("echo mine > \"$TEST_OUTPUTS_PATH/run.out\"\necho printed\n{OK}"),
    );
    let (out, events) = run_all(f.input(
        "files",
        vec![group("cap", 1, &captured), group("own", 1, &own)],
    ))
    .await;
    let out = out.unwrap();
    assert_eq!(out.result.outcome, Outcome::Success);

    let cap = out.outputs_dir.join("cap/0");
    assert_eq!(
        std::fs::read_to_string(cap.join("run.out")).unwrap(),
        format!(
            "hello\n{}\n",
            r#"{"ts":1,"event":{"success_event":{"group":"g"}}}"#
        )
    );
    assert_eq!(
        std::fs::read_to_string(cap.join("run.err")).unwrap(),
        "oops\nno newline"
    );
    let own_dir = out.outputs_dir.join("own/0");
    assert_eq!(
        std::fs::read_to_string(own_dir.join("run.out")).unwrap(),
        "mine\n"
    );
    assert_eq!(
        std::fs::read_to_string(own_dir.join("run.err")).unwrap(),
        ""
    );
    for dir in [&cap, &own_dir] {
        let names: BTreeSet<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["run.err".to_string(), "run.out".to_string()].into());
    }

    // Order holds within a stream; stdout and stderr may interleave either way.
    let cap_lines: Vec<(LineKind, &str)> = lines(&events)
        .into_iter()
        .filter(|l| l.group == "cap")
        .map(|l| (l.kind, l.text.as_str()))
        .collect();
    let (stderr, stdout): (Vec<_>, Vec<_>) = cap_lines
        .into_iter()
        .partition(|(k, _)| *k == LineKind::Error);
    assert_eq!(stdout, vec![(LineKind::Other, "hello"), (LineKind::Ok, "")]);
    assert_eq!(
        stderr,
        vec![(LineKind::Error, "oops"), (LineKind::Error, "no newline")]
    );
}

#[tokio::test]
async fn cancel_kills_everything_and_reports_canceled() {
    let f = Fixture::new();
    let pids = f.path().join("pids");
    std::fs::create_dir(&pids).unwrap();
    let script = f.script(
        "wait.sh",
        &format!(
            "sleep 300 &\necho $! > {p}/sleep.$HOSTNAME\necho $$ > {p}/sh.$HOSTNAME\n\
             echo '{{\"event\":{{\"message_event\":{{\"message\":\"ready\"}}}}}}'\nwait",
            p = pids.display()
        ),
    );
    let input = f.input("cancel", vec![group("g", 3, &script)]);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(run(input, tx, cancel.clone()));
    let mut ready = 0;
    while ready < 3 {
        match rx
            .recv()
            .await
            .expect("the run ended before its instances were ready")
        {
            RunnerEvent::Instance(l) if l.kind == LineKind::Message => ready += 1,
            _ => {}
        }
    }
    cancel.cancel();
    let out = tokio::time::timeout(HANG_GUARD, handle)
        .await
        .expect("the run must end")
        .unwrap()
        .unwrap();
    assert_eq!(out.result.outcome, Outcome::Canceled);
    assert_eq!(out.result.outcomes["g"], outcome(0, 3));
    let mut killed = 0;
    while let Ok(e) = rx.try_recv() {
        if matches!(e, RunnerEvent::Instance(ref l) if l.kind == LineKind::Killed) {
            killed += 1;
        }
    }
    assert_eq!(killed, 3);
    let files: Vec<_> = std::fs::read_dir(&pids).unwrap().collect();
    assert_eq!(files.len(), 6);
    for entry in files {
        let path = entry.unwrap().path();
        let pid = read_pid(&path);
        assert!(
            !alive(pid),
            "{} ({pid}) survived the cancel",
            path.display()
        );
    }
}

#[tokio::test]
async fn collect_archives_the_run_outputs() {
    let f = Fixture::new();
    let script = f.script(
        "out.sh",
        &format!(
            "mkdir \"$TEST_OUTPUTS_PATH/sub\"\necho data > \"$TEST_OUTPUTS_PATH/sub/file\"\n{OK}"
        ),
    );
    let (out, _) = run_all(f.input(
        "collectme",
        vec![group("a", 2, &script), group("b", 1, &script)],
    ))
    .await;
    assert_eq!(out.unwrap().result.outcome, Outcome::Success);

    let mut tgz = Vec::new();
    assert!(collect_outputs(&f.outputs_root(), "local:exec", "collectme", &mut tgz).unwrap());
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&tgz[..]));
    let mut entries = Vec::new();
    let mut file_data = None;
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_str().unwrap().to_string();
        let is_dir = e.header().entry_type().is_dir();
        if path == "collectme/a/1/sub/file" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            file_data = Some(s);
        }
        entries.push((path.trim_end_matches('/').to_string(), is_dir));
    }
    let mut expected = vec![("collectme".to_string(), true)];
    for (g, n) in [("a", 2), ("b", 1)] {
        expected.push((format!("collectme/{g}"), true));
        for i in 0..n {
            let d = format!("collectme/{g}/{i}");
            expected.push((d.clone(), true));
            expected.push((format!("{d}/run.err"), false));
            expected.push((format!("{d}/run.out"), false));
            expected.push((format!("{d}/sub"), true));
            expected.push((format!("{d}/sub/file"), false));
        }
    }
    assert_eq!(entries, expected);
    assert_eq!(file_data.as_deref(), Some("data\n"));

    let mut none = Vec::new();
    assert!(!collect_outputs(&f.outputs_root(), "local:exec", "nosuchrun", &mut none).unwrap());
    assert!(none.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_instances_all_ok() {
    let f = Fixture::new();
    let script = f.script("ok.sh", OK);
    let (out, events) = run_all(f.input("many", vec![group("many", 200, &script)])).await;
    let out = out.unwrap();
    assert_eq!(out.result.outcome, Outcome::Success);
    assert_eq!(out.result.outcomes["many"], outcome(200, 200));
    let mut ok_indices: Vec<u32> = lines(&events)
        .into_iter()
        .filter(|l| l.kind == LineKind::Ok)
        .map(|l| l.index)
        .collect();
    ok_indices.sort_unstable();
    assert_eq!(ok_indices, (0..200).collect::<Vec<_>>());
    let progress: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            RunnerEvent::Started {
                started,
                total: 200,
            } => Some(*started),
            _ => None,
        })
        .collect();
    assert_eq!(progress.len(), 20);
    assert_eq!(progress.last(), Some(&200));
}

#[tokio::test]
async fn infrastructure_errors() {
    let f = Fixture::new();
    let mut input = f.input("bad", vec![group("g", 1, "/nonexistent/artifact")]);
    let (out, _) = run_all(input.clone()).await;
    assert!(matches!(out, Err(RunError::Spawn { ref group, index: 0, .. }) if group == "g"));

    let mut escaping = f.input("bad", vec![group("../x", 1, "/bin/true")]);
    let (out, _) = run_all(escaping.clone()).await;
    assert!(matches!(out, Err(RunError::InvalidConfig { .. })));
    escaping.groups.clear();
    escaping.run_id = "..".into();
    let (out, _) = run_all(escaping).await;
    assert!(matches!(out, Err(RunError::InvalidConfig { .. })));

    input.runner = "cluster:swarm".into();
    let (out, _) = run_all(input).await;
    assert!(matches!(out, Err(RunError::NotSupported { .. })));
}

/// For processes killed without anything to wait on (the run future was dropped): polls,
/// bounded by [`HANG_GUARD`].
async fn eventually_dead(pid: i32) -> bool {
    let give_up = tokio::time::Instant::now() + HANG_GUARD;
    while tokio::time::Instant::now() < give_up {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn dropping_the_run_kills_its_instances() {
    let f = Fixture::new();
    let pids = f.path().join("pids");
    std::fs::create_dir(&pids).unwrap();
    let script = f.script(
        "wait.sh",
        &format!(
            "sleep 300 &\necho $! > {p}/sleep.$HOSTNAME\necho $$ > {p}/sh.$HOSTNAME\n\
             echo '{{\"event\":{{\"message_event\":{{\"message\":\"ready\"}}}}}}'\nwait",
            p = pids.display()
        ),
    );
    let input = f.input("dropped", vec![group("g", 2, &script)]);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handle = tokio::spawn(run(input, tx, CancellationToken::new()));
    let mut ready = 0;
    while ready < 2 {
        match rx
            .recv()
            .await
            .expect("the run ended before its instances were ready")
        {
            RunnerEvent::Instance(l) if l.kind == LineKind::Message => ready += 1,
            _ => {}
        }
    }
    handle.abort();
    assert!(handle.await.unwrap_err().is_cancelled());
    let files: Vec<_> = std::fs::read_dir(&pids).unwrap().collect();
    assert_eq!(files.len(), 4);
    for entry in files {
        let path = entry.unwrap().path();
        let pid = read_pid(&path);
        assert!(
            eventually_dead(pid).await,
            "{} ({pid}) survived",
            path.display()
        );
    }
}

#[tokio::test]
#[ignore = "heavy: 1000 processes; run with --ignored"]
async fn thousand_instances_all_ok() {
    let f = Fixture::new();
    let script = f.script("ok.sh", OK);
    let (out, _) = run_all(f.input("thousand", vec![group("g", 1000, &script)])).await;
    assert_eq!(out.unwrap().result.outcomes["g"], outcome(1000, 1000));
}

#[tokio::test]
async fn cancel_before_start_starts_nothing() {
    let f = Fixture::new();
    let marker = f.path().join("ran");
    let script = f.script("touch.sh", &format!("touch {}\n{OK}", marker.display()));
    let (tx, _rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    cancel.cancel();
    let out = run(f.input("early", vec![group("g", 2, &script)]), tx, cancel)
        .await
        .unwrap();
    assert_eq!(out.result.outcome, Outcome::Canceled);
    assert_eq!(out.result.outcomes["g"], outcome(0, 2));
    assert!(!marker.exists());
}
