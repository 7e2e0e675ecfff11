//! The consumer's side: an information system's call on the client port,
//! authenticated, signed, audited, forwarded to the provider's server, and its
//! verified answer released.

use std::sync::Arc;

use axum::body::Body;
use http::{Request, Response};

use crate::exchange::{
    Gateway, Known, Local, durable, envelope, frame, peers, record_refusal, registry_status,
    unknown::Source, written,
};
use crate::policy;
use kopir_audit::{Side, Step};
use kopir_core::{
    clock::now_ms,
    deadline::{self, Deadline},
    meta::{CallMeta, keys},
};
use kopir_core::{
    error::{Reason, Refusal},
    globalconf::{
        ConfError, ConfView,
        view::{Endpoint, ServiceEntry},
    },
    pki::sha256,
};
use kopir_edge::overload::{Caller, peer_fingerprint};
use kopir_proto::v1::{ForwardRequest, ForwardResponse};

/// What the global configuration state means for an exchange.
pub(crate) fn conf_refusal(e: ConfError) -> Refusal {
    let why = match &e {
        ConfError::Invalid(why) => {
            format!("{why}; exchanges are refused until a valid one arrives")
        }
        ConfError::Stale(_) => e.to_string(),
    };
    Refusal::new(e.reason(), why)
}

/// Handles one call on the client port. Never fails: every refusal becomes a
/// gRPC status with its `kopir-error` trailer.
pub(crate) async fn handle(gw: Arc<Gateway>, req: Request<Body>) -> Response<Body> {
    let deadline = Deadline::from_headers(req.headers(), gw.limits.timeout());
    let method = req.uri().path().to_owned();
    // One snapshot of the local configuration for the whole call.
    let local = gw.local.current();
    // A caller whose certificate no information system here is registered
    // with is nobody: its refusals are counted, not audited one by one.
    let nobody = (!is_registered(&gw, &local, &req)).then(|| Source::of(&req));
    let refused_here = |known: &Known, refusal: &Refusal| {
        let gw = gw.clone();
        let (known, refusal) = (known.clone(), refusal.clone());
        async move {
            match nobody {
                Some(source) => gw.unknown.refused(Side::Consumer, source, &refusal),
                // Shedding must cost nothing, so a shed call is not audited.
                None if refusal.reason == Reason::Overloaded => {}
                None => record_refusal(&*gw.audit, &known, &refusal).await,
            }
        }
    };
    let meta = match CallMeta::from_headers(&method, req.headers()) {
        Ok(meta) => meta,
        Err(refusal) => {
            let known = raw_known(&method, req.headers());
            refused_here(&known, &refusal).await;
            return frame::status_response(refusal.to_status(Some(known.request_id())));
        }
    };
    let mut known = Known::of_call(Side::Consumer, &meta);
    let request_id = meta.request_id.clone();
    match exchange(&gw, &local, meta, &mut known, req, deadline).await {
        Ok(response) => response,
        Err((step, refusal)) => {
            if step == Step::Refused {
                refused_here(&known, &refusal).await;
            }
            frame::status_response(refusal.to_status(Some(&request_id)))
        }
    }
}

/// True if the caller is some information system registered on this server
/// (or the port is plaintext, where callers are not authenticated).
fn is_registered(gw: &Gateway, local: &Local, req: &Request<Body>) -> bool {
    if gw.plaintext_clients {
        return true;
    }
    peer_fingerprint(req).is_some_and(|fp| local.clients.values().any(|c| c.fingerprint == fp))
}

/// The raw header values of a request whose metadata did not parse.
fn raw_known(method: &str, headers: &http::HeaderMap) -> Known {
    let get = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let request_id = Some(get(keys::REQUEST_ID))
        .filter(|id| kopir_core::id::Code::parse("request id", id).is_ok())
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    Known::new(Side::Consumer, request_id).unparsed(
        get(keys::CLIENT),
        get(keys::SERVICE),
        method,
        get(keys::PURPOSE),
    )
}

type Failed = (Step, Refusal);

fn refused(r: Refusal) -> Failed {
    (Step::Refused, r)
}

