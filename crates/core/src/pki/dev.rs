//! A development PKI, made with rcgen: one CA, the governance authority's
//! signing certificate (the trust anchor of the global configuration), each
//! member's signing certificate, each security server's TLS certificate, each
//! information system's client certificate, an operator's client certificate
//! for the admin ports, the consent authority's token-signing and TLS
//! certificates, the citizen portal's client certificate and assertion-signing
//! certificate, and each auditor's client certificate (access reports).
//!
//! Never use these in production: their private keys are written next to the
//! certificates (and the demo's set is committed in `certs-dev/`).
//!
//! Where the files go is [`super::layout::DevLayout`].

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, SanType,
};
use time::{Duration, OffsetDateTime};

use super::{
    PkiError,
    layout::{DevLayout, DevPkiSpec},
};

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        PkiError::Generate(e.to_string())
    }
}

/// How long development certificates stay valid.
const DEV_VALIDITY: Duration = Duration::days(3650);

struct Ca {
    issuer: Issuer<'static, KeyPair>,
}

fn window(params: &mut CertificateParams) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + DEV_VALIDITY;
}

fn named(cn: &str, sans: Vec<String>) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "kopir development PKI");
    window(&mut params);
    Ok(params)
}

impl Ca {
    fn new() -> Result<(Self, String, String), PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = named("kopir development CA", vec![])?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        Ok((
            Self {
                issuer: Issuer::new(params, key),
            },
            cert_pem,
            key_pem,
        ))
    }

    /// Issues a certificate; returns (certificate PEM, key PEM).
    fn issue(
        &self,
        mut params: CertificateParams,
        alg: &'static rcgen::SignatureAlgorithm,
        usage: &[ExtendedKeyUsagePurpose],
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate_for(alg)?;
        params.extended_key_usages = usage.to_vec();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key_pem(&key)))
    }
}

/// A private key as PEM in the form standard tools read: an Ed25519 key as
/// PKCS#8 v1 (RFC 8410: the seed alone; `openssl pkey` and pyca/cryptography
/// refuse the v2 form with the public key that ring makes), others as made.
fn key_pem(key: &KeyPair) -> String {
    let der = key.serialize_der();
    match super::sign::ed25519_pkcs8_v1(&der) {
        Some(v1) => super::pem_block("PRIVATE KEY", &v1),
        None => key.serialize_pem(),
    }
}

fn write(path: &Path, text: &str) -> Result<(), PkiError> {
    let io = |source| PkiError::Read {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    std::fs::write(path, text).map_err(io)
}

fn write_pair(paths: (PathBuf, PathBuf), pems: (String, String)) -> Result<(), PkiError> {
    write(&paths.0, &pems.0)?;
    write(&paths.1, &pems.1)
}

/// Parameters of a TLS certificate for `hosts` (plus `localhost` and
/// `127.0.0.1`).
fn tls_params(cn: &str, hosts: &[String]) -> Result<CertificateParams, PkiError> {
    let mut names: Vec<String> = hosts.to_vec();
    for always in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|n| n == always) {
            names.push(always.into());
        }
    }
    let mut params = named(cn, vec![])?;
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(n.as_str().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    Ok(params)
}

