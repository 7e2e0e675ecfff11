//! The server's log sink: standard error, through a writer that never fails.
//!
//! `tracing-subscriber` reports a failed write of a log line by printing to
//! standard error with `eprintln!`, which panics when standard error cannot
//! be written either (a full disk under a redirected log, `/dev/full`, a
//! closed pipe). A panic there ends whichever task was logging: a
//! configuration watcher, the audit writer, a call's handler. [`StderrSink`]
//! makes a log line that cannot be written a dropped line instead: the write
//! reports success and the line is counted ([`dropped_lines`]), so that
//! logging never changes what the server does.

use std::{
    io::{self, Write},
    sync::atomic::{AtomicU64, Ordering},
};

use tracing_subscriber::fmt::MakeWriter;

/// Log lines dropped because standard error could not take them.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// How many log lines were dropped since the process started (for metrics and
/// `Stats`).
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// A [`MakeWriter`] over standard error whose writes never fail.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StderrSink;

impl<'a> MakeWriter<'a> for StderrSink {
    type Writer = LineWriter<io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter::new(io::stderr())
    }
}

/// Writes to `W`; a line it cannot take is dropped and counted. Each event is
/// written with one `write_all` by the subscriber, so a failed write drops
/// the rest of that line and nothing more.
#[derive(Debug)]
pub(crate) struct LineWriter<W> {
    inner: W,
    /// A write of this line failed: the rest of it is dropped too.
    failed: bool,
}

impl<W: Write> LineWriter<W> {
    /// A writer over `inner`.
    pub(crate) fn new(inner: W) -> Self {
        Self {
            inner,
            failed: false,
        }
    }

    fn drop_line(&mut self) {
        if !self.failed {
            self.failed = true;
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<W: Write> Write for LineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.failed {
            match self.inner.write(buf) {
                // A sink that takes nothing would make `write_all` fail.
                Ok(0) if !buf.is_empty() => self.drop_line(),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
                Err(_) => self.drop_line(),
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.failed && self.inner.flush().is_err() {
            self.drop_line();
        }
        Ok(())
    }
}

/// Installs the global subscriber: `filter` unless `RUST_LOG` says otherwise,
/// written to [`StderrSink`].
pub fn init(filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| filter.into()),
        )
        .with_writer(StderrSink)
        .log_internal_errors(false)
        .init();
}

/// Writes `line` to standard error, dropping (and counting) it if it cannot
/// be written: for the few messages printed outside the log, such as the
/// error a command exits with.
pub fn print_stderr(line: &str) {
    let mut w = LineWriter::new(io::stderr());
    let _ = writeln!(w, "{line}");
}

/// The message a panic was raised with, to log it when a task that failed
/// is started again.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that takes `room` bytes, then fails every write.
    struct Full {
        room: usize,
        took: Vec<u8>,
    }

    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.took.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_that_cannot_be_written_is_dropped_and_counted() {
        let before = dropped_lines();
        let mut w = LineWriter::new(Full {
            room: 4,
            took: Vec::new(),
        });
        w.write_all(b"first line\n").unwrap();
        w.write_all(b"more of it\n").unwrap();
        w.flush().unwrap();
        assert_eq!(w.inner.took, b"firs");
        // Other tests may drop lines meanwhile: only the increase is certain.
        assert!(dropped_lines() > before);
        let mut ok = LineWriter::new(Full {
            room: 100,
            took: Vec::new(),
        });
        ok.write_all(b"fits\n").unwrap();
        assert_eq!(ok.inner.took, b"fits\n");
        assert!(!ok.failed);
    }

    #[test]
    fn dev_full_takes_no_line_and_no_panic() {
        let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
            eprintln!("skipped: no /dev/full on this system");
            return;
        };
        let mut w = LineWriter::new(full);
        w.write_all(b"a line\n").unwrap();
        w.flush().unwrap();
        assert!(w.failed);
    }
}
