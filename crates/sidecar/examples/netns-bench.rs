//! Benchmarks the `local:netns` data plane: instance namespaces whose `eth1` is a TUN device,
//! joined by the run's packet pump and the `tg-netem` emulator. Everything is built in-process,
//! exactly as the runner does it (`RunNetwork` with an in-process sync service), and measured
//! with std sockets opened inside the instance namespaces.
//!
//! 1. Latency accuracy: one-way latency L on both instances (`default.latency`), UDP round trips
//!    of small datagrams, compared with the configured 2L.
//! 2. TCP throughput, one stream, unshaped, with latency and with loss, next to the same stream
//!    over a plain veth pair (the kernel's own path between two namespaces: the limit of this
//!    machine) shaped alike with `tc netem`, with the pump's CPU per byte and per wire packet.
//! 3. Small-packet rate: 64-byte UDP datagrams blasted from one instance to another, with the
//!    pump thread's CPU time per packet and where the packets that did not arrive were lost.
//!
//! Needs root (namespaces, TUN devices):
//!
//! ```sh
//! cd /work/main && CARGO_TARGET_DIR=/work/target-bench \
//!     cargo run --release -p tg-sidecar --example netns-bench
//! ```
//!
//! `netns-bench throughput` runs part 2 only (unshaped, latency-only and lossy TCP, each next to a
//! veth pair shaped alike by `tc netem`; the `row` lines are for scripts).
//!
//! `netns-bench latency` runs part 1 only and also prints one `row` line per latency for
//! scripts (`bench/timing-under-load.sh` compares builds and CPU loads with it). Every probe
//! counts, the first one after each configuration included: a pump that is slow to wake after
//! an idle spell shows in the `first` column.
//!
//! Every run network is shut down and the veth namespaces are dropped before exit, so nothing
//! is left behind (the kernel frees fd-held namespaces with their interfaces).

use std::error::Error;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::time::{ClockId, clock_gettime};
use tg_api::network::{LinkShape, NetworkConfig};
use tg_sidecar::{Instance, Options, RunNetwork};
use tg_sync::SyncService;
use tg_sys::{NetNs, Netlink};

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

/// (one-way latency in ms, round trips measured)
const LATENCIES: [(u64, usize); 4] = [(0, 200), (1, 200), (10, 200), (100, 50)];
/// Payload of the latency probes: a sequence number.
const PROBE: usize = 8;
const TCP_DURATION: Duration = Duration::from_secs(5);
const TCP_WRITE: usize = 256 * 1024;
const PPS_DURATION: Duration = Duration::from_secs(3);
const PPS_PAYLOAD: usize = 64;
/// `/proc/*/stat` times are in clock ticks (`getconf CLK_TCK`).
const CLK_TCK: f64 = 100.0;
/// The kernel keeps 15 bytes of a thread's name (`TASK_COMM_LEN` - 1).
const COMM_LEN: usize = 15;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        println!("netns-bench needs root (network namespaces, TUN devices); skipping.");
        return Ok(());
    }
    // Before any measurement: the endpoints below stand in for instances, so they are
    // scheduled as the runners schedule instances.
    let endpoints = endpoint_sched();
    println!("local:netns data plane benchmark (tg-sidecar example netns-bench)");
    println!("machine: {}", machine());
    println!("load average at start: {}", loadavg());
    println!();

    match std::env::args().nth(1).as_deref() {
        Some("latency") => latency(endpoints).await?,
        Some("throughput") => throughput().await?,
        _ => {
            latency(endpoints).await?;
            throughput().await?;
            packet_rate().await?;
        }
    }

    println!();
    println!("load average at end: {}", loadavg());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Latency accuracy
// ---------------------------------------------------------------------------------------------

