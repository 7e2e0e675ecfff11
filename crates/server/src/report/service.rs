//! `kopir.v1.AccessReport` on a security server's peer port: who may ask,
//! for whom, and the record of every request.
//!
//! In order, each step with its refusal:
//!
//! 1. the global configuration is valid and fresh (`globalconf.*`);
//! 2. the caller's TLS certificate is a report reader's in it, portal or
//!    auditor (`report.caller_unknown`: security servers, operators and
//!    anyone else are refused);
//! 3. the request names a valid subject and range (`report.request_invalid`);
//! 4. a portal presents a fresh assertion signed with its own key
//!    (`report.assertion_invalid`) naming that very subject
//!    (`report.not_subject`); an auditor asks in its own name;
//! 5. the entries are collected from the audit store by the subject's
//!    pseudonym (the portal does not see reads still hidden);
//! 6. the request is recorded (who asked, for whom, how many entries) and
//!    made durable before the report is released; refusals are recorded too.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    REPORT_METHOD, REPORT_PURPOSE, Visibility, assertion,
    collect::{self, Options},
};
use crate::exchange::{consumer::conf_refusal, durable};
use kopir_audit::{AuditHandle, AuditLog, AuditRecord, Side, Step};
use kopir_core::{
    clock::now_ms,
    error::{Reason, Refusal},
    globalconf::{GlobalConfHandle, model::ReaderRole},
    id::{ServerId, Subject},
    pki::Fingerprint,
};
use kopir_proto::v1::{
    ReportRequest, ReportResponse,
    access_report_server::{AccessReport, AccessReportServer},
};

/// The `AccessReport` service of one security server.
#[derive(Debug, Clone)]
pub struct ReportService {
    audit: Arc<AuditHandle>,
    conf: GlobalConfHandle,
    server_id: ServerId,
    max_clock_skew_ms: i64,
}

/// What is known of a report request when it is recorded.
#[derive(Debug, Default)]
struct Asked {
    /// `role:name` of the reader, or `tls:<fingerprint>` of an unknown caller.
    caller: String,
    /// The subject asked for, once it parsed.
    subject: Option<Subject>,
    /// What to say in the record's message.
    detail: String,
}

impl ReportService {
    /// The service of server `server_id`, reading and recording in `audit`.
    pub fn new(
        audit: Arc<AuditHandle>,
        conf: GlobalConfHandle,
        server_id: ServerId,
        max_clock_skew_ms: i64,
    ) -> Self {
        Self {
            audit,
            conf,
            server_id,
            max_clock_skew_ms,
        }
    }

    /// The tonic service to mount on the peer port.
    pub fn into_server(self) -> AccessReportServer<Self> {
        AccessReportServer::new(self)
    }

