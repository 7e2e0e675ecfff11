//! A provider's view of revoked consents, and how fresh it is.
//!
//! The [`super::feed`] fills it from the consent authority's revocation
//! stream; the [`super::verify::ConsentVerifier`] reads it. The view is only
//! trusted while the authority has been heard from within `max_silence`
//! (every revocation and every heartbeat counts): past that, the revocation
//! status of every consent is unknown and consent-based calls are refused
//! (`consent.unverified`), so a provider cut off from the authority fails
//! closed instead of honouring revoked consents.
//!
//! Revocations are kept until the revoked consent's `not_after` (after which
//! its tokens are refused as expired anyway), so the set stays small.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

/// The default longest silence after which the view is stale: three missed
/// heartbeats of one second, leaving margin under the five seconds within
/// which a revocation must take effect.
pub const DEFAULT_MAX_SILENCE: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
struct Inner {
    revoked: HashMap<String, i64>,
    head: u64,
    last_heard_ms: Option<i64>,
}

/// The revocation status of one consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not revoked, as of a fresh view.
    Valid,
    /// Revoked: the authority's feed listed it.
    Revoked,
    /// The view is stale: the authority was last heard at this time (ms since
    /// the Unix epoch), or never.
    Unknown {
        /// When the authority was last heard from.
        last_heard_ms: Option<i64>,
    },
}

/// A shared, cloneable set of revoked consent ids with its freshness.
#[derive(Debug, Clone)]
pub struct RevocationSet {
    inner: Arc<RwLock<Inner>>,
    max_silence_ms: i64,
}

impl RevocationSet {
    /// An empty set, stale until the authority is first heard from.
    pub fn new(max_silence: Duration) -> Self {
        Self {
            inner: Arc::default(),
            max_silence_ms: i64::try_from(max_silence.as_millis()).unwrap_or(i64::MAX),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a revocation heard at `heard_ms`.
    pub(crate) fn revoke(&self, seq: u64, consent_id: &str, not_after: i64, heard_ms: i64) {
        let mut inner = self.write();
        inner.revoked.insert(consent_id.to_owned(), not_after);
        inner.head = inner.head.max(seq);
        inner.last_heard_ms = Some(heard_ms);
    }

    /// Records a heartbeat heard at `heard_ms`: every revocation up to `head`
    /// has been received. Expired revocations are dropped (`now` in seconds).
    pub(crate) fn heartbeat(&self, head: u64, heard_ms: i64) {
        let mut inner = self.write();
        inner.head = inner.head.max(head);
        inner.last_heard_ms = Some(heard_ms);
        let now = heard_ms.div_euclid(1000);
        inner.revoked.retain(|_, not_after| *not_after > now);
    }

    /// The highest revocation sequence number received (the feed's cursor).
    pub(crate) fn head(&self) -> u64 {
        self.read().head
    }

    /// When the authority was last heard from (ms since the Unix epoch).
    pub fn last_heard_ms(&self) -> Option<i64> {
        self.read().last_heard_ms
    }

    /// True if the authority was heard from within the allowed silence.
    pub fn is_fresh(&self, now_ms: i64) -> bool {
        self.read()
            .last_heard_ms
            .is_some_and(|at| now_ms.saturating_sub(at) <= self.max_silence_ms)
    }

    /// The status of `consent_id` at `now_ms`.
    pub fn status(&self, consent_id: &str, now_ms: i64) -> Status {
        let inner = self.read();
        let fresh = inner
            .last_heard_ms
            .is_some_and(|at| now_ms.saturating_sub(at) <= self.max_silence_ms);
        if !fresh {
            Status::Unknown {
                last_heard_ms: inner.last_heard_ms,
            }
        } else if inner.revoked.contains_key(consent_id) {
            Status::Revoked
        } else {
            Status::Valid
        }
    }

    /// The longest silence tolerated, in ms.
    pub(crate) fn max_silence_ms(&self) -> i64 {
        self.max_silence_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_until_heard_and_after_silence() {
        let set = RevocationSet::new(Duration::from_secs(3));
        assert_eq!(
            set.status("a", 1_000),
            Status::Unknown {
                last_heard_ms: None
            }
        );
        set.heartbeat(0, 10_000);
        assert_eq!(set.status("a", 13_000), Status::Valid);
        assert_eq!(
            set.status("a", 13_001),
            Status::Unknown {
                last_heard_ms: Some(10_000)
            }
        );
        set.revoke(4, "a", 100, 13_500);
        assert_eq!(set.status("a", 14_000), Status::Revoked);
        assert_eq!(set.status("b", 14_000), Status::Valid);
        assert_eq!(set.head(), 4);
        set.heartbeat(2, 14_000);
        assert_eq!(set.head(), 4, "the cursor never goes back");
        // Past its not_after (100 s) the revocation is dropped.
        set.heartbeat(4, 200_000);
        assert_eq!(set.status("a", 200_000), Status::Valid);
    }
}
