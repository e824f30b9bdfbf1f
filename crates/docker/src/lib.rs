//! Testground's access to a Docker engine, shared by the `docker:*` builders and the
//! `local:docker` runner: one connection type ([`Docker`]) that negotiates the API version
//! (Debian's `docker.io` serves 1.41 and has no BuildKit, so every build here uses the classic
//! builder), image builds from a tar context with streamed progress ([`Docker::build`]),
//! one-shot containers for toolchain steps ([`Docker::run_once`]), the labels that find a run's
//! or a build's containers again ([`labels`]), and the base images that can be made offline from
//! the host's own toolchains ([`base`]).
//!
//! It does not decide what to build or run: the builders (`tg-builder`) and runners
//! (`tg-runner`) do, through this crate.

pub mod base;
mod build;
pub mod context;
mod health;
pub mod labels;
mod oneshot;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use bollard;
pub use build::BuildSpec;
pub use context::Context;
pub use health::{Check, Fix, health};
pub use oneshot::{OneShot, OneShotOutput};

/// The oldest Engine API this crate is written against (Debian bookworm's `docker.io` 20.10).
pub const MIN_API: &str = "1.41";

/// A progress sink: one line at a time.
pub type Progress<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// Why talking to the Docker engine failed, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "no Docker engine answers at {endpoint}: {reason}. Start one (e.g. `systemctl start docker`, \
         or, changing no firewall rule, `dockerd --iptables=false --ip6tables=false \
         --ip-forward=false --bridge=none &`), or point DOCKER_HOST at it"
    )]
    Unreachable { endpoint: String, reason: String },
    #[error(
        "no permission to use the Docker engine at {endpoint}: run as root or add your user to the \
         `docker` group"
    )]
    Permission { endpoint: String },
    #[error("docker: {what}: {source}")]
    Api {
        what: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("image build failed: {message}; last output lines:\n{tail}")]
    Build { message: String, tail: String },
    #[error("image {image:?} is not present in the Docker engine: {hint}")]
    MissingImage { image: String, hint: String },
    #[error("canceled")]
    Canceled,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl DockerError {
    pub(crate) fn api(what: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> Self {
        let what = what.into();
        move |source| DockerError::Api { what, source }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| DockerError::Io { what, source }
    }
}

/// True when `e` is the engine's "no such ..." answer (HTTP 404).
pub fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// A connection to a Docker engine.
#[derive(Clone)]
pub struct Docker {
    api: bollard::Docker,
    endpoint: String,
    server_version: String,
    api_version: String,
}

impl std::fmt::Debug for Docker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Docker")
            .field("endpoint", &self.endpoint)
            .field("server_version", &self.server_version)
            .field("api_version", &self.api_version)
            .finish()
    }
}

/// Where the engine is expected: `DOCKER_HOST`, else the standard socket.
pub fn endpoint() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string())
}

