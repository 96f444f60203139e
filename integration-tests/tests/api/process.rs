//! The real binary as a process: `--help`, configuration errors, and SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use zoom_integration::proto::autokitteh::events::v1::ListRequest;
use zoom_integration::proto::autokitteh::events::v1::events_service_client::EventsServiceClient;

const BIN: &str = env!("CARGO_BIN_EXE_service-under-test");

fn service() -> Command {
    isolated(Command::new(BIN))
}

/// `cmd` with an empty environment (but `PATH`) and piped output.
pub fn isolated(mut cmd: Command) -> Command {
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn help_lists_every_variable() {
    let out = service().arg("--help").output().await.unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for v in zoom_integration::config::VARIABLES {
        assert!(text.contains(v.name), "--help does not mention {}", v.name);
    }
}

#[tokio::test]
async fn a_malformed_setting_stops_start_up_with_one_line_naming_it_and_exit_code_64() {
    let dir = tempfile::tempdir().unwrap();
    for (name, value) in [
        ("HTTP_ADDR", "not-an-address"),
        ("WEBHOOK_ADDRESS", "https://has-a-scheme.example.com"),
        ("ZOOM_CLIENT_ID", "id-without-secret"),
        ("SECRET_KEY", "short"),
        ("HOST_ENGINE_URL", "ftp://host:1"),
    ] {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            service()
                .env("DATA_DIR", dir.path())
                .env(name, value)
                .output(),
        )
        .await
        .expect("exits promptly")
        .unwrap();
        assert_eq!(out.status.code(), Some(64), "{name}={value}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
        let expected = if name == "ZOOM_CLIENT_ID" {
            "ZOOM_CLIENT_SECRET"
        } else {
            name
        };
        assert!(
            stderr.contains(expected),
            "{stderr:?} should name {expected}"
        );
    }
    let out = service().arg("--frobnicate").output().await.unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test]
async fn a_data_dir_that_cannot_be_written_stops_start_up_naming_it_and_exit_code_64() {
    // No one can create files in /proc, root included; with SECRET_KEY set no key file is
    // written there, so the database would be the first to find out.
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        service()
            .env("DATA_DIR", "/proc")
            .env("SECRET_KEY", "0123456789abcdef0123456789abcdef")
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("GRPC_ADDR", "127.0.0.1:0")
            .output(),
    )
    .await
    .expect("exits promptly")
    .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.contains("DATA_DIR"), "{stderr:?}");
    assert!(stderr.contains("not writable"), "{stderr:?}");
}

/// Starts the service on port 0 with `env` and waits until it serves; returns the process
/// and its HTTP and gRPC addresses.
async fn start_service(env: &[(&str, &str)]) -> (tokio::process::Child, String, String) {
    let (child, http, grpc, _) = start_service_with_log(env).await;
    (child, http, grpc)
}

/// Every line the service wrote (stdout and stderr), as it arrives.
pub type Log = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// [`start_service`], keeping everything the process writes.
pub async fn start_service_with_log(
    env: &[(&str, &str)],
) -> (tokio::process::Child, String, String, Log) {
    launch(service(), env).await
}

/// The service binary run by `sh` with a file-size limit of `kib` KiB (writes past it fail
/// as on a full disk; SIGXFSZ is ignored so the process lives to answer).
pub async fn start_service_with_file_limit(
    env: &[(&str, &str)],
    kib: u64,
) -> (tokio::process::Child, String, String, Log) {
    // dash counts `ulimit -f` in 512-byte blocks.
    start_service_under(env, &format!("trap '' XFSZ; ulimit -f {}", kib * 2)).await
}

/// The service binary run by `sh` with at most `files` open files (soft and hard limit: the
/// service cannot raise it).
pub async fn start_service_with_open_files_limit(
    env: &[(&str, &str)],
    files: u32,
) -> (tokio::process::Child, String, String, Log) {
    start_service_under(env, &format!("ulimit -n {files}")).await
}

/// The service binary run by `sh` after `setup` (shell commands setting its limits).
async fn start_service_under(
    env: &[(&str, &str)],
    setup: &str,
) -> (tokio::process::Child, String, String, Log) {
    let mut sh = Command::new("sh");
    sh.args(["-c", &format!("{setup}; exec \"$0\""), BIN]);
    launch(isolated(sh), env).await
}

