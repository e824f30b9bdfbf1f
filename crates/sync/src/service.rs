//! [`SyncService`]: the actor that owns the [`Core`] and the in-process API around it.
//!
//! One task owns the state; connections and in-process callers talk to it over one unbounded
//! channel, and each connection has its own unbounded outgoing queue. Unbounded on purpose: a
//! reader must never stall behind a slow writer (sdk-go gives every request write one second).

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::Stream;
use serde_json::value::RawValue;
use tg_api::sync::{
    BarrierRequest, Op, PublishRequest, Request, RunKeys, SignalEntryRequest, SubscribeRequest,
};
use tokio::sync::{mpsc, oneshot};

use crate::admission::Admission;
use crate::core::{ConnId, Core, CoreStats, Dropped, Handled, Item, Outgoing, Reply};
use crate::limits::{Limit, LimitExceeded, SyncLimits};

/// The in-process API failed because the service actor is gone (its runtime shut down).
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
}

enum Command {
    Open {
        conn: ConnId,
        sink: mpsc::UnboundedSender<Outgoing>,
    },
    Request {
        conn: ConnId,
        req: Request,
    },
    Close {
        conn: ConnId,
    },
    /// Answers request `id` of `conn` with a limit's error, without applying it.
    Reject {
        conn: ConnId,
        id: String,
        hit: LimitExceeded,
    },
    DropPrefix {
        prefix: String,
        reply: oneshot::Sender<Dropped>,
    },
    Stats {
        reply: oneshot::Sender<ServiceStats>,
    },
}

/// A cheap-to-clone handle to the running sync service.
#[derive(Clone)]
pub struct SyncService {
    tx: mpsc::UnboundedSender<Command>,
    next_conn: Arc<AtomicU64>,
    limits: Arc<SyncLimits>,
    admission: Arc<Admission>,
}

impl std::fmt::Debug for SyncService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncService").finish_non_exhaustive()
    }
}

impl SyncService {
    /// Starts the actor on the current tokio runtime with the default [`SyncLimits`]. It stops
    /// when every handle (and every connection opened from one) is dropped.
    pub fn spawn() -> Self {
        Self::spawn_with(SyncLimits::default())
    }

    /// Starts the actor on the current tokio runtime, enforcing `limits` (also in every
    /// [`crate::serve`] of this service).
    pub fn spawn_with(limits: SyncLimits) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let admission = Arc::new(Admission::new(&limits));
        tokio::spawn(actor(
            rx,
            Core::with_limits(limits.clone()),
            Arc::clone(&admission),
        ));
        SyncService {
            tx,
            next_conn: Arc::new(AtomicU64::new(1)),
            limits: Arc::new(limits),
            admission,
        }
    }

    /// The limits this service enforces.
    pub fn limits(&self) -> &SyncLimits {
        &self.limits
    }

    pub(crate) fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// Opens a connection: requests go through the returned handle, replies come out of the
    /// receiver in the order the core produced them. Dropping the handle closes the connection.
    pub fn open(&self) -> (ConnHandle, mpsc::UnboundedReceiver<Outgoing>) {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (sink, rx) = mpsc::unbounded_channel();
        // A closed actor shows up later as a closed receiver; nothing to do here.
        let _ = self.tx.send(Command::Open { conn, sink });
        (
            ConnHandle {
                conn,
                tx: self.tx.clone(),
            },
            rx,
        )
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
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::DropPrefix {
                prefix: prefix.to_owned(),
                reply,
            })
            .map_err(|_| ServiceError::Closed)?;
        rx.await.map_err(|_| ServiceError::Closed)
    }

    pub async fn stats(&self) -> Result<ServiceStats, ServiceError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Stats { reply })
            .map_err(|_| ServiceError::Closed)?;
        rx.await.map_err(|_| ServiceError::Closed)
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
#[derive(Debug)]
pub struct ConnHandle {
    conn: ConnId,
    tx: mpsc::UnboundedSender<Command>,
}

impl ConnHandle {
    pub fn id(&self) -> ConnId {
        self.conn
    }

    /// Queues a request; its replies arrive on the connection's receiver.
    pub fn send(&self, req: Request) {
        let _ = self.tx.send(Command::Request {
            conn: self.conn,
            req,
        });
    }

    /// Answers request `id` with the error of `hit`, in order with the connection's other
    /// replies, without applying the request; the service logs it as its own refusals.
    pub(crate) fn reject(&self, id: String, hit: LimitExceeded) {
        let _ = self.tx.send(Command::Reject {
            conn: self.conn,
            id,
            hit,
        });
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Close { conn: self.conn });
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

async fn actor(
    mut rx: mpsc::UnboundedReceiver<Command>,
    mut core: Core,
    admission: Arc<Admission>,
) {
    // (limit, run) pairs already warned about: a run flooding junk is named once per limit.
    let mut warned: HashSet<(Limit, Option<String>)> = HashSet::new();
    let mut hits: Vec<LimitExceeded> = Vec::new();
    let mut sinks: HashMap<ConnId, mpsc::UnboundedSender<Outgoing>> = HashMap::new();
    let mut out: Vec<Outgoing> = Vec::new();
    let mut dead: Vec<ConnId> = Vec::new();
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Command::Open { conn, sink } => {
                sinks.insert(conn, sink);
            }
            Command::Request { conn, req } => {
                if core.handle(conn, req, &mut out) == Handled::NoOp {
                    tracing::debug!(conn, "request names no operation; ignored");
                }
            }
            Command::Close { conn } => {
                sinks.remove(&conn);
                core.disconnect(conn);
            }
            Command::Reject { conn, id, hit } => {
                out.push(Outgoing {
                    conn,
                    id: Arc::from(id.as_str()),
                    reply: Reply::Error(hit.to_string()),
                });
                hits.push(hit);
            }
            Command::DropPrefix { prefix, reply } => {
                let dropped = core.drop_prefix(&prefix);
                // A run that is gone may be warned about afresh if its id comes back.
                warned.clear();
                tracing::debug!(%prefix, states = dropped.states, topics = dropped.topics, "dropped keys");
                let _ = reply.send(dropped);
            }
            Command::Stats { reply } => {
                let CoreStats {
                    states,
                    topics,
                    waiters,
                    subscriptions,
                    ..
                } = core.stats();
                let _ = reply.send(ServiceStats {
                    keys: states + topics,
                    states,
                    topics,
                    connections: sinks.len(),
                    waiters,
                    subscriptions,
                    retained_bytes: core.retained_bytes(),
                    unidentified_connections: admission.unidentified(),
                });
            }
        }
        hits.extend(core.take_limit_hits());
        for hit in hits.drain(..) {
            if warned.insert((hit.limit, hit.run.clone())) {
                tracing::warn!(run = hit.run.as_deref().unwrap_or(""), "{hit}");
            } else {
                tracing::debug!(run = hit.run.as_deref().unwrap_or(""), "{hit}");
            }
        }
        for o in out.drain(..) {
            let conn = o.conn;
            if let Some(sink) = sinks.get(&conn)
                && sink.send(o).is_err()
            {
                dead.push(conn);
            }
        }
        // A receiver dropped without its handle (e.g. a writer that failed): stop feeding it.
        for conn in dead.drain(..) {
            if sinks.remove(&conn).is_some() {
                core.disconnect(conn);
            }
        }
    }
}
