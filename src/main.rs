//! Parses the command line, loads the configuration, starts logging and runs.

use std::process::ExitCode;

/// jemalloc rather than glibc's allocator: hyper and the pipeline allocate and free many small
/// buffers per request, which cost a fifth of lfguard's user CPU in glibc malloc (bench/compare.sh
/// measured 25% less user time per request, for 1 MiB more idle RSS).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use clap::Parser;
use lfguard::cli::{self, Cli, Command, ConfigArg};
use lfguard::config::{self, Config};

/// EX_USAGE from sysexits.h: the configuration is invalid.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    match Cli::parse().into_command() {
        Command::Serve(args) => match load(&args) {
            Ok(config) => serve(config, args.config),
            Err(code) => code,
        },
        Command::CheckConfig(args) => match load(&args) {
            Ok(config) => {
                // The files were checked by `load`; as TOML comments, the output still parses.
                for note in config.certificates().unwrap_or_default() {
                    println!("# {note}");
                }
                print!("{}", config.redacted_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Sign(args) => report(cli::sign(&args).map(|()| true)),
        Command::Verify(args) => report(cli::verify(&args)),
        Command::Send(args) => report(runtime(0).block_on(cli::send(&args))),
        Command::Echo(args) => report(runtime(1).block_on(cli::echo(&args)).map(|()| true)),
        Command::Demo(args) => report(runtime(0).block_on(cli::demo(&args))),
        Command::Spool(args) => match load(&ConfigArg {
            config: args.config.clone(),
        }) {
            Ok(config) => report(runtime(1).block_on(cli::spool(&args, &config))),
            Err(code) => code,
        },
    }
}

fn load(args: &ConfigArg) -> Result<Config, ExitCode> {
    config::load(args.config.as_deref()).map_err(|err| {
        eprint!("lfguard: {err}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn serve(config: Config, path: Option<std::path::PathBuf>) -> ExitCode {
    lfguard::telemetry::logging::init(&config.log);
    let result = runtime(config.server.worker_threads).block_on(lfguard::server::run(config, path));
    lfguard::telemetry::logging::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "lfguard cannot start");
            eprintln!("lfguard: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `Ok(true)` → 0, `Ok(false)` → 1, `Err` → 2 with the message.
fn report(result: Result<bool, String>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("lfguard: {err}");
            ExitCode::from(2)
        }
    }
}

/// One worker thread runs on tokio's current-thread scheduler, which skips the work-stealing
/// machinery that a single worker cannot use; otherwise the multi-thread scheduler.
fn runtime(worker_threads: usize) -> tokio::runtime::Runtime {
    let mut builder = if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    // Buffered log lines go out whenever a worker runs out of work (see `logging`).
    builder
        .enable_all()
        .on_thread_park(lfguard::telemetry::logging::flush);
    if worker_threads > 1 {
        builder.worker_threads(worker_threads);
    }
    builder.build().expect("the tokio runtime starts")
}
