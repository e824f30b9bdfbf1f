//! `local:exec`: instances as host processes, each in its own process group and in the run's
//! process tracker (a cgroup where possible), so that a run's processes die with the run, and
//! with a killed engine at the engine's next start.

use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tg_sys::spawn::{AsyncChild, Command};
use tokio::net::unix::pipe;

use crate::helper::{HelperPipe, HelperPool};
use crate::instance_sched::InstanceSched;
use crate::launch::{InstanceSpec, LaunchContext, Launched, Launcher, NetEnv, Stop};
use crate::supervisor::Termination;
use crate::tracking::RunTracker;
use crate::{RunError, RunInput, RunnerEvent};

/// `local:exec` instances share the host network; the subnet is nominal.
pub(crate) const SUBNET: &str = "127.1.0.0/16";

/// Where runs record what a killed engine would leave behind: `$TESTGROUND_HOME/data/runs`.
pub(crate) fn state_dir(input: &RunInput) -> PathBuf {
    crate::runs_dir(input.outputs_root.parent().unwrap_or(&input.outputs_root))
}

fn absolute(path: &str) -> PathBuf {
    let p = Path::new(path);
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Starts host processes; the netns launcher adds its jail to the same commands.
pub(crate) struct ExecLauncher {
    sync_host: String,
    sync_port: u16,
    state_dir: PathBuf,
    run_id: String,
    total: u32,
    tracker: Option<RunTracker>,
    /// Set when the run's instances are started through helper processes (see `helper.rs`).
    helpers: Option<HelperPool>,
    /// How instances are scheduled (`instance_sched.rs`), settled when the run starts.
    sched: InstanceSched,
    /// The run configuration's `timer_slack`.
    timer_slack: Option<std::time::Duration>,
}

impl ExecLauncher {
    pub(crate) fn new(input: &RunInput) -> Self {
        ExecLauncher {
            sync_host: input.sync_host.clone(),
            sync_port: input.sync_port,
            state_dir: state_dir(input),
            run_id: input.run_id.clone(),
            total: input.total_instances,
            tracker: None,
            helpers: None,
            sched: InstanceSched::default(),
            timer_slack: None,
        }
    }

    /// Takes what the run configuration says of instance scheduling (`timer_slack`).
    pub(crate) fn with_config(mut self, config: &crate::RunConfig) -> Self {
        self.timer_slack = config.timer_slack;
        self
    }

    /// Settles how instances are scheduled ([`crate::instance_sched`]): the engine's choice and
    /// whether the kernel allows it. Returns lines for the run log (only when something is not
    /// as asked).
    pub(crate) fn settle_sched(&mut self) -> Vec<String> {
        let (mut sched, mut lines) = InstanceSched::settle_from_env();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        lines.extend(sched.settle_crowd(self.total, cpus, self.timer_slack));
        if sched.cpu_group {
            // The group is the run tracker's (recorded, so a dead engine's is removed too).
            let added = match self.tracker.as_mut() {
                Some(t) => t.add_cpu_group(),
                None => Err(std::io::Error::other("the run has no tracker")),
            };
            if let Err(e) = added {
                sched.cpu_group = false;
                // Only root can have one: an unprivileged engine is not told every run.
                if nix::unistd::geteuid().is_root() {
                    lines.push(crate::instance_sched::no_group_line(&e));
                } else {
                    tracing::info!("instances are not in a CPU group of their own: {e}");
                }
            }
        }
        self.sched = sched;
        lines
    }

    /// Removes what runs of dead engines left, then creates this run's process tracker.
    /// Idempotent. Returns lines for the run log.
    pub(crate) fn track(&mut self, temp_root: &Path) -> Result<Vec<String>, RunError> {
        if self.tracker.is_some() {
            return Ok(Vec::new());
        }
        // Thousands of instances need two pipes and up to two capture files each.
        tg_sync::raise_fd_limit();
        crate::child::defer_reaps_while_busy();
        let mut lines = crate::tracking::clean_leftovers(&self.state_dir);
        let mut tracker = RunTracker::create(&self.state_dir, &self.run_id)
            .map_err(RunError::io("record the run in", self.state_dir.clone()))?;
        tracker
            .add_temp_dir(temp_root)
            .map_err(RunError::io("record the run in", self.state_dir.clone()))?;
        if !tracker.uses_cgroup() {
            lines.push(
                "processes tracked by their TEST_RUN marker (no cgroup: not root, or no cgroup v2)"
                    .to_string(),
            );
        }
        self.tracker = Some(tracker);
        Ok(lines)
    }

    /// The command of one instance, before spawning (its tracking applied).
    pub(crate) fn command(&self, spec: &InstanceSpec) -> (Command, PathBuf) {
        let artifact = absolute(&spec.artifact);
        let mut cmd = instance_command(
            artifact.as_os_str(),
            spec.env.iter().map(|(k, v)| (k.as_ref(), v)),
            self.sched,
        );
        if let Some(t) = &self.tracker {
            t.apply(&mut cmd);
        }
        (cmd, artifact)
    }

    pub(crate) async fn spawn(
        &self,
        spec: &InstanceSpec,
        mut cmd: Command,
        artifact: PathBuf,
    ) -> Result<ExecInstance, RunError> {
        match crate::child::spawn_retrying_busy(&mut cmd).await {
            Ok(child) => Ok(ExecInstance::new(child)),
            Err(source) => Err(RunError::Spawn {
                group: spec.group_id.clone(),
                index: spec.index,
                path: artifact,
                source,
            }),
        }
    }

    /// Decides how `local:exec` holds the run's instances within the engine's open-file limit:
    /// directly when they fit, else through helper processes (each holding a share of the
    /// pipes), else not at all: an error that names the limit, what is needed and how to
    /// raise it, before any instance starts. `TESTGROUND_EXEC_HELPER_SHARE=<n>` forces helpers
    /// of `n` instances each (for tests and measurements).
    fn plan_descriptors(&mut self) -> Result<Option<String>, RunError> {
        use crate::limits::{engine_need, helper_share, raise_nofile_hint, try_raise_nofile};
        let n = u64::from(self.total);
        let forced = std::env::var("TESTGROUND_EXEC_HELPER_SHARE")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| *s > 0);
        let direct = engine_need("local:exec", n, 0);
        if forced.is_none() && try_raise_nofile(direct) >= direct {
            return Ok(None);
        }
        let hard = crate::limits::nofile().1;
        let Some(program) = crate::helper::helper_program() else {
            let limit = try_raise_nofile(direct);
            return Err(RunError::FileLimit {
                instances: self.total,
                need: direct,
                limit,
                hint: raise_nofile_hint(direct, hard),
            });
        };
        let share = forced.unwrap_or_else(|| helper_share(hard));
        let helpers = n.div_ceil(share);
        let need = engine_need("local:exec", n, helpers);
        let limit = try_raise_nofile(need);
        if limit < need {
            return Err(RunError::FileLimit {
                instances: self.total,
                need,
                limit,
                hint: raise_nofile_hint(need, hard),
            });
        }
        self.helpers = Some(HelperPool::new(
            program.to_path_buf(),
            share as usize,
            &self.run_id,
            self.sched,
            self.tracker
                .as_ref()
                .and_then(|t| t.cpu_group())
                .map(|g| g.path().to_path_buf()),
        ));
        Ok(Some(format!(
            "starting instances through {helpers} helper processes of {share} instances each \
             (open files: {direct} needed without helpers, limit {limit})"
        )))
    }

    /// Kills what is left of the run's processes; returns lines for the run log.
    pub(crate) async fn finish(mut self) -> Vec<String> {
        // Helpers kill what they still run once their stdin closes.
        drop(self.helpers.take());
        crate::child::reap_put_off_now().await;
        match self.tracker {
            Some(t) => t.finish().await,
            None => Vec::new(),
        }
    }
}

