//! Privileged integration tests: they create namespaces, veths and TUN devices, and only
//! send traffic inside namespaces they created. Without root they skip with a reason,
//! unless `TG_REQUIRE_PRIVILEGED=1`, in which case they fail.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command as StdCommand;
use std::time::{Duration, Instant};

use tg_sys::{Jail, NetNs, Netlink, Tun, errno, pids_in_netns, write_sysctl};

/// Whether privileged tests can run here. Prints why not, or panics if they must run.
fn privileged() -> bool {
    let required = std::env::var("TG_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1");
    let reason = match NetNs::new() {
        Err(e) => Some(format!("cannot create a network namespace ({e})")),
        Ok(_) if !std::path::Path::new("/dev/net/tun").exists() => {
            Some("/dev/net/tun is missing".to_string())
        }
        Ok(_) => None,
    };
    match reason {
        None => true,
        Some(reason) if required => panic!("TG_REQUIRE_PRIVILEGED=1 but {reason}"),
        Some(reason) => {
            eprintln!("skipping privileged test: {reason}");
            false
        }
    }
}

/// Runs `ip args..` inside `ns` for inspection and returns its stdout.
fn ip_in(ns: &NetNs, args: &[&str]) -> String {
    let out = ns
        .run(|| StdCommand::new("ip").args(args).output())
        .unwrap()
        .expect("running ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Two namespaces joined by a veth `va` (in a) / `vb` (in b): (a, b, netlink of a,
/// netlink of b), addresses 10.200.0.1/24 (a) and 10.200.0.2/24 (b), both up.
async fn veth_pair() -> (NetNs, NetNs, Netlink, Netlink) {
    let a = NetNs::new().unwrap();
    let b = NetNs::new().unwrap();
    let nl_a = Netlink::open(&a).await.unwrap();
    let nl_b = Netlink::open(&b).await.unwrap();
    let ia = nl_a.add_veth("va", "vb", &b).await.unwrap();
    let ib = nl_b.link_index("vb").await.unwrap();
    assert!(
        nl_a.link_index("vb").await.is_err(),
        "peer must not be in a"
    );
    nl_a.add_address(ia, Ipv4Addr::new(10, 200, 0, 1), 24)
        .await
        .unwrap();
    nl_b.add_address(ib, Ipv4Addr::new(10, 200, 0, 2), 24)
        .await
        .unwrap();
    assert!(
        !nl_a.is_oper_up(ia).await.unwrap(),
        "veth must be created down"
    );
    nl_a.set_up(ia).await.unwrap();
    nl_b.set_up(ib).await.unwrap();
    // Traffic sent before the kernel has processed the carrier change would be dropped.
    nl_a.wait_oper_up(ia, Duration::from_secs(10))
        .await
        .unwrap();
    nl_b.wait_oper_up(ib, Duration::from_secs(10))
        .await
        .unwrap();
    // Pinned neighbours: no ARP, and immune to the host-wide neighbour table filling up
    // when other tests on this machine run many namespaces.
    let mac_a = nl_a.link_mac(ia).await.unwrap();
    let mac_b = nl_b.link_mac(ib).await.unwrap();
    assert_eq!((mac_a.len(), mac_b.len()), (6, 6));
    nl_a.add_neighbour(ia, Ipv4Addr::new(10, 200, 0, 2), &mac_b)
        .await
        .unwrap();
    nl_b.add_neighbour(ib, Ipv4Addr::new(10, 200, 0, 1), &mac_a)
        .await
        .unwrap();
    assert!(ip_in(&a, &["-4", "neigh", "show", "dev", "va"]).contains("PERMANENT"));
    (a, b, nl_a, nl_b)
}

#[tokio::test]
async fn veth_between_namespaces_carries_udp_and_tcp() {
    if !privileged() {
        return;
    }
    let (a, b, _nl_a, _nl_b) = veth_pair().await;

    let rx = b
        .run(|| UdpSocket::bind("10.200.0.2:4000"))
        .unwrap()
        .unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let tx = a.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    tx.send_to(b"hello over veth", "10.200.0.2:4000").unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = rx.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello over veth");
    assert_eq!(from.ip(), Ipv4Addr::new(10, 200, 0, 1));

    let listener = b
        .run(|| TcpListener::bind("10.200.0.2:4001"))
        .unwrap()
        .unwrap();
    let addr: SocketAddr = "10.200.0.2:4001".parse().unwrap();
    let mut client = a
        .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    client.write_all(b"tcp ok").unwrap();
    let (mut server, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), Ipv4Addr::new(10, 200, 0, 1));
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = [0u8; 6];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"tcp ok");
}

