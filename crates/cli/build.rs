//! Records the git commit for `testground version` (the original set it with `-ldflags`).
//! Outside a git checkout (or without git) nothing is recorded and `version` prints `unknown`;
//! the build never fails for it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    println!("cargo:rerun-if-changed=build.rs");
    // Re-run only when HEAD moves, not on every source change. `--git-path` resolves each file
    // where git keeps it: in a worktree, HEAD is per worktree but branches are shared.
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(r) = git(&manifest_dir, &["symbolic-ref", "-q", "HEAD"]) {
        watch.push(r);
    }
    for w in &watch {
        if let Some(p) = git(&manifest_dir, &["rev-parse", "--git-path", w]) {
            let p = manifest_dir.join(p);
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
    if let Some(c) = git(&manifest_dir, &["rev-parse", "--short=8", "HEAD"]) {
        println!("cargo:rustc-env=TG_GIT_COMMIT={c}");
    }
}
