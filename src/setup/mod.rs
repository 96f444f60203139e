//! Connection setup over HTTP: the connection page (`/zoom/`), the form (`/zoom/save`), and
//! the OAuth flow (`/oauth/start/zoom` → Zoom → `/oauth/redirect/zoom`).
//!
//! Nothing is written to the host engine until a flow has succeeded: a private app's fields
//! wait in the flow ([`state::Flows`]), a Server-to-Server app is saved only after Zoom issued
//! it a token, and every success writes all of the connection's variables in one change
//! ([`crate::host::HostEngine::replace_vars`]). A failure leaves the connection as it was,
//! except on a remote host whose delete keeps failing after its set landed: then the new
//! values stand beside stale ones until the owner tries again, as the error page asks.

pub mod error;
pub mod form;
pub mod links;
pub mod page;
pub mod state;

use axum::Router;
use axum::extract::rejection::{FormRejection, QueryRejection};
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;

use self::error::SetupError;
use self::form::{Choice, FormError, PrivateApp, RawForm, RawTarget, Target};
use self::page::{ConnectionPage, CurrentStatus, message_page};
use self::state::{Flow, FlowApp};
use crate::AppState;
use crate::config::OAuthApp;
use crate::connection::{self, AuthType, StatusCode as ConnStatus, vars};
use crate::host::{HostError, Var};
use crate::integration::CONNECTION_PATH;
use crate::zoom::ZoomError;
use crate::zoom::api::ZoomUser;
use crate::zoom::oauth::{Pkce, Token};

/// `/zoom/save`.
pub const SAVE_PATH: &str = "/zoom/save";
/// `/oauth/start/zoom`.
pub const START_PATH: &str = "/oauth/start/zoom";
/// `/oauth/redirect/zoom`, Zoom's redirect URI.
pub const REDIRECT_PATH: &str = "/oauth/redirect/zoom";

/// Forms are a few short fields.
pub(crate) const MAX_FORM_BYTES: usize = 16 * 1024;

/// The routes of connection setup.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(CONNECTION_PATH, get(connection_page))
        .route(SAVE_PATH, get(save).post(save))
        .route(START_PATH, get(start))
        .route(REDIRECT_PATH, get(redirect))
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
}

/// `GET /zoom/?cid=…&origin=…`
async fn connection_page(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<RawTarget>, QueryRejection>,
) -> Response {
    show_connection_page(state, peer, headers, query)
        .await
        .unwrap_or_else(|e| e.page_titled("Zoom connection page not available", None))
}

