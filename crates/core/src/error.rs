//! Refusals: every reason kopir can refuse or fail an exchange for, its gRPC
//! code, and the one place where a refusal becomes a gRPC status with its
//! `kopir-error` trailer.

use std::fmt;

use tonic::{Code, Status, metadata::MetadataMap};

/// Trailer (or trailers-only header) that names the reason of a refusal.
pub const ERROR_KEY: &str = "kopir-error";
/// Header and trailer that carries the exchange's request id.
pub const REQUEST_ID_KEY: &str = "kopir-request-id";

macro_rules! reasons {
    ($($variant:ident = $text:literal => $code:ident, $doc:literal;)*) => {
        /// Why an exchange was refused or failed; the text is the `kopir-error` value.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Reason {
            $(#[doc = $doc] $variant,)*
        }

        impl Reason {
            /// All reasons, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The dotted reason sent in `kopir-error`.
            pub fn as_str(self) -> &'static str {
                match self { $(Reason::$variant => $text,)* }
            }

            /// The gRPC code a refusal for this reason carries.
            pub fn code(self) -> Code {
                match self { $(Reason::$variant => Code::$code,)* }
            }

            /// The reason named by a `kopir-error` value.
            pub fn parse(text: &str) -> Option<Reason> {
                match text { $($text => Some(Reason::$variant),)* _ => None }
            }
        }
    };
}

