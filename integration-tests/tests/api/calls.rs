//! `IntegrationsService.Call`: workflows calling Zoom through a connection, against the
//! fake Zoom. Results are values; every failure is the call's error, not a gRPC failure.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use zoom_integration::connection::StatusCode as ConnStatus;
use zoom_integration::ids::ConnectionId;
use zoom_integration::proto::autokitteh::integrations::v1::{
    CallRequest, CallResponse, ConfigureRequest, GetRequest,
};
use zoom_integration::proto::autokitteh::values::v1 as pb;
use zoom_integration::proto::autokitteh::vars::v1 as vars;
use zoom_integration::values::{self, to_json};

use crate::connection_setup::app_with;
use crate::fake_host::FakeHost;
use crate::fake_zoom::*;
use crate::helpers::{TestApp, var, zoom_id};
use crate::webhooks::{ACCOUNT, SECRET, app_deauthorized_now, post_until_recorded};

/// A working default-app connection: its access token is one the fake Zoom issued.
pub(crate) async fn connected(app: &TestApp, zoom: &FakeZoom) -> String {
    let cid = ConnectionId::generate().to_string();
    let refresh = zoom.issue_refresh_token(DEFAULT_CLIENT_ID);
    // Expired a minute ago: the first call refreshes it, and the token keep-alive's pass at
    // start (which refreshes connections idle for days) leaves it alone, however late it runs.
    let expired = (chrono::Utc::now() - chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    app.vars()
        .set(vars::SetRequest {
            vars: vec![
                var(&cid, "auth_type", "oauthDefault", false),
                var(&cid, "oauth_refresh_token", &refresh, true),
                var(&cid, "oauth_expiry", &expired, false),
            ],
        })
        .await
        .unwrap();
    cid
}

pub(crate) fn function(name: &str, cid: &str) -> pb::Value {
    pb::Value {
        function: Some(pb::Function {
            name: name.into(),
            data: cid.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A struct value (what a dataclass becomes) with `fields`.
fn structure(fields: Vec<(&str, pb::Value)>) -> pb::Value {
    pb::Value {
        r#struct: Some(Box::new(pb::Struct {
            ctor: None,
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        })),
        ..Default::default()
    }
}

fn time(seconds: i64, nanos: i32) -> pb::Value {
    pb::Value {
        time: Some(pb::Time {
            v: Some(prost_types::Timestamp { seconds, nanos }),
        }),
        ..Default::default()
    }
}

fn float(v: f64) -> pb::Value {
    pb::Value {
        float: Some(pb::Float { v }),
        ..Default::default()
    }
}

fn text(s: &str) -> pb::Value {
    values::string(s)
}

pub(crate) async fn call(
    app: &TestApp,
    cid: &str,
    name: &str,
    args: Vec<pb::Value>,
    kwargs: Vec<(&str, pb::Value)>,
) -> CallResponse {
    app.integrations()
        .call(CallRequest {
            integration_id: zoom_id(),
            function: Some(function(name, cid)),
            args,
            kwargs: kwargs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<HashMap<_, _>>(),
        })
        .await
        .expect("Call answers, whatever Zoom says")
        .into_inner()
}

/// [`call`] by a caller that waits `timeout` (its `grpc-timeout`), which must be answered
/// before then, not cut off.
async fn call_within(
    app: &TestApp,
    cid: &str,
    name: &str,
    kwargs: Vec<(&str, pb::Value)>,
    timeout: Duration,
) -> CallResponse {
    let mut request = tonic::Request::new(CallRequest {
        integration_id: zoom_id(),
        function: Some(function(name, cid)),
        kwargs: kwargs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    });
    request.set_timeout(timeout);
    app.integrations()
        .call(request)
        .await
        .expect("answered before the deadline, not cut off by it")
        .into_inner()
}

fn ok(response: CallResponse) -> serde_json::Value {
    assert!(response.error.is_none(), "{:?}", response.error);
    to_json(&response.value.expect("a value"))
}

pub(crate) fn err(response: CallResponse) -> serde_json::Value {
    assert!(response.value.is_none());
    to_json(
        &response
            .error
            .expect("an error")
            .value
            .expect("an error value"),
    )
}

#[tokio::test]
async fn named_functions_manage_meetings_and_return_zoom_values_losslessly() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;

    let user = ok(call(&app, &cid, "get_user", vec![], vec![]).await);
    assert_eq!(user["display_name"], USER_DISPLAY_NAME);

    let created = call(
        &app,
        &cid,
        "create_meeting",
        vec![],
        vec![
            ("topic", text("Grüße, 会議 🎉")),
            ("type", values::integer(2)),
            ("duration", values::integer(30)),
        ],
    )
    .await;
    let created_value = created.value.clone().unwrap();
    let meeting = ok(created);
    assert_eq!(meeting["topic"], "Grüße, 会議 🎉");
    let id = meeting["id"].as_i64().unwrap();
    assert_eq!(id, 85_746_065_432);
    // The id is an integer value, not a float or text.
    let dict = created_value.dict.unwrap();
    let id_value = dict
        .items
        .iter()
        .find(|i| to_json(i.k.as_ref().unwrap()) == "id")
        .unwrap()
        .v
        .clone()
        .unwrap();
    assert_eq!(id_value.integer.map(|i| i.v), Some(85_746_065_432));

    let fetched = ok(call(&app, &cid, "get_meeting", vec![values::integer(id)], vec![]).await);
    assert_eq!(fetched["duration"], 30);
    let updated = ok(call(
        &app,
        &cid,
        "update_meeting",
        vec![text(&id.to_string())],
        // None leaves a field as it is, as for every optional argument (not null in the body).
        vec![("topic", text("Renamed")), ("duration", values::nothing())],
    )
    .await);
    assert!(updated.is_null(), "204 gives nothing");
    let fetched = ok(call(&app, &cid, "get_meeting", vec![values::integer(id)], vec![]).await);
    assert_eq!(fetched["duration"], 30, "{fetched}");
    let list = ok(call(
        &app,
        &cid,
        "list_meetings",
        vec![],
        vec![("page_size", values::integer(10))],
    )
    .await);
    assert_eq!(list["meetings"][0]["topic"], "Renamed");
    assert_eq!(list["page_size"], 10);
    // A float without a fraction is sent as the integer it is (not "10.0" or "8.5746065432e10").
    let list = ok(call(
        &app,
        &cid,
        "list_meetings",
        vec![],
        vec![("page_size", float(10.0))],
    )
    .await);
    assert_eq!(list["page_size"], 10);
    let fetched = ok(call(&app, &cid, "get_meeting", vec![float(id as f64)], vec![]).await);
    assert_eq!(fetched["id"], id);
    let recordings = ok(call(
        &app,
        &cid,
        "list_recordings",
        vec![],
        vec![("from", text("2026-11-01")), ("to", text("2026-11-22"))],
    )
    .await);
    assert_eq!(recordings["from"], "2026-11-01");
    // Time values become the text Zoom takes: dates for from/to, whole seconds elsewhere.
    let recordings = ok(call(
        &app,
        &cid,
        "list_recordings",
        vec![],
        vec![("from", time(1_762_000_000, 250_000_000))],
    )
    .await);
    assert_eq!(recordings["from"], "2025-11-01");
    let timed = ok(call(
        &app,
        &cid,
        "create_meeting",
        vec![],
        vec![(
            "meeting",
            values::dict(vec![(
                "start_time".into(),
                time(1_735_722_000, 123_456_789),
            )]),
        )],
    )
    .await);
    assert_eq!(timed["start_time"], "2025-01-01T09:00:00Z");
    // In a struct (a dataclass, say) too.
    let timed = ok(call(
        &app,
        &cid,
        "create_meeting",
        vec![],
        vec![(
            "meeting",
            structure(vec![("start_time", time(1_735_722_000, 123_456_789))]),
        )],
    )
    .await);
    assert_eq!(timed["start_time"], "2025-01-01T09:00:00Z");
    ok(call(
        &app,
        &cid,
        "delete_meeting",
        vec![values::integer(id)],
        vec![],
    )
    .await);

    let missing = call(&app, &cid, "get_meeting", vec![values::integer(id)], vec![]).await;
    let extra = missing.error.as_ref().unwrap().extra.clone();
    assert_eq!(
        err(missing),
        json!({ "status": 404, "code": 3001, "message": format!("Meeting does not exist: {id}.") })
    );
    assert_eq!(extra["code"], "3001");
    assert_eq!(
        zoom.token_requests_of("refresh_token"),
        1,
        "one refresh for every call"
    );
}

#[tokio::test]
async fn configure_gives_sessions_a_fresh_access_token_for_sdk_clients_but_never_the_refresh_token()
{
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    // Stored expired: the token handed out is refreshed first.
    let cid = connected(&app, &zoom).await;
    let configure = |connection_id: String| {
        let mut client = app.integrations();
        async move {
            client
                .configure(ConfigureRequest {
                    integration_id: zoom_id(),
                    connection_id,
                })
                .await
        }
    };
    let config = configure(cid.clone()).await.unwrap().into_inner().config;
    let token = &config["oauth_access_token"];
    assert!(zoom.access_token_is_live(token), "{config:?}");
    let expiry = chrono::DateTime::parse_from_rfc3339(&config["oauth_expiry"]).unwrap();
    assert!(expiry > chrono::Utc::now() + chrono::Duration::minutes(5));
    assert!(!config.contains_key("oauth_refresh_token"), "{config:?}");
    assert_eq!(config["auth_type"], "oauthDefault");
    assert_eq!(zoom.token_requests_of("refresh_token"), 1);

    // The next session gets the same token, without another refresh.
    let again = configure(cid).await.unwrap().into_inner().config;
    assert_eq!(&again["oauth_access_token"], token);
    assert_eq!(zoom.token_requests_of("refresh_token"), 1);

    // A connection not set up, or one Zoom refuses, is configured without a token.
    let new = ConnectionId::generate().to_string();
    let config = configure(new).await.unwrap().into_inner().config;
    assert!(config.is_empty(), "{config:?}");
    let dead = ConnectionId::generate().to_string();
    app.vars()
        .set(vars::SetRequest {
            vars: vec![
                var(&dead, "auth_type", "oauthDefault", false),
                var(&dead, "oauth_refresh_token", "never-issued", true),
            ],
        })
        .await
        .unwrap();
    let config = configure(dead).await.unwrap().into_inner().config;
    assert!(!config.contains_key("oauth_access_token"), "{config:?}");
}

#[tokio::test]
async fn configure_asks_for_a_token_despite_a_recorded_token_error_which_a_new_token_clears() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    // Recorded while the app's secret was wrong; the operator has fixed it since.
    app.vars()
        .set(vars::SetRequest {
            vars: vec![var(&cid, "token_error", "Zoom refused the app", false)],
        })
        .await
        .unwrap();
    let status = app.connection_status(&cid).await.unwrap();
    assert_eq!(status.code(), ConnStatus::Error);
    let config = app
        .integrations()
        .configure(ConfigureRequest {
            integration_id: zoom_id(),
            connection_id: cid.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .config;
    assert!(
        zoom.access_token_is_live(&config["oauth_access_token"]),
        "{config:?}"
    );
    let status = app.connection_status(&cid).await.unwrap();
    assert_eq!(status.code(), ConnStatus::Ok, "{}", status.message);
}

#[tokio::test]
async fn configure_gives_no_token_about_to_expire() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    zoom.state.lock().unwrap().oauth_expires_in = 30;
    let config = app
        .integrations()
        .configure(ConfigureRequest {
            integration_id: zoom_id(),
            connection_id: cid,
        })
        .await
        .unwrap()
        .into_inner()
        .config;
    assert!(!config.contains_key("oauth_access_token"), "{config:?}");
    assert_eq!(config["auth_type"], "oauthDefault");
}

#[tokio::test]
async fn configure_answers_without_a_token_when_zoom_is_too_slow_to_give_one() {
    let zoom = FakeZoom::start().await;
    let mut env = zoom.env();
    env.push(("REQUEST_TIMEOUT", "3".into()));
    let app = app_with(&zoom, env).await;
    let cid = connected(&app, &zoom).await;
    zoom.state.lock().unwrap().token_delay = Duration::from_secs(4);
    let configured = app
        .integrations()
        .configure(ConfigureRequest {
            integration_id: zoom_id(),
            connection_id: cid,
        })
        .await
        .expect("answered within the call's timeout")
        .into_inner();
    assert_eq!(configured.config["auth_type"], "oauthDefault");
    assert!(!configured.config.contains_key("oauth_access_token"));
    assert!(!configured.values.is_empty());
}

#[tokio::test]
async fn configure_hands_out_the_functions_as_values_that_call_through_their_connection() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    let configured = app
        .integrations()
        .configure(ConfigureRequest {
            integration_id: zoom_id(),
            connection_id: cid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // The module the descriptor describes, one function value each, as AutoKitteh's SDK
    // makes them: the integration executes them, the connection id is their data.
    let module = app
        .integrations()
        .get(GetRequest {
            integration_id: zoom_id(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .integration
        .unwrap()
        .module
        .unwrap();
    let mut names: Vec<_> = configured.values.keys().cloned().collect();
    names.sort();
    let mut described: Vec<_> = module.functions.keys().cloned().collect();
    described.sort();
    assert_eq!(names, described);
    assert!(names.contains(&"get_meeting".to_string()), "{names:?}");
    let meeting = module.functions["get_meeting"].input.first().unwrap();
    assert_eq!(
        (meeting.name.as_str(), meeting.optional),
        ("meeting_id", false)
    );
    for (name, value) in &configured.values {
        let f = value.function.as_ref().expect("a function value");
        assert_eq!(
            (f.name.as_str(), f.executor_id.as_str(), f.data.as_slice()),
            (name.as_str(), zoom_id().as_str(), cid.as_bytes())
        );
        assert!(f.desc.is_some());
    }

    // A host passes the value back to Call as it got it.
    let user = ok(app
        .integrations()
        .call(CallRequest {
            integration_id: zoom_id(),
            function: Some(configured.values["get_user"].clone()),
            args: vec![],
            kwargs: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner());
    assert_eq!(user["display_name"], USER_DISPLAY_NAME);

    // A `connection_id` keyword argument names the same connection, or the call is refused;
    // either way it is not sent to Zoom.
    let call_with = async |function: pb::Value, named: &str| {
        let mut kwargs = HashMap::new();
        kwargs.insert("connection_id".to_string(), text(named));
        kwargs.insert("topic".to_string(), text("Weekly sync"));
        app.integrations()
            .call(CallRequest {
                integration_id: zoom_id(),
                function: Some(function),
                args: vec![],
                kwargs,
            })
            .await
    };
    let meeting = ok(call_with(configured.values["create_meeting"].clone(), &cid)
        .await
        .unwrap()
        .into_inner());
    assert_eq!(meeting["topic"], "Weekly sync");
    assert!(meeting.get("connection_id").is_none(), "{meeting}");
    let other = zoom_integration::ids::ConnectionId::generate().to_string();
    let refused = call_with(configured.values["create_meeting"].clone(), &other)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // Configured without a connection (as AutoKitteh's modules may be): no data in the
    // values, and the connection comes with the call.
    let unbound = app
        .integrations()
        .configure(ConfigureRequest {
            integration_id: zoom_id(),
            connection_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(unbound.config.is_empty());
    assert_eq!(unbound.values.len(), configured.values.len());
    let f = unbound.values["create_meeting"].function.as_ref().unwrap();
    assert!(f.data.is_empty());
    let meeting = ok(call_with(unbound.values["create_meeting"].clone(), &cid)
        .await
        .unwrap()
        .into_inner());
    assert!(meeting.get("connection_id").is_none(), "{meeting}");
}

#[tokio::test]
async fn api_calls_any_path_with_query_and_body_and_returns_status_and_body() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    let answer = ok(call(
        &app,
        &cid,
        "api",
        vec![text("get"), text("/users/me")],
        vec![("query", values::dict(vec![("fields".into(), text("id"))]))],
    )
    .await);
    assert_eq!(answer["status"], 200);
    assert_eq!(answer["body"]["id"], USER_ID);
    let answer = ok(call(
        &app,
        &cid,
        "api",
        vec![
            text("POST"),
            text("/users/me/meetings"),
            values::dict(vec![]),
            values::dict(vec![("topic".into(), text("via api"))]),
        ],
        vec![],
    )
    .await);
    assert_eq!(answer["status"], 201);
    assert_eq!(answer["body"]["topic"], "via api");
    assert!(
        zoom.state
            .lock()
            .unwrap()
            .api_requests
            .iter()
            .any(|r| r == "GET /v2/users/me?fields=id")
    );
}

#[tokio::test]
async fn a_rate_limit_with_retry_after_one_second_is_waited_out_and_succeeds() {
    rate_limit_waited_out("1").await;
}

#[tokio::test]
async fn a_per_second_rate_limit_without_retry_after_is_retried_a_second_later() {
    // An empty Retry-After stands for none at all.
    rate_limit_waited_out("").await;
}

/// A 429 with `retry_after` is waited out for a second and the call then succeeds.
async fn rate_limit_waited_out(retry_after: &str) {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    zoom.rate_limit_next(retry_after, "QPS");
    let started = Instant::now();
    let user = ok(call(&app, &cid, "get_user", vec![], vec![]).await);
    assert_eq!(user["id"], USER_ID);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited a second"
    );
    assert_eq!(zoom.state.lock().unwrap().api_requests.len(), 2);
}

#[tokio::test]
async fn a_rate_limit_longer_than_the_callers_deadline_allows_is_reported_at_once() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    // Retry-After 5 s plus a second for the retry and one for its answer do not fit in 2.5 s.
    zoom.rate_limit_next("5", "QPS");
    let started = Instant::now();
    let response = call_within(&app, &cid, "get_user", vec![], Duration::from_millis(2500)).await;
    assert!(started.elapsed() < Duration::from_secs(4), "did not wait");
    let error = err(response);
    assert_eq!(error["status"], 429);
    assert!(
        error["message"].as_str().unwrap().contains("rate limit"),
        "Zoom's own message: {error}"
    );
    assert_eq!(zoom.state.lock().unwrap().api_requests.len(), 1, "no retry");
}

#[tokio::test]
async fn a_call_zoom_does_not_answer_is_answered_before_the_callers_deadline_saying_if_it_may_have_run()
 {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    ok(call(&app, &cid, "get_user", vec![], vec![]).await);
    // Zoom takes the requests and answers none of them before the caller's 4 s are up.
    zoom.state.lock().unwrap().api_delay = Duration::from_secs(20);
    for (name, kwargs, may_have_run) in [
        ("get_user", vec![], false),
        ("create_meeting", vec![("topic", text("maybe"))], true),
    ] {
        let started = Instant::now();
        let error = err(call_within(&app, &cid, name, kwargs, Duration::from_secs(4)).await);
        assert!(started.elapsed() < Duration::from_secs(4), "{name}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("did not answer in time"),
            "{name}: {error}"
        );
        assert_eq!(
            message.contains("may have carried the request out"),
            may_have_run,
            "{name}: {error}"
        );
    }
}

#[tokio::test]
async fn a_retry_zoom_is_slow_to_answer_gives_the_rate_limit_before_the_callers_deadline() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    zoom.rate_limit_next("1", "QPS");
    zoom.state.lock().unwrap().api_delay = Duration::from_secs(10);
    let started = Instant::now();
    // The retry waits a second and needs two more before the deadline: 6 s leaves the first
    // answer (after the token's refresh) up to 3 s on a busy machine.
    let response = call_within(&app, &cid, "get_user", vec![], Duration::from_secs(6)).await;
    let took = started.elapsed();
    assert!(
        (Duration::from_millis(4500)..Duration::from_millis(5900)).contains(&took),
        "gave the retry until a second before the deadline: {took:?}"
    );
    assert_eq!(err(response)["status"], 429);
    assert_eq!(
        zoom.state.lock().unwrap().api_requests.len(),
        2,
        "one retry"
    );

    // A retried POST that Zoom has not answered may have been done: not a rate limit.
    zoom.rate_limit_next("1", "QPS");
    let kwargs = vec![("topic", text("once"))];
    let response = call_within(&app, &cid, "create_meeting", kwargs, Duration::from_secs(6)).await;
    let error = err(response);
    assert!(error.get("status").is_none(), "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("did not answer in time"),
        "{error}"
    );
}

#[tokio::test]
async fn a_validation_failure_tells_the_workflow_which_field_zoom_refused() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    let refusal = json!({
        "code": 300,
        "message": "Validation Failed.",
        "errors": [{ "field": "settings.jbh_time", "message": "Invalid field." }],
    });
    zoom.state.lock().unwrap().canned_answers.push_back((
        axum::http::StatusCode::BAD_REQUEST,
        "application/json",
        refusal.to_string(),
    ));
    let error = err(call(
        &app,
        &cid,
        "create_meeting",
        vec![],
        vec![("topic", text("x"))],
    )
    .await);
    assert_eq!(
        error,
        json!({
            "status": 400,
            "code": 300,
            "message": "Validation Failed.",
            "errors": [{ "field": "settings.jbh_time", "message": "Invalid field." }],
        })
    );
}

#[tokio::test]
async fn zooms_server_errors_reach_the_workflow_with_their_status_code_and_message() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    {
        let mut state = zoom.state.lock().unwrap();
        state.canned_answers.push_back((
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            json!({"code": 5301, "message": "Meeting service is busy. Try again later."})
                .to_string(),
        ));
        state.canned_answers.push_back((
            axum::http::StatusCode::BAD_GATEWAY,
            "text/html",
            "<html><body>502 Bad Gateway</body></html>".into(),
        ));
    }
    let error = err(call(&app, &cid, "get_meeting", vec![text("85746065432")], vec![]).await);
    assert_eq!(error["status"], 503);
    assert_eq!(error["code"], 5301);
    assert_eq!(
        error["message"],
        "Meeting service is busy. Try again later."
    );
    let error = err(call(&app, &cid, "get_meeting", vec![text("85746065432")], vec![]).await);
    assert_eq!(error["status"], 502);
    assert_eq!(
        error["message"],
        "Zoom answered HTTP 502 with something that is not JSON"
    );
}

#[tokio::test]
async fn a_json_answer_too_deep_to_be_a_value_is_an_error_and_not_passed_on_as_text() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
    zoom.state.lock().unwrap().canned_answers.push_back((
        axum::http::StatusCode::OK,
        "application/json",
        deep,
    ));
    let error = err(call(
        &app,
        &cid,
        "api",
        vec![text("GET"), text("/users/me")],
        vec![],
    )
    .await);
    assert_eq!(error["status"], 200);
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("JSON that cannot be passed on as a value: nested too deeply"),
        "{message}"
    );
}

#[tokio::test]
async fn api_query_leaves_out_none_and_sends_numbers_and_booleans_as_their_text() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    let none = pb::Value {
        nothing: Some(pb::Nothing {}),
        ..Default::default()
    };
    let answer = ok(call(
        &app,
        &cid,
        "api",
        vec![text("GET"), text("/users/me")],
        vec![(
            "query",
            values::dict(vec![
                ("fields".into(), text("id")),
                ("next_page_token".into(), none),
                ("page_size".into(), values::integer(30)),
                (
                    "verbose".into(),
                    pb::Value {
                        boolean: Some(pb::Boolean { v: true }),
                        ..Default::default()
                    },
                ),
            ]),
        )],
    )
    .await);
    assert_eq!(answer["status"], 200);
    assert_eq!(
        zoom.state.lock().unwrap().api_requests,
        ["GET /v2/users/me?fields=id&page_size=30&verbose=true"]
    );
}

