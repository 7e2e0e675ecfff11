//! The client examples in examples/python, run against `kopir demo --serve`
//! as a stranger would: the binary and the Python programs as processes,
//! the ports and files read from the demo's `--- how to call ---` block.
//!
//! The Python comes from `KOPIR_EXAMPLES_PYTHON`, which `scripts/test` sets
//! to its virtual environment (target/python-venv).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

/// `kopir demo --serve`, killed when dropped (also when a test panics).
struct Demo {
    child: Child,
    info: BTreeMap<String, String>,
    _dir: tempfile::TempDir,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Demo {
    fn start() -> Demo {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_kopir"))
            .args(["demo", "--serve", "--dir"])
            .arg(dir.path().join("demo"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kopir demo --serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut demo = Demo {
            child,
            info: BTreeMap::new(),
            _dir: dir,
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut inside = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line == "--- how to call ---" {
                    inside = true;
                } else if line == "--- end ---" {
                    let _ = tx.send(None);
                } else if inside && let Some((k, v)) = line.split_once(' ') {
                    let _ = tx.send(Some((k.to_owned(), v.trim().to_owned())));
                }
            }
        });
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(Some((k, v))) => {
                    demo.info.insert(k, v);
                }
                Ok(None) => break,
                Err(e) => panic!("kopir demo --serve printed no how-to-call block: {e}"),
            }
        }
        demo
    }

    fn get(&self, key: &str) -> &str {
        self.info
            .get(key)
            .unwrap_or_else(|| panic!("kopir demo --serve printed no {key}"))
    }
}

fn python() -> PathBuf {
    let Some(p) = std::env::var_os("KOPIR_EXAMPLES_PYTHON") else {
        panic!(
            "KOPIR_EXAMPLES_PYTHON is not set: run the tests with scripts/test, which creates \
             target/python-venv with examples/python/requirements.txt and sets it"
        );
    };
    let p = PathBuf::from(p);
    assert!(
        p.exists(),
        "KOPIR_EXAMPLES_PYTHON={} does not exist: run scripts/test",
        p.display()
    );
    p
}

/// Runs an example; returns its exit success and its stdout.
fn run(example: &str, args: &[&str]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/python")
        .join(example);
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .output()
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "$ {example} {}\n{stdout}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), stdout)
}

fn client_args(d: &Demo) -> Vec<&str> {
    vec![
        "--addr",
        d.get("mlspp.client"),
        "--ca",
        d.get("ca"),
        "--cert",
        d.get("client.cert"),
        "--key",
        d.get("client.key"),
        "--subject",
        d.get("subject"),
    ]
}

#[test]
fn gateway_client_reads_a_person_and_shows_a_refusal() {
    // Fail before starting the demo if the environment is missing.
    python();
    let d = Demo::start();
    let iin = d.get("subject").trim_start_matches("iin:").to_owned();

    let (ok, out) = run("gateway_client.py", &client_args(&d));
    assert!(ok, "gateway_client.py failed:\n{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("person {iin} ")) && l.contains(", born ")),
        "{out}"
    );
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("request-id "))
        .expect("a request-id line");
    assert!(id.len() >= 8 && id != "-", "{out}");

    let mut args = client_args(&d);
    args.extend(["--purpose", "no-such-purpose"]);
    let (ok, out) = run("gateway_client.py", &args);
    assert!(!ok, "an unknown purpose must fail:\n{out}");
    assert!(
        out.contains("refused INVALID_ARGUMENT purpose.unknown"),
        "{out}"
    );
}

#[test]
fn consent_token_is_refused_without_and_answered_with_a_token() {
    python();
    let d = Demo::start();
    let mut args = client_args(&d);
    args.extend([
        "--consent",
        d.get("consent"),
        "--portal-cert",
        d.get("portal.cert"),
        "--portal-key",
        d.get("portal.key"),
    ]);
    let (ok, out) = run("consent_token.py", &args);
    assert!(ok, "consent_token.py failed:\n{out}");
    assert!(
        out.contains("without-token refused PERMISSION_DENIED consent.missing"),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("consent ")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("token ey")), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("property ") && l.contains(" m2 at ")),
        "{out}"
    );
}

#[test]
fn access_report_names_the_reader_and_purpose() {
    python();
    let d = Demo::start();
    let (ok, out) = run("gateway_client.py", &client_args(&d));
    assert!(ok, "gateway_client.py failed:\n{out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("request-id "))
        .expect("a request-id line")
        .to_owned();
    let (ok, out) = run(
        "access_report.py",
        &[
            "--server",
            d.get("moj.peer"),
            "--server",
            d.get("src.peer"),
            "--ca",
            d.get("ca"),
            "--cert",
            d.get("portal.cert"),
            "--key",
            d.get("portal.key"),
            "--signing-cert",
            d.get("portal.signing.cert"),
            "--signing-key",
            d.get("portal.signing.key"),
            "--subject",
            d.get("subject"),
        ],
    );
    assert!(ok, "access_report.py failed:\n{out}");
    assert!(
        out.lines().any(|l| l.starts_with("entry ")
            && l.contains("KZ/GOV/MLSPP/benefits read GetPerson of KZ/GOV/MOJ/population")
            && l.contains("for child-benefit under law ")
            && l.ends_with(&format!("query {id}"))),
        "{out}"
    );
    assert!(out.contains("server KZ/GOV/MOJ/ss1 1 entries"), "{out}");
}
