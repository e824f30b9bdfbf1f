//! Builds the example plans with each builder into a temporary work dir, runs the artifacts with
//! the instance environment, and checks caching, errors, cancellation and purging.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use tempfile::TempDir;
use tg_builder::{Artifact, BuildError, BuildInput, BuildOutput, Dependency, build, purge};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn repo_plan(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../plans")
        .join(name)
}

/// A private copy of a repository plan, so tests may edit sources (and cargo may write a lock
/// file) without touching the tree.
fn copy_plan(name: &str) -> TempDir {
    let src = repo_plan(name);
    let dst = tempfile::tempdir().unwrap();
    for entry in walkdir::WalkDir::new(&src)
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| e.file_name() != "target")
    {
        let entry = entry.unwrap();
        let to = dst.path().join(entry.path().strip_prefix(&src).unwrap());
        if entry.file_type().is_dir() {
            fs::create_dir_all(&to).unwrap();
        } else {
            fs::copy(entry.path(), &to).unwrap();
        }
    }
    dst
}

fn input(builder: &str, plan: &str, plan_dir: &Path, work_dir: &Path, config: Value) -> BuildInput {
    BuildInput {
        build_id: "d0test0000000000000".into(),
        plan: plan.into(),
        plan_dir: plan_dir.to_owned(),
        builder: builder.into(),
        config: config.as_object().cloned().unwrap_or_default(),
        selectors: vec![],
        dependencies: vec![],
        work_dir: work_dir.to_owned(),
    }
}

/// Runs a build and returns its result with every progress line it produced.
async fn build_logged(input: &BuildInput) -> (Result<BuildOutput, BuildError>, Vec<String>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let res = build(input, &tx, &CancellationToken::new()).await;
    drop(tx);
    let mut lines = Vec::new();
    while let Some(l) = rx.recv().await {
        lines.push(l);
    }
    (res, lines)
}

async fn build_ok(input: &BuildInput) -> (BuildOutput, Vec<String>) {
    let (res, lines) = build_logged(input).await;
    match res {
        Ok(out) => (out, lines),
        Err(e) => panic!("build failed: {e}\nprogress:\n{}", lines.join("\n")),
    }
}

