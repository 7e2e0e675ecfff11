//! Covert reads: whether a request may be hidden from its subject's access
//! report (`kopir-hide-until`), and for how long.
//!
//! A read may be hidden only for a purpose whose global configuration entry
//! allows covert reads (`covert.max_hidden_days`), never further ahead than
//! that, and only until a time still to come (a date already passed would
//! hide nothing and is most likely a mistake). The provider's server decides
//! (step 5 of its path, before the access rules); the consumer's server makes
//! the same check early, from the same global configuration.

use kopir_core::{
    error::{Reason, Refusal},
    globalconf::ConfView,
    meta::{CallMeta, keys},
};

/// A day in ms.
const DAY_MS: i64 = 86_400_000;

/// Allows the request's hiding, if any, at `now_ms`; refuses with
/// `hiding.not_allowed` when the purpose does not allow it or not that long,
/// and `metadata.invalid` when the date has already passed.
pub(crate) fn check(view: &ConfView, meta: &CallMeta, now_ms: i64) -> Result<(), Refusal> {
    let Some(hidden) = &meta.tracker.hidden else {
        return Ok(());
    };
    if hidden.until_ms <= now_ms {
        return Err(Refusal::new(
            Reason::MetadataInvalid,
            format!(
                "{}: {} has already passed, so the read would not be hidden; drop the header or name a later date",
                keys::HIDE_UNTIL,
                kopir_core::clock::rfc3339_ms(hidden.until_ms)
            ),
        ));
    }
    let purpose = meta.purpose.as_str();
    let Some(covert) = view.purpose(purpose).and_then(|p| p.covert.as_ref()) else {
        return Err(Refusal::new(
            Reason::HidingNotAllowed,
            format!(
                "purpose {purpose} does not allow covert reads: drop {} and {}, or use a purpose whose legal act allows covert work",
                keys::HIDE_UNTIL,
                keys::HIDE_REASON
            ),
        ));
    };
    let max_ms = i64::from(covert.max_hidden_days).saturating_mul(DAY_MS);
    if hidden.until_ms.saturating_sub(now_ms) > max_ms {
        return Err(Refusal::new(
            Reason::HidingNotAllowed,
            format!(
                "purpose {purpose} allows hiding a read for at most {} days, until {}; name an earlier date in {}",
                covert.max_hidden_days,
                kopir_core::clock::rfc3339_ms(now_ms.saturating_add(max_ms)),
                keys::HIDE_UNTIL
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kopir_core::{
        globalconf::model::{Basis, Covert, GlobalConf, Purpose},
        meta::Hidden,
    };

    fn view() -> ConfView {
        let now = time::OffsetDateTime::now_utc();
        let purpose = |code: &str, covert: Option<u32>| Purpose {
            code: code.parse().unwrap(),
            description: code.into(),
            basis: Basis::LegalAct { act: "law".into() },
            covert: covert.map(|max_hidden_days| Covert { max_hidden_days }),
        };
        ConfView::new(GlobalConf {
            instance: "KZ".into(),
            serial: 1,
            issued_at: now,
            expires_at: now + time::Duration::hours(1),
            trusted_cas: vec![],
            members: vec![],
            purposes: vec![purpose("open", None), purpose("inquiry", Some(30))],
            consent_authority: None,
            report_readers: vec![],
            authority_keys: vec![],
        })
        .unwrap()
    }

    fn meta(purpose: &str, until_ms: Option<i64>) -> CallMeta {
        CallMeta {
            request_id: "r".into(),
            client: "KZ/GOV/A/x".parse().unwrap(),
            service: "KZ/GOV/B/y".parse().unwrap(),
            method: "/p.S/M".into(),
            purpose: purpose.parse().unwrap(),
            subject: None,
            consent: None,
            user: None,
            tracker: kopir_core::meta::Tracker {
                query_group: None,
                hidden: until_ms.map(|until_ms| Hidden {
                    until_ms,
                    reason: "why".into(),
                }),
            },
        }
    }

    #[test]
    fn only_covert_purposes_hide_and_not_too_long() {
        let (view, now) = (view(), 1_800_000_000_000);
        check(&view, &meta("open", None), now).unwrap();
        check(&view, &meta("inquiry", Some(now + 30 * DAY_MS)), now).unwrap();
        let r = check(&view, &meta("open", Some(now + DAY_MS)), now).unwrap_err();
        assert_eq!(r.reason, Reason::HidingNotAllowed);
        assert!(
            r.message.contains("does not allow covert reads"),
            "{}",
            r.message
        );
        let r = check(&view, &meta("inquiry", Some(now + 30 * DAY_MS + 1)), now).unwrap_err();
        assert_eq!(r.reason, Reason::HidingNotAllowed);
        assert!(r.message.contains("at most 30 days"), "{}", r.message);
        let r = check(&view, &meta("inquiry", Some(now)), now).unwrap_err();
        assert_eq!(r.reason, Reason::MetadataInvalid);
        assert!(r.message.contains("already passed"), "{}", r.message);
    }
}
