//! `tg-sys` owns every direct contact between Testground's `local:netns` runner and the
//! Linux kernel: network namespaces (held by file descriptors, never bind-mounted, so a
//! crashed owner leaves nothing behind), TUN devices, rtnetlink configuration of links,
//! addresses and routes, the jail a test instance is put into between `fork` and `exec`,
//! per-run cgroups, and `/proc` scans used for cleanup and test assertions. It is the only crate
//! of the project allowed to use `unsafe`; everything it exports is a safe
//! `std::io::Result` API. It does not decide anything: address plans, traffic shaping
//! policy, packet forwarding and process supervision belong to the sidecar and runner.
//!
//! Modules:
//! - [`netns`]: [`NetNs`] handles, running code inside a namespace, sysctls.
//! - [`tun`]: [`Tun`] devices (raw IP packets, non-blocking).
//! - [`netlink`]: [`Netlink`], an async rtnetlink handle bound to one namespace, and
//!   [`NetlinkSocket`] / [`Batch`], many requests in one system call from a plain thread.
//! - [`jail`]: [`Jail`], what a child process is put into before `exec`.
//! - [`cgroup`]: [`Cgroup`], a cgroup v2 per run that its processes cannot leave.
//! - [`sched`]: real-time scheduling and timer slack of the calling thread (the packet pump).
//! - [`proc`]: what `/proc` says about processes (network namespace, start time, environment).
//! - [`error`]: errors that keep the errno while naming the failed operation.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod cgroup;
pub mod error;
pub mod jail;
pub mod lifetime;
pub mod netlink;
pub mod netns;
pub mod proc;
pub mod sched;
pub mod spawn;
pub mod tun;

pub use cgroup::Cgroup;
pub use error::{ContextError, errno};
pub use jail::Jail;
pub use netlink::{Batch, Netlink, NetlinkSocket, VethEnd};
pub use netns::{NetNs, write_sysctl, write_sysctl_here};
pub use proc::{netns_inode_of, pids_in_netns};
pub use tun::Tun;
