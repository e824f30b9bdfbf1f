//! What `local:netns` adds to the shared run loop: the privilege check, the run's seed and
//! capture settings, and the run's network (built by `tg-sidecar`).

use std::path::Path;

use tg_sidecar::{Options, RunNetwork, SYNC_NAME, SYNC_PORT, SidecarEvent};
use tokio::sync::mpsc;

use crate::{RunError, RunInput, RunnerEvent};

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
pub fn health() -> Vec<(&'static str, bool, String)> {
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
        (
            "root",
            root,
            if root {
                "running as root".into()
            } else {
                "not root: namespaces, TUN devices and mounts need root".into()
            },
        ),
        (
            "tun-device",
            tun,
            format!("/dev/net/tun {}", if tun { "exists" } else { "is missing" }),
        ),
        (
            "nft",
            nft && nsenter,
            if nft && nsenter {
                "nft and nsenter found (routing_policy allow_all)".into()
            } else {
                "nft or nsenter not found: routing_policy allow_all will fail (apt install nftables)"
                    .into()
            },
        ),
    ]
}

fn invalid(key: &str, v: &serde_json::Value, reason: &str) -> RunError {
    RunError::InvalidConfig {
        key: key.into(),
        value: v.to_string(),
        reason: reason.into(),
    }
}

/// `--run-cfg seed=N` (a number or a numeric string), else a fresh one.
pub(crate) fn seed(input: &RunInput) -> Result<u64, RunError> {
    match input.run_config.get("seed") {
        None => {
            // No rand dependency for one number: the clock and pid vary enough between runs,
            // and the seed is printed so that a run can be repeated.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            Ok((t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32))
        }
        Some(v @ serde_json::Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| invalid("seed", v, "expected a non-negative integer")),
        Some(v @ serde_json::Value::String(s)) => s
            .trim()
            .parse()
            .map_err(|_| invalid("seed", v, "expected a non-negative integer")),
        Some(v) => Err(invalid("seed", v, "expected a non-negative integer")),
    }
}

/// `--run-cfg capture=true`.
pub(crate) fn capture(input: &RunInput) -> Result<bool, RunError> {
    match input.run_config.get("capture") {
        None => Ok(false),
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(v @ serde_json::Value::String(s)) => match s.trim() {
            "true" | "1" => Ok(true),
            "false" | "0" | "" => Ok(false),
            _ => Err(invalid("capture", v, "expected true or false")),
        },
        Some(v) => Err(invalid("capture", v, "expected true or false")),
    }
}

/// The environment differences of a `local:netns` instance.
pub(crate) struct NetEnv {
    pub sidecar: bool,
    pub subnet: String,
    pub sync_host: String,
    pub sync_port: u16,
}

impl NetEnv {
    pub(crate) fn exec(input: &RunInput) -> NetEnv {
        NetEnv {
            sidecar: false,
            subnet: crate::env::SUBNET.into(),
            sync_host: input.sync_host.clone(),
            sync_port: input.sync_port,
        }
    }

    pub(crate) fn netns(net: &RunNetwork) -> NetEnv {
        NetEnv {
            sidecar: true,
            subnet: net.subnet().to_string(),
            sync_host: SYNC_NAME.into(),
            sync_port: SYNC_PORT,
        }
    }
}

/// Builds the run's network and forwards the sidecar's messages to the run log.
pub(crate) async fn create(
    input: &RunInput,
    work_dir: &Path,
    events: &mpsc::UnboundedSender<RunnerEvent>,
) -> Result<RunNetwork, RunError> {
    // The caller has checked the privileges before creating anything.
    let sync = input
        .sync_service
        .clone()
        .ok_or_else(|| RunError::NetnsUnavailable {
            reason: "no in-process sync service was given to the runner".into(),
        })?;
    let seed = seed(input)?;
    let capture = capture(input)?;
    let (log_tx, mut log_rx) = mpsc::unbounded_channel::<SidecarEvent>();
    let fwd = events.clone();
    // Ends when the network (the last sender) is gone.
    tokio::spawn(async move {
        // A refused config is a log line for now; failing its instance is the run loop's.
        while let Some(ev) = log_rx.recv().await {
            let _ = fwd.send(RunnerEvent::Log(format!("sidecar: {ev}")));
        }
    });
    let opts = Options {
        run_id: input.run_id.clone(),
        sync_prefix: format!(
            "run:{}:plan:{}:case:{}",
            input.run_id, input.plan, input.case
        ),
        sync,
        seed,
        capture,
        work_dir: work_dir.to_path_buf(),
    };
    let net = RunNetwork::create(opts, log_tx)
        .await
        .map_err(RunError::RunNetwork)?;
    let host = net
        .host_addr()
        .map(|a| format!(", host reachable under allow_all at {a} (testground-host)"))
        .unwrap_or_default();
    let _ = events.send(RunnerEvent::Log(format!(
        "network: data subnet {}, seed {seed} (repeat with --run-cfg seed={seed}){}{host}",
        net.subnet(),
        if capture {
            ", capturing data traffic to data.pcap"
        } else {
            ""
        }
    )));
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    fn input(config: serde_json::Value) -> RunInput {
        RunInput {
            run_id: "r".into(),
            plan: "p".into(),
            case: "c".into(),
            runner: "local:netns".into(),
            total_instances: 0,
            groups: vec![],
            run_config: config.as_object().cloned().unwrap_or_default(),
            outputs_root: PathBuf::new(),
            sync_host: "localhost".into(),
            sync_port: 5050,
            disable_metrics: false,
            timeout: Duration::from_secs(600),
            sync_service: None,
        }
    }

    #[test]
    fn seed_is_taken_from_the_run_config() {
        assert_eq!(seed(&input(serde_json::json!({"seed": 42}))).unwrap(), 42);
        assert_eq!(seed(&input(serde_json::json!({"seed": "7"}))).unwrap(), 7);
        assert!(seed(&input(serde_json::json!({"seed": "x"}))).is_err());
        assert!(seed(&input(serde_json::json!({"seed": -1}))).is_err());
        assert!(seed(&input(serde_json::json!({}))).is_ok());
    }

    #[test]
    fn capture_is_a_boolean() {
        assert!(capture(&input(serde_json::json!({"capture": true}))).unwrap());
        assert!(capture(&input(serde_json::json!({"capture": "true"}))).unwrap());
        assert!(!capture(&input(serde_json::json!({}))).unwrap());
        assert!(capture(&input(serde_json::json!({"capture": "yes please"}))).is_err());
    }
}
