//! sync-bench: measures a sync service.
//!
//! Modes (see `sync-bench --help`):
//! - `inproc` (also with no arguments): the server and simple clients (one request in flight
//!   each, the `tg-sync-client` crate) in this one process.
//! - `server`: our sync service alone, for `client` to load from another process.
//! - `client`: a load generator against ANY sync service address (ours, or the original Go
//!   sync-service): pipelined throughput, barrier release latency, idle memory per connection.
//!   It is built to cost the server's machine as little as possible: requests are pre-encoded
//!   masked websocket frames (only the id digits change), and responses are counted by walking
//!   frame headers, without JSON decoding.
//! - `idle`: the idle-socket load of the service's tests.
//!
//! It measures; it asserts nothing.

#[path = "sync-bench/remote.rs"]
mod remote;

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

/// Measures a sync service: in this process (`inproc`), or any service at an address from
/// another process (`server` here, `client` there). See the subcommands' help.
#[derive(clap::Parser)]
#[command(name = "sync-bench")]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(clap::Subcommand)]
enum Mode {
    /// Server and clients (one request in flight each) in this process; the default.
    Inproc,
    /// Runs our sync service alone on ADDR until stdin closes or the process is killed, with
    /// `max_connections_per_run` raised so that 10,000-waiter barriers fit in one run.
    Server {
        #[arg(long, default_value = "127.0.0.1:5050")]
        addr: String,
        /// Tokio worker threads (default: one per CPU).
        #[arg(long)]
        threads: Option<usize>,
        /// Runnable tasks above which fan-outs are paced (`SyncLimits::fanout_pace_runnable`;
        /// default: the service's, 16 per CPU; 0: never).
        #[arg(long)]
        fanout_pace_runnable: Option<u32>,
    },
    /// Loads ANY sync service at --addr (ours, or e.g. the original Go sync-service, which
    /// listens on :5050) with the same traffic, from this separate process.
    Client(remote::ClientArgs),
    /// The idle-socket load of the sync service's tests: `websockets` silent websockets, then
    /// `plain` TCP connects that never start a handshake; prints `ready` and holds them until
    /// stdin closes.
    Idle {
        addr: String,
        plain: usize,
        websockets: usize,
    },
}

fn main() -> anyhow::Result<()> {
    use clap::Parser as _;
    let cli = Cli::parse();
    let fd_limit = raise_fd_limit();
    match cli.mode.unwrap_or(Mode::Inproc) {
        Mode::Inproc => runtime(None)?.block_on(run(fd_limit)),
        Mode::Server {
            addr,
            threads,
            fanout_pace_runnable,
        } => runtime(threads)?.block_on(server(&addr, fanout_pace_runnable)),
        Mode::Client(args) => runtime(Some(args.threads))?.block_on(remote::client(args)),
        Mode::Idle {
            addr,
            plain,
            websockets,
        } => runtime(None)?.block_on(idle(&addr, plain, websockets)),
    }
}

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        b.worker_threads(n.max(1));
    }
    Ok(b.enable_all().build()?)
}

async fn server(addr: &str, fanout_pace_runnable: Option<u32>) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let listener = TcpListener::bind(addr).await.context("bind")?;
    let mut limits = tg_sync::SyncLimits {
        max_connections_per_run: 1 << 20,
        max_unidentified_connections: 1 << 20,
        ..Default::default()
    };
    if let Some(n) = fanout_pace_runnable {
        limits.fanout_pace_runnable = (n > 0).then_some(n);
    }
    let service = SyncService::spawn_with(limits);
    println!(
        "listening {} pid {}",
        listener.local_addr()?,
        std::process::id()
    );
    let stop = async {
        let mut rest = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut rest).await;
    };
    serve(listener, service, stop).await;
    Ok(())
}

/// `sync-bench idle <addr> <plain> <websockets>`: the idle-socket load of the sync service's
/// tests, in a process of its own so that its descriptors do not count against the server's.
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
