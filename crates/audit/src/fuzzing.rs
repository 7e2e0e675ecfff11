//! Entry points for the fuzz targets (`fuzz/`, see docs/security.md, *Fuzzing*)
//! into parsers of outside bytes that are private to their modules. Every
//! other parser the targets reach is public already. Not part of kopir's
//! interface: hidden from the docs and free to change.

use crate::{record::StoredRecord, store::sqlite};

/// The records recovery reads from an embedded store's journal file holding
/// `bytes` (the chain of whole, well-hashed frames from its start).
pub fn journal_records(bytes: &[u8]) -> Vec<StoredRecord> {
    sqlite::records_in(bytes)
}

/// The journal frame an append writes for `record`; an error for a record
/// too large for a frame.
pub fn journal_frame(record: &StoredRecord) -> std::io::Result<Vec<u8>> {
    sqlite::frame_of(record)
}
