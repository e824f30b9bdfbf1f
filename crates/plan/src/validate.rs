//! The original's validation rules for building and running a composition against a manifest,
//! each error naming the file and the TOML field to fix.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

use tg_api::composition::{Composition, Dependency, Instances, Run};
use tg_api::manifest::{Manifest, TestCase};

use crate::composition::{SYNTHETIC_ORIGIN, default_run, file_of};
use crate::error::{PlanError, Seg, format_path};

/// Checks what a build needs: a plan, unique group ids, a supported builder for every group and
/// well-formed dependency overrides. Case, runner, instances and runs are not looked at.
pub fn validate_for_build(c: &Composition, m: &Manifest) -> Result<(), PlanError> {
    let file = file_of(c);
    if c.global.plan.trim().is_empty() {
        return Err(PlanError::invalid(
            file,
            "global.plan",
            "missing value; expected the test plan name",
        ));
    }
    if c.groups.is_empty() {
        return Err(PlanError::invalid(
            file,
            "groups",
            "expected at least one [[groups]] entry",
        ));
    }
    let mut seen = HashSet::new();
    for (i, g) in c.groups.iter().enumerate() {
        if g.id.trim().is_empty() {
            return Err(PlanError::invalid(
                file,
                format!("groups[{i}].id"),
                "missing value; expected a group id",
            ));
        }
        if !seen.insert(g.id.as_str()) {
            return Err(PlanError::invalid(
                file,
                format!("groups[{i}].id"),
                format!("group ids not unique; found duplicate: {}", g.id),
            ));
        }
    }
    if m.builders.is_empty() {
        return Err(PlanError::invalid(
            crate::manifest::file_of(m),
            "builders",
            "plan supports no builders; review the manifest",
        ));
    }
    for (i, g) in c.groups.iter().enumerate() {
        let (builder, field) = if g.builder.is_empty() {
            (c.global.builder.as_str(), "global.builder".to_owned())
        } else {
            (g.builder.as_str(), format!("groups[{i}].builder"))
        };
        if builder.is_empty() {
            return Err(PlanError::invalid(
                file,
                format!("groups[{i}].builder"),
                format!("group {} is missing a builder", g.id),
            ));
        }
        if !m.supports_builder(builder) {
            return Err(PlanError::invalid(
                file,
                field,
                format!(
                    "plan does not support builder '{builder}'; supported: [{}]",
                    m.supported_builders().join(" ")
                ),
            ));
        }
        check_dependencies(file, &format!("groups[{i}]"), &g.build.dependencies)?;
    }
    check_dependencies(file, "global", &c.global.build.dependencies)?;
    Ok(())
}

fn check_dependencies(file: &str, owner: &str, deps: &[Dependency]) -> Result<(), PlanError> {
    for (j, d) in deps.iter().enumerate() {
        for (name, value) in [("module", &d.module), ("version", &d.version)] {
            if value.trim().is_empty() {
                return Err(PlanError::invalid(
                    file,
                    format!("{owner}.build.dependencies[{j}].{name}"),
                    format!("missing value; expected the dependency's {name}"),
                ));
            }
        }
    }
    Ok(())
}

/// Checks everything [`validate_for_build`] does, then what a run needs: case and runner set and
/// supported, unique run and run-group ids, run-groups naming existing groups, instance counts
/// that are well-formed, add up, and lie in the test case's range, for every run.
pub fn validate_for_run(c: &Composition, m: &Manifest) -> Result<(), PlanError> {
    checked_runs(c, m).map(|_| ())
}

/// A run whose instance counts were computed and checked.
pub(crate) struct CountedRun {
    /// For each run-group: the index of its group and its instance count.
    pub groups: Vec<(usize, u32)>,
    pub total: u32,
}

/// The runs to check: `[[runs]]`, or the implicit `default` run when there are none (a
/// composition built by hand or received as JSON may not have had it generated). The flag says
/// whether the runs are (or are identical to) the generated one: errors then name the fields the
/// user wrote (`global.total_instances`, `groups[k].instances`), not `runs[0]`, which is not in
/// their file.
pub(crate) fn effective_runs(c: &Composition) -> (Cow<'_, [Run]>, bool) {
    if c.runs.is_empty() {
        (Cow::Owned(vec![default_run(c)]), true)
    } else {
        let generated = c.runs.len() == 1 && c.runs[0] == default_run(c);
        (Cow::Borrowed(&c.runs), generated)
    }
}

