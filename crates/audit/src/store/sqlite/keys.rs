//! The embedded store's key index: which records name a given subject
//! pseudonym, request id, client or service.
//!
//! Pseudonyms and request ids are random, and an ordinary index on them would
//! dirty one random page per record, which (written whole to the WAL at every
//! commit) costs more than everything else together. This index is instead
//! written in *sorted runs*, one per chunk of [`KEY_CHUNK`] records, each at
//! the end of the table, so its pages are written once and in order whatever
//! the log's size (a small LSM tree with one level).
//!
//! A run is kept as blocks: each row of `audit_key_blocks` holds up to
//! [`BLOCK_ENTRIES`] sorted keys of one kind, with the records that carry
//! them, in one blob of about a page, and its first and last key. (A row per
//! key cost the writer four B-tree inserts per record, a few microseconds
//! each, written in bursts after each chunk that held up every exchange in
//! flight.) A key is the first 8 bytes of the pseudonym, or of the SHA-256 of
//! the id; a query always checks the full value on the record itself.
//!
//! The writer gathers each record's keys as it appends it. Once a chunk is
//! complete, the upkeep thread sorts its keys into blocks ([`prepare`]), and
//! the writer writes a few blocks in each append transaction ([`write`]), so
//! that they ride on its commit. After a restart (or whenever the gathered
//! keys do not cover a chunk) the chunk's keys are read back from its records
//! instead. `audit_meta.keys_upto` says how far the runs reach; a query
//! probes each run newest first and scans the records after the last one.
//! The index is derived data, not part of the chain: `verify` never reads it.

use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use crate::{
    record::{Hash, hash_from_slice},
    store::{seq_from_db, seq_to_db},
};

/// The index's tables. `chunk` names a run by its last sequence number;
/// `block` is a block's place in the run's blocks of that kind.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_key_blocks (
    chunk INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    block INTEGER NOT NULL,
    first_key INTEGER NOT NULL,
    last_key INTEGER NOT NULL,
    entries BLOB NOT NULL,
    PRIMARY KEY (chunk, kind, block)
);
CREATE INDEX IF NOT EXISTS audit_key_blocks_last ON audit_key_blocks(chunk, kind, last_key);
CREATE TABLE IF NOT EXISTS audit_meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

/// Records per sorted chunk.
pub(crate) const KEY_CHUNK: u64 = 32_768;
/// Keys per block: 12 bytes each (the key, then how far the record lies
/// below the run's last sequence number), 3,840 bytes in all, so that a block
/// fills about one 4 KiB page without overflowing it.
const BLOCK_ENTRIES: usize = 320;
const ENTRY_BYTES: usize = 12;

/// What a key identifies; its number is `audit_key_blocks.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A subject pseudonym.
    Subject = 0,
    /// A request id.
    Request = 1,
    /// A client subsystem id.
    Client = 2,
    /// A provider subsystem id.
    Service = 3,
}

const KINDS: [Kind; 4] = [Kind::Subject, Kind::Request, Kind::Client, Kind::Service];

/// The keys of one record, by [`Kind`] (none for a record without subject).
type RecordKeys = [Option<i64>; KINDS.len()];

/// `(key, seq)` pairs by [`Kind`].
type ByKind = [Vec<(i64, u64)>; KINDS.len()];

/// Adds record `seq`'s keys to the lists of their kinds.
fn push(by_kind: &mut ByKind, seq: u64, keys: RecordKeys) {
    for (list, key) in by_kind.iter_mut().zip(keys) {
        if let Some(key) = key {
            list.push((key, seq));
        }
    }
}

/// Takes the pairs of records up to `end` from the front of `list` (in
/// record order).
fn drain_upto(list: &mut Vec<(i64, u64)>, end: u64) -> std::vec::Drain<'_, (i64, u64)> {
    let n = list.partition_point(|&(_, seq)| seq <= end);
    list.drain(..n)
}

/// The key of a subject pseudonym.
pub(super) fn subject_key(h: &Hash) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    i64::from_be_bytes(b)
}

/// The key of a request, client or service id.
pub(super) fn text_key(id: &str) -> i64 {
    subject_key(&kopir_core::pki::sha256(id.as_bytes()))
}

/// The keys of a record with these values.
pub(super) fn record_keys(
    subject: Option<&Hash>,
    request_id: &str,
    client: &str,
    service: &str,
) -> RecordKeys {
    [
        subject.map(subject_key),
        Some(text_key(request_id)),
        Some(text_key(client)),
        Some(text_key(service)),
    ]
}

