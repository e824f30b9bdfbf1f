//! End-to-end tests of `cluster:k8s` on a real Kubernetes cluster (the single-node one
//! `.ci/k8s/cluster.sh up` starts: a real API server, scheduler, kubelet and containerd),
//! through the real `testground` binary: the seed's ping-pong built with `docker:go`, the
//! original's outcome cases, a pod that cannot be scheduled, a run that does not fit, a
//! 2-group composition, `collect`, and cleanup after Ctrl-C and a killed engine, checked by
//! listing the run's pods by label.
//!
//! Needs root, a Docker engine (the builders) and the cluster: its kubeconfig in
//! `TG_K8S_KUBECONFIG` (default `/tmp/tg-k8s/kubeconfig`) and its registry in
//! `TG_K8S_REGISTRY` (default `127.0.0.1:5000`). Skips with a reason otherwise, fails instead
//! when `TG_REQUIRE_PRIVILEGED=1`.

mod common;

use std::path::PathBuf;
use std::process::{Child, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{Home, ping_rtts, text, tgz_entries};
use tg_k8s::k8s_openapi::api::core::v1::{Node, Pod};
use tg_k8s::kube::api::{ListParams, Patch, PatchParams};

static SERIAL: Mutex<()> = Mutex::new(());

fn kubeconfig() -> PathBuf {
    std::env::var_os("TG_K8S_KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/tg-k8s/kubeconfig"))
}

fn registry() -> String {
    std::env::var("TG_K8S_REGISTRY").unwrap_or_else(|_| "127.0.0.1:5000".into())
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A connection to the test cluster. Its client lives on the runtime that made it: connect
/// inside the `block_on` that uses it.
async fn cluster() -> Result<tg_k8s::Cluster, String> {
    let kc = kubeconfig();
    if !kc.exists() {
        return Err(format!(
            "no cluster: {} does not exist (start one with `.ci/k8s/cluster.sh up`)",
            kc.display()
        ));
    }
    tg_k8s::Cluster::connect(Some(&kc), Some("default"))
        .await
        .map_err(|e| e.to_string())
}

/// Root, a Docker engine and the cluster.
fn ready() -> bool {
    let strict = std::env::var("TG_REQUIRE_PRIVILEGED").as_deref() == Ok("1");
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("cluster:k8s needs root (the engine wires the pods' data network)".to_string())
    } else if let Err(e) = block_on(tg_docker::Docker::connect()) {
        Some(e.to_string())
    } else {
        block_on(cluster()).err()
    };
    match reason {
        None => true,
        Some(r) if strict => panic!("TG_REQUIRE_PRIVILEGED=1 but: {r}"),
        Some(r) => {
            eprintln!("skipping: {r}");
            false
        }
    }
}

/// The home the tests share, its `.env.toml` pointing at the cluster.
fn home() -> &'static Home {
    static HOME: OnceLock<Home> = OnceLock::new();
    HOME.get_or_init(|| {
        let h = Home::shared("tg-k8s-tests-home");
        std::fs::write(
            h.path().join(".env.toml"),
            format!(
                "[runners.\"cluster:k8s\"]\nkubeconfig = \"{}\"\npush_registry = \"{}\"\n\
                 testplan_pod_cpu = \"10m\"\ntestplan_pod_memory = \"64Mi\"\n\
                 schedule_timeout = \"10s\"\n",
                kubeconfig().display(),
                registry()
            ),
        )
        .unwrap();
        for plan in ["my-plan", "outcomes"] {
            h.import(plan);
        }
        // docker:generic plans on busybox: one that sleeps, one that needs more memory than
        // its pod may have.
        busybox_plan(&h, "sleeper", r#"["sleep", "600"]"#);
        busybox_plan(
            &h,
            "hog",
            r#"["awk", "BEGIN { s = \"x\"; while (1) s = s s }"]"#,
        );
        h
    })
}

