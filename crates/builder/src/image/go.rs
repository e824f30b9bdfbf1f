//! `docker:go`: the plan compiled by `go build` in a one-shot container of the build image,
//! with the module cache and the build cache bound in from the work dir, then the binary
//! packaged into the runtime image. Plans that extend the build phase with Dockerfile
//! directives (`dockerfile_extensions.{pre,post}_{mod_download,source_copy,build}`) get one full
//! Dockerfile build instead, laid out as the original's template, since their directives
//! expect to run in the build stage.

use std::collections::BTreeMap;
use std::io::Read;

use futures::StreamExt;
use tg_docker::OneShot;
use tg_docker::bollard::models::ContainerCreateBody;
use tg_docker::bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use tg_docker::context::Context;

use super::{Built, CA_FILE, Step, bind, plan_subdir};
use crate::cache::Kind;
use crate::config::Config;
use crate::generic::sh_quote;
use crate::go::{module_at, parse_module_list};
use crate::{BuildError, BuildInput, Dependency, blocking};

/// Image label of `docker:go` images: the resolved module versions (JSON), so that cache hits
/// report them without starting anything.
const DEPS_LABEL: &str = "testground.image.go_deps";

/// Suffix of the tag a full build gives its build stage (`tg-plan-<plan>:<key>-builder`).
/// Untagged, the classic builder would keep it as a nameless image of a gigabyte or two per
/// build (modules and compiler output); tagged, it is visible and purge removes it.
pub(super) const BUILDER_STAGE_SUFFIX: &str = "-builder";

/// Where the image keeps `go list -m all`, as the original's.
const DEP_LIST: &str = "/testground_dep_list";

/// The copy has no VCS metadata to stamp; `-mod=mod` lets go.sum be completed (as `exec:go`);
/// `-modcacherw` keeps the shared module cache removable by purge.
const GOFLAGS: &str = "-mod=mod -buildvcs=false -modcacherw";

/// The eight extension points, in the order the Dockerfile has them.
const EXTENSIONS: [&str; 8] = [
    "pre_mod_download",
    "post_mod_download",
    "pre_source_copy",
    "post_source_copy",
    "pre_build",
    "post_build",
    "pre_runtime_copy",
    "post_runtime_copy",
];

/// The first six extend the build stage.
const BUILD_PHASE: usize = 6;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Proxy {
    /// Modules from the shared module cache under the work dir (this builder's stand-in for the
    /// original's goproxy container), misses from Go's default proxy.
    Local,
    Direct,
    Remote(String),
}

impl Proxy {
    fn goproxy(&self) -> &str {
        match self {
            Proxy::Local => "https://proxy.golang.org,direct",
            Proxy::Direct => "direct",
            Proxy::Remote(url) => url,
        }
    }
}

#[derive(Debug)]
pub(super) struct Recipe {
    module_path: Option<String>,
    exec_pkg: String,
    fresh_gomod: bool,
    /// The plan subdirectory holding go.mod (`""` for the root).
    path: String,
    modfile: Option<String>,
    proxy: Proxy,
    runtime_image: String,
    build_base_image: String,
    skip_runtime_image: bool,
    build_cache: bool,
    cgo: bool,
    /// Indexed like [`EXTENSIONS`].
    extensions: [Option<String>; 8],
    selectors: Vec<String>,
    dependencies: Vec<Dependency>,
}

