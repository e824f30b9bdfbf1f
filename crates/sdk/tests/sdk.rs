//! Integration tests of the SDK: parameters, event and metric files, invoke outcomes, and the
//! sync and network clients against the real tg-sync server on 127.0.0.1.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tg_sdk::{
    CaseResult, Event, InitContext, LinkShape, NetworkConfig, Outcome, ParamError, RunEnv,
    RunParams, SyncClient, TestCase, run_cases,
};

fn params(case: &str, dir: &Path, extra: &[(&str, &str)]) -> RunParams {
    let mut vars = vec![
        ("TEST_PLAN".to_owned(), "example-sdk".to_owned()),
        ("TEST_CASE".to_owned(), case.to_owned()),
        ("TEST_RUN".to_owned(), "run1".to_owned()),
        ("TEST_GROUP_ID".to_owned(), "single".to_owned()),
        ("TEST_INSTANCE_COUNT".to_owned(), "1".to_owned()),
        ("TEST_GROUP_INSTANCE_COUNT".to_owned(), "1".to_owned()),
        ("TEST_SIDECAR".to_owned(), "false".to_owned()),
        ("TEST_SUBNET".to_owned(), "127.1.0.0/16".to_owned()),
        (
            "TEST_OUTPUTS_PATH".to_owned(),
            dir.to_string_lossy().into_owned(),
        ),
    ];
    for (k, v) in extra {
        vars.retain(|(name, _)| name != k);
        vars.push(((*k).to_owned(), (*v).to_owned()));
    }
    RunParams::from_vars(vars).unwrap()
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn events(dir: &Path) -> Vec<Value> {
    lines(&dir.join("run.out"))
}

fn event_kinds(dir: &Path) -> Vec<String> {
    events(dir)
        .iter()
        .map(|l| {
            l["event"]
                .as_object()
                .unwrap()
                .keys()
                .next()
                .unwrap()
                .clone()
        })
        .collect()
}

#[test]
fn typed_params_and_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = params(
        "x",
        dir.path(),
        &[(
            "TEST_INSTANCE_PARAMS",
            "s=hello|i=-42|f=2.5|b=TRUE|size=4KiB|mb=1MB|j={\"a\":[1,2]}|sa=[\"x\",\"y\"]|ia=[1,2,3]|eq=a=b|bad=zz",
        )],
    );
    assert_eq!(p.string_param("s").unwrap(), "hello");
    assert_eq!(p.int_param("i").unwrap(), -42);
    assert_eq!(p.float_param("f").unwrap(), 2.5);
    assert!(p.bool_param("b").unwrap());
    assert_eq!(p.size_param("size").unwrap(), 4096);
    assert_eq!(p.size_param("mb").unwrap(), 1_000_000);
    #[derive(Deserialize, PartialEq, Debug)]
    struct J {
        a: Vec<u8>,
    }
    assert_eq!(p.json_param::<J>("j").unwrap(), J { a: vec![1, 2] });
    assert_eq!(p.string_array_param("sa").unwrap(), vec!["x", "y"]);
    assert_eq!(p.int_array_param("ia").unwrap(), vec![1, 2, 3]);
    assert_eq!(p.string_param("eq").unwrap(), "a=b");
    assert!(p.is_param_set("bad"));
    assert!(!p.is_param_set("nope"));

    let missing = p.int_param("nope").unwrap_err();
    assert!(matches!(missing, ParamError::Missing { .. }));
    assert!(missing.to_string().contains("\"nope\""), "{missing}");
    for err in [
        p.int_param("bad").unwrap_err(),
        p.float_param("bad").unwrap_err(),
        p.bool_param("bad").unwrap_err(),
        p.size_param("bad").unwrap_err(),
        p.int_array_param("bad").unwrap_err(),
        p.json_param::<J>("bad").unwrap_err(),
    ] {
        assert!(err.to_string().contains("\"bad\""), "{err}");
    }
}

