//! [`SyncClient`]: the sync service client of a test instance.
//!
//! A typed, namespaced layer over [`tg_sync_client::Client`], which speaks the protocol (one
//! socket, pipelined numeric ids, subscriptions, close handshake, detached-publish grace). Names
//! are namespaced as sdk-go does, through [`tg_api::sync::RunKeys`]:
//! `run:<run>:plan:<plan>:case:<case>:states:<s>`, `...:topics:<t>` and `...:run_events`.
//!
//! Events published from synchronous code (success, failure, crash) are "detached": nobody
//! awaits them, so [`SyncClient::close`] waits (briefly) for their acknowledgements before it
//! closes the socket, else the last event of a run could be lost.

use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tg_api::events::Event;
use tg_api::sync::{ResponseKind, RunKeys};
use tg_sync_client::{Client, ClientError};

/// A sync operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot connect to the sync service at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tg_sync_client::WsError,
    },
    #[error("the sync service connection is closed")]
    Closed,
    #[error("sync service error: {0}")]
    Remote(String),
    #[error("the sync service sent an unexpected {kind:?} answer to {op}")]
    Unexpected {
        op: &'static str,
        kind: ResponseKind,
    },
    #[error("cannot encode the payload: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("cannot decode a subscription item: {0}")]
    Decode(#[source] serde_json::Error),
}

impl From<ClientError> for SyncError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Connect { url, source } => SyncError::Connect { url, source },
            ClientError::Closed => SyncError::Closed,
            ClientError::Remote { message } => SyncError::Remote(message),
            ClientError::Unexpected { op, kind } => SyncError::Unexpected { op, kind },
            ClientError::Encode(e) => SyncError::Encode(e),
        }
    }
}

/// A connection to the sync service, scoped to one run, plan and case. Cheap to clone; clones
/// share the socket.
#[derive(Clone)]
pub struct SyncClient {
    client: Client,
    keys: RunKeys,
}

impl std::fmt::Debug for SyncClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncClient")
            .field("prefix", &self.keys.prefix())
            .finish_non_exhaustive()
    }
}

impl SyncClient {
    /// Connects to `url` (`ws://host:port`); every key is prefixed with `prefix`
    /// (`run:<run>:plan:<plan>:case:<case>`, see [`crate::RunParams::sync_prefix`]).
    /// Must be called within a tokio runtime.
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<SyncClient, SyncError> {
        Ok(SyncClient {
            client: Client::connect(url).await?,
            keys: RunKeys::from_prefix(prefix),
        })
    }

    /// The full key of state `name`.
    pub fn state_key(&self, name: &str) -> String {
        self.keys.state(name)
    }

    /// The full key of topic `name`.
    pub fn topic_key(&self, name: &str) -> String {
        self.keys.topic(name)
    }

    /// The key of the run's event topic.
    pub fn events_key(&self) -> String {
        self.keys.run_events()
    }

    /// Increments state `name` and returns its new value (1 for the first signaller).
    pub async fn signal_entry(&self, state: &str) -> Result<u64, SyncError> {
        Ok(self.client.signal_entry(&self.state_key(state)).await?)
    }

    /// Waits until state `name` reaches `target`. A target `<= 0` returns at once without a
    /// request, as in sdk-go.
    pub async fn barrier(&self, state: &str, target: i64) -> Result<(), SyncError> {
        if target <= 0 {
            return Ok(());
        }
        Ok(self.client.barrier(&self.state_key(state), target).await?)
    }

    /// Signals `state`, then waits for it to reach `target`; returns this instance's sequence.
    pub async fn signal_and_wait(&self, state: &str, target: i64) -> Result<u64, SyncError> {
        let seq = self.signal_entry(state).await?;
        self.barrier(state, target).await?;
        Ok(seq)
    }

    /// Publishes `payload` on topic `name`; returns its 1-based position in the topic.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        payload: &T,
    ) -> Result<u64, SyncError> {
        self.publish_key(&self.topic_key(topic), payload).await
    }

    async fn publish_key<T: Serialize + ?Sized>(
        &self,
        key: &str,
        payload: &T,
    ) -> Result<u64, SyncError> {
        let payload = serde_json::value::to_raw_value(payload).map_err(SyncError::Encode)?;
        Ok(self.client.publish_raw(key, payload).await?)
    }

    /// Subscribes to topic `name`: a stream of every item ever published there, from the first,
    /// then live ones. Dropping the stream cancels the subscription.
    pub fn subscribe<T: DeserializeOwned>(
        &self,
        topic: &str,
    ) -> Result<Subscription<T>, SyncError> {
        self.subscribe_key(&self.topic_key(topic))
    }

    /// Subscribes to the run's `run_events` topic.
    pub fn subscribe_events(&self) -> Result<Subscription<Event>, SyncError> {
        self.subscribe_key(&self.events_key())
    }

    fn subscribe_key<T: DeserializeOwned>(&self, key: &str) -> Result<Subscription<T>, SyncError> {
        Ok(Subscription {
            inner: self.client.subscribe(key)?,
            _item: PhantomData,
        })
    }

    /// Publishes `payload` on `topic` and subscribes to it; the stream includes `payload`.
    pub async fn publish_subscribe<T: Serialize + DeserializeOwned>(
        &self,
        topic: &str,
        payload: &T,
    ) -> Result<(u64, Subscription<T>), SyncError> {
        let seq = self.publish(topic, payload).await?;
        let sub = self.subscribe(topic)?;
        Ok((seq, sub))
    }

    /// Publishes a lifecycle event to the run's `run_events` topic.
    pub async fn publish_event(&self, event: &Event) -> Result<u64, SyncError> {
        self.publish_key(&self.events_key(), event).await
    }

    /// Publishes an event without waiting for the answer; [`SyncClient::close`] waits for it.
    pub(crate) fn publish_event_detached(&self, event: &Event) -> Result<(), SyncError> {
        let payload = serde_json::value::to_raw_value(event).map_err(SyncError::Encode)?;
        Ok(self.client.publish_detached(&self.events_key(), payload)?)
    }

    /// Waits for detached publishes (at most 5 s), sends close 1000 and waits up to 2 s for the
    /// server's echo. Calls still pending afterwards fail with [`SyncError::Closed`].
    pub async fn close(&self) {
        let report = self.client.close().await;
        for error in &report.errors {
            eprintln!("tg-sdk: publishing an event failed: {error}");
        }
        if report.unacknowledged > 0 {
            eprintln!(
                "tg-sdk: {} event(s) were not acknowledged before close",
                report.unacknowledged
            );
        }
    }
}

/// A stream of subscription items (`futures::Stream<Item = Result<T, SyncError>>`).
///
/// An item that does not decode as `T` is yielded as [`SyncError::Decode`] and the stream goes
/// on; an error from the service ends it.
pub struct Subscription<T> {
    inner: tg_sync_client::Subscription,
    _item: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned> Subscription<T> {
    /// The next item; `None` when the subscription ended (connection closed or service error
    /// already yielded).
    pub async fn next(&mut self) -> Option<Result<T, SyncError>> {
        StreamExt::next(self).await
    }
}

impl<T: DeserializeOwned> Stream for Subscription<T> {
    type Item = Result<T, SyncError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Every field is Unpin, so the subscription is too.
        let this = self.get_mut();
        Pin::new(&mut this.inner).poll_next(cx).map(|item| {
            item.map(|r| {
                r.map_err(SyncError::from)
                    .and_then(|text| serde_json::from_str(&text).map_err(SyncError::Decode))
            })
        })
    }
}
