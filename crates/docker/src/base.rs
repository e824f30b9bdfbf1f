//! The default base images, and how to make them offline from the host's own toolchains when
//! they cannot be pulled.
//!
//! Nothing here pulls: every recipe is a classic-builder build of a prepared context that
//! starts `FROM scratch` (or from another image made here), so a machine that reaches no
//! registry still gets working images:
//!
//! - [`BUSYBOX`] and [`PAUSE`]: the host's static busybox (Debian's `busybox-static`) with its
//!   applets as links, plus, for the pause image, a `/pause` that waits for a signal.
//! - [`DEBIAN_SLIM`] and [`BUILDPACK_DEPS`]: a Debian bookworm root file system made with
//!   `debootstrap --variant=minbase` through the mirror the host's apt uses, cached as a tarball
//!   in [`cache_dir`] (reused when present, so only the first make downloads) and added with
//!   `ADD rootfs.tar /`, which, unlike `COPY`, keeps the files' owners.
//! - [`GOLANG`], [`NODE`], [`RUST`]: the host's toolchain copied onto [`BUILDPACK_DEPS`], laid out
//!   and configured as the official image, and only when the host's version is the one the tag
//!   names.
//!
//! Every made image is checked by running a command in it (network `none`) before it counts as
//! made, and carries the [`RECIPE_LABEL`] and [`SOURCE_LABEL`] labels saying how it was made.
//! Makes are serialized across processes by file locks in [`cache_dir`].

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::fcntl::{Flock, FlockArg};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::context::Finished;
use crate::health::{Check, Fix};
use crate::{BuildSpec, Context, Docker, DockerError, OneShot, Progress};

/// `docker:go`'s default runtime image (the original's).
pub const BUSYBOX: &str = "busybox:1.35.0-glibc";
/// `docker:go`'s default build image: the Go toolchain on Debian bookworm.
pub const GOLANG: &str = "golang:1.26-bookworm";
/// `docker:node`'s default base image.
pub const NODE: &str = "node:20-bookworm";
/// `docker:rust`'s default build image.
pub const RUST: &str = "rust:1.95-bookworm";
/// `docker:rust`'s default runtime image.
pub const DEBIAN_SLIM: &str = "debian:bookworm-slim";
/// The image of `local:docker`'s pause containers (they hold each instance's namespaces).
pub const PAUSE: &str = "testground/pause:1";
/// The build root the toolchain images stand on, as the official ones stand on theirs: Debian
/// bookworm minbase with a C toolchain, git, certificates and pkg-config.
pub const BUILDPACK_DEPS: &str = "buildpack-deps:bookworm";

/// Every image this module can make, each after the images it is made from.
pub const DEFAULTS: &[&str] = &[
    BUSYBOX,
    PAUSE,
    DEBIAN_SLIM,
    BUILDPACK_DEPS,
    GOLANG,
    NODE,
    RUST,
];

/// Label on a made image: which recipe (and its version) made it.
pub const RECIPE_LABEL: &str = "testground.base.recipe";
/// Label on a made image: what it was made from.
pub const SOURCE_LABEL: &str = "testground.base.source";

/// Bumped when a recipe's output changes, so cached root file systems of the old recipe are not
/// reused.
const RECIPE_VERSION: &str = "v1";
/// The Debian release of the default images.
const SUITE: &str = "bookworm";
const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where made root file systems, locks and build contexts go: `$TG_CACHE_DIR`, else
/// `/var/cache/testground` as root, else `$XDG_CACHE_HOME/testground` (`~/.cache/testground`).
/// Never inside a repository clone: a root file system is hundreds of megabytes.
pub fn cache_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = env("TG_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/cache/testground");
    }
    if let Some(d) = env("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("testground");
    }
    if let Some(h) = env("HOME") {
        return PathBuf::from(h).join(".cache/testground");
    }
    std::env::temp_dir().join("testground-cache")
}

/// The id of image `image`; when the engine lacks it and this module has a recipe for it,
/// makes it offline first (reporting on `progress`); otherwise fails with
/// [`DockerError::MissingImage`] saying how to get it.
///
/// Safe to call from several processes at once: the second waits for the first's make (a file
/// lock in [`cache_dir`]) and then finds the image.
pub async fn ensure(
    docker: &Docker,
    image: &str,
    progress: Progress<'_>,
    cancel: &CancellationToken,
) -> Result<String, DockerError> {
    ensure_as(docker, image, image, progress, cancel).await
}

/// [`ensure`] under another name: the id of `as_tag`, made with `image`'s recipe when the
/// engine lacks it. Tests check the make-when-absent path this way without touching the
/// default-named images that others may be using.
pub async fn ensure_as(
    docker: &Docker,
    image: &str,
    as_tag: &str,
    progress: Progress<'_>,
    cancel: &CancellationToken,
) -> Result<String, DockerError> {
    if let Some(id) = docker.image_id(as_tag).await? {
        return Ok(id);
    }
    let Some(recipe) = Recipe::of(image) else {
        return Err(DockerError::MissingImage {
            image: as_tag.to_string(),
            hint: "pull or load it (`docker pull`, `docker load`), or build it, or name an image \
                   this engine has (e.g. `build_base_image`/`runtime_image` in the builder's \
                   configuration)"
                .into(),
        });
    };
    let source = recipe.source().map_err(|why| missing(as_tag, &why))?;
    progress(&format!(
        "{as_tag} is not in the Docker engine: making it offline from {}",
        source.describe()
    ));
    let _lock = lock(&format!("image-{as_tag}"), progress, cancel).await?;
    // Another process may have made it while we waited for the lock.
    if let Some(id) = docker.image_id(as_tag).await? {
        progress(&format!("{as_tag} was made meanwhile by another process"));
        return Ok(id);
    }
    make_from(docker, recipe, source, as_tag, progress, cancel).await
}

/// Makes image `image` (one of [`DEFAULTS`]) with its recipe, whether the engine has it or not,
/// and tags the result `as_tag` (not `image`): tests check a recipe this way without touching
/// the default-named images that others may be using. The images it is made from (e.g.
/// [`BUILDPACK_DEPS`]) are [`ensure`]d under their default names.
pub async fn make(
    docker: &Docker,
    image: &str,
    as_tag: &str,
    progress: Progress<'_>,
    cancel: &CancellationToken,
) -> Result<String, DockerError> {
    let recipe = Recipe::of(image).ok_or_else(|| {
        DockerError::Other(format!("there is no recipe that makes {image} offline"))
    })?;
    let source = recipe.source().map_err(|why| missing(image, &why))?;
    let _lock = lock(&format!("image-{as_tag}"), progress, cancel).await?;
    make_from(docker, recipe, source, as_tag, progress, cancel).await
}

