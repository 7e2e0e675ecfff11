//! Keyed pseudonyms of data subjects.
//!
//! A store never holds a subject's personal code: it holds
//! HMAC-SHA256(key, `"kopir-subject/1" || 0x00 || subject`) under a 32-byte key
//! that the server keeps outside the log (by default `<data_dir>/pseudonym.key`,
//! created with random bytes on first start). A copy of the store reveals no
//! personal codes, and a query by subject computes the same pseudonym. Every
//! node that shares one PostgreSQL store must be given the same key file.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use ring::{hmac, rand::SecureRandom};

use super::{AuditError, record::Hash};

/// Length of a pseudonym key, bytes.
pub(crate) const KEY_LEN: usize = 32;

/// Domain separation for subject pseudonyms.
const DOMAIN: &[u8] = b"kopir-subject/1\0";

/// The key under which subjects become pseudonyms.
#[derive(Clone)]
pub struct PseudonymKey {
    key: hmac::Key,
    /// A fingerprint of the key (not secret: SHA-256 of the HMAC of a fixed
    /// label), to tell operators whether two nodes use the same key.
    id: Hash,
}

impl std::fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PseudonymKey")
            .field("id", &hex::encode(&self.id[..8]))
            .finish_non_exhaustive()
    }
}

impl PseudonymKey {
    /// A key from its 32 raw bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, bytes);
        let tag = hmac::sign(&key, b"kopir-pseudonym-key-id/1");
        let id = kopir_core::pki::sha256(tag.as_ref());
        Self { key, id }
    }

    /// A fresh random key (for tests and throwaway logs).
    pub fn random() -> Result<Self, AuditError> {
        let mut bytes = [0u8; KEY_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| AuditError::Key("no system randomness".into()))?;
        Ok(Self::from_bytes(&bytes))
    }

    /// Reads the key file at `path` (32 raw bytes, or 64 hex digits).
    pub fn load(path: &Path) -> Result<Self, AuditError> {
        let data = std::fs::read(path)
            .map_err(|e| AuditError::Key(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&data).ok_or_else(|| {
            AuditError::Key(format!(
                "{} holds neither 32 bytes nor 64 hex digits",
                path.display()
            ))
        })
    }

    fn parse(data: &[u8]) -> Option<Self> {
        if let Ok(bytes) = <[u8; KEY_LEN]>::try_from(data) {
            return Some(Self::from_bytes(&bytes));
        }
        let text = std::str::from_utf8(data).ok()?.trim();
        let bytes: [u8; KEY_LEN] = hex::decode(text).ok()?.try_into().ok()?;
        Some(Self::from_bytes(&bytes))
    }

    /// Reads the key file at `path`, creating it with 32 random bytes (mode
    /// 0600) if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, AuditError> {
        if path.exists() {
            return Self::load(path);
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| AuditError::Key(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut bytes = [0u8; KEY_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| AuditError::Key("no system randomness".into()))?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        match options.open(path) {
            Ok(mut file) => {
                file.write_all(&bytes)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| {
                        AuditError::Key(format!("cannot write {}: {e}", path.display()))
                    })?;
                Ok(Self::from_bytes(&bytes))
            }
            // Another process created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path),
            Err(e) => Err(AuditError::Key(format!(
                "cannot create {}: {e}",
                path.display()
            ))),
        }
    }

    /// The pseudonym of `subject` (e.g. `iin:900101300123`).
    pub fn pseudonym(&self, subject: &str) -> Hash {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(DOMAIN);
        ctx.update(subject.as_bytes());
        let tag = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// A non-secret fingerprint of the key.
    #[cfg(test)]
    pub(crate) fn id(&self) -> Hash {
        self.id
    }
}

/// Where the pseudonym key lives by default: `<data_dir>/pseudonym.key`.
pub(crate) fn default_path(data_dir: &Path) -> PathBuf {
    data_dir.join("pseudonym.key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_pseudonym_other_key_other_pseudonym() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/pseudonym.key");
        let a = PseudonymKey::load_or_create(&path).unwrap();
        let b = PseudonymKey::load_or_create(&path).unwrap();
        assert_eq!(
            a.pseudonym("iin:900101300123"),
            b.pseudonym("iin:900101300123")
        );
        assert_eq!(a.id(), b.id());
        assert_ne!(
            a.pseudonym("iin:900101300123"),
            a.pseudonym("iin:900101300124")
        );
        let c = PseudonymKey::random().unwrap();
        assert_ne!(
            a.pseudonym("iin:900101300123"),
            c.pseudonym("iin:900101300123")
        );
        assert_eq!(std::fs::read(&path).unwrap().len(), KEY_LEN);
    }

    #[test]
    fn hex_key_files_are_accepted_and_garbage_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, format!("{}\n", hex::encode([9u8; 32]))).unwrap();
        let k = PseudonymKey::load(&path).unwrap();
        assert_eq!(k.id(), PseudonymKey::from_bytes(&[9u8; 32]).id());
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(PseudonymKey::load(&path), Err(AuditError::Key(_))));
    }
}
