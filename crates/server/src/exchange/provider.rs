//! The provider's side: a signed request from a peer server on the peer port,
//! checked step by step, audited, passed to the registry, and answered with a
//! response signed and bound to the request.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::exchange::{
    Gateway, Known, consumer::conf_refusal, durable, envelope, record_refusal, written,
};
use crate::policy;
use kopir_audit::{Side, Step};
use kopir_consent::Expected;
use kopir_core::{clock::now_ms, deadline::Deadline, meta::CallMeta};
use kopir_core::{
    error::{Reason, Refusal},
    globalconf::model::Basis,
    pki::{Fingerprint, sha256},
};
use kopir_proto::v1::{ForwardRequest, ForwardResponse, ResponseHeader, exchange_server::Exchange};

/// The peer port's `kopir.v1.Exchange` service.
#[derive(Debug, Clone)]
pub(crate) struct Provider {
    gw: Arc<Gateway>,
}

impl Provider {
    /// The service over a server's gateway state.
    pub(crate) fn new(gw: Arc<Gateway>) -> Self {
        Self { gw }
    }
}

type Failed = (Step, Refusal);

fn refused(r: Refusal) -> Failed {
    (Step::Refused, r)
}

#[tonic::async_trait]
impl Exchange for Provider {
    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let gw = &*self.gw;
        let peer_cert = request.peer_certs().and_then(|c| c.first().cloned());
        // The door (`gate`) started the clock when the request arrived.
        let deadline = request
            .extensions()
            .get::<Deadline>()
            .copied()
            .unwrap_or_else(|| {
                Deadline::from_headers(request.metadata().as_ref(), gw.limits.timeout())
            });
        let forward = request.into_inner();
        let header = forward.header.clone().unwrap_or_default();
        let meta = match CallMeta::from_header(&header) {
            Ok(meta) => meta,
            Err(refusal) => {
                let request_id = header.request_id.chars().take(64).collect();
                let known = Known::new(Side::Provider, request_id).unparsed(
                    &header.client,
                    &header.service,
                    &header.method,
                    &header.purpose,
                );
                record_refusal(&*gw.audit, &known, &refusal).await;
                return Err(refusal.to_status(Some(known.request_id())));
            }
        };
        let mut known = Known::of_call(Side::Provider, &meta);
        match serve(
            gw,
            &meta,
            &mut known,
            peer_cert.as_ref().map(|c| c.as_ref()),
            forward,
            &deadline,
        )
        .await
        {
            Ok(response) => Ok(Response::new(response)),
            Err((step, refusal)) => {
                if step == Step::Refused {
                    record_refusal(&*gw.audit, &known, &refusal).await;
                }
                Err(refusal.to_status(Some(&meta.request_id)))
            }
        }
    }
}

