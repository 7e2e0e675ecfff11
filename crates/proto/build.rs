//! Compiles kopir's own protos (`proto/kopir/v1`) with protox, a pure-Rust
//! protobuf compiler, so that building kopir needs no system `protoc`. The
//! encoded descriptor set is kept in OUT_DIR for gRPC reflection.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "kopir/v1/exchange.proto",
    "kopir/v1/audit.proto",
    "kopir/v1/consent.proto",
    "kopir/v1/report.proto",
    "kopir/v1/status.proto",
    "kopir/v1/management.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.join("kopir").display());
    let fds = protox::compile(PROTOS, [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("kopir_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .bytes(".kopir.v1")
        .compile_fds(fds)?;
    Ok(())
}
