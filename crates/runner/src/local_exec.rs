//! The `local:exec` run loop: prepares outputs and temp dirs, starts every instance as a host
//! process in its own process group, feeds the supervisor, enforces the run timeout and
//! cancellation, and builds the result.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Once;
use std::time::Duration;

use tg_api::events::Event;
use tg_api::task::{Outcome, RunResult};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::env::GroupEnv;
use crate::instance::InstanceTask;
use crate::netns::NetEnv;
use crate::outputs::is_plain_component;
use crate::supervisor::{Exit, InstanceReport, StopReason, Supervisor, Termination};
use crate::{RunError, RunInput, RunOutput, RunnerEvent, outputs_dir};

/// Reports in flight between instance tasks and the supervisor. Bounded so that a flood of
/// output slows the instances (their pipes fill) instead of growing memory.
const REPORT_QUEUE: usize = 4096;

/// Instance networks built at a time under local:netns: past about 16 the kernel's own
/// serialisation (rtnl) dominates (measured with tg-sys's netns-scale example).
const NETNS_SETUP_CONCURRENCY: usize = 16;

/// Thousands of instances need two pipes and up to two capture files each.
fn raise_nofile_limit() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        match getrlimit(Resource::RLIMIT_NOFILE) {
            Ok((soft, hard)) if soft < hard => {
                if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                    tracing::warn!(error = %e, "cannot raise the open files limit");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the open files limit"),
        }
    });
}