/// Imports a `docker:generic` plan `name` (case `run`) whose image is busybox with
/// `entrypoint` (a JSON list).
fn busybox_plan(h: &Home, name: &str, entrypoint: &str) {
    let src = h.plan_src(
        name,
        &format!(
            "name = \"{name}\"\n[builders.\"docker:generic\"]\n[runners.\"cluster:k8s\"]\n\
             [[testcases]]\nname = \"run\"\ninstances = {{ min = 1, max = 50 }}\n"
        ),
    );
    std::fs::write(
        src.join("Dockerfile"),
        format!(
            "FROM {}\nENTRYPOINT {entrypoint}\n",
            tg_docker::base::BUSYBOX
        ),
    )
    .unwrap();
    let out = h.tg(&["plan", "import", "--from", src.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
}

fn run_args<'a>(plan: &'a str, case: &'a str, builder: &'a str, n: &'a str) -> Vec<&'a str> {
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
        "cluster:k8s",
        "-i",
        n,
        "--wait",
    ]
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The names and phases of the pods labelled with run `id`.
fn pods_of(id: &str) -> Vec<String> {
    block_on(async {
        let c = cluster().await.unwrap();
        c.pods()
            .list(&ListParams::default().labels(&format!("testground.run_id={id}")))
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|p: Pod| {
                format!(
                    "{} ({})",
                    p.metadata.name.unwrap_or_default(),
                    p.status.and_then(|s| s.phase).unwrap_or_default()
                )
            })
            .collect()
    })
}

fn assert_no_pods(id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = pods_of(id);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "run {id} left pods {left:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn run_left_nothing(o: &Output) -> String {
    let id = common::queued_id(o);
    assert_no_pods(&id);
    id
}

/// The seed's plan (its manifest enables local:docker, whose counterpart cluster:k8s is),
/// built with docker:go, on the cluster: RTTs of the 200 ms link, pods tagged in the lines,
/// then `collect` gives the usual archive.
#[test]
fn the_seeds_ping_pong_runs_on_the_cluster_and_collects() {
    if !ready() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = home();
    let out = home.tg(&run_args("my-plan", "ping-pong", "docker:go", "2"));
    let s = stdout(&out);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        s.contains("outcome = success (single:2/2)"),
        "{}",
        text(&out)
    );
    let rtts = ping_rtts(&s);
    assert_eq!(rtts.len(), 2, "{s}");
    for rtt in rtts {
        assert!(
            rtt >= Duration::from_millis(200) && rtt <= Duration::from_millis(250),
            "rtt {rtt:?}"
        );
    }
    assert!(s.contains("MESSAGE << single[000] ("), "{s}");
    let id = run_left_nothing(&out);

    let archive = home.path().join(format!("{id}.tgz"));
    let c = home.tg(&[
        "collect",
        &id,
        "--runner",
        "cluster:k8s",
        "-o",
        archive.to_str().unwrap(),
    ]);
    assert!(c.status.success(), "{}", text(&c));
    let entries = tgz_entries(&archive);
    for i in 0..2 {
        let want = format!("{id}/single/{i}/run.out");
        assert!(entries.contains(&want), "{want} not in {entries:?}");
    }
}

/// The original's outcome cases, a 2-group composition, an OOM-killed pod, a pod the scheduler
/// refuses, and a run that does not fit.
#[test]
fn outcomes_groups_unschedulable_and_capacity() {
    if !ready() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = home();
    for (case, expect_ok, needle) in [
        ("ok", true, "outcome = success (single:2/2)"),
        ("fail", false, "outcome = failure (single:0/2)"),
        ("panic", false, "outcome = failure (single:0/2)"),
        (
            "stall",
            false,
            "run canceled after reaching the task timeout",
        ),
    ] {
        let mut args = run_args("outcomes", case, "docker:go", "2");
        if case == "stall" {
            args.extend(["--run-cfg", "run_timeout=20s"]);
        }
        let out = home.tg(&args);
        assert_eq!(out.status.success(), expect_ok, "{case}: {}", text(&out));
        assert!(stdout(&out).contains(needle), "{case}: {}", text(&out));
        run_left_nothing(&out);
    }

    // Two groups of different sizes.
    let comp = home.path().join("two-groups.toml");
    std::fs::write(
        &comp,
        r#"
[metadata]
name = "two-groups"

[global]
plan = "outcomes"
case = "ok"
builder = "docker:go"
runner = "cluster:k8s"
total_instances = 3

[[groups]]
id = "left"
instances = { count = 1 }

[[groups]]
id = "right"
instances = { count = 2 }
"#,
    )
    .unwrap();
    let out = home.tg(&["run", "composition", "-f", comp.to_str().unwrap(), "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("outcome = success (left:1/1, right:2/2)"),
        "{}",
        text(&out)
    );
    run_left_nothing(&out);

    // A pod that passes its memory limit is OOM-killed: its instance fails with that reason.
    let out = home.tg(&run_args("hog", "run", "docker:generic", "1"));
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("OOM-killed"), "{t}");
    run_left_nothing(&out);

    // A run that cannot fit is refused before any pod exists, with the original's words.
    let mut args = run_args("outcomes", "ok", "docker:go", "2");
    args.extend(["--run-cfg", "testplan_pod_memory=100Ti"]);
    let out = home.tg(&args);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("too many test instances requested, resize cluster"),
        "{}",
        text(&out)
    );

    // A pod the scheduler refuses (the node is tainted meanwhile): the instance fails with
    // the scheduler's reason once schedule_timeout (10 s here) has passed; the run does not
    // wait for its timeout.
    let node_name = block_on(async {
        let c = cluster().await.unwrap();
        c.nodes()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .next()
            .and_then(|n| n.metadata.name)
            .unwrap()
    });
    set_taint(&node_name, true);
    let began = Instant::now();
    let out = home.tg(&run_args("outcomes", "ok", "docker:go", "1"));
    set_taint(&node_name, false);
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("cannot be scheduled"), "{t}");
    assert!(t.contains("outcome = failure (single:0/1)"), "{t}");
    assert!(began.elapsed() < Duration::from_secs(120), "{t}");
    run_left_nothing(&out);
}

