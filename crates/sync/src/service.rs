//! [`SyncService`]: the [`Core`] behind one lock, and the in-process API around it.
//!
//! There is no actor task: whoever has requests (a network connection's task with a batch of
//! frames, an in-process caller) takes the lock once, applies them, and queues every reply on
//! the sink of the connection it is for, still under the lock, so each connection sees its
//! replies in the order the core produced them. A network sink is the connection's output
//! buffer (replies are encoded there as websocket frames); an in-process sink is an unbounded
//! channel. Both are unbounded on purpose: a reader must never stall behind a slow writer
//! (sdk-go gives every request write one second). The socket writes happen after the lock is
//! released (see `server`).

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::Stream;
use serde_json::value::RawValue;
use tg_api::sync::{
    BarrierRequest, Op, PublishRequest, Request, RunKeys, SignalEntryRequest, SubscribeRequest,
};
use tokio::sync::mpsc;

use crate::admission::Admission;
use crate::core::{ConnId, Core, CoreStats, Dropped, Handled, Item, Outgoing, Reply};
use crate::limits::{Limit, LimitExceeded, SyncLimits};
use crate::pace::{FanoutPacer, Pacer};
use crate::server::NetConn;

/// The in-process API failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServiceError {
    #[error("sync service is not running")]
    Closed,
    #[error("sync service answered {what} with an unexpected reply")]
    UnexpectedReply { what: &'static str },
    #[error("sync service error: {message}")]
    Remote { message: String },
}

/// What the service holds, for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// States plus topics.
    pub keys: usize,
    pub states: usize,
    pub topics: usize,
    /// Open connections, including in-process subscriptions and calls.
    pub connections: usize,
    pub waiters: usize,
    pub subscriptions: usize,
    /// Bytes charged to all runs together (see [`SyncLimits::max_run_bytes`]).
    pub retained_bytes: u64,
    /// Network connections that have not sent a request yet.
    pub unidentified_connections: usize,
    /// Pauses large fan-outs of this process took so far, waiting for an overcommitted host's
    /// CPUs (see `pace.rs`).
    pub fanout_pauses: u64,
    /// Large fan-outs that used their whole pacing budget and then wrote the rest at once.
    pub fanout_overruns: u64,
    /// Fan-outs large enough to be paced (more than 64 connections), each counted once
    /// however many tasks wrote its parts.
    pub paced_fanouts: u64,
}

/// Where a connection's replies go.
pub(crate) enum Sink {
    /// An in-process caller.
    Chan(mpsc::UnboundedSender<Outgoing>),
    /// A websocket: replies are encoded into its output buffer.
    Net(Arc<NetConn>),
}

/// One unit of a network connection's batch.
pub(crate) enum Batched {
    Request(Request),
    /// Answers request `id` with a limit's error, without applying it.
    Reject {
        id: String,
        hit: LimitExceeded,
    },
}

/// Everything behind the lock.
struct Shared {
    core: Core,
    sinks: HashMap<ConnId, Sink, foldhash::fast::RandomState>,
    /// (limit, run) pairs already warned about: a run flooding junk is named once per limit.
    warned: HashSet<(Limit, Option<String>)>,
    /// Replies of the operation in progress (kept to reuse its allocation).
    out: Vec<Outgoing>,
    /// Paces large fan-outs ([`SyncLimits::fanout_pace_runnable`]).
    pacer: Option<Pacer>,
}

struct Inner {
    shared: Mutex<Shared>,
    next_conn: AtomicU64,
    limits: SyncLimits,
    admission: Arc<Admission>,
    pacer: Option<Pacer>,
}

/// A cheap-to-clone handle to the running sync service.
#[derive(Clone)]
pub struct SyncService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SyncService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncService").finish_non_exhaustive()
    }
}

impl SyncService {
    /// A service with the default [`SyncLimits`]. Its state lives as long as any handle (or
    /// connection opened from one).
    pub fn spawn() -> Self {
        Self::spawn_with(SyncLimits::default())
    }

