//! The packet pump: one OS thread per run that owns the run's [`Emulator`] and every
//! instance's TUN device. It reads what instances send, runs it through the emulator, and
//! writes each packet to its destination's TUN when the emulator releases it.
//!
//! A dedicated thread rather than tokio tasks because latency accuracy is the product: packets
//! are timestamped as soon as they are read, and releases are driven by a `timerfd` with
//! nanosecond resolution instead of tokio's millisecond timer wheel. Everything else talks to the
//! thread through [`Pump`] (commands over a channel plus a `mio` waker), so nothing is shared.
//!
//! With a forwarding socket (cross-node runs, see `forward`), the thread also owns that socket:
//! packets the emulator releases for a remote instance leave in one datagram each to that
//! instance's agent, and datagrams from known peers go straight into the destination's TUN,
//! unshaped (the sending agent's emulator shaped them).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use pcap_file::DataLink;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use tg_netem::{Emulator, NetemError, NodeConfig, NodeId, Stats};
use tg_sys::Tun;
use tokio::sync::oneshot;

use crate::forward::{self, ForwardStats, Peers, Refused};

const WAKER: Token = Token(usize::MAX);
const TIMER: Token = Token(usize::MAX - 1);
const FORWARD: Token = Token(usize::MAX - 2);
/// Larger than any packet a 1500-byte-MTU TUN can produce, with room for a raised MTU.
const BUF: usize = 65_536;

enum Cmd {
    Add {
        id: NodeId,
        addr: Ipv4Addr,
        tun: Tun,
        capture: Option<PathBuf>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    SetAddr {
        id: NodeId,
        addr: Ipv4Addr,
        reply: oneshot::Sender<Result<(), NetemError>>,
    },
    Configure {
        id: NodeId,
        cfg: NodeConfig,
        reply: oneshot::Sender<Result<(), NetemError>>,
    },
    AddRemote {
        id: NodeId,
        addr: Ipv4Addr,
        peer: SocketAddr,
        reply: oneshot::Sender<Result<(), String>>,
    },
    ForwardStats {
        reply: oneshot::Sender<Option<ForwardStats>>,
    },
    Stop {
        reply: oneshot::Sender<Stats>,
    },
}

/// The handle to a run's pump thread. Cloning shares the thread.
#[derive(Clone)]
pub struct Pump {
    tx: std_mpsc::Sender<Cmd>,
    waker: Arc<Waker>,
    thread: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Pump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pump").finish_non_exhaustive()
    }
}

/// The pump thread stopped (it only does so when told, or when its poller fails).
#[derive(Debug, thiserror::Error)]
#[error("the packet pump is not running")]
pub struct PumpGone;

impl Pump {
    /// Starts the pump thread with an emulator seeded by `seed`; `forward` is the socket to
    /// exchange packets with other agents over, if the run spans nodes.
    pub fn start(seed: u64, name: &str, forward: Option<std::net::UdpSocket>) -> io::Result<Pump> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        poll.registry().register(
            &mut SourceFd(&timer.as_fd().as_raw_fd()),
            TIMER,
            Interest::READABLE,
        )?;
        let forward = match forward {
            None => None,
            Some(sock) => {
                sock.set_nonblocking(true)?;
                let mut sock = mio::net::UdpSocket::from_std(sock);
                poll.registry()
                    .register(&mut sock, FORWARD, Interest::READABLE)?;
                Some(Forward {
                    sock,
                    remotes: HashMap::new(),
                    peers: Peers::default(),
                    stats: ForwardStats::default(),
                    out: Vec::with_capacity(BUF),
                })
            }
        };
        let (tx, rx) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("tg-pump-{name}"))
            .spawn(move || {
                let mut worker = Worker {
                    emu: Emulator::new(seed),
                    nodes: HashMap::new(),
                    epoch: Instant::now(),
                    armed: None,
                    timer,
                    buf: vec![0u8; BUF],
                    forward,
                };
                if let Err(e) = worker.run(poll, rx) {
                    tracing::error!("packet pump failed: {e}");
                }
            })?;
        Ok(Pump {
            tx,
            waker,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    fn send(&self, cmd: Cmd) -> Result<(), PumpGone> {
        self.tx.send(cmd).map_err(|_| PumpGone)?;
        self.waker.wake().map_err(|_| PumpGone)
    }

    /// Connects an instance's TUN at `addr`; `capture` names a pcap file for its traffic.
    pub async fn add(
        &self,
        id: NodeId,
        addr: Ipv4Addr,
        tun: Tun,
        capture: Option<PathBuf>,
    ) -> Result<Result<(), String>, PumpGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Add {
            id,
            addr,
            tun,
            capture,
            reply,
        })?;
        rx.await.map_err(|_| PumpGone)
    }

    pub async fn set_addr(
        &self,
        id: NodeId,
        addr: Ipv4Addr,
    ) -> Result<Result<(), NetemError>, PumpGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::SetAddr { id, addr, reply })?;
        rx.await.map_err(|_| PumpGone)
    }

    pub async fn configure(
        &self,
        id: NodeId,
        cfg: NodeConfig,
    ) -> Result<Result<(), NetemError>, PumpGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Configure { id, cfg, reply })?;
        rx.await.map_err(|_| PumpGone)
    }

    /// Adds instance `id` at `addr`, which lives behind the agent at `peer`: the emulator
    /// routes to it and shapes what local instances send it; the pump forwards what it releases.
    pub async fn add_remote(
        &self,
        id: NodeId,
        addr: Ipv4Addr,
        peer: SocketAddr,
    ) -> Result<Result<(), String>, PumpGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::AddRemote {
            id,
            addr,
            peer,
            reply,
        })?;
        rx.await.map_err(|_| PumpGone)
    }

    /// The forwarding counters, `None` when the pump has no forwarding socket.
    pub async fn forward_stats(&self) -> Result<Option<ForwardStats>, PumpGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::ForwardStats { reply })?;
        rx.await.map_err(|_| PumpGone)
    }

    /// Tells the thread to stop without waiting for it (for drop paths).
    pub fn stop_detached(&self) {
        let (reply, _) = oneshot::channel();
        let _ = self.send(Cmd::Stop { reply });
    }

    /// Stops the thread (closing every TUN, flushing captures) and returns the counters.
    pub async fn stop(&self) -> Option<Stats> {
        let (reply, rx) = oneshot::channel();
        let stats = match self.send(Cmd::Stop { reply }) {
            Ok(()) => rx.await.ok(),
            Err(PumpGone) => None,
        };
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        stats
    }
}