/// Internet checksum (RFC 1071) over `chunks` concatenated.
fn checksum(chunks: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = chunks.concat();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A complete IPv4/UDP packet with correct header and UDP checksums.
fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = (8 + payload.len()) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    let sum = match checksum(&[&pseudo, &udp]) {
        0 => 0xffff,
        s => s,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());

    let total = 20 + udp.len() as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&udp);
    ip
}

/// Gives `tun0` in `ns` the address `local/24`, brings it up and waits until it is, with a
/// permanent neighbour entry for `.2` of that subnet (a TUN has no hardware address), so that
/// datagrams to `.2` go out through it.
async fn tun_up(ns: &NetNs, local: Ipv4Addr) -> (Netlink, u32) {
    let nl = Netlink::open(ns).await.unwrap();
    let index = nl.link_index("tun0").await.unwrap();
    nl.add_address(index, local, 24).await.unwrap();
    nl.set_up(index).await.unwrap();
    nl.wait_oper_up(index, Duration::from_secs(10))
        .await
        .unwrap();
    let [a, b, c, _] = local.octets();
    nl.add_neighbour(index, Ipv4Addr::new(a, b, c, 2), &[])
        .await
        .unwrap();
    (nl, index)
}

/// The first IPv4/UDP packet read from `tun` (after `skip` bytes of header per read), skipping
/// anything else the kernel sends on a new link (e.g. IPv6 solicitations); the whole read.
fn recv_udp(tun: &Tun, buf: &mut [u8], skip: usize) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tun.recv(buf) {
            Ok(n) if n > skip && buf[skip] >> 4 == 4 && buf[skip + 9] == 17 => {
                return buf[..n].to_vec();
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no IPv4/UDP packet from the tun");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("tun recv: {e}"),
        }
    }
}

#[tokio::test]
async fn tun_reads_and_writes_ip_packets() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new().unwrap();
    let tun = Tun::create(&ns, "tun0").unwrap();
    assert_eq!(tun.name(), "tun0");
    // Checked while down: once up, the kernel may queue IPv6 chatter at any moment.
    let mut buf = [0u8; 2048];
    assert_eq!(
        tun.recv(&mut buf).map_err(|e| e.kind()).err(),
        Some(io::ErrorKind::WouldBlock),
        "fresh tun must be non-blocking and empty"
    );
    let (nl, index) = tun_up(&ns, Ipv4Addr::new(10, 201, 0, 1)).await;
    assert!(nl.link_mac(index).await.unwrap().is_empty());

    // Outbound: the kernel routes a datagram for 10.201.0.2 into the TUN.
    let sock = ns
        .run(|| UdpSocket::bind("10.201.0.1:7777"))
        .unwrap()
        .unwrap();
    sock.send_to(b"to the tun", "10.201.0.2:9999").unwrap();
    let packet = recv_udp(&tun, &mut buf, 0);
    assert_eq!(&packet[12..16], &[10, 201, 0, 1], "source");
    assert_eq!(&packet[16..20], &[10, 201, 0, 2], "destination");
    assert_eq!(&packet[22..24], &9999u16.to_be_bytes(), "destination port");
    assert_eq!(&packet[28..], b"to the tun");

    // Inbound: a packet written to the TUN is delivered to the local socket.
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let packet = udp_packet(
        Ipv4Addr::new(10, 201, 0, 2),
        Ipv4Addr::new(10, 201, 0, 1),
        9999,
        7777,
        b"from the tun",
    );
    assert_eq!(tun.send(&packet).unwrap(), packet.len());
    let (n, from) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"from the tun");
    assert_eq!(from, "10.201.0.2:9999".parse::<SocketAddr>().unwrap());
}

