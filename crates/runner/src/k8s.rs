//! `cluster:k8s`: instances as pods of a Kubernetes cluster, on the same emulated network as
//! `local:netns`.
//!
//! The engine serves the run's sync service itself on an address of its host the pods reach
//! (the node's, on a single-node cluster), and acts as the node agent: once a pod's sandbox
//! exists, it finds the pod's network namespace on this host (from the pod uid's cgroup) and the
//! run's sidecar (`tg-sidecar`) adds the data interface `eth1`, a TUN into the emulator, while
//! the pod keeps the cluster's `eth0` as its control network. Instances wait for
//! `network-initialized`, which the sidecar signals once their pod is wired. So every
//! `network.Config` field works as under `local:netns`.
//!
//! Lifecycle: `start` connects (kubeconfig), removes pods of runs whose engine died, checks the
//! run fits, distributes the images (push to `push_registry`, or load into the node's
//! containerd), serves the sync service and builds the run's network; `prepare` creates the
//! pods (`create_concurrency` at a time) while one watcher follows them and wires each sandbox
//! as it appears; `launch` follows an instance's log (the kubelet's file on this node, else
//! the API) and waits for its verdict (exited, or
//! failed for a reason of the cluster's: never scheduled, image not pullable, evicted,
//! OOM-killed); `teardown` deletes the run's pods (by label) and waits until they are gone.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tg_k8s::k8s_openapi::api::core::v1::Pod;
use tg_k8s::kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use tg_k8s::kube::runtime::watcher;
use tg_k8s::pods::{self, PodParams, Verdict};
use tg_k8s::{Cluster, labels};
use tg_sidecar::{ControlLink, RunNetwork};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::exec::ExecLauncher;
use crate::launch::{InstanceSpec, LaunchContext, Launched, Launcher, NetEnv, Stop};
use crate::supervisor::{InstanceReport, Termination};
use crate::{HealthCheck, RunConfig, RunError, RunInput, RunnerEvent};

/// Buffer of an instance's log pipe between the API's stream and the run loop.
const PIPE_BUFFER: usize = 64 * 1024;
/// How long teardown waits for the run's pods to be gone.
const DELETE_WAIT: Duration = Duration::from_secs(90);

fn k8s_err(e: tg_k8s::K8sError) -> RunError {
    RunError::K8s(e.to_string())
}

/// What the run knows of one pod, shared by the watcher and the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodState {
    verdict: Verdict,
    /// The pod is gone from the API.
    gone: bool,
}

/// One instance's pod.
struct Slot {
    ordinal: usize,
    /// Set once the pod is created.
    uid: Option<String>,
    hostname: String,
    outputs: PathBuf,
    state: watch::Sender<PodState>,
    wired: bool,
}

type Slots = Arc<Mutex<HashMap<String, Slot>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct K8sLauncher {
    input: RunInput,
    config: RunConfig,
    exec: ExecLauncher,
    cluster: Option<Cluster>,
    events: Option<mpsc::Sender<RunnerEvent>>,
    reports: Option<mpsc::Sender<InstanceReport>>,
    net: Option<Arc<tokio::sync::Mutex<RunNetwork>>>,
    slots: Slots,
    prepared: VecDeque<String>,
    /// Group id → the image its pods run.
    images: HashMap<String, String>,
    pull_policy: String,
    home_label: String,
    /// Stops the watcher, the wiring and the sync server.
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    /// Set once pods may exist (cleared by teardown).
    created_any: bool,
    /// Where pods reach the sync service: kept routable under `deny_all`.
    sync_ip: Option<IpAddr>,
    /// When the first pod was created: start progress is measured from it.
    first_create: Arc<std::sync::OnceLock<Instant>>,
    /// The kubelet's log directory on this node: instances' logs are read there.
    logs_dir: Option<PathBuf>,
    /// Some node is labelled as a plan node: pods are pinned to those (from the capacity
    /// check).
    plan_nodes_labelled: bool,
}

impl K8sLauncher {
    pub(crate) fn new(input: RunInput, config: RunConfig) -> Self {
        let home = crate::exec::state_dir(&input);
        K8sLauncher {
            exec: ExecLauncher::new(&input),
            input,
            config,
            cluster: None,
            events: None,
            reports: None,
            net: None,
            slots: Arc::new(Mutex::new(HashMap::new())),
            prepared: VecDeque::new(),
            images: HashMap::new(),
            pull_policy: "IfNotPresent".into(),
            home_label: tg_k8s::home_label(&home),
            stop: CancellationToken::new(),
            tasks: tokio::task::JoinSet::new(),
            created_any: false,
            sync_ip: None,
            first_create: Arc::new(std::sync::OnceLock::new()),
            logs_dir: None,
            plan_nodes_labelled: false,
        }
    }

    async fn log(&self, line: String) {
        if let Some(e) = &self.events {
            let _ = e.send(RunnerEvent::Log(line)).await;
        }
    }

    fn run_selector(&self) -> String {
        format!(
            "{}={},{}={}",
            labels::RUN_ID,
            tg_k8s::pods::label_value(&self.input.run_id),
            labels::HOME,
            self.home_label
        )
    }

    /// Pods of this engine home whose run has no record any more: their engine died.
    async fn clean_leftovers(&self, cluster: &Cluster) -> Vec<String> {
        let state_dir = crate::exec::state_dir(&self.input);
        stale_cleanup(cluster, &self.home_label, &state_dir).await
    }

    /// Checks the run fits the plan nodes before anything is created.
    async fn check_capacity(&mut self, cluster: &Cluster) -> Result<(), RunError> {
        let (cpu, mem) = self.resources()?;
        let (rooms, labelled) = cluster.rooms().await.map_err(k8s_err)?;
        self.plan_nodes_labelled = labelled;
        let cpu_m = tg_k8s::quantity::cpu_millis(&cpu).unwrap_or(0);
        let bytes = tg_k8s::quantity::bytes(&mem).unwrap_or(0);
        tg_k8s::capacity::check(&rooms, u64::from(self.input.total_instances), cpu_m, bytes)
            .map_err(RunError::K8s)?;
        self.log(format!(
            "k8s: {} pods of {cpu} CPU and {mem} fit {} node(s)",
            self.input.total_instances,
            rooms.len()
        ))
        .await;
        Ok(())
    }

