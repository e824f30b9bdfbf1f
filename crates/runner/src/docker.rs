//! `local:docker`: instances as containers, on the same network as `local:netns`.
//!
//! Each instance gets a pause container (`testground/pause`, network `none`) that holds its
//! network, UTS and `/etc/hosts`; the run's sidecar (`tg-sidecar`, shared with `local:netns`)
//! builds the instance's `eth0` (control link to the run's sync service) and `eth1` (a TUN
//! whose other end is the emulator) inside that container's namespace, and the instance
//! container joins it with network mode `container:<pause>`. So every `network.Config` field,
//! per-subnet rules, seeds and pcap capture behave exactly as under `local:netns`, without a
//! kernel `netem`.
//!
//! Lifecycle: `start` connects to the engine, removes containers of runs whose engine died,
//! makes sure the pause image exists and builds the run's network; `prepare` creates the pause
//! containers, their networks and the instance containers (many at a time); `launch` attaches
//! to an instance's output and starts it (`start_concurrency` starts at a time, in the
//! background); `teardown` removes every container of the run (stops them only, with
//! `keep_containers`), then the network. Containers carry the original's labels plus
//! `testground.home`, so that the next start of an engine of the same home removes what a
//! killed engine left.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

use bollard::models::{ContainerCreateBody, HostConfig, ResourcesUlimits};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, KillContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use futures::StreamExt;
use tg_docker::bollard;
use tg_docker::{Docker, labels};
use tg_sidecar::{RunNetwork, SYNC_ADDR, SYNC_NAME, SYNC_PORT};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::exec::ExecLauncher;
use crate::launch::{InstanceSpec, LaunchContext, Launched, Launcher, NetEnv, Stop};
use crate::supervisor::{InstanceReport, Termination};
use crate::{HealthCheck, RunConfig, RunError, RunInput, RunnerEvent};

/// Containers created (pause and instance) at a time while preparing.
const PREPARE_CONCURRENCY: usize = 16;
/// Buffer of an instance's output pipes between the engine's stream and the run loop.
const PIPE_BUFFER: usize = 64 * 1024;

fn docker_err(e: tg_docker::DockerError) -> RunError {
    RunError::Docker(e.to_string())
}

/// A name the engine accepts: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn container_name(parts: &[&str]) -> String {
    let raw = parts.join("-");
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        s.insert(0, 'x');
    }
    s
}

/// A container of `additional_hosts`, as instances see it: its name resolves (in their
/// `/etc/hosts`) to a loopback address of their own, where the runner forwards each of its
/// exposed TCP ports to the container. Why loopback: the instance's network has no route out
/// (its control link reaches only its run's sync service), and the engine's host reaches every
/// Docker network of its engine directly, without forwarding or firewall changes.
#[derive(Debug, Clone)]
struct AdditionalHost {
    name: String,
    /// Inside every instance: `127.0.1.<k>`.
    local: std::net::Ipv4Addr,
    /// The container's address, reachable from the engine's host.
    target: std::net::IpAddr,
    ports: Vec<u16>,
}

/// Finds each container of `names` on the engine: its first network address and its exposed
/// TCP ports.
async fn resolve_additional(
    docker: &Docker,
    names: &[String],
) -> Result<Vec<AdditionalHost>, RunError> {
    let mut out = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let bad = |why: String| RunError::Docker(format!("additional_hosts: {name}: {why}"));
        let info = docker
            .api()
            .inspect_container(
                name,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .map_err(|e| {
                if tg_docker::is_not_found(&e) {
                    bad("no such container on this engine".into())
                } else {
                    bad(e.to_string())
                }
            })?;
        let target = info
            .network_settings
            .and_then(|n| n.networks)
            .into_iter()
            .flatten()
            .filter_map(|(_, n)| n.ip_address)
            .find_map(|ip| ip.parse::<std::net::IpAddr>().ok())
            .ok_or_else(
                || bad("it has no network address (is it running, on a network?)".into()),
            )?;
        let mut ports: Vec<u16> = info
            .config
            .and_then(|c| c.exposed_ports)
            .into_iter()
            .flatten()
            .filter_map(|p| p.strip_suffix("/tcp").and_then(|p| p.parse().ok()))
            .collect();
        ports.sort_unstable();
        if ports.is_empty() {
            return Err(bad("it exposes no TCP port (EXPOSE or --expose)".into()));
        }
        out.push(AdditionalHost {
            name: name.clone(),
            local: std::net::Ipv4Addr::new(127, 0, 1, (k + 1) as u8),
            target,
            ports,
        });
    }
    Ok(out)
}

