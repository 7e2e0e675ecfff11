//! Outgoing connections to other security servers: one persistent HTTP/2
//! connection per provider server, over mutual TLS, where the provider must
//! present exactly the certificate the global configuration lists for it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use kopir_core::{
    globalconf::view::Endpoint as PeerEndpoint,
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
    channels: Mutex<HashMap<(String, Fingerprint), Channel>>,
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
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// A client for the peer at `endpoint`, reusing its connection.
    pub(crate) fn client(
        &self,
        endpoint: &PeerEndpoint,
    ) -> Result<ExchangeClient<Channel>, PkiError> {
        let key = (endpoint.address.clone(), endpoint.tls);
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(&key) {
            Some(c) => c.clone(),
            None => {
                let c = self.connect(endpoint)?;
                channels.insert(key, c.clone());
                c
            }
        };
        Ok(ExchangeClient::new(channel)
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message))
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
