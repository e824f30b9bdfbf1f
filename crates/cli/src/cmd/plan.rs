//! `plan import|create|list|rm` and `describe`: local operations on `$TESTGROUND_HOME/plans`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tg_api::manifest::Manifest;

use super::Ctx;
use crate::cli::{DescribeArgs, PlanCmd, PlanCreateArgs, PlanImportArgs, PlanListArgs, PlanRmArgs};
use crate::out::{out, outln};
use crate::{log, table};

pub fn plan(ctx: &Ctx, c: PlanCmd) -> Result<()> {
    match c {
        PlanCmd::Import(a) => import(ctx, &a),
        PlanCmd::Create(a) => create(ctx, &a),
        PlanCmd::List(a) => list(ctx, &a),
        PlanCmd::Rm(a) => rm(ctx, &a),
    }
}

fn import(ctx: &Ctx, a: &PlanImportArgs) -> Result<()> {
    if a.git {
        bail!(
            "importing plans from git is not supported yet; clone the repository and import the local directory with `testground plan import --from <dir>`"
        );
    }
    let from = a.from.strip_prefix("file://").unwrap_or(&a.from);
    if let Some((scheme, _)) = from.split_once("://") {
        bail!("unknown scheme {scheme} for local files. did you forget to pass --git?");
    }
    let src =
        std::fs::canonicalize(from).with_context(|| format!("cannot import plans from {from}"))?;
    if !src.is_dir() {
        bail!(
            "cannot import plans from {}: not a directory",
            src.display()
        );
    }
    let name = match &a.name {
        Some(n) => n.trim_matches('/').to_string(),
        None => src
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".git").to_string())
            .unwrap_or_default(),
    };
    if name.is_empty()
        || Path::new(&name)
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        bail!("invalid plan name {name:?}; pass --name");
    }
    let dst = ctx.home.plans_dir().join(&name);
    if dst.symlink_metadata().is_ok() {
        log::warn_kv(
            "destination dir already exists",
            &[("dst", dst.display().to_string().into())],
        );
        return Ok(());
    }
    // Read every manifest before touching the home: a plan that does not load is not imported,
    // so a failed import leaves nothing behind (a broken plan would make `plan list` fail).
    let plans = find_plans(&src)?;
    let created_parents = missing_ancestors(&ctx.home.plans_dir(), &dst);
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    if let Err(e) = std::os::unix::fs::symlink(&src, &dst) {
        for d in created_parents.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
        return Err(e).with_context(|| {
            format!(
                "cannot create symlink {} -> {}",
                dst.display(),
                src.display()
            )
        });
    }
    outln!("created symlink {} -> {}", dst.display(), src.display());
    outln!("imported plans:");
    let mut rows = Vec::new();
    for (rel, manifest) in plans {
        let id = if rel.as_os_str().is_empty() {
            PathBuf::from(&name)
        } else {
            Path::new(&name).join(rel)
        };
        for tc in &manifest.testcases {
            rows.push(format!("{}\t{}", id.display(), tc.name));
        }
    }
    out!("{}", table::render(&rows, 1, false));
    Ok(())
}

/// The directories between `root` (exclusive) and `path` (exclusive) that do not exist yet,
/// outermost first: what `create_dir_all(path.parent())` will create.
fn missing_ancestors(root: &Path, path: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = path
        .ancestors()
        .skip(1)
        .take_while(|a| *a != root && a.starts_with(root))
        .filter(|a| a.symlink_metadata().is_err())
        .map(Path::to_path_buf)
        .collect();
    out.reverse();
    out
}

/// Directories below `root` (following symlinks) that hold a `manifest.toml`, as paths relative
/// to `root`, with their manifests. A plan's own subdirectories are not searched (they hold
/// sources and build output, not plans), nor hidden directories.
fn find_plans(root: &Path) -> Result<Vec<(PathBuf, Manifest)>> {
    let mut out = Vec::new();
    let mut dirs = Vec::new();
    walk(root, Path::new(""), 0, &mut dirs);
    dirs.sort();
    for rel in dirs {
        let m = tg_plan::load_manifest(&root.join(&rel).join("manifest.toml"))?;
        out.push((rel, m));
    }
    Ok(out)
}

fn walk(root: &Path, rel: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    // Depth bound: symlinks may form loops.
    if depth > 8 {
        return;
    }
    let dir = root.join(rel);
    if dir.join("manifest.toml").is_file() {
        out.push(rel.to_path_buf());
        return;
    }
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let n = name.to_string_lossy();
        if n.starts_with('.') || n == "target" || n == "node_modules" {
            continue;
        }
        if e.path().is_dir() {
            walk(root, &rel.join(&name), depth + 1, out);
        }
    }
}

fn list(ctx: &Ctx, a: &PlanListArgs) -> Result<()> {
    let root = ctx.home.plans_dir();
    let mut dirs = Vec::new();
    walk(&root, Path::new(""), 0, &mut dirs);
    dirs.retain(|d| !d.as_os_str().is_empty());
    dirs.sort();
    if !a.testcases {
        for d in dirs {
            outln!("{}", d.display());
        }
        return Ok(());
    }
    // One broken plan must not hide the others: report it and list the rest.
    let mut rows = Vec::new();
    let mut broken = 0usize;
    for d in dirs {
        match tg_plan::load_manifest(&root.join(&d).join("manifest.toml")) {
            Ok(m) => {
                for tc in &m.testcases {
                    rows.push(format!("{}\t{}", d.display(), tc.name));
                }
            }
            Err(e) => {
                broken += 1;
                log::warn_kv(
                    "cannot read test plan; skipped",
                    &[
                        ("plan", d.display().to_string().into()),
                        ("error", e.to_string().into()),
                    ],
                );
            }
        }
    }
    out!("{}", table::render(&rows, 1, false));
    if broken > 0 {
        bail!("{broken} test plan(s) could not be read (see the warnings above)");
    }
    Ok(())
}

