//! A network partition that cuts one security server from the authority
//! while its exchanges go on.
//!
//! The authority (`kopir authority serve`) runs in a network namespace of
//! its own, reached from the host over two veth pairs, each with addresses
//! of its own. The consumer's server (mlspp) downloads over the first link,
//! the provider's (moj) over the second: each server's anchor names only
//! the authority's address on its link. Both run on the host as `kopir
//! serve` processes (see [`federation_net`]), refreshing every second.
//!
//! - The first link cut: mlspp's source fails and its copy stays in use,
//!   moj keeps taking newer copies; under continuous load no exchange fails
//!   while mlspp's copy is valid (the calls made and failed are printed).
//! - Still cut, past the copy's expiry: `globalconf.stale`.
//! - The link back: mlspp takes a newer copy within a few refreshes (the
//!   time it took is printed) and exchanges are served again.
//!
//! Needs root and `ip` (iproute2); without them it prints `skipped:` and
//! why. The namespace and the links are named after the process id and
//! removed when the test ends, after a panic too.

use std::{
    ffi::OsStr,
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use kopir_core::error::ERROR_KEY;
use kopir_testkit::federation::LocalFederation;
use tonic::{Code, Status};

mod common;
mod federation_net;
mod serve_process;

use common::{assert_refused, get_person, until};
use federation_net::{
    Load, PATH, Server, VALID_FOR, authority_via, make_tls_for, write_anchor, write_description,
};

/// How soon a server must take a newer copy once its link is back: a few
/// refresh intervals (1 s each, and 1 s to connect).
const BACK_WITHIN: Duration = Duration::from_secs(5);
/// How long before the cut-off server's copy expires the load stops, so
/// that it measures exchanges while the copy is valid and nothing else.
const MARGIN: Duration = Duration::from_secs(2);

/// Runs `ip ARGS`: its output, or what went wrong.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why the test cannot run here, if it cannot: making namespaces and links
/// needs root and `ip`.
fn cannot_run() -> Option<String> {
    let uid = match Command::new("id").arg("-u").output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Err(e) => return Some(format!("cannot run `id -u` to check for root: {e}")),
    };
    if uid != "0" {
        return Some(format!(
            "making network namespaces needs root (running as uid {uid})"
        ));
    }
    if let Err(e) = Command::new("ip").arg("-V").output() {
        return Some(format!("no `ip` command (iproute2): {e}"));
    }
    None
}

/// `10.213.N` for the first N from the process id on such that no address
/// of the host is in `10.213.N.0/24`, so that links of a run at the same
/// time, or of a killed one, cannot be confused with this run's.
fn free_subnet() -> Result<String, String> {
    let start = std::process::id() % 256;
    for n in (0..256).map(|i| (start + i) % 256) {
        let subnet = format!("10.213.{n}");
        if ip(&["-o", "addr", "show", "to", &format!("{subnet}.0/24")])?
            .trim()
            .is_empty()
        {
            return Ok(subnet);
        }
    }
    Err("every /24 of 10.213.0.0/16 has an address on the host".into())
}

/// A veth pair between the host and the namespace, a /30 of its own.
struct Link {
    /// The host's end and its address.
    host: String,
    host_ip: String,
    /// The namespace's end and its address, where the authority answers.
    inside: String,
    inside_ip: String,
}

/// A network namespace with links to the host, made for the test and
/// removed when dropped (after a panic too) with whatever runs inside.
struct Partition {
    ns: String,
    links: Vec<Link>,
}

impl Partition {
    /// The namespace `kopir-part-PID` with `count` links, link `k` being
    /// `10.213.N.(4k+1)` on the host and `10.213.N.(4k+2)` inside; or why
    /// it cannot be made (what was made by then is removed).
    fn create(count: usize) -> Result<Partition, String> {
        let pid = std::process::id();
        let subnet = free_subnet()?;
        let ns = format!("kopir-part-{pid}");
        ip(&["netns", "add", &ns])?;
        let mut partition = Partition {
            ns: ns.clone(),
            links: Vec::new(),
        };
        for k in 0..count {
            let link = Link {
                host: format!("kp{pid}h{k}"),
                host_ip: format!("{subnet}.{}", 4 * k + 1),
                inside: format!("kp{pid}n{k}"),
                inside_ip: format!("{subnet}.{}", 4 * k + 2),
            };
            ip(&[
                "link",
                "add",
                &link.host,
                "type",
                "veth",
                "peer",
                "name",
                &link.inside,
                "netns",
                &ns,
            ])?;
            let (host, inside) = (
                format!("{}/30", link.host_ip),
                format!("{}/30", link.inside_ip),
            );
            partition.links.push(link);
            let link = &partition.links[k];
            ip(&["addr", "add", &host, "dev", &link.host])?;
            ip(&["link", "set", &link.host, "up"])?;
            ip(&["-n", &ns, "addr", "add", &inside, "dev", &link.inside])?;
            ip(&["-n", &ns, "link", "set", &link.inside, "up"])?;
        }
        Ok(partition)
    }

    /// The command prefix that runs a program inside the namespace.
    fn exec(&self) -> [&OsStr; 4] {
        ["ip", "netns", "exec", &self.ns].map(OsStr::new)
    }