#[tokio::test]
async fn a_daily_limit_is_reported_at_once() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    // A wait short enough to be retried, were it not the daily limit.
    zoom.rate_limit_next("5", "Daily-limit");
    let started = Instant::now();
    let error = err(call(&app, &cid, "get_user", vec![], vec![]).await);
    assert!(started.elapsed() < Duration::from_secs(4), "did not wait");
    assert_eq!(error["status"], 429);
    assert_eq!(error["code"], 429);
    assert_eq!(zoom.state.lock().unwrap().api_requests.len(), 1, "no retry");
}

#[tokio::test]
async fn paths_leaving_the_api_are_refused_before_anything_is_sent() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    for path in [
        "/users/../../oauth/token",
        "/users/%2e%2e/x",
        "https://evil.example/users/me",
        "//evil.example/users",
        "users/me",
    ] {
        let error = err(call(&app, &cid, "api", vec![text("GET"), text(path)], vec![]).await);
        assert!(
            error["message"].as_str().unwrap().contains("is refused"),
            "{path}: {error}"
        );
    }
    // A user id cannot climb out of its segment either.
    let error = err(call(&app, &cid, "get_user", vec![text("..")], vec![]).await);
    assert!(error["message"].as_str().unwrap().contains("is refused"));
    assert!(zoom.state.lock().unwrap().api_requests.is_empty());
    assert!(
        zoom.token_requests().is_empty(),
        "refused before getting a token"
    );
}