impl Docker {
    /// Connects to the engine at [`endpoint`] and negotiates the API version down to the
    /// server's. Fails with what is missing (no engine, no permission) and how to fix it.
    pub async fn connect() -> Result<Docker, DockerError> {
        let endpoint = endpoint();
        if let Some(path) = endpoint.strip_prefix("unix://") {
            let path = PathBuf::from(path);
            match std::fs::metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(DockerError::Unreachable {
                        endpoint,
                        reason: format!("{} does not exist", path.display()),
                    });
                }
                _ => {}
            }
            // A plain connect tells a permission problem from an absent engine; the client's
            // errors do not carry the cause.
            match std::os::unix::net::UnixStream::connect(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(DockerError::Permission { endpoint });
                }
                Err(e) => {
                    return Err(DockerError::Unreachable {
                        endpoint,
                        reason: format!("connecting to {}: {e}", path.display()),
                    });
                }
                Ok(_) => {}
            }
        }
        let api =
            bollard::Docker::connect_with_local_defaults().map_err(|e| classify(&endpoint, e))?;
        // A hung engine must not hang the caller.
        let api = tokio::time::timeout(std::time::Duration::from_secs(10), api.negotiate_version())
            .await
            .map_err(|_| DockerError::Unreachable {
                endpoint: endpoint.clone(),
                reason: "it did not answer within 10 s".into(),
            })?
            .map_err(|e| classify(&endpoint, e))?;
        let version = api.version().await.map_err(|e| classify(&endpoint, e))?;
        let api_version = api.client_version().to_string();
        Ok(Docker {
            api,
            endpoint,
            server_version: version.version.unwrap_or_default(),
            api_version,
        })
    }

    /// The underlying client, for what this crate does not wrap.
    pub fn api(&self) -> &bollard::Docker {
        &self.api
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The engine's version (e.g. `20.10.24+dfsg1`).
    pub fn server_version(&self) -> &str {
        &self.server_version
    }

    /// The negotiated API version (e.g. `1.41`).
    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    /// The id of image `name` (a tag or an id), or `None` when the engine does not have it.
    pub async fn image_id(&self, name: &str) -> Result<Option<String>, DockerError> {
        match self.api.inspect_image(name).await {
            Ok(i) => Ok(i.id),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(DockerError::api(format!("inspect image {name}"))(e)),
        }
    }

    /// Tags image `id` as `tag` (`repo:tag`, or `repo` for `latest`).
    pub async fn tag(&self, id: &str, tag: &str) -> Result<(), DockerError> {
        let (repo, t) = split_tag(tag);
        let opts = bollard::query_parameters::TagImageOptionsBuilder::default()
            .repo(repo)
            .tag(t)
            .build();
        self.api
            .tag_image(id, Some(opts))
            .await
            .map_err(DockerError::api(format!("tag {id} as {tag}")))
    }

    /// Removes image `name` (forced, so tags sharing it go too). Absent is fine.
    pub async fn remove_image(&self, name: &str) -> Result<bool, DockerError> {
        let opts = bollard::query_parameters::RemoveImageOptionsBuilder::default()
            .force(true)
            .build();
        match self.api.remove_image(name, Some(opts), None).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(DockerError::api(format!("remove image {name}"))(e)),
        }
    }

    /// Every image whose repository is `repo` (e.g. `tg-plan-my-plan`), as `repo:tag`.
    pub async fn images_of(&self, repo: &str) -> Result<Vec<String>, DockerError> {
        let mut filters = std::collections::HashMap::new();
        filters.insert("reference".to_string(), vec![format!("{repo}:*")]);
        let opts = bollard::query_parameters::ListImagesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let list = self
            .api
            .list_images(Some(opts))
            .await
            .map_err(DockerError::api(format!("list images of {repo}")))?;
        let mut out = Vec::new();
        for img in list {
            out.extend(img.repo_tags.into_iter().filter(|t| t.starts_with(repo)));
        }
        Ok(out)
    }
}

/// `repo:tag` → (`repo`, `tag`); a `:` inside a registry's `host:port` is not a tag.
pub fn split_tag(name: &str) -> (&str, &str) {
    match name.rfind(':') {
        Some(i) if !name[i + 1..].contains('/') => (&name[..i], &name[i + 1..]),
        _ => (name, "latest"),
    }
}

/// Engine errors at connection time, as what the user can do about them.
fn classify(endpoint: &str, e: bollard::errors::Error) -> DockerError {
    let text = e.to_string();
    let lower = text.to_lowercase();
    if lower.contains("permission denied") {
        DockerError::Permission {
            endpoint: endpoint.to_string(),
        }
    } else if lower.contains("connection refused")
        || lower.contains("no such file")
        || lower.contains("not found")
        || lower.contains("error trying to connect")
        || lower.contains("client error (connect)")
    {
        DockerError::Unreachable {
            endpoint: endpoint.to_string(),
            reason: text,
        }
    } else {
        DockerError::Api {
            what: format!("connect to {endpoint}"),
            source: e,
        }
    }
}

/// Labels as the engine wants them.
pub(crate) fn label_map(
    labels: &BTreeMap<String, String>,
) -> std::collections::HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_split_at_the_last_colon_outside_a_registry_port() {
        assert_eq!(
            split_tag("busybox:1.35.0-glibc"),
            ("busybox", "1.35.0-glibc")
        );
        assert_eq!(split_tag("busybox"), ("busybox", "latest"));
        assert_eq!(
            split_tag("localhost:5000/x"),
            ("localhost:5000/x", "latest")
        );
        assert_eq!(split_tag("localhost:5000/x:y"), ("localhost:5000/x", "y"));
    }
}
