//! Helpers shared by the end-to-end tests.

use tonic::{Code, Request, Status, metadata::MetadataValue};

use kopir::error::ERROR_KEY;

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
