//! The authority's book of management requests: what members asked for,
//! what its operators decided, and the federation description that results.
//!
//! A request is checked when it arrives (see [`Registry::submit`]): its
//! signatures, the TLS certificate it was submitted with, and a trial of the
//! configuration it would make, so that what an operator sees can be
//! approved. It is then kept, pending, in `<state>/requests/<id>.json`
//! (written durably), until an operator approves or rejects it. Approved
//! requests are applied, in the order of their approval, over the
//! description the authority was started with; that result is what the
//! authority signs next. Certificates a request carries are written to
//! `<state>/certs/`, where the description names them.
//!
//! Every request that arrives (refused ones too) and every decision is a
//! record in the authority's own audit log (`<state>/audit.db`, the same
//! tamper-evident store as a server's, with checkpoints signed by the
//! authority's key): `kopir audit query --data-dir <state>` lists them and
//! `kopir audit verify` checks them. The record is durable before the
//! caller hears the outcome.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use kopir_audit::{AuditHandle, AuditLog, AuditRecord, Side, Step};
use kopir_core::{
    durable::write_atomically,
    error::{Reason, Refusal},
    globalconf::{
        GlobalConf,
        describe::{Federation, MemberDesc, ServerDesc},
        model::Subsystem,
    },
    id::MemberId,
    pki::{Fingerprint, certs_from_pem, sha256, sign::VerifyingKey},
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::request::{self, Change, Opened};

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for an operator.
    Pending,
    /// Applied to the description.
    Approved,
    /// Refused by an operator.
    Rejected,
}

impl State {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved => "approved",
            State::Rejected => "rejected",
        }
    }
}

/// One request and its fate, as kept in `<state>/requests/<id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The request's id.
    pub id: String,
    /// Where it stands.
    pub state: State,
    /// The signed request as submitted (base64).
    request: String,
    /// When it arrived.
    #[serde(with = "time::serde::rfc3339")]
    pub submitted_at: OffsetDateTime,
    /// When it was decided.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub decided_at: Option<OffsetDateTime>,
    /// Why (the operator's words).
    #[serde(default)]
    pub why: String,
    /// Its place among approved requests: the order they are applied in.
    #[serde(default)]
    pub seq: u64,
    /// The first configuration serial that includes it.
    #[serde(default)]
    pub in_serial: Option<u64>,
}

impl Entry {
    /// The request document.
    pub fn opened(&self) -> Result<Opened, String> {
        let bytes = B64.decode(&self.request).map_err(|e| e.to_string())?;
        request::open(&bytes).map_err(|e| e.to_string())
    }

    /// The member and one line per change.
    pub fn summary(&self) -> (String, Vec<String>) {
        match self.opened() {
            Ok(o) => (
                o.request.member.to_string(),
                o.request
                    .changes
                    .iter()
                    .map(|c| c.describe(&o.request.member))
                    .collect(),
            ),
            Err(e) => (String::new(), vec![format!("unreadable: {e}")]),
        }
    }
}

/// What the book holds in memory.
struct Book {
    current: Federation,
    /// `current` built: the members' certificates and the trusted CAs that
    /// submissions are checked against, made again only when `current`
    /// changes (not from the certificate files at every submission).
    built: GlobalConf,
    entries: BTreeMap<String, Entry>,
}

