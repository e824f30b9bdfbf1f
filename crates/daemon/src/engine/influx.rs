//! Export of a run's metrics to InfluxDB 1.x, after the run, for plans in any language.
//!
//! The engine's endpoint is `[daemon] influxdb_endpoint` in `.env.toml`, else the engine
//! process's `INFLUXDB_URL` (the original's variable); empty means no export. When a run ends,
//! whatever its outcome, each instance's `results.out` and `diagnostics.out` (under the run's
//! outputs directory) are streamed, encoded as the original's points by
//! [`tg_api::metrics::MetricLine::line_protocol`] and written in batches to
//! `<endpoint>/write?db=testground&precision=ns`.
//!
//! The points are identical (measurement, tags, timestamp) to those sdk-go or our Rust SDK write
//! themselves when instances get an `INFLUXDB_URL`, so a second write of the same line replaces
//! the first instead of doubling it. Lifecycle events have no such twin (sdk-go stamps them with
//! the server's clock), so the engine writes them only for runs whose instances had no URL:
//! otherwise the SDKs own them.
//!
//! Failure costs the run nothing: every request has a timeout, the first error stops the export,
//! and the caller logs one warning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tg_api::metrics::{
    INFLUX_DB, MetricLine, MetricSet, PointTags, event_line_protocol, influx_event_type,
};
use tg_runner::{InstanceLine, LineKind};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::config::EnvConfig;

/// A line longer than this is not a metric of ours: it is skipped without being held in memory.
const MAX_LINE: u64 = 1 << 20;

/// Time and size bounds of an export.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// To open a connection: a blackholed endpoint costs at most this.
    pub connect: Duration,
    /// For one request, connection included: a server that accepts and stays silent costs at
    /// most this.
    pub request: Duration,
    /// For the whole export, however healthy and slow the server.
    pub total: Duration,
    /// Points per write request (InfluxDB recommends 5,000 to 10,000).
    pub batch_points: usize,
    /// Bytes per write request.
    pub batch_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect: Duration::from_secs(2),
            request: Duration::from_secs(5),
            total: Duration::from_secs(60),
            batch_points: 5000,
            batch_bytes: 4 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ExportError {
    #[error("cannot reach {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("gave up after {}s", .0.as_secs())]
    Deadline(Duration),
}

/// The engine's InfluxDB endpoint, without a trailing slash; `None` for no export.
pub(crate) fn endpoint(cfg: &EnvConfig) -> Option<String> {
    let configured = cfg.daemon.influxdb_endpoint.trim();
    let url = if configured.is_empty() {
        std::env::var("INFLUXDB_URL").unwrap_or_default()
    } else {
        configured.to_string()
    };
    let url = url.trim().trim_end_matches('/');
    (!url.is_empty()).then(|| url.to_string())
}

/// Decides the `INFLUXDB_URL` instances get, in `config.influxdb_url`, and returns whether they
/// got one. An explicit `influxdb_url` in the run configuration wins (empty: none). Otherwise
/// only `local:exec` gets the engine's endpoint: its instances are host processes, so the URL
/// the engine reaches they reach too, whereas the other runners' instances live in their own
/// network namespaces, where the host's loopback is another host's; the export after the run
/// covers them.
pub(crate) fn instance_url(
    config: &mut tg_runner::RunConfig,
    explicit: bool,
    runner: &str,
    endpoint: Option<&str>,
    disable_metrics: bool,
) -> bool {
    if !explicit && runner == "local:exec" && !disable_metrics {
        config.influxdb_url = endpoint.map(str::to_string);
    }
    config
        .influxdb_url
        .as_deref()
        .is_some_and(|u| !u.is_empty())
}

