//! Starting a program without copying the caller's address space: `clone(CLONE_VM |
//! CLONE_VFORK)`, as `posix_spawn` does, but with the caller's own steps between clone and
//! exec (joining a namespace, a cgroup, a session), which `posix_spawn` cannot take.
//!
//! Why: `std::process::Command` forks as soon as a `pre_exec` hook is set. A fork copies the
//! page tables of the whole engine and makes every page it writes afterwards copy-on-write, in
//! all its threads, with a TLB shootdown across the cores each time; starting 1,000 instances
//! spent about half of the engine's CPU on that (see BENCHMARKS.md). Here the child runs in the
//! caller's memory, nothing copied, on a stack of its own until it executes the program; the
//! calling thread sleeps until then, the other threads run on.
//!
//! The child shares memory with the caller, so everything it touches is prepared beforehand
//! ([`Command`] holds C strings and pointer arrays), and a hook (see [`PreExec`]) must only make
//! system calls on data prepared before the spawn: no allocation, no lock, no panic, as
//! between `fork` and `exec` of a multi-threaded process. Signals are blocked in the calling
//! thread around the clone, and the child resets every handled signal to its default before it
//! unblocks them, so that no handler of the caller ever runs on the child's stack.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::OnceLock;
use std::sync::mpsc;

/// A step the child takes between clone and exec: system calls only (see the module docs).
type Hook = Box<dyn FnMut() -> io::Result<()> + Send + Sync>;

/// Something that runs hooks in its child before exec: [`Command`] and the standard and tokio
/// commands, so that the same jail, cgroup and scheduling steps apply to any of them.
pub trait PreExec {
    /// Adds a step the child takes before exec, after the earlier ones.
    ///
    /// # Safety
    /// As `std::os::unix::process::CommandExt::pre_exec`: the closure runs in the child, where
    /// only async-signal-safe calls on data prepared beforehand are allowed (no allocation, no
    /// lock). With [`Command`] it also shares the caller's memory: it must not write to
    /// anything but its own stack.
    unsafe fn pre_exec_hook<F>(&mut self, f: F)
    where
        F: FnMut() -> io::Result<()> + Send + Sync + 'static;
}

impl PreExec for std::process::Command {
    unsafe fn pre_exec_hook<F>(&mut self, f: F)
    where
        F: FnMut() -> io::Result<()> + Send + Sync + 'static,
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the caller's contract is pre_exec's.
        unsafe {
            self.pre_exec(f);
        }
    }
}

impl PreExec for tokio::process::Command {
    unsafe fn pre_exec_hook<F>(&mut self, f: F)
    where
        F: FnMut() -> io::Result<()> + Send + Sync + 'static,
    {
        // SAFETY: the caller's contract is pre_exec's.
        unsafe {
            self.pre_exec(f);
        }
    }
}

/// A program to start: its path (no `PATH` search), arguments, complete environment, standard
/// input from `/dev/null`, standard output and error each to a new pipe, and the hooks.
pub struct Command {
    program: CString,
    args: Vec<CString>,
    env: Vec<CString>,
    hooks: Vec<Hook>,
    /// An argument or variable held a NUL byte, which exec cannot pass: spawning fails.
    nul: bool,
}

impl Command {
    /// `program` must name the file to execute (it is not looked up in `PATH`).
    pub fn new(program: &OsStr) -> Command {
        let mut cmd = Command {
            program: CString::default(),
            args: Vec::new(),
            env: Vec::new(),
            hooks: Vec::new(),
            nul: false,
        };
        cmd.program = cmd.c_string(program.as_bytes());
        let arg0 = cmd.c_string(program.as_bytes());
        cmd.args.push(arg0);
        cmd
    }

    fn c_string(&mut self, bytes: &[u8]) -> CString {
        CString::new(bytes).unwrap_or_else(|_| {
            self.nul = true;
            CString::default()
        })
    }

    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Command {
        let a = self.c_string(arg.as_ref().as_bytes());
        self.args.push(a);
        self
    }

    /// Adds `key=value` to the environment, which starts empty.
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Command {
        let mut kv = key.as_ref().as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(value.as_ref().as_bytes());
        let kv = self.c_string(&kv);
        self.env.push(kv);
        self
    }

