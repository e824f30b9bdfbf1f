use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::{BuildError, BuildInput, sources};

/// Bumped whenever the layout of cached artifacts changes, so old entries are never reused.
const CACHE_VERSION: &[u8] = b"tg-builder cache v1";

/// Number of hex digits of the cache key that name an artifact.
const KEY_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Rust,
    Go,
    Generic,
    DockerGo,
    DockerRust,
    DockerGeneric,
    DockerNode,
}

impl Kind {
    /// The file-name prefix of everything this builder keeps in the work directory.
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Kind::Rust => "exec-rust",
            Kind::Go => "exec-go",
            Kind::Generic => "exec-generic",
            Kind::DockerGo => "docker-go",
            Kind::DockerRust => "docker-rust",
            Kind::DockerGeneric => "docker-generic",
            Kind::DockerNode => "docker-node",
        }
    }
}

/// Plan names come from manifests and may contain `/` or spaces; keep file names tame.
pub(crate) fn sanitize(plan: &str) -> String {
    let s: String = plan
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("plan{s}")
    } else {
        s
    }
}

/// `<work_dir>/<prefix>--<plan>`: the per-plan directory for state that outlives one build key
/// (the cargo target directory).
pub(crate) fn plan_dir(kind: Kind, plan: &str, work_dir: &Path) -> PathBuf {
    work_dir.join(format!("{}--{}", kind.prefix(), sanitize(plan)))
}

/// `<work_dir>/<prefix>--<plan>-<key>`: the artifact of one cache key. Companion files and
/// directories of the same key use this path plus a `.<suffix>`.
pub(crate) fn artifact_path(kind: Kind, plan: &str, key: &str, work_dir: &Path) -> PathBuf {
    work_dir.join(format!("{}--{}-{key}", kind.prefix(), sanitize(plan)))
}

pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

/// Object keys sorted, so that the same configuration always hashes the same however it was
/// coalesced.
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), canonical(&m[k])))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

