//! docker-compose.yml checked against the files it names, as no Docker
//! engine runs here: every command's configuration loads, every address in
//! them names a service of the file on the port that service listens on,
//! and the servers share no volume with the authority: their anchor trusts
//! its certificate and names its container as the source.

use std::{collections::BTreeMap, net::SocketAddr, path::Path};

use kopir_consent::config::ConsentConfig;
use kopir_core::globalconf::{anchor::Location, describe::Federation};
use kopir_server::config::ServerConfig;

/// Each service of the compose file with its command's arguments (the file
/// writes them as JSON arrays, which they are).
fn services(compose: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut command: Option<String> = None;
    for line in compose.lines() {
        if let Some(name) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':'))
            && !name.starts_with(' ')
        {
            current = Some(name.to_owned());
        }
        if let Some(text) = &mut command {
            text.push_str(line);
        } else if let Some(rest) = line.trim_start().strip_prefix("command:") {
            command = Some(rest.to_owned());
        }
        if let Some(text) = &command
            && text.trim_end().ends_with(']')
        {
            let args: Vec<String> = serde_json::from_str(text.trim()).expect("a JSON array");
            let name = current.clone().expect("a command inside a service");
            out.insert(name, args);
            command = None;
        }
    }
    out
}

/// The value after `flag` in `args`.
fn arg<'a>(args: &'a [String], flag: &str) -> &'a str {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    &args[at + 1]
}

/// The port of `host:port`.
fn port(address: &str) -> u16 {
    address.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[test]
fn compose_file_matches_the_configurations_it_names() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let compose = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    let services = services(&compose);
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    for folder in ["deploy", "certs-dev"] {
        assert!(
            dockerfile.contains(&format!("COPY {folder} ")),
            "the image lacks {folder}/"
        );
    }

    // What each service listens on, by its command.
    let mut listens: BTreeMap<&str, Vec<u16>> = BTreeMap::new();
    let mut servers = BTreeMap::new();
    let mut sources = vec![];
    let mut federation = None;
    for (name, args) in &services {
        match (args[0].as_str(), args.get(1).map(String::as_str)) {
            ("serve", _) => {
                let config = ServerConfig::load(&root.join(arg(args, "--config"))).unwrap();
                let ports = [
                    Some(config.listen.client),
                    Some(config.listen.peer),
                    config.listen.admin,
                ];
                listens.insert(name, ports.iter().flatten().map(SocketAddr::port).collect());
                servers.insert(name.as_str(), config);
            }
            ("consent", Some("serve")) => {
                let config = ConsentConfig::load(&root.join(arg(args, "--config"))).unwrap();
                listens.insert(name, vec![config.listen.port()]);
                sources.push((name.clone(), config.globalconf.clone()));
            }
            ("registry", Some("mock")) => {
                listens.insert(name, vec![port(arg(args, "--listen"))]);
            }
            ("authority", Some("serve")) => {
                federation = Some(Federation::load(&root.join(arg(args, "--federation"))).unwrap());
                listens.insert(name, vec![port(arg(args, "--listen"))]);
            }
            other => panic!("service {name} runs an unknown command {other:?}"),
        }
    }
    let federation = federation.expect("an authority service publishing over the network");
    assert!(
        !compose.contains("volumes:"),
        "the containers share a volume: servers must download the configuration"
    );
    let reaches = |what: &str, address: &str| {
        let (host, _) = address.rsplit_once(':').unwrap();
        let host = host
            .trim_start_matches("http://")
            .trim_start_matches("https://");
        let ports = listens.get(host).unwrap_or_else(|| {
            panic!("{what} names {host}, which is no service of docker-compose.yml")
        });
        assert!(
            ports.contains(&port(address)),
            "{what}: {host} does not listen on {address}"
        );
    };

    assert_eq!(servers.len(), 3, "{:?}", servers.keys());
    sources.extend(
        servers
            .iter()
            .map(|(n, c)| (n.to_string(), c.globalconf.clone())),
    );
    let authority_cert = kopir_core::pki::sign::VerifyingKey::load(
        &kopir_core::pki::layout::DevLayout::new(federation.certs.clone().unwrap())
            .authority_cert(),
    )
    .unwrap();
    for (name, source) in &sources {
        assert!(
            source.path.is_none(),
            "{name} reads a file, not the network"
        );
        let anchor = source.anchor().unwrap();
        assert_eq!(
            anchor.instance.as_deref(),
            Some(federation.instance.as_str())
        );
        assert!(
            anchor
                .keys
                .iter()
                .any(|k| k.key_id() == authority_cert.key_id()),
            "{name}'s anchor does not trust the authority's certificate"
        );
        for location in &anchor.sources {
            let Location::Web(uri) = location else {
                panic!("{name}: {location} is no network source");
            };
            assert_eq!(uri.path(), "/globalconf/v1/globalconf.json");
            reaches(
                &format!("{name}: global configuration source"),
                &format!("{}:{}", uri.host().unwrap(), uri.port_u16().unwrap_or(80)),
            );
        }
    }
    for (name, config) in &servers {
        for service in &config.services {
            reaches(
                &format!("{name}: registry of {}", service.id),
                &service.endpoint,
            );
        }
    }
    for member in &federation.members {
        for server in &member.servers {
            reaches(
                &format!("federation: server {}/{}", member.id, server.code),
                &server.address,
            );
            let (host, _) = server.address.rsplit_once(':').unwrap();
            let config = &servers[host];
            assert_eq!(
                config.server_id.to_string(),
                format!("{}/{}", member.id, server.code)
            );
            assert_eq!(config.listen.peer.port(), port(&server.address));
        }
    }
    if let Some(consent) = &federation.consent_authority {
        reaches("federation: consent authority", &consent.address);
    }
}
