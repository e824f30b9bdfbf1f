//! `run single|composition`: the original's multi-run client flow.
//!
//! For each run id: submit (the first run builds what has no artifact; later runs reuse the
//! effective composition of the first, artifacts filled), then, when waiting, follow the task
//! to its end. A run that ends in error aborts the remaining ones. Finally one
//! `result <run_id>[<task_id>]: <outcome>` line per run, an optional CSV, and the exit code.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tg_api::composition::Composition;
use tg_api::exit;
use tg_api::manifest::Manifest;
use tg_api::rpc::TaskRequest;
use tg_api::task::{CreatedBy, GroupOutcome, Outcome, TaskType};

use super::Ctx;
use super::build::{
    created_by, deps, follow, load_composition_file, reject_link_sdk, submit, typed_kvs,
    write_composition,
};
use crate::Exit;
use crate::cli::{GlobalArgs, RunCmd, RunCommonFlags, RunCompositionArgs, RunSingleArgs};
use crate::client::{Backend, Interrupts, interrupted};
use crate::log;

pub async fn run(ctx: Ctx, g: &GlobalArgs, c: RunCmd) -> Result<()> {
    match c {
        RunCmd::Single(a) => single(ctx, g, a).await,
        RunCmd::Composition(a) => composition(ctx, g, a).await,
    }
}

/// Everything the run flow needs besides the composition.
struct Flow<'a> {
    manifest: Manifest,
    plan_dir: PathBuf,
    /// The plan as the user named it (written back by `-w`).
    plan_path: String,
    run_ids: Vec<String>,
    ignore_artifacts: bool,
    wait: bool,
    write: Option<&'a Path>,
    result_file: Option<&'a Path>,
    common: &'a RunCommonFlags,
    created_by: CreatedBy,
}

async fn single(ctx: Ctx, g: &GlobalArgs, a: RunSingleArgs) -> Result<()> {
    let f = &a.build;
    reject_link_sdk(&f.link_sdk)?;
    let build_config = typed_kvs("--build-cfg", &f.build_cfg)?;
    let run_config = typed_kvs("--run-cfg", &a.run_cfg)?;
    let mut test_params = BTreeMap::new();
    for s in &a.test_param {
        let (k, v) = tg_plan::parse_kv("--test-param", s)?;
        test_params.insert(k, v);
    }
    let dependencies = deps(f)?;
    let (plan_dir, manifest) = ctx.plan(&f.plan)?;
    let comp = tg_plan::single_composition(tg_plan::SingleSpec {
        plan: f.plan.clone(),
        case: a.testcase.clone(),
        builder: f.builder.clone(),
        runner: a.runner.clone(),
        instances: a.instances,
        build_config,
        run_config,
        test_params,
        dependencies,
        artifact: a.use_build.clone().unwrap_or_default(),
        disable_metrics: a.disable_metrics,
    });
    log::info(
        "created a synthetic composition file for this job; all instances will run under singleton group \"single\"",
    );
    let flow = Flow {
        manifest,
        plan_dir,
        plan_path: f.plan.clone(),
        run_ids: comp.run_ids().into_iter().map(str::to_owned).collect(),
        ignore_artifacts: false,
        wait: f.wait,
        write: None,
        result_file: None,
        common: &a.common,
        created_by: created_by(
            &ctx,
            a.common.metadata_repo.as_deref(),
            a.common.metadata_branch.as_deref(),
            a.common.metadata_commit.as_deref(),
        ),
    };
    run_flow(&ctx, g, comp, flow).await
}

async fn composition(ctx: Ctx, g: &GlobalArgs, a: RunCompositionArgs) -> Result<()> {
    let c = &a.comp;
    reject_link_sdk(&c.link_sdk)?;
    let (comp, manifest, plan_dir, plan_path) = load_composition_file(&ctx, &c.file)?;
    let known: Vec<String> = comp.run_ids().into_iter().map(str::to_owned).collect();
    let run_ids: Vec<String> = if a.run_ids.is_empty() {
        known.clone()
    } else {
        let ids: Vec<String> = a
            .run_ids
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        for id in &ids {
            if !known.contains(id) {
                bail!(
                    "{}: no run with id {id:?}; the composition has: {}",
                    c.file.display(),
                    known.join(", ")
                );
            }
        }
        ids
    };
    let flow = Flow {
        manifest,
        plan_dir,
        plan_path,
        run_ids,
        ignore_artifacts: a.ignore_artifacts,
        wait: c.wait,
        write: c.write_artifacts.then_some(c.file.as_path()),
        result_file: a.result_file.as_deref(),
        common: &a.common,
        created_by: created_by(
            &ctx,
            a.common.metadata_repo.as_deref(),
            a.common.metadata_branch.as_deref(),
            a.common.metadata_commit.as_deref(),
        ),
    };
    run_flow(&ctx, g, comp, flow).await
}

