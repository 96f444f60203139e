//! Connection setup end to end: the connection page, the default, private and
//! Server-to-Server flows against a fake Zoom, and every way a flow can fail, each leaving
//! the stored connection exactly as it was.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use zoom_integration::connection::StatusCode as ConnStatus;
use zoom_integration::ids::ConnectionId;
use zoom_integration::proto::autokitteh::vars::v1 as vars;

use crate::fake_zoom::*;
use crate::helpers::{TestApp, spawn_app_with, var};
use crate::user_agent::{UserAgent, Visit};

/// The service pointed at `zoom`, whose OAuth apps accept its redirect URI.
pub(crate) async fn app_with(zoom: &FakeZoom, env: Vec<(&'static str, String)>) -> TestApp {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app_with(&env).await;
    zoom.register_redirect_uri(app.url("/oauth/redirect/zoom"));
    app
}

/// The service set up for `zoom`, with `host` as its remote host engine.
pub(crate) async fn app_with_remote_host(
    zoom: &FakeZoom,
    host: &crate::fake_host::FakeHost,
) -> TestApp {
    let mut env = zoom.env();
    env.push(("HOST_ENGINE_URL", host.url()));
    app_with(zoom, env).await
}

async fn app_and_zoom() -> (TestApp, FakeZoom, UserAgent) {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let agent = UserAgent::new(&app.url(""));
    (app, zoom, agent)
}

/// Every stored variable of `cid`: (name, value, is_secret), sorted.
pub(crate) async fn snapshot(app: &TestApp, cid: &str) -> Vec<(String, String, bool)> {
    let mut all: Vec<_> = app
        .stored_vars(cid, &[])
        .await
        .into_iter()
        .map(|v| (v.name, v.value, v.is_secret))
        .collect();
    all.sort();
    all
}

pub(crate) fn value_of(snapshot: &[(String, String, bool)], name: &str) -> Option<(String, bool)> {
    snapshot
        .iter()
        .find(|(n, _, _)| n == name)
        .map(|(_, v, s)| (v.clone(), *s))
}

/// A connection already set up (with a private Server-to-Server app), so that failures
/// have something to leave alone.
pub(crate) async fn existing_connection(app: &TestApp) -> String {
    let cid = ConnectionId::generate().to_string();
    app.vars()
        .set(vars::SetRequest {
            vars: vec![
                var(&cid, "auth_type", "serverToServer", false),
                var(&cid, "private_account_id", "existingAccount", false),
                var(&cid, "private_client_id", "existingClient", false),
                var(&cid, "private_client_secret", "existing-secret", true),
                var(&cid, "account_id", "existingAccount", false),
            ],
        })
        .await
        .unwrap();
    cid
}

fn page_url(app: &TestApp, cid: &str) -> String {
    app.url(&format!("/zoom/?cid={cid}&origin=test"))
}

pub(crate) async fn submit(app: &TestApp, agent: &UserAgent, form: &[(&str, &str)]) -> Visit {
    agent.post_form(&app.url("/zoom/save"), form).await
}

/// Presses Allow (or Deny) on the fake Zoom's consent page and follows the way back.
pub(crate) async fn consent(agent: &UserAgent, page: &Visit, allow: bool) -> Visit {
    assert_eq!(page.status, StatusCode::OK, "consent page: {}", page.body);
    let link = page.link(if allow { "allow" } else { "deny" });
    agent.get(link.as_str()).await
}

fn assert_error_page(visit: &Visit, status: StatusCode, words: &str) {
    assert_eq!(visit.status, status, "{}", visit.body);
    assert!(
        visit.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"),
        "an error page, not bare text"
    );
    let message = visit.text_of("message");
    assert!(
        message.contains(words),
        "expected {words:?} in the message {message:?}"
    );
}

#[tokio::test]
async fn the_default_app_flow_saves_the_token_and_the_zoom_user() {
    let (app, zoom, agent) = app_and_zoom().await;
    let cid = ConnectionId::generate().to_string();

    let page = agent.get(&page_url(&app, &cid)).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.text_of("status"), "Not set up yet.");
    // The page names the connection it sets up, and what a private app needs in Zoom.
    assert!(
        page.body
            .contains(&format!("Connection <code>{cid}</code>")),
        "{}",
        page.body
    );
    for url in ["/oauth/redirect/zoom", "/zoom/event"] {
        assert!(
            page.body
                .contains(&format!("<code>{}</code>", app.url(url))),
            "{url}: {}",
            page.body
        );
    }

    let consent_page = submit(
        &app,
        &agent,
        &[
            ("cid", &cid),
            ("origin", "test"),
            ("auth_type", "oauthDefault"),
        ],
    )
    .await;
    assert_eq!(consent_page.url.path(), "/oauth/authorize");
    assert!(
        consent_page
            .hops
            .iter()
            .any(|u| u.path() == "/oauth/start/zoom"),
        "the default app goes through /oauth/start/zoom"
    );
    let done = consent(&agent, &consent_page, true).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert_eq!(
        done.text_of("message"),
        format!("Connected to Zoom as {USER_DISPLAY_NAME} &lt;{USER_EMAIL}&gt;.")
    );

    let stored = snapshot(&app, &cid).await;
    assert_eq!(
        value_of(&stored, "auth_type"),
        Some(("oauthDefault".into(), false))
    );
    assert_eq!(
        value_of(&stored, "account_id"),
        Some((USER_ACCOUNT_ID.into(), false))
    );
    assert_eq!(value_of(&stored, "user_id"), Some((USER_ID.into(), false)));
    let (access, secret) = value_of(&stored, "oauth_access_token").unwrap();
    assert!(access.starts_with("access-") && secret);
    let (refresh, secret) = value_of(&stored, "oauth_refresh_token").unwrap();
    assert!(refresh.starts_with("refresh-") && secret);
    assert_eq!(
        value_of(&stored, "oauth_token_type"),
        Some(("bearer".into(), false))
    );
    let (expiry, _) = value_of(&stored, "oauth_expiry").unwrap();
    let expiry = seconds_from_now(&expiry);
    assert!(
        (3500..=3600).contains(&expiry),
        "expiry {expiry} s from now"
    );
    assert!(value_of(&stored, "private_client_secret").is_none());
    assert_eq!(
        value_of(&stored, "oauth_client_id"),
        Some((DEFAULT_CLIENT_ID.into(), false)),
        "the app that issued the tokens"
    );

    let requests = zoom.token_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].grant_type, "authorization_code");
    assert_eq!(requests[0].client_id.as_deref(), Some(DEFAULT_CLIENT_ID));

    let status = app.connection_status(&cid).await.unwrap();
    assert_eq!(status.code(), ConnStatus::Ok);
    let page = agent.get(&page_url(&app, &cid)).await;
    assert_eq!(
        page.text_of("status"),
        format!(
            "Connected as {USER_DISPLAY_NAME} &lt;{USER_EMAIL}&gt; with the default OAuth app."
        )
    );
}

