//! The packet pump: one OS thread per run that owns the run's [`Emulator`] and every
//! instance's TUN device. It reads what instances send, runs it through the emulator, and
//! writes each packet to its destination's TUN when the emulator releases it.
//!
//! A dedicated thread rather than tokio tasks because latency accuracy is the product: packets
//! are timestamped as soon as they are read, and releases are driven by a `timerfd` with
//! nanosecond resolution instead of tokio's millisecond timer wheel. Everything else talks to the
//! thread through [`Pump`] (commands over a channel plus a `mio` waker), so nothing is shared.
//!
//! Timing under load: the thread asks for real-time scheduling (`SCHED_FIFO`, a modest
//! priority; [`Realtime`], `TESTGROUND_PUMP_REALTIME`) so that a busy machine does not delay its
//! wake-ups by a scheduler slice, sets its timer slack to 1 ns, and wakes a little before each
//! deadline to poll the last microseconds without sleeping ([`Waiter`]; bounded, so a real-time
//! thread cannot take a core). When real-time scheduling is refused it runs normally and says
//! why ([`Scheduling::message`]). On request (`TESTGROUND_PUMP_IDLE_POLL=on`, [`IdlePoll`]) it
//! also holds the kernel's CPU latency at 0 while it runs, so that idle CPUs poll instead of
//! halting and a quiet machine wakes as fast as a busy one.
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
use tg_netem::offload::{self, OffloadError, VNET_HDR_LEN, VnetHeader};
use tg_netem::{Emulator, NetemError, NodeConfig, NodeId, Offload, Stats};
use tg_sys::Tun;
use tokio::sync::oneshot;

use crate::forward::{self, ForwardStats, Peers, Refused};

const WAKER: Token = Token(usize::MAX);
const TIMER: Token = Token(usize::MAX - 1);
const FORWARD: Token = Token(usize::MAX - 2);
/// Room for the largest packet a TUN can produce (a 64 KiB TCP super-packet with offloads, or a
/// raised MTU) behind its `virtio_net_hdr`.
const BUF: usize = VNET_HDR_LEN + 65_536;
const _: () = assert!(VNET_HDR_LEN == tg_sys::tun::VNET_HDR_LEN);

/// The environment variable that turns real-time scheduling of the pump off (`off`, `0`,
/// `false`, `no`) or sets its priority (1 to 99); unset or `on` means [`DEFAULT_PRIORITY`].
pub const REALTIME_ENV: &str = "TESTGROUND_PUMP_REALTIME";
/// The pump's `SCHED_FIFO` priority: above every normal thread, below the kernel's own
/// real-time threads (which use 50 and up) and anything an operator made more urgent.
pub const DEFAULT_PRIORITY: i32 = 10;
/// How long before a deadline the pump stops sleeping and polls instead: a timer wake-up is
/// tens of microseconds late on a VM even at real-time priority, polling is not.
const SPIN_WINDOW: u64 = 50_000;
/// At most this much polling per [`SPIN_PERIOD`] (10 % of a core): with deadlines closer together
/// than the window, the pump would otherwise poll all the time, at real-time priority.
const SPIN_BUDGET: u64 = 10_000_000;
const SPIN_PERIOD: u64 = 100_000_000;

/// Whether the pump thread asks for real-time scheduling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Realtime {
    Off,
    /// `SCHED_FIFO` at this priority (1 to 99).
    Fifo(i32),
}

impl Realtime {
    /// The choice in [`REALTIME_ENV`]; an invalid value is reported and the default used.
    pub fn from_env() -> Realtime {
        let value = std::env::var(REALTIME_ENV).ok();
        Realtime::parse(value.as_deref()).unwrap_or_else(|e| {
            tracing::warn!("{e}");
            Realtime::Fifo(DEFAULT_PRIORITY)
        })
    }

    fn parse(value: Option<&str>) -> Result<Realtime, String> {
        let Some(v) = value.map(str::trim) else {
            return Ok(Realtime::Fifo(DEFAULT_PRIORITY));
        };
        match v.to_ascii_lowercase().as_str() {
            "" | "on" | "true" | "yes" => Ok(Realtime::Fifo(DEFAULT_PRIORITY)),
            "off" | "0" | "false" | "no" => Ok(Realtime::Off),
            n => match n.parse::<i32>() {
                Ok(p) if (1..=99).contains(&p) => Ok(Realtime::Fifo(p)),
                _ => Err(format!(
                    "{REALTIME_ENV}={v} is neither on, off nor a priority from 1 to 99; \
                     using priority {DEFAULT_PRIORITY}"
                )),
            },
        }
    }
}