#[test]
fn environment_parsing() {
    let p = RunParams::from_vars([
        ("TEST_INSTANCE_COUNT", "3"),
        ("TEST_SIDECAR", "1"),
        ("TEST_SUBNET", "100.64.0.0/16"),
        ("SYNC_SERVICE_PORT", "6060"),
        ("TEST_CAPTURE_PROFILES", "cpu=|heap=5s"),
    ])
    .unwrap();
    assert_eq!(p.test_instance_count, 3);
    assert!(p.test_sidecar);
    assert_eq!(p.sync_url(), "ws://testground-sync-service:6060");
    assert_eq!(p.test_capture_profiles["heap"], "5s");
    assert!(p.test_instance_params.is_empty());
    for bad in [
        ("TEST_INSTANCE_COUNT", "many"),
        ("TEST_SUBNET", "not-a-cidr"),
        ("SYNC_SERVICE_PORT", "99999"),
        ("TEST_INSTANCE_PARAMS", "a=1|b"),
    ] {
        let err = RunParams::from_vars([bad]).unwrap_err();
        assert!(err.to_string().contains(bad.0) || bad.0 == "TEST_INSTANCE_PARAMS");
    }
}

#[test]
fn success_writes_start_then_success_lines_in_sdk_go_format() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = run_cases(
        params("ok", dir.path(), &[]),
        [(
            "ok",
            TestCase::plain(|env: &RunEnv| {
                env.record_message(format!("hello {}", 1));
                Ok(())
            }),
        )],
    );
    assert_eq!(outcome, Outcome::Success);
    assert_eq!(outcome.exit_code(), 0);
    let ev = events(dir.path());
    assert_eq!(
        event_kinds(dir.path()),
        ["start_event", "message_event", "success_event"]
    );
    for line in &ev {
        let keys: Vec<_> = line.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["ts", "msg", "group_id", "run_id", "event"]);
        assert!(line["ts"].as_i64().unwrap() > 1_600_000_000_000_000_000);
        assert_eq!(line["msg"], "");
        assert_eq!(line["group_id"], "single");
        assert_eq!(line["run_id"], "run1");
    }
    let runenv = &ev[0]["event"]["start_event"]["runenv"];
    assert_eq!(runenv["plan"], "example-sdk");
    assert_eq!(runenv["network"], "127.1.0.0/16");
    assert_eq!(ev[1]["event"]["message_event"]["message"], "hello 1");
    assert_eq!(ev[2]["event"]["success_event"]["group"], "single");
    // Every line is also one the runners' parser accepts.
    let text = std::fs::read_to_string(dir.path().join("run.out")).unwrap();
    assert!(
        text.lines()
            .all(|l| tg_api::events::parse_event_line(l).is_some())
    );
}

#[test]
fn failure_is_reported_with_exit_code_zero() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = run_cases(
        params("bad", dir.path(), &[]),
        [(
            "bad",
            TestCase::plain(|env: &RunEnv| {
                env.int_param("missing")?;
                Ok(())
            }),
        )],
    );
    let Outcome::Failure(msg) = &outcome else {
        panic!("{outcome:?}")
    };
    assert!(msg.contains("\"missing\""));
    assert_eq!(outcome.exit_code(), 0);
    let ev = events(dir.path());
    assert_eq!(
        ev.last().unwrap()["event"]["failure_event"]["error"],
        msg.as_str()
    );
}

#[test]
fn panic_is_one_crash_event_with_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = run_cases(
        params("panic", dir.path(), &[]),
        [("panic", TestCase::plain(|_: &RunEnv| panic!("boom {}", 7)))],
    );
    let Outcome::Crash { error, stacktrace } = &outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(error, "boom 7");
    assert!(stacktrace.contains("panicked at"), "{stacktrace}");
    assert_eq!(outcome.exit_code(), 1);
    assert_eq!(event_kinds(dir.path()), ["start_event", "crash_event"]);
    let crash = &events(dir.path())[1]["event"]["crash_event"];
    assert_eq!(crash["error"], "boom 7");
    assert_eq!(crash["group"], "single");
}

