//! The engine: accepts build and run tasks, queues them by priority, executes them on a
//! bounded number of workers, and records their life cycle and logs.
//!
//! Life cycle of a task: `submit` validates the request against the plan's manifest and its
//! runner (builders' artifact kinds, the typed run configuration), stores the task as
//! `scheduled` and queues it; a worker marks it `processing`, builds the groups that need it
//! (once per distinct build), runs it, and stores the final state: `complete` with a result, or
//! `canceled` with an error (as in the original, any build or run error cancels the task).
//! Everything that happens to a task is a typed [`TaskEvent`], rendered into its log file
//! (which `logs` follows) and broadcast to live subscribers ([`Engine::subscribe`]).
//!
//! Embedded mode (the CLI with no daemon) and the daemon run this same code.
//!
//! Modules: `queue` (priority order), `build` (build phase), `run` (run phase), `events`
//! (typed events and their rendering), `owner` (which process runs a task), `influx` (export
//! of a run's metrics to InfluxDB after the run).

mod build;
pub mod events;
mod influx;
pub(crate) mod owner;
mod queue;
mod run;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use futures::stream::BoxStream;
use tg_api::composition::Composition;
use tg_api::rpc::{
    Chunk, HealthcheckItem, HealthcheckReport, TaskRequest, TasksFilters, TerminateRequest,
};
use tg_api::task::{DatedState, Task, TaskState, TaskType};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::EnvConfig;
use crate::home::Home;
use crate::journal::{JournalData, RunJournal};
use crate::store::{Store, StoreError};
use crate::tasklog::{LogProgress, LogReader, LogWriter, POLL};
use events::{BROADCAST_CAPACITY, TaskEvents};
pub use events::{Level, RunSummary, TaskEvent, log_line};
use owner::Owner;
use queue::TaskQueue;

