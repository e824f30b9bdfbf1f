//! The one client of the Testground sync protocol (see the wire types in `tg_api::sync`).
//!
//! A [`Client`] owns one websocket; clones share it. Every call takes the next numeric id (`"0"`,
//! `"1"`, ..., as both official SDKs do), registers where its answer goes, then queues its frame,
//! so requests are pipelined: a barrier that waits for hours never holds up a publish. Two tasks
//! own the socket: a writer that batches queued frames, and a reader that routes each answer by
//! id and never waits on writes.
//!
//! Publishes nobody awaits ([`Client::publish_detached`], used for the last events of an
//! instance) are remembered, and [`Client::close`] waits for their acknowledgements (at most
//! [`DETACHED_GRACE`]) before it sends close 1000 and waits for the server's echo (at most
//! [`CLOSE_ECHO_WAIT`]); a run's final event is therefore not lost when the process exits.
//!
//! This crate speaks the protocol and nothing more: it does not know the key layout (that is
//! `tg_api::sync::RunKeys`) and decodes no payloads beyond JSON text. It is compiled into every
//! test plan through the SDK, so it depends only on tokio, tungstenite, futures and serde_json.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, Stream, StreamExt};
use serde_json::Value;
use serde_json::value::RawValue;
use tg_api::sync::{
    BarrierRequest, Op, PublishRequest, Request, Response, ResponseKind, SignalEntryRequest,
    SubscribeRequest,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

/// The websocket error type of [`ClientError::Connect`].
pub use tokio_tungstenite::tungstenite::Error as WsError;

/// How long [`Client::close`] waits for detached publishes to be acknowledged.
pub const DETACHED_GRACE: Duration = Duration::from_secs(5);
/// How long [`Client::close`] waits for the server to echo the close frame.
pub const CLOSE_ECHO_WAIT: Duration = Duration::from_secs(2);
/// Largest message the client reads: sdk-rust's limit. Subscription items are double-encoded, so
/// an item of the server's largest payload arrives somewhat larger than that payload.
pub const MAX_MESSAGE_SIZE: usize = 256 << 20;
/// Bytes read from the socket at a time; small, because benchmarks open thousands of clients.
const READ_BUFFER: usize = 8 << 10;
/// How many queued frames the writer hands to the socket before it flushes.
const WRITE_BATCH: usize = 256;

/// A sync call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the sync service at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tungstenite::Error,
    },
    /// The connection is closed (by [`Client::close`] or by the server), or closed before the
    /// answer came.
    #[error("the sync service connection is closed")]
    Closed,
    /// The service answered with an error (e.g. a limit was exceeded); the message is decoded.
    #[error("sync service error: {message}")]
    Remote { message: String },
    #[error("the sync service sent an unexpected {kind:?} answer to {op}")]
    Unexpected {
        op: &'static str,
        kind: ResponseKind,
    },
    #[error("cannot encode the payload: {0}")]
    Encode(#[source] serde_json::Error),
}

/// What became of the detached publishes when the client closed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloseReport {
    /// Detached publishes that had no answer when the connection ended.
    pub unacknowledged: usize,
    /// The decoded error messages the service answered to detached publishes.
    pub errors: Vec<String>,
}

/// Where an answer goes.
enum Pending {
    Once(oneshot::Sender<Result<Response, ClientError>>),
    /// Nobody awaits the answer; `close` waits for these.
    Detached,
    Stream(mpsc::UnboundedSender<Result<String, ClientError>>),
}

/// The routing table, shared by the handles (which register) and the reader (which routes).
struct Routes {
    table: Mutex<Table>,
    /// Detached publishes in flight, for `close` to wait on.
    detached: watch::Sender<usize>,
    /// Set once the connection is over: nothing is routed any more.
    ended: watch::Sender<bool>,
}

#[derive(Default)]
struct Table {
    pending: HashMap<u64, Pending>,
    /// No new request is accepted (closing, or the connection ended).
    refusing: bool,
    report: CloseReport,
}

