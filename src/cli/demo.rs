//! `kopir demo`: the whole federation on loopback, and the child-birth benefit
//! life event run through it: the benefits system of the Ministry of Labour
//! pulls the parent and children from the population register (on a legal
//! basis), the parent's income and property (on the parent's consent, granted
//! through the portal), each through the security servers. Then an operator
//! reads one exchange's audit records from both servers' admin ports and
//! verifies both logs, the last citizen reads their access report through the
//! portal, revokes a consent, and the next read is refused.

use std::{path::PathBuf, time::Instant};

use tonic::{Request, metadata::MetadataValue, transport::Channel};

use kopir_core::{
    error::{Reason, Refusal},
    id::Iin,
};
use kopir_proto::v1::{
    AuditCheckpointRequest, AuditShowRequest, AuditVerifyRequest, RevokeRequest,
    audit_service_client::AuditServiceClient, consent_service_client::ConsentServiceClient,
};
use kopir_testkit::{
    federation::{BENEFITS, LocalFederation},
    proto::kz::{
        income::v1::{GetDeclaredIncomeRequest, income_registry_client::IncomeRegistryClient},
        population::v1::{
            GetPersonRequest, ListChildrenRequest,
            population_registry_client::PopulationRegistryClient,
        },
        realty::v1::{ListPropertiesRequest, realty_registry_client::RealtyRegistryClient},
    },
    registry::{LAST_TAX_YEAR, RegistryKind},
};

/// Arguments of `kopir demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Keep the federation running and print how to call it, until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
    /// How many citizens apply.
    #[arg(long, default_value_t = 3)]
    pub citizens: usize,
    /// Folder for the PKI, configurations and data (default: a temporary folder,
    /// or `kopir-demo` with --serve).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// The purpose of the income and real-estate reads, which rests on consent.
const MEANS_TEST: &str = "benefit-means-test";
const INCOME: &str = RegistryKind::Income.default_service_id();
const REALTY: &str = RegistryKind::Realty.default_service_id();

fn call<T>(message: T, service: &str, purpose: &str, iin: &Iin) -> Request<T> {
    let mut r = Request::new(message);
    let md = r.metadata_mut();
    let ascii = |s: &str| MetadataValue::try_from(s).expect("ascii id");
    md.insert("kopir-client", ascii(BENEFITS));
    md.insert("kopir-service", ascii(service));
    md.insert("kopir-purpose", ascii(purpose));
    md.insert("kopir-subject", ascii(&format!("iin:{iin}")));
    md.insert("kopir-user", ascii("benefits-officer-017"));
    md.insert("kopir-query-group", ascii(&format!("claim-{iin}")));
    r
}

/// `call`, with a consent token in `kopir-consent`.
fn with_consent<T>(
    message: T,
    service: &str,
    iin: &Iin,
    token: &str,
) -> anyhow::Result<Request<T>> {
    let mut r = call(message, service, MEANS_TEST, iin);
    r.metadata_mut()
        .insert("kopir-consent", MetadataValue::try_from(token)?);
    Ok(r)
}

/// A citizen's consents to the means test, as granted through the portal,
/// and the tokens the benefits system obtained for them.
struct Consents {
    income: (String, String),
    realty: (String, String),
}

/// The citizen grants, through the portal, consent to read their declared
/// income and their real estate for the means test (valid for a day); the
/// benefits system then asks the consent authority for the tokens.
async fn grant_consents(fed: &LocalFederation, iin: &Iin) -> anyhow::Result<Consents> {
    let subject = format!("iin:{iin}");
    let grant = |service, method| fed.benefits_consent(&subject, service, method, MEANS_TEST);
    let income = grant(INCOME, "/kz.income.v1.IncomeRegistry/GetDeclaredIncome").await?;
    let realty = grant(REALTY, "/kz.realty.v1.RealtyRegistry/ListProperties").await?;
    println!(
        "  consent     portal -> consent authority: income {} and real estate {} for {MEANS_TEST}, valid 24 h",
        income.0, realty.0
    );
    Ok(Consents { income, realty })
}

