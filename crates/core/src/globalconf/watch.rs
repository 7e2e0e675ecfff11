//! A security server's copy of the global configuration.
//!
//! The server is given a file path and the authority's trust anchor(s). A
//! background task re-reads the file every `refresh` interval and, when its bytes
//! changed, verifies it again. The exchange path asks [`GlobalConfHandle::current`]
//! on every request, which refuses:
//! - `globalconf.invalid` while the newest file is forged, malformed or
//!   inconsistent (the server does not fall back to an older copy: what it was
//!   given is wrong, and an operator must know);
//! - `globalconf.invalid` too, naming the rollback, while the file is validly
//!   signed but older than the highest version this server ever accepted (its
//!   serial is lower, or equal with other content): see [`super::highest`],
//!   which keeps that version in the data directory across restarts;
//! - `globalconf.stale` once the verified copy has expired.
//!
//! Files are read, verified and the highest version recorded on a blocking
//! thread, off the async runtime. A panic there is caught: that file counts as
//! invalid, it is tried again at the next refresh, and the watcher lives on.
//! The log says when the state changes, not at every refresh.

use std::{
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use time::OffsetDateTime;
use tokio::sync::watch;

use super::{
    highest::{self, Advance, HighestError, HighestStore, Version},
    signed,
    view::ConfView,
};
use crate::pki::{Fingerprint, sha256, sign::VerifyingKey};

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

impl State {
    /// True if `other` says the same (same version, or same reason), so that
    /// nothing needs to be announced or logged.
    fn same_as(&self, other: &State) -> bool {
        match (self, other) {
            (State::Valid(a), State::Valid(b)) => a.serial() == b.serial(),
            (State::Invalid(a), State::Invalid(b)) => a == b,
            _ => false,
        }
    }
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
}

/// Reads, verifies and indexes the file once, as a server would, but without
/// rollback protection (for tools that look at the configuration without
/// running a server).
pub fn read(path: &Path, anchors: &[VerifyingKey]) -> Result<Arc<ConfView>, ConfError> {
    load(path, anchors)
        .verified
        .map(|(view, _)| view)
        .map_err(ConfError::Invalid)
}

/// One reading of the file.
struct Loaded {
    /// SHA-256 of the file's bytes; `None` if it could not be read.
    file: Option<[u8; 32]>,
    /// The indexed document and the digest of its signed payload, or why not.
    verified: Result<(Arc<ConfView>, Fingerprint), String>,
}

/// Reads and verifies the file once.
fn load(path: &Path, anchors: &[VerifyingKey]) -> Loaded {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            return Loaded {
                file: None,
                verified: Err(format!("cannot read {}: {e}", path.display())),
            };
        }
    };
    let verified = signed::verify_with_digest(&bytes, anchors)
        .map_err(|e| e.to_string())
        .and_then(|(conf, digest)| {
            ConfView::new(conf)
                .map(|view| (Arc::new(view), digest))
                .map_err(|e| e.to_string())
        });
    Loaded {
        file: Some(sha256(&bytes)),
        verified,
    }
}

/// What the watcher knows between refreshes.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    /// Digest of the file whose outcome is settled: unchanged bytes are not
    /// checked again. `None` after an outcome worth retrying (unreadable file,
    /// record not written, a panic).
    settled: Option<[u8; 32]>,
    /// The highest version accepted, as recorded in the data directory.
    highest: Option<Version>,
}

/// How a file is read and verified: [`load`], or a stand-in in tests.
type Loader = fn(&Path, &[VerifyingKey]) -> Loaded;

/// The file, its trust anchors and the record of the highest version.
struct Source {
    path: PathBuf,
    anchors: Vec<VerifyingKey>,
    store: HighestStore,
    load: Loader,
}

impl Source {
    /// Checks the file once: `None` if its bytes are the settled ones, else
    /// the new state and memory. Blocking (file reads, fsync).
    fn refresh(&self, memory: Memory) -> Option<(State, Memory)> {
        let loaded = (self.load)(&self.path, &self.anchors);
        if loaded.file.is_some() && loaded.file == memory.settled {
            return None;
        }
        let (view, digest) = match loaded.verified {
            Ok(v) => v,
            Err(why) => {
                let memory = Memory {
                    settled: loaded.file,
                    ..memory
                };
                return Some((State::Invalid(why), memory));
            }
        };
        let offered = Version {
            serial: view.serial(),
            digest,
        };
        let settled = Memory {
            settled: loaded.file,
            ..memory
        };
        match highest::check(memory.highest, offered) {
            Err(rollback) => Some((State::Invalid(rollback.to_string()), settled)),
            Ok(Advance::Same) => Some((State::Valid(view), settled)),
            Ok(Advance::Newer) => match self.store.save(offered) {
                Ok(()) => Some((
                    State::Valid(view),
                    Memory {
                        highest: Some(offered),
                        ..settled
                    },
                )),
                // Not used until recorded, or a restart could roll it back.
                Err(e) => Some((
                    State::Invalid(format!("{e}; retrying at every refresh")),
                    Memory {
                        settled: None,
                        ..memory
                    },
                )),
            },
        }
    }
}

