//! The sidecar: the per-run network agent of the `local:netns` runner (DESIGN.md §5).
//!
//! For each run it builds a private control network (a namespace of its own where the sync
//! service answers on `192.18.0.1:5050`, one veth per instance, IPv4 only) and a data network
//! that exists only in userspace: every instance's `eth1` is a TUN device whose other end is the
//! run's packet pump, which routes and shapes packets with the `tg-netem` emulator. It signals
//! `network-initialized` once per instance, then applies every `network.Config` the instance
//! publishes on `network:<hostname>` and signals the config's `callback_state`; a config it
//! cannot decode or apply is not signalled but reported ([`SidecarEvent::ConfigRefused`]).
//!
//! It does not spawn or supervise instance processes (`tg-runner` does, inside the [`Jail`]s
//! this crate hands out), nor run the sync service (`tg-sync`; it only serves it into the
//! control network). All `unsafe` (namespaces, TUN, netlink, jails) lives in `tg-sys`.
//!
//! Lifetime: namespaces are held by descriptors of this process and by the instances' processes,
//! never bind-mounted, so the kernel frees them (and every interface in them, the host end of
//! the host link included, and the nft rules that live in the control namespace) when the run's
//! [`RunNetwork`] is shut down or this process dies and the instances are gone. Instances that
//! outlive a killed owner are the runner's business: it puts every instance of a run into the
//! run's cgroup and kills that (`tg-runner`'s run tracking), which also removes the run's temp
//! directory. So the sidecar records nothing on disk.
//!
//! Modules:
//! - `addr`: the address plan (data subnets, control and host-link addresses).
//! - `config`: `network.Config` → emulator configuration, with validation.
//! - `pump`: the packet pump thread (TUN devices ⇄ emulator, timerfd-driven, pcap capture;
//!   real-time scheduling where permitted, see [`Realtime`]).
//! - `forward`: cross-node forwarding between agents (datagram format, accepted senders).
//!
//! Cross-node runs: agents on several nodes form one data network when each is created with
//! the same [`Options::subnet`] and a [`Options::forward`] endpoint, and is told with
//! [`RunNetwork::add_remote`] which instances live behind which other agent (DESIGN.md,
//! "Cross-node forwarding").

pub mod addr;
mod config;
pub mod forward;
mod pump;

use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::Ipv4Net;
use tg_api::network::NetworkConfig;
use tg_netem::{NodeId, Stats};
use tg_sync::SyncService;
use tg_sys::{Batch, Jail, NetNs, Netlink, NetlinkSocket, Tun, VethEnd};
use tokio::sync::{OnceCell, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use addr::{CONTROL_SUBNET, HOST_NAME, SYNC_ADDR, SYNC_NAME};
pub use config::{ConfigError, Plan, plan};
pub use forward::ForwardStats;
pub use pump::{
    DEFAULT_PRIORITY, IDLE_POLL_ENV, IdlePoll, Lateness, Pump, REALTIME_ENV, Realtime, Scheduling,
    Tuning,
};

/// The port the sync service answers on inside every control network, whatever the host uses.
pub const SYNC_PORT: u16 = 5050;

/// Everything a run's network needs to know.
#[derive(Debug, Clone)]
pub struct Options {
    pub run_id: String,
    /// `run:<run>:plan:<plan>:case:<case>`: where the run's states and topics live.
    pub sync_prefix: String,
    pub sync: SyncService,
    /// Seeds every impairment of the run.
    pub seed: u64,
    /// Write a pcap of each instance's data traffic.
    pub capture: bool,
    /// A directory private to the run (the hosts file goes there).
    pub work_dir: PathBuf,
    /// The run's data /16, fixed by the caller instead of leased from this process's pool.
    /// Agents on different nodes that form one data network must use the same subnet (and
    /// distinct instance ordinals). No lease is taken then, so the caller coordinates: it must
    /// not hand the same subnet to two runs whose agents forward to each other. Two runs of one
    /// process may share a subnet otherwise; their data networks stay disjoint.
    pub subnet: Option<Ipv4Net>,
    /// Where to bind the UDP socket that exchanges packets with other nodes' agents (e.g.
    /// `0.0.0.0:0` or a node address with a fixed port); `None` for a single-node run. The
    /// socket lives in the namespace of the calling process (the node's network), not in the
    /// run's control namespace.
    pub forward: Option<SocketAddr>,
}

/// Setting up or tearing down a run's network failed.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("no free data subnet: 64 local:netns runs are already going in this process")]
    NoSubnet,
    #[error("too many instances for one data network (at most {max})")]
    TooManyInstances { max: u32 },
    #[error("the packet pump stopped")]
    PumpGone,
    #[error("data subnet {subnet}: {reason}")]
    BadSubnet { subnet: Ipv4Net, reason: String },
    #[error("this run's network has no forwarding endpoint (Options::forward)")]
    NotForwarding,
    #[error("{0}")]
    Other(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SidecarError {
    let what = what.into();
    move |source| SidecarError::Io { what, source }
}

impl From<pump::PumpGone> for SidecarError {
    fn from(_: pump::PumpGone) -> Self {
        SidecarError::PumpGone
    }
}

/// What the runner needs to start an instance inside its network.
#[derive(Debug)]
pub struct Instance {
    pub jail: Jail,
    /// The instance's network namespace (a second handle; the agent keeps its own).
    pub netns: NetNs,
    pub data_addr: Ipv4Addr,
    pub netns_inode: u64,
}

/// State shared by the run's agents.
struct Shared {
    subnet: Ipv4Net,
    keys: tg_api::sync::RunKeys,
    sync: SyncService,
    pump: Pump,
    ctl: NetNs,
    /// Blocking netlink sockets in the control namespace for threads building instances.
    ctl_sockets: SocketPool,
    /// Set up once, when the first instance asks for `allow_all`.
    nat: OnceCell<Result<(), String>>,
    /// The host's end of the run's host link, named in the log when `allow_all` is first used.
    host_addr: Option<Ipv4Addr>,
    log: mpsc::UnboundedSender<SidecarEvent>,
    /// Whether data interfaces are created with offloads ([`OFFLOAD_ENV`]).
    offloads: bool,
    /// Set once the run log said that offloads are unavailable.
    offloads_refused: std::sync::atomic::AtomicBool,
}

/// The environment variable that turns TUN offloads of the data interfaces off (`off`, `0`,
/// `false`, `no`); on by default. Off, the pump reads and writes one wire packet per system
/// call, as before offloads (for comparisons, or a kernel whose offloads misbehave).
pub const OFFLOAD_ENV: &str = "TESTGROUND_TUN_OFFLOAD";

fn offloads_from_env() -> bool {
    let v = std::env::var(OFFLOAD_ENV).unwrap_or_default();
    !matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "off" | "0" | "false" | "no"
    )
}

/// Creates an instance's data interface `eth1` in `ns`, or in the calling thread's namespace
/// when `None` (a thread building the instance from inside it), with offloads when the run uses
/// them. A kernel that refuses them gets a device without, and the run log says so once.
fn data_interface(sh: &Shared, ns: Option<&NetNs>) -> Result<Tun, SidecarError> {
    let create = || {
        match ns {
            Some(ns) => Tun::create(ns, "eth1"),
            None => Tun::create_here("eth1"),
        }
        .map_err(io_err("create the data interface"))
    };
    if !sh.offloads {
        return create();
    }
    let offloaded = match ns {
        Some(ns) => Tun::create_offloaded(ns, "eth1"),
        None => Tun::create_offloaded_here("eth1"),
    };
    let (tun, refused) = match offloaded {
        Ok((tun, Ok(()))) => (tun, None),
        Ok((tun, Err(e))) => (tun, Some(e)),
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            return Err(io_err("create the data interface")(e));
        }
        Err(e) => (create()?, Some(e)),
    };
    if let Some(e) = refused
        && !sh
            .offloads_refused
            .swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        sh.log(format!(
            "network: TUN offloads are unavailable ({e}), so the packet pump moves one wire \
             packet per system call and unshaped TCP between instances is several times slower; \
             shaping is unaffected"
        ));
    }
    Ok(tun)
}

