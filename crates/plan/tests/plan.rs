//! Loading, validating and resolving manifests and compositions through the public API.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{Value, json};
use tg_api::composition::{Composition, Dependency};
use tg_api::manifest::Manifest;
use tg_plan::{
    Map, PlanError, SingleSpec, load_composition, load_manifest, parse_composition, parse_manifest,
    resolve_builds, resolve_run, single_composition, to_toml, undeclared_test_params,
    validate_for_build, validate_for_run,
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn no_env() -> HashMap<String, String> {
    HashMap::new()
}

fn manifest(text: &str) -> Manifest {
    parse_manifest(text, Path::new("plans/net/manifest.toml")).expect("test manifest parses")
}

fn composition(text: &str) -> Composition {
    parse_composition(text, Path::new("comp.toml"), &no_env()).expect("test composition parses")
}

fn map(v: Value) -> Map {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A manifest that supports what the validation and precedence tests use.
const MANIFEST: &str = r#"
name = "suite/net"

[builders."exec:go"]
enabled = true
level = "manifest"
from_manifest = 1
[builders."docker:go"]
enabled = true

[runners."local:exec"]
enabled = true
level = "manifest"
from_manifest = 1

[[testcases]]
name = "ping/pong"
instances = { min = 1, max = 10 }
  [testcases.params]
  p = { type = "string", default = "manifest" }
  n = { type = "int", default = 5 }
  nodefault = { type = "int" }
"#;

/// A composition that is valid for build and run against `MANIFEST`.
const VALID: &str = r#"
[global]
plan = "net"
case = "ping/pong"
builder = "exec:go"
runner = "local:exec"

[[groups]]
id = "a"
instances = { count = 2 }

[[groups]]
id = "b"
instances = { count = 1 }
"#;

// ---------------------------------------------------------------- the reference examples

#[test]
fn manifest_example_parses() {
    let m = load_manifest(&Path::new(FIXTURES).join("manifest.toml")).unwrap();
    assert_eq!(m.name, "network");
    assert_eq!(
        m.supported_builders(),
        vec!["docker:generic", "docker:go", "exec:go"]
    );
    assert_eq!(
        m.supported_runners(),
        vec!["cluster:k8s", "local:docker", "local:exec"]
    );
    assert_eq!(m.defaults.builder, "exec:go");
    assert_eq!(m.defaults.runner, "local:exec");
    assert_eq!(m.extra_sources["docker_go"], vec!["../shared".to_owned()]);
    let docker_go = &m.builders["docker:go"];
    assert_eq!(docker_go["enabled"], json!(true));
    assert_eq!(docker_go["build_base_image"], json!("golang:1.16-buster"));
    assert_eq!(
        docker_go["dockerfile_extensions"]["pre_build"],
        json!("RUN echo 'at pre_build'")
    );
    assert_eq!(
        m.runners["local:docker"]["exposed_ports"]["CHROME_DEBUG"],
        json!("5321")
    );

    assert_eq!(m.testcases.len(), 2);
    let pp = m.testcase("ping-pong").unwrap();
    assert_eq!(
        (pp.instances.min, pp.instances.max, pp.instances.default),
        (2, 2, Some(2))
    );
    let storm = m.testcase("storm").unwrap();
    assert_eq!((storm.instances.min, storm.instances.max), (1, 100000));
    let p = &storm.params;
    assert_eq!(p["conn_count"].kind, "int");
    assert_eq!(p["conn_count"].desc, "number of TCP sockets to open");
    assert_eq!(p["conn_delay_ms"].unit, "ms");
    assert_eq!(p["conn_count"].default_as_string(), "5");
    assert_eq!(p["conn_delay_ms"].default_as_string(), "30000");
    assert_eq!(p["word"].default_as_string(), "never");
    assert_eq!(p["feature"].default_as_string(), "false");
    assert_eq!(p["some_param"].default, None);
    assert_eq!(p["some_param"].default_as_string(), "null");
    assert_eq!(
        m.origin,
        Path::new(FIXTURES)
            .join("manifest.toml")
            .display()
            .to_string()
    );
}

#[test]
fn composition_example_parses() {
    let c = load_composition(&Path::new(FIXTURES).join("composition.toml"), &no_env()).unwrap();
    assert_eq!(c.metadata.name, "quickstart");
    assert_eq!(c.metadata.author, "me");
    let g = &c.global;
    assert_eq!(
        (
            g.plan.as_str(),
            g.case.as_str(),
            g.builder.as_str(),
            g.runner.as_str()
        ),
        ("network", "ping-pong", "docker:go", "local:docker")
    );
    assert_eq!((g.total_instances, g.concurrent_builds), (4, 2));
    assert!(!g.disable_metrics);
    assert_eq!(g.build_config["go_proxy_mode"], json!("direct"));
    assert_eq!(g.build.selectors, vec!["foo".to_owned()]);
    assert_eq!(
        g.build.dependencies,
        vec![Dependency {
            module: "github.com/libp2p/go-libp2p".into(),
            target: String::new(),
            version: "v0.20.0".into()
        }]
    );
    assert_eq!(g.run_config["keep_containers"], json!(false));
    assert_eq!(g.run.test_params, params(&[("latency_ms", "100")]));
    assert_eq!(
        g.run.profiles,
        params(&[("cpu", "true"), ("heap", "5s"), ("allocs", "10s")])
    );

    assert_eq!(c.groups.len(), 2);
    let v1 = &c.groups[0];
    assert_eq!(v1.id, "v1");
    assert_eq!(v1.instances.count, 2);
    assert_eq!(
        (v1.resources.memory.as_str(), v1.resources.cpu.as_str()),
        ("256Mi", "0.5")
    );
    assert_eq!(v1.build_config["path"], json!("go/"));
    assert_eq!(v1.build.dependencies[0].target, "github.com/fork/go-libp2p");
    assert_eq!(v1.run.artifact, "");
    assert_eq!(v1.run.test_params, params(&[("role", "listener")]));
    let generic = &c.groups[1];
    assert_eq!(
        generic.build_config["build_args"]["image"],
        json!("golang:1.16-buster")
    );

    assert_eq!(c.runs.len(), 1);
    let run = &c.runs[0];
    assert_eq!((run.id.as_str(), run.total_instances), ("run_a", 3));
    assert_eq!(run.test_params, params(&[("expected", "go")]));
    let rgs: Vec<_> = run
        .groups
        .iter()
        .map(|g| (g.id.as_str(), g.group_id.as_str(), g.instances.count))
        .collect();
    assert_eq!(rgs, vec![("a", "v1", 2), ("generic", "generic", 1)]);
    assert_eq!(
        run.groups[1].test_params,
        params(&[("expected", "generic")])
    );
}

#[test]
fn composition_example_builds_against_manifest_example() {
    let m = load_manifest(&Path::new(FIXTURES).join("manifest.toml")).unwrap();
    let c = load_composition(&Path::new(FIXTURES).join("composition.toml"), &no_env()).unwrap();
    validate_for_build(&c, &m).unwrap();
    let builds = resolve_builds(&c, &m, &BTreeMap::new()).unwrap();
    assert_eq!(builds.len(), 2);
    let v1 = &builds[0];
    assert_eq!(
        (v1.group_index, v1.group_id.as_str(), v1.builder.as_str()),
        (0, "v1", "docker:go")
    );
    assert_eq!(v1.config["path"], json!("go/"));
    assert_eq!(v1.config["go_proxy_mode"], json!("direct"));
    assert_eq!(v1.config["build_base_image"], json!("golang:1.16-buster"));
    assert_eq!(v1.selectors, vec!["foo".to_owned()]);
    // The group's own override of the module wins over the global one.
    assert_eq!(v1.dependencies.len(), 1);
    assert_eq!(v1.dependencies[0].version, "v0.21.0");
    let generic = &builds[1];
    assert_eq!(generic.builder, "docker:generic");
    assert_eq!(
        generic.config["build_args"]["image"],
        json!("golang:1.16-buster")
    );
    assert_eq!(generic.dependencies[0].version, "v0.20.0");
    assert_ne!(v1.key, generic.key);

    // ping-pong allows exactly 2 instances and run_a has 3.
    let e = validate_for_run(&c, &m).unwrap_err();
    assert!(
        e.to_string().ends_with(
            "composition.toml: runs[0].total_instances: total instance count (3) outside of allowable range [2, 2] for test case ping-pong"
        ),
        "{e}"
    );
}

#[test]
fn composition_example_resolves_its_run() {
    let text = std::fs::read_to_string(Path::new(FIXTURES).join("manifest.toml")).unwrap();
    let m = manifest(&text.replace("min = 2, max = 2", "min = 2, max = 10"));
    let c = load_composition(&Path::new(FIXTURES).join("composition.toml"), &no_env()).unwrap();
    let run = resolve_run(&c, &m, "run_a", &BTreeMap::new()).unwrap();
    assert_eq!(run.run_id, "run_a");
    assert_eq!(
        (run.plan.as_str(), run.case.as_str(), run.runner.as_str()),
        ("network", "ping-pong", "local:docker")
    );
    assert_eq!(run.total_instances, 3);
    assert_eq!(run.run_config["keep_containers"], json!(false));
    assert_eq!(run.run_config["enabled"], json!(true));
    let a = &run.groups[0];
    assert_eq!(
        (
            a.id.as_str(),
            a.group_id.as_str(),
            a.group_index,
            a.instances
        ),
        ("a", "v1", 0, 2)
    );
    assert_eq!(
        a.test_params,
        params(&[
            ("latency_ms", "100"),
            ("role", "listener"),
            ("expected", "go")
        ])
    );
    assert_eq!(a.profiles["heap"], "5s");
    let g = &run.groups[1];
    assert_eq!(
        (g.id.as_str(), g.group_index, g.instances),
        ("generic", 1, 1)
    );
    assert_eq!(g.test_params["expected"], "generic");

    let e = resolve_run(&c, &m, "nope", &BTreeMap::new()).unwrap_err();
    assert!(
        e.to_string()
            .ends_with("runs: run 'nope' not found; available: [run_a]"),
        "{e}"
    );
}

// ---------------------------------------------------------------- validation rules

#[derive(Clone, Copy, PartialEq)]
enum Stage {
    Build,
    Run,
}

/// Each case: a name, an edit of `VALID` (or a full composition), an edit of `MANIFEST`, the
/// stage that must fail, and the exact message.
struct Case {
    name: &'static str,
    composition: String,
    manifest: String,
    stage: Stage,
    want: &'static str,
}

fn case(name: &'static str, composition: &str, stage: Stage, want: &'static str) -> Case {
    Case {
        name,
        composition: composition.to_owned(),
        manifest: MANIFEST.to_owned(),
        stage,
        want,
    }
}

fn edit(from: &str, to: &str) -> String {
    assert!(VALID.contains(from), "VALID lacks {from:?}");
    VALID.replacen(from, to, 1)
}

#[test]
fn every_validation_rule_names_file_and_field() {
    let cases = vec![
        case(
            "missing plan",
            &edit("plan = \"net\"", ""),
            Stage::Build,
            "comp.toml: global.plan: missing value; expected the test plan name",
        ),
        case(
            "no groups",
            "[global]\nplan = \"net\"\nbuilder = \"exec:go\"\n",
            Stage::Build,
            "comp.toml: groups: expected at least one [[groups]] entry",
        ),
        case(
            "duplicate group ids",
            &edit("id = \"b\"", "id = \"a\""),
            Stage::Build,
            "comp.toml: groups[1].id: group ids not unique; found duplicate: a",
        ),
        case(
            "group without builder",
            &edit("builder = \"exec:go\"", ""),
            Stage::Build,
            "comp.toml: groups[0].builder: group a is missing a builder",
        ),
        case(
            "unsupported group builder",
            &edit("id = \"b\"", "id = \"b\"\nbuilder = \"docker:rust\""),
            Stage::Build,
            "comp.toml: groups[1].builder: plan does not support builder 'docker:rust'; supported: [docker:go exec:go]",
        ),
        case(
            "unsupported global builder",
            &edit("builder = \"exec:go\"", "builder = \"exec:rust\""),
            Stage::Build,
            "comp.toml: global.builder: plan does not support builder 'exec:rust'; supported: [docker:go exec:go]",
        ),
        case(
            "dependency without version",
            &edit(
                "id = \"a\"",
                "id = \"a\"\nbuild = { dependencies = [ { module = \"m\" } ] }",
            ),
            Stage::Build,
            "comp.toml: groups[0].build.dependencies[0].version: missing value; expected the dependency's version",
        ),
        case(
            "missing case",
            &edit("case = \"ping/pong\"", ""),
            Stage::Run,
            "comp.toml: global.case: missing value; expected the test case name",
        ),
        case(
            "missing runner",
            &edit("runner = \"local:exec\"", ""),
            Stage::Run,
            "comp.toml: global.runner: missing value; expected the runner",
        ),
        case(
            "unknown test case",
            &edit("case = \"ping/pong\"", "case = \"storm\""),
            Stage::Run,
            "comp.toml: global.case: test case storm not found in plan suite/net; its test cases: [ping/pong]",
        ),
        case(
            "unsupported runner",
            &edit("runner = \"local:exec\"", "runner = \"local:docker\""),
            Stage::Run,
            "comp.toml: global.runner: plan does not support runner 'local:docker'; supported: [local:exec]",
        ),
        case(
            "instance count outside range",
            &edit("count = 1", "count = 9"),
            Stage::Run,
            "comp.toml: groups: total instance count (11) outside of allowable range [1, 10] for test case ping/pong",
        ),
        case(
            "instance count outside range with global total",
            &edit(
                "runner = \"local:exec\"",
                "runner = \"local:exec\"\ntotal_instances = 11",
            )
            .replace("count = 1", "count = 9"),
            Stage::Run,
            "comp.toml: global.total_instances: total instance count (11) outside of allowable range [1, 10] for test case ping/pong",
        ),
        case(
            "count and percentage both set",
            &edit("count = 1", "count = 1, percentage = 0.5"),
            Stage::Run,
            "comp.toml: groups[1].instances: expected exactly one of count or percentage, found both",
        ),
        case(
            "neither count nor percentage",
            &edit("instances = { count = 1 }", ""),
            Stage::Run,
            "comp.toml: groups[1].instances: expected exactly one of count or percentage, found neither",
        ),
        case(
            "percentage without total",
            &edit("count = 1", "percentage = 0.5"),
            Stage::Run,
            "comp.toml: groups[1].instances: groups count percentage requires a total_instance configuration (set global.total_instances)",
        ),
        case(
            "percentage out of range",
            &edit("count = 1", "percentage = 1.5"),
            Stage::Run,
            "comp.toml: groups[1].instances: percentage must be greater than 0 and at most 1, found 1.5",
        ),
        case(
            "percentage rounding to zero instances",
            &edit(
                "runner = \"local:exec\"",
                "runner = \"local:exec\"\ntotal_instances = 3",
            )
            .replace("count = 1", "percentage = 0.1"),
            Stage::Run,
            "comp.toml: groups[1].instances: percentage 0.1 of 3 instances gives zero instances",
        ),
        case(
            "global total mismatch",
            &edit(
                "runner = \"local:exec\"",
                "runner = \"local:exec\"\ntotal_instances = 4",
            ),
            Stage::Run,
            "comp.toml: global.total_instances: total instances mismatch: computed: 3 != configured: 4",
        ),
        case(
            "run total mismatch",
            &format!(
                "{VALID}\n[[runs]]\nid = \"r\"\ntotal_instances = 5\n[[runs.groups]]\nid = \"a\"\n"
            ),
            Stage::Run,
            "comp.toml: runs[0].total_instances: total instances mismatch: computed: 2 != configured: 5",
        ),
        case(
            "duplicate run ids",
            &format!(
                "{VALID}\n[[runs]]\nid = \"r\"\n[[runs.groups]]\nid = \"a\"\n[[runs]]\nid = \"r\"\n[[runs.groups]]\nid = \"b\"\n"
            ),
            Stage::Run,
            "comp.toml: runs[1].id: run ids not unique; found duplicate: r",
        ),
        case(
            "duplicate run-group ids",
            &format!(
                "{VALID}\n[[runs]]\nid = \"r\"\n[[runs.groups]]\nid = \"a\"\n[[runs.groups]]\nid = \"a\"\n"
            ),
            Stage::Run,
            "comp.toml: runs[0].groups[1].id: run group ids not unique within run 'r'; found duplicate: a",
        ),
        case(
            "run-group referencing unknown group",
            &format!(
                "{VALID}\n[[runs]]\nid = \"r\"\n[[runs.groups]]\nid = \"x\"\ngroup_id = \"zz\"\n"
            ),
            Stage::Run,
            "comp.toml: runs[0].groups[0].group_id: run group 'x' references unknown group 'zz'",
        ),
        case(
            "run without run-groups",
            &format!("{VALID}\n[[runs]]\nid = \"r\"\n"),
            Stage::Run,
            "comp.toml: runs[0].groups: expected at least one [[runs.groups]] entry",
        ),
        case(
            "run-group percentage without run total",
            &format!(
                "{VALID}\n[[runs]]\nid = \"r\"\n[[runs.groups]]\nid = \"a\"\ninstances = {{ percentage = 0.5 }}\n"
            ),
            Stage::Run,
            "comp.toml: runs[0].groups[0].instances: groups count percentage requires a total_instance configuration (set runs[0].total_instances)",
        ),
        Case {
            name: "manifest without builders",
            composition: VALID.to_owned(),
            manifest: "name = \"n\"\n".to_owned(),
            stage: Stage::Build,
            want: "plans/net/manifest.toml: builders: plan supports no builders; review the manifest",
        },
        Case {
            name: "manifest without runners",
            composition: VALID.to_owned(),
            manifest: MANIFEST
                .replace("[runners.\"local:exec\"]", "[extra]")
                .to_owned(),
            stage: Stage::Run,
            want: "plans/net/manifest.toml: runners: plan supports no runners; review the manifest",
        },
    ];

    for c in cases {
        let m = manifest(&c.manifest);
        let comp = composition(&c.composition);
        let build = validate_for_build(&comp, &m);
        let run = validate_for_run(&comp, &m);
        let err = match c.stage {
            Stage::Build => {
                assert!(
                    run.is_err(),
                    "{}: run validation must include build rules",
                    c.name
                );
                build.expect_err(c.name)
            }
            Stage::Run => {
                assert!(
                    build.is_ok(),
                    "{}: build must not check run rules: {build:?}",
                    c.name
                );
                run.expect_err(c.name)
            }
        };
        assert_eq!(err.to_string(), c.want, "case {}", c.name);
        assert!(!err.to_string().contains('\n'), "case {}", c.name);
        let resolved = resolve_run(&comp, &m, "default", &BTreeMap::new());
        assert!(resolved.is_err(), "{}: resolve_run must validate", c.name);
    }
}

#[test]
fn valid_composition_passes_and_allows_undeclared_test_params() {
    let m = manifest(MANIFEST);
    let c = composition(&edit(
        "id = \"b\"",
        "id = \"b\"\nrun = { test_params = { undeclared = \"x\" } }",
    ));
    validate_for_build(&c, &m).unwrap();
    validate_for_run(&c, &m).unwrap();
    let run = resolve_run(&c, &m, "default", &BTreeMap::new()).unwrap();
    assert_eq!(run.groups[1].test_params["undeclared"], "x");
}

#[test]
fn build_validation_ignores_run_only_fields() {
    let m = manifest(MANIFEST);
    let c = composition(
        "[global]\nplan = \"net\"\nbuilder = \"exec:go\"\n[[groups]]\nid = \"a\"\ninstances = { percentage = 0.5 }\n",
    );
    validate_for_build(&c, &m).unwrap();
    assert_eq!(resolve_builds(&c, &m, &BTreeMap::new()).unwrap().len(), 1);
    assert!(validate_for_run(&c, &m).is_err());
}

#[test]
fn manifest_rules_name_the_manifest_file_and_field() {
    let cases = [
        (
            "[[testcases]]\nname = \"t\"\n",
            "plans/net/manifest.toml: name: missing value; expected the plan name",
        ),
        (
            "name = \"n\"\n[[testcases]]\nname = \"t\"\ninstances = { min = 5, max = 2 }\n",
            "plans/net/manifest.toml: testcases[0].instances: min (5) is greater than max (2)",
        ),
        (
            "name = \"n\"\n[[testcases]]\nname = \"t\"\n[[testcases]]\nname = \"t\"\n",
            "plans/net/manifest.toml: testcases[1].name: duplicate test case 't'",
        ),
        (
            "name = \"n\"\n[[testcases]]\nname = \"t\"\ninstances = { min = \"two\", max = 2 }\n",
            "plans/net/manifest.toml: line 4, column 21: testcases[0].instances.min: invalid type: string \"two\", expected a non-negative integer",
        ),
        (
            "name = \"n\"\n[builders]\n\"exec:go\" = 3\n",
            "plans/net/manifest.toml: line 3, column 13: builders.\"exec:go\": invalid type: integer `3`, expected a map",
        ),
    ];
    for (text, want) in cases {
        let e = parse_manifest(text, Path::new("plans/net/manifest.toml")).unwrap_err();
        assert_eq!(e.to_string(), want);
    }
}

#[test]
fn manifests_accept_unknown_keys() {
    let m = manifest(
        "name = \"n\"\nenabled = true\n[whatever]\nx = 1\n[[testcases]]\nname = \"t\"\nbogus = 1\ninstances = { min = 1, max = 2, default = 1, extra = 3 }\n",
    );
    assert_eq!(m.testcases[0].instances.max, 2);
}

#[test]
fn testcase_without_instances_allows_zero_only() {
    let m = manifest(
        "name = \"n\"\n[builders.\"exec:go\"]\n[runners.\"local:exec\"]\n[[testcases]]\nname = \"t\"\n",
    );
    let c = composition(
        "[global]\nplan = \"n\"\ncase = \"t\"\nbuilder = \"exec:go\"\nrunner = \"local:exec\"\n[[groups]]\nid = \"a\"\ninstances = { count = 1 }\n",
    );
    let e = validate_for_run(&c, &m).unwrap_err();
    assert!(
        e.to_string()
            .ends_with("outside of allowable range [0, 0] for test case t"),
        "{e}"
    );
}

// ---------------------------------------------------------------- malformed files

#[test]
fn compositions_reject_unknown_fields_with_their_path() {
    for (text, want) in [
        (
            edit("id = \"a\"", "id = \"a\"\nbogus = 1"),
            "comp.toml: groups[0].bogus: unknown field",
        ),
        (
            edit("plan = \"net\"", "plan = \"net\"\nrunners = \"x\""),
            "comp.toml: global.runners: unknown field",
        ),
        (
            format!(
                "{VALID}\n[[runs]]\nid = \"r\"\n[[runs.groups]]\nid = \"a\"\ninstance = {{ count = 1 }}\n"
            ),
            "comp.toml: runs[0].groups[0].instance: unknown field",
        ),
    ] {
        let e = parse_composition(&text, Path::new("comp.toml"), &no_env()).unwrap_err();
        assert_eq!(e.to_string(), want);
        assert_eq!(e.file(), Some("comp.toml"));
    }
}

#[test]
fn malformed_and_mistyped_compositions_give_line_and_column() {
    let e = parse_composition(
        "[global]\nplan = \"p\"\n[[groups]]\nid = \"a\"\ninstances = { count = -1 }\n",
        Path::new("comp.toml"),
        &no_env(),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with(
            "comp.toml: line 5, column 23: groups[0].instances.count: invalid value: integer `-1`"
        ),
        "{msg}"
    );
    assert_eq!(e.field(), Some("groups[0].instances.count"));

    let e = parse_composition(
        "[global]\nplan = \"p\"\n[global.run]\ntest_params = { n = 5 }\n",
        Path::new("comp.toml"),
        &no_env(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("comp.toml: line 4, column 21: global.run.test_params.n: invalid type: integer `5`, expected a string"),
        "{e}"
    );

    let e =
        parse_composition("[global\nplan = 1\n", Path::new("comp.toml"), &no_env()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("comp.toml: line 1, column "), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
}

#[test]
fn unreadable_files_name_the_path() {
    let e = load_manifest(Path::new("/nonexistent/plans/x/manifest.toml")).unwrap_err();
    assert!(matches!(e, PlanError::Read { .. }));
    assert!(
        e.to_string()
            .starts_with("/nonexistent/plans/x/manifest.toml: cannot read file: "),
        "{e}"
    );
}

// ---------------------------------------------------------------- precedence

#[test]
fn build_config_precedence_env_manifest_global_group() {
    let m = manifest(MANIFEST);
    let env = BTreeMap::from([(
        "exec:go".to_owned(),
        map(json!({"level": "env", "from_env": 1, "other_builder_key": 1})),
    )]);
    let mut text = edit(
        "runner = \"local:exec\"",
        "runner = \"local:exec\"\nbuild_config = { level = \"global\", from_global = 1 }",
    );
    text = text.replacen(
        "id = \"a\"",
        "id = \"a\"\nbuild_config = { level = \"group\", from_group = 1 }",
        1,
    );
    let c = composition(&text);
    let builds = resolve_builds(&c, &m, &env).unwrap();
    assert_eq!(builds[0].config["level"], json!("group"));
    assert_eq!(builds[1].config["level"], json!("global"));
    for key in ["from_env", "from_manifest", "from_global"] {
        assert_eq!(builds[0].config[key], json!(1), "{key}");
        assert_eq!(builds[1].config[key], json!(1), "{key}");
    }
    assert_eq!(builds[0].config["from_group"], json!(1));
    assert!(!builds[1].config.contains_key("from_group"));
    assert_ne!(builds[0].key, builds[1].key);

    // Without the composition layers, the manifest beats .env.toml (as in the original's code).
    let c = composition(VALID);
    let builds = resolve_builds(&c, &m, &env).unwrap();
    assert_eq!(builds[0].config["level"], json!("manifest"));
    assert_eq!(builds[0].key, builds[1].key, "identical groups build once");
}

#[test]
fn selectors_and_dependencies_trickle_from_global() {
    let m = manifest(MANIFEST);
    let text = format!(
        "{}\n[global.build]\nselectors = [\"g\"]\ndependencies = [ {{ module = \"m1\", version = \"g1\" }}, {{ module = \"m2\", version = \"g2\" }} ]\n",
        VALID.replacen(
            "id = \"a\"",
            "id = \"a\"\nbuild = { selectors = [\"own\"], dependencies = [ { module = \"m1\", target = \"fork\", version = \"own1\" } ] }",
            1
        )
    );
    let c = composition(&text);
    let builds = resolve_builds(&c, &m, &BTreeMap::new()).unwrap();
    assert_eq!(builds[0].selectors, vec!["own".to_owned()]);
    assert_eq!(builds[1].selectors, vec!["g".to_owned()]);
    let deps = |i: usize| -> Vec<(String, String)> {
        builds[i]
            .dependencies
            .iter()
            .map(|d| (d.module.clone(), d.version.clone()))
            .collect()
    };
    assert_eq!(
        deps(0),
        vec![("m1".into(), "own1".into()), ("m2".into(), "g2".into())]
    );
    assert_eq!(
        deps(1),
        vec![("m1".into(), "g1".into()), ("m2".into(), "g2".into())]
    );
}

#[test]
fn run_config_precedence_env_manifest_global() {
    let m = manifest(MANIFEST);
    let env = BTreeMap::from([(
        "local:exec".to_owned(),
        map(json!({"level": "env", "from_env": 1})),
    )]);
    let c = composition(VALID);
    let run = resolve_run(&c, &m, "default", &env).unwrap();
    assert_eq!(run.run_config["level"], json!("manifest"));
    assert_eq!(run.run_config["from_env"], json!(1));
    assert_eq!(run.run_config["from_manifest"], json!(1));

    let c = composition(&edit(
        "runner = \"local:exec\"",
        "runner = \"local:exec\"\nrun_config = { level = \"global\" }",
    ));
    let run = resolve_run(&c, &m, "default", &env).unwrap();
    assert_eq!(run.run_config["level"], json!("global"));
    assert_eq!(run.run_config["from_env"], json!(1));
}

#[test]
fn test_params_precedence_has_five_levels() {
    let m = manifest(MANIFEST);
    // Key kN is set at levels 1..=N; level N must win for it.
    let text = r#"
[global]
plan = "net"
case = "ping/pong"
builder = "exec:go"
runner = "local:exec"
[global.run]
test_params = { p = "global", k2 = "global", k3 = "global", k4 = "global", k5 = "global" }
profiles = { cpu = "global", heap = "global", allocs = "global" }

[[groups]]
id = "a"
instances = { count = 1 }
[groups.run]
test_params = { k3 = "group", k4 = "group", k5 = "group" }
profiles = { heap = "group", allocs = "group" }

[[runs]]
id = "r"
test_params = { k4 = "run", k5 = "run" }
[[runs.groups]]
id = "x"
group_id = "a"
test_params = { k5 = "run-group" }
profiles = { allocs = "run-group" }
"#;
    let c = composition(text);
    let run = resolve_run(&c, &m, "r", &BTreeMap::new()).unwrap();
    let g = &run.groups[0];
    assert_eq!(g.id, "x");
    assert_eq!(g.group_id, "a");
    assert_eq!(
        g.test_params,
        params(&[
            ("p", "global"),
            ("n", "5"),
            ("nodefault", "null"),
            ("k2", "global"),
            ("k3", "group"),
            ("k4", "run"),
            ("k5", "run-group"),
        ])
    );
    assert_eq!(
        g.profiles,
        params(&[
            ("cpu", "global"),
            ("heap", "group"),
            ("allocs", "run-group")
        ])
    );
    assert_eq!(
        (run.plan.as_str(), run.case.as_str()),
        ("suite-net", "ping-pong")
    );
}

#[test]
fn run_group_instances_and_artifacts() {
    let m = manifest(MANIFEST);
    let text = format!(
        "{}\n[global.run]\nartifact = \"global-art\"\n[[runs]]\nid = \"r\"\n[[runs.groups]]\nid = \"a\"\ninstances = {{ count = 4 }}\n[[runs.groups]]\nid = \"b\"\n",
        VALID.replacen(
            "id = \"b\"",
            "id = \"b\"\nrun = { artifact = \"b-art\" }",
            1
        )
    );
    let c = composition(&text);
    let run = resolve_run(&c, &m, "r", &BTreeMap::new()).unwrap();
    let got: Vec<_> = run
        .groups
        .iter()
        .map(|g| (g.id.as_str(), g.instances, g.artifact.as_str()))
        .collect();
    assert_eq!(got, vec![("a", 4, "global-art"), ("b", 1, "b-art")]);
    assert_eq!(run.total_instances, 5);
}

// ---------------------------------------------------------------- percentages

#[test]
fn percentages_round_half_away_from_zero() {
    let m = manifest(MANIFEST);
    let cases: [(u32, f64, f64, (u32, u32)); 4] = [
        (4, 0.25, 0.75, (1, 3)),
        (10, 0.33, 0.67, (3, 7)),
        (8, 0.4375, 0.5625, (4, 5)), // 3.5 -> 4, 4.5 -> 5: 9 != 8
        (2, 0.25, 0.75, (1, 2)),     // 0.5 -> 1, 1.5 -> 2: 3 != 2
    ];
    for (total, pa, pb, (na, nb)) in cases {
        let text = format!(
            "[global]\nplan = \"net\"\ncase = \"ping/pong\"\nbuilder = \"exec:go\"\nrunner = \"local:exec\"\ntotal_instances = {total}\n[[groups]]\nid = \"a\"\ninstances = {{ percentage = {pa} }}\n[[groups]]\nid = \"b\"\ninstances = {{ percentage = {pb} }}\n"
        );
        let c = composition(&text);
        match resolve_run(&c, &m, "default", &BTreeMap::new()) {
            Ok(run) => {
                assert_eq!(na + nb, total);
                assert_eq!((run.groups[0].instances, run.groups[1].instances), (na, nb));
                assert_eq!(run.total_instances, total);
            }
            Err(e) => {
                assert_ne!(na + nb, total, "{e}");
                assert_eq!(
                    e.to_string(),
                    format!(
                        "comp.toml: global.total_instances: total instances mismatch: computed: {} != configured: {total}",
                        na + nb
                    )
                );
            }
        }
    }
}

// ---------------------------------------------------------------- templating

#[test]
fn compositions_are_rendered_with_env_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("composition.toml");
    std::fs::write(
        &path,
        "[global]\nplan = \"{{ .Env.PLAN }}\"\ntotal_instances = {{.Env.N}}\nbuilder = \"exec:go\"\n[[groups]]\nid = \"a\"\ninstances = { count = {{ .Env.N }} }\n",
    )
    .unwrap();
    let env = HashMap::from([
        ("PLAN".to_owned(), "net".to_owned()),
        ("N".to_owned(), "3".to_owned()),
    ]);
    let c = load_composition(&path, &env).unwrap();
    assert_eq!(c.global.plan, "net");
    assert_eq!(c.global.total_instances, 3);
    assert_eq!(c.groups[0].instances.count, 3);

    let e =
        load_composition(&path, &HashMap::from([("PLAN".to_owned(), "x".to_owned())])).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: line 3, column 19: environment variable 'N' used in template is not set",
            path.display()
        )
    );
}

// ---------------------------------------------------------------- single and -w

#[test]
fn single_composition_matches_the_original() {
    let m = manifest(MANIFEST);
    let spec = SingleSpec {
        plan: "net".into(),
        case: "ping/pong".into(),
        builder: "exec:go".into(),
        runner: "local:exec".into(),
        instances: 3,
        build_config: map(json!({"opt": true})),
        run_config: map(json!({"keep": 1})),
        test_params: params(&[("p", "flag")]),
        dependencies: vec![Dependency {
            module: "m".into(),
            target: String::new(),
            version: "v1".into(),
        }],
        artifact: "art".into(),
        disable_metrics: true,
    };
    let c = single_composition(spec);
    assert_eq!(c.groups.len(), 1);
    let g = &c.groups[0];
    assert_eq!((g.id.as_str(), g.instances.count), ("single", 3));
    assert_eq!(g.run.artifact, "art");
    assert_eq!(g.build.dependencies[0].module, "m");
    assert_eq!(c.global.total_instances, 3);
    assert!(c.global.disable_metrics);
    assert_eq!(c.runs.len(), 1);
    assert_eq!(c.runs[0].id, "default");
    assert_eq!(c.runs[0].groups[0].id, "single");

    validate_for_run(&c, &m).unwrap();
    let builds = resolve_builds(&c, &m, &BTreeMap::new()).unwrap();
    assert_eq!(builds[0].config["opt"], json!(true));
    assert_eq!(builds[0].config["from_manifest"], json!(1));
    let run = resolve_run(&c, &m, "default", &BTreeMap::new()).unwrap();
    assert_eq!(run.total_instances, 3);
    assert!(run.disable_metrics);
    assert_eq!(run.run_config["keep"], json!(1));
    let g = &run.groups[0];
    assert_eq!(
        (g.id.as_str(), g.instances, g.artifact.as_str()),
        ("single", 3, "art")
    );
    assert_eq!(g.test_params["p"], "flag");
    assert_eq!(g.test_params["n"], "5");

    let too_many = single_composition(SingleSpec {
        instances: 11,
        ..SingleSpec {
            plan: "net".into(),
            case: "ping/pong".into(),
            builder: "exec:go".into(),
            runner: "local:exec".into(),
            ..SingleSpec::default()
        }
    });
    let e = validate_for_run(&too_many, &m).unwrap_err();
    assert_eq!(
        e.to_string(),
        "synthetic composition: global.total_instances: total instance count (11) outside of allowable range [1, 10] for test case ping/pong"
    );
}

fn roundtrip(c: &Composition) -> Composition {
    let text = to_toml(c).unwrap();
    let mut back = parse_composition(&text, Path::new("written.toml"), &no_env())
        .unwrap_or_else(|e| panic!("{e}\n---\n{text}"));
    back.origin = c.origin.clone();
    back
}

#[test]
fn to_toml_round_trips() {
    let c = load_composition(&Path::new(FIXTURES).join("composition.toml"), &no_env()).unwrap();
    assert_eq!(roundtrip(&c), c);

    let mut single = single_composition(SingleSpec {
        plan: "net".into(),
        case: "ping/pong".into(),
        builder: "exec:go".into(),
        runner: "local:exec".into(),
        instances: 2,
        build_config: map(json!({"nested": {"a": [1, 2]}, "s": "x"})),
        ..SingleSpec::default()
    });
    single.groups[0].run.artifact = "built-artifact".into();
    let back = roundtrip(&single);
    assert_eq!(back, single);
    assert_eq!(back.groups[0].run.artifact, "built-artifact");

    // The generated default run is left implicit, as the user wrote it, and comes back on reading.
    let c = composition(VALID);
    let text = to_toml(&c).unwrap();
    assert!(!text.contains("[[runs]]"), "{text}");
    assert_eq!(roundtrip(&c), c);
}

#[test]
fn datetimes_in_config_become_strings() {
    let c = composition(&edit(
        "runner = \"local:exec\"",
        "runner = \"local:exec\"\nbuild_config = { since = 2024-01-02T03:04:05Z }",
    ));
    assert_eq!(
        c.global.build_config["since"],
        json!("2024-01-02T03:04:05Z")
    );
    let back = roundtrip(&c);
    assert_eq!(
        back.global.build_config["since"],
        json!("2024-01-02T03:04:05Z")
    );
}

// ---------------------------------------------------------------- test parameters and flags

fn single_spec(case: &str, instances: u32, tp: &[(&str, &str)]) -> SingleSpec {
    SingleSpec {
        plan: "net".into(),
        case: case.into(),
        builder: "exec:go".into(),
        runner: "local:exec".into(),
        instances,
        test_params: params(tp),
        ..SingleSpec::default()
    }
}

#[test]
fn test_param_flags_are_checked_against_the_declared_types() {
    let m = manifest(MANIFEST);
    let check = |tp: &[(&str, &str)]| {
        let c = single_composition(single_spec("ping/pong", 2, tp));
        let r = validate_for_run(&c, &m);
        // Resolving validates too: a daemon that receives the composition refuses it as well.
        assert_eq!(
            r.is_ok(),
            resolve_run(&c, &m, "default", &BTreeMap::new()).is_ok()
        );
        r.map_err(|e| e.to_string())
    };
    check(&[("n", "7"), ("p", "anything"), ("nodefault", "-3")]).unwrap();
    assert_eq!(
        check(&[("n", "forty-two")]).unwrap_err(),
        "--test-param: test parameter \"n\": expected an integer (type \"int\"), found \"forty-two\""
    );
    assert_eq!(
        check(&[("nn", "1")]).unwrap_err(),
        "--test-param: unknown test parameter \"nn\": test case ping/pong has parameters [n nodefault p]"
    );
}

#[test]
fn composition_test_params_of_the_wrong_type_name_the_field() {
    let m = manifest(MANIFEST);
    let c = composition(&edit(
        "id = \"b\"",
        "id = \"b\"\nrun = { test_params = { n = \"five\" } }",
    ));
    let e = validate_for_run(&c, &m).unwrap_err();
    assert_eq!(
        e.to_string(),
        "comp.toml: groups[1].run.test_params.n: test parameter \"n\": expected an integer (type \"int\"), found \"five\""
    );
    assert_eq!(e.field(), Some("groups[1].run.test_params.n"));
    // The run-group layer is checked too.
    let c = composition(&format!(
        "{}\n[[runs]]\nid = \"r\"\n[[runs.groups]]\nid = \"a\"\ntest_params = {{ n = \"1.5\" }}\n[[runs.groups]]\nid = \"b\"\n",
        VALID
    ));
    let e = validate_for_run(&c, &m).unwrap_err().to_string();
    assert!(
        e.starts_with("comp.toml: runs[0].groups[0].test_params.n: "),
        "{e}"
    );
}

#[test]
fn undeclared_composition_test_params_are_warnings_naming_the_field() {
    let m = manifest(MANIFEST);
    let c = composition(&edit(
        "id = \"b\"",
        "id = \"b\"\nrun = { test_params = { undeclared = \"x\", n = \"3\" } }",
    ));
    validate_for_run(&c, &m).unwrap();
    assert_eq!(
        undeclared_test_params(&c, &m),
        vec![
            "comp.toml: groups[1].run.test_params.undeclared: unknown test parameter \"undeclared\": test case ping/pong has parameters [n nodefault p]"
                .to_owned()
        ]
    );
    assert!(undeclared_test_params(&composition(VALID), &m).is_empty());
}

#[test]
fn zero_instances_and_unknown_cases_of_single_name_the_flag_and_the_choices() {
    let m = manifest(MANIFEST);
    let c = single_composition(single_spec("ping/pong", 0, &[]));
    assert_eq!(
        validate_for_run(&c, &m).unwrap_err().to_string(),
        "--instances: expected at least 1 instance; test case ping/pong allows from 1 to 10 instances"
    );
    let c = single_composition(single_spec("storm", 1, &[]));
    assert_eq!(
        validate_for_run(&c, &m).unwrap_err().to_string(),
        "--testcase: test case storm not found in plan suite/net; its test cases: [ping/pong]"
    );
}
