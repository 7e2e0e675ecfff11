//! The highest global configuration a server has accepted, kept in its data
//! directory (`globalconf.highest`) so that neither a sequence of bad files nor
//! a restart lets an older, validly signed configuration back in.
//!
//! A version is its serial and the SHA-256 of its signed payload. A verified
//! file is accepted when its serial is higher than the highest accepted (which
//! is then recorded, durably, before the file is used), or when it is that very
//! version again (a restart, a re-published copy). A lower serial, or the same
//! serial with other content, is a rollback and is refused.
//!
//! The file is a few lines of text with a checksum of its own:
//!
//! ```text
//! kopir-globalconf-highest/1
//! serial=1764756000000000
//! payload-sha256=<64 hex digits>
//! check=<64 hex digits: SHA-256 of the lines above, newlines included>
//! ```
//!
//! A missing file means that nothing was accepted yet. A file that cannot be
//! read or does not check is a startup error: an operator must look, because
//! the server can no longer tell which configurations would be rollbacks.
//! Deleting the file (with the server stopped) deliberately resets the
//! protection: the next validly signed configuration is accepted whatever its
//! serial.

use std::path::{Path, PathBuf};

use crate::{
    durable::write_atomically,
    pki::{Fingerprint, sha256},
};

/// The file's name in the data directory.
pub const FILE_NAME: &str = "globalconf.highest";
/// The first line of the file.
const FORMAT: &str = "kopir-globalconf-highest/1";

/// One version of the global configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// The document's serial.
    pub serial: u64,
    /// SHA-256 of the signed payload.
    pub digest: Fingerprint,
}

/// How a verified version relates to the highest accepted one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advance {
    /// It is the highest accepted version itself.
    Same,
    /// It is newer (or nothing was accepted yet): record it before use.
    Newer,
}

/// Why a validly signed configuration is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rollback {
    /// Its serial is lower than one accepted before.
    #[error(
        "rollback refused: serial {serial} is lower than the highest accepted {highest}; publish serial {highest} or higher"
    )]
    Lower {
        /// The offered serial.
        serial: u64,
        /// The highest accepted serial.
        highest: u64,
    },
    /// Its serial was accepted before with another payload.
    #[error(
        "rollback refused: serial {serial} was accepted before with other content (payload SHA-256 {accepted}, this one {offered}); publish a higher serial"
    )]
    Altered {
        /// The serial.
        serial: u64,
        /// Digest of the payload accepted with it.
        accepted: Fingerprint,
        /// Digest of the offered payload.
        offered: Fingerprint,
    },
}

/// Whether `offered` may be used, given the highest accepted version.
pub fn check(highest: Option<Version>, offered: Version) -> Result<Advance, Rollback> {
    let Some(highest) = highest else {
        return Ok(Advance::Newer);
    };
    if offered.serial > highest.serial {
        Ok(Advance::Newer)
    } else if offered.serial < highest.serial {
        Err(Rollback::Lower {
            serial: offered.serial,
            highest: highest.serial,
        })
    } else if offered.digest == highest.digest {
        Ok(Advance::Same)
    } else {
        Err(Rollback::Altered {
            serial: offered.serial,
            accepted: highest.digest,
            offered: offered.digest,
        })
    }
}

/// Why the record of the highest version cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HighestError {
    /// The file exists but cannot be read.
    #[error(
        "cannot read {path}, the highest accepted global configuration: {source}; fix its permissions (or the disk) and start again"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// What the read failed with.
        source: std::io::Error,
    },
    /// The file is not a valid record.
    #[error(
        "{path}, the highest accepted global configuration, is corrupt ({why}); check the disk and how the file was changed, then delete it to accept the published configuration whatever its serial"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The file cannot be written.
    #[error("cannot record the highest accepted global configuration in {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What the write failed with.
        source: std::io::Error,
    },
}

/// Where a server records its highest accepted version.
#[derive(Debug, Clone)]
pub struct HighestStore {
    path: PathBuf,
}

impl HighestStore {
    /// The record in `data_dir`.
    pub fn in_dir(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join(FILE_NAME),
        }
    }

    /// The file.
    #[cfg(test)]
    fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded version, `None` if there is no file yet.
    pub fn load(&self) -> Result<Option<Version>, HighestError> {
        let text = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(HighestError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        decode(&text)
            .map(Some)
            .map_err(|why| HighestError::Corrupt {
                path: self.path.clone(),
                why,
            })
    }

    /// Records `version` durably (making the data directory if needed).
    pub(crate) fn save(&self, version: Version) -> Result<(), HighestError> {
        let write = |source| HighestError::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(write)?;
        }
        write_atomically(&self.path, encode(version).as_bytes()).map_err(write)
    }
}