    /// A service that enforces `limits` (also in every [`crate::serve`] of this service).
    pub fn spawn_with(limits: SyncLimits) -> Self {
        Self::spawn_paced_by(limits, crate::pace::runnable_tasks)
    }

    /// [`SyncService::spawn_with`], its fan-outs paced by the runnable count `source` gives
    /// instead of this host's (where the instances run elsewhere, or in tests).
    pub fn spawn_paced_by(limits: SyncLimits, source: crate::pace::RunnableSource) -> Self {
        let admission = Arc::new(Admission::new(&limits));
        let pacer = limits
            .fanout_pace_runnable
            .map(|limit| Pacer::new(limit, source));
        SyncService {
            inner: Arc::new(Inner {
                shared: Mutex::new(Shared {
                    core: Core::with_limits(limits.clone()),
                    sinks: HashMap::default(),
                    warned: HashSet::new(),
                    out: Vec::new(),
                    pacer: pacer.clone(),
                }),
                next_conn: AtomicU64::new(1),
                limits,
                admission,
                pacer,
            }),
        }
    }

    /// The limits this service enforces.
    pub fn limits(&self) -> &SyncLimits {
        &self.inner.limits
    }

    pub(crate) fn pacer(&self) -> Option<&Pacer> {
        self.inner.pacer.as_ref()
    }

