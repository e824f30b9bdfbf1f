//! Examples of what the `local:netns` runner can do, on our SDK (`tg-sdk`).
//!
//! Every instance runs in its own network namespace with a data interface inside
//! `TEST_SUBNET`; it reshapes that interface by publishing a [`NetworkConfig`] that its
//! sidecar applies. The cases:
//!
//! - `latency`: every instance adds `latency_ms` of egress latency; instance 2 checks the TCP
//!   round trip to instance 1 is never shorter than the two delays it crosses.
//! - `partition`: instance 1 drops traffic to instance 2 and rejects traffic to instance 3,
//!   then checks a connect to 3 fails at once and a connect to 2 gets no answer.
//! - `per-link`: instance 1 shapes its link to each peer differently and checks the round
//!   trips follow.
//! - `isolation`: every instance listens on all its interfaces and checks that its peers
//!   reach it over the data network and never over the control network (the sync service's
//!   network), as the original's `verify` plan does.
//!
//! Shaping and filtering apply to the sender's egress only, so a rule on instance 1 acts on
//! the way out of instance 1 and nowhere else.
//!
//! Every case starts the same way: start an echo server if the case needs one, then publish
//! the data address on topic `addrs` and collect everyone's. Publishing only after the bind
//! means an address a peer learns is always ready to accept connections.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tg_sdk::network::{FilterAction, LinkRule, LinkShape, NetworkConfig};
use tg_sdk::{BoxError, CaseResult, InitContext, RunEnv, TestCase};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// The echo servers' TCP port on the data network.
const ECHO_PORT: u16 = 7000;
/// Upper bound on waiting for peers through the sync service: a peer that died turns into a
/// failure here instead of a run that hangs until the runner's timeout.
const SYNC_TIMEOUT: Duration = Duration::from_secs(300);
/// Upper bound on one connect or one round trip that is expected to succeed; far above any
/// latency these cases configure.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    tg_sdk::invoke([
        ("latency", TestCase::initialized(latency)),
        ("partition", TestCase::initialized(partition)),
        ("per-link", TestCase::initialized(per_link)),
        ("isolation", TestCase::initialized(isolation)),
    ]);
}

/// `latency` (2 instances, param `latency_ms`): both instances shape their egress, instance
/// 1 echoes, instance 2 measures 20 one-byte round trips.
async fn latency(env: &RunEnv, ic: &InitContext) -> CaseResult {
    require_instances(env, 2)?;
    let ms = env.int_param("latency_ms")?;
    let latency = Duration::from_millis(
        u64::try_from(ms).map_err(|_| format!("latency_ms must not be negative, got {ms}"))?,
    );

    let ip = ic.net.data_network_ip()?;
    if ic.global_seq == 1 {
        start_echo_server(ip).await?;
    }
    let addrs = exchange_addrs(env, ic, ip).await?;

    // Every instance configures itself, so the callback waits for all of them: once it
    // returns, both directions of the link are shaped.
    let config = NetworkConfig {
        default: LinkShape {
            latency,
            ..Default::default()
        },
        callback_state: "latency-configured".into(),
        ..Default::default()
    };
    within(
        SYNC_TIMEOUT,
        "configure latency",
        ic.net.configure_network(&config),
    )
    .await?;

    if ic.global_seq == 1 {
        // The echo server task serves until the client says it is done.
        within(
            SYNC_TIMEOUT,
            "wait for the client",
            ic.sync.barrier("client-done", 1),
        )
        .await?;
        return Ok(());
    }

    let server = SocketAddr::new(peer(&addrs, 1)?, ECHO_PORT);
    let result = measure_latency(env, server, latency).await;
    // Signalled whatever the outcome, or the server would wait for ever.
    let signalled = ic.sync.signal_entry("client-done").await;
    result?;
    signalled?;
    Ok(())
}

async fn measure_latency(env: &RunEnv, server: SocketAddr, latency: Duration) -> CaseResult {
    let samples = round_trips(server, 20).await?;
    let (min, median) = (samples[0], median(&samples));
    let hist = env.r().histogram("rtt_ms");
    for s in &samples {
        hist.update(millis(*s));
    }
    env.r().record_point("rtt_min_ms", millis(min));
    env.r().record_point("rtt_median_ms", millis(median));
    env.record_message(format!(
        "rtt min={min:?} median={median:?} configured={latency:?} per direction, to {server}"
    ));

    // A round trip crosses instance 2's egress delay, then instance 1's: nothing can beat
    // the sum, so a faster sample means the shaping is not in effect.
    let floor = 2 * latency;
    if min < floor {
        return Err(format!("fastest round trip {min:?} is below 2 x latency = {floor:?}").into());
    }
    Ok(())
}

