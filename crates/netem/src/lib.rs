//! The sans-IO core of Testground's userspace network emulator.
//!
//! This crate owns the decisions: given IPv4 packets that test instances write to their TUN devices, it
//! routes each one by destination address to another node of the run, applies the *sender's* egress shaping
//! with Linux netem's semantics (filter, loss, duplication, corruption, bandwidth, latency, jitter,
//! reordering), and says when each surviving packet is due at its receiver. It does not own any I/O: it
//! never touches a TUN device, a socket, a clock or a thread. The sidecar reads packets, calls
//! [`Emulator::send`] with the current time, sleeps until [`Emulator::next_deadline`], and writes what
//! [`Emulator::poll`] releases. Nor does it translate Testground's `network.Config`; the sidecar maps it
//! onto [`NodeConfig`].
//!
//! Randomness is seeded by the caller. Every link (a sender plus one of its rules, or its default) draws
//! from its own ChaCha8 streams, seeded by mixing the emulator seed, the sender's [`NodeId`], the link's
//! index in the node's configuration and how many times that node has been configured. Consequently the
//! same seed and the same sequence of calls give identical results, and the fate of the n-th packet on a
//! link depends only on the seed and that link's own packets: not on other links' traffic, nor on timing
//! (apart from the bandwidth queue, whose tail drops depend on when packets are offered, as on a real link).
//!
//! ```
//! use std::net::Ipv4Addr;
//! use tg_netem::{Emulator, NodeConfig, NodeId, Shape, Verdict};
//!
//! let mut emu = Emulator::new(42);
//! emu.add_node(NodeId(0), Ipv4Addr::new(10, 0, 0, 1)).unwrap();
//! emu.add_node(NodeId(1), Ipv4Addr::new(10, 0, 0, 2)).unwrap();
//! let slow = Shape { latency: 5_000_000, ..Shape::default() };
//! emu.configure(NodeId(0), NodeConfig { default: slow, ..NodeConfig::default() }).unwrap();
//!
//! // A minimal IPv4 header (checksum not needed by the emulator) from 10.0.0.1 to 10.0.0.2.
//! let packet = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
//! assert_eq!(emu.send(1_000, NodeId(0), packet.clone()), Verdict::Scheduled);
//! assert_eq!(emu.next_deadline(), Some(5_001_000));
//! assert!(emu.poll(5_000_999).is_none());
//! let delivery = emu.poll(5_001_000).unwrap();
//! assert_eq!((delivery.to, delivery.packet), (NodeId(1), packet));
//! ```
//!
//! Per packet the pipeline is: parse, route by destination address, pick the sender's link (longest-prefix
//! rule, else the default), filter, loss, duplicate, then for the packet and its copy: corrupt, rate
//! (bandwidth), delay (latency, jitter, reorder). Deviations from Linux netem, each deliberate:
//! - loss comes before duplication (netem duplicates first, so a duplicated packet may lose one copy), and
//!   the copy is scheduled after the original (netem enqueues it first);
//! - the bandwidth stage serialises before the delay instead of netem's folding of the transmission time
//!   into the delay of the last queued packet (see [`stage::Rate`]); its queue limit counts only packets
//!   waiting for the wire, where netem's `limit` counts every packet held, delayed ones included;
//! - corruption flips a bit in the payload only, never in the IP header (see [`stage::Corrupt`]);
//! - jitter is uniform (netem's behaviour without a distribution table) and uncorrelated; reordering uses
//!   gap 1 (what `tc ... reorder P%` sets); [`Shape`] has no loss correlation, so links use none;
//! - filters are not netem's but Testground's (iptables-like drop/reject), evaluated before shaping.
//!
//! Modules:
//! - this file: [`Emulator`] (nodes, addresses, the per-packet pipeline), [`NodeId`], [`Delivery`],
//!   [`NetemError`];
//! - [`config`]: [`Shape`], [`Filter`], [`Rule`], [`NodeConfig`], what the caller configures;
//! - [`link`]: [`Link`], one sender-to-rule path composing the stages;
//! - [`stage`]: the stages themselves ([`stage::Loss`], [`stage::Duplicate`], [`stage::Corrupt`],
//!   [`stage::Rate`], [`stage::Delay`]) and netem's correlated random trial [`stage::Chance`];
//! - [`stats`]: [`Stats`], [`Verdict`], [`DropReason`];
//! - [`packet`]: IPv4 header parsing, the internet checksum, the ICMP error a rejecting filter sends;
//! - [`offload`]: TUN offloads: the `virtio_net_hdr`, TCP/IPv4 segmentation of super-packets and checksum
//!   completion, used by [`Emulator::send_offloaded`];
//! - `sched` (private): the release schedule.

