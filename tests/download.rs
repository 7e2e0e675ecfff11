//! The global configuration over the network, with every part its own
//! process (see [`federation_net`]): the authority over HTTPS, a plain file
//! server as an untrusted mirror, the consumer's and provider's servers.
//!
//! - A mirror serving a forged, truncated, oversized or rolled-back copy is
//!   refused and the next source (the authority) used.
//! - The authority and the mirror down: exchanges go on with the copy in
//!   use; a server restarted then starts from its kept copy; past the
//!   expiry, `globalconf.stale`; the authority back: served again within a
//!   refresh (the time it took is printed).
//! - The authority's key rotated under continuous load: announced, then
//!   used; no call fails (the calls made and failed are printed).

use std::{process::Command, time::Duration};

use kopir_core::durable::write_atomically;
use tonic::Code;

mod common;
mod federation_net;
mod serve_process;

use common::{assert_refused, until};
use federation_net::{Load, MAX_BYTES, Net};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_download_from_the_authority_and_a_plain_file_mirror() {
    let mut net = Net::start().await;
    let status = net
        .mlspp
        .until_status(&net.fed, "used the authority", |s| {
            s.checked_from == net.authority_url
        })
        .await;
    assert!(
        status.usable && status.obtained_from == net.authority_url,
        "{status:#?}"
    );
    let published = net.dir.join("globalconf.json");
    let mirrored = net.folder.join("globalconf.json");
    let rolled_back = std::fs::read(&published).unwrap();

    // A mirror is tried once the authority is down; what it serves is
    // refused when bad, and the authority, back, is used instead.
    let oversized = [b' '; MAX_BYTES + 1].to_vec();
    let truncated = {
        let good = std::fs::read(&published).unwrap();
        good[..good.len() / 2].to_vec()
    };
    let forged = String::from_utf8(std::fs::read(&published).unwrap())
        .unwrap()
        .replace("\"signature\": \"", "\"signature\": \"AAAA")
        .into_bytes();
    for (bad, why) in [
        (forged, "forged or altered"),
        (truncated, "not a signed global configuration"),
        (oversized, "larger than the limit"),
        (rolled_back, "rollback refused"),
    ] {
        write_atomically(&mirrored, &std::fs::read(&published).unwrap()).unwrap();
        drop(net.authority.take());
        net.mlspp
            .until_status(&net.fed, "used the mirror", |s| {
                s.checked_from == net.mirror_url
            })
            .await;
        write_atomically(&mirrored, &bad).unwrap();
        net.restart_authority(&[]);
        let status = net
            .mlspp
            .until_status(
                &net.fed,
                &format!("refused the mirror's copy ({why})"),
                |s| s.sources[1].last_error.contains(why) && s.checked_from == net.authority_url,
            )
            .await;
        assert!(status.usable, "{status:#?}");
        net.exchange().await.unwrap();
    }

    // No source at all: exchanges go on with the copy in use, and a server
    // restarted now starts from the copy it kept.
    std::fs::remove_file(&mirrored).unwrap();
    drop(net.authority.take());
    net.mlspp
        .until_status(&net.fed, "found no source", |s| {
            s.sources.iter().all(|source| !source.last_error.is_empty())
                && s.sources[1].last_error.contains("HTTP 404")
        })
        .await;
    net.exchange().await.unwrap();
    net.mlspp.restart();
    net.channel = net.mlspp.process.benefits_channel(&net.fed).await;
    net.exchange().await.unwrap();
    let status = net.mlspp.status(&net.fed).await;
    assert!(status.obtained_from.starts_with("kept copy"), "{status:#?}");

    // Past the expiry: refused as stale. The authority back: served again.
    until(&net.channel, &net.parent, |r| {
        r.as_ref().is_err_and(|s| {
            s.metadata()
                .get("kopir-error")
                .is_some_and(|v| v == "globalconf.stale")
        })
    })
    .await;
    let refused = net.exchange().await.unwrap_err();
    assert_refused(&refused, Code::FailedPrecondition, "globalconf.stale");
    net.restart_authority(&[]);
    let served_after = until(&net.channel, &net.parent, Result::is_ok).await;
    println!("the authority back: exchanges served again after {served_after:?}");
    assert!(
        served_after < Duration::from_secs(4),
        "took {served_after:?} with a refresh of 1 s"
    );
    net.fed.shutdown().await;
}

/// The authority's key rotated under continuous load with the anchor made
/// before it: the next key (made with openssl) is announced, then signs;
/// both servers follow, no call fails, and a server restarted afterwards
/// starts from its kept copy, which the anchor's key did not sign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authority_key_rotates_under_load() {
    let mut net = Net::start().await;
    let (next_key, next_cert) = (net.dir.join("next.key"), net.dir.join("next.crt"));
    let openssl = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    openssl(&[
        "genpkey".as_ref(),
        "-algorithm".as_ref(),
        "ed25519".as_ref(),
        "-out".as_ref(),
        next_key.as_os_str(),
    ]);
    openssl(&[
        "req".as_ref(),
        "-new".as_ref(),
        "-x509".as_ref(),
        "-days".as_ref(),
        "30".as_ref(),
        "-subj".as_ref(),
        "/CN=kopir authority next".as_ref(),
        "-key".as_ref(),
        next_key.as_os_str(),
        "-out".as_ref(),
        next_cert.as_os_str(),
    ]);
    let next_id = hex::encode(kopir_core::pki::cert_fingerprint(&next_cert).unwrap().0);
    let load = Load::start(&net);

    // Announced: both servers trust both keys.
    net.restart_authority(&["--announce".as_ref(), next_cert.as_os_str()]);
    for server in [&net.mlspp, &net.moj] {
        server
            .until_status(&net.fed, "trusted the next key", |s| {
                s.authority_keys.len() == 2 && s.authority_keys.contains(&next_id)
            })
            .await;
    }
    // Used: the next key signs, and announces only itself.
    net.restart_authority(&[
        "--cert".as_ref(),
        next_cert.as_os_str(),
        "--key".as_ref(),
        next_key.as_os_str(),
    ]);
    for server in [&net.mlspp, &net.moj] {
        server
            .until_status(&net.fed, "took a copy the next key signed", |s| {
                s.usable && s.authority_keys == [next_id.clone()]
            })
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.finish()
        .await
        .report("authority key rotation under load");

    // With no source, the restarted server can only use its kept copy.
    drop(net.authority.take());
    net.mlspp.restart();
    net.channel = net.mlspp.process.benefits_channel(&net.fed).await;
    net.exchange().await.unwrap();
    let status = net.mlspp.status(&net.fed).await;
    assert!(
        status.obtained_from.starts_with("kept copy") && status.authority_keys == [next_id],
        "{status:#?}"
    );
    net.fed.shutdown().await;
}
