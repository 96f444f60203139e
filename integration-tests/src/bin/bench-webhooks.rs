//! Benchmark of `POST /zoom/event` (not a test): `cargo run --release -p integration-tests --bin bench-webhooks`.
//!
//! 1. A floor: a plain axum handler that reads the body and answers 200.
//! 2. The whole service (embedded host, fresh DATA_DIR): verify, dedupe, durable record, with
//!    the forwarder draining into the embedded host at the same time.
//!
//! 3. The floor plus the full path's checks, without the durable record: the ceiling.
//!
//! All get the same distinct, validly signed `meeting.started` bodies from `WORKERS` keep-alive
//! connections on loopback for `SECONDS` each, in `ROUNDS` rounds; only answers that are 200
//! and say "recorded" (the floor: any 200) count, and the service's own count of recorded
//! webhooks must agree. After the last round, the full path open-loop at half the floor's rate
//! (latency counted from when each request was due), how long the forwarder (which yields the
//! CPU to requests) takes to catch up, and its drain rate from an outbox pre-filled with
//! `DRAIN_EVENTS` events. Each run reports the process's CPU time per request, in all and by
//! kind of thread (the load generator and request handling share the runtime's threads; the
//! committer; the forwarder). Exits 1 if any request failed or the counts disagree.
//! Environment knobs: `WORKERS` (32), `SECONDS` (5), `ROUNDS` (3), `DRAIN_EVENTS` (100000),
//! `OUTBOX_SYNC` (`full`, the default, or `normal`: see the README).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::response::IntoResponse;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use zoom_integration::config::Config;
use zoom_integration::credentials::Credentials;
use zoom_integration::crypto::Keys;
use zoom_integration::host::embedded::EmbeddedHost;
use zoom_integration::host::{HostEngine, Var};
use zoom_integration::ids::ConnectionId;
use zoom_integration::secret::Secret;
use zoom_integration::webhook::normalize::Received;
use zoom_integration::webhook::outbox::{Outbox, OutboxSettings, Record};
use zoom_integration::webhook::{Counters, forwarder};
use zoom_integration::zoom::oauth::ZoomOAuth;

const SECRET: &str = "bench-zoom-secret-token";
const KEY: &str = "bench key material, at least 32 characters long";
const ACCOUNT: &str = "PX5yQAcnT5azdXF5ma2Apw";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn body(n: u64) -> Vec<u8> {
    format!(
        r#"{{"event":"meeting.started","payload":{{"account_id":"{ACCOUNT}","object":{{"duration":0,"start_time":"2022-03-23T12:33:26Z","timezone":"","topic":"Zdeněk Ødegård's Zoom Meeting","id":"{n}","type":1,"uuid":"hwkAADUySwyG3GyUkqc0vA==","host_id":"tUo7WohjTs6ELvl9WR3JAA"}}}},"event_ts":{}}}"#,
        1_648_038_806_658u64 + n
    )
    .into_bytes()
}

fn sign(timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

struct RunResult {
    /// CPU time of the whole process (load, service, background threads) during the run.
    cpu: Duration,
    /// The same, by kind of thread: (name, CPU time), largest first.
    by_thread: Vec<(&'static str, Duration)>,
    /// Requests answered as expected (200, and the expected answer): only these count.
    requests: u64,
    /// Requests answered otherwise, or not at all; left out of the rate and the latencies.
    failures: u64,
    seconds: f64,
    /// Latencies of the counted requests, sorted: from the moment each was sent, or, in a
    /// paced run, from the moment it was due (so a request held up behind others counts
    /// the time it waited to be sent).
    latencies_us: Vec<u32>,
}

impl RunResult {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> f64 {
        percentile(&self.latencies_us, p)
    }

    fn line(&self, name: &str) -> String {
        format!(
            "{name:<34} {:>9.0} req/s   p50 {:>6.2} ms   p99 {:>6.2} ms   {:>5.1} us CPU/req   ({} requests, {} failed)",
            self.rps(),
            self.percentile(0.50),
            self.percentile(0.99),
            self.us_per_request(self.cpu),
            self.requests,
            self.failures
        )
    }

    /// `cpu` spread over the run's counted requests, in microseconds each.
    fn us_per_request(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.requests.max(1) as f64
    }

    fn threads_line(&self) -> String {
        let parts: Vec<String> = self
            .by_thread
            .iter()
            .map(|(kind, cpu)| format!("{kind} {:.1}", self.us_per_request(*cpu)))
            .collect();
        format!("{:<34} {} us/req", "  by thread", parts.join(", "))
    }
}

/// The `p` quantile of sorted latencies in microseconds, in milliseconds.
fn percentile(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted_us[i]) / 1000.0
}

/// The kind of a thread, from its name: the benchmark's runtime runs the load generator and the
/// service's HTTP and gRPC; the rest are the service's own.
fn thread_kind(name: &str) -> &'static str {
    match name {
        "outbox-committe" => "committer",
        "forwarder" | "forwarder-io" => "forwarder",
        _ if name.starts_with("tokio") || name == "bench-webhooks" => "load+requests",
        _ => "other",
    }
}

