//! Image builds with the engine's classic builder (no BuildKit: Debian's engine has none).

use std::collections::{BTreeMap, VecDeque};

use bollard::query_parameters::{BuildImageOptionsBuilder, BuilderVersion};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::context::Finished;
use crate::{Docker, DockerError, Progress};

/// Lines kept for the error message of a failed build.
const TAIL: usize = 20;

/// One image build.
pub struct BuildSpec {
    pub context: Finished,
    /// The Dockerfile's path inside the context.
    pub dockerfile: String,
    /// The first tag (`repo:tag`); more go in `extra_tags`.
    pub tag: String,
    pub extra_tags: Vec<String>,
    pub build_args: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// `RUN` steps use the host's network (as the original's `docker:generic` did), so that
    /// package managers reach their registries without a bridge or NAT.
    pub host_network: bool,
}

impl Docker {
    /// Builds `spec` and returns the image id (`sha256:…`). Every output line of the build goes
    /// to `progress`. Canceling drops the request, which makes the engine stop the build.
    pub async fn build(
        &self,
        spec: BuildSpec,
        progress: Progress<'_>,
        cancel: &CancellationToken,
    ) -> Result<String, DockerError> {
        let mut opts = BuildImageOptionsBuilder::default()
            .dockerfile(&spec.dockerfile)
            .t(&spec.tag)
            .rm(true)
            .forcerm(true)
            .version(BuilderVersion::BuilderV1);
        if !spec.build_args.is_empty() {
            opts = opts.buildargs(&crate::label_map(&spec.build_args));
        }
        if !spec.labels.is_empty() {
            opts = opts.labels(&crate::label_map(&spec.labels));
        }
        if spec.host_network {
            opts = opts.networkmode("host");
        }
        let body = match &spec.context {
            Finished::Memory(bytes) => bollard::body_full(bytes.clone().into()),
            Finished::File(path) => {
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(DockerError::io(format!("open {}", path.display())))?;
                let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).filter_map(
                    |r| async move {
                        match r {
                            Ok(b) => Some(b),
                            Err(e) => {
                                tracing::warn!("reading the build context: {e}");
                                None
                            }
                        }
                    },
                );
                bollard::body_stream(stream)
            }
        };
        let mut stream = self.api.build_image(opts.build(), None, Some(body));
        let mut tail: VecDeque<String> = VecDeque::new();
        let mut id = None;
        let mut partial = String::new();
        loop {
            let item = tokio::select! {
                _ = cancel.cancelled() => return Err(DockerError::Canceled),
                item = stream.next() => item,
            };
            let Some(item) = item else { break };
            let info = match item {
                Ok(info) => info,
                // bollard reports the engine's build failure (a `RUN` that failed) this way,
                // not as an `error_detail`: it is the build's failure, with its output.
                Err(bollard::errors::Error::DockerStreamError { error }) => {
                    return Err(DockerError::Build {
                        message: error.trim().to_string(),
                        tail: Vec::from(tail).join("\n"),
                    });
                }
                Err(e) => return Err(DockerError::api(format!("build {}", spec.tag))(e)),
            };
            if let Some(detail) = info.error_detail {
                return Err(DockerError::Build {
                    message: detail.message.unwrap_or_default().trim().to_string(),
                    tail: Vec::from(tail).join("\n"),
                });
            }
            if let Some(text) = info.stream.or(info.status) {
                partial.push_str(&text);
                while let Some(i) = partial.find('\n') {
                    let line: String = partial.drain(..=i).collect();
                    // The engine colours a step's standard error; a log is plain text.
                    let line = line.replace("\u{1b}[91m", "").replace("\u{1b}[0m", "");
                    let line = line.trim_end();
                    if line.is_empty() {
                        continue;
                    }
                    progress(line);
                    if tail.len() == TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line.to_string());
                }
            }
            if let Some(aux) = info.aux
                && let Some(i) = aux.id
            {
                id = Some(i);
            }
        }
        let id = match id {
            Some(id) => id,
            None => self
                .image_id(&spec.tag)
                .await?
                .ok_or_else(|| DockerError::Build {
                    message: format!("the engine reported no image for {}", spec.tag),
                    tail: Vec::from(tail).join("\n"),
                })?,
        };
        for t in &spec.extra_tags {
            self.tag(&id, t).await?;
        }
        Ok(id)
    }
}
