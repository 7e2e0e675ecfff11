//! What the exchange benchmark measures: a fixed number of calls in flight for
//! a fixed time, their latencies, and the CPU time and peak memory of the
//! processes that served them, from the kernel's own accounting (`/proc`).

use std::{
    future::Future,
    time::{Duration, Instant},
};

use serde::Serialize;

/// How one call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered by the registry through both servers.
    Served,
    /// Refused at once because the server was at capacity (`server.overloaded`).
    Shed,
    /// Any other error.
    Failed,
}

/// Latencies and counts of one run.
#[derive(Debug, Default)]
pub struct Run {
    /// Latency of each successful call, in microseconds.
    pub latencies_us: Vec<u64>,
    /// Calls that failed (shed ones included).
    pub errors: u64,
    /// Calls shed by a server at capacity.
    pub shed: u64,
    /// The slowest answer of any kind, shed and failed calls included.
    pub slowest_us: u64,
    /// How long the run lasted.
    pub elapsed: Duration,
}

/// Runs `call` from `concurrency` tasks for `duration`; each task starts its
/// next call when the last one answered (closed loop).
pub async fn closed_loop<F, Fut>(concurrency: usize, duration: Duration, call: F) -> Run
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency.max(1) {
        let call = call.clone();
        tasks.spawn(async move {
            let mut part = Run {
                latencies_us: Vec::with_capacity(16 * 1024),
                ..Run::default()
            };
            while Instant::now() < deadline {
                let t = Instant::now();
                let outcome = call(worker).await;
                let took = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                part.slowest_us = part.slowest_us.max(took);
                match outcome {
                    Outcome::Served => part.latencies_us.push(took),
                    Outcome::Shed => {
                        part.shed += 1;
                        part.errors += 1;
                    }
                    Outcome::Failed => part.errors += 1,
                }
            }
            part
        });
    }
    let mut run = Run::default();
    while let Some(done) = tasks.join_next().await {
        if let Ok(part) = done {
            run.latencies_us.extend(part.latencies_us);
            run.errors += part.errors;
            run.shed += part.shed;
            run.slowest_us = run.slowest_us.max(part.slowest_us);
        }
    }
    run.elapsed = started.elapsed();
    run
}

/// The figures of one run, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// Successful calls per second.
    pub calls_per_s: f64,
    /// Median latency.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest call.
    pub max_ms: f64,
    /// CPU time (user + system) of the serving processes per successful call.
    pub cpu_us_per_call: f64,
    /// Failed calls.
    pub errors: u64,
}

impl Figures {
    /// The figures of `run`, whose serving processes used `cpu` between its
    /// start and end.
    pub fn of(run: &mut Run, cpu: Duration) -> Self {
        run.latencies_us.sort_unstable();
        let calls = run.latencies_us.len();
        let at = |q: f64| -> f64 {
            if calls == 0 {
                return 0.0;
            }
            let i = ((calls as f64 * q).ceil() as usize).clamp(1, calls) - 1;
            run.latencies_us[i] as f64 / 1000.0
        };
        Self {
            calls_per_s: calls as f64 / run.elapsed.as_secs_f64().max(1e-9),
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: at(1.0),
            cpu_us_per_call: if calls == 0 {
                0.0
            } else {
                cpu.as_secs_f64() * 1e6 / calls as f64
            },
            errors: run.errors,
        }
    }
}

/// `/proc/<pid>/stat` counts CPU time in clock ticks of `USER_HZ`, which the
/// kernel fixes at 100 per second for user space.
const TICKS_PER_SECOND: u64 = 100;

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> std::io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count from the last ')'.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| std::io::Error::other("malformed /proc stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let tick = |i: usize| -> std::io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| std::io::Error::other("malformed /proc stat"))
    };
    let ticks = tick(14 - 3)? + tick(15 - 3)?;
    Ok(Duration::from_micros(ticks * 1_000_000 / TICKS_PER_SECOND))
}

/// Context switches (voluntary and not) of a process's threads alive now:
/// how often its threads stopped, to wait or because another took the CPU.
/// A thread that has ended takes its count with it, so a sample is a floor.
pub fn context_switches(pid: u32) -> std::io::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
            continue;
        };
        total += ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"]
            .iter()
            .filter_map(|key| status_value(&status, key))
            .sum::<u64>();
    }
    Ok(total)
}

/// The most resident memory a process has had (`VmHWM`), in MiB.
pub fn peak_rss_mib(pid: u32) -> std::io::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status_value(&status, "VmHWM:")
        .ok_or_else(|| std::io::Error::other("no VmHWM in /proc status"))?;
    Ok(kib as f64 / 1024.0)
}

/// The number on the line of a `/proc` status file that starts with `key`
/// (sizes are in kB, which the number is left in).
fn status_value(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut run = Run {
            latencies_us: (1..=100).rev().map(|i| i * 1000).collect(),
            errors: 2,
            elapsed: Duration::from_secs(2),
            ..Run::default()
        };
        let f = Figures::of(&mut run, Duration::from_millis(10));
        assert_eq!(f.calls_per_s, 50.0);
        assert_eq!(
            (f.p50_ms, f.p90_ms, f.p99_ms, f.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(f.cpu_us_per_call, 100.0);
        assert_eq!(f.errors, 2);
    }

    #[test]
    fn own_process_accounting() {
        let pid = std::process::id();
        let before = cpu_time(pid).unwrap();
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(cpu_time(pid).unwrap() >= before);
        assert!(peak_rss_mib(pid).unwrap() > 1.0);
    }

    #[test]
    fn a_sleeping_process_has_switched() {
        // A process of its own: in this one, other tests' threads come and
        // go, and take their counts with them.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let t = Instant::now();
        let mut switches = 0;
        while switches == 0 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
            switches = context_switches(child.id()).unwrap();
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(switches > 0);
        assert!(context_switches(u32::MAX).is_err());
    }
}
