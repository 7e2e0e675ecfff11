//! The stored form of an audit record, its canonical bytes and the hash chain.
//!
//! [`Record`] is the one definition of a record's fields. A store keeps an
//! [`Entry`] (the [`AuditRecord`] the security path reports, with the subject
//! replaced by its keyed pseudonym and the writing node named) under a sequence number,
//! together with `prev_hash` (the hash of the record before it, 32 zero bytes
//! for the first) and `hash`, the SHA-256 of the record's canonical bytes.
//!
//! # Canonical bytes (`kopir-audit/2`, and `kopir-audit/1`)
//!
//! Protobuf and JSON are not canonical, so the hash covers a byte string built
//! field by field. Every field is written as a 4-byte big-endian length and
//! then that many bytes; an absent optional field is written as the length
//! `0xFFFF_FFFF` and no bytes (so `None` and `Some("")` differ). Numbers are
//! fixed-width big-endian (length 8 for `u64`/`i64`, 4 for `i32`), hashes are
//! their 32 raw bytes, texts their UTF-8 bytes. The fields, in order:
//!
//! 1. the tag `"kopir-audit/1"`;
//! 2. `seq` (u64), 3. `prev_hash`, 4. `node`, 5. `request_id`, 6. `at_ms` (i64),
//! 7. `side` and 8. `step` (their lower-case names), 9. `client`, 10. `service`,
//! 11. `method`, 12. `purpose`, 13. `subject` (the 32-byte pseudonym, optional),
//! 14. `basis`, 15. `user`, 16. `peer` (optional texts), 17. `status` (i32),
//! 18. `reason`, 19. `message` (optional texts), 20. `body_sha256`,
//! 21. `request_hash` (optional 32 bytes), 22. `signature` (optional bytes),
//! 23. `signer_key` and 24. `signed_hash` (optional 32 bytes),
//! 25. `query_group` (optional text), 26. `hidden_until_ms` (optional i64),
//! 27. `hidden_reason` (optional text).
//!
//! Fields 25–27 are what the subject's access report needs beyond the
//! exchange (the Data Tracker's query group and hidden-until).
//!
//! A record that carries none of fields 25–27 (every record written before
//! they existed, and every read that is neither grouped nor covert) is
//! written in the first version of the form: the tag `"kopir-audit/1"` and
//! fields 2–24 only, so logs and archives written before keep verifying. The
//! tag is inside the hashed bytes, so a record cannot be moved from one form
//! to the other (e.g. a covert marker added or stripped) without changing its
//! hash.
//!
//! A stored body (only with `store_bodies`) is not part of these bytes: the
//! `body_sha256` they cover pins it, and `verify` checks it against that hash.
//!
//! Because `seq` and `prev_hash` are inside the hashed bytes, moving a record
//! to another position changes its hash, and changing any record breaks the
//! link from the record after it.

use serde::{Deserialize, Serialize};

use super::{Side, Step, pseudonym::PseudonymKey};

/// A SHA-256 value.
pub type Hash = [u8; 32];

/// The `prev_hash` of the first record of a log.
pub(crate) const GENESIS: Hash = [0u8; 32];

/// The tag that starts the canonical bytes of a record with any of fields 25–27.
pub(crate) const RECORD_TAG: &str = "kopir-audit/2";

/// The tag of a record with none of fields 25–27 (the first form).
pub(crate) const RECORD_TAG_V1: &str = "kopir-audit/1";