/// Whether `image` has a recipe here, and if so what it would be made from (`Ok`) or why it
/// cannot be made on this host and how to get it instead (`Err`).
pub fn recipe(image: &str) -> Option<Result<String, String>> {
    Recipe::of(image).map(|r| r.source().map(|s| s.describe()))
}

/// One check per image of [`DEFAULTS`]: present (ok), or missing with what makes it; with
/// `fix`, each missing one is made ([`ensure`]) and the outcome is in [`Check::fix`]. Images
/// are checked in order, so a toolchain image's build root is made before it.
pub async fn health(docker: &Docker, fix: bool, progress: Progress<'_>) -> Vec<Check> {
    let cancel = CancellationToken::new();
    let mut checks = Vec::new();
    for &image in DEFAULTS {
        let recipe = Recipe::of(image).expect("every default has a recipe");
        let name = recipe.check_name();
        let present = match docker.api().inspect_image(image).await {
            Ok(i) => Some(i),
            Err(e) if crate::is_not_found(&e) => None,
            Err(e) => {
                checks.push(Check::new(
                    name,
                    false,
                    format!("cannot inspect {image}: {e}"),
                ));
                continue;
            }
        };
        if let Some(i) = present {
            let id = i.id.unwrap_or_default();
            let made = i
                .config
                .and_then(|c| c.labels)
                .and_then(|l| l.get(SOURCE_LABEL).cloned());
            let how = match made {
                Some(s) => format!("made offline from {s}"),
                None => "pulled, loaded or built elsewhere".into(),
            };
            checks.push(Check::new(
                name,
                true,
                format!("{image} is present ({}; {how})", short(&id)),
            ));
            continue;
        }
        let mut check = match recipe.source() {
            Ok(s) => Check::new(
                name,
                false,
                format!(
                    "{image} is missing; `testground healthcheck --runner local:docker --fix` \
                     makes it offline from {}",
                    s.describe()
                ),
            ),
            Err(why) => Check::new(
                name,
                false,
                format!("{image} is missing and cannot be made on this host: {why}"),
            ),
        };
        if fix {
            let started = Instant::now();
            let outcome = ensure(docker, image, progress, &cancel).await;
            check.fix = Some(match outcome {
                Ok(id) => Fix {
                    ok: true,
                    message: format!(
                        "made {image} ({}) in {:.1} s",
                        short(&id),
                        started.elapsed().as_secs_f64()
                    ),
                },
                Err(e) => Fix {
                    ok: false,
                    message: format!("could not make {image}: {e}"),
                },
            });
        }
        checks.push(check);
    }
    checks
}

/// `sha256:0123456789ab…` → `0123456789ab`.
pub(crate) fn short(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    &id[..id.len().min(12)]
}

fn missing(image: &str, why: &str) -> DockerError {
    DockerError::MissingImage {
        image: image.to_string(),
        hint: why.to_string(),
    }
}

/// How each default image is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recipe {
    Busybox,
    Pause,
    DebianSlim,
    BuildRoot,
    Go,
    Node,
    Rust,
}

/// What a recipe is made from on this host.
enum Source {
    Busybox(PathBuf),
    Rootfs(&'static RootfsSpec),
    Go { root: PathBuf, version: String },
    Node(HostNode),
    Rust { sysroot: PathBuf, version: String },
}

struct HostNode {
    node: PathBuf,
    /// The `npm` package directory (`…/node_modules/npm`).
    npm: PathBuf,
    /// Node's headers (`<prefix>/include/node`), for native add-ons, when the host has them.
    include: Option<PathBuf>,
    version: String,
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::Busybox(p) => format!("the host's static busybox ({})", p.display()),
            Source::Rootfs(spec) => format!(
                "a Debian {SUITE} root file system ({}; cached in {})",
                spec.describe(),
                cache_dir().join("rootfs").display()
            ),
            Source::Go { root, version } => {
                format!(
                    "the host's Go {version} ({}) on {BUILDPACK_DEPS}",
                    root.display()
                )
            }
            Source::Node(n) => format!(
                "the host's Node.js {} ({}) and npm ({}) on {BUILDPACK_DEPS}",
                n.version,
                n.node.display(),
                n.npm.display()
            ),
            Source::Rust { sysroot, version } => format!(
                "the host's Rust {version} toolchain ({}) on {BUILDPACK_DEPS}",
                sysroot.display()
            ),
        }
    }
}

impl Recipe {
    fn of(image: &str) -> Option<Recipe> {
        Some(match image {
            BUSYBOX => Recipe::Busybox,
            PAUSE => Recipe::Pause,
            DEBIAN_SLIM => Recipe::DebianSlim,
            BUILDPACK_DEPS => Recipe::BuildRoot,
            GOLANG => Recipe::Go,
            NODE => Recipe::Node,
            RUST => Recipe::Rust,
            _ => return None,
        })
    }

