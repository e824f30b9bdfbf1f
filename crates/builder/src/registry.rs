//! The [`Builder`] trait and the registry of builder ids.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use tokio_util::sync::CancellationToken;

use crate::cache::{self, Kind};
use crate::image::ImageBuilder;
use crate::process::Tools;
use crate::scratch::{self, BuildDir};
use crate::{
    ArtifactKind, BuildError, BuildInput, BuildOutput, Progress, blocking, generic, go, rust,
};

/// Builder ids this crate implements.
pub const BUILDERS: &[&str] = &[
    "exec:rust",
    "exec:go",
    "exec:generic",
    "docker:go",
    "docker:rust",
    "docker:generic",
    "docker:node",
];

/// Builder ids that are known but not implemented yet (none at the moment); they would produce
/// images.
pub const PLANNED_BUILDERS: &[&str] = &[];

/// A boxed future, so that [`Builder`] stays usable as `dyn Builder`.
pub type BuildFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Turns plan sources into an artifact.
pub trait Builder: Send + Sync {
    /// The id compositions name it by, e.g. `exec:go`.
    fn id(&self) -> &'static str;

    /// What [`Builder::build`] produces; the engine checks it against what the runner accepts.
    fn artifact_kind(&self) -> ArtifactKind;

    /// Builds `input` (whose `builder` is this builder's id), streaming progress lines, or
    /// returns the cached artifact of an identical earlier build. Canceling stops every process
    /// the build started.
    fn build<'a>(
        &'a self,
        input: &'a BuildInput,
        progress: &'a Progress,
        cancel: &'a CancellationToken,
    ) -> BuildFuture<'a, Result<BuildOutput, BuildError>>;

    /// Removes every cached artifact, build directory and incremental cache of `plan` that this
    /// builder left in `work_dir`.
    fn purge<'a>(
        &'a self,
        plan: &'a str,
        work_dir: &'a Path,
    ) -> BuildFuture<'a, Result<(), BuildError>>;
}

/// A builder of the registry: its id and which of the crate's builders it is. `exec:*`
/// builders make an executable on this host (below); `docker:*` ones an image
/// ([`ImageBuilder`]).
struct Registered {
    id: &'static str,
    kind: Kind,
}

impl Registered {
    fn image(&self) -> Option<ImageBuilder> {
        matches!(
            self.kind,
            Kind::DockerGo | Kind::DockerRust | Kind::DockerGeneric | Kind::DockerNode
        )
        .then_some(ImageBuilder {
            id: self.id,
            kind: self.kind,
        })
    }

    /// An `exec:*` build: an executable cached by content.
    async fn run_exec(
        &self,
        input: &BuildInput,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<BuildOutput, BuildError> {
        if cancel.is_cancelled() {
            return Err(BuildError::Canceled);
        }
        tokio::fs::create_dir_all(&input.work_dir)
            .await
            .map_err(|e| BuildError::io("create work directory", &input.work_dir, e))?;
        // Whatever builds of a killed engine left (directories, processes) goes first. It may
        // wait a little for killed processes to exit, so off the async threads.
        {
            let work_dir = input.work_dir.clone();
            blocking("clean", &input.work_dir, move || {
                scratch::clean_stale(&work_dir);
                Ok(())
            })
            .await?;
        }
        let dir = BuildDir::create(&input.work_dir, &input.build_id)?;
        let tools = Tools {
            builder: &input.builder,
            progress,
            cancel,
            scratch: &dir,
        };
        let out = match self.kind {
            Kind::Rust => rust::build(input, &tools).await?,
            Kind::Go => go::build(input, &tools).await?,
            Kind::Generic => generic::build(input, &tools).await?,
            Kind::DockerGo | Kind::DockerRust | Kind::DockerGeneric | Kind::DockerNode => {
                unreachable!("`image()` takes the docker kinds")
            }
        };
        tracing::debug!(builder = %input.builder, plan = %input.plan, artifact = %out.artifact,
            cached = out.cached, "build finished");
        Ok(out)
    }
}

impl Builder for Registered {
    fn id(&self) -> &'static str {
        self.id
    }

    fn artifact_kind(&self) -> ArtifactKind {
        if self.image().is_some() {
            ArtifactKind::Image
        } else {
            ArtifactKind::Executable
        }
    }

