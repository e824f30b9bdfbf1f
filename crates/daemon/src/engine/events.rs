//! A task's typed event stream, and its rendering into the task log.
//!
//! Everything the engine reports about a task is a [`TaskEvent`]. [`TaskEvents::emit`] renders
//! it into the task log (the original's console lines, which scripts scrape: the log is the
//! record and loses nothing) and then broadcasts it to live subscribers (a dashboard, a metrics
//! exporter), which may lag and drop events without slowing the task.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tg_api::task::{RunResult, TaskState};
use tg_runner::RunnerEvent;
use tokio::sync::broadcast;

use crate::journal::RunJournal;
use crate::tasklog::LogWriter;

/// How many events a lagging live subscriber may fall behind before it misses some.
pub const BROADCAST_CAPACITY: usize = 4096;

/// The level of an engine line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

/// One thing that happened to a task.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TaskEvent {
    /// The task entered a state.
    State(TaskState),
    /// A free-form engine line.
    Log { level: Level, text: String },
    /// A build of some groups began.
    BuildStarted {
        plan: String,
        groups: Vec<String>,
        builder: String,
    },
    /// A line of a builder's output.
    BuildOutput(String),
    BuildSucceeded {
        plan: String,
        groups: Vec<String>,
        builder: String,
        artifact: String,
        cached: bool,
        took: Duration,
    },
    /// The run began.
    RunStarted(RunSummary),
    /// What the runner reported: progress, instance lines.
    Runner(RunnerEvent),
    /// The run ended with a result.
    RunFinished { run: RunSummary, result: RunResult },
    /// The run was canceled.
    RunCanceled,
    /// The task failed (it ends `canceled`, with this error).
    Failed(String),
}

/// Which run an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub run_id: String,
    pub plan: String,
    pub case: String,
    pub runner: String,
    pub instances: u32,
}

impl RunSummary {
    fn fields(&self) -> String {
        format!(
            "{{\"run_id\": {:?}, \"plan\": {:?}, \"case\": {:?}, \"runner\": {:?}, \"instances\": {}}}",
            self.run_id, self.plan, self.case, self.runner, self.instances
        )
    }
}

/// A daemon log line in the original's console format: `Jan  6 08:15:50.651158\tINFO\t<msg>`.
pub fn log_line(level: &str, msg: &str) -> String {
    format!(
        "{}\t{level}\t{msg}",
        Utc::now().format("%b %e %H:%M:%S%.6f")
    )
}

/// The log lines of an event (level, text); most events have one, state changes none.
pub fn render(ev: &TaskEvent) -> Option<(Level, String)> {
    let line = match ev {
        TaskEvent::State(_) => return None,
        TaskEvent::Log { level, text } => (*level, text.clone()),
        TaskEvent::BuildStarted {
            plan,
            groups,
            builder,
        } => (
            Level::Info,
            format!(
                "performing build for groups\t{{\"plan\": {plan:?}, \"groups\": {groups:?}, \"builder\": {builder:?}}}"
            ),
        ),
        TaskEvent::BuildOutput(line) => (Level::Info, format!("build: {line}")),
        TaskEvent::BuildSucceeded {
            plan,
            groups,
            builder,
            artifact,
            cached,
            took,
        } => (
            Level::Info,
            format!(
                "build succeeded\t{{\"plan\": {plan:?}, \"groups\": {groups:?}, \"builder\": {builder:?}, \"artifact\": {artifact:?}, \"cached\": {cached}, \"took\": \"{:.1}s\"}}",
                took.as_secs_f64()
            ),
        ),
        TaskEvent::RunStarted(run) => (Level::Info, format!("starting run\t{}", run.fields())),
        TaskEvent::Runner(RunnerEvent::Log(s)) => (Level::Info, s.clone()),
        TaskEvent::Runner(RunnerEvent::Started { started, total }) => {
            (Level::Info, format!("started {started}/{total} instances"))
        }
        TaskEvent::Runner(RunnerEvent::Instance(line)) => (Level::Info, line.render()),
        // Typed records for the dashboard and the exporter; the log already has their words.
        TaskEvent::Runner(
            RunnerEvent::Exited { .. }
            | RunnerEvent::Network { .. }
            | RunnerEvent::NetworkApplied { .. },
        ) => return None,
        TaskEvent::RunFinished { run, result } => (
            Level::Info,
            format!("run finished with {result}\t{}", run.fields()),
        ),
        TaskEvent::RunCanceled => (Level::Warn, "run canceled".to_string()),
        TaskEvent::Failed(e) => (Level::Error, format!("task failed: {e}")),
    };
    Some(line)
}

/// The emitting end of a task's events: owned by the worker executing the task.
pub(crate) struct TaskEvents {
    log: LogWriter,
    tx: broadcast::Sender<Arc<TaskEvent>>,
    journal: Arc<Mutex<RunJournal>>,
}

impl TaskEvents {
    pub(crate) fn new(
        log: LogWriter,
        tx: broadcast::Sender<Arc<TaskEvent>>,
        journal: Arc<Mutex<RunJournal>>,
    ) -> Self {
        TaskEvents { log, tx, journal }
    }

    pub(crate) fn emit(&mut self, ev: TaskEvent) {
        if let Some((level, text)) = render(&ev) {
            self.log.line(&log_line(level.as_str(), &text));
        }
        {
            let mut j = crate::lock(&self.journal);
            if j.apply(&ev) {
                j.write_if_due(std::time::Instant::now());
            }
        }
        // No subscriber is the common case.
        let _ = self.tx.send(Arc::new(ev));
    }

    /// Ends the log: followers see the end of the task.
    pub(crate) fn finish(self) {
        crate::lock(&self.journal).flush();
        self.log.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_original_lines() {
        let run = RunSummary {
            run_id: "r1".into(),
            plan: "p".into(),
            case: "c".into(),
            runner: "local:exec".into(),
            instances: 2,
        };
        let (level, text) = render(&TaskEvent::RunStarted(run.clone())).unwrap();
        assert_eq!(level, Level::Info);
        assert_eq!(
            text,
            "starting run\t{\"run_id\": \"r1\", \"plan\": \"p\", \"case\": \"c\", \"runner\": \"local:exec\", \"instances\": 2}"
        );
        assert!(render(&TaskEvent::State(TaskState::Processing)).is_none());
        let (level, text) = render(&TaskEvent::Failed("boom".into())).unwrap();
        assert_eq!((level, text.as_str()), (Level::Error, "task failed: boom"));
    }

    #[tokio::test]
    async fn emitted_events_reach_the_log_and_subscribers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.out");
        let (log, _progress) = LogWriter::create(&path).unwrap();
        let (tx, mut rx) = broadcast::channel(16);
        let journal = Arc::new(Mutex::new(RunJournal::new(
            dir.path().join("t.journal.json"),
        )));
        let mut events = TaskEvents::new(log, tx, journal);
        events.emit(TaskEvent::Log {
            level: Level::Info,
            text: "hello".into(),
        });
        events.emit(TaskEvent::State(TaskState::Complete));
        events.finish();
        assert_eq!(
            *rx.recv().await.unwrap(),
            TaskEvent::Log {
                level: Level::Info,
                text: "hello".into()
            }
        );
        assert_eq!(
            *rx.recv().await.unwrap(),
            TaskEvent::State(TaskState::Complete)
        );
        let mut reader = crate::tasklog::LogReader::new(path);
        let chunks = reader.read_available();
        assert_eq!(chunks.len(), 1, "state changes are not log lines");
    }
}
