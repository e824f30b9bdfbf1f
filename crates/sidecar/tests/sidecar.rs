//! The sidecar through real sockets: instance namespaces are built by [`RunNetwork`], sockets
//! are opened inside them, configs are published on `network:<hostname>` exactly as an SDK does,
//! and each impairment is measured on the traffic. Needs root: skips with a reason otherwise,
//! fails instead when `TG_REQUIRE_PRIVILEGED=1`.
//!
//! Assertions are on behaviour with margins a loaded CI machine cannot break (a latency is never
//! undershot, rates fall within statistical bounds); precise accuracy is in BENCHMARKS.md.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use serde_json::json;
use tg_sidecar::{Instance, Options, RunNetwork, SidecarEvent};
use tg_sync::SyncService;
use tokio::sync::mpsc;

fn privileged() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        if std::env::var("TG_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
            panic!("TG_REQUIRE_PRIVILEGED=1 but these tests are not running as root");
        }
        eprintln!("skipping: sidecar tests need root (namespaces, TUN)");
    }
    root
}

struct Run {
    net: RunNetwork,
    sync: SyncService,
    prefix: String,
    instances: Vec<Instance>,
    hostnames: Vec<String>,
    _dir: tempfile::TempDir,
    log: mpsc::UnboundedReceiver<SidecarEvent>,
}

async fn run_with(n: u32, seed: u64) -> Run {
    let run_id = format!("t{}", std::process::id()) + &format!("{:x}", fastrand_u64());
    let ordinals: Vec<u32> = (0..n).collect();
    run_on(
        SyncService::spawn(),
        &run_id,
        &ordinals,
        seed,
        Agent::default(),
    )
    .await
}

/// What is particular to one node's agent of a run that spans nodes.
#[derive(Default)]
struct Agent {
    subnet: Option<ipnet::Ipv4Net>,
    forward: Option<SocketAddr>,
    capture: bool,
}

/// A run's network holding instances `ordinals` (instance `i` of the [`Run`] is the `i`-th of
/// them). Runs sharing `sync` and `run_id` are one run's agents on several nodes.
async fn run_on(sync: SyncService, run_id: &str, ordinals: &[u32], seed: u64, agent: Agent) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("run:{run_id}:plan:p:case:c");
    let (tx, log) = mpsc::unbounded_channel();
    let mut net = RunNetwork::create(
        Options {
            // Distinct per agent: the run id picks the host link's slot, and each agent of a
            // run has its own, as on separate nodes.
            run_id: format!("{run_id}-{}", ordinals.first().copied().unwrap_or(0)),
            sync_prefix: prefix.clone(),
            sync: sync.clone(),
            seed,
            capture: agent.capture,
            work_dir: dir.path().join("net"),
            subnet: agent.subnet,
            forward: agent.forward,
        },
        tx,
    )
    .await
    .expect("create the run network");
    // Built as the runners build them: several at a time (the first alone, through
    // `add_instance`, so that both entry points are used).
    let mut instances = Vec::new();
    let mut hostnames = Vec::new();
    let mut specs = Vec::new();
    for &i in ordinals {
        let h = format!("single-{i}-{run_id}");
        let out = dir.path().join(format!("out{i}"));
        std::fs::create_dir_all(&out).unwrap();
        if instances.is_empty() {
            instances.push(net.add_instance(i, &h, &out).await.expect("add instance"));
        } else {
            specs.push(tg_sidecar::InstanceSpec {
                ordinal: i,
                hostname: h.clone(),
                outputs: out,
                netns: None,
                control: tg_sidecar::ControlLink::Veth,
            });
        }
        hostnames.push(h);
    }
    instances.extend(net.add_instances(specs, 4).await.expect("add instances"));
    Run {
        net,
        sync,
        prefix,
        instances,
        hostnames,
        _dir: dir,
        log,
    }
}

async fn run(n: u32) -> Run {
    run_with(n, 1).await
}

/// Distinct run ids for runs in one test process.
fn fastrand_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

impl Run {
    fn addr(&self, i: usize) -> Ipv4Addr {
        self.instances[i].data_addr
    }

    /// Publishes `config` as instance `i` would and waits for the sidecar's callback.
    async fn configure(&self, i: usize, mut config: serde_json::Value) {
        let state = format!("cfg-{i}-{}", fastrand_u64());
        let obj = config.as_object_mut().unwrap();
        obj.entry("network").or_insert(json!("default"));
        obj.entry("enable").or_insert(json!(true));
        obj.entry("default").or_insert(json!({}));
        obj.insert("callback_state".into(), json!(state));
        // Fill the LinkShape fields an SDK always sends.
        let fill = |shape: &mut serde_json::Value| {
            let m = shape.as_object_mut().unwrap();
            for k in ["latency", "jitter", "bandwidth", "filter"] {
                m.entry(k).or_insert(json!(0));
            }
            for k in [
                "loss",
                "corrupt",
                "corrupt_corr",
                "reorder",
                "reorder_corr",
                "duplicate",
                "duplicate_corr",
            ] {
                m.entry(k).or_insert(json!(0.0));
            }
        };
        fill(obj.get_mut("default").unwrap());
        if let Some(rules) = obj.get_mut("rules").and_then(|r| r.as_array_mut()) {
            for r in rules {
                fill(r);
            }
        }
        self.publish(i, &config.to_string()).await;
        tokio::time::timeout(
            Duration::from_secs(10),
            self.sync
                .barrier(&format!("{}:states:{state}", self.prefix), 1),
        )
        .await
        .expect("the sidecar signals the callback state")
        .unwrap();
    }

    /// Publishes `json` (as is) on instance `i`'s `network:<hostname>` topic.
    async fn publish(&self, i: usize, json: &str) {
        let topic = format!("{}:topics:network:{}", self.prefix, self.hostnames[i]);
        let raw = serde_json::value::RawValue::from_string(json.to_string()).unwrap();
        self.sync.publish(&topic, raw).await.unwrap();
    }