/// The authority's requests, their log and the resulting description.
pub struct Registry {
    dir: PathBuf,
    book: Mutex<Book>,
    /// Held through a submission or a decision, so that they happen one
    /// at a time (an id taken twice, two approvals over the same state).
    one_at_a_time: tokio::sync::Mutex<()>,
    audit: Arc<AuditHandle>,
    auto_approve_servers: bool,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Why a request was not taken, or a decision not made.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RegistryError(pub Refusal);

fn refuse(reason: Reason, why: impl Into<String>) -> RegistryError {
    RegistryError(Refusal::new(reason, why))
}

impl Registry {
    /// Opens the book in `dir` over the description `base`, applying the
    /// requests approved so far; a request kept there that no longer
    /// applies is an error (the description changed under it).
    pub fn open(
        dir: &Path,
        base: Federation,
        audit: Arc<AuditHandle>,
        auto_approve_servers: bool,
    ) -> Result<Self, String> {
        let requests = dir.join("requests");
        std::fs::create_dir_all(&requests).map_err(|e| format!("{}: {e}", requests.display()))?;
        let mut entries = BTreeMap::new();
        for file in std::fs::read_dir(&requests).map_err(|e| e.to_string())? {
            let path = file.map_err(|e| e.to_string())?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let entry: Entry = serde_json::from_slice(&text)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                entries.insert(entry.id.clone(), entry);
            }
        }
        let mut approved: Vec<&Entry> = entries
            .values()
            .filter(|e| e.state == State::Approved)
            .collect();
        approved.sort_by_key(|e| e.seq);
        let mut current = base.clone();
        for entry in approved {
            let opened = entry.opened()?;
            current = apply(&current, &opened.request, &dir.join("certs"))
                .map_err(|e| format!("approved request {} no longer applies: {e}", entry.id))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            book: Mutex::new(Book {
                built: build(&current)
                    .map_err(|e| format!("the description with the approved requests: {e}"))?,
                current,
                entries,
            }),
            audit,
            auto_approve_servers,
            one_at_a_time: tokio::sync::Mutex::new(()),
        })
    }

    /// Runs `f` on a blocking thread: certificate files, trial builds and
    /// durable writes stay off the async runtime.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, RegistryError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| {
                refuse(
                    Reason::AuditUnavailable,
                    format!("failed unexpectedly: {e}"),
                )
            })?
    }

    /// The description with every approved request applied.
    pub fn description(&self) -> Federation {
        self.lock().current.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every request (in `state` only, if given), oldest first.
    pub fn list(&self, state: Option<State>) -> Vec<Entry> {
        let mut all: Vec<Entry> = self
            .lock()
            .entries
            .values()
            .filter(|e| state.is_none_or(|s| e.state == s))
            .cloned()
            .collect();
        all.sort_by_key(|e| e.submitted_at);
        all
    }

    /// One request.
    pub fn get(&self, id: &str) -> Result<Entry, RegistryError> {
        self.lock()
            .entries
            .get(id)
            .cloned()
            .ok_or_else(|| refuse(Reason::RequestNotFound, format!("no request {id:?}")))
    }

    /// Checks and keeps a submitted request. `tls_client` is the
    /// certificate the submitting connection presented (its key proven in
    /// the handshake). Refusals are logged too.
    pub async fn submit(
        self: &Arc<Self>,
        bytes: &[u8],
        tls_client: Option<&[u8]>,
    ) -> Result<Entry, RegistryError> {
        let _turn = self.one_at_a_time.lock().await;
        let (owned, tls) = (bytes.to_vec(), tls_client.map(<[u8]>::to_vec));
        let checked = self
            .blocking(move |r| {
                let checked = r.check(&owned, tls.as_deref());
                let known =
                    checked.is_err() && tls.as_deref().is_some_and(|c| r.issued_by_trusted_ca(c));
                Ok((checked, known))
            })
            .await?;
        let (opened, authorised_by) = match checked {
            (Ok(ok), _) => ok,
            // A refusal is logged for a caller with an identity the CA
            // issued; anyone else only reaches the process's log, so that a
            // stranger cannot fill the authority's disk with records.
            (Err(e), true) => {
                let opened = request::open(bytes).ok();
                let (reason, why) = (e.0.reason, e.0.message.clone());
                self.log(
                    bytes,
                    opened.as_ref(),
                    Step::Refused,
                    &reason,
                    &why,
                    tls_client,
                )
                .await?;
                return Err(e);
            }
            (Err(e), false) => {
                tracing::warn!(reason = e.0.reason.as_str(), why = %e.0.message, "management request refused (caller without a certificate of the federation's CA)");
                return Err(e);
            }
        };
        let id = opened.request.id.clone();
        let existing = authorised_by.is_some();
        let entry = Entry {
            id: id.clone(),
            state: State::Pending,
            request: B64.encode(bytes),
            submitted_at: OffsetDateTime::now_utc(),
            decided_at: None,
            why: String::new(),
            seq: 0,
            in_serial: None,
        };
        self.log(
            bytes,
            Some(&opened),
            Step::Accepted,
            &Reason::RequestDecided,
            "received; pending",
            tls_client,
        )
        .await?;
        let kept = entry.clone();
        self.blocking(move |r| r.save(&kept)).await?;
        self.lock().entries.insert(id.clone(), entry);
        let only_servers = opened
            .request
            .changes
            .iter()
            .all(|c| matches!(c, Change::AddServer { .. }));
        if self.auto_approve_servers && existing && only_servers {
            drop(_turn);
            return self
                .decide(
                    &id,
                    true,
                    "auto-approved: a new server of an existing member, signed by its key",
                    "authority",
                )
                .await;
        }
        self.get(&id)
    }

    /// True if `cert` is issued by a CA the current configuration trusts.
    fn issued_by_trusted_ca(&self, cert: &[u8]) -> bool {
        self.lock()
            .built
            .trusted_cas
            .iter()
            .any(|pem| one_der(pem).is_ok_and(|ca| kopir_core::pki::issued_by(cert, &ca).is_ok()))
    }

    /// Reads and checks a request against the current description: its
    /// signatures, the submitting TLS certificate, and the configuration it
    /// would make. Answers the member's current key that signed it (none
    /// for a new member).
    fn check(
        &self,
        bytes: &[u8],
        tls_client: Option<&[u8]>,
    ) -> Result<(Opened, Option<Fingerprint>), RegistryError> {
        let opened =
            request::open(bytes).map_err(|e| refuse(Reason::RequestInvalid, e.to_string()))?;
        let request = &opened.request;
        let book = self.lock();
        if book.entries.contains_key(&request.id) {
            return Err(refuse(
                Reason::RequestDecided,
                format!(
                    "a request with id {} was submitted before; use a new id",
                    request.id
                ),
            ));
        }
        let member = book.built.members.iter().find(|m| m.id == request.member);
        let authorised_by = match member {
            Some(m) => {
                let key = m
                    .signing_certs
                    .iter()
                    .filter_map(|pem| verifying(pem).ok())
                    .find(|k| opened.signed_by(k))
                    .ok_or_else(|| {
                        refuse(
                            Reason::RequestUnauthorized,
                            format!(
                                "a request of {} must be signed by its current signing key",
                                m.id
                            ),
                        )
                    })?;
                Some(key.key_id())
            }
            None => {
                if !matches!(request.changes.first(), Some(Change::JoinMember { .. })) {
                    return Err(refuse(
                        Reason::RequestUnauthorized,
                        format!(
                            "{} is no member: its first change must be join_member",
                            request.member
                        ),
                    ));
                }
                None
            }
        };
        for change in &request.changes {
            match change {
                Change::JoinMember { signing_cert, .. }
                | Change::AddSigningCert { signing_cert } => {
                    let key =
                        verifying(signing_cert).map_err(|e| refuse(Reason::RequestInvalid, e))?;
                    if !opened.signed_by(&key) {
                        return Err(refuse(
                            Reason::RequestUnauthorized,
                            "the new signing key must sign the request (proof of possession)",
                        ));
                    }
                }
                Change::AddServer { code, tls_cert, .. } => {
                    let der = one_der(tls_cert).map_err(|e| refuse(Reason::RequestInvalid, e))?;
                    if tls_client != Some(der.as_slice()) {
                        return Err(refuse(
                            Reason::RequestUnauthorized,
                            format!(
                                "submit the request for server {}/{code} over TLS presenting that server's new certificate (proof of possession of its key)",
                                request.member
                            ),
                        ));
                    }
                }
                _ => {}
            }
        }
        // The trial's certificate files go to a folder of its own, removed
        // after: what a refused request carries is never kept.
        let trial = tempfile::tempdir().map_err(|e| {
            refuse(
                Reason::AuditUnavailable,
                format!("no room to check the request: {e}"),
            )
        })?;
        apply(&book.current, request, trial.path())
            .and_then(|fed| build(&fed))
            .map_err(|e| {
                refuse(
                    Reason::RequestInvalid,
                    format!("the request does not make a valid configuration: {e}"),
                )
            })?;
        drop(book);
        Ok((opened, authorised_by))
    }

    /// Approves (applies) or rejects a pending request.
    pub async fn decide(
        self: &Arc<Self>,
        id: &str,
        approve: bool,
        why: &str,
        by: &str,
    ) -> Result<Entry, RegistryError> {
        let _turn = self.one_at_a_time.lock().await;
        let mut entry = self.get(id)?;
        if entry.state != State::Pending {
            return Err(refuse(
                Reason::RequestDecided,
                format!("request {id} is already {}", entry.state.as_str()),
            ));
        }
        let opened = entry
            .opened()
            .map_err(|e| refuse(Reason::RequestInvalid, e))?;
        let applied = if approve {
            let request = opened.request.clone();
            let next = self
                .blocking(move |r| {
                    let current = r.lock().current.clone();
                    let next = apply(&current, &request, &r.dir.join("certs")).map_err(|e| {
                        refuse(Reason::RequestInvalid, format!("no longer applies: {e}"))
                    })?;
                    let built = build(&next).map_err(|e| {
                        refuse(
                            Reason::RequestInvalid,
                            format!("no longer makes a valid configuration: {e}"),
                        )
                    })?;
                    Ok((next, built))
                })
                .await?;
            let seq = self
                .lock()
                .entries
                .values()
                .map(|e| e.seq)
                .max()
                .unwrap_or(0)
                + 1;
            Some((next, seq))
        } else {
            None
        };
        entry.state = if approve {
            State::Approved
        } else {
            State::Rejected
        };
        entry.decided_at = Some(OffsetDateTime::now_utc());
        entry.why = why.to_string();
        let bytes = B64.decode(&entry.request).unwrap_or_default();
        let step = if approve {
            Step::Answered
        } else {
            Step::Refused
        };
        let message = format!("{} by {by}: {why}", entry.state.as_str());
        self.log(
            &bytes,
            Some(&opened),
            step,
            &Reason::RequestDecided,
            &message,
            None,
        )
        .await?;
        if let Some((_, seq)) = &applied {
            entry.seq = *seq;
        }
        let kept = entry.clone();
        self.blocking(move |r| r.save(&kept)).await?;
        let mut book = self.lock();
        if let Some(((next, built), _)) = applied {
            book.current = next;
            book.built = built;
        }
        book.entries.insert(entry.id.clone(), entry.clone());
        Ok(entry)
    }

    /// Notes that configuration `serial`, just published, includes every
    /// approved request.
    pub async fn published(self: &Arc<Self>, serial: u64) {
        let fresh: Vec<Entry> = {
            let mut book = self.lock();
            book.entries
                .values_mut()
                .filter(|e| e.state == State::Approved && e.in_serial.is_none())
                .map(|e| {
                    e.in_serial = Some(serial);
                    e.clone()
                })
                .collect()
        };
        if fresh.is_empty() {
            return;
        }
        let saved = self
            .blocking(move |r| fresh.iter().try_for_each(|e| r.save(e)))
            .await;
        if let Err(e) = saved {
            tracing::warn!(error = %e.0.message, "could not note the serial of an approved request");
        }
    }

    fn save(&self, entry: &Entry) -> Result<(), RegistryError> {
        let path = self.dir.join("requests").join(format!("{}.json", entry.id));
        let text = serde_json::to_vec_pretty(entry).unwrap_or_default();
        write_atomically(&path, &text).map_err(|e| {
            refuse(
                Reason::AuditUnavailable,
                format!("cannot keep the request in {}: {e}", path.display()),
            )
        })
    }

    /// Writes one record of the request to the authority's log, durably.
    async fn log(
        &self,
        bytes: &[u8],
        opened: Option<&Opened>,
        step: Step,
        reason: &Reason,
        message: &str,
        tls_client: Option<&[u8]>,
    ) -> Result<(), RegistryError> {
        let mut record = AuditRecord::new(Side::Provider, step);
        if let Some(o) = opened {
            record.request_id = o.request.id.clone();
            record.client = o.request.member.to_string();
            record.service = "authority/management".into();
            record.method = o
                .request
                .changes
                .iter()
                .map(|c| c.describe(&o.request.member))
                .collect::<Vec<_>>()
                .join("; ");
        } else {
            record.request_id = uuid::Uuid::new_v4().to_string();
            record.service = "authority/management".into();
        }
        record.purpose = "registration".into();
        record.peer = tls_client.map(|c| Fingerprint::of(c).to_string());
        if step == Step::Refused {
            record.reason = Some(reason.as_str().into());
        }
        record.message = Some(message.into());
        record.request_hash = Some(sha256(bytes));
        record.body_sha256 = Some(sha256(bytes));
        // What was asked is kept with what was taken or decided; a refused
        // submission is kept by its hash only.
        if step != Step::Refused || opened.is_some_and(|_| tls_client.is_none()) {
            record.body = Some(bytes.to_vec());
        }
        self.audit.append(record).await.map_err(|e| {
            refuse(
                Reason::AuditUnavailable,
                format!("the request could not be logged: {e}"),
            )
        })
    }
}

