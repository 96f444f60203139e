//! The command line: `--help`, `--version`, `setup-link`, `redrive-dead-letters`, or (no
//! arguments) serve until SIGTERM.

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
        Some("setup-link") => return setup_link(&args[1..]),
        Some("redrive-dead-letters") if args.len() == 1 => return redrive_dead_letters(),
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
    crate::http::server::raise_open_files_limit();

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
    let code = runtime.block_on(async move {
        let stop_signal = shutdown_signal();
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
        match crate::run(config, http, grpc, stop_signal).await {
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
    });
    // A blocking task stuck on the disk (a commit past its grace) must not keep the process
    // alive after it said it stopped.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// `redrive-dead-letters`: moves the outbox's dead letters back into it (the service must be
/// stopped: the outbox's lock says so).
fn redrive_dead_letters() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => return config_error(&err),
    };
    match crate::webhook::outbox::redrive_dead_letters(&config.data_dir) {
        Ok(moved) => {
            println!(
                "zoom-integration: {moved} dead letters moved back into the outbox; they are delivered when the service starts"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("zoom-integration: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `setup-link <connection id> [origin]`: prints a signed link to the connection's setup
/// page, made with the same configuration (and key) the service uses.
fn setup_link(args: &[String]) -> ExitCode {
    let (Some(cid), origin, None) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("zoom-integration: usage: zoom-integration setup-link <connection id> [origin]");
        return ExitCode::from(EXIT_CONFIG);
    };
    let cid = match crate::ids::ConnectionId::parse(cid) {
        Ok(cid) => cid,
        Err(e) => {
            eprintln!("zoom-integration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let origin = origin.map_or("", String::as_str);
    if let Err(e) = crate::setup::form::check_origin(origin) {
        eprintln!("zoom-integration: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => return config_error(&err),
    };
    if config.webhook_address.is_none() {
        return config_error(&ConfigError::new(
            "WEBHOOK_ADDRESS",
            "is required to make a link people can open",
        ));
    }
    // A link signed with a key the service does not have would be refused: the key is never
    // made here, only read.
    let keys = match crate::crypto::Keys::load(config.secret_key.as_ref(), &config.data_dir) {
        Ok(Some(keys)) => keys,
        Ok(None) => {
            return config_error(&ConfigError::new(
                "SECRET_KEY",
                format!(
                    "is not set and DATA_DIR ({}) holds no {}: start the service once with this \
                     configuration, or set SECRET_KEY as the service has it",
                    config.data_dir.display(),
                    crate::crypto::KEY_FILE
                ),
            ));
        }
        Err(err) => return config_error(&err),
    };
    let links = crate::setup::links::SetupLinks::new(
        *keys.link_signing_key(),
        config.setup_link_ttl,
        config.setup_access,
    );
    let link = links.issue(&config, &cid, origin);
    println!("{}", link.url.unwrap_or_default());
    eprintln!(
        "valid for {} seconds (SETUP_LINK_TTL)",
        config.setup_link_ttl.as_secs()
    );
    ExitCode::SUCCESS
}

fn config_error(err: &ConfigError) -> ExitCode {
    eprintln!("zoom-integration: configuration error: {err}");
    ExitCode::from(EXIT_CONFIG)
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is called, not when
/// the future is first polled, so a SIGTERM during start-up (opening the databases) is not
/// lost to the default action and still stops the service gracefully.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
                // A second signal means now: answered webhooks are already durable.
                tokio::spawn(async move {
                    let code = tokio::select! {
                        _ = term.recv() => 128 + libc::SIGTERM,
                        _ = int.recv() => 128 + libc::SIGINT,
                    };
                    tracing::warn!(
                        "second signal received; exiting without finishing the shutdown"
                    );
                    std::process::exit(code);
                });
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM and SIGINT; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