#[test]
fn async_panic_and_unknown_case_crash() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = run_cases(
        params("nope", dir.path(), &[]),
        [("ok", TestCase::plain(|_: &RunEnv| Ok(())))],
    );
    assert_eq!(outcome.exit_code(), 1);
    assert!(
        matches!(&outcome, Outcome::Crash { error, .. } if error == "unrecognized test case: nope")
    );
    assert_eq!(event_kinds(dir.path()), ["start_event", "crash_event"]);

    // A panic inside an initialised (async) case, after the sync client was attached.
    let addr = sync_server();
    let dir = tempfile::tempdir().unwrap();
    let extra = sync_vars(addr, 1);
    let extra_ref: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let outcome = run_cases(
        params("apanic", dir.path(), &extra_ref),
        [(
            "apanic",
            TestCase::initialized(async |_: &RunEnv, _: &InitContext| -> CaseResult {
                tokio::task::yield_now().await;
                panic!("async boom")
            }),
        )],
    );
    assert!(matches!(&outcome, Outcome::Crash { error, .. } if error == "async boom"));
    assert_eq!(event_kinds(dir.path()).last().unwrap(), "crash_event");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = SyncClient::connect(
            &format!("ws://{addr}"),
            "run:run1:plan:example-sdk:case:apanic",
        )
        .await
        .unwrap();
        let mut sub = client.subscribe_events().unwrap();
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .expect("no crash event published")
                .unwrap()
                .unwrap();
            if let Event::Crash {
                error, stacktrace, ..
            } = ev
            {
                assert_eq!(error, "async boom");
                assert!(!stacktrace.is_empty());
                break;
            }
        }
        client.close().await;
    });
}

#[test]
fn metrics_files_follow_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = run_cases(
        params("metrics", dir.path(), &[]),
        [(
            "metrics",
            TestCase::plain(|env: &RunEnv| {
                env.r().record_point("rtt,peer=2", 1.5);
                env.r().counter("msgs").inc(3);
                env.r().counter("msgs").inc(2);
                env.r().gauge("peers").update(4.0);
                let h = env.r().histogram("size");
                for v in 1..=100 {
                    h.update(f64::from(v));
                }
                let t = env.r().timer("op");
                let x = t.time(|| 21 * 2);
                assert_eq!(x, 42);
                t.update(Duration::from_millis(3));
                env.d().counter("diag").inc(1);
                Ok(())
            }),
        )],
    );
    assert_eq!(outcome, Outcome::Success);
    let results = lines(&dir.path().join("results.out"));
    let find = |kind: &str| {
        results
            .iter()
            .find(|l| l["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in {results:?}"))
            .clone()
    };
    for l in &results {
        let keys: Vec<_> = l.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["ts", "type", "name", "measures"]);
    }
    let point = find("point");
    assert_eq!(point["name"], "rtt,peer=2");
    assert_eq!(point["measures"]["value"], 1.5);
    assert_eq!(find("counter")["measures"]["count"], 5);
    assert_eq!(find("gauge")["measures"]["value"], 4.0);
    let h = find("histogram");
    let hkeys: BTreeSet<_> = h["measures"].as_object().unwrap().keys().cloned().collect();
    let want: BTreeSet<String> = [
        "count", "max", "mean", "min", "stddev", "variance", "p50", "p75", "p95", "p99", "p999",
        "p9999",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(hkeys, want);
    assert_eq!(h["measures"]["count"], 100);
    assert_eq!(h["measures"]["p50"], 50.5);
    let t = find("timer");
    let tkeys: BTreeSet<_> = t["measures"].as_object().unwrap().keys().cloned().collect();
    let mut twant = want.clone();
    twant.extend(["m1", "m5", "m15", "meanrate"].map(String::from));
    assert_eq!(tkeys, twant);
    assert_eq!(t["measures"]["count"], 2);
    assert!(t["measures"]["max"].as_f64().unwrap() >= 3e6);
    let diag = lines(&dir.path().join("diagnostics.out"));
    assert_eq!(diag.len(), 1);
    assert_eq!(diag[0]["name"], "diag");
}