    /// Sets link `k`'s end in the namespace `down` or `up`. Cut from inside,
    /// the host keeps its address and route on the link: what it sends to
    /// the authority vanishes, as in a partition, instead of being refused
    /// at once or routed elsewhere.
    fn set(&self, k: usize, state: &str) {
        let link = &self.links[k].inside;
        ip(&["-n", &self.ns, "link", "set", link, state])
            .unwrap_or_else(|e| panic!("cannot set link {link} {state}: {e}"));
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        for link in &self.links {
            let _ = ip(&["link", "del", &link.host]);
        }
        if let Ok(pids) = ip(&["netns", "pids", &self.ns]) {
            for pid in pids.split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// When a document was signed: its serial is the signing time in
/// microseconds since the epoch (docs/globalconf.md).
fn signed_at(serial: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_micros(serial)
}

/// Whether an exchange was refused as `globalconf.stale`.
fn is_stale(outcome: &Result<(), Status>) -> bool {
    outcome.as_ref().is_err_and(|s| {
        s.metadata()
            .get(ERROR_KEY)
            .is_some_and(|v| v == "globalconf.stale")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_cuts_one_server_from_the_authority_and_exchanges_go_on() {
    if let Some(why) = cannot_run() {
        println!("skipped: {why}");
        return;
    }
    let partition = match Partition::create(2) {
        Ok(partition) => partition,
        Err(why) => {
            println!("skipped: cannot make a network namespace with two links ({why})");
            return;
        }
    };
    let (first, second) = (&partition.links[0], &partition.links[1]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut fed = LocalFederation::launch(dir, &|_, _| {}).await.unwrap();
    let parent = fed.dataset.sample_parents(1)[0].to_string();
    write_description(dir, &fed);

    // The authority inside, on both links; each server knows one of them.
    make_tls_for(dir, &[&first.inside_ip, &second.inside_ip]);
    let (_authority, addr) = authority_via(&partition.exec(), dir, "0.0.0.0:0", &[]);
    let url = |link: &Link| format!("https://{}:{}{PATH}", link.inside_ip, addr.port());
    println!(
        "authority in namespace {}: mlspp downloads from {}, moj from {}",
        partition.ns,
        url(first),
        url(second)
    );
    let (mlspp_anchor, moj_anchor) = (dir.join("mlspp-anchor.json"), dir.join("moj-anchor.json"));
    write_anchor(dir, &[&url(first)], &mlspp_anchor);
    write_anchor(dir, &[&url(second)], &moj_anchor);
    let moj = Server::start(&mut fed, "moj", &moj_anchor).await;
    let mut mlspp = Server::start(&mut fed, "mlspp", &mlspp_anchor).await;
    let channel = mlspp.process.benefits_channel(&fed).await;
    until(&channel, &parent, Result::is_ok).await;
    for (name, server, link) in [("mlspp", &mlspp, first), ("moj", &moj, second)] {
        server
            .until_status(&fed, &format!("{name} downloaded over its link"), |s| {
                s.usable && s.checked_from == url(link)
            })
            .await;
    }

    // The first link cut, under load: mlspp's source fails and its copy
    // stays in use, moj keeps taking newer ones.
    let load = Load::on(&channel, &parent);
    let before = mlspp.status(&fed).await.sources[0].last_failure.clone();
    partition.set(0, "down");
    let cut = mlspp
        .until_status(&fed, "mlspp failed to reach the authority", |s| {
            s.sources[0].last_failure != before && !s.sources[0].last_error.is_empty()
        })
        .await;
    println!(
        "link {} down: mlspp's source fails with {:?}",
        first.host, cut.sources[0].last_error
    );
    assert!(cut.usable, "mlspp, cut off, keeps its copy: {cut:#?}");
    let (held, last_success) = (cut.serial, cut.sources[0].last_success.clone());
    let expires = signed_at(held) + VALID_FOR;
    let left = expires
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(
        left > MARGIN && left <= VALID_FOR,
        "mlspp's copy (serial {held}) should have {MARGIN:?} to {VALID_FOR:?} left, has {left:?}"
    );
    let moj_then = moj.status(&fed).await;
    let moj_then = moj
        .until_status(&fed, "moj took a newer copy over its link", |s| {
            s.usable
                && s.serial > moj_then.serial
                && s.sources[0].last_success != moj_then.sources[0].last_success
        })
        .await;

    // Until shortly before its copy expires, mlspp gets nothing newer, and
    // no exchange fails.
    while SystemTime::now() + MARGIN < expires {
        let status = mlspp.status(&fed).await;
        assert!(
            status.usable
                && status.serial == held
                && status.sources[0].last_success == last_success,
            "mlspp, cut off, keeps its copy and takes none: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    load.finish().await.report("mlspp cut off, its copy valid");
    let moj_now = moj.status(&fed).await;
    assert!(
        moj_now.usable && moj_now.serial > moj_then.serial,
        "moj, on the other link, kept taking newer copies: {moj_now:#?}"
    );

    // Still cut, past the expiry: refused as stale.
    until(&channel, &parent, is_stale).await;
    let refused = get_person(&channel, &parent, "child-benefit")
        .await
        .unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "globalconf.stale");
    println!("still cut, past the expiry: {:?}", refused.message());
    let status = mlspp.status(&fed).await;
    assert!(
        !status.usable && status.reason == "globalconf.stale",
        "{status:#?}"
    );

    // The link back: a newer copy within a few refreshes.
    let restored = Instant::now();
    partition.set(0, "up");
    let back = mlspp
        .until_status(&fed, "mlspp took a newer copy", |s| {
            s.usable && s.serial > held
        })
        .await;
    let took = restored.elapsed();
    println!(
        "link {} up: mlspp took a newer copy (serial {}) after {took:?}",
        first.host, back.serial
    );
    assert!(took < BACK_WITHIN, "took {took:?} with a refresh of 1 s");
    until(&channel, &parent, Result::is_ok).await;
    fed.shutdown().await;
}
