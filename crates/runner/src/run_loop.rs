//! The one run loop every runner shares: prepares outputs and temp dirs, asks its launcher for
//! the run's environment and each instance, feeds the supervisor, enforces the run timeout and
//! cancellation, and builds the result. What differs between runners is behind
//! [`Launcher`](crate::launch::Launcher).

use std::collections::{HashMap, VecDeque};

use tg_api::task::{Outcome, RunResult};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::env::GroupEnv;
use crate::instance::InstanceTask;
use crate::launch::{InstanceSpec, LaunchContext, Launcher};
use crate::outputs::is_plain_component;
use crate::start_pace::{self, StartPace};
use crate::supervisor::{Exit, InstanceReport, OutcomeRule, StopReason, Supervisor, Termination};
use crate::{RunContext, RunError, RunOutput, RunnerEvent, outputs_dir};

/// Reports in flight between instance tasks and the supervisor. Bounded so that a flood of
/// output slows the instances (their pipes fill) instead of growing memory.
const REPORT_QUEUE: usize = 4096;

fn create_dir(path: &std::path::Path) -> Result<(), RunError> {
    std::fs::create_dir_all(path).map_err(RunError::io("create", path))
}

/// Sends what the supervisor produced; waits for room, so that a slow reader of the run's
/// events slows the run down instead of growing memory.
async fn flush(sup: &mut Supervisor, events: &mpsc::Sender<RunnerEvent>) {
    let pending: Vec<RunnerEvent> = sup.drain().collect();
    for e in pending {
        // A closed receiver means nobody listens any more; the run itself goes on.
        let _ = events.send(e).await;
    }
}

