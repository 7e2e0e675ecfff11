//! Replay protection on the provider side: a request id may be accepted once per
//! client within the timestamp window (a request older than the window is
//! refused for its timestamp, so the memory needed is bounded by the rate times
//! the window). Each (client, request id) pair is kept as 8 bytes of its
//! SHA-256 with its expiry in whole seconds, 17 bytes a slot of the table: at
//! 5,000 requests/s and the default window of 60 s (300,000 pairs), about
//! 9 MiB, 13 MiB while the table grows. Two different pairs share a key with
//! a chance of about one in 10^14 per request at that rate; the second would
//! be refused as a replay, and its caller retries with a new id.

use std::{collections::HashMap, sync::Mutex};

use kopir_core::error::{Reason, Refusal};

/// Remembers accepted (client, request id) pairs until their window passes.
#[derive(Debug)]
pub(crate) struct ReplayGuard {
    window_ms: i64,
    capacity: usize,
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    /// Key → expiry, in seconds since the Unix epoch (rounded up).
    expires: HashMap<u64, u32>,
    next_sweep_at: usize,
}

/// The pair's key: the first 8 bytes of SHA-256(client, 0, request id).
fn key(client: &str, request_id: &str) -> u64 {
    let mut input = Vec::with_capacity(client.len() + 1 + request_id.len());
    input.extend_from_slice(client.as_bytes());
    input.push(0);
    input.extend_from_slice(request_id.as_bytes());
    let digest = kopir_core::pki::sha256(&input);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// A time in milliseconds as whole seconds, rounded up (so an entry is kept
/// at least as long as asked); clamped to what the table stores.
fn seconds_up(ms: i64) -> u32 {
    u32::try_from(ms.max(0).unsigned_abs().div_ceil(1000)).unwrap_or(u32::MAX)
}

impl ReplayGuard {
    /// A guard for a timestamp window of `window_ms` either side, holding at
    /// most `capacity` entries.
    pub(crate) fn new(window_ms: i64, capacity: usize) -> Self {
        Self {
            window_ms,
            capacity,
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Records the pair, or refuses it if already seen within the window.
    pub(crate) fn check(
        &self,
        client: &str,
        request_id: &str,
        timestamp_ms: i64,
        now_ms: i64,
    ) -> Result<(), Refusal> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        // Still remembered while its expiry is ahead: `seconds_up(now)`
        // errs towards keeping an entry up to a second longer.
        let now = seconds_up(now_ms);
        if seen.expires.len() >= seen.next_sweep_at {
            seen.expires.retain(|_, exp| *exp >= now);
            seen.next_sweep_at = (seen.expires.len() * 2).max(1024);
        }
        let key = key(client, request_id);
        if seen.expires.get(&key).is_some_and(|exp| *exp >= now) {
            return Err(Refusal::new(
                Reason::RequestReplayed,
                format!(
                    "request id {request_id:?} of {client} was already accepted; send each request with a new id"
                ),
            ));
        }
        if seen.expires.len() >= self.capacity {
            return Err(Refusal::new(
                Reason::Overloaded,
                "the replay cache is full; retry shortly",
            ));
        }
        // After `timestamp + window` the request is refused for its timestamp.
        seen.expires
            .insert(key, seconds_up(timestamp_ms.saturating_add(self.window_ms)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_use_is_refused_until_the_window_passes() {
        let guard = ReplayGuard::new(1000, 10);
        guard.check("c", "r1", 0, 0).unwrap();
        assert_eq!(
            guard.check("c", "r1", 0, 10).unwrap_err().reason,
            Reason::RequestReplayed
        );
        guard.check("other", "r1", 0, 10).unwrap();
        guard.check("c", "r1", 0, 5000).unwrap();
    }

    #[test]
    fn bounded() {
        let guard = ReplayGuard::new(1_000_000, 3);
        for i in 0..3 {
            guard.check("c", &i.to_string(), 0, 0).unwrap();
        }
        assert_eq!(
            guard.check("c", "x", 0, 0).unwrap_err().reason,
            Reason::Overloaded
        );
    }
}
