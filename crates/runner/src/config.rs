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
        help: "INFLUXDB_URL given to instances (default: empty, no upload)",
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
    /// Unknown keys that were tolerated (from a manifest or `.env.toml`), to warn about.
    pub ignored: Vec<String>,
}

impl RunConfig {
    /// The timeout to enforce, given the engine's default; `None` means none.
    pub fn effective_timeout(&self, default: Duration) -> Option<Duration> {
        let t = self.timeout.unwrap_or(default);
        (!t.is_zero()).then_some(t)
    }
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

fn unsigned(key: &str, v: &Value, what: &str) -> Result<u64, RunError> {
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| invalid(key, v, what)),
        Value::String(s) => s.trim().parse().map_err(|_| invalid(key, v, what)),
        _ => Err(invalid(key, v, what)),
    }
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
                    Value::String(s) => humantime::parse_duration(s.trim())
                        .map_err(|e| invalid(key, v, &e.to_string()))?,
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