/// One step of one exchange: the single definition of an audit record's
/// fields, in the order of the canonical bytes.
///
/// `S` is the form of the data subject: the security path reports it in
/// clear ([`AuditRecord`]), a store keeps only its keyed pseudonym
/// ([`Entry`]). [`Entry::from_record`] turns one into the other, and is the
/// only place besides this struct, [`Record::new`], the canonical bytes and
/// the stores' one row mapping (`store::read_row`, `store::write_row`) that
/// names every field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(serialize = "S: SubjectForm", deserialize = "S: SubjectForm"))]
pub struct Record<S> {
    /// The server node that wrote it (several nodes may share one store);
    /// the audit log fills it in, the security path leaves it empty.
    pub node: String,
    /// Correlation id shared by every record of the exchange on both sides.
    pub request_id: String,
    /// When the step happened, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// Which side of the exchange wrote it.
    pub side: Side,
    /// Which step.
    pub step: Step,
    /// Consumer subsystem id (as received, if it could not be parsed).
    pub client: String,
    /// Provider subsystem id.
    pub service: String,
    /// gRPC method path.
    pub method: String,
    /// Purpose code.
    pub purpose: String,
    /// The data subject: `scheme:value` in an [`AuditRecord`], its keyed
    /// pseudonym (HMAC-SHA256) in an [`Entry`].
    #[serde(
        serialize_with = "SubjectForm::serialize_opt",
        deserialize_with = "SubjectForm::deserialize_opt"
    )]
    pub subject: Option<S>,
    /// What the access rested on: `legal:<act>` or `consent:<id>`.
    pub basis: Option<String>,
    /// The official acting.
    pub user: Option<String>,
    /// The other security server (its id, or address when unknown).
    pub peer: Option<String>,
    /// gRPC status code of the outcome (0 = OK).
    pub status: i32,
    /// `kopir-error` reason of a refusal or failure.
    pub reason: Option<String>,
    /// Human-readable detail of a refusal or failure.
    pub message: Option<String>,
    /// SHA-256 of the request body (requests) or response body (answers).
    #[serde(with = "opt_hex32")]
    pub body_sha256: Option<Hash>,
    /// SHA-256 of the canonical signed request.
    #[serde(with = "opt_hex32")]
    pub request_hash: Option<Hash>,
    /// The signature this step produced or verified (request or response).
    #[serde(with = "opt_hex")]
    pub signature: Option<Vec<u8>>,
    /// Fingerprint of the signing certificate whose key made `signature`.
    #[serde(with = "opt_hex32")]
    pub signer_key: Option<Hash>,
    /// The digest `signature` covers: the request hash for the request's
    /// signature, the response hash for the response's.
    #[serde(with = "opt_hex32")]
    pub signed_hash: Option<Hash>,
    /// The body, only when the server is configured to store bodies; by
    /// default only `body_sha256` is kept. Not part of the canonical bytes.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_hex")]
    pub body: Option<Vec<u8>>,
    /// The procedure the read belongs to (`kopir-query-group`), e.g. one
    /// benefit claim: the access report groups reads by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_group: Option<String>,
    /// Covert work: until when (ms since the epoch) the read is hidden from
    /// the subject's access report (`kopir-hide-until`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_until_ms: Option<i64>,
    /// Why it is hidden (`kopir-hide-reason`), disclosed with the read after
    /// `hidden_until_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_reason: Option<String>,
}

/// A record as the security path reports it, with the subject in clear.
pub type AuditRecord = Record<String>;

/// A record as a store keeps it, before it is chained: the subject replaced
/// by its pseudonym and the writing node named.
pub type Entry = Record<Hash>;

impl<S> Record<S> {
    /// A record of `step` on `side`, stamped now, with every other field
    /// empty: fill in what is known with struct update syntax.
    pub fn new(side: Side, step: Step) -> Self {
        Self {
            node: String::new(),
            request_id: String::new(),
            at_ms: kopir_core::clock::now_ms(),
            side,
            step,
            client: String::new(),
            service: String::new(),
            method: String::new(),
            purpose: String::new(),
            subject: None,
            basis: None,
            user: None,
            peer: None,
            status: 0,
            reason: None,
            message: None,
            body_sha256: None,
            request_hash: None,
            signature: None,
            signer_key: None,
            signed_hash: None,
            body: None,
            query_group: None,
            hidden_until_ms: None,
            hidden_reason: None,
        }
    }
}

/// How a form of the subject is written in JSON (export archives, the
/// `kopir audit` output).
pub(crate) trait SubjectForm: Sized {
    /// Writes an optional subject.
    fn serialize_opt<Ser: serde::Serializer>(
        value: &Option<Self>,
        s: Ser,
    ) -> Result<Ser::Ok, Ser::Error>;
    /// Reads an optional subject.
    fn deserialize_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Self>, D::Error>;
}

/// A pseudonym is written as 64 hex digits.
impl SubjectForm for Hash {
    fn serialize_opt<Ser: serde::Serializer>(
        value: &Option<Self>,
        s: Ser,
    ) -> Result<Ser::Ok, Ser::Error> {
        opt_hex32::serialize(value, s)
    }

