//! Placeholder of the per-run process tracker (replaced by the cgroup-based one).

use std::io;
use std::path::Path;

pub(crate) struct RunTracker;

impl RunTracker {
    pub(crate) fn create(_state_dir: &Path, _run_id: &str) -> io::Result<RunTracker> {
        Ok(RunTracker)
    }
    pub(crate) fn add_temp_dir(&mut self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    pub(crate) fn apply(&self, _cmd: &mut tokio::process::Command) {}
    pub(crate) async fn finish(self) {}
}

pub fn clean_leftovers(_state_dir: &Path) -> Vec<String> {
    Vec::new()
}