/// Blocking netlink sockets of one namespace, reused: as many as threads used them at once.
#[derive(Debug, Default)]
struct SocketPool(std::sync::Mutex<Vec<NetlinkSocket>>);

impl SocketPool {
    /// Applies `batch` through a socket in `ns` (one from the pool, or a new one).
    fn apply(&self, ns: &NetNs, batch: &Batch<'_>) -> io::Result<()> {
        let idle = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut socket = match idle {
            Some(s) => s,
            None => NetlinkSocket::open(ns)?,
        };
        socket.apply(batch)?;
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(socket);
        Ok(())
    }
}

impl Shared {
    fn log(&self, msg: String) {
        let _ = self.log.send(SidecarEvent::Log(msg));
    }
}

/// What a run's network reports to its runner while it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum SidecarEvent {
    /// A line for the run log.
    Log(String),
    /// An instance published a `network.Config` that could not be decoded or applied. Its
    /// `callback_state` was not signalled (as by the original), so the instance waits on it
    /// until the run ends; the runner should fail that instance with `reason`.
    ConfigRefused {
        ordinal: u32,
        hostname: String,
        reason: String,
    },
    /// An instance's `network.Config` was applied (before its `callback_state` is signalled).
    ConfigApplied {
        ordinal: u32,
        hostname: String,
        /// The config as the instance published it.
        config: String,
    },
}

/// The event as a run-log line.
impl std::fmt::Display for SidecarEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SidecarEvent::Log(line) => f.write_str(line),
            SidecarEvent::ConfigRefused {
                ordinal,
                hostname,
                reason,
            } => write!(
                f,
                "instance {ordinal} ({hostname}): network config refused: {reason}"
            ),
            SidecarEvent::ConfigApplied {
                ordinal, hostname, ..
            } => write!(f, "instance {ordinal} ({hostname}): network config applied"),
        }
    }
}

/// A run's network: control namespace, sync endpoint, pump, and one agent per instance.
pub struct RunNetwork {
    shared: Arc<Shared>,
    /// Held for the run's lifetime; frees the subnet on drop. `None` when the caller fixed it.
    _lease: Option<addr::SubnetLease>,
    /// Where the forwarding socket is bound, if the run spans nodes.
    forward_addr: Option<SocketAddr>,
    agents: JoinSet<()>,
    server: tokio::task::JoinHandle<()>,
    stop_server: CancellationToken,
    /// False once shut down.
    live: bool,
    /// The run's instance namespaces, held open by the agents (so their inodes cannot be
    /// reused while the run lives).
    inodes: BTreeSet<u64>,
    hosts: PathBuf,
    capture: bool,
    /// The host's end of the host link (kept for the hosts file and the log).
    host_link: Option<addr::HostLink>,
    /// The machine's CPU times when the network was made, for the share its host has taken
    /// since (see [`RunNetwork::steal_since_created`]).
    cpu_at_create: Option<tg_sys::proc::CpuTimes>,
}

impl std::fmt::Debug for RunNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunNetwork")
            .field("subnet", &self.shared.subnet)
            .finish_non_exhaustive()
    }
}

