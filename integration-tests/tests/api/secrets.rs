//! Secrets stay secret: the real binary, logging at debug level, runs every flow with
//! distinctive secret values; then its whole log, every page and answer it gave, and every
//! URL the browser was sent to are scanned for them.

use std::time::Duration;

use zoom_integration::ids::ConnectionId;
use zoom_integration::proto::autokitteh::integrations::v1::integrations_service_client::IntegrationsServiceClient;
use zoom_integration::proto::autokitteh::integrations::v1::{CallRequest, TestConnectionRequest};
use zoom_integration::proto::autokitteh::values::v1 as pb;
use zoom_integration::proto::autokitteh::vars::v1 as vars;
use zoom_integration::proto::autokitteh::vars::v1::vars_service_client::VarsServiceClient;

use crate::fake_zoom::*;
use crate::helpers::{http_client, var, zoom_id};
use crate::process::start_service_with_log;
use crate::user_agent::{UserAgent, Visit};
use crate::webhooks::{post_to, sign};

const SECRET_KEY: &str = "SECRETKEY-7f3a9c-distinctive-key-material-0001";
const WEBHOOK_SECRET: &str = "WEBHOOKSECRET-d41d8cd98f00b204";
const PRIVATE_WEBHOOK_SECRET: &str = "PRIVATEWEBHOOK-9e107d9d372bb682";
const TYPO_SECRET: &str = "TYPOSECRET-e4d909c290d0fb1c";

/// Everything a person, Zoom or a host was shown.
#[derive(Default)]
struct Seen(Vec<String>);

impl Seen {
    fn visit(&mut self, visit: &Visit) {
        self.0.push(visit.body.clone());
        self.0.extend(visit.hops.iter().map(|u| u.to_string()));
        self.0
            .extend(visit.headers.iter().map(|(k, v)| format!("{k}: {v:?}")));
    }
}