/// Generates a whole development PKI for `spec` under `out`.
pub fn generate(spec: &DevPkiSpec, out: &Path) -> Result<DevLayout, PkiError> {
    let layout = DevLayout::new(out);
    let (ca, ca_cert, ca_key) = Ca::new()?;
    write(&layout.ca_cert(), &ca_cert)?;
    write(&layout.ca_key(), &ca_key)?;

    let authority = named("kopir governance authority", vec![])?;
    write_pair(
        (layout.authority_cert(), layout.authority_key()),
        ca.issue(authority, &PKCS_ED25519, &[])?,
    )?;
    for member in &spec.members {
        let params = named(&format!("{member} signing"), vec![])?;
        write_pair(
            layout.member_signing(member),
            ca.issue(params, &PKCS_ED25519, &[])?,
        )?;
    }
    for (server, hosts) in &spec.servers {
        write_pair(
            layout.server_tls(server),
            ca.issue(
                tls_params(&server.to_string(), hosts)?,
                &PKCS_ECDSA_P256_SHA256,
                &[
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
            )?,
        )?;
    }
    let consent = named("kopir consent authority", vec![])?;
    write_pair(
        layout.consent_signing(),
        ca.issue(consent, &PKCS_ED25519, &[])?,
    )?;
    write_pair(
        layout.consent_tls(),
        ca.issue(
            tls_params("kopir consent authority", &spec.consent_hosts)?,
            &PKCS_ECDSA_P256_SHA256,
            &[ExtendedKeyUsagePurpose::ServerAuth],
        )?,
    )?;
    let portal = named("kopir citizen portal assertions", vec![])?;
    write_pair(
        layout.portal_signing(),
        ca.issue(portal, &PKCS_ED25519, &[])?,
    )?;
    let clients = spec
        .clients
        .iter()
        .map(|c| (c.to_string(), layout.client(c)))
        .chain([
            ("kopir operator".to_string(), layout.operator()),
            ("kopir citizen portal".to_string(), layout.portal()),
        ])
        .chain(
            spec.auditors
                .iter()
                .map(|a| (format!("kopir auditor {a}"), layout.auditor(a))),
        );
    for (name, paths) in clients {
        write_pair(
            paths,
            ca.issue(
                named(&name, vec![])?,
                &PKCS_ECDSA_P256_SHA256,
                &[ExtendedKeyUsagePurpose::ClientAuth],
            )?,
        )?;
    }
    Ok(layout)
}

/// A self-signed TLS certificate and key (PEM), valid for `localhost` and
/// `127.0.0.1`: what an impostor without the federation's CA would present.
pub fn self_signed_tls(cn: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = named(cn, vec!["localhost".into()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A self-signed Ed25519 signing certificate and its PKCS#8 key, both DER.
pub fn signing_pair(cn: &str) -> Result<(Vec<u8>, Vec<u8>), PkiError> {
    let key = KeyPair::generate_for(&PKCS_ED25519)?;
    let cert = named(cn, vec![])?.self_signed(&key)?;
    let der = key.serialize_der();
    Ok((
        cert.der().to_vec(),
        super::sign::ed25519_pkcs8_v1(&der).unwrap_or(der),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        id::{MemberId, ServerId, SubsystemId},
        pki::{Fingerprint, issued_by, load_certs, sign::SigningKey},
    };

    #[test]
    fn generates_a_consistent_set() {
        let dir = tempfile::tempdir().unwrap();
        let member: MemberId = "KZ/GOV/MOJ".parse().unwrap();
        let server: ServerId = "KZ/GOV/MOJ/ss1".parse().unwrap();
        let client: SubsystemId = "KZ/GOV/MOJ/app".parse().unwrap();
        let spec = DevPkiSpec {
            members: vec![member.clone()],
            servers: vec![(server.clone(), vec!["moj-ss1".into()])],
            clients: vec![client.clone()],
            consent_hosts: vec!["consent".into()],
            auditors: vec!["dpa".into()],
        };
        let layout = generate(&spec, dir.path()).unwrap();
        let ca = load_certs(&layout.ca_cert()).unwrap();
        let (cert, key) = layout.member_signing(&member);
        let signer = SigningKey::load(&cert, &key).unwrap();
        issued_by(signer.cert_der(), ca[0].as_ref()).unwrap();
        let tls = load_certs(&layout.server_tls(&server).0).unwrap();
        issued_by(tls[0].as_ref(), ca[0].as_ref()).unwrap();
        let client_cert = load_certs(&layout.client(&client).0).unwrap();
        assert_ne!(
            Fingerprint::of(client_cert[0].as_ref()),
            Fingerprint::of(tls[0].as_ref())
        );
        SigningKey::load(&layout.authority_cert(), &layout.authority_key()).unwrap();
        let (cert, key) = layout.consent_signing();
        SigningKey::load(&cert, &key).unwrap();
        let consent_tls = load_certs(&layout.consent_tls().0).unwrap();
        issued_by(consent_tls[0].as_ref(), ca[0].as_ref()).unwrap();
        let portal = load_certs(&layout.portal().0).unwrap();
        issued_by(portal[0].as_ref(), ca[0].as_ref()).unwrap();
        let (cert, key) = layout.portal_signing();
        SigningKey::load(&cert, &key).unwrap();
        let auditor = load_certs(&layout.auditor("dpa").0).unwrap();
        issued_by(auditor[0].as_ref(), ca[0].as_ref()).unwrap();
    }
}

/// A new key and a certificate signing request (PKCS#10) for it, both PEM:
/// a TLS key (ECDSA P-256) for `hosts`, or an Ed25519 signing key. What a
/// server sends to the CA when it joins (`kopir server init`).
pub fn key_and_csr(
    cn: &str,
    hosts: &[String],
    signing: bool,
) -> Result<(String, String), PkiError> {
    let (alg, params) = if signing {
        (&PKCS_ED25519, named(cn, vec![])?)
    } else {
        (&PKCS_ECDSA_P256_SHA256, tls_params(cn, hosts)?)
    };
    let key = KeyPair::generate_for(alg)?;
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((csr, key_pem(&key)))
}

/// The development CA's answer to a CSR: a certificate for its key and
/// names, for TLS (server and client authentication) or for signing.
/// Production certificates come from the federation's CA, not from kopir.
pub fn issue_from_csr(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    csr_pem: &str,
    tls: bool,
) -> Result<String, PkiError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)?;
    let mut request = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
    window(&mut request.params);
    request.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    request.params.extended_key_usages = if tls {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![]
    };
    Ok(request.signed_by(&issuer)?.pem())
}

#[cfg(test)]
mod csr_tests {
    use super::*;
    use crate::pki::{certs_from_pem, issued_by, sign::VerifyingKey};

    #[test]
    fn a_csr_issued_by_the_ca_names_the_key_and_chains_to_the_ca() {
        let (ca, ca_cert, ca_key) = Ca::new().unwrap();
        drop(ca);
        let (csr, _key) = key_and_csr("KZ/GOV/NEW/ss1", &["new-ss1".into()], false).unwrap();
        let cert = issue_from_csr(&ca_cert, &ca_key, &csr, true).unwrap();
        let der = certs_from_pem(cert.as_bytes(), "cert").unwrap();
        let ca_der = certs_from_pem(ca_cert.as_bytes(), "ca").unwrap();
        issued_by(der[0].as_ref(), ca_der[0].as_ref()).unwrap();
        let (csr, _key) = key_and_csr("KZ/GOV/NEW signing", &[], true).unwrap();
        let signing = issue_from_csr(&ca_cert, &ca_key, &csr, false).unwrap();
        let der = certs_from_pem(signing.as_bytes(), "signing").unwrap();
        VerifyingKey::from_cert(der[0].as_ref()).unwrap();
    }
}
