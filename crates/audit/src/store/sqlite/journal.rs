//! The embedded store's record journal: where an append becomes durable.
//!
//! An append writes its records as frames to a journal file and, for a
//! durable commit, syncs that file (`fdatasync`). That is one small write and
//! one sync, where a SQLite commit wrote two or three 4 KiB pages of the
//! table and its index to the WAL (and a checkpoint copied them again). The
//! store folds journaled records into SQLite in large transactions off the
//! exchange path ([`super::fold`]), and before every read, so that queries
//! see every record appended.
//!
//! # Files and frames
//!
//! Two files, `audit.journal-0` and `audit.journal-1`, are used in turn.
//! Appends go to the active one, from its start. Once it holds
//! [`FILE_MAX`] bytes, or when a fold comes, it is *sealed* (synced if it
//! holds unsynced frames) and the other file becomes active from its start.
//! A sealed file is reused only after its records are committed in SQLite.
//! Files grow in zero-filled steps and are then overwritten in place, so a
//! sync flushes data only: appending to a file would also write its size at
//! every sync. Each write covers whole 4 KiB pages (the last page's earlier
//! bytes are kept in memory), so that the kernel never has to read a page
//! back before it writes it. After a sync the next frames start on a fresh
//! page (the rest of the last one stays zeros), so that no write touches a
//! page that holds synced frames: a write torn by a power cut could damage
//! them.
//!
//! A frame is the magic `KJ01`, the length of the rest (u32, big-endian), the
//! record's hash, its canonical bytes (`record.rs`) as a length-prefixed
//! field, and the body (a stored body is outside the canonical bytes) as an
//! optional field of the same encoding.
//!
//! # Recovery
//!
//! At open each file is read from its start while its frames are whole, hash
//! to what they say, and each continues the chain of the one before (zeros
//! to the end of a page lead to the next page). The
//! frames that continue the chain past the database's last record are
//! returned to be written into SQLite before any new append. Anything else,
//! such as a torn last frame or an earlier round's leftovers, is ignored: a
//! leftover frame cannot continue the chain, because it was written before
//! the record it would have to follow. One process at a time writes a log: the
//! first file is locked while the journal is open.
//!
//! # Failures
//!
//! A write or sync that fails (a full disk, an I/O error) acknowledges
//! nothing of its append, and the journal takes no further append until it
//! has repaired the active file: the frames written since its last sync, of
//! which it keeps a copy of its own (after a failed `fdatasync` the kernel's
//! may be gone), are written again, the pages a failed write touched after
//! them are cleared, and the file is synced. Repairs are tried at appends and
//! at the folds' seals, [`RETRY_FIRST`] after the failure and then at doubling
//! waits up to [`RETRY_MAX`], so once the disk has room again appends resume
//! within about that long, without a restart. Meanwhile appends are refused
//! at once, with the failure's cause.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    record::{Entry, GENESIS, Hash, Link, StoredRecord, parse_canonical},
    store::Commit,
};

/// The start of every frame.
const MAGIC: [u8; 4] = *b"KJ01";
/// Writes cover whole pages of this size.
const PAGE: usize = 4096;
/// The active file is sealed once an append would take it past this size (a
/// batch larger than this still goes in, into an empty file).
pub(super) const FILE_MAX: u64 = 2 << 20;
/// Files grow by this much at a time, written with zeros.
const GROW_STEP: u64 = 1 << 20;
/// The room kept for the copy of unsynced frames after a sync (a durable
/// append at every exchange keeps it far smaller).
const UNSYNCED_KEPT: usize = 64 * 1024;
/// How many zeros are written at once when a file grows.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// A record in the journal and not yet in SQLite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Journaled {
    /// Its position in the log.
    pub(super) seq: u64,
    /// The hash of the record before it.
    pub(super) prev: Hash,
    /// Its own hash.
    pub(super) hash: Hash,
    /// Its content.
    pub(super) entry: Entry,
}

impl Journaled {
    /// Its place in the chain.
    pub(super) fn link(&self) -> Link {
        Link {
            seq: self.seq,
            hash: self.hash,
        }
    }
}

/// The journal files next to the database file `db` (`audit.db` gives
/// `audit.journal-0` and `audit.journal-1`).
fn paths(db: &Path) -> [PathBuf; 2] {
    let stem = db
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "audit".into());
    [0, 1].map(|i| db.with_file_name(format!("{stem}.journal-{i}")))
}