/// Starts `cmd` on port 0 with `env` and waits until it serves.
async fn launch(
    mut cmd: Command,
    env: &[(&str, &str)],
) -> (tokio::process::Child, String, String, Log) {
    cmd.env("HTTP_ADDR", "127.0.0.1:0")
        .env("GRPC_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let log = Log::default();
    let mut errors = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn({
        let log = log.clone();
        async move {
            while let Ok(Some(line)) = errors.next_line().await {
                log.lock().unwrap().push(line);
            }
        }
    });

    // The service logs the addresses it bound; port 0 means we learn them from the log.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let serving = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.lock().unwrap().push(line.clone());
            let entry: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if entry["message"] == "zoom-integration serving" {
                return entry;
            }
        }
        panic!("the service exited before serving");
    })
    .await
    .expect("the service starts within 20 s");
    // Keep reading the log so the service never blocks on a full pipe.
    tokio::spawn({
        let log = log.clone();
        async move {
            while let Ok(Some(line)) = lines.next_line().await {
                log.lock().unwrap().push(line);
            }
        }
    });
    let http = serving["http_addr"].as_str().unwrap().to_string();
    let grpc = serving["grpc_addr"].as_str().unwrap().to_string();
    (child, http, grpc, log)
}

#[tokio::test]
async fn sigterm_stops_both_servers_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, http, grpc) =
        start_service(&[("DATA_DIR", dir.path().to_str().unwrap())]).await;

    let health = crate::helpers::http_client()
        .get(format!("http://{http}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(
        crate::helpers::grpc_health(channel, "").await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    send_signal(&child, libc::SIGTERM);
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("stops within 10 s of SIGTERM")
        .unwrap();
    assert!(exit.success(), "graceful stop exits 0, got {exit:?}");
    assert!(
        crate::helpers::http_client()
            .get(format!("http://{http}/healthz"))
            .send()
            .await
            .is_err(),
        "HTTP listener closed"
    );
    assert!(
        tokio::net::TcpStream::connect(&grpc).await.is_err(),
        "gRPC listener closed"
    );
}

#[tokio::test]
async fn healthcheck_exits_0_while_the_service_serves_and_1_when_nothing_answers() {
    let healthcheck = |http_addr: &str| {
        let mut cmd = service();
        cmd.arg("healthcheck").env("HTTP_ADDR", http_addr);
        async move {
            tokio::time::timeout(Duration::from_secs(10), cmd.output())
                .await
                .expect("a healthcheck ends within its timeout")
                .unwrap()
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut child, http, _) = start_service(&[("DATA_DIR", dir.path().to_str().unwrap())]).await;
    let port = http.rsplit(':').next().unwrap();
    // Its own address, and every interface as the image configures it (probed on loopback).
    for addr in [http.clone(), format!("0.0.0.0:{port}")] {
        let out = healthcheck(&addr).await;
        assert_eq!(out.status.code(), Some(0), "{addr}: {out:?}");
        let said = String::from_utf8(out.stdout).unwrap();
        assert_eq!(said.lines().count(), 1, "one line: {said:?}");
        assert!(said.contains("healthy") && said.contains("200"), "{said}");
    }

    // A listener that takes connections but never answers: unhealthy after 2 s.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let started = std::time::Instant::now();
    let out = healthcheck(&silent.local_addr().unwrap().to_string()).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let said = String::from_utf8(out.stderr).unwrap();
    assert!(
        said.contains("unhealthy") && said.contains("no answer within 2 s"),
        "{said}"
    );
    drop(silent);

    // The service stopped: nothing listens on its port any more.
    child.kill().await.unwrap();
    let out = healthcheck(&http).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8(out.stderr).unwrap();
    assert_eq!(said.lines().count(), 1, "one line: {said:?}");
    assert!(said.contains("unhealthy"), "{said}");
    assert!(out.stdout.is_empty());

    // A configuration it cannot read is unhealthy too, never Docker's reserved 2 or 64.
    let out = healthcheck("not-an-address").await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// Sends `signal` (`libc::SIGTERM`, …) to `child`; no `kill` command is needed (slim
/// images have none).
pub fn send_signal(child: &tokio::process::Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id().expect("the child is running")).unwrap();
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let sent = unsafe { libc::kill(pid, signal) };
    assert_eq!(sent, 0, "kill: {}", std::io::Error::last_os_error());
}

#[tokio::test]
async fn a_second_sigterm_ends_a_shutdown_still_waiting_for_a_request_at_once() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, http, _) = start_service(&[
        ("DATA_DIR", dir.path().to_str().unwrap()),
        ("ZOOM_SECRET_TOKEN", "secret"),
    ])
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A webhook whose body never comes: in flight until its body's time runs out.
    let mut stalled = tokio::net::TcpStream::connect(&http).await.unwrap();
    let ts = crate::webhooks::now();
    stalled
        .write_all(
            format!(
                "POST /zoom/event HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\
                 x-zm-request-timestamp: {ts}\r\nx-zm-signature: v0=00\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    send_signal(&child, libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first SIGTERM waits for the request"
    );
    send_signal(&child, libc::SIGTERM);
    let exit = tokio::time::timeout(Duration::from_secs(2), child.wait())
        .await
        .expect("a second SIGTERM ends it at once")
        .unwrap();
    assert_eq!(exit.code(), Some(143), "{exit:?}");
}

#[tokio::test]
async fn dead_letters_are_driven_back_only_while_the_service_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let redrive = || {
        let mut cmd = service();
        cmd.arg("redrive-dead-letters").env("DATA_DIR", data_dir);
        cmd.output()
    };
    let (mut child, _, _) = start_service(&[("DATA_DIR", data_dir)]).await;
    let refused = redrive().await.unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("is in use by another process"), "{said}");

    send_signal(&child, libc::SIGTERM);
    child.wait().await.unwrap();
    // A dead letter, as the forwarder leaves one after the host kept refusing it. Received
    // now: an event older than EVENT_RETENTION_DAYS would be delivered and then trimmed from
    // the event log by the trim that runs at start.
    let cid = zoom_integration::ids::ConnectionId::generate().to_string();
    let received_ms = crate::webhooks::now() as i64 * 1000 - 1_000;
    let outbox = rusqlite::Connection::open(dir.path().join("outbox.db")).unwrap();
    outbox
        .execute(
            "INSERT INTO dead_letters
                 (destination, received_ms, event_type, memo, body, failed_ms, error)
             VALUES (?1, ?2, 'meeting.started', '{}', ?3, ?4, 'refused')",
            rusqlite::params![
                cid,
                received_ms,
                br#"{"event":"meeting.started","payload":{"account_id":"a","object":{"id":"7"}}}"#
                    .to_vec(),
                received_ms + 500
            ],
        )
        .unwrap();
    drop(outbox);
    let done = redrive().await.unwrap();
    assert!(done.status.success(), "{:?}", done);
    let said = String::from_utf8_lossy(&done.stdout);
    assert!(said.contains("1 dead letters moved back"), "{said}");

    // Delivered on the next start.
    let (mut child, _, grpc) = start_service(&[("DATA_DIR", data_dir)]).await;
    let mut events = EventsServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    // Generous: the forwarder runs at nice 10, so on a machine busy with other work (builds
    // beside the tests) it may wait seconds for a core.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let listed = events
            .list(ListRequest::default())
            .await
            .unwrap()
            .into_inner()
            .events;
        if let [event] = listed.as_slice() {
            assert_eq!(
                (event.destination_id.as_str(), event.event_type.as_str()),
                (cid.as_str(), "meeting.started")
            );
            break;
        }
        assert!(listed.is_empty(), "{listed:?}");
        assert!(std::time::Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().await.unwrap();
}

