//! Command implementations and what they share: the home directory, `.env.toml`, the backend
//! and plan lookup.

mod build;
mod daemon;
mod plan;
mod run;
mod tasks;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tg_api::manifest::Manifest;
use tg_daemon::{EnvConfig, Home};

use crate::cli::{Cli, Command, GlobalArgs};
use crate::client::{Backend, Remote};
use crate::log;
use crate::out::outln;

pub async fn dispatch(cli: Cli) -> Result<()> {
    let g = cli.global;
    match cli.command {
        Command::Version => {
            // The original's two lines first (scripts read them), then the version.
            outln!("Testground");
            outln!(
                "Git commit: {}",
                option_env!("TG_GIT_COMMIT").unwrap_or("unknown")
            );
            outln!("Version: {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Plan(c) => plan::plan(&Ctx::load()?, c),
        Command::Describe(a) => plan::describe(&Ctx::load()?, &a),
        Command::Build(c) => build::build(Ctx::load()?, &g, c).await,
        Command::Run(c) => run::run(Ctx::load()?, &g, c).await,
        Command::Collect(a) => tasks::collect(Ctx::load()?, &g, &a).await,
        Command::Status(a) => tasks::status(Ctx::load()?, &g, &a).await,
        Command::Logs(a) => tasks::logs(Ctx::load()?, &g, &a).await,
        Command::Tasks => tasks::tasks(Ctx::load()?, &g).await,
        Command::Terminate(a) => tasks::terminate(Ctx::load()?, &g, &a).await,
        Command::Healthcheck(a) => tasks::healthcheck(Ctx::load()?, &g, &a).await,
        Command::Daemon => daemon::daemon(Ctx::load()?).await,
        Command::Dashboard(a) => daemon::dashboard(Ctx::load()?, a).await,
        Command::Sidecar(a) => anyhow::bail!(
            "testground sidecar --runner {}: not supported: the local:netns runner runs its \
             sidecar inside the engine (embedded or daemon); the docker and k8s sidecars are not \
             supported",
            a.runner
        ),
    }
}

/// What every command that touches the home directory starts with.
pub struct Ctx {
    pub home: Home,
    pub cfg: EnvConfig,
}

impl Ctx {
    /// Resolves and creates the home directory and reads `.env.toml`, logging the original's
    /// first lines.
    pub fn load() -> Result<Ctx> {
        let home = Home::resolve().context("cannot resolve the testground home directory")?;
        let created = home
            .ensure()
            .with_context(|| format!("cannot create home directory {}", home.root().display()))?;
        if created {
            log::info(format!(
                "creating home directory at {}",
                home.root().display()
            ));
        } else {
            log::info(format!("using home directory: {}", home.root().display()));
        }
        let env = home.env_toml();
        let (cfg, found) = EnvConfig::load(&env)?;
        if found {
            log::info(format!(".env.toml loaded from: {}", env.display()));
            for w in &cfg.warnings {
                log::warn(w);
            }
        } else {
            log::info(format!(
                "no .env.toml found at {}; running with defaults",
                env.display()
            ));
        }
        Ok(Ctx { home, cfg })
    }

    /// The backend: a daemon when an endpoint is configured (`--endpoint`, then `[client]
    /// endpoint`); else the daemon answering on this home's `[daemon] listen` address, if one
    /// does (the set-up tells users to start `testground daemon` first); else an in-process
    /// engine. `--endpoint ''` or a non-empty `TESTGROUND_EMBEDDED` skip the search.
    pub async fn backend(&self, g: &GlobalArgs) -> Result<Backend> {
        let forced_embedded = g.endpoint.as_deref().is_some_and(|e| e.trim().is_empty())
            || std::env::var_os("TESTGROUND_EMBEDDED").is_some_and(|v| !v.is_empty());
        let mut endpoint = g
            .endpoint
            .clone()
            .or_else(|| self.cfg.client.endpoint.clone())
            .filter(|e| !e.trim().is_empty());
        if endpoint.is_none()
            && !forced_embedded
            && let Some(probe) = crate::client::probe_endpoint(&self.cfg.daemon.listen)
            && Remote::new(&probe, &self.cfg.client.token)?.answers().await
        {
            log::info(format!(
                "found a daemon at {probe}; sending it the task (--endpoint '' runs in this process instead)"
            ));
            endpoint = Some(probe);
        }
        let backend = match endpoint {
            Some(e) => Backend::Remote(Remote::new(&e, &self.cfg.client.token)?),
            None => Backend::Embedded(
                tg_daemon::Engine::start(self.home.clone(), self.cfg.clone())
                    .await
                    .context("cannot start the embedded engine")?,
            ),
        };
        log::info_kv(
            "testground client initialized",
            &[("addr", backend.addr().into())],
        );
        Ok(backend)
    }

    /// `$TESTGROUND_HOME/plans/<plan>` and its manifest.
    pub fn plan(&self, plan: &str) -> Result<(PathBuf, Manifest)> {
        let plan = plan.trim_matches('/');
        if plan.is_empty() {
            bail!("no test plan given");
        }
        if Path::new(plan)
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            bail!("invalid test plan name {plan:?}: expected a path under the plans directory");
        }
        let dir = self.home.plans_dir().join(plan);
        let manifest = dir.join("manifest.toml");
        if !manifest.is_file() {
            if dir.is_dir() {
                bail!(
                    "test plan {plan:?} has no manifest.toml at {}",
                    manifest.display()
                );
            }
            bail!(
                "test plan {plan:?} not found at {}; import it with `testground plan import --from <dir>`",
                dir.display()
            );
        }
        let m = tg_plan::load_manifest(&manifest)?;
        Ok((dir, m))
    }
}

/// The process environment, for `{{ .Env.NAME }}` in compositions.
pub fn process_env() -> std::collections::HashMap<String, String> {
    std::env::vars().collect()
}
