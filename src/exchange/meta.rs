//! The request metadata of one exchange (design.md, "One exchange", step 2),
//! parsed once into typed values: from the `kopir-*` headers on the client port,
//! and from the signed header on the peer port.

use http::HeaderMap;

use crate::{
    error::{Reason, Refusal},
    id::{Code, Subject, SubsystemId},
    proto::kopir::v1::RequestHeader,
};

/// Header names of the metadata an information system sends.
pub mod keys {
    /// Consumer subsystem id (required).
    pub const CLIENT: &str = "kopir-client";
    /// Provider subsystem id (required).
    pub const SERVICE: &str = "kopir-service";
    /// Purpose code (required).
    pub const PURPOSE: &str = "kopir-purpose";
    /// Data subject, `scheme:value` (required for personal data).
    pub const SUBJECT: &str = "kopir-subject";
    /// Consent token.
    pub const CONSENT: &str = "kopir-consent";
    /// The official acting.
    pub const USER: &str = "kopir-user";
    /// Correlation id; generated if absent.
    pub const REQUEST_ID: &str = crate::error::REQUEST_ID_KEY;
}

const USER_MAX: usize = 256;
const CONSENT_MAX: usize = 8192;
const METHOD_MAX: usize = 256;

/// Everything the security path knows about a request besides its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallMeta {
    /// Correlation id, unique per client.
    pub request_id: String,
    /// Consumer subsystem.
    pub client: SubsystemId,
    /// Provider subsystem.
    pub service: SubsystemId,
    /// gRPC method path, `/package.Service/Method`.
    pub method: String,
    /// Purpose code.
    pub purpose: Code,
    /// Data subject.
    pub subject: Option<Subject>,
    /// Consent token.
    pub consent: Option<String>,
    /// The official acting.
    pub user: Option<String>,
}

fn invalid(key: &str, why: impl std::fmt::Display) -> Refusal {
    Refusal::new(Reason::MetadataInvalid, format!("{key}: {why}"))
}

/// Checks a gRPC method path: `/package.Service/Method`.
pub fn check_method(method: &str) -> Result<(), Refusal> {
    let ok = method.len() <= METHOD_MAX
        && method
            .strip_prefix('/')
            .and_then(|m| m.split_once('/'))
            .is_some_and(|(svc, m)| {
                let part = |s: &str| {
                    !s.is_empty()
                        && s.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
                };
                part(svc) && part(m) && !m.contains('.')
            });
    if ok {
        Ok(())
    } else {
        Err(Refusal::new(
            Reason::MethodUnsupported,
            format!("{method:?} is not a gRPC method path /package.Service/Method"),
        ))
    }
}