    fn image(self) -> &'static str {
        match self {
            Recipe::Busybox => BUSYBOX,
            Recipe::Pause => PAUSE,
            Recipe::DebianSlim => DEBIAN_SLIM,
            Recipe::BuildRoot => BUILDPACK_DEPS,
            Recipe::Go => GOLANG,
            Recipe::Node => NODE,
            Recipe::Rust => RUST,
        }
    }

    /// The health check's name (`HealthCheck::name` is `&'static str`).
    fn check_name(self) -> &'static str {
        match self {
            Recipe::Busybox => "image busybox:1.35.0-glibc",
            Recipe::Pause => "image testground/pause:1",
            Recipe::DebianSlim => "image debian:bookworm-slim",
            Recipe::BuildRoot => "image buildpack-deps:bookworm",
            Recipe::Go => "image golang:1.26-bookworm",
            Recipe::Node => "image node:20-bookworm",
            Recipe::Rust => "image rust:1.95-bookworm",
        }
    }

    /// What this host makes it from, or why it cannot and what to do instead.
    fn source(self) -> Result<Source, String> {
        let image = self.image();
        let instead = || {
            format!(
                "or load {image} (`docker load -i image.tar`, e.g. saved with `docker save` where \
                 a registry is reachable), or set `build_base_image`/`runtime_image` in the \
                 builder's configuration to an image this engine has"
            )
        };
        let want = tag_version(image);
        match self {
            Recipe::Busybox | Recipe::Pause => host_busybox()
                .map(Source::Busybox)
                .map_err(|e| format!("{e}; {}", instead())),
            Recipe::DebianSlim => {
                rootfs_source(&SLIM_ROOTFS).map_err(|e| format!("{e}; {}", instead()))
            }
            Recipe::BuildRoot => {
                rootfs_source(&BUILD_ROOTFS).map_err(|e| format!("{e}; {}", instead()))
            }
            Recipe::Go => {
                let (root, version) = host_go().map_err(|e| format!("{e}; {}", instead()))?;
                if !version_matches(&version, want) {
                    return Err(format!(
                        "the host's Go is {version} ({}), not {want}: install Go {want} at \
                         /usr/local/go, {}",
                        root.display(),
                        instead()
                    ));
                }
                Ok(Source::Go { root, version })
            }
            Recipe::Node => {
                let n = host_node().map_err(|e| format!("{e}; {}", instead()))?;
                if !version_matches(&n.version, want) {
                    return Err(format!(
                        "the host's Node.js is {} ({}), not {want}: install Node.js {want}, {}",
                        n.version,
                        n.node.display(),
                        instead()
                    ));
                }
                Ok(Source::Node(n))
            }
            Recipe::Rust => {
                let (sysroot, version) = host_rust().map_err(|e| format!("{e}; {}", instead()))?;
                if !version_matches(&version, want) {
                    return Err(format!(
                        "the host's Rust is {version} ({}), not {want}: `rustup toolchain \
                         install {want}` and make it the default, {}",
                        sysroot.display(),
                        instead()
                    ));
                }
                Ok(Source::Rust { sysroot, version })
            }
        }
    }

    /// The command that shows a made image works (run with network `none`).
    fn smoke(self) -> &'static [&'static str] {
        match self {
            Recipe::Busybox => &["sh", "-c", "ls / >/dev/null && test -d /tmp"],
            Recipe::Pause => &["sh", "-c", "test -x /pause"],
            Recipe::DebianSlim => &["bash", "-c", "apt-get --version >/dev/null"],
            Recipe::BuildRoot => &[
                "sh",
                "-c",
                "gcc --version >/dev/null && make --version >/dev/null && git --version && \
                 pkg-config --version >/dev/null",
            ],
            Recipe::Go => &["go", "version"],
            Recipe::Node => &["sh", "-c", "node --version && npm --version"],
            Recipe::Rust => &["sh", "-c", "rustc --version && cargo --version"],
        }
    }
}

/// `golang:1.26-bookworm` → `1.26`; `node:20-bookworm` → `20`.
fn tag_version(image: &str) -> &str {
    crate::split_tag(image).1.split('-').next().unwrap_or("")
}

/// `1.26.8` is a `1.26` and a `1`; `1.260` is not a `1.26`.
fn version_matches(host: &str, want: &str) -> bool {
    host == want || host.strip_prefix(want).is_some_and(|r| r.starts_with('.'))
}

/// Builds `recipe` from `source`, tags it `tag`, checks that it runs, returns its id.
async fn make_from(
    docker: &Docker,
    recipe: Recipe,
    source: Source,
    tag: &str,
    progress: Progress<'_>,
    cancel: &CancellationToken,
) -> Result<String, DockerError> {
    let started = Instant::now();
    let tmp = cache_dir().join("tmp");
    fs::create_dir_all(&tmp).map_err(DockerError::io(format!("create {}", tmp.display())))?;
    remove_stale_contexts(&tmp);
    let what = source.describe();
    let context = match &source {
        Source::Busybox(busybox) => {
            let (busybox, pause) = (busybox.clone(), recipe == Recipe::Pause);
            blocking(move || busybox_context(&busybox, pause)).await?
        }
        Source::Rootfs(spec) => {
            let tarball = rootfs(spec, progress, cancel).await?;
            blocking(move || {
                let mut c = Context::on_disk(&tmp)?;
                c.file(
                    "Dockerfile",
                    format!(
                        "FROM scratch\n\
                         # ADD unpacks the tarball keeping its owners (COPY would make all root's).\n\
                         ADD rootfs.tar /\n\
                         ENV PATH={PATH_ENV}\n\
                         CMD [\"bash\"]\n"
                    )
                    .as_bytes(),
                    0o644,
                )?;
                c.host_file(&tarball, "rootfs.tar")?;
                c.finish()
            })
            .await?
        }
        Source::Go { root, version } => {
            Box::pin(ensure(docker, BUILDPACK_DEPS, progress, cancel)).await?;
            let (root, version) = (root.clone(), version.clone());
            blocking(move || go_context(&tmp, &root, &version)).await?
        }
        Source::Node(n) => {
            Box::pin(ensure(docker, BUILDPACK_DEPS, progress, cancel)).await?;
            let n = HostNode {
                node: n.node.clone(),
                npm: n.npm.clone(),
                include: n.include.clone(),
                version: n.version.clone(),
            };
            blocking(move || node_context(&tmp, &n)).await?
        }
        Source::Rust { sysroot, version } => {
            Box::pin(ensure(docker, BUILDPACK_DEPS, progress, cancel)).await?;
            let (sysroot, version) = (sysroot.clone(), version.clone());
            blocking(move || rust_context(&tmp, &sysroot, &version)).await?
        }
    };
    progress(&format!(
        "building {tag} from a {:.1} MB context",
        context.len() as f64 / 1e6
    ));
    let mut labels = BTreeMap::new();
    labels.insert(
        RECIPE_LABEL.to_string(),
        format!("{}@{RECIPE_VERSION}", recipe.image()),
    );
    labels.insert(SOURCE_LABEL.to_string(), what.clone());
    // The builder's per-step chatter (intermediate containers, layer ids, and the warning that
    // the engine forwards no IPv4, which no recipe needs) says nothing about a recipe.
    let steps = |l: &str| {
        let t = l.trim_start();
        if !(t.starts_with("--->") || t.starts_with("Removing intermediate container")) {
            progress(l);
        }
    };
    let id = docker
        .build(
            BuildSpec {
                context,
                dockerfile: "Dockerfile".into(),
                tag: tag.to_string(),
                extra_tags: Vec::new(),
                build_args: BTreeMap::new(),
                labels,
                // No recipe runs a step: nothing needs a network.
                host_network: false,
            },
            &steps,
            cancel,
        )
        .await?;
    let smoke = OneShot {
        image: id.clone(),
        cmd: recipe.smoke().iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let out = docker.run_once(&smoke, progress, cancel).await?;
    if out.exit_code != 0 {
        // A made image that does not run must not be found by the next `ensure`.
        let _ = docker.remove_image(tag).await;
        return Err(DockerError::Build {
            message: format!(
                "{tag} was built from {what} but `{}` fails in it (exit {})",
                recipe.smoke().join(" "),
                out.exit_code
            ),
            tail: out.tail,
        });
    }
    progress(&format!(
        "made {tag} ({}) in {:.1} s",
        short(&id),
        started.elapsed().as_secs_f64()
    ));
    Ok(id)
}

/// Removes build contexts that killed makes left in `tmp` (a toolchain's is hundreds of
/// megabytes). Only old ones: a live make may still be sending its own.
fn remove_stale_contexts(tmp: &Path) {
    const STALE: std::time::Duration = std::time::Duration::from_secs(6 * 3600);
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE);
        if old && e.file_name().to_string_lossy().starts_with(".tg-context-") {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Runs blocking file work (walking toolchains, writing tarballs) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, DockerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DockerError::Other(format!("a context task failed: {e}")))?
        .map_err(DockerError::io("prepare a build context"))
}

