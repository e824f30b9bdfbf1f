//! Behaviour of the emulator through its public API, with synthetic UDP-in-IPv4 packets.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use proptest::prelude::*;
use tg_netem::packet::{checksum, parse_ipv4};
use tg_netem::{
    DropReason, Emulator, Filter, Nanos, NetemError, NodeConfig, NodeId, Rule, Shape, Verdict,
};

const MS: Nanos = 1_000_000;

fn ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, (n >> 8) as u8, n as u8 + 1)
}

/// A UDP datagram from `src` to `dst` of `len` bytes in total (at least 28), with valid IP and UDP checksums;
/// the payload starts with `tag` so packets can be told apart, and the IP identification field holds its low
/// 16 bits, which corruption (payload only) cannot touch.
fn udp(src: Ipv4Addr, dst: Ipv4Addr, len: usize, tag: u32) -> Vec<u8> {
    assert!(len >= 32);
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[4..6].copy_from_slice(&(tag as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
    p[28..32].copy_from_slice(&tag.to_be_bytes());
    for (i, b) in p[32..].iter_mut().enumerate() {
        *b = i as u8;
    }
    // UDP checksum over the pseudo-header and the datagram.
    let mut pseudo = Vec::with_capacity(12 + len - 20);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&((len - 20) as u16).to_be_bytes());
    pseudo.extend_from_slice(&p[20..]);
    let sum = checksum(&pseudo);
    p[26..28].copy_from_slice(&sum.to_be_bytes());
    p
}

fn tag(p: &[u8]) -> u32 {
    u32::from_be_bytes(p[28..32].try_into().unwrap())
}

/// The tag's low 16 bits, from the IP header.
fn header_tag(p: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([p[4], p[5]]))
}

/// An emulator with nodes 0..n at `ip(i)`.
fn emulator(seed: u64, n: u32) -> Emulator {
    let mut e = Emulator::new(seed);
    for i in 0..n {
        e.add_node(NodeId(i), ip(i)).unwrap();
    }
    e
}

fn shaped(shape: Shape) -> NodeConfig {
    NodeConfig {
        default: shape,
        ..NodeConfig::default()
    }
}

fn pkt(from: u32, to: u32, tag: u32) -> Vec<u8> {
    udp(ip(from), ip(to), 100, tag)
}

