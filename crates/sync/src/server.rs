//! The websocket driver: accepts connections and shuttles frames between them and the service.
//!
//! Compatibility decisions (see the sync protocol reference, traps T4-T9, T18):
//! - any path, any `Host`/`Origin`, no subprotocol, no permessage-deflate (tungstenite never
//!   negotiates it, so sdk-go falls back to plain frames);
//! - requests as text or binary frames, with or without a trailing newline; responses as text;
//! - messages up to `SyncLimits::max_message_bytes` (65 MiB by default); no idle or write
//!   timeouts on an identified connection;
//! - a close frame is echoed at once (sdk-go panics after success if it is not); EOF without a
//!   close frame is an ordinary disconnect (sdk-rust never sends one);
//! - bad frames are logged and ignored, and only ever affect their own connection.
//!
//! Each connection has a reader (its own task) that never waits on writes, and one writer task
//! fed by the connection's unbounded outgoing queue.
//!
//! Bounds (see [`SyncLimits`]): a connection is unidentified until its first request that names
//! a key, which binds it to that key's run if the run has fewer than `max_connections_per_run`
//! connections (else the request gets an error and the connection stays unidentified). Of the
//! unidentified connections, handshake or not, at most `max_unidentified_connections` are kept:
//! a new one closes the oldest. Accept errors (EMFILE) never end the accept loop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tg_api::sync::Request;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as HttpRequest, Response as HttpResponse,
};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

use tg_api::sync::RunKeys;

use crate::admission::Ticket;
use crate::core::{ConnId, Outgoing};
use crate::limits::SyncLimits;
use crate::service::{ConnHandle, SyncService};

/// Largest request message read under the default [`SyncLimits`] (the reference's 32 KiB broke
/// big publishes): the default largest payload plus room for its envelope.
pub const MAX_MESSAGE_SIZE: usize = (64 << 20) + SyncLimits::ENVELOPE_SLACK;

/// Go clients cannot read a message larger than this (nhooyr's default read limit).
const GO_READ_LIMIT: usize = 32768;

/// Bytes read from a socket at a time.
const READ_BUFFER: usize = 8 << 10;

/// How many queued replies the writer hands to the socket before flushing.
const WRITE_BATCH: usize = 256;

/// How long the accept loop pauses after an accept error (typically EMFILE), instead of
/// spinning on it; connections that end meanwhile free descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Raises this process's soft limit of open files to its hard limit, once; returns the soft limit
/// in force. Every connection costs a descriptor, so the default soft limit (often 1,024) would
/// cap the service far below its own limits. Called by [`serve`].
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    static RAISED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *RAISED.get_or_init(|| match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(error) => {
                tracing::warn!(%error, soft, hard, "cannot raise the open file limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(error) => {
            tracing::warn!(%error, "cannot read the open file limit");
            0
        }
    })
}

/// Serves the sync protocol on `listener` until `shutdown` resolves, under the service's
/// [`SyncLimits`] (see [`SyncService::spawn_with`]).
///
/// On shutdown the listener stops accepting; connections already open keep being served until
/// their clients leave, because closing a live client kills it (trap T9).
pub async fn serve(
    listener: TcpListener,
    service: SyncService,
    shutdown: impl Future<Output = ()>,
) {
    let fds = raise_fd_limit();
    let limits = service.limits();
    if fds > 0 && (fds as usize) < limits.max_unidentified_connections {
        tracing::warn!(
            fds,
            max_unidentified_connections = limits.max_unidentified_connections,
            "the open file limit is below the sync service's max_unidentified_connections: idle              sockets can exhaust it"
        );
    }
    let config = ws_config(limits);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Admitted here, before the handshake: sockets that never complete one
                    // count as unidentified too.
                    let ticket = service.admission().enter();
                    tokio::spawn(connection(stream, peer, service.clone(), ticket, config));
                }
                Err(error) => {
                    // Typically EMFILE: back off briefly instead of spinning on the error.
                    tracing::warn!(%error, "sync service accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
}

fn ws_config(limits: &SyncLimits) -> WebSocketConfig {
    // A small read buffer: the tungstenite default (128 KiB) costs 1.3 GB at 10k connections,
    // and requests are small; large ones simply take more reads. A message over the maximum
    // ends its connection (its request id is not even read, so it cannot be answered); a
    // payload over the limit inside a readable message gets an error answer instead.
    let max = limits.max_message_bytes();
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    service: SyncService,
    mut ticket: Ticket,
    config: WebSocketConfig,
) {
    let _ = stream.set_nodelay(true);
    let is_go = Arc::new(AtomicBool::new(false));
    let is_go_cb = Arc::clone(&is_go);
    // The callback only looks: no subprotocol or extension is ever added to the 101 answer.
    // Its error type is fixed by tungstenite's `Callback` trait.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &HttpRequest, resp: HttpResponse| {
        let go = req
            .headers()
            .get("user-agent")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ua| ua.starts_with("Go-http-client"));
        is_go_cb.store(go, Ordering::Relaxed);
        Ok(resp)
    };
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config));
    let ws = tokio::select! {
        accepted = handshake => match accepted {
            Ok(ws) => ws,
            Err(error) => {
                tracing::debug!(%peer, %error, "websocket handshake failed");
                return;
            }
        },
        () = ticket.evicted() => {
            tracing::debug!(%peer, "closing a connection that never completed its handshake");
            return;
        }
    };
    let (sink, stream) = ws.split();
    let (handle, rx) = service.open();
    let conn = handle.id();
    tracing::debug!(%peer, conn, "sync connection opened");
    let (done_tx, done_rx) = oneshot::channel();
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        done_rx,
        conn,
        is_go.load(Ordering::Relaxed),
    ));
    let evicted = read_loop(stream, &handle, &mut ticket).await;
    drop(handle);
    let _ = done_tx.send(evicted);
    let _ = writer.await;
    tracing::debug!(%peer, conn, "sync connection closed");
}