/// Seconds from now until an RFC 3339 time.
fn seconds_from_now(rfc3339: &str) -> i64 {
    let at = chrono::DateTime::parse_from_rfc3339(rfc3339).expect("RFC 3339");
    assert!(rfc3339.ends_with('Z'), "in UTC: {rfc3339}");
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds()
}

#[tokio::test]
async fn a_private_app_flow_uses_its_credentials_and_saves_them_only_when_it_succeeds() {
    let (app, zoom, agent) = app_and_zoom().await;
    let cid = existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;

    let consent_page = submit(
        &app,
        &agent,
        &[
            ("cid", &cid),
            ("origin", "test"),
            ("auth_type", "oauthPrivate"),
            ("client_id", PRIVATE_CLIENT_ID),
            ("client_secret", PRIVATE_CLIENT_SECRET),
            ("secret_token", "private-webhook-token"),
        ],
    )
    .await;
    let authorize = consent_page.authorize_url();
    let query: std::collections::HashMap<_, _> = authorize.query_pairs().collect();
    assert_eq!(query["client_id"], PRIVATE_CLIENT_ID);
    assert!(
        !authorize.as_str().contains(PRIVATE_CLIENT_SECRET),
        "no secret in the URL"
    );
    // Pending: nothing stored yet.
    assert_eq!(snapshot(&app, &cid).await, before);

    let done = consent(&agent, &consent_page, true).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    let stored = snapshot(&app, &cid).await;
    assert_eq!(
        value_of(&stored, "auth_type"),
        Some(("oauthPrivate".into(), false))
    );
    assert_eq!(
        value_of(&stored, "private_client_id"),
        Some((PRIVATE_CLIENT_ID.into(), false))
    );
    assert_eq!(
        value_of(&stored, "private_client_secret"),
        Some((PRIVATE_CLIENT_SECRET.into(), true))
    );
    assert_eq!(
        value_of(&stored, "private_secret_token"),
        Some(("private-webhook-token".into(), true))
    );
    assert_eq!(
        value_of(&stored, "account_id"),
        Some((USER_ACCOUNT_ID.into(), false))
    );
    assert!(value_of(&stored, "oauth_refresh_token").is_some());
    // Nothing of the Server-to-Server setup it replaced is left.
    assert!(value_of(&stored, "private_account_id").is_none());
    let requests = zoom.token_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].client_id.as_deref(), Some(PRIVATE_CLIENT_ID));
    assert_eq!(requests[0].outcome, StatusCode::OK);
}

#[tokio::test]
async fn a_server_to_server_app_is_saved_once_zoom_issues_it_a_token() {
    let (app, zoom, agent) = app_and_zoom().await;
    let cid = ConnectionId::generate().to_string();
    let done = submit(
        &app,
        &agent,
        &[
            ("cid", &cid),
            ("origin", "test"),
            ("auth_type", "serverToServer"),
            ("account_id", S2S_ACCOUNT_ID),
            ("client_id", S2S_CLIENT_ID),
            ("client_secret", S2S_CLIENT_SECRET),
        ],
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert_eq!(
        done.text_of("message"),
        format!("Connected to Zoom account {S2S_ACCOUNT_ID} with your Server-to-Server app.")
    );
    let stored = snapshot(&app, &cid).await;
    let names: Vec<&str> = stored.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "account_id",
            "auth_type",
            "private_account_id",
            "private_client_id",
            "private_client_secret"
        ]
    );
    assert_eq!(
        value_of(&stored, "auth_type"),
        Some(("serverToServer".into(), false))
    );
    assert_eq!(
        value_of(&stored, "account_id"),
        Some((S2S_ACCOUNT_ID.into(), false))
    );
    assert_eq!(
        value_of(&stored, "private_client_secret"),
        Some((S2S_CLIENT_SECRET.into(), true))
    );
    let requests = zoom.token_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].grant_type, "account_credentials");
    assert_eq!(
        app.connection_status(&cid).await.unwrap().code(),
        ConnStatus::Ok
    );
}