/// The lifecycle events of a run's instances, as the runner reported them: one per instance and
/// kind (a runner may see an event twice, on stdout and on the sync service).
#[derive(Debug, Default)]
pub(crate) struct Lifecycle {
    seen: BTreeMap<(String, u32, &'static str), i64>,
    /// The last timestamp given per (group, event type): the series key of an event point, in
    /// which two instances' events must not share a nanosecond or they would be merged.
    last: BTreeMap<(String, &'static str), i64>,
}

impl Lifecycle {
    pub(crate) fn observe(&mut self, line: &InstanceLine, now_ns: i64) {
        let key = match line.kind {
            LineKind::Start => "start_event",
            LineKind::Ok => "success_event",
            LineKind::Fail => "failure_event",
            LineKind::Crash => "crash_event",
            _ => return,
        };
        let Some(event_type) = influx_event_type(key) else {
            return;
        };
        let slot = (line.group.clone(), line.index, event_type);
        if self.seen.contains_key(&slot) {
            return;
        }
        let last = self
            .last
            .entry((line.group.clone(), event_type))
            .or_insert(i64::MIN);
        let ts = now_ns.max(last.saturating_add(1));
        *last = ts;
        self.seen.insert(slot, ts);
    }

    fn points<'a>(&'a self, run: &'a str) -> impl Iterator<Item = String> + 'a {
        self.seen.iter().map(move |((group, _, event_type), ts)| {
            event_line_protocol(
                PointTags {
                    run,
                    group_id: group,
                },
                event_type,
                *ts,
            )
        })
    }
}

/// What to export of one run.
pub(crate) struct RunMetrics<'a> {
    /// `<outputs>/<runner>/<plan>/<run>`: holds `<group>/<index>/{results,diagnostics}.out`.
    pub dir: PathBuf,
    pub run_id: &'a str,
    pub plan: &'a str,
    pub case: &'a str,
    /// Lifecycle events to write too (`None` when the SDKs wrote them).
    pub events: Option<&'a Lifecycle>,
}

/// Writes a run's points to InfluxDB.
pub(crate) struct Exporter {
    endpoint: String,
    client: reqwest::Client,
    limits: Limits,
}

impl Exporter {
    pub(crate) fn new(endpoint: &str, limits: Limits) -> Exporter {
        let client = reqwest::Client::builder()
            .connect_timeout(limits.connect)
            .timeout(limits.request)
            .build()
            .unwrap_or_default();
        Exporter {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            client,
            limits,
        }
    }

    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Exports the run; returns how many points were written. On error, the points written
    /// before it stay written.
    pub(crate) async fn export(&self, run: &RunMetrics<'_>) -> Result<u64, (u64, ExportError)> {
        let mut batch = Batch::default();
        match tokio::time::timeout(self.limits.total, self.export_inner(run, &mut batch)).await {
            Ok(Ok(())) => Ok(batch.written),
            Ok(Err(e)) => Err((batch.written, e)),
            Err(_) => Err((batch.written, ExportError::Deadline(self.limits.total))),
        }
    }

    async fn export_inner(
        &self,
        run: &RunMetrics<'_>,
        batch: &mut Batch,
    ) -> Result<(), ExportError> {
        self.create_database().await?;
        if let Some(events) = run.events {
            for p in events.points(run.run_id) {
                self.push(batch, &p).await?;
            }
        }
        for (group, index_dir) in instance_dirs(&run.dir).await? {
            let tags = PointTags {
                run: run.run_id,
                group_id: &group,
            };
            for set in MetricSet::ALL {
                let path = index_dir.join(set.file_name());
                let file = match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(ExportError::Read { path, source }),
                };
                let mut reader = BufReader::new(file);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    let n = (&mut reader)
                        .take(MAX_LINE)
                        .read_until(b'\n', &mut buf)
                        .await
                        .map_err(|source| ExportError::Read {
                            path: path.clone(),
                            source,
                        })?;
                    if n == 0 {
                        break;
                    }
                    if buf.last() != Some(&b'\n') && n as u64 == MAX_LINE {
                        skip_line(&mut reader)
                            .await
                            .map_err(|source| ExportError::Read {
                                path: path.clone(),
                                source,
                            })?;
                        continue;
                    }
                    let Some(point) = std::str::from_utf8(&buf)
                        .ok()
                        .and_then(MetricLine::parse)
                        .and_then(|m| m.line_protocol(set, run.plan, run.case, tags))
                    else {
                        continue;
                    };
                    self.push(batch, &point).await?;
                }
            }
        }
        self.flush(batch).await
    }

    async fn push(&self, batch: &mut Batch, point: &str) -> Result<(), ExportError> {
        batch.body.push_str(point);
        batch.body.push('\n');
        batch.points += 1;
        if batch.points >= self.limits.batch_points || batch.body.len() >= self.limits.batch_bytes {
            self.flush(batch).await?;
        }
        Ok(())
    }

    async fn flush(&self, batch: &mut Batch) -> Result<(), ExportError> {
        if batch.points == 0 {
            return Ok(());
        }
        let url = format!("{}/write?db={INFLUX_DB}&precision=ns", self.endpoint);
        let body = std::mem::take(&mut batch.body);
        self.post(&url, body).await?;
        batch.written += batch.points as u64;
        batch.points = 0;
        Ok(())
    }

    /// `CREATE DATABASE` is idempotent; a fresh InfluxDB then works without a set-up step. A
    /// server that refuses it (no admin rights) may still accept writes, so only an unreachable
    /// one is an error here.
    async fn create_database(&self) -> Result<(), ExportError> {
        let url = format!("{}/query", self.endpoint);
        let res = self
            .client
            .post(&url)
            .form(&[("q", format!("CREATE DATABASE {INFLUX_DB}"))])
            .send()
            .await
            .map_err(|source| ExportError::Http {
                url: url.clone(),
                source,
            })?;
        if !res.status().is_success() {
            tracing::debug!("influxdb: CREATE DATABASE answered {}", res.status());
        }
        Ok(())
    }

    async fn post(&self, url: &str, body: String) -> Result<(), ExportError> {
        let res = self
            .client
            .post(url)
            .body(body)
            .send()
            .await
            .map_err(|source| ExportError::Http {
                url: url.to_string(),
                source,
            })?;
        let status = res.status();
        if status.is_success() {
            return Ok(());
        }
        let mut body = res.text().await.unwrap_or_default();
        body.truncate(300);
        Err(ExportError::Status {
            url: url.to_string(),
            status: status.as_u16(),
            body: body.trim().to_string(),
        })
    }
}

