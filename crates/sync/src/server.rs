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
//! Each connection is one task that reads and parses frames (the handshake and the RFC 6455
//! framing are done here, for speed; see DESIGN.md), applies everything one read brought under
//! a single lock of the core ([`SyncService::apply_batch`]), and writes the replies encoded into
//! its output buffer with one write. Replies for other connections (barrier releases,
//! subscription items) are encoded into their buffers under the same lock and written right
//! after it by the same task, without waking theirs; only a socket that cannot take more
//! (`EWOULDBLOCK`) is left to its own task, which waits for it to become writable while it keeps
//! reading (T7). Buffers are freed whenever they empty, so an idle connection holds none.
//!
//! Bounds (see [`SyncLimits`]): a connection is unidentified until its first request that names
//! a key, which binds it to that key's run if the run has fewer than `max_connections_per_run`
//! connections (else the request gets an error and the connection stays unidentified). Of the
//! unidentified connections, handshake or not, at most `max_unidentified_connections` are kept:
//! a new one closes the oldest. Accept errors (EMFILE) never end the accept loop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tg_api::sync::{Request, RunKeys};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::admission::Ticket;
use crate::core::Outgoing;
use crate::limits::SyncLimits;
use crate::pace::{FanoutPacer, Pacer};
use crate::service::{Batched, ConnHandle, SyncService};

/// Largest request message read under the default [`SyncLimits`] (the reference's 32 KiB broke
/// big publishes): the default largest payload plus room for its envelope.
pub const MAX_MESSAGE_SIZE: usize = (64 << 20) + SyncLimits::ENVELOPE_SLACK;

/// Go clients cannot read a message larger than this (nhooyr's default read limit).
const GO_READ_LIMIT: usize = 32768;

/// Room made in a connection's input buffer before a read. Freed when the buffer empties.
const READ_CHUNK: usize = 64 << 10;

/// Reads per wake-up before the task goes back to the scheduler (a fast sender must not
/// starve the other connections of a worker thread).
const READS_PER_WAKE: usize = 8;

/// Largest HTTP upgrade request accepted.
const MAX_HANDSHAKE: usize = 16 << 10;

/// Initial size of an output buffer when a reply arrives for an idle connection: one reply
/// fits; a batch grows it. (4 KiB here cost 40 MB of fresh pages on a 10,000-waiter release.)
const WRITE_CHUNK: usize = 256;

/// A batch whose replies go to more connections than this has its writes shared out among the
/// runtime's workers (a 10,000-waiter release is 10,000 socket writes).
const FANOUT_SPLIT: usize = 64;

/// How long a connection that ends may take to flush what is queued for it (a close echo, an
/// eviction notice), so a peer that stopped reading cannot pin its task.
const LINGER: Duration = Duration::from_secs(5);

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
    let max_message = limits.max_message_bytes();
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
                    tokio::spawn(connection(stream, peer, service.clone(), ticket, max_message));
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

/// A websocket's socket and output side, shared by its own task and by any task that has
/// replies for it.
pub(crate) struct NetConn {
    stream: TcpStream,
    out: Mutex<Output>,
    /// Wakes the connection's task when a write by another task hit `EWOULDBLOCK`.
    wake: Notify,
    /// The handshake came from a Go client (32 KiB read limit, trap T6).
    is_go: bool,
    warned_go: AtomicBool,
}

#[derive(Default)]
struct Output {
    /// Encoded frames; `buf[sent..]` is not written yet.
    buf: Vec<u8>,
    sent: usize,
    /// The socket would block: only the connection's task writes, once it is writable.
    blocked: bool,
    /// A write failed: the peer is gone and output is dropped.
    failed: bool,
}

