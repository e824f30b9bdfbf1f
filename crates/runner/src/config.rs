//! Run configuration, parsed into types when a task is submitted.
//!
//! A run's configuration is the coalesced map of `.env.toml [runners."<id>"]` < manifest
//! `[runners."<id>"]` < composition `global.run_config` (where `--run-cfg` lands). Each runner
//! names the keys it understands; a bad value is an error naming the key wherever it comes
//! from, and an unknown key is an error when the user wrote it for this run (the composition,
//! `--run-cfg`) but only a warning when it comes from a manifest or `.env.toml`, which the
//! original's plans fill with keys for other runners (`enabled = true`, `ulimits`, ...).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use crate::RunError;

/// A run-config key a runner understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigKey {
    pub name: &'static str,
    /// What the value must look like, for `--help` and error messages.
    pub expects: &'static str,
    pub help: &'static str,
}

/// Keys every runner of this crate understands.
pub(crate) const COMMON_KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "run_timeout",
        expects: "a duration such as \"30s\" or \"10m\", or whole seconds; 0 disables",
        help: "kill the run and fail it after this long (default: the task timeout)",
    },
    ConfigKey {
        name: "run_timeout_min",
        expects: "whole minutes",
        help: "the original's run timeout in minutes (run_timeout wins when both are set)",
    },
    ConfigKey {
        name: "influxdb_url",
        expects: "a URL",
        help: "INFLUXDB_URL given to instances (default: the engine's InfluxDB endpoint under local:exec, else empty)",
    },
    ConfigKey {
        name: "enabled",
        expects: "true or false",
        help: "accepted for compatibility with the original's manifests; ignored",
    },
    ConfigKey {
        name: "disabled",
        expects: "true or false",
        help: "in .env.toml: refuse runs on this runner",
    },
];

/// Keys of the runners that shape a network (`local:netns`).
pub(crate) const NETWORK_KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "seed",
        expects: "a non-negative integer",
        help: "seed of every random impairment (printed by each run, to repeat it)",
    },
    ConfigKey {
        name: "capture",
        expects: "true or false",
        help: "write each instance's data traffic to data.pcap in its outputs",
    },
];

/// Keys of the runners whose instances are host processes (`local:exec`, `local:netns`).
pub(crate) const HOST_KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "instance_env",
        expects: "a table of NAME = \"value\", or \"NAME=value,...\" (not a variable the runner sets: TEST_*, SYNC_SERVICE_*, HOSTNAME, REDIS_HOST, INFLUXDB_URL)",
        help: "more environment for every instance (e.g. RUST_LOG, GODEBUG, GOMAXPROCS)",
    },
    ConfigKey {
        name: "timer_slack",
        expects: "a duration such as \"1ms\" (0: the kernel's default, 50us)",
        help: "how late the kernel may fire instances' timeouts to batch wake-ups (default: 1ms in a run of more than 500 instances per CPU, else the kernel's)",
    },
    ConfigKey {
        name: "start_pace",
        expects: "on, off, or a number of runnable tasks per CPU (at least 1)",
        help: "before starting each instance, wait (at most 1 s, and 10 s or 4 ms per instance in all) while the host has more runnable tasks than this (default on: 16 per CPU, the sync service's fan-out limit)",
    },
];

/// Keys of `local:docker` (the original's, and the start concurrency).
pub(crate) const DOCKER_KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "keep_containers",
        expects: "true or false",
        help: "leave the run's containers (stopped) for inspection instead of removing them",
    },
    ConfigKey {
        name: "ulimits",
        expects: "a list of \"name=soft:hard\" (e.g. [\"nofile=1048576:1048576\"]), or one string, comma separated",
        help: "resource limits of instance containers (default nofile=1048576:1048576, lowered to what the engine may grant)",
    },
    ConfigKey {
        name: "exposed_ports",
        expects: "a table of label = port",
        help: "ports instances listen on: <LABEL>_PORT in their environment, reachable from the host at an address the run log prints",
    },
    ConfigKey {
        name: "additional_hosts",
        expects: "a list of container names",
        help: "containers (on any Docker network of this engine) instances reach by name on their exposed TCP ports; ADDITIONAL_HOSTS in their environment",
    },
    ConfigKey {
        name: "log_level",
        expects: "a level such as \"debug\"",
        help: "LOG_LEVEL given to instances",
    },
    ConfigKey {
        name: "outcomes_collection_timeout",
        expects: "a duration such as \"45s\"",
        help: "accepted for compatibility; outcomes are collected as instances end",
    },
    ConfigKey {
        name: "start_concurrency",
        expects: "a positive integer",
        help: "containers started at a time (default 16, as the original)",
    },
    ConfigKey {
        name: "background",
        expects: "true or false",
        help: "accepted for compatibility with the original's manifests; ignored",
    },
];