/// One of the two files.
struct Lap {
    file: Arc<File>,
    /// The file's size: zeros or frames up to here.
    len: u64,
    /// Where the next frame goes.
    offset: u64,
    /// Where the frames not yet synced begin (the start of a page): every
    /// frame before it is on stable storage.
    synced: u64,
    /// The frames from `synced` to `offset`, as written. The writer's own
    /// copy of what the file must hold there: after a failed write or sync
    /// the kernel's copy may be gone (a failed `fdatasync` may drop the dirty
    /// pages and report it once), so a repair writes them again from here.
    /// At most one file's worth: a sync empties it.
    unsynced: Vec<u8>,
    /// The end of the pages written since `synced`, including any write that
    /// failed or was rewound: what a repair clears after the frames.
    dirty_end: u64,
}

impl Lap {
    fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            file: Arc::new(file),
            len,
            offset: 0,
            synced: 0,
            unsynced: Vec::new(),
            dirty_end: 0,
        })
    }

    /// Starts the file over from its start (it becomes the active one).
    fn restart(&mut self) {
        self.offset = 0;
        self.synced = 0;
        self.unsynced.clear();
        self.unsynced.shrink_to(UNSYNCED_KEPT);
        self.dirty_end = 0;
    }

    /// Grows the file with zeros, a step at a time, until it holds `end`
    /// bytes.
    fn grow_to(&mut self, end: u64) -> io::Result<()> {
        while self.len < end {
            let grow = GROW_STEP.min(end.next_multiple_of(GROW_STEP) - self.len);
            write_zeros(&self.file, self.len, self.len + grow)?;
            self.len += grow;
        }
        Ok(())
    }

    /// Writes `frames` at `offset`, in whole pages, growing the file first if
    /// they go past its end. `buf` is scratch space.
    fn write(&mut self, frames: &[u8], buf: &mut Vec<u8>) -> io::Result<()> {
        let end = self.offset + frames.len() as u64;
        self.grow_to(end)?;
        // The page `offset` is in starts at or after `synced` (a page start).
        let page_start = self.offset - self.offset % PAGE as u64;
        let kept = usize::try_from(page_start - self.synced).unwrap_or(0);
        buf.clear();
        buf.extend_from_slice(self.unsynced.get(kept..).unwrap_or_default());
        buf.extend_from_slice(frames);
        buf.resize(buf.len().next_multiple_of(PAGE), 0);
        self.dirty_end = self.dirty_end.max(page_start + buf.len() as u64);
        self.file.write_all_at(buf, page_start)?;
        self.unsynced.extend_from_slice(frames);
        self.offset = end;
        Ok(())
    }

    /// Syncs what was written. The next frames then start on a fresh page,
    /// so that no later write rewrites a page holding synced frames (a
    /// write torn by a power cut could otherwise damage them).
    fn sync(&mut self) -> io::Result<()> {
        if !self.unsynced.is_empty() {
            self.file.sync_data()?;
            self.settle();
        }
        Ok(())
    }

    /// Every frame written is synced: the next go on from a fresh page.
    fn settle(&mut self) {
        self.offset = self.offset.next_multiple_of(PAGE as u64);
        self.synced = self.offset;
        self.unsynced.clear();
        // A burst of written-only appends may have made the copy large; a
        // server keeps no more than this between syncs as a rule.
        self.unsynced.shrink_to(UNSYNCED_KEPT);
        self.dirty_end = self.offset;
    }

    /// Where the next frame goes, to come back to if a write must be undone.
    fn mark(&self) -> (u64, usize) {
        (self.offset, self.unsynced.len())
    }

    /// Forgets the frames written since `mark` (whose sync failed): frames
    /// go on from there. Their pages stay dirty until [`Lap::repair`] clears
    /// them.
    fn rewind(&mut self, (offset, unsynced): (u64, usize)) {
        self.offset = offset;
        self.unsynced.truncate(unsynced);
    }

    /// Makes the file hold again exactly what was acknowledged, after a write
    /// or sync failed: the unsynced frames are written again from memory,
    /// the pages after them that a failed or rewound write touched are
    /// cleared (so that a restart does not take in frames nobody was told
    /// were written), and the file is synced. Every frame is then on stable
    /// storage, and the next go on from a fresh page.
    fn repair(&mut self) -> io::Result<()> {
        let mut pages = std::mem::take(&mut self.unsynced);
        let frames = pages.len();
        pages.resize(frames.next_multiple_of(PAGE), 0);
        let rewritten = self.file.write_all_at(&pages, self.synced);
        let clean_from = self.synced + pages.len() as u64;
        pages.truncate(frames);
        self.unsynced = pages;
        rewritten?;
        write_zeros(&self.file, clean_from, self.dirty_end.min(self.len))?;
        self.file.sync_data()?;
        self.settle();
        Ok(())
    }

    /// The chain of frames this file holds from its start.
    fn read_frames(&self) -> io::Result<Vec<Journaled>> {
        read_chain(&self.file, self.len)
    }
}