/// Polls everything due by `now`, with due times.
fn drain(e: &mut Emulator, now: Nanos) -> Vec<(Nanos, NodeId, Vec<u8>)> {
    std::iter::from_fn(|| e.poll_timed(now))
        .map(|(due, d)| (due, d.to, d.packet))
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// Routing and nodes

#[test]
fn routes_to_the_destination_node() {
    let mut e = emulator(1, 3);
    assert_eq!(e.send(5, NodeId(0), pkt(0, 2, 1)), Verdict::Scheduled);
    assert_eq!(e.send(5, NodeId(2), pkt(2, 1, 2)), Verdict::Scheduled);
    assert_eq!(
        e.send(5, NodeId(1), pkt(1, 1, 3)),
        Verdict::Scheduled,
        "to itself"
    );
    assert_eq!(e.next_deadline(), Some(5));
    assert!(e.poll(4).is_none());
    let got: Vec<_> = drain(&mut e, 5)
        .into_iter()
        .map(|(due, to, p)| (due, to, tag(&p)))
        .collect();
    assert_eq!(
        got,
        [(5, NodeId(2), 1), (5, NodeId(1), 2), (5, NodeId(1), 3)]
    );
    assert_eq!(e.next_deadline(), None);
    assert_eq!(e.stats().sent, 3);
    assert_eq!(e.stats().delivered, 3);
}

#[test]
fn unroutable_and_malformed_are_dropped() {
    let mut e = emulator(1, 2);
    let stranger = udp(ip(0), Ipv4Addr::new(192, 168, 1, 1), 100, 0);
    assert_eq!(
        e.send(0, NodeId(0), stranger),
        Verdict::Dropped(DropReason::NoRoute)
    );
    let mut v6 = pkt(0, 1, 0);
    v6[0] = 0x60;
    assert_eq!(
        e.send(0, NodeId(0), v6),
        Verdict::Dropped(DropReason::Malformed)
    );
    assert_eq!(
        e.send(0, NodeId(0), pkt(0, 1, 0)[..10].to_vec()),
        Verdict::Dropped(DropReason::Malformed)
    );
    assert_eq!(
        e.send(0, NodeId(9), pkt(0, 1, 0)),
        Verdict::Dropped(DropReason::UnknownSender)
    );
    assert_eq!(e.stats().no_route, 1);
    assert_eq!(e.stats().malformed, 2);
    assert_eq!(e.stats().unknown_sender, 1);
    assert!(e.poll(u64::MAX).is_none());
}

#[test]
fn disabled_nodes_neither_send_nor_receive() {
    let mut e = emulator(1, 3);
    let off = NodeConfig {
        enabled: false,
        ..NodeConfig::default()
    };
    e.configure(NodeId(1), off).unwrap();
    let disabled = Verdict::Dropped(DropReason::Disabled);
    assert_eq!(e.send(0, NodeId(1), pkt(1, 0, 0)), disabled, "sender");
    assert_eq!(e.send(0, NodeId(0), pkt(0, 1, 0)), disabled, "receiver");
    assert_eq!(e.send(0, NodeId(0), pkt(0, 2, 0)), Verdict::Scheduled);
    assert_eq!(e.stats().disabled, 2);
    e.configure(NodeId(1), NodeConfig::default()).unwrap();
    assert_eq!(e.send(0, NodeId(0), pkt(0, 1, 0)), Verdict::Scheduled);
}

#[test]
fn node_management() {
    let mut e = emulator(1, 2);
    assert_eq!(e.addr(NodeId(1)), Some(ip(1)));
    assert_eq!(e.node_at(ip(1)), Some(NodeId(1)));
    assert_eq!(
        e.add_node(NodeId(1), ip(7)),
        Err(NetemError::NodeExists { node: NodeId(1) })
    );
    assert_eq!(
        e.add_node(NodeId(2), ip(1)),
        Err(NetemError::AddressTaken {
            addr: ip(1),
            by: NodeId(1)
        })
    );
    assert_eq!(
        e.set_addr(NodeId(0), ip(1)),
        Err(NetemError::AddressTaken {
            addr: ip(1),
            by: NodeId(1)
        })
    );
    assert_eq!(
        e.set_addr(NodeId(5), ip(5)),
        Err(NetemError::UnknownNode { node: NodeId(5) })
    );
    assert_eq!(
        e.configure(NodeId(5), NodeConfig::default()),
        Err(NetemError::UnknownNode { node: NodeId(5) })
    );
    assert!(matches!(
        e.add_node(NodeId(u32::MAX), ip(9)),
        Err(NetemError::NodeIdTooLarge { .. })
    ));
    assert_eq!(
        NetemError::UnknownNode { node: NodeId(5) }.to_string(),
        "unknown node 5"
    );

    // Moving node 1: the old address is unroutable, the new one reaches it.
    e.set_addr(NodeId(1), ip(1)).unwrap();
    e.set_addr(NodeId(1), ip(50)).unwrap();
    assert_eq!(e.node_at(ip(1)), None);
    assert_eq!(e.node_at(ip(50)), Some(NodeId(1)));
    assert_eq!(
        e.send(0, NodeId(0), pkt(0, 1, 0)),
        Verdict::Dropped(DropReason::NoRoute)
    );
    assert_eq!(
        e.send(0, NodeId(0), udp(ip(0), ip(50), 100, 7)),
        Verdict::Scheduled
    );
    let d = e.poll(0).unwrap();
    assert_eq!((d.to, tag(&d.packet)), (NodeId(1), 7));
    // The freed address can be taken by someone else.
    e.add_node(NodeId(2), ip(1)).unwrap();

    // Removal: the address is freed, in-flight packets to it are discarded.
    e.configure(
        NodeId(0),
        shaped(Shape {
            latency: MS,
            ..Shape::default()
        }),
    )
    .unwrap();
    assert_eq!(e.send(0, NodeId(0), pkt(0, 1, 0)), Verdict::Scheduled);
    e.remove_node(NodeId(2));
    e.remove_node(NodeId(2));
    assert_eq!(e.node_at(ip(1)), None);
    assert_eq!(e.addr(NodeId(2)), None);
    assert!(e.poll(MS).is_none());
    assert_eq!(e.stats().discarded, 1);
}

#[test]
fn longest_prefix_rule_wins() {
    let mut e = emulator(1, 4);
    let rule = |subnet: &str, latency: Nanos| Rule {
        subnet: subnet.parse::<Ipv4Net>().unwrap(),
        filter: Filter::Accept,
        shape: Shape {
            latency,
            ..Shape::default()
        },
    };
    let cfg = NodeConfig {
        default: Shape {
            latency: 1,
            ..Shape::default()
        },
        rules: vec![
            rule("10.0.0.0/16", 10),
            rule("10.0.0.2/32", 20),
            rule("10.0.0.0/24", 30),
            rule("10.0.0.0/24", 40), // same prefix as the previous one: the first wins
            rule("192.168.0.0/16", 50),
        ],
        ..NodeConfig::default()
    };
    e.configure(NodeId(0), cfg).unwrap();
    let mut outside = udp(ip(0), Ipv4Addr::new(10, 1, 0, 1), 100, 0);
    e.add_node(NodeId(9), Ipv4Addr::new(10, 1, 0, 1)).unwrap();
    e.add_node(NodeId(8), Ipv4Addr::new(10, 0, 1, 1)).unwrap();
    e.send(0, NodeId(0), pkt(0, 1, 1)); // 10.0.0.2: /32
    e.send(0, NodeId(0), pkt(0, 2, 2)); // 10.0.0.3: /24
    e.send(0, NodeId(0), udp(ip(0), Ipv4Addr::new(10, 0, 1, 1), 100, 3)); // /16
    outside[28..32].copy_from_slice(&4u32.to_be_bytes());
    e.send(0, NodeId(0), outside); // default
    let mut got: Vec<_> = drain(&mut e, 100)
        .into_iter()
        .map(|(due, _, p)| (tag(&p), due))
        .collect();
    got.sort();
    assert_eq!(got, [(1, 20), (2, 30), (3, 10), (4, 1)]);
}

#[test]
fn per_rule_shaping_and_filters() {
    let mut e = emulator(1, 4);
    let cfg = NodeConfig {
        rules: vec![
            Rule {
                subnet: Ipv4Net::new(ip(1), 32).unwrap(),
                filter: Filter::Accept,
                shape: Shape {
                    latency: 5 * MS,
                    ..Shape::default()
                },
            },
            Rule {
                subnet: Ipv4Net::new(ip(2), 32).unwrap(),
                filter: Filter::Accept,
                shape: Shape {
                    latency: 50 * MS,
                    ..Shape::default()
                },
            },
            Rule {
                subnet: Ipv4Net::new(ip(3), 32).unwrap(),
                filter: Filter::Drop,
                shape: Shape::default(),
            },
        ],
        ..NodeConfig::default()
    };
    e.configure(NodeId(0), cfg).unwrap();
    e.send(0, NodeId(0), pkt(0, 2, 2));
    e.send(0, NodeId(0), pkt(0, 1, 1));
    assert_eq!(
        e.send(0, NodeId(0), pkt(0, 3, 3)),
        Verdict::Dropped(DropReason::FilteredDrop)
    );
    // Shaping is egress: node 1's replies are not delayed.
    e.send(0, NodeId(1), pkt(1, 0, 9));
    let got: Vec<_> = drain(&mut e, u64::MAX)
        .into_iter()
        .map(|(due, to, p)| (due, to, tag(&p)))
        .collect();
    assert_eq!(
        got,
        [
            (0, NodeId(0), 9),
            (5 * MS, NodeId(1), 1),
            (50 * MS, NodeId(2), 2)
        ]
    );
    assert_eq!(e.stats().filtered_drop, 1);
}

// ---------------------------------------------------------------------------------------------------------
// Reject

#[test]
fn reject_answers_with_icmp_admin_prohibited() {
    let mut e = emulator(1, 2);
    let cfg = NodeConfig {
        filter: Filter::Reject,
        default: Shape {
            latency: 100 * MS,
            loss: 100.0,
            ..Shape::default()
        },
        ..NodeConfig::default()
    };
    e.configure(NodeId(0), cfg).unwrap();
    let orig = pkt(0, 1, 42);
    assert_eq!(e.send(7, NodeId(0), orig.clone()), Verdict::Rejected);
    assert_eq!(e.next_deadline(), Some(7), "unshaped, at once");
    let (due, d) = e.poll_timed(7).unwrap();
    assert_eq!((due, d.to), (7, NodeId(0)));
    let r = &d.packet;
    let h = parse_ipv4(r).unwrap();
    assert_eq!((h.src, h.dst, h.protocol), (ip(1), ip(0), 1));
    assert_eq!(h.total_len, r.len());
    assert_eq!(r[8], 64, "ttl");
    assert_eq!(checksum(&r[..h.header_len]), 0, "ip checksum");
    assert_eq!(checksum(&r[h.header_len..]), 0, "icmp checksum");
    assert_eq!(&r[20..22], &[3, 13]);
    assert!(r.len() >= 20 + 8 + 28);
    assert_eq!(&r[28..56], &orig[..28], "quotes the header and 8 bytes");
    assert_eq!(e.stats().rejected, 1);
    assert_eq!(e.stats().icmp_replies, 1);

    // Node 1 rejects too: an ICMP error aimed at it is dropped, not answered.
    e.configure(
        NodeId(1),
        NodeConfig {
            filter: Filter::Reject,
            ..NodeConfig::default()
        },
    )
    .unwrap();
    let mut error = d.packet.clone();
    // Swap the addresses so node 1 "sends" the error to node 0: it is an error, so it gets no answer.
    error[12..16].copy_from_slice(&ip(1).octets());
    error[16..20].copy_from_slice(&ip(0).octets());
    assert_eq!(
        e.send(8, NodeId(1), error),
        Verdict::Dropped(DropReason::Rejected)
    );
    assert!(e.poll(u64::MAX).is_none());
    assert_eq!(e.stats().rejected, 2);
    assert_eq!(e.stats().icmp_replies, 1);
}

// ---------------------------------------------------------------------------------------------------------
// Delay

#[test]
fn latency_is_exact_and_fifo() {
    let mut e = emulator(1, 2);
    e.configure(
        NodeId(0),
        shaped(Shape {
            latency: 30 * MS,
            ..Shape::default()
        }),
    )
    .unwrap();
    for i in 0..100u32 {
        e.send(Nanos::from(i) * 1000, NodeId(0), pkt(0, 1, i));
    }
    let got = drain(&mut e, u64::MAX);
    assert_eq!(got.len(), 100);
    for (i, (due, _, p)) in got.iter().enumerate() {
        assert_eq!(tag(p), i as u32);
        assert_eq!(*due, 30 * MS + i as u64 * 1000);
    }
}

#[test]
fn jitter_is_uniform_around_latency() {
    let mut e = emulator(3, 2);
    let (latency, jitter) = (50 * MS, 10 * MS);
    e.configure(
        NodeId(0),
        shaped(Shape {
            latency,
            jitter,
            ..Shape::default()
        }),
    )
    .unwrap();
    let n = 10_000;
    for i in 0..n {
        e.send(0, NodeId(0), pkt(0, 1, i));
    }
    let delays: Vec<f64> = drain(&mut e, u64::MAX)
        .iter()
        .map(|(due, _, _)| *due as f64)
        .collect();
    assert_eq!(delays.len(), n as usize);
    assert!(
        delays
            .iter()
            .all(|&d| d >= (latency - jitter) as f64 && d <= (latency + jitter) as f64)
    );
    let mean = delays.iter().sum::<f64>() / delays.len() as f64;
    let sd = (delays.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / delays.len() as f64).sqrt();
    let expected = jitter as f64 / 3f64.sqrt();
    assert!(
        (sd - expected).abs() < expected * 0.1,
        "sd {sd} vs {expected}"
    );
    assert!(
        (mean - latency as f64).abs() < jitter as f64 * 0.05,
        "mean {mean}"
    );
}

#[test]
fn jitter_reorders_like_tfifo() {
    let mut e = emulator(3, 2);
    e.configure(
        NodeId(0),
        shaped(Shape {
            latency: 10 * MS,
            jitter: 5 * MS,
            ..Shape::default()
        }),
    )
    .unwrap();
    for i in 0..1000 {
        e.send(u64::from(i) * 100_000, NodeId(0), pkt(0, 1, i));
    }
    let got = drain(&mut e, u64::MAX);
    assert!(got.windows(2).all(|w| w[0].0 <= w[1].0));
    assert!(got.windows(2).any(|w| tag(&w[0].2) > tag(&w[1].2)));
}

#[test]
fn reorder_sends_some_packets_at_once() {
    let mut e = emulator(5, 2);
    e.configure(
        NodeId(0),
        shaped(Shape {
            latency: 10 * MS,
            reorder: 25.0,
            ..Shape::default()
        }),
    )
    .unwrap();
    let n = 100_000u64;
    for i in 0..n {
        e.send(i, NodeId(0), pkt(0, 1, i as u32));
    }
    let reordered = e.stats().reordered;
    assert!(
        (reordered as f64 / n as f64 - 0.25).abs() < 0.01,
        "{reordered}"
    );
    let got = drain(&mut e, u64::MAX);
    let immediate = got
        .iter()
        .filter(|(due, _, p)| *due == u64::from(tag(p)))
        .count();
    assert_eq!(immediate as u64, reordered);
    assert!(
        got.iter()
            .all(|(due, _, p)| *due == u64::from(tag(p)) || *due == u64::from(tag(p)) + 10 * MS)
    );
}

// ---------------------------------------------------------------------------------------------------------
// Bandwidth

#[test]
fn bandwidth_serialises_at_the_configured_rate() {
    let mut e = emulator(1, 2);
    e.configure(
        NodeId(0),
        shaped(Shape {
            bandwidth: 8_000_000,
            ..Shape::default()
        }),
    )
    .unwrap();
    for i in 0..1000 {
        assert_eq!(
            e.send(0, NodeId(0), udp(ip(0), ip(1), 1000, i)),
            Verdict::Scheduled
        );
    }
    let got = drain(&mut e, u64::MAX);
    assert_eq!(got.len(), 1000);
    assert_eq!(
        got.last().unwrap().0,
        1_000_000_000,
        "last one at exactly 1 s"
    );
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, (due, _, _))| *due == (i as u64 + 1) * MS)
    );
}