fn quote_all(args: &[String]) -> String {
    args.iter()
        .map(|a| sh_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Recipe {
    pub(super) fn parse(cfg: &Config<'_>, input: &BuildInput) -> Result<Recipe, BuildError> {
        let crate::go::ModuleOptions {
            module_path,
            exec_pkg,
            fresh_gomod,
        } = crate::go::ModuleOptions::parse(cfg)?;
        let path = plan_subdir(
            cfg,
            "path",
            &cfg.string("path")?.unwrap_or_else(|| "./".to_owned()),
        )?;
        if !input.plan_dir.join(&path).is_dir() {
            return Err(cfg.bad(
                "path",
                format!("a directory of the plan (\"{path}\" is not one)"),
            ));
        }
        let modfile = cfg.string("modfile")?;
        if let Some(m) = &modfile {
            if fresh_gomod {
                return Err(cfg.bad(
                    "modfile",
                    "no custom go.mod together with fresh_gomod (they are incompatible)",
                ));
            }
            let plain =
                !m.contains(|c: char| c.is_whitespace() || c == '/') && !m.starts_with(['-', '.']);
            if !plain || !m.ends_with(".mod") {
                return Err(cfg.bad(
                    "modfile",
                    "the name of a go.mod file in `path` ending in \".mod\", such as \
                     \"go.v14.mod\" (its sums go in \"go.v14.sum\")",
                ));
            }
        }
        let proxy = match cfg.string("go_proxy_mode")?.as_deref() {
            None | Some("local") => Proxy::Local,
            Some("direct") => Proxy::Direct,
            Some("remote") => match cfg.string("go_proxy_url")? {
                Some(url) => Proxy::Remote(url),
                None => {
                    return Err(cfg.bad(
                        "go_proxy_url",
                        "the proxy's URL (required with go_proxy_mode = \"remote\")",
                    ));
                }
            },
            Some(_) => {
                return Err(cfg.bad("go_proxy_mode", "one of \"local\", \"direct\", \"remote\""));
            }
        };
        let mut extensions: [Option<String>; 8] = Default::default();
        for (k, v) in cfg.string_table("dockerfile_extensions")? {
            let Some(i) = EXTENSIONS.iter().position(|e| *e == k) else {
                return Err(cfg.bad(
                    &format!("dockerfile_extensions.{k}"),
                    format!("one of {}", EXTENSIONS.join(", ")),
                ));
            };
            if !v.trim().is_empty() {
                extensions[i] = Some(v);
            }
        }
        for s in &input.selectors {
            if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == ',') {
                return Err(cfg.bad(
                    "selectors",
                    format!("Go build tags without spaces or commas (got {s:?})"),
                ));
            }
        }
        Ok(Recipe {
            module_path,
            exec_pkg,
            fresh_gomod,
            path,
            modfile,
            proxy,
            runtime_image: cfg
                .string("runtime_image")?
                .unwrap_or_else(|| tg_docker::base::BUSYBOX.to_owned()),
            build_base_image: cfg
                .string("build_base_image")?
                .unwrap_or_else(|| tg_docker::base::GOLANG.to_owned()),
            skip_runtime_image: cfg.boolean("skip_runtime_image")?.unwrap_or(false),
            build_cache: cfg.boolean("enable_go_build_cache")?.unwrap_or(true),
            cgo: cfg.boolean("enable_cgo")?.unwrap_or(false),
            extensions,
            selectors: input.selectors.clone(),
            dependencies: input.dependencies.clone(),
        })
    }

    pub(super) fn images(&self) -> Vec<String> {
        let mut v = vec![self.build_base_image.clone()];
        if !self.skip_runtime_image {
            v.push(self.runtime_image.clone());
        }
        v
    }

    /// Whether a build-phase directive is set: then only a full Dockerfile build honours it.
    fn extends_build_phase(&self) -> bool {
        self.extensions[..BUILD_PHASE].iter().any(Option::is_some)
    }

    fn ext(&self, name: &str) -> &str {
        let i = EXTENSIONS
            .iter()
            .position(|e| *e == name)
            .unwrap_or_default();
        self.extensions[i].as_deref().unwrap_or("")
    }

    /// Where the module is inside the build container.
    fn module_dir(&self) -> String {
        if self.path.is_empty() {
            "/plan".to_owned()
        } else {
            format!("/plan/{}", self.path)
        }
    }

    fn goflags(&self) -> String {
        match &self.modfile {
            Some(m) => format!("{GOFLAGS} -modfile={m}"),
            None => GOFLAGS.to_owned(),
        }
    }

    fn replace_args(&self) -> Vec<String> {
        self.dependencies
            .iter()
            .map(|d| {
                let target = if d.target.is_empty() {
                    &d.module
                } else {
                    &d.target
                };
                format!("-replace={}={}", d.module, module_at(target, &d.version))
            })
            .collect()
    }

    /// The shell commands that turn the plan in `/plan/<path>` into `<out>/testplan` and
    /// `<out>/testground_dep_list`: a fresh go.mod if asked, the dependency rewrites (`--dep`,
    /// as `exec:go` does), the build with tags from the selectors, and the module list.
    fn go_commands(&self, out: &str) -> String {
        let mut s = format!("cd {}\n", sh_quote(&self.module_dir()));
        if self.fresh_gomod {
            s.push_str("rm -f go.mod go.sum\n");
            s.push_str(&format!(
                "go mod init {}\n",
                sh_quote(self.module_path.as_deref().unwrap_or_default())
            ));
        }
        let edit_target = self
            .modfile
            .as_deref()
            .map(|m| format!(" {}", sh_quote(m)))
            .unwrap_or_default();
        for r in self.replace_args() {
            s.push_str(&format!("go mod edit {}{edit_target}\n", sh_quote(&r)));
        }
        if self.fresh_gomod || !self.dependencies.is_empty() {
            s.push_str("go mod tidy\n");
        }
        let mut build = vec!["go".to_owned(), "build".to_owned(), "-o".to_owned()];
        build.push(format!("{out}/testplan"));
        if !self.selectors.is_empty() {
            build.push("-tags".to_owned());
            build.push(self.selectors.join(","));
        }
        build.push(self.exec_pkg.clone());
        s.push_str(&quote_all(&build));
        s.push('\n');
        s.push_str(&format!("go list -m all > {out}/testground_dep_list\n"));
        s
    }

    /// The packaging Dockerfile: the binary and its module list on the runtime image (or the
    /// build image with `skip_runtime_image`), with the runtime-copy directives around them.
    fn package_dockerfile(&self) -> String {
        let from = if self.skip_runtime_image {
            &self.build_base_image
        } else {
            &self.runtime_image
        };
        format!(
            "FROM {from}\n\
             ENV PLAN_DIR /plan\n\
             {pre}\n\
             COPY testground_dep_list {DEP_LIST}\n\
             COPY testplan /testplan\n\
             {post}\n\
             EXPOSE 6060\n\
             ENTRYPOINT [\"/testplan\"]\n",
            pre = self.ext("pre_runtime_copy"),
            post = self.ext("post_runtime_copy"),
        )
    }

    /// The full Dockerfile for plans that extend the build phase, after the original's
    /// template: module download first (its own layer), the sources, the build, the module
    /// list, then the runtime stage. Every extension point sits where the original had it.
    fn full_dockerfile(&self, with_ca: bool) -> String {
        let dir = self.module_dir();
        let mut d = String::new();
        d.push_str("ARG BUILD_BASE_IMAGE\nARG RUNTIME_IMAGE\n");
        d.push_str("FROM ${BUILD_BASE_IMAGE} AS builder\n");
        d.push_str("ENV PLAN_DIR /plan\n");
        if with_ca {
            // The host's trust (see `Step::trust`), for the build stage's downloads only.
            d.push_str(&format!(
                "COPY {CA_FILE} /tg/ca-certificates.crt\nENV SSL_CERT_FILE=/tg/ca-certificates.crt\n"
            ));
        }
        d.push_str(
            "ARG TESTPLAN_EXEC_PKG=\".\"\nARG GO_PROXY=direct\nARG BUILD_TAGS\n\
             ARG PLAN_PATH=\"./\"\nARG MODFILE=\"go.mod\"\nARG MODFILE_SUM=\"go.sum\"\n",
        );
        d.push_str("ENV TESTPLAN_EXEC_PKG ${TESTPLAN_EXEC_PKG}\n");
        d.push_str(&format!(
            "ENV GOPROXY=\"${{GO_PROXY}}\" GOFLAGS=\"{}\" GOWORK=off CGO_ENABLED={} GOCACHE=/go/cache\n",
            self.goflags(),
            u8::from(self.cgo)
        ));
        d.push_str(&format!("{}\n", self.ext("pre_mod_download")));
        if !self.fresh_gomod {
            let prefix = if self.path.is_empty() {
                "plan".to_owned()
            } else {
                format!("plan/{}", self.path)
            };
            let modfile = self.modfile.as_deref().unwrap_or("go.mod");
            let sum = format!("{}.sum", modfile.trim_end_matches(".mod"));
            // The bracket makes the sum optional: a glob that matches nothing copies nothing.
            let (stem, last) = sum.split_at(sum.len() - 1);
            d.push_str(&format!(
                "COPY {prefix}/{modfile} {prefix}/{stem}[{last}] {dir}/\n"
            ));
            let edits: Vec<String> = self
                .replace_args()
                .iter()
                .map(|r| {
                    format!(
                        " && go mod edit {}{}",
                        sh_quote(r),
                        self.modfile
                            .as_deref()
                            .map(|m| format!(" {}", sh_quote(m)))
                            .unwrap_or_default()
                    )
                })
                .collect();
            d.push_str(&format!(
                "RUN echo \"Using go proxy: ${{GO_PROXY}}\" && cd {}{} && go mod download\n",
                sh_quote(&dir),
                edits.concat()
            ));
        }
        d.push_str(&format!("{}\n", self.ext("post_mod_download")));
        d.push_str(&format!("{}\n", self.ext("pre_source_copy")));
        d.push_str("COPY plan /plan\n");
        d.push_str(&format!("{}\n", self.ext("post_source_copy")));
        d.push_str(&format!("{}\n", self.ext("pre_build")));
        d.push_str("RUN mkdir -p /tg-out && set -x && ");
        d.push_str(
            &self
                .go_commands("/tg-out")
                .lines()
                .collect::<Vec<_>>()
                .join(" && "),
        );
        d.push('\n');
        d.push_str(&format!("{}\n", self.ext("post_build")));
        if self.skip_runtime_image {
            d.push_str("FROM builder AS runtime\n");
        } else {
            d.push_str("FROM ${RUNTIME_IMAGE} AS runtime\n");
        }
        d.push_str("ENV PLAN_DIR /plan\n");
        d.push_str(&format!("{}\n", self.ext("pre_runtime_copy")));
        d.push_str(&format!(
            "COPY --from=builder /tg-out/testground_dep_list {DEP_LIST}\n"
        ));
        d.push_str("COPY --from=builder /tg-out/testplan /testplan\n");
        d.push_str(&format!("{}\n", self.ext("post_runtime_copy")));
        d.push_str("EXPOSE 6060\nENTRYPOINT [\"/testplan\"]\n");
        d
    }

    /// The original's build arguments, for directives that use them.
    fn build_args(&self) -> BTreeMap<String, String> {
        let modfile = self.modfile.clone().unwrap_or_else(|| "go.mod".to_owned());
        let sum = format!("{}.sum", modfile.trim_end_matches(".mod"));
        let mut args = BTreeMap::from([
            ("BUILD_BASE_IMAGE".to_owned(), self.build_base_image.clone()),
            ("RUNTIME_IMAGE".to_owned(), self.runtime_image.clone()),
            ("GO_PROXY".to_owned(), self.proxy.goproxy().to_owned()),
            ("TESTPLAN_EXEC_PKG".to_owned(), self.exec_pkg.clone()),
            (
                "PLAN_PATH".to_owned(),
                if self.path.is_empty() {
                    "./".to_owned()
                } else {
                    format!("{}/", self.path)
                },
            ),
            ("MODFILE".to_owned(), modfile),
            ("MODFILE_SUM".to_owned(), sum),
        ]);
        if !self.selectors.is_empty() {
            args.insert(
                "BUILD_TAGS".to_owned(),
                format!("-tags {}", self.selectors.join(",")),
            );
        }
        args
    }

    pub(super) async fn build(&self, step: &Step<'_>) -> Result<Built, BuildError> {
        if self.extends_build_phase() {
            return self.build_full(step).await;
        }
        let plan = step.scratch_dir("plan")?;
        let out = step.scratch_dir("out")?;
        step.copy_sources(&plan).await?;
        let gocache = if self.build_cache {
            step.shared_dir(Kind::DockerGo, "gocache")?
        } else {
            step.scratch_dir("gocache")?
        };
        let mut shot = OneShot {
            image: self.build_base_image.clone(),
            cmd: vec![
                "sh".to_owned(),
                "-c".to_owned(),
                format!("set -ex\n{}", self.go_commands("/out")),
            ],
            env: vec![
                ("HOME".to_owned(), "/tg/home".to_owned()),
                ("GOCACHE".to_owned(), "/tg/gocache".to_owned()),
                ("GOMODCACHE".to_owned(), "/tg/gomod".to_owned()),
                ("GOFLAGS".to_owned(), self.goflags()),
                ("GOWORK".to_owned(), "off".to_owned()),
                ("GOPROXY".to_owned(), self.proxy.goproxy().to_owned()),
                ("CGO_ENABLED".to_owned(), u8::from(self.cgo).to_string()),
                ("GOOS".to_owned(), "linux".to_owned()),
            ],
            binds: vec![
                bind(&plan, "/plan")?,
                bind(&out, "/out")?,
                bind(&gocache, "/tg/gocache")?,
                bind(&step.shared_dir(Kind::DockerGo, "gomod")?, "/tg/gomod")?,
                bind(&step.shared_dir(Kind::DockerGo, "home")?, "/tg/home")?,
            ],
            workdir: Some("/plan".to_owned()),
            // Module downloads; the proxy is a registry like any other here.
            network: Some("host".to_owned()),
            ..Default::default()
        };
        step.trust(&mut shot)?;
        step.run(shot).await?;

        let binary = out.join("testplan");
        if !crate::cache::is_installed(&binary) {
            return Err(BuildError::MissingArtifact {
                builder: step.input.builder.clone(),
                path: binary,
            });
        }
        let listed = std::fs::read(out.join("testground_dep_list"))
            .map_err(|e| BuildError::io("read", out.join("testground_dep_list"), e))?;
        let dependencies = parse_module_list(&String::from_utf8_lossy(&listed));
        let dockerfile = self.package_dockerfile();
        let context = blocking("package", &binary.clone(), move || {
            let io = |e| BuildError::io("assemble the build context with", &binary, e);
            let mut ctx = Context::in_memory();
            ctx.file("Dockerfile", dockerfile.as_bytes(), 0o644)
                .map_err(io)?;
            ctx.file("testground_dep_list", &listed, 0o644)
                .map_err(io)?;
            ctx.host_file(&binary, "testplan").map_err(io)?;
            ctx.finish().map_err(io)
        })
        .await?;
        let deps_json = serde_json::to_string(&dependencies).unwrap_or_default();
        let id = step
            .image(
                context,
                "Dockerfile",
                BTreeMap::new(),
                BTreeMap::from([(DEPS_LABEL.to_owned(), deps_json)]),
            )
            .await?;
        Ok(Built { id, dependencies })
    }

    async fn build_full(&self, step: &Step<'_>) -> Result<Built, BuildError> {
        step.say("dockerfile_extensions extend the build phase: one full Dockerfile build");
        let ca = super::host_ca_bundle();
        let dockerfile = self.full_dockerfile(ca.is_some());
        let context = super::plan_context(step, Some(dockerfile), ca).await?;
        let (id, lines) = step
            .image_logged(context, "Dockerfile", self.build_args(), BTreeMap::new())
            .await?;
        if let Some(stage) = builder_stage(&lines) {
            let tag = format!("{}{BUILDER_STAGE_SUFFIX}", step.tags[0]);
            if let Err(e) = step.docker.tag(&stage, &tag).await {
                step.say(format!(
                    "could not tag the build stage {stage} as {tag}: {e}"
                ));
            }
        }
        let dependencies = match read_from_image(step, &id, DEP_LIST).await {
            Ok(text) => parse_module_list(&String::from_utf8_lossy(&text)),
            Err(e) => {
                step.say(format!(
                    "could not read the module list from the image: {e}"
                ));
                BTreeMap::new()
            }
        };
        Ok(Built { id, dependencies })
    }
}

/// The build stage's image in a classic build's output: the last ` ---> <id>` before the
/// runtime stage's `FROM`.
fn builder_stage(lines: &[String]) -> Option<String> {
    let runtime = lines.iter().position(|l| {
        l.starts_with("Step ")
            && l.contains(" : FROM ")
            && l.to_ascii_lowercase().ends_with(" as runtime")
    })?;
    lines[..runtime].iter().rev().find_map(|l| {
        let id = l.trim().strip_prefix("---> ")?;
        (id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
    })
}

/// The module list of a cached image: its label, else the file the image holds.
pub(super) async fn cached_dependencies(step: &Step<'_>, image: &str) -> BTreeMap<String, String> {
    if let Ok(info) = step.docker.api().inspect_image(image).await
        && let Some(json) = info
            .config
            .and_then(|c| c.labels)
            .and_then(|l| l.get(DEPS_LABEL).cloned())
        && let Ok(deps) = serde_json::from_str(&json)
    {
        return deps;
    }
    match read_from_image(step, image, DEP_LIST).await {
        Ok(text) => parse_module_list(&String::from_utf8_lossy(&text)),
        Err(_) => BTreeMap::new(),
    }
}

/// Reads one file out of an image without starting it (a runtime image need not have `cat`):
/// a created, never started container, the engine's archive of the path, the container
/// removed.
async fn read_from_image(step: &Step<'_>, image: &str, path: &str) -> Result<Vec<u8>, String> {
    let api = step.docker.api();
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        labels: Some(step.step_labels.clone().into_iter().collect()),
        network_disabled: Some(true),
        ..Default::default()
    };
    let created = api
        .create_container(Some(CreateContainerOptionsBuilder::default().build()), body)
        .await
        .map_err(|e| e.to_string())?;
    let opts = DownloadFromContainerOptionsBuilder::default()
        .path(path)
        .build();
    let mut stream = api.download_from_container(&created.id, Some(opts));
    let mut tar_bytes = Vec::new();
    let mut failed = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => tar_bytes.extend_from_slice(&b),
            Err(e) => {
                failed = Some(e.to_string());
                break;
            }
        }
    }
    let _ = api
        .remove_container(
            &created.id,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await;
    if let Some(e) = failed {
        return Err(e);
    }
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let mut entries = archive.entries().map_err(|e| e.to_string())?;
    let Some(entry) = entries.next() else {
        return Err(format!("{path} is not in the image"));
    };
    let mut entry = entry.map_err(|e| e.to_string())?;
    let mut text = Vec::new();
    entry.read_to_end(&mut text).map_err(|e| e.to_string())?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn input(config: Value) -> (tempfile::TempDir, BuildInput) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("go")).unwrap();
        let input = BuildInput {
            build_id: "b".into(),
            plan: "p".into(),
            plan_dir: dir.path().to_owned(),
            builder: "docker:go".into(),
            config: config.as_object().cloned().unwrap(),
            selectors: vec![],
            dependencies: vec![],
            work_dir: dir.path().join("work"),
        };
        (dir, input)
    }

    fn parse(config: Value) -> Result<Recipe, BuildError> {
        let (_dir, input) = input(config);
        Recipe::parse(&Config::new("docker:go", &input.config), &input)
    }

    fn bad_key(config: Value) -> String {
        match parse(config) {
            Err(BuildError::BadConfig { key, .. }) => key,
            other => panic!("expected a bad config, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_the_originals() {
        let r = parse(json!({"enabled": true})).unwrap();
        assert_eq!(r.exec_pkg, ".");
        assert_eq!(r.path, "");
        assert_eq!(r.proxy, Proxy::Local);
        assert_eq!(r.runtime_image, tg_docker::base::BUSYBOX);
        assert_eq!(r.build_base_image, tg_docker::base::GOLANG);
        assert!(!r.skip_runtime_image && !r.cgo && r.build_cache);
        assert_eq!(
            r.images(),
            [tg_docker::base::GOLANG, tg_docker::base::BUSYBOX]
        );
        assert!(!r.extends_build_phase());
    }

    #[test]
    fn bad_values_name_their_key() {
        assert_eq!(
            bad_key(json!({"go_proxy_mode": "sideways"})),
            "go_proxy_mode"
        );
        assert_eq!(bad_key(json!({"go_proxy_mode": "remote"})), "go_proxy_url");
        assert_eq!(bad_key(json!({"fresh_gomod": true})), "module_path");
        assert_eq!(
            bad_key(json!({"fresh_gomod": true, "module_path": "m", "modfile": "go.x.mod"})),
            "modfile"
        );
        assert_eq!(bad_key(json!({"modfile": "go.txt"})), "modfile");
        assert_eq!(bad_key(json!({"modfile": "../go.mod"})), "modfile");
        assert_eq!(bad_key(json!({"path": "../elsewhere"})), "path");
        assert_eq!(bad_key(json!({"path": "missing/"})), "path");
        assert_eq!(bad_key(json!({"exec_pkg": "-x"})), "exec_pkg");
        assert_eq!(bad_key(json!({"enable_cgo": "maybe"})), "enable_cgo");
        assert_eq!(bad_key(json!({"runtime_image": 3})), "runtime_image");
        assert_eq!(
            bad_key(json!({"dockerfile_extensions": {"pre_lunch": "RUN x"}})),
            "dockerfile_extensions.pre_lunch"
        );
        let r = parse(json!({"go_proxy_mode": "remote", "go_proxy_url": "http://p"})).unwrap();
        assert_eq!(r.proxy.goproxy(), "http://p");
        assert_eq!(
            parse(json!({"go_proxy_mode": "direct"}))
                .unwrap()
                .proxy
                .goproxy(),
            "direct"
        );
    }

    #[test]
    fn commands_rewrite_dependencies_and_pass_tags() {
        let (_dir, mut input) =
            input(json!({"path": "go/", "exec_pkg": "./cmd", "modfile": "go.v2.mod"}));
        input.selectors = vec!["a".into(), "b".into()];
        input.dependencies = vec![Dependency {
            module: "github.com/x/y".into(),
            target: "github.com/fork/y".into(),
            version: "v1.2.3".into(),
        }];
        let r = Recipe::parse(&Config::new("docker:go", &input.config), &input).unwrap();
        let s = r.go_commands("/out");
        assert_eq!(
            s,
            "cd '/plan/go'\n\
             go mod edit '-replace=github.com/x/y=github.com/fork/y@v1.2.3' 'go.v2.mod'\n\
             go mod tidy\n\
             'go' 'build' '-o' '/out/testplan' '-tags' 'a,b' './cmd'\n\
             go list -m all > /out/testground_dep_list\n"
        );
        assert!(r.goflags().ends_with(" -modfile=go.v2.mod"));
        let args = r.build_args();
        assert_eq!(args["BUILD_TAGS"], "-tags a,b");
        assert_eq!(args["PLAN_PATH"], "go/");
        assert_eq!(args["MODFILE_SUM"], "go.v2.sum");
    }

    #[test]
    fn the_build_stage_is_found_in_the_build_output() {
        let lines: Vec<String> = [
            "Step 30/33 : RUN echo at-post_build",
            " ---> Running in 0123456789ab",
            "at-post_build",
            "Removing intermediate container 0123456789ab",
            " ---> 7e8ff17d95fd",
            "Step 31/33 : FROM ${RUNTIME_IMAGE} AS runtime",
            " ---> 1b154e90c0df",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        assert_eq!(builder_stage(&lines).as_deref(), Some("7e8ff17d95fd"));
        let cached: Vec<String> = [
            " ---> Using cache",
            " ---> abcdefabcdef",
            "Step 9/9 : FROM builder AS runtime",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        assert_eq!(builder_stage(&cached).as_deref(), Some("abcdefabcdef"));
        assert_eq!(builder_stage(&lines[..4]), None);
    }

    #[test]
    fn fresh_gomod_starts_a_module() {
        let r = parse(json!({"fresh_gomod": true, "module_path": "example.com/p"})).unwrap();
        let s = r.go_commands("/out");
        assert!(
            s.starts_with(
                "cd '/plan'\nrm -f go.mod go.sum\ngo mod init 'example.com/p'\ngo mod tidy\n"
            ),
            "{s}"
        );
    }

    #[test]
    fn the_package_dockerfile_holds_only_the_binary() {
        let r = parse(json!({"dockerfile_extensions": {"pre_runtime_copy": "RUN echo pre", "post_runtime_copy": "RUN echo post"}})).unwrap();
        assert!(!r.extends_build_phase());
        let d = r.package_dockerfile();
        assert!(
            d.starts_with(&format!("FROM {}\n", tg_docker::base::BUSYBOX)),
            "{d}"
        );
        let pre = d.find("RUN echo pre").unwrap();
        let copy = d.find("COPY testplan /testplan").unwrap();
        let post = d.find("RUN echo post").unwrap();
        assert!(pre < copy && copy < post);
        assert!(d.ends_with("EXPOSE 6060\nENTRYPOINT [\"/testplan\"]\n"));
        let r = parse(json!({"skip_runtime_image": true})).unwrap();
        assert!(
            r.package_dockerfile()
                .starts_with(&format!("FROM {}\n", tg_docker::base::GOLANG))
        );
        assert_eq!(r.images(), [tg_docker::base::GOLANG]);
    }

    #[test]
    fn the_full_dockerfile_honours_every_extension_in_order() {
        let ext: serde_json::Map<String, Value> = EXTENSIONS
            .iter()
            .map(|e| ((*e).to_owned(), json!(format!("RUN echo at-{e}"))))
            .collect();
        let r = parse(json!({"dockerfile_extensions": ext, "enable_cgo": true})).unwrap();
        assert!(r.extends_build_phase());
        let d = r.full_dockerfile(true);
        let mut last = 0;
        for e in EXTENSIONS {
            let at = d
                .find(&format!("RUN echo at-{e}"))
                .unwrap_or_else(|| panic!("{e} in {d}"));
            assert!(at > last, "{e} out of order in\n{d}");
            last = at;
        }
        let download = d.find("go mod download").unwrap();
        let build = d.find("'go' 'build'").unwrap();
        assert!(d.find("RUN echo at-pre_mod_download").unwrap() < download);
        assert!(download < d.find("RUN echo at-post_mod_download").unwrap());
        assert!(d.find("RUN echo at-pre_build").unwrap() < build);
        assert!(build < d.find("RUN echo at-post_build").unwrap());
        assert!(d.contains("COPY plan/go.mod plan/go.su[m] /plan/\n"), "{d}");
        assert!(d.contains("CGO_ENABLED=1"));
        assert!(d.contains("FROM ${RUNTIME_IMAGE} AS runtime"));
        let ca = d.find("COPY tg-ca-certificates.crt").unwrap();
        assert!(ca < d.find("RUN echo at-pre_mod_download").unwrap());
        assert!(!r.full_dockerfile(false).contains("tg-ca-certificates"));
    }
}
