//! Runners start a run's instances, supervise them, decide each instance's outcome and keep
//! their outputs.
//!
//! A runner is a [`Runner`]: its id, the artifact kinds it executes, the run-config keys it
//! understands (parsed into a typed [`RunConfig`] when a task is submitted), its health checks,
//! and `run`. The engine finds runners in the [`registry`] and never names one. Every runner
//! shares one run loop (`run_loop`: timeout, cancel, supervisor, outcome) over an instance
//! launcher (`launch`), so a new runner writes only how to start an instance. This crate has
//! `local:exec` (host processes) and `local:netns` (the same, each instance inside the
//! namespaces and jail its run's sidecar, `tg-sidecar`, builds). It never prints: everything a
//! user should see leaves through [`RunnerEvent`]s. It does not build artifacts (`tg-builder`),
//! own tasks or the sync service (`tg-daemon`, `tg-sync`), or move packets (`tg-sidecar`).
//!
//! Modules:
//! - `registry`: the runners, looked up by id.
//! - `config`: [`RunConfig`] and the keys each runner understands.
//! - `run_loop`: the shared loop: outputs, start, timeout, cancellation, the result.
//! - `launch`: the launcher seam (`Launcher`, `Launched`).
//! - `exec`: host processes (`local:exec`), also used by `netns`.
//! - `helper`: helper processes that hold a share of a large `local:exec` run's pipes.
//! - `limits`: the open-file budget of a run and the host limits `healthcheck` reports.
//! - `cleanup`: slow cleanup (temp dirs) done after the outcome is out, on one thread.
//! - `netns`: what `local:netns` adds: privilege check, the run's network, jails.
//! - `docker`: `local:docker`: containers joined to pause containers whose namespaces the
//!   run's sidecar wires exactly as under `local:netns`.
//! - `instance`: one task per launched instance: pipes, capture files, exit, stop.
//! - `supervisor`: the single actor owning every instance's state and deciding outcomes
//!   ([`InstanceReport`] is its input).
//! - `env`: the instance environment (`TEST_*`, `SYNC_SERVICE_*`, `HOSTNAME`).
//! - `line`: [`InstanceLine`], the original pretty printer's line.
//! - `outputs`: the outputs layout and the `.tgz` collect archive.
//! - `tracking`: per-run process tracking (a cgroup per run, or a `TEST_RUN` marker) and
//!   [`clean_leftovers`] for runs whose engine was killed.
//! - `error`: [`RunError`].

mod child;
mod cleanup;
mod config;
mod docker;
mod env;
mod error;
mod exec;
mod helper;
mod instance;
mod instance_sched;
mod k8s;
mod launch;
mod limits;
mod line;
mod netns;
mod outputs;
pub mod registry;
mod run_loop;
mod start_pace;
mod supervisor;
mod tracking;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use tg_api::artifact::ArtifactKind;
use tg_api::events::Event;
use tg_api::task::RunResult;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use cleanup::wait_for_cleanup;
pub use config::{ConfigKey, DockerConfig, K8sConfig, RunConfig, StartPaceSetting};
pub use error::RunError;
pub use helper::{HELPER_ARG, helper_main, set_helper_program};
pub use instance::MAX_LINE;
pub use limits::{DEFAULT_CHECK_INSTANCES, host_checks};
pub use line::{InstanceLine, LineKind};
pub use outputs::{collect_outputs, instance_dirs, outputs_dir};
pub use registry::{get as runner, runners};
pub use supervisor::{Exit, InstanceReport, OutcomeRule, StopReason, Termination};
pub use tracking::{clean_leftovers, runs_dir};

/// A runner's `[runners."<id>"]` table of `.env.toml`, as JSON.
pub type EnvConfig = serde_json::Map<String, serde_json::Value>;

/// Capacity of a run's event stream: a reader slower than this slows the run down.
pub const EVENT_QUEUE: usize = 1024;

/// One health check of a runner: (name, ok, message), and what `--fix` did about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub name: &'static str,
    pub ok: bool,
    pub message: String,
    /// Set when a fix was tried (`healthcheck --fix` and the check failed).
    pub fix: Option<HealthFix>,
}

/// The outcome of fixing a failed check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthFix {
    pub ok: bool,
    pub message: String,
}

impl HealthCheck {
    /// A check with no fix attempted.
    pub fn new(name: &'static str, ok: bool, message: impl Into<String>) -> HealthCheck {
        HealthCheck {
            name,
            ok,
            message: message.into(),
            fix: None,
        }
    }
}

/// A runner. Implementations are stateless: everything about a run is in its [`RunContext`].
pub trait Runner: Send + Sync {
    /// `local:exec`, ...
    fn id(&self) -> &'static str;

