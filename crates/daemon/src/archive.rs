//! Plan sources travel to a daemon as a gzipped tar (base64 inside the JSON request).
//!
//! Packing honours `.testgroundignore` (gitignore syntax, as the original) and skips directories
//! tagged with `CACHEDIR.TAG` (cargo's `target/`), which are build caches, not sources.

use std::ffi::OsString;
use std::io::{self, Read};
use std::path::{Component, Path};

use base64::Engine as _;
use tar::EntryType;

/// Packs `dir` into a base64-encoded `.tgz` whose entries are relative to `dir`.
pub fn pack_dir(dir: &Path) -> io::Result<String> {
    let bytes = pack_dir_bytes(dir)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Packs `dir` into `.tgz` bytes.
pub fn pack_dir_bytes(dir: &Path) -> io::Result<Vec<u8>> {
    let root = dir.canonicalize()?;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(true);
    let walker = ignore::WalkBuilder::new(&root)
        .standard_filters(false)
        .add_custom_ignore_filename(".testgroundignore")
        .follow_links(true)
        .filter_entry(|e| {
            !(e.file_type().is_some_and(|t| t.is_dir()) && e.path().join("CACHEDIR.TAG").exists())
        })
        .build();
    for entry in walker {
        let entry = entry.map_err(io::Error::other)?;
        let path = entry.path();
        let rel = match path.strip_prefix(&root) {
            Ok(r) if !r.as_os_str().is_empty() => r,
            _ => continue,
        };
        if entry.file_type().is_some_and(|t| t.is_dir()) {
            tar.append_dir(rel, path)?;
        } else {
            tar.append_path_with_name(path, rel)?;
        }
    }
    tar.into_inner()?.finish()
}

/// Decodes a base64 `.tgz` produced by [`pack_dir`] into `dest`.
pub fn unpack_base64(data: &str, dest: &Path) -> io::Result<()> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("plan archive: {e}")))?;
    unpack(&bytes[..], dest)
}

/// Unpacks a `.tgz` into `dest`, which should not exist yet (or be empty).
///
/// An uploaded archive comes from a client the daemon does not trust with its files, so:
/// - permission bits are kept except setuid, setgid and sticky (no privilege travels with
///   plan sources), and owners are not restored;
/// - device files and fifos are refused (tar cannot carry sockets), as is any entry type
///   other than files, directories and links;
/// - absolute paths and `..` components are refused, and so are symbolic and hard links whose
///   target lies outside `dest`, also when reached through other links of the archive.
///
/// Refusals are `InvalidData` errors naming the entry; if `dest` did not exist before, what was
/// unpacked is removed.
pub fn unpack(r: impl Read, dest: &Path) -> io::Result<()> {
    let existed = dest.exists();
    std::fs::create_dir_all(dest)?;
    let res = unpack_checked(r, dest);
    if res.is_err() && !existed {
        // Best effort: the caller reports the refusal, not a failure to clean up.
        let _ = std::fs::remove_dir_all(dest);
    }
    res
}

fn refuse(entry: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("entry {:?}: {why}", entry.display().to_string()),
    )
}