/// Starts `artifact` the way `local:exec` does: no arguments, only PATH inherited, all 18
/// `TEST_*` variables set. Returns the event objects printed on stdout.
fn run_instance(
    artifact: &Artifact,
    plan: &str,
    case: &str,
    params: &str,
    outputs: &Path,
) -> Vec<Value> {
    let temp = tempfile::tempdir().unwrap();
    let artifact = artifact
        .path()
        .unwrap_or_else(|| panic!("{artifact} is not an executable"))
        .to_owned();
    let mut cmd = Command::new(&artifact);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TEST_PLAN", plan)
        .env("TEST_CASE", case)
        .env("TEST_RUN", "x")
        .env("TEST_INSTANCE_COUNT", "1")
        .env("TEST_GROUP_ID", "single")
        .env("TEST_GROUP_INSTANCE_COUNT", "1")
        .env("TEST_INSTANCE_PARAMS", params)
        .env("TEST_INSTANCE_ROLE", "")
        .env("TEST_SIDECAR", "false")
        .env("TEST_SUBNET", "127.1.0.0/16")
        .env("TEST_START_TIME", "2024-01-01T00:00:00Z")
        .env("TEST_OUTPUTS_PATH", outputs)
        .env("TEST_TEMP_PATH", temp.path())
        .env("TEST_CAPTURE_PROFILES", "")
        .env("TEST_DISABLE_METRICS", "true")
        .env("TEST_REPO", "")
        .env("TEST_BRANCH", "")
        .env("TEST_TAG", "");
    // Other test threads fork while a build has an artifact open for writing; their children
    // hold that descriptor until they exec, and executing the file meanwhile fails with
    // ETXTBSY. It is transient, and a runner has to retry in the same way.
    let mut attempts = 0;
    let out = loop {
        match cmd.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => {
                break other.unwrap_or_else(|e| {
                    panic!("start {}: {e} ({:?})", artifact.display(), e.kind())
                });
            }
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    for e in &events {
        assert!(e["ts"].is_u64(), "ts is epoch ns: {e}");
        assert_eq!(e["msg"], "", "{e}");
        assert_eq!(e["group_id"], "single", "{e}");
        assert_eq!(e["run_id"], "x", "{e}");
    }
    events
}

fn has_success(events: &[Value]) -> bool {
    events
        .iter()
        .any(|e| e["event"]["success_event"] == json!({"group": "single"}))
}

fn failure_error(events: &[Value]) -> Option<String> {
    events.iter().find_map(|e| {
        e["event"]["failure_event"]["error"]
            .as_str()
            .map(str::to_owned)
    })
}

fn messages(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| {
            e["event"]["message_event"]["message"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// Appends to a source file the way an editor would, changing its content.
fn touch(path: &Path, extra: &str) {
    let mut text = fs::read_to_string(path).unwrap();
    text.push_str(extra);
    fs::write(path, text).unwrap();
}

#[tokio::test]
async fn generic_python_plan_builds_runs_and_caches() {
    let plan = copy_plan("example-python");
    let work = tempfile::tempdir().unwrap();
    let outputs = tempfile::tempdir().unwrap();
    let cfg = json!({"enabled": true, "exec": "python3 main.py"});
    let inp = input(
        "exec:generic",
        "example-python",
        plan.path(),
        work.path(),
        cfg,
    );

    let (first, _) = build_ok(&inp).await;
    assert!(!first.cached);
    assert!(first.artifact.path().unwrap().starts_with(work.path()));
    let events = run_instance(&first.artifact, "example-python", "ok", "", outputs.path());
    assert!(has_success(&events), "{events:?}");

    let events = run_instance(
        &first.artifact,
        "example-python",
        "params",
        "greeting=hi|n=3",
        outputs.path(),
    );
    assert!(has_success(&events), "{events:?}");
    assert!(
        messages(&events)
            .iter()
            .any(|m| m.contains("\"greeting\": \"hi\"") && m.contains("\"n\": \"3\"")),
        "{events:?}"
    );
    let events = run_instance(
        &first.artifact,
        "example-python",
        "fail",
        "",
        outputs.path(),
    );
    assert!(
        failure_error(&events).is_some() && !has_success(&events),
        "{events:?}"
    );

    let (second, lines) = build_ok(&inp).await;
    assert!(second.cached);
    assert_eq!(second.artifact, first.artifact);
    assert!(lines.is_empty(), "a cache hit runs nothing: {lines:?}");

    touch(&plan.path().join("main.py"), "\n# edited\n");
    let (third, _) = build_ok(&inp).await;
    assert!(!third.cached);
    assert_ne!(third.artifact, first.artifact);
    let events = run_instance(&third.artifact, "example-python", "ok", "", outputs.path());
    assert!(has_success(&events), "{events:?}");
}

#[tokio::test]
async fn rust_plan_builds_runs_and_caches() {
    let plan = copy_plan("example-rust");
    let work = tempfile::tempdir().unwrap();
    let outputs = tempfile::tempdir().unwrap();
    let cfg = json!({"enabled": true, "profile": "release"});
    let inp = input("exec:rust", "example-rust", plan.path(), work.path(), cfg);

    let (first, lines) = build_ok(&inp).await;
    assert!(!first.cached);
    assert!(
        lines.iter().any(|l| l.starts_with("$ cargo build")),
        "progress shows the toolchain: {lines:?}"
    );
    assert!(
        work.path()
            .join("exec-rust--example-rust/target/release")
            .is_dir()
    );

    let events = run_instance(&first.artifact, "example-rust", "ok", "", outputs.path());
    assert!(has_success(&events), "{events:?}");
    let events = run_instance(
        &first.artifact,
        "example-rust",
        "params",
        "a=1|b=two",
        outputs.path(),
    );
    assert!(has_success(&events), "{events:?}");
    assert!(
        messages(&events)
            .iter()
            .any(|m| m.contains(r#""a":"1""#) && m.contains(r#""b":"two""#)),
        "{events:?}"
    );
    let events = run_instance(
        &first.artifact,
        "example-rust",
        "output",
        "",
        outputs.path(),
    );
    assert!(has_success(&events), "{events:?}");
    assert_eq!(
        fs::read_to_string(outputs.path().join("hello.txt")).unwrap(),
        "hello"
    );
    let events = run_instance(&first.artifact, "example-rust", "fail", "", outputs.path());
    assert!(failure_error(&events).is_some(), "{events:?}");

    let (second, lines) = build_ok(&inp).await;
    assert!(second.cached);
    assert_eq!(second.artifact, first.artifact);
    assert!(lines.is_empty(), "a cache hit runs nothing: {lines:?}");

    touch(&plan.path().join("src/main.rs"), "\n// edited\n");
    let (third, _) = build_ok(&inp).await;
    assert!(!third.cached);
    assert_ne!(third.artifact, first.artifact);
    let events = run_instance(&third.artifact, "example-rust", "ok", "", outputs.path());
    assert!(has_success(&events), "{events:?}");
}

#[tokio::test]
async fn go_placebo_builds_runs_and_reports_dependencies() {
    let plan = copy_plan("placebo");
    let work = tempfile::tempdir().unwrap();
    let outputs = tempfile::tempdir().unwrap();
    let cfg =
        json!({"enabled": true, "module_path": "github.com/testground/testground/plans/placebo"});
    let mut inp = input("exec:go", "placebo", plan.path(), work.path(), cfg);

    let (first, _) = build_ok(&inp).await;
    assert!(!first.cached);
    assert_eq!(
        first
            .dependencies
            .get("github.com/testground/sdk-go")
            .map(String::as_str),
        Some("v0.3.0"),
        "{:?}",
        first.dependencies
    );
    let events = run_instance(&first.artifact, "placebo", "ok", "", outputs.path());
    assert!(has_success(&events), "{events:?}");
    let events = run_instance(
        &first.artifact,
        "placebo",
        "params",
        "answer=41|word=x",
        outputs.path(),
    );
    assert!(failure_error(&events).is_some(), "{events:?}");
    let events = run_instance(&first.artifact, "placebo", "output", "", outputs.path());
    assert!(has_success(&events), "{events:?}");
    assert_eq!(
        fs::read_to_string(outputs.path().join("hello.txt")).unwrap(),
        "hello"
    );

    let (second, lines) = build_ok(&inp).await;
    assert!(second.cached);
    assert_eq!(second.artifact, first.artifact);
    assert_eq!(second.dependencies, first.dependencies);
    assert!(lines.is_empty(), "a cache hit runs nothing: {lines:?}");

    // A dependency rewrite edits go.mod in the build copy only, and forces a rebuild.
    let gomod = fs::read(plan.path().join("go.mod")).unwrap();
    inp.dependencies.push(Dependency {
        module: "github.com/testground/sdk-go".into(),
        target: String::new(),
        version: "v0.3.0".into(),
    });
    let (rewritten, lines) = build_ok(&inp).await;
    assert!(!rewritten.cached);
    assert!(
        lines.iter().any(|l| l
            .contains("-replace=github.com/testground/sdk-go=github.com/testground/sdk-go@v0.3.0")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == "$ go mod tidy"), "{lines:?}");
    assert_eq!(fs::read(plan.path().join("go.mod")).unwrap(), gomod);
    inp.dependencies.clear();

    touch(&plan.path().join("main.go"), "\n// edited\n");
    let (third, lines) = build_ok(&inp).await;
    assert!(!third.cached);
    assert!(
        !lines.iter().any(|l| l == "$ go mod tidy"),
        "no tidy without rewrites: {lines:?}"
    );
    let events = run_instance(&third.artifact, "placebo", "ok", "", outputs.path());
    assert!(has_success(&events), "{events:?}");
}

#[tokio::test]
async fn generic_artifact_mode_runs_what_build_cmd_produced() {
    let plan = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    fs::write(plan.path().join("word.txt"), "built").unwrap();
    let build_cmd = r#"mkdir -p bin && printf '#!/bin/sh\necho "{\"ts\":1,\"msg\":\"\",\"group_id\":\"single\",\"run_id\":\"x\",\"event\":{\"message_event\":{\"message\":\"%s\"}}}"\necho "{\"ts\":2,\"msg\":\"\",\"group_id\":\"single\",\"run_id\":\"x\",\"event\":{\"success_event\":{\"group\":\"single\"}}}"\n' "$(cat word.txt)" > bin/app && chmod +x bin/app"#;
    let cfg = json!({"build_cmd": build_cmd, "artifact": "bin/app"});
    let inp = input("exec:generic", "art", plan.path(), work.path(), cfg);
    let (out, _) = build_ok(&inp).await;
    let events = run_instance(&out.artifact, "art", "ok", "", work.path());
    assert!(has_success(&events), "{events:?}");
    assert_eq!(messages(&events), vec!["built".to_string()]);

    let cfg = json!({"build_cmd": "true", "artifact": "bin/missing"});
    let inp = input("exec:generic", "art", plan.path(), work.path(), cfg);
    let (res, _) = build_logged(&inp).await;
    assert!(
        matches!(res, Err(BuildError::MissingArtifact { .. })),
        "{res:?}"
    );
}

#[tokio::test]
async fn failed_build_reports_status_and_tail() {
    let plan = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let cfg =
        json!({"build_cmd": "echo compiling; echo 'error: boom' >&2; exit 7", "exec": "true"});
    let inp = input("exec:generic", "broken", plan.path(), work.path(), cfg);
    let (res, lines) = build_logged(&inp).await;
    let Err(BuildError::Failed {
        builder,
        status,
        tail,
    }) = res
    else {
        panic!("expected Failed, got {res:?}");
    };
    assert_eq!(builder, "exec:generic");
    assert!(status.contains('7'), "{status}");
    assert_eq!(tail, "compiling\nerror: boom");
    assert!(lines.contains(&"error: boom".to_string()), "{lines:?}");
    let left: Vec<_> = fs::read_dir(work.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "a failed build leaves nothing behind: {left:?}"
    );
    // Nothing was installed, so the next attempt builds again rather than hitting the cache.
    let (res, _) = build_logged(&inp).await;
    assert!(matches!(res, Err(BuildError::Failed { .. })));
}

#[tokio::test]
async fn unsupported_builders_are_rejected() {
    let work = tempfile::tempdir().unwrap();
    for id in ["exec:cobol", "", "docker:cobol"] {
        let inp = input(id, "p", work.path(), work.path(), json!({}));
        let (res, _) = build_logged(&inp).await;
        assert!(
            matches!(&res, Err(BuildError::Unsupported { builder }) if builder == id),
            "{res:?}"
        );
    }
    // The Docker builders of the original are implemented and produce images.
    for id in ["docker:go", "docker:generic", "docker:node", "docker:rust"] {
        assert_eq!(
            tg_builder::artifact_kind(id),
            Some(tg_builder::ArtifactKind::Image)
        );
    }
    let inp = input("exec:cobol", "p", work.path(), work.path(), json!({}));
    let err = build_logged(&inp).await.0.unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"builder "exec:cobol" is not supported (supported: exec:rust, exec:go, exec:generic, docker:go, docker:rust, docker:generic, docker:node)"#
    );
    assert!(matches!(
        purge("exec:cobol", "p", work.path()).await,
        Err(BuildError::Unsupported { .. })
    ));
    assert!(
        fs::read_dir(work.path()).unwrap().next().is_none(),
        "nothing was created"
    );
}

#[tokio::test]
async fn bad_config_names_the_key() {
    let plan = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let cases = [
        ("exec:generic", json!({}), "exec"),
        (
            "exec:generic",
            json!({"exec": "a", "artifact": "b"}),
            "artifact",
        ),
        ("exec:generic", json!({"artifact": "../escape"}), "artifact"),
        ("exec:generic", json!({"exec": 5}), "exec"),
        ("exec:go", json!({"fresh_gomod": true}), "module_path"),
        ("exec:go", json!({"fresh_gomod": "maybe"}), "fresh_gomod"),
        ("exec:go", json!({"exec_pkg": "-toolexec=x"}), "exec_pkg"),
        ("exec:rust", json!({"profile": 3}), "profile"),
        ("exec:rust", json!({"profile": "rel ease"}), "profile"),
    ];
    for (builder, cfg, key) in cases {
        let inp = input(builder, "p", plan.path(), work.path(), cfg.clone());
        let (res, _) = build_logged(&inp).await;
        match res {
            Err(BuildError::BadConfig {
                key: k, builder: b, ..
            }) => {
                assert_eq!((k.as_str(), b.as_str()), (key, builder), "{cfg}");
            }
            other => panic!("{builder} {cfg}: expected BadConfig({key}), got {other:?}"),
        }
    }

    // A binary the crate does not have: found out from `cargo metadata`.
    let rust = copy_plan("example-rust");
    let inp = input(
        "exec:rust",
        "example-rust",
        rust.path(),
        work.path(),
        json!({"bin": "nope"}),
    );
    let (res, _) = build_logged(&inp).await;
    let Err(err @ BuildError::BadConfig { .. }) = res else {
        panic!("expected BadConfig, got {res:?}");
    };
    assert!(err.to_string().contains("example-rust"), "{err}");
}

#[tokio::test]
async fn cancel_kills_a_long_build() {
    let plan = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let cfg = json!({"build_cmd": "echo started; sleep 30; echo finished", "exec": "true"});
    let inp = input("exec:generic", "slow", plan.path(), work.path(), cfg);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let task = {
        let cancel = cancel.clone();
        tokio::spawn(async move { build(&inp, &tx, &cancel).await })
    };
    while let Some(line) = rx.recv().await {
        if line == "started" {
            break;
        }
    }
    cancel.cancel();
    // The guard only bounds a hang; a working cancel returns at once, long before sleep ends.
    let res = tokio::time::timeout(std::time::Duration::from_secs(20), task)
        .await
        .expect("cancel must stop the build")
        .unwrap();
    assert!(matches!(res, Err(BuildError::Canceled)), "{res:?}");
    while let Ok(line) = rx.try_recv() {
        assert_ne!(line, "finished");
    }

    // Already canceled: nothing starts at all.
    let inp = input(
        "exec:generic",
        "slow",
        plan.path(),
        work.path(),
        json!({"exec": "true"}),
    );
    let (tx, _rx) = mpsc::unbounded_channel();
    let res = build(&inp, &tx, &cancel).await;
    assert!(matches!(res, Err(BuildError::Canceled)), "{res:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_builds_compile_once() {
    let plan = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let counter = work.path().join("builds.log");
    let cfg = json!({
        "build_cmd": format!("echo built >> '{}'", counter.display()),
        "exec": "true",
    });
    let inp = input("exec:generic", "twice", plan.path(), work.path(), cfg);
    let (a, b) = tokio::join!(build_ok(&inp), build_ok(&inp));
    assert_eq!(a.0.artifact, b.0.artifact);
    assert!(a.0.cached != b.0.cached, "exactly one of them builds");
    assert_eq!(fs::read_to_string(&counter).unwrap(), "built\n");
}

#[tokio::test]
async fn purge_removes_only_that_plans_entries() {
    let plan = tempfile::tempdir().unwrap();
    fs::write(plan.path().join("main.sh"), "echo hi").unwrap();
    let work = tempfile::tempdir().unwrap();
    let cfg = json!({"exec": "sh main.sh"});
    let foo = input("exec:generic", "foo", plan.path(), work.path(), cfg.clone());
    let foobar = input("exec:generic", "foo-bar", plan.path(), work.path(), cfg);
    let (a, _) = build_ok(&foo).await;
    let (b, _) = build_ok(&foobar).await;
    assert!(a.artifact.path().unwrap().exists() && b.artifact.path().unwrap().exists());

    purge("exec:generic", "foo", work.path()).await.unwrap();
    let left: Vec<String> = fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter().all(|n| n.starts_with("exec-generic--foo-bar-")),
        "{left:?}"
    );
    assert_eq!(
        left.len(),
        2,
        "artifact and build dir of foo-bar remain: {left:?}"
    );
    let (again, _) = build_ok(&foo).await;
    assert!(!again.cached, "purged artifacts are rebuilt");

    purge("exec:rust", "nothing-here", &work.path().join("absent"))
        .await
        .unwrap();
}

/// What a build helper process (see [`build_in_child_process`]) is asked to build.
const CHILD_ENV: &str = "TG_BUILDER_TEST_CHILD";

/// Not a test: the body of the helper process that the multi-process tests below start (this
/// same test binary, with `--ignored --exact`). It builds the input given in [`CHILD_ENV`] and
/// prints each progress line, then the result, on stdout.
#[test]
#[ignore = "helper process of the multi-process tests; does nothing on its own"]
fn build_in_child_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let spec: Value = serde_json::from_str(&spec).unwrap();
    let mut inp = input(
        spec["builder"].as_str().unwrap(),
        spec["plan"].as_str().unwrap(),
        Path::new(spec["plan_dir"].as_str().unwrap()),
        Path::new(spec["work_dir"].as_str().unwrap()),
        spec["config"].clone(),
    );
    inp.build_id = spec["build_id"].as_str().unwrap().to_owned();
    // One thread: the toolchain processes are children of this thread, which lives as long as
    // the process, so the kernel's parent-death signal fires only when the process dies.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let build = build(&inp, &tx, &cancel);
        tokio::pin!(build);
        let res = loop {
            tokio::select! {
                r = &mut build => break r,
                Some(line) = rx.recv() => println!("tg-progress: {line}"),
            }
        };
        while let Ok(line) = rx.try_recv() {
            println!("tg-progress: {line}");
        }
        match res {
            Ok(out) => println!("tg-result: {} {}", out.cached, out.artifact),
            Err(e) => println!("tg-error: {e}"),
        }
    });
}

/// The rest of a helper's output line after `tag`. libtest prints `test <name> ... ` without a
/// newline before the test runs, so the first line the helper prints does not start with it.
fn tagged<'a>(line: &'a str, tag: &str) -> Option<&'a str> {
    line.find(tag).map(|i| &line[i + tag.len()..])
}