/// Takes the exclusive lock `name` in [`cache_dir`]`/locks`, saying so when it must wait.
async fn lock(
    name: &str,
    progress: Progress<'_>,
    cancel: &CancellationToken,
) -> Result<Flock<File>, DockerError> {
    let dir = cache_dir().join("locks");
    fs::create_dir_all(&dir).map_err(DockerError::io(format!("create {}", dir.display())))?;
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = dir.join(format!("{safe}.lock"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(DockerError::io(format!("open {}", path.display())))?;
    let lock_err = |e: nix::errno::Errno| DockerError::Io {
        what: format!("lock {}", path.display()),
        source: e.into(),
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
            progress(&format!(
                "waiting for another process making {name} (lock {})",
                path.display()
            ));
            let wait = tokio::task::spawn_blocking(move || {
                Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| e)
            });
            tokio::select! {
                _ = cancel.cancelled() => Err(DockerError::Canceled),
                r = wait => r
                    .map_err(|e| DockerError::Other(format!("waiting for a lock: {e}")))?
                    .map_err(lock_err),
            }
        }
        Err((_, e)) => Err(lock_err(e)),
    }
}

// ---------------------------------------------------------------------------------------------
// Host toolchains

/// The host's static busybox: the images it goes into have no C library.
fn host_busybox() -> Result<PathBuf, String> {
    let candidates = ["/bin/busybox", "/usr/bin/busybox", "/usr/local/bin/busybox"];
    let mut dynamic = None;
    for c in candidates.iter().map(PathBuf::from).chain(which("busybox")) {
        if !c.is_file() {
            continue;
        }
        match is_static_elf(&c) {
            Ok(true) => return Ok(c),
            _ => dynamic = Some(c),
        }
    }
    Err(match dynamic {
        Some(d) => format!(
            "{} is not statically linked: install Debian's `busybox-static` (`apt-get install \
             busybox-static`)",
            d.display()
        ),
        None => "no busybox on this host: install Debian's `busybox-static` (`apt-get install \
                 busybox-static`)"
            .into(),
    })
}

/// True when `path` is an ELF executable without a program interpreter (`PT_INTERP`), i.e.
/// statically linked. Read by hand: 64-bit little-endian only (amd64 and arm64 hosts), anything
/// else counts as not static.
fn is_static_elf(path: &Path) -> io::Result<bool> {
    let data = fs::read(path)?;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    // ELF magic, ELFCLASS64, ELFDATA2LSB.
    if data.get(..6) != Some(b"\x7fELF\x02\x01") {
        return Ok(false);
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Ok(false);
    };
    const PT_INTERP: u32 = 3;
    for i in 0..phnum as usize {
        let off = phoff as usize + i * phentsize as usize;
        match u32_at(off) {
            Some(PT_INTERP) => return Ok(false),
            Some(_) => {}
            None => return Ok(false),
        }
    }
    Ok(true)
}

/// `name` on `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Runs `cmd args` and returns its trimmed standard output when it succeeds.
fn output(cmd: &Path, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The host's Go: `/usr/local/go` (where the official image has it), else `go env GOROOT`.
fn host_go() -> Result<(PathBuf, String), String> {
    let mut root = PathBuf::from("/usr/local/go");
    if !root.join("bin/go").is_file() {
        let go =
            which("go").ok_or("no Go on this host (neither /usr/local/go nor `go` on PATH)")?;
        root = output(&go, &["env", "GOROOT"])
            .map(PathBuf::from)
            .ok_or_else(|| format!("`{} env GOROOT` failed", go.display()))?;
    }
    // `VERSION`'s first line is `go1.26.8`; a source checkout without it answers `go env`.
    let version = fs::read_to_string(root.join("VERSION"))
        .ok()
        .and_then(|v| v.lines().next().map(str::to_string))
        .or_else(|| output(&root.join("bin/go"), &["env", "GOVERSION"]))
        .ok_or_else(|| format!("cannot tell the version of the Go at {}", root.display()))?;
    let version = version.trim().trim_start_matches("go").to_string();
    Ok((root, version))
}

/// The host's `node` binary and `npm` package.
fn host_node() -> Result<HostNode, String> {
    let node = which("node").ok_or("no Node.js on this host (`node` is not on PATH)")?;
    let node = fs::canonicalize(&node).unwrap_or(node);
    let version = output(&node, &["--version"])
        .ok_or_else(|| format!("`{} --version` failed", node.display()))?
        .trim_start_matches('v')
        .to_string();
    // `npm` is a link to `…/node_modules/npm/bin/npm-cli.js`.
    let npm_cli = which("npm")
        .and_then(|p| fs::canonicalize(p).ok())
        .ok_or("no npm on this host (`npm` is not on PATH)")?;
    let npm = npm_cli
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "npm") && p.join("package.json").is_file())
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("cannot find npm's package around {}", npm_cli.display()))?;
    let include = node
        .parent()
        .and_then(Path::parent)
        .map(|prefix| prefix.join("include/node"))
        .filter(|p| p.join("node_version.h").is_file());
    Ok(HostNode {
        node,
        npm,
        include,
        version,
    })
}

