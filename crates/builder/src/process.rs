use std::collections::VecDeque;
use std::io;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::scratch::{BUILD_ID_ENV, BuildDir};
use crate::{BuildError, Progress};

/// How many trailing output lines a `Failed` error carries.
const TAIL_LINES: usize = 20;

/// How long output pipes may stay open after the command exited before its stragglers are
/// looked for again.
const STRAGGLER_RECHECK: Duration = Duration::from_millis(500);

/// What a builder needs to run toolchain commands on behalf of one build.
pub(crate) struct Tools<'a> {
    pub(crate) builder: &'a str,
    pub(crate) progress: &'a Progress,
    pub(crate) cancel: &'a CancellationToken,
    /// The build's own directory; its marker tags every process the build starts.
    pub(crate) scratch: &'a BuildDir,
}

/// Whether a command's stdout is progress (streamed) or data for the builder (captured).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stdout {
    Stream,
    Capture,
}

/// Kills the command's whole process group when dropped: toolchains fork compilers, linkers and
/// shells, and none of them may outlive a canceled or abandoned build.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH just means everyone is already gone.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn describe(cmd: &Command) -> String {
    let std = cmd.as_std();
    let mut s = std.get_program().to_string_lossy().into_owned();
    for arg in std.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// One read from stdout: a line in stream mode, whatever is available in capture mode. Both
/// keep partial data in the caller's buffers, so dropping the future loses nothing.
async fn read_stdout(
    out: &mut BufReader<tokio::process::ChildStdout>,
    mode: Stdout,
    line: &mut Vec<u8>,
    captured: &mut Vec<u8>,
) -> io::Result<usize> {
    match mode {
        Stdout::Stream => out.read_until(b'\n', line).await,
        Stdout::Capture => out.read_buf(captured).await,
    }
}

