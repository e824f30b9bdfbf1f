//! The daemon's HTTP API bodies: requests, and the streamed response chunks.
//!
//! Every POST endpoint answers `200 application/json` with a body made of concatenated JSON
//! chunks (one per line here, which the original's decoder also accepts):
//!
//! ```json
//! {"t":112,"p":"<base64 of log bytes>"}       // 'p' progress, zero or more
//! {"t":98,"p":"<base64 of binary bytes>"}     // 'b' binary (collect)
//! {"t":114,"p":<any JSON>}                    // 'r' result, exactly one ...
//! {"t":101,"e":{"m":"<message>"}}             // 'e' ... or an error
//! ```
//!
//! `t` is a JSON integer (a Go rune in the original), not a string.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::task::{CreatedBy, TaskState, TaskType};

pub const CHUNK_PROGRESS: u32 = b'p' as u32;
pub const CHUNK_BINARY: u32 = b'b' as u32;
pub const CHUNK_RESULT: u32 = b'r' as u32;
pub const CHUNK_ERROR: u32 = b'e' as u32;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkError {
    pub m: String,
}

/// One element of a streamed response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub t: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<ChunkError>,
}

/// A decoded chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum ChunkKind {
    Progress(Vec<u8>),
    Binary(Vec<u8>),
    Result(serde_json::Value),
    Error(String),
}

impl Chunk {
    pub fn progress(bytes: &[u8]) -> Self {
        Chunk {
            t: CHUNK_PROGRESS,
            p: Some(b64(bytes)),
            e: None,
        }
    }
    pub fn binary(bytes: &[u8]) -> Self {
        Chunk {
            t: CHUNK_BINARY,
            p: Some(b64(bytes)),
            e: None,
        }
    }
    pub fn result(v: serde_json::Value) -> Self {
        Chunk {
            t: CHUNK_RESULT,
            p: Some(v),
            e: None,
        }
    }
    pub fn error(m: impl Into<String>) -> Self {
        Chunk {
            t: CHUNK_ERROR,
            p: None,
            e: Some(ChunkError { m: m.into() }),
        }
    }

    /// Decodes the chunk; `None` for an unknown type or a malformed payload.
    pub fn decode(self) -> Option<ChunkKind> {
        let bytes = |p: Option<serde_json::Value>| -> Option<Vec<u8>> {
            let s = p?;
            base64::engine::general_purpose::STANDARD
                .decode(s.as_str()?)
                .ok()
        };
        match self.t {
            CHUNK_PROGRESS => bytes(self.p).map(ChunkKind::Progress),
            CHUNK_BINARY => bytes(self.p).map(ChunkKind::Binary),
            CHUNK_RESULT => Some(ChunkKind::Result(self.p.unwrap_or(serde_json::Value::Null))),
            CHUNK_ERROR => Some(ChunkKind::Error(self.e.map(|e| e.m).unwrap_or_default())),
            _ => None,
        }
    }
}

fn b64(bytes: &[u8]) -> serde_json::Value {
    serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// `POST /build` and `POST /run` body.
///
/// Plan sources travel inside the request as a gzipped tar (base64), so a daemon on another
/// machine can build them; `None` when no group needs building.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRequest {
    #[serde(rename = "type")]
    pub task_type: TaskType,
    #[serde(default)]
    pub priority: i32,
    pub composition: crate::composition::Composition,
    pub manifest: crate::manifest::Manifest,
    /// Indices of the groups to build (run requests); all groups for build requests.
    #[serde(default)]
    pub build_groups: Vec<usize>,
    /// Which `[[runs]]` to execute (one per request, as in the original).
    #[serde(default)]
    pub run_ids: Vec<String>,
    #[serde(default)]
    pub created_by: CreatedBy,
    /// gzipped tar of the plan directory, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_archive: Option<String>,
}

/// `POST /tasks` filter (Go field names, as the original has no json tags).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct TasksFilters {
    #[serde(default)]
    pub types: Vec<TaskType>,
    #[serde(default)]
    pub states: Vec<TaskState>,
    #[serde(default)]
    pub test_plan: String,
    #[serde(default)]
    pub test_case: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusRequest {
    pub task_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogsRequest {
    pub task_id: String,
    #[serde(default)]
    pub follow: bool,
    #[serde(default)]
    pub cancel_with_context: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputsRequest {
    #[serde(default)]
    pub runner: String,
    pub run_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct TerminateRequest {
    #[serde(default)]
    pub runner: String,
    #[serde(default)]
    pub builder: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthcheckRequest {
    pub runner: String,
    #[serde(default)]
    pub fix: bool,
    /// The instance count to check host limits for (default: the runner's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<u32>,
}

/// Healthcheck report (Go field names, as in the original).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct HealthcheckReport {
    pub checks: Vec<HealthcheckItem>,
    pub fixes: Vec<HealthcheckItem>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthcheckItem {
    pub name: String,
    pub status: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_type_is_an_integer_on_the_wire() {
        let s = serde_json::to_string(&Chunk::progress(b"hello\n")).unwrap();
        assert_eq!(s, r#"{"t":112,"p":"aGVsbG8K"}"#);
        let c: Chunk = serde_json::from_str(r#"{"t":101,"e":{"m":"boom"}}"#).unwrap();
        assert_eq!(c.decode(), Some(ChunkKind::Error("boom".into())));
        let c: Chunk = serde_json::from_str(&s).unwrap();
        assert_eq!(c.decode(), Some(ChunkKind::Progress(b"hello\n".to_vec())));
    }
}
