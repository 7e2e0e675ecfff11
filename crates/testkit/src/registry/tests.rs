//! Tests of the synthetic data's invariants and of the three registries over
//! real sockets.

use std::{
    collections::{BTreeSet, HashSet},
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use tonic::Code;

use super::*;
use crate::proto::kz::{income::v1 as income, population::v1 as population, realty::v1 as realty};
use kopir_core::id::Iin;

/// The demo data set, generated once for all tests of this module.
fn demo() -> &'static Dataset {
    static DEMO: OnceLock<Dataset> = OnceLock::new();
    DEMO.get_or_init(Dataset::demo)
}

#[test]
fn same_seed_same_data_other_seed_other_data() {
    let a = Dataset::generate(7, 300);
    assert_eq!(a, Dataset::generate(7, 300));
    let b = Dataset::generate(8, 300);
    assert_ne!(a, b);
    assert_ne!(a.persons()[0].iin, b.persons()[0].iin);
    assert_eq!(a.seed(), 7);
}

#[test]
fn demo_size_and_speed() {
    let started = std::time::Instant::now();
    let data = Dataset::generate(DEFAULT_SEED, DEFAULT_FAMILIES);
    let took = started.elapsed();
    let n = data.persons().len();
    assert!((4_500..=5_500).contains(&n), "{n} persons");
    assert!(data.declarations().count() > 10_000);
    assert!(data.properties().len() > 1_000);
    // Generous for slow debug builds on a loaded machine.
    assert!(took.as_secs() < 5, "generation took {took:?}");
}

#[test]
fn iins_are_valid_unique_and_match_birth_date_and_sex() {
    let data = demo();
    let mut seen = HashSet::new();
    for p in data.persons() {
        let text = p.iin.to_string();
        assert_eq!(text.parse::<Iin>().as_ref(), Ok(&p.iin), "{text}");
        assert!(seen.insert(p.iin), "duplicate IIN {text}");
        let (y, m, d) = p.iin.birth_date();
        assert_eq!(
            (y, m, d),
            (
                p.birth_date.year(),
                u8::from(p.birth_date.month()),
                p.birth_date.day()
            )
        );
        assert_eq!(p.iin.is_female(), p.sex == Sex::Female, "{text}");
        assert!(p.birth_date <= REFERENCE_DATE);
        assert_eq!(data.person(&p.iin).map(|q| q.iin), Some(p.iin));
    }
}

#[test]
fn names_follow_sex() {
    for p in demo().persons() {
        let female_surname =
            p.surname.ends_with("ova") || p.surname.ends_with("eva") || p.surname.ends_with("ina");
        let (female_patronymic, male_patronymic) = (
            p.patronymic.ends_with("ovna") || p.patronymic.ends_with("kyzy"),
            p.patronymic.ends_with("ovich") || p.patronymic.ends_with("uly"),
        );
        match p.sex {
            Sex::Female => assert!(female_surname && female_patronymic, "{p:?}"),
            Sex::Male => assert!(!female_surname && male_patronymic, "{p:?}"),
        }
    }
}

#[test]
fn family_links_are_consistent() {
    let data = demo();
    let mut young_children = 0;
    for p in data.persons() {
        for (parent, sex) in [(p.mother, Sex::Female), (p.father, Sex::Male)] {
            let Some(parent) = parent else { continue };
            let parent = data.person(&parent).expect("parent is registered");
            assert_eq!(parent.sex, sex);
            assert!(parent.children.contains(&p.iin), "{} not listed", p.iin);
            assert!(parent.age_on(p.birth_date) >= 18, "parent too young");
        }
        let children = data.children(&p.iin).expect("known person");
        assert_eq!(children.len(), p.children.len());
        for pair in children.windows(2) {
            assert!(
                pair[0].birth_date >= pair[1].birth_date,
                "not youngest first"
            );
        }
        for child in children {
            assert!(child.mother == Some(p.iin) || child.father == Some(p.iin));
            if child.birth_date >= YOUNG_CHILD_BORN_FROM {
                young_children += 1;
            }
        }
    }
    assert!(
        young_children > 300,
        "only {young_children} young-child links"
    );
}

