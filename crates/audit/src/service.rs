//! The gRPC `AuditService` (proto/kopir/v1/audit.proto), for the admin port.
//!
//! Protobuf messages are converted to the log's own types here, at the
//! boundary; malformed requests are answered with `INVALID_ARGUMENT`, unknown
//! records with `NOT_FOUND`, store failures with `UNAVAILABLE`. The server
//! mounts [`AuditServiceImpl::into_server`] behind mutual TLS.

use std::sync::{Arc, atomic::Ordering};

use bytes::Bytes;
use tonic::{Request, Response, Status};

use super::{
    AuditError, AuditHandle, Side, Step,
    checkpoint::Checkpoint,
    export,
    inspect::{self, ShownRecord},
    record::StoredRecord,
    signatures::SignatureCheck,
    store::Query,
    verify::{VerifyOptions, VerifyReport, verify_store},
};
use kopir_core::{globalconf::GlobalConfHandle, pki::Fingerprint};
use kopir_proto::v1::{
    AuditCheckpoint, AuditCheckpointRequest, AuditCheckpointResponse, AuditConsistencyRequest,
    AuditConsistencyResponse, AuditEntry, AuditExportRequest, AuditExportResponse,
    AuditInclusionRequest, AuditInclusionResponse, AuditProblem, AuditQueryRequest,
    AuditQueryResponse, AuditShowRequest, AuditShowResponse, AuditShownEntry, AuditStatsRequest,
    AuditStatsResponse, AuditVerifyRequest, AuditVerifyResponse,
    audit_service_server::{AuditService, AuditServiceServer},
};

/// The `AuditService` over a running log.
#[derive(Debug, Clone)]
pub struct AuditServiceImpl {
    handle: Arc<AuditHandle>,
    conf: Option<GlobalConfHandle>,
}

impl AuditServiceImpl {
    /// The service over `handle`.
    pub fn new(handle: Arc<AuditHandle>) -> Self {
        Self { handle, conf: None }
    }

    /// Checks exchange signatures in `Show` against this global configuration.
    pub fn with_conf(mut self, conf: GlobalConfHandle) -> Self {
        self.conf = Some(conf);
        self
    }

    /// The tonic service to mount.
    pub fn into_server(self) -> AuditServiceServer<Self> {
        AuditServiceServer::new(self)
    }
}

/// Maps a log error to a gRPC status.
pub(crate) fn status(e: AuditError) -> Status {
    match e {
        AuditError::Invalid(m) => Status::invalid_argument(m),
        AuditError::NotFound(m) => Status::not_found(m),
        other => Status::unavailable(other.to_string()),
    }
}

fn bytes_of(h: &[u8]) -> Bytes {
    Bytes::copy_from_slice(h)
}

/// A stored record as a protobuf message.
pub(crate) fn entry_to_proto(r: &StoredRecord) -> AuditEntry {
    let e = &r.entry;
    AuditEntry {
        seq: r.seq,
        node: e.node.clone(),
        request_id: e.request_id.clone(),
        at_ms: e.at_ms,
        side: e.side.as_str().into(),
        step: e.step.as_str().into(),
        client: e.client.clone(),
        service: e.service.clone(),
        method: e.method.clone(),
        purpose: e.purpose.clone(),
        subject_pseudonym: e.subject.map(|h| bytes_of(&h)).unwrap_or_default(),
        basis: e.basis.clone(),
        user: e.user.clone(),
        peer: e.peer.clone(),
        status: e.status,
        reason: e.reason.clone(),
        message: e.message.clone(),
        body_sha256: e.body_sha256.map(|h| bytes_of(&h)).unwrap_or_default(),
        request_hash: e.request_hash.map(|h| bytes_of(&h)).unwrap_or_default(),
        signature: e.signature.as_deref().map(bytes_of).unwrap_or_default(),
        signer_key: e.signer_key.map(|h| bytes_of(&h)).unwrap_or_default(),
        signed_hash: e.signed_hash.map(|h| bytes_of(&h)).unwrap_or_default(),
        body: e.body.as_deref().map(bytes_of).unwrap_or_default(),
        query_group: e.query_group.clone(),
        hidden_until_ms: e.hidden_until_ms,
        hidden_reason: e.hidden_reason.clone(),
        prev_hash: bytes_of(&r.prev_hash),
        hash: bytes_of(&r.hash),
    }
}

