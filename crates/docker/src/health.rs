//! The Docker side of `testground healthcheck --runner local:docker [--fix]`.

use crate::base::{self, BUSYBOX, PAUSE};
use crate::{Docker, DockerError, MIN_API, Progress};

/// One check, shaped as the runner's `HealthCheck` (whose `name` is `&'static str` too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub message: String,
    /// Set when a fix was tried (`fix` was asked and the check failed).
    pub fix: Option<Fix>,
}

/// The outcome of fixing a failed check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fix {
    pub ok: bool,
    pub message: String,
}

impl Check {
    pub fn new(name: &'static str, ok: bool, message: impl Into<String>) -> Check {
        Check {
            name,
            ok,
            message: message.into(),
            fix: None,
        }
    }

    /// Ok as checked, or fixed.
    pub fn passes(&self) -> bool {
        self.ok || self.fix.as_ref().is_some_and(|f| f.ok)
    }
}

/// Everything `local:docker` needs from the host, checked (and with `fix`, the default images
/// made offline): the engine answers (its version, the negotiated API, at least [`MIN_API`]),
/// this user may use it, Debian's `busybox-static` and `debootstrap` are there when an image
/// needs them, and each image of [`base::DEFAULTS`] is present or, with `fix`, made by
/// [`base::ensure`] (the outcome in [`Check::fix`]). A failed check's message says what is
/// missing and the command that fixes it. Never fails: problems are checks.
///
/// The runner wires it in one line (`HealthCheck`/`HealthFix` have the same fields):
///
/// ```ignore
/// fn healthcheck(&self, fix: bool) -> BoxFuture<'static, Vec<HealthCheck>> {
///     Box::pin(async move { tg_docker::health(fix, &|l| tracing::info!("{l}")).await.into_iter().map(|c| HealthCheck { name: c.name, ok: c.ok, message: c.message, fix: c.fix.map(|f| HealthFix { ok: f.ok, message: f.message }) }).collect() })
/// }
/// ```
///
/// `progress` gets a line per step of a make (debootstrap's phases, the build's steps); a cold
/// `--fix` takes minutes (a root file system is downloaded once, then cached in
/// [`base::cache_dir`]), a warm one seconds.
pub async fn health(fix: bool, progress: Progress<'_>) -> Vec<Check> {
    let mut checks = Vec::new();
    let docker = match Docker::connect().await {
        Ok(d) => {
            let api_ok = api_at_least(d.api_version(), MIN_API);
            checks.push(Check::new(
                "docker engine",
                api_ok,
                format!(
                    "Docker {} at {}, API {}{}",
                    d.server_version(),
                    d.endpoint(),
                    d.api_version(),
                    if api_ok {
                        String::new()
                    } else {
                        format!(" (older than {MIN_API}: install a newer engine, e.g. Debian's `docker.io`)")
                    }
                ),
            ));
            checks.push(Check::new(
                "docker permission",
                true,
                "this user may use the engine",
            ));
            Some(d)
        }
        Err(e @ DockerError::Permission { .. }) => {
            checks.push(Check::new(
                "docker engine",
                true,
                format!("an engine socket is at {}", crate::endpoint()),
            ));
            checks.push(Check::new("docker permission", false, e.to_string()));
            None
        }
        Err(e) => {
            checks.push(Check::new("docker engine", false, e.to_string()));
            None
        }
    };
    // What the host tools are needed for depends on which images are missing.
    let mut missing = Vec::new();
    if let Some(d) = &docker {
        for &image in base::DEFAULTS {
            if matches!(d.image_id(image).await, Ok(None)) {
                missing.push(image);
            }
        }
    }
    let busybox_needed = docker.is_none() || missing.iter().any(|i| *i == BUSYBOX || *i == PAUSE);
    checks.push(tool_check(
        "busybox-static",
        base::recipe(BUSYBOX).expect("a recipe"),
        busybox_needed,
        "busybox:1.35.0-glibc and testground/pause:1",
    ));
    let debootstrap_needed =
        docker.is_none() || missing.iter().any(|i| !matches!(*i, BUSYBOX | PAUSE));
    checks.push(tool_check(
        "debootstrap",
        base::recipe(base::DEBIAN_SLIM)
            .expect("a recipe")
            .and(base::recipe(base::BUILDPACK_DEPS).expect("a recipe")),
        debootstrap_needed,
        "debian:bookworm-slim and buildpack-deps:bookworm (the toolchain images' base)",
    ));
    match &docker {
        Some(d) => checks.extend(base::health(d, fix, progress).await),
        None => checks.push(Check::new(
            "images",
            false,
            "not checked: no usable Docker engine",
        )),
    }
    checks
}

/// A host tool check: fine when it is usable, or not needed (the images it makes are there).
fn tool_check(
    name: &'static str,
    usable: Result<String, String>,
    needed: bool,
    images: &str,
) -> Check {
    match usable {
        Ok(from) => Check::new(name, true, format!("{images} can be made from {from}")),
        Err(_) if !needed => Check::new(
            name,
            true,
            format!("not usable here, and not needed: {images} are present"),
        ),
        Err(why) => Check::new(name, false, format!("{images} cannot be made: {why}")),
    }
}

/// `1.41` ≥ `1.41`; compares numerically (`1.9` < `1.41`).
fn api_at_least(have: &str, want: &str) -> bool {
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(have) >= parse(want)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one line of [`health`]'s documentation compiles against the runner's types (copied
    /// here: this crate cannot depend on the runner's).
    #[test]
    fn the_runner_wiring_in_the_docs_compiles() {
        #[allow(dead_code)]
        struct HealthCheck {
            name: &'static str,
            ok: bool,
            message: String,
            fix: Option<HealthFix>,
        }
        #[allow(dead_code)]
        struct HealthFix {
            ok: bool,
            message: String,
        }
        #[rustfmt::skip]
        fn healthcheck(fix: bool) -> futures::future::BoxFuture<'static, Vec<HealthCheck>> {
            Box::pin(async move { crate::health(fix, &|l| tracing::info!("{l}")).await.into_iter().map(|c| HealthCheck { name: c.name, ok: c.ok, message: c.message, fix: c.fix.map(|f| HealthFix { ok: f.ok, message: f.message }) }).collect() })
        }
        let _ = healthcheck;
    }

    #[test]
    fn api_versions_compare_numerically() {
        assert!(api_at_least("1.41", "1.41"));
        assert!(api_at_least("1.45", "1.41"));
        assert!(!api_at_least("1.9", "1.41"));
        assert!(!api_at_least("1.40", "1.41"));
    }
}