#[test]
fn declarations_add_up_and_are_plausible() {
    let data = demo();
    let mut kinds = HashSet::new();
    for d in data.declarations() {
        assert_eq!(
            d.total_tiyn,
            d.sources.iter().map(|s| s.amount_tiyn).sum::<i64>()
        );
        assert!(INCOME_YEARS.contains(&d.year));
        assert_eq!(d.filed_on.year(), d.year + 1);
        assert!(d.filed_on <= REFERENCE_DATE);
        let person = data.person(&d.iin).expect("declarant is registered");
        let year_end = time::Date::from_calendar_date(d.year, time::Month::December, 31).unwrap();
        let age = person.age_on(year_end);
        assert!(age >= 18, "declarant aged {age}");
        for s in &d.sources {
            kinds.insert(s.kind);
            assert!(s.amount_tiyn > 0, "{s:?}");
            assert!(
                s.payer_bin.is_empty()
                    || (s.payer_bin.len() == 12 && s.payer_bin.bytes().all(|b| b.is_ascii_digit())),
                "{s:?}"
            );
            if s.kind == IncomeKind::Entrepreneurship {
                assert_eq!(s.payer_bin, d.iin.to_string());
            }
            if s.kind == IncomeKind::Pension {
                assert!(age >= 61, "pension at {age}");
            }
        }
    }
    for kind in [
        IncomeKind::Salary,
        IncomeKind::Entrepreneurship,
        IncomeKind::Rent,
        IncomeKind::Pension,
        IncomeKind::Benefit,
    ] {
        assert!(kinds.contains(&kind), "no {kind:?} income in the data");
    }
}

#[test]
fn properties_have_unique_numbers_and_whole_shares() {
    let data = demo();
    let mut numbers = HashSet::new();
    let mut co_owned = 0;
    let mut kinds = HashSet::new();
    for p in data.properties() {
        assert!(
            numbers.insert(p.cadastral_number.clone()),
            "{}",
            p.cadastral_number
        );
        assert_eq!(p.cadastral_number.len(), 14, "{}", p.cadastral_number);
        assert!(p.area_m2 > 0.0);
        kinds.insert(p.kind);
        let den = p.owners[0].share_denominator;
        assert!(p.owners.iter().all(|o| o.share_denominator == den));
        assert_eq!(p.owners.iter().map(|o| o.share_numerator).sum::<u32>(), den);
        if p.owners.len() > 1 {
            co_owned += 1;
        }
        for o in &p.owners {
            let owner = data.person(&o.owner).expect("owner is registered");
            assert!(o.acquired_on > owner.birth_date && o.acquired_on <= REFERENCE_DATE);
            assert!(
                data.holdings(&o.owner)
                    .iter()
                    .any(|(q, _)| q.cadastral_number == p.cadastral_number)
            );
        }
    }
    assert!(co_owned > 100, "only {co_owned} co-owned properties");
    assert_eq!(kinds.len(), 5, "{kinds:?}");
}

#[test]
fn sample_parents_meet_the_demo_criteria() {
    let data = demo();
    let parents = data.sample_parents(20);
    assert_eq!(parents.len(), 20);
    assert_eq!(data.sample_parents(5), parents[..5]);
    let mut children = BTreeSet::new();
    for iin in &parents {
        assert!(data.is_demo_parent(iin));
        let person = data.person(iin).unwrap();
        assert!(person.children.iter().any(|c| {
            data.person(c)
                .is_some_and(|c| c.birth_date >= YOUNG_CHILD_BORN_FROM)
        }));
        assert!(
            data.declaration(iin, LAST_TAX_YEAR)
                .is_some_and(|d| d.total_tiyn > 0)
        );
        assert!(!data.holdings(iin).is_empty());
        for c in &person.children {
            assert!(children.insert(*c), "two parents of one family");
        }
    }
    // Another generation gives the same citizens.
    assert_eq!(Dataset::demo().sample_parents(20), parents);
}

/// A valid IIN that is not in the data set (nobody was born in 1900).
fn unknown_iin() -> Iin {
    (0..100)
        .find_map(|serial| Iin::from_parts(1900, 1, 1, false, serial))
        .unwrap()
}

fn any_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