impl Routes {
    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table inconsistent in a way that
        // matters (every operation is a single insert or remove), so a poisoned lock is used.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, id: u64, pending: Pending) -> Result<(), ClientError> {
        let mut t = self.table();
        if t.refusing {
            return Err(ClientError::Closed);
        }
        if matches!(pending, Pending::Detached) {
            self.detached.send_modify(|n| *n += 1);
        }
        t.pending.insert(id, pending);
        Ok(())
    }

    fn forget(&self, id: u64) -> Option<Pending> {
        let p = self.table().pending.remove(&id);
        if matches!(p, Some(Pending::Detached)) {
            self.detached.send_modify(|n| *n = n.saturating_sub(1));
        }
        p
    }

    fn route(&self, bytes: &[u8]) {
        let Ok(resp) = serde_json::from_slice::<Response>(bytes) else {
            // Nothing sensible to do with an unreadable message; official clients die on it,
            // this one keeps serving the calls it can.
            return;
        };
        // Unknown or non-numeric ids (keepalives, answers to cancelled requests) are ignored.
        let Ok(id) = resp.id.parse::<u64>() else {
            return;
        };
        let mut t = self.table();
        let Some(p) = t.pending.get(&id) else {
            return;
        };
        match p {
            Pending::Once(_) => {
                if let Some(Pending::Once(tx)) = t.pending.remove(&id) {
                    let _ = tx.send(Ok(resp));
                }
            }
            Pending::Detached => {
                t.pending.remove(&id);
                if resp.kind() == ResponseKind::Error {
                    t.report.errors.push(decode_error(&resp.error));
                }
                self.detached.send_modify(|n| *n = n.saturating_sub(1));
            }
            Pending::Stream(tx) => {
                let (item, ends) = match resp.kind() {
                    ResponseKind::Item => (Ok(resp.subscribe), false),
                    ResponseKind::Error => (
                        Err(ClientError::Remote {
                            message: decode_error(&resp.error),
                        }),
                        true,
                    ),
                    kind => (
                        Err(ClientError::Unexpected {
                            op: "subscribe",
                            kind,
                        }),
                        false,
                    ),
                };
                // A dropped subscription removes itself and cancels on the server; a failed send
                // here only means that drop is on its way.
                if tx.send(item).is_err() || ends {
                    t.pending.remove(&id);
                }
            }
        }
    }

    /// The connection is over: every waiting call fails with `Closed`, streams end.
    fn end(&self) {
        let mut t = self.table();
        t.refusing = true;
        let mut unacknowledged = 0;
        for (_, p) in t.pending.drain() {
            match p {
                Pending::Once(tx) => {
                    let _ = tx.send(Err(ClientError::Closed));
                }
                Pending::Stream(tx) => drop(tx),
                Pending::Detached => unacknowledged += 1,
            }
        }
        t.report.unacknowledged += unacknowledged;
        drop(t);
        self.detached.send_replace(0);
        self.ended.send_replace(true);
    }
}

enum WriterCmd {
    Frame(String),
    Close,
}

/// State shared by every clone of a client and by its subscriptions. When the last of them is
/// gone, the writer sees its queue close and says goodbye with close 1000; the reader then gets
/// the echo (or its deadline) and ends.
struct Shared {
    routes: Arc<Routes>,
    writer: mpsc::UnboundedSender<WriterCmd>,
    next_id: AtomicU64,
    reader: AbortHandle,
}