/// Checks a caller's data subnet against the address plan, which numbers instances in a /16.
fn fixed_subnet(subnet: Ipv4Net) -> Result<Ipv4Net, SidecarError> {
    if subnet.prefix_len() != 16 {
        return Err(SidecarError::BadSubnet {
            subnet,
            reason: "must be a /16 (instances are numbered in a /16)".into(),
        });
    }
    let subnet = subnet.trunc();
    // Routes to the control network or the host link inside an instance would be shadowed.
    for (taken, what) in [
        (CONTROL_SUBNET, "the control network"),
        (addr::HOST_LINKS, "the host links"),
    ] {
        let taken: Ipv4Net = taken.parse().expect("a valid constant");
        if taken.contains(&subnet.network()) || subnet.contains(&taken.network()) {
            return Err(SidecarError::BadSubnet {
                subnet,
                reason: format!("overlaps {what} ({taken})"),
            });
        }
    }
    // `100.64.1.2/16` means `100.64.0.0/16`: addresses derive from the network address.
    Ok(subnet)
}

/// `0.0.0.0/0`.
fn default_route() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).expect("a /0 is valid")
}

/// A stable, well-spread number for `s` (FNV-1a), to pick a host-link slot per run.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl RunNetwork {
    /// Builds the control network and starts the pump and the sync endpoint.
    pub async fn create(
        opts: Options,
        log: mpsc::UnboundedSender<SidecarEvent>,
    ) -> Result<RunNetwork, SidecarError> {
        let (lease, subnet) = match opts.subnet {
            Some(subnet) => (None, fixed_subnet(subnet)?),
            None => {
                let lease = addr::SubnetLease::take().ok_or(SidecarError::NoSubnet)?;
                let subnet = lease.subnet();
                (Some(lease), subnet)
            }
        };
        // Bound before anything else is built, so that a taken port fails the run early.
        let forward = opts
            .forward
            .map(|at| {
                std::net::UdpSocket::bind(at).map_err(io_err(format!("bind forwarding to {at}")))
            })
            .transpose()?;
        let forward_addr = forward
            .as_ref()
            .map(|s| s.local_addr())
            .transpose()
            .map_err(io_err("read the forwarding address"))?;
        let ctl = NetNs::new().map_err(io_err("create the control namespace"))?;
        // IPv4 only: interfaces created in here from now on (the instances' `c<i>` ends and
        // `host0`) get no IPv6 addresses.
        for key in [
            "net/ipv6/conf/default/disable_ipv6",
            "net/ipv6/conf/all/disable_ipv6",
        ] {
            tg_sys::write_sysctl(&ctl, key, "1")
                .map_err(io_err("disable IPv6 in the control namespace"))?;
        }
        let ctl_nl = Netlink::open(&ctl)
            .await
            .map_err(io_err("open netlink in the control namespace"))?;
        let lo = ctl_nl.link_index("lo").await.map_err(io_err("find lo"))?;
        ctl_nl.set_up(lo).await.map_err(io_err("set lo up"))?;
        ctl_nl
            .add_address(lo, SYNC_ADDR, 32)
            .await
            .map_err(io_err("add the sync address"))?;

        let host_link = Self::host_link(&opts.run_id, &ctl, &ctl_nl).await?;

        // The sync endpoint: a listener created inside the control namespace, served by the
        // engine's one sync service.
        let listener = ctl
            .run(|| {
                let l = std::net::TcpListener::bind((SYNC_ADDR, SYNC_PORT))?;
                l.set_nonblocking(true)?;
                Ok::<_, io::Error>(l)
            })
            .map_err(io_err("enter the control namespace"))?
            .map_err(io_err(format!("listen on {SYNC_ADDR}:{SYNC_PORT}")))?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(io_err("register the sync listener"))?;
        let stop_server = CancellationToken::new();
        let server = tokio::spawn(tg_sync::server::serve(
            listener,
            opts.sync.clone(),
            stop_server.clone().cancelled_owned(),
        ));

        let pump = Pump::start(opts.seed, &opts.run_id, forward)
            .map_err(io_err("start the packet pump"))?;
        // Said once per run, at its start: a refusal is a property of the machine (or of the
        // engine's cgroup), and explains late packets before anyone goes looking.
        if let Some(line) = pump.scheduling().message() {
            tracing::warn!("{line}");
            let _ = log.send(SidecarEvent::Log(line));
        }
        if let Some(line) = pump.idle_poll().message() {
            tracing::info!("{line}");
            let _ = log.send(SidecarEvent::Log(line));
        }

        let hosts = opts.work_dir.join("hosts");
        let mut text = format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{SYNC_ADDR}\t{SYNC_NAME}\n"
        );
        if let Some(h) = host_link {
            text.push_str(&format!("{}\t{HOST_NAME}\n", h.host_addr()));
        }
        std::fs::create_dir_all(&opts.work_dir)
            .and_then(|()| std::fs::write(&hosts, text))
            .map_err(io_err(format!("write {}", hosts.display())))?;

        Ok(RunNetwork {
            shared: Arc::new(Shared {
                subnet,
                keys: tg_api::sync::RunKeys::from_prefix(opts.sync_prefix.clone()),
                sync: opts.sync,
                pump,
                ctl,
                ctl_sockets: SocketPool::default(),
                nat: OnceCell::new(),
                host_addr: host_link.map(|h| h.host_addr()),
                log,
                offloads: offloads_from_env(),
                offloads_refused: std::sync::atomic::AtomicBool::new(false),
            }),
            _lease: lease,
            forward_addr,
            agents: JoinSet::new(),
            server,
            stop_server,
            live: true,
            inodes: BTreeSet::new(),
            hosts,
            capture: opts.capture,
            host_link,
            cpu_at_create: tg_sys::proc::CpuTimes::now().ok(),
        })
    }

    /// Joins the control namespace to the host with a veth (`tgh<slot>` ⇄ `host0`), so that
    /// `allow_all` instances can reach the host. A run that cannot get one still runs; only
    /// `allow_all` will then fail, with a message.
    async fn host_link(
        run_id: &str,
        ctl: &NetNs,
        ctl_nl: &Netlink,
    ) -> Result<Option<addr::HostLink>, SidecarError> {
        let host = NetNs::current().map_err(io_err("open the host namespace"))?;
        let host_nl = Netlink::open(&host)
            .await
            .map_err(io_err("open netlink in the host namespace"))?;
        let first = (fnv(run_id) % u64::from(addr::HostLink::SLOTS)) as u32;
        for i in 0..64 {
            let link = addr::HostLink {
                slot: (first + i) % addr::HostLink::SLOTS,
            };
            // Another run (of any process) holding the slot has the interface name already.
            let idx = match host_nl.add_veth(&link.host_if(), "host0", ctl).await {
                Ok(idx) => idx,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("create the host link")(e)),
            };
            host_nl
                .add_address(idx, link.host_addr(), 30)
                .await
                .map_err(io_err("address the host link"))?;
            host_nl
                .set_up(idx)
                .await
                .map_err(io_err("set the host link up"))?;
            let h0 = ctl_nl
                .link_index("host0")
                .await
                .map_err(io_err("find host0"))?;
            ctl_nl
                .add_address(h0, link.ctl_addr(), 30)
                .await
                .map_err(io_err("address host0"))?;
            ctl_nl.set_up(h0).await.map_err(io_err("set host0 up"))?;
            ctl_nl
                .add_route(default_route(), Some(link.host_addr()), h0)
                .await
                .map_err(io_err("route the control namespace to the host"))?;
            return Ok(Some(link));
        }
        Ok(None)
    }

    /// The run's data network (`TEST_SUBNET`).
    pub fn subnet(&self) -> Ipv4Net {
        self.shared.subnet
    }

    /// How the run's packet pump is scheduled (real-time, or why not).
    pub fn scheduling(&self) -> &Scheduling {
        self.shared.pump.scheduling()
    }

    /// How late the pump released delayed packets since the last call (then reset): the
    /// pump's own share of a shaped delay's error.
    pub async fn take_pump_lateness(&self) -> Result<Lateness, SidecarError> {
        self.shared
            .pump
            .take_lateness()
            .await
            .map_err(|_| SidecarError::PumpGone)
    }

    /// The share of the machine's CPU time that a virtual machine's host took (steal) since
    /// the network was made; `None` where `/proc/stat` says nothing or no time passed.
    pub fn steal_since_created(&self) -> Option<f64> {
        let now = tg_sys::proc::CpuTimes::now().ok()?;
        now.steal_since(self.cpu_at_create.as_ref()?)
    }

    /// Where this agent receives packets from other nodes' agents (what they pass to
    /// [`RunNetwork::add_remote`]), if [`Options::forward`] was set.
    pub fn forward_addr(&self) -> Option<SocketAddr> {
        self.forward_addr
    }

    /// Tells this agent that instance `ordinal` (at `data_addr(subnet, ordinal)`) lives behind
    /// the agent whose forwarding socket is `peer`. Local instances then reach it (shaped here,
    /// by their own configs), and `peer` becomes a trusted sender: the only datagrams written
    /// into local instances are those from agents named in a call to this method.
    ///
    /// The remote instance's later address changes are not propagated (DESIGN.md).
    pub async fn add_remote(&self, ordinal: u32, peer: SocketAddr) -> Result<(), SidecarError> {
        if ordinal >= addr::MAX_INSTANCES {
            return Err(SidecarError::TooManyInstances {
                max: addr::MAX_INSTANCES,
            });
        }
        if self.forward_addr.is_none() {
            return Err(SidecarError::NotForwarding);
        }
        let addr = addr::data_addr(self.shared.subnet, ordinal);
        self.shared
            .pump
            .add_remote(NodeId(ordinal), addr, peer)
            .await?
            .map_err(|e| SidecarError::Other(format!("remote instance {ordinal}: {e}")))
    }

    /// The forwarding link's counters, `None` for a single-node run.
    pub async fn forward_stats(&self) -> Result<Option<ForwardStats>, SidecarError> {
        Ok(self.shared.pump.forward_stats().await?)
    }

    /// The host's address on the run's host link, if it has one (`testground-host`).
    pub fn host_addr(&self) -> Option<Ipv4Addr> {
        self.host_link.map(|h| h.host_addr())
    }

    /// The host's interface of the run's host link (`tgh<slot>`), if it has one.
    pub fn host_if(&self) -> Option<String> {
        self.host_link.map(|h| h.host_if())
    }

    /// Builds instance `ordinal`'s namespace (control veth, data TUN), connects it to the pump,
    /// signals its `network-initialized` and starts applying what it publishes on
    /// `network:<hostname>`. `outputs` receives `data.pcap` when capture is on.
    pub async fn add_instance(
        &mut self,
        ordinal: u32,
        hostname: &str,
        outputs: &Path,
    ) -> Result<Instance, SidecarError> {
        let (inst, agent) = prepare(
            self.shared.clone(),
            self.hosts.clone(),
            self.capture,
            InstanceSpec {
                ordinal,
                hostname: hostname.to_string(),
                outputs: outputs.to_path_buf(),
                netns: None,
                control: ControlLink::Veth,
            },
        )
        .await?;
        Ok(self.register(inst, agent))
    }

    /// [`RunNetwork::add_instance`] for many instances, `concurrency` of them being built at
    /// a time (netlink round trips and the kernel's device setup overlap), in order.
    pub async fn add_instances(
        &mut self,
        specs: Vec<InstanceSpec>,
        concurrency: usize,
    ) -> Result<Vec<Instance>, SidecarError> {
        use futures::StreamExt;
        let mut built = self.build(specs, concurrency);
        let mut out = Vec::new();
        while let Some(r) = built.next().await {
            let (inst, agent) = r?;
            out.push(self.register(inst, agent));
        }
        Ok(out)
    }

    /// Builds the networks of `specs`, `concurrency` at a time, yielding them in order; the
    /// stream holds no borrow of `self`, so each result can be registered as it comes.
    fn build(
        &self,
        specs: Vec<InstanceSpec>,
        concurrency: usize,
    ) -> impl futures::Stream<Item = Result<(Instance, Agent), SidecarError>> + use<> {
        use futures::StreamExt;
        let shared = self.shared.clone();
        let hosts = self.hosts.clone();
        let capture = self.capture;
        futures::stream::iter(specs)
            .map(move |spec| prepare(shared.clone(), hosts.clone(), capture, spec))
            .buffered(concurrency.max(1))
    }

    /// [`RunNetwork::add_instances`], handing each instance to `out` as soon as it (and every
    /// one before it) is ready, so that the caller can start instance `i` while later ones
    /// are still being built. Stops after the first error (sent too) or when `out` is closed;
    /// instances built by then belong to the run's network all the same (its shutdown
    /// removes them).
    pub async fn add_instances_to(
        &mut self,
        specs: Vec<InstanceSpec>,
        concurrency: usize,
        out: mpsc::Sender<Result<Instance, SidecarError>>,
    ) {
        use futures::StreamExt;
        let mut built = self.build(specs, concurrency);
        while let Some(r) = built.next().await {
            let r = r.map(|(inst, agent)| self.register(inst, agent));
            let failed = r.is_err();
            if out.send(r).await.is_err() || failed {
                return;
            }
        }
    }

    fn register(&mut self, inst: Instance, agent: Agent) -> Instance {
        self.inodes.insert(inst.netns_inode);
        self.agents.spawn(agent.run());
        inst
    }

    /// Tears the run's network down: kills whatever still lives in its namespaces, stops the
    /// agents, the sync endpoint and the pump. Returns the emulator's counters.
    ///
    /// Identifying processes by namespace inode is sound only here, while the agents still
    /// hold the namespaces open: an inode is reused only once its namespace is freed. Processes
    /// that left the namespaces, and those of a run whose owner was killed, are the runner's
    /// per-run tracking's business (a cgroup per run), not the sidecar's.
    pub async fn shutdown(mut self) -> Option<Stats> {
        let inodes = std::mem::take(&mut self.inodes);
        let killed = tokio::task::spawn_blocking(move || kill_in_namespaces(&inodes))
            .await
            .unwrap_or(0);
        if killed > 0 {
            self.shared.log(format!(
                "killed {killed} processes left in the run's namespaces"
            ));
        }
        self.agents.abort_all();
        while self.agents.join_next().await.is_some() {}
        self.stop_server.cancel();
        let _ = (&mut self.server).await;
        let stats = self.shared.pump.stop().await;
        self.live = false;
        stats
    }
}

