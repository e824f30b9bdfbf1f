//! Wire and file types shared by every crate of Testground in Rust.
//!
//! This crate owns the *shapes* of things that cross a boundary: the `manifest.toml` and
//! `composition.toml` files, the daemon's HTTP API (tasks, requests, streamed chunks), the events
//! test instances print and publish, the sync service's wire messages and `network.Config`. It
//! does no I/O and holds no logic beyond small helpers on the types; loading and validating
//! plans lives in `tg-plan`, the sync semantics in `tg-sync`.
//!
//! Modules:
//! - [`manifest`]: `manifest.toml` (test plan manifest).
//! - [`artifact`]: artifact kinds (executable, image) shared by builders and runners.
//! - [`composition`]: `composition.toml` and the synthetic composition of `single` commands.
//! - [`events`]: the instance event lines (`start_event`, `success_event`, ...).
//! - [`task`]: tasks, states, outcomes and run results, as stored and served by the daemon.
//! - [`rpc`]: daemon HTTP request bodies and the streamed response chunks.
//! - [`network`]: `network.Config`, `LinkShape`, `LinkRule`: what instances ask the sidecar for.
//! - [`sync`]: sync service wire messages.
//! - [`exit`]: the CLI's exit codes.
//! - [`metrics`]: the metric lines of `results.out` / `diagnostics.out` (sdk-go's schema).

pub mod artifact;
pub mod composition;
pub mod events;
pub mod exit;
pub mod manifest;
pub mod metrics;
pub mod network;
pub mod rpc;
pub mod sync;
pub mod task;
