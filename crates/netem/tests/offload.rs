//! Super-packets and partial checksums (TUN offloads) through the emulator: every impairment, rule and
//! counter acts per wire packet, exactly as if the sender's kernel had segmented the packets itself.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tg_netem::offload::{self, Gso, PartialCsum};
use tg_netem::packet::checksum;
use tg_netem::{
    Delivery, DropReason, Emulator, Filter, Nanos, NodeConfig, NodeId, Offload, Rule, Shape,
    Verdict,
};

const MS: Nanos = 1_000_000;
const MSS: u16 = 1448;

fn ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, n as u8 + 1)
}

fn emulator(seed: u64, n: u32) -> Emulator {
    let mut e = Emulator::new(seed);
    for i in 0..n {
        e.add_node(NodeId(i), ip(i)).unwrap();
    }
    e
}

/// The folded pseudo-header sum a kernel leaves in a partial TCP checksum.
fn pseudo_sum(p: &[u8]) -> u16 {
    let mut v = Vec::new();
    v.extend_from_slice(&p[12..20]);
    v.extend_from_slice(&[0, 6]);
    v.extend_from_slice(&((p.len() - 20) as u16).to_be_bytes());
    !checksum(&v)
}

/// A TCP/IPv4 super-packet from node `from` to node `to` with `len` payload bytes (ACK|PSH), its TCP
/// checksum partial as a TSO kernel leaves it; `seq` tells packets apart.
fn super_packet(from: u32, to: u32, len: usize, seq: u32) -> Vec<u8> {
    let total = 40 + len;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&ip(from).octets());
    p[16..20].copy_from_slice(&ip(to).octets());
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..22].copy_from_slice(&1000u16.to_be_bytes());
    p[22..24].copy_from_slice(&2000u16.to_be_bytes());
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = 0x18;
    for (i, b) in p[40..].iter_mut().enumerate() {
        *b = (i as u32 ^ seq) as u8;
    }
    let partial = pseudo_sum(&p);
    p[36..38].copy_from_slice(&partial.to_be_bytes());
    p
}

fn tso() -> Offload {
    Offload {
        gso: Some(Gso {
            size: MSS,
            ecn: false,
        }),
        csum: Some(PartialCsum {
            start: 20,
            offset: 16,
        }),
    }
}

fn drain(e: &mut Emulator, now: Nanos) -> Vec<(Nanos, Delivery)> {
    std::iter::from_fn(|| e.poll_timed(now)).collect()
}

/// Everything a run produces: deliveries with due times, and the counters.
type Outcome = (Vec<(Nanos, Delivery)>, tg_netem::Stats);

/// Sends `count` super-packets of 10 segments each (plus a short one) through `cfg`, once offloaded and
/// once segmented by the test (with the kernel's segmentation, `offload::segment_tcp4`), from two
/// emulators with the same seed.
fn both_ways(cfg: NodeConfig, count: u32) -> (Outcome, Outcome) {
    let mut offloaded = emulator(7, 3);
    let mut segmented = emulator(7, 3);
    offloaded.configure(NodeId(0), cfg.clone()).unwrap();
    segmented.configure(NodeId(0), cfg).unwrap();
    for i in 0..count {
        let now = u64::from(i) * MS;
        let to = 1 + i % 2;
        let p = super_packet(0, to, usize::from(MSS) * 10 + 100, i * 100_000);
        offloaded.send_offloaded(now, NodeId(0), p.clone(), tso());
        let mut segs = Vec::new();
        offload::segment_tcp4(&p, usize::from(MSS), &mut segs).unwrap();
        for s in segs {
            segmented.send(now, NodeId(0), s);
        }
    }
    let end = u64::from(count) * MS + 10_000 * MS;
    let a = (drain(&mut offloaded, end), offloaded.stats().clone());
    let b = (drain(&mut segmented, end), segmented.stats().clone());
    (a, b)
}

fn shaped(shape: Shape) -> NodeConfig {
    NodeConfig {
        default: shape,
        ..NodeConfig::default()
    }
}

