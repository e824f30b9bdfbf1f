//! [`SyncClient`]: the sync service client of a test instance.
//!
//! One background task owns the websocket. Calls take the next numeric id (`"0"`, `"1"`, ...,
//! as both official SDKs do), hand the task the frame and where its answer goes, and await it;
//! requests are therefore pipelined and a long barrier never blocks a publish. Names are
//! namespaced as sdk-go does: `run:<run>:plan:<plan>:case:<case>:states:<s>`, `...:topics:<t>`
//! and `...:run_events`.
//!
//! Events published from synchronous code (success, failure, crash) are "detached": nobody
//! awaits them, so [`SyncClient::close`] waits (briefly) for their acknowledgements before it
//! closes the socket, else the last event of a run could be lost.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{SinkExt, Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tg_api::events::Event;
use tg_api::sync::{
    BarrierRequest, Op, PublishRequest, Request, Response, ResponseKind, SignalEntryRequest,
    SubscribeRequest,
};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// How long `close` waits for detached publishes to be acknowledged.
const DETACHED_GRACE: Duration = Duration::from_secs(5);
/// How long `close` waits for the server to echo the close frame.
const CLOSE_ECHO_WAIT: Duration = Duration::from_secs(2);

/// A sync operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot connect to the sync service at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tokio_tungstenite::tungstenite::Error,
    },
    #[error("the sync service connection is closed")]
    Closed,
    #[error("sync service error: {0}")]
    Remote(String),
    #[error("the sync service sent an unexpected {kind:?} answer to {op}")]
    Unexpected {
        op: &'static str,
        kind: ResponseKind,
    },
    #[error("cannot encode the payload: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("cannot decode a subscription item: {0}")]
    Decode(#[source] serde_json::Error),
}

enum Pending {
    Once(oneshot::Sender<Result<Response, SyncError>>),
    /// Nobody awaits the answer; `close` waits for these.
    Detached,
    Stream(mpsc::UnboundedSender<Result<String, SyncError>>),
}

enum Cmd {
    Send {
        id: u64,
        frame: String,
        pending: Pending,
    },
    Cancel(u64),
    Close(oneshot::Sender<()>),
}

struct Inner {
    cmd: mpsc::UnboundedSender<Cmd>,
    next_id: AtomicU64,
    prefix: String,
}

