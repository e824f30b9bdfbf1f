//! Build tasks, and the build phase of run tasks: each distinct build once, artifacts filled
//! into the composition.

use std::collections::HashMap;
use std::time::Instant;

use tg_api::composition::Composition;
use tg_api::task::Task;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::events::{TaskEvent, TaskEvents};
use super::{Engine, StoredInput, TaskDone};

impl Engine {
    /// Builds the requested groups, once per distinct build, and fills their artifacts in.
    pub(super) async fn build_groups(
        &self,
        task: &Task,
        input: &StoredInput,
        events: &mut TaskEvents,
        cancel: &CancellationToken,
    ) -> Result<Composition, String> {
        let req = &input.request;
        let mut comp = req.composition.clone();
        if req.build_groups.is_empty() {
            return Ok(comp);
        }
        let plan_dir = input
            .sources
            .plan_dir
            .clone()
            .ok_or("plan directory not present")?;
        let builds = tg_plan::resolve_builds(&comp, &req.manifest, &self.inner.cfg.builders_json())
            .map_err(|e| e.to_string())?;
        let mut done: HashMap<String, String> = HashMap::new();
        for b in builds
            .iter()
            .filter(|b| req.build_groups.contains(&b.group_index))
        {
            if let Some(artifact) = done.get(&b.key) {
                comp.groups[b.group_index].run.artifact = artifact.clone();
                continue;
            }
            let same: Vec<String> = builds
                .iter()
                .filter(|o| o.key == b.key && req.build_groups.contains(&o.group_index))
                .map(|o| o.group_id.clone())
                .collect();
            events.emit(TaskEvent::BuildStarted {
                plan: task.plan.clone(),
                groups: same.clone(),
                builder: b.builder.clone(),
            });
            let input = tg_builder::BuildInput {
                build_id: xid::new().to_string(),
                plan: req.manifest.name.replace('/', "-"),
                plan_dir: plan_dir.clone(),
                builder: b.builder.clone(),
                config: b.config.clone(),
                selectors: b.selectors.clone(),
                dependencies: b
                    .dependencies
                    .iter()
                    .map(|d| tg_builder::Dependency {
                        module: d.module.clone(),
                        target: d.target.clone(),
                        version: d.version.clone(),
                    })
                    .collect(),
                work_dir: self.inner.home.work_dir(),
            };
            let builder = tg_builder::lookup(&b.builder).map_err(|e| e.to_string())?;
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            let build = builder.build(&input, &tx, cancel);
            tokio::pin!(build);
            let started = Instant::now();
            let out = loop {
                tokio::select! {
                    r = &mut build => break r,
                    Some(line) = rx.recv() => events.emit(TaskEvent::BuildOutput(line)),
                }
            };
            while let Ok(line) = rx.try_recv() {
                events.emit(TaskEvent::BuildOutput(line));
            }
            match out {
                Ok(o) => {
                    events.emit(TaskEvent::BuildSucceeded {
                        plan: task.plan.clone(),
                        groups: same,
                        builder: b.builder.clone(),
                        artifact: o.artifact.to_string(),
                        cached: o.cached,
                        took: started.elapsed(),
                    });
                    comp.groups[b.group_index].run.artifact = o.artifact.to_string();
                    done.insert(b.key.clone(), o.artifact.to_string());
                }
                Err(e) => {
                    return Err(format!("build failed for groups {same:?}: {e}"));
                }
            }
        }
        Ok(comp)
    }

    pub(super) async fn do_build(
        &self,
        task: &Task,
        input: &StoredInput,
        events: &mut TaskEvents,
        cancel: &CancellationToken,
    ) -> Result<TaskDone, String> {
        let comp = self.build_groups(task, input, events, cancel).await?;
        let artifacts: Vec<String> = comp.groups.iter().map(|g| g.run.artifact.clone()).collect();
        Ok(TaskDone {
            result: serde_json::to_value(artifacts).unwrap_or_default(),
            composition: Some(comp),
            canceled: false,
        })
    }
}