    fn deserialize_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Self>, D::Error> {
        opt_hex32::deserialize(d)
    }
}

/// A subject in clear is written as it is.
impl SubjectForm for String {
    fn serialize_opt<Ser: serde::Serializer>(
        value: &Option<Self>,
        s: Ser,
    ) -> Result<Ser::Ok, Ser::Error> {
        value.serialize(s)
    }

    fn deserialize_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Self>, D::Error> {
        Option::deserialize(d)
    }
}

#[cfg(test)]
impl Entry {
    /// A record of `step` on `side` written by `node`, at time 0, every other
    /// field empty: the base of test fixtures (`Entry { field: ..,
    /// ..Entry::bare(..) }`).
    pub(crate) fn bare(node: &str, side: Side, step: Step) -> Self {
        Self {
            node: node.to_owned(),
            at_ms: 0,
            ..Self::new(side, step)
        }
    }

    /// A record with every field set to a value of its own (no two alike,
    /// none empty): what a test of a field mapping starts from.
    pub(crate) fn every_field_set() -> Self {
        Self {
            node: "node-1".into(),
            request_id: "req-every".into(),
            at_ms: 1_700_000_000_123,
            side: Side::Provider,
            step: Step::Failed,
            client: "KZ/GOV/MLSPP/benefits".into(),
            service: "KZ/GOV/MOJ/population".into(),
            method: "/kz.population.v1.PopulationRegistry/GetPerson".into(),
            purpose: "benefit".into(),
            subject: Some([1; 32]),
            basis: Some("legal:law-1".into()),
            user: Some("officer-1".into()),
            peer: Some("KZ/GOV/MOJ/ss1".into()),
            status: 14,
            reason: Some("registry.unavailable".into()),
            message: Some("connection refused".into()),
            body_sha256: Some([2; 32]),
            request_hash: Some([3; 32]),
            signature: Some(vec![4; 64]),
            signer_key: Some([5; 32]),
            signed_hash: Some([6; 32]),
            body: Some(vec![7; 10]),
            query_group: Some("claim-1".into()),
            hidden_until_ms: Some(1_900_000_000_000),
            hidden_reason: Some("inquiry".into()),
        }
    }
}

impl Entry {
    /// The stored form of `record`, written by `node`, with the subject
    /// replaced by its pseudonym under `key`.
    pub fn from_record(record: AuditRecord, node: &str, key: &PseudonymKey) -> Self {
        Self {
            node: node.to_owned(),
            subject: record.subject.as_deref().map(|s| key.pseudonym(s)),
            request_id: record.request_id,
            at_ms: record.at_ms,
            side: record.side,
            step: record.step,
            client: record.client,
            service: record.service,
            method: record.method,
            purpose: record.purpose,
            basis: record.basis,
            user: record.user,
            peer: record.peer,
            status: record.status,
            reason: record.reason,
            message: record.message,
            body_sha256: record.body_sha256,
            request_hash: record.request_hash,
            signature: record.signature,
            signer_key: record.signer_key,
            signed_hash: record.signed_hash,
            body: record.body,
            query_group: record.query_group,
            hidden_until_ms: record.hidden_until_ms,
            hidden_reason: record.hidden_reason,
        }
    }

    /// True if the record carries any of fields 25–27, and so is hashed in
    /// the second form of the canonical bytes.
    pub fn has_report_fields(&self) -> bool {
        self.query_group.is_some() || self.hidden_until_ms.is_some() || self.hidden_reason.is_some()
    }

