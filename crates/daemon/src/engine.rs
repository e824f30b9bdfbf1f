//! The engine: accepts build and run tasks, queues them by priority, executes them on a
//! bounded number of workers, and records their life cycle and logs.
//!
//! Life cycle of a task: `submit` validates the request against the plan's manifest, stores
//! the task as `scheduled` and queues it; a worker marks it `processing`, builds the groups
//! that need it (once per distinct build), runs it, and stores the final state: `complete`
//! with a result, or `canceled` with an error (as in the original, any build or run error
//! cancels the task). Everything a task prints goes to its log file, which `logs` follows.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures::stream::BoxStream;
use tg_api::composition::Composition;
use tg_api::rpc::{
    Chunk, HealthcheckItem, HealthcheckReport, TaskRequest, TasksFilters, TerminateRequest,
};
use tg_api::task::{DatedState, Outcome, Task, TaskState, TaskType};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::EnvConfig;
use crate::home::Home;
use crate::store::{Store, StoreError};
use crate::tasklog::{LogProgress, LogReader, LogWriter, POLL};

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
    #[error("unknown runner: {runner} (supported: {supported})")]
    UnknownRunner { runner: String, supported: String },
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

#[derive(Debug, PartialEq, Eq)]
struct Queued {
    priority: i32,
    seq: u64,
    id: String,
}

impl Ord for Queued {
    /// Higher priority first, then first come first served.
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

struct Running {
    cancel: CancellationToken,
    runner: String,
    builders: Vec<String>,
    progress: watch::Receiver<LogProgress>,
}

struct Inner {
    home: Home,
    cfg: EnvConfig,
    store: Store,
    queue: Mutex<(BinaryHeap<Queued>, u64)>,
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
                queue: Mutex::new((BinaryHeap::new(), 0)),
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
    /// the scheduled ones it owned; everything else is marked canceled with an explanation.
    fn recover(&self, mode: Mode) -> Result<(), EngineError> {
        let open = self.inner.store.list(&TasksFilters {
            states: vec![TaskState::Scheduled, TaskState::Processing],
            ..Default::default()
        })?;
        for mut task in open {
            let owner = self.inner.store.owner(&task.id)?;
            if owner != 0 && owner != std::process::id() && process_alive(owner) {
                continue;
            }
            if mode == Mode::Daemon && task.state() == TaskState::Scheduled {
                self.enqueue(&task)?;
                self.inner.store.put(&task, std::process::id())?;
                continue;
            }
            task.error = "the engine stopped before the task finished".into();
            push_state(&mut task, TaskState::Canceled);
            self.inner.store.put(&task, 0)?;
        }
        Ok(())
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
                self.check_runner(comp)?;
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
        {
            let q = lock(&self.inner.queue);
            if q.0.len() >= self.inner.cfg.daemon.scheduler.queue_size.max(1) {
                return Err(EngineError::QueueFull);
            }
        }
        self.inner.store.put(&task, std::process::id())?;
        self.enqueue(&task)?;
        Ok(id)
    }

    fn check_runner(&self, comp: &Composition) -> Result<(), EngineError> {
        let runner = comp.global.runner.as_str();
        let Some(builders) = tg_runner::compatible_builders(runner) else {
            return Err(EngineError::UnknownRunner {
                runner: runner.to_owned(),
                supported: tg_runner::RUNNERS.join(", "),
            });
        };
        let disabled = self
            .inner
            .cfg
            .runners
            .get(runner)
            .and_then(|t| t.get("disabled"))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if disabled {
            return Err(EngineError::RunnerDisabled(runner.to_owned()));
        }
        for g in &comp.groups {
            let builder = if g.builder.is_empty() {
                &comp.global.builder
            } else {
                &g.builder
            };
            if !builders.contains(&builder.as_str()) {
                return Err(EngineError::Incompatible {
                    runner: runner.to_owned(),
                    builder: builder.clone(),
                });
            }
        }
        Ok(())
    }

    fn enqueue(&self, task: &Task) -> Result<(), EngineError> {
        let mut q = lock(&self.inner.queue);
        q.1 += 1;
        let seq = q.1;
        q.0.push(Queued {
            priority: task.priority,
            seq,
            id: task.id.clone(),
        });
        drop(q);
        self.inner.wake.notify_one();
        Ok(())
    }

