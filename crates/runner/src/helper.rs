//! Helper processes for `local:exec`: each spawns a share of a run's instances and holds their
//! pipes and pidfds, forwarding their output to the engine over its own stdout, so that the
//! engine keeps three descriptors per helper instead of three per instance. This is what lets
//! 10,000 instances (and their 10,000 sync connections, which stay in the engine) fit a hard
//! limit of 20,000 open files that root cannot raise.
//!
//! A helper is this very executable started with [`HELPER_ARG`] (the CLI dispatches it to
//! [`helper_main`] before anything else; [`set_helper_program`] tells the runner where it is).
//! It runs a single-threaded runtime, so every instance is forked by its main thread and its
//! `PR_SET_PDEATHSIG` fires when the helper dies, which it does with the engine.
//!
//! Wire format, both ways: frames of `u32 LE length`, `u8 tag`, `u32 LE ordinal`, body.
//! - engine → helper: `SPAWN` (program, environment), `CREDIT` (stream, count), `FORGET`
//!   (stream: the engine stopped reading it).
//! - helper → engine: `SPAWNED` (pid), `FAILED` (errno, message), `DATA` (stream, bytes),
//!   `EOF` (stream), `EXITED` (code or signal).
//!
//! Output stays lossless and per stream: stdout and stderr are separate pipes in the helper and
//! separate byte streams in the engine, cut into lines there exactly as for a direct child.
//! Flow control is by credit: a stream may have [`CREDITS`] chunks in flight; the engine returns
//! one when the instance task takes a chunk. So the engine's reader never blocks (no instance
//! can hold up the others, nor the replies to spawns), and memory stays bounded: an instance
//! that reads slowly slows its own process through its full pipe, as without helpers.
//! Signals need no helper: the engine knows each instance's process group.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, ReadBuf};
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::instance_sched::InstanceSched;
use crate::supervisor::Termination;

/// The first argument that makes the `testground` executable a helper.
pub const HELPER_ARG: &str = "__exec-helper";

/// The helper's environment variable naming the run's CPU group (`instance_sched.rs`), which
/// the instances it starts join; the helper itself stays outside it.
const CPU_GROUP_ENV: &str = "TESTGROUND_INSTANCE_CPU_GROUP";

/// Chunks a stream may have in flight between helper and instance task.
const CREDITS: usize = 4;
/// The largest chunk a helper reads from a pipe at once.
const CHUNK: usize = 16 * 1024;
/// The largest frame accepted: a spawn request with a large environment.
const MAX_FRAME: usize = 16 << 20;

// engine → helper
const SPAWN: u8 = 1;
const CREDIT: u8 = 2;
const FORGET: u8 = 3;
// helper → engine
const SPAWNED: u8 = 1;
const FAILED: u8 = 2;
const DATA: u8 = 3;
const EOF: u8 = 4;
const EXITED: u8 = 5;

static PROGRAM: OnceLock<PathBuf> = OnceLock::new();

/// Names the executable that runs [`helper_main`] when given [`HELPER_ARG`] (the `testground`
/// binary names itself). Without it `local:exec` holds every instance's pipes itself.
pub fn set_helper_program(path: PathBuf) {
    let _ = PROGRAM.set(path);
}

pub(crate) fn helper_program() -> Option<&'static Path> {
    PROGRAM.get().map(PathBuf::as_path)
}

/// A frame under construction: length placeholder, tag, ordinal.
struct Frame(Vec<u8>);

impl Frame {
    fn new(tag: u8, ordinal: u32) -> Frame {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[0; 4]);
        v.push(tag);
        v.extend_from_slice(&ordinal.to_le_bytes());
        Frame(v)
    }

    fn u8(mut self, x: u8) -> Frame {
        self.0.push(x);
        self
    }

    fn u32(mut self, x: u32) -> Frame {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }

    fn bytes(mut self, b: &[u8]) -> Frame {
        self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.0.extend_from_slice(b);
        self
    }

    fn done(mut self) -> Vec<u8> {
        let len = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        self.0
    }
}

/// Reads a frame body field by field; every getter fails cleanly on a short frame.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.0.len() < n {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "short frame"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> io::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn bytes(&mut self) -> io::Result<Vec<u8>> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }

    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0).to_vec()
    }
}

/// Reads one frame: (tag, ordinal, body). `None` at a clean end of the stream.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<(u8, u32, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if !(5..=MAX_FRAME).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad frame length",
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    let ordinal = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]);
    let tag = buf[0];
    buf.drain(..5);
    Ok(Some((tag, ordinal, buf)))
}

