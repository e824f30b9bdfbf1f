//! Talking to the engine: over HTTP to a daemon (remote mode) or in-process (embedded mode).
//!
//! Both modes produce the same thing, a stream of [`Chunk`]s, and every command renders chunks
//! through [`consume`], so output is identical whichever mode ran the task.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use futures::stream::{self, BoxStream, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tg_api::rpc::{
    Chunk, ChunkKind, HealthcheckRequest, LogsRequest, OutputsRequest, StatusRequest, TaskRequest,
    TasksFilters, TerminateRequest,
};
use tg_daemon::{Engine, PlanSource};

/// A response: chunks as they arrive. Transport errors are items too.
pub type Chunks = BoxStream<'static, Result<Chunk>>;

pub enum Backend {
    Remote(Remote),
    Embedded(Engine),
}

pub struct Remote {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Remote {
    pub fn new(endpoint: &str, token: &str) -> Result<Remote> {
        let base = if endpoint.contains("://") {
            endpoint.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", endpoint.trim_end_matches('/'))
        };
        // No overall timeout: following a run's logs legitimately takes as long as the run.
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .context("cannot create the HTTP client")?;
        Ok(Remote {
            base,
            token: (!token.trim().is_empty()).then(|| token.trim().to_string()),
            http,
        })
    }

    async fn post(&self, path: &str, body: &impl Serialize) -> Result<Chunks> {
        let url = format!("{}{}", self.base, path);
        let mut rb = self.http.post(&url).json(body);
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        let resp = rb.send().await.map_err(|e| {
            anyhow!(
                "cannot reach the daemon at {}: {}",
                self.base,
                root_cause(&e)
            )
        })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let body = body.trim();
            if body.is_empty() {
                bail!("daemon answered {status} to POST {path}");
            }
            bail!("daemon answered {status} to POST {path}: {body}");
        }
        let ct = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if !ct.starts_with("application/json") {
            bail!("unexpected content type from the daemon for POST {path}: {ct:?}");
        }
        let body = resp.bytes_stream().map(|r| {
            r.map(|b| b.to_vec())
                .map_err(|e| anyhow!("reading the daemon's response: {}", root_cause(&e)))
        });
        Ok(decode_chunks(body.boxed()))
    }
}

/// The innermost error message (reqwest wraps the useful one, e.g. "Connection refused").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(s) = cur.source() {
        cur = s;
    }
    cur.to_string()
}

/// Splits a byte stream into chunks. Chunks are usually one per line, but the original sends
/// them back to back without separators, so we parse JSON values from a growing buffer.
pub fn decode_chunks(body: BoxStream<'static, Result<Vec<u8>>>) -> Chunks {
    struct St {
        body: BoxStream<'static, Result<Vec<u8>>>,
        buf: Vec<u8>,
        ended: bool,
    }
    let st = St {
        body,
        buf: Vec::new(),
        ended: false,
    };
    stream::unfold(st, |mut st| async move {
        loop {
            let start = st.buf.iter().position(|b| !b.is_ascii_whitespace());
            match start {
                None => st.buf.clear(),
                Some(off) => {
                    st.buf.drain(..off);
                    let mut it = serde_json::Deserializer::from_slice(&st.buf).into_iter::<Chunk>();
                    match it.next() {
                        Some(Ok(c)) => {
                            let used = it.byte_offset();
                            st.buf.drain(..used);
                            return Some((Ok(c), st));
                        }
                        Some(Err(e)) if e.is_eof() => {}
                        Some(Err(e)) => {
                            st.ended = true;
                            st.buf.clear();
                            return Some((
                                Err(anyhow!("malformed response from the daemon: {e}")),
                                st,
                            ));
                        }
                        None => {}
                    }
                }
            }
            if st.ended {
                if st.buf.is_empty() {
                    return None;
                }
                st.buf.clear();
                return Some((Err(anyhow!("truncated response from the daemon")), st));
            }
            match st.body.next().await {
                Some(Ok(b)) => st.buf.extend_from_slice(&b),
                Some(Err(e)) => {
                    st.ended = true;
                    st.buf.clear();
                    return Some((Err(e), st));
                }
                None => st.ended = true,
            }
        }
    })
    .boxed()
}

fn once(c: Chunk) -> Chunks {
    stream::iter([Ok(c)]).boxed()
}

fn result_or_error<T: Serialize, E: std::fmt::Display>(r: Result<T, E>) -> Chunks {
    match r {
        Ok(v) => once(Chunk::result(
            serde_json::to_value(v).unwrap_or(Value::Null),
        )),
        Err(e) => once(Chunk::error(e.to_string())),
    }
}