/// The host's Rust toolchain: `rustc --print sysroot` and its version.
fn host_rust() -> Result<(PathBuf, String), String> {
    let rustc = which("rustc").ok_or("no Rust on this host (`rustc` is not on PATH)")?;
    let sysroot = output(&rustc, &["--print", "sysroot"])
        .map(PathBuf::from)
        .ok_or("`rustc --print sysroot` failed")?;
    if !sysroot.join("bin/cargo").is_file() {
        return Err(format!(
            "the Rust toolchain at {} has no cargo",
            sysroot.display()
        ));
    }
    // `rustc 1.95.0 (59807616e 2026-04-14)`
    let version = output(&sysroot.join("bin/rustc"), &["--version"])
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        .ok_or_else(|| format!("cannot tell the version of {}/bin/rustc", sysroot.display()))?;
    Ok((sysroot, version))
}

// ---------------------------------------------------------------------------------------------
// Contexts

/// `/etc/passwd` and `/etc/group` of the busybox images, as the official image's.
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                      daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
                      nobody:x:65534:65534:nobody:/home:/bin/false\n";
const GROUP: &str = "root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n";

/// The pause containers' command. As PID 1 it gets no default signal action, so TERM, INT and
/// HUP are trapped to exit at once; a trapped signal ends `wait` immediately, where a foreground
/// `sleep` would hold the exit until the sleep ends. KILL needs no help.
const PAUSE_SCRIPT: &str = "#!/bin/sh\n\
                            trap 'exit 0' TERM INT HUP\n\
                            while :; do sleep 86400 & wait $!; done\n";

fn busybox_context(busybox: &Path, pause: bool) -> io::Result<Finished> {
    let applets = std::process::Command::new(busybox).arg("--list").output()?;
    if !applets.status.success() {
        return Err(io::Error::other(format!(
            "`{} --list` failed",
            busybox.display()
        )));
    }
    let mut c = Context::in_memory();
    let cmd = if pause { "[\"/pause\"]" } else { "[\"sh\"]" };
    c.file(
        "Dockerfile",
        format!("FROM scratch\nCOPY rootfs/ /\nENV PATH={PATH_ENV}\nCMD {cmd}\n").as_bytes(),
        0o644,
    )?;
    for (dir, mode) in [
        ("rootfs", 0o755),
        ("rootfs/bin", 0o755),
        ("rootfs/etc", 0o755),
        ("rootfs/home", 0o755),
        ("rootfs/root", 0o700),
        ("rootfs/tmp", 0o1777),
        ("rootfs/usr", 0o755),
        ("rootfs/usr/bin", 0o755),
        ("rootfs/usr/sbin", 0o755),
        ("rootfs/var", 0o755),
        ("rootfs/var/tmp", 0o1777),
    ] {
        c.dir(dir, mode)?;
    }
    c.host_file(busybox, "rootfs/bin/busybox")?;
    for applet in String::from_utf8_lossy(&applets.stdout).split_whitespace() {
        if applet != "busybox" && !applet.contains('/') {
            c.symlink(&format!("rootfs/bin/{applet}"), "busybox")?;
        }
    }
    // `#!/usr/bin/env` scripts.
    c.symlink("rootfs/usr/bin/env", "/bin/env")?;
    c.file("rootfs/etc/passwd", PASSWD.as_bytes(), 0o644)?;
    c.file("rootfs/etc/group", GROUP.as_bytes(), 0o644)?;
    if pause {
        c.file("rootfs/pause", PAUSE_SCRIPT.as_bytes(), 0o755)?;
    }
    c.finish()
}

fn go_context(tmp: &Path, root: &Path, version: &str) -> io::Result<Finished> {
    let mut c = Context::on_disk(tmp)?;
    // As the official image: GOPATH /go writable by anyone, the toolchain never switched.
    c.file(
        "Dockerfile",
        format!(
            "FROM {BUILDPACK_DEPS}\n\
             COPY go /usr/local/go\n\
             COPY gopath/ /\n\
             ENV GOLANG_VERSION={version} GOTOOLCHAIN=local GOPATH=/go \
             PATH=/go/bin:/usr/local/go/bin:{PATH_ENV}\n\
             WORKDIR /go\n"
        )
        .as_bytes(),
        0o644,
    )?;
    // Build leftovers the official image removes too.
    c.host_dir(root, "go", &|p| {
        p.starts_with("pkg/obj") || p.starts_with("pkg/bootstrap")
    })?;
    // `COPY dir /go` would create /go itself 0755: the mode of a copied directory's own entry
    // is kept only for the entries inside the copied one.
    c.dir("gopath", 0o755)?;
    c.dir("gopath/go", 0o1777)?;
    c.dir("gopath/go/src", 0o1777)?;
    c.dir("gopath/go/bin", 0o1777)?;
    c.finish()
}

fn node_context(tmp: &Path, n: &HostNode) -> io::Result<Finished> {
    let mut c = Context::on_disk(tmp)?;
    c.file(
        "Dockerfile",
        format!(
            "FROM {BUILDPACK_DEPS}\n\
             COPY local /usr/local/\n\
             ENV NODE_VERSION={}\n\
             CMD [\"node\"]\n",
            n.version
        )
        .as_bytes(),
        0o644,
    )?;
    // The official layout: /usr/local/bin/{node,npm,npx}, /usr/local/lib/node_modules/npm.
    c.dir("local", 0o755)?;
    c.dir("local/bin", 0o755)?;
    c.dir("local/lib", 0o755)?;
    c.dir("local/lib/node_modules", 0o755)?;
    c.host_file(&n.node, "local/bin/node")?;
    c.host_dir(&n.npm, "local/lib/node_modules/npm", &|_| false)?;
    c.symlink("local/bin/npm", "../lib/node_modules/npm/bin/npm-cli.js")?;
    c.symlink("local/bin/npx", "../lib/node_modules/npm/bin/npx-cli.js")?;
    if let Some(include) = &n.include {
        c.dir("local/include", 0o755)?;
        c.host_dir(include, "local/include/node", &|_| false)?;
    }
    c.finish()
}