/// A checkpoint as a protobuf message.
pub(crate) fn checkpoint_to_proto(c: &Checkpoint) -> AuditCheckpoint {
    AuditCheckpoint {
        seq: c.seq,
        head: bytes_of(&c.head),
        root: bytes_of(&c.root),
        at_ms: c.at_ms,
        node: c.node.clone(),
        key_id: bytes_of(&c.key_id),
        cert_der: bytes_of(&c.cert_der),
        signature: bytes_of(&c.signature),
    }
}

/// A verification report as a protobuf message.
pub(crate) fn report_to_proto(r: &VerifyReport) -> AuditVerifyResponse {
    AuditVerifyResponse {
        ok: r.ok(),
        records: r.records,
        head_seq: r.head_seq,
        checkpoints: u32::try_from(r.checkpoints).unwrap_or(u32::MAX),
        last_checkpoint: r.last_checkpoint.unwrap_or(0),
        unsigned_tail: r.unsigned_tail,
        first_bad: r.first_bad.unwrap_or(0),
        problems: r
            .problems
            .iter()
            .map(|p| AuditProblem {
                kind: p.kind.as_str().into(),
                seq: p.seq,
                detail: p.detail.clone(),
            })
            .collect(),
        signers: r.signers.clone(),
    }
}

fn shown_to_proto(s: &ShownRecord) -> AuditShownEntry {
    AuditShownEntry {
        entry: Some(entry_to_proto(&s.record)),
        recomputed_hash: bytes_of(&s.recomputed),
        hash_ok: s.hash_ok,
        checkpoint_seq: s.checkpoint.unwrap_or(0),
        signature_result: match &s.signature {
            SignatureCheck::Absent => "absent",
            SignatureCheck::Valid(_) => "valid",
            SignatureCheck::Invalid(_) => "invalid",
            SignatureCheck::Unchecked(_) => "unchecked",
        }
        .into(),
        signature_detail: s.signature.to_string(),
    }
}

fn nonempty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// Converts a query request, pseudonymising the subject with `handle`'s key.
fn query_from_proto(q: AuditQueryRequest, handle: &AuditHandle) -> Result<Query, Status> {
    let step = nonempty(q.step)
        .map(|s| {
            Step::parse(&s).ok_or_else(|| Status::invalid_argument(format!("unknown step {s:?}")))
        })
        .transpose()?;
    let side = nonempty(q.side)
        .map(|s| {
            Side::parse(&s).ok_or_else(|| Status::invalid_argument(format!("unknown side {s:?}")))
        })
        .transpose()?;
    let before_seq = if q.page_token.is_empty() {
        None
    } else {
        Some(
            q.page_token
                .parse::<u64>()
                .map_err(|_| Status::invalid_argument("bad page_token"))?,
        )
    };
    Ok(Query {
        request_id: nonempty(q.request_id),
        client: nonempty(q.client),
        service: nonempty(q.service),
        method: nonempty(q.method),
        subject: nonempty(q.subject).map(|s| handle.pseudonyms().pseudonym(&s)),
        purpose: nonempty(q.purpose),
        step,
        side,
        status: q.status,
        reason: nonempty(q.reason),
        node: None,
        from_ms: q.from_ms,
        to_ms: q.to_ms,
        before_seq,
        limit: usize::try_from(q.page_size).unwrap_or(0),
    })
}

#[tonic::async_trait]
impl AuditService for AuditServiceImpl {
    async fn query(
        &self,
        request: Request<AuditQueryRequest>,
    ) -> Result<Response<AuditQueryResponse>, Status> {
        let query = query_from_proto(request.into_inner(), &self.handle)?;
        let page = self.handle.store().query(query).await.map_err(status)?;
        Ok(Response::new(AuditQueryResponse {
            entries: page.records.iter().map(entry_to_proto).collect(),
            next_page_token: page.next.map(|s| s.to_string()).unwrap_or_default(),
        }))
    }