struct Node {
    tun: Tun,
    capture: Option<PcapWriter<BufWriter<File>>>,
}

/// The forwarding side of a cross-node run.
struct Forward {
    sock: mio::net::UdpSocket,
    /// Where each remote instance's agent listens.
    remotes: HashMap<NodeId, SocketAddr>,
    /// Every agent in `remotes`: the only senders accepted.
    peers: Peers,
    stats: ForwardStats,
    /// The one send buffer: header and packet are copied into it, so a datagram goes out in
    /// one `send_to` without an allocation per packet.
    out: Vec<u8>,
}

impl Forward {
    fn send(&mut self, to: NodeId, peer: SocketAddr, packet: &[u8]) {
        forward::encode(to, packet, &mut self.out);
        match self.sock.send_to(&self.out, peer) {
            Ok(_) => self.stats.sent += 1,
            // Never retried or queued: the link's own shaping already happened, and a full
            // socket buffer is a full queue on the nodes' network.
            Err(_) => self.stats.send_failed += 1,
        }
    }
}

struct Worker {
    emu: Emulator,
    nodes: HashMap<NodeId, Node>,
    epoch: Instant,
    /// The deadline the timer is set for, to avoid re-arming it on every loop.
    armed: Option<u64>,
    timer: TimerFd,
    /// The one read buffer: a packet is copied out of it into the emulator.
    buf: Vec<u8>,
    forward: Option<Forward>,
}

fn token(id: NodeId) -> Token {
    Token(id.0 as usize)
}

fn capture_packet(node: &mut Node, data: &[u8]) {
    if let Some(w) = &mut node.capture {
        let ts = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let pkt = PcapPacket::new(ts, data.len() as u32, data);
        if let Err(e) = w.write_packet(&pkt) {
            tracing::warn!("packet capture stopped: {e}");
            node.capture = None;
        }
    }
}

