//! `docker:rust`: `cargo build` in a one-shot container of the build image, with the cargo
//! home (registry and git caches) shared by every plan and a target directory per plan, both
//! under the work dir so that a rebuild compiles only what changed; the binary then goes alone
//! into the runtime image. Selectors are cargo features and `profile`/`bin` mean what they mean
//! for `exec:rust`.

use std::collections::BTreeMap;

use tg_docker::OneShot;
use tg_docker::context::Context;

use super::{Built, Step, bind};
use crate::cache::{self, Kind};
use crate::config::Config;
use crate::rust::{Metadata, choose_bin, profile_dir};
use crate::{BuildError, blocking};

#[derive(Debug)]
pub(super) struct Recipe {
    profile: String,
    bin: Option<String>,
    build_base_image: String,
    runtime_image: String,
}

impl Recipe {
    pub(super) fn parse(cfg: &Config<'_>) -> Result<Recipe, BuildError> {
        let profile = crate::rust::parse_profile(cfg)?;
        Ok(Recipe {
            profile,
            bin: cfg.string("bin")?,
            build_base_image: cfg
                .string("build_base_image")?
                .unwrap_or_else(|| tg_docker::base::RUST.to_owned()),
            runtime_image: cfg
                .string("runtime_image")?
                .unwrap_or_else(|| tg_docker::base::DEBIAN_SLIM.to_owned()),
        })
    }

    pub(super) fn images(&self) -> Vec<String> {
        vec![self.build_base_image.clone(), self.runtime_image.clone()]
    }

    fn package_dockerfile(&self) -> String {
        format!(
            "FROM {}\nCOPY testplan /testplan\nEXPOSE 6060\nENTRYPOINT [\"/testplan\"]\n",
            self.runtime_image
        )
    }

