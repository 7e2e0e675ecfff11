//! Opening a store: one per database file in a process (the registry of
//! open stores), writable only by the process that locks its journal.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use super::{
    Inner, SqliteStore,
    connect::connect_small_cache,
    db_path, journal, keys, open_err,
    queries::head_of,
    schema::{SCHEMA, add_missing_columns},
    upkeep::{insert_batch, upkeep_in_background},
};
use crate::AuditError;

/// What a store is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// To write: a server.
    Write,
    /// To inspect: a tool, which may only read while a server writes.
    Inspect,
}

/// A store opened afresh.
enum Opened {
    /// With its journal locked: it may write.
    Writable(Inner),
    /// Another process holds the journal: it may only read.
    InUse(Inner),
}

/// How long [`SqliteStore::open`] waits for another writer to let go.
pub(super) const IN_USE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The key of a database file in [`OPEN`]: its folder resolved (links and
/// `..`), so that two spellings of one path name one store.
fn registry_key(path: &Path) -> PathBuf {
    let resolved = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .canonicalize()
        .ok()
        .zip(path.file_name())
        .map(|(dir, name)| dir.join(name));
    resolved.unwrap_or_else(|| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()))
}

/// The stores open in this process, by database path.
static OPEN: std::sync::LazyLock<
    Mutex<std::collections::HashMap<PathBuf, std::sync::Weak<Inner>>>,
> = std::sync::LazyLock::new(Default::default);

impl SqliteStore {
    /// Opens (creating if needed) `<data_dir>/audit.db`.
    pub async fn open_in(data_dir: &Path) -> Result<Self, AuditError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| AuditError::Open(format!("cannot create {}: {e}", data_dir.display())))?;
        Self::open(&db_path(data_dir)).await
    }

    /// Opens (creating if needed) the database file at `path` to write it,
    /// with its journal: records a crash left there are written into SQLite
    /// first. Within one process a path has one store (a second open shares
    /// it). Fails if another process writes the log (after waiting up to
    /// [`IN_USE_WAIT`] for it to let go, as a restarted server may start
    /// before the old one has quite stopped).
    pub async fn open(path: &Path) -> Result<Self, AuditError> {
        Self::open_as(path, Access::Write).await
    }

    /// Opens the database file at `path` to inspect it (`kopir audit ...`):
    /// like [`SqliteStore::open`], but if another process writes the log,
    /// this one may only read it. Appends then fail, and records that process
    /// has not yet folded into SQLite (at most about [`FOLD_EVERY`](super::upkeep::FOLD_EVERY) of them)
    /// are not seen.
    pub(crate) async fn open_to_inspect(path: &Path) -> Result<Self, AuditError> {
        Self::open_as(path, Access::Inspect).await
    }

    async fn open_as(path: &Path, access: Access) -> Result<Self, AuditError> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let key = registry_key(&path);
            let waited = std::time::Instant::now();
            loop {
                let mut open = OPEN
                    .lock()
                    .map_err(|_| AuditError::Open("audit store registry poisoned".into()))?;
                if let Some(inner) = open.get(&key).and_then(std::sync::Weak::upgrade) {
                    return Ok(Self { inner });
                }
                let in_use = match (Self::open_new(&path)?, access) {
                    (Opened::Writable(inner), _) => {
                        let inner = Arc::new(inner);
                        open.retain(|_, store| store.strong_count() > 0);
                        open.insert(key, Arc::downgrade(&inner));
                        upkeep_in_background(&inner.path, Arc::downgrade(&inner));
                        return Ok(Self { inner });
                    }
                    (Opened::InUse(inner), Access::Inspect) => {
                        tracing::info!(path = %path.display(), "audit log written by another process: read only");
                        return Ok(Self {
                            inner: Arc::new(inner),
                        });
                    }
                    (Opened::InUse(_), Access::Write) => true,
                };
                drop(open);
                if in_use && waited.elapsed() >= IN_USE_WAIT {
                    return Err(AuditError::Open(format!(
                        "{} is written by another process (another `kopir serve` on the same data directory?)",
                        path.display()
                    )));
                }
                std::thread::sleep(IN_USE_WAIT / 100);
            }
        })
        .await
        .map_err(|e| AuditError::Open(format!("sqlite open task: {e}")))?
    }

    fn open_new(path: &Path) -> Result<Opened, AuditError> {
        let mut conn = connect_small_cache(path).map_err(open_err(path))?;
        conn.execute_batch(SCHEMA).map_err(open_err(path))?;
        conn.execute_batch(keys::SCHEMA).map_err(open_err(path))?;
        add_missing_columns(&conn).map_err(open_err(path))?;
        keys::drop_older_index(&conn).map_err(open_err(path))?;
        let keys = Mutex::new(keys::Keys::new(
            keys::keys_upto(&conn).map_err(open_err(path))?,
        ));
        let journal_err =
            |e: std::io::Error| AuditError::Open(format!("{}: audit journal: {e}", path.display()));
        let journal = match journal::Journal::lock(path) {
            Ok(journal) => Some(journal),
            Err(journal::OpenError::InUse) => None,
            Err(journal::OpenError::Io(e)) => return Err(journal_err(e)),
        };
        if let Some(mut journal) = journal {
            // The head is read once the journal is locked: no other writer
            // moves it any more.
            let head = head_of(&conn).map_err(open_err(path))?;
            let recovered = journal.recover(head).map_err(journal_err)?;
            if !recovered.is_empty() {
                insert_batch(&mut conn, &keys, &recovered).map_err(|e| {
                    AuditError::Open(format!(
                        "{}: cannot take in the records of the journal: {e}",
                        path.display()
                    ))
                })?;
                tracing::info!(
                    records = recovered.len(),
                    "audit journal: took in the records of an unclean stop"
                );
            }
            Ok(Opened::Writable(Inner::new(
                path,
                conn,
                keys,
                Some(journal),
            )))
        } else {
            Ok(Opened::InUse(Inner::new(path, conn, keys, None)))
        }
    }
}
