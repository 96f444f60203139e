//! Configuration: one typed struct, loaded once at start-up from the environment and,
//! optionally, a YAML file named by `CONFIG_FILE` (same keys in lower case; the environment wins).
//!
//! Every problem becomes a [`ConfigError`] that names the variable, in one line, without
//! echoing secret values.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::secret::Secret;

/// One variable the service reads: its name, its default (if any) and what it means.
/// This table drives `--help` and the check of YAML keys, so the two never drift apart.
pub struct Variable {
    /// Environment variable name (the YAML key is the same in lower case).
    pub name: &'static str,
    /// Default, as shown to operators; `None` when unset means "off" or "required".
    pub default: Option<&'static str>,
    /// One line on what it does.
    pub meaning: &'static str,
}

/// Every variable of the service, in the order `--help` lists them.
pub const VARIABLES: &[Variable] = &[
    Variable {
        name: "WEBHOOK_ADDRESS",
        default: None,
        meaning: "public address of this service, host[:port] only (no scheme, no path); needed for OAuth",
    },
    Variable {
        name: "WEBHOOK_SCHEME",
        default: Some("https"),
        meaning: "scheme of the public address: https, or http for local testing",
    },
    Variable {
        name: "ZOOM_CLIENT_ID",
        default: None,
        meaning: "client id of the server-wide default OAuth app",
    },
    Variable {
        name: "ZOOM_CLIENT_SECRET",
        default: None,
        meaning: "client secret of the default OAuth app (secret)",
    },
    Variable {
        name: "ZOOM_SECRET_TOKEN",
        default: None,
        meaning: "webhook secret token of the default OAuth app (secret)",
    },
    Variable {
        name: "ZOOM_OAUTH_URL",
        default: Some("https://zoom.us"),
        meaning: "Zoom OAuth server base URL",
    },
    Variable {
        name: "ZOOM_API_URL",
        default: Some("https://api.zoom.us/v2"),
        meaning: "Zoom REST API base URL",
    },
    Variable {
        name: "SETUP_ACCESS",
        default: Some("signed"),
        meaning: "who may open connection setup: signed (links from `setup-link` or SetupLinksService) or loopback (also any client on this machine)",
    },
    Variable {
        name: "SETUP_LINK_TTL",
        default: Some("900"),
        meaning: "seconds a signed setup link stays valid (60-86400)",
    },
    Variable {
        name: "OUTBOX_SYNC",
        default: Some("full"),
        meaning: "full: a webhook answered 200 survives power loss; normal: it survives a crash of this process, not of the machine (faster)",
    },
    Variable {
        name: "ZOOM_HTTP_TIMEOUT",
        default: Some("10"),
        meaning: "seconds (1-120) a request to Zoom may take, connecting included (a refresh gets at least 20)",
    },
    Variable {
        name: "OAUTH_STATE_TTL",
        default: Some("600"),
        meaning: "seconds a started OAuth flow stays valid, at most 600",
    },
    Variable {
        name: "TOKEN_KEEPALIVE_DAYS",
        default: Some("30"),
        meaning: "refresh OAuth connections whose refresh token has been idle this many days (1-80)",
    },
    Variable {
        name: "EVENT_RETENTION_DAYS",
        default: Some("30"),
        meaning: "days the embedded host keeps events in its event log, by their creation time (1-3650); older ones are deleted",
    },
    Variable {
        name: "HOST_UI_URL",
        default: None,
        meaning: "base URL of the host engine's web UI; a finished setup with origin web or dash returns there",
    },
    Variable {
        name: "MAX_CONCURRENT_REQUESTS",
        default: Some("1024"),
        meaning: "requests served at once (1-100000) by /zoom/event, as many by the other HTTP routes (probes have small pools of their own), and as many by the gRPC port as a whole; more are answered 503 (gRPC: RESOURCE_EXHAUSTED) at once",
    },
    Variable {
        name: "REQUEST_TIMEOUT",
        default: Some("30"),
        meaning: "seconds (1-600) one HTTP or gRPC request may take before it is answered 503 (gRPC: CANCELLED)",
    },
    Variable {
        name: "HTTP_ADDR",
        default: Some("0.0.0.0:9980"),
        meaning: "HTTP listener: connection page, OAuth, webhooks, health",
    },
    Variable {
        name: "GRPC_ADDR",
        default: Some("0.0.0.0:9981"),
        meaning: "gRPC listener: IntegrationsService, health, embedded host services",
    },
    Variable {
        name: "HOST_ENGINE_URL",
        default: None,
        meaning: "http://host:port of an AutoKitteh-compatible host engine (https:// for TLS); unset = embedded host",
    },
    Variable {
        name: "HOST_ENGINE_TOKEN",
        default: None,
        meaning: "bearer token sent to the host engine, if it requires one (secret)",
    },
    Variable {
        name: "DATA_DIR",
        default: Some("./data"),
        meaning: "embedded database, generated key, event outbox",
    },
    Variable {
        name: "SECRET_KEY",
        default: None,
        meaning: "key material (at least 32 characters) for OAuth state and secrets at rest; generated into DATA_DIR when unset (secret)",
    },
    Variable {
        name: "SHUTDOWN_TIMEOUT",
        default: Some("25"),
        meaning: "seconds (1-3600) in-flight requests get to finish after SIGTERM before the service exits anyway",
    },
    Variable {
        name: "WEBHOOK_REPLAY_WINDOW",
        default: Some("5400"),
        meaning: "seconds (60-86400) a webhook's timestamp may be from now (older or newer is refused), and for which the same body is forwarded only once",
    },
    Variable {
        name: "LOG_FORMAT",
        default: Some("text"),
        meaning: "log output: text or json",
    },
    Variable {
        name: "RUST_LOG",
        default: Some("info"),
        meaning: "log filter, e.g. info or zoom_integration=debug",
    },
    Variable {
        name: "CONFIG_FILE",
        default: None,
        meaning: "YAML file with the same keys in lower case; the environment wins",
    },
];