struct RunRecord {
    run_id: String,
    task_id: String,
    outcome: String,
    error: String,
    /// Per group `ok/total`, when the run got that far.
    groups: BTreeMap<String, GroupOutcome>,
    took: Option<chrono::Duration>,
}

impl RunRecord {
    fn failed(run_id: &str, task_id: &str, outcome: Outcome, error: String) -> RunRecord {
        RunRecord {
            run_id: run_id.to_string(),
            task_id: task_id.to_string(),
            outcome: outcome.to_string(),
            error,
            groups: BTreeMap::new(),
            took: None,
        }
    }
}

/// The summary at the end of a waited run on a terminal: a row per run and group. Off a
/// terminal it is not printed, so the original's `result ...` line stays the last line for the
/// scripts that read it (`tail -1`).
fn summary_table(records: &[RunRecord]) -> String {
    let mut rows = vec!["RUN\tGROUP\tOK\tTOTAL\tOUTCOME\tTOOK".to_string()];
    for r in records {
        let took = r
            .took
            .map(|d| format!("{:.1}s", d.num_milliseconds() as f64 / 1000.0))
            .unwrap_or_default();
        if r.groups.is_empty() {
            rows.push(format!("{}\t-\t-\t-\t{}\t{took}", r.run_id, r.outcome));
        }
        for (g, o) in &r.groups {
            let outcome = if o.ok == o.total {
                Outcome::Success
            } else {
                Outcome::Failure
            };
            rows.push(format!(
                "{}\t{g}\t{}\t{}\t{outcome}\t{took}",
                r.run_id, o.ok, o.total
            ));
        }
    }
    crate::table::render(&rows, 2, false)
}

async fn run_flow(ctx: &Ctx, g: &GlobalArgs, mut comp: Composition, flow: Flow<'_>) -> Result<()> {
    tg_plan::validate_for_run(&comp, &flow.manifest)?;
    for w in tg_plan::undeclared_test_params(&comp, &flow.manifest) {
        log::warn(w);
    }
    comp.global.plan = flow.manifest.name.clone();
    let backend = ctx.backend(g).await?;
    let res = run_all(&backend, comp, &flow).await;
    backend.close_after(&res).await;
    res
}

fn collect_path(flow: &Flow<'_>, run_id: &str, task_id: &str) -> PathBuf {
    if flow.run_ids.len() > 1 {
        let stem = flow
            .common
            .collect_file
            .as_ref()
            .map(|f| {
                let s = f.to_string_lossy();
                s.strip_suffix(".tgz").unwrap_or(&s).to_string()
            })
            .unwrap_or_else(|| "multiple".into());
        PathBuf::from(format!("{stem}-{run_id}-{task_id}.tgz"))
    } else {
        flow.common
            .collect_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{task_id}.tgz")))
    }
}

