//! `sync-bench client`: a load generator for any sync service at an address, run in a process
//! of its own so that the server's CPU and descriptors are its own.
//!
//! Cheap by construction, so that on a small machine the client is not what is measured: every
//! request is a pre-encoded, masked websocket frame (only the 8 id digits are rewritten, already
//! masked), responses are counted by walking frame headers (the only look inside is a search
//! for `"error":""`), and each connection keeps `depth` requests in flight, sending as many new
//! ones as responses arrive, in one write.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(clap::Args)]
pub struct ClientArgs {
    /// The sync service to load, HOST:PORT: ours (`sync-bench server`, the daemon's, a
    /// sidecar's) or any other speaking the same protocol, e.g. the original Go sync-service.
    #[arg(long)]
    pub addr: String,
    /// Worker threads of this client.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Process id of the server, when it runs on this machine: its CPU time (utime + stime
    /// from /proc) over the measured window is reported too.
    #[arg(long)]
    pub server_pid: Option<u32>,
    #[command(subcommand)]
    pub what: What,
}

#[derive(clap::Subcommand)]
pub enum What {
    /// Pipelined throughput: CONNS connections, each keeping DEPTH requests in flight, for
    /// SECS after WARMUP. Prints one markdown table row.
    Throughput {
        #[arg(long, value_enum)]
        op: OpKind,
        #[arg(long, default_value_t = 10)]
        conns: usize,
        #[arg(long, default_value_t = 64)]
        depth: usize,
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Run id in the keys (`run:<RUN>:plan:bench:case:bench:...`). Publishes are retained
        /// by the service: use a fresh run (or a fresh server) per measurement.
        #[arg(long, default_value = "tput")]
        run: String,
    },
    /// Barrier release latency: WAITERS sockets each wait on one barrier of target WAITERS,
    /// another socket signals WAITERS - 1 times, then once more: reported is the time from
    /// sending that last signal to the last waiter's release, per round.
    Barrier {
        #[arg(long, default_value_t = 1000)]
        waiters: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value = "lat")]
        run: String,
    },
    /// Memory per idle connection: the server's RSS (needs --server-pid) before and after
    /// CONNS websockets that each sent one request and then stay idle.
    IdleMem {
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
        #[arg(long, default_value = "idle")]
        run: String,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum OpKind {
    Publish,
    SignalEntry,
    /// A barrier whose target is already reached: one round trip through the barrier path.
    Barrier,
}

pub async fn client(args: ClientArgs) -> anyhow::Result<()> {
    let pid = args.server_pid;
    match args.what {
        What::Throughput {
            op,
            conns,
            depth,
            secs,
            warmup,
            run,
        } => throughput(&args.addr, pid, op, conns, depth, secs, warmup, &run).await,
        What::Barrier {
            waiters,
            rounds,
            run,
        } => barrier(&args.addr, waiters, rounds, &run).await,
        What::IdleMem { conns, settle, run } => {
            idle_mem(&args.addr, pid, conns, settle, &run).await
        }
    }
}

/// Any mask will do; a fixed one lets the frames be encoded once.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const ID_DIGITS: usize = 8;

/// One request as a masked text frame whose id is `ID_DIGITS` decimal digits.
struct Template {
    frame: Vec<u8>,
    /// Where the id's digits start, in the frame and in the payload.
    id_in_frame: usize,
    id_in_payload: usize,
}

impl Template {
    /// `json` must contain `"id":"00000000"` once.
    fn new(json: &str) -> Self {
        let id_in_payload = json.find("\"id\":\"").expect("template has an id") + 6;
        let mut frame = Vec::new();
        let header = encode_frame(json.as_bytes(), &mut frame);
        Template {
            frame,
            id_in_frame: header + id_in_payload,
            id_in_payload,
        }
    }

    fn push(&self, out: &mut Vec<u8>, id: u64) {
        let base = out.len() + self.id_in_frame;
        out.extend_from_slice(&self.frame);
        let mut n = id;
        for j in (0..ID_DIGITS).rev() {
            let digit = b'0' + (n % 10) as u8;
            n /= 10;
            out[base + j] = digit ^ MASK[(self.id_in_payload + j) % 4];
        }
    }
}

/// Appends `payload` as one masked text frame; returns the header length.
fn encode_frame(payload: &[u8], out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.push(0x81);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n < 65_536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    let header = out.len() - start;
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    header
}

fn request(op: &str, body: &str) -> String {
    format!("{{\"id\":\"00000000\",\"is_cancel\":false,\"{op}\":{body}}}")
}

fn key(run: &str, kind: &str, name: &str) -> String {
    format!("run:{run}:plan:bench:case:bench:{kind}:{name}")
}

/// Bytes read from one connection, and the frames in them.
struct Reader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Reader {
    fn new(capacity: usize) -> Self {
        Reader {
            buf: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    /// Reads once more; fails on EOF.
    async fn fill(&mut self, s: &mut TcpStream) -> anyhow::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let len = self.buf.len() * 2;
                self.buf.resize(len, 0);
            }
        }
        let n = s.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        self.end += n;
        Ok(())
    }

    /// Consumes the complete frames read so far: (data messages, of which errors). A close
    /// frame is an error; pings are not answered (no sync service sends them).
    fn take(&mut self) -> anyhow::Result<(u64, u64)> {
        let (mut msgs, mut errors) = (0, 0);
        loop {
            let b = &self.buf[self.start..self.end];
            if b.len() < 2 {
                break;
            }
            let (len, mut at) = match b[1] & 0x7f {
                126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                127 if b.len() >= 10 => (
                    u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if b[1] & 0x80 != 0 {
                at += 4;
            }
            if b.len() < at + len {
                break;
            }
            let (fin, opcode) = (b[0] & 0x80 != 0, b[0] & 0x0f);
            match opcode {
                8 => bail!("the server sent a close frame"),
                0..=2 if fin => {
                    msgs += 1;
                    if !contains(&b[at..at + len], b"\"error\":\"\"") {
                        errors += 1;
                    }
                }
                _ => {}
            }
            self.start += at + len;
        }
        Ok((msgs, errors))
    }

    /// Reads until at least one message arrived.
    async fn next(&mut self, s: &mut TcpStream) -> anyhow::Result<(u64, u64)> {
        loop {
            let got = self.take()?;
            if got.0 > 0 {
                return Ok(got);
            }
            self.fill(s).await?;
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Connects and completes the websocket handshake by hand (as sdk-rust does: path `/`, no
/// extensions).
async fn connect(addr: &str, buffer: usize) -> anyhow::Result<(TcpStream, Reader)> {
    let mut s = TcpStream::connect(addr).await.context("connect")?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut rd = Reader::new(buffer.max(1024));
    loop {
        rd.fill(&mut s).await.context("handshake")?;
        let got = &rd.buf[..rd.end];
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            if !got.starts_with(b"HTTP/1.1 101") {
                bail!(
                    "handshake refused: {}",
                    String::from_utf8_lossy(&got[..end])
                );
            }
            rd.start = end + 4;
            return Ok((s, rd));
        }
        if rd.end > 16 << 10 {
            bail!("handshake answer too long");
        }
    }
}

/// Connects `n` websockets, `parallel` at a time.
async fn connect_many(
    addr: &str,
    n: usize,
    buffer: usize,
) -> anyhow::Result<Vec<(TcpStream, Reader)>> {
    let all: Vec<_> = futures::stream::iter(0..n)
        .map(|_| connect(addr, buffer))
        .buffer_unordered(128)
        .collect()
        .await;
    all.into_iter().collect()
}

/// Sends one request and waits for its answer; fails on an error answer.
async fn call(s: &mut TcpStream, rd: &mut Reader, json: &str) -> anyhow::Result<()> {
    let mut f = Vec::new();
    encode_frame(json.as_bytes(), &mut f);
    s.write_all(&f).await?;
    let (_, errors) = rd.next(s).await?;
    if errors > 0 {
        bail!("the server answered {json} with an error");
    }
    Ok(())
}

/// CPU seconds (user + system) of process `pid` so far.
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3. Clock ticks are 100 Hz on Linux.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[allow(clippy::too_many_arguments)]
async fn throughput(
    addr: &str,
    server_pid: Option<u32>,
    op: OpKind,
    conns: usize,
    depth: usize,
    secs: f64,
    warmup: f64,
    run: &str,
) -> anyhow::Result<()> {
    let reached = key(run, "states", "reached");
    if matches!(op, OpKind::Barrier) {
        let (mut s, mut rd) = connect(addr, 4096).await?;
        call(
            &mut s,
            &mut rd,
            &request("signal_entry", &format!("{{\"state\":\"{reached}\"}}"))
                .replace("00000000", "1"),
        )
        .await?;
    }
    let templates: Vec<Arc<Template>> = (0..16)
        .map(|i| {
            let json = match op {
                OpKind::Publish => request(
                    "publish",
                    &format!(
                        "{{\"topic\":\"{}\",\"payload\":{{\"i\":{i},\"k\":\"bench\"}}}}",
                        key(run, "topics", &format!("t{i}"))
                    ),
                ),
                OpKind::SignalEntry => request(
                    "signal_entry",
                    &format!("{{\"state\":\"{}\"}}", key(run, "states", &format!("s{i}"))),
                ),
                OpKind::Barrier => request(
                    "barrier",
                    &format!("{{\"state\":\"{reached}\",\"target\":1}}"),
                ),
            };
            Arc::new(Template::new(&json))
        })
        .collect();
    let streams = connect_many(addr, conns, 64 << 10).await?;
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, (mut s, mut rd)) in streams.into_iter().enumerate() {
        let t = Arc::clone(&templates[i % templates.len()]);
        let (done, errors, stop) = (Arc::clone(&done), Arc::clone(&errors), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut w = Vec::with_capacity(depth * t.frame.len());
            let mut id = 0u64;
            for _ in 0..depth {
                t.push(&mut w, id);
                id += 1;
            }
            s.write_all(&w).await?;
            loop {
                rd.fill(&mut s).await?;
                let (k, e) = rd.take()?;
                if k == 0 {
                    continue;
                }
                done.fetch_add(k, Ordering::Relaxed);
                if e > 0 {
                    errors.fetch_add(e, Ordering::Relaxed);
                }
                if stop.load(Ordering::Relaxed) {
                    return anyhow::Ok(());
                }
                w.clear();
                for _ in 0..k {
                    t.push(&mut w, id);
                    id += 1;
                }
                s.write_all(&w).await?;
            }
        }));
    }
    let pid = server_pid.map(|p| p.to_string());
    // Replies counted, time, our CPU, the server's CPU.
    let snapshot = || {
        (
            done.load(Ordering::Relaxed),
            Instant::now(),
            cpu_secs("self"),
            pid.as_deref().and_then(cpu_secs),
        )
    };
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    let (n0, t0, c0, s0) = snapshot();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (n1, t1, c1, s1) = snapshot();
    stop.store(true, Ordering::Relaxed);
    let wall = (t1 - t0).as_secs_f64();
    let ops = (n1 - n0) as f64;
    let pct = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.0} %", (b - a) / wall * 100.0),
        _ => "-".to_owned(),
    };
    let per_op = match (s0, s1) {
        (Some(a), Some(b)) if ops > 0.0 => format!("{:.2}", (b - a) / ops * 1e6),
        _ => "-".to_owned(),
    };
    let op_name = match op {
        OpKind::Publish => "publish",
        OpKind::SignalEntry => "signal_entry",
        OpKind::Barrier => "barrier (reached)",
    };
    println!(
        "| {op_name} | {conns} | {depth} | {:.0} | {} | {per_op} | {} | {} |",
        ops / wall,
        pct(s0, s1),
        pct(c0, c1),
        errors.load(Ordering::Relaxed),
    );
    // The tasks end at their next response; a server that stopped answering must not hang us.
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    Ok(())
}

