//! TUN devices: the data interface of a test instance.
//!
//! The device is created from a thread inside the target namespace so it is born there
//! (moving it afterwards would need a netlink round trip and would briefly expose it in
//! the runner's namespace). `IFF_NO_PI` means every read/write is exactly one raw IPv4
//! or IPv6 packet, which is what the sidecar's packet pipeline wants. A device created with
//! offloads ([`Tun::create_offloaded`]) prefixes each of them with a `virtio_net_hdr` and may
//! carry TCP super-packets; parsing that header is the caller's business (`tg_netem::offload`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;

use crate::error::nix_context;
use crate::netns::NetNs;

// TUNSETIFF reads an `ifreq` and writes the final name back into it, hence read-write.
nix::ioctl_readwrite_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);
// TUNSETPERSIST takes its flag as the ioctl argument itself, not through a pointer.
nix::ioctl_write_int_bad!(tun_set_persist, libc::TUNSETPERSIST);
// TUNSETOFFLOAD, like TUNSETPERSIST, takes its flags as the argument itself.
nix::ioctl_write_int_bad!(tun_set_offload, libc::TUNSETOFFLOAD);
// TUNSETVNETHDRSZ reads an int through a pointer.
nix::ioctl_write_ptr_bad!(tun_set_vnet_hdr_sz, libc::TUNSETVNETHDRSZ, libc::c_int);

/// The size of `struct virtio_net_hdr`, what every read and write carries in front of the packet on a
/// device created with [`Tun::create_offloaded`].
pub const VNET_HDR_LEN: usize = 10;

/// Which offloads [`Tun::create_offloaded`] asks for: checksum offload and TCP/IPv4 segmentation.
/// IPv6 is off on the data interface, and UDP segmentation (USO) is not needed: UDP sockets do not
/// produce super-packets unless they ask for `UDP_SEGMENT`, which then falls back to software.
const OFFLOADS: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4;

/// A TUN device (IFF_TUN | IFF_NO_PI: raw IPv4/IPv6 packets) in some namespace,
/// non-blocking. The device exists as long as this fd.
///
/// The fd also keeps its namespace alive. Dropping it unregisters the device
/// synchronously, which waits for RCU grace periods (~20-30 ms on the machines we
/// measured); to tear down many instances, drop their `Tun`s from several threads at
/// once so those waits overlap (1000 devices: ~32 s one by one, ~2.5 s from 16 threads).
///
/// For async use, wrap it in `tokio::io::unix::AsyncFd` (it implements `AsRawFd`).
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
    vnet_hdr: bool,
}

impl Tun {
    /// Creates TUN device `name` inside `ns` (open /dev/net/tun + TUNSETIFF from a thread
    /// in `ns`), in non-blocking mode. The device is down and has no address; configure
    /// it with [`crate::Netlink`]. Fails with EBUSY if another fd already holds a TUN
    /// device of that name, EINVAL if a non-TUN interface has that name.
    pub fn create(ns: &NetNs, name: &str) -> io::Result<Tun> {
        check_name(name)?;
        ns.run(|| Self::create_here(name))?
    }

    /// Like [`create`](Self::create), with offloads: the device is created with `IFF_VNET_HDR`, so
    /// that every packet read or written is preceded by a `virtio_net_hdr` of [`VNET_HDR_LEN`] bytes,
    /// and with checksum offload and TCP/IPv4 segmentation enabled (`TUNSETOFFLOAD`), so that the
    /// kernel hands out TCP super-packets of up to 64 KiB with partial checksums and accepts them too.
    ///
    /// Returns the device and, separately, the error of enabling the offloads: the device then
    /// still has its headers (always all zero on reads: one complete packet each), so callers keep
    /// working and may report the reason.
    pub fn create_offloaded(ns: &NetNs, name: &str) -> io::Result<(Tun, io::Result<()>)> {
        ns.run(|| Self::create_offloaded_here(name))?
    }

    /// [`Tun::create`] in the calling thread's own namespace, for code already running inside
    /// it (e.g. in [`NetNs::new_with`]), without another helper thread.
    pub fn create_here(name: &str) -> io::Result<Tun> {
        Self::open_here(name, false)
    }

