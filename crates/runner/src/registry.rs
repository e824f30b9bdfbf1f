//! The runners this build has, looked up by id. The only place that names them.

use std::collections::BTreeSet;

use futures::future::BoxFuture;
use tg_api::artifact::ArtifactKind;

use crate::config::{COMMON_KEYS, ConfigKey, DOCKER_KEYS, HOST_KEYS, K8S_KEYS, NETWORK_KEYS};
use crate::docker::DockerLauncher;
use crate::exec::ExecLauncher;
use crate::k8s::K8sLauncher;
use crate::netns::NetnsLauncher;
use crate::run_loop::run_loop;
use crate::supervisor::OutcomeRule;
use crate::{EnvConfig, HealthCheck, RunConfig, RunContext, RunError, RunOutput, Runner};

/// Runners of the original that this build does not have yet.
const NOT_YET: &[&str] = &["cluster:swarm"];

/// `local:exec`: host processes, no shaping, outcomes from stdout.
pub struct LocalExec;

/// `local:netns`: host processes in namespaces, shaped by the userspace emulator, outcomes
/// from the `run_events` topic.
pub struct LocalNetns;

/// `local:docker`: containers on the same userspace-emulated network as `local:netns`,
/// outcomes from the `run_events` topic.
pub struct LocalDocker;

pub struct ClusterK8s;

static RUNNERS: [&dyn Runner; 4] = [&LocalExec, &LocalNetns, &LocalDocker, &ClusterK8s];

/// Every runner of this build.
pub fn runners() -> &'static [&'static dyn Runner] {
    &RUNNERS
}

/// The ids of [`runners`], comma separated, for messages.
pub fn supported() -> String {
    RUNNERS
        .iter()
        .map(|r| r.id())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The runner `id`, or an error that says what exists.
pub fn get(id: &str) -> Result<&'static dyn Runner, RunError> {
    if let Some(r) = RUNNERS.iter().find(|r| r.id() == id) {
        return Ok(*r);
    }
    if NOT_YET.contains(&id) {
        return Err(RunError::NotSupported {
            runner: id.to_string(),
            supported: supported(),
        });
    }
    Err(RunError::UnsupportedRunner {
        runner: id.to_string(),
        supported: supported(),
    })
}

fn keys(sets: &[&[ConfigKey]]) -> Vec<ConfigKey> {
    sets.iter().flat_map(|s| s.iter().copied()).collect()
}

impl Runner for LocalExec {
    fn id(&self) -> &'static str {
        "local:exec"
    }

    fn accepts(&self) -> &'static [ArtifactKind] {
        &[ArtifactKind::Executable]
    }

    fn config_keys(&self) -> Vec<ConfigKey> {
        keys(&[COMMON_KEYS, HOST_KEYS])
    }

    fn parse_config(
        &self,
        map: &serde_json::Map<String, serde_json::Value>,
        strict: &BTreeSet<String>,
    ) -> Result<RunConfig, RunError> {
        crate::config::parse(self.id(), &[COMMON_KEYS, HOST_KEYS], map, strict)
    }

    fn healthcheck(&self, _fix: bool, _env: &EnvConfig) -> BoxFuture<'static, Vec<HealthCheck>> {
        Box::pin(async { Vec::new() })
    }

    fn host_checks(&self, instances: u32) -> Vec<HealthCheck> {
        crate::limits::host_checks(self.id(), instances)
    }

    fn run(&self, ctx: RunContext) -> BoxFuture<'static, Result<RunOutput, RunError>> {
        Box::pin(async move {
            let launcher = ExecLauncher::new(&ctx.input).with_config(&ctx.config);
            run_loop(launcher, ctx, OutcomeRule::Stdout).await
        })
    }
}

impl Runner for LocalNetns {
    fn id(&self) -> &'static str {
        "local:netns"
    }

    fn accepts(&self) -> &'static [ArtifactKind] {
        &[ArtifactKind::Executable]
    }

    fn config_keys(&self) -> Vec<ConfigKey> {
        keys(&[COMMON_KEYS, NETWORK_KEYS, HOST_KEYS])
    }

    fn parse_config(
        &self,
        map: &serde_json::Map<String, serde_json::Value>,
        strict: &BTreeSet<String>,
    ) -> Result<RunConfig, RunError> {
        crate::config::parse(
            self.id(),
            &[COMMON_KEYS, NETWORK_KEYS, HOST_KEYS],
            map,
            strict,
        )
    }

    fn healthcheck(&self, _fix: bool, _env: &EnvConfig) -> BoxFuture<'static, Vec<HealthCheck>> {
        Box::pin(async { crate::netns::health() })
    }

    fn host_checks(&self, instances: u32) -> Vec<HealthCheck> {
        crate::limits::host_checks(self.id(), instances)
    }

    fn run(&self, ctx: RunContext) -> BoxFuture<'static, Result<RunOutput, RunError>> {
        Box::pin(async move {
            let launcher = NetnsLauncher::new(ctx.input.clone(), ctx.config.clone());
            run_loop(launcher, ctx, OutcomeRule::SyncEvents).await
        })
    }
}

