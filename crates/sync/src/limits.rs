//! [`SyncLimits`]: what one run may hold in the sync service, so that one run's junk cannot
//! exhaust the daemon's memory or file descriptors for the others.
//!
//! A run is the `<id>` of keys `run:<id>:...` (see `tg_api::sync::RunKeys::run_of`); keys outside
//! that layout share one bucket of their own. A request that would exceed a limit gets an error
//! response naming the limit (JSON-encoded, as sdk-rust needs, trap T12) and changes nothing; the
//! service logs a warning the first time a run hits each limit. Nothing is ever taken away from
//! what a run already holds, and identified connections are never closed for being idle (T9).

use std::fmt;

/// Resource limits of the sync service. Every field has a default suited to a shared daemon;
/// `serve` and [`crate::SyncService::spawn_with`] take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncLimits {
    /// Largest payload of one publish, in bytes of its JSON text. Default 64 MiB, what the
    /// service always accepted (the reference's 32 KiB broke large publishes). A websocket
    /// message larger than this plus [`SyncLimits::ENVELOPE_SLACK`] cannot be answered (its
    /// request id is not read) and closes its connection.
    pub max_payload_bytes: usize,
    /// Most payload bytes one topic retains (its full history is kept for late subscribers).
    /// Default 256 MiB.
    pub max_topic_bytes: usize,
    /// Most bytes one run retains across all its topics and states, counting payloads, keys and
    /// pending barriers and subscriptions at a fixed estimate each. Default 512 MiB. Resident
    /// memory may be somewhat higher: a delivered item also keeps its encoded form.
    pub max_run_bytes: usize,
    /// Most websocket connections one run may have. A connection belongs to the run of its first
    /// request; a request that would exceed this is refused, and the connection stays
    /// unidentified (so it can be closed under [`SyncLimits::max_unidentified_connections`]).
    /// Default 10,000.
    pub max_connections_per_run: usize,
    /// Most connections that have not sent a request yet (TCP connects without a handshake,
    /// websockets that stay silent). When a new one would exceed this, the oldest is closed, so
    /// idle sockets cannot keep a new run's clients out. Identified connections are never
    /// closed. Default 4,096 (at least 1 is used).
    pub max_unidentified_connections: usize,
    /// A fan-out to many connections (a barrier release, an item for many subscribers) is
    /// written in slices while the host has more runnable tasks than this (see `pace.rs`:
    /// thousands of instances woken at once otherwise starve each other past their SDK's
    /// deadlines). `None` never paces. Default 16 per CPU.
    pub fanout_pace_runnable: Option<u32>,
}

impl SyncLimits {
    /// Room for the request envelope around a payload of [`SyncLimits::max_payload_bytes`].
    pub const ENVELOPE_SLACK: usize = 1 << 20;

    /// The largest websocket message the server reads.
    pub fn max_message_bytes(&self) -> usize {
        self.max_payload_bytes.saturating_add(Self::ENVELOPE_SLACK)
    }
}

impl Default for SyncLimits {
    fn default() -> Self {
        SyncLimits {
            max_payload_bytes: 64 << 20,
            max_topic_bytes: 256 << 20,
            max_run_bytes: 512 << 20,
            max_connections_per_run: 10_000,
            max_unidentified_connections: 4_096,
            fanout_pace_runnable: Some(crate::pace::default_limit()),
        }
    }
}

/// Which limit a request hit; [`Limit::name`] is the `SyncLimits` field (and config key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    PayloadBytes,
    TopicBytes,
    RunBytes,
    ConnectionsPerRun,
}

impl Limit {
    pub fn name(self) -> &'static str {
        match self {
            Limit::PayloadBytes => "max_payload_bytes",
            Limit::TopicBytes => "max_topic_bytes",
            Limit::RunBytes => "max_run_bytes",
            Limit::ConnectionsPerRun => "max_connections_per_run",
        }
    }
}

/// A request was refused because it would exceed a limit. Its `Display` is the error text the
/// client receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitExceeded {
    pub limit: Limit,
    /// The run charged; `None` for keys outside the `run:<id>:` layout.
    pub run: Option<String>,
    /// The limit's value.
    pub max: u64,
    /// What is in use already (bytes, or connections).
    pub used: u64,
    /// What the request needed on top.
    pub wanted: u64,
    /// The topic, for [`Limit::TopicBytes`].
    pub topic: Option<String>,
}

impl LimitExceeded {
    pub(crate) fn new(limit: Limit, run: &str, max: u64, used: u64, wanted: u64) -> Self {
        LimitExceeded {
            limit,
            run: (!run.is_empty()).then(|| run.to_owned()),
            max,
            used,
            wanted,
            topic: None,
        }
    }

    fn scope(&self) -> String {
        match &self.run {
            Some(run) => format!("run {run:?}"),
            None => "keys outside any run".to_owned(),
        }
    }
}

impl fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.limit.name();
        let (max, used, wanted) = (self.max, self.used, self.wanted);
        match self.limit {
            Limit::PayloadBytes => write!(
                f,
                "sync limit {name} exceeded: a payload of {wanted} bytes is over the limit of \
                 {max} bytes"
            ),
            Limit::TopicBytes => write!(
                f,
                "sync limit {name} exceeded: topic {:?} retains {used} of {max} bytes, this \
                 payload needs {wanted} more",
                self.topic.as_deref().unwrap_or_default()
            ),
            Limit::RunBytes => write!(
                f,
                "sync limit {name} exceeded: {} retains {used} of {max} bytes, this request \
                 needs {wanted} more",
                self.scope()
            ),
            Limit::ConnectionsPerRun => write!(
                f,
                "sync limit {name} exceeded: {} already has {used} of {max} connections",
                self.scope()
            ),
        }
    }
}

impl std::error::Error for LimitExceeded {}