    pub(crate) fn admission(&self) -> &Arc<Admission> {
        &self.inner.admission
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // Nothing panics while holding the lock in normal operation; if something did, the
        // state is still the last consistent one each operation leaves.
        self.inner.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a connection: requests go through the returned handle, replies come out of the
    /// receiver in the order the core produced them. Dropping the handle closes the connection.
    pub fn open(&self) -> (ConnHandle, mpsc::UnboundedReceiver<Outgoing>) {
        let (sink, rx) = mpsc::unbounded_channel();
        (self.register(Sink::Chan(sink)), rx)
    }

    /// Opens a network connection whose replies are encoded into `net`'s output buffer.
    pub(crate) fn open_net(&self, net: Arc<NetConn>) -> ConnHandle {
        self.register(Sink::Net(net))
    }

    fn register(&self, sink: Sink) -> ConnHandle {
        let conn = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        self.lock().sinks.insert(conn, sink);
        ConnHandle {
            conn,
            service: self.clone(),
        }
    }

    /// Applies a network connection's batch in order under one lock; replies are queued on
    /// their connections' sinks, and the network connections that now have output to write
    /// (this one included) are appended to `flush`, for the caller to write after the lock.
    pub(crate) fn apply_batch(
        &self,
        conn: ConnId,
        batch: &mut Vec<Batched>,
        flush: &mut Vec<Arc<NetConn>>,
    ) -> Option<FanoutPacer> {
        let mut guard = self.lock();
        let sh = &mut *guard;
        let mut hits = Vec::new();
        for b in batch.drain(..) {
            match b {
                Batched::Request(req) => {
                    if sh.core.handle(conn, req, &mut sh.out) == Handled::NoOp {
                        tracing::debug!(conn, "request names no operation; ignored");
                    }
                }
                Batched::Reject { id, hit } => {
                    sh.out.push(Outgoing {
                        conn,
                        id: Arc::from(id.as_str()),
                        reply: Reply::Error(hit.to_string()),
                    });
                    hits.push(hit);
                }
            }
        }
        sh.after(hits, flush)
    }

    fn with_core(&self, f: impl FnOnce(&mut Core, &mut Vec<Outgoing>)) {
        let mut flush = Vec::new();
        let part_of = {
            let mut guard = self.lock();
            let sh = &mut *guard;
            f(&mut sh.core, &mut sh.out);
            sh.after(Vec::new(), &mut flush)
        };
        crate::server::flush_all(&mut flush, self.pacer(), part_of);
    }

    /// Publishes `payload` (kept verbatim) to `topic`; returns its 1-based sequence number.
    pub async fn publish(&self, topic: &str, payload: Box<RawValue>) -> Result<u64, ServiceError> {
        let op = Op::Publish(PublishRequest {
            topic: topic.to_owned(),
            payload,
        });
        match self.call(op).await? {
            Reply::Published(seq) => Ok(seq),
            other => Err(unexpected("publish", other)),
        }
    }

    /// Increments `state`; returns the new count.
    pub async fn signal_entry(&self, state: &str) -> Result<u64, ServiceError> {
        let op = Op::SignalEntry(SignalEntryRequest {
            state: state.to_owned(),
        });
        match self.call(op).await? {
            Reply::Signalled(seq) => Ok(seq),
            other => Err(unexpected("signal_entry", other)),
        }
    }

    /// Waits until `state` reaches `target`.
    pub async fn barrier(&self, state: &str, target: i64) -> Result<(), ServiceError> {
        let op = Op::Barrier(BarrierRequest {
            state: state.to_owned(),
            target,
        });
        match self.call(op).await? {
            Reply::BarrierReached => Ok(()),
            other => Err(unexpected("barrier", other)),
        }
    }

    /// Subscribes to `topic` from its first item. The subscription ends when dropped.
    pub fn subscribe(&self, topic: &str) -> Subscription {
        let (handle, rx) = self.open();
        handle.send(Request::new(
            "0",
            Op::Subscribe(SubscribeRequest {
                topic: topic.to_owned(),
            }),
        ));
        Subscription {
            _handle: handle,
            rx,
        }
    }

    /// Subscribes to a run's events (`<run_prefix>:run_events`, where `run_prefix` is
    /// `run:<run>:plan:<plan>:case:<case>`), from the first event on.
    pub fn subscribe_events(&self, run_prefix: &str) -> Subscription {
        self.subscribe(&RunKeys::from_prefix(run_prefix).run_events())
    }

    /// Removes every key of run `run_id` (`run:<run_id>:...`). Call when the run has ended.
    pub async fn drop_run(&self, run_id: &str) -> Result<Dropped, ServiceError> {
        self.drop_prefix(&RunKeys::run_scope(run_id)).await
    }

    /// Removes every state and topic whose key starts with `prefix`.
    pub async fn drop_prefix(&self, prefix: &str) -> Result<Dropped, ServiceError> {
        let mut sh = self.lock();
        let dropped = sh.core.drop_prefix(prefix);
        // A run that is gone may be warned about afresh if its id comes back.
        sh.warned.clear();
        tracing::debug!(%prefix, states = dropped.states, topics = dropped.topics, "dropped keys");
        Ok(dropped)
    }

    pub async fn stats(&self) -> Result<ServiceStats, ServiceError> {
        let mut sh = self.lock();
        let CoreStats {
            states,
            topics,
            waiters,
            subscriptions,
            ..
        } = sh.core.stats();
        Ok(ServiceStats {
            keys: states + topics,
            states,
            topics,
            connections: sh.sinks.len(),
            waiters,
            subscriptions,
            retained_bytes: sh.core.retained_bytes(),
            unidentified_connections: self.inner.admission.unidentified(),
            fanout_pauses: self.pacer().map_or(0, Pacer::pauses),
            fanout_overruns: self.pacer().map_or(0, Pacer::overruns),
            paced_fanouts: self.pacer().map_or(0, Pacer::fanouts),
        })
    }

    async fn call(&self, op: Op) -> Result<Reply, ServiceError> {
        let (handle, mut rx) = self.open();
        handle.send(Request::new("0", op));
        let reply = rx.recv().await.ok_or(ServiceError::Closed)?.reply;
        match reply {
            Reply::Error(message) => Err(ServiceError::Remote { message }),
            other => Ok(other),
        }
    }
}

fn unexpected(what: &'static str, _reply: Reply) -> ServiceError {
    ServiceError::UnexpectedReply { what }
}

/// The request side of one connection. Dropping it closes the connection: its barriers and
/// subscriptions end, the state they touched stays.
pub struct ConnHandle {
    conn: ConnId,
    service: SyncService,
}

impl std::fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHandle")
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

impl ConnHandle {
    pub fn id(&self) -> ConnId {
        self.conn
    }