/// With offloads, every read and write carries a 10-byte `virtio_net_hdr` before the packet.
#[tokio::test]
async fn tun_with_offloads_frames_packets_with_a_vnet_header() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new().unwrap();
    let (tun, offloads) = Tun::create_offloaded(&ns, "tun0").unwrap();
    offloads.expect("this kernel takes TUNSETOFFLOAD with TSO4 and checksum offload");
    assert!(tun.vnet_hdr());
    tun_up(&ns, Ipv4Addr::new(10, 202, 0, 1)).await;
    let sock = ns
        .run(|| UdpSocket::bind("10.202.0.1:7777"))
        .unwrap()
        .unwrap();
    sock.send_to(b"to the tun", "10.202.0.2:9999").unwrap();
    let hdr = tg_sys::tun::VNET_HDR_LEN;
    let mut buf = vec![0u8; hdr + 65_536];
    let read = recv_udp(&tun, &mut buf, hdr);
    // No segmentation for a datagram (gso_type 0); the packet follows the header.
    assert_eq!(read[1], 0, "gso_type");
    assert_eq!(&read[hdr + 16..hdr + 20], &[10, 202, 0, 2]);
    assert_eq!(&read[hdr + 28..], b"to the tun");

    // Inbound: an all-zero header (a complete packet) and the packet, in one write.
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let packet = udp_packet(
        Ipv4Addr::new(10, 202, 0, 2),
        Ipv4Addr::new(10, 202, 0, 1),
        9999,
        7777,
        b"from the tun",
    );
    let zero = [0u8; 10];
    let parts = [io::IoSlice::new(&zero), io::IoSlice::new(&packet)];
    assert_eq!(tun.send_parts(&parts).unwrap(), hdr + packet.len());
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"from the tun");
}

#[tokio::test]
async fn routes_addresses_mtu_and_lookups() {
    if !privileged() {
        return;
    }
    let (a, _b, nl, _nl_b) = veth_pair().await;
    let va = nl.link_index("va").await.unwrap();

    let err = nl.link_index("nonexistent0").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");

    // A gateway outside any configured subnet only works with onlink.
    let dst = "10.210.0.0/16".parse().unwrap();
    let gw = Some(Ipv4Addr::new(10, 99, 0, 1));
    nl.add_route(dst, gw, va).await.unwrap();
    let routes = ip_in(&a, &["-4", "route", "show"]);
    assert!(
        routes.contains("10.210.0.0/16 via 10.99.0.1 dev va") && routes.contains("onlink"),
        "{routes}"
    );
    let err = nl.add_route(dst, gw, va).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
    assert_eq!(errno(&err), Some(libc_eexist()), "{err}");
    assert!(err.to_string().contains("10.210.0.0/16"), "{err}");
    nl.del_route(dst, gw, va).await.unwrap();
    assert!(!ip_in(&a, &["-4", "route", "show"]).contains("10.210.0.0/16"));

    // Scope-link route without gateway.
    let host = "10.211.0.7/32".parse().unwrap();
    nl.add_route(host, None, va).await.unwrap();
    let routes = ip_in(&a, &["-4", "route", "show"]);
    assert!(
        routes.contains("10.211.0.7 dev va") && routes.contains("scope link"),
        "{routes}"
    );
    nl.del_route(host, None, va).await.unwrap();
    assert!(nl.del_route(host, None, va).await.is_err());

    nl.del_address(va, Ipv4Addr::new(10, 200, 0, 1), 24)
        .await
        .unwrap();
    assert!(!ip_in(&a, &["-4", "addr", "show", "dev", "va"]).contains("10.200.0.1"));

    nl.set_mtu(va, 1400).await.unwrap();
    assert!(ip_in(&a, &["link", "show", "dev", "va"]).contains("mtu 1400"));

    let names: Vec<String> = nl.links().await.unwrap().into_iter().map(|l| l.1).collect();
    assert!(names.contains(&"lo".to_string()) && names.contains(&"va".to_string()));

    nl.set_down(va).await.unwrap();
    nl.del_link(va).await.unwrap();
    let err = nl.link_index("va").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
}

