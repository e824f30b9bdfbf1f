//! The dashboard: a page at `/` and the read-only JSON API under `/api/v1/` it is built on
//! (documented in `crates/daemon/API.md`).
//!
//! Served by `testground daemon` next to the task API and, with no daemon, by `testground
//! dashboard` over the same home. Everything comes from the engine (tasks from the store, a run's
//! per-instance journal built from its typed events, the task log) and the run's outputs
//! directory (instance files, metrics); nothing is parsed out of rendered log text. Lists stay
//! current through `/api/v1/events`, a server-sent event whenever the store changes, whichever
//! process changed it. The page's assets are compiled into the binary: it works offline.

pub mod metrics;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tg_api::metrics::MetricSet;
use tg_api::rpc::TasksFilters;
use tg_api::task::{GroupOutcome, Task, TaskState, TaskType};

use crate::engine::Engine;
use crate::journal::JournalData;
use metrics::MetricKey;

/// The most bytes one `?offset=` read of a log or file returns; the page asks again.
const MAX_CHUNK: u64 = 1 << 20;
/// How often the event stream looks for changes in the store.
const POLL: Duration = Duration::from_millis(250);
/// Runs compared in a plan's metric history.
const HISTORY_RUNS: usize = 100;

const INDEX_HTML: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const APP_CSS: &str = include_str!("../../assets/dashboard/app.css");
const UPLOT_JS: &str = include_str!("../../assets/vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../assets/vendor/uplot/uPlot.min.css");

/// The dashboard's routes, with the engine as their state.
pub fn routes<S>(engine: Engine) -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/assets/{file}", get(asset))
        .route("/api/v1/tasks", get(list))
        .route("/api/v1/tasks/{id}", get(detail))
        .route("/api/v1/tasks/{id}/log", get(task_log))
        .route("/api/v1/events", get(events))
        .route("/api/v1/runs/{id}/files", get(files))
        .route("/api/v1/runs/{id}/file", get(file))
        .route("/api/v1/runs/{id}/metrics", get(run_metrics))
        .route("/api/v1/runs/{id}/metrics/series", get(run_series))
        .route("/api/v1/plans/{plan}/{case}/metrics", get(plan_metrics))
        .with_state(engine)
}

async fn index() -> Response {
    let mut r = INDEX_HTML.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

async fn asset(UrlPath(file): UrlPath<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "uPlot.iife.min.js" => (UPLOT_JS, "text/javascript; charset=utf-8"),
        "uPlot.min.css" => (UPLOT_CSS, "text/css; charset=utf-8"),
        _ => return not_found(format!("no asset {file}")),
    };
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    r
}

/// A refusal: its status and one line of text.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, format!("{}\n", self.1)).into_response()
    }
}

fn not_found(msg: String) -> Response {
    (StatusCode::NOT_FOUND, format!("{msg}\n")).into_response()
}

fn internal(msg: String) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{msg}\n")).into_response()
}

/// A task as the list shows it.
#[derive(Debug, Serialize)]
pub struct TaskRow {
    pub id: String,
    #[serde(rename = "type")]
    pub task_type: TaskType,
    pub plan: String,
    pub case: String,
    pub runner: String,
    pub state: TaskState,
    /// `success`, `failure`, `canceled` or `unknown` (not finished).
    pub outcome: String,
    pub outcomes: std::collections::BTreeMap<String, GroupOutcome>,
    pub created: Option<chrono::DateTime<chrono::Utc>>,
    pub updated: Option<chrono::DateTime<chrono::Utc>>,
    /// Milliseconds from creation to the last state change.
    pub took_ms: Option<i64>,
    pub error: String,
    pub created_by: tg_api::task::CreatedBy,
    /// Instances of the run (from its composition).
    pub instances: u64,
}

impl TaskRow {
    fn of(t: &Task) -> TaskRow {
        let outcomes = t.run_result().map(|r| r.outcomes).unwrap_or_default();
        TaskRow {
            id: t.id.clone(),
            task_type: t.task_type,
            plan: t.plan.clone(),
            case: t.case.clone(),
            runner: t.runner.clone(),
            state: t.state(),
            outcome: t.outcome().to_string(),
            outcomes,
            created: t.created(),
            updated: t.last_update(),
            took_ms: t.took().map(|d| d.num_milliseconds()),
            error: t.error.clone(),
            created_by: t.created_by.clone(),
            instances: groups_of(t).iter().map(|g| g.instances).sum(),
        }
    }
}

