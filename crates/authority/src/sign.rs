//! Signing the global configuration from the federation description, with
//! serials that only grow.

use std::time::Duration;

use kopir_core::{
    globalconf::{
        describe::{DescribeError, Federation},
        signed,
    },
    pki::{certs_to_pem, sign::SigningKey},
};
use tokio_rustls::rustls::pki_types::CertificateDer;

/// Why the configuration could not be signed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// The description does not make a valid configuration (an expired or
    /// untrusted certificate, an unknown purpose...).
    #[error(transparent)]
    Describe(#[from] DescribeError),
    /// The validity does not fit a configuration's expiry.
    #[error("validity of {0:?} is out of range")]
    Validity(Duration),
}

/// One signed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// Its serial.
    pub serial: u64,
    /// When servers stop using it, RFC 3339.
    pub expires_at: String,
    /// The signed document (`kopir-globalconf/1` JSON), as servers read it.
    pub bytes: Vec<u8>,
}

/// Signs the description's configuration again and again, each time with a
/// serial above the one before: the Unix time in microseconds, or one more
/// than the last serial should the clock not have moved on (servers refuse
/// a second document with a serial they have seen, and any lower one).
///
/// Every document announces the authority's keys servers trust from then
/// on: the signing key's certificate and any `announced` beside it (the next
/// key before a rotation, see [`Signer::announcing`]).
#[derive(Debug)]
pub struct Signer {
    federation: Federation,
    key: SigningKey,
    valid_for: Duration,
    announced: Vec<String>,
    last: u64,
}

impl Signer {
    /// A signer of `federation` with the authority's `key`, each document
    /// valid for `valid_for`.
    pub fn new(federation: Federation, key: SigningKey, valid_for: Duration) -> Self {
        let own = certs_to_pem(&[CertificateDer::from(key.cert_der().to_vec())]);
        Self {
            federation,
            key,
            valid_for,
            announced: vec![own],
            last: 0,
        }
    }

    /// Also announces the keys of these certificates (PEM), so that servers
    /// trust them before the authority signs with one.
    pub fn announcing(mut self, certs: &[CertificateDer<'_>]) -> Self {
        for cert in certs {
            let pem = certs_to_pem(std::slice::from_ref(cert));
            if !self.announced.contains(&pem) {
                self.announced.push(pem);
            }
        }
        self
    }

    /// The description it signs.
    pub fn federation(&self) -> &Federation {
        &self.federation
    }

    /// Signs `federation` from now on (one with approved requests applied).
    pub fn set_federation(&mut self, federation: Federation) {
        self.federation = federation;
    }

    /// Builds and signs the next configuration.
    pub fn sign(&mut self) -> Result<Signed, SignError> {
        let now = u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000)
            .unwrap_or(0);
        let serial = now.max(self.last + 1);
        let valid_for = time::Duration::try_from(self.valid_for)
            .map_err(|_| SignError::Validity(self.valid_for))?;
        let mut conf = self.federation.build(serial, valid_for)?;
        conf.authority_keys = self.announced.clone();
        self.last = serial;
        Ok(Signed {
            serial,
            expires_at: kopir_core::clock::rfc3339(conf.expires_at.unix_timestamp()),
            bytes: signed::sign(&conf, &self.key).into_bytes(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kopir_core::{
        globalconf::signed::verify_with_digest,
        pki::{layout::DevLayout, sign::VerifyingKey},
    };

    /// The demo federation, its development PKI and the authority's key.
    fn demo() -> (Federation, DevLayout, SigningKey) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let federation = Federation::load(&root.join("deploy/federation.toml")).unwrap();
        let layout = DevLayout::new(federation.certs.as_ref().unwrap());
        let key = SigningKey::load(&layout.authority_cert(), &layout.authority_key()).unwrap();
        (federation, layout, key)
    }

    /// Signed twice within a second, the serials still grow, and each
    /// document verifies under the authority's certificate.
    #[test]
    fn serials_grow_within_a_second() {
        let (federation, layout, key) = demo();
        let anchor = VerifyingKey::load(&layout.authority_cert()).unwrap();
        let mut signer = Signer::new(federation, key, Duration::from_secs(600));
        let first = signer.sign().unwrap();
        let second = signer.sign().unwrap();
        assert!(second.serial > first.serial);
        for s in [first, second] {
            let (conf, _) = verify_with_digest(&s.bytes, std::slice::from_ref(&anchor)).unwrap();
            assert_eq!(conf.serial, s.serial);
        }
    }

    /// Every document announces the signing key, and the announced ones
    /// after it, once each.
    #[test]
    fn documents_announce_the_signing_key_and_the_next() {
        let (federation, layout, key) = demo();
        let own = kopir_core::pki::load_certs(&layout.authority_cert()).unwrap();
        let (next, _) = kopir_core::pki::dev::signing_pair("next").unwrap();
        let next = CertificateDer::from(next);
        let mut signer = Signer::new(federation, key, Duration::from_secs(600))
            .announcing(&[next.clone(), own[0].clone()]);
        let anchor = VerifyingKey::load(&layout.authority_cert()).unwrap();
        let (conf, _) = verify_with_digest(&signer.sign().unwrap().bytes, &[anchor]).unwrap();
        assert_eq!(
            conf.authority_keys,
            [certs_to_pem(&own[..1]), certs_to_pem(&[next])]
        );
    }
}