/// Keys of `cluster:k8s` (the original's, and ours: where the cluster and its registry are).
pub(crate) const K8S_KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "kubeconfig",
        expects: "a path",
        help: "the cluster's kubeconfig (default: KUBECONFIG, then ~/.kube/config)",
    },
    ConfigKey {
        name: "namespace",
        expects: "a namespace name",
        help: "where the run's pods go (default: the kubeconfig's, else default)",
    },
    ConfigKey {
        name: "testplan_pod_cpu",
        expects: "a CPU quantity such as \"100m\" or \"0.5\"",
        help: "CPU requested by each instance's pod (required, as the original)",
    },
    ConfigKey {
        name: "testplan_pod_memory",
        expects: "a memory quantity such as \"64Mi\"",
        help: "memory requested by each instance's pod, also its limit (required, as the original)",
    },
    ConfigKey {
        name: "push_registry",
        expects: "a registry host[:port], e.g. \"127.0.0.1:5000\"",
        help: "push the run's images there and let the nodes pull them",
    },
    ConfigKey {
        name: "node_containerd",
        expects: "a containerd socket path",
        help: "single-node clusters: load the run's images into this node runtime (namespace k8s.io) instead of pushing them",
    },
    ConfigKey {
        name: "sync_host",
        expects: "an address of this host the pods reach",
        help: "where pods reach the engine's sync service (default: the plan node's address, when it is this host's)",
    },
    ConfigKey {
        name: "schedule_timeout",
        expects: "a duration such as \"60s\"",
        help: "how long a pod may stay unschedulable or unable to pull its image before its instance fails (default 60s)",
    },
    ConfigKey {
        name: "create_concurrency",
        expects: "a positive integer",
        help: "pods created at a time (default 16)",
    },
    ConfigKey {
        name: "sysctls",
        expects: "a list of \"name=value\"",
        help: "namespaced sysctls of each pod (the cluster's kubelet must allow unsafe ones)",
    },
    ConfigKey {
        name: "log_level",
        expects: "a level such as \"debug\"",
        help: "LOG_LEVEL given to instances",
    },
    ConfigKey {
        name: "keep_service",
        expects: "true or false",
        help: "accepted for compatibility with the original's manifests; ignored",
    },
    ConfigKey {
        name: "provider",
        expects: "\"aws\", \"dockerhub\" or empty",
        help: "accepted for compatibility; use push_registry",
    },
    ConfigKey {
        name: "autoscaler_enabled",
        expects: "true or false",
        help: "accepted for compatibility; the capacity check always applies",
    },
    ConfigKey {
        name: "collect_outputs_pod_cpu",
        expects: "a CPU quantity",
        help: "accepted for compatibility; outputs need no collector pod",
    },
    ConfigKey {
        name: "collect_outputs_pod_memory",
        expects: "a memory quantity",
        help: "accepted for compatibility; outputs need no collector pod",
    },
];

/// `cluster:k8s`'s part of a run configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sConfig {
    pub kubeconfig: Option<std::path::PathBuf>,
    pub namespace: Option<String>,
    pub pod_cpu: Option<String>,
    pub pod_memory: Option<String>,
    pub push_registry: Option<String>,
    pub node_containerd: Option<std::path::PathBuf>,
    pub sync_host: Option<std::net::IpAddr>,
    pub schedule_timeout: Duration,
    pub create_concurrency: usize,
    pub sysctls: Vec<(String, String)>,
}