/// A connection to the sync service, scoped to one run, plan and case. Cheap to clone; clones
/// share the socket.
#[derive(Clone)]
pub struct SyncClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SyncClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncClient")
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl SyncClient {
    /// Connects to `url` (`ws://host:port`); every key is prefixed with `prefix`
    /// (`run:<run>:plan:<plan>:case:<case>`, see [`crate::RunParams::sync_prefix`]).
    /// Must be called within a tokio runtime.
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<SyncClient, SyncError> {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|source| SyncError::Connect {
                url: url.to_owned(),
                source,
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(background(ws, rx));
        Ok(SyncClient {
            inner: Arc::new(Inner {
                cmd: tx,
                next_id: AtomicU64::new(0),
                prefix: prefix.into(),
            }),
        })
    }

    /// The full key of state `name`.
    pub fn state_key(&self, name: &str) -> String {
        format!("{}:states:{name}", self.inner.prefix)
    }

    /// The full key of topic `name`.
    pub fn topic_key(&self, name: &str) -> String {
        format!("{}:topics:{name}", self.inner.prefix)
    }

    /// The key of the run's event topic.
    pub fn events_key(&self) -> String {
        format!("{}:run_events", self.inner.prefix)
    }

    fn send(&self, op: Op, pending: Pending) -> Result<u64, SyncError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame =
            serde_json::to_string(&Request::new(id.to_string(), op)).map_err(SyncError::Encode)?;
        self.inner
            .cmd
            .send(Cmd::Send { id, frame, pending })
            .map_err(|_| SyncError::Closed)?;
        Ok(id)
    }

    async fn call(&self, op: Op) -> Result<Response, SyncError> {
        let (tx, rx) = oneshot::channel();
        self.send(op, Pending::Once(tx))?;
        let resp = rx.await.map_err(|_| SyncError::Closed)??;
        if resp.kind() == ResponseKind::Error {
            return Err(SyncError::Remote(decode_error(&resp.error)));
        }
        Ok(resp)
    }

    /// Increments state `name` and returns its new value (1 for the first signaller).
    pub async fn signal_entry(&self, state: &str) -> Result<u64, SyncError> {
        let op = Op::SignalEntry(SignalEntryRequest {
            state: self.state_key(state),
        });
        match self.call(op).await?.kind() {
            ResponseKind::Signalled(seq) => Ok(seq),
            kind => Err(SyncError::Unexpected {
                op: "signal_entry",
                kind,
            }),
        }
    }

    /// Waits until state `name` reaches `target`. A target `<= 0` returns at once without a
    /// request, as in sdk-go.
    pub async fn barrier(&self, state: &str, target: i64) -> Result<(), SyncError> {
        if target <= 0 {
            return Ok(());
        }
        let op = Op::Barrier(BarrierRequest {
            state: self.state_key(state),
            target,
        });
        match self.call(op).await?.kind() {
            ResponseKind::BarrierReached => Ok(()),
            kind => Err(SyncError::Unexpected {
                op: "barrier",
                kind,
            }),
        }
    }

    /// Signals `state`, then waits for it to reach `target`; returns this instance's sequence.
    pub async fn signal_and_wait(&self, state: &str, target: i64) -> Result<u64, SyncError> {
        let seq = self.signal_entry(state).await?;
        self.barrier(state, target).await?;
        Ok(seq)
    }

    /// Publishes `payload` on topic `name`; returns its 1-based position in the topic.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        payload: &T,
    ) -> Result<u64, SyncError> {
        self.publish_raw(self.topic_key(topic), payload).await
    }

    async fn publish_raw<T: Serialize + ?Sized>(
        &self,
        key: String,
        payload: &T,
    ) -> Result<u64, SyncError> {
        let payload = serde_json::value::to_raw_value(payload).map_err(SyncError::Encode)?;
        let op = Op::Publish(PublishRequest {
            topic: key,
            payload,
        });
        match self.call(op).await?.kind() {
            ResponseKind::Published(seq) => Ok(seq),
            kind => Err(SyncError::Unexpected {
                op: "publish",
                kind,
            }),
        }
    }

    /// Subscribes to topic `name`: a stream of every item ever published there, from the first,
    /// then live ones. Dropping the stream cancels the subscription.
    pub fn subscribe<T: DeserializeOwned>(
        &self,
        topic: &str,
    ) -> Result<Subscription<T>, SyncError> {
        self.subscribe_key(self.topic_key(topic))
    }

    /// Subscribes to the run's `run_events` topic.
    pub fn subscribe_events(&self) -> Result<Subscription<Event>, SyncError> {
        self.subscribe_key(self.events_key())
    }

    fn subscribe_key<T: DeserializeOwned>(
        &self,
        key: String,
    ) -> Result<Subscription<T>, SyncError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.send(
            Op::Subscribe(SubscribeRequest { topic: key }),
            Pending::Stream(tx),
        )?;
        Ok(Subscription {
            id,
            rx,
            cmd: self.inner.cmd.clone(),
            _item: PhantomData,
        })
    }

    /// Publishes `payload` on `topic` and subscribes to it; the stream includes `payload`.
    pub async fn publish_subscribe<T: Serialize + DeserializeOwned>(
        &self,
        topic: &str,
        payload: &T,
    ) -> Result<(u64, Subscription<T>), SyncError> {
        let seq = self.publish(topic, payload).await?;
        let sub = self.subscribe(topic)?;
        Ok((seq, sub))
    }

    /// Publishes a lifecycle event to the run's `run_events` topic.
    pub async fn publish_event(&self, event: &Event) -> Result<u64, SyncError> {
        self.publish_raw(self.events_key(), event).await
    }

    /// Publishes an event without waiting for the answer; [`SyncClient::close`] waits for it.
    pub(crate) fn publish_event_detached(&self, event: &Event) -> Result<(), SyncError> {
        let payload = serde_json::value::to_raw_value(event).map_err(SyncError::Encode)?;
        let op = Op::Publish(PublishRequest {
            topic: self.events_key(),
            payload,
        });
        self.send(op, Pending::Detached).map(drop)
    }

    /// Waits for detached publishes (at most 5 s), sends close 1000 and waits up to 2 s for the
    /// server's echo. Calls still pending afterwards fail with [`SyncError::Closed`].
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.cmd.send(Cmd::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// A stream of subscription items (`futures::Stream<Item = Result<T, SyncError>>`).
///
/// An item that does not decode as `T` is yielded as [`SyncError::Decode`] and the stream goes
/// on; an error from the service ends it.
pub struct Subscription<T> {
    id: u64,
    rx: mpsc::UnboundedReceiver<Result<String, SyncError>>,
    cmd: mpsc::UnboundedSender<Cmd>,
    _item: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Subscription<T> {
    /// The next item; `None` when the subscription ended (connection closed or service error
    /// already yielded).
    pub async fn next(&mut self) -> Option<Result<T, SyncError>> {
        StreamExt::next(self).await
    }
}

impl<T: DeserializeOwned> Stream for Subscription<T> {
    type Item = Result<T, SyncError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Every field is Unpin, so the subscription is too.
        let this = self.get_mut();
        this.rx.poll_recv(cx).map(|item| {
            item.map(|r| r.and_then(|text| serde_json::from_str(&text).map_err(SyncError::Decode)))
        })
    }
}

impl<T> Drop for Subscription<T> {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::Cancel(self.id));
    }
}