/// The run timeout: `run_timeout` (humantime, e.g. `"30s"`, or integer seconds) or
/// `run_timeout_min` (integer minutes) from the run config, else `input.timeout`. Zero means
/// no timeout.
fn effective_timeout(input: &RunInput) -> Result<Option<Duration>, RunError> {
    let invalid = |key: &str, value: &serde_json::Value, reason: &str| RunError::InvalidConfig {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let timeout = if let Some(v) = input.run_config.get("run_timeout") {
        match v {
            serde_json::Value::String(s) => humantime::parse_duration(s.trim())
                .map_err(|e| invalid("run_timeout", v, &e.to_string()))?,
            serde_json::Value::Number(n) => Duration::from_secs(
                n.as_u64()
                    .ok_or_else(|| invalid("run_timeout", v, "expected a positive integer"))?,
            ),
            _ => {
                return Err(invalid(
                    "run_timeout",
                    v,
                    "expected a duration like \"30s\"",
                ));
            }
        }
    } else if let Some(v) = input.run_config.get("run_timeout_min") {
        let minutes = match v {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .ok_or_else(|| {
            invalid(
                "run_timeout_min",
                v,
                "expected an integer number of minutes",
            )
        })?;
        Duration::from_secs(minutes.saturating_mul(60))
    } else {
        input.timeout
    };
    Ok((!timeout.is_zero()).then_some(timeout))
}

fn absolute(path: &str) -> PathBuf {
    let p = Path::new(path);
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn create_dir(path: &Path) -> Result<(), RunError> {
    std::fs::create_dir_all(path).map_err(RunError::io("create", path))
}

pub(crate) async fn run(
    input: RunInput,
    events: mpsc::UnboundedSender<RunnerEvent>,
    cancel: CancellationToken,
    mut sync_events: mpsc::UnboundedReceiver<Event>,
    netns: bool,
) -> Result<RunOutput, RunError> {
    raise_nofile_limit();
    if netns {
        crate::netns::check_privileges()?;
    }
    let timeout = effective_timeout(&input)?;
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

    let run_dir = outputs_dir(
        &input.outputs_root,
        &input.runner,
        &input.plan,
        &input.run_id,
    );
    create_dir(&run_dir)?;
    let temp_root = tempfile::Builder::new()
        .prefix(&format!("tg-{}-", input.run_id))
        .tempdir()
        .map_err(RunError::io("create a temp dir in", std::env::temp_dir()))?;

    // local:netns: the run's namespaces, pump and sync endpoint, torn down below however the
    // run ends.
    let mut net = if netns {
        Some(crate::netns::create(&input, &temp_root.path().join(".net"), &events).await?)
    } else {
        None
    };
    let net_env = match &net {
        Some(n) => NetEnv::netns(n),
        None => NetEnv::exec(&input),
    };

    let total: u32 = input.groups.iter().map(|g| g.instances).sum();
    let mut sup = Supervisor::new(&input.groups, events.clone());
    let (report_tx, mut reports) = mpsc::channel::<InstanceReport>(REPORT_QUEUE);
    let (stop_tx, _) = watch::channel::<Option<StopReason>>(None);
    // What ended the run early, if anything.
    let mut stopping: Option<StopReason> = None;

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

    let _ = events.send(RunnerEvent::Log(format!(
        "starting {total} instances of {}:{} (run {})",
        input.plan, input.case, input.run_id
    )));

    // local:netns: every instance's network first, many at a time (netlink round trips and the
    // kernel's device setup overlap); the processes then start one after the other.
    let mut prepared = std::collections::VecDeque::new();
    if let Some(n) = &mut net {
        let mut specs = Vec::with_capacity(total as usize);
        for group in &input.groups {
            let env = GroupEnv::new(&input, group, total, &start_time, &net_env);
            for index in 0..group.instances {
                let outputs = run_dir.join(&group.id).join(index.to_string());
                create_dir(&outputs)?;
                specs.push(tg_sidecar::InstanceSpec {
                    ordinal: specs.len() as u32,
                    hostname: env.hostname(index),
                    outputs,
                });
            }
        }
        let setup = Instant::now();
        let count = specs.len();
        let built = tokio::select! {
            r = n.add_instances(specs, NETNS_SETUP_CONCURRENCY) => r,
            _ = cancel.cancelled() => Ok(Vec::new()),
        };
        match built {
            Ok(v) => {
                let _ = events.send(RunnerEvent::Log(format!(
                    "network: {count} instance networks ready in {:.2}s",
                    setup.elapsed().as_secs_f64()
                )));
                prepared = v.into();
            }
            Err(e) => {
                if let Some(n) = net.take() {
                    n.shutdown().await;
                }
                return Err(RunError::RunNetwork(e));
            }
        }
    }

    // Instance tasks; their ordinal by task id, to notice one that died without reporting.
    let mut tasks = JoinSet::new();
    let mut ordinals = std::collections::HashMap::new();
    let mut started: u32 = 0;
    let step = (total / 20).max(1);
    let mut spawn_error = None;

    'groups: for group in &input.groups {
        let env = GroupEnv::new(&input, group, total, &start_time, &net_env);
        let artifact = absolute(&group.artifact);
        for index in 0..group.instances {
            if cancel.is_cancelled() || deadline.is_some_and(|d| Instant::now() >= d) {
                break 'groups;
            }
            let ordinal = started as usize;
            let outputs = run_dir.join(&group.id).join(index.to_string());
            let temp = temp_root.path().join(&group.id).join(index.to_string());
            if let Err(e) = create_dir(&outputs).and_then(|()| create_dir(&temp)) {
                spawn_error = Some(e);
                break 'groups;
            }
            let mut cmd = Command::new(&artifact);
            cmd.env_clear()
                .envs(env.instance(index, &outputs, &temp))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0)
                // The leader is reaped even if its task is aborted (GroupKill kills it).
                .kill_on_drop(true);
            if net.is_some() {
                // Built above, in the same order as this loop.
                let Some(inst) = prepared.pop_front() else {
                    break 'groups;
                };
                inst.jail.apply(&mut cmd);
            }
            let child = match spawn_retrying_busy(&mut cmd).await {
                Ok(c) => c,
                Err(source) => {
                    spawn_error = Some(RunError::Spawn {
                        group: group.id.clone(),
                        index,
                        path: artifact.clone(),
                        source,
                    });
                    break 'groups;
                }
            };
            let task = InstanceTask {
                ordinal,
                child,
                outputs,
                start,
                reports: report_tx.clone(),
                stop: stop_tx.subscribe(),
            };
            let handle = tasks.spawn(task.run());
            ordinals.insert(handle.id(), ordinal);
            started += 1;
            if started.is_multiple_of(step) || started == total {
                let _ = events.send(RunnerEvent::Started { started, total });
            }
            // Keep lines flowing (and the instances' pipes from filling) during a long start.
            while let Ok(r) = reports.try_recv() {
                sup.handle(r);
            }
            tokio::task::yield_now().await;
        }
    }
    drop(report_tx);

    if let Some(e) = &spawn_error {
        let _ = events.send(RunnerEvent::Log(format!(
            "stopping the run: {e}; killing the {started} started instances"
        )));
        stopping = Some(StopReason::Canceled);
        stop_tx.send_replace(Some(StopReason::Canceled));
    }

    let mut timed_out = false;
    let mut canceled = false;
    // Fired while starting: the loop below may have nothing left to wait for.
    if stopping.is_none() && cancel.is_cancelled() {
        canceled = true;
        stopping = Some(StopReason::Canceled);
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
                ));
                stop_tx.send_replace(Some(StopReason::Timeout));
            }
            _ = cancel.cancelled(), if stopping.is_none() => {
                canceled = true;
                stopping = Some(StopReason::Canceled);
                let _ = events.send(RunnerEvent::Log(
                    "run canceled; killing its instances".to_string(),
                ));
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
    }
    forwarder.abort_all();
    // Late sync events published just before the last exit.
    while let Ok(r) = reports.try_recv() {
        sup.handle(r);
    }

    if let Some(net) = net.take()
        && let Some(stats) = net.shutdown().await
    {
        let _ = events.send(RunnerEvent::Log(format!("network: {stats}")));
    }

    let elapsed = start.elapsed();
    let outcomes = sup.finish(elapsed);
    if let Err(e) = tokio::task::spawn_blocking(move || temp_root.close()).await {
        tracing::warn!(error = %e, "cannot remove the run's temp dir");
    }
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