/// Where the plan sources of a request are.
#[derive(Debug, Clone)]
pub enum PlanSource {
    /// A directory on this machine (embedded mode).
    Dir(PathBuf),
    /// A `.tgz` uploaded with the request (daemon mode).
    Archive(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Plan(#[from] tg_plan::PlanError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no such task: {0}")]
    NoSuchTask(String),
    #[error("queue full")]
    QueueFull,
    #[error("{0}")]
    Runner(#[from] tg_runner::RunError),
    #[error("group {group}: {reason}")]
    UnknownBuilder { group: String, reason: String },
    #[error("runner {runner} is incompatible with builder {builder}")]
    Incompatible { runner: String, builder: String },
    #[error("runner {0} is disabled by config")]
    RunnerDisabled(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("the engine is shutting down")]
    ShuttingDown,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
    move |source| EngineError::Io {
        context: context.into(),
        source,
    }
}

/// What the engine stores as a task's `input`: the request (without the archive) and where
/// its sources are, so a queued task can be resumed after a restart.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct StoredInput {
    #[serde(flatten)]
    request: TaskRequest,
    #[serde(rename = "Sources")]
    sources: Sources,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Sources {
    #[serde(default)]
    plan_dir: Option<PathBuf>,
}

struct Running {
    cancel: CancellationToken,
    runner: String,
    builders: Vec<String>,
    progress: watch::Receiver<LogProgress>,
    events: broadcast::Sender<Arc<TaskEvent>>,
    journal: Arc<Mutex<RunJournal>>,
}

struct Inner {
    home: Home,
    cfg: EnvConfig,
    store: Store,
    queue: Mutex<TaskQueue>,
    wake: Notify,
    running: Mutex<HashMap<String, Running>>,
    shutdown: CancellationToken,
    workers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    sync: SyncEndpoint,
}

/// The sync service every run of this engine uses, and where instances reach it.
#[derive(Debug, Clone)]
struct SyncEndpoint {
    service: tg_sync::SyncService,
    host: String,
    port: u16,
}

/// The engine. Cheap to clone; all clones drive the same queue and store.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// Which process drives the engine: a daemon resumes queued tasks after a restart, an
/// embedded engine only executes what it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Embedded,
    Daemon,
}

impl Engine {
    /// Opens the store and starts the workers (embedded mode).
    pub async fn start(home: Home, cfg: EnvConfig) -> Result<Engine, EngineError> {
        Self::start_with(home, cfg, Mode::Embedded).await
    }

    pub async fn start_with(home: Home, cfg: EnvConfig, mode: Mode) -> Result<Engine, EngineError> {
        home.ensure().map_err(io_err(format!(
            "cannot create home directory {}",
            home.root().display()
        )))?;
        let store = Store::open(&home.tasks_db())?;
        let shutdown = CancellationToken::new();
        let sync = start_sync(&cfg, &shutdown).await?;
        let workers = cfg.daemon.scheduler.workers.max(1);
        let engine = Engine {
            inner: Arc::new(Inner {
                home,
                cfg,
                store,
                queue: Mutex::new(TaskQueue::default()),
                wake: Notify::new(),
                running: Mutex::new(HashMap::new()),
                shutdown,
                workers: Mutex::new(Vec::new()),
                sync,
            }),
        };
        engine.recover(mode)?;
        let mut handles = Vec::new();
        for _ in 0..workers {
            let e = engine.clone();
            handles.push(tokio::spawn(async move { e.worker().await }));
        }
        *lock(&engine.inner.workers) = handles;
        Ok(engine)
    }

    pub fn home(&self) -> &Home {
        &self.inner.home
    }

    /// Tasks left `scheduled` or `processing` by a process that is gone: a daemon re-queues
    /// the scheduled ones it owned, in their original order; everything else is marked
    /// canceled with an explanation. Processes and temp dirs of runs whose engine died are
    /// removed.
    fn recover(&self, mode: Mode) -> Result<(), EngineError> {
        let data_dir = self.data_dir();
        for line in tg_runner::clean_leftovers(&tg_runner::runs_dir(&data_dir)) {
            tracing::warn!("{line}");
        }
        let mut open = self.inner.store.list(&TasksFilters {
            states: vec![TaskState::Scheduled, TaskState::Processing],
            ..Default::default()
        })?;
        // The store lists newest first; the queue keeps submission order among equals.
        open.reverse();
        for mut task in open {
            let owner = self.inner.store.owner(&task.id)?;
            if !owner.is_none() && !owner.is_me() && owner.alive() {
                continue;
            }
            if mode == Mode::Daemon && task.state() == TaskState::Scheduled {
                self.enqueue(&task)?;
                self.inner.store.put(&task, Owner::me())?;
                continue;
            }
            task.error = "the engine stopped before the task finished".into();
            push_state(&mut task, TaskState::Canceled);
            self.inner.store.put(&task, Owner::NONE)?;
        }
        Ok(())
    }

    /// `$TESTGROUND_HOME/data`.
    fn data_dir(&self) -> PathBuf {
        let outputs = self.inner.home.outputs_dir();
        outputs.parent().map(PathBuf::from).unwrap_or(outputs)
    }

    /// A task `processing` in another process that is gone (an embedded CLI that was killed)
    /// never finishes by itself: mark it canceled. Returns the task as it now stands.
    fn reap_if_orphaned(&self, mut task: Task) -> Task {
        if task.state().is_final() {
            return task;
        }
        if lock(&self.inner.running).contains_key(&task.id) {
            return task;
        }
        let Ok(owner) = self.inner.store.owner(&task.id) else {
            return task;
        };
        // Only running tasks: a queued task of a stopped daemon is resumed by its next start.
        if task.state() == TaskState::Processing && !owner.alive() {
            task.error = format!(
                "the process that ran the task (pid {}) is gone; its instances were killed",
                owner.pid
            );
            push_state(&mut task, TaskState::Canceled);
            if let Err(e) = self.inner.store.put(&task, Owner::NONE) {
                tracing::warn!("cannot mark task {} canceled: {e}", task.id);
            }
            for line in tg_runner::clean_leftovers(&tg_runner::runs_dir(&self.data_dir())) {
                tracing::warn!("{line}");
            }
        }
        task
    }

    /// Validates and queues a task; returns its id (also the run id).
    pub fn submit(
        &self,
        mut req: TaskRequest,
        source: Option<PlanSource>,
    ) -> Result<String, EngineError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(EngineError::ShuttingDown);
        }
        let comp = &req.composition;
        let manifest = &req.manifest;
        match req.task_type {
            TaskType::Build => {
                tg_plan::validate_for_build(comp, manifest)?;
                req.build_groups = (0..comp.groups.len()).collect();
            }
            TaskType::Run => {
                tg_plan::validate_for_run(comp, manifest)?;
                if req.run_ids.len() > 1 {
                    return Err(EngineError::BadRequest(
                        "cannot specify multiple run ids for now".into(),
                    ));
                }
                self.check_runner(&req)?;
                if let Some(bad) = req.build_groups.iter().find(|&&i| i >= comp.groups.len()) {
                    return Err(EngineError::BadRequest(format!(
                        "build group index {bad} out of range"
                    )));
                }
            }
        }
        let id = xid::new().to_string();
        let plan_dir = match source {
            Some(PlanSource::Dir(d)) => Some(d),
            Some(PlanSource::Archive(bytes)) => {
                let dest = self.inner.home.request_dir(&id).join("plan");
                crate::archive::unpack(&bytes[..], &dest)
                    .map_err(|e| EngineError::BadRequest(format!("plan archive: {e}")))?;
                Some(dest)
            }
            None => None,
        };
        if plan_dir.is_none() && !req.build_groups.is_empty() {
            return Err(EngineError::BadRequest("plan directory not present".into()));
        }
        req.plan_archive = None;
        let task = Task {
            version: 0,
            priority: req.priority,
            id: id.clone(),
            runner: if req.task_type == TaskType::Run {
                req.composition.global.runner.clone()
            } else {
                String::new()
            },
            plan: req.manifest.name.clone(),
            case: req.composition.global.case.clone(),
            states: vec![DatedState {
                created: Utc::now(),
                state: TaskState::Scheduled,
            }],
            task_type: req.task_type,
            composition: serde_json::to_value(&req.composition).unwrap_or_default(),
            created_by: req.created_by.clone(),
            input: serde_json::to_value(StoredInput {
                request: req,
                sources: Sources { plan_dir },
            })
            .unwrap_or_default(),
            result: serde_json::Value::Null,
            error: String::new(),
        };
        if lock(&self.inner.queue).len() >= self.inner.cfg.daemon.scheduler.queue_size.max(1) {
            return Err(EngineError::QueueFull);
        }
        self.inner.store.put(&task, Owner::me())?;
        self.enqueue(&task)?;
        Ok(id)
    }