async fn show_connection_page(
    state: AppState,
    peer: SocketAddr,
    headers: HeaderMap,
    query: Result<Query<RawTarget>, QueryRejection>,
) -> Result<Response, SetupError> {
    let target = query
        .map_err(|_| FormError("the query cannot be read".into()))?
        .0
        .check()?;
    // Showing the page changes nothing: a link from another site (the host's UI) may open it.
    // Not under another site's name, though: that site's page could then read it.
    let foreign = for_another_sites_name(&headers, &state.config);
    authorize(&state, &target, peer, foreign)?;
    let (stored, unreadable) = match state.host.get_vars(&target.cid, &[]).await {
        Ok(vars) => (Some(vars), None),
        Err(e @ HostError::Undecryptable { .. }) => {
            // The fields the form shows are plain: read them alone, and say what is wrong.
            let plain = [
                vars::AUTH_TYPE,
                vars::PRIVATE_ACCOUNT_ID,
                vars::PRIVATE_CLIENT_ID,
            ];
            let plain = plain.map(String::from);
            let found = state.host.get_vars(&target.cid, &plain).await.ok();
            (found, Some(e.with_way_out()))
        }
        // A connection the host engine says it does not have cannot be set up: the page says
        // so (404), where offering the form would only fail at the save.
        Err(e @ HostError::NotFound(_)) => return Err(e.into()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the connection for its page");
            (None, None)
        }
    };
    let get = |name: &str| {
        stored
            .iter()
            .flatten()
            .find(|v| v.name == name && !v.is_secret)
            .map(|v| v.value.as_str())
            .unwrap_or_default()
    };
    let auth_type = get(vars::AUTH_TYPE).parse::<AuthType>().ok();
    let status = match (&stored, unreadable) {
        (_, Some(why)) => CurrentStatus::Error(why),
        (None, None) => CurrentStatus::Unknown,
        (Some(all), None) => {
            let status = connection::connection_status(all);
            match status.code() {
                ConnStatus::InitRequired => CurrentStatus::NotSetUp,
                ConnStatus::Ok => CurrentStatus::Connected(match auth_type {
                    Some(AuthType::ServerToServer) => format!(
                        "to Zoom account {} with a private Server-to-Server app",
                        get(vars::ACCOUNT_ID)
                    ),
                    Some(kind) => {
                        let who = [get(vars::USER_NAME), get(vars::USER_ID)]
                            .into_iter()
                            .find(|w| !w.is_empty())
                            .unwrap_or("an unknown Zoom user");
                        format!("as {who} with the {}", kind.describe())
                    }
                    None => status.message,
                }),
                _ => CurrentStatus::Error(status.message),
            }
        }
    };
    let default_app_configured = state.config.default_app.is_some();
    // A disabled choice cannot be checked: with no default app, a connection set up with it
    // is offered a private app instead of no choice at all.
    // Without a public address no OAuth flow can run: Server-to-Server is what is left.
    let oauth = state.config.webhook_address.is_some();
    let selected = match auth_type {
        _ if !oauth => AuthType::ServerToServer,
        Some(AuthType::OAuthDefault) | None if !default_app_configured => AuthType::OAuthPrivate,
        Some(kind) => kind,
        None => AuthType::OAuthDefault,
    };
    let redirect_url = state.config.public_url(REDIRECT_PATH);
    let event_url = state.config.public_url(crate::webhook::PATH);
    let link_time_left = target
        .grant
        .as_deref()
        .and_then(|g| state.links.time_left(&target.cid, &target.origin, g));
    let mut page = ConnectionPage {
        link_time_left,
        target: &target,
        status,
        selected,
        default_app_configured,
        redirect_url: redirect_url.as_deref(),
        event_url: event_url.as_deref(),
        account_id: get(vars::PRIVATE_ACCOUNT_ID),
        client_id: get(vars::PRIVATE_CLIENT_ID),
    }
    .render()
    .into_response();
    // Its form's requests must name it (`Origin`, `Referer`): with no referrer at all, a
    // browser without `Sec-Fetch-Site` sends `Origin: null`, which counts as another site.
    // Other sites still get nothing, so its grant stays here.
    page.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    Ok(page)
}

/// `GET` or `POST /zoom/save`: checks the form, then starts OAuth or saves a
/// Server-to-Server app that Zoom accepted.
async fn save(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    form: Result<Form<RawForm>, FormRejection>,
) -> Response {
    if form::secrets_in_query(uri.query()) {
        return SetupError::from(FormError(
            "client_secret and secret_token are taken from a POST body only, never from the URL \
             (URLs end up in logs and browser history): send the connection page's form, and \
             change the secrets sent, since they may have been recorded"
                .into(),
        ))
        .into_response();
    }
    let form = match form {
        Ok(Form(raw)) => raw.check(),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return SetupError::TooLarge.into_response();
        }
        Err(_) => Err(FormError(
            "the form cannot be read: send it form-encoded (application/x-www-form-urlencoded)"
                .into(),
        )),
    };
    let form = match form {
        Ok(form) => form,
        Err(e) => return SetupError::from(e).into_response(),
    };
    let target = form.target;
    if let Some(page) = interpose(&state, &headers, &target) {
        return page;
    }
    let from_other_site = sent_by_another_site(&headers, &state.config);
    if let Err(e) = authorize(&state, &target, peer, from_other_site) {
        return e.into_response();
    }
    let result = match form.choice {
        Choice::Default => match state.config.default_app {
            Some(_) => Ok(Redirect::to(&start_path(&target)).into_response()),
            None => Err(SetupError::NoDefaultApp),
        },
        Choice::Private(app) => begin_flow(
            &state,
            &target,
            FlowApp::Private {
                app: app.app,
                secret_token: app.secret_token,
            },
        ),
        Choice::ServerToServer { app, account_id } => {
            save_server_to_server(&state, &target, app, account_id).await
        }
    };
    result.unwrap_or_else(|e| e.page(Some(&target)))
}