    async fn serve(
        &self,
        peer_cert: Option<&[u8]>,
        request: ReportRequest,
        asked: &mut Asked,
    ) -> Result<ReportResponse, Refusal> {
        // 1. A valid, fresh global configuration.
        let view = self.conf.current().map_err(conf_refusal)?;
        // 2. A report reader's certificate.
        let cert = peer_cert.ok_or_else(|| {
            Refusal::new(
                Reason::ReportCallerUnknown,
                "present the TLS client certificate the global configuration lists for your portal or auditor",
            )
        })?;
        let fp = Fingerprint::of(cert);
        asked.caller = format!("tls:{fp}");
        let reader = view.report_reader(&fp).ok_or_else(|| {
            let who = match view.server_by_tls(&fp) {
                Some(server) => format!("the certificate of security server {server}"),
                None => format!("certificate {fp}"),
            };
            Refusal::new(
                Reason::ReportCallerUnknown,
                format!(
                    "{who} is not a portal's or auditor's in global configuration {}; only they may ask for access reports",
                    view.serial()
                ),
            )
        })?;
        asked.caller = format!("{}:{}", reader.role.as_str(), reader.name);
        // 3. A valid subject and range.
        let subject: Subject = request.subject.parse().map_err(|e| {
            Refusal::new(
                Reason::ReportRequestInvalid,
                format!("subject: {e}; name the person as iin:<12 digits>"),
            )
        })?;
        asked.subject = Some(subject.clone());
        let from_ms = (request.from_ms != 0).then_some(request.from_ms);
        let to_ms = (request.to_ms != 0).then_some(request.to_ms);
        if let (Some(from), Some(to)) = (from_ms, to_ms)
            && from >= to
        {
            return Err(Refusal::new(
                Reason::ReportRequestInvalid,
                format!("the time range {from}..{to} is empty; from_ms must be before to_ms"),
            ));
        }
        // 4. Whom the caller acts for.
        let now = now_ms();
        let visibility = match reader.role {
            ReaderRole::Auditor => Visibility::Full,
            ReaderRole::Portal => {
                let (named, claims) = assertion::verify(
                    &request.assertion,
                    reader,
                    now / 1000,
                    self.max_clock_skew_ms / 1000,
                )?;
                asked.detail = format!("assertion {}", claims.jti);
                if named != subject {
                    return Err(Refusal::new(
                        Reason::ReportNotSubject,
                        format!(
                            "portal {} may ask only for the report of the citizen its assertion names; it names another person",
                            reader.name
                        ),
                    ));
                }
                Visibility::Subject
            }
        };
        // 5. The entries, by the subject's pseudonym.
        let pseudonym = self.audit.pseudonyms().pseudonym(&subject.to_string());
        let options = Options {
            include_refused: request.include_refused,
            from_ms,
            to_ms,
            visibility,
            now_ms: now,
        };
        let collected = collect::collect(
            self.audit.store().as_ref(),
            pseudonym,
            &self.server_id.to_string(),
            Some(&view),
            &options,
        )
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "access report: the audit store cannot be read");
            Refusal::new(
                Reason::AuditUnavailable,
                "this security server cannot read its audit log now; retry later",
            )
        })?;
        let hidden = collected.entries.iter().filter(|e| e.hidden).count();
        asked.detail = [
            asked.detail.clone(),
            format!("{} entries", collected.entries.len()),
            if hidden > 0 {
                format!("{hidden} of them still hidden from the subject")
            } else {
                String::new()
            },
            if collected.truncated {
                "truncated".into()
            } else {
                String::new()
            },
        ]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
        Ok(ReportResponse {
            server: self.server_id.to_string(),
            entries: collected.entries.iter().map(|e| e.to_proto()).collect(),
            as_of_ms: now,
            truncated: collected.truncated,
        })
    }

    /// The record of a report request.
    fn record(&self, id: &str, asked: &Asked, refusal: Option<&Refusal>) -> AuditRecord {
        let step = if refusal.is_some() {
            Step::Refused
        } else {
            Step::Answered
        };
        AuditRecord {
            request_id: id.to_owned(),
            client: asked.caller.clone(),
            service: self.server_id.to_string(),
            method: REPORT_METHOD.into(),
            purpose: REPORT_PURPOSE.into(),
            subject: asked.subject.as_ref().map(ToString::to_string),
            status: refusal.map_or(0, |r| r.code as i32),
            reason: refusal.map(|r| r.reason.as_str().into()),
            message: match refusal {
                Some(r) => Some(r.message.clone()),
                None => Some(asked.detail.clone()).filter(|d| !d.is_empty()),
            },
            ..AuditRecord::new(Side::Provider, step)
        }
    }
}

#[tonic::async_trait]
impl AccessReport for ReportService {
    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let peer_cert = request.peer_certs().and_then(|c| c.first().cloned());
        let id = uuid::Uuid::new_v4().to_string();
        let mut asked = Asked::default();
        let served = self
            .serve(
                peer_cert.as_ref().map(|c| c.as_ref()),
                request.into_inner(),
                &mut asked,
            )
            .await;
        match served {
            Ok(report) => {
                // No audit, no report: the request is durable before the answer leaves.
                if let Err(refusal) =
                    durable(self.audit.as_ref(), self.record(&id, &asked, None)).await
                {
                    return Err(refusal.to_status(Some(&id)));
                }
                let mut response = Response::new(report);
                if let Ok(v) = id.parse() {
                    response
                        .metadata_mut()
                        .insert(kopir_core::error::REQUEST_ID_KEY, v);
                }
                Ok(response)
            }
            Err(refusal) => {
                tracing::info!(caller = %asked.caller, reason = %refusal.reason, message = %refusal.message, "access report refused");
                if let Err(e) = self
                    .audit
                    .append(self.record(&id, &asked, Some(&refusal)))
                    .await
                {
                    tracing::error!(error = %e, "access report refusal could not be audited");
                }
                Err(refusal.to_status(Some(&id)))
            }
        }
    }
}