/// A connection to a sync service. Cheap to clone; all clones share one socket.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Client {
    /// Connects to `url` (`ws://host:port`). Must be called within a tokio runtime.
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .max_message_size(Some(MAX_MESSAGE_SIZE))
            .max_frame_size(Some(MAX_MESSAGE_SIZE));
        let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_owned(),
                source,
            })?;
        let (sink, stream) = ws.split();
        let routes = Arc::new(Routes {
            table: Mutex::new(Table::default()),
            detached: watch::Sender::new(0),
            ended: watch::Sender::new(false),
        });
        let (writer_tx, writer_rx) = mpsc::unbounded_channel();
        let (writer_done_tx, writer_done_rx) = watch::channel(false);
        let reader = tokio::spawn(read_loop(stream, Arc::clone(&routes), writer_done_rx));
        tokio::spawn(write_loop(sink, writer_rx, writer_done_tx));
        Ok(Client {
            shared: Arc::new(Shared {
                routes,
                writer: writer_tx,
                next_id: AtomicU64::new(0),
                reader: reader.abort_handle(),
            }),
        })
    }

    /// Publishes `payload` to `topic`; returns its 1-based position in the topic.
    pub async fn publish(&self, topic: &str, payload: &Value) -> Result<u64, ClientError> {
        let raw = serde_json::value::to_raw_value(payload).map_err(ClientError::Encode)?;
        self.publish_raw(topic, raw).await
    }

    /// Publishes JSON text as is (the service keeps it verbatim).
    pub async fn publish_raw(
        &self,
        topic: &str,
        payload: Box<RawValue>,
    ) -> Result<u64, ClientError> {
        let op = Op::Publish(PublishRequest {
            topic: topic.to_owned(),
            payload,
        });
        match self.call(op).await? {
            ResponseKind::Published(seq) => Ok(seq),
            kind => Err(ClientError::Unexpected {
                op: "publish",
                kind,
            }),
        }
    }

    /// Publishes without waiting for the answer; [`Client::close`] waits for it, and reports it
    /// if it failed or never came.
    pub fn publish_detached(&self, topic: &str, payload: Box<RawValue>) -> Result<(), ClientError> {
        let op = Op::Publish(PublishRequest {
            topic: topic.to_owned(),
            payload,
        });
        self.send(op, Pending::Detached).map(drop)
    }

    /// Increments `state`; returns the new count (1 for the first signaller).
    pub async fn signal_entry(&self, state: &str) -> Result<u64, ClientError> {
        let op = Op::SignalEntry(SignalEntryRequest {
            state: state.to_owned(),
        });
        match self.call(op).await? {
            ResponseKind::Signalled(seq) => Ok(seq),
            kind => Err(ClientError::Unexpected {
                op: "signal_entry",
                kind,
            }),
        }
    }

    /// Waits until `state` has been signalled `target` times. Every target goes on the wire
    /// (the service answers targets `<= 0` at once); SDKs that skip them do so themselves.
    pub async fn barrier(&self, state: &str, target: i64) -> Result<(), ClientError> {
        let op = Op::Barrier(BarrierRequest {
            state: state.to_owned(),
            target,
        });
        match self.call(op).await? {
            ResponseKind::BarrierReached => Ok(()),
            kind => Err(ClientError::Unexpected {
                op: "barrier",
                kind,
            }),
        }
    }

    /// Signals `state`, then waits for it to reach `target`; returns this signal's seq.
    pub async fn signal_and_wait(&self, state: &str, target: i64) -> Result<u64, ClientError> {
        let seq = self.signal_entry(state).await?;
        self.barrier(state, target).await?;
        Ok(seq)
    }

    /// Subscribes to `topic`: every item from the first, then live ones, as JSON text.
    /// Dropping the subscription cancels it on the server.
    pub fn subscribe(&self, topic: &str) -> Result<Subscription, ClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let op = Op::Subscribe(SubscribeRequest {
            topic: topic.to_owned(),
        });
        let id = self.send(op, Pending::Stream(tx))?;
        Ok(Subscription {
            id,
            rx,
            shared: Arc::clone(&self.shared),
        })
    }

    /// Closes the connection for every clone: new calls fail with [`ClientError::Closed`] at
    /// once; detached publishes get up to [`DETACHED_GRACE`] to be acknowledged; then close 1000
    /// is sent and the server's echo awaited for up to [`CLOSE_ECHO_WAIT`] (sdk-go's contract,
    /// trap T8). Calls still waiting afterwards fail with `Closed`. Closing twice is harmless;
    /// the second report is empty.
    pub async fn close(&self) -> CloseReport {
        let routes = &self.shared.routes;
        routes.table().refusing = true;
        let mut detached = routes.detached.subscribe();
        let _ = tokio::time::timeout(DETACHED_GRACE, detached.wait_for(|n| *n == 0)).await;
        let _ = self.shared.writer.send(WriterCmd::Close);
        let mut ended = routes.ended.subscribe();
        if tokio::time::timeout(CLOSE_ECHO_WAIT, ended.wait_for(|e| *e))
            .await
            .is_err()
        {
            // No echo: stop reading; the routes end here instead.
            self.shared.reader.abort();
            routes.end();
        }
        std::mem::take(&mut routes.table().report)
    }

    fn send(&self, op: Op, pending: Pending) -> Result<u64, ClientError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = serde_json::to_string(&Request::new(id.to_string(), op))
            .map_err(ClientError::Encode)?;
        // Registered before the frame is queued, so no answer can arrive unrouted.
        self.shared.routes.register(id, pending)?;
        if self.shared.writer.send(WriterCmd::Frame(frame)).is_err() {
            self.shared.routes.forget(id);
            return Err(ClientError::Closed);
        }
        Ok(id)
    }

    async fn call(&self, op: Op) -> Result<ResponseKind, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.send(op, Pending::Once(tx))?;
        let resp = rx.await.map_err(|_| ClientError::Closed)??;
        match resp.kind() {
            ResponseKind::Error => Err(ClientError::Remote {
                message: decode_error(&resp.error),
            }),
            kind => Ok(kind),
        }
    }
}

