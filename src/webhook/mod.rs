//! `POST /zoom/event`: Zoom's webhooks, verified, deduplicated, durably recorded, and then
//! forwarded to the host engine in the background.
//!
//! The handler checks, in order: the body size (413), the signature headers and the timestamp
//! window (401), the signature against every known secret token on the raw bytes (401), the
//! JSON and its `event` (400). URL validation is answered with the secret that verified it.
//! Other events go to the connections the [`routing`] index names and are answered 200 only
//! once the [`outbox`] has committed them; the [`forwarder`] delivers them afterwards.

pub mod forwarder;
pub mod journal;
pub mod normalize;
pub mod outbox;
pub mod routing;
pub mod verify;

use prometheus::IntCounter;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::config::Config;
use crate::host::HostEngine;
use crate::host::embedded::EmbeddedHost;
use crate::metrics::Metrics;
use crate::webhook::normalize::Received;
use crate::webhook::outbox::{DataDirLock, Outbox, OutboxSettings, Record, RecordError, Recorded};
use crate::webhook::routing::{RoutingIndex, Snapshot, VerifiedBy};

/// The path Zoom posts webhooks to.
pub const PATH: &str = "/zoom/event";
/// The largest body accepted: 8 MiB.
pub const MAX_BODY: usize = 8 << 20;
/// Zoom's event for URL validation.
pub const URL_VALIDATION: &str = "endpoint.url_validation";

const SIGNATURE_HEADER: &str = "x-zm-signature";
const TIMESTAMP_HEADER: &str = "x-zm-request-timestamp";
/// Request headers copied into the event memo (header, memo key), when present and sane.
const MEMO_HEADERS: &[(&str, &str)] = &[
    ("x-zm-trackingid", "zoom_tracking_id"),
    ("x-zm-request-id", "zoom_request_id"),
    (TIMESTAMP_HEADER, "zoom_request_timestamp"),
];

/// Internal knobs of the webhook path; only the replay window comes from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How far a request timestamp may be from now, and how long bodies are deduplicated.
    pub replay_window: Duration,
    /// The outbox.
    pub outbox: OutboxSettings,
    /// The forwarder.
    pub forwarder: forwarder::ForwarderSettings,
    /// How often the routing index re-reads every connection from the host engine.
    pub reload_interval: Duration,
    /// Bytes of webhook bodies held at once, from the first byte read until the answer; past
    /// it requests get 503 at once. A signature can only be checked on a whole body, so this
    /// bounds the memory that requests nobody has authenticated yet can take.
    pub body_budget: usize,
}

impl Settings {
    /// The settings for `config`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            replay_window: config.webhook_replay_window,
            outbox: OutboxSettings {
                sync: config.outbox_sync,
                dedupe_window: config.webhook_replay_window,
                ..OutboxSettings::default()
            },
            forwarder: forwarder::ForwarderSettings::default(),
            reload_interval: config.routing_reload,
            body_budget: 64 << 20,
        }
    }
}

/// Counts of what happened to webhooks since start: handles on [`crate::metrics::Metrics`].
#[derive(Debug, Clone)]
pub struct Counters {
    /// Requests whose signature checked out.
    pub verified: IntCounter,
    /// Signature checks run on the blocking pool.
    pub checks_offloaded: IntCounter,
    /// Refused: a bad or missing signature.
    pub bad_signature: IntCounter,
    /// Refused: a timestamp outside the replay window (or none).
    pub stale: IntCounter,
    /// Refused: a body over 8 MiB.
    pub too_large: IntCounter,
    /// Refused: not JSON, no `event`, a bad `plainToken`, or an unreadable body.
    pub malformed: IntCounter,
    /// URL validations answered.
    pub url_validations: IntCounter,
    /// Verified events that no connection wants: answered 200 and dropped.
    pub unrouted: IntCounter,
    /// Events recorded in the outbox.
    pub recorded: IntCounter,
    /// Events already recorded within the window: answered 200, not recorded again.
    pub duplicates: IntCounter,
    /// Events not recorded in time or at all: answered 503.
    pub unavailable: IntCounter,
    /// (event, connection) pairs delivered to the host engine.
    pub delivered: IntCounter,
    /// Delivery rounds that had to be retried.
    pub retries: IntCounter,
    /// Pairs the host engine refused for good, kept as dead letters.
    pub dead_letters: IntCounter,
}

