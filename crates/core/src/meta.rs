//! The request metadata of one exchange (design.md, "One exchange", step 2),
//! parsed once into typed values: from the `kopir-*` headers on the client port,
//! and from the signed header on the peer port.
//!
//! Besides who asks what for which purpose, a request may carry what the
//! subject's access report needs ([`Tracker`], after Estonia's Data Tracker):
//! the procedure it belongs to (`kopir-query-group`) and, for covert work, a
//! date until which it is hidden from the subject (`kopir-hide-until`, with
//! `kopir-hide-reason`). They are signed with the rest; whether a purpose
//! allows hiding is `kopir_server::policy::hiding`'s to say.

use http::HeaderMap;

use crate::{
    error::{Reason, Refusal},
    id::{Code, Subject, SubsystemId},
};
use kopir_proto::v1::RequestHeader;

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
    /// The procedure the read belongs to, e.g. one benefit claim (a code).
    pub const QUERY_GROUP: &str = "kopir-query-group";
    /// Covert work: hide the read from the subject until this date
    /// (`YYYY-MM-DD`, UTC midnight) or instant (RFC 3339).
    pub const HIDE_UNTIL: &str = "kopir-hide-until";
    /// Why the read is hidden (required with `kopir-hide-until`).
    pub const HIDE_REASON: &str = "kopir-hide-reason";
}

/// Longest `kopir-hide-reason`, bytes.
pub const HIDE_REASON_MAX: usize = 256;
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
    /// Query group and hiding, for the subject's access report.
    pub tracker: Tracker,
}

/// What the subject's access report needs of a request beyond the exchange
/// itself: the Data Tracker's query group and hidden-until.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracker {
    /// The procedure the read belongs to (`kopir-query-group`).
    pub query_group: Option<Code>,
    /// Covert work: until when and why the read is hidden from the subject.
    pub hidden: Option<Hidden>,
}

/// A read hidden from the subject's access report until a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hidden {
    /// Hidden before this instant, disclosed from it on (ms since the epoch).
    pub until_ms: i64,
    /// Why (disclosed with the read).
    pub reason: String,
}

/// Parses `kopir-hide-until`: a date `YYYY-MM-DD` (its midnight, UTC) or an
/// RFC 3339 instant; returns ms since the epoch.
pub fn parse_hide_until(text: &str) -> Result<i64, Refusal> {
    use time::{
        Date, OffsetDateTime, format_description::well_known::Rfc3339, macros::format_description,
    };
    let at = match Date::parse(text, format_description!("[year]-[month]-[day]")) {
        Ok(date) => date.midnight().assume_utc(),
        Err(_) => OffsetDateTime::parse(text, &Rfc3339).map_err(|_| {
            invalid(
                keys::HIDE_UNTIL,
                format!("{text:?} is neither a date YYYY-MM-DD nor an RFC 3339 time"),
            )
        })?,
    };
    let ms = i64::try_from(at.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| invalid(keys::HIDE_UNTIL, "out of range"))?;
    // The signed header says "not hidden" with 0, so an instant not after
    // the epoch (long past anyway) cannot be carried to the provider.
    if ms <= 0 {
        return Err(invalid(
            keys::HIDE_UNTIL,
            format!("{text:?} is not after 1970-01-01; name a date still to come"),
        ));
    }
    Ok(ms)
}