    /// [`Tun::create_offloaded`] in the calling thread's own namespace.
    pub fn create_offloaded_here(name: &str) -> io::Result<(Tun, io::Result<()>)> {
        let tun = Self::open_here(name, true)?;
        let offloads = tun.enable_offloads();
        Ok((tun, offloads))
    }

    fn open_here(name: &str, vnet_hdr: bool) -> io::Result<Tun> {
        check_name(name)?;
        let fd = open(
            "/dev/net/tun",
            OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| nix_context(e, "opening /dev/net/tun"))?;

        // SAFETY: `ifreq` is a plain C struct (arrays, integers, a raw pointer in a
        // union) for which all-zero bytes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // The last byte stays 0: `name` is shorter than IFNAMSIZ (checked above).
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        req.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: `fd` is an open /dev/net/tun descriptor and `req` is a valid, writable
        // ifreq that outlives the call, as TUNSETIFF requires.
        unsafe { tun_set_iff(fd.as_raw_fd(), &mut req) }
            .map_err(|e| nix_context(e, format!("TUNSETIFF {name}")))?;

        // The kernel writes back the name it used (relevant for patterns like "tun%d").
        let actual: Vec<u8> = req
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Ok(Tun {
            fd,
            name: String::from_utf8_lossy(&actual).into_owned(),
            vnet_hdr,
        })
    }

    /// Sets the header size to `virtio_net_hdr`'s (the kernel's default, set anyway so that the
    /// layout never depends on it) and enables [`OFFLOADS`].
    fn enable_offloads(&self) -> io::Result<()> {
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: `fd` is a TUN descriptor attached by TUNSETIFF; `size` is a valid int that
        // outlives the call.
        unsafe { tun_set_vnet_hdr_sz(self.fd.as_raw_fd(), &size) }
            .map_err(|e| nix_context(e, format!("TUNSETVNETHDRSZ {}", self.name)))?;
        // SAFETY: as above; the argument is a flag word.
        unsafe { tun_set_offload(self.fd.as_raw_fd(), OFFLOADS as libc::c_int) }
            .map_err(|e| nix_context(e, format!("TUNSETOFFLOAD {}", self.name)))?;
        Ok(())
    }

    /// Whether reads and writes carry a `virtio_net_hdr` ([`create_offloaded`](Self::create_offloaded)).
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Makes the device outlive this descriptor: it is then destroyed with its namespace.
    ///
    /// Why: closing the last descriptor of a non-persistent TUN unregisters the device on the
    /// spot, which costs an RCU grace period each (about 30 ms here), so closing 1,000 of them
    /// one by one takes 30 s. A persistent device is instead removed when its namespace dies,
    /// and the kernel tears dying namespaces down in batches with one grace period for all.
    pub fn set_persist(&self, persist: bool) -> io::Result<()> {
        // SAFETY: `fd` is a TUN descriptor attached by TUNSETIFF; the argument is an int flag.
        unsafe { tun_set_persist(self.fd.as_raw_fd(), libc::c_int::from(persist)) }
            .map_err(|e| nix_context(e, format!("TUNSETPERSIST {}", self.name)))?;
        Ok(())
    }

    /// The interface name, as the kernel has it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one packet into `buf`. `WouldBlock` when no packet is queued; a packet
    /// larger than `buf` is truncated, so size `buf` to the MTU.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(nix::unistd::read(&self.fd, buf)?)
    }

    /// Writes one packet (a complete IPv4 or IPv6 datagram) to the kernel.
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        Ok(nix::unistd::write(&self.fd, packet)?)
    }

    /// Writes one packet gathered from `parts` (e.g. a `virtio_net_hdr` and the packet) in one call,
    /// without copying them together first.
    pub fn send_parts(&self, parts: &[io::IoSlice<'_>]) -> io::Result<usize> {
        Ok(nix::sys::uio::writev(&self.fd, parts)?)
    }
}

/// TUNSETIFF takes a NUL-terminated name of fewer than `IFNAMSIZ` bytes.
fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['\0', '/']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "invalid interface name {name:?} (1 to {} bytes, no NUL or '/')",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    Ok(())
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
