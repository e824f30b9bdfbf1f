//! `exec:rust`: `cargo build` in the plan directory with a persistent per-plan target directory
//! under the work dir, then a copy of the binary to the keyed artifact path.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokio::process::Command;

use crate::cache::{self, Kind};
use crate::config::Config;
use crate::process::{Stdout, Tools};
use crate::{Artifact, BuildError, BuildInput, BuildOutput, blocking};

#[derive(Deserialize)]
pub(crate) struct Metadata {
    packages: Vec<Package>,
}

#[derive(Deserialize)]
struct Package {
    name: String,
    targets: Vec<Target>,
}

#[derive(Deserialize)]
struct Target {
    name: String,
    kind: Vec<String>,
}

/// The `profile` key of `exec:rust` and `docker:rust` (default `release`).
pub(crate) fn parse_profile(cfg: &Config<'_>) -> Result<String, BuildError> {
    let profile = cfg
        .string("profile")?
        .unwrap_or_else(|| "release".to_owned());
    // Passed to cargo as one argument.
    if !profile
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(cfg.bad(
            "profile",
            "a cargo profile name such as \"release\" or \"dev\"",
        ));
    }
    Ok(profile)
}

/// Cargo puts the `dev` profile's output in `debug/`; every other profile uses its own name.
pub(crate) fn profile_dir(profile: &str) -> &str {
    match profile {
        "dev" | "test" => "debug",
        "bench" => "release",
        other => other,
    }
}

/// Picks the binary to build: the configured `bin`, or the only binary target there is.
/// Returns `(package, bin)`.
pub(crate) fn choose_bin(
    cfg: &Config<'_>,
    meta: &Metadata,
    wanted: Option<&str>,
) -> Result<(String, String), BuildError> {
    let bins: Vec<(&str, &str)> = meta
        .packages
        .iter()
        .flat_map(|p| {
            p.targets
                .iter()
                .filter(|t| t.kind.iter().any(|k| k == "bin"))
                .map(move |t| (p.name.as_str(), t.name.as_str()))
        })
        .collect();
    let names = || bins.iter().map(|(_, b)| *b).collect::<Vec<_>>().join(", ");
    let chosen = match wanted {
        Some(w) => bins
            .iter()
            .find(|(_, b)| *b == w)
            .ok_or_else(|| cfg.bad("bin", format!("one of the plan's binaries ({})", names())))?,
        None => match bins.as_slice() {
            [only] => only,
            [] => return Err(cfg.bad("bin", "a plan crate with a binary target (it has none)")),
            _ => {
                return Err(cfg.bad(
                    "bin",
                    format!("the binary to build, the plan has several ({})", names()),
                ));
            }
        },
    };
    Ok((chosen.0.to_owned(), chosen.1.to_owned()))
}

/// Dependency tables of a manifest whose entries may carry `path = "..."`.
fn dependency_tables(manifest: &toml::Table) -> Vec<&toml::Table> {
    fn push<'a>(tables: &mut Vec<&'a toml::Table>, t: Option<&'a toml::Value>) {
        if let Some(t) = t.and_then(toml::Value::as_table) {
            tables.push(t);
        }
    }
    let mut tables = Vec::new();
    push(&mut tables, manifest.get("dependencies"));
    push(&mut tables, manifest.get("build-dependencies"));
    if let Some(targets) = manifest.get("target").and_then(toml::Value::as_table) {
        for target in targets.values().filter_map(toml::Value::as_table) {
            push(&mut tables, target.get("dependencies"));
            push(&mut tables, target.get("build-dependencies"));
        }
    }
    if let Some(ws) = manifest.get("workspace").and_then(toml::Value::as_table) {
        push(&mut tables, ws.get("dependencies"));
    }
    if let Some(patch) = manifest.get("patch").and_then(toml::Value::as_table) {
        for source in patch.values() {
            push(&mut tables, Some(source));
        }
    }
    tables
}

/// Directories outside the plan that hold crates the plan depends on by `path` (transitively),
/// so that editing, say, a local SDK invalidates the cached artifact too. Best effort: entries
/// that do not parse or do not exist are left for cargo to report.
pub(crate) fn path_dependency_roots(plan_dir: &Path) -> Vec<PathBuf> {
    let Ok(plan_root) = fs::canonicalize(plan_dir) else {
        return Vec::new();
    };
    let mut roots = BTreeSet::new();
    let mut todo = vec![plan_root.clone()];
    let mut seen = BTreeSet::new();
    while let Some(dir) = todo.pop() {
        if !seen.insert(dir.clone()) {
            continue;
        }
        let Ok(text) = fs::read_to_string(dir.join("Cargo.toml")) else {
            continue;
        };
        let Ok(manifest) = text.parse::<toml::Table>() else {
            continue;
        };
        for table in dependency_tables(&manifest) {
            for dep in table.values() {
                let Some(rel) = dep.get("path").and_then(toml::Value::as_str) else {
                    continue;
                };
                let Ok(abs) = fs::canonicalize(dir.join(rel)) else {
                    continue;
                };
                if !abs.starts_with(&plan_root) {
                    roots.insert(abs.clone());
                }
                todo.push(abs);
            }
        }
    }
    // A root nested in another root is already hashed with it.
    let all: Vec<PathBuf> = roots.into_iter().collect();
    all.iter()
        .filter(|r| !all.iter().any(|o| o != *r && r.starts_with(o)))
        .cloned()
        .collect()
}