fn one_der(pem: &str) -> Result<Vec<u8>, String> {
    let certs = certs_from_pem(pem.as_bytes(), "request").map_err(|e| e.to_string())?;
    Ok(certs[0].as_ref().to_vec())
}

fn verifying(pem: &str) -> Result<VerifyingKey, String> {
    VerifyingKey::from_cert(&one_der(pem)?).map_err(|e| e.to_string())
}

/// The configuration `fed` makes (serial and validity do not matter here).
fn build(fed: &Federation) -> Result<GlobalConf, String> {
    fed.build(0, time::Duration::hours(1))
        .map_err(|e| e.to_string())
}

/// `fed` with `request` applied; the certificates it carries are written to
/// `certs`, where the description names them.
fn apply(fed: &Federation, request: &request::Request, certs: &Path) -> Result<Federation, String> {
    let mut fed = fed.clone();
    let cert_file = |n: usize, pem: &str| -> Result<PathBuf, String> {
        one_der(pem)?;
        let path = certs.join(format!("{}-{n}.crt", request.id));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        write_atomically(&path, pem.as_bytes()).map_err(|e| e.to_string())?;
        Ok(path)
    };
    for (n, change) in request.changes.iter().enumerate() {
        let member = &request.member;
        if let Change::JoinMember { name, signing_cert } = change {
            if fed.members.iter().any(|m| &m.id == member) {
                return Err(format!("{member} is a member already"));
            }
            fed.members.push(MemberDesc {
                id: member.clone(),
                name: name.clone(),
                signing_cert: Some(cert_file(n, signing_cert)?),
                extra_signing_certs: vec![],
                subsystems: vec![],
                servers: vec![],
            });
            continue;
        }
        let m = member_mut(&mut fed, member)?;
        match change {
            Change::JoinMember { .. } => {}
            Change::AddServer {
                code,
                address,
                tls_cert,
                subsystems,
            } => {
                if m.servers.iter().any(|s| &s.code == code) {
                    return Err(format!("{member}/{code} exists"));
                }
                let tls_cert = Some(cert_file(n, tls_cert)?);
                let m = member_mut(&mut fed, member)?;
                m.servers.push(ServerDesc {
                    code: code.clone(),
                    address: address.clone(),
                    hosts: vec![],
                    tls_cert,
                    subsystems: subsystems.clone(),
                    maintenance: false,
                });
            }
            Change::SetAddress { code, address } => {
                let server = m
                    .servers
                    .iter_mut()
                    .find(|s| &s.code == code)
                    .ok_or_else(|| format!("{member} has no server {code}"))?;
                server.address = address.clone();
            }
            Change::AddSubsystem {
                code,
                personal_data,
            } => {
                if m.subsystems.iter().any(|s| &s.code == code) {
                    return Err(format!("{member}/{code} exists"));
                }
                m.subsystems.push(Subsystem {
                    code: code.clone(),
                    personal_data: *personal_data,
                });
            }
            Change::AddSigningCert { signing_cert } => {
                let file = cert_file(n, signing_cert)?;
                let m = member_mut(&mut fed, member)?;
                m.extra_signing_certs.push(file);
            }
            Change::RemoveSigningCert { key_id } => {
                let primary = match m.signing_cert.clone() {
                    Some(p) => p,
                    None => fed_layout_signing(&fed, member)?,
                };
                let m = member_mut(&mut fed, member)?;
                let mut listed: Vec<PathBuf> = std::iter::once(primary)
                    .chain(m.extra_signing_certs.iter().cloned())
                    .collect();
                let before = listed.len();
                listed.retain(|file| {
                    kopir_core::pki::cert_fingerprint(file)
                        .map_or(true, |fp| fp.to_string() != *key_id)
                });
                if listed.len() == before {
                    return Err(format!("{member} lists no signing certificate {key_id}"));
                }
                if listed.is_empty() {
                    return Err(format!("{member} would have no signing certificate left"));
                }
                m.signing_cert = Some(listed.remove(0));
                m.extra_signing_certs = listed;
            }
            Change::RemoveSubsystem { code } => {
                let before = m.subsystems.len();
                m.subsystems.retain(|s| &s.code != code);
                if m.subsystems.len() == before {
                    return Err(format!("{member} has no subsystem {code}"));
                }
                m.servers
                    .iter_mut()
                    .for_each(|s| s.subsystems.retain(|c| c != code));
            }
        }
    }
    Ok(fed)
}

