//! Builders turn a test plan's sources into an artifact the runners can start.
//! (Being written: see the contract below.)

use std::collections::BTreeMap;
use std::path::PathBuf;

/// What to build. The engine fills it from the resolved composition.
#[derive(Debug, Clone)]
pub struct BuildInput {
    /// Unique id of this build (an xid); used to name the artifact.
    pub build_id: String,
    /// The plan's name (manifest `name`), used in artifact names.
    pub plan: String,
    /// The plan's source directory. Builders must not modify it (copy first if needed).
    pub plan_dir: PathBuf,
    /// Builder id, e.g. `exec:go`.
    pub builder: String,
    /// Coalesced build configuration (manifest `[builders."<id>"]` < global < group).
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Build selectors (Go build tags / cargo features).
    pub selectors: Vec<String>,
    /// Dependency rewrites (`--dep module=target@version`).
    pub dependencies: Vec<Dependency>,
    /// `$TESTGROUND_HOME/data/work`: where artifacts and caches live.
    pub work_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub module: String,
    pub target: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOutput {
    /// Path of an executable file the runner starts for each instance.
    pub artifact: String,
    /// True when nothing had to be compiled (cache hit).
    pub cached: bool,
    /// Resolved dependency versions, when the toolchain reports them (`go list -m all`).
    pub dependencies: BTreeMap<String, String>,
}

/// Progress lines of a build (compiler output etc.), for the task log.
pub type Progress = tokio::sync::mpsc::UnboundedSender<String>;
