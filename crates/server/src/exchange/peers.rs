//! Outgoing connections to other security servers: one persistent HTTP/2
//! connection per provider server, over mutual TLS, where the provider must
//! present exactly the certificate the global configuration lists for it.
//! When a configuration no longer lists a server at that address with that
//! certificate (it moved, rotated its certificate, left), its connection is
//! dropped from the pool: calls in progress on it finish, then it closes.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use kopir_core::{
    globalconf::{ConfView, view::Endpoint as PeerEndpoint},
    pki::{Fingerprint, PkiError, tls::pinned_client_config},
};
use kopir_proto::v1::exchange_client::ExchangeClient;

/// The connection attempt failed before any byte of the request was sent, so
/// another server of the provider may be tried.
#[derive(Debug, thiserror::Error)]
#[error("connecting to {address} failed: {source}")]
pub(crate) struct ConnectFailed {
    address: String,
    /// True if the peer's certificate is not the one the configuration pins.
    pub untrusted: bool,
    source: std::io::Error,
}

/// Finds a [`ConnectFailed`] in an error's source chain.
pub(crate) fn connect_failure<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a ConnectFailed> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(cf) = e.downcast_ref::<ConnectFailed>() {
            return Some(cf);
        }
        cur = e.source();
    }
    None
}

fn is_pin_failure(err: &std::io::Error) -> bool {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)))
}

/// A pool of channels to peer servers, keyed by address and pinned certificate.
pub(crate) struct Peers {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    connect_timeout: Duration,
    max_message: usize,
    channels: Mutex<Pool>,
}

/// The channels by address and pinned certificate, and the serial of the
/// configuration they were last checked against.
#[derive(Default)]
struct Pool {
    channels: HashMap<(String, Fingerprint), Channel>,
    checked_serial: Option<u64>,
}

impl Pool {
    /// Keeps the channels whose address and certificate `listed` accepts; the
    /// others are dropped (a channel closes once no call holds it).
    fn retain(&mut self, listed: impl Fn(&(String, Fingerprint)) -> bool) {
        let before = self.channels.len();
        self.channels.retain(|key, _| listed(key));
        let dropped = before - self.channels.len();
        if dropped > 0 {
            tracing::info!(
                dropped,
                "peer connections closed: their servers are no longer listed so"
            );
        }
    }
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").finish_non_exhaustive()
    }
}

