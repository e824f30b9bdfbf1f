//! `tg_sys::spawn::defer_reaps_while`: while the gate says the host is busy, an ended child's
//! status is reported at once but the child stays a zombie, until the gate opens or
//! `MAX_REAP_DEFERRAL` has passed. A binary of its own: the gate is process-wide.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tg_sys::spawn::{AsyncChild, Command, MAX_REAP_DEFERRAL};

static BUSY: AtomicBool = AtomicBool::new(true);

fn busy() -> bool {
    BUSY.load(Ordering::SeqCst)
}

/// The state letter of `pid` (`Z` for a zombie), or `None` once it is reaped.
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

async fn wait_gone(pid: u32, within: Duration) -> Duration {
    let start = Instant::now();
    while state(pid).is_some() {
        assert!(
            start.elapsed() < within,
            "{pid} not reaped within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

fn exiting(code: i32) -> AsyncChild {
    let mut cmd = Command::new("/bin/sh".as_ref());
    cmd.arg("-c").arg(format!("exit {code}"));
    AsyncChild::new(cmd.spawn().unwrap()).unwrap()
}

#[tokio::test]
async fn a_busy_host_gets_the_status_at_once_and_the_reap_later() {
    tg_sys::spawn::defer_reaps_while(busy);

    // Busy: the status comes back, the process stays a zombie.
    let mut child = exiting(4);
    let pid = child.id();
    assert_eq!(child.wait().await.unwrap().code(), Some(4));
    // Asked again, the same status (nothing is read twice from the kernel).
    assert_eq!(child.wait().await.unwrap().code(), Some(4));
    drop(child);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state(pid), Some('Z'), "reaped while the host was busy");

    // Calm again: reaped within a few polls.
    BUSY.store(false, Ordering::SeqCst);
    wait_gone(pid, Duration::from_secs(5)).await;
    let mut calm = exiting(0);
    let calm_pid = calm.id();
    assert!(calm.wait().await.unwrap().success());
    wait_gone(calm_pid, Duration::from_secs(5)).await;

    // Busy, but the run is over: reaped on demand.
    BUSY.store(true, Ordering::SeqCst);
    let mut done = exiting(2);
    let done_pid = done.id();
    assert_eq!(done.wait().await.unwrap().code(), Some(2));
    assert_eq!(state(done_pid), Some('Z'));
    assert!(tg_sys::spawn::reap_put_off_now(Duration::from_secs(5)));
    assert_eq!(state(done_pid), None, "still there after reap_put_off_now");

    // Busy for good: reaped after the longest deferral all the same.
    BUSY.store(true, Ordering::SeqCst);
    let mut stuck = exiting(9);
    let stuck_pid = stuck.id();
    assert_eq!(stuck.wait().await.unwrap().code(), Some(9));
    let took = wait_gone(stuck_pid, MAX_REAP_DEFERRAL + Duration::from_secs(5)).await;
    assert!(
        took + Duration::from_millis(500) >= MAX_REAP_DEFERRAL,
        "reaped after {took:?}, before the deferral ran out"
    );
}
