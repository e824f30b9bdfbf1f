//! Commands about tasks and runners: `collect`, `status`, `logs`, `tasks`, `terminate`,
//! `healthcheck`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tg_api::rpc::{HealthcheckReport, TasksFilters, TerminateRequest};
use tg_api::task::{Task, TaskState, TaskType};

use super::Ctx;
use crate::cli::{CollectArgs, GlobalArgs, HealthcheckArgs, LogsArgs, StatusArgs, TerminateArgs};
use crate::client::{Backend, consume};
use crate::out::out;
use crate::{log, table};

/// Runs `f` with a backend and always lets the backend close, whatever `f` returns.
async fn with_backend<F>(ctx: &Ctx, g: &GlobalArgs, f: F) -> Result<()>
where
    F: AsyncFnOnce(&Backend) -> Result<()>,
{
    let backend = ctx.backend(g).await?;
    let res = f(&backend).await;
    backend.close().await;
    res
}

/// Writes the outputs of `run_id` to `file`. A run without outputs is an error and leaves no
/// file behind.
pub(super) async fn collect_to_file(
    backend: &Backend,
    runner: &str,
    run_id: &str,
    file: &Path,
) -> Result<()> {
    let chunks = backend.outputs(runner, run_id).await?;
    let mut f =
        std::fs::File::create(file).with_context(|| format!("cannot create {}", file.display()))?;
    let res = consume(chunks, Some(&mut f as &mut dyn Write)).await;
    match res {
        Ok(Value::Bool(true)) => {
            f.flush()
                .with_context(|| format!("cannot write {}", file.display()))?;
            log::info(format!("created file: {}", file.display()));
            Ok(())
        }
        Ok(_) => {
            drop(f);
            let _ = std::fs::remove_file(file);
            log::error_kv(
                "no such testplan run",
                &[("run_id", run_id.into()), ("runner", runner.into())],
            );
            bail!("no such testplan run: {run_id}")
        }
        Err(e) => {
            drop(f);
            let _ = std::fs::remove_file(file);
            Err(e)
        }
    }
}

pub async fn collect(ctx: Ctx, g: &GlobalArgs, a: &CollectArgs) -> Result<()> {
    let file = a
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.tgz", a.run_id)));
    with_backend(&ctx, g, async move |b| {
        collect_to_file(b, &a.runner, &a.run_id, &file).await
    })
    .await
}

/// Go's `time.Time.String()` for UTC times: `2022-07-11 19:20:00.123456 +0000 UTC`.
fn go_time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    match t {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S%.f +0000 UTC").to_string(),
        None => String::new(),
    }
}

/// Go's `time.Duration.String()`, rounded to milliseconds (e.g. `1m2.5s`, `350ms`).
fn go_duration(d: Option<chrono::Duration>) -> String {
    let Some(d) = d else {
        return String::new();
    };
    let ms = d.num_milliseconds().max(0);
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let h = ms / 3_600_000;
    let m = (ms / 60_000) % 60;
    let s = (ms % 60_000) as f64 / 1000.0;
    let secs = format!("{s:.3}");
    let secs = secs.trim_end_matches('0').trim_end_matches('.');
    match (h, m) {
        (0, 0) => format!("{secs}s"),
        (0, m) => format!("{m}m{secs}s"),
        (h, m) => format!("{h}h{m}m{secs}s"),
    }
}

fn status_block(t: &Task, extended: bool) -> String {
    let mut out = String::new();
    out.push_str(&format!("ID:\t\t{}\n", t.id));
    out.push_str(&format!("Priority:\t{}\n", t.priority));
    out.push_str(&format!("Created:\t{}\n", go_time(t.created())));
    out.push_str(&format!("Type:\t\t{}\n", t.task_type));
    out.push_str(&format!("Status:\t\t{}\n", t.state()));
    out.push_str(&format!("Outcome:\t{}\n", t.outcome()));
    out.push_str(&format!("Last update:\t{}\n", go_time(t.last_update())));
    if !t.error.is_empty() {
        out.push_str(&format!("Error:\t\t{}\n", t.error));
    }
    if extended {
        let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
        out.push_str(&format!("\nInput:\n{}\n", pretty(&t.input)));
        out.push_str(&format!("\nResult:\n{}\n", pretty(&t.result)));
    }
    out
}

pub async fn status(ctx: Ctx, g: &GlobalArgs, a: &StatusArgs) -> Result<()> {
    with_backend(&ctx, g, async move |b| {
        let chunks = b.status(&a.task).await?;
        let v = consume(chunks, None).await?;
        let t: Task = serde_json::from_value(v).context("cannot decode the task")?;
        out!("{}", status_block(&t, a.extended));
        Ok(())
    })
    .await
}

pub async fn logs(ctx: Ctx, g: &GlobalArgs, a: &LogsArgs) -> Result<()> {
    with_backend(&ctx, g, async move |b| {
        let chunks = b.logs(&a.task, a.follow).await?;
        // Following someone else's task: Ctrl-C stops following, it does not cancel.
        let v = consume(chunks, None).await?;
        let t: Task = serde_json::from_value(v).context("cannot decode the task")?;
        out!("{}", status_block(&t, false));
        Ok(())
    })
    .await
}