/// `partition` (3 instances): instance 1 drops traffic to instance 2 and rejects traffic to
/// instance 3; everybody runs an echo server so only the rules can make a connect fail.
async fn partition(env: &RunEnv, ic: &InitContext) -> CaseResult {
    require_instances(env, 3)?;
    let ip = ic.net.data_network_ip()?;
    start_echo_server(ip).await?;
    let addrs = exchange_addrs(env, ic, ip).await?;

    if ic.global_seq != 1 {
        within(
            SYNC_TIMEOUT,
            "wait for instance 1",
            ic.sync.barrier("probed", 1),
        )
        .await?;
        return Ok(());
    }
    let result = probe_partition(env, ic, &addrs).await;
    // Signalled whatever the outcome, or the peers would wait for ever.
    let signalled = ic.sync.signal_entry("probed").await;
    result?;
    signalled?;
    Ok(())
}

async fn probe_partition(
    env: &RunEnv,
    ic: &InitContext,
    addrs: &BTreeMap<u64, IpAddr>,
) -> CaseResult {
    let dropped = SocketAddr::new(peer(addrs, 2)?, ECHO_PORT);
    let rejected = SocketAddr::new(peer(addrs, 3)?, ECHO_PORT);

    // Both peers must be reachable before the rules, so the failures below are the rules'.
    for addr in [dropped, rejected] {
        within(
            IO_TIMEOUT,
            &format!("baseline connect to {addr}"),
            TcpStream::connect(addr),
        )
        .await?;
    }
    env.record_message(format!(
        "before the rules: {dropped} and {rejected} both accept connections"
    ));

    let config = NetworkConfig {
        rules: vec![
            filter_rule(dropped.ip(), FilterAction::Drop),
            filter_rule(rejected.ip(), FilterAction::Reject),
        ],
        callback_state: "partitioned".into(),
        // Only this instance reconfigures, so only its sidecar signals the callback state.
        callback_target: Some(1),
        ..Default::default()
    };
    within(
        SYNC_TIMEOUT,
        "configure the partition",
        ic.net.configure_network(&config),
    )
    .await?;

    let mut problems = Vec::new();

    // Reject answers with an error at once: waiting 1 s is plenty.
    let start = Instant::now();
    match timeout(Duration::from_secs(1), TcpStream::connect(rejected)).await {
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            ) =>
        {
            env.record_message(format!(
                "reject: connect to {rejected} failed after {:?} as expected: {e}",
                start.elapsed()
            ));
        }
        Ok(Err(e)) => problems.push(format!(
            "reject: connect to {rejected} failed with an unexpected error: {e}"
        )),
        Ok(Ok(_)) => problems.push(format!("reject: connected to {rejected} despite the rule")),
        Err(_) => problems.push(format!(
            "reject: connect to {rejected} still unanswered after 1s (a drop, not a reject)"
        )),
    }

    // Drop sends nothing back, so the only possible outcome is our own timeout.
    let wait = Duration::from_secs(2);
    match timeout(wait, TcpStream::connect(dropped)).await {
        Err(_) => env.record_message(format!(
            "drop: connect to {dropped} unanswered after {wait:?} as expected"
        )),
        Ok(Err(e)) => problems.push(format!(
            "drop: connect to {dropped} got an answer ({e}); a drop must stay silent"
        )),
        Ok(Ok(_)) => problems.push(format!("drop: connected to {dropped} despite the rule")),
    }

    if problems.is_empty() {
        return Ok(());
    }
    for p in &problems {
        env.record_message(p);
    }
    Err(problems.join("; ").into())
}

/// `per-link` (3 instances): instance 1 adds 10 ms towards instance 2 and 80 ms towards
/// instance 3, nothing by default, and compares the round trips.
async fn per_link(env: &RunEnv, ic: &InitContext) -> CaseResult {
    require_instances(env, 3)?;
    let ip = ic.net.data_network_ip()?;
    start_echo_server(ip).await?;
    let addrs = exchange_addrs(env, ic, ip).await?;

    if ic.global_seq != 1 {
        within(
            SYNC_TIMEOUT,
            "wait for instance 1",
            ic.sync.barrier("measured", 1),
        )
        .await?;
        return Ok(());
    }
    let result = measure_links(env, ic, &addrs).await;
    // Signalled whatever the outcome, or the peers would wait for ever.
    let signalled = ic.sync.signal_entry("measured").await;
    result?;
    signalled?;
    Ok(())
}