fn rust_context(tmp: &Path, sysroot: &Path, version: &str) -> io::Result<Finished> {
    let mut c = Context::on_disk(tmp)?;
    // CARGO_HOME writable by anyone (as the official image), so `cargo install` and the registry
    // cache work for any user.
    c.file(
        "Dockerfile",
        format!(
            "FROM {BUILDPACK_DEPS}\n\
             COPY rust /usr/local/rust\n\
             COPY cargo/ /usr/local/\n\
             ENV RUST_VERSION={version} CARGO_HOME=/usr/local/cargo \
             PATH=/usr/local/cargo/bin:/usr/local/rust/bin:{PATH_ENV}\n"
        )
        .as_bytes(),
        0o644,
    )?;
    // The documentation is most of a toolchain's size and no build reads it.
    c.host_dir(sysroot, "rust", &|p| p.starts_with("share/doc"))?;
    // As for Go's /go: the mode of /usr/local/cargo comes from an entry inside the copied one.
    c.dir("cargo", 0o755)?;
    c.dir("cargo/cargo", 0o777)?;
    c.dir("cargo/cargo/bin", 0o777)?;
    c.finish()
}

// ---------------------------------------------------------------------------------------------
// Debian root file systems

/// A debootstrapped root file system.
struct RootfsSpec {
    /// Packages beyond minbase.
    include: &'static [&'static str],
    /// Trimmed as the official `-slim` images: no documentation, manual pages or locales, now
    /// or after later `apt-get install`s.
    slim: bool,
}

const SLIM_ROOTFS: RootfsSpec = RootfsSpec {
    include: &[],
    slim: true,
};
const BUILD_ROOTFS: RootfsSpec = RootfsSpec {
    include: &[
        "ca-certificates",
        "gcc",
        "git",
        "libc6-dev",
        "make",
        "pkg-config",
    ],
    slim: false,
};

impl RootfsSpec {
    /// The cache key: suite, variant, trimming and packages.
    fn key(&self) -> String {
        let mut key = format!("{RECIPE_VERSION}-{SUITE}-minbase");
        if self.slim {
            key.push_str("-slim");
        }
        for p in self.include {
            key.push('+');
            key.push_str(p);
        }
        key
    }

    fn tarball(&self) -> PathBuf {
        cache_dir()
            .join("rootfs")
            .join(format!("{}.tar", self.key()))
    }

    fn describe(&self) -> String {
        let mut d = "debootstrap --variant=minbase".to_string();
        if !self.include.is_empty() {
            d.push_str(&format!(" --include={}", self.include.join(",")));
        }
        if self.slim {
            d.push_str(", slimmed");
        }
        d
    }
}

/// A root file system can be had from the cache, or made by debootstrap as root.
fn rootfs_source(spec: &'static RootfsSpec) -> Result<Source, String> {
    if spec.tarball().is_file() {
        return Ok(Source::Rootfs(spec));
    }
    if which("debootstrap").is_none() && !Path::new("/usr/sbin/debootstrap").is_file() {
        return Err(
            "debootstrap is not installed: install it (`apt-get install debootstrap`)".into(),
        );
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(format!(
            "debootstrap needs root: run the fix once as root (`sudo testground healthcheck \
             --runner local:docker --fix`; as root the cache is /var/cache/testground, or set \
             TG_CACHE_DIR to {} to share this user's)",
            cache_dir().display()
        ));
    }
    Ok(Source::Rootfs(spec))
}

/// The Debian mirror the host's apt uses for `bookworm` (`TG_DEBIAN_MIRROR` overrides): one-line
/// `.list` entries and deb822 `.sources` both count; the first `deb` entry for the suite wins.
pub fn debian_mirror() -> String {
    if let Some(m) = std::env::var("TG_DEBIAN_MIRROR")
        .ok()
        .filter(|m| !m.is_empty())
    {
        return m;
    }
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        let found = match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => mirror_in_deb822(&text, SUITE),
            Some("list") => mirror_in_one_line(&text, SUITE),
            _ => None,
        };
        if let Some(m) = found {
            return m;
        }
    }
    "http://deb.debian.org/debian".into()
}

fn mirror_in_one_line(text: &str, suite: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut rest: Vec<&str> = words.collect();
        // `[arch=amd64 signed-by=…]` options.
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let end = rest.iter().position(|w| w.ends_with(']'))?;
            rest.drain(..=end);
        }
        if let [uri, s, ..] = rest.as_slice()
            && *s == suite
        {
            return Some(uri.trim_end_matches('/').to_string());
        }
    }
    None
}

fn mirror_in_deb822(text: &str, suite: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let mut fields: HashMap<String, String> = HashMap::new();
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = line.split_once(':')
                && !k.starts_with(' ')
            {
                fields.insert(k.trim().to_lowercase(), v.trim().to_string());
            }
        }
        let has = |k: &str, w: &str| {
            fields
                .get(k)
                .is_some_and(|v| v.split_whitespace().any(|x| x == w))
        };
        if fields.get("enabled").is_some_and(|v| v == "no") {
            continue;
        }
        if has("types", "deb") && has("suites", suite) {
            return fields
                .get("uris")
                .and_then(|u| u.split_whitespace().next())
                .map(|u| u.trim_end_matches('/').to_string());
        }
    }
    None
}

