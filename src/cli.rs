//! The command line: `--help`, `--version`, `setup-link`, `redrive-dead-letters`,
//! `healthcheck`, or (no arguments) serve until SIGTERM.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

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
        Some("healthcheck") if args.len() == 1 => return healthcheck(),
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

/// How long `healthcheck` waits for the whole answer's status line, connecting included.
const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// `healthcheck`: `GET /healthz` on the configured `HTTP_ADDR`, for a container's
/// `HEALTHCHECK` (the runtime image has no shell or curl). Exit 0 on a 200 and 1 on anything
/// else, a configuration error included: Docker reads 1 as unhealthy and reserves 2.
fn healthcheck() -> ExitCode {
    let addr = match Config::http_addr_from_env() {
        Ok(addr) => probe_address(addr),
        Err(err) => {
            eprintln!("zoom-integration: unhealthy: configuration error: {err}");
            return ExitCode::FAILURE;
        }
    };
    match get_status(addr, "/healthz", HEALTHCHECK_TIMEOUT) {
        Ok(200) => {
            println!("zoom-integration: healthy: GET http://{addr}/healthz answered 200");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            eprintln!("zoom-integration: unhealthy: GET http://{addr}/healthz answered {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("zoom-integration: unhealthy: GET http://{addr}/healthz: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where to reach a listener bound to `addr`: an unspecified address (every interface) is
/// reached on loopback.
fn probe_address(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// The status code of a plain HTTP/1.1 `GET path` to `addr`, all within `timeout`.
fn get_status(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<u16> {
    use std::io::{Error, ErrorKind, Read, Write};
    let deadline = Instant::now() + timeout;
    let timed_out = || {
        Error::new(
            ErrorKind::TimedOut,
            format!("no answer within {} s", timeout.as_secs_f32()),
        )
    };
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or_else(timed_out)
    };
    // A read or write past its timeout fails with WouldBlock on Unix.
    let in_time = |e: Error| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => timed_out(),
        _ => e,
    };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(in_time)?;
    stream.set_write_timeout(Some(left()?))?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .map_err(in_time)?;
    let mut head = Vec::new();
    let mut chunk = [0; 256];
    let line_end = loop {
        if let Some(end) = head.windows(2).position(|w| w == b"\r\n") {
            break end;
        }
        if head.len() > 1024 {
            return Err(Error::new(ErrorKind::InvalidData, "no HTTP status line"));
        }
        stream.set_read_timeout(Some(left()?))?;
        match stream.read(&mut chunk).map_err(in_time)? {
            0 => {
                return Err(Error::new(
                    ErrorKind::UnexpectedEof,
                    "the connection closed before an answer",
                ));
            }
            n => head.extend_from_slice(&chunk[..n]),
        }
    };
    // `HTTP/1.1 200 OK`
    let line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = line.split(' ');
    match (parts.next(), parts.next().map(str::parse::<u16>)) {
        (Some(version), Some(Ok(status))) if version.starts_with("HTTP/1.") => Ok(status),
        _ => Err(Error::new(
            ErrorKind::InvalidData,
            format!("not an HTTP answer: {:?}", crate::ids::truncate(&line, 64)),
        )),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_interface_is_probed_on_loopback() {
        let probe = |a: &str| probe_address(a.parse().unwrap()).to_string();
        assert_eq!(probe("0.0.0.0:9980"), "127.0.0.1:9980");
        assert_eq!(probe("[::]:9980"), "[::1]:9980");
        assert_eq!(probe("10.1.2.3:9980"), "10.1.2.3:9980");
        assert_eq!(probe("[fe80::1]:1"), "[fe80::1]:1");
    }

    /// A listener that answers one connection with `answer`, after reading its request.
    fn answering(answer: &'static [u8]) -> SocketAddr {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0; 1024];
            let n = conn.read(&mut request).unwrap();
            assert!(request[..n].starts_with(b"GET /healthz HTTP/1.1\r\n"));
            let _ = conn.write_all(answer);
        });
        addr
    }

    #[test]
    fn the_status_line_gives_the_status() {
        let timeout = Duration::from_secs(2);
        let ok = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}");
        assert_eq!(get_status(ok, "/healthz", timeout).unwrap(), 200);
        let busy = answering(b"HTTP/1.1 503 Service Unavailable\r\n\r\n");
        assert_eq!(get_status(busy, "/healthz", timeout).unwrap(), 503);
        let garbage = answering(b"SSH-2.0-OpenSSH\r\n");
        let err = get_status(garbage, "/healthz", timeout).unwrap_err();
        assert!(err.to_string().contains("not an HTTP answer"), "{err}");
        let closed = answering(b"");
        let err = get_status(closed, "/healthz", timeout).unwrap_err();
        assert!(err.to_string().contains("closed before an answer"), "{err}");
    }

    #[test]
    fn a_listener_that_never_answers_times_out() {
        // Connections queue in the backlog: connected, never answered.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let started = Instant::now();
        let err = get_status(
            silent.local_addr().unwrap(),
            "/healthz",
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("no answer within 0.3 s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
