//! The `kopir` binary: parse the command line and dispatch.

use clap::Parser;

// Security servers allocate and free small buffers on every call (HTTP/2
// frames, headers, protobuf, audit records) from many threads; mimalloc does
// that with less contention and fragmentation than the system allocator
// (README, "Performance"). It is built without transparent huge pages
// (`no_thp`): with them, each 2 MiB region it touches becomes resident, and
// a server used about 56-60 MiB at 64 calls in flight instead of 37-40 MiB,
// for no measurable speed.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = kopir::cli::Cli::parse();
    // The demo and the benchmarks print their own story; servers log their
    // lifecycle. The HTTP/2 library warns about every protocol error a client
    // makes (a rapid reset, a CONTINUATION flood), which anyone can cause as
    // often as they like: those stay at `error` unless `RUST_LOG` asks.
    let default_filter = match cli.command {
        kopir::cli::Command::Demo(_) | kopir::cli::Command::Bench(_) => "warn,h2=error",
        _ => "warn,kopir=info,h2=error",
    };
    // A log line that cannot be written is dropped, never a panic.
    kopir::logging::init(default_filter);
    match cli.run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            kopir::logging::print_stderr(&format!("error: {e:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}
