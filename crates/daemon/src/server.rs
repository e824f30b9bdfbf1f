//! The daemon's HTTP API (documented in `crates/daemon/API.md`).
//!
//! POST endpoints answer `200 application/json` with newline-separated JSON chunks
//! (`tg_api::rpc::Chunk`): progress, binary, then exactly one result or error. Bearer tokens
//! are checked on every route when configured. A request body larger than
//! `[daemon] max_request_body` is refused with 413 before it is read (when it announces its
//! length) or as soon as it grows past the limit.

use std::convert::Infallible;
use std::future::Future;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde::Deserialize;
use tg_api::rpc::{
    Chunk, HealthcheckRequest, LogsRequest, OutputsRequest, StatusRequest, TaskRequest,
    TasksFilters, TerminateRequest,
};

use crate::engine::{Engine, PlanSource};

#[derive(Clone)]
struct AppState {
    engine: Engine,
    tokens: std::sync::Arc<Vec<String>>,
}

/// What the HTTP server is configured with (`[daemon]` of `.env.toml`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Bearer tokens; empty means no authentication.
    pub tokens: Vec<String>,
    /// The largest request body accepted, in bytes.
    pub max_request_body: u64,
}

impl ServerConfig {
    pub fn from_env(cfg: &crate::config::DaemonConfig) -> ServerConfig {
        ServerConfig {
            tokens: cfg.tokens.clone(),
            max_request_body: cfg.max_request_body,
        }
    }
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Engine,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let max = config.max_request_body;
    let state = AppState {
        engine,
        tokens: std::sync::Arc::new(config.tokens),
    };
    axum::serve(listener, router(state, max))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The warning the daemon prints at start when anyone on the network can reach it and use it:
/// it listens on an address that is not loopback and has no tokens. Whoever submits a task runs
/// code on this machine.
pub fn exposure_warning(addr: &std::net::SocketAddr, tokens: &[String]) -> Option<String> {
    if addr.ip().to_canonical().is_loopback() || !tokens.is_empty() {
        return None;
    }
    Some(format!(
        "the daemon listens on {addr}, which is not a loopback address, without [daemon] tokens: \
         anyone who can reach it can run code on this machine; set tokens in .env.toml or \
         listen on localhost"
    ))
}

/// Serves only the dashboard (`testground dashboard`: no daemon, the same home) on
/// `listener` until `shutdown` resolves. Tokens apply as in the daemon.
pub async fn serve_dashboard(
    listener: tokio::net::TcpListener,
    engine: Engine,
    tokens: Vec<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = AppState {
        engine: engine.clone(),
        tokens: std::sync::Arc::new(tokens),
    };
    let app = crate::dashboard::routes(engine)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

fn router(state: AppState, max_request_body: u64) -> Router {
    let limit = usize::try_from(max_request_body).unwrap_or(usize::MAX);
    Router::new()
        .merge(crate::dashboard::routes(state.engine.clone()))
        .route("/build", post(submit))
        .route("/run", post(submit))
        .route("/logs", post(logs).get(logs_text))
        .route("/status", post(status))
        // The original's task page was `GET /tasks`; the dashboard is at `/`.
        .route(
            "/tasks",
            post(tasks).get(|| async { axum::response::Redirect::to("/") }),
        )
        .route("/outputs", post(outputs).get(outputs_get))
        .route("/terminate", post(terminate))
        .route("/healthcheck", post(healthcheck))
        .route("/build/purge", post(purge))
        // Bodies are buffered whole (a plan archive is one JSON string): bound them.
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(max_request_body, body_limit))
        // Outermost: nobody without a token gets as far as uploading.
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

/// Refuses a request whose announced length is over the limit before its body is read, and
/// explains the 413 that a body without a length gets when it grows past the limit.
async fn body_limit(State(max): State<u64>, req: Request, next: Next) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(len) = announced.filter(|&len| len > max) {
        return too_large(Some(len), max);
    }
    let resp = next.run(req).await;
    if resp.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return too_large(None, max);
    }
    resp
}

fn too_large(len: Option<u64>, max: u64) -> Response {
    let size = match len {
        Some(n) => format!("of {n} bytes "),
        None => String::new(),
    };
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "request body {size}is over the daemon's limit of {max} bytes; raise [daemon] \
             max_request_body in the daemon's .env.toml, or leave large files out of the plan \
             directory\n"
        ),
    )
        .into_response()
}

/// The cookie a browser keeps the dashboard's token in (a page cannot send a header when
/// following a link or opening an event stream).
const TOKEN_COOKIE: &str = "tg_token";