fn rm(ctx: &Ctx, a: &PlanRmArgs) -> Result<()> {
    let plan = a.plan.trim_matches('/');
    if plan.is_empty()
        || Path::new(plan)
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        bail!("invalid test plan name {:?}", a.plan);
    }
    let dir = ctx.home.plans_dir().join(plan);
    let meta = match dir.symlink_metadata() {
        Ok(m) => m,
        Err(_) => bail!("test plan {plan:?} not found at {}", dir.display()),
    };
    if !a.yes {
        outln!("really delete? pass --yes flag to confirm.");
        return Ok(());
    }
    // An imported plan is a symlink: remove the link, never the user's sources.
    if meta.file_type().is_symlink() || meta.is_file() {
        std::fs::remove_file(&dir)
    } else {
        std::fs::remove_dir_all(&dir)
    }
    .with_context(|| format!("cannot remove {}", dir.display()))?;
    outln!("plan at {} removed.", dir.display());
    Ok(())
}

fn create(ctx: &Ctx, a: &PlanCreateArgs) -> Result<()> {
    if a.remote.is_some() {
        bail!("--remote is not supported yet; add the git remote yourself after creating the plan");
    }
    let plan = a.plan.trim_matches('/');
    if plan.is_empty()
        || Path::new(plan)
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        bail!("invalid test plan name {:?}", a.plan);
    }
    let Some(files) = crate::templates::files(&a.target, plan, &a.module) else {
        bail!(
            "no template for target {:?}; supported targets: go, rust",
            a.target
        );
    };
    let dir = ctx.home.plans_dir().join(plan);
    if dir.symlink_metadata().is_ok() {
        bail!("a test plan already exists at {}", dir.display());
    }
    for (rel, text) in files {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
    }
    outln!("new test plan created under: {}", dir.display());
    Ok(())
}

/// Go's `%v` of a TOML value, as the original's `describe` prints defaults.
fn go_value(v: Option<&serde_json::Value>) -> String {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => "<nil>".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => format!(
            "[{}]",
            a.iter()
                .map(|x| go_value(Some(x)))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Some(Value::Object(o)) => format!(
            "map[{}]",
            o.iter()
                .map(|(k, x)| format!("{k}:{}", go_value(Some(x))))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Some(v) => v.to_string(),
    }
}

/// Greedy word wrap at `width` columns (the original pipes these lines through `wordwrap`).
fn wrap(s: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line_len = 0;
    for word in s.split(' ') {
        let w = word.chars().count();
        if line_len > 0 && line_len + 1 + w > width {
            out.push('\n');
            line_len = 0;
        } else if line_len > 0 {
            out.push(' ');
            line_len += 1;
        }
        out.push_str(word);
        line_len += w;
    }
    out
}

pub fn render_description(m: &Manifest) -> String {
    let mut out = String::new();
    let mut p = |s: String| {
        out.push_str(&wrap(&s, 120));
        out.push_str("\n\n");
    };
    p(format!("This test plan is called {:?}.", m.name));
    p(format!(
        "It can be built with strategies: [{}].",
        m.supported_builders().join(" ")
    ));
    p(format!(
        "It can be run with strategies: [{}].",
        m.supported_runners().join(" ")
    ));
    p(format!("It has {} test cases.", m.testcases.len()));
    out.push_str("TEST CASES:\n----------\n\n");
    for tc in &m.testcases {
        out.push_str(&format!("- Test case: {}\n", tc.name));
        out.push_str("  Instances:\n");
        out.push_str(&format!("    minimum: {}\n", tc.instances.min));
        out.push_str(&format!("    maximum: {}\n", tc.instances.max));
        out.push_str("  Parameters:\n");
        let rows: Vec<String> = tc
            .params
            .iter()
            .map(|(name, p)| {
                format!(
                    "    {name}\t {}\t {}\t {}\t default: {}",
                    p.kind,
                    p.desc,
                    p.unit,
                    go_value(p.default.as_ref())
                )
            })
            .collect();
        out.push_str(&table::render(&rows, 1, true));
        out.push('\n');
    }
    out
}

pub fn describe(ctx: &Ctx, a: &DescribeArgs) -> Result<()> {
    let (_, m) = ctx.plan(&a.plan)?;
    out!("{}", render_description(&m));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_matches_the_original_layout() {
        let m = tg_plan::parse_manifest(
            r#"
name = "network"
[builders."exec:go"]
[runners."local:exec"]
[[testcases]]
name = "storm"
instances = { min = 1, max = 10 }
  [testcases.params]
  conn_count = { type = "int", desc = "sockets", default = 5 }
  word = { type = "string", default = "never" }
  some = { type = "int", unit = "ms" }
"#,
            Path::new("manifest.toml"),
        )
        .unwrap();
        let d = render_description(&m);
        let expected = "This test plan is called \"network\".\n\n\
It can be built with strategies: [exec:go].\n\n\
It can be run with strategies: [local:exec].\n\n\
It has 1 test cases.\n\n\
TEST CASES:\n----------\n\n\
- Test case: storm\n  Instances:\n    minimum: 1\n    maximum: 10\n  Parameters:\n\
\x20   conn_count | int    | sockets |    | default: 5\n\
\x20   some       | int    |         | ms | default: <nil>\n\
\x20   word       | string |         |    | default: never\n\n";
        assert_eq!(d, expected);
    }

    #[test]
    fn wraps_long_lines() {
        let s = "a ".repeat(100);
        assert!(wrap(s.trim(), 120).lines().all(|l| l.len() <= 120));
    }
}
