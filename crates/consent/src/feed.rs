//! The provider side of revocation propagation: a task that keeps a
//! [`RevocationSet`] in step with the consent authority.
//!
//! It calls `WatchRevocations(since = what it already has)` at the address the
//! global configuration gives, over mutual TLS (presenting this security
//! server's TLS certificate, accepting only the authority's pinned one), and
//! applies each revocation as it arrives. The authority sends a heartbeat
//! every second; each message marks the view fresh. When the stream breaks or
//! stays silent longer than the set's `max_silence`, the task reconnects with
//! a short backoff, resuming from its cursor; meanwhile the view goes stale
//! on its own and the verifier refuses consent-based calls with
//! `consent.unverified` (fail closed).

use std::time::Duration;

use tokio::{sync::watch, task::JoinHandle};

use super::{
    channel::{Identity, pinned_channel},
    revocations::RevocationSet,
};
use kopir_core::{clock::now_ms, globalconf::GlobalConfHandle};
use kopir_proto::v1::{
    WatchRevocationsRequest, consent_service_client::ConsentServiceClient, revocation_event::Event,
};

/// How the feed connects and retries.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// First retry delay after a failure.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
}

impl Default for FeedOptions {
    fn default() -> Self {
        Self {
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// The running feed; stops when [`RevocationFeed::stop`] is called or it is
/// dropped.
#[derive(Debug)]
pub struct RevocationFeed {
    set: RevocationSet,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl RevocationFeed {
    /// Starts keeping `set` fresh from the consent authority named in `conf`,
    /// authenticating with this server's TLS `identity`.
    pub fn spawn(
        conf: GlobalConfHandle,
        identity: Identity,
        set: RevocationSet,
        options: FeedOptions,
    ) -> Self {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(conf, identity, set.clone(), options, stopped));
        Self {
            set,
            stop,
            task: Some(task),
        }
    }

    /// The set this feed fills.
    pub fn set(&self) -> &RevocationSet {
        &self.set
    }

    /// Stops the feed and waits for its task to end.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RevocationFeed {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Why one subscription ended.
#[derive(Debug, thiserror::Error)]
enum FeedError {
    #[error("the global configuration is not usable: {0}")]
    Conf(String),
    #[error("the global configuration names no consent authority")]
    NoAuthority,
    #[error("{0}")]
    Connect(String),
    #[error("the consent authority refused: {0}")]
    Status(#[from] tonic::Status),
    #[error("the consent authority was silent for {0} ms")]
    Silent(i64),
    #[error("the consent authority ended the stream")]
    Ended,
}

async fn run(
    conf: GlobalConfHandle,
    identity: Identity,
    set: RevocationSet,
    options: FeedOptions,
    mut stopped: watch::Receiver<bool>,
) {
    let mut delay = options.retry_min;
    loop {
        let outcome = tokio::select! {
            r = subscribe(&conf, &identity, &set, &options) => r,
            _ = super::until_stopped(&mut stopped) => return,
        };
        match outcome {
            // It had been connected: retry at once, then back off.
            Err(e @ (FeedError::Silent(_) | FeedError::Ended | FeedError::Status(_)))
                if set.is_fresh(now_ms()) =>
            {
                tracing::warn!(error = %e, "revocation feed interrupted; reconnecting");
                delay = options.retry_min;
            }
            // Nothing to follow: consent-based calls are refused as unverifiable.
            Err(e @ FeedError::NoAuthority) => tracing::debug!(error = %e, "no revocation feed"),
            Err(e) => {
                tracing::warn!(error = %e, retry_ms = delay.as_millis() as u64, "revocation feed unavailable; consent-based calls are refused while it is stale");
            }
            Ok(()) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = super::until_stopped(&mut stopped) => return,
        }
        delay = (delay * 2).min(options.retry_max);
    }
}

/// One subscription, until it fails.
async fn subscribe(
    conf: &GlobalConfHandle,
    identity: &Identity,
    set: &RevocationSet,
    options: &FeedOptions,
) -> Result<(), FeedError> {
    let view = conf.current().map_err(|e| FeedError::Conf(e.to_string()))?;
    let authority = view.consent_authority().ok_or(FeedError::NoAuthority)?;
    let channel = pinned_channel(
        &authority.address,
        authority.tls,
        (identity.0.clone(), identity.1.clone_key()),
        options.connect_timeout,
    )
    .map_err(|e| FeedError::Connect(e.to_string()))?;
    let silence = Duration::from_millis(u64::try_from(set.max_silence_ms()).unwrap_or(3000));
    let mut client = ConsentServiceClient::new(channel);
    let call = client.watch_revocations(WatchRevocationsRequest { since: set.head() });
    let mut stream = tokio::time::timeout(silence, call)
        .await
        .map_err(|_| FeedError::Silent(set.max_silence_ms()))??
        .into_inner();
    tracing::info!(address = %authority.address, since = set.head(), "revocation feed connected");
    loop {
        let message = tokio::time::timeout(silence, stream.message())
            .await
            .map_err(|_| FeedError::Silent(set.max_silence_ms()))??;
        let heard = now_ms();
        let Some(message) = message else {
            return Err(FeedError::Ended);
        };
        match message.event {
            // A kind of event this version does not know: not proof of freshness.
            None => {}
            Some(Event::Revoked(r)) => {
                tracing::info!(consent = %r.consent_id, seq = r.seq, "consent revoked");
                set.revoke(r.seq, &r.consent_id, r.not_after, heard);
            }
            Some(Event::Heartbeat(h)) => set.heartbeat(h.head, heard),
        }
    }
}