/// The development layout's signing certificate of `member`, where the
/// description names none.
fn fed_layout_signing(fed: &Federation, member: &MemberId) -> Result<PathBuf, String> {
    let certs = fed
        .certs
        .as_ref()
        .ok_or_else(|| format!("{member} names no signing certificate"))?;
    Ok(kopir_core::pki::layout::DevLayout::new(certs)
        .member_signing(member)
        .0)
}

fn member_mut<'f>(fed: &'f mut Federation, id: &MemberId) -> Result<&'f mut MemberDesc, String> {
    fed.members
        .iter_mut()
        .find(|m| &m.id == id)
        .ok_or_else(|| format!("{id} is no member"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kopir_core::pki::{dev, layout::DevLayout};

    use super::*;
    use crate::request::{Request, sign};

    struct Setup {
        dir: tempfile::TempDir,
        base: Federation,
        layout: DevLayout,
    }

    impl Setup {
        fn new() -> Self {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            let base = Federation::load(&root.join("deploy/federation.toml")).unwrap();
            let layout = DevLayout::new(base.certs.clone().unwrap());
            Self {
                dir: tempfile::tempdir().unwrap(),
                base,
                layout,
            }
        }

        async fn open(&self) -> Arc<Registry> {
            let key = kopir_core::pki::sign::SigningKey::load(
                &self.layout.authority_cert(),
                &self.layout.authority_key(),
            )
            .unwrap();
            let audit = kopir_audit::open(
                &kopir_audit::AuditConfig::embedded(self.dir.path().join("log")),
                Arc::new(key),
            )
            .await
            .unwrap();
            Arc::new(Registry::open(self.dir.path(), self.base.clone(), audit, false).unwrap())
        }

        /// A certificate the development CA issues for a new key: (PEM, key PEM).
        fn issued(&self, cn: &str, signing: bool) -> (String, String) {
            let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
            let (csr, key) = dev::key_and_csr(cn, &["127.0.0.1".into()], signing).unwrap();
            let cert = dev::issue_from_csr(
                &read(self.layout.ca_cert()),
                &read(self.layout.ca_key()),
                &csr,
                !signing,
            )
            .unwrap();
            (cert, key)
        }

        fn member_key(&self, member: &str) -> kopir_core::pki::sign::SigningKey {
            let (c, k) = self.layout.member_signing(&member.parse().unwrap());
            kopir_core::pki::sign::SigningKey::load(&c, &k).unwrap()
        }
    }

    fn request(id: &str, member: &str, changes: Vec<Change>) -> Request {
        Request {
            id: id.into(),
            member: member.parse().unwrap(),
            created_at: OffsetDateTime::now_utc(),
            changes,
        }
    }

    fn der(pem: &str) -> Vec<u8> {
        one_der(pem).unwrap()
    }

    fn signing_key(cert: &str, key: &str, dir: &Path) -> kopir_core::pki::sign::SigningKey {
        let (c, k) = (dir.join("s.crt"), dir.join("s.key"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        kopir_core::pki::sign::SigningKey::load(&c, &k).unwrap()
    }

    fn reason(e: RegistryError) -> &'static str {
        e.0.reason.as_str()
    }

    #[tokio::test]
    async fn a_new_member_joins_and_stays_after_a_restart() {
        let s = Setup::new();
        let registry = s.open().await;
        let (signing_cert, signing_pem) = s.issued("KZ/GOV/NEW signing", true);
        let (tls_cert, _) = s.issued("KZ/GOV/NEW/ss1", false);
        let new_key = signing_key(&signing_cert, &signing_pem, s.dir.path());
        let changes = vec![
            Change::JoinMember {
                name: "New Agency".into(),
                signing_cert: signing_cert.clone(),
            },
            Change::AddServer {
                code: "ss1".into(),
                address: "new-ss1:8443".into(),
                tls_cert: tls_cert.clone(),
                subsystems: vec![],
            },
        ];
        let join = request("join-1", "KZ/GOV/NEW", changes.clone());
        // Without the new key's signature, or without the new server's
        // certificate on the connection: refused.
        let unsigned = sign(&join, &[]);
        assert_eq!(
            reason(
                registry
                    .submit(&unsigned, Some(&der(&tls_cert)))
                    .await
                    .unwrap_err()
            ),
            "request.unauthorized"
        );
        let signed = sign(&join, &[&new_key]);
        assert_eq!(
            reason(registry.submit(&signed, None).await.unwrap_err()),
            "request.unauthorized"
        );
        let entry = registry
            .submit(&signed, Some(&der(&tls_cert)))
            .await
            .unwrap();
        assert_eq!(entry.state, State::Pending);
        assert!(
            registry
                .description()
                .members
                .iter()
                .all(|m| m.name != "New Agency")
        );
        let approved = registry
            .decide("join-1", true, "welcome", "operator")
            .await
            .unwrap();
        assert_eq!(approved.state, State::Approved);
        let again = registry
            .decide("join-1", false, "no", "operator")
            .await
            .unwrap_err();
        assert_eq!(reason(again), "request.decided");
        let conf = registry
            .description()
            .build(1, time::Duration::hours(1))
            .unwrap();
        let new = conf
            .members
            .iter()
            .find(|m| m.name == "New Agency")
            .unwrap();
        assert_eq!(new.servers[0].address, "new-ss1:8443");
        drop(registry);
        let reopened = s.open().await;
        assert!(
            reopened
                .description()
                .members
                .iter()
                .any(|m| m.name == "New Agency")
        );
        assert_eq!(reopened.get("join-1").unwrap().state, State::Approved);
    }

    #[tokio::test]
    async fn a_member_changes_its_subsystems_and_address_or_is_rejected() {
        let s = Setup::new();
        let registry = s.open().await;
        let moj = s.member_key("KZ/GOV/MOJ");
        let change = request(
            "moj-1",
            "KZ/GOV/MOJ",
            vec![
                Change::AddSubsystem {
                    code: "notary".into(),
                    personal_data: true,
                },
                Change::RemoveSubsystem {
                    code: "realty".into(),
                },
                Change::SetAddress {
                    code: "ss1".into(),
                    address: "moj-ss1.example:9443".into(),
                },
            ],
        );
        // Signed by another member's key: refused.
        let other = s.member_key("KZ/GOV/SRC");
        assert_eq!(
            reason(
                registry
                    .submit(&sign(&change, &[&other]), None)
                    .await
                    .unwrap_err()
            ),
            "request.unauthorized"
        );
        registry
            .submit(&sign(&change, &[&moj]), None)
            .await
            .unwrap();
        registry
            .decide("moj-1", true, "ok", "operator")
            .await
            .unwrap();
        let conf = registry
            .description()
            .build(1, time::Duration::hours(1))
            .unwrap();
        let member = conf
            .members
            .iter()
            .find(|m| m.id.to_string() == "KZ/GOV/MOJ")
            .unwrap();
        let codes: Vec<&str> = member.subsystems.iter().map(|s| s.code.as_str()).collect();
        assert_eq!(codes, ["population", "notary"]);
        assert_eq!(member.servers[0].subsystems, ["population"]);
        assert_eq!(member.servers[0].address, "moj-ss1.example:9443");

        // A subsystem that is not there: refused at once; a rejected one
        // changes nothing.
        let gone = request(
            "moj-2",
            "KZ/GOV/MOJ",
            vec![Change::RemoveSubsystem {
                code: "realty".into(),
            }],
        );
        assert_eq!(
            reason(
                registry
                    .submit(&sign(&gone, &[&moj]), None)
                    .await
                    .unwrap_err()
            ),
            "request.invalid"
        );
        let more = request(
            "moj-3",
            "KZ/GOV/MOJ",
            vec![Change::AddSubsystem {
                code: "archive".into(),
                personal_data: false,
            }],
        );
        registry.submit(&sign(&more, &[&moj]), None).await.unwrap();
        let before = registry.description().members.clone();
        let rejected = registry
            .decide("moj-3", false, "not a registry of MOJ", "operator")
            .await
            .unwrap();
        assert_eq!(
            (rejected.state, rejected.why.as_str()),
            (State::Rejected, "not a registry of MOJ")
        );
        assert_eq!(
            format!("{:?}", registry.description().members),
            format!("{before:?}")
        );
        assert_eq!(registry.list(Some(State::Pending)).len(), 0);
        assert_eq!(
            reason(registry.get("nope").unwrap_err()),
            "request.not_found"
        );
    }

    #[tokio::test]
    async fn a_signing_key_is_listed_beside_the_old_and_the_old_one_removed() {
        let s = Setup::new();
        let registry = s.open().await;
        let old = s.member_key("KZ/GOV/SRC");
        let (next_cert, next_pem) = s.issued("SRC signing 2027", true);
        let next = signing_key(&next_cert, &next_pem, s.dir.path());
        let keys_of = |r: &Registry| {
            let conf = r.description().build(1, time::Duration::hours(1)).unwrap();
            let m = conf
                .members
                .iter()
                .find(|m| m.id.to_string() == "KZ/GOV/SRC")
                .unwrap();
            m.signing_certs.len()
        };
        let add = request(
            "src-1",
            "KZ/GOV/SRC",
            vec![Change::AddSigningCert {
                signing_cert: next_cert.clone(),
            }],
        );
        // The new key must sign too.
        assert_eq!(
            reason(
                registry
                    .submit(&sign(&add, &[&old]), None)
                    .await
                    .unwrap_err()
            ),
            "request.unauthorized"
        );
        registry
            .submit(&sign(&add, &[&old, &next]), None)
            .await
            .unwrap();
        registry
            .decide("src-1", true, "rollover", "operator")
            .await
            .unwrap();
        assert_eq!(keys_of(&registry), 2);
        let old_id = old.key_id().to_string();
        let remove = |id: &str, key_id: &str| {
            request(
                id,
                "KZ/GOV/SRC",
                vec![Change::RemoveSigningCert {
                    key_id: key_id.into(),
                }],
            )
        };
        registry
            .submit(&sign(&remove("src-2", &old_id), &[&next]), None)
            .await
            .unwrap();
        registry
            .decide("src-2", true, "rollover done", "operator")
            .await
            .unwrap();
        assert_eq!(keys_of(&registry), 1);
        // The old key no longer authorises; the last key cannot go.
        let late = remove("src-3", &next.key_id().to_string());
        assert_eq!(
            reason(
                registry
                    .submit(&sign(&late, &[&old]), None)
                    .await
                    .unwrap_err()
            ),
            "request.unauthorized"
        );
        assert_eq!(
            reason(
                registry
                    .submit(&sign(&late, &[&next]), None)
                    .await
                    .unwrap_err()
            ),
            "request.invalid"
        );
    }
}