/// Runs `refresh` on a blocking thread; a panic becomes an invalid state to
/// retry at the next refresh.
async fn refresh_off_runtime(source: &Arc<Source>, memory: Memory) -> Option<(State, Memory)> {
    let task = {
        let source = source.clone();
        tokio::task::spawn_blocking(move || source.refresh(memory))
    };
    match task.await {
        Ok(outcome) => outcome,
        Err(e) => {
            let why = format!(
                "checking {} failed unexpectedly ({}); retrying at every refresh",
                source.path.display(),
                panic_message(e)
            );
            Some((
                State::Invalid(why),
                Memory {
                    settled: None,
                    ..memory
                },
            ))
        }
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .map_or_else(|| "panic".to_string(), |m| format!("panic: {m}"))
}

/// Logs the state; a logger that panics (an unwritable stderr) does not take
/// the watcher with it.
fn log_state(state: &State) {
    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| match state {
        State::Valid(v) => {
            tracing::info!(serial = v.serial(), expires = %v.expires_at(), "global configuration loaded")
        }
        State::Invalid(why) => {
            tracing::error!(%why, "global configuration refused; exchanges are refused until a valid one arrives")
        }
    }));
}

/// Loads the file now and keeps it fresh in a background task that ends when
/// every handle is dropped. The highest version accepted so far is read from
/// (and recorded in) `data_dir`; a record that cannot be read is an error.
pub async fn watch(
    path: PathBuf,
    anchors: Vec<VerifyingKey>,
    refresh: Duration,
    data_dir: &Path,
) -> Result<GlobalConfHandle, HighestError> {
    watch_with(path, anchors, refresh, data_dir, load).await
}

