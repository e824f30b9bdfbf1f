use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};
use walkdir::{DirEntry, WalkDir};

use crate::BuildError;

/// Directories that hold build outputs or VCS data rather than sources, at any depth. They are
/// neither hashed nor copied, so a build never invalidates its own cache key.
const SKIPPED_DIRS: &[&str] = &["target", ".git", "node_modules"];

fn walk(root: &Path) -> impl Iterator<Item = Result<DirEntry, BuildError>> {
    WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| {
            !(e.file_type().is_dir()
                && e.file_name()
                    .to_str()
                    .is_some_and(|n| SKIPPED_DIRS.contains(&n)))
        })
        .map(move |r| {
            r.map_err(|e| {
                let path = e.path().unwrap_or(root).to_owned();
                BuildError::io("read plan sources at", path, io::Error::from(e))
            })
        })
}

fn write_framed(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

/// Feeds the tree under `root` into `hasher`: relative paths, entry kinds, the executable bit,
/// file contents and symlink targets, in a stable order. Every field is length-framed so that
/// distinct trees cannot produce the same byte stream.
pub(crate) fn hash_tree(hasher: &mut Sha256, root: &Path) -> Result<(), BuildError> {
    for entry in walk(root) {
        let entry = entry?;
        let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
        write_framed(hasher, rel.as_os_str().as_bytes());
        let ft = entry.file_type();
        if ft.is_dir() {
            hasher.update(b"d");
        } else if ft.is_symlink() {
            let target = fs::read_link(entry.path())
                .map_err(|e| BuildError::io("read symlink", entry.path(), e))?;
            hasher.update(b"l");
            write_framed(hasher, target.as_os_str().as_bytes());
        } else if ft.is_file() {
            let meta = entry
                .metadata()
                .map_err(|e| BuildError::io("stat", entry.path(), io::Error::from(e)))?;
            let exec = meta.permissions().mode() & 0o111 != 0;
            hasher.update(if exec { b"x" } else { b"f" });
            hasher.update(meta.len().to_le_bytes());
            let mut file = fs::File::open(entry.path())
                .map_err(|e| BuildError::io("open", entry.path(), e))?;
            let copied = io::copy(&mut file, hasher as &mut dyn Write)
                .map_err(|e| BuildError::io("read", entry.path(), e))?;
            // The file may change while we read it; frame what was actually hashed.
            hasher.update(copied.to_le_bytes());
        }
        // Sockets, fifos and devices carry no source content; their names are hashed above.
    }
    Ok(())
}

/// Copies the sources under `src` into `dst` (created if needed), preserving permissions and
/// symlinks, with the same skips as [`hash_tree`].
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> Result<(), BuildError> {
    fs::create_dir_all(dst).map_err(|e| BuildError::io("create directory", dst, e))?;
    for entry in walk(src) {
        let entry = entry?;
        let rel = entry.path().strip_prefix(src).unwrap_or(entry.path());
        let to = dst.join(rel);
        let ft = entry.file_type();
        if ft.is_dir() {
            fs::create_dir_all(&to).map_err(|e| BuildError::io("create directory", &to, e))?;
        } else if ft.is_symlink() {
            let target = fs::read_link(entry.path())
                .map_err(|e| BuildError::io("read symlink", entry.path(), e))?;
            std::os::unix::fs::symlink(&target, &to)
                .map_err(|e| BuildError::io("create symlink", &to, e))?;
        } else if ft.is_file() {
            fs::copy(entry.path(), &to).map_err(|e| BuildError::io("copy", entry.path(), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(root: &Path) -> Vec<u8> {
        let mut h = Sha256::new();
        hash_tree(&mut h, root).unwrap();
        h.finalize().to_vec()
    }

    #[test]
    fn hash_follows_sources_and_ignores_build_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("main.py"), "print(1)").unwrap();
        fs::create_dir_all(root.join("target/debug")).unwrap();
        fs::create_dir_all(root.join("sub/node_modules")).unwrap();
        let base = digest(root);

        fs::write(root.join("target/debug/out"), "binary").unwrap();
        fs::write(root.join("sub/node_modules/dep.js"), "x").unwrap();
        assert_eq!(digest(root), base, "skipped dirs must not change the hash");

        fs::write(root.join("main.py"), "print(2)").unwrap();
        let edited = digest(root);
        assert_ne!(edited, base);

        fs::set_permissions(root.join("main.py"), fs::Permissions::from_mode(0o755)).unwrap();
        assert_ne!(
            digest(root),
            edited,
            "the executable bit is part of the hash"
        );
    }

    #[test]
    fn renaming_a_file_changes_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), "x").unwrap();
        let before = digest(dir.path());
        fs::rename(dir.path().join("a"), dir.path().join("b")).unwrap();
        assert_ne!(digest(dir.path()), before);
    }

    #[test]
    fn copy_skips_build_dirs_and_keeps_modes_and_links() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let s = src.path();
        fs::create_dir_all(s.join("pkg")).unwrap();
        fs::create_dir_all(s.join(".git")).unwrap();
        fs::write(s.join(".git/HEAD"), "ref").unwrap();
        fs::write(s.join("pkg/run.sh"), "#!/bin/sh").unwrap();
        fs::set_permissions(s.join("pkg/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("pkg/run.sh", s.join("link")).unwrap();

        let d = dst.path().join("copy");
        copy_tree(s, &d).unwrap();
        assert!(!d.join(".git").exists());
        let mode = fs::metadata(d.join("pkg/run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111);
        assert_eq!(
            fs::read_link(d.join("link")).unwrap(),
            Path::new("pkg/run.sh")
        );
        assert_eq!(digest(s), digest(&d));
    }
}
