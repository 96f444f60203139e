//! Fresh credentials for every connection.
//!
//! One [`Credentials`] per process hands out access tokens. Per connection it keeps a slot
//! behind an async mutex, so at most one refresh (or Server-to-Server token request) is in
//! flight per connection and every concurrent caller waits for that one and then uses its
//! result. Zoom rotates refresh tokens (the old one dies at once), so a refreshed pair is kept
//! in memory as soon as Zoom answers and saved to the host engine before anyone uses it; if
//! saving fails, the pair stays in memory and is saved before the next use or by a background
//! retry ([`Credentials::retry_unsaved`]), whichever comes first. It is saved only over the
//! refresh token it was refreshed from: one stored meanwhile by someone else (another process
//! refreshed, the owner connected again) is the live one, and ours is dropped. A refresh Zoom
//! answers with `invalid_grant` marks the connection broken ("re-authorization required"), and
//! no further token requests are made for it until it is set up again.
//!
//! Whatever talks to Zoom or the host engine runs as a task of its own that holds the slot, not
//! in the caller: a caller that goes away (its deadline passed, it disconnected) cannot stop a
//! refresh between Zoom rotating the refresh token and the host engine saving the new one.
//! Setting a connection up again waits for such a task, so a refresh that started before cannot
//! write the old tokens over the new ones afterwards.
//!
//! A cached token is dropped when its connection is deauthorized or its stored variables
//! change (the embedded host announces every change), so a dead or deleted connection's token
//! is not handed out until it expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::Instrument;

use crate::config::OAuthApp;
use crate::connection::{AuthType, value_of, vars};
use crate::host::{HostEngine, HostError, Var};
use crate::ids::ConnectionId;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::zoom::ZoomError;
use crate::zoom::oauth::{Token, ZoomOAuth};

/// Tokens with less than this left are refreshed before use (or with less than half their
/// lifetime left, when they live shorter than twice this).
pub const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// No token is requested for a connection within this long of the last one obtained for it,
/// as long as that one works: a token Zoom says lives a second, or not at all, would otherwise
/// make every call request one (rotating an OAuth connection's refresh token each time).
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(3);

/// How long a token obtained in place of one Zoom answered 401 to is kept whatever Zoom
/// answers: a 401 to it so soon is about the request, not the token.
const REJECTED_AGAIN_AFTER: Duration = Duration::from_secs(60);

/// The `connection_error` of a connection whose refresh token Zoom no longer accepts.
pub const REAUTHORIZATION_REQUIRED: &str = "re-authorization required";

/// How often the keep-alive task looks for idle connections.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(60 * 60);

/// The waits between looks for a refresh token newer than one Zoom refused (3 s in all),
/// before the connection is marked broken.
/// How many refresh tokens found stored in place of a refused one a refresh tries in turn
/// before the connection counts as broken (each rotated elsewhere while it was being tried).
const MAX_NEWER_TRIED: u32 = 3;

const ROTATION_WAITS: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_millis(1000),
    Duration::from_millis(1500),
];

/// How often saving refreshed tokens is tried before giving up for this call.
const SAVE_ATTEMPTS: u32 = 3;

/// The least time a token must have left to be handed out after a new one could not be had
/// (Zoom down or rate limiting): clocks differ, and the call takes time.
const EXPIRY_SLACK: Duration = Duration::from_secs(10);

/// How long no token request is made for a connection after Zoom refused its app (a wrong
/// client id or secret, say): callers get the same error meanwhile, unless the app changes.
const REFUSAL_BACKOFF: Duration = Duration::from_secs(30);

/// How long no token request is made for a connection after Zoom's token endpoint answered it
/// 429 (rate limited): callers get that answer meanwhile.
const RATE_LIMIT_BACKOFF: Duration = Duration::from_secs(10);

/// How long no token request is made for a connection after Zoom's token endpoint failed
/// (5xx, or no answer in time): callers meanwhile get that failure, or the token in hand while
/// it works, instead of each waiting for Zoom in turn.
const OUTAGE_BACKOFF: Duration = Duration::from_secs(5);

/// How often the background retry looks for refreshed tokens not yet saved.
const UNSAVED_TICK: Duration = Duration::from_secs(1);

/// The first wait before the background retry saves a connection's refreshed tokens again;
/// it doubles with each failure up to [`UNSAVED_MAX_WAIT`].
const UNSAVED_FIRST_WAIT: Duration = Duration::from_secs(1);

/// The longest wait between background attempts to save one connection's refreshed tokens.
const UNSAVED_MAX_WAIT: Duration = Duration::from_secs(60);

/// An access token ready to use.
#[derive(Debug, Clone)]
pub struct Access {
    /// The bearer token.
    pub token: Secret,
    /// How the connection authenticates.
    pub auth_type: AuthType,
    /// When the token expires.
    pub expires_at: DateTime<Utc>,
}

