use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::BuildError;

/// Directories that hold build outputs or VCS data rather than sources, at any depth. They are
/// neither hashed nor copied, so a build never invalidates its own cache key.
const SKIPPED_DIRS: &[&str] = &["target", ".git", "node_modules"];

/// The plan's own list of what is not a source (gitignore syntax, in any directory of the plan),
/// as the original's client honoured when uploading. A daemon receives plans already filtered;
/// an in-process engine reads the plan directory itself, so the walk filters too.
pub(crate) const IGNORE_FILE: &str = ".testgroundignore";

/// One entry of a plan's sources.
pub(crate) struct Entry {
    pub(crate) path: PathBuf,
    pub(crate) file_type: fs::FileType,
}

fn walk(root: &Path) -> impl Iterator<Item = Result<Entry, BuildError>> {
    let root_owned = root.to_owned();
    ignore::WalkBuilder::new(root)
        .standard_filters(false)
        .add_custom_ignore_filename(IGNORE_FILE)
        .follow_links(false)
        .sort_by_file_name(|a, b| a.cmp(b))
        .filter_entry(|e| {
            !(e.file_type().is_some_and(|t| t.is_dir())
                && e.depth() > 0
                && e.file_name()
                    .to_str()
                    .is_some_and(|n| SKIPPED_DIRS.contains(&n)))
        })
        .build()
        .filter(|r| !matches!(r, Ok(e) if e.depth() == 0))
        .map(move |r| {
            let err = |path: &Path, e: ignore::Error| {
                let e = match e.into_io_error() {
                    Some(io) => io,
                    None => io::Error::other("unreadable entry"),
                };
                BuildError::io("read plan sources at", path, e)
            };
            let e = r.map_err(|e| err(&root_owned, e))?;
            let file_type = match e.file_type() {
                Some(t) => t,
                None => {
                    return Err(BuildError::io(
                        "read plan sources at",
                        e.path(),
                        io::Error::other("no file type"),
                    ));
                }
            };
            Ok(Entry {
                path: e.into_path(),
                file_type,
            })
        })
}

/// Every source entry under `root` (skipped directories and ignored paths left out), with its
/// path relative to `root`, in a stable order.
pub(crate) fn entries(root: &Path) -> Result<Vec<(PathBuf, Entry)>, BuildError> {
    walk(root)
        .map(|e| {
            let e = e?;
            let rel = e.path.strip_prefix(root).unwrap_or(&e.path).to_owned();
            Ok((rel, e))
        })
        .collect()
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
        let rel = entry.path.strip_prefix(root).unwrap_or(&entry.path);
        write_framed(hasher, rel.as_os_str().as_bytes());
        let ft = entry.file_type;
        if ft.is_dir() {
            hasher.update(b"d");
        } else if ft.is_symlink() {
            let target = fs::read_link(&entry.path)
                .map_err(|e| BuildError::io("read symlink", &entry.path, e))?;
            hasher.update(b"l");
            write_framed(hasher, target.as_os_str().as_bytes());
        } else if ft.is_file() {
            let meta = fs::symlink_metadata(&entry.path)
                .map_err(|e| BuildError::io("stat", &entry.path, e))?;
            let exec = meta.permissions().mode() & 0o111 != 0;
            hasher.update(if exec { b"x" } else { b"f" });
            hasher.update(meta.len().to_le_bytes());
            let mut file =
                fs::File::open(&entry.path).map_err(|e| BuildError::io("open", &entry.path, e))?;
            let copied = io::copy(&mut file, hasher as &mut dyn Write)
                .map_err(|e| BuildError::io("read", &entry.path, e))?;
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
        let rel = entry.path.strip_prefix(src).unwrap_or(&entry.path);
        let to = dst.join(rel);
        let ft = entry.file_type;
        if ft.is_dir() {
            fs::create_dir_all(&to).map_err(|e| BuildError::io("create directory", &to, e))?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&entry.path)
                .map_err(|e| BuildError::io("read symlink", &entry.path, e))?;
            std::os::unix::fs::symlink(&target, &to)
                .map_err(|e| BuildError::io("create symlink", &to, e))?;
        } else if ft.is_file() {
            fs::copy(&entry.path, &to).map_err(|e| BuildError::io("copy", &entry.path, e))?;
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
    fn testgroundignore_filters_hash_and_copy() {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        fs::create_dir_all(s.join("secrets")).unwrap();
        fs::create_dir_all(s.join("sub")).unwrap();
        fs::write(s.join("main.go"), "package main").unwrap();
        fs::write(s.join("secrets/key"), "k").unwrap();
        fs::write(s.join("sub/big.bin"), "b").unwrap();
        fs::write(s.join("sub/keep.txt"), "k").unwrap();
        fs::write(s.join(IGNORE_FILE), "secrets/\n").unwrap();
        fs::write(s.join("sub").join(IGNORE_FILE), "*.bin\n").unwrap();
        let before = digest(s);
        fs::write(s.join("secrets/key"), "changed").unwrap();
        assert_eq!(digest(s), before, "ignored files do not change the key");

        let dst = tempfile::tempdir().unwrap();
        let d = dst.path().join("copy");
        copy_tree(s, &d).unwrap();
        assert!(d.join("main.go").is_file() && d.join("sub/keep.txt").is_file());
        assert!(!d.join("secrets").exists() && !d.join("sub/big.bin").exists());
        let names: Vec<PathBuf> = entries(s).unwrap().into_iter().map(|(r, _)| r).collect();
        assert!(names.contains(&PathBuf::from("sub/keep.txt")));
        assert!(!names.iter().any(|n| n.starts_with("secrets")));
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