fn check_text(key: &str, value: &str, max: usize) -> Result<(), Refusal> {
    if value.len() > max {
        return Err(invalid(key, format!("longer than {max} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(key, "contains control characters"));
    }
    Ok(())
}

/// Parses the optional and required fields shared by both sources.
#[allow(clippy::too_many_arguments)]
fn build(
    request_id: Option<&str>,
    client: Option<&str>,
    service: Option<&str>,
    method: &str,
    purpose: Option<&str>,
    subject: Option<&str>,
    consent: Option<&str>,
    user: Option<&str>,
) -> Result<CallMeta, Refusal> {
    let required = |key: &str, v: Option<&str>| {
        v.filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| Refusal::new(Reason::MetadataMissing, format!("{key} is required")))
    };
    let request_id = match request_id.filter(|s| !s.is_empty()) {
        Some(id) => Code::parse("request id", id)
            .map_err(|e| invalid(keys::REQUEST_ID, e))?
            .to_string(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let client = required(keys::CLIENT, client)?
        .parse()
        .map_err(|e| invalid(keys::CLIENT, e))?;
    let service = required(keys::SERVICE, service)?
        .parse()
        .map_err(|e| invalid(keys::SERVICE, e))?;
    check_method(method)?;
    let purpose = Code::parse("purpose", &required(keys::PURPOSE, purpose)?)
        .map_err(|e| invalid(keys::PURPOSE, e))?;
    let subject = subject
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|e| invalid(keys::SUBJECT, e)))
        .transpose()?;
    let consent = consent.filter(|s| !s.is_empty()).map(str::to_owned);
    if let Some(c) = &consent {
        check_text(keys::CONSENT, c, CONSENT_MAX)?;
    }
    let user = user.filter(|s| !s.is_empty()).map(str::to_owned);
    if let Some(u) = &user {
        check_text(keys::USER, u, USER_MAX)?;
    }
    Ok(CallMeta {
        request_id,
        client,
        service,
        method: method.to_owned(),
        purpose,
        subject,
        consent,
        user,
    })
}

impl CallMeta {
    /// Reads the `kopir-*` headers of a call on the client port.
    pub fn from_headers(method: &str, headers: &HeaderMap) -> Result<Self, Refusal> {
        let get = |key: &'static str| -> Result<Option<&str>, Refusal> {
            headers
                .get(key)
                .map(|v| v.to_str().map_err(|_| invalid(key, "not visible ASCII")))
                .transpose()
        };
        build(
            get(keys::REQUEST_ID)?,
            get(keys::CLIENT)?,
            get(keys::SERVICE)?,
            method,
            get(keys::PURPOSE)?,
            get(keys::SUBJECT)?,
            get(keys::CONSENT)?,
            get(keys::USER)?,
        )
    }

    /// Reads the signed header of a request on the peer port.
    pub fn from_header(h: &RequestHeader) -> Result<Self, Refusal> {
        if h.request_id.is_empty() {
            return Err(Refusal::new(
                Reason::MetadataMissing,
                "request_id is required",
            ));
        }
        build(
            Some(&h.request_id),
            Some(&h.client),
            Some(&h.service),
            &h.method,
            Some(&h.purpose),
            Some(&h.subject),
            Some(&h.consent),
            Some(&h.user),
        )
    }

    /// The header to sign for this call.
    pub fn to_header(&self, timestamp_ms: i64, body_sha256: [u8; 32]) -> RequestHeader {
        RequestHeader {
            request_id: self.request_id.clone(),
            client: self.client.to_string(),
            service: self.service.to_string(),
            method: self.method.clone(),
            purpose: self.purpose.to_string(),
            subject: self
                .subject
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            consent: self.consent.clone().unwrap_or_default(),
            user: self.user.clone().unwrap_or_default(),
            timestamp_ms,
            body_sha256: bytes::Bytes::copy_from_slice(&body_sha256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    const M: &str = "/kz.population.v1.PopulationRegistry/GetPerson";

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            (keys::CLIENT, "KZ/GOV/MLSPP/benefits"),
            (keys::SERVICE, "KZ/GOV/MOJ/population"),
            (keys::PURPOSE, "child-benefit"),
            (keys::SUBJECT, "iin:900101300126"),
        ]
    }

    #[test]
    fn parses_and_generates_request_id() {
        let meta = CallMeta::from_headers(M, &headers(&base())).unwrap();
        assert_eq!(meta.client.to_string(), "KZ/GOV/MLSPP/benefits");
        assert_eq!(meta.request_id.len(), 36);
        let header = meta.to_header(1, [0; 32]);
        assert_eq!(CallMeta::from_header(&header).unwrap(), meta);
    }

    #[test]
    fn refusals_name_the_header() {
        let mut missing = base();
        missing.retain(|(k, _)| *k != keys::PURPOSE);
        let r = CallMeta::from_headers(M, &headers(&missing)).unwrap_err();
        assert_eq!(r.reason, Reason::MetadataMissing);
        assert!(r.message.contains("kopir-purpose"));

        let mut bad = base();
        bad[3] = (keys::SUBJECT, "iin:900101300123");
        let r = CallMeta::from_headers(M, &headers(&bad)).unwrap_err();
        assert_eq!(r.reason, Reason::MetadataInvalid);
        assert!(r.message.contains("kopir-subject"), "{}", r.message);

        let r = CallMeta::from_headers("/nope", &headers(&base())).unwrap_err();
        assert_eq!(r.reason, Reason::MethodUnsupported);
    }
}
