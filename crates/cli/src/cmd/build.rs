//! `build single|composition|purge`, and the submit/follow steps `run` shares.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use tg_api::composition::{Composition, Dependency};
use tg_api::manifest::{Manifest, Map};
use tg_api::rpc::TaskRequest;
use tg_api::task::{CreatedBy, Outcome, Task, TaskType};

use super::Ctx;
use crate::cli::{
    BuildCmd, BuildCompositionArgs, BuildPurgeArgs, BuildSingleArgs, GlobalArgs, SingleBuildFlags,
};
use crate::client::{Backend, Interrupts, consume, follow_task};
use crate::log;

pub async fn build(ctx: Ctx, g: &GlobalArgs, c: BuildCmd) -> Result<()> {
    match c {
        BuildCmd::Single(a) => single(ctx, g, a).await,
        BuildCmd::Composition(a) => composition(ctx, g, a).await,
        BuildCmd::Purge(a) => purge(ctx, g, a).await,
    }
}

pub(super) fn reject_link_sdk(link_sdk: &Option<String>) -> Result<()> {
    if link_sdk.is_some() {
        bail!(
            "--link-sdk is not supported yet; point the plan's dependency at the SDK instead (e.g. --dep or a go.mod replace)"
        );
    }
    Ok(())
}

/// `--build-cfg` / `--run-cfg` values, typed as the original infers them.
pub(super) fn typed_kvs(flag: &str, kvs: &[String]) -> Result<Map> {
    let mut m = Map::new();
    for s in kvs {
        let (k, v) = tg_plan::parse_kv(flag, s)?;
        m.insert(k, tg_plan::infer_typed(&v));
    }
    Ok(m)
}

pub(super) fn deps(flags: &SingleBuildFlags) -> Result<Vec<Dependency>> {
    Ok(flags
        .dep
        .iter()
        .map(|d| tg_plan::parse_dep(d))
        .collect::<Result<_, _>>()?)
}

/// Submits a task and returns its id. The response is printed like any other.
pub(super) async fn submit(
    backend: &Backend,
    req: TaskRequest,
    plan_dir: Option<&Path>,
) -> Result<String> {
    let chunks = backend.submit(req, plan_dir).await?;
    let v = consume(chunks, None).await?;
    match v {
        Value::String(id) if !id.is_empty() => Ok(id),
        other => Err(anyhow!("the daemon returned no task id (got {other})")),
    }
}

/// Follows a task's log to its end and returns the final task. Ctrl-C cancels the task (see
/// [`follow_task`]).
pub(super) async fn follow(
    backend: &Backend,
    task_id: &str,
    interrupts: &mut Interrupts,
) -> Result<Task> {
    let v = follow_task(backend, task_id, interrupts).await?;
    serde_json::from_value(v).with_context(|| format!("cannot decode task {task_id}"))
}

pub(super) fn created_by(
    ctx: &Ctx,
    repo: Option<&str>,
    branch: Option<&str>,
    commit: Option<&str>,
) -> CreatedBy {
    CreatedBy {
        user: ctx.cfg.client.user.clone(),
        repo: repo.unwrap_or_default().to_string(),
        branch: branch.unwrap_or_default().to_string(),
        commit: commit.unwrap_or_default().to_string(),
    }
}

/// Loads a composition file and its plan; replaces `global.plan` by the manifest's name, as the
/// plan path is only meaningful here. Returns the path the user gave for the plan too.
pub(super) fn load_composition_file(
    ctx: &Ctx,
    file: &Path,
) -> Result<(Composition, Manifest, PathBuf, String)> {
    let comp = tg_plan::load_composition(file, &super::process_env())?;
    if comp.global.plan.trim().is_empty() {
        bail!(
            "{}: global.plan: missing value; expected the test plan to use",
            file.display()
        );
    }
    let plan_path = comp.global.plan.clone();
    let (dir, manifest) = ctx.plan(&plan_path)?;
    Ok((comp, manifest, dir, plan_path))
}

/// Writes the effective composition back to `file` (`-w`), keeping the user's plan path.
pub(super) fn write_composition(
    file: &Path,
    effective: &Value,
    fallback: &Composition,
    plan_path: &str,
) -> Result<()> {
    let mut c: Composition =
        serde_json::from_value(effective.clone()).unwrap_or_else(|_| fallback.clone());
    c.global.plan = plan_path.to_string();
    let text = tg_plan::to_toml(&c)?;
    std::fs::write(file, text).with_context(|| format!("cannot write {}", file.display()))?;
    log::info(format!("wrote effective composition to {}", file.display()));
    Ok(())
}

