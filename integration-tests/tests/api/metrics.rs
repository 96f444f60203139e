//! `GET /metrics`: what each metric says after known traffic.

use std::time::Duration;

use zoom_integration::ids::ConnectionId;
use zoom_integration::proto::autokitteh::integrations::v1::{CallRequest, TestConnectionRequest};
use zoom_integration::proto::autokitteh::values::v1 as pb;
use zoom_integration::proto::autokitteh::vars::v1 as vars;

use crate::connection_setup::app_with;
use crate::fake_host::FakeHost;
use crate::fake_zoom::*;
use crate::helpers::{TestApp, spawn_app_with, var, zoom_id};
use crate::webhooks::{ACCOUNT, SECRET, now, post_to, post_until_recorded};

/// The value of the sample `name{labels}` (labels as written, sorted by name), or 0.
pub(crate) fn sample(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

pub(crate) async fn scrape(app: &TestApp) -> String {
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    response.text().await.unwrap()
}

fn body(n: u64) -> Vec<u8> {
    format!(r#"{{"event":"meeting.started","event_ts":{n},"payload":{{"account_id":"{ACCOUNT}","object":{{"id":"{n}"}}}}}}"#)
        .into_bytes()
}

#[tokio::test]
async fn made_up_methods_share_one_label_instead_of_growing_the_metrics() {
    let app = spawn_app_with(&[]).await;
    for n in 0..5 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{n}").as_bytes()).unwrap();
        let response = app
            .http_client
            .request(method, app.url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405);
    }
    let text = scrape(&app).await;
    assert!(!text.contains("MADEUP"));
    assert_eq!(
        sample(
            &text,
            "http_request_duration_seconds_count{method=\"other\",route=\"/healthz\",status=\"405\"}"
        ),
        5.0
    );
}

#[tokio::test]
async fn webhooks_are_counted_by_result_and_the_outbox_shows_its_depth_and_age() {
    let host = FakeHost::start().await;
    let cid = ConnectionId::generate().to_string();
    host.put(var(&cid, "auth_type", "oauthDefault", false));
    host.put(var(&cid, "account_id", ACCOUNT, false));
    // The host takes nothing: what is recorded stays in the outbox.
    host.state.lock().unwrap().refuse_dispatch = true;
    let app = spawn_app_with(&[
        ("HOST_ENGINE_URL", &host.url()),
        ("ZOOM_SECRET_TOKEN", SECRET),
    ])
    .await;
    let url = app.url("/zoom/event");
    let client = &app.http_client;

    post_until_recorded(client, &url, SECRET, &body(1)).await;
    assert_eq!(post_to(client, &url, SECRET, now(), &body(2)).await.0, 200);
    assert_eq!(
        post_to(client, &url, SECRET, now(), &body(2)).await.1["status"],
        "duplicate"
    );
    assert_eq!(post_to(client, &url, "wrong", now(), &body(3)).await.0, 401);
    assert_eq!(
        post_to(client, &url, SECRET, now() - 7200, &body(4))
            .await
            .0,
        401
    );
    let elsewhere = br#"{"event":"meeting.started","payload":{"account_id":"someone-else"}}"#;
    assert_eq!(
        post_to(client, &url, SECRET, now(), elsewhere).await.1["status"],
        "unrouted"
    );
    assert_eq!(post_to(client, &url, SECRET, now(), b"[1,2]").await.0, 400);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let text = scrape(&app).await;
    let webhooks = |result: &str| {
        sample(
            &text,
            &format!("zoom_webhooks_total{{result=\"{result}\"}}"),
        )
    };
    assert_eq!(webhooks("recorded"), 2.0, "{text}");
    assert_eq!(webhooks("duplicate"), 1.0);
    assert_eq!(webhooks("bad_signature"), 1.0);
    assert_eq!(webhooks("stale"), 1.0);
    assert_eq!(webhooks("unrouted"), 1.0);
    assert_eq!(webhooks("malformed"), 1.0);
    assert_eq!(sample(&text, "zoom_webhooks_verified_total"), 5.0);
    assert_eq!(sample(&text, "zoom_outbox_depth"), 2.0);
    assert!(
        sample(&text, "zoom_outbox_oldest_age_seconds") >= 1.0,
        "{text}"
    );
    assert!(
        text.contains("\nzoom_deliveries_total{result=\"dead_letter\"} 0\n"),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "http_request_duration_seconds_count{method=\"POST\",route=\"/zoom/event\",status=\"200\"}"
        ),
        // Every 200: the routing wait in post_until_recorded may have added unrouted ones.
        webhooks("recorded") + webhooks("duplicate") + webhooks("unrouted")
    );

    // The host takes events again: the outbox drains and deliveries are counted.
    host.state.lock().unwrap().refuse_dispatch = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(&app).await;
        // Deliveries are counted before the writer removes their rows, so wait for both.
        if sample(&text, "zoom_deliveries_total{result=\"delivered\"}") == 2.0
            && sample(&text, "zoom_outbox_depth") == 0.0
        {
            assert_eq!(sample(&text, "zoom_outbox_oldest_age_seconds"), 0.0);
            assert!(sample(&text, "zoom_deliveries_total{result=\"retried\"}") >= 1.0);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn token_requests_zoom_api_calls_and_grpc_latency_are_counted() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = ConnectionId::generate().to_string();
    let refresh = zoom.issue_refresh_token(DEFAULT_CLIENT_ID);
    app.vars()
        .set(vars::SetRequest {
            vars: vec![
                var(&cid, "auth_type", "oauthDefault", false),
                var(&cid, "oauth_refresh_token", &refresh, true),
                var(
                    &cid,
                    "oauth_expiry",
                    &crate::fresh_tokens::a_minute_ago(),
                    false,
                ),
            ],
        })
        .await
        .unwrap();
    let function = |name: &str| pb::Value {
        function: Some(pb::Function {
            name: name.into(),
            data: cid.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    };
    for (name, args) in [
        ("get_user", vec![]),
        ("get_meeting", vec![zoom_integration::values::string("1")]),
    ] {
        app.integrations()
            .call(CallRequest {
                integration_id: zoom_id(),
                function: Some(function(name)),
                args,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let other = ConnectionId::generate().to_string();
    app.vars()
        .set(vars::SetRequest {
            vars: vec![
                var(&other, "auth_type", "oauthDefault", false),
                var(&other, "oauth_refresh_token", "refresh-unknown", true),
            ],
        })
        .await
        .unwrap();
    app.integrations()
        .test_connection(TestConnectionRequest {
            integration_id: zoom_id(),
            connection_id: other,
        })
        .await
        .unwrap();
    let _ = app
        .integrations()
        .test_connection(TestConnectionRequest {
            integration_id: zoom_id(),
            connection_id: "con_bad".into(),
        })
        .await
        .unwrap_err();

    let text = scrape(&app).await;
    let tokens = |result: &str| {
        sample(
            &text,
            &format!("zoom_token_requests_total{{grant=\"refresh_token\",result=\"{result}\"}}"),
        )
    };
    assert_eq!(tokens("ok"), 1.0, "{text}");
    assert_eq!(tokens("invalid_grant"), 1.0);
    // get_user answered 200; get_meeting 1 does not exist.
    assert_eq!(
        sample(&text, "zoom_api_calls_total{status=\"200\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(sample(&text, "zoom_api_calls_total{status=\"404\"}"), 1.0);
    let grpc = |method: &str, code: &str| {
        sample(
            &text,
            &format!(
                "grpc_request_duration_seconds_count{{code=\"{code}\",method=\"/autokitteh.integrations.v1.IntegrationsService/{method}\"}}"
            ),
        )
    };
    assert_eq!(grpc("Call", "Ok"), 2.0, "{text}");
    assert_eq!(grpc("TestConnection", "Ok"), 1.0);
    assert_eq!(grpc("TestConnection", "InvalidArgument"), 1.0);
    assert!(text.contains("grpc_request_duration_seconds_bucket{code=\"Ok\""));
}