/// A namespace built from inside (`NetNs::new_with`) and configured by batches: a veth whose
/// ends get the names, indices, hardware addresses and states asked for, addresses, routes,
/// permanent neighbours, and sysctls written from inside. A failing request is named in the
/// error while the rest of its batch still applies.
#[test]
fn batches_configure_a_namespace_built_from_inside() {
    if !privileged() {
        return;
    }
    use tg_sys::{Batch, NetlinkSocket, VethEnd};
    let control = NetNs::new().unwrap();
    let mut ctl = NetlinkSocket::open(&control).unwrap();
    let (mac_c, mac_e) = ([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2]);
    let (inst, inode) = NetNs::new_with(|ns| {
        // Control side: the veth, up, with its route and neighbour, in one batch.
        let mut b = Batch::new();
        b.add_veth(
            VethEnd {
                name: "c7",
                index: 23,
                mac: &mac_c,
                up: true,
            },
            VethEnd {
                name: "eth0",
                index: 0,
                mac: &mac_e,
                up: false,
            },
            ns,
        );
        b.add_address(23, Ipv4Addr::new(10, 201, 0, 1), 32);
        b.add_route("10.201.0.2/32".parse().unwrap(), None, 23);
        b.add_neighbour(23, Ipv4Addr::new(10, 201, 0, 2), &mac_e);
        assert_eq!(b.len(), 4);
        ctl.apply(&b).unwrap();
        // Inside: sysctl and lookups on this thread, then one batch.
        tg_sys::write_sysctl_here("net/ipv6/conf/eth0/disable_ipv6", "1").unwrap();
        let eth0 = tg_sys::netlink::link_index_here("eth0").unwrap();
        assert_eq!(
            tg_sys::netlink::link_index_here("nope0")
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
        let mut b = Batch::new();
        b.set_up(1);
        b.add_address(eth0, Ipv4Addr::new(10, 201, 0, 2), 32);
        b.set_up(eth0);
        b.add_route("10.201.0.1/32".parse().unwrap(), None, eth0);
        b.add_neighbour(eth0, Ipv4Addr::new(10, 201, 0, 1), &mac_c);
        NetlinkSocket::open_here().unwrap().apply(&b).unwrap();
        NetNs::current().unwrap().inode().unwrap()
    })
    .unwrap();
    assert_eq!(inst.inode().unwrap(), inode);

    let c7 = ip_in(&control, &["-o", "link", "show", "dev", "c7"]);
    assert!(c7.starts_with("23: c7@"), "{c7}");
    assert!(
        c7.contains("02:00:00:00:00:01") && c7.contains(",UP"),
        "{c7}"
    );
    let routes = ip_in(&control, &["-4", "route"]);
    assert!(
        routes.contains("10.201.0.2 dev c7") && routes.contains("scope link"),
        "{routes}"
    );
    let neigh = ip_in(&control, &["-4", "neigh", "show", "dev", "c7"]);
    assert!(
        neigh.contains("10.201.0.2 lladdr 02:00:00:00:00:02 PERMANENT"),
        "{neigh}"
    );
    let eth0 = ip_in(&inst, &["-o", "addr", "show", "dev", "eth0"]);
    assert!(
        eth0.contains("inet 10.201.0.2/32") && !eth0.contains("inet6"),
        "{eth0}"
    );
    assert!(ip_in(&inst, &["-o", "link", "show", "dev", "lo"]).contains(",UP"));
    let neigh = ip_in(&inst, &["-4", "neigh", "show", "dev", "eth0"]);
    assert!(
        neigh.contains("10.201.0.1 lladdr 02:00:00:00:00:01 PERMANENT"),
        "{neigh}"
    );
    // The link works both ways (no ARP needed).
    let rx = control
        .run(|| UdpSocket::bind("0.0.0.0:4100"))
        .unwrap()
        .unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let tx = inst.run(|| UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    // The veth's carrier comes up asynchronously (linkwatch): retry until one arrives.
    let mut buf = [0u8; 16];
    let mut arrived = false;
    for _ in 0..50 {
        tx.send_to(b"batched", "10.201.0.1:4100").unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        if let Ok((n, from)) = rx.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"batched");
            assert_eq!(from.ip(), Ipv4Addr::new(10, 201, 0, 2));
            arrived = true;
            break;
        }
    }
    assert!(arrived, "no datagram over the batched veth");

    // A failing request (the address exists) is named; the next one still applies.
    let mut b = Batch::new();
    b.add_route(
        "10.202.0.0/16".parse().unwrap(),
        Some(Ipv4Addr::new(10, 201, 0, 2)),
        23,
    );
    b.add_route("10.201.0.2/32".parse().unwrap(), None, 23);
    b.add_route(
        "10.203.0.0/16".parse().unwrap(),
        Some(Ipv4Addr::new(10, 201, 0, 2)),
        23,
    );
    let err = ctl.apply(&b).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
    assert!(err.to_string().contains("10.201.0.2/32"), "{err}");
    let routes = ip_in(&control, &["-4", "route"]);
    assert!(
        routes.contains("10.202.0.0/16") && routes.contains("10.203.0.0/16"),
        "{routes}"
    );
    // The socket stays usable after a failed batch.
    let mut b = Batch::new();
    b.add_address(23, Ipv4Addr::new(10, 201, 0, 9), 32);
    ctl.apply(&b).unwrap();
    assert!(ip_in(&control, &["-4", "addr", "show", "dev", "c7"]).contains("10.201.0.9/32"));
    assert!(Batch::new().is_empty());
    ctl.apply(&Batch::new()).unwrap();
}