#[test]
fn bandwidth_queue_tail_drops() {
    let mut e = emulator(1, 2);
    e.configure(
        NodeId(0),
        shaped(Shape {
            bandwidth: 8_000_000,
            latency: 5 * MS,
            ..Shape::default()
        }),
    )
    .unwrap();
    e.set_queue_limit(10);
    let verdicts: Vec<_> = (0..15)
        .map(|i| e.send(0, NodeId(0), udp(ip(0), ip(1), 1000, i)))
        .collect();
    assert!(verdicts[..10].iter().all(|v| *v == Verdict::Scheduled));
    assert!(
        verdicts[10..]
            .iter()
            .all(|v| *v == Verdict::Dropped(DropReason::QueueFull))
    );
    // After 3.5 ms, three packets have left the wire (latency does not count against the queue).
    assert_eq!(
        e.send(3_500_000, NodeId(0), udp(ip(0), ip(1), 1000, 99)),
        Verdict::Scheduled
    );
    assert_eq!(e.stats().queue_full, 5);
    let last = drain(&mut e, u64::MAX).pop().unwrap();
    assert_eq!((last.0, tag(&last.2)), (11 * MS + 5 * MS, 99));
}

// ---------------------------------------------------------------------------------------------------------
// Random stages

/// Sends `n` packets from node 0 to node 1 under `shape` and returns the emulator.
fn run(seed: u64, shape: Shape, n: u32) -> Emulator {
    let mut e = emulator(seed, 2);
    e.configure(NodeId(0), shaped(shape)).unwrap();
    for i in 0..n {
        e.send(u64::from(i), NodeId(0), pkt(0, 1, i));
        // Keep the schedule small.
        while e.poll(u64::from(i)).is_some() {}
    }
    e
}