async fn latency(endpoints: EndpointSched) -> Result<()> {
    println!(
        "1. Latency accuracy: UDP round trips of {PROBE}-byte datagrams, instance 0 -> 1 -> 0,"
    );
    println!("   default.latency = L on both instances, so the configured RTT is 2L (times in µs)");
    let run = Run::start("lat", 2).await?;
    let echo = run.udp(1, 9000)?;
    echo.set_read_timeout(Some(Duration::from_millis(100)))?;
    let client = run.udp(0, 0)?;
    // A probe without an answer after this long is counted as lost and the next one is sent.
    client.set_read_timeout(Some(Duration::from_secs(1)))?;
    client.connect((run.addr(1), 9000))?;
    let stop = Arc::new(AtomicBool::new(false));
    // What the echo saw, to tell where a lost probe went.
    let echoed = Arc::new(AtomicU64::new(0));
    let echo_errors = Arc::new(AtomicU64::new(0));
    let echo_thread = {
        let (stop, echoed, echo_errors) = (stop.clone(), echoed.clone(), echo_errors.clone());
        std::thread::spawn(move || {
            endpoints.enter_thread();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = echo.recv_from(&mut buf) {
                    match echo.send_to(&buf[..n], from) {
                        Ok(_) => echoed.fetch_add(1, Ordering::Relaxed),
                        Err(_) => echo_errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
        })
    };
    let before = (run.counters(0)?, run.counters(1)?);
    let table_fulls = arp_table_fulls();

    println!("   pump thread scheduling: {}", pump_policy(&run.run_id));
    println!("   endpoint scheduling: {}", endpoints.describe());
    println!(
        "   {:>6} {:>10} {:>7} {:>5} {:>9} {:>9} {:>9} {:>13} {:>10} {:>10} {:>11}",
        "L (ms)",
        "conf. RTT",
        "samples",
        "lost",
        "min",
        "median",
        "p99",
        "median error",
        "p99 error",
        "max error",
        "first error"
    );
    let mut seq = 0u64;
    let mut sent = 0u64;
    let mut lost_total = 0u64;
    for (l_ms, count) in LATENCIES {
        let latency = Duration::from_millis(l_ms);
        run.configure(0, latency).await?;
        run.configure(1, latency).await?;
        // A quiet spell before the first probe, as between a plan's configuration and its
        // first packet.
        tokio::time::sleep(Duration::from_millis(200)).await;
        run.net.take_pump_lateness().await?;
        let (mut rtts, lost) = tokio::task::block_in_place(|| -> io::Result<_> {
            // This thread is the client for now (a runtime worker: it keeps the slice after).
            endpoints.enter_thread();
            let mut rtts = Vec::with_capacity(count);
            let mut lost = 0u64;
            // No warm-up: the first packet after a quiet spell is part of what is measured.
            for _ in 0..count {
                let rtt = round_trip(&client, seq)?;
                seq += 1;
                match rtt {
                    Some(rtt) => rtts.push(rtt),
                    None => lost += 1,
                }
            }
            Ok((rtts, lost))
        })?;
        sent += count as u64;
        lost_total += lost;
        if rtts.is_empty() {
            println!("   {l_ms:>6}: every probe was lost");
            continue;
        }
        let pump = run.net.take_pump_lateness().await?;
        let first = rtts[0];
        rtts.sort();
        let conf = 2 * latency;
        let median = percentile(&rtts, 50.0);
        let p99 = percentile(&rtts, 99.0);
        let max = rtts[rtts.len() - 1];
        println!(
            "   {:>6} {:>10} {:>7} {:>5} {:>9} {:>9} {:>9} {:>+13} {:>+10} {:>+10} {:>+11}",
            l_ms,
            us(conf),
            rtts.len(),
            lost,
            us(rtts[0]),
            us(median),
            us(p99),
            us(median) - us(conf),
            us(p99) - us(conf),
            us(max) - us(conf),
            us(first) - us(conf),
        );
        // The pump's own share: how late it released the delayed packets (bucket tops).
        let (p50, p99_pump) = (
            pump.percentile_us(50.0).unwrap_or(0),
            pump.percentile_us(99.0).unwrap_or(0),
        );
        if pump.count > 0 {
            println!(
                "          pump release lateness over {} packets: p50 < {p50} µs, p99 < {p99_pump} µs, max {} µs",
                pump.count,
                pump.max_ns / 1_000
            );
        }
        // For scripts: L, samples, lost, errors in µs (median, p99, max, first), then the
        // pump's release lateness in µs (p50 and p99 bucket tops, max).
        println!(
            "row {l_ms} {} {lost} {} {} {} {} {p50} {p99_pump} {}",
            rtts.len(),
            us(median) - us(conf),
            us(p99) - us(conf),
            us(max) - us(conf),
            us(first) - us(conf),
            pump.max_ns / 1_000,
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _ = echo_thread.join();
    let after = (run.counters(0)?, run.counters(1)?);
    let stats = run.net.shutdown().await;
    println!("   emulator counters: {}", counters(stats.as_ref()));
    if lost_total > 0 {
        // Follow the probes: client eth1 -> emulator -> echo eth1 -> echo -> back.
        let (c, e) = (after.0 - before.0, after.1 - before.1);
        println!(
            "   lost probes ({lost_total} of {sent}): client UDP out {}, client eth1 tx {}, \
             echo eth1 rx {}, echo answered {} ({} send errors); \
             eth1 drops client rx/tx {}/{}, echo rx/tx {}/{}; UDP in-errors client {}, echo {}; \
             host-wide neighbour table full {} times meanwhile",
            c.udp_out,
            c.tx_packets,
            e.rx_packets,
            echoed.load(Ordering::Relaxed),
            echo_errors.load(Ordering::Relaxed),
            c.rx_drop,
            c.tx_drop,
            e.rx_drop,
            e.tx_drop,
            c.udp_in_errors,
            e.udp_in_errors,
            arp_table_fulls() - table_fulls,
        );
    }

    // What the machine itself adds: the pump sleeps on a timerfd until a packet is due, and
    // each round trip waits for it twice (once per direction).
    let mut line = String::new();
    for l_ms in [1u64, 10, 100] {
        let n = if l_ms == 100 { 10 } else { 20 };
        let late = tokio::task::block_in_place(|| timer_lateness(Duration::from_millis(l_ms), n))?;
        line += &format!("  {l_ms} ms: +{} µs", us(late));
    }
    println!("   reference, this machine's timerfd wake-up lateness (median):{line}");
    println!();
    Ok(())
}

/// Median lateness of `n` one-shot timerfd sleeps of `d`: the mechanism the pump uses to
/// release delayed packets, measured alone.
fn timer_lateness(d: Duration, n: usize) -> io::Result<Duration> {
    use nix::sys::time::TimeSpec;
    use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
    let timer = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_CLOEXEC)?;
    let mut late = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        timer.set(
            Expiration::OneShot(TimeSpec::from_duration(d)),
            TimerSetTimeFlags::empty(),
        )?;
        timer.wait()?;
        late.push(t0.elapsed().saturating_sub(d));
    }
    late.sort();
    Ok(percentile(&late, 50.0))
}

/// One datagram to the echo and back; `None` when no answer came within the socket's read
/// timeout. Late answers to earlier probes are skipped.
fn round_trip(s: &UdpSocket, seq: u64) -> io::Result<Option<Duration>> {
    let mut buf = [0u8; 64];
    let t0 = Instant::now();
    s.send(&seq.to_be_bytes())?;
    loop {
        match s.recv(&mut buf) {
            Ok(n) if n == PROBE && buf[..PROBE] == seq.to_be_bytes() => {
                return Ok(Some(t0.elapsed()));
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn us(d: Duration) -> i64 {
    d.as_micros() as i64
}

// ---------------------------------------------------------------------------------------------
// 2. Unshaped TCP throughput: emulator vs plain veth
// ---------------------------------------------------------------------------------------------

/// The throughput cases: a name and the sender's shaping.
fn throughput_cases() -> Vec<(&'static str, LinkShape)> {
    vec![
        ("unshaped", LinkShape::default()),
        (
            "latency 1 ms (sender)",
            LinkShape {
                latency: Duration::from_millis(1),
                ..LinkShape::default()
            },
        ),
        (
            "loss 1% (sender)",
            LinkShape {
                loss: 1.0,
                ..LinkShape::default()
            },
        ),
    ]
}

async fn throughput() -> Result<()> {
    println!(
        "2. TCP throughput: one stream for {} s, {} KiB writes, through the emulator, each \
         next to the same stream over a plain unshaped veth pair (the kernel's own path: this \
         machine's limit; this kernel has no netem qdisc to shape it alike)",
        TCP_DURATION.as_secs(),
        TCP_WRITE / 1024
    );
    for (name, shape) in throughput_cases() {
        println!("   {name}:");
        // Through the emulator: instance 0 -> pump -> instance 1.
        let run = Run::start("tcp", 2).await?;
        if shape != LinkShape::default() {
            run.configure_shape(0, shape).await?;
        }
        let listener = run.listen(1, 9001)?;
        let to = SocketAddr::from((run.addr(1), 9001));
        let ns0 = run.instances[0].netns.try_clone()?;
        let pump = PumpClock::find(&run.run_id);
        let cpu0 = pump.as_ref().map(PumpClock::read);
        let tun0 = run.counters(0)?;
        let emu = tokio::task::block_in_place(|| tcp_stream(listener, &ns0, to));
        let cpu = pump.as_ref().zip(cpu0).map(|(p, c0)| p.read() - c0);
        // What the sender's TUN handed the pump: one read each (a super-packet with offloads).
        let reads = run.counters(0)?.tx_packets - tun0.tx_packets;
        drop(ns0);
        let stats = run.net.shutdown().await;
        let (emu_bytes, emu_secs) = emu?;

        // The same stream over a veth pair between two fresh namespaces.
        let (a, b) = veth_pair().await?;
        let listener = b.run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 9001)))??;
        let veth = tokio::task::block_in_place(|| tcp_stream(listener, &a, (VETH_B, 9001).into()));
        // The last handles: the kernel frees both namespaces and the veth pair with them.
        drop((a, b));
        let (veth_bytes, veth_secs) = veth?;

        let emu_rate = gbit(emu_bytes, emu_secs);
        let veth_rate = gbit(veth_bytes, veth_secs);
        println!(
            "      through the emulator (TUN eth1, MTU 1500): {emu_rate:>6.2} Gbit/s  ({:.2} GiB in {emu_secs:.2} s)",
            emu_bytes as f64 / GIB
        );
        if let Some(cpu) = cpu {
            let wire = stats.as_ref().map_or(0, |s| s.sent);
            println!(
                "         pump thread CPU: {:.2} s = {:.0}% of one core; {:.2} ns per byte received, \
                 {:.0} ns per wire packet ({wire} wire packets through the emulator in {reads} \
                 reads from the sender's TUN: {:.1} per read)",
                cpu.secs(),
                100.0 * cpu.secs() / emu_secs,
                cpu.secs() * 1e9 / emu_bytes.max(1) as f64,
                cpu.secs() * 1e9 / wire.max(1) as f64,
                wire as f64 / reads.max(1) as f64,
            );
        }
        println!("         emulator counters: {}", counters(stats.as_ref()));
        println!(
            "      plain veth pair (kernel only, offloads on):  {veth_rate:>6.2} Gbit/s  ({:.2} GiB in {veth_secs:.2} s)",
            veth_bytes as f64 / GIB
        );
        println!(
            "      row {name:<24} emulator {emu_rate:.3} Gbit/s  veth {veth_rate:.3} Gbit/s  ratio {:.1}%",
            100.0 * emu_rate / veth_rate
        );
    }
    println!();
    Ok(())
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
const VETH_A: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const VETH_B: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);

fn gbit(bytes: u64, secs: f64) -> f64 {
    bytes as f64 * 8.0 / secs / 1e9
}

/// Two namespaces joined by a veth pair `bench-a` (VETH_A/24) ⇄ `bench-b` (VETH_B/24), up.
async fn veth_pair() -> Result<(NetNs, NetNs)> {
    let a = NetNs::new()?;
    let b = NetNs::new()?;
    let nl_a = Netlink::open(&a).await?;
    let nl_b = Netlink::open(&b).await?;
    let ia = nl_a.add_veth("bench-a", "bench-b", &b).await?;
    let ib = nl_b.link_index("bench-b").await?;
    for (nl, idx, addr) in [(&nl_a, ia, VETH_A), (&nl_b, ib, VETH_B)] {
        nl.add_address(idx, addr, 24).await?;
        nl.set_up(idx).await?;
        let lo = nl.link_index("lo").await?;
        nl.set_up(lo).await?;
    }
    Ok((a, b))
}

/// One TCP stream from namespace `from` to `listener` for TCP_DURATION; returns the bytes the
/// receiver got and the seconds from its first to its last byte.
fn tcp_stream(listener: TcpListener, from: &NetNs, to: SocketAddr) -> io::Result<(u64, f64)> {
    let receiver = std::thread::spawn(move || -> io::Result<(u64, f64)> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; TCP_WRITE];
        let mut total = 0u64;
        let mut first = None;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            total += n as u64;
        }
        let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
        Ok((total, secs))
    });
    // A freshly set-up link can take a moment to carry traffic: retry the connect briefly.
    let mut attempt = 0;
    let mut stream = loop {
        match from.run(|| TcpStream::connect_timeout(&to, Duration::from_secs(1)))? {
            Ok(s) => break s,
            Err(e) if attempt < 10 => {
                attempt += 1;
                eprintln!("   (connect failed, retrying: {e})");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    };
    let data = vec![0x5au8; TCP_WRITE];
    let start = Instant::now();
    while start.elapsed() < TCP_DURATION {
        stream.write_all(&data)?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    drop(stream);
    receiver
        .join()
        .map_err(|_| io::Error::other("receiver panicked"))?
}

// ---------------------------------------------------------------------------------------------
// 3. Small-packet rate and pump CPU per packet
// ---------------------------------------------------------------------------------------------

async fn packet_rate() -> Result<()> {
    println!(
        "3. Small packets: {PPS_PAYLOAD}-byte UDP payloads (92-byte IP packets) blasted from instance 0 to 1 for {} s",
        PPS_DURATION.as_secs()
    );
    let run = Run::start("pps", 2).await?;
    let rx = run.udp(1, 9002)?;
    rx.set_read_timeout(Some(Duration::from_millis(300)))?;
    let tx = run.udp(0, 0)?;
    tx.connect((run.addr(1), 9002))?;
    let pump = PumpClock::find(&run.run_id);
    let before = (run.counters(0)?, run.counters(1)?);

    let sending = Arc::new(AtomicBool::new(true));
    let receiver = {
        let sending = sending.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut got = 0u64;
            let cpu0 = thread_cpu();
            // Until the sender is done and nothing arrived for 300 ms.
            loop {
                match rx.recv(&mut buf) {
                    Ok(_) => got += 1,
                    Err(_) if !sending.load(Ordering::Relaxed) => {
                        return (got, thread_cpu() - cpu0);
                    }
                    Err(_) => {}
                }
            }
        })
    };
    let cpu0 = pump.as_ref().map(PumpClock::read);
    let (sent, send_errors, secs, sender_cpu) = tokio::task::block_in_place(|| {
        let payload = [0xa5u8; PPS_PAYLOAD];
        let (mut sent, mut errors) = (0u64, 0u64);
        let cpu0 = thread_cpu();
        let start = Instant::now();
        while start.elapsed() < PPS_DURATION {
            // A few sends per clock read.
            for _ in 0..64 {
                match tx.send(&payload) {
                    Ok(_) => sent += 1,
                    Err(_) => errors += 1,
                }
            }
        }
        (
            sent,
            errors,
            start.elapsed().as_secs_f64(),
            thread_cpu() - cpu0,
        )
    });
    sending.store(false, Ordering::Relaxed);
    let (received, receiver_cpu) = tokio::task::block_in_place(|| receiver.join())
        .map_err(|_| "the receiver thread panicked")?;
    let cpu = pump.as_ref().zip(cpu0).map(|(p, c0)| p.read() - c0);
    let after = (run.counters(0)?, run.counters(1)?);
    let stats = run.net.shutdown().await;

    let pumped = stats.as_ref().map_or(0, |s| s.sent);
    println!(
        "   delivered to the receiving socket: {:.0} packets/s ({received} in {secs:.2} s)",
        received as f64 / secs
    );
    println!(
        "   offered by the sender:             {:.0} packets/s ({sent} sends ok, {send_errors} failed)",
        sent as f64 / secs
    );
    println!(
        "   read by the pump:                  {:.0} packets/s ({pumped})",
        pumped as f64 / secs
    );
    if let Some(cpu) = cpu {
        println!(
            "   pump thread CPU: {:.2} s = {:.0}% of one core; {:.0} ns per packet read, {:.0} ns per packet delivered",
            cpu.secs(),
            100.0 * cpu.secs() / secs,
            cpu.nanos as f64 / pumped.max(1) as f64,
            cpu.nanos as f64 / received.max(1) as f64,
        );
        println!(
            "      (thread CPU clock; /proc/self/task/<tid>/stat utime+stime says {:.2} s)",
            cpu.ticks as f64 / CLK_TCK
        );
    } else {
        println!("   pump thread not found under /proc/self/task: no CPU figures");
    }
    println!(
        "   the other busy threads: sender {:.0}% of one core, receiver {:.0}% (send/recv syscalls and \
         the kernel work they carry)",
        100.0 * sender_cpu.as_secs_f64() / secs,
        100.0 * receiver_cpu.as_secs_f64() / secs
    );
    // Every packet from the sender's socket to the receiver's, counted at each hop.
    let (tx0, rx1) = (after.0 - before.0, after.1 - before.1);
    let emu = stats.clone().unwrap_or_default();
    println!("   packet accounting, sender to receiver:");
    println!(
        "      sender UDP: {} datagrams out, {} dropped for lack of buffer",
        tx0.udp_out, tx0.udp_sndbuf_errors
    );
    println!(
        "      sender eth1 (TUN): {} queued to the pump, {} dropped (queue full)",
        tx0.tx_packets, tx0.tx_drop
    );
    println!(
        "      emulator: {} read, {} delivered, {} dropped",
        emu.sent,
        emu.delivered,
        emu.dropped()
    );
    println!(
        "      receiver eth1 (TUN): {} received, {} dropped",
        rx1.rx_packets, rx1.rx_drop
    );
    println!(
        "      receiver UDP: {} datagrams in, {} dropped (socket buffer full); {received} read by the application",
        rx1.udp_in, rx1.udp_rcvbuf_errors
    );
    println!("   emulator counters: {}", counters(stats.as_ref()));
    Ok(())
}

/// The pump thread's CPU time, read from outside the thread.
struct PumpClock {
    tid: i32,
    clock: ClockId,
}

#[derive(Clone, Copy)]
struct Cpu {
    /// From the thread's CPU-time clock (nanosecond resolution).
    nanos: u64,
    /// utime + stime from `/proc/self/task/<tid>/stat` (1/CLK_TCK resolution).
    ticks: u64,
}

impl Cpu {
    fn secs(&self) -> f64 {
        self.nanos as f64 / 1e9
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            nanos: self.nanos - o.nanos,
            ticks: self.ticks - o.ticks,
        }
    }
}

