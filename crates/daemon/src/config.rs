//! `$TESTGROUND_HOME/.env.toml`, read by the daemon and the CLI.
//!
//! Sections the original had and we do not use (`[aws]`, `[dockerhub]`, Slack/GitHub keys) are
//! accepted and ignored, so an existing file keeps working. Any other key nothing reads (a
//! misspelt `[client] endpont` would otherwise silently run embedded) is reported in
//! [`EnvConfig::warnings`], naming the file and the key. `[builders.*]` and `[runners.*]` tables
//! are free-form: their keys are checked by the builder or runner they configure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub type Map = serde_json::Map<String, serde_json::Value>;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct EnvConfig {
    /// Keys of the original's `[aws]` and `[dockerhub]` sections: accepted, unused.
    pub aws: toml::Table,
    pub dockerhub: toml::Table,
    /// `[builders."<id>"]`: lowest-precedence build configuration.
    pub builders: BTreeMap<String, toml::Table>,
    /// `[runners."<id>"]`: run configuration below the manifest's; `disabled = true` refuses runs.
    pub runners: BTreeMap<String, toml::Table>,
    pub daemon: DaemonConfig,
    pub client: ClientConfig,
    pub sync: SyncConfig,
    /// One line per key of the file that nothing reads, e.g.
    /// `/home/u/.env.toml: unknown key client.endpont (ignored)`. Filled by [`EnvConfig::load`].
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// The default of `[daemon] max_request_body`: large enough for a plan's sources.
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 512 << 20;

/// The default of `[daemon] keep_sources`.
pub const DEFAULT_KEEP_SOURCES: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DaemonConfig {
    pub listen: String,
    pub tokens: Vec<String>,
    pub scheduler: SchedulerConfig,
    /// The largest request body the daemon accepts, in bytes (an integer, or a string such as
    /// `"512MiB"`); a larger one is refused with 413 before it is read.
    #[serde(deserialize_with = "de_size")]
    pub max_request_body: u64,
    /// How long the uploaded sources of a finished task are kept (`"24h"`, `"30m"`; `"0s"`
    /// removes them at the next sweep).
    #[serde(deserialize_with = "de_duration")]
    pub keep_sources: Duration,
    /// The original's keys for Slack, GitHub statuses and its dashboard: accepted, unused.
    pub slack_webhook_url: String,
    pub github_repo_status_token: String,
    pub root_url: String,
    /// The InfluxDB 1.x the engine exports run metrics to and hands to `local:exec` instances
    /// as `INFLUXDB_URL` (empty: the engine's `INFLUXDB_URL`, else none). See the README's
    /// "Metrics and InfluxDB".
    pub influxdb_endpoint: String,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: "localhost:8042".into(),
            tokens: Vec::new(),
            scheduler: SchedulerConfig::default(),
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
            keep_sources: DEFAULT_KEEP_SOURCES,
            slack_webhook_url: String::new(),
            github_repo_status_token: String::new(),
            root_url: String::new(),
            influxdb_endpoint: String::new(),
        }
    }
}

/// A byte count: an integer, or a string with a unit (`B`, `KB`, `KiB`, ... `GiB`, `TB`).
fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(n),
        Raw::Text(s) => parse_size(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid size {s:?}: expected bytes as an integer or with a unit such as \"512MiB\" or \"1GB\""
            ))
        }),
    }
}

/// Parses `512`, `64KiB`, `1.5 GB` (case-insensitive; `K` and `KB` are 1000, `KiB` 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(end);
    let number: f64 = number.parse().ok()?;
    let unit = unit.trim().to_ascii_lowercase();
    let factor: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = number * factor;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// A duration written as `"24h"`, `"90m"`, `"1h 30m"` (humantime), or seconds as an integer.
fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(n) => Ok(Duration::from_secs(n)),
        Raw::Text(s) => humantime::parse_duration(s.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?}: {e}; expected e.g. \"24h\", \"30m\" or \"0s\""
            ))
        }),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub workers: usize,
    pub queue_size: usize,
    /// Per-task timeout in minutes; 0 means the default of 10 minutes.
    pub task_timeout_min: u64,
    /// Accepted for compatibility; tasks are always kept on disk (SQLite).
    pub task_repo_type: String,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            workers: 2,
            queue_size: 100,
            task_timeout_min: 0,
            task_repo_type: "disk".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ClientConfig {
    /// Daemon endpoint. When unset (and no `--endpoint`), the CLI runs the engine in-process.
    pub endpoint: Option<String>,
    pub token: String,
    pub user: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SyncConfig {
    /// Port of the sync service (`SYNC_SERVICE_PORT` given to instances).
    pub port: u16,
    /// Largest payload of one publish, in bytes.
    pub max_payload_bytes: usize,
    /// Most payload bytes one topic retains.
    pub max_topic_bytes: usize,
    /// Most bytes one run retains across its states, topics, barriers and subscriptions.
    pub max_run_bytes: usize,
    /// Most connections one run may have.
    pub max_connections_per_run: usize,
    /// Most connections that have not sent a request yet; the oldest is closed beyond it.
    pub max_unidentified_connections: usize,
    /// Runnable tasks on the host above which a large fan-out is written in slices; 0 never
    /// paces.
    pub fanout_pace_runnable: u32,
}

impl Default for SyncConfig {
    fn default() -> Self {
        let l = tg_sync::SyncLimits::default();
        SyncConfig {
            port: 5050,
            max_payload_bytes: l.max_payload_bytes,
            max_topic_bytes: l.max_topic_bytes,
            max_run_bytes: l.max_run_bytes,
            max_connections_per_run: l.max_connections_per_run,
            max_unidentified_connections: l.max_unidentified_connections,
            fanout_pace_runnable: l.fanout_pace_runnable.unwrap_or(0),
        }
    }
}

impl SyncConfig {
    /// The sync service's limits.
    pub fn limits(&self) -> tg_sync::SyncLimits {
        tg_sync::SyncLimits {
            max_payload_bytes: self.max_payload_bytes,
            max_topic_bytes: self.max_topic_bytes,
            max_run_bytes: self.max_run_bytes,
            max_connections_per_run: self.max_connections_per_run,
            max_unidentified_connections: self.max_unidentified_connections,
            fanout_pace_runnable: (self.fanout_pace_runnable > 0)
                .then_some(self.fanout_pace_runnable),
        }
    }
}

impl EnvConfig {
    /// Loads `path` if it exists. Returns the config and whether a file was read.
    pub fn load(path: &Path) -> Result<(EnvConfig, bool), ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((EnvConfig::default(), false));
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let mut cfg: EnvConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: describe_toml_error(&text, &e),
        })?;
        cfg.warnings = unknown_keys(&text)
            .into_iter()
            .map(|key| format!("{}: unknown key {key} (ignored)", path.display()))
            .collect();
        Ok((cfg, true))
    }

    pub fn builders_json(&self) -> BTreeMap<String, Map> {
        self.builders
            .iter()
            .map(|(k, v)| (k.clone(), table_to_json(v)))
            .collect()
    }

    pub fn runners_json(&self) -> BTreeMap<String, Map> {
        self.runners
            .iter()
            .map(|(k, v)| (k.clone(), table_to_json(v)))
            .collect()
    }

    /// The task timeout (`task_timeout_min`, 0 → 10 minutes).
    pub fn task_timeout(&self) -> std::time::Duration {
        let min = match self.daemon.scheduler.task_timeout_min {
            0 => 10,
            n => n,
        };
        std::time::Duration::from_secs(min * 60)
    }
}

/// The dotted paths of the keys of `text` that [`EnvConfig`] does not read, in file order. A
/// second, lenient pass: the strict parse has already succeeded, so only unknown keys remain.
fn unknown_keys(text: &str) -> Vec<String> {
    let Ok(de) = toml::Deserializer::parse(text) else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    let _ =
        serde_ignored::deserialize(de, |path| keys.push(path.to_string())).map(|_: EnvConfig| ());
    keys
}

/// `line L, column C: message` for a TOML error.
pub fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before
                .rsplit('\n')
                .next()
                .map(|l| l.chars().count())
                .unwrap_or(0)
                + 1;
            format!("line {line}, column {col}: {msg}")
        }
        None => msg,
    }
}

