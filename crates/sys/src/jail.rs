//! The jail a test instance is put into between `fork` and `exec`.
//!
//! The child joins the instance's network namespace, gets its own UTS namespace (its
//! hostname) and mount namespace (its own `/etc/hosts`), and is tied to its owner's
//! lifetime with `PR_SET_PDEATHSIG`.
//!
//! Between `fork` and `exec` of a multi-threaded parent only async-signal-safe work is
//! allowed: another thread may have held the allocator lock at fork time, so allocating
//! could deadlock the child forever. Everything the child needs (C strings, the netns fd)
//! is therefore prepared in [`Jail::new`], and the child only makes system calls.
//!
//! PDEATHSIG caveat: the signal fires when the *thread* that forked the child exits, not
//! the process. Callers must spawn jailed children from a long-lived thread (a tokio
//! worker thread, or the thread running the main loop), never from `spawn_blocking` or
//! any short-lived thread, or the instance is killed as soon as that thread retires.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::signal::Signal;
use nix::unistd::{Pid, getppid, sethostname};

use crate::error::with_context;
use crate::netns::NetNs;

/// What a child process is put into between fork and exec.
#[derive(Debug, Clone)]
pub struct Jail {
    // Shared with every pre_exec closure, so the fd stays open until each command that
    // uses it has been spawned, even if the `Jail` itself is dropped first.
    inner: Arc<Prepared>,
}

#[derive(Debug)]
struct Prepared {
    netns: NetNs,
    hostname: CString,
    hosts_file: CString,
}

const ROOT: &CStr = c"/";
const ETC_HOSTS: &CStr = c"/etc/hosts";

impl Jail {
    /// Prepares a jail: dups the netns fd and precomputes every C string the child
    /// needs. `hosts_file` is bind-mounted read-only over the child's `/etc/hosts`.
    pub fn new(netns: &NetNs, hostname: &str, hosts_file: &Path) -> io::Result<Jail> {
        let invalid = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("jail {what} contains a NUL byte"),
            )
        };
        if hostname.is_empty() || hostname.len() > 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("jail hostname {hostname:?} must be 1 to 64 bytes"),
            ));
        }
        let netns = netns.try_clone()?;
        let hosts_file = hosts_file
            .canonicalize()
            .map_err(|e| with_context(e, format!("hosts file {}", hosts_file.display())))?;
        Ok(Jail {
            inner: Arc::new(Prepared {
                netns,
                hostname: CString::new(hostname).map_err(|_| invalid("hostname"))?,
                hosts_file: CString::new(hosts_file.as_os_str().as_bytes())
                    .map_err(|_| invalid("hosts file path"))?,
            }),
        })
    }

    /// Arranges for `cmd`'s child, before exec, to: setns into the netns;
    /// unshare(CLONE_NEWUTS | CLONE_NEWNS); sethostname; make every mount private so
    /// nothing propagates back to the host; bind-mount the hosts file over /etc/hosts
    /// and remount it read-only; set PR_SET_PDEATHSIG to SIGKILL so the instance dies
    /// with its owner (see the module docs: with its owner *thread*).
    ///
    /// If any step fails the spawn fails with that errno and nothing is executed.
    pub fn apply(&self, cmd: &mut impl crate::spawn::PreExec) {
        let prepared = Arc::clone(&self.inner);
        // The parent's pid, to detect a parent that died before PDEATHSIG was armed.
        let parent = Pid::this();
        let child_setup = move || prepared.enter(parent);
        // SAFETY: `enter` runs in the forked child before exec and only issues system
        // calls (setns, unshare, sethostname, mount, prctl, getppid) on data prepared in
        // `Jail::new`; it does not allocate, lock or touch other threads' state, so it is
        // async-signal-safe as `pre_exec` requires. Errors are plain errnos (`io::Error`
        // from a raw OS error does not allocate).
        unsafe {
            cmd.pre_exec_hook(child_setup);
        }
    }
}

impl Prepared {
    /// The child side. Must stay async-signal-safe: see [`Jail::apply`].
    fn enter(&self, parent: Pid) -> io::Result<()> {
        setns(&self.netns, CloneFlags::CLONE_NEWNET)?;
        unshare(CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWNS)?;
        sethostname(std::ffi::OsStr::from_bytes(self.hostname.as_bytes()))?;
        // The new mount namespace starts as a copy whose mounts may be "shared" with the
        // host's; make them private first so the bind mount below stays in here.
        mount(
            None::<&CStr>,
            ROOT,
            None::<&CStr>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&CStr>,
        )?;
        mount(
            Some(self.hosts_file.as_c_str()),
            ETC_HOSTS,
            None::<&CStr>,
            MsFlags::MS_BIND,
            None::<&CStr>,
        )?;
        // A bind mount ignores MS_RDONLY on creation; read-only takes a remount.
        mount(
            None::<&CStr>,
            ETC_HOSTS,
            None::<&CStr>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&CStr>,
        )?;
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
        // If the owner died between fork and prctl, the signal will never come: we have
        // already been reparented, so give up instead of running unowned.
        if getppid() != parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    }
}
