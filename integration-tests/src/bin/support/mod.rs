//! What the benchmark binaries share: memory readings and a minimal fake Zoom.

use tokio::net::TcpListener;

/// The resident memory of this process, in MiB.
pub fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// A fake Zoom that answers `GET /v2/users/me` for any bearer token; returns its base URL.
pub async fn fake_zoom() -> String {
    let app = axum::Router::new().route(
        "/v2/users/me",
        axum::routing::get(|| async {
            (
                [("content-type", "application/json")],
                r#"{"id":"KdYKjnimT4KPd8FFgQt9FQ","account_id":"lAAAAAAAAAAAAA","email":"zoe@example.com","display_name":"Zoë Ångström","type":2}"#,
            )
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}
