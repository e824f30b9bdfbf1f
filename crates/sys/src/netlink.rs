//! Async rtnetlink configuration of one namespace's links, addresses and routes.
//!
//! A netlink socket talks to the namespace it was created in, for its whole life. So
//! [`Netlink::open`] creates the socket on a helper thread inside the namespace and then
//! drives it from the caller's tokio runtime; afterwards no thread needs to be in the
//! namespace. Requests on one handle may be issued concurrently (they are multiplexed by
//! sequence number over the one socket).
//!
//! [`NetlinkSocket`] and [`Batch`] are the blocking counterpart for setup code that runs on
//! a plain thread (e.g. inside a namespace's helper thread): many requests in one system call.

use std::fmt::Display;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use rtnetlink::packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoVeth, LinkAttribute, State,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteScope, RouteType};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{
    AddressMessageBuilder, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

use crate::error::{with_context, with_context_kind};
use crate::netns::NetNs;

/// An rtnetlink handle whose socket lives in one namespace. The connection task runs on
/// the tokio runtime that was current in [`Netlink::open`] and ends when this handle
/// (and every clone of [`Netlink::handle`]) is dropped.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").finish_non_exhaustive()
    }
}

/// Turns an rtnetlink error into an `io::Error` that keeps the errno (EEXIST →
/// `AlreadyExists`, ENODEV/ENOENT → `NotFound`, EPERM → `PermissionDenied`, ...) and
/// names the operation.
fn nl_error(what: impl Display) -> impl FnOnce(rtnetlink::Error) -> io::Error {
    move |err| match err {
        rtnetlink::Error::NetlinkError(ref msg) if msg.code.is_some() => {
            errno_error(msg.code.map_or(0, |c| c.get()).abs(), &what.to_string())
        }
        other => with_context(io::Error::other(other), what.to_string()),
    }
}

