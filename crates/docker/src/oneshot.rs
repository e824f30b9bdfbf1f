//! One-shot containers: a toolchain step (download modules, compile) run in an image with
//! host directories bound in, its output streamed, its exit code returned, and the container
//! removed however the step ends.

use std::collections::{BTreeMap, VecDeque};

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{Docker, DockerError, Progress};

const TAIL: usize = 20;

/// A step to run in a container.
#[derive(Debug, Clone, Default)]
pub struct OneShot {
    pub image: String,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `host:container[:ro]` binds.
    pub binds: Vec<String>,
    pub workdir: Option<String>,
    /// `none` (the default) or `host` (for steps that download).
    pub network: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// `uid:gid` to run as (default: the image's user).
    pub user: Option<String>,
    /// Keep standard output (rather than only streaming it) for the caller.
    pub capture_stdout: bool,
}

/// How a step ended.
#[derive(Debug, Clone, Default)]
pub struct OneShotOutput {
    pub exit_code: i64,
    /// The last lines it printed.
    pub tail: String,
    /// Its standard output, when asked for.
    pub stdout: Vec<u8>,
}

/// Removes the container when the step ends, canceled or not.
struct Remove<'a> {
    docker: &'a Docker,
    id: Option<String>,
}

impl Drop for Remove<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let api = self.docker.api.clone();
            // A dropped step (its build canceled) still removes its container.
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    let opts = RemoveContainerOptionsBuilder::default().force(true).build();
                    let _ = api.remove_container(&id, Some(opts)).await;
                });
            }
        }
    }
}

impl Docker {
    /// Runs `step` to its end; lines it prints go to `progress`. A non-zero exit is not an
    /// error here (see [`OneShotOutput::exit_code`]); canceling kills the container.
    pub async fn run_once(
        &self,
        step: &OneShot,
        progress: Progress<'_>,
        cancel: &CancellationToken,
    ) -> Result<OneShotOutput, DockerError> {
        let config = ContainerCreateBody {
            image: Some(step.image.clone()),
            cmd: Some(step.cmd.clone()),
            env: Some(step.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            working_dir: step.workdir.clone(),
            user: step.user.clone(),
            labels: Some(crate::label_map(&step.labels)),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            host_config: Some(HostConfig {
                binds: Some(step.binds.clone()),
                network_mode: Some(step.network.clone().unwrap_or_else(|| "none".into())),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self
            .api
            .create_container(
                Some(CreateContainerOptionsBuilder::default().build()),
                config,
            )
            .await
            .map_err(|e| {
                if crate::is_not_found(&e) {
                    DockerError::MissingImage {
                        image: step.image.clone(),
                        hint: "run `testground healthcheck --runner local:docker --fix` to make \
                               the default images offline, or build or load it"
                            .into(),
                    }
                } else {
                    DockerError::api(format!("create a container of {}", step.image))(e)
                }
            })?;
        let mut guard = Remove {
            docker: self,
            id: Some(created.id.clone()),
        };
        let id = &created.id;
        let attach = self
            .api
            .attach_container(
                id,
                Some(
                    AttachContainerOptionsBuilder::default()
                        .stream(true)
                        // Attached before the start, the stream has all the output; asking for
                        // the logs too replays what the stream also delivers (lines twice).
                        .stdout(true)
                        .stderr(true)
                        .build(),
                ),
            )
            .await
            .map_err(DockerError::api("attach to a step"))?;
        self.api
            .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
            .await
            .map_err(DockerError::api(format!(
                "start a container of {}",
                step.image
            )))?;
        let mut output = attach.output;
        let mut tail: VecDeque<String> = VecDeque::new();
        let mut stdout = Vec::new();
        let mut partial: [String; 2] = Default::default();
        let run = async {
            while let Some(item) = output.next().await {
                let Ok(item) = item else { break };
                let (bytes, which) = match item {
                    bollard::container::LogOutput::StdOut { message } => (message, 0),
                    bollard::container::LogOutput::StdErr { message } => (message, 1),
                    bollard::container::LogOutput::Console { message } => (message, 0),
                    bollard::container::LogOutput::StdIn { .. } => continue,
                };
                if which == 0 && step.capture_stdout {
                    stdout.extend_from_slice(&bytes);
                    continue;
                }
                partial[which].push_str(&String::from_utf8_lossy(&bytes));
                while let Some(i) = partial[which].find('\n') {
                    let line: String = partial[which].drain(..=i).collect();
                    let line = line.trim_end().to_string();
                    progress(&line);
                    if tail.len() == TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            }
            let wait = self
                .api
                .wait_container(
                    id,
                    Some(
                        WaitContainerOptionsBuilder::default()
                            .condition("not-running")
                            .build(),
                    ),
                )
                .next()
                .await;
            match wait {
                Some(Ok(w)) => Ok(w.status_code),
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                    Ok(code)
                }
                Some(Err(e)) => Err(DockerError::api("wait for a step")(e)),
                None => Err(DockerError::Other("the engine ended the wait early".into())),
            }
        };
        let outcome = tokio::select! {
            r = run => Some(r),
            _ = cancel.cancelled() => None,
        };
        // Removed here and awaited (forced: a canceled step's container is killed by it): the
        // guard's removal is spawned, and a spawned task does not run when the caller's runtime
        // ends right after (a CLI, a test).
        guard.id = None;
        if let Err(e) = self.remove_container(id).await {
            tracing::warn!("removing the step's container {id}: {e}");
        }
        let code = match outcome {
            Some(r) => r?,
            None => return Err(DockerError::Canceled),
        };
        for p in partial {
            if !p.trim().is_empty() {
                progress(p.trim_end());
                tail.push_back(p.trim_end().to_string());
            }
        }
        Ok(OneShotOutput {
            exit_code: code,
            tail: Vec::from(tail).join("\n"),
            stdout,
        })
    }
}