/// The components of `path` after resolving `.` and `..` lexically, starting at `base` (a list
/// of components below the root), or `None` if it climbs above the root or is absolute.
fn resolve_inside(base: &[OsString], path: &Path) -> Option<Vec<OsString>> {
    let mut parts = base.to_vec();
    for c in path.components() {
        match c {
            Component::Normal(n) => parts.push(n.to_owned()),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts)
}

fn unpack_checked(r: impl Read, dest: &Path) -> io::Result<()> {
    let root = dest.canonicalize()?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(r));
    // Without `preserve_permissions`, tar applies `mode & 0o777`: the setuid, setgid and
    // sticky bits are dropped while the rwx bits (executable scripts) are kept.
    ar.set_preserve_permissions(false);
    ar.set_preserve_ownerships(false);
    ar.set_unpack_xattrs(false);
    let mut links = Vec::new();
    for entry in ar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let kind = entry.header().entry_type();
        if path.has_root() {
            return Err(refuse(&path, "absolute paths are not allowed"));
        }
        let parts = match resolve_inside(&[], &path) {
            Some(parts) if !path.components().any(|c| c == Component::ParentDir) => parts,
            _ => return Err(refuse(&path, "\"..\" is not allowed in paths")),
        };
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::Directory => {}
            EntryType::Symlink | EntryType::Link => {
                let target = entry
                    .link_name()?
                    .ok_or_else(|| refuse(&path, "link without a target"))?
                    .into_owned();
                // A symlink's target is relative to the link's directory, a hard link's to the
                // archive's root.
                let base = if kind == EntryType::Symlink {
                    &parts[..parts.len().saturating_sub(1)]
                } else {
                    &[]
                };
                if target.has_root() || resolve_inside(base, &target).is_none() {
                    return Err(refuse(
                        &path,
                        format!("link to {} points outside the plan", target.display()),
                    ));
                }
                if kind == EntryType::Symlink {
                    links.push(path.clone());
                }
            }
            EntryType::Char | EntryType::Block => {
                return Err(refuse(&path, "device files are not allowed"));
            }
            EntryType::Fifo => return Err(refuse(&path, "fifos are not allowed")),
            // Metadata the tar reader applies to the following entry; nothing to write.
            EntryType::XGlobalHeader | EntryType::XHeader => continue,
            other => {
                return Err(refuse(
                    &path,
                    format!("entry type {:?} is not allowed", other.as_byte() as char),
                ));
            }
        }
        // `unpack_in` also refuses to write through a link that leaves `dest`.
        entry.unpack_in(&root).map_err(|e| refuse(&path, e))?;
    }
    // Each link stayed inside on its own; a chain of them (`a/s -> ..`, `t -> a/s/../x`) can
    // still leave, which only the file system can tell.
    for link in links {
        if !points_inside(&root, &root.join(&link)) {
            return Err(refuse(
                &link,
                "link points outside the plan (through other links)",
            ));
        }
    }
    Ok(())
}