fn libc_eexist() -> i32 {
    // EEXIST is 17 on every Linux architecture.
    17
}

#[tokio::test]
async fn dropping_a_namespace_frees_its_interfaces() {
    if !privileged() {
        return;
    }
    let control = NetNs::new().unwrap();
    let nl = Netlink::open(&control).await.unwrap();
    let instance = NetNs::new().unwrap();
    nl.add_veth("ctl0", "eth0", &instance).await.unwrap();
    drop(instance);
    // The kernel tears namespaces down asynchronously; the veth end in `control` goes
    // with its peer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while nl.link_index("ctl0").await.is_ok() {
        assert!(Instant::now() < deadline, "veth survived its namespace");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn sysctl_is_per_namespace() {
    if !privileged() {
        return;
    }
    let key = "/proc/sys/net/ipv4/ip_forward";
    let host_before = std::fs::read_to_string(key).unwrap();
    let ns = NetNs::new().unwrap();
    for value in ["1", "0", "1"] {
        write_sysctl(&ns, "net/ipv4/ip_forward", value).unwrap();
        let inside = ns.run(|| std::fs::read_to_string(key)).unwrap().unwrap();
        assert_eq!(inside.trim(), value);
        assert_eq!(std::fs::read_to_string(key).unwrap(), host_before);
    }
    assert!(write_sysctl(&ns, "../kernel/hostname", "x").is_err());
}

#[test]
fn netns_identity() {
    if !privileged() {
        return;
    }
    let a = NetNs::new().unwrap();
    let b = NetNs::new().unwrap();
    let here = NetNs::current().unwrap();
    assert_ne!(a.inode().unwrap(), b.inode().unwrap());
    assert_ne!(a.inode().unwrap(), here.inode().unwrap());
    assert_eq!(a.try_clone().unwrap().inode().unwrap(), a.inode().unwrap());
    let inside = a
        .run(|| NetNs::current().unwrap().inode().unwrap())
        .unwrap();
    assert_eq!(inside, a.inode().unwrap());
    assert_eq!(
        tg_sys::netns_inode_of(std::process::id() as i32).unwrap(),
        here.inode().unwrap()
    );
    assert_eq!(
        tg_sys::netns_inode_of(i32::MAX).unwrap_err().kind(),
        io::ErrorKind::NotFound
    );
}

#[tokio::test]
async fn jail_sets_netns_hostname_and_hosts() {
    if !privileged() {
        return;
    }
    let host_hosts = std::fs::read_to_string("/etc/hosts").unwrap();
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let ns = NetNs::new().unwrap();
    let mut hosts = tempfile::NamedTempFile::new().unwrap();
    hosts
        .write_all(b"127.0.0.1 localhost\n10.0.0.5 instance-5\n")
        .unwrap();
    let jail = Jail::new(&ns, "instance-5", hosts.path()).unwrap();

    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.args([
        "-c",
        "hostname; cat /etc/hosts; readlink /proc/self/ns/net; \
         if echo x >> /etc/hosts 2>/dev/null; then echo WRITABLE; fi",
    ]);
    jail.apply(&mut cmd);
    drop(jail); // The command keeps what it needs.
    let out = cmd.output().await.unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let expected = format!(
        "instance-5\n127.0.0.1 localhost\n10.0.0.5 instance-5\nnet:[{}]\n",
        ns.inode().unwrap()
    );
    assert_eq!(stdout, expected);

    assert_eq!(std::fs::read_to_string("/etc/hosts").unwrap(), host_hosts);
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        host_name
    );
}

