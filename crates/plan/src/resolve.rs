//! Precedence: what each group is built with and what each run-group runs with, after every
//! default has been applied. Validation runs first, so a resolved value can be trusted.

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;
use tg_api::composition::{Composition, Dependency};
use tg_api::manifest::Manifest;

use crate::Map;
use crate::composition::file_of;
use crate::error::PlanError;
use crate::validate::{checked_runs, effective_runs, validate_for_build};

/// What one group is built with.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedBuild {
    pub group_index: usize,
    pub group_id: String,
    pub builder: String,
    /// `.env.toml [builders.X]` < manifest `[builders.X]` < `global.build_config` < group
    /// `build_config`, merged at the top level only (as the original does).
    pub config: Map,
    pub selectors: Vec<String>,
    pub dependencies: Vec<Dependency>,
    /// Groups with equal keys produce the same artifact: build once.
    pub key: String,
}

/// Resolves the build of every group, in group order (callers skip groups that already have an
/// artifact). `env_builders` is `.env.toml`'s `[builders]` table.
pub fn resolve_builds(
    c: &Composition,
    m: &Manifest,
    env_builders: &BTreeMap<String, Map>,
) -> Result<Vec<ResolvedBuild>, PlanError> {
    validate_for_build(c, m)?;
    let global = &c.global;
    let builds = c
        .groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let builder = if g.builder.is_empty() {
                global.builder.clone()
            } else {
                g.builder.clone()
            };
            let config = layered([
                env_builders.get(&builder),
                m.builder_section(&builder),
                Some(&global.build_config),
                Some(&g.build_config),
            ]);
            let selectors = if g.build.selectors.is_empty() {
                global.build.selectors.clone()
            } else {
                g.build.selectors.clone()
            };
            let own: HashSet<&str> = g
                .build
                .dependencies
                .iter()
                .map(|d| d.module.as_str())
                .collect();
            let dependencies: Vec<Dependency> = g
                .build
                .dependencies
                .iter()
                .chain(
                    global
                        .build
                        .dependencies
                        .iter()
                        .filter(|d| !own.contains(d.module.as_str())),
                )
                .cloned()
                .collect();
            let key = build_key(&builder, &config, &selectors, &dependencies);
            ResolvedBuild {
                group_index: i,
                group_id: g.id.clone(),
                builder,
                config,
                selectors,
                dependencies,
                key,
            }
        })
        .collect();
    Ok(builds)
}

/// Later layers override earlier ones, key by key at the top level.
fn layered<'a>(layers: impl IntoIterator<Item = Option<&'a Map>>) -> Map {
    let mut out = Map::new();
    for layer in layers.into_iter().flatten() {
        for (k, v) in layer {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// A canonical string of everything that makes a build different: config with sorted keys,
/// sorted selectors, dependencies sorted by module. Unlike the original, the dependency target
/// is part of the key: two forks at the same version are different builds.
fn build_key(builder: &str, config: &Map, selectors: &[String], deps: &[Dependency]) -> String {
    let mut selectors = selectors.to_vec();
    selectors.sort();
    let mut deps: Vec<String> = deps
        .iter()
        .map(|d| format!("{}={}@{}", d.module, d.target, d.version))
        .collect();
    deps.sort();
    let key = serde_json::json!({
        "builder": builder,
        "config": canonical(&Value::Object(config.clone())),
        "selectors": selectors,
        "dependencies": deps,
    });
    key.to_string()
}

fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), canonical(&map[k])))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// One run, ready for a runner.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedRun {
    /// The `[[runs]]` id.
    pub run_id: String,
    /// `TEST_PLAN`: the manifest's name with `/` replaced by `-`.
    pub plan: String,
    /// `TEST_CASE`: with `/` replaced by `-`.
    pub case: String,
    pub runner: String,
    /// `.env.toml [runners.X]` < manifest `[runners.X]` < `global.run_config` (top level).
    pub run_config: Map,
    pub total_instances: u32,
    pub disable_metrics: bool,
    pub groups: Vec<ResolvedRunGroup>,
}