/// A configuration problem: which variable, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    /// The variable at fault, as operators spell it.
    pub variable: &'static str,
    /// What is wrong, in a few words; never contains a secret value.
    pub problem: String,
}

impl ConfigError {
    /// A problem with `variable`.
    pub fn new(variable: &'static str, problem: impl Into<String>) -> Self {
        Self {
            variable,
            problem: problem.into(),
        }
    }
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP, for local testing only.
    Http,
    /// HTTPS.
    Https,
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        })
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Who may use the connection-setup endpoints (`/zoom/`, `/zoom/save`, `/oauth/start/zoom`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SetupAccess {
    /// Only people holding a link signed by this service, for that connection.
    #[default]
    Signed,
    /// Also any client connecting from this machine (for local use; never behind a proxy).
    Loopback,
}

/// How hard the event outbox syncs a commit before a webhook is answered 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutboxSync {
    /// fsync the write-ahead log on every commit: survives power loss.
    #[default]
    Full,
    /// No fsync per commit: survives a crash of this process (even SIGKILL), not of the
    /// machine; the last commits before a power loss may be lost.
    Normal,
}

/// An OAuth app's client credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthApp {
    /// The app's client id.
    pub client_id: String,
    /// The app's client secret.
    pub client_secret: Secret,
}

/// An absolute http(s) URL with no query, fragment or credentials, kept without a trailing
/// slash so that paths can be appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl(String);

impl BaseUrl {
    /// `base` + `path`, where `path` starts with `/`.
    pub fn join(&self, path: &str) -> String {
        format!("{}{}", self.0, path)
    }

    /// The URL as text, without a trailing slash.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The service's whole configuration, loaded once at start-up.
#[derive(Debug, Clone)]
pub struct Config {
    /// `WEBHOOK_ADDRESS`: the public host\[:port\] at which Zoom and browsers reach this service.
    /// Without it, OAuth flows cannot start (there is no redirect URI).
    pub webhook_address: Option<String>,
    /// `WEBHOOK_SCHEME`: the scheme of the public address.
    pub webhook_scheme: Scheme,
    /// `ZOOM_CLIENT_ID` and `ZOOM_CLIENT_SECRET`: the server-wide default OAuth app, if configured.
    pub default_app: Option<OAuthApp>,
    /// `ZOOM_SECRET_TOKEN`: the default app's webhook secret token.
    pub zoom_secret_token: Option<Secret>,
    /// `ZOOM_OAUTH_URL`: base of `/oauth/authorize` and `/oauth/token` (`/oauth/revoke` is not used).
    pub zoom_oauth_url: BaseUrl,
    /// `ZOOM_API_URL`: base of the REST API.
    pub zoom_api_url: BaseUrl,
    /// `SETUP_ACCESS`: who may use the connection-setup endpoints.
    pub setup_access: SetupAccess,
    /// `SETUP_LINK_TTL`: how long a signed setup link stays valid.
    pub setup_link_ttl: std::time::Duration,
    /// `OUTBOX_SYNC`: how durable a webhook is when it is answered 200.
    pub outbox_sync: OutboxSync,
    /// `ZOOM_HTTP_TIMEOUT`: how long one request to Zoom may take, connecting included.
    pub zoom_http_timeout: std::time::Duration,
    /// `OAUTH_STATE_TTL`: how long a started OAuth flow (its signed `state`) stays valid.
    pub oauth_state_ttl: std::time::Duration,
    /// `TOKEN_KEEPALIVE_DAYS`: OAuth connections whose refresh token has not been used for
    /// this long are refreshed by the keep-alive task (Zoom drops refresh tokens unused for
    /// about 90 days).
    pub token_keepalive: std::time::Duration,
    /// `EVENT_RETENTION_DAYS`: how long the embedded host keeps an event in its event log,
    /// counted from the event's creation time; older events are deleted hourly.
    pub event_retention: std::time::Duration,
    /// `HOST_UI_URL`: the host engine's web UI, where a finished connection setup returns
    /// when the host asked for it (`origin` = `web` or `dash`); `None` shows our own page.
    pub host_ui_url: Option<BaseUrl>,
    /// `MAX_CONCURRENT_REQUESTS`: requests served at once by each of the two HTTP pools
    /// (`/zoom/event`, and the rest but the probes), and by the gRPC port as a whole.
    pub max_concurrent_requests: usize,
    /// `REQUEST_TIMEOUT`: how long one HTTP or gRPC request may take.
    pub request_timeout: std::time::Duration,
    /// `HTTP_ADDR`: where the HTTP server listens.
    pub http_addr: SocketAddr,
    /// `GRPC_ADDR`: where the gRPC server listens.
    pub grpc_addr: SocketAddr,
    /// `HOST_ENGINE_URL`: a remote host engine; `None` runs the embedded host.
    pub host_engine_url: Option<BaseUrl>,
    /// `HOST_ENGINE_TOKEN`: bearer token for the remote host engine.
    pub host_engine_token: Option<Secret>,
    /// `DATA_DIR`: the embedded database, the generated key and the event outbox.
    pub data_dir: PathBuf,
    /// `SECRET_KEY`: key material; `None` means "generate or reuse `DATA_DIR/secret.key`".
    pub secret_key: Option<Secret>,
    /// `SHUTDOWN_TIMEOUT`: after SIGTERM, how long in-flight requests (and open streams) get
    /// before the service exits anyway.
    pub shutdown_timeout: std::time::Duration,
    /// `WEBHOOK_REPLAY_WINDOW`: how far a webhook's `x-zm-request-timestamp` may be from now,
    /// and how long a body is remembered so that a re-sent webhook is forwarded only once.
    pub webhook_replay_window: std::time::Duration,
    /// `LOG_FORMAT`: text or JSON logs.
    pub log_format: LogFormat,
    /// `RUST_LOG`: the log filter directive.
    pub log_filter: String,
    /// How often webhook routing reads every connection from the host engine again: 60 s.
    /// Not a variable (operators have no reason to change it); tests shorten it.
    pub routing_reload: std::time::Duration,
}

/// Every variable as text, exactly as operators gave it; envy fills it from the merged sources.
#[derive(Deserialize, Default)]
struct Raw {
    webhook_address: Option<String>,
    webhook_scheme: Option<String>,
    zoom_client_id: Option<String>,
    zoom_client_secret: Option<String>,
    zoom_secret_token: Option<String>,
    zoom_oauth_url: Option<String>,
    zoom_api_url: Option<String>,
    zoom_http_timeout: Option<String>,
    outbox_sync: Option<String>,
    setup_access: Option<String>,
    setup_link_ttl: Option<String>,
    oauth_state_ttl: Option<String>,
    token_keepalive_days: Option<String>,
    event_retention_days: Option<String>,
    host_ui_url: Option<String>,
    max_concurrent_requests: Option<String>,
    request_timeout: Option<String>,
    http_addr: Option<String>,
    grpc_addr: Option<String>,
    host_engine_url: Option<String>,
    host_engine_token: Option<String>,
    data_dir: Option<String>,
    secret_key: Option<String>,
    shutdown_timeout: Option<String>,
    webhook_replay_window: Option<String>,
    log_format: Option<String>,
    rust_log: Option<String>,
}

impl Config {
    /// Loads the configuration from this process's environment (and `CONFIG_FILE`, if set).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::load(own_env()?)
    }

