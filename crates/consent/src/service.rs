//! The consent authority's gRPC service (`kopir.v1.ConsentService`).
//!
//! Each call first names its caller from the TLS client certificate (see
//! [`Caller`]) and refuses callers the call is not for; then it checks its
//! request at the edge, reads or writes the store, and answers. Revocations are
//! pushed to every `WatchRevocations` stream as soon as they are durable; each
//! stream also polls the store once per heartbeat (revocations stored by
//! another node of the authority sharing a PostgreSQL store) and then sends
//! the heartbeat that tells the provider its view is complete.

use std::{collections::HashMap, pin::Pin, sync::Arc, time::Duration};

use futures_util::Stream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{
    grant::Grant,
    store::{ConsentStore, Revocation, RevokeOutcome, StoreError},
    token::{self, Claims},
};
use kopir_core::{
    clock::now_ms,
    error::{Reason, Refusal},
    globalconf::{ConfView, GlobalConfHandle},
    id::{ServerId, Subject, SubsystemId},
    pki::{Fingerprint, sign::SigningKey},
};
use kopir_proto::v1::{
    GrantRequest, GrantResponse, Heartbeat, IssueTokenRequest, IssueTokenResponse, ListRequest,
    ListResponse, Revocation as RevocationMsg, RevocationEvent, RevokeRequest, RevokeResponse,
    WatchRevocationsRequest, consent_service_server::ConsentService, revocation_event::Event,
};

/// Revocations read from the store per query.
const PAGE: usize = 1000;

/// Who is calling, by TLS client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// The citizen portal (pinned in the authority's configuration).
    Portal,
    /// A security server listed in the global configuration.
    Server(ServerId),
    /// An information system pinned in the authority's configuration.
    System(SubsystemId),
}

/// The state behind the service.
pub(crate) struct Authority {
    /// Grants, revocations.
    pub store: Arc<dyn ConsentStore>,
    /// The token-signing key.
    pub signer: SigningKey,
    /// The global configuration (purposes, subsystems, servers, issuer).
    pub conf: GlobalConfHandle,
    /// Fingerprints of the portals' certificates.
    pub portals: Vec<Fingerprint>,
    /// Information systems allowed to fetch tokens, by certificate.
    pub consumers: HashMap<Fingerprint, SubsystemId>,
    /// The longest life of a token.
    pub token_ttl: Duration,
    /// Interval of the feed's heartbeat.
    pub heartbeat: Duration,
    /// New revocations, as they are stored.
    pub events: broadcast::Sender<Revocation>,
    /// Becomes true when the server stops (ends every feed stream).
    pub stopping: watch::Receiver<bool>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("store", &self.store.describe())
            .finish_non_exhaustive()
    }
}

/// The `kopir.v1.ConsentService` implementation.
#[derive(Debug, Clone)]
pub(crate) struct ConsentServiceImpl {
    authority: Arc<Authority>,
}

impl ConsentServiceImpl {
    /// The service over `authority`.
    pub(crate) fn new(authority: Arc<Authority>) -> Self {
        Self { authority }
    }
}

fn status(r: Refusal) -> Status {
    r.to_status(None)
}

fn store_refusal(e: StoreError) -> Refusal {
    tracing::error!(error = %e, "consent store failed");
    Refusal::new(
        Reason::ConsentStoreUnavailable,
        "the consent authority cannot use its store right now; nothing was changed, retry later",
    )
}

fn subject(text: &str) -> Result<Subject, Refusal> {
    text.parse()
        .map_err(|e| Refusal::new(Reason::ConsentRequestInvalid, format!("subject: {e}")))
}

fn consent_id(text: &str) -> Result<String, Refusal> {
    uuid::Uuid::parse_str(text)
        .map(|u| u.to_string())
        .map_err(|_| {
            Refusal::new(
                Reason::ConsentRequestInvalid,
                "consent_id must be the id (a UUID) Grant or List returned",
            )
        })
}

fn revocation_msg(r: &Revocation) -> RevocationEvent {
    RevocationEvent {
        event: Some(Event::Revoked(RevocationMsg {
            seq: r.seq,
            consent_id: r.consent_id.clone(),
            revoked_at_ms: r.revoked_at_ms,
            not_after: r.not_after,
        })),
    }
}

impl Authority {
    fn view(&self) -> Result<Arc<ConfView>, Refusal> {
        self.conf
            .current()
            .map_err(|e| Refusal::new(e.reason(), format!("the consent authority's {e}")))
    }