pub(crate) async fn build(
    input: &BuildInput,
    tools: &Tools<'_>,
) -> Result<BuildOutput, BuildError> {
    let cfg = Config::new(&input.builder, &input.config);
    let profile = parse_profile(&cfg)?;
    let wanted_bin = cfg.string("bin")?;

    let key = {
        let owned = input.clone();
        blocking("hash", &input.plan_dir, move || {
            let extra = path_dependency_roots(&owned.plan_dir);
            cache::key(&owned, &extra)
        })
        .await?
    };
    let artifact = cache::artifact_path(Kind::Rust, &input.plan, &key, &input.work_dir);
    let _building = cache::lock(&artifact, tools.cancel, || {
        tools.progress("waiting for another build of the same artifact to finish")
    })
    .await?;
    if cache::is_installed(&artifact) {
        return Ok(BuildOutput {
            artifact: Artifact::Executable(artifact),
            cached: true,
            dependencies: BTreeMap::new(),
        });
    }

    let mut cmd = Command::new("cargo");
    cmd.args([
        "metadata",
        "--no-deps",
        "--format-version",
        "1",
        "--color",
        "never",
    ])
    .current_dir(&input.plan_dir);
    let raw = tools.run(cmd, Stdout::Capture).await?;
    let meta: Metadata = serde_json::from_slice(&raw).map_err(|e| {
        BuildError::io(
            "parse `cargo metadata` output for",
            &input.plan_dir,
            std::io::Error::other(e),
        )
    })?;
    let (package, bin) = choose_bin(&cfg, &meta, wanted_bin.as_deref())?;

    let target_dir = cache::plan_dir(Kind::Rust, &input.plan, &input.work_dir).join("target");
    let mut cmd = Command::new("cargo");
    cmd.arg("build")
        .args(["--message-format=short", "--color", "never"])
        .args(["--profile", &profile])
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--package", &package, "--bin", &bin]);
    if !input.selectors.is_empty() {
        cmd.args(["--features", &input.selectors.join(",")]);
    }
    cmd.current_dir(&input.plan_dir);
    tools.run(cmd, Stdout::Stream).await?;

    let built = target_dir.join(profile_dir(&profile)).join(&bin);
    if !cache::is_installed(&built) {
        return Err(BuildError::MissingArtifact {
            builder: input.builder.clone(),
            path: built,
        });
    }
    {
        let dest = artifact.clone();
        let scratch = tools.scratch.path().to_owned();
        blocking("install", &artifact, move || {
            cache::install_copy(&scratch, &built, &dest)
        })
        .await?;
    }
    Ok(BuildOutput {
        artifact: Artifact::Executable(artifact),
        cached: false,
        dependencies: BTreeMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn meta(bins: &[(&str, &str)]) -> Metadata {
        Metadata {
            packages: bins
                .iter()
                .map(|(p, b)| Package {
                    name: (*p).into(),
                    targets: vec![
                        Target {
                            name: (*b).into(),
                            kind: vec!["bin".into()],
                        },
                        Target {
                            name: "lib".into(),
                            kind: vec!["lib".into()],
                        },
                    ],
                })
                .collect(),
        }
    }

    #[test]
    fn bin_selection() {
        let map = Map::new();
        let cfg = Config::new("exec:rust", &map);
        let one = meta(&[("p", "a")]);
        assert_eq!(
            choose_bin(&cfg, &one, None).unwrap(),
            ("p".into(), "a".into())
        );
        let two = meta(&[("p", "a"), ("q", "b")]);
        assert_eq!(
            choose_bin(&cfg, &two, Some("b")).unwrap(),
            ("q".into(), "b".into())
        );
        let err = choose_bin(&cfg, &two, None).unwrap_err();
        assert!(matches!(&err, BuildError::BadConfig { key, .. } if key == "bin"));
        assert!(err.to_string().contains("a, b"), "{err}");
        assert!(choose_bin(&cfg, &two, Some("c")).is_err());
        assert!(choose_bin(&cfg, &meta(&[]), None).is_err());
    }

    #[test]
    fn path_dependencies_outside_the_plan_are_roots() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["plan/inner", "sdk", "sdk/sub", "other"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(
            root.join("plan/Cargo.toml"),
            "[dependencies]\nsdk = { path = \"../sdk\" }\ninner = { path = \"inner\" }\nserde = \"1\"\n",
        )
        .unwrap();
        fs::write(
            root.join("sdk/Cargo.toml"),
            "[dependencies]\nsub = { path = \"sub\" }\n[target.'cfg(unix)'.dependencies]\nother = { path = \"../other\" }\n",
        )
        .unwrap();
        let roots = path_dependency_roots(&root.join("plan"));
        let sdk = fs::canonicalize(root.join("sdk")).unwrap();
        let other = fs::canonicalize(root.join("other")).unwrap();
        let mut expected = vec![other, sdk];
        expected.sort();
        assert_eq!(roots, expected);
    }

    #[test]
    fn profile_dirs() {
        assert_eq!(profile_dir("dev"), "debug");
        assert_eq!(profile_dir("release"), "release");
        assert_eq!(profile_dir("fast"), "fast");
    }
}