#[tokio::test]
async fn the_authorize_url_carries_pkce_the_redirect_uri_and_a_signed_single_connection_state() {
    let (app, _zoom, agent) = app_and_zoom().await;
    let cid = ConnectionId::generate().to_string();
    let start = agent
        .get(&app.url(&format!("/oauth/start/zoom?cid={cid}&origin=web")))
        .await;
    let authorize = start.authorize_url();
    assert!(
        authorize
            .as_str()
            .starts_with(&format!("{}/oauth/authorize?", _zoom.oauth_url()))
    );
    let query: std::collections::HashMap<_, _> = authorize.query_pairs().collect();
    assert_eq!(query["response_type"], "code");
    assert_eq!(query["client_id"], DEFAULT_CLIENT_ID);
    assert_eq!(query["redirect_uri"], app.url("/oauth/redirect/zoom"));
    assert_eq!(query["code_challenge_method"], "S256");
    assert_eq!(query["code_challenge"].len(), 43);
    let state = &query["state"];
    assert!(state.contains(&cid), "bound to the connection");
    assert!(state.contains(".web."), "bound to the origin");
    let cookies = agent.cookie_names();
    assert_eq!(
        cookies.len(),
        1,
        "the flow is bound to this browser: {cookies:?}"
    );
    assert!(cookies[0].starts_with("zoom_oauth_"));
}

#[tokio::test]
async fn over_https_the_flow_cookie_is_host_only_and_secure() {
    let zoom = FakeZoom::start().await;
    let mut env = zoom.env();
    env.push(("WEBHOOK_SCHEME", "https".into()));
    let app = app_with(&zoom, env).await;
    let client = crate::helpers::http_client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let cid = ConnectionId::generate();
    let started = client
        .get(app.url(&format!("/oauth/start/zoom?cid={cid}&origin=test")))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::SEE_OTHER);
    let cookie = started.headers()["set-cookie"].to_str().unwrap();
    // `__Host-`: only this host, over https, can set it (no sibling subdomain, no plain-http
    // answer), which browsers allow only with `Path=/` and `Secure`.
    assert!(cookie.starts_with("__Host-zoom_oauth_"), "{cookie}");
    assert!(cookie.contains("; Path=/;"), "{cookie}");
    assert!(cookie.contains("; Secure"), "{cookie}");
}

#[tokio::test]
async fn denying_consent_shows_zoom_error_and_saves_nothing() {
    let (app, _zoom, agent) = app_and_zoom().await;
    let cid = existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;
    let consent_page = submit(
        &app,
        &agent,
        &[
            ("cid", &cid),
            ("origin", "test"),
            ("auth_type", "oauthDefault"),
        ],
    )
    .await;
    let done = consent(&agent, &consent_page, false).await;
    assert_error_page(&done, StatusCode::BAD_REQUEST, "access was denied in Zoom");
    assert!(done.body.contains("id=\"back\""), "offers the way back");
    assert_eq!(snapshot(&app, &cid).await, before);
    // The denied flow's state cannot be used afterwards either.
    let state = done
        .url
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1;
    let replay = agent
        .get(&app.url(&format!("/oauth/redirect/zoom?code=x&state={state}")))
        .await;
    assert_eq!(replay.status, StatusCode::BAD_REQUEST);
    assert_eq!(snapshot(&app, &cid).await, before);
}

/// Runs the default flow up to the point where Zoom sends the browser back, without
/// following that last redirect; returns the redirect URL.
pub(crate) async fn redirect_back_url(app: &TestApp, agent: &UserAgent, cid: &str) -> url::Url {
    let consent_page = submit(
        app,
        agent,
        &[
            ("cid", cid),
            ("origin", "test"),
            ("auth_type", "oauthDefault"),
        ],
    )
    .await;
    let allow = consent_page.link("allow");
    let response = crate::helpers::http_client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(allow)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    url::Url::parse(response.headers()["location"].to_str().unwrap()).unwrap()
}

#[tokio::test]
async fn a_forged_state_is_refused_and_saves_nothing() {
    let (app, zoom, agent) = app_and_zoom().await;
    let cid = existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;
    let back = redirect_back_url(&app, &agent, &cid).await;
    let pairs: std::collections::HashMap<_, _> = back.query_pairs().into_owned().collect();
    let state = &pairs["state"];
    let code = &pairs["code"];
    // The same state moved to another connection, or a made-up one.
    let other = ConnectionId::generate().to_string();
    for forged in [
        state.replace(&cid, &other),
        format!(
            "v1.{}.9999999999.{cid}.test.{}",
            "0".repeat(32),
            "0".repeat(64)
        ),
        cid.clone(),
        String::new(),
    ] {
        let mut url = back.clone();
        url.query_pairs_mut()
            .clear()
            .append_pair("code", code)
            .append_pair("state", &forged);
        let visit = agent.get(url.as_str()).await;
        assert_error_page(&visit, StatusCode::BAD_REQUEST, "not valid");
    }
    assert_eq!(snapshot(&app, &cid).await, before);
    assert_eq!(snapshot(&app, &other).await, vec![]);
    assert!(zoom.token_requests().is_empty(), "no code exchanged");
}

#[tokio::test]
async fn an_expired_state_is_refused_and_saves_nothing() {
    let zoom = FakeZoom::start().await;
    let mut env = zoom.env();
    env.push(("OAUTH_STATE_TTL", "1".into()));
    let app = app_with(&zoom, env).await;
    let agent = UserAgent::new(&app.url(""));
    let cid = existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;
    let back = redirect_back_url(&app, &agent, &cid).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let visit = agent.get(back.as_str()).await;
    assert_error_page(&visit, StatusCode::BAD_REQUEST, "expired");
    assert_eq!(snapshot(&app, &cid).await, before);
    assert!(zoom.token_requests().is_empty());
}