/// A network dropped without [`RunNetwork::shutdown`] (its run's future was dropped) still
/// leaves nothing behind: processes in its namespaces are killed, the pump thread stops and
/// closes the TUN devices, the sync endpoint closes, and the agents (holding the namespace
/// handles) are aborted by their `JoinSet`.
impl Drop for RunNetwork {
    fn drop(&mut self) {
        if !self.live {
            return;
        }
        // The agents (holding the namespaces) are still alive here: see `shutdown`.
        kill_in_namespaces(&self.inodes);
        self.stop_server.cancel();
        self.shared.pump.stop_detached();
    }
}

/// Kills (SIGKILL) every process living in one of the network namespaces `inodes`, which the
/// caller must hold open (see [`RunNetwork::shutdown`]); returns how many it killed.
fn kill_in_namespaces(inodes: &BTreeSet<u64>) -> usize {
    if inodes.is_empty() {
        return 0;
    }
    tg_sys::proc::pids_in_any_netns(inodes)
        .unwrap_or_default()
        .into_iter()
        .filter(|&pid| {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
        })
        .count()
}

/// What [`RunNetwork::add_instances`] needs to know of one instance.
#[derive(Debug)]
pub struct InstanceSpec {
    pub ordinal: u32,
    /// Its `HOSTNAME` and kernel hostname: names its `network:<hostname>` topic.
    pub hostname: String,
    /// Its outputs directory (for `data.pcap`).
    pub outputs: PathBuf,
    /// The namespace to build the instance's network in (e.g. a container's, under
    /// `local:docker`); `None` creates a fresh one (`local:netns`).
    pub netns: Option<NetNs>,
    /// How the instance reaches its sync service.
    pub control: ControlLink,
}

