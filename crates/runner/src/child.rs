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