/// The environment variable that makes idle CPUs poll while the pump runs (`on`); unset or
/// `off` leaves them to halt.
pub const IDLE_POLL_ENV: &str = "TESTGROUND_PUMP_IDLE_POLL";

/// What the pump asks of the machine when it starts: real-time scheduling, and whether idle
/// CPUs should poll rather than halt while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    pub realtime: Realtime,
    pub idle_poll: bool,
}

impl From<Realtime> for Tuning {
    fn from(realtime: Realtime) -> Tuning {
        Tuning {
            realtime,
            idle_poll: false,
        }
    }
}

impl Tuning {
    /// The choices in [`REALTIME_ENV`] and [`IDLE_POLL_ENV`]; an invalid value is reported and
    /// the default used.
    pub fn from_env() -> Tuning {
        let idle = std::env::var(IDLE_POLL_ENV).ok();
        Tuning {
            realtime: Realtime::from_env(),
            idle_poll: parse_idle_poll(idle.as_deref()).unwrap_or_else(|e| {
                tracing::warn!("{e}");
                false
            }),
        }
    }
}

fn parse_idle_poll(value: Option<&str>) -> Result<bool, String> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("" | "off" | "0" | "false" | "no") => Ok(false),
        Some("on" | "1" | "true" | "yes") => Ok(true),
        Some(_) => Err(format!(
            "{IDLE_POLL_ENV}={} is neither on nor off; idle CPUs are left to halt",
            value.unwrap_or_default().trim()
        )),
    }
}

/// Whether idle CPUs poll while the pump runs, as it found out when it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdlePoll {
    /// Not asked for.
    Off,
    /// The pump holds the CPU latency at 0 until it stops.
    On,
    /// Asked for, but the kernel's request file could not be used: why.
    Refused { reason: String },
}

impl IdlePoll {
    /// A line for the run log when idle polling was asked for: what it costs, or why not.
    pub fn message(&self) -> Option<String> {
        match self {
            IdlePoll::Off => None,
            IdlePoll::On => Some(format!(
                "network: idle CPUs poll instead of halting while this run's packet pump runs \
                 ({IDLE_POLL_ENV}=on): faster wake-ups on a quiet machine, and every idle CPU \
                 busy meanwhile"
            )),
            IdlePoll::Refused { reason } => Some(format!(
                "network: idle CPUs halt as usual: {IDLE_POLL_ENV}=on asked them to poll, but \
                 {reason} (it needs root and the kernel's {})",
                tg_sys::sched::CPU_LATENCY_FILE
            )),
        }
    }
}

/// How the pump thread is scheduled, as it found out when it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheduling {
    /// `SCHED_FIFO` at this priority.
    Realtime { priority: i32 },
    /// Normal scheduling, because real-time scheduling was turned off.
    Normal,
    /// Normal scheduling, because the kernel refused real-time scheduling: why, and how to allow it.
    Refused { priority: i32, reason: String },
}

impl Scheduling {
    /// A line for the run log when the pump could not have what it asked for.
    pub fn message(&self) -> Option<String> {
        match self {
            Scheduling::Realtime { .. } | Scheduling::Normal => None,
            Scheduling::Refused { priority, reason } => Some(format!(
                "network: the packet pump runs at normal priority, so shaped delays can run \
                 milliseconds late while other work keeps the CPUs busy; real-time scheduling \
                 (SCHED_FIFO {priority}) was refused: {reason}; \
                 {REALTIME_ENV}=off does without it and silences this"
            )),
        }
    }
}

