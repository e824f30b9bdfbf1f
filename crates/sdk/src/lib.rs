//! The Rust SDK for Testground test plans, in the spirit of sdk-go: a plan is an ordinary
//! binary whose `main` calls [`invoke`] with its test cases.
//!
//! This crate owns the instance side of the contract: parsing the `TEST_*` environment, the
//! event lines on stdout and in `run.out` (sdk-go's format, so any runner reads them), the
//! `results.out`/`diagnostics.out` metric files, the sync service client (states, barriers,
//! topics) and the network client (sidecar handshake and `network.Config`). It depends on
//! `tg-api` only for the wire types; it does not own the sync service or the runners.
//!
//! Modules:
//! - [`params`]: [`RunParams`] from the environment, typed test parameters.
//! - [`runenv`]: [`RunEnv`], the handle a case gets: events, outputs, metrics.
//! - [`metrics`]: points, counters, gauges, histograms and timers in sdk-go's JSON lines,
//!   flushed periodically; `influx` (private) also writes them to InfluxDB when `INFLUXDB_URL`
//!   is set.
//! - [`sync`]: [`SyncClient`], a pipelined websocket client with namespaced keys.
//! - [`network`]: [`NetClient`] and [`NetworkConfig`] with sdk-go's exact JSON.
//! - [`invoke`](mod@invoke): [`invoke`], [`TestCase`], [`InitContext`], outcomes and exit codes.
//!
//! ```no_run
//! use tg_sdk::{CaseResult, InitContext, RunEnv, TestCase};
//!
//! fn ok(env: &RunEnv) -> CaseResult {
//!     let n = env.int_param("count")?;
//!     env.record_message(format!("count is {n}"));
//!     env.r().counter("runs").inc(1);
//!     Ok(())
//! }
//!
//! async fn ping(env: &RunEnv, ic: &InitContext) -> CaseResult {
//!     let seq = ic.sync.signal_and_wait("ready", env.test_instance_count as i64).await?;
//!     let mut peers = ic.sync.subscribe::<u64>("peers")?;
//!     ic.sync.publish("peers", &seq).await?;
//!     for _ in 0..env.test_instance_count {
//!         let peer = peers.next().await.ok_or("subscription ended")??;
//!         env.record_message(format!("saw peer {peer}"));
//!     }
//!     Ok(())
//! }
//!
//! fn main() {
//!     tg_sdk::invoke([
//!         ("ok", TestCase::plain(ok)),
//!         ("ping", TestCase::initialized(ping)),
//!     ]);
//! }
//! ```

mod influx;
pub mod invoke;
pub mod metrics;
pub mod network;
pub mod params;
pub mod runenv;
pub mod sync;

pub use invoke::{
    BoxError, CaseResult, InitContext, Outcome, TestCase, invoke, invoke_single, run_cases,
};
pub use metrics::{Counter, Gauge, Histogram, Metrics, Timer};
pub use network::{
    FilterAction, LinkRule, LinkShape, NetClient, NetError, NetworkConfig, RoutingPolicy,
};
pub use params::{EnvError, ParamError, RunParams};
pub use runenv::RunEnv;
pub use sync::{Subscription, SyncClient, SyncError};
pub use tg_api::events::Event;