/// Steps 1–9 of the consumer's side. What each step learns (the request
/// hash, the provider's server) goes into `known`, so that every later record,
/// a refusal's or a failure's included, carries it.
async fn exchange(
    gw: &Gateway,
    local: &Local,
    meta: CallMeta,
    known: &mut Known,
    req: Request<Body>,
    deadline: Deadline,
) -> Result<Response<Body>, Failed> {
    // 1. Authenticate the information system by its client certificate; only
    //    then may it hold a share of the port's call budget.
    authenticate(gw, local, &meta, &req).map_err(refused)?;
    let _permit = gw
        .client_calls
        .try_acquire(Caller::Known(format!("information system {}", meta.client)))
        .map_err(refused)?;
    // 2. The global configuration must be valid and fresh.
    let view = gw.conf.current().map_err(conf_refusal).map_err(refused)?;
    // 3. The service must exist; the purpose must exist; personal data needs a subject.
    let entry = view
        .service(&meta.service)
        .filter(|e| !e.endpoints.is_empty())
        .ok_or_else(|| {
            refused(Refusal::new(
                Reason::ServiceUnknown,
                format!(
                    "{} is not a service of any security server in global configuration {}",
                    meta.service,
                    view.serial()
                ),
            ))
        })?;
    let endpoints = in_service(&view, &meta, entry).map_err(refused)?;
    policy::check_purpose_and_subject(&view, &meta, entry.personal_data).map_err(refused)?;
    policy::hiding::check(&view, &meta, now_ms()).map_err(refused)?;
    deadline
        .check("the call was being checked")
        .map_err(refused)?;
    // 4. Read the body within the limit, the body-read timeout and the deadline.
    let body = deadline::read_body(
        &deadline,
        gw.limits.body_read_timeout(),
        frame::read_unary(req.into_body(), gw.limits.max_body_bytes),
    )
    .await
    .map_err(refused)?;
    // 5. Sign the canonical request.
    let body_hash = sha256(&body);
    let header = meta.to_header(now_ms(), body_hash);
    let (signature, request_hash) = deadline
        .within("the request was being signed", async {
            Ok(envelope::sign_request_batched(&header, gw.server_id.member(), &local.signer).await)
        })
        .await
        .map_err(refused)?;
    known.learn_request_hash(request_hash);
    // 6. No audit, no data: the record is written before anything leaves;
    //    the answer's record (8) makes both durable before the caller sees it.
    let mut rec = known.signed_record(Step::Forwarded, Some(&signature), request_hash, body_hash);
    rec.body = gw.kept_body(&body);
    written(&*gw.audit, rec).await.map_err(refused)?;
    let forward = ForwardRequest {
        header: Some(header),
        signature: Some(signature),
        body,
    };
    // 7. Forward to a server of the provider and verify its signed answer.
    let call = Outgoing {
        meta: &meta,
        endpoints,
        forward,
        request_hash,
    };
    let outcome = forward_and_verify(gw, &view, call, &deadline).await;
    let Verified {
        response,
        response_hash,
        body_hash,
        peer,
    } = match outcome {
        Ok(ok) => ok,
        Err(refusal) => {
            durable(&*gw.audit, known.refusal(Step::Failed, &refusal))
                .await
                .map_err(refused)?;
            return Err((Step::Failed, refusal));
        }
    };
    let h = response.header.unwrap_or_default();
    // 8. Record the answer durably before releasing it.
    known.learn_peer(peer);
    let mut rec = known.signed_record(
        Step::Answered,
        response.signature.as_ref(),
        response_hash,
        body_hash,
    );
    rec.status = h.status_code;
    rec.body = gw.kept_body(&response.body);
    durable(&*gw.audit, rec)
        .await
        .map_err(|r| (Step::Failed, r))?;
    // 9. Answer.
    if h.status_code == 0 {
        Ok(frame::ok_response(&response.body, &meta.request_id))
    } else {
        Ok(frame::status_response(registry_status(
            h.status_code,
            &h.status_message,
            &meta.request_id,
        )))
    }
}

/// The servers of `entry` to call: those not announced in maintenance.
fn in_service<'v>(
    view: &ConfView,
    meta: &CallMeta,
    entry: &'v ServiceEntry,
) -> Result<Vec<&'v Endpoint>, Refusal> {
    let endpoints: Vec<_> = entry.endpoints.iter().filter(|e| !e.maintenance).collect();
    if endpoints.is_empty() {
        return Err(Refusal::new(
            Reason::ProviderMaintenance,
            format!(
                "every security server of {} is in maintenance in global configuration {}; nothing was sent, retry after the maintenance",
                meta.service,
                view.serial()
            ),
        ));
    }
    Ok(endpoints)
}

fn authenticate(
    gw: &Gateway,
    local: &Local,
    meta: &CallMeta,
    req: &Request<Body>,
) -> Result<(), Refusal> {
    let expected = local.clients.get(&meta.client).ok_or_else(|| {
        Refusal::new(
            Reason::ClientUnknown,
            format!(
                "{} is not registered as a client on security server {}",
                meta.client, gw.server_id
            ),
        )
    })?;
    if gw.plaintext_clients {
        return Ok(());
    }
    let fp = peer_fingerprint(req).ok_or_else(|| {
        Refusal::new(
            Reason::ClientCertificateMissing,
            format!(
                "present the TLS client certificate registered for {}",
                meta.client
            ),
        )
    })?;
    if fp != expected.fingerprint {
        return Err(Refusal::new(
            Reason::ClientCertificateMismatch,
            format!(
                "the client certificate is not the one registered for {}",
                meta.client
            ),
        ));
    }
    let (from, to) = expected.valid;
    if !(from..=to).contains(&(now_ms() / 1000)) {
        return Err(Refusal::new(
            Reason::ClientCertificateMismatch,
            format!(
                "the client certificate of {} is expired or not yet valid",
                meta.client
            ),
        ));
    }
    Ok(())
}