impl Backend {
    pub fn is_embedded(&self) -> bool {
        matches!(self, Backend::Embedded(_))
    }

    /// The address printed by `testground client initialized`.
    pub fn addr(&self) -> String {
        match self {
            Backend::Remote(r) => r.base.clone(),
            Backend::Embedded(_) => "embedded".into(),
        }
    }

    /// Submits a build or run task. `plan_dir` is given only when some group needs building.
    pub async fn submit(&self, mut req: TaskRequest, plan_dir: Option<&Path>) -> Result<Chunks> {
        let path = match req.task_type {
            tg_api::task::TaskType::Build => "/build",
            tg_api::task::TaskType::Run => "/run",
        };
        match self {
            Backend::Remote(r) => {
                if let Some(dir) = plan_dir {
                    let archive = tg_daemon::archive::pack_dir(dir).with_context(|| {
                        format!("cannot pack the plan sources at {}", dir.display())
                    })?;
                    req.plan_archive = Some(archive);
                }
                r.post(path, &req).await
            }
            Backend::Embedded(e) => {
                let src = plan_dir.map(|d| PlanSource::Dir(d.to_path_buf()));
                Ok(result_or_error(e.submit(req, src)))
            }
        }
    }

    pub async fn logs(&self, task_id: &str, follow: bool) -> Result<Chunks> {
        match self {
            Backend::Remote(r) => {
                let req = LogsRequest {
                    task_id: task_id.into(),
                    follow,
                    cancel_with_context: follow,
                };
                r.post("/logs", &req).await
            }
            Backend::Embedded(e) => Ok(e.logs(task_id, follow).map(Ok).boxed()),
        }
    }

    pub async fn status(&self, task_id: &str) -> Result<Chunks> {
        match self {
            Backend::Remote(r) => {
                r.post(
                    "/status",
                    &StatusRequest {
                        task_id: task_id.into(),
                    },
                )
                .await
            }
            Backend::Embedded(e) => Ok(result_or_error(e.status(task_id))),
        }
    }

    pub async fn tasks(&self, f: &TasksFilters) -> Result<Chunks> {
        match self {
            Backend::Remote(r) => r.post("/tasks", f).await,
            Backend::Embedded(e) => Ok(result_or_error(e.tasks(f))),
        }
    }

    /// Binary chunks with a tgz, then `true`, or `false` when there is no such run.
    pub async fn outputs(&self, runner: &str, run_id: &str) -> Result<Chunks> {
        match self {
            Backend::Remote(r) => {
                let req = OutputsRequest {
                    runner: runner.into(),
                    run_id: run_id.into(),
                };
                r.post("/outputs", &req).await
            }
            Backend::Embedded(e) => Ok(match e.collect(run_id) {
                Ok(Some(bytes)) => {
                    stream::iter([Ok(Chunk::binary(&bytes)), Ok(Chunk::result(json!(true)))])
                        .boxed()
                }
                Ok(None) => once(Chunk::result(json!(false))),
                Err(err) => once(Chunk::error(err.to_string())),
            }),
        }
    }

    pub async fn terminate(&self, req: &TerminateRequest) -> Result<Chunks> {
        match self {
            Backend::Remote(r) => r.post("/terminate", req).await,
            Backend::Embedded(e) => Ok(result_or_error(e.terminate(req).map(|()| "Done"))),
        }
    }

    pub async fn healthcheck(&self, runner: &str, fix: bool) -> Result<Chunks> {
        match self {
            Backend::Remote(r) => {
                let req = HealthcheckRequest {
                    runner: runner.into(),
                    fix,
                };
                r.post("/healthcheck", &req).await
            }
            Backend::Embedded(e) => Ok(result_or_error(e.healthcheck(runner, fix))),
        }
    }

    pub async fn purge(&self, builder: &str, plan: &str) -> Result<Chunks> {
        match self {
            Backend::Remote(r) => {
                r.post(
                    "/build/purge",
                    &json!({"builder": builder, "testplan": plan}),
                )
                .await
            }
            Backend::Embedded(e) => Ok(result_or_error(
                e.purge(builder, plan)
                    .await
                    .map(|()| "build purge succeeded"),
            )),
        }
    }

    /// Asks the engine to cancel a task (embedded mode; remote tasks are canceled by dropping
    /// the `/logs` connection opened with `cancel_with_context`).
    pub fn cancel(&self, task_id: &str) {
        if let Backend::Embedded(e) = self {
            e.cancel(task_id);
        }
    }

