//! The image builders (`docker:go`, `docker:rust`, `docker:generic`, `docker:node`): plan
//! sources in, a Docker image out, tagged `tg-plan-<plan>:<cache key>`.
//!
//! What they share lives here: validating the configuration before the engine is even asked,
//! connecting, removing what builds of a killed engine left (step containers, scratch
//! directories), making sure the base images exist ([`tg_docker::base::ensure`]), the cache key
//! (the sources' key of [`cache::key`] plus the base images' ids, so that a rebuilt base image
//! invalidates every plan built on it), the cache lookup by tag, and the mapping of engine
//! errors to [`BuildError`]s.
//!
//! The engine has no BuildKit (Debian's `docker.io`), so the classic builder has no cache
//! mounts: a `RUN go build` would start from nothing at every change. The compiling builders
//! (`docker:go`, `docker:rust`) therefore compile in one-shot containers of the build image
//! with host directories bound in for the toolchain caches (under the work dir, so they persist
//! across builds and plans), and then package only the binary into the runtime image with a
//! tiny context. `docker:generic` and `docker:node` are plain Dockerfile builds, as the
//! original's.

mod generic;
mod go;
mod node;
mod rust;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use tg_docker::context::{Context, Finished};
use tg_docker::{BuildSpec, Docker, DockerError, OneShot, OneShotOutput, labels};
use tokio_util::sync::CancellationToken;

use crate::cache::{self, Kind};
use crate::config::Config;
use crate::scratch::{self, BuildDir};
use crate::{Artifact, BuildError, BuildInput, BuildOutput, Progress, blocking, sources};

/// Image label: the builder that made a plan image (purge removes only its own builder's).
const BUILDER_LABEL: &str = "testground.image.builder";
/// The builder label of images made before the labels moved under `testground.image.`.
const LEGACY_BUILDER_LABEL: &str = "testground.builder";
/// Image label: the build's cache key.
const KEY_LABEL: &str = "testground.image.key";
/// Image label: the plan. Image labels are inherited by every container made from the image,
/// so they stay out of the names the runners select their containers by (`testground.plan`).
const PLAN_LABEL: &str = "testground.image.plan";
/// Hex digits of an image's key (its tag), as many as an `exec:*` artifact's.
const KEY_LEN: usize = 16;
/// The `testground.purpose` of step containers.
const PURPOSE_BUILD: &str = "build";

/// The default base images that [`tg_docker::base::ensure`] can make offline.
const DEFAULT_IMAGES: &[&str] = &[
    tg_docker::base::BUSYBOX,
    tg_docker::base::GOLANG,
    tg_docker::base::NODE,
    tg_docker::base::RUST,
    tg_docker::base::DEBIAN_SLIM,
];

/// A validated build configuration of one of the image builders.
enum Recipe {
    Go(Box<go::Recipe>),
    Rust(rust::Recipe),
    Generic(generic::Recipe),
    Node(node::Recipe),
}

impl Recipe {
    fn parse(kind: Kind, input: &BuildInput) -> Result<Recipe, BuildError> {
        let cfg = Config::new(&input.builder, &input.config);
        Ok(match kind {
            Kind::DockerGo => Recipe::Go(Box::new(go::Recipe::parse(&cfg, input)?)),
            Kind::DockerRust => Recipe::Rust(rust::Recipe::parse(&cfg)?),
            Kind::DockerGeneric => Recipe::Generic(generic::Recipe::parse(&cfg, input)?),
            Kind::DockerNode => Recipe::Node(node::Recipe::parse(&cfg)?),
            Kind::Rust | Kind::Go | Kind::Generic => {
                unreachable!("exec builders are not image builders")
            }
        })
    }

    /// Images the build cannot do without: made by `ensure` when missing.
    fn required_images(&self) -> Vec<String> {
        match self {
            Recipe::Go(r) => r.images(),
            Recipe::Rust(r) => r.images(),
            Recipe::Generic(r) => r.default_images(),
            Recipe::Node(r) => vec![r.base_image.clone()],
        }
    }

    /// Images whose content goes into the key if the engine has them (the engine pulls the
    /// others when it builds).
    fn optional_images(&self) -> Vec<String> {
        match self {
            Recipe::Generic(r) => r.other_images(),
            _ => Vec::new(),
        }
    }