impl PumpClock {
    /// Finds the thread `tg-pump-<run_id>` of this process.
    fn find(run_id: &str) -> Option<PumpClock> {
        let mut name = format!("tg-pump-{run_id}");
        name.truncate(COMM_LEN);
        for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.trim_end() == name {
                let tid: i32 = entry.file_name().to_str()?.parse().ok()?;
                // The kernel's per-thread CPU clock id: (~tid << 3) | CPUCLOCK_PERTHREAD (4) |
                // CPUCLOCK_SCHED (2); valid for threads of the calling process.
                let clock = ClockId::from_raw((!tid << 3) | 6);
                return Some(PumpClock { tid, clock });
            }
        }
        None
    }

    fn read(&self) -> Cpu {
        let nanos = clock_gettime(self.clock)
            .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
            .unwrap_or(0);
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let stat = std::fs::read_to_string(format!("/proc/self/task/{}/stat", self.tid))
            .unwrap_or_default();
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|f| f.parse().ok())
            .collect();
        Cpu {
            nanos,
            ticks: fields.iter().sum(),
        }
    }
}

/// The scheduling policy and real-time priority of the thread `tg-pump-<run_id>` (fields 41
/// and 40 of its `/proc/self/task/<tid>/stat`).
fn pump_policy(run_id: &str) -> String {
    let Some(pump) = PumpClock::find(run_id) else {
        return "pump thread not found".into();
    };
    let stat =
        std::fs::read_to_string(format!("/proc/self/task/{}/stat", pump.tid)).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // `rest` starts at field 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (prio, policy) = (fields.get(37), fields.get(38));
    match policy.and_then(|p| p.parse::<i32>().ok()) {
        Some(0) => "SCHED_OTHER (normal)".into(),
        Some(1) => format!("SCHED_FIFO, priority {}", prio.unwrap_or(&"?")),
        Some(2) => format!("SCHED_RR, priority {}", prio.unwrap_or(&"?")),
        Some(p) => format!("policy {p}"),
        None => "unknown".into(),
    }
}