impl Runner for LocalDocker {
    fn id(&self) -> &'static str {
        "local:docker"
    }

    fn accepts(&self) -> &'static [ArtifactKind] {
        &[ArtifactKind::Image]
    }

    fn config_keys(&self) -> Vec<ConfigKey> {
        keys(&[COMMON_KEYS, NETWORK_KEYS, DOCKER_KEYS])
    }

    fn parse_config(
        &self,
        map: &serde_json::Map<String, serde_json::Value>,
        strict: &BTreeSet<String>,
    ) -> Result<RunConfig, RunError> {
        crate::config::parse(
            self.id(),
            &[COMMON_KEYS, NETWORK_KEYS, DOCKER_KEYS],
            map,
            strict,
        )
    }

    fn healthcheck(&self, fix: bool, _env: &EnvConfig) -> BoxFuture<'static, Vec<HealthCheck>> {
        Box::pin(crate::docker::health(fix))
    }

    fn run(&self, ctx: RunContext) -> BoxFuture<'static, Result<RunOutput, RunError>> {
        Box::pin(async move {
            let launcher = DockerLauncher::new(ctx.input.clone(), ctx.config.clone());
            run_loop(launcher, ctx, OutcomeRule::SyncEvents).await
        })
    }

    fn terminate(
        &self,
        data_dir: &std::path::Path,
        _env: &EnvConfig,
    ) -> BoxFuture<'static, Vec<String>> {
        Box::pin(crate::docker::terminate(data_dir.to_path_buf()))
    }
}

impl Runner for ClusterK8s {
    fn id(&self) -> &'static str {
        "cluster:k8s"
    }

    fn accepts(&self) -> &'static [ArtifactKind] {
        &[ArtifactKind::Image]
    }

    fn config_keys(&self) -> Vec<ConfigKey> {
        keys(&[COMMON_KEYS, NETWORK_KEYS, K8S_KEYS])
    }

    fn parse_config(
        &self,
        map: &serde_json::Map<String, serde_json::Value>,
        strict: &BTreeSet<String>,
    ) -> Result<RunConfig, RunError> {
        crate::config::parse(
            self.id(),
            &[COMMON_KEYS, NETWORK_KEYS, K8S_KEYS],
            map,
            strict,
        )
    }

    fn healthcheck(&self, _fix: bool, env: &EnvConfig) -> BoxFuture<'static, Vec<HealthCheck>> {
        Box::pin(crate::k8s::health(env.clone()))
    }

    fn run(&self, ctx: RunContext) -> BoxFuture<'static, Result<RunOutput, RunError>> {
        Box::pin(async move {
            let launcher = K8sLauncher::new(ctx.input.clone(), ctx.config.clone());
            run_loop(launcher, ctx, OutcomeRule::SyncEvents).await
        })
    }

    fn terminate(
        &self,
        data_dir: &std::path::Path,
        env: &EnvConfig,
    ) -> BoxFuture<'static, Vec<String>> {
        Box::pin(crate::k8s::terminate(data_dir.to_path_buf(), env.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_names_what_exists() {
        assert_eq!(get("local:exec").unwrap().id(), "local:exec");
        assert_eq!(get("local:netns").unwrap().id(), "local:netns");
        assert_eq!(get("local:docker").unwrap().id(), "local:docker");
        assert_eq!(get("cluster:k8s").unwrap().id(), "cluster:k8s");
        match get("cluster:swarm") {
            Err(e @ RunError::NotSupported { .. }) => {
                assert!(e.to_string().contains("not supported"), "{e}")
            }
            other => panic!("{:?}", other.map(|r| r.id())),
        }
        match get("local:exex") {
            Err(e @ RunError::UnsupportedRunner { .. }) => {
                assert!(
                    e.to_string()
                        .contains("local:exec, local:netns, local:docker, cluster:k8s"),
                    "{e}"
                )
            }
            other => panic!("{:?}", other.map(|r| r.id())),
        }
    }
}