fn set_taint(node: &str, on: bool) {
    let taints = if on {
        serde_json::json!([{"key": "testground.test/blocked", "value": "yes", "effect": "NoSchedule"}])
    } else {
        serde_json::json!([])
    };
    let patch = serde_json::json!({"spec": {"taints": taints}});
    block_on(async {
        let c = cluster().await.unwrap();
        c.nodes()
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_: Node| ())
            .unwrap()
    });
}

/// Starts 2 sleeping instances in the background; returns the CLI and the run id once both
/// pods run.
fn start_sleepers(home: &Home) -> (Child, String) {
    let mut child = home
        .cmd()
        .args(run_args("sleeper", "run", "docker:generic", "2"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = common::wait_for_run(home, &mut child, Duration::from_secs(300), |id| {
        pods_of(id)
            .iter()
            .filter(|p| p.ends_with("(Running)"))
            .count()
            == 2
    });
    (child, id)
}

/// Ctrl-C and `terminate` remove the run's pods; a killed engine's pods are removed by the
/// next start.
#[test]
fn ctrl_c_terminate_and_a_killed_engine_leave_no_pod() {
    if !ready() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = home();

    let (child, id) = start_sleepers(home);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert_no_pods(&id);

    // `testground terminate` from another process deletes the run's pods; the run ends.
    let (child, id) = start_sleepers(home);
    let t = home.tg(&["terminate", "--runner", "cluster:k8s"]);
    assert!(t.status.success(), "{}", text(&t));
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert_no_pods(&id);

    let (mut child, id) = start_sleepers(home);
    child.kill().unwrap();
    let _ = child.wait_with_output().unwrap();
    assert_eq!(pods_of(&id).len(), 2, "the pods outlive a killed engine");
    let mut args = run_args("sleeper", "run", "docker:generic", "1");
    args.extend(["--run-cfg", "run_timeout=1s"]);
    let next = home.tg(&args);
    assert!(
        stdout(&next).contains(&format!("removed 2 pods of run {id}, whose engine is gone")),
        "{}",
        text(&next)
    );
    assert_no_pods(&id);
    run_left_nothing(&next);
}

/// `healthcheck --runner cluster:k8s`: API, nodes, registry, and a pod reaching this host.
#[test]
fn healthcheck_reports_the_cluster() {
    if !ready() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = home().tg(&["healthcheck", "--runner", "cluster:k8s"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for needle in ["k8s-api", "k8s-nodes", "k8s-registry", "sync-from-pod"] {
        let line = t
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle} missing: {t}"));
        assert!(line.contains("ok"), "{line}\n{t}");
    }
}

/// On a single-node cluster, images can be loaded into the node's containerd instead of
/// pushed to a registry.
#[test]
fn images_loaded_into_the_nodes_runtime() {
    if !ready() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let sock = std::env::var("TG_K8S_CONTAINERD_SOCK").unwrap_or_else(|_| {
        kubeconfig()
            .with_file_name("containerd")
            .join("containerd.sock")
            .to_string_lossy()
            .into_owned()
    });
    let node_containerd = format!("node_containerd={sock}");
    let mut args = run_args("outcomes", "ok", "docker:go", "2");
    args.extend(["--run-cfg", "push_registry=", "--run-cfg", &node_containerd]);
    let out = home().tg(&args);
    let s = stdout(&out);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        s.contains("loaded 1 images into the node's containerd"),
        "{s}"
    );
    assert!(s.contains("outcome = success (single:2/2)"), "{s}");
    run_left_nothing(&out);
}