#[tokio::test]
async fn a_reused_state_is_refused_and_leaves_the_first_result() {
    let (app, zoom, agent) = app_and_zoom().await;
    let cid = ConnectionId::generate().to_string();
    let back = redirect_back_url(&app, &agent, &cid).await;
    let first = agent.get(back.as_str()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let after_first = snapshot(&app, &cid).await;
    assert!(value_of(&after_first, "oauth_access_token").is_some());

    let again = agent.get(back.as_str()).await;
    assert_error_page(&again, StatusCode::BAD_REQUEST, "already completed");
    // Not "not saved": the first visit saved it (a reloaded success page lands here).
    assert!(
        again
            .body
            .contains("<h1>Zoom sign-in already used or no longer known</h1>"),
        "{}",
        again.body
    );
    assert_eq!(snapshot(&app, &cid).await, after_first);
    assert_eq!(
        zoom.token_requests().len(),
        1,
        "the code was not sent twice"
    );
}

#[tokio::test]
async fn a_redirect_in_another_browser_is_refused_and_saves_nothing() {
    let (app, zoom, agent) = app_and_zoom().await;
    let cid = existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;
    let back = redirect_back_url(&app, &agent, &cid).await;
    let victim = UserAgent::new(&app.url(""));
    let visit = victim.get(back.as_str()).await;
    assert_error_page(
        &visit,
        StatusCode::BAD_REQUEST,
        "another browser, or at another address",
    );
    assert_eq!(snapshot(&app, &cid).await, before);
    assert!(zoom.token_requests().is_empty());
}

/// Starts the default app's flow for `cid` in `agent`; returns Zoom's consent page.
async fn start_default_flow(app: &TestApp, agent: &UserAgent, cid: &str) -> Visit {
    submit(
        app,
        agent,
        &[
            ("cid", cid),
            ("origin", "test"),
            ("auth_type", "oauthDefault"),
        ],
    )
    .await
}

#[tokio::test]
async fn two_flows_in_one_browser_both_complete_whichever_ends_first() {
    let (app, _zoom, agent) = app_and_zoom().await;
    let first = ConnectionId::generate().to_string();
    let second = ConnectionId::generate().to_string();
    let first_consent = start_default_flow(&app, &agent, &first).await;
    let second_consent = start_default_flow(&app, &agent, &second).await;
    assert_eq!(agent.cookie_names().len(), 2, "one cookie per flow");

    let done = consent(&agent, &second_consent, true).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert_eq!(
        agent.cookie_names().len(),
        1,
        "only the finished flow's cookie is dropped"
    );
    let done = consent(&agent, &first_consent, true).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert!(agent.cookie_names().is_empty());
    for cid in [&first, &second] {
        assert_eq!(
            value_of(&snapshot(&app, cid).await, "auth_type"),
            Some(("oauthDefault".into(), false)),
            "{cid}"
        );
    }
}

#[tokio::test]
async fn a_stray_redirect_does_not_end_a_flow_in_progress() {
    let (app, _zoom, agent) = app_and_zoom().await;
    let cid = ConnectionId::generate().to_string();
    let consent_page = start_default_flow(&app, &agent, &cid).await;
    // A genuine state, but of a flow another browser started.
    let elsewhere = UserAgent::new(&app.url(""));
    let foreign = redirect_back_url(&app, &elsewhere, &ConnectionId::generate().to_string()).await;
    // What any site can make this browser request.
    for stray in [
        app.url("/oauth/redirect/zoom?state=junk"),
        app.url("/oauth/redirect/zoom?code=x&state=junk"),
        app.url("/oauth/redirect/zoom?error=access_denied&state=junk"),
        app.url("/oauth/redirect/zoom"),
        foreign.to_string(),
    ] {
        let visit = agent.get(&stray).await;
        assert_eq!(
            visit.status,
            StatusCode::BAD_REQUEST,
            "{stray}: {}",
            visit.body
        );
        assert_eq!(
            agent.cookie_names().len(),
            1,
            "{stray} dropped the cookie of the flow in progress"
        );
    }
    let done = consent(&agent, &consent_page, true).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert_eq!(
        value_of(&snapshot(&app, &cid).await, "auth_type"),
        Some(("oauthDefault".into(), false))
    );
}

#[tokio::test]
async fn text_in_a_redirect_that_is_not_this_browsers_flow_is_not_shown() {
    let (app, _zoom, agent) = app_and_zoom().await;
    let elsewhere = UserAgent::new(&app.url(""));
    let foreign = redirect_back_url(&app, &elsewhere, &ConnectionId::generate().to_string()).await;
    let state = foreign
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.to_string())
        .unwrap();
    let planted =
        "error=server_error&error_description=Your+Zoom+account+is+locked%2C+call+555-0100";
    for url in [
        app.url(&format!("/oauth/redirect/zoom?{planted}&state=junk")),
        app.url(&format!("/oauth/redirect/zoom?{planted}")),
        app.url(&format!("/oauth/redirect/zoom?{planted}&state={state}")),
    ] {
        let visit = agent.get(&url).await;
        assert_eq!(visit.status, StatusCode::BAD_REQUEST, "{url}");
        assert!(
            !visit.body.contains("555-0100") && !visit.body.contains("locked"),
            "{url} put its own text on the page: {}",
            visit.body
        );
    }
}

#[tokio::test]
async fn wrong_private_credentials_show_zoom_reason_and_save_nothing() {
    let (app, zoom, agent) = app_and_zoom().await;
    let cid = existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;
    let consent_page = submit(
        &app,
        &agent,
        &[
            ("cid", &cid),
            ("origin", "test"),
            ("auth_type", "oauthPrivate"),
            ("client_id", PRIVATE_CLIENT_ID),
            ("client_secret", "not-the-secret"),
        ],
    )
    .await;
    let done = consent(&agent, &consent_page, true).await;
    assert_error_page(
        &done,
        StatusCode::BAD_REQUEST,
        "Zoom refused: Invalid client_id or client_secret",
    );
    assert!(!done.body.contains("not-the-secret"));
    assert_eq!(snapshot(&app, &cid).await, before);
    assert_eq!(zoom.token_requests()[0].outcome, StatusCode::UNAUTHORIZED);

    // An unknown client id is refused by Zoom's authorize page already.
    let consent_page = submit(
        &app,
        &agent,
        &[
            ("cid", &cid),
            ("auth_type", "oauthPrivate"),
            ("client_id", "unknownClient"),
            ("client_secret", "whatever"),
        ],
    )
    .await;
    assert_eq!(consent_page.status, StatusCode::BAD_REQUEST);
    assert_eq!(snapshot(&app, &cid).await, before);
}