#[test]
fn loss_rates() {
    let n = 100_000;
    let lossy = |loss| {
        run(
            11,
            Shape {
                loss,
                ..Shape::default()
            },
            n,
        )
        .stats()
        .loss
    };
    let l = lossy(10.0);
    assert!((9_000..=11_000).contains(&l), "{l}");
    assert_eq!(lossy(0.0), 0);
    assert_eq!(lossy(100.0), u64::from(n));
    assert_eq!(lossy(-3.0), 0, "clamped");
    assert_eq!(lossy(300.0), u64::from(n), "clamped");
}

#[test]
fn duplicate_and_corrupt_rates() {
    let n = 100_000;
    let e = run(
        12,
        Shape {
            duplicate: 10.0,
            corrupt: 5.0,
            ..Shape::default()
        },
        n,
    );
    let s = e.stats();
    assert!((9_000..=11_000).contains(&s.duplicated), "{s:?}");
    // Originals and copies are each exposed to corruption.
    let exposed = (u64::from(n) + s.duplicated) as f64;
    assert!((s.corrupted as f64 / exposed - 0.05).abs() < 0.01, "{s:?}");
    assert_eq!(s.delivered, u64::from(n) + s.duplicated);
}

#[test]
fn duplicates_arrive_after_the_original() {
    let mut e = emulator(1, 2);
    e.configure(
        NodeId(0),
        shaped(Shape {
            latency: MS,
            duplicate: 100.0,
            ..Shape::default()
        }),
    )
    .unwrap();
    e.send(0, NodeId(0), pkt(0, 1, 1));
    e.send(0, NodeId(0), pkt(0, 1, 2));
    let tags: Vec<_> = drain(&mut e, MS).iter().map(|(_, _, p)| tag(p)).collect();
    assert_eq!(tags, [1, 1, 2, 2]);
}

