//! Refusals of callers that are nobody: no certificate, a certificate no
//! information system is registered with, a certificate the global
//! configuration does not pin for any security server.
//!
//! Such a caller still gets its precise status and reason, but its refusals
//! are counted rather than each written and synced: otherwise anyone who can
//! open a TCP connection could make the server write to disk as fast as it can
//! refuse, and fill it. Every `limits.unknown_caller_summary_secs` one summary
//! record per source (certificate, or address when there is none) goes to the
//! audit log with the count, the reasons and the time span; the log notes the
//! first refusal of each source per interval. Refusals of known identities are
//! audited one by one, as before.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::sync::watch;

use kopir_audit::{AuditLog, AuditRecord, Side, Step};
use kopir_core::clock::now_ms;
use kopir_core::{
    clock::rfc3339_ms,
    error::{Reason, Refusal},
    pki::Fingerprint,
};

/// Sources tracked one by one per interval; refusals from further sources
/// are counted together.
const MAX_SOURCES: usize = 1024;
/// Log lines about new sources per interval.
const MAX_LOGGED: usize = 16;

/// Where refused calls of an unknown caller came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    /// The TLS client certificate it presented.
    Certificate(Fingerprint),
    /// No certificate; its address.
    Address(IpAddr),
    /// Any source beyond the ones tracked one by one.
    Other,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Certificate(fp) => write!(f, "unknown caller: TLS certificate {fp}"),
            Source::Address(ip) => write!(f, "unknown caller: no TLS certificate, from {ip}"),
            Source::Other => f.write_str("unknown callers: sources beyond the tracked ones"),
        }
    }
}

impl Source {
    /// The source of a request: its certificate, else its address.
    pub(crate) fn of<B>(request: &http::Request<B>) -> Self {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        if let Some(fp) = kopir_edge::overload::peer_fingerprint(request) {
            return Source::Certificate(fp);
        }
        let ext = request.extensions();
        ext.get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.get_ref().remote_addr())
            .or_else(|| ext.get::<TcpConnectInfo>().and_then(|i| i.remote_addr()))
            .map_or(Source::Other, |a| Source::Address(a.ip()))
    }
}

#[derive(Debug)]
struct Tally {
    count: u64,
    first_ms: i64,
    last_ms: i64,
    reasons: Vec<(Reason, u64)>,
    last_message: String,
}

#[derive(Debug, Default)]
struct Table {
    tallies: HashMap<(Side, Source), Tally>,
    logged: usize,
    unlogged: u64,
}

/// The counts of one server's unknown callers since the last summary.
#[derive(Debug, Default)]
pub(crate) struct UnknownCallers {
    table: Mutex<Table>,
}

impl UnknownCallers {
    /// Counts one refusal of an unknown caller from `source`, on `side`.
    pub(crate) fn refused(&self, side: Side, source: Source, refusal: &Refusal) {
        let now = now_ms();
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let source =
            if table.tallies.len() >= MAX_SOURCES && !table.tallies.contains_key(&(side, source)) {
                Source::Other
            } else {
                source
            };
        let new = !table.tallies.contains_key(&(side, source));
        if new {
            if table.logged < MAX_LOGGED {
                table.logged += 1;
                tracing::warn!(%source, side = side.as_str(), reason = %refusal.reason, message = %refusal.message,
                    "refused an unknown caller; further refusals of this source are counted in a summary record");
            } else {
                table.unlogged += 1;
            }
        }
        let tally = table
            .tallies
            .entry((side, source))
            .or_insert_with(|| Tally {
                count: 0,
                first_ms: now,
                last_ms: now,
                reasons: Vec::new(),
                last_message: String::new(),
            });
        tally.count += 1;
        tally.last_ms = now;
        match tally.reasons.iter_mut().find(|(r, _)| *r == refusal.reason) {
            Some((_, n)) => *n += 1,
            None => tally.reasons.push((refusal.reason, 1)),
        }
        if tally.last_message != refusal.message {
            tally.last_message.clone_from(&refusal.message);
        }
    }

