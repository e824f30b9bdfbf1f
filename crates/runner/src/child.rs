//! Starting an instance's process with [`tg_sys::spawn`] (no copy of the engine's memory).

use std::io;

use tg_sys::spawn::{AsyncChild, Command};

/// Starts `cmd`, retrying briefly on `ETXTBSY`: a freshly built artifact can still be open for
/// writing in a child that another thread of this process forked before the builder closed it
/// (the descriptor goes away at that child's exec).
pub(crate) async fn spawn_retrying_busy(cmd: &mut Command) -> io::Result<AsyncChild> {
    let mut delay = std::time::Duration::from_millis(5);
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && tries < 8 => {
                tries += 1;
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return AsyncChild::new(other?),
        }
    }
}

/// Environment variable that turns the deferred reaping off: `now` reaps every ended instance
/// at once (on the reaping thread all the same).
pub const REAP_ENV: &str = "TESTGROUND_REAP";

/// Has this process reap its ended instances only once the host is calm (see
/// [`tg_sys::spawn::defer_reaps_while`]): not while it has more runnable tasks than the sync
/// service's pacing limit, the same sign of a herd. Unless [`REAP_ENV`] is `now`.
pub(crate) fn defer_reaps_while_busy() {
    if std::env::var(REAP_ENV).is_ok_and(|v| v.trim() == "now") {
        return;
    }
    tg_sys::spawn::defer_reaps_while(host_busy);
}

fn host_busy() -> bool {
    static LIMIT: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let limit = *LIMIT.get_or_init(tg_sync::pace::default_limit);
    tg_sync::pace::runnable_tasks().is_some_and(|r| r > limit)
}

/// Reaps now the ended instances whose reap was put off (for the end of a run or a helper),
/// waiting at most a few seconds for the reaping thread.
pub(crate) async fn reap_put_off_now() {
    let _ = tokio::task::spawn_blocking(|| {
        tg_sys::spawn::reap_put_off_now(std::time::Duration::from_secs(5))
    })
    .await;
}
