//! Plan sources travel to a daemon as a gzipped tar (base64 inside the JSON request).
//!
//! Packing honours `.testgroundignore` (gitignore syntax, as the original) and skips directories
//! tagged with `CACHEDIR.TAG` (cargo's `target/`), which are build caches, not sources.

use std::io::{self, Read};
use std::path::Path;

use base64::Engine as _;

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

/// Unpacks a `.tgz` into `dest`. `tar` refuses entries escaping `dest` (`..`, absolute paths).
pub fn unpack(r: impl Read, dest: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dest)?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(r));
    ar.set_preserve_permissions(true);
    ar.unpack(dest)
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

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dst = tempfile::tempdir().unwrap();
        assert!(unpack_base64("!!!", dst.path()).is_err());
        assert!(unpack_base64("aGVsbG8=", dst.path()).is_err());
    }
}