impl Counters {
    /// The counters of `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        let webhooks = |result: &str| metrics.webhooks.with_label_values(&[result]);
        let deliveries = |result: &str| metrics.deliveries.with_label_values(&[result]);
        Self {
            verified: metrics.webhooks_verified.clone(),
            checks_offloaded: metrics.webhook_checks_offloaded.clone(),
            bad_signature: webhooks("bad_signature"),
            stale: webhooks("stale"),
            too_large: webhooks("too_large"),
            malformed: webhooks("malformed"),
            url_validations: webhooks("url_validation"),
            unrouted: webhooks("unrouted"),
            recorded: webhooks("recorded"),
            duplicates: webhooks("duplicate"),
            unavailable: webhooks("unavailable"),
            delivered: deliveries("delivered"),
            retries: deliveries("retried"),
            dead_letters: deliveries("dead_letter"),
        }
    }
}

/// The webhook machinery every request shares.
pub struct Webhooks {
    /// Which connections an event goes to, and which secrets verify requests.
    pub routing: Arc<RoutingIndex>,
    /// KiB of bodies being read, checked or recorded at once (see [`Settings::body_budget`]).
    body_budget: Arc<Semaphore>,
    /// Signature checks too costly for a request's own thread running on the blocking pool at
    /// once: half the cores, at least one.
    heavy_checks: Arc<Semaphore>,
    /// The durable record of accepted events.
    pub outbox: Outbox,
    /// What happened so far.
    pub counters: Arc<Counters>,
    /// The knobs.
    pub settings: Settings,
}

impl Webhooks {
    /// Opens the outbox in `DATA_DIR`, under `lock` (the caller's lock on it), and creates a
    /// routing index, not loaded yet. With a remote host the index keeps the connections it
    /// knows in the outbox's database, and starts from those kept there.
    pub fn open(
        config: &Config,
        metrics: &Metrics,
        lock: DataDirLock,
    ) -> Result<Self, outbox::OpenError> {
        let settings = Settings::from_config(config);
        let outbox = Outbox::open_locked(&config.data_dir, lock, settings.outbox.clone())?;
        let mut routing = RoutingIndex::new(config.zoom_secret_token.clone());
        // The embedded host lists every connection: nothing to remember.
        if config.host_engine_url.is_some() {
            routing = routing.remembering_in(outbox.clone()).map_err(|source| {
                outbox::OpenError::Database {
                    path: config.data_dir.join(outbox::OUTBOX_FILE),
                    source,
                }
            })?;
        }
        Ok(Self {
            routing: Arc::new(routing),
            outbox,
            counters: Arc::new(Counters::new(metrics)),
            body_budget: Arc::new(Semaphore::new(kib(settings.body_budget) as usize)),
            heavy_checks: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(2)),
            )),
            settings,
        })
    }

    /// Starts the background work: loading and refreshing the routing index, and the
    /// forwarder. Both end when `stop` is cancelled.
    pub fn start(
        &self,
        host: Arc<dyn HostEngine>,
        embedded: Option<EmbeddedHost>,
        credentials: Arc<crate::credentials::Credentials>,
        stop: CancellationToken,
    ) -> Vec<JoinHandle<()>> {
        let refresher = tokio::spawn(keep_routing_fresh(
            self.routing.clone(),
            host.clone(),
            embedded.clone(),
            self.settings.reload_interval,
            self.settings.forwarder.backoff_max,
            stop.clone(),
        ));
        let forwarder = forwarder::spawn(
            self.outbox.clone(),
            forwarder::Target {
                host,
                embedded,
                credentials,
            },
            self.counters.clone(),
            self.settings.forwarder.clone(),
            stop,
        );
        vec![refresher, forwarder]
    }
}

