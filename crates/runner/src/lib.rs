//! Runners start a run's instances, supervise them, decide each instance's outcome and keep
//! their outputs.
//!
//! This crate owns the `local:exec` and `local:netns` runners: processes, one process group per
//! instance, the `TEST_*` environment contract, stdout/stderr capture into typed events and into
//! `run.out` / `run.err`, the run timeout and cancellation, outcome reconciliation, and the
//! outputs archive (`collect`). `local:netns` is the same loop with each instance started inside
//! the namespaces and jail its run's sidecar (`tg-sidecar`) builds. It never prints: everything a
//! user should see leaves through [`RunnerEvent`]s. It does not build artifacts (`tg-builder`),
//! own tasks or the sync service (`tg-daemon`, `tg-sync`), or move packets (`tg-sidecar`).
//!
//! Modules:
//! - `local_exec`: the run loop of both runners: spawning, timeout, cancellation, the result.
//! - `netns`: what `local:netns` adds: privilege check, seed, the run's network.
//! - `instance`: one task per instance: pipes, capture files, exit, killing its process group.
//! - `supervisor`: the single actor owning every instance's state and deciding outcomes
//!   ([`InstanceReport`] is its input).
//! - `env`: the instance environment (`TEST_*`, `SYNC_SERVICE_*`, `HOSTNAME`).
//! - `line`: [`InstanceLine`], the original pretty printer's line.
//! - `outputs`: the outputs layout and the `.tgz` collect archive.
//! - `tracking`: per-run process tracking (a cgroup per run, or a `TEST_RUN` marker) and
//!   [`clean_leftovers`] for runs whose engine was killed.
//! - `error`: [`RunError`].

mod env;
mod error;
mod instance;
mod line;
mod local_exec;
mod netns;
mod outputs;
mod supervisor;
mod tracking;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tg_api::events::Event;
use tg_api::task::RunResult;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use error::RunError;
pub use line::{InstanceLine, LineKind};
pub use netns::health as netns_health;
pub use outputs::{collect_outputs, outputs_dir};
pub use supervisor::{Exit, InstanceReport, StopReason, Termination};
pub use tracking::clean_leftovers;

/// Runner ids this crate implements.
pub const RUNNERS: &[&str] = &["local:exec", "local:netns"];

/// Builders whose artifacts a runner can execute, or `None` for an unknown runner.
pub fn compatible_builders(runner: &str) -> Option<&'static [&'static str]> {
    match runner {
        "local:exec" | "local:netns" => Some(&["exec:rust", "exec:go", "exec:generic"]),
        _ => None,
    }
}

/// Everything a runner needs to execute one run.
#[derive(Debug, Clone)]
pub struct RunInput {
    /// The run id (task id, xid): `TEST_RUN`.
    pub run_id: String,
    /// Plan and case names, with `/` already replaced by `-`.
    pub plan: String,
    pub case: String,
    /// Runner id, e.g. `local:exec`.
    pub runner: String,
    pub total_instances: u32,
    pub groups: Vec<RunGroup>,
    /// Coalesced run configuration (manifest `[runners."<id>"]` < `.env.toml` < composition).
    pub run_config: serde_json::Map<String, serde_json::Value>,
    /// `$TESTGROUND_HOME/data/outputs`; the runner writes under
    /// `<runner with ':'→'_'>/<plan>/<run_id>/<group>/<index>/`.
    pub outputs_root: PathBuf,
    /// Where the sync service listens, for `SYNC_SERVICE_HOST`/`SYNC_SERVICE_PORT`.
    pub sync_host: String,
    pub sync_port: u16,
    pub disable_metrics: bool,
    /// Run timeout; the run is killed and fails when it elapses.
    pub timeout: Duration,
    /// The sync service itself: `local:netns` serves it into each run's control network and
    /// its sidecar signals and subscribes in-process. `local:exec` does not need it.
    pub sync_service: Option<tg_sync::SyncService>,
}

/// One run group as the runner sees it.
#[derive(Debug, Clone)]
pub struct RunGroup {
    /// Run-group id: `TEST_GROUP_ID`.
    pub id: String,
    pub instances: u32,
    /// Path of the executable built for this group.
    pub artifact: String,
    /// `TEST_INSTANCE_PARAMS`, resolved (manifest defaults < ... < run group).
    pub params: BTreeMap<String, String>,
    /// `TEST_CAPTURE_PROFILES`.
    pub profiles: BTreeMap<String, String>,
}

/// Outcome of the run plus the directory holding its outputs.
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub result: RunResult,
    pub outputs_dir: PathBuf,
}

/// What a run reports while it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum RunnerEvent {
    /// A free-form progress line for the task log.
    Log(String),
    /// Progress while starting instances (about every 5 % and once at the end).
    Started { started: u32, total: u32 },
    /// One line of an instance (an event, a stdout or stderr line, or its end).
    Instance(InstanceLine),
}

/// Runs `input` to completion.
///
/// Returns `Ok` whatever the instances did (their fate is in [`RunOutput::result`]; a fired
/// `cancel` gives outcome `canceled`); `Err` only when the run could not be carried out (unknown
/// runner, bad configuration, an artifact that cannot be started, outputs that cannot be
/// created). No process of the run survives the returned future, nor its drop.
pub async fn run(
    input: RunInput,
    events: mpsc::UnboundedSender<RunnerEvent>,
    cancel: CancellationToken,
) -> Result<RunOutput, RunError> {
    let (_no_sync, sync_events) = mpsc::unbounded_channel();
    run_with_sync_events(input, events, cancel, sync_events).await
}

/// [`run`], also counting the events instances publish on the run's `run_events` sync topic.
///
/// Those events name a group but not an instance, so they only ever credit successes that an
/// instance's stdout did not show (a plan that publishes without printing); stdout and the exit
/// status stay authoritative for every instance that printed its outcome.
pub async fn run_with_sync_events(
    input: RunInput,
    events: mpsc::UnboundedSender<RunnerEvent>,
    cancel: CancellationToken,
    sync_events: mpsc::UnboundedReceiver<Event>,
) -> Result<RunOutput, RunError> {
    match input.runner.as_str() {
        "local:exec" => local_exec::run(input, events, cancel, sync_events, false).await,
        "local:netns" => local_exec::run(input, events, cancel, sync_events, true).await,
        other => Err(RunError::UnsupportedRunner {
            runner: other.to_string(),
        }),
    }
}