impl Launcher for ExecLauncher {
    type Instance = ExecInstance;

    fn paced_start(&self) -> bool {
        true
    }

    async fn start(&mut self, ctx: &LaunchContext) -> Result<NetEnv, RunError> {
        for line in self.track(&ctx.temp_root)? {
            let _ = ctx.events.send(RunnerEvent::Log(line)).await;
        }
        for line in self.settle_sched() {
            let _ = ctx.events.send(RunnerEvent::Log(line)).await;
        }
        if let Some(line) = self.plan_descriptors()? {
            let _ = ctx.events.send(RunnerEvent::Log(line)).await;
        }
        Ok(NetEnv {
            sidecar: false,
            subnet: SUBNET.into(),
            sync_host: self.sync_host.clone(),
            sync_port: self.sync_port,
        })
    }

    async fn prepare(&mut self, _specs: &[InstanceSpec]) -> Result<(), RunError> {
        Ok(())
    }

    async fn launch(&mut self, spec: &InstanceSpec) -> Result<ExecInstance, RunError> {
        if let Some(pool) = &mut self.helpers {
            let artifact = absolute(&spec.artifact);
            let tracker = &self.tracker;
            // Helpers are tracked with the run but scheduled with the engine: each joins the
            // run's cgroup, and puts the instances it starts in their CPU group itself.
            let prepare = |cmd: &mut tokio::process::Command| {
                if let Some(t) = tracker {
                    t.apply_tracking(cmd);
                }
            };
            return match pool
                .spawn(spec.ordinal, &artifact, &spec.env, &prepare)
                .await
            {
                Ok(h) => Ok(ExecInstance {
                    pgid: Some(h.pid),
                    proc: Proc::Helped {
                        exit: h.exit,
                        stdout: h.stdout,
                        stderr: h.stderr,
                    },
                }),
                Err(source) => Err(RunError::Spawn {
                    group: spec.group_id.clone(),
                    index: spec.index,
                    path: artifact,
                    source,
                }),
            };
        }
        let (cmd, artifact) = self.command(spec);
        self.spawn(spec, cmd, artifact).await
    }