    fn build<'a>(
        &'a self,
        input: &'a BuildInput,
        progress: &'a Progress,
        cancel: &'a CancellationToken,
    ) -> BuildFuture<'a, Result<BuildOutput, BuildError>> {
        Box::pin(async move {
            match self.image() {
                Some(image) => image.run(input, progress, cancel).await,
                None => self.run_exec(input, progress, cancel).await,
            }
        })
    }

    fn purge<'a>(
        &'a self,
        plan: &'a str,
        work_dir: &'a Path,
    ) -> BuildFuture<'a, Result<(), BuildError>> {
        Box::pin(async move {
            if let Some(image) = self.image() {
                return image.purge(plan, work_dir).await;
            }
            let (kind, plan, dir) = (self.kind, plan.to_owned(), work_dir.to_owned());
            blocking("purge", &dir.clone(), move || {
                cache::purge(kind, &plan, &dir)
            })
            .await
        })
    }
}

static EXEC_RUST: Registered = Registered {
    id: "exec:rust",
    kind: Kind::Rust,
};
static EXEC_GO: Registered = Registered {
    id: "exec:go",
    kind: Kind::Go,
};
static EXEC_GENERIC: Registered = Registered {
    id: "exec:generic",
    kind: Kind::Generic,
};
static DOCKER_GO: Registered = Registered {
    id: "docker:go",
    kind: Kind::DockerGo,
};
static DOCKER_RUST: Registered = Registered {
    id: "docker:rust",
    kind: Kind::DockerRust,
};
static DOCKER_GENERIC: Registered = Registered {
    id: "docker:generic",
    kind: Kind::DockerGeneric,
};
static DOCKER_NODE: Registered = Registered {
    id: "docker:node",
    kind: Kind::DockerNode,
};
static REGISTRY: [&dyn Builder; 7] = [
    &EXEC_RUST,
    &EXEC_GO,
    &EXEC_GENERIC,
    &DOCKER_GO,
    &DOCKER_RUST,
    &DOCKER_GENERIC,
    &DOCKER_NODE,
];

/// Every implemented builder, in the order of [`BUILDERS`].
pub fn builders() -> &'static [&'static dyn Builder] {
    &REGISTRY
}

/// The implemented builder with this id.
pub fn get(id: &str) -> Option<&'static dyn Builder> {
    REGISTRY.iter().copied().find(|b| b.id() == id)
}

/// The implemented builder with this id, or an error that says whether the id is planned
/// ([`BuildError::NotSupportedYet`]) or unknown ([`BuildError::Unsupported`]).
pub fn lookup(id: &str) -> Result<&'static dyn Builder, BuildError> {
    get(id).ok_or_else(|| {
        if PLANNED_BUILDERS.contains(&id) {
            BuildError::NotSupportedYet {
                builder: id.to_owned(),
            }
        } else {
            BuildError::Unsupported {
                builder: id.to_owned(),
            }
        }
    })
}

/// The kind of artifact builder `id` produces, for implemented and planned builders alike
/// (so that a composition pairing a `docker:*` builder with a runner that only starts
/// executables can be refused for that reason). `None` for unknown ids.
pub fn artifact_kind(id: &str) -> Option<ArtifactKind> {
    if let Some(b) = get(id) {
        Some(b.artifact_kind())
    } else if PLANNED_BUILDERS.contains(&id) {
        Some(ArtifactKind::Image)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_matches_the_id_lists() {
        let ids: Vec<&str> = builders().iter().map(|b| b.id()).collect();
        assert_eq!(ids, BUILDERS);
        for id in BUILDERS {
            assert_eq!(get(id).map(|b| b.id()), Some(*id));
            let kind = if id.starts_with("docker:") {
                ArtifactKind::Image
            } else {
                ArtifactKind::Executable
            };
            assert_eq!(artifact_kind(id), Some(kind));
        }
        for id in PLANNED_BUILDERS {
            assert!(get(id).is_none());
            assert_eq!(artifact_kind(id), Some(ArtifactKind::Image));
            assert!(matches!(
                lookup(id),
                Err(BuildError::NotSupportedYet { .. })
            ));
        }
        assert_eq!(artifact_kind("exec:cobol"), None);
        assert!(matches!(
            lookup("exec:cobol"),
            Err(BuildError::Unsupported { .. })
        ));
    }
}
