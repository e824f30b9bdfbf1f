//! Measures how many packets per second the emulator core pushes through `send` + `poll` on one core.
//!
//! Simulated time advances 1 µs per packet (1M packets/s offered in total) and packets are polled as they
//! fall due, so shaped configurations keep a realistic number of packets in flight. Delivered buffers are
//! reused for the next send, as a sidecar with a buffer pool would, so the numbers measure the core rather
//! than the allocator.
//!
//! Run with `cargo run --release -p tg-netem --example netem-throughput`.

use std::net::Ipv4Addr;
use std::time::Instant;

use tg_netem::packet::checksum;
use tg_netem::{Emulator, Nanos, NodeConfig, NodeId, Shape};

const NODES: u32 = 8;
const PACKETS: u64 = 1_000_000;
const SIZE: usize = 1400;
const MS: Nanos = 1_000_000;

fn addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 1 + i as u8)
}

fn template(from: u32, to: u32) -> Vec<u8> {
    let mut p = vec![0u8; SIZE];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(SIZE as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&addr(from).octets());
    p[16..20].copy_from_slice(&addr(to).octets());
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p
}

fn bench(name: &str, shape: Shape) {
    let mut e = Emulator::new(1);
    for i in 0..NODES {
        e.add_node(NodeId(i), addr(i)).unwrap();
        e.configure(
            NodeId(i),
            NodeConfig {
                default: shape,
                ..NodeConfig::default()
            },
        )
        .unwrap();
    }
    // Every ordered pair of distinct nodes, round robin.
    let pairs: Vec<(u32, u32, Vec<u8>)> = (0..NODES)
        .flat_map(|f| (0..NODES).filter(move |&t| t != f).map(move |t| (f, t)))
        .map(|(f, t)| (f, t, template(f, t)))
        .collect();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut delivered = 0u64;
    let start = Instant::now();
    let mut now: Nanos = 0;
    for i in 0..PACKETS {
        now += 1_000;
        let (from, _, tpl) = &pairs[i as usize % pairs.len()];
        let mut buf = pool.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(tpl);
        e.send(now, NodeId(*from), buf);
        while let Some(d) = e.poll(now) {
            delivered += 1;
            pool.push(d.packet);
        }
    }
    while let Some(d) = e.poll(u64::MAX) {
        delivered += 1;
        pool.push(d.packet);
    }
    let elapsed = start.elapsed();
    let s = e.stats();
    println!(
        "{name:<40} {:>6.2} M packets/s  {:>6.1} ns/packet  (delivered {delivered}, lost {}, queue-full {})",
        PACKETS as f64 / elapsed.as_secs_f64() / 1e6,
        elapsed.as_nanos() as f64 / PACKETS as f64,
        s.loss,
        s.queue_full,
    );
}

fn main() {
    println!(
        "{PACKETS} packets of {SIZE} bytes, {NODES} nodes, all {} ordered pairs",
        NODES * (NODES - 1)
    );
    bench("unshaped", Shape::default());
    bench(
        "latency 10ms",
        Shape {
            latency: 10 * MS,
            ..Shape::default()
        },
    );
    bench(
        "latency 10ms jitter 2ms loss 1% 10Gbit/s",
        Shape {
            latency: 10 * MS,
            jitter: 2 * MS,
            loss: 1.0,
            bandwidth: 10_000_000_000,
            ..Shape::default()
        },
    );
    bench(
        "everything (+ dup/corrupt/reorder 1%)",
        Shape {
            latency: 10 * MS,
            jitter: 2 * MS,
            loss: 1.0,
            bandwidth: 10_000_000_000,
            duplicate: 1.0,
            corrupt: 1.0,
            reorder: 1.0,
            ..Shape::default()
        },
    );
}