    fn resources(&self) -> Result<(String, String), RunError> {
        let missing = |key: &str, eg: &str| RunError::InvalidConfig {
            key: key.into(),
            value: "(unset)".into(),
            reason: format!(
                "cluster:k8s needs it, as the original did (e.g. {key} = \"{eg}\" in the \
                 composition's [global.run_config] or [runners.\"cluster:k8s\"] of .env.toml)"
            ),
        };
        let cpu = self
            .config
            .k8s
            .pod_cpu
            .clone()
            .ok_or_else(|| missing("testplan_pod_cpu", "100m"))?;
        let mem = self
            .config
            .k8s
            .pod_memory
            .clone()
            .ok_or_else(|| missing("testplan_pod_memory", "64Mi"))?;
        Ok((cpu, mem))
    }

    /// Makes each group's image available to the nodes, by its content tag.
    async fn distribute_images(&mut self) -> Result<(), RunError> {
        let docker = tg_docker::Docker::connect()
            .await
            .map_err(|e| RunError::K8s(format!("the images are in the Docker engine: {e}")))?;
        // Artifacts are image ids; nodes need names. Each id → its `tg-plan-<plan>:<key>` tag
        // (the builders' content-keyed one), so `placed` maps ids to what pods run.
        let mut ids: Vec<String> = self
            .input
            .groups
            .iter()
            .map(|g| g.artifact.clone())
            .collect();
        ids.sort();
        ids.dedup();
        let mut named: Vec<(String, String)> = Vec::with_capacity(ids.len());
        for id in ids {
            let name = image_name(&docker, &id, &self.input.plan).await?;
            named.push((id, name));
        }
        let wanted: Vec<String> = named.iter().map(|(_, n)| n.clone()).collect();
        let mut placed = HashMap::new();
        let began = Instant::now();
        if let Some(registry) = self.config.k8s.push_registry.clone() {
            self.pull_policy = "IfNotPresent".into();
            for image in &wanted {
                let target = format!("{registry}/{image}");
                push(&docker, image, &target).await?;
                placed.insert(image.clone(), target);
            }
            self.log(format!(
                "k8s: pushed {} images to {registry} in {:.1}s",
                wanted.len(),
                began.elapsed().as_secs_f64()
            ))
            .await;
        } else if let Some(sock) = self.config.k8s.node_containerd.clone() {
            self.pull_policy = "Never".into();
            load_into_containerd(&docker, &wanted, &sock).await?;
            for image in &wanted {
                placed.insert(image.clone(), image.clone());
            }
            self.log(format!(
                "k8s: loaded {} images into the node's containerd ({}) in {:.1}s",
                wanted.len(),
                sock.display(),
                began.elapsed().as_secs_f64()
            ))
            .await;
        } else {
            return Err(RunError::InvalidConfig {
                key: "push_registry".into(),
                value: "(unset)".into(),
                reason: "cluster:k8s needs a registry the nodes pull from (push_registry = \
                         \"host:port\"), or, on a single-node cluster, the node's containerd \
                         socket to load images into (node_containerd = \"/path/containerd.sock\")"
                    .into(),
            });
        }
        for g in &self.input.groups {
            if let Some((_, name)) = named.iter().find(|(id, _)| *id == g.artifact) {
                self.images.insert(g.id.clone(), placed[name].clone());
            }
        }
        Ok(())
    }

    /// Follows the run's pods: keeps each slot's state, fails pods stuck for longer than
    /// the patience, and hands sandboxes to the wiring.
    fn spawn_watcher(&mut self, cluster: &Cluster, wire: mpsc::UnboundedSender<(String, String)>) {
        let api = cluster.pods();
        let slots = self.slots.clone();
        let stop = self.stop.clone();
        let patience = self.config.k8s.schedule_timeout;
        let events = self.events.clone();
        let selector = self.run_selector();
        let needs_wiring = self.net.is_some();
        let total = self.input.total_instances as usize;
        let first_create = self.first_create.clone();
        self.tasks.spawn(async move {
            // Start progress: pods whose plan container started, and where their time went.
            let mut started: std::collections::HashSet<String> = Default::default();
            let mut phases: Vec<[i64; 3]> = Vec::new();
            let step = (total / 10).max(1);
            let cfg = watcher::Config::default().labels(&selector);
            let mut stream = std::pin::pin!(watcher(api, cfg));
            let mut cache: HashMap<String, Pod> = HashMap::new();
            let mut problems: HashMap<String, Instant> = HashMap::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut last_error: Option<String> = None;
            loop {
                let changed: Vec<String> = tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => problems.keys().cloned().collect(),
                    ev = stream.next() => match ev {
                        None => return,
                        Some(Err(e)) => {
                            // The watcher retries by itself; say it once.
                            let msg = e.to_string();
                            if last_error.as_deref() != Some(&msg) {
                                if let Some(ev) = &events {
                                    let _ = ev.send(RunnerEvent::Log(format!("k8s: watching pods: {msg}"))).await;
                                }
                                last_error = Some(msg);
                            }
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                        Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => {
                            let name = p.metadata.name.clone().unwrap_or_default();
                            cache.insert(name.clone(), p);
                            vec![name]
                        }
                        Some(Ok(watcher::Event::Delete(p))) => {
                            let name = p.metadata.name.clone().unwrap_or_default();
                            cache.remove(&name);
                            problems.remove(&name);
                            if let Some(slot) = lock(&slots).get(&name) {
                                slot.state.send_modify(|s| s.gone = true);
                            }
                            continue;
                        }
                        Some(Ok(_)) => continue,
                    },
                };
                let now = Instant::now();
                for name in changed {
                    let Some(pod) = cache.get(&name) else { continue };
                    let since = match pods::problem(pod) {
                        Some(_) => *problems.entry(name.clone()).or_insert(now),
                        None => {
                            problems.remove(&name);
                            now
                        }
                    };
                    let verdict = pods::verdict(pod, now - since, patience);
                    if !matches!(verdict, Verdict::Pending { .. }) {
                        problems.remove(&name);
                    }
                    if matches!(verdict, Verdict::Running | Verdict::Exited { .. })
                        && started.insert(name.clone())
                    {
                        phases.extend(pods::start_phases(pod));
                        let n = started.len();
                        if (n.is_multiple_of(step) || n == total)
                            && let Some(ev) = &events
                        {
                            let since = first_create
                                .get()
                                .map(|t| format!(", {:.1}s after the first create", t.elapsed().as_secs_f64()))
                                .unwrap_or_default();
                            let _ = ev
                                .send(RunnerEvent::Log(format!(
                                    "k8s: {n}/{total} pods started{since}"
                                )))
                                .await;
                            if n == total {
                                let _ = ev
                                    .send(RunnerEvent::Log(format!(
                                        "k8s: pod start {}",
                                        pods::summarize_phases(&phases)
                                    )))
                                    .await;
                            }
                        }
                    }
                    let mut slots = lock(&slots);
                    let Some(slot) = slots.get_mut(&name) else { continue };
                    if needs_wiring
                        && !slot.wired
                        && matches!(verdict, Verdict::Pending { sandbox: true } | Verdict::Running)
                        && let Some(uid) = pod.metadata.uid.clone()
                    {
                        slot.wired = true;
                        let _ = wire.send((name.clone(), uid));
                    }
                    slot.state.send_if_modified(|s| {
                        let changed = s.verdict != verdict;
                        s.verdict = verdict.clone();
                        changed
                    });
                }
            }
        });
    }