impl NetConn {
    fn output(&self) -> MutexGuard<'_, Output> {
        // Every update leaves the buffer consistent: a poisoned lock is still usable.
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Encodes `o` as a text frame into the output buffer. Returns `true` if the buffer was
    /// empty, i.e. the caller must [`NetConn::flush`] it (a non-empty buffer already has a
    /// flush pending, or is blocked and left to the connection's task).
    pub(crate) fn push(&self, o: &Outgoing) -> bool {
        let mut out = self.output();
        if out.failed {
            return false;
        }
        let was_empty = out.buf.is_empty();
        if out.buf.capacity() == 0 {
            out.buf.reserve(WRITE_CHUNK);
        }
        let len = push_frame(&mut out.buf, OP_TEXT, |b| o.encode_into(b));
        if self.is_go && len > GO_READ_LIMIT && !self.warned_go.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                conn = o.conn,
                len,
                "response exceeds the 32768-byte read limit of Go clients; the client will likely die"
            );
        }
        was_empty
    }

    fn push_control(&self, opcode: u8, payload: &[u8]) -> bool {
        let mut out = self.output();
        if out.failed {
            return false;
        }
        let was_empty = out.buf.is_empty();
        push_frame(&mut out.buf, opcode, |b| b.extend_from_slice(payload));
        was_empty
    }

    /// Writes what the output buffer holds, without waiting: on `EWOULDBLOCK` the rest is left
    /// to the connection's task, which it wakes.
    pub(crate) fn flush(&self) {
        let mut out = self.output();
        if out.blocked || out.failed {
            return;
        }
        while out.sent < out.buf.len() {
            match self.stream.try_write(&out.buf[out.sent..]) {
                Ok(n) => out.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    out.blocked = true;
                    drop(out);
                    self.wake.notify_one();
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::debug!(%error, "sync connection write failed");
                    out.failed = true;
                    out.buf = Vec::new();
                    out.sent = 0;
                    drop(out);
                    self.wake.notify_one();
                    return;
                }
            }
        }
        // Emptied: give the memory back, so that idle connections hold no buffer.
        out.buf = Vec::new();
        out.sent = 0;
    }

    /// Whether output waits for the socket to become writable.
    fn pending(&self) -> bool {
        let out = self.output();
        out.blocked && !out.failed
    }

    /// The socket became writable: write what waits.
    fn unblock(&self) {
        self.output().blocked = false;
        self.flush();
    }

    /// Writes what is queued, waiting for the socket up to [`LINGER`].
    async fn drain(&self) {
        let _ = tokio::time::timeout(LINGER, async {
            loop {
                {
                    let out = self.output();
                    if out.failed || out.sent == out.buf.len() {
                        return;
                    }
                }
                if self.stream.writable().await.is_err() {
                    return;
                }
                self.unblock();
            }
        })
        .await;
    }
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;

/// Appends one unmasked, final frame whose payload `fill` writes; returns the payload length.
/// The payload is written in place after a 2-byte header and moved only if it turns out to
/// need a longer length field (rare: replies are ~80 bytes).
fn push_frame(buf: &mut Vec<u8>, opcode: u8, fill: impl FnOnce(&mut Vec<u8>)) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0x80 | opcode, 0]);
    fill(buf);
    let len = buf.len() - start - 2;
    if len < 126 {
        buf[start + 1] = len as u8;
    } else if len <= 0xffff {
        buf[start + 1] = 126;
        let l = (len as u16).to_be_bytes();
        buf.splice(start + 2..start + 2, l);
    } else {
        buf[start + 1] = 127;
        let l = (len as u64).to_be_bytes();
        buf.splice(start + 2..start + 2, l);
    }
    len
}

/// Connections with output collected under the lock before their writes are handed to another
/// task ([`flush_elsewhere`]).
pub(crate) const FANOUT_CHUNK: usize = 1024;

/// Writes the output of `flush` from a new task (so from another worker, when one is free),
/// paced under `pace`, the pacer of the fan-out it is part of (see [`crate::pace`]), or here
/// outside a runtime.
pub(crate) fn flush_elsewhere(flush: Vec<Arc<NetConn>>, pace: Option<FanoutPacer>) {
    if tokio::runtime::Handle::try_current().is_ok() {
        tokio::spawn(flush_paced(flush, pace, false));
    } else {
        for n in flush {
            n.flush();
        }
    }
}

/// Writes each connection's output in turn; under `pace`, before every
/// [`crate::pace::CHUNK`]th write (and the first, if `wait_first`) it waits while the host is
/// overcommitted.
async fn flush_paced(flush: Vec<Arc<NetConn>>, pace: Option<FanoutPacer>, wait_first: bool) {
    // Held from a wait until the chunk after it is written (see `FanoutPacer::turn`).
    let mut turn = None;
    for (i, n) in flush.iter().enumerate() {
        if let Some(p) = &pace
            && (i > 0 || wait_first)
            && i % crate::pace::CHUNK == 0
        {
            drop(turn.take());
            turn = p.wait_for_cpu().await;
        }
        n.flush();
    }
}