    /// Publishes `json` for instance `i`, expects the sidecar to refuse it, and returns the
    /// reason. Proves the refused config's `callback` was never signalled: a good config
    /// published after it is applied (configs are handled in order), and then `callback`
    /// has no signal but ours.
    async fn refused(&mut self, i: usize, json: &str, callback: &str) -> String {
        self.publish(i, json).await;
        self.configure(i, json!({})).await;
        let count = self
            .sync
            .signal_entry(&format!("{}:states:{callback}", self.prefix))
            .await
            .unwrap();
        assert_eq!(
            count, 1,
            "the refused config's callback {callback} was signalled"
        );
        let mut lines = Vec::new();
        loop {
            match self.log.try_recv() {
                Ok(SidecarEvent::ConfigRefused {
                    ordinal,
                    hostname,
                    reason,
                }) => {
                    assert_eq!(ordinal, i as u32);
                    assert_eq!(hostname, self.hostnames[i]);
                    assert!(
                        lines.iter().any(|l: &String| l.contains(&reason)),
                        "the run log says why: {lines:?}"
                    );
                    return reason;
                }
                Ok(SidecarEvent::Log(l)) => lines.push(l),
                Ok(SidecarEvent::ConfigApplied { .. }) => {}
                Err(e) => panic!("no ConfigRefused event for {json}: {e}"),
            }
        }
    }

    fn udp(&self, i: usize, port: u16) -> UdpSocket {
        udp_in(&self.instances[i], port)
    }

    fn listen(&self, i: usize, port: u16) -> TcpListener {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        self.instances[i]
            .netns
            .run(move || TcpListener::bind(addr))
            .unwrap()
            .unwrap()
    }

    fn connect(&self, i: usize, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        self.instances[i]
            .netns
            .run(move || TcpStream::connect_timeout(&to, timeout))
            .unwrap()
    }

    /// Round trips of one datagram from `i` to an echo on `j`.
    fn udp_rtts(&self, i: usize, j: usize, port: u16, count: usize) -> Vec<Duration> {
        udp_rtts_between(&self.instances[i], &self.instances[j], port, count)
    }

    /// Sends `count` numbered datagrams from `i` to `j`, `gap` apart; returns the numbers
    /// received, in arrival order (with duplicates), and the bytes of each.
    fn blast(
        &self,
        i: usize,
        j: usize,
        port: u16,
        count: u32,
        size: usize,
        gap: Duration,
    ) -> Vec<(u32, Vec<u8>)> {
        let rx = self.udp(j, port);
        rx.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        // Room for the whole blast: on a loaded machine the reader may not run for a while, and
        // a full receive buffer would drop datagrams the emulator delivered, as if lost.
        nix::sys::socket::setsockopt(&rx, nix::sys::socket::sockopt::RcvBufForce, &(16 << 20))
            .unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 65536];
            while let Ok((n, _)) = rx.recv_from(&mut buf) {
                let k = u32::from_be_bytes(buf[..4].try_into().unwrap());
                got.push((k, buf[..n].to_vec()));
            }
            got
        });
        let tx = self.udp(i, 0);
        let to = SocketAddr::from((self.addr(j), port));
        let mut payload = vec![0xa5u8; size];
        let start = Instant::now();
        for k in 0..count {
            payload[..4].copy_from_slice(&k.to_be_bytes());
            tx.send_to(&payload, to).unwrap();
            if !gap.is_zero() {
                let due = start + gap * (k + 1);
                while Instant::now() < due {
                    std::thread::yield_now();
                }
            }
        }
        reader.join().unwrap()
    }
}

/// A UDP socket on `port` (0: any) inside instance `inst`'s namespace.
fn udp_in(inst: &Instance, port: u16) -> UdpSocket {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let s = inst
        .netns
        .run(move || UdpSocket::bind(addr))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s
}