/// The state of the index, shared by the writer and the upkeep thread.
#[derive(Debug)]
pub(super) struct Keys {
    /// `audit_meta.keys_upto`: records up to here are in the runs.
    pub(super) upto: u64,
    /// Records per chunk ([`KEY_CHUNK`], smaller in tests; at least 1).
    chunk: u64,
    /// The next run, sorted into blocks and being written.
    job: Option<Job>,
    /// The keys of the records appended since the last chunk taken.
    gathered: Gathered,
}

/// Blocks of one run being written by the writer, a few per append.
#[derive(Debug)]
struct Job {
    /// The run's last sequence number.
    end: u64,
    blocks: Vec<Block>,
    /// Blocks committed.
    done: usize,
    /// Blocks written in the transaction now open.
    pending: usize,
}

#[derive(Debug, PartialEq, Eq)]
struct Block {
    kind: Kind,
    /// Its place among the run's blocks of this kind.
    number: i64,
    first: i64,
    last: i64,
    entries: Vec<u8>,
}

/// Keys gathered by the writer, in record order.
#[derive(Debug, Default)]
struct Gathered {
    /// The first record gathered.
    from: u64,
    /// The record after the last one gathered (0: none yet).
    next: u64,
    by_kind: ByKind,
}

impl Keys {
    /// The index of a store whose runs reach `upto`.
    pub(super) fn new(upto: u64) -> Self {
        Self {
            upto,
            chunk: KEY_CHUNK,
            job: None,
            gathered: Gathered::default(),
        }
    }

    /// Forgets the gathered keys and any run in preparation, keeping how far
    /// the runs reach and the chunk size.
    fn reset(&mut self) {
        *self = Self {
            chunk: self.chunk,
            ..Self::new(self.upto)
        };
    }

    /// Sets how many records go into one chunk (at least one).
    #[cfg(test)]
    pub(super) fn set_chunk(&mut self, records: u64) {
        self.chunk = records.max(1);
    }

    /// The last record of the next run.
    fn next_end(&self) -> u64 {
        self.upto + self.chunk
    }

    /// True once the log ending at `head` holds a whole chunk beyond the
    /// next run: the writer then prepares that run itself.
    fn chunk_waiting(&self, head: u64) -> bool {
        head >= self.next_end() + self.chunk
    }

    /// Notes the keys of record `seq`, just committed. Records must come in
    /// order; after a gap, gathering starts over. At most three chunks are
    /// kept (should the runs fall behind, later chunks are read back).
    pub(super) fn gather(&mut self, seq: u64, keys: RecordKeys) {
        let g = &mut self.gathered;
        if seq != g.next || seq - g.from >= 3 * self.chunk {
            *g = Gathered {
                from: seq,
                next: seq,
                by_kind: ByKind::default(),
            };
        }
        push(&mut g.by_kind, seq, keys);
        g.next = seq + 1;
    }

    /// The transaction that carried the last blocks written committed.
    pub(super) fn settle(&mut self) {
        if let Some(job) = self.job.as_mut() {
            job.done += std::mem::take(&mut job.pending);
            if job.done == job.blocks.len() {
                self.upto = job.end;
                self.job = None;
            }
        }
    }

    /// The transaction that carried the last blocks written failed: the run
    /// is prepared again (from the records) and its blocks rewritten.
    pub(super) fn abandon(&mut self) {
        self.job = None;
    }

    /// True while a run is prepared and waiting to be written.
    #[cfg(test)]
    pub(super) fn prepared(&self) -> bool {
        self.job.is_some()
    }

    /// Takes the gathered keys of records `upto+1..=end`, if it holds them all.
    fn take(&mut self, end: u64) -> Option<ByKind> {
        let g = &mut self.gathered;
        if g.from != self.upto + 1 || g.next <= end {
            return None;
        }
        let taken = g
            .by_kind
            .each_mut()
            .map(|list| drain_upto(list, end).collect());
        g.from = end + 1;
        Some(taken)
    }

    /// Drops gathered keys of records up to `end` (read back instead).
    fn forget(&mut self, end: u64) {
        let g = &mut self.gathered;
        if g.from <= end {
            for list in &mut g.by_kind {
                drain_upto(list, end);
            }
            g.from = end + 1;
            g.next = g.next.max(g.from);
        }
    }
}

