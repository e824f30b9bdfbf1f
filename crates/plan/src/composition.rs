//! `composition.toml` loading and writing, and the synthetic composition of `single` commands.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value;
use tg_api::composition::{
    Build, Composition, Dependency, Global, Group, GroupRun, Instances, Run, RunGroup,
};

use crate::Map;
use crate::decode::{UnknownKeys, decode, map_datetimes_to_strings};
use crate::error::PlanError;

/// `origin` of compositions made from `single` command flags rather than a file.
pub(crate) const SYNTHETIC_ORIGIN: &str = "synthetic composition";

/// Reads, renders and parses the composition at `path`.
pub fn load_composition(
    path: &Path,
    env: &HashMap<String, String>,
) -> Result<Composition, PlanError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
        file: path.display().to_string(),
        source,
    })?;
    parse_composition(&text, path, env)
}

/// Renders `{{ .Env.NAME }}` actions from `env`, parses the TOML (rejecting unknown keys), fills
/// each run-group's `group_id` from its `id`, and adds the implicit run `default` (one run-group
/// per group) when the file has no `[[runs]]`. Instance counts are computed by
/// [`crate::resolve_run`]: a composition that only builds need not be runnable.
pub fn parse_composition(
    text: &str,
    origin: &Path,
    env: &HashMap<String, String>,
) -> Result<Composition, PlanError> {
    let file = origin.display().to_string();
    let rendered = crate::template::render(text, &file, env)?;
    let mut c: Composition = decode(&rendered, &file, UnknownKeys::Reject)?;
    c.origin = file;
    map_datetimes_to_strings(&mut c.global.build_config);
    map_datetimes_to_strings(&mut c.global.run_config);
    for g in &mut c.groups {
        map_datetimes_to_strings(&mut g.build_config);
    }
    for run in &mut c.runs {
        for rg in &mut run.groups {
            if rg.group_id.is_empty() {
                rg.group_id = rg.id.clone();
            }
        }
    }
    if c.runs.is_empty() {
        c.runs.push(default_run(&c));
    }
    Ok(c)
}

/// The run the original generates when a composition has no `[[runs]]`: every group, with the
/// group's own instances.
pub(crate) fn default_run(c: &Composition) -> Run {
    Run {
        id: "default".to_owned(),
        total_instances: c.global.total_instances,
        test_params: BTreeMap::new(),
        groups: c
            .groups
            .iter()
            .map(|g| RunGroup {
                id: g.id.clone(),
                group_id: g.id.clone(),
                ..RunGroup::default()
            })
            .collect(),
    }
}

/// Serialises a composition as `composition.toml` text (for `-w`). TOML has no null, so null
/// config values are left out, which reads back as "unset". The generated `default` run is left
/// implicit, as the user wrote it: reading the file back generates it again.
pub fn to_toml(c: &Composition) -> Result<String, PlanError> {
    let mut c = c.clone();
    if c.runs.len() == 1 && c.runs[0] == default_run(&c) {
        c.runs.clear();
    }
    strip_nulls(&mut c.global.build_config);
    strip_nulls(&mut c.global.run_config);
    for g in &mut c.groups {
        strip_nulls(&mut g.build_config);
    }
    toml::to_string_pretty(&c).map_err(|e| PlanError::Serialize {
        message: e.to_string().trim().to_owned(),
    })
}

fn strip_nulls(map: &mut Map) {
    map.retain(|_, v| !v.is_null());
    for v in map.values_mut() {
        match v {
            Value::Object(inner) => strip_nulls(inner),
            Value::Array(items) => items.retain(|i| !i.is_null()),
            _ => {}
        }
    }
}

/// What `build single` / `run single` flags describe.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SingleSpec {
    pub plan: String,
    pub case: String,
    pub builder: String,
    pub runner: String,
    pub instances: u32,
    pub build_config: Map,
    pub run_config: Map,
    pub test_params: BTreeMap<String, String>,
    pub dependencies: Vec<Dependency>,
    /// `--use-build`; empty means "build it".
    pub artifact: String,
    pub disable_metrics: bool,
}

/// The composition the original synthesises for `single` commands: one group `single` with all
/// instances, and the run `default` over it.
pub fn single_composition(spec: SingleSpec) -> Composition {
    let mut c = Composition {
        global: Global {
            plan: spec.plan,
            case: spec.case,
            builder: spec.builder,
            runner: spec.runner,
            total_instances: spec.instances,
            build_config: spec.build_config,
            run_config: spec.run_config,
            disable_metrics: spec.disable_metrics,
            ..Global::default()
        },
        groups: vec![Group {
            id: "single".to_owned(),
            instances: Instances {
                count: spec.instances,
                percentage: 0.0,
            },
            build: Build {
                selectors: Vec::new(),
                dependencies: spec.dependencies,
            },
            run: GroupRun {
                artifact: spec.artifact,
                test_params: spec.test_params,
                profiles: BTreeMap::new(),
            },
            ..Group::default()
        }],
        origin: SYNTHETIC_ORIGIN.to_owned(),
        ..Composition::default()
    };
    c.runs.push(default_run(&c));
    c
}

pub(crate) fn file_of(c: &Composition) -> &str {
    if c.origin.is_empty() {
        "composition.toml"
    } else {
        &c.origin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Composition, PlanError> {
        parse_composition(text, Path::new("c.toml"), &HashMap::new())
    }

    #[test]
    fn default_run_has_one_run_group_per_group() {
        let c = parse(
            "[global]\nplan = \"p\"\ntotal_instances = 3\n[[groups]]\nid = \"a\"\n[[groups]]\nid = \"b\"\n",
        )
        .unwrap();
        assert_eq!(c.runs.len(), 1);
        let run = &c.runs[0];
        assert_eq!(run.id, "default");
        assert_eq!(run.total_instances, 3);
        let ids: Vec<_> = run
            .groups
            .iter()
            .map(|g| (g.id.as_str(), g.group_id.as_str()))
            .collect();
        assert_eq!(ids, vec![("a", "a"), ("b", "b")]);
        assert!(run.groups.iter().all(|g| g.instances.is_empty()));
    }

    #[test]
    fn explicit_runs_are_kept_and_group_id_filled() {
        let c = parse(
            "[global]\nplan = \"p\"\n[[groups]]\nid = \"a\"\n[[runs]]\nid = \"r\"\n[[runs.groups]]\nid = \"a\"\n[[runs.groups]]\nid = \"x\"\ngroup_id = \"a\"\n",
        )
        .unwrap();
        assert_eq!(c.runs.len(), 1);
        assert_eq!(c.runs[0].groups[0].group_id, "a");
        assert_eq!(c.runs[0].groups[1].group_id, "a");
    }

    #[test]
    fn origin_is_recorded() {
        let c = parse("[global]\nplan = \"p\"\n").unwrap();
        assert_eq!(c.origin, "c.toml");
    }

    #[test]
    fn nulls_are_left_out_of_toml() {
        let mut c = single_composition(SingleSpec {
            plan: "p".into(),
            ..SingleSpec::default()
        });
        c.global
            .build_config
            .insert("gone".into(), serde_json::Value::Null);
        c.global.build_config.insert("kept".into(), 1.into());
        let text = to_toml(&c).unwrap();
        assert!(text.contains("kept = 1"), "{text}");
        assert!(!text.contains("gone"), "{text}");
    }
}