impl Default for K8sConfig {
    fn default() -> Self {
        K8sConfig {
            kubeconfig: None,
            namespace: None,
            pod_cpu: None,
            pod_memory: None,
            push_registry: None,
            node_containerd: None,
            sync_host: None,
            schedule_timeout: Duration::from_secs(60),
            create_concurrency: 16,
            sysctls: Vec::new(),
        }
    }
}

/// `local:docker`'s part of a run configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerConfig {
    pub keep_containers: bool,
    /// (name, soft, hard), e.g. ("nofile", 1048576, 1048576).
    pub ulimits: Vec<(String, i64, i64)>,
    /// Label → port.
    pub exposed_ports: std::collections::BTreeMap<String, u16>,
    pub additional_hosts: Vec<String>,
    pub log_level: Option<String>,
    pub start_concurrency: usize,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            keep_containers: false,
            ulimits: vec![("nofile".into(), 1_048_576, 1_048_576)],
            exposed_ports: Default::default(),
            additional_hosts: Vec::new(),
            log_level: None,
            start_concurrency: 16,
        }
    }
}

/// A run configuration in types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunConfig {
    /// `run_timeout` / `run_timeout_min`: `None` uses the engine's task timeout; a zero
    /// duration disables the timeout.
    pub timeout: Option<Duration>,
    /// `seed`: `None` draws a fresh one.
    pub seed: Option<u64>,
    /// `capture`.
    pub capture: bool,
    /// `influxdb_url`.
    pub influxdb_url: Option<String>,
    /// `instance_env`: more variables for host-process instances, in name order.
    pub instance_env: Vec<(String, String)>,
    /// `timer_slack` of host-process instances (zero: the kernel's default).
    pub timer_slack: Option<Duration>,
    /// `start_pace` of host-process instances.
    pub start_pace: StartPaceSetting,
    /// `local:docker`'s keys.
    pub docker: DockerConfig,
    /// `cluster:k8s`'s keys.
    pub k8s: K8sConfig,
    /// Unknown keys that were tolerated (from a manifest or `.env.toml`), to warn about.
    pub ignored: Vec<String>,
}

/// `start_pace`: whether a start waits while the host is overcommitted (see `start_pace`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StartPaceSetting {
    /// On, at the sync service's fan-out limit per CPU.
    #[default]
    Default,
    Off,
    /// On, at this many runnable tasks per CPU.
    PerCpu(u32),
}

impl StartPaceSetting {
    /// The limit in runnable tasks per CPU, or `None` when off.
    pub fn per_cpu(self) -> Option<u32> {
        match self {
            StartPaceSetting::Default => Some(tg_sync::pace::DEFAULT_RUNNABLE_PER_CPU),
            StartPaceSetting::Off => None,
            StartPaceSetting::PerCpu(n) => Some(n),
        }
    }
}

impl RunConfig {
    /// The timeout to enforce, given the engine's default; `None` means none.
    pub fn effective_timeout(&self, default: Duration) -> Option<Duration> {
        let t = self.timeout.unwrap_or(default);
        (!t.is_zero()).then_some(t)
    }
}

/// A duration written as humantime text (`"30s"`, `"1ms"`); `v` is the value it came from.
fn duration_text(key: &str, v: &Value, text: &str) -> Result<Duration, RunError> {
    humantime::parse_duration(text.trim()).map_err(|e| invalid(key, v, &e.to_string()))
}

fn invalid(key: &str, value: &Value, reason: &str) -> RunError {
    RunError::InvalidConfig {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn boolean(key: &str, v: &Value) -> Result<bool, RunError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) => match s.trim() {
            "true" | "1" => Ok(true),
            "false" | "0" | "" => Ok(false),
            _ => Err(invalid(key, v, "expected true or false")),
        },
        _ => Err(invalid(key, v, "expected true or false")),
    }
}

