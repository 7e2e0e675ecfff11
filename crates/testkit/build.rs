//! Compiles the mock registries' protos (`proto/kz`) with protox, a pure-Rust
//! protobuf compiler, so that building kopir needs no system `protoc`.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "kz/population/v1/population.proto",
    "kz/income/v1/income.proto",
    "kz/realty/v1/realty.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.join("kz").display());
    let fds = protox::compile(PROTOS, [&root])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