/// Validates for run and returns the test case and every run's counts, in `effective_runs` order.
pub(crate) fn checked_runs<'m>(
    c: &Composition,
    m: &'m Manifest,
) -> Result<(&'m TestCase, Vec<CountedRun>), PlanError> {
    validate_for_build(c, m)?;
    let file = file_of(c);
    for (field, value, what) in [
        ("global.case", &c.global.case, "test case name"),
        ("global.runner", &c.global.runner, "runner"),
    ] {
        if value.trim().is_empty() {
            return Err(PlanError::invalid(
                file,
                field,
                format!("missing value; expected the {what}"),
            ));
        }
    }
    let synthetic = file == SYNTHETIC_ORIGIN;
    let Some(tc) = m.testcase(&c.global.case) else {
        let cases: Vec<&str> = m.testcases.iter().map(|tc| tc.name.as_str()).collect();
        let message = format!(
            "test case {} not found in plan {}; its test cases: [{}]",
            c.global.case,
            m.name,
            cases.join(" ")
        );
        return Err(if synthetic {
            PlanError::Param {
                flag: "--testcase".to_owned(),
                message,
            }
        } else {
            PlanError::invalid(file, "global.case", message)
        });
    };
    // `-i 0` of a `single` command: say what the flag allows, not which field of a composition
    // the user never wrote is empty.
    if synthetic && c.global.total_instances == 0 {
        return Err(PlanError::Param {
            flag: "--instances".to_owned(),
            message: format!(
                "expected at least 1 instance; test case {} allows from {} to {} instances",
                tc.name,
                tc.instances.min.max(1),
                tc.instances.max
            ),
        });
    }
    if m.runners.is_empty() {
        return Err(PlanError::invalid(
            crate::manifest::file_of(m),
            "runners",
            "plan supports no runners; review the manifest",
        ));
    }
    if !m.supports_runner(&c.global.runner) {
        return Err(PlanError::invalid(
            file,
            "global.runner",
            format!(
                "plan does not support runner '{}'; supported: [{}]",
                c.global.runner,
                m.supported_runners().join(" ")
            ),
        ));
    }

    check_test_params(c, tc)?;

    let (runs, generated) = effective_runs(c);
    let mut seen = HashSet::new();
    let mut counted = Vec::with_capacity(runs.len());
    for (i, run) in runs.iter().enumerate() {
        if run.id.trim().is_empty() {
            return Err(PlanError::invalid(
                file,
                format!("runs[{i}].id"),
                "missing value; expected a run id",
            ));
        }
        if !seen.insert(run.id.as_str()) {
            return Err(PlanError::invalid(
                file,
                format!("runs[{i}].id"),
                format!("run ids not unique; found duplicate: {}", run.id),
            ));
        }
        let counts = count_run(c, i, run, generated)?;
        if !tc.instances.contains(counts.total) {
            let field = match (generated, run.total_instances > 0) {
                (true, true) => "global.total_instances".to_owned(),
                (true, false) => "groups".to_owned(),
                (false, true) => format!("runs[{i}].total_instances"),
                (false, false) => format!("runs[{i}].groups"),
            };
            return Err(PlanError::invalid(
                file,
                field,
                format!(
                    "total instance count ({}) outside of allowable range [{}, {}] for test case {}",
                    counts.total, tc.instances.min, tc.instances.max, tc.name
                ),
            ));
        }
        counted.push(counts);
    }
    Ok((tc, counted))
}

/// Every test parameter set in the composition, with the field that sets it.
fn test_param_layers(c: &Composition) -> Vec<(String, &str, &str)> {
    let mut layers: Vec<(String, &BTreeMap<String, String>)> =
        vec![("global.run".to_owned(), &c.global.run.test_params)];
    for (i, g) in c.groups.iter().enumerate() {
        layers.push((format!("groups[{i}].run"), &g.run.test_params));
    }
    for (i, run) in c.runs.iter().enumerate() {
        layers.push((format!("runs[{i}]"), &run.test_params));
        for (j, rg) in run.groups.iter().enumerate() {
            layers.push((format!("runs[{i}].groups[{j}]"), &rg.test_params));
        }
    }
    layers
        .into_iter()
        .flat_map(|(owner, params)| {
            params.iter().map(move |(name, value)| {
                let field = format!(
                    "{owner}.test_params.{}",
                    format_path(&[Seg::Key(name.clone())])
                );
                (field, name.as_str(), value.as_str())
            })
        })
        .collect()
}

/// A declared test parameter's value must parse as its declared type. A parameter the test
/// case does not declare is an error for `--test-param` (a typo the user can fix at once) and
/// only a warning in a composition file ([`undeclared_test_params`]), which the original accepts
/// and existing compositions rely on. Errors of a `single` command name `--test-param`, not the
/// synthetic composition's fields the user never wrote.
fn check_test_params(c: &Composition, tc: &TestCase) -> Result<(), PlanError> {
    let file = file_of(c);
    let synthetic = file == SYNTHETIC_ORIGIN;
    for (field, name, value) in test_param_layers(c) {
        if !synthetic && !tc.params.contains_key(name) {
            continue;
        }
        let Some(message) = crate::params::problem(tc, name, value) else {
            continue;
        };
        return Err(if synthetic {
            PlanError::Param {
                flag: "--test-param".to_owned(),
                message,
            }
        } else {
            PlanError::invalid(file, field, message)
        });
    }
    Ok(())
}