    /// Loads the configuration from the given environment pairs, reading `CONFIG_FILE` if it
    /// is among them. Variables the service does not know are ignored.
    pub fn load(env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let raw: Raw = envy::from_iter(merge(env)?)
            .map_err(|e| ConfigError::new("CONFIG_FILE", format!("cannot be read: {e}")))?;
        Self::from_raw(raw)
    }

    /// `HTTP_ADDR` alone, from this process's environment and `CONFIG_FILE` as
    /// [`Config::from_env`] reads it: what `healthcheck` needs, without refusing settings it
    /// does not use.
    pub fn http_addr_from_env() -> Result<SocketAddr, ConfigError> {
        Self::load_http_addr(own_env()?)
    }

    /// [`Config::http_addr_from_env`] from the given environment pairs.
    pub fn load_http_addr(
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<SocketAddr, ConfigError> {
        let merged = merge(env)?;
        parse_socket_addr(
            "HTTP_ADDR",
            merged
                .get("HTTP_ADDR")
                .map_or(DEFAULT_HTTP_ADDR, String::as_str),
        )
    }

    fn from_raw(raw: Raw) -> Result<Self, ConfigError> {
        let default_app = match (raw.zoom_client_id, raw.zoom_client_secret) {
            (Some(id), Some(secret)) => Some(OAuthApp {
                client_id: checked_text("ZOOM_CLIENT_ID", id)?,
                client_secret: Secret::new(checked_text("ZOOM_CLIENT_SECRET", secret)?),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "ZOOM_CLIENT_SECRET",
                    "is required when ZOOM_CLIENT_ID is set",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "ZOOM_CLIENT_ID",
                    "is required when ZOOM_CLIENT_SECRET is set",
                ));
            }
        };
        Ok(Self {
            webhook_address: raw
                .webhook_address
                .map(|a| parse_public_address("WEBHOOK_ADDRESS", a))
                .transpose()?,
            webhook_scheme: match optional_text("WEBHOOK_SCHEME", raw.webhook_scheme)?
                .as_deref()
                .unwrap_or("https")
            {
                "https" => Scheme::Https,
                "http" => Scheme::Http,
                _ => return Err(ConfigError::new("WEBHOOK_SCHEME", "must be https or http")),
            },
            default_app,
            zoom_secret_token: raw
                .zoom_secret_token
                .map(|t| checked_text("ZOOM_SECRET_TOKEN", t).map(Secret::new))
                .transpose()?,
            zoom_oauth_url: parse_base_url(
                "ZOOM_OAUTH_URL",
                raw.zoom_oauth_url.as_deref().unwrap_or("https://zoom.us"),
            )?,
            zoom_api_url: parse_base_url(
                "ZOOM_API_URL",
                raw.zoom_api_url
                    .as_deref()
                    .unwrap_or("https://api.zoom.us/v2"),
            )?,
            setup_access: match optional_text("SETUP_ACCESS", raw.setup_access)?
                .as_deref()
                .unwrap_or("signed")
            {
                "signed" => SetupAccess::Signed,
                "loopback" => SetupAccess::Loopback,
                _ => return Err(ConfigError::new("SETUP_ACCESS", "must be signed or loopback")),
            },
            setup_link_ttl: parse_seconds(
                "SETUP_LINK_TTL",
                raw.setup_link_ttl.as_deref(),
                900,
                60..=86_400,
            )?,
            outbox_sync: match optional_text("OUTBOX_SYNC", raw.outbox_sync)?
                .as_deref()
                .unwrap_or("full")
            {
                "full" => OutboxSync::Full,
                "normal" => OutboxSync::Normal,
                _ => return Err(ConfigError::new("OUTBOX_SYNC", "must be full or normal")),
            },
            zoom_http_timeout: parse_seconds(
                "ZOOM_HTTP_TIMEOUT",
                raw.zoom_http_timeout.as_deref(),
                10,
                1..=120,
            )?,
            oauth_state_ttl: parse_seconds(
                "OAUTH_STATE_TTL",
                raw.oauth_state_ttl.as_deref(),
                600,
                1..=600,
            )?,
            token_keepalive: std::time::Duration::from_secs(
                86_400
                    * parse_count(
                        "TOKEN_KEEPALIVE_DAYS",
                        raw.token_keepalive_days.as_deref(),
                        30,
                        1..=80,
                        "days",
                    )?,
            ),
            event_retention: std::time::Duration::from_secs(
                86_400
                    * parse_count(
                        "EVENT_RETENTION_DAYS",
                        raw.event_retention_days.as_deref(),
                        30,
                        1..=3650,
                        "days",
                    )?,
            ),
            host_ui_url: raw
                .host_ui_url
                .map(|u| parse_base_url("HOST_UI_URL", &u))
                .transpose()?,
            max_concurrent_requests: parse_count(
                "MAX_CONCURRENT_REQUESTS",
                raw.max_concurrent_requests.as_deref(),
                1024,
                1..=100_000,
                "requests",
            )? as usize,
            request_timeout: parse_seconds(
                "REQUEST_TIMEOUT",
                raw.request_timeout.as_deref(),
                30,
                1..=600,
            )?,
            http_addr: parse_socket_addr(
                "HTTP_ADDR",
                raw.http_addr.as_deref().unwrap_or(DEFAULT_HTTP_ADDR),
            )?,
            grpc_addr: parse_socket_addr(
                "GRPC_ADDR",
                raw.grpc_addr.as_deref().unwrap_or("0.0.0.0:9981"),
            )?,
            host_engine_url: raw
                .host_engine_url
                .map(|u| {
                    let url = parse_base_url("HOST_ENGINE_URL", &u)?;
                    if url::Url::parse(url.as_str()).is_ok_and(|u| u.path() != "/") {
                        return Err(ConfigError::new(
                            "HOST_ENGINE_URL",
                            "must be http://host:port (or https://) with no path",
                        ));
                    }
                    Ok(url)
                })
                .transpose()?,
            host_engine_token: raw
                .host_engine_token
                .map(|t| checked_text("HOST_ENGINE_TOKEN", t).map(Secret::new))
                .transpose()?,
            data_dir: PathBuf::from(
                optional_text("DATA_DIR", raw.data_dir)?.unwrap_or_else(|| "./data".into()),
            ),
            secret_key: raw
                .secret_key
                .map(|k| {
                    let k = checked_text("SECRET_KEY", k)?;
                    if k.chars().count() < 32 {
                        return Err(ConfigError::new(
                            "SECRET_KEY",
                            "must be at least 32 characters of random key material (e.g. 64 hex digits)",
                        ));
                    }
                    Ok(Secret::new(k))
                })
                .transpose()?,
            shutdown_timeout: parse_seconds(
                "SHUTDOWN_TIMEOUT",
                raw.shutdown_timeout.as_deref(),
                25,
                1..=3600,
            )?,
            webhook_replay_window: parse_seconds(
                "WEBHOOK_REPLAY_WINDOW",
                raw.webhook_replay_window.as_deref(),
                5400,
                60..=86_400,
            )?,
            log_format: match optional_text("LOG_FORMAT", raw.log_format)?
                .as_deref()
                .unwrap_or("text")
            {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => return Err(ConfigError::new("LOG_FORMAT", "must be text or json")),
            },
            log_filter: {
                let filter = raw.rust_log.unwrap_or_else(|| "info".into());
                tracing_subscriber::EnvFilter::try_new(&filter).map_err(|e| {
                    ConfigError::new("RUST_LOG", format!("is not a valid log filter: {e}"))
                })?;
                filter
            },
            routing_reload: std::time::Duration::from_secs(60),
        })
    }

