//! The runtime environment of an instance: the `TEST_*` variables parsed into [`RunParams`],
//! and the typed accessors for the test case parameters (`TEST_INSTANCE_PARAMS`).
//!
//! Parsing follows sdk-go (§5.3 of the sync protocol reference) with two deliberate changes:
//! a parameter value may contain `=` (it is split at the first one, as sdk-rust does, instead of
//! being dropped), and a malformed number or subnet is an error instead of a silent `-1`/nil.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use tg_api::sync::RunKeys;

/// The sync service host when `SYNC_SERVICE_HOST` is unset (the name the runners resolve).
pub const DEFAULT_SYNC_HOST: &str = "testground-sync-service";
/// The sync service port when `SYNC_SERVICE_PORT` is unset.
pub const DEFAULT_SYNC_PORT: u16 = 5050;

/// The runtime environment could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("{var} is not a valid number: {value:?}")]
    Number { var: &'static str, value: String },
    #[error("TEST_SUBNET is not a valid CIDR: {value:?}")]
    Subnet { value: String },
    #[error("SYNC_SERVICE_PORT is not a valid port: {value:?}")]
    Port { value: String },
    #[error("TEST_INSTANCE_PARAMS entry {entry:?} has no '='")]
    ParamPair { entry: String },
}

/// A test parameter is missing or does not parse as the requested type.
#[derive(Debug, thiserror::Error)]
pub enum ParamError {
    #[error("test parameter {name:?} is not set")]
    Missing { name: String },
    #[error("test parameter {name:?} is not a valid {expected}: {value:?}")]
    Invalid {
        name: String,
        expected: &'static str,
        value: String,
    },
    #[error("test parameter {name:?} is not valid JSON for the requested type: {source}")]
    Json {
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Everything the runner told this instance through its environment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunParams {
    pub test_plan: String,
    pub test_case: String,
    pub test_run: String,
    pub test_repo: String,
    pub test_branch: String,
    pub test_tag: String,
    /// Empty means: no `run.out`, metrics files or assets directory (assets go to the cwd).
    pub test_outputs_path: String,
    pub test_temp_path: String,
    pub test_instance_count: u64,
    pub test_instance_role: String,
    pub test_instance_params: BTreeMap<String, String>,
    pub test_group_id: String,
    pub test_group_instance_count: u64,
    pub test_sidecar: bool,
    pub test_subnet: Option<IpNet>,
    /// RFC3339 as written by the runner; kept as text (sdk-go never managed to parse it).
    pub test_start_time: String,
    pub test_capture_profiles: BTreeMap<String, String>,
    pub test_disable_metrics: bool,
    pub sync_service_host: String,
    pub sync_service_port: u16,
    /// `HOSTNAME`; empty when unset (the kernel hostname is then used where one is needed).
    pub hostname: String,
    /// `INFLUXDB_URL`: where this instance also writes its metrics (empty: nowhere).
    pub influxdb_url: String,
}

impl RunParams {
    /// Parses the process environment.
    pub fn from_env() -> Result<RunParams, EnvError> {
        RunParams::from_vars(std::env::vars())
    }

    /// Parses an explicit set of variables (tests, embedding); unset variables take the same
    /// defaults as in [`RunParams::from_env`].
    pub fn from_vars<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> Result<RunParams, EnvError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let vars: HashMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let get = |k: &str| vars.get(k).cloned().unwrap_or_default();
        let count = |var: &'static str| -> Result<u64, EnvError> {
            let value = get(var);
            let value = value.trim();
            if value.is_empty() {
                return Ok(0);
            }
            value.parse().map_err(|_| EnvError::Number {
                var,
                value: value.to_owned(),
            })
        };
        let subnet = match get("TEST_SUBNET").trim() {
            "" => None,
            s => Some(s.parse::<IpNet>().map_err(|_| EnvError::Subnet {
                value: s.to_owned(),
            })?),
        };
        let sync_service_host = match get("SYNC_SERVICE_HOST") {
            h if h.is_empty() => DEFAULT_SYNC_HOST.to_owned(),
            h => h,
        };
        let sync_service_port = match get("SYNC_SERVICE_PORT").trim() {
            "" => DEFAULT_SYNC_PORT,
            p => p.parse().map_err(|_| EnvError::Port {
                value: p.to_owned(),
            })?,
        };
        Ok(RunParams {
            test_plan: get("TEST_PLAN"),
            test_case: get("TEST_CASE"),
            test_run: get("TEST_RUN"),
            test_repo: get("TEST_REPO"),
            test_branch: get("TEST_BRANCH"),
            test_tag: get("TEST_TAG"),
            test_outputs_path: get("TEST_OUTPUTS_PATH"),
            test_temp_path: get("TEST_TEMP_PATH"),
            test_instance_count: count("TEST_INSTANCE_COUNT")?,
            test_instance_role: get("TEST_INSTANCE_ROLE"),
            test_instance_params: parse_key_values(&get("TEST_INSTANCE_PARAMS"))?,
            test_group_id: get("TEST_GROUP_ID"),
            test_group_instance_count: count("TEST_GROUP_INSTANCE_COUNT")?,
            test_sidecar: parse_go_bool(&get("TEST_SIDECAR")).unwrap_or(false),
            test_subnet: subnet,
            test_start_time: get("TEST_START_TIME"),
            test_capture_profiles: parse_key_values(&get("TEST_CAPTURE_PROFILES"))?,
            test_disable_metrics: parse_go_bool(&get("TEST_DISABLE_METRICS")).unwrap_or(false),
            sync_service_host,
            sync_service_port,
            hostname: get("HOSTNAME"),
            influxdb_url: get("INFLUXDB_URL").trim().to_owned(),
        })
    }