async fn measure_links(
    env: &RunEnv,
    ic: &InitContext,
    addrs: &BTreeMap<u64, IpAddr>,
) -> CaseResult {
    let near = (2, Duration::from_millis(10));
    let far = (3, Duration::from_millis(80));

    let mut rules = Vec::new();
    for (seq, latency) in [near, far] {
        rules.push(LinkRule {
            shape: LinkShape {
                latency,
                ..Default::default()
            },
            subnet: IpNet::from(peer(addrs, seq)?),
        });
    }
    let config = NetworkConfig {
        // Zero by default: only the rules add latency.
        default: LinkShape::default(),
        rules,
        callback_state: "links-shaped".into(),
        // Only this instance reconfigures, so only its sidecar signals the callback state.
        callback_target: Some(1),
        ..Default::default()
    };
    within(
        SYNC_TIMEOUT,
        "configure per-link latency",
        ic.net.configure_network(&config),
    )
    .await?;

    let mut rtt = BTreeMap::new();
    for (seq, latency) in [near, far] {
        let addr = SocketAddr::new(peer(addrs, seq)?, ECHO_PORT);
        let samples = round_trips(addr, 10).await?;
        let m = median(&samples);
        env.r()
            .record_point(&format!("rtt_median_ms,peer={seq}"), millis(m));
        env.record_message(format!(
            "rtt to instance {seq} ({addr}): median={m:?} min={:?} configured={latency:?}",
            samples[0]
        ));
        rtt.insert(seq, (m, latency));
    }

    // Only the way out is delayed, so a round trip takes at least the configured one-way
    // latency; and the farther link must be the slower one.
    let mut problems = Vec::new();
    for (seq, (m, latency)) in &rtt {
        if m < latency {
            problems.push(format!(
                "median rtt to instance {seq} is {m:?}, below its {latency:?}"
            ));
        }
    }
    let (rtt_near, rtt_far) = (rtt[&near.0].0, rtt[&far.0].0);
    if rtt_far <= rtt_near {
        problems.push(format!(
            "rtt to instance {} ({rtt_far:?}) is not above rtt to instance {} ({rtt_near:?})",
            far.0, near.0
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; ").into())
    }
}

/// The port `isolation` listens on, on every interface.
const ANY_PORT: u16 = 7001;

/// One instance's two addresses, as published on `isolation-addrs`.
#[derive(Debug, Serialize, Deserialize)]
struct BothAddrs {
    seq: u64,
    data: IpAddr,
    control: IpAddr,
}

/// `isolation` (2 or more instances): each peer's port on its data address answers; on its
/// control address (the one that reaches the sync service) it must not.
async fn isolation(env: &RunEnv, ic: &InitContext) -> CaseResult {
    let data = ic.net.data_network_ip()?;
    let listener = TcpListener::bind(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), ANY_PORT))
        .await
        .map_err(|e| format!("listen on port {ANY_PORT}: {e}"))?;
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(echo(sock));
        }
    });
    // The control address is the source address of the route to the sync service.
    let sync = tokio::net::lookup_host((env.sync_service_host.as_str(), env.sync_service_port))
        .await
        .map_err(|e| format!("resolve the sync service: {e}"))?
        .next()
        .ok_or("the sync service's name has no address")?;
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
    probe.connect(sync)?;
    let control = probe.local_addr()?.ip();
    if control == data {
        return Err(format!("the control address {control} is the data address").into());
    }
    let mut sub = ic.sync.subscribe::<BothAddrs>("isolation-addrs")?;
    ic.sync
        .publish(
            "isolation-addrs",
            &BothAddrs {
                seq: ic.global_seq,
                data,
                control,
            },
        )
        .await?;
    let mut peers = Vec::new();
    while peers.len() < env.test_instance_count as usize {
        let next = async {
            match sub.next().await {
                Some(item) => item.map_err(BoxError::from),
                None => Err(BoxError::from("the subscription ended")),
            }
        };
        peers.push(within(SYNC_TIMEOUT, "collect the addresses", next).await?);
    }
    let mut problems = Vec::new();
    for p in peers.iter().filter(|p| p.seq != ic.global_seq) {
        let over_data = SocketAddr::new(p.data, ANY_PORT);
        within(
            IO_TIMEOUT,
            &format!("connect to {over_data}"),
            TcpStream::connect(over_data),
        )
        .await?;
        let over_control = SocketAddr::new(p.control, ANY_PORT);
        match timeout(Duration::from_secs(2), TcpStream::connect(over_control)).await {
            Ok(Ok(_)) => problems.push(format!(
                "instance {} answered on its control address {over_control}",
                p.seq
            )),
            Ok(Err(e)) => env.record_message(format!(
                "instance {}: data {over_data} answers, control {over_control} does not ({e})",
                p.seq
            )),
            Err(_) => env.record_message(format!(
                "instance {}: data {over_data} answers, control {over_control} does not (no answer)",
                p.seq
            )),
        }
    }
    // Peers keep listening until everyone has probed.
    within(
        SYNC_TIMEOUT,
        "wait for the others",
        ic.sync
            .signal_and_wait("isolation-probed", env.test_instance_count as i64),
    )
    .await?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; ").into())
    }
}