/// An instance's control network: how it reaches the sync service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ControlLink {
    /// A veth `eth0` into the run's control namespace, which serves the sync service
    /// (`local:netns`, `local:docker`).
    #[default]
    Veth,
    /// The namespace has its control interface `eth0` already (a pod's, from the cluster's
    /// network), whose default route goes via `gateway`. Under `deny_all` (the initial
    /// policy, as with a veth) only routes to `keep` (the sync service's host) remain;
    /// `allow_all` restores the default route.
    Existing {
        gateway: Ipv4Addr,
        keep: Vec<Ipv4Addr>,
    },
}

/// Builds one instance's network: namespace, control veth and route, TUN, addresses,
/// the node in the emulator, its jail, and its (not yet started) agent.
async fn prepare(
    shared: Arc<Shared>,
    hosts: PathBuf,
    capture: bool,
    spec: InstanceSpec,
) -> Result<(Instance, Agent), SidecarError> {
    let InstanceSpec {
        ordinal,
        hostname,
        outputs,
        netns,
        control,
    } = spec;
    if ordinal >= addr::MAX_INSTANCES {
        return Err(SidecarError::TooManyInstances {
            max: addr::MAX_INSTANCES,
        });
    }
    let daddr = addr::data_addr(shared.subnet, ordinal);
    let (ns, tun, ctl_if) = match &control {
        ControlLink::Veth => {
            let sh = shared.clone();
            tokio::task::spawn_blocking(move || veth_instance(&sh, netns, ordinal))
                .await
                .map_err(|e| SidecarError::Other(format!("building instance {ordinal}: {e}")))??
        }
        ControlLink::Existing { gateway, keep } => {
            let ns = match netns {
                Some(ns) => ns,
                None => NetNs::new().map_err(io_err("create an instance namespace"))?,
            };
            let tun = existing_instance(&shared, &ns, ordinal, *gateway, keep).await?;
            (ns, tun, String::new())
        }
    };

    let id = NodeId(ordinal);
    let capture = capture.then(|| outputs.join("data.pcap"));
    shared
        .pump
        .add(id, daddr, tun, capture)
        .await?
        .map_err(SidecarError::Other)?;

    let jail = Jail::new(&ns, &hostname, &hosts).map_err(io_err("prepare the jail"))?;
    let netns_inode = ns.inode().map_err(io_err("read the namespace inode"))?;

    let netns = ns
        .try_clone()
        .map_err(io_err("duplicate the namespace handle"))?;
    let agent = Agent {
        shared: shared.clone(),
        id,
        hostname,
        ns,
        ctl_if,
        control,
        addr: daddr,
        allow_all: false,
    };
    Ok((
        Instance {
            jail,
            netns,
            data_addr: daddr,
            netns_inode,
        },
        agent,
    ))
}