/// Writes zeros over `from..to` of `file`.
fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    let mut at = from;
    while at < to {
        let n = ZEROS
            .len()
            .min(usize::try_from(to - at).unwrap_or(ZEROS.len()));
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// The chain of frames in the first `len` bytes of `file`: frames follow one
/// another, except that after a sync the rest of the page is zeros and the
/// next frame starts on the next page.
fn read_chain(file: &File, len: u64) -> io::Result<Vec<Journaled>> {
    let mut bytes = vec![0; usize::try_from(len).unwrap_or(0)];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(chain_in(&bytes))
}

/// The chain of frames at the start of `bytes` (a journal file's contents),
/// as [`read_chain`] reads it.
fn chain_in(bytes: &[u8]) -> Vec<Journaled> {
    let mut out: Vec<Journaled> = Vec::new();
    let mut at = 0;
    loop {
        let Some((frame, used)) = parse_frame(&bytes[at..]) else {
            let next = at.next_multiple_of(PAGE).min(bytes.len());
            if next == at || bytes[at..next].iter().any(|&b| b != 0) {
                break;
            }
            at = next;
            continue;
        };
        if let Some(last) = out.last()
            && (last.seq.checked_add(1) != Some(frame.seq) || frame.prev != last.hash)
        {
            break;
        }
        out.push(frame);
        at += used;
    }
    out
}

/// The records recovery reads from a journal file holding `bytes`, as
/// stored records (what the journal fuzz target checks).
pub(crate) fn records_in(bytes: &[u8]) -> Vec<StoredRecord> {
    chain_in(bytes)
        .into_iter()
        .map(|j| StoredRecord {
            seq: j.seq,
            prev_hash: j.prev,
            hash: j.hash,
            entry: j.entry,
        })
        .collect()
}

/// The frame an append writes for `record` (its stored hash is not used:
/// the frame carries the hash of its canonical bytes).
pub(crate) fn frame_of(record: &StoredRecord) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    encode(&mut out, record.seq, &record.prev_hash, &record.entry)?;
    Ok(out)
}

/// A sealed file: what a fold writes into SQLite.
pub(super) struct Sealed {
    file: Arc<File>,
    /// The bytes its frames take (with the padding after syncs).
    len: u64,
    /// How many records they hold.
    records: usize,
}

impl Sealed {
    /// Reads its records back (from the page cache, as a rule: they were
    /// written moments ago). They are not kept in memory meanwhile, so a
    /// server's memory does not grow with the records waiting for a fold.
    /// An error if the file no longer holds what was written to it.
    pub(super) fn records(&self) -> io::Result<Vec<Journaled>> {
        let records = read_chain(&self.file, self.len)?;
        if records.len() != self.records {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a journal file was changed behind the server's back: {} of {} records read back",
                    records.len(),
                    self.records
                ),
            ));
        }
        Ok(records)
    }
}

/// The two files, and how many records each holds that SQLite does not.
pub(super) struct Journal {
    laps: [Lap; 2],
    /// Which file appends go to.
    active: usize,
    /// The last record appended (the log's head).
    head: Option<Link>,
    /// How many records the active file holds.
    pending: usize,
    /// How many records the other file holds, once sealed, until SQLite
    /// has them.
    sealed: Option<usize>,
    /// Scratch space: frames, and the pages that carry them.
    frames: Vec<u8>,
    pages: Vec<u8>,
    /// Set when a write or sync failed (a full disk, an I/O error): the
    /// active file may not hold what was acknowledged, so no append goes in
    /// until [`Lap::repair`] has made it do so again. Repairs are tried at
    /// appends and seals, no sooner than its `retry_at`.
    failed: Option<Failure>,
    /// The wait before the next repair: doubled at each failure from
    /// [`RETRY_FIRST`] up to [`RETRY_MAX`], started over by an append that
    /// goes in.
    backoff: Duration,
}

