//! `composition.toml`: which plan and case to build and run, with which builders and runner, in
//! which groups, with which parameters, over one or more `[[runs]]`.
//!
//! Field names are the TOML keys, so a composition serialised back to TOML (`-w`) is a valid
//! composition file; empty values are left out to keep that file close to what the user wrote.
//! These types accept what they are given: `tg-plan` rejects unknown keys, validates and resolves
//! precedence.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::manifest::Map;

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

fn is_zero_f64(n: &f64) -> bool {
    *n == 0.0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A composition file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Composition {
    #[serde(skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
    pub global: Global,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Group>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<Run>,
    /// Where the composition was read from, used to name the file in error messages. Never
    /// serialised: it is a local path.
    #[serde(skip)]
    pub origin: String,
}

impl Composition {
    pub fn group(&self, id: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.id == id)
    }

    pub fn run(&self, id: &str) -> Option<&Run> {
        self.runs.iter().find(|r| r.id == id)
    }

    /// Run ids in the order the original runs them when none are named: sorted.
    pub fn run_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.runs.iter().map(|r| r.id.as_str()).collect();
        ids.sort_unstable();
        ids
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Metadata {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub author: String,
}

impl Metadata {
    pub fn is_empty(&self) -> bool {
        self.name.is_empty() && self.author.is_empty()
    }
}

/// The `[global]` table: defaults for every group and run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Global {
    /// Plan directory under `$TESTGROUND_HOME/plans` (the manifest's `name` replaces it on the
    /// daemon side).
    pub plan: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub case: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub builder: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub runner: String,
    /// 0 means "sum of the groups' counts".
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub total_instances: u32,
    /// 0 means unlimited.
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub concurrent_builds: u32,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub build_config: Map,
    #[serde(skip_serializing_if = "Build::is_empty")]
    pub build: Build,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub run_config: Map,
    #[serde(skip_serializing_if = "GroupRun::is_empty")]
    pub run: GroupRun,
    #[serde(skip_serializing_if = "is_false")]
    pub disable_metrics: bool,
}

/// Build selectors and dependency overrides (`[global.build]`, `[groups.build]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Build {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dependencies: Vec<Dependency>,
}

impl Build {
    pub fn is_empty(&self) -> bool {
        self.selectors.is_empty() && self.dependencies.is_empty()
    }
}

/// A dependency override: build against `target` (or `module` itself) at `version`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Dependency {
    pub module: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub target: String,
    pub version: String,
}

/// A `[[groups]]` entry: instances sharing one build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Group {
    pub id: String,
    /// Empty means `global.builder`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub builder: String,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub build_config: Map,
    #[serde(skip_serializing_if = "Build::is_empty")]
    pub build: Build,
    #[serde(skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    #[serde(skip_serializing_if = "Instances::is_empty")]
    pub instances: Instances,
    #[serde(skip_serializing_if = "GroupRun::is_empty")]
    pub run: GroupRun,
}

/// Resource requests (Kubernetes quantities such as `100Mi`, `0.5`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Resources {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub memory: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cpu: String,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        self.memory.is_empty() && self.cpu.is_empty()
    }
}

/// How many instances: exactly one of `count` or `percentage` (of the run's total) is non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Instances {
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub count: u32,
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub percentage: f64,
}

impl Instances {
    /// Neither field set: the run-group inherits the group's instances.
    pub fn is_empty(&self) -> bool {
        self.count == 0 && self.percentage == 0.0
    }
}

/// Run settings of a group (`[groups.run]`) and their global defaults (`[global.run]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct GroupRun {
    /// A build artifact to run; a non-empty artifact means the group is not rebuilt.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub artifact: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub test_params: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub profiles: BTreeMap<String, String>,
}

impl GroupRun {
    pub fn is_empty(&self) -> bool {
        self.artifact.is_empty() && self.test_params.is_empty() && self.profiles.is_empty()
    }
}

/// A `[[runs]]` entry: one execution of the test case over some of the groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Run {
    pub id: String,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub total_instances: u32,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub test_params: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<RunGroup>,
}

/// A `[[runs.groups]]` entry: a group's participation in a run. Its id is `TEST_GROUP_ID`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct RunGroup {
    pub id: String,
    /// The `[[groups]]` id this run-group runs; empty in a file means "same as `id`".
    #[serde(skip_serializing_if = "String::is_empty")]
    pub group_id: String,
    #[serde(skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    /// Empty means the group's instances.
    #[serde(skip_serializing_if = "Instances::is_empty")]
    pub instances: Instances,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub test_params: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub profiles: BTreeMap<String, String>,
}

impl RunGroup {
    /// The group this run-group refers to (`group_id`, or `id` when unset).
    pub fn effective_group_id(&self) -> &str {
        if self.group_id.is_empty() {
            &self.id
        } else {
            &self.group_id
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_values_are_not_serialised() {
        let c = Composition {
            global: Global {
                plan: "p".into(),
                ..Global::default()
            },
            groups: vec![Group {
                id: "g".into(),
                instances: Instances {
                    count: 2,
                    percentage: 0.0,
                },
                ..Group::default()
            }],
            ..Composition::default()
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v,
            json!({"global": {"plan": "p"}, "groups": [{"id": "g", "instances": {"count": 2}}]})
        );
        let back: Composition = serde_json::from_value(v).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn run_group_defaults_group_id_to_id() {
        let mut rg = RunGroup {
            id: "a".into(),
            ..RunGroup::default()
        };
        assert_eq!(rg.effective_group_id(), "a");
        rg.group_id = "b".into();
        assert_eq!(rg.effective_group_id(), "b");
    }

    #[test]
    fn run_ids_are_sorted() {
        let c = Composition {
            runs: ["b", "a"]
                .iter()
                .map(|id| Run {
                    id: (*id).into(),
                    ..Run::default()
                })
                .collect(),
            ..Composition::default()
        };
        assert_eq!(c.run_ids(), vec!["a", "b"]);
        assert!(c.run("a").is_some() && c.run("c").is_none());
    }
}