/// A task's outcome for `tasks`: `success`, `failure` or `canceled`, with each group's
/// `g:ok/total` for runs; empty while the task has not ended.
fn outcome_cell(t: &Task) -> String {
    if !t.state().is_final() {
        return String::new();
    }
    let mut s = t.outcome().to_string();
    if let Some(r) = t.run_result() {
        let groups: Vec<String> = r
            .outcomes
            .iter()
            .map(|(g, o)| format!("{g}:{}/{}", o.ok, o.total))
            .collect();
        if !groups.is_empty() {
            s.push_str(&format!(" ({})", groups.join(", ")));
        }
    }
    s
}

/// The original's columns, then OUTCOME last: a script that reads columns by position still
/// finds the original's where they were.
fn tasks_table(tasks: &[Task]) -> String {
    let mut rows =
        vec!["ID\tDATE\tTEST PLAN\tTEST CASE\tDURATION\tSTATE\tTYPE\tOUTCOME".to_string()];
    for t in tasks {
        let date = t
            .created()
            .map(|c| c.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_default();
        let took = if t.state().is_final() {
            t.took()
        } else {
            t.created().map(|c| chrono::Utc::now() - c)
        };
        rows.push(format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            t.id,
            date,
            t.plan,
            t.case,
            go_duration(took),
            t.state(),
            t.task_type,
            outcome_cell(t)
        ));
    }
    table::render(&rows, 2, false)
}

pub async fn tasks(ctx: Ctx, g: &GlobalArgs) -> Result<()> {
    with_backend(&ctx, g, async move |b| {
        let filters = TasksFilters {
            types: vec![TaskType::Build, TaskType::Run],
            states: vec![
                TaskState::Scheduled,
                TaskState::Processing,
                TaskState::Complete,
                TaskState::Canceled,
            ],
            ..Default::default()
        };
        let chunks = b.tasks(&filters).await?;
        let v = consume(chunks, None).await?;
        let mut tasks: Vec<Task> =
            serde_json::from_value(v).context("cannot decode the task list")?;
        // Newest first; xids sort by creation time.
        tasks.sort_by(|a, b| b.created().cmp(&a.created()).then_with(|| b.id.cmp(&a.id)));
        out!("{}", tasks_table(&tasks));
        Ok(())
    })
    .await
}

pub async fn terminate(ctx: Ctx, g: &GlobalArgs, a: &TerminateArgs) -> Result<()> {
    let runner = a.runner.clone().unwrap_or_default();
    let builder = a.builder.clone().unwrap_or_default();
    if runner.is_empty() && builder.is_empty() {
        bail!("specify something to terminate: --runner or --builder");
    }
    if !runner.is_empty() && !builder.is_empty() {
        bail!("cannot accept runner and builder at the same time; please do one at a time");
    }
    let component = if runner.is_empty() {
        builder.clone()
    } else {
        runner.clone()
    };
    with_backend(&ctx, g, async move |b| {
        let chunks = b.terminate(&TerminateRequest { runner, builder }).await?;
        consume(chunks, None).await?;
        log::info(format!("all jobs terminated on component: {component}"));
        Ok(())
    })
    .await
}

fn report_text(r: &HealthcheckReport) -> String {
    let mut out = String::from("Checks:\n");
    if r.checks.is_empty() {
        out.push_str("No checks made.\n");
    }
    for c in &r.checks {
        out.push_str(&format!("- {}: {}; {}\n", c.name, c.status, c.message));
    }
    out.push_str("Fixes:\n");
    if r.fixes.is_empty() {
        out.push_str("No fixes applied.\n");
    }
    for c in &r.fixes {
        out.push_str(&format!("- {}: {}; {}\n", c.name, c.status, c.message));
    }
    out
}

pub async fn healthcheck(ctx: Ctx, g: &GlobalArgs, a: &HealthcheckArgs) -> Result<()> {
    with_backend(&ctx, g, async move |b| {
        let chunks = b.healthcheck(&a.runner, a.fix, a.instances).await?;
        let v = consume(chunks, None).await?;
        let r: HealthcheckReport =
            serde_json::from_value(v).context("cannot decode the healthcheck report")?;
        log::info(format!("finished checking runner {}", a.runner));
        out!("{}", report_text(&r));
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_like_go() {
        let d = |ms| go_duration(Some(chrono::Duration::milliseconds(ms)));
        assert_eq!(d(350), "350ms");
        assert_eq!(d(2500), "2.5s");
        assert_eq!(d(62_500), "1m2.5s");
        assert_eq!(d(3_600_000 + 1000), "1h0m1s");
        assert_eq!(d(0), "0s");
    }

    #[test]
    fn healthcheck_report() {
        assert_eq!(
            report_text(&HealthcheckReport::default()),
            "Checks:\nNo checks made.\nFixes:\nNo fixes applied.\n"
        );
    }
}