/// Every route needs one of the `[daemon] tokens`, when there are any: as
/// `Authorization: Bearer <token>` (the CLI) or as the `tg_token` cookie (the dashboard). Opening
/// `/?token=<token>` sets the cookie and leads to the dashboard.
async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if st.tokens.is_empty() {
        return next.run(req).await;
    }
    let valid = |g: &str| st.tokens.iter().any(|t| t == g.trim());
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_some_and(valid) {
        return next.run(req).await;
    }
    let cookie = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == TOKEN_COOKIE)
        .map(|(_, v)| v);
    if cookie.is_some_and(valid) {
        return next.run(req).await;
    }
    if req.uri().path() == "/" {
        let query_token = req.uri().query().and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "token")
                .map(|(_, v)| v)
        });
        if let Some(t) = query_token.filter(|t| valid(t)) {
            let mut r = (StatusCode::SEE_OTHER, "").into_response();
            let h = r.headers_mut();
            h.insert(header::LOCATION, HeaderValue::from_static("/"));
            if let Ok(v) = HeaderValue::from_str(&format!(
                "{TOKEN_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
                t.trim()
            )) {
                h.insert(header::SET_COOKIE, v);
            }
            return r;
        }
        return (
            StatusCode::FORBIDDEN,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            "<!doctype html><title>Testground</title><p>This daemon needs a token: open \
             <code>/?token=&lt;token&gt;</code> with one of its <code>[daemon] tokens</code>.</p>\n",
        )
            .into_response();
    }
    (StatusCode::FORBIDDEN, "invalid or missing bearer token\n").into_response()
}

fn chunks(stream: BoxStream<'static, Chunk>) -> Response {
    let body = stream.map(|c| {
        let mut v = serde_json::to_vec(&c).unwrap_or_default();
        v.push(b'\n');
        Ok::<_, Infallible>(Bytes::from(v))
    });
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn one(c: Chunk) -> Response {
    chunks(futures::stream::iter([c]).boxed())
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Box<Response>> {
    serde_json::from_slice(body)
        .map_err(|e| Box::new(one(Chunk::error(format!("failed to consume request: {e}")))))
}

async fn submit(State(st): State<AppState>, body: Bytes) -> Response {
    let mut req: TaskRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let source = match req.plan_archive.take() {
        Some(b64) => match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
            Ok(bytes) => Some(PlanSource::Archive(bytes)),
            Err(e) => return one(Chunk::error(format!("bad request: plan archive: {e}"))),
        },
        None => None,
    };
    let engine = st.engine.clone();
    // Unpacking a large archive is blocking work.
    let r = tokio::task::spawn_blocking(move || engine.submit(req, source)).await;
    match r {
        Ok(Ok(id)) => one(Chunk::result(serde_json::Value::String(id))),
        Ok(Err(e)) => one(Chunk::error(format!("engine error: {e}"))),
        Err(e) => one(Chunk::error(format!("engine error: {e}"))),
    }
}

/// Cancels the task when dropped before `finished` is set: a client that asked for
/// `cancel_with_context` and went away (Ctrl-C) takes its task with it.
struct CancelOnDrop {
    engine: Engine,
    id: String,
    finished: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.finished {
            self.engine.cancel(&self.id);
        }
    }
}

async fn logs(State(st): State<AppState>, body: Bytes) -> Response {
    let req: LogsRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let stream = st.engine.logs(&req.task_id, req.follow);
    if !(req.follow && req.cancel_with_context) {
        return chunks(stream);
    }
    let guard = CancelOnDrop {
        engine: st.engine.clone(),
        id: req.task_id.clone(),
        finished: false,
    };
    let stream = futures::stream::unfold((stream, guard), |(mut s, mut g)| async move {
        let c = s.next().await?;
        if c.t != tg_api::rpc::CHUNK_PROGRESS {
            g.finished = true;
        }
        Some((c, (s, g)))
    });
    chunks(stream.boxed())
}

#[derive(Deserialize)]
struct TaskIdQuery {
    task_id: String,
}

async fn logs_text(State(st): State<AppState>, Query(q): Query<TaskIdQuery>) -> Response {
    let mut s = st.engine.logs(&q.task_id, false);
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        match c.decode() {
            Some(tg_api::rpc::ChunkKind::Progress(b)) => out.extend_from_slice(&b),
            Some(tg_api::rpc::ChunkKind::Error(e)) => {
                return (StatusCode::NOT_FOUND, format!("{e}\n")).into_response();
            }
            _ => {}
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], out).into_response()
}

async fn status(State(st): State<AppState>, body: Bytes) -> Response {
    let req: StatusRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    match st.engine.status(&req.task_id) {
        Ok(t) => one(Chunk::result(serde_json::to_value(t).unwrap_or_default())),
        Err(e) => one(Chunk::error(e.to_string())),
    }
}