impl Netlink {
    /// A handle whose socket lives in `ns` (the socket is created inside `ns.run(..)`,
    /// then its connection task is spawned on the current tokio runtime).
    ///
    /// Blocks the calling thread briefly (one helper thread spawn). Fails if called
    /// outside a tokio runtime.
    pub async fn open(ns: &NetNs) -> io::Result<Netlink> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| io::Error::other(format!("Netlink::open needs a tokio runtime: {e}")))?;
        // The socket is registered with the runtime's reactor while the helper thread
        // (in `ns`) has the runtime entered; creation is what binds it to `ns`.
        let (connection, handle, _unsolicited) = ns
            .run(move || {
                let _guard = runtime.enter();
                rtnetlink::new_connection()
            })?
            .map_err(|e| with_context(e, "opening rtnetlink socket"))?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// The underlying rtnetlink handle, for requests this type does not wrap (it talks
    /// to the same namespace).
    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    /// Index of interface `name`; `NotFound` if there is none.
    pub async fn link_index(&self, name: &str) -> io::Result<u32> {
        let what = format!("looking up interface {name}");
        let link = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
            .map_err(nl_error(&what))?;
        match link {
            Some(link) => Ok(link.header.index),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{what}: no such interface"),
            )),
        }
    }

    /// Every interface of the namespace as (index, name).
    pub async fn links(&self) -> io::Result<Vec<(u32, String)>> {
        let mut stream = self.handle.link().get().execute();
        let mut links = Vec::new();
        while let Some(link) = stream.try_next().await.map_err(nl_error("listing links"))? {
            let name = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            links.push((link.header.index, name.unwrap_or_default()));
        }
        Ok(links)
    }

    /// Sets the interface administratively up.
    pub async fn set_up(&self, index: u32) -> io::Result<()> {
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl_error(format!("setting link {index} up")))
    }

    /// The link message of interface `index`; `what` names the operation in errors.
    async fn get_link(
        &self,
        index: u32,
        what: &str,
    ) -> io::Result<rtnetlink::packet_route::link::LinkMessage> {
        self.handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .map_err(nl_error(what))?
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{what}: no such interface"),
                )
            })
    }

    /// Whether the kernel reports the interface operationally up (`IFLA_OPERSTATE` UP, or
    /// UNKNOWN for devices without carrier reporting such as `lo`).
    ///
    /// After [`Netlink::set_up`] this turns true asynchronously: the kernel's linkwatch
    /// worker handles the carrier-on event and only then attaches the device's queueing
    /// discipline, so packets sent out of the device before that are silently dropped.
    /// With thousands of links changing at once that can take seconds; wait for this
    /// (see [`Netlink::wait_oper_up`]) before declaring an instance's network ready.
    pub async fn is_oper_up(&self, index: u32) -> io::Result<bool> {
        let what = format!("reading operstate of link {index}");
        let link = self.get_link(index, &what).await?;
        Ok(link.attributes.iter().any(|a| {
            matches!(
                a,
                LinkAttribute::OperState(State::Up) | LinkAttribute::OperState(State::Unknown)
            )
        }))
    }

    /// Polls [`Netlink::is_oper_up`] until it is true; `TimedOut` after `timeout`.
    pub async fn wait_oper_up(&self, index: u32, timeout: Duration) -> io::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Linkwatch works in batches spaced up to a second apart; 10 ms polling adds
        // little latency and few requests.
        while !self.is_oper_up(index).await? {
            if tokio::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("link {index} not operationally up after {timeout:?}"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Sets the interface administratively down.
    pub async fn set_down(&self, index: u32) -> io::Result<()> {
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(nl_error(format!("setting link {index} down")))
    }

    /// Sets the interface MTU.
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> io::Result<()> {
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .map_err(nl_error(format!("setting mtu {mtu} on link {index}")))
    }

    /// Adds `addr/prefix` to the interface (with the subnet broadcast address).
    pub async fn add_address(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr), prefix)
            .execute()
            .await
            .map_err(nl_error(format!(
                "adding address {addr}/{prefix} to link {index}"
            )))
    }

    /// Removes `addr/prefix` from the interface.
    pub async fn del_address(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let message = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(addr, prefix)
            .build();
        self.handle
            .address()
            .del(message)
            .execute()
            .await
            .map_err(nl_error(format!(
                "deleting address {addr}/{prefix} from link {index}"
            )))
    }

    /// The route message shared by add and delete: the kernel only deletes a route whose
    /// scope matches the request, so both must be built identically.
    fn route_message(
        dst: Ipv4Net,
        gateway: Option<Ipv4Addr>,
        oif: u32,
    ) -> rtnetlink::packet_route::route::RouteMessage {
        let builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .output_interface(oif);
        match gateway {
            // onlink: the gateway need not be inside a subnet configured on `oif`, so a
            // /32 address on a point-to-point link can still route via its peer.
            Some(gw) => builder.gateway(gw).onlink().build(),
            None => builder.scope(RouteScope::Link).build(),
        }
    }

    /// Adds a route to `dst` out of `oif`, via `gateway` if given (with the onlink flag
    /// so a /32 peer works), else scope link. Host bits of `dst` are ignored.
    pub async fn add_route(
        &self,
        dst: Ipv4Net,
        gateway: Option<Ipv4Addr>,
        oif: u32,
    ) -> io::Result<()> {
        self.handle
            .route()
            .add(Self::route_message(dst, gateway, oif))
            .execute()
            .await
            .map_err(nl_error(describe_route("adding", dst, gateway, oif)))
    }

    /// Deletes the route [`Netlink::add_route`] would add with the same arguments, whatever
    /// its protocol.
    pub async fn del_route(
        &self,
        dst: Ipv4Net,
        gateway: Option<Ipv4Addr>,
        oif: u32,
    ) -> io::Result<()> {
        let mut msg = Self::route_message(dst, gateway, oif);
        // Any protocol: a route someone else added (a CNI's `proto boot` default route) is
        // only found when the request names none.
        msg.header.protocol = rtnetlink::packet_route::route::RouteProtocol::Unspec;
        self.handle
            .route()
            .del(msg)
            .execute()
            .await
            .map_err(nl_error(describe_route("deleting", dst, gateway, oif)))
    }

    /// Creates a veth pair: `name` in this handle's namespace and `peer_name` directly
    /// inside `peer_ns` (IFLA_NET_NS_FD on the peer), both down. Returns the index of
    /// `name`.
    pub async fn add_veth(&self, name: &str, peer_name: &str, peer_ns: &NetNs) -> io::Result<u32> {
        // The fd is only read by the kernel while handling this request; `peer_ns` is
        // borrowed until the request has been acknowledged, so it stays open.
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer_name.to_string())
            .setns_by_fd(peer_ns.as_raw_fd())
            .build();
        let message = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(name.to_string())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(nl_error(format!("creating veth {name} (peer {peer_name})")))?;
        self.link_index(name).await
    }

    /// The interface's hardware address (6 bytes for a veth; empty for a TUN device,
    /// which has none).
    pub async fn link_mac(&self, index: u32) -> io::Result<Vec<u8>> {
        let what = format!("reading hardware address of link {index}");
        let link = self.get_link(index, &what).await?;
        Ok(link
            .attributes
            .into_iter()
            .find_map(|a| match a {
                LinkAttribute::Address(mac) => Some(mac),
                _ => None,
            })
            .unwrap_or_default())
    }

    /// Adds (or replaces) a permanent neighbour entry: `addr` is at `mac` on the link,
    /// so no ARP is needed. Pass an empty `mac` for links without hardware addresses
    /// (TUN).
    ///
    /// Why: the kernel's IPv4 neighbour table limit (`gc_thresh3`, default 1024) counts
    /// dynamic entries of *all* namespaces together and can only be raised from the
    /// initial namespace. A thousand instances resolving even one neighbour each on two
    /// links overflow it ("neighbour table overflow" in dmesg) and packets are dropped.
    /// Permanent entries are not counted, so pin every neighbour the topology needs
    /// (and route through one on-link gateway rather than many on-link destinations).
    pub async fn add_neighbour(&self, index: u32, addr: Ipv4Addr, mac: &[u8]) -> io::Result<()> {
        let mut request = self
            .handle
            .neighbours()
            .add(index, IpAddr::V4(addr))
            .state(NeighbourState::Permanent)
            .replace();
        if !mac.is_empty() {
            request = request.link_layer_address(mac);
        }
        request
            .execute()
            .await
            .map_err(nl_error(format!("adding neighbour {addr} on link {index}")))
    }

    /// Deletes the interface (for a veth, both ends).
    pub async fn del_link(&self, index: u32) -> io::Result<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(nl_error(format!("deleting link {index}")))
    }
}

