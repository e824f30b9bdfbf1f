//! Measures how long it takes to build the `local:netns` topology for many instances:
//! for each instance a fresh network namespace with a TUN device (`tun0`) and a veth
//! (`ctl0`) into one shared control namespace, addresses set and links up. Netlink
//! requests are issued concurrently (`CONCURRENCY` instances in flight, all sharing the
//! control namespace's netlink handle). Then everything is dropped and the time until the
//! kernel has removed every veth from the control namespace is measured too.
//!
//! Run as root: `cargo run --release -p tg-sys --example netns-scale -- [N] [CONCURRENCY]`
//! (defaults 1000 and 16). Everything lives in namespaces created here and held only by
//! fds, so nothing is left behind even if the run is interrupted.

use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use tg_sys::{NetNs, Netlink, Tun};

/// What keeps one instance's topology alive.
struct Instance {
    ns: NetNs,
    _tun: Tun,
}

/// Instance `i` owns 10.128.0.0/14 block `i` of size 4: .1 on the control side, .2 on
/// its `ctl0`. Its TUN gets 16.(i/256).(i%256).1/8-style data addresses (private to its
/// namespace, so they may overlap across instances without harm).
fn control_pair(i: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 0)) + 4 * i;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

async fn setup(i: u32, control: &NetNs, ctl: &Netlink) -> io::Result<Instance> {
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
        nl.add_address(tun_index, Ipv4Addr::new(16, (i / 256) as u8, (i % 256) as u8, 1), 8)
            .await?;
        nl.set_up(tun_index).await
    };
    futures::try_join!(control_side, instance_side)?;
    let _ = control;
    Ok(Instance { ns, _tun: tun })
}

/// Sends one datagram from the control namespace to instance `i` over its veth.
fn check_reachable(control: &NetNs, instances: &[Instance], i: u32) -> io::Result<()> {
    let (_, inst_addr) = control_pair(i);
    let rx = instances[i as usize]
        .ns
        .run(|| UdpSocket::bind((inst_addr, 5000)))??;
    rx.set_read_timeout(Some(Duration::from_secs(5)))?;
    let tx = control.run(|| UdpSocket::bind("0.0.0.0:0"))??;
    tx.send_to(b"ping", (inst_addr, 5000))?;
    let mut buf = [0u8; 8];
    let n = rx.recv(&mut buf)?;
    assert_eq!(&buf[..n], b"ping");
    Ok(())
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
            let (control, ctl) = (&control, &ctl);
            async move { setup(i, control, ctl).await }
        })
        .buffered(concurrency)
        .try_collect()
        .await?;
    let setup_time = start.elapsed();

    let links = ctl.links().await?.len();
    for i in [0, n / 2, n - 1] {
        check_reachable(&control, &instances, i)?;
    }

    let start = Instant::now();
    let order = std::env::var("DROP_ORDER").unwrap_or_default();
    if order == "ns-wait" {
        let tuns: Vec<Tun> = instances.into_iter().map(|i| i._tun).collect();
        while ctl.links().await?.len() > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!("ns gone after {:.2?}", start.elapsed());
        drop(tuns);
    } else if order == "par" {
        let mut chunks: Vec<Vec<Instance>> = (0..16).map(|_| Vec::new()).collect();
        for (k, inst) in instances.into_iter().enumerate() {
            chunks[k % 16].push(inst);
        }
        std::thread::scope(|s| {
            for c in chunks {
                s.spawn(move || drop(c));
            }
        });
    } else if order == "tun-first" {
        let nss: Vec<NetNs> = instances.into_iter().map(|i| i.ns).collect();
        eprintln!("tuns dropped after {:.2?}", start.elapsed());
        drop(nss);
    } else if order == "ns-first" {
        let tuns: Vec<Tun> = instances.into_iter().map(|i| i._tun).collect();
        tokio::time::sleep(Duration::from_millis(0)).await;
        eprintln!("ns dropped after {:.2?}", start.elapsed());
        drop(tuns);
    } else {
        drop(instances);
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
         {links} links in control ns, 3 spot checks ok; drop {dropped:.2?}, \
         kernel teardown complete after {teardown_time:.2?}",
        setup_time,
        setup_time / n
    );
    Ok(())
}
