//! The real binary as a process: `--help`, configuration errors, and SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_service-under-test");

fn service() -> Command {
    let mut cmd = Command::new(BIN);
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
async fn sigterm_stops_both_servers_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = service()
        .env("DATA_DIR", dir.path())
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("GRPC_ADDR", "127.0.0.1:0")
        .env("LOG_FORMAT", "json")
        .spawn()
        .unwrap();

    // The service logs the addresses it bound; port 0 means we learn them from the log.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let serving = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let entry: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if entry["message"] == "zoom-integration serving" {
                return entry;
            }
        }
        panic!("the service exited before serving");
    })
    .await
    .expect("the service starts within 20 s");
    let http = serving["http_addr"].as_str().unwrap().to_string();
    let grpc = serving["grpc_addr"].as_str().unwrap().to_string();

    let health = reqwest::get(format!("http://{http}/healthz"))
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

    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .unwrap();
    assert!(kill.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("stops within 10 s of SIGTERM")
        .unwrap();
    assert!(exit.success(), "graceful stop exits 0, got {exit:?}");
    assert!(
        reqwest::get(format!("http://{http}/healthz"))
            .await
            .is_err(),
        "HTTP listener closed"
    );
    assert!(
        tokio::net::TcpStream::connect(&grpc).await.is_err(),
        "gRPC listener closed"
    );
}
