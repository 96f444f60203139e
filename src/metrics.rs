//! Prometheus metrics, served as text at `GET /metrics`: webhooks by result, the outbox's depth
//! and the age of its oldest undelivered event, deliveries by result, token requests by
//! result, Zoom API calls by status, and request latency for both servers.

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Every metric of one service instance (tests run many in one process, so there is no
/// global registry).
pub struct Metrics {
    registry: Registry,
    /// `zoom_webhooks_total{result}`: recorded, duplicate, unrouted, url_validation,
    /// bad_signature, stale, too_large, malformed, unavailable.
    pub webhooks: IntCounterVec,
    /// `zoom_webhooks_verified_total`: requests whose signature checked out.
    pub webhooks_verified: IntCounter,
    /// `zoom_webhook_checks_offloaded_total`: signature checks too costly for a request's own
    /// thread (a large body, or a body no likely secret signed), run on the blocking pool.
    pub webhook_checks_offloaded: IntCounter,
    /// `zoom_deliveries_total{result}`: delivered, retried, dead_letter.
    pub deliveries: IntCounterVec,
    /// `zoom_outbox_depth`: undelivered (event, connection) pairs.
    pub outbox_depth: IntGauge,
    /// `zoom_outbox_oldest_age_seconds`: how long the oldest undelivered pair has waited.
    pub outbox_oldest_age: Gauge,
    /// `zoom_token_requests_total{grant,result}`: refresh_token or account_credentials;
    /// ok, invalid_grant or error.
    pub token_requests: IntCounterVec,
    /// `zoom_api_calls_total{status}`: Zoom API answers by HTTP status (`error` when none).
    pub zoom_api_calls: IntCounterVec,
    /// `http_request_duration_seconds{method,route,status}`.
    pub http_requests: HistogramVec,
    /// `grpc_request_duration_seconds{method,code}`.
    pub grpc_requests: HistogramVec,
}

/// Latency buckets, in seconds: 0.5 ms to 10 s.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Metrics {
    /// A fresh set of metrics in its own registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
                labels,
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let webhooks = counter_vec(
            "zoom_webhooks_total",
            "Webhooks received at /zoom/event, by result.",
            &["result"],
        );
        let deliveries = counter_vec(
            "zoom_deliveries_total",
            "Deliveries of (event, connection) pairs to the host engine, by result.",
            &["result"],
        );
        let token_requests = counter_vec(
            "zoom_token_requests_total",
            "Token requests to Zoom by grant type and result.",
            &["grant", "result"],
        );
        let zoom_api_calls = counter_vec(
            "zoom_api_calls_total",
            "Zoom API calls by HTTP status.",
            &["status"],
        );
        let http_requests = histogram_vec(
            "http_request_duration_seconds",
            "HTTP requests by method, route and status.",
            &["method", "route", "status"],
        );
        let grpc_requests = histogram_vec(
            "grpc_request_duration_seconds",
            "gRPC requests by method and status code.",
            &["method", "code"],
        );
        let webhooks_verified = IntCounter::new(
            "zoom_webhooks_verified_total",
            "Webhooks whose signature checked out.",
        )
        .expect("valid metric");
        let webhook_checks_offloaded = IntCounter::new(
            "zoom_webhook_checks_offloaded_total",
            "Webhook signature checks run on the blocking pool: large bodies, or bodies no likely secret signed.",
        )
        .expect("valid metric");
        let outbox_depth = IntGauge::new(
            "zoom_outbox_depth",
            "Undelivered (event, connection) pairs in the outbox.",
        )
        .expect("valid metric");
        let outbox_oldest_age = Gauge::new(
            "zoom_outbox_oldest_age_seconds",
            "Age of the oldest undelivered pair in the outbox (0 when empty).",
        )
        .expect("valid metric");
        for metric in [
            Box::new(webhooks_verified.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(webhook_checks_offloaded.clone()),
            Box::new(outbox_depth.clone()),
            Box::new(outbox_oldest_age.clone()),
        ] {
            registry.register(metric).expect("unique metric");
        }
        Self {
            registry,
            webhooks,
            webhooks_verified,
            webhook_checks_offloaded,
            deliveries,
            outbox_depth,
            outbox_oldest_age,
            token_requests,
            zoom_api_calls,
            http_requests,
            grpc_requests,
        }
    }

    /// Everything, in Prometheus's text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
