//! Task logs: `data/daemon/<task_id>.out`, one progress chunk (`{"t":112,"p":"..."}`) per line,
//! as the original wrote them. The file is the source of truth, so logs survive restarts and a
//! follower in another process can tail it; in-process followers are woken through a `watch`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tg_api::rpc::Chunk;
use tokio::sync::watch;

/// The writing end, owned by the worker executing the task.
pub struct LogWriter {
    file: File,
    tx: watch::Sender<LogProgress>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogProgress {
    pub lines: u64,
    pub done: bool,
}

impl LogWriter {
    pub fn create(path: &Path) -> io::Result<(LogWriter, watch::Receiver<LogProgress>)> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = watch::channel(LogProgress::default());
        Ok((LogWriter { file, tx }, rx))
    }

    /// Appends one line of progress text (a trailing newline is added when missing).
    pub fn line(&mut self, text: &str) {
        let mut bytes = text.as_bytes().to_vec();
        if !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
        let mut json = serde_json::to_vec(&Chunk::progress(&bytes)).unwrap_or_default();
        json.push(b'\n');
        // A full disk must not kill the run; the line is lost, the run goes on.
        if let Err(e) = self.file.write_all(&json) {
            tracing::warn!("cannot write task log: {e}");
        }
        self.tx.send_modify(|p| p.lines += 1);
    }

    pub fn finish(self) {
        let _ = self.file.sync_all();
        self.tx.send_modify(|p| p.done = true);
    }
}

/// Reads progress chunks from a log file, following it until `is_done` says the task is over.
pub struct LogReader {
    path: PathBuf,
    reader: Option<BufReader<File>>,
    pos: u64,
    partial: String,
}

impl LogReader {
    pub fn new(path: PathBuf) -> Self {
        LogReader {
            path,
            reader: None,
            pos: 0,
            partial: String::new(),
        }
    }

    /// All complete lines currently in the file past what was already read.
    pub fn read_available(&mut self) -> Vec<Chunk> {
        if self.reader.is_none() {
            match File::open(&self.path) {
                Ok(f) => self.reader = Some(BufReader::new(f)),
                Err(_) => return Vec::new(),
            }
        }
        let Some(r) = self.reader.as_mut() else {
            return Vec::new();
        };
        if r.seek(SeekFrom::Start(self.pos)).is_err() {
            return Vec::new();
        }
        let mut out = Vec::new();
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.pos += n as u64;
                    self.partial.push_str(&line);
                    if self.partial.ends_with('\n') {
                        let full = std::mem::take(&mut self.partial);
                        if let Ok(c) = serde_json::from_str::<Chunk>(full.trim_end()) {
                            out.push(c);
                        }
                    }
                }
            }
        }
        out
    }
}

/// How long a follower without an in-process writer waits between polls of the file.
pub const POLL: Duration = Duration::from_millis(200);