/// A provider's answer whose signature and body hash were checked.
struct Verified {
    response: ForwardResponse,
    /// The hash the provider's signature covers.
    response_hash: [u8; 32],
    /// SHA-256 of the response body (the one the signature covers).
    body_hash: [u8; 32],
    /// The provider's server that answered.
    peer: String,
}

/// A signed request on its way to the servers that provide its service.
struct Outgoing<'a> {
    /// The call's metadata: the provider is the member of its service.
    meta: &'a CallMeta,
    /// The servers that provide the service and are not in maintenance, in
    /// the order the global configuration lists them.
    endpoints: Vec<&'a Endpoint>,
    /// The signed request.
    forward: ForwardRequest,
    /// The hash the request's signature covers, which the provider's signed
    /// answer must name.
    request_hash: [u8; 32],
}

/// Sends the request to the provider's servers in turn (moving on only when a
/// connection could not be made, so a request is never delivered twice) and
/// verifies the answer. A deadline that passes says whether the request had
/// been sent.
async fn forward_and_verify(
    gw: &Gateway,
    view: &ConfView,
    call: Outgoing<'_>,
    deadline: &Deadline,
) -> Result<Verified, Refusal> {
    let Outgoing {
        meta,
        endpoints,
        forward,
        request_hash,
    } = call;
    let mut last = None;
    for endpoint in endpoints {
        let remaining = deadline.remaining();
        if remaining.is_zero() {
            return Err(deadline.exceeded(&format!(
                "the request waited to be sent to {}; it was not sent",
                endpoint.server
            )));
        }
        let timed_out =
            || deadline.exceeded(&format!("waiting for the answer of {}", endpoint.server));
        let mut client = gw
            .peers
            .client(view, endpoint)
            .map_err(|e| Refusal::new(Reason::Internal, e.to_string()))?;
        let mut request = tonic::Request::new(forward.clone());
        // Leave the provider a little less time than we wait, so that its own
        // deadline refusal reaches us first.
        request.set_timeout(remaining.mul_f32(0.95));
        let call = tokio::time::timeout(remaining, client.forward(request)).await;
        let status = match call {
            Err(_) => return Err(timed_out()),
            Ok(Ok(response)) => {
                let response = response.into_inner();
                let h = response.header.clone().unwrap_or_default();
                let response_hash = envelope::verify_response(
                    view,
                    &gw.verified,
                    &h,
                    response.signature.as_ref(),
                    meta.service.member(),
                    &request_hash,
                    now_ms() / 1000,
                )?;
                let body_hash = sha256(&response.body);
                if body_hash[..] != h.body_sha256[..] {
                    return Err(Refusal::new(
                        Reason::ResponseSignatureInvalid,
                        "the provider's response body does not match its signed hash; the answer was withheld",
                    ));
                }
                return Ok(Verified {
                    response,
                    response_hash,
                    body_hash,
                    peer: endpoint.server.to_string(),
                });
            }
            Ok(Err(status)) => status,
        };
        if let Some(refusal) = Refusal::from_status(&status) {
            // The provider refused: relay its reason and words.
            return Err(refusal);
        }
        match std::error::Error::source(&status).and_then(|e| peers::connect_failure(e)) {
            Some(cf) if cf.untrusted => {
                last = Some(Refusal::new(
                    Reason::ProviderUntrusted,
                    format!(
                        "{} did not present the TLS certificate the global configuration lists for it: {cf}",
                        endpoint.server
                    ),
                ));
            }
            Some(cf) => {
                last = Some(Refusal::new(
                    Reason::ProviderUnavailable,
                    format!("{}: {cf}", endpoint.server),
                ));
            }
            None if status.code() == tonic::Code::DeadlineExceeded
                || status.code() == tonic::Code::Cancelled =>
            {
                return Err(timed_out());
            }
            None => {
                return Err(Refusal::new(
                    Reason::ProviderUnavailable,
                    format!(
                        "{} failed the exchange: {} {}",
                        endpoint.server,
                        status.code(),
                        status.message()
                    ),
                ));
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        Refusal::new(
            Reason::ProviderUnavailable,
            format!("no server of {} could be reached", meta.service),
        )
    }))
}
