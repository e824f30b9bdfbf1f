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

use crate::term::LiveLog;

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

/// Where a client finds a daemon listening on `listen` (`[daemon] listen`): a wildcard address
/// is reached on loopback; port 0 (a daemon on a port of the system's choosing) cannot be
/// found.
pub fn probe_endpoint(listen: &str) -> Option<String> {
    let listen = listen.trim();
    let (host, port) = listen.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    if port == 0 {
        return None;
    }
    let host = match host {
        "" | "0.0.0.0" => "127.0.0.1",
        "[::]" => "[::1]",
        h => h,
    };
    Some(format!("http://{host}:{port}"))
}

impl Remote {
    /// Whether a Testground daemon answers at this endpoint, within a short time: an empty
    /// `/tasks` query must come back as the API's chunk stream with a list as its result, which
    /// no other HTTP service sends by chance (the original's daemon does, and speaks the same
    /// API).
    pub async fn answers(&self) -> bool {
        let probe = async {
            let chunks = self
                .post(
                    "/tasks",
                    &TasksFilters {
                        types: Vec::new(),
                        states: Vec::new(),
                        ..Default::default()
                    },
                )
                .await?;
            consume_quietly(chunks).await
        };
        match tokio::time::timeout(std::time::Duration::from_millis(1500), probe).await {
            Ok(Ok(v)) => v.is_array(),
            Ok(Err(e)) => {
                crate::log::debug(format!("no daemon at {}: {e:#}", self.base));
                false
            }
            Err(_) => false,
        }
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
/// them back to back without separators, so we parse JSON values from a growing buffer. Parsed
/// bytes are dropped once per read, not once per chunk: a read holds thousands of chunks when
/// instances print heavily, and moving the rest of the buffer after each would be quadratic.
pub fn decode_chunks(body: BoxStream<'static, Result<Vec<u8>>>) -> Chunks {
    struct St {
        body: BoxStream<'static, Result<Vec<u8>>>,
        buf: Vec<u8>,
        /// Where the unparsed bytes of `buf` start.
        pos: usize,
        ended: bool,
    }
    let st = St {
        body,
        buf: Vec::new(),
        pos: 0,
        ended: false,
    };
    stream::unfold(st, |mut st| async move {
        loop {
            let rest = &st.buf[st.pos..];
            if let Some(off) = rest.iter().position(|b| !b.is_ascii_whitespace()) {
                let start = st.pos + off;
                let mut it =
                    serde_json::Deserializer::from_slice(&st.buf[start..]).into_iter::<Chunk>();
                match it.next() {
                    Some(Ok(c)) => {
                        st.pos = start + it.byte_offset();
                        return Some((Ok(c), st));
                    }
                    Some(Err(e)) if e.is_eof() => st.pos = start,
                    Some(Err(e)) => {
                        st.ended = true;
                        st.buf.clear();
                        st.pos = 0;
                        return Some((Err(anyhow!("malformed response from the daemon: {e}")), st));
                    }
                    None => st.pos = st.buf.len(),
                }
            } else {
                st.pos = st.buf.len();
            }
            st.buf.drain(..st.pos);
            st.pos = 0;
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

/// The result of a response that is not shown (errors are returned).
async fn consume_quietly(mut chunks: Chunks) -> Result<Value> {
    while let Some(c) = chunks.next().await {
        match c?.decode() {
            Some(ChunkKind::Result(v)) => return Ok(v),
            Some(ChunkKind::Error(m)) => bail!("{}", m.trim()),
            _ => {}
        }
    }
    bail!("the response ended before a result was sent")
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
            Backend::Embedded(e) => Ok(result_or_error(e.terminate(req).await.map(|()| "Done"))),
        }
    }

    pub async fn healthcheck(
        &self,
        runner: &str,
        fix: bool,
        instances: Option<u32>,
    ) -> Result<Chunks> {
        match self {
            Backend::Remote(r) => {
                let req = HealthcheckRequest {
                    runner: runner.into(),
                    fix,
                    instances,
                };
                r.post("/healthcheck", &req).await
            }
            Backend::Embedded(e) => {
                Ok(result_or_error(e.healthcheck(runner, fix, instances).await))
            }
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

    /// Cancels a task: in-process, or by a daemon's `/terminate` with the task id (a daemon
    /// without it cancels a task when the `/logs` connection following it is dropped).
    pub async fn cancel(&self, task_id: &str) {
        match self {
            Backend::Embedded(e) => {
                e.cancel(task_id);
            }
            Backend::Remote(r) => {
                if let Ok(chunks) = r.post("/terminate", &json!({ "task_id": task_id })).await
                    && let Err(e) = consume_quietly(chunks).await
                {
                    crate::log::debug(format!("the daemon did not cancel {task_id}: {e:#}"));
                }
            }
        }
    }

    /// [`Backend::close`], except after an escalated interrupt: the user asked to exit now, so an
    /// in-process engine gets a moment to record the task and is then dropped with the runtime
    /// (which kills its instances).
    pub async fn close_after<T>(self, res: &Result<T>) {
        if matches!(res, Err(e) if interrupted(e)) {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.close()).await;
        } else {
            self.close().await;
        }
    }

    /// Lets an in-process engine finish its bookkeeping before the process exits.
    pub async fn close(self) {
        if let Backend::Embedded(e) = self {
            e.shutdown().await;
        }
    }
}

/// The status of a command ended by a second Ctrl-C, or by a cancel that did not end the task
/// within [`CANCEL_GRACE`]: 128 + SIGINT, as a shell reports a process killed by Ctrl-C.
pub const INTERRUPTED_EXIT: i32 = 130;

/// Whether `e` is the error of an escalated interrupt.
pub fn interrupted(e: &anyhow::Error) -> bool {
    e.downcast_ref::<crate::Exit>()
        .is_some_and(|x| x.code == INTERRUPTED_EXIT)
}

/// How long a canceled task may take to end before the CLI stops waiting for it.
pub const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// One SIGINT/SIGTERM listener for a whole command. Signals are queued by the listener while
/// nobody awaits it, so a Ctrl-C that arrives while output is being printed is not lost (a
/// listener made anew on each pass of a loop misses the signals between passes).
///
/// SIGTERM counts as Ctrl-C: the engine cancels a task owned by an embedded CLI (e.g.
/// `testground terminate` from another shell) by sending that CLI SIGTERM.
pub struct Interrupts {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interrupts {
    pub fn new() -> Result<Interrupts> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Interrupts {
            int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
        })
    }

    /// Resolves on the next SIGINT or SIGTERM (cancel-safe).
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// A section header. Write errors are left to the output that follows (a closed stdout must
/// not end the process in the middle of a task whose instances it runs).
fn header(text: &str, color: &str) {
    let text = if crate::term::color() {
        format!("\n\x1b[1;{color}m{text}\x1b[0m\n")
    } else {
        format!("\n{text}\n")
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// What one chunk means to the printer.
enum Step {
    More,
    Done(Value),
    /// Stdout was closed (`| head`): nobody reads the output any more.
    Closed,
}

/// Prints chunks the way the original client does (`>>> Server output:` before the first
/// progress chunk, `>>> Result:` / `>>> Error:` at the end). Progress goes through a
/// [`LiveLog`]: verbatim off a terminal, colored with progress bars on one.
struct Printer {
    seen_progress: bool,
    live: LiveLog,
}

impl Printer {
    fn new() -> Printer {
        Printer {
            seen_progress: false,
            live: LiveLog::new(),
        }
    }

    fn chunk(&mut self, chunk: Chunk, binary: &mut Option<&mut dyn Write>) -> Result<Step> {
        let t = chunk.t;
        match chunk.decode() {
            Some(ChunkKind::Progress(bytes)) => {
                if !self.seen_progress {
                    self.seen_progress = true;
                    header(">>> Server output:", "36");
                }
                if let Err(e) = self.live.write(&bytes)
                    && e.kind() == std::io::ErrorKind::BrokenPipe
                {
                    return Ok(Step::Closed);
                }
            }
            Some(ChunkKind::Binary(bytes)) => {
                if let Some(w) = binary.as_mut() {
                    w.write_all(&bytes)
                        .context("writing the collected outputs")?;
                }
            }
            Some(ChunkKind::Result(v)) => {
                self.live.finish();
                header(">>> Result:", "32");
                return Ok(Step::Done(v));
            }
            Some(ChunkKind::Error(m)) => {
                self.live.finish();
                header(">>> Error:", "31");
                bail!("{}", m.trim());
            }
            None => crate::log::debug(format!("ignoring a chunk of unknown type {t}")),
        }
        Ok(Step::More)
    }
}

/// Prints a response and returns its result value. Binary chunks go to `binary` when given.
/// A closed stdout ends the process quietly; Ctrl-C has its default effect.
pub async fn consume(mut chunks: Chunks, mut binary: Option<&mut dyn Write>) -> Result<Value> {
    let mut printer = Printer::new();
    loop {
        let Some(chunk) = chunks.next().await else {
            bail!("the response ended before a result was sent");
        };
        match printer.chunk(chunk?, &mut binary)? {
            Step::Done(v) => return Ok(v),
            Step::Closed => crate::out::exit_if_broken_pipe(&std::io::ErrorKind::BrokenPipe.into()),
            Step::More => {}
        }
    }
}

/// Follows a task's log to its end, printing it, and returns the final result value (the
/// task). The first Ctrl-C (or SIGTERM) cancels the task and waits for it to end; a second
/// one, or a task still running [`CANCEL_GRACE`] after the cancel, ends the command with
/// [`INTERRUPTED_EXIT`] (an in-process engine's instances die with the process's runtime).
pub async fn follow_task(
    backend: &Backend,
    task_id: &str,
    interrupts: &mut Interrupts,
) -> Result<Value> {
    let mut chunks = backend.logs(task_id, true).await?;
    let mut printer = Printer::new();
    loop {
        tokio::select! {
            // Signals first: heavy output must not starve them.
            biased;
            () = interrupts.recv() => break,
            next = chunks.next() => {
                let Some(chunk) = next else {
                    bail!("the response ended before a result was sent");
                };
                match printer.chunk(chunk?, &mut None)? {
                    Step::Done(v) => return Ok(v),
                    // Treated as Ctrl-C: the task is this process's to end, its instances
                    // may live in this very process.
                    Step::Closed => break,
                    Step::More => {}
                }
            }
        }
    }
    // The bars stop here: what follows is plain log lines.
    printer.live.finish();
    crate::log::warn(format!(
        "interrupted: canceling task {task_id} (press Ctrl-C again to exit now)"
    ));
    backend.cancel(task_id).await;
    // Instances may print faster than a terminal shows, so the log can be far behind the task:
    // rather than render that backlog, stop reading it and wait for the task itself to end.
    // (Dropping the log also cancels the task on a daemon that has no cancel by task id.)
    drop(chunks);
    let deadline = tokio::time::Instant::now() + CANCEL_GRACE;
    tokio::select! {
        biased;
        () = interrupts.recv() => Err(crate::Exit::new(
            INTERRUPTED_EXIT,
            format!("interrupted: stopped waiting for task {task_id}"),
        )
        .into()),
        () = tokio::time::sleep_until(deadline) => Err(crate::Exit::new(
            INTERRUPTED_EXIT,
            format!(
                "interrupted: task {task_id} did not end within {}s of its cancel",
                CANCEL_GRACE.as_secs()
            ),
        )
        .into()),
        r = wait_until_final(backend, task_id) => {
            let v = r?;
            header(">>> Result:", "32");
            Ok(v)
        }
    }
}

/// Polls a task's status until it has ended, and returns it.
async fn wait_until_final(backend: &Backend, task_id: &str) -> Result<Value> {
    loop {
        let v = consume_quietly(backend.status(task_id).await?).await?;
        let task: tg_api::task::Task = serde_json::from_value(v.clone())
            .with_context(|| format!("cannot decode task {task_id}"))?;
        if task.state().is_final() {
            return Ok(v);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
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