/// The wait before the first repair after a failed write.
const RETRY_FIRST: Duration = Duration::from_millis(10);
/// The longest wait between repairs: once the disk has room again, appends
/// resume within about this long.
const RETRY_MAX: Duration = Duration::from_millis(500);

/// A write or sync that failed, and when to try a repair.
#[derive(Debug)]
struct Failure {
    why: String,
    retry_at: Instant,
}

/// Why the journal could not be opened.
#[derive(Debug)]
pub(super) enum OpenError {
    /// Another process has it open (and writes the log).
    InUse,
    /// The files could not be opened or read.
    Io(io::Error),
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> Self {
        OpenError::Io(e)
    }
}

impl Journal {
    /// Opens (creating) the journal of the database file `db` and locks it
    /// for this process. Before the first append, [`Journal::recover`].
    pub(super) fn lock(db: &Path) -> Result<Self, OpenError> {
        let [first, second] = paths(db);
        let laps = [Lap::open(&first)?, Lap::open(&second)?];
        match laps[0].file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(OpenError::InUse),
            Err(TryLockError::Error(e)) => return Err(e.into()),
        }
        // The files' names are durable too.
        if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(Self {
            laps,
            active: 0,
            head: None,
            pending: 0,
            sealed: None,
            frames: Vec::new(),
            pages: Vec::new(),
            failed: None,
            backoff: Duration::ZERO,
        })
    }

    /// The records the files hold after `head`, the database's last record
    /// (read once the journal is locked, so no other writer moves it): they
    /// must be in SQLite before the first append, which overwrites the first
    /// file. Appends then go on after them.
    pub(super) fn recover(&mut self, head: Option<Link>) -> io::Result<Vec<Journaled>> {
        let segments = [self.laps[0].read_frames()?, self.laps[1].read_frames()?];
        let recovered = continuation(&segments, head);
        self.head = recovered.last().map(Journaled::link).or(head);
        Ok(recovered)
    }

    /// The last record appended.
    #[cfg(test)]
    pub(super) fn head(&self) -> Option<Link> {
        self.head
    }

    /// True if every record appended is in SQLite.
    pub(super) fn is_empty(&self) -> bool {
        self.pending == 0 && self.sealed.is_none()
    }

    /// Appends `entries` (taken on success) after the head, synced if
    /// `commit` is durable. `None` if there is no room: the active file is
    /// full and the other one is still sealed (fold, then try again). On an
    /// error nothing was appended, and later appends wait for a repair of
    /// the file (retried with a growing wait, at most [`RETRY_MAX`]).
    pub(super) fn append(
        &mut self,
        entries: &mut Vec<Entry>,
        commit: Commit,
    ) -> io::Result<Option<Vec<Link>>> {
        self.ready()?;
        // Chained here rather than with `record::chain`: each record's
        // canonical bytes are built once, in its frame, and hashed there.
        let (mut seq, mut prev) = self.head.map(|l| (l.seq, l.hash)).unwrap_or((0, GENESIS));
        self.frames.clear();
        let mut links = Vec::with_capacity(entries.len());
        for entry in entries.iter() {
            seq += 1;
            let hash = encode(&mut self.frames, seq, &prev, entry)?;
            links.push(Link { seq, hash });
            prev = hash;
        }
        let lap = &self.laps[self.active];
        let full = lap.offset > 0 && lap.offset + self.frames.len() as u64 > FILE_MAX;
        if full && self.sealed.is_some() {
            return Ok(None);
        }
        self.failing(|j| {
            if full {
                j.switch()?;
            }
            let lap = &mut j.laps[j.active];
            if commit == Commit::Written {
                return lap.write(&j.frames, &mut j.pages);
            }
            let mark = lap.mark();
            lap.write(&j.frames, &mut j.pages)?;
            lap.sync().inspect_err(|_| lap.rewind(mark))
        })?;
        self.backoff = Duration::ZERO;
        entries.clear();
        self.pending += links.len();
        self.head = links.last().copied().or(self.head);
        Ok(Some(links))
    }

    /// The file to fold into SQLite next: the sealed one if it is still
    /// sealed, else the active one (which is sealed for it). `None` if every
    /// record is in SQLite.
    pub(super) fn seal(&mut self) -> io::Result<Option<Sealed>> {
        if self.sealed.is_none() && self.pending > 0 {
            self.ready()?;
            self.failing(Self::switch)?;
        }
        let lap = &self.laps[1 - self.active];
        Ok(self.sealed.map(|records| Sealed {
            file: lap.file.clone(),
            len: lap.offset,
            records,
        }))
    }

    /// The sealed records are in SQLite: their file may be reused.
    pub(super) fn folded(&mut self) {
        self.sealed = None;
    }

    /// Runs `f`; if it fails, the journal takes no appends until a repair.
    fn failing(&mut self, f: impl FnOnce(&mut Self) -> io::Result<()>) -> io::Result<()> {
        let done = f(self);
        if let Err(e) = &done {
            self.fail(e);
        }
        done
    }

    /// Notes a failed write, sync or repair: the next repair waits twice as
    /// long as the last.
    fn fail(&mut self, e: &io::Error) {
        self.backoff = (self.backoff * 2).clamp(RETRY_FIRST, RETRY_MAX);
        self.failed = Some(Failure {
            why: e.to_string(),
            retry_at: Instant::now() + self.backoff,
        });
    }

    /// Takes nothing on trust after a thread panicked while holding the
    /// journal: the active file is repaired before the next append or seal.
    pub(super) fn distrust(&mut self) {
        self.failed = Some(Failure {
            why: "a thread failed while writing the journal".into(),
            retry_at: Instant::now(),
        });
    }

    /// Ok if the active file holds what was acknowledged: it has not failed,
    /// or it failed and a repair (tried once its wait is over) succeeded.
    /// Otherwise an error that says why, and when the next repair is tried.
    fn ready(&mut self) -> io::Result<()> {
        let Some(failure) = &self.failed else {
            return Ok(());
        };
        let now = Instant::now();
        if now < failure.retry_at {
            return Err(io::Error::other(format!(
                "a write failed ({}); the journal tries again in {} ms",
                failure.why,
                (failure.retry_at - now).as_millis().max(1)
            )));
        }
        match self.laps[self.active].repair() {
            Ok(()) => {
                self.failed = None;
                tracing::info!("audit journal: repaired after a failed write; appends resume");
                Ok(())
            }
            Err(e) => {
                self.fail(&e);
                Err(io::Error::other(format!(
                    "a write failed and the repair too ({e}); the journal tries again in {} ms",
                    self.backoff.as_millis()
                )))
            }
        }
    }

    /// Seals the active file (syncing it: a durable append to the other file
    /// must not overtake its records) and makes the other one active.
    fn switch(&mut self) -> io::Result<()> {
        self.laps[self.active].sync()?;
        self.sealed = Some(std::mem::take(&mut self.pending));
        self.active = 1 - self.active;
        self.laps[self.active].restart();
        Ok(())
    }
}