    /// The run's runner exists and is enabled, executes what the groups' builders produce,
    /// and accepts the run configuration (a bad value, or an unknown key written for this run,
    /// fails here, before anything is built).
    fn check_runner(&self, req: &TaskRequest) -> Result<(), EngineError> {
        let comp = &req.composition;
        let runner = tg_runner::runner(&comp.global.runner)?;
        let disabled = self
            .inner
            .cfg
            .runners
            .get(runner.id())
            .and_then(|t| t.get("disabled"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if disabled {
            return Err(EngineError::RunnerDisabled(runner.id().to_owned()));
        }
        for g in &comp.groups {
            let builder = if g.builder.is_empty() {
                &comp.global.builder
            } else {
                &g.builder
            };
            // A group that is not built runs its given artifact.
            if builder.is_empty() && !g.run.artifact.is_empty() {
                continue;
            }
            // A group with a given artifact is not built: its builder only names the kind.
            let known = if g.run.artifact.is_empty() {
                tg_builder::lookup(builder).map(|b| b.artifact_kind())
            } else {
                tg_builder::lookup(builder)
                    .map(|b| b.artifact_kind())
                    .or_else(|e| tg_builder::artifact_kind(builder).ok_or(e))
            };
            let kind = known.map_err(|e| EngineError::UnknownBuilder {
                group: g.id.clone(),
                reason: e.to_string(),
            })?;
            if !runner.accepts().contains(&kind) {
                return Err(EngineError::Incompatible {
                    runner: runner.id().to_owned(),
                    builder: builder.clone(),
                });
            }
        }
        let run_id = run::run_id_of(req, comp);
        let resolved =
            tg_plan::resolve_run(comp, &req.manifest, &run_id, &self.inner.cfg.runners_json())?;
        let strict: BTreeSet<String> = comp.global.run_config.keys().cloned().collect();
        runner.parse_config(&resolved.run_config, &strict)?;
        Ok(())
    }

    fn enqueue(&self, task: &Task) -> Result<(), EngineError> {
        lock(&self.inner.queue).push(&task.id, task.priority);
        self.inner.wake.notify_one();
        Ok(())
    }

    async fn worker(&self) {
        loop {
            let next = lock(&self.inner.queue).pop();
            match next {
                Some(id) => {
                    if let Err(e) = self.execute(&id).await {
                        tracing::error!("task {id}: {e}");
                    }
                }
                None => {
                    tokio::select! {
                        _ = self.inner.wake.notified() => {}
                        _ = self.inner.shutdown.cancelled() => return,
                    }
                }
            }
            if self.inner.shutdown.is_cancelled() {
                return;
            }
        }
    }

    async fn execute(&self, id: &str) -> Result<(), EngineError> {
        let Some(mut task) = self.inner.store.get(id)? else {
            return Ok(());
        };
        if task.state() != TaskState::Scheduled {
            return Ok(());
        }
        let input: StoredInput = serde_json::from_value(task.input.clone())
            .map_err(|e| EngineError::BadRequest(format!("stored task input: {e}")))?;
        let (log, progress) = LogWriter::create(&self.inner.home.task_log(id))
            .map_err(io_err("cannot create task log"))?;
        let (events_tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        let journal = Arc::new(Mutex::new(RunJournal::new(RunJournal::path_in(
            &self.inner.home.daemon_dir(),
            id,
        ))));
        let mut events = TaskEvents::new(log, events_tx.clone(), journal.clone());
        let cancel = self.inner.shutdown.child_token();
        let builders = input
            .request
            .composition
            .groups
            .iter()
            .map(|g| {
                if g.builder.is_empty() {
                    input.request.composition.global.builder.clone()
                } else {
                    g.builder.clone()
                }
            })
            .collect();
        lock(&self.inner.running).insert(
            id.to_owned(),
            Running {
                cancel: cancel.clone(),
                runner: task.runner.clone(),
                builders,
                progress,
                events: events_tx,
                journal,
            },
        );
        push_state(&mut task, TaskState::Processing);
        self.inner.store.put(&task, Owner::me())?;
        events.emit(TaskEvent::State(TaskState::Processing));

        let timeout = self.inner.cfg.task_timeout();
        let outcome = match input.request.task_type {
            TaskType::Build => {
                let work = self.do_build(&task, &input, &mut events, &cancel);
                tokio::select! {
                    r = work => r,
                    _ = tokio::time::sleep(timeout) => {
                        cancel.cancel();
                        Err(format!("build canceled after reaching the task timeout ({}s)", timeout.as_secs()))
                    }
                }
            }
            TaskType::Run => {
                self.do_run(&task, &input, &mut events, &cancel, timeout)
                    .await
            }
        };
        match outcome {
            Ok(TaskDone {
                result,
                composition,
                canceled,
            }) => {
                task.result = result;
                if let Some(c) = composition {
                    task.composition = serde_json::to_value(c).unwrap_or_default();
                }
                push_state(
                    &mut task,
                    if canceled {
                        TaskState::Canceled
                    } else {
                        TaskState::Complete
                    },
                );
            }
            Err(e) => {
                events.emit(TaskEvent::Failed(e.clone()));
                task.error = e;
                push_state(&mut task, TaskState::Canceled);
            }
        }
        // Whatever happens to the store, followers must see the end of the log.
        let stored = self.inner.store.put(&task, Owner::NONE);
        events.emit(TaskEvent::State(task.state()));
        events.finish();
        lock(&self.inner.running).remove(id);
        Ok(stored?)
    }

    /// The task's log: every progress chunk so far (and, when `follow`, until the task ends),
    /// then a result chunk holding the task, or an error chunk.
    pub fn logs(&self, task_id: &str, follow: bool) -> BoxStream<'static, Chunk> {
        let (tx, rx) = mpsc::channel::<Chunk>(256);
        let engine = self.clone();
        let id = task_id.to_owned();
        tokio::spawn(async move {
            match engine.inner.store.get(&id) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    let _ = tx.send(Chunk::error(format!("no such task: {id}"))).await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Chunk::error(e.to_string())).await;
                    return;
                }
            }
            let mut reader = LogReader::new(engine.inner.home.task_log(&id));
            let mut progress = lock(&engine.inner.running)
                .get(&id)
                .map(|r| r.progress.clone());
            loop {
                for c in reader.read_available() {
                    if tx.send(c).await.is_err() {
                        return;
                    }
                }
                if !follow {
                    break;
                }
                let finished = match &progress {
                    Some(p) => p.borrow().done,
                    // Run by another process: finished when stored so, or when that process
                    // is gone (then it is marked canceled).
                    None => engine
                        .inner
                        .store
                        .get(&id)
                        .ok()
                        .flatten()
                        .map(|t| engine.reap_if_orphaned(t))
                        .is_none_or(|t| t.state().is_final()),
                };
                if finished {
                    for c in reader.read_available() {
                        if tx.send(c).await.is_err() {
                            return;
                        }
                    }
                    break;
                }
                match progress.as_mut() {
                    Some(p) => {
                        tokio::select! {
                            r = p.changed() => if r.is_err() { progress = None; },
                            _ = tx.closed() => return,
                        }
                    }
                    None => {
                        // The task runs in another process (or has not started): poll.
                        tokio::select! {
                            _ = tokio::time::sleep(POLL) => {}
                            _ = tx.closed() => return,
                        }
                        if progress.is_none() {
                            progress = lock(&engine.inner.running)
                                .get(&id)
                                .map(|r| r.progress.clone());
                        }
                    }
                }
            }
            let last = match engine.inner.store.get(&id) {
                Ok(Some(t)) => Chunk::result(serde_json::to_value(t).unwrap_or_default()),
                Ok(None) => Chunk::error(format!("no such task: {id}")),
                Err(e) => Chunk::error(e.to_string()),
            };
            let _ = tx.send(last).await;
        });
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|c| (c, rx))
        }))
    }

    /// Cancels a queued or running task. Returns false if the task is unknown or already over.
    pub fn cancel(&self, task_id: &str) -> bool {
        if let Some(r) = lock(&self.inner.running).get(task_id) {
            r.cancel.cancel();
            return true;
        }
        let removed = lock(&self.inner.queue).remove(task_id);
        let Ok(Some(task)) = self.inner.store.get(task_id) else {
            return false;
        };
        if task.state().is_final() {
            return false;
        }
        // Its process is gone: nothing to ask, mark it canceled.
        let mut task = self.reap_if_orphaned(task);
        if task.state().is_final() {
            return true;
        }
        let owner = self.inner.store.owner(task_id).unwrap_or(Owner::NONE);
        if removed
            || (task.state() == TaskState::Scheduled
                && (owner.is_none() || owner.is_me() || !owner.alive()))
        {
            task.error = "canceled before it started".into();
            push_state(&mut task, TaskState::Canceled);
            return self.inner.store.put(&task, Owner::NONE).is_ok();
        }
        // Running in another process (an embedded CLI): ask that process to cancel it, the
        // way Ctrl-C would.
        !owner.is_none() && !owner.is_me() && owner.ask_to_cancel()
    }

    pub fn status(&self, task_id: &str) -> Result<Task, EngineError> {
        let task = self
            .inner
            .store
            .get(task_id)?
            .ok_or_else(|| EngineError::NoSuchTask(task_id.to_owned()))?;
        Ok(self.reap_if_orphaned(task))
    }

    pub fn tasks(&self, f: &TasksFilters) -> Result<Vec<Task>, EngineError> {
        let tasks = self.inner.store.list(f)?;
        Ok(tasks
            .into_iter()
            .map(|t| self.reap_if_orphaned(t))
            // A reaped task may no longer match a state filter.
            .filter(|t| f.states.is_empty() || f.states.contains(&t.state()))
            .collect())
    }

    /// Live events of a running task of this engine (a dashboard, an exporter); `None` when
    /// the task is not running here. The task log has the complete record.
    /// Changes whenever a task is added or changes, in this process or another one using the
    /// same home: the dashboard polls it to refresh what it shows.
    pub fn tasks_version(&self) -> u64 {
        self.inner.store.version()
    }

    /// The per-instance journal of a run: live while this engine runs it, else from its file.
    pub fn journal(&self, task_id: &str) -> Option<JournalData> {
        if let Some(r) = lock(&self.inner.running).get(task_id) {
            return Some(lock(&r.journal).data().clone());
        }
        RunJournal::load(&RunJournal::path_in(&self.inner.home.daemon_dir(), task_id))
    }

    pub fn subscribe(&self, task_id: &str) -> Option<broadcast::Receiver<Arc<TaskEvent>>> {
        lock(&self.inner.running)
            .get(task_id)
            .map(|r| r.events.subscribe())
    }

    /// Cancels every task using the runner or builder named in the request.
    pub async fn terminate(&self, req: &TerminateRequest) -> Result<(), EngineError> {
        if req.runner.is_empty() == req.builder.is_empty() {
            return Err(EngineError::BadRequest(
                "specify exactly one of runner or builder to terminate".into(),
            ));
        }
        let targets: Vec<String> = lock(&self.inner.running)
            .iter()
            .filter(|(_, r)| {
                (!req.runner.is_empty() && r.runner == req.runner)
                    || (!req.builder.is_empty() && r.builders.contains(&req.builder))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in targets {
            self.cancel(&id);
        }
        // Tasks of embedded CLIs in other processes.
        let open = self.inner.store.list(&TasksFilters {
            states: vec![TaskState::Scheduled, TaskState::Processing],
            ..Default::default()
        })?;
        for t in open {
            let uses_builder = serde_json::from_value::<Composition>(t.composition.clone())
                .map(|c| {
                    c.groups.iter().any(|g| {
                        g.builder == req.builder
                            || (g.builder.is_empty() && c.global.builder == req.builder)
                    })
                })
                .unwrap_or(false);
            if (!req.runner.is_empty() && t.runner == req.runner)
                || (!req.builder.is_empty() && uses_builder)
            {
                self.cancel(&t.id);
            }
        }
        if !req.runner.is_empty() {
            let runner = tg_runner::runner(&req.runner)?;
            let env = self.runner_env(runner.id());
            for line in runner.terminate(&self.data_dir(), &env).await {
                tracing::warn!("{line}");
            }
        }
        Ok(())
    }

    /// The outputs of a run as a `.tgz` (`<run_id>/<group>/<index>/<file>`), or None.
    pub fn collect(&self, run_id: &str) -> Result<Option<Vec<u8>>, EngineError> {
        let runners: Vec<String> = match self.inner.store.get(run_id)? {
            Some(t) if !t.runner.is_empty() => vec![t.runner],
            _ => tg_runner::runners()
                .iter()
                .map(|r| r.id().to_string())
                .collect(),
        };
        for runner in runners {
            let mut buf = Vec::new();
            match tg_runner::collect_outputs(
                &self.inner.home.outputs_dir(),
                &runner,
                run_id,
                &mut buf,
            ) {
                Ok(true) => return Ok(Some(buf)),
                Ok(false) => {}
                Err(e) => {
                    return Err(EngineError::Io {
                        context: format!("collecting outputs of {run_id}"),
                        source: std::io::Error::other(e.to_string()),
                    });
                }
            }
        }
        Ok(None)
    }

    pub async fn healthcheck(
        &self,
        runner: &str,
        fix: bool,
        instances: Option<u32>,
    ) -> Result<HealthcheckReport, EngineError> {
        let runner = tg_runner::runner(runner)?;
        let mut report = HealthcheckReport::default();
        let dirs = [
            ("local-outputs-dir", self.inner.home.outputs_dir()),
            ("work-dir", self.inner.home.work_dir()),
        ];
        for (name, dir) in dirs {
            let ok = dir.is_dir();
            report.checks.push(HealthcheckItem {
                name: name.into(),
                status: if ok { "ok" } else { "failed" }.into(),
                message: format!(
                    "{} {}",
                    dir.display(),
                    if ok { "exists" } else { "is missing" }
                ),
            });
            if !ok && fix {
                let r = std::fs::create_dir_all(&dir);
                report.fixes.push(HealthcheckItem {
                    name: name.into(),
                    status: if r.is_ok() { "ok" } else { "failed" }.into(),
                    message: match r {
                        Ok(()) => format!("created {}", dir.display()),
                        Err(e) => format!("cannot create {}: {e}", dir.display()),
                    },
                });
            }
        }
        let env = self.runner_env(runner.id());
        let mut checks = runner.healthcheck(fix, &env).await;
        checks.extend(runner.host_checks(instances.unwrap_or(tg_runner::DEFAULT_CHECK_INSTANCES)));
        for check in checks {
            report.checks.push(HealthcheckItem {
                name: check.name.into(),
                status: if check.ok { "ok" } else { "failed" }.into(),
                message: check.message,
            });
            if let Some(f) = check.fix {
                report.fixes.push(HealthcheckItem {
                    name: check.name.into(),
                    status: if f.ok { "ok" } else { "failed" }.into(),
                    message: f.message,
                });
            }
        }
        Ok(report)
    }

    /// Runner `id`'s `[runners."<id>"]` table of `.env.toml`.
    fn runner_env(&self, id: &str) -> tg_runner::EnvConfig {
        self.inner.cfg.runners_json().remove(id).unwrap_or_default()
    }

    pub async fn purge(&self, builder: &str, plan: &str) -> Result<(), EngineError> {
        tg_builder::purge(builder, plan, &self.inner.home.work_dir())
            .await
            .map_err(|e| EngineError::BadRequest(e.to_string()))
    }

    /// Stops taking tasks, cancels the running ones (their processes are killed) and waits for
    /// the workers to record their final state.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let handles = std::mem::take(&mut *lock(&self.inner.workers));
        for h in handles {
            let _ = h.await;
        }
    }
}

