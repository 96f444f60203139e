//! OAuth flows in progress, and the `state` parameter that carries one through Zoom.
//!
//! A `state` is `v1.{flow id}.{expiry}.{connection id}.{origin}.{HMAC}`: signed with the
//! state key (see [`crate::crypto::Keys::state_signing_key`]), so it cannot be forged or moved
//! to another connection or origin; it expires (`OAUTH_STATE_TTL`, at most 10 minutes); and it
//! is accepted once, because the flow it names is taken out of [`Flows`] when the browser
//! comes back. The flow itself (PKCE verifier, a private app's pending credentials) never
//! leaves this process: nothing secret is in the URL.
//!
//! The flow is also bound to the browser that started it: starting sets a random cookie, and
//! only a browser presenting it may finish. A link to `/oauth/redirect/zoom` with someone
//! else's code therefore cannot connect a victim's session to the attacker's Zoom account.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::form::Target;
use crate::config::OAuthApp;
use crate::ids::ConnectionId;
use crate::secret::Secret;

type HmacSha256 = hmac::Hmac<Sha256>;

/// At most this many flows wait for their browser at once; more are refused until some end.
pub const MAX_PENDING_FLOWS: usize = 10_000;

/// At most this many flows of one connection wait at once; starting another forgets the
/// oldest. A holder of one connection's setup link cannot fill [`MAX_PENDING_FLOWS`] and so
/// keep everyone else from connecting.
pub const MAX_FLOWS_PER_CONNECTION: usize = 16;

/// Name prefix of the cookie that binds a flow to its browser (followed by part of the id).
pub const COOKIE_PREFIX: &str = "zoom_oauth_";

/// Which app a flow authorizes.
#[derive(Debug, Clone)]
pub enum FlowApp {
    /// The server-wide default OAuth app.
    Default,
    /// The connection's own OAuth app; its fields are saved only when the flow succeeds.
    Private {
        /// The app's credentials.
        app: OAuthApp,
        /// Its webhook secret token, if given.
        secret_token: Option<Secret>,
    },
}

/// An OAuth flow between `/oauth/start/zoom` (or `/zoom/save`) and `/oauth/redirect/zoom`.
#[derive(Debug, Clone)]
pub struct Flow {
    /// The connection being set up, where the host wants the browser to go at the end, and
    /// the setup link's grant the flow was started with (checked then), for the links of the
    /// pages shown when the browser comes back.
    pub target: Target,
    /// The app being authorized.
    pub app: FlowApp,
    /// The PKCE verifier.
    pub verifier: Secret,
}

/// A started flow: the `state` for Zoom and the cookie for the browser. `Debug` hides the
/// state and the cookie's value.
pub struct Started {
    /// The signed `state` parameter.
    pub state: String,
    /// Cookie name.
    pub cookie_name: String,
    /// Cookie value (random; only its hash is kept).
    pub cookie_value: String,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("state", &crate::secret::Raw("[redacted]"))
            .field("cookie_name", &self.cookie_name)
            .field("cookie_value", &crate::secret::Raw("[redacted]"))
            .finish()
    }
}

/// A flow taken back by the browser that started it.
#[derive(Debug)]
pub struct Finished {
    /// The flow.
    pub flow: Flow,
    /// The name of the flow's cookie, to be expired now that the flow is over.
    pub cookie_name: String,
}

/// Why a `state` was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Malformed, or the signature does not match: not issued by this service.
    #[error("the sign-in state is not valid: start again from the connection page")]
    Invalid,
    /// Issued by this service, but too long ago.
    #[error("this sign-in has expired: start again from the connection page")]
    Expired,
    /// Already accepted once (or this service restarted in between).
    #[error(
        "this sign-in was already completed (reloading its last page asks again; check the connection's status on the connection page) or is no longer known: start again from the connection page"
    )]
    Used,
    /// The browser finishing the flow is not the one that started it, or it started it under
    /// another address (a cookie belongs to one host name): `localhost` instead of
    /// `127.0.0.1`, an internal name instead of `WEBHOOK_ADDRESS`.
    #[error(
        "this sign-in was started in another browser, or at another address than this one: start again from the connection page in this browser, at this address"
    )]
    OtherBrowser,
    /// Too many flows are in progress.
    #[error("too many sign-ins are in progress: try again in a few minutes")]
    Busy,
}