fn body(version: Version) -> String {
    format!(
        "{FORMAT}\nserial={}\npayload-sha256={}\n",
        version.serial, version.digest
    )
}

fn encode(version: Version) -> String {
    let body = body(version);
    let check = Fingerprint(sha256(body.as_bytes()));
    format!("{body}check={check}\n")
}

fn decode(bytes: &[u8]) -> Result<Version, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    let lines: Vec<&str> = text.split_terminator('\n').collect();
    let [format, serial, digest, check] = lines[..] else {
        return Err(format!("{} lines, expected 4", lines.len()));
    };
    if format != FORMAT {
        return Err(format!("first line {format:?}, expected {FORMAT:?}"));
    }
    let value = |line: &str, key: &str| -> Result<String, String> {
        line.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('='))
            .map(str::to_owned)
            .ok_or_else(|| format!("expected a line {key}=..."))
    };
    let serial = value(serial, "serial")?
        .parse::<u64>()
        .map_err(|e| format!("serial: {e}"))?;
    let digest = Fingerprint::from_hex(&value(digest, "payload-sha256")?)
        .ok_or_else(|| "payload-sha256 is not 64 hex digits".to_string())?;
    let version = Version { serial, digest };
    let stated = value(check, "check")?;
    if stated != Fingerprint(sha256(body(version).as_bytes())).to_string() {
        return Err("the check line does not match the content".into());
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(serial: u64, fill: u8) -> Version {
        Version {
            serial,
            digest: Fingerprint([fill; 32]),
        }
    }

    #[test]
    fn anything_is_newer_than_nothing() {
        assert_eq!(check(None, version(1, 1)), Ok(Advance::Newer));
    }

    #[test]
    fn a_higher_serial_advances_and_the_same_version_stays() {
        let highest = Some(version(5, 1));
        assert_eq!(check(highest, version(6, 2)), Ok(Advance::Newer));
        assert_eq!(check(highest, version(5, 1)), Ok(Advance::Same));
    }

    #[test]
    fn a_lower_serial_is_a_rollback() {
        let refused = check(Some(version(7, 1)), version(5, 1)).unwrap_err();
        assert_eq!(
            refused,
            Rollback::Lower {
                serial: 5,
                highest: 7
            }
        );
        assert!(
            refused
                .to_string()
                .contains("serial 5 is lower than the highest accepted 7"),
            "{refused}"
        );
    }

    #[test]
    fn the_same_serial_with_other_content_is_a_rollback() {
        let refused = check(Some(version(7, 1)), version(7, 2)).unwrap_err();
        assert!(matches!(refused, Rollback::Altered { serial: 7, .. }));
    }

    #[test]
    fn a_missing_file_is_nothing_yet_and_a_saved_one_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = HighestStore::in_dir(&dir.path().join("data"));
        assert!(store.load().unwrap().is_none());
        store.save(version(42, 9)).unwrap();
        assert_eq!(store.load().unwrap(), Some(version(42, 9)));
        store.save(version(43, 8)).unwrap();
        assert_eq!(store.load().unwrap(), Some(version(43, 8)));
    }

    #[test]
    fn every_damage_to_the_file_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = HighestStore::in_dir(dir.path());
        let good = encode(version(42, 9));
        let damaged = [
            String::new(),
            good.replace("serial=42", "serial=41"),
            good.replace("serial=42", "serial=x"),
            good.replace(FORMAT, "kopir-globalconf-highest/2"),
            good.replace("payload-sha256=", "payload="),
            good.replace("check=", "check=0"),
            good.lines().take(3).collect::<Vec<_>>().join("\n"),
            format!("{good}extra\n"),
        ];
        for text in damaged {
            std::fs::write(store.path(), &text).unwrap();
            match store.load() {
                Err(HighestError::Corrupt { why, .. }) => assert!(!why.is_empty()),
                other => panic!("{text:?} gave {other:?}"),
            }
        }
        std::fs::write(store.path(), [0xff, 0xfe]).unwrap();
        assert!(matches!(store.load(), Err(HighestError::Corrupt { .. })));
    }

    #[test]
    fn an_unreadable_file_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = HighestStore::in_dir(dir.path());
        // A folder where the file should be cannot be read as one.
        std::fs::create_dir(store.path()).unwrap();
        let e = store.load().unwrap_err();
        assert!(matches!(e, HighestError::Read { .. }), "{e}");
        assert!(e.to_string().contains(FILE_NAME), "{e}");
    }
}
