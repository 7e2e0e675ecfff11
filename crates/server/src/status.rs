//! `kopir.v1.ServerStatus` on the admin port: what an operator asks a running
//! server about its global configuration (the copy in use, where and when it
//! came from, when it expires, how each source last answered). Health says
//! only SERVING or NOT_SERVING; this says why.

use kopir_core::globalconf::GlobalConfHandle;
use kopir_proto::v1::{
    GlobalConfSource, GlobalConfStatus, GlobalConfStatusRequest,
    server_status_server::{ServerStatus, ServerStatusServer},
};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

/// The status service of one server.
#[derive(Debug, Clone)]
pub(crate) struct StatusService {
    conf: GlobalConfHandle,
}

impl StatusService {
    pub(crate) fn new(conf: GlobalConfHandle) -> ServerStatusServer<Self> {
        ServerStatusServer::new(Self { conf })
    }
}

fn rfc3339(t: Option<OffsetDateTime>) -> String {
    t.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_default()
}

#[tonic::async_trait]
impl ServerStatus for StatusService {
    async fn global_conf(
        &self,
        _: Request<GlobalConfStatusRequest>,
    ) -> Result<Response<GlobalConfStatus>, Status> {
        let status = self.conf.status();
        let (usable, reason, why) = match self.conf.current() {
            Ok(_) => (true, String::new(), String::new()),
            Err(e) => (false, e.reason().as_str().to_string(), e.to_string()),
        };
        Ok(Response::new(GlobalConfStatus {
            usable,
            reason,
            why,
            serial: status.serial.unwrap_or_default(),
            expires_at: rfc3339(status.expires_at),
            obtained_from: status.obtained_from.unwrap_or_default(),
            obtained_at: rfc3339(status.obtained_at),
            checked_at: rfc3339(status.checked_at),
            checked_from: status.checked_from.unwrap_or_default(),
            authority_keys: status.authority_keys,
            sources: status
                .sources
                .into_iter()
                .map(|s| GlobalConfSource {
                    location: s.location,
                    last_success: rfc3339(s.last_success),
                    last_failure: rfc3339(s.last_failure),
                    last_error: s.last_error.unwrap_or_default(),
                })
                .collect(),
        }))
    }
}
