//! The `kopir` binary: parse the command line and dispatch.

use clap::Parser;

// Security servers allocate and free small buffers on every call (HTTP/2
// frames, headers, protobuf, audit records) from many threads; mimalloc does
// that with less contention and fragmentation than the system allocator
// (README, "Performance").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = kopir::cli::Cli::parse();
    // The demo and the benchmarks print their own story; servers log their
    // lifecycle.
    let default_filter = match cli.command {
        kopir::cli::Command::Demo(_) | kopir::cli::Command::Bench(_) => "warn",
        _ => "warn,kopir=info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