// ---------------------------------------------------------------------------------------------
// The helper process.

/// The helper's `main`: serves spawn requests on stdin until the engine closes it, then kills
/// whatever of its instances is left and exits.
pub fn helper_main() -> std::process::ExitCode {
    // The whole share's pipes live here.
    tg_sync::raise_fd_limit();
    crate::child::defer_reaps_while_busy();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("testground exec helper: cannot start a runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("testground exec helper: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

struct Served {
    pid: u32,
    credits: [Arc<Semaphore>; 2],
    forget: [CancellationToken; 2],
}

async fn serve() -> io::Result<()> {
    use std::os::fd::AsFd;
    let stdin = io::stdin().as_fd().try_clone_to_owned()?;
    let stdout = io::stdout().as_fd().try_clone_to_owned()?;
    let mut input = BufReader::new(tokio::net::unix::pipe::Receiver::from_owned_fd(stdin)?);
    let mut output = tokio::net::unix::pipe::Sender::from_owned_fd(stdout)?;

    // All frames to the engine go through one writer; the queue is bounded by the credits
    // outstanding plus one spawn reply and exit per instance.
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if output.write_all(&f).await.is_err() {
                break;
            }
        }
    });

    let live: Arc<Mutex<HashMap<u32, Served>>> = Arc::default();
    // The engine's settled choice (it checked what the kernel allows), passed in our environment.
    let sched = InstanceSched::parse(std::env::var(crate::instance_sched::ENV).ok().as_deref())
        .unwrap_or_default();
    // The group the engine created. Should it be gone, instances still start (scheduled as
    // their sessions), with a word on stderr, which reaches the engine's log.
    let cpu_group = std::env::var_os(CPU_GROUP_ENV).and_then(|p| {
        tg_sys::Cgroup::open(std::path::Path::new(&p))
            .inspect_err(|e| eprintln!("testground exec helper: no CPU group for instances: {e}"))
            .ok()
    });
    let result = loop {
        let (tag, ordinal, body) = match read_frame(&mut input).await {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let mut f = Fields(&body);
        match tag {
            SPAWN => {
                let program = OsString::from_vec(f.bytes()?);
                let n = f.u32()?;
                let mut env = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    env.push((
                        OsString::from_vec(f.bytes()?),
                        OsString::from_vec(f.bytes()?),
                    ));
                }
                spawn_one(
                    ordinal,
                    &program,
                    env,
                    sched,
                    cpu_group.as_ref(),
                    &tx,
                    &live,
                )
                .await;
            }
            CREDIT => {
                let stream = f.u8()? as usize;
                let n = f.u32()? as usize;
                if let Some(s) = live.lock().unwrap_or_else(|e| e.into_inner()).get(&ordinal)
                    && stream < 2
                {
                    s.credits[stream].add_permits(n);
                }
            }
            FORGET => {
                let stream = f.u8()? as usize;
                if let Some(s) = live.lock().unwrap_or_else(|e| e.into_inner()).get(&ordinal)
                    && stream < 2
                {
                    s.forget[stream].cancel();
                }
            }
            _ => break Err(io::Error::new(io::ErrorKind::InvalidData, "unknown frame")),
        }
    };
    // The engine is done with us (or gone): nothing we started may outlive it.
    for s in live.lock().unwrap_or_else(|e| e.into_inner()).values() {
        if let Ok(pgid) = i32::try_from(s.pid)
            && pgid > 1
        {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    drop(tx);
    writer.abort();
    // No zombie of ours outlives us (the ones put off are reaped now, not by init).
    crate::child::reap_put_off_now().await;
    result
}

async fn spawn_one(
    ordinal: u32,
    program: &OsStr,
    env: Vec<(OsString, OsString)>,
    sched: InstanceSched,
    cpu_group: Option<&tg_sys::Cgroup>,
    tx: &mpsc::UnboundedSender<Vec<u8>>,
    live: &Arc<Mutex<HashMap<u32, Served>>>,
) {
    let mut cmd = crate::exec::instance_command(program, env, sched);
    if let Some(g) = cpu_group {
        g.join_on_exec(&mut cmd);
    }
    let mut child = match crate::child::spawn_retrying_busy(&mut cmd).await {
        Ok(c) => c,
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(0) as u32;
            let frame = Frame::new(FAILED, ordinal)
                .u32(errno)
                .bytes(e.to_string().as_bytes());
            let _ = tx.send(frame.done());
            return;
        }
    };
    let pid = child.id();
    let credits = [
        Arc::new(Semaphore::new(CREDITS)),
        Arc::new(Semaphore::new(CREDITS)),
    ];
    let forget = [CancellationToken::new(), CancellationToken::new()];
    live.lock().unwrap_or_else(|e| e.into_inner()).insert(
        ordinal,
        Served {
            pid,
            credits: credits.clone(),
            forget: forget.clone(),
        },
    );
    let _ = tx.send(Frame::new(SPAWNED, ordinal).u32(pid).done());

    let out = child.take_stdout();
    let err = child.take_stderr();
    let [c0, c1] = credits;
    let [f0, f1] = forget;
    let tx = tx.clone();
    let live = live.clone();
    tokio::spawn(async move {
        let wait = async {
            let status = child.wait().await;
            let _ = tx.send(exited_frame(ordinal, status));
        };
        tokio::join!(
            pump(ordinal, 0, out, c0, f0, &tx),
            pump(ordinal, 1, err, c1, f1, &tx),
            wait
        );
        live.lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ordinal);
    });
}