#[test]
fn corruption_flips_exactly_one_payload_bit() {
    let mut e = emulator(1, 2);
    e.configure(
        NodeId(0),
        shaped(Shape {
            corrupt: 100.0,
            ..Shape::default()
        }),
    )
    .unwrap();
    for i in 0..1000 {
        let orig = pkt(0, 1, i);
        e.send(0, NodeId(0), orig.clone());
        let got = e.poll(0).unwrap().packet;
        assert_eq!(got.len(), orig.len());
        assert_eq!(got[..20], orig[..20], "ip header intact");
        let bits: u32 = got
            .iter()
            .zip(&orig)
            .map(|(a, b)| (a ^ b).count_ones())
            .sum();
        assert_eq!(bits, 1);
    }
    // No payload: nothing to corrupt.
    let mut bare = pkt(0, 1, 0);
    bare.truncate(20);
    bare[2..4].copy_from_slice(&20u16.to_be_bytes());
    e.send(0, NodeId(0), bare.clone());
    assert_eq!(e.poll(0).unwrap().packet, bare);
    assert_eq!(e.stats().corrupted, 1000);
}

/// Mean length of runs of consecutive events.
fn mean_run(events: &[bool]) -> f64 {
    let runs = events.windows(2).filter(|w| w[1] && !w[0]).count() + usize::from(events[0]);
    events.iter().filter(|&&x| x).count() as f64 / runs as f64
}