/// Starts the sync service and its websocket listener on loopback. When the configured port
/// is taken (a daemon or another embedded run is using it), it falls back to a free port:
/// `local:exec` instances learn it from `SYNC_SERVICE_PORT`.
async fn start_sync(
    cfg: &EnvConfig,
    shutdown: &CancellationToken,
) -> Result<SyncEndpoint, EngineError> {
    let host = "127.0.0.1";
    let listener = match tokio::net::TcpListener::bind((host, cfg.sync.port)).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::info!(
                "sync port {} is in use; the sync service uses a free port",
                cfg.sync.port
            );
            tokio::net::TcpListener::bind((host, 0))
                .await
                .map_err(io_err("cannot start the sync service"))?
        }
        Err(e) => {
            return Err(EngineError::Io {
                context: format!("cannot start the sync service on {host}:{}", cfg.sync.port),
                source: e,
            });
        }
    };
    let port = listener
        .local_addr()
        .map_err(io_err("cannot start the sync service"))?
        .port();
    let service = tg_sync::SyncService::spawn_with(cfg.sync.limits());
    let stop = shutdown.clone();
    tokio::spawn(tg_sync::serve(listener, service.clone(), async move {
        stop.cancelled().await
    }));
    Ok(SyncEndpoint {
        service,
        host: host.to_owned(),
        port,
    })
}

