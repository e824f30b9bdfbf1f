//! `tg_sys::spawn`: a program started with `CLONE_VM | CLONE_VFORK` gets exactly its
//! environment, stdio, hooks and signal state, and fails or dies cleanly.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use tg_sys::spawn::{AsyncChild, Command, PreExec};

fn sh(script: &str) -> Command {
    let mut cmd = Command::new("/bin/sh".as_ref());
    cmd.arg("-c").arg(script);
    cmd
}

fn read_all(fd: Option<std::os::fd::OwnedFd>) -> String {
    let mut s = String::new();
    std::fs::File::from(fd.expect("a pipe"))
        .read_to_string(&mut s)
        .unwrap();
    s
}

#[test]
fn the_child_gets_its_arguments_environment_and_pipes_and_reports_its_status() {
    let mut cmd = sh("echo \"$1 $FOO\"; env | sort; echo oops >&2; cat; exit 3");
    cmd.arg("sh")
        .arg("first")
        .envs([("FOO", "bar"), ("ZED", "1")]);
    let mut child = cmd.spawn().unwrap();
    let out = read_all(child.stdout.take());
    let err = read_all(child.stderr.take());
    let status = child.wait_blocking().unwrap();
    assert_eq!(status.code(), Some(3));
    // Only the given variables (sh adds PWD and may add SHLVL/_), and stdin is empty.
    let vars: Vec<&str> = out.lines().skip(1).collect();
    assert!(
        vars.contains(&"FOO=bar") && vars.contains(&"ZED=1"),
        "{out}"
    );
    assert!(
        vars.iter().all(|v| ["FOO=", "ZED=", "PWD=", "SHLVL=", "_="]
            .iter()
            .any(|p| v.starts_with(p))),
        "nothing inherited: {out}"
    );
    assert_eq!(out.lines().next(), Some("first bar"));
    assert_eq!(err, "oops\n");
}

#[test]
fn a_missing_program_fails_the_spawn_with_its_errno() {
    let e = Command::new("/nonexistent/program".as_ref())
        .spawn()
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    let mut cmd = sh("exit 0");
    cmd.env("A", "x\0y");
    let e = cmd.spawn().unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
}

#[test]
fn hooks_run_in_order_in_the_child_and_a_failing_one_stops_the_exec() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    // A session of its own (a hook), seen from inside: its session id is its pid.
    let mut cmd = sh("set -- $(cut -d' ' -f6 /proc/$$/stat); [ \"$1\" = $$ ] && echo own");
    tg_sys::sched::own_session_on_exec(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    assert_eq!(read_all(child.stdout.take()), "own\n");
    assert!(child.wait_blocking().unwrap().success());

    let mut cmd = sh(&format!("touch {}", marker.display()));
    // SAFETY: the hooks only return values.
    unsafe {
        cmd.pre_exec_hook(|| Ok(()));
        cmd.pre_exec_hook(|| Err(std::io::Error::from_raw_os_error(libc::EPERM)));
    }
    let e = cmd.spawn().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    assert!(!marker.exists(), "the program must not have run");
}

#[test]
fn the_child_starts_with_no_signal_blocked_and_default_sigpipe() {
    // Rust programs ignore SIGPIPE; block one signal here too, to see neither is inherited.
    // SAFETY: plain signal-mask calls on locals, in this test's thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // The program reads its own status (`exec`): a shell waiting for a child may block every
    // signal for a moment (dash does), so reading the shell's status from its child would race
    // with that.
    let mut child = sh("exec grep -E '^Sig(Blk|Ign)' /proc/self/status")
        .spawn()
        .unwrap();
    let out = read_all(child.stdout.take());
    assert!(child.wait_blocking().unwrap().success());
    for line in out.lines() {
        let mask = u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap();
        let (pipe, usr1) = (1u64 << (libc::SIGPIPE - 1), 1u64 << (libc::SIGUSR1 - 1));
        assert_eq!(mask & (pipe | usr1), 0, "{line}");
    }
}