impl Worker {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn run(&mut self, mut poll: Poll, rx: std_mpsc::Receiver<Cmd>) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut readable: Vec<NodeId> = Vec::new();
        let mut forwarded = false;
        loop {
            match poll.poll(&mut events, None) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {
                        while let Ok(cmd) = rx.try_recv() {
                            if let Some(stop) = self.command(&poll, cmd) {
                                self.finish();
                                let _ = stop.send(self.emu.stats().clone());
                                return Ok(());
                            }
                        }
                    }
                    TIMER => {
                        // Clears the expiration; EAGAIN when it was re-armed meanwhile.
                        let _ = self.timer.wait();
                        self.armed = None;
                    }
                    FORWARD => forwarded = true,
                    Token(t) => readable.push(NodeId(t as u32)),
                }
            }
            for id in readable.drain(..) {
                self.drain(id);
            }
            if std::mem::take(&mut forwarded) {
                self.receive();
            }
            self.release()?;
        }
    }

    /// Reads everything `id` has sent (edge-triggered: until the TUN is empty).
    fn drain(&mut self, id: NodeId) {
        loop {
            let Some(node) = self.nodes.get_mut(&id) else {
                return;
            };
            match node.tun.recv(&mut self.buf) {
                Ok(n) => {
                    let data = &self.buf[..n];
                    capture_packet(node, data);
                    let now = self.now();
                    self.emu.send(now, id, data.to_vec());
                    // Packets due now (unshaped links, ICMP rejects) go out before the next
                    // read, so an unshaped link adds no batching delay.
                    self.deliver(now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("reading the data interface of instance {}: {e}", id.0);
                    return;
                }
            }
        }
    }

    fn deliver(&mut self, now: u64) {
        while let Some(d) = self.emu.poll(now) {
            if let Some(node) = self.nodes.get_mut(&d.to) {
                capture_packet(node, &d.packet);
                // A full TUN queue drops the packet, as a full device queue would.
                let _ = node.tun.send(&d.packet);
            } else if let Some(fw) = &mut self.forward
                && let Some(&peer) = fw.remotes.get(&d.to)
            {
                fw.send(d.to, peer, &d.packet);
            }
        }
    }

    /// Reads every datagram waiting on the forwarding socket (edge-triggered: until empty) and
    /// writes the packets of known peers to their local destinations.
    fn receive(&mut self) {
        let Some(fw) = &mut self.forward else {
            return;
        };
        loop {
            let (n, from) = match fw.sock.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // An ICMP error about an earlier send (a peer that went away), where the system
                // reports those on unconnected sockets: it says nothing about the next datagram.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    tracing::warn!("reading the forwarding socket: {e}");
                    return;
                }
            };
            let (to, packet) = match fw.peers.accept(from, &self.buf[..n]) {
                Ok(p) => p,
                Err(Refused::UnknownPeer) => {
                    fw.stats.unknown_peer += 1;
                    continue;
                }
                Err(Refused::Malformed) => {
                    fw.stats.malformed += 1;
                    continue;
                }
            };
            let Some(node) = self.nodes.get_mut(&to) else {
                fw.stats.unknown_destination += 1;
                continue;
            };
            if !self.emu.config(to).is_some_and(|c| c.enabled) {
                fw.stats.disabled += 1;
                continue;
            }
            capture_packet(node, packet);
            // As in `deliver`: a full TUN queue drops the packet.
            let _ = node.tun.send(packet);
            fw.stats.received += 1;
        }
    }

    /// Delivers what is due and arms the timer for the next deadline.
    fn release(&mut self) -> io::Result<()> {
        loop {
            let now = self.now();
            self.deliver(now);
            let Some(next) = self.emu.next_deadline() else {
                if self.armed.take().is_some() {
                    self.timer.unset().map_err(io::Error::from)?;
                }
                return Ok(());
            };
            let now = self.now();
            if next <= now {
                continue;
            }
            if self.armed != Some(next) {
                let wait = Duration::from_nanos(next - now);
                self.timer
                    .set(
                        Expiration::OneShot(TimeSpec::from_duration(wait)),
                        TimerSetTimeFlags::empty(),
                    )
                    .map_err(io::Error::from)?;
                self.armed = Some(next);
            }
            return Ok(());
        }
    }

    /// Applies a command; returns the reply channel when it is `Stop`.
    fn command(&mut self, poll: &Poll, cmd: Cmd) -> Option<oneshot::Sender<Stats>> {
        match cmd {
            Cmd::Add {
                id,
                addr,
                tun,
                capture,
                reply,
            } => {
                let r = self.add(poll, id, addr, tun, capture);
                let _ = reply.send(r);
            }
            Cmd::SetAddr { id, addr, reply } => {
                let _ = reply.send(self.emu.set_addr(id, addr));
            }
            Cmd::Configure { id, cfg, reply } => {
                let _ = reply.send(self.emu.configure(id, cfg));
            }
            Cmd::AddRemote {
                id,
                addr,
                peer,
                reply,
            } => {
                let _ = reply.send(self.add_remote(id, addr, peer));
            }
            Cmd::ForwardStats { reply } => {
                let _ = reply.send(self.forward.as_ref().map(|f| f.stats));
            }
            Cmd::Stop { reply } => return Some(reply),
        }
        None
    }

    fn add(
        &mut self,
        poll: &Poll,
        id: NodeId,
        addr: Ipv4Addr,
        tun: Tun,
        capture: Option<PathBuf>,
    ) -> Result<(), String> {
        self.emu.add_node(id, addr).map_err(|e| e.to_string())?;
        let capture = match capture {
            None => None,
            Some(path) => {
                let file = File::create(&path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                // Little-endian microsecond pcap: what tcpdump writes on x86 and every tool reads.
                let header = PcapHeader {
                    datalink: DataLink::RAW,
                    endianness: pcap_file::Endianness::Little,
                    ts_resolution: pcap_file::TsResolution::MicroSecond,
                    ..Default::default()
                };
                Some(
                    PcapWriter::with_header(BufWriter::new(file), header)
                        .map_err(|e| format!("cannot write {}: {e}", path.display()))?,
                )
            }
        };
        poll.registry()
            .register(
                &mut SourceFd(&tun.as_raw_fd()),
                token(id),
                Interest::READABLE,
            )
            .map_err(|e| format!("cannot watch the data interface: {e}"))?;
        self.nodes.insert(id, Node { tun, capture });
        // Anything it sent before registration would otherwise wait for the next edge.
        self.drain(id);
        Ok(())
    }

    fn add_remote(&mut self, id: NodeId, addr: Ipv4Addr, peer: SocketAddr) -> Result<(), String> {
        let Some(fw) = &mut self.forward else {
            return Err("this run's network has no forwarding endpoint".to_string());
        };
        let local = fw
            .sock
            .local_addr()
            .map_err(|e| format!("cannot read the forwarding address: {e}"))?;
        let to = forward::reachable(local, peer).ok_or_else(|| {
            format!("peer {peer} is not reachable from a socket bound at {local}")
        })?;
        self.emu.add_node(id, addr).map_err(|e| e.to_string())?;
        fw.remotes.insert(id, to);
        fw.peers.insert(peer);
        Ok(())
    }

    fn finish(&mut self) {
        for (_, mut node) in self.nodes.drain() {
            if let Some(w) = node.capture.take() {
                let mut inner = w.into_writer();
                let _ = std::io::Write::flush(&mut inner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;

    /// A minimal IPv4 header from 100.64.0.3 to 100.64.0.2.
    fn packet() -> Vec<u8> {
        vec![
            0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 100, 64, 0, 3, 100, 64, 0, 2,
        ]
    }

    fn total(s: &ForwardStats) -> u64 {
        s.received + s.unknown_peer + s.malformed + s.unknown_destination + s.disabled
    }

    /// The counters once the pump has seen `n` datagrams (it reads them on its own thread).
    async fn stats_after(pump: &Pump, n: u64) -> ForwardStats {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = pump.forward_stats().await.unwrap().unwrap();
            if total(&s) >= n || Instant::now() > deadline {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // Unprivileged: no TUN is needed to check what the pump refuses before any would be used.
    #[tokio::test]
    async fn datagrams_from_strangers_are_dropped() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = sock.local_addr().unwrap();
        let pump = Pump::start(1, "fwd-test", Some(sock)).unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
        pump.add_remote(
            NodeId(1),
            Ipv4Addr::new(100, 64, 0, 3),
            peer.local_addr().unwrap(),
        )
        .await
        .unwrap()
        .unwrap();
        let mut d = Vec::new();
        forward::encode(NodeId(0), &packet(), &mut d);
        // A well-formed datagram from a stranger, then the peer's junk, then the peer's good
        // datagram for an instance this agent does not have (no local instances here).
        stranger.send_to(&d, at).unwrap();
        peer.send_to(b"not a forwarded packet", at).unwrap();
        peer.send_to(&d, at).unwrap();
        let s = stats_after(&pump, 3).await;
        assert_eq!(
            s,
            ForwardStats {
                unknown_peer: 1,
                malformed: 1,
                unknown_destination: 1,
                ..ForwardStats::default()
            }
        );
        // The remote instance is in the emulator: a second one with its id or address is not.
        let again = pump
            .add_remote(
                NodeId(1),
                Ipv4Addr::new(100, 64, 0, 9),
                peer.local_addr().unwrap(),
            )
            .await
            .unwrap();
        assert!(again.unwrap_err().contains("exists"));
        let taken = pump
            .add_remote(
                NodeId(2),
                Ipv4Addr::new(100, 64, 0, 3),
                peer.local_addr().unwrap(),
            )
            .await
            .unwrap();
        assert!(taken.unwrap_err().contains("taken"));
        // An IPv4 socket cannot send to an IPv6 peer: refused now rather than failing per packet.
        let v6 = pump
            .add_remote(
                NodeId(3),
                Ipv4Addr::new(100, 64, 0, 4),
                "[::1]:4000".parse().unwrap(),
            )
            .await
            .unwrap();
        assert!(v6.unwrap_err().contains("not reachable"));
        assert!(pump.stop().await.is_some());
    }

    #[tokio::test]
    async fn a_pump_without_a_socket_has_no_remotes() {
        let pump = Pump::start(1, "nofwd-test", None).unwrap();
        assert_eq!(pump.forward_stats().await.unwrap(), None);
        let r = pump
            .add_remote(
                NodeId(1),
                Ipv4Addr::new(100, 64, 0, 3),
                "127.0.0.1:9".parse().unwrap(),
            )
            .await
            .unwrap();
        assert!(r.is_err());
        pump.stop().await;
    }
}