struct TaskDone {
    result: serde_json::Value,
    composition: Option<Composition>,
    canceled: bool,
}

fn push_state(task: &mut Task, state: TaskState) {
    task.states.push(DatedState {
        created: Utc::now(),
        state,
    });
}

use crate::lock;

#[cfg(test)]
mod tests {
    use super::*;
    use tg_api::task::CreatedBy;

    /// A build task queued by an engine that is gone; it fails at once when executed (its
    /// plan directory is not present), which is enough to see the order of execution.
    fn queued(id: &str, priority: i32, created: chrono::DateTime<Utc>) -> Task {
        let request = TaskRequest {
            task_type: TaskType::Build,
            priority,
            composition: Composition::default(),
            manifest: Default::default(),
            build_groups: vec![0],
            run_ids: vec![],
            created_by: CreatedBy::default(),
            plan_archive: None,
        };
        Task {
            version: 0,
            priority,
            id: id.into(),
            runner: String::new(),
            plan: "p".into(),
            case: String::new(),
            states: vec![DatedState {
                created,
                state: TaskState::Scheduled,
            }],
            task_type: TaskType::Build,
            composition: serde_json::Value::Null,
            created_by: CreatedBy::default(),
            input: serde_json::to_value(StoredInput {
                request,
                sources: Sources { plan_dir: None },
            })
            .unwrap(),
            result: serde_json::Value::Null,
            error: String::new(),
        }
    }