pub(crate) async fn run_loop<L: Launcher>(
    mut launcher: L,
    ctx: RunContext,
    rule: OutcomeRule,
) -> Result<RunOutput, RunError> {
    let RunContext {
        input,
        config,
        events,
        cancel,
        mut sync_events,
    } = ctx;
    let timeout = config.effective_timeout(input.timeout);
    let start = Instant::now();
    let deadline = timeout.map(|t| start + t);
    let start_time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);

    // These become path components of the outputs; none may climb out of the outputs root.
    let names = [("plan", &input.plan), ("run id", &input.run_id)];
    for (what, name) in names
        .into_iter()
        .chain(input.groups.iter().map(|g| ("group id", &g.id)))
    {
        if !is_plain_component(name) {
            return Err(RunError::InvalidConfig {
                key: what.to_string(),
                value: name.clone(),
                reason: "must be a single path component".to_string(),
            });
        }
    }
    for key in &config.ignored {
        let _ = events
            .send(RunnerEvent::Log(format!(
                "run configuration key {key:?} is not used by {}; ignored",
                input.runner
            )))
            .await;
    }

    let run_dir = outputs_dir(
        &input.outputs_root,
        &input.runner,
        &input.plan,
        &input.run_id,
    );
    create_dir(&run_dir)?;
    // 0700: other users cannot look into instances' scratch space.
    let temp_root = tempfile::Builder::new()
        .prefix(&format!("tg-{}-", input.run_id))
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .map_err(RunError::io("create a temp dir in", std::env::temp_dir()))?;

    let total: u32 = input.groups.iter().map(|g| g.instances).sum();
    let mut sup = Supervisor::new(&input.groups, rule);
    let (report_tx, mut reports) = mpsc::channel::<InstanceReport>(REPORT_QUEUE);
    let (stop_tx, _) = watch::channel::<Option<StopReason>>(None);
    let launch_ctx = LaunchContext {
        events: events.clone(),
        reports: report_tx.clone(),
        temp_root: temp_root.path().to_path_buf(),
    };

    // Everything below ends in teardown, whatever happens.
    let net_env = match launcher.start(&launch_ctx).await {
        Ok(n) => n,
        Err(e) => {
            launcher.teardown().await;
            return Err(e);
        }
    };

    // In a JoinSet so that it is aborted with the run, however the run ends.
    let mut forwarder = JoinSet::new();
    let forward_tx = report_tx.clone();
    forwarder.spawn(async move {
        while let Some(ev) = sync_events.recv().await {
            if forward_tx.send(InstanceReport::Sync(ev)).await.is_err() {
                break;
            }
        }
    });

    let _ = events
        .send(RunnerEvent::Log(format!(
            "starting {total} instances of {}:{} (run {})",
            input.plan, input.case, input.run_id
        )))
        .await;

    // Every instance's description, then their surroundings (many at a time where the
    // launcher can), then the processes one after the other.
    let mut specs = VecDeque::with_capacity(total as usize);
    let mut spawn_error = None;
    'specs: for group in &input.groups {
        let env = GroupEnv::new(&input, &config, group, total, &start_time, &net_env);
        for index in 0..group.instances {
            let outputs = run_dir.join(&group.id).join(index.to_string());
            let temp = temp_root.path().join(&group.id).join(index.to_string());
            if let Err(e) = create_dir(&outputs).and_then(|()| create_dir(&temp)) {
                spawn_error = Some(e);
                break 'specs;
            }
            specs.push_back(InstanceSpec {
                ordinal: specs.len(),
                group_id: group.id.clone(),
                index,
                artifact: group.artifact.clone(),
                hostname: env.hostname(index),
                env: env.instance(index, &outputs, &temp).collect(),
                outputs,
                temp,
            });
        }
    }
    if spawn_error.is_none() {
        let prepared = tokio::select! {
            r = launcher.prepare(specs.make_contiguous()) => r,
            _ = cancel.cancelled() => Ok(()),
            _ = async { tokio::time::sleep_until(deadline.unwrap_or(start)).await },
                if deadline.is_some() => Ok(()),
        };
        if let Err(e) = prepared {
            spawn_error = Some(e);
        }
    }

    // Instance tasks; their ordinal by task id, to notice one that died without reporting.
    let mut tasks = JoinSet::new();
    let mut ordinals = HashMap::new();
    let mut started: u32 = 0;
    let step = (total / 20).max(1);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_cpu = config.start_pace.per_cpu();
    let mut pace = per_cpu.filter(|_| launcher.paced_start()).map(|per_cpu| {
        StartPace::new(
            per_cpu,
            u32::try_from(cpus).unwrap_or(u32::MAX),
            total,
            Instant::now(),
        )
    });

    while spawn_error.is_none()
        && let Some(spec) = specs.pop_front()
    {
        if let Some(p) = &mut pace {
            while p.should_wait(tg_sync::pace::runnable_tasks(), Instant::now()) {
                tokio::select! {
                    _ = tokio::time::sleep(start_pace::STEP) => {}
                    _ = cancel.cancelled() => break,
                    _ = async { tokio::time::sleep_until(deadline.unwrap_or(start)).await },
                        if deadline.is_some() => break,
                }
                // The instances already started keep reporting meanwhile.
                while let Ok(r) = reports.try_recv() {
                    sup.handle(r);
                }
                flush(&mut sup, &events).await;
            }
        }
        if cancel.is_cancelled() || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let instance = match launcher.launch(&spec).await {
            Ok(i) => i,
            Err(e) => {
                spawn_error = Some(e);
                break;
            }
        };
        let task = InstanceTask {
            ordinal: spec.ordinal,
            instance,
            outputs: spec.outputs,
            start,
            reports: report_tx.clone(),
            stop: stop_tx.subscribe(),
        };
        let handle = tasks.spawn(task.run());
        ordinals.insert(handle.id(), spec.ordinal);
        started += 1;
        if started.is_multiple_of(step) || started == total {
            let _ = events.send(RunnerEvent::Started { started, total }).await;
        }
        // Keep lines flowing (and the instances' pipes from filling) during a long start.
        while let Ok(r) = reports.try_recv() {
            sup.handle(r);
        }
        flush(&mut sup, &events).await;
        tokio::task::yield_now().await;
    }
    drop(specs);
    drop(report_tx);
    if let Some(line) = pace.as_ref().and_then(StartPace::summary) {
        let _ = events.send(RunnerEvent::Log(line)).await;
    }

    let mut stopping: Option<StopReason> = None;
    if let Some(e) = &spawn_error {
        let _ = events
            .send(RunnerEvent::Log(format!(
                "stopping the run: {e}; killing the {started} started instances"
            )))
            .await;
        stopping = Some(StopReason::Canceled);
        stop_tx.send_replace(stopping);
    }

    let mut timed_out = false;
    let mut canceled = false;
    // Fired while starting: the loop below may have nothing left to wait for.
    if stopping.is_none() && cancel.is_cancelled() {
        canceled = true;
        stopping = Some(StopReason::Canceled);
        stop_tx.send_replace(stopping);
    } else if stopping.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
        timed_out = true;
        stopping = Some(StopReason::Timeout);
        let _ = events
            .send(RunnerEvent::Log(
                "run canceled after reaching the task timeout".to_string(),
            ))
            .await;
        stop_tx.send_replace(stopping);
    }
    while sup.exited() < started as usize {
        tokio::select! {
            Some(report) = reports.recv() => sup.handle(report),
            _ = async { tokio::time::sleep_until(deadline.unwrap_or(start)).await },
                if deadline.is_some() && stopping.is_none() =>
            {
                timed_out = true;
                stopping = Some(StopReason::Timeout);
                let _ = events.send(RunnerEvent::Log(
                    "run canceled after reaching the task timeout".to_string(),
                )).await;
                stop_tx.send_replace(Some(StopReason::Timeout));
            }
            _ = cancel.cancelled(), if stopping.is_none() => {
                canceled = true;
                stopping = Some(StopReason::Canceled);
                let _ = events.send(RunnerEvent::Log(
                    "run canceled; killing its instances".to_string(),
                )).await;
                stop_tx.send_replace(Some(StopReason::Canceled));
            }
            Some(joined) = tasks.join_next_with_id() => {
                // Only a panicked task ends without its Exited report.
                if let Err(e) = joined
                    && let Some(&ordinal) = ordinals.get(&e.id())
                    && !sup.has_exited(ordinal)
                {
                    sup.handle(InstanceReport::Exited {
                        instance: ordinal,
                        elapsed: start.elapsed(),
                        exit: Exit {
                            termination: Termination::Unknown,
                            stopped: stopping,
                        },
                    });
                }
            }
            // Unreachable while every started task reports; never spin or panic if not.
            else => break,
        }
        flush(&mut sup, &events).await;
    }
    forwarder.abort_all();
    // Late sync events published just before the last exit; the launcher's own findings.
    drop(launch_ctx);
    while let Ok(r) = reports.try_recv() {
        sup.handle(r);
    }

    for line in launcher.teardown().await {
        let _ = events.send(RunnerEvent::Log(line)).await;
    }

    let elapsed = start.elapsed();
    let outcomes = sup.finish(elapsed);
    flush(&mut sup, &events).await;
    // Thousands of instance dirs take seconds to remove: the outcome does not wait for that.
    // (A tracked run's record names this dir, so a process that exits first leaves it to the
    // next engine start.)
    let temp_root = temp_root.keep();
    crate::cleanup::defer(move || {
        if let Err(e) = std::fs::remove_dir_all(&temp_root)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, dir = %temp_root.display(), "cannot remove the run's temp dir");
        }
    });
    if let Some(e) = spawn_error {
        return Err(e);
    }

    let mut result = RunResult::from_outcomes(outcomes);
    if canceled {
        result.outcome = Outcome::Canceled;
    } else if timed_out || (started < total) {
        result.outcome = Outcome::Failure;
    }
    Ok(RunOutput {
        result,
        outputs_dir: run_dir,
    })
}

