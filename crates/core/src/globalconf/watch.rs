//! A security server's copy of the global configuration, downloaded from the
//! sources its [anchor](super::anchor) names and kept fresh.
//!
//! Every refresh the server asks its sources for the signed configuration:
//! the one that answered last time first, then the others in random order,
//! until one gives a usable copy. A copy is used only if an authority key of
//! the anchor signed it, it names the anchor's instance, it is consistent,
//! it has not expired, and it is no rollback (see [`super::highest`], which
//! holds across every source and mirror). A source that fails or offers a
//! refused copy is logged and the next one asked; the copy in use stays.
//!
//! A newer copy is kept in the data directory ([`super::kept`]) and its
//! version recorded before it is used, so a restart while no source answers
//! starts from it. The exchange path asks [`GlobalConfHandle::current`] on
//! every request, which refuses:
//! - `globalconf.invalid` while the server has no copy at all (a first start
//!   with no source answering, every copy offered refused), naming why;
//! - `globalconf.stale` once the copy in use has expired.
//!
//! The loop never gets stuck: every download is bounded ([`Bounds`]); after a
//! round in which no source answered it tries again after a jittered backoff
//! that starts at a second and never exceeds the refresh interval, so that a
//! source that comes back is used within one refresh. Verification and the
//! durable writes run on a blocking thread; a panic in a round is caught and
//! counts as that source failing. The log says when something changes, not at
//! every refresh. [`GlobalConfHandle::status`] says which source was used,
//! when, when the copy expires, and how each source last answered.

use std::{
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures_util::FutureExt;
use rand::{Rng, seq::SliceRandom};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::{
    anchor::Anchor,
    fetch::{Bounds, Fetched, Fetcher},
    highest::{self, Advance, HighestError, HighestStore, Version},
    kept::KeptCopy,
    signed,
    view::ConfView,
};
use crate::pki::{sha256, sign::VerifyingKey};

/// Why the exchange cannot proceed on the current configuration.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConfError {
    /// The server has no usable copy: none obtained yet, or the one given is
    /// forged, malformed or inconsistent.
    #[error("global configuration is not valid: {0}")]
    Invalid(String),
    /// The copy expired and no newer one arrived.
    #[error("global configuration expired at {0}; the authority's newer one has not arrived")]
    Stale(String),
}

impl ConfError {
    /// The refusal reason an exchange gets.
    pub fn reason(&self) -> crate::error::Reason {
        match self {
            ConfError::Invalid(_) => crate::error::Reason::GlobalconfInvalid,
            ConfError::Stale(_) => crate::error::Reason::GlobalconfStale,
        }
    }
}

/// How a server downloads its configuration.
#[derive(Debug, Clone, Copy)]
pub struct Download {
    /// How often the sources are asked for a new version.
    pub refresh: Duration,
    /// The bounds of each download.
    pub bounds: Bounds,
}

/// What a server knows of its copy and its sources.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// The serial of the copy in use.
    pub serial: Option<u64>,
    /// When the copy in use expires.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// Where the copy in use came from: a source, or the kept copy at a start.
    pub obtained_from: Option<String>,
    /// When this server obtained it.
    #[serde(with = "time::serde::rfc3339::option")]
    pub obtained_at: Option<OffsetDateTime>,
    /// When a source last confirmed or renewed it.
    #[serde(with = "time::serde::rfc3339::option")]
    pub checked_at: Option<OffsetDateTime>,
    /// The source that did: the one the server last used.
    pub checked_from: Option<String>,
    /// The authority keys (certificate SHA-256, hex) copies must be signed
    /// with: the anchor's, or those the copy in use announced.
    pub authority_keys: Vec<String>,
    /// Every source, in the anchor's order.
    pub sources: Vec<SourceStatus>,
}

/// How one source last answered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStatus {
    /// The source.
    pub location: String,
    /// When it last gave a usable answer.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_success: Option<OffsetDateTime>,
    /// When it last failed or offered a refused copy.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_failure: Option<OffsetDateTime>,
    /// Why, then (kept after a later success, for the operator).
    pub last_error: Option<String>,
}

/// What the watcher publishes after every round.
#[derive(Debug)]
struct Snapshot {
    view: Option<Arc<ConfView>>,
    /// Why there is no copy, when there is none.
    why_none: String,
    status: Status,
}

/// A cheap, cloneable handle to the server's current configuration.
#[derive(Debug, Clone)]
pub struct GlobalConfHandle {
    rx: watch::Receiver<Arc<Snapshot>>,
}

