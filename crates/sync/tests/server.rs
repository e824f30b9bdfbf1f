//! The sync service over real websockets on 127.0.0.1, speaking as sdk-go, sdk-rust (HEAD and
//! 0.1.x) and the crate's own client would.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use serde_json::value::RawValue;
use tg_api::sync::RunKeys;
use tg_sync::{SyncLimits, SyncService, serve};
use tg_sync_client::{Client, ClientError};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Bounds every wait so that a broken server fails a test instead of hanging it.
const LIMIT: Duration = Duration::from_secs(30);

async fn start() -> (SyncService, SocketAddr) {
    start_with(SyncLimits::default()).await
}

async fn start_with(limits: SyncLimits) -> (SyncService, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = SyncService::spawn_with(limits);
    tokio::spawn(serve(listener, service.clone(), std::future::pending()));
    (service, addr)
}

async fn ws(addr: SocketAddr) -> Ws {
    // Big enough to read the 40 MB item back.
    let config = WebSocketConfig::default()
        .max_message_size(Some(tg_sync::server::MAX_MESSAGE_SIZE))
        .max_frame_size(Some(tg_sync::server::MAX_MESSAGE_SIZE));
    let (ws, _) =
        tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/"), Some(config), true)
            .await
            .unwrap();
    ws
}

async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
}

async fn send_binary(ws: &mut Ws, text: &str) {
    ws.send(Message::binary(text.as_bytes().to_vec()))
        .await
        .unwrap();
}