#[test]
fn a_dropped_child_is_killed_and_reaped() {
    let child = sh("exec sleep 600").spawn().unwrap();
    let pid = child.id();
    drop(child);
    let proc = format!("/proc/{pid}");
    let deadline = Instant::now() + Duration::from_secs(10);
    // Gone from /proc only once reaped (a zombie still has its entry).
    while Path::new(&proc).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!Path::new(&proc).exists(), "{pid} still there");
}

#[tokio::test]
async fn an_async_child_is_awaited_through_its_pidfd() {
    let mut child = AsyncChild::new(sh("sleep 0.2; kill -TERM $$").spawn().unwrap()).unwrap();
    assert!(child.take_stdout().is_some() && child.take_stderr().is_some());
    let status = child.wait().await.unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    // Waiting again returns the same status.
    assert_eq!(child.wait().await.unwrap().signal(), Some(libc::SIGTERM));
}

/// The nice value of this process's thread named `name`, if there is one (field 19 of
/// `/proc/self/task/TID/stat`, counted from after the command name).
fn nice_of_thread(name: &str) -> Option<i64> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap();
            let rest = stat.rsplit_once(')').unwrap().1;
            rest.split_whitespace().nth(16).unwrap().parse().unwrap()
        })
}

#[tokio::test]
async fn an_async_child_is_reaped_by_a_low_priority_thread_with_its_exact_status() {
    let own_nice = tg_sys::sched::thread_nice().unwrap();
    // Exit codes, a signal, and a core-dumping signal come back as waitpid would give them.
    let mut code = AsyncChild::new(sh("exit 7").spawn().unwrap()).unwrap();
    assert_eq!(code.wait().await.unwrap().code(), Some(7));
    let mut killed = AsyncChild::new(sh("kill -KILL $$").spawn().unwrap()).unwrap();
    let status = killed.wait().await.unwrap();
    assert_eq!(
        (status.code(), status.signal()),
        (None, Some(libc::SIGKILL))
    );
    let mut aborted = AsyncChild::new(sh("kill -ABRT $$").spawn().unwrap()).unwrap();
    assert_eq!(aborted.wait().await.unwrap().signal(), Some(libc::SIGABRT));

    // The reaping ran on the reaping thread, lowered to its nice value.
    assert_eq!(
        nice_of_thread("tg-reap"),
        Some(i64::from(tg_sys::spawn::REAP_NICE))
    );
    // The runtime's own thread kept its priority.
    assert_eq!(tg_sys::sched::thread_nice().unwrap(), own_nice);
}

#[tokio::test]
async fn a_wait_cancelled_midway_loses_no_status() {
    // Waits cut short at every point (as a select! loop does) until one finishes: the status
    // it returns is the child's own, however many were cancelled before it.
    for i in 0..30u64 {
        let mut child = AsyncChild::new(sh("exit 3").spawn().unwrap()).unwrap();
        let status = loop {
            let cut = Duration::from_micros(1 + 20 * i);
            if let Ok(s) = tokio::time::timeout(cut, child.wait()).await {
                break s.unwrap();
            }
        };
        assert_eq!(status.code(), Some(3), "attempt {i}");
    }
}

#[tokio::test]
async fn a_wait_dropped_midway_leaves_the_child_reaped_once() {
    // Many children ending while their waits are abandoned at every point: none is left a
    // zombie, and a later wait of another child still gets its own status.
    let mut pids = Vec::new();
    for i in 0..20u64 {
        let mut child = AsyncChild::new(sh("exit 0").spawn().unwrap()).unwrap();
        pids.push(child.id());
        let _ = tokio::time::timeout(Duration::from_micros(50 * i), child.wait()).await;
        drop(child);
    }
    let mut other = AsyncChild::new(sh("exit 5").spawn().unwrap()).unwrap();
    assert_eq!(other.wait().await.unwrap().code(), Some(5));
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in pids {
        let proc = format!("/proc/{pid}");
        while Path::new(&proc).exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!Path::new(&proc).exists(), "{pid} left unreaped");
    }
}