/// What `prepare` made for one instance.
struct Prepared {
    name: String,
    container: String,
    /// Holds the instance's namespace handle for the exposed-port forwarders.
    net: tg_sidecar::Instance,
}

/// What the preparation of one instance needs, owned (preparations run many at a time).
struct Ctx {
    docker: Docker,
    input: RunInput,
    config: RunConfig,
    home_label: String,
}

impl Ctx {
    fn labels(&self, purpose: &str, group: &str) -> BTreeMap<String, String> {
        [
            (labels::PURPOSE, purpose),
            (labels::PLAN, &self.input.plan),
            (labels::TESTCASE, &self.input.case),
            (labels::RUN_ID, &self.input.run_id),
            (labels::GROUP_ID, group),
            (labels::HOME, &self.home_label),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// The pause container of one instance: started, its namespace opened.
    async fn make_pause(
        &self,
        spec: &InstanceSpec,
        extra_hosts: &[String],
    ) -> Result<(String, String, tg_sys::NetNs), RunError> {
        let name = container_name(&[
            "tg",
            &self.input.plan,
            &self.input.case,
            &self.input.run_id,
            &spec.group_id,
            &spec.index.to_string(),
        ]);
        let pause_name = format!("{name}-pause");
        let body = ContainerCreateBody {
            image: Some(tg_docker::base::PAUSE.to_string()),
            hostname: Some(spec.hostname.clone()),
            labels: Some(self.labels("pause", &spec.group_id).into_iter().collect()),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                extra_hosts: Some(extra_hosts.to_vec()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self
            .docker
            .api()
            .create_container(
                Some(
                    CreateContainerOptionsBuilder::default()
                        .name(&pause_name)
                        .build(),
                ),
                body,
            )
            .await
            .map_err(|e| RunError::Docker(format!("create {pause_name}: {e}")))?;
        match self.open_pause(&created.id, &pause_name).await {
            Ok(ns) => Ok((name, created.id, ns)),
            Err(e) => {
                // Not handed to teardown: removed here.
                let _ = self.docker.remove_container(&created.id).await;
                Err(e)
            }
        }
    }

    /// Starts a created pause container and opens its network namespace.
    async fn open_pause(&self, id: &str, pause_name: &str) -> Result<tg_sys::NetNs, RunError> {
        self.docker
            .api()
            .start_container(id, None::<bollard::query_parameters::StartContainerOptions>)
            .await
            .map_err(|e| RunError::Docker(format!("start {pause_name}: {e}")))?;
        let info = self
            .docker
            .api()
            .inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
            .map_err(|e| RunError::Docker(format!("inspect {pause_name}: {e}")))?;
        let pid = info
            .state
            .and_then(|s| s.pid)
            .filter(|p| *p > 0)
            .ok_or_else(|| RunError::Docker(format!("{pause_name} has no process")))?;
        let pid = i32::try_from(pid).map_err(|_| RunError::Docker("bad pid".into()))?;
        let started = tg_sys::proc::start_time(pid);
        tg_sys::NetNs::of_process(pid, started)
            .map_err(|e| RunError::Docker(format!("open the namespace of {pause_name}: {e}")))
    }

    /// The instance container, created (not started) in its pause container's namespaces.
    async fn make_instance(
        &self,
        spec: &InstanceSpec,
        name: &str,
        pause: &str,
        ulimits: &[ResourcesUlimits],
    ) -> Result<String, RunError> {
        let body = ContainerCreateBody {
            image: Some(spec.artifact.clone()),
            env: Some(self.environment(spec)),
            labels: Some(self.labels("plan", &spec.group_id).into_iter().collect()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            host_config: Some(HostConfig {
                network_mode: Some(format!("container:{pause}")),
                binds: Some(vec![
                    format!("{}:/outputs", spec.outputs.display()),
                    format!("{}:/temp", spec.temp.display()),
                ]),
                ulimits: Some(ulimits.to_vec()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self
            .docker
            .api()
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(name).build()),
                body,
            )
            .await
            .map_err(|e| {
                if tg_docker::is_not_found(&e) {
                    RunError::Docker(format!(
                        "image {} of group {} is not in the engine (was it built with a docker:* \
                         builder on this engine?)",
                        spec.artifact, spec.group_id
                    ))
                } else {
                    RunError::Docker(format!("create {name}: {e}"))
                }
            })?;
        Ok(created.id)
    }

    /// The instance's environment inside its container: the run loop's, with container paths,
    /// without the host's PATH and HOME (the image has its own), plus the original's
    /// `local:docker` extras.
    fn environment(&self, spec: &InstanceSpec) -> Vec<String> {
        let mut env: Vec<String> = Vec::with_capacity(spec.env.len() + 8);
        let str_of = |v: &OsString| v.to_string_lossy().into_owned();
        for (k, v) in &spec.env {
            let v = match k.as_ref() {
                "PATH" | "HOME" => continue,
                "TEST_OUTPUTS_PATH" => "/outputs".to_string(),
                "TEST_TEMP_PATH" => "/temp".to_string(),
                "REDIS_HOST" => "testground-redis".to_string(),
                _ => str_of(v),
            };
            env.push(format!("{k}={v}"));
        }
        if let Some(level) = &self.config.docker.log_level {
            env.push(format!("LOG_LEVEL={level}"));
        }
        for (label, port) in &self.config.docker.exposed_ports {
            env.push(format!("{}_PORT={port}", label.to_uppercase()));
        }
        if !self.config.docker.additional_hosts.is_empty() {
            env.push(format!(
                "ADDITIONAL_HOSTS={}",
                self.config.docker.additional_hosts.join(",")
            ));
        }
        env
    }
}

pub(crate) struct DockerLauncher {
    input: RunInput,
    config: RunConfig,
    /// Only for the run's record and temp dirs (no host process is started).
    exec: ExecLauncher,
    docker: Option<Docker>,
    net: Option<RunNetwork>,
    events: Option<mpsc::Sender<RunnerEvent>>,
    reports: Option<mpsc::Sender<InstanceReport>>,
    prepared: VecDeque<Prepared>,
    /// Every container of the run, instances first, for teardown.
    containers: Vec<String>,
    pauses: Vec<String>,
    starts: Arc<Semaphore>,
    /// Host ends of exposed ports, instance ends of additional hosts.
    forwarders: tokio::task::JoinSet<()>,
    /// `additional_hosts`, resolved at start.
    additional: Vec<AdditionalHost>,
    home_label: String,
}

impl DockerLauncher {
    pub(crate) fn new(input: RunInput, config: RunConfig) -> Self {
        let state_dir = crate::exec::state_dir(&input);
        let starts = Arc::new(Semaphore::new(config.docker.start_concurrency.max(1)));
        DockerLauncher {
            exec: ExecLauncher::new(&input),
            input,
            config,
            docker: None,
            net: None,
            events: None,
            reports: None,
            prepared: VecDeque::new(),
            containers: Vec::new(),
            pauses: Vec::new(),
            starts,
            forwarders: tokio::task::JoinSet::new(),
            additional: Vec::new(),
            home_label: state_dir.to_string_lossy().into_owned(),
        }
    }

    async fn log(&self, line: String) {
        if let Some(e) = &self.events {
            let _ = e.send(RunnerEvent::Log(line)).await;
        }
    }

    fn ctx(&self, docker: &Docker) -> Arc<Ctx> {
        Arc::new(Ctx {
            docker: docker.clone(),
            input: self.input.clone(),
            config: self.config.clone(),
            home_label: self.home_label.clone(),
        })
    }
    /// The `--ulimit`s to give instances: as configured, but never above what this engine may
    /// grant (root here lacks CAP_SYS_RESOURCE, so a container asking for more fails to start).
    fn ulimits(&self) -> (Vec<ResourcesUlimits>, Vec<String>) {
        let mut notes = Vec::new();
        let mut out = Vec::new();
        for (name, soft, hard) in &self.config.docker.ulimits {
            let (mut soft, mut hard) = (*soft, *hard);
            if name == "nofile"
                && let Ok((_, max)) =
                    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            {
                let max = i64::try_from(max).unwrap_or(i64::MAX);
                if hard > max {
                    notes.push(format!(
                        "ulimit nofile={soft}:{hard} lowered to {}:{max}, the most this engine \
                         may grant",
                        soft.min(max)
                    ));
                    hard = max;
                    soft = soft.min(max);
                }
            }
            out.push(ResourcesUlimits {
                name: Some(name.clone()),
                soft: Some(soft),
                hard: Some(hard),
            });
        }
        (out, notes)
    }

    /// Removes containers of this home whose run has no record any more (its engine died and
    /// the record was cleaned, or the run ended and its removal failed).
    async fn clean_leftovers(&self, docker: &Docker) -> Vec<String> {
        let state_dir = crate::exec::state_dir(&self.input);
        let found = match docker
            .containers_with(&[(labels::HOME, &self.home_label)])
            .await
        {
            Ok(f) => f,
            Err(e) => return vec![format!("cannot list leftover containers: {e}")],
        };
        let stale: Vec<_> = found
            .into_iter()
            .filter(|c| {
                c.labels
                    .get(labels::RUN_ID)
                    .is_some_and(|id| !state_dir.join(format!("{id}.json")).exists())
            })
            .collect();
        if stale.is_empty() {
            return Vec::new();
        }
        let n = stale.len();
        futures::stream::iter(stale)
            .for_each_concurrent(32, |c| async move {
                let _ = docker.remove_container(&c.id).await;
            })
            .await;
        vec![format!(
            "removed {n} containers left by runs whose engine is gone"
        )]
    }

    /// Forwards 127.0.0.1:<free port> on the host to `port` on the instance's loopback, one
    /// connection at a time made inside its namespace.
    async fn expose(&mut self, label: &str, port: u16, spec: &InstanceSpec, ns: &tg_sys::NetNs) {
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", 0)).await {
            Ok(l) => l,
            Err(e) => {
                self.log(format!("cannot expose {label}: {e}")).await;
                return;
            }
        };
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        self.log(format!(
            "exposed port {label} ({port}) of {}[{}] at {addr}",
            spec.group_id, spec.index
        ))
        .await;
        let Ok(ns) = ns.try_clone() else { return };
        let ns = Arc::new(ns);
        self.forwarders.spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let ns = ns.clone();
                tokio::spawn(async move {
                    let out = tokio::task::spawn_blocking(move || {
                        ns.run(|| std::net::TcpStream::connect(("127.0.0.1", port)))
                    })
                    .await;
                    let Ok(Ok(Ok(out))) = out else { return };
                    if out.set_nonblocking(true).is_err() {
                        return;
                    }
                    let Ok(mut out) = tokio::net::TcpStream::from_std(out) else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                });
            }
        });
    }

    /// Listens on `host.local:port` inside the instance's namespace and forwards each
    /// connection to the additional host's container from the engine's host.
    async fn reach(
        &mut self,
        host: &AdditionalHost,
        port: u16,
        spec: &InstanceSpec,
        ns: &tg_sys::NetNs,
    ) -> Result<(), RunError> {
        let local = host.local;
        let listener = ns
            .run(|| {
                let l = std::net::TcpListener::bind((local, port))?;
                l.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(l)
            })
            .and_then(|r| r)
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|e| {
                RunError::Docker(format!(
                    "additional host {} for {}[{}]: listen on {local}:{port}: {e}",
                    host.name, spec.group_id, spec.index
                ))
            })?;
        let target = std::net::SocketAddr::new(host.target, port);
        self.forwarders.spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    // A refused connection closes the instance's side: it sees a reset.
                    if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Ok(())
    }

    async fn remove_all(&mut self, docker: &Docker) -> Vec<String> {
        let keep = self.config.docker.keep_containers;
        let instances = std::mem::take(&mut self.containers);
        let pauses = std::mem::take(&mut self.pauses);
        let n = instances.len() + pauses.len();
        if n == 0 {
            return Vec::new();
        }
        let failures = std::sync::Mutex::new(Vec::new());
        // Instances first: a pause container's namespace is theirs too.
        for set in [instances, pauses] {
            futures::stream::iter(set)
                .for_each_concurrent(32, |id| {
                    let failures = &failures;
                    async move {
                        let r = if keep {
                            docker
                                .api()
                                .kill_container(
                                    &id,
                                    Some(
                                        KillContainerOptionsBuilder::default()
                                            .signal("KILL")
                                            .build(),
                                    ),
                                )
                                .await
                                .or_else(|e| match e {
                                    // Not running (any more).
                                    bollard::errors::Error::DockerResponseServerError {
                                        status_code: 409,
                                        ..
                                    } => Ok(()),
                                    e if tg_docker::is_not_found(&e) => Ok(()),
                                    e => Err(e.to_string()),
                                })
                        } else {
                            docker
                                .remove_container(&id)
                                .await
                                .map_err(|e| e.to_string())
                        };
                        if let Err(e) = r {
                            failures.lock().unwrap_or_else(|e| e.into_inner()).push(e);
                        }
                    }
                })
                .await;
        }
        let failures = failures.into_inner().unwrap_or_default();
        let mut lines = vec![if keep {
            format!(
                "kept {n} containers (keep_containers); remove them with `testground terminate --runner local:docker`"
            )
        } else {
            format!("removed {n} containers")
        }];
        lines.extend(
            failures
                .into_iter()
                .take(5)
                .map(|e| format!("container cleanup: {e}")),
        );
        lines
    }
}

impl Launcher for DockerLauncher {
    type Instance = DockerInstance;

    async fn start(&mut self, ctx: &LaunchContext) -> Result<NetEnv, RunError> {
        crate::netns::check_privileges().map_err(|e| match e {
            RunError::NetnsUnavailable { reason } => {
                RunError::Docker(format!("cannot build instance networks: {reason}"))
            }
            e => e,
        })?;
        self.events = Some(ctx.events.clone());
        self.reports = Some(ctx.reports.clone());
        for line in self.exec.track(&ctx.temp_root)? {
            self.log(line).await;
        }
        let docker = Docker::connect().await.map_err(docker_err)?;
        for line in self.clean_leftovers(&docker).await {
            self.log(line).await;
        }
        let events = ctx.events.clone();
        let progress = move |l: &str| {
            let _ = events.try_send(RunnerEvent::Log(format!("pause image: {l}")));
        };
        tg_docker::base::ensure(
            &docker,
            tg_docker::base::PAUSE,
            &progress,
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
        .map_err(docker_err)?;
        self.log(format!(
            "docker engine {} (API {}) at {}",
            docker.server_version(),
            docker.api_version(),
            docker.endpoint()
        ))
        .await;
        if !self.config.docker.additional_hosts.is_empty() {
            self.additional =
                resolve_additional(&docker, &self.config.docker.additional_hosts).await?;
            for h in &self.additional {
                self.log(format!(
                    "additional host {} ({}) answers instances at {} on ports {:?}",
                    h.name, h.target, h.local, h.ports
                ))
                .await;
            }
        }
        self.docker = Some(docker);
        let net = crate::netns::create(&self.input, &self.config, &ctx.temp_root.join(".net"), ctx)
            .await?;
        let env = NetEnv {
            sidecar: true,
            subnet: net.subnet().to_string(),
            sync_host: SYNC_NAME.into(),
            sync_port: SYNC_PORT,
        };
        self.net = Some(net);
        Ok(env)
    }

    async fn prepare(&mut self, specs: &[InstanceSpec]) -> Result<(), RunError> {
        let Some(docker) = self.docker.clone() else {
            return Ok(());
        };
        let began = std::time::Instant::now();
        let (ulimits, notes) = self.ulimits();
        for n in notes {
            self.log(n).await;
        }
        let mut extra_hosts = vec![format!("{SYNC_NAME}:{SYNC_ADDR}")];
        if let Some(h) = self.net.as_ref().and_then(|n| n.host_addr()) {
            extra_hosts.push(format!("{}:{h}", tg_sidecar::HOST_NAME));
        }
        for h in &self.additional {
            extra_hosts.push(format!("{}:{}", h.name, h.local));
        }
        // Pause containers and their namespaces.
        let ctx = self.ctx(&docker);
        let extra_hosts = Arc::new(extra_hosts);
        let (made, failed) = make_all(specs.to_vec(), |spec| {
            let (ctx, hosts) = (ctx.clone(), extra_hosts.clone());
            async move { ctx.make_pause(&spec, &hosts).await }
        })
        .await;
        let mut namespaces = Vec::with_capacity(made.len());
        for (name, id, ns) in made {
            self.pauses.push(id.clone());
            namespaces.push((name, id, ns));
        }
        if let Some(e) = failed {
            return Err(e);
        }
        // Their networks, built by the sidecar as under local:netns.
        let Some(net) = self.net.as_mut() else {
            return Ok(());
        };
        let mut sidecar_specs = Vec::with_capacity(specs.len());
        let mut names = Vec::with_capacity(specs.len());
        for (spec, (name, id, ns)) in specs.iter().zip(namespaces) {
            sidecar_specs.push(tg_sidecar::InstanceSpec {
                ordinal: spec.ordinal as u32,
                hostname: spec.hostname.clone(),
                outputs: spec.outputs.clone(),
                netns: Some(ns),
                control: tg_sidecar::ControlLink::Veth,
            });
            names.push((name, id));
        }
        let nets = net
            .add_instances(sidecar_specs, crate::netns::NETNS_SETUP_CONCURRENCY)
            .await
            .map_err(RunError::RunNetwork)?;
        // The instance containers.
        let ulimits = Arc::new(ulimits);
        let (ids, failed) = make_all(
            specs.iter().cloned().zip(names.clone()),
            |(spec, (name, pause))| {
                let (ctx, ulimits) = (ctx.clone(), ulimits.clone());
                async move { ctx.make_instance(&spec, &name, &pause, &ulimits).await }
            },
        )
        .await;
        self.containers.extend(ids.iter().cloned());
        if let Some(e) = failed {
            return Err(e);
        }
        for (((name, _pause), container), net) in names.into_iter().zip(ids).zip(nets) {
            self.prepared.push_back(Prepared {
                name,
                container,
                net,
            });
        }
        self.log(format!(
            "docker: {} pause containers, networks and instance containers ready in {:.2}s",
            specs.len(),
            began.elapsed().as_secs_f64()
        ))
        .await;
        Ok(())
    }

    async fn launch(&mut self, spec: &InstanceSpec) -> Result<DockerInstance, RunError> {
        let docker = self
            .docker
            .clone()
            .ok_or_else(|| RunError::Docker("no engine connection".into()))?;
        let Some(p) = self.prepared.pop_front() else {
            return Err(RunError::Docker(format!(
                "no container was prepared for instance {}[{}]",
                spec.group_id, spec.index
            )));
        };
        let ports: Vec<(String, u16)> = self
            .config
            .docker
            .exposed_ports
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (label, port) in ports {
            self.expose(&label, port, spec, &p.net.netns).await;
        }
        for h in self.additional.clone() {
            for port in &h.ports {
                self.reach(&h, *port, spec, &p.net.netns).await?;
            }
        }
        let attach = docker
            .api()
            .attach_container(
                &p.container,
                Some(
                    AttachContainerOptionsBuilder::default()
                        .stream(true)
                        .logs(true)
                        .stdout(true)
                        .stderr(true)
                        .build(),
                ),
            )
            .await
            .map_err(|e| RunError::Docker(format!("attach to {}: {e}", p.name)))?;
        if let Some(reports) = &self.reports {
            let _ = reports
                .send(InstanceReport::Tag {
                    instance: spec.ordinal,
                    tag: p.container.chars().take(6).collect(),
                })
                .await;
        }
        let (out_r, out_w) = tokio::io::duplex(PIPE_BUFFER);
        let (err_r, err_w) = tokio::io::duplex(PIPE_BUFFER);
        tokio::spawn(demux(attach.output, out_w, err_w));
        // Started in the background, a few at a time; `wait` learns how it went.
        let (started_tx, started_rx) = oneshot::channel();
        let starts = self.starts.clone();
        let api = docker.api().clone();
        let id = p.container.clone();
        let reports = self.reports.clone();
        let ordinal = spec.ordinal;
        tokio::spawn(async move {
            let _permit = starts.acquire_owned().await;
            let r = api
                .start_container(
                    &id,
                    None::<bollard::query_parameters::StartContainerOptions>,
                )
                .await
                .map_err(|e| e.to_string());
            if let (Err(e), Some(reports)) = (&r, reports) {
                let _ = reports
                    .send(InstanceReport::Refused {
                        instance: ordinal,
                        elapsed: std::time::Duration::ZERO,
                        reason: format!("its container did not start: {e}"),
                    })
                    .await;
            }
            let _ = started_tx.send(r.is_ok());
        });
        Ok(DockerInstance {
            api: docker.api().clone(),
            id: p.container,
            stdout: Some(out_r),
            stderr: Some(err_r),
            started: Some(started_rx),
            ok_started: None,
            pending_stop: None,
        })
    }

    async fn teardown(mut self) -> Vec<String> {
        self.prepared.clear();
        self.forwarders.abort_all();
        let mut lines = Vec::new();
        if let Some(docker) = self.docker.clone() {
            lines.extend(self.remove_all(&docker).await);
        }
        if let Some(net) = self.net.take() {
            lines.extend(crate::netns::shut_down(net).await);
        }
        let exec = std::mem::replace(&mut self.exec, ExecLauncher::new(&self.input));
        lines.extend(exec.finish().await);
        lines
    }
}

/// Runs `make` over `items`, [`PREPARE_CONCURRENCY`] at a time, in order: what it made, and
/// its first error. After an error nothing new starts, but what is in flight finishes, so that
/// every container made is known to teardown.
async fn make_all<I, T, Fut>(
    items: I,
    make: impl FnMut(I::Item) -> Fut,
) -> (Vec<T>, Option<RunError>)
where
    I: IntoIterator,
    Fut: std::future::Future<Output = Result<T, RunError>>,
{
    let failed = std::sync::atomic::AtomicBool::new(false);
    let stream = futures::stream::iter(items)
        .take_while(|_| std::future::ready(!failed.load(std::sync::atomic::Ordering::Relaxed)))
        .map(make)
        .buffered(PREPARE_CONCURRENCY);
    let mut stream = std::pin::pin!(stream);
    let mut made = Vec::new();
    let mut first = None;
    while let Some(r) = stream.next().await {
        match r {
            Ok(v) => made.push(v),
            Err(e) => {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
                first.get_or_insert(e);
            }
        }
    }
    (made, first)
}

/// A launcher dropped without teardown (its run's future was dropped) still removes its
/// containers, in the background.
impl Drop for DockerLauncher {
    fn drop(&mut self) {
        let ids: Vec<String> = self
            .containers
            .drain(..)
            .chain(self.pauses.drain(..))
            .collect();
        if ids.is_empty() {
            return;
        }
        if let (Some(docker), Ok(h)) = (self.docker.clone(), tokio::runtime::Handle::try_current())
        {
            h.spawn(async move {
                for id in ids {
                    let _ = docker.remove_container(&id).await;
                }
            });
        }
    }
}

/// Splits the engine's multiplexed output stream into the instance's two pipes. A reader that
/// went away (the run is ending) only stops that pipe.
async fn demux(
    mut output: std::pin::Pin<
        Box<
            dyn futures::Stream<
                    Item = Result<bollard::container::LogOutput, bollard::errors::Error>,
                > + Send,
        >,
    >,
    mut out: DuplexStream,
    mut err: DuplexStream,
) {
    let (mut out_ok, mut err_ok) = (true, true);
    while let Some(Ok(item)) = output.next().await {
        match item {
            bollard::container::LogOutput::StdOut { message }
            | bollard::container::LogOutput::Console { message } => {
                if out_ok && out.write_all(&message).await.is_err() {
                    out_ok = false;
                }
            }
            bollard::container::LogOutput::StdErr { message } => {
                if err_ok && err.write_all(&message).await.is_err() {
                    err_ok = false;
                }
            }
            bollard::container::LogOutput::StdIn { .. } => {}
        }
    }
    let _ = out.shutdown().await;
    let _ = err.shutdown().await;
}

/// A container of the run.
pub(crate) struct DockerInstance {
    api: bollard::Docker,
    id: String,
    stdout: Option<DuplexStream>,
    stderr: Option<DuplexStream>,
    /// Resolves once the start was attempted: true if it started.
    started: Option<oneshot::Receiver<bool>>,
    ok_started: Option<bool>,
    /// A stop asked for before the container started.
    pending_stop: Option<Stop>,
}

impl DockerInstance {
    fn signal(&self, how: Stop) {
        let api = self.api.clone();
        let id = self.id.clone();
        let sig = match how {
            Stop::Term => "TERM",
            Stop::Kill => "KILL",
        };
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let _ = api
                    .kill_container(
                        &id,
                        Some(KillContainerOptionsBuilder::default().signal(sig).build()),
                    )
                    .await;
            });
        }
    }
}