    pub fn envs<K, V>(&mut self, vars: impl IntoIterator<Item = (K, V)>) -> &mut Command
    where
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (k, v) in vars {
            self.env(k, v);
        }
        self
    }

    /// Starts the program. Fails with the errno of the first step that failed in the child
    /// (a hook, or `execve` itself, e.g. `ENOENT`, `ETXTBSY`), after reaping it.
    pub fn spawn(&mut self) -> io::Result<Child> {
        if self.nul {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a program path, argument or environment variable holds a NUL byte",
            ));
        }
        let stdin = open_dev_null()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let mut argv: Vec<*const libc::c_char> = self.args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = self.env.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        let mut ctx = ChildContext {
            program: self.program.as_ptr(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            stdio: [stdin.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
            hooks: &mut self.hooks,
            errno: 0,
        };
        let stack = Stack::new()?;
        let mut pidfd: libc::c_int = -1;
        let (pid, clone_error) = {
            let _blocked = BlockSignals::all()?;
            // SAFETY: `child_main` gets a pointer to `ctx`, which outlives the child's use of
            // it: with CLONE_VFORK this thread sleeps until the child has executed the program
            // or exited, and only then is `ctx` read or dropped. The child runs on `stack`,
            // which lives as long. CLONE_PIDFD stores the new pidfd in `pidfd`.
            let pid = unsafe {
                libc::clone(
                    child_main,
                    stack.top(),
                    libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
                    (&raw mut ctx).cast(),
                    &raw mut pidfd,
                )
            };
            // Read errno before the signal mask is restored.
            (pid, (pid < 0).then(io::Error::last_os_error))
        };
        if let Some(e) = clone_error {
            return Err(e);
        }
        // SAFETY: the kernel stored a new descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let mut child = Child {
            pid: pid as u32,
            pidfd: Some(pidfd),
            stdout: Some(out_r),
            stderr: Some(err_r),
            status: None,
        };
        // SAFETY: a plain read of our local; volatile because the child wrote it through the
        // pointer given to clone.
        let errno = unsafe { std::ptr::read_volatile(&raw const ctx.errno) };
        if errno != 0 {
            // It exited with 127 without executing anything: reap it now.
            let _ = child.wait_blocking();
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok(child)
    }
}

impl PreExec for Command {
    unsafe fn pre_exec_hook<F>(&mut self, f: F)
    where
        F: FnMut() -> io::Result<()> + Send + Sync + 'static,
    {
        self.hooks.push(Box::new(f));
    }
}

/// A started program: its pid, a pidfd (readable once it has exited), and its output pipes.
/// Dropped before it was reaped, it is killed and reaped by a background thread, so that no
/// zombie is left.
#[derive(Debug)]
pub struct Child {
    pid: u32,
    pidfd: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    status: Option<ExitStatus>,
}

impl Child {
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// The exit status if the child has ended (reaping it), `None` while it runs. Wait for
    /// the pidfd ([`AsRawFd`]) to become readable to know when to ask.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.wait_with(libc::WNOHANG)
    }

    /// Waits for the child to end, blocking the thread.
    pub fn wait_blocking(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.wait_with(0)? {
                return Ok(s);
            }
        }
    }

    fn wait_with(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        // Only a dropped child, already given a status, has given its pidfd away.
        let Some(fd) = &self.pidfd else {
            return Err(io::Error::other("child has no pidfd"));
        };
        let r = reap_pidfd(fd.as_raw_fd(), flags);
        if let Ok(Some(s)) = r {
            self.status = Some(s);
        }
        r
    }

    /// Sends `signal` to the child (through its pidfd, so never to a process that reused its
    /// pid). A child already reaped is not signalled.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        match self.pidfd.as_ref().filter(|_| self.status.is_none()) {
            Some(fd) => crate::lifetime::pidfd_signal(fd, signal),
            None => Ok(()),
        }
    }
}

/// The pidfd: readable once the child has exited (it stays open until the child is dropped).
impl AsRawFd for Child {
    fn as_raw_fd(&self) -> RawFd {
        self.pidfd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let _ = self.signal(libc::SIGKILL);
        if matches!(self.try_wait(), Ok(Some(_))) {
            return;
        }
        // Killed but not yet gone: one long-lived thread reaps such children, so that a
        // dropped child never blocks its owner nor stays a zombie.
        let orphan = Child {
            pid: self.pid,
            pidfd: self.pidfd.take(),
            stdout: None,
            stderr: None,
            status: None,
        };
        self.status = Some(ExitStatus::from_raw(0));
        let _ = reaper().send(orphan);
    }
}

