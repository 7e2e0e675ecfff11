//! The `kopir` binary: every subcommand ([`cli`]): a security server, the
//! governance and consent authorities, the audit and access-report tools,
//! the development PKI and mock registries, the demo and the benchmarks
//! ([`bench`]).

mod bench;
mod cli;

use clap::Parser;

// Security servers allocate and free small buffers on every call (HTTP/2
// frames, headers, protobuf, audit records) from many threads; mimalloc does
// that with less contention and fragmentation than the system allocator
// (docs/performance.md). It is built without transparent huge pages
// (`no_thp`): with them, each 2 MiB region it touches becomes resident, which
// raises a server's memory by about half for no measurable speed.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    // The demo and the benchmarks print their own story; servers log their
    // lifecycle. The HTTP/2 library warns about every protocol error a client
    // makes (a rapid reset, a CONTINUATION flood), which anyone can cause as
    // often as they like: those stay at `error` unless `RUST_LOG` asks.
    let default_filter = match cli.command {
        cli::Command::Demo(_) | cli::Command::Bench(_) => "warn,h2=error",
        _ => "warn,kopir=info,h2=error",
    };
    // A log line that cannot be written is dropped, never a panic.
    kopir_core::logging::init(default_filter);
    match cli.run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            kopir_core::logging::print_stderr(&format!("error: {e:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}