/// `GET /oauth/start/zoom?cid=…&origin=…`: the default app's flow.
async fn start(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<RawTarget>, QueryRejection>,
) -> Response {
    let target = match query
        .map_err(|_| FormError("the query cannot be read".into()))
        .and_then(|q| q.0.check())
    {
        Ok(target) => target,
        Err(e) => return SetupError::from(e).into_response(),
    };
    if let Some(page) = interpose(&state, &headers, &target) {
        return page;
    }
    let from_other_site = sent_by_another_site(&headers, &state.config);
    if let Err(e) = authorize(&state, &target, peer, from_other_site) {
        return e.into_response();
    }
    if state.config.default_app.is_none() {
        return SetupError::NoDefaultApp.page(Some(&target));
    }
    begin_flow(&state, &target, FlowApp::Default).unwrap_or_else(|e| e.page(Some(&target)))
}

/// Records a flow and sends the browser to Zoom's authorize URL, with the cookie that binds
/// the flow to this browser.
fn begin_flow(state: &AppState, target: &Target, app: FlowApp) -> Result<Response, SetupError> {
    if state.config.oauth_redirect_uri().is_none() {
        return Err(SetupError::NoPublicAddress);
    }
    let credentials = credentials(state, &app)?;
    let pkce = Pkce::new();
    let started = state.flows.start(Flow {
        target: target.clone(),
        app,
        verifier: pkce.verifier,
    })?;
    let url = state
        .zoom_oauth
        .authorize_url(&credentials, &started.state, pkce.challenge)?;
    let cookie = state.flows.set_cookie(
        &started.cookie_name,
        &started.cookie_value,
        state.config.oauth_state_ttl.as_secs(),
    );
    let mut response = Redirect::to(&url).into_response();
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The client credentials a flow uses.
fn credentials(state: &AppState, app: &FlowApp) -> Result<OAuthApp, SetupError> {
    match app {
        FlowApp::Default => state
            .config
            .default_app
            .clone()
            .ok_or(SetupError::NoDefaultApp),
        FlowApp::Private { app, .. } => Ok(app.clone()),
    }
}

/// What Zoom sends the browser back with. `Debug` hides the code and the state.
#[derive(Default, Deserialize)]
struct RedirectQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

impl std::fmt::Debug for RedirectQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::secret::{Raw, presence};
        f.debug_struct("RedirectQuery")
            .field("code", &Raw(presence(&self.code)))
            .field("state", &Raw(presence(&self.state)))
            .field("error", &self.error)
            .field("error_description", &self.error_description)
            .finish()
    }
}

/// `GET /oauth/redirect/zoom`: checks `state`, exchanges the code, learns who authorized,
/// and saves the connection.
async fn redirect(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<RedirectQuery>, QueryRejection>,
) -> Response {
    let query = query.map(|q| q.0).unwrap_or_default();
    let oauth_state = query.state.as_deref().unwrap_or_default();
    let cookies = headers.get(header::COOKIE).and_then(|c| c.to_str().ok());
    // The flow ends here whatever follows (a denial included): its state must not be usable
    // later.
    let finished = state.flows.finish(oauth_state, cookies);
    // The way back to the connection page. The setup link's grant goes only to the browser
    // that started the flow: a state seen elsewhere must not open the page.
    // Without a grant, under signed links, that page would only answer 403: no link then
    // (the page says to open the connection again from the workflow platform).
    let signed = state.config.setup_access == crate::config::SetupAccess::Signed;
    let back = match &finished {
        Ok(finished) => Some(finished.flow.target.clone()),
        Err(_) if signed => None,
        Err(_) => state.flows.peek(oauth_state).map(|(cid, origin)| Target {
            cid,
            origin,
            grant: None,
        }),
    };
    // Only the cookie of the flow this browser just finished: any site can send a browser
    // here with a made-up or foreign state, and other flows in its other tabs must go on.
    let cookie_name = finished.as_ref().ok().map(|f| f.cookie_name.clone());

    let mut response = match (query.error.as_deref(), finished) {
        (Some("access_denied"), _) => {
            SetupError::Denied("access was denied in Zoom".into()).page(back.as_ref())
        }
        // Zoom's words are shown only for this browser's own flow: anyone can link here with
        // `error_description=` of their choosing, to put it on our page under our name.
        (Some(error), Ok(_)) => {
            let reason = match query.error_description.as_deref() {
                Some(description) if !description.trim().is_empty() => {
                    format!("{error}: {description}")
                }
                _ => error.to_string(),
            };
            let reason = crate::ids::truncate(&reason.replace(|c: char| c.is_control(), " "), 200);
            SetupError::Denied(reason).page(back.as_ref())
        }
        (_, Err(e)) => SetupError::from(e).page(back.as_ref()),
        (None, Ok(finished)) => complete_flow(&state, finished.flow, query.code.as_deref())
            .await
            .unwrap_or_else(|e| e.page(back.as_ref())),
    };
    if let Some(name) = cookie_name {
        let expired = state.flows.set_cookie(&name, "", 0);
        if let Ok(expired) = HeaderValue::from_str(&expired) {
            response.headers_mut().append(header::SET_COOKIE, expired);
        }
    }
    response
}