    /// The OAuth redirect URI Zoom sends browsers back to, when `WEBHOOK_ADDRESS` is set.
    pub fn oauth_redirect_uri(&self) -> Option<String> {
        self.public_url("/oauth/redirect/zoom")
    }

    /// `{WEBHOOK_SCHEME}://{WEBHOOK_ADDRESS}{path}`, when `WEBHOOK_ADDRESS` is set.
    pub fn public_url(&self, path: &str) -> Option<String> {
        self.webhook_address
            .as_ref()
            .map(|addr| format!("{}://{}{}", self.webhook_scheme, addr, path))
    }

    /// The `--help` text: usage and every variable with its default.
    pub fn help() -> String {
        let mut out = String::from(
            "zoom-integration: connects Zoom to an AutoKitteh-compatible workflow host.\n\n\
             Usage: zoom-integration            serve HTTP and gRPC until SIGTERM\n       \
             zoom-integration setup-link <connection id> [origin]\n                                   \
             print a signed link to the connection's setup page\n       \
             zoom-integration redrive-dead-letters\n                                   \
             with the service stopped: move the webhooks the host refused for good back\n                                   \
             into the outbox, to be delivered on the next start\n       \
             zoom-integration healthcheck\n                                   \
             GET /healthz on HTTP_ADDR (0.0.0.0 and [::] as loopback) within 2 s: exit 0\n                                   \
             on 200, else 1 (for a container's HEALTHCHECK)\n       \
             zoom-integration --help     this text\n       \
             zoom-integration --version  the version\n\n\
             Configuration (environment; CONFIG_FILE may give the same keys in lower case, the environment wins):\n",
        );
        for v in VARIABLES {
            let default = v
                .default
                .map(|d| format!(" [default: {d}]"))
                .unwrap_or_default();
            out.push_str(&format!("  {:<20} {}{}\n", v.name, v.meaning, default));
        }
        out
    }
}

/// `HTTP_ADDR` when unset.
const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:9980";

/// The variables of this process's environment the service knows.
fn own_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let Some(var) = VARIABLES.iter().find(|v| v.name == key) else {
            continue;
        };
        let value = value
            .into_string()
            .map_err(|_| ConfigError::new(var.name, "is not valid UTF-8"))?;
        env.push((var.name.to_string(), value));
    }
    Ok(env)
}

/// The known variables of `env` merged over `CONFIG_FILE`'s, if it names one: the
/// environment wins, and an empty value counts as unset.
fn merge(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    // An empty value means "unset", as container platforms often pass them: it neither
    // counts nor hides the same key in CONFIG_FILE.
    let mut merged: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| VARIABLES.iter().any(|var| var.name == k))
        .collect();
    merged.retain(|_, v| !v.trim().is_empty());
    if let Some(path) = merged.remove("CONFIG_FILE") {
        for (key, value) in read_yaml(&checked_text("CONFIG_FILE", path)?)? {
            merged.entry(key).or_insert(value);
        }
    }
    merged.retain(|_, v| !v.trim().is_empty());
    Ok(merged)
}