/// Loads the index (retrying until the host answers), then reloads it every `interval` and
/// whenever the embedded host reports a changed connection.
async fn keep_routing_fresh(
    routing: Arc<RoutingIndex>,
    host: Arc<dyn HostEngine>,
    embedded: Option<EmbeddedHost>,
    interval: Duration,
    max_backoff: Duration,
    stop: CancellationToken,
) {
    let mut changes = embedded.as_ref().map(EmbeddedHost::subscribe_changes);
    let mut backoff = Duration::from_millis(100);
    loop {
        match routing.reload_all(&*host).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot load webhook routing from the host engine; webhooks are answered 503 until it loads");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    // Its own timer, so a stream of changes cannot keep putting the retry off.
    let mut retry = tokio::time::interval(routing::UNREAD_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = async {
            match changes.as_mut() {
                Some(rx) => Some(rx.recv().await),
                None => std::future::pending().await,
            }
        };
        let unread = !routing.unread().is_empty();
        tokio::select! {
            () = stop.cancelled() => return,
            // Webhooks no route takes are answered 503 while these cannot be read.
            _ = retry.tick(), if unread => routing.retry_unread(&*host).await,
            _ = ticker.tick() => {
                if let Err(e) = routing.reload_all(&*host).await {
                    tracing::warn!(error = %e, "reloading webhook routing failed; keeping the previous routes");
                }
            }
            Some(change) = changed => {
                let result = match change {
                    Ok(cid) => routing.reload_connection(&*host, &cid).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => routing.reload_all(&*host).await,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        changes = None;
                        Ok(())
                    }
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "reloading webhook routing failed; keeping the previous routes");
                }
            }
        }
    }
}