#[cfg(test)]
mod tests {
    //! The loop driven by a fake launcher on a paused clock: timeouts and grace periods are
    //! exact, and no test sleeps.

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tg_api::task::{GroupOutcome, Outcome};
    use tokio::io::{AsyncWriteExt, DuplexStream};
    use tokio::sync::{mpsc, watch};
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::instance::TERM_GRACE;
    use crate::launch::{Launched, NetEnv, Stop};
    use crate::{LineKind, RunConfig, RunGroup, RunInput};

    /// What a fake instance does.
    #[derive(Debug, Clone, Copy)]
    enum Script {
        /// Prints a success event after this long, then exits 0.
        OkAfter(Duration),
        /// Never ends on its own and ignores SIGTERM.
        Hang,
    }

    #[derive(Debug, Default)]
    struct Log {
        launched: Vec<usize>,
        stops: Vec<(usize, Stop, Duration)>,
        teardowns: u32,
        temp_root_mode: u32,
        temp_root: Option<std::path::PathBuf>,
    }

    struct Fake {
        scripts: Vec<Script>,
        fail_launch_at: Option<usize>,
        paced: bool,
        log: Arc<Mutex<Log>>,
        t0: Instant,
    }

    struct FakeInstance {
        ordinal: usize,
        out: Option<DuplexStream>,
        exit: watch::Receiver<Option<Termination>>,
        kill: watch::Sender<Option<Termination>>,
        log: Arc<Mutex<Log>>,
        t0: Instant,
    }

