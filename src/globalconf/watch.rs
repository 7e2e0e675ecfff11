//! A security server's copy of the global configuration.
//!
//! The server is given a file path and the authority's trust anchor(s). A
//! background task re-reads the file every `refresh` interval and, when its bytes
//! changed, verifies it again. The exchange path asks [`GlobalConfHandle::current`]
//! on every request, which refuses:
//! - `globalconf.invalid` while the newest file is forged, malformed or
//!   inconsistent (the server does not fall back to an older copy: what it was
//!   given is wrong, and an operator must know);
//! - `globalconf.stale` once the verified copy has expired.
//!
//! A validly signed file with a lower serial than the one in use (a rollback) is
//! ignored with a warning.

use std::{path::PathBuf, sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::sync::watch;

use super::{signed, view::ConfView};
use crate::pki::sign::VerifyingKey;

/// Why the exchange cannot proceed on the current configuration.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConfError {
    /// The configuration is forged, malformed, inconsistent or missing.
    #[error("global configuration is not valid: {0}")]
    Invalid(String),
    /// The configuration expired and no newer one arrived.
    #[error("global configuration expired at {0}; the authority's newer one has not arrived")]
    Stale(String),
}

#[derive(Debug)]
enum State {
    Valid(Arc<ConfView>),
    Invalid(String),
}

/// A cheap, cloneable handle to the server's current configuration.
#[derive(Debug, Clone)]
pub struct GlobalConfHandle {
    rx: watch::Receiver<Arc<State>>,
}

impl GlobalConfHandle {
    /// The configuration to exchange on, or why there is none.
    pub fn current(&self) -> Result<Arc<ConfView>, ConfError> {
        match &**self.rx.borrow() {
            State::Invalid(why) => Err(ConfError::Invalid(why.clone())),
            State::Valid(view) => {
                if OffsetDateTime::now_utc() > view.expires_at() {
                    let at = view
                        .expires_at()
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default();
                    Err(ConfError::Stale(at))
                } else {
                    Ok(view.clone())
                }
            }
        }
    }

    /// Waits until the configuration changes (for tests and health reporting).
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

/// Reads, verifies and indexes the file once, as a server would (for tools
/// that look at the configuration without running a server).
pub fn read(path: &PathBuf, anchors: &[VerifyingKey]) -> Result<Arc<ConfView>, ConfError> {
    match load(path, anchors).1 {
        State::Valid(view) => Ok(view),
        State::Invalid(why) => Err(ConfError::Invalid(why)),
    }
}

/// Loads and verifies the file once.
fn load(path: &PathBuf, anchors: &[VerifyingKey]) -> (Vec<u8>, State) {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            return (
                Vec::new(),
                State::Invalid(format!("cannot read {}: {e}", path.display())),
            );
        }
    };
    let state = match signed::verify(&bytes, anchors) {
        Err(e) => State::Invalid(e.to_string()),
        Ok(conf) => match ConfView::new(conf) {
            Ok(view) => State::Valid(Arc::new(view)),
            Err(e) => State::Invalid(e.to_string()),
        },
    };
    (bytes, state)
}

fn log_state(state: &State) {
    match state {
        State::Valid(v) => {
            tracing::info!(serial = v.serial(), expires = %v.expires_at(), "global configuration loaded")
        }
        State::Invalid(why) => {
            tracing::error!(%why, "global configuration refused; exchanges are refused until a valid one arrives")
        }
    }
}

/// Loads the file now and keeps it fresh in a background task that ends when
/// every handle is dropped.
pub fn watch(path: PathBuf, anchors: Vec<VerifyingKey>, refresh: Duration) -> GlobalConfHandle {
    let (mut last_bytes, state) = load(&path, &anchors);
    log_state(&state);
    let (tx, rx) = watch::channel(Arc::new(state));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            let (bytes, state) = load(&path, &anchors);
            if bytes == last_bytes && !bytes.is_empty() {
                continue;
            }
            last_bytes = bytes;
            if let (State::Valid(new), State::Valid(old)) = (&state, &**tx.borrow())
                && new.serial() < old.serial()
            {
                tracing::warn!(
                    new = new.serial(),
                    current = old.serial(),
                    "ignoring a global configuration with a lower serial (rollback)"
                );
                continue;
            }
            log_state(&state);
            tx.send_replace(Arc::new(state));
        }
    });
    GlobalConfHandle { rx }
}
