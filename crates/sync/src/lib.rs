//! The Testground sync service: states (counters) with barriers, and topics with full history,
//! spoken over websockets in the exact wire format of the original Go service, so that
//! unmodified sdk-go and sdk-rust test plans coordinate through it.
//!
//! This crate owns the sync semantics and the websocket server; the protocol client is the
//! `tg-sync-client` crate. It does not own the
//! wire types (they are in `tg_api::sync`), nor run lifecycles: the engine decides when a run
//! ends and calls [`SyncService::drop_run`].
//!
//! Modules:
//! - [`core`]: the pure, synchronous state machine (no I/O, no tokio); every semantic rule
//!   lives here.
//! - [`service`]: [`SyncService`], the core behind one lock, plus its in-process API
//!   (publish, signal, barrier, subscribe, run events, drop a run, stats).
//! - [`server`]: [`serve`], the websocket server (one task per connection, batched reads and
//!   writes; see DESIGN.md).
//! - [`limits`]: [`SyncLimits`], what one run may hold (bytes, connections), so that one run's
//!   junk cannot exhaust the daemon for the others.
//! - [`pace`]: large fan-outs written in slices while the host's CPUs are overcommitted.

mod admission;
pub mod core;
pub mod limits;
pub mod pace;
pub mod server;
pub mod service;

pub use limits::{Limit, LimitExceeded, SyncLimits};
pub use server::{raise_fd_limit, serve};
pub use service::{ConnHandle, ServiceError, ServiceStats, Subscription, SyncService};