async fn single(ctx: Ctx, g: &GlobalArgs, a: BuildSingleArgs) -> Result<()> {
    let f = &a.build;
    reject_link_sdk(&f.link_sdk)?;
    let build_config = typed_kvs("--build-cfg", &f.build_cfg)?;
    let dependencies = deps(f)?;
    let (dir, manifest) = ctx.plan(&f.plan)?;
    let comp = tg_plan::single_composition(tg_plan::SingleSpec {
        plan: f.plan.clone(),
        builder: f.builder.clone(),
        build_config,
        dependencies,
        ..Default::default()
    });
    run_build(&ctx, g, comp, manifest, &dir, f.wait, None, &f.plan).await
}

async fn composition(ctx: Ctx, g: &GlobalArgs, a: BuildCompositionArgs) -> Result<()> {
    let c = &a.comp;
    reject_link_sdk(&c.link_sdk)?;
    let (comp, manifest, dir, plan_path) = load_composition_file(&ctx, &c.file)?;
    let write = c.write_artifacts.then_some(c.file.as_path());
    run_build(&ctx, g, comp, manifest, &dir, c.wait, write, &plan_path).await
}

#[allow(clippy::too_many_arguments)]
async fn run_build(
    ctx: &Ctx,
    g: &GlobalArgs,
    mut comp: Composition,
    manifest: Manifest,
    plan_dir: &Path,
    wait: bool,
    write: Option<&Path>,
    plan_path: &str,
) -> Result<()> {
    tg_plan::validate_for_build(&comp, &manifest)?;
    comp.global.plan = manifest.name.clone();
    let backend = ctx.backend(g).await?;
    let res = async {
        // Writing artifacts back needs the finished task; an in-process engine must wait anyway.
        let waiting = wait || write.is_some() || backend.is_embedded();
        log::info(format!("test plan source at: {}", plan_dir.display()));
        let req = TaskRequest {
            task_type: TaskType::Build,
            priority: i32::from(waiting),
            composition: comp.clone(),
            manifest,
            build_groups: (0..comp.groups.len()).collect(),
            run_ids: Vec::new(),
            created_by: created_by(ctx, None, None, None),
            plan_archive: None,
        };
        let id = submit(&backend, req, Some(plan_dir)).await?;
        log::info(format!("build queued with ID: {id}"));
        if !waiting {
            return Ok(());
        }
        let mut interrupts = Interrupts::new()?;
        let task = follow(&backend, &id, &mut interrupts).await?;
        log::info(format!("finished build with ID: {id}"));
        if !task.error.is_empty() || task.outcome() != Outcome::Success {
            let why = if task.error.is_empty() {
                task.outcome().to_string()
            } else {
                task.error.clone()
            };
            bail!("build {id} failed: {why}");
        }
        let artifacts: Vec<String> =
            serde_json::from_value(task.result.clone()).unwrap_or_default();
        for (grp, art) in comp.groups.iter().zip(&artifacts) {
            log::info_kv(
                "generated build artifact",
                &[
                    ("group", grp.id.clone().into()),
                    ("artifact", art.clone().into()),
                ],
            );
        }
        if let Some(file) = write {
            // The task's composition has the artifacts; fill them from the result if not.
            let mut effective: Composition =
                serde_json::from_value(task.composition.clone()).unwrap_or_else(|_| comp.clone());
            for (grp, art) in effective.groups.iter_mut().zip(&artifacts) {
                if grp.run.artifact.is_empty() {
                    grp.run.artifact = art.clone();
                }
            }
            let v = serde_json::to_value(&effective)?;
            write_composition(file, &v, &comp, plan_path)?;
        }
        Ok(())
    }
    .await;
    backend.close_after(&res).await;
    res
}

async fn purge(ctx: Ctx, g: &GlobalArgs, a: BuildPurgeArgs) -> Result<()> {
    let backend = ctx.backend(g).await?;
    let res = async {
        let chunks = backend.purge(&a.builder, &a.plan).await?;
        consume(chunks, None).await?;
        log::info(format!(
            "finished purging testplan {} for builder {}",
            a.plan, a.builder
        ));
        Ok(())
    }
    .await;
    backend.close().await;
    res
}
