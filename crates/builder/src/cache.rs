use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{BUILDERS, BuildError, BuildInput, sources};

/// Bumped whenever the layout of cached artifacts changes, so old entries are never reused.
const CACHE_VERSION: &[u8] = b"tg-builder cache v1";

/// Number of hex digits of the cache key that name an artifact.
const KEY_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Rust,
    Go,
    Generic,
}

impl Kind {
    pub(crate) fn from_id(id: &str) -> Result<Self, BuildError> {
        match id {
            "exec:rust" => Ok(Kind::Rust),
            "exec:go" => Ok(Kind::Go),
            "exec:generic" => Ok(Kind::Generic),
            _ => {
                debug_assert!(!BUILDERS.contains(&id));
                Err(BuildError::Unsupported {
                    builder: id.to_owned(),
                })
            }
        }
    }

    /// The file-name prefix of everything this builder keeps in the work directory.
    fn prefix(self) -> &'static str {
        match self {
            Kind::Rust => "exec-rust",
            Kind::Go => "exec-go",
            Kind::Generic => "exec-generic",
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

/// Serializes builds of the same artifact within this process: the second of two identical
/// concurrent builds waits, then finds the first one's artifact in the cache instead of racing
/// it for the same build directory.
pub(crate) async fn lock(artifact: &Path) -> tokio::sync::OwnedMutexGuard<()> {
    let mutex = {
        // A poisoned map only means another thread panicked while holding it; the map itself
        // is still consistent.
        let mut locks = KEY_LOCKS.lock().unwrap_or_else(|e| e.into_inner());
        // Entries nobody holds or waits for can go.
        locks.retain(|_, m| Arc::strong_count(m) > 1);
        locks.entry(artifact.to_owned()).or_default().clone()
    };
    mutex.lock_owned().await
}

/// A cached artifact is valid only once installed, and installation is the last, atomic step
/// of every build, so existence of an executable file is the cache-hit test.
pub(crate) fn is_installed(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Atomically places `contents` at `dest` with `mode`.
pub(crate) fn install_bytes(dest: &Path, contents: &[u8], mode: u32) -> Result<(), BuildError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-install-")
        .tempfile_in(dir)
        .map_err(|e| BuildError::io("create temporary file in", dir, e))?;
    tmp.write_all(contents)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| BuildError::io("write", tmp.path().to_owned(), e))?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode))
        .map_err(|e| BuildError::io("set permissions of", tmp.path().to_owned(), e))?;
    tmp.persist(dest)
        .map_err(|e| BuildError::io("install", dest, e.error))?;
    Ok(())
}

/// Atomically places a copy of the executable `src` at `dest`.
pub(crate) fn install_copy(src: &Path, dest: &Path) -> Result<(), BuildError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-install-")
        .tempfile_in(dir)
        .map_err(|e| BuildError::io("create temporary file in", dir, e))?;
    fs::copy(src, tmp.path()).map_err(|e| BuildError::io("copy", src, e))?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))
        .map_err(|e| BuildError::io("set permissions of", tmp.path().to_owned(), e))?;
    tmp.persist(dest)
        .map_err(|e| BuildError::io("install", dest, e.error))?;
    Ok(())
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
