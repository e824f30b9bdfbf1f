//! Pods as the runner sees them: the spec of an instance's pod (pure), names and label values
//! Kubernetes accepts, and the verdict on a pod's status (pure, time passed in): still coming,
//! running, exited, or failed for a reason a user can act on (never scheduled, image not
//! pullable, evicted, OOM-killed).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, HostPathVolumeSource, Pod, PodSecurityContext, PodSpec,
    ResourceRequirements, Sysctl, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The instance's container in its pod.
pub const PLAN_CONTAINER: &str = "plan";

/// A name Kubernetes accepts for a pod (DNS-1123 subdomain, kept to 63 characters so it can
/// also be a label value and a hostname).
pub fn object_name(parts: &[&str]) -> String {
    dns_label(&parts.join("-"))
}

/// A DNS-1123 label: lowercase alphanumerics and `-`, starting and ending alphanumeric, at
/// most 63 characters. A long name keeps its end (the index that tells instances apart) and
/// is cut in the middle.
pub fn dns_label(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() { c } else { '-' }
        })
        .collect();
    if s.len() > 63 {
        let tail: String = s[s.len() - 30..].to_string();
        s = format!("{}-{}", &s[..32], tail.trim_start_matches('-'));
        s.truncate(63);
    }
    let s = s.trim_matches('-').to_string();
    if s.is_empty() { "x".into() } else { s }
}