    async fn build(&self, step: &Step<'_>) -> Result<Built, BuildError> {
        match self {
            Recipe::Go(r) => r.build(step).await,
            Recipe::Rust(r) => r.build(step).await,
            Recipe::Generic(r) => r.build(step).await,
            Recipe::Node(r) => r.build(step).await,
        }
    }

    /// What a cache hit reports as resolved dependencies: `docker:go` reads its module list
    /// back from the image; the others resolve none.
    async fn cached_dependencies(&self, step: &Step<'_>, image: &str) -> BTreeMap<String, String> {
        match self {
            Recipe::Go(_) => go::cached_dependencies(step, image).await,
            _ => BTreeMap::new(),
        }
    }
}

/// What a recipe produced.
struct Built {
    id: String,
    dependencies: BTreeMap<String, String>,
}

/// What a recipe needs to do its build: the engine, the build's own directory, the tags and
/// labels the image gets, progress and cancellation.
pub(crate) struct Step<'a> {
    input: &'a BuildInput,
    docker: &'a Docker,
    progress: &'a Progress,
    cancel: &'a CancellationToken,
    scratch: &'a BuildDir,
    /// The absolute work dir (bind mounts need absolute host paths).
    work_dir: PathBuf,
    /// The key tag first.
    tags: Vec<String>,
    /// Labels of the image.
    labels: BTreeMap<String, String>,
    /// Labels of step containers, by which leftovers are found.
    step_labels: BTreeMap<String, String>,
}

impl Step<'_> {
    fn say(&self, line: impl Into<String>) {
        // A dropped receiver means nobody watches the log; the build itself goes on.
        let _ = self.progress.send(line.into());
    }

    fn err(&self, e: DockerError) -> BuildError {
        docker_error(&self.input.builder, e)
    }

    fn sink(&self) -> impl Fn(&str) + Send + Sync + '_ {
        move |line: &str| self.say(line)
    }

    /// Runs a toolchain step in a container as the engine's own user (so that everything it
    /// writes into bound directories stays the engine's to remove), labelled as this build's.
    async fn run(&self, mut shot: OneShot) -> Result<OneShotOutput, BuildError> {
        shot.labels.extend(self.step_labels.clone());
        shot.user = Some(format!(
            "{}:{}",
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw()
        ));
        let sink = self.sink();
        let out = self
            .docker
            .run_once(&shot, &sink, self.cancel)
            .await
            .map_err(|e| self.err(e))?;
        if out.exit_code != 0 {
            return Err(BuildError::Failed {
                builder: self.input.builder.clone(),
                status: format!("exit code {} in {}", out.exit_code, shot.image),
                tail: out.tail,
            });
        }
        Ok(out)
    }

    /// Builds the image from `context` with the classic builder, with this build's tags and
    /// labels. `RUN` steps use the host's network: the engine here has no bridge, and the
    /// original built this way too.
    async fn image(
        &self,
        context: Finished,
        dockerfile: &str,
        build_args: BTreeMap<String, String>,
        extra_labels: BTreeMap<String, String>,
    ) -> Result<String, BuildError> {
        let (id, _) = self
            .image_logged(context, dockerfile, build_args, extra_labels)
            .await?;
        Ok(id)
    }

    /// [`Step::image`], also returning the lines the build printed.
    async fn image_logged(
        &self,
        context: Finished,
        dockerfile: &str,
        build_args: BTreeMap<String, String>,
        extra_labels: BTreeMap<String, String>,
    ) -> Result<(String, Vec<String>), BuildError> {
        let mut labels = self.labels.clone();
        labels.extend(extra_labels);
        let spec = BuildSpec {
            context,
            dockerfile: dockerfile.to_owned(),
            tag: self.tags[0].clone(),
            extra_tags: self.tags[1..].to_vec(),
            build_args,
            labels,
            host_network: true,
        };
        let lines = std::sync::Mutex::new(Vec::new());
        let sink = |line: &str| {
            self.say(line);
            lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(line.to_owned());
        };
        let id = self
            .docker
            .build(spec, &sink, self.cancel)
            .await
            .map_err(|e| self.err(e))?;
        Ok((id, lines.into_inner().unwrap_or_else(|e| e.into_inner())))
    }

    /// A directory under the work dir shared by every build of this builder (toolchain
    /// caches), created if needed.
    fn shared_dir(&self, kind: Kind, sub: &str) -> Result<PathBuf, BuildError> {
        let dir = shared_cache_dir(kind, &self.work_dir).join(sub);
        fs::create_dir_all(&dir).map_err(|e| BuildError::io("create cache directory", &dir, e))?;
        Ok(dir)
    }

    /// Binds and environment that make a download step trust what this host trusts. Behind a
    /// TLS-intercepting proxy (corporate networks, sandboxes) the host's bundle holds the
    /// proxy's CA and the build image's does not, so a step with the image's own bundle could
    /// not fetch modules or crates. Binds are host paths, so the bundle is the engine host's
    /// too. Nothing when the host has no bundle.
    fn trust(&self, shot: &mut OneShot) -> Result<(), BuildError> {
        let Some(bundle) = host_ca_bundle() else {
            return Ok(());
        };
        let inside = "/tg/ca-certificates.crt";
        shot.binds.push(format!("{}:ro", bind(&bundle, inside)?));
        for k in ["SSL_CERT_FILE", "CARGO_HTTP_CAINFO", "NODE_EXTRA_CA_CERTS"] {
            shot.env.push((k.to_owned(), inside.to_owned()));
        }
        Ok(())
    }

    /// A directory in the build's own scratch directory, created.
    fn scratch_dir(&self, sub: &str) -> Result<PathBuf, BuildError> {
        let dir = self.scratch.path().join(sub);
        fs::create_dir_all(&dir).map_err(|e| BuildError::io("create directory", &dir, e))?;
        Ok(dir)
    }

    /// Copies the plan's sources (ignore rules applied) into `dir`.
    async fn copy_sources(&self, dir: &Path) -> Result<(), BuildError> {
        let (from, to) = (self.input.plan_dir.clone(), dir.to_owned());
        blocking("copy", &self.input.plan_dir, move || {
            sources::copy_tree(&from, &to)
        })
        .await
    }
}

