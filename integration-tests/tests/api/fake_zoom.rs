//! A fake Zoom on port 0: the OAuth server (authorize with a consent page, token) and
//! `/users/me`. It is the outside world, so it checks what the real one checks (client
//! credentials in the Basic header, the registered redirect URI, single-use codes, the PKCE
//! verifier, the Server-to-Server account id) and records what it was sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::json;
use sha2::Digest;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const DEFAULT_CLIENT_ID: &str = "defaultClientId";
pub const DEFAULT_CLIENT_SECRET: &str = "default-client-secret-1";
pub const PRIVATE_CLIENT_ID: &str = "privateClientId";
pub const PRIVATE_CLIENT_SECRET: &str = "private-client-secret-2";
pub const S2S_CLIENT_ID: &str = "s2sClientId";
pub const S2S_CLIENT_SECRET: &str = "s2s-client-secret-3";
pub const S2S_ACCOUNT_ID: &str = "s2sAccount-42";

/// The user every OAuth app signs in as.
pub const USER_ID: &str = "KdYKjnimT4KPd8FFgQt9FQ";
pub const USER_ACCOUNT_ID: &str = "lAAAAAAAAAAAAA";
pub const USER_DISPLAY_NAME: &str = "Zoë Ångström";
pub const USER_EMAIL: &str = "zoe@example.com";

#[derive(Clone)]
struct App {
    secret: String,
    /// Server-to-Server apps have an account and no redirect URI.
    account_id: Option<String>,
}

struct Grant {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    used: bool,
}

struct Consent {
    client_id: String,
    redirect_uri: String,
    state: String,
    challenge: String,
}

/// One request to `/oauth/token`, as received.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub grant_type: String,
    pub client_id: Option<String>,
    pub outcome: StatusCode,
}

#[derive(Default)]
pub struct FakeZoomState {
    apps: HashMap<String, App>,
    /// The redirect URI registered for the OAuth apps.
    pub redirect_uri: String,
    consents: HashMap<String, Consent>,
    grants: HashMap<String, Grant>,
    access_tokens: Vec<String>,
    /// Every access and refresh token ever issued.
    pub issued: Vec<String>,
    /// Every authorization code ever issued.
    pub codes_issued: Vec<String>,
    /// Live refresh tokens and the client each belongs to; each works once (rotation).
    refresh_tokens: HashMap<String, String>,
    /// `expires_in` of Server-to-Server tokens.
    pub s2s_expires_in: i64,
    /// `expires_in` of OAuth tokens (code exchanges and refreshes).
    pub oauth_expires_in: i64,
    /// Answers for the next API requests: 429 with (`Retry-After`, `X-RateLimit-Type`).
    pub rate_limits: std::collections::VecDeque<(String, String)>,
    /// Answers for the next API requests (after any rate limit), whatever they ask:
    /// (status, `content-type`, body).
    pub canned_answers: std::collections::VecDeque<(StatusCode, &'static str, String)>,
    /// API requests received (method and path), rate-limited ones included.
    pub api_requests: Vec<String>,
    meetings: std::collections::BTreeMap<u64, serde_json::Value>,
    pub token_requests: Vec<TokenRequest>,
    /// Token requests received, counted as they arrive (before [`Self::token_delay`]).
    pub token_arrivals: usize,
    /// Whether an invalid access token gets an HTML page (a proxy's) instead of Zoom's JSON.
    pub unauthorized_as_html: bool,
    /// Every token request waits this long first (to test slow Zoom).
    pub token_delay: Duration,
    /// While set, the token endpoint answers 429 (Zoom's rate limit).
    pub token_rate_limited: bool,
    /// While set, the token endpoint answers 503 (Zoom's OAuth server down).
    pub token_unavailable: bool,
    /// A refresh waits this long after Zoom rotated the token, before the answer leaves (an
    /// answer slow on its way back).
    pub refresh_answer_delay: Duration,
    /// Token answers come as `text/plain`, without `token_type` and with `expires_in` as
    /// text (a proxy's or a gateway's rewriting).
    pub token_answers_as_text: bool,
    /// API requests that are not rate-limited wait this long before they are answered.
    pub api_delay: Duration,
    /// Token answers are a 200 with a page that is not JSON (the tokens issued, rotation done).
    pub token_answers_unreadable: bool,
    /// Authorization codes are exchanged for an access token only, with no refresh token.
    pub codes_without_refresh_token: bool,
    next: u64,
}

impl FakeZoomState {
    fn next_id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{}{}", self.next, random_hex())
    }
}

