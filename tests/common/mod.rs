//! Helpers shared by the end-to-end tests.

use std::{path::Path, sync::Arc};

use tonic::{Code, Request, Status, metadata::MetadataValue};

use kopir_core::error::ERROR_KEY;
use kopir_pgtest::TempPostgres;
use kopir_testkit::{
    federation::{BENEFITS, LocalFederation},
    proto::kz::population::v1::{
        GetPersonRequest, population_registry_client::PopulationRegistryClient,
    },
};

pub mod edge;

/// A request carrying `message` and the given metadata.
pub fn with_meta<T>(message: T, pairs: &[(&'static str, &str)]) -> Request<T> {
    let mut r = Request::new(message);
    for (k, v) in pairs {
        r.metadata_mut()
            .insert(*k, MetadataValue::try_from(*v).unwrap());
    }
    r
}

/// The benefits system's GetPerson for `parent` with `purpose`, through the
/// security server at the other end of `channel`.
#[allow(dead_code)] // not every test binary calls through a process
pub async fn get_person(
    channel: &tonic::transport::Channel,
    parent: &str,
    purpose: &str,
) -> Result<(), Status> {
    let subject = format!("iin:{parent}");
    let request = with_meta(
        GetPersonRequest {
            iin: parent.to_owned(),
        },
        &[
            ("kopir-client", BENEFITS),
            ("kopir-service", "KZ/GOV/MOJ/population"),
            ("kopir-purpose", purpose),
            ("kopir-subject", &subject),
        ],
    );
    PopulationRegistryClient::new(channel.clone())
        .get_person(request)
        .await
        .map(drop)
}

/// Calls [`get_person`] (purpose `child-benefit`) until `done` says the
/// outcome is the awaited one, within 15 s; returns how long it took.
#[allow(dead_code)] // not every test binary waits for an outcome
pub async fn until(
    channel: &tonic::transport::Channel,
    parent: &str,
    done: impl Fn(&Result<(), Status>) -> bool,
) -> std::time::Duration {
    let started = std::time::Instant::now();
    loop {
        let outcome = get_person(channel, parent, "child-benefit").await;
        if done(&outcome) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "still {outcome:?} after 15 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Asserts a refusal's code, its `kopir-error` reason, and that it says why.
#[track_caller]
#[allow(dead_code)] // not every test binary checks a refusal
pub fn assert_refused(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "status: {status:?}");
    assert_eq!(
        status
            .metadata()
            .get(ERROR_KEY)
            .and_then(|v| v.to_str().ok()),
        Some(reason),
        "status: {status:?}"
    );
    assert!(!status.message().is_empty(), "a refusal says why");
}

/// The demo federation in `dir`, each server's audit log in a database of
/// its own in the shared throwaway PostgreSQL cluster if `postgres` (the
/// cluster handle is returned to be kept alive), else in the embedded store.
#[allow(dead_code)] // not every test binary launches a federation this way
pub async fn federation_with_audit_in(
    dir: &Path,
    postgres: bool,
) -> (LocalFederation, Option<Arc<TempPostgres>>) {
    let mut urls = Vec::new();
    let pg = if postgres {
        let pg = TempPostgres::shared().unwrap();
        for node in ["mlspp", "moj", "src"] {
            urls.push((node, pg.create_database().await.unwrap()));
        }
        Some(pg)
    } else {
        None
    };
    let fed = LocalFederation::launch(dir, &|name, config| {
        config.audit.database = urls
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, url)| url.clone());
    })
    .await
    .unwrap();
    (fed, pg)
}