/// Sets up the calling thread (the pump) for timely wake-ups.
fn apply_scheduling(realtime: Realtime) -> Scheduling {
    // The pump's own sleeps end at the instant asked rather than up to 50 µs later. Real-time
    // threads get no slack anyway; this matters when real-time scheduling is off or refused.
    if let Err(e) = tg_sys::sched::set_timer_slack(1) {
        tracing::debug!("packet pump: cannot set the timer slack: {e}");
    }
    match realtime {
        Realtime::Off => Scheduling::Normal,
        Realtime::Fifo(priority) => match tg_sys::sched::set_thread_fifo(priority) {
            Ok(()) => Scheduling::Realtime { priority },
            Err(e) => Scheduling::Refused {
                priority,
                reason: tg_sys::sched::RtFacts::read().explain(priority, &e),
            },
        },
    }
}

/// How late the pump released delayed packets (from the deadline the emulator gave a packet to
/// the pump's write of it): counts per power-of-two bucket of microseconds. Tells the pump's
/// own share of a late round trip from the share of the instances' wake-ups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lateness {
    /// `buckets[0]`: under 1 µs; `buckets[i]`: from 2^(i-1) to under 2^i µs; the last one
    /// also holds everything later.
    buckets: [u64; 24],
    pub count: u64,
    pub max_ns: u64,
}

impl Lateness {
    /// Counts one release `ns` nanoseconds after its deadline.
    pub fn record(&mut self, ns: u64) {
        let us = ns / 1_000;
        let i = if us == 0 {
            0
        } else {
            (u64::BITS - us.leading_zeros()) as usize
        };
        self.buckets[i.min(self.buckets.len() - 1)] += 1;
        self.count += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    /// An upper bound, in µs, of the `p`-th percentile (0 to 100): the top of its bucket.
    pub fn percentile_us(&self, p: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(1 << i);
            }
        }
        Some(1 << (self.buckets.len() - 1))
    }
}

/// What the pump does next about its earliest deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Nothing is scheduled: sleep until a packet or a command arrives.
    Idle,
    /// The deadline has passed: deliver.
    Due,
    /// The deadline is within the spin window: poll for I/O without sleeping until it passes.
    Spin,
    /// Sleep until `at` (a packet or a command may wake the pump earlier).
    Sleep { at: u64 },
}

/// Decides how the pump waits for a deadline, and keeps the polling within its budget. Pure:
/// time (nanoseconds since the pump's epoch) is passed in.
#[derive(Debug)]
struct Waiter {
    window: u64,
    budget: u64,
    period: u64,
    period_start: u64,
    /// Polling time spent in the current period, not counting the ongoing stretch.
    spent: u64,
    /// When the ongoing stretch of polling began.
    spinning_since: Option<u64>,
}

impl Waiter {
    fn new(window: u64, budget: u64, period: u64) -> Waiter {
        Waiter {
            window,
            budget,
            period,
            period_start: 0,
            spent: 0,
            spinning_since: None,
        }
    }