/// A build running in another process, as another engine sharing the work dir would.
struct ChildBuild {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl ChildBuild {
    fn start(builder: &str, plan: &str, plan_dir: &Path, work_dir: &Path, config: Value) -> Self {
        let spec = json!({
            "builder": builder,
            "plan": plan,
            "plan_dir": plan_dir,
            "work_dir": work_dir,
            "config": config,
            "build_id": format!("child{}", std::process::id()),
        });
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "build_in_child_process",
                "--ignored",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env(CHILD_ENV, spec.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        use tokio::io::AsyncBufReadExt;
        ChildBuild {
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
        }
    }

    /// Reads the child's output until a progress line equal to `wanted`.
    async fn wait_progress(&mut self, wanted: &str) {
        let mut seen = Vec::new();
        while let Some(line) = self.lines.next_line().await.unwrap() {
            if tagged(&line, "tg-progress: ") == Some(wanted) {
                return;
            }
            seen.push(line);
        }
        panic!(
            "the child ended before printing {wanted:?}; it printed:\n{}",
            seen.join("\n")
        );
    }

    /// Reads the child's output to its end and returns `(cached, artifact)`.
    async fn finish(mut self) -> (bool, Artifact) {
        let mut seen = Vec::new();
        let mut result = None;
        while let Some(line) = self.lines.next_line().await.unwrap() {
            if let Some(r) = tagged(&line, "tg-result: ") {
                let (cached, path) = r.split_once(' ').unwrap();
                result = Some((cached == "true", Artifact::Executable(PathBuf::from(path))));
            }
            seen.push(line);
        }
        let status = self.child.wait().await.unwrap();
        match result {
            Some(r) if status.success() => r,
            _ => panic!("child build failed ({status}):\n{}", seen.join("\n")),
        }
    }
}

/// `exec:generic` build config: signals `started`, then blocks until `release` exists.
fn gated_config(sync: &Path, counter: &Path, exec: &str) -> Value {
    json!({
        "build_cmd": format!(
            "echo built >> '{}'; echo started; while [ ! -e '{}' ]; do sleep 0.02; done",
            counter.display(),
            sync.join("release").display()
        ),
        "exec": exec,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_builds_in_two_processes_share_one_work_dir() {
    let plan = tempfile::tempdir().unwrap();
    fs::write(
        plan.path().join("main.sh"),
        r#"echo "{\"ts\":1,\"msg\":\"\",\"group_id\":\"single\",\"run_id\":\"x\",\"event\":{\"success_event\":{\"group\":\"single\"}}}""#,
    )
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let sync = tempfile::tempdir().unwrap();
    let counter = sync.path().join("builds.log");

    // Identical builds: the second process waits for the first one's artifact and reuses it,
    // while the first is still building (it is held in its build command until released).
    let cfg = gated_config(sync.path(), &counter, "sh main.sh");
    let mut a = ChildBuild::start(
        "exec:generic",
        "same",
        plan.path(),
        work.path(),
        cfg.clone(),
    );
    a.wait_progress("started").await;
    let mut b = ChildBuild::start("exec:generic", "same", plan.path(), work.path(), cfg);
    b.wait_progress("waiting for another build of the same artifact to finish")
        .await;
    fs::write(sync.path().join("release"), "").unwrap();
    let ((a_cached, a_art), (b_cached, b_art)) = tokio::join!(a.finish(), b.finish());
    assert_eq!(a_art, b_art);
    assert!(
        !a_cached && b_cached,
        "the second reuses the first's artifact"
    );
    assert_eq!(fs::read_to_string(&counter).unwrap(), "built\n");
    let events = run_instance(&a_art, "same", "ok", "", work.path());
    assert!(has_success(&events), "{events:?}");

    // Different builds of the same plan run side by side, each in its own directory: both are
    // inside their build command at the same time before either is released.
    fs::remove_file(sync.path().join("release")).unwrap();
    fs::remove_file(&counter).unwrap();
    let cfg1 = gated_config(sync.path(), &counter, "sh -e main.sh");
    let cfg2 = gated_config(sync.path(), &counter, "sh ./main.sh");
    let mut c = ChildBuild::start("exec:generic", "same", plan.path(), work.path(), cfg1);
    let mut d = ChildBuild::start("exec:generic", "same", plan.path(), work.path(), cfg2);
    c.wait_progress("started").await;
    d.wait_progress("started").await;
    fs::write(sync.path().join("release"), "").unwrap();
    let ((c_cached, c_art), (d_cached, d_art)) = tokio::join!(c.finish(), d.finish());
    assert!(!c_cached && !d_cached);
    assert_ne!(c_art, d_art);
    for art in [&c_art, &d_art] {
        let events = run_instance(art, "same", "ok", "", work.path());
        assert!(has_success(&events), "{events:?}");
    }
    let left: Vec<String> = fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "no temporary entries remain: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_go_builds_in_two_processes() {
    if Command::new("go").arg("version").output().is_err() {
        eprintln!("skipping: no `go` on PATH");
        return;
    }
    let plan = copy_plan("placebo");
    let work = tempfile::tempdir().unwrap();
    let outputs = tempfile::tempdir().unwrap();
    let cfg = json!({"module_path": "github.com/testground/testground/plans/placebo"});
    let a = ChildBuild::start("exec:go", "placebo", plan.path(), work.path(), cfg.clone());
    let b = ChildBuild::start("exec:go", "placebo", plan.path(), work.path(), cfg);
    let ((a_cached, a_art), (b_cached, b_art)) = tokio::join!(a.finish(), b.finish());
    assert_eq!(a_art, b_art);
    assert!(!(a_cached && b_cached), "one of them built it");
    let events = run_instance(&a_art, "placebo", "ok", "", outputs.path());
    assert!(has_success(&events), "{events:?}");
}

/// The value of `TESTGROUND_BUILD_ID` in the environment of `pid`, if it is alive and has one.
fn build_marker_of(pid: u32) -> Option<String> {
    let environ = fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ.split(|b| *b == 0).find_map(|kv| {
        kv.strip_prefix(format!("{}=", tg_builder::BUILD_ID_ENV).as_bytes())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// The build marker of `pid`, a `setsid sleep` started by a build command, once it runs
/// `sleep`: before, it is `setsid` or the shell, and while it execs /proc shows no environment.
async fn wait_marker(pid: u32) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if let Some(m) = build_marker_of(pid).filter(|_| comm.trim() == "sleep") {
            return m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} does not run sleep with a build marker"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// On drop, kills the processes of every build that still has a directory in the work dir: what
/// a failing assertion would otherwise leave running.
struct ReapBuilds<'a>(&'a Path);

impl Drop for ReapBuilds<'_> {
    fn drop(&mut self) {
        // No unwrap: this may run while a failed assertion unwinds.
        let tokens: std::collections::HashSet<String> = fs::read_dir(self.0)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix(".tmp-build-").map(str::to_owned)
            })
            .collect();
        let wait = std::time::Duration::from_secs(5);
        let _ = tg_sys::lifetime::kill_marked(tg_builder::BUILD_ID_ENV, &tokens, 0, wait);
    }
}

fn dot_entries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_engines_build_leaves_nothing_after_the_next_build_starts() {
    let plan = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let sync = tempfile::tempdir().unwrap();
    let (escaped, shell) = (sync.path().join("escaped.pid"), sync.path().join("sh.pid"));
    // The build command leaves a process in its own session (out of reach of a group kill),
    // then blocks.
    let cfg = json!({
        "build_cmd": format!(
            "setsid sleep 300 & echo $! > '{}'; echo $$ > '{}'; echo started; sleep 300",
            escaped.display(),
            shell.display()
        ),
        "exec": "true",
    });
    let _reap = ReapBuilds(work.path());
    let mut engine = ChildBuild::start("exec:generic", "killed", plan.path(), work.path(), cfg);
    engine.wait_progress("started").await;
    let escaped: u32 = fs::read_to_string(&escaped)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let shell: u32 = fs::read_to_string(&shell).unwrap().trim().parse().unwrap();
    let marker = wait_marker(escaped).await;
    let shell_start = tg_sys::proc::start_time(shell as i32).unwrap();

    // The engine dies without any chance to clean up.
    engine.child.start_kill().unwrap();
    engine.child.wait().await.unwrap();
    // The kernel kills the build command with its parent (PR_SET_PDEATHSIG).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tg_sys::lifetime::is_alive(shell, shell_start) {
        assert!(
            std::time::Instant::now() < deadline,
            "the build command outlived the engine"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // What it cannot reach is still there: the escaped process and the build's directories.
    assert_eq!(build_marker_of(escaped).as_deref(), Some(marker.as_str()));
    assert_eq!(
        dot_entries(work.path()),
        vec![format!(".tmp-build-{marker}")]
    );
    let generic_dirs = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".d"))
            .collect()
    };
    assert_eq!(
        generic_dirs(work.path()).len(),
        1,
        "the half-built generic directory"
    );

    // The next build, of anything, cleans up first.
    let other = input(
        "exec:generic",
        "other",
        plan.path(),
        work.path(),
        json!({"exec": "true"}),
    );
    build_ok(&other).await;
    assert_eq!(
        build_marker_of(escaped),
        None,
        "the escaped process is gone"
    );
    assert!(
        dot_entries(work.path()).is_empty(),
        "{:?}",
        dot_entries(work.path())
    );
    let left = generic_dirs(work.path());
    assert!(
        left.len() == 1 && left[0].starts_with("exec-generic--other-"),
        "only the new build's directory remains: {left:?}"
    );
}

#[tokio::test]
async fn processes_that_leave_the_group_end_with_their_build() {
    let plan = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let sync = tempfile::tempdir().unwrap();
    let pid_file = sync.path().join("escaped.pid");
    // A finished build: its command left a daemon in its own session behind.
    let cfg = json!({
        "build_cmd": format!("setsid sleep 300 & echo $! > '{}'", pid_file.display()),
        "exec": "true",
    });
    let inp = input("exec:generic", "daemonizes", plan.path(), work.path(), cfg);
    build_ok(&inp).await;
    let escaped: u32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        build_marker_of(escaped),
        None,
        "gone when the build returned"
    );

    // A canceled build: same, while the build command is still running.
    let cfg = json!({
        "build_cmd": format!(
            "setsid sleep 300 & echo $! > '{}'; echo started; sleep 300",
            pid_file.display()
        ),
        "exec": "true",
    });
    let inp = input("exec:generic", "canceled", plan.path(), work.path(), cfg);
    let _reap = ReapBuilds(work.path());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let task = {
        let cancel = cancel.clone();
        tokio::spawn(async move { build(&inp, &tx, &cancel).await })
    };
    while let Some(line) = rx.recv().await {
        if line == "started" {
            break;
        }
    }
    let escaped: u32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_marker(escaped).await;
    cancel.cancel();
    let res = task.await.unwrap();
    assert!(matches!(res, Err(BuildError::Canceled)), "{res:?}");
    assert_eq!(
        build_marker_of(escaped),
        None,
        "gone when the build returned"
    );
    assert!(dot_entries(work.path()).is_empty());
}
