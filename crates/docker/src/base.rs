//! The default base images, and how to make them offline from the host's own toolchains when
//! they cannot be pulled.
//!
//! STUB: only the names and [`ensure`]'s contract are final; the recipes come next.

use tokio_util::sync::CancellationToken;

use crate::{Docker, DockerError, Progress};

/// `docker:go`'s default runtime image (the original's).
pub const BUSYBOX: &str = "busybox:1.35.0-glibc";
/// `docker:go`'s default build image: the Go toolchain on Debian bookworm.
pub const GOLANG: &str = "golang:1.26-bookworm";
/// `docker:node`'s default base image.
pub const NODE: &str = "node:20-bookworm";
/// `docker:rust`'s default build image.
pub const RUST: &str = "rust:1.95-bookworm";
/// `docker:rust`'s default runtime image.
pub const DEBIAN_SLIM: &str = "debian:bookworm-slim";
/// The image of `local:docker`'s pause containers (they hold each instance's namespaces).
pub const PAUSE: &str = "testground/pause:1";

/// The id of image `image`; when the engine lacks it and this module has a recipe for it,
/// makes it offline first (reporting on `progress`); otherwise fails with
/// [`DockerError::MissingImage`] saying how to get it.
pub async fn ensure(
    docker: &Docker,
    image: &str,
    _progress: Progress<'_>,
    _cancel: &CancellationToken,
) -> Result<String, DockerError> {
    match docker.image_id(image).await? {
        Some(id) => Ok(id),
        None => Err(DockerError::MissingImage {
            image: image.to_string(),
            hint: "pull or load it (`docker pull`, `docker load`), or run `testground healthcheck \
                   --runner local:docker --fix` to make the default images offline"
                .into(),
        }),
    }
}