/// Exit codes above 128 are the engine's way of saying "killed by signal code - 128".
pub(crate) fn termination(code: i64) -> Termination {
    match code {
        129..=192 => Termination::Signal((code - 128) as i32),
        c => i32::try_from(c)
            .map(Termination::Code)
            .unwrap_or(Termination::Unknown),
    }
}

impl Launched for DockerInstance {
    type Pipe = DuplexStream;

    fn take_stdout(&mut self) -> Option<DuplexStream> {
        self.stdout.take()
    }

    fn take_stderr(&mut self) -> Option<DuplexStream> {
        self.stderr.take()
    }

    async fn wait(&mut self) -> Termination {
        if self.ok_started.is_none() {
            let ok = match self.started.as_mut() {
                Some(rx) => rx.await.unwrap_or(false),
                None => false,
            };
            self.started = None;
            self.ok_started = Some(ok);
            if ok && let Some(how) = self.pending_stop.take() {
                self.signal(how);
            }
        }
        if self.ok_started != Some(true) {
            return Termination::Unknown;
        }
        let mut wait = self.api.wait_container(
            &self.id,
            Some(
                WaitContainerOptionsBuilder::default()
                    .condition("not-running")
                    .build(),
            ),
        );
        match wait.next().await {
            Some(Ok(w)) => termination(w.status_code),
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                termination(code)
            }
            _ => Termination::Unknown,
        }
    }

    fn stop(&mut self, how: Stop) {
        if self.ok_started.is_none() {
            // Not started yet: signal once it is (a kill before start would be lost).
            self.pending_stop = Some(match (self.pending_stop, how) {
                (Some(Stop::Kill), _) | (_, Stop::Kill) => Stop::Kill,
                _ => Stop::Term,
            });
        }
        self.signal(how);
    }
}

