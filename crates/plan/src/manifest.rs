//! `manifest.toml` loading. Manifests are read liberally (unknown keys ignored, as the
//! original's plans carry keys nothing consumes) but what the platform relies on is checked here,
//! once, so later stages can trust it.

use std::collections::HashSet;
use std::path::Path;

use tg_api::manifest::Manifest;

use crate::decode::{UnknownKeys, decode, map_datetimes_to_strings};
use crate::error::PlanError;

/// Reads and parses the manifest at `path` (the `manifest.toml` file itself).
pub fn load_manifest(path: &Path) -> Result<Manifest, PlanError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
        file: path.display().to_string(),
        source,
    })?;
    parse_manifest(&text, path)
}

/// Parses manifest text; `origin` names the file in errors and is kept in `Manifest::origin`.
pub fn parse_manifest(text: &str, origin: &Path) -> Result<Manifest, PlanError> {
    let file = origin.display().to_string();
    let mut m: Manifest = decode(text, &file, UnknownKeys::Ignore)?;
    m.origin = file;
    for cfg in m.builders.values_mut().chain(m.runners.values_mut()) {
        map_datetimes_to_strings(cfg);
    }
    for tc in &mut m.testcases {
        for p in tc.params.values_mut() {
            if let Some(d) = &mut p.default {
                crate::decode::datetimes_to_strings(d);
            }
        }
    }
    check(&m)?;
    Ok(m)
}

pub(crate) fn file_of(m: &Manifest) -> &str {
    if m.origin.is_empty() {
        "manifest.toml"
    } else {
        &m.origin
    }
}

fn check(m: &Manifest) -> Result<(), PlanError> {
    let file = file_of(m);
    if m.name.trim().is_empty() {
        return Err(PlanError::invalid(
            file,
            "name",
            "missing value; expected the plan name",
        ));
    }
    let mut seen = HashSet::new();
    for (i, tc) in m.testcases.iter().enumerate() {
        if tc.name.trim().is_empty() {
            return Err(PlanError::invalid(
                file,
                format!("testcases[{i}].name"),
                "missing value; expected the test case name",
            ));
        }
        if !seen.insert(tc.name.as_str()) {
            return Err(PlanError::invalid(
                file,
                format!("testcases[{i}].name"),
                format!("duplicate test case '{}'", tc.name),
            ));
        }
        if tc.instances.min > tc.instances.max {
            return Err(PlanError::invalid(
                file,
                format!("testcases[{i}].instances"),
                format!(
                    "min ({}) is greater than max ({})",
                    tc.instances.min, tc.instances.max
                ),
            ));
        }
    }
    Ok(())
}