#[test]
fn raw_assets_land_in_the_outputs_dir() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = run_cases(
        params("output", dir.path(), &[]),
        [(
            "output",
            TestCase::plain(|env: &RunEnv| {
                use std::io::Write;
                let mut f = env.create_raw_asset("data.txt")?;
                writeln!(f, "payload")?;
                Ok(())
            }),
        )],
    );
    assert_eq!(outcome, Outcome::Success);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("data.txt")).unwrap(),
        "payload\n"
    );
}

/// Starts a tg-sync server on its own runtime and thread; returns its address.
fn sync_server() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let service = tg_sync::SyncService::spawn();
            tg_sync::serve(listener, service, std::future::pending()).await;
        });
    });
    rx.recv().unwrap()
}

fn sync_vars(addr: SocketAddr, n: usize) -> Vec<(&'static str, String)> {
    vec![
        ("SYNC_SERVICE_HOST", addr.ip().to_string()),
        ("SYNC_SERVICE_PORT", addr.port().to_string()),
        ("TEST_INSTANCE_COUNT", n.to_string()),
        ("TEST_GROUP_INSTANCE_COUNT", n.to_string()),
    ]
}

#[derive(Serialize, Deserialize, Debug)]
struct Hello {
    seq: u64,
}

async fn all_to_all(env: &RunEnv, ic: &InitContext) -> CaseResult {
    let n = env.test_instance_count;
    ic.wait_all_instances_initialized().await?;
    ic.wait_group_instances_initialized().await?;
    // Target 0 must not reach the wire (it would never be released by anyone).
    ic.sync.barrier("never-signalled", 0).await?;
    let (_, mut live) = ic
        .sync
        .publish_subscribe("live", &Hello { seq: ic.global_seq })
        .await?;
    ic.sync
        .publish("items", &Hello { seq: ic.global_seq })
        .await?;
    let ready = ic.sync.signal_and_wait("published", n as i64).await?;
    env.record_message(format!("published seq {ready}"));
    // Subscribing after everyone published: the history must hold every item.
    let mut late = ic.sync.subscribe::<Hello>("items")?;
    let mut seen = BTreeSet::new();
    let mut seen_live = BTreeSet::new();
    for _ in 0..n {
        seen.insert(late.next().await.ok_or("items ended")??.seq);
        seen_live.insert(live.next().await.ok_or("live ended")??.seq);
    }
    let want: BTreeSet<u64> = (1..=n).collect();
    if seen != want || seen_live != want {
        return Err(format!("saw {seen:?} and {seen_live:?}, want {want:?}").into());
    }
    Ok(())
}