async fn watch_with(
    path: PathBuf,
    anchors: Vec<VerifyingKey>,
    refresh: Duration,
    data_dir: &Path,
    load: Loader,
) -> Result<GlobalConfHandle, HighestError> {
    let store = HighestStore::in_dir(data_dir);
    let recorded = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.load())
            .await
            .map_err(|e| HighestError::Read {
                path: data_dir.join(highest::FILE_NAME),
                source: std::io::Error::other(panic_message(e)),
            })??
    };
    let source = Arc::new(Source {
        path,
        anchors,
        store,
        load,
    });
    let memory = Memory {
        settled: None,
        highest: recorded,
    };
    let (state, mut memory) = refresh_off_runtime(&source, memory)
        .await
        .unwrap_or_else(|| (State::Invalid("not checked yet".into()), memory));
    log_state(&state);
    let (tx, rx) = watch::channel(Arc::new(state));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            let Some((state, next)) = refresh_off_runtime(&source, memory).await else {
                continue;
            };
            memory = next;
            if state.same_as(&tx.borrow()) {
                continue;
            }
            log_state(&state);
            tx.send_replace(Arc::new(state));
        }
    });
    Ok(GlobalConfHandle { rx })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use time::OffsetDateTime;

    use super::*;
    use crate::{
        durable::write_atomically,
        globalconf::GlobalConf,
        pki::{dev::signing_pair, sign::SigningKey},
    };

    const REFRESH: Duration = Duration::from_millis(20);

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

        fn file(&self) -> PathBuf {
            self.dir.path().join("globalconf.json")
        }

        fn data_dir(&self) -> PathBuf {
            self.dir.path().join("data")
        }

        /// Publishes a validly signed, empty federation with `serial`;
        /// `instance` lets two documents of one serial differ.
        fn publish(&self, serial: u64, instance: &str) {
            let now = OffsetDateTime::now_utc();
            let conf = GlobalConf {
                instance: instance.into(),
                serial,
                issued_at: now,
                expires_at: now + time::Duration::hours(1),
                trusted_cas: vec![],
                members: vec![],
                purposes: vec![],
                consent_authority: None,
                report_readers: vec![],
            };
            write_atomically(&self.file(), signed::sign(&conf, &self.key).as_bytes()).unwrap();
        }

        fn write(&self, bytes: &[u8]) {
            write_atomically(&self.file(), bytes).unwrap();
        }

        async fn watch(&self) -> Result<GlobalConfHandle, HighestError> {
            self.watch_with(load).await
        }

        async fn watch_with(&self, loader: Loader) -> Result<GlobalConfHandle, HighestError> {
            watch_with(
                self.file(),
                self.anchors.clone(),
                REFRESH,
                &self.data_dir(),
                loader,
            )
            .await
        }
    }

    /// Waits (at most 5 s) until the handle's state satisfies `ok`.
    async fn until(
        handle: &GlobalConfHandle,
        what: &str,
        ok: impl Fn(&Result<Arc<ConfView>, ConfError>) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = handle.current();
            if ok(&now) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never {what}; last {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn serial(n: u64) -> impl Fn(&Result<Arc<ConfView>, ConfError>) -> bool {
        move |s| s.as_ref().is_ok_and(|v| v.serial() == n)
    }

    fn invalid(text: &'static str) -> impl Fn(&Result<Arc<ConfView>, ConfError>) -> bool {
        move |s| matches!(s, Err(ConfError::Invalid(why)) if why.contains(text))
    }

    #[tokio::test]
    async fn an_older_file_after_a_malformed_one_is_refused() {
        let s = Setup::new();
        s.publish(5, "KZ");
        let handle = s.watch().await.unwrap();
        until(&handle, "serial 5", serial(5)).await;
        s.write(b"{ not a configuration");
        until(
            &handle,
            "malformed",
            invalid("not a signed global configuration"),
        )
        .await;
        s.publish(3, "KZ");
        until(
            &handle,
            "refused as a rollback",
            invalid("serial 3 is lower than the highest accepted 5"),
        )
        .await;
        // It stays refused, and a newer one is taken.
        tokio::time::sleep(REFRESH * 5).await;
        until(&handle, "still refused", invalid("rollback refused")).await;
        s.publish(6, "KZ");
        until(&handle, "serial 6", serial(6)).await;
        let recorded = HighestStore::in_dir(&s.data_dir()).load().unwrap().unwrap();
        assert_eq!(recorded.serial, 6);
    }

    #[tokio::test]
    async fn an_older_file_is_refused_while_a_newer_one_is_in_use() {
        let s = Setup::new();
        s.publish(5, "KZ");
        let handle = s.watch().await.unwrap();
        s.publish(4, "KZ");
        until(
            &handle,
            "refused as a rollback",
            invalid("serial 4 is lower than the highest accepted 5"),
        )
        .await;
    }

    #[tokio::test]
    async fn a_restart_remembers_the_highest_serial() {
        let s = Setup::new();
        s.publish(5, "KZ");
        let first = s.watch().await.unwrap();
        until(&first, "serial 5", serial(5)).await;
        drop(first);
        let same = s.watch().await.unwrap();
        assert_eq!(same.current().unwrap().serial(), 5, "the same file again");
        drop(same);
        s.publish(4, "KZ");
        let second = s.watch().await.unwrap();
        let Err(ConfError::Invalid(why)) = second.current() else {
            panic!(
                "an older file was accepted at start: {:?}",
                second.current()
            );
        };
        assert!(
            why.contains("serial 4 is lower than the highest accepted 5"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn the_same_serial_with_other_content_is_refused() {
        let s = Setup::new();
        s.publish(5, "KZ");
        let handle = s.watch().await.unwrap();
        s.publish(5, "XX");
        until(
            &handle,
            "refused as a rollback",
            invalid("serial 5 was accepted before with other content"),
        )
        .await;
    }

    #[tokio::test]
    async fn a_corrupt_record_is_a_startup_error() {
        let s = Setup::new();
        s.publish(5, "KZ");
        std::fs::create_dir_all(s.data_dir()).unwrap();
        std::fs::write(s.data_dir().join(highest::FILE_NAME), "serial=9\n").unwrap();
        let e = s.watch().await.unwrap_err();
        assert!(matches!(e, HighestError::Corrupt { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_newer_file_is_not_used_until_recorded() {
        let s = Setup::new();
        s.publish(5, "KZ");
        let handle = s.watch().await.unwrap();
        // A folder where the record's temporary file goes makes the write fail.
        let blocker = s.data_dir().join(format!("{}.tmp", highest::FILE_NAME));
        std::fs::create_dir(&blocker).unwrap();
        s.publish(6, "KZ");
        until(
            &handle,
            "refused while unrecorded",
            invalid("cannot record the highest accepted global configuration"),
        )
        .await;
        std::fs::remove_dir(&blocker).unwrap();
        until(&handle, "serial 6 once recorded", serial(6)).await;
    }

    /// Panics on a file that starts with `panic`, like a verifier with a bug.
    fn panicking_load(path: &Path, anchors: &[VerifyingKey]) -> Loaded {
        if std::fs::read(path).is_ok_and(|b| b.starts_with(b"panic")) {
            panic!("verifier bug");
        }
        load(path, anchors)
    }

    #[tokio::test]
    async fn a_panic_in_a_load_does_not_stop_the_watcher() {
        let s = Setup::new();
        s.publish(5, "KZ");
        let handle = s.watch_with(panicking_load).await.unwrap();
        s.write(b"panic");
        until(&handle, "refused after the panic", invalid("verifier bug")).await;
        s.publish(3, "KZ");
        until(&handle, "a rollback refused", invalid("rollback refused")).await;
        s.publish(6, "KZ");
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
        s.publish(5, "KZ");
        let handle = s.watch().await.unwrap();
        s.write(b"{ not a configuration");
        until(
            &handle,
            "malformed",
            invalid("not a signed global configuration"),
        )
        .await;
        s.publish(6, "KZ");
        until(&handle, "serial 6", serial(6)).await;
    }
}