fn start_pace(key: &str, v: &Value) -> Result<StartPaceSetting, RunError> {
    const WHAT: &str = "expected on, off, or a number of runnable tasks per CPU (at least 1)";
    match v {
        Value::Bool(true) => Ok(StartPaceSetting::Default),
        Value::Bool(false) => Ok(StartPaceSetting::Off),
        Value::String(s) if matches!(s.trim(), "on" | "true") => Ok(StartPaceSetting::Default),
        Value::String(s) if matches!(s.trim(), "off" | "false") => Ok(StartPaceSetting::Off),
        _ => match unsigned(key, v, WHAT)? {
            0 => Err(invalid(key, v, WHAT)),
            n => Ok(StartPaceSetting::PerCpu(
                u32::try_from(n).map_err(|_| invalid(key, v, WHAT))?,
            )),
        },
    }
}

fn unsigned(key: &str, v: &Value, what: &str) -> Result<u64, RunError> {
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| invalid(key, v, what)),
        Value::String(s) => s.trim().parse().map_err(|_| invalid(key, v, what)),
        _ => Err(invalid(key, v, what)),
    }
}

/// A list given as an array of strings, or as one comma-separated string (`--run-cfg`).
fn string_list(key: &str, v: &Value) -> Result<Vec<String>, RunError> {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.trim().to_string()),
                _ => Err(invalid(key, v, "expected a list of strings")),
            })
            .filter(|r| r.as_ref().map(|s| !s.is_empty()).unwrap_or(true))
            .collect(),
        Value::String(s) => Ok(s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect()),
        _ => Err(invalid(key, v, "expected a list of strings")),
    }
}

/// A string value; empty means unset.
fn non_empty(key: &str, v: &Value) -> Result<Option<String>, RunError> {
    match v {
        Value::String(s) if s.trim().is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s.trim().to_string())),
        _ => Err(invalid(key, v, "expected a string")),
    }
}

/// Whether the runner sets `name` itself (then `instance_env` may not).
fn runner_variable(name: &str) -> bool {
    name.starts_with("TEST_")
        || name.starts_with("SYNC_SERVICE_")
        || matches!(name, "HOSTNAME" | "REDIS_HOST" | "INFLUXDB_URL")
}

fn instance_env(key: &str, v: &Value) -> Result<Vec<(String, String)>, RunError> {
    let expected = "expected a table of NAME = \"value\", or \"NAME=value,NAME2=value2\"";
    let pairs: Vec<(String, Value)> = match v {
        Value::Object(m) => m.iter().map(|(k, x)| (k.clone(), x.clone())).collect(),
        // `--run-cfg instance_env=A=1,B=2` gives a string.
        Value::String(_) => string_list(key, v)?
            .iter()
            .map(|pair| {
                let (name, value) = pair
                    .split_once('=')
                    .ok_or_else(|| invalid(key, v, expected))?;
                Ok((name.trim().to_string(), Value::String(value.to_string())))
            })
            .collect::<Result<_, RunError>>()?,
        _ => return Err(invalid(key, v, expected)),
    };
    let mut vars: Vec<(String, String)> = Vec::with_capacity(pairs.len());
    for (name, value) in &pairs {
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            let why = format!("{name:?} is not a variable name (letters, digits and _)");
            return Err(invalid(key, v, &why));
        }
        if runner_variable(name) {
            let how = if name == "INFLUXDB_URL" {
                " (use influxdb_url)"
            } else {
                ""
            };
            return Err(invalid(
                key,
                v,
                &format!("{name} is set by the runner{how}"),
            ));
        }
        let value = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => {
                let why = format!("{name}: expected a string, a number or true/false");
                return Err(invalid(key, v, &why));
            }
        };
        if value.contains('\0') {
            return Err(invalid(key, v, &format!("{name}: a NUL byte")));
        }
        vars.push((name.clone(), value));
    }
    vars.sort();
    Ok(vars)
}

