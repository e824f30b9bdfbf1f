//! `$TESTGROUND_HOME/.env.toml`, read by the daemon and the CLI.
//!
//! Sections the original had and we do not use (`[aws]`, `[dockerhub]`, Slack/GitHub keys) are
//! accepted and ignored, so an existing file keeps working.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    /// `[builders."<id>"]`: lowest-precedence build configuration.
    pub builders: BTreeMap<String, toml::Table>,
    /// `[runners."<id>"]`: run configuration below the manifest's; `disabled = true` refuses runs.
    pub runners: BTreeMap<String, toml::Table>,
    pub daemon: DaemonConfig,
    pub client: ClientConfig,
    pub sync: SyncConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DaemonConfig {
    pub listen: String,
    pub tokens: Vec<String>,
    pub scheduler: SchedulerConfig,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: "localhost:8042".into(),
            tokens: Vec::new(),
            scheduler: SchedulerConfig::default(),
        }
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
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig { port: 5050 }
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
        let cfg: EnvConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: describe_toml_error(&text, &e),
        })?;
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
}
