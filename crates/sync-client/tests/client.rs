//! The client against scripted servers on 127.0.0.1: the close contract (detached publishes get
//! their grace, a server that never echoes cannot hang `close`), id routing and subscriptions.
//! The protocol semantics themselves are tested against the real service in tg-sync.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tg_api::sync::{Request, Response};
use tg_sync_client::{CLOSE_ECHO_WAIT, Client, ClientError, CloseReport};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

const LIMIT: Duration = Duration::from_secs(30);

type ServerWs = WebSocketStream<TcpStream>;

/// Accepts one websocket and hands it to `script`.
async fn scripted<F, Fut>(script: F) -> SocketAddr
where
    F: FnOnce(ServerWs) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        script(ws).await;
    });
    addr
}

/// The next request, or `None` for a close frame or the end.
async fn next_request(ws: &mut ServerWs) -> Option<Request> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).unwrap()),
            Ok(Message::Binary(b)) => return Some(serde_json::from_slice(&b).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

async fn answer(ws: &mut ServerWs, resp: Response) {
    let text = serde_json::to_string(&resp).unwrap();
    ws.send(Message::text(text)).await.unwrap();
}

#[tokio::test]
async fn close_waits_for_a_slow_detached_ack_and_reports_errors() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<String>();
    let addr = scripted(move |mut ws| async move {
        let first = next_request(&mut ws).await.unwrap();
        let second = next_request(&mut ws).await.unwrap();
        // A slow server: the acks come late. A client that closed without waiting for them
        // would have sent its close frame meanwhile.
        if let Ok(early) = timeout(Duration::from_millis(300), ws.next()).await {
            seen_tx.send(format!("early frame {early:?}")).unwrap();
            return;
        }
        answer(&mut ws, Response::published(first.id, 1)).await;
        answer(&mut ws, Response::error(second.id, "topic is full")).await;
        seen_tx.send("acked".into()).unwrap();
        // Reading on flushes tungstenite's echo of the client's close.
        while let Some(req) = next_request(&mut ws).await {
            seen_tx.send(format!("late request {}", req.id)).unwrap();
        }
        seen_tx.send("closed".into()).unwrap();
    })
    .await;
    let client = Client::connect(&format!("ws://{addr}")).await.unwrap();
    let payload = serde_json::value::to_raw_value(&json!({"success_event": {}})).unwrap();
    client
        .publish_detached("run:r:run_events", payload.clone())
        .unwrap();
    client
        .publish_detached("run:r:run_events", payload)
        .unwrap();
    let report = timeout(LIMIT, client.close()).await.unwrap();
    assert_eq!(
        report,
        CloseReport {
            unacknowledged: 0,
            errors: vec!["topic is full".to_owned()],
        }
    );
    assert_eq!(seen.recv().await.as_deref(), Some("acked"));
    assert_eq!(seen.recv().await.as_deref(), Some("closed"));
    // Closed for every clone: new calls fail at once.
    assert!(matches!(
        client.signal_entry("s").await,
        Err(ClientError::Closed)
    ));
    assert_eq!(client.close().await, CloseReport::default());
}

#[tokio::test]
async fn a_server_that_never_echoes_cannot_hang_close() {
    let (hold_tx, hold_rx) = tokio::sync::oneshot::channel::<ServerWs>();
    let addr = scripted(move |mut ws| async move {
        // Take the barrier, then stop reading: no answer, no close echo.
        let req = next_request(&mut ws).await.unwrap();
        assert!(req.barrier.is_some());
        let _ = hold_tx.send(ws);
    })
    .await;
    let client = Client::connect(&format!("ws://{addr}")).await.unwrap();
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move { client.barrier("s", 5).await })
    };
    let held = timeout(LIMIT, hold_rx).await.unwrap().unwrap();
    let started = Instant::now();
    let report = timeout(LIMIT, client.close()).await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= CLOSE_ECHO_WAIT && took < CLOSE_ECHO_WAIT + Duration::from_secs(3),
        "close took {took:?}"
    );
    assert_eq!(report, CloseReport::default());
    assert!(matches!(
        timeout(LIMIT, waiting).await.unwrap().unwrap(),
        Err(ClientError::Closed)
    ));
    drop(held);
}

#[tokio::test]
async fn answers_are_routed_by_id_whatever_their_order() {
    let addr = scripted(|mut ws| async move {
        let mut reqs = Vec::new();
        for _ in 0..3 {
            reqs.push(next_request(&mut ws).await.unwrap());
        }
        let ids: Vec<&str> = reqs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["0", "1", "2"], "ids count up from 0 per connection");
        assert!(reqs[0].subscribe.is_some() && reqs[1].barrier.is_some());
        // Noise first: keepalive-style and unknown ids are ignored.
        answer(&mut ws, Response::barrier_reached("18446744073709551615")).await;
        answer(&mut ws, Response::barrier_reached("keepalive")).await;
        ws.send(Message::text("not json")).await.unwrap();
        // Then the answers, last request first; the subscription gets two items and an error.
        let item = |v: Value| serde_json::value::to_raw_value(&v).unwrap();
        answer(&mut ws, Response::signalled("2", 7)).await;
        answer(&mut ws, Response::item("0", &item(json!({"n": 1})))).await;
        answer(&mut ws, Response::barrier_reached("1")).await;
        answer(&mut ws, Response::item("0", &item(json!("two")))).await;
        answer(&mut ws, Response::error("0", "gone")).await;
        answer(&mut ws, Response::item("0", &item(json!("after the end")))).await;
        while next_request(&mut ws).await.is_some() {}
    })
    .await;
    let client = Client::connect(&format!("ws://{addr}")).await.unwrap();
    let mut sub = client.subscribe("t").unwrap();
    // `join` polls in order, so the barrier takes id 1 and the signal id 2.
    let (reached, seq) = timeout(
        LIMIT,
        futures::future::join(client.barrier("s", 1), client.signal_entry("s")),
    )
    .await
    .unwrap();
    reached.unwrap();
    assert_eq!(seq.unwrap(), 7);
    assert_eq!(sub.next_value().await.unwrap().unwrap(), json!({"n": 1}));
    assert_eq!(sub.next_value().await.unwrap().unwrap(), json!("two"));
    match sub.next_value().await.unwrap() {
        Err(ClientError::Remote { message }) => assert_eq!(message, "gone"),
        other => panic!("expected the service's error, got {other:?}"),
    }
    assert!(sub.next_value().await.is_none(), "nothing after an error");
}