    /// Names the caller of `request` by its TLS client certificate.
    pub(crate) fn caller<T>(
        &self,
        request: &Request<T>,
        view: &ConfView,
    ) -> Result<Caller, Refusal> {
        let cert = request
            .peer_certs()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| {
                Refusal::new(
                    Reason::ClientCertificateMissing,
                    "present a TLS client certificate: the portal's, a security server's, or a registered information system's",
                )
            })?;
        let fp = Fingerprint::of(cert.as_ref());
        if self.portals.contains(&fp) {
            return Ok(Caller::Portal);
        }
        if let Some(server) = view.server_by_tls(&fp) {
            return Ok(Caller::Server(server.clone()));
        }
        if let Some(system) = self.consumers.get(&fp) {
            return Ok(Caller::System(system.clone()));
        }
        Err(Refusal::new(
            Reason::ConsentCallerUnknown,
            format!(
                "the certificate {fp} is not the portal's, not a security server's in global configuration {}, and not a registered information system's",
                view.serial()
            ),
        ))
    }

    fn portal_only(caller: &Caller, what: &str) -> Result<(), Refusal> {
        if caller == &Caller::Portal {
            Ok(())
        } else {
            Err(Refusal::new(
                Reason::ConsentCallerUnknown,
                format!(
                    "only the citizen portal may {what}; call it with the portal's certificate"
                ),
            ))
        }
    }

    async fn grant(
        &self,
        caller: &Caller,
        view: &ConfView,
        req: &GrantRequest,
    ) -> Result<Grant, Refusal> {
        Self::portal_only(caller, "grant consents")?;
        let grant = Grant::from_request(req, view, uuid::Uuid::new_v4().to_string(), now_ms())?;
        self.store
            .insert(grant.clone())
            .await
            .map_err(store_refusal)?;
        tracing::info!(consent = %grant.id, client = %grant.client, service = %grant.service, purpose = %grant.purpose, "consent granted");
        Ok(grant)
    }

    async fn revoke(&self, caller: &Caller, req: &RevokeRequest) -> Result<Grant, Refusal> {
        Self::portal_only(caller, "revoke consents")?;
        let subject = subject(&req.subject)?;
        let id = consent_id(&req.consent_id)?;
        match self
            .store
            .revoke(id.clone(), subject.to_string(), now_ms())
            .await
            .map_err(store_refusal)?
        {
            RevokeOutcome::Revoked(grant, rev) => {
                tracing::info!(consent = %id, seq = rev.seq, "consent revoked");
                // Nobody listening is fine: feeds also poll the store.
                let _ = self.events.send(rev);
                Ok(grant)
            }
            RevokeOutcome::AlreadyRevoked(grant, _) => Ok(grant),
            RevokeOutcome::NotFound => Err(Refusal::new(
                Reason::ConsentNotFound,
                format!("{subject} has no consent {id}; List shows the subject's consents"),
            )),
        }
    }

    async fn issue(
        &self,
        caller: &Caller,
        view: &ConfView,
        req: &IssueTokenRequest,
    ) -> Result<IssueTokenResponse, Refusal> {
        let id = consent_id(&req.consent_id)?;
        let not_found = |who: &str| {
            Refusal::new(
                Reason::ConsentNotFound,
                format!("there is no consent {id} given to {who}"),
            )
        };
        let grant = self.store.get(id.clone()).await.map_err(store_refusal)?;
        let grant = match (caller, grant) {
            (Caller::Portal, _) => {
                return Err(Refusal::new(
                    Reason::ConsentCallerUnknown,
                    "tokens are issued to consumers (their security server or information system), not to the portal",
                ));
            }
            (Caller::Server(server), Some(g)) if g.client.member() == server.member() => g,
            (Caller::System(system), Some(g)) if &g.client == system => g,
            (Caller::Server(server), _) => {
                return Err(not_found(&format!("a subsystem of {}", server.member())));
            }
            (Caller::System(system), _) => return Err(not_found(&system.to_string())),
        };
        let now = now_ms().div_euclid(1000);
        if let Some(at) = grant.revoked_at_ms {
            return Err(Refusal::new(
                Reason::ConsentRevoked,
                format!(
                    "the subject revoked consent {id} at {}; the subject must grant a new one",
                    kopir_core::clock::rfc3339(at.div_euclid(1000))
                ),
            ));
        }
        if now >= grant.not_after {
            return Err(Refusal::new(
                Reason::ConsentExpired,
                format!("consent {id} expired; the subject must grant a new one"),
            ));
        }
        let issuer = view
            .consent_authority()
            .map(|a| a.issuer.clone())
            .ok_or_else(|| {
                Refusal::new(
                    Reason::ConsentInvalid,
                    format!(
                        "global configuration {} names no consent authority, so no provider could check a token",
                        view.serial()
                    ),
                )
            })?;
        let ttl = i64::try_from(self.token_ttl.as_secs()).unwrap_or(i64::MAX);
        let exp = grant
            .not_after
            .min(now.max(grant.not_before).saturating_add(ttl));
        let claims = Claims {
            iss: issuer,
            sub: grant.subject.to_string(),
            jti: grant.id.clone(),
            client: grant.client.to_string(),
            service: grant.service.to_string(),
            methods: grant.methods.clone(),
            purpose: grant.purpose.to_string(),
            nbf: grant.not_before,
            exp,
            iat: now,
            max_uses: grant.max_uses,
        };
        Ok(IssueTokenResponse {
            token: token::sign(&claims, &self.signer),
            expires_at: exp,
        })
    }
}