/// Appends the frame of `entry` at `seq` after `prev` to `out`; returns the
/// record's hash.
fn encode(out: &mut Vec<u8>, seq: u64, prev: &Hash, entry: &Entry) -> io::Result<Hash> {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[0; 4 + 32 + 4]);
    let canonical = out.len();
    entry.canonical_into(seq, prev, out);
    let hash = kopir_core::pki::sha256(&out[canonical..]);
    let canonical_len = length(out.len() - canonical)?;
    match &entry.body {
        Some(body) => {
            out.extend_from_slice(&length(body.len())?.to_be_bytes());
            out.extend_from_slice(body);
        }
        None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
    }
    let rest = length(out.len() - start - 8)?;
    out[start + 4..start + 8].copy_from_slice(&rest.to_be_bytes());
    out[start + 8..start + 40].copy_from_slice(&hash);
    out[start + 40..start + 44].copy_from_slice(&canonical_len.to_be_bytes());
    Ok(hash)
}

/// A length as a frame stores it (below `u32::MAX`, which marks an absent
/// body).
fn length(n: usize) -> io::Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&n| n < u32::MAX)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "audit record too large"))
}

/// Reads one frame at the start of `bytes`: the record and how many bytes
/// the frame takes. `None` at the end of the frames (zeros), or at a frame
/// that is cut short, malformed or does not hash to what it says.
fn parse_frame(bytes: &[u8]) -> Option<(Journaled, usize)> {
    let (magic, rest) = bytes.split_first_chunk::<4>()?;
    if *magic != MAGIC {
        return None;
    }
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let (frame, after) = rest.split_at_checked(usize::try_from(u32::from_be_bytes(*len)).ok()?)?;
    let (hash, frame) = frame.split_first_chunk::<32>()?;
    let (canonical_len, frame) = frame.split_first_chunk::<4>()?;
    let (canonical, frame) =
        frame.split_at_checked(usize::try_from(u32::from_be_bytes(*canonical_len)).ok()?)?;
    if kopir_core::pki::sha256(canonical) != *hash {
        return None;
    }
    let (body_len, frame) = frame.split_first_chunk::<4>()?;
    let body = match u32::from_be_bytes(*body_len) {
        u32::MAX if frame.is_empty() => None,
        n if usize::try_from(n).ok()? == frame.len() => Some(frame.to_vec()),
        _ => return None,
    };
    let (seq, prev, mut entry) = parse_canonical(canonical)?;
    entry.body = body;
    Some((
        Journaled {
            seq,
            prev,
            hash: *hash,
            entry,
        },
        bytes.len() - after.len(),
    ))
}