/// The rest of a flow Zoom authorized: exchanges `code`, learns who authorized, and saves
/// the connection.
async fn complete_flow(
    state: &AppState,
    flow: Flow,
    code: Option<&str>,
) -> Result<Response, SetupError> {
    let code = code
        .filter(|c| !c.is_empty() && c.len() <= 2048)
        .ok_or_else(|| FormError("Zoom sent no authorization code".into()))?;
    let credentials = credentials(state, &flow.app)?;
    let token = state
        .zoom_oauth
        .exchange_code(&credentials, code, &flow.verifier)
        .await
        .map_err(|e| match (e, &flow.app) {
            (
                ZoomError::Rejected {
                    status: 401,
                    reason,
                },
                FlowApp::Default,
            ) => SetupError::DefaultAppRefused(reason),
            (e, _) => e.into(),
        })?;
    let user = state.zoom_api.me(&token.access_token).await?;
    let (auth_type, private) = match flow.app {
        FlowApp::Default => (AuthType::OAuthDefault, None),
        FlowApp::Private { app, secret_token } => (
            AuthType::OAuthPrivate,
            Some(PrivateApp { app, secret_token }),
        ),
    };
    let mut vars = oauth_vars(auth_type, private.as_ref(), &token, &user);
    if private.is_none() {
        // Only this app can refresh the tokens: should the operator configure another one,
        // the connection is told apart instead of its refresh token being spent on it.
        vars.push(Var::plain(vars::OAUTH_CLIENT_ID, &credentials.client_id));
    }
    save_connection(state, &flow.target.cid, vars).await?;
    tracing::info!(connection_id = %flow.target.cid, %auth_type, "connection set up");
    Ok(finish(
        state,
        &flow.target,
        &format!("Connected to Zoom as {}.", user.describe()),
    ))
}

/// Checks a Server-to-Server app with Zoom (an `account_credentials` token) and saves it
/// only if Zoom accepts.
async fn save_server_to_server(
    state: &AppState,
    target: &Target,
    app: PrivateApp,
    account_id: String,
) -> Result<Response, SetupError> {
    state
        .zoom_oauth
        .account_credentials(&app.app, &account_id)
        .await?;
    let mut vars = private_vars(AuthType::ServerToServer, &app);
    vars.push(Var::plain(vars::PRIVATE_ACCOUNT_ID, &account_id));
    vars.push(Var::plain(vars::ACCOUNT_ID, &account_id));
    save_connection(state, &target.cid, vars).await?;
    tracing::info!(connection_id = %target.cid, auth_type = %AuthType::ServerToServer, "connection set up");
    Ok(finish(
        state,
        target,
        &format!("Connected to Zoom account {account_id} with your Server-to-Server app."),
    ))
}

/// `auth_type` and a private app's fields.
fn private_vars(auth_type: AuthType, app: &PrivateApp) -> Vec<Var> {
    let mut vars = vec![
        Var::plain(vars::AUTH_TYPE, auth_type.as_str()),
        Var::plain(vars::PRIVATE_CLIENT_ID, &app.app.client_id),
        Var::secret(vars::PRIVATE_CLIENT_SECRET, app.app.client_secret.expose()),
    ];
    if let Some(token) = &app.secret_token {
        vars.push(Var::secret(vars::PRIVATE_SECRET_TOKEN, token.expose()));
    }
    vars
}

/// Every variable of a connection set up with OAuth.
fn oauth_vars(
    auth_type: AuthType,
    private: Option<&PrivateApp>,
    token: &Token,
    user: &ZoomUser,
) -> Vec<Var> {
    let mut vars = match private {
        Some(app) => private_vars(auth_type, app),
        None => vec![Var::plain(vars::AUTH_TYPE, auth_type.as_str())],
    };
    vars.extend(token_vars(token));
    vars.push(Var::plain(vars::ACCOUNT_ID, &user.account_id));
    vars.push(Var::plain(vars::USER_ID, &user.id));
    vars.push(Var::plain(vars::USER_NAME, user.describe()));
    vars
}