pub fn table_to_json(t: &toml::Table) -> Map {
    match toml_to_json(&toml::Value::Table(t.clone())) {
        serde_json::Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn toml_to_json(v: &toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(J::Number)
            .unwrap_or(J::Null),
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(a) => J::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => J::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_original_sections() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".env.toml");
        let (c, found) = EnvConfig::load(&p).unwrap();
        assert!(!found);
        assert_eq!(c.daemon.listen, "localhost:8042");
        assert_eq!(c.daemon.scheduler.workers, 2);
        assert_eq!(c.task_timeout().as_secs(), 600);
        std::fs::write(
            &p,
            "[aws]\nregion = \"eu\"\n[runners.\"local:exec\"]\ndisabled = true\n[daemon]\ntokens = [\"t\"]\n[daemon.scheduler]\nworkers = 4\n[client]\nendpoint = \"http://localhost:9\"\n",
        )
        .unwrap();
        let (c, found) = EnvConfig::load(&p).unwrap();
        assert!(found);
        assert_eq!(c.daemon.tokens, vec!["t".to_string()]);
        assert_eq!(c.daemon.scheduler.workers, 4);
        assert_eq!(c.client.endpoint.as_deref(), Some("http://localhost:9"));
        assert_eq!(c.runners_json()["local:exec"]["disabled"], true);
    }

    #[test]
    fn bad_types_name_the_file_and_position() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".env.toml");
        std::fs::write(&p, "[daemon.scheduler]\nworkers = \"two\"\n").unwrap();
        let e = EnvConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains(".env.toml: line 2"), "{e}");
    }

    #[test]
    fn unknown_keys_are_warnings_naming_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".env.toml");
        std::fs::write(
            &p,
            "[client]\nendpont = \"http://localhost:9\"\n[daemon]\nlisten = \"localhost:1\"\nslack_webhook_url = \"\"\n[daemon.scheduler]\nwokers = 3\n[runners.\"local:exec\"]\nanything = 1\n[builders.\"exec:go\"]\nx = { y = 2 }\n[aws]\nregion = \"eu\"\n[mystery]\nk = 1\n",
        )
        .unwrap();
        let (c, _) = EnvConfig::load(&p).unwrap();
        // The misspelt endpoint is not used, and said so.
        assert_eq!(c.client.endpoint, None);
        let file = p.display().to_string();
        assert_eq!(
            c.warnings,
            vec![
                format!("{file}: unknown key client.endpont (ignored)"),
                format!("{file}: unknown key daemon.scheduler.wokers (ignored)"),
                format!("{file}: unknown key mystery (ignored)"),
            ]
        );
        // Free-form tables keep every key.
        assert_eq!(c.runners_json()["local:exec"]["anything"], 1);
        assert_eq!(c.builders_json()["exec:go"]["x"]["y"], 2);
    }

    #[test]
    fn body_limit_and_source_retention_parse_with_units() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".env.toml");
        let (c, _) = EnvConfig::load(&p).unwrap();
        assert_eq!(c.daemon.max_request_body, 512 * 1024 * 1024);
        assert_eq!(c.daemon.keep_sources, Duration::from_secs(86400));
        std::fs::write(
            &p,
            "[daemon]\nmax_request_body = \"64KiB\"\nkeep_sources = \"90m\"\n",
        )
        .unwrap();
        let (c, _) = EnvConfig::load(&p).unwrap();
        assert_eq!(c.daemon.max_request_body, 64 * 1024);
        assert_eq!(c.daemon.keep_sources, Duration::from_secs(5400));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        std::fs::write(&p, "[daemon]\nmax_request_body = 1000\nkeep_sources = 60\n").unwrap();
        let (c, _) = EnvConfig::load(&p).unwrap();
        assert_eq!(c.daemon.max_request_body, 1000);
        assert_eq!(c.daemon.keep_sources, Duration::from_secs(60));
        for bad in [
            "[daemon]\nmax_request_body = \"lots\"\n",
            "[daemon]\nkeep_sources = \"a day\"\n",
        ] {
            std::fs::write(&p, bad).unwrap();
            let e = EnvConfig::load(&p).unwrap_err().to_string();
            assert!(
                e.contains(".env.toml: line 2") && e.contains("invalid"),
                "{e}"
            );
        }
        assert_eq!(parse_size("1.5 GB"), Some(1_500_000_000));
        assert_eq!(parse_size("2k"), Some(2000));
        assert_eq!(parse_size("1 XB"), None);
    }
}