impl GlobalConfHandle {
    /// The configuration to exchange on, or why there is none.
    pub fn current(&self) -> Result<Arc<ConfView>, ConfError> {
        let snapshot = self.rx.borrow();
        let Some(view) = &snapshot.view else {
            return Err(ConfError::Invalid(snapshot.why_none.clone()));
        };
        if OffsetDateTime::now_utc() > view.expires_at() {
            return Err(ConfError::Stale(rfc3339(view.expires_at())));
        }
        Ok(view.clone())
    }

    /// Which source was used, when, and how every source last answered.
    pub fn status(&self) -> Status {
        self.rx.borrow().status.clone()
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Reads, verifies and indexes a file once, as a server would, but without
/// rollback protection (for tools that look at the configuration without
/// running a server).
pub fn read(path: &Path, anchors: &[VerifyingKey]) -> Result<Arc<ConfView>, ConfError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ConfError::Invalid(format!("cannot read {}: {e}", path.display())))?;
    verify(&bytes, None, anchors)
        .map(|(view, _)| view)
        .map_err(ConfError::Invalid)
}

/// Verifies a copy's signature with `keys`, and its instance, and indexes it.
fn verify(
    bytes: &[u8],
    instance: Option<&str>,
    keys: &[VerifyingKey],
) -> Result<(Arc<ConfView>, Version), String> {
    let (conf, digest) = signed::verify_with_digest(bytes, keys).map_err(|e| e.to_string())?;
    index(conf, digest, instance)
}

/// Checks a document's instance and indexes it.
fn index(
    conf: super::GlobalConf,
    digest: crate::pki::Fingerprint,
    instance: Option<&str>,
) -> Result<(Arc<ConfView>, Version), String> {
    if let Some(instance) = instance
        && conf.instance != instance
    {
        return Err(format!(
            "the configuration is of instance {:?}, the anchor's is {instance:?}",
            conf.instance
        ));
    }
    let serial = conf.serial;
    let view = ConfView::new(conf).map_err(|e| e.to_string())?;
    Ok((Arc::new(view), Version { serial, digest }))
}

/// How a copy is verified: [`verify`], or a stand-in in tests.
type Verifier =
    fn(&[u8], Option<&str>, &[VerifyingKey]) -> Result<(Arc<ConfView>, Version), String>;

/// What never changes while the server runs.
struct Fixed {
    anchor: Anchor,
    fetcher: Fetcher,
    store: HighestStore,
    kept: KeptCopy,
    verify: Verifier,
}

impl Fixed {
    /// Verifies a downloaded copy with the `trusted` keys and, if newer,
    /// keeps it and records its version. Blocking (fsync).
    fn accept(
        &self,
        bytes: &[u8],
        highest: Option<Version>,
        trusted: &[VerifyingKey],
    ) -> Result<Accepted, String> {
        let (view, version) = (self.verify)(bytes, self.anchor.instance.as_deref(), trusted)?;
        if OffsetDateTime::now_utc() > view.expires_at() {
            return Err(format!(
                "the copy (serial {}) expired at {}",
                version.serial,
                rfc3339(view.expires_at())
            ));
        }
        match highest::check(highest, version).map_err(|e| e.to_string())? {
            Advance::Same => Ok(Accepted {
                view,
                version,
                newer: false,
            }),
            Advance::Newer => {
                // Not used until kept and recorded, or a restart could roll it back.
                self.kept.save(bytes).map_err(|e| {
                    format!(
                        "cannot keep the copy in {}: {e}; retrying at every refresh",
                        self.kept.path().display()
                    )
                })?;
                self.store
                    .save(version)
                    .map_err(|e| format!("{e}; retrying at every refresh"))?;
                Ok(Accepted {
                    view,
                    version,
                    newer: true,
                })
            }
        }
    }

    /// The kept copy, if it is the recorded highest version: verified with
    /// the anchor's keys and those it announces itself (after a rotation the
    /// anchor may not name its signer, see [`signed::verify_kept`]). Blocking.
    fn kept_copy(&self, highest: Option<Version>) -> Option<Arc<ConfView>> {
        let bytes = match self.kept.load() {
            Ok(bytes) => bytes?,
            Err(e) => {
                quietly(
                    || tracing::warn!(path = %self.kept.path().display(), error = %e, "the kept global configuration cannot be read; downloading"),
                );
                return None;
            }
        };
        let kept = signed::verify_kept(&bytes, &self.anchor.keys)
            .map_err(|e| e.to_string())
            .and_then(|(conf, digest)| index(conf, digest, self.anchor.instance.as_deref()));
        match kept {
            Ok((view, version)) if Some(version) == highest => Some(view),
            Ok(_) => {
                quietly(
                    || tracing::warn!(path = %self.kept.path().display(), "the kept global configuration is not the highest recorded version; downloading"),
                );
                None
            }
            Err(why) => {
                quietly(
                    || tracing::warn!(path = %self.kept.path().display(), %why, "the kept global configuration is refused; downloading"),
                );
                None
            }
        }
    }
}