/// An instance's network with a control veth (`local:netns`, `local:docker`), built on the
/// calling (blocking) thread: everything inside the instance's namespace happens on the one
/// helper thread that creates (or enters) it, and the netlink requests go in three batches.
/// Returns the namespace, the TUN device and the name of the control namespace's end of the
/// link.
///
/// - Control namespace, one batch: the veth `c<i>` (fixed index, up) ⇄ `eth0` (born in the
///   instance's namespace, down), both with fixed hardware addresses; the route to the
///   instance's control address over `c<i>`; its permanent neighbour entry.
/// - Instance namespace: the persistent TUN `eth1`; IPv6 off on `eth0` and `eth1` before
///   they come up; then one batch: `lo` up, `eth0`'s address, up, the route to the sync
///   service and its permanent neighbour entry, `eth1`'s address, up. No default route
///   (`deny_all`).
///
/// The permanent neighbour entries: the kernel's ARP table is shared by every namespace and
/// holds 1,024 dynamic entries by default; two per instance overflow it past about 500
/// instances and connections to the sync service then fail. Permanent entries are not
/// counted.
fn veth_instance(
    sh: &Shared,
    netns: Option<NetNs>,
    ordinal: u32,
) -> Result<(NetNs, Tun, String), SidecarError> {
    let ctl_if = format!("c{ordinal}");
    let inside = |ns: &NetNs| -> Result<Tun, SidecarError> {
        let caddr = addr::control_addr(ordinal);
        let daddr = addr::data_addr(sh.subnet, ordinal);
        let (eth0_mac, ctl_mac) = addr::control_macs(ordinal);
        let cidx = addr::control_ifindex(ordinal);

        let mut ctl = Batch::new();
        ctl.add_veth(
            VethEnd {
                name: &ctl_if,
                index: cidx,
                mac: &ctl_mac,
                up: true,
            },
            VethEnd {
                name: "eth0",
                index: 0,
                mac: &eth0_mac,
                up: false,
            },
            ns,
        );
        ctl.add_route(Ipv4Net::from(caddr), None, cidx);
        ctl.add_neighbour(cidx, caddr, &eth0_mac);
        sh.ctl_sockets
            .apply(&sh.ctl, &ctl)
            .map_err(io_err(format!("create the control link {ctl_if}")))?;

        let tun = data_interface(sh, None)?;
        // Destroyed with the namespace, in the kernel's batched teardown (see set_persist).
        tun.set_persist(true)
            .map_err(io_err("make the data interface persistent"))?;
        let eth0 = tg_sys::netlink::link_index_here("eth0").map_err(io_err("find eth0"))?;
        let eth1 = tg_sys::netlink::link_index_here("eth1").map_err(io_err("find eth1"))?;
        let mut b = Batch::new();
        // IPv4 only, before the interfaces come up: on eth0 (the control network, as the
        // original's) no link-local address a plan could take for a data address or use to
        // reach other instances; on eth1 no router solicitations or MLD reports sent into
        // the emulator, which can only drop them. (The control namespace's ends have IPv6
        // disabled outright, and the emulator carries IPv4 only.)
        b.no_ipv6_addresses(eth0);
        b.no_ipv6_addresses(eth1);
        b.set_up(LOOPBACK_INDEX);
        b.add_address(eth0, caddr, 32);
        b.set_up(eth0);
        b.add_route(Ipv4Net::from(SYNC_ADDR), None, eth0);
        b.add_neighbour(eth0, SYNC_ADDR, &ctl_mac);
        b.add_address(eth1, daddr, sh.subnet.prefix_len());
        b.set_up(eth1);
        NetlinkSocket::open_here()
            .and_then(|mut nl| nl.apply(&b))
            .map_err(io_err("configure the instance's interfaces"))?;
        Ok(tun)
    };
    let (ns, tun) = match netns {
        None => {
            let (ns, tun) =
                NetNs::new_with(inside).map_err(io_err("create an instance namespace"))?;
            (ns, tun?)
        }
        Some(ns) => {
            let tun = ns
                .run(|| inside(&ns))
                .map_err(io_err("enter the instance's namespace"))??;
            (ns, tun)
        }
    };
    Ok((ns, tun, ctl_if))
}

