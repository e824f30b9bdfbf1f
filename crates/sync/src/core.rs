//! The sync semantics as a pure, synchronous state machine: no tokio, no I/O, no clock.
//!
//! Inputs are requests tagged with the connection they came from; outputs are [`Outgoing`]
//! replies addressed to connections. Counters ("states") and topics are global and outlive the
//! connections that touched them; barrier waiters and subscriptions belong to a connection and
//! end with it (or with an `is_cancel` for their id).
//!
//! Limits ([`SyncLimits`]): every state, topic, item, barrier waiter and subscription is charged
//! to the run its key belongs to (`run:<id>:...`; other keys share one bucket), at its length plus
//! a fixed estimate of its bookkeeping; a request that would take a run, or a topic, over its
//! limit is answered with an error and changes nothing. What ends (a released barrier, a
//! cancelled subscription, a dropped run) is credited back.
//!
//! Costs: a signal releases its waiters in O(released · log waiters) because waiters are kept
//! ordered by target; a publish costs O(subscribers) Arc clones; a subscribe replays the history
//! as O(history) Arc clones, never copying the payload text.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use serde_json::value::RawValue;
use tg_api::sync::{Op, Request, Response, RunKeys};

use crate::limits::{Limit, LimitExceeded, SyncLimits};

/// The core's maps: foldhash instead of SipHash, measured at about 6 % of the service's CPU on
/// pipelined signals. Its per-map random seed keeps crafted keys from colliding by design.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Charged per state or topic beyond its key: a map entry, the shared key and its bookkeeping.
const KEY_OVERHEAD: u64 = 64;
/// Charged per published item beyond its payload.
const ITEM_OVERHEAD: u64 = 48;
/// Charged per barrier waiter or subscription beyond its request id: its entry in the state or
/// topic and the connection's record of it.
const WAITER_OVERHEAD: u64 = 96;

/// Identifies a connection (or an in-process client) to the core.
pub type ConnId = u64;

/// One published item, shared by the topic history and every delivery of it.
#[derive(Debug)]
pub struct Item {
    raw: Box<RawValue>,
    /// The item as a JSON string literal (the `subscribe` field is double-encoded), computed at
    /// most once however many subscribers receive it.
    encoded: OnceLock<Box<str>>,
}

impl Item {
    pub fn new(raw: Box<RawValue>) -> Self {
        Item {
            raw,
            encoded: OnceLock::new(),
        }
    }

    /// The item's JSON text, exactly as published.
    pub fn raw(&self) -> &RawValue {
        &self.raw
    }

    /// The item's JSON text encoded as a JSON string, as it appears in a `subscribe` field.
    pub fn encoded(&self) -> &str {
        self.encoded
            .get_or_init(|| json_string(self.raw.get()).into_boxed_str())
    }
}

/// What the service answers to one request (or one subscription item).
#[derive(Debug, Clone)]
pub enum Reply {
    Published(u64),
    Signalled(u64),
    BarrierReached,
    Item(Arc<Item>),
    /// A plain-text message; it is JSON-encoded on the wire.
    Error(String),
}

/// A reply addressed to a connection.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub conn: ConnId,
    pub id: Arc<str>,
    pub reply: Reply,
}

impl Outgoing {
    pub fn to_response(&self) -> Response {
        let id = self.id.to_string();
        match &self.reply {
            Reply::Published(seq) => Response::published(id, *seq),
            Reply::Signalled(seq) => Response::signalled(id, *seq),
            Reply::BarrierReached => Response::barrier_reached(id),
            Reply::Item(item) => Response::item(id, item.raw()),
            Reply::Error(msg) => Response::error(id, msg),
        }
    }

    /// The wire text of this reply; identical to serialising [`Outgoing::to_response`].
    pub fn encode(&self) -> String {
        let mut v = Vec::with_capacity(96 + self.id.len());
        self.encode_into(&mut v);
        // Only JSON text (UTF-8) was written.
        String::from_utf8(v).unwrap_or_default()
    }

    /// Appends the wire text of this reply to `out` without building an intermediate
    /// `Response` or any temporary string: this runs once per reply on the service's hot path.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        out.extend_from_slice(b"{\"id\":");
        push_json_string(out, &self.id);
        // Writing to a Vec cannot fail.
        match &self.reply {
            Reply::Published(seq) => {
                out.extend_from_slice(b",\"error\":\"\",\"publish\":{\"seq\":");
                let _ = write!(out, "{seq}");
                out.extend_from_slice(b"},\"subscribe\":\"\",\"signal_entry\":null}");
            }
            Reply::Signalled(seq) => {
                out.extend_from_slice(
                    b",\"error\":\"\",\"publish\":null,\"subscribe\":\"\",\"signal_entry\":{\"seq\":",
                );
                let _ = write!(out, "{seq}");
                out.extend_from_slice(b"}}");
            }
            Reply::BarrierReached => {
                out.extend_from_slice(
                    b",\"error\":\"\",\"publish\":null,\"subscribe\":\"\",\"signal_entry\":null}",
                );
            }
            Reply::Item(item) => {
                out.extend_from_slice(b",\"error\":\"\",\"publish\":null,\"subscribe\":");
                out.extend_from_slice(item.encoded().as_bytes());
                out.extend_from_slice(b",\"signal_entry\":null}");
            }
            Reply::Error(msg) => {
                // The message is itself JSON-encoded into the string (trap T12).
                out.extend_from_slice(b",\"error\":");
                push_json_string(out, &json_string(msg));
                out.extend_from_slice(
                    b",\"publish\":null,\"subscribe\":\"\",\"signal_entry\":null}",
                );
            }
        }
    }
}

/// Appends `text` as a JSON string literal; ids are plain digits in every client, which need
/// no escaping and take the fast path.
fn push_json_string(out: &mut Vec<u8>, text: &str) {
    if text
        .bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        // Serialising a str cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
    }
}

fn json_string(text: &str) -> String {
    // Serialising a str cannot fail; the fallback only keeps this path free of panics.
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// What [`Core::handle`] did with a request, for the driver's logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    Applied,
    Cancelled,
    /// The request named no operation; nothing was done and nothing is sent.
    NoOp,
}

/// Counts of what the core holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreStats {
    pub states: usize,
    pub topics: usize,
    pub waiters: usize,
    pub subscriptions: usize,
    /// Connections that currently hold a waiter or a subscription.
    pub active_connections: usize,
}

/// What [`Core::drop_prefix`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub states: usize,
    pub topics: usize,
}

#[derive(Debug, Clone)]
struct Waiter {
    conn: ConnId,
    id: Arc<str>,
}