/// Why no access token could be had.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The connection has no (known) `auth_type`.
    #[error("the connection is not set up")]
    NotSetUp,
    /// The connection is marked broken; the text says why.
    #[error("{0}")]
    Broken(String),
    /// Zoom refuses the connection's token requests for a reason other than a dead grant (its
    /// app's client id or secret, say); the text says why. They are made again after a
    /// back-off, or at once when the app changes.
    #[error("{0}")]
    Refused(String),
    /// Zoom refused or failed.
    #[error(transparent)]
    Zoom(#[from] ZoomError),
    /// The host engine failed.
    #[error(transparent)]
    Host(#[from] HostError),
}

#[derive(Default)]
struct Slot {
    cached: Option<Access>,
    /// A refreshed pair not yet saved to the host engine.
    unsaved: Option<Unsaved>,
    /// Set once Zoom refused the refresh token; cleared by [`Credentials::set_up_again`], by
    /// an announced change, or once the host shows the connection set up again.
    broken: Option<Broken>,
    /// The last access token Zoom answered 401 to: never handed out again, even while the
    /// stored expiry says it is fresh.
    rejected: Option<Secret>,
    /// Zoom's last refusal of a token request, while its back-off lasts.
    refusal: Option<Refusal>,
    /// How long before they expire tokens are refreshed: [`REFRESH_MARGIN`], or half the
    /// lifetime of the last token obtained if that is shorter.
    margin: Option<Duration>,
    /// When the last token was obtained (see [`MIN_REFRESH_INTERVAL`]).
    obtained_at: Option<tokio::time::Instant>,
    /// The last token obtained in place of one Zoom answered 401 to, and when (see
    /// [`REJECTED_AGAIN_AFTER`]).
    replacement: Option<(Secret, tokio::time::Instant)>,
}

impl Slot {
    /// Whether a token expiring at `expires_at` is handed out without asking for a new one:
    /// more than the margin is left, or a token was obtained moments ago (one Zoom said lives
    /// no time at all is used for those moments rather than asked for on every call).
    fn fresh(&self, expires_at: DateTime<Utc>) -> bool {
        let margin = self.margin.unwrap_or(REFRESH_MARGIN);
        expires_at - Utc::now() > chrono::Duration::from_std(margin).unwrap_or_default()
            || self
                .obtained_at
                .is_some_and(|at| at.elapsed() < MIN_REFRESH_INTERVAL)
    }

    /// `token` was obtained just now (so a token Zoom rejected earlier is not the one in use
    /// any more).
    fn obtained(&mut self, token: &Token) {
        let expires_at = token.expires_at;
        self.replacement = self
            .rejected
            .take()
            .map(|_| (token.access_token.clone(), tokio::time::Instant::now()));
        let lifetime = (expires_at - Utc::now()).to_std().unwrap_or_default();
        self.margin = Some(REFRESH_MARGIN.min(lifetime / 2));
        self.obtained_at = Some(tokio::time::Instant::now());
    }

    /// What a token request with `app` gets without being made, while the back-off of Zoom's
    /// last refusal lasts (of a refused app, only while `app` is the one refused).
    fn refusal_for(&mut self, app: &OAuthApp) -> Option<CredentialError> {
        let refusal = self.refusal.as_ref()?;
        let over = refusal.until <= tokio::time::Instant::now()
            || refusal.app.as_ref().is_some_and(|refused| refused != app);
        if over {
            self.refusal = None;
            return None;
        }
        Some(match &refusal.answer {
            Answer::Refused(message) => CredentialError::Refused(message.clone()),
            Answer::Zoom(e) => CredentialError::Zoom(e.clone()),
        })
    }
}

/// Zoom's refusal of a connection's token request, remembered for a back-off.
struct Refusal {
    until: tokio::time::Instant,
    /// The app Zoom refused; none for a rate limit or an outage, which hold whatever the app.
    app: Option<OAuthApp>,
    /// What callers get meanwhile.
    answer: Answer,
}

/// What callers get while a [`Refusal`] lasts.
enum Answer {
    /// [`CredentialError::Refused`].
    Refused(String),
    /// Zoom's answer as it was ([`CredentialError::Zoom`]).
    Zoom(ZoomError),
}

/// Refreshed token variables not yet saved to the host engine, and what they may be saved over.
#[derive(Clone)]
struct Unsaved {
    vars: Vec<Var>,
    /// The refresh token the refresh sent (Zoom has rotated it away).
    from: String,
    /// The pair's own refresh token.
    to: String,
    /// When the background retry tries again.
    retry_at: tokio::time::Instant,
    /// How long it waits after that attempt, should it fail too.
    wait: Duration,
}

impl Unsaved {
    fn new(token: &Token, from: &str) -> Self {
        let to = token
            .refresh_token
            .as_ref()
            .map_or(from, |t| t.expose())
            .to_string();
        Self {
            vars: crate::setup::token_vars(token),
            from: from.to_string(),
            to,
            retry_at: tokio::time::Instant::now() + UNSAVED_FIRST_WAIT,
            wait: UNSAVED_FIRST_WAIT,
        }
    }

    /// Puts the next background attempt off, longer each time.
    fn failed(&mut self) {
        self.wait = (self.wait * 2).min(UNSAVED_MAX_WAIT);
        self.retry_at = tokio::time::Instant::now() + self.wait;
    }
}

/// A connection this process saw Zoom refuse the refresh token of.
struct Broken {
    /// What callers are told.
    reason: String,
    /// The refresh token Zoom refused.
    refused: String,
    /// When the host was last asked whether the connection was set up again.
    checked: tokio::time::Instant,
}

/// How often a connection marked broken in memory is looked up again in the host engine, in
/// case it was set up again through another process (a remote host does not tell us).
const BROKEN_RECHECK: Duration = Duration::from_secs(10);

/// Access tokens for every connection, refreshed once at a time.
pub struct Credentials {
    source: Source,
    slots: Mutex<HashMap<ConnectionId, Arc<tokio::sync::Mutex<Slot>>>>,
    /// The token and setup tasks in flight, so shutdown can let them finish.
    tasks: tokio_util::task::TaskTracker,
}

/// Where tokens come from and go to; cheap to clone into a token task.
#[derive(Clone)]
struct Source {
    host: Arc<dyn HostEngine>,
    oauth: ZoomOAuth,
    default_app: Option<OAuthApp>,
    metrics: Arc<Metrics>,
    /// The connections whose slot may hold tokens not yet saved, for the background retry.
    unsaved: Arc<Mutex<std::collections::HashSet<ConnectionId>>>,
}

impl Credentials {
    /// Credentials stored in `host`, refreshed through `oauth`.
    pub fn new(
        host: Arc<dyn HostEngine>,
        oauth: ZoomOAuth,
        default_app: Option<OAuthApp>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            source: Source {
                host,
                oauth,
                default_app,
                metrics,
                unsaved: Arc::default(),
            },
            slots: Mutex::default(),
            tasks: tokio_util::task::TaskTracker::new(),
        }
    }

    /// For shutdown: waits up to `within` for the token and setup tasks in flight (one may
    /// hold a refresh token Zoom has just rotated), then tries once more to save tokens that
    /// could not be saved; whatever is still unsaved is logged by connection, since that
    /// connection will need to be authorized again.
    pub async fn finish(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::error!(
                tasks = self.tasks.len(),
                "token refreshes still in flight at shutdown; a refresh token Zoom rotated meanwhile may be lost"
            );
        }
        let slots: Vec<(ConnectionId, Arc<tokio::sync::Mutex<Slot>>)> = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(cid, slot)| (cid.clone(), slot.clone()))
            .collect();
        for (cid, slot) in slots {
            // Not `try_lock`: the background retry may have been stopped halfway through a
            // save, and a slot it held must not be skipped for that.
            let Ok(mut slot) = tokio::time::timeout_at(deadline, slot.lock()).await else {
                tracing::error!(
                    connection_id = %cid,
                    "a token request still holds the connection at shutdown; refreshed tokens it holds may be lost"
                );
                continue;
            };
            let Some(unsaved) = slot.unsaved.clone() else {
                continue;
            };
            let saved = tokio::time::timeout_at(deadline, self.source.save(&cid, &unsaved)).await;
            match saved {
                Ok(Ok(_) | Err(CredentialError::NotSetUp)) => slot.unsaved = None,
                Ok(Err(_)) | Err(_) => tracing::error!(
                    connection_id = %cid,
                    "refreshed tokens could not be saved before shutdown: the connection must be authorized again"
                ),
            }
        }
    }

    /// Until `stop`, saves refreshed tokens whose save failed, each connection's on its own
    /// back-off (from [`UNSAVED_FIRST_WAIT`], doubling up to [`UNSAVED_MAX_WAIT`]), so they
    /// reach the host engine even if no caller uses the connection again. A connection in use
    /// is left to its user, which saves them before anything else.
    pub async fn retry_unsaved(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(UNSAVED_TICK) => {}
            }
            // Stopping halfway through a save is safe: the tokens stay in their slot until
            // saved, and shutdown tries once more (`finish`).
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.retry_unsaved_pass() => {}
            }
        }
    }

    /// One pass of [`Self::retry_unsaved`]: tries the connections whose back-off is over.
    async fn retry_unsaved_pass(&self) {
        let cids: Vec<ConnectionId> = self.source.unsaved_cids();
        for cid in cids {
            let Some(slot) = self.existing_slot(&cid) else {
                self.source.forget_unsaved(&cid);
                continue;
            };
            let Ok(mut slot) = slot.try_lock() else {
                continue;
            };
            let Some(unsaved) = slot.unsaved.as_mut() else {
                self.source.forget_unsaved(&cid);
                continue;
            };
            if unsaved.retry_at > tokio::time::Instant::now() {
                continue;
            }
            match self.source.save(&cid, unsaved).await {
                Ok(_) | Err(CredentialError::NotSetUp) => {
                    slot.unsaved = None;
                    self.source.forget_unsaved(&cid);
                }
                Err(_) => unsaved.failed(),
            }
        }
    }

    fn slot(&self, cid: &ConnectionId) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(cid.clone()).or_default().clone()
    }

    /// Stops using `token` for `cid` (Zoom answered 401 with it: revoked, or the app was
    /// deauthorized): the next caller reads the connection from the host engine again, and an
    /// OAuth connection whose stored token is still this one is refreshed, however fresh its
    /// expiry says it is. Waits for a token request in flight rather than starting a second one
    /// beside it; a token obtained since (another caller's 401 came first) is kept, and so are
    /// tokens not yet saved.
    ///
    /// A 401 to a token obtained less than [`REJECTED_AGAIN_AFTER`] ago in place of one Zoom
    /// answered 401 to is taken as being about the request (an endpoint that answers 401 to
    /// every token), not the token, which is kept: every call to such an endpoint would
    /// otherwise cost a refresh, rotating the refresh token each time.
    pub async fn reject(&self, cid: &ConnectionId, token: &Secret) {
        let slot = self.slot(cid);
        let mut slot = slot.lock().await;
        if slot
            .replacement
            .as_ref()
            .is_some_and(|(t, at)| t == token && at.elapsed() < REJECTED_AGAIN_AFTER)
        {
            tracing::debug!(connection_id = %cid, "Zoom answered 401 to a token just obtained in place of another it answered 401 to: kept");
            return;
        }
        if slot.cached.as_ref().is_some_and(|a| a.token == *token) {
            slot.cached = None;
        }
        slot.rejected = Some(token.clone());
    }

    /// Runs `save`, which stores a new setup of `cid`, while no token request for `cid` is in
    /// flight (it waits for one to end), then forgets everything known of the old setup: its
    /// cached token, tokens not yet saved, and a broken mark.
    ///
    /// Both run as a task of their own, so a caller that goes away (its request timed out)
    /// cannot stop them between the save landing and the old state being forgotten. The old
    /// state is forgotten even when `save` fails: a failure may have landed in part (a remote
    /// host's set before its delete), and the old setup's tokens written back over the new
    /// one's would lose the new refresh token. The owner is replacing the setup anyway.
    pub async fn set_up_again<T, E>(
        &self,
        cid: &ConnectionId,
        save: impl Future<Output = Result<T, E>> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<HostError> + Send + 'static,
    {
        if self.tasks.is_closed() {
            return Err(stopping().into());
        }
        let slot = self.slot(cid);
        let task = self.tasks.spawn(async move {
            let mut slot = slot.lock_owned().await;
            let saved = save.await;
            *slot = Slot::default();
            saved
        });
        match task.await {
            Ok(saved) => saved,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(HostError::Internal(format!("the setup task failed: {e}")).into()),
        }
    }

    /// Runs `change`, which ends `cid`'s authorization in the host engine (true if it did; the
    /// app was removed in Zoom), with no token request of `cid` in flight, then forgets every
    /// token known for it, including one not yet saved, so the next caller reads the
    /// connection, and its `connection_error`, again. A
    /// refresh Zoom answered just before the app was removed is saved before `change`, not
    /// after it: its tokens cannot come back once `change` has removed them.
    pub async fn deauthorize_with<E>(
        &self,
        cid: &ConnectionId,
        change: impl std::future::Future<Output = Result<bool, E>>,
    ) -> Result<bool, E> {
        let slot = self.slot(cid);
        let mut slot = slot.lock().await;
        let deauthorized = change.await?;
        if deauthorized {
            *slot = Slot::default();
        }
        Ok(deauthorized)
    }

    /// `cid`'s stored variables were changed by someone else (VarsService, the host engine):
    /// forgets the token cached for it and a broken mark, so the next caller reads them again
    /// (a deleted connection is then not set up; a re-authorized one is no longer broken).
    /// Tokens not yet saved are kept: they are the live ones.
    pub async fn stored_changed(&self, cid: &ConnectionId) {
        if let Some(slot) = self.existing_slot(cid) {
            let mut slot = slot.lock().await;
            slot.cached = None;
            slot.broken = None;
        }
    }

    /// Until `stop`, calls [`Self::stored_changed`] for each connection `changes` reports (the
    /// embedded host's announcements), and for every connection if it missed some.
    pub async fn follow_changes(
        self: Arc<Self>,
        mut changes: tokio::sync::broadcast::Receiver<ConnectionId>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let change = tokio::select! {
                change = changes.recv() => change,
                () = stop.cancelled() => return,
            };
            match change {
                Ok(cid) => self.stored_changed(&cid).await,
                Err(RecvError::Lagged(_)) => {
                    let cids: Vec<ConnectionId> = self
                        .slots
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .keys()
                        .cloned()
                        .collect();
                    for cid in cids {
                        self.stored_changed(&cid).await;
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    fn existing_slot(&self, cid: &ConnectionId) -> Option<Arc<tokio::sync::Mutex<Slot>>> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(cid).cloned()
    }

    /// Forgets the slots that hold nothing worth keeping (no fresh token, nothing unsaved, no
    /// broken or rejected mark) and that no caller is using: every connection id ever asked
    /// for a token (deleted ones, mistyped ones) would otherwise keep one for good. Returns
    /// how many were forgotten.
    pub fn forget_idle(&self) -> usize {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let before = slots.len();
        // Under the map's lock nobody can take a new handle on a slot, so one held only by the
        // map stays unused while it is looked at.
        slots.retain(|_, slot| {
            Arc::strong_count(slot) > 1
                || slot.try_lock().map_or(true, |s| {
                    s.unsaved.is_some()
                        || s.broken.is_some()
                        || s.rejected.is_some()
                        || s.cached.as_ref().is_some_and(|a| s.fresh(a.expires_at))
                })
        });
        before - slots.len()
    }

    /// How many connections have a slot (for the memory benchmark and tests).
    pub fn cached_connections(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// A token with at least [`REFRESH_MARGIN`] left, refreshing (once, for all concurrent
    /// callers) when needed.
    pub async fn access_token(&self, cid: &ConnectionId) -> Result<Access, CredentialError> {
        self.obtain(cid, None).await
    }

    /// Refreshes an OAuth connection's tokens, however fresh, unless the stored ones were
    /// obtained after `idle_since` (keep-alive: a caller may have refreshed them since the pass
    /// read the connection, and a second refresh would be one Zoom did not need).
    pub async fn refresh_if_idle(
        &self,
        cid: &ConnectionId,
        idle_since: DateTime<Utc>,
    ) -> Result<Access, CredentialError> {
        self.obtain(cid, Some(idle_since)).await
    }

    /// Every `interval` (and once at start), refreshes the OAuth connections whose refresh
    /// token has not been used for `max_idle`, so that idle connections do not expire
    /// (Zoom drops refresh tokens unused for about 90 days). Runs until `stop`.
    pub async fn keep_alive(
        self: Arc<Self>,
        max_idle: Duration,
        interval: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            // Stopping mid-pass is safe: each refresh runs as a task of its own, which
            // shutdown waits for (`finish`).
            tokio::select! {
                _ = self.keep_alive_pass(max_idle) => {}
                () = stop.cancelled() => return,
            }
            let forgotten = self.forget_idle();
            if forgotten > 0 {
                tracing::debug!(forgotten, "forgot idle token slots");
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One keep-alive pass; returns how many connections were refreshed. A connection (or a
    /// kind of them) the host cannot read is logged and skipped, not allowed to end the pass:
    /// the ones after it would otherwise never be kept alive while it stays unreadable.
    pub async fn keep_alive_pass(&self, max_idle: Duration) -> usize {
        let max_idle = chrono::Duration::from_std(max_idle).unwrap_or(chrono::Duration::MAX);
        let idle_since = Utc::now()
            .checked_sub_signed(max_idle)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let names = [vars::OAUTH_EXPIRY, vars::CONNECTION_ERROR].map(String::from);
        let mut refreshed = 0;
        for auth_type in [AuthType::OAuthDefault, AuthType::OAuthPrivate] {
            let cids = match self
                .source
                .host
                .find_connections(vars::AUTH_TYPE, auth_type.as_str())
                .await
            {
                Ok(cids) => cids,
                Err(e) => {
                    tracing::warn!(error = %e, auth_type = auth_type.as_str(), "token keep-alive cannot list connections; trying again on the next pass");
                    continue;
                }
            };
            for cid in cids {
                let stored = match self.source.host.get_vars(&cid, &names).await {
                    Ok(stored) => stored,
                    Err(e) => {
                        tracing::warn!(connection_id = %cid, error = %e, "token keep-alive cannot read a connection; trying again on the next pass");
                        continue;
                    }
                };
                let get = |name: &str| value_of(&stored, name);
                if get(vars::CONNECTION_ERROR).is_some() {
                    continue;
                }
                let Some(last_refresh) = get(vars::OAUTH_EXPIRY)
                    .and_then(|e| DateTime::parse_from_rfc3339(e).ok())
                    .map(|e| obtained_at(e.with_timezone(&Utc)))
                else {
                    continue;
                };
                if last_refresh > idle_since {
                    continue;
                }
                match self.refresh_if_idle(&cid, idle_since).await {
                    Ok(_) => refreshed += 1,
                    Err(e) => {
                        tracing::warn!(connection_id = %cid, error = %e, "keep-alive refresh failed")
                    }
                }
            }
        }
        if refreshed > 0 {
            tracing::info!(refreshed, "keep-alive refreshed idle connections");
        }
        refreshed
    }

    /// A token for `cid` (see [`Source::obtain`] for `idle_since`).
    async fn obtain(
        &self,
        cid: &ConnectionId,
        idle_since: Option<DateTime<Utc>>,
    ) -> Result<Access, CredentialError> {
        let mut slot = self.slot(cid).lock_owned().await;
        if let Some(broken) = &mut slot.broken {
            if broken.checked.elapsed() < BROKEN_RECHECK {
                return Err(CredentialError::Broken(broken.reason.clone()));
            }
            broken.checked = tokio::time::Instant::now();
            if !self
                .source
                .set_up_again_elsewhere(cid, &broken.refused)
                .await
            {
                return Err(CredentialError::Broken(broken.reason.clone()));
            }
            tracing::info!(connection_id = %cid, "a connection marked broken was set up again elsewhere");
            slot.broken = None;
        }
        if let Some(access) = slot
            .cached
            .as_ref()
            .filter(|a| idle_since.is_none() && slot.unsaved.is_none() && slot.fresh(a.expires_at))
        {
            return Ok(access.clone());
        }
        // Past the shutdown's wait for token tasks, a refresh could be cut off after Zoom
        // rotated the refresh token, and the new one would be lost.
        if self.tasks.is_closed() {
            return Err(stopping().into());
        }
        let (source, id) = (self.source.clone(), cid.clone());
        let obtained = self
            .tasks
            .spawn(async move { source.obtain(slot, &id, idle_since).await })
            .await
            .map_err(|e| HostError::Internal(format!("the token task failed: {e}")))?;
        if let Err(CredentialError::NotSetUp) = &obtained {
            self.forget_unused(cid);
        }
        obtained
    }

    /// Forgets `cid`'s slot, which belongs to a connection not set up (a deleted one, a
    /// mistyped id), unless someone is using it or it holds tokens to save: nothing else in it
    /// matters for such a connection, and every id ever asked for would otherwise keep one until
    /// the hourly [`Self::forget_idle`].
    fn forget_unused(&self, cid: &ConnectionId) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // Under the map's lock nobody can take a new handle on the slot.
        let unused = slots.get(cid).is_some_and(|slot| {
            Arc::strong_count(slot) == 1 && slot.try_lock().is_ok_and(|s| s.unsaved.is_none())
        });
        if unused {
            slots.remove(cid);
        }
    }
}

impl Source {
    /// Counts one token request to Zoom.
    fn count<T>(&self, grant: &str, result: &Result<T, ZoomError>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(ZoomError::InvalidGrant(_)) => "invalid_grant",
            Err(_) => "error",
        };
        self.metrics
            .token_requests
            .with_label_values(&[grant, outcome])
            .inc();
    }

    /// Saves what was not saved, then reads, refreshes or requests a token, holding the slot.
    /// With `idle_since` (keep-alive), an OAuth connection's tokens are refreshed however
    /// fresh, unless those stored were obtained after it.
    async fn obtain(
        &self,
        mut slot: tokio::sync::OwnedMutexGuard<Slot>,
        cid: &ConnectionId,
        idle_since: Option<DateTime<Utc>>,
    ) -> Result<Access, CredentialError> {
        if let Some(unsaved) = slot.unsaved.clone() {
            match self.save(cid, &unsaved).await {
                Ok(_) => slot.unsaved = None,
                Err(e) => {
                    if matches!(e, CredentialError::NotSetUp) {
                        slot.unsaved = None;
                    }
                    return Err(e);
                }
            }
        }
        if let Some(access) = slot
            .cached
            .as_ref()
            .filter(|a| idle_since.is_none() && slot.fresh(a.expires_at))
        {
            return Ok(access.clone());
        }
        let previous = slot.cached.take();
        // A pair another process (or a new setup) stored while ours was refreshed is read
        // again, once; it was just written, so it is not refreshed again even for keep-alive.
        let mut superseded = false;
        let access = loop {
            let idle_since = idle_since.filter(|_| !superseded);
            match self
                .fetch(&mut slot, cid, idle_since, previous.as_ref())
                .await?
            {
                Some(access) => break access,
                None if !superseded => superseded = true,
                None => {
                    return Err(HostError::Unavailable(
                        "the connection's tokens changed while they were refreshed, try again"
                            .into(),
                    )
                    .into());
                }
            }
        };
        slot.cached = Some(access.clone());
        Ok(access)
    }

    /// Reads `cid`'s credentials from the host engine and hands out the stored token, or
    /// refreshes or requests one (`previous` is the token cached until now). `None`: a refresh
    /// was made but its pair not saved, since another refresh token was stored meanwhile; that
    /// one is to be read again. `idle_since`: as [`Source::obtain`]'s.
    async fn fetch(
        &self,
        slot: &mut Slot,
        cid: &ConnectionId,
        idle_since: Option<DateTime<Utc>>,
        previous: Option<&Access>,
    ) -> Result<Option<Access>, CredentialError> {
        let names: Vec<String> = [
            vars::AUTH_TYPE,
            vars::OAUTH_ACCESS_TOKEN,
            vars::OAUTH_REFRESH_TOKEN,
            vars::OAUTH_EXPIRY,
            vars::OAUTH_TOKEN_TYPE,
            vars::OAUTH_CLIENT_ID,
            vars::PRIVATE_CLIENT_ID,
            vars::PRIVATE_CLIENT_SECRET,
            vars::PRIVATE_ACCOUNT_ID,
            vars::CONNECTION_ERROR,
            vars::TOKEN_ERROR,
        ]
        .iter()
        .map(|n| n.to_string())
        .collect();
        let stored = self.host.get_vars(cid, &names).await?;
        let get = |name: &str| value_of(&stored, name);
        if let Some(reason) = get(vars::CONNECTION_ERROR) {
            return Err(CredentialError::Broken(reason.to_string()));
        }
        let auth_type: AuthType = get(vars::AUTH_TYPE)
            .and_then(|t| t.parse().ok())
            .ok_or(CredentialError::NotSetUp)?;
        let private_app =
            || -> Result<OAuthApp, CredentialError> {
                match (get(vars::PRIVATE_CLIENT_ID), get(vars::PRIVATE_CLIENT_SECRET)) {
                (Some(id), Some(secret)) => Ok(OAuthApp {
                    client_id: id.to_string(),
                    client_secret: Secret::new(secret),
                }),
                _ => Err(CredentialError::Broken(
                    "the private app's client id or secret is missing: set the connection up again"
                        .into(),
                )),
            }
            };

        let access = match auth_type {
            AuthType::ServerToServer => {
                let account_id = get(vars::PRIVATE_ACCOUNT_ID).ok_or_else(|| {
                    CredentialError::Broken(
                        "the Server-to-Server account id is missing: set the connection up again"
                            .into(),
                    )
                })?;
                let app = private_app()?;
                let usable = previous
                    .filter(|a| idle_since.is_none() && still_usable(&a.token, a.expires_at, slot))
                    .cloned();
                if let Some(refused) = slot.refusal_for(&app) {
                    return or_usable(cid, usable, refused);
                }
                let token = self.oauth.account_credentials(&app, account_id).await;
                self.count("account_credentials", &token);
                let token_error = get(vars::TOKEN_ERROR);
                let token = match token {
                    Ok(token) => token,
                    Err(e) => {
                        let refused = self
                            .refused(slot, cid, &app, auth_type, token_error, e)
                            .await;
                        return or_usable(cid, usable, refused);
                    }
                };
                self.refusal_over(slot, cid, token_error).await;
                slot.obtained(&token);
                access_of(token, auth_type)
            }
            AuthType::OAuthDefault | AuthType::OAuthPrivate => {
                let stored_expiry = get(vars::OAUTH_EXPIRY)
                    .and_then(|e| DateTime::parse_from_rfc3339(e).ok())
                    .map(|e| e.with_timezone(&Utc));
                // Read under the slot's lock: a refresh made since keep-alive read the
                // connection counts.
                let force = idle_since.is_some_and(|since| {
                    stored_expiry.is_none_or(|expiry| obtained_at(expiry) <= since)
                });
                // A token Zoom rejected matters only while it is the one stored.
                let stored_token = get(vars::OAUTH_ACCESS_TOKEN);
                if slot
                    .rejected
                    .as_ref()
                    .is_some_and(|r| Some(r.expose()) != stored_token)
                {
                    slot.rejected = None;
                }
                match (get(vars::OAUTH_ACCESS_TOKEN), stored_expiry) {
                    (Some(token), Some(expires_at))
                        if !force
                            && slot.fresh(expires_at)
                            && slot.rejected.as_ref().is_none_or(|r| r.expose() != token) =>
                    {
                        Access {
                            token: Secret::new(token),
                            auth_type,
                            expires_at,
                        }
                    }
                    _ => {
                        let refresh = get(vars::OAUTH_REFRESH_TOKEN).ok_or_else(|| {
                            CredentialError::Broken(
                                "no OAuth refresh token is stored: reconnect".into(),
                            )
                        })?;
                        let app = match auth_type {
                            AuthType::OAuthDefault => {
                                let app = self.default_app.clone().ok_or_else(|| {
                                    CredentialError::Broken(
                                        "the default OAuth app is no longer configured on this server"
                                            .into(),
                                    )
                                })?;
                                // Another app's refresh would be refused as a dead grant, and
                                // the refresh token, live for the app that issued it, dropped.
                                if let Some(why) = crate::connection::default_app_mismatch(
                                    &stored,
                                    Some(&app.client_id),
                                ) {
                                    return Err(CredentialError::Broken(why));
                                }
                                app
                            }
                            _ => private_app()?,
                        };
                        // The stored token, should no new one be had while it still works.
                        let usable = match (get(vars::OAUTH_ACCESS_TOKEN), stored_expiry) {
                            (Some(token), Some(expires_at))
                                if !force
                                    && still_usable(&Secret::new(token), expires_at, slot) =>
                            {
                                Some(Access {
                                    token: Secret::new(token),
                                    auth_type,
                                    expires_at,
                                })
                            }
                            _ => None,
                        };
                        if let Some(refused) = slot.refusal_for(&app) {
                            return or_usable(cid, usable, refused);
                        }
                        let token_error = get(vars::TOKEN_ERROR);
                        let mut refresh = refresh.to_string();
                        // Refresh tokens found rotated elsewhere and tried in turn.
                        let mut newer_tried = 0;
                        let token = loop {
                            // The span names the connection in what the token client logs
                            // (an answer it took but could not read).
                            let refreshed = self
                                .oauth
                                .refresh(&app, &Secret::new(&refresh))
                                .instrument(tracing::info_span!("refresh", connection_id = %cid))
                                .await;
                            self.count("refresh_token", &refreshed);
                            match refreshed {
                                Ok(token) => break token,
                                Err(ZoomError::InvalidGrant(reason)) => {
                                    // Another process on the same host engine (a rolling
                                    // deploy) may have rotated it and saved the new one
                                    // meanwhile: that one is live, not the connection dead.
                                    if newer_tried == 0
                                        && let Some(newer) =
                                            self.newer_refresh_token(cid, &refresh).await
                                    {
                                        tracing::info!(connection_id = %cid, "the refresh token was rotated elsewhere meanwhile; refreshing with the new one");
                                        newer_tried += 1;
                                        refresh = newer;
                                        continue;
                                    }
                                    if !self.mark_broken(cid, &refresh).await {
                                        // Stored between our last read and the mark.
                                        if newer_tried < MAX_NEWER_TRIED
                                            && let Some(newer) =
                                                self.stored_refresh_token(cid).await
                                            && newer != refresh
                                        {
                                            newer_tried += 1;
                                            refresh = newer;
                                            continue;
                                        }
                                    }
                                    tracing::warn!(connection_id = %cid, %reason, "Zoom refused the refresh token; the connection needs re-authorization");
                                    slot.broken = Some(Broken {
                                        reason: REAUTHORIZATION_REQUIRED.into(),
                                        refused: refresh,
                                        checked: tokio::time::Instant::now(),
                                    });
                                    return Err(CredentialError::Broken(
                                        REAUTHORIZATION_REQUIRED.into(),
                                    ));
                                }
                                Err(e) => {
                                    let refused = self
                                        .refused(slot, cid, &app, auth_type, token_error, e)
                                        .await;
                                    return or_usable(cid, usable, refused);
                                }
                            }
                        };
                        self.refusal_over(slot, cid, token_error).await;
                        slot.obtained(&token);
                        // The old refresh token is dead now: the new pair must reach the host
                        // engine before it is used, and must not be lost if that fails, so it
                        // is kept before the save starts.
                        let mut unsaved = Unsaved::new(&token, &refresh);
                        if auth_type == AuthType::OAuthDefault {
                            // Connections set up before the issuer was recorded learn it here.
                            unsaved
                                .vars
                                .push(Var::plain(vars::OAUTH_CLIENT_ID, &app.client_id));
                        }
                        slot.unsaved = Some(unsaved.clone());
                        match self.save(cid, &unsaved).await {
                            Ok(saved) => {
                                slot.unsaved = None;
                                if !saved {
                                    return Ok(None);
                                }
                            }
                            Err(e @ CredentialError::NotSetUp) => {
                                slot.unsaved = None;
                                return Err(e);
                            }
                            Err(e) => {
                                self.remember_unsaved(cid);
                                return Err(e);
                            }
                        }
                        tracing::info!(connection_id = %cid, "refreshed the OAuth token");
                        access_of(token, auth_type)
                    }
                }
            }
        };
        Ok(Some(access))
    }

    /// Zoom failed a token request of `cid` made with `app`. A refusal other than a dead grant
    /// (a wrong client id or secret, a disabled app) is remembered for [`REFUSAL_BACKOFF`] and
    /// recorded as the connection's `token_error` (not again while it is stored), so its status
    /// says so; a rate limit (429) is remembered for [`RATE_LIMIT_BACKOFF`], and Zoom failing
    /// (5xx, too slow) for [`OUTAGE_BACKOFF`]. Returns what the caller gets; other failures
    /// pass as they are.
    async fn refused(
        &self,
        slot: &mut Slot,
        cid: &ConnectionId,
        app: &OAuthApp,
        auth_type: AuthType,
        stored: Option<&str>,
        error: ZoomError,
    ) -> CredentialError {
        let now = tokio::time::Instant::now();
        if matches!(error, ZoomError::Unavailable(_) | ZoomError::Timeout) {
            tracing::warn!(connection_id = %cid, error = %error, backoff = ?OUTAGE_BACKOFF, "Zoom's token endpoint failed; no token request for this connection until the back-off ends");
            slot.refusal = Some(Refusal {
                until: now + OUTAGE_BACKOFF,
                app: None,
                answer: Answer::Zoom(error.clone()),
            });
            return error.into();
        }
        let ZoomError::Rejected { status, reason } = &error else {
            return error.into();
        };
        if *status == 429 {
            tracing::warn!(connection_id = %cid, backoff = ?RATE_LIMIT_BACKOFF, "Zoom's token endpoint is rate limiting; no token request for this connection until the back-off ends");
            slot.refusal = Some(Refusal {
                until: now + RATE_LIMIT_BACKOFF,
                app: None,
                answer: Answer::Zoom(error.clone()),
            });
            return error.into();
        }
        let message = match (status, auth_type) {
            (401, AuthType::OAuthDefault) => "Zoom refused the server's default OAuth app (ZOOM_CLIENT_ID, ZOOM_CLIENT_SECRET): the operator must correct them".to_string(),
            (401, _) => "Zoom refused the private app's client id or secret: update them and connect again".to_string(),
            _ => format!("Zoom refused the connection's token request ({status}): {reason}"),
        };
        tracing::warn!(connection_id = %cid, status, %reason, backoff = ?REFUSAL_BACKOFF, "Zoom refused a token request; none is made for this connection until the back-off ends or its app changes");
        slot.refusal = Some(Refusal {
            until: now + REFUSAL_BACKOFF,
            app: Some(app.clone()),
            answer: Answer::Refused(message.clone()),
        });
        if stored != Some(message.as_str()) {
            let mark = vec![Var::plain(vars::TOKEN_ERROR, &message)];
            let recorded = match auth_type {
                // The server's own app: every connection of it is refused alike.
                AuthType::OAuthDefault => self
                    .host
                    .replace_vars_if_set_up(cid, mark, &[])
                    .await
                    .map(|()| true),
                // Only over the app Zoom refused: a setup saved meanwhile (another process,
                // the owner correcting the secret) must not be marked with its refusal.
                _ => {
                    self.host
                        .replace_vars_if_current(
                            cid,
                            mark,
                            &[],
                            vars::PRIVATE_CLIENT_SECRET,
                            &[app.client_secret.expose()],
                        )
                        .await
                }
            };
            match recorded {
                Ok(true) | Err(HostError::NotFound(_)) => {}
                Ok(false) => {
                    tracing::info!(connection_id = %cid, "the connection's app changed while Zoom refused the old one; the refusal is not recorded");
                }
                Err(e) => {
                    tracing::warn!(connection_id = %cid, error = %e, "cannot record Zoom's refusal in the connection's status");
                }
            }
        }
        CredentialError::Refused(message)
    }

    /// Zoom issued a token for `cid`: its last refusal is over, and so is the `token_error`
    /// stored for it (`stored`), if any.
    async fn refusal_over(&self, slot: &mut Slot, cid: &ConnectionId, stored: Option<&str>) {
        slot.refusal = None;
        if stored.is_some()
            && let Err(e) = self
                .host
                .delete_vars(cid, &[vars::TOKEN_ERROR.to_string()])
                .await
        {
            tracing::warn!(connection_id = %cid, error = %e, "cannot clear Zoom's earlier refusal from the connection's status");
        }
    }

    /// Saves a refreshed pair, retrying a host engine that is briefly unavailable, and only
    /// over the refresh token it was refreshed from (or itself, saved already): `Ok(false)`
    /// when another one is stored, by a process that refreshed too or a new setup, whose
    /// tokens are the live ones (ours are dropped). A connection deleted meanwhile gets
    /// nothing (`NotSetUp`): the tokens are dropped.
    async fn save(&self, cid: &ConnectionId, unsaved: &Unsaved) -> Result<bool, CredentialError> {
        let mut attempt = 1;
        loop {
            match self
                .host
                .replace_vars_if_current(
                    cid,
                    unsaved.vars.clone(),
                    &[],
                    vars::OAUTH_REFRESH_TOKEN,
                    &[&unsaved.from, &unsaved.to],
                )
                .await
            {
                Ok(true) => return Ok(true),
                Ok(false) => {
                    tracing::info!(connection_id = %cid, "another refresh token was stored while this one was refreshed (another process refreshed, or the connection was set up again); the refreshed tokens are dropped");
                    return Ok(false);
                }
                Err(HostError::NotFound(_)) => {
                    tracing::info!(connection_id = %cid, "the connection was deleted while its token was refreshed; the new tokens are dropped");
                    return Err(CredentialError::NotSetUp);
                }
                Err(HostError::Unavailable(e)) if attempt < SAVE_ATTEMPTS => {
                    tracing::warn!(connection_id = %cid, error = %e, attempt, "cannot save refreshed tokens yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    attempt += 1;
                }
                Err(e) => {
                    tracing::error!(connection_id = %cid, error = %e, "cannot save refreshed tokens; keeping them in memory");
                    return Err(e.into());
                }
            }
        }
    }

    /// Lets the background retry know that `cid`'s slot holds tokens not yet saved.
    fn remember_unsaved(&self, cid: &ConnectionId) {
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|e| e.into_inner());
        unsaved.insert(cid.clone());
    }

    /// `cid`'s slot holds no tokens to save (any more).
    fn forget_unsaved(&self, cid: &ConnectionId) {
        let mut unsaved = self.unsaved.lock().unwrap_or_else(|e| e.into_inner());
        unsaved.remove(cid);
    }

    /// The connections whose slot may hold tokens not yet saved.
    fn unsaved_cids(&self) -> Vec<ConnectionId> {
        let unsaved = self.unsaved.lock().unwrap_or_else(|e| e.into_inner());
        unsaved.iter().cloned().collect()
    }

    /// The refresh token the host engine holds now, if it can be read.
    async fn stored_refresh_token(&self, cid: &ConnectionId) -> Option<String> {
        let names = [vars::OAUTH_REFRESH_TOKEN.to_string()];
        let stored = self.host.get_vars(cid, &names).await.ok()?;
        value_of(&stored, vars::OAUTH_REFRESH_TOKEN).map(str::to_string)
    }

    /// Whether `cid` was set up again since Zoom refused its refresh token `refused`: the host
    /// shows no `connection_error` and another refresh token (or none: deleted, or
    /// Server-to-Server now). A host that cannot be read answers no.
    async fn set_up_again_elsewhere(&self, cid: &ConnectionId, refused: &str) -> bool {
        let names = [vars::CONNECTION_ERROR, vars::OAUTH_REFRESH_TOKEN].map(String::from);
        let Ok(stored) = self.host.get_vars(cid, &names).await else {
            return false;
        };
        value_of(&stored, vars::CONNECTION_ERROR).is_none()
            && value_of(&stored, vars::OAUTH_REFRESH_TOKEN) != Some(refused)
    }

    /// A refresh token stored for `cid` other than `refused`, looked for a few times over
    /// [`ROTATION_WAITS`]: the process that rotated `refused` may not have saved the new one
    /// yet (a slow host engine, its save retries), and marking the connection broken
    /// meanwhile would end a connection whose newest grant is live.
    async fn newer_refresh_token(&self, cid: &ConnectionId, refused: &str) -> Option<String> {
        for wait in ROTATION_WAITS {
            tokio::time::sleep(wait).await;
            if let Some(stored) = self.stored_refresh_token(cid).await
                && stored != refused
            {
                return Some(stored);
            }
        }
        None
    }

    /// Marks the connection broken in the host engine and drops its dead tokens, unless another
    /// refresh token than `refused` is stored by then (`false`: that one may be live).
    async fn mark_broken(&self, cid: &ConnectionId, refused: &str) -> bool {
        let dead = [vars::OAUTH_ACCESS_TOKEN, vars::OAUTH_REFRESH_TOKEN].map(String::from);
        let marker = vec![Var::plain(vars::CONNECTION_ERROR, REAUTHORIZATION_REQUIRED)];
        // Only over the refused refresh token: a live pair stored meanwhile (another process
        // refreshed, a new setup) must not be deleted with it.
        match self
            .host
            .replace_vars_if_current(cid, marker, &dead, vars::OAUTH_REFRESH_TOKEN, &[refused])
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(connection_id = %cid, "another refresh token was stored while Zoom refused this one; the connection is not marked broken");
                return false;
            }
            // Deleted meanwhile: a mark would leave a variable behind on a connection gone.
            Err(HostError::NotFound(_)) => {
                tracing::info!(connection_id = %cid, "the connection was deleted; nothing to mark broken");
            }
            Err(e) => {
                // The in-memory mark still stops further token requests in this process.
                tracing::error!(connection_id = %cid, error = %e, "cannot mark the connection broken");
            }
        }
        true
    }
}

/// What token requests and setups get once shutdown has begun.
fn stopping() -> HostError {
    HostError::Unavailable("this service is stopping, try again".into())
}

/// What a caller gets when no new token can be had: `usable`, the token in hand, if `error` is
/// passing (Zoom down, too slow, or rate limiting) and there is such a token; else `error`.
fn or_usable(
    cid: &ConnectionId,
    usable: Option<Access>,
    error: CredentialError,
) -> Result<Option<Access>, CredentialError> {
    match (usable, &error) {
        (
            Some(access),
            CredentialError::Zoom(
                e @ (ZoomError::Unavailable(_)
                | ZoomError::Timeout
                | ZoomError::Rejected { status: 429, .. }),
            ),
        ) => {
            tracing::warn!(connection_id = %cid, error = %e, expires_at = %access.expires_at, "no new token can be had for now; using the current one until it expires");
            Ok(Some(access))
        }
        _ => Err(error),
    }
}

/// When an OAuth token stored with `expiry` was obtained: Zoom's access tokens live an hour
/// (`expires_in` is 3599 or 3600 seconds).
pub(crate) fn obtained_at(expiry: DateTime<Utc>) -> DateTime<Utc> {
    expiry - chrono::Duration::hours(1)
}

/// Whether `token`, expiring at `expires_at`, can still be handed out when no new one can be
/// had: it has not expired (with [`EXPIRY_SLACK`] to spare) and Zoom did not reject it.
fn still_usable(token: &Secret, expires_at: DateTime<Utc>, slot: &Slot) -> bool {
    let slack = chrono::Duration::from_std(EXPIRY_SLACK).unwrap_or_default();
    expires_at - Utc::now() > slack && slot.rejected.as_ref() != Some(token)
}

fn access_of(token: Token, auth_type: AuthType) -> Access {
    Access {
        token: token.access_token,
        auth_type,
        expires_at: token.expires_at,
    }
}

#[cfg(test)]
impl Credentials {
    /// Credentials over `host` whose Zoom is never reached (a closed port): for tests of what
    /// happens around token requests.
    pub(crate) fn with_unreachable_zoom(host: Arc<dyn HostEngine>) -> Self {
        let config = crate::config::Config::load([
            ("SECRET_KEY".to_string(), "k".repeat(32)),
            (
                "ZOOM_OAUTH_URL".to_string(),
                "http://127.0.0.1:9".to_string(),
            ),
        ])
        .expect("a valid test configuration");
        crate::zoom::init_tls();
        let oauth = ZoomOAuth::new(reqwest::Client::new(), &config);
        Self::new(host, oauth, None, Arc::new(Metrics::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::embedded::EmbeddedHost;

    /// Credentials over an embedded host; Zoom is never reached (the tokens stored are fresh).
    async fn credentials() -> (tempfile::TempDir, Arc<dyn HostEngine>, Credentials) {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(crate::crypto::Keys::from_material(&[9; 32]));
        let host: Arc<dyn HostEngine> = Arc::new(EmbeddedHost::open(dir.path(), keys).unwrap());
        let credentials = Credentials::with_unreachable_zoom(host.clone());
        (dir, host, credentials)
    }

    fn new_setup(token: &str) -> Vec<Var> {
        let expiry = (Utc::now() + chrono::Duration::hours(1))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        vec![
            Var::plain(vars::AUTH_TYPE, "oauthDefault"),
            Var::secret(vars::OAUTH_ACCESS_TOKEN, token),
            Var::secret(vars::OAUTH_REFRESH_TOKEN, "refresh"),
            Var::plain(vars::OAUTH_EXPIRY, &expiry),
        ]
    }

    /// Marks `cid` broken in memory, as a refresh answered `invalid_grant` does (its refused
    /// refresh token is [`new_setup`]'s).
    async fn broken(credentials: &Credentials, cid: &ConnectionId) {
        credentials.slot(cid).lock().await.broken = Some(Broken {
            reason: REAUTHORIZATION_REQUIRED.into(),
            refused: "refresh".into(),
            checked: tokio::time::Instant::now(),
        });
        assert!(matches!(
            credentials.access_token(cid).await,
            Err(CredentialError::Broken(_))
        ));
    }

    /// As if [`BROKEN_RECHECK`] had passed since `cid`'s broken mark was last checked.
    async fn recheck_due(credentials: &Credentials, cid: &ConnectionId) {
        let slot = credentials.slot(cid);
        let mut slot = slot.lock().await;
        let broken = slot.broken.as_mut().expect("marked broken");
        broken.checked = tokio::time::Instant::now() - BROKEN_RECHECK;
    }

    #[tokio::test]
    async fn marking_a_connection_broken_drops_its_tokens_but_leaves_nothing_of_a_deleted_one() {
        let (_dir, host, credentials) = credentials().await;
        let (kept, deleted) = (ConnectionId::generate(), ConnectionId::generate());
        for cid in [&kept, &deleted] {
            host.set_vars(cid, new_setup("access")).await.unwrap();
        }
        host.delete_vars(&deleted, &[]).await.unwrap();
        for cid in [&kept, &deleted] {
            assert!(credentials.source.mark_broken(cid, "refresh").await);
        }
        assert!(host.get_vars(&deleted, &[]).await.unwrap().is_empty());
        let left = host.get_vars(&kept, &[]).await.unwrap();
        let mut names: Vec<&str> = left.iter().map(|v| v.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [vars::AUTH_TYPE, vars::CONNECTION_ERROR, vars::OAUTH_EXPIRY]
        );
    }

    #[tokio::test]
    async fn a_refused_refresh_token_replaced_meanwhile_marks_nothing_and_deletes_nothing() {
        let (_dir, host, credentials) = credentials().await;
        let cid = ConnectionId::generate();
        let mut live = new_setup("live-access");
        live[2] = Var::secret(vars::OAUTH_REFRESH_TOKEN, "live-refresh");
        host.set_vars(&cid, live).await.unwrap();
        assert!(!credentials.source.mark_broken(&cid, "refresh").await);
        let left = host.get_vars(&cid, &[]).await.unwrap();
        let value = |name| crate::connection::value_of(&left, name);
        assert_eq!(value(vars::OAUTH_REFRESH_TOKEN), Some("live-refresh"));
        assert_eq!(value(vars::OAUTH_ACCESS_TOKEN), Some("live-access"));
        assert_eq!(value(vars::CONNECTION_ERROR), None);
    }

    #[tokio::test]
    async fn once_shutdown_has_begun_no_token_request_or_setup_starts() {
        let (_dir, host, credentials) = credentials().await;
        let cid = ConnectionId::generate();
        let mut expired = new_setup("old-access");
        expired[3] = Var::plain(vars::OAUTH_EXPIRY, "2020-01-01T00:00:00Z");
        host.set_vars(&cid, expired).await.unwrap();
        // Before: the request is made (and fails: this server has no default app).
        let before = credentials.access_token(&cid).await;
        assert!(
            matches!(before, Err(CredentialError::Broken(_))),
            "{before:?}"
        );
        credentials.finish(Duration::from_millis(100)).await;
        assert!(matches!(
            credentials.access_token(&cid).await,
            Err(CredentialError::Host(HostError::Unavailable(_)))
        ));
        let setup = credentials
            .set_up_again(&cid, async { Ok::<_, HostError>(()) })
            .await;
        assert!(matches!(setup, Err(HostError::Unavailable(_))), "{setup:?}");
    }

    #[tokio::test]
    async fn a_broken_mark_gives_way_once_the_host_shows_the_connection_set_up_again() {
        let (_dir, host, credentials) = credentials().await;
        let cid = ConnectionId::generate();
        host.set_vars(&cid, new_setup("old-access")).await.unwrap();
        broken(&credentials, &cid).await;
        // Set up again through another process: the host has a new pair, and nobody tells us.
        let mut again = new_setup("new-access");
        again[2] = Var::secret(vars::OAUTH_REFRESH_TOKEN, "refresh-2");
        host.set_vars(&cid, again).await.unwrap();
        assert!(
            matches!(
                credentials.access_token(&cid).await,
                Err(CredentialError::Broken(_))
            ),
            "the host is not asked on every call"
        );
        recheck_due(&credentials, &cid).await;
        let access = credentials.access_token(&cid).await.unwrap();
        assert_eq!(access.token.expose(), "new-access");
    }

    #[tokio::test]
    async fn slots_holding_nothing_are_forgotten_and_those_with_a_fresh_token_kept() {
        let (_dir, host, credentials) = credentials().await;
        let (used, unknown) = (ConnectionId::generate(), ConnectionId::generate());
        host.set_vars(&used, new_setup("access")).await.unwrap();
        credentials.access_token(&used).await.unwrap();
        let held = credentials.slot(&unknown);
        assert!(matches!(
            credentials.access_token(&unknown).await,
            Err(CredentialError::NotSetUp)
        ));
        assert_eq!(credentials.cached_connections(), 2);
        assert_eq!(credentials.forget_idle(), 0, "a slot in use is kept");
        drop(held);
        assert_eq!(credentials.forget_idle(), 1);
        assert_eq!(credentials.cached_connections(), 1);
        let access = credentials.access_token(&used).await.unwrap();
        assert_eq!(access.token.expose(), "access");
    }

    #[tokio::test]
    async fn a_broken_mark_stays_while_the_host_still_holds_the_refused_token() {
        let (_dir, host, credentials) = credentials().await;
        let cid = ConnectionId::generate();
        // Marking it broken in the host failed: no connection_error, the refused token stays.
        host.set_vars(&cid, new_setup("old-access")).await.unwrap();
        broken(&credentials, &cid).await;
        recheck_due(&credentials, &cid).await;
        assert!(matches!(
            credentials.access_token(&cid).await,
            Err(CredentialError::Broken(_))
        ));
    }

    #[tokio::test]
    async fn a_setup_whose_caller_gave_up_after_it_saved_still_forgets_the_old_state() {
        let (_dir, host, credentials) = credentials().await;
        let cid = ConnectionId::generate();
        broken(&credentials, &cid).await;
        let (h, id) = (host.clone(), cid.clone());
        let save = async move {
            h.set_vars(&id, new_setup("new-access")).await?;
            // Saved; the rest of the request (routing, the answer) takes a while.
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<(), HostError>(())
        };
        let gave_up = tokio::time::timeout(
            Duration::from_millis(50),
            credentials.set_up_again(&cid, save),
        )
        .await;
        assert!(gave_up.is_err(), "the caller's deadline passed");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let access = credentials.access_token(&cid).await.unwrap();
        assert_eq!(access.token.expose(), "new-access");
    }

    #[tokio::test]
    async fn a_setup_that_failed_after_saving_in_part_does_not_keep_the_old_state() {
        let (_dir, host, credentials) = credentials().await;
        let cid = ConnectionId::generate();
        broken(&credentials, &cid).await;
        let (h, id) = (host.clone(), cid.clone());
        let saved = credentials
            .set_up_again(&cid, async move {
                h.set_vars(&id, new_setup("new-access")).await?;
                // A remote host that took the set but failed the delete.
                Err::<(), HostError>(HostError::Unavailable("delete failed".into()))
            })
            .await;
        assert!(saved.is_err());
        let access = credentials.access_token(&cid).await.unwrap();
        assert_eq!(access.token.expose(), "new-access");
    }

    #[tokio::test]
    async fn a_server_to_server_token_with_minutes_left_is_still_used_while_zoom_cannot_be_reached()
    {
        let (_dir, host, credentials) = credentials().await;
        let cid = ConnectionId::generate();
        let setup = vec![
            Var::plain(vars::AUTH_TYPE, "serverToServer"),
            Var::plain(vars::PRIVATE_ACCOUNT_ID, "account"),
            Var::plain(vars::PRIVATE_CLIENT_ID, "client"),
            Var::secret(vars::PRIVATE_CLIENT_SECRET, "secret"),
        ];
        host.set_vars(&cid, setup).await.unwrap();
        let in_hand = |left: chrono::Duration| Access {
            token: Secret::new("in-hand"),
            auth_type: AuthType::ServerToServer,
            expires_at: Utc::now() + left,
        };
        credentials.slot(&cid).lock().await.cached = Some(in_hand(chrono::Duration::minutes(2)));
        let access = credentials.access_token(&cid).await.unwrap();
        assert_eq!(access.token.expose(), "in-hand");
        // Seconds from expiring: not handed out.
        credentials.slot(&cid).lock().await.cached = Some(in_hand(chrono::Duration::seconds(5)));
        let refused = credentials.access_token(&cid).await;
        assert!(
            matches!(
                refused,
                Err(CredentialError::Zoom(ZoomError::Unavailable(_)))
            ),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn a_connection_not_set_up_keeps_no_slot_once_nobody_uses_it() {
        let (_dir, host, credentials) = credentials().await;
        let (unknown, deleted) = (ConnectionId::generate(), ConnectionId::generate());
        assert!(matches!(
            credentials.access_token(&unknown).await,
            Err(CredentialError::NotSetUp)
        ));
        assert_eq!(credentials.cached_connections(), 0, "a mistyped id");
        // A connection whose token Zoom rejected, deleted since.
        host.set_vars(&deleted, new_setup("access")).await.unwrap();
        let access = credentials.access_token(&deleted).await.unwrap();
        credentials.reject(&deleted, &access.token).await;
        host.delete_vars(&deleted, &[]).await.unwrap();
        assert!(matches!(
            credentials.access_token(&deleted).await,
            Err(CredentialError::NotSetUp)
        ));
        assert_eq!(credentials.cached_connections(), 0, "a deleted one");
    }

    #[tokio::test]
    async fn a_rejected_token_is_forgotten_once_another_is_stored() {
        let (_dir, host, credentials) = credentials().await;
        let cid = ConnectionId::generate();
        host.set_vars(&cid, new_setup("revoked")).await.unwrap();
        let access = credentials.access_token(&cid).await.unwrap();
        credentials.reject(&cid, &access.token).await;
        // Set up again elsewhere: the host has a new token, and nobody tells us.
        host.set_vars(&cid, new_setup("new-access")).await.unwrap();
        let access = credentials.access_token(&cid).await.unwrap();
        assert_eq!(access.token.expose(), "new-access");
        let slot = credentials.slot(&cid);
        assert!(slot.lock().await.rejected.is_none());
    }

    #[tokio::test]
    async fn keep_alive_does_not_refresh_again_a_connection_refreshed_since_its_pass_read_it() {
        let (_dir, host, credentials) = credentials().await;
        let cid = ConnectionId::generate();
        let idle_since = Utc::now() - chrono::Duration::days(30);
        // Refreshed just now, by a caller, after the keep-alive pass found it idle: Zoom
        // (unreachable here) is not asked again.
        host.set_vars(&cid, new_setup("just-refreshed"))
            .await
            .unwrap();
        let access = credentials.refresh_if_idle(&cid, idle_since).await.unwrap();
        assert_eq!(access.token.expose(), "just-refreshed");

        // Still idle: refreshed, which here stops at the default app this test has none of.
        let long_ago = (idle_since - chrono::Duration::days(1) + chrono::Duration::hours(1))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        host.set_vars(&cid, vec![Var::plain(vars::OAUTH_EXPIRY, &long_ago)])
            .await
            .unwrap();
        let refreshed = credentials.refresh_if_idle(&cid, idle_since).await;
        assert!(
            matches!(&refreshed, Err(CredentialError::Broken(why)) if why.contains("default OAuth app")),
            "{refreshed:?}"
        );
    }
}
