//! Which network connections the service keeps: at most `max_connections_per_run` identified
//! connections per run, and at most `max_unidentified_connections` that have not sent a request
//! yet, the oldest of which is closed when a new one arrives over the cap.
//!
//! A connection is *unidentified* from its accept until its first request that names a key (and
//! is admitted for that key's run); then it belongs to that run for good, also when it later
//! speaks for other runs (the sidecar multiplexes every run on one socket). Identified
//! connections are never closed here: Go clients die on any close but their own (trap T9).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::limits::{Limit, LimitExceeded, SyncLimits};

#[derive(Debug)]
pub(crate) struct Admission {
    max_per_run: usize,
    max_unidentified: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// Unidentified connections by arrival; sending on the channel closes that connection.
    lobby: BTreeMap<u64, oneshot::Sender<()>>,
    /// Identified connections per run ("" for keys outside any run).
    runs: HashMap<Box<str>, usize>,
    /// Unidentified connections closed so far, for the log.
    evicted: u64,
}

impl Admission {
    pub(crate) fn new(limits: &SyncLimits) -> Self {
        Admission {
            max_per_run: limits.max_connections_per_run,
            max_unidentified: limits.max_unidentified_connections.max(1),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update is a single insert, remove or counter change: a poisoned lock still
        // holds consistent data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new, unidentified connection; closes the oldest unidentified one if that makes
    /// too many.
    pub(crate) fn enter(self: &Arc<Self>) -> Ticket {
        let (tx, rx) = oneshot::channel();
        let mut st = self.state();
        let seq = st.next;
        st.next += 1;
        st.lobby.insert(seq, tx);
        while st.lobby.len() > self.max_unidentified {
            let Some((_, close)) = st.lobby.pop_first() else {
                break;
            };
            let _ = close.send(());
            st.evicted += 1;
            let evicted = st.evicted;
            // One line per 1,024 closes: a flood of idle sockets must not flood the log too.
            if evicted == 1 || evicted.is_multiple_of(1024) {
                tracing::warn!(
                    limit = self.max_unidentified,
                    closed_so_far = evicted,
                    "sync limit max_unidentified_connections reached: closing the oldest \
                     connection that has sent no request"
                );
            }
        }
        Ticket {
            seq,
            run: None,
            evicted: Some(rx),
            admission: Arc::clone(self),
        }
    }

    /// Connections not identified yet.
    pub(crate) fn unidentified(&self) -> usize {
        self.state().lobby.len()
    }
}

/// One network connection's place in the [`Admission`]; dropping it gives the place back.
#[derive(Debug)]
pub(crate) struct Ticket {
    seq: u64,
    run: Option<Box<str>>,
    /// Resolves when this connection is closed for being the oldest unidentified one. `None`
    /// once identified.
    evicted: Option<oneshot::Receiver<()>>,
    admission: Arc<Admission>,
}

impl Ticket {
    pub(crate) fn is_identified(&self) -> bool {
        self.run.is_some()
    }

    /// Binds the connection to `run` ("" for keys outside any run), unless the run has its
    /// maximum of connections already; then it stays unidentified. A no-op once identified.
    pub(crate) fn identify(&mut self, run: &str) -> Result<(), LimitExceeded> {
        if self.run.is_some() {
            return Ok(());
        }
        let mut st = self.admission.state();
        let used = st.runs.get(run).copied().unwrap_or(0);
        if used >= self.admission.max_per_run {
            return Err(LimitExceeded::new(
                Limit::ConnectionsPerRun,
                run,
                self.admission.max_per_run as u64,
                used as u64,
                1,
            ));
        }
        st.lobby.remove(&self.seq);
        *st.runs.entry(run.into()).or_default() += 1;
        drop(st);
        self.run = Some(run.into());
        self.evicted = None;
        Ok(())
    }

    /// Resolves when the connection must close for being the oldest unidentified one; never
    /// once it is identified.
    pub(crate) async fn evicted(&mut self) {
        match self.evicted.as_mut() {
            // A dropped sender means the admission is gone; treat it as a close too.
            Some(rx) => {
                let _ = rx.await;
            }
            None => std::future::pending().await,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.admission.state();
        match self.run.take() {
            Some(run) => {
                if let Some(n) = st.runs.get_mut(&run) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        st.runs.remove(&run);
                    }
                }
            }
            None => {
                st.lobby.remove(&self.seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(per_run: usize, unidentified: usize) -> Arc<Admission> {
        Arc::new(Admission::new(&SyncLimits {
            max_connections_per_run: per_run,
            max_unidentified_connections: unidentified,
            ..SyncLimits::default()
        }))
    }

    fn is_evicted(t: &mut Ticket) -> bool {
        match t.evicted.as_mut() {
            Some(rx) => rx.try_recv().is_ok(),
            None => false,
        }
    }

    #[test]
    fn the_oldest_unidentified_connection_is_closed_first_and_identified_ones_never() {
        let adm = admission(10, 2);
        let mut a = adm.enter();
        a.identify("r").unwrap();
        let mut b = adm.enter();
        let mut c = adm.enter();
        assert_eq!(adm.unidentified(), 2);
        let mut d = adm.enter();
        assert!(is_evicted(&mut b), "the oldest unidentified goes first");
        assert!(!is_evicted(&mut c) && !is_evicted(&mut d) && !is_evicted(&mut a));
        let mut e = adm.enter();
        assert!(is_evicted(&mut c));
        assert!(
            !is_evicted(&mut a),
            "identified connections are never closed"
        );
        assert_eq!(adm.unidentified(), 2);
        drop(d);
        e.identify("r").unwrap();
        assert_eq!(adm.unidentified(), 0);
    }

    #[test]
    fn connections_per_run_are_capped_and_given_back() {
        let adm = admission(2, 100);
        let mut a = adm.enter();
        let mut b = adm.enter();
        let mut c = adm.enter();
        a.identify("r").unwrap();
        b.identify("r").unwrap();
        let err = c.identify("r").unwrap_err();
        assert_eq!(err.limit, Limit::ConnectionsPerRun);
        assert!(err.to_string().contains("max_connections_per_run"), "{err}");
        assert!(!c.is_identified());
        assert_eq!(adm.unidentified(), 1);
        // Another run is not affected, and a place freed is usable again.
        let mut d = adm.enter();
        d.identify("other").unwrap();
        drop(a);
        c.identify("r").unwrap();
        assert!(c.is_identified());
        assert_eq!(adm.unidentified(), 0);
    }
}