/// The token variables of `token`.
pub fn token_vars(token: &Token) -> Vec<Var> {
    let mut vars = vec![
        Var::secret(vars::OAUTH_ACCESS_TOKEN, token.access_token.expose()),
        Var::plain(
            vars::OAUTH_EXPIRY,
            token
                .expires_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ),
        Var::plain(vars::OAUTH_TOKEN_TYPE, &token.token_type),
    ];
    if let Some(refresh) = &token.refresh_token {
        vars.push(Var::secret(vars::OAUTH_REFRESH_TOKEN, refresh.expose()));
    }
    vars
}

/// Replaces every variable connection setup manages with `vars`, in one change. A private
/// app set up again without its secret token (the field is never shown filled in) keeps the
/// one saved for the same app (same client id), if it still decrypts; another app's, or one
/// that does not decrypt (setting the connection up again is what its error says to do), is
/// removed.
async fn save_connection(
    state: &AppState,
    cid: &crate::ids::ConnectionId,
    vars: Vec<Var>,
) -> Result<(), SetupError> {
    let given = |name: &str| {
        vars.iter()
            .find(|v| v.name == name)
            .map(|v| v.value.as_str())
    };
    let same_app_keeps_its_token = match given(vars::PRIVATE_CLIENT_ID) {
        Some(client_id) if given(vars::PRIVATE_SECRET_TOKEN).is_none() => {
            Some(client_id.to_owned())
        }
        _ => None,
    };
    let (host, id) = (state.host.clone(), cid.clone());
    let saved = state
        .credentials
        .set_up_again(cid, async move {
            let mut keep = None;
            if let Some(client_id) = same_app_keeps_its_token {
                let names = [vars::PRIVATE_CLIENT_ID.to_string()];
                let stored = host.get_vars(&id, &names).await?;
                if crate::connection::value_of(&stored, vars::PRIVATE_CLIENT_ID)
                    == Some(client_id.as_str())
                {
                    let token = [vars::PRIVATE_SECRET_TOKEN.to_string()];
                    match host.get_vars(&id, &token).await {
                        Ok(_) => keep = Some(vars::PRIVATE_SECRET_TOKEN),
                        Err(HostError::Undecryptable { .. }) => {
                            tracing::warn!(connection_id = %id, "the stored webhook secret token does not decrypt; it is removed (enter it again to route webhooks)");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            let remove: Vec<String> = vars::MANAGED
                .iter()
                .filter(|name| !vars.iter().any(|v| v.name == **name) && keep != Some(**name))
                .map(|name| name.to_string())
                .collect();
            host.replace_vars(&id, vars, &remove).await
        })
        .await;
    // Also after a failure: a remote host's save may have landed in part (its set before
    // its delete), and webhooks must be routed by what is stored now.
    state.connection_changed(cid).await;
    saved?;
    Ok(())
}

/// The end of a successful setup: back where the host asked (`origin`), or our own page.
fn finish(state: &AppState, target: &Target, message: &str) -> Response {
    let cid = target.cid.as_str();
    let url = match (target.origin.as_str(), &state.config.host_ui_url) {
        ("vscode", _) => Some(format!("vscode://autokitteh.autokitteh?cid={cid}")),
        ("web", Some(ui)) => Some(ui.join(&format!("/connections/{cid}/success"))),
        ("dash", Some(ui)) => Some(ui.join(&format!(
            "/internal/dashboard/connections/{cid}?msg=Success"
        ))),
        _ => None,
    };
    match url {
        Some(url) => Redirect::to(&url).into_response(),
        None => {
            message_page(StatusCode::OK, "Zoom connected", message, Some(target)).into_response()
        }
    }
}

/// `/oauth/start/zoom?cid=…&origin=…&grant=…`; all three are checked to be letters, digits,
/// `_` or `.`.
/// A request another site's page sent does not start a flow or save a setup on the strength
/// of a grant (or, with signed links, at all): it is sent to the connection page, which names
/// the connection, and only that page's own form goes on. A grant is a bearer token; without
/// this, whoever holds one could link someone else's browser to its flow and bind their Zoom
/// account to the grant's connection (Zoom skips consent for an app the user already added).
/// With `SETUP_ACCESS=loopback`, such a request without a grant is refused ([`authorize`]).
fn interpose(state: &AppState, headers: &HeaderMap, target: &Target) -> Option<Response> {
    let signed = state.config.setup_access == crate::config::SetupAccess::Signed;
    ((signed || target.grant.is_some()) && from_another_sites_page(headers, &state.config, true))
        .then(|| {
            let mut response = Redirect::to(&target_path(CONNECTION_PATH, target)).into_response();
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        })
}

fn start_path(target: &Target) -> String {
    target_path(START_PATH, target)
}

/// `path` with the target's query.
fn target_path(path: &str, target: &Target) -> String {
    let mut path = format!("{path}?cid={}&origin={}", target.cid, target.origin);
    if let Some(grant) = &target.grant {
        path.push_str(&format!("&grant={grant}"));
    }
    path
}

/// Refuses requests the operator did not send here (see [`links`]).
fn authorize(
    state: &AppState,
    target: &Target,
    peer: SocketAddr,
    from_other_site: bool,
) -> Result<(), SetupError> {
    state
        .links
        .check(
            &target.cid,
            &target.origin,
            target.grant.as_deref(),
            Some(peer),
            from_other_site,
        )
        .map_err(SetupError::Forbidden)
}

/// Whether a browser says another site's page sent this request: `Sec-Fetch-Site` is
/// `cross-site` (or a value we do not know), or, from a browser without it, `Origin` names
/// another origin. `HOST_UI_URL`, this service's public address and a page under the very
/// name and port the request was sent to count as ours, and with `SETUP_ACCESS=loopback` pages
/// on this machine (`localhost`, loopback addresses) too; a request with neither header (curl,
/// scripts) is not a browser's.
///
/// A request whose `Host` is neither a name of this machine nor `WEBHOOK_ADDRESS`'s also
/// counts as another site's: DNS rebinding (another site's name pointed at 127.0.0.1) makes a
/// browser call that site's requests same-origin.
fn sent_by_another_site(headers: &HeaderMap, config: &crate::config::Config) -> bool {
    for_another_sites_name(headers, config) || from_another_sites_page(headers, config, false)
}

/// Whether the browser says another site's page sent this request (see
/// [`sent_by_another_site`]), whatever the `Host`: a proxy in front may rewrite that.
///
/// `strict` (for what a grant lets in) also counts as another site's a request the browser
/// calls `same-site` (a sibling subdomain's page) or `none` (a link opened from outside any
/// page: an e-mail, a chat app), unless it names a page of ours; and, from a browser without
/// `Sec-Fetch-Site` (Safari before 16.4, old webviews), a page load that names no page at all
/// (a link from a page that sends no referrer, or from outside any page). Scripts and curl
/// still pass: they load no pages.
fn from_another_sites_page(
    headers: &HeaderMap,
    config: &crate::config::Config,
    strict: bool,
) -> bool {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    // A navigation carries no `Origin`; its `Referer` names the page (at least its origin,
    // unless the page asked for no referrer, and then it is not trusted).
    let claimed = text(header::ORIGIN).or_else(|| text(header::REFERER));
    let same_origin =
        |a: &str, url: &url::Url| url::Url::parse(a).is_ok_and(|a| a.origin() == url.origin());
    // A page elsewhere on this machine (a dev server, another local app) is another site's
    // unless the operator trusts the whole machine: signed links are for services reached
    // from other machines, whose users' own localhost pages are none of ours.
    let trust_local = config.setup_access == crate::config::SetupAccess::Loopback;
    // For browsers without `Sec-Fetch-Site`, which tell a same-origin request only by its
    // `Origin`: a page served under the very name and port this request was sent to is ours,
    // unless that name is another site's (DNS rebinding). Browsers with it say so themselves,
    // and a proxy may have rewritten `Host`.
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let own_origin = |url: &url::Url| {
        let authority = match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_string(),
            (None, _) => return false,
        };
        host.is_some_and(|h| h.eq_ignore_ascii_case(&authority))
            && !for_another_sites_name(headers, config)
    };
    let trusted = |url: &url::Url| {
        (trust_local && is_local(url))
            || config
                .host_ui_url
                .as_ref()
                .is_some_and(|ui| same_origin(ui.as_str(), url))
            // This service's own pages, under its public address.
            || config
                .public_url("/")
                .is_some_and(|public| same_origin(&public, url))
    };
    // `Origin: null` (a sandboxed frame, a file) names no page we trust.
    let claimed_url = claimed.and_then(|c| url::Url::parse(c).ok());
    let trusted_sender = claimed_url.as_ref().is_some_and(trusted);
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        Some("same-origin") => false,
        Some("same-site" | "none") if !strict => false,
        Some(_) => !trusted_sender,
        None if strict && claimed.is_none() => loads_a_page(headers),
        None => {
            claimed.is_some() && !trusted_sender && !claimed_url.is_some_and(|u| own_origin(&u))
        }
    }
}

/// Whether a request looks like a browser loading a page: it asks for HTML, or for an upgrade
/// to HTTPS (which browsers send with every navigation).
fn loads_a_page(headers: &HeaderMap) -> bool {
    headers.contains_key("upgrade-insecure-requests")
        || headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.to_ascii_lowercase().contains("text/html"))
}

/// Whether the request's `Host` is neither a name of this machine nor `WEBHOOK_ADDRESS`'s
/// (a request without one, HTTP/2's, is not).
fn for_another_sites_name(headers: &HeaderMap, config: &crate::config::Config) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let ours = url::Url::parse(&format!("http://{host}/")).is_ok_and(|url| {
        is_local(&url)
            || config.webhook_address.as_deref().is_some_and(|public| {
                url::Url::parse(&format!("http://{public}/"))
                    .is_ok_and(|public| public.host() == url.host())
            })
    });
    !ours
}