#[test]
fn impaired_links_see_the_segments_of_a_super_packet() {
    let shapes = [
        Shape {
            loss: 10.0,
            ..Shape::default()
        },
        Shape {
            duplicate: 10.0,
            ..Shape::default()
        },
        Shape {
            corrupt: 10.0,
            ..Shape::default()
        },
        Shape {
            latency: 5 * MS,
            reorder: 20.0,
            ..Shape::default()
        },
        Shape {
            latency: 5 * MS,
            jitter: 2 * MS,
            ..Shape::default()
        },
        Shape {
            bandwidth: 100_000_000,
            ..Shape::default()
        },
        Shape {
            latency: 2 * MS,
            loss: 5.0,
            duplicate: 5.0,
            corrupt: 5.0,
            bandwidth: 50_000_000,
            ..Shape::default()
        },
    ];
    for shape in shapes {
        let (offloaded, segmented) = both_ways(shaped(shape), 200);
        assert_eq!(offloaded.1, segmented.1, "counters for {shape:?}");
        assert_eq!(offloaded.0, segmented.0, "deliveries for {shape:?}");
        // Nothing left for the receiving kernel: wire packets, each with complete checksums (but for
        // corrupted ones, whose bit flip the receiver must catch).
        assert!(offloaded.0.iter().all(|(_, d)| d.offload == Offload::NONE));
        assert!(offloaded.1.delivered > 0);
    }
}

#[test]
fn the_rates_hold_per_wire_packet() {
    let (offloaded, _) = both_ways(
        shaped(Shape {
            loss: 20.0,
            duplicate: 10.0,
            corrupt: 10.0,
            ..Shape::default()
        }),
        500,
    );
    let s = offloaded.1;
    // 500 super-packets of 11 segments each.
    assert_eq!(s.sent, 5_500);
    let rate = |n: u64| n as f64 / 5_500.0;
    assert!((0.17..0.23).contains(&rate(s.loss)), "{s:?}");
    assert!((0.07..0.13).contains(&rate(s.duplicated)), "{s:?}");
    assert!((0.07..0.13).contains(&rate(s.corrupted)), "{s:?}");
    // A corrupted segment fails the receiver's TCP checksum; the others pass.
    let bad = offloaded
        .0
        .iter()
        .filter(|(_, d)| {
            let p = &d.packet;
            let mut v = Vec::new();
            v.extend_from_slice(&p[12..20]);
            v.extend_from_slice(&[0, 6]);
            v.extend_from_slice(&((p.len() - 20) as u16).to_be_bytes());
            v.extend_from_slice(&p[20..]);
            checksum(&v) != 0
        })
        .count();
    assert_eq!(bad as u64, s.corrupted);
}

#[test]
fn a_link_that_only_delays_passes_super_packets_whole_counted_per_segment() {
    for latency in [0, 3 * MS] {
        let cfg = shaped(Shape {
            latency,
            ..Shape::default()
        });
        let (offloaded, segmented) = both_ways(cfg, 50);
        assert_eq!(offloaded.1, segmented.1, "the same counters");
        assert_eq!(offloaded.0.len(), 50, "one delivery per super-packet");
        assert_eq!(segmented.0.len(), 50 * 11);
        for (i, (due, d)) in offloaded.0.iter().enumerate() {
            assert_eq!(*due, i as u64 * MS + latency);
            assert_eq!(d.offload, tso(), "still offloaded");
            assert_eq!(d.to, NodeId(1 + i as u32 % 2));
            // Its segments are exactly what the segmented run delivered, at the same time.
            let mut segs = Vec::new();
            offload::wire_packets(d.packet.clone(), d.offload, &mut segs).unwrap();
            let theirs: Vec<&Vec<u8>> = segmented.0[i * 11..(i + 1) * 11]
                .iter()
                .map(|(t, s)| {
                    assert_eq!(t, due);
                    &s.packet
                })
                .collect();
            assert_eq!(segs.iter().collect::<Vec<_>>(), theirs);
        }
    }
}

