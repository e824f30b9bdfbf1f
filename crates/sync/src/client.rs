//! A small async client for the sync protocol, used by tests, the benchmark and the daemon.
//!
//! One websocket per [`Client`]; clones share it. Requests are pipelined: every call takes the
//! next numeric id (`"0"`, `"1"`, ... as the official SDKs do), is registered with the reader
//! task before its frame is queued for the writer task, and awaits its own response.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::{SinkExt, Stream, StreamExt};
use serde_json::Value;
use serde_json::value::RawValue;
use tg_api::sync::{
    BarrierRequest, Op, PublishRequest, Request, Response, ResponseKind, SignalEntryRequest,
    SubscribeRequest,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::protocol::{
    CloseFrame, WebSocketConfig, frame::coding::CloseCode,
};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::server::{MAX_MESSAGE_SIZE, READ_BUFFER};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to sync service at {url}")]
    Connect {
        url: String,
        #[source]
        source: tungstenite::Error,
    },
    #[error("sync service connection closed")]
    Closed,
    #[error("sync service error: {message}")]
    Remote { message: String },
    #[error("sync service sent an unexpected {kind:?} response to {op}")]
    Unexpected {
        op: &'static str,
        kind: ResponseKind,
    },
    #[error("cannot encode payload")]
    Encode(#[source] serde_json::Error),
}

enum Pending {
    Once(oneshot::Sender<Response>),
    Stream(mpsc::UnboundedSender<Response>),
}

enum ReaderCmd {
    Register(u64, Pending),
    Forget(u64),
}

enum WriterCmd {
    Frame(String),
    Close,
}

struct Inner {
    reader: mpsc::UnboundedSender<ReaderCmd>,
    writer: mpsc::UnboundedSender<WriterCmd>,
    next_id: AtomicU64,
    closed: watch::Receiver<bool>,
}

/// A connection to a sync service. Cheap to clone; all clones share one socket.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `url` (e.g. `ws://127.0.0.1:5050`).
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
        let (reader_tx, reader_rx) = mpsc::unbounded_channel();
        let (writer_tx, writer_rx) = mpsc::unbounded_channel();
        let (closed_tx, closed_rx) = watch::channel(false);
        tokio::spawn(read_loop(stream, reader_rx, closed_tx));
        tokio::spawn(write_loop(sink, writer_rx));
        Ok(Client {
            inner: Arc::new(Inner {
                reader: reader_tx,
                writer: writer_tx,
                next_id: AtomicU64::new(0),
                closed: closed_rx,
            }),
        })
    }

    /// Publishes `payload` to `topic`; returns its sequence number in the topic.
    pub async fn publish(&self, topic: &str, payload: &Value) -> Result<u64, ClientError> {
        let raw = serde_json::value::to_raw_value(payload).map_err(ClientError::Encode)?;
        self.publish_raw(topic, raw).await
    }

    /// Publishes JSON text as is.
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

    /// Waits until `state` has been signalled `target` times.
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

    /// Subscribes to `topic`: every item from the first, then live ones. Dropping the
    /// subscription cancels it on the server.
    pub fn subscribe(&self, topic: &str) -> Result<ClientSubscription, ClientError> {
        let id = self.next_id();
        let (tx, rx) = mpsc::unbounded_channel();
        self.register(id, Pending::Stream(tx))?;
        let req = Request::new(
            id.to_string(),
            Op::Subscribe(SubscribeRequest {
                topic: topic.to_owned(),
            }),
        );
        self.send(&req)?;
        Ok(ClientSubscription {
            id,
            rx,
            inner: Arc::clone(&self.inner),
        })
    }

    /// Sends close 1000 and waits for the server's close echo (or the connection's end).
    pub async fn close(&self) -> Result<(), ClientError> {
        let _ = self.inner.writer.send(WriterCmd::Close);
        let mut closed = self.inner.closed.clone();
        let _ = closed.wait_for(|c| *c).await;
        Ok(())
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn register(&self, id: u64, pending: Pending) -> Result<(), ClientError> {
        self.inner
            .reader
            .send(ReaderCmd::Register(id, pending))
            .map_err(|_| ClientError::Closed)
    }

    fn send(&self, req: &Request) -> Result<(), ClientError> {
        let text = serde_json::to_string(req).map_err(ClientError::Encode)?;
        self.inner
            .writer
            .send(WriterCmd::Frame(text))
            .map_err(|_| ClientError::Closed)
    }

    async fn call(&self, op: Op) -> Result<ResponseKind, ClientError> {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        self.register(id, Pending::Once(tx))?;
        self.send(&Request::new(id.to_string(), op))?;
        let resp = rx.await.map_err(|_| ClientError::Closed)?;
        match resp.kind() {
            ResponseKind::Error => Err(ClientError::Remote {
                message: decode_error(&resp.error),
            }),
            kind => Ok(kind),
        }
    }
}