/// The next data frame, which must be a text frame.
async fn recv(ws: &mut Ws) -> String {
    loop {
        let msg = timeout(LIMIT, ws.next())
            .await
            .expect("no response in time")
            .expect("connection ended")
            .unwrap();
        match msg {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

async fn wait_until(
    service: &SyncService,
    what: &str,
    pred: impl Fn(tg_sync::ServiceStats) -> bool,
) {
    let waited = timeout(LIMIT, async {
        loop {
            if pred(service.stats().await.unwrap()) {
                return;
            }
            // The server has no event to await for "a peer vanished"; poll its stats.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting until {what}");
}

const K: &str = "run:c7fjstge5te621cen4i0:plan:example:case:sync";

#[tokio::test]
async fn exact_responses_for_each_op_go_style() {
    let (_service, addr) = start().await;
    let mut go = ws(addr).await;
    // sdk-go: text frames, trailing newline, Go field order.
    send_text(&mut go, &format!("{{\"id\":\"4\",\"is_cancel\":false,\"publish\":{{\"topic\":\"{K}:topics:addresses\",\"payload\":\"16.0.0.3:4001\"}}}}\n")).await;
    assert_eq!(
        recv(&mut go).await,
        r#"{"id":"4","error":"","publish":{"seq":1},"subscribe":"","signal_entry":null}"#
    );
    send_text(&mut go, &format!("{{\"id\":\"6\",\"is_cancel\":false,\"subscribe\":{{\"topic\":\"{K}:topics:addresses\"}}}}\n")).await;
    assert_eq!(
        recv(&mut go).await,
        r#"{"id":"6","error":"","publish":null,"subscribe":"\"16.0.0.3:4001\"","signal_entry":null}"#
    );
    send_text(&mut go, &format!("{{\"id\":\"8\",\"is_cancel\":false,\"signal_entry\":{{\"state\":\"{K}:states:ready\"}}}}\n")).await;
    assert_eq!(
        recv(&mut go).await,
        r#"{"id":"8","error":"","publish":null,"subscribe":"","signal_entry":{"seq":1}}"#
    );
    send_text(&mut go, &format!("{{\"id\":\"7\",\"is_cancel\":false,\"barrier\":{{\"state\":\"{K}:states:ready\",\"target\":1}}}}\n")).await;
    assert_eq!(
        recv(&mut go).await,
        r#"{"id":"7","error":"","publish":null,"subscribe":"","signal_entry":null}"#
    );
    // Negative targets (possible from Go) answer at once.
    send_text(&mut go, &format!("{{\"id\":\"9\",\"is_cancel\":false,\"barrier\":{{\"state\":\"{K}:states:never\",\"target\":-1}}}}\n")).await;
    assert_eq!(
        recv(&mut go).await,
        r#"{"id":"9","error":"","publish":null,"subscribe":"","signal_entry":null}"#
    );
}

#[tokio::test]
async fn sdk_rust_binary_requests_get_text_responses() {
    let (_service, addr) = start().await;
    let mut rust = ws(addr).await;
    let transcript = [
        (
            r#"{"id":"0","is_cancel":false,"publish":{"topic":"run:r:plan:p:case:c:run_events","payload":{"stage_start_event":{"name":"network-initialized","group":"single"}}}}"#,
            r#"{"id":"0","error":"","publish":{"seq":1},"subscribe":"","signal_entry":null}"#,
        ),
        (
            r#"{"id":"1","is_cancel":false,"signal_entry":{"state":"run:r:plan:p:case:c:states:initialized_global"}}"#,
            r#"{"id":"1","error":"","publish":null,"subscribe":"","signal_entry":{"seq":1}}"#,
        ),
        (
            r#"{"id":"2","is_cancel":false,"barrier":{"state":"run:r:plan:p:case:c:states:initialized_global","target":1}}"#,
            r#"{"id":"2","error":"","publish":null,"subscribe":"","signal_entry":null}"#,
        ),
        (
            r#"{"id":"3","is_cancel":false,"subscribe":{"topic":"run:r:plan:p:case:c:run_events"}}"#,
            r#"{"id":"3","error":"","publish":null,"subscribe":"{\"stage_start_event\":{\"name\":\"network-initialized\",\"group\":\"single\"}}","signal_entry":null}"#,
        ),
    ];
    for (request, response) in transcript {
        send_binary(&mut rust, request).await;
        assert_eq!(recv(&mut rust).await, response);
    }
}

#[tokio::test]
async fn null_ops_and_missing_is_cancel_are_accepted() {
    let (_service, addr) = start().await;
    let mut legacy = ws(addr).await;
    // sdk-rust 0.1.x: text frames, explicit nulls, no is_cancel.
    send_text(
        &mut legacy,
        r#"{"id":"0","publish":null,"subscribe":null,"barrier":null,"signal_entry":{"state":"s"}}"#,
    )
    .await;
    assert_eq!(
        recv(&mut legacy).await,
        r#"{"id":"0","error":"","publish":null,"subscribe":"","signal_entry":{"seq":1}}"#
    );
    send_text(&mut legacy, r#"{"id":"1","publish":null,"subscribe":null,"barrier":{"state":"s","target":1},"signal_entry":null}"#).await;
    assert_eq!(
        recv(&mut legacy).await,
        r#"{"id":"1","error":"","publish":null,"subscribe":"","signal_entry":null}"#
    );
}

#[tokio::test]
async fn payloads_survive_verbatim() {
    let (_service, addr) = start().await;
    let mut a = ws(addr).await;
    let mut b = ws(addr).await;
    let payload = r#"{"Addrs":["/ip4/16.0.0.2/tcp/4001"],"ID":"Qm1","big":12345678901234567890,"html":"<a&b>","go":"\u003c"}"#;
    send_binary(
        &mut a,
        &format!(r#"{{"id":"7","is_cancel":false,"publish":{{"topic":"t","payload":{payload}}}}}"#),
    )
    .await;
    recv(&mut a).await;
    send_binary(
        &mut b,
        r#"{"id":"0","is_cancel":false,"subscribe":{"topic":"t"}}"#,
    )
    .await;
    let resp: serde_json::Value = serde_json::from_str(&recv(&mut b).await).unwrap();
    assert_eq!(resp["subscribe"].as_str().unwrap(), payload);
}

#[tokio::test]
async fn close_handshake_is_answered() {
    let (service, addr) = start().await;
    let mut go = ws(addr).await;
    send_text(
        &mut go,
        "{\"id\":\"0\",\"is_cancel\":false,\"signal_entry\":{\"state\":\"s\"}}\n",
    )
    .await;
    recv(&mut go).await;
    go.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    })))
    .await
    .unwrap();
    // sdk-go waits at most 5 s for the echo; LIMIT only keeps a broken server from hanging us.
    let echo = timeout(LIMIT, go.next()).await.expect("no close echo");
    match echo {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(timeout(LIMIT, go.next()).await.unwrap().is_none());
    wait_until(&service, "the closed connection is gone", |s| {
        s.connections == 0
    })
    .await;
}

#[tokio::test]
async fn abrupt_disconnect_mid_barrier_leaves_others_served() {
    let (service, addr) = start().await;
    let mut gone = ws(addr).await;
    let mut other = ws(addr).await;
    send_binary(
        &mut gone,
        r#"{"id":"0","is_cancel":false,"barrier":{"state":"s","target":2}}"#,
    )
    .await;
    send_binary(
        &mut gone,
        r#"{"id":"1","is_cancel":false,"subscribe":{"topic":"t"}}"#,
    )
    .await;
    send_binary(
        &mut other,
        r#"{"id":"0","is_cancel":false,"barrier":{"state":"s","target":2}}"#,
    )
    .await;
    wait_until(&service, "both barriers wait", |s| s.waiters == 2).await;
    // sdk-rust style exit: the TCP connection just drops, no close frame.
    drop(gone);
    wait_until(&service, "the dropped connection's waiter is gone", |s| {
        s.waiters == 1 && s.subscriptions == 0 && s.connections == 1
    })
    .await;
    send_binary(
        &mut other,
        r#"{"id":"1","is_cancel":false,"signal_entry":{"state":"s"}}"#,
    )
    .await;
    send_binary(
        &mut other,
        r#"{"id":"2","is_cancel":false,"signal_entry":{"state":"s"}}"#,
    )
    .await;
    send_binary(
        &mut other,
        r#"{"id":"3","is_cancel":false,"publish":{"topic":"t","payload":1}}"#,
    )
    .await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(recv(&mut other).await);
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            r#"{"id":"0","error":"","publish":null,"subscribe":"","signal_entry":null}"#,
            r#"{"id":"1","error":"","publish":null,"subscribe":"","signal_entry":{"seq":1}}"#,
            r#"{"id":"2","error":"","publish":null,"subscribe":"","signal_entry":{"seq":2}}"#,
            r#"{"id":"3","error":"","publish":{"seq":1},"subscribe":"","signal_entry":null}"#,
        ]
    );
}

#[tokio::test]
async fn malformed_frames_are_ignored_and_hurt_nobody() {
    let (_service, addr) = start().await;
    let mut bad = ws(addr).await;
    let mut good = ws(addr).await;
    send_binary(
        &mut good,
        r#"{"id":"0","is_cancel":false,"barrier":{"state":"s","target":1}}"#,
    )
    .await;
    for junk in [
        "not json",
        "null",
        "[1,2]",
        r#"{"id":"1"}"#,
        r#"{"id":"2","is_cancel":false,"teleport":{"to":"mars"}}"#,
        r#"{"id":3,"signal_entry":{"state":"s"}}"#,
        r#"{"id":"4","barrier":{"state":"s","target":"many"}}"#,
        r#"{"id":"5","publish":{"payload":1}}"#,
    ] {
        send_text(&mut bad, junk).await;
        send_binary(&mut bad, junk).await;
    }
    bad.send(Message::binary(vec![0xff, 0xfe, 0x00]))
        .await
        .unwrap();
    // The bad connection is still open and served; the good one was never disturbed.
    send_text(&mut bad, r#"{"id":"9","signal_entry":{"state":"s"}}"#).await;
    assert_eq!(
        recv(&mut bad).await,
        r#"{"id":"9","error":"","publish":null,"subscribe":"","signal_entry":{"seq":1}}"#
    );
    assert_eq!(
        recv(&mut good).await,
        r#"{"id":"0","error":"","publish":null,"subscribe":"","signal_entry":null}"#
    );
}

#[tokio::test]
async fn huge_frames_on_one_connection_do_not_stall_another() {
    let (_service, addr) = start().await;
    let mut big = ws(addr).await;
    let mut small = ws(addr).await;
    let junk = vec![b'x'; 40 << 20];
    let blob = "y".repeat(40 << 20);
    let publish =
        format!(r#"{{"id":"1","is_cancel":false,"publish":{{"topic":"big","payload":"{blob}"}}}}"#);
    let big_task = tokio::spawn(async move {
        big.send(Message::binary(junk)).await.unwrap();
        big.send(Message::binary(publish.into_bytes()))
            .await
            .unwrap();
        let resp = recv(&mut big).await;
        (big, resp)
    });
    for i in 0..20 {
        send_binary(
            &mut small,
            &format!(r#"{{"id":"{i}","signal_entry":{{"state":"small"}}}}"#),
        )
        .await;
        let resp: serde_json::Value = serde_json::from_str(&recv(&mut small).await).unwrap();
        assert_eq!(resp["signal_entry"]["seq"], i + 1);
    }
    let (_big, resp) = timeout(LIMIT, big_task).await.unwrap().unwrap();
    assert_eq!(
        resp,
        r#"{"id":"1","error":"","publish":{"seq":1},"subscribe":"","signal_entry":null}"#
    );
    // The 40 MB item is delivered whole to a subscriber.
    send_binary(&mut small, r#"{"id":"99","subscribe":{"topic":"big"}}"#).await;
    let item: serde_json::Value = serde_json::from_str(&recv(&mut small).await).unwrap();
    assert_eq!(item["subscribe"].as_str().unwrap().len(), blob.len() + 2);
}

#[tokio::test]
async fn any_path_odd_host_and_no_negotiated_extras() {
    let (_service, addr) = start().await;
    for (path, host, extras) in [
        ("/", "...", false),
        ("/foo", "...", false),
        ("/a/b?c=d", "example.invalid", true),
    ] {
        let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
        let headers = req.headers_mut();
        headers.insert("host", host.parse().unwrap());
        if extras {
            // What sdk-go sends: deflate offered, Go user agent, an origin.
            headers.insert(
                "sec-websocket-extensions",
                "permessage-deflate; client_no_context_takeover; server_no_context_takeover"
                    .parse()
                    .unwrap(),
            );
            headers.insert("user-agent", "Go-http-client/1.1".parse().unwrap());
            headers.insert("origin", "http://elsewhere.invalid".parse().unwrap());
        }
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut ws, resp) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp))
            .await
            .unwrap();
        assert_eq!(resp.status(), 101);
        assert!(resp.headers().get("sec-websocket-protocol").is_none());
        assert!(resp.headers().get("sec-websocket-extensions").is_none());
        send_binary(
            &mut ws,
            r#"{"id":"0","is_cancel":false,"signal_entry":{"state":"paths"}}"#,
        )
        .await;
        assert!(recv(&mut ws).await.contains(r#""signal_entry":{"seq":"#));
    }
}

#[tokio::test]
async fn sdk_rust_handshake_bytes_are_accepted() {
    use tokio::io::AsyncWriteExt;
    let (_service, addr) = start().await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(UPGRADE).await.unwrap();
    let head = read_head(&mut tcp).await;
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"));
    assert!(head.contains("connection: upgrade"));
    // RFC 6455 accept value for the key above.
    assert!(
        head.contains("sec-websocket-accept: of+cm/+/x/iu2hz6fx9gbspdh7w="),
        "{head}"
    );
    assert!(!head.contains("sec-websocket-protocol"));
    assert!(!head.contains("sec-websocket-extensions"));
}

#[tokio::test]
async fn one_connection_multiplexes_barriers_subscriptions_and_cancels() {
    let (_service, addr) = start().await;
    let mut sidecar = ws(addr).await;
    send_binary(
        &mut sidecar,
        r#"{"id":"0","is_cancel":false,"barrier":{"state":"s","target":2}}"#,
    )
    .await;
    send_binary(
        &mut sidecar,
        r#"{"id":"1","is_cancel":false,"subscribe":{"topic":"t"}}"#,
    )
    .await;
    send_binary(
        &mut sidecar,
        r#"{"id":"2","is_cancel":false,"subscribe":{"topic":"t"}}"#,
    )
    .await;
    send_binary(&mut sidecar, r#"{"id":"2","is_cancel":true}"#).await;
    // The barrier and the subscriptions must not block this.
    send_binary(
        &mut sidecar,
        r#"{"id":"3","is_cancel":false,"signal_entry":{"state":"s"}}"#,
    )
    .await;
    assert_eq!(
        recv(&mut sidecar).await,
        r#"{"id":"3","error":"","publish":null,"subscribe":"","signal_entry":{"seq":1}}"#
    );
    send_binary(
        &mut sidecar,
        r#"{"id":"4","is_cancel":false,"publish":{"topic":"t","payload":"x"}}"#,
    )
    .await;
    assert_eq!(
        recv(&mut sidecar).await,
        r#"{"id":"4","error":"","publish":{"seq":1},"subscribe":"","signal_entry":null}"#
    );
    // Only the live subscription (id 1) gets the item; the cancelled one (id 2) does not.
    assert_eq!(
        recv(&mut sidecar).await,
        r#"{"id":"1","error":"","publish":null,"subscribe":"\"x\"","signal_entry":null}"#
    );
    send_binary(
        &mut sidecar,
        r#"{"id":"5","is_cancel":false,"signal_entry":{"state":"s"}}"#,
    )
    .await;
    assert_eq!(
        recv(&mut sidecar).await,
        r#"{"id":"5","error":"","publish":null,"subscribe":"","signal_entry":{"seq":2}}"#
    );
    assert_eq!(
        recv(&mut sidecar).await,
        r#"{"id":"0","error":"","publish":null,"subscribe":"","signal_entry":null}"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_waiter_barrier_over_thousand_sockets() {
    const N: i64 = 1000;
    let (service, addr) = start().await;
    let url = format!("ws://{addr}");
    let mut clients = Vec::new();
    for _ in 0..N {
        clients.push(Client::connect(&url).await.unwrap());
    }
    let mut tasks = Vec::new();
    for c in &clients {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.signal_and_wait("run:x:states:all", N).await
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(timeout(LIMIT, t).await.unwrap().unwrap().unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=N as u64).collect::<Vec<_>>());
    let stats = service.stats().await.unwrap();
    assert_eq!(stats.waiters, 0);
    assert_eq!(stats.connections, N as usize);
}

#[tokio::test]
async fn client_pipelines_and_subscribes() {
    let (_service, addr) = start().await;
    let url = format!("ws://{addr}");
    let a = Client::connect(&url).await.unwrap();
    let b = Client::connect(&url).await.unwrap();
    // A barrier in flight on `a` does not hold up its other requests.
    let waiting = {
        let a = a.clone();
        tokio::spawn(async move { a.barrier("go", 1).await })
    };
    assert_eq!(a.publish("t", &json!({"n": 1})).await.unwrap(), 1);
    assert_eq!(a.publish("t", &json!("two")).await.unwrap(), 2);
    let mut sub = b.subscribe("t").unwrap();
    assert_eq!(sub.next_value().await.unwrap().unwrap(), json!({"n": 1}));
    assert_eq!(sub.next_value().await.unwrap().unwrap(), json!("two"));
    let seqs = futures::future::join_all((0..50).map(|_| b.signal_entry("many"))).await;
    let mut seqs: Vec<u64> = seqs.into_iter().map(Result::unwrap).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
    assert_eq!(b.publish("t", &json!(3)).await.unwrap(), 3);
    assert_eq!(sub.next_value().await.unwrap().unwrap(), json!(3));
    assert_eq!(b.signal_entry("go").await.unwrap(), 1);
    timeout(LIMIT, waiting).await.unwrap().unwrap().unwrap();
    a.close().await;
    assert!(a.signal_entry("after-close").await.is_err());
}

#[tokio::test]
async fn in_process_api_events_stats_and_drop_run() {
    let (service, addr) = start().await;
    let prefix = "run:r1:plan:p:case:c";
    let url = format!("ws://{addr}");
    let instance = Client::connect(&url).await.unwrap();
    instance
        .publish(
            &format!("{prefix}:run_events"),
            &json!({"success_event": {"group": "single"}}),
        )
        .await
        .unwrap();
    let mut events = service.subscribe_events(prefix);
    let first = timeout(LIMIT, events.next_item()).await.unwrap().unwrap();
    assert_eq!(first.raw().get(), r#"{"success_event":{"group":"single"}}"#);
    let raw = RawValue::from_string(r#"{"crash_event":{"groups":"g"}}"#.to_owned()).unwrap();
    assert_eq!(
        service
            .publish(&format!("{prefix}:run_events"), raw)
            .await
            .unwrap(),
        2
    );
    let second = timeout(LIMIT, events.next_item()).await.unwrap().unwrap();
    assert_eq!(second.raw().get(), r#"{"crash_event":{"groups":"g"}}"#);

    assert_eq!(
        service
            .signal_entry(&format!("{prefix}:states:a"))
            .await
            .unwrap(),
        1
    );
    service
        .barrier(&format!("{prefix}:states:a"), 1)
        .await
        .unwrap();
    instance
        .signal_entry("run:r2:plan:p:case:c:states:a")
        .await
        .unwrap();
    let before = service.stats().await.unwrap();
    assert_eq!((before.states, before.topics, before.keys), (2, 1, 3));

    let dropped = service.drop_run("r1").await.unwrap();
    assert_eq!((dropped.states, dropped.topics), (1, 1));
    let after = service.stats().await.unwrap();
    assert_eq!((after.keys, after.subscriptions), (1, 0));
    // A dropped run starts from scratch if it is used again.
    assert_eq!(
        service
            .signal_entry(&format!("{prefix}:states:a"))
            .await
            .unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_keep_being_read_while_replies_back_up() {
    let (_service, addr) = start().await;
    let mut stuck = ws(addr).await;
    let url = format!("ws://{addr}");
    let publisher = Client::connect(&url).await.unwrap();
    let observer = Client::connect(&url).await.unwrap();
    // `stuck` subscribes and then never reads: ~64 MB of items pile up towards it, far more
    // than the socket buffers hold, so the server's writes to it block.
    send_binary(
        &mut stuck,
        r#"{"id":"0","is_cancel":false,"subscribe":{"topic":"flood"}}"#,
    )
    .await;
    let chunk = json!("z".repeat(256 << 10));
    for _ in 0..256 {
        publisher.publish("flood", &chunk).await.unwrap();
    }
    // Its requests must still be read and applied.
    for i in 1..=10 {
        send_binary(
            &mut stuck,
            &format!(r#"{{"id":"{i}","signal_entry":{{"state":"seen"}}}}"#),
        )
        .await;
    }
    timeout(LIMIT, observer.barrier("seen", 10))
        .await
        .expect("requests of a connection with blocked writes were not read")
        .unwrap();
}

#[tokio::test]
async fn shutdown_stops_accepting_but_keeps_live_connections() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = SyncService::spawn();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, service.clone(), async {
        let _ = stopped.await;
    }));
    let live = Client::connect(&format!("ws://{addr}")).await.unwrap();
    assert_eq!(live.signal_entry("s").await.unwrap(), 1);
    stop.send(()).unwrap();
    timeout(LIMIT, server).await.unwrap().unwrap();
    // Closing a live client would kill it (trap T9): it keeps being served.
    assert_eq!(live.signal_entry("s").await.unwrap(), 2);
    assert!(Client::connect(&format!("ws://{addr}")).await.is_err());
}

/// The error text of a call refused by the service.
fn remote_error<T: std::fmt::Debug>(r: Result<T, ClientError>) -> String {
    match r {
        Err(ClientError::Remote { message }) => message,
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[tokio::test]
async fn a_run_flooding_junk_topics_hits_its_limit_while_another_run_goes_on() {
    const MAX_RUN: usize = 1 << 20;
    let (service, addr) = start_with(SyncLimits {
        max_run_bytes: MAX_RUN,
        ..SyncLimits::default()
    })
    .await;
    let url = format!("ws://{addr}");
    let a = RunKeys::new("junk", "p", "c");
    let b = RunKeys::new("good", "p", "c");
    let flooder = Client::connect(&url).await.unwrap();
    // Run b has work in flight before the flood starts.
    let b1 = Client::connect(&url).await.unwrap();
    let b2 = Client::connect(&url).await.unwrap();
    let mut b_sub = b2.subscribe(&b.topic("t")).unwrap();
    let b_waiting = {
        let b1 = b1.clone();
        let state = b.state("ready");
        tokio::spawn(async move { b1.signal_and_wait(&state, 2).await })
    };

    let junk = json!("j".repeat(4096));
    let mut refused = None;
    for i in 0..10_000 {
        match flooder.publish(&a.topic(&format!("junk{i}")), &junk).await {
            Ok(_) => {}
            Err(e) => {
                refused = Some(remote_error::<()>(Err(e)));
                break;
            }
        }
    }
    let msg = refused.expect("a flood of 40 MB never hit a 1 MiB run limit");
    assert!(msg.contains("max_run_bytes"), "{msg}");
    assert!(msg.contains(r#"run "junk""#), "{msg}");
    // Still refused; the flooder's connection itself stays up.
    let msg = remote_error(flooder.publish(&a.topic("more-junk"), &junk).await);
    assert!(msg.contains("max_run_bytes"), "{msg}");
    let held = service.stats().await.unwrap().retained_bytes;
    assert!(held <= MAX_RUN as u64 + 4096, "retains {held} bytes");

    // Run b: barrier, publish and subscribe all work.
    assert_eq!(b2.signal_entry(&b.state("ready")).await.unwrap(), 2);
    timeout(LIMIT, b_waiting).await.unwrap().unwrap().unwrap();
    assert_eq!(
        b1.publish(&b.topic("t"), &json!({"ok": 1})).await.unwrap(),
        1
    );
    let item = timeout(LIMIT, b_sub.next_value()).await.unwrap().unwrap();
    assert_eq!(item.unwrap(), json!({"ok": 1}));

    // Once the engine drops run a, its budget is free again.
    service.drop_run("junk").await.unwrap();
    assert_eq!(flooder.publish(&a.topic("again"), &junk).await.unwrap(), 1);
}

#[tokio::test]
async fn an_oversize_payload_is_refused_with_the_limit_named() {
    let (service, addr) = start_with(SyncLimits {
        max_payload_bytes: 1024,
        ..SyncLimits::default()
    })
    .await;
    let mut ws = ws(addr).await;
    let topic = RunKeys::new("r", "p", "c").topic("t");
    let payload = format!("\"{}\"", "x".repeat(2048));
    send_binary(
        &mut ws,
        &format!(
            r#"{{"id":"3","is_cancel":false,"publish":{{"topic":"{topic}","payload":{payload}}}}}"#
        ),
    )
    .await;
    let wire = recv(&mut ws).await;
    // All five keys, the error JSON-encoded (sdk-rust parses it), nothing else set.
    let resp: serde_json::Value = serde_json::from_str(&wire).unwrap();
    assert_eq!(
        resp.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["id", "error", "publish", "subscribe", "signal_entry"]
    );
    assert_eq!(resp["id"], "3");
    assert_eq!(resp["publish"], serde_json::Value::Null);
    assert_eq!(resp["subscribe"], "");
    let error: String = serde_json::from_str(resp["error"].as_str().unwrap()).unwrap();
    assert!(error.contains("max_payload_bytes"), "{error}");
    assert!(error.contains("2050") && error.contains("1024"), "{error}");
    // Nothing was stored, and the connection goes on.
    send_binary(
        &mut ws,
        &format!(
            r#"{{"id":"4","is_cancel":false,"publish":{{"topic":"{topic}","payload":"small"}}}}"#
        ),
    )
    .await;
    assert_eq!(
        recv(&mut ws).await,
        r#"{"id":"4","error":"","publish":{"seq":1},"subscribe":"","signal_entry":null}"#
    );
    assert_eq!(service.stats().await.unwrap().topics, 1);
    // The same through the client.
    let c = Client::connect(&format!("ws://{addr}")).await.unwrap();
    let msg = remote_error(c.publish(&topic, &json!("y".repeat(4096))).await);
    assert!(msg.contains("max_payload_bytes"), "{msg}");
}

#[tokio::test]
async fn connections_per_run_are_capped_without_touching_other_runs() {
    let (_service, addr) = start_with(SyncLimits {
        max_connections_per_run: 2,
        ..SyncLimits::default()
    })
    .await;
    let url = format!("ws://{addr}");
    let r = RunKeys::new("capped", "p", "c");
    let first = Client::connect(&url).await.unwrap();
    let second = Client::connect(&url).await.unwrap();
    let third = Client::connect(&url).await.unwrap();
    assert_eq!(first.signal_entry(&r.state("s")).await.unwrap(), 1);
    assert_eq!(second.signal_entry(&r.state("s")).await.unwrap(), 2);
    let msg = remote_error(third.signal_entry(&r.state("s")).await);
    assert!(msg.contains("max_connections_per_run"), "{msg}");
    assert!(msg.contains(r#"run "capped""#), "{msg}");
    // Another run is not affected; an identified connection may speak for other runs too (the
    // sidecar multiplexes all runs on one socket).
    let other = Client::connect(&url).await.unwrap();
    assert_eq!(
        other
            .signal_entry(&RunKeys::new("other", "p", "c").state("s"))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        first
            .signal_entry(&RunKeys::new("other", "p", "c").state("s"))
            .await
            .unwrap(),
        2
    );
    // A place freed is usable by the refused connection.
    first.close().await;
    let seq = timeout(LIMIT, async {
        loop {
            match third.signal_entry(&r.state("s")).await {
                Ok(seq) => return seq,
                // The server may not have seen the close yet.
                Err(ClientError::Remote { .. }) => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(seq, 3);
}

/// Raises RLIMIT_NOFILE's soft limit to at least `need`, within the hard limit.
fn raise_nofile(need: u64) -> Result<(), String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    if soft >= need {
        return Ok(());
    }
    if hard < need {
        return Err(format!(
            "the open file limit is {soft} (hard {hard}), this test needs {need}"
        ));
    }
    setrlimit(Resource::RLIMIT_NOFILE, need, hard).map_err(|e| e.to_string())
}

fn hard_nofile_at_least(need: u64) -> Result<(), String> {
    use nix::sys::resource::{Resource, getrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    if hard < need {
        return Err(format!(
            "the hard open file limit is {hard}, the idle-socket helpers need {need}"
        ));
    }
    Ok(())
}

/// Starts `sync-bench idle`: `plain` TCP connects and `websockets` silent websockets to `addr`,
/// held until the returned child's stdin closes. Returns once they are all open.
async fn idle_sockets(addr: SocketAddr, plain: usize, websockets: usize) -> tokio::process::Child {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sync-bench"))
        .args([
            "idle",
            &addr.to_string(),
            &plain.to_string(),
            &websockets.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = timeout(Duration::from_secs(120), lines.next_line())
        .await
        .expect("idle sockets not open in time")
        .unwrap();
    assert_eq!(ready.as_deref(), Some("ready"), "sync-bench idle failed");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_idle_sockets_cannot_keep_a_new_run_out() {
    // Per helper process; two of them, so that neither needs more than 10,000 descriptors.
    const PLAIN: usize = 9_800;
    const SILENT_WEBSOCKETS: usize = 200;
    // The oldest idle sockets, opened here so that the test sees them closed.
    const LOCAL_SILENT: usize = 20;
    let limits = SyncLimits::default();
    // The server end of every kept socket, plus what other tests of this binary open meanwhile.
    let need = (limits.max_unidentified_connections + 4096) as u64;
    // Each helper raises its own soft limit to the hard one.
    let helper_need = (PLAIN + SILENT_WEBSOCKETS + 64) as u64;
    if let Err(reason) = raise_nofile(need).and_then(|()| hard_nofile_at_least(helper_need)) {
        eprintln!("skipping: {reason}");
        return;
    }
    let (service, addr) = start_with(limits.clone()).await;
    let url = format!("ws://{addr}");
    // An identified client of an older run that then stays idle throughout: never closed.
    let old = RunKeys::new("old", "p", "c");
    let veteran = Client::connect(&url).await.unwrap();
    assert_eq!(veteran.signal_entry(&old.state("s")).await.unwrap(), 1);

    let mut silent = Vec::with_capacity(LOCAL_SILENT);
    for _ in 0..LOCAL_SILENT {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (ws, _) =
            tokio_tungstenite::client_async(format!("ws://{addr}/"), MaybeTlsStream::Plain(tcp))
                .await
                .unwrap();
        silent.push(ws);
    }
    let helpers = [
        idle_sockets(addr, PLAIN, SILENT_WEBSOCKETS).await,
        idle_sockets(addr, PLAIN, SILENT_WEBSOCKETS).await,
    ];
    wait_until(&service, "the server has seen the idle sockets", |s| {
        s.unidentified_connections == limits.max_unidentified_connections
    })
    .await;

    // A new run's clients get in, signal and pass a barrier.
    let new = RunKeys::new("new", "p", "c");
    let connect = || async {
        timeout(LIMIT, Client::connect(&url))
            .await
            .expect("a new run could not connect behind 20,000 idle sockets")
            .unwrap()
    };
    let (c1, c2) = (connect().await, connect().await);
    let (s1, s2) = timeout(
        LIMIT,
        futures::future::join(
            c1.signal_and_wait(&new.state("ready"), 2),
            c2.signal_and_wait(&new.state("ready"), 2),
        ),
    )
    .await
    .expect("a new run could not pass a barrier behind 20,000 idle sockets");
    let mut seqs = [s1.unwrap(), s2.unwrap()];
    seqs.sort_unstable();
    assert_eq!(seqs, [1, 2]);
    // The oldest silent websockets were closed to make room; the idle veteran was not.
    for ws in &mut silent {
        let closed = timeout(LIMIT, ws.next()).await.expect("not closed");
        match closed {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(frame.code, CloseCode::Policy);
                assert!(frame.reason.contains("max_unidentified_connections"));
            }
            other => panic!("expected a close frame naming the limit, got {other:?}"),
        }
    }
    assert_eq!(veteran.signal_entry(&old.state("s")).await.unwrap(), 2);
    let stats = service.stats().await.unwrap();
    assert!(stats.unidentified_connections <= limits.max_unidentified_connections);
    for mut helper in helpers {
        drop(helper.stdin.take());
        assert!(
            timeout(LIMIT, helper.wait())
                .await
                .unwrap()
                .unwrap()
                .success()
        );
    }
}

/// A client frame: masked, as RFC 6455 requires of clients.
fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Connects with a hand-written handshake and writes `after` in the same write as the upgrade
/// request, as a pipelining client may.
async fn raw_ws(addr: SocketAddr, after: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut req = UPGRADE.to_vec();
    req.extend_from_slice(after);
    tcp.write_all(&req).await.unwrap();
    let head = read_head(&mut tcp).await;
    assert!(head.starts_with(b"HTTP/1.1 101"));
    tcp
}

/// A websocket upgrade request as sdk-rust writes it (the key is RFC 6455's example).
const UPGRADE: &[u8] =
    b"GET / HTTP/1.1\r\nHost: ...\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: sKdPobNUhCjhD5E1kCa9qw==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Reads an HTTP response head byte by byte (nothing after it), up to its blank line.
async fn read_head(tcp: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        timeout(LIMIT, tcp.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    head
}

/// Reads one server frame: (opcode, payload). Server frames are never masked.
async fn raw_frame(tcp: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; 2];
    timeout(LIMIT, tcp.read_exact(&mut h))
        .await
        .expect("no frame in time")
        .unwrap();
    assert_eq!(h[0] & 0x80, 0x80, "server frames are final");
    assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            tcp.read_exact(&mut l).await.unwrap();
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            tcp.read_exact(&mut l).await.unwrap();
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await.unwrap();
    (h[0] & 0x0f, payload)
}

#[tokio::test]
async fn pipelined_frames_in_one_write_are_answered_in_order() {
    use tokio::io::AsyncWriteExt;
    let (_service, addr) = start().await;
    // 300 requests (text and binary, with and without sdk-go's newline), a ping, and a
    // request fragmented in three, all in the write that carries the handshake.
    let mut burst = Vec::new();
    for i in 0..300 {
        let req = format!(
            r#"{{"id":"{i}","is_cancel":false,"signal_entry":{{"state":"{K}:states:p"}}}}"#
        );
        if i % 2 == 0 {
            burst.extend(masked_frame(true, 0x1, format!("{req}\n").as_bytes()));
        } else {
            burst.extend(masked_frame(true, 0x2, req.as_bytes()));
        }
    }
    burst.extend(masked_frame(true, 0x9, b"are you there"));
    let last = format!(
        r#"{{"id":"300","publish":{{"topic":"{K}:topics:p","payload":{{"x":"{}"}}}}}}"#,
        "y".repeat(200)
    );
    let (a, rest) = last.as_bytes().split_at(10);
    let (b, c) = rest.split_at(150);
    burst.extend(masked_frame(false, 0x1, a));
    burst.extend(masked_frame(false, 0x0, b));
    burst.extend(masked_frame(true, 0x0, c));
    let mut tcp = raw_ws(addr, &burst).await;
    // The pong may come before, between or after the replies (RFC 6455 only asks for it "as
    // soon as practical"); the replies come in request order.
    let mut texts = Vec::new();
    let mut pongs = 0;
    while texts.len() < 301 {
        match raw_frame(&mut tcp).await {
            (0x1, payload) => texts.push(String::from_utf8(payload).unwrap()),
            (0xa, payload) => {
                assert_eq!(payload, b"are you there");
                pongs += 1;
            }
            (op, _) => panic!("unexpected opcode {op}"),
        }
    }
    for (i, text) in texts[..300].iter().enumerate() {
        assert_eq!(
            *text,
            format!(
                r#"{{"id":"{i}","error":"","publish":null,"subscribe":"","signal_entry":{{"seq":{}}}}}"#,
                i + 1
            )
        );
    }
    assert_eq!(
        texts[300],
        r#"{"id":"300","error":"","publish":{"seq":1},"subscribe":"","signal_entry":null}"#
    );
    if pongs == 0 {
        assert_eq!(raw_frame(&mut tcp).await, (0xa, b"are you there".to_vec()));
    }
    // Frames that arrive a byte at a time are assembled too.
    let one = masked_frame(
        true,
        0x2,
        format!(r#"{{"id":"301","signal_entry":{{"state":"{K}:states:p"}}}}"#).as_bytes(),
    );
    for byte in one {
        tcp.write_all(&[byte]).await.unwrap();
        tcp.flush().await.unwrap();
    }
    let (_, payload) = raw_frame(&mut tcp).await;
    assert!(
        String::from_utf8(payload)
            .unwrap()
            .starts_with(r#"{"id":"301","error":"","publish":null"#)
    );
    // A close frame is echoed with its status code, then the connection ends.
    tcp.write_all(&masked_frame(true, 0x8, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    let (op, payload) = raw_frame(&mut tcp).await;
    assert_eq!((op, payload), (0x8, 1000u16.to_be_bytes().to_vec()));
}

#[tokio::test]
async fn a_barrier_release_reaches_every_waiter_with_its_own_id() {
    let (service, addr) = start().await;
    let mut waiters = Vec::new();
    for i in 0..20 {
        let req = masked_frame(
            true,
            0x1,
            format!(
                r#"{{"id":"{}","barrier":{{"state":"{K}:states:fan","target":3}}}}"#,
                1000 + i
            )
            .as_bytes(),
        );
        waiters.push(raw_ws(addr, &req).await);
    }
    wait_until(&service, "20 waiters", |s| s.waiters == 20).await;
    for _ in 0..3 {
        service
            .signal_entry(&format!("{K}:states:fan"))
            .await
            .unwrap();
    }
    for (i, w) in waiters.iter_mut().enumerate() {
        let (op, payload) = raw_frame(w).await;
        assert_eq!(op, 0x1);
        assert_eq!(
            String::from_utf8(payload).unwrap(),
            format!(
                r#"{{"id":"{}","error":"","publish":null,"subscribe":"","signal_entry":null}}"#,
                1000 + i
            )
        );
    }
}

/// Raw websockets waiting on one barrier of target `n`, each with request id `i`.
async fn raw_waiters(addr: SocketAddr, state: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut waiters = Vec::with_capacity(n);
    for i in 0..n {
        let req = masked_frame(
            true,
            0x1,
            format!(r#"{{"id":"{i}","barrier":{{"state":"{K}:states:{state}","target":{n}}}}}"#)
                .as_bytes(),
        );
        waiters.push(raw_ws(addr, &req).await);
    }
    waiters
}

/// A host whose runnable count is, every other look, far over any limit: a pacer waits at
/// each chunk and is let go at the next look.
fn every_other_look_overloaded() -> Option<u32> {
    static LOOKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = LOOKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Some(if n.is_multiple_of(2) { 100_000 } else { 0 })
}

/// A service paced at `pace` runnable tasks on a host that is overloaded every other look,
/// serving a listener, and `n` raw websockets waiting at its barrier `state` of target `n`.
async fn paced_barrier(
    pace: Option<u32>,
    state: &str,
    n: usize,
) -> (SocketAddr, SyncService, Vec<tokio::net::TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = SyncLimits {
        fanout_pace_runnable: pace,
        ..SyncLimits::default()
    };
    let service = SyncService::spawn_paced_by(limits, every_other_look_overloaded);
    tokio::spawn(serve(listener, service.clone(), std::future::pending()));
    let waiters = raw_waiters(addr, state, n).await;
    wait_until(&service, "all waiters", |s| s.waiters == n).await;
    (addr, service, waiters)
}

/// Signals barrier `state` `n` times, over a websocket to `addr` or in process to `service`;
/// each signal gets its own sequence number.
async fn signal(addr: SocketAddr, service: &SyncService, state: &str, n: usize, by_network: bool) {
    let state = format!("{K}:states:{state}");
    if by_network {
        let mut signaller = ws(addr).await;
        for i in 0..n {
            let req = format!(r#"{{"id":"s{i}","signal_entry":{{"state":"{state}"}}}}"#);
            send_text(&mut signaller, &req).await;
            let reply = recv(&mut signaller).await;
            assert!(reply.contains(&format!(r#""seq":{}"#, i + 1)), "{reply}");
        }
    } else {
        for _ in 0..n {
            service.signal_entry(&state).await.unwrap();
        }
    }
}

/// A fan-out paced on an overcommitted host still reaches every waiter with its own answer,
/// released from the network and in-process, and its pauses are counted; without pacing
/// there is none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_release_reaches_every_waiter_and_counts_its_pauses() {
    const N: usize = 300;
    for (pace, by_network) in [(Some(32), true), (Some(32), false), (None, true)] {
        let (addr, service, mut waiters) = paced_barrier(pace, "paced", N).await;
        signal(addr, &service, "paced", N, by_network).await;
        for (i, w) in waiters.iter_mut().enumerate() {
            let (op, payload) = timeout(LIMIT, raw_frame(w)).await.unwrap();
            assert_eq!(op, 0x1);
            assert_eq!(
                String::from_utf8(payload).unwrap(),
                format!(
                    r#"{{"id":"{i}","error":"","publish":null,"subscribe":"","signal_entry":null}}"#
                )
            );
        }
        let stats = service.stats().await.unwrap();
        let pauses = stats.fanout_pauses;
        // A host that recovers within the budget never lets a release go as a herd.
        assert_eq!(stats.fanout_overruns, 0);
        if pace.is_some() {
            // Two workers' shares of 150 writes, chunks of 32: eight looks, half of them over.
            assert!(pauses >= 2, "{pace:?} {by_network}: {pauses} pauses");
        } else {
            assert_eq!(pauses, 0);
        }
    }
}

/// A release too large for one task (over 1,024 waiters, whose replies other tasks start
/// writing while the rest are encoded) is paced as one fan-out: the part written after the
/// lock shares the others' deadline and turns instead of getting a pacer, and a budget, of its
/// own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_release_is_paced_as_one_fanout() {
    tg_sync::raise_fd_limit();
    const N: usize = 1_500;
    for by_network in [true, false] {
        let (addr, service, mut waiters) = paced_barrier(Some(32), "one", N).await;
        assert_eq!(service.stats().await.unwrap().paced_fanouts, 0);
        signal(addr, &service, "one", N, by_network).await;
        for w in &mut waiters {
            let (op, _) = timeout(LIMIT, raw_frame(w)).await.unwrap();
            assert_eq!(op, 0x1);
        }
        let stats = service.stats().await.unwrap();
        assert_eq!(stats.paced_fanouts, 1, "by network: {by_network}");
        assert_eq!(stats.fanout_overruns, 0);
    }
}

#[tokio::test]
async fn a_request_that_is_not_an_upgrade_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_service, addr) = start().await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    timeout(LIMIT, tcp.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}