/// Round trips of one datagram from `from` to an echo on `to` (of any run's network).
fn udp_rtts_between(from: &Instance, to: &Instance, port: u16, count: usize) -> Vec<Duration> {
    let echo = udp_in(to, port);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        }
    });
    let s = udp_in(from, 0);
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let to = SocketAddr::from((to.data_addr, port));
    let mut rtts = Vec::new();
    let mut buf = [0u8; 64];
    for k in 0..count as u32 {
        let t0 = Instant::now();
        s.send_to(&k.to_be_bytes(), to).unwrap();
        loop {
            let (n, _) = s.recv_from(&mut buf).expect("echo reply");
            if n == 4 && buf[..4] == k.to_be_bytes() {
                break;
            }
        }
        rtts.push(t0.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    t.join().unwrap();
    rtts
}

fn ms(d: u64) -> u64 {
    d * 1_000_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unshaped_instances_reach_each_other_and_nothing_else() {
    if !privileged() {
        return;
    }
    let r = run(2).await;
    let l = r.listen(1, 7000);
    let to = SocketAddr::from((r.addr(1), 7000));
    let mut c = r.connect(0, to, Duration::from_secs(5)).expect("connect");
    let (mut s, _) = l.accept().unwrap();
    c.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    // An address in the data subnet that no instance has: dropped, so the connect times out.
    let nobody = SocketAddr::from((
        Ipv4Addr::new(r.addr(0).octets()[0], r.addr(0).octets()[1], 9, 9),
        7000,
    ));
    let e = r
        .connect(0, nobody, Duration::from_millis(500))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    let stats = r.net.shutdown().await.expect("stats");
    assert!(stats.delivered > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_is_never_undershot() {
    if !privileged() {
        return;
    }
    let r = run(2).await;
    r.configure(0, json!({"default": {"latency": ms(30)}}))
        .await;
    let rtts = tokio::task::block_in_place(|| r.udp_rtts(0, 1, 7001, 10));
    // Only instance 0 is shaped: each round trip crosses its egress once.
    for rtt in &rtts {
        assert!(*rtt >= Duration::from_millis(30), "rtt {rtt:?} < 30ms");
        assert!(*rtt < Duration::from_millis(1000), "rtt {rtt:?}");
    }
    r.configure(1, json!({"default": {"latency": ms(20)}}))
        .await;
    let rtts = tokio::task::block_in_place(|| r.udp_rtts(0, 1, 7001, 10));
    for rtt in &rtts {
        assert!(*rtt >= Duration::from_millis(50), "rtt {rtt:?} < 30+20ms");
    }
    r.net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter_spreads_delays() {
    if !privileged() {
        return;
    }
    let r = run(2).await;
    r.configure(0, json!({"default": {"latency": ms(30), "jitter": ms(20)}}))
        .await;
    let rtts = tokio::task::block_in_place(|| r.udp_rtts(0, 1, 7002, 40));
    let min = rtts.iter().min().unwrap();
    let max = rtts.iter().max().unwrap();
    assert!(*min >= Duration::from_millis(10), "min {min:?}");
    // Uniform in [10, 50] ms: 40 samples spanning less than 15 ms is vanishingly unlikely.
    assert!(
        *max - *min > Duration::from_millis(15),
        "spread {min:?}..{max:?}"
    );
    r.net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_limits_throughput() {
    if !privileged() {
        return;
    }
    let r = run(2).await;
    let bps = 8_000_000u64;
    r.configure(0, json!({"default": {"bandwidth": bps}})).await;
    // 2 s of traffic offered at ~2x the limit; the queue absorbs the excess up to its limit.
    let size = 1000usize;
    let got =
        tokio::task::block_in_place(|| r.blast(0, 1, 7003, 4000, size, Duration::from_micros(500)));
    // Receive-side rate over the interval between arrivals is not observable after the fact,
    // so measure with a second, timed run below instead: here only check the drop happened.
    assert!(got.len() < 4000, "the excess over the rate was dropped");
    drop(got);
    // Timed: bytes on the wire (IP + UDP headers included) per second at the receiver.
    let rx = r.udp(1, 7004);
    rx.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let tx = r.udp(0, 0);
    let to = SocketAddr::from((r.addr(1), 7004));
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 2048];
        let mut first = None;
        let mut last = Instant::now();
        let mut bytes = 0u64;
        let mut n_pk = 0u64;
        while let Ok((n, _)) = rx.recv_from(&mut buf) {
            let now = Instant::now();
            if first.is_none() {
                first = Some(now);
            } else {
                bytes += (n + 28) as u64;
                n_pk += 1;
            }
            last = now;
        }
        (first.map(|f| last - f), bytes, n_pk)
    });
    tokio::task::block_in_place(|| {
        let payload = vec![0u8; size];
        let start = Instant::now();
        // 1.5 s at 1.5x the rate.
        for k in 0..1500u32 {
            tx.send_to(&payload, to).unwrap();
            let due = start + Duration::from_micros(1000) * (k + 1);
            while Instant::now() < due {
                std::thread::yield_now();
            }
        }
    });
    let (span, bytes, n_pk) = reader.join().unwrap();
    let span = span.expect("received");
    let rate = bytes as f64 * 8.0 / span.as_secs_f64();
    assert!(n_pk > 500, "{n_pk} packets");
    let err = (rate - bps as f64).abs() / bps as f64;
    assert!(
        err < 0.05,
        "measured {rate:.0} bit/s vs {bps} (error {:.1}%)",
        err * 100.0
    );
    r.net.shutdown().await;
}

fn distinct(got: &[(u32, Vec<u8>)]) -> std::collections::BTreeSet<u32> {
    got.iter().map(|g| g.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_duplicate_and_corrupt_rates() {
    if !privileged() {
        return;
    }
    let n = 3000u32;
    let gap = Duration::from_micros(100);
    let r = run(2).await;

    r.configure(0, json!({"default": {"loss": 20.0}})).await;
    let got = tokio::task::block_in_place(|| r.blast(0, 1, 7005, n, 200, gap));
    let lost = 1.0 - distinct(&got).len() as f64 / n as f64;
    assert!((0.16..0.24).contains(&lost), "loss {lost}");

    r.configure(0, json!({"default": {"duplicate": 20.0}}))
        .await;
    let got = tokio::task::block_in_place(|| r.blast(0, 1, 7006, n, 200, gap));
    assert_eq!(distinct(&got).len() as u32, n, "duplication loses nothing");
    let dup = got.len() as f64 / n as f64 - 1.0;
    assert!((0.16..0.24).contains(&dup), "duplicates {dup}");

    // A corrupted datagram fails its UDP checksum in the receiving kernel and is discarded,
    // as on a real link: the corruption rate shows as missing datagrams.
    r.configure(0, json!({"default": {"corrupt": 20.0}})).await;
    let got = tokio::task::block_in_place(|| r.blast(0, 1, 7007, n, 200, gap));
    let corrupted = 1.0 - distinct(&got).len() as f64 / n as f64;
    assert!((0.16..0.24).contains(&corrupted), "corrupt {corrupted}");
    assert!(
        got.iter().all(|(_, b)| b[4..].iter().all(|x| *x == 0xa5)),
        "nothing corrupt delivered"
    );
    r.net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reorder_lets_packets_jump_the_queue() {
    if !privileged() {
        return;
    }
    let r = run(2).await;
    r.configure(0, json!({"default": {"latency": ms(10), "reorder": 25.0}}))
        .await;
    let n = 2000u32;
    let got =
        tokio::task::block_in_place(|| r.blast(0, 1, 7008, n, 100, Duration::from_micros(500)));
    assert_eq!(got.len() as u32, n);
    // A packet that skipped the delay overtakes the ~20 sent in the 10 ms before it: those
    // arrive after it, behind a higher number.
    let mut max = 0;
    let mut late = 0;
    for (k, _) in &got {
        if *k < max {
            late += 1;
        }
        max = max.max(*k);
    }
    let jumped = got.windows(2).filter(|w| w[1].0 < w[0].0).count();
    assert!(late > 0 && jumped > 0);
    let rate = jumped as f64 / n as f64;
    // Each reordered packet starts one descent in the arrival order, unless two jump together.
    assert!((0.15..0.30).contains(&rate), "reorder rate {rate}");
    r.net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_drop_reject_and_shape_per_subnet() {
    if !privileged() {
        return;
    }
    let r = run(3).await;
    let _l1 = r.listen(1, 7010);
    let _l2 = r.listen(2, 7010);
    r.configure(
        0,
        json!({"rules": [
            {"subnet": format!("{}/32", r.addr(1)), "filter": 2},
            {"subnet": format!("{}/32", r.addr(2)), "filter": 1},
        ]}),
    )
    .await;
    let t0 = Instant::now();
    let e = r
        .connect(0, (r.addr(2), 7010).into(), Duration::from_secs(5))
        .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "reject fails at once, took {:?}: {e}",
        t0.elapsed()
    );
    assert_ne!(e.kind(), ErrorKind::TimedOut, "{e}");
    let e = r
        .connect(0, (r.addr(1), 7010).into(), Duration::from_millis(1500))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "drop gives no answer: {e}");
    // The other instances are not affected by instance 0's rules.
    r.connect(1, (r.addr(2), 7010).into(), Duration::from_secs(5))
        .expect("1 -> 2");

    // Per-subnet shaping: two peers, two latencies.
    r.configure(
        0,
        json!({"rules": [
            {"subnet": format!("{}/32", r.addr(1)), "latency": ms(10)},
            {"subnet": format!("{}/32", r.addr(2)), "latency": ms(60)},
        ]}),
    )
    .await;
    let to1 = tokio::task::block_in_place(|| r.udp_rtts(0, 1, 7011, 5));
    let to2 = tokio::task::block_in_place(|| r.udp_rtts(0, 2, 7012, 5));
    let m1 = *to1.iter().min().unwrap();
    let m2 = *to2.iter().min().unwrap();
    assert!(m1 >= Duration::from_millis(10), "{m1:?}");
    assert!(m2 >= Duration::from_millis(60), "{m2:?}");
    assert!(m2 > m1 + Duration::from_millis(30), "{m1:?} vs {m2:?}");
    r.net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_change_and_disable() {
    if !privileged() {
        return;
    }
    let mut r = run(2).await;
    let _l = r.listen(1, 7020);
    let old = r.addr(1);
    let o = old.octets();
    let new = Ipv4Addr::new(o[0], o[1], 1, 1);
    r.configure(1, json!({"IPv4": format!("{new}/16")})).await;
    r.connect(0, (new, 7020).into(), Duration::from_secs(5))
        .expect("the new address answers");
    let e = r
        .connect(0, (old, 7020).into(), Duration::from_millis(500))
        .unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::TimedOut,
        "the old address is gone: {e}"
    );
    // A taken or foreign address is refused, its callback never signalled (as the original),
    // and the runner told why.
    let taken = json!({"network": "default", "enable": true, "default": {},
        "IPv4": format!("{}/16", r.addr(0)), "callback_state": "taken"});
    let reason = r.refused(1, &taken.to_string(), "taken").await;
    assert!(reason.contains("not applied"), "{reason}");
    let foreign = json!({"network": "default", "enable": true, "default": {},
        "IPv4": "10.1.2.3/16", "callback_state": "foreign"});
    let reason = r.refused(1, &foreign.to_string(), "foreign").await;
    assert!(
        reason.contains("10.1.2.3") && reason.contains("outside"),
        "{reason}"
    );
    r.connect(0, (new, 7020).into(), Duration::from_secs(5))
        .expect("still at the new address");

    r.configure(1, json!({"enable": false})).await;
    let e = r
        .connect(0, (new, 7020).into(), Duration::from_millis(500))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "disabled: {e}");
    r.configure(1, json!({"enable": true})).await;
    r.connect(0, (new, 7020).into(), Duration::from_secs(5))
        .expect("enabled again");
    r.net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_loss_pattern() {
    if !privileged() {
        return;
    }
    let pattern = |seed: u64| async move {
        let r = run_with(2, seed).await;
        r.configure(0, json!({"default": {"loss": 30.0}})).await;
        let got = tokio::task::block_in_place(|| {
            r.blast(0, 1, 7030, 400, 100, Duration::from_micros(300))
        });
        r.net.shutdown().await;
        distinct(&got)
    };
    let a = pattern(7).await;
    let b = pattern(7).await;
    let c = pattern(8).await;
    assert!(a.len() < 400 && a.len() > 200);
    assert_eq!(a, b, "same seed, same datagrams lost");
    assert_ne!(a, c, "another seed, another pattern");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_are_isolated() {
    if !privileged() {
        return;
    }
    let a = run(1).await;
    let b = run(1).await;
    assert_ne!(a.net.subnet(), b.net.subnet());
    let _l = b.listen(0, 7040);
    let e = a
        .connect(0, (b.addr(0), 7040).into(), Duration::from_millis(700))
        .unwrap_err();
    // Another run's subnet is not even routed inside an instance; were it routed, the run's
    // emulator would drop it (no instance of the run has that address).
    assert!(
        matches!(
            e.kind(),
            ErrorKind::NetworkUnreachable | ErrorKind::TimedOut
        ),
        "{e}"
    );
    a.net.shutdown().await;
    b.net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_policy_gates_the_host() {
    if !privileged() {
        return;
    }
    if std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var("TG_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
            panic!("nft is missing (apt install nftables)");
        }
        eprintln!("skipping: allow_all needs nft");
        return;
    }
    let r = run(1).await;
    let host = r.net.host_addr().expect("a host link");
    // A server on the host side, on the run's own host link address only.
    let server = TcpListener::bind((host, 0)).unwrap();
    let port = server.local_addr().unwrap().port();
    let e = r
        .connect(0, (host, port).into(), Duration::from_millis(700))
        .unwrap_err();
    assert_ne!(e.kind(), ErrorKind::ConnectionRefused, "deny_all: {e}");
    // The sync service stays reachable under deny_all.
    r.connect(
        0,
        (tg_sidecar::SYNC_ADDR, tg_sidecar::SYNC_PORT).into(),
        Duration::from_secs(2),
    )
    .expect("the sync service");

    r.configure(0, json!({"routing_policy": "allow_all"})).await;
    let mut c = r
        .connect(0, (host, port).into(), Duration::from_secs(2))
        .expect("allow_all reaches the host");
    let (mut s, _) = server.accept().unwrap();
    s.write_all(b"hi").unwrap();
    let mut buf = [0u8; 2];
    c.read_exact(&mut buf).unwrap();

    r.configure(0, json!({"routing_policy": "deny_all"})).await;
    assert!(
        r.connect(0, (host, port).into(), Duration::from_millis(700))
            .is_err()
    );
    r.net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_configs_apply_and_undecodable_ones_are_refused() {
    if !privileged() {
        return;
    }
    let mut r = run(2).await;
    // What sdk-js sends: only the fields it was given (no jitter, no bandwidth, ...).
    r.publish(
        0,
        r#"{"network":"default","enable":true,"default":{"latency":30000000},"callback_state":"partial"}"#,
    )
    .await;
    tokio::time::timeout(
        Duration::from_secs(10),
        r.sync.barrier(&format!("{}:states:partial", r.prefix), 1),
    )
    .await
    .expect("a partial config is applied and signalled")
    .unwrap();
    let rtts = tokio::task::block_in_place(|| r.udp_rtts(0, 1, 7050, 5));
    for rtt in &rtts {
        assert!(*rtt >= Duration::from_millis(30), "rtt {rtt:?} < 30ms");
    }
    // A latency that is not a number: undecodable, refused, never signalled.
    let reason = r
        .refused(
            1,
            r#"{"network":"default","enable":true,"default":{"latency":"30ms"},"callback_state":"bad"}"#,
            "bad",
        )
        .await;
    assert!(reason.contains("cannot decode"), "{reason}");
    r.net.shutdown().await;
}

/// Runs `ip args..` inside instance `i`'s namespace and returns its stdout.
fn ip_in(r: &Run, i: usize, args: &[&str]) -> String {
    let out = r.instances[i]
        .netns
        .run(|| std::process::Command::new("ip").args(args).output())
        .unwrap()
        .expect("running ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_network_is_ipv4_only_and_never_reaches_the_data_network() {
    if !privileged() {
        return;
    }
    let r = run(2).await;
    let control: ipnet::Ipv4Net = tg_sidecar::CONTROL_SUBNET.parse().unwrap();
    let eth0 = ip_in(&r, 0, &["-o", "addr", "show", "dev", "eth0"]);
    let v4: Vec<&str> = eth0
        .lines()
        .filter(|l| l.contains(" inet "))
        .map(|l| l.split_whitespace().nth(3).unwrap())
        .collect();
    assert_eq!(v4.len(), 1, "{eth0}");
    let addr: ipnet::Ipv4Net = v4[0].parse().unwrap();
    assert!(control.contains(&addr.addr()), "{addr} in {control}");
    assert!(!eth0.contains("inet6"), "no IPv6 on eth0: {eth0}");
    let all = ip_in(&r, 0, &["-o", "addr"]);
    assert!(!all.contains("inet6 fe80"), "no link-local address: {all}");

    // Instance 1 listens on every address; instance 0 tries it over the control link only.
    let _l = r.listen(1, 7060);
    let ctl1 = ip_in(&r, 1, &["-o", "-4", "addr", "show", "dev", "eth0"]);
    let ctl1: Ipv4Addr = ctl1
        .split_whitespace()
        .nth(3)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    for to in [r.addr(1), ctl1] {
        let e = r.instances[0]
            .netns
            .run(move || {
                let s = connect_on("eth0", SocketAddr::from((to, 7060)));
                s.map(|_| ())
            })
            .unwrap()
            .unwrap_err();
        // A socket bound to a device that has no route for the destination assumes it on-link
        // and asks for it by ARP, which the control namespace never answers: the connect
        // times out (EINPROGRESS once SO_SNDTIMEO elapses) or is refused a route.
        assert!(
            matches!(
                e.kind(),
                ErrorKind::NetworkUnreachable | ErrorKind::TimedOut | ErrorKind::HostUnreachable
            ) || e.raw_os_error() == Some(libc_einprogress()),
            "{to} over eth0: {e}"
        );
    }
    // Without the restriction, the data address is reachable (over eth1).
    r.connect(0, (r.addr(1), 7060).into(), Duration::from_secs(5))
        .expect("the data network works");

    // Under allow_all an instance has a default route over eth0, and the control namespace
    // forwards; still only to the host: another instance's control address stays out of reach.
    if nft_available() {
        r.configure(0, json!({"routing_policy": "allow_all"})).await;
        r.configure(1, json!({"routing_policy": "allow_all"})).await;
        let e = r
            .connect(0, (ctl1, 7060).into(), Duration::from_millis(700))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{ctl1} under allow_all: {e}");
        r.connect(0, (r.addr(1), 7060).into(), Duration::from_secs(5))
            .expect("the data network still works");
    }
    r.net.shutdown().await;
}

/// Instances built together (several at a time, as the runners do) each get their own
/// network and nothing more: their control address and data address, IPv6 off on `eth0` and
/// `eth1` (no IPv6 address but `lo`'s, none generated, no IPv6 packet sent), only the route
/// to the sync service and the data subnet's (deny_all: no default route), the sync service's
/// permanent neighbour entry, the sync service reachable, the data network between every
/// pair, distinct namespaces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_built_together_each_get_their_own_network() {
    if !privileged() {
        return;
    }
    const N: usize = 12;
    let r = run(N as u32).await;
    let subnet = r.net.subnet();
    let mut inodes = std::collections::BTreeSet::new();
    let mut control_macs = std::collections::BTreeSet::new();
    for i in 0..N {
        assert!(inodes.insert(r.instances[i].netns_inode), "instance {i}");
        assert_eq!(r.instances[i].data_addr, r.addr(i));
        let caddr = Ipv4Addr::new(192, 18, 0, (i + 2) as u8);
        let addrs = ip_in(&r, i, &["-o", "addr"]);
        let mut got: Vec<String> = addrs
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                format!("{} {} {}", f[1], f[2], f[3])
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                format!("eth0 inet {caddr}/32"),
                format!("eth1 inet {}/{}", r.addr(i), subnet.prefix_len()),
                "lo inet 127.0.0.1/8".to_string(),
                "lo inet6 ::1/128".to_string(),
            ],
            "instance {i}: {addrs}"
        );
        for dev in ["eth0", "eth1"] {
            let link = ip_in(&r, i, &["-d", "link", "show", "dev", dev]);
            assert!(
                link.contains("addrgenmode none"),
                "instance {i}: IPv6 address generation off on {dev}: {link}"
            );
        }
        let mut routes: Vec<String> = ip_in(&r, i, &["-4", "route"])
            .lines()
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .collect();
        routes.sort();
        assert_eq!(
            routes,
            vec![
                format!("{subnet} dev eth1"),
                "192.18.0.1 dev eth0".to_string(),
            ],
            "instance {i}: no default route under deny_all"
        );
        let links = ip_in(&r, i, &["-o", "link"]);
        for dev in ["lo", "eth0", "eth1"] {
            let line = links
                .lines()
                .find(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .is_some_and(|n| n.starts_with(dev))
                })
                .unwrap_or_else(|| panic!("instance {i}: no {dev} in {links}"));
            assert!(line.contains(",UP"), "instance {i}: {line}");
        }
        assert_eq!(links.lines().count(), 3, "instance {i}: {links}");
        let neigh = ip_in(&r, i, &["-4", "neigh", "show", "dev", "eth0"]);
        assert!(
            neigh.contains("192.18.0.1 lladdr") && neigh.contains("PERMANENT"),
            "instance {i}: {neigh}"
        );
        assert!(
            control_macs.insert(neigh),
            "instance {i}: its own control link"
        );
        // The sync service answers over the control link.
        r.instances[i]
            .netns
            .run(|| {
                TcpStream::connect_timeout(
                    &SocketAddr::from((Ipv4Addr::new(192, 18, 0, 1), tg_sidecar::SYNC_PORT)),
                    Duration::from_secs(5),
                )
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("instance {i} cannot reach the sync service: {e}"));
    }
    // Every instance reaches every other one over the data network.
    let sockets: Vec<UdpSocket> = (0..N).map(|i| r.udp(i, 7070)).collect();
    for (i, s) in sockets.iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        for j in 0..N {
            if i != j {
                s.send_to(&[i as u8], (r.addr(j), 7070)).unwrap();
            }
        }
    }
    for (j, s) in sockets.iter().enumerate() {
        let mut from = std::collections::BTreeSet::new();
        let mut buf = [0u8; 4];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while from.len() < N - 1 && std::time::Instant::now() < deadline {
            if let Ok((1, peer)) = s.recv_from(&mut buf) {
                assert_eq!(peer.ip(), r.addr(buf[0] as usize), "instance {j}");
                from.insert(buf[0]);
            }
        }
        assert_eq!(from.len(), N - 1, "instance {j} heard from {from:?}");
    }
    // IPv4 only: after all that traffic, no instance sent a single IPv6 packet (no router
    // solicitation, MLD report or duplicate address probe) on either link.
    for i in 0..N {
        for dev in ["eth0", "eth1"] {
            let key = format!("/proc/thread-self/net/dev_snmp6/{dev}");
            let snmp = r.instances[i]
                .netns
                .run(|| std::fs::read_to_string(&key))
                .unwrap()
                .unwrap();
            for counter in ["Ip6OutRequests", "Ip6OutMcastPkts", "Icmp6OutMsgs"] {
                let v = snmp
                    .lines()
                    .find_map(|l| l.strip_prefix(counter))
                    .unwrap_or_else(|| panic!("{counter} in {key}: {snmp}"));
                assert_eq!(v.trim(), "0", "instance {i}: {counter} on {dev}");
            }
        }
    }
    r.net.shutdown().await;
}

/// Whether `nft` is here (allow_all needs it); panics when it must be, under
/// `TG_REQUIRE_PRIVILEGED=1`.
fn nft_available() -> bool {
    if std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    if std::env::var("TG_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("nft is missing (apt install nftables)");
    }
    eprintln!("skipping the allow_all part: it needs nft");
    false
}

/// A TCP connection to `to` bound to interface `dev` (SO_BINDTODEVICE), 700 ms at most.
fn connect_on(dev: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let fd = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    nix::sys::socket::setsockopt(
        &fd,
        nix::sys::socket::sockopt::BindToDevice,
        &std::ffi::OsString::from(dev),
    )?;
    nix::sys::socket::setsockopt(
        &fd,
        nix::sys::socket::sockopt::SendTimeout,
        &nix::sys::time::TimeVal::new(0, 700_000),
    )?;
    let SocketAddr::V4(v4) = to else {
        unreachable!("IPv4 only")
    };
    let addr = nix::sys::socket::SockaddrIn::from(v4);
    nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
    Ok(TcpStream::from(fd))
}

fn libc_einprogress() -> i32 {
    nix::errno::Errno::EINPROGRESS as i32
}

/// The data subnet the agents of a cross-node test share (fixed: no lease is taken).
fn shared_subnet() -> ipnet::Ipv4Net {
    "100.127.0.0/16".parse().unwrap()
}

/// One run on two agents sharing a sync service, as on two nodes: instance 0 on A, instance 1
/// on B (which captures). `tag` keeps the run ids of tests apart.
async fn two_agents(tag: &str) -> (Run, Run) {
    let sync = SyncService::spawn();
    let run_id = format!("{tag}{}", std::process::id()) + &format!("{:x}", fastrand_u64());
    let a = run_on(sync.clone(), &run_id, &[0], 1, forwarding_agent(false)).await;
    let b = run_on(sync, &run_id, &[1], 1, forwarding_agent(true)).await;
    (a, b)
}

fn forwarding_agent(capture: bool) -> Agent {
    Agent {
        subnet: Some(shared_subnet()),
        forward: Some("127.0.0.1:0".parse().unwrap()),
        capture,
    }
}

/// The IPv4 packets of a pcap the pump wrote.
fn pcap_packets(path: &std::path::Path) -> Vec<Vec<u8>> {
    let file = std::fs::File::open(path).unwrap();
    let mut reader = pcap_file::pcap::PcapReader::new(file).unwrap();
    let mut out = Vec::new();
    while let Some(p) = reader.next_packet() {
        out.push(p.unwrap().data.into_owned());
    }
    out
}

fn ipv4_src(packet: &[u8]) -> Ipv4Addr {
    tg_netem::packet::parse_ipv4(packet).unwrap().src
}

/// Two agents (two run networks, each with its own pump, as on two nodes) form one data
/// network over loopback: instance 0 lives on A, instance 1 on B. Each side's latency is applied
/// once, by its own agent's emulator, so a round trip takes at least the sum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_forward_across_nodes_shaping_on_each_sender() {
    if !privileged() {
        return;
    }
    let (a, b) = two_agents("x").await;
    assert_eq!(a.net.subnet(), shared_subnet());
    assert_eq!(b.net.subnet(), shared_subnet());
    let subnet = shared_subnet();
    assert_eq!(a.addr(0), tg_sidecar::addr::data_addr(subnet, 0));
    assert_eq!(b.addr(0), tg_sidecar::addr::data_addr(subnet, 1));
    let (fa, fb) = (a.net.forward_addr().unwrap(), b.net.forward_addr().unwrap());
    assert!(fa.ip().is_loopback() && fa.port() != 0, "{fa}");
    a.net
        .add_remote(1, fb)
        .await
        .expect("A learns of instance 1");
    b.net
        .add_remote(0, fa)
        .await
        .expect("B learns of instance 0");

    // Unshaped, the link adds next to nothing: the floor the shaped round trips are above.
    let base =
        tokio::task::block_in_place(|| udp_rtts_between(&a.instances[0], &b.instances[0], 7060, 5));
    let base = *base.iter().min().unwrap();

    a.configure(0, json!({"default": {"latency": ms(40)}}))
        .await;
    b.configure(0, json!({"default": {"latency": ms(10)}}))
        .await;
    let count = 10;
    let rtts = tokio::task::block_in_place(|| {
        udp_rtts_between(&a.instances[0], &b.instances[0], 7061, count)
    });
    eprintln!("cross-node rtts: unshaped min {base:?}, shaped 40+10 ms: {rtts:?}");
    for rtt in &rtts {
        assert!(*rtt >= Duration::from_millis(50), "rtt {rtt:?} < 40+10ms");
    }
    // The receiving agent does not shape again: twice would be at least 100 ms.
    let min = *rtts.iter().min().unwrap();
    assert!(min < Duration::from_millis(100), "shaped twice? {min:?}");

    // Every packet of both directions crossed the UDP link, and nothing was refused.
    let sa = a.net.forward_stats().await.unwrap().unwrap();
    let sb = b.net.forward_stats().await.unwrap().unwrap();
    eprintln!("forwarding: A {sa:?}, B {sb:?}");
    let exchanged = (5 + count) as u64;
    for (s, who) in [(sa, "A"), (sb, "B")] {
        assert!(
            s.sent >= exchanged && s.received >= exchanged,
            "{who}: {s:?}"
        );
        assert_eq!(
            (
                s.unknown_peer,
                s.malformed,
                s.unknown_destination,
                s.send_failed
            ),
            (0, 0, 0, 0),
            "{who}: {s:?}"
        );
    }
    // B's capture shows the requests arriving from A's instance (received over the link are
    // captured as the emulator's deliveries are).
    let (a_addr, out) = (a.addr(0), b._dir.path().join("out1/data.pcap"));
    a.net.shutdown().await;
    b.net.shutdown().await;
    let from_a = pcap_packets(&out)
        .iter()
        .filter(|p| ipv4_src(p) == a_addr)
        .count();
    assert!(
        from_a >= 5 + count,
        "{from_a} packets from A in B's capture"
    );
}

/// An IPv4/UDP packet with a valid header checksum (UDP checksum 0: none, valid in IPv4).
fn ipv4_udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else {
        panic!("IPv4 only");
    };
    let total = (20 + 8 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend(total.to_be_bytes());
    p.extend([0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend(src.ip().octets());
    p.extend(dst.ip().octets());
    let sum = tg_netem::packet::checksum(&p);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend(src.port().to_be_bytes());
    p.extend(dst.port().to_be_bytes());
    p.extend((total - 20).to_be_bytes());
    p.extend([0, 0]);
    p.extend(payload);
    p
}

/// The agent's forwarding port takes packets for its instances only from the agents it was told
/// about; a well-formed datagram from anyone else is dropped. The test's socket plays the other
/// agent, so both directions of the wire format are checked against what the pump does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_known_agents_inject_packets() {
    if !privileged() {
        return;
    }
    let run_id = format!("y{}", std::process::id()) + &format!("{:x}", fastrand_u64());
    let a = run_on(
        SyncService::spawn(),
        &run_id,
        &[0],
        1,
        forwarding_agent(false),
    )
    .await;
    let fa = a.net.forward_addr().unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
    a.net
        .add_remote(1, peer.local_addr().unwrap())
        .await
        .unwrap();
    let remote_ip = tg_sidecar::addr::data_addr(shared_subnet(), 1);
    let remote = SocketAddr::from((remote_ip, 40000));
    let inst = a.udp(0, 7070);
    let to = SocketAddr::from((a.addr(0), 7070));

    let mut d = Vec::new();
    use tg_sidecar::forward::encode;
    encode(
        tg_netem::NodeId(0),
        &ipv4_udp(remote, to, b"stranger"),
        &mut d,
    );
    stranger.send_to(&d, fa).unwrap();
    encode(tg_netem::NodeId(0), &ipv4_udp(remote, to, b"peer"), &mut d);
    peer.send_to(&d, fa).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = inst.recv_from(&mut buf).expect("the peer's packet");
    assert_eq!((&buf[..n], from), (&b"peer"[..], remote));
    inst.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(inst.recv_from(&mut buf).is_err(), "the stranger's got in");
    let s = a.net.forward_stats().await.unwrap().unwrap();
    assert_eq!((s.unknown_peer, s.received), (1, 1), "{s:?}");

    // The reply leaves through the emulator to the remote instance's agent, encapsulated.
    inst.send_to(b"reply", remote).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = peer.recv_from(&mut buf).expect("the forwarded reply");
    assert_eq!(from, fa);
    let (node, packet) = tg_sidecar::forward::decode(&buf[..n]).expect("a valid datagram");
    assert_eq!(node, tg_netem::NodeId(1));
    let hdr = tg_netem::packet::parse_ipv4(packet).unwrap();
    assert_eq!((hdr.src, hdr.dst), (a.addr(0), remote_ip));
    assert!(packet.ends_with(b"reply"));

    // `enable: false` drops in both directions: the sending agent cannot know, so the
    // receiving one does.
    a.configure(0, json!({"enable": false})).await;
    encode(tg_netem::NodeId(0), &ipv4_udp(remote, to, b"late"), &mut d);
    peer.send_to(&d, fa).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        inst.recv_from(&mut buf).is_err(),
        "a disabled instance got it"
    );
    let s = a.net.forward_stats().await.unwrap().unwrap();
    assert_eq!((s.disabled, s.received), (1, 1), "{s:?}");
    a.net.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// TUN offloads: TCP super-packets, segmented where an impairment acts per wire packet

/// `len` bytes that differ from one transfer and one position to the next.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Sends `data` over one TCP connection from instance `from` to a listener on `to`; returns
/// what the listener read until the sender closed.
fn tcp_transfer(r: &Run, from: usize, to: usize, port: u16, data: &[u8]) -> Vec<u8> {
    tcp_between(&r.instances[from], &r.instances[to], port, data)
}

fn tcp_between(from: &Instance, to: &Instance, port: u16, data: &[u8]) -> Vec<u8> {
    let listener = to
        .netns
        .run(move || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
        .unwrap()
        .unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let dst = SocketAddr::from((to.data_addr, port));
    let mut s = from
        .netns
        .run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(10)))
        .unwrap()
        .unwrap();
    s.write_all(data).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    receiver.join().unwrap()
}

/// Whether a captured TCP/IPv4 packet's IP and TCP checksums are both right, verified here
/// independently of the emulator's segmentation code.
fn tcp_checksums_ok(p: &[u8]) -> bool {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let mut pseudo = Vec::with_capacity(12 + p.len());
    pseudo.extend_from_slice(&p[12..20]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((p.len() - ihl) as u16).to_be_bytes());
    pseudo.extend_from_slice(&p[ihl..]);
    tg_netem::packet::checksum(&p[..ihl]) == 0 && tg_netem::packet::checksum(&pseudo) == 0
}

fn tx_packets(r: &Run, i: usize) -> u64 {
    let dev = r.instances[i]
        .netns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))
        .unwrap()
        .unwrap();
    // `eth1: rx_bytes rx_packets rx_errs rx_drop rx_fifo rx_frame rx_compressed rx_multicast
    // tx_bytes tx_packets ...`
    dev.lines()
        .find_map(|l| l.trim().strip_prefix("eth1:"))
        .and_then(|l| l.split_whitespace().nth(9))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// TCP between instances with TUN offloads: the sender's kernel hands the pump super-packets of
/// up to 64 KiB. Towards instance 1 the link only delays (latency), so they pass whole; towards
/// instance 2 a per-subnet rule loses, corrupts and duplicates, so they are cut into their wire
/// segments first and each segment meets its own fate. Both transfers arrive intact and
/// complete, and every capture shows wire packets with the checksums a wire would carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_through_offloads_arrives_intact_and_captures_show_wire_packets() {
    if !privileged() {
        return;
    }
    let run_id = format!("o{}", std::process::id()) + &format!("{:x}", fastrand_u64());
    let agent = Agent {
        capture: true,
        ..Agent::default()
    };
    let mut r = run_on(SyncService::spawn(), &run_id, &[0, 1, 2], 3, agent).await;
    let to_2 = format!("{}/32", r.addr(2));
    r.configure(
        0,
        json!({
            "default": {"latency": 1_000_000},
            "rules": [{"subnet": to_2, "loss": 5.0, "corrupt": 2.0, "duplicate": 2.0}],
        }),
    )
    .await;
    let tx0 = tx_packets(&r, 0);
    let (one, two) = (pattern(3 << 20, 1), pattern(2 << 20, 2));
    let (got1, got2) = tokio::task::block_in_place(|| {
        (
            tcp_transfer(&r, 0, 1, 7101, &one),
            tcp_transfer(&r, 0, 2, 7102, &two),
        )
    });
    assert!(
        got1 == one,
        "the transfer over the latency-only link is intact"
    );
    assert!(
        got2 == two,
        "the transfer through loss and corruption is intact"
    );
    let reads = tx_packets(&r, 0) - tx0;

    let mut unavailable = false;
    while let Ok(e) = r.log.try_recv() {
        if let SidecarEvent::Log(l) = e {
            unavailable |= l.contains("offloads are unavailable");
        }
    }
    let dir = r._dir.path().to_path_buf();
    let (a0, a2) = (r.addr(0), r.addr(2));
    let stats = r.net.shutdown().await.expect("stats");
    assert!(
        stats.loss > 0 && stats.corrupted > 0 && stats.duplicated > 0,
        "{stats}"
    );

    let capture = |i: usize| pcap_packets(&dir.join(format!("out{i}/data.pcap")));
    let tcp_from = |packets: &[Vec<u8>], src: Ipv4Addr| -> Vec<Vec<u8>> {
        packets
            .iter()
            .filter(|p| p[9] == 6 && ipv4_src(p) == src)
            .cloned()
            .collect()
    };
    // Never a super-packet: nothing larger than eth1's MTU.
    for i in 0..3 {
        let packets = capture(i);
        assert!(!packets.is_empty());
        let largest = packets.iter().map(Vec::len).max().unwrap();
        assert!(
            largest <= 1500,
            "instance {i} captured a {largest}-byte packet"
        );
    }
    // What instance 0 sent, captured as read: complete checksums on every wire packet.
    let sent = tcp_from(&capture(0), a0);
    assert!(sent.iter().all(|p| tcp_checksums_ok(p)));
    // 5 MiB in at most 1448-byte segments, plus handshakes and retransmissions.
    assert!(sent.len() >= (5 << 20) / 1448, "{} packets", sent.len());
    eprintln!(
        "{} wire packets sent by instance 0 in {reads} TUN reads",
        sent.len()
    );
    if unavailable {
        eprintln!("TUN offloads unavailable on this kernel: super-packets not checked");
    } else {
        // The sender's TUN handed over far fewer packets than went over the wire.
        assert!(
            reads * 4 < sent.len() as u64,
            "{reads} reads for {} wire packets",
            sent.len()
        );
    }
    // Instance 1 received only intact packets; instance 2 exactly the corrupted ones broken.
    assert!(
        tcp_from(&capture(1), a0)
            .iter()
            .all(|p| tcp_checksums_ok(p))
    );
    let broken = tcp_from(&capture(2), a0)
        .iter()
        .filter(|p| !tcp_checksums_ok(p))
        .count();
    assert_eq!(broken as u64, stats.corrupted, "{stats}");
    // And what instance 2 sent back (acknowledgements, with checksum offload) is complete too.
    assert!(
        tcp_from(&capture(0), a2)
            .iter()
            .all(|p| tcp_checksums_ok(p))
    );
}

/// Across agents, datagrams carry wire packets: a super-packet from the sender's TUN is cut into
/// its segments before it is forwarded (a 64 KiB packet would not fit in one datagram, and the
/// remote TUN might not take it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_across_agents_is_forwarded_as_wire_packets() {
    if !privileged() {
        return;
    }
    let (a, b) = two_agents("y").await;
    let (fa, fb) = (a.net.forward_addr().unwrap(), b.net.forward_addr().unwrap());
    a.net.add_remote(1, fb).await.unwrap();
    b.net.add_remote(0, fa).await.unwrap();
    let data = pattern(2 << 20, 3);
    let got =
        tokio::task::block_in_place(|| tcp_between(&a.instances[0], &b.instances[0], 7111, &data));
    assert!(got == data, "the transfer is intact");
    let sa = a.net.forward_stats().await.unwrap().unwrap();
    assert!(sa.sent as usize >= (2 << 20) / 1448, "{sa:?}");
    assert_eq!(sa.send_failed, 0, "{sa:?}");
    let out = b._dir.path().join("out1/data.pcap");
    let a_addr = a.addr(0);
    a.net.shutdown().await;
    b.net.shutdown().await;
    let from_a: Vec<Vec<u8>> = pcap_packets(&out)
        .into_iter()
        .filter(|p| ipv4_src(p) == a_addr)
        .collect();
    assert!(from_a.len() as u64 >= sa.sent / 2);
    assert!(
        from_a
            .iter()
            .all(|p| p.len() <= 1500 && tcp_checksums_ok(p))
    );
}