#[derive(Debug, Default)]
struct State {
    count: u64,
    /// Keyed by (target, token): the smallest target is always first, and the token keeps
    /// equal targets apart and lets a cancel find its waiter in O(log n).
    waiters: BTreeMap<(i64, u64), Waiter>,
}

#[derive(Debug, Default)]
struct Topic {
    items: Vec<Arc<Item>>,
    /// Sum of the items' payload lengths, for `max_topic_bytes`.
    bytes: u64,
    subs: BTreeMap<u64, Waiter>,
}

#[derive(Debug, Clone)]
enum Handle {
    Barrier {
        state: Arc<str>,
        target: i64,
        token: u64,
    },
    Subscription {
        topic: Arc<str>,
        token: u64,
    },
}

impl Handle {
    fn token(&self) -> u64 {
        match self {
            Handle::Barrier { token, .. } | Handle::Subscription { token, .. } => *token,
        }
    }
}

/// The sync service state: counters with barrier waiters, topics with history and subscribers.
#[derive(Debug, Default)]
pub struct Core {
    limits: SyncLimits,
    /// Bytes charged per run id ("" for keys outside any run); absent when zero.
    usage: Map<Box<str>, u64>,
    /// Requests refused since the last [`Core::take_limit_hits`].
    hits: Vec<LimitExceeded>,
    states: Map<Arc<str>, State>,
    topics: Map<Arc<str>, Topic>,
    /// Per connection, its live waiters and subscriptions by request id (ids may repeat).
    conns: Map<ConnId, Map<Arc<str>, Vec<Handle>>>,
    /// Released waiters whose records in `conns` are not yet removed (see [`Core::settle`]).
    unsettled: Vec<(ConnId, Arc<str>, u64)>,
    next_token: u64,
    waiters: usize,
    subscriptions: usize,
}

impl Core {
    /// A core with the default [`SyncLimits`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A core that enforces `limits` (only the byte limits concern it).
    pub fn with_limits(limits: SyncLimits) -> Self {
        Core {
            limits,
            ..Self::default()
        }
    }

    /// The requests refused for a limit since the last call, oldest first (for the driver's
    /// warnings; each was already answered with an error).
    pub fn take_limit_hits(&mut self) -> Vec<LimitExceeded> {
        std::mem::take(&mut self.hits)
    }

    /// Bytes charged to run `run` (`""`: keys outside any run).
    pub fn run_bytes(&self, run: &str) -> u64 {
        self.usage.get(run).copied().unwrap_or(0)
    }

    /// Bytes charged to all runs together.
    pub fn retained_bytes(&self) -> u64 {
        self.usage.values().sum()
    }

    /// Applies one request from `conn`, appending the replies to send to `out`.
    pub fn handle(&mut self, conn: ConnId, req: Request, out: &mut Vec<Outgoing>) -> Handled {
        if req.is_cancel {
            self.cancel(conn, &req.id);
            return Handled::Cancelled;
        }
        let id: Arc<str> = Arc::from(req.id.as_str());
        match req.into_op() {
            Some(op) => {
                self.apply(conn, id, op, out);
                Handled::Applied
            }
            None => Handled::NoOp,
        }
    }

    /// Applies one operation from `conn` with request id `id`.
    pub fn apply(&mut self, conn: ConnId, id: Arc<str>, op: Op, out: &mut Vec<Outgoing>) {
        match op {
            Op::Publish(p) => self.publish(conn, id, &p.topic, p.payload, out),
            Op::Subscribe(s) => self.subscribe(conn, id, &s.topic, out),
            Op::Barrier(b) => self.barrier(conn, id, &b.state, b.target, out),
            Op::SignalEntry(s) => self.signal_entry(conn, id, &s.state, out),
        }
    }

    pub fn publish(
        &mut self,
        conn: ConnId,
        id: Arc<str>,
        topic: &str,
        payload: Box<RawValue>,
        out: &mut Vec<Outgoing>,
    ) {
        let len = payload.get().len() as u64;
        let max_payload = self.limits.max_payload_bytes as u64;
        if len > max_payload {
            let run = bucket(topic);
            let e = LimitExceeded::new(Limit::PayloadBytes, run, max_payload, 0, len);
            return self.refuse(conn, id, e, out);
        }
        let (exists, held) = self
            .topics
            .get(topic)
            .map_or((false, 0), |t| (true, t.bytes));
        let max_topic = self.limits.max_topic_bytes as u64;
        if held.saturating_add(len) > max_topic {
            let mut e = LimitExceeded::new(Limit::TopicBytes, bucket(topic), max_topic, held, len);
            e.topic = Some(topic.to_owned());
            return self.refuse(conn, id, e, out);
        }
        let cost = len + ITEM_OVERHEAD + if exists { 0 } else { key_cost(topic) };
        if let Err(e) = self.charge(topic, cost) {
            return self.refuse(conn, id, e, out);
        }
        let item = Arc::new(Item::new(payload));
        self.ensure_topic(topic);
        let Some(t) = self.topics.get_mut(topic) else {
            return;
        };
        t.items.push(Arc::clone(&item));
        t.bytes += len;
        let seq = t.items.len() as u64;
        out.reserve(1 + t.subs.len());
        out.push(Outgoing {
            conn,
            id,
            reply: Reply::Published(seq),
        });
        for sub in t.subs.values() {
            out.push(Outgoing {
                conn: sub.conn,
                id: Arc::clone(&sub.id),
                reply: Reply::Item(Arc::clone(&item)),
            });
        }
    }

    pub fn subscribe(&mut self, conn: ConnId, id: Arc<str>, topic: &str, out: &mut Vec<Outgoing>) {
        let new_key = if self.topics.contains_key(topic) {
            0
        } else {
            key_cost(topic)
        };
        if let Err(e) = self.charge(topic, waiter_cost(&id) + new_key) {
            return self.refuse(conn, id, e, out);
        }
        let token = self.token();
        let key = self.ensure_topic(topic);
        let Some(t) = self.topics.get_mut(topic) else {
            return;
        };
        out.reserve(t.items.len());
        for item in &t.items {
            out.push(Outgoing {
                conn,
                id: Arc::clone(&id),
                reply: Reply::Item(Arc::clone(item)),
            });
        }
        t.subs.insert(
            token,
            Waiter {
                conn,
                id: Arc::clone(&id),
            },
        );
        self.subscriptions += 1;
        self.add_handle(conn, id, Handle::Subscription { topic: key, token });
    }