/// How often the kernel's ARP table was full (`table_fulls` in `/proc/net/stat/arp_cache`,
/// summed over CPUs). The table is shared by every namespace of the machine, TUN devices
/// included (their entries are NOARP, but still entries): when other runs fill it, packets are
/// dropped before they reach `eth1`, with no interface counter to show for it.
fn arp_table_fulls() -> u64 {
    let stat = std::fs::read_to_string("/proc/net/stat/arp_cache").unwrap_or_default();
    let mut lines = stat.lines();
    let col = lines
        .next()
        .and_then(|h| h.split_whitespace().position(|c| c == "table_fulls"));
    let Some(col) = col else { return 0 };
    lines
        .filter_map(|l| l.split_whitespace().nth(col))
        .filter_map(|v| u64::from_str_radix(v, 16).ok())
        .sum()
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

/// Packet counters of an instance's `eth1` (`/proc/net/dev`) and UDP stack (`/proc/net/snmp`),
/// read inside its namespace.
#[derive(Clone, Copy, Default)]
struct Counters {
    rx_packets: u64,
    rx_drop: u64,
    tx_packets: u64,
    tx_drop: u64,
    udp_in: u64,
    udp_out: u64,
    udp_in_errors: u64,
    udp_rcvbuf_errors: u64,
    udp_sndbuf_errors: u64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            rx_packets: self.rx_packets - o.rx_packets,
            rx_drop: self.rx_drop - o.rx_drop,
            tx_packets: self.tx_packets - o.tx_packets,
            tx_drop: self.tx_drop - o.tx_drop,
            udp_in: self.udp_in - o.udp_in,
            udp_out: self.udp_out - o.udp_out,
            udp_in_errors: self.udp_in_errors - o.udp_in_errors,
            udp_rcvbuf_errors: self.udp_rcvbuf_errors - o.udp_rcvbuf_errors,
            udp_sndbuf_errors: self.udp_sndbuf_errors - o.udp_sndbuf_errors,
        }
    }
}