/// Whether `url` names this machine: `localhost`, a name under it, or a loopback address.
fn is_local(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(name)) => {
            name.eq_ignore_ascii_case("localhost")
                || name.to_ascii_lowercase().ends_with(".localhost")
        }
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.to_canonical().is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration with the host's UI at `ui.example.com` and this service at
    /// `zoom.example.com`.
    fn config() -> crate::config::Config {
        config_with_access("signed")
    }

    /// [`config`] with `SETUP_ACCESS=access`.
    fn config_with_access(access: &str) -> crate::config::Config {
        crate::config::Config::load([
            (
                "HOST_UI_URL".to_string(),
                "https://ui.example.com".to_string(),
            ),
            (
                "WEBHOOK_ADDRESS".to_string(),
                "zoom.example.com".to_string(),
            ),
            ("SETUP_ACCESS".to_string(), access.to_string()),
        ])
        .unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn sent_by_another_site_with(pairs: &[(&'static str, &str)]) -> bool {
        sent_by_another_site(&headers(pairs), &config())
    }

    #[test]
    fn zooms_redirect_query_prints_neither_code_nor_state() {
        let query = RedirectQuery {
            code: Some("CODE-VALUE".into()),
            state: Some("STATE-VALUE".into()),
            error: Some("access_denied".into()),
            error_description: None,
        };
        let printed = format!("{query:?}");
        assert!(!printed.contains("CODE-VALUE") && !printed.contains("STATE-VALUE"));
        assert!(printed.contains("access_denied"), "{printed}");
    }

    #[test]
    fn only_other_sites_pages_count_as_sent_by_another_site() {
        // Not a browser (curl, scripts): nothing to go by.
        assert!(!sent_by_another_site_with(&[]));
        for ours in ["same-origin", "same-site", "none"] {
            assert!(!sent_by_another_site_with(&[("sec-fetch-site", ours)]));
        }
        assert!(sent_by_another_site_with(&[(
            "sec-fetch-site",
            "cross-site"
        )]));
        assert!(sent_by_another_site_with(&[
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://evil.example")
        ]));
        // The host's UI is ours, whatever the browser calls it.
        assert!(!sent_by_another_site_with(&[
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://ui.example.com")
        ]));
        // Pages elsewhere on this machine are ours only when the machine is trusted.
        let loopback = config_with_access("loopback");
        for local in [
            "http://localhost:3000",
            "http://127.0.0.1:8080",
            "http://[::1]:8080",
        ] {
            let sent = headers(&[("sec-fetch-site", "cross-site"), ("origin", local)]);
            assert!(sent_by_another_site(&sent, &config()), "{local}");
            assert!(!sent_by_another_site(&sent, &loopback), "{local}");
        }
        // A navigation names its page in Referer only.
        assert!(!sent_by_another_site_with(&[
            ("sec-fetch-site", "cross-site"),
            ("referer", "https://ui.example.com/connections/x")
        ]));
        assert!(sent_by_another_site_with(&[
            ("sec-fetch-site", "cross-site"),
            ("referer", "https://ui.example.com.evil.example/")
        ]));
        // Browsers without Sec-Fetch-Site: Origin decides; `null` is nobody we trust.
        assert!(sent_by_another_site_with(&[(
            "origin",
            "https://evil.example"
        )]));
        assert!(sent_by_another_site_with(&[("origin", "null")]));
        assert!(!sent_by_another_site_with(&[(
            "origin",
            "https://zoom.example.com"
        )]));
        // Opened at this machine's own address, a page's form names that same origin.
        assert!(!sent_by_another_site_with(&[
            ("origin", "http://localhost:9980"),
            ("host", "localhost:9980")
        ]));
        assert!(sent_by_another_site_with(&[
            ("origin", "http://localhost:3000"),
            ("host", "localhost:9980")
        ]));
        // Not under another site's name pointed at this machine, whatever else is checked.
        let rebound = headers(&[
            ("origin", "http://evil.example:9980"),
            ("host", "evil.example:9980"),
        ]);
        assert!(sent_by_another_site(&rebound, &config()));
        assert!(from_another_sites_page(&rebound, &config(), true));
        // A browser that says cross-site is believed, whatever names match.
        assert!(sent_by_another_site_with(&[
            ("sec-fetch-site", "cross-site"),
            ("origin", "http://localhost:9980"),
            ("host", "localhost:9980")
        ]));
    }

    #[test]
    fn this_services_public_pages_are_ours_and_a_grant_needs_a_page_of_ours_or_a_same_origin_request()
     {
        let config = config();
        let check = |pairs: &[(&'static str, &str)], strict: bool| {
            from_another_sites_page(&headers(pairs), &config, strict)
        };
        // A browser without Sec-Fetch-Site posting the page's own form, at the public address.
        for strict in [false, true] {
            assert!(!check(&[("origin", "https://zoom.example.com")], strict));
            assert!(check(
                &[("origin", "https://zoom.example.com.evil")],
                strict
            ));
            assert!(!check(&[("sec-fetch-site", "same-origin")], strict));
        }
        // A browser without Sec-Fetch-Site loading a page that names no page of ours (a link
        // with rel=noreferrer, or from an e-mail) is let in by the loopback check only; a
        // script asking for no page is let in by both.
        for navigation in [
            &[("upgrade-insecure-requests", "1")][..],
            &[("accept", "text/html,application/xhtml+xml,*/*;q=0.8")][..],
        ] {
            assert!(!check(navigation, false), "{navigation:?}");
            assert!(check(navigation, true), "{navigation:?}");
            let mut from_ours = navigation.to_vec();
            from_ours.push(("referer", "https://zoom.example.com/zoom/connection?cid=x"));
            assert!(!check(&from_ours, true), "{navigation:?}");
        }
        for strict in [false, true] {
            assert!(!check(&[], strict));
            assert!(!check(&[("accept", "*/*")], strict));
        }
        // A link opened from an e-mail (`none`) or a sibling subdomain's page (`same-site`)
        // passes the loopback check, but not a grant's.
        for site in ["none", "same-site"] {
            assert!(!check(&[("sec-fetch-site", site)], false), "{site}");
            assert!(check(&[("sec-fetch-site", site)], true), "{site}");
            assert!(
                !check(
                    &[
                        ("sec-fetch-site", site),
                        ("referer", "https://ui.example.com/x")
                    ],
                    true
                ),
                "{site}"
            );
        }
    }

    #[test]
    fn a_request_for_another_sites_name_counts_as_sent_by_another_site() {
        for ours in [
            "localhost:9980",
            "app.localhost",
            "127.0.0.1:9980",
            "[::1]:9980",
            "zoom.example.com",
            "ZOOM.example.com:443",
        ] {
            assert!(
                !sent_by_another_site_with(&[("host", ours), ("sec-fetch-site", "same-origin")]),
                "{ours}"
            );
        }
        // DNS rebinding: the browser calls it same-origin, but the name is another site's.
        for theirs in [
            "evil.example:9980",
            "localhost.evil.example",
            "zoom.example.com.evil",
        ] {
            assert!(
                sent_by_another_site_with(&[("host", theirs), ("sec-fetch-site", "same-origin")]),
                "{theirs}"
            );
        }
    }
}
