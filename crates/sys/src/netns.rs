//! Network namespaces held by file descriptors.
//!
//! A namespace is pinned by an fd on `/proc/thread-self/ns/net` (and by any process
//! inside it), never by a bind mount under `/run/netns`: when the last handle and the
//! last process are gone the kernel frees the namespace and every interface in it, so a
//! crashed runner leaves no namespaces, veths or routes behind.
//!
//! Namespace membership is per *thread*. Rather than switching the caller's thread back
//! and forth (which leaks the namespace into unrelated work on that thread if anything
//! fails half-way, and is unsound on runtime worker threads), code that must run inside a
//! namespace runs on a short-lived helper thread that joins it and then exits.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::panic;
use std::thread;

use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::stat::fstat;

use crate::error::{nix_context, with_context};

/// Our own namespace as seen by the calling thread; `thread-self` rather than `self`
/// because `self` names the thread-group leader, whose namespace may differ.
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// A network namespace, kept alive by this handle (an fd on /proc/thread-self/ns/net)
/// and by any process inside it. Nothing is bind-mounted under /run/netns: when the
/// handle and the processes are gone the kernel frees the namespace and every interface
/// in it, so a crashed owner leaves nothing behind.
///
/// Sockets and [`crate::Tun`] fds created inside the namespace pin it as well (the kernel
/// holds a reference from each), so dropping the handle alone does not free a namespace
/// whose TUN device is still open. All of them are fds, so a crashed owner still leaves
/// nothing behind.
pub struct NetNs {
    fd: OwnedFd,
}

impl NetNs {
    /// A fresh namespace (only `lo`, down), created on a short-lived helper thread via
    /// unshare(CLONE_NEWNET).
    pub fn new() -> io::Result<NetNs> {
        // The helper thread moves into the new namespace and dies; only the fd it opened
        // keeps the namespace alive.
        let helper = thread::Builder::new()
            .name("tg-netns-new".into())
            .spawn(|| -> io::Result<NetNs> {
                unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(|e| nix_context(e, "unshare(CLONE_NEWNET)"))?;
                Self::current()
            })
            .map_err(|e| with_context(e, "spawning netns helper thread"))?;
        match helper.join() {
            Ok(result) => result,
            Err(payload) => panic::resume_unwind(payload),
        }
    }

    /// A fresh namespace, with `f` run inside it: on the helper thread that created it,
    /// before the thread exits. One thread for everything an instance's network needs from
    /// inside its namespace (devices, sysctls, sockets bound to it), instead of one thread
    /// per step: a thread spawn costs about as much as a netlink request. A panic in `f` is
    /// propagated to the caller; the namespace is freed if nothing else holds it.
    pub fn new_with<T: Send>(f: impl FnOnce(&NetNs) -> T + Send) -> io::Result<(NetNs, T)> {
        thread::scope(|scope| {
            let helper = thread::Builder::new()
                .name("tg-netns-new".into())
                .spawn_scoped(scope, move || -> io::Result<(NetNs, T)> {
                    unshare(CloneFlags::CLONE_NEWNET)
                        .map_err(|e| nix_context(e, "unshare(CLONE_NEWNET)"))?;
                    let ns = Self::current()?;
                    let out = f(&ns);
                    Ok((ns, out))
                })
                .map_err(|e| with_context(e, "spawning netns helper thread"))?;
            match helper.join() {
                Ok(result) => result,
                Err(payload) => panic::resume_unwind(payload),
            }
        })
    }

    /// The namespace of process `pid` (e.g. a container's init), held from now on by this
    /// handle. `start_time` (see [`crate::proc::start_time`]) guards against a reused pid: the
    /// handle is returned only if the process that had it still has it after the open.
    pub fn of_process(pid: i32, start_time: Option<u64>) -> io::Result<NetNs> {
        let path = format!("/proc/{pid}/ns/net");
        let file = File::open(&path).map_err(|e| with_context(e, &path))?;
        if let Some(t) = start_time
            && crate::proc::start_time(pid) != Some(t)
        {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {pid} ended while its namespace was being opened"),
            ));
        }
        Ok(NetNs { fd: file.into() })
    }

    /// The namespace of the calling thread.
    pub fn current() -> io::Result<NetNs> {
        let file = File::open(THREAD_NETNS).map_err(|e| with_context(e, THREAD_NETNS))?;
        Ok(NetNs { fd: file.into() })
    }

    /// Runs `f` on a helper thread that has joined this namespace (setns) and returns
    /// its result. Sockets, TUN devices and netlink sockets created inside `f` stay in
    /// this namespace. A panic in `f` is propagated to the caller.
    ///
    /// This blocks the calling thread for a thread spawn plus `f`; from async code keep
    /// `f` short (creating a socket or device), as [`crate::Netlink::open`] does.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let fd = self.fd.as_fd();
        thread::scope(|scope| {
            let helper = thread::Builder::new()
                .name("tg-netns-run".into())
                .spawn_scoped(scope, move || -> io::Result<T> {
                    setns(fd, CloneFlags::CLONE_NEWNET)
                        .map_err(|e| nix_context(e, "setns(CLONE_NEWNET)"))?;
                    Ok(f())
                })
                .map_err(|e| with_context(e, "spawning netns helper thread"))?;
            match helper.join() {
                Ok(result) => result,
                Err(payload) => panic::resume_unwind(payload),
            }
        })
    }

    /// The namespace's inode number (what `lsns` / `readlink /proc/PID/ns/net` show),
    /// to identify it.
    pub fn inode(&self) -> io::Result<u64> {
        let stat = fstat(&self.fd).map_err(|e| nix_context(e, "fstat on netns fd"))?;
        // `ino_t` is narrower than u64 on some 32-bit targets.
        #[allow(clippy::useless_conversion)]
        Ok(u64::from(stat.st_ino))
    }

    /// A second handle on the same namespace (a dup of the fd).
    pub fn try_clone(&self) -> io::Result<NetNs> {
        Ok(NetNs {
            fd: self
                .fd
                .try_clone()
                .map_err(|e| with_context(e, "dup of netns fd"))?,
        })
    }
}

impl std::fmt::Debug for NetNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("NetNs");
        d.field("fd", &self.fd.as_raw_fd());
        if let Ok(inode) = self.inode() {
            d.field("inode", &inode);
        }
        d.finish()
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for NetNs {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Writes a sysctl inside `ns`, e.g. key "net/ipv4/ip_forward" (path under /proc/sys).
/// /proc/sys/net reflects the netns of the opener, so it is opened from a thread in `ns`.
pub fn write_sysctl(ns: &NetNs, key: &str, value: &str) -> io::Result<()> {
    let path = sysctl_path(key)?;
    ns.run(|| fs::write(&path, value))?
        .map_err(|e| with_context(e, format!("writing {value:?} to {path}")))
}

/// [`write_sysctl`] in the calling thread's own namespace: for code already running inside
/// the namespace (e.g. in [`NetNs::new_with`] or [`NetNs::run`]), without another thread.
pub fn write_sysctl_here(key: &str, value: &str) -> io::Result<()> {
    let path = sysctl_path(key)?;
    fs::write(&path, value).map_err(|e| with_context(e, format!("writing {value:?} to {path}")))
}

/// `/proc/sys/<key>`, refusing keys that could escape /proc/sys (they may come from plan
/// configuration).
fn sysctl_path(key: &str) -> io::Result<String> {
    if key.is_empty() || key.starts_with('/') || key.split('/').any(|c| c == ".." || c == ".") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid sysctl key {key:?}"),
        ));
    }
    Ok(format!("/proc/sys/{key}"))
}
