//! Cross-node forwarding (DESIGN.md, "Cross-node forwarding"): the datagram format agents
//! exchange over the nodes' network, and the rule deciding which datagrams an agent accepts.
//!
//! One datagram carries one IPv4 packet the sending agent's emulator has already shaped and
//! released, behind an 8-byte header:
//!
//! ```text
//!  0      3        4                    8
//!  +------+--------+--------------------+---------------------------+
//!  | "TGX"| version| destination NodeId | IPv4 packet, as on the TUN |
//!  |      |  = 1   | u32, big-endian    |                           |
//!  +------+--------+--------------------+---------------------------+
//! ```
//!
//! The destination is the instance's ordinal rather than its address so that the receiving agent
//! needs no routing table of its own: the sender's emulator already routed the packet. The magic
//! and version let a receiver reject stray traffic (and a future format) before looking further.

use std::collections::HashSet;
use std::net::SocketAddr;

use tg_netem::NodeId;

/// The first bytes of every forwarded datagram.
pub const MAGIC: [u8; 3] = *b"TGX";
/// The format described in the module documentation.
pub const VERSION: u8 = 1;
/// Bytes before the packet.
pub const HEADER_LEN: usize = 8;

/// Counters of the forwarding link since the run's network was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Packets released for a remote instance and sent to its agent, one datagram each.
    pub sent: u64,
    /// Packets for a remote instance that could not be sent (socket buffer full, too large for
    /// a datagram, no route to the peer): dropped, as by a full device queue.
    pub send_failed: u64,
    /// Datagrams accepted from a peer and written to a local instance's TUN.
    pub received: u64,
    /// Datagrams from an address that is no known peer: dropped unread.
    pub unknown_peer: u64,
    /// Datagrams from a peer without a valid header or IPv4 packet.
    pub malformed: u64,
    /// Datagrams from a peer for an instance this agent does not have.
    pub unknown_destination: u64,
    /// Datagrams from a peer for a local instance whose network is disabled (`enable: false`
    /// drops traffic in both directions; the sender's agent cannot know the receiver's setting).
    pub disabled: u64,
}

/// Writes `packet` for `to` as one datagram into `out` (cleared first).
pub fn encode(to: NodeId, packet: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(HEADER_LEN + packet.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&to.0.to_be_bytes());
    out.extend_from_slice(packet);
}

/// The destination and packet of a datagram, if it is one this version understands and the
/// packet is a complete IPv4 packet (anything else must not reach an instance's TUN).
pub fn decode(datagram: &[u8]) -> Option<(NodeId, &[u8])> {
    let (header, packet) = datagram.split_at_checked(HEADER_LEN)?;
    if header[..3] != MAGIC || header[3] != VERSION {
        return None;
    }
    let to = NodeId(u32::from_be_bytes([
        header[4], header[5], header[6], header[7],
    ]));
    tg_netem::packet::parse_ipv4(packet)?;
    Some((to, packet))
}

/// Why a datagram was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    UnknownPeer,
    Malformed,
}

/// The agents this one exchanges packets with. Only they may inject packets into the local
/// instances: an agent must not turn its forwarding port into a way for anyone on the nodes'
/// network to reach the test's instances.
#[derive(Debug, Default)]
pub struct Peers(HashSet<SocketAddr>);

/// A socket bound to `[::]` sees IPv4 peers as IPv4-mapped IPv6 addresses; one spelling per
/// peer keeps the comparison exact.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// `peer` as the socket bound at `local` can send to it: a dual-stack (IPv6) socket reaches an
/// IPv4 peer at its IPv4-mapped address; an IPv4 socket cannot reach an IPv6 peer at all.
pub fn reachable(local: SocketAddr, peer: SocketAddr) -> Option<SocketAddr> {
    let peer = canonical(peer);
    match (local, peer) {
        (SocketAddr::V6(_), SocketAddr::V4(p)) => {
            Some(SocketAddr::new(p.ip().to_ipv6_mapped().into(), p.port()))
        }
        (SocketAddr::V4(_), SocketAddr::V6(_)) => None,
        _ => Some(peer),
    }
}