#[derive(Clone)]
pub struct FakeZoom {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<FakeZoomState>>,
    stop: CancellationToken,
}

impl FakeZoom {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut state = FakeZoomState {
            s2s_expires_in: 3599,
            oauth_expires_in: 3599,
            ..FakeZoomState::default()
        };
        for (id, secret, account) in [
            (DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, None),
            (PRIVATE_CLIENT_ID, PRIVATE_CLIENT_SECRET, None),
            (S2S_CLIENT_ID, S2S_CLIENT_SECRET, Some(S2S_ACCOUNT_ID)),
        ] {
            state.apps.insert(
                id.into(),
                App {
                    secret: secret.into(),
                    account_id: account.map(Into::into),
                },
            );
        }
        let state = Arc::new(Mutex::new(state));
        let stop = CancellationToken::new();
        let router = Router::new()
            .route("/oauth/authorize", get(authorize))
            .route("/oauth/consent", get(consent))
            .route("/oauth/token", post(token))
            .route("/v2/users/me", get(me))
            .route("/v2/users", get(users))
            .route("/v2/users/{user}", get(get_user))
            .route(
                "/v2/users/{user}/meetings",
                get(list_meetings).post(create_meeting),
            )
            .route("/v2/users/{user}/recordings", get(list_recordings))
            .route(
                "/v2/meetings/{id}",
                get(get_meeting)
                    .patch(update_meeting)
                    .delete(delete_meeting),
            )
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                api_gate,
            ))
            .with_state(state.clone());
        tokio::spawn({
            let stop = stop.clone();
            async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                    .unwrap();
            }
        });
        Self { addr, state, stop }
    }

    /// Settings that point the service at this fake, with the default app configured.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ZOOM_OAUTH_URL", self.oauth_url()),
            ("ZOOM_API_URL", format!("{}/v2", self.oauth_url())),
            ("ZOOM_CLIENT_ID", DEFAULT_CLIENT_ID.into()),
            ("ZOOM_CLIENT_SECRET", DEFAULT_CLIENT_SECRET.into()),
        ]
    }

    /// Settings that point the service at this fake, with no default app.
    pub fn env_without_default_app(&self) -> Vec<(&'static str, String)> {
        self.env().into_iter().take(2).collect()
    }

    pub fn oauth_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn register_redirect_uri(&self, uri: String) {
        self.state.lock().unwrap().redirect_uri = uri;
    }

    /// A refresh token of `client_id`, as an earlier authorization would have left.
    pub fn issue_refresh_token(&self, client_id: &str) -> String {
        let mut s = self.state.lock().unwrap();
        let token = s.next_id("refresh-");
        s.refresh_tokens.insert(token.clone(), client_id.into());
        s.issued.push(token.clone());
        token
    }

    /// Answers the next API request 429 with `Retry-After: retry_after` and
    /// `X-RateLimit-Type: kind`.
    pub fn rate_limit_next(&self, retry_after: &str, kind: &str) {
        self.state
            .lock()
            .unwrap()
            .rate_limits
            .push_back((retry_after.into(), kind.into()));
    }

    /// Revokes every access token issued so far (as deauthorizing an app does).
    pub fn revoke_access_tokens(&self) {
        self.state.lock().unwrap().access_tokens.clear();
    }

    /// Whether `token` is a refresh token Zoom would still accept.
    pub fn refresh_token_is_live(&self, token: &str) -> bool {
        self.state
            .lock()
            .unwrap()
            .refresh_tokens
            .contains_key(token)
    }

    /// Token requests of one grant type.
    pub fn access_token_is_live(&self, token: &str) -> bool {
        self.state
            .lock()
            .unwrap()
            .access_tokens
            .iter()
            .any(|t| t == token)
    }

    pub fn token_requests_of(&self, grant_type: &str) -> usize {
        self.token_requests()
            .iter()
            .filter(|r| r.grant_type == grant_type)
            .count()
    }

    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.state.lock().unwrap().token_requests.clone()
    }

    /// Stops answering: connections are refused from now on.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

fn random_hex() -> String {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn oauth_error(status: StatusCode, error: &str, reason: &str) -> Response {
    (
        status,
        axum::Json(json!({ "reason": reason, "error": error })),
    )
        .into_response()
}

fn bad_page(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Html(format!(
            "<h1>Invalid request</h1><p id=\"error\">{message}</p>"
        )),
    )
        .into_response()
}