fn exited_frame(ordinal: u32, status: io::Result<std::process::ExitStatus>) -> Vec<u8> {
    use std::os::unix::process::ExitStatusExt;
    let (kind, value) = match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => (0u8, c as u32),
            (None, Some(sig)) => (1, sig as u32),
            (None, None) => (2, 0),
        },
        Err(_) => (2, 0),
    };
    Frame::new(EXITED, ordinal).u8(kind).u32(value).done()
}

/// Forwards one pipe of an instance, one chunk per credit, until its end or until the engine
/// forgets it. Waits for readability without a buffer, so idle instances cost no memory here.
async fn pump(
    ordinal: u32,
    stream: u8,
    fd: Option<std::os::fd::OwnedFd>,
    credits: Arc<Semaphore>,
    forget: CancellationToken,
    tx: &mpsc::UnboundedSender<Vec<u8>>,
) {
    let pipe = fd.and_then(|fd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok());
    if let Some(pipe) = pipe {
        loop {
            let permit = tokio::select! {
                p = credits.acquire() => match p { Ok(p) => p, Err(_) => break },
                _ = forget.cancelled() => break,
            };
            tokio::select! {
                r = pipe.readable() => if r.is_err() { break },
                _ = forget.cancelled() => break,
            }
            let mut frame = Frame::new(DATA, ordinal).u8(stream).u32(0).done();
            let head = frame.len();
            frame.resize(head + CHUNK, 0);
            match pipe.try_read(&mut frame[head..]) {
                Ok(0) => break,
                Ok(n) => {
                    frame.truncate(head + n);
                    // Patch the frame's and the byte field's lengths now that n is known.
                    let len = (frame.len() - 4) as u32;
                    frame[..4].copy_from_slice(&len.to_le_bytes());
                    frame[head - 4..head].copy_from_slice(&(n as u32).to_le_bytes());
                    permit.forget();
                    let _ = tx.send(frame);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            }
        }
    }
    let _ = tx.send(Frame::new(EOF, ordinal).u8(stream).done());
}

// ---------------------------------------------------------------------------------------------
// The engine's side.

/// What the engine keeps of one instance served by a helper.
struct Slot {
    data: [Option<mpsc::Sender<Vec<u8>>>; 2],
    exit: watch::Sender<Option<Termination>>,
    spawned: Option<oneshot::Sender<io::Result<u32>>>,
}

/// One helper process: its request queue and the instances it serves.
struct Helper {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    slots: Arc<Mutex<HashMap<u32, Slot>>>,
    _child: Child,
    tasks: tokio::task::JoinSet<()>,
}

/// The run's helpers, each given up to `share` instances in launch order.
pub(crate) struct HelperPool {
    program: PathBuf,
    share: usize,
    run_id: String,
    /// How the helpers start instances (handed to them in their environment).
    sched: InstanceSched,
    /// The CPU group the instances join, when the run has one.
    cpu_group: Option<PathBuf>,
    helpers: Vec<Helper>,
    in_last: usize,
}

/// An instance's output stream as delivered by its helper.
pub(crate) struct HelperPipe {
    rx: mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    ordinal: u32,
    stream: u8,
}

impl AsyncRead for HelperPipe {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pos < this.cur.len() {
                let n = (this.cur.len() - this.pos).min(buf.remaining());
                buf.put_slice(&this.cur[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(()));
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => {
                    this.cur = chunk;
                    this.pos = 0;
                    // The chunk left the channel: its room goes back to the helper.
                    let _ = this.tx.send(
                        Frame::new(CREDIT, this.ordinal)
                            .u8(this.stream)
                            .u32(1)
                            .done(),
                    );
                }
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for HelperPipe {
    fn drop(&mut self) {
        // The instance task is done with this stream: the helper may close the pipe.
        let _ = self
            .tx
            .send(Frame::new(FORGET, self.ordinal).u8(self.stream).done());
    }
}

/// An instance started by a helper, as the exec launcher holds it.
pub(crate) struct Helped {
    pub pid: u32,
    pub exit: watch::Receiver<Option<Termination>>,
    pub stdout: Option<HelperPipe>,
    pub stderr: Option<HelperPipe>,
}

impl HelperPool {
    pub(crate) fn new(
        program: PathBuf,
        share: usize,
        run_id: &str,
        sched: InstanceSched,
        cpu_group: Option<PathBuf>,
    ) -> HelperPool {
        HelperPool {
            program,
            share: share.max(1),
            run_id: run_id.to_string(),
            sched,
            cpu_group,
            helpers: Vec::new(),
            in_last: 0,
        }
    }

    /// Starts a helper; `prepare` adds the run's tracking (cgroup) and parent-death signal.
    fn start_helper(&mut self, prepare: &(dyn Fn(&mut Command) + Sync)) -> io::Result<()> {
        let mut cmd = Command::new(&self.program);
        cmd.arg(HELPER_ARG)
            .env_clear()
            // The marker of the run's processes: the cleaner finds the helper too.
            .env("TEST_RUN", &self.run_id)
            .env(crate::instance_sched::ENV, self.sched.env_value())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(g) = &self.cpu_group {
            cmd.env(CPU_GROUP_ENV, g);
        }
        // The engine's choice of reaping holds for the instances a helper reaps.
        if let Some(v) = std::env::var_os(crate::child::REAP_ENV) {
            cmd.env(crate::child::REAP_ENV, v);
        }
        prepare(&mut cmd);
        tg_sys::lifetime::die_with_parent(cmd.as_std_mut());
        let mut child = cmd.spawn()?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("no stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let slots: Arc<Mutex<HashMap<u32, Slot>>> = Arc::default();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async move {
            while let Some(f) = rx.recv().await {
                if stdin.write_all(&f).await.is_err() {
                    break;
                }
            }
        });
        let demux_slots = slots.clone();
        tasks.spawn(async move {
            let mut input = BufReader::with_capacity(64 * 1024, stdout);
            while let Ok(Some((tag, ordinal, body))) = read_frame(&mut input).await {
                dispatch(&demux_slots, tag, ordinal, body);
            }
            // The helper is gone: so are its instances (their pdeath signal).
            let mut slots = demux_slots.lock().unwrap_or_else(|e| e.into_inner());
            for (_, mut slot) in slots.drain() {
                if let Some(s) = slot.spawned.take() {
                    let _ = s.send(Err(io::Error::other("the exec helper exited")));
                }
                slot.exit.send_if_modified(|e| {
                    let was = e.is_none();
                    e.get_or_insert(Termination::Unknown);
                    was
                });
            }
        });
        self.helpers.push(Helper {
            tx,
            slots,
            _child: child,
            tasks,
        });
        self.in_last = 0;
        Ok(())
    }

    /// Starts one instance through the current helper (a new one when it is full).
    pub(crate) async fn spawn(
        &mut self,
        ordinal: usize,
        program: &Path,
        env: &[(crate::launch::EnvName, OsString)],
        prepare: &(dyn Fn(&mut Command) + Sync),
    ) -> io::Result<Helped> {
        if self.helpers.is_empty() || self.in_last >= self.share {
            self.start_helper(prepare)?;
        }
        self.in_last += 1;
        let Some(helper) = self.helpers.last() else {
            return Err(io::Error::other("no exec helper"));
        };
        // Owned handles: nothing borrowed from the pool is held across the wait below.
        let tx = helper.tx.clone();
        let slots = helper.slots.clone();
        let ordinal = u32::try_from(ordinal).map_err(io::Error::other)?;
        let (out_tx, out_rx) = mpsc::channel(CREDITS);
        let (err_tx, err_rx) = mpsc::channel(CREDITS);
        let (exit_tx, exit_rx) = watch::channel(None);
        let (spawned_tx, spawned_rx) = oneshot::channel();
        slots.lock().unwrap_or_else(|e| e.into_inner()).insert(
            ordinal,
            Slot {
                data: [Some(out_tx), Some(err_tx)],
                exit: exit_tx,
                spawned: Some(spawned_tx),
            },
        );
        let mut frame = Frame::new(SPAWN, ordinal)
            .bytes(program.as_os_str().as_bytes())
            .u32(env.len() as u32);
        for (k, v) in env {
            frame = frame.bytes(k.as_bytes()).bytes(v.as_bytes());
        }
        tx.send(frame.done())
            .map_err(|_| io::Error::other("the exec helper exited"))?;
        let pid = spawned_rx
            .await
            .map_err(|_| io::Error::other("the exec helper exited"))??;
        let pipe = |rx: mpsc::Receiver<Vec<u8>>, stream: u8| HelperPipe {
            rx,
            cur: Vec::new(),
            pos: 0,
            tx: tx.clone(),
            ordinal,
            stream,
        };
        Ok(Helped {
            pid,
            exit: exit_rx,
            stdout: Some(pipe(out_rx, 0)),
            stderr: Some(pipe(err_rx, 1)),
        })
    }
}

/// Closing a helper's stdin makes it kill what it still runs and exit; `kill_on_drop` makes
/// sure of it.
impl Drop for HelperPool {
    fn drop(&mut self) {
        for h in &mut self.helpers {
            h.tasks.abort_all();
        }
    }
}

/// Hands one frame from a helper to its instance. Never blocks: credits keep every stream's
/// channel from filling.
fn dispatch(slots: &Mutex<HashMap<u32, Slot>>, tag: u8, ordinal: u32, body: Vec<u8>) {
    let mut slots = slots.lock().unwrap_or_else(|e| e.into_inner());
    let Some(slot) = slots.get_mut(&ordinal) else {
        return;
    };
    let mut f = Fields(&body);
    let mut failed = false;
    match tag {
        SPAWNED => {
            if let (Some(s), Ok(pid)) = (slot.spawned.take(), f.u32()) {
                let _ = s.send(Ok(pid));
            }
        }
        FAILED => {
            let errno = f.u32().unwrap_or(0) as i32;
            let message = String::from_utf8_lossy(&f.bytes().unwrap_or_default()).into_owned();
            let error = if errno != 0 {
                io::Error::from_raw_os_error(errno)
            } else {
                io::Error::other(message)
            };
            if let Some(s) = slot.spawned.take() {
                let _ = s.send(Err(error));
            }
            failed = true;
        }
        DATA => {
            if let Ok(stream) = f.u8()
                && let Some(Some(tx)) = slot.data.get(stream as usize)
                && f.u32().is_ok()
            {
                // Full only if the helper overran its credits; a closed channel means the
                // instance task is done with the stream.
                let _ = tx.try_send(f.rest());
            }
        }
        EOF => {
            if let Ok(stream) = f.u8()
                && let Some(d) = slot.data.get_mut(stream as usize)
            {
                *d = None;
            }
        }
        EXITED => {
            let kind = f.u8().unwrap_or(2);
            let value = f.u32().unwrap_or(0) as i32;
            let t = match kind {
                0 => Termination::Code(value),
                1 => Termination::Signal(value),
                _ => Termination::Unknown,
            };
            slot.exit.send_replace(Some(t));
        }
        _ => {}
    }
    let done = failed || (slot.data.iter().all(Option::is_none) && slot.exit.borrow().is_some());
    if done {
        slots.remove(&ordinal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let f = Frame::new(SPAWN, 7)
            .bytes(b"/bin/true")
            .u32(1)
            .bytes(b"A")
            .bytes(b"b=c")
            .done();
        let mut r = &f[..];
        let (tag, ord, body) = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((tag, ord), (SPAWN, 7));
        let mut b = Fields(&body);
        assert_eq!(b.bytes().unwrap(), b"/bin/true");
        assert_eq!(b.u32().unwrap(), 1);
        assert_eq!(b.bytes().unwrap(), b"A");
        assert_eq!(b.bytes().unwrap(), b"b=c");
        assert!(b.u8().is_err(), "nothing left");
        assert!(read_frame(&mut r).await.unwrap().is_none());
    }
}