impl Peers {
    pub fn insert(&mut self, peer: SocketAddr) {
        self.0.insert(canonical(peer));
    }

    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.0.contains(&canonical(addr))
    }

    /// Checks a datagram received from `from`: the sender first (a stranger's bytes are not
    /// even parsed), then the format.
    pub fn accept<'a>(
        &self,
        from: SocketAddr,
        datagram: &'a [u8],
    ) -> Result<(NodeId, &'a [u8]), Refused> {
        if !self.contains(from) {
            return Err(Refused::UnknownPeer);
        }
        decode(datagram).ok_or(Refused::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal IPv4 header from 100.64.0.2 to 100.64.0.3 (checksum not needed here).
    fn packet() -> Vec<u8> {
        vec![
            0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 100, 64, 0, 2, 100, 64, 0, 3,
        ]
    }

    #[test]
    fn header_round_trips() {
        let mut out = Vec::new();
        encode(NodeId(0x0102_0304), &packet(), &mut out);
        assert_eq!(out.len(), HEADER_LEN + 20);
        assert_eq!(&out[..HEADER_LEN], b"TGX\x01\x01\x02\x03\x04");
        let (to, p) = decode(&out).unwrap();
        assert_eq!(to, NodeId(0x0102_0304));
        assert_eq!(p, packet().as_slice());
        // The buffer is reused: a second encode replaces the first.
        encode(NodeId(7), &packet(), &mut out);
        assert_eq!(decode(&out).unwrap().0, NodeId(7));
    }

    #[test]
    fn malformed_datagrams_are_refused() {
        let mut good = Vec::new();
        encode(NodeId(1), &packet(), &mut good);
        assert!(decode(&good[..HEADER_LEN - 1]).is_none(), "short header");
        assert!(decode(&good[..HEADER_LEN]).is_none(), "no packet");
        assert!(
            decode(&good[..HEADER_LEN + 19]).is_none(),
            "truncated packet"
        );
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(decode(&bad).is_none(), "magic");
        let mut bad = good.clone();
        bad[3] = 2;
        assert!(decode(&bad).is_none(), "version");
        let mut bad = good.clone();
        bad[HEADER_LEN] = 0x65;
        assert!(decode(&bad).is_none(), "IPv6 or garbage");
    }

    #[test]
    fn only_known_peers_are_accepted() {
        let mut peers = Peers::default();
        let known: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        peers.insert(known);
        let mut d = Vec::new();
        encode(NodeId(1), &packet(), &mut d);
        assert_eq!(peers.accept(known, &d).unwrap().0, NodeId(1));
        // Same host, another port; another host, same port: strangers.
        for stranger in ["127.0.0.1:4001", "127.0.0.2:4000", "[::1]:4000"] {
            assert_eq!(
                peers.accept(stranger.parse().unwrap(), &d),
                Err(Refused::UnknownPeer),
                "{stranger}"
            );
        }
        // Seen through a dual-stack socket, the known peer is still known.
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:4000".parse().unwrap();
        assert!(peers.accept(mapped, &d).is_ok());
        assert_eq!(peers.accept(known, b"junk"), Err(Refused::Malformed));
    }

    #[test]
    fn peers_are_addressed_in_the_sockets_family() {
        let v4: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let v6: SocketAddr = "[::]:1".parse().unwrap();
        let p4: SocketAddr = "10.0.0.1:5".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:5".parse().unwrap();
        let p6: SocketAddr = "[fd00::1]:5".parse().unwrap();
        assert_eq!(reachable(v4, p4), Some(p4));
        assert_eq!(reachable(v4, mapped), Some(p4));
        assert_eq!(reachable(v4, p6), None);
        assert_eq!(reachable(v6, p4), Some(mapped));
        assert_eq!(reachable(v6, p6), Some(p6));
    }
}
