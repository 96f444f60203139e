//! Who may set up a connection: with `SETUP_ACCESS=signed` only holders of a signed link for
//! that connection and origin get past the connection page, the form and the start of OAuth;
//! links come from `SetupLinksService.Create` and from `zoom-integration setup-link`.

use reqwest::StatusCode;
use zoom_integration::ids::ConnectionId;
use zoom_integration::proto::zoomintegration::v1::CreateRequest;
use zoom_integration::proto::zoomintegration::v1::setup_links_service_client::SetupLinksServiceClient;

use crate::connection_setup::{app_with, snapshot, value_of};
use crate::fake_zoom::*;
use crate::helpers::{TEST_SECRET_KEY, TestApp};
use crate::user_agent::UserAgent;

async fn signed_app(zoom: &FakeZoom) -> TestApp {
    let mut env = zoom.env();
    env.push(("SETUP_ACCESS", "signed".into()));
    app_with(zoom, env).await
}

async fn link(app: &TestApp, cid: &str, origin: &str) -> url::Url {
    let created = SetupLinksServiceClient::new(app.channel())
        .create(CreateRequest {
            connection_id: cid.into(),
            origin: origin.into(),
        })
        .await
        .expect("Create answers")
        .into_inner();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now + 890..=now + 900).contains(&created.expires_at));
    let url = url::Url::parse(&created.url).unwrap();
    assert_eq!(
        url.query_pairs().find(|(k, _)| k == "grant").unwrap().1,
        created.grant
    );
    url
}

fn grant_of(url: &url::Url) -> String {
    url.query_pairs()
        .find(|(k, _)| k == "grant")
        .map(|(_, v)| v.into_owned())
        .unwrap()
}

