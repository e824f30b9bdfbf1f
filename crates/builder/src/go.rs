//! `exec:go`: a host `go build` of a copy of the plan (so `go mod edit` never touches the
//! user's files), with dependency rewrites, build tags from selectors, and the resolved module
//! list kept next to the artifact so cache hits report it too.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokio::process::Command;

use crate::cache::{self, Kind};
use crate::config::Config;
use crate::process::{Stdout, Tools};
use crate::{Artifact, BuildError, BuildInput, BuildOutput, blocking, sources};

/// `-mod=mod` lets a build resolve modules missing from go.sum (the original ran this way);
/// the copy has no VCS metadata to stamp, and a parent directory's may be unreadable.
const GOFLAGS: &str = "-mod=mod -buildvcs=false";

fn go(dir: &Path) -> Command {
    let mut cmd = Command::new("go");
    cmd.current_dir(dir)
        .env("GOFLAGS", GOFLAGS)
        // An enclosing go.work (e.g. around $TESTGROUND_HOME) must not change what is built.
        .env("GOWORK", "off");
    cmd
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ModFile {
    /// `null` when the go.mod has no replace directives.
    #[serde(default)]
    replace: Option<Vec<Replace>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Replace {
    old: ModVersion,
    new: ModVersion,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ModVersion {
    path: String,
    #[serde(default)]
    version: String,
}

/// The keys `exec:go` and `docker:go` share: `module_path`, `exec_pkg`, `fresh_gomod`.
pub(crate) struct ModuleOptions {
    pub module_path: Option<String>,
    pub exec_pkg: String,
    pub fresh_gomod: bool,
}

impl ModuleOptions {
    pub(crate) fn parse(cfg: &Config<'_>) -> Result<ModuleOptions, BuildError> {
        let module_path = cfg.string("module_path")?;
        let exec_pkg = cfg.string("exec_pkg")?.unwrap_or_else(|| ".".to_owned());
        // Passed to `go build` as one argument: never an option, never split.
        if exec_pkg.starts_with('-') || exec_pkg.contains(char::is_whitespace) {
            return Err(cfg.bad(
                "exec_pkg",
                "a Go package path such as \".\" or \"./cmd/plan\"",
            ));
        }
        let fresh_gomod = cfg.boolean("fresh_gomod")?.unwrap_or(false);
        if fresh_gomod && module_path.is_none() {
            return Err(cfg.bad(
                "module_path",
                "the plan's Go module path (required with fresh_gomod)",
            ));
        }
        Ok(ModuleOptions {
            module_path,
            exec_pkg,
            fresh_gomod,
        })
    }
}

fn is_relative_path(p: &str) -> bool {
    p == "." || p == ".." || p.starts_with("./") || p.starts_with("../")
}

pub(crate) fn module_at(path: &str, version: &str) -> String {
    if version.is_empty() {
        path.to_owned()
    } else {
        format!("{path}@{version}")
    }
}

/// Parses `go list -m all`: `module version`, or `module [version] => target [version]` for
/// replaced modules. The main module (a bare path) is skipped. A module replaced by another
/// version of itself maps to that version; by another module, to `target@version`; by a local
/// directory, to the directory.
pub(crate) fn parse_module_list(text: &str) -> BTreeMap<String, String> {
    let mut deps = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (left, right) = match fields.iter().position(|f| *f == "=>") {
            Some(i) => (&fields[..i], Some(&fields[i + 1..])),
            None => (&fields[..], None),
        };
        let Some(module) = left.first() else { continue };
        let resolved = match right {
            Some([target, version]) if target == module => (*version).to_owned(),
            Some([target, version]) => module_at(target, version),
            Some([target]) => (*target).to_owned(),
            Some(_) => continue,
            None => match left {
                [_, version, ..] => (*version).to_owned(),
                _ => continue,
            },
        };
        deps.insert((*module).to_owned(), resolved);
    }
    deps
}

/// Relative `replace` targets were written against the plan directory; re-point them there so
/// they keep working from the copy.
async fn absolutize_replaces(
    tools: &Tools<'_>,
    src: &Path,
    plan_dir: &Path,
) -> Result<(), BuildError> {
    let mut cmd = go(src);
    cmd.args(["mod", "edit", "-json"]);
    let raw = tools.run(cmd, Stdout::Capture).await?;
    let modfile: ModFile = serde_json::from_slice(&raw).map_err(|e| {
        BuildError::io(
            "parse `go mod edit -json` output for",
            src,
            std::io::Error::other(e),
        )
    })?;
    let plan_dir = fs::canonicalize(plan_dir).unwrap_or_else(|_| plan_dir.to_owned());
    let replaces = modfile.replace.unwrap_or_default();
    for r in replaces.iter().filter(|r| is_relative_path(&r.new.path)) {
        let target = plan_dir.join(&r.new.path);
        let mut cmd = go(src);
        cmd.args(["mod", "edit"]).arg(format!(
            "-replace={}={}",
            module_at(&r.old.path, &r.old.version),
            target.display()
        ));
        tools.run(cmd, Stdout::Stream).await?;
    }
    Ok(())
}

fn read_deps(path: &Path) -> BTreeMap<String, String> {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

pub(crate) async fn build(
    input: &BuildInput,
    tools: &Tools<'_>,
) -> Result<BuildOutput, BuildError> {
    let cfg = Config::new(&input.builder, &input.config);
    let ModuleOptions {
        module_path,
        exec_pkg,
        fresh_gomod,
    } = ModuleOptions::parse(&cfg)?;

    let key = {
        let owned = input.clone();
        blocking("hash", &input.plan_dir, move || cache::key(&owned, &[])).await?
    };
    let artifact = cache::artifact_path(Kind::Go, &input.plan, &key, &input.work_dir);
    let _building = cache::lock(&artifact, tools.cancel, || {
        tools.progress("waiting for another build of the same artifact to finish")
    })
    .await?;
    let deps_file = cache::with_suffix(&artifact, "deps.json");
    if cache::is_installed(&artifact) {
        return Ok(BuildOutput {
            artifact: Artifact::Executable(artifact),
            cached: true,
            dependencies: read_deps(&deps_file),
        });
    }

    // The build's own directory, removed when the build ends however it ends.
    let build_dir = tools.scratch.path();
    let src = build_dir.join("plan");
    {
        let (from, to) = (input.plan_dir.clone(), src.clone());
        blocking("copy", &input.plan_dir, move || {
            sources::copy_tree(&from, &to)
        })
        .await?;
    }

    if fresh_gomod {
        for f in ["go.mod", "go.sum"] {
            match fs::remove_file(src.join(f)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(BuildError::io("remove", src.join(f), e));
                }
                _ => {}
            }
        }
        let mut cmd = go(&src);
        cmd.args(["mod", "init"])
            .arg(module_path.as_deref().unwrap_or_default());
        tools.run(cmd, Stdout::Stream).await?;
    } else if src.join("go.mod").is_file() {
        absolutize_replaces(tools, &src, &input.plan_dir).await?;
    }

    for dep in &input.dependencies {
        let target = if dep.target.is_empty() {
            dep.module.clone()
        } else if is_relative_path(&dep.target) {
            input
                .plan_dir
                .join(&dep.target)
                .to_string_lossy()
                .into_owned()
        } else {
            dep.target.clone()
        };
        let mut cmd = go(&src);
        cmd.args(["mod", "edit"]).arg(format!(
            "-replace={}={}",
            dep.module,
            module_at(&target, &dep.version)
        ));
        tools.run(cmd, Stdout::Stream).await?;
    }
    if fresh_gomod || !input.dependencies.is_empty() {
        let mut cmd = go(&src);
        cmd.args(["mod", "tidy"]);
        tools.run(cmd, Stdout::Stream).await?;
    }

    let built: PathBuf = build_dir.join("testplan");
    let mut cmd = go(&src);
    cmd.arg("build").arg("-o").arg(&built);
    if !input.selectors.is_empty() {
        cmd.arg("-tags").arg(input.selectors.join(","));
    }
    cmd.arg(&exec_pkg);
    tools.run(cmd, Stdout::Stream).await?;
    if !cache::is_installed(&built) {
        return Err(BuildError::MissingArtifact {
            builder: input.builder.clone(),
            path: built,
        });
    }

    let mut cmd = go(&src);
    cmd.args(["list", "-m", "all"]);
    let listed = tools.run(cmd, Stdout::Capture).await?;
    let dependencies = parse_module_list(&String::from_utf8_lossy(&listed));
    let deps_json = serde_json::to_vec_pretty(&dependencies)
        .map_err(|e| BuildError::io("encode", &deps_file, std::io::Error::other(e)))?;
    // The artifact goes last: its presence is what marks the whole entry as complete.
    cache::install_bytes(build_dir, &deps_file, &deps_json, 0o644)?;
    fs::rename(&built, &artifact).map_err(|e| BuildError::io("install", &artifact, e))?;
    Ok(BuildOutput {
        artifact: Artifact::Executable(artifact),
        cached: false,
        dependencies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_list_parsing() {
        let text = "github.com/me/plan\n\
                    github.com/a/b v1.2.3\n\
                    github.com/c/d v0.1.0 => github.com/c/d v0.2.0\n\
                    github.com/e/f v1.0.0 => github.com/fork/f v1.0.1\n\
                    github.com/g/h v1.0.0 => /abs/h\n\
                    \n";
        let deps = parse_module_list(text);
        assert_eq!(deps.len(), 4);
        assert_eq!(deps["github.com/a/b"], "v1.2.3");
        assert_eq!(deps["github.com/c/d"], "v0.2.0");
        assert_eq!(deps["github.com/e/f"], "github.com/fork/f@v1.0.1");
        assert_eq!(deps["github.com/g/h"], "/abs/h");
        assert!(!deps.contains_key("github.com/me/plan"));
    }

    #[test]
    fn mod_edit_json_with_and_without_replaces() {
        let none: ModFile =
            serde_json::from_str(r#"{"Module":{"Path":"m"},"Replace":null}"#).unwrap();
        assert!(none.replace.is_none());
        let some: ModFile = serde_json::from_str(
            r#"{"Replace":[{"Old":{"Path":"a","Version":"v1.0.0"},"New":{"Path":"../a"}}]}"#,
        )
        .unwrap();
        let r = &some.replace.unwrap()[0];
        assert_eq!(module_at(&r.old.path, &r.old.version), "a@v1.0.0");
        assert_eq!(r.new.path, "../a");
        assert!(r.new.version.is_empty());
    }

    #[test]
    fn relative_paths() {
        assert!(is_relative_path("../sdk"));
        assert!(is_relative_path("./x"));
        assert!(!is_relative_path("github.com/x/y"));
        assert!(!is_relative_path("/abs"));
    }
}