    fn plan(&mut self, now: u64, next: Option<u64>) -> Wait {
        if now.saturating_sub(self.period_start) >= self.period {
            self.period_start = now;
            self.spent = 0;
            if self.spinning_since.is_some() {
                self.spinning_since = Some(now);
            }
        }
        let spent = self.spent + self.spinning_since.map_or(0, |s| now.saturating_sub(s));
        let can_spin = spent < self.budget;
        let wait = match next {
            None => Wait::Idle,
            Some(d) if d <= now => Wait::Due,
            Some(d) if d - now <= self.window && can_spin => Wait::Spin,
            Some(d) if d - now <= self.window => Wait::Sleep { at: d },
            Some(d) if can_spin => Wait::Sleep {
                at: d - self.window,
            },
            Some(d) => Wait::Sleep { at: d },
        };
        match (wait, self.spinning_since) {
            (Wait::Spin, None) => self.spinning_since = Some(now),
            (Wait::Spin, Some(_)) => {}
            (_, Some(since)) => {
                self.spent += now.saturating_sub(since);
                self.spinning_since = None;
            }
            (_, None) => {}
        }
        wait
    }
}

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
    /// The release lateness since the last time it was taken (then reset).
    TakeLateness {
        reply: oneshot::Sender<Lateness>,
    },
    /// The pump thread's scheduling policy, as the kernel reports it.
    Policy {
        reply: oneshot::Sender<io::Result<tg_sys::sched::Policy>>,
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
    scheduling: Scheduling,
    idle_poll: IdlePoll,
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
    /// exchange packets with other agents over, if the run spans nodes. Real-time scheduling
    /// and idle polling as [`REALTIME_ENV`] and [`IDLE_POLL_ENV`] say.
    pub fn start(seed: u64, name: &str, forward: Option<std::net::UdpSocket>) -> io::Result<Pump> {
        Pump::start_with(seed, name, forward, Tuning::from_env())
    }

    /// [`Pump::start`] with the choices made by the caller (a [`Realtime`] alone leaves idle
    /// CPUs to halt).
    pub fn start_with(
        seed: u64,
        name: &str,
        forward: Option<std::net::UdpSocket>,
        tuning: impl Into<Tuning>,
    ) -> io::Result<Pump> {
        let tuning = tuning.into();
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
        let (ready, scheduled) = std_mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("tg-pump-{name}"))
            .spawn(move || {
                // Before anything else, so that the first packet is already read at the
                // scheduling it will have for the rest of the run.
                let scheduling = apply_scheduling(tuning.realtime);
                // Held by this thread, so that it ends with the pump however the pump ends.
                let (_latency, idle_poll) = if tuning.idle_poll {
                    match tg_sys::sched::hold_cpu_latency(0) {
                        Ok(hold) => (Some(hold), IdlePoll::On),
                        Err(e) => (
                            None,
                            IdlePoll::Refused {
                                reason: e.to_string(),
                            },
                        ),
                    }
                } else {
                    (None, IdlePoll::Off)
                };
                let _ = ready.send((scheduling, idle_poll));
                let mut worker = Worker {
                    emu: Emulator::new(seed),
                    nodes: HashMap::new(),
                    epoch: Instant::now(),
                    armed: None,
                    timer,
                    buf: vec![0u8; BUF],
                    wire: Vec::new(),
                    forward,
                    waiter: Waiter::new(SPIN_WINDOW, SPIN_BUDGET, SPIN_PERIOD),
                    lateness: Lateness::default(),
                };
                if let Err(e) = worker.run(poll, rx) {
                    tracing::error!("packet pump failed: {e}");
                }
            })?;
        // The thread reports at once (one system call or two); if it died first, the pump
        // failed anyway and the run finds out at its first command.
        let (scheduling, idle_poll) = scheduled
            .recv()
            .unwrap_or((Scheduling::Normal, IdlePoll::Off));
        Ok(Pump {
            tx,
            waker,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
            scheduling,
            idle_poll,
        })
    }

    /// How the pump thread is scheduled (see [`Scheduling::message`]).
    pub fn scheduling(&self) -> &Scheduling {
        &self.scheduling
    }

    /// Whether idle CPUs poll while the pump runs (see [`IdlePoll::message`]).
    pub fn idle_poll(&self) -> &IdlePoll {
        &self.idle_poll
    }

    /// How late delayed packets were released since the last call (or the start).
    pub async fn take_lateness(&self) -> Result<Lateness, PumpGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::TakeLateness { reply })?;
        rx.await.map_err(|_| PumpGone)
    }

    /// The pump thread's scheduling policy as the kernel reports it now.
    pub async fn policy(&self) -> Result<io::Result<tg_sys::sched::Policy>, PumpGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Policy { reply })?;
        rx.await.map_err(|_| PumpGone)
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
    /// Scratch space for the wire packets of an offloaded packet (segments for a capture, or for
    /// a destination that cannot take it whole).
    wire: Vec<Vec<u8>>,
    forward: Option<Forward>,
    waiter: Waiter,
    lateness: Lateness,
}

fn token(id: NodeId) -> Token {
    Token(id.0 as usize)
}

/// Splits what a TUN read returned into the packet and what its kernel left undone.
fn offloaded(vnet_hdr: bool, read: &[u8]) -> Result<(&[u8], Offload), OffloadError> {
    if !vnet_hdr {
        return Ok((read, Offload::NONE));
    }
    let off = VnetHeader::parse(read)?.offload()?;
    Ok((&read[VNET_HDR_LEN..], off))
}

/// Captures `data` as the wire packets it stands for: a capture shows what a wire would have
/// carried (segments, complete checksums), never a super-packet.
fn capture_offloaded(node: &mut Node, data: &[u8], off: Offload, wire: &mut Vec<Vec<u8>>) {
    if node.capture.is_none() {
        return;
    }
    if off.is_none() {
        return capture_packet(node, data);
    }
    wire.clear();
    // The emulator drops what cannot be segmented; the capture shows it as it came.
    if offload::wire_packets(data.to_vec(), off, wire).is_err() {
        return capture_packet(node, data);
    }
    for p in wire.drain(..) {
        capture_packet(node, &p);
    }
}

