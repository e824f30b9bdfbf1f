//! `local:netns`: the exec launcher plus, for each instance, the network, UTS and mount
//! namespaces and jail its run's sidecar (`tg-sidecar`) builds; the privilege check, the run's
//! seed and capture settings.

use std::path::Path;

use tg_sidecar::{Options, RunNetwork, SYNC_NAME, SYNC_PORT, SidecarEvent};
use tokio::sync::mpsc;

use crate::exec::{ExecInstance, ExecLauncher};
use crate::launch::{InstanceSpec, LaunchContext, Launcher, NetEnv};
use crate::supervisor::InstanceReport;
use crate::{RunConfig, RunError, RunInput, RunnerEvent};

/// Instance networks built at a time: past about 16 the kernel's own serialisation (rtnl)
/// dominates (measured with tg-sys's netns-scale example).
pub(crate) const NETNS_SETUP_CONCURRENCY: usize = 16;

/// How many instance networks may be ready ahead of the processes that use them. Networks
/// are built while the first processes start (both take CPU, neither all of it); a bound
/// keeps the descriptors of built but unused networks few.
const PREPARED_AHEAD: usize = 64;

/// Namespaces, TUN devices and mounts need root (CAP_SYS_ADMIN and CAP_NET_ADMIN).
pub(crate) fn check_privileges() -> Result<(), RunError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(RunError::NetnsUnavailable {
            reason: "it needs root (namespaces, TUN devices and mounts); run the daemon as root \
                     or use --runner local:exec"
                .into(),
        });
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err(RunError::NetnsUnavailable {
            reason: "/dev/net/tun is missing (load the tun module)".into(),
        });
    }
    Ok(())
}

/// `testground healthcheck --runner local:netns`: what the runner needs from the machine, as
/// (check, ok, message).
pub(crate) fn health() -> Vec<crate::HealthCheck> {
    let root = nix::unistd::geteuid().is_root();
    let tun = Path::new("/dev/net/tun").exists();
    let on_path = |tool: &str| {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false)
    };
    let nft = on_path("nft");
    let nsenter = on_path("nsenter");
    vec![
        crate::HealthCheck {
            name: "root",
            ok: root,
            fix: None,
            message: if root {
                "running as root".into()
            } else {
                "not root: namespaces, TUN devices and mounts need root".into()
            },
        },
        crate::HealthCheck {
            name: "tun-device",
            ok: tun,
            fix: None,
            message: format!("/dev/net/tun {}", if tun { "exists" } else { "is missing" }),
        },
        crate::HealthCheck {
            name: "nft",
            ok: nft && nsenter,
            fix: None,
            message: if nft && nsenter {
                "nft and nsenter found (routing_policy allow_all)".into()
            } else {
                "nft or nsenter not found: routing_policy allow_all will fail (apt install nftables)"
                    .into()
            },
        },
    ]
}

/// A fresh seed when none was configured. No rand dependency for one number: the clock and
/// pid vary enough between runs, and the seed is printed so that a run can be repeated.
fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
}

/// Starts instances inside the namespaces of the run's network.
pub(crate) struct NetnsLauncher {
    exec: ExecLauncher,
    input: RunInput,
    config: RunConfig,
    net: Option<RunNetwork>,
    events: Option<mpsc::Sender<RunnerEvent>>,
    /// Instance networks in launch order, from the task `prepare` started.
    prepared: Option<mpsc::Receiver<Result<tg_sidecar::Instance, tg_sidecar::SidecarError>>>,
    /// The task building them; it hands the network back when done or when `prepared` is
    /// dropped.
    building: Option<tokio::task::JoinHandle<RunNetwork>>,
}

impl NetnsLauncher {
    pub(crate) fn new(input: RunInput, config: RunConfig) -> Self {
        NetnsLauncher {
            exec: ExecLauncher::new(&input).with_config(&config),
            input,
            config,
            net: None,
            events: None,
            prepared: None,
            building: None,
        }
    }
}

impl Launcher for NetnsLauncher {
    type Instance = ExecInstance;

    fn paced_start(&self) -> bool {
        true
    }

    async fn start(&mut self, ctx: &LaunchContext) -> Result<NetEnv, RunError> {
        check_privileges()?;
        crate::limits::check_direct("local:netns", self.input.total_instances)?;
        self.events = Some(ctx.events.clone());
        for line in self.exec.track(&ctx.temp_root)? {
            let _ = ctx.events.send(RunnerEvent::Log(line)).await;
        }
        for line in self.exec.settle_sched() {
            let _ = ctx.events.send(RunnerEvent::Log(line)).await;
        }
        let net = create(&self.input, &self.config, &ctx.temp_root.join(".net"), ctx).await?;
        let env = NetEnv {
            sidecar: true,
            subnet: net.subnet().to_string(),
            sync_host: SYNC_NAME.into(),
            sync_port: SYNC_PORT,
        };
        self.net = Some(net);
        Ok(env)
    }