/// How the latency endpoints are scheduled: as `local:exec` and `local:netns` schedule an
/// instance's process (tg-runner's `instance_sched.rs`), chosen by the same environment
/// variable, `TESTGROUND_INSTANCE_SCHED` (`on`, the default: a session of its own and a 0.1 ms
/// time slice; `off`; or a list of `session`, `slice`, `group`). The session is the whole benchmark's (the pump
/// thread is real-time anyway); the slice is the endpoint threads'.
#[derive(Debug, Clone, Copy)]
struct EndpointSched {
    session: Option<bool>,
    slice: Option<u64>,
}

const ENDPOINT_SLICE_NS: u64 = 100_000;

fn endpoint_sched() -> EndpointSched {
    let v = std::env::var("TESTGROUND_INSTANCE_SCHED").unwrap_or_default();
    let v = v.trim().to_ascii_lowercase();
    let (session, slice) = match v.as_str() {
        "off" | "false" | "0" | "no" => (false, false),
        "" | "on" | "true" | "1" | "yes" => (true, true),
        // A list; `group` (one CPU group for a run's instances) has no meaning for threads of
        // this one process.
        list => {
            let has = |w: &str| list.split(',').any(|p| p.trim() == w);
            (has("session"), has("slice"))
        }
    };
    let session = session.then(|| tg_sys::sched::start_session().is_ok());
    let slice = (slice && tg_sys::sched::probe_slice(ENDPOINT_SLICE_NS).is_ok())
        .then_some(ENDPOINT_SLICE_NS);
    EndpointSched { session, slice }
}