/// A group of a run's composition.
#[derive(Debug, Serialize)]
pub struct GroupInfo {
    pub id: String,
    pub instances: u64,
    pub builder: String,
    pub artifact: String,
}

fn groups_of(t: &Task) -> Vec<GroupInfo> {
    let Some(groups) = t.composition.get("groups").and_then(|g| g.as_array()) else {
        return Vec::new();
    };
    let global_builder = t.composition["global"]["builder"]
        .as_str()
        .unwrap_or_default();
    groups
        .iter()
        .map(|g| GroupInfo {
            id: g["id"].as_str().unwrap_or_default().to_string(),
            instances: g["instances"]["count"].as_u64().unwrap_or(0),
            builder: g["builder"]
                .as_str()
                .filter(|b| !b.is_empty())
                .unwrap_or(global_builder)
                .to_string(),
            artifact: g["run"]["artifact"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        })
        .collect()
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    plan: String,
    #[serde(default)]
    case: String,
    #[serde(default)]
    state: Option<TaskState>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn list(State(engine): State<Engine>, Query(q): Query<ListQuery>) -> Response {
    let filters = TasksFilters {
        types: Vec::new(),
        states: q.state.into_iter().collect(),
        test_plan: q.plan,
        test_case: q.case,
    };
    let r = tokio::task::spawn_blocking(move || engine.tasks(&filters)).await;
    match r {
        Ok(Ok(tasks)) => {
            let rows: Vec<TaskRow> = tasks
                .iter()
                .take(q.limit.unwrap_or(500))
                .map(TaskRow::of)
                .collect();
            Json(rows).into_response()
        }
        Ok(Err(e)) => internal(format!("cannot list tasks: {e}")),
        Err(e) => internal(format!("cannot list tasks: {e}")),
    }
}

/// Everything the run page shows but files and metrics.
#[derive(Debug, Serialize)]
struct Detail {
    task: TaskRow,
    groups: Vec<GroupInfo>,
    /// The run configuration and test parameters as submitted.
    composition: serde_json::Value,
    journal: Option<JournalData>,
    /// Whether the run has an outputs directory.
    has_outputs: bool,
}

async fn detail(State(engine): State<Engine>, UrlPath(id): UrlPath<String>) -> Response {
    let r = tokio::task::spawn_blocking(move || {
        let task = engine.status(&id)?;
        let has_outputs = run_dir(&engine, &task).is_some_and(|d| d.is_dir());
        Ok::<_, crate::EngineError>(Detail {
            groups: groups_of(&task),
            journal: engine.journal(&id),
            composition: task.composition.clone(),
            task: TaskRow::of(&task),
            has_outputs,
        })
    })
    .await;
    match r {
        Ok(Ok(d)) => Json(d).into_response(),
        Ok(Err(crate::EngineError::NoSuchTask(id))) => not_found(format!("no task {id}")),
        Ok(Err(e)) => internal(e.to_string()),
        Err(e) => internal(e.to_string()),
    }
}

/// The outputs directory of a run task.
fn run_dir(engine: &Engine, task: &Task) -> Option<PathBuf> {
    if task.task_type != TaskType::Run || task.runner.is_empty() {
        return None;
    }
    Some(tg_runner::outputs_dir(
        &engine.home().outputs_dir(),
        &task.runner,
        &task.plan,
        &task.id,
    ))
}

#[derive(Debug, Deserialize)]
struct OffsetQuery {
    #[serde(default)]
    offset: u64,
    /// Without `offset`: start this many bytes before the end, at a line start (a page shows
    /// the end of a long log first instead of reading megabytes it will not display).
    #[serde(default)]
    tail: Option<u64>,
}

/// Where reading starts: `offset`, or with `tail` and no offset, `tail` bytes before the end.
#[derive(Debug, Clone, Copy)]
struct From {
    offset: u64,
    tail: Option<u64>,
}

/// Up to [`MAX_CHUNK`] bytes of `path` from `from`, the offset they start at (after a `tail`
/// start, the start of the next line), and the file's length.
fn read_at(path: &Path, from: From) -> Result<(Vec<u8>, u64, u64), ApiError> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no file {}", path.display()),
            ));
        }
        Err(e) => {
            return Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot open {}: {e}", path.display()),
            ));
        }
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let tail_start = match from.tail {
        Some(t) if from.offset == 0 && len > t => Some(len - t),
        _ => None,
    };
    let start = tail_start.unwrap_or(from.offset).min(len);
    let mut buf = Vec::new();
    f.seek(SeekFrom::Start(start))
        .and_then(|_| f.take(MAX_CHUNK).read_to_end(&mut buf))
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
    if tail_start.is_some() {
        // Mid-line: begin at the next line (the reader sees it started late from the offset).
        let skip = buf
            .iter()
            .position(|&b| b == b'\n')
            .map_or(buf.len(), |i| i + 1);
        buf.drain(..skip);
        return Ok((buf, start + skip as u64, len));
    }
    Ok((buf, start, len))
}

