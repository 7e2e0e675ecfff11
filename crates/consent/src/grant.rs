//! A consent as the authority stores it (a *grant*), how a request to grant
//! one is checked at the edge, and which methods a grant covers.
//!
//! Methods are named exactly (`/kz.population.v1.PopulationRegistry/GetPerson`)
//! or by service (`kz.population.v1.PopulationRegistry/*`); a citizen never
//! grants "any method of any service".

use kopir_core::{
    error::{Reason, Refusal},
    globalconf::ConfView,
    id::{Code, Subject, SubsystemId},
};
use kopir_proto::v1::{Consent as ConsentMsg, GrantRequest};

/// The most methods one grant may name.
pub(crate) const MAX_METHODS: usize = 32;
/// The longest method pattern.
const METHOD_MAX: usize = 256;
/// The longest validity window a grant may have (five years).
pub(crate) const MAX_WINDOW_SECS: i64 = 5 * 366 * 24 * 3600;

/// One consent of a subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Its id (a random UUID); the `jti` of its tokens.
    pub id: String,
    /// Whose data.
    pub subject: Subject,
    /// The consumer subsystem allowed to read.
    pub client: SubsystemId,
    /// The provider subsystem.
    pub service: SubsystemId,
    /// Method patterns (see the module header), normalised.
    pub methods: Vec<String>,
    /// The purpose code.
    pub purpose: Code,
    /// Valid from (seconds since the Unix epoch, inclusive).
    pub not_before: i64,
    /// Valid until (seconds since the Unix epoch, exclusive).
    pub not_after: i64,
    /// The most uses allowed, if limited (at least 1).
    pub max_uses: Option<u32>,
    /// When it was granted (ms since the Unix epoch).
    pub granted_at_ms: i64,
    /// When it was revoked (ms since the Unix epoch), if it was.
    pub revoked_at_ms: Option<i64>,
}

fn invalid(message: impl Into<String>) -> Refusal {
    Refusal::new(Reason::ConsentRequestInvalid, message)
}

fn is_name(part: &str, dots: bool) -> bool {
    !part.is_empty()
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || (dots && b == b'.'))
}

/// Checks and normalises a method pattern: `/pkg.Service/Method` (exact) or
/// `pkg.Service/*` (every method of a service; a leading `/` is dropped).
pub(crate) fn method_pattern(text: &str) -> Result<String, String> {
    let bad = || {
        format!(
            "method {:?} must be /package.Service/Method or package.Service/*",
            text.chars().take(80).collect::<String>()
        )
    };
    if text.len() > METHOD_MAX {
        return Err(bad());
    }
    let body = text.strip_prefix('/').unwrap_or(text);
    let (service, method) = body.split_once('/').ok_or_else(bad)?;
    if !is_name(service, true) || service.starts_with('.') || service.ends_with('.') {
        return Err(bad());
    }
    if method == "*" {
        Ok(format!("{service}/*"))
    } else if is_name(method, false) && text.starts_with('/') {
        Ok(format!("/{service}/{method}"))
    } else {
        Err(bad())
    }
}

/// True if one of `patterns` (normalised by [`method_pattern`]) covers the
/// method path `method` (`/pkg.Service/Method`).
pub fn covers(patterns: &[String], method: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix("/*") {
        Some(service) => method
            .strip_prefix('/')
            .and_then(|m| m.split_once('/'))
            .is_some_and(|(svc, name)| svc == service && !name.is_empty()),
        None => p == method,
    })
}

fn parse<T: std::str::FromStr>(what: &str, text: &str) -> Result<T, Refusal>
where
    T::Err: std::fmt::Display,
{
    text.parse().map_err(|e| invalid(format!("{what}: {e}")))
}