/// One run-group of a resolved run.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedRunGroup {
    /// The run-group id: `TEST_GROUP_ID`.
    pub id: String,
    /// The `[[groups]]` id it runs, and that group's index (its build).
    pub group_id: String,
    pub group_index: usize,
    pub instances: u32,
    /// Manifest defaults < `global.run` < group `run` < `runs.test_params` < run-group.
    pub test_params: BTreeMap<String, String>,
    /// `global.run` < group `run` < run-group.
    pub profiles: BTreeMap<String, String>,
    /// The group's artifact, else `global.run.artifact`; empty if it still has to be built.
    pub artifact: String,
}

/// Validates the composition for a run and resolves the run `run_id`. `env_runners` is
/// `.env.toml`'s `[runners]` table.
pub fn resolve_run(
    c: &Composition,
    m: &Manifest,
    run_id: &str,
    env_runners: &BTreeMap<String, Map>,
) -> Result<ResolvedRun, PlanError> {
    let (tc, counted) = checked_runs(c, m)?;
    let (runs, _) = effective_runs(c);
    let Some(pos) = runs.iter().position(|r| r.id == run_id) else {
        let mut ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        ids.sort_unstable();
        return Err(PlanError::invalid(
            file_of(c),
            "runs",
            format!("run '{run_id}' not found; available: [{}]", ids.join(" ")),
        ));
    };
    let run = &runs[pos];
    let counts = &counted[pos];
    let global = &c.global;
    let defaults: BTreeMap<String, String> = tc
        .params
        .iter()
        .map(|(k, p)| (k.clone(), p.default_as_string()))
        .collect();

    let groups = run
        .groups
        .iter()
        .zip(&counts.groups)
        .map(|(rg, &(k, instances))| {
            let g = &c.groups[k];
            let test_params = merged([
                &defaults,
                &global.run.test_params,
                &g.run.test_params,
                &run.test_params,
                &rg.test_params,
            ]);
            let profiles = merged([&global.run.profiles, &g.run.profiles, &rg.profiles]);
            let artifact = if g.run.artifact.is_empty() {
                global.run.artifact.clone()
            } else {
                g.run.artifact.clone()
            };
            ResolvedRunGroup {
                id: rg.id.clone(),
                group_id: g.id.clone(),
                group_index: k,
                instances,
                test_params,
                profiles,
                artifact,
            }
        })
        .collect();

    Ok(ResolvedRun {
        run_id: run.id.clone(),
        plan: m.name.replace('/', "-"),
        case: global.case.replace('/', "-"),
        runner: global.runner.clone(),
        run_config: layered([
            env_runners.get(&global.runner),
            m.runner_section(&global.runner),
            Some(&global.run_config),
        ]),
        total_instances: counts.total,
        disable_metrics: global.disable_metrics,
        groups,
    })
}

fn merged<const N: usize>(layers: [&BTreeMap<String, String>; N]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for layer in layers {
        out.extend(layer.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("test maps are objects"),
        }
    }

    #[test]
    fn build_key_ignores_order_but_not_content() {
        let dep = |m: &str, t: &str| Dependency {
            module: m.into(),
            target: t.into(),
            version: "v1".into(),
        };
        let a = build_key(
            "exec:go",
            &map(json!({"a": 1, "b": {"x": 1, "y": 2}})),
            &["s1".into(), "s2".into()],
            &[dep("m1", ""), dep("m2", "")],
        );
        let b = build_key(
            "exec:go",
            &map(json!({"b": {"y": 2, "x": 1}, "a": 1})),
            &["s2".into(), "s1".into()],
            &[dep("m2", ""), dep("m1", "")],
        );
        assert_eq!(a, b);
        let c = build_key(
            "exec:go",
            &map(json!({"a": 1, "b": {"x": 1, "y": 2}})),
            &["s1".into(), "s2".into()],
            &[dep("m1", "fork"), dep("m2", "")],
        );
        assert_ne!(a, c);
        let d = build_key("docker:go", &map(json!({})), &[], &[]);
        let e = build_key("exec:go", &map(json!({})), &[], &[]);
        assert_ne!(d, e);
    }

    #[test]
    fn layers_override_at_top_level_only() {
        let low = map(json!({"a": 1, "t": {"x": 1, "y": 1}}));
        let high = map(json!({"t": {"x": 2}}));
        let out = layered([Some(&low), None, Some(&high)]);
        assert_eq!(Value::Object(out), json!({"a": 1, "t": {"x": 2}}));
    }
}