    impl Launcher for Fake {
        type Instance = FakeInstance;

        fn paced_start(&self) -> bool {
            self.paced
        }

        async fn start(&mut self, ctx: &LaunchContext) -> Result<NetEnv, RunError> {
            use std::os::unix::fs::PermissionsExt;
            self.log.lock().unwrap().temp_root = Some(ctx.temp_root.clone());
            self.log.lock().unwrap().temp_root_mode = std::fs::metadata(&ctx.temp_root)
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            Ok(NetEnv {
                sidecar: false,
                subnet: "127.1.0.0/16".into(),
                sync_host: "127.0.0.1".into(),
                sync_port: 1,
            })
        }

        async fn prepare(&mut self, _specs: &[InstanceSpec]) -> Result<(), RunError> {
            Ok(())
        }

        async fn launch(&mut self, spec: &InstanceSpec) -> Result<FakeInstance, RunError> {
            if self.fail_launch_at == Some(spec.ordinal) {
                return Err(RunError::Spawn {
                    group: spec.group_id.clone(),
                    index: spec.index,
                    path: "fake".into(),
                    source: std::io::Error::other("refused by the test"),
                });
            }
            self.log.lock().unwrap().launched.push(spec.ordinal);
            let (reader, mut writer) = tokio::io::duplex(1024);
            let (kill, exit) = watch::channel(None);
            let script = self.scripts[spec.ordinal];
            let done = kill.clone();
            tokio::spawn(async move {
                match script {
                    Script::OkAfter(d) => {
                        tokio::time::sleep(d).await;
                        let _ = writer
                            .write_all(
                                b"{\"ts\":1,\"event\":{\"success_event\":{\"group\":\"g\"}}}\n",
                            )
                            .await;
                        drop(writer);
                        done.send_if_modified(|e| {
                            e.get_or_insert(Termination::Code(0));
                            true
                        });
                    }
                    Script::Hang => {
                        // Holds its stdout until killed.
                        let mut rx = done.subscribe();
                        let _ = rx.wait_for(|e| e.is_some()).await;
                        drop(writer);
                    }
                }
            });
            Ok(FakeInstance {
                ordinal: spec.ordinal,
                out: Some(reader),
                exit,
                kill,
                log: self.log.clone(),
                t0: self.t0,
            })
        }

        async fn teardown(self) -> Vec<String> {
            self.log.lock().unwrap().teardowns += 1;
            Vec::new()
        }
    }

    impl Launched for FakeInstance {
        type Pipe = DuplexStream;

        fn take_stdout(&mut self) -> Option<DuplexStream> {
            self.out.take()
        }

        fn take_stderr(&mut self) -> Option<DuplexStream> {
            None
        }

        async fn wait(&mut self) -> Termination {
            match self.exit.wait_for(|e| e.is_some()).await {
                Ok(e) => e.unwrap_or(Termination::Unknown),
                Err(_) => Termination::Unknown,
            }
        }

        fn stop(&mut self, how: Stop) {
            let already = self.exit.borrow().is_some();
            if !already {
                self.log
                    .lock()
                    .unwrap()
                    .stops
                    .push((self.ordinal, how, self.t0.elapsed()));
            }
            if how == Stop::Kill {
                self.kill.send_if_modified(|e| {
                    if e.is_none() {
                        *e = Some(Termination::Signal(9));
                        true
                    } else {
                        false
                    }
                });
            }
        }
    }

    struct Harness {
        dir: tempfile::TempDir,
        log: Arc<Mutex<Log>>,
        /// A launcher whose start is paced, with this run config.
        paced: Option<crate::StartPaceSetting>,
    }