#[derive(Default)]
struct Batch {
    body: String,
    points: usize,
    written: u64,
}

/// Discards the rest of an over-long line.
async fn skip_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<()> {
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            r.consume(i + 1);
            return Ok(());
        }
        let n = buf.len();
        r.consume(n);
    }
}

/// `(group, <dir>/<group>/<index>)` for every instance directory of a run, in order. A run that
/// left no outputs has none.
async fn instance_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>, ExportError> {
    let path = dir.to_path_buf();
    let listed = tokio::task::spawn_blocking(move || tg_runner::instance_dirs(&path)).await;
    let dirs = match listed {
        Ok(r) => r.map_err(|source| ExportError::Read {
            path: dir.to_path_buf(),
            source,
        })?,
        Err(e) => {
            return Err(ExportError::Read {
                path: dir.to_path_buf(),
                source: std::io::Error::other(e),
            });
        }
    };
    Ok(dirs.into_iter().map(|(g, _, p)| (g, p)).collect())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    fn line(kind: LineKind, group: &str, index: u32) -> InstanceLine {
        InstanceLine {
            group: group.into(),
            index,
            tag: None,
            elapsed: Duration::ZERO,
            kind,
            text: String::new(),
        }
    }

    #[test]
    fn lifecycle_counts_each_instance_event_once_with_distinct_times() {
        let mut l = Lifecycle::default();
        l.observe(&line(LineKind::Start, "g", 0), 100);
        l.observe(&line(LineKind::Start, "g", 0), 101);
        l.observe(&line(LineKind::Start, "g", 1), 100);
        l.observe(&line(LineKind::Message, "g", 1), 100);
        l.observe(&line(LineKind::Ok, "g", 1), 100);
        let mut points: Vec<String> = l.points("r").collect();
        points.sort();
        assert_eq!(
            points,
            vec![
                "events,event_type=SuccessEvent,group_id=g,run=r count=1i 100",
                "events,event_type=start_event,group_id=g,run=r count=1i 100",
                "events,event_type=start_event,group_id=g,run=r count=1i 101",
            ]
        );
    }

    #[test]
    fn instances_get_the_endpoint_only_under_local_exec_unless_explicit() {
        let mut c = tg_runner::RunConfig::default();
        assert!(instance_url(
            &mut c,
            false,
            "local:exec",
            Some("http://h:1"),
            false
        ));
        assert_eq!(c.influxdb_url.as_deref(), Some("http://h:1"));
        let mut c = tg_runner::RunConfig::default();
        assert!(!instance_url(
            &mut c,
            false,
            "local:netns",
            Some("http://h:1"),
            false
        ));
        assert!(!instance_url(
            &mut c,
            false,
            "local:exec",
            Some("http://h:1"),
            true
        ));
        // Explicitly empty: none, even under local:exec.
        assert!(!instance_url(
            &mut c,
            true,
            "local:exec",
            Some("http://h:1"),
            false
        ));
        let mut c = tg_runner::RunConfig {
            influxdb_url: Some("http://other:2".into()),
            ..Default::default()
        };
        assert!(instance_url(
            &mut c,
            true,
            "local:docker",
            Some("http://h:1"),
            false
        ));
        assert_eq!(c.influxdb_url.as_deref(), Some("http://other:2"));
    }

    fn run_dir(lines: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (group, index) in [("a", 0), ("a", 1), ("b", 0)] {
            let d = dir.path().join(group).join(index.to_string());
            std::fs::create_dir_all(&d).unwrap();
            let mut results = String::new();
            for i in 0..lines {
                results.push_str(&format!(
                    "{{\"ts\":{i},\"type\":\"point\",\"name\":\"x\",\"measures\":{{\"value\":{i}}}}}\n"
                ));
            }
            // Not metrics: skipped.
            results.push_str("garbage\n{\"ts\":1}\n");
            results.push_str(&"y".repeat(MAX_LINE as usize + 10));
            results.push('\n');
            results.push_str(
                "{\"ts\":1,\"type\":\"counter\",\"name\":\"c\",\"measures\":{\"count\":2}}",
            );
            std::fs::write(d.join("results.out"), results).unwrap();
            std::fs::write(
                d.join("diagnostics.out"),
                "{\"ts\":1,\"type\":\"counter\",\"name\":\"c\",\"measures\":{\"count\":2}}\n",
            )
            .unwrap();
        }
        dir
    }

    /// A minimal HTTP server that records request lines and bodies and answers 204.
    async fn recording_server() -> (String, Arc<Mutex<Vec<(String, String)>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let mut r = BufReader::new(sock);
                    loop {
                        let mut request = String::new();
                        if r.read_line(&mut request).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let mut len = 0usize;
                        loop {
                            let mut h = String::new();
                            r.read_line(&mut h).await.unwrap();
                            if h.trim().is_empty() {
                                break;
                            }
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                len = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; len];
                        r.read_exact(&mut body).await.unwrap();
                        s.lock()
                            .unwrap()
                            .push((request.trim().to_string(), String::from_utf8(body).unwrap()));
                        r.get_mut()
                            .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                            .await
                            .unwrap();
                    }
                });
            }
        });
        (url, seen)
    }

    #[tokio::test]
    async fn exports_every_metric_line_in_batches() {
        let dir = run_dir(7);
        let (url, seen) = recording_server().await;
        let limits = Limits {
            batch_points: 4,
            ..Limits::default()
        };
        let mut events = Lifecycle::default();
        events.observe(&line(LineKind::Start, "a", 0), 5);
        let n = Exporter::new(&url, limits)
            .export(&RunMetrics {
                dir: dir.path().to_path_buf(),
                run_id: "r",
                plan: "p",
                case: "c",
                events: Some(&events),
            })
            .await
            .unwrap();
        // Per instance: 7 points + 1 counter in results, 1 counter in diagnostics; plus 1 event.
        assert_eq!(n, 3 * 9 + 1);
        let seen = seen.lock().unwrap();
        assert!(seen[0].0.starts_with("POST /query "), "{seen:?}");
        assert!(seen[0].1.contains("CREATE+DATABASE+testground"), "{seen:?}");
        let writes: Vec<_> = seen.iter().skip(1).collect();
        assert!(
            writes
                .iter()
                .all(|(r, _)| r.starts_with("POST /write?db=testground&precision=ns ")),
            "{writes:?}"
        );
        let bodies: Vec<&str> = writes.iter().flat_map(|(_, b)| b.lines()).collect();
        assert_eq!(bodies.len(), 28);
        assert!(writes.iter().all(|(_, b)| b.lines().count() <= 4));
        assert!(bodies.contains(&"results.p-c.x.point,group_id=b,run=r value=6 6"));
        assert!(bodies.contains(&"diagnostics.p-c.c.counter,group_id=a,run=r count=2i 1"));
        assert!(bodies.contains(&"events,event_type=start_event,group_id=a,run=r count=1i 5"));
    }

    #[tokio::test]
    async fn a_dead_or_silent_endpoint_fails_fast() {
        let dir = run_dir(1);
        let limits = Limits {
            connect: Duration::from_millis(300),
            request: Duration::from_millis(500),
            ..Limits::default()
        };
        let metrics = RunMetrics {
            dir: dir.path().to_path_buf(),
            run_id: "r",
            plan: "p",
            case: "c",
            events: None,
        };
        // Closed port.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let (n, e) = Exporter::new(&closed, limits)
            .export(&metrics)
            .await
            .unwrap_err();
        assert_eq!(n, 0);
        assert!(matches!(e, ExportError::Http { .. }), "{e}");
        // Accepts, never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let start = Instant::now();
        let (_, e) = Exporter::new(&url, limits)
            .export(&metrics)
            .await
            .unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        assert!(e.to_string().starts_with("cannot reach"), "{e}");
        drop(silent);
    }
}