/// sdk-rust sends errors JSON-encoded (`"\"boom\""`), sdk-go's server plain: accept both.
fn decode_error(s: &str) -> String {
    serde_json::from_str::<String>(s).unwrap_or_else(|_| s.to_owned())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Owns the socket: writes frames in command order, routes answers by id.
async fn background(ws: Ws, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let (mut sink, mut stream) = ws.split();
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut closing: Option<(oneshot::Sender<()>, tokio::time::Instant)> = None;
    // `true` when the server is gone, so there is nobody to close with.
    let mut dead = false;

    loop {
        if closing.is_some() && !pending.values().any(|p| matches!(p, Pending::Detached)) {
            break;
        }
        let deadline = closing.as_ref().map(|(_, d)| *d);
        tokio::select! {
            cmd = rx.recv(), if closing.is_none() => match cmd {
                // Every handle is gone: nobody can ask for anything any more.
                None => break,
                Some(Cmd::Send { id, frame, pending: p }) => {
                    pending.insert(id, p);
                    if sink.send(Message::text(frame)).await.is_err() {
                        dead = true;
                        break;
                    }
                }
                Some(Cmd::Cancel(id)) => {
                    if pending.remove(&id).is_some() {
                        let frame = serde_json::to_string(&Request::cancel(id.to_string()))
                            .unwrap_or_default();
                        if sink.send(Message::text(frame)).await.is_err() {
                            dead = true;
                            break;
                        }
                    }
                }
                Some(Cmd::Close(tx)) => {
                    closing = Some((tx, tokio::time::Instant::now() + DETACHED_GRACE));
                }
            },
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => route(&mut pending, t.as_bytes(), &mut sink).await,
                Some(Ok(Message::Binary(b))) => route(&mut pending, &b, &mut sink).await,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    dead = true;
                    break;
                }
                // Pings are answered by tungstenite itself.
                Some(Ok(_)) => {}
            },
            () = sleep_until_opt(deadline) => break,
        }
    }

    if !dead {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        if sink.send(Message::Close(Some(frame))).await.is_ok() {
            let _ = tokio::time::timeout(CLOSE_ECHO_WAIT, async {
                while let Some(Ok(m)) = stream.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    }
    for (_, p) in pending.drain() {
        match p {
            Pending::Once(tx) => {
                let _ = tx.send(Err(SyncError::Closed));
            }
            Pending::Stream(tx) => drop(tx),
            Pending::Detached => eprintln!("tg-sdk: an event was not acknowledged before close"),
        }
    }
    if let Some((tx, _)) = closing {
        let _ = tx.send(());
    }
    // Later commands (and their answer channels) are dropped with `rx`: callers see `Closed`.
    rx.close();
    while let Some(cmd) = rx.recv().await {
        if let Cmd::Close(tx) = cmd {
            let _ = tx.send(());
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn route(
    pending: &mut HashMap<u64, Pending>,
    bytes: &[u8],
    sink: &mut futures::stream::SplitSink<Ws, Message>,
) {
    let Ok(resp) = serde_json::from_slice::<Response>(bytes) else {
        eprintln!("tg-sdk: ignoring an unreadable sync service message");
        return;
    };
    // Unknown or non-numeric ids (keepalives, answers to cancelled requests) are ignored.
    let Ok(id) = resp.id.parse::<u64>() else {
        return;
    };
    let Some(p) = pending.get(&id) else {
        return;
    };
    match p {
        Pending::Once(_) => {
            if let Some(Pending::Once(tx)) = pending.remove(&id) {
                let _ = tx.send(Ok(resp));
            }
        }
        Pending::Detached => {
            pending.remove(&id);
            if resp.kind() == ResponseKind::Error {
                eprintln!(
                    "tg-sdk: publishing an event failed: {}",
                    decode_error(&resp.error)
                );
            }
        }
        Pending::Stream(tx) => {
            let (item, end) = match resp.kind() {
                ResponseKind::Item => (Ok(resp.subscribe), false),
                ResponseKind::Error => (Err(SyncError::Remote(decode_error(&resp.error))), true),
                kind => (
                    Err(SyncError::Unexpected {
                        op: "subscribe",
                        kind,
                    }),
                    false,
                ),
            };
            let gone = tx.send(item).is_err();
            if end || gone {
                pending.remove(&id);
            }
            if gone && !end {
                // The subscriber went away: tell the server to stop sending.
                let frame =
                    serde_json::to_string(&Request::cancel(id.to_string())).unwrap_or_default();
                let _ = sink.send(Message::text(frame)).await;
            }
        }
    }
}
