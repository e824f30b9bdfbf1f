//! The labels that find Testground's containers again (the original's names), and removal by
//! label: what a killed engine left is found this way at the next start.

use std::collections::HashMap;

use bollard::query_parameters::{ListContainersOptionsBuilder, RemoveContainerOptionsBuilder};

use crate::{Docker, DockerError};

/// `plan` for instance containers (as the original), `pause` for the containers holding their
/// network namespaces, `build` for toolchain steps.
pub const PURPOSE: &str = "testground.purpose";
pub const PLAN: &str = "testground.plan";
pub const TESTCASE: &str = "testground.testcase";
pub const RUN_ID: &str = "testground.run_id";
pub const GROUP_ID: &str = "testground.group_id";
/// The build id of a toolchain step's container.
pub const BUILD_ID: &str = "testground.build_id";
/// Where the engine that made the container records its runs (`$TESTGROUND_HOME/data/runs`),
/// or, on build steps, the builds' work dir: a home cleans only its own leftovers.
pub const HOME: &str = "testground.home";

/// A container the engine reported.
#[derive(Debug, Clone)]
pub struct Found {
    pub id: String,
    pub name: String,
    pub labels: HashMap<String, String>,
    pub running: bool,
}

impl Docker {
    /// Containers (running or not) carrying every `key=value` of `labels`.
    pub async fn containers_with(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<Found>, DockerError> {
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_string(),
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        );
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .api
            .list_containers(Some(opts))
            .await
            .map_err(DockerError::api("list containers"))?;
        Ok(list
            .into_iter()
            .map(|c| Found {
                id: c.id.unwrap_or_default(),
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_string(),
                labels: c.labels.unwrap_or_default(),
                running: matches!(
                    c.state,
                    Some(bollard::models::ContainerSummaryStateEnum::RUNNING)
                ),
            })
            .collect())
    }

    /// Removes container `id` (killing it first), with its anonymous volumes. Absent is fine.
    pub async fn remove_container(&self, id: &str) -> Result<(), DockerError> {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.api.remove_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if crate::is_not_found(&e) => Ok(()),
            // Already being removed by someone else.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(DockerError::api(format!("remove container {id}"))(e)),
        }
    }

    /// Removes every container carrying all of `labels`; returns their names.
    pub async fn remove_containers_with(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<String>, DockerError> {
        let found = self.containers_with(labels).await?;
        let mut removed = Vec::new();
        let results =
            futures::future::join_all(found.iter().map(|c| self.remove_container(&c.id))).await;
        for (c, r) in found.into_iter().zip(results) {
            r?;
            removed.push(c.name);
        }
        Ok(removed)
    }
}