#[test]
fn five_instances_coordinate_through_the_sync_service() {
    const N: usize = 5;
    let addr = sync_server();
    let dirs: Vec<_> = (0..N).map(|_| tempfile::tempdir().unwrap()).collect();
    let handles: Vec<_> = dirs
        .iter()
        .map(|dir| {
            let vars = sync_vars(addr, N);
            let extra: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let p = params("sync", dir.path(), &extra);
            std::thread::spawn(move || run_cases(p, [("sync", TestCase::initialized(all_to_all))]))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), Outcome::Success);
    }
    let mut globals = BTreeSet::new();
    for dir in &dirs {
        let msgs: Vec<String> = events(dir.path())
            .iter()
            .filter_map(|l| {
                l["event"]["message_event"]["message"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        assert!(msgs.contains(&"network initialisation successful".to_owned()));
        let claimed = msgs
            .iter()
            .find(|m| m.starts_with("claimed sequence numbers; global="))
            .unwrap();
        let g: u64 = claimed["claimed sequence numbers; global=".len()..]
            .split(',')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        globals.insert(g);
        assert_eq!(event_kinds(dir.path()).last().unwrap(), "success_event");
    }
    assert_eq!(globals, (1..=N as u64).collect());

    // The terminal events were also published to run_events, with the stage events.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = format!("ws://{addr}");
        let client = SyncClient::connect(&url, "run:run1:plan:example-sdk:case:sync")
            .await
            .unwrap();
        let mut sub = client.subscribe_events().unwrap();
        let (mut successes, mut starts) = (0, 0);
        while successes < N || starts < N {
            let ev = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .expect("run_events incomplete")
                .unwrap()
                .unwrap();
            match ev {
                Event::Success { group } => {
                    assert_eq!(group, "single");
                    successes += 1;
                }
                Event::StageStart { name, .. } => {
                    assert_eq!(name, "network-initialized");
                    starts += 1;
                }
                Event::StageEnd { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        client.close().await;
    });
}

#[test]
fn sidecar_handshake_and_configure_network() {
    let addr = sync_server();
    let dir = tempfile::tempdir().unwrap();
    let mut extra = sync_vars(addr, 1);
    extra.push(("TEST_SIDECAR", "true".into()));
    extra.push(("HOSTNAME", "inst-1".into()));
    extra.push(("TEST_SUBNET", "127.0.0.0/8".into()));
    extra.push(("TEST_CASE", "net".into()));
    let extra_ref: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let p = params("net", dir.path(), &extra_ref);

    // A stand-in sidecar: releases network-initialized, then answers one network config.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sidecar = rt.spawn(async move {
        let client = SyncClient::connect(
            &format!("ws://{addr}"),
            "run:run1:plan:example-sdk:case:net",
        )
        .await
        .unwrap();
        client.signal_entry("network-initialized").await.unwrap();
        let mut configs = client.subscribe::<Value>("network:inst-1").unwrap();
        let cfg = configs.next().await.unwrap().unwrap();
        let state = cfg["callback_state"].as_str().unwrap().to_owned();
        client.signal_entry(&state).await.unwrap();
        client.close().await;
        cfg
    });

    let outcome = run_cases(
        p,
        [(
            "net",
            TestCase::initialized(async |_env: &RunEnv, ic: &InitContext| -> CaseResult {
                let cfg = NetworkConfig {
                    default: LinkShape {
                        latency: Duration::from_millis(100),
                        bandwidth: 1 << 20,
                        ..Default::default()
                    },
                    callback_state: "network-configured".into(),
                    ..Default::default()
                };
                ic.net.configure_network(&cfg).await?;
                let missing = NetworkConfig::default();
                if ic.net.configure_network(&missing).await.is_ok() {
                    return Err("an empty callback_state must be refused".into());
                }
                let ip = ic.net.data_network_ip()?;
                if !ip.is_loopback() {
                    return Err(format!("data ip {ip}").into());
                }
                Ok(())
            }),
        )],
    );
    assert_eq!(outcome, Outcome::Success);
    let cfg = rt.block_on(sidecar).unwrap();
    assert_eq!(
        cfg.to_string(),
        r#"{"network":"default","IPv4":null,"IPv6":null,"enable":true,"default":{"latency":100000000,"jitter":0,"bandwidth":1048576,"filter":0,"loss":0,"corrupt":0,"corrupt_corr":0,"reorder":0,"reorder_corr":0,"duplicate":0,"duplicate_corr":0},"rules":null,"callback_state":"network-configured","routing_policy":""}"#
    );
}

#[test]
fn without_sidecar_configure_network_is_a_warning() {
    let addr = sync_server();
    let dir = tempfile::tempdir().unwrap();
    let extra = sync_vars(addr, 1);
    let extra_ref: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let outcome = run_cases(
        params("nosidecar", dir.path(), &extra_ref),
        [(
            "nosidecar",
            TestCase::initialized(async |_env: &RunEnv, ic: &InitContext| -> CaseResult {
                ic.net.configure_network(&NetworkConfig::default()).await?;
                assert_eq!(ic.net.data_network_ip()?, std::net::Ipv4Addr::LOCALHOST);
                Err("planned failure".into())
            }),
        )],
    );
    assert_eq!(outcome, Outcome::Failure("planned failure".into()));
    let msgs: Vec<Value> = events(dir.path());
    assert!(msgs.iter().any(|l| {
        l["event"]["message_event"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("sidecar-less"))
    }));
}

#[test]
fn unreachable_sync_service_is_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on localhost: nothing listens there.
    let outcome = run_cases(
        params(
            "sync",
            dir.path(),
            &[
                ("SYNC_SERVICE_HOST", "127.0.0.1"),
                ("SYNC_SERVICE_PORT", "1"),
            ],
        ),
        [("sync", TestCase::initialized(all_to_all))],
    );
    assert!(
        matches!(&outcome, Outcome::Crash { error, .. } if error.starts_with("initialisation failed")),
        "{outcome:?}"
    );
}