/// The records of `segments` (each a chain read from one file) that continue
/// the log after `head`, in order.
fn continuation(segments: &[Vec<Journaled>; 2], head: Option<Link>) -> Vec<Journaled> {
    let mut out: Vec<Journaled> = Vec::new();
    let (mut seq, mut hash) = head.map(|l| (l.seq, l.hash)).unwrap_or((0, GENESIS));
    // Each file's chain is taken at most once, so this ends.
    let mut used = [false; 2];
    while let Some((i, at)) = segments.iter().enumerate().find_map(|(i, s)| {
        let first = s.first()?.seq;
        let at = usize::try_from((seq + 1).checked_sub(first)?).ok()?;
        (!used[i] && s.get(at)?.prev == hash).then_some((i, at))
    }) {
        used[i] = true;
        out.extend_from_slice(&segments[i][at..]);
        if let Some(last) = out.last() {
            (seq, hash) = (last.seq, last.hash);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Side, Step};

    fn entries(from: u64, n: u64) -> Vec<Entry> {
        (from..from + n)
            .map(|i| Entry {
                request_id: format!("req-{i}"),
                at_ms: i as i64,
                body: (i % 3 == 0).then(|| vec![i as u8; 10]),
                ..Entry::bare("n", Side::Provider, Step::Answered)
            })
            .collect()
    }

    impl Journal {
        /// Locks and recovers, as the store does at open.
        fn open(db: &Path, head: Option<Link>) -> io::Result<(Self, Vec<Journaled>)> {
            let mut j = Journal::lock(db).map_err(|e| match e {
                OpenError::Io(e) => e,
                OpenError::InUse => io::Error::other("in use"),
            })?;
            let recovered = j.recover(head)?;
            Ok((j, recovered))
        }
    }

    fn append(j: &mut Journal, mut e: Vec<Entry>, commit: Commit) -> Vec<Link> {
        j.append(&mut e, commit).unwrap().unwrap()
    }

    /// The records of the file a fold would take now.
    fn sealed_seqs(j: &mut Journal) -> Vec<u64> {
        let sealed = j.seal().unwrap().unwrap();
        sealed.records().unwrap().iter().map(|r| r.seq).collect()
    }

    /// What a restart would replay after `head` (read without taking the
    /// lock, while the journal may still be open).
    fn reopen(db: &Path, head: Option<Link>) -> Vec<Journaled> {
        let [a, b] = paths(db).map(|p| Lap::open(&p).unwrap().read_frames().unwrap());
        continuation(&[a, b], head)
    }

    #[test]
    fn appended_records_are_recovered_after_the_head_and_chain_on() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        let (mut j, none) = Journal::open(&db, None).unwrap();
        assert!(none.is_empty() && j.is_empty());
        let links = append(&mut j, entries(1, 3), Commit::Written);
        assert_eq!(links.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2, 3]);
        append(&mut j, entries(4, 2), Commit::Durable);
        assert_eq!(j.head().map(|l| l.seq), Some(5));
        drop(j);
        let all = reopen(&db, None);
        assert_eq!(all.len(), 5);
        assert_eq!(all[0].prev, GENESIS);
        for (i, r) in all.iter().enumerate() {
            assert_eq!(r.entry, entries(i as u64 + 1, 1)[0], "body included");
            assert_eq!(r.entry.hash(r.seq, &r.prev), r.hash);
        }
        // Only what follows the database's head is replayed.
        let after = reopen(&db, Some(all[2].link()));
        assert_eq!(after.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5]);
        // A head the journal does not continue (another chain) gets nothing.
        let other = Link {
            seq: 2,
            hash: [9; 32],
        };
        assert!(reopen(&db, Some(other)).is_empty());
    }

    #[test]
    fn a_torn_frame_ends_the_recovery_and_a_new_round_overwrites_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        let (mut j, _) = Journal::open(&db, None).unwrap();
        append(&mut j, entries(1, 4), Commit::Durable);
        drop(j);
        // Tear the last frame: one byte of its hashed bytes changes.
        let file = paths(&db)[0].clone();
        let mut bytes = std::fs::read(&file).unwrap();
        let end = bytes.iter().rposition(|&b| b != 0).unwrap();
        bytes[end - 40] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        let (j, kept) = Journal::open(&db, None).unwrap();
        assert_eq!(kept.len(), 3);
        drop(j);
        // The store takes the three in and goes on from there: the new
        // frames overwrite the file, and the old fourth is not replayed.
        let (mut j, again) = Journal::open(&db, Some(kept[2].link())).unwrap();
        assert!(again.is_empty());
        append(&mut j, entries(40, 1), Commit::Durable);
        drop(j);
        let replay = reopen(&db, Some(kept[2].link()));
        assert_eq!(replay.len(), 1);
        assert_eq!(replay[0].entry.request_id, "req-40");
    }

    #[test]
    fn sealed_records_are_kept_until_folded_and_the_files_alternate() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        let (mut j, _) = Journal::open(&db, None).unwrap();
        append(&mut j, entries(1, 2), Commit::Written);
        let sealed = sealed_seqs(&mut j);
        assert_eq!(sealed, [1, 2]);
        let four = append(&mut j, entries(3, 2), Commit::Durable)[1];
        // Not yet folded: a second seal hands out the same records again.
        assert_eq!(sealed_seqs(&mut j), sealed);
        // A crash now replays both files, in order (the first was synced
        // when it was sealed).
        assert_eq!(
            reopen(&db, None).iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        j.folded();
        assert_eq!(sealed_seqs(&mut j), [3, 4]);
        j.folded();
        assert!(j.is_empty() && j.seal().unwrap().is_none());
        // The first file is reused from its start: record 5 overwrites 1-2.
        append(&mut j, entries(5, 1), Commit::Durable);
        let replay = reopen(&db, Some(four));
        assert_eq!(replay.iter().map(|r| r.seq).collect::<Vec<_>>(), [5]);
        assert!(reopen(&db, None).is_empty(), "records 1-2 are gone");
    }

    #[test]
    fn a_full_file_is_sealed_and_appends_wait_for_the_fold() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        let (mut j, _) = Journal::open(&db, None).unwrap();
        let big = |i: u64| {
            let mut e = entries(i, 1);
            e[0].body = Some(vec![7; usize::try_from(FILE_MAX / 2).unwrap()]);
            e
        };
        append(&mut j, big(1), Commit::Written);
        // The second does not fit: the first file is sealed for it.
        append(&mut j, big(2), Commit::Written);
        assert_eq!(sealed_seqs(&mut j), [1]);
        // The third does not fit either, and the other file is still sealed.
        let mut third = big(3);
        assert!(j.append(&mut third, Commit::Written).unwrap().is_none());
        assert_eq!(third.len(), 1, "a refused append keeps its entries");
        j.folded();
        append(&mut j, third, Commit::Durable);
        assert_eq!(j.head().map(|l| l.seq), Some(3));
    }

    #[test]
    fn a_sealed_file_changed_behind_the_server_is_not_folded() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        let (mut j, _) = Journal::open(&db, None).unwrap();
        append(&mut j, entries(1, 3), Commit::Durable);
        let sealed = j.seal().unwrap().unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&paths(&db)[0])
            .unwrap();
        file.write_all_at(b"XX", 100).unwrap();
        let err = sealed.records().unwrap_err();
        assert!(
            err.to_string().contains("behind the server's back"),
            "{err}"
        );
    }

    /// Swaps the active file's handle for a read-only one: its writes fail
    /// (as on a full disk) until the returned handle is put back.
    fn unwritable(j: &mut Journal, db: &Path) -> Arc<File> {
        let i = j.active;
        std::mem::replace(
            &mut j.laps[i].file,
            Arc::new(File::open(&paths(db)[i]).unwrap()),
        )
    }

    #[test]
    fn a_failed_write_is_repaired_from_memory_and_appends_resume() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        let (mut j, _) = Journal::open(&db, None).unwrap();
        append(&mut j, entries(1, 1), Commit::Durable);
        // Record 2 is acknowledged as written, not yet synced.
        let two = append(&mut j, entries(2, 1), Commit::Written);
        let writable = unwritable(&mut j, &db);
        let mut refused = entries(3, 1);
        assert!(j.append(&mut refused, Commit::Durable).is_err());
        assert_eq!(refused.len(), 1, "a refused append keeps its entries");
        assert_eq!(j.head(), two.last().copied());
        // Until the wait is over, appends are refused at once, saying why.
        j.laps[j.active].file = writable;
        j.failed.as_mut().unwrap().retry_at = Instant::now() + Duration::from_secs(60);
        let err = j.append(&mut refused, Commit::Durable).unwrap_err();
        assert!(err.to_string().contains("tries again in"), "{err}");
        // Meanwhile the kernel lost the unsynced page (as a failed sync may
        // make it): record 2 is no longer in the file.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&paths(&db)[0])
            .unwrap()
            .write_all_at(&[0; PAGE], PAGE as u64)
            .unwrap();
        assert_eq!(reopen(&db, None).len(), 1);
        j.failed.as_mut().unwrap().retry_at = Instant::now();
        let three = append(&mut j, refused, Commit::Durable);
        assert_eq!(three[0].seq, 3);
        assert!(j.failed.is_none() && j.backoff.is_zero());
        let seqs: Vec<_> = reopen(&db, None).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3], "the repair wrote record 2 again");
        drop(j);
        let (_, recovered) = Journal::open(&db, None).unwrap();
        assert_eq!(recovered.len(), 3);
    }

    #[test]
    fn repairs_that_keep_failing_wait_longer_up_to_the_most() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        let (mut j, _) = Journal::open(&db, None).unwrap();
        append(&mut j, entries(1, 1), Commit::Written);
        let writable = unwritable(&mut j, &db);
        let mut waits = Vec::new();
        for _ in 0..8 {
            if let Some(f) = &mut j.failed {
                f.retry_at = Instant::now();
            }
            assert!(j.append(&mut entries(2, 1), Commit::Written).is_err());
            waits.push(j.backoff.as_millis());
        }
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 500, 500]);
        // A seal waits for the repair too: the file to seal is not known good.
        let err = j.seal().err().expect("no seal of a failed file");
        assert!(err.to_string().contains("tries again in"), "{err}");
        j.laps[j.active].file = writable;
        j.failed.as_mut().unwrap().retry_at = Instant::now();
        assert_eq!(sealed_seqs(&mut j), [1]);
    }

    #[test]
    fn frames_after_a_sync_start_on_a_fresh_page() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        let (mut j, _) = Journal::open(&db, None).unwrap();
        append(&mut j, entries(1, 2), Commit::Written);
        let written = j.laps[0].offset;
        assert!(written > 0 && written < PAGE as u64);
        append(&mut j, entries(3, 1), Commit::Durable);
        assert_eq!(
            j.laps[0].offset, PAGE as u64,
            "the synced page is not written again"
        );
        append(&mut j, entries(4, 1), Commit::Durable);
        assert_eq!(j.laps[0].offset, 2 * PAGE as u64);
        let seqs: Vec<_> = reopen(&db, None).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
    }

    #[test]
    fn a_rewound_write_is_cleared_by_the_repair() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        let (mut j, _) = Journal::open(&db, None).unwrap();
        let one = append(&mut j, entries(1, 1), Commit::Written)[0];
        // As when the sync of record 2 fails: its frame is written, then
        // rewound; the repair clears it.
        let lap = &mut j.laps[0];
        let mark = lap.mark();
        let mut frames = Vec::new();
        encode(&mut frames, 2, &one.hash, &entries(2, 1)[0]).unwrap();
        lap.write(&frames, &mut Vec::new()).unwrap();
        assert_eq!(reopen(&db, None).len(), 2);
        lap.rewind(mark);
        lap.repair().unwrap();
        assert_eq!(
            reopen(&db, None).len(),
            1,
            "the rewound frame is still there"
        );
        // The next append goes on after record 1, on a fresh page.
        append(&mut j, entries(9, 1), Commit::Durable);
        let replay = reopen(&db, None);
        assert_eq!(replay.len(), 2);
        assert_eq!(replay[1].entry.request_id, "req-9");
    }

    #[test]
    fn a_second_opener_is_told_the_log_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("audit.db");
        let first = Journal::lock(&db).unwrap();
        assert!(matches!(Journal::lock(&db), Err(OpenError::InUse)));
        drop(first);
        assert!(Journal::lock(&db).is_ok());
    }
}