#[test]
fn correlation_makes_runs_longer() {
    // The loss stage supports netem's correlation even though the link shape has no field for it.
    let draws = |corr| {
        let mut loss = tg_netem::stage::Loss::new(50.0, corr, 77);
        (0..100_000).map(|_| loss.lose()).collect::<Vec<_>>()
    };
    let (plain, correlated) = (mean_run(&draws(0.0)), mean_run(&draws(90.0)));
    assert!((plain - 2.0).abs() < 0.1, "{plain}");
    assert!(correlated > 2.0 * plain, "{correlated} vs {plain}");

    // And through the emulator, with duplicate_corr.
    let duplicated = |corr| {
        let mut e = emulator(2, 2);
        e.configure(
            NodeId(0),
            shaped(Shape {
                duplicate: 50.0,
                duplicate_corr: corr,
                ..Shape::default()
            }),
        )
        .unwrap();
        (0..50_000)
            .map(|i| {
                let before = e.stats().duplicated;
                e.send(0, NodeId(0), pkt(0, 1, i));
                while e.poll(0).is_some() {}
                e.stats().duplicated > before
            })
            .collect::<Vec<_>>()
    };
    let (plain, correlated) = (mean_run(&duplicated(0.0)), mean_run(&duplicated(90.0)));
    assert!(correlated > 2.0 * plain, "{correlated} vs {plain}");
}

// ---------------------------------------------------------------------------------------------------------
// Reproducibility

