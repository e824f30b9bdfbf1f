//! [`RunEnv`]: the handle a test case gets. It carries the parsed [`RunParams`], writes event
//! lines to stdout and `run.out`, owns the two metric sinks and, once a sync client is attached,
//! also publishes the terminal events to the run's `run_events` topic.

use std::fmt::Display;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tg_api::events::Event;

use tg_api::metrics::MetricSet;

use crate::influx::InfluxSink;
use crate::metrics::Metrics;
use crate::params::RunParams;
use crate::sync::SyncClient;

/// The runtime environment of a test case. Cheap to clone; clones share the output files.
///
/// Dereferences to [`RunParams`], so `runenv.test_group_id` and `runenv.int_param("n")` work.
#[derive(Clone)]
pub struct RunEnv {
    inner: Arc<Inner>,
}

struct Inner {
    params: RunParams,
    log: EventLog,
    results: Metrics,
    diagnostics: Metrics,
    influx: Option<Arc<InfluxSink>>,
    sync: OnceLock<SyncClient>,
}

impl std::fmt::Debug for RunEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunEnv")
            .field("params", &self.inner.params)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for RunEnv {
    type Target = RunParams;
    fn deref(&self) -> &RunParams {
        &self.inner.params
    }
}

impl RunEnv {
    /// Builds the environment, creating the outputs directory and opening `run.out` there when
    /// `TEST_OUTPUTS_PATH` is set. A file that cannot be opened is reported on stderr and
    /// skipped: losing a copy of the output must not stop the test.
    pub fn new(params: RunParams) -> RunEnv {
        let out_dir = (!params.test_outputs_path.is_empty())
            .then(|| PathBuf::from(&params.test_outputs_path));
        if let Some(dir) = &out_dir
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            eprintln!(
                "tg-sdk: cannot create outputs directory {}: {e}",
                dir.display()
            );
        }
        let open = |name: &str| -> Option<File> {
            let path = out_dir.as_ref()?.join(name);
            match OpenOptions::new().create(true).append(true).open(&path) {
                Ok(f) => Some(f),
                Err(e) => {
                    eprintln!("tg-sdk: cannot open {}: {e}", path.display());
                    None
                }
            }
        };
        // As sdk-go: disabled metrics mean no InfluxDB at all.
        let influx = (!params.influxdb_url.is_empty() && !params.test_disable_metrics).then(|| {
            Arc::new(InfluxSink::new(
                &params.influxdb_url,
                &params.test_plan,
                &params.test_case,
                &params.test_run,
                &params.test_group_id,
            ))
        });
        let log = EventLog {
            run_id: params.test_run.clone(),
            group_id: params.test_group_id.clone(),
            run_out: Mutex::new(open("run.out")),
            influx: influx.clone(),
        };
        let results = Metrics::new(MetricSet::Results, open("results.out"), influx.clone());
        let diagnostics = Metrics::new(
            MetricSet::Diagnostics,
            open("diagnostics.out"),
            influx.clone(),
        );
        RunEnv {
            inner: Arc::new(Inner {
                params,
                log,
                results,
                diagnostics,
                influx,
                sync: OnceLock::new(),
            }),
        }
    }

    /// The parsed environment.
    pub fn params(&self) -> &RunParams {
        &self.inner.params
    }

    /// Results metrics (`results.out`).
    pub fn r(&self) -> &Metrics {
        &self.inner.results
    }

    /// Diagnostics metrics (`diagnostics.out`).
    pub fn d(&self) -> &Metrics {
        &self.inner.diagnostics
    }

    /// Where this instance's outputs go (`TEST_OUTPUTS_PATH`, or the cwd when unset).
    pub fn test_outputs_path(&self) -> PathBuf {
        self.inner.params.outputs_dir()
    }

    /// Creates (truncating) a file named `name` in the outputs directory; the runner collects it.
    pub fn create_raw_asset(&self, name: &str) -> std::io::Result<File> {
        File::create(self.test_outputs_path().join(name))
    }

    /// From now on, success, failure and crash events are also published to `run_events`.
    /// Only the first client attached is kept.
    pub fn attach_sync_client(&self, client: SyncClient) {
        let _ = self.inner.sync.set(client);
    }

    pub(crate) fn sync_client(&self) -> Option<&SyncClient> {
        self.inner.sync.get()
    }

    /// Writes `message_event` (stdout and run.out only, never published, like sdk-go).
    pub fn record_message(&self, message: impl Display) {
        self.inner.log.write(&Event::Message {
            message: message.to_string(),
        });
    }

    /// Writes the `start_event`; [`crate::invoke`] does this first thing.
    pub fn record_start(&self) {
        self.inner.log.write(&Event::Start {
            runenv: self.inner.params.start_event_runenv(),
        });
    }

    /// Reports success. [`crate::invoke`] calls this when the case returns `Ok`.
    pub fn record_success(&self) {
        self.terminal(Event::Success {
            group: self.test_group_id.clone(),
        });
    }

    /// Reports failure with `error`. [`crate::invoke`] calls this when the case returns `Err`.
    pub fn record_failure(&self, error: impl Display) {
        self.terminal(Event::Failure {
            group: self.test_group_id.clone(),
            error: error.to_string(),
        });
    }

    /// Reports a crash. [`crate::invoke`] calls this when the case panics.
    pub fn record_crash(&self, error: impl Display, stacktrace: impl Display) {
        self.terminal(Event::Crash {
            group: self.test_group_id.clone(),
            error: error.to_string(),
            stacktrace: stacktrace.to_string(),
        });
    }

    fn terminal(&self, event: Event) {
        self.inner.log.write(&event);
        if let Some(client) = self.sync_client() {
            // Fire and forget: the client finishes detached publishes before it closes.
            if let Err(e) = client.publish_event_detached(&event) {
                eprintln!("tg-sdk: cannot publish {}: {e}", event.kind());
            }
        }
    }

    /// Flushes the aggregated metrics to results.out and diagnostics.out.
    pub fn flush_metrics(&self) {
        self.inner.results.flush();
        self.inner.diagnostics.flush();
    }

    /// The InfluxDB writer, to spawn once on the SDK's runtime; `None` without `INFLUXDB_URL`.
    pub(crate) fn influx_writer(&self) -> Option<impl Future<Output = ()> + use<>> {
        self.inner.influx.as_ref()?.writer(self.clone())
    }

    /// Ends the InfluxDB queue: the writer finishes what is queued, then returns.
    pub(crate) fn close_influx(&self) {
        if let Some(i) = &self.inner.influx {
            i.close();
        }
    }

    pub(crate) fn influx_dropped(&self) -> u64 {
        self.inner.influx.as_ref().map_or(0, |i| i.dropped())
    }
}