/// Reaps the process behind `pidfd` (`waitid(P_PIDFD)`), or with `WNOWAIT` only reads its
/// status: that very process, whatever became of its pid meanwhile, so that a second reaper of
/// the same child (see [`AsyncChild::wait`]) can only find it gone (`ECHILD`), never take the
/// status of a process that reused the pid.
fn reap_pidfd(pidfd: RawFd, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
    // SAFETY: an all-zero siginfo_t is a valid value; waitid writes into this local only.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `pidfd` is open for the duration of the call (the caller owns it); `info` is a
    // valid, writable siginfo_t; the last argument (rusage) may be null.
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd as libc::id_t,
            &mut info,
            libc::WEXITED | flags,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(None);
        }
        return Err(e);
    }
    // SAFETY: waitid filled `info` for a child that changed state (CLD_* codes), or left it
    // zeroed (pid 0) under WNOHANG when none has; both fields are then plain integers.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    // Back to the classic wait status that ExitStatus decodes.
    let raw = match info.si_code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => status | 0x80,
        _ => status,
    };
    Ok(Some(ExitStatus::from_raw(raw)))
}

/// Nice value of the thread that reaps ended children for [`AsyncChild::wait`].
pub const REAP_NICE: i32 = 19;

/// Longest time an ended child stays unreaped (a zombie) while [`defer_reaps_while`]'s gate
/// says the host is busy.
pub const MAX_REAP_DEFERRAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether reaping should wait now (the host is too busy); see [`defer_reaps_while`].
pub type ReapGate = fn() -> bool;

static REAP_GATE: OnceLock<ReapGate> = OnceLock::new();

/// Makes the reaping thread put off reaping ended children while `gate` returns true, for at
/// most [`MAX_REAP_DEFERRAL`] each. Their exit statuses are reported at once all the same
/// (read with `WNOWAIT`); only the reap, and the kernel's cleanup that comes with it, waits.
/// The first call in a process sets the gate; without one, children are reaped at once.
///
/// Why: reaping is where the kernel drops the child's `/proc` entries (`release_task` →
/// `proc_flush_pid` → `shrink_dcache_parent`). While thousands of instances end at once on an
/// overcommitted host, that walk waits on entries that other ending tasks are still dropping,
/// and spins on the CPU meanwhile, in the kernel, where a thread's nice value does not count:
/// profiled at the end of 5,000 sdk-go instances, the reaping took 75-90 % of both cores for
/// half a second at a time, while the runnable count grew past 4,000 and an instance missed
/// sdk-go's one-second write deadline (BENCHMARKS.md, "Reaping after the herd"). Reaped once
/// the host is calm, the same walks took 5 to 50 times less CPU.
pub fn defer_reaps_while(gate: ReapGate) {
    let _ = REAP_GATE.set(gate);
}

/// A request to the reaping thread.
enum ReapJob {
    /// An ended child: a duplicate of its pidfd, which the thread owns (so that it names the
    /// same process even if the waiter is dropped), and where to send its status.
    Ended(
        OwnedFd,
        tokio::sync::oneshot::Sender<io::Result<Option<ExitStatus>>>,
    ),
    /// Reap every put-off child now, then say so.
    Now(mpsc::Sender<()>),
}

static REAPING: OnceLock<mpsc::Sender<ReapJob>> = OnceLock::new();

/// The thread that reads ended children's statuses for [`AsyncChild::wait`] and reaps them,
/// at nice [`REAP_NICE`], when [`defer_reaps_while`]'s gate allows.
fn reaping_thread() -> &'static mpsc::Sender<ReapJob> {
    REAPING.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<ReapJob>();
        let _ = std::thread::Builder::new()
            .name("tg-reap".into())
            .spawn(move || {
                // Raising one's own nice value cannot be refused; if it were, reaping at
                // normal priority is still correct.
                let _ = crate::sched::set_thread_nice(REAP_NICE);
                reap_loop(&rx, || REAP_GATE.get().is_some_and(|busy| busy()));
            });
        tx
    })
}