    /// Gives each sandbox handed over by the watcher its data interface, as soon as its
    /// namespace can be found on this host.
    fn spawn_wiring(&mut self, mut rx: mpsc::UnboundedReceiver<(String, String)>) {
        let Some(net) = self.net.clone() else { return };
        let slots = self.slots.clone();
        let stop = self.stop.clone();
        let reports = self.reports.clone();
        let events = self.events.clone();
        let cluster = self.cluster.clone();
        let keep: Vec<Ipv4Addr> = match self.sync_ip {
            Some(IpAddr::V4(a)) => vec![a],
            _ => Vec::new(),
        };
        self.tasks.spawn(async move {
            // (pod name, uid, first seen)
            let mut pending: Vec<(String, String, Instant)> = Vec::new();
            loop {
                if pending.is_empty() {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        item = rx.recv() => match item {
                            Some((n, u)) => pending.push((n, u, Instant::now())),
                            None => return,
                        },
                    }
                }
                while let Ok((n, u)) = rx.try_recv() {
                    pending.push((n, u, Instant::now()));
                }
                let uids: Vec<String> = pending.iter().map(|(_, u, _)| u.clone()).collect();
                let found = tokio::task::spawn_blocking(move || tg_k8s::pod_pids(&uids))
                    .await
                    .unwrap_or_default();
                let mut specs = Vec::new();
                let mut batch = Vec::new();
                let mut failed: Vec<(String, String)> = Vec::new();
                pending.retain(|(name, uid, first)| {
                    let Some(&pid) = found.get(uid) else {
                        if first.elapsed() > Duration::from_secs(30) {
                            failed.push((
                                name.clone(),
                                "its network namespace was not found on this host: \
                                 cluster:k8s wires pods on the node the engine runs on"
                                    .into(),
                            ));
                            return false;
                        }
                        return true;
                    };
                    let slot_info = lock(&slots)
                        .get(name)
                        .map(|s| (s.ordinal, s.hostname.clone(), s.outputs.clone()));
                    let Some((ordinal, hostname, outputs)) = slot_info else {
                        return false;
                    };
                    let opened = tg_sys::NetNs::of_process(pid, tg_sys::proc::start_time(pid))
                        .and_then(|ns| {
                            let gw = default_gateway(pid)?;
                            Ok((ns, gw))
                        });
                    match opened {
                        Ok((ns, gateway)) => {
                            specs.push(tg_sidecar::InstanceSpec {
                                ordinal: ordinal as u32,
                                hostname,
                                outputs,
                                netns: Some(ns),
                                control: ControlLink::Existing {
                                    gateway,
                                    keep: keep.clone(),
                                },
                            });
                            batch.push(name.clone());
                        }
                        Err(e) => failed.push((
                            name.clone(),
                            format!("cannot open its network namespace: {e}"),
                        )),
                    }
                    false
                });
                if !specs.is_empty() {
                    let r = net
                        .lock()
                        .await
                        .add_instances(specs, crate::netns::NETNS_SETUP_CONCURRENCY)
                        .await;
                    if let Err(e) = r {
                        for name in batch {
                            failed.push((name, format!("its network could not be built: {e}")));
                        }
                    }
                }
                for (name, reason) in failed {
                    let ordinal = lock(&slots).get(&name).map(|s| s.ordinal);
                    if let (Some(ordinal), Some(reports)) = (ordinal, &reports) {
                        let _ = reports
                            .send(InstanceReport::Refused {
                                instance: ordinal,
                                elapsed: Duration::ZERO,
                                reason: format!("pod {name}: {reason}"),
                            })
                            .await;
                    }
                    if let Some(ev) = &events {
                        let _ = ev
                            .send(RunnerEvent::Log(format!("k8s: pod {name}: {reason}")))
                            .await;
                    }
                    if let Some(c) = &cluster {
                        let _ = c
                            .pods()
                            .delete(&name, &DeleteParams::default().grace_period(0))
                            .await;
                    }
                }
                if !pending.is_empty() {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        });
    }
}

/// Each node's InternalIP addresses, with the node's name.
fn node_addresses(nodes: &[tg_k8s::k8s_openapi::api::core::v1::Node]) -> Vec<(IpAddr, String)> {
    nodes
        .iter()
        .flat_map(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            n.status
                .iter()
                .flat_map(|s| s.addresses.iter().flatten())
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(move |a| Some((a.address.parse().ok()?, name.clone())))
        })
        .collect()
}

