//! One task per instance: reads its stdout and stderr line by line (into reports and capture
//! files), waits for its exit, stops it on timeout or cancel, and makes sure it is gone before
//! reporting [`InstanceReport::Exited`], always its last report.
//!
//! The task never waits unboundedly: a background child that keeps the pipes open after the
//! instance exited gets [`DRAIN_GRACE`], then the instance is killed, and after [`KILL_DRAIN`]
//! the pipes are abandoned. Nor does it buffer unboundedly: a line longer than [`MAX_LINE`] is
//! cut there for parsing and display, and its rest goes to the capture file only.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tg_api::events::parse_event_line;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::launch::{Launched, Stop};
use crate::supervisor::{Exit, InstanceReport, StopReason, Termination};

/// Between SIGTERM and SIGKILL when the runner stops an instance.
pub(crate) const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long an exited instance's pipes may stay open (held by its children).
pub(crate) const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long to keep reading after killing the instance, for children that escaped it.
pub(crate) const KILL_DRAIN: Duration = Duration::from_secs(1);
/// The longest line kept in memory: an event line is far shorter; anything longer is cut
/// (the whole line is still in `run.out` / `run.err`).
pub const MAX_LINE: usize = 64 * 1024;

pub(crate) struct InstanceTask<I> {
    pub(crate) ordinal: usize,
    pub(crate) instance: I,
    pub(crate) outputs: PathBuf,
    pub(crate) start: Instant,
    pub(crate) reports: mpsc::Sender<InstanceReport>,
    pub(crate) stop: watch::Receiver<Option<StopReason>>,
}

/// One captured pipe: a line reader plus a lazily created capture file (most instances never
/// write to stderr; not opening a file for them saves a descriptor per instance).
struct Pipe<R> {
    reader: Option<BufReader<R>>,
    buf: Vec<u8>,
    /// The current line grew past [`MAX_LINE`]: its rest is captured, not kept.
    overlong: bool,
    capture: PathBuf,
    /// Open only while output comes in: 10,000 idle instances must not hold 10,000 files.
    file: Option<BufWriter<File>>,
    /// The capture file exists (later opens append to it).
    created: bool,
    write_failed: bool,
}

impl<R: AsyncRead + Unpin> Pipe<R> {
    fn new(reader: Option<R>, capture: PathBuf) -> Self {
        Pipe {
            reader: reader.map(BufReader::new),
            buf: Vec::with_capacity(256),
            overlong: false,
            capture,
            file: None,
            created: false,
            write_failed: false,
        }
    }

    fn open(&self) -> bool {
        self.reader.is_some()
    }

    /// Reads up to and including the next newline into `buf`, keeping at most [`MAX_LINE`]
    /// bytes of a line in memory (the rest goes straight to the capture file). Returns 0 at
    /// end of file, else a positive count; `buf` then holds a complete line, or a cut one when
    /// it is full. Cancel safe: a partial line stays in `buf` and the next call continues it.
    async fn fill(&mut self) -> usize {
        if self.reader.is_none() {
            return std::future::pending().await;
        }
        loop {
            let Some(r) = &mut self.reader else {
                return 0;
            };
            let chunk = match r.fill_buf().await {
                Ok(c) => c,
                Err(_) => return 0,
            };
            if chunk.is_empty() {
                return 0;
            }
            let newline = chunk.iter().position(|b| *b == b'\n');
            let take = newline.map_or(chunk.len(), |i| i + 1);
            let mut line_done = newline.is_some();
            if self.overlong {
                // Past the cap: straight to the file, nothing kept.
                let part = chunk[..take].to_vec();
                r.consume(take);
                self.capture_raw(&part);
                if line_done {
                    self.overlong = false;
                    return take;
                }
                continue;
            }
            let room = MAX_LINE - self.buf.len();
            if take > room {
                self.buf.extend_from_slice(&chunk[..room]);
                r.consume(room);
                self.overlong = true;
                line_done = true;
            } else {
                self.buf.extend_from_slice(&chunk[..take]);
                r.consume(take);
            }
            if line_done {
                return take.max(1);
            }
        }
    }

    /// Takes the line in `buf` (captured to the file) as text without its line ending.
    fn take_line(&mut self) -> String {
        self.capture_bytes();
        // Nothing more is buffered: the instance is quiet for now, so give the descriptor back.
        if self.reader.as_ref().is_none_or(|r| r.buffer().is_empty()) {
            self.close();
        }
        let mut end = self.buf.len();
        if end > 0 && self.buf[end - 1] == b'\n' {
            end -= 1;
        }
        if end > 0 && self.buf[end - 1] == b'\r' {
            end -= 1;
        }
        let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.clear();
        line
    }

    fn capture_bytes(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.capture_raw(&buf);
        self.buf = buf;
    }