/// Writes the output of every connection in `flush`, sharing a large fan-out among the
/// runtime's workers, paced under `pace` (see [`crate::pace`]). `part_of`: the pacer of the
/// fan-out `flush` is the last part of (its other parts already being written by other
/// tasks), whose deadline and turns it shares; otherwise a large `flush` gets its own.
pub(crate) fn flush_all(
    flush: &mut Vec<Arc<NetConn>>,
    pace: Option<&Pacer>,
    part_of: Option<FanoutPacer>,
) {
    if (flush.len() > FANOUT_SPLIT || part_of.is_some())
        && let Ok(runtime) = tokio::runtime::Handle::try_current()
    {
        let pace = part_of.or_else(|| pace.map(|p| p.for_fanout(flush.len())));
        let pace = pace.as_ref();
        let workers = runtime.metrics().num_workers().max(1);
        let share = flush.len().div_ceil(workers);
        while flush.len() > share {
            let part = flush.split_off(flush.len() - share);
            tokio::spawn(flush_paced(part, pace.cloned(), false));
        }
        // Our own share here, at once while the host keeps up; from the first chunk that
        // finds it overcommitted on, from a task that can wait.
        if let Some(p) = pace {
            let mut written = 0;
            while written < flush.len() {
                if written > 0 && p.host_overloaded() {
                    tokio::spawn(flush_paced(flush.split_off(written), Some(p.clone()), true));
                    break;
                }
                let end = (written + crate::pace::CHUNK).min(flush.len());
                for n in &flush[written..end] {
                    n.flush();
                }
                written = end;
            }
            flush.clear();
            return;
        }
    }
    for n in flush.drain(..) {
        n.flush();
    }
}

/// Why a connection's loop ended.
enum End {
    /// EOF, a read error or a protocol error.
    Gone,
    /// The peer sent a close frame; the echo is queued.
    Closed,
    /// Closed for being the oldest connection that sent no request.
    Evicted,
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    service: SyncService,
    mut ticket: Ticket,
    max_message: usize,
) {
    let _ = stream.set_nodelay(true);
    let mut input = Vec::new();
    let handshake = tokio::select! {
        r = handshake(&stream, &mut input) => r,
        () = ticket.evicted() => {
            tracing::debug!(%peer, "closing a connection that never completed its handshake");
            return;
        }
    };
    let is_go = match handshake {
        Ok(is_go) => is_go,
        Err(error) => {
            tracing::debug!(%peer, %error, "websocket handshake failed");
            return;
        }
    };
    let net = Arc::new(NetConn {
        stream,
        out: Mutex::new(Output::default()),
        wake: Notify::new(),
        is_go,
        warned_go: AtomicBool::new(false),
    });
    let handle = service.open_net(Arc::clone(&net));
    let conn = handle.id();
    tracing::debug!(%peer, conn, "sync connection opened");
    let mut reader = Reader {
        input,
        message: Vec::new(),
        message_opcode: None,
        max_message,
        close_echo: Vec::new(),
    };
    let end = serve_connection(&net, &service, &handle, &mut ticket, &mut reader).await;
    drop(handle);
    if let End::Evicted = end {
        // Say why (1008, policy): the peer can tell this from a crash of the service.
        let mut payload = 1008u16.to_be_bytes().to_vec();
        payload.extend_from_slice(
            b"sync limit max_unidentified_connections: closed the oldest connection that sent no request",
        );
        net.push_control(OP_CLOSE, &payload);
        net.flush();
    }
    // Flush a close echo or replies still queued, then let go.
    net.drain().await;
    tracing::debug!(%peer, conn, "sync connection closed");
}