/// The service JSON-encodes error texts (sdk-rust parses them as JSON); the Go reference sends
/// them plain. Accept both.
fn decode_error(error: &str) -> String {
    serde_json::from_str::<String>(error).unwrap_or_else(|_| error.to_owned())
}

/// The items of one subscription, each as the JSON text that was published
/// (`futures::Stream<Item = Result<String, ClientError>>`).
///
/// An error from the service is yielded once and ends the stream; the stream also ends when the
/// connection does.
pub struct Subscription {
    id: u64,
    rx: mpsc::UnboundedReceiver<Result<String, ClientError>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next item's JSON text; `None` when the subscription ended.
    pub async fn next_text(&mut self) -> Option<Result<String, ClientError>> {
        self.rx.recv().await
    }

    /// The next item parsed as a JSON value; an item that is not JSON is an
    /// [`ClientError::Unexpected`] error (the service keeps payloads verbatim, so it never
    /// sends one).
    pub async fn next_value(&mut self) -> Option<Result<Value, ClientError>> {
        let text = self.next_text().await?;
        Some(text.and_then(|t| {
            serde_json::from_str(&t).map_err(|_| ClientError::Unexpected {
                op: "subscribe",
                kind: ResponseKind::Item,
            })
        }))
    }
}

impl Stream for Subscription {
    type Item = Result<String, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Only a subscription still routed is live on the server; cancel it there.
        if self.shared.routes.forget(self.id).is_some()
            && let Ok(frame) = serde_json::to_string(&Request::cancel(self.id.to_string()))
        {
            let _ = self.shared.writer.send(WriterCmd::Frame(frame));
        }
    }
}

async fn read_loop(
    mut stream: SplitStream<Ws>,
    routes: Arc<Routes>,
    mut writer_done: watch::Receiver<bool>,
) {
    // Once the writer is done (it sent close 1000, or failed), the server has CLOSE_ECHO_WAIT
    // to finish; without that bound, a server that never echoes would pin this task.
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => routes.route(t.as_bytes()),
                Some(Ok(Message::Binary(b))) => routes.route(&b),
                // tungstenite answers pings itself; a close frame is followed by the end.
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
            changed = writer_done.wait_for(|w| *w), if deadline.is_none() => {
                // An error means the writer is gone without saying so; same thing.
                let _ = changed;
                deadline = Some(tokio::time::Instant::now() + CLOSE_ECHO_WAIT);
            }
            () = sleep_until_opt(deadline) => break,
        }
    }
    routes.end();
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn write_loop(
    mut sink: SplitSink<Ws, Message>,
    mut cmds: mpsc::UnboundedReceiver<WriterCmd>,
    writer_done: watch::Sender<bool>,
) {
    'outer: while let Some(first) = cmds.recv().await {
        let mut next = Some(first);
        let mut batch = 0;
        while let Some(cmd) = next {
            match cmd {
                WriterCmd::Frame(text) => {
                    if sink.feed(Message::text(text)).await.is_err() {
                        break 'outer;
                    }
                }
                WriterCmd::Close => break 'outer,
            }
            batch += 1;
            next = if batch < WRITE_BATCH {
                cmds.try_recv().ok()
            } else {
                None
            };
        }
        if sink.flush().await.is_err() {
            break;
        }
    }
    // Closed by `close`, by every handle going away, or by a failed write (then this fails too).
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    let _ = sink.send(Message::Close(Some(frame))).await;
    writer_done.send_replace(true);
}