/// Why a webhook request is refused; each maps to one HTTP status in [`IntoResponse`].
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The body is over [`MAX_BODY`].
    #[error("body is larger than 8 MiB")]
    TooLarge,
    /// The signature header is missing.
    #[error("x-zm-signature header is missing")]
    MissingSignature,
    /// The timestamp header is missing.
    #[error("x-zm-request-timestamp header is missing")]
    MissingTimestamp,
    /// The timestamp is malformed or outside the replay window.
    #[error(transparent)]
    Timestamp(#[from] verify::TimestampError),
    /// No known secret token signed this request.
    #[error("signature does not verify")]
    BadSignature,
    /// The body is not a JSON object.
    #[error("body is not a JSON object shaped like a Zoom webhook")]
    NotJson,
    /// The body has no `event`.
    #[error("body has no \"event\" text")]
    NoEvent,
    /// A URL validation without a usable `payload.plainToken`.
    #[error("payload.plainToken must be 1 to 64 characters of A-Z, a-z, 0-9, - and _")]
    BadPlainToken,
    /// The body could not be read.
    #[error("body could not be read")]
    BodyRead,
    /// The body is JSON enough for its head, but could not become an event (text that is not
    /// UTF-8, an unpaired surrogate escape, nesting deeper than 32).
    #[error("body cannot become an event: {0}")]
    NotAnEvent(#[source] normalize::NormalizeError),
    /// The body did not arrive in time.
    #[error("the body did not arrive within {} ms of the headers", ANSWER_WITHIN.as_millis())]
    SlowBody,
    /// Too many bodies are being read at once.
    #[error("too many webhooks at once, try again later")]
    Busy,
    /// The routing index has not loaded yet.
    #[error("starting up, try again later")]
    NotReady,
    /// No route takes the webhook (or no known secret verifies it) while a connection the
    /// host engine could not read yet may be the one it is for.
    #[error("a connection cannot be read from the host engine yet, try again later")]
    Unsettled,
    /// A fault inside this service (a check that panicked); details are logged. Answered
    /// 503: the webhook may be genuine, so Zoom should send it again.
    #[error("internal error, try again later")]
    Internal,
    /// The event could not be recorded durably.
    #[error("cannot record the event now, try again later")]
    NotRecorded(#[source] RecordError),
}

impl IntoResponse for WebhookError {
    fn into_response(self) -> Response {
        let status = match &self {
            WebhookError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            WebhookError::MissingSignature
            | WebhookError::MissingTimestamp
            | WebhookError::Timestamp(_)
            | WebhookError::BadSignature => StatusCode::UNAUTHORIZED,
            WebhookError::NotJson
            | WebhookError::NoEvent
            | WebhookError::BadPlainToken
            | WebhookError::BodyRead
            | WebhookError::NotAnEvent(_) => StatusCode::BAD_REQUEST,
            WebhookError::SlowBody => StatusCode::REQUEST_TIMEOUT,
            WebhookError::NotReady
            | WebhookError::Unsettled
            | WebhookError::NotRecorded(_)
            | WebhookError::Internal
            | WebhookError::Busy => StatusCode::SERVICE_UNAVAILABLE,
        };
        match &self {
            WebhookError::NotRecorded(e) => {
                tracing::warn!(error = %e, "webhook not recorded; answered 503 so Zoom retries")
            }
            // Never the signature or the secret: only what kind of failure it was.
            other => tracing::debug!(error = %other, %status, "webhook refused"),
        }
        (status, axum::Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// `POST /zoom/event`. Its state is only the webhook machinery: the handler clones one `Arc`
/// per request, not the whole [`AppState`].
pub fn router(webhooks: Arc<Webhooks>) -> Router<AppState> {
    Router::new()
        .route(PATH, post(receive))
        .with_state(webhooks)
}

/// The few fields the request path reads; everything else is only checked to be JSON. A key
/// given twice keeps its last value, as `normalize` and serde_json's own maps read it (derived
/// deserializers refuse the repeat).
struct Head {
    event: Option<serde_json::Value>,
    payload: Option<PayloadHead>,
}

struct PayloadHead {
    account_id: Option<serde_json::Value>,
    plain_token: Option<serde_json::Value>,
}

/// The keys [`Head`] and [`PayloadHead`] read, without allocating for the others.
enum Key {
    Event,
    Payload,
    AccountId,
    PlainToken,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "event" => Key::Event,
                    "payload" => Key::Payload,
                    "account_id" => Key::AccountId,
                    "plainToken" => Key::PlainToken,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for Head {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct HeadVisitor;
        impl<'de> serde::de::Visitor<'de> for HeadVisitor {
            type Value = Head;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a webhook object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Head, A::Error> {
                let mut head = Head {
                    event: None,
                    payload: None,
                };
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Event => head.event = Some(map.next_value()?),
                        Key::Payload => head.payload = map.next_value::<PayloadField>()?.0,
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(head)
            }
        }
        d.deserialize_map(HeadVisitor)
    }
}

/// `payload` as an object (or null): serde would also fill [`PayloadHead`] from an array's
/// items, routing by an `account_id` the event's data does not have.
struct PayloadField(Option<PayloadHead>);

impl<'de> Deserialize<'de> for PayloadField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectOrNull;
        impl<'de> serde::de::Visitor<'de> for ObjectOrNull {
            type Value = PayloadField;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object or null")
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<PayloadField, E> {
                Ok(PayloadField(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<PayloadField, A::Error> {
                let mut payload = PayloadHead {
                    account_id: None,
                    plain_token: None,
                };
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::AccountId => payload.account_id = Some(map.next_value()?),
                        Key::PlainToken => payload.plain_token = Some(map.next_value()?),
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(PayloadField(Some(payload)))
            }
        }
        d.deserialize_any(ObjectOrNull)
    }
}

async fn receive(
    State(webhooks): State<Arc<Webhooks>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, WebhookError> {
    let webhooks = &*webhooks;
    let result = handle(webhooks, &headers, body).await;
    if let Err(e) = &result {
        let counters = &webhooks.counters;
        let counter = match e {
            WebhookError::NotReady
            | WebhookError::Unsettled
            | WebhookError::NotRecorded(_)
            | WebhookError::Internal
            | WebhookError::Busy => &counters.unavailable,
            WebhookError::TooLarge => &counters.too_large,
            WebhookError::MissingSignature | WebhookError::BadSignature => &counters.bad_signature,
            WebhookError::MissingTimestamp | WebhookError::Timestamp(_) => &counters.stale,
            WebhookError::NotJson
            | WebhookError::NoEvent
            | WebhookError::BadPlainToken
            | WebhookError::BodyRead
            | WebhookError::SlowBody
            | WebhookError::NotAnEvent(_) => &counters.malformed,
        };
        counter.inc();
    }
    result
}

async fn handle(
    webhooks: &Webhooks,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, WebhookError> {
    // Every wait below ends by then, so even a 503 reaches Zoom inside its 3 seconds.
    let answer_by = tokio::time::Instant::now() + ANSWER_WITHIN;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(WebhookError::TooLarge);
    }
    let signature = headers
        .get(SIGNATURE_HEADER)
        .ok_or(WebhookError::MissingSignature)?
        .as_bytes();
    let timestamp = headers
        .get(TIMESTAMP_HEADER)
        .ok_or(WebhookError::MissingTimestamp)?
        .as_bytes();
    let signed_at = verify::check_timestamp(
        timestamp,
        SystemTime::now(),
        webhooks.settings.replay_window,
    )?;
    // Held until the answer: the body stays in memory until its commit. It must arrive by
    // the time the answer is due: one that takes longer is too late for Zoom anyway, and a
    // client sending it slowly holds a webhook slot and body budget no longer than that.
    let (body, _held) =
        tokio::time::timeout_at(answer_by, read_body(body, declared, &webhooks.body_budget))
            .await
            .map_err(|_| WebhookError::SlowBody)??;

    let routes = webhooks.routing.snapshot().ok_or(WebhookError::NotReady)?;
    let (verified, head, body) =
        check_signature(webhooks, &routes, signature, timestamp, body, answer_by).await?;
    // A private app's secret is only known once its connection is read.
    let verified = verified.ok_or(if routes.unsettled() {
        WebhookError::Unsettled
    } else {
        WebhookError::BadSignature
    })?;
    webhooks.counters.verified.inc();

    let head = head.ok_or(WebhookError::NotJson)?;
    let event = match head.event {
        Some(serde_json::Value::String(e)) if !e.is_empty() => e,
        _ => return Err(WebhookError::NoEvent),
    };
    let payload = head.payload.unwrap_or(PayloadHead {
        account_id: None,
        plain_token: None,
    });

    if event == URL_VALIDATION {
        let plain_token = match &payload.plain_token {
            Some(serde_json::Value::String(t)) if verify::is_sane_plain_token(t) => t,
            _ => return Err(WebhookError::BadPlainToken),
        };
        webhooks.counters.url_validations.inc();
        let encrypted = routes.verifier(verified).encrypt_token(plain_token);
        return Ok(axum::Json(json!({
            "plainToken": plain_token,
            "encryptedToken": encrypted,
        }))
        .into_response());
    }

    let account_id = match &payload.account_id {
        Some(serde_json::Value::String(a)) => a.as_str(),
        _ => "",
    };
    let destinations = routes.destinations(verified, account_id);
    if destinations.is_empty() {
        if routes.unsettled() {
            return Err(WebhookError::Unsettled);
        }
        webhooks.counters.unrouted.inc();
        tracing::debug!(event_type = %crate::ids::truncate(&event, 64), "verified webhook for no connection: dropped");
        return Ok(accepted("unrouted"));
    }
    // The head's parse skips the rest without checking it closely; what the forwarder could not
    // turn into an event must be refused now, not answered 200 and never delivered. A large
    // body's values (up to 100,000 of them) are built on the blocking pool, as its signature
    // was checked, not on the threads that answer Zoom.
    let body = if body.len() <= VERIFY_INLINE {
        normalize::top_level_fields(&body).map_err(WebhookError::NotAnEvent)?;
        body
    } else {
        let check = tokio::task::spawn_blocking(move || {
            let converted = normalize::top_level_fields(&body).map(drop);
            (converted, body)
        });
        let (converted, body) = tokio::time::timeout_at(answer_by, check)
            .await
            .map_err(|_| WebhookError::Busy)?
            .map_err(|e| {
                tracing::error!(error = %e, "a webhook's conversion check failed");
                WebhookError::Internal
            })?;
        converted.map_err(WebhookError::NotAnEvent)?;
        body
    };

    let mut memo = HashMap::with_capacity(MEMO_HEADERS.len() + 1);
    memo.insert("account_id".to_string(), account_id.to_string());
    for (name, key) in MEMO_HEADERS {
        if let Some(value) = headers
            .get(*name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 256)
        {
            memo.insert(key.to_string(), value.to_string());
        }
    }
    let record = Record {
        body_hash: routes.dedupe_hash(verified, &body),
        destinations: destinations.iter().map(ToString::to_string).collect(),
        received: Received {
            event_type: event,
            memo,
            received_ms: now_ms(),
            body,
        },
        // The end of the timestamp's second: the window is checked in whole seconds, so a
        // replay is accepted until a window after that. At most 12 digits: no overflow.
        signed_at_ms: (signed_at as i64 + 1) * 1000,
    };
    match webhooks.outbox.record_until(record, answer_by).await {
        Ok(Recorded::New) => {
            webhooks.counters.recorded.inc();
            Ok(accepted("recorded"))
        }
        Ok(Recorded::Duplicate) => {
            webhooks.counters.duplicates.inc();
            Ok(accepted("duplicate"))
        }
        Err(e) => Err(WebhookError::NotRecorded(e)),
    }
}

fn accepted(status: &'static str) -> Response {
    axum::Json(json!({ "status": status })).into_response()
}

/// Bodies up to this size are parsed on the request's own thread; larger ones on the
/// blocking pool.
const VERIFY_INLINE: usize = 64 << 10;

/// Bytes hashed at most on the request's own thread while looking for the secret that signed
/// a webhook (about 150 µs); the secrets beyond it are tried on the blocking pool.
const INLINE_HASHING: usize = 64 << 10;

/// How long a check that needs the blocking pool waits for its turn before the webhook is
/// answered 503 (Zoom retries it), well inside Zoom's 3 seconds.
const HEAVY_CHECK_WAIT: Duration = Duration::from_secs(1);

/// The head of a body (`None` if it is not JSON shaped like a webhook) and the secret that
/// signed it, if any. A webhook is tried first against the secrets likeliest to have signed
/// it (see [`Snapshot::candidates`]); what costs more than [`INLINE_HASHING`] (a large body,
/// a body no likely secret signed while many private apps are connected) runs on the blocking
/// pool, a few at a time ([`Webhooks::heavy_checks`]), so forged requests cannot hold up the
/// threads that answer Zoom.
async fn check_signature(
    webhooks: &Webhooks,
    routes: &Arc<Snapshot>,
    signature: &[u8],
    timestamp: &[u8],
    body: Vec<u8>,
    answer_by: tokio::time::Instant,
) -> Result<(Option<VerifiedBy>, Option<Head>, Vec<u8>), WebhookError> {
    // Secrets tried here, and the head if it was parsed here.
    let (tried, head) = if body.len() <= VERIFY_INLINE {
        let head = parse_head(&body);
        let inline = INLINE_HASHING / (body.len() + timestamp.len() + 4);
        let found = routes.verify_among(
            routes.candidates(account_hint(head.as_ref())).take(inline),
            signature,
            timestamp,
            &body,
        );
        if found.is_some() || inline >= routes.secret_count() {
            return Ok((found, head, body));
        }
        (inline, Some(head))
    } else {
        (0, None)
    };
    let permit = tokio::time::timeout_at(
        answer_by.min(tokio::time::Instant::now() + HEAVY_CHECK_WAIT),
        webhooks.heavy_checks.clone().acquire_owned(),
    )
    .await
    .map_err(|_| WebhookError::Busy)?
    .map_err(|_| WebhookError::Busy)?;
    webhooks.counters.checks_offloaded.inc();
    let (routes, signature, timestamp) = (routes.clone(), signature.to_vec(), timestamp.to_vec());
    // Checked between secrets: a forged body tried against many secrets gives up the pool
    // (and its permit) when its answer is due, instead of holding them past it.
    let deadline = answer_by.into_std();
    // Awaited no longer than the answer is due: a pool whose threads are all taken (by the
    // embedded host's calls, say) may not start the check in time.
    let check = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let head = head.unwrap_or_else(|| parse_head(&body));
        let mut out_of_time = false;
        let candidates = routes
            .candidates(account_hint(head.as_ref()))
            .skip(tried)
            .take_while(|_| {
                out_of_time = std::time::Instant::now() >= deadline;
                !out_of_time
            });
        let found = routes.verify_among(candidates, &signature, &timestamp, &body);
        (found, out_of_time, head, body)
    });
    let (found, out_of_time, head, body) = tokio::time::timeout_at(answer_by, check)
        .await
        .map_err(|_| WebhookError::Busy)?
        .map_err(|e| {
            tracing::error!(error = %e, "a webhook's signature check failed");
            WebhookError::Internal
        })?;
    // Not every secret was tried: this may be a genuine webhook, so Zoom should retry it.
    if out_of_time {
        return Err(WebhookError::Busy);
    }
    Ok((found, head, body))
}

/// The head of a webhook body, or `None` if it is not JSON shaped like one: an object (serde
/// would fill `Head` from an array's items too).
fn parse_head(body: &[u8]) -> Option<Head> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// The `payload.account_id` a body names, before anything is known of who signed it: it only
/// orders the secrets tried.
fn account_hint(head: Option<&Head>) -> Option<&str> {
    match head?.payload.as_ref()?.account_id.as_ref()? {
        serde_json::Value::String(a) => Some(a),
        _ => None,
    }
}

/// Whole KiB, rounded up: the budget's unit.
fn kib(bytes: usize) -> u32 {
    bytes.div_ceil(1024).min(u32::MAX as usize) as u32
}

/// How long after its headers a webhook is answered at the latest (Zoom waits 3 seconds):
/// the waits for a check on the blocking pool and for the commit share it.
const ANSWER_WITHIN: Duration = Duration::from_millis(2500);

/// Reads at most [`MAX_BODY`] bytes; a longer body is refused without reading the rest. The
/// bytes are taken from `budget` as they arrive, not as declared (a client declaring 8 MiB and
/// sending nothing holds nothing): when it runs out the request is refused (503) rather than
/// waiting.
async fn read_body(
    body: Body,
    declared: Option<u64>,
    budget: &Arc<Semaphore>,
) -> Result<(Vec<u8>, OwnedSemaphorePermit), WebhookError> {
    let expected = declared.unwrap_or(0).min(MAX_BODY as u64) as usize;
    let take = |bytes: usize| {
        budget
            .clone()
            .try_acquire_many_owned(kib(bytes))
            .map_err(|_| WebhookError::Busy)
    };
    let mut held = take(0)?;
    let mut out = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| WebhookError::BodyRead)?;
        let len = out.len() + chunk.len();
        if len > MAX_BODY {
            return Err(WebhookError::TooLarge);
        }
        if len > out.capacity() {
            // The buffer grows by doubling (up to the declared length, when it is honest),
            // and what it allocates, not only what it holds, is taken from the budget first.
            let ceiling = if len <= expected { expected } else { MAX_BODY };
            let capacity = len
                .max(out.capacity() * 2)
                .max(expected.min(VERIFY_INLINE))
                .min(ceiling);
            let needed = kib(capacity).saturating_sub(held.num_permits() as u32);
            if needed > 0 {
                held.merge(take(needed as usize * 1024)?);
            }
            out.reserve_exact(capacity - out.len());
        }
        out.extend_from_slice(&chunk);
    }
    Ok((out, held))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_take_from_the_budget_until_answered_and_past_it_are_refused() {
        let budget = Arc::new(Semaphore::new(4));
        // Without a declared length the bytes are taken as they come.
        let (body, held) = read_body(Body::from(vec![b'x'; 2048]), None, &budget)
            .await
            .unwrap();
        assert_eq!((body.len(), held.num_permits()), (2048, 2));
        assert_eq!(budget.available_permits(), 2);
        let refused = read_body(Body::from(vec![b'x'; 3000]), None, &budget).await;
        assert!(matches!(refused, Err(WebhookError::Busy)));
        // A declared length is not taken before its bytes arrive.
        let pending = Body::from_stream(tokio_stream::pending::<
            Result<axum::body::Bytes, std::io::Error>,
        >());
        let idle = tokio::time::timeout(
            Duration::from_millis(50),
            read_body(pending, Some(MAX_BODY as u64), &budget),
        )
        .await;
        assert!(idle.is_err(), "still waiting for its bytes");
        assert_eq!(budget.available_permits(), 2);
        drop(held);
        assert_eq!(budget.available_permits(), 4, "given back with the answer");
        let (body, _held) = read_body(Body::from(vec![b'x'; 4096]), Some(4096), &budget)
            .await
            .unwrap();
        assert_eq!(body.len(), 4096);
    }

    #[test]
    fn a_payload_is_read_only_from_an_object() {
        let account = |body: &str| {
            parse_head(body.as_bytes()).map(|h| account_hint(Some(&h)).map(str::to_string))
        };
        assert_eq!(
            account(r#"{"event":"x","payload":{"account_id":"acc-A"}}"#),
            Some(Some("acc-A".into()))
        );
        assert_eq!(account(r#"{"event":"x","payload":null}"#), Some(None));
        assert_eq!(account(r#"{"event":"x"}"#), Some(None));
        assert_eq!(account(r#"{"event":"x","payload":["acc-A"]}"#), None);
        assert_eq!(account(r#"{"event":"x","payload":"acc-A"}"#), None);
    }

    #[tokio::test]
    async fn what_a_body_allocates_is_taken_from_the_budget_not_only_what_it_holds() {
        let budget = Arc::new(Semaphore::new(64 << 10));
        // Just over 4 MiB in 64 KiB chunks, without a declared length: the buffer doubles.
        let chunks = (0..64)
            .map(|_| vec![b'x'; 64 << 10])
            .chain([vec![b'x'; 1]])
            .map(|c| Ok::<_, std::io::Error>(axum::body::Bytes::from(c)));
        let (body, held) = read_body(Body::from_stream(tokio_stream::iter(chunks)), None, &budget)
            .await
            .unwrap();
        assert_eq!(body.len(), (4 << 20) + 1);
        assert!(
            held.num_permits() * 1024 >= body.capacity(),
            "{} KiB taken for {} bytes allocated",
            held.num_permits(),
            body.capacity()
        );
        // An honest declared length is allocated once, exactly.
        let chunks =
            (0..16).map(|_| Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![b'y'; 64 << 10])));
        let (body, held) = read_body(
            Body::from_stream(tokio_stream::iter(chunks)),
            Some(1 << 20),
            &budget,
        )
        .await
        .unwrap();
        assert_eq!((body.len(), body.capacity()), (1 << 20, 1 << 20));
        assert_eq!(held.num_permits(), 1024);
    }
}