    /// Appends this entry's canonical bytes at position `seq` after `prev` to `out`.
    pub(crate) fn canonical_into(&self, seq: u64, prev: &Hash, out: &mut Vec<u8>) {
        let mut c = Canon(out);
        let v2 = self.has_report_fields();
        c.bytes(if v2 { RECORD_TAG } else { RECORD_TAG_V1 }.as_bytes());
        c.bytes(&seq.to_be_bytes());
        c.bytes(prev);
        c.bytes(self.node.as_bytes());
        c.bytes(self.request_id.as_bytes());
        c.bytes(&self.at_ms.to_be_bytes());
        c.bytes(self.side.as_str().as_bytes());
        c.bytes(self.step.as_str().as_bytes());
        c.bytes(self.client.as_bytes());
        c.bytes(self.service.as_bytes());
        c.bytes(self.method.as_bytes());
        c.bytes(self.purpose.as_bytes());
        c.opt(self.subject.as_ref().map(|h| &h[..]));
        c.opt(self.basis.as_deref().map(str::as_bytes));
        c.opt(self.user.as_deref().map(str::as_bytes));
        c.opt(self.peer.as_deref().map(str::as_bytes));
        c.bytes(&self.status.to_be_bytes());
        c.opt(self.reason.as_deref().map(str::as_bytes));
        c.opt(self.message.as_deref().map(str::as_bytes));
        c.opt(self.body_sha256.as_ref().map(|h| &h[..]));
        c.opt(self.request_hash.as_ref().map(|h| &h[..]));
        c.opt(self.signature.as_deref());
        c.opt(self.signer_key.as_ref().map(|h| &h[..]));
        c.opt(self.signed_hash.as_ref().map(|h| &h[..]));
        if v2 {
            c.opt(self.query_group.as_deref().map(str::as_bytes));
            c.opt(
                self.hidden_until_ms
                    .map(i64::to_be_bytes)
                    .as_ref()
                    .map(|b| &b[..]),
            );
            c.opt(self.hidden_reason.as_deref().map(str::as_bytes));
        }
    }

    /// The canonical bytes of this entry at position `seq` after `prev`.
    pub fn canonical(&self, seq: u64, prev: &Hash) -> Vec<u8> {
        let mut out = Vec::with_capacity(384);
        self.canonical_into(seq, prev, &mut out);
        out
    }

    /// The chain hash of this entry at position `seq` after `prev`, reusing
    /// `scratch` for the canonical bytes.
    pub(crate) fn hash_with(&self, seq: u64, prev: &Hash, scratch: &mut Vec<u8>) -> Hash {
        scratch.clear();
        self.canonical_into(seq, prev, scratch);
        kopir_core::pki::sha256(scratch)
    }

    /// The chain hash of this entry at position `seq` after `prev`.
    pub(crate) fn hash(&self, seq: u64, prev: &Hash) -> Hash {
        self.hash_with(seq, prev, &mut Vec::with_capacity(384))
    }
}

/// Reads canonical bytes back: the inverse of [`Entry::canonical_into`] (the
/// embedded store's journal keeps records in this form). `None` if `bytes`
/// are not exactly one record's canonical bytes in either form.
pub fn parse_canonical(bytes: &[u8]) -> Option<(u64, Hash, Entry)> {
    let mut r = Reader(bytes);
    let v2 = match r.field()? {
        Some(tag) if tag == RECORD_TAG.as_bytes() => true,
        Some(tag) if tag == RECORD_TAG_V1.as_bytes() => false,
        _ => return None,
    };
    let seq = u64::from_be_bytes(r.fixed()?);
    let prev: Hash = r.fixed()?;
    let node = r.text()?;
    let request_id = r.text()?;
    let at_ms = i64::from_be_bytes(r.fixed()?);
    let side = Side::parse(&r.text()?)?;
    let step = Step::parse(&r.text()?)?;
    let mut entry = Entry {
        node,
        request_id,
        at_ms,
        side,
        step,
        client: r.text()?,
        service: r.text()?,
        method: r.text()?,
        purpose: r.text()?,
        subject: r.opt_fixed()?,
        basis: r.opt_text()?,
        user: r.opt_text()?,
        peer: r.opt_text()?,
        status: i32::from_be_bytes(r.fixed()?),
        reason: r.opt_text()?,
        message: r.opt_text()?,
        body_sha256: r.opt_fixed()?,
        request_hash: r.opt_fixed()?,
        signature: r.field()?.map(<[u8]>::to_vec),
        signer_key: r.opt_fixed()?,
        signed_hash: r.opt_fixed()?,
        body: None,
        query_group: None,
        hidden_until_ms: None,
        hidden_reason: None,
    };
    if v2 {
        entry.query_group = r.opt_text()?;
        entry.hidden_until_ms = r.opt_fixed()?.map(i64::from_be_bytes);
        entry.hidden_reason = r.opt_text()?;
    }
    // Each form has one encoding: the second only with a field of its own.
    (r.0.is_empty() && entry.has_report_fields() == v2).then_some((seq, prev, entry))
}