/// The cached tarball of `spec`, made first when missing (one process at a time).
async fn rootfs(
    spec: &RootfsSpec,
    progress: Progress<'_>,
    cancel: &CancellationToken,
) -> Result<PathBuf, DockerError> {
    let tarball = spec.tarball();
    if tarball.is_file() {
        progress(&format!(
            "using the cached root file system {}",
            tarball.display()
        ));
        return Ok(tarball);
    }
    let _lock = lock(&format!("rootfs-{}", spec.key()), progress, cancel).await?;
    if tarball.is_file() {
        progress(&format!(
            "{} was made meanwhile by another process",
            tarball.display()
        ));
        return Ok(tarball);
    }
    let started = Instant::now();
    let dir = tarball.parent().expect("in the cache").to_path_buf();
    fs::create_dir_all(&dir).map_err(DockerError::io(format!("create {}", dir.display())))?;
    let tmp = cache_dir().join("tmp");
    fs::create_dir_all(&tmp).map_err(DockerError::io(format!("create {}", tmp.display())))?;
    // A make killed outright (no destructor ran) left its work directory, maybe with
    // debootstrap's mounts in it; under this key's lock no other make uses one, and after an
    // hour the killed make's own debootstrap (in its own process group, so it outlived it) has
    // ended too.
    let prefix = format!("rootfs-{}-", spec.key());
    if let Ok(entries) = fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(3600));
            if old && e.file_name().to_string_lossy().starts_with(&prefix) {
                progress(&format!("removing a killed make's {}", e.path().display()));
                drop(WorkDir(e.path()));
            }
        }
    }
    let work = WorkDir(
        tempfile::Builder::new()
            .prefix(&format!("rootfs-{}-", spec.key()))
            .tempdir_in(&tmp)
            .map_err(DockerError::io("create a debootstrap directory"))?
            .keep(),
    );
    let target = work.0.join("root");
    let mirror = debian_mirror();
    let debs = cache_dir().join("debootstrap-debs");
    fs::create_dir_all(&debs).map_err(DockerError::io(format!("create {}", debs.display())))?;
    let mut args = vec![
        "--variant=minbase".to_string(),
        format!("--cache-dir={}", debs.display()),
    ];
    if !spec.include.is_empty() {
        args.push(format!("--include={}", spec.include.join(",")));
    }
    args.extend([
        SUITE.to_string(),
        target.display().to_string(),
        mirror.clone(),
    ]);
    progress(&format!(
        "debootstrap {} (the Debian {SUITE} root file system, from {mirror}; once, then cached)",
        args.join(" ")
    ));
    run_debootstrap(&args, progress, cancel).await?;
    let (t, out, slim) = (target.clone(), tarball.clone(), spec.slim);
    blocking(move || {
        trim(&t, slim)?;
        let partial = out.with_extension(format!("tar.{}.partial", std::process::id()));
        let written = write_rootfs_tar(&t, &partial).and_then(|()| fs::rename(&partial, &out));
        if written.is_err() {
            let _ = fs::remove_file(&partial);
        }
        written
    })
    .await?;
    drop(work);
    progress(&format!(
        "made the root file system {} ({:.0} MB) in {:.1} s",
        tarball.display(),
        fs::metadata(&tarball).map(|m| m.len()).unwrap_or(0) as f64 / 1e6,
        started.elapsed().as_secs_f64()
    ));
    Ok(tarball)
}

/// A debootstrap work directory: whatever happens, what debootstrap mounted in it (`proc`,
/// `sys`, when it is killed before it unmounts them) is unmounted before it is removed, so the
/// removal never walks into the host's `/proc` or `/sys`.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        unmount_under(&self.0);
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn unmount_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    // Deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("unmount {}: {e}", p.display());
        }
    }
}