#[tokio::test]
async fn every_webhook_answered_200_is_delivered_after_a_sigkill_and_restart() {
    answered_webhooks_survive_a_sigkill("full").await;
}

#[tokio::test]
async fn with_outbox_sync_normal_answered_webhooks_still_survive_a_sigkill() {
    answered_webhooks_survive_a_sigkill("normal").await;
}

async fn answered_webhooks_survive_a_sigkill(outbox_sync: &str) {
    use crate::webhooks::{ACCOUNT, SECRET, post_to, post_until_recorded};
    let host = crate::fake_host::FakeHost::start().await;
    let cid = zoom_integration::ids::ConnectionId::generate().to_string();
    host.put(crate::helpers::var(
        &cid,
        "auth_type",
        "oauthDefault",
        false,
    ));
    host.put(crate::helpers::var(&cid, "account_id", ACCOUNT, false));
    // Up for routing, but taking no events: everything answered stays in the outbox.
    host.state.lock().unwrap().refuse_dispatch = true;

    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("DATA_DIR", dir.path().to_str().unwrap()),
        ("HOST_ENGINE_URL", &host.url()),
        ("ZOOM_SECRET_TOKEN", SECRET),
        ("OUTBOX_SYNC", outbox_sync),
    ];
    let (mut child, http, _) = start_service(&env).await;
    let client = crate::helpers::http_client();
    let url = format!("http://{http}/zoom/event");
    let body = |n: u64| {
        serde_json::json!({
            "event": "meeting.participant_joined",
            "event_ts": n,
            "payload": {"account_id": ACCOUNT, "object": {"participant": {"user_name": "Zdeněk Ødegård"}}}
        })
        .to_string()
        .into_bytes()
    };
    post_until_recorded(&client, &url, SECRET, &body(0)).await;
    let mut answered = std::collections::BTreeSet::from([0i64]);
    for n in 1..=50u64 {
        let (status, answer) =
            post_to(&client, &url, SECRET, crate::webhooks::now(), &body(n)).await;
        assert_eq!((status, answer["status"].as_str()), (200, Some("recorded")));
        answered.insert(n as i64);
    }
    child.kill().await.unwrap();
    assert!(host.state.lock().unwrap().dispatched.is_empty());

    host.state.lock().unwrap().refuse_dispatch = false;
    let (mut child, _, _) = start_service(&env).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let delivered: std::collections::BTreeSet<i64> = host
            .state
            .lock()
            .unwrap()
            .dispatched
            .iter()
            .map(|e| e.data["event_ts"].integer.as_ref().unwrap().v)
            .collect();
        if delivered == answered {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {} delivered after the restart",
            delivered.len(),
            answered.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_refresh_zoom_took_but_answered_unreadably_is_logged_as_an_error_naming_the_connection() {
    use zoom_integration::proto::autokitteh::integrations::v1::TestConnectionRequest;
    use zoom_integration::proto::autokitteh::integrations::v1::integrations_service_client::IntegrationsServiceClient;
    use zoom_integration::proto::autokitteh::vars::v1 as vars;
    use zoom_integration::proto::autokitteh::vars::v1::vars_service_client::VarsServiceClient;

    let zoom = crate::fake_zoom::FakeZoom::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut env: Vec<(&str, String)> = zoom.env();
    env.push(("DATA_DIR", dir.path().display().to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (mut child, _http, grpc, log) = start_service_with_log(&env).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let cid = zoom_integration::ids::ConnectionId::generate().to_string();
    let refresh = zoom.issue_refresh_token(crate::fake_zoom::DEFAULT_CLIENT_ID);
    VarsServiceClient::new(channel.clone())
        .set(vars::SetRequest {
            vars: vec![
                crate::helpers::var(&cid, "auth_type", "oauthDefault", false),
                crate::helpers::var(&cid, "oauth_refresh_token", &refresh, true),
                crate::helpers::var(
                    &cid,
                    "oauth_expiry",
                    &crate::fresh_tokens::a_minute_ago(),
                    false,
                ),
            ],
        })
        .await
        .unwrap();
    zoom.state.lock().unwrap().token_answers_unreadable = true;
    let status = IntegrationsServiceClient::new(channel)
        .test_connection(TestConnectionRequest {
            integration_id: crate::helpers::zoom_id(),
            connection_id: cid.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert!(status.message.contains("cannot be read"), "{status:?}");

    // The log is read as the process writes it: the line may arrive just after the answer.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let line = loop {
        let lines = log.lock().unwrap().clone();
        if let Some(line) = lines.iter().find(|l| l.contains("probably lost")) {
            break line.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no error line: {lines:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let line = &line;
    let entry: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(entry["level"], "ERROR", "{line}");
    assert!(line.contains(&cid), "names the connection: {line}");
    assert!(!line.contains(&refresh), "no token in the log: {line}");
    child.kill().await.unwrap();
}
