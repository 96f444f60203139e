//! `POST /zoom/event` end to end: signed Zoom bodies in, events out at the host engine (the
//! embedded host read back over gRPC, or the fake remote host), and every refusal.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value as Json, json};
use sha2::Sha256;
use zoom_integration::connection::StatusCode;
use zoom_integration::ids::ConnectionId;
use zoom_integration::proto::autokitteh::events::v1 as events;
use zoom_integration::proto::autokitteh::events::v1::Event;
use zoom_integration::proto::autokitteh::values::v1 as values;
use zoom_integration::proto::autokitteh::vars::v1 as vars;

use crate::fake_host::FakeHost;
use crate::helpers::{TestApp, spawn_app_in, spawn_app_with, var};

/// The default app's webhook secret token in these tests.
pub const SECRET: &str = "zoom-default-webhook-secret-token";
/// A private app's webhook secret token.
pub const PRIVATE_SECRET: &str = "private-app-secret-token-ÄÖ";
/// The account of most samples.
pub const ACCOUNT: &str = "PX5yQAcnT5azdXF5ma2Apw";
const TRACKING_ID: &str = "v=2.0;clid=aw1;rid=WEB_1234";

/// `v0=` + hex HMAC-SHA256, computed here independently of the service.
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Posts `body` to `url` signed with `secret` at `timestamp`; returns status and JSON answer.
pub async fn post_to(
    client: &reqwest::Client,
    url: &str,
    secret: &str,
    timestamp: u64,
    body: &[u8],
) -> (u16, Json) {
    let ts = timestamp.to_string();
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-zm-request-timestamp", &ts)
        .header("x-zm-signature", sign(secret, &ts, body))
        .header("x-zm-trackingid", TRACKING_ID)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Json::Null))
}

/// Posts `body` signed with the default secret, now.
async fn post(app: &TestApp, body: &[u8]) -> (u16, Json) {
    post_to(
        &app.http_client,
        &app.url("/zoom/event"),
        SECRET,
        now(),
        body,
    )
    .await
}

/// Posts until the service routes it (routing follows connection changes within moments;
/// unrouted webhooks are dropped, so re-sending is harmless).
pub async fn post_until_recorded(client: &reqwest::Client, url: &str, secret: &str, body: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, answer) = post_to(client, url, secret, now(), body).await;
        if status == 200 && answer["status"] == "recorded" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never recorded: {status} {answer}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fixture_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/zoom-samples")
}

/// A sample body, byte for byte.
pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture_dir().join(format!("{name}.json"))).unwrap()
}

/// The `app_deauthorized` sample as Zoom sends it: the app removed just now (the sample's
/// own times are from 2022, before any token a test stores was issued).
pub fn app_deauthorized_now() -> Vec<u8> {
    app_deauthorized_at(chrono::Utc::now())
}

/// The `app_deauthorized` sample for an app removed at `now`.
fn app_deauthorized_at(now: chrono::DateTime<chrono::Utc>) -> Vec<u8> {
    let body = String::from_utf8(fixture("app_deauthorized")).unwrap();
    assert!(body.contains("2022-03-23T12:40:00.000Z") && body.contains("1648039200000"));
    body.replace(
        "2022-03-23T12:40:00.000Z",
        &now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
    .replace("1648039200000", &now.timestamp_millis().to_string())
    .into_bytes()
}

/// Every sample that is an event (not URL validation), by name.
fn event_fixtures() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixture_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_str().unwrap().to_string();
            (name, std::fs::read(&p).unwrap())
        })
        .filter(|(name, _)| name != "endpoint.url_validation")
        .collect();
    out.sort();
    assert!(out.len() >= 5, "samples missing from {:?}", fixture_dir());
    out
}

fn account_of(body: &[u8]) -> String {
    let v: Json = serde_json::from_slice(body).unwrap();
    v["payload"]["account_id"].as_str().unwrap().to_string()
}

/// Asserts that `value` is exactly `json`: integers as integers, text as the same text,
/// objects as dicts with the same keys (string keys, each once).
fn assert_same(json: &Json, value: &values::Value, path: &str) {
    match json {
        Json::Null => assert!(value.nothing.is_some(), "{path}: expected nothing"),
        Json::Bool(b) => assert_eq!(value.boolean.as_ref().map(|v| v.v), Some(*b), "{path}"),
        Json::String(s) => assert_eq!(
            value.string.as_ref().map(|v| v.v.as_str()),
            Some(s.as_str()),
            "{path}"
        ),
        Json::Number(n) if n.is_i64() || n.is_u64() => assert_eq!(
            value.integer.as_ref().map(|v| v.v),
            n.as_i64(),
            "{path}: expected the integer {n}"
        ),
        Json::Number(n) => assert_eq!(value.float.as_ref().map(|v| v.v), n.as_f64(), "{path}"),
        Json::Array(items) => {
            let list = &value.list.as_ref().expect(path).vs;
            assert_eq!(list.len(), items.len(), "{path}");
            for (i, (j, v)) in items.iter().zip(list).enumerate() {
                assert_same(j, v, &format!("{path}[{i}]"));
            }
        }
        Json::Object(map) => {
            let items = &value.dict.as_ref().expect(path).items;
            assert_eq!(items.len(), map.len(), "{path}");
            for (k, j) in map {
                let item = items
                    .iter()
                    .find(|i| i.k.as_ref().unwrap().string.as_ref().unwrap().v == *k)
                    .unwrap_or_else(|| panic!("{path}.{k} missing"));
                assert_same(j, item.v.as_ref().unwrap(), &format!("{path}.{k}"));
            }
        }
    }
}

/// Asserts that `event` is `body` for `destination`.
fn assert_event_is(event: &Event, body: &[u8], destination: &str) {
    let sent: serde_json::Map<String, Json> = serde_json::from_slice(body).unwrap();
    assert_eq!(event.event_type, sent["event"].as_str().unwrap());
    assert_eq!(event.destination_id, destination);
    assert_eq!(
        event.data.keys().collect::<BTreeSet<_>>(),
        sent.keys().collect::<BTreeSet<_>>(),
        "every top-level field, nothing else"
    );
    for (key, json) in &sent {
        assert_same(json, &event.data[key], key);
    }
    assert_eq!(event.memo["account_id"], account_of(body));
    assert_eq!(event.memo["zoom_tracking_id"], TRACKING_ID);
}