async fn authorize(
    State(state): State<Arc<Mutex<FakeZoomState>>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    let mut s = state.lock().unwrap();
    if get("response_type") != "code" {
        return bad_page("response_type must be code");
    }
    let client_id = get("client_id");
    match s.apps.get(&client_id) {
        Some(app) if app.account_id.is_none() => {}
        _ => return bad_page("Invalid client_id"),
    }
    if get("redirect_uri") != s.redirect_uri {
        return bad_page("Invalid redirect: the redirect URI is not registered for this app");
    }
    if get("code_challenge_method") != "S256" || get("code_challenge").len() != 43 {
        return bad_page("PKCE with S256 is required");
    }
    if get("state").is_empty() {
        return bad_page("state is required");
    }
    let tx = s.next_id("tx");
    s.consents.insert(
        tx.clone(),
        Consent {
            client_id: client_id.clone(),
            redirect_uri: get("redirect_uri"),
            state: get("state"),
            challenge: get("code_challenge"),
        },
    );
    Html(format!(
        "<!doctype html><html><head><title>Zoom - Authorize</title></head><body>\
         <h1>Allow app {client_id} to use your Zoom account?</h1>\
         <p>Signed in as {USER_DISPLAY_NAME}</p>\
         <a id=\"allow\" href=\"/oauth/consent?tx={tx}&amp;decision=allow\">Allow</a> \
         <a id=\"deny\" href=\"/oauth/consent?tx={tx}&amp;decision=deny\">Decline</a>\
         </body></html>"
    ))
    .into_response()
}

async fn consent(
    State(state): State<Arc<Mutex<FakeZoomState>>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut s = state.lock().unwrap();
    let Some(consent) = q.get("tx").and_then(|tx| s.consents.remove(tx)) else {
        return bad_page("unknown consent");
    };
    let mut url = url::Url::parse(&consent.redirect_uri).unwrap();
    if q.get("decision").map(String::as_str) == Some("allow") {
        let code = s.next_id("code");
        s.codes_issued.push(code.clone());
        s.grants.insert(
            code.clone(),
            Grant {
                client_id: consent.client_id,
                redirect_uri: consent.redirect_uri.clone(),
                challenge: consent.challenge,
                used: false,
            },
        );
        url.query_pairs_mut()
            .append_pair("code", &code)
            .append_pair("state", &consent.state);
    } else {
        url.query_pairs_mut()
            .append_pair("error", "access_denied")
            .append_pair("error_description", "The user denied access")
            .append_pair("state", &consent.state);
    }
    Redirect::to(url.as_str()).into_response()
}

fn basic_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