/// Kills a process group when dropped (a canceled or dropped make): debootstrap's children
/// (dpkg in the chroot) must not outlive it.
struct Group(Option<nix::unistd::Pid>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// True for debootstrap's per-package lines (`I: Retrieving adduser 3.134`, `I: Configuring
/// apt...`), which are not worth a progress line each.
fn per_package(line: &str) -> bool {
    let Some((verb, rest)) = line.strip_prefix("I: ").and_then(|l| l.split_once(' ')) else {
        return false;
    };
    let words: Vec<&str> = rest.trim_end().split(' ').collect();
    match verb {
        // `<package> <version>`
        "Retrieving" | "Validating" => words.len() == 2,
        // `<package>...`
        "Extracting" | "Unpacking" | "Configuring" => words.len() == 1 && words[0].ends_with("..."),
        _ => false,
    }
}

async fn run_debootstrap(
    args: &[String],
    progress: Progress<'_>,
    cancel: &CancellationToken,
) -> Result<(), DockerError> {
    let mut child = tokio::process::Command::new("debootstrap")
        .args(args)
        .env(
            "PATH",
            format!("{PATH_ENV}:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(DockerError::io("start debootstrap"))?;
    let mut group = Group(child.id().map(|p| nix::unistd::Pid::from_raw(p as i32)));
    let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut err = BufReader::new(child.stderr.take().expect("piped")).lines();
    let mut tail = std::collections::VecDeque::new();
    let (mut out_done, mut err_done, mut packages) = (false, false, 0usize);
    let mut note = |line: String| {
        if per_package(&line) {
            packages += 1;
        } else {
            progress(&line);
        }
        if tail.len() == 30 {
            tail.pop_front();
        }
        tail.push_back(line);
    };
    while !(out_done && err_done) {
        tokio::select! {
            _ = cancel.cancelled() => return Err(DockerError::Canceled),
            l = out.next_line(), if !out_done => match l {
                Ok(Some(l)) => note(l),
                _ => out_done = true,
            },
            l = err.next_line(), if !err_done => match l {
                Ok(Some(l)) => note(l),
                _ => err_done = true,
            },
        }
    }
    let status = tokio::select! {
        _ = cancel.cancelled() => return Err(DockerError::Canceled),
        s = child.wait() => s.map_err(DockerError::io("wait for debootstrap"))?,
    };
    group.0 = None;
    if !status.success() {
        return Err(DockerError::Build {
            message: format!("debootstrap failed ({status}) after {packages} package steps"),
            tail: Vec::from(tail).join("\n"),
        });
    }
    Ok(())
}

/// What no image needs: the package lists and downloaded packages (an image's user runs
/// `apt-get update` first, as with the official images), the host's name and resolver (the
/// engine provides them); for `slim`, documentation, manual pages and locales, and a dpkg
/// configuration that keeps later installs from bringing them back (the official `-slim`
/// images' rules).
fn trim(root: &Path, slim: bool) -> io::Result<()> {
    let clear = |dir: &str, keep: &dyn Fn(&Path) -> bool| -> io::Result<()> {
        let Ok(entries) = fs::read_dir(root.join(dir)) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let p = e.path();
            if keep(&p) {
                continue;
            }
            if e.file_type()?.is_dir() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
        }
        Ok(())
    };
    let is = |name: &'static str| move |p: &Path| p.file_name().is_some_and(|n| n == name);
    clear("var/lib/apt/lists", &|p| {
        p.file_name().is_some_and(|n| n == "partial" || n == "lock")
    })?;
    clear("var/cache/apt/archives", &|p| {
        p.file_name().is_some_and(|n| n == "partial" || n == "lock")
    })?;
    for f in [
        "var/cache/apt/pkgcache.bin",
        "var/cache/apt/srcpkgcache.bin",
        "etc/hostname",
        "etc/resolv.conf",
    ] {
        let _ = fs::remove_file(root.join(f));
    }
    if slim {
        fs::create_dir_all(root.join("etc/dpkg/dpkg.cfg.d"))?;
        fs::write(
            root.join("etc/dpkg/dpkg.cfg.d/docker"),
            "# As Debian's official -slim images: no documentation, manual pages or locales.\n\
             path-exclude /usr/share/doc/*\n\
             path-include /usr/share/doc/*/copyright\n\
             path-exclude /usr/share/groff/*\n\
             path-exclude /usr/share/info/*\n\
             path-exclude /usr/share/linda/*\n\
             path-exclude /usr/share/lintian/overrides/*\n\
             path-exclude /usr/share/locale/*\n\
             path-exclude /usr/share/man/*\n",
        )?;
        if let Ok(docs) = fs::read_dir(root.join("usr/share/doc")) {
            for d in docs.flatten() {
                if d.file_type()?.is_dir() {
                    clear(
                        &format!("usr/share/doc/{}", d.file_name().to_string_lossy()),
                        &is("copyright"),
                    )?;
                }
            }
        }
        for dir in [
            "usr/share/groff",
            "usr/share/info",
            "usr/share/linda",
            "usr/share/lintian/overrides",
            "usr/share/locale",
            "usr/share/man",
        ] {
            clear(dir, &|_| false)?;
        }
    }
    Ok(())
}

/// Writes the tree at `root` as a tarball that keeps owners, modes, links and hard links; the
/// contents of `dev`, `proc` and `sys` stay out (the engine provides them), as do sockets and
/// fifos.
fn write_rootfs_tar(root: &Path, out: &Path) -> io::Result<()> {
    let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, File::create(out)?));
    tar.follow_symlinks(false);
    let mut first_of: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut walk = walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter();
    while let Some(entry) = walk.next() {
        let entry = entry.map_err(io::Error::other)?;
        let rel = entry
            .path()
            .strip_prefix(root)
            .map_err(io::Error::other)?
            .to_path_buf();
        if rel.as_os_str().is_empty() {
            continue;
        }
        let mut parts = rel.components();
        let top = parts.next().map(|c| c.as_os_str().to_owned());
        if parts.next().is_some() && top.is_some_and(|t| t == "dev" || t == "proc" || t == "sys") {
            if entry.file_type().is_dir() {
                walk.skip_current_dir();
            }
            continue;
        }
        let meta = entry.path().symlink_metadata()?;
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        h.set_mode(meta.mode() & 0o7777);
        let ft = meta.file_type();
        if ft.is_dir() {
            h.set_size(0);
            tar.append_data(&mut h, &rel, io::empty())?;
        } else if ft.is_symlink() {
            h.set_size(0);
            tar.append_link(&mut h, &rel, fs::read_link(entry.path())?)?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = first_of.get(&key) {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    tar.append_link(&mut h, &rel, first)?;
                    continue;
                }
                first_of.insert(key, rel.clone());
            }
            tar.append_data(&mut h, &rel, File::open(entry.path())?)?;
        }
    }
    let mut w = tar.into_inner()?;
    w.flush()?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_name_their_images() {
        for &image in DEFAULTS {
            let r = Recipe::of(image).unwrap();
            assert_eq!(r.image(), image);
            assert_eq!(r.check_name(), format!("image {image}"));
        }
        assert!(Recipe::of("alpine:3").is_none());
    }

    #[test]
    fn versions_match_by_prefix_of_whole_components() {
        assert_eq!(tag_version(GOLANG), "1.26");
        assert_eq!(tag_version(NODE), "20");
        assert_eq!(tag_version(RUST), "1.95");
        assert!(version_matches("1.26.8", "1.26"));
        assert!(version_matches("1.26", "1.26"));
        assert!(!version_matches("1.260.1", "1.26"));
        assert!(!version_matches("1.25.3", "1.26"));
        assert!(version_matches("20.20.2", "20"));
        assert!(!version_matches("2.0.1", "20"));
    }

    #[test]
    fn mirrors_are_read_from_both_source_formats() {
        let one = "# c\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian/ bookworm main\n\
                   deb http://sec.example/debian-security bookworm-security main\n";
        assert_eq!(
            mirror_in_one_line(one, "bookworm").as_deref(),
            Some("http://m.example/debian")
        );
        let deb822 = "Types: deb\nURIs: http://sec.example/x\nSuites: bookworm-security\n\n\
                      Types: deb\n# snapshot\nURIs: http://m.example/debian\nSuites: bookworm \
                      bookworm-updates\nComponents: main\n";
        assert_eq!(
            mirror_in_deb822(deb822, "bookworm").as_deref(),
            Some("http://m.example/debian")
        );
        assert_eq!(
            mirror_in_deb822("Types: deb-src\nURIs: x\nSuites: bookworm\n", "bookworm"),
            None
        );
    }

    #[test]
    fn debootstrap_package_lines_are_counted_not_shown() {
        assert!(per_package("I: Retrieving adduser 3.134"));
        assert!(per_package("I: Validating adduser 3.134"));
        assert!(per_package("I: Configuring apt..."));
        assert!(!per_package("I: Unpacking the base system..."));
        assert!(!per_package("I: Retrieving InRelease "));
        assert!(!per_package("I: Configuring required packages..."));
        assert!(!per_package("W: Failure trying to run: chroot"));
    }

    #[test]
    fn the_hosts_busybox_is_recognized_as_static_or_not() {
        // The test binary itself is dynamically linked.
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me).unwrap());
        assert!(!is_static_elf(Path::new("/etc/passwd")).unwrap());
        if Path::new("/bin/busybox").is_file() && host_busybox().is_ok() {
            assert!(is_static_elf(&host_busybox().unwrap()).unwrap());
        }
    }

    #[test]
    fn rootfs_tarballs_keep_owners_links_and_hard_links_but_not_devices() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("dev/pts")).unwrap();
        fs::create_dir_all(root.join("tmp")).unwrap();
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::write(root.join("etc/a"), "a").unwrap();
        fs::hard_link(root.join("etc/a"), root.join("etc/b")).unwrap();
        std::os::unix::fs::symlink("a", root.join("etc/l")).unwrap();
        fs::write(root.join("dev/null"), "").unwrap();
        let out = dir.path().join("r.tar");
        write_rootfs_tar(&root, &out).unwrap();
        let mut ar = tar::Archive::new(File::open(&out).unwrap());
        let mut got = BTreeMap::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            got.insert(
                e.path().unwrap().to_string_lossy().into_owned(),
                (e.header().entry_type(), e.header().mode().unwrap()),
            );
        }
        let names: Vec<&str> = got.keys().map(|s| s.as_str()).collect();
        assert_eq!(names, ["dev", "etc", "etc/a", "etc/b", "etc/l", "tmp"]);
        assert_eq!(got["etc/b"].0, tar::EntryType::Link);
        assert_eq!(got["etc/l"].0, tar::EntryType::Symlink);
        assert_eq!(got["tmp"].1, 0o1777);
    }
}
