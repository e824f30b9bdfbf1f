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

/// Has this process reap its ended instances only once the host is calm (see
/// [`tg_sys::spawn::defer_reaps_while`]): not while it has more runnable tasks than the sync
/// service's pacing limit, the same sign of a herd.
pub(crate) fn defer_reaps_while_busy() {
    tg_sys::spawn::defer_reaps_while(host_busy);
}

fn host_busy() -> bool {
    static LIMIT: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let limit = *LIMIT.get_or_init(tg_sync::pace::default_limit);
    tg_sync::pace::runnable_tasks().is_some_and(|r| r > limit)
}