/// The CA bundle this host's own tools use: `SSL_CERT_FILE` if set, else Debian's and
/// Fedora's standard places.
pub(crate) fn host_ca_bundle() -> Option<PathBuf> {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    from_env
        .into_iter()
        .chain(
            [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
            ]
            .map(PathBuf::from),
        )
        .find(|p| p.is_file())
        .and_then(|p| fs::canonicalize(p).ok())
}

/// `host:container[:ro]`, refusing host paths the engine would split wrongly.
fn bind(host: &Path, container: &str) -> Result<String, BuildError> {
    let h = host.to_string_lossy();
    if h.contains(':') || h.contains(',') {
        return Err(BuildError::io(
            "bind into a build container",
            host,
            io::Error::other("the path contains ':' or ','; use a work dir without them"),
        ));
    }
    Ok(format!("{h}:{container}"))
}

pub(crate) fn docker_error(builder: &str, e: DockerError) -> BuildError {
    match e {
        DockerError::Canceled => BuildError::Canceled,
        DockerError::Build { message, tail } => BuildError::Failed {
            builder: builder.to_owned(),
            status: message,
            tail,
        },
        source => BuildError::Docker {
            builder: builder.to_owned(),
            source,
        },
    }
}

/// The image repository of a plan: `tg-plan-<plan>`, the plan name lowered and reduced to
/// what a repository name may hold (so `My_Plan` and `my-plan` share one; their tags differ,
/// since the key covers the plan name).
pub(crate) fn repo(plan: &str) -> String {
    let mut name = String::new();
    for c in plan.chars().map(|c| c.to_ascii_lowercase()) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            name.push(c);
        } else if !name.is_empty() && !name.ends_with('-') {
            name.push('-');
        }
    }
    let name = name.trim_end_matches('-');
    if name.is_empty() {
        "tg-plan-plan".to_owned()
    } else {
        format!("tg-plan-{name}")
    }
}

/// A tag (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`) naming a build: `build-<id>`.
fn build_tag(build_id: &str) -> String {
    let id: String = build_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    format!("build-{id}")
}

/// The sources' key extended with the base images' ids.
fn image_key(sources_key: &str, images: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    h.update(sources_key.as_bytes());
    for (name, id) in images {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((id.len() as u64).to_le_bytes());
        h.update(id.as_bytes());
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    hex[..KEY_LEN].to_owned()
}

/// A plan subdirectory given in the configuration (`path`), as a relative path with `/`
/// separators and no trailing `/` (empty for the plan root). It must stay inside the plan.
pub(crate) fn plan_subdir(cfg: &Config<'_>, key: &str, value: &str) -> Result<String, BuildError> {
    let p = Path::new(value);
    let mut parts = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            _ => {
                return Err(cfg.bad(
                    key,
                    "a directory of the plan relative to its root, such as \"./\" or \"go/\" \
                     (no absolute paths, no \"..\")",
                ));
            }
        }
    }
    Ok(parts.join("/"))
}