fn lossy_shape() -> Shape {
    Shape {
        loss: 30.0,
        duplicate: 10.0,
        corrupt: 10.0,
        jitter: MS,
        latency: 2 * MS,
        ..Shape::default()
    }
}

/// Verdicts, and deliveries (due, to, bytes), of node 0's traffic to node 1, optionally interleaved with
/// unrelated traffic: node 2 to node 1, and node 0 to node 3 (another link of node 0).
fn trace(seed: u64, noise: bool) -> (Vec<Verdict>, Vec<(Nanos, Vec<u8>)>) {
    let mut e = emulator(seed, 4);
    let mut cfg = shaped(lossy_shape());
    cfg.rules.push(Rule {
        subnet: Ipv4Net::new(ip(3), 32).unwrap(),
        filter: Filter::Accept,
        shape: lossy_shape(),
    });
    e.configure(NodeId(0), cfg).unwrap();
    e.configure(NodeId(2), shaped(lossy_shape())).unwrap();
    let mut verdicts = Vec::new();
    for i in 0..2000 {
        let now = u64::from(i) * 10_000;
        if noise {
            e.send(now, NodeId(2), pkt(2, 1, i));
            e.send(now, NodeId(0), pkt(0, 3, i));
        }
        verdicts.push(e.send(now, NodeId(0), pkt(0, 1, i)));
    }
    let deliveries = drain(&mut e, u64::MAX)
        .into_iter()
        .filter(|(_, to, p)| *to == NodeId(1) && p[12..16] == ip(0).octets())
        .map(|(due, _, p)| (due, p))
        .collect();
    (verdicts, deliveries)
}

#[test]
fn same_seed_same_outcome() {
    assert_eq!(trace(1, false), trace(1, false));
    assert_eq!(trace(1, true), trace(1, true));
    assert_ne!(trace(1, false).0, trace(2, false).0);
}

#[test]
fn unrelated_traffic_does_not_change_a_link() {
    assert_eq!(trace(9, false), trace(9, true));
}

#[test]
fn reconfiguring_restarts_the_streams_deterministically() {
    let pattern = |reconfigure: bool| {
        let mut e = emulator(4, 2);
        let cfg = shaped(Shape {
            loss: 50.0,
            ..Shape::default()
        });
        e.configure(NodeId(0), cfg.clone()).unwrap();
        let mut first: Vec<_> = (0..64)
            .map(|i| e.send(0, NodeId(0), pkt(0, 1, i)))
            .collect();
        if reconfigure {
            e.configure(NodeId(0), cfg).unwrap();
        }
        first.extend((0..64).map(|i| e.send(0, NodeId(0), pkt(0, 1, i))));
        first
    };
    let (a, b) = (pattern(false), pattern(true));
    assert_eq!(a[..64], b[..64]);
    assert_ne!(a[64..], b[64..], "a new configuration is a new stream");
    assert_eq!(pattern(true), pattern(true));
}

// ---------------------------------------------------------------------------------------------------------
// Properties

fn arb_shape() -> impl Strategy<Value = Shape> {
    let pct = prop_oneof![Just(0.0f32), Just(100.0f32), 0.0f32..100.0];
    (
        (
            0u64..5_000_000,
            0u64..3_000_000,
            prop_oneof![Just(0u64), 1_000_000u64..1_000_000_000],
        ),
        (pct.clone(), pct.clone(), pct.clone(), pct.clone()),
        (pct.clone(), pct.clone(), pct),
    )
        .prop_map(
            |(
                (latency, jitter, bandwidth),
                (loss, corrupt, corrupt_corr, reorder),
                (reorder_corr, duplicate, duplicate_corr),
            )| Shape {
                latency,
                jitter,
                bandwidth,
                loss,
                corrupt,
                corrupt_corr,
                reorder,
                reorder_corr,
                duplicate,
                duplicate_corr,
            },
        )
}

fn arb_filter() -> impl Strategy<Value = Filter> {
    prop_oneof![
        6 => Just(Filter::Accept),
        1 => Just(Filter::Reject),
        1 => Just(Filter::Drop)
    ]
}

