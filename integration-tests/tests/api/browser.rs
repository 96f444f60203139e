//! The connection page in a real browser: headless Chromium, driven through chromedriver,
//! sets up one connection of each authentication type against the fake Zoom, each through a
//! signed setup link from `SetupLinksService`, as a host engine would send people; and with
//! `SETUP_ACCESS=loopback`, the page works without a link while another site's page cannot
//! use the browser to set a connection up; and a flow started under another name of this
//! machine than `WEBHOOK_ADDRESS` says so, and its way back completes it.

use std::time::Duration;

use zoom_integration::ids::ConnectionId;
use zoom_integration::proto::zoomintegration::v1::CreateRequest;
use zoom_integration::proto::zoomintegration::v1::setup_links_service_client::SetupLinksServiceClient;

use crate::connection_setup::{app_with, snapshot, value_of};
use crate::fake_zoom::*;
use crate::helpers::TestApp;
use crate::webdriver::{Browser, find_chromedriver, find_chromium};

/// Where the screenshot of the connection page is kept.
fn artifact(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// chromedriver, or `None` (the test is skipped, and says so) where it or Chromium is not
/// installed; when `CI` is set (to any value) a missing one fails the test instead.
fn chromedriver_unless_skipped() -> Option<std::path::PathBuf> {
    let found = find_chromedriver().filter(|_| find_chromium().is_some());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install chromium and chromium-driver (see .ci/run)"
        );
        eprintln!(
            "skipped: no chromedriver or chromium (apt-get install chromium chromium-driver)"
        );
    }
    found
}

async fn open_page(browser: &Browser, app: &TestApp, cid: &str) {
    let link = SetupLinksServiceClient::new(app.channel())
        .create(CreateRequest {
            connection_id: cid.into(),
            origin: "test".into(),
        })
        .await
        .expect("a setup link")
        .into_inner();
    browser.goto(&link.url).await;
}

/// Presses Allow on the fake Zoom's consent page and waits for the way back.
async fn allow_in_zoom(browser: &Browser, zoom: &FakeZoom, app: &TestApp) -> String {
    browser
        .wait_for_url(&format!("{}/oauth/authorize", zoom.oauth_url()))
        .await;
    browser.find("#allow").await.click().await;
    browser.wait_for_url(&app.url("/oauth/redirect/zoom")).await;
    browser.find("#message").await.text().await
}

#[tokio::test]
async fn a_person_sets_up_each_kind_of_connection_in_a_real_browser() {
    let Some(chromedriver) = chromedriver_unless_skipped() else {
        return;
    };
    let zoom = FakeZoom::start().await;
    let mut env = zoom.env();
    env.push(("SETUP_ACCESS", "signed".into()));
    let app = app_with(&zoom, env).await;
    let browser = Browser::start(&chromedriver).await;

    // The page, as a person first sees it: the default app chosen, no private fields shown.
    let default_cid = ConnectionId::generate().to_string();
    open_page(&browser, &app, &default_cid).await;
    assert_eq!(
        browser.find("#status").await.text().await,
        "Not set up yet."
    );
    let named = browser.find("#connection").await.text().await;
    assert!(named.contains(&default_cid), "{named}");
    assert!(!browser.find("#client_id").await.is_displayed().await);
    assert!(browser.find("#start").await.is_displayed().await);
    assert!(!browser.find("#save").await.is_displayed().await);
    let shot = browser.screenshot().await;
    assert!(shot.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = artifact("connection-page.png");
    std::fs::write(&path, &shot).unwrap();
    eprintln!("screenshot of the connection page: {}", path.display());

    // Default OAuth app.
    browser.find("#auth-oauthDefault").await.click().await;
    browser.find("#start").await.click().await;
    let message = allow_in_zoom(&browser, &zoom, &app).await;
    assert_eq!(
        message,
        format!("Connected to Zoom as {USER_DISPLAY_NAME} <{USER_EMAIL}>.")
    );
    let stored = snapshot(&app, &default_cid).await;
    assert_eq!(value_of(&stored, "auth_type").unwrap().0, "oauthDefault");
    assert_eq!(value_of(&stored, "user_id").unwrap().0, USER_ID);
    assert!(
        value_of(&stored, "oauth_refresh_token").unwrap().1,
        "stored as a secret"
    );

    // Private OAuth app: its fields appear once chosen.
    let private_cid = ConnectionId::generate().to_string();
    open_page(&browser, &app, &private_cid).await;
    browser.find("#auth-oauthPrivate").await.click().await;
    assert!(browser.find("#client_id").await.is_displayed().await);
    assert!(browser.find("#secret_token").await.is_displayed().await);
    assert!(!browser.find("#account_id").await.is_displayed().await);
    browser
        .find("#client_id")
        .await
        .type_text(PRIVATE_CLIENT_ID)
        .await;
    browser
        .find("#client_secret")
        .await
        .type_text(PRIVATE_CLIENT_SECRET)
        .await;
    browser
        .find("#secret_token")
        .await
        .type_text("browser-webhook-token")
        .await;
    browser.find("#start").await.click().await;
    let message = allow_in_zoom(&browser, &zoom, &app).await;
    assert!(message.starts_with("Connected to Zoom as"), "{message}");
    let stored = snapshot(&app, &private_cid).await;
    assert_eq!(value_of(&stored, "auth_type").unwrap().0, "oauthPrivate");
    assert_eq!(
        value_of(&stored, "private_client_secret"),
        Some((PRIVATE_CLIENT_SECRET.to_string(), true))
    );
    assert_eq!(
        value_of(&stored, "private_secret_token"),
        Some(("browser-webhook-token".to_string(), true))
    );

    // Server-to-Server: account id appears, and the button is Save.
    let s2s_cid = ConnectionId::generate().to_string();
    open_page(&browser, &app, &s2s_cid).await;
    browser.find("#auth-serverToServer").await.click().await;
    assert!(browser.find("#account_id").await.is_displayed().await);
    assert!(browser.find("#save").await.is_displayed().await);
    assert!(!browser.find("#start").await.is_displayed().await);
    assert_eq!(browser.find("#save").await.text().await, "Save");
    browser
        .find("#account_id")
        .await
        .type_text(S2S_ACCOUNT_ID)
        .await;
    browser
        .find("#client_id")
        .await
        .type_text(S2S_CLIENT_ID)
        .await;
    browser
        .find("#client_secret")
        .await
        .type_text(S2S_CLIENT_SECRET)
        .await;
    browser.find("#save").await.click().await;
    browser.wait_for_url(&app.url("/zoom/save")).await;
    assert_eq!(
        browser.find("#message").await.text().await,
        format!("Connected to Zoom account {S2S_ACCOUNT_ID} with your Server-to-Server app.")
    );
    let stored = snapshot(&app, &s2s_cid).await;
    assert_eq!(value_of(&stored, "auth_type").unwrap().0, "serverToServer");
    assert_eq!(
        value_of(&stored, "private_account_id").unwrap().0,
        S2S_ACCOUNT_ID
    );

    // Back on the first connection's page, its status names the Zoom user.
    open_page(&browser, &app, &default_cid).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        browser.find("#status").await.text().await,
        format!("Connected as {USER_DISPLAY_NAME} <{USER_EMAIL}> with the default OAuth app.")
    );
    browser.close().await;
}

