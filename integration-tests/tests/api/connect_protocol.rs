//! The gRPC port answers the Connect protocol's unary calls (`application/proto` over
//! HTTP/1.1), as AutoKitteh's own clients make them by default.

use prost::Message;
use zoom_integration::ids::ConnectionId;
use zoom_integration::proto::autokitteh::events::v1 as events;
use zoom_integration::proto::autokitteh::integrations::v1 as integrations;
use zoom_integration::proto::autokitteh::vars::v1 as vars;

use crate::helpers::{TestApp, spawn_app, var, zoom_id};

/// A Connect unary call of `method` (`package.Service/Method`) with `message`.
async fn connect_call(
    app: &TestApp,
    method: &str,
    message: &impl Message,
) -> (reqwest::StatusCode, String, Vec<u8>) {
    let response = app
        .http_client
        .post(format!("http://{}/{method}", app.grpc))
        .header("content-type", "application/proto")
        .header("connect-protocol-version", "1")
        .header("connect-timeout-ms", "5000")
        .body(message.encode_to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (
        status,
        content_type,
        response.bytes().await.unwrap().to_vec(),
    )
}

#[tokio::test]
async fn connect_clients_get_the_same_answers_as_grpc_clients() {
    let app = spawn_app().await;
    let cid = ConnectionId::generate().to_string();
    app.vars()
        .set(vars::SetRequest {
            vars: vec![var(&cid, "account_id", "acc-1", false)],
        })
        .await
        .unwrap();

    let (status, content_type, body) = connect_call(
        &app,
        "autokitteh.vars.v1.VarsService/Get",
        &vars::GetRequest {
            scope_id: cid.clone(),
            names: vec!["account_id".into()],
        },
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/proto");
    let got = vars::GetResponse::decode(body.as_slice()).unwrap();
    assert_eq!(got.vars.len(), 1);
    assert_eq!(got.vars[0].value, "acc-1");

    let (status, _, body) = connect_call(
        &app,
        "autokitteh.integrations.v1.IntegrationsService/Get",
        &integrations::GetRequest {
            name: "zoom".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(status, 200);
    let got = integrations::GetResponse::decode(body.as_slice()).unwrap();
    assert_eq!(got.integration.unwrap().unique_name, "zoom");

    // An answer with no fields is an empty body, still a success.
    let (status, _, body) = connect_call(
        &app,
        "autokitteh.vars.v1.VarsService/Delete",
        &vars::DeleteRequest {
            scope_id: cid.clone(),
            names: vec!["account_id".into()],
        },
    )
    .await;
    assert_eq!((status.as_u16(), body.len()), (200, 0));
}

#[tokio::test]
async fn connect_errors_carry_connects_code_and_status_and_unsupported_forms_are_refused() {
    let app = spawn_app().await;
    let (status, content_type, body) = connect_call(
        &app,
        "autokitteh.events.v1.EventsService/Get",
        &events::GetRequest {
            event_id: "evt_../../etc".into(),
            json_values: false,
        },
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(content_type, "application/json");
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["code"], "invalid_argument");
    assert!(
        error["message"].as_str().unwrap().contains("malformed"),
        "{error}"
    );

    let (status, _, body) = connect_call(
        &app,
        "autokitteh.events.v1.EventsService/Get",
        &events::GetRequest {
            event_id: "evt_01jf3xabcdefghjkmnpqrstvwx".into(),
            json_values: false,
        },
    )
    .await;
    assert_eq!(status, 404);
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["code"], "not_found");

    // JSON messages and compressed bodies are not served, and say so.
    for (content_type, encoding) in [
        ("application/json", None),
        ("application/proto", Some("gzip")),
    ] {
        let mut request = app
            .http_client
            .post(format!(
                "http://{}/autokitteh.vars.v1.VarsService/Get",
                app.grpc
            ))
            .header("content-type", content_type)
            .header("connect-protocol-version", "1")
            .body("{}");
        if let Some(encoding) = encoding {
            request = request.header("content-encoding", encoding);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 415, "{content_type} {encoding:?}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["code"], "unimplemented");
    }
    // Nor are GET calls, which carry their message in the query and no content type (the
    // `connect` parameter is optional).
    for query in [
        "connect=v1&encoding=proto&message=",
        "encoding=proto&message=",
    ] {
        let response = app
            .http_client
            .get(format!(
                "http://{}/autokitteh.vars.v1.VarsService/Get?{query}",
                app.grpc
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 415, "{query}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["code"], "unimplemented");
        assert!(
            error["message"].as_str().unwrap().contains("POST"),
            "{error}"
        );
    }

    // A request past the limit is refused before it is decoded.
    let response = app
        .http_client
        .post(format!(
            "http://{}/autokitteh.vars.v1.VarsService/Get",
            app.grpc
        ))
        .header("content-type", "application/proto")
        .body(vec![
            0u8;
            zoom_integration::grpc::connect::MAX_CONNECT_REQUEST_BYTES
                + 1
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let error: serde_json::Value = response.json().await.unwrap();
    assert_eq!(error["code"], "resource_exhausted");
    // IntegrationsService's smaller limit holds before its body is read whole.
    let response = app
        .http_client
        .post(format!(
            "http://{}/autokitteh.integrations.v1.IntegrationsService/Call",
            app.grpc
        ))
        .header("content-type", "application/proto")
        .body(vec![
            0u8;
            zoom_integration::grpc::MAX_CALL_REQUEST_BYTES + 1
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let error: serde_json::Value = response.json().await.unwrap();
    assert!(
        error["message"].as_str().unwrap().contains("262144 bytes"),
        "{error}"
    );
}

#[tokio::test]
async fn browsers_are_refused_on_the_grpc_port_whatever_they_send() {
    let app = spawn_app().await;
    let url = format!(
        "http://{}/autokitteh.vars.v1.VarsService/FindActiveConnectionIDs",
        app.grpc
    );
    let body = vars::FindActiveConnectionIDsRequest {
        integration_id: zoom_id(),
        name: "auth_type".into(),
        value: String::new(),
    }
    .encode_to_vec();
    // A page's fetch, same-origin by DNS rebinding or not, as Connect and as gRPC-ish bytes.
    for (name, value) in [
        ("origin", "http://evil.example:9981"),
        ("sec-fetch-site", "same-origin"),
        ("sec-fetch-mode", "cors"),
    ] {
        let refused = app
            .http_client
            .post(&url)
            .header("content-type", "application/proto")
            .header(name, value)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 403, "{name}");
        let error: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(error["code"], "permission_denied");
        let framed = vec![0u8; 5];
        let refused = app
            .http_client
            .post(&url)
            .header("content-type", "text/plain")
            .header(name, value)
            .body(framed)
            .send()
            .await
            .unwrap();
        assert_eq!(
            refused.headers().get("grpc-status").unwrap(),
            &(tonic::Code::PermissionDenied as i32).to_string(),
            "{name}"
        );
    }
    // The same call from a client that is not a browser is answered.
    let answered = app
        .http_client
        .post(&url)
        .header("content-type", "application/proto")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
}

#[tokio::test]
async fn connect_callers_past_the_limit_or_their_deadline_get_connect_errors() {
    let zoom = crate::fake_zoom::FakeZoom::start().await;
    let mut env = zoom.env();
    env.push(("MAX_CONCURRENT_REQUESTS", "1".into()));
    let app = crate::connection_setup::app_with(&zoom, env).await;
    let cid = crate::calls::connected(&app, &zoom).await;
    // A call held inside the service until its 3-second deadline: a refresh whose answer
    // takes 5 seconds to come back.
    zoom.state.lock().unwrap().refresh_answer_delay = std::time::Duration::from_secs(5);
    let test = integrations::TestConnectionRequest {
        integration_id: zoom_id(),
        connection_id: cid,
    };
    let held = {
        let (app_http, grpc, test) = (app.http_client.clone(), app.grpc, test.clone());
        tokio::spawn(async move {
            app_http
                .post(format!(
                    "http://{grpc}/autokitteh.integrations.v1.IntegrationsService/TestConnection"
                ))
                .header("content-type", "application/proto")
                .header("connect-timeout-ms", "3000")
                .body(test.encode_to_vec())
                .send()
                .await
                .unwrap()
        })
    };
    crate::helpers::eventually("the held call's refresh reached Zoom", || {
        zoom.token_requests_of("refresh_token") == 1
    })
    .await;
    let (status, content_type, body) = connect_call(
        &app,
        "autokitteh.integrations.v1.IntegrationsService/TestConnection",
        &test,
    )
    .await;
    assert_eq!(
        (status.as_u16(), content_type.as_str()),
        (429, "application/json")
    );
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["code"], "resource_exhausted");

    // The held call's own deadline (connect-timeout-ms) ends it, in Connect's terms.
    let held = held.await.unwrap();
    assert_eq!(held.status(), 499);
    let error: serde_json::Value = held.json().await.unwrap();
    assert_eq!(error["code"], "canceled");
}
