//! Builders turn a test plan's sources into an artifact the runners can start. Each builder
//! implements [`Builder`] and is found through the registry ([`builders`], [`get`],
//! [`lookup`]); it declares the [`ArtifactKind`] it produces: an executable file under the work
//! directory, started with no arguments (`exec:*`), or a container image (the coming
//! `docker:*` builders, known to the registry as [`PLANNED_BUILDERS`] and refused as
//! "not supported yet").
//!
//! This crate owns the `exec:*` builders (`exec:rust`, `exec:go`, `exec:generic`), their content
//! addressed artifact cache, and the supervision of toolchain processes (progress streaming,
//! cancellation by process group, failure tails, cleanup after a killed engine). It does not
//! resolve manifests or compositions (that is `tg-plan`), pick builders per group or
//! de-duplicate builds (the daemon's engine), nor run artifacts (`tg-runner`).
//!
//! Concurrency: builds of one artifact are serialized within a process and across processes
//! sharing a work dir (a `flock` per cache key), so the second finds the first one's artifact.
//! Each build works in its own directory (`scratch`), and every artifact is installed by an
//! atomic rename, so no reader ever sees a half-written one.
//!
//! Modules:
//! - `registry`: the [`Builder`] trait and the registry of builder ids.
//! - `artifact`: [`Artifact`] and its string form (the composition's `run.artifact`).
//! - `scratch`: per-build directories, the process marker [`BUILD_ID_ENV`], and the cleanup
//!   of directories and processes that builds of a killed engine left behind.
//! - `cache`: the cache key (sha256 over sources, builder, config, selectors, dependencies),
//!   artifact naming, atomic installation and purging.
//! - `sources`: walking, hashing and copying plan sources (skipping `target/`, `.git/`,
//!   `node_modules/`).
//! - `process`: running a toolchain command with streamed output, a tail for errors, and a
//!   process-group kill on cancellation.
//! - `config`: typed access to the coalesced build configuration map.
//! - `rust`, `go`, `generic`: the three builders.

mod artifact;
mod cache;
mod config;
mod generic;
mod go;
mod image;
mod process;
mod registry;
mod rust;
mod scratch;
mod sources;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

pub use artifact::{Artifact, ArtifactError, ArtifactKind};
pub use registry::{
    BUILDERS, BuildFuture, Builder, PLANNED_BUILDERS, artifact_kind, builders, get, lookup,
};
pub use scratch::BUILD_ID_ENV;

/// What to build. The engine fills it from the resolved composition.
#[derive(Debug, Clone)]
pub struct BuildInput {
    /// Id of this build (an xid); part of the build directory's name and of the marker
    /// ([`BUILD_ID_ENV`]) its processes carry.
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
    /// What the runner starts for each instance; its kind is the builder's
    /// [`Builder::artifact_kind`].
    pub artifact: Artifact,
    /// True when nothing had to be compiled (cache hit).
    pub cached: bool,
    /// Resolved dependency versions, when the toolchain reports them (`go list -m all`).
    pub dependencies: BTreeMap<String, String>,
}

/// Progress lines of a build (compiler output etc.), for the task log.
pub type Progress = tokio::sync::mpsc::UnboundedSender<String>;

/// Why a build did not produce an artifact.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("builder {builder:?} is not supported (supported: {})", BUILDERS.join(", "))]
    Unsupported { builder: String },
    #[error(
        "builder {builder:?} is not supported yet (planned; supported now: {})",
        BUILDERS.join(", ")
    )]
    NotSupportedYet { builder: String },
    #[error("builder {builder}: bad config key {key:?}: expected {expected}")]
    BadConfig {
        builder: String,
        key: String,
        expected: String,
    },
    #[error(
        "builder {builder} needs {program:?}, which could not be started (is it installed and on PATH?): {source}"
    )]
    Toolchain {
        builder: String,
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("builder {builder}: build failed ({status}); last output lines:\n{tail}")]
    Failed {
        builder: String,
        /// The toolchain's exit status, e.g. `exit status: 101`.
        status: String,
        /// The last lines (at most 20) the failing command printed.
        tail: String,
    },
    #[error("build canceled")]
    Canceled,
    /// The Docker engine could not be used (unreachable, missing image, API error); the
    /// message says what to do about it.
    #[error("builder {builder}: {source}")]
    Docker {
        builder: String,
        #[source]
        source: tg_docker::DockerError,
    },
    #[error("builder {builder}: the build succeeded but did not produce the executable {path}")]
    MissingArtifact { builder: String, path: PathBuf },
    #[error("could not {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl BuildError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        BuildError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Runs blocking file-system work (hashing, copying) off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    op: &'static str,
    path: &Path,
    f: impl FnOnce() -> Result<T, BuildError> + Send + 'static,
) -> Result<T, BuildError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BuildError::io(op, path, io::Error::other(e)))?
}

/// Builds `input` with the builder it names, or returns the cached artifact of an identical
/// earlier build. Shorthand for [`lookup`]`(&input.builder)?.build(..)`.
pub async fn build(
    input: &BuildInput,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<BuildOutput, BuildError> {
    lookup(&input.builder)?.build(input, progress, cancel).await
}

/// Removes every cached artifact, build directory and incremental cache of `plan` that
/// `builder` left in `work_dir`. Other plans and builders are untouched. Shorthand for
/// [`lookup`]`(builder)?.purge(..)`.
pub async fn purge(builder: &str, plan: &str, work_dir: &Path) -> Result<(), BuildError> {
    lookup(builder)?.purge(plan, work_dir).await
}