    impl Harness {
        fn new() -> Self {
            Harness {
                dir: tempfile::tempdir().unwrap(),
                log: Arc::default(),
                paced: None,
            }
        }

        async fn run(
            &self,
            scripts: Vec<Script>,
            timeout: Duration,
            cancel: CancellationToken,
            fail_launch_at: Option<usize>,
        ) -> (Result<RunOutput, RunError>, Vec<RunnerEvent>) {
            let input = RunInput {
                run_id: "fake".into(),
                plan: "p".into(),
                case: "c".into(),
                runner: "fake".into(),
                total_instances: scripts.len() as u32,
                groups: vec![RunGroup {
                    id: "g".into(),
                    instances: scripts.len() as u32,
                    artifact: "fake".into(),
                    params: BTreeMap::new(),
                    profiles: BTreeMap::new(),
                }],
                run_config: Default::default(),
                outputs_root: self.dir.path().join("outputs"),
                sync_host: "127.0.0.1".into(),
                sync_port: 1,
                disable_metrics: true,
                timeout,
                sync_service: None,
            };
            let launcher = Fake {
                scripts,
                fail_launch_at,
                paced: self.paced.is_some(),
                log: self.log.clone(),
                t0: Instant::now(),
            };
            let (tx, mut rx) = mpsc::channel(8);
            let (_sync_tx, sync_rx) = mpsc::channel(1);
            let ctx = RunContext {
                input,
                config: RunConfig {
                    start_pace: self.paced.unwrap_or_default(),
                    ..RunConfig::default()
                },
                events: tx,
                cancel,
                sync_events: sync_rx,
            };
            let collect = async move {
                let mut v = Vec::new();
                while let Some(e) = rx.recv().await {
                    v.push(e);
                }
                v
            };
            let run = run_loop(launcher, ctx, OutcomeRule::Stdout);
            tokio::join!(run, collect)
        }
    }