#[tokio::test]
async fn zoom_token_endpoint_down_shows_an_error_and_saves_nothing() {
    let (app, zoom, agent) = app_and_zoom().await;
    let cid = existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;
    let back = redirect_back_url(&app, &agent, &cid).await;
    zoom.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let visit = agent.get(back.as_str()).await;
    assert_error_page(&visit, StatusCode::BAD_GATEWAY, "Zoom is unavailable");
    assert_eq!(snapshot(&app, &cid).await, before);
}

#[tokio::test]
async fn zoom_refusing_the_default_app_s_own_credentials_is_the_server_s_fault_not_the_owner_s() {
    let zoom = FakeZoom::start().await;
    let mut env = zoom.env();
    env.retain(|(name, _)| *name != "ZOOM_CLIENT_SECRET");
    env.push(("ZOOM_CLIENT_SECRET", "not-the-default-app-s-secret".into()));
    let app = app_with(&zoom, env).await;
    let agent = UserAgent::new(&app.url(""));
    let cid = existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;
    let back = redirect_back_url(&app, &agent, &cid).await;
    let visit = agent.get(back.as_str()).await;
    assert_error_page(&visit, StatusCode::BAD_GATEWAY, "ZOOM_CLIENT_SECRET");
    assert!(visit.body.contains("Invalid client_id or client_secret"));
    assert_eq!(snapshot(&app, &cid).await, before);
}

#[tokio::test]
async fn zoom_rate_limiting_the_token_endpoint_asks_to_try_again_and_saves_nothing() {
    let (app, zoom, agent) = app_and_zoom().await;
    let cid = existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;
    zoom.state.lock().unwrap().token_rate_limited = true;
    let form = [
        ("cid", cid.as_str()),
        ("auth_type", "serverToServer"),
        ("account_id", S2S_ACCOUNT_ID),
        ("client_id", S2S_CLIENT_ID),
        ("client_secret", S2S_CLIENT_SECRET),
    ];
    let s2s = submit(&app, &agent, &form).await;
    assert_error_page(
        &s2s,
        StatusCode::SERVICE_UNAVAILABLE,
        "try again in a minute",
    );
    let back = redirect_back_url(&app, &agent, &cid).await;
    let oauth = agent.get(back.as_str()).await;
    assert_error_page(
        &oauth,
        StatusCode::SERVICE_UNAVAILABLE,
        "try again in a minute",
    );
    assert_eq!(snapshot(&app, &cid).await, before);
}

#[tokio::test]
async fn a_connection_the_remote_host_no_longer_knows_gets_not_found() {
    let zoom = FakeZoom::start().await;
    let host = crate::fake_host::FakeHost::start().await;
    let cid = ConnectionId::generate().to_string();
    host.state.lock().unwrap().unknown.push(cid.clone());
    let app = app_with_remote_host(&zoom, &host).await;
    let agent = UserAgent::new(&app.url(""));
    // The page says so at once, rather than offering a setup that cannot be saved.
    let page = agent.get(&page_url(&app, &cid)).await;
    assert_error_page(
        &page,
        StatusCode::NOT_FOUND,
        "does not know this connection",
    );
    let done = submit(
        &app,
        &agent,
        &[
            ("cid", &cid),
            ("auth_type", "serverToServer"),
            ("account_id", S2S_ACCOUNT_ID),
            ("client_id", S2S_CLIENT_ID),
            ("client_secret", S2S_CLIENT_SECRET),
        ],
    )
    .await;
    assert_error_page(
        &done,
        StatusCode::NOT_FOUND,
        "does not know this connection",
    );
}

