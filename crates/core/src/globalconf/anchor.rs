//! A server's anchor: what it must know before its first download, and all
//! that it must trust.
//!
//! As in X-Road, the anchor names the federation's instance, where the signed
//! global configuration can be downloaded, and the authority's certificates
//! whose keys may sign it. It is a small JSON file the authority writes
//! (`kopir authority anchor`) and an operator installs after comparing its
//! SHA-256 with the one the authority announces out of band:
//!
//! ```json
//! {"format": "kopir-anchor/1", "instance": "KZ", "generated_at": "2026-12-04T10:00:00Z",
//!  "sources": ["https://authority.example:8443/globalconf/v1/globalconf.json",
//!              "http://mirror.example/kz/globalconf.json", "file:/srv/kopir/globalconf.json"],
//!  "authority_certs": ["-----BEGIN CERTIFICATE-----\n..."],
//!  "tls_roots": ["-----BEGIN CERTIFICATE-----\n..."]}
//! ```
//!
//! Sources are tried in turn; any of them may be an untrusted mirror, because
//! what they serve is accepted only if an authority key signed it. A `file:`
//! source is a local copy (air-gapped setups, tests); a relative one is read
//! from the anchor's folder. `tls_roots`, when present, are the only CAs an
//! `https` source's certificate may chain to; without them the system's
//! trust store is used.

use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::pki::{certs_from_pem, certs_to_pem, sha256, sign::VerifyingKey};

/// The anchor file's format tag.
pub const FORMAT: &str = "kopir-anchor/1";

/// The largest anchor file read.
const MAX_BYTES: u64 = 1024 * 1024;

/// Where a copy of the signed global configuration can be read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// A local file.
    File(PathBuf),
    /// An `http` or `https` URL.
    Web(http::Uri),
}

impl Location {
    /// Parses a source as the anchor writes it; a relative `file:` path is
    /// taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, AnchorError> {
        let bad = |why: &str| AnchorError::Source {
            text: text.to_string(),
            why: why.to_string(),
        };
        if let Some(path) = text.strip_prefix("file:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(bad("names no file"));
            }
            return Ok(Location::File(base.join(path)));
        }
        let uri: http::Uri = text
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(bad("is not an http:, https: or file: URL")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("names no host"));
        }
        Ok(Location::Web(uri))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(path) => write!(f, "file:{}", path.display()),
            Location::Web(uri) => write!(f, "{uri}"),
        }
    }
}

/// A loaded, checked anchor.
#[derive(Debug, Clone)]
pub struct Anchor {
    /// The instance the configuration must name; `None` for an anchor made
    /// from a bare file path, which accepts the instance it finds.
    pub instance: Option<String>,
    /// The sources, in the anchor's order.
    pub sources: Vec<Location>,
    /// The authority's keys that may sign the configuration.
    pub keys: Vec<VerifyingKey>,
    /// The CAs an `https` source may chain to; empty: the system's.
    pub tls_roots: Vec<CertificateDer<'static>>,
}

/// Why an anchor cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnchorError {
    /// The file cannot be read.
    #[error("cannot read the anchor {path}: {why}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The file is not an anchor.
    #[error("{path} is not a kopir anchor: {why}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A source is not usable.
    #[error("anchor source {text:?} {why}")]
    Source {
        /// The source as written.
        text: String,
        /// Why.
        why: String,
    },
    /// A certificate does not parse or is no signing certificate.
    #[error("anchor certificate: {0}")]
    Cert(String),
    /// Nothing to download from, or no key to verify with.
    #[error("the anchor names no {0}")]
    Empty(&'static str),
}

/// The file as written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnchorFile {
    format: String,
    instance: String,
    #[serde(with = "time::serde::rfc3339")]
    generated_at: OffsetDateTime,
    sources: Vec<String>,
    authority_certs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tls_roots: Vec<String>,
}

impl Anchor {
    /// An anchor of one local file and the authority's keys: the form of a
    /// server configuration that names `path` and `anchors` instead of an
    /// anchor file.
    pub fn of_file(path: PathBuf, keys: Vec<VerifyingKey>) -> Self {
        Self {
            instance: None,
            sources: vec![Location::File(path)],
            keys,
            tls_roots: vec![],
        }
    }