#[tokio::test]
async fn pids_in_netns_tracks_jailed_child() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new().unwrap();
    let inode = ns.inode().unwrap();
    let hosts = tempfile::NamedTempFile::new().unwrap();
    let jail = Jail::new(&ns, "sleeper", hosts.path()).unwrap();
    assert!(pids_in_netns(inode).unwrap().is_empty());

    let mut cmd = tokio::process::Command::new("/bin/sleep");
    cmd.arg("30");
    jail.apply(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let pid = child.id().unwrap() as i32;
    assert_eq!(pids_in_netns(inode).unwrap(), vec![pid]);

    child.kill().await.unwrap();
    assert!(pids_in_netns(inode).unwrap().is_empty());
    // Once freed, the inode number may be given to a namespace another program (Docker, another
    // test) creates: whoever lives in one with that number now must have started after ours
    // was dropped.
    let ticks = tg_sys::proc::clock_ticks_per_second() as f64;
    let dropped_at = (tg_sys::proc::uptime().unwrap() * ticks).floor() as u64;
    drop(ns);
    drop(jail);
    for pid in pids_in_netns(inode).unwrap() {
        let started = tg_sys::proc::start_time(pid);
        assert!(
            started.is_none_or(|t| t >= dropped_at),
            "pid {pid} (started {started:?}) lives in our dropped namespace"
        );
    }
}

#[tokio::test]
async fn jail_failure_fails_the_spawn() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "").unwrap();
    let jail = Jail::new(&ns, "x", &hosts).unwrap();
    // Binding a file over /etc/hosts fails if the source vanished: the spawn must fail
    // rather than run the child outside its jail.
    std::fs::remove_file(&hosts).unwrap();
    let mut cmd = tokio::process::Command::new("/bin/true");
    jail.apply(&mut cmd);
    let err = cmd.spawn().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
}

/// Root and a cgroup v2 hierarchy, or the reason why not (a failure under
/// `TG_REQUIRE_PRIVILEGED=1`).
fn cgroups() -> bool {
    let required = std::env::var("TG_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let reason = if !root {
        Some("cgroups need root".to_string())
    } else if tg_sys::cgroup::cgroup2_mount().is_none() {
        Some("cgroup v2 is not mounted".to_string())
    } else {
        None
    };
    match reason {
        None => true,
        Some(reason) if required => panic!("TG_REQUIRE_PRIVILEGED=1 but {reason}"),
        Some(reason) => {
            eprintln!("skipping privileged test: {reason}");
            false
        }
    }
}

/// Whether `pid` is gone or a zombie (it runs nothing any more).
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn cgroup_kill_reaches_setsid_and_double_forked_descendants_only() {
    if !cgroups() {
        return;
    }
    let name = format!("sys-test-{}", std::process::id());
    let cg = tg_sys::Cgroup::create(&name).unwrap();
    assert!(cg.is_empty());
    // The child starts a `setsid` grandchild, which double-forks a sleeper: none of them is
    // in the child's process group or session any more.
    let mut cmd = StdCommand::new("sh");
    cmd.args(["-c", "setsid sh -c '(sleep 600 &) ; sleep 600' & sleep 600"]);
    // Another pre_exec hook before and after: joining composes with them.
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setpgid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))?;
                Ok(())
            });
        }
    }
    cg.join_on_exec(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let mut outsider = StdCommand::new("sleep").arg("600").spawn().unwrap();
    wait_until("the tree has started", || cg.pids().unwrap().len() >= 5);
    let members = cg.pids().unwrap();
    assert!(members.contains(&(child.id() as i32)));
    assert!(!members.contains(&(outsider.id() as i32)));
    assert!(!cg.is_empty());

    cg.kill_all().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    wait_until("every member is dead", || members.iter().all(|&p| dead(p)));
    wait_until("the cgroup is empty", || cg.is_empty());
    assert!(outsider.try_wait().unwrap().is_none(), "the outsider lives");

    let path = cg.path().to_path_buf();
    let reopened = tg_sys::Cgroup::open(&path).unwrap();
    reopened.remove().unwrap();
    assert!(!path.exists());
    drop(cg);
    outsider.kill().unwrap();
    outsider.wait().unwrap();
}

#[test]
fn a_failed_join_fails_the_spawn() {
    if !cgroups() {
        return;
    }
    let name = format!("sys-test-gone-{}", std::process::id());
    let cg = tg_sys::Cgroup::create(&name).unwrap();
    let path = cg.path().to_path_buf();
    // Removed while its cgroup.procs is still open: joining it must fail, never run the
    // child outside.
    std::fs::remove_dir(&path).unwrap();
    let mut cmd = StdCommand::new("/bin/true");
    cg.join_on_exec(&mut cmd);
    assert!(cmd.spawn().is_err());
}
