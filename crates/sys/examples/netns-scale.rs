//! Measures how long it takes to build the `local:netns` topology for many instances:
//! for each instance a fresh network namespace with a TUN device (`tun0`) and a veth
//! (`ctl0`) into one shared control namespace, addresses set, neighbours pinned and links
//! up. Netlink requests are issued concurrently (`CONCURRENCY` instances in flight, all
//! sharing the control namespace's netlink handle). Then everything is dropped and the
//! time until the kernel has removed every veth from the control namespace is measured.
//!
//! Run as root: `cargo run --release -p tg-sys --example netns-scale -- [N] [CONCURRENCY]`
//! (defaults 1000 and 16; env `SEQUENTIAL_DROP=1` closes instances one by one).
//! Everything lives in namespaces created here and held only by fds, so nothing is left
//! behind even if the run is interrupted.

use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use tg_sys::{NetNs, Netlink, Tun};

/// Threads closing instances in parallel at the end.
const DROP_THREADS: usize = 16;

/// What keeps one instance's topology alive.
struct Instance {
    ns: NetNs,
    _tun: Tun,
}

/// Instance `i` owns 10.128.0.0/14 block `i` of size 4: .1 on the control side, .2 on
/// its `ctl0`. Its TUN gets 16.(i/256).(i%256).1/8 (private to its namespace).
fn control_pair(i: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 0)) + 4 * i;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

async fn setup(i: u32, ctl: &Netlink) -> io::Result<Instance> {
    // Namespace and TUN creation block on helper threads; keep them off the workers.
    let (ns, tun) = tokio::task::spawn_blocking(|| -> io::Result<(NetNs, Tun)> {
        let ns = NetNs::new()?;
        let tun = Tun::create(&ns, "tun0")?;
        Ok((ns, tun))
    })
    .await
    .map_err(io::Error::other)??;
    let nl = Netlink::open(&ns).await?;
    let (ctl_addr, inst_addr) = control_pair(i);

    let ctl_index = ctl.add_veth(&format!("veth{i}"), "ctl0", &ns).await?;
    let inst_index = nl.link_index("ctl0").await?;
    let tun_index = nl.link_index("tun0").await?;
    // The control side and the instance side are independent; overlap them.
    let control_side = async {
        ctl.add_address(ctl_index, ctl_addr, 30).await?;
        ctl.set_up(ctl_index).await
    };
    let instance_side = async {
        nl.add_address(inst_index, inst_addr, 30).await?;
        nl.set_up(inst_index).await?;
        nl.add_address(
            tun_index,
            Ipv4Addr::new(16, (i / 256) as u8, (i % 256) as u8, 1),
            8,
        )
        .await?;
        nl.set_up(tun_index).await
    };
    futures::try_join!(control_side, instance_side)?;
    // Pin both neighbours: dynamic ARP entries of all namespaces share one host-wide
    // limit (gc_thresh3, 1024) that 1000 instances would overflow.
    let (ctl_mac, inst_mac) = futures::try_join!(ctl.link_mac(ctl_index), nl.link_mac(inst_index))?;
    futures::try_join!(
        ctl.add_neighbour(ctl_index, inst_addr, &inst_mac),
        nl.add_neighbour(inst_index, ctl_addr, &ctl_mac)
    )?;
    Ok(Instance { ns, _tun: tun })
}

/// Sends datagrams from the control namespace to instance `i` over its veth until one
/// arrives; returns how many were sent. Right after links come up the kernel may still
/// drop a first packet (the qdisc is activated asynchronously by linkwatch), so one loss
/// is tolerated and reported rather than fatal.
fn check_reachable(control: &NetNs, instances: &[Instance], i: u32) -> io::Result<u32> {
    let (_, inst_addr) = control_pair(i);
    let rx = instances[i as usize]
        .ns
        .run(|| UdpSocket::bind((inst_addr, 5000)))??;
    rx.set_read_timeout(Some(Duration::from_millis(500)))?;
    let tx = control.run(|| UdpSocket::bind("0.0.0.0:0"))??;
    let mut buf = [0u8; 8];
    for attempt in 1..=10 {
        tx.send_to(b"ping", (inst_addr, 5000))?;
        match rx.recv(&mut buf) {
            Ok(n) if &buf[..n] == b"ping" => return Ok(attempt),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("instance {i} ({inst_addr}) unreachable from the control namespace"),
    ))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().map_or(1000, |a| a.parse().expect("N"));
    let concurrency: usize = args.next().map_or(16, |a| a.parse().expect("CONCURRENCY"));

    let control = NetNs::new()?;
    let ctl = Netlink::open(&control).await?;

    let start = Instant::now();
    let instances: Vec<Instance> = futures::stream::iter(0..n)
        .map(|i| {
            let ctl = &ctl;
            async move { setup(i, ctl).await }
        })
        .buffered(concurrency)
        .try_collect()
        .await?;
    let setup_time = start.elapsed();

    // Administratively up is not yet able to carry traffic (see `Netlink::is_oper_up`):
    // wait until every control-side veth is oper-up.
    let all_links = ctl.links().await?;
    let veths = all_links.iter().filter(|(_, name)| name != "lo");
    futures::stream::iter(veths.map(|&(index, _)| index))
        .map(|index| ctl.wait_oper_up(index, Duration::from_secs(120)))
        .buffer_unordered(concurrency)
        .try_collect::<()>()
        .await?;
    let ready_time = start.elapsed();

    let links = all_links.len();
    let mut sent = Vec::new();
    for i in [0, n / 2, n - 1] {
        sent.push(check_reachable(&control, &instances, i)?);
    }

    // Closing a TUN fd unregisters its device synchronously, waiting for RCU grace
    // periods (~20-30 ms each); the namespace cannot go before (the fd pins it). Closing
    // from many threads at once overlaps those waits.
    let start = Instant::now();
    let sequential = std::env::var_os("SEQUENTIAL_DROP").is_some();
    if sequential {
        drop(instances);
    } else {
        let mut chunks: Vec<Vec<Instance>> = (0..DROP_THREADS).map(|_| Vec::new()).collect();
        for (k, instance) in instances.into_iter().enumerate() {
            chunks[k % DROP_THREADS].push(instance);
        }
        std::thread::scope(|scope| {
            for chunk in chunks {
                scope.spawn(move || drop(chunk));
            }
        });
    }
    let dropped = start.elapsed();
    // Namespaces are destroyed asynchronously by the kernel; the control-side veth ends
    // disappear with them.
    while ctl.links().await?.len() > 1 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let teardown_time = start.elapsed();

    println!(
        "{n} instances, {concurrency} in flight: setup {:.2?} ({:.2?}/instance), \
         all control veths oper-up after {ready_time:.2?}, \
         {links} links in control ns, 3 spot checks ok (datagrams sent: {sent:?}); {} drop {dropped:.2?}, \
         kernel teardown complete after {teardown_time:.2?}",
        setup_time,
        setup_time / n,
        if sequential { "sequential" } else { "parallel" },
    );
    Ok(())
}