/// Reaps at once every ended child whose reap is being put off (see [`defer_reaps_while`]),
/// waiting at most `within` for the reaping thread. For the end of a run, so that no zombie
/// outlives it. Returns whether the thread answered in time (trivially, when it never ran).
pub fn reap_put_off_now(within: std::time::Duration) -> bool {
    let Some(tx) = REAPING.get() else {
        return true;
    };
    let (done, answer) = mpsc::channel();
    tx.send(ReapJob::Now(done)).is_ok() && answer.recv_timeout(within).is_ok()
}

/// How often the reaping thread asks the gate again while children wait to be reaped.
const REAP_POLL: std::time::Duration = std::time::Duration::from_millis(10);

fn reap_loop(rx: &mpsc::Receiver<ReapJob>, busy: impl Fn() -> bool) {
    use std::collections::VecDeque;
    use std::time::Instant;
    let mut ended: VecDeque<(OwnedFd, Instant)> = VecDeque::new();
    let reap = |fd: OwnedFd| {
        let _ = reap_pidfd(fd.as_raw_fd(), libc::WNOHANG);
    };
    loop {
        let job = if ended.is_empty() {
            match rx.recv() {
                Ok(j) => Some(j),
                Err(_) => return,
            }
        } else {
            match rx.recv_timeout(REAP_POLL) {
                Ok(j) => Some(j),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                // No more waiters: reap what is left, gate or not.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    ended.drain(..).for_each(|(fd, _)| reap(fd));
                    return;
                }
            }
        };
        match job {
            Some(ReapJob::Ended(fd, reply)) => {
                let peeked = reap_pidfd(fd.as_raw_fd(), libc::WNOHANG | libc::WNOWAIT);
                if matches!(peeked, Ok(Some(_))) {
                    ended.push_back((fd, Instant::now()));
                }
                let _ = reply.send(peeked);
            }
            Some(ReapJob::Now(done)) => {
                ended.drain(..).for_each(|(fd, _)| reap(fd));
                let _ = done.send(());
            }
            None => {}
        }
        while let Some((_, since)) = ended.front() {
            if since.elapsed() < MAX_REAP_DEFERRAL && busy() {
                break;
            }
            if let Some((fd, _)) = ended.pop_front() {
                reap(fd);
            }
        }
    }
}

fn reaper() -> &'static mpsc::Sender<Child> {
    static REAPER: OnceLock<mpsc::Sender<Child>> = OnceLock::new();
    REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Child>();
        let _ = std::thread::Builder::new()
            .name("tg-reaper".into())
            .spawn(move || {
                for mut c in rx {
                    let _ = c.wait_blocking();
                }
            });
        tx
    })
}

/// What the child reads: pointers into the caller's memory, valid until it has executed.
struct ChildContext<'a> {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    stdio: [RawFd; 3],
    hooks: &'a mut Vec<Hook>,
    /// Written by the child when a step fails, read by the caller once the child is gone.
    errno: libc::c_int,
}

/// The child. Only system calls on prepared data; ends in `execve` or `_exit(127)`.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildContext` the caller passed to clone; the caller sleeps (VFORK)
    // until we have executed or exited, so nothing else touches it meanwhile.
    let ctx = unsafe { &mut *arg.cast::<ChildContext<'_>>() };
    let fail = |ctx: &mut ChildContext<'_>, errno: libc::c_int| -> ! {
        ctx.errno = if errno == 0 { libc::EINVAL } else { errno };
        // SAFETY: _exit ends this process at once, running nothing of the caller's.
        unsafe { libc::_exit(127) }
    };
    // SAFETY: plain system calls on values and on descriptors the caller opened for us.
    unsafe {
        // Default dispositions for every handled signal: a handler of the caller's must not run
        // here (it would run on this stack, in the caller's memory). The standard library
        // ignores SIGPIPE in its programs; children get the default, as with std's Command.
        for sig in 1..=libc::SIGRTMAX() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            if old.sa_sigaction != libc::SIG_DFL
                && (old.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        for (target, fd) in ctx.stdio.into_iter().enumerate() {
            let target = target as libc::c_int;
            // dup2 onto itself keeps close-on-exec set: clear it instead.
            let r = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            };
            if r < 0 {
                fail(ctx, *libc::__errno_location());
            }
        }
    }
    for hook in ctx.hooks.iter_mut() {
        if let Err(e) = hook() {
            fail(ctx, e.raw_os_error().unwrap_or(libc::EINVAL));
        }
    }
    // SAFETY: as above; the arrays are null-terminated and outlive the exec.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(ctx.program, ctx.argv, ctx.envp);
        fail(ctx, *libc::__errno_location());
    }
}

