//! Builds a subject's report entries from one server's audit store.
//!
//! The store is read by the subject's keyed pseudonym, provider side only: a
//! read of the subject's data is an exchange the provider *accepted* (the
//! consumer's records of the same exchange are twins and would count it
//! twice, and a consumer's server holds no record of what the provider did).
//! All provider records of one request id make one entry:
//!
//! - `accepted` → a read; its outcome is the request's `answered` (with the
//!   registry's status) or `failed` record, or `accepted` if there is none;
//! - only `refused` → a refused attempt, listed only when asked for;
//! - records of report requests themselves are not reads and are left out.
//!
//! A covert read (`hidden_until_ms` in the future at `now_ms`) is left out
//! for the subject and marked for everyone else; once its date has passed it
//! is listed with its date and reason.

use std::collections::BTreeMap;

use super::{Outcome, REPORT_METHOD, ReportEntry, Visibility, split_basis};
use kopir_audit::{
    AuditError, Side, Step,
    record::{Hash, StoredRecord},
    store::{AuditStore, MAX_PAGE, Query},
};
use kopir_core::{globalconf::ConfView, id::SubsystemId};

/// The most provider records one report reads; beyond them it is truncated.
pub(crate) const MAX_RECORDS: usize = 20_000;

/// What to collect.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Also list refused attempts.
    pub include_refused: bool,
    /// Only records at or after this time (ms).
    pub from_ms: Option<i64>,
    /// Only records before this time (ms).
    pub to_ms: Option<i64>,
    /// Who the report is for.
    pub visibility: Visibility,
    /// The time covert reads are judged at (the server's clock, ms).
    pub now_ms: i64,
}

/// A subject's entries from one store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    /// Oldest first.
    pub entries: Vec<ReportEntry>,
    /// True if the subject has more than [`MAX_RECORDS`] records in range.
    pub truncated: bool,
}

/// Collects the entries of the subject whose pseudonym is `subject` from
/// `store`, naming `server` as where they were recorded; `view` supplies
/// member names and purpose descriptions (left empty without it).
pub async fn collect(
    store: &dyn AuditStore,
    subject: Hash,
    server: &str,
    view: Option<&ConfView>,
    options: &Options,
) -> Result<Collected, AuditError> {
    let mut query = Query {
        subject: Some(subject),
        side: Some(Side::Provider),
        from_ms: options.from_ms,
        to_ms: options.to_ms,
        limit: MAX_PAGE,
        ..Query::default()
    };
    let mut records: Vec<StoredRecord> = Vec::new();
    let mut truncated = false;
    loop {
        let page = store.query(query.clone()).await?;
        records.extend(page.records);
        match page.next {
            Some(next) if records.len() < MAX_RECORDS => query.before_seq = Some(next),
            Some(_) => {
                truncated = true;
                break;
            }
            None => break,
        }
    }
    let mut by_request: BTreeMap<String, Vec<StoredRecord>> = BTreeMap::new();
    for r in records {
        if r.method != REPORT_METHOD {
            by_request.entry(r.request_id.clone()).or_default().push(r);
        }
    }
    let mut entries = Vec::new();
    for (id, mut group) in by_request {
        group.sort_by_key(|r| r.seq);
        let has_outcome = group
            .iter()
            .any(|r| matches!(r.step, Step::Answered | Step::Failed));
        let accepted_only = group.iter().any(|r| r.step == Step::Accepted) && !has_outcome;
        if accepted_only && options.to_ms.is_some() {
            // The outcome may lie after the range: read the whole exchange.
            group = store
                .by_request(id)
                .await?
                .into_iter()
                .filter(|r| r.side == Side::Provider && r.subject == Some(subject))
                .collect();
        }
        if let Some(entry) = entry_of(&group, server, view, options) {
            entries.push(entry);
        }
    }
    entries.sort_by(|a, b| (a.at_ms, &a.query_id).cmp(&(b.at_ms, &b.query_id)));
    Ok(Collected { entries, truncated })
}