/// Text read from a growing file: `X-Start-Offset` is where it started in the file,
/// `X-Next-Offset` where to read next, `X-Done: true` once the file will not grow (`done`) and
/// all of it was read.
fn text_chunk(text: Vec<u8>, start: u64, next: u64, len: u64, done: bool) -> Response {
    let mut r = text.into_response();
    let h = r.headers_mut();
    h.insert("x-start-offset", HeaderValue::from(start));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert("x-next-offset", HeaderValue::from(next));
    h.insert(
        "x-done",
        HeaderValue::from_static(if done && next >= len { "true" } else { "false" }),
    );
    r
}

/// Up to [`MAX_CHUNK`] bytes of `path` from `offset` (see [`text_chunk`]).
fn read_chunk(path: &Path, from: From, done: bool) -> Response {
    match read_at(path, from) {
        Ok((buf, start, len)) => {
            let next = start + buf.len() as u64;
            text_chunk(buf, start, next, len, done)
        }
        Err(e) => e.into_response(),
    }
}

/// [`read_chunk`] for a task log, whose lines are stored as progress chunks: the text of the
/// whole chunk lines in the next [`MAX_CHUNK`] bytes (`X-Next-Offset` is a file offset).
fn read_log(path: &Path, from: From, done: bool) -> Response {
    let (buf, start, len) = match read_at(path, from) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    // Only whole lines: the rest is read next time.
    let whole = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut text = Vec::new();
    for line in buf[..whole].split(|&b| b == b'\n') {
        if let Ok(c) = serde_json::from_slice::<tg_api::rpc::Chunk>(line)
            && let Some(tg_api::rpc::ChunkKind::Progress(b)) = c.decode()
        {
            text.extend_from_slice(&b);
        }
    }
    text_chunk(text, start, start + whole as u64, len, done)
}

async fn task_log(
    State(engine): State<Engine>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<OffsetQuery>,
) -> Response {
    tokio::task::spawn_blocking(move || {
        let task = match engine.status(&id) {
            Ok(t) => t,
            Err(e) => return not_found(e.to_string()),
        };
        read_log(
            &engine.home().task_log(&id),
            From {
                offset: q.offset,
                tail: q.tail,
            },
            task.state().is_final(),
        )
    })
    .await
    .unwrap_or_else(|e| internal(e.to_string()))
}

