//! File descriptors: a server raises its soft limit to the hard one at start,
//! and keeps part of it in reserve for its own files so that connections alone
//! cannot exhaust it.

/// Descriptors kept for the server's own use: its configuration, audit store,
/// journal, consent store, outgoing connections to providers and registries.
pub(crate) const RESERVE: u64 = 256;

/// Raises the process's soft limit on open files to its hard limit and
/// returns the soft limit now in force (or `None` where it cannot be read).
pub fn raise_nofile_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-files limit");
            None
        }
    }
}

/// How many connections each of `ports` may hold so that, with every port
/// full, [`RESERVE`] descriptors remain: at most `wanted`, at least 1.
pub fn connections_per_port(limit: Option<u64>, ports: usize, wanted: usize) -> usize {
    let Some(limit) = limit else {
        return wanted.max(1);
    };
    let available = limit.saturating_sub(RESERVE) / ports.max(1) as u64;
    (available.min(wanted as u64) as usize).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_leave_the_reserve_free() {
        assert_eq!(connections_per_port(Some(1024), 3, 4096), 256);
        assert_eq!(connections_per_port(Some(1_048_576), 3, 4096), 4096);
        assert_eq!(connections_per_port(Some(100), 2, 4096), 1);
        assert_eq!(connections_per_port(None, 2, 4096), 4096);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let raised = raise_nofile_limit().expect("limit");
        let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit");
        assert_eq!(raised, soft);
        assert!(soft == hard || soft >= 1 << 20, "soft {soft}, hard {hard}");
    }
}