    pub fn barrier(
        &mut self,
        conn: ConnId,
        id: Arc<str>,
        state: &str,
        target: i64,
        out: &mut Vec<Outgoing>,
    ) {
        let count = self.count(state);
        if target <= clamp(count) {
            out.push(Outgoing {
                conn,
                id,
                reply: Reply::BarrierReached,
            });
            return;
        }
        let new_key = if self.states.contains_key(state) {
            0
        } else {
            key_cost(state)
        };
        if let Err(e) = self.charge(state, waiter_cost(&id) + new_key) {
            return self.refuse(conn, id, e, out);
        }
        let token = self.token();
        let key = self.ensure_state(state);
        let Some(s) = self.states.get_mut(state) else {
            return;
        };
        s.waiters.insert(
            (target, token),
            Waiter {
                conn,
                id: Arc::clone(&id),
            },
        );
        self.waiters += 1;
        self.add_handle(
            conn,
            id,
            Handle::Barrier {
                state: key,
                target,
                token,
            },
        );
    }

    pub fn signal_entry(
        &mut self,
        conn: ConnId,
        id: Arc<str>,
        state: &str,
        out: &mut Vec<Outgoing>,
    ) {
        // Signalling an existing state costs nothing, so a run over its limit can still finish
        // the barriers it has.
        if !self.states.contains_key(state)
            && let Err(e) = self.charge(state, key_cost(state))
        {
            return self.refuse(conn, id, e, out);
        }
        self.ensure_state(state);
        let Some(s) = self.states.get_mut(state) else {
            return;
        };
        s.count = s.count.saturating_add(1);
        let count = s.count;
        out.push(Outgoing {
            conn,
            id,
            reply: Reply::Signalled(count),
        });
        let mut released = Vec::new();
        while let Some(entry) = s.waiters.first_entry() {
            if entry.key().0 > clamp(count) {
                break;
            }
            let ((_, token), waiter) = entry.remove_entry();
            released.push((token, waiter));
        }
        self.waiters = self.waiters.saturating_sub(released.len());
        out.reserve(released.len());
        // Credited once for all: a 10,000-waiter release is on the hot path.
        let credit: u64 = released.iter().map(|(_, w)| waiter_cost(&w.id)).sum();
        self.release(state, credit);
        // The connections' records of these waiters are removed later (`settle`), so that the
        // replies can be encoded and written first: that bookkeeping was about 40 % of a
        // 10,000-waiter release's time under the lock, all before the first write.
        self.settle();
        self.unsettled.reserve(released.len());
        for (token, waiter) in released {
            self.unsettled
                .push((waiter.conn, Arc::clone(&waiter.id), token));
            out.push(Outgoing {
                conn: waiter.conn,
                id: waiter.id,
                reply: Reply::BarrierReached,
            });
        }
    }

    /// Removes the connection-side records of the waiters released since the last call.
    ///
    /// A release leaves them for later so that its replies go out first. Until then they are
    /// harmless: records are matched by token, so a cancel or disconnect that meets one finds no
    /// waiter behind it and changes nothing. What they would skew, the active connection count
    /// and the memory held, is settled by [`Core::stats`], by the next release, and by the
    /// service after each batch's replies are encoded.
    pub fn settle(&mut self) {
        for (conn, id, token) in std::mem::take(&mut self.unsettled) {
            self.remove_handle(conn, &id, token);
        }
    }

    /// Stops the barrier(s) and subscription(s) `conn` started with request id `id`. Unknown ids
    /// are ignored. Nothing is sent.
    pub fn cancel(&mut self, conn: ConnId, id: &str) {
        let Some(handles) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(list) = handles.remove(id) else {
            return;
        };
        if handles.is_empty() {
            self.conns.remove(&conn);
        }
        for h in list {
            self.detach(id, &h);
        }
    }

    /// Forgets a connection: its waiters and subscriptions end; counters and topics stay.
    pub fn disconnect(&mut self, conn: ConnId) {
        let Some(handles) = self.conns.remove(&conn) else {
            return;
        };
        for (id, list) in handles {
            for h in list {
                self.detach(&id, &h);
            }
        }
    }

    /// Removes every state and topic whose key starts with `prefix` (a finished run's
    /// `run:<id>:`), together with their waiters and subscriptions, which get no reply.
    pub fn drop_prefix(&mut self, prefix: &str) -> Dropped {
        let state_keys: Vec<Arc<str>> = self
            .states
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        let topic_keys: Vec<Arc<str>> = self
            .topics
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        for key in &state_keys {
            if let Some(s) = self.states.remove(key) {
                self.waiters = self.waiters.saturating_sub(s.waiters.len());
                let mut cost = key_cost(key);
                for ((_, token), w) in s.waiters {
                    cost += waiter_cost(&w.id);
                    self.remove_handle(w.conn, &w.id, token);
                }
                self.release(key, cost);
            }
        }
        for key in &topic_keys {
            if let Some(t) = self.topics.remove(key) {
                self.subscriptions = self.subscriptions.saturating_sub(t.subs.len());
                let mut cost = key_cost(key) + t.bytes + ITEM_OVERHEAD * t.items.len() as u64;
                for (token, w) in t.subs {
                    cost += waiter_cost(&w.id);
                    self.remove_handle(w.conn, &w.id, token);
                }
                self.release(key, cost);
            }
        }
        Dropped {
            states: state_keys.len(),
            topics: topic_keys.len(),
        }
    }

    /// The current count of a state (0 if it was never signalled).
    pub fn count(&self, state: &str) -> u64 {
        self.states.get(state).map_or(0, |s| s.count)
    }

    /// A topic's full history, oldest first.
    pub fn history(&self, topic: &str) -> &[Arc<Item>] {
        self.topics.get(topic).map_or(&[], |t| t.items.as_slice())
    }

