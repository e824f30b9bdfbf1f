//! Sync service wire messages, shaped exactly as the original Testground sync service.
//!
//! A client sends [`Request`] envelopes: a string `id` (unique per connection), an optional
//! `is_cancel` flag and one operation. Operations given as JSON `null` count as absent (sdk-rust
//! 0.1.x sends `"barrier":null`). The server answers with [`Response`] envelopes that always
//! carry all five keys (`id`, `error`, `publish`, `subscribe`, `signal_entry`), because sdk-rust
//! fails on a missing `error`/`subscribe` and sdk-go on a non-string `subscribe`.
//!
//! Payloads stay as raw JSON text: re-encoding through a number type would corrupt integers above
//! 2^53, which Go clients then silently drop.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;

/// The sync keys of one run, laid out as sdk-go does: every key starts with the prefix
/// `run:<run>:plan:<plan>:case:<case>`, followed by `:states:<name>` for a state (a counter with
/// barriers), `:topics:<name>` for a topic, or `:run_events` for the run's event topic (outside
/// the `topics:` namespace). Built here only, so that the SDK, the sidecar, the runners and the
/// sync service agree on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunKeys {
    /// `run:<run>:plan:<plan>:case:<case>`, without a trailing `:`.
    prefix: String,
}

impl RunKeys {
    /// The keys of run `run` of test case `case` of plan `plan`.
    pub fn new(run: &str, plan: &str, case: &str) -> Self {
        RunKeys {
            prefix: format!("run:{run}:plan:{plan}:case:{case}"),
        }
    }

    /// Keys under an already built prefix (e.g. one handed over in a config). A trailing `:`
    /// is dropped; the prefix is otherwise taken as is.
    pub fn from_prefix(prefix: impl Into<String>) -> Self {
        let mut prefix = prefix.into();
        while prefix.ends_with(':') {
            prefix.pop();
        }
        RunKeys { prefix }
    }

    /// `run:<run>:plan:<plan>:case:<case>`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key of state (counter) `name`: `<prefix>:states:<name>`.
    pub fn state(&self, name: &str) -> String {
        format!("{}:states:{name}", self.prefix)
    }

    /// The key of topic `name`: `<prefix>:topics:<name>`.
    pub fn topic(&self, name: &str) -> String {
        format!("{}:topics:{name}", self.prefix)
    }

    /// The key of the run's event topic: `<prefix>:run_events`.
    pub fn run_events(&self) -> String {
        format!("{}:run_events", self.prefix)
    }

    /// The run id these keys belong to (`None` if the prefix is not a run prefix).
    pub fn run_id(&self) -> Option<&str> {
        Self::run_of(&self.prefix)
    }

    /// The prefix every key of run `run` starts with, whatever its plan and case: `run:<run>:`.
    /// What the service drops when the run ends.
    pub fn run_scope(run: &str) -> String {
        format!("run:{run}:")
    }

    /// The run id a key belongs to: `x` for `run:x:...` (or for `run:x` itself). `None` for a
    /// key outside any run, including an empty id (`run::...`).
    pub fn run_of(key: &str) -> Option<&str> {
        let rest = key.strip_prefix("run:")?;
        let id = rest.split_once(':').map_or(rest, |(id, _)| id);
        (!id.is_empty()).then_some(id)
    }
}

impl fmt::Display for RunKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prefix)
    }
}

/// A request from a test instance (or any client) to the sync service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// Correlates responses; echoed verbatim. Numeric-looking in every official client.
    pub id: String,
    /// Cancels the barrier or subscription with the same `id` on the same connection.
    #[serde(default)]
    pub is_cancel: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<SubscribeRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub barrier: Option<BarrierRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal_entry: Option<SignalEntryRequest>,
}

/// The single operation a [`Request`] asks for.
#[derive(Debug, Clone)]
pub enum Op {
    Publish(PublishRequest),
    Subscribe(SubscribeRequest),
    Barrier(BarrierRequest),
    SignalEntry(SignalEntryRequest),
}

