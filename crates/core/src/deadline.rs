//! A call's deadline, measured on the monotonic clock from the moment the
//! request arrived, and carried through every stage of the security path so
//! that a call whose time runs out gets `DEADLINE_EXCEEDED` naming the stage
//! it was in, never a failure blamed on a party it did not reach.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Reason, Refusal};

/// The moment a call must be answered by.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    granted: Duration,
}

impl Deadline {
    /// A deadline `granted` after now.
    pub(crate) fn after(granted: Duration) -> Self {
        Self {
            at: Instant::now() + granted,
            granted,
        }
    }

    /// The deadline a caller asked for in `grpc-timeout`, capped by `max`
    /// (which is also the deadline of a call that names none), from now.
    pub fn from_headers(headers: &http::HeaderMap, max: Duration) -> Self {
        Self::after(asked(headers).map_or(max, |d| d.min(max)))
    }

    /// How long the call was given.
    #[cfg(test)]
    fn granted(&self) -> Duration {
        self.granted
    }

    /// Time left; zero once the deadline has passed.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Time left for work whose outcome must still travel back before the
    /// caller gives up: the remaining time less a tenth of the deadline (at
    /// least 5 ms, at most 250 ms).
    pub fn remaining_for_work(&self) -> Duration {
        let margin =
            (self.granted / 10).clamp(Duration::from_millis(5), Duration::from_millis(250));
        self.remaining().saturating_sub(margin)
    }

    /// The instant it passes.
    pub fn instant(&self) -> Instant {
        self.at
    }

    /// The refusal of a call whose deadline passed while it was `stage`
    /// (a phrase such as "reading the request body").
    pub fn exceeded(&self, stage: &str) -> Refusal {
        Refusal::new(
            Reason::DeadlineExceeded,
            format!(
                "the call's deadline of {} ms passed while {stage}",
                self.granted.as_millis()
            ),
        )
    }

    /// Refuses if the deadline has passed, naming `stage`.
    pub fn check(&self, stage: &str) -> Result<(), Refusal> {
        if self.remaining().is_zero() {
            Err(self.exceeded(stage))
        } else {
            Ok(())
        }
    }

    /// Runs `work` until it ends or the deadline passes (then refuses, naming
    /// `stage`). Only for work that may be abandoned midway: reads and waits,
    /// never an audit write.
    pub async fn within<T>(
        &self,
        stage: &str,
        work: impl Future<Output = Result<T, Refusal>>,
    ) -> Result<T, Refusal> {
        match tokio::time::timeout_at(self.at, work).await {
            Ok(done) => done,
            Err(_) => Err(self.exceeded(stage)),
        }
    }
}

/// Reads a request body (`read`) within the deadline and within
/// `body_timeout` from now, whichever comes first: a caller that sends its
/// headers and then holds the body back is cut off with `body.timeout`.
pub async fn read_body<T>(
    deadline: &Deadline,
    body_timeout: Duration,
    read: impl Future<Output = Result<T, Refusal>>,
) -> Result<T, Refusal> {
    let cut_off = deadline.instant().min(Instant::now() + body_timeout);
    match tokio::time::timeout_at(cut_off, read).await {
        Ok(done) => done,
        Err(_) if deadline.remaining().is_zero() => {
            Err(deadline.exceeded("reading the request body"))
        }
        Err(_) => Err(Refusal::new(
            Reason::BodyTimeout,
            format!(
                "the request body did not arrive within {} ms of its headers",
                body_timeout.as_millis()
            ),
        )),
    }
}

/// The deadline asked for in a `grpc-timeout` header, if it is well formed.
pub(crate) fn asked(headers: &http::HeaderMap) -> Option<Duration> {
    headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
}

/// Parses a `grpc-timeout` value: at most eight digits and a unit.
fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1n"), Some(Duration::from_nanos(1)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("+5m"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }

    #[test]
    fn the_deadline_is_capped_and_defaults_to_the_cap() {
        let max = Duration::from_secs(30);
        let mut h = http::HeaderMap::new();
        assert_eq!(Deadline::from_headers(&h, max).granted(), max);
        h.insert("grpc-timeout", "1H".parse().unwrap());
        assert_eq!(Deadline::from_headers(&h, max).granted(), max);
        h.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(
            Deadline::from_headers(&h, max).granted(),
            Duration::from_millis(250)
        );
    }

    #[tokio::test]
    async fn a_passed_deadline_names_the_stage() {
        let d = Deadline::after(Duration::from_nanos(1));
        tokio::time::sleep(Duration::from_millis(1)).await;
        let refusal = d.check("signing the request").unwrap_err();
        assert_eq!(refusal.reason, Reason::DeadlineExceeded);
        assert_eq!(refusal.code, tonic::Code::DeadlineExceeded);
        assert!(refusal.message.contains("signing the request"));
        let never = std::future::pending::<Result<(), Refusal>>();
        let refusal = d
            .within("reading the request body", never)
            .await
            .unwrap_err();
        assert!(refusal.message.contains("reading the request body"));
    }

    #[tokio::test]
    async fn a_body_held_back_is_cut_off_by_the_body_timeout_or_the_deadline() {
        let held = || std::future::pending::<Result<(), Refusal>>();
        let long = Deadline::after(Duration::from_secs(30));
        let refusal = read_body(&long, Duration::from_millis(20), held())
            .await
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::BodyTimeout);
        let short = Deadline::after(Duration::from_millis(20));
        let refusal = read_body(&short, Duration::from_secs(30), held())
            .await
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::DeadlineExceeded);
    }

    #[tokio::test]
    async fn work_that_ends_in_time_is_untouched() {
        let d = Deadline::after(Duration::from_secs(5));
        assert!(d.check("anything").is_ok());
        assert_eq!(d.within("x", async { Ok(7) }).await.unwrap(), 7);
    }
}
