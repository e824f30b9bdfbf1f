//! Run tasks: build what is needed, resolve the run, hand it to its runner, and turn what the
//! runner reports into task events.

use std::collections::BTreeSet;
use std::time::Duration;

use tg_api::composition::Composition;
use tg_api::task::{Outcome, Task};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::events::{Level, RunSummary, TaskEvent, TaskEvents};
use super::influx;
use super::{Engine, StoredInput, TaskDone};

/// Events published on `run_events` waiting for the runner: a flood waits in the sync
/// service's subscription rather than here.
const SYNC_EVENT_QUEUE: usize = 1024;

/// The run id a request runs: the one it names, else the composition's first `[[runs]]`.
pub(super) fn run_id_of(req: &tg_api::rpc::TaskRequest, comp: &Composition) -> String {
    req.run_ids
        .first()
        .cloned()
        .or_else(|| comp.runs.first().map(|r| r.id.clone()))
        .unwrap_or_else(|| "default".into())
}

impl Engine {
    pub(super) async fn do_run(
        &self,
        task: &Task,
        input: &StoredInput,
        events: &mut TaskEvents,
        cancel: &CancellationToken,
        timeout: Duration,
    ) -> Result<TaskDone, String> {
        let comp = tokio::select! {
            r = self.build_groups(task, input, events, cancel) => r?,
            _ = tokio::time::sleep(timeout) => {
                cancel.cancel();
                return Err(format!("build canceled after reaching the task timeout ({}s)", timeout.as_secs()));
            }
        };
        if cancel.is_cancelled() {
            events.emit(TaskEvent::RunCanceled);
            return Ok(TaskDone {
                result: serde_json::Value::Null,
                composition: Some(comp),
                canceled: true,
            });
        }
        let req = &input.request;
        let run_id = run_id_of(req, &comp);
        let resolved = tg_plan::resolve_run(
            &comp,
            &req.manifest,
            &run_id,
            &self.inner.cfg.runners_json(),
        )
        .map_err(|e| e.to_string())?;
        let builders: Vec<&str> = comp
            .groups
            .iter()
            .map(|g| {
                if g.builder.is_empty() {
                    comp.global.builder.as_str()
                } else {
                    g.builder.as_str()
                }
            })
            .collect();
        for text in req
            .manifest
            .substitution_notices(&builders, &resolved.runner)
        {
            events.emit(TaskEvent::Log {
                level: Level::Warn,
                text,
            });
        }
        let runner = tg_runner::runner(&resolved.runner).map_err(|e| e.to_string())?;
        // Checked strictly at submission; what a manifest or .env.toml adds is only warned
        // about (by the run loop).
        let mut config = runner
            .parse_config(&resolved.run_config, &BTreeSet::new())
            .map_err(|e| e.to_string())?;
        let influx_endpoint = influx::endpoint(&self.inner.cfg);
        let instances_write_influx = influx::instance_url(
            &mut config,
            resolved.run_config.contains_key("influxdb_url"),
            &resolved.runner,
            influx_endpoint.as_deref(),
            resolved.disable_metrics,
        );
        let mut lifecycle = influx::Lifecycle::default();
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
        let summary = RunSummary {
            run_id: task.id.clone(),
            plan: resolved.plan.clone(),
            case: resolved.case.clone(),
            runner: resolved.runner.clone(),
            instances: resolved.total_instances,
        };
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
        events.emit(TaskEvent::RunStarted(summary.clone()));
        // Lifecycle events instances publish to the run's `run_events` topic count towards the
        // outcome together with what they print.
        let keys = tg_api::sync::RunKeys::new(&task.id, &resolved.plan, &resolved.case);
        let mut sub = self.inner.sync.service.subscribe_events(keys.prefix());
        let (sync_tx, sync_rx) = mpsc::channel(SYNC_EVENT_QUEUE);
        let forward = tokio::spawn(async move {
            while let Some(item) = sub.next_item().await {
                match serde_json::from_str::<tg_api::events::Event>(item.raw().get()) {
                    Ok(ev) => {
                        if sync_tx.send(ev).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => tracing::debug!("ignoring undecodable run event: {e}"),
                }
            }
        });
        let (tx, mut rx) = mpsc::channel(tg_runner::EVENT_QUEUE);
        let run = runner.run(tg_runner::RunContext {
            input: run_input,
            config,
            events: tx,
            cancel: cancel.clone(),
            sync_events: sync_rx,
        });
        tokio::pin!(run);
        let result = loop {
            tokio::select! {
                r = &mut run => break r,
                Some(ev) = rx.recv() => {
                    observe(&mut lifecycle, &ev);
                    events.emit(TaskEvent::Runner(ev));
                }
            }
        };
        while let Ok(ev) = rx.try_recv() {
            observe(&mut lifecycle, &ev);
            events.emit(TaskEvent::Runner(ev));
        }
        forward.abort();
        // The run is over: its states and topics are no longer needed.
        if let Err(e) = self.inner.sync.service.drop_run(&task.id).await {
            tracing::warn!("cannot drop sync state of run {}: {e}", task.id);
        }
        if let Some(endpoint) = influx_endpoint.filter(|_| !resolved.disable_metrics) {
            let metrics = influx::RunMetrics {
                dir: tg_runner::outputs_dir(
                    &self.inner.home.outputs_dir(),
                    &resolved.runner,
                    &resolved.plan,
                    &task.id,
                ),
                run_id: &task.id,
                plan: &resolved.plan,
                case: &resolved.case,
                events: (!instances_write_influx).then_some(&lifecycle),
            };
            export_metrics(&endpoint, &metrics, events).await;
        }
        match result {
            Ok(out) => {
                let canceled = out.result.outcome == Outcome::Canceled;
                if canceled {
                    events.emit(TaskEvent::RunCanceled);
                } else {
                    events.emit(TaskEvent::RunFinished {
                        run: summary,
                        result: out.result.clone(),
                    });
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
}

fn observe(lifecycle: &mut influx::Lifecycle, ev: &tg_runner::RunnerEvent) {
    if let tg_runner::RunnerEvent::Instance(line) = ev {
        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
        lifecycle.observe(line, now);
    }
}

/// Exports a finished run's metrics; the outcome is one line in the task log, never an error.
async fn export_metrics(endpoint: &str, metrics: &influx::RunMetrics<'_>, events: &mut TaskEvents) {
    let exporter = influx::Exporter::new(endpoint, influx::Limits::default());
    let (level, text) = match exporter.export(metrics).await {
        Ok(n) => (
            Level::Info,
            format!(
                "exported {n} metric points to InfluxDB at {} (db {})",
                exporter.endpoint(),
                tg_api::metrics::INFLUX_DB
            ),
        ),
        Err((n, e)) => (
            Level::Warn,
            format!("influxdb: metrics export failed after {n} points; the run is unaffected: {e}"),
        ),
    };
    events.emit(TaskEvent::Log { level, text });
}