/// Writes event lines in sdk-go's zap format to stdout and run.out.
struct EventLog {
    run_id: String,
    group_id: String,
    run_out: Mutex<Option<File>>,
    influx: Option<Arc<InfluxSink>>,
}

impl EventLog {
    fn write(&self, event: &Event) {
        let ts = now_ns();
        let line = event_line(ts, &self.group_id, &self.run_id, event);
        // sdk-go writes start, success, failure and crash events to InfluxDB, not messages.
        if let Some(influx) = &self.influx
            && let Some(t) = tg_api::metrics::influx_event_type(event.kind())
        {
            influx.event(t, ts);
        }
        {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
        // A poisoned lock only means another thread panicked mid-write; the file is still usable.
        let mut guard = self.run_out.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = guard.as_mut() {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

/// One event line, newline included. Written by hand so that the key order is sdk-go's
/// (`ts`, `msg`, `group_id`, `run_id`, `event`) whatever serde_json features are enabled.
pub fn event_line(ts: i64, group_id: &str, run_id: &str, event: &Event) -> String {
    let json = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let event = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    format!(
        "{{\"ts\":{ts},\"msg\":\"\",\"group_id\":{},\"run_id\":{},\"event\":{event}}}\n",
        json(group_id),
        json(run_id)
    )
}

/// Unix time in nanoseconds (sdk-go's `EpochNanosTimeEncoder`).
pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_has_sdk_go_keys_in_order() {
        let line = event_line(
            7,
            "single",
            "r1",
            &Event::Success {
                group: "single".into(),
            },
        );
        assert_eq!(
            line,
            "{\"ts\":7,\"msg\":\"\",\"group_id\":\"single\",\"run_id\":\"r1\",\"event\":{\"success_event\":{\"group\":\"single\"}}}\n"
        );
        let parsed = tg_api::events::parse_event_line(&line).unwrap();
        assert_eq!(parsed.0, Some(7));
    }
}
