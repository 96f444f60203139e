//! The command line: `--help`, `--version`, or (no arguments) serve until SIGTERM.

use std::process::ExitCode;

use tokio::net::TcpListener;

use crate::config::{Config, ConfigError};

/// Exit code for a missing or malformed setting (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// The whole program; `main.rs` only calls this.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {}
        Some("-h" | "--help") => {
            print!("{}", Config::help());
            return ExitCode::SUCCESS;
        }
        Some("-V" | "--version") => {
            println!("zoom-integration {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!(
                "zoom-integration: unknown argument {:?}; see --help",
                crate::ids::truncate(other, 64)
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    }

    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => return config_error(&err),
    };
    crate::telemetry::init(config.log_format, &config.log_filter);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("zoom-integration: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let http = match TcpListener::bind(config.http_addr).await {
            Ok(l) => l,
            Err(e) => {
                return config_error(&ConfigError::new(
                    "HTTP_ADDR",
                    format!("cannot listen on {}: {e}", config.http_addr),
                ));
            }
        };
        let grpc = match TcpListener::bind(config.grpc_addr).await {
            Ok(l) => l,
            Err(e) => {
                return config_error(&ConfigError::new(
                    "GRPC_ADDR",
                    format!("cannot listen on {}: {e}", config.grpc_addr),
                ));
            }
        };
        match crate::run(config, http, grpc, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => match err.downcast_ref::<ConfigError>() {
                Some(config_err) => config_error(config_err),
                None => {
                    tracing::error!(error = format!("{err:#}"), "zoom-integration failed");
                    eprintln!("zoom-integration: {err:#}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}

fn config_error(err: &ConfigError) -> ExitCode {
    eprintln!("zoom-integration: configuration error: {err}");
    ExitCode::from(EXIT_CONFIG)
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