impl Tools<'_> {
    pub(crate) fn progress(&self, line: impl Into<String>) {
        // A dropped receiver means nobody watches the log; the build itself goes on.
        let _ = self.progress.send(line.into());
    }

    /// Runs `cmd` to completion in its own process group. Output lines go to the progress
    /// channel (stdout only in [`Stdout::Stream`] mode); captured stdout is returned.
    ///
    /// The group is killed on cancellation and when the returned future is dropped; the
    /// command itself is killed by the kernel if the engine dies; and it and all its
    /// descendants carry the build's marker, by which the build directory's drop (or the next
    /// build, after an engine's death) finds those that escaped the group.
    pub(crate) async fn run(
        &self,
        mut cmd: Command,
        stdout: Stdout,
    ) -> Result<Vec<u8>, BuildError> {
        if self.cancel.is_cancelled() {
            return Err(BuildError::Canceled);
        }
        let program = cmd.as_std().get_program().to_string_lossy().into_owned();
        self.progress(format!("$ {}", describe(&cmd)));
        cmd.env(BUILD_ID_ENV, self.scratch.marker());
        tg_sys::lifetime::die_with_parent(cmd.as_std_mut());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                BuildError::Toolchain {
                    builder: self.builder.to_owned(),
                    program: program.clone(),
                    source,
                }
            } else {
                BuildError::io("start", &program, source)
            }
        })?;
        let mut guard = GroupGuard(
            child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .map(Pid::from_raw),
        );
        let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(BuildError::io(
                "capture output of",
                &program,
                io::Error::other("missing pipe"),
            ));
        };
        let mut out = BufReader::new(out);
        let mut err = BufReader::new(err);
        let (mut out_line, mut err_line, mut captured) = (Vec::new(), Vec::new(), Vec::new());
        let (mut out_done, mut err_done) = (false, false);
        let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
        let mut status: Option<ExitStatus> = None;

        let emit = |buf: &mut Vec<u8>, tail: &mut VecDeque<String>| {
            while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                buf.pop();
            }
            let line = String::from_utf8_lossy(buf).into_owned();
            buf.clear();
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.clone());
            let _ = self.progress.send(line);
        };

        while status.is_none() || !out_done || !err_done {
            // Every read below keeps partial data in its buffer when another branch wins, so
            // re-polling in the next iteration loses nothing.
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => {
                    guard.kill();
                    self.scratch.kill_processes().await;
                    let _ = child.wait().await;
                    return Err(BuildError::Canceled);
                }
                r = child.wait(), if status.is_none() => {
                    let s = r.map_err(|e| BuildError::io("wait for", &program, e))?;
                    // Stragglers the command left behind would hold the pipes open forever,
                    // also those that left the group: commands of a build run one at a time,
                    // so whatever still carries the build's marker is one of them.
                    guard.kill();
                    self.scratch.kill_processes().await;
                    status = Some(s);
                }
                // A straggler caught between fork and exec may have been missed by the scan.
                _ = tokio::time::sleep(STRAGGLER_RECHECK), if status.is_some() => {
                    self.scratch.kill_processes().await;
                }
                r = read_stdout(&mut out, stdout, &mut out_line, &mut captured), if !out_done => {
                    match r {
                        Ok(n) if n > 0 && stdout == Stdout::Capture => {}
                        Ok(n) if n > 0 && out_line.ends_with(b"\n") => emit(&mut out_line, &mut tail),
                        _ => {
                            if !out_line.is_empty() {
                                emit(&mut out_line, &mut tail);
                            }
                            out_done = true;
                        }
                    }
                }
                r = err.read_until(b'\n', &mut err_line), if !err_done => {
                    match r {
                        Ok(n) if n > 0 && err_line.ends_with(b"\n") => emit(&mut err_line, &mut tail),
                        _ => {
                            if !err_line.is_empty() {
                                emit(&mut err_line, &mut tail);
                            }
                            err_done = true;
                        }
                    }
                }
            }
        }
        match status {
            Some(s) if s.success() => Ok(captured),
            Some(s) => Err(BuildError::Failed {
                builder: self.builder.to_owned(),
                status: s.to_string(),
                tail: Vec::from(tail).join("\n"),
            }),
            // The loop only ends once the status is known.
            None => Err(BuildError::io(
                "wait for",
                &program,
                io::Error::other("no exit status"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// A scratch directory for tests that need [`Tools`].
    fn scratch() -> (tempfile::TempDir, BuildDir) {
        let work = tempfile::tempdir().unwrap();
        let dir = BuildDir::create(work.path(), "test").unwrap();
        (work, dir)
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[tokio::test]
    async fn streams_lines_and_captures_stdout() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let (_work, dir) = scratch();
        let tools = Tools {
            scratch: &dir,
            builder: "exec:generic",
            progress: &tx,
            cancel: &cancel,
        };
        let out = tools
            .run(sh("echo data; echo note >&2"), Stdout::Capture)
            .await
            .unwrap();
        assert_eq!(out, b"data\n");
        tools
            .run(sh("printf 'a\\nno-newline'"), Stdout::Stream)
            .await
            .unwrap();
        drop(tx);
        let mut lines = Vec::new();
        while let Some(l) = rx.recv().await {
            lines.push(l);
        }
        assert!(lines.contains(&"note".to_string()));
        assert!(!lines.contains(&"data".to_string()));
        assert!(lines.ends_with(&["a".to_string(), "no-newline".to_string()]));
    }

    #[tokio::test]
    async fn failure_carries_status_and_last_lines() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let (_work, dir) = scratch();
        let tools = Tools {
            scratch: &dir,
            builder: "exec:generic",
            progress: &tx,
            cancel: &cancel,
        };
        let err = tools
            .run(
                sh("i=0; while [ $i -lt 30 ]; do echo line$i; i=$((i+1)); done; exit 3"),
                Stdout::Stream,
            )
            .await
            .unwrap_err();
        let BuildError::Failed { status, tail, .. } = err else {
            panic!("expected Failed, got {err:?}");
        };
        assert!(status.contains('3'), "{status}");
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines.first(), Some(&"line10"));
        assert_eq!(lines.last(), Some(&"line29"));
    }

    #[tokio::test]
    async fn missing_program_is_a_toolchain_error() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let (_work, dir) = scratch();
        let tools = Tools {
            scratch: &dir,
            builder: "exec:go",
            progress: &tx,
            cancel: &cancel,
        };
        let err = tools
            .run(Command::new("tg-no-such-toolchain-xyz"), Stdout::Stream)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BuildError::Toolchain { program, .. } if program == "tg-no-such-toolchain-xyz"),
            "{err:?}"
        );
        assert!(err.to_string().contains("PATH"));
    }

    #[tokio::test]
    async fn a_straggler_in_its_own_session_does_not_hang_the_build() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let (_work, dir) = scratch();
        let tools = Tools {
            scratch: &dir,
            builder: "exec:generic",
            progress: &tx,
            cancel: &cancel,
        };
        // Out of the group's reach, the sleep still holds the pipes; its marker finds it.
        let run = tools.run(sh("setsid sleep 300 & echo done"), Stdout::Stream);
        tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("the build must not wait for the straggler")
            .unwrap();
    }

    #[tokio::test]
    async fn a_background_straggler_does_not_hang_the_build() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let (_work, dir) = scratch();
        let tools = Tools {
            scratch: &dir,
            builder: "exec:generic",
            progress: &tx,
            cancel: &cancel,
        };
        // The backgrounded sleep inherits the pipes; only the group kill lets them close.
        tools
            .run(sh("sleep 300 & echo done"), Stdout::Stream)
            .await
            .unwrap();
    }
}