async fn token(
    State(state): State<Arc<Mutex<FakeZoomState>>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: String,
) -> Response {
    // Zoom takes the parameters in the form body or (as its Server-to-Server docs show) in
    // the query string of a POST without a body.
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let delay = {
        let mut s = state.lock().unwrap();
        s.token_arrivals += 1;
        s.token_delay
    };
    tokio::time::sleep(delay).await;
    let param = |k: &str| form.get(k).or(query.get(k)).cloned().unwrap_or_default();
    if state.lock().unwrap().token_unavailable {
        state.lock().unwrap().token_requests.push(TokenRequest {
            grant_type: param("grant_type"),
            client_id: basic_auth(&headers).map(|c| c.0),
            outcome: StatusCode::SERVICE_UNAVAILABLE,
        });
        return (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable").into_response();
    }
    if state.lock().unwrap().token_rate_limited {
        state.lock().unwrap().token_requests.push(TokenRequest {
            grant_type: param("grant_type"),
            client_id: basic_auth(&headers).map(|c| c.0),
            outcome: StatusCode::TOO_MANY_REQUESTS,
        });
        return (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(json!({ "code": 429, "message": "Too many requests. Try again later." })),
        )
            .into_response();
    }
    let grant_type = param("grant_type");
    let client = basic_auth(&headers);
    let response = issue(
        &mut state.lock().unwrap(),
        &grant_type,
        client.clone(),
        &param,
    );
    let answer_delay = {
        let mut s = state.lock().unwrap();
        s.token_requests.push(TokenRequest {
            grant_type: grant_type.clone(),
            client_id: client.map(|c| c.0),
            outcome: response.status(),
        });
        s.refresh_answer_delay
    };
    if grant_type == "refresh_token" {
        tokio::time::sleep(answer_delay).await;
    }
    response
}

fn issue(
    s: &mut FakeZoomState,
    grant_type: &str,
    client: Option<(String, String)>,
    param: &dyn Fn(&str) -> String,
) -> Response {
    let Some((client_id, secret)) = client else {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Client credentials are required in the Authorization header",
        );
    };
    let Some(app) = s
        .apps
        .get(&client_id)
        .filter(|a| a.secret == secret)
        .cloned()
    else {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Invalid client_id or client_secret",
        );
    };
    match grant_type {
        "authorization_code" => {
            let code = param("code");
            let Some(grant) = s.grants.get_mut(&code) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Invalid authorization code",
                );
            };
            if grant.used {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Authorization code has been used",
                );
            }
            grant.used = true;
            if grant.client_id != client_id {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Code was issued to another client",
                );
            }
            if param("redirect_uri") != grant.redirect_uri {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Redirect URI mismatch",
                );
            }
            let verifier = param("code_verifier");
            let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sha2::Sha256::digest(verifier.as_bytes()));
            if verifier.len() < 43 || computed != grant.challenge {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Invalid code_verifier",
                );
            }
            let answer = tokens(s, &client_id);
            if s.codes_without_refresh_token {
                return (
                    StatusCode::OK,
                    axum::Json(json!({
                        "access_token": s.access_tokens.last().unwrap(),
                        "token_type": "bearer",
                        "expires_in": 3599,
                    })),
                )
                    .into_response();
            }
            answer
        }
        "refresh_token" => {
            let presented = param("refresh_token");
            match s.refresh_tokens.get(&presented) {
                Some(owner) if *owner == client_id => {}
                _ => {
                    return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "Invalid Token!");
                }
            }
            // Rotation: the presented token dies now.
            s.refresh_tokens.remove(&presented);
            tokens(s, &client_id)
        }
        "account_credentials" => {
            if app.account_id.as_deref() != Some(param("account_id").as_str()) {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Invalid account_id",
                );
            }
            let access = s.next_id("s2s-access-");
            s.access_tokens.push(access.clone());
            s.issued.push(access.clone());
            (
                StatusCode::OK,
                axum::Json(json!({
                    "access_token": access,
                    "token_type": "bearer",
                    "expires_in": s.s2s_expires_in,
                    "scope": "user:read:admin",
                    "api_url": "https://api.zoom.us",
                })),
            )
                .into_response()
        }
        _ => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "Unsupported grant type",
        ),
    }
}

/// A new access and refresh token for `client_id`.
fn tokens(s: &mut FakeZoomState, client_id: &str) -> Response {
    let access = s.next_id("access-");
    s.access_tokens.push(access.clone());
    let refresh = s.next_id("refresh-");
    s.refresh_tokens.insert(refresh.clone(), client_id.into());
    s.issued.extend([access.clone(), refresh.clone()]);
    if s.token_answers_unreadable {
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html")],
            "<html><body>OK</body></html>",
        )
            .into_response();
    }
    if s.token_answers_as_text {
        let body = json!({
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": "3599",
        });
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain")],
            body.to_string(),
        )
            .into_response();
    }
    (
        StatusCode::OK,
        axum::Json(json!({
            "access_token": access,
            "token_type": "bearer",
            "refresh_token": refresh,
            "expires_in": s.oauth_expires_in,
            "scope": "user:read:user meeting:read:meeting",
            "api_url": "https://api.zoom.us",
        })),
    )
        .into_response()
}

fn bearer_is_valid(state: &Mutex<FakeZoomState>, headers: &HeaderMap) -> bool {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    state
        .lock()
        .unwrap()
        .access_tokens
        .iter()
        .any(|t| t == token)
}

fn invalid_access_token() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({ "code": 124, "message": "Invalid access token." })),
    )
        .into_response()
}

async fn users() -> Response {
    axum::Json(json!({
        "page_size": 1,
        "total_records": 3,
        "next_page_token": "npt",
        "users": [{ "id": USER_ID, "email": USER_EMAIL }],
    }))
    .into_response()
}

async fn me() -> Response {
    axum::Json(user_json()).into_response()
}