/// Locks the index's state. Should a thread have panicked while holding it,
/// the state it may have left half changed is started over from the runs in
/// the database: the keys of the chunks still to come are then read back
/// from their records.
pub(super) fn lock(keys: &Mutex<Keys>) -> Result<MutexGuard<'_, Keys>, rusqlite::Error> {
    Ok(super::relock(keys, "audit key index", Keys::reset))
}

/// `audit_meta.keys_upto`.
pub(super) fn keys_upto(conn: &Connection) -> Result<u64, rusqlite::Error> {
    conn.query_row(
        "SELECT value FROM audit_meta WHERE name = 'keys_upto'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|v| v.map(seq_from_db).unwrap_or(0))
}

/// Drops the key index of an older store (`audit_keys`, a row per key) and
/// starts the runs over: they are rebuilt, a chunk at a time, as records
/// are appended.
pub(super) fn drop_older_index(conn: &Connection) -> Result<(), rusqlite::Error> {
    let older: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_keys')",
        [],
        |r| r.get(0),
    )?;
    if older {
        conn.execute_batch(
            "BEGIN IMMEDIATE; DROP TABLE audit_keys; DELETE FROM audit_meta WHERE name = 'keys_upto'; COMMIT;",
        )?;
    }
    Ok(())
}

/// The keys of records `from..=end`, read back from the records.
fn read_back(conn: &Connection, from: u64, end: u64) -> Result<ByKind, rusqlite::Error> {
    let mut by_kind = ByKind::default();
    let mut stmt = conn.prepare_cached(
        "SELECT seq, subject, request_id, client, service FROM audit_records WHERE seq >= ?1 AND seq <= ?2",
    )?;
    let mut rows = stmt.query(params![seq_to_db(from), seq_to_db(end)])?;
    while let Some(r) = rows.next()? {
        let seq = seq_from_db(r.get(0)?);
        let subject = r.get_ref(1)?.as_blob_or_null()?.and_then(hash_from_slice);
        let keys = record_keys(
            subject.as_ref(),
            r.get_ref(2)?.as_str()?,
            r.get_ref(3)?.as_str()?,
            r.get_ref(4)?.as_str()?,
        );
        push(&mut by_kind, seq, keys);
    }
    Ok(by_kind)
}

/// Sorts the keys of the run ending at `end` into blocks.
fn blocks(end: u64, by_kind: ByKind) -> Vec<Block> {
    let mut out = Vec::new();
    for (kind, mut list) in KINDS.into_iter().zip(by_kind) {
        list.sort_unstable();
        for (number, part) in (0..).zip(list.chunks(BLOCK_ENTRIES)) {
            let mut entries = Vec::with_capacity(part.len() * ENTRY_BYTES);
            for &(key, seq) in part {
                let below = u32::try_from(end - seq).unwrap_or(u32::MAX);
                entries.extend_from_slice(&key.to_be_bytes());
                entries.extend_from_slice(&below.to_be_bytes());
            }
            out.push(Block {
                kind,
                number,
                first: part[0].0,
                last: part[part.len() - 1].0,
                entries,
            });
        }
    }
    out
}

/// The next run, from the gathered keys or else read back, once all its
/// records are in the log (`head` is the last one).
fn next_job(
    conn: &Connection,
    keys: &Mutex<Keys>,
    head: u64,
) -> Result<Option<Job>, rusqlite::Error> {
    let (upto, end, gathered) = {
        let mut k = lock(keys)?;
        let end = k.next_end();
        if k.job.is_some() || head < end {
            return Ok(None);
        }
        (k.upto, end, k.take(end))
    };
    let by_kind = match gathered {
        Some(by_kind) => by_kind,
        None => read_back(conn, upto + 1, end)?,
    };
    Ok(Some(Job {
        end,
        blocks: blocks(end, by_kind),
        done: 0,
        pending: 0,
    }))
}

/// Makes `job` the run being written, unless another one got there first.
fn install(k: &mut Keys, job: Job) {
    if k.job.is_none() && k.next_end() == job.end {
        k.forget(job.end);
        k.job = Some(job);
    }
}

/// Prepares the next run once a chunk is complete, on the calling thread
/// and connection (the upkeep thread's), so that the writer only writes it.
pub(super) fn prepare(conn: &Connection, keys: &Mutex<Keys>) -> Result<(), rusqlite::Error> {
    let head: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit_records", [], |r| {
        r.get(0)
    })?;
    prepare_at(conn, keys, seq_from_db(head))
}