#[tokio::test]
async fn bad_calls_are_errors_of_the_call_not_of_the_transport() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    type Case<'a> = (&'a str, Vec<pb::Value>, Vec<(&'a str, pb::Value)>, &'a str);
    let cases: Vec<Case> = vec![
        ("no_such_function", vec![], vec![], "unknown function"),
        ("get_meeting", vec![], vec![], "meeting_id is required"),
        (
            "list_meetings",
            vec![],
            vec![("user_id", text(""))],
            "user_id must not be empty",
        ),
        (
            "get_user",
            vec![],
            vec![("colour", text("red"))],
            "unexpected argument colour",
        ),
        (
            "api",
            vec![text("TRACE"), text("/users/me")],
            vec![],
            "method must be",
        ),
        (
            "api",
            vec![text("GET"), text("/x"), text("q")],
            vec![],
            "query must be a dict",
        ),
        (
            "api",
            vec![text("GET"), text("/x")],
            vec![(
                "query",
                values::dict(vec![("ids".into(), values::dict(vec![]))]),
            )],
            "query parameter \"ids\" must be text, a number or a boolean",
        ),
        (
            "list_meetings",
            vec![],
            vec![("page_size", float(f64::NAN))],
            "page_size holds a number that is not finite",
        ),
        (
            "create_meeting",
            vec![],
            vec![(
                "settings",
                values::dict(vec![("x".into(), float(f64::INFINITY))]),
            )],
            "settings holds a number that is not finite",
        ),
        (
            "create_meeting",
            vec![],
            vec![("settings", structure(vec![("x", float(f64::NAN))]))],
            "settings holds a number that is not finite",
        ),
    ];
    for (name, args, kwargs, words) in cases {
        let error = err(call(&app, &cid, name, args, kwargs).await);
        assert!(
            error["message"].as_str().unwrap().contains(words),
            "{name}: {error}"
        );
    }
    assert!(
        zoom.state.lock().unwrap().api_requests.is_empty(),
        "nothing was sent"
    );
    // A connection that is not set up.
    let other = ConnectionId::generate().to_string();
    let error = err(call(&app, &other, "get_user", vec![], vec![]).await);
    assert!(
        error["message"].as_str().unwrap().contains("not set up"),
        "{error}"
    );
    // A connection_id keyword of nothing is as if not given; of another kind, it is refused.
    let response = call(
        &app,
        &cid,
        "get_user",
        vec![],
        vec![("connection_id", values::nothing())],
    )
    .await;
    assert_eq!(ok(response)["display_name"], USER_DISPLAY_NAME);
    let status = app
        .integrations()
        .call(CallRequest {
            integration_id: zoom_id(),
            function: Some(function("get_user", &cid)),
            kwargs: [("connection_id".to_string(), values::integer(1))].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("must be text"), "{status:?}");
    // Without a connection at all, the request itself is invalid.
    let status = app
        .integrations()
        .call(CallRequest {
            integration_id: zoom_id(),
            function: Some(function("get_user", "")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_token_zoom_rejects_before_its_expiry_is_refreshed_and_the_call_sent_again() {
    token_rejected_before_its_expiry(false).await;
}

#[tokio::test]
async fn a_token_rejected_with_a_page_that_is_not_json_is_refreshed_and_the_call_sent_again_too() {
    token_rejected_before_its_expiry(true).await;
}

async fn token_rejected_before_its_expiry(as_html: bool) {
    let zoom = FakeZoom::start().await;
    zoom.state.lock().unwrap().unauthorized_as_html = as_html;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    ok(call(&app, &cid, "get_user", vec![], vec![]).await);
    let refreshes = || {
        zoom.state
            .lock()
            .unwrap()
            .token_requests
            .iter()
            .filter(|r| r.grant_type == "refresh_token")
            .count()
    };
    assert_eq!(refreshes(), 1);

    // Zoom stops taking the access token (revoked) while its stored expiry is an hour away;
    // the refresh token still works. Zoom did nothing with the request it answered 401, so
    // even a POST is sent again, once, with the new token.
    zoom.revoke_access_tokens();
    let meeting = ok(call(
        &app,
        &cid,
        "create_meeting",
        vec![],
        vec![("topic", text("Sent twice, made once"))],
    )
    .await);
    assert_eq!(meeting["topic"], "Sent twice, made once");
    assert_eq!(
        refreshes(),
        2,
        "the rejected token was refreshed, not read back and reused"
    );
    let posts = zoom
        .state
        .lock()
        .unwrap()
        .api_requests
        .iter()
        .filter(|r| r.starts_with("POST "))
        .count();
    assert_eq!(posts, 2, "the 401 and the one sent again");
    let list = ok(call(&app, &cid, "list_meetings", vec![], vec![]).await);
    assert_eq!(list["total_records"], 1, "{list}");
    ok(call(&app, &cid, "get_user", vec![], vec![]).await);
    assert_eq!(refreshes(), 2, "the new token is used until it expires");
}

#[tokio::test]
async fn a_call_waiting_for_another_call_s_slow_token_renewal_is_answered_before_its_deadline() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    ok(call(&app, &cid, "get_user", vec![], vec![]).await);
    // The token is revoked; the first call to hear it renews it, and Zoom's answer to that
    // refresh takes 8 s.
    zoom.revoke_access_tokens();
    zoom.state.lock().unwrap().refresh_answer_delay = Duration::from_secs(8);
    let first = tokio::spawn({
        let (app_grpc, cid) = (app.integrations(), cid.clone());
        async move {
            let mut client = app_grpc;
            client
                .call(CallRequest {
                    integration_id: zoom_id(),
                    function: Some(function("get_user", &cid)),
                    ..Default::default()
                })
                .await
        }
    });
    crate::helpers::eventually("the first call's refresh reached Zoom", || {
        zoom.token_requests_of("refresh_token") == 2
    })
    .await;
    // A caller with 4 s is told in time, not CANCELLED after waiting for that refresh.
    let started = Instant::now();
    let error = err(call_within(&app, &cid, "get_user", vec![], Duration::from_secs(4)).await);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("token did not come in time"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    let first = first.await.unwrap().unwrap().into_inner();
    assert!(first.error.is_none(), "{:?}", first.error);
}

#[tokio::test]
async fn a_token_endpoint_limiting_or_down_makes_a_call_error_that_says_to_try_again() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    // Both need a refresh first (expired a minute ago).
    let (limited, down) = (connected(&app, &zoom).await, connected(&app, &zoom).await);
    zoom.state.lock().unwrap().token_rate_limited = true;
    let error = err(call(&app, &limited, "get_user", vec![], vec![]).await);
    assert_eq!(error["status"], 429, "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("try again"),
        "{error}"
    );
    zoom.state.lock().unwrap().token_rate_limited = false;
    zoom.state.lock().unwrap().token_unavailable = true;
    let error = err(call(&app, &down, "get_user", vec![], vec![]).await);
    assert!(
        error.get("status").is_none(),
        "Zoom's API did not answer: {error}"
    );
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("could not issue the connection's token") && message.contains("try again"),
        "{error}"
    );
    assert!(zoom.state.lock().unwrap().api_requests.is_empty());
}

#[tokio::test]
async fn an_endpoint_answering_401_to_every_token_costs_one_refresh_not_two_per_call() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    ok(call(&app, &cid, "get_user", vec![], vec![]).await);
    assert_eq!(zoom.token_requests_of("refresh_token"), 1);
    // One endpoint answers 401 whatever the token (Zoom does, for some endpoints and apps).
    let unauthorized = r#"{"code":124,"message":"Invalid access token."}"#.to_string();
    for _ in 0..6 {
        zoom.state.lock().unwrap().canned_answers.push_back((
            axum::http::StatusCode::UNAUTHORIZED,
            "application/json",
            unauthorized.clone(),
        ));
    }
    for _ in 0..3 {
        let error = err(call(&app, &cid, "get_user", vec![], vec![]).await);
        assert_eq!(error["status"], 401, "{error}");
    }
    // The first 401 renews the token once; a 401 to the token just obtained is about the
    // request, and that token is kept for the calls after it.
    assert_eq!(
        zoom.token_requests_of("refresh_token"),
        2,
        "{:?}",
        zoom.state.lock().unwrap().api_requests
    );
    assert_eq!(zoom.state.lock().unwrap().api_requests.len(), 1 + 2 + 1 + 1);
}

/// A call on `cid` fails with `words` in its message, and Zoom's API has seen only the one
/// call made before (the cached token was not sent again).
async fn refused_without_reaching_zoom(app: &TestApp, zoom: &FakeZoom, cid: &str, words: &str) {
    let refused = err(call(app, cid, "get_user", vec![], vec![]).await);
    assert!(
        refused["message"].as_str().unwrap().contains(words),
        "{refused}"
    );
    assert_eq!(
        zoom.state.lock().unwrap().api_requests.len(),
        1,
        "the cached token never went to Zoom again"
    );
}

#[tokio::test]
async fn a_connection_marked_deauthorized_through_its_variables_stops_using_its_cached_token_at_once()
 {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    ok(call(&app, &cid, "get_user", vec![], vec![]).await);

    // The app is removed in Zoom, and the host engine marks the connection.
    zoom.revoke_access_tokens();
    app.vars()
        .set(vars::SetRequest {
            vars: vec![var(
                &cid,
                "connection_error",
                "deauthorized in Zoom: reconnect",
                false,
            )],
        })
        .await
        .unwrap();
    // The embedded host announces the change to the service's other parts on its own time.
    tokio::time::sleep(Duration::from_millis(100)).await;
    refused_without_reaching_zoom(&app, &zoom, &cid, "deauthorized in Zoom: reconnect").await;
}

#[tokio::test]
async fn a_connection_whose_variables_are_deleted_stops_using_its_cached_token_at_once() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    ok(call(&app, &cid, "get_user", vec![], vec![]).await);
    app.vars()
        .delete(vars::DeleteRequest {
            scope_id: cid.clone(),
            names: vec![],
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    refused_without_reaching_zoom(&app, &zoom, &cid, "not set up").await;
}

#[tokio::test]
async fn app_deauthorized_stops_the_cached_token_being_used_on_a_remote_host_too() {
    let zoom = FakeZoom::start().await;
    let host = FakeHost::start().await;
    let cid = ConnectionId::generate().to_string();
    let refresh = zoom.issue_refresh_token(DEFAULT_CLIENT_ID);
    for v in [
        var(&cid, "auth_type", "oauthDefault", false),
        var(&cid, "account_id", ACCOUNT, false),
        var(&cid, "oauth_refresh_token", &refresh, true),
        var(
            &cid,
            "oauth_expiry",
            &crate::fresh_tokens::a_minute_ago(),
            false,
        ),
    ] {
        host.put(v);
    }
    let mut env = zoom.env();
    env.push(("HOST_ENGINE_URL", host.url()));
    env.push(("ZOOM_SECRET_TOKEN", SECRET.into()));
    let app = app_with(&zoom, env).await;
    ok(call(&app, &cid, "get_user", vec![], vec![]).await);

    zoom.revoke_access_tokens();
    let body = app_deauthorized_now();
    post_until_recorded(&app.http_client, &app.url("/zoom/event"), SECRET, &body).await;
    host.wait_for_dispatched(1, Duration::from_secs(30)).await;
    refused_without_reaching_zoom(&app, &zoom, &cid, "deauthorized in Zoom: reconnect").await;
}

#[tokio::test]
async fn a_call_through_a_connection_the_remote_host_no_longer_knows_says_it_does_not_exist() {
    let zoom = FakeZoom::start().await;
    let host = crate::fake_host::FakeHost::start().await;
    let app = crate::connection_setup::app_with_remote_host(&zoom, &host).await;
    let cid = ConnectionId::generate().to_string();
    host.state.lock().unwrap().unknown.push(cid.clone());

    let error = err(call(&app, &cid, "get_user", vec![], vec![]).await);
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("does not exist"), "{error}");
    assert!(!message.contains("try again"), "{error}");

    // While the host is down, the call is worth retrying, and says so.
    host.stop();
    let error = err(call(&app, &cid, "get_user", vec![], vec![]).await);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("try again later"),
        "{error}"
    );
}