fn arb_config() -> impl Strategy<Value = NodeConfig> {
    (
        prop::bool::weighted(0.9),
        arb_filter(),
        arb_shape(),
        prop::collection::vec((0u32..4, 24u8..=32, arb_filter(), arb_shape()), 0..3),
    )
        .prop_map(|(enabled, filter, default, rules)| NodeConfig {
            enabled,
            filter,
            default,
            rules: rules
                .into_iter()
                .map(|(node, len, filter, shape)| Rule {
                    subnet: Ipv4Net::new(ip(node), len).unwrap().trunc(),
                    filter,
                    shape,
                })
                .collect(),
        })
}

#[derive(Clone, Debug)]
enum Op {
    /// Advance time, send from `from` to `to` (5 = an address nobody has), `len` bytes.
    Send {
        dt: Nanos,
        from: u32,
        to: u32,
        len: usize,
    },
    Poll {
        dt: Nanos,
    },
    Configure {
        node: u32,
        cfg: NodeConfig,
    },
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u64..200_000, 0u32..4, 0u32..6, 32usize..1500)
            .prop_map(|(dt, from, to, len)| Op::Send { dt, from, to, len }),
        2 => (0u64..2_000_000).prop_map(|dt| Op::Poll { dt }),
        1 => (0u32..4, arb_config()).prop_map(|(node, cfg)| Op::Configure { node, cfg }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn conservation_and_ordering(seed in any::<u64>(), limit in 1usize..20, ops in prop::collection::vec(arb_op(), 1..300)) {
        let mut e = emulator(seed, 4);
        e.set_queue_limit(limit);
        let mut now: Nanos = 0;
        // Send time of every packet, by tag; ICMP replies are recognised by protocol.
        let mut sent_at = Vec::new();
        let mut last_due = 0;
        let check = |e: &mut Emulator, now: Nanos, sent_at: &[Nanos], last_due: &mut Nanos| -> Result<(), TestCaseError> {
            while let Some((due, d)) = e.poll_timed(now) {
                prop_assert!(due <= now, "released early: due {due} at {now}");
                prop_assert!(due >= *last_due, "out of order: {due} after {last_due}");
                *last_due = due;
                let h = parse_ipv4(&d.packet).unwrap();
                if h.protocol == 17 {
                    let t = sent_at[header_tag(&d.packet)];
                    prop_assert!(due >= t, "delivered at {due} before sent at {t}");
                } else {
                    prop_assert_eq!(h.protocol, 1);
                }
            }
            Ok(())
        };
        for op in ops {
            match op {
                Op::Send { dt, from, to, len } => {
                    now += dt;
                    let dst = if to < 4 { ip(to) } else { Ipv4Addr::new(172, 16, 0, 1) };
                    let tag = sent_at.len() as u32;
                    sent_at.push(now);
                    e.send(now, NodeId(from), udp(ip(from), dst, len, tag));
                }
                Op::Poll { dt } => {
                    now += dt;
                    check(&mut e, now, &sent_at, &mut last_due)?;
                }
                Op::Configure { node, cfg } => e.configure(NodeId(node), cfg).unwrap(),
            }
            if let Some(next) = e.next_deadline() {
                prop_assert!(next >= last_due);
            }
        }
        check(&mut e, u64::MAX, &sent_at, &mut last_due)?;
        prop_assert_eq!(e.in_flight(), 0);
        let s = e.stats();
        prop_assert_eq!(s.sent, sent_at.len() as u64);
        prop_assert_eq!(s.delivered + s.discarded + s.dropped(), s.sent + s.duplicated + s.icmp_replies, "{:?}", s);
    }

    #[test]
    fn verdicts_match_counters(seed in any::<u64>(), cfg in arb_config(), n in 1u32..200) {
        let mut e = emulator(seed, 2);
        e.configure(NodeId(0), cfg).unwrap();
        let mut by_verdict = std::collections::HashMap::new();
        for i in 0..n {
            *by_verdict.entry(e.send(u64::from(i), NodeId(0), pkt(0, 1, i))).or_insert(0u64) += 1;
        }
        let s = e.stats().clone();
        for reason in [DropReason::Malformed, DropReason::NoRoute, DropReason::Disabled, DropReason::FilteredDrop, DropReason::Loss] {
            prop_assert_eq!(by_verdict.get(&Verdict::Dropped(reason)).copied().unwrap_or(0), s.drops(reason));
        }
        prop_assert_eq!(by_verdict.get(&Verdict::Rejected).copied().unwrap_or(0), s.icmp_replies);
    }
}
