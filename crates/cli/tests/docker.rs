//! End-to-end tests of the Docker builders and the `local:docker` runner through the real
//! `testground` binary: the seed's own plan and command, the original's outcome cases
//! (placebo), shaping and isolation (our SDK), plans on the published sdk-rust and sdk-js, and
//! cleanup after success, failure, timeout, Ctrl-C, `terminate` and a killed engine, checked by
//! listing the run's own objects (containers by label, processes, cgroup, host link, temp
//! dirs).
//!
//! Needs root and a Docker engine: skips with a reason otherwise, fails instead when
//! `TG_REQUIRE_PRIVILEGED=1`. The tests share one home (so that builds are cached between
//! them, as a user's are) and take a lock so that their runs do not compete for the cores.

mod common;

use std::process::{Child, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{Home, host_link_of, ping_rtts, processes_of_run, temp_dirs, text};

static SERIAL: Mutex<()> = Mutex::new(());

/// Root (instance networks) and an engine that answers.
fn ready() -> bool {
    let strict = std::env::var("TG_REQUIRE_PRIVILEGED").as_deref() == Ok("1");
    let reason = if !nix::unistd::geteuid().is_root() {
        Some("local:docker needs root".to_string())
    } else {
        block_on(tg_docker::Docker::connect())
            .err()
            .map(|e| e.to_string())
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

/// The home every test here shares: its builds are cached across tests.
fn home() -> &'static Home {
    static HOME: OnceLock<Home> = OnceLock::new();
    HOME.get_or_init(|| {
        let h = Home::shared("tg-docker-tests-home");
        for plan in [
            "my-plan",
            "outcomes",
            "placebo",
            "netns-examples",
            "rust-sdk-tcp",
            "example-js",
        ] {
            h.import(plan);
        }
        // docker:generic plans on the runtime image: instances that only sleep, that connect
        // to each of their additional hosts on port 5678, that answer "hello" on the port
        // their environment names.
        busybox_plan(&h, "sleeper", "", r#"["sleep", "600"]"#);
        busybox_plan(
            &h,
            "asker",
            "",
            r#"["sh", "-c", "for h in $(echo $ADDITIONAL_HOSTS | tr , ' '); do echo asking $h; nc $h 5678; done"]"#,
        );
        busybox_plan(
            &h,
            "listener",
            "exposed_ports = { http = 8080 }\n",
            r#"["sh", "-c", "exec nc -ll -p $HTTP_PORT -e echo hello"]"#,
        );
        h
    })
}

/// Imports a `docker:generic` plan `name` (case `run`) whose image is the default busybox with
/// `entrypoint` (a JSON list), and `runner_config` in its `[runners."local:docker"]`.
fn busybox_plan(h: &Home, name: &str, runner_config: &str, entrypoint: &str) {
    let src = h.plan_src(
        name,
        &format!(
            "name = \"{name}\"\n[builders.\"docker:generic\"]\n[runners.\"local:docker\"]\n\
             {runner_config}[[testcases]]\nname = \"run\"\ninstances = {{ min = 1, max = 50 }}\n"
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

/// Runs `f` to its end on a runtime of its own (the tests are synchronous).
fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
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
        "local:docker",
        "-i",
        n,
        "--wait",
    ]
}

fn run_id_of(o: &Output) -> String {
    common::queued_id(o)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Containers (any state) labelled with the run's id.
fn containers_of(run_id: &str) -> Vec<String> {
    block_on(async {
        let d = tg_docker::Docker::connect().await.unwrap();
        d.containers_with(&[(tg_docker::labels::RUN_ID, run_id)])
            .await
            .unwrap()
            .into_iter()
            .map(|c| {
                format!(
                    "{} ({})",
                    c.name,
                    if c.running { "running" } else { "stopped" }
                )
            })
            .collect()
    })
}

/// What is left of run `id`: containers, processes, temp dirs, host link.
fn leftovers(id: &str, link: Option<&str>) -> Vec<String> {
    let mut left = Vec::new();
    let c = containers_of(id);
    if !c.is_empty() {
        left.push(format!("containers {c:?}"));
    }
    let p = processes_of_run(id);
    if !p.is_empty() {
        left.push(format!("processes {p:?}"));
    }
    let t = temp_dirs(id);
    if !t.is_empty() {
        left.push(format!("temp dirs {t:?}"));
    }
    if let Some(l) = link
        && std::path::Path::new("/sys/class/net").join(l).exists()
    {
        left.push(format!("host link {l}"));
    }
    left
}

fn assert_nothing_left(id: &str, link: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = leftovers(id, link);
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!("run {id} left {left:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_run_left_nothing(o: &Output) {
    let link = host_link_of(o);
    assert!(link.is_some(), "the run names its host link: {}", text(o));
    assert_nothing_left(&run_id_of(o), link.as_deref());
}

/// The seed's plan with its manifest as printed, and the seed's own command.
#[test]
fn the_seeds_ping_pong_passes_with_its_command_and_rtts_in_range() {
    if !ready() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = home();
    let out = home.tg(&[
        "run",
        "single",
        "--builder",
        "docker:go",
        "--runner",
        "local:docker",
        "-i",
        "2",
        "--plan",
        "my-plan",
        "--testcase",
        "ping-pong",
        "--wait",
    ]);
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
    // The original's line: `MESSAGE << single[000] (a5d263) >> ...`, with the container's
    // short id.
    let tagged = s
        .lines()
        .filter_map(|l| l.split("MESSAGE << single[000] (").nth(1))
        .filter(|rest| {
            rest.len() > 8
                && rest[..6].chars().all(|c| c.is_ascii_hexdigit())
                && rest[6..].starts_with(") >> ")
        })
        .count();
    assert!(tagged > 3, "{s}");
    assert_run_left_nothing(&out);
}

/// One case per way an instance can end (sdk-go, outcomes from the `run_events` topic): a
/// success, a failure, a panic, an instance that exits 0 without an outcome (the original's
/// issue 1349), and one that stalls past the run timeout. Then the original's placebo plan,
/// whose manifest enables only exec:go and local:netns, built by their counterparts: its
/// success is only printed (no sync client), so under a container runner it fails, as under
/// the original's local:docker.
#[test]
fn outcomes_ok_fail_panic_silent_and_stall() {
    if !ready() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = home();
    for (case, expect_ok, needle) in [
        ("ok", true, "outcome = success (single:2/2)"),
        ("fail", false, "outcome = failure (single:0/2)"),
        ("panic", false, "outcome = failure (single:0/2)"),
        ("silent-exit", false, "outcome = failure (single:0/2)"),
        (
            "stall",
            false,
            "run canceled after reaching the task timeout",
        ),
    ] {
        let mut args = run_args("outcomes", case, "docker:go", "2");
        if case == "stall" {
            args.extend(["--run-cfg", "run_timeout=8s"]);
        }
        let out = home.tg(&args);
        assert_eq!(out.status.success(), expect_ok, "{case}: {}", text(&out));
        assert!(stdout(&out).contains(needle), "{case}: {}", text(&out));
        assert_run_left_nothing(&out);
    }

    let out = home.tg(&run_args("placebo", "ok", "docker:go", "1"));
    let s = stdout(&out);
    assert!(!out.status.success(), "{}", text(&out));
    for needle in [
        "enables builder exec:go, not docker:go",
        "enables runner local:netns, not local:docker",
        "1 instances printed success but 0 published it",
        "outcome = failure (single:0/1)",
    ] {
        assert!(s.contains(needle), "{needle}: {}", text(&out));
    }
    assert_run_left_nothing(&out);
}

/// Shaping under local:docker as under local:netns (our SDK, built by docker:rust): drop and
/// reject partitions, per-link latency, and a data network that the control network does not
/// reach.
#[test]
fn partitions_per_link_latency_and_isolation() {
    if !ready() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = home();
    for (case, n, expect) in [
        ("partition", "3", "drop: connect to"),
        ("per-link", "3", "rtt to instance 3"),
        ("isolation", "2", "control 192.18."),
    ] {
        let out = home.tg(&run_args("netns-examples", case, "docker:rust", n));
        let s = stdout(&out);
        assert!(out.status.success(), "{case}: {}", text(&out));
        assert!(
            s.contains(&format!("outcome = success (single:{n}/{n})")),
            "{s}"
        );
        assert!(s.contains(expect), "{case}: {s}");
        assert_run_left_nothing(&out);
    }
}

/// Plans on the published sdk-rust and sdk-js.
#[test]
fn sdk_rust_and_sdk_js_plans() {
    if !ready() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = home();
    let out = home.tg(&run_args("rust-sdk-tcp", "tcp-connect", "docker:rust", "2"));
    let s = stdout(&out);
    assert!(out.status.success(), "{}", text(&out));
    assert!(s.contains("got pong from"), "{s}");
    assert_run_left_nothing(&out);

    let out = home.tg(&run_args("example-js", "pingpong", "docker:node", "2"));
    let s = stdout(&out);
    assert!(out.status.success(), "{}", text(&out));
    assert!(s.contains("outcome = success (single:2/2)"), "{s}");
    assert!(s.contains("rtt to 100."), "{s}");
    assert_run_left_nothing(&out);

    let out = home.tg(&run_args("example-js", "failure", "docker:node", "1"));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("outcome = failure (single:0/1)"),
        "{}",
        text(&out)
    );
    assert_run_left_nothing(&out);
}

/// Starts 3 sleeping instances in the background; returns the CLI and the run id once every
/// container runs.
fn start_sleepers(home: &Home) -> (Child, String) {
    let mut child = home
        .cmd()
        .args(run_args("sleeper", "run", "docker:generic", "3"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = common::wait_for_run(home, &mut child, Duration::from_secs(300), |id| {
        containers_of(id)
            .iter()
            .filter(|c| c.ends_with("(running)"))
            .count()
            == 6
    });
    (child, id)
}

#[test]
fn ctrl_c_terminate_a_killed_engine_and_keep_containers() {
    if !ready() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = home();

    // Ctrl-C.
    let (child, id) = start_sleepers(home);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert_nothing_left(&id, host_link_of(&out).as_deref());

    // `testground terminate` from another process.
    let (child, id) = start_sleepers(home);
    let t = home.tg(&["terminate", "--runner", "local:docker"]);
    assert!(t.status.success(), "{}", text(&t));
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert_nothing_left(&id, host_link_of(&out).as_deref());

    // SIGKILL of the engine: its containers outlive it until the next run of this home.
    let (mut child, id) = start_sleepers(home);
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        containers_of(&id).len(),
        6,
        "pause and instance containers stay"
    );
    let mut args = run_args("sleeper", "run", "docker:generic", "1");
    args.extend(["--run-cfg", "run_timeout=1s"]);
    let next = home.tg(&args);
    assert!(
        stdout(&next).contains("removed 6 containers left by runs whose engine is gone"),
        "{}",
        text(&next)
    );
    assert_nothing_left(&id, host_link_of(&out).as_deref());
    assert_run_left_nothing(&next);

    // keep_containers: the run's containers stay, stopped, until `terminate`.
    let mut args = run_args("sleeper", "run", "docker:generic", "2");
    args.extend([
        "--run-cfg",
        "run_timeout=1s",
        "--run-cfg",
        "keep_containers=true",
    ]);
    let out = home.tg(&args);
    let id = run_id_of(&out);
    let kept = containers_of(&id);
    assert_eq!(kept.len(), 4, "{kept:?}\n{}", text(&out));
    assert!(kept.iter().all(|c| c.ends_with("(stopped)")), "{kept:?}");
    let t = home.tg(&["terminate", "--runner", "local:docker"]);
    assert!(t.status.success(), "{}", text(&t));
    assert_nothing_left(&id, host_link_of(&out).as_deref());
}

/// `exposed_ports`: `<LABEL>_PORT` in the instance's environment, and the port reachable from
/// the host at the address the run log prints.
#[test]
fn exposed_ports_reach_instances_from_the_host() {
    if !ready() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = home();
    let mut child = home
        .cmd()
        .args(run_args("listener", "run", "docker:generic", "2"))
        .args(["--run-cfg", "run_timeout=120s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut addrs = Vec::new();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while addrs.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            panic!("no exposed-port lines in:\n{}", seen.join("\n"));
        };
        if let Some(rest) = line.split("exposed port http (8080) of single[").nth(1) {
            let addr = rest.split(" at ").nth(1).unwrap().trim().to_string();
            addrs.push(addr);
        }
        seen.push(line);
    }
    for addr in &addrs {
        let mut got = String::new();
        let until = Instant::now() + Duration::from_secs(30);
        // The instance may still be starting: retry until it answers.
        while got.is_empty() && Instant::now() < until {
            if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                use std::io::Read;
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s.read_to_string(&mut got);
            }
            if got.is_empty() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        assert_eq!(got.trim(), "hello", "from {addr}");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    let rest: Vec<String> = rx.try_iter().collect();
    let id = seen
        .iter()
        .chain(&rest)
        .find_map(|l| l.split("run is queued with ID: ").nth(1))
        .map(|s| s.split_whitespace().next().unwrap().to_string())
        .unwrap();
    assert_nothing_left(&id, None);
}

/// Each builder through the binary: a build, then a second one of the same sources that finds
/// its image (`"cached": true`); and the health check names the engine and the base images.
#[test]
fn each_builder_caches_and_the_healthcheck_reports() {
    if !ready() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = home();
    for (plan, builder) in [
        ("my-plan", "docker:go"),
        ("sleeper", "docker:generic"),
        ("example-js", "docker:node"),
        ("rust-sdk-tcp", "docker:rust"),
    ] {
        let args = [
            "build",
            "single",
            "--plan",
            plan,
            "--builder",
            builder,
            "--wait",
        ];
        let first = home.tg(&args);
        assert!(first.status.success(), "{builder}: {}", text(&first));
        assert!(
            stdout(&first).contains("build succeeded"),
            "{builder}: {}",
            text(&first)
        );
        let second = home.tg(&args);
        assert!(second.status.success(), "{builder}: {}", text(&second));
        assert!(
            stdout(&second).contains("\"cached\": true"),
            "{builder}: the second build is a cache hit: {}",
            text(&second)
        );
    }
    let out = home.tg(&["healthcheck", "--runner", "local:docker"]);
    let s = stdout(&out);
    assert!(out.status.success(), "{}", text(&out));
    assert!(s.contains("- docker engine: ok;"), "{s}");
    assert!(s.contains(tg_docker::base::PAUSE), "{s}");
    assert!(s.contains(tg_docker::base::GOLANG), "{s}");
}

/// A container this test runs on a Docker network of its own, removed with the network when
/// dropped.
struct EchoContainer {
    name: String,
    network: String,
}

impl EchoContainer {
    /// Answers "hello from echo" on TCP port 5678 (exposed), as the original's `http-echo`.
    fn start() -> EchoContainer {
        use tg_docker::bollard::models::{ContainerCreateBody, HostConfig, NetworkCreateRequest};
        let me = EchoContainer {
            name: format!("tg-test-echo-{}", std::process::id()),
            network: format!("tg-test-net-{}", std::process::id()),
        };
        block_on(async {
            let d = tg_docker::Docker::connect().await.unwrap();
            d.api()
                .create_network(NetworkCreateRequest {
                    name: me.network.clone(),
                    driver: Some("bridge".into()),
                    ..Default::default()
                })
                .await
                .unwrap();
            let opts =
                tg_docker::bollard::query_parameters::CreateContainerOptionsBuilder::default()
                    .name(&me.name)
                    .build();
            d.api()
                .create_container(
                    Some(opts),
                    ContainerCreateBody {
                        image: Some(tg_docker::base::BUSYBOX.into()),
                        cmd: Some(
                            ["nc", "-ll", "-p", "5678", "-e", "echo", "hello from echo"]
                                .map(String::from)
                                .to_vec(),
                        ),
                        exposed_ports: Some(vec!["5678/tcp".into()]),
                        host_config: Some(HostConfig {
                            network_mode: Some(me.network.clone()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            d.api()
                .start_container(
                    &me.name,
                    None::<tg_docker::bollard::query_parameters::StartContainerOptions>,
                )
                .await
                .unwrap();
        });
        me
    }
}

impl Drop for EchoContainer {
    fn drop(&mut self) {
        block_on(async {
            if let Ok(d) = tg_docker::Docker::connect().await {
                let _ = d.remove_container(&self.name).await;
                let _ = d.api().remove_network(&self.network).await;
            }
        });
    }
}

/// `additional_hosts`: an instance reaches a container on another Docker network by name, on
/// its exposed port, and `ADDITIONAL_HOSTS` names it; an unknown container is a clear error.
#[test]
fn additional_hosts_are_reached_by_name() {
    if !ready() {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let home = home();
    let echo = EchoContainer::start();
    let mut args = run_args("asker", "run", "docker:generic", "2");
    let cfg = format!("additional_hosts={}", echo.name);
    args.extend(["--run-cfg", &cfg, "--run-cfg", "run_timeout=60s"]);
    let out = home.tg(&args);
    let s = stdout(&out);
    // The plan has no SDK: its outcome is a failure; what matters is what it printed.
    for i in 0..2 {
        assert!(
            s.lines().any(|l| l.contains(&format!("single[00{i}]"))
                && l.ends_with(&format!(">> asking {}", echo.name))),
            "{}",
            text(&out)
        );
        assert!(
            s.lines().any(|l| l.contains(&format!("single[00{i}]"))
                && l.ends_with(">> hello from echo")),
            "instance {i} reached the echo container: {}",
            text(&out)
        );
    }
    assert_run_left_nothing(&out);

    let mut args = run_args("asker", "run", "docker:generic", "1");
    args.extend(["--run-cfg", "additional_hosts=tg-test-no-such-container"]);
    let out = home.tg(&args);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("additional_hosts: tg-test-no-such-container: no such container"),
        "{}",
        text(&out)
    );
    drop(echo);
}
