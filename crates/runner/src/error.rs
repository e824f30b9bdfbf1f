use std::path::PathBuf;

/// Why a run (or a collect) could not be carried out. Instance failures are not errors: they
/// are outcomes in the run result.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("unknown runner {runner:?} (supported: {supported})")]
    UnsupportedRunner { runner: String, supported: String },

    #[error("runner {runner} is not supported yet by this build (supported: {supported})")]
    NotSupported { runner: String, supported: String },

    #[error("unknown run configuration key {key:?} for runner {runner} (known keys: {known})")]
    UnknownConfigKey {
        runner: String,
        key: String,
        known: String,
    },

    #[error("local:netns cannot run here: {reason}")]
    NetnsUnavailable { reason: String },

    #[error("local:docker: {0}")]
    Docker(String),

    #[error("cluster:k8s: {0}")]
    K8s(String),

    #[error("cannot set up the run's network: {0}")]
    RunNetwork(tg_sidecar::SidecarError),

    #[error("invalid run configuration {key} = {value}: {reason}")]
    InvalidConfig {
        key: String,
        value: String,
        reason: String,
    },

    #[error("cannot start instance {group}[{index}] from {}", path.display())]
    Spawn {
        group: String,
        index: u32,
        path: PathBuf,
        source: std::io::Error,
    },

    #[error(
        "{instances} instances need about {need} open files in the engine, but its limit is {limit}: {hint}"
    )]
    FileLimit {
        instances: u32,
        need: u64,
        limit: u64,
        hint: String,
    },

    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("run id {run_id} matches {} runs under runner {runner}", matches.len())]
    AmbiguousRun {
        run_id: String,
        runner: String,
        matches: Vec<PathBuf>,
    },
}

impl RunError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| RunError::Io {
            action,
            path,
            source,
        }
    }
}