pub mod config;
pub mod link;
pub mod offload;
pub mod packet;
mod sched;
pub mod stage;
pub mod stats;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::Ipv4Addr;

pub use config::{Filter, NodeConfig, Rule, Shape};
pub use link::{Link, Transmit};
pub use offload::Offload;
pub use stats::{DropReason, Stats, Verdict};

/// Nanoseconds on a monotonic clock whose origin the caller picks.
pub type Nanos = u64;

/// A node of the run, chosen by the caller: the instance ordinal 0..N.
///
/// Ids index a vector, so they should be dense; ids above [`Emulator::MAX_NODE_ID`] are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl NodeId {
    fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A packet released by [`Emulator::poll`], to be written to `to`'s TUN device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub to: NodeId,
    pub packet: Vec<u8>,
    /// What the receiving kernel is to finish: [`Offload::NONE`] unless the packet was offered with
    /// offloads through [`Emulator::send_offloaded`] and passed whole.
    pub offload: Offload,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetemError {
    #[error("address {addr} is taken by node {by}")]
    AddressTaken { addr: Ipv4Addr, by: NodeId },
    #[error("unknown node {node}")]
    UnknownNode { node: NodeId },
    #[error("node {node} exists already")]
    NodeExists { node: NodeId },
    #[error("node id {node} is above the maximum {max}")]
    NodeIdTooLarge { node: NodeId, max: u32 },
}

/// Hashes IPv4 addresses (as u32) with one folded multiplication.
///
/// Addresses are looked up once per packet; SipHash's DoS resistance buys nothing here (the caller assigns
/// the addresses) and costs more than the rest of the routing decision.
#[derive(Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Not used by u32 keys; kept correct for completeness.
        for &b in bytes {
            self.write_u32(u32::from(b) ^ (self.0 as u32));
        }
    }

    fn write_u32(&mut self, n: u32) {
        let product = u128::from(u64::from(n) ^ self.0) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type AddrMap = HashMap<u32, NodeId, BuildHasherDefault<AddrHasher>>;

/// SplitMix64's finaliser: a bijection whose every output bit depends on every input bit.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of one link's random streams. Chained rather than XORed together so that, e.g., (node 1, link 2)
/// and (node 2, link 1) do not collide.
fn link_seed(seed: u64, node: NodeId, link: usize, generation: u64) -> u64 {
    mix(mix(mix(mix(seed) ^ u64::from(node.0)) ^ link as u64) ^ generation)
}

/// A route from a sender to one of its links.
struct Route {
    net: u32,
    mask: u32,
    link: usize,
}

struct Node {
    addr: Ipv4Addr,
    config: NodeConfig,
    /// How many times [`Emulator::configure`] was called for this node since it was added.
    generation: u64,
    /// The node's rules sorted by prefix length, longest first (stable, so the first of equal rules wins);
    /// the first matching route is the longest-prefix match.
    routes: Vec<Route>,
    /// One link per rule, in the configuration's order, then the default link.
    links: Vec<Link>,
}

impl Node {
    fn new(addr: Ipv4Addr, config: NodeConfig, seed: u64, id: NodeId, generation: u64) -> Self {
        let mut links: Vec<Link> = config
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| Link::new(r.filter, &r.shape, link_seed(seed, id, i, generation)))
            .collect();
        links.push(Link::new(
            config.filter,
            &config.default,
            link_seed(seed, id, config.rules.len(), generation),
        ));
        let mut routes: Vec<Route> = config
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| Route {
                net: u32::from(r.subnet.network()),
                mask: u32::from(r.subnet.netmask()),
                link: i,
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.mask.count_ones()));
        Self {
            addr,
            config,
            generation,
            routes,
            links,
        }
    }

    fn link_for(&mut self, dst: u32) -> &mut Link {
        let i = self
            .routes
            .iter()
            .find(|r| dst & r.mask == r.net)
            .map_or(self.links.len() - 1, |r| r.link);
        &mut self.links[i]
    }
}