/// Runs the example plan (plans/example-sdk/src/main.rs, which this package also builds as its
/// `example-sdk` binary) as three processes of the `sync` case against an in-test sync server.
#[test]
fn example_plan_sync_case_as_processes() {
    let bin = env!("CARGO_BIN_EXE_example-sdk");
    const N: usize = 3;
    let addr = sync_server();
    let dirs: Vec<_> = (0..N).map(|_| tempfile::tempdir().unwrap()).collect();
    let children: Vec<_> = dirs
        .iter()
        .map(|dir| {
            std::process::Command::new(bin)
                .env_clear()
                .envs(sync_vars(addr, N))
                .env("TEST_PLAN", "example-sdk")
                .env("TEST_CASE", "sync")
                .env("TEST_RUN", "procs")
                .env("TEST_GROUP_ID", "single")
                .env("TEST_SIDECAR", "false")
                .env("TEST_OUTPUTS_PATH", dir.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // A broken sync path must fail the test, not hang it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for mut child in children {
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("an example-sdk instance did not finish within 60 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(status.success(), "{status}");
    }
    let mut seen = BTreeSet::new();
    for dir in &dirs {
        assert_eq!(event_kinds(dir.path()).last().unwrap(), "success_event");
        for e in events(dir.path()) {
            if let Some(msg) = e["event"]["message_event"]["message"].as_str()
                && msg.starts_with("instance ")
            {
                seen.insert(msg.to_owned());
            }
        }
    }
    // Each instance saw everyone's publish, under distinct sequence numbers.
    let want: BTreeSet<String> = (1..=N)
        .map(|seq| format!("instance {seq} saw all {N} instances"))
        .collect();
    assert_eq!(seen, want);
}

#[tokio::test(start_paused = true)]
async fn aggregates_are_flushed_every_second_and_diagnostics_every_five() {
    let dir = tempfile::tempdir().unwrap();
    let env = RunEnv::new(params("metrics", dir.path(), &[]));
    env.r().counter("msgs").inc(1);
    env.d().gauge("mem").update(7.0);
    let flusher = tokio::spawn(tg_sdk::metrics::flush_periodically(
        env.clone(),
        tg_sdk::metrics::RESULTS_FLUSH,
        tg_sdk::metrics::DIAGNOSTICS_FLUSH,
    ));
    let count = |name: &str| lines(&dir.path().join(name)).len();
    // The paused clock advances exactly to each timer: no real waiting.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(count("results.out"), 3);
    assert_eq!(count("diagnostics.out"), 0);
    env.r().counter("msgs").inc(1);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(count("results.out"), 5);
    assert_eq!(count("diagnostics.out"), 1);
    let results = lines(&dir.path().join("results.out"));
    assert_eq!(results[2]["measures"]["count"], 1);
    assert_eq!(results[3]["measures"]["count"], 2);
    flusher.abort();
}

/// A loopback HTTP server answering 204 to everything; returns its URL and the request bodies.
fn influx_stub() -> (String, std::sync::mpsc::Receiver<(String, String)>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(sock) = sock else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(sock);
                loop {
                    let mut request = String::new();
                    if r.read_line(&mut request).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0;
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    let _ = tx.send((request, String::from_utf8(body).unwrap()));
                    r.get_mut()
                        .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                        .unwrap();
                }
            });
        }
    });
    (url, rx)
}