/// The entry of one request's provider records (in sequence order), if it
/// is listed.
fn entry_of(
    group: &[StoredRecord],
    server: &str,
    view: Option<&ConfView>,
    options: &Options,
) -> Option<ReportEntry> {
    let accepted = group.iter().find(|r| r.step == Step::Accepted);
    let (first, outcome, status, reason) = match accepted {
        Some(a) => {
            let end = group
                .iter()
                .rev()
                .find(|r| matches!(r.step, Step::Answered | Step::Failed));
            match end {
                Some(e) if e.step == Step::Answered => (a, Outcome::Answered, e.status, None),
                Some(e) => (a, Outcome::Failed, e.status, e.reason.clone()),
                None => (a, Outcome::Accepted, 0, None),
            }
        }
        None => {
            let refused = group.iter().find(|r| r.step == Step::Refused)?;
            if !options.include_refused {
                return None;
            }
            (
                refused,
                Outcome::Refused,
                refused.status,
                refused.reason.clone(),
            )
        }
    };
    let hidden = first
        .hidden_until_ms
        .is_some_and(|until| until > options.now_ms);
    if hidden && options.visibility == Visibility::Subject {
        return None;
    }
    let consumer = first.client.parse::<SubsystemId>().ok();
    let provider = first.service.parse::<SubsystemId>().ok();
    let member_name = |id: Option<&SubsystemId>| {
        id.and_then(|s| view?.member_name(s.member()))
            .unwrap_or_default()
            .to_owned()
    };
    let (legal_act, consent_id) = split_basis(first.basis.as_deref());
    Some(ReportEntry {
        query_id: first.request_id.clone(),
        at_ms: first.at_ms,
        consumer_member: consumer
            .as_ref()
            .map(|c| c.member().to_string())
            .unwrap_or_default(),
        consumer_member_name: member_name(consumer.as_ref()),
        consumer_subsystem: first.client.clone(),
        provider_service: first.service.clone(),
        provider_member_name: member_name(provider.as_ref()),
        method: first.method.clone(),
        server: server.to_owned(),
        purpose: first.purpose.clone(),
        purpose_description: view
            .and_then(|v| v.purpose(&first.purpose))
            .map(|p| p.description.clone())
            .unwrap_or_default(),
        legal_act,
        consent_id,
        user: first.user.clone(),
        query_group: first.query_group.clone(),
        outcome,
        status,
        reason,
        hidden_until_ms: first.hidden_until_ms,
        hidden_reason: first.hidden_reason.clone(),
        hidden,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kopir_audit::{
        AuditHandle, AuditLog, AuditRecord, WriterOptions, pseudonym::PseudonymKey, store,
    };
    use std::sync::Arc;

    const A: &str = "iin:900101300126";
    const B: &str = "iin:971125443866";
    const NOW: i64 = 1_800_000_000_000;

    fn record(id: &str, subject: &str, side: Side, step: Step) -> AuditRecord {
        AuditRecord {
            request_id: id.into(),
            at_ms: NOW - 1000,
            client: "KZ/GOV/MLSPP/benefits".into(),
            service: "KZ/GOV/MOJ/population".into(),
            method: "/kz.population.v1.PopulationRegistry/GetPerson".into(),
            purpose: "child-benefit".into(),
            subject: Some(subject.into()),
            basis: Some("legal:Social Code".into()),
            user: Some("officer-1".into()),
            ..AuditRecord::new(side, step)
        }
    }

    async fn log() -> (tempfile::TempDir, Arc<AuditHandle>) {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = kopir_core::pki::dev::signing_pair("collect").unwrap();
        let signer = Arc::new(kopir_core::pki::sign::SigningKey::from_pkcs8(&key, &cert).unwrap());
        let store = store::open(&store::Location::Embedded(dir.path().into()))
            .await
            .unwrap();
        let handle = AuditHandle::start(
            store,
            PseudonymKey::random().unwrap(),
            signer,
            "n1",
            WriterOptions::default(),
        )
        .await
        .unwrap();
        (dir, handle)
    }

    #[tokio::test]
    async fn one_entry_per_accepted_exchange_of_that_subject() {
        let (_dir, h) = log().await;
        let steps = [
            // An answered read of A, with its consumer-side twins.
            ("r1", A, Side::Consumer, Step::Forwarded),
            ("r1", A, Side::Provider, Step::Accepted),
            ("r1", A, Side::Provider, Step::Answered),
            ("r1", A, Side::Consumer, Step::Answered),
            // A read of A whose registry failed.
            ("r2", A, Side::Provider, Step::Accepted),
            ("r2", A, Side::Provider, Step::Failed),
            // A refused attempt on A, and its replay refused after r1.
            ("r3", A, Side::Provider, Step::Refused),
            ("r1", A, Side::Provider, Step::Refused),
            // Reads of B.
            ("b1", B, Side::Provider, Step::Accepted),
            ("b1", B, Side::Provider, Step::Answered),
            // An accepted read of A with no outcome yet.
            ("r4", A, Side::Provider, Step::Accepted),
        ];
        for (id, subject, side, step) in steps {
            let mut r = record(id, subject, side, step);
            if step == Step::Failed {
                r.status = 14;
                r.reason = Some("registry.unavailable".into());
            }
            if step == Step::Refused {
                r.status = 7;
                r.reason = Some("access.denied".into());
            }
            h.append(r).await.unwrap();
        }
        // A covert read of A, still hidden, and one whose date has passed.
        for (id, until) in [("c1", NOW + 1), ("c2", NOW)] {
            for step in [Step::Accepted, Step::Answered] {
                let mut r = record(id, A, Side::Provider, step);
                r.hidden_until_ms = Some(until);
                r.hidden_reason = Some("inquiry 17".into());
                r.query_group = Some("fraud-17".into());
                h.append(r).await.unwrap();
            }
        }
        // A report request about A is not a read.
        let mut asked = record("q1", A, Side::Provider, Step::Answered);
        asked.method = REPORT_METHOD.into();
        h.append(asked).await.unwrap();

        let pseudonym = h.pseudonyms().pseudonym(A);
        let options = |visibility, include_refused| Options {
            include_refused,
            from_ms: None,
            to_ms: None,
            visibility,
            now_ms: NOW,
        };
        let ids = |c: &Collected| -> Vec<(String, Outcome, bool)> {
            c.entries
                .iter()
                .map(|e| (e.query_id.clone(), e.outcome, e.hidden))
                .collect()
        };
        let store = h.store().as_ref();
        let subject = collect(
            store,
            pseudonym,
            "KZ/GOV/MOJ/ss1",
            None,
            &options(Visibility::Subject, false),
        )
        .await
        .unwrap();
        assert_eq!(
            ids(&subject),
            vec![
                ("c2".into(), Outcome::Answered, false),
                ("r1".into(), Outcome::Answered, false),
                ("r2".into(), Outcome::Failed, false),
                ("r4".into(), Outcome::Accepted, false),
            ]
        );
        let c2 = &subject.entries[0];
        assert_eq!(c2.hidden_until_ms, Some(NOW));
        assert_eq!(c2.hidden_reason.as_deref(), Some("inquiry 17"));
        assert_eq!(c2.query_group.as_deref(), Some("fraud-17"));
        let r1 = &subject.entries[1];
        assert_eq!(r1.legal_act.as_deref(), Some("Social Code"));
        assert_eq!(r1.consumer_member, "KZ/GOV/MLSPP");
        assert_eq!(r1.user.as_deref(), Some("officer-1"));
        assert_eq!(
            subject.entries[2].reason.as_deref(),
            Some("registry.unavailable")
        );

        let full = collect(
            store,
            pseudonym,
            "s",
            None,
            &options(Visibility::Full, true),
        )
        .await
        .unwrap();
        assert_eq!(
            ids(&full),
            vec![
                ("c1".into(), Outcome::Answered, true),
                ("c2".into(), Outcome::Answered, false),
                ("r1".into(), Outcome::Answered, false),
                ("r2".into(), Outcome::Failed, false),
                ("r3".into(), Outcome::Refused, false),
                ("r4".into(), Outcome::Accepted, false),
            ]
        );
        assert_eq!(full.entries[4].reason.as_deref(), Some("access.denied"));
        h.shutdown().await;
    }
}