struct Pending {
    flow: Flow,
    browser: [u8; 32],
    expires: u64,
    /// Order of starting: expiries are whole seconds, so many flows share one.
    started: u64,
}

/// The flows in progress, in memory: they hold secrets, live minutes, and end with the
/// browser that started them.
pub struct Flows {
    key: [u8; 32],
    ttl: Duration,
    /// Whether cookies are named with the `__Host-` prefix (over https): a browser then takes
    /// them only from this host over https, with `Path=/`, so neither a sibling subdomain nor
    /// a network attacker's plain-http answer can plant one.
    host_only: bool,
    pending: Mutex<HashMap<[u8; 16], Pending>>,
    started: AtomicU64,
}

impl Flows {
    /// Flows signed with `key`, valid for `ttl`.
    pub fn new(key: [u8; 32], ttl: Duration) -> Self {
        Self {
            key,
            ttl,
            host_only: false,
            pending: Mutex::new(HashMap::new()),
            started: AtomicU64::new(0),
        }
    }

    /// The same, with cookies named `__Host-…` when `https` (see [`Self::set_cookie`]).
    pub fn over_https(mut self, https: bool) -> Self {
        self.host_only = https;
        self
    }

    /// The `Set-Cookie` value that sets a flow's cookie `name` to `value` for `max_age`
    /// seconds (0 expires it): `HttpOnly`, `SameSite=Lax`, on the redirect path; over https
    /// `Secure` and, as browsers require of a `__Host-` cookie, on `/`.
    pub fn set_cookie(&self, name: &str, value: &str, max_age: u64) -> String {
        let (path, secure) = if self.host_only {
            ("/", "; Secure")
        } else {
            (super::REDIRECT_PATH, "")
        };
        format!("{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}")
    }

    fn cookie_name(&self, id: &[u8; 16]) -> String {
        let name = cookie_name(id);
        if self.host_only {
            format!("__Host-{name}")
        } else {
            name
        }
    }

    /// Records `flow` and returns its `state` and browser cookie.
    pub fn start(&self, flow: Flow) -> Result<Started, StateError> {
        let id: [u8; 16] = random();
        let cookie: [u8; 16] = random();
        let now = unix_now();
        let expires = now + self.ttl.as_secs();
        let state = self.sign(&id, expires, &flow.target.cid, &flow.target.origin);
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        // Expired flows go at once: a private app's flow holds its client secret, which
        // must not stay in memory past the flow's life.
        pending.retain(|_, p| p.expires >= now);
        // This connection's waiting flows; past the cap the oldest goes.
        let started = self.started.fetch_add(1, Ordering::Relaxed);
        let of_connection: Vec<([u8; 16], u64)> = pending
            .iter()
            .filter(|(_, p)| p.flow.target.cid == flow.target.cid)
            .map(|(id, p)| (*id, p.started))
            .collect();
        if of_connection.len() >= MAX_FLOWS_PER_CONNECTION
            && let Some((oldest, _)) = of_connection.iter().min_by_key(|(_, started)| *started)
        {
            pending.remove(oldest);
        }
        if pending.len() >= MAX_PENDING_FLOWS {
            return Err(StateError::Busy);
        }
        pending.insert(
            id,
            Pending {
                flow,
                browser: Sha256::digest(cookie).into(),
                expires,
                started,
            },
        );
        Ok(Started {
            state,
            cookie_name: self.cookie_name(&id),
            cookie_value: hex::encode(cookie),
        })
    }

