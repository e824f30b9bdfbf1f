//! A TCP ping/pong between two instances on the published sdk-rust crate (`testground` 0.4).
//!
//! Instance 1 listens on `<data ip>:7777` and publishes that address on topic `server-addr`;
//! instance 2 reads it, connects, sends `ping` and expects `pong`. Both then meet on the
//! `done` barrier, so the server's network namespace outlives the exchange, and record
//! their outcome.
//!
//! What sdk-rust 0.4 expects from the runner: every `TEST_*` variable of the runtime
//! environment plus `HOSTNAME`, `INFLUXDB_URL` and `REDIS_HOST` (clap fails on a missing
//! one), `TEST_SIDECAR=true`, and the sync service reachable as
//! `testground-sync-service:5050` (hard-coded in the crate).

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use testground::client::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_stream::StreamExt;

const PORT: u16 = 7777;
const TOPIC: &str = "server-addr";
/// The data interface local:netns gives every instance.
const DATA_IFACE: &str = "eth1";
/// Bounds every wait on the peer, so a broken peer yields a failure rather than a hang.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

type Error = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let client = Client::new_and_init().await?;
    let case = client.run_parameters().test_case;
    let outcome = match case.as_str() {
        "tcp-connect" => tcp_connect(&client).await,
        other => Err(format!("unknown test case: {other}").into()),
    };
    // record_success / record_failure consume the client, so they come last.
    match outcome {
        Ok(()) => client.record_success().await?,
        Err(e) => client.record_failure(e.to_string()).await?,
    }
    Ok(())
}

async fn tcp_connect(client: &Client) -> Result<(), Error> {
    let params = client.run_parameters();
    if params.test_instance_count != 2 {
        return Err(format!(
            "needs exactly 2 instances, got {}",
            params.test_instance_count
        )
        .into());
    }
    let ip = data_ip(&params)?;
    client.record_message(format!(
        "instance {} has data address {ip}",
        client.global_seq()
    ));

    let role = if client.global_seq() == 1 {
        serve(client, ip).await
    } else {
        connect(client).await
    };

    // Signal even after a failure: the peer must not wait for us in vain. Both
    // outcomes are recorded only once both sides are done with the socket.
    let done = timeout(
        STEP_TIMEOUT,
        client.signal_and_wait("done", params.test_instance_count),
    )
    .await
    .map_err(|_| "timed out on the done barrier".to_string())
    .and_then(|r| r.map_err(|e| format!("done barrier: {e}")));
    role?;
    done?;
    Ok(())
}

/// Instance 1: accept one connection and answer its `ping` with `pong`.
async fn serve(client: &Client, ip: IpAddr) -> Result<(), Error> {
    let addr = SocketAddr::new(ip, PORT);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("listen on {addr}: {e}"))?;
    // Published only once listening, so the client's connect cannot race the bind.
    client
        .publish(
            TOPIC,
            Cow::Owned(serde_json::json!({ "addr": addr.to_string() })),
        )
        .await?;

    let (mut sock, peer) = timeout(STEP_TIMEOUT, listener.accept())
        .await
        .map_err(|_| "no connection from the client")?
        .map_err(|e| format!("accept: {e}"))?;
    let mut buf = [0u8; 4];
    timeout(STEP_TIMEOUT, sock.read_exact(&mut buf))
        .await
        .map_err(|_| format!("no ping from {peer}"))?
        .map_err(|e| format!("read from {peer}: {e}"))?;
    if &buf != b"ping" {
        return Err(format!("expected \"ping\" from {peer}, got {buf:?}").into());
    }
    sock.write_all(b"pong")
        .await
        .map_err(|e| format!("write to {peer}: {e}"))?;
    client.record_message(format!("answered ping from {peer}"));
    Ok(())
}

/// Instance 2: find the server's address, send `ping`, expect `pong`.
async fn connect(client: &Client) -> Result<(), Error> {
    let stream = client.subscribe(TOPIC, 16).await;
    tokio::pin!(stream);
    let item = timeout(STEP_TIMEOUT, stream.next())
        .await
        .map_err(|_| format!("nothing published on {TOPIC}"))?
        .ok_or_else(|| format!("subscription to {TOPIC} ended"))??;
    let server: SocketAddr = item["addr"]
        .as_str()
        .ok_or_else(|| format!("no addr in {item}"))?
        .parse()
        .map_err(|e| format!("bad addr in {item}: {e}"))?;

    let mut sock = timeout(STEP_TIMEOUT, TcpStream::connect(server))
        .await
        .map_err(|_| format!("connect to {server} timed out"))?
        .map_err(|e| format!("connect to {server}: {e}"))?;
    sock.write_all(b"ping")
        .await
        .map_err(|e| format!("write to {server}: {e}"))?;
    let mut buf = [0u8; 4];
    timeout(STEP_TIMEOUT, sock.read_exact(&mut buf))
        .await
        .map_err(|_| format!("no pong from {server}"))?
        .map_err(|e| format!("read from {server}: {e}"))?;
    if &buf != b"pong" {
        return Err(format!("expected \"pong\" from {server}, got {buf:?}").into());
    }
    client.record_message(format!("got pong from {server}"));
    Ok(())
}

/// This instance's data address: the IPv4 address of `eth1`, else any local address inside
/// `TEST_SUBNET` (what sdk-rust's own `data_network_ip` looks for).
fn data_ip(params: &testground::RunParameters) -> Result<IpAddr, Error> {
    let ifaces = if_addrs::get_if_addrs().map_err(|e| format!("list interfaces: {e}"))?;
    let on_eth1 = ifaces
        .iter()
        .find(|i| i.name == DATA_IFACE && i.ip().is_ipv4())
        .map(|i| i.ip());
    let in_subnet = || {
        ifaces
            .iter()
            .map(|i| i.ip())
            .find(|ip| params.test_subnet.contains(*ip))
    };
    on_eth1
        .or_else(in_subnet)
        .ok_or_else(|| format!("no address on {DATA_IFACE} nor in {}", params.test_subnet).into())
}