#[tokio::test]
async fn in_loopback_mode_the_page_works_without_a_link_and_another_sites_form_is_refused() {
    let Some(chromedriver) = chromedriver_unless_skipped() else {
        return;
    };
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await; // the tests' default: SETUP_ACCESS=loopback
    let browser = Browser::start(&chromedriver).await;

    // A page of another site (other-site.test, which the browser resolves to loopback) that
    // submits a form to this service as soon as it opens.
    let victim = ConnectionId::generate().to_string();
    let attack = format!(
        r#"<!doctype html><form method="post" action="{}">
        <input name="cid" value="{victim}"><input name="origin" value="test">
        <input name="auth_type" value="serverToServer"><input name="account_id" value="{S2S_ACCOUNT_ID}">
        <input name="client_id" value="{S2S_CLIENT_ID}"><input name="client_secret" value="{S2S_CLIENT_SECRET}">
        </form><script>document.forms[0].submit()</script>"#,
        app.url("/zoom/save")
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let site = axum::Router::new().route(
        "/",
        axum::routing::get(move || async move { axum::response::Html(attack) }),
    );
    tokio::spawn(async move { axum::serve(listener, site).await });
    browser
        .goto(&format!("http://other-site.test:{port}/"))
        .await;
    browser.wait_for_url(&app.url("/zoom/save")).await;
    let message = browser.find("#message").await.text().await;
    assert!(message.contains("another site"), "{message}");
    assert!(snapshot(&app, &victim).await.is_empty(), "nothing saved");
    assert_eq!(
        zoom.token_requests_of("account_credentials"),
        0,
        "Zoom never asked"
    );

    // The page itself, opened on this machine without a link, sets the connection up.
    let cid = ConnectionId::generate().to_string();
    browser
        .goto(&app.url(&format!("/zoom/?cid={cid}&origin=test")))
        .await;
    browser.find("#auth-oauthDefault").await.click().await;
    browser.find("#start").await.click().await;
    let message = allow_in_zoom(&browser, &zoom, &app).await;
    assert!(message.starts_with("Connected to Zoom as"), "{message}");
    assert_eq!(
        value_of(&snapshot(&app, &cid).await, "auth_type")
            .unwrap()
            .0,
        "oauthDefault"
    );
    browser.close().await;
}

#[tokio::test]
async fn a_flow_started_under_another_name_of_this_machine_says_so_and_the_way_back_completes_it() {
    let Some(chromedriver) = chromedriver_unless_skipped() else {
        return;
    };
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await; // SETUP_ACCESS=loopback
    let browser = Browser::start(&chromedriver).await;

    // The page under a name of this machine other than WEBHOOK_ADDRESS (127.0.0.1:port): the
    // flow's cookie is set for that name, and Zoom sends the browser back to the other one.
    let cid = ConnectionId::generate().to_string();
    let alias = app
        .url(&format!("/zoom/?cid={cid}&origin=test"))
        .replace("127.0.0.1", "alias.localhost");
    browser.goto(&alias).await;
    browser.find("#auth-oauthDefault").await.click().await;
    browser.find("#start").await.click().await;
    let message = allow_in_zoom(&browser, &zoom, &app).await;
    assert!(
        message.contains("at another address than this one"),
        "{message}"
    );
    assert!(snapshot(&app, &cid).await.is_empty(), "nothing saved");

    // Its way back opens the page at the address Zoom returns to, where the flow completes.
    browser.find("#back").await.click().await;
    browser.wait_for_url(&app.url("/zoom/")).await;
    browser.find("#auth-oauthDefault").await.click().await;
    browser.find("#start").await.click().await;
    let message = allow_in_zoom(&browser, &zoom, &app).await;
    assert!(message.starts_with("Connected to Zoom as"), "{message}");
    assert_eq!(
        value_of(&snapshot(&app, &cid).await, "auth_type")
            .unwrap()
            .0,
        "oauthDefault"
    );
    browser.close().await;
}