impl EndpointSched {
    fn enter_thread(&self) {
        if let Some(s) = self.slice {
            let _ = tg_sys::sched::set_thread_slice(s);
        }
    }

    fn describe(&self) -> String {
        let session = match self.session {
            Some(true) => "a session of their own",
            Some(false) => "a session of their own was refused",
            None => "the caller's session",
        };
        let slice = match self.slice {
            Some(s) => format!("{} µs slice", s / 1_000),
            None => "default slice".to_string(),
        };
        format!("{session}, {slice}")
    }
}

// ---------------------------------------------------------------------------------------------
// A run's network, built as the local:netns runner builds it
// ---------------------------------------------------------------------------------------------

struct Run {
    run_id: String,
    net: RunNetwork,
    sync: SyncService,
    prefix: String,
    instances: Vec<Instance>,
    hostnames: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Run {
    /// A run network with `n` instances. `name` is short so that `tg-pump-<run_id>` fits in a
    /// thread name.
    async fn start(name: &str, n: u32) -> Result<Run> {
        let dir = tempfile::tempdir()?;
        let sync = SyncService::spawn();
        let run_id = format!("{name}{}", std::process::id() % 10_000);
        let prefix = format!("run:{run_id}:plan:bench:case:netns");
        // The network's log (warnings about configs); nothing is expected there.
        let (log, mut log_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(line) = log_rx.recv().await {
                eprintln!("   [network] {line}");
            }
        });
        let mut net = RunNetwork::create(
            Options {
                run_id: run_id.clone(),
                sync_prefix: prefix.clone(),
                sync: sync.clone(),
                seed: 1,
                capture: false,
                work_dir: dir.path().join("net"),
                subnet: None,
                forward: None,
            },
            log,
        )
        .await?;
        let mut instances = Vec::new();
        let mut hostnames = Vec::new();
        for i in 0..n {
            let hostname = format!("bench-{i}-{run_id}");
            let out = dir.path().join(format!("out{i}"));
            std::fs::create_dir_all(&out)?;
            instances.push(net.add_instance(i, &hostname, &out).await?);
            hostnames.push(hostname);
        }
        Ok(Run {
            run_id,
            net,
            sync,
            prefix,
            instances,
            hostnames,
            _dir: dir,
        })
    }