/// The embedded host's events, oldest first.
async fn stored_events(app: &TestApp) -> Vec<Event> {
    let listed = app
        .events()
        .list(events::ListRequest {
            max_results: 1000,
            order: "ASC".into(),
            ..Default::default()
        })
        .await
        .expect("EventsService.List succeeds")
        .into_inner()
        .events;
    // List leaves the data out; Get has it.
    let mut full = Vec::with_capacity(listed.len());
    for event in listed {
        full.push(
            app.events()
                .get(events::GetRequest {
                    event_id: event.event_id,
                    json_values: false,
                })
                .await
                .expect("EventsService.Get succeeds")
                .into_inner()
                .event
                .expect("the listed event"),
        );
    }
    full
}

/// Waits until the embedded host holds at least `n` events, and returns them.
async fn wait_for_stored(app: &TestApp, n: usize) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = stored_events(app).await;
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} events arrived",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates an `oauthDefault` connection of `account` in the embedded host, its token issued
/// half an hour ago (Zoom's live an hour).
async fn default_connection(app: &TestApp, account: &str) -> String {
    let cid = ConnectionId::generate().to_string();
    let expiry = (chrono::Utc::now() + chrono::Duration::minutes(30))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    app.vars()
        .set(vars::SetRequest {
            vars: vec![
                var(&cid, "auth_type", "oauthDefault", false),
                var(&cid, "account_id", account, false),
                var(&cid, "oauth_access_token", "access-token-1", true),
                var(&cid, "oauth_refresh_token", "refresh-token-1", true),
                var(&cid, "oauth_expiry", &expiry, false),
            ],
        })
        .await
        .unwrap();
    cid
}

/// The service with the default app's secret token, and the default app its connections use.
async fn app_with_secret() -> TestApp {
    spawn_app_with(&[
        ("ZOOM_SECRET_TOKEN", SECRET),
        ("ZOOM_CLIENT_ID", "default-client"),
        ("ZOOM_CLIENT_SECRET", "default-secret"),
    ])
    .await
}

fn meeting_started(n: u64) -> Vec<u8> {
    json!({
        "event": "meeting.started",
        "event_ts": 1_700_000_000_000u64 + n,
        "payload": {
            "account_id": ACCOUNT,
            "object": {"id": n.to_string(), "topic": "Zdeněk Ødegård's Zoom Meeting", "type": 2}
        }
    })
    .to_string()
    .into_bytes()
}

fn event_ts(event: &Event) -> i64 {
    event.data["event_ts"].integer.as_ref().unwrap().v
}

#[tokio::test]
async fn every_sample_reaches_the_embedded_host_with_its_exact_type_destination_and_values() {
    let app = app_with_secret().await;
    let samples = event_fixtures();
    let mut connection_of = std::collections::HashMap::new();
    for (_, body) in &samples {
        let account = account_of(body);
        if let std::collections::hash_map::Entry::Vacant(slot) = connection_of.entry(account) {
            let cid = default_connection(&app, slot.key()).await;
            slot.insert(cid);
        }
    }
    let url = app.url("/zoom/event");
    for (_, body) in &samples {
        post_until_recorded(&app.http_client, &url, SECRET, body).await;
    }

    let stored = wait_for_stored(&app, samples.len()).await;
    assert_eq!(stored.len(), samples.len());
    for ((name, body), event) in samples.iter().zip(&stored) {
        assert_eq!(event.event_type, name.as_str(), "in the order received");
        assert_event_is(event, body, &connection_of[&account_of(body)]);
        assert!(event.event_id.starts_with("evt_"));
    }
    // The non-ASCII sample arrived as the same text, not re-escaped.
    let started = stored
        .iter()
        .find(|e| e.event_type == "meeting.started")
        .unwrap();
    let payload = zoom_integration::values::to_json(&started.data["payload"]);
    assert_eq!(payload["object"]["topic"], "Zdeněk Ødegård's Zoom Meeting");
}

#[tokio::test]
async fn every_sample_reaches_a_remote_host_with_its_exact_type_destination_and_values() {
    let host = FakeHost::start().await;
    let samples = event_fixtures();
    let mut connection_of = std::collections::HashMap::new();
    for (_, body) in &samples {
        let account = account_of(body);
        connection_of.entry(account.clone()).or_insert_with(|| {
            let cid = ConnectionId::generate().to_string();
            host.put(var(&cid, "auth_type", "serverToServer", false));
            host.put(var(&cid, "account_id", &account, false));
            host.put(var(&cid, "private_secret_token", PRIVATE_SECRET, true));
            cid
        });
    }
    let app = spawn_app_with(&[
        ("HOST_ENGINE_URL", &host.url()),
        ("ZOOM_SECRET_TOKEN", SECRET),
    ])
    .await;
    let url = app.url("/zoom/event");
    for (_, body) in &samples {
        post_until_recorded(&app.http_client, &url, PRIVATE_SECRET, body).await;
    }

    let dispatched = host
        .wait_for_dispatched(samples.len(), Duration::from_secs(30))
        .await;
    assert_eq!(dispatched.len(), samples.len());
    for (name, body) in &samples {
        let event = dispatched
            .iter()
            .find(|e| e.event_type == *name)
            .unwrap_or_else(|| panic!("{name} not dispatched"));
        assert_event_is(event, body, &connection_of[&account_of(body)]);
        assert!(event.event_id.is_empty(), "the host assigns event ids");
    }
}

/// What the service stored: events and the connection's variables.
async fn observable_state(app: &TestApp, cid: &str) -> (usize, Vec<(String, String)>) {
    let mut vars: Vec<(String, String)> = app
        .stored_vars(cid, &[])
        .await
        .into_iter()
        .map(|v| (v.name, v.value))
        .collect();
    vars.sort();
    (stored_events(app).await.len(), vars)
}