/// Where the host's CA bundle sits in a build context (see [`host_ca_bundle`]).
pub(crate) const CA_FILE: &str = "tg-ca-certificates.crt";

/// A build context on disk: the plan's sources under `plan/`, as the original's contexts held
/// them, with our `Dockerfile` at the root when given (a plan's own is among its sources), and
/// the host's CA bundle as [`CA_FILE`] when `ca` is given.
pub(crate) async fn plan_context(
    step: &Step<'_>,
    dockerfile: Option<String>,
    ca: Option<PathBuf>,
) -> Result<Finished, BuildError> {
    let plan_dir = step.input.plan_dir.clone();
    let scratch = step.scratch.path().to_owned();
    blocking("package", &plan_dir.clone(), move || {
        let io = |e| BuildError::io("assemble the build context in", &scratch, e);
        let mut ctx = Context::on_disk(&scratch).map_err(io)?;
        if let Some(dockerfile) = &dockerfile {
            ctx.file("Dockerfile", dockerfile.as_bytes(), 0o644)
                .map_err(io)?;
        }
        if let Some(ca) = &ca {
            ctx.host_file(ca, CA_FILE).map_err(io)?;
        }
        add_plan(&mut ctx, &plan_dir, "plan")?;
        ctx.finish().map_err(io)
    })
    .await
}

/// Adds the plan's sources (ignore rules applied) to `ctx` under `dest`.
pub(crate) fn add_plan(ctx: &mut Context, plan_dir: &Path, dest: &str) -> Result<(), BuildError> {
    let ctx_err = |path: &Path, e: io::Error| BuildError::io("add to the build context", path, e);
    ctx.dir(dest, 0o755).map_err(|e| ctx_err(plan_dir, e))?;
    for (rel, entry) in sources::entries(plan_dir)? {
        let name = format!("{dest}/{}", rel.to_string_lossy());
        let ft = entry.file_type;
        if ft.is_dir() {
            let mode = fs::metadata(&entry.path)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o755);
            ctx.dir(&name, mode).map_err(|e| ctx_err(&entry.path, e))?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&entry.path)
                .map_err(|e| BuildError::io("read symlink", &entry.path, e))?;
            ctx.symlink(&name, &target.to_string_lossy())
                .map_err(|e| ctx_err(&entry.path, e))?;
        } else if ft.is_file() {
            ctx.host_file(&entry.path, &name)
                .map_err(|e| ctx_err(&entry.path, e))?;
        }
    }
    Ok(())
}

/// `<work_dir>/<prefix>.cache`: toolchain caches shared by every plan of one builder.
fn shared_cache_dir(kind: Kind, work_dir: &Path) -> PathBuf {
    work_dir.join(format!("{}.cache", kind.prefix()))
}

/// Removes a directory tree even where toolchains left it read-only (Go's module cache).
fn remove_tree(dir: &Path) -> Result<(), BuildError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    for entry in walkdir::WalkDir::new(dir)
        .follow_links(false)
        .into_iter()
        .flatten()
    {
        if entry.file_type().is_dir() {
            let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o755));
        }
    }
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(BuildError::io("remove", dir, e)),
        _ => Ok(()),
    }
}

/// Removes step containers of this work dir whose build no longer runs: what an engine that
/// was killed mid-build left. Best effort.
async fn remove_leftovers(docker: &Docker, work_dir: &Path) {
    let home = work_dir.to_string_lossy().into_owned();
    let found = match docker
        .containers_with(&[(labels::PURPOSE, PURPOSE_BUILD), (labels::HOME, &home)])
        .await
    {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "could not look for containers of dead builds");
            return;
        }
    };
    for c in found {
        let live = c
            .labels
            .get(labels::BUILD_ID)
            .is_some_and(|token| scratch::is_live(work_dir, token));
        if live {
            continue;
        }
        match docker.remove_container(&c.id).await {
            Ok(()) => tracing::info!(container = %c.name, "removed a dead build's container"),
            Err(e) => tracing::warn!(container = %c.name, error = %e,
                "could not remove a dead build's container"),
        }
    }
}

/// One of the `docker:*` builders.
pub(crate) struct ImageBuilder {
    pub(crate) id: &'static str,
    pub(crate) kind: Kind,
}