/// Reads the fields [`Canon`] writes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// One field: `None` inside for an absent one, `None` outside if the
    /// bytes end early.
    fn field(&mut self) -> Option<Option<&'a [u8]>> {
        let (len, rest) = self.0.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len);
        if len == u32::MAX {
            self.0 = rest;
            return Some(None);
        }
        let (value, rest) = rest.split_at_checked(usize::try_from(len).ok()?)?;
        self.0 = rest;
        Some(Some(value))
    }

    fn opt_fixed<const N: usize>(&mut self) -> Option<Option<[u8; N]>> {
        match self.field()? {
            None => Some(None),
            Some(b) => Some(Some(b.try_into().ok()?)),
        }
    }

    fn fixed<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.opt_fixed()?
    }

    fn opt_text(&mut self) -> Option<Option<String>> {
        match self.field()? {
            None => Some(None),
            Some(b) => Some(Some(String::from_utf8(b.to_vec()).ok()?)),
        }
    }

    fn text(&mut self) -> Option<String> {
        self.opt_text()?
    }
}

struct Canon<'a>(&'a mut Vec<u8>);

impl Canon<'_> {
    fn bytes(&mut self, b: &[u8]) {
        // Fields are far below 4 GiB: a record is built from bounded metadata.
        let len = u32::try_from(b.len()).unwrap_or(u32::MAX - 1);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(b);
    }
    fn opt(&mut self, b: Option<&[u8]>) {
        match b {
            Some(b) => self.bytes(b),
            None => self.0.extend_from_slice(&u32::MAX.to_be_bytes()),
        }
    }
}

/// A record as a store keeps it: its position, its links and its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// Position in the log, from 1, in commit order.
    pub seq: u64,
    /// Hash of the record before (all zeros for the first).
    #[serde(with = "hex32")]
    pub prev_hash: Hash,
    /// SHA-256 of this record's canonical bytes, as stored.
    #[serde(with = "hex32")]
    pub hash: Hash,
    /// The content.
    #[serde(flatten)]
    pub entry: Entry,
}

/// A stored record reads as its content: `record.request_id`, `record.step`...
impl std::ops::Deref for StoredRecord {
    type Target = Entry;

    fn deref(&self) -> &Entry {
        &self.entry
    }
}

impl StoredRecord {
    /// Recomputes the hash from the stored fields (it equals `hash` unless
    /// the record was altered).
    pub fn recompute(&self) -> Hash {
        self.entry.hash(self.seq, &self.prev_hash)
    }

    /// Recomputes the hash into a caller's scratch buffer (for long walks).
    pub(crate) fn recompute_with(&self, scratch: &mut Vec<u8>) -> Hash {
        self.entry.hash_with(self.seq, &self.prev_hash, scratch)
    }

    /// The canonical bytes the hash covers.
    pub fn canonical(&self) -> Vec<u8> {
        self.entry.canonical(self.seq, &self.prev_hash)
    }
}

/// The position and hash a record was given when it was appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// Sequence number.
    pub seq: u64,
    /// Chain hash.
    pub hash: Hash,
}

/// Chains `entries` after `head` (the last stored record, or `None` for an
/// empty log): the sequence numbers, previous hashes and hashes a store must
/// write, in order.
pub(crate) fn chain(head: Option<Link>, entries: &[Entry]) -> Vec<(u64, Hash, Hash)> {
    let (mut seq, mut prev) = head.map(|l| (l.seq, l.hash)).unwrap_or((0, GENESIS));
    let mut scratch = Vec::with_capacity(512);
    entries
        .iter()
        .map(|e| {
            seq += 1;
            let hash = e.hash_with(seq, &prev, &mut scratch);
            let out = (seq, prev, hash);
            prev = hash;
            out
        })
        .collect()
}

/// Converts a stored 32-byte column.
pub(crate) fn hash_from_slice(bytes: &[u8]) -> Option<Hash> {
    bytes.try_into().ok()
}

/// Serde helpers: a 32-byte hash as hex.
pub(crate) mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Serializes as 64 hex digits.
    pub(crate) fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(h))
    }

    /// Parses 64 hex digits.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(&text).map_err(D::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| D::Error::custom("expected 32 bytes"))
    }
}