/// Reads until the peer leaves; returns `true` if the connection is closed instead for being
/// the oldest one that has sent no request.
async fn read_loop(
    mut stream: SplitStream<WebSocketStream<TcpStream>>,
    handle: &ConnHandle,
    ticket: &mut Ticket,
) -> bool {
    loop {
        let msg = tokio::select! {
            msg = stream.next() => msg,
            () = ticket.evicted() => {
                tracing::debug!(conn = handle.id(), "closing a connection that sent no request");
                return true;
            }
        };
        let Some(msg) = msg else { break };
        match msg {
            Ok(Message::Text(text)) => on_frame(handle, ticket, text.as_bytes()),
            Ok(Message::Binary(bytes)) => on_frame(handle, ticket, &bytes),
            // Keep polling: the next read flushes tungstenite's close echo and then ends.
            Ok(Message::Close(_)) => {}
            // tungstenite answers pings itself.
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
            Err(error) => {
                tracing::debug!(conn = handle.id(), %error, "sync connection read ended");
                break;
            }
        }
    }
    false
}

fn on_frame(handle: &ConnHandle, ticket: &mut Ticket, bytes: &[u8]) {
    match serde_json::from_slice::<Request>(bytes) {
        // As the reference does: no operation, no answer.
        Ok(req) if !req.is_cancel && !req.has_op() => {
            tracing::debug!(conn = handle.id(), id = %req.id, "request names no operation; ignored");
        }
        Ok(req) => {
            if !ticket.is_identified()
                && !req.is_cancel
                && let Some(key) = req.key()
                && let Err(hit) = ticket.identify(RunKeys::run_of(key).unwrap_or(""))
            {
                handle.reject(req.id, hit);
                return;
            }
            handle.send(req);
        }
        Err(error) => {
            let preview = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]);
            tracing::warn!(
                conn = handle.id(),
                %error,
                len = bytes.len(),
                %preview,
                "ignoring malformed sync request"
            );
        }
    }
}

type WsSink = SplitSink<WebSocketStream<TcpStream>, Message>;

async fn write_loop(
    mut sink: WsSink,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    done: oneshot::Receiver<bool>,
    conn: ConnId,
    is_go: bool,
) {
    let work = async {
        let mut warned = false;
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            let mut batch = 0;
            while let Some(o) = next {
                let text = o.encode();
                if is_go && !warned && text.len() > GO_READ_LIMIT {
                    warned = true;
                    tracing::warn!(
                        conn,
                        len = text.len(),
                        "response exceeds the 32768-byte read limit of Go clients; the client will likely die"
                    );
                }
                if let Err(error) = sink.feed(Message::text(text)).await {
                    tracing::debug!(conn, %error, "sync connection write failed");
                    return;
                }
                batch += 1;
                next = if batch < WRITE_BATCH {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            if let Err(error) = sink.flush().await {
                tracing::debug!(conn, %error, "sync connection flush failed");
                return;
            }
        }
    };
    tokio::select! {
        biased;
        evicted = done => {
            if evicted.unwrap_or(false) {
                // Say why (1008, policy): the peer can tell this from a crash of the service.
                let frame = CloseFrame {
                    code: CloseCode::Policy,
                    reason: "sync limit max_unidentified_connections: closed the oldest \
                             connection that sent no request"
                        .into(),
                };
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    sink.send(Message::Close(Some(frame))),
                )
                .await;
            }
        }
        () = work => {}
    }
    // The reader has ended (close frame or EOF): flush a pending close echo and let go. Bounded,
    // because a peer that stopped reading must not pin this task.
    let _ = tokio::time::timeout(Duration::from_secs(5), sink.close()).await;
}