    fn addr(&self, i: usize) -> Ipv4Addr {
        self.instances[i].data_addr
    }

    /// Sets `default.latency` of instance `i` as its SDK would (a `network.Config` on
    /// `network:<hostname>`) and waits for the sidecar's callback state.
    async fn configure(&self, i: usize, latency: Duration) -> Result<()> {
        let shape = LinkShape {
            latency,
            ..LinkShape::default()
        };
        // Each callback state is used once per run (instance and latency are in its name).
        self.apply(i, shape, format!("latency-{i}-{}", latency.as_nanos()))
            .await
    }

    /// Sets instance `i`'s default link shape, as [`configure`](Self::configure) does its latency.
    async fn configure_shape(&self, i: usize, shape: LinkShape) -> Result<()> {
        self.apply(i, shape, format!("shape-{i}")).await
    }

    /// Publishes `shape` as instance `i`'s default link with callback `state`, and waits until
    /// the sidecar signals it.
    async fn apply(&self, i: usize, shape: LinkShape, state: String) -> Result<()> {
        let cfg = NetworkConfig {
            default: shape,
            callback_state: state.clone(),
            ..NetworkConfig::default()
        };
        let topic = format!("{}:topics:network:{}", self.prefix, self.hostnames[i]);
        self.sync
            .publish(&topic, serde_json::value::to_raw_value(&cfg)?)
            .await?;
        tokio::time::timeout(
            Duration::from_secs(10),
            self.sync
                .barrier(&format!("{}:states:{state}", self.prefix), 1),
        )
        .await
        .map_err(|_| "the sidecar did not apply the config within 10 s")??;
        Ok(())
    }