    /// Applies a request; its replies arrive on the connection's receiver.
    pub fn send(&self, req: Request) {
        let conn = self.conn;
        self.service.with_core(|core, out| {
            if core.handle(conn, req, out) == Handled::NoOp {
                tracing::debug!(conn, "request names no operation; ignored");
            }
        });
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        let mut sh = self.service.lock();
        sh.sinks.remove(&self.conn);
        sh.core.disconnect(self.conn);
    }
}

/// An in-process subscription: every item of a topic from the first, then live ones.
#[derive(Debug)]
pub struct Subscription {
    _handle: ConnHandle,
    rx: mpsc::UnboundedReceiver<Outgoing>,
}

impl Subscription {
    /// The next item; `None` once the service is gone. Dropping the topic's run does not end
    /// the subscription: it simply receives nothing more.
    pub async fn next_item(&mut self) -> Option<Arc<Item>> {
        std::future::poll_fn(|cx| self.poll_item(cx)).await
    }

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Arc<Item>>> {
        loop {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Outgoing {
                    reply: Reply::Item(item),
                    ..
                })) => return Poll::Ready(Some(item)),
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Stream for Subscription {
    type Item = Arc<Item>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Arc<Item>>> {
        self.get_mut().poll_item(cx)
    }
}

impl Shared {
    /// Logs the limits hit, queues the replies in `self.out` on their sinks, and collects the
    /// network connections that got output and need a write. For a large fan-out, whose parts
    /// other tasks already write, returns its pacer: what is left in `flush` is its last part.
    fn after(
        &mut self,
        mut hits: Vec<LimitExceeded>,
        flush: &mut Vec<Arc<NetConn>>,
    ) -> Option<FanoutPacer> {
        hits.extend(self.core.take_limit_hits());
        for hit in hits {
            if self.warned.insert((hit.limit, hit.run.clone())) {
                tracing::warn!(run = hit.run.as_deref().unwrap_or(""), "{hit}");
            } else {
                tracing::debug!(run = hit.run.as_deref().unwrap_or(""), "{hit}");
            }
        }
        let mut dead = Vec::new();
        // One budget for every part of a large fan-out written from other tasks, sized on the
        // whole of it (see crate::pace).
        let fanout_pace = match &self.pacer {
            Some(p) if self.out.len() >= crate::server::FANOUT_CHUNK => {
                Some(p.for_fanout(self.out.len()))
            }
            _ => None,
        };
        for o in self.out.drain(..) {
            let conn = o.conn;
            match self.sinks.get(&conn) {
                Some(Sink::Net(net)) if net.push(&o) => {
                    flush.push(Arc::clone(net));
                    // A large fan-out (a 10,000-waiter release): start writing what is encoded
                    // on another worker while the rest is encoded here. Appends stay under the
                    // lock, so the order per connection holds; a buffer emptied by that writer
                    // meanwhile is simply flushed again by whoever appends to it next.
                    if flush.len() >= crate::server::FANOUT_CHUNK {
                        crate::server::flush_elsewhere(std::mem::take(flush), fanout_pace.clone());
                    }
                }
                Some(Sink::Chan(tx)) if tx.send(o).is_err() => dead.push(conn),
                _ => {}
            }
        }
        // Now that the replies are encoded (and a large fan-out's parts are being written), the
        // released waiters' bookkeeping (see Core::settle).
        self.core.settle();
        // A receiver dropped without its handle: stop feeding it.
        for conn in dead {
            if self.sinks.remove(&conn).is_some() {
                self.core.disconnect(conn);
            }
        }
        fanout_pace
    }
}