    /// Checks `state` and the browser's cookies (the raw `Cookie` header), and takes the flow:
    /// a second call with the same `state` fails with [`StateError::Used`].
    pub fn finish(&self, state: &str, cookies: Option<&str>) -> Result<Finished, StateError> {
        let (id, expires) = self.verify(state)?;
        let now = unix_now();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|_, p| p.expires >= now);
        if expires < now {
            return Err(StateError::Expired);
        }
        // Genuine (signed) but not waiting: taken before, or forgotten (the cap).
        let entry = pending.get(&id).ok_or(StateError::Used)?;
        let presented = cookies
            .and_then(|c| cookie_value(c, &self.cookie_name(&id)))
            .and_then(|v| hex::decode(v).ok())
            .map(|v| <[u8; 32]>::from(Sha256::digest(v)));
        if !presented.is_some_and(|p| constant_time_eq(&p, &entry.browser)) {
            return Err(StateError::OtherBrowser);
        }
        // Removed, not kept as a mark: a mark would count against MAX_PENDING_FLOWS until
        // it expired, so one setup link's holder starting and finishing flows in a loop could
        // keep everyone else from connecting. A replay is refused just the same (above).
        let flow = pending.remove(&id).ok_or(StateError::Used)?.flow;
        Ok(Finished {
            flow,
            cookie_name: self.cookie_name(&id),
        })
    }

    /// The connection and origin a `state` names, if it is genuine (expired or not); for
    /// error pages that offer a way back.
    pub fn peek(&self, state: &str) -> Option<(ConnectionId, String)> {
        self.verify(state).ok()?;
        let mut parts = state.split('.').skip(3);
        let cid = ConnectionId::parse(parts.next()?).ok()?;
        Some((cid, parts.next()?.to_string()))
    }

    fn sign(&self, id: &[u8; 16], expires: u64, cid: &ConnectionId, origin: &str) -> String {
        let body = format!("v1.{}.{expires}.{cid}.{origin}", hex::encode(id));
        let mac = hex::encode(self.mac(&body).finalize().into_bytes());
        format!("{body}.{mac}")
    }

    fn mac(&self, body: &str) -> HmacSha256 {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.key)
            .expect("HMAC takes keys of any length");
        mac.update(b"zoom-integration oauth state\0");
        mac.update(body.as_bytes());
        mac
    }

    /// The flow id and expiry of a genuine `state`.
    fn verify(&self, state: &str) -> Result<([u8; 16], u64), StateError> {
        if state.len() > 512 {
            return Err(StateError::Invalid);
        }
        let (body, mac) = state.rsplit_once('.').ok_or(StateError::Invalid)?;
        let mac = hex::decode(mac).map_err(|_| StateError::Invalid)?;
        self.mac(body)
            .verify_slice(&mac)
            .map_err(|_| StateError::Invalid)?;
        let parts: Vec<&str> = body.split('.').collect();
        let [version, id, expires, _cid, _origin] = parts[..] else {
            return Err(StateError::Invalid);
        };
        if version != "v1" {
            return Err(StateError::Invalid);
        }
        let id: [u8; 16] = hex::decode(id)
            .ok()
            .and_then(|id| id.try_into().ok())
            .ok_or(StateError::Invalid)?;
        let expires = expires.parse().map_err(|_| StateError::Invalid)?;
        Ok((id, expires))
    }
}

fn cookie_name(id: &[u8; 16]) -> String {
    format!("{COOKIE_PREFIX}{}", hex::encode(&id[..8]))
}