reasons! {
    MetadataMissing = "metadata.missing" => InvalidArgument, "A required `kopir-*` header is absent.";
    MetadataInvalid = "metadata.invalid" => InvalidArgument, "A `kopir-*` header is malformed (bad id, bad subject).";
    SubjectRequired = "subject.required" => InvalidArgument, "The service returns personal data and no subject was named.";
    PurposeUnknown = "purpose.unknown" => InvalidArgument, "The purpose is not in the global configuration.";
    ServiceUnknown = "service.unknown" => NotFound, "The provider subsystem is not in the global configuration, or has no server.";
    MethodUnsupported = "method.unsupported" => Unimplemented, "Not a unary, uncompressed gRPC call, or not offered by this server.";
    BodyTooLarge = "body.too_large" => ResourceExhausted, "The request or response body exceeds the configured limit.";
    BodyTimeout = "body.timeout" => DeadlineExceeded, "The request body did not arrive within `limits.body_read_timeout_ms` of its headers.";
    ClientCertificateMissing = "client.certificate_missing" => Unauthenticated, "The information system presented no TLS client certificate.";
    ClientUnknown = "client.unknown" => Unauthenticated, "The client subsystem is not registered on this security server.";
    ClientCertificateMismatch = "client.certificate_mismatch" => Unauthenticated, "The client certificate is not the one registered for that subsystem, or is expired.";
    PeerCertificateMissing = "peer.certificate_missing" => Unauthenticated, "A peer presented no TLS certificate.";
    PeerUnknown = "peer.unknown" => Unauthenticated, "The peer's TLS certificate is not one the global configuration lists for the client's member.";
    SignatureInvalid = "signature.invalid" => Unauthenticated, "The request signature does not verify (forged, or headers altered).";
    SignatureUnknownKey = "signature.unknown_key" => Unauthenticated, "The request is signed with a key the global configuration does not list for that member.";
    BodyDigestMismatch = "body.digest_mismatch" => Unauthenticated, "The body is not the one the signature covers (altered in transit).";
    TimestampOutOfWindow = "timestamp.out_of_window" => Unauthenticated, "The signed time is too far from the provider's clock.";
    RequestReplayed = "request.replayed" => AlreadyExists, "A request with this client and request id was already accepted.";
    AccessDenied = "access.denied" => PermissionDenied, "No access rule of the provider allows this client, service, method and purpose.";
    ConsentMissing = "consent.missing" => PermissionDenied, "The purpose requires the subject's consent and no consent token was given.";
    ConsentInvalid = "consent.invalid" => PermissionDenied, "The consent token cannot be accepted: malformed, forged, or signed by a key the global configuration does not list for the consent authority.";
    ConsentNotYetValid = "consent.not_yet_valid" => PermissionDenied, "The consent's validity window has not begun.";
    ConsentExpired = "consent.expired" => PermissionDenied, "The consent (or its token) has expired.";
    ConsentMismatch = "consent.mismatch" => PermissionDenied, "The consent is for another subject, client, service, method or purpose (the message names which).";
    ConsentRevoked = "consent.revoked" => PermissionDenied, "The subject revoked the consent.";
    ConsentExhausted = "consent.exhausted" => ResourceExhausted, "The consent's maximum number of uses is reached.";
    ConsentUnverified = "consent.unverified" => Unavailable, "The consent's revocation status is unknown: the provider has not heard from the consent authority recently, or cannot count the use.";
    ConsentNotFound = "consent.not_found" => NotFound, "The consent authority has no such consent for this subject or consumer.";
    ConsentCallerUnknown = "consent.caller_unknown" => PermissionDenied, "The consent authority does not accept the caller's TLS certificate for this call.";
    ConsentRequestInvalid = "consent.request_invalid" => InvalidArgument, "A request to the consent authority is malformed (bad id, empty methods, inverted window...).";
    ConsentStoreUnavailable = "consent.store_unavailable" => Unavailable, "The consent authority could not read or durably write its store.";
    GlobalconfInvalid = "globalconf.invalid" => FailedPrecondition, "The server has no usable global configuration: none obtained yet, or every copy offered was forged, malformed or rolled back.";
    GlobalconfStale = "globalconf.stale" => FailedPrecondition, "The server's copy of the global configuration has expired and no source gave a newer one.";
    ProviderUnavailable = "provider.unavailable" => Unavailable, "No server of the provider could be reached.";
    ProviderMaintenance = "provider.maintenance" => Unavailable, "Every server of the provider is announced in maintenance.";
    ProviderUntrusted = "provider.untrusted" => Unavailable, "The provider's server did not present the certificate the global configuration lists.";
    ResponseSignatureInvalid = "response.signature_invalid" => Internal, "The provider's response signature does not verify; the answer was withheld.";
    RegistryUnavailable = "registry.unavailable" => Unavailable, "The provider's registry could not be reached.";
    DeadlineExceeded = "deadline.exceeded" => DeadlineExceeded, "The call's deadline passed before an answer arrived.";
    RequestInvalid = "request.invalid" => InvalidArgument, "A management request is malformed, too large, or does not make a valid configuration (an untrusted or expired certificate, a server that exists...).";
    RequestUnauthorized = "request.unauthorized" => PermissionDenied, "A management request lacks a signature it needs (the member's current key, a new key's proof of possession) or was not submitted with the new server's TLS certificate.";
    RequestNotFound = "request.not_found" => NotFound, "The authority has no management request with that id.";
    RequestDecided = "request.decided" => FailedPrecondition, "The management request was already approved or rejected, or its id was used before.";
    AuditUnavailable = "audit.unavailable" => Unavailable, "The audit record could not be made durable; nothing was forwarded or released.";
    Overloaded = "server.overloaded" => ResourceExhausted, "The server is at capacity and shed the call.";
    OperatorUnknown = "operator.unknown" => Unauthenticated, "The admin port's caller presented no certificate, or one the server's `operators` does not list.";
    HidingNotAllowed = "hiding.not_allowed" => PermissionDenied, "The request asks to hide the read from its subject (`kopir-hide-until`), and its purpose does not allow covert reads, or not for that long.";
    ReportCallerUnknown = "report.caller_unknown" => PermissionDenied, "The access report's caller presented no TLS certificate, or one the global configuration does not list as a portal or auditor.";
    ReportAssertionInvalid = "report.assertion_invalid" => Unauthenticated, "The portal's assertion is missing, malformed, forged, expired, too long-lived or not signed by that portal's key.";
    ReportNotSubject = "report.not_subject" => PermissionDenied, "The portal asked for the report of a subject other than the one its assertion names.";
    ReportRequestInvalid = "report.request_invalid" => InvalidArgument, "An access-report request is malformed (bad subject, inverted time range).";
    Internal = "internal" => Internal, "An unexpected internal error.";
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: a reason and a message a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Refusal {
    /// The `kopir-error` reason: what the caller can act on.
    pub reason: Reason,
    /// What happened and what to do, in words.
    pub message: String,
    /// The gRPC code (normally the reason's; a relayed refusal keeps the provider's).
    pub code: Code,
}

impl Refusal {
    /// A refusal for `reason` with its usual gRPC code.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            code: reason.code(),
        }
    }

    /// The gRPC status for this refusal, with the `kopir-error` and
    /// `kopir-request-id` trailers. The only place a refusal meets the wire.
    pub fn to_status(&self, request_id: Option<&str>) -> Status {
        let mut md = MetadataMap::new();
        md.insert(
            ERROR_KEY,
            self.reason
                .as_str()
                .parse()
                .unwrap_or_else(|_| "internal".parse().expect("ascii")),
        );
        if let Some(id) = request_id.and_then(|id| id.parse().ok()) {
            md.insert(REQUEST_ID_KEY, id);
        }
        Status::with_metadata(self.code, self.message.clone(), md)
    }

    /// Reads a refusal back from a status that carries a `kopir-error` trailer.
    pub fn from_status(status: &Status) -> Option<Self> {
        let reason = status.metadata().get(ERROR_KEY)?.to_str().ok()?;
        Some(Self {
            reason: Reason::parse(reason)?,
            message: status.message().to_owned(),
            code: status.code(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.as_str()), "{r} twice");
            assert_eq!(Reason::parse(r.as_str()), Some(*r));
            assert_ne!(r.code(), Code::Ok);
        }
    }

    #[test]
    fn status_carries_reason_and_request_id() {
        let refusal = Refusal::new(Reason::AccessDenied, "no rule allows it");
        let status = refusal.to_status(Some("req-1"));
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.metadata().get(ERROR_KEY).unwrap(), "access.denied");
        assert_eq!(status.metadata().get(REQUEST_ID_KEY).unwrap(), "req-1");
        assert_eq!(Refusal::from_status(&status), Some(refusal));
    }
}
