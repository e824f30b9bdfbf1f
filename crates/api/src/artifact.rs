//! What a builder produces and a runner consumes. A runner declares the kinds it accepts; the
//! engine refuses a run whose builders produce a kind its runner cannot execute before anything
//! is built.

use std::fmt;

/// The kind of an artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    /// An executable file on the engine's host, started with no arguments (`exec:*`).
    Executable,
    /// A container image, known by its id (`docker:*`).
    Image,
}

impl ArtifactKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Executable => "executable",
            ArtifactKind::Image => "image",
        }
    }
}

impl fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
