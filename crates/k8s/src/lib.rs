//! Testground's access to a Kubernetes cluster through `kube-rs`: connecting (kubeconfig as
//! usual), the capacity check ([`capacity`]), instance pods and the verdict on their status
//! ([`pods`]), finding a pod's network namespace on this node ([`pod_pid`]), and removing
//! objects by label. It never prints; the runner (`tg-runner`'s `cluster:k8s`) decides what
//! users see.

pub mod capacity;
pub mod cri_log;
pub mod pods;
pub mod quantity;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams};

pub use k8s_openapi;
pub use kube;

/// The original's labels, plus the engine home that owns the pod.
pub mod labels {
    pub const PLAN: &str = "testground.plan";
    pub const TESTCASE: &str = "testground.testcase";
    pub const RUN_ID: &str = "testground.run_id";
    pub const GROUP_ID: &str = "testground.groupid";
    pub const PURPOSE: &str = "testground.purpose";
    /// A digest of the engine's home (a path is not a valid label value).
    pub const HOME: &str = "testground.home";
}

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error(
        "no Kubernetes configuration: {0} (set `kubeconfig` in [runners.\"cluster:k8s\"] of .env.toml, KUBECONFIG, or write ~/.kube/config)"
    )]
    Config(String),
    #[error("the Kubernetes API at {url} does not answer: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("Kubernetes API: {0}")]
    Api(String),
}