/// A Kubernetes quantity, written as a string or a number.
fn quantity(key: &str, v: &Value) -> Result<String, RunError> {
    match v {
        Value::String(s) => Ok(s.trim().to_string()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(invalid(
            key,
            v,
            "expected a quantity such as \"100m\" or \"64Mi\"",
        )),
    }
}

/// `name=soft:hard` (or `name=value` for both).
fn ulimit(key: &str, v: &Value, u: &str) -> Result<(String, i64, i64), RunError> {
    let bad = || {
        invalid(
            key,
            v,
            "expected \"name=soft:hard\", e.g. \"nofile=1048576:1048576\"",
        )
    };
    let (name, limits) = u.split_once('=').ok_or_else(bad)?;
    let (soft, hard) = limits.split_once(':').unwrap_or((limits, limits));
    let soft: i64 = soft.trim().parse().map_err(|_| bad())?;
    let hard: i64 = hard.trim().parse().map_err(|_| bad())?;
    if name.trim().is_empty() || soft < 0 || hard < soft {
        return Err(bad());
    }
    Ok((name.trim().to_string(), soft, hard))
}

/// Parses `map` against `keys`. Unknown keys listed in `strict` are errors; other unknown keys
/// are returned in [`RunConfig::ignored`].
pub(crate) fn parse(
    runner: &str,
    keys: &[&[ConfigKey]],
    map: &serde_json::Map<String, Value>,
    strict: &BTreeSet<String>,
) -> Result<RunConfig, RunError> {
    let known = |k: &str| keys.iter().any(|set| set.iter().any(|c| c.name == k));
    let mut cfg = RunConfig::default();
    for (key, v) in map {
        if !known(key) {
            if strict.contains(key) {
                let mut names: Vec<&str> =
                    keys.iter().flat_map(|s| s.iter().map(|c| c.name)).collect();
                names.sort_unstable();
                return Err(RunError::UnknownConfigKey {
                    runner: runner.to_string(),
                    key: key.clone(),
                    known: names.join(", "),
                });
            }
            cfg.ignored.push(key.clone());
            continue;
        }
        match key.as_str() {
            "run_timeout" => {
                cfg.timeout = Some(match v {
                    Value::String(s) => duration_text(key, v, s)?,
                    Value::Number(_) => Duration::from_secs(unsigned(
                        key,
                        v,
                        "expected a duration like \"30s\" or whole seconds",
                    )?),
                    _ => return Err(invalid(key, v, "expected a duration like \"30s\"")),
                });
            }
            "run_timeout_min" => {
                let minutes = unsigned(key, v, "expected an integer number of minutes")?;
                // run_timeout is more precise and wins, whatever the map's order.
                if !map.contains_key("run_timeout") {
                    cfg.timeout = Some(Duration::from_secs(minutes.saturating_mul(60)));
                }
            }
            "seed" => cfg.seed = Some(unsigned(key, v, "expected a non-negative integer")?),
            "capture" => cfg.capture = boolean(key, v)?,
            "enabled" | "disabled" => {
                boolean(key, v)?;
            }
            "instance_env" => cfg.instance_env = instance_env(key, v)?,
            "timer_slack" => {
                cfg.timer_slack = Some(match v {
                    Value::String(s) if s.trim() == "0" => Duration::ZERO,
                    Value::String(s) => duration_text(key, v, s)?,
                    Value::Number(n) if n.as_u64() == Some(0) => Duration::ZERO,
                    _ => return Err(invalid(key, v, "expected a duration like \"1ms\"")),
                });
            }
            "start_pace" => cfg.start_pace = start_pace(key, v)?,
            "keep_containers" => cfg.docker.keep_containers = boolean(key, v)?,
            "background" => {
                boolean(key, v)?;
            }
            "ulimits" => {
                cfg.docker.ulimits = string_list(key, v)?
                    .iter()
                    .map(|u| ulimit(key, v, u))
                    .collect::<Result<_, _>>()?;
            }
            "exposed_ports" => {
                let Value::Object(m) = v else {
                    return Err(invalid(key, v, "expected a table of label = port"));
                };
                let mut ports = std::collections::BTreeMap::new();
                for (label, port) in m {
                    let p = unsigned(key, port, "expected a port number")?;
                    let p = u16::try_from(p)
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| invalid(key, v, "ports are 1 to 65535"))?;
                    if label.is_empty()
                        || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Err(invalid(key, v, "labels are letters, digits and _"));
                    }
                    ports.insert(label.clone(), p);
                }
                cfg.docker.exposed_ports = ports;
            }
            "additional_hosts" => {
                let hosts = string_list(key, v)?;
                if let Some(bad) = hosts.iter().find(|h| {
                    !h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                }) {
                    return Err(invalid(key, v, &format!("{bad:?} is not a container name")));
                }
                if hosts.len() > 250 {
                    return Err(invalid(key, v, "at most 250 hosts"));
                }
                cfg.docker.additional_hosts = hosts;
            }
            "log_level" => match v {
                Value::String(s) => {
                    cfg.docker.log_level = (!s.is_empty()).then(|| s.clone());
                }
                _ => return Err(invalid(key, v, "expected a string")),
            },
            "outcomes_collection_timeout" => match v {
                Value::String(s) => {
                    duration_text(key, v, s)?;
                }
                _ => return Err(invalid(key, v, "expected a duration like \"45s\"")),
            },
            "start_concurrency" => {
                let n = unsigned(key, v, "expected a positive integer")?;
                if n == 0 || n > 1024 {
                    return Err(invalid(key, v, "expected 1 to 1024"));
                }
                cfg.docker.start_concurrency = n as usize;
            }
            "kubeconfig" => {
                cfg.k8s.kubeconfig = non_empty(key, v)?.map(|s| tg_k8s::expand_home(&s))
            }
            "namespace" => cfg.k8s.namespace = non_empty(key, v)?,
            "testplan_pod_cpu" => {
                let s = quantity(key, v)?;
                if tg_k8s::quantity::cpu_millis(&s).is_none_or(|m| m == 0) {
                    return Err(invalid(
                        key,
                        v,
                        "expected a CPU quantity such as \"100m\" or \"0.5\"",
                    ));
                }
                cfg.k8s.pod_cpu = Some(s);
            }
            "testplan_pod_memory" => {
                let s = quantity(key, v)?;
                if tg_k8s::quantity::bytes(&s).is_none_or(|b| b == 0) {
                    return Err(invalid(
                        key,
                        v,
                        "expected a memory quantity such as \"64Mi\"",
                    ));
                }
                cfg.k8s.pod_memory = Some(s);
            }
            "push_registry" => cfg.k8s.push_registry = non_empty(key, v)?,
            "node_containerd" => cfg.k8s.node_containerd = non_empty(key, v)?.map(Into::into),
            "sync_host" => {
                cfg.k8s.sync_host = non_empty(key, v)?
                    .map(|s| s.parse())
                    .transpose()
                    .map_err(|_| invalid(key, v, "expected an IP address"))?;
            }
            "schedule_timeout" => match v {
                Value::String(s) => cfg.k8s.schedule_timeout = duration_text(key, v, s)?,
                _ => return Err(invalid(key, v, "expected a duration like \"60s\"")),
            },
            "create_concurrency" => {
                let n = unsigned(key, v, "expected a positive integer")?;
                if n == 0 || n > 256 {
                    return Err(invalid(key, v, "expected 1 to 256"));
                }
                cfg.k8s.create_concurrency = n as usize;
            }
            "sysctls" => {
                cfg.k8s.sysctls = string_list(key, v)?
                    .iter()
                    .map(|kv| {
                        kv.split_once('=')
                            .map(|(k, x)| (k.trim().to_string(), x.trim().to_string()))
                            .filter(|(k, _)| !k.is_empty())
                            .ok_or_else(|| invalid(key, v, "expected \"name=value\" items"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "keep_service" | "autoscaler_enabled" => {
                boolean(key, v)?;
            }
            "provider" | "collect_outputs_pod_cpu" | "collect_outputs_pod_memory" => {}
            "influxdb_url" => match v {
                Value::String(s) if s.is_empty() => {}
                Value::String(s) => cfg.influxdb_url = Some(s.clone()),
                _ => return Err(invalid(key, v, "expected a URL string")),
            },
            _ => {}
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(v: Value, strict: &[&str]) -> Result<RunConfig, RunError> {
        let strict = strict.iter().map(|s| s.to_string()).collect();
        parse(
            "local:netns",
            &[COMMON_KEYS, NETWORK_KEYS],
            v.as_object().unwrap(),
            &strict,
        )
    }

    #[test]
    fn timeouts() {
        let t = |v| p(v, &[]).unwrap().timeout;
        assert_eq!(t(json!({})), None);
        assert_eq!(
            t(json!({"run_timeout": "30s"})),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            t(json!({"run_timeout": "1m 30s"})),
            Some(Duration::from_secs(90))
        );
        assert_eq!(t(json!({"run_timeout": 5})), Some(Duration::from_secs(5)));
        assert_eq!(
            t(json!({"run_timeout_min": 2})),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            t(json!({"run_timeout_min": 2, "run_timeout": "1s"})),
            Some(Duration::from_secs(1))
        );
        let cfg = p(json!({"run_timeout": "0s"}), &[]).unwrap();
        assert_eq!(cfg.effective_timeout(Duration::from_secs(9)), None);
        let cfg = p(json!({}), &[]).unwrap();
        assert_eq!(
            cfg.effective_timeout(Duration::from_secs(9)),
            Some(Duration::from_secs(9))
        );
        for bad in [
            json!({"run_timeout": "soon"}),
            json!({"run_timeout": -3}),
            json!({"run_timeout_min": -1}),
            json!({"run_timeout_min": "x"}),
        ] {
            match p(bad.clone(), &[]) {
                Err(RunError::InvalidConfig { key, .. }) => assert!(key.starts_with("run_timeout")),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn seed_and_capture() {
        assert_eq!(p(json!({"seed": 42}), &[]).unwrap().seed, Some(42));
        assert_eq!(p(json!({"seed": "7"}), &[]).unwrap().seed, Some(7));
        assert!(p(json!({"seed": "x"}), &[]).is_err());
        assert!(p(json!({"seed": -1}), &[]).is_err());
        assert!(p(json!({"capture": true}), &[]).unwrap().capture);
        assert!(p(json!({"capture": "true"}), &[]).unwrap().capture);
        assert!(!p(json!({}), &[]).unwrap().capture);
        match p(json!({"capture": "yes please"}), &[]) {
            Err(RunError::InvalidConfig { key, .. }) => assert_eq!(key, "capture"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn instance_env_and_timer_slack() {
        let h = |v: Value| {
            parse(
                "local:exec",
                &[COMMON_KEYS, HOST_KEYS],
                v.as_object().unwrap(),
                &BTreeSet::new(),
            )
        };
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let cfg = h(json!({"instance_env": {"RUST_LOG": "debug", "A_1": 2, "GO": true}})).unwrap();
        assert_eq!(
            cfg.instance_env,
            pairs(&[("A_1", "2"), ("GO", "true"), ("RUST_LOG", "debug")])
        );
        // --run-cfg's string form; a value may hold '=' and spaces, an empty one is kept.
        let cfg = h(json!({"instance_env": "GOMAXPROCS=,X=a=b c"})).unwrap();
        assert_eq!(
            cfg.instance_env,
            pairs(&[("GOMAXPROCS", ""), ("X", "a=b c")])
        );
        for (bad, says) in [
            (
                json!({"instance_env": {"TEST_RUN": "x"}}),
                "TEST_RUN is set by the runner",
            ),
            (
                json!({"instance_env": "SYNC_SERVICE_PORT=1"}),
                "set by the runner",
            ),
            (
                json!({"instance_env": {"INFLUXDB_URL": "x"}}),
                "use influxdb_url",
            ),
            (json!({"instance_env": {"1X": "x"}}), "not a variable name"),
            (json!({"instance_env": {"A-B": "x"}}), "not a variable name"),
            (json!({"instance_env": "NOEQUALS"}), "expected a table"),
            (
                json!({"instance_env": {"A": ["x"]}}),
                "A: expected a string",
            ),
            (json!({"instance_env": 3}), "expected a table"),
            (json!({"timer_slack": "soon"}), ""),
            (json!({"timer_slack": 5}), "expected a duration"),
            (json!({"start_pace": 0}), "runnable tasks per CPU"),
            (json!({"start_pace": "fast"}), "expected on, off"),
            (json!({"start_pace": -2}), "at least 1"),
        ] {
            match h(bad.clone()) {
                Err(RunError::InvalidConfig { reason, .. }) => {
                    assert!(reason.contains(says), "{bad}: {reason}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        let slack = |v: Value| h(v).unwrap().timer_slack;
        assert_eq!(slack(json!({})), None);
        assert_eq!(
            slack(json!({"timer_slack": "2ms"})),
            Some(Duration::from_millis(2))
        );
        assert_eq!(slack(json!({"timer_slack": "0"})), Some(Duration::ZERO));
        assert_eq!(slack(json!({"timer_slack": 0})), Some(Duration::ZERO));
        let pace = |v: Value| h(v).unwrap().start_pace.per_cpu();
        let default = Some(tg_sync::pace::DEFAULT_RUNNABLE_PER_CPU);
        assert_eq!(pace(json!({})), default);
        assert_eq!(pace(json!({"start_pace": "on"})), default);
        assert_eq!(pace(json!({"start_pace": true})), default);
        assert_eq!(pace(json!({"start_pace": "off"})), None);
        assert_eq!(pace(json!({"start_pace": false})), None);
        assert_eq!(pace(json!({"start_pace": 64})), Some(64));
        assert_eq!(pace(json!({"start_pace": "8"})), Some(8));
        // Only the host-process runners know them.
        let strict = ["instance_env".to_string()].into_iter().collect();
        let docker = parse(
            "local:docker",
            &[COMMON_KEYS, NETWORK_KEYS, DOCKER_KEYS],
            json!({"instance_env": {"A": "1"}}).as_object().unwrap(),
            &strict,
        );
        assert!(
            matches!(docker, Err(RunError::UnknownConfigKey { .. })),
            "{docker:?}"
        );
    }

    #[test]
    fn docker_keys() {
        let d = |v: Value| {
            parse(
                "local:docker",
                &[COMMON_KEYS, NETWORK_KEYS, DOCKER_KEYS],
                v.as_object().unwrap(),
                &BTreeSet::new(),
            )
        };
        let c = d(json!({})).unwrap().docker;
        assert_eq!(c, DockerConfig::default());
        let c = d(
            json!({"keep_containers": "true", "ulimits": ["nofile=10:20", "nproc=5"],
            "exposed_ports": {"http": 8080}, "additional_hosts": "a, b", "start_concurrency": 4}),
        )
        .unwrap()
        .docker;
        assert!(c.keep_containers);
        assert_eq!(
            c.ulimits,
            vec![("nofile".into(), 10, 20), ("nproc".into(), 5, 5)]
        );
        assert_eq!(c.exposed_ports["http"], 8080);
        assert_eq!(c.additional_hosts, ["a", "b"]);
        assert_eq!(c.start_concurrency, 4);
        for (bad, key) in [
            (json!({"ulimits": ["nofile"]}), "ulimits"),
            (json!({"ulimits": ["nofile=9:1"]}), "ulimits"),
            (json!({"exposed_ports": {"x": 70000}}), "exposed_ports"),
            (json!({"exposed_ports": "x"}), "exposed_ports"),
            (json!({"start_concurrency": 0}), "start_concurrency"),
            (json!({"additional_hosts": ["a b"]}), "additional_hosts"),
            (
                json!({"outcomes_collection_timeout": "later"}),
                "outcomes_collection_timeout",
            ),
        ] {
            match d(bad.clone()) {
                Err(RunError::InvalidConfig { key: k, .. }) => assert_eq!(k, key, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_keys_are_errors_only_where_the_user_wrote_them() {
        let cfg = p(json!({"ulimits": ["nofile=1"], "enabled": true}), &[]).unwrap();
        assert_eq!(cfg.ignored, vec!["ulimits".to_string()]);
        match p(json!({"captrue": true}), &["captrue"]) {
            Err(RunError::UnknownConfigKey { key, known, .. }) => {
                assert_eq!(key, "captrue");
                assert!(known.contains("capture"), "{known}");
            }
            other => panic!("{other:?}"),
        }
        // local:exec does not shape: seed is not one of its keys.
        let strict = ["seed".to_string()].into_iter().collect();
        assert!(matches!(
            parse(
                "local:exec",
                &[COMMON_KEYS],
                json!({"seed": 1}).as_object().unwrap(),
                &strict
            ),
            Err(RunError::UnknownConfigKey { .. })
        ));
    }
}