    /// The prefix of every sync key of this run: `run:<run>:plan:<plan>:case:<case>`.
    pub fn sync_prefix(&self) -> String {
        self.sync_keys().prefix().to_owned()
    }

    /// The sync keys of this run (states, topics, run events), laid out as sdk-go does.
    pub fn sync_keys(&self) -> RunKeys {
        RunKeys::new(&self.test_run, &self.test_plan, &self.test_case)
    }

    /// The sync service URL, `ws://host:port` as sdk-go builds it.
    pub fn sync_url(&self) -> String {
        format!("ws://{}:{}", self.sync_service_host, self.sync_service_port)
    }

    /// The `runenv` object of the `start_event`, in sdk-go's log field order.
    pub(crate) fn start_event_runenv(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("plan".into(), self.test_plan.clone().into());
        m.insert("case".into(), self.test_case.clone().into());
        m.insert("run".into(), self.test_run.clone().into());
        m.insert(
            "params".into(),
            serde_json::to_value(&self.test_instance_params).unwrap_or_default(),
        );
        m.insert("instances".into(), self.test_instance_count.into());
        m.insert("outputs_path".into(), self.test_outputs_path.clone().into());
        m.insert("temp_path".into(), self.test_temp_path.clone().into());
        m.insert(
            "network".into(),
            self.test_subnet
                .map(|n| n.to_string())
                .unwrap_or_default()
                .into(),
        );
        m.insert("group".into(), self.test_group_id.clone().into());
        m.insert(
            "group_instances".into(),
            self.test_group_instance_count.into(),
        );
        for (k, v) in [
            ("repo", &self.test_repo),
            ("branch", &self.test_branch),
            ("tag", &self.test_tag),
        ] {
            if !v.is_empty() {
                m.insert(k.into(), v.clone().into());
            }
        }
        serde_json::Value::Object(m)
    }

    /// The directory outputs go to (the cwd when `TEST_OUTPUTS_PATH` is empty).
    pub fn outputs_dir(&self) -> PathBuf {
        if self.test_outputs_path.is_empty() {
            PathBuf::from(".")
        } else {
            PathBuf::from(&self.test_outputs_path)
        }
    }