/// One warning per test parameter the composition sets that its test case does not declare,
/// naming the file, the field and the declared parameters. Empty when the case is unknown
/// ([`validate_for_run`] reports that).
pub fn undeclared_test_params(c: &Composition, m: &Manifest) -> Vec<String> {
    let Some(tc) = m.testcase(&c.global.case) else {
        return Vec::new();
    };
    let file = file_of(c);
    test_param_layers(c)
        .into_iter()
        .filter(|(_, name, _)| !tc.params.contains_key(*name))
        .filter_map(|(field, name, value)| {
            crate::params::problem(tc, name, value).map(|m| format!("{file}: {field}: {m}"))
        })
        .collect()
}

/// Resolves each run-group to its group and instance count, and checks the run's total.
fn count_run(
    c: &Composition,
    i: usize,
    run: &Run,
    generated: bool,
) -> Result<CountedRun, PlanError> {
    let file = file_of(c);
    let run_path = format!("runs[{i}]");
    if run.groups.is_empty() {
        return Err(PlanError::invalid(
            file,
            format!("{run_path}.groups"),
            "expected at least one [[runs.groups]] entry",
        ));
    }
    let total_field = if generated {
        "global.total_instances".to_owned()
    } else {
        format!("{run_path}.total_instances")
    };
    let mut seen = HashSet::new();
    let mut groups = Vec::with_capacity(run.groups.len());
    let mut sum: u64 = 0;
    for (j, rg) in run.groups.iter().enumerate() {
        let rg_path = format!("{run_path}.groups[{j}]");
        if rg.id.trim().is_empty() {
            return Err(PlanError::invalid(
                file,
                format!("{rg_path}.id"),
                "missing value; expected a run group id",
            ));
        }
        if !seen.insert(rg.id.as_str()) {
            return Err(PlanError::invalid(
                file,
                format!("{rg_path}.id"),
                format!(
                    "run group ids not unique within run '{}'; found duplicate: {}",
                    run.id, rg.id
                ),
            ));
        }
        let gid = rg.effective_group_id();
        let Some(k) = c.groups.iter().position(|g| g.id == gid) else {
            return Err(PlanError::invalid(
                file,
                format!("{rg_path}.group_id"),
                format!("run group '{}' references unknown group '{gid}'", rg.id),
            ));
        };
        let group_field = format!("groups[{k}].instances");
        let (instances, field) = if !rg.instances.is_empty() {
            (rg.instances, format!("{rg_path}.instances"))
        } else if generated {
            (c.groups[k].instances, group_field)
        } else {
            // Name the run-group: that is where the user is looking, and where either may be set.
            let inherited = c.groups[k].instances;
            let field = if inherited.is_empty() {
                format!("{rg_path}.instances")
            } else {
                group_field
            };
            (inherited, field)
        };
        let n = count_instances(file, &field, instances, run.total_instances, &total_field)?;
        sum += u64::from(n);
        groups.push((k, n));
    }
    if run.total_instances > 0 && sum != u64::from(run.total_instances) {
        return Err(PlanError::invalid(
            file,
            total_field,
            format!(
                "total instances mismatch: computed: {sum} != configured: {}",
                run.total_instances
            ),
        ));
    }
    let total = u32::try_from(sum).map_err(|_| {
        PlanError::invalid(
            file,
            format!("{run_path}.groups"),
            format!("total instance count ({sum}) is too large"),
        )
    })?;
    Ok(CountedRun { groups, total })
}

fn count_instances(
    file: &str,
    field: &str,
    instances: Instances,
    total: u32,
    total_field: &str,
) -> Result<u32, PlanError> {
    let err = |message: String| PlanError::invalid(file, field, message);
    match (instances.count > 0, instances.percentage != 0.0) {
        (true, true) => Err(err(
            "expected exactly one of count or percentage, found both".to_owned(),
        )),
        (false, false) => Err(err(
            "expected exactly one of count or percentage, found neither".to_owned(),
        )),
        (true, false) => Ok(instances.count),
        (false, true) => {
            let p = instances.percentage;
            if !(p > 0.0 && p <= 1.0) {
                return Err(err(format!(
                    "percentage must be greater than 0 and at most 1, found {p}"
                )));
            }
            if total == 0 {
                return Err(err(format!(
                    "groups count percentage requires a total_instance configuration (set {total_field})"
                )));
            }
            // Rounds half away from zero, as Go's math.Round does.
            let n = (p * f64::from(total)).round() as u32;
            if n == 0 {
                return Err(err(format!(
                    "percentage {p} of {total} instances gives zero instances"
                )));
            }
            Ok(n)
        }
    }
}