/// Whether the symlink at `link` resolves inside `root`; for a dangling link, whether the
/// longest existing prefix of its target does, with no `..` in the rest.
fn points_inside(root: &Path, link: &Path) -> bool {
    let Ok(target) = std::fs::read_link(link) else {
        return false;
    };
    let full = link.parent().unwrap_or(root).join(target);
    let mut existing = full.as_path();
    let mut rest_is_plain = true;
    loop {
        if let Ok(canon) = existing.canonicalize() {
            return rest_is_plain && canon.starts_with(root);
        }
        match existing.components().next_back() {
            Some(Component::Normal(_) | Component::CurDir) => {}
            Some(_) => rest_is_plain = false,
            None => return false,
        }
        let Some(parent) = existing.parent() else {
            return false;
        };
        existing = parent;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_honours_testgroundignore_and_skips_caches() {
        let src = tempfile::tempdir().unwrap();
        let p = src.path();
        std::fs::write(p.join("manifest.toml"), "name = \"x\"\n").unwrap();
        std::fs::create_dir_all(p.join("src")).unwrap();
        std::fs::write(p.join("src/main.rs"), "fn main() {}\n").unwrap();
        std::fs::write(p.join("secret.key"), "k").unwrap();
        std::fs::write(p.join(".testgroundignore"), "*.key\n").unwrap();
        std::fs::create_dir_all(p.join("target/debug")).unwrap();
        std::fs::write(p.join("target/CACHEDIR.TAG"), "Signature").unwrap();
        std::fs::write(p.join("target/debug/big"), "x").unwrap();

        let packed = pack_dir(p).unwrap();
        let dst = tempfile::tempdir().unwrap();
        unpack_base64(&packed, dst.path()).unwrap();
        assert!(dst.path().join("manifest.toml").is_file());
        assert!(dst.path().join("src/main.rs").is_file());
        assert!(!dst.path().join("secret.key").exists());
        assert!(!dst.path().join("target").exists());
    }

    /// A `.tgz` of raw tar entries `(path, type, mode, link target, contents)`. Names are
    /// written into the header bytes directly, since `tar::Builder` refuses the hostile ones.
    fn tgz(entries: &[(&str, EntryType, u32, &str, &[u8])]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (path, kind, mode, link, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(*kind);
            h.set_mode(*mode);
            h.set_size(data.len() as u64);
            if matches!(kind, EntryType::Char | EntryType::Block) {
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    fn unpack_err(entries: &[(&str, EntryType, u32, &str, &[u8])]) -> String {
        let dst = tempfile::tempdir().unwrap();
        let dest = dst.path().join("plan");
        let err = unpack(&tgz(entries)[..], &dest).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(!dest.exists(), "a refused archive leaves nothing: {err}");
        err.to_string()
    }

    #[test]
    fn setuid_setgid_and_sticky_bits_are_stripped() {
        use std::os::unix::fs::PermissionsExt;
        let dst = tempfile::tempdir().unwrap();
        let archive = tgz(&[
            ("run.sh", EntryType::Regular, 0o4755, "", b"#!/bin/sh\n"),
            ("g", EntryType::Regular, 0o2640, "", b"x"),
            ("shared", EntryType::Directory, 0o1777, "", b""),
        ]);
        unpack(&archive[..], dst.path()).unwrap();
        let mode = |p: &str| {
            std::fs::metadata(dst.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("run.sh"), 0o755, "setuid dropped, rwx kept");
        assert_eq!(mode("g"), 0o640);
        assert_eq!(mode("shared"), 0o777);
        assert_eq!(
            std::fs::read(dst.path().join("run.sh")).unwrap(),
            b"#!/bin/sh\n"
        );
    }

    #[test]
    fn devices_and_fifos_are_refused_by_name() {
        let err = unpack_err(&[
            ("ok.txt", EntryType::Regular, 0o644, "", b"fine"),
            ("dev/null", EntryType::Char, 0o666, "", b""),
        ]);
        assert!(
            err.contains("\"dev/null\"") && err.contains("device"),
            "{err}"
        );
        let err = unpack_err(&[("disk", EntryType::Block, 0o600, "", b"")]);
        assert!(err.contains("\"disk\"") && err.contains("device"), "{err}");
        let err = unpack_err(&[("pipe", EntryType::Fifo, 0o600, "", b"")]);
        assert!(err.contains("\"pipe\"") && err.contains("fifo"), "{err}");
    }

    #[test]
    fn escaping_paths_and_links_are_refused() {
        let err = unpack_err(&[("../evil", EntryType::Regular, 0o644, "", b"x")]);
        assert!(err.contains("\"../evil\"") && err.contains(".."), "{err}");
        let err = unpack_err(&[("a/../../evil", EntryType::Regular, 0o644, "", b"x")]);
        assert!(err.contains("is not allowed in paths"), "{err}");
        let err = unpack_err(&[("/etc/evil", EntryType::Regular, 0o644, "", b"x")]);
        assert!(err.contains("absolute"), "{err}");
        let err = unpack_err(&[("abs", EntryType::Symlink, 0o777, "/etc/passwd", b"")]);
        assert!(err.contains("\"abs\"") && err.contains("outside"), "{err}");
        let err = unpack_err(&[("d/up", EntryType::Symlink, 0o777, "../../x", b"")]);
        assert!(err.contains("\"d/up\"") && err.contains("outside"), "{err}");
        let err = unpack_err(&[("hard", EntryType::Link, 0o644, "../x", b"")]);
        assert!(err.contains("\"hard\"") && err.contains("outside"), "{err}");
        // Each link alone stays inside; together they leave.
        let err = unpack_err(&[
            ("a", EntryType::Directory, 0o755, "", b""),
            ("a/s", EntryType::Symlink, 0o777, "..", b""),
            ("t", EntryType::Symlink, 0o777, "a/s/../x", b""),
        ]);
        assert!(
            err.contains("\"t\"") && err.contains("through other links"),
            "{err}"
        );
    }

    #[test]
    fn links_inside_the_plan_are_kept() {
        let dst = tempfile::tempdir().unwrap();
        let archive = tgz(&[
            ("sub", EntryType::Directory, 0o755, "", b""),
            ("sub/data.txt", EntryType::Regular, 0o644, "", b"data"),
            ("sub/up", EntryType::Symlink, 0o777, "../top.txt", b""),
            ("top.txt", EntryType::Regular, 0o644, "", b"top"),
            ("alias", EntryType::Link, 0o644, "sub/data.txt", b""),
        ]);
        unpack(&archive[..], dst.path()).unwrap();
        assert_eq!(std::fs::read(dst.path().join("sub/up")).unwrap(), b"top");
        assert_eq!(std::fs::read(dst.path().join("alias")).unwrap(), b"data");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dst = tempfile::tempdir().unwrap();
        assert!(unpack_base64("!!!", dst.path()).is_err());
        assert!(unpack_base64("aGVsbG8=", dst.path()).is_err());
    }
}