impl Grant {
    /// Checks a grant request against the global configuration and makes the
    /// grant it asks for, with id `id`, at `now_ms`.
    pub(crate) fn from_request(
        req: &GrantRequest,
        view: &ConfView,
        id: String,
        now_ms: i64,
    ) -> Result<Self, Refusal> {
        let now = now_ms.div_euclid(1000);
        let subject: Subject = parse("subject", &req.subject)?;
        let client: SubsystemId = parse("client", &req.client)?;
        let service: SubsystemId = parse("service", &req.service)?;
        let purpose =
            Code::parse("purpose", &req.purpose).map_err(|e| invalid(format!("purpose: {e}")))?;
        if view.service(&client).is_none() {
            return Err(invalid(format!(
                "client {client} is not a subsystem in global configuration {}",
                view.serial()
            )));
        }
        if view.service(&service).is_none() {
            return Err(Refusal::new(
                Reason::ServiceUnknown,
                format!(
                    "service {service} is not a subsystem in global configuration {}",
                    view.serial()
                ),
            ));
        }
        if view.purpose(purpose.as_str()).is_none() {
            return Err(Refusal::new(
                Reason::PurposeUnknown,
                format!(
                    "purpose {purpose} is not in global configuration {}",
                    view.serial()
                ),
            ));
        }
        if !view.purpose_needs_consent(purpose.as_str()) {
            return Err(invalid(format!(
                "purpose {purpose} rests on a legal act, not on consent: no consent is needed or recorded for it"
            )));
        }
        if req.methods.is_empty() || req.methods.len() > MAX_METHODS {
            return Err(invalid(format!(
                "name between 1 and {MAX_METHODS} methods the consent covers"
            )));
        }
        let mut methods = req
            .methods
            .iter()
            .map(|m| method_pattern(m).map_err(invalid))
            .collect::<Result<Vec<_>, _>>()?;
        methods.sort();
        methods.dedup();
        let not_before = if req.not_before == 0 {
            now
        } else {
            req.not_before
        };
        if req.not_after <= not_before || req.not_after <= now {
            return Err(invalid(
                "not_after must be later than not_before and than now",
            ));
        }
        if req.not_after - not_before > MAX_WINDOW_SECS {
            return Err(invalid("a consent may last at most five years"));
        }
        Ok(Self {
            id,
            subject,
            client,
            service,
            methods,
            purpose,
            not_before,
            not_after: req.not_after,
            max_uses: (req.max_uses > 0).then_some(req.max_uses),
            granted_at_ms: now_ms,
            revoked_at_ms: None,
        })
    }

    /// The grant as a protobuf message.
    pub(crate) fn to_message(&self) -> ConsentMsg {
        ConsentMsg {
            id: self.id.clone(),
            subject: self.subject.to_string(),
            client: self.client.to_string(),
            service: self.service.to_string(),
            methods: self.methods.clone(),
            purpose: self.purpose.to_string(),
            not_before: self.not_before,
            not_after: self.not_after,
            max_uses: self.max_uses.unwrap_or(0),
            granted_at_ms: self.granted_at_ms,
            revoked_at_ms: self.revoked_at_ms.unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_patterns_are_checked_and_normalised() {
        assert_eq!(
            method_pattern("/kz.population.v1.PopulationRegistry/GetPerson").unwrap(),
            "/kz.population.v1.PopulationRegistry/GetPerson"
        );
        assert_eq!(
            method_pattern("/kz.population.v1.PopulationRegistry/*").unwrap(),
            "kz.population.v1.PopulationRegistry/*"
        );
        for bad in [
            "*",
            "/*",
            "kz.p.S/GetPerson",
            "/kz.p.S/Get/Person",
            "/kz.p.S/",
            "/.S/M",
            "/S./M",
            "/k z.S/M",
            "",
        ] {
            assert!(method_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn coverage() {
        let p = vec!["/a.S/Get".to_string(), "b.T/*".to_string()];
        assert!(covers(&p, "/a.S/Get"));
        assert!(!covers(&p, "/a.S/List"));
        assert!(covers(&p, "/b.T/Anything"));
        assert!(!covers(&p, "/b.TT/Anything"));
        assert!(!covers(&p, "/b.T/"));
        assert!(!covers(&p, "b.T/Anything"));
    }
}