struct Accepted {
    view: Arc<ConfView>,
    version: Version,
    newer: bool,
}

/// What the watcher remembers of one source.
#[derive(Default)]
struct SourceMemory {
    /// The validator of the copy last accepted from it.
    etag: Option<String>,
    /// The SHA-256 of the bytes last accepted from it: unchanged bytes (a
    /// local file, a server without `ETag`) are not verified again.
    digest: Option<[u8; 32]>,
    /// The serial of the copy last accepted from it: its validators stand
    /// for "unchanged" only while that is the serial in use.
    serial: Option<u64>,
    status: SourceStatus,
}

/// The download loop's state.
struct Watcher {
    fixed: Arc<Fixed>,
    /// The authority keys copies must be signed with: the anchor's, until a
    /// copy announces others.
    trusted: Vec<VerifyingKey>,
    highest: Option<Version>,
    view: Option<Arc<ConfView>>,
    sources: Vec<SourceMemory>,
    /// The source that answered last.
    last_good: Option<usize>,
    obtained_from: Option<String>,
    obtained_at: Option<OffsetDateTime>,
    checked_at: Option<OffsetDateTime>,
    /// Rounds failed in a row.
    failures: u32,
    /// Whether the copy's expiry has been logged.
    expiry_logged: bool,
}

impl Watcher {
    /// Asks the sources, in order, until one gives a usable answer; true if
    /// one did.
    async fn round(&mut self) -> bool {
        let mut order: Vec<usize> = (0..self.sources.len())
            .filter(|&i| Some(i) != self.last_good)
            .collect();
        order.shuffle(&mut rand::rng());
        if let Some(last) = self.last_good {
            order.insert(0, last);
        }
        for i in order {
            let attempt = AssertUnwindSafe(self.attempt(i)).catch_unwind().await;
            let now = OffsetDateTime::now_utc();
            let location = &self.fixed.anchor.sources[i];
            let status = &mut self.sources[i].status;
            match attempt.unwrap_or_else(|panic| {
                Err(format!("failed unexpectedly ({})", panic_text(&panic)))
            }) {
                Ok(()) => {
                    if status.last_failure > status.last_success {
                        quietly(
                            || tracing::info!(source = %location, "global configuration source answers again"),
                        );
                    }
                    status.last_success = Some(now);
                    self.checked_at = Some(now);
                    self.last_good = Some(i);
                    self.failures = 0;
                    self.note_expiry();
                    return true;
                }
                Err(why) => {
                    if status.last_error.as_ref() != Some(&why)
                        || status.last_success > status.last_failure
                    {
                        quietly(
                            || tracing::warn!(source = %location, %why, "global configuration source refused; trying the next"),
                        );
                    }
                    status.last_failure = Some(now);
                    status.last_error = Some(why);
                }
            }
        }
        self.failures = self.failures.saturating_add(1);
        self.log_failed_round();
        self.note_expiry();
        false
    }

    /// Asks source `i` once.
    async fn attempt(&mut self, i: usize) -> Result<(), String> {
        let fixed = self.fixed.clone();
        let memory = &self.sources[i];
        let location = &fixed.anchor.sources[i];
        let current =
            self.view.is_some() && memory.serial == self.view.as_ref().map(|v| v.serial());
        let etag = memory.etag.as_deref().filter(|_| current);
        let fetched = fixed
            .fetcher
            .fetch(location, etag)
            .await
            .map_err(|e| e.to_string())?;
        let (bytes, etag) = match fetched {
            Fetched::Unchanged => return Ok(()),
            Fetched::Copy { bytes, etag } => (bytes, etag),
        };
        let digest = sha256(&bytes);
        if current && memory.digest == Some(digest) {
            return Ok(());
        }
        let accepted = {
            let fixed = fixed.clone();
            let highest = self.highest;
            let trusted = self.trusted.clone();
            tokio::task::spawn_blocking(move || fixed.accept(&bytes, highest, &trusted))
                .await
                .map_err(|e| format!("failed unexpectedly ({})", join_text(e)))??
        };
        let memory = &mut self.sources[i];
        memory.etag = etag;
        memory.digest = Some(digest);
        memory.serial = Some(accepted.version.serial);
        if accepted.newer || self.view.is_none() {
            let (serial, expires) = (accepted.version.serial, accepted.view.expires_at());
            quietly(
                || tracing::info!(serial, expires = %rfc3339(expires), source = %location, "global configuration loaded"),
            );
            self.highest = Some(accepted.version);
            self.trust_announced(&accepted.view);
            self.view = Some(accepted.view);
            self.obtained_from = Some(location.to_string());
            self.obtained_at = Some(OffsetDateTime::now_utc());
        }
        Ok(())
    }