async fn barrier(addr: &str, waiters: usize, rounds: usize, run: &str) -> anyhow::Result<()> {
    let mut conns = connect_many(addr, waiters, 1024).await?;
    let (mut sig, mut sig_rd) = connect(addr, 64 << 10).await?;
    let mut results = Vec::new();
    for round in 0..rounds {
        let state = key(run, "states", &format!("r{round}"));
        let ack = key(run, "states", &format!("ack{round}"));
        let mut setup = Vec::new();
        encode_frame(
            request(
                "barrier",
                &format!("{{\"state\":\"{state}\",\"target\":{waiters}}}"),
            )
            .replace("00000000", "1")
            .as_bytes(),
            &mut setup,
        );
        // The service handles a connection's requests in order: once this is answered, the
        // barrier before it is registered.
        encode_frame(
            request("signal_entry", &format!("{{\"state\":\"{ack}\"}}"))
                .replace("00000000", "2")
                .as_bytes(),
            &mut setup,
        );
        let setup = Arc::new(setup);
        let acked = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::with_capacity(waiters);
        for (mut s, mut rd) in conns.drain(..) {
            let (setup, acked) = (Arc::clone(&setup), Arc::clone(&acked));
            tasks.push(tokio::spawn(async move {
                s.write_all(&setup).await?;
                rd.next(&mut s).await?;
                acked.fetch_add(1, Ordering::Release);
                let (_, errors) = rd.next(&mut s).await?;
                let at = Instant::now();
                if errors > 0 {
                    bail!("a barrier was answered with an error");
                }
                anyhow::Ok((s, rd, at))
            }));
        }
        while acked.load(Ordering::Acquire) < waiters {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let signal = Template::new(&request(
            "signal_entry",
            &format!("{{\"state\":\"{state}\"}}"),
        ));
        let mut burst = Vec::new();
        for i in 0..waiters as u64 - 1 {
            signal.push(&mut burst, i);
        }
        sig.write_all(&burst).await?;
        let mut answered = 0;
        while answered + 1 < waiters as u64 {
            answered += sig_rd.next(&mut sig).await?.0;
        }
        let mut last = Vec::new();
        signal.push(&mut last, waiters as u64);
        let start = Instant::now();
        sig.write_all(&last).await?;
        let mut first = None;
        let mut latest = start;
        for t in tasks {
            let (s, rd, at) = t.await??;
            first = Some(first.map_or(at, |f: Instant| f.min(at)));
            latest = latest.max(at);
            conns.push((s, rd));
        }
        sig_rd.next(&mut sig).await?;
        let ms = |i: Instant| (i - start).as_secs_f64() * 1e3;
        println!(
            "round {round}: {waiters} waiters, last signal -> first release {:.2} ms, -> last release {:.2} ms",
            ms(first.unwrap_or(start)),
            ms(latest)
        );
        results.push(ms(latest));
    }
    results.sort_by(f64::total_cmp);
    println!(
        "| {waiters} | {rounds} | {:.2} ms | {:.2} ms | {:.2} ms |",
        results[0],
        results[results.len() / 2],
        results[results.len() - 1]
    );
    Ok(())
}

async fn idle_mem(
    addr: &str,
    server_pid: Option<u32>,
    conns: usize,
    settle: f64,
    run: &str,
) -> anyhow::Result<()> {
    let Some(pid) = server_pid else {
        bail!("idle-mem needs --server-pid");
    };
    let before = rss_kib(pid).context("reading the server's RSS")?;
    let mut all = connect_many(addr, conns, 1024).await?;
    let json = request(
        "signal_entry",
        &format!("{{\"state\":\"{}\"}}", key(run, "states", "idle")),
    )
    .replace("00000000", "1");
    let calls: Vec<_> = all.iter_mut().map(|(s, rd)| call(s, rd, &json)).collect();
    futures::stream::iter(calls)
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()?;
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    let after = rss_kib(pid).context("reading the server's RSS")?;
    println!(
        "| {conns} | {:.1} MiB | {:.1} MiB | {:.0} B |",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        after.saturating_sub(before) as f64 * 1024.0 / conns as f64
    );
    drop(all);
    Ok(())
}