#[tokio::test]
async fn registries_answer_over_grpc() {
    let data = Arc::new(demo().clone());
    let parent = data.sample_parents(1)[0];
    let person = data.person(&parent).unwrap().clone();
    let youngest = person.children[0];
    let nobody = unknown_iin().to_string();

    // Population.
    let pop = RegistryHandle::spawn(RegistryKind::Population, data.clone(), any_addr())
        .await
        .unwrap();
    assert_ne!(pop.addr().port(), 0);
    let mut client =
        population::population_registry_client::PopulationRegistryClient::connect(pop.uri())
            .await
            .unwrap();
    let got = client
        .get_person(population::GetPersonRequest {
            iin: parent.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.iin, parent.to_string());
    assert_eq!(got.surname, person.surname);
    assert_eq!(got.birth_date.len(), 10);
    assert_eq!(got.citizenship.len(), 3);
    assert!(got.registered_address.is_some());
    let kids = client
        .list_children(population::ListChildrenRequest {
            iin: parent.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .children;
    assert_eq!(kids.len(), person.children.len());
    assert_eq!(kids[0].iin, youngest.to_string());
    assert!(kids[0].mother_iin == got.iin || kids[0].father_iin == got.iin);
    let err = client
        .get_person(population::GetPersonRequest {
            iin: nobody.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    for bad in ["", "123", "900101300123", "90010130012x"] {
        let err = client
            .get_person(population::GetPersonRequest { iin: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
        assert!(err.message().contains("IIN"), "{}", err.message());
    }
    let err = client
        .list_children(population::ListChildrenRequest {
            iin: nobody.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Health and reflection.
    let channel = tonic::transport::Endpoint::from_shared(pop.uri())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", RegistryKind::Population.grpc_service_name()] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    let err = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: RegistryKind::Income.grpc_service_name().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let services = list_services(channel).await;
    assert!(
        services.contains(&RegistryKind::Population.grpc_service_name().to_owned()),
        "{services:?}"
    );
    assert!(
        !services.iter().any(|s| s.starts_with("kopir.")),
        "{services:?}"
    );
    pop.shutdown().await.unwrap();

    // Income.
    let inc = RegistryHandle::spawn(RegistryKind::Income, data.clone(), any_addr())
        .await
        .unwrap();
    let mut client = income::income_registry_client::IncomeRegistryClient::connect(inc.uri())
        .await
        .unwrap();
    let got = client
        .get_declared_income(income::GetDeclaredIncomeRequest {
            iin: parent.to_string(),
            year: LAST_TAX_YEAR,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.year, LAST_TAX_YEAR);
    assert!(got.total_tiyn > 0);
    assert_eq!(
        got.total_tiyn,
        got.sources.iter().map(|s| s.amount_tiyn).sum::<i64>()
    );
    for (iin, year, code) in [
        (youngest.to_string(), LAST_TAX_YEAR, Code::NotFound),
        (nobody.clone(), LAST_TAX_YEAR, Code::NotFound),
        (parent.to_string(), 2000, Code::NotFound),
        (parent.to_string(), LAST_TAX_YEAR + 1, Code::InvalidArgument),
        (parent.to_string(), 0, Code::InvalidArgument),
        ("900101300123".into(), LAST_TAX_YEAR, Code::InvalidArgument),
    ] {
        let err = client
            .get_declared_income(income::GetDeclaredIncomeRequest {
                iin: iin.clone(),
                year,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{iin} {year}: {err:?}");
    }
    inc.shutdown().await.unwrap();

    // Realty.
    let rea = RegistryHandle::spawn(RegistryKind::Realty, data.clone(), any_addr())
        .await
        .unwrap();
    let mut client = realty::realty_registry_client::RealtyRegistryClient::connect(rea.uri())
        .await
        .unwrap();
    let props = client
        .list_properties(realty::ListPropertiesRequest {
            iin: parent.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .properties;
    assert_eq!(props.len(), data.holdings(&parent).len());
    assert!(
        props
            .iter()
            .all(|p| p.share_denominator >= p.share_numerator && p.share_numerator > 0)
    );
    let none = client
        .list_properties(realty::ListPropertiesRequest { iin: nobody })
        .await
        .unwrap()
        .into_inner()
        .properties;
    assert!(none.is_empty());
    let err = client
        .list_properties(realty::ListPropertiesRequest { iin: "abc".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Dropping the handle stops the server as well.
    drop(rea);
}

/// The services a server lists through reflection v1.
async fn list_services(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// The demo citizens are part of the demo's script: a change to the generator
/// that moves them must be deliberate (update this list, the demo and the docs).
#[test]
fn demo_citizens_are_stable() {
    let parents: Vec<String> = demo()
        .sample_parents(3)
        .iter()
        .map(Iin::to_string)
        .collect();
    assert_eq!(parents, ["971125443866", "880708496319", "990731485282"]);
    assert_eq!(demo().persons().len(), 4_969);
}