/// The emulator: the run's nodes, their links, and the packets in flight.
pub struct Emulator {
    seed: u64,
    queue_limit: usize,
    nodes: Vec<Option<Node>>,
    by_addr: AddrMap,
    sched: sched::Scheduler,
    stats: Stats,
}

impl Emulator {
    /// Largest accepted [`NodeId`]: ids index a vector, so a stray huge id must not allocate gigabytes.
    pub const MAX_NODE_ID: u32 = (1 << 24) - 1;
    /// netem's default `limit`.
    pub const DEFAULT_QUEUE_LIMIT: usize = 1000;

    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            queue_limit: Self::DEFAULT_QUEUE_LIMIT,
            nodes: Vec::new(),
            by_addr: AddrMap::default(),
            sched: sched::Scheduler::default(),
            stats: Stats::default(),
        }
    }

    /// Packets a bandwidth-limited link may hold waiting for the wire; beyond it they are tail-dropped.
    /// Default 1000 (netem's default limit). Applies to every link from the next packet on; 0 drops all
    /// packets on bandwidth-limited links, like netem's `limit 0`.
    pub fn set_queue_limit(&mut self, packets: usize) {
        self.queue_limit = packets;
    }

    pub fn queue_limit(&self) -> usize {
        self.queue_limit
    }

    /// Adds a node at `addr` with the default configuration (enabled, accept, unshaped).
    pub fn add_node(&mut self, id: NodeId, addr: Ipv4Addr) -> Result<(), NetemError> {
        if id.0 > Self::MAX_NODE_ID {
            return Err(NetemError::NodeIdTooLarge {
                node: id,
                max: Self::MAX_NODE_ID,
            });
        }
        if self.node(id).is_some() {
            return Err(NetemError::NodeExists { node: id });
        }
        if let Some(&by) = self.by_addr.get(&u32::from(addr)) {
            return Err(NetemError::AddressTaken { addr, by });
        }
        if self.nodes.len() <= id.index() {
            self.nodes.resize_with(id.index() + 1, || None);
        }
        self.nodes[id.index()] = Some(Node::new(addr, NodeConfig::default(), self.seed, id, 0));
        self.by_addr.insert(u32::from(addr), id);
        Ok(())
    }

    /// Removes a node (no-op if unknown). Packets in flight to it are discarded when they fall due (counted in
    /// [`Stats::discarded`]), unless a node with the same id has been added by then, which gets them; packets
    /// it sent earlier still arrive.
    pub fn remove_node(&mut self, id: NodeId) {
        if let Some(node) = self.nodes.get_mut(id.index()).and_then(Option::take) {
            self.by_addr.remove(&u32::from(node.addr));
        }
    }

    /// Moves a node to a new address (the instance changed its IP). Errors if another node has it.
    ///
    /// Packets already in flight to the node are still delivered to it; their destination address is
    /// whatever it was when sent, which the receiving kernel may no longer accept, as on a real network.
    pub fn set_addr(&mut self, id: NodeId, addr: Ipv4Addr) -> Result<(), NetemError> {
        if self.node(id).is_none() {
            return Err(NetemError::UnknownNode { node: id });
        }
        let key = u32::from(addr);
        match self.by_addr.get(&key) {
            Some(&by) if by == id => return Ok(()),
            Some(&by) => return Err(NetemError::AddressTaken { addr, by }),
            None => {}
        }
        let node = self
            .nodes
            .get_mut(id.index())
            .and_then(Option::as_mut)
            .ok_or(NetemError::UnknownNode { node: id })?;
        self.by_addr.remove(&u32::from(node.addr));
        node.addr = addr;
        self.by_addr.insert(key, id);
        Ok(())
    }

    pub fn addr(&self, id: NodeId) -> Option<Ipv4Addr> {
        self.node(id).map(|n| n.addr)
    }

    pub fn node_at(&self, addr: Ipv4Addr) -> Option<NodeId> {
        self.by_addr.get(&u32::from(addr)).copied()
    }

    /// The node's current configuration.
    pub fn config(&self, id: NodeId) -> Option<&NodeConfig> {
        self.node(id).map(|n| &n.config)
    }

    /// Replaces the node's egress configuration; packets already scheduled keep their times.
    ///
    /// All of the node's links start afresh (new random streams, empty bandwidth queues, no correlation
    /// memory), even those whose rule did not change: rules have no identity to carry state across, and a
    /// fresh start keeps outcomes a function of the configuration sequence alone. One consequence: packets
    /// still queued for the old wire do not delay packets sent under the new configuration.
    pub fn configure(&mut self, id: NodeId, cfg: NodeConfig) -> Result<(), NetemError> {
        let seed = self.seed;
        let slot = self
            .nodes
            .get_mut(id.index())
            .and_then(Option::as_mut)
            .ok_or(NetemError::UnknownNode { node: id })?;
        let generation = slot.generation + 1;
        *slot = Node::new(slot.addr, cfg, seed, id, generation);
        Ok(())
    }

    /// Offers an IPv4 packet (as read from the node's TUN, no packet-info header) sent by `from` at `now`.
    pub fn send(&mut self, now: Nanos, from: NodeId, packet: Vec<u8>) -> Verdict {
        self.stats.sent += 1;
        let Some(hdr) = packet::parse_ipv4(&packet) else {
            return self.dropped(DropReason::Malformed);
        };
        let dst = u32::from(hdr.dst);
        let Some(&to) = self.by_addr.get(&dst) else {
            return self.dropped(DropReason::NoRoute);
        };
        // by_addr only holds addresses of present nodes, so this is the receiver's own setting.
        let receiver_enabled = self.node(to).is_some_and(|n| n.config.enabled);
        let Some(Some(sender)) = self.nodes.get_mut(from.index()) else {
            return self.dropped(DropReason::UnknownSender);
        };
        if !sender.config.enabled || !receiver_enabled {
            return self.dropped(DropReason::Disabled);
        }
        let link = sender.link_for(dst);
        match link.filter() {
            Filter::Accept => {}
            Filter::Drop => return self.dropped(DropReason::FilteredDrop),
            Filter::Reject => {
                self.stats.rejected += 1;
                if !packet::may_send_icmp_error(&packet, &hdr) {
                    return Verdict::Dropped(DropReason::Rejected);
                }
                self.stats.icmp_replies += 1;
                self.sched
                    .push(now, from, packet::admin_prohibited(&packet, &hdr));
                return Verdict::Rejected;
            }
        }
        if link.lose() {
            return self.dropped(DropReason::Loss);
        }
        let copy = link.duplicate().then(|| packet.clone());
        self.stats.duplicated += u64::from(copy.is_some());
        let limit = self.queue_limit;
        let mut scheduled = false;
        for mut p in std::iter::once(packet).chain(copy) {
            match link.transmit(now, &mut p, hdr.payload(), limit) {
                Some(tx) => {
                    self.stats.corrupted += u64::from(tx.corrupted);
                    self.stats.reordered += u64::from(tx.reordered);
                    self.sched.push(tx.due, to, p);
                    scheduled = true;
                }
                None => self.stats.queue_full += 1,
            }
        }
        if scheduled {
            Verdict::Scheduled
        } else {
            Verdict::Dropped(DropReason::QueueFull)
        }
    }

    /// Offers a packet read from a TUN with offloads: `off` says what its sender's kernel left undone (see
    /// [`offload`]). Every impairment still acts per wire packet, and the counters count wire packets:
    ///
    /// - a link that only delays (accepts, no loss, duplication, corruption, reordering, jitter or bandwidth
    ///   limit; [`Link::only_delays`]) would treat each of the packet's wire packets alike, so the packet
    ///   passes whole, still offloaded: one delivery (with [`Delivery::offload`]) for all its segments,
    ///   due `latency` after `now`, counted as as many packets sent and delivered as it has segments;
    /// - on any other link, and whatever is dropped before the link is chosen, the packet is first turned
    ///   into its wire packets ([`offload::wire_packets`]: a super-packet segmented, a partial checksum
    ///   completed, so that a corrupted bit is caught by the receiver as on a wire), which then go through
    ///   [`send`](Self::send) one by one: the same fates, random draws and counters as if the sender's
    ///   kernel had segmented them itself.
    ///
    /// A packet whose offloads cannot be carried out (not TCP/IPv4, a checksum offset outside it) is dropped
    /// as malformed.
    pub fn send_offloaded(
        &mut self,
        now: Nanos,
        from: NodeId,
        packet: Vec<u8>,
        off: Offload,
    ) -> Verdict {
        if off.is_none() {
            return self.send(now, from, packet);
        }
        if let Some((to, latency)) = self.whole_path(from, &packet) {
            let Ok(wire) = offload::wire_count(&packet, off) else {
                self.stats.sent += 1;
                return self.dropped(DropReason::Malformed);
            };
            self.stats.sent += wire as u64;
            self.sched.push_offloaded(
                now.saturating_add(latency),
                to,
                packet,
                off,
                u32::try_from(wire).unwrap_or(u32::MAX),
            );
            return Verdict::Scheduled;
        }
        let mut wire = Vec::new();
        if offload::wire_packets(packet, off, &mut wire).is_err() {
            self.stats.sent += 1;
            return self.dropped(DropReason::Malformed);
        }
        // Scheduled if any wire packet was, else what happened to the first.
        let mut verdict = None;
        for p in wire {
            let v = self.send(now, from, p);
            if verdict.is_none() || v == Verdict::Scheduled {
                verdict = Some(v);
            }
        }
        verdict.unwrap_or(Verdict::Dropped(DropReason::Malformed))
    }

    /// The receiver and the latency when `from`'s packet would pass every check and its link only delays it.
    fn whole_path(&mut self, from: NodeId, packet: &[u8]) -> Option<(NodeId, Nanos)> {
        let dst = u32::from(packet::parse_ipv4(packet)?.dst);
        let &to = self.by_addr.get(&dst)?;
        if !self.node(to)?.config.enabled {
            return None;
        }
        let sender = self.nodes.get_mut(from.index())?.as_mut()?;
        if !sender.config.enabled {
            return None;
        }
        Some((to, sender.link_for(dst).only_delays()?))
    }

    /// The next packet due at or before `now`, in due-time order (ties broken by the order they were
    /// scheduled, so it is deterministic). Call repeatedly until None.
    pub fn poll(&mut self, now: Nanos) -> Option<Delivery> {
        self.poll_timed(now).map(|(_, d)| d)
    }

    /// Like [`poll`](Self::poll), also returning the time the packet was due (≤ `now`).
    pub fn poll_timed(&mut self, now: Nanos) -> Option<(Nanos, Delivery)> {
        loop {
            let e = self.sched.pop_due(now)?;
            if self.node(e.to).is_some() {
                self.stats.delivered += u64::from(e.wire);
                return Some((
                    e.due,
                    Delivery {
                        to: e.to,
                        packet: e.packet,
                        offload: e.offload,
                    },
                ));
            }
            self.stats.discarded += u64::from(e.wire);
        }
    }

    /// When the next scheduled packet is due, if any.
    pub fn next_deadline(&self) -> Option<Nanos> {
        self.sched.next_due()
    }

    /// Packets scheduled and not yet polled.
    pub fn in_flight(&self) -> usize {
        self.sched.len()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id.index()).and_then(Option::as_ref)
    }

    fn dropped(&mut self, reason: DropReason) -> Verdict {
        self.stats.count_drop(reason);
        Verdict::Dropped(reason)
    }
}