/// The value of cookie `name` in a `Cookie` header.
fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim_matches('"'))
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the operating system's random source failed");
    bytes
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flows(ttl: u64) -> Flows {
        Flows::new([7; 32], Duration::from_secs(ttl))
    }

    fn flow() -> Flow {
        Flow {
            target: Target {
                cid: ConnectionId::generate(),
                origin: "web".into(),
                grant: None,
            },
            app: FlowApp::Default,
            verifier: Secret::new("v".repeat(43)),
        }
    }

    fn cookie(started: &Started) -> String {
        format!("other=1; {}={}", started.cookie_name, started.cookie_value)
    }

    #[test]
    fn an_expired_flow_is_dropped_by_the_next_start_not_kept_until_a_redirect() {
        let flows = flows(0);
        flows.start(flow()).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        flows.start(flow()).unwrap();
        assert_eq!(flows.pending.lock().unwrap().len(), 1);
    }

    #[test]
    fn over_https_only_a_host_only_cookie_finishes_a_flow() {
        let flows = flows(600).over_https(true);
        assert_eq!(
            flows.set_cookie("__Host-n", "v", 0),
            "__Host-n=v; Path=/; Max-Age=0; HttpOnly; SameSite=Lax; Secure"
        );
        let started = flows.start(flow()).unwrap();
        assert!(
            started.cookie_name.starts_with("__Host-zoom_oauth_"),
            "{}",
            started.cookie_name
        );
        // The same value under the name without the prefix (as a sibling subdomain or a
        // plain-http answer could plant) does not do.
        let planted = format!(
            "{}={}",
            started.cookie_name.trim_start_matches("__Host-"),
            started.cookie_value
        );
        assert!(matches!(
            flows.finish(&started.state, Some(&planted)),
            Err(StateError::OtherBrowser)
        ));
        assert!(
            flows
                .finish(&started.state, Some(&cookie(&started)))
                .is_ok()
        );
    }

    #[test]
    fn a_started_flows_debug_output_names_neither_its_state_nor_its_cookie() {
        let started = flows(600).start(flow()).unwrap();
        let printed = format!("{started:?}");
        assert!(!printed.contains(&started.state), "{printed}");
        assert!(!printed.contains(&started.cookie_value), "{printed}");
        assert!(printed.contains(&started.cookie_name), "{printed}");
    }

    #[test]
    fn a_state_is_accepted_once_and_only_with_its_cookie() {
        let flows = flows(600);
        let started = flows.start(flow()).unwrap();
        assert_eq!(
            flows.finish(&started.state, None).unwrap_err(),
            StateError::OtherBrowser
        );
        assert_eq!(
            flows
                .finish(&started.state, Some(&format!("{}=00", started.cookie_name)))
                .unwrap_err(),
            StateError::OtherBrowser
        );
        let done = flows
            .finish(&started.state, Some(&cookie(&started)))
            .unwrap();
        assert_eq!(done.flow.target.origin, "web");
        assert_eq!(done.cookie_name, started.cookie_name);
        assert_eq!(
            flows
                .finish(&started.state, Some(&cookie(&started)))
                .unwrap_err(),
            StateError::Used
        );
    }

    #[test]
    fn one_connection_s_flows_cannot_crowd_out_another_s() {
        let flows = flows(600);
        let one = flow();
        let first = flows.start(one.clone()).unwrap();
        let mut last = None;
        for _ in 0..MAX_PENDING_FLOWS {
            last = Some(flows.start(one.clone()).unwrap());
        }
        let other = flows
            .start(flow())
            .expect("another connection can still start");
        let finish = |s: &Started| flows.finish(&s.state, Some(&cookie(s))).map(|f| f.flow);
        assert!(
            matches!(finish(&first), Err(StateError::Used)),
            "the oldest was forgotten"
        );
        assert!(finish(&last.unwrap()).is_ok());
        assert!(finish(&other).is_ok());
    }

    #[test]
    fn finished_flows_do_not_count_against_the_limit_of_flows_in_progress() {
        let flows = flows(600);
        let one = flow();
        for _ in 0..MAX_PENDING_FLOWS + 10 {
            let started = flows.start(one.clone()).unwrap();
            flows
                .finish(&started.state, Some(&cookie(&started)))
                .unwrap();
        }
        let other = flows
            .start(flow())
            .expect("another connection can still start");
        assert!(flows.finish(&other.state, Some(&cookie(&other))).is_ok());
    }

    #[test]
    fn a_changed_state_is_invalid() {
        let flows = flows(600);
        let started = flows.start(flow()).unwrap();
        let other = ConnectionId::generate();
        let parts: Vec<&str> = started.state.split('.').collect();
        let moved = format!(
            "{}.{}.{}.{}.{}.{}",
            parts[0], parts[1], parts[2], other, parts[4], parts[5]
        );
        assert_eq!(
            flows.finish(&moved, Some(&cookie(&started))).unwrap_err(),
            StateError::Invalid
        );
        let later = format!(
            "{}.{}.{}.{}.{}.{}",
            parts[0],
            parts[1],
            u64::MAX,
            parts[3],
            parts[4],
            parts[5]
        );
        assert_eq!(flows.finish(&later, None).unwrap_err(), StateError::Invalid);
        for junk in ["", "v1", "....", &"a".repeat(600)] {
            assert_eq!(flows.finish(junk, None).unwrap_err(), StateError::Invalid);
        }
        // Signed with another key.
        let elsewhere = Flows::new([8; 32], Duration::from_secs(600));
        let foreign = elsewhere.start(flow()).unwrap();
        assert_eq!(
            flows
                .finish(&foreign.state, Some(&cookie(&foreign)))
                .unwrap_err(),
            StateError::Invalid
        );
        assert_eq!(flows.peek(&started.state).unwrap().1, "web");
        assert!(flows.peek(&moved).is_none());
    }

    #[test]
    fn an_old_state_has_expired() {
        let flows = flows(0);
        let started = flows.start(flow()).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(
            flows
                .finish(&started.state, Some(&cookie(&started)))
                .unwrap_err(),
            StateError::Expired
        );
    }
}