    /// The summary records of the counts so far, which start again from zero.
    pub(crate) fn take_summaries(&self) -> Vec<AuditRecord> {
        let table = std::mem::take(&mut *self.table.lock().unwrap_or_else(PoisonError::into_inner));
        if table.unlogged > 0 {
            tracing::warn!(
                sources = table.unlogged,
                "refused further unknown sources without logging each"
            );
        }
        table
            .tallies
            .into_iter()
            .map(|((side, source), tally)| summary(side, source, tally))
            .collect()
    }
}

fn summary(side: Side, source: Source, mut tally: Tally) -> AuditRecord {
    tally.reasons.sort_by_key(|r| std::cmp::Reverse(r.1));
    let (main, _) = tally.reasons[0];
    let reasons = tally
        .reasons
        .iter()
        .map(|(r, n)| format!("{r} x{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut record = AuditRecord::new(side, Step::Refused);
    record.request_id = uuid::Uuid::new_v4().to_string();
    record.client = source.to_string();
    record.status = main.code() as i32;
    record.reason = Some(main.as_str().into());
    record.message = Some(format!(
        "summary: {} calls refused from {} to {} ({reasons}); the last said: {}",
        tally.count,
        rfc3339_ms(tally.first_ms),
        rfc3339_ms(tally.last_ms),
        tally.last_message
    ));
    record
}

/// Writes the summaries every `interval`, and once more when `stop` turns
/// true, so that none is lost at shutdown.
pub(crate) async fn write_summaries(
    callers: Arc<UnknownCallers>,
    audit: Arc<dyn AuditLog>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        for record in callers.take_summaries() {
            let about = record.client.clone();
            if let Err(e) = audit.append(record).await {
                tracing::error!(error = %e, source = %about, "a summary of refused unknown callers could not be audited");
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(reason: Reason) -> Refusal {
        Refusal::new(reason, format!("because {reason}"))
    }

    #[test]
    fn refusals_are_summed_per_source_and_side() {
        let u = UnknownCallers::default();
        let a = Source::Certificate(Fingerprint::of(b"a"));
        let b = Source::Address("192.0.2.7".parse().unwrap());
        for _ in 0..5 {
            u.refused(Side::Consumer, a, &refusal(Reason::ClientUnknown));
        }
        u.refused(Side::Consumer, a, &refusal(Reason::MetadataInvalid));
        u.refused(
            Side::Consumer,
            b,
            &refusal(Reason::ClientCertificateMissing),
        );
        u.refused(Side::Provider, a, &refusal(Reason::PeerUnknown));
        let records = u.take_summaries();
        assert_eq!(records.len(), 3);
        let of = |side: Side, client: &str| {
            records
                .iter()
                .find(|r| r.side == side && r.client.contains(client))
                .unwrap()
        };
        let r = of(Side::Consumer, "no TLS certificate, from 192.0.2.7");
        assert_eq!(r.step, Step::Refused);
        assert_eq!(r.reason.as_deref(), Some("client.certificate_missing"));
        let r = of(Side::Consumer, "caller: TLS certificate");
        assert_eq!(r.reason.as_deref(), Some("client.unknown"));
        assert_eq!(r.status, tonic::Code::Unauthenticated as i32);
        let message = r.message.as_deref().unwrap();
        assert!(
            message.contains("6 calls refused")
                && message.contains("client.unknown x5, metadata.invalid x1"),
            "{message}"
        );
        let r = of(Side::Provider, "caller: TLS certificate");
        assert_eq!(r.reason.as_deref(), Some("peer.unknown"));
        // The counts start again.
        assert!(u.take_summaries().is_empty());
    }

    #[test]
    fn sources_beyond_the_bound_are_counted_together() {
        let u = UnknownCallers::default();
        for i in 0..(MAX_SOURCES as u32 + 10) {
            let fp = Fingerprint::of(&i.to_be_bytes());
            u.refused(
                Side::Provider,
                Source::Certificate(fp),
                &refusal(Reason::PeerUnknown),
            );
        }
        let records = u.take_summaries();
        assert_eq!(records.len(), MAX_SOURCES + 1);
        let other = records
            .iter()
            .find(|r| r.client.contains("beyond the tracked"))
            .unwrap();
        assert!(
            other
                .message
                .as_deref()
                .unwrap()
                .contains("10 calls refused")
        );
    }
}