/// `tasks` events whenever any task changes (data: a version number), so that pages refresh
/// without polling the whole list.
async fn events(State(engine): State<Engine>) -> impl IntoResponse {
    let stream = futures::stream::unfold(None::<u64>, move |last| {
        let engine = engine.clone();
        async move {
            loop {
                let e = engine.clone();
                let v = tokio::task::spawn_blocking(move || e.tasks_version())
                    .await
                    .unwrap_or(0);
                if last != Some(v) {
                    let ev = Event::default().event("tasks").data(v.to_string());
                    return Some((Ok::<_, std::convert::Infallible>(ev), Some(v)));
                }
                tokio::time::sleep(POLL).await;
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A file of a run's outputs, relative to its run directory (`<group>/<index>/<file>`).
#[derive(Debug, Serialize)]
struct FileEntry {
    path: String,
    size: u64,
}

/// The run directory of task `id`, or the response explaining why there is none.
fn run_dir_of(engine: &Engine, id: &str) -> Result<(Task, PathBuf), ApiError> {
    let task = engine
        .status(id)
        .map_err(|e| ApiError(StatusCode::NOT_FOUND, e.to_string()))?;
    let dir = run_dir(engine, &task)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("{id} is not a run")))?;
    Ok((task, dir))
}

async fn files(State(engine): State<Engine>, UrlPath(id): UrlPath<String>) -> Response {
    tokio::task::spawn_blocking(move || {
        let (_, dir) = match run_dir_of(&engine, &id) {
            Ok(x) => x,
            Err(e) => return e.into_response(),
        };
        let mut out = Vec::new();
        // Symlinks a plan left are listed as nothing: never followed out of the run.
        for e in walkdir::WalkDir::new(&dir)
            .follow_links(false)
            .sort_by_file_name()
            .into_iter()
            .flatten()
        {
            if !e.file_type().is_file() {
                continue;
            }
            if let Ok(rel) = e.path().strip_prefix(&dir) {
                out.push(FileEntry {
                    path: rel.to_string_lossy().into_owned(),
                    size: e.metadata().map(|m| m.len()).unwrap_or(0),
                });
            }
        }
        Json(out).into_response()
    })
    .await
    .unwrap_or_else(|e| internal(e.to_string()))
}

#[derive(Debug, Deserialize)]
struct FileQuery {
    path: String,
    #[serde(default)]
    offset: u64,
    /// As in [`OffsetQuery`].
    #[serde(default)]
    tail: Option<u64>,
    /// Send the whole file as an attachment instead of a chunk of text.
    #[serde(default)]
    download: bool,
}

/// `rel` as a path under `root` that cannot climb out of it.
fn contained(root: &Path, rel: &str) -> Option<PathBuf> {
    let p = Path::new(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(root.join(p))
}

async fn file(
    State(engine): State<Engine>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<FileQuery>,
) -> Response {
    let r = tokio::task::spawn_blocking(move || {
        let (task, dir) = run_dir_of(&engine, &id)?;
        let path = contained(&dir, &q.path).ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("path {:?} is not a file of the run", q.path),
            )
        })?;
        // A symlink would lead out of the run directory.
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => {}
            _ => {
                return Err(ApiError(
                    StatusCode::NOT_FOUND,
                    format!("no file {} in run {id}", q.path),
                ));
            }
        }
        Ok((task, path))
    })
    .await;
    let (task, path) = match r {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return e.into_response(),
        Err(e) => return internal(e.to_string()),
    };
    if !q.download {
        return tokio::task::spawn_blocking(move || {
            let from = From {
                offset: q.offset,
                tail: q.tail,
            };
            read_chunk(&path, from, task.state().is_final())
        })
        .await
        .unwrap_or_else(|e| internal(e.to_string()));
    }
    let f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return internal(format!("cannot open {}: {e}", path.display())),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace(['"', '\\'], "_"))
        .unwrap_or_default();
    let mut r = Body::from_stream(tokio_util::io::ReaderStream::new(f)).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

async fn run_metrics(State(engine): State<Engine>, UrlPath(id): UrlPath<String>) -> Response {
    tokio::task::spawn_blocking(move || match run_dir_of(&engine, &id) {
        Ok((_, dir)) => Json(metrics::index(&dir)).into_response(),
        Err(e) => e.into_response(),
    })
    .await
    .unwrap_or_else(|e| internal(e.to_string()))
}

#[derive(Debug, Deserialize)]
struct SeriesQuery {
    set: MetricSet,
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    measure: Option<String>,
    /// Per-instance series returned at most (all by default); group means use every instance.
    #[serde(default)]
    instances: Option<usize>,
}

impl SeriesQuery {
    fn key(&self) -> (MetricKey, String) {
        let measure = self
            .measure
            .clone()
            .unwrap_or_else(|| metrics::default_measure(&self.kind).to_string());
        (
            MetricKey {
                set: self.set,
                name: self.name.clone(),
                kind: self.kind.clone(),
            },
            measure,
        )
    }
}