/// A whole number of seconds within `range`, or `default` when unset.
fn parse_seconds(
    variable: &'static str,
    raw: Option<&str>,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<std::time::Duration, ConfigError> {
    parse_count(variable, raw, default, range, "seconds").map(std::time::Duration::from_secs)
}

/// A whole number of `unit`s within `range`, or `default` when unset.
fn parse_count(
    variable: &'static str,
    raw: Option<&str>,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
    unit: &str,
) -> Result<u64, ConfigError> {
    match raw.map(|r| r.trim().parse::<u64>()) {
        None => Ok(default),
        Some(Ok(n)) if range.contains(&n) => Ok(n),
        Some(_) => Err(ConfigError::new(
            variable,
            format!(
                "must be a whole number of {unit} from {} to {}",
                range.start(),
                range.end()
            ),
        )),
    }
}

/// Creates `dir` (and its parents) readable only by this user, if it does not exist yet, and
/// checks that this user can create files in it. An existing directory keeps its mode: one
/// open to the group or others is only warned about. Problems name `DATA_DIR`.
pub fn create_private_dir(dir: &std::path::Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.is_dir() {
        // One made by someone else (an image's COPY, a volume) may be open to others, and the
        // databases' files are readable by them between their creation and their own chmod.
        // Not ours to change (a shared mount, a volume whose group a Kubernetes fsGroup
        // needs): left as it is, and said.
        if let Ok(meta) = std::fs::metadata(dir)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %dir.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "DATA_DIR is open to its group or others; left as it is (chmod 700 keeps its files to this user)"
            );
        }
    } else {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                ConfigError::new("DATA_DIR", format!("cannot create {}: {e}", dir.display()))
            })?;
    }
    check_writable(dir)
}

/// Creates and removes a file in `dir`: a directory this user cannot write to (a volume owned
/// by another user, a read-only mount) is named here, as `DATA_DIR`, rather than later by
/// SQLite with a message naming no setting.
fn check_writable(dir: &std::path::Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| {
        ConfigError::new(
            "DATA_DIR",
            format!("no randomness to name a test file: {e}"),
        )
    })?;
    let probe = dir.join(format!(".write-check.{}.tmp", hex::encode(nonce)));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)
        .map_err(|e| {
            ConfigError::new(
                "DATA_DIR",
                format!(
                    "{} is not writable: {e} (check its owner, mode, mount and free space, or point DATA_DIR elsewhere)",
                    dir.display()
                ),
            )
        })?;
    // The directory is writable: a test file left behind is no reason not to start.
    if let Err(e) = std::fs::remove_file(&probe) {
        tracing::warn!(path = %probe.display(), error = %e, "cannot remove the start-up test file");
    }
    Ok(())
}

fn read_yaml(path: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("CONFIG_FILE", format!("cannot read {path}: {e}")))?;
    let doc: serde_norway::Value = serde_norway::from_str(&text).map_err(|e| {
        let line = without_quoted_values(&e.to_string().replace('\n', " "));
        ConfigError::new("CONFIG_FILE", format!("{path} is not valid YAML: {line}"))
    })?;
    let map = match doc {
        serde_norway::Value::Mapping(map) => map,
        serde_norway::Value::Null => return Ok(Vec::new()),
        _ => {
            return Err(ConfigError::new(
                "CONFIG_FILE",
                format!("{path} must be a mapping of keys to values"),
            ));
        }
    };
    let mut out = Vec::new();
    for (key, value) in map {
        let key = key.as_str().unwrap_or_default().to_string();
        let var = VARIABLES
            .iter()
            .find(|v| v.name != "CONFIG_FILE" && v.name.to_ascii_lowercase() == key)
            .ok_or_else(|| {
                ConfigError::new("CONFIG_FILE", format!("unknown key {key:?} in {path}"))
            })?;
        let value = match value {
            serde_norway::Value::Null => continue,
            serde_norway::Value::String(s) => s,
            serde_norway::Value::Bool(b) => b.to_string(),
            serde_norway::Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
            // Past 64 bits or with a fraction or exponent, YAML reads a float: a secret token
            // of digits would silently become `1.2345678901234568e24`.
            serde_norway::Value::Number(_) => {
                return Err(ConfigError::new(
                    var.name,
                    format!(
                        "in {path} reads as a fractional or very large number, which would change it: put it in quotes"
                    ),
                ));
            }
            _ => {
                return Err(ConfigError::new(
                    var.name,
                    format!("in {path} must be a single value, not a list or mapping"),
                ));
            }
        };
        out.push((var.name.to_string(), value));
    }
    Ok(out)
}

/// A YAML error without the values it quotes between backticks (``integer `123…` as u128``):
/// the value may be a secret.
fn without_quoted_values(message: &str) -> String {
    message
        .split('`')
        .enumerate()
        .map(|(i, part)| if i % 2 == 1 { "…" } else { part })
        .collect::<Vec<_>>()
        .join("`")
}

/// Rejects control characters, which no legitimate setting contains. The message never
/// echoes the value, so it serves secret settings too.
fn checked_text(variable: &'static str, value: String) -> Result<String, ConfigError> {
    if value.chars().any(char::is_control) {
        return Err(ConfigError::new(variable, "contains control characters"));
    }
    Ok(value.trim().to_string())
}

/// [`checked_text`] for a setting that may be unset.
fn optional_text(
    variable: &'static str,
    value: Option<String>,
) -> Result<Option<String>, ConfigError> {
    value.map(|v| checked_text(variable, v)).transpose()
}

fn parse_socket_addr(variable: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse().map_err(|_| {
        ConfigError::new(
            variable,
            format!("{value:?} is not an address like 0.0.0.0:9980"),
        )
    })
}