#[test]
fn rules_filters_and_disabled_nodes_act_per_wire_packet() {
    // To node 1: rejected (one ICMP error per segment); to node 2: dropped by its own rule.
    let rules = NodeConfig {
        rules: vec![
            Rule {
                subnet: Ipv4Net::new(ip(1), 32).unwrap(),
                filter: Filter::Reject,
                shape: Shape::default(),
            },
            Rule {
                subnet: Ipv4Net::new(ip(2), 32).unwrap(),
                filter: Filter::Drop,
                shape: Shape::default(),
            },
        ],
        ..NodeConfig::default()
    };
    let (offloaded, segmented) = both_ways(rules, 20);
    assert_eq!(offloaded, segmented);
    assert_eq!(offloaded.1.rejected, 10 * 11);
    assert_eq!(offloaded.1.filtered_drop, 10 * 11);

    // A latency rule for one subnet passes whole there; the default (lossy) link segments.
    let mixed = NodeConfig {
        default: Shape {
            loss: 30.0,
            ..Shape::default()
        },
        rules: vec![Rule {
            subnet: Ipv4Net::new(ip(1), 32).unwrap(),
            filter: Filter::Accept,
            shape: Shape {
                latency: MS,
                ..Shape::default()
            },
        }],
        ..NodeConfig::default()
    };
    let (offloaded, segmented) = both_ways(mixed, 20);
    assert_eq!(offloaded.1, segmented.1);
    let whole = offloaded.0.iter().filter(|(_, d)| d.to == NodeId(1));
    assert!(whole.clone().all(|(_, d)| d.offload == tso()));
    assert_eq!(whole.count(), 10);

    // Disabled sender, then disabled receiver: every segment counted as dropped.
    let mut e = emulator(1, 2);
    let off = NodeConfig {
        enabled: false,
        ..NodeConfig::default()
    };
    let p = super_packet(0, 1, usize::from(MSS) * 3, 0);
    e.configure(NodeId(0), off.clone()).unwrap();
    assert_eq!(
        e.send_offloaded(0, NodeId(0), p.clone(), tso()),
        Verdict::Dropped(DropReason::Disabled)
    );
    e.configure(NodeId(0), NodeConfig::default()).unwrap();
    e.configure(NodeId(1), off).unwrap();
    e.send_offloaded(0, NodeId(0), p, tso());
    assert_eq!((e.stats().sent, e.stats().disabled), (6, 6));
    assert!(e.poll(0).is_none());
}

#[test]
fn partial_checksums_are_completed_before_an_impairment_and_kept_otherwise() {
    // One wire packet with a partial checksum (no segmentation).
    let p = super_packet(0, 1, 500, 9);
    let csum = Offload { gso: None, ..tso() };
    let mut e = emulator(3, 2);
    e.send_offloaded(0, NodeId(0), p.clone(), csum);
    let d = e.poll(0).unwrap();
    assert_eq!(
        (d.packet, d.offload),
        (p.clone(), csum),
        "unshaped: left to the receiver"
    );

    e.configure(
        NodeId(0),
        shaped(Shape {
            corrupt: 100.0,
            ..Shape::default()
        }),
    )
    .unwrap();
    e.send_offloaded(0, NodeId(0), p.clone(), csum);
    let d = e.poll(0).unwrap();
    assert_eq!(d.offload, Offload::NONE);
    // Completed, then one payload bit flipped: the checksum no longer matches.
    let mut complete = vec![p];
    let mut full = Vec::new();
    offload::wire_packets(complete.remove(0), csum, &mut full).unwrap();
    let diff: u32 = full[0]
        .iter()
        .zip(&d.packet)
        .map(|(a, b)| (a ^ b).count_ones())
        .sum();
    assert_eq!(diff, 1);
}

#[test]
fn offloads_that_cannot_be_done_are_malformed() {
    let mut e = emulator(1, 2);
    let mut udp = super_packet(0, 1, 3000, 0);
    udp[9] = 17;
    assert_eq!(
        e.send_offloaded(0, NodeId(0), udp, tso()),
        Verdict::Dropped(DropReason::Malformed)
    );
    assert_eq!((e.stats().sent, e.stats().malformed), (1, 1));
}