    fn udp(&self, i: usize, port: u16) -> io::Result<UdpSocket> {
        self.instances[i]
            .netns
            .run(move || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))?
    }

    fn listen(&self, i: usize, port: u16) -> io::Result<TcpListener> {
        self.instances[i]
            .netns
            .run(move || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))?
    }

    /// Reads a file under `/proc/thread-self/net` from inside instance `i`'s namespace.
    fn proc_net(&self, i: usize, file: &str) -> io::Result<String> {
        let path = format!("/proc/thread-self/net/{file}");
        self.instances[i]
            .netns
            .run(move || std::fs::read_to_string(path))?
    }

    fn counters(&self, i: usize) -> io::Result<Counters> {
        // `eth1: rx_bytes rx_packets rx_errs rx_drop ... tx_bytes tx_packets tx_errs tx_drop ...`
        let dev = self.proc_net(i, "dev")?;
        let eth1: Vec<u64> = dev
            .lines()
            .find_map(|l| l.trim().strip_prefix("eth1:"))
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        let dev = |k: usize| eth1.get(k).copied().unwrap_or(0);
        // Two `Udp:` lines: the field names, then the values.
        let snmp = self.proc_net(i, "snmp")?;
        let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
        let (names, values) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
        let udp = |name: &str| {
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == name)
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(Counters {
            rx_packets: dev(1),
            rx_drop: dev(3),
            tx_packets: dev(9),
            tx_drop: dev(11),
            udp_in: udp("InDatagrams"),
            udp_out: udp("OutDatagrams"),
            udp_in_errors: udp("InErrors"),
            udp_rcvbuf_errors: udp("RcvbufErrors"),
            udp_sndbuf_errors: udp("SndbufErrors"),
        })
    }
}

fn counters(stats: Option<&tg_netem::Stats>) -> String {
    match stats {
        None => "unavailable (the pump had stopped)".into(),
        Some(s) => format!(
            "sent {}, delivered {}, dropped {} (queue full {}, loss {}, no route {})",
            s.sent,
            s.delivered,
            s.dropped(),
            s.queue_full,
            s.loss,
            s.no_route
        ),
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim());
    format!("{cores} cores, {model}, Linux {}", kernel.trim())
}

fn loadavg() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}
