//! Writing this instance's points to InfluxDB 1.x, as sdk-go does when `INFLUXDB_URL` is set
//! and metrics are not disabled.
//!
//! Metric calls and events only queue an encoded point (bounded; a full queue drops the point
//! and counts it): the plan never waits for InfluxDB. A writer task on the SDK's runtime sends
//! what is queued in batches to `<url>/write?db=testground&precision=ns`. The first failure is
//! reported once as a message event (`influxdb: failed to upload ...`, sdk-go's wording) and
//! ends uploading for this instance, so a dead endpoint costs the instance one timeout at most;
//! the case's outcome never depends on it. Points are encoded by [`tg_api::metrics`], the same
//! code the engine uses to export the files after the run, so that both writes of a point are
//! identical and InfluxDB keeps one.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tg_api::metrics::{INFLUX_DB, MetricLine, MetricSet, PointTags};
use tokio::sync::mpsc;

use crate::runenv::RunEnv;

/// Points waiting for the writer; beyond this, new ones are dropped.
const QUEUE: usize = 65_536;
/// Points per request.
const BATCH: usize = 5000;
/// How long the end of the case waits for queued points to be written.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where this instance's points go, and the tags they carry.
pub(crate) struct InfluxSink {
    url: String,
    plan: String,
    case: String,
    run: String,
    group: String,
    tx: Mutex<Option<mpsc::Sender<String>>>,
    rx: Mutex<Option<mpsc::Receiver<String>>>,
    dropped: AtomicU64,
}

impl InfluxSink {
    pub(crate) fn new(url: &str, plan: &str, case: &str, run: &str, group: &str) -> InfluxSink {
        let (tx, rx) = mpsc::channel(QUEUE);
        InfluxSink {
            url: url.trim_end_matches('/').to_string(),
            plan: plan.into(),
            case: case.into(),
            run: run.into(),
            group: group.into(),
            tx: Mutex::new(Some(tx)),
            rx: Mutex::new(Some(rx)),
            dropped: AtomicU64::new(0),
        }
    }

    fn tags(&self) -> PointTags<'_> {
        PointTags {
            run: &self.run,
            group_id: &self.group,
        }
    }

    /// Queues one metric line of `set`.
    pub(crate) fn metric(&self, set: MetricSet, line: &MetricLine) {
        if let Some(p) = line.line_protocol(set, &self.plan, &self.case, self.tags()) {
            self.queue(p);
        }
    }

    /// Queues a lifecycle event point (`event_type` in sdk-go's naming).
    pub(crate) fn event(&self, event_type: &str, ts: i64) {
        self.queue(tg_api::metrics::event_line_protocol(
            self.tags(),
            event_type,
            ts,
        ));
    }

    fn queue(&self, point: String) {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let sent = guard.as_ref().is_some_and(|tx| tx.try_send(point).is_ok());
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// No more points: the writer ends once it has sent what is queued.
    pub(crate) fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// The writer; `None` if it was already taken. Spawn it on the SDK's runtime.
    pub(crate) fn writer(&self, env: RunEnv) -> Option<impl Future<Output = ()> + use<>> {
        let rx = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        let url = format!("{}/write?db={INFLUX_DB}&precision=ns", self.url);
        Some(write_loop(url, rx, env))
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

async fn write_loop(url: String, mut rx: mpsc::Receiver<String>, env: RunEnv) {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(CLOSE_TIMEOUT)
        .build()
        .unwrap_or_default();
    let mut failed = false;
    while let Some(first) = rx.recv().await {
        let mut body = first;
        body.push('\n');
        let mut n = 1usize;
        while n < BATCH {
            let Ok(p) = rx.try_recv() else { break };
            body.push_str(&p);
            body.push('\n');
            n += 1;
        }
        if failed {
            continue;
        }
        if let Err(e) = post(&client, &url, body).await {
            env.record_message(format!("influxdb: failed to upload {n} points; {e}"));
            failed = true;
        }
    }
    let dropped = env.influx_dropped();
    if dropped > 0 && !failed {
        env.record_message(format!(
            "influxdb: dropped {dropped} points (queue full or closed)"
        ));
    }
}

async fn post(client: &reqwest::Client, url: &str, body: String) -> Result<(), String> {
    let res = client
        .post(url)
        .body(body)
        .send()
        .await
        .map_err(|e| error_chain(&e))?;
    if res.status().is_success() {
        return Ok(());
    }
    let status = res.status();
    let mut text = res.text().await.unwrap_or_default();
    text.truncate(300);
    Err(format!("{status}: {}", text.trim()))
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