async fn run_series(
    State(engine): State<Engine>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<SeriesQuery>,
) -> Response {
    tokio::task::spawn_blocking(move || match run_dir_of(&engine, &id) {
        Ok((_, dir)) => {
            let (key, measure) = q.key();
            let max = q.instances.unwrap_or(usize::MAX);
            Json(metrics::series(&dir, &key, &measure, max)).into_response()
        }
        Err(e) => e.into_response(),
    })
    .await
    .unwrap_or_else(|e| internal(e.to_string()))
}

/// One run in a plan's metric history.
#[derive(Debug, Serialize)]
struct HistoryPoint {
    id: String,
    created: Option<chrono::DateTime<chrono::Utc>>,
    outcome: String,
    created_by: tg_api::task::CreatedBy,
    value: Option<f64>,
}

#[derive(Debug, Serialize)]
struct History {
    /// Metrics of the newest runs, to choose from.
    metrics: Vec<metrics::MetricInfo>,
    /// Oldest first; `value` only when a metric was asked for.
    runs: Vec<HistoryPoint>,
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    #[serde(default)]
    set: Option<MetricSet>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    measure: Option<String>,
}

async fn plan_metrics(
    State(engine): State<Engine>,
    UrlPath((plan, case)): UrlPath<(String, String)>,
    Query(q): Query<HistoryQuery>,
) -> Response {
    tokio::task::spawn_blocking(move || {
        let filters = TasksFilters {
            types: vec![TaskType::Run],
            states: vec![TaskState::Complete],
            test_plan: plan,
            test_case: case,
        };
        let tasks = match engine.tasks(&filters) {
            Ok(t) => t,
            Err(e) => return internal(e.to_string()),
        };
        let mut tasks: Vec<Task> = tasks.into_iter().take(HISTORY_RUNS).collect();
        tasks.reverse();
        let wanted = match (q.set, q.name, q.kind) {
            (Some(set), Some(name), Some(kind)) => {
                let measure = q
                    .measure
                    .unwrap_or_else(|| metrics::default_measure(&kind).to_string());
                Some((MetricKey { set, name, kind }, measure))
            }
            _ => None,
        };
        let mut picked: std::collections::BTreeMap<MetricKey, metrics::MetricInfo> =
            Default::default();
        // The metric list comes from the newest runs: enough to pick from without reading
        // every file of every run.
        for t in tasks.iter().rev().take(5) {
            if let Some(dir) = run_dir(&engine, t) {
                for m in metrics::index(&dir) {
                    picked.entry(m.key.clone()).or_insert(m);
                }
            }
        }
        let runs = tasks
            .iter()
            .map(|t| HistoryPoint {
                id: t.id.clone(),
                created: t.created(),
                outcome: t.outcome().to_string(),
                created_by: t.created_by.clone(),
                value: wanted.as_ref().and_then(|(key, measure)| {
                    metrics::final_value(&run_dir(&engine, t)?, key, measure)
                }),
            })
            .collect();
        Json(History {
            metrics: picked.into_values().collect(),
            runs,
        })
        .into_response()
    })
    .await
    .unwrap_or_else(|e| internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_reads_start_at_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "aaaa\nbbbb\ncccc\n").unwrap();
        let whole = |offset, tail| {
            read_at(&p, From { offset, tail })
                .map(|(b, s, l)| (String::from_utf8(b).unwrap(), s, l))
                .unwrap()
        };
        assert_eq!(whole(0, None), ("aaaa\nbbbb\ncccc\n".into(), 0, 15));
        // 7 bytes before the end is inside "bbbb": start at "cccc".
        assert_eq!(whole(0, Some(7)), ("cccc\n".into(), 10, 15));
        assert_eq!(whole(0, Some(100)).1, 0, "a short file is read whole");
        assert_eq!(
            whole(5, Some(7)).0,
            "bbbb\ncccc\n",
            "an offset wins over tail"
        );
    }

    #[test]
    fn paths_stay_inside_the_run() {
        let root = Path::new("/r");
        assert_eq!(
            contained(root, "single/0/run.out"),
            Some(PathBuf::from("/r/single/0/run.out"))
        );
        for bad in ["", "../x", "/etc/passwd", "a/../../b", "./a"] {
            assert_eq!(contained(root, bad), None, "{bad}");
        }
    }
}