#[tokio::test]
async fn each_bad_input_gets_its_status_and_changes_nothing() {
    let app = app_with_secret().await;
    let cid = default_connection(&app, ACCOUNT).await;
    let url = app.url("/zoom/event");
    // Routing is in place once a first event is recorded.
    post_until_recorded(&app.http_client, &url, SECRET, &meeting_started(0)).await;
    wait_for_stored(&app, 1).await;
    let before = observable_state(&app, &cid).await;

    let body = meeting_started(1);
    let client = &app.http_client;
    let window = 90 * 60;
    let cases: Vec<(&str, u16, reqwest::RequestBuilder)> = vec![
        (
            "no signature",
            401,
            client
                .post(&url)
                .header("x-zm-request-timestamp", now().to_string())
                .body(body.clone()),
        ),
        (
            "no timestamp",
            401,
            client
                .post(&url)
                .header("x-zm-signature", sign(SECRET, &now().to_string(), &body))
                .body(body.clone()),
        ),
        (
            "signature by another secret",
            401,
            signed(client, &url, "not-the-secret", now(), body.clone()),
        ),
        (
            "signature of another body",
            401,
            client
                .post(&url)
                .header("x-zm-request-timestamp", now().to_string())
                .header("x-zm-signature", sign(SECRET, &now().to_string(), b"{}"))
                .body(body.clone()),
        ),
        (
            "malformed signature",
            401,
            client
                .post(&url)
                .header("x-zm-request-timestamp", now().to_string())
                .header("x-zm-signature", "v0=zz")
                .body(body.clone()),
        ),
        (
            "stale timestamp",
            401,
            signed(client, &url, SECRET, now() - window - 60, body.clone()),
        ),
        (
            "future timestamp",
            401,
            signed(client, &url, SECRET, now() + window + 60, body.clone()),
        ),
        (
            "timestamp in milliseconds",
            401,
            signed(client, &url, SECRET, now() * 1000, body.clone()),
        ),
        (
            "not JSON",
            400,
            signed(client, &url, SECRET, now(), b"event=meeting.started".to_vec()),
        ),
        (
            "truncated JSON",
            400,
            signed(client, &url, SECRET, now(), body[..body.len() - 1].to_vec()),
        ),
        (
            "JSON array",
            400,
            signed(client, &url, SECRET, now(), b"[1,2]".to_vec()),
        ),
        (
            "JSON array with a webhook's fields in order",
            400,
            signed(
                client,
                &url,
                SECRET,
                now(),
                br#"["meeting.started", {"account_id": "elsewhere"}]"#.to_vec(),
            ),
        ),
        (
            "URL validation as a JSON array",
            400,
            signed(
                client,
                &url,
                SECRET,
                now(),
                br#"["endpoint.url_validation", {"plainToken": "qgg8vlvZRS6UYooatFL8Aw"}]"#
                    .to_vec(),
            ),
        ),
        (
            "no event",
            400,
            signed(
                client,
                &url,
                SECRET,
                now(),
                json!({"payload": {"account_id": ACCOUNT}})
                    .to_string()
                    .into_bytes(),
            ),
        ),
        (
            "event not text",
            400,
            signed(
                client,
                &url,
                SECRET,
                now(),
                json!({"event": 7, "payload": {"account_id": ACCOUNT}})
                    .to_string()
                    .into_bytes(),
            ),
        ),
        (
            "nested deeper than an event can be stored",
            400,
            signed(
                client,
                &url,
                SECRET,
                now(),
                format!(
                    r#"{{"event":"meeting.started","payload":{{"account_id":"{ACCOUNT}","x":{}1{}}}}}"#,
                    r#"{"a":"#.repeat(40),
                    "}".repeat(40)
                )
                .into_bytes(),
            ),
        ),
        (
            "more values than the limit",
            400,
            signed(
                client,
                &url,
                SECRET,
                now(),
                format!(
                    r#"{{"event":"meeting.started","payload":{{"account_id":"{ACCOUNT}","x":[{}]}}}}"#,
                    vec!["0"; 100_001].join(",")
                )
                .into_bytes(),
            ),
        ),
        (
            "URL validation with a bad signature",
            401,
            signed(
                client,
                &url,
                "not-the-secret",
                now(),
                fixture("endpoint.url_validation"),
            ),
        ),
        (
            "URL validation with an unsafe plainToken",
            400,
            signed(
                client,
                &url,
                SECRET,
                now(),
                json!({"event": "endpoint.url_validation", "payload": {"plainToken": "a/b\"<x>"}})
                    .to_string()
                    .into_bytes(),
            ),
        ),
        (
            "URL validation with a long plainToken",
            400,
            signed(
                client,
                &url,
                SECRET,
                now(),
                json!({"event": "endpoint.url_validation", "payload": {"plainToken": "a".repeat(65)}})
                    .to_string()
                    .into_bytes(),
            ),
        ),
        (
            "body over 8 MiB",
            413,
            signed(client, &url, SECRET, now(), vec![b' '; (8 << 20) + 1]),
        ),
    ];
    for (what, expected, request) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), expected, "{what}");
        let answer: Json = response.json().await.unwrap();
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{what}: a message says why");
        assert!(!message.contains(SECRET), "{what}: {message}");
    }

    // The same body, now properly signed, is new: the refusals recorded nothing.
    let (status, answer) = post(&app, &body).await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("recorded")));
    let stored = wait_for_stored(&app, 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(stored_events(&app).await.len(), 2);
    assert_eq!(event_ts(&stored[1]), 1_700_000_000_001);
    let after = observable_state(&app, &cid).await;
    assert_eq!(after.1, before.1, "variables untouched");
}

fn signed(
    client: &reqwest::Client,
    url: &str,
    secret: &str,
    timestamp: u64,
    body: Vec<u8>,
) -> reqwest::RequestBuilder {
    let ts = timestamp.to_string();
    client
        .post(url)
        .header("x-zm-request-timestamp", &ts)
        .header("x-zm-signature", sign(secret, &ts, &body))
        .body(body)
}