#[tokio::test]
async fn a_remote_host_briefly_failing_deletes_gets_the_whole_setup_and_one_failing_on_gets_the_new_secret_routed()
 {
    let zoom = FakeZoom::start().await;
    let host = crate::fake_host::FakeHost::start().await;
    let cid = ConnectionId::generate().to_string();
    {
        let mut state = host.state.lock().unwrap();
        for (name, value) in [
            ("auth_type", "oauthDefault"),
            ("connection_error", "reauthorization required"),
        ] {
            let v = var(&cid, name, value, false);
            state.vars.insert((cid.clone(), name.into()), v);
        }
    }
    let app = app_with_remote_host(&zoom, &host).await;
    let agent = UserAgent::new(&app.url(""));
    let setup = async |secret_token: &str| {
        let form = [
            ("cid", cid.as_str()),
            ("auth_type", "serverToServer"),
            ("account_id", S2S_ACCOUNT_ID),
            ("client_id", S2S_CLIENT_ID),
            ("client_secret", S2S_CLIENT_SECRET),
            ("secret_token", secret_token),
        ];
        submit(&app, &agent, &form).await
    };
    let stored = |name: &str| {
        let state = host.state.lock().unwrap();
        state
            .vars
            .get(&(cid.clone(), name.into()))
            .map(|v| v.value.clone())
    };

    host.state.lock().unwrap().fail_deletes = 1;
    let done = setup("token-1").await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    let names: Vec<String> = {
        let state = host.state.lock().unwrap();
        let vars = state.vars.keys().filter(|(scope, _)| *scope == cid);
        vars.map(|(_, name)| name.clone()).collect()
    };
    assert_eq!(
        names,
        [
            "account_id",
            "auth_type",
            "private_account_id",
            "private_client_id",
            "private_client_secret",
            "private_secret_token"
        ],
        "the whole Server-to-Server setup, and the old mark gone"
    );

    host.state.lock().unwrap().fail_deletes = u32::MAX;
    let failed = setup("token-2").await;
    assert_error_page(&failed, StatusCode::SERVICE_UNAVAILABLE, "try again");
    assert_eq!(stored("private_secret_token").as_deref(), Some("token-2"));
    // What landed routes webhooks at once, not only after the next full reload.
    let body = format!(
        r#"{{"event":"meeting.started","payload":{{"account_id":"{S2S_ACCOUNT_ID}","object":{{"id":"1"}}}}}}"#
    );
    let (status, answer) = crate::webhooks::post_to(
        &crate::helpers::http_client(),
        &app.url("/zoom/event"),
        "token-2",
        crate::webhooks::now(),
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let sent = host.wait_for_dispatched(1, Duration::from_secs(30)).await;
    assert_eq!(sent[0].destination_id, cid);
}

#[tokio::test]
async fn zoom_token_endpoint_too_slow_times_out_and_saves_nothing() {
    let zoom = FakeZoom::start().await;
    let mut env = zoom.env();
    env.push(("ZOOM_HTTP_TIMEOUT", "1".into()));
    let app = app_with(&zoom, env).await;
    let agent = UserAgent::new(&app.url(""));
    let cid = existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;
    let back = redirect_back_url(&app, &agent, &cid).await;
    zoom.state.lock().unwrap().token_delay = Duration::from_secs(5);
    let started = Instant::now();
    let visit = agent.get(back.as_str()).await;
    assert_error_page(
        &visit,
        StatusCode::GATEWAY_TIMEOUT,
        "did not answer in time",
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(snapshot(&app, &cid).await, before);
}

/// Sets `cid` up with the fake Zoom's Server-to-Server app and `secret_token` (empty: none
/// given) through the connection page's form, which must succeed.
pub(crate) async fn set_up_server_to_server(
    app: &TestApp,
    agent: &UserAgent,
    cid: &str,
    secret_token: &str,
) {
    let done = submit(
        app,
        agent,
        &[
            ("cid", cid),
            ("auth_type", "serverToServer"),
            ("account_id", S2S_ACCOUNT_ID),
            ("client_id", S2S_CLIENT_ID),
            ("client_secret", S2S_CLIENT_SECRET),
            ("secret_token", secret_token),
        ],
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
}

#[tokio::test]
async fn setting_a_private_app_up_again_without_its_secret_token_keeps_the_one_saved_for_it() {
    let (app, _zoom, agent) = app_and_zoom().await;
    let cid = existing_connection(&app).await;
    app.vars()
        .set(vars::SetRequest {
            vars: vec![var(
                &cid,
                "private_secret_token",
                "existing-app-token",
                true,
            )],
        })
        .await
        .unwrap();
    let setup = async |secret_token: &str| {
        set_up_server_to_server(&app, &agent, &cid, secret_token).await;
        value_of(&snapshot(&app, &cid).await, "private_secret_token").map(|(v, _)| v)
    };
    // Another app (another client id): its token does not belong to this one.
    assert_eq!(setup("").await, None);
    assert_eq!(setup("token-1").await.as_deref(), Some("token-1"));
    // The same app again, the field left empty (it is never shown filled in).
    assert_eq!(setup("").await.as_deref(), Some("token-1"));
    assert_eq!(setup("token-2").await.as_deref(), Some("token-2"));
}

#[tokio::test]
async fn setting_a_private_app_up_again_drops_a_saved_secret_token_that_no_longer_decrypts() {
    let zoom = FakeZoom::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = zoom.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = crate::helpers::spawn_app_in(dir.path(), &env).await;
    let agent = UserAgent::new(&app.url(""));
    let cid = existing_connection(&app).await;
    set_up_server_to_server(&app, &agent, &cid, "token-1").await;
    crate::helpers::corrupt_stored_secret(dir.path(), &cid, "private_secret_token");
    // Set up again as the error says, the field left empty (it is never shown filled in):
    // the unreadable token goes, and every variable reads again.
    set_up_server_to_server(&app, &agent, &cid, "").await;
    let stored = snapshot(&app, &cid).await;
    assert_eq!(value_of(&stored, "private_secret_token"), None);
    assert!(value_of(&stored, "private_client_secret").is_some());
}

#[tokio::test]
async fn server_to_server_with_a_wrong_account_id_shows_zoom_reason_and_saves_nothing() {
    let (app, _zoom, agent) = app_and_zoom().await;
    let cid = existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;
    let done = submit(
        &app,
        &agent,
        &[
            ("cid", &cid),
            ("auth_type", "serverToServer"),
            ("account_id", "someoneElse"),
            ("client_id", S2S_CLIENT_ID),
            ("client_secret", S2S_CLIENT_SECRET),
        ],
    )
    .await;
    assert_error_page(
        &done,
        StatusCode::BAD_REQUEST,
        "Zoom refused: Invalid account_id",
    );
    assert_eq!(snapshot(&app, &cid).await, before);
}

#[tokio::test]
async fn without_a_default_app_the_page_says_so_and_the_flow_is_refused() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env_without_default_app()).await;
    let agent = UserAgent::new(&app.url(""));
    let cid = existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;

    let page = agent.get(&page_url(&app, &cid)).await;
    assert!(
        page.body
            .contains("id=\"auth-oauthDefault\" value=\"oauthDefault\" disabled")
    );
    assert!(
        page.body
            .contains("Not available: this server has no default app")
    );

    let done = submit(
        &app,
        &agent,
        &[("cid", &cid), ("auth_type", "oauthDefault")],
    )
    .await;
    assert_error_page(&done, StatusCode::BAD_REQUEST, "no default OAuth app");
    let start = agent
        .get(&app.url(&format!("/oauth/start/zoom?cid={cid}")))
        .await;
    assert_error_page(&start, StatusCode::BAD_REQUEST, "no default OAuth app");
    assert_eq!(snapshot(&app, &cid).await, before);
    assert!(zoom.token_requests().is_empty());
}

#[tokio::test]
async fn a_connection_set_up_with_a_default_app_the_server_no_longer_has_is_offered_a_private_app()
{
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env_without_default_app()).await;
    let agent = UserAgent::new(&app.url(""));
    let cid = ConnectionId::generate().to_string();
    app.vars()
        .set(vars::SetRequest {
            vars: vec![var(&cid, "auth_type", "oauthDefault", false)],
        })
        .await
        .unwrap();
    let page = agent.get(&page_url(&app, &cid)).await;
    assert!(
        page.body
            .contains("id=\"auth-oauthPrivate\" value=\"oauthPrivate\" checked>"),
        "{}",
        page.body
    );
}