impl ImageBuilder {
    pub(crate) async fn run(
        &self,
        input: &BuildInput,
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<BuildOutput, BuildError> {
        if cancel.is_cancelled() {
            return Err(BuildError::Canceled);
        }
        // Configuration mistakes are reported before the engine is involved.
        let recipe = Recipe::parse(self.kind, input)?;
        fs::create_dir_all(&input.work_dir)
            .map_err(|e| BuildError::io("create work directory", &input.work_dir, e))?;
        let work_dir = std::path::absolute(&input.work_dir)
            .map_err(|e| BuildError::io("resolve work directory", &input.work_dir, e))?;
        {
            let work_dir = work_dir.clone();
            blocking("clean", &input.work_dir, move || {
                scratch::clean_stale(&work_dir);
                Ok(())
            })
            .await?;
        }
        let docker = tokio::select! {
            r = Docker::connect() => r.map_err(|e| docker_error(&input.builder, e))?,
            _ = cancel.cancelled() => return Err(BuildError::Canceled),
        };
        remove_leftovers(&docker, &work_dir).await;
        let dir = BuildDir::create(&work_dir, &input.build_id)?;

        let say = |line: &str| {
            let _ = progress.send(line.to_owned());
        };
        let mut images = Vec::new();
        for image in recipe.required_images() {
            let id = tg_docker::base::ensure(&docker, &image, &say, cancel)
                .await
                .map_err(|e| docker_error(&input.builder, e))?;
            images.push((image, id));
        }
        // An image the engine lacks is pulled by the build; its id joins the key from the next
        // build on (which therefore builds once more).
        for image in recipe.optional_images() {
            let id = docker
                .image_id(&image)
                .await
                .map_err(|e| docker_error(&input.builder, e))?
                .unwrap_or_else(|| "absent".to_owned());
            images.push((image, id));
        }
        let sources_key = {
            let owned = input.clone();
            let rust = self.kind == Kind::DockerRust;
            blocking("hash", &input.plan_dir, move || {
                // Crates the plan depends on by path outside its directory are sources too.
                let extra = if rust {
                    crate::rust::path_dependency_roots(&owned.plan_dir)
                } else {
                    Vec::new()
                };
                cache::key(&owned, &extra)
            })
            .await?
        };
        let key = image_key(&sources_key, &images);
        let repo = repo(&input.plan);
        let key_tag = format!("{repo}:{key}");

        let lock_path = cache::artifact_path(self.kind, &input.plan, &key, &work_dir);
        let _building = cache::lock(&lock_path, cancel, || {
            say("waiting for another build of the same image to finish")
        })
        .await?;

        let step = Step {
            input,
            docker: &docker,
            progress,
            cancel,
            scratch: &dir,
            work_dir: work_dir.clone(),
            tags: vec![
                key_tag.clone(),
                format!("{repo}:{}", build_tag(&input.build_id)),
            ],
            labels: BTreeMap::from([
                (PLAN_LABEL.to_owned(), input.plan.clone()),
                (BUILDER_LABEL.to_owned(), self.id.to_owned()),
                (KEY_LABEL.to_owned(), key.clone()),
            ]),
            step_labels: BTreeMap::from([
                (labels::PURPOSE.to_owned(), PURPOSE_BUILD.to_owned()),
                (labels::BUILD_ID.to_owned(), dir.token().to_owned()),
                (
                    labels::HOME.to_owned(),
                    work_dir.to_string_lossy().into_owned(),
                ),
                (labels::PLAN.to_owned(), input.plan.clone()),
            ]),
        };

        if let Some(id) = docker
            .image_id(&key_tag)
            .await
            .map_err(|e| docker_error(&input.builder, e))?
        {
            say(&format!("found image {key_tag} ({id}): nothing to build"));
            let dependencies = recipe.cached_dependencies(&step, &id).await;
            return Ok(BuildOutput {
                artifact: Artifact::Image {
                    id,
                    tags: vec![key_tag],
                },
                cached: true,
                dependencies,
            });
        }

        let built = recipe.build(&step).await?;
        say(&format!("built image {} ({})", step.tags[0], built.id));
        tracing::debug!(builder = %input.builder, plan = %input.plan, image = %built.id,
            "image build finished");
        Ok(BuildOutput {
            artifact: Artifact::Image {
                id: built.id,
                tags: step.tags.clone(),
            },
            cached: false,
            dependencies: built.dependencies,
        })
    }

    /// Removes the plan's images made by this builder, the plan's entries in the work dir,
    /// and this builder's shared toolchain caches (they refill at the next build).
    pub(crate) async fn purge(&self, plan: &str, work_dir: &Path) -> Result<(), BuildError> {
        {
            let (kind, plan, dir) = (self.kind, plan.to_owned(), work_dir.to_owned());
            blocking("purge", work_dir, move || {
                cache::purge(kind, &plan, &dir)?;
                remove_tree(&shared_cache_dir(kind, &dir))
            })
            .await?;
        }
        let docker = Docker::connect()
            .await
            .map_err(|e| docker_error(self.id, e))?;
        let mut ids = Vec::new();
        for tag in docker
            .images_of(&repo(plan))
            .await
            .map_err(|e| docker_error(self.id, e))?
        {
            let image = match docker.api().inspect_image(&tag).await {
                Ok(i) => i,
                Err(e) if tg_docker::is_not_found(&e) => continue,
                Err(e) => {
                    return Err(docker_error(
                        self.id,
                        DockerError::Api {
                            what: format!("inspect image {tag}"),
                            source: e,
                        },
                    ));
                }
            };
            // A full `docker:go` build's build stage carries no labels (they go on the last
            // stage only); its tag says whose it is.
            let builder_stage =
                self.kind == Kind::DockerGo && tag.ends_with(go::BUILDER_STAGE_SUFFIX);
            let ours = builder_stage
                || image.config.and_then(|c| c.labels).is_some_and(|l| {
                    [BUILDER_LABEL, LEGACY_BUILDER_LABEL]
                        .iter()
                        .any(|k| l.get(*k).is_some_and(|b| b == self.id))
                });
            if ours && let Some(id) = image.id {
                ids.push(id);
            }
        }
        ids.sort();
        ids.dedup();
        for id in ids {
            docker
                .remove_image(&id)
                .await
                .map_err(|e| docker_error(self.id, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    #[test]
    fn repository_names_are_valid() {
        assert_eq!(repo("network"), "tg-plan-network");
        assert_eq!(repo("My_Plan/v2"), "tg-plan-my-plan-v2");
        assert_eq!(repo("--x--"), "tg-plan-x");
        assert_eq!(repo("__"), "tg-plan-plan");
        assert_eq!(build_tag("d0x/1"), "build-d0x_1");
    }

    #[test]
    fn engine_errors_keep_tg_dockers_message() {
        let e = docker_error(
            "docker:go",
            DockerError::Unreachable {
                endpoint: "unix:///nowhere.sock".into(),
                reason: "/nowhere.sock does not exist".into(),
            },
        );
        let text = e.to_string();
        assert!(
            text.starts_with("builder docker:go: no Docker engine answers at unix:///nowhere.sock"),
            "{text}"
        );
        assert!(text.contains("Start one"), "{text}");
        assert!(matches!(
            docker_error("docker:go", DockerError::Canceled),
            BuildError::Canceled
        ));
        let failed = docker_error(
            "docker:node",
            DockerError::Build {
                message: "The command '/bin/sh -c npm ci' returned a non-zero code: 1".into(),
                tail: "npm ERR! missing lock file".into(),
            },
        );
        assert!(matches!(&failed, BuildError::Failed { tail, .. } if tail.contains("lock file")));
    }

    #[test]
    fn the_key_follows_the_base_images() {
        let a = image_key("0123456789abcdef", &[("img".into(), "sha256:1".into())]);
        let b = image_key("0123456789abcdef", &[("img".into(), "sha256:2".into())]);
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
        assert_eq!(
            a,
            image_key("0123456789abcdef", &[("img".into(), "sha256:1".into())])
        );
    }

    #[test]
    fn plan_subdirs_stay_inside_the_plan() {
        let m = Map::new();
        let cfg = Config::new("docker:go", &m);
        assert_eq!(plan_subdir(&cfg, "path", "./").unwrap(), "");
        assert_eq!(plan_subdir(&cfg, "path", "go/").unwrap(), "go");
        assert_eq!(plan_subdir(&cfg, "path", "./a/./b").unwrap(), "a/b");
        for bad in ["../x", "/abs", "a/../../b"] {
            assert!(
                matches!(plan_subdir(&cfg, "path", bad), Err(BuildError::BadConfig { key, .. }) if key == "path"),
                "{bad}"
            );
        }
    }
}