/// Where pods reach the engine: `sync_host`, else this host's node address (a
/// single-node cluster run by this host).
fn sync_host(
    config: &RunConfig,
    node: Option<&(IpAddr, String)>,
    addrs: &[IpAddr],
) -> Result<IpAddr, RunError> {
    if let Some(h) = config.k8s.sync_host {
        return Ok(h);
    }
    node.map(|(a, _)| *a).ok_or_else(|| {
        RunError::K8s(format!(
            "no node address ({}) is an address of this host, so the pods' sync service \
             cannot be served from here by default: set sync_host to an address of this \
             host the pods reach",
            addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// The node this host is (its address and name: one of its addresses is the node's), if
/// any, and every node address (for messages).
async fn this_node(cluster: &Cluster) -> Result<(Option<(IpAddr, String)>, Vec<IpAddr>), RunError> {
    let nodes = cluster
        .nodes()
        .list(&ListParams::default())
        .await
        .map_err(|e| k8s_err(tg_k8s::api_err(e)))?;
    let addrs = node_addresses(&nodes.items);
    let local = addrs
        .iter()
        .find(|(a, _)| std::net::TcpListener::bind((*a, 0)).is_ok())
        .cloned();
    Ok((local, addrs.into_iter().map(|(a, _)| a).collect()))
}

/// The gateway of the default route in `pid`'s network namespace (`/proc/<pid>/net/route`
/// shows the table of the namespace the process is in).
fn default_gateway(pid: i32) -> std::io::Result<Ipv4Addr> {
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/route"))?;
    parse_default_gateway(&table).ok_or_else(|| {
        std::io::Error::other("the pod has no default route (its cluster network gave it none)")
    })
}

fn parse_default_gateway(table: &str) -> Option<Ipv4Addr> {
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 3 || f[1] != "00000000" {
            return None;
        }
        // Little-endian hex, as the kernel prints it.
        let gw = u32::from_str_radix(f[2], 16).ok()?;
        (gw != 0).then(|| Ipv4Addr::from(gw.swap_bytes()))
    })
}

/// A name of image `id` the nodes can pull or find: its `tg-plan-*` content tag (not the
/// per-build `build-*` one), else a tag made for it.
async fn image_name(docker: &tg_docker::Docker, id: &str, plan: &str) -> Result<String, RunError> {
    if !id.starts_with("sha256:") {
        return Ok(id.to_string());
    }
    let info = docker.api().inspect_image(id).await.map_err(|e| {
        RunError::K8s(format!(
            "image {id} is not in the Docker engine (was it built with a docker:* builder here?): {e}"
        ))
    })?;
    let tags = info.repo_tags.unwrap_or_default();
    if let Some(t) = tags
        .iter()
        .find(|t| t.starts_with("tg-plan-") && !t.contains(":build-"))
        .or_else(|| tags.first())
    {
        return Ok(t.clone());
    }
    use tg_docker::bollard::query_parameters::TagImageOptionsBuilder;
    let repo = format!("tg-plan-{}", pods::dns_label(plan));
    let tag: String = id.trim_start_matches("sha256:").chars().take(16).collect();
    docker
        .api()
        .tag_image(
            id,
            Some(
                TagImageOptionsBuilder::default()
                    .repo(&repo)
                    .tag(&tag)
                    .build(),
            ),
        )
        .await
        .map_err(|e| RunError::K8s(format!("tag {id}: {e}")))?;
    Ok(format!("{repo}:{tag}"))
}

/// Tags `image` as `target` and pushes it.
async fn push(docker: &tg_docker::Docker, image: &str, target: &str) -> Result<(), RunError> {
    use tg_docker::bollard::query_parameters::{PushImageOptionsBuilder, TagImageOptionsBuilder};
    let (repo, tag) = split_tag(target);
    docker
        .api()
        .tag_image(
            image,
            Some(TagImageOptionsBuilder::default().repo(repo).tag(tag).build()),
        )
        .await
        .map_err(|e| {
            if tg_docker::is_not_found(&e) {
                RunError::K8s(format!(
                    "image {image} is not in the Docker engine (build the plan with a docker:* builder; busybox comes from `testground healthcheck --runner local:docker --fix`)"
                ))
            } else {
                RunError::K8s(format!("tag {image} as {target}: {e}"))
            }
        })?;
    let mut stream = std::pin::pin!(docker.api().push_image(
        repo,
        Some(PushImageOptionsBuilder::default().tag(tag).build()),
        None
    ));
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| RunError::K8s(format!("push {target}: {e}")))?;
        if let Some(e) = info.error_detail.and_then(|d| d.message) {
            return Err(RunError::K8s(format!("push {target}: {e}")));
        }
    }
    Ok(())
}

/// `registry:5000/name:tag` → (`registry:5000/name`, `tag`).
fn split_tag(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (image, "latest"),
    }
}