#[tokio::test]
async fn without_a_signed_link_no_setup_endpoint_lets_anyone_change_a_connection() {
    let zoom = FakeZoom::start().await;
    let app = signed_app(&zoom).await;
    let agent = UserAgent::new(&app.url(""));
    let cid = crate::connection_setup::existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;
    let other_link = link(&app, &ConnectionId::generate().to_string(), "web").await;
    let forged = format!("v1.9999999999.{}", "ab".repeat(32));

    for grant in [
        None,
        Some(forged.as_str()),
        Some(grant_of(&other_link).as_str()),
    ] {
        let suffix = grant.map_or_else(String::new, |g| format!("&grant={g}"));
        let page = agent
            .get(&app.url(&format!("/zoom/?cid={cid}&origin=web{suffix}")))
            .await;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "{}", page.body);
        assert!(page.text_of("message").contains("valid setup link"));
        // Nothing was submitted, so nothing was "not saved".
        assert!(
            page.body
                .contains("<h1>Zoom connection page not available</h1>")
        );
        let start = agent
            .get(&app.url(&format!("/oauth/start/zoom?cid={cid}&origin=web{suffix}")))
            .await;
        assert_eq!(start.status, StatusCode::FORBIDDEN);
        let mut form = vec![
            ("cid", cid.as_str()),
            ("origin", "web"),
            ("auth_type", "serverToServer"),
            ("account_id", S2S_ACCOUNT_ID),
            ("client_id", S2S_CLIENT_ID),
            ("client_secret", S2S_CLIENT_SECRET),
        ];
        if let Some(g) = grant {
            form.push(("grant", g));
        }
        let saved = agent.post_form(&app.url("/zoom/save"), &form).await;
        assert_eq!(saved.status, StatusCode::FORBIDDEN, "{}", saved.body);
        assert!(saved.body.contains("<h1>Zoom connection not saved</h1>"));
    }
    assert_eq!(snapshot(&app, &cid).await, before);
    assert!(zoom.token_requests().is_empty(), "nothing reached Zoom");

    // Zoom's endpoints stay open: they rely on signatures and state.
    let redirect = agent
        .get(&app.url("/oauth/redirect/zoom?code=x&state=y"))
        .await;
    assert_eq!(redirect.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        app.post("/zoom/event", "{}").await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn a_link_from_the_grpc_method_sets_up_its_connection_and_only_for_its_origin() {
    let zoom = FakeZoom::start().await;
    let app = signed_app(&zoom).await;
    let agent = UserAgent::new(&app.url(""));
    let cid = ConnectionId::generate().to_string();
    let url = link(&app, &cid, "test").await;
    let grant = grant_of(&url);

    let page = agent.get(url.as_str()).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(
        page.body
            .contains(&format!("name=\"grant\" value=\"{grant}\""))
    );
    // The same link for another origin is refused.
    let elsewhere = agent
        .get(&app.url(&format!("/zoom/?cid={cid}&origin=web&grant={grant}")))
        .await;
    assert_eq!(elsewhere.status, StatusCode::FORBIDDEN);

    // The default app's flow carries the grant through /oauth/start/zoom.
    let consent = agent
        .post_form(
            &app.url("/zoom/save"),
            &[
                ("cid", &cid),
                ("origin", "test"),
                ("grant", &grant),
                ("auth_type", "oauthDefault"),
            ],
        )
        .await;
    assert_eq!(consent.url.path(), "/oauth/authorize", "{}", consent.body);
    let done = agent.get(consent.link("allow").as_str()).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    let stored = snapshot(&app, &cid).await;
    assert_eq!(value_of(&stored, "auth_type").unwrap().0, "oauthDefault");
}

#[tokio::test]
async fn the_page_says_how_long_its_setup_link_still_works() {
    let zoom = FakeZoom::start().await;
    let app = signed_app(&zoom).await;
    let cid = ConnectionId::generate().to_string();
    let agent = UserAgent::new(&app.url(""));
    let page = agent.get(link(&app, &cid, "test").await.as_str()).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let expiry = page.text_of("link-expiry");
    assert!(expiry.contains("about 15 more minutes"), "{expiry}");
    // Opened without a link (loopback access), the page has no link to time.
    let app = app_with(&zoom, zoom.env()).await;
    let page = agent
        .get(&app.url(&format!("/zoom/?cid={cid}&origin=test")))
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(!page.body.contains("id=\"link-expiry\""), "{}", page.body);
}

#[tokio::test]
async fn the_pages_after_zoom_link_back_with_the_grant_the_flow_started_with() {
    let zoom = FakeZoom::start().await;
    let app = signed_app(&zoom).await;
    let agent = UserAgent::new(&app.url(""));
    let cid = ConnectionId::generate().to_string();
    let grant = grant_of(&link(&app, &cid, "test").await);
    let start = |extra: &'static [(&'static str, &'static str)]| {
        let mut form = vec![
            ("cid", cid.as_str()),
            ("origin", "test"),
            ("grant", grant.as_str()),
        ];
        form.extend_from_slice(extra);
        let agent = &agent;
        let save = app.url("/zoom/save");
        async move {
            let consent = agent.post_form(&save, &form).await;
            assert_eq!(consent.url.path(), "/oauth/authorize", "{}", consent.body);
            consent
        }
    };
    let default_app: &[(&str, &str)] = &[("auth_type", "oauthDefault")];
    let wrong_private_app: &[(&str, &str)] = &[
        ("auth_type", "oauthPrivate"),
        ("client_id", PRIVATE_CLIENT_ID),
        ("client_secret", "not-the-secret"),
    ];

    let cases = [
        (
            "denied consent",
            default_app,
            "deny",
            StatusCode::BAD_REQUEST,
        ),
        (
            "refused code",
            wrong_private_app,
            "allow",
            StatusCode::BAD_REQUEST,
        ),
        ("success", default_app, "allow", StatusCode::OK),
    ];
    let mut last = None;
    for (case, app_fields, button, status) in cases {
        let consent = start(app_fields).await;
        let ended = agent.get(consent.link(button).as_str()).await;
        last = Some(ended.url.clone());
        assert_eq!(ended.status, status, "{case}: {}", ended.body);
        let back = ended.link("back");
        assert_eq!(
            back.query_pairs()
                .find(|(k, _)| k == "grant")
                .map(|(_, v)| v),
            Some(grant.as_str().into()),
            "{case}"
        );
        let page = agent.get(back.as_str()).await;
        assert_eq!(page.status, StatusCode::OK, "{case}: {}", page.body);
    }
    // A state already used carries no grant: instead of a link that would only get 403, the
    // page says where to start again.
    let again = agent.get(last.unwrap().as_str()).await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST, "{}", again.body);
    assert!(!again.body.contains("id=\"back\""), "{}", again.body);
    assert!(
        again
            .text_of("again")
            .contains("from your workflow platform")
    );
}

