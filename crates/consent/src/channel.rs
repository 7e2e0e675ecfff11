//! gRPC channels to the consent authority over TLS: pinned to the certificate
//! the global configuration lists (security servers), or checked against a
//! CA (the portal and operator tools). Report readers reach the security
//! servers' peer ports with the same pinned channels.

use std::{sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName},
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use kopir_core::pki::{
    Fingerprint, PkiError,
    tls::{ca_client_config, pinned_client_config},
};

/// A certificate chain and its private key.
pub type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// A lazily connecting channel to `address` (`host:port`) over `tls`.
pub fn tls_channel(
    address: &str,
    tls: ClientConfig,
    connect_timeout: Duration,
) -> Result<Channel, PkiError> {
    let connector = TlsConnector::from(Arc::new(tls));
    let host = address
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
        .unwrap_or_else(|| address.to_owned());
    let server_name =
        ServerName::try_from(host).map_err(|e| PkiError::Key(format!("address {address}: {e}")))?;
    let target = address.to_owned();
    let connect = tower::service_fn(move |_: http::Uri| {
        let (connector, target, server_name) =
            (connector.clone(), target.clone(), server_name.clone());
        async move {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    // The URI is only a label: the connector above dials the address itself.
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| PkiError::Key(format!("address {address}: {e}")))?
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_with_connector_lazy(connect))
}

/// A channel that accepts only the certificate `pin` and presents `identity`.
pub fn pinned_channel(
    address: &str,
    pin: Fingerprint,
    identity: Identity,
    connect_timeout: Duration,
) -> Result<Channel, PkiError> {
    let tls = pinned_client_config(identity.0, identity.1, vec![pin])?;
    tls_channel(address, tls, connect_timeout)
}

/// A channel that checks the server against `roots` and presents `identity`.
pub fn ca_channel(
    address: &str,
    roots: &[CertificateDer<'static>],
    identity: Option<Identity>,
    connect_timeout: Duration,
) -> Result<Channel, PkiError> {
    let tls = ca_client_config(roots, identity)?;
    tls_channel(address, tls, connect_timeout)
}