fn describe_route(verb: &str, dst: Ipv4Net, gateway: Option<Ipv4Addr>, oif: u32) -> String {
    match gateway {
        Some(gw) => format!("{verb} route {dst} via {gw} dev {oif} onlink"),
        None => format!("{verb} route {dst} dev {oif} scope link"),
    }
}

/// A blocking rtnetlink socket bound to one namespace, for [`Batch`]es: many requests in one
/// system call, from a plain (non-async) thread.
///
/// Why beside [`Netlink`]: setting up an instance's network takes about fifteen requests; one
/// at a time through the async handle each costs a round trip through its connection task
/// and two system calls. A batch is one `send` (the kernel handles every message of it in
/// that call, in order) and one `recv` per acknowledgement, already queued when `send`
/// returns. The socket talks to the namespace it was created in, whichever thread uses it.
#[derive(Debug)]
pub struct NetlinkSocket {
    socket: rtnetlink::sys::Socket,
    seq: u32,
}

/// How long to wait for acknowledgements that the kernel should have queued during `send`.
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);

impl NetlinkSocket {
    /// A socket in the calling thread's namespace (e.g. inside [`NetNs::new_with`]).
    pub fn open_here() -> io::Result<NetlinkSocket> {
        let mut socket = rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)
            .map_err(|e| with_context(e, "opening rtnetlink socket"))?;
        socket
            .bind_auto()
            .map_err(|e| with_context(e, "binding rtnetlink socket"))?;
        // Acknowledgements only: the request is not echoed back with each of them.
        socket
            .set_cap_ack(true)
            .map_err(|e| with_context(e, "setting NETLINK_CAP_ACK"))?;
        let fd = socket.as_raw_fd();
        // SAFETY: `fd` is the open socket owned by `socket` for the duration of the call; the
        // borrowed descriptor does not outlive it.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        nix::sys::socket::setsockopt(
            &borrowed,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(BATCH_TIMEOUT.as_secs() as _, 0),
        )
        .map_err(|e| crate::error::nix_context(e, "setting SO_RCVTIMEO on rtnetlink socket"))?;
        Ok(NetlinkSocket { socket, seq: 0 })
    }

    /// A socket in `ns` (created on a helper thread inside it).
    pub fn open(ns: &NetNs) -> io::Result<NetlinkSocket> {
        ns.run(Self::open_here)?
    }

    /// Sends every request of `batch` in one system call and waits for each acknowledgement.
    /// The kernel handles them in order and goes on after a failed one; the first failure is
    /// returned, naming its request. An empty batch sends nothing.
    pub fn apply(&mut self, batch: &Batch<'_>) -> io::Result<()> {
        if batch.requests.is_empty() {
            return Ok(());
        }
        let first = self.seq.wrapping_add(1);
        let mut buf = Vec::new();
        for (i, (msg, _)) in batch.requests.iter().enumerate() {
            let mut msg = msg.clone();
            msg.header.sequence_number = first.wrapping_add(i as u32);
            msg.finalize();
            let at = buf.len();
            buf.resize(at + msg.buffer_len(), 0);
            msg.serialize(&mut buf[at..]);
        }
        self.seq = first.wrapping_add(batch.requests.len() as u32 - 1);
        let sent = self
            .socket
            .send(&buf, 0)
            .map_err(|e| with_context(e, "sending a batch of rtnetlink requests"))?;
        if sent != buf.len() {
            return Err(io::Error::other(format!(
                "rtnetlink batch: sent {sent} of {} bytes",
                buf.len()
            )));
        }
        let mut pending = batch.requests.len();
        let mut failure: Option<io::Error> = None;
        let mut rx: Vec<u8> = Vec::with_capacity(8192);
        while pending > 0 {
            rx.clear();
            self.socket.recv(&mut rx, 0).map_err(|e| {
                with_context(e, "waiting for rtnetlink acknowledgements of a batch")
            })?;
            let mut at = 0;
            while at + 16 <= rx.len() {
                let len = u32::from_ne_bytes(rx[at..at + 4].try_into().expect("4 bytes")) as usize;
                if len < 16 || at + len > rx.len() {
                    break;
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[at..at + len])
                    .map_err(|e| io::Error::other(format!("rtnetlink acknowledgement: {e}")))?;
                // Netlink aligns messages to 4 bytes.
                at += len.div_ceil(4) * 4;
                let index = msg.header.sequence_number.wrapping_sub(first) as usize;
                if index >= batch.requests.len() {
                    // Not ours (a late answer to an earlier batch that failed half-way).
                    continue;
                }
                if let NetlinkPayload::Error(err) = msg.payload {
                    pending -= 1;
                    if let Some(code) = err.code
                        && failure.is_none()
                    {
                        let what = &batch.requests[index].1;
                        failure = Some(errno_error(code.get().abs(), what));
                    }
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

/// An errno from the kernel as `io::Error`, keeping it (EEXIST → `AlreadyExists`, ...).
fn errno_error(code: i32, what: &str) -> io::Error {
    let os = io::Error::from_raw_os_error(code);
    // std files ENODEV under "uncategorized"; for netlink it always means "no such
    // interface", which callers want to match as NotFound.
    let kind = if code == libc::ENODEV {
        io::ErrorKind::NotFound
    } else {
        os.kind()
    };
    with_context_kind(kind, os, what.to_string())
}

/// rtnetlink requests to send together with [`NetlinkSocket::apply`], each acknowledged. The
/// lifetime is that of namespace handles the requests name (a veth peer's namespace), which
/// must stay open until the batch is applied.
#[derive(Debug, Default)]
pub struct Batch<'a> {
    requests: Vec<(NetlinkMessage<RouteNetlinkMessage>, String)>,
    _ns: std::marker::PhantomData<&'a NetNs>,
}

/// One end of a veth pair as [`Batch::add_veth`] creates it.
#[derive(Debug, Clone)]
pub struct VethEnd<'a> {
    pub name: &'a str,
    /// Its interface index; 0 lets the kernel choose. The peer's index is only honoured when
    /// the first end's is given (a rule of the veth driver).
    pub index: u32,
    /// Its hardware address (6 bytes); empty lets the kernel choose a random one.
    pub mac: &'a [u8],
    /// Created administratively up.
    pub up: bool,
}

impl<'a> Batch<'a> {
    pub fn new() -> Batch<'a> {
        Batch::default()
    }

    /// How many requests the batch holds.
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    fn push(&mut self, msg: RouteNetlinkMessage, flags: u16, what: String) {
        let mut msg = NetlinkMessage::from(msg);
        msg.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        self.requests.push((msg, what));
    }

    /// Creates a veth pair: `end` in the socket's namespace, `peer` directly inside
    /// `peer_ns` (both given names, indices, addresses and states in the one request, so that
    /// no lookup is needed afterwards).
    pub fn add_veth(&mut self, end: VethEnd<'_>, peer: VethEnd<'_>, peer_ns: &'a NetNs) {
        fn message<T>(mut b: LinkMessageBuilder<T>, end: &VethEnd<'_>) -> LinkMessageBuilder<T> {
            b = b.name(end.name.to_string());
            if end.index != 0 {
                b = b.index(end.index);
            }
            if !end.mac.is_empty() {
                b = b.address(end.mac.to_vec());
            }
            if end.up { b.up() } else { b }
        }
        let peer_msg = message(LinkMessageBuilder::<LinkUnspec>::new(), &peer)
            .setns_by_fd(peer_ns.as_raw_fd())
            .build();
        let msg = message(
            LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth),
            &end,
        )
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
        .build();
        self.push(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            format!("creating veth {} (peer {})", end.name, peer.name),
        );
    }

    /// Sets interface `index` administratively up.
    pub fn set_up(&mut self, index: u32) {
        self.push(
            RouteNetlinkMessage::NewLink(LinkUnspec::new_with_index(index).up().build()),
            0,
            format!("setting link {index} up"),
        );
    }

    /// Makes interface `index` take no IPv6 address of its own (address generation mode
    /// `none`): no link-local address, hence no duplicate address detection, router
    /// solicitation or MLD report from it. Send it before the link comes up. This is what a
    /// `disable_ipv6` sysctl would give an IPv4-only link, in the same netlink batch: the
    /// sysctl's handler only try-locks rtnl and restarts the write while it is held, so with
    /// many namespaces built at once its writes spin (measured: a sixth of all CPU while
    /// starting 1,000 `local:netns` instances).
    pub fn no_ipv6_addresses(&mut self, index: u32) {
        let mut msg = LinkUnspec::new_with_index(index).build();
        msg.attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
            )]));
        self.push(
            RouteNetlinkMessage::NewLink(msg),
            0,
            format!("turning off IPv6 address generation on link {index}"),
        );
    }

    /// Adds `addr/prefix` to interface `index` (as [`Netlink::add_address`]).
    pub fn add_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) {
        let msg = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(addr, prefix)
            .build();
        self.push(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            format!("adding address {addr}/{prefix} to link {index}"),
        );
    }

    /// Adds a route (as [`Netlink::add_route`]).
    pub fn add_route(&mut self, dst: Ipv4Net, gateway: Option<Ipv4Addr>, oif: u32) {
        self.push(
            RouteNetlinkMessage::NewRoute(Netlink::route_message(dst, gateway, oif)),
            NLM_F_CREATE | NLM_F_EXCL,
            describe_route("adding", dst, gateway, oif),
        );
    }

    /// Adds or replaces a permanent neighbour entry (as [`Netlink::add_neighbour`], whose
    /// documentation says why).
    pub fn add_neighbour(&mut self, index: u32, addr: Ipv4Addr, mac: &[u8]) {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.kind = RouteType::Unspec;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                addr,
            )));
        if !mac.is_empty() {
            msg.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        }
        self.push(
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
            format!("adding neighbour {addr} on link {index}"),
        );
    }
}

/// Index of interface `name` in the calling thread's namespace (`if_nametoindex`), for code
/// running inside it (e.g. in [`NetNs::new_with`]); `NotFound` if there is none.
pub fn link_index_here(name: &str) -> io::Result<u32> {
    nix::net::if_::if_nametoindex(name).map_err(|e| {
        let e = io::Error::from(e);
        let kind = if e.raw_os_error() == Some(libc::ENODEV) {
            io::ErrorKind::NotFound
        } else {
            e.kind()
        };
        with_context_kind(kind, e, format!("looking up interface {name}"))
    })
}
