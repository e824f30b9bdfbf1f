//! `manifest.toml`: what a test plan declares about itself (builders and runners it supports with
//! their default configuration, test cases with instance bounds and parameters).
//!
//! Unknown keys are tolerated on purpose: the original's manifests carry `[defaults]`, `enabled`
//! and free-form builder/runner tables, and plans written for it must load unchanged. Loading and
//! validation live in `tg-plan`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A free-form configuration table (builder, runner or build/run config).
pub type Map = serde_json::Map<String, serde_json::Value>;

/// A test plan manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Manifest {
    /// Plan name; `TEST_PLAN` is this with `/` replaced by `-`.
    pub name: String,
    /// Supported builders (the key's presence means "supported") and their default build config.
    pub builders: BTreeMap<String, Map>,
    /// Supported runners and their default run config.
    pub runners: BTreeMap<String, Map>,
    pub testcases: Vec<TestCase>,
    /// Extra source directories per builder, keyed by builder id with `:` replaced by `_`.
    pub extra_sources: BTreeMap<String, Vec<String>>,
    /// Conventional, not consumed by the original; kept so `describe` can show it.
    pub defaults: Defaults,
    /// Where the manifest was read from, used to name the file in error messages. Never
    /// serialised: it is a local path that means nothing to a daemon.
    #[serde(skip)]
    pub origin: String,
}

/// The `[defaults]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Defaults {
    pub builder: String,
    pub runner: String,
}

/// One `[[testcases]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct TestCase {
    pub name: String,
    /// Without an `instances` table the original's bounds are `[0, 0]`; we keep that.
    pub instances: InstanceRange,
    pub params: BTreeMap<String, Param>,
}

/// Allowed total instance count of a run of a test case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct InstanceRange {
    pub min: u32,
    pub max: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<u32>,
}

impl InstanceRange {
    pub fn contains(&self, n: u32) -> bool {
        self.min <= n && n <= self.max
    }
}

/// A declared test parameter. Types are informative only: the original does no type checking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Param {
    #[serde(rename = "type")]
    pub kind: String,
    pub desc: String,
    pub unit: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
}

impl Param {
    /// The default as passed to instances: strings as-is, anything else as JSON, and a missing
    /// default as the string `null` (plans written for the original rely on that).
    pub fn default_as_string(&self) -> String {
        match &self.default {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "null".to_owned(),
        }
    }
}

/// Builders and runners that run the same plans, a container one and its host counterpart: the
/// original's plans enable only `docker:go` and `local:docker`, ours `exec:go` and
/// `local:netns`, and a user may ask for either on the command line. `cluster:k8s` runs what
/// `local:docker` runs (the same images, the same sidecar network), as the original's plans
/// expect of it.
pub const EQUIVALENTS: &[(&str, &str)] = &[
    ("docker:go", "exec:go"),
    ("docker:rust", "exec:rust"),
    ("local:docker", "local:netns"),
    ("cluster:k8s", "local:docker"),
    ("cluster:k8s", "local:netns"),
];

/// The counterparts of builder or runner `id`, closest first.
pub fn equivalents(id: &str) -> impl Iterator<Item = &'static str> + '_ {
    EQUIVALENTS.iter().filter_map(move |&(a, b)| {
        if a == id {
            Some(b)
        } else if b == id {
            Some(a)
        } else {
            None
        }
    })
}

impl Manifest {
    pub fn testcase(&self, name: &str) -> Option<&TestCase> {
        self.testcases.iter().find(|tc| tc.name == name)
    }

    /// True when the manifest enables builder `id`, or its container/host counterpart
    /// ([`EQUIVALENTS`]).
    pub fn supports_builder(&self, id: &str) -> bool {
        self.builders.contains_key(id) || self.substitute(&self.builders, id).is_some()
    }

    /// True when the manifest enables runner `id`, or its container/host counterpart.
    pub fn supports_runner(&self, id: &str) -> bool {
        self.runners.contains_key(id) || self.substitute(&self.runners, id).is_some()
    }

    /// The manifest's `[builders."<id>"]` section, or its counterpart's when only that is
    /// enabled (its keys, such as `module_path`, mean the same).
    pub fn builder_section(&self, id: &str) -> Option<&Map> {
        self.builders.get(id).or_else(|| {
            self.substitute(&self.builders, id)
                .and_then(|e| self.builders.get(e))
        })
    }