async fn tasks(State(st): State<AppState>, body: Bytes) -> Response {
    let f: TasksFilters = if body.is_empty() {
        TasksFilters::default()
    } else {
        match parse(&body) {
            Ok(r) => r,
            Err(e) => return *e,
        }
    };
    match st.engine.tasks(&f) {
        Ok(t) => one(Chunk::result(serde_json::to_value(t).unwrap_or_default())),
        Err(e) => one(Chunk::error(e.to_string())),
    }
}

async fn outputs(State(st): State<AppState>, body: Bytes) -> Response {
    let req: OutputsRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let engine = st.engine.clone();
    let r = tokio::task::spawn_blocking(move || engine.collect(&req.run_id)).await;
    match r {
        Ok(Ok(Some(bytes))) => {
            let mut out: Vec<Chunk> = bytes.chunks(256 * 1024).map(Chunk::binary).collect();
            out.push(Chunk::result(serde_json::Value::Bool(true)));
            chunks(futures::stream::iter(out).boxed())
        }
        Ok(Ok(None)) => one(Chunk::result(serde_json::Value::Bool(false))),
        Ok(Err(e)) => one(Chunk::error(e.to_string())),
        Err(e) => one(Chunk::error(e.to_string())),
    }
}

#[derive(Deserialize)]
struct RunIdQuery {
    run_id: String,
}

async fn outputs_get(State(st): State<AppState>, Query(q): Query<RunIdQuery>) -> Response {
    let engine = st.engine.clone();
    let id = q.run_id.clone();
    match tokio::task::spawn_blocking(move || engine.collect(&id)).await {
        Ok(Ok(Some(bytes))) => (
            [
                (header::CONTENT_TYPE, "application/tar+gzip".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{}.tgz\"", q.run_id),
                ),
            ],
            bytes,
        )
            .into_response(),
        Ok(Ok(None)) => (StatusCode::NOT_FOUND, "no such run\n").into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// `/terminate` body: the original's `runner` or `builder`, or (ours) one task's id, which the
/// CLI sends when the user presses Ctrl-C while following a task.
#[derive(Deserialize)]
struct TerminateBody {
    #[serde(default)]
    task_id: String,
    #[serde(flatten)]
    req: TerminateRequest,
}

async fn terminate(State(st): State<AppState>, body: Bytes) -> Response {
    let body: TerminateBody = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    if !body.task_id.is_empty() {
        if !body.req.runner.is_empty() || !body.req.builder.is_empty() {
            return one(Chunk::error(
                "specify one of task_id, runner or builder to terminate".to_owned(),
            ));
        }
        // A task that has already ended needs nothing; an unknown one is an error.
        if !st.engine.cancel(&body.task_id)
            && let Err(e) = st.engine.status(&body.task_id)
        {
            return one(Chunk::error(e.to_string()));
        }
        return one(Chunk::result(serde_json::Value::String("Done".into())));
    }
    match st.engine.terminate(&body.req).await {
        Ok(()) => one(Chunk::result(serde_json::Value::String("Done".into()))),
        Err(e) => one(Chunk::error(e.to_string())),
    }
}

async fn healthcheck(State(st): State<AppState>, body: Bytes) -> Response {
    let req: HealthcheckRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    match st
        .engine
        .healthcheck(&req.runner, req.fix, req.instances)
        .await
    {
        Ok(r) => one(Chunk::result(serde_json::to_value(r).unwrap_or_default())),
        Err(e) => one(Chunk::error(e.to_string())),
    }
}

#[derive(Deserialize)]
struct PurgeRequest {
    builder: String,
    testplan: String,
}

async fn purge(State(st): State<AppState>, body: Bytes) -> Response {
    let req: PurgeRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return *e,
    };
    match st.engine.purge(&req.builder, &req.testplan).await {
        Ok(()) => one(Chunk::result(serde_json::Value::String(
            "build purge succeeded".into(),
        ))),
        Err(e) => one(Chunk::error(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_open_daemon_on_the_network_is_warned_about() {
        let open = |a: &str| exposure_warning(&a.parse().unwrap(), &[]);
        assert!(open("127.0.0.1:8042").is_none());
        assert!(open("[::1]:8042").is_none());
        assert!(open("[::ffff:127.0.0.1]:8042").is_none());
        let w = open("0.0.0.0:8042").unwrap();
        assert!(w.contains("0.0.0.0:8042") && w.contains("tokens"), "{w}");
        assert!(open("[::]:8042").is_some());
        assert!(open("192.168.1.5:8042").is_some());
        let with_token = exposure_warning(&"0.0.0.0:8042".parse().unwrap(), &["t".into()]);
        assert!(with_token.is_none());
    }
}