/// One instance's data address, as published on `addrs`.
#[derive(Debug, Serialize, Deserialize)]
struct PeerAddr {
    seq: u64,
    ip: IpAddr,
}

/// Publishes this instance's data address (call it once ready to accept connections) and
/// collects every instance's, keyed by global sequence number.
async fn exchange_addrs(
    env: &RunEnv,
    ic: &InitContext,
    ip: IpAddr,
) -> Result<BTreeMap<u64, IpAddr>, BoxError> {
    let mut sub = ic.sync.subscribe::<PeerAddr>("addrs")?;
    ic.sync
        .publish(
            "addrs",
            &PeerAddr {
                seq: ic.global_seq,
                ip,
            },
        )
        .await?;
    let mut addrs = BTreeMap::new();
    while addrs.len() < env.test_instance_count as usize {
        let next = async {
            match sub.next().await {
                Some(item) => item.map_err(BoxError::from),
                None => Err(BoxError::from("the addrs subscription ended")),
            }
        };
        let peer: PeerAddr = within(SYNC_TIMEOUT, "collect the addrs", next).await?;
        addrs.insert(peer.seq, peer.ip);
    }
    env.record_message(format!(
        "instance {} at {ip}; data addresses: {addrs:?}",
        ic.global_seq
    ));
    Ok(addrs)
}

/// Binds the echo server on `ip` before returning (so publishing the address afterwards is
/// safe), then serves in the background until the case returns.
async fn start_echo_server(ip: IpAddr) -> CaseResult {
    let addr = SocketAddr::new(ip, ECHO_PORT);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("listen on {addr}: {e}"))?;
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(echo(sock));
        }
    });
    Ok(())
}

async fn echo(mut sock: TcpStream) {
    // Without it a one-byte answer could wait for a delayed ACK and skew the RTTs.
    let _ = sock.set_nodelay(true);
    let mut buf = [0u8; 1024];
    // An error ends this connection only: the measuring side reports its own failures.
    while let Ok(n @ 1..) = sock.read(&mut buf).await {
        if sock.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Connects to an echo server and times `n` one-byte round trips; sorted, fastest first.
async fn round_trips(addr: SocketAddr, n: usize) -> Result<Vec<Duration>, BoxError> {
    let mut sock = within(
        IO_TIMEOUT,
        &format!("connect to {addr}"),
        TcpStream::connect(addr),
    )
    .await?;
    // Each byte must leave at once, not wait to be coalesced with the next.
    sock.set_nodelay(true)?;
    let mut samples = Vec::with_capacity(n);
    let mut buf = [0u8; 1];
    for i in 0..n {
        let sent = i as u8;
        let start = Instant::now();
        let trip = async {
            sock.write_all(&[sent]).await?;
            sock.read_exact(&mut buf).await
        };
        within(IO_TIMEOUT, &format!("round trip {i} to {addr}"), trip).await?;
        samples.push(start.elapsed());
        if buf[0] != sent {
            return Err(format!("{addr} echoed {} for {sent}", buf[0]).into());
        }
    }
    samples.sort();
    Ok(samples)
}

/// The middle sample of a sorted, non-empty slice (the upper one for an even count).
fn median(sorted: &[Duration]) -> Duration {
    sorted[sorted.len() / 2]
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A rule that only filters: no shaping, `action` for everything sent to `ip`.
fn filter_rule(ip: IpAddr, action: FilterAction) -> LinkRule {
    LinkRule {
        shape: LinkShape {
            filter: action,
            ..Default::default()
        },
        subnet: IpNet::from(ip),
    }
}

fn peer(addrs: &BTreeMap<u64, IpAddr>, seq: u64) -> Result<IpAddr, BoxError> {
    addrs
        .get(&seq)
        .copied()
        .ok_or_else(|| format!("no address published by instance {seq}").into())
}

/// The manifest pins the counts; this guards against a composition that overrides them.
fn require_instances(env: &RunEnv, n: u64) -> CaseResult {
    if env.test_instance_count != n {
        return Err(format!(
            "needs exactly {n} instances, got {}",
            env.test_instance_count
        )
        .into());
    }
    Ok(())
}

/// Runs `fut` with a deadline, prefixing any error with `what`.
async fn within<T, E: Into<BoxError>>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, BoxError> {
    match timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {}", e.into()).into()),
        Err(_) => Err(format!("{what}: timed out after {limit:?}").into()),
    }
}