fn decode_error(error: &str) -> String {
    serde_json::from_str::<String>(error).unwrap_or_else(|_| error.to_owned())
}

/// The items of one subscription, as parsed JSON values.
#[derive(Debug)]
pub struct ClientSubscription {
    id: u64,
    rx: mpsc::UnboundedReceiver<Response>,
    inner: Arc<Inner>,
}

impl Stream for ClientSubscription {
    type Item = Value;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Value>> {
        let this = self.get_mut();
        loop {
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(resp)) => match resp.kind() {
                    ResponseKind::Item => match serde_json::from_str(&resp.subscribe) {
                        Ok(v) => return Poll::Ready(Some(v)),
                        Err(error) => {
                            tracing::warn!(%error, "skipping undecodable subscription item");
                        }
                    },
                    // An error ends a subscription; nothing follows it for this id.
                    _ => {
                        this.rx.close();
                        return Poll::Ready(None);
                    }
                },
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for ClientSubscription {
    fn drop(&mut self) {
        let _ = self.inner.reader.send(ReaderCmd::Forget(self.id));
        if let Ok(text) = serde_json::to_string(&Request::cancel(self.id.to_string())) {
            let _ = self.inner.writer.send(WriterCmd::Frame(text));
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").finish_non_exhaustive()
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn read_loop(
    mut stream: futures::stream::SplitStream<WsStream>,
    mut cmds: mpsc::UnboundedReceiver<ReaderCmd>,
    closed: watch::Sender<bool>,
) {
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    loop {
        tokio::select! {
            // Registrations first: a request is registered before its frame is even queued, so
            // draining them first means no response can beat its registration.
            biased;
            cmd = cmds.recv() => match cmd {
                Some(ReaderCmd::Register(id, p)) => { pending.insert(id, p); }
                Some(ReaderCmd::Forget(id)) => { pending.remove(&id); }
                None => break,
            },
            msg = stream.next() => {
                let bytes = match msg {
                    Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
                    Some(Ok(Message::Binary(b))) => b.to_vec(),
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => {
                        tracing::debug!(%error, "sync client read ended");
                        break;
                    }
                    None => break,
                };
                dispatch(&mut pending, &bytes);
            }
        }
    }
    let _ = closed.send(true);
}

fn dispatch(pending: &mut HashMap<u64, Pending>, bytes: &[u8]) {
    let resp: Response = match serde_json::from_slice(bytes) {
        Ok(r) => r,
        Err(error) => {
            tracing::warn!(%error, "sync client ignoring undecodable response");
            return;
        }
    };
    let Ok(id) = resp.id.parse::<u64>() else {
        tracing::warn!(id = %resp.id, "sync client ignoring response with a non-numeric id");
        return;
    };
    match pending.get(&id) {
        Some(Pending::Once(_)) => {
            if let Some(Pending::Once(tx)) = pending.remove(&id) {
                let _ = tx.send(resp);
            }
        }
        Some(Pending::Stream(tx)) => {
            let ends = resp.kind() == ResponseKind::Error;
            if tx.send(resp).is_err() || ends {
                pending.remove(&id);
            }
        }
        None => tracing::debug!(id, "sync client ignoring response to an unknown id"),
    }
}

async fn write_loop(
    mut sink: futures::stream::SplitSink<WsStream, Message>,
    mut cmds: mpsc::UnboundedReceiver<WriterCmd>,
) {
    while let Some(first) = cmds.recv().await {
        let mut next = Some(first);
        while let Some(cmd) = next {
            match cmd {
                WriterCmd::Frame(text) => {
                    if sink.feed(Message::binary(text.into_bytes())).await.is_err() {
                        return;
                    }
                }
                WriterCmd::Close => {
                    let frame = CloseFrame {
                        code: CloseCode::Normal,
                        reason: "".into(),
                    };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    return;
                }
            }
            next = cmds.try_recv().ok();
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}
