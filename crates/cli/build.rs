//! Records the git commit for `testground version` (the original set it with `-ldflags`).
//! Outside a git checkout nothing is recorded and `version` prints `dirty`, as the original.

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
    if let Some(git_dir) = git(&manifest_dir, &["rev-parse", "--git-dir"]) {
        let git_dir = manifest_dir.join(git_dir);
        // Re-run only when HEAD moves, not on every source change.
        let mut watch = vec![git_dir.join("HEAD"), git_dir.join("packed-refs")];
        if let Some(r) = git(&manifest_dir, &["symbolic-ref", "-q", "HEAD"]) {
            watch.push(git_dir.join(r));
        }
        for p in watch.iter().filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    if let Some(c) = git(&manifest_dir, &["rev-parse", "--short=8", "HEAD"]) {
        println!("cargo:rustc-env=TG_GIT_COMMIT={c}");
    }
}
