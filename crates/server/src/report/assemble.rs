//! The federation-wide access report: one request to every security server
//! that provides personal data (as the global configuration lists them),
//! over mutual TLS pinned to the certificate listed for each, answers merged
//! by time.
//!
//! A server that cannot be reached or refuses is named in the result's
//! [`Source`]s, never silently skipped: a report missing a server is
//! incomplete, and [`FederationReport::complete`] says so.

use std::time::Duration;

use serde::Serialize;
use tonic::Code;

use super::ReportEntry;
use kopir_consent::channel::{Identity, pinned_channel};
use kopir_core::{
    clock::now_ms,
    error::Refusal,
    globalconf::{ConfView, view::Endpoint},
};
use kopir_proto::v1::{ReportRequest, access_report_client::AccessReportClient};

/// The largest report message accepted from one server.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// What one server answered.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    /// The server's id.
    pub server: String,
    /// Its peer address.
    pub address: String,
    /// How many entries it gave.
    pub entries: usize,
    /// True if it had more than one report holds.
    pub truncated: bool,
    /// Why it gave none, if it failed or refused.
    pub error: Option<SourceError>,
}

/// Why a server gave no report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceError {
    /// The gRPC code.
    #[serde(serialize_with = "code_name")]
    pub code: Code,
    /// The `kopir-error` reason, if the server refused.
    pub reason: Option<String>,
    /// What happened.
    pub message: String,
}

fn code_name<S: serde::Serializer>(code: &Code, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{code:?}"))
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reason {
            Some(r) => write!(f, "{r}: {}", self.message),
            None => write!(f, "{:?}: {}", self.code, self.message),
        }
    }
}

/// The report of one subject across the federation.
#[derive(Debug, Clone, Serialize)]
pub struct FederationReport {
    /// The subject.
    pub subject: String,
    /// When it was assembled (ms since the epoch, the caller's clock).
    pub as_of_ms: i64,
    /// Every entry of every server, oldest first.
    pub entries: Vec<ReportEntry>,
    /// What each server answered.
    pub sources: Vec<Source>,
}

impl FederationReport {
    /// True if every server answered, in full.
    pub fn complete(&self) -> bool {
        self.sources
            .iter()
            .all(|s| s.error.is_none() && !s.truncated)
    }
}

/// Asks every server that provides personal data in `view` for `request`'s
/// subject, presenting `identity` (a portal's or auditor's TLS certificate),
/// and merges the answers. `request.assertion` is the portal's assertion
/// (see [`super::assertion`]); empty for an auditor.
pub async fn assemble(
    view: &ConfView,
    identity: Identity,
    request: &ReportRequest,
    timeout: Duration,
) -> FederationReport {
    let servers = view.personal_data_servers();
    let asks = servers.iter().map(|endpoint| {
        let identity = (identity.0.clone(), identity.1.clone_key());
        ask(endpoint, identity, request.clone(), timeout)
    });
    let answers = futures_util::future::join_all(asks).await;
    let mut entries: Vec<ReportEntry> = Vec::new();
    let mut sources = Vec::new();
    for (endpoint, answer) in servers.iter().zip(answers) {
        let mut source = Source {
            server: endpoint.server.to_string(),
            address: endpoint.address.clone(),
            entries: 0,
            truncated: false,
            error: None,
        };
        match answer {
            Ok((got, truncated)) => {
                source.entries = got.len();
                source.truncated = truncated;
                for e in got {
                    if !entries
                        .iter()
                        .any(|x| x.server == e.server && x.query_id == e.query_id)
                    {
                        entries.push(e);
                    }
                }
            }
            Err(e) => source.error = Some(e),
        }
        sources.push(source);
    }
    entries.sort_by(|a, b| (a.at_ms, &a.query_id).cmp(&(b.at_ms, &b.query_id)));
    FederationReport {
        subject: request.subject.clone(),
        as_of_ms: now_ms(),
        entries,
        sources,
    }
}

async fn ask(
    endpoint: &Endpoint,
    identity: Identity,
    request: ReportRequest,
    timeout: Duration,
) -> Result<(Vec<ReportEntry>, bool), SourceError> {
    let failed = |code: Code, message: String| SourceError {
        code,
        reason: None,
        message,
    };
    let channel = pinned_channel(&endpoint.address, endpoint.tls, identity, timeout)
        .map_err(|e| failed(Code::Internal, e.to_string()))?;
    let mut client = AccessReportClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut call = tonic::Request::new(request);
    call.set_timeout(timeout);
    let response = match tokio::time::timeout(timeout, client.report(call)).await {
        Err(_) => {
            return Err(failed(
                Code::DeadlineExceeded,
                format!(
                    "{} did not answer within {} ms",
                    endpoint.server,
                    timeout.as_millis()
                ),
            ));
        }
        Ok(Err(status)) => {
            return Err(match Refusal::from_status(&status) {
                Some(r) => SourceError {
                    code: r.code,
                    reason: Some(r.reason.as_str().into()),
                    message: r.message,
                },
                None => failed(status.code(), status.message().to_owned()),
            });
        }
        Ok(Ok(r)) => r.into_inner(),
    };
    let mut entries = Vec::with_capacity(response.entries.len());
    for e in response.entries {
        // The server answering for itself: an entry naming another server
        // would be an impostor's or a bug's.
        if e.server != endpoint.server.to_string() {
            return Err(failed(
                Code::Internal,
                format!(
                    "{} answered with an entry recorded by {}",
                    endpoint.server, e.server
                ),
            ));
        }
        let outcome = e.outcome.clone();
        entries.push(ReportEntry::from_proto(e).ok_or_else(|| {
            failed(
                Code::Internal,
                format!(
                    "{} answered with an unknown outcome {outcome:?}",
                    endpoint.server
                ),
            )
        })?);
    }
    Ok((entries, response.truncated))
}