    #[tokio::test]
    async fn a_restarted_daemon_runs_queued_tasks_by_priority_then_submission() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        home.ensure().unwrap();
        // The daemon that queued them: a process that is gone.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = Owner {
            pid: child.id(),
            start: owner::start_time(child.id()).unwrap_or(1),
        };
        child.wait().unwrap();
        {
            let store = Store::open(&home.tasks_db()).unwrap();
            let t0 = Utc::now() - chrono::Duration::minutes(10);
            for (i, (id, prio)) in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", 0)]
                .into_iter()
                .enumerate()
            {
                let t = queued(id, prio, t0 + chrono::Duration::seconds(i as i64));
                store.put(&t, gone).unwrap();
            }
        }
        let mut cfg = EnvConfig::default();
        cfg.daemon.scheduler.workers = 1;
        cfg.sync.port = 0;
        let engine = Engine::start_with(home, cfg, Mode::Daemon).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let started = loop {
            let tasks = engine.tasks(&TasksFilters::default()).unwrap();
            if tasks.iter().all(|t| t.state().is_final()) {
                let mut v: Vec<(chrono::DateTime<Utc>, String)> = tasks
                    .iter()
                    .map(|t| {
                        let processing = t
                            .states
                            .iter()
                            .find(|s| s.state == TaskState::Processing)
                            .expect("every task was executed");
                        (processing.created, t.id.clone())
                    })
                    .collect();
                v.sort();
                break v.into_iter().map(|(_, id)| id).collect::<Vec<_>>();
            }
            assert!(std::time::Instant::now() < deadline, "tasks did not run");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(started, ["b", "d", "a", "c", "e"]);
        engine.shutdown().await;
    }
}