/// Streams `docker save` of `images` into `ctr -n k8s.io images import -` on the node's
/// containerd.
async fn load_into_containerd(
    docker: &tg_docker::Docker,
    images: &[String],
    sock: &std::path::Path,
) -> Result<(), RunError> {
    let mut child = tokio::process::Command::new("ctr")
        .arg("--address")
        .arg(sock)
        .args(["-n", "k8s.io", "images", "import", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| RunError::K8s(format!("run ctr (Debian's containerd package): {e}")))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| RunError::K8s("ctr has no stdin".into()))?;
    let names: Vec<&str> = images.iter().map(String::as_str).collect();
    let mut tar = std::pin::pin!(docker.api().export_images(&names));
    let mut copy_err = None;
    while let Some(chunk) = tar.next().await {
        match chunk {
            Ok(b) => {
                if let Err(e) = stdin.write_all(&b).await {
                    copy_err = Some(format!("write to ctr: {e}"));
                    break;
                }
            }
            Err(e) => {
                copy_err = Some(format!("export {}: {e}", images.join(", ")));
                break;
            }
        }
    }
    drop(stdin);
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| RunError::K8s(format!("ctr: {e}")))?;
    if let Some(e) = copy_err {
        return Err(RunError::K8s(e));
    }
    if !out.status.success() {
        return Err(RunError::K8s(format!(
            "ctr images import into {}: {}",
            sock.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Deletes the pods of `home` whose run has no record in `state_dir`.
async fn stale_cleanup(cluster: &Cluster, home: &str, state_dir: &std::path::Path) -> Vec<String> {
    let api = cluster.pods();
    let list = match api
        .list(&ListParams::default().labels(&format!("{}={home}", labels::HOME)))
        .await
    {
        Ok(l) => l,
        Err(e) => return vec![format!("cannot list leftover pods: {}", tg_k8s::api_err(e))],
    };
    let mut runs: Vec<String> = list
        .items
        .iter()
        .filter_map(|p| p.metadata.labels.as_ref()?.get(labels::RUN_ID).cloned())
        .filter(|id| !state_dir.join(format!("{id}.json")).exists())
        .collect();
    runs.sort();
    runs.dedup();
    let mut lines = Vec::new();
    for run in runs {
        let sel = format!("{}={home},{}={run}", labels::HOME, labels::RUN_ID);
        match cluster.delete_pods(&sel, 0, DELETE_WAIT).await {
            Ok((n, _)) => lines.push(format!(
                "removed {n} pods of run {run}, whose engine is gone"
            )),
            Err(e) => lines.push(format!("cannot remove the pods of run {run}: {e}")),
        }
    }
    lines
}

impl Launcher for K8sLauncher {
    type Instance = K8sInstance;

    async fn start(&mut self, ctx: &LaunchContext) -> Result<NetEnv, RunError> {
        self.events = Some(ctx.events.clone());
        self.reports = Some(ctx.reports.clone());
        self.resources()?;
        crate::netns::check_privileges().map_err(|e| match e {
            RunError::NetnsUnavailable { reason } => RunError::K8s(format!(
                "the engine is the node agent that builds the instances' data network: {reason}"
            )),
            e => e,
        })?;
        for line in self.exec.track(&ctx.temp_root)? {
            self.log(line).await;
        }
        let cluster = Cluster::connect(
            self.config.k8s.kubeconfig.as_deref(),
            self.config.k8s.namespace.as_deref(),
        )
        .await
        .map_err(k8s_err)?;
        self.log(format!(
            "k8s: cluster {} ({}), namespace {}",
            cluster.url(),
            cluster.version().await.unwrap_or_default(),
            cluster.namespace()
        ))
        .await;
        for line in self.clean_leftovers(&cluster).await {
            self.log(line).await;
        }
        self.check_capacity(&cluster).await?;
        let (node, addrs) = this_node(&cluster).await?;
        let host = sync_host(&self.config, node.as_ref(), &addrs)?;
        self.sync_ip = Some(host);
        if let Some((_, name)) = &node {
            self.logs_dir = Some(cluster.pod_logs_dir(name).await);
        }
        self.cluster = Some(cluster.clone());
        self.distribute_images().await?;

        let listener = tokio::net::TcpListener::bind((host, 0))
            .await
            .map_err(|e| RunError::K8s(format!("serve the sync service on {host}: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| RunError::K8s(e.to_string()))?
            .port();
        let sync = self
            .input
            .sync_service
            .clone()
            .ok_or_else(|| RunError::K8s("no in-process sync service was given".into()))?;
        let stop = self.stop.clone();
        self.tasks.spawn(tg_sync::server::serve(
            listener,
            sync,
            stop.cancelled_owned(),
        ));
        self.log(format!("k8s: sync service for the pods at {host}:{port}"))
            .await;

        let net = crate::netns::create(&self.input, &self.config, &ctx.temp_root.join(".net"), ctx)
            .await?;
        let subnet = net.subnet().to_string();
        self.net = Some(Arc::new(tokio::sync::Mutex::new(net)));
        let (wire_tx, wire_rx) = mpsc::unbounded_channel();
        self.spawn_watcher(&cluster, wire_tx);
        self.spawn_wiring(wire_rx);
        Ok(NetEnv {
            sidecar: true,
            subnet,
            sync_host: host.to_string(),
            sync_port: port,
        })
    }

    async fn prepare(&mut self, specs: &[InstanceSpec]) -> Result<(), RunError> {
        let Some(cluster) = self.cluster.clone() else {
            return Ok(());
        };
        let (cpu, memory) = self.resources()?;
        let began = Instant::now();
        let base = |group: &str| {
            [
                (labels::PURPOSE, "plan"),
                (labels::PLAN, &self.input.plan),
                (labels::TESTCASE, &self.input.case),
                (labels::RUN_ID, &self.input.run_id),
                (labels::GROUP_ID, group),
                (labels::HOME, &self.home_label),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), pods::label_value(v)))
            .collect()
        };
        let mut params = Vec::with_capacity(specs.len());
        for spec in specs {
            let name = pods::object_name(&[
                "tg",
                &self.input.plan,
                &self.input.run_id,
                &spec.group_id,
                &spec.index.to_string(),
            ]);
            let hostname = pods::dns_label(&spec.hostname);
            let image = self
                .images
                .get(&spec.group_id)
                .cloned()
                .unwrap_or_else(|| spec.artifact.clone());
            let p = PodParams {
                name: name.clone(),
                hostname: hostname.clone(),
                labels: base(&spec.group_id),
                image,
                pull_policy: self.pull_policy.clone(),
                env: self.environment(spec, &hostname),
                cpu: cpu.clone(),
                memory: memory.clone(),
                outputs: spec.outputs.clone(),
                sysctls: self.config.k8s.sysctls.clone(),
                node_selector: Default::default(),
            };
            let (tx, _) = watch::channel(PodState {
                verdict: Verdict::Pending { sandbox: false },
                gone: false,
            });
            lock(&self.slots).insert(
                name.clone(),
                Slot {
                    ordinal: spec.ordinal,
                    uid: None,
                    hostname,
                    outputs: spec.outputs.clone(),
                    state: tx,
                    wired: false,
                },
            );
            params.push(p);
        }
        // Pods go to the plan nodes when some are labelled so.
        if self.plan_nodes_labelled {
            for p in &mut params {
                p.node_selector
                    .insert(tg_k8s::capacity::PLAN_NODE_LABEL.into(), "true".into());
            }
        }
        self.created_any = true;
        let _ = self.first_create.set(Instant::now());
        let total = params.len();
        let api = cluster.pods();
        let created = std::sync::atomic::AtomicUsize::new(0);
        let step = (total / 10).max(1);
        let events = self.events.clone();
        let slots = &self.slots;
        let results: Vec<Result<String, RunError>> = futures::stream::iter(params)
            .map(|p| {
                let api = api.clone();
                let created = &created;
                let events = events.clone();
                async move {
                    let pod = pods::pod(&p);
                    let made = api
                        .create(&PostParams::default(), &pod)
                        .await
                        .map_err(|e| {
                            RunError::K8s(format!("create pod {}: {}", p.name, tg_k8s::api_err(e)))
                        })?;
                    if let Some(slot) = lock(slots).get_mut(&p.name) {
                        slot.uid = made.metadata.uid;
                    }
                    let n = created.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    if (n.is_multiple_of(step) || n == total)
                        && let Some(ev) = &events
                    {
                        let _ = ev
                            .send(RunnerEvent::Log(format!("k8s: created {n}/{total} pods")))
                            .await;
                    }
                    Ok(p.name)
                }
            })
            .buffered(self.config.k8s.create_concurrency.max(1))
            .collect()
            .await;
        for r in results {
            self.prepared.push_back(r?);
        }
        self.log(format!(
            "k8s: {total} pods created in {:.2}s",
            began.elapsed().as_secs_f64()
        ))
        .await;
        Ok(())
    }

    async fn launch(&mut self, spec: &InstanceSpec) -> Result<K8sInstance, RunError> {
        let cluster = self
            .cluster
            .clone()
            .ok_or_else(|| RunError::K8s("no cluster connection".into()))?;
        let name = self.prepared.pop_front().ok_or_else(|| {
            RunError::K8s(format!(
                "no pod was created for instance {}[{}]",
                spec.group_id, spec.index
            ))
        })?;
        let (state, uid) = lock(&self.slots)
            .get(&name)
            .map(|s| (s.state.subscribe(), s.uid.clone().unwrap_or_default()))
            .ok_or_else(|| RunError::K8s(format!("pod {name} is not tracked")))?;
        if let Some(reports) = &self.reports {
            // The pod name's suffix is the group and index already; its uid tells runs apart.
            if !uid.is_empty() {
                let _ = reports
                    .send(InstanceReport::Tag {
                        instance: spec.ordinal,
                        tag: uid.chars().take(6).collect(),
                    })
                    .await;
            }
        }
        let (out_r, out_w) = tokio::io::duplex(PIPE_BUFFER);
        let (err_r, err_w) = tokio::io::duplex(PIPE_BUFFER);
        let log_file = self.logs_dir.as_ref().map(|dir| {
            tg_k8s::cri_log::path(dir, cluster.namespace(), &name, &uid, pods::PLAN_CONTAINER)
        });
        tokio::spawn(follow_log(
            cluster.clone(),
            name.clone(),
            log_file,
            state.clone(),
            (out_w, err_w),
        ));
        Ok(K8sInstance {
            cluster,
            name,
            state,
            stdout: Some(out_r),
            stderr: Some(err_r),
            reports: self.reports.clone(),
            ordinal: spec.ordinal,
            stopped: None,
        })
    }

    async fn teardown(mut self) -> Vec<String> {
        let mut lines = Vec::new();
        if self.created_any
            && let Some(cluster) = self.cluster.clone()
        {
            match cluster
                .delete_pods(&self.run_selector(), 0, DELETE_WAIT)
                .await
            {
                Ok((0, _)) => {}
                Ok((n, 0)) => lines.push(format!("removed {n} pods")),
                Ok((n, left)) => lines.push(format!(
                    "removed {n} pods; {left} still terminating after {}s",
                    DELETE_WAIT.as_secs()
                )),
                Err(e) => lines.push(format!("cannot remove the run's pods: {e}")),
            }
            self.created_any = false;
        }
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        if let Some(net) = self.net.take()
            && let Ok(net) = Arc::try_unwrap(net)
        {
            lines.extend(crate::netns::shut_down(net.into_inner()).await);
        }
        let exec = std::mem::replace(&mut self.exec, ExecLauncher::new(&self.input));
        lines.extend(exec.finish().await);
        lines
    }
}

impl K8sLauncher {
    fn environment(&self, spec: &InstanceSpec, hostname: &str) -> Vec<(String, String)> {
        let mut env = Vec::with_capacity(spec.env.len() + 4);
        for (k, v) in &spec.env {
            let v = match k.as_ref() {
                "PATH" | "HOME" => continue,
                "TEST_OUTPUTS_PATH" => "/outputs".to_string(),
                "TEST_TEMP_PATH" => "/temp".to_string(),
                "HOSTNAME" => hostname.to_string(),
                _ => v.to_string_lossy().into_owned(),
            };
            env.push((k.to_string(), v));
        }
        if let Some(level) = &self.config.docker.log_level {
            env.push(("LOG_LEVEL".into(), level.clone()));
        }
        env
    }
}

impl Drop for K8sLauncher {
    fn drop(&mut self) {
        self.stop.cancel();
        if !self.created_any {
            return;
        }
        // Dropped without teardown (the run's future was dropped): delete its pods anyway.
        if let (Some(cluster), Ok(h)) =
            (self.cluster.clone(), tokio::runtime::Handle::try_current())
        {
            let sel = self.run_selector();
            h.spawn(async move {
                let _ = cluster.delete_pods(&sel, 0, DELETE_WAIT).await;
            });
        }
    }
}

/// Copies the plan container's output into the run loop's pipes once it has started, until it
/// ends: from the kubelet's log file on this node when there is one (stdout and stderr apart),
/// else through the API (stdout and stderr merged).
async fn follow_log(
    cluster: Cluster,
    name: String,
    file: Option<PathBuf>,
    mut state: watch::Receiver<PodState>,
    (mut out, mut err): (DuplexStream, DuplexStream),
) {
    let started = state
        .wait_for(|s| s.gone || !matches!(s.verdict, Verdict::Pending { .. }))
        .await
        .map(|s| !matches!(s.verdict, Verdict::Failed { .. }) && !s.gone)
        .unwrap_or(false);
    if started {
        let mut done = false;
        if let Some(path) = file
            && appears(&path, Duration::from_secs(5)).await
        {
            done = tail_cri_log(&path, &mut state, &mut out, &mut err)
                .await
                .is_ok();
        }
        if !done {
            let lp = LogParams {
                container: Some(pods::PLAN_CONTAINER.into()),
                follow: true,
                ..Default::default()
            };
            match cluster.pods().log_stream(&name, &lp).await {
                Ok(stream) => {
                    use futures::AsyncReadExt;
                    let mut stream = std::pin::pin!(stream);
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || out.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
                Err(e) => {
                    let _ = out
                        .write_all(
                            format!("(cannot follow the log of pod {name}: {e})\n").as_bytes(),
                        )
                        .await;
                }
            }
        }
    }
    let _ = out.shutdown().await;
    let _ = err.shutdown().await;
}

async fn appears(path: &std::path::Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if tokio::fs::metadata(path).await.is_ok() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Follows a CRI log file (reopened when the kubelet rotates it) until the container ended and
/// everything it wrote was read.
async fn tail_cri_log(
    path: &std::path::Path,
    state: &mut watch::Receiver<PodState>,
    out: &mut DuplexStream,
    err: &mut DuplexStream,
) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    use tg_k8s::cri_log::{Stream, parse};
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await?;
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Reads at the end of the file once the container ended: one more after the end is
    // seen, for what the runtime wrote last.
    let mut after_end = 0;
    loop {
        let n = file.read(&mut buf).await?;
        if n > 0 {
            pending.extend_from_slice(&buf[..n]);
            while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                let Some(rec) = parse(&line[..line.len() - 1]) else {
                    continue;
                };
                let pipe = match rec.stream {
                    Stream::Stdout => &mut *out,
                    Stream::Stderr => &mut *err,
                };
                // A closed pipe (the run loop stopped reading) only loses this output.
                let _ = pipe.write_all(rec.content).await;
                if rec.full {
                    let _ = pipe.write_all(b"\n").await;
                }
            }
            continue;
        }
        let rotated = match (tokio::fs::metadata(path).await, file.metadata().await) {
            (Ok(now), Ok(open)) => now.ino() != open.ino(),
            _ => false,
        };
        if rotated {
            file = tokio::fs::File::open(path).await?;
            continue;
        }
        let ended = {
            let s = state.borrow();
            s.gone || matches!(s.verdict, Verdict::Exited { .. } | Verdict::Failed { .. })
        };
        if ended {
            after_end += 1;
            if after_end > 1 {
                return Ok(());
            }
        }
        tokio::select! {
            _ = state.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

pub(crate) struct K8sInstance {
    cluster: Cluster,
    name: String,
    state: watch::Receiver<PodState>,
    stdout: Option<DuplexStream>,
    stderr: Option<DuplexStream>,
    reports: Option<mpsc::Sender<InstanceReport>>,
    ordinal: usize,
    stopped: Option<Stop>,
}

impl Launched for K8sInstance {
    type Pipe = DuplexStream;

    fn take_stdout(&mut self) -> Option<DuplexStream> {
        self.stdout.take()
    }

    fn take_stderr(&mut self) -> Option<DuplexStream> {
        self.stderr.take()
    }

    async fn wait(&mut self) -> Termination {
        let end = self
            .state
            .wait_for(|s| {
                s.gone || matches!(s.verdict, Verdict::Exited { .. } | Verdict::Failed { .. })
            })
            .await
            .map(|s| s.clone());
        match end {
            Ok(PodState {
                verdict: Verdict::Exited { code },
                ..
            }) => crate::docker::termination(i64::from(code)),
            Ok(PodState {
                verdict: Verdict::Failed { reason },
                ..
            }) => {
                if let Some(r) = &self.reports {
                    let _ = r
                        .send(InstanceReport::Refused {
                            instance: self.ordinal,
                            elapsed: Duration::ZERO,
                            reason: format!("pod {}: {reason}", self.name),
                        })
                        .await;
                }
                Termination::Unknown
            }
            _ => match self.stopped {
                Some(Stop::Kill) => Termination::Signal(9),
                Some(Stop::Term) => Termination::Signal(15),
                None => {
                    if let Some(r) = &self.reports {
                        let _ = r
                            .send(InstanceReport::Refused {
                                instance: self.ordinal,
                                elapsed: Duration::ZERO,
                                reason: format!("pod {} was deleted by someone else", self.name),
                            })
                            .await;
                    }
                    Termination::Unknown
                }
            },
        }
    }

    fn stop(&mut self, how: Stop) {
        self.stopped = Some(how);
        let api = self.cluster.pods();
        let name = self.name.clone();
        let grace = match how {
            Stop::Term => 2,
            Stop::Kill => 0,
        };
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let _ = api
                    .delete(&name, &DeleteParams::default().grace_period(grace))
                    .await;
            });
        }
    }
}

/// `healthcheck --runner cluster:k8s`: the API answers, nodes are Ready, the registry answers,
/// and a pod reaches a sync endpoint served from here.
pub(crate) async fn health(env: crate::EnvConfig) -> Vec<HealthCheck> {
    let mut checks = crate::netns::health();
    let config = match env_config(&env) {
        Ok(c) => c,
        Err(e) => {
            checks.push(HealthCheck::new("k8s-config", false, e.to_string()));
            return checks;
        }
    };
    let cluster = match Cluster::connect(
        config.k8s.kubeconfig.as_deref(),
        config.k8s.namespace.as_deref(),
    )
    .await
    {
        Ok(c) => {
            checks.push(HealthCheck::new(
                "k8s-api",
                true,
                format!(
                    "{} answers ({}), namespace {}",
                    c.url(),
                    c.version().await.unwrap_or_default(),
                    c.namespace()
                ),
            ));
            c
        }
        Err(e) => {
            checks.push(HealthCheck::new("k8s-api", false, e.to_string()));
            return checks;
        }
    };
    match cluster.rooms().await {
        Ok((rooms, _)) if !rooms.is_empty() => checks.push(HealthCheck::new(
            "k8s-nodes",
            true,
            rooms
                .iter()
                .map(|r| {
                    format!(
                        "{} Ready ({} CPU, {} and {} pods free)",
                        r.name,
                        tg_k8s::quantity::human_cpu(r.cpu_m),
                        tg_k8s::quantity::human_bytes(r.memory),
                        r.pods
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        )),
        Ok(_) => checks.push(HealthCheck::new(
            "k8s-nodes",
            false,
            "no Ready, schedulable node",
        )),
        Err(e) => checks.push(HealthCheck::new("k8s-nodes", false, e.to_string())),
    }
    if let Some(registry) = &config.k8s.push_registry {
        let url = format!("{registry}/v2/");
        let ok = registry_answers(registry).await;
        checks.push(HealthCheck::new(
            "k8s-registry",
            ok.is_ok(),
            match ok {
                Ok(status) => format!("http://{url} answers ({status})"),
                Err(e) => format!("http://{url}: {e}"),
            },
        ));
    } else if let Some(sock) = &config.k8s.node_containerd {
        checks.push(HealthCheck::new(
            "k8s-images",
            sock.exists(),
            format!("node containerd socket {}", sock.display()),
        ));
    } else {
        checks.push(HealthCheck::new(
            "k8s-images",
            false,
            "set push_registry (or node_containerd on a single-node cluster) in [runners.\"cluster:k8s\"] of .env.toml",
        ));
    }
    checks.push(sync_probe(&cluster, &config).await);
    checks
}

/// GET /v2/ of a registry over plain HTTP: its status line.
async fn registry_answers(registry: &str) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let connect = tokio::net::TcpStream::connect(registry);
    let mut s = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| "no answer in 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {registry}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .map_err(|_| "no answer in 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf[..n]);
    let status = text.lines().next().unwrap_or("").trim().to_string();
    if status.starts_with("HTTP/1.") && status.contains(" 200") {
        Ok(status)
    } else {
        Err(format!("unexpected answer {status:?}"))
    }
}

/// Serves a TCP endpoint where the sync service would be and runs a pod that connects to it.
async fn sync_probe(cluster: &Cluster, config: &RunConfig) -> HealthCheck {
    const NAME: &str = "sync-from-pod";
    let fail = |m: String| HealthCheck::new(NAME, false, m);
    let input_host = match this_node(cluster)
        .await
        .and_then(|(node, addrs)| sync_host(config, node.as_ref(), &addrs))
    {
        Ok(h) => h,
        Err(e) => return fail(e.to_string()),
    };
    let listener = match tokio::net::TcpListener::bind((input_host, 0)).await {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {input_host}: {e}")),
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    // The probe runs the default busybox, put where the nodes get images as a run's would be.
    let busybox = tg_docker::base::BUSYBOX;
    let image = match tg_docker::Docker::connect().await {
        Err(e) => return fail(format!("the probe's busybox is in the Docker engine: {e}")),
        Ok(docker) => match (&config.k8s.push_registry, &config.k8s.node_containerd) {
            (Some(r), _) => {
                let target = format!("{r}/{busybox}");
                if let Err(e) = push(&docker, busybox, &target).await {
                    return fail(e.to_string());
                }
                target
            }
            (None, Some(sock)) => {
                if let Err(e) = load_into_containerd(&docker, &[busybox.to_string()], sock).await {
                    return fail(e.to_string());
                }
                busybox.to_string()
            }
            (None, None) => busybox.to_string(),
        },
    };
    let name = format!("tg-healthcheck-{}", std::process::id());
    let pod: Pod = match serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {labels::PURPOSE: "healthcheck"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "containers": [{
                "name": "probe",
                "image": image,
                "imagePullPolicy": if config.k8s.push_registry.is_some() { "IfNotPresent" } else { "Never" },
                "command": ["sh", "-c", format!("echo ping | nc -w 5 {input_host} {port}")],
            }],
        },
    })) {
        Ok(p) => p,
        Err(e) => return fail(e.to_string()),
    };
    let api = cluster.pods();
    if let Err(e) = api.create(&PostParams::default(), &pod).await {
        return fail(format!("cannot create a probe pod: {}", tg_k8s::api_err(e)));
    }
    let accepted = tokio::time::timeout(Duration::from_secs(60), listener.accept()).await;
    let phase = async {
        for _ in 0..60 {
            if let Ok(p) = api.get(&name).await
                && let Some(problem) = pods::problem(&p)
            {
                return Some(problem.reason);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        None
    };
    let result = match accepted {
        Ok(Ok((_, peer))) => HealthCheck::new(
            NAME,
            true,
            format!("a pod ({image}) reached {input_host}:{port} from {peer}"),
        ),
        _ => {
            let why = tokio::time::timeout(Duration::from_secs(1), phase)
                .await
                .ok()
                .flatten()
                .unwrap_or_else(|| "no connection within 60 s".into());
            fail(format!("a pod could not reach {input_host}:{port}: {why}"))
        }
    };
    let _ = api
        .delete(&name, &DeleteParams::default().grace_period(0))
        .await;
    result
}

/// The runner's `.env.toml` table as a configuration (for `healthcheck` and `terminate`).
fn env_config(env: &crate::EnvConfig) -> Result<RunConfig, RunError> {
    crate::config::parse(
        "cluster:k8s",
        &[
            crate::config::COMMON_KEYS,
            crate::config::NETWORK_KEYS,
            crate::config::K8S_KEYS,
        ],
        env,
        &Default::default(),
    )
}

/// `testground terminate --runner cluster:k8s`: deletes every plan pod of this engine home, as
/// the original deleted every plan pod: runs of this engine are canceled by it, runs of other
/// processes on the same home (embedded CLIs) see their pods go and end.
pub(crate) async fn terminate(data_dir: PathBuf, env: crate::EnvConfig) -> Vec<String> {
    let mut lines = crate::clean_leftovers(&crate::runs_dir(&data_dir));
    let config = match env_config(&env) {
        Ok(c) => c,
        Err(e) => {
            lines.push(e.to_string());
            return lines;
        }
    };
    match Cluster::connect(
        config.k8s.kubeconfig.as_deref(),
        config.k8s.namespace.as_deref(),
    )
    .await
    {
        Ok(c) => {
            let home = tg_k8s::home_label(&crate::runs_dir(&data_dir));
            let sel = format!("{}=plan,{}={home}", labels::PURPOSE, labels::HOME);
            match c.delete_pods(&sel, 0, DELETE_WAIT).await {
                Ok((0, _)) => {}
                Ok((n, 0)) => lines.push(format!("deleted {n} plan pods")),
                Ok((n, left)) => {
                    lines.push(format!("deleted {n} plan pods; {left} still terminating"))
                }
                Err(e) => lines.push(format!("cannot delete the plan pods: {e}")),
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
    fn default_gateway_from_the_route_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t0100F40A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t0000F40A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        assert_eq!(
            parse_default_gateway(table),
            Some(Ipv4Addr::new(10, 244, 0, 1))
        );
        assert_eq!(parse_default_gateway("Iface\n"), None);
    }

    #[test]
    fn tags_split_at_the_last_colon_after_the_registry() {
        assert_eq!(
            split_tag("127.0.0.1:5000/tg-plan-x:abc"),
            ("127.0.0.1:5000/tg-plan-x", "abc")
        );
        assert_eq!(
            split_tag("127.0.0.1:5000/busybox"),
            ("127.0.0.1:5000/busybox", "latest")
        );
    }
}