/// Every API request: recorded, checked for a valid bearer token, and rate-limited when the
/// test queued a 429.
async fn api_gate(
    State(state): State<Arc<Mutex<FakeZoomState>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !request.uri().path().starts_with("/v2/") {
        return next.run(request).await;
    }
    let (limited, canned) = {
        let mut s = state.lock().unwrap();
        s.api_requests
            .push(format!("{} {}", request.method(), request.uri()));
        match s.rate_limits.pop_front() {
            Some(limit) => (Some(limit), None),
            None => (None, s.canned_answers.pop_front()),
        }
    };
    if let Some((status, content_type, body)) = canned {
        return (status, [("content-type", content_type)], body).into_response();
    }
    if let Some((retry_after, kind)) = limited {
        let mut response = (
            StatusCode::TOO_MANY_REQUESTS,
            [("x-ratelimit-type", kind)],
            axum::Json(json!({ "code": 429, "message": "You have reached the maximum per-second rate limit for this API. Try again later." })),
        )
            .into_response();
        // An empty Retry-After stands for none at all.
        if !retry_after.is_empty() {
            response
                .headers_mut()
                .insert("retry-after", retry_after.parse().unwrap());
        }
        return response;
    }
    let delay = state.lock().unwrap().api_delay;
    tokio::time::sleep(delay).await;
    if !bearer_is_valid(&state, request.headers()) {
        if state.lock().unwrap().unauthorized_as_html {
            return (
                StatusCode::UNAUTHORIZED,
                [("content-type", "text/html")],
                "<html><body>401 Authorization Required</body></html>",
            )
                .into_response();
        }
        return invalid_access_token();
    }
    next.run(request).await
}

fn user_json() -> serde_json::Value {
    json!({
        "id": USER_ID,
        "account_id": USER_ACCOUNT_ID,
        "email": USER_EMAIL,
        "display_name": USER_DISPLAY_NAME,
        "first_name": "Zoë",
        "last_name": "Ångström",
        "type": 2,
    })
}

fn no_meeting(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({ "code": 3001, "message": format!("Meeting does not exist: {id}.") })),
    )
        .into_response()
}

async fn get_user(axum::extract::Path(user): axum::extract::Path<String>) -> Response {
    if user == "me" || user == USER_ID || user == USER_EMAIL {
        axum::Json(user_json()).into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "code": 1001, "message": "User does not exist." })),
        )
            .into_response()
    }
}

async fn list_meetings(
    State(state): State<Arc<Mutex<FakeZoomState>>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let s = state.lock().unwrap();
    let meetings: Vec<_> = s.meetings.values().cloned().collect();
    axum::Json(json!({
        "page_size": q.get("page_size").and_then(|p| p.parse::<u64>().ok()).unwrap_or(30),
        "total_records": meetings.len(),
        "meetings": meetings,
    }))
    .into_response()
}

async fn create_meeting(
    State(state): State<Arc<Mutex<FakeZoomState>>>,
    axum::Json(body): axum::Json<serde_json::Value>,
) -> Response {
    let mut s = state.lock().unwrap();
    // Zoom's meeting ids are 10 to 11 digits: beyond 32 bits.
    let id = 85_746_065_432 + s.meetings.len() as u64;
    let mut meeting = body;
    meeting["id"] = json!(id);
    meeting["host_id"] = json!(USER_ID);
    meeting["join_url"] = json!(format!("https://zoom.us/j/{id}"));
    s.meetings.insert(id, meeting.clone());
    (StatusCode::CREATED, axum::Json(meeting)).into_response()
}

async fn get_meeting(
    State(state): State<Arc<Mutex<FakeZoomState>>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let s = state.lock().unwrap();
    match id.parse::<u64>().ok().and_then(|id| s.meetings.get(&id)) {
        Some(m) => axum::Json(m.clone()).into_response(),
        None => no_meeting(&id),
    }
}

async fn update_meeting(
    State(state): State<Arc<Mutex<FakeZoomState>>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::Json(body): axum::Json<serde_json::Value>,
) -> Response {
    let mut s = state.lock().unwrap();
    match id
        .parse::<u64>()
        .ok()
        .and_then(|id| s.meetings.get_mut(&id))
    {
        Some(m) => {
            for (k, v) in body.as_object().cloned().unwrap_or_default() {
                m[k] = v;
            }
            StatusCode::NO_CONTENT.into_response()
        }
        None => no_meeting(&id),
    }
}

async fn delete_meeting(
    State(state): State<Arc<Mutex<FakeZoomState>>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let mut s = state.lock().unwrap();
    match id.parse::<u64>().ok().and_then(|id| s.meetings.remove(&id)) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => no_meeting(&id),
    }
}

async fn list_recordings(Query(q): Query<HashMap<String, String>>) -> Response {
    axum::Json(json!({
        "from": q.get("from").cloned().unwrap_or_default(),
        "to": q.get("to").cloned().unwrap_or_default(),
        "total_records": 0,
        "meetings": [],
    }))
    .into_response()
}
