//! The address plan (DESIGN.md §5): one data /16 per run carved from `100.64.0.0/10`, instances
//! from `.0.2` (`.0.1` is the nominal gateway, as in the original); control addresses from
//! `192.18.0.0/16` (the original's control subnet, which plans such as `verify` recognise as
//! control) inside the run's own control namespace, where the sync service answers on
//! `192.18.0.1`; one `/30` in `198.19.0.0/16` per run joins the control namespace to the host
//! for `allow_all`.
//!
//! The host link stays in `198.19.0.0/16` (RFC 2544 benchmarking space): it is the only range
//! configured in the host's own namespace, so it must not be a public range, and it is disjoint
//! from both the control subnet and the data networks (`100.64.0.0/10`), so no route of an
//! instance or of the control namespace can be confused by it.

use std::net::Ipv4Addr;
use std::sync::Mutex;

use ipnet::Ipv4Net;

/// Where the sync service answers inside every run's control network (`.0.1` of the control
/// subnet, the original's control gateway).
pub const SYNC_ADDR: Ipv4Addr = Ipv4Addr::new(192, 18, 0, 1);

/// The control subnet every instance's `eth0` sits in.
pub const CONTROL_SUBNET: &str = "192.18.0.0/16";
/// Where every run's host link takes its /30 (see [`HostLink`]).
pub const HOST_LINKS: &str = "198.19.0.0/16";
/// The name instances resolve to [`SYNC_ADDR`] (sdk-rust hard-codes it).
pub const SYNC_NAME: &str = "testground-sync-service";
/// The name instances resolve to the host's end of the run's host link (`allow_all` only).
pub const HOST_NAME: &str = "testground-host";

/// Instances a data /16 can hold: `.0.2` up to `.255.254`.
pub const MAX_INSTANCES: u32 = 65_533;

/// The `ordinal`-th address after `.0.1` of a /16 whose first two octets are `base`'s.
fn nth(base: Ipv4Addr, ordinal: u32) -> Ipv4Addr {
    let n = ordinal + 2;
    let o = base.octets();
    Ipv4Addr::new(o[0], o[1], (n >> 8) as u8, (n & 0xff) as u8)
}

/// The data address instance `ordinal` starts with.
pub fn data_addr(subnet: Ipv4Net, ordinal: u32) -> Ipv4Addr {
    nth(subnet.network(), ordinal)
}

/// The control (`eth0`) address of instance `ordinal`.
pub fn control_addr(ordinal: u32) -> Ipv4Addr {
    nth(SYNC_ADDR, ordinal)
}

/// The interface index of instance `ordinal`'s end of its control link (`c<ordinal>`) in the
/// run's control namespace. Fixed rather than chosen by the kernel, so that the route and the
/// neighbour entry on it go in the same netlink batch as its creation, without a lookup. The
/// control namespace is the run's own and holds only `lo` (1) and `host0` (the kernel's next,
/// 2): indices from 16 on are free.
pub fn control_ifindex(ordinal: u32) -> u32 {
    16 + ordinal
}

/// The hardware addresses of instance `ordinal`'s control link: (its `eth0`, the control
/// namespace's `c<ordinal>`). Fixed rather than random, so that each side's permanent
/// neighbour entry for the other can be written without reading the address back. Locally
/// administered unicast (`02:`), `74:67` ("tg"), the side, then the ordinal (below 2^16).
pub fn control_macs(ordinal: u32) -> ([u8; 6], [u8; 6]) {
    let [_, _, hi, lo] = ordinal.to_be_bytes();
    (
        [0x02, 0x74, 0x67, 0x00, hi, lo],
        [0x02, 0x74, 0x67, 0x01, hi, lo],
    )
}

/// Why an instance may not take an address in the data network.
pub fn check_data_addr(subnet: Ipv4Net, addr: Ipv4Addr) -> Result<(), String> {
    if !subnet.contains(&addr) {
        return Err(format!("{addr} is outside the run's data network {subnet}"));
    }
    if addr == subnet.network() || addr == subnet.broadcast() {
        return Err(format!(
            "{addr} is the network or broadcast address of {subnet}"
        ));
    }
    if addr == gateway(subnet) {
        return Err(format!("{addr} is the data network's gateway"));
    }
    Ok(())
}

/// `.0.1` of the data network: reserved, as in the original.
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    let o = subnet.network().octets();
    Ipv4Addr::new(o[0], o[1], 0, 1)
}

/// The data /16s this process hands out, one per concurrent run. Runs of other processes may
/// use the same subnet without harm: a data network exists only inside its run's namespaces and
/// its own emulator, so two runs can never exchange a packet.
static SUBNETS: Mutex<u64> = Mutex::new(0);

/// A data subnet reserved for one run; released on drop.
#[derive(Debug)]
pub struct SubnetLease {
    slot: u32,
    subnet: Ipv4Net,
}