/// Prepares and installs the next run if the log, ending at `head`, holds
/// all of it and none is being written.
fn prepare_at(conn: &Connection, keys: &Mutex<Keys>, head: u64) -> Result<(), rusqlite::Error> {
    if let Some(job) = next_job(conn, keys, head)? {
        install(&mut *lock(keys)?, job);
    }
    Ok(())
}

/// True if [`write`] has work once the log ends at `head`: blocks of a
/// prepared run to write, or the next run to prepare.
pub(super) fn due(keys: &Mutex<Keys>, head: u64) -> bool {
    lock(keys).map_or(true, |k| k.job.is_some() || k.chunk_waiting(head))
}

/// Writes the next blocks of the run being written, in the writer's open
/// transaction that appended `records` records up to `head`. The writer
/// prepares a run itself only once a whole chunk more is waiting (the
/// upkeep thread is missing, or cannot keep up).
pub(super) fn write(
    conn: &Connection,
    keys: &Mutex<Keys>,
    head: u64,
    records: usize,
) -> Result<(), rusqlite::Error> {
    let behind = {
        let k = lock(keys)?;
        k.job.is_none() && k.chunk_waiting(head)
    };
    if behind {
        prepare_at(conn, keys, head)?;
    }
    let mut k = lock(keys)?;
    let chunk = usize::try_from(k.chunk).unwrap_or(usize::MAX);
    let Some(job) = k.job.as_mut() else {
        return Ok(());
    };
    job.pending = 0;
    // At least one block, and twice as many as the records bring: the run
    // is written well before the next chunk is complete.
    let take = (2 * records * job.blocks.len())
        .div_ceil(chunk)
        .max(1)
        .min(job.blocks.len() - job.done);
    let last = job.done + take == job.blocks.len();
    let mut stmt = conn.prepare_cached(
        "INSERT OR IGNORE INTO audit_key_blocks (chunk, kind, block, first_key, last_key, entries) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let chunk = seq_to_db(job.end);
    for b in &job.blocks[job.done..job.done + take] {
        stmt.execute(params![
            chunk,
            b.kind as i64,
            b.number,
            b.first,
            b.last,
            b.entries
        ])?;
    }
    if last {
        conn.execute(
            "INSERT INTO audit_meta (name, value) VALUES ('keys_upto', ?1)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            params![chunk],
        )?;
    }
    // Counted as done once the enclosing transaction commits (`Keys::settle`).
    job.pending = take;
    Ok(())
}

/// The records of the run ending at `chunk` whose `kind` key is `key`,
/// newest first.
pub(super) fn seqs_in_run(
    conn: &Connection,
    chunk: i64,
    kind: Kind,
    key: i64,
) -> Result<Vec<i64>, rusqlite::Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT first_key, entries FROM audit_key_blocks WHERE chunk = ?1 AND kind = ?2 AND last_key >= ?3 ORDER BY last_key",
    )?;
    let mut rows = stmt.query(params![chunk, kind as i64, key])?;
    let mut seqs = Vec::new();
    // Blocks come in key order: those holding `key` first, then later ones.
    while let Some(r) = rows.next()? {
        if r.get::<_, i64>(0)? > key {
            break;
        }
        for e in r.get_ref(1)?.as_blob()?.chunks_exact(ENTRY_BYTES) {
            let (k, below) = e.split_at(8);
            if k == key.to_be_bytes() {
                let below = u32::from_be_bytes([below[0], below[1], below[2], below[3]]);
                seqs.push(chunk - i64::from(below));
            }
        }
    }
    seqs.sort_unstable_by(|a, b| b.cmp(a));
    Ok(seqs)
}