#[tokio::test]
async fn bad_form_input_gets_an_error_page_and_changes_nothing() {
    let (app, zoom, agent) = app_and_zoom().await;
    let cid = existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;
    let long = "x".repeat(600);
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("cid", &cid)], "choose an authentication type"),
        (
            vec![("cid", &cid), ("auth_type", "basic")],
            "authentication type must be",
        ),
        (
            vec![("cid", "con_123"), ("auth_type", "oauthDefault")],
            "malformed",
        ),
        (
            vec![("auth_type", "oauthDefault")],
            "connection_id is required",
        ),
        (
            vec![
                ("cid", &cid),
                ("origin", "../../x"),
                ("auth_type", "oauthDefault"),
            ],
            "origin must be",
        ),
        (
            vec![
                ("cid", &cid),
                ("auth_type", "oauthPrivate"),
                ("client_secret", "s"),
            ],
            "Client ID is required",
        ),
        (
            vec![
                ("cid", &cid),
                ("auth_type", "oauthPrivate"),
                ("client_id", "id"),
                ("client_secret", &long),
            ],
            "Client secret is too long",
        ),
        (
            vec![
                ("cid", &cid),
                ("auth_type", "serverToServer"),
                ("account_id", "acc\u{1}"),
                ("client_id", "id"),
                ("client_secret", "s"),
            ],
            "Account ID may contain only",
        ),
        (
            vec![
                ("cid", &cid),
                ("auth_type", "oauthPrivate"),
                ("client_id", "id"),
                ("client_secret", "line\nbreak"),
            ],
            "Client secret must not contain",
        ),
    ];
    for (form, words) in cases {
        let visit = submit(&app, &agent, &form).await;
        assert_error_page(&visit, StatusCode::BAD_REQUEST, words);
        assert!(
            !visit.body.contains("line\nbreak"),
            "secrets are not echoed"
        );
        // The same through GET, where a secret is refused before anything else.
        let query = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&form)
            .finish();
        let visit = agent.get(&app.url(&format!("/zoom/save?{query}"))).await;
        let secret = form
            .iter()
            .any(|(k, _)| *k == "client_secret" || *k == "secret_token");
        let words = if secret { "POST body only" } else { words };
        assert_error_page(&visit, StatusCode::BAD_REQUEST, words);
    }
    // Not form-encoded at all.
    let response = crate::helpers::http_client()
        .post(app.url("/zoom/save"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // Too large.
    let big = "a".repeat(64 * 1024);
    let visit = submit(
        &app,
        &agent,
        &[
            ("cid", &cid),
            ("auth_type", "oauthPrivate"),
            ("client_id", &big),
        ],
    )
    .await;
    assert_error_page(&visit, StatusCode::PAYLOAD_TOO_LARGE, "larger than 16 KiB");
    // The page itself with a bad cid.
    let page = agent.get(&app.url("/zoom/?cid=nope")).await;
    assert_error_page(&page, StatusCode::BAD_REQUEST, "malformed");

    assert_eq!(snapshot(&app, &cid).await, before);
    assert!(zoom.token_requests().is_empty());
}

#[tokio::test]
async fn secrets_in_the_url_of_a_get_save_are_refused_and_nothing_is_saved() {
    let (app, zoom, agent) = app_and_zoom().await;
    let cid = ConnectionId::generate().to_string();
    let before = snapshot(&app, &cid).await;
    let url = app.url(&format!(
        "/zoom/save?cid={cid}&origin=test&auth_type=serverToServer&account_id={S2S_ACCOUNT_ID}\
         &client_id={S2S_CLIENT_ID}&client_secret={S2S_CLIENT_SECRET}"
    ));
    let visit = agent.get(&url).await;
    assert_error_page(&visit, StatusCode::BAD_REQUEST, "POST body only");
    assert!(!visit.body.contains(S2S_CLIENT_SECRET));
    assert_eq!(snapshot(&app, &cid).await, before);
    assert_eq!(zoom.token_requests_of("account_credentials"), 0);
    // The default app's form has no secret: GET still starts its flow, as the contract says.
    let visit = agent
        .get(&app.url(&format!(
            "/zoom/save?cid={cid}&origin=test&auth_type=oauthDefault"
        )))
        .await;
    assert_eq!(visit.status, StatusCode::OK, "{}", visit.body);
    assert!(
        visit
            .authorize_url()
            .as_str()
            .starts_with(&zoom.oauth_url())
    );
}

#[tokio::test]
async fn without_a_public_address_oauth_cannot_start_and_says_why() {
    let zoom = FakeZoom::start().await;
    let mut env = zoom.env();
    env.push(("WEBHOOK_ADDRESS", String::new()));
    let app = app_with(&zoom, env).await;
    let agent = UserAgent::new(&app.url(""));
    let cid = ConnectionId::generate().to_string();
    let visit = agent
        .get(&app.url(&format!("/oauth/start/zoom?cid={cid}")))
        .await;
    assert_error_page(&visit, StatusCode::SERVICE_UNAVAILABLE, "WEBHOOK_ADDRESS");
    // The page offers what can work: both OAuth choices are disabled, saying why, and
    // Server-to-Server is left.
    let page = agent.get(&page_url(&app, &cid)).await;
    assert_eq!(page.status, StatusCode::OK);
    for auth in ["oauthDefault", "oauthPrivate"] {
        let choice = format!("id=\"auth-{auth}\" value=\"{auth}\" disabled>");
        assert!(page.body.contains(&choice), "{auth}: {}", page.body);
    }
    assert!(
        page.body
            .contains("id=\"auth-serverToServer\" value=\"serverToServer\" checked>"),
        "{}",
        page.body
    );
    assert!(page.body.contains("has not set WEBHOOK_ADDRESS"));
    assert!(!page.body.contains("id=\"redirect-url\""));
}

#[tokio::test]
async fn with_a_host_ui_the_browser_returns_where_the_host_asks() {
    let zoom = FakeZoom::start().await;
    let mut env = zoom.env();
    env.push(("HOST_UI_URL", "http://host.example:9980".into()));
    let app = app_with(&zoom, env).await;
    let agent = UserAgent::new(&app.url(""));
    let cid = ConnectionId::generate().to_string();
    let consent_page = submit(
        &app,
        &agent,
        &[
            ("cid", &cid),
            ("origin", "web"),
            ("auth_type", "oauthDefault"),
        ],
    )
    .await;
    let allow = consent_page.link("allow");
    let back = crate::helpers::http_client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(allow)
        .send()
        .await
        .unwrap();
    let back = back.headers()["location"].to_str().unwrap().to_string();
    let done = agent.get_once(&back).await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    assert_eq!(
        done.headers["location"],
        format!("http://host.example:9980/connections/{cid}/success").as_str()
    );
    assert_eq!(
        snapshot(&app, &cid).await.len(),
        9,
        "saved before going back to the host"
    );
}

#[tokio::test]
async fn the_fake_zoom_refuses_what_real_zoom_refuses() {
    // The flow tests above pass only because the fake accepted what the service sent; this
    // shows the fake would have refused a wrong verifier, redirect URI, secret or reused code.
    let (app, zoom, agent) = app_and_zoom().await;
    let cid = ConnectionId::generate().to_string();
    let http = crate::helpers::http_client();
    let exchange =
        |code: String, verifier: &'static str, redirect: String, secret: &'static str| {
            http.post(format!("{}/oauth/token", zoom.oauth_url()))
                .basic_auth(DEFAULT_CLIENT_ID, Some(secret))
                .form(&[
                    ("grant_type", "authorization_code".to_string()),
                    ("code", code),
                    ("redirect_uri", redirect),
                    ("code_verifier", verifier.to_string()),
                ])
                .send()
        };
    let redirect = app.url("/oauth/redirect/zoom");
    let verifier = "a-wrong-verifier-that-is-long-enough-to-pass-length-checks";
    for (secret, redirect_uri, expected) in [
        (
            DEFAULT_CLIENT_SECRET,
            redirect.clone(),
            "Invalid code_verifier",
        ),
        (
            DEFAULT_CLIENT_SECRET,
            "http://evil.example/cb".to_string(),
            "Redirect URI mismatch",
        ),
        (
            "wrong",
            redirect.clone(),
            "Invalid client_id or client_secret",
        ),
    ] {
        let back = redirect_back_url(&app, &agent, &cid).await;
        let code = back
            .query_pairs()
            .find(|(k, _)| k == "code")
            .unwrap()
            .1
            .to_string();
        let answer = exchange(code.clone(), verifier, redirect_uri, secret)
            .await
            .unwrap();
        assert!(answer.status().is_client_error());
        assert_eq!(
            answer.json::<serde_json::Value>().await.unwrap()["reason"],
            expected
        );
        if secret != "wrong" {
            let reused = exchange(code, verifier, redirect.clone(), DEFAULT_CLIENT_SECRET)
                .await
                .unwrap();
            assert_eq!(
                reused.json::<serde_json::Value>().await.unwrap()["reason"],
                "Authorization code has been used"
            );
        }
    }
}

#[tokio::test]
async fn zoom_issuing_no_refresh_token_fails_the_flow_and_leaves_the_connection_as_it_was() {
    let (app, zoom, agent) = app_and_zoom().await;
    let cid = existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;
    zoom.state.lock().unwrap().codes_without_refresh_token = true;
    let back = redirect_back_url(&app, &agent, &cid).await;
    let visit = agent.get(back.as_str()).await;
    assert_error_page(&visit, StatusCode::BAD_GATEWAY, "no refresh token");
    assert_eq!(snapshot(&app, &cid).await, before);
}

#[tokio::test]
async fn pages_run_no_script_frame_or_cache_and_only_the_connection_page_names_itself_to_its_own_site()
 {
    let (app, _zoom, _agent) = app_and_zoom().await;
    let cid = ConnectionId::generate().to_string();
    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let page = app
        .http_client
        .get(app.url(&format!("/zoom/?cid={cid}&origin=web")))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    // Its form's requests carry its origin, which old browsers without Sec-Fetch-Site only
    // send with a referrer policy that allows it; other sites still get nothing.
    assert_eq!(header(&page, "referrer-policy"), "same-origin");
    let redirect = app
        .http_client
        .get(app.url("/oauth/redirect/zoom?code=one-time&state=forged"))
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), StatusCode::BAD_REQUEST);
    // Its URL holds Zoom's one-time code: no page it links to may learn it.
    assert_eq!(header(&redirect, "referrer-policy"), "no-referrer");
    for response in [&page, &redirect] {
        let csp = header(response, "content-security-policy");
        assert!(csp.starts_with("default-src 'none'"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(!csp.contains("script-src"), "{csp}");
        assert_eq!(header(response, "x-frame-options"), "DENY");
        assert_eq!(header(response, "cache-control"), "no-store");
    }
}
