//! Faults, each stating what was sent and proving what arrived: a slow host, a failing host,
//! SIGTERM under load, and a full disk while webhooks arrive.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zoom_integration::ids::ConnectionId;

use crate::fake_host::FakeHost;
use crate::helpers::{http_client, spawn_app_with, var};
use crate::process::{
    send_signal, start_service_with_file_limit, start_service_with_log,
    start_service_with_open_files_limit,
};
use crate::webhooks::{ACCOUNT, SECRET, now, post_to, post_until_recorded};

/// A routed `meeting.participant_joined` body whose `event_ts` is `n`, padded to `pad` bytes.
fn body(n: u64, pad: usize) -> Vec<u8> {
    serde_json::json!({
        "event": "meeting.participant_joined",
        "event_ts": n,
        "payload": {"account_id": ACCOUNT, "object": {"id": n.to_string(), "note": "x".repeat(pad)}}
    })
    .to_string()
    .into_bytes()
}

/// The service with `host` as its host engine and the default app's secret token.
async fn app_on(host: &FakeHost) -> crate::helpers::TestApp {
    spawn_app_with(&[
        ("HOST_ENGINE_URL", &host.url()),
        ("ZOOM_SECRET_TOKEN", SECRET),
    ])
    .await
}

/// A host with one default-app connection of [`ACCOUNT`].
async fn host_with_connection() -> FakeHost {
    let host = FakeHost::start().await;
    let cid = ConnectionId::generate().to_string();
    host.put(var(&cid, "auth_type", "oauthDefault", false));
    host.put(var(&cid, "account_id", ACCOUNT, false));
    host
}

fn delivered(host: &FakeHost) -> BTreeSet<i64> {
    host.state
        .lock()
        .unwrap()
        .dispatched
        .iter()
        .map(|e| e.data["event_ts"].integer.as_ref().unwrap().v)
        .collect()
}

/// Waits until the host has every event of `answered`.
async fn wait_for(host: &FakeHost, answered: &BTreeSet<i64>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = delivered(host);
        if answered.is_subset(&got) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} answered events delivered",
            answered.intersection(&got).count(),
            answered.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_slow_host_delays_delivery_but_not_the_answers_to_zoom() {
    let host = host_with_connection().await;
    // Each delivery takes 2 s; an answer that waited for one would take as long.
    host.state.lock().unwrap().dispatch_delay = Duration::from_secs(2);
    let app = app_on(&host).await;
    let url = app.url("/zoom/event");
    post_until_recorded(&app.http_client, &url, SECRET, &body(0, 0)).await;
    // Sent: 30 webhooks, one after another.
    let mut answered = BTreeSet::from([0]);
    let mut slowest = Duration::ZERO;
    for n in 1..=30 {
        let started = Instant::now();
        let (status, _) = post_to(&app.http_client, &url, SECRET, now(), &body(n, 0)).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(status, 200);
        answered.insert(n as i64);
    }
    assert!(
        slowest < Duration::from_secs(1),
        "answers waited for the host: {slowest:?}"
    );
    // Arrived: all 31.
    wait_for(&host, &answered, Duration::from_secs(20)).await;
}

#[tokio::test]
async fn a_host_taking_longer_than_other_calls_may_to_take_an_event_gets_it_once() {
    let host = host_with_connection().await;
    // Starting a workflow on a loaded host: past the 10 s other host calls get.
    host.state.lock().unwrap().dispatch_delay = Duration::from_secs(12);
    let app = app_on(&host).await;
    post_until_recorded(
        &app.http_client,
        &app.url("/zoom/event"),
        SECRET,
        &body(0, 0),
    )
    .await;
    wait_for(&host, &BTreeSet::from([0]), Duration::from_secs(30)).await;
    // Given up on and sent again, it would have been started twice (or never taken at all).
    assert_eq!(host.state.lock().unwrap().dispatch_calls, 1);
}

#[tokio::test]
async fn a_host_failing_with_errors_gets_every_event_once_it_recovers() {
    let host = host_with_connection().await;
    let app = app_on(&host).await;
    let url = app.url("/zoom/event");
    post_until_recorded(&app.http_client, &url, SECRET, &body(0, 0)).await;
    wait_for(&host, &BTreeSet::from([0]), Duration::from_secs(30)).await;
    // Sent: 20 webhooks while the host answers INTERNAL to every Dispatch, for a second.
    host.state.lock().unwrap().fail_dispatch = true;
    let mut answered = BTreeSet::new();
    for n in 1..=20 {
        assert_eq!(
            post_to(&app.http_client, &url, SECRET, now(), &body(n, 0))
                .await
                .0,
            200
        );
        answered.insert(n as i64);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        delivered(&host).len() == 1,
        "nothing arrives while the host fails"
    );
    host.state.lock().unwrap().fail_dispatch = false;
    // Arrived: all 20, after the retries.
    wait_for(&host, &answered, Duration::from_secs(20)).await;
}