    /// Reads and checks an anchor file.
    pub fn load(path: &Path) -> Result<Self, AnchorError> {
        let read_error = |why: String| AnchorError::Read {
            path: path.to_path_buf(),
            why,
        };
        let len = std::fs::metadata(path)
            .map_err(|e| read_error(e.to_string()))?
            .len();
        if len > MAX_BYTES {
            return Err(read_error(format!(
                "{len} bytes; an anchor is at most {MAX_BYTES}"
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| read_error(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&bytes, base).map_err(|e| match e {
            AnchorError::Format { why, .. } => AnchorError::Format {
                path: path.to_path_buf(),
                why,
            },
            other => other,
        })
    }

    /// Parses an anchor's bytes; relative `file:` sources are taken from `base`.
    pub fn parse(bytes: &[u8], base: &Path) -> Result<Self, AnchorError> {
        let format = |why: String| AnchorError::Format {
            path: PathBuf::new(),
            why,
        };
        let file: AnchorFile = serde_json::from_slice(bytes).map_err(|e| format(e.to_string()))?;
        if file.format != FORMAT {
            return Err(format(format!(
                "format {:?}, expected {FORMAT:?}",
                file.format
            )));
        }
        if file.instance.is_empty() {
            return Err(AnchorError::Empty("instance"));
        }
        let sources = file
            .sources
            .iter()
            .map(|s| Location::parse(s, base))
            .collect::<Result<Vec<_>, _>>()?;
        if sources.is_empty() {
            return Err(AnchorError::Empty("source"));
        }
        let keys = file
            .authority_certs
            .iter()
            .map(|pem| {
                let certs = certs_from_pem(pem.as_bytes(), "authority_certs")
                    .map_err(|e| AnchorError::Cert(e.to_string()))?;
                VerifyingKey::from_cert(certs[0].as_ref())
                    .map_err(|e| AnchorError::Cert(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(AnchorError::Empty("authority certificate"));
        }
        let mut tls_roots = vec![];
        for pem in &file.tls_roots {
            tls_roots.extend(
                certs_from_pem(pem.as_bytes(), "tls_roots")
                    .map_err(|e| AnchorError::Cert(e.to_string()))?,
            );
        }
        Ok(Self {
            instance: Some(file.instance),
            sources,
            keys,
            tls_roots,
        })
    }
}

/// Writes an anchor: the text of the file and its SHA-256 (hex), which the
/// authority announces so that operators can check what they install.
pub fn write(
    instance: &str,
    sources: &[String],
    authority_certs: &[CertificateDer<'_>],
    tls_roots: &[CertificateDer<'_>],
    generated_at: OffsetDateTime,
) -> Result<(String, String), AnchorError> {
    let file = AnchorFile {
        format: FORMAT.into(),
        instance: instance.into(),
        generated_at,
        sources: sources.to_vec(),
        authority_certs: authority_certs
            .iter()
            .map(|c| certs_to_pem(std::slice::from_ref(c)))
            .collect(),
        tls_roots: tls_roots
            .iter()
            .map(|c| certs_to_pem(std::slice::from_ref(c)))
            .collect(),
    };
    let text = serde_json::to_string_pretty(&file).map_err(|e| AnchorError::Format {
        path: PathBuf::new(),
        why: e.to_string(),
    })? + "\n";
    // What is written must load: the same checks a server makes.
    Anchor::parse(text.as_bytes(), Path::new("."))?;
    let digest = hex::encode(sha256(text.as_bytes()));
    Ok((text, digest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::dev::signing_pair;

    fn cert() -> CertificateDer<'static> {
        let (der, _) = signing_pair("authority").unwrap();
        CertificateDer::from(der)
    }

    #[test]
    fn a_written_anchor_loads_with_its_sources_and_keys() {
        let cert = cert();
        let sources = [
            "https://authority.example:8443/globalconf/v1/globalconf.json".to_string(),
            "http://mirror.example/kz.json".into(),
            "file:copy/globalconf.json".into(),
            "file:///srv/globalconf.json".into(),
        ];
        let (text, digest) = write(
            "KZ",
            &sources,
            std::slice::from_ref(&cert),
            &[],
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        assert_eq!(digest, hex::encode(sha256(text.as_bytes())));
        let anchor = Anchor::parse(text.as_bytes(), Path::new("/etc/kopir")).unwrap();
        assert_eq!(anchor.instance.as_deref(), Some("KZ"));
        assert_eq!(
            anchor.sources[2],
            Location::File("/etc/kopir/copy/globalconf.json".into())
        );
        assert_eq!(
            anchor.sources[3],
            Location::File("/srv/globalconf.json".into())
        );
        assert_eq!(anchor.sources[0].to_string(), sources[0]);
        assert_eq!(
            anchor.keys[0].key_id(),
            VerifyingKey::from_cert(cert.as_ref()).unwrap().key_id()
        );
    }

    #[test]
    fn a_bad_anchor_says_what_is_wrong() {
        let cert = certs_to_pem(&[cert()]);
        let now = "2026-12-04T10:00:00Z";
        let case = |sources: &str, certs: &str, extra: &str| {
            format!(
                r#"{{"format": "kopir-anchor/1", "instance": "KZ", "generated_at": "{now}",
                    "sources": {sources}, "authority_certs": {certs}{extra}}}"#
            )
        };
        let certs = serde_json::to_string(&[&cert]).unwrap();
        for (text, expect) in [
            (case("[]", &certs, ""), "names no source"),
            (
                case(r#"["http://a/x"]"#, "[]", ""),
                "names no authority certificate",
            ),
            (
                case(r#"["ftp://a/x"]"#, &certs, ""),
                "is not an http:, https: or file: URL",
            ),
            (case(r#"["https:///x"]"#, &certs, ""), "anchor source"),
            (
                case(r#"["http://a/x"]"#, r#"["junk"]"#, ""),
                "anchor certificate",
            ),
            (
                case(r#"["http://a/x"]"#, &certs, r#", "extra": 1"#),
                "unknown field",
            ),
            ("{".to_string(), "not a kopir anchor"),
            (
                case(r#"["http://a/x"]"#, &certs, "").replace("anchor/1", "anchor/9"),
                "expected \"kopir-anchor/1\"",
            ),
        ] {
            let e = Anchor::parse(text.as_bytes(), Path::new(".")).unwrap_err();
            assert!(e.to_string().contains(expect), "{text}: {e}");
        }
    }

    #[test]
    fn an_oversized_anchor_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("anchor.json");
        std::fs::write(&path, vec![b' '; MAX_BYTES as usize + 1]).unwrap();
        let e = Anchor::load(&path).unwrap_err();
        assert!(e.to_string().contains("an anchor is at most"), "{e}");
    }
}