/// Serde helpers: an optional 32-byte hash as hex or null.
pub(crate) mod opt_hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Serializes as 64 hex digits or null.
    pub(crate) fn serialize<S: Serializer>(h: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match h {
            Some(h) => s.serialize_some(&hex::encode(h)),
            None => s.serialize_none(),
        }
    }

    /// Parses 64 hex digits or null.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<[u8; 32]>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => {
                let bytes = hex::decode(&text).map_err(D::Error::custom)?;
                Ok(Some(
                    bytes
                        .try_into()
                        .map_err(|_| D::Error::custom("expected 32 bytes"))?,
                ))
            }
        }
    }
}

/// Serde helpers: optional bytes as hex or null.
pub(crate) mod opt_hex {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Serializes as hex or null.
    pub(crate) fn serialize<S: Serializer>(b: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => s.serialize_some(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    /// Parses hex or null.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| hex::decode(t).map_err(D::Error::custom))
            .transpose()
    }
}

/// Serde helpers: bytes as base64.
pub(crate) mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Serializes as standard base64.
    pub(crate) fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }

    /// Parses standard base64.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> Entry {
        Entry {
            request_id: format!("req-{i}"),
            at_ms: 1_700_000_000_000 + i as i64,
            client: "KZ/GOV/MLSPP/benefits".into(),
            service: "KZ/GOV/MOJ/population".into(),
            method: "/kz.population.v1.PopulationRegistry/GetPerson".into(),
            purpose: "benefit".into(),
            subject: Some([7; 32]),
            user: Some(String::new()),
            body_sha256: Some([1; 32]),
            signature: Some(vec![1, 2, 3]),
            ..Entry::bare("n1", Side::Consumer, Step::Forwarded)
        }
    }

    #[test]
    fn none_and_empty_differ_and_every_field_counts() {
        let a = entry(1);
        let mut b = a.clone();
        b.user = None;
        assert_ne!(a.hash(1, &GENESIS), b.hash(1, &GENESIS));
        assert_ne!(a.hash(1, &GENESIS), a.hash(2, &GENESIS));
        assert_ne!(a.hash(1, &GENESIS), a.hash(1, &[1; 32]));
        let mut c = a.clone();
        c.status = 1;
        assert_ne!(a.hash(1, &GENESIS), c.hash(1, &GENESIS));
    }

    #[test]
    fn the_report_fields_select_the_second_form_and_count() {
        let plain = entry(1);
        assert!(plain.canonical(1, &GENESIS)[4..].starts_with(RECORD_TAG_V1.as_bytes()));
        let mut grouped = plain.clone();
        grouped.query_group = Some("claim-1".into());
        let bytes = grouped.canonical(1, &GENESIS);
        assert!(bytes[4..].starts_with(RECORD_TAG.as_bytes()));
        assert_ne!(plain.hash(1, &GENESIS), grouped.hash(1, &GENESIS));
        // A covert marker added to (or stripped from) a stored record changes its hash.
        let mut covert = grouped.clone();
        covert.hidden_until_ms = Some(1_900_000_000_000);
        covert.hidden_reason = Some("inquiry".into());
        assert_ne!(covert.hash(1, &GENESIS), grouped.hash(1, &GENESIS));
        let mut other_date = covert.clone();
        other_date.hidden_until_ms = Some(1_900_000_000_001);
        assert_ne!(covert.hash(1, &GENESIS), other_date.hash(1, &GENESIS));
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("hidden_until_ms"), "{json}");
        let back: Entry = serde_json::from_str(&serde_json::to_string(&covert).unwrap()).unwrap();
        assert_eq!(back, covert);
    }

    /// Each field of a record but the stored body (which its hash pins)
    /// changes the canonical bytes and reads back from them, so a field
    /// added to [`Record`] but left out of the canonical bytes fails here.
    #[test]
    fn every_field_but_the_body_is_hashed_and_read_back() {
        let full = Entry::every_field_set();
        let serde_json::Value::Object(fields) = serde_json::to_value(&full).unwrap() else {
            panic!("a record is a JSON object");
        };
        assert_eq!(fields.len(), 25, "a field was added: map it below");
        let hash = full.hash(1, &GENESIS);
        for (name, value) in &fields {
            // Another value of the same kind (texts, numbers, hex bytes).
            let other = match value {
                serde_json::Value::String(t) if name == "side" => {
                    assert_eq!(t, "provider");
                    "consumer".into()
                }
                serde_json::Value::String(t) if name == "step" => {
                    assert_eq!(t, "failed");
                    "answered".into()
                }
                serde_json::Value::String(t)
                    if t.len() == 64 || name == "signature" || name == "body" =>
                {
                    serde_json::Value::String("ab".repeat(t.len() / 2))
                }
                serde_json::Value::String(t) => serde_json::Value::String(format!("{t}x")),
                serde_json::Value::Number(n) => (n.as_i64().unwrap() + 1).into(),
                other => panic!("{name}: unexpected {other}"),
            };
            let mut changed = fields.clone();
            changed.insert(name.clone(), other);
            let changed: Entry = serde_json::from_value(changed.into()).unwrap();
            assert_ne!(changed, full, "{name}");
            let bytes = changed.canonical(1, &GENESIS);
            let (_, _, back) = parse_canonical(&bytes).unwrap();
            if name == "body" {
                assert_eq!(changed.hash(1, &GENESIS), hash, "the body is not hashed");
                assert_eq!(back.body, None);
            } else {
                assert_ne!(changed.hash(1, &GENESIS), hash, "{name} is not hashed");
                assert_eq!(
                    back,
                    Entry {
                        body: None,
                        ..changed
                    },
                    "{name} does not read back"
                );
            }
        }
    }

    /// The stored form keeps every field of the reported record.
    #[test]
    fn from_record_keeps_every_field() {
        let key = PseudonymKey::from_bytes(&[9; 32]);
        let full = Entry::every_field_set();
        // The same record as the security path reports it: no node, the
        // subject in clear.
        let mut json = serde_json::to_value(&full).unwrap();
        json["node"] = "".into();
        json["subject"] = "iin:900101300001".into();
        let reported: AuditRecord = serde_json::from_value(json).unwrap();
        let stored = Entry::from_record(reported, "node-1", &key);
        assert_eq!(
            stored,
            Entry {
                subject: Some(key.pseudonym("iin:900101300001")),
                ..full
            }
        );
    }

    #[test]
    fn chain_links_each_record_to_the_one_before() {
        let entries: Vec<_> = (1..=3).map(entry).collect();
        let links = chain(None, &entries);
        assert_eq!(links[0].0, 1);
        assert_eq!(links[0].1, GENESIS);
        assert_eq!(links[1].1, links[0].2);
        assert_eq!(links[2].1, links[1].2);
        let more = chain(
            Some(Link {
                seq: 3,
                hash: links[2].2,
            }),
            &entries[..1],
        );
        assert_eq!(more[0].0, 4);
        assert_eq!(more[0].1, links[2].2);
    }

    #[test]
    fn canonical_bytes_read_back_in_both_forms() {
        let plain = entry(1);
        let mut covert = entry(2);
        covert.query_group = Some("claim-1".into());
        covert.hidden_until_ms = Some(-5);
        covert.hidden_reason = None;
        covert.basis = Some("law".into());
        for e in [plain, covert] {
            let bytes = e.canonical(9, &[3; 32]);
            assert_eq!(parse_canonical(&bytes), Some((9, [3; 32], e.clone())));
            // Cut short, or with a byte too many, it is no record.
            assert_eq!(parse_canonical(&bytes[..bytes.len() - 1]), None);
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(parse_canonical(&longer), None);
        }
        // The second form without any field of its own is not canonical.
        let mut forged = entry(3).canonical(1, &GENESIS);
        forged.splice(4..4 + RECORD_TAG_V1.len(), RECORD_TAG.bytes());
        forged.extend_from_slice(&[0xFF; 12]);
        assert_eq!(parse_canonical(&forged), None);
        assert_eq!(parse_canonical(b""), None);
    }

    #[test]
    fn stored_record_json_round_trips() {
        let e = entry(5);
        let r = StoredRecord {
            seq: 1,
            prev_hash: GENESIS,
            hash: e.hash(1, &GENESIS),
            entry: e,
        };
        let text = serde_json::to_string(&r).unwrap();
        let back: StoredRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.recompute(), r.hash);
    }
}