async fn run_all(backend: &Backend, mut comp: Composition, flow: &Flow<'_>) -> Result<()> {
    let waiting = flow.wait
        || flow.common.collect
        || flow.run_ids.len() > 1
        || flow.write.is_some()
        || backend.is_embedded();
    let runner = comp.global.runner.clone();
    let mut build_groups: Vec<usize> = comp
        .groups
        .iter()
        .enumerate()
        .filter(|(_, grp)| flow.ignore_artifacts || grp.run.artifact.is_empty())
        .map(|(i, _)| i)
        .collect();
    let mut records: Vec<RunRecord> = Vec::new();
    let mut aborted = false;
    let mut collect_failed: Option<String> = None;
    // One listener for the whole flow, made when the first task is followed (until then
    // Ctrl-C keeps its default effect).
    let mut interrupts: Option<Interrupts> = None;
    if !build_groups.is_empty() {
        log::info(format!("test plan source at: {}", flow.plan_dir.display()));
    }

    for run_id in &flow.run_ids {
        if aborted {
            records.push(RunRecord::failed(
                run_id,
                "N/A",
                Outcome::Canceled,
                String::new(),
            ));
            continue;
        }
        let first = records.is_empty();
        let needs_build = !build_groups.is_empty();
        let req = TaskRequest {
            task_type: TaskType::Run,
            priority: i32::from(waiting),
            composition: comp.clone(),
            manifest: flow.manifest.clone(),
            build_groups: build_groups.clone(),
            run_ids: vec![run_id.clone()],
            created_by: flow.created_by.clone(),
            plan_archive: None,
        };
        let plan_dir = needs_build.then_some(flow.plan_dir.as_path());
        let task_id = match submit(backend, req, plan_dir).await {
            Ok(id) => id,
            Err(e) if first => return Err(e),
            Err(e) => {
                records.push(RunRecord::failed(
                    run_id,
                    "N/A",
                    Outcome::Canceled,
                    format!("{e:#}"),
                ));
                aborted = true;
                continue;
            }
        };
        log::info(format!("run is queued with ID: {task_id}"));
        if !waiting {
            return Ok(());
        }
        let interrupts = match &mut interrupts {
            Some(i) => i,
            None => interrupts.insert(Interrupts::new()?),
        };
        let task = match follow(backend, &task_id, interrupts).await {
            Ok(t) => t,
            // Escalated: stop now, without the remaining runs' bookkeeping.
            Err(e) if interrupted(&e) => return Err(e),
            Err(e) => {
                records.push(RunRecord::failed(
                    run_id,
                    &task_id,
                    Outcome::Unknown,
                    format!("{e:#}"),
                ));
                aborted = true;
                continue;
            }
        };
        log::info(format!("finished run with ID: {task_id}"));

        if first && task.error.is_empty() {
            // Later runs reuse what this one built.
            if let Ok(effective) = serde_json::from_value::<Composition>(task.composition.clone())
                && effective
                    .groups
                    .iter()
                    .all(|grp| !grp.run.artifact.is_empty())
            {
                comp = effective;
                build_groups.clear();
            }
            if let Some(file) = flow.write {
                write_composition(file, &task.composition, &comp, &flow.plan_path)?;
            }
        }

        if flow.common.collect {
            let file = collect_path(flow, run_id, &task_id);
            match super::tasks::collect_to_file(backend, &runner, &task_id, &file).await {
                Ok(()) => {}
                Err(e) => {
                    let msg = format!("collecting outputs of {task_id}: {e:#}");
                    log::error_kv(&msg, &[]);
                    collect_failed.get_or_insert(msg);
                }
            }
        }

        if !task.error.is_empty() {
            aborted = true;
        }
        records.push(RunRecord {
            run_id: run_id.clone(),
            task_id: task_id.clone(),
            outcome: task.outcome().to_string(),
            error: task.error.clone(),
            groups: task.run_result().map(|r| r.outcomes).unwrap_or_default(),
            took: task.took(),
        });
    }

    for r in &records {
        log::info(format!("result {}[{}]: {}", r.run_id, r.task_id, r.outcome));
    }
    if crate::term::stdout_is_tty() {
        crate::out::outln!("\n{}", summary_table(&records).trim_end());
    }
    if let Some(path) = flow.result_file {
        write_results(path, &records)?;
    }
    if let Some(msg) = collect_failed {
        return Err(Exit::new(exit::COLLECT_FAILED, msg).into());
    }
    if let Some(r) = records
        .iter()
        .find(|r| !r.error.is_empty() || r.outcome != Outcome::Success.as_str())
    {
        let mut msg = format!("run {:?} failed (outcome: {})", r.run_id, r.outcome);
        if !r.error.is_empty() {
            msg.push_str(&format!(": {}", r.error));
        }
        return Err(Exit::new(exit::FAILURE, msg).into());
    }
    Ok(())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn write_results(path: &Path, records: &[RunRecord]) -> Result<()> {
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("cannot create result file {}", path.display()))?;
    let mut text = String::from("run_id,task_id,outcome,error\n");
    for r in records {
        text.push_str(&format!(
            "{},{},{},{}\n",
            csv_field(&r.run_id),
            csv_field(&r.task_id),
            csv_field(&r.outcome),
            csv_field(&r.error)
        ));
    }
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write result file {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_has_a_row_per_group() {
        let mut ok = RunRecord::failed("default", "t1", Outcome::Failure, String::new());
        ok.groups
            .insert("a".into(), GroupOutcome { ok: 2, total: 2 });
        ok.groups
            .insert("b".into(), GroupOutcome { ok: 1, total: 3 });
        ok.took = Some(chrono::Duration::milliseconds(1500));
        let none = RunRecord::failed("second", "N/A", Outcome::Canceled, String::new());
        assert_eq!(
            summary_table(&[ok, none]),
            "RUN      GROUP  OK  TOTAL  OUTCOME   TOOK\n\
             default  a      2   2      success   1.5s\n\
             default  b      1   3      failure   1.5s\n\
             second   -      -   -      canceled  \n"
        );
    }

    #[test]
    fn csv_quotes_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b \"c\""), "\"a,b \"\"c\"\"\"");
    }
}