    async fn show(
        &self,
        request: Request<AuditShowRequest>,
    ) -> Result<Response<AuditShowResponse>, Status> {
        let id = request.into_inner().request_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("request_id is required"));
        }
        let view = self.conf.as_ref().and_then(|c| c.current().ok());
        let shown = inspect::show(self.handle.store(), &id, None, view.as_deref())
            .await
            .map_err(status)?;
        if shown.is_empty() {
            return Err(Status::not_found(format!("no records of request {id}")));
        }
        Ok(Response::new(AuditShowResponse {
            entries: shown.iter().map(shown_to_proto).collect(),
        }))
    }

    async fn verify(
        &self,
        request: Request<AuditVerifyRequest>,
    ) -> Result<Response<AuditVerifyResponse>, Status> {
        let key = request.into_inner().expected_key_id;
        let expected_signer = if key.is_empty() {
            None
        } else {
            Some(
                Fingerprint::from_slice(&key)
                    .ok_or_else(|| Status::invalid_argument("expected_key_id must be 32 bytes"))?,
            )
        };
        let report = verify_store(
            self.handle.store().clone(),
            &VerifyOptions { expected_signer },
            &mut |_, _| {},
        )
        .await
        .map_err(status)?;
        Ok(Response::new(report_to_proto(&report)))
    }

    async fn export(
        &self,
        request: Request<AuditExportRequest>,
    ) -> Result<Response<AuditExportResponse>, Status> {
        let r = request.into_inner();
        let store = self.handle.store();
        let (from, to) = if r.from_seq > 0 || r.to_seq > 0 {
            let to = if r.to_seq == 0 {
                store
                    .head()
                    .await
                    .map_err(status)?
                    .map(|l| l.seq)
                    .unwrap_or(0)
            } else {
                r.to_seq
            };
            (r.from_seq.max(1), to)
        } else if r.to_ms > r.from_ms {
            store
                .seq_range(r.from_ms, r.to_ms)
                .await
                .map_err(status)?
                .ok_or_else(|| Status::not_found("no records in that time range"))?
        } else {
            return Err(Status::invalid_argument(
                "give a sequence range (from_seq..=to_seq) or a time range (from_ms..to_ms)",
            ));
        };
        if from > to {
            return Err(Status::invalid_argument(format!("bad range {from}..={to}")));
        }
        self.handle.checkpoint_covering(to).await.map_err(status)?;
        let archive = export::export_range(store, from, to)
            .await
            .map_err(status)?;
        Ok(Response::new(AuditExportResponse {
            archive: Bytes::from(archive.to_json().map_err(status)?),
            from_seq: from,
            to_seq: to,
        }))
    }

    async fn inclusion_proof(
        &self,
        request: Request<AuditInclusionRequest>,
    ) -> Result<Response<AuditInclusionResponse>, Status> {
        let seq = request.into_inner().seq;
        if seq == 0 {
            return Err(Status::invalid_argument("seq starts at 1"));
        }
        self.handle.checkpoint_covering(seq).await.map_err(status)?;
        let p = inspect::inclusion(self.handle.store(), seq, None)
            .await
            .map_err(status)?;
        Ok(Response::new(AuditInclusionResponse {
            entry: Some(entry_to_proto(&p.record)),
            checkpoint: Some(checkpoint_to_proto(&p.checkpoint)),
            leaf_index: seq - 1,
            tree_size: p.checkpoint.seq,
            proof: p.proof.iter().map(|h| bytes_of(h)).collect(),
        }))
    }

    async fn consistency_proof(
        &self,
        request: Request<AuditConsistencyRequest>,
    ) -> Result<Response<AuditConsistencyResponse>, Status> {
        let r = request.into_inner();
        let to = (r.to_size > 0).then_some(r.to_size);
        let p = inspect::consistency(self.handle.store(), r.from_size, to, None)
            .await
            .map_err(status)?;
        Ok(Response::new(AuditConsistencyResponse {
            from: Some(checkpoint_to_proto(&p.from)),
            to: Some(checkpoint_to_proto(&p.to)),
            proof: p.proof.iter().map(|h| bytes_of(h)).collect(),
        }))
    }

    async fn checkpoint(
        &self,
        _request: Request<AuditCheckpointRequest>,
    ) -> Result<Response<AuditCheckpointResponse>, Status> {
        let fresh = self.handle.checkpoint().await.map_err(status)?;
        let latest = self
            .handle
            .store()
            .latest_checkpoint()
            .await
            .map_err(status)?;
        Ok(Response::new(AuditCheckpointResponse {
            checkpoint: fresh.as_ref().map(checkpoint_to_proto),
            latest: latest.as_ref().map(|c| checkpoint_to_proto(&c.checkpoint)),
        }))
    }

    async fn stats(
        &self,
        _request: Request<AuditStatsRequest>,
    ) -> Result<Response<AuditStatsResponse>, Status> {
        let s = self.handle.stats();
        Ok(Response::new(AuditStatsResponse {
            records: s.records.load(Ordering::Relaxed),
            commits: s.commits.load(Ordering::Relaxed),
            commit_ns: s.commit_ns.load(Ordering::Relaxed),
            syncs: s.syncs.load(Ordering::Relaxed),
            pending: s.pending.load(Ordering::Relaxed),
            writer_restarts: s.restarts.load(Ordering::Relaxed),
            log_lines_dropped: kopir_core::logging::dropped_lines(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        AuditLog, AuditRecord, WriterOptions, export::Archive, pseudonym::PseudonymKey, store,
    };

    fn record(i: i64) -> AuditRecord {
        let side = if i % 2 == 0 {
            Side::Consumer
        } else {
            Side::Provider
        };
        AuditRecord {
            request_id: format!("r{}", i / 2),
            at_ms: 1_000 + i,
            client: "KZ/GOV/A/app".into(),
            service: "KZ/GOV/B/reg".into(),
            method: "/x.Y/Z".into(),
            purpose: "p".into(),
            subject: Some(format!("iin:{}", i % 3)),
            body_sha256: Some([1; 32]),
            request_hash: Some([2; 32]),
            signature: Some(vec![3; 64]),
            ..AuditRecord::new(side, Step::Answered)
        }
    }

    #[tokio::test]
    async fn every_rpc_answers() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = kopir_core::pki::dev::signing_pair("svc").unwrap();
        let signer = Arc::new(kopir_core::pki::sign::SigningKey::from_pkcs8(&key, &cert).unwrap());
        let store = store::open(&store::Location::Embedded(dir.path().into()))
            .await
            .unwrap();
        let handle = AuditHandle::start(
            store,
            PseudonymKey::random().unwrap(),
            signer.clone(),
            "n1",
            WriterOptions::default(),
        )
        .await
        .unwrap();
        for i in 0..10 {
            handle.append(record(i)).await.unwrap();
        }
        let svc = AuditServiceImpl::new(handle.clone());

        let stats = svc
            .stats(Request::new(AuditStatsRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stats.records, 10);
        assert!(stats.commits >= 1 && stats.commits <= 10, "{stats:?}");
        assert!(stats.commit_ns > 0);

        let q = svc
            .query(Request::new(AuditQueryRequest {
                subject: Some("iin:1".into()),
                page_size: 2,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let seqs: Vec<u64> = q.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![8, 5]);
        assert_eq!(q.next_page_token, "5");
        let bad = svc
            .query(Request::new(AuditQueryRequest {
                step: Some("maybe".into()),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);

        // Export and inclusion sign a checkpoint when none covers the range.
        let ex = svc
            .export(Request::new(AuditExportRequest {
                from_seq: 2,
                to_seq: 7,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        let archive = Archive::from_json(&ex.archive).unwrap();
        assert!(crate::export::verify_archive(&archive, Some(&signer.key_id())).ok());
        let inc = svc
            .inclusion_proof(Request::new(AuditInclusionRequest { seq: 3 }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((inc.leaf_index, inc.tree_size), (2, 10));

        let shown = svc
            .show(Request::new(AuditShowRequest {
                request_id: "r2".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(shown.entries.len(), 2);
        assert!(
            shown
                .entries
                .iter()
                .all(|e| e.hash_ok && e.checkpoint_seq == 10)
        );
        let missing = svc
            .show(Request::new(AuditShowRequest {
                request_id: "nope".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);

        handle.append(record(10)).await.unwrap();
        let cp = svc
            .checkpoint(Request::new(AuditCheckpointRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(cp.checkpoint.map(|c| c.seq), Some(11));
        let cons = svc
            .consistency_proof(Request::new(AuditConsistencyRequest {
                from_size: 10,
                to_size: 0,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(cons.to.map(|c| c.seq), Some(11));

        let v = svc
            .verify(Request::new(AuditVerifyRequest {
                expected_key_id: Bytes::copy_from_slice(&signer.key_id().0),
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(v.ok && v.records == 11 && v.checkpoints == 2, "{v:?}");
        handle.shutdown().await;
    }
}
