//! Runners start a run's instances, supervise them, decide the outcome and keep the outputs.
//! (Being written: see the contract below.)

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tg_api::task::RunResult;

/// Everything a runner needs to execute one run.
#[derive(Debug, Clone)]
pub struct RunInput {
    /// The run id (task id, xid): `TEST_RUN`.
    pub run_id: String,
    /// Plan and case names, with `/` already replaced by `-`.
    pub plan: String,
    pub case: String,
    /// Runner id, e.g. `local:exec`.
    pub runner: String,
    pub total_instances: u32,
    pub groups: Vec<RunGroup>,
    /// Coalesced run configuration (manifest `[runners."<id>"]` < `.env.toml` < composition).
    pub run_config: serde_json::Map<String, serde_json::Value>,
    /// `$TESTGROUND_HOME/data/outputs`; the runner writes under
    /// `<runner with ':'→'_'>/<plan>/<run_id>/<group>/<index>/`.
    pub outputs_root: PathBuf,
    /// Where the sync service listens, for `SYNC_SERVICE_HOST`/`SYNC_SERVICE_PORT`.
    pub sync_host: String,
    pub sync_port: u16,
    pub disable_metrics: bool,
    /// Run timeout; the run is killed and fails when it elapses.
    pub timeout: Duration,
}

/// One run group as the runner sees it.
#[derive(Debug, Clone)]
pub struct RunGroup {
    /// Run-group id: `TEST_GROUP_ID`.
    pub id: String,
    pub instances: u32,
    /// Path of the executable built for this group.
    pub artifact: String,
    /// `TEST_INSTANCE_PARAMS`, resolved (manifest defaults < ... < run group).
    pub params: BTreeMap<String, String>,
    /// `TEST_CAPTURE_PROFILES`.
    pub profiles: BTreeMap<String, String>,
}

/// Outcome of the run plus the directory holding its outputs.
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub result: RunResult,
    pub outputs_dir: PathBuf,
}
