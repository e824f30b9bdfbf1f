//! One task per instance: reads its stdout and stderr line by line (into reports and capture
//! files), waits for its exit, stops it on timeout or cancel, and makes sure its process group
//! is gone before reporting [`InstanceReport::Exited`], always its last report.
//!
//! The task never waits unboundedly: a background child that keeps the pipes open after the
//! instance exited gets [`DRAIN_GRACE`], then the group is killed, and after [`KILL_DRAIN`] the
//! pipes are abandoned.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tg_api::events::parse_event_line;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::supervisor::{Exit, InstanceReport, StopReason, Termination};

/// Between SIGTERM and SIGKILL when the runner stops an instance.
pub(crate) const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long an exited instance's pipes may stay open (held by its children).
pub(crate) const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long to keep reading after killing the group, for children that escaped it.
pub(crate) const KILL_DRAIN: Duration = Duration::from_secs(1);

pub(crate) struct InstanceTask {
    pub(crate) ordinal: usize,
    pub(crate) child: Child,
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
    capture: PathBuf,
    file: Option<BufWriter<File>>,
    write_failed: bool,
}

impl<R: AsyncRead + Unpin> Pipe<R> {
    fn new(reader: Option<R>, capture: PathBuf) -> Self {
        Pipe {
            reader: reader.map(BufReader::new),
            buf: Vec::with_capacity(256),
            capture,
            file: None,
            write_failed: false,
        }
    }

    fn open(&self) -> bool {
        self.reader.is_some()
    }

    /// Reads up to and including the next newline into `buf`. Cancel safe: a partial line
    /// stays in `buf` and the next call continues it.
    async fn fill(&mut self) -> usize {
        match &mut self.reader {
            Some(r) => r.read_until(b'\n', &mut self.buf).await.unwrap_or(0),
            None => std::future::pending().await,
        }
    }

    /// Takes the line in `buf` (captured to the file) as text without its line ending.
    fn take_line(&mut self) -> String {
        self.capture_bytes();
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
        if self.write_failed {
            return;
        }
        if self.file.is_none() {
            match File::create(&self.capture) {
                Ok(f) => self.file = Some(BufWriter::new(f)),
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
        if let Some(f) = &mut self.file
            && let Err(e) = f.write_all(&self.buf)
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
        let file = self.file.take();
        let flushed = match file {
            Some(mut f) => f.flush().is_ok(),
            None => false,
        };
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

/// Signals the instance's whole process group. Guarded so that a bogus id can never turn into
/// `kill(0)` (our own group) or `kill(-1)` (everything we may signal).
fn signal_group(pgid: Option<u32>, sig: Signal) {
    if let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 1) {
        // ESRCH (group already gone) is the common, expected case.
        let _ = killpg(Pid::from_raw(pgid), sig);
    }
}

/// Kills the process group when dropped: at the end of the task, and also when the task is
/// aborted because the run itself was dropped, so no instance outlives its run.
struct GroupKill(Option<u32>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        signal_group(self.0, Signal::SIGKILL);
    }
}

async fn sleep_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn termination(status: std::io::Result<std::process::ExitStatus>) -> Termination {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => Termination::Code(c),
            (None, Some(sig)) => Termination::Signal(sig),
            (None, None) => Termination::Unknown,
        },
        Err(_) => Termination::Unknown,
    }
}

impl InstanceTask {
    pub(crate) async fn run(self) {
        let InstanceTask {
            ordinal,
            mut child,
            outputs,
            start,
            reports,
            mut stop,
        } = self;
        let pgid = child.id();
        let group_kill = GroupKill(pgid);
        let mut out = Pipe::new(child.stdout.take(), outputs.join(".run.out.capture"));
        let mut err = Pipe::new(child.stderr.take(), outputs.join(".run.err.capture"));

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
            signal_group(pgid, Signal::SIGTERM);
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
                status = child.wait(), if exit.is_none() => {
                    exit = Some(termination(status));
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
                            signal_group(pgid, Signal::SIGTERM);
                            kill_at = Some(Instant::now() + TERM_GRACE);
                        }
                        Some(_) => {}
                        None => stop_seen = false,
                    }
                }
                _ = sleep_opt(kill_at) => {
                    signal_group(pgid, Signal::SIGKILL);
                    kill_at = None;
                }
                _ = sleep_opt(drain_until) => {
                    if drain_killed {
                        // Whatever still holds the pipes escaped the process group.
                        break;
                    }
                    signal_group(pgid, Signal::SIGKILL);
                    drain_killed = true;
                    drain_until = Some(Instant::now() + KILL_DRAIN);
                }
            }
        }
        // Children of the instance that outlived it (and closed or never had our pipes).
        drop(group_kill);

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