    fn capture_raw(&mut self, bytes: &[u8]) {
        if self.write_failed {
            return;
        }
        if self.file.is_none() {
            let opened = if self.created {
                std::fs::OpenOptions::new().append(true).open(&self.capture)
            } else {
                File::create(&self.capture)
            };
            match opened {
                Ok(f) => {
                    self.created = true;
                    self.file = Some(BufWriter::new(f));
                }
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
        if let Some(f) = &mut self.file
            && let Err(e) = f.write_all(bytes)
        {
            self.fail(e);
        }
    }

    /// Flushes and closes the capture file (it is reopened for the next output).
    fn close(&mut self) {
        if let Some(mut f) = self.file.take()
            && let Err(e) = f.flush()
        {
            self.fail(e);
        }
    }

    fn fail(&mut self, e: std::io::Error) {
        tracing::warn!(path = %self.capture.display(), error = %e, "cannot capture instance output");
        self.write_failed = true;
    }

    /// Stores the capture as `target` unless the instance wrote `target` itself (sdk-go tees
    /// its events into `run.out`; its own file wins). Without any output, `target` is created
    /// empty so that every instance has both files.
    fn finish(mut self, target: &Path) {
        self.close();
        let flushed = self.created && !self.write_failed;
        if target.exists() {
            let _ = std::fs::remove_file(&self.capture);
            return;
        }
        let result = if flushed {
            std::fs::rename(&self.capture, target)
        } else {
            let _ = std::fs::remove_file(&self.capture);
            File::create(target).map(drop)
        };
        if let Err(e) = result {
            tracing::warn!(path = %target.display(), error = %e, "cannot store instance output");
        }
    }
}

async fn sleep_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl<I: Launched> InstanceTask<I> {
    pub(crate) async fn run(self) {
        let InstanceTask {
            ordinal,
            mut instance,
            outputs,
            start,
            reports,
            mut stop,
        } = self;
        let mut out = Pipe::new(instance.take_stdout(), outputs.join(".run.out.capture"));
        let mut err = Pipe::new(instance.take_stderr(), outputs.join(".run.err.capture"));

        let mut exit: Option<Termination> = None;
        let mut stopped: Option<StopReason> = None;
        let mut stop_seen = false;
        let mut kill_at: Option<Instant> = None;
        let mut drain_until: Option<Instant> = None;
        let mut drain_killed = false;

        // A stop sent before this task subscribed does not show up as a change.
        let early = *stop.borrow_and_update();
        if let Some(reason) = early {
            stop_seen = true;
            stopped = Some(reason);
            instance.stop(Stop::Term);
            kill_at = Some(Instant::now() + TERM_GRACE);
        }

        while out.open() || err.open() || exit.is_none() {
            tokio::select! {
                n = out.fill() => {
                    if n == 0 {
                        out.reader = None;
                    }
                    if !out.buf.is_empty() {
                        let report = stdout_report(ordinal, start.elapsed(), out.take_line());
                        let _ = reports.send(report).await;
                    }
                }
                n = err.fill() => {
                    if n == 0 {
                        err.reader = None;
                    }
                    if !err.buf.is_empty() {
                        let report = stderr_report(ordinal, start.elapsed(), err.take_line());
                        let _ = reports.send(report).await;
                    }
                }
                status = instance.wait(), if exit.is_none() => {
                    exit = Some(status);
                    kill_at = None;
                    drain_until = Some(Instant::now() + DRAIN_GRACE);
                }
                changed = stop.changed(), if !stop_seen => {
                    stop_seen = true;
                    // The run future was dropped if the sender is gone: treat it as a cancel.
                    let reason = match changed {
                        Ok(()) => *stop.borrow_and_update(),
                        Err(_) => Some(StopReason::Canceled),
                    };
                    match reason {
                        Some(reason) if exit.is_none() => {
                            stopped = Some(reason);
                            instance.stop(Stop::Term);
                            kill_at = Some(Instant::now() + TERM_GRACE);
                        }
                        Some(_) => {}
                        None => stop_seen = false,
                    }
                }
                _ = sleep_opt(kill_at) => {
                    instance.stop(Stop::Kill);
                    kill_at = None;
                }
                _ = sleep_opt(drain_until) => {
                    if drain_killed {
                        // Whatever still holds the pipes escaped the process group.
                        break;
                    }
                    instance.stop(Stop::Kill);
                    drain_killed = true;
                    drain_until = Some(Instant::now() + KILL_DRAIN);
                }
            }
        }
        // Children of the instance that outlived it (and closed or never had our pipes).
        instance.stop(Stop::Kill);
        drop(instance);

        // A partial line left behind when the pipes were abandoned still counts.
        if !out.buf.is_empty() {
            let report = stdout_report(ordinal, start.elapsed(), out.take_line());
            let _ = reports.send(report).await;
        }
        if !err.buf.is_empty() {
            let report = stderr_report(ordinal, start.elapsed(), err.take_line());
            let _ = reports.send(report).await;
        }

        out.finish(&outputs.join("run.out"));
        err.finish(&outputs.join("run.err"));

        let exit = Exit {
            termination: exit.unwrap_or(Termination::Unknown),
            stopped,
        };
        let _ = reports
            .send(InstanceReport::Exited {
                instance: ordinal,
                elapsed: start.elapsed(),
                exit,
            })
            .await;
    }
}

fn stdout_report(instance: usize, elapsed: Duration, line: String) -> InstanceReport {
    let event = parse_event_line(&line).map(|(_, e)| e);
    InstanceReport::Stdout {
        instance,
        elapsed,
        line,
        event,
    }
}

fn stderr_report(instance: usize, elapsed: Duration, line: String) -> InstanceReport {
    InstanceReport::Stderr {
        instance,
        elapsed,
        line,
    }
}