    /// Trusts the authority keys `view` announces, if it announces any.
    fn trust_announced(&mut self, view: &ConfView) {
        let announced = view.authority_keys();
        if announced.is_empty() || announced == self.trusted.as_slice() {
            return;
        }
        self.trusted = announced.to_vec();
        let keys = key_ids(&self.trusted).join(", ");
        quietly(
            || tracing::info!(%keys, "the configuration announces the authority's keys; trusting them from now on"),
        );
    }

    fn log_failed_round(&self) {
        if self.failures != 1 {
            return;
        }
        match &self.view {
            None => quietly(|| {
                tracing::error!(
                    "no source gave a usable global configuration; exchanges are refused until one does"
                )
            }),
            Some(view) => {
                let (serial, expires) = (view.serial(), rfc3339(view.expires_at()));
                quietly(
                    || tracing::warn!(serial, %expires, "no source answered; exchanges go on with the copy in use until it expires"),
                );
            }
        }
    }

    /// Logs once when the copy in use has expired (whether its sources are
    /// down or still serve that copy).
    fn note_expiry(&mut self) {
        let expired = self
            .view
            .as_ref()
            .filter(|v| OffsetDateTime::now_utc() > v.expires_at());
        match expired {
            Some(view) if !self.expiry_logged => {
                let (serial, expired) = (view.serial(), rfc3339(view.expires_at()));
                quietly(
                    || tracing::error!(serial, %expired, "the global configuration expired and no source gave a newer one; exchanges are refused until one does"),
                );
                self.expiry_logged = true;
            }
            Some(_) => {}
            None => self.expiry_logged = false,
        }
    }

    /// The delay before the next round: the refresh interval after a
    /// success; after failures a backoff from one second, doubling, never
    /// beyond the refresh interval; jittered so that servers spread out.
    fn next_delay(&self, refresh: Duration) -> Duration {
        let mut rng = rand::rng();
        if self.failures == 0 {
            return refresh.mul_f64(rng.random_range(0.9..=1.0));
        }
        let backoff = Duration::from_secs(1 << self.failures.min(16).saturating_sub(1));
        backoff.min(refresh).mul_f64(rng.random_range(0.5..=1.0))
    }

    fn snapshot(&self) -> Snapshot {
        let why_none = if self.view.is_some() {
            String::new()
        } else {
            let reasons: Vec<String> = self
                .fixed
                .anchor
                .sources
                .iter()
                .zip(&self.sources)
                .map(|(l, m)| {
                    format!(
                        "{l}: {}",
                        m.status.last_error.as_deref().unwrap_or("not asked yet")
                    )
                })
                .collect();
            format!("no usable copy has been obtained; {}", reasons.join("; "))
        };
        Snapshot {
            view: self.view.clone(),
            why_none,
            status: Status {
                serial: self.view.as_ref().map(|v| v.serial()),
                expires_at: self.view.as_ref().map(|v| v.expires_at()),
                obtained_from: self.obtained_from.clone(),
                obtained_at: self.obtained_at,
                checked_at: self.checked_at,
                checked_from: self
                    .last_good
                    .map(|i| self.fixed.anchor.sources[i].to_string()),
                authority_keys: key_ids(&self.trusted),
                sources: self.sources.iter().map(|m| m.status.clone()).collect(),
            },
        }
    }
}

fn key_ids(keys: &[VerifyingKey]) -> Vec<String> {
    keys.iter().map(|k| k.key_id().to_string()).collect()
}

fn panic_text(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .map_or_else(|| "panic".to_string(), |m| format!("panic: {m}"))
}

fn join_text(e: tokio::task::JoinError) -> String {
    if e.is_panic() {
        panic_text(&e.into_panic())
    } else {
        e.to_string()
    }
}

/// Logs; a logger that panics (an unwritable stderr) does not take the
/// watcher with it.
fn quietly(log: impl FnOnce()) {
    let _ = std::panic::catch_unwind(AssertUnwindSafe(log));
}

/// Starts keeping the configuration the anchor names, in a background task
/// that ends when every handle is dropped. The highest version accepted is
/// read from (and recorded in) `data_dir`; a record that cannot be read is an
/// error. A server with a kept copy that is still valid starts from it at
/// once; one without waits for its first round of downloads.
pub async fn watch(
    anchor: Anchor,
    download: Download,
    data_dir: &Path,
) -> Result<GlobalConfHandle, HighestError> {
    watch_with(anchor, download, data_dir, verify).await
}