#[tokio::test]
async fn an_oversized_body_is_refused_before_it_is_sent_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = app_with_secret().await;
    // Declared too large: answered at once, though almost none of the body is sent.
    let mut stream = tokio::net::TcpStream::connect(app.http).await.unwrap();
    let ts = now();
    stream
        .write_all(
            format!(
                "POST /zoom/event HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\
                 x-zm-request-timestamp: {ts}\r\nx-zm-signature: v0=00\r\n\r\n{{",
                (8 << 20) + 1
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    let head = String::from_utf8_lossy(&answer[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");

    // Not declared (chunked): refused once more than 8 MiB arrived.
    let mut stream = tokio::net::TcpStream::connect(app.http).await.unwrap();
    stream
        .write_all(
            format!(
                "POST /zoom/event HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\
                 x-zm-request-timestamp: {ts}\r\nx-zm-signature: v0=00\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let chunk = vec![b' '; 1 << 20];
    for _ in 0..9 {
        let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
        if stream.write_all(&frame).await.is_err() {
            break;
        }
    }
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    let head = String::from_utf8_lossy(&answer[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
}

#[tokio::test]
async fn url_validation_is_answered_with_the_secret_that_signed_it() {
    let host = FakeHost::start().await;
    let private = ConnectionId::generate().to_string();
    host.put(var(&private, "auth_type", "oauthPrivate", false));
    host.put(var(&private, "account_id", "acc-private", false));
    host.put(var(&private, "private_secret_token", PRIVATE_SECRET, true));
    let app = spawn_app_with(&[
        ("HOST_ENGINE_URL", &host.url()),
        ("ZOOM_SECRET_TOKEN", SECRET),
    ])
    .await;
    let url = app.url("/zoom/event");
    // Naming the private connection's account: were it recorded as an event, it would be
    // routed and delivered.
    let mut body: Json = serde_json::from_slice(&fixture("endpoint.url_validation")).unwrap();
    body["payload"]["account_id"] = json!("acc-private");
    let body = serde_json::to_vec(&body).unwrap();
    for secret in [SECRET, PRIVATE_SECRET] {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (status, answer) = loop {
            let (status, answer) = post_to(&app.http_client, &url, secret, now(), &body).await;
            // 503 while routing loads at start.
            if status != 503 || Instant::now() > deadline {
                break (status, answer);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(status, 200, "{answer}");
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(b"qgg8vlvZRS6UYooatFL8Aw");
        assert_eq!(
            answer,
            json!({
                "plainToken": "qgg8vlvZRS6UYooatFL8Aw",
                "encryptedToken": hex::encode(mac.finalize().into_bytes()),
            })
        );
    }
    // An event after them arrives alone: the validations before it were not recorded.
    let event = json!({"event": "meeting.started", "payload": {"account_id": "acc-private"}});
    let event = serde_json::to_vec(&event).unwrap();
    let (status, answer) = post_to(&app.http_client, &url, PRIVATE_SECRET, now(), &event).await;
    assert_eq!(status, 200, "{answer}");
    host.wait_for_dispatched(1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let dispatched = host.state.lock().unwrap().dispatched.clone();
    let types: Vec<&str> = dispatched.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["meeting.started"], "URL validation is not an event");
}

#[tokio::test]
async fn with_many_private_apps_a_webhook_is_checked_first_against_its_account_s_secrets() {
    // 300 private apps, each with its own secret and account: far more secrets than a request's
    // own thread tries on these bodies.
    let host = FakeHost::start().await;
    let apps: Vec<(String, String, String)> = (0..300)
        .map(|n| {
            let cid = ConnectionId::generate().to_string();
            let (account, secret) = (format!("acc-{n}"), format!("private-secret-{n}"));
            host.put(var(&cid, "auth_type", "oauthPrivate", false));
            host.put(var(&cid, "account_id", &account, false));
            host.put(var(&cid, "private_secret_token", &secret, true));
            (cid, account, secret)
        })
        .collect();
    let app = spawn_app_with(&[
        ("HOST_ENGINE_URL", &host.url()),
        ("ZOOM_SECRET_TOKEN", SECRET),
    ])
    .await;
    let url = app.url("/zoom/event");
    let offloaded = async || {
        let text = crate::metrics::scrape(&app).await;
        crate::metrics::sample(&text, "zoom_webhook_checks_offloaded_total")
    };
    // About 24 KiB each, so a request's own thread tries 2 secrets (the default app's and the
    // account's): which others it would try next depends on the index's order, which is not fixed.
    let event = |account: &str, n: u64| {
        json!({"event": "meeting.started", "event_ts": n,
               "payload": {"account_id": account,
                           "object": {"id": n.to_string(), "topic": "Ø".repeat(12_000)}}})
        .to_string()
        .into_bytes()
    };
    // Each app's webhooks for its own account are found among the likely secrets.
    for (i, (_, account, secret)) in apps.iter().enumerate().step_by(60) {
        post_until_recorded(&app.http_client, &url, secret, &event(account, i as u64)).await;
    }
    assert_eq!(offloaded().await, 0.0);

    // A forged body costs every secret: tried off the request's thread, and refused.
    let (status, _) = post_to(&app.http_client, &url, "forged", now(), &event("acc-7", 1)).await;
    assert_eq!(status, 401);
    assert_eq!(offloaded().await, 1.0);
    // A forged body too large to try against every secret before its answer is due is answered
    // 503 on time (it might be genuine, signed by a secret not tried yet: Zoom retries 5xx),
    // and gives the blocking pool back to the next one.
    let huge = {
        let mut body = event("acc-7", 3);
        body.truncate(body.len() - 3);
        body.extend(std::iter::repeat_n(b' ', 8 * 1024 * 1024 - body.len() - 3));
        body.extend(b"}}}");
        body
    };
    let started = Instant::now();
    let (status, _) = post_to(&app.http_client, &url, "forged", now(), &huge).await;
    assert_eq!(status, 503, "after {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(offloaded().await, 2.0);
    let started = Instant::now();
    let (status, _) = post_to(&app.http_client, &url, "forged", now(), &event("acc-7", 4)).await;
    assert_eq!(status, 401);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(offloaded().await, 3.0);

    // An app's secret on a body for an account it has no connection on still verifies (off the
    // request's thread): nothing wants it, and it is answered 200, not 401.
    let (status, answer) = post_to(
        &app.http_client,
        &url,
        &apps[250].2,
        now(),
        &event("acc-3", 2),
    )
    .await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("unrouted")));
    assert_eq!(offloaded().await, 4.0);

    let dispatched = host.wait_for_dispatched(5, Duration::from_secs(30)).await;
    let destinations: BTreeSet<String> = dispatched
        .iter()
        .map(|e| e.destination_id.clone())
        .collect();
    let expected: BTreeSet<String> = apps
        .iter()
        .step_by(60)
        .map(|(cid, _, _)| cid.clone())
        .collect();
    assert_eq!(destinations, expected);
}

#[tokio::test]
async fn a_body_sent_again_within_the_window_is_forwarded_once() {
    let app = app_with_secret().await;
    default_connection(&app, ACCOUNT).await;
    let url = app.url("/zoom/event");
    let body = meeting_started(7);
    post_until_recorded(&app.http_client, &url, SECRET, &body).await;
    // Zoom's retries: the same body, a new timestamp and signature.
    for delay in [1, 2] {
        let (status, answer) =
            post_to(&app.http_client, &url, SECRET, now() - delay * 60, &body).await;
        assert_eq!(
            (status, answer["status"].as_str()),
            (200, Some("duplicate"))
        );
    }
    // A different event after them: once it is stored, everything before it was delivered.
    let (status, _) = post(&app, &meeting_started(8)).await;
    assert_eq!(status, 200);
    let stored = wait_for_stored(&app, 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stored_again = stored_events(&app).await;
    assert_eq!(stored_again.len(), 2, "{stored:?}");
    let ts: Vec<i64> = stored_again.iter().map(event_ts).collect();
    assert_eq!(ts, [1_700_000_000_007, 1_700_000_000_008]);
}

#[tokio::test]
async fn a_body_timestamped_ahead_of_our_clock_keeps_its_key_a_window_after_that_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path(), &[("ZOOM_SECRET_TOKEN", SECRET)]).await;
    default_connection(&app, ACCOUNT).await;
    let url = app.url("/zoom/event");
    post_until_recorded(&app.http_client, &url, SECRET, &meeting_started(1)).await;
    // Zoom's clock 30 minutes ahead: inside the 90-minute window, so accepted, and a replay
    // stays acceptable until 90 minutes after that timestamp, not after our commit.
    let ahead = now() + 30 * 60;
    let (status, answer) =
        post_to(&app.http_client, &url, SECRET, ahead, &meeting_started(2)).await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("recorded")));
    let outbox = rusqlite::Connection::open(dir.path().join("outbox.db")).unwrap();
    let kept_until: i64 = outbox
        .query_row("SELECT max(expires_ms) FROM dedupe_keys", [], |r| r.get(0))
        .unwrap();
    assert!(
        kept_until >= (ahead as i64 + 1 + 90 * 60) * 1000,
        "kept until {kept_until}, replayable until {}",
        (ahead + 1 + 90 * 60) * 1000
    );
}

#[tokio::test]
async fn the_same_body_from_two_apps_on_one_account_reaches_each_app_s_connections_once() {
    let app = app_with_secret().await;
    let default = default_connection(&app, ACCOUNT).await;
    let private = ConnectionId::generate().to_string();
    app.vars()
        .set(vars::SetRequest {
            vars: vec![
                var(&private, "auth_type", "oauthPrivate", false),
                var(&private, "account_id", ACCOUNT, false),
                var(&private, "private_secret_token", PRIVATE_SECRET, true),
            ],
        })
        .await
        .unwrap();
    let url = app.url("/zoom/event");
    let body = meeting_started(3);
    // Zoom sends the same event to both apps; the bodies are byte for byte the same.
    post_until_recorded(&app.http_client, &url, SECRET, &body).await;
    post_until_recorded(&app.http_client, &url, PRIVATE_SECRET, &body).await;
    // Each app's retry is still a duplicate.
    for secret in [SECRET, PRIVATE_SECRET] {
        let (status, answer) = post_to(&app.http_client, &url, secret, now(), &body).await;
        assert_eq!(
            (status, answer["status"].as_str()),
            (200, Some("duplicate")),
            "{secret}"
        );
    }
    wait_for_stored(&app, 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut got: Vec<String> = stored_events(&app)
        .await
        .iter()
        .map(|e| e.destination_id.clone())
        .collect();
    got.sort();
    let mut want = vec![default, private];
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn a_signed_body_that_cannot_become_an_event_is_refused_and_a_large_one_is_delivered() {
    let app = app_with_secret().await;
    default_connection(&app, ACCOUNT).await;
    let url = app.url("/zoom/event");
    post_until_recorded(&app.http_client, &url, SECRET, &meeting_started(1)).await;
    // JSON enough for its head, but an unpaired surrogate deep inside.
    // Small, and past 64 KiB, where the check runs on the blocking pool.
    for notes in [0, 100 << 10] {
        let unpaired = format!(
            r#"{{"event":"meeting.started","payload":{{"account_id":"{ACCOUNT}","object":{{"notes":"{}","topic":"\ud83d"}}}}}}"#,
            "n".repeat(notes)
        );
        let (status, answer) =
            post_to(&app.http_client, &url, SECRET, now(), unpaired.as_bytes()).await;
        assert_eq!(status, 400, "{notes}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("cannot become an event"),
            "{answer}"
        );
    }
    // A 1 MiB body is verified off the request threads and delivered like any other.
    let large = json!({
        "event": "recording.completed",
        "payload": {"account_id": ACCOUNT, "object": {"notes": "ü".repeat(512 << 10)}}
    })
    .to_string()
    .into_bytes();
    let (status, answer) = post_to(&app.http_client, &url, SECRET, now(), &large).await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("recorded")));
    let stored = wait_for_stored(&app, 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        stored_events(&app).await.len(),
        2,
        "the refused body was not recorded"
    );
    assert_event_is(&stored[1], &large, &stored[1].destination_id);
}

#[tokio::test]
async fn a_key_sent_twice_counts_with_its_last_value_for_routing_and_in_the_event() {
    let app = app_with_secret().await;
    let cid = default_connection(&app, ACCOUNT).await;
    let url = app.url("/zoom/event");
    post_until_recorded(&app.http_client, &url, SECRET, &meeting_started(1)).await;
    let body = format!(
        r#"{{"event":"meeting.created","event":"meeting.ended","payload":{{"account_id":"someone-else","account_id":"{ACCOUNT}","object":{{"id":"1","id":"2"}}}}}}"#
    );
    let (status, answer) = post_to(&app.http_client, &url, SECRET, now(), body.as_bytes()).await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("recorded")),
        "{answer}"
    );
    let stored = wait_for_stored(&app, 2).await;
    let event = &stored[1];
    assert_eq!(event.event_type, "meeting.ended");
    assert_eq!(event.destination_id, cid);
    let payload = zoom_integration::values::to_json(&event.data["payload"]);
    assert_eq!(
        payload,
        json!({"account_id": ACCOUNT, "object": {"id": "2"}})
    );
}

#[tokio::test]
async fn a_connection_the_host_cannot_read_leaves_the_others_routed_and_gets_its_webhooks_once_it_can_be_read()
 {
    let host = FakeHost::start().await;
    let good = ConnectionId::generate().to_string();
    host.put(var(&good, "auth_type", "oauthDefault", false));
    host.put(var(&good, "account_id", ACCOUNT, false));
    let late = ConnectionId::generate().to_string();
    host.put(var(&late, "auth_type", "oauthDefault", false));
    host.put(var(&late, "account_id", "other-account", false));
    host.state.lock().unwrap().unreadable.push(late.clone());
    let app = spawn_app_with(&[
        ("HOST_ENGINE_URL", &host.url()),
        ("ZOOM_SECRET_TOKEN", SECRET),
    ])
    .await;
    let url = app.url("/zoom/event");
    // Routing loads (503 until then), and the readable connection gets its webhook.
    post_until_recorded(&app.http_client, &url, SECRET, &meeting_started(1)).await;
    // One that may be for the connection not read yet is answered 503: Zoom retries it.
    let body = String::from_utf8(meeting_started(2))
        .unwrap()
        .replace(ACCOUNT, "other-account")
        .into_bytes();
    let (status, answer) = post(&app, &body).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("cannot be read"));

    // The host can read it again: Zoom's retry reaches it.
    host.state.lock().unwrap().unreadable.clear();
    post_until_recorded(&app.http_client, &url, SECRET, &body).await;
    let destinations: Vec<String> = host
        .wait_for_dispatched(2, Duration::from_secs(30))
        .await
        .iter()
        .map(|e| e.destination_id.clone())
        .collect();
    assert_eq!(destinations, [good, late]);
}

#[tokio::test]
async fn a_verified_event_no_connection_wants_is_answered_200_and_dropped() {
    let app = spawn_app_with(&[("ZOOM_SECRET_TOKEN", SECRET)]).await;
    let cid = default_connection(&app, ACCOUNT).await;
    let private = ConnectionId::generate().to_string();
    app.vars()
        .set(vars::SetRequest {
            vars: vec![
                var(&private, "auth_type", "serverToServer", false),
                var(&private, "account_id", "acc-other", false),
                var(&private, "private_secret_token", PRIVATE_SECRET, true),
            ],
        })
        .await
        .unwrap();
    let url = app.url("/zoom/event");
    post_until_recorded(&app.http_client, &url, SECRET, &meeting_started(1)).await;
    post_until_recorded(
        &app.http_client,
        &url,
        PRIVATE_SECRET,
        &json!({"event": "meeting.ended", "payload": {"account_id": "acc-other"}})
            .to_string()
            .into_bytes(),
    )
    .await;

    let unwanted = [
        // An account nobody connected.
        (
            SECRET,
            json!({"event": "meeting.started", "payload": {"account_id": "acc-unknown"}}),
        ),
        // No account at all.
        (SECRET, json!({"event": "meeting.started"})),
        // The right account, but signed by the private app, which that connection does not use.
        (
            PRIVATE_SECRET,
            json!({"event": "meeting.started", "payload": {"account_id": ACCOUNT}}),
        ),
    ];
    for (secret, body) in unwanted {
        let (status, answer) = post_to(
            &app.http_client,
            &url,
            secret,
            now(),
            body.to_string().as_bytes(),
        )
        .await;
        assert_eq!(
            (status, answer["status"].as_str()),
            (200, Some("unrouted")),
            "{body}"
        );
    }
    let (status, _) = post(&app, &meeting_started(2)).await;
    assert_eq!(status, 200);
    wait_for_stored(&app, 3).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got: Vec<(String, String)> = stored_events(&app)
        .await
        .iter()
        .map(|e| (e.event_type.clone(), e.destination_id.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("meeting.started".to_string(), cid.clone()),
            ("meeting.ended".to_string(), private.clone()),
            ("meeting.started".to_string(), cid.clone()),
        ]
    );
}

#[tokio::test]
async fn app_deauthorized_clears_the_tokens_marks_the_connection_broken_and_is_forwarded() {
    let app = app_with_secret().await;
    let cid = default_connection(&app, ACCOUNT).await;
    let bystander = default_connection(&app, "another-account").await;
    assert_eq!(
        app.connection_status(&cid).await.unwrap().code(),
        StatusCode::Ok
    );
    let body = app_deauthorized_now();
    post_until_recorded(&app.http_client, &app.url("/zoom/event"), SECRET, &body).await;

    let stored = wait_for_stored(&app, 1).await;
    assert_event_is(&stored[0], &body, &cid);
    // The string event_ts inside payload stays a string.
    let payload = zoom_integration::values::to_json(&stored[0].data["payload"]);
    let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(payload["event_ts"].is_string());
    assert_eq!(payload["event_ts"], sent["payload"]["event_ts"]);

    let names: BTreeSet<String> = app
        .stored_vars(&cid, &[])
        .await
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(
        names,
        ["account_id", "auth_type", "connection_error"]
            .map(String::from)
            .into()
    );
    let status = app.connection_status(&cid).await.unwrap();
    assert_eq!(
        (status.code(), status.message.as_str()),
        (StatusCode::Error, "deauthorized in Zoom: reconnect")
    );
    assert_eq!(
        app.connection_status(&bystander).await.unwrap().code(),
        StatusCode::Ok,
        "other accounts' connections are untouched"
    );
}

#[tokio::test]
async fn an_app_deauthorized_arriving_after_a_reconnect_leaves_the_new_tokens_alone() {
    let app = app_with_secret().await;
    let cid = default_connection(&app, ACCOUNT).await;
    // Reconnected a minute ago, after the app was removed five minutes ago; Zoom's event about
    // the removal arrives only now (a retry after a 503, say).
    let issued = chrono::Utc::now() - chrono::Duration::minutes(1);
    let expiry =
        (issued + chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    app.vars()
        .set(vars::SetRequest {
            vars: vec![var(&cid, "oauth_expiry", &expiry, false)],
        })
        .await
        .unwrap();
    let body = app_deauthorized_at(chrono::Utc::now() - chrono::Duration::minutes(5));
    post_until_recorded(&app.http_client, &app.url("/zoom/event"), SECRET, &body).await;

    let stored = wait_for_stored(&app, 1).await;
    assert_event_is(&stored[0], &body, &cid);
    let names: BTreeSet<String> = app
        .stored_vars(&cid, &[])
        .await
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert!(names.contains("oauth_refresh_token"), "{names:?}");
    assert!(!names.contains("connection_error"), "{names:?}");
}

#[tokio::test]
async fn app_deauthorized_by_one_user_leaves_another_user_s_connection_on_the_account_alone() {
    let app = app_with_secret().await;
    // The fixture's user, and another user of the same account.
    let remover = default_connection(&app, ACCOUNT).await;
    let other = default_connection(&app, ACCOUNT).await;
    for (cid, user) in [
        (&remover, "tUo7WohjTs6ELvl9WR3JAA"),
        (&other, "anotherZoomUser"),
    ] {
        app.vars()
            .set(vars::SetRequest {
                vars: vec![var(cid, "user_id", user, false)],
            })
            .await
            .unwrap();
    }
    let body = app_deauthorized_now();
    post_until_recorded(&app.http_client, &app.url("/zoom/event"), SECRET, &body).await;
    // Both get the event (it is the account's); only the remover's connection is broken.
    wait_for_stored(&app, 2).await;
    let status = app.connection_status(&remover).await.unwrap();
    assert_eq!(
        (status.code(), status.message.as_str()),
        (StatusCode::Error, "deauthorized in Zoom: reconnect")
    );
    assert_eq!(
        app.connection_status(&other).await.unwrap().code(),
        StatusCode::Ok
    );
    let kept = app.stored_vars(&other, &[]).await;
    assert!(kept.iter().any(|v| v.name == "oauth_refresh_token"));
}

#[tokio::test]
async fn a_retried_app_deauthorized_does_not_undo_a_reconnect_made_meanwhile() {
    retried_app_deauthorized_after_a_reconnect(FirstDispatch::Fails, false).await;
}

#[tokio::test]
async fn an_app_deauthorized_retried_after_a_restart_does_not_undo_a_reconnect_made_meanwhile() {
    retried_app_deauthorized_after_a_reconnect(FirstDispatch::Fails, true).await;
}

#[tokio::test]
async fn an_app_deauthorized_whose_dispatch_was_cut_short_by_a_restart_does_not_undo_a_reconnect() {
    retried_app_deauthorized_after_a_reconnect(FirstDispatch::Hangs, true).await;
}

/// How the host answers the first Dispatch of `app_deauthorized`.
enum FirstDispatch {
    /// INTERNAL, until the owner has reconnected.
    Fails,
    /// Not before the service is stopped.
    Hangs,
}

/// `app_deauthorized` whose first Dispatch does not deliver it; the owner reconnects meanwhile;
/// with `restart`, the service is restarted (same data directory) before the retry that succeeds.
async fn retried_app_deauthorized_after_a_reconnect(first: FirstDispatch, restart: bool) {
    let dir = tempfile::tempdir().unwrap();
    let host = FakeHost::start().await;
    let cid = ConnectionId::generate().to_string();
    host.put(var(&cid, "auth_type", "oauthDefault", false));
    host.put(var(&cid, "account_id", ACCOUNT, false));
    host.put(var(&cid, "oauth_refresh_token", "refresh-before", true));
    match first {
        FirstDispatch::Fails => host.state.lock().unwrap().fail_dispatch = true,
        FirstDispatch::Hangs => host.state.lock().unwrap().dispatch_delay = Duration::from_secs(60),
    }
    let env = [
        ("HOST_ENGINE_URL", host.url()),
        ("ZOOM_SECRET_TOKEN", SECRET.into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = spawn_app_in(dir.path(), &env).await;
    let body = app_deauthorized_now();
    post_until_recorded(&app.http_client, &app.url("/zoom/event"), SECRET, &body).await;
    let stored = |name: &str| {
        host.state
            .lock()
            .unwrap()
            .vars
            .get(&(cid.clone(), name.to_string()))
            .map(|v| v.value.clone())
    };
    // The side effect is done (on a remote host: the mark, then the tokens' deletion); the
    // Dispatch has not delivered the event.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored("connection_error").is_none() || stored("oauth_refresh_token").is_some() {
        assert!(Instant::now() < deadline, "never deauthorized");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The owner reconnects while the event waits for its retry.
    {
        let mut state = host.state.lock().unwrap();
        state
            .vars
            .remove(&(cid.clone(), "connection_error".to_string()));
    }
    host.put(var(
        &cid,
        "oauth_refresh_token",
        "refresh-after-reconnect",
        true,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Kept running until the end.
    let _app = if restart {
        app.stop().await.unwrap();
        spawn_app_in(dir.path(), &env).await
    } else {
        app
    };
    {
        let mut state = host.state.lock().unwrap();
        state.fail_dispatch = false;
        state.dispatch_delay = Duration::ZERO;
    }
    host.wait_for_dispatched(1, Duration::from_secs(20)).await;
    assert_eq!(
        stored("oauth_refresh_token").as_deref(),
        Some("refresh-after-reconnect")
    );
    assert_eq!(stored("connection_error"), None);
}

#[tokio::test]
async fn a_thousand_events_sent_while_the_host_is_down_are_all_delivered_when_it_returns() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let host = FakeHost::start_on(listener).await;
    let cid = ConnectionId::generate().to_string();
    for v in [
        var(&cid, "auth_type", "oauthDefault", false),
        var(&cid, "account_id", ACCOUNT, false),
    ] {
        host.put(v);
    }
    let app = spawn_app_with(&[
        ("HOST_ENGINE_URL", &host.url()),
        ("ZOOM_SECRET_TOKEN", SECRET),
    ])
    .await;
    let url = app.url("/zoom/event");
    post_until_recorded(&app.http_client, &url, SECRET, &meeting_started(0)).await;
    host.wait_for_dispatched(1, Duration::from_secs(30)).await;
    host.stop();
    // Wait until the host really is gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "fake host did not stop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let sent: Vec<u64> = (1..=1000).collect();
    let mut workers = tokio::task::JoinSet::new();
    for chunk in sent.chunks(63) {
        let (client, url, chunk) = (app.http_client.clone(), url.clone(), chunk.to_vec());
        workers.spawn(async move {
            for n in chunk {
                let (status, answer) =
                    post_to(&client, &url, SECRET, now(), &meeting_started(n)).await;
                assert_eq!(
                    (status, answer["status"].as_str()),
                    (200, Some("recorded")),
                    "{answer}"
                );
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.unwrap();
    }

    let listener = crate::helpers::listen_again(addr).await;
    let old_host = host;
    let host = FakeHost::start_on(listener).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let expected: BTreeSet<i64> = sent.iter().map(|n| 1_700_000_000_000 + *n as i64).collect();
    loop {
        let got: BTreeSet<i64> = host
            .state
            .lock()
            .unwrap()
            .dispatched
            .iter()
            .map(event_ts)
            // At least once: the first event may arrive again.
            .filter(|ts| *ts != 1_700_000_000_000)
            .collect();
        if got == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of 1000 delivered (old host: {}); unexpected: {:?}",
            got.intersection(&expected).count(),
            old_host.state.lock().unwrap().dispatched.len(),
            got.difference(&expected).take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dispatched = host.state.lock().unwrap().dispatched.clone();
    assert!(dispatched.iter().all(|e| e.destination_id == cid));
    let before_the_outage: Vec<i64> = old_host
        .state
        .lock()
        .unwrap()
        .dispatched
        .iter()
        .map(event_ts)
        .collect();
    assert_eq!(before_the_outage, [1_700_000_000_000]);
}

#[tokio::test]
async fn a_stuck_outbox_database_gets_503_within_3_seconds_and_the_retry_is_forwarded_once() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path(), &[("ZOOM_SECRET_TOKEN", SECRET)]).await;
    default_connection(&app, ACCOUNT).await;
    let url = app.url("/zoom/event");
    post_until_recorded(&app.http_client, &url, SECRET, &meeting_started(0)).await;

    // Another process holding the outbox's write lock stands in for a stuck disk: nothing can
    // be committed, so webhooks are answered 503, each within 3 seconds.
    let blocker = rusqlite::Connection::open(dir.path().join("outbox.db")).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let mut n = 10;
    let body = loop {
        assert!(n < 500, "never answered 503");
        let body = meeting_started(n);
        let started = Instant::now();
        let (status, _) = post(&app, &body).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "answered in {took:?}");
        match status {
            200 => n += 1,
            503 => break body,
            other => panic!("unexpected status {other}"),
        }
    };
    blocker.execute_batch("COMMIT").unwrap();
    let answered_200 = (n - 10) as usize;

    // Zoom retries; whether or not the first attempt was committed late, it is forwarded once.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, answer) = post(&app, &body).await;
        if status == 200 {
            assert!(["recorded", "duplicate"].contains(&answer["status"].as_str().unwrap()));
            break;
        }
        assert!(Instant::now() < deadline, "{status} {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = post(&app, &meeting_started(2)).await;
    assert_eq!(status, 200);
    // The first, every 200 during the stall, the one answered 503 (once), and the last.
    let expected = 1 + answered_200 + 1 + 1;
    let stored = wait_for_stored(&app, expected).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ts: Vec<i64> = stored_events(&app).await.iter().map(event_ts).collect();
    assert_eq!(ts.len(), expected, "{ts:?}");
    let refused_ts = 1_700_000_000_000 + n as i64;
    assert_eq!(
        ts.iter().filter(|t| **t == refused_ts).count(),
        1,
        "{stored:?}"
    );
}

#[tokio::test]
async fn clients_declaring_large_bodies_and_sending_none_hold_nothing_and_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = app_with_secret().await;
    default_connection(&app, ACCOUNT).await;
    let url = app.url("/zoom/event");
    post_until_recorded(&app.http_client, &url, SECRET, &meeting_started(1)).await;
    // Sixteen clients each declare the largest body (twice the bytes the service holds at
    // once) and send none of it.
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..16 {
        let mut stream = tokio::net::TcpStream::connect(app.http).await.unwrap();
        let head = format!(
            "POST /zoom/event HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nx-zm-request-timestamp: {}\r\nx-zm-signature: v0={}\r\n\r\n",
            app.http,
            8 << 20,
            now(),
            "0".repeat(64)
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        idle.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Zoom's webhooks still get through.
    let (status, answer) =
        post_to(&app.http_client, &url, SECRET, now(), &meeting_started(2)).await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("recorded")));
    // And the idle clients are answered 408 once the answer is due (2.5 s after their
    // headers), before Zoom's 3 s: they hold nothing past the time Zoom would wait.
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), idle[0].read(&mut answer))
        .await
        .expect("answered within 10 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        (Duration::from_millis(2500)..Duration::from_secs(3)).contains(&started.elapsed()),
        "{:?}",
        started.elapsed()
    );
}