    /// The artifact kinds this runner can execute.
    fn accepts(&self) -> &'static [ArtifactKind];

    /// The run-config keys it understands.
    fn config_keys(&self) -> Vec<ConfigKey>;

    /// Parses a coalesced run configuration. Unknown keys named in `strict` (those the user
    /// wrote for this run) are errors; other unknown keys are kept in
    /// [`RunConfig::ignored`] to be warned about.
    fn parse_config(
        &self,
        map: &serde_json::Map<String, serde_json::Value>,
        strict: &BTreeSet<String>,
    ) -> Result<RunConfig, RunError>;

    /// What the runner needs from this machine; with `fix`, makes what can be made (e.g. base
    /// images) and reports it in [`HealthCheck::fix`]. `env` is the runner's configuration
    /// from `.env.toml` (where a cluster runner finds its cluster).
    fn healthcheck(&self, fix: bool, env: &EnvConfig) -> BoxFuture<'static, Vec<HealthCheck>>;

    /// Whether this host's limits (open files, pids, threads, memory) hold a run of
    /// `instances` instances on this machine; each failed check says how to raise its limit.
    /// Runners whose instances run elsewhere have none.
    fn host_checks(&self, instances: u32) -> Vec<HealthCheck> {
        let _ = instances;
        Vec::new()
    }

    /// Runs to completion. Returns `Ok` whatever the instances did (their fate is in
    /// [`RunOutput::result`]; a fired cancel gives outcome `canceled`); `Err` only when the
    /// run could not be carried out. No process of the run survives the returned future,
    /// nor its drop.
    fn run(&self, ctx: RunContext) -> BoxFuture<'static, Result<RunOutput, RunError>>;

    /// `testground terminate --runner <id>`, beyond canceling the runner's tasks (which the
    /// engine does): removes what runs of this runner whose engine died left behind. Returns
    /// what it did.
    fn terminate(&self, data_dir: &Path, env: &EnvConfig) -> BoxFuture<'static, Vec<String>> {
        let _ = env;
        let runs = runs_dir(data_dir);
        Box::pin(async move { clean_leftovers(&runs) })
    }
}

/// Everything a run needs.
pub struct RunContext {
    pub input: RunInput,
    /// `input.run_config` parsed by the runner (see [`Runner::parse_config`]).
    pub config: RunConfig,
    /// Where the run reports; bounded ([`EVENT_QUEUE`] is a good capacity).
    pub events: mpsc::Sender<RunnerEvent>,
    pub cancel: CancellationToken,
    /// Events instances publish on the run's `run_events` sync topic.
    pub sync_events: mpsc::Receiver<Event>,
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
    /// The default run timeout (the task timeout); `run_timeout` in the run config overrides
    /// it. The run is killed and fails when it elapses.
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
    /// An instance is gone: how it ended. Not a log line (the log explains only unusual ends);
    /// for the dashboard and the metrics exporter.
    Exited {
        group: String,
        index: u32,
        elapsed: Duration,
        /// `exited with status 0`, `was killed by signal SIGKILL`, ...
        status: String,
        /// Counted ok by the run's outcome rule as far as the instance itself goes (under the
        /// sync-events rule the group tally may still credit fewer).
        ok: bool,
    },
    /// The run's data network: its subnet and the seed of its impairments (also in the log).
    Network { subnet: String, seed: u64 },
    /// The sidecar applied a `network.Config` an instance published (its JSON, as published).
    NetworkApplied {
        group: String,
        index: u32,
        elapsed: Duration,
        config: String,
    },
}

/// The sync key prefix of a run's states and topics.
pub(crate) fn sync_prefix(input: &RunInput) -> String {
    tg_api::sync::RunKeys::new(&input.run_id, &input.plan, &input.case)
        .prefix()
        .to_string()
}

/// Runs `input` on the runner it names, with its run config parsed leniently (unknown keys
/// ignored), forwarding events to an unbounded channel: a convenience for tests and tools.
/// The engine uses [`Runner::run`].
pub async fn run(
    input: RunInput,
    events: mpsc::UnboundedSender<RunnerEvent>,
    cancel: CancellationToken,
) -> Result<RunOutput, RunError> {
    let runner = registry::get(&input.runner)?;
    let config = runner.parse_config(&input.run_config, &BTreeSet::new())?;
    let (tx, mut rx) = mpsc::channel(EVENT_QUEUE);
    let (_no_sync, sync_events) = mpsc::channel(1);
    let forward = async move {
        while let Some(e) = rx.recv().await {
            let _ = events.send(e);
        }
    };
    let run = runner.run(RunContext {
        input,
        config,
        events: tx,
        cancel,
        sync_events,
    });
    let (out, ()) = tokio::join!(run, forward);
    out
}