fn frame(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// The cache key of a build: sha256 over everything that can change the artifact, namely the
/// builder, plan name, configuration, selectors, dependencies, the plan's sources and any
/// `extra_roots` (sources outside the plan directory that the build reads).
pub(crate) fn key(input: &BuildInput, extra_roots: &[PathBuf]) -> Result<String, BuildError> {
    let mut h = Sha256::new();
    frame(&mut h, CACHE_VERSION);
    frame(&mut h, input.builder.as_bytes());
    frame(&mut h, input.plan.as_bytes());
    let config = canonical(&Value::Object(input.config.clone())).to_string();
    frame(&mut h, config.as_bytes());
    let mut selectors = input.selectors.clone();
    selectors.sort();
    selectors.dedup();
    h.update((selectors.len() as u64).to_le_bytes());
    for s in &selectors {
        frame(&mut h, s.as_bytes());
    }
    let mut deps: Vec<_> = input
        .dependencies
        .iter()
        .map(|d| (&d.module, &d.target, &d.version))
        .collect();
    deps.sort();
    h.update((deps.len() as u64).to_le_bytes());
    for (m, t, v) in deps {
        frame(&mut h, m.as_bytes());
        frame(&mut h, t.as_bytes());
        frame(&mut h, v.as_bytes());
    }
    sources::hash_tree(&mut h, &input.plan_dir)?;
    for root in extra_roots {
        frame(
            &mut h,
            std::os::unix::ffi::OsStrExt::as_bytes(root.as_os_str()),
        );
        sources::hash_tree(&mut h, root)?;
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(hex[..KEY_LEN].to_owned())
}

type KeyLocks = Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>;

static KEY_LOCKS: LazyLock<KeyLocks> = LazyLock::new(Default::default);

/// How often a build waiting for another process's build of the same artifact looks again.
const LOCK_POLL: Duration = Duration::from_millis(100);

/// An exclusive `flock` on `<artifact>.lock`, shared by every process using the work dir.
/// The file is removed on release, so the work dir holds no lock files between builds.
pub(crate) struct FileLock {
    path: PathBuf,
    _lock: Flock<File>,
}

impl FileLock {
    /// Takes the lock if nobody holds it.
    pub(crate) fn try_acquire(path: &Path) -> io::Result<Option<Self>> {
        loop {
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(path)?;
            let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, e)) => return Err(e.into()),
            };
            // The previous holder removes the file on release; if that happened between our
            // open and our lock, we locked a file nobody else will ever see. Try again.
            let held = lock.metadata()?;
            match fs::metadata(path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(Some(FileLock {
                        path: path.to_owned(),
                        _lock: lock,
                    }));
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Removed while still locked: a waiter that opened this file re-checks the path after
        // locking and starts over on the new file.
        let _ = fs::remove_file(&self.path);
    }
}

/// Exclusive right to build one artifact, within this process and across processes.
pub(crate) struct KeyGuard {
    _file: FileLock,
    _local: tokio::sync::OwnedMutexGuard<()>,
}

/// Serializes builds of the same artifact: the second of two identical concurrent builds
/// (in this process or another one sharing the work dir) waits, then finds the first one's
/// artifact in the cache instead of racing it for the same build directory. `on_wait` is
/// called once if the artifact is being built by another process.
pub(crate) async fn lock(
    artifact: &Path,
    cancel: &CancellationToken,
    on_wait: impl FnOnce(),
) -> Result<KeyGuard, BuildError> {
    let mutex = {
        // A poisoned map only means another thread panicked while holding it; the map itself
        // is still consistent.
        let mut locks = KEY_LOCKS.lock().unwrap_or_else(|e| e.into_inner());
        // Entries nobody holds or waits for can go.
        locks.retain(|_, m| Arc::strong_count(m) > 1);
        locks.entry(artifact.to_owned()).or_default().clone()
    };
    let local = tokio::select! {
        guard = mutex.lock_owned() => guard,
        _ = cancel.cancelled() => return Err(BuildError::Canceled),
    };
    let path = with_suffix(artifact, "lock");
    let mut on_wait = Some(on_wait);
    loop {
        match FileLock::try_acquire(&path) {
            Ok(Some(file)) => {
                return Ok(KeyGuard {
                    _file: file,
                    _local: local,
                });
            }
            Ok(None) => {}
            Err(e) => return Err(BuildError::io("lock", &path, e)),
        }
        if let Some(f) = on_wait.take() {
            f();
        }
        // flock has no async wait; the holder is a build, so a short poll costs nothing.
        tokio::select! {
            _ = tokio::time::sleep(LOCK_POLL) => {}
            _ = cancel.cancelled() => return Err(BuildError::Canceled),
        }
    }
}

/// A cached artifact is valid only once installed, and installation is the last, atomic step
/// of every build, so existence of an executable file is the cache-hit test.
pub(crate) fn is_installed(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Atomically places `contents` at `dest` with `mode`, writing it first in the build's own
/// `scratch` directory (on the same file system) so that no half-written file is ever visible
/// under `dest`, nor left in the work dir if the engine dies meanwhile.
pub(crate) fn install_bytes(
    scratch: &Path,
    dest: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), BuildError> {
    let mut tmp = tempfile::Builder::new()
        .prefix("install-")
        .tempfile_in(scratch)
        .map_err(|e| BuildError::io("create temporary file in", scratch, e))?;
    tmp.write_all(contents)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| BuildError::io("write", tmp.path().to_owned(), e))?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode))
        .map_err(|e| BuildError::io("set permissions of", tmp.path().to_owned(), e))?;
    tmp.persist(dest)
        .map_err(|e| BuildError::io("install", dest, e.error))?;
    Ok(())
}

/// Atomically places a copy of the executable `src` at `dest` (see [`install_bytes`]).
pub(crate) fn install_copy(scratch: &Path, src: &Path, dest: &Path) -> Result<(), BuildError> {
    let tmp = tempfile::Builder::new()
        .prefix("install-")
        .tempfile_in(scratch)
        .map_err(|e| BuildError::io("create temporary file in", scratch, e))?;
    fs::copy(src, tmp.path()).map_err(|e| BuildError::io("copy", src, e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| BuildError::io("write", tmp.path().to_owned(), e))?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))
        .map_err(|e| BuildError::io("set permissions of", tmp.path().to_owned(), e))?;
    tmp.persist(dest)
        .map_err(|e| BuildError::io("install", dest, e.error))?;
    Ok(())
}

