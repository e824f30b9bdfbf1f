//! Where outputs live (`<root>/<runner dir>/<plan>/<run_id>/<group>/<index>/`) and the collect
//! archive: a gzip'd tar with entries `<run_id>/<group>/<index>/<file>`, directories included.

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;

use crate::RunError;

/// `local:exec` → `local_exec`: the runner's directory under the outputs root.
fn runner_dir(runner: &str) -> String {
    runner.replace(':', "_")
}

/// The outputs directory of a run: `<root>/<runner dir>/<plan>/<run_id>`.
pub fn outputs_dir(outputs_root: &Path, runner: &str, plan: &str, run_id: &str) -> PathBuf {
    outputs_root
        .join(runner_dir(runner))
        .join(plan)
        .join(run_id)
}

/// `(group, index, <run dir>/<group>/<index>)` of every instance directory of a run, by group
/// then index; none when the run left no outputs. Entries that are not an instance's directory
/// (files, non-numeric names) are skipped.
pub fn instance_dirs(run_dir: &Path) -> std::io::Result<Vec<(String, u32, PathBuf)>> {
    let mut out = Vec::new();
    let groups = match std::fs::read_dir(run_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for g in groups {
        let g = g?;
        if !g.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(group) = g.file_name().into_string() else {
            continue;
        };
        for i in std::fs::read_dir(g.path())? {
            let i = i?;
            let index = i.file_name().to_str().and_then(|s| s.parse::<u32>().ok());
            if let Some(index) = index
                && i.file_type().is_ok_and(|t| t.is_dir())
            {
                out.push((group.clone(), index, i.path()));
            }
        }
    }
    out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    Ok(out)
}

/// A name that is a single, ordinary path component (nothing that climbs out of the root).
pub(crate) fn is_plain_component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Writes the outputs of run `run_id` as a `.tgz` to `out`. Returns `false` (writing nothing)
/// when no such run exists under `runner`; the run is looked up across plans.
pub fn collect_outputs(
    outputs_root: &Path,
    runner: &str,
    run_id: &str,
    out: impl Write,
) -> Result<bool, RunError> {
    let dir_name = runner_dir(runner);
    if !is_plain_component(&dir_name) || !is_plain_component(run_id) {
        return Ok(false);
    }
    let runner_root = outputs_root.join(&dir_name);
    let plans = match std::fs::read_dir(&runner_root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(RunError::io("read", &runner_root)(e)),
    };
    let mut matches = Vec::new();
    for plan in plans {
        let plan = plan.map_err(RunError::io("read", &runner_root))?;
        let candidate = plan.path().join(run_id);
        if candidate.is_dir() {
            matches.push(candidate);
        }
    }
    let dir = match matches.len() {
        0 => return Ok(false),
        1 => matches.remove(0),
        _ => {
            matches.sort();
            return Err(RunError::AmbiguousRun {
                run_id: run_id.to_string(),
                runner: runner.to_string(),
                matches,
            });
        }
    };

    let gz = GzEncoder::new(out, Compression::default());
    let mut tar = tar::Builder::new(gz);
    // Symlinks a plan left in its outputs are archived as links, never followed out of the
    // run directory.
    tar.follow_symlinks(false);
    append_tree(&mut tar, &dir, Path::new(run_id))?;
    let gz = tar
        .into_inner()
        .map_err(RunError::io("write the archive of", &dir))?;
    gz.finish()
        .map_err(RunError::io("write the archive of", &dir))?;
    Ok(true)
}

/// Appends `dir` as `name/` and everything below it, in name order so that archives of the
/// same outputs are identical.
fn append_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    dir: &Path,
    name: &Path,
) -> Result<(), RunError> {
    tar.append_dir(name, dir)
        .map_err(RunError::io("archive", dir))?;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(RunError::io("read", dir))?
        .collect::<Result<_, _>>()
        .map_err(RunError::io("read", dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let entry_name = name.join(entry.file_name());
        let ft = entry.file_type().map_err(RunError::io("stat", &path))?;
        if ft.is_dir() {
            append_tree(tar, &path, &entry_name)?;
        } else {
            tar.append_path_with_name(&path, &entry_name)
                .map_err(RunError::io("archive", &path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_dir_layout() {
        assert_eq!(
            outputs_dir(Path::new("/o"), "local:exec", "plan", "run1"),
            PathBuf::from("/o/local_exec/plan/run1")
        );
    }

    #[test]
    fn unknown_or_hostile_run_ids_are_not_found() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("local_exec/p/r1")).unwrap();
        for id in ["nope", "..", ".", "", "r1/..", "../local_exec"] {
            let mut buf = Vec::new();
            assert!(
                !collect_outputs(root.path(), "local:exec", id, &mut buf).unwrap(),
                "{id}"
            );
            assert!(buf.is_empty());
        }
        let mut buf = Vec::new();
        assert!(!collect_outputs(root.path(), "local:docker", "r1", &mut buf).unwrap());
    }

    #[test]
    fn a_run_id_under_two_plans_is_ambiguous() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("local_exec/p1/r")).unwrap();
        std::fs::create_dir_all(root.path().join("local_exec/p2/r")).unwrap();
        let err = collect_outputs(root.path(), "local:exec", "r", Vec::new()).unwrap_err();
        assert!(matches!(err, RunError::AmbiguousRun { ref matches, .. } if matches.len() == 2));
    }
}
