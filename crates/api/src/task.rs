//! Tasks as the daemon stores and serves them (`testground tasks`, `status`, `logs`).
//!
//! The JSON shape follows the original's `Task` so that scripts parsing
//! `testground status --extended` keep working.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What a task does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskType {
    Build,
    Run,
}

impl fmt::Display for TaskType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskType::Build => "build",
            TaskType::Run => "run",
        })
    }
}

/// Life cycle of a task: `scheduled` → `processing` → `complete` | `canceled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Scheduled,
    Processing,
    Complete,
    Canceled,
}

impl TaskState {
    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Complete | TaskState::Canceled)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Scheduled => "scheduled",
            TaskState::Processing => "processing",
            TaskState::Complete => "complete",
            TaskState::Canceled => "canceled",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outcome of a run (or of a task, see [`Task::outcome`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    #[default]
    Unknown,
    Success,
    Failure,
    Canceled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Unknown => "unknown",
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Canceled => "canceled",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-group tally: how many instances of the group ended ok, out of how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GroupOutcome {
    pub ok: u32,
    pub total: u32,
}

/// Free-form notes about a run (the original filled it from Kubernetes events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Journal {
    #[serde(default)]
    pub events: BTreeMap<String, String>,
    #[serde(default)]
    pub pods_statuses: BTreeMap<String, serde_json::Value>,
}

/// Result of a run task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RunResult {
    pub outcome: Outcome,
    /// Keyed by run-group id.
    pub outcomes: BTreeMap<String, GroupOutcome>,
    #[serde(default)]
    pub journal: Journal,
}

impl RunResult {
    /// Builds a result from per-group tallies: `success` iff there is at least one group and
    /// every group is complete.
    pub fn from_outcomes(outcomes: BTreeMap<String, GroupOutcome>) -> Self {
        let success = !outcomes.is_empty() && outcomes.values().all(|g| g.ok == g.total);
        RunResult {
            outcome: if success {
                Outcome::Success
            } else {
                Outcome::Failure
            },
            outcomes,
            journal: Journal::default(),
        }
    }
}

impl fmt::Display for RunResult {
    /// `outcome = success (single:3/3, other:1/2)`: the tail of the original's
    /// `run finished with outcome = ...` line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "outcome = {} (", self.outcome)?;
        for (i, (g, o)) in self.outcomes.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{g}:{}/{}", o.ok, o.total)?;
        }
        f.write_str(")")
    }
}

/// One entry of a task's state journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatedState {
    pub created: DateTime<Utc>,
    pub state: TaskState,
}

/// Who asked for the task (`--metadata-*` flags and `client.user`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CreatedBy {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub repo: String,
    #[serde(default)]
    pub branch: String,
    #[serde(default)]
    pub commit: String,
}

/// A build or run task. The task id is also the run id (`TEST_RUN`), an xid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    #[serde(default)]
    pub version: u32,
    pub priority: i32,
    pub id: String,
    #[serde(default)]
    pub runner: String,
    #[serde(default)]
    pub plan: String,
    #[serde(default)]
    pub case: String,
    pub states: Vec<DatedState>,
    #[serde(rename = "type")]
    pub task_type: TaskType,
    /// The effective composition (artifacts filled in once built).
    #[serde(default)]
    pub composition: serde_json::Value,
    /// The request as received.
    #[serde(default)]
    pub input: serde_json::Value,
    /// Run tasks: a [`RunResult`]; build tasks: the list of artifacts, one per group.
    #[serde(default)]
    pub result: serde_json::Value,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub created_by: CreatedBy,
}

impl Task {
    /// The current (last) state.
    pub fn state(&self) -> TaskState {
        self.states
            .last()
            .map(|s| s.state)
            .unwrap_or(TaskState::Scheduled)
    }

    /// When the task was created (its first state).
    pub fn created(&self) -> Option<DateTime<Utc>> {
        self.states.first().map(|s| s.created)
    }

    /// When the task last changed state.
    pub fn last_update(&self) -> Option<DateTime<Utc>> {
        self.states.last().map(|s| s.created)
    }

    /// The original's `DecodeTaskOutcome`: canceled → canceled, unfinished → unknown,
    /// complete build → success, complete run → the result's outcome (success when the result
    /// is missing, as in the original).
    pub fn outcome(&self) -> Outcome {
        match self.state() {
            TaskState::Canceled => Outcome::Canceled,
            TaskState::Scheduled | TaskState::Processing => Outcome::Unknown,
            TaskState::Complete => match self.task_type {
                TaskType::Build => Outcome::Success,
                TaskType::Run => self
                    .run_result()
                    .map(|r| r.outcome)
                    .unwrap_or(Outcome::Success),
            },
        }
    }

    /// The run result, if this is a finished run task with one.
    pub fn run_result(&self) -> Option<RunResult> {
        if self.result.is_null() {
            return None;
        }
        serde_json::from_value(self.result.clone()).ok()
    }

    /// Time between creation and the last state change.
    pub fn took(&self) -> Option<chrono::Duration> {
        Some(self.last_update()? - self.created()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(states: &[TaskState], ty: TaskType, result: serde_json::Value) -> Task {
        Task {
            version: 0,
            priority: 0,
            id: "x".into(),
            runner: String::new(),
            plan: String::new(),
            case: String::new(),
            states: states
                .iter()
                .map(|s| DatedState {
                    created: Utc::now(),
                    state: *s,
                })
                .collect(),
            task_type: ty,
            composition: serde_json::Value::Null,
            input: serde_json::Value::Null,
            result,
            error: String::new(),
            created_by: CreatedBy::default(),
        }
    }

    #[test]
    fn outcome_follows_the_original_decoding() {
        use TaskState::*;
        assert_eq!(
            task(&[Scheduled], TaskType::Run, serde_json::Value::Null).outcome(),
            Outcome::Unknown
        );
        assert_eq!(
            task(
                &[Scheduled, Processing, Canceled],
                TaskType::Run,
                serde_json::Value::Null
            )
            .outcome(),
            Outcome::Canceled
        );
        assert_eq!(
            task(
                &[Scheduled, Complete],
                TaskType::Run,
                serde_json::Value::Null
            )
            .outcome(),
            Outcome::Success
        );
        let failed = serde_json::to_value(RunResult::from_outcomes(
            [("single".to_string(), GroupOutcome { ok: 1, total: 2 })].into(),
        ))
        .unwrap();
        assert_eq!(
            task(&[Scheduled, Complete], TaskType::Run, failed).outcome(),
            Outcome::Failure
        );
    }

    #[test]
    fn result_display_matches_the_original_line() {
        let r = RunResult::from_outcomes(
            [
                ("a".to_string(), GroupOutcome { ok: 2, total: 2 }),
                ("b".to_string(), GroupOutcome { ok: 1, total: 3 }),
            ]
            .into(),
        );
        assert_eq!(r.to_string(), "outcome = failure (a:2/2, b:1/3)");
        assert!(RunResult::from_outcomes(BTreeMap::new()).outcome == Outcome::Failure);
    }
}
