//! The instance-launcher seam: what differs between runners (how an instance is started, what
//! it needs around it) behind one trait, so that timeout, cancel, supervision and outcomes are
//! written once in [`crate::run_loop`].
//!
//! Life cycle, driven by the run loop: [`Launcher::start`] once (the run's environment: e.g. its
//! network), then [`Launcher::prepare`] once with every instance (e.g. their namespaces, many at
//! a time), then [`Launcher::launch`] per instance, and [`Launcher::teardown`] once every
//! launched instance has exited, however the run ended (also after `start` or `prepare`
//! failed). A launched instance is a [`Launched`]: its output pipes, a way to wait for it and a
//! way to stop it; dropping it must kill it.

use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;

use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use crate::supervisor::{InstanceReport, Termination};
use crate::{RunError, RunnerEvent};

/// One instance as the loop hands it to the launcher.
#[derive(Debug, Clone)]
pub(crate) struct InstanceSpec {
    /// Position in the run, groups in input order: the supervisor's instance number.
    pub ordinal: usize,
    pub group_id: String,
    pub index: u32,
    /// What to start (an executable path for the exec launchers).
    pub artifact: String,
    pub hostname: String,
    /// The complete environment.
    pub env: Vec<(EnvName, OsString)>,
    pub outputs: PathBuf,
    /// Its temp directory (`TEST_TEMP_PATH` of host processes).
    pub temp: PathBuf,
}

/// The name of an instance's environment variable: the runner's own, or one of the run
/// configuration's `instance_env`.
pub type EnvName = std::borrow::Cow<'static, str>;

/// What the run environment tells instances about itself (`TEST_SIDECAR`, `TEST_SUBNET`,
/// `SYNC_SERVICE_*`).
#[derive(Debug, Clone)]
pub(crate) struct NetEnv {
    pub sidecar: bool,
    pub subnet: String,
    pub sync_host: String,
    pub sync_port: u16,
}

/// What a launcher may use to talk to the run while it goes.
#[derive(Clone)]
pub(crate) struct LaunchContext {
    /// Progress for the task log.
    pub events: mpsc::Sender<RunnerEvent>,
    /// Findings about instances for the supervisor (e.g. a refused network config).
    pub reports: mpsc::Sender<InstanceReport>,
    /// The run's scratch directory (instances' temp dirs are below it).
    pub temp_root: PathBuf,
}

/// How to stop an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Ask it to end (SIGTERM).
    Term,
    /// End it now (SIGKILL), with everything it started.
    Kill,
}

pub(crate) trait Launcher: Send {
    type Instance: Launched;

    /// Sets up the run's environment. Called once, before anything else.
    fn start(
        &mut self,
        ctx: &LaunchContext,
    ) -> impl Future<Output = Result<NetEnv, RunError>> + Send;

    /// Sets up every instance's surroundings before any process starts. The loop drops this
    /// future when the run is canceled meanwhile.
    fn prepare(
        &mut self,
        specs: &[InstanceSpec],
    ) -> impl Future<Output = Result<(), RunError>> + Send;

    /// Whether the start of each instance waits while this host is overcommitted (see
    /// `start_pace`): the host-process runners, whose instances are this host's load.
    fn paced_start(&self) -> bool {
        false
    }

    /// Starts one instance.
    fn launch(
        &mut self,
        spec: &InstanceSpec,
    ) -> impl Future<Output = Result<Self::Instance, RunError>> + Send;

    /// Removes what `start` and `prepare` made (and kills whatever of the run still lives);
    /// returns lines for the run log.
    fn teardown(self) -> impl Future<Output = Vec<String>> + Send;
}

/// A started instance.
pub(crate) trait Launched: Send + 'static {
    type Pipe: AsyncRead + Unpin + Send + 'static;

    /// The instance's stdout and stderr (each taken once).
    fn take_stdout(&mut self) -> Option<Self::Pipe>;
    fn take_stderr(&mut self) -> Option<Self::Pipe>;

    /// Waits for the instance to end. Cancel safe.
    fn wait(&mut self) -> impl Future<Output = Termination> + Send;

    /// Stops the instance (and, for `Kill`, whatever it started that its launcher can reach).
    fn stop(&mut self, how: Stop);
}