/// `lo` has this index in every namespace (the kernel's `LOOPBACK_IFINDEX`).
const LOOPBACK_INDEX: u32 = 1;

/// An instance's network in a namespace whose `eth0` exists already (a pod's): the TUN
/// `eth1` and its address, and `deny_all` on `eth0`.
async fn existing_instance(
    sh: &Shared,
    ns: &NetNs,
    ordinal: u32,
    gateway: Ipv4Addr,
    keep: &[Ipv4Addr],
) -> Result<Tun, SidecarError> {
    let tun = data_interface(sh, Some(ns))?;
    // Destroyed with the namespace, in the kernel's batched teardown (see set_persist).
    tun.set_persist(true)
        .map_err(io_err("make the data interface persistent"))?;
    // The data network is IPv4 only; without this every instance's kernel sends router
    // solicitations and MLD reports into the emulator, which can only drop them.
    tg_sys::write_sysctl(ns, "net/ipv6/conf/eth1/disable_ipv6", "1")
        .map_err(io_err("disable IPv6 on eth1"))?;
    let nl = Netlink::open(ns)
        .await
        .map_err(io_err("open netlink in an instance namespace"))?;
    let lo = nl.link_index("lo").await.map_err(io_err("find lo"))?;
    nl.set_up(lo).await.map_err(io_err("set lo up"))?;
    existing_eth0(&nl, gateway, keep).await?;
    let eth1 = nl.link_index("eth1").await.map_err(io_err("find eth1"))?;
    let daddr = addr::data_addr(sh.subnet, ordinal);
    nl.add_address(eth1, daddr, sh.subnet.prefix_len())
        .await
        .map_err(io_err("address eth1"))?;
    nl.set_up(eth1).await.map_err(io_err("set eth1 up"))?;
    Ok(tun)
}

/// A pod's own `eth0`: routes to `keep` via `gateway`, then no default route (`deny_all`).
async fn existing_eth0(
    nl: &Netlink,
    gateway: Ipv4Addr,
    keep: &[Ipv4Addr],
) -> Result<(), SidecarError> {
    let eth0 = nl.link_index("eth0").await.map_err(io_err("find eth0"))?;
    for k in keep {
        match nl.add_route(Ipv4Net::from(*k), Some(gateway), eth0).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(format!("route to {k}"))(e)),
        }
    }
    match nl.del_route(default_route(), Some(gateway), eth0).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove the default route")(e)),
    }
}

/// One instance's agent: owns its namespace handle and current network state.
struct Agent {
    shared: Arc<Shared>,
    id: NodeId,
    hostname: String,
    ns: NetNs,
    ctl_if: String,
    control: ControlLink,
    addr: Ipv4Addr,
    allow_all: bool,
}

impl Agent {
    async fn run(mut self) {
        let sh = self.shared.clone();
        // One signal per instance, as each original sidecar did; instances wait for all N.
        if let Err(e) = sh
            .sync
            .signal_entry(&sh.keys.state("network-initialized"))
            .await
        {
            sh.log(format!(
                "{}: cannot signal network-initialized: {e}",
                self.hostname
            ));
            return;
        }
        let mut sub = sh
            .sync
            .subscribe(&sh.keys.topic(&format!("network:{}", self.hostname)));
        while let Some(item) = sub.next_item().await {
            let raw = item.raw().get();
            let applied = match serde_json::from_str::<NetworkConfig>(raw) {
                Ok(cfg) => self
                    .apply(&cfg)
                    .await
                    .map(|()| cfg.callback_state)
                    .map_err(|e| format!("not applied: {e}")),
                Err(e) => Err(format!("cannot decode it: {e}")),
            };
            let callback = match applied {
                Ok(callback) => {
                    let _ = sh.log.send(SidecarEvent::ConfigApplied {
                        ordinal: self.id.0,
                        hostname: self.hostname.clone(),
                        config: raw.to_string(),
                    });
                    callback
                }
                Err(reason) => {
                    // As the original: the callback is not signalled, so the plan does not go
                    // on unshaped (and perhaps pass falsely); the runner fails the instance.
                    sh.log(format!("network config of {} {reason}", self.hostname));
                    let _ = sh.log.send(SidecarEvent::ConfigRefused {
                        ordinal: self.id.0,
                        hostname: self.hostname.clone(),
                        reason,
                    });
                    continue;
                }
            };
            if !callback.is_empty()
                && let Err(e) = sh.sync.signal_entry(&sh.keys.state(&callback)).await
            {
                sh.log(format!("{}: cannot signal {callback}: {e}", self.hostname));
            }
        }
    }