async fn watch_with(
    anchor: Anchor,
    download: Download,
    data_dir: &Path,
    verify: Verifier,
) -> Result<GlobalConfHandle, HighestError> {
    let data_dir: PathBuf = data_dir.to_path_buf();
    let started = tokio::task::spawn_blocking(move || {
        let store = HighestStore::in_dir(&data_dir);
        let highest = store.load()?;
        let fixed = Fixed {
            fetcher: Fetcher::new(download.bounds, &anchor),
            kept: KeptCopy::in_dir(&data_dir),
            anchor,
            store,
            verify,
        };
        let kept = fixed.kept_copy(highest);
        Ok::<_, HighestError>((fixed, highest, kept))
    })
    .await
    .map_err(|e| HighestError::Read {
        path: PathBuf::from(highest::FILE_NAME),
        source: std::io::Error::other(join_text(e)),
    })?;
    let (fixed, highest, kept) = started?;
    let mut watcher = Watcher {
        sources: fixed
            .anchor
            .sources
            .iter()
            .map(|l| SourceMemory {
                status: SourceStatus {
                    location: l.to_string(),
                    ..SourceStatus::default()
                },
                ..SourceMemory::default()
            })
            .collect(),
        obtained_from: kept
            .as_ref()
            .map(|_| format!("kept copy {}", fixed.kept.path().display())),
        obtained_at: kept.as_ref().map(|_| OffsetDateTime::now_utc()),
        trusted: fixed.anchor.keys.clone(),
        fixed: Arc::new(fixed),
        highest,
        view: None,
        last_good: None,
        checked_at: None,
        failures: 0,
        expiry_logged: false,
    };
    if let Some(kept) = kept {
        watcher.trust_announced(&kept);
        watcher.view = Some(kept);
    }
    let fresh = watcher
        .view
        .as_ref()
        .is_some_and(|v| OffsetDateTime::now_utc() <= v.expires_at());
    if let Some(view) = watcher.view.as_ref().filter(|_| fresh) {
        let (serial, expires) = (view.serial(), rfc3339(view.expires_at()));
        quietly(
            || tracing::info!(serial, %expires, "starting from the kept global configuration; downloading a newer one"),
        );
    } else {
        watcher.round().await;
    }
    let (tx, rx) = watch::channel(Arc::new(watcher.snapshot()));
    tokio::spawn(async move {
        let mut delay = if fresh {
            Duration::ZERO
        } else {
            watcher.next_delay(download.refresh)
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = tx.closed() => return,
            }
            watcher.round().await;
            tx.send_replace(Arc::new(watcher.snapshot()));
            delay = watcher.next_delay(download.refresh);
        }
    });
    Ok(GlobalConfHandle { rx })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::{
        durable::write_atomically,
        globalconf::{GlobalConf, anchor::Location},
        pki::{dev::signing_pair, sign::SigningKey},
    };

    const REFRESH: Duration = Duration::from_millis(50);

    struct Setup {
        dir: tempfile::TempDir,
        key: SigningKey,
        anchors: Vec<VerifyingKey>,
    }

    impl Setup {
        fn new() -> Self {
            let (cert, pkcs8) = signing_pair("authority").unwrap();
            Self {
                dir: tempfile::tempdir().unwrap(),
                key: SigningKey::from_pkcs8(&pkcs8, &cert).unwrap(),
                anchors: vec![VerifyingKey::from_cert(&cert).unwrap()],
            }
        }

        /// Source `n`'s file.
        fn file(&self, n: usize) -> PathBuf {
            self.dir.path().join(format!("source-{n}.json"))
        }

        fn data_dir(&self) -> PathBuf {
            self.dir.path().join("data")
        }

        /// A validly signed, empty federation of `instance` with `serial`,
        /// valid for `valid`.
        fn signed(&self, serial: u64, instance: &str, valid: time::Duration) -> String {
            signed::sign(&self.conf(serial, instance, valid), &self.key)
        }

        fn conf(&self, serial: u64, instance: &str, valid: time::Duration) -> GlobalConf {
            let now = OffsetDateTime::now_utc();
            GlobalConf {
                instance: instance.into(),
                serial,
                issued_at: now,
                expires_at: now + valid,
                trusted_cas: vec![],
                members: vec![],
                purposes: vec![],
                consent_authority: None,
                report_readers: vec![],
                authority_keys: vec![],
            }
        }

        /// Publishes serial `serial` of instance KZ at source `n`.
        fn publish(&self, n: usize, serial: u64) {
            self.write(
                n,
                self.signed(serial, "KZ", time::Duration::hours(1))
                    .as_bytes(),
            );
        }

        fn write(&self, n: usize, bytes: &[u8]) {
            write_atomically(&self.file(n), bytes).unwrap();
        }

        fn anchor(&self, sources: usize) -> Anchor {
            Anchor {
                instance: Some("KZ".into()),
                sources: (0..sources).map(|n| Location::File(self.file(n))).collect(),
                keys: self.anchors.clone(),
                tls_roots: vec![],
            }
        }

        async fn watch(&self, sources: usize) -> Result<GlobalConfHandle, HighestError> {
            self.watch_with(sources, verify).await
        }

        async fn watch_with(
            &self,
            sources: usize,
            verifier: Verifier,
        ) -> Result<GlobalConfHandle, HighestError> {
            let download = Download {
                refresh: REFRESH,
                bounds: Bounds {
                    max_bytes: 64 * 1024,
                    ..Bounds::default()
                },
            };
            watch_with(self.anchor(sources), download, &self.data_dir(), verifier).await
        }
    }

    /// Waits (at most 5 s) until `ok` holds of the handle.
    async fn until(handle: &GlobalConfHandle, what: &str, ok: impl Fn(&GlobalConfHandle) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !ok(handle) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never {what}; last {:?}, {:?}",
                handle.current(),
                handle.status()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn serial(n: u64) -> impl Fn(&GlobalConfHandle) -> bool {
        move |h| h.current().is_ok_and(|v| v.serial() == n)
    }

    /// Source `n` last failed with an error containing `text`.
    fn refused(n: usize, text: &'static str) -> impl Fn(&GlobalConfHandle) -> bool {
        move |h| {
            h.status().sources[n]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains(text))
        }
    }

    #[tokio::test]
    async fn a_refused_copy_leaves_the_one_in_use() {
        let s = Setup::new();
        s.publish(0, 5);
        let handle = s.watch(1).await.unwrap();
        assert_eq!(handle.current().unwrap().serial(), 5);
        let forged = s
            .signed(6, "KZ", time::Duration::hours(1))
            .replace("\"signature\": \"", "\"signature\": \"AAAA");
        for (bad, why) in [
            (
                b"{ not a configuration".to_vec(),
                "not a signed global configuration",
            ),
            (forged.into_bytes(), "signature"),
            (
                s.signed(9, "XX", time::Duration::hours(1)).into_bytes(),
                "of instance \"XX\", the anchor's is \"KZ\"",
            ),
            (
                s.signed(9, "KZ", -time::Duration::minutes(1)).into_bytes(),
                "expired at",
            ),
            (vec![b' '; 64 * 1024 + 1], "larger than the limit"),
        ] {
            s.write(0, &bad);
            until(&handle, why, refused(0, why)).await;
            assert_eq!(handle.current().unwrap().serial(), 5, "after {why}");
        }
        s.publish(0, 3);
        until(
            &handle,
            "a rollback refused",
            refused(0, "serial 3 is lower than the highest accepted 5"),
        )
        .await;
        s.write(0, s.signed(5, "KZ", time::Duration::hours(2)).as_bytes());
        until(
            &handle,
            "other content refused",
            refused(0, "accepted before with other content"),
        )
        .await;
        assert_eq!(handle.current().unwrap().serial(), 5);
        s.publish(0, 6);
        until(&handle, "serial 6", serial(6)).await;
        let status = handle.status();
        assert_eq!(status.serial, Some(6));
        assert_eq!(
            status.obtained_from,
            Some(format!("file:{}", s.file(0).display()))
        );
        assert!(
            status.checked_at.is_some() && status.expires_at.is_some(),
            "{status:?}"
        );
        let recorded = HighestStore::in_dir(&s.data_dir()).load().unwrap().unwrap();
        assert_eq!(recorded.serial, 6);
    }

    #[tokio::test]
    async fn the_next_source_is_used_when_one_fails() {
        let s = Setup::new();
        s.publish(0, 5);
        s.publish(1, 5);
        let handle = s.watch(2).await.unwrap();
        // Whichever answered first, both now fail in turn and the other serves.
        s.write(0, b"truncated {");
        s.publish(1, 6);
        until(&handle, "serial 6 from source 1", serial(6)).await;
        s.publish(0, 7);
        std::fs::remove_file(s.file(1)).unwrap();
        until(&handle, "serial 7 from source 0", serial(7)).await;
        until(
            &handle,
            "source 1 missing",
            refused(1, "cannot read the file"),
        )
        .await;
        assert_eq!(
            handle.status().obtained_from,
            Some(format!("file:{}", s.file(0).display()))
        );
        // A source behind (an older mirror) is refused too; the copy stays.
        s.write(0, b"truncated {");
        s.publish(1, 6);
        until(
            &handle,
            "source 1 behind",
            refused(1, "serial 6 is lower than the highest accepted 7"),
        )
        .await;
        until(
            &handle,
            "source 0 broken",
            refused(0, "not a signed global configuration"),
        )
        .await;
        assert_eq!(handle.current().unwrap().serial(), 7);
    }

    #[tokio::test]
    async fn no_source_at_first_start_is_invalid_until_one_answers() {
        let s = Setup::new();
        let handle = s.watch(1).await.unwrap();
        let Err(ConfError::Invalid(why)) = handle.current() else {
            panic!("served without a copy: {:?}", handle.current());
        };
        assert!(
            why.contains("no usable copy has been obtained")
                && why.contains("cannot read the file"),
            "{why}"
        );
        s.publish(0, 1);
        until(&handle, "serial 1", serial(1)).await;
    }

    #[tokio::test]
    async fn an_expired_copy_is_stale_until_a_newer_one_arrives() {
        let s = Setup::new();
        s.write(
            0,
            s.signed(5, "KZ", time::Duration::milliseconds(300))
                .as_bytes(),
        );
        let handle = s.watch(1).await.unwrap();
        assert_eq!(handle.current().unwrap().serial(), 5);
        until(&handle, "stale", |h| {
            matches!(h.current(), Err(ConfError::Stale(_)))
        })
        .await;
        s.publish(0, 6);
        until(&handle, "serial 6", serial(6)).await;
    }

    #[tokio::test]
    async fn a_restart_starts_from_the_kept_copy_and_remembers_the_highest() {
        let s = Setup::new();
        s.publish(0, 5);
        drop(s.watch(1).await.unwrap());
        std::fs::remove_file(s.file(0)).unwrap();
        let restarted = s.watch(1).await.unwrap();
        assert_eq!(
            restarted.current().unwrap().serial(),
            5,
            "no source, the kept copy"
        );
        let status = restarted.status();
        assert!(status.obtained_from.unwrap().starts_with("kept copy"));
        until(
            &restarted,
            "the source missing",
            refused(0, "cannot read the file"),
        )
        .await;
        drop(restarted);
        // An older copy offered at a restart is refused; the kept one serves.
        s.publish(0, 4);
        let again = s.watch(1).await.unwrap();
        until(
            &again,
            "the older one refused",
            refused(0, "serial 4 is lower than the highest accepted 5"),
        )
        .await;
        assert_eq!(again.current().unwrap().serial(), 5);
        drop(again);
        // A kept copy that is not the recorded version is not used.
        std::fs::remove_file(s.data_dir().join(highest::FILE_NAME)).unwrap();
        std::fs::remove_file(s.file(0)).unwrap();
        let reset = s.watch(1).await.unwrap();
        assert!(
            matches!(reset.current(), Err(ConfError::Invalid(_))),
            "{:?}",
            reset.current()
        );
    }

    #[tokio::test]
    async fn a_corrupt_record_is_a_startup_error() {
        let s = Setup::new();
        s.publish(0, 5);
        std::fs::create_dir_all(s.data_dir()).unwrap();
        std::fs::write(s.data_dir().join(highest::FILE_NAME), "serial=9\n").unwrap();
        let e = s.watch(1).await.unwrap_err();
        assert!(matches!(e, HighestError::Corrupt { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_newer_copy_is_not_used_until_kept_and_recorded() {
        let s = Setup::new();
        s.publish(0, 5);
        let handle = s.watch(1).await.unwrap();
        // A folder where the record's temporary file goes makes the write fail.
        let blocker = s.data_dir().join(format!("{}.tmp", highest::FILE_NAME));
        std::fs::create_dir(&blocker).unwrap();
        s.publish(0, 6);
        until(
            &handle,
            "refused while unrecorded",
            refused(0, "cannot record the highest accepted global configuration"),
        )
        .await;
        assert_eq!(handle.current().unwrap().serial(), 5);
        std::fs::remove_dir(&blocker).unwrap();
        until(&handle, "serial 6 once recorded", serial(6)).await;
    }

    /// Panics on a copy that starts with `panic`, like a verifier with a bug.
    fn panicking_verify(
        bytes: &[u8],
        instance: Option<&str>,
        anchors: &[VerifyingKey],
    ) -> Result<(Arc<ConfView>, Version), String> {
        if bytes.starts_with(b"panic") {
            panic!("verifier bug");
        }
        verify(bytes, instance, anchors)
    }

    #[tokio::test]
    async fn a_panic_in_a_check_does_not_stop_the_watcher() {
        let s = Setup::new();
        s.publish(0, 5);
        let handle = s.watch_with(1, panicking_verify).await.unwrap();
        s.write(0, b"panic");
        until(
            &handle,
            "refused after the panic",
            refused(0, "verifier bug"),
        )
        .await;
        s.publish(0, 6);
        until(&handle, "serial 6", serial(6)).await;
    }

    /// A log sink whose every write panics.
    struct PanickingWriter;

    impl Write for PanickingWriter {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            panic!("log sink broken");
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_logger_that_panics_does_not_stop_the_watcher() {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(|| PanickingWriter)
            .finish();
        // The test's runtime runs the watcher on this thread.
        let _guard = tracing::subscriber::set_default(subscriber);
        let s = Setup::new();
        s.publish(0, 5);
        let handle = s.watch(1).await.unwrap();
        s.write(0, b"{ not a configuration");
        until(
            &handle,
            "malformed",
            refused(0, "not a signed global configuration"),
        )
        .await;
        s.publish(0, 6);
        until(&handle, "serial 6", serial(6)).await;
    }

    #[tokio::test]
    async fn a_rotation_announced_in_advance_keeps_the_anchor_working() {
        let s = Setup::new();
        let (next_cert, next_pkcs8) = signing_pair("authority-next").unwrap();
        let next = SigningKey::from_pkcs8(&next_pkcs8, &next_cert).unwrap();
        let pem = |der: &[u8]| crate::pki::certs_to_pem(&[der.to_vec().into()]);
        let (current, upcoming) = (pem(s.key.cert_der()), pem(&next_cert));
        let signed = |serial, key: &SigningKey, announced: &[&String]| {
            let mut conf = s.conf(serial, "KZ", time::Duration::hours(1));
            conf.authority_keys = announced.iter().map(|p| p.to_string()).collect();
            signed::sign(&conf, key)
        };
        s.publish(0, 5);
        let handle = s.watch(1).await.unwrap();
        // Signed by the next key before it is announced: refused.
        s.write(0, signed(6, &next, &[]).as_bytes());
        until(
            &handle,
            "an unknown key refused",
            refused(0, "not a trusted anchor"),
        )
        .await;
        // Announced by the current key, then used.
        s.write(0, signed(7, &s.key, &[&current, &upcoming]).as_bytes());
        until(&handle, "serial 7", serial(7)).await;
        assert_eq!(handle.status().authority_keys.len(), 2);
        s.write(0, signed(8, &next, &[&upcoming]).as_bytes());
        until(&handle, "serial 8, signed by the next key", serial(8)).await;
        // The old key is no longer trusted once the announcement drops it.
        s.write(0, signed(9, &s.key, &[&current]).as_bytes());
        until(
            &handle,
            "the retired key refused",
            refused(0, "not a trusted anchor"),
        )
        .await;
        assert_eq!(handle.current().unwrap().serial(), 8);
        drop(handle);
        // A restart with the anchor of before the rotation starts from the
        // kept copy the next key signed, and goes on trusting that key.
        std::fs::remove_file(s.file(0)).unwrap();
        let restarted = s.watch(1).await.unwrap();
        assert_eq!(restarted.current().unwrap().serial(), 8);
        s.write(0, signed(10, &next, &[&upcoming]).as_bytes());
        until(&restarted, "serial 10 after the restart", serial(10)).await;
    }

    #[test]
    fn the_backoff_grows_and_never_passes_the_refresh() {
        let refresh = Duration::from_secs(60);
        let mut w = Watcher {
            fixed: Arc::new(Fixed {
                anchor: Anchor::of_file(PathBuf::new(), vec![]),
                fetcher: Fetcher::new(Bounds::default(), &Anchor::of_file(PathBuf::new(), vec![])),
                store: HighestStore::in_dir(Path::new(".")),
                kept: KeptCopy::in_dir(Path::new(".")),
                verify,
            }),
            trusted: vec![],
            highest: None,
            view: None,
            sources: vec![],
            last_good: None,
            obtained_from: None,
            obtained_at: None,
            checked_at: None,
            failures: 0,
            expiry_logged: false,
        };
        let mut delay = |failures| {
            w.failures = failures;
            w.next_delay(refresh)
        };
        for _ in 0..50 {
            let ok = delay(0);
            assert!(ok >= refresh.mul_f64(0.9) && ok <= refresh, "{ok:?}");
            let first = delay(1);
            assert!(
                first >= Duration::from_millis(500) && first <= Duration::from_secs(1),
                "{first:?}"
            );
            let fourth = delay(4);
            assert!(
                fourth >= Duration::from_secs(4) && fourth <= Duration::from_secs(8),
                "{fourth:?}"
            );
            for failures in [7, 40, u32::MAX] {
                let late = delay(failures);
                assert!(
                    late >= refresh / 2 && late <= refresh,
                    "{failures}: {late:?}"
                );
            }
        }
    }
}