/// Whether a work-dir entry is an `exec:generic` build directory (`<artifact>.d`).
pub(crate) fn is_generic_build_dir(name: &str) -> bool {
    let Some(stem) = name
        .strip_prefix(Kind::Generic.prefix())
        .and_then(|r| r.strip_prefix("--"))
        .and_then(|r| r.strip_suffix(".d"))
    else {
        return false;
    };
    stem.len() > KEY_LEN + 1
        && stem.as_bytes()[stem.len() - KEY_LEN - 1] == b'-'
        && stem[stem.len() - KEY_LEN..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Removes an `exec:generic` build directory that no installed artifact uses and that no
/// build (here or in another process) holds: what a killed build of that key left behind.
pub(crate) fn remove_orphan_generic_dir(dir: &Path) {
    let Some(artifact) = dir.to_str().and_then(|s| s.strip_suffix(".d")) else {
        return;
    };
    let artifact = Path::new(artifact);
    if is_installed(artifact) {
        return;
    }
    let Ok(Some(_held)) = FileLock::try_acquire(&with_suffix(artifact, "lock")) else {
        return;
    };
    // Installed between the check and the lock: it is in use now.
    if is_installed(artifact) {
        return;
    }
    match fs::remove_dir_all(dir) {
        Ok(()) => tracing::info!(path = %dir.display(), "removed an unfinished build directory"),
        Err(e) => tracing::warn!(path = %dir.display(), error = %e,
            "could not remove an unfinished build directory"),
    }
}

/// Whether `name` (a work-dir entry) belongs to `plan` for the builder with `prefix`: the
/// per-plan directory itself, or a keyed artifact with an optional `.<suffix>`.
fn belongs_to(name: &str, prefix: &str, plan: &str) -> bool {
    let Some(rest) = name
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix("--"))
        .and_then(|r| r.strip_prefix(plan))
    else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    // `-<key>` followed by nothing or a suffix; anything else is another plan whose name merely
    // starts with this one (`foo` vs `foo-bar`).
    let Some(rest) = rest.strip_prefix('-') else {
        return false;
    };
    let key_len = rest
        .bytes()
        .take_while(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        .count();
    key_len == KEY_LEN && (rest.len() == KEY_LEN || rest.as_bytes()[KEY_LEN] == b'.')
}

pub(crate) fn purge(kind: Kind, plan: &str, work_dir: &Path) -> Result<(), BuildError> {
    let plan = sanitize(plan);
    let entries = match fs::read_dir(work_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(BuildError::io("read work directory", work_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| BuildError::io("read work directory", work_dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !belongs_to(name, kind.prefix(), &plan) {
            continue;
        }
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let res = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match res {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(BuildError::io("remove", path, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dependency;
    use serde_json::json;

    fn input(dir: &Path) -> BuildInput {
        BuildInput {
            build_id: "b1".into(),
            plan: "p".into(),
            plan_dir: dir.to_owned(),
            builder: "exec:generic".into(),
            config: json!({"exec": "x", "nested": {"b": 1, "a": 2}})
                .as_object()
                .cloned()
                .unwrap(),
            selectors: vec!["b".into(), "a".into()],
            dependencies: vec![],
            work_dir: dir.join("work"),
        }
    }

    #[test]
    fn key_is_stable_and_order_insensitive() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("main.py"), "x").unwrap();
        let a = input(dir.path());
        let mut b = a.clone();
        b.build_id = "b2".into();
        b.selectors = vec!["a".into(), "b".into()];
        b.config = json!({"nested": {"a": 2, "b": 1}, "exec": "x"})
            .as_object()
            .cloned()
            .unwrap();
        let ka = key(&a, &[]).unwrap();
        assert_eq!(ka.len(), KEY_LEN);
        assert_eq!(ka, key(&b, &[]).unwrap());

        let mut c = a.clone();
        c.dependencies.push(Dependency {
            module: "m".into(),
            target: "t".into(),
            version: "v1".into(),
        });
        assert_ne!(ka, key(&c, &[]).unwrap());
        let mut d = a.clone();
        d.builder = "exec:go".into();
        assert_ne!(ka, key(&d, &[]).unwrap());
        let mut e = a.clone();
        e.config.insert("exec".into(), json!("y"));
        assert_ne!(ka, key(&e, &[]).unwrap());
    }

    #[test]
    fn purge_matches_only_the_plan() {
        let key = "0123456789abcdef";
        assert!(belongs_to("exec-go--foo", "exec-go", "foo"));
        assert!(belongs_to(&format!("exec-go--foo-{key}"), "exec-go", "foo"));
        assert!(belongs_to(
            &format!("exec-go--foo-{key}.deps.json"),
            "exec-go",
            "foo"
        ));
        assert!(!belongs_to(
            &format!("exec-go--foo-bar-{key}"),
            "exec-go",
            "foo"
        ));
        assert!(!belongs_to("exec-go--foo-bar", "exec-go", "foo"));
        assert!(!belongs_to(
            &format!("exec-rust--foo-{key}"),
            "exec-go",
            "foo"
        ));
        assert!(!belongs_to(
            &format!("exec-go--foo-{key}x"),
            "exec-go",
            "foo"
        ));
    }

    #[test]
    fn plan_names_are_sanitized() {
        assert_eq!(sanitize("a/b c"), "a-b-c");
        assert_eq!(sanitize("example-rust"), "example-rust");
        assert_eq!(sanitize(".."), "plan..");
    }
}
