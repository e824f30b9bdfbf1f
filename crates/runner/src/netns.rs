//! `local:netns`: the exec launcher plus, for each instance, the network, UTS and mount
//! namespaces and jail its run's sidecar (`tg-sidecar`) builds; the privilege check, the run's
//! seed and capture settings.

use std::path::Path;

use tg_sidecar::{Lateness, Options, RunNetwork, SYNC_NAME, SYNC_PORT, SidecarEvent};
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
        if let Some(net) = self.net.take() {
            lines.extend(shut_down(net).await);
        }
        lines
    }
}

/// Shuts a run's network down (the runners that shape: local:netns, local:docker, cluster:k8s)
/// and returns its closing lines for the run log: how punctual the shaping was since the
/// network was made, then the emulator's counters.
pub(crate) async fn shut_down(net: RunNetwork) -> Vec<String> {
    let mut lines = Vec::new();
    let late = net.take_pump_lateness().await.ok();
    let steal = net.steal_since_created();
    if let Some(line) = late.and_then(|l| timing_line(&l, steal)) {
        lines.push(line);
    }
    if let Some(stats) = net.shutdown().await {
        lines.push(format!("network: {stats}"));
    }
    lines
}

/// When the p99 of the pump's lateness is surely above this (its bucket starts there), the
/// timing line points at the machine: shaped delays were that late.
const LATE_P99_US: u64 = 1_000;

/// The run log's account of how punctual the shaping was: how late the pump released the
/// packets it delayed (the pump's share of a shaped delay's error; the instances' own wake-ups
/// add theirs), and how much CPU time the host of a virtual machine took meanwhile (steal),
/// since that is what makes a virtual machine's timers late whatever runs inside it.
/// `None` when no packet was delayed.
fn timing_line(late: &Lateness, steal: Option<f64>) -> Option<String> {
    let (p50, p99) = (late.percentile_us(50.0)?, late.percentile_us(99.0)?);
    let max = late.max_ns as f64 / 1e6;
    let mut line = format!(
        "network: {} delayed packets released late by under {p50} µs for half of them, under \
         {p99} µs for 99 %, {max:.2} ms at most",
        late.count
    );
    if let Some(steal) = steal.filter(|&s| s > 0.0) {
        line.push_str(&format!(
            "; the host of this virtual machine took {:.1} % of its CPU time meanwhile (steal)",
            steal * 100.0
        ));
    }
    // A percentile is the top of a power-of-two bucket: half of it is the bucket's start.
    if p99 / 2 >= LATE_P99_US {
        line.push_str(
            "; shaped delays ran over a millisecond late: the machine was busy or its host \
             took its CPUs (README, \"Timing under load\")",
        );
    }
    Some(line)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lateness(us: &[u64]) -> Lateness {
        let mut l = Lateness::default();
        for &u in us {
            l.record(u * 1_000);
        }
        l
    }

    #[test]
    fn the_timing_line_gives_the_pumps_lateness_and_the_hosts_steal() {
        // Nothing delayed: nothing to say.
        assert_eq!(timing_line(&Lateness::default(), Some(0.05)), None);
        // 98 packets 20-30 µs late, 2 of them 3 ms: p99 is in the 2-4 ms bucket.
        let mut us = vec![20; 49];
        us.extend([30; 49]);
        us.extend([3_000, 3_000]);
        let line = timing_line(&lateness(&us), Some(0.082)).unwrap();
        assert_eq!(
            line,
            "network: 100 delayed packets released late by under 32 µs for half of them, under \
             4096 µs for 99 %, 3.00 ms at most; the host of this virtual machine took 8.2 % of \
             its CPU time meanwhile (steal); shaped delays ran over a millisecond late: the \
             machine was busy or its host took its CPUs (README, \"Timing under load\")"
        );
        // Punctual, on a machine without steal (or where it is unknown): no warning, no steal.
        let line = timing_line(&lateness(&[10, 20, 600]), Some(0.0)).unwrap();
        assert_eq!(
            line,
            "network: 3 delayed packets released late by under 32 µs for half of them, under \
             1024 µs for 99 %, 0.60 ms at most"
        );
        assert_eq!(timing_line(&lateness(&[10, 20, 600]), None), Some(line));
    }
}