#[test]
fn with_influxdb_url_every_line_and_lifecycle_event_is_written_as_a_point() {
    let dir = tempfile::tempdir().unwrap();
    let (url, requests) = influx_stub();
    let outcome = run_cases(
        params("metrics", dir.path(), &[("INFLUXDB_URL", &url)]),
        [(
            "metrics",
            TestCase::plain(|env: &RunEnv| {
                env.r().record_point("rtt,peer=2", 1.5);
                env.r().histogram("size").update(3.0);
                env.d().counter("diag").inc(4);
                Ok(())
            }),
        )],
    );
    assert_eq!(outcome, Outcome::Success);
    let mut points = Vec::new();
    while let Ok((request, body)) = requests.try_recv() {
        assert!(
            request.starts_with("POST /write?db=testground&precision=ns "),
            "{request}"
        );
        points.extend(body.lines().map(str::to_owned));
    }
    // Each file line is exactly one point, encoded from the same values and timestamp.
    let tags = tg_api::metrics::PointTags {
        run: "run1",
        group_id: "single",
    };
    let mut want = Vec::new();
    for set in tg_api::metrics::MetricSet::ALL {
        let text = std::fs::read_to_string(dir.path().join(set.file_name())).unwrap();
        for l in text.lines() {
            let m = tg_api::metrics::MetricLine::parse(l).unwrap();
            want.push(
                m.line_protocol(set, "example-sdk", "metrics", tags)
                    .unwrap(),
            );
        }
    }
    assert_eq!(want.len(), 3);
    for w in &want {
        assert!(points.contains(w), "{w} not in {points:#?}");
    }
    assert!(
        points.iter().any(|p| p.starts_with(
            "diagnostics.example-sdk-metrics.diag.counter,group_id=single,run=run1 count=4i "
        )),
        "{points:#?}"
    );
    let events: Vec<_> = points.iter().filter(|p| p.starts_with("events,")).collect();
    assert_eq!(events.len(), 2, "{points:#?}");
    assert!(events[0].contains("event_type=start_event"));
    assert!(events[1].contains("event_type=SuccessEvent"));
    assert_eq!(points.len(), 5, "{points:#?}");
}

#[test]
fn an_unreachable_influxdb_is_one_message_not_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let start = std::time::Instant::now();
    let outcome = run_cases(
        params("metrics", dir.path(), &[("INFLUXDB_URL", &closed)]),
        [(
            "metrics",
            TestCase::plain(|env: &RunEnv| {
                env.r().record_point("x", 1.0);
                Ok(())
            }),
        )],
    );
    assert_eq!(outcome, Outcome::Success);
    assert!(start.elapsed() < Duration::from_secs(5));
    let failures: Vec<_> = events(dir.path())
        .into_iter()
        .filter(|e| {
            e["event"]["message_event"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("influxdb: failed to upload"))
        })
        .collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    // The upload fails as the instance closes, after its outcome (as with sdk-go).
    let kinds = event_kinds(dir.path());
    assert_eq!(
        kinds.iter().filter(|k| *k == "success_event").count(),
        1,
        "{kinds:?}"
    );
}