impl Peers {
    /// A pool that authenticates with this server's TLS certificate and key.
    pub(crate) fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        connect_timeout: Duration,
        max_message: usize,
    ) -> Self {
        Self {
            chain,
            key,
            connect_timeout,
            max_message,
            channels: Mutex::default(),
        }
    }

    /// A client for the peer at `endpoint` of configuration `view`, reusing
    /// its connection. The first call on a new configuration drops the
    /// connections to servers it no longer lists as they were.
    pub(crate) fn client(
        &self,
        view: &ConfView,
        endpoint: &PeerEndpoint,
    ) -> Result<ExchangeClient<Channel>, PkiError> {
        let key = (endpoint.address.clone(), endpoint.tls);
        let mut pool = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if pool.checked_serial != Some(view.serial()) {
            let listed: HashSet<_> = view
                .servers()
                .map(|e| (e.address.as_str(), e.tls))
                .collect();
            pool.retain(|(address, tls)| listed.contains(&(address.as_str(), *tls)));
            pool.checked_serial = Some(view.serial());
        }
        let channel = match pool.channels.get(&key) {
            Some(c) => c.clone(),
            None => {
                let c = self.connect(endpoint)?;
                pool.channels.insert(key, c.clone());
                c
            }
        };
        Ok(ExchangeClient::new(channel)
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message))
    }

    /// How many connections the pool holds.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .channels
            .len()
    }

    fn connect(&self, endpoint: &PeerEndpoint) -> Result<Channel, PkiError> {
        let config =
            pinned_client_config(self.chain.clone(), self.key.clone_key(), vec![endpoint.tls])?;
        let connector = TlsConnector::from(Arc::new(config));
        let address = endpoint.address.clone();
        let host = address
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
            .unwrap_or_else(|| address.clone());
        let server_name = ServerName::try_from(host)
            .map_err(|e| PkiError::Key(format!("peer address {address}: {e}")))?;
        let connect = tower::service_fn(move |_: http::Uri| {
            let (connector, address, server_name) =
                (connector.clone(), address.clone(), server_name.clone());
            async move {
                let failed = |source: std::io::Error| ConnectFailed {
                    address: address.clone(),
                    untrusted: is_pin_failure(&source),
                    source,
                };
                let tcp = TcpStream::connect(&address).await.map_err(failed)?;
                tcp.set_nodelay(true).map_err(failed)?;
                let tls = connector.connect(server_name, tcp).await.map_err(failed)?;
                Ok::<_, ConnectFailed>(TokioIo::new(tls))
            }
        });
        // The URI is only a label: the connector above dials the address itself.
        let endpoint = Endpoint::from_shared(format!("http://{}", endpoint.address))
            .map_err(|e| PkiError::Key(format!("peer address {}: {e}", endpoint.address)))?
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        Ok(endpoint.connect_with_connector_lazy(connect))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kopir_core::{
        globalconf::model::{GlobalConf, Member, Server},
        pki::{certs_from_pem, certs_to_pem, dev},
    };
    use rustls::pki_types::pem::PemObject;

    /// A configuration of `serial` whose one member has `servers`, each
    /// `(code, address, TLS certificate PEM)`.
    fn view(serial: u64, servers: &[(&str, &str, &str)]) -> ConfView {
        let now = time::OffsetDateTime::now_utc();
        let (signing, _) = dev::signing_pair("member").unwrap();
        ConfView::new(GlobalConf {
            instance: "KZ".into(),
            serial,
            issued_at: now,
            expires_at: now + time::Duration::hours(1),
            trusted_cas: vec![],
            members: vec![Member {
                id: "KZ/GOV/MOJ".parse().unwrap(),
                name: "MOJ".into(),
                signing_certs: vec![certs_to_pem(&[CertificateDer::from(signing)])],
                servers: servers
                    .iter()
                    .map(|(code, address, tls)| Server {
                        code: (*code).into(),
                        address: (*address).into(),
                        tls_cert: (*tls).into(),
                        subsystems: vec![],
                        maintenance: false,
                    })
                    .collect(),
                subsystems: vec![],
            }],
            purposes: vec![],
            consent_authority: None,
            report_readers: vec![],
            authority_keys: vec![],
        })
        .unwrap()
    }

    /// A server that moved or rotated its certificate, and one that left,
    /// lose their connections at the first call on the configuration that
    /// says so; the pool keeps one connection per listed server.
    #[tokio::test]
    async fn connections_to_servers_no_longer_listed_are_dropped() {
        let (own_cert, own_key) = dev::self_signed_tls("own").unwrap();
        let peers = Peers::new(
            certs_from_pem(own_cert.as_bytes(), "own").unwrap(),
            PrivateKeyDer::from_pem_slice(own_key.as_bytes()).unwrap(),
            Duration::from_secs(1),
            1024,
        );
        let (old, _) = dev::self_signed_tls("ss1").unwrap();
        let (new, _) = dev::self_signed_tls("ss1 rotated").unwrap();
        let (other, _) = dev::self_signed_tls("ss2").unwrap();
        let before = view(
            1,
            &[("ss1", "127.0.0.1:1", &old), ("ss2", "127.0.0.1:2", &other)],
        );
        for endpoint in before.servers() {
            peers.client(&before, endpoint).unwrap();
            peers.client(&before, endpoint).unwrap();
        }
        assert_eq!(peers.len(), 2);
        let after = view(2, &[("ss1", "127.0.0.1:1", &new)]);
        let rotated = after.servers().next().unwrap();
        peers.client(&after, rotated).unwrap();
        assert_eq!(peers.len(), 1, "only the rotated server's new connection");
        peers.client(&after, rotated).unwrap();
        assert_eq!(peers.len(), 1);
    }
}