    async fn teardown(self) -> Vec<String> {
        self.finish().await
    }
}

/// A host process, leader of its own process group.
pub(crate) struct ExecInstance {
    proc: Proc,
    pgid: Option<u32>,
}

/// Who holds the instance's pipes and reaps it.
enum Proc {
    /// The engine: a child of this process.
    Direct(AsyncChild),
    /// A helper process, which forwards its output and exit status.
    Helped {
        exit: tokio::sync::watch::Receiver<Option<Termination>>,
        stdout: Option<HelperPipe>,
        stderr: Option<HelperPipe>,
    },
}

impl ExecInstance {
    fn new(child: AsyncChild) -> Self {
        let pgid = Some(child.id());
        ExecInstance {
            proc: Proc::Direct(child),
            pgid,
        }
    }

    /// Signals the instance's whole process group. Guarded so that a bogus id can never turn
    /// into `kill(0)` (our own group) or `kill(-1)` (everything we may signal).
    fn signal(&self, sig: Signal) {
        if let Some(pgid) = self
            .pgid
            .and_then(|p| i32::try_from(p).ok())
            .filter(|p| *p > 1)
        {
            // ESRCH (group already gone) is the common, expected case.
            let _ = killpg(Pid::from_raw(pgid), sig);
        }
    }
}

/// No instance outlives its run, even when its task is aborted because the run itself was
/// dropped.
impl Drop for ExecInstance {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

fn termination(status: std::io::Result<std::process::ExitStatus>) -> Termination {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => Termination::Code(c),
            (None, Some(sig)) => Termination::Signal(sig),
            (None, None) => Termination::Unknown,
        },
        Err(_) => Termination::Unknown,
    }
}

/// One pipe type for both streams, as the instance task wants.
pub(crate) enum ChildPipe {
    Direct(pipe::Receiver),
    Helped(HelperPipe),
}

impl tokio::io::AsyncRead for ChildPipe {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ChildPipe::Direct(p) => std::pin::Pin::new(p).poll_read(cx, buf),
            ChildPipe::Helped(p) => std::pin::Pin::new(p).poll_read(cx, buf),
        }
    }
}

impl Launched for ExecInstance {
    type Pipe = ChildPipe;

    fn take_stdout(&mut self) -> Option<ChildPipe> {
        match &mut self.proc {
            Proc::Direct(c) => c.take_stdout().and_then(direct_pipe),
            Proc::Helped { stdout, .. } => stdout.take().map(ChildPipe::Helped),
        }
    }

    fn take_stderr(&mut self) -> Option<ChildPipe> {
        match &mut self.proc {
            Proc::Direct(c) => c.take_stderr().and_then(direct_pipe),
            Proc::Helped { stderr, .. } => stderr.take().map(ChildPipe::Helped),
        }
    }

    async fn wait(&mut self) -> Termination {
        match &mut self.proc {
            Proc::Direct(c) => termination(c.wait().await),
            Proc::Helped { exit, .. } => match exit.wait_for(Option::is_some).await {
                Ok(t) => t.unwrap_or(Termination::Unknown),
                // The helper vanished without a word about this instance.
                Err(_) => Termination::Unknown,
            },
        }
    }

    fn stop(&mut self, how: Stop) {
        self.signal(match how {
            Stop::Term => Signal::SIGTERM,
            Stop::Kill => Signal::SIGKILL,
        });
    }
}

/// A pipe of a direct child for the instance task. Registering it with the runtime cannot
/// fail for a pipe we made but for lack of resources; then the stream is lost with a log line.
fn direct_pipe(fd: std::os::fd::OwnedFd) -> Option<ChildPipe> {
    match pipe::Receiver::from_owned_fd(fd) {
        Ok(p) => Some(ChildPipe::Direct(p)),
        Err(e) => {
            tracing::warn!("cannot read an instance's output pipe: {e}");
            None
        }
    }
}

/// An instance's process, as the engine or a helper spawns it: only its environment, stdin
/// from /dev/null, piped stdout and stderr, its own process group (or session), tied to its
/// parent, and killed if dropped (see [`tg_sys::spawn`]: no copy of the engine's memory).
pub(crate) fn instance_command<K, V>(
    program: &std::ffi::OsStr,
    env: impl IntoIterator<Item = (K, V)>,
    sched: InstanceSched,
) -> Command
where
    K: AsRef<std::ffi::OsStr>,
    V: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(program);
    // Before the instance's own environment, which may set it otherwise (`instance_env`).
    if sched.one_go_proc {
        cmd.env("GOMAXPROCS", "1");
    }
    cmd.envs(env);
    // A process group of its own (signals reach all it started), in a session of its own
    // unless turned off, and its time slice.
    sched.apply(&mut cmd);
    // A killed parent takes its instances with it at once; what they started is in the run's
    // tracker, for the next engine start.
    tg_sys::lifetime::die_with_parent(&mut cmd);
    cmd
}