    /// Starts building every instance's network (namespaces, links, TUN, jail), several at a
    /// time, on a task of its own: `launch` takes them in order as they become ready, so the
    /// first processes start while later networks are still being built.
    async fn prepare(&mut self, specs: &[InstanceSpec]) -> Result<(), RunError> {
        let Some(mut net) = self.net.take() else {
            return Ok(());
        };
        let sidecar_specs = specs
            .iter()
            .map(|s| tg_sidecar::InstanceSpec {
                ordinal: s.ordinal as u32,
                hostname: s.hostname.clone(),
                outputs: s.outputs.clone(),
                netns: None,
                control: tg_sidecar::ControlLink::Veth,
            })
            .collect::<Vec<_>>();
        let (tx, rx) = mpsc::channel(PREPARED_AHEAD);
        let events = self.events.clone();
        self.prepared = Some(rx);
        self.building = Some(tokio::spawn(async move {
            let setup = std::time::Instant::now();
            let count = sidecar_specs.len();
            net.add_instances_to(sidecar_specs, NETNS_SETUP_CONCURRENCY, tx)
                .await;
            if let Some(events) = events {
                let _ = events
                    .send(RunnerEvent::Log(format!(
                        "network: {count} instance networks built in {:.2}s (while the first \
                         instances started)",
                        setup.elapsed().as_secs_f64()
                    )))
                    .await;
            }
            net
        }));
        Ok(())
    }

    async fn launch(&mut self, spec: &InstanceSpec) -> Result<ExecInstance, RunError> {
        // Built by the prepare task, in the same order as the launches.
        let next = match &mut self.prepared {
            Some(rx) => rx.recv().await,
            None => None,
        };
        let inst = match next {
            Some(Ok(inst)) => inst,
            Some(Err(e)) => return Err(RunError::RunNetwork(e)),
            None => {
                return Err(RunError::NetnsUnavailable {
                    reason: format!(
                        "no network was prepared for instance {}[{}]",
                        spec.group_id, spec.index
                    ),
                });
            }
        };
        let (mut cmd, artifact) = self.exec.command(spec);
        inst.jail.apply(&mut cmd);
        self.exec.spawn(spec, cmd, artifact).await
    }

    async fn teardown(mut self) -> Vec<String> {
        // Stops the prepare task (it hands the network back).
        drop(self.prepared.take());
        if let Some(building) = self.building.take()
            && let Ok(net) = building.await
        {
            self.net = Some(net);
        }
        // Processes first (the tracker's cgroup also holds instances that left their
        // namespaces), then the network they used.
        let mut lines = self.exec.finish().await;
        if let Some(net) = self.net.take()
            && let Some(stats) = net.shutdown().await
        {
            lines.push(format!("network: {stats}"));
        }
        lines
    }
}

/// Builds the run's network and forwards the sidecar's messages: log lines to the run log,
/// refused network configs to the supervisor (they fail their instance).
pub(crate) async fn create(
    input: &RunInput,
    config: &RunConfig,
    work_dir: &Path,
    ctx: &LaunchContext,
) -> Result<RunNetwork, RunError> {
    // The caller has checked the privileges before creating anything.
    let sync = input
        .sync_service
        .clone()
        .ok_or_else(|| RunError::NetnsUnavailable {
            reason: "no in-process sync service was given to the runner".into(),
        })?;
    let seed = config.seed.unwrap_or_else(fresh_seed);
    let capture = config.capture;
    let (log_tx, mut log_rx) = mpsc::unbounded_channel::<SidecarEvent>();
    let events = ctx.events.clone();
    let reports = ctx.reports.clone();
    // Ends when the network (the last sender) is gone.
    tokio::spawn(async move {
        while let Some(m) = log_rx.recv().await {
            match m {
                SidecarEvent::Log(m) => {
                    let _ = events.send(RunnerEvent::Log(format!("sidecar: {m}"))).await;
                }
                SidecarEvent::ConfigRefused {
                    ordinal,
                    hostname,
                    reason,
                } => {
                    let _ = events
                        .send(RunnerEvent::Log(format!(
                            "sidecar: {hostname}: network config refused: {reason}"
                        )))
                        .await;
                    let _ = reports
                        .send(InstanceReport::Refused {
                            instance: ordinal as usize,
                            elapsed: std::time::Duration::ZERO,
                            reason: format!("network config refused: {reason}"),
                        })
                        .await;
                }
                SidecarEvent::ConfigApplied {
                    ordinal, config, ..
                } => {
                    let _ = reports
                        .send(InstanceReport::NetworkApplied {
                            instance: ordinal as usize,
                            elapsed: std::time::Duration::ZERO,
                            config,
                        })
                        .await;
                }
            }
        }
    });
    let opts = Options {
        run_id: input.run_id.clone(),
        sync_prefix: crate::sync_prefix(input),
        sync,
        seed,
        capture,
        work_dir: work_dir.to_path_buf(),
        subnet: None,
        forward: None,
    };
    let net = RunNetwork::create(opts, log_tx)
        .await
        .map_err(RunError::RunNetwork)?;
    // The host link is named (cleanup can be checked by name); that the host is reachable under
    // allow_all is said by the sidecar when an instance asks for it.
    let host = net
        .host_if()
        .map(|i| format!(", host link {i}"))
        .unwrap_or_default();
    let _ = ctx
        .events
        .send(RunnerEvent::Log(format!(
            "network: data subnet {}, seed {seed} (repeat with --run-cfg seed={seed}){}{host}",
            net.subnet(),
            if capture {
                ", capturing data traffic to data.pcap"
            } else {
                ""
            }
        )))
        .await;
    let _ = ctx
        .events
        .send(RunnerEvent::Network {
            subnet: net.subnet().to_string(),
            seed,
        })
        .await;
    Ok(net)
}