impl Request {
    /// Builds a request carrying `op`, with `is_cancel` false.
    pub fn new(id: impl Into<String>, op: Op) -> Self {
        let mut req = Request {
            id: id.into(),
            is_cancel: false,
            publish: None,
            subscribe: None,
            barrier: None,
            signal_entry: None,
        };
        match op {
            Op::Publish(p) => req.publish = Some(p),
            Op::Subscribe(s) => req.subscribe = Some(s),
            Op::Barrier(b) => req.barrier = Some(b),
            Op::SignalEntry(s) => req.signal_entry = Some(s),
        }
        req
    }

    /// Builds a cancel request for the barrier or subscription `id`.
    pub fn cancel(id: impl Into<String>) -> Self {
        Request {
            id: id.into(),
            is_cancel: true,
            publish: None,
            subscribe: None,
            barrier: None,
            signal_entry: None,
        }
    }

    /// Whether any operation is present (`null` counts as absent).
    pub fn has_op(&self) -> bool {
        self.publish.is_some()
            || self.subscribe.is_some()
            || self.barrier.is_some()
            || self.signal_entry.is_some()
    }

    /// The state or topic the request names (of the operation [`Request::into_op`] would
    /// choose); `None` for a cancel or a request without an operation.
    pub fn key(&self) -> Option<&str> {
        if let Some(p) = &self.publish {
            Some(&p.topic)
        } else if let Some(s) = &self.subscribe {
            Some(&s.topic)
        } else if let Some(b) = &self.barrier {
            Some(&b.state)
        } else {
            self.signal_entry.as_ref().map(|s| s.state.as_str())
        }
    }