#[tokio::test]
async fn no_secret_reaches_a_log_a_page_an_error_or_a_url() {
    let zoom = FakeZoom::start().await;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let http_addr = format!("127.0.0.1:{port}");
    let zoom_env = zoom.env();
    let mut env: Vec<(&str, &str)> = zoom_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.extend([
        ("DATA_DIR", dir.path().to_str().unwrap()),
        ("SECRET_KEY", SECRET_KEY),
        ("ZOOM_SECRET_TOKEN", WEBHOOK_SECRET),
        ("WEBHOOK_ADDRESS", http_addr.as_str()),
        ("WEBHOOK_SCHEME", "http"),
        ("RUST_LOG", "debug"),
        ("SETUP_ACCESS", "loopback"),
    ]);
    // A fixed HTTP_ADDR (it wins over the helper's port 0), so WEBHOOK_ADDRESS can name it.
    env.push(("HTTP_ADDR", http_addr.as_str()));
    let (mut child, _, grpc, log) = start_service_with_log(&env).await;
    let base = format!("http://{http_addr}");
    zoom.register_redirect_uri(format!("{base}/oauth/redirect/zoom"));
    let agent = UserAgent::new(&base);
    let mut seen = Seen::default();
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect_lazy();

    // Default app, private app, Server-to-Server.
    let default_cid = ConnectionId::generate().to_string();
    let consent = agent
        .post_form(
            &format!("{base}/zoom/save"),
            &[("cid", &default_cid), ("auth_type", "oauthDefault")],
        )
        .await;
    seen.visit(&consent);
    let done = agent.get(consent.link("allow").as_str()).await;
    assert_eq!(done.status, 200, "{}", done.body);
    seen.visit(&done);

    let private_cid = ConnectionId::generate().to_string();
    let consent = agent
        .post_form(
            &format!("{base}/zoom/save"),
            &[
                ("cid", &private_cid),
                ("auth_type", "oauthPrivate"),
                ("client_id", PRIVATE_CLIENT_ID),
                ("client_secret", PRIVATE_CLIENT_SECRET),
                ("secret_token", PRIVATE_WEBHOOK_SECRET),
            ],
        )
        .await;
    seen.visit(&consent);
    let done = agent.get(consent.link("allow").as_str()).await;
    assert_eq!(done.status, 200, "{}", done.body);
    seen.visit(&done);

    let s2s_cid = ConnectionId::generate().to_string();
    let done = agent
        .post_form(
            &format!("{base}/zoom/save"),
            &[
                ("cid", &s2s_cid),
                ("auth_type", "serverToServer"),
                ("account_id", S2S_ACCOUNT_ID),
                ("client_id", S2S_CLIENT_ID),
                ("client_secret", S2S_CLIENT_SECRET),
            ],
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.body);
    seen.visit(&done);

    // Failures that carry secrets: a bad form, wrong credentials, a wrong account.
    for form in [
        vec![
            ("cid", default_cid.as_str()),
            ("auth_type", "oauthPrivate"),
            ("client_id", "id"),
            ("client_secret", &format!("{TYPO_SECRET}\u{7}")),
        ],
        vec![
            ("cid", default_cid.as_str()),
            ("auth_type", "serverToServer"),
            ("account_id", "wrongAccount"),
            ("client_id", S2S_CLIENT_ID),
            ("client_secret", S2S_CLIENT_SECRET),
        ],
    ] {
        let visit = agent.post_form(&format!("{base}/zoom/save"), &form).await;
        assert_eq!(visit.status, 400, "{}", visit.body);
        seen.visit(&visit);
    }
    let consent = agent
        .post_form(
            &format!("{base}/zoom/save"),
            &[
                ("cid", &default_cid),
                ("auth_type", "oauthPrivate"),
                ("client_id", PRIVATE_CLIENT_ID),
                ("client_secret", TYPO_SECRET),
            ],
        )
        .await;
    let refused = agent.get(consent.link("allow").as_str()).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    seen.visit(&refused);

    // Webhooks: signed with both secrets, a bad signature, URL validation.
    let client = http_client();
    let url = format!("{base}/zoom/event");
    let body = format!(
        r#"{{"event":"meeting.started","event_ts":1,"payload":{{"account_id":"{USER_ACCOUNT_ID}","object":{{"id":"1"}}}}}}"#
    );
    let mut signatures = Vec::new();
    for secret in [WEBHOOK_SECRET, PRIVATE_WEBHOOK_SECRET, TYPO_SECRET] {
        let ts = crate::webhooks::now();
        signatures.push(sign(secret, &ts.to_string(), body.as_bytes()));
        let (status, answer) = post_to(&client, &url, secret, ts, body.as_bytes()).await;
        seen.0.push(format!("{status} {answer}"));
    }
    let validation = r#"{"event":"endpoint.url_validation","payload":{"plainToken":"qgg8vlvZRS6UYooatFL8Aw"},"event_ts":1}"#;
    let (status, answer) = post_to(
        &client,
        &url,
        WEBHOOK_SECRET,
        crate::webhooks::now(),
        validation.as_bytes(),
    )
    .await;
    assert_eq!(status, 200);
    seen.0.push(answer.to_string());

    // An expired token is refreshed; TestConnection and Call, failures included.
    VarsServiceClient::new(channel.clone())
        .set(vars::SetRequest {
            vars: vec![var(
                &default_cid,
                "oauth_expiry",
                &crate::fresh_tokens::a_minute_ago(),
                false,
            )],
        })
        .await
        .unwrap();
    let mut integrations = IntegrationsServiceClient::new(channel.clone());
    for cid in [&default_cid, &private_cid, &s2s_cid] {
        let status = integrations
            .test_connection(TestConnectionRequest {
                integration_id: zoom_id(),
                connection_id: cid.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        seen.0.push(format!("{status:?}"));
        for (name, args) in [
            ("get_user", vec![]),
            ("get_meeting", vec![zoom_integration::values::string("404")]),
            (
                "api",
                vec![
                    zoom_integration::values::string("GET"),
                    zoom_integration::values::string("https://evil.example/x"),
                ],
            ),
        ] {
            let answer = integrations
                .call(CallRequest {
                    integration_id: zoom_id(),
                    function: Some(pb::Value {
                        function: Some(pb::Function {
                            name: name.into(),
                            data: cid.as_bytes().to_vec(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    args,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            seen.0.push(format!("{answer:?}"));
        }
    }
    assert!(
        zoom.token_requests_of("refresh_token") >= 1,
        "a refresh happened"
    );

    child.start_kill().unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let log = log.lock().unwrap().join("\n");
    assert!(
        log.contains("connection set up"),
        "the log is really captured"
    );
    let mut secrets: Vec<String> = [
        SECRET_KEY,
        WEBHOOK_SECRET,
        PRIVATE_WEBHOOK_SECRET,
        TYPO_SECRET,
        DEFAULT_CLIENT_SECRET,
        PRIVATE_CLIENT_SECRET,
        S2S_CLIENT_SECRET,
    ]
    .map(String::from)
    .to_vec();
    secrets.extend(zoom.state.lock().unwrap().issued.clone());
    secrets.extend(signatures);
    // Zoom's one-time authorization codes travel in the redirect URL by protocol, but never
    // into the log.
    let codes: Vec<String> = zoom.state.lock().unwrap().codes_issued.clone();
    assert!(!codes.is_empty());
    for code in &codes {
        assert!(
            !log.contains(code.as_str()),
            "the log contains an authorization code"
        );
    }
    assert!(secrets.len() > 12, "tokens were issued: {secrets:?}");
    let seen = seen.0.join("\n");
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "the log contains {secret}");
        assert!(
            !seen.contains(secret.as_str()),
            "a page, answer or URL contains {secret}"
        );
    }
}