impl Tracker {
    /// Checks the fields given as text (`until` already parsed): a query
    /// group is a code, a hiding needs a reason and a reason needs a hiding.
    fn parse(
        query_group: Option<&str>,
        until_ms: Option<i64>,
        reason: Option<&str>,
    ) -> Result<Self, Refusal> {
        let query_group = query_group
            .filter(|s| !s.is_empty())
            .map(|g| Code::parse("query group", g).map_err(|e| invalid(keys::QUERY_GROUP, e)))
            .transpose()?;
        let reason = reason.filter(|s| !s.is_empty());
        if let Some(r) = reason {
            check_text(keys::HIDE_REASON, r, HIDE_REASON_MAX)?;
        }
        let hidden = match (until_ms, reason) {
            (None, None) => None,
            (Some(until_ms), Some(reason)) => Some(Hidden {
                until_ms,
                reason: reason.to_owned(),
            }),
            (Some(_), None) => {
                return Err(invalid(
                    keys::HIDE_REASON,
                    "a hidden read needs a reason: say why in kopir-hide-reason (it is disclosed with the read)",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    keys::HIDE_REASON,
                    "given without kopir-hide-until: name the date until which the read is hidden, or drop the reason",
                ));
            }
        };
        Ok(Self {
            query_group,
            hidden,
        })
    }
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
    tracker: Tracker,
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
        tracker,
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
        let until = get(keys::HIDE_UNTIL)?
            .filter(|s| !s.is_empty())
            .map(parse_hide_until)
            .transpose()?;
        let tracker = Tracker::parse(get(keys::QUERY_GROUP)?, until, get(keys::HIDE_REASON)?)?;
        build(
            get(keys::REQUEST_ID)?,
            get(keys::CLIENT)?,
            get(keys::SERVICE)?,
            method,
            get(keys::PURPOSE)?,
            get(keys::SUBJECT)?,
            get(keys::CONSENT)?,
            get(keys::USER)?,
            tracker,
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
        let tracker = Tracker::parse(
            Some(&h.query_group),
            (h.hidden_until_ms != 0).then_some(h.hidden_until_ms),
            Some(&h.hidden_reason),
        )?;
        build(
            Some(&h.request_id),
            Some(&h.client),
            Some(&h.service),
            &h.method,
            Some(&h.purpose),
            Some(&h.subject),
            Some(&h.consent),
            Some(&h.user),
            tracker,
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
            query_group: self
                .tracker
                .query_group
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            hidden_until_ms: self.tracker.hidden.as_ref().map_or(0, |h| h.until_ms),
            hidden_reason: self
                .tracker
                .hidden
                .as_ref()
                .map(|h| h.reason.clone())
                .unwrap_or_default(),
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

    #[test]
    fn query_group_and_hiding_round_trip_through_the_signed_header() {
        let mut pairs = base();
        pairs.push((keys::QUERY_GROUP, "claim-2026-17"));
        pairs.push((keys::HIDE_UNTIL, "2031-02-03"));
        pairs.push((keys::HIDE_REASON, "inquiry 17/2026, art. 12"));
        let meta = CallMeta::from_headers(M, &headers(&pairs)).unwrap();
        assert_eq!(
            meta.tracker.query_group.as_ref().map(Code::as_str),
            Some("claim-2026-17")
        );
        let hidden = meta.tracker.hidden.clone().unwrap();
        assert_eq!(hidden.until_ms, 1_927_843_200_000);
        assert_eq!(hidden.reason, "inquiry 17/2026, art. 12");
        let header = meta.to_header(1, [0; 32]);
        assert_eq!(header.hidden_until_ms, 1_927_843_200_000);
        assert_eq!(CallMeta::from_header(&header).unwrap(), meta);
        assert_eq!(
            parse_hide_until("2031-02-03T01:00:00+01:00").unwrap(),
            1_927_843_200_000
        );
        // 0 means "not hidden" in the signed header: the epoch and earlier
        // are refused rather than signed as something else.
        for early in ["1970-01-01", "1970-01-01T00:00:00.0004Z", "1969-12-31"] {
            let r = parse_hide_until(early).unwrap_err();
            assert_eq!(r.reason, Reason::MetadataInvalid, "{early}");
        }
    }

    #[test]
    fn control_characters_are_refused_in_ascii_and_beyond() {
        let header = CallMeta::from_headers(M, &headers(&base()))
            .unwrap()
            .to_header(1, [0; 32]);
        for (user, ok) in [
            ("Aigerim S.", true),
            ("Айгерим С.", true),
            ("Aigerim\x07", false),
            ("Ай\u{85}герим", false),
        ] {
            let h = RequestHeader {
                user: user.into(),
                ..header.clone()
            };
            match CallMeta::from_header(&h) {
                Ok(meta) => assert!(ok && meta.user.as_deref() == Some(user), "{user:?}"),
                Err(r) => {
                    assert!(!ok, "{user:?}: {}", r.message);
                    assert_eq!(r.reason, Reason::MetadataInvalid);
                    assert!(r.message.contains("control characters"), "{}", r.message);
                }
            }
        }
    }

    #[test]
    fn hiding_needs_a_date_and_a_reason() {
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut pairs = base();
            pairs.extend_from_slice(extra);
            CallMeta::from_headers(M, &headers(&pairs))
        };
        for bad in [
            vec![(keys::HIDE_UNTIL, "2031-02-03")],
            vec![(keys::HIDE_REASON, "inquiry")],
            vec![(keys::HIDE_UNTIL, "next week"), (keys::HIDE_REASON, "x")],
            vec![(keys::QUERY_GROUP, "claim 17")],
        ] {
            let r = with(&bad).unwrap_err();
            assert_eq!(r.reason, Reason::MetadataInvalid, "{bad:?}");
            assert!(r.message.contains("kopir-"), "{}", r.message);
        }
        let long = "x".repeat(HIDE_REASON_MAX + 1);
        let mut h = CallMeta::from_headers(M, &headers(&base()))
            .unwrap()
            .to_header(1, [0; 32]);
        h.hidden_until_ms = 1;
        h.hidden_reason = long;
        assert_eq!(
            CallMeta::from_header(&h).unwrap_err().reason,
            Reason::MetadataInvalid
        );
    }
}