    /// Takes the operation out, choosing as the reference does when several are present:
    /// publish, then subscribe, then barrier, then signal_entry. `None` when there is none.
    pub fn into_op(self) -> Option<Op> {
        if let Some(p) = self.publish {
            Some(Op::Publish(p))
        } else if let Some(s) = self.subscribe {
            Some(Op::Subscribe(s))
        } else if let Some(b) = self.barrier {
            Some(Op::Barrier(b))
        } else {
            self.signal_entry.map(Op::SignalEntry)
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishRequest {
    pub topic: String,
    /// Any JSON value, kept as the exact text the client sent. A missing payload is `null`,
    /// which is what the Go reference stores for it.
    #[serde(default = "null_raw")]
    pub payload: Box<RawValue>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscribeRequest {
    pub topic: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BarrierRequest {
    pub state: String,
    /// Go sends an `int` (may be negative), Rust a `u64`; values above `i64::MAX` saturate
    /// rather than make the whole request unreadable.
    #[serde(deserialize_with = "saturating_i64")]
    pub target: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignalEntryRequest {
    pub state: String,
}

/// The body of a publish or signal_entry answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqResponse {
    pub seq: u64,
}

/// A response from the sync service. Serialises all five keys, always, in the reference's
/// order; exactly one of them is meaningful (see the `Response::*` constructors).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub id: String,
    /// Empty on success. When set, it holds a JSON-encoded string (sdk-rust parses it as JSON).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub error: String,
    #[serde(default)]
    pub publish: Option<SeqResponse>,
    /// The JSON text of one subscription item, carried as a string (double-encoded).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub subscribe: String,
    #[serde(default)]
    pub signal_entry: Option<SeqResponse>,
}

impl Response {
    fn empty(id: String) -> Self {
        Response {
            id,
            error: String::new(),
            publish: None,
            subscribe: String::new(),
            signal_entry: None,
        }
    }

    pub fn published(id: impl Into<String>, seq: u64) -> Self {
        Response {
            publish: Some(SeqResponse { seq }),
            ..Self::empty(id.into())
        }
    }

    pub fn signalled(id: impl Into<String>, seq: u64) -> Self {
        Response {
            signal_entry: Some(SeqResponse { seq }),
            ..Self::empty(id.into())
        }
    }

    pub fn barrier_reached(id: impl Into<String>) -> Self {
        Self::empty(id.into())
    }

    /// One subscription item; `item` is the item's JSON text.
    pub fn item(id: impl Into<String>, item: &RawValue) -> Self {
        Response {
            subscribe: item.get().to_owned(),
            ..Self::empty(id.into())
        }
    }

    /// An error; `message` is JSON-encoded here so that sdk-rust can parse it.
    pub fn error(id: impl Into<String>, message: &str) -> Self {
        let encoded = serde_json::to_string(message).unwrap_or_else(|_| "\"error\"".to_owned());
        Response {
            error: encoded,
            ..Self::empty(id.into())
        }
    }

    /// What this response means, classified the way sdk-rust does.
    pub fn kind(&self) -> ResponseKind {
        match (
            self.error.is_empty(),
            self.subscribe.is_empty(),
            self.publish,
            self.signal_entry,
        ) {
            (true, true, None, None) => ResponseKind::BarrierReached,
            (false, true, None, None) => ResponseKind::Error,
            (true, false, None, None) => ResponseKind::Item,
            (true, true, Some(p), None) => ResponseKind::Published(p.seq),
            (true, true, None, Some(s)) => ResponseKind::Signalled(s.seq),
            _ => ResponseKind::Mixed,
        }
    }
}

/// The meaning of a [`Response`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseKind {
    Published(u64),
    Signalled(u64),
    BarrierReached,
    Item,
    Error,
    /// More than one field set: invalid, both SDKs fail on it.
    Mixed,
}

fn null_raw() -> Box<RawValue> {
    RawValue::NULL.to_owned()
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

fn saturating_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = i64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an integer")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            Ok(i64::try_from(v).unwrap_or(i64::MAX))
        }
    }
    d.deserialize_i64(V)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_keys_layout_and_parsing() {
        let k = RunKeys::new("c7fj", "example", "sync");
        assert_eq!(k.prefix(), "run:c7fj:plan:example:case:sync");
        assert_eq!(
            k.state("ready"),
            "run:c7fj:plan:example:case:sync:states:ready"
        );
        assert_eq!(
            k.topic("peers"),
            "run:c7fj:plan:example:case:sync:topics:peers"
        );
        assert_eq!(k.run_events(), "run:c7fj:plan:example:case:sync:run_events");
        assert_eq!(k.run_id(), Some("c7fj"));
        assert_eq!(k.to_string(), k.prefix());
        assert_eq!(RunKeys::from_prefix("run:c7fj:plan:example:case:sync:"), k);
        assert_eq!(RunKeys::run_scope("c7fj"), "run:c7fj:");
        assert!(k.state("x").starts_with(&RunKeys::run_scope("c7fj")));
        assert_eq!(RunKeys::run_of(&k.topic("t")), Some("c7fj"));
        assert_eq!(RunKeys::run_of("run:x:states:all"), Some("x"));
        assert_eq!(RunKeys::run_of("run:x"), Some("x"));
        for outside in ["s", "", "run:", "run::plan", "runx:a", "RUN:a:b"] {
            assert_eq!(RunKeys::run_of(outside), None, "{outside}");
        }
    }

    #[test]
    fn responses_serialise_all_five_keys() {
        let cases = [
            (
                Response::published("4", 1),
                r#"{"id":"4","error":"","publish":{"seq":1},"subscribe":"","signal_entry":null}"#,
            ),
            (
                Response::signalled("8", 3),
                r#"{"id":"8","error":"","publish":null,"subscribe":"","signal_entry":{"seq":3}}"#,
            ),
            (
                Response::barrier_reached("7"),
                r#"{"id":"7","error":"","publish":null,"subscribe":"","signal_entry":null}"#,
            ),
            (
                Response::item("6", &RawValue::from_string(r#"{"a":"b"}"#.into()).unwrap()),
                r#"{"id":"6","error":"","publish":null,"subscribe":"{\"a\":\"b\"}","signal_entry":null}"#,
            ),
            (
                Response::error("1", "boom"),
                r#"{"id":"1","error":"\"boom\"","publish":null,"subscribe":"","signal_entry":null}"#,
            ),
        ];
        for (resp, want) in cases {
            assert_eq!(serde_json::to_string(&resp).unwrap(), want);
            let back: Response = serde_json::from_str(want).unwrap();
            assert_eq!(back, resp);
        }
    }

    #[test]
    fn response_kinds() {
        assert_eq!(
            Response::published("1", 2).kind(),
            ResponseKind::Published(2)
        );
        assert_eq!(
            Response::signalled("1", 5).kind(),
            ResponseKind::Signalled(5)
        );
        assert_eq!(
            Response::barrier_reached("1").kind(),
            ResponseKind::BarrierReached
        );
        assert_eq!(Response::error("1", "x").kind(), ResponseKind::Error);
        let mut mixed = Response::published("1", 1);
        mixed.signal_entry = Some(SeqResponse { seq: 1 });
        assert_eq!(mixed.kind(), ResponseKind::Mixed);
    }

    #[test]
    fn null_error_and_subscribe_read_as_empty() {
        let r: Response = serde_json::from_str(
            r#"{"id":"1","error":null,"publish":null,"subscribe":null,"signal_entry":null}"#,
        )
        .unwrap();
        assert_eq!(r.kind(), ResponseKind::BarrierReached);
    }

    #[test]
    fn parses_go_rust_and_legacy_requests() {
        let go = "{\"id\":\"4\",\"is_cancel\":false,\"publish\":{\"topic\":\"t\",\"payload\":\"16.0.0.3:4001\"}}\n";
        let req: Request = serde_json::from_str(go).unwrap();
        match req.into_op() {
            Some(Op::Publish(p)) => assert_eq!(p.payload.get(), "\"16.0.0.3:4001\""),
            other => panic!("unexpected {other:?}"),
        }

        let legacy = r#"{"id":"0","publish":null,"subscribe":null,"barrier":{"state":"s","target":3},"signal_entry":null}"#;
        let req: Request = serde_json::from_str(legacy).unwrap();
        assert!(!req.is_cancel);
        match req.into_op() {
            Some(Op::Barrier(b)) => assert_eq!((b.state.as_str(), b.target), ("s", 3)),
            other => panic!("unexpected {other:?}"),
        }

        let none: Request = serde_json::from_str(r#"{"id":"9","extra":1}"#).unwrap();
        assert!(none.into_op().is_none());
    }

    #[test]
    fn payload_is_verbatim_and_defaults_to_null() {
        let req: Request = serde_json::from_str(
            r#"{"id":"1","publish":{"topic":"t","payload":{"big":12345678901234567890,"html":"\u003ca\u003e"}}}"#,
        )
        .unwrap();
        assert_eq!(
            req.publish.unwrap().payload.get(),
            r#"{"big":12345678901234567890,"html":"\u003ca\u003e"}"#
        );
        let req: Request = serde_json::from_str(r#"{"id":"1","publish":{"topic":"t"}}"#).unwrap();
        assert_eq!(req.publish.unwrap().payload.get(), "null");
    }

    #[test]
    fn barrier_targets_negative_and_huge() {
        let b: BarrierRequest = serde_json::from_str(r#"{"state":"s","target":-4}"#).unwrap();
        assert_eq!(b.target, -4);
        let b: BarrierRequest =
            serde_json::from_str(r#"{"state":"s","target":18446744073709551615}"#).unwrap();
        assert_eq!(b.target, i64::MAX);
        assert!(serde_json::from_str::<BarrierRequest>(r#"{"state":"s","target":1.5}"#).is_err());
    }

    #[test]
    fn requests_serialise_like_sdk_rust() {
        let req = Request::new(
            "3",
            Op::SignalEntry(SignalEntryRequest { state: "s".into() }),
        );
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"id":"3","is_cancel":false,"signal_entry":{"state":"s"}}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::cancel("3")).unwrap(),
            r#"{"id":"3","is_cancel":true}"#
        );
    }
}