#[tokio::test]
async fn a_page_of_several_mebibytes_is_passed_on_and_one_past_the_limit_asks_for_smaller_pages() {
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    // 300 meetings with recording files: past 1 MiB, and far under the number of values a
    // value may hold.
    let file = json!({ "id": "f".repeat(36), "file_type": "MP4", "download_url": format!("https://zoom.us/rec/download/{}", "x".repeat(2_000)) });
    let meetings: Vec<_> = (0..300)
        .map(|n| json!({ "id": n, "topic": "Grüße", "recording_files": [file, file, file] }))
        .collect();
    let page = json!({ "page_size": 300, "meetings": meetings }).to_string();
    assert!(page.len() > 1 << 20, "{}", page.len());
    let big = json!({ "blob": "y".repeat(5 << 20) }).to_string();
    zoom.state.lock().unwrap().canned_answers.extend([
        (axum::http::StatusCode::OK, "application/json", page),
        (axum::http::StatusCode::OK, "application/json", big),
    ]);

    let listed = ok(call(&app, &cid, "list_recordings", vec![], vec![]).await);
    assert_eq!(listed["meetings"].as_array().unwrap().len(), 300);
    assert_eq!(
        listed["meetings"][299]["recording_files"][2]["file_type"],
        "MP4"
    );

    let refused = err(call(&app, &cid, "list_recordings", vec![], vec![]).await);
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains("larger than 4 MiB"), "{refused}");
    assert!(message.contains("page_size"), "{refused}");
}

#[tokio::test]
async fn a_call_request_past_256_kib_is_refused_before_it_is_decoded_and_one_under_it_goes_through()
{
    let zoom = FakeZoom::start().await;
    let app = app_with(&zoom, zoom.env()).await;
    let cid = connected(&app, &zoom).await;
    let meeting = |topic: String| {
        vec![(
            "meeting",
            values::dict(vec![("topic".into(), text(&topic))]),
        )]
    };
    let created = ok(call(
        &app,
        &cid,
        "create_meeting",
        vec![],
        meeting("t".repeat(200 << 10)),
    )
    .await);
    assert_eq!(created["topic"].as_str().unwrap().len(), 200 << 10);

    // 2 bytes on the wire per empty value: 150,000 of them would be ~90 MB decoded.
    let extra = values::integer(0);
    let list = pb::Value {
        list: Some(pb::List {
            vs: vec![pb::Value::default(); 150_000],
        }),
        ..Default::default()
    };
    let status = app
        .integrations()
        .call(CallRequest {
            integration_id: zoom_id(),
            function: Some(function("get_user", &cid)),
            args: vec![list, extra],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert_eq!(
        zoom.state.lock().unwrap().api_requests.len(),
        1,
        "only the first call reached Zoom"
    );
}
