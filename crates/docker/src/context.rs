//! Build contexts: a tar stream the engine's classic builder unpacks, written to a temporary
//! file (a context holding a toolchain is too large to keep in memory) or kept in memory when
//! small.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// A build context being assembled.
pub struct Context {
    tar: tar::Builder<Box<dyn Write + Send>>,
    backing: Backing,
}

enum Backing {
    Memory(std::sync::Arc<std::sync::Mutex<Vec<u8>>>),
    File(tempfile::TempPath),
}

/// A finished context, ready to send.
pub enum Finished {
    Memory(Vec<u8>),
    /// Removed when dropped.
    File(tempfile::TempPath),
}

impl Finished {
    pub fn len(&self) -> u64 {
        match self {
            Finished::Memory(v) => v.len() as u64,
            Finished::File(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A writer into a shared buffer (the tar builder owns its writer).
struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn header(mode: u32, size: u64, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    // A fixed time: the same inputs give the same context (and the builder's layer cache hits).
    h.set_mtime(0);
    h
}

impl Context {
    /// A context kept in memory (small ones: a Dockerfile and a binary).
    pub fn in_memory() -> Context {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        Context {
            tar: tar::Builder::new(Box::new(Shared(buf.clone()))),
            backing: Backing::Memory(buf),
        }
    }

    /// A context written to a temporary file in `dir` (large ones: toolchains, root file
    /// systems).
    pub fn on_disk(dir: &Path) -> io::Result<Context> {
        let f = tempfile::Builder::new()
            .prefix(".tg-context-")
            .suffix(".tar")
            .tempfile_in(dir)?;
        let (file, path) = f.into_parts();
        let w: Box<dyn Write + Send> = Box::new(BufWriter::with_capacity(1 << 20, file));
        let mut tar = tar::Builder::new(w);
        tar.follow_symlinks(false);
        Ok(Context {
            tar,
            backing: Backing::File(path),
        })
    }

    /// Adds a regular file with `contents` at `dest` (relative to the context root).
    pub fn file(&mut self, dest: &str, contents: &[u8], mode: u32) -> io::Result<()> {
        let mut h = header(mode, contents.len() as u64, tar::EntryType::Regular);
        self.tar.append_data(&mut h, dest, contents)
    }

    /// Adds a symbolic link `dest` → `target`.
    pub fn symlink(&mut self, dest: &str, target: &str) -> io::Result<()> {
        let mut h = header(0o777, 0, tar::EntryType::Symlink);
        self.tar.append_link(&mut h, dest, target)
    }

    /// Adds a directory entry.
    pub fn dir(&mut self, dest: &str, mode: u32) -> io::Result<()> {
        let mut h = header(mode, 0, tar::EntryType::Directory);
        self.tar.append_data(&mut h, dest, io::empty())
    }

    /// Adds the host file `src` (a regular file, followed if a link) at `dest`, keeping its mode.
    pub fn host_file(&mut self, src: &Path, dest: &str) -> io::Result<()> {
        let mut f = File::open(src)?;
        let meta = f.metadata()?;
        use std::os::unix::fs::PermissionsExt;
        let mut h = header(
            meta.permissions().mode() & 0o7777,
            meta.len(),
            tar::EntryType::Regular,
        );
        self.tar.append_data(&mut h, dest, &mut f)
    }

    /// Adds the host directory `src` recursively under `dest`, keeping modes and symbolic
    /// links, skipping entries for which `skip` (given the path relative to `src`) is true.
    pub fn host_dir(
        &mut self,
        src: &Path,
        dest: &str,
        skip: &dyn Fn(&Path) -> bool,
    ) -> io::Result<()> {
        let dest = dest.trim_end_matches('/');
        let mut walk = walkdir::WalkDir::new(src).follow_links(false).into_iter();
        while let Some(entry) = walk.next() {
            let entry = entry.map_err(io::Error::other)?;
            let rel = entry.path().strip_prefix(src).unwrap_or(entry.path());
            if !rel.as_os_str().is_empty() && skip(rel) {
                if entry.file_type().is_dir() {
                    walk.skip_current_dir();
                }
                continue;
            }
            let name = if rel.as_os_str().is_empty() {
                if dest.is_empty() {
                    continue;
                }
                dest.to_string()
            } else if dest.is_empty() {
                rel.to_string_lossy().into_owned()
            } else {
                format!("{dest}/{}", rel.to_string_lossy())
            };
            let ft = entry.file_type();
            if ft.is_symlink() {
                let target = std::fs::read_link(entry.path())?;
                self.symlink(&name, &target.to_string_lossy())?;
            } else if ft.is_dir() {
                use std::os::unix::fs::PermissionsExt;
                let mode = entry
                    .metadata()
                    .map_err(io::Error::other)?
                    .permissions()
                    .mode();
                self.dir(&name, mode & 0o7777)?;
            } else if ft.is_file() {
                self.host_file(entry.path(), &name)?;
            }
            // Sockets, fifos and devices have no place in an image.
        }
        Ok(())
    }

    /// Ends the archive.
    pub fn finish(self) -> io::Result<Finished> {
        let mut w = self.tar.into_inner()?;
        w.flush()?;
        drop(w);
        Ok(match self.backing {
            Backing::Memory(buf) => Finished::Memory(std::mem::take(
                &mut *buf.lock().unwrap_or_else(|e| e.into_inner()),
            )),
            Backing::File(p) => Finished::File(p),
        })
    }
}

/// `path` as the engine's context-relative form.
pub fn rel(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_holds_files_links_and_host_trees() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("src/skip")).unwrap();
        std::fs::write(dir.path().join("src/a.txt"), "a").unwrap();
        std::fs::write(dir.path().join("src/skip/b.txt"), "b").unwrap();
        std::os::unix::fs::symlink("a.txt", dir.path().join("src/l")).unwrap();
        let mut c = Context::on_disk(dir.path()).unwrap();
        c.file("Dockerfile", b"FROM scratch\n", 0o644).unwrap();
        c.symlink("bin/sh", "busybox").unwrap();
        c.host_dir(&dir.path().join("src"), "plan", &|p| p.starts_with("skip"))
            .unwrap();
        let Finished::File(path) = c.finish().unwrap() else {
            panic!("on disk")
        };
        let mut names = Vec::new();
        let mut ar = tar::Archive::new(File::open(&path).unwrap());
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            names.push((
                e.path().unwrap().to_string_lossy().into_owned(),
                e.header().entry_type(),
            ));
        }
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let got: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            got,
            ["Dockerfile", "bin/sh", "plan", "plan/a.txt", "plan/l"]
        );
        assert!(
            names
                .iter()
                .any(|(n, k)| n == "plan/l" && *k == tar::EntryType::Symlink)
        );
        let mut m = Context::in_memory();
        m.file("x", b"hello", 0o600).unwrap();
        let Finished::Memory(bytes) = m.finish().unwrap() else {
            panic!("in memory")
        };
        assert!(bytes.len() >= 1024);
    }
}