/// Reads the HTTP upgrade request into `input` and answers it; leaves in `input` whatever
/// followed the request (a client may pipeline frames right behind it). Returns whether the
/// client is Go's HTTP client. Accepts any path, Host and Origin; negotiates no subprotocol and
/// no extension (sdk-go then falls back to plain frames, T18; soketto refuses unsolicited
/// ones, T4).
async fn handshake(stream: &TcpStream, input: &mut Vec<u8>) -> Result<bool, String> {
    let end = loop {
        if let Some(at) = input.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if input.len() > MAX_HANDSHAKE {
            refuse(stream, "431 Request Header Fields Too Large").await;
            return Err("upgrade request too large".into());
        }
        stream.readable().await.map_err(|e| e.to_string())?;
        input.reserve(4096);
        match stream.try_read_buf(input) {
            Ok(0) => return Err("EOF during the handshake".into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.to_string()),
        }
    };
    let (key, is_go) = match parse_upgrade(&input[..end]) {
        Ok(k) => k,
        Err(e) => {
            refuse(stream, "400 Bad Request").await;
            return Err(e);
        }
    };
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    write_all(stream, answer.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    input.drain(..end);
    Ok(is_go)
}

/// Parses an upgrade request. Not inline in [`handshake`]: its header array would then live
/// in every connection's task for good (measured at 2 KiB of each idle connection).
fn parse_upgrade(head: &[u8]) -> Result<(String, bool), String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => check_upgrade(&req),
        Ok(httparse::Status::Partial) => Err("incomplete upgrade request".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// Checks an upgrade request as RFC 6455 §4.2.1 asks; returns its key and whether it came
/// from Go's HTTP client.
fn check_upgrade(req: &httparse::Request<'_, '_>) -> Result<(String, bool), String> {
    if req.method != Some("GET") || req.version != Some(1) {
        return Err("not an HTTP/1.1 GET".into());
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("connection", "upgrade") || !has_token("upgrade", "websocket") {
        return Err("not a websocket upgrade".into());
    }
    if header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err("unsupported websocket version".into());
    }
    let key = header("sec-websocket-key")
        .map(|k| k.trim().to_owned())
        .ok_or("missing Sec-WebSocket-Key")?;
    let is_go = header("user-agent").is_some_and(|ua| ua.starts_with("Go-http-client"));
    Ok((key, is_go))
}

async fn refuse(stream: &TcpStream, status: &str) {
    let answer = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    let _ = tokio::time::timeout(LINGER, write_all(stream, answer.as_bytes())).await;
}

async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A connection's input side.
struct Reader {
    /// Bytes read and not parsed yet (at most a partial frame between reads).
    input: Vec<u8>,
    /// A fragmented message being assembled.
    message: Vec<u8>,
    message_opcode: Option<u8>,
    max_message: usize,
    /// The status code of a close frame received, to echo.
    close_echo: Vec<u8>,
}

/// What parsing the input found out of the ordinary.
enum Parsed {
    /// All complete frames consumed.
    More,
    Close,
    /// A protocol violation or an oversize message: the connection ends.
    Fatal(String),
}

async fn serve_connection(
    net: &Arc<NetConn>,
    service: &SyncService,
    handle: &ConnHandle,
    ticket: &mut Ticket,
    reader: &mut Reader,
) -> End {
    let conn = handle.id();
    let mut batch = Vec::new();
    let mut flush = Vec::new();
    // Frames pipelined behind the handshake.
    let mut ready_input = !reader.input.is_empty();
    loop {
        if ready_input {
            ready_input = false;
            let parsed = reader.parse(net, ticket, handle, &mut batch);
            // Timed for the fan-out log below (a large barrier release).
            let t0 = std::time::Instant::now();
            let part_of = if batch.is_empty() {
                None
            } else {
                service.apply_batch(conn, &mut batch, &mut flush)
            };
            let t1 = std::time::Instant::now();
            let big = flush.len();
            let end = match parsed {
                Parsed::More => None,
                Parsed::Close => Some(End::Closed),
                Parsed::Fatal(error) => {
                    tracing::debug!(conn, %error, "sync connection protocol error");
                    Some(End::Gone)
                }
            };
            if let Some(End::Closed) = end
                && net.push_control(OP_CLOSE, &reader.close_echo)
            {
                flush.push(Arc::clone(net));
            }
            flush_all(&mut flush, service.pacer(), part_of);
            if big > FANOUT_SPLIT {
                tracing::debug!(
                    conn,
                    connections = big,
                    apply = ?(t1 - t0),
                    write = ?t1.elapsed(),
                    "fan-out written"
                );
            }
            if let Some(end) = end {
                return end;
            }
        }
        let interest = if net.pending() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let ready = tokio::select! {
            biased;
            () = ticket.evicted() => {
                tracing::debug!(conn, "closing a connection that sent no request");
                return End::Evicted;
            }
            r = net.stream.ready(interest) => match r {
                Ok(r) => r,
                Err(_) => return End::Gone,
            },
            () = net.wake.notified() => continue,
        };
        if ready.is_writable() {
            net.unblock();
        }
        if ready.is_readable() || ready.is_read_closed() {
            for _ in 0..READS_PER_WAKE {
                if reader.input.capacity() - reader.input.len() < READ_CHUNK / 4 {
                    reader.input.reserve(READ_CHUNK);
                }
                match net.stream.try_read_buf(&mut reader.input) {
                    Ok(0) => {
                        // EOF without a close frame is an ordinary disconnect (sdk-rust).
                        let _ = reader.parse(net, ticket, handle, &mut batch);
                        if !batch.is_empty() {
                            let part_of = service.apply_batch(conn, &mut batch, &mut flush);
                            flush_all(&mut flush, service.pacer(), part_of);
                        }
                        return End::Gone;
                    }
                    Ok(n) => {
                        ready_input = true;
                        // A short read drained the socket: parse now rather than try again.
                        if n < READ_CHUNK / 4 {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(error) => {
                        tracing::debug!(conn, %error, "sync connection read ended");
                        return End::Gone;
                    }
                }
            }
            if !ready_input && reader.input.is_empty() {
                reader.input = Vec::new();
            }
        }
    }
}

impl Reader {
    /// Parses the complete frames in `input`: requests go to `batch` (in order), control
    /// frames are answered. Leaves a partial frame in `input`, and frees it when empty.
    fn parse(
        &mut self,
        net: &NetConn,
        ticket: &mut Ticket,
        handle: &ConnHandle,
        batch: &mut Vec<Batched>,
    ) -> Parsed {
        let mut at = 0;
        let result = loop {
            let b = &self.input[at..];
            if b.len() < 2 {
                break Parsed::More;
            }
            let (fin, rsv, opcode) = (b[0] & 0x80 != 0, b[0] & 0x70, b[0] & 0x0f);
            let masked = b[1] & 0x80 != 0;
            let (len, mut head) = match b[1] & 0x7f {
                126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as u64, 4),
                127 if b.len() >= 10 => {
                    let mut l = [0u8; 8];
                    l.copy_from_slice(&b[2..10]);
                    (u64::from_be_bytes(l), 10)
                }
                126 | 127 => break Parsed::More,
                n => (u64::from(n), 2),
            };
            if rsv != 0 {
                break Parsed::Fatal("reserved bits set (no extension was negotiated)".into());
            }
            if len > self.max_message as u64 {
                break Parsed::Fatal(format!("frame of {len} bytes over the message limit"));
            }
            let len = len as usize;
            let mask = if masked {
                if b.len() < head + 4 {
                    break Parsed::More;
                }
                let m = [b[head], b[head + 1], b[head + 2], b[head + 3]];
                head += 4;
                Some(m)
            } else {
                None
            };
            if b.len() < head + len {
                // Make room for the whole frame at once.
                let missing = head + len - b.len();
                self.input.reserve(missing);
                break Parsed::More;
            }
            let start = at + head;
            let payload = &mut self.input[start..start + len];
            if let Some(m) = mask {
                unmask(payload, m);
            }
            at = start + len;
            let payload = &self.input[start..start + len];
            match opcode {
                OP_TEXT | OP_BINARY | OP_CONTINUATION => {
                    let continues = opcode == OP_CONTINUATION;
                    if continues != self.message_opcode.is_some() {
                        break Parsed::Fatal("unexpected continuation or fragment".into());
                    }
                    if !continues && fin {
                        on_message(handle, ticket, payload, batch);
                        continue;
                    }
                    if self.message.len() + len > self.max_message {
                        break Parsed::Fatal("fragmented message over the message limit".into());
                    }
                    self.message.extend_from_slice(payload);
                    self.message_opcode = Some(opcode);
                    if fin {
                        on_message(handle, ticket, &self.message, batch);
                        self.message = Vec::new();
                        self.message_opcode = None;
                    }
                }
                OP_CLOSE => {
                    // Echo the status code (T8); tungstenite-style, without the reason.
                    self.close_echo = payload.get(..2).map(<[u8]>::to_vec).unwrap_or_default();
                    break Parsed::Close;
                }
                OP_PING => {
                    if net.push_control(OP_PONG, payload) {
                        net.flush();
                    }
                }
                OP_PONG => {}
                _ => break Parsed::Fatal(format!("unknown opcode {opcode}")),
            }
        };
        self.input.drain(..at);
        if self.input.is_empty() && self.input.capacity() > 0 {
            self.input = Vec::new();
        }
        result
    }
}

/// Unmasks a client frame's payload in place, 8 bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let m8 = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ m8).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

fn on_message(handle: &ConnHandle, ticket: &mut Ticket, bytes: &[u8], batch: &mut Vec<Batched>) {
    // One UTF-8 check of the whole message (std's is fast on ASCII), rather than serde_json's
    // check of every string in it (measured at about 5 % of the service's CPU).
    let parsed = std::str::from_utf8(bytes)
        .map_err(serde::de::Error::custom)
        .and_then(serde_json::from_str::<Request>);
    match parsed {
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
                batch.push(Batched::Reject { id: req.id, hit });
                return;
            }
            batch.push(Batched::Request(req));
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