    /// The manifest's `[runners."<id>"]` section, or its counterpart's.
    pub fn runner_section(&self, id: &str) -> Option<&Map> {
        self.runners.get(id).or_else(|| {
            self.substitute(&self.runners, id)
                .and_then(|e| self.runners.get(e))
        })
    }

    /// The enabled counterpart that lets `id` run this plan although the manifest does not
    /// name `id` itself.
    pub fn substitute(&self, enabled: &BTreeMap<String, Map>, id: &str) -> Option<&'static str> {
        if enabled.contains_key(id) {
            return None;
        }
        equivalents(id).find(|e| enabled.contains_key(*e))
    }

    /// Notices for the ids of `builders` and `runner` that run this plan only as counterparts
    /// of the ones its manifest enables.
    pub fn substitution_notices(&self, builders: &[&str], runner: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for b in builders {
            if seen.insert(*b)
                && let Some(e) = self.substitute(&self.builders, b)
            {
                out.push(format!(
                    "plan {} enables builder {e}, not {b}; building with {b} as its counterpart \
                     (with the [builders.\"{e}\"] settings)",
                    self.name
                ));
            }
        }
        if let Some(e) = self.substitute(&self.runners, runner) {
            out.push(format!(
                "plan {} enables runner {e}, not {runner}; running under {runner} as its \
                 counterpart (with the [runners.\"{e}\"] settings)",
                self.name
            ));
        }
        out
    }

    /// Builder ids, sorted.
    pub fn supported_builders(&self) -> Vec<&str> {
        self.builders.keys().map(String::as_str).collect()
    }

    /// Runner ids, sorted.
    pub fn supported_runners(&self) -> Vec<&str> {
        self.runners.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counterparts_are_accepted_with_their_settings_and_a_notice() {
        let mut m = Manifest {
            name: "p".into(),
            ..Default::default()
        };
        let mut go = Map::new();
        go.insert("module_path".into(), json!("x"));
        m.builders.insert("docker:go".into(), go);
        m.runners.insert("local:docker".into(), Map::new());
        assert!(m.supports_builder("exec:go") && m.supports_builder("docker:go"));
        assert!(m.supports_runner("local:netns") && !m.supports_runner("local:exec"));
        assert!(!m.supports_builder("exec:rust"));
        assert_eq!(
            m.builder_section("exec:go").unwrap()["module_path"],
            json!("x")
        );
        let n = m.substitution_notices(&["exec:go", "exec:go"], "local:netns");
        assert_eq!(n.len(), 2, "{n:?}");
        assert!(
            n[0].contains("enables builder docker:go, not exec:go"),
            "{n:?}"
        );
        assert!(
            m.substitution_notices(&["docker:go"], "local:docker")
                .is_empty()
        );
    }

    #[test]
    fn default_as_string_follows_the_original() {
        let p = |d: Option<serde_json::Value>| Param {
            default: d,
            ..Param::default()
        };
        assert_eq!(p(Some(json!("never"))).default_as_string(), "never");
        assert_eq!(p(Some(json!(5))).default_as_string(), "5");
        assert_eq!(p(Some(json!(false))).default_as_string(), "false");
        assert_eq!(
            p(Some(json!(["a", "b"]))).default_as_string(),
            r#"["a","b"]"#
        );
        assert_eq!(p(None).default_as_string(), "null");
    }

    #[test]
    fn param_type_uses_the_type_key() {
        let p: Param = serde_json::from_value(json!({"type": "int", "default": 3})).unwrap();
        assert_eq!(p.kind, "int");
        assert_eq!(serde_json::to_value(&p).unwrap()["type"], "int");
    }

    #[test]
    fn testcase_lookup_and_range() {
        let m = Manifest {
            testcases: vec![TestCase {
                name: "a".into(),
                instances: InstanceRange {
                    min: 2,
                    max: 4,
                    default: None,
                },
                ..TestCase::default()
            }],
            ..Manifest::default()
        };
        let tc = m.testcase("a").unwrap();
        assert!(tc.instances.contains(2) && tc.instances.contains(4));
        assert!(!tc.instances.contains(1) && !tc.instances.contains(5));
        assert!(m.testcase("b").is_none());
    }
}
