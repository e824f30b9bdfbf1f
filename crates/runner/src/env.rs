//! The environment of a `local:exec` instance (reference §4.1). The 18 `TEST_*` variables are
//! always present, empty when unset, because SDKs parse them unconditionally.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use crate::launch::{EnvName, NetEnv};
use crate::{RunConfig, RunGroup, RunInput};

/// Variables shared by every instance of a group.
pub(crate) struct GroupEnv {
    vars: Vec<(EnvName, OsString)>,
    group: String,
    short_run: String,
}

impl GroupEnv {
    pub(crate) fn new(
        input: &RunInput,
        config: &RunConfig,
        group: &RunGroup,
        total_instances: u32,
        start_time: &str,
        net: &NetEnv,
    ) -> Self {
        let mut vars: Vec<(EnvName, OsString)> = Vec::with_capacity(32 + config.instance_env.len());
        // The only variables inherited from the host: PATH as in the original, HOME because
        // toolchains (cargo, go) need it.
        for name in ["PATH", "HOME"] {
            if let Some(v) = std::env::var_os(name) {
                vars.push((Cow::Borrowed(name), v));
            }
        }
        let mut put = |k: &'static str, v: String| vars.push((Cow::Borrowed(k), v.into()));
        put("TEST_PLAN", input.plan.clone());
        put("TEST_CASE", input.case.clone());
        put("TEST_RUN", input.run_id.clone());
        put("TEST_INSTANCE_COUNT", total_instances.to_string());
        put("TEST_GROUP_ID", group.id.clone());
        put("TEST_GROUP_INSTANCE_COUNT", group.instances.to_string());
        put("TEST_INSTANCE_PARAMS", pipe_joined(&group.params));
        put("TEST_INSTANCE_ROLE", String::new());
        put("TEST_SIDECAR", net.sidecar.to_string());
        put("TEST_SUBNET", net.subnet.clone());
        put("TEST_START_TIME", start_time.to_string());
        put("TEST_CAPTURE_PROFILES", pipe_joined(&group.profiles));
        put("TEST_DISABLE_METRICS", input.disable_metrics.to_string());
        put("TEST_REPO", String::new());
        put("TEST_BRANCH", String::new());
        put("TEST_TAG", String::new());
        put("SYNC_SERVICE_HOST", net.sync_host.clone());
        put("SYNC_SERVICE_PORT", net.sync_port.to_string());
        put("REDIS_HOST", "localhost".into());
        // Never a default address: pointing the SDKs at an InfluxDB that is not there makes
        // every sdk-go instance spend seconds retrying uploads at exit. Empty means "no metrics
        // upload" to sdk-go and still satisfies sdk-rust, which requires the variable to be
        // present. The engine fills `influxdb_url` with its own endpoint for local:exec, and
        // `--run-cfg influxdb_url=http://...` points instances at one explicitly.
        put(
            "INFLUXDB_URL",
            config.influxdb_url.clone().unwrap_or_default(),
        );
        // The run configuration's `instance_env` (never a variable set above but PATH or HOME,
        // which it replaces).
        for (name, value) in &config.instance_env {
            vars.retain(|(k, _)| k != name);
            vars.push((Cow::Owned(name.clone()), value.into()));
        }
        GroupEnv {
            vars,
            group: group.id.clone(),
            short_run: input.run_id.chars().take(8).collect(),
        }
    }

    /// `HOSTNAME` of instance `index`; under local:netns also its kernel hostname, which sdk-go
    /// uses to name its network topic.
    pub(crate) fn hostname(&self, index: u32) -> String {
        // A kernel hostname holds at most 64 bytes; a long group id is cut so that the suffix
        // that makes the name unique survives (a long id then needs no special case).
        let suffix = format!("-{}-{}", index, self.short_run);
        let room = 64usize.saturating_sub(suffix.len());
        let mut group: String = self.group.clone();
        while group.len() > room {
            group.pop();
        }
        format!("{group}{suffix}")
    }

    /// The full environment of instance `index`.
    pub(crate) fn instance(
        &self,
        index: u32,
        outputs: &Path,
        temp: &Path,
    ) -> impl Iterator<Item = (EnvName, OsString)> + '_ {
        let own = [
            ("TEST_OUTPUTS_PATH", outputs.as_os_str().to_owned()),
            ("TEST_TEMP_PATH", temp.as_os_str().to_owned()),
            ("HOSTNAME", self.hostname(index).into()),
        ]
        .map(|(k, v)| (Cow::Borrowed(k), v));
        self.vars.iter().cloned().chain(own)
    }
}

/// `k1=v1|k2=v2`, sorted by key so that runs are reproducible.
fn pipe_joined(map: &BTreeMap<String, String>) -> String {
    let mut s = String::new();
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            s.push('|');
        }
        s.push_str(k);
        s.push('=');
        s.push_str(v);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_fit_the_kernel_limit() {
        let env = GroupEnv {
            vars: Vec::new(),
            group: "g".repeat(100),
            short_run: "abcdefgh".into(),
        };
        let h = env.hostname(1234);
        assert_eq!(h.len(), 64);
        assert!(h.ends_with("-1234-abcdefgh"), "{h}");
        let short = GroupEnv {
            vars: Vec::new(),
            group: "single".into(),
            short_run: "abcdefgh".into(),
        };
        assert_eq!(short.hostname(0), "single-0-abcdefgh");
    }

    #[test]
    fn params_are_pipe_joined_in_key_order() {
        let m: BTreeMap<String, String> = [("b", "2"), ("a", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(pipe_joined(&m), "a=1|b=2");
        assert_eq!(pipe_joined(&BTreeMap::new()), "");
    }
}