impl SubnetLease {
    /// The lowest free /16 of `100.64.0.0/10`, or `None` when 64 runs are already going.
    pub fn take() -> Option<SubnetLease> {
        let mut used = SUBNETS.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (0..64).find(|s| *used & (1 << s) == 0)?;
        *used |= 1 << slot;
        let subnet = Ipv4Net::new(Ipv4Addr::new(100, 64 + slot as u8, 0, 0), 16).ok()?;
        Some(SubnetLease { slot, subnet })
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }
}

impl Drop for SubnetLease {
    fn drop(&mut self) {
        let mut used = SUBNETS.lock().unwrap_or_else(|e| e.into_inner());
        *used &= !(1 << self.slot);
    }
}

/// The host link of a run: interface `tgh<slot>` on the host with `.1` of the slot's /30,
/// `host0` in the control namespace with `.2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLink {
    pub slot: u32,
}

impl HostLink {
    /// How many /30s fit in `198.19.0.0/16`.
    pub const SLOTS: u32 = 16_384;

    pub fn host_if(&self) -> String {
        format!("tgh{}", self.slot)
    }

    fn base(&self) -> u32 {
        u32::from(Ipv4Addr::new(198, 19, 0, 0)) + self.slot * 4
    }

    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 1)
    }

    pub fn ctl_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_links_have_distinct_fixed_indices_and_addresses() {
        let mut seen = std::collections::BTreeSet::new();
        for o in [0, 1, 255, 256, MAX_INSTANCES - 1] {
            let (eth0, ctl) = control_macs(o);
            assert_ne!(eth0, ctl);
            // Locally administered unicast.
            assert_eq!(eth0[0] & 0x03, 0x02);
            assert_eq!(ctl[0] & 0x03, 0x02);
            assert!(seen.insert(eth0) && seen.insert(ctl), "ordinal {o}");
            // Clear of lo (1) and host0 (2).
            assert!(control_ifindex(o) >= 16);
        }
        assert!(control_ifindex(MAX_INSTANCES - 1) < i32::MAX as u32);
    }

    #[test]
    fn instance_addresses_start_at_dot_two() {
        let s: Ipv4Net = "100.65.0.0/16".parse().unwrap();
        assert_eq!(data_addr(s, 0), Ipv4Addr::new(100, 65, 0, 2));
        assert_eq!(data_addr(s, 253), Ipv4Addr::new(100, 65, 0, 255));
        assert_eq!(data_addr(s, 254), Ipv4Addr::new(100, 65, 1, 0));
        assert_eq!(control_addr(0), Ipv4Addr::new(192, 18, 0, 2));
        let control: Ipv4Net = CONTROL_SUBNET.parse().unwrap();
        assert!(control.contains(&SYNC_ADDR));
        assert!(control.contains(&control_addr(MAX_INSTANCES - 1)));
        assert!(!control.contains(&HostLink { slot: 0 }.host_addr()));
        assert_eq!(
            data_addr(s, MAX_INSTANCES - 1),
            Ipv4Addr::new(100, 65, 255, 254)
        );
    }

    #[test]
    fn data_addresses_are_checked() {
        let s: Ipv4Net = "100.64.0.0/16".parse().unwrap();
        assert!(check_data_addr(s, Ipv4Addr::new(100, 64, 1, 1)).is_ok());
        assert!(check_data_addr(s, Ipv4Addr::new(100, 64, 0, 1)).is_err());
        assert!(check_data_addr(s, Ipv4Addr::new(100, 64, 255, 255)).is_err());
        assert!(check_data_addr(s, Ipv4Addr::new(100, 64, 0, 0)).is_err());
        let e = check_data_addr(s, Ipv4Addr::new(10, 0, 0, 1)).unwrap_err();
        assert!(e.contains("outside"), "{e}");
    }

    #[test]
    fn subnet_leases_are_distinct_and_released() {
        let a = SubnetLease::take().unwrap();
        let b = SubnetLease::take().unwrap();
        assert_ne!(a.subnet(), b.subnet());
        let sa = a.subnet();
        assert!(sa.addr().octets()[0] == 100 && (64..128).contains(&sa.addr().octets()[1]));
        let slot = a.slot;
        drop(a);
        let used = *SUBNETS.lock().unwrap();
        assert_eq!(used & (1 << slot), 0, "the slot is free again");
    }

    #[test]
    fn host_links_do_not_overlap() {
        let a = HostLink { slot: 0 };
        let b = HostLink { slot: 1 };
        assert_eq!(a.host_addr(), Ipv4Addr::new(198, 19, 0, 1));
        assert_eq!(a.ctl_addr(), Ipv4Addr::new(198, 19, 0, 2));
        assert_eq!(b.host_addr(), Ipv4Addr::new(198, 19, 0, 5));
        assert_eq!(
            HostLink { slot: 16_383 }.ctl_addr(),
            Ipv4Addr::new(198, 19, 255, 254)
        );
    }
}