    pub fn stats(&mut self) -> CoreStats {
        self.settle();
        CoreStats {
            states: self.states.len(),
            topics: self.topics.len(),
            waiters: self.waiters,
            subscriptions: self.subscriptions,
            active_connections: self.conns.len(),
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token = self.next_token.wrapping_add(1);
        self.next_token
    }

    /// Creates the state on first use and returns its shared key. The entry API is avoided
    /// because it would allocate a key on every call.
    fn ensure_state(&mut self, state: &str) -> Arc<str> {
        if let Some((k, _)) = self.states.get_key_value(state) {
            return Arc::clone(k);
        }
        let key: Arc<str> = Arc::from(state);
        self.states.insert(Arc::clone(&key), State::default());
        key
    }

    fn ensure_topic(&mut self, topic: &str) -> Arc<str> {
        if let Some((k, _)) = self.topics.get_key_value(topic) {
            return Arc::clone(k);
        }
        let key: Arc<str> = Arc::from(topic);
        self.topics.insert(Arc::clone(&key), Topic::default());
        key
    }

    fn add_handle(&mut self, conn: ConnId, id: Arc<str>, handle: Handle) {
        self.conns
            .entry(conn)
            .or_default()
            .entry(id)
            .or_default()
            .push(handle);
    }

    /// Forgets the connection's record of a waiter or subscription that ended on the state or
    /// topic side (released, or its key dropped).
    fn remove_handle(&mut self, conn: ConnId, id: &str, token: u64) {
        let Some(handles) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Some(list) = handles.get_mut(id) {
            list.retain(|h| h.token() != token);
            if list.is_empty() {
                handles.remove(id);
            }
        }
        if handles.is_empty() {
            self.conns.remove(&conn);
        }
    }

    /// Removes a waiter or subscription (request id `id`) from its state or topic (the
    /// connection side is gone).
    fn detach(&mut self, id: &str, handle: &Handle) {
        match handle {
            Handle::Barrier {
                state,
                target,
                token,
            } => {
                if let Some(s) = self.states.get_mut(&**state)
                    && s.waiters.remove(&(*target, *token)).is_some()
                {
                    self.waiters = self.waiters.saturating_sub(1);
                    self.release(state, waiter_cost(id));
                }
            }
            Handle::Subscription { topic, token } => {
                if let Some(t) = self.topics.get_mut(&**topic)
                    && t.subs.remove(token).is_some()
                {
                    self.subscriptions = self.subscriptions.saturating_sub(1);
                    self.release(topic, waiter_cost(id));
                }
            }
        }
    }

    /// Charges `bytes` to the run of `key`, unless that takes the run over `max_run_bytes`.
    fn charge(&mut self, key: &str, bytes: u64) -> Result<(), LimitExceeded> {
        let run = bucket(key);
        let used = self.run_bytes(run);
        let max = self.limits.max_run_bytes as u64;
        if used.saturating_add(bytes) > max {
            return Err(LimitExceeded::new(Limit::RunBytes, run, max, used, bytes));
        }
        match self.usage.get_mut(run) {
            Some(u) => *u += bytes,
            None => {
                self.usage.insert(run.into(), bytes);
            }
        }
        Ok(())
    }

    /// Credits `bytes` back to the run of `key`.
    fn release(&mut self, key: &str, bytes: u64) {
        let run = bucket(key);
        if let Some(u) = self.usage.get_mut(run) {
            *u = u.saturating_sub(bytes);
            if *u == 0 {
                self.usage.remove(run);
            }
        }
    }

    /// Answers a refused request with the limit's error and records the hit.
    fn refuse(&mut self, conn: ConnId, id: Arc<str>, e: LimitExceeded, out: &mut Vec<Outgoing>) {
        out.push(Outgoing {
            conn,
            id,
            reply: Reply::Error(e.to_string()),
        });
        self.hits.push(e);
    }
}

/// The run a key is charged to: its run id, or `""` for keys outside any run.
fn bucket(key: &str) -> &str {
    RunKeys::run_of(key).unwrap_or("")
}

fn key_cost(key: &str) -> u64 {
    key.len() as u64 + KEY_OVERHEAD
}

fn waiter_cost(id: &str) -> u64 {
    id.len() as u64 + WAITER_OVERHEAD
}

fn clamp(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    fn send(core: &mut Core, conn: ConnId, json: &str) -> Vec<(ConnId, String)> {
        let req: Request = serde_json::from_str(json).unwrap();
        let mut out = Vec::new();
        core.handle(conn, req, &mut out);
        out.iter().map(|o| (o.conn, o.encode())).collect()
    }

    fn publish(topic: &str, id: &str, payload: &str) -> String {
        format!(
            r#"{{"id":"{id}","is_cancel":false,"publish":{{"topic":"{topic}","payload":{payload}}}}}"#
        )
    }

    fn subscribe(topic: &str, id: &str) -> String {
        format!(r#"{{"id":"{id}","subscribe":{{"topic":"{topic}"}}}}"#)
    }

    fn barrier(state: &str, id: &str, target: i64) -> String {
        format!(r#"{{"id":"{id}","barrier":{{"state":"{state}","target":{target}}}}}"#)
    }

    fn signal(state: &str, id: &str) -> String {
        format!(r#"{{"id":"{id}","signal_entry":{{"state":"{state}"}}}}"#)
    }

    fn reached(id: &str) -> String {
        format!(r#"{{"id":"{id}","error":"","publish":null,"subscribe":"","signal_entry":null}}"#)
    }

    fn signalled(id: &str, seq: u64) -> String {
        format!(
            r#"{{"id":"{id}","error":"","publish":null,"subscribe":"","signal_entry":{{"seq":{seq}}}}}"#
        )
    }

    fn published(id: &str, seq: u64) -> String {
        format!(
            r#"{{"id":"{id}","error":"","publish":{{"seq":{seq}}},"subscribe":"","signal_entry":null}}"#
        )
    }

    fn item(id: &str, encoded: &str) -> String {
        format!(
            r#"{{"id":"{id}","error":"","publish":null,"subscribe":{encoded},"signal_entry":null}}"#
        )
    }

    #[test]
    fn publish_numbers_items_and_feeds_live_subscribers() {
        let mut core = Core::new();
        assert_eq!(send(&mut core, 1, &subscribe("t", "6")), vec![]);
        assert_eq!(
            send(&mut core, 2, &publish("t", "4", r#""16.0.0.3:4001""#)),
            vec![
                (2, published("4", 1)),
                (1, item("6", r#""\"16.0.0.3:4001\"""#))
            ]
        );
        assert_eq!(
            send(&mut core, 2, &publish("t", "5", r#"{"a":[1,2]}"#)),
            vec![(2, published("5", 2)), (1, item("6", r#""{\"a\":[1,2]}""#))]
        );
        assert_eq!(core.history("t").len(), 2);
    }

    #[test]
    fn late_subscribers_replay_full_history_each() {
        let mut core = Core::new();
        for (i, p) in ["1", "\"two\"", "{\"three\":3}"].iter().enumerate() {
            send(&mut core, 1, &publish("t", &i.to_string(), p));
        }
        let want = vec![
            (2, item("7", r#""1""#)),
            (2, item("7", r#""\"two\"""#)),
            (2, item("7", r#""{\"three\":3}""#)),
        ];
        assert_eq!(send(&mut core, 2, &subscribe("t", "7")), want);
        // A second subscription on the same connection gets its own full stream.
        let second: Vec<_> = send(&mut core, 2, &subscribe("t", "8"));
        assert_eq!(second.len(), 3);
        assert!(
            second
                .iter()
                .all(|(c, s)| *c == 2 && s.starts_with(r#"{"id":"8""#))
        );
        // The publisher's own subscription sees its own items too.
        let out = send(&mut core, 2, &publish("t", "9", "null"));
        assert_eq!(
            out,
            vec![
                (2, published("9", 4)),
                (2, item("7", r#""null""#)),
                (2, item("8", r#""null""#))
            ]
        );
    }

    #[test]
    fn topics_and_states_are_separate_namespaces() {
        let mut core = Core::new();
        send(&mut core, 1, &publish("k", "0", "1"));
        assert_eq!(
            send(&mut core, 1, &signal("k", "1")),
            vec![(1, signalled("1", 1))]
        );
        assert_eq!(core.count("k"), 1);
        assert_eq!(core.history("k").len(), 1);
    }

    #[test]
    fn signal_entry_counts_from_one() {
        let mut core = Core::new();
        for n in 1..=5u64 {
            let id = n.to_string();
            assert_eq!(
                send(&mut core, n, &signal("s", &id)),
                vec![(n, signalled(&id, n))]
            );
        }
        assert_eq!(core.count("s"), 5);
        assert_eq!(core.count("other"), 0);
    }

    #[test]
    fn barrier_already_reached_answers_at_once() {
        let mut core = Core::new();
        send(&mut core, 1, &signal("s", "0"));
        send(&mut core, 1, &signal("s", "1"));
        assert_eq!(
            send(&mut core, 2, &barrier("s", "3", 2)),
            vec![(2, reached("3"))]
        );
        assert_eq!(
            send(&mut core, 2, &barrier("s", "4", 1)),
            vec![(2, reached("4"))]
        );
        assert_eq!(core.stats().waiters, 0);
    }

    #[test]
    fn zero_and_negative_targets_answer_at_once_even_on_unknown_states() {
        let mut core = Core::new();
        assert_eq!(
            send(&mut core, 1, &barrier("new", "0", 0)),
            vec![(1, reached("0"))]
        );
        assert_eq!(
            send(&mut core, 1, &barrier("new", "1", -7)),
            vec![(1, reached("1"))]
        );
        assert_eq!(
            send(&mut core, 1, &barrier("new", "2", i64::MIN)),
            vec![(1, reached("2"))]
        );
        assert_eq!(core.stats().waiters, 0);
    }

    #[test]
    fn barrier_fires_on_the_signal_that_reaches_it_and_only_once() {
        let mut core = Core::new();
        assert_eq!(send(&mut core, 1, &barrier("s", "10", 3)), vec![]);
        assert_eq!(send(&mut core, 2, &barrier("s", "11", 2)), vec![]);
        assert_eq!(
            send(&mut core, 3, &signal("s", "0")),
            vec![(3, signalled("0", 1))]
        );
        assert_eq!(
            send(&mut core, 3, &signal("s", "1")),
            vec![(3, signalled("1", 2)), (2, reached("11"))]
        );
        assert_eq!(
            send(&mut core, 3, &signal("s", "2")),
            vec![(3, signalled("2", 3)), (1, reached("10"))]
        );
        assert_eq!(
            send(&mut core, 3, &signal("s", "3")),
            vec![(3, signalled("3", 4))]
        );
        assert_eq!(core.stats().waiters, 0);
        assert_eq!(core.stats().active_connections, 0);
    }

    #[test]
    fn a_released_waiters_record_left_for_settle_changes_nothing() {
        let mut core = Core::new();
        send(&mut core, 1, &barrier("run:r:s", "b", 1));
        send(&mut core, 2, &signal("run:r:s", "0"));
        // Released; its record on connection 1 is not settled yet.
        assert_eq!(core.unsettled.len(), 1);
        let charged = core.run_bytes("r");
        // The same id again before the record is settled: a new waiter, which the settle of the
        // old record must leave alone.
        assert_eq!(send(&mut core, 1, &barrier("run:r:s", "b", 3)), vec![]);
        core.settle();
        assert_eq!(core.stats().waiters, 1);
        assert_eq!(core.stats().active_connections, 1);
        // A cancel of that id ends the new waiter, credited once.
        assert_eq!(send(&mut core, 1, r#"{"id":"b","is_cancel":true}"#), vec![]);
        assert_eq!(core.run_bytes("r"), charged);
        send(&mut core, 2, &signal("run:r:s", "1"));
        assert_eq!(
            send(&mut core, 2, &signal("run:r:s", "2")),
            vec![(2, signalled("2", 3))]
        );
        // A record left unsettled, then the connection cancels and goes: nothing is credited
        // twice, and nothing stays behind.
        send(&mut core, 1, &barrier("run:r:s", "c", 4));
        send(&mut core, 2, &signal("run:r:s", "3"));
        assert_eq!(core.unsettled.len(), 1);
        send(&mut core, 1, r#"{"id":"c","is_cancel":true}"#);
        core.disconnect(1);
        assert_eq!(core.run_bytes("r"), charged);
        assert_eq!(core.stats().active_connections, 0);
        assert!(core.unsettled.is_empty());
        assert!(core.conns.is_empty());
    }

    #[test]
    fn cancel_stops_barrier_and_subscription_and_sends_nothing() {
        let mut core = Core::new();
        send(&mut core, 1, &barrier("s", "1", 1));
        send(&mut core, 1, &subscribe("t", "2"));
        // Same id on another connection is someone else's.
        send(&mut core, 2, &barrier("s", "1", 1));
        assert_eq!(send(&mut core, 1, r#"{"id":"1","is_cancel":true}"#), vec![]);
        assert_eq!(send(&mut core, 1, r#"{"id":"2","is_cancel":true}"#), vec![]);
        assert_eq!(
            send(&mut core, 1, r#"{"id":"99","is_cancel":true}"#),
            vec![]
        );
        assert_eq!(send(&mut core, 9, r#"{"id":"1","is_cancel":true}"#), vec![]);
        assert_eq!(
            send(&mut core, 3, &signal("s", "0")),
            vec![(3, signalled("0", 1)), (2, reached("1"))]
        );
        assert_eq!(
            send(&mut core, 3, &publish("t", "1", "1")),
            vec![(3, published("1", 1))]
        );
        let stats = core.stats();
        assert_eq!((stats.waiters, stats.subscriptions), (0, 0));
    }

    fn error_of(wire: &str) -> String {
        let resp: Response = serde_json::from_str(wire).unwrap();
        assert_eq!(resp.kind(), tg_api::sync::ResponseKind::Error, "{wire}");
        serde_json::from_str::<String>(&resp.error).unwrap()
    }

    #[test]
    fn limits_refuse_with_a_named_error_and_change_nothing() {
        let mut core = Core::with_limits(SyncLimits {
            max_payload_bytes: 100,
            max_topic_bytes: 250,
            max_run_bytes: 2000,
            ..SyncLimits::default()
        });
        let a = "run:a:plan:p:case:c";
        let b = "run:b:plan:p:case:c";
        let small = format!("\"{}\"", "x".repeat(98));
        let big = format!("\"{}\"", "x".repeat(99));

        // Payload: 101 bytes of JSON text is one too many.
        let out = send(&mut core, 1, &publish(&format!("{a}:topics:t"), "1", &big));
        assert_eq!(out.len(), 1);
        let msg = error_of(&out[0].1);
        assert!(
            msg.contains("max_payload_bytes") && msg.contains("101"),
            "{msg}"
        );
        assert!(core.history(&format!("{a}:topics:t")).is_empty());
        assert_eq!(core.run_bytes("a"), 0);

        // Topic: two 100-byte items fit in 250, a third does not.
        for (i, seq) in [("2", 1), ("3", 2)] {
            assert_eq!(
                send(&mut core, 1, &publish(&format!("{a}:topics:t"), i, &small)),
                vec![(1, published(i, seq))]
            );
        }
        let out = send(
            &mut core,
            1,
            &publish(&format!("{a}:topics:t"), "4", &small),
        );
        let msg = error_of(&out[0].1);
        assert!(
            msg.contains("max_topic_bytes") && msg.contains(":topics:t"),
            "{msg}"
        );
        assert_eq!(core.history(&format!("{a}:topics:t")).len(), 2);

        // Run: junk topics of run a fill its budget...
        let mut refused = None;
        for i in 0..100 {
            let out = send(
                &mut core,
                1,
                &publish(&format!("{a}:topics:junk{i}"), "5", &small),
            );
            if out[0].1.contains(r#""error":"\""#) {
                refused = Some(error_of(&out[0].1));
                break;
            }
        }
        let msg = refused.expect("the run limit was never hit");
        assert!(
            msg.contains("max_run_bytes") && msg.contains(r#"run "a""#),
            "{msg}"
        );
        // (Fill what is left with the smallest thing there is, a new state.)
        for i in 0..100 {
            let out = send(&mut core, 1, &signal(&format!("{a}:states:{i}"), "5"));
            if out[0].1.contains(r#""error":"\""#) {
                break;
            }
        }
        let full = core.run_bytes("a");
        assert!(full <= 2000);
        // ...so nothing new of run a is accepted: states, barriers, subscriptions...
        for req in [
            signal(&format!("{a}:states:never-accepted"), "6"),
            barrier(&format!("{a}:states:never-accepted"), "7", 1),
            subscribe(&format!("{a}:topics:never-accepted"), "8"),
        ] {
            let out = send(&mut core, 1, &req);
            assert!(error_of(&out[0].1).contains("max_run_bytes"));
        }
        assert_eq!(core.run_bytes("a"), full);
        assert_eq!(core.count(&format!("{a}:states:never-accepted")), 0);
        // ...while run b is untouched, and a's existing state can still be signalled.
        assert_eq!(
            send(&mut core, 2, &signal(&format!("{b}:states:s"), "0")),
            vec![(2, signalled("0", 1))]
        );
        assert_eq!(
            send(
                &mut core,
                2,
                &publish(&format!("{b}:topics:t"), "1", &small)
            ),
            vec![(2, published("1", 1))]
        );
        let hits = core.take_limit_hits();
        assert_eq!(
            hits.iter().map(|h| h.limit).collect::<Vec<_>>(),
            [
                Limit::PayloadBytes,
                Limit::TopicBytes,
                Limit::RunBytes,
                Limit::RunBytes,
                Limit::RunBytes,
                Limit::RunBytes,
                Limit::RunBytes
            ]
        );
        assert!(hits.iter().all(|h| h.run.as_deref() == Some("a")));

        // Dropping the run gives everything back.
        core.drop_prefix("run:a:");
        assert_eq!(core.run_bytes("a"), 0);
        assert!(core.run_bytes("b") > 0);
        core.drop_prefix("run:b:");
        assert_eq!(core.retained_bytes(), 0);
    }

    #[test]
    fn waiters_and_subscriptions_are_charged_until_they_end() {
        let mut core = Core::new();
        send(&mut core, 1, &signal("run:a:states:s", "0"));
        let base = core.run_bytes("a");
        send(&mut core, 1, &barrier("run:a:states:s", "1", 2));
        send(&mut core, 1, &subscribe("run:a:topics:t", "2"));
        let busy = core.run_bytes("a");
        assert!(busy > base);
        // Released barrier and cancelled subscription are credited back; the topic key stays.
        send(&mut core, 2, &signal("run:a:states:s", "0"));
        send(&mut core, 1, r#"{"id":"2","is_cancel":true}"#);
        assert_eq!(core.run_bytes("a"), base + key_cost("run:a:topics:t"));
        send(&mut core, 1, &barrier("run:a:states:s", "3", 9));
        core.disconnect(1);
        assert_eq!(core.run_bytes("a"), base + key_cost("run:a:topics:t"));
    }

    #[test]
    fn cancel_with_a_body_only_cancels() {
        let mut core = Core::new();
        let out = send(
            &mut core,
            1,
            r#"{"id":"1","is_cancel":true,"signal_entry":{"state":"s"}}"#,
        );
        assert_eq!(out, vec![]);
        assert_eq!(core.count("s"), 0);
    }

    #[test]
    fn disconnect_drops_waiters_and_subscriptions_but_keeps_state() {
        let mut core = Core::new();
        send(&mut core, 1, &signal("s", "0"));
        send(&mut core, 1, &publish("t", "1", "\"x\""));
        send(&mut core, 1, &barrier("s", "2", 3));
        send(&mut core, 1, &subscribe("t", "3"));
        send(&mut core, 2, &barrier("s", "2", 2));
        core.disconnect(1);
        core.disconnect(1);
        core.disconnect(42);
        assert_eq!(
            send(&mut core, 2, &signal("s", "5")),
            vec![(2, signalled("5", 2)), (2, reached("2"))]
        );
        assert_eq!(
            send(&mut core, 3, &signal("s", "0")),
            vec![(3, signalled("0", 3))]
        );
        assert_eq!(
            send(&mut core, 3, &publish("t", "1", "1")),
            vec![(3, published("1", 2))]
        );
        assert_eq!(core.count("s"), 3);
        let stats = core.stats();
        assert_eq!(
            (stats.waiters, stats.subscriptions, stats.active_connections),
            (0, 0, 0)
        );
    }

    #[test]
    fn drop_prefix_removes_only_that_run() {
        let mut core = Core::new();
        send(&mut core, 1, &signal("run:a:plan:p:case:c:states:x", "0"));
        send(
            &mut core,
            1,
            &publish("run:a:plan:p:case:c:topics:t", "1", "1"),
        );
        send(
            &mut core,
            1,
            &barrier("run:a:plan:p:case:c:states:x", "2", 5),
        );
        send(
            &mut core,
            2,
            &subscribe("run:a:plan:p:case:c:run_events", "3"),
        );
        send(&mut core, 1, &signal("run:ab:plan:p:case:c:states:x", "4"));
        send(
            &mut core,
            1,
            &publish("run:b:plan:p:case:c:topics:t", "5", "1"),
        );
        let dropped = core.drop_prefix("run:a:");
        assert_eq!(
            dropped,
            Dropped {
                states: 1,
                topics: 2
            }
        );
        assert_eq!(core.count("run:a:plan:p:case:c:states:x"), 0);
        assert_eq!(core.count("run:ab:plan:p:case:c:states:x"), 1);
        assert!(core.history("run:a:plan:p:case:c:topics:t").is_empty());
        assert_eq!(core.history("run:b:plan:p:case:c:topics:t").len(), 1);
        let stats = core.stats();
        assert_eq!(
            (
                stats.states,
                stats.topics,
                stats.waiters,
                stats.subscriptions,
                stats.active_connections
            ),
            (1, 1, 0, 0, 0)
        );
        // Cancelling or closing what was dropped is harmless.
        send(&mut core, 1, r#"{"id":"2","is_cancel":true}"#);
        core.disconnect(2);
    }

    #[test]
    fn requests_without_an_operation_do_nothing() {
        let mut core = Core::new();
        let mut out = Vec::new();
        let req: Request = serde_json::from_str(r#"{"id":"1","publish":null}"#).unwrap();
        assert_eq!(core.handle(1, req, &mut out), Handled::NoOp);
        assert!(out.is_empty());
        assert_eq!(core.stats(), CoreStats::default());
    }

    #[test]
    fn payload_text_is_kept_verbatim() {
        let mut core = Core::new();
        let payload = r#"{"big":12345678901234567890,"f":1.0,"e":1e-7,"h":"\u003c&"}"#;
        send(&mut core, 1, &publish("t", "0", payload));
        assert_eq!(core.history("t")[0].raw().get(), payload);
        let out = send(&mut core, 2, &subscribe("t", "1"));
        let resp: Response = serde_json::from_str(&out[0].1).unwrap();
        assert_eq!(resp.subscribe, payload);
    }

    #[test]
    fn fast_encoding_matches_serde() {
        let item = Arc::new(Item::new(raw(r#"{"q":"a\"b\\c\n","u":"é😀"}"#)));
        for id in ["0", "18446744073709551615", "we\"ird\\id\u{1}", "ünï"] {
            for reply in [
                Reply::Published(7),
                Reply::Signalled(u64::MAX),
                Reply::BarrierReached,
                Reply::Item(Arc::clone(&item)),
                Reply::Error("it \"broke\"".into()),
            ] {
                let o = Outgoing {
                    conn: 1,
                    id: Arc::from(id),
                    reply,
                };
                assert_eq!(o.encode(), serde_json::to_string(&o.to_response()).unwrap());
            }
        }
    }

    #[derive(Debug, Clone)]
    enum BOp {
        Signal(usize),
        Barrier {
            conn: u64,
            state: usize,
            target: i64,
        },
        Disconnect(u64),
    }

    fn bop() -> impl Strategy<Value = BOp> {
        prop_oneof![
            3 => (0..3usize).prop_map(BOp::Signal),
            3 => (0..4u64, 0..3usize, -2..12i64)
                .prop_map(|(conn, state, target)| BOp::Barrier { conn, state, target }),
            1 => (0..4u64).prop_map(BOp::Disconnect),
        ]
    }

    #[derive(Debug, Clone)]
    enum TOp {
        Publish(usize),
        Subscribe { conn: u64, topic: usize },
        Disconnect(u64),
    }

    fn top() -> impl Strategy<Value = TOp> {
        prop_oneof![
            4 => (0..2usize).prop_map(TOp::Publish),
            2 => (0..4u64, 0..2usize).prop_map(|(conn, topic)| TOp::Subscribe { conn, topic }),
            1 => (0..4u64).prop_map(TOp::Disconnect),
        ]
    }

    #[derive(Debug, Clone)]
    enum AnyOp {
        Frame(u64, String),
        Disconnect(u64),
        DropPrefix(String),
    }

    fn any_op() -> impl Strategy<Value = AnyOp> {
        let key = prop_oneof![
            Just("run:a:k".to_owned()),
            Just("run:b:k".to_owned()),
            ".{0,6}"
        ];
        let id = prop_oneof![Just("1".to_owned()), Just("2".to_owned()), ".{0,4}"];
        let frame = (any::<bool>(), 0..5u8, key, id, any::<i64>()).prop_map(
            |(cancel, kind, key, id, target)| {
                let id = serde_json::to_string(&id).unwrap();
                let key = serde_json::to_string(&key).unwrap();
                let op = match kind {
                    0 => format!(r#""publish":{{"topic":{key},"payload":[{target}]}}"#),
                    1 => format!(r#""subscribe":{{"topic":{key}}}"#),
                    2 => format!(r#""barrier":{{"state":{key},"target":{target}}}"#),
                    3 => format!(r#""signal_entry":{{"state":{key}}}"#),
                    _ => r#""publish":null"#.to_owned(),
                };
                format!(r#"{{"id":{id},"is_cancel":{cancel},{op}}}"#)
            },
        );
        prop_oneof![
            6 => (0..3u64, frame).prop_map(|(c, f)| AnyOp::Frame(c, f)),
            1 => (0..3u64).prop_map(AnyOp::Disconnect),
            1 => prop_oneof![Just("run:a:".to_owned()), Just(String::new()), ".{0,3}"]
                .prop_map(AnyOp::DropPrefix),
        ]
    }

    proptest! {
        #[test]
        fn signal_entries_hand_out_one_to_n_exactly_once(conns in prop::collection::vec(0..50u64, 1..200)) {
            let mut core = Core::new();
            let mut seqs = Vec::new();
            for (i, conn) in conns.iter().enumerate() {
                let mut out = Vec::new();
                core.signal_entry(*conn, Arc::from(i.to_string().as_str()), "s", &mut out);
                prop_assert_eq!(out.len(), 1);
                prop_assert_eq!(out[0].conn, *conn);
                match out[0].reply {
                    Reply::Signalled(seq) => seqs.push(seq),
                    ref other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            seqs.sort_unstable();
            prop_assert_eq!(seqs, (1..=conns.len() as u64).collect::<Vec<_>>());
        }

        #[test]
        fn arbitrary_request_sequences_keep_the_books_straight(ops in prop::collection::vec(any_op(), 0..200)) {
            let mut core = Core::new();
            for op in ops {
                let mut out = Vec::new();
                match op {
                    AnyOp::Frame(conn, frame) => {
                        let req: Request = serde_json::from_str(&frame).unwrap();
                        core.handle(conn, req, &mut out);
                    }
                    AnyOp::Disconnect(conn) => core.disconnect(conn),
                    AnyOp::DropPrefix(prefix) => {
                        core.drop_prefix(&prefix);
                    }
                }
                for o in &out {
                    let wire = o.encode();
                    let back: Response = serde_json::from_str(&wire).unwrap();
                    prop_assert!(back.kind() != tg_api::sync::ResponseKind::Mixed);
                }
                // The counters agree with what the states and topics really hold.
                let waiters: usize = core.states.values().map(|s| s.waiters.len()).sum();
                let subs: usize = core.topics.values().map(|t| t.subs.len()).sum();
                let handles: usize = core.conns.values().flat_map(|h| h.values()).map(Vec::len).sum();
                // Released waiters' records may still be there, until settled.
                prop_assert_eq!(handles, waiters + subs + core.unsettled.len());
                core.settle();
                let handles: usize = core.conns.values().flat_map(|h| h.values()).map(Vec::len).sum();
                prop_assert_eq!(core.stats().waiters, waiters);
                prop_assert_eq!(core.stats().subscriptions, subs);
                prop_assert_eq!(handles, waiters + subs);
                // The bytes charged per run are exactly what its keys, items and handles cost.
                let mut want: HashMap<&str, u64> = HashMap::new();
                for (k, st) in &core.states {
                    *want.entry(bucket(k)).or_default() += key_cost(k)
                        + st.waiters.values().map(|w| waiter_cost(&w.id)).sum::<u64>();
                }
                for (k, t) in &core.topics {
                    *want.entry(bucket(k)).or_default() += key_cost(k)
                        + t.items.iter().map(|i| i.raw().get().len() as u64 + ITEM_OVERHEAD).sum::<u64>()
                        + t.subs.values().map(|w| waiter_cost(&w.id)).sum::<u64>();
                }
                want.retain(|_, v| *v > 0);
                let got: HashMap<&str, u64> = core.usage.iter().map(|(k, v)| (&**k, *v)).collect();
                prop_assert_eq!(got, want);
            }
        }

        #[test]
        fn barriers_fire_exactly_when_the_count_reaches_the_target(ops in prop::collection::vec(bop(), 0..120)) {
            let mut core = Core::new();
            let mut counts = [0i64; 3];
            // Model: live waiters as (conn, id, state, target).
            let mut live: Vec<(u64, String, usize, i64)> = Vec::new();
            for (step, op) in ops.iter().enumerate() {
                let id = step.to_string();
                let mut out = Vec::new();
                let mut expected: Vec<(u64, String)> = Vec::new();
                match *op {
                    BOp::Signal(state) => {
                        core.signal_entry(99, Arc::from(id.as_str()), &format!("s{state}"), &mut out);
                        counts[state] += 1;
                        prop_assert!(matches!(out.first().map(|o| &o.reply), Some(Reply::Signalled(n)) if *n as i64 == counts[state]));
                        out.remove(0);
                        live.retain(|(conn, wid, s, target)| {
                            if *s == state && *target <= counts[state] {
                                expected.push((*conn, wid.clone()));
                                false
                            } else {
                                true
                            }
                        });
                    }
                    BOp::Barrier { conn, state, target } => {
                        core.barrier(conn, Arc::from(id.as_str()), &format!("s{state}"), target, &mut out);
                        if target <= counts[state] {
                            expected.push((conn, id.clone()));
                        } else {
                            live.push((conn, id.clone(), state, target));
                        }
                    }
                    BOp::Disconnect(conn) => {
                        core.disconnect(conn);
                        live.retain(|(c, ..)| *c != conn);
                    }
                }
                let mut got: Vec<(u64, String)> = out
                    .iter()
                    .map(|o| {
                        assert!(matches!(o.reply, Reply::BarrierReached));
                        (o.conn, o.id.to_string())
                    })
                    .collect();
                got.sort();
                expected.sort();
                prop_assert_eq!(got, expected);
                prop_assert_eq!(core.stats().waiters, live.len());
            }
        }

        #[test]
        fn every_subscriber_sees_every_item_once_in_order(ops in prop::collection::vec(top(), 0..150)) {
            let mut core = Core::new();
            let mut published: [Vec<String>; 2] = [Vec::new(), Vec::new()];
            // (conn, sub id) -> (topic, items received, still live)
            let mut subs: HashMap<(u64, String), (usize, Vec<String>, bool)> = HashMap::new();
            for (step, op) in ops.iter().enumerate() {
                let id = step.to_string();
                let mut out = Vec::new();
                match *op {
                    TOp::Publish(topic) => {
                        let payload = format!("{{\"n\":{step}}}");
                        core.publish(7, Arc::from(id.as_str()), &format!("t{topic}"), raw(&payload), &mut out);
                        published[topic].push(payload);
                        prop_assert!(matches!(out[0].reply, Reply::Published(n) if n as usize == published[topic].len()));
                        out.remove(0);
                    }
                    TOp::Subscribe { conn, topic } => {
                        core.subscribe(conn, Arc::from(id.as_str()), &format!("t{topic}"), &mut out);
                        subs.insert((conn, id.clone()), (topic, Vec::new(), true));
                    }
                    TOp::Disconnect(conn) => {
                        core.disconnect(conn);
                        for ((c, _), sub) in subs.iter_mut() {
                            if *c == conn {
                                sub.2 = false;
                            }
                        }
                    }
                }
                for o in out {
                    let item = match o.reply {
                        Reply::Item(item) => item,
                        other => return Err(TestCaseError::fail(format!("unexpected {other:?}"))),
                    };
                    let sub = subs.get_mut(&(o.conn, o.id.to_string()));
                    prop_assert!(sub.as_ref().is_some_and(|s| s.2), "delivery to a dead or unknown subscription");
                    if let Some(sub) = sub {
                        sub.1.push(item.raw().get().to_owned());
                    }
                }
                // A live subscription has received exactly its topic's history so far.
                for (topic, received, alive) in subs.values() {
                    if *alive {
                        prop_assert_eq!(received, &published[*topic]);
                    }
                }
            }
        }
    }
}