fn request_id<T>(r: &tonic::Response<T>) -> String {
    r.metadata()
        .get("kopir-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned()
}

/// Runs the life event for one citizen, printing each register's answer.
async fn life_event(
    channel: &Channel,
    iin: &Iin,
    consents: &Consents,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    let via = "MLSPP/ss1 -> MOJ/ss1";
    let t = Instant::now();
    let mut population = PopulationRegistryClient::new(channel.clone());
    let r = population
        .get_person(call(
            GetPersonRequest {
                iin: iin.to_string(),
            },
            "KZ/GOV/MOJ/population",
            "child-benefit",
            iin,
        ))
        .await?;
    ids.push(request_id(&r));
    let p = r.into_inner();
    println!(
        "  population  {via}  {:>6.2} ms  {} {} {}, born {}",
        t.elapsed().as_secs_f64() * 1e3,
        p.surname,
        p.given_name,
        p.patronymic,
        p.birth_date
    );
    let t = Instant::now();
    let children = population
        .list_children(call(
            ListChildrenRequest {
                iin: iin.to_string(),
            },
            "KZ/GOV/MOJ/population",
            "child-benefit",
            iin,
        ))
        .await?
        .into_inner()
        .children;
    println!(
        "  population  {via}  {:>6.2} ms  children: {}",
        t.elapsed().as_secs_f64() * 1e3,
        children
            .iter()
            .map(|c| format!("{} (born {})", c.given_name, c.birth_date))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let t = Instant::now();
    let income = IncomeRegistryClient::new(channel.clone())
        .get_declared_income(with_consent(
            GetDeclaredIncomeRequest {
                iin: iin.to_string(),
                year: LAST_TAX_YEAR,
            },
            INCOME,
            iin,
            &consents.income.1,
        )?)
        .await?
        .into_inner();
    println!(
        "  income      MLSPP/ss1 -> SRC/ss1  {:>6.2} ms  declared {} KZT in {} from {} source(s)",
        t.elapsed().as_secs_f64() * 1e3,
        income.total_tiyn / 100,
        income.year,
        income.sources.len()
    );
    let t = Instant::now();
    let props = RealtyRegistryClient::new(channel.clone())
        .list_properties(realty_request(iin, &consents.realty.1)?)
        .await?
        .into_inner()
        .properties;
    println!(
        "  realty      {via}  {:>6.2} ms  {} propert{}: {}",
        t.elapsed().as_secs_f64() * 1e3,
        props.len(),
        if props.len() == 1 { "y" } else { "ies" },
        props
            .iter()
            .map(|p| format!("{} m2 at {}", p.area_m2, p.address))
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok(ids)
}

fn realty_request(iin: &Iin, token: &str) -> anyhow::Result<Request<ListPropertiesRequest>> {
    with_consent(
        ListPropertiesRequest {
            iin: iin.to_string(),
        },
        REALTY,
        iin,
        token,
    )
}

impl Args {
    /// Runs the demo.
    pub async fn run(self) -> anyhow::Result<()> {
        let temp;
        let dir = match (&self.dir, self.serve) {
            (Some(d), _) => d.clone(),
            (None, true) => PathBuf::from("kopir-demo"),
            (None, false) => {
                temp = tempfile::tempdir()?;
                temp.path().to_path_buf()
            }
        };
        let stop = super::stop_signal();
        let started = Instant::now();
        let fed = LocalFederation::launch(&dir, &|_, _| {}).await?;
        println!(
            "federation up in {:.0} ms: 3 security servers (MLSPP, MOJ, SRC), 3 registries, global configuration signed by the authority ({})",
            started.elapsed().as_secs_f64() * 1e3,
            dir.display()
        );
        let channel = fed.client_channel("mlspp", BENEFITS).await?;
        if self.serve {
            print_how_to_call(&fed);
            stop.await;
            fed.shutdown().await;
            return Ok(());
        }
        let mut result = Ok(());
        let mut first_exchange = None;
        let mut last = None;
        for iin in fed.dataset.sample_parents(self.citizens) {
            println!("\nchild-birth benefit claim of iin:{iin}");
            let consents = match grant_consents(&fed, &iin).await {
                Ok(c) => c,
                Err(e) => {
                    println!("  FAILED: {e}");
                    result = Err(e);
                    continue;
                }
            };
            let t = Instant::now();
            match life_event(&channel, &iin, &consents).await {
                Ok(ids) => {
                    first_exchange = first_exchange.or(ids.into_iter().next());
                    println!(
                        "  all four registers answered in {:.2} ms; the citizen typed nothing the state already knew",
                        t.elapsed().as_secs_f64() * 1e3
                    )
                }
                Err(e) => {
                    println!("  FAILED: {e}");
                    result = Err(e);
                }
            }
            last = Some((iin, consents));
        }
        if let Some(id) = first_exchange
            && result.is_ok()
        {
            result = print_audit(&fed, &id).await;
        }
        if let Some((iin, consents)) = last
            && result.is_ok()
        {
            result = match print_access_report(&fed, &iin).await {
                Ok(()) => revoke_and_retry(&fed, &channel, &iin, &consents).await,
                Err(e) => Err(e),
            };
        }
        fed.shutdown().await;
        result
    }
}

/// What an operator sees of one exchange on both servers, over their admin
/// ports, and the verification of both logs.
async fn print_audit(fed: &LocalFederation, request_id: &str) -> anyhow::Result<()> {
    println!("\naudit trail of exchange {request_id}, as the operators of both servers see it:");
    let mut described = false;
    for node in ["mlspp", "moj"] {
        let mut audit = AuditServiceClient::new(fed.admin_channel(node).await?);
        // Sign a checkpoint now rather than at the next interval.
        audit.checkpoint(AuditCheckpointRequest::default()).await?;
        let shown = audit
            .show(AuditShowRequest {
                request_id: request_id.into(),
            })
            .await?
            .into_inner()
            .entries;
        for s in &shown {
            let Some(e) = &s.entry else { continue };
            if !described {
                println!(
                    "  {} called {} for {} (purpose {}, official {})",
                    e.client,
                    e.method,
                    e.service,
                    e.purpose,
                    e.user.as_deref().unwrap_or("-")
                );
                described = true;
            }
            println!(
                "  {node:<5} record {:<3} {:<8} {:<9} status {}  hash {}  in checkpoint {}  signature {}",
                e.seq,
                e.side,
                e.step,
                e.status,
                if s.hash_ok { "ok" } else { "MISMATCH" },
                s.checkpoint_seq,
                s.signature_detail,
            );
            if let Some(basis) = &e.basis {
                println!("                   basis {basis}");
            }
        }
        let report = audit
            .verify(AuditVerifyRequest::default())
            .await?
            .into_inner();
        println!(
            "  {node:<5} verify: {} ({} records, {} signed checkpoints)",
            if report.ok { "ok" } else { "FAILED" },
            report.records,
            report.checkpoints
        );
        if !report.ok {
            anyhow::bail!("the audit log of {node} does not verify");
        }
    }
    println!(
        "  the subject is kept only as a keyed pseudonym; with --dir DIR the logs stay, and `kopir audit show --config DIR/moj.toml {request_id}` shows the same"
    );
    Ok(())
}

/// The citizen revokes the real-estate consent through the portal; the next
/// real-estate read with the same token is refused with `consent.revoked`
/// once the revocation has reached MOJ's server (pushed, within seconds).
async fn revoke_and_retry(
    fed: &LocalFederation,
    channel: &Channel,
    iin: &Iin,
    consents: &Consents,
) -> anyhow::Result<()> {
    let (consent_id, token) = &consents.realty;
    println!("\niin:{iin} revokes consent {consent_id} (real estate) through the portal");
    let revoked = Instant::now();
    ConsentServiceClient::new(fed.consent_channel(fed.layout.portal())?)
        .revoke(RevokeRequest {
            subject: format!("iin:{iin}"),
            consent_id: consent_id.clone(),
        })
        .await?;
    let mut realty = RealtyRegistryClient::new(channel.clone());
    loop {
        match realty.list_properties(realty_request(iin, token)?).await {
            Err(status)
                if Refusal::from_status(&status).map(|r| r.reason)
                    == Some(Reason::ConsentRevoked) =>
            {
                println!(
                    "  the next real-estate read, {:.0} ms later: {:?} consent.revoked: {}",
                    revoked.elapsed().as_secs_f64() * 1e3,
                    status.code(),
                    status.message()
                );
                return Ok(());
            }
            Err(status) => anyhow::bail!("expected consent.revoked, got {status:?}"),
            Ok(_) if revoked.elapsed() < std::time::Duration::from_secs(5) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Ok(_) => anyhow::bail!("the revoked consent still allowed a read after 5 s"),
        }
    }
}

/// What the first citizen sees of their data's reads, through the portal,
/// assembled from every provider's security server.
async fn print_access_report(fed: &LocalFederation, iin: &Iin) -> anyhow::Result<()> {
    let subject = format!("iin:{iin}").parse()?;
    let report = fed
        .access_report(
            &subject,
            kopir_core::globalconf::model::ReaderRole::Portal,
            false,
        )
        .await?;
    println!(
        "
access report of iin:{iin}, as the citizen sees it through the portal ({} reads, from {}):",
        report.entries.len(),
        report
            .sources
            .iter()
            .map(|s| s.server.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for e in &report.entries {
        println!(
            "  {}  {} read {} of {} ({}), query {}",
            kopir_core::clock::rfc3339_ms(e.at_ms),
            e.consumer_subsystem,
            e.method.rsplit('/').next().unwrap_or_default(),
            e.provider_service,
            e.provider_member_name,
            e.query_id,
        );
        println!(
            "      for {} under {}; official {}; procedure {}",
            e.purpose,
            match (&e.legal_act, &e.consent_id) {
                (Some(act), _) => format!("the law ({act})"),
                (None, Some(id)) => format!("your consent {id}"),
                (None, None) => "-".into(),
            },
            e.user.as_deref().unwrap_or("-"),
            e.query_group.as_deref().unwrap_or("-"),
        );
    }
    if !report.complete() {
        anyhow::bail!("the access report is incomplete: {:?}", report.sources);
    }
    println!(
        "  the same with `kopir audit subject iin:{iin} --federation ...` (docs/access-report.md)"
    );
    Ok(())
}

/// Prints, once the federation is up, everything a caller needs, as aligned
/// `key  value` lines between `--- how to call ---` and `--- end ---`: a
/// person reads them, a program splits each line at its first run of spaces.
fn print_how_to_call(fed: &LocalFederation) {
    let line = |key: &str, value: &dyn std::fmt::Display| println!("{key:<24} {value}");
    let (cert, key) = fed.layout.client(&BENEFITS.parse().expect("valid id"));
    let (portal_cert, portal_key) = fed.layout.portal();
    let (signing_cert, signing_key) = fed.layout.portal_signing();
    println!("\n--- how to call ---");
    for (name, node) in &fed.nodes {
        line(&format!("{name}.client"), &node.server.client_addr);
        line(&format!("{name}.peer"), &node.server.peer_addr);
        if let Some(admin) = node.server.admin_addr {
            line(&format!("{name}.admin"), &admin);
        }
    }
    line(
        "consumer",
        &"mlspp (the benefits system calls mlspp.client)",
    );
    line("consent", &fed.consent_addr);
    line("ca", &fed.layout.ca_cert().display());
    line("client", &BENEFITS);
    line("client.cert", &cert.display());
    line("client.key", &key.display());
    line("portal.cert", &portal_cert.display());
    line("portal.key", &portal_key.display());
    line("portal.signing.cert", &signing_cert.display());
    line("portal.signing.key", &signing_key.display());
    line("globalconf", &fed.globalconf_path.display());
    line("service.population", &"KZ/GOV/MOJ/population");
    line("service.income", &INCOME);
    line("service.realty", &REALTY);
    line("purpose.law", &"child-benefit");
    line("purpose.consent", &MEANS_TEST);
    if let Some(iin) = fed.dataset.sample_parents(1).first() {
        line("subject", &format!("iin:{iin}"));
    }
    line(
        "proto",
        &"proto/ (kz/population, kz/income, kz/realty, kopir/v1)",
    );
    println!("--- end ---");
    println!("Press Ctrl-C to stop.");
}
