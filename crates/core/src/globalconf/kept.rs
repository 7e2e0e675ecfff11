//! The last good copy of the global configuration, kept in the server's data
//! directory (`globalconf.copy`) exactly as it was downloaded, so that a
//! server restarted while no source answers starts from it.
//!
//! It is written (durably) before the highest-version record that names it,
//! and it is used at a start only if it is that recorded version: a copy
//! and a record that disagree (a crash between the two writes, a record
//! deleted to reset the rollback protection) leave the server to download.

use std::path::{Path, PathBuf};

use crate::durable::write_atomically;

/// The file's name in the data directory.
pub const FILE_NAME: &str = "globalconf.copy";

/// Where a server keeps its last good copy.
#[derive(Debug, Clone)]
pub struct KeptCopy {
    path: PathBuf,
}

impl KeptCopy {
    /// The copy in `data_dir`.
    pub fn in_dir(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join(FILE_NAME),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kept bytes, `None` if nothing was kept yet. Blocking.
    pub fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Keeps `bytes` durably (making the data directory if needed). Blocking.
    pub fn save(&self, bytes: &[u8]) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_atomically(&self.path, bytes)
    }
}