    /// Lets an in-process engine finish its bookkeeping before the process exits.
    pub async fn close(self) {
        if let Backend::Embedded(e) = self {
            e.shutdown().await;
        }
    }
}

/// What Ctrl-C does while a response is being printed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnInterrupt<'a> {
    /// Default signal handling (the process dies).
    Default,
    /// Drop the response and fail (remote mode: the daemon cancels the task).
    Abort,
    /// Cancel this task in the embedded engine and keep printing until its final chunk.
    Cancel(&'a str),
}

fn stdout_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal()
}

fn header(text: &str, color: &str) {
    let mut out = std::io::stdout().lock();
    if stdout_is_tty() {
        let _ = write!(out, "\n\x1b[1;{color}m{text}\x1b[0m\n");
    } else {
        let _ = write!(out, "\n{text}\n");
    }
    let _ = out.flush();
}

/// Prints a response the way the original client does (`>>> Server output:` before the first
/// progress chunk, `>>> Result:` / `>>> Error:` at the end) and returns the result value.
/// Binary chunks go to `binary` when given.
pub async fn consume(
    backend: &Backend,
    mut chunks: Chunks,
    mut binary: Option<&mut dyn Write>,
    on_interrupt: OnInterrupt<'_>,
) -> Result<Value> {
    let mut seen_progress = false;
    let mut interrupts = 0u32;
    // The engine cancels a task owned by an embedded CLI (e.g. `testground terminate` from
    // another shell) by sending that CLI SIGTERM; treat it like Ctrl-C while we own a task.
    let mut sigterm = match on_interrupt {
        OnInterrupt::Cancel(_) => {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok()
        }
        _ => None,
    };
    loop {
        let next = if on_interrupt == OnInterrupt::Default {
            chunks.next().await
        } else {
            let term = async {
                match sigterm.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                c = chunks.next() => c,
                _ = async { tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term => {} } } => {
                    interrupts += 1;
                    match on_interrupt {
                        OnInterrupt::Cancel(id) if interrupts == 1 => {
                            crate::log::warn(format!(
                                "interrupted: canceling task {id} (press Ctrl-C again to exit now)"
                            ));
                            backend.cancel(id);
                            continue;
                        }
                        OnInterrupt::Cancel(_) => {
                            std::process::exit(tg_api::exit::FAILURE);
                        }
                        _ => bail!("interrupted"),
                    }
                }
            }
        };
        let Some(chunk) = next else {
            bail!("the response ended before a result was sent");
        };
        let chunk = chunk?;
        let t = chunk.t;
        match chunk.decode() {
            Some(ChunkKind::Progress(bytes)) => {
                if !seen_progress {
                    seen_progress = true;
                    header(">>> Server output:", "36");
                }
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&bytes);
                let _ = out.flush();
            }
            Some(ChunkKind::Binary(bytes)) => {
                if let Some(w) = binary.as_mut() {
                    w.write_all(&bytes)
                        .context("writing the collected outputs")?;
                }
            }
            Some(ChunkKind::Result(v)) => {
                header(">>> Result:", "32");
                return Ok(v);
            }
            Some(ChunkKind::Error(m)) => {
                header(">>> Error:", "31");
                bail!("{}", m.trim());
            }
            None => crate::log::debug(format!("ignoring a chunk of unknown type {t}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(parts: Vec<&'static [u8]>) -> Vec<Result<Chunk>> {
        let body = stream::iter(parts.into_iter().map(|p| Ok(p.to_vec()))).boxed();
        futures::executor::block_on(decode_chunks(body).collect::<Vec<_>>())
    }

    #[test]
    fn chunks_split_across_reads_and_glued_together() {
        let out = decode_all(vec![
            b"{\"t\":112,\"p\":\"aGVs",
            b"bG8K\"}\n{\"t\":114,\"p\":\"abc\"}{\"t\":101,\"e\":{\"m\":\"x\"}}\n",
        ]);
        let kinds: Vec<ChunkKind> = out
            .into_iter()
            .map(|c| c.unwrap().decode().unwrap())
            .collect();
        assert_eq!(
            kinds,
            vec![
                ChunkKind::Progress(b"hello\n".to_vec()),
                ChunkKind::Result(json!("abc")),
                ChunkKind::Error("x".into())
            ]
        );
    }

    #[test]
    fn truncated_and_malformed_bodies_are_errors() {
        let out = decode_all(vec![b"{\"t\":114,"]);
        assert_eq!(out.len(), 1);
        assert!(
            out[0]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        let out = decode_all(vec![b"nope"]);
        assert!(
            out[0]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("malformed")
        );
        assert!(decode_all(vec![b"  \n"]).is_empty());
    }
}