/// Writes a packet to a local instance's TUN (and capture). A TUN with offloads gets it as it
/// is, behind the header that tells its kernel what is left to do; one without gets its wire
/// packets. A full TUN queue drops the packet, as a full device queue would.
fn write_tun(node: &mut Node, packet: &[u8], off: Offload, wire: &mut Vec<Vec<u8>>) {
    capture_offloaded(node, packet, off, wire);
    if node.tun.vnet_hdr() {
        let hdr = VnetHeader::for_packet(packet, off).to_bytes();
        let _ = node
            .tun
            .send_parts(&[io::IoSlice::new(&hdr), io::IoSlice::new(packet)]);
    } else if off.is_none() {
        let _ = node.tun.send(packet);
    } else {
        wire.clear();
        if offload::wire_packets(packet.to_vec(), off, wire).is_ok() {
            for p in wire.drain(..) {
                let _ = node.tun.send(&p);
            }
        }
    }
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
        // Whether the next deadline is close enough to poll for it rather than sleep.
        let mut spin = false;
        loop {
            let timeout = spin.then_some(Duration::ZERO);
            match poll.poll(&mut events, timeout) {
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
            spin = self.release()?;
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
                    let (data, off) = match offloaded(node.tun.vnet_hdr(), &self.buf[..n]) {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::debug!("instance {}: packet dropped: {e}", id.0);
                            continue;
                        }
                    };
                    capture_offloaded(node, data, off, &mut self.wire);
                    let now = self.now();
                    self.emu.send_offloaded(now, id, data.to_vec(), off);
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
        while let Some((due, d)) = self.emu.poll_timed(now) {
            // Packets due when they were read (unshaped) are not releases the pump waited for.
            if due < now {
                self.lateness.record(self.now().saturating_sub(due));
            }
            if let Some(node) = self.nodes.get_mut(&d.to) {
                write_tun(node, &d.packet, d.offload, &mut self.wire);
            } else if let Some(fw) = &mut self.forward
                && let Some(&peer) = fw.remotes.get(&d.to)
            {
                // Datagrams carry wire packets: the remote agent's TUN may have no offloads.
                if d.offload.is_none() {
                    fw.send(d.to, peer, &d.packet);
                } else {
                    self.wire.clear();
                    if offload::wire_packets(d.packet, d.offload, &mut self.wire).is_ok() {
                        for p in self.wire.drain(..) {
                            fw.send(d.to, peer, &p);
                        }
                    }
                }
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
            write_tun(node, packet, Offload::NONE, &mut self.wire);
            fw.stats.received += 1;
        }
    }

    /// Delivers what is due and arms the timer for the next deadline; `true` when that
    /// deadline is so close that the pump should poll rather than sleep.
    fn release(&mut self) -> io::Result<bool> {
        loop {
            let now = self.now();
            self.deliver(now);
            let now = self.now();
            match self.waiter.plan(now, self.emu.next_deadline()) {
                Wait::Due => continue,
                Wait::Idle => {
                    if self.armed.take().is_some() {
                        self.timer.unset().map_err(io::Error::from)?;
                    }
                    return Ok(false);
                }
                // A timer still armed for this deadline's wake-up fires harmlessly.
                Wait::Spin => return Ok(true),
                Wait::Sleep { at } => {
                    if self.armed != Some(at) {
                        let wait = Duration::from_nanos(at.saturating_sub(now).max(1));
                        self.timer
                            .set(
                                Expiration::OneShot(TimeSpec::from_duration(wait)),
                                TimerSetTimeFlags::empty(),
                            )
                            .map_err(io::Error::from)?;
                        self.armed = Some(at);
                    }
                    return Ok(false);
                }
            }
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
            Cmd::TakeLateness { reply } => {
                let _ = reply.send(std::mem::take(&mut self.lateness));
            }
            Cmd::Policy { reply } => {
                let _ = reply.send(tg_sys::sched::thread_policy());
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

    #[test]
    fn reads_are_split_into_header_and_packet() {
        let p = packet();
        assert_eq!(offloaded(false, &p), Ok((&p[..], Offload::NONE)));
        let mut read = VnetHeader::default().to_bytes().to_vec();
        read.extend_from_slice(&p);
        assert_eq!(offloaded(true, &read), Ok((&p[..], Offload::NONE)));
        // A GSO type the pump never enables (UDP) is refused rather than passed on.
        read[1] = 3;
        read[4] = 100;
        assert!(offloaded(true, &read).is_err());
        assert!(offloaded(true, &read[..4]).is_err());
    }

    #[test]
    fn the_waiter_sleeps_until_the_window_then_polls() {
        let mut w = Waiter::new(50, 1_000, 10_000);
        assert_eq!(w.plan(0, None), Wait::Idle);
        // A far deadline: sleep until the window opens.
        assert_eq!(w.plan(0, Some(500)), Wait::Sleep { at: 450 });
        // Woken inside the window (on time or a little late): poll until it passes.
        assert_eq!(w.plan(450, Some(500)), Wait::Spin);
        assert_eq!(w.plan(499, Some(500)), Wait::Spin);
        assert_eq!(w.plan(500, Some(500)), Wait::Due);
        // A wake-up later than the window goes straight to delivery.
        assert_eq!(w.plan(900, Some(800)), Wait::Due);
        assert_eq!(w.plan(900, None), Wait::Idle);
    }

    #[test]
    fn polling_stops_when_its_budget_is_spent_and_resumes_next_period() {
        // 100 of polling per 1,000.
        let mut w = Waiter::new(50, 100, 1_000);
        assert_eq!(w.plan(0, Some(40)), Wait::Spin);
        assert_eq!(w.plan(40, Some(40)), Wait::Due);
        assert_eq!(w.plan(100, Some(150)), Wait::Spin);
        assert_eq!(w.plan(150, Some(150)), Wait::Due);
        // 90 spent: one more stretch starts, and is cut when the budget runs out.
        assert_eq!(w.plan(200, Some(300)), Wait::Sleep { at: 250 });
        assert_eq!(w.plan(250, Some(300)), Wait::Spin);
        assert_eq!(w.plan(260, Some(300)), Wait::Sleep { at: 300 });
        // Out of budget: sleep to the deadline itself.
        assert_eq!(w.plan(300, Some(320)), Wait::Sleep { at: 320 });
        assert_eq!(w.plan(400, Some(600)), Wait::Sleep { at: 600 });
        // A new period, a new budget.
        assert_eq!(w.plan(1_000, Some(1_500)), Wait::Sleep { at: 1_450 });
        assert_eq!(w.plan(1_460, Some(1_500)), Wait::Spin);
    }

    #[test]
    fn lateness_percentiles_are_bucket_tops() {
        let mut l = Lateness::default();
        assert_eq!(l.percentile_us(99.0), None);
        for ns in [300, 1_500, 3_000, 3_900, 70_000] {
            l.record(ns);
        }
        // <1 µs, [1, 2), [2, 4) twice, [64, 128).
        assert_eq!(l.percentile_us(20.0), Some(1));
        assert_eq!(l.percentile_us(50.0), Some(4));
        assert_eq!(l.percentile_us(80.0), Some(4));
        assert_eq!(l.percentile_us(99.0), Some(128));
        assert_eq!((l.count, l.max_ns), (5, 70_000));
        l.record(u64::MAX);
        assert_eq!(l.percentile_us(100.0), Some(1 << 23));
    }

    #[test]
    fn the_realtime_knob_reads_on_off_and_priorities() {
        let default = Realtime::Fifo(DEFAULT_PRIORITY);
        assert_eq!(Realtime::parse(None), Ok(default));
        for on in ["", "on", "TRUE", "yes"] {
            assert_eq!(Realtime::parse(Some(on)), Ok(default), "{on}");
        }
        for off in ["off", "0", "false", "No"] {
            assert_eq!(Realtime::parse(Some(off)), Ok(Realtime::Off), "{off}");
        }
        assert_eq!(Realtime::parse(Some(" 20 ")), Ok(Realtime::Fifo(20)));
        for bad in ["100", "-1", "fast"] {
            let e = Realtime::parse(Some(bad)).unwrap_err();
            assert!(e.contains(REALTIME_ENV), "{e}");
        }
    }

    #[tokio::test]
    async fn the_pump_is_realtime_when_allowed_or_says_why_not() {
        let off = Pump::start_with(1, "rt-off", None, Realtime::Off).unwrap();
        assert_eq!(off.scheduling(), &Scheduling::Normal);
        assert_eq!(off.scheduling().message(), None);
        assert_eq!(
            off.policy().await.unwrap().unwrap(),
            tg_sys::sched::Policy::Normal
        );
        off.stop().await;

        let on = Pump::start_with(1, "rt-on", None, Realtime::Fifo(3)).unwrap();
        let policy = on.policy().await.unwrap().unwrap();
        match on.scheduling() {
            Scheduling::Realtime { priority } => {
                assert_eq!(*priority, 3);
                assert_eq!(policy, tg_sys::sched::Policy::Fifo(3));
                assert_eq!(on.scheduling().message(), None);
            }
            Scheduling::Refused { .. } => {
                // Not permitted here: normal scheduling, and a message naming the way out.
                assert_eq!(policy, tg_sys::sched::Policy::Normal);
                let m = on.scheduling().message().unwrap();
                assert!(m.contains("refused") && m.contains(REALTIME_ENV), "{m}");
            }
            Scheduling::Normal => panic!("real-time scheduling was asked for"),
        }
        // The thread that started the pump keeps its own scheduling.
        assert_eq!(
            tg_sys::sched::thread_policy().unwrap(),
            tg_sys::sched::Policy::Normal
        );
        on.stop().await;
    }

    #[test]
    fn the_idle_poll_knob_reads_on_and_off() {
        for off in [None, Some(""), Some("off"), Some("0"), Some("No")] {
            assert_eq!(parse_idle_poll(off), Ok(false), "{off:?}");
        }
        for on in ["on", " TRUE ", "1", "yes"] {
            assert_eq!(parse_idle_poll(Some(on)), Ok(true), "{on}");
        }
        let e = parse_idle_poll(Some("always")).unwrap_err();
        assert!(e.contains(IDLE_POLL_ENV) && e.contains("always"), "{e}");
        assert!(!Tuning::from(Realtime::Off).idle_poll);
    }

    /// Asked for, idle polling is in force while the pump runs (the kernel's CPU latency
    /// target is 0), or the pump says why not; not asked for, it says nothing.
    #[tokio::test]
    async fn idle_cpus_poll_while_the_pump_runs_when_asked() {
        let quiet = Pump::start_with(1, "idle-off", None, Realtime::Off).unwrap();
        assert_eq!(quiet.idle_poll(), &IdlePoll::Off);
        assert_eq!(quiet.idle_poll().message(), None);
        quiet.stop().await;

        let tuning = Tuning {
            realtime: Realtime::Off,
            idle_poll: true,
        };
        let polling = Pump::start_with(1, "idle-on", None, tuning).unwrap();
        let required = std::env::var("TG_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1");
        match polling.idle_poll() {
            IdlePoll::On => {
                assert_eq!(tg_sys::sched::cpu_latency_target().unwrap(), 0);
                let m = polling.idle_poll().message().unwrap();
                assert!(m.contains(IDLE_POLL_ENV) && m.contains("poll"), "{m}");
            }
            IdlePoll::Refused { reason } if !required => {
                let m = polling.idle_poll().message().unwrap();
                assert!(
                    m.contains(IDLE_POLL_ENV) && m.contains(reason.as_str()),
                    "{m}"
                );
                eprintln!("idle polling refused here: {reason}");
            }
            other => panic!("asked for idle polling (TG_REQUIRE_PRIVILEGED={required}): {other:?}"),
        }
        polling.stop().await;
    }

    #[test]
    fn a_refusal_is_one_line_with_the_reason() {
        let s = Scheduling::Refused {
            priority: 10,
            reason: "Operation not permitted (os error 1): no budget".into(),
        };
        let m = s.message().unwrap();
        assert!(!m.contains('\n'));
        assert!(
            m.contains("SCHED_FIFO 10") && m.contains("no budget"),
            "{m}"
        );
        assert_eq!(Scheduling::Realtime { priority: 10 }.message(), None);
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
