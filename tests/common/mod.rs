//! Helpers shared by the end-to-end tests.

use std::{path::Path, sync::Arc};

use tonic::{Code, Request, Status, metadata::MetadataValue};

use kopir_core::error::ERROR_KEY;
use kopir_pgtest::TempPostgres;
use kopir_testkit::federation::LocalFederation;

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