/// One provider's revocation stream: backlog, then pushes and heartbeats.
async fn feed(
    authority: Arc<Authority>,
    since: u64,
    tx: mpsc::Sender<Result<RevocationEvent, Status>>,
) {
    let mut events = authority.events.subscribe();
    let mut stopping = authority.stopping.clone();
    let mut last = since;
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + authority.heartbeat,
        authority.heartbeat,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Catch up from the store (the backlog at first; later, anything a
        // push did not bring), then vouch for completeness with a heartbeat.
        if let Err(refusal) = catch_up(&authority, &mut last, &tx).await {
            let _ = tx.send(Err(status(refusal))).await;
            return;
        }
        let beat = RevocationEvent {
            event: Some(Event::Heartbeat(Heartbeat {
                head: last,
                at_ms: now_ms(),
            })),
        };
        if tx.send(Ok(beat)).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                _ = tick.tick() => break,
                _ = tx.closed() => return,
                _ = super::until_stopped(&mut stopping) => return,
                event = events.recv() => match event {
                    Ok(rev) if rev.seq == last + 1 => {
                        last = rev.seq;
                        if tx.send(Ok(revocation_msg(&rev))).await.is_err() {
                            return;
                        }
                    }
                    // Already sent, or a gap (another writer): the store has it.
                    Ok(rev) if rev.seq <= last => {}
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

/// Sends every revocation after `last` that still matters, advancing `last`.
async fn catch_up(
    authority: &Authority,
    last: &mut u64,
    tx: &mpsc::Sender<Result<RevocationEvent, Status>>,
) -> Result<(), Refusal> {
    loop {
        let page = authority
            .store
            .revocations_after(*last, PAGE)
            .await
            .map_err(store_refusal)?;
        let now = now_ms().div_euclid(1000);
        for rev in &page {
            *last = rev.seq;
            // A revocation of a consent past its window no longer matters.
            if rev.not_after > now && tx.send(Ok(revocation_msg(rev))).await.is_err() {
                return Ok(());
            }
        }
        if page.len() < PAGE {
            return Ok(());
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<RevocationEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ConsentService for ConsentServiceImpl {
    async fn grant(
        &self,
        request: Request<GrantRequest>,
    ) -> Result<Response<GrantResponse>, Status> {
        let a = &self.authority;
        let view = a.view().map_err(status)?;
        let caller = a.caller(&request, &view).map_err(status)?;
        let grant = a
            .grant(&caller, &view, request.get_ref())
            .await
            .map_err(status)?;
        Ok(Response::new(GrantResponse {
            consent: Some(grant.to_message()),
        }))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let a = &self.authority;
        let view = a.view().map_err(status)?;
        let caller = a.caller(&request, &view).map_err(status)?;
        Authority::portal_only(&caller, "list consents").map_err(status)?;
        let subject = subject(&request.get_ref().subject).map_err(status)?;
        let grants = a
            .store
            .of_subject(subject.to_string())
            .await
            .map_err(|e| status(store_refusal(e)))?;
        Ok(Response::new(ListResponse {
            consents: grants.iter().map(Grant::to_message).collect(),
        }))
    }

    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let a = &self.authority;
        let view = a.view().map_err(status)?;
        let caller = a.caller(&request, &view).map_err(status)?;
        let grant = a.revoke(&caller, request.get_ref()).await.map_err(status)?;
        Ok(Response::new(RevokeResponse {
            consent: Some(grant.to_message()),
        }))
    }

    async fn issue_token(
        &self,
        request: Request<IssueTokenRequest>,
    ) -> Result<Response<IssueTokenResponse>, Status> {
        let a = &self.authority;
        let view = a.view().map_err(status)?;
        let caller = a.caller(&request, &view).map_err(status)?;
        let answer = a
            .issue(&caller, &view, request.get_ref())
            .await
            .map_err(status)?;
        Ok(Response::new(answer))
    }

    type WatchRevocationsStream = EventStream;

    async fn watch_revocations(
        &self,
        request: Request<WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        let a = &self.authority;
        let view = a.view().map_err(status)?;
        match a.caller(&request, &view).map_err(status)? {
            Caller::Server(server) => {
                tracing::info!(%server, since = request.get_ref().since, "revocation feed subscribed");
            }
            _ => {
                return Err(status(Refusal::new(
                    Reason::ConsentCallerUnknown,
                    "only security servers listed in the global configuration may watch revocations",
                )));
            }
        }
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(feed(self.authority.clone(), request.get_ref().since, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
