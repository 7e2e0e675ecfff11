//! The provider's local access rules (deny by default) and the basis on which a
//! purpose allows a pull, as X-Road keeps access rights on the provider's own
//! server rather than in the global configuration.

pub(crate) mod hiding;

use serde::{Deserialize, Serialize};

use kopir_core::{
    error::{Reason, Refusal},
    globalconf::{ConfView, model::Basis},
    id::{Code, SubsystemId},
    meta::CallMeta,
};

/// One rule: `client` may call `methods` of `service` for `purposes`.
///
/// ```toml
/// [[access]]
/// service = "KZ/GOV/MOJ/population"
/// client = "KZ/GOV/MLSPP/benefits"
/// methods = ["kz.population.v1.PopulationRegistry/*"]   # or exact "/pkg.Svc/Method", or "*"
/// purposes = ["child-benefit"]
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// The provider subsystem the rule is about.
    pub service: SubsystemId,
    /// The consumer subsystem it allows.
    pub client: SubsystemId,
    /// Method patterns: `*`, `package.Service/*`, or a full method path.
    pub methods: Vec<String>,
    /// Purpose codes it allows.
    pub purposes: Vec<Code>,
}

fn method_matches(pattern: &str, method: &str) -> bool {
    let pattern = pattern.trim_start_matches('/');
    let method = method.trim_start_matches('/');
    match pattern.strip_suffix("/*") {
        _ if pattern == "*" => true,
        Some(service) => method
            .split_once('/')
            .is_some_and(|(svc, _)| svc == service),
        None => pattern == method,
    }
}

/// The set of rules of one server.
#[derive(Debug, Clone, Default)]
pub(crate) struct AccessPolicy {
    rules: Vec<AccessRule>,
}

impl AccessPolicy {
    /// A policy from its rules.
    pub(crate) fn new(rules: Vec<AccessRule>) -> Self {
        Self { rules }
    }

    /// How many rules it has.
    pub(crate) fn len(&self) -> usize {
        self.rules.len()
    }

    /// Allows the call if some rule covers its client, service, method and
    /// purpose; refuses with `access.denied` otherwise.
    pub(crate) fn check(&self, meta: &CallMeta) -> Result<(), Refusal> {
        let allowed = self.rules.iter().any(|r| {
            r.service == meta.service
                && r.client == meta.client
                && r.purposes.contains(&meta.purpose)
                && r.methods.iter().any(|p| method_matches(p, &meta.method))
        });
        if allowed {
            Ok(())
        } else {
            Err(Refusal::new(
                Reason::AccessDenied,
                format!(
                    "no access rule of this server lets {} call {} on {} for purpose {}",
                    meta.client, meta.method, meta.service, meta.purpose
                ),
            ))
        }
    }
}

/// Checks what the call states about its purpose and subject against the
/// global configuration: the purpose exists, and a service that returns
/// personal data is told whose.
pub(crate) fn check_purpose_and_subject(
    view: &ConfView,
    meta: &CallMeta,
    personal_data: bool,
) -> Result<(), Refusal> {
    if view.purpose(meta.purpose.as_str()).is_none() {
        return Err(Refusal::new(
            Reason::PurposeUnknown,
            format!(
                "purpose {:?} is not in global configuration {}; use one of: {}",
                meta.purpose.as_str(),
                view.serial(),
                view.conf()
                    .purposes
                    .iter()
                    .map(|p| p.code.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    if personal_data && meta.subject.is_none() {
        return Err(Refusal::new(
            Reason::SubjectRequired,
            format!(
                "{} returns personal data: name the person in kopir-subject (e.g. iin:...)",
                meta.service
            ),
        ));
    }
    Ok(())
}

/// What the global configuration says allows a pull for the call's purpose:
/// a legal act, or the subject's consent (which the provider then checks with
/// its [`kopir_consent::ConsentVerifier`]).
pub(crate) fn basis<'v>(view: &'v ConfView, meta: &CallMeta) -> Result<&'v Basis, Refusal> {
    view.purpose(meta.purpose.as_str())
        .map(|p| &p.basis)
        .ok_or_else(|| {
            Refusal::new(
                Reason::PurposeUnknown,
                format!("purpose {} is unknown", meta.purpose),
            )
        })
}

/// The basis of a pull permitted by law, as the audit trail records it.
pub(crate) fn legal_basis(act: &str) -> String {
    format!("legal:{act}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_patterns() {
        let m = "/kz.population.v1.PopulationRegistry/GetPerson";
        assert!(method_matches("*", m));
        assert!(method_matches("kz.population.v1.PopulationRegistry/*", m));
        assert!(method_matches(
            "/kz.population.v1.PopulationRegistry/GetPerson",
            m
        ));
        assert!(!method_matches(
            "kz.population.v1.PopulationRegistry/ListChildren",
            m
        ));
        assert!(!method_matches("kz.population.v1.Population/*", m));
    }

    #[test]
    fn deny_by_default() {
        let meta = CallMeta {
            request_id: "r".into(),
            client: "KZ/GOV/A/x".parse().unwrap(),
            service: "KZ/GOV/B/y".parse().unwrap(),
            method: "/p.S/M".into(),
            purpose: "p".parse().unwrap(),
            subject: None,
            consent: None,
            user: None,
            tracker: Default::default(),
        };
        assert_eq!(
            AccessPolicy::default().check(&meta).unwrap_err().reason,
            Reason::AccessDenied
        );
        let rule = AccessRule {
            service: meta.service.clone(),
            client: meta.client.clone(),
            methods: vec!["p.S/*".into()],
            purposes: vec!["p".parse().unwrap()],
        };
        AccessPolicy::new(vec![rule.clone()]).check(&meta).unwrap();
        let other_purpose = AccessRule {
            purposes: vec!["q".parse().unwrap()],
            ..rule
        };
        assert!(AccessPolicy::new(vec![other_purpose]).check(&meta).is_err());
    }
}