/// The child's stack: mapped for the spawn, with a guard page below it.
struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

const STACK: usize = 256 * 1024;
const GUARD: usize = 4096;

impl Stack {
    fn new() -> io::Result<Stack> {
        let len = STACK + GUARD;
        // SAFETY: an anonymous private mapping; no memory of ours is involved.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Stack { base, len };
        // SAFETY: the lowest page of the mapping made above.
        if unsafe { libc::mprotect(base, GUARD, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The highest address (stacks grow down), 16-byte aligned as the ABI wants.
    fn top(&self) -> *mut libc::c_void {
        let top = self.base as usize + self.len;
        (top & !15) as *mut libc::c_void
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used (the child has exec'd or exited).
        unsafe {
            libc::munmap(self.base, self.len);
        }
    }
}

/// Blocks every signal in the calling thread while alive (restoring the previous mask).
struct BlockSignals {
    old: libc::sigset_t,
}

impl BlockSignals {
    fn all() -> io::Result<BlockSignals> {
        // SAFETY: sigset operations on locals.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            let mut old: libc::sigset_t = std::mem::zeroed();
            let r = libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r));
            }
            Ok(BlockSignals { old })
        }
    }
}

impl Drop for BlockSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `all`.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut());
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((r, w))
}

fn open_dev_null() -> io::Result<OwnedFd> {
    Ok(std::fs::File::open("/dev/null")?.into())
}

/// A [`Child`] awaited on the tokio runtime through its pidfd (no thread, no `SIGCHLD`).
#[derive(Debug)]
pub struct AsyncChild {
    proc: tokio::io::unix::AsyncFd<Child>,
    /// The reaping thread's answer to a wait that was dropped before it came.
    pending: Option<tokio::sync::oneshot::Receiver<io::Result<Option<ExitStatus>>>>,
}

impl AsyncChild {
    /// Registers `child`'s pidfd with the current runtime.
    pub fn new(child: Child) -> io::Result<AsyncChild> {
        // SAFETY: the pidfd is owned by `child` and stays open, the same descriptor, for as
        // long as the child lives; it is only taken in its drop, after the AsyncFd let go.
        let proc = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(child, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(AsyncChild {
            proc,
            pending: None,
        })
    }

    pub fn id(&self) -> u32 {
        self.proc.get_ref().id()
    }

    pub fn take_stdout(&mut self) -> Option<OwnedFd> {
        self.proc.get_mut().stdout.take()
    }

    pub fn take_stderr(&mut self) -> Option<OwnedFd> {
        self.proc.get_mut().stderr.take()
    }

    /// Waits for the process to end and returns its status. The status is read, and the
    /// process reaped, by a thread of its own at a low priority, as soon as the host is calm
    /// (see [`defer_reaps_while`]); the runtime's thread only waits for the pidfd.
    ///
    /// Cancel-safe: a wait dropped after it asked the reaping thread leaves the question
    /// pending here, and the next wait takes its answer (asked twice, the thread would find
    /// the child already reaped).
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.proc.get_ref().status {
                return Ok(status);
            }
            let mut ready = self.proc.readable_mut().await?;
            let answer = match &mut self.pending {
                Some(rx) => rx,
                None => {
                    let Some(pidfd) = ready.get_inner().pidfd.as_ref() else {
                        // Only a dropped child gives its pidfd away; this one is still ours.
                        return Err(io::Error::other("child has no pidfd"));
                    };
                    // A duplicate that the reaping thread owns, so that it names this process
                    // however long the answer takes.
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    reaping_thread()
                        .send(ReapJob::Ended(pidfd.try_clone()?, tx))
                        .map_err(|_| io::Error::other("the reaping thread is gone"))?;
                    self.pending.insert(rx)
                }
            };
            let answer = answer.await;
            self.pending = None;
            match answer.map_err(|_| io::Error::other("the reaping thread is gone"))?? {
                Some(status) => {
                    ready.get_inner_mut().status = Some(status);
                    return Ok(status);
                }
                None => ready.clear_ready(),
            }
        }
    }
}
