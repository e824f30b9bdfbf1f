//! The Testground engine: task queue and store, the wiring of plans, builders and runners, and
//! the daemon's HTTP API.
//!
//! The same [`Engine`] runs inside `testground daemon` and, in embedded mode, inside the CLI
//! process itself, so both modes behave and print alike. This crate owns task life cycles,
//! task logs and the home directory; it does not own how plans are parsed (`tg-plan`), how
//! artifacts are built (`tg-builder`) or how instances run (`tg-runner`).
//!
//! Modules:
//! - [`home`]: `$TESTGROUND_HOME` layout.
//! - [`config`]: the `.env.toml` file.
//! - [`engine`]: the engine: submit, queue, workers, build and run tasks, logs, collect.
//! - `store`: SQLite task store.
//! - `tasklog`: per-task log files that can be followed live.
//! - [`journal`]: a run's per-instance journal (states, exits, timelines, network configs).
//! - [`archive`]: packing plan sources for upload and unpacking them.
//! - [`server`]: the HTTP API (see `API.md` in this crate).
//! - [`dashboard`]: the dashboard page and its read-only JSON API.

pub mod archive;
pub mod config;
pub mod dashboard;
pub mod engine;
pub mod home;
pub mod journal;
pub mod server;
mod store;
mod tasklog;

pub use config::EnvConfig;
pub use engine::{Engine, EngineError, Mode, PlanSource};
pub use home::Home;

/// Locks a mutex whose data stays consistent through a panic of a holder (each holder
/// finishes its update before anything can panic), so a poisoned lock is used as is.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