pub(crate) fn parse_base_url(variable: &'static str, value: &str) -> Result<BaseUrl, ConfigError> {
    // The value is not echoed: a URL can carry credentials or a token, even a malformed one.
    let bad = |why: &str| ConfigError::new(variable, why.to_string());
    let url = url::Url::parse(value.trim()).map_err(|e| bad(&format!("is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("must start with http:// or https://"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("must not contain credentials (user:password@)"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("must not have a query or fragment"));
    }
    Ok(BaseUrl(url.as_str().trim_end_matches('/').to_string()))
}

fn parse_public_address(variable: &'static str, value: String) -> Result<String, ConfigError> {
    let value = checked_text(variable, value)?;
    let bad = || {
        ConfigError::new(
            variable,
            // Not echoed: `user:password@host` is a likely mistake.
            "must be host[:port] only, with no scheme, credentials or path (e.g. zoom.example.com)",
        )
    };
    if value.contains(['/', '?', '#', '@', ' ', '\\']) {
        return Err(bad());
    }
    let url = url::Url::parse(&format!("http://{value}/")).map_err(|_| bad())?;
    if url.host_str().is_none_or(str::is_empty) || url.path() != "/" {
        return Err(bad());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_that_exists_open_to_others_is_left_as_it_is_with_a_warning() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
        let (created, logs) = crate::telemetry::logs_of(|| create_private_dir(&dir));
        created.unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o770, "not ours to change");
        assert!(logs.contains("WARN"), "{logs}");
        assert!(
            logs.contains("DATA_DIR is open to its group or others"),
            "{logs}"
        );

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let (created, logs) = crate::telemetry::logs_of(|| create_private_dir(&dir));
        created.unwrap();
        assert!(
            !logs.contains("WARN"),
            "a private one is not warned about: {logs}"
        );

        let made = parent.path().join("new/nested");
        create_private_dir(&made).unwrap();
        for made in [&made, &parent.path().join("new")] {
            let mode = std::fs::metadata(made).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", made.display());
        }
    }

    #[test]
    fn a_data_dir_that_cannot_be_written_is_refused_naming_it_and_left_clean() {
        // A directory nobody can create files in, root included (tests may run as root, whom
        // a chmod does not stop).
        let err = create_private_dir(std::path::Path::new("/proc")).unwrap_err();
        assert_eq!(err.variable, "DATA_DIR", "{err}");
        assert!(err.problem.contains("not writable"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        create_private_dir(dir.path()).unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "the test file is removed: {left:?}");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn error_for(pairs: &[(&str, &str)]) -> ConfigError {
        Config::load(env(pairs)).expect_err("configuration should be refused")
    }

    #[test]
    fn a_refused_address_is_not_echoed_it_may_carry_a_secret() {
        for (variable, value) in [
            ("HOST_ENGINE_URL", "http://u:hunter2@ak:99999"),
            ("HOST_ENGINE_URL", "https://ak?token=hunter2"),
            ("HOST_ENGINE_URL", "http://u:hunter2@ak:9980"),
            ("ZOOM_API_URL", "https://api.zoom.us/v2#hunter2"),
            ("WEBHOOK_ADDRESS", "u:hunter2@zoom.example.com"),
        ] {
            let error = error_for(&[(variable, value)]).to_string();
            assert!(error.contains(variable), "{error}");
            assert!(!error.contains("hunter2"), "{error}");
        }
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = Config::load(env(&[])).unwrap();
        assert_eq!(c.webhook_address, None);
        assert_eq!(c.webhook_scheme, Scheme::Https);
        assert_eq!(c.default_app, None);
        assert_eq!(c.zoom_secret_token, None);
        assert_eq!(c.zoom_oauth_url.as_str(), "https://zoom.us");
        assert_eq!(c.zoom_api_url.as_str(), "https://api.zoom.us/v2");
        assert_eq!(c.http_addr, "0.0.0.0:9980".parse().unwrap());
        assert_eq!(c.grpc_addr, "0.0.0.0:9981".parse().unwrap());
        assert_eq!(c.host_engine_url, None);
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.secret_key, None);
        assert_eq!(c.shutdown_timeout, std::time::Duration::from_secs(25));
        assert_eq!(
            c.webhook_replay_window,
            std::time::Duration::from_secs(90 * 60)
        );
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.log_filter, "info");
        assert_eq!(c.oauth_redirect_uri(), None);
    }

    #[test]
    fn every_variable_is_parsed() {
        let c = Config::load(env(&[
            ("WEBHOOK_ADDRESS", "zoom.example.com:8443"),
            ("WEBHOOK_SCHEME", "http"),
            ("ZOOM_CLIENT_ID", "client-id"),
            ("ZOOM_CLIENT_SECRET", "client-secret"),
            ("ZOOM_SECRET_TOKEN", "secret-token"),
            ("ZOOM_OAUTH_URL", "http://127.0.0.1:1234/"),
            ("ZOOM_API_URL", "http://127.0.0.1:1234/v2/"),
            ("HTTP_ADDR", "127.0.0.1:80"),
            ("GRPC_ADDR", "[::1]:81"),
            ("HOST_ENGINE_URL", "http://ak.internal:9980"),
            ("HOST_ENGINE_TOKEN", "host-token"),
            ("DATA_DIR", "/var/lib/zoom"),
            ("SECRET_KEY", "0123456789abcdef0123456789abcdef"),
            ("SHUTDOWN_TIMEOUT", "5"),
            ("WEBHOOK_REPLAY_WINDOW", "600"),
            ("LOG_FORMAT", "json"),
            ("RUST_LOG", "zoom_integration=debug"),
            ("UNRELATED", "ignored"),
        ]))
        .unwrap();
        assert_eq!(c.webhook_address.as_deref(), Some("zoom.example.com:8443"));
        assert_eq!(c.webhook_scheme, Scheme::Http);
        let app = c.default_app.clone().unwrap();
        assert_eq!(app.client_id, "client-id");
        assert_eq!(app.client_secret.expose(), "client-secret");
        assert_eq!(
            c.zoom_secret_token.as_ref().unwrap().expose(),
            "secret-token"
        );
        assert_eq!(
            c.zoom_oauth_url.join("/oauth/token"),
            "http://127.0.0.1:1234/oauth/token"
        );
        assert_eq!(
            c.zoom_api_url.join("/users/me"),
            "http://127.0.0.1:1234/v2/users/me"
        );
        assert_eq!(c.http_addr, "127.0.0.1:80".parse().unwrap());
        assert_eq!(c.grpc_addr, "[::1]:81".parse().unwrap());
        assert_eq!(
            c.host_engine_url.as_ref().unwrap().as_str(),
            "http://ak.internal:9980"
        );
        assert_eq!(c.host_engine_token.as_ref().unwrap().expose(), "host-token");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/zoom"));
        assert_eq!(c.secret_key.as_ref().unwrap().expose().len(), 32);
        assert_eq!(c.shutdown_timeout, std::time::Duration::from_secs(5));
        assert_eq!(c.webhook_replay_window, std::time::Duration::from_secs(600));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.log_filter, "zoom_integration=debug");
        assert_eq!(
            c.oauth_redirect_uri().as_deref(),
            Some("http://zoom.example.com:8443/oauth/redirect/zoom")
        );
    }

    #[test]
    fn each_bad_value_names_its_variable_in_one_line() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("WEBHOOK_ADDRESS", "https://zoom.example.com")],
                "WEBHOOK_ADDRESS",
            ),
            (
                &[("WEBHOOK_ADDRESS", "zoom.example.com/path")],
                "WEBHOOK_ADDRESS",
            ),
            (
                &[("WEBHOOK_ADDRESS", "zoom.example.com:notaport")],
                "WEBHOOK_ADDRESS",
            ),
            (&[("WEBHOOK_SCHEME", "ftp")], "WEBHOOK_SCHEME"),
            (&[("ZOOM_CLIENT_ID", "only-the-id")], "ZOOM_CLIENT_SECRET"),
            (
                &[("ZOOM_CLIENT_SECRET", "only-the-secret")],
                "ZOOM_CLIENT_ID",
            ),
            (
                &[("ZOOM_CLIENT_ID", "a\nb"), ("ZOOM_CLIENT_SECRET", "s")],
                "ZOOM_CLIENT_ID",
            ),
            (&[("ZOOM_SECRET_TOKEN", "tok\u{7}en")], "ZOOM_SECRET_TOKEN"),
            (&[("ZOOM_OAUTH_URL", "zoom.us")], "ZOOM_OAUTH_URL"),
            (&[("ZOOM_OAUTH_URL", "ftp://zoom.us")], "ZOOM_OAUTH_URL"),
            (
                &[("ZOOM_API_URL", "https://api.zoom.us/v2?x=1")],
                "ZOOM_API_URL",
            ),
            (&[("HTTP_ADDR", "localhost")], "HTTP_ADDR"),
            (&[("GRPC_ADDR", "0.0.0.0:99999")], "GRPC_ADDR"),
            (&[("HOST_ENGINE_URL", "ak:9980")], "HOST_ENGINE_URL"),
            (
                &[("HOST_ENGINE_URL", "http://ak:9980/api")],
                "HOST_ENGINE_URL",
            ),
            (&[("HOST_ENGINE_TOKEN", "t\r\n")], "HOST_ENGINE_TOKEN"),
            (&[("SECRET_KEY", "too-short")], "SECRET_KEY"),
            (&[("SHUTDOWN_TIMEOUT", "0")], "SHUTDOWN_TIMEOUT"),
            (&[("SHUTDOWN_TIMEOUT", "10s")], "SHUTDOWN_TIMEOUT"),
            (&[("OUTBOX_SYNC", "sometimes")], "OUTBOX_SYNC"),
            (&[("SETUP_ACCESS", "open")], "SETUP_ACCESS"),
            (
                &[("MAX_CONCURRENT_REQUESTS", "0")],
                "MAX_CONCURRENT_REQUESTS",
            ),
            (&[("REQUEST_TIMEOUT", "forever")], "REQUEST_TIMEOUT"),
            (&[("SETUP_LINK_TTL", "5")], "SETUP_LINK_TTL"),
            (&[("OAUTH_STATE_TTL", "601")], "OAUTH_STATE_TTL"),
            (&[("ZOOM_HTTP_TIMEOUT", "0")], "ZOOM_HTTP_TIMEOUT"),
            (&[("TOKEN_KEEPALIVE_DAYS", "90")], "TOKEN_KEEPALIVE_DAYS"),
            (&[("EVENT_RETENTION_DAYS", "0")], "EVENT_RETENTION_DAYS"),
            (&[("EVENT_RETENTION_DAYS", "3651")], "EVENT_RETENTION_DAYS"),
            (&[("HOST_UI_URL", "ftp://x")], "HOST_UI_URL"),
            (&[("WEBHOOK_REPLAY_WINDOW", "59")], "WEBHOOK_REPLAY_WINDOW"),
            (&[("WEBHOOK_REPLAY_WINDOW", "90m")], "WEBHOOK_REPLAY_WINDOW"),
            (&[("LOG_FORMAT", "xml")], "LOG_FORMAT"),
            (&[("RUST_LOG", "info,[[[")], "RUST_LOG"),
            (&[("CONFIG_FILE", "/nonexistent/zoom.yaml")], "CONFIG_FILE"),
        ];
        for (pairs, variable) in cases {
            let err = error_for(pairs);
            assert_eq!(err.variable, *variable, "for {pairs:?}: {err}");
            let line = err.to_string();
            assert!(line.starts_with(&format!("{variable}: ")), "{line}");
            assert!(!line.contains('\n'), "one line only: {line:?}");
        }
    }

    #[test]
    fn secret_values_never_appear_in_errors() {
        let err = error_for(&[("SECRET_KEY", "short-but-secret")]);
        assert!(!err.to_string().contains("short-but-secret"));
        let err = error_for(&[("HOST_ENGINE_URL", "http://user:pa55word@ak:1")]);
        assert!(!err.to_string().contains("pa55word"), "{err}");
    }

    #[test]
    fn paths_and_choices_are_trimmed_like_other_values() {
        let file = yaml_file("log_format: \"json \"\nsetup_access: \" loopback\"\n");
        let c = Config::load(env(&[
            ("CONFIG_FILE", &format!(" {} ", file.path().display())),
            ("DATA_DIR", "/data "),
            ("WEBHOOK_SCHEME", " http"),
            ("OUTBOX_SYNC", "normal "),
        ]))
        .unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/data"));
        assert_eq!(c.webhook_scheme, Scheme::Http);
        assert_eq!(c.outbox_sync, OutboxSync::Normal);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.setup_access, SetupAccess::Loopback);
        for variable in [
            "DATA_DIR",
            "CONFIG_FILE",
            "WEBHOOK_SCHEME",
            "SETUP_ACCESS",
            "OUTBOX_SYNC",
            "LOG_FORMAT",
        ] {
            let err = error_for(&[(variable, "x\u{1b}y")]);
            assert_eq!(err.variable, variable, "{err}");
            assert!(err.problem.contains("control characters"), "{err}");
        }
    }

    #[test]
    fn empty_values_count_as_unset() {
        let c = Config::load(env(&[("HOST_ENGINE_URL", ""), ("WEBHOOK_SCHEME", " ")])).unwrap();
        assert_eq!(c.host_engine_url, None);
        assert_eq!(c.webhook_scheme, Scheme::Https);
    }

    fn yaml_file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn yaml_file_is_merged_under_the_environment() {
        let file = yaml_file(
            "webhook_address: from-yaml.example.com\n\
             zoom_client_id: yaml-id\n\
             zoom_client_secret: yaml-secret\n\
             http_addr: 127.0.0.1:7000\n\
             log_format: json\n",
        );
        let c = Config::load(env(&[
            ("CONFIG_FILE", file.path().to_str().unwrap()),
            ("HTTP_ADDR", "127.0.0.1:8000"),
        ]))
        .unwrap();
        assert_eq!(c.webhook_address.as_deref(), Some("from-yaml.example.com"));
        assert_eq!(c.default_app.unwrap().client_id, "yaml-id");
        assert_eq!(
            c.http_addr,
            "127.0.0.1:8000".parse().unwrap(),
            "environment wins"
        );
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn an_empty_environment_variable_does_not_hide_the_yaml_value() {
        let file = yaml_file("webhook_address: from-yaml.example.com\nhttp_addr: 127.0.0.1:7000\n");
        let c = Config::load(env(&[
            ("CONFIG_FILE", file.path().to_str().unwrap()),
            ("WEBHOOK_ADDRESS", ""),
            ("HTTP_ADDR", " "),
        ]))
        .unwrap();
        assert_eq!(c.webhook_address.as_deref(), Some("from-yaml.example.com"));
        assert_eq!(c.http_addr, "127.0.0.1:7000".parse().unwrap());
    }

    #[test]
    fn http_addr_alone_is_read_as_the_whole_configuration_reads_it() {
        let file = yaml_file("http_addr: 127.0.0.1:7000\nlog_format: not-a-format\n");
        let from_yaml = env(&[("CONFIG_FILE", file.path().to_str().unwrap())]);
        assert_eq!(
            Config::load_http_addr(from_yaml).unwrap(),
            "127.0.0.1:7000".parse().unwrap(),
            "a setting it does not use is not checked"
        );
        let both = env(&[
            ("CONFIG_FILE", file.path().to_str().unwrap()),
            ("HTTP_ADDR", "[::]:8000"),
        ]);
        assert_eq!(
            Config::load_http_addr(both).unwrap(),
            "[::]:8000".parse().unwrap(),
            "environment wins"
        );
        assert_eq!(
            Config::load_http_addr(env(&[("HTTP_ADDR", " ")])).unwrap(),
            Config::load(env(&[])).unwrap().http_addr,
            "same default"
        );
        let err = Config::load_http_addr(env(&[("HTTP_ADDR", "nowhere")])).unwrap_err();
        assert_eq!(err.variable, "HTTP_ADDR");
    }

    #[test]
    fn yaml_file_problems_name_the_variable() {
        let unknown = yaml_file("webhok_address: typo.example.com\n");
        let err = error_for(&[("CONFIG_FILE", unknown.path().to_str().unwrap())]);
        assert_eq!(err.variable, "CONFIG_FILE");
        assert!(err.problem.contains("webhok_address"), "{err}");

        let nested = yaml_file("http_addr: [1, 2]\n");
        let err = error_for(&[("CONFIG_FILE", nested.path().to_str().unwrap())]);
        assert_eq!(err.variable, "HTTP_ADDR");

        let bad_value = yaml_file("grpc_addr: nowhere\n");
        let err = error_for(&[("CONFIG_FILE", bad_value.path().to_str().unwrap())]);
        assert_eq!(err.variable, "GRPC_ADDR");

        // A secret token of digits that YAML would read as a float (and change) is refused,
        // without echoing it; whole numbers (timeouts) are fine.
        let digits = yaml_file("zoom_secret_token: 12345678e34\n");
        let err = error_for(&[("CONFIG_FILE", digits.path().to_str().unwrap())]);
        assert_eq!(err.variable, "ZOOM_SECRET_TOKEN", "{err}");
        assert!(err.problem.contains("put it in quotes"), "{err}");
        assert!(!err.to_string().contains("12345"), "{err}");
        // Past 64 bits, the YAML reader refuses it itself: its message quotes the value.
        let digits = yaml_file("zoom_secret_token: 1234567890123456789012345\n");
        let err = error_for(&[("CONFIG_FILE", digits.path().to_str().unwrap())]);
        assert_eq!(err.variable, "CONFIG_FILE", "{err}");
        assert!(err.problem.contains("line 1"), "{err}");
        assert!(!err.to_string().contains("12345"), "{err}");
        let whole = yaml_file("request_timeout: 45\n");
        let config = Config::load(env(&[
            ("CONFIG_FILE", whole.path().to_str().unwrap()),
            ("SECRET_KEY", "0123456789abcdef0123456789abcdef"),
        ]))
        .unwrap();
        assert_eq!(config.request_timeout, std::time::Duration::from_secs(45));

        let broken = yaml_file("http_addr: [unclosed\n");
        let err = error_for(&[("CONFIG_FILE", broken.path().to_str().unwrap())]);
        assert_eq!(err.variable, "CONFIG_FILE");
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn help_lists_every_variable() {
        let help = Config::help();
        for v in VARIABLES {
            assert!(help.contains(v.name), "{} missing from --help", v.name);
        }
    }
}
