//! sync-bench: measures the sync service in-process over real loopback websockets.
//!
//! Reports ops/s per operation for N concurrent clients (one request in flight per client),
//! barrier latency from the last signal to the last release for 1,000 and 10,000 waiters (one
//! socket each when the fd limit allows), and peak RSS. It measures; it asserts nothing.
//!
//! `SYNC_BENCH_SECS` sets the length of each throughput phase (default 3).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;
use tg_sync::{SyncService, serve};
use tg_sync_client::Client;
use tokio::net::TcpListener;

#[derive(Clone, Copy, Debug)]
enum Op {
    Publish,
    SignalEntry,
    /// A barrier whose target is already reached: one round trip through the barrier path.
    BarrierReached,
    /// Every client signals, then waits for all N: one collective round per iteration; counted
    /// as N operations (one signal+barrier pair per client) per round.
    BarrierRound,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Publish => "publish",
            Op::SignalEntry => "signal_entry",
            Op::BarrierReached => "barrier (already reached)",
            Op::BarrierRound => "signal+barrier round (all N)",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let fd_limit = raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => runtime.block_on(run(fd_limit)),
        [mode, addr, plain, websockets] if mode == "idle" => {
            runtime.block_on(idle(addr, plain.parse()?, websockets.parse()?))
        }
        _ => anyhow::bail!("usage: sync-bench [idle <addr> <plain sockets> <silent websockets>]"),
    }
}

/// `sync-bench idle <addr> <plain> <websockets>`: the idle-socket load of the sync service's
/// tests, in a process of its own so that its descriptors do not count against the server's.
/// Opens `websockets` websockets that complete the handshake and never send a request, then
/// `plain` TCP connections that never start one; prints `ready` and holds them all until stdin
/// closes.
async fn idle(addr: &str, plain: usize, websockets: usize) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;
    let mut silent = Vec::with_capacity(websockets);
    for _ in 0..websockets {
        let tcp = TcpStream::connect(addr).await.context("connect")?;
        let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/"), tcp)
            .await
            .context("handshake")?;
        silent.push(ws);
    }
    let mut sockets = Vec::with_capacity(plain);
    for _ in 0..plain {
        sockets.push(TcpStream::connect(addr).await.context("connect")?);
    }
    println!("ready");
    let mut rest = Vec::new();
    tokio::io::stdin().read_to_end(&mut rest).await?;
    drop((silent, sockets));
    Ok(())
}

/// Raises RLIMIT_NOFILE as far as allowed; returns the soft limit in force.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = 65_536;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    if setrlimit(Resource::RLIMIT_NOFILE, want.max(soft), want.max(hard)).is_ok() {
        return want.max(soft);
    }
    if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

async fn run(fd_limit: u64) -> anyhow::Result<()> {
    let secs: u64 = std::env::var("SYNC_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("ws://{}", listener.local_addr()?);
    let service = SyncService::spawn();
    tokio::spawn(serve(listener, service.clone(), std::future::pending()));

    println!(
        "sync-bench: {} CPUs, fd limit {fd_limit}, {secs} s per throughput phase",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| op | N clients | ops/s |");
    println!("|---|---:|---:|");
    let mut phase = 0u64;
    for n in [10usize, 100, 1000] {
        let clients = connect(&url, n).await?;
        for op in [
            Op::Publish,
            Op::SignalEntry,
            Op::BarrierReached,
            Op::BarrierRound,
        ] {
            phase += 1;
            let prefix = format!("run:bench{phase}:");
            let (ops, took) = throughput(&clients, op, &prefix, Duration::from_secs(secs)).await?;
            println!(
                "| {} | {n} | {:.0} |",
                op.name(),
                ops as f64 / took.as_secs_f64()
            );
            service.drop_prefix(&prefix).await?;
        }
    }

    println!();
    println!("| waiters | sockets | last signal → last release |");
    println!("|---:|---:|---:|");
    for waiters in [1_000usize, 10_000] {
        // Each socket costs two fds in-process (client and server end); keep a margin.
        let max_sockets = (fd_limit.saturating_sub(256) / 2) as usize;
        let sockets = waiters.min(max_sockets.max(1));
        let latency = barrier_latency(&url, &service, waiters, sockets).await?;
        println!(
            "| {waiters} | {sockets} | {:.2} ms |",
            latency.as_secs_f64() * 1e3
        );
    }
    println!();
    println!("peak RSS (VmHWM): {}", peak_rss());
    Ok(())
}

async fn connect(url: &str, n: usize) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(Client::connect(url).await.context("connect")?);
    }
    Ok(clients)
}

async fn throughput(
    clients: &[Client],
    op: Op,
    prefix: &str,
    duration: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let n = clients.len() as i64;
    let done = Arc::new(AtomicU64::new(0));
    // For rounds: the last round everyone runs. The first client to see the deadline after
    // round r sets it to r + 1; anyone who already signalled r + 1 is then not left waiting.
    let last_round = Arc::new(AtomicI64::new(i64::MAX));
    let reached = format!("{prefix}states:reached");
    clients[0].signal_entry(&reached).await?;
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let (c, done, last_round) = (c.clone(), Arc::clone(&done), Arc::clone(&last_round));
        let topic = format!("{prefix}topics:t{}", i % 16);
        let state = format!("{prefix}states:s{}", i % 16);
        let round_state = format!("{prefix}states:round");
        let reached = reached.clone();
        tasks.push(tokio::spawn(async move {
            let mut k: i64 = 0;
            loop {
                k += 1;
                match op {
                    Op::Publish => {
                        c.publish(&topic, &json!({"i": i, "k": k})).await?;
                    }
                    Op::SignalEntry => {
                        c.signal_entry(&state).await?;
                    }
                    Op::BarrierReached => c.barrier(&reached, 1).await?,
                    Op::BarrierRound => {
                        if k > last_round.load(Ordering::SeqCst) {
                            break;
                        }
                        c.signal_and_wait(&round_state, k * n).await?;
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
                if Instant::now() >= deadline {
                    if matches!(op, Op::BarrierRound) {
                        last_round.fetch_min(k + 1, Ordering::SeqCst);
                    } else {
                        break;
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((done.load(Ordering::Relaxed), start.elapsed()))
}

async fn barrier_latency(
    url: &str,
    service: &SyncService,
    waiters: usize,
    sockets: usize,
) -> anyhow::Result<Duration> {
    let clients = connect(url, sockets).await?;
    let state = format!("run:latency{waiters}:states:all");
    let target = waiters as i64;
    let mut tasks = Vec::with_capacity(waiters);
    for i in 0..waiters {
        let c = clients[i % sockets].clone();
        let state = state.clone();
        tasks.push(tokio::spawn(async move { c.barrier(&state, target).await }));
    }
    while service.stats().await?.waiters < waiters {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signals = (0..waiters - 1).map(|i| clients[i % sockets].signal_entry(&state));
    for r in futures::future::join_all(signals).await {
        r?;
    }
    let start = Instant::now();
    clients[(waiters - 1) % sockets]
        .signal_entry(&state)
        .await?;
    for t in tasks {
        t.await??;
    }
    let latency = start.elapsed();
    drop(clients);
    service
        .drop_prefix(&format!("run:latency{waiters}:"))
        .await?;
    Ok(latency)
}

fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}