    async fn worker(&self) {
        loop {
            let next = lock(&self.inner.queue).0.pop();
            match next {
                Some(q) => {
                    if let Err(e) = self.execute(&q.id).await {
                        tracing::error!("task {}: {e}", q.id);
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
        let (mut log, progress) = LogWriter::create(&self.inner.home.task_log(id))
            .map_err(io_err("cannot create task log"))?;
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
            },
        );
        push_state(&mut task, TaskState::Processing);
        self.inner.store.put(&task, std::process::id())?;

        let timeout = self.inner.cfg.task_timeout();
        let outcome = match input.request.task_type {
            TaskType::Build => {
                let work = self.do_build(&task, &input, &mut log, &cancel);
                tokio::select! {
                    r = work => r,
                    _ = tokio::time::sleep(timeout) => {
                        cancel.cancel();
                        Err(format!("build canceled after reaching the task timeout ({}s)", timeout.as_secs()))
                    }
                }
            }
            TaskType::Run => self.do_run(&task, &input, &mut log, &cancel, timeout).await,
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
                log.line(&log_line("ERROR", &format!("task failed: {e}")));
                task.error = e;
                push_state(&mut task, TaskState::Canceled);
            }
        }
        // Whatever happens to the store, followers must see the end of the log.
        let stored = self.inner.store.put(&task, 0);
        log.finish();
        lock(&self.inner.running).remove(id);
        Ok(stored?)
    }

    /// Builds the requested groups, once per distinct build, and fills their artifacts in.
    async fn build_groups(
        &self,
        task: &Task,
        input: &StoredInput,
        log: &mut LogWriter,
        cancel: &CancellationToken,
    ) -> Result<Composition, String> {
        let req = &input.request;
        let mut comp = req.composition.clone();
        if req.build_groups.is_empty() {
            return Ok(comp);
        }
        let plan_dir = input
            .sources
            .plan_dir
            .clone()
            .ok_or("plan directory not present")?;
        let builds = tg_plan::resolve_builds(&comp, &req.manifest, &self.inner.cfg.builders_json())
            .map_err(|e| e.to_string())?;
        let mut done: HashMap<String, String> = HashMap::new();
        for b in builds
            .iter()
            .filter(|b| req.build_groups.contains(&b.group_index))
        {
            if let Some(artifact) = done.get(&b.key) {
                comp.groups[b.group_index].run.artifact = artifact.clone();
                continue;
            }
            let same: Vec<&str> = builds
                .iter()
                .filter(|o| o.key == b.key && req.build_groups.contains(&o.group_index))
                .map(|o| o.group_id.as_str())
                .collect();
            log.line(&log_line(
                "INFO",
                &format!(
                    "performing build for groups\t{{\"plan\": {:?}, \"groups\": {:?}, \"builder\": {:?}}}",
                    task.plan, same, b.builder
                ),
            ));
            let input = tg_builder::BuildInput {
                build_id: xid::new().to_string(),
                plan: req.manifest.name.replace('/', "-"),
                plan_dir: plan_dir.clone(),
                builder: b.builder.clone(),
                config: b.config.clone(),
                selectors: b.selectors.clone(),
                dependencies: b
                    .dependencies
                    .iter()
                    .map(|d| tg_builder::Dependency {
                        module: d.module.clone(),
                        target: d.target.clone(),
                        version: d.version.clone(),
                    })
                    .collect(),
                work_dir: self.inner.home.work_dir(),
            };
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            let build = tg_builder::build(&input, &tx, cancel);
            tokio::pin!(build);
            let started = std::time::Instant::now();
            let out = loop {
                tokio::select! {
                    r = &mut build => break r,
                    Some(line) = rx.recv() => log.line(&log_line("INFO", &format!("build: {line}"))),
                }
            };
            while let Ok(line) = rx.try_recv() {
                log.line(&log_line("INFO", &format!("build: {line}")));
            }
            match out {
                Ok(o) => {
                    log.line(&log_line(
                        "INFO",
                        &format!(
                            "build succeeded\t{{\"plan\": {:?}, \"groups\": {:?}, \"builder\": {:?}, \"artifact\": {:?}, \"cached\": {}, \"took\": \"{:.1}s\"}}",
                            task.plan,
                            same,
                            b.builder,
                            o.artifact.to_string(),
                            o.cached,
                            started.elapsed().as_secs_f64()
                        ),
                    ));
                    comp.groups[b.group_index].run.artifact = o.artifact.to_string();
                    done.insert(b.key.clone(), o.artifact.to_string());
                }
                Err(e) => {
                    return Err(format!("build failed for groups {same:?}: {e}"));
                }
            }
        }
        Ok(comp)
    }

    async fn do_build(
        &self,
        task: &Task,
        input: &StoredInput,
        log: &mut LogWriter,
        cancel: &CancellationToken,
    ) -> Result<TaskDone, String> {
        let comp = self.build_groups(task, input, log, cancel).await?;
        let artifacts: Vec<String> = comp.groups.iter().map(|g| g.run.artifact.clone()).collect();
        Ok(TaskDone {
            result: serde_json::to_value(artifacts).unwrap_or_default(),
            composition: Some(comp),
            canceled: false,
        })
    }

    async fn do_run(
        &self,
        task: &Task,
        input: &StoredInput,
        log: &mut LogWriter,
        cancel: &CancellationToken,
        timeout: Duration,
    ) -> Result<TaskDone, String> {
        let comp = tokio::select! {
            r = self.build_groups(task, input, log, cancel) => r?,
            _ = tokio::time::sleep(timeout) => {
                cancel.cancel();
                return Err(format!("build canceled after reaching the task timeout ({}s)", timeout.as_secs()));
            }
        };
        if cancel.is_cancelled() {
            log.line(&log_line("WARN", "run canceled"));
            return Ok(TaskDone {
                result: serde_json::Value::Null,
                composition: Some(comp),
                canceled: true,
            });
        }
        let req = &input.request;
        let run_id = req
            .run_ids
            .first()
            .cloned()
            .or_else(|| comp.runs.first().map(|r| r.id.clone()))
            .unwrap_or_else(|| "default".into());
        let resolved = tg_plan::resolve_run(
            &comp,
            &req.manifest,
            &run_id,
            &self.inner.cfg.runners_json(),
        )
        .map_err(|e| e.to_string())?;
        let groups = resolved
            .groups
            .iter()
            .map(|g| {
                let artifact = comp
                    .groups
                    .get(g.group_index)
                    .map(|cg| cg.run.artifact.clone())
                    .filter(|a| !a.is_empty())
                    .unwrap_or_else(|| g.artifact.clone());
                tg_runner::RunGroup {
                    id: g.id.clone(),
                    instances: g.instances,
                    artifact,
                    params: g.test_params.clone(),
                    profiles: g.profiles.clone(),
                }
            })
            .collect::<Vec<_>>();
        if let Some(g) = groups.iter().find(|g| g.artifact.is_empty()) {
            return Err(format!("group {} has no artifact to run", g.id));
        }
        let run_input = tg_runner::RunInput {
            run_id: task.id.clone(),
            plan: resolved.plan.clone(),
            case: resolved.case.clone(),
            runner: resolved.runner.clone(),
            total_instances: resolved.total_instances,
            groups,
            run_config: resolved.run_config.clone(),
            outputs_root: self.inner.home.outputs_dir(),
            sync_host: self.inner.sync.host.clone(),
            sync_port: self.inner.sync.port,
            disable_metrics: resolved.disable_metrics,
            timeout,
            sync_service: Some(self.inner.sync.service.clone()),
        };
        log.line(&log_line(
            "INFO",
            &format!(
                "starting run\t{{\"run_id\": {:?}, \"plan\": {:?}, \"case\": {:?}, \"runner\": {:?}, \"instances\": {}}}",
                task.id, resolved.plan, resolved.case, resolved.runner, resolved.total_instances
            ),
        ));
        // Lifecycle events instances publish to the run's `run_events` topic count towards the
        // outcome together with what they print.
        let prefix = format!(
            "run:{}:plan:{}:case:{}",
            task.id, resolved.plan, resolved.case
        );
        let mut sub = self.inner.sync.service.subscribe_events(&prefix);
        let (sync_tx, sync_rx) = mpsc::unbounded_channel();
        let forward = tokio::spawn(async move {
            while let Some(item) = sub.next_item().await {
                match serde_json::from_str::<tg_api::events::Event>(item.raw().get()) {
                    Ok(ev) => {
                        if sync_tx.send(ev).is_err() {
                            break;
                        }
                    }
                    Err(e) => tracing::debug!("ignoring undecodable run event: {e}"),
                }
            }
        });
        let (tx, mut rx) = mpsc::unbounded_channel();
        let run = tg_runner::run_with_sync_events(run_input, tx, cancel.clone(), sync_rx);
        tokio::pin!(run);
        let result = loop {
            tokio::select! {
                r = &mut run => break r,
                Some(ev) = rx.recv() => render_event(log, ev),
            }
        };
        while let Ok(ev) = rx.try_recv() {
            render_event(log, ev);
        }
        forward.abort();
        // The run is over: its states and topics are no longer needed.
        if let Err(e) = self.inner.sync.service.drop_run(&task.id).await {
            tracing::warn!("cannot drop sync state of run {}: {e}", task.id);
        }
        match result {
            Ok(out) => {
                let canceled = out.result.outcome == Outcome::Canceled;
                if canceled {
                    log.line(&log_line("WARN", "run canceled"));
                } else {
                    log.line(&log_line(
                        "INFO",
                        &format!(
                            "run finished with {}\t{{\"run_id\": {:?}, \"plan\": {:?}, \"case\": {:?}, \"runner\": {:?}, \"instances\": {}}}",
                            out.result,
                            task.id,
                            resolved.plan,
                            resolved.case,
                            resolved.runner,
                            resolved.total_instances
                        ),
                    ));
                }
                Ok(TaskDone {
                    result: serde_json::to_value(&out.result).unwrap_or_default(),
                    composition: Some(comp),
                    canceled,
                })
            }
            Err(e) => Err(format!("run failed: {e}")),
        }
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
                    None => engine
                        .inner
                        .store
                        .get(&id)
                        .ok()
                        .flatten()
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
        let removed = {
            let mut q = lock(&self.inner.queue);
            let before = q.0.len();
            q.0.retain(|e| e.id != task_id);
            before != q.0.len()
        };
        let Ok(Some(mut task)) = self.inner.store.get(task_id) else {
            return false;
        };
        if task.state().is_final() {
            return false;
        }
        if removed || task.state() == TaskState::Scheduled {
            let owner = self.inner.store.owner(task_id).unwrap_or(0);
            if removed || owner == 0 || owner == std::process::id() || !process_alive(owner) {
                task.error = "canceled before it started".into();
                push_state(&mut task, TaskState::Canceled);
                return self.inner.store.put(&task, 0).is_ok();
            }
        }
        // Running in another process (an embedded CLI): ask that process to cancel it, the
        // way Ctrl-C would.
        let owner = self.inner.store.owner(task_id).unwrap_or(0);
        owner != 0 && owner != std::process::id() && signal_owner(owner)
    }

    pub fn status(&self, task_id: &str) -> Result<Task, EngineError> {
        self.inner
            .store
            .get(task_id)?
            .ok_or_else(|| EngineError::NoSuchTask(task_id.to_owned()))
    }

    pub fn tasks(&self, f: &TasksFilters) -> Result<Vec<Task>, EngineError> {
        Ok(self.inner.store.list(f)?)
    }

    /// Cancels every task using the runner or builder named in the request.
    pub fn terminate(&self, req: &TerminateRequest) -> Result<(), EngineError> {
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
        Ok(())
    }

    /// The outputs of a run as a `.tgz` (`<run_id>/<group>/<index>/<file>`), or None.
    pub fn collect(&self, run_id: &str) -> Result<Option<Vec<u8>>, EngineError> {
        let runners: Vec<String> = match self.inner.store.get(run_id)? {
            Some(t) if !t.runner.is_empty() => vec![t.runner],
            _ => tg_runner::RUNNERS.iter().map(|r| r.to_string()).collect(),
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

    pub fn healthcheck(&self, runner: &str, fix: bool) -> Result<HealthcheckReport, EngineError> {
        if tg_runner::compatible_builders(runner).is_none() {
            return Err(EngineError::UnknownRunner {
                runner: runner.to_owned(),
                supported: tg_runner::RUNNERS.join(", "),
            });
        }
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
        if runner == "local:netns" {
            for (name, ok, message) in tg_runner::netns_health() {
                report.checks.push(HealthcheckItem {
                    name: name.into(),
                    status: if ok { "ok" } else { "failed" }.into(),
                    message,
                });
            }
        }
        Ok(report)
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
    let service = tg_sync::SyncService::spawn();
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

fn render_event(log: &mut LogWriter, ev: tg_runner::RunnerEvent) {
    match ev {
        tg_runner::RunnerEvent::Log(s) => log.line(&log_line("INFO", &s)),
        tg_runner::RunnerEvent::Started { started, total } => log.line(&log_line(
            "INFO",
            &format!("started {started}/{total} instances"),
        )),
        tg_runner::RunnerEvent::Instance(line) => log.line(&log_line("INFO", &line.render())),
    }
}

/// A daemon log line in the original's console format: `Jan  6 08:15:50.651158\tINFO\t<msg>`.
pub fn log_line(level: &str, msg: &str) -> String {
    format!(
        "{}\t{level}\t{msg}",
        Utc::now().format("%b %e %H:%M:%S%.6f")
    )
}

fn push_state(task: &mut Task, state: TaskState) {
    task.states.push(DatedState {
        created: Utc::now(),
        state,
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Sends SIGTERM to an embedded `testground` process so it cancels its task. Checks the
/// command line first so a recycled pid is never signalled.
fn signal_owner(pid: u32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let is_ours = cmdline
        .split(|b| *b == 0)
        .next()
        .map(|argv0| String::from_utf8_lossy(argv0).ends_with("testground"))
        .unwrap_or(false);
    if !is_ours {
        return false;
    }
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .is_ok()
}