/// Spawns `cmd`, retrying briefly on `ETXTBSY`: a freshly built artifact can still be open
/// for writing in a child that another thread of this process forked before the builder
/// closed it (the descriptor goes away at that child's exec).
async fn spawn_retrying_busy(cmd: &mut Command) -> std::io::Result<tokio::process::Child> {
    let mut delay = std::time::Duration::from_millis(5);
    for _ in 0..8 {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(config: serde_json::Value) -> RunInput {
        RunInput {
            run_id: "r".into(),
            plan: "p".into(),
            case: "c".into(),
            runner: "local:exec".into(),
            total_instances: 0,
            groups: vec![],
            run_config: config.as_object().cloned().unwrap_or_default(),
            outputs_root: PathBuf::new(),
            sync_host: "localhost".into(),
            sync_port: 5050,
            disable_metrics: false,
            timeout: Duration::from_secs(600),
            sync_service: None,
        }
    }

    #[test]
    fn run_timeout_comes_from_config_or_input() {
        let t = |v| effective_timeout(&input(v)).unwrap();
        assert_eq!(t(serde_json::json!({})), Some(Duration::from_secs(600)));
        assert_eq!(
            t(serde_json::json!({"run_timeout": "30s"})),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            t(serde_json::json!({"run_timeout": "1m 30s"})),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            t(serde_json::json!({"run_timeout_min": 2})),
            Some(Duration::from_secs(120))
        );
        assert_eq!(t(serde_json::json!({"run_timeout": "0s"})), None);
        assert!(matches!(
            effective_timeout(&input(serde_json::json!({"run_timeout": "soon"}))),
            Err(RunError::InvalidConfig { .. })
        ));
        assert!(matches!(
            effective_timeout(&input(serde_json::json!({"run_timeout_min": -1}))),
            Err(RunError::InvalidConfig { .. })
        ));
    }
}