    async fn apply(&mut self, cfg: &NetworkConfig) -> Result<(), String> {
        let sh = self.shared.clone();
        let plan = config::plan(cfg, sh.subnet, self.addr).map_err(|e| e.to_string())?;
        for w in &plan.warnings {
            sh.log(format!("network config of {}: {w}", self.hostname));
        }
        if let Some(new) = plan.new_addr {
            sh.pump
                .set_addr(self.id, new)
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("cannot move to {new}: {e}"))?;
            let nl = Netlink::open(&self.ns).await.map_err(|e| e.to_string())?;
            let eth1 = nl.link_index("eth1").await.map_err(|e| e.to_string())?;
            let prefix = sh.subnet.prefix_len();
            // The old address goes first: deleting a primary address also deletes the
            // secondaries of its subnet, which the new one would be.
            nl.del_address(eth1, self.addr, prefix)
                .await
                .map_err(|e| format!("remove {}: {e}", self.addr))?;
            nl.add_address(eth1, new, prefix)
                .await
                .map_err(|e| format!("add {new}: {e}"))?;
            self.addr = new;
        }
        sh.pump
            .configure(self.id, plan.node)
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if plan.allow_all != self.allow_all {
            self.set_routing(plan.allow_all).await?;
        }
        Ok(())
    }

    /// `allow_all`: a default route over the control link, forwarded and masqueraded by the
    /// control namespace to the host. `deny_all`: only the sync service's /32.
    async fn set_routing(&mut self, allow_all: bool) -> Result<(), String> {
        if let ControlLink::Existing { gateway, .. } = self.control {
            return self.set_existing_routing(allow_all, gateway).await;
        }
        let sh = self.shared.clone();
        if allow_all {
            sh.nat
                .get_or_init(|| async {
                    let r = enable_nat(&sh.ctl).await;
                    // Said once, and only in runs that use it.
                    if r.is_ok()
                        && let Some(a) = sh.host_addr
                    {
                        sh.log(format!(
                            "host reachable under allow_all at {a} ({HOST_NAME})"
                        ));
                    }
                    r
                })
                .await
                .clone()?;
        }
        let value = if allow_all { "1" } else { "0" };
        let ctl = sh.ctl.try_clone().map_err(|e| e.to_string())?;
        let key = format!("net/ipv4/conf/{}/forwarding", self.ctl_if);
        tokio::task::spawn_blocking(move || tg_sys::write_sysctl(&ctl, &key, value))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot set forwarding: {e}"))?;
        let nl = Netlink::open(&self.ns).await.map_err(|e| e.to_string())?;
        let eth0 = nl.link_index("eth0").await.map_err(|e| e.to_string())?;
        let default = default_route();
        if allow_all {
            nl.add_route(default, Some(SYNC_ADDR), eth0)
                .await
                .map_err(|e| format!("cannot add the default route: {e}"))?;
        } else {
            match nl.del_route(default, Some(SYNC_ADDR), eth0).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove the default route: {e}")),
            }
        }
        self.allow_all = allow_all;
        Ok(())
    }

    /// `allow_all` on a pod's own `eth0`: its default route via the cluster network's
    /// gateway, which the pod had before its agent removed it; `deny_all` removes it again.
    async fn set_existing_routing(
        &mut self,
        allow_all: bool,
        gateway: Ipv4Addr,
    ) -> Result<(), String> {
        let nl = Netlink::open(&self.ns).await.map_err(|e| e.to_string())?;
        let eth0 = nl.link_index("eth0").await.map_err(|e| e.to_string())?;
        let default = default_route();
        if allow_all {
            match nl.add_route(default, Some(gateway), eth0).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("cannot add the default route: {e}")),
            }
        } else {
            match nl.del_route(default, Some(gateway), eth0).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot remove the default route: {e}")),
            }
        }
        self.allow_all = allow_all;
        Ok(())
    }
}

/// Masquerades what leaves the control namespace towards the host, so replies find their way
/// back without the host knowing the run's control addresses (every run uses the same ones).
/// Uses the `nft` tool once per run, inside the control namespace.
async fn enable_nat(ctl: &NetNs) -> Result<(), String> {
    let ctl2 = ctl.try_clone().map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(move || {
        tg_sys::write_sysctl(&ctl2, "net/ipv4/conf/host0/forwarding", "1")
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot enable forwarding: {e}"))?;
    // Forwarding only ever goes to or from the host: instances must not reach each other over
    // the control network (the data network is the only path between them, as the original's
    // `verify` plan checks), even when they have a default route over it.
    let ruleset = "table ip testground {\n  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"host0\" masquerade\n  }\n  chain forward {\n    type filter hook forward priority filter; policy accept;\n    iifname != \"host0\" oifname != \"host0\" drop\n  }\n}\n";
    // nsenter joins the namespace through this process's descriptor for it.
    let ns_path = format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        std::os::fd::AsRawFd::as_raw_fd(ctl)
    );
    let mut child = tokio::process::Command::new("nsenter")
        .arg(format!("--net={ns_path}"))
        .args(["nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("allow_all needs nsenter and nft (apt install nftables): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        stdin
            .write_all(ruleset.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "allow_all needs nftables: nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_subnets_are_checked() {
        let ok: Ipv4Net = "100.100.7.9/16".parse().unwrap();
        assert_eq!(
            fixed_subnet(ok).unwrap(),
            "100.100.0.0/16".parse::<Ipv4Net>().unwrap()
        );
        for bad in [
            "100.64.0.0/24",
            "192.18.0.0/16",
            "198.19.0.0/16",
            "10.0.0.0/8",
        ] {
            let e = fixed_subnet(bad.parse().unwrap()).unwrap_err();
            assert!(matches!(e, SidecarError::BadSubnet { .. }), "{bad}: {e}");
        }
    }
}