/// `testground healthcheck --runner local:docker`: what `local:netns` needs (the instance
/// networks are the same), then the engine and the default images (made offline with `fix`).
pub(crate) async fn health(fix: bool) -> Vec<HealthCheck> {
    let mut checks = crate::netns::health();
    let progress = |l: &str| tracing::info!("healthcheck: {l}");
    checks.extend(
        tg_docker::health(fix, &progress)
            .await
            .into_iter()
            .map(|c| HealthCheck {
                name: c.name,
                ok: c.ok,
                message: c.message,
                fix: c.fix.map(|f| crate::HealthFix {
                    ok: f.ok,
                    message: f.message,
                }),
            }),
    );
    checks
}

/// `testground terminate --runner local:docker`: every container of plans (as the original),
/// pause containers included, and what dead runs left.
pub(crate) async fn terminate(data_dir: PathBuf) -> Vec<String> {
    let mut lines = crate::clean_leftovers(&crate::runs_dir(&data_dir));
    match Docker::connect().await {
        Ok(d) => {
            for purpose in ["plan", "pause"] {
                match d
                    .remove_containers_with(&[(labels::PURPOSE, purpose)])
                    .await
                {
                    Ok(names) if !names.is_empty() => {
                        lines.push(format!("removed {} {purpose} containers", names.len()))
                    }
                    Ok(_) => {}
                    Err(e) => lines.push(format!("cannot remove {purpose} containers: {e}")),
                }
            }
        }
        Err(e) => lines.push(e.to_string()),
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_what_the_engine_accepts() {
        assert_eq!(
            container_name(&["tg", "my plan", "ping/pong", "abc", "single", "0"]),
            "tg-my-plan-ping-pong-abc-single-0"
        );
        assert_eq!(container_name(&["-x"]), "x-x");
    }

    #[test]
    fn exit_codes_above_128_are_signals() {
        assert_eq!(termination(0), Termination::Code(0));
        assert_eq!(termination(3), Termination::Code(3));
        assert_eq!(termination(137), Termination::Signal(9));
        assert_eq!(termination(143), Termination::Signal(15));
    }
}