/// A connection to one cluster and the namespace runs use.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    namespace: String,
    url: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("url", &self.url)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl Cluster {
    /// Connects with `kubeconfig` (a path), else `KUBECONFIG`, `~/.kube/config` or the
    /// in-cluster service account, and checks the API answers. `namespace` `None` takes the
    /// kubeconfig's, else `default`.
    pub async fn connect(
        kubeconfig: Option<&Path>,
        namespace: Option<&str>,
    ) -> Result<Cluster, K8sError> {
        let mut config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| K8sError::Config(format!("{}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| K8sError::Config(format!("{}: {e}", path.display())))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| K8sError::Config(e.to_string()))?,
        };
        if let Some(ns) = namespace {
            config.default_namespace = ns.to_string();
        }
        config.connect_timeout = Some(Duration::from_secs(10));
        let url = config.cluster_url.to_string();
        let namespace = config.default_namespace.clone();
        let client = kube::Client::try_from(config).map_err(|e| K8sError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let c = Cluster {
            client,
            namespace,
            url,
        };
        c.client
            .apiserver_version()
            .await
            .map_err(|e| K8sError::Unreachable {
                url: c.url.clone(),
                reason: e.to_string(),
            })?;
        Ok(c)
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// The server's version (`v1.37.2`).
    pub async fn version(&self) -> Result<String, K8sError> {
        self.client
            .apiserver_version()
            .await
            .map(|v| v.git_version)
            .map_err(api_err)
    }

    /// Where `node`'s kubelet keeps container logs (`podLogsDir` of its configuration, read
    /// through the API's node proxy), `/var/log/pods` when it does not say.
    pub async fn pod_logs_dir(&self, node: &str) -> PathBuf {
        let default = PathBuf::from("/var/log/pods");
        let Ok(req) =
            http::Request::get(format!("/api/v1/nodes/{node}/proxy/configz")).body(Vec::new())
        else {
            return default;
        };
        let Ok(text) = self.client.request_text(req).await else {
            return default;
        };
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["kubeletconfig"]["podLogsDir"].as_str().map(PathBuf::from))
            .unwrap_or(default)
    }

    /// Free room on the plan nodes (see [`capacity::rooms`]).
    pub async fn rooms(&self) -> Result<(Vec<capacity::NodeRoom>, bool), K8sError> {
        let nodes = self
            .nodes()
            .list(&ListParams::default())
            .await
            .map_err(api_err)?;
        let pods: Api<Pod> = Api::all(self.client.clone());
        let pods = pods
            .list(&ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed"))
            .await
            .map_err(api_err)?;
        Ok(capacity::rooms(&nodes.items, &pods.items))
    }

    /// Deletes every pod of the namespace matching `selector` (a label selector) and waits
    /// until they are gone, at most `wait`. Returns how many there were and how many are
    /// still there.
    pub async fn delete_pods(
        &self,
        selector: &str,
        grace_seconds: u32,
        wait: Duration,
    ) -> Result<(usize, usize), K8sError> {
        let api = self.pods();
        let lp = ListParams::default().labels(selector);
        let found = api.list(&lp).await.map_err(api_err)?.items.len();
        if found == 0 {
            return Ok((0, 0));
        }
        let dp = DeleteParams {
            grace_period_seconds: Some(grace_seconds),
            ..Default::default()
        };
        api.delete_collection(&dp, &lp).await.map_err(api_err)?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = api.list(&lp).await.map_err(api_err)?.items.len();
            if left == 0 || tokio::time::Instant::now() >= deadline {
                return Ok((found, left));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// An API error for messages.
pub fn api_err(e: kube::Error) -> K8sError {
    K8sError::Api(match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.reason),
        e => e.to_string(),
    })
}

/// The `testground.home` label value of an engine home: a short digest (FNV-1a).
pub fn home_label(home: &Path) -> String {
    let h = home
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("h{h:016x}")
}

/// Finds, on this node, a process of each pod in `uids` (any process of a pod lives in its
/// network namespace): the kubelet puts a pod's containers in cgroups under `pod<uid>`
/// (cgroupfs driver) or `pod<uid with _>.slice` (systemd driver). Returns uid → pid for the
/// pods found.
pub fn pod_pids(uids: &[String]) -> HashMap<String, i32> {
    pod_pids_in(Path::new("/proc"), uids)
}

fn pod_pids_in(proc_root: &Path, uids: &[String]) -> HashMap<String, i32> {
    let mut out = HashMap::new();
    if uids.is_empty() {
        return out;
    }
    let keys: Vec<(String, String, &String)> = uids
        .iter()
        .map(|u| (format!("pod{u}"), format!("pod{}", u.replace('-', "_")), u))
        .collect();
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cg) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        for (a, b, uid) in &keys {
            if !out.contains_key(*uid) && (cg.contains(a.as_str()) || cg.contains(b.as_str())) {
                out.insert((*uid).clone(), pid);
            }
        }
        if out.len() == keys.len() {
            break;
        }
    }
    out
}

/// Where a kubeconfig given as `~/...` points.
pub fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_pods_by_their_cgroup() {
        let root = tempfile_dir();
        let write = |pid: &str, cg: &str| {
            std::fs::create_dir_all(root.join(pid)).unwrap();
            std::fs::write(root.join(pid).join("cgroup"), cg).unwrap();
        };
        write("10", "0::/init.scope\n");
        write(
            "11",
            "4:pids:/kubepods/burstable/podaaaa-bb/0123abcd\n0::/kubepods/burstable/podaaaa-bb/0123abcd\n",
        );
        write(
            "12",
            "1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podcccc_dd.slice/cri-containerd-1.scope\n",
        );
        std::fs::create_dir_all(root.join("self")).unwrap();
        let found = pod_pids_in(
            &root,
            &[
                "aaaa-bb".to_string(),
                "cccc-dd".to_string(),
                "eeee".to_string(),
            ],
        );
        assert_eq!(found.get("aaaa-bb"), Some(&11));
        assert_eq!(found.get("cccc-dd"), Some(&12));
        assert_eq!(found.get("eeee"), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("tg-k8s-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn home_labels_are_valid_and_distinct() {
        let a = home_label(Path::new("/root/testground"));
        let b = home_label(Path::new("/root/testground2"));
        assert_ne!(a, b);
        assert_eq!(a, pods::label_value(&a));
        assert_eq!(a.len(), 17);
    }
}