#[tokio::test]
async fn the_cli_prints_a_link_the_service_accepts() {
    let zoom = FakeZoom::start().await;
    let app = signed_app(&zoom).await;
    let cid = ConnectionId::generate().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_service-under-test"))
        .args(["setup-link", &cid, "web"])
        .env_clear()
        .env("SECRET_KEY", TEST_SECRET_KEY)
        .env("DATA_DIR", dir.path())
        .env("WEBHOOK_ADDRESS", app.http.to_string())
        .env("WEBHOOK_SCHEME", "http")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        url.starts_with(&app.url(&format!("/zoom/?cid={cid}&origin=web&grant=v1."))),
        "{url}"
    );
    let page = UserAgent::new(&app.url("")).get(&url).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);

    // Without a public address there is no link to give.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_service-under-test"))
        .args(["setup-link", &cid])
        .env_clear()
        .env("SECRET_KEY", TEST_SECRET_KEY)
        .env("DATA_DIR", dir.path())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("WEBHOOK_ADDRESS"));

    // Without SECRET_KEY and with no key file in DATA_DIR, a link would be signed with a key
    // the service does not have: the CLI refuses and makes no key.
    let empty = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_service-under-test"))
        .args(["setup-link", &cid])
        .env_clear()
        .env("DATA_DIR", empty.path())
        .env("WEBHOOK_ADDRESS", app.http.to_string())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("SECRET_KEY") && stderr.contains("DATA_DIR"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn in_loopback_mode_a_page_reached_under_another_site_s_name_needs_a_link() {
    // DNS rebinding: evil.example resolves to 127.0.0.1, so the browser sends its page's
    // requests here as same-origin, under evil.example's name.
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = crate::connection_setup::existing_connection(&app).await;
    let before = snapshot(&app, &cid).await;
    let client = crate::helpers::http_client();
    let get = async |host: &str, path: &str| {
        client
            .get(app.url(path))
            .header("host", host)
            .header("sec-fetch-site", "same-origin")
            .send()
            .await
            .unwrap()
            .status()
    };
    let page = format!("/zoom/?cid={cid}&origin=test");
    let save = [
        ("cid", cid.as_str()),
        ("auth_type", "serverToServer"),
        ("account_id", S2S_ACCOUNT_ID),
        ("client_id", S2S_CLIENT_ID),
        ("client_secret", S2S_CLIENT_SECRET),
    ];
    assert_eq!(get("evil.example:9980", &page).await, StatusCode::FORBIDDEN);
    let saved = client
        .post(app.url("/zoom/save"))
        .header("host", "evil.example:9980")
        .header("sec-fetch-site", "same-origin")
        .form(&save)
        .send()
        .await
        .unwrap();
    assert_eq!(saved.status(), StatusCode::FORBIDDEN);
    assert_eq!(snapshot(&app, &cid).await, before);
    // Under this machine's own name the page still opens without a link.
    let own = app.http.to_string();
    assert_eq!(get(&own, &page).await, StatusCode::OK);
    assert_eq!(get("localhost", &page).await, StatusCode::OK);
}

#[tokio::test]
async fn a_link_followed_from_another_site_s_page_shows_the_connection_page_and_starts_nothing() {
    link_followed_from_another_site("signed").await;
}

#[tokio::test]
async fn with_loopback_access_too_a_link_from_another_site_s_page_starts_nothing() {
    // The test client is on loopback: a grant is what lets another site's request in.
    link_followed_from_another_site("loopback").await;
}

async fn link_followed_from_another_site(setup_access: &str) {
    let zoom = FakeZoom::start().await;
    let mut env = zoom.env();
    env.push(("SETUP_ACCESS", setup_access.into()));
    env.push(("HOST_UI_URL", "https://ui.example.com".into()));
    let app = app_with(&zoom, env).await;
    let cid = ConnectionId::generate().to_string();
    let grant = grant_of(&link(&app, &cid, "web").await);
    let target = format!("cid={cid}&origin=web&grant={grant}");
    let start = app.url(&format!("/oauth/start/zoom?{target}"));
    let location = |r: &reqwest::Response| {
        r.headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };

    // Another site's page links the victim's browser to the grant's flow: it lands on the
    // connection page, with no flow started.
    let followed = app
        .http_client
        .get(&start)
        .header("sec-fetch-site", "cross-site")
        .header("referer", "https://evil.example/")
        .send()
        .await
        .unwrap();
    assert_eq!(followed.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&followed), format!("/zoom/?{target}"));
    assert!(followed.headers().get("set-cookie").is_none());
    // A page served elsewhere on this machine (another port) is another site's too, unless the
    // whole machine is trusted (`loopback`).
    let from_local_page = app
        .http_client
        .get(&start)
        .header("sec-fetch-site", "cross-site")
        .header("referer", "http://localhost:5555/")
        .send()
        .await
        .unwrap();
    if setup_access == "loopback" {
        assert!(
            location(&from_local_page).starts_with(&zoom.oauth_url()),
            "{}",
            location(&from_local_page)
        );
    } else {
        assert_eq!(location(&from_local_page), format!("/zoom/?{target}"));
        assert!(from_local_page.headers().get("set-cookie").is_none());
    }
    let s2s_form = [
        ("cid", cid.as_str()),
        ("origin", "web"),
        ("grant", grant.as_str()),
        ("auth_type", "serverToServer"),
        ("account_id", S2S_ACCOUNT_ID),
        ("client_id", S2S_CLIENT_ID),
        ("client_secret", S2S_CLIENT_SECRET),
    ];
    let posted = app
        .http_client
        .post(app.url("/zoom/save"))
        .header("sec-fetch-site", "cross-site")
        .header("origin", "https://evil.example")
        .form(&s2s_form)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&posted), format!("/zoom/?{target}"));
    assert!(snapshot(&app, &cid).await.is_empty(), "nothing saved");
    assert_eq!(zoom.token_requests_of("account_credentials"), 0);

    // The host's own UI may start a flow at once, and the page's own form goes on.
    let from_ui = app
        .http_client
        .get(&start)
        .header("sec-fetch-site", "cross-site")
        .header("referer", "https://ui.example.com/connections")
        .send()
        .await
        .unwrap();
    assert!(
        location(&from_ui).starts_with(&zoom.oauth_url()),
        "{}",
        location(&from_ui)
    );
    let posted = app
        .http_client
        .post(app.url("/zoom/save"))
        .header("sec-fetch-site", "same-origin")
        .header("origin", app.url("").trim_end_matches('/'))
        .form(&s2s_form)
        .send()
        .await
        .unwrap();
    // Saved, and the browser sent back to the host's UI.
    assert!(location(&posted).starts_with("https://ui.example.com"));
    assert_eq!(
        value_of(&snapshot(&app, &cid).await, "auth_type")
            .unwrap()
            .0,
        "serverToServer"
    );
}