    fn cargo_build(&self, package: &str, bin: &str, features: &[String]) -> Vec<String> {
        let mut cmd: Vec<String> = [
            "cargo",
            "build",
            "--message-format=short",
            "--color",
            "never",
            "--profile",
            &self.profile,
            "--target-dir",
            "/tg/target",
            "--package",
            package,
            "--bin",
            bin,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if !features.is_empty() {
            cmd.push("--features".to_owned());
            cmd.push(features.join(","));
        }
        cmd
    }

    pub(super) async fn build(&self, step: &Step<'_>) -> Result<Built, BuildError> {
        let input = step.input;
        let plan = step.scratch_dir("plan")?;
        step.copy_sources(&plan).await?;
        let target = cache::plan_dir(Kind::DockerRust, &input.plan, &step.work_dir).join("target");
        std::fs::create_dir_all(&target)
            .map_err(|e| BuildError::io("create directory", &target, e))?;
        // A plan that depends on crates outside its directory by `path` (e.g. an SDK next to
        // it) is built where it lives: the smallest directory holding the plan and those crates
        // is bound read-only at its own path, the plan's copy over the plan, so that every
        // relative path (and workspace inheritance) resolves as on the host.
        let (workdir, mut binds) = {
            let plan_dir = input.plan_dir.clone();
            let roots = blocking("inspect", &input.plan_dir, move || {
                let real = std::fs::canonicalize(&plan_dir)
                    .map_err(|e| BuildError::io("resolve", &plan_dir, e))?;
                Ok((real.clone(), crate::rust::path_dependency_roots(&real)))
            })
            .await?;
            match roots {
                (_, deps) if deps.is_empty() => ("/plan".to_owned(), vec![bind(&plan, "/plan")?]),
                (real, deps) => {
                    let ancestor = deps
                        .iter()
                        .fold(real.clone(), |a, d| common_ancestor(&a, d));
                    let at = real.to_string_lossy().into_owned();
                    // Never over the image's own root: then each crate's directory alone.
                    let shared = if ancestor.parent().is_some() {
                        vec![ancestor]
                    } else {
                        deps
                    };
                    let list: Vec<String> =
                        shared.iter().map(|d| d.display().to_string()).collect();
                    step.say(format!(
                        "path dependencies outside the plan: {} bound read-only",
                        list.join(", ")
                    ));
                    let mut binds = Vec::new();
                    for dir in shared {
                        binds.push(format!("{}:ro", bind(&dir, &dir.to_string_lossy())?));
                    }
                    binds.push(bind(&plan, &at)?);
                    (at, binds)
                }
            }
        };
        binds.extend([
            bind(&target, "/tg/target")?,
            bind(&step.shared_dir(Kind::DockerRust, "cargo")?, "/tg/cargo")?,
            bind(&step.shared_dir(Kind::DockerRust, "home")?, "/tg/home")?,
        ]);
        let env = vec![
            ("CARGO_HOME".to_owned(), "/tg/cargo".to_owned()),
            ("HOME".to_owned(), "/tg/home".to_owned()),
            ("CARGO_TERM_COLOR".to_owned(), "never".to_owned()),
        ];
        let meta = step
            .run(OneShot {
                image: self.build_base_image.clone(),
                cmd: [
                    "cargo",
                    "metadata",
                    "--no-deps",
                    "--format-version",
                    "1",
                    "--color",
                    "never",
                ]
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
                env: env.clone(),
                binds: binds.clone(),
                workdir: Some(workdir.clone()),
                capture_stdout: true,
                ..Default::default()
            })
            .await?;
        let meta: Metadata = serde_json::from_slice(&meta.stdout).map_err(|e| {
            BuildError::io(
                "parse `cargo metadata` output for",
                &input.plan_dir,
                std::io::Error::other(e),
            )
        })?;
        let cfg = Config::new(&input.builder, &input.config);
        let (package, bin) = choose_bin(&cfg, &meta, self.bin.as_deref())?;
        let cmd = self.cargo_build(&package, &bin, &input.selectors);
        step.say(format!("$ {}", cmd.join(" ")));
        let mut shot = OneShot {
            image: self.build_base_image.clone(),
            cmd,
            env,
            binds,
            workdir: Some(workdir),
            // Crate downloads.
            network: Some("host".to_owned()),
            ..Default::default()
        };
        step.trust(&mut shot)?;
        step.run(shot).await?;

        let binary = target.join(profile_dir(&self.profile)).join(&bin);
        if !cache::is_installed(&binary) {
            return Err(BuildError::MissingArtifact {
                builder: input.builder.clone(),
                path: binary,
            });
        }
        let dockerfile = self.package_dockerfile();
        let scratch = step.scratch.path().to_owned();
        // On disk: a debug binary can weigh hundreds of megabytes.
        let context = blocking("package", &binary.clone(), move || {
            let io = |e| BuildError::io("assemble the build context with", &binary, e);
            let mut ctx = Context::on_disk(&scratch).map_err(io)?;
            ctx.file("Dockerfile", dockerfile.as_bytes(), 0o644)
                .map_err(io)?;
            ctx.host_file(&binary, "testplan").map_err(io)?;
            ctx.finish().map_err(io)
        })
        .await?;
        let id = step
            .image(context, "Dockerfile", BTreeMap::new(), BTreeMap::new())
            .await?;
        Ok(Built {
            id,
            dependencies: BTreeMap::new(),
        })
    }
}

/// The deepest directory holding both `a` and `b` (absolute paths).
fn common_ancestor(a: &std::path::Path, b: &std::path::Path) -> std::path::PathBuf {
    a.components()
        .zip(b.components())
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn common_ancestors() {
        use std::path::Path;
        assert_eq!(
            common_ancestor(Path::new("/r/plans/p"), Path::new("/r/crates/sdk")),
            Path::new("/r")
        );
        assert_eq!(
            common_ancestor(Path::new("/a"), Path::new("/b")),
            Path::new("/")
        );
    }

    #[test]
    fn config_defaults_and_errors() {
        let m = json!({}).as_object().cloned().unwrap();
        let r = Recipe::parse(&Config::new("docker:rust", &m)).unwrap();
        assert_eq!(r.profile, "release");
        assert_eq!(
            r.images(),
            [tg_docker::base::RUST, tg_docker::base::DEBIAN_SLIM]
        );
        assert_eq!(
            r.package_dockerfile(),
            format!(
                "FROM {}\nCOPY testplan /testplan\nEXPOSE 6060\nENTRYPOINT [\"/testplan\"]\n",
                tg_docker::base::DEBIAN_SLIM
            )
        );
        let cmd = r.cargo_build("p", "b", &["x".into(), "y".into()]);
        assert_eq!(
            cmd[cmd.len() - 6..],
            ["--package", "p", "--bin", "b", "--features", "x,y"]
        );
        let m = json!({"profile": "fast; rm"}).as_object().cloned().unwrap();
        assert!(matches!(
            Recipe::parse(&Config::new("docker:rust", &m)),
            Err(BuildError::BadConfig { key, .. }) if key == "profile"
        ));
        let m = json!({"runtime_image": false})
            .as_object()
            .cloned()
            .unwrap();
        assert!(matches!(
            Recipe::parse(&Config::new("docker:rust", &m)),
            Err(BuildError::BadConfig { key, .. }) if key == "runtime_image"
        ));
    }
}