#[tokio::test]
async fn sigterm_under_load_finishes_what_it_answered_and_loses_nothing() {
    let host = host_with_connection().await;
    host.state.lock().unwrap().dispatch_delay = Duration::from_millis(50);
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("DATA_DIR", dir.path().to_str().unwrap()),
        ("HOST_ENGINE_URL", &host.url()),
        ("ZOOM_SECRET_TOKEN", SECRET),
        ("SHUTDOWN_TIMEOUT", "5"),
    ];
    let (mut child, http, _, _) = start_service_with_log(&env).await;
    let url = format!("http://{http}/zoom/event");
    let client = http_client();
    post_until_recorded(&client, &url, SECRET, &body(0, 0)).await;

    // Sent: four clients posting distinct webhooks as fast as they can; SIGTERM amid them.
    let answered = Arc::new(Mutex::new(BTreeSet::from([0i64])));
    let mut posters = Vec::new();
    for worker in 0..4u64 {
        let (client, url, answered) = (client.clone(), url.clone(), answered.clone());
        posters.push(tokio::spawn(async move {
            for i in 0.. {
                let n = 1 + worker + 4 * i;
                let ts = now().to_string();
                let b = body(n, 0);
                let sent = client
                    .post(&url)
                    .header("x-zm-request-timestamp", &ts)
                    .header("x-zm-signature", crate::webhooks::sign(SECRET, &ts, &b))
                    .body(b)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 200 => {
                        answered.lock().unwrap().insert(n as i64);
                    }
                    Ok(_) => {}
                    Err(_) => return, // the server is gone
                }
            }
        }));
    }
    // Under load: once 20 are answered (however long a busy machine takes), and still going.
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered.lock().unwrap().len() <= 20 {
        assert!(Instant::now() < deadline, "20 webhooks never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send_signal(&child, libc::SIGTERM);
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("stops within the shutdown timeout")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    for poster in posters {
        let _ = poster.await;
    }
    let answered = answered.lock().unwrap().clone();

    // Arrived: every answered webhook, some before the stop and the rest after a restart.
    let (mut child, _, _, _) = start_service_with_log(&env).await;
    wait_for(&host, &answered, Duration::from_secs(20)).await;
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_full_disk_gets_503_and_every_webhook_answered_200_is_delivered_later() {
    let host = host_with_connection().await;
    // The host takes nothing, so the outbox only grows.
    host.state.lock().unwrap().refuse_dispatch = true;
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("DATA_DIR", dir.path().to_str().unwrap()),
        ("HOST_ENGINE_URL", &host.url()),
        ("ZOOM_SECRET_TOKEN", SECRET),
    ];
    // Files may grow to 1 MiB: the databases start far smaller.
    let (mut child, http, _, log) = start_service_with_file_limit(&env, 1024).await;
    let url = format!("http://{http}/zoom/event");
    let client = http_client();
    post_until_recorded(&client, &url, SECRET, &body(0, 0)).await;

    // Sent: 4 KiB webhooks until the disk is full, then 20 more.
    let mut answered = BTreeSet::from([0i64]);
    let mut refused = 0;
    let mut n = 1u64;
    while refused < 20 {
        assert!(n < 2000, "the disk never filled up");
        let (status, _) = post_to(&client, &url, SECRET, now(), &body(n, 4096)).await;
        match status {
            // A checkpoint may free room in the log now and then: a 200 is a 200.
            200 => {
                answered.insert(n as i64);
            }
            503 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
        n += 1;
    }
    assert!(
        answered.len() > 10,
        "{} answered before the disk filled",
        answered.len()
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the service is still running"
    );
    child.kill().await.unwrap();
    let log = log.lock().unwrap().join("\n");
    assert!(
        log.contains("event outbox database commit failed"),
        "the failure is logged"
    );

    // Arrived: after a restart with room on disk, every webhook answered 200.
    host.state.lock().unwrap().refuse_dispatch = false;
    let (mut child, _, _, _) = start_service_with_log(&env).await;
    wait_for(&host, &answered, Duration::from_secs(20)).await;
    child.kill().await.unwrap();
}

/// CPU time `pid` has used, in clock ticks (user and system, from `/proc`).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) end with ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn out_of_file_descriptors_the_grpc_port_pauses_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("DATA_DIR", dir.path().to_str().unwrap())];
    let (mut child, _, grpc, log) = start_service_with_open_files_limit(&env, 64).await;
    // More connections than the process may open files for: the rest wait in the backlog,
    // and each accept fails (EMFILE) until some close.
    let mut sockets = Vec::new();
    for _ in 0..100 {
        sockets.push(tokio::net::TcpStream::connect(&grpc).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = child.id().unwrap();
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(pid) - before;
    assert!(
        used * 5 < ticks_per_second,
        "{used} of {ticks_per_second} ticks of CPU in a second, doing nothing"
    );
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .any(|line| line.contains("accepting a gRPC connection failed")),
        "the failure is logged"
    );
    drop(sockets);
    child.kill().await.unwrap();
}