/// A label value Kubernetes accepts: `[A-Za-z0-9_.-]`, at most 63, alphanumeric at both ends.
pub fn label_value(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.truncate(63);
    s.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// Everything an instance's pod is made of.
#[derive(Debug, Clone)]
pub struct PodParams {
    pub name: String,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    pub pull_policy: String,
    pub env: Vec<(String, String)>,
    /// Requested CPU and memory (the memory is also the limit, as the original).
    pub cpu: String,
    pub memory: String,
    /// The node directory bound at `/outputs` (the instance's outputs directory when the
    /// node shares the engine's filesystem).
    pub outputs: PathBuf,
    pub sysctls: Vec<(String, String)>,
    pub node_selector: BTreeMap<String, String>,
}

/// The pod of one instance.
pub fn pod(p: &PodParams) -> Pod {
    let env = p
        .env
        .iter()
        .map(|(k, v)| EnvVar {
            name: k.clone(),
            value: Some(v.clone()),
            ..Default::default()
        })
        .collect();
    let q = |s: &str| Quantity(s.to_string());
    let resources = ResourceRequirements {
        requests: Some(
            [
                ("cpu".to_string(), q(&p.cpu)),
                ("memory".into(), q(&p.memory)),
            ]
            .into_iter()
            .collect(),
        ),
        limits: Some([("memory".to_string(), q(&p.memory))].into_iter().collect()),
        ..Default::default()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(p.name.clone()),
            labels: Some(p.labels.clone()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            hostname: Some(p.hostname.clone()),
            restart_policy: Some("Never".into()),
            // Instances need no API access and no service variables: fewer mounts, faster
            // starts, and an environment that is only Testground's.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(2),
            node_selector: (!p.node_selector.is_empty()).then(|| p.node_selector.clone()),
            security_context: (!p.sysctls.is_empty()).then(|| PodSecurityContext {
                sysctls: Some(
                    p.sysctls
                        .iter()
                        .map(|(name, value)| Sysctl {
                            name: name.clone(),
                            value: value.clone(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            containers: vec![Container {
                name: PLAN_CONTAINER.into(),
                image: Some(p.image.clone()),
                image_pull_policy: Some(p.pull_policy.clone()),
                env: Some(env),
                resources: Some(resources),
                volume_mounts: Some(vec![
                    VolumeMount {
                        name: "outputs".into(),
                        mount_path: "/outputs".into(),
                        ..Default::default()
                    },
                    VolumeMount {
                        name: "temp".into(),
                        mount_path: "/temp".into(),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }],
            volumes: Some(vec![
                Volume {
                    name: "outputs".into(),
                    host_path: Some(HostPathVolumeSource {
                        path: p.outputs.to_string_lossy().into_owned(),
                        type_: Some("DirectoryOrCreate".into()),
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "temp".into(),
                    empty_dir: Some(Default::default()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What a pod's status says about its instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not started yet. `sandbox`: its network namespace exists (it has an address), so the
    /// node agent can wire it.
    Pending {
        sandbox: bool,
    },
    Running,
    /// The plan's container ended.
    Exited {
        code: i32,
    },
    /// It cannot run or was killed for a reason of the cluster's, said for the run log.
    Failed {
        reason: String,
    },
}

/// A problem seen in a pending pod. `definitive` ones fail it at once; the others after the
/// runner's patience (a scheduler or a registry may still come round).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: String,
    pub definitive: bool,
}

/// Why a pending pod is not starting, if something is wrong.
pub fn problem(pod: &Pod) -> Option<Problem> {
    let status = pod.status.as_ref()?;
    for c in status.conditions.iter().flatten() {
        if c.type_ == "PodScheduled" && c.status == "False" {
            return Some(Problem {
                reason: format!(
                    "it cannot be scheduled ({}): {}",
                    c.reason.as_deref().unwrap_or("no reason given"),
                    c.message.as_deref().unwrap_or("")
                ),
                definitive: false,
            });
        }
    }
    let statuses = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for cs in statuses {
        let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let reason = w.reason.as_deref().unwrap_or("");
        let definitive = match reason {
            "ErrImageNeverPull"
            | "InvalidImageName"
            | "CreateContainerConfigError"
            | "RunContainerError" => true,
            "ErrImagePull" | "ImagePullBackOff" | "CreateContainerError" => false,
            _ => continue,
        };
        return Some(Problem {
            reason: format!(
                "its container {} cannot start ({reason}, image {}): {}",
                cs.name,
                cs.image,
                w.message.as_deref().unwrap_or("")
            ),
            definitive,
        });
    }
    None
}

/// The verdict on `pod`. `problem_for` is how long the current [`problem`] has lasted;
/// `patience` how long a non-definitive problem may last.
pub fn verdict(pod: &Pod, problem_for: Duration, patience: Duration) -> Verdict {
    let Some(status) = pod.status.as_ref() else {
        return Verdict::Pending { sandbox: false };
    };
    let plan = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == PLAN_CONTAINER);
    let terminated = plan.and_then(|c| c.state.as_ref()?.terminated.as_ref());
    match status.phase.as_deref() {
        Some("Succeeded") | Some("Failed") => {
            if status.reason.as_deref() == Some("Evicted") {
                return Verdict::Failed {
                    reason: format!(
                        "it was evicted: {}",
                        status.message.as_deref().unwrap_or("")
                    ),
                };
            }
            if let Some(t) = terminated {
                if t.reason.as_deref() == Some("OOMKilled") {
                    return Verdict::Failed {
                        reason: format!(
                            "it was OOM-killed (exit {}): its memory passed testplan_pod_memory",
                            t.exit_code
                        ),
                    };
                }
                return Verdict::Exited { code: t.exit_code };
            }
            // Ended before the plan ran: an init container failed, or the node refused it.
            let init = status
                .init_container_statuses
                .iter()
                .flatten()
                .find_map(|c| {
                    let t = c.state.as_ref()?.terminated.as_ref()?;
                    (t.exit_code != 0).then(|| {
                        format!(
                            "its init container {} exited {} ({})",
                            c.name,
                            t.exit_code,
                            t.reason.as_deref().unwrap_or("")
                        )
                    })
                });
            Verdict::Failed {
                reason: init.unwrap_or_else(|| {
                    format!(
                        "it ended before its plan ran: {} {}",
                        status.reason.as_deref().unwrap_or(""),
                        status.message.as_deref().unwrap_or("")
                    )
                    .trim_end()
                    .to_string()
                }),
            }
        }
        Some("Running")
            if plan
                .and_then(|c| c.state.as_ref()?.running.as_ref())
                .is_some() =>
        {
            Verdict::Running
        }
        _ => {
            if let Some(p) = problem(pod)
                && (p.definitive || problem_for >= patience)
            {
                return Verdict::Failed { reason: p.reason };
            }
            Verdict::Pending {
                sandbox: status.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty()),
            }
        }
    }
}

/// Where a started pod's time went, in milliseconds from its creation: scheduled, sandbox
/// ready (its network namespace), plan container started. From the pod's condition times,
/// which the API keeps to the second.
pub fn start_phases(pod: &Pod) -> Option<[i64; 3]> {
    let created = pod.metadata.creation_timestamp.as_ref()?.0.as_millisecond();
    let status = pod.status.as_ref()?;
    let cond = |t: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t && c.status == "True")
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0.as_millisecond() - created)
    };
    let started = status
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == PLAN_CONTAINER)
        .and_then(|c| {
            let s = c.state.as_ref()?;
            s.running
                .as_ref()
                .and_then(|r| r.started_at.as_ref())
                .or_else(|| s.terminated.as_ref().and_then(|t| t.started_at.as_ref()))
        })
        .map(|t| t.0.as_millisecond() - created)?;
    let scheduled = cond("PodScheduled").unwrap_or(0);
    let sandbox = cond("PodReadyToStartContainers").unwrap_or(scheduled);
    Some([scheduled, sandbox, started])
}

/// "median / max" seconds of each phase of [`start_phases`] over many pods, for the run log.
pub fn summarize_phases(all: &[[i64; 3]]) -> String {
    if all.is_empty() {
        return String::new();
    }
    let names = ["scheduled", "sandbox", "started"];
    let mut parts = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut v: Vec<i64> = all.iter().map(|p| p[i]).collect();
        v.sort_unstable();
        let med = v[v.len() / 2] as f64 / 1000.0;
        let max = v[v.len() - 1] as f64 / 1000.0;
        parts.push(format!("{name} {med:.0}/{max:.0} s"));
    }
    format!(
        "from creation, median/max over {} pods: {}",
        all.len(),
        parts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod_of(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": status,
        }))
        .unwrap()
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn names_are_dns_labels() {
        assert_eq!(
            object_name(&["tg", "my-plan", "quickstart", "c4k", "Group_A", "3"]),
            "tg-my-plan-quickstart-c4k-group-a-3"
        );
        let long = object_name(&["tg", &"x".repeat(80), "run", "single", "12"]);
        assert!(long.len() <= 63, "{long}");
        assert!(long.ends_with("-single-12"), "{long}");
        assert_eq!(dns_label("--a--"), "a");
        assert_eq!(label_value("/home/x"), "home_x");
        assert_eq!(label_value("ok-1.2_3"), "ok-1.2_3");
    }

    #[test]
    fn spec_has_the_originals_shape() {
        let p = pod(&PodParams {
            name: "tg-p-c-r-single-0".into(),
            hostname: "single-0".into(),
            labels: [("testground.purpose".to_string(), "plan".to_string())].into(),
            image: "127.0.0.1:5000/tg-plan-p:abc".into(),
            pull_policy: "IfNotPresent".into(),
            env: vec![("TEST_SIDECAR".into(), "true".into())],
            cpu: "100m".into(),
            memory: "64Mi".into(),
            outputs: "/h/outputs/single/0".into(),
            sysctls: vec![("net.core.somaxconn".into(), "1024".into())],
            node_selector: BTreeMap::new(),
        });
        let v = serde_json::to_value(&p).unwrap();
        let spec = &v["spec"];
        assert_eq!(spec["restartPolicy"], "Never");
        assert_eq!(spec["hostname"], "single-0");
        let c = &spec["containers"][0];
        assert_eq!(c["name"], PLAN_CONTAINER);
        assert_eq!(c["resources"]["requests"]["cpu"], "100m");
        assert_eq!(c["resources"]["limits"]["memory"], "64Mi");
        assert!(c["resources"]["limits"].get("cpu").is_none());
        assert_eq!(c["env"][0]["name"], "TEST_SIDECAR");
        assert!(spec.get("initContainers").is_none());
        assert_eq!(
            spec["volumes"][0]["hostPath"]["path"],
            "/h/outputs/single/0"
        );
        assert_eq!(
            spec["securityContext"]["sysctls"][0]["name"],
            "net.core.somaxconn"
        );
        assert!(spec.get("nodeSelector").is_none());
    }

    #[test]
    fn pending_then_sandbox_then_running_then_exit() {
        let p = pod_of(json!({"phase": "Pending"}));
        assert_eq!(
            verdict(&p, Duration::ZERO, LONG),
            Verdict::Pending { sandbox: false }
        );
        let p = pod_of(json!({"phase": "Pending", "podIP": "10.244.0.7",
            "containerStatuses": [{"name": PLAN_CONTAINER, "image": "b", "imageID": "",
                "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}));
        assert_eq!(
            verdict(&p, Duration::ZERO, LONG),
            Verdict::Pending { sandbox: true }
        );
        let p = pod_of(json!({"phase": "Running", "podIP": "10.244.0.7",
            "containerStatuses": [{"name": PLAN_CONTAINER, "image": "i", "imageID": "",
                "ready": true, "restartCount": 0, "state": {"running": {}}}]}));
        assert_eq!(verdict(&p, Duration::ZERO, LONG), Verdict::Running);
        let p = pod_of(json!({"phase": "Failed",
            "containerStatuses": [{"name": PLAN_CONTAINER, "image": "i", "imageID": "",
                "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 3, "reason": "Error"}}}]}));
        assert_eq!(
            verdict(&p, Duration::ZERO, LONG),
            Verdict::Exited { code: 3 }
        );
    }

    #[test]
    fn reasons_a_user_can_act_on() {
        let unschedulable = pod_of(json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient memory."}]}));
        assert_eq!(
            verdict(
                &unschedulable,
                Duration::from_secs(5),
                Duration::from_secs(30)
            ),
            Verdict::Pending { sandbox: false }
        );
        match verdict(
            &unschedulable,
            Duration::from_secs(30),
            Duration::from_secs(30),
        ) {
            Verdict::Failed { reason } => {
                assert!(reason.contains("cannot be scheduled"), "{reason}");
                assert!(reason.contains("Insufficient memory"), "{reason}");
            }
            v => panic!("{v:?}"),
        }
        let never = pod_of(json!({"phase": "Pending", "containerStatuses": [{
            "name": PLAN_CONTAINER, "image": "tg-plan-x:1", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": "ErrImageNeverPull",
            "message": "not present"}}}]}));
        match verdict(&never, Duration::ZERO, LONG) {
            Verdict::Failed { reason } => {
                assert!(reason.contains("ErrImageNeverPull"), "{reason}");
                assert!(reason.contains("tg-plan-x:1"), "{reason}");
            }
            v => panic!("{v:?}"),
        }
        let oom = pod_of(json!({"phase": "Failed", "containerStatuses": [{
            "name": PLAN_CONTAINER, "image": "i", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"terminated": {"exitCode": 137,
            "reason": "OOMKilled"}}}]}));
        assert!(
            matches!(verdict(&oom, Duration::ZERO, LONG), Verdict::Failed { reason } if reason.contains("OOM"))
        );
        let evicted = pod_of(json!({"phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory."}));
        assert!(
            matches!(verdict(&evicted, Duration::ZERO, LONG), Verdict::Failed { reason } if reason.contains("evicted") && reason.contains("low on resource"))
        );
        let init = pod_of(json!({"phase": "Failed", "initContainerStatuses": [{
            "name": "setup", "image": "b", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"terminated": {"exitCode": 137,
            "reason": "Error"}}}]}));
        assert!(
            matches!(verdict(&init, Duration::ZERO, LONG), Verdict::Failed { reason } if reason.contains("setup"))
        );
    }

    #[test]
    fn where_start_time_goes() {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "creationTimestamp": "2026-12-01T10:00:00Z"},
            "status": {"phase": "Running", "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-01T10:00:01Z"},
                {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": "2026-12-01T10:00:03Z"},
                {"type": "Initialized", "status": "True", "lastTransitionTime": "2026-12-01T10:00:04Z"}],
             "containerStatuses": [{"name": PLAN_CONTAINER, "image": "i", "imageID": "",
                "ready": true, "restartCount": 0,
                "state": {"running": {"startedAt": "2026-12-01T10:00:06Z"}}}]}
        }))
        .unwrap();
        let phases = start_phases(&p).unwrap();
        assert_eq!(phases, [1000, 3000, 6000]);
        let s = summarize_phases(&[phases, [0, 1000, 3000]]);
        assert!(s.contains("over 2 pods"), "{s}");
        assert!(s.contains("started 6/6 s"), "{s}");
    }
}