    fn kinds(events: &[RunnerEvent]) -> Vec<(u32, LineKind)> {
        let mut v: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                RunnerEvent::Instance(l) => Some((l.index, l.kind)),
                _ => None,
            })
            .collect();
        v.sort_by_key(|(i, _)| *i);
        v
    }

    /// Keeps the host's runnable count above `n` until dropped.
    struct Busy(
        Arc<std::sync::atomic::AtomicBool>,
        Vec<std::thread::JoinHandle<()>>,
    );

    impl Busy {
        fn over(n: usize) -> Busy {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let threads = (0..n + 4)
                .map(|_| {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            std::hint::spin_loop();
                        }
                    })
                })
                .collect();
            Busy(stop, threads)
        }
    }

    impl Drop for Busy {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            for t in self.1.drain(..) {
                let _ = t.join();
            }
        }
    }

    fn logs(events: &[RunnerEvent]) -> Vec<&str> {
        events
            .iter()
            .filter_map(|e| match e {
                RunnerEvent::Log(l) => Some(l.as_str()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn an_overcommitted_host_paces_the_start_unless_turned_off() {
        use crate::StartPaceSetting;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        // One runnable task per CPU is the limit; the spinning threads stay over it.
        let _busy = Busy::over(cpus);
        let run = |paced| async move {
            let mut h = Harness::new();
            h.paced = Some(paced);
            let (out, events) = h
                .run(
                    vec![Script::OkAfter(Duration::from_millis(5)); 3],
                    Duration::from_secs(60),
                    CancellationToken::new(),
                    None,
                )
                .await;
            assert_eq!(out.unwrap().result.outcome, Outcome::Success);
            assert_eq!(h.log.lock().unwrap().launched, vec![0, 1, 2]);
            logs(&events)
                .into_iter()
                .filter(|l| l.contains("the start waited"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        // Paced: each instance waits its longest (1 s) for a host that never calms down, and
        // the run log says so.
        let said = run(StartPaceSetting::PerCpu(1)).await;
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].contains("waited 3.0 s in all, before 3 instance(s)")
                && said[0].contains(&format!("more than {cpus} runnable tasks")),
            "{said:?}"
        );
        // Off, or a limit the host is under: no wait, nothing said.
        assert_eq!(run(StartPaceSetting::Off).await, Vec::<String>::new());
        assert_eq!(
            run(StartPaceSetting::PerCpu(1_000_000)).await,
            Vec::<String>::new()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_terms_then_kills_at_exact_times() {
        let h = Harness::new();
        let scripts = vec![
            Script::OkAfter(Duration::from_secs(1)),
            Script::Hang,
            Script::OkAfter(Duration::from_secs(3)),
        ];
        let (out, events) = h
            .run(
                scripts,
                Duration::from_secs(10),
                CancellationToken::new(),
                None,
            )
            .await;
        let out = out.unwrap();
        assert_eq!(out.result.outcome, Outcome::Failure);
        assert_eq!(out.result.outcomes["g"], GroupOutcome { ok: 2, total: 3 });
        assert_eq!(
            kinds(&events),
            vec![(0, LineKind::Ok), (1, LineKind::Timeout), (2, LineKind::Ok)]
        );
        let log = h.log.lock().unwrap();
        assert_eq!(log.launched, vec![0, 1, 2]);
        assert_eq!(log.temp_root_mode, 0o700, "the run's temp dir is private");
        // Only the hung instance was stopped: TERM at the deadline, KILL one grace later.
        let hung: Vec<_> = log.stops.iter().filter(|s| s.0 == 1).collect();
        assert_eq!(hung[0].1, Stop::Term);
        assert_eq!(hung[0].2, Duration::from_secs(10));
        assert_eq!(hung[1].1, Stop::Kill);
        assert_eq!(hung[1].2, Duration::from_secs(10) + TERM_GRACE);
        assert!(log.stops.iter().all(|s| s.0 == 1), "{:?}", log.stops);
        assert_eq!(log.teardowns, 1);
        // Each instance has its run.out.
        assert!(out.outputs_dir.join("g/0/run.out").is_file());
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_everything_and_tears_down_once() {
        let h = Harness::new();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            c.cancel();
        });
        let (out, events) = h
            .run(
                vec![Script::Hang, Script::OkAfter(Duration::from_secs(1))],
                Duration::from_secs(600),
                cancel,
                None,
            )
            .await;
        let out = out.unwrap();
        assert_eq!(out.result.outcome, Outcome::Canceled);
        assert_eq!(
            kinds(&events),
            vec![(0, LineKind::Killed), (1, LineKind::Ok)]
        );
        let log = h.log.lock().unwrap();
        assert_eq!(log.stops[0], (0, Stop::Term, Duration::from_secs(5)));
        assert_eq!(log.teardowns, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_launch_error_kills_the_started_and_reports_the_error() {
        let h = Harness::new();
        let (out, _) = h
            .run(
                vec![Script::Hang, Script::Hang, Script::Hang],
                Duration::from_secs(600),
                CancellationToken::new(),
                Some(1),
            )
            .await;
        assert!(matches!(out, Err(RunError::Spawn { index: 1, .. })));
        let log = h.log.lock().unwrap();
        assert_eq!(log.launched, vec![0]);
        assert_eq!(log.stops[0].0, 0);
        assert_eq!(log.teardowns, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_outcome_does_not_wait_for_the_temp_dirs() {
        let h = Harness::new();
        // Hold the cleanup thread: the run must still end, with its temp dir not yet removed.
        let gate = crate::cleanup::GATE.lock().await;
        let (out, _) = h
            .run(
                vec![Script::OkAfter(Duration::from_secs(1)); 3],
                Duration::from_secs(60),
                CancellationToken::new(),
                None,
            )
            .await;
        assert_eq!(out.unwrap().result.outcome, Outcome::Success);
        let temp = h.log.lock().unwrap().temp_root.clone().unwrap();
        assert!(temp.join("g/2").is_dir(), "cleanup ran before the outcome");
        drop(gate);
        assert!(crate::cleanup::wait_for_cleanup(Duration::from_secs(60)));
        assert!(!temp.exists(), "the temp dir is removed after the outcome");
    }

    #[tokio::test(start_paused = true)]
    async fn no_timeout_means_none() {
        let h = Harness::new();
        let (out, _) = h
            .run(
                vec![Script::OkAfter(Duration::from_secs(3600 * 24))],
                Duration::ZERO,
                CancellationToken::new(),
                None,
            )
            .await;
        assert_eq!(out.unwrap().result.outcome, Outcome::Success);
    }
}