/// CPU time each thread of this process has run so far, by thread id, with its kind. Empty
/// (with a warning, once) where the kernel keeps no `schedstat`.
fn thread_cpu() -> std::collections::HashMap<u32, (&'static str, Duration)> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let mut out = std::collections::HashMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        // The first field of schedstat: nanoseconds on a CPU.
        let Some(ns) = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
        else {
            WARNED.call_once(|| {
                eprintln!("warning: no /proc/self/task/*/schedstat: no CPU time by thread");
            });
            continue;
        };
        out.insert(tid, (thread_kind(name.trim()), Duration::from_nanos(ns)));
    }
    out
}

/// CPU time by kind of thread between two [`thread_cpu`] readings, largest first. A thread
/// that ended meanwhile loses its time (the blocking threads outlive a run).
fn cpu_by_kind(
    before: &std::collections::HashMap<u32, (&'static str, Duration)>,
    after: &std::collections::HashMap<u32, (&'static str, Duration)>,
) -> Vec<(&'static str, Duration)> {
    let mut sums: Vec<(&'static str, Duration)> = Vec::new();
    for (tid, (kind, cpu)) in after {
        let start = before.get(tid).map_or(Duration::ZERO, |(_, c)| *c);
        let spent = cpu.saturating_sub(start);
        match sums.iter_mut().find(|(k, _)| k == kind) {
            Some((_, sum)) => *sum += spent,
            None => sums.push((kind, spent)),
        }
    }
    sums.sort_by_key(|(_, cpu)| std::cmp::Reverse(*cpu));
    sums
}

/// One server under load: its URL, the client that keeps connections to it from one run to
/// the next, and what a good answer's body contains.
struct Target {
    url: String,
    client: reqwest::Client,
    /// A 200 counts only if its body contains this (the floor answers an empty body).
    expect: &'static str,
}

impl Target {
    fn new(url: String, connections: usize, expect: &'static str) -> Self {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .tcp_nodelay(true)
            .build()
            .unwrap();
        Self {
            url,
            client,
            expect,
        }
    }

    /// Sends webhook `n`, freshly signed; whether the answer was the expected one.
    async fn send(&self, n: u64) -> bool {
        let body = body(n);
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string();
        let signature = sign(&ts, &body);
        let response = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("x-zm-request-timestamp", ts)
            .header("x-zm-signature", signature)
            .body(body)
            .send()
            .await;
        match response {
            Ok(r) => {
                let status = r.status();
                let body = r.bytes().await.unwrap_or_default();
                status == 200 && memchr_str(&body, self.expect)
            }
            Err(_) => false,
        }
    }
}

/// Whether `haystack` contains `needle` (always, for an empty needle).
fn memchr_str(haystack: &[u8], needle: &str) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
}

/// CPU readings at the start of a run, to subtract at its end.
struct CpuMark {
    process: Duration,
    threads: std::collections::HashMap<u32, (&'static str, Duration)>,
}

impl CpuMark {
    fn now() -> Self {
        Self {
            process: process_cpu(),
            threads: thread_cpu(),
        }
    }

    fn result(&self, seconds: f64, mut latencies_us: Vec<u32>, failures: u64) -> RunResult {
        latencies_us.sort_unstable();
        RunResult {
            cpu: process_cpu().saturating_sub(self.process),
            by_thread: cpu_by_kind(&self.threads, &thread_cpu()),
            requests: latencies_us.len() as u64,
            failures,
            seconds,
            latencies_us,
        }
    }
}

/// Loads `target` from `workers` connections for `duration`, each sending its next request as
/// soon as the last is answered. Bodies are numbered from `first` on, so every run sends new
/// ones.
async fn load(
    target: &Arc<Target>,
    workers: u64,
    duration: Duration,
    first: Arc<AtomicU64>,
) -> RunResult {
    let start = Instant::now();
    let mark = CpuMark::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (target, first) = (target.clone(), first.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0u64;
            while start.elapsed() < duration {
                let n = first.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                if target.send(n).await {
                    latencies.push(micros(sent.elapsed()));
                } else {
                    failures += 1;
                }
            }
            (latencies, failures)
        });
    }
    let mut all = Vec::new();
    let mut failures = 0;
    while let Some(done) = tasks.join_next().await {
        let (latencies, f) = done.unwrap();
        all.extend(latencies);
        failures += f;
    }
    mark.result(start.elapsed().as_secs_f64(), all, failures)
}

/// Connections a paced run sends over (`PACED_CONNECTIONS`), each with its share of the
/// schedule: more than the rate times the latency needs, so the connections never set the pace
/// while the server keeps up.
const PACED_CONNECTIONS: u64 = 256;

/// Open-loop load: request `k` is due at `k / rate` seconds for `duration`, whether or not
/// earlier ones were answered. `connections` tasks share the schedule (task `i` sends requests
/// `i`, `i + connections`, ...), each over a keep-alive connection of its own; one whose last
/// answer came late sends its next at once, so waiting behind a stalled server counts in the
/// latency (wrk2's way). The runtime's timers tick by the millisecond and may fire a tick late,
/// so a task sets its timer 2 ms before a request is due and sends it when woken: each latency
/// counts from when the request was due or from when it was sent, whichever came first, and is
/// never less than the request took. Returns the run and the latencies counted from each request's sending, sorted.
async fn load_paced(
    target: &Arc<Target>,
    rate: f64,
    connections: u64,
    duration: Duration,
    first: Arc<AtomicU64>,
) -> (RunResult, Vec<u32>) {
    let start = Instant::now();
    let mark = CpuMark::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..connections {
        let (target, first) = (target.clone(), first.clone());
        tasks.spawn(async move {
            let (mut from_due, mut from_sent, mut failures) = (Vec::new(), Vec::new(), 0u64);
            let mut last_answer = start;
            let mut k = i;
            loop {
                let due = start + Duration::from_secs_f64(k as f64 / rate);
                if due >= start + duration {
                    break;
                }
                let early = due.checked_sub(Duration::from_millis(2)).unwrap_or(due);
                if early > Instant::now() {
                    tokio::time::sleep_until(early.into()).await;
                }
                let n = first.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                if target.send(n).await {
                    let answered = Instant::now();
                    from_due.push(micros(answered - due.min(sent)));
                    from_sent.push(micros(answered - sent));
                    last_answer = answered;
                } else {
                    failures += 1;
                }
                k += connections;
            }
            (from_due, from_sent, failures, last_answer)
        });
    }
    let (mut from_due, mut from_sent, mut failures) = (Vec::new(), Vec::new(), 0);
    let mut last = start;
    while let Some(done) = tasks.join_next().await {
        let (due, sent, f, answered) = done.unwrap();
        from_due.extend(due);
        from_sent.extend(sent);
        failures += f;
        last = last.max(answered);
    }
    from_sent.sort_unstable();
    // The rate reached: counted requests over the time until the last was answered.
    let seconds = (last - start).as_secs_f64().max(f64::MIN_POSITIVE);
    (mark.result(seconds, from_due, failures), from_sent)
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// User and system CPU time this process has used so far.
fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the pointer it gets, which points to one.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

async fn floor_server() -> String {
    let app = axum::Router::new().route(
        "/zoom/event",
        axum::routing::post(|body: axum::body::Bytes| async move {
            std::hint::black_box(body.len());
            axum::http::StatusCode::OK
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/zoom/event")
}

/// The floor plus the full path's checks, without its durable record: what the request path
/// costs before the outbox. Verifies the signature and timestamp, reads the JSON head, checks
/// the body can become an event, hashes it and remembers the hash in memory, as the service
/// does, then answers 200. The full path's ratio cannot beat this one's.
async fn checks_server() -> String {
    use zoom_integration::webhook::{normalize, verify};
    let verifier = Arc::new(verify::Verifier::new(&Secret::new(SECRET)));
    let seen = Arc::new(std::sync::Mutex::new(
        std::collections::HashSet::<u64>::new(),
    ));
    let check = move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
        let (verifier, seen) = (verifier.clone(), seen.clone());
        async move {
            let header = |name| headers.get(name).map_or(&[][..], |v| v.as_bytes());
            let timestamp = header("x-zm-request-timestamp");
            let window = Duration::from_secs(90 * 60);
            let fresh = verify::check_timestamp(timestamp, SystemTime::now(), window).is_ok();
            let signed = verifier.verifies(header("x-zm-signature"), timestamp, &body);
            let head: Option<serde_json::Map<String, serde_json::Value>> =
                serde_json::from_slice(&body).ok();
            let event = head.as_ref().and_then(|h| h.get("event")?.as_str());
            if !fresh || !signed || event.is_none() || normalize::top_level_fields(&body).is_err() {
                return axum::http::StatusCode::BAD_REQUEST.into_response();
            }
            let hash: [u8; 32] = Sha256::digest(&body).into();
            let key = u64::from_le_bytes(hash[..8].try_into().unwrap());
            let new = seen.lock().unwrap().insert(key);
            axum::Json(serde_json::json!({ "status": if new { "recorded" } else { "duplicate" } }))
                .into_response()
        }
    };
    let app = axum::Router::new().route("/zoom/event", axum::routing::post(check));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/zoom/event")
}

async fn service(dir: &std::path::Path) -> String {
    let keys = Arc::new(Keys::load_or_generate(Some(&Secret::new(KEY)), dir).unwrap());
    {
        let host = EmbeddedHost::open(dir, keys).unwrap();
        let cid = ConnectionId::generate();
        host.set_vars(
            &cid,
            vec![
                Var::plain("auth_type", "oauthDefault"),
                Var::plain("account_id", ACCOUNT),
            ],
        )
        .await
        .unwrap();
    }
    let config = Config::load([
        ("DATA_DIR".to_string(), dir.display().to_string()),
        ("SECRET_KEY".to_string(), KEY.to_string()),
        ("ZOOM_SECRET_TOKEN".to_string(), SECRET.to_string()),
        (
            "OUTBOX_SYNC".to_string(),
            std::env::var("OUTBOX_SYNC").unwrap_or_else(|_| "full".into()),
        ),
    ])
    .unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/zoom/event", http.local_addr().unwrap());
    tokio::spawn(zoom_integration::run(
        config,
        http,
        grpc,
        std::future::pending(),
    ));
    // Wait until routing is loaded: a first event is recorded.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b = body(u64::MAX / 2);
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string();
        let r = client
            .post(&url)
            .header("x-zm-request-timestamp", &ts)
            .header("x-zm-signature", sign(&ts, &b))
            .body(b)
            .send()
            .await;
        if let Ok(r) = r
            && r.status() == 200
            && r.text().await.unwrap_or_default().contains("recorded")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the service did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    url
}

/// `zoom_outbox_depth` from the service's metrics.
async fn outbox_depth(metrics_url: &str) -> u64 {
    let text = reqwest::get(metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("zoom_outbox_depth "))
        .and_then(|v| v.trim().parse().ok())
        .expect("zoom_outbox_depth in the metrics")
}

async fn drain(events: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
    let filled = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let cid = ConnectionId::generate().to_string();
    for w in 0..64u64 {
        let (outbox, cid) = (outbox.clone(), cid.clone());
        tasks.spawn(async move {
            let mut n = w;
            while n < events {
                let body = body(n);
                outbox
                    .record(Record {
                        body_hash: Sha256::digest(&body).into(),
                        destinations: vec![cid.clone()],
                        received: Received {
                            event_type: "meeting.started".into(),
                            memo: [("account_id".to_string(), ACCOUNT.to_string())].into(),
                            received_ms: 1,
                            body,
                        },
                        signed_at_ms: 0,
                    })
                    .await
                    .unwrap();
                n += 64;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let fill_rate = events as f64 / filled.elapsed().as_secs_f64();

    let keys = Arc::new(Keys::from_material(KEY.as_bytes()));
    let host = EmbeddedHost::open(dir.path(), keys).unwrap();
    let counters = Arc::new(Counters::new(&zoom_integration::metrics::Metrics::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let task = forwarder::spawn(
        outbox.clone(),
        forwarder::Target {
            host: Arc::new(host.clone()),
            embedded: Some(host.clone()),
            credentials: Arc::new(Credentials::new(
                Arc::new(host.clone()),
                ZoomOAuth::new(reqwest::Client::new(), &Config::load([]).unwrap()),
                None,
                Arc::new(zoom_integration::metrics::Metrics::new()),
            )),
        },
        counters.clone(),
        forwarder::ForwarderSettings::default(),
        stop.clone(),
    );
    while counters.delivered.get() < events {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the forwarder delivered {} of {events} events in ten minutes",
            counters.delivered.get()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Delivered rows leave the outbox with the next commit: part of the drain.
    outbox.flush().await;
    let drain_rate = events as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    let _ = task.await;
    let (left, dead) = outbox.counts().await.unwrap();
    assert_eq!((left, dead), (0, 0), "everything delivered");
    (fill_rate, drain_rate)
}

/// `zoom_webhooks_total{result="recorded"}` from the service's metrics.
async fn recorded_total(metrics_url: &str) -> u64 {
    metric(metrics_url, "zoom_webhooks_total{result=\"recorded\"} ").await
}

/// A metric's value, by the start of its line, from the service's metrics.
async fn metric(metrics_url: &str, prefix: &str) -> u64 {
    let text = reqwest::get(metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{prefix} in the metrics"))
}

/// Waits until the forwarder has delivered everything recorded; how long that took.
async fn caught_up(metrics_url: &str) -> Duration {
    let started = Instant::now();
    while outbox_depth(metrics_url).await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the forwarder stalled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    // reqwest is built without a default TLS provider (see zoom::init_tls).
    zoom_integration::zoom::init_tls();
    let workers = env_or("WORKERS", 32);
    let seconds = Duration::from_secs(env_or("SECONDS", 5));
    let rounds = env_or("ROUNDS", 3).max(1);
    let drain_events = env_or("DRAIN_EVENTS", 100_000);
    println!(
        "bench-webhooks: {workers} keep-alive connections, {}s per run, {rounds} rounds, {} cores, OUTBOX_SYNC={}",
        seconds.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::env::var("OUTBOX_SYNC").unwrap_or_else(|_| "full".into()),
    );
    let counter = Arc::new(AtomicU64::new(0));
    let mut problems = Vec::new();

    let connections = workers as usize;
    let floor = Arc::new(Target::new(floor_server().await, connections, ""));
    let checks = Arc::new(Target::new(
        checks_server().await,
        connections,
        "\"recorded\"",
    ));
    let dir = tempfile::tempdir().unwrap();
    let service = Arc::new(Target::new(
        service(dir.path()).await,
        connections,
        "\"recorded\"",
    ));
    let metrics_url = service.url.replace("/zoom/event", "/metrics");
    let paced_connections = env_or("PACED_CONNECTIONS", PACED_CONNECTIONS).max(1);
    // Open-loop runs keep a connection per task: their clients keep that many idle ones, so
    // none is closed and opened again in between.
    let paced_floor = Arc::new(Target::new(
        floor.url.clone(),
        paced_connections as usize,
        "",
    ));
    let paced_service = Arc::new(Target::new(
        service.url.clone(),
        paced_connections as usize,
        "\"recorded\"",
    ));

    // Warm all three up (connections, caches) before measuring, and open the paced runs'
    // connections, so none of their requests waits for a connection to be made.
    for target in [&floor, &checks, &service] {
        load(target, workers, Duration::from_millis(500), counter.clone()).await;
    }
    for target in [&paced_floor, &paced_service] {
        load(
            target,
            paced_connections,
            Duration::from_millis(500),
            counter.clone(),
        )
        .await;
    }

    let mut ratios = Vec::new();
    let mut ceilings = Vec::new();
    for round in 1..=rounds {
        // Each round starts with the forwarder idle, so the floor does not share the cores
        // with the last round's deliveries.
        caught_up(&metrics_url).await;
        println!("round {round}:");
        let floor_run = load(&floor, workers, seconds, counter.clone()).await;
        println!("{}", floor_run.line("floor (axum, read body, 200)"));
        println!("{}", floor_run.threads_line());
        let checks_run = load(&checks, workers, seconds, counter.clone()).await;
        println!("{}", checks_run.line("floor + checks (no durable record)"));
        let recorded_before = recorded_total(&metrics_url).await;
        let full = load(&service, workers, seconds, counter.clone()).await;
        let recorded = recorded_total(&metrics_url).await - recorded_before;
        println!("{}", full.line("full path (verify, dedupe, record)"));
        println!("{}", full.threads_line());
        // The forwarder yields the CPU to requests (it runs at a lower priority): how far
        // behind the full load left it, and how long it took to catch up.
        let behind = outbox_depth(&metrics_url).await;
        let took = caught_up(&metrics_url).await;
        println!(
            "  forwarder: {behind} events behind when the load ended, all delivered {:.2} s later",
            took.as_secs_f64()
        );
        if recorded != full.requests {
            problems.push(format!(
                "round {round}: {} answers said recorded, the service counted {recorded}",
                full.requests
            ));
        }
        for (name, run) in [
            ("floor", &floor_run),
            ("checks", &checks_run),
            ("full path", &full),
        ] {
            if run.failures > 0 {
                problems.push(format!(
                    "round {round}: {} {name} requests failed",
                    run.failures
                ));
            }
        }
        let (ceiling, ratio) = (
            100.0 * checks_run.rps() / floor_run.rps(),
            100.0 * full.rps() / floor_run.rps(),
        );
        println!(
            "ratio checks/floor {ceiling:.1}% (the full path's ceiling), full/floor {ratio:.1}%"
        );
        ceilings.push(ceiling);
        ratios.push(ratio);
        if round == rounds {
            // The target's rate, then, for comparison, half the rate the full path reached and
            // a steady 1,000 webhooks a second (a busy Zoom account).
            let rates = [
                ("half the floor's rate", floor_run.rps() / 2.0),
                ("half the full path's rate", full.rps() / 2.0),
                ("a steady rate", 1000.0),
            ];
            // The same schedule against the floor first: what the load generator and the
            // HTTP path alone give at the target's rate, so the full path's line below can be
            // read against it.
            let rate = floor_run.rps() / 2.0;
            let (paced, _) = load_paced(
                &paced_floor,
                rate,
                paced_connections,
                seconds,
                counter.clone(),
            )
            .await;
            println!("{}", paced.line(&format!("floor paced at {rate:.0} req/s")));
            println!(
                "  the floor at half its rate: answered {:.0} req/s; from when each request was due p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
                paced.rps(),
                paced.percentile(0.90),
                paced.percentile(0.99),
                paced.percentile(0.999),
            );
            if paced.failures > 0 {
                problems.push(format!("paced floor: {} requests failed", paced.failures));
            }
            for (what, rate) in rates {
                caught_up(&metrics_url).await;
                let recorded_before = recorded_total(&metrics_url).await;
                let (paced, from_sent) = load_paced(
                    &paced_service,
                    rate,
                    paced_connections,
                    seconds,
                    counter.clone(),
                )
                .await;
                let recorded = recorded_total(&metrics_url).await - recorded_before;
                println!(
                    "{}",
                    paced.line(&format!("full path paced at {rate:.0} req/s"))
                );
                println!("{}", paced.threads_line());
                println!(
                    "  {what}: asked {:.0} req/s, answered {:.0} req/s; from when each request was due p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; from when it was sent p99 {:.2} ms",
                    rate,
                    paced.rps(),
                    paced.percentile(0.90),
                    paced.percentile(0.99),
                    paced.percentile(0.999),
                    percentile(&from_sent, 0.99),
                );
                if recorded != paced.requests {
                    problems.push(format!(
                        "paced: {} answers said recorded, the service counted {recorded}",
                        paced.requests
                    ));
                }
                if paced.failures > 0 {
                    problems.push(format!("paced: {} requests failed", paced.failures));
                }
            }
            println!("(target: p99 <= 5 ms at half the floor's rate)");
        }
    }
    println!(
        "median of {rounds} rounds: full/floor {:.1}% (target >= 75%), checks/floor {:.1}%",
        median(ratios),
        median(ceilings)
    );

    let (fill, drain) = drain(drain_events).await;
    println!(
        "outbox: {drain_events} events recorded at {fill:.0}/s, drained into the embedded host at {drain:.0} events/s (target >= 20000)"
    );
    if !problems.is_empty() {
        for problem in &problems {
            eprintln!("FAILED: {problem}");
        }
        std::process::exit(1);
    }
}