/// Steps 1–9 of the provider's side. What each step learns (the peer, the
/// request hash, the basis) goes into `known`, so that every later record,
/// a refusal's or a failure's included, carries it.
async fn serve(
    gw: &Gateway,
    meta: &CallMeta,
    known: &mut Known,
    peer_cert: Option<&[u8]>,
    forward: ForwardRequest,
    deadline: &Deadline,
) -> Result<ForwardResponse, Failed> {
    let header = forward.header.unwrap_or_default();
    // 1. The global configuration must be valid and fresh.
    let view = gw.conf.current().map_err(conf_refusal).map_err(refused)?;
    // 2. The TLS peer must be a server of the client's member.
    let peer_cert = peer_cert.ok_or_else(|| {
        refused(Refusal::new(
            Reason::PeerCertificateMissing,
            "present this security server's TLS certificate",
        ))
    })?;
    let peer_fp = Fingerprint::of(peer_cert);
    let Some(peer) = view
        .server_of(meta.client.member(), &peer_fp)
        .map(ToString::to_string)
    else {
        return Err(refused(Refusal::new(
            Reason::PeerUnknown,
            format!(
                "the TLS certificate {peer_fp} is not a security server certificate of {} in global configuration {}",
                meta.client.member(),
                view.serial()
            ),
        )));
    };
    known.learn_peer(peer);
    // 3. The signature of the client's member, and the body it covers.
    let now = now_ms();
    let request_hash = envelope::verify_request(
        &view,
        &gw.verified,
        &header,
        forward.signature.as_ref(),
        meta.client.member(),
        now / 1000,
    )
    .map_err(refused)?;
    known.learn_request_hash(request_hash);
    let request_body_hash = sha256(&forward.body);
    if request_body_hash[..] != header.body_sha256[..] {
        return Err(refused(Refusal::new(
            Reason::BodyDigestMismatch,
            "the request body is not the one the consumer signed (altered in transit)",
        )));
    }
    // 4. Fresh, and never seen before.
    let skew = gw.limits.max_clock_skew_ms;
    if (header.timestamp_ms - now).abs() > skew {
        return Err(refused(Refusal::new(
            Reason::TimestampOutOfWindow,
            format!(
                "the request was signed {} ms from this server's clock; at most {skew} ms is accepted (check both clocks)",
                header.timestamp_ms - now
            ),
        )));
    }
    gw.replay
        .check(&header.client, &header.request_id, header.timestamp_ms, now)
        .map_err(refused)?;
    // 5. A service this server provides, for a known purpose, about a named subject.
    let local = gw.local.current();
    let registry = local.services.get(&meta.service).ok_or_else(|| {
        refused(Refusal::new(
            Reason::ServiceUnknown,
            format!(
                "{} is not provided by security server {}",
                meta.service, gw.server_id
            ),
        ))
    })?;
    let personal = view.service(&meta.service).is_some_and(|e| e.personal_data);
    policy::check_purpose_and_subject(&view, meta, personal).map_err(refused)?;
    policy::hiding::check(&view, meta, now).map_err(refused)?;
    // 6. The provider's access rules, then the basis of the pull: the legal
    //    act, or the subject's consent (checked, and a use counted, here).
    local.policy.check(meta).map_err(refused)?;
    let basis = match policy::basis(&view, meta).map_err(refused)? {
        Basis::LegalAct { act } => policy::legal_basis(act),
        Basis::Consent => {
            let expected = Expected::from_meta(meta).map_err(refused)?;
            gw.consent
                .check(&view, meta.consent.as_deref(), &expected, now)
                .await
                .map_err(refused)?
                .basis()
        }
    };
    known.learn_basis(basis);
    deadline
        .check("the request was being checked")
        .map_err(refused)?;
    // 7. No audit, no data: the acceptance is written before the registry is
    //    called, and made durable with the answer's record (9) or the failure's.
    let mut rec = known.signed_record(
        Step::Accepted,
        forward.signature.as_ref(),
        request_hash,
        request_body_hash,
    );
    rec.body = gw.kept_body(&forward.body);
    written(&*gw.audit, rec).await.map_err(refused)?;
    // 8. Call the registry with the time left of the caller's deadline, less
    //    the time the failure or answer needs to reach the consumer first.
    let called = match deadline.remaining_for_work() {
        left if left.is_zero() => {
            Err(deadline.exceeded("the acceptance was being recorded; the registry was not called"))
        }
        left => registry.call(&meta.method, forward.body, left).await,
    };
    let answer = match called {
        Ok(answer) => answer,
        Err(refusal) => return Err(failed(gw, known, refusal).await),
    };
    if answer.body.len() > gw.limits.max_body_bytes {
        let refusal = Refusal::new(
            Reason::BodyTooLarge,
            format!(
                "the registry's answer exceeds the limit of {} bytes",
                gw.limits.max_body_bytes
            ),
        );
        return Err(failed(gw, known, refusal).await);
    }
    // 9. Sign the answer, bound to the request, and record it before release.
    let body_hash = sha256(&answer.body);
    let response_header = ResponseHeader {
        request_id: meta.request_id.clone(),
        request_hash: bytes::Bytes::copy_from_slice(&request_hash),
        status_code: answer.code,
        status_message: answer.message,
        body_sha256: bytes::Bytes::copy_from_slice(&body_hash),
        timestamp_ms: now_ms(),
    };
    let (signature, response_hash) =
        envelope::sign_response(&response_header, gw.server_id.member(), &local.signer).await;
    let mut rec = known.signed_record(Step::Answered, Some(&signature), response_hash, body_hash);
    rec.status = answer.code;
    rec.body = gw.kept_body(&answer.body);
    durable(&*gw.audit, rec)
        .await
        .map_err(|r| (Step::Failed, r))?;
    Ok(ForwardResponse {
        header: Some(response_header),
        signature: Some(signature),
        body: answer.body,
    })
}

/// Records a failure after the acceptance durably, and gives the refusal the
/// consumer sees: `refusal`, or `audit.unavailable` if it cannot be recorded.
async fn failed(gw: &Gateway, known: &Known, refusal: Refusal) -> Failed {
    match durable(&*gw.audit, known.refusal(Step::Failed, &refusal)).await {
        Ok(()) => (Step::Failed, refusal),
        Err(unrecorded) => (Step::Failed, unrecorded),
    }
}