/// The last sequence number of the newest run at or below `seq`.
pub(super) fn run_at_or_below(conn: &Connection, seq: i64) -> Result<Option<i64>, rusqlite::Error> {
    conn.query_row(
        "SELECT MAX(chunk) FROM audit_key_blocks WHERE chunk <= ?1",
        params![seq],
        |r| r.get(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks hold each kind's keys in order, split at [`BLOCK_ENTRIES`],
    /// and give back every record that carries a key.
    #[test]
    fn blocks_sort_each_kind_and_split_it() {
        let end = 1000u64;
        let mut by_kind = ByKind::default();
        for seq in 1..=end {
            by_kind[Kind::Client as usize].push(((seq % 3) as i64 - 1, seq));
            by_kind[Kind::Request as usize].push((seq as i64 * 7919 % 1009, seq));
        }
        let blocks = blocks(end, by_kind);
        let clients: Vec<&Block> = blocks.iter().filter(|b| b.kind == Kind::Client).collect();
        assert_eq!(clients.len(), 1000usize.div_ceil(BLOCK_ENTRIES));
        assert_eq!(
            clients.iter().map(|b| b.number).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert!(clients.windows(2).all(|w| w[0].last <= w[1].first));
        assert_eq!((clients[0].first, clients[3].last), (-1, 1));
        assert!(
            blocks
                .iter()
                .all(|b| b.entries.len() <= BLOCK_ENTRIES * ENTRY_BYTES)
        );
        assert!(!blocks.iter().any(|b| b.kind == Kind::Subject));

        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        for b in &blocks {
            conn.execute(
                "INSERT INTO audit_key_blocks (chunk, kind, block, first_key, last_key, entries) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![end as i64, b.kind as i64, b.number, b.first, b.last, b.entries],
            )
            .unwrap();
        }
        for key in -1..=1i64 {
            let want: Vec<i64> = (1..=1000i64).rev().filter(|s| s % 3 - 1 == key).collect();
            assert_eq!(seqs_in_run(&conn, 1000, Kind::Client, key).unwrap(), want);
        }
        assert!(
            seqs_in_run(&conn, 1000, Kind::Client, 2)
                .unwrap()
                .is_empty()
        );
        assert!(
            seqs_in_run(&conn, 1000, Kind::Service, 0)
                .unwrap()
                .is_empty()
        );
        let key = 3 * 7919 % 1009;
        assert_eq!(seqs_in_run(&conn, 1000, Kind::Request, key).unwrap(), [3]);
    }

    /// The keys the writer gathers are those read back from the records.
    #[test]
    fn gathered_keys_are_those_read_back() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE audit_records (seq INTEGER PRIMARY KEY, subject BLOB, request_id TEXT, client TEXT, service TEXT)",
        )
        .unwrap();
        let mut keys = Keys::new(0);
        keys.set_chunk(16);
        for seq in 1..=20u64 {
            let subject = (seq % 5 != 0).then(|| kopir_core::pki::sha256(&seq.to_be_bytes()));
            let (request, client, service) =
                (format!("r{}", seq / 2), format!("c{}", seq % 3), "s");
            conn.execute(
                "INSERT INTO audit_records VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    seq as i64,
                    subject.map(|h| h.to_vec()),
                    request,
                    client,
                    service
                ],
            )
            .unwrap();
            keys.gather(
                seq,
                record_keys(subject.as_ref(), &request, &client, service),
            );
        }
        let gathered = keys.take(16).expect("all 16 records were gathered");
        assert_eq!(gathered, read_back(&conn, 1, 16).unwrap());
        assert_eq!(gathered[Kind::Subject as usize].len(), 13);
        assert_eq!(
            blocks(16, gathered),
            blocks(16, read_back(&conn, 1, 16).unwrap())
        );
    }

    /// Gathering starts over after a gap, and a chunk is taken from it only
    /// when it holds every record of that chunk.
    #[test]
    fn gathered_keys_cover_a_chunk_or_are_not_used() {
        let mut keys = Keys::new(0);
        keys.set_chunk(4);
        let k = |n: i64| [None, Some(n), Some(0), Some(0)];
        for seq in 2..=5 {
            keys.gather(seq, k(seq as i64));
        }
        // Record 1 was never gathered (the store was opened after it).
        assert!(keys.take(4).is_none());
        keys.forget(4);
        for seq in 6..=8 {
            keys.gather(seq, k(seq as i64));
        }
        keys.upto = 4;
        // Records 5..=8 are all there once 8 is.
        let taken = keys.take(8).expect("the chunk was gathered whole");
        assert_eq!(
            taken[Kind::Request as usize],
            [(5, 5), (6, 6), (7, 7), (8, 8)]
        );
        assert!(taken[Kind::Subject as usize].is_empty());
        // A gap starts gathering over.
        keys.gather(9, k(9));
        keys.gather(11, k(11));
        assert_eq!(keys.gathered.from, 11);
    }
}