    /// The raw text of a test parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.test_instance_params.get(name).map(String::as_str)
    }

    /// Whether the parameter `name` was given.
    pub fn is_param_set(&self, name: &str) -> bool {
        self.test_instance_params.contains_key(name)
    }

    /// A string parameter.
    pub fn string_param(&self, name: &str) -> Result<String, ParamError> {
        self.require(name).map(str::to_owned)
    }

    /// An integer parameter.
    pub fn int_param(&self, name: &str) -> Result<i64, ParamError> {
        let v = self.require(name)?;
        v.trim().parse().map_err(|_| invalid(name, "integer", v))
    }

    /// A floating-point parameter.
    pub fn float_param(&self, name: &str) -> Result<f64, ParamError> {
        let v = self.require(name)?;
        v.trim().parse().map_err(|_| invalid(name, "number", v))
    }

    /// A boolean parameter: Go's `strconv.ParseBool` spellings (`true`, `1`, `t`, `FALSE`, ...).
    pub fn bool_param(&self, name: &str) -> Result<bool, ParamError> {
        let v = self.require(name)?;
        parse_go_bool(v.trim()).ok_or_else(|| invalid(name, "boolean", v))
    }

    /// A size in bytes, written like `1024`, `4KiB`, `1MB` or `1.5 GB` (SI units are powers of
    /// 1000, IEC units powers of 1024, as go-humanize reads them).
    pub fn size_param(&self, name: &str) -> Result<u64, ParamError> {
        let v = self.require(name)?;
        parse_size(v).ok_or_else(|| invalid(name, "size", v))
    }

    /// A parameter holding JSON, decoded into `T`.
    pub fn json_param<T: DeserializeOwned>(&self, name: &str) -> Result<T, ParamError> {
        let v = self.require(name)?;
        serde_json::from_str(v).map_err(|source| ParamError::Json {
            name: name.to_owned(),
            source,
        })
    }

    /// A JSON array of strings, e.g. `["a","b"]`.
    pub fn string_array_param(&self, name: &str) -> Result<Vec<String>, ParamError> {
        self.json_param(name)
    }

    /// A JSON array of integers, e.g. `[1,2,3]`.
    pub fn int_array_param(&self, name: &str) -> Result<Vec<i64>, ParamError> {
        self.json_param(name)
    }

    fn require(&self, name: &str) -> Result<&str, ParamError> {
        self.param(name).ok_or_else(|| ParamError::Missing {
            name: name.to_owned(),
        })
    }
}

fn invalid(name: &str, expected: &'static str, value: &str) -> ParamError {
    ParamError::Invalid {
        name: name.to_owned(),
        expected,
        value: value.to_owned(),
    }
}

/// `k=v|k2=v2`, split at the first `=` so that values may contain `=`. Empty entries (a
/// trailing `|`) are skipped; an entry without `=` is an error rather than silently lost.
pub(crate) fn parse_key_values(s: &str) -> Result<BTreeMap<String, String>, EnvError> {
    let mut out = BTreeMap::new();
    for entry in s.split('|').filter(|e| !e.is_empty()) {
        let (k, v) = entry.split_once('=').ok_or_else(|| EnvError::ParamPair {
            entry: entry.to_owned(),
        })?;
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// Go's `strconv.ParseBool`.
pub(crate) fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Parses a human-readable size into bytes; `None` when it is not one.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "p" | "pb" => 1e15,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024f64.powi(4),
        "pi" | "pib" => 1024f64.powi(5),
        _ => return None,
    };
    let bytes = num * mult;
    // u64::MAX as f64 rounds up to 2^64, so `<` keeps the cast in range.
    (bytes.is_finite() && bytes < u64::MAX as f64).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("4KiB"), Some(4096));
        assert_eq!(parse_size("1MB"), Some(1_000_000));
        assert_eq!(parse_size("1.5 GB"), Some(1_500_000_000));
        assert_eq!(parse_size("2 mib"), Some(2 << 20));
        assert_eq!(parse_size("10 parsecs"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("KB"), None);
    }

    #[test]
    fn key_values_split_at_first_equals() {
        let m = parse_key_values("a=1|b=x=y|c=").unwrap();
        assert_eq!(m["a"], "1");
        assert_eq!(m["b"], "x=y");
        assert_eq!(m["c"], "");
        assert!(parse_key_values("").unwrap().is_empty());
        assert!(matches!(
            parse_key_values("a=1|oops"),
            Err(EnvError::ParamPair { .. })
        ));
    }
}
