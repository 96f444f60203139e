//! zoom-integration: connects Zoom to an AutoKitteh-compatible workflow host.
//!
//! [`run`] starts the whole service on listeners the caller already bound, so tests can start
//! it on port 0; `main.rs` only reads the configuration, binds, and waits for SIGTERM.
//! See `ARCHITECTURE.md` for the parts and how requests flow through them.

pub mod cli;
pub mod config;
pub mod connection;
pub mod credentials;
pub mod crypto;
mod db;
pub mod error;
pub mod functions;
pub mod grpc;
pub mod host;
pub mod http;
pub mod ids;
pub mod integration;
pub mod metrics;
pub mod secret;
pub mod setup;
pub mod telemetry;
pub mod values;
pub mod webhook;
pub mod zoom;

/// Code generated from `proto/`: AutoKitteh's public API, wire-compatible.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/autokitteh.rs"));
}

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::credentials::Credentials;
use crate::crypto::Keys;
use crate::host::HostEngine;
use crate::host::embedded::{EmbeddedHost, OpenError};
use crate::host::remote::RemoteHost;
use crate::metrics::Metrics;
use crate::setup::links::SetupLinks;
use crate::setup::state::Flows;
use crate::webhook::outbox::DataDirLock;
use crate::zoom::api::ZoomApi;
use crate::zoom::oauth::ZoomOAuth;

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The configuration, loaded once.
    pub config: Arc<Config>,
    /// The host engine in use.
    pub host: Arc<dyn HostEngine>,
    /// The embedded host, when no remote host is configured; it also serves Vars and Events.
    pub embedded: Option<EmbeddedHost>,
    /// Key material for OAuth state and secrets at rest.
    pub keys: Arc<Keys>,
    /// OAuth flows in progress.
    pub flows: Arc<Flows>,
    /// Signed setup links: who may set up a connection.
    pub links: Arc<SetupLinks>,
    /// Zoom's OAuth server.
    pub zoom_oauth: ZoomOAuth,
    /// Zoom's REST API.
    pub zoom_api: ZoomApi,
    /// Fresh access tokens for every connection.
    pub credentials: Arc<Credentials>,
    /// Prometheus metrics of this instance.
    pub metrics: Arc<Metrics>,
    /// Webhook routing, the event outbox and its counters.
    pub webhooks: Arc<webhook::Webhooks>,
    /// The lock on `DATA_DIR`, taken before anything there was read: held as long as the
    /// state lives, so no other process opens the databases meanwhile.
    pub data_dir_lock: DataDirLock,
}

impl AppState {
    /// Opens the host engine the configuration asks for and loads the keys.
    /// Configuration problems come back as [`config::ConfigError`].
    pub fn build(config: Config) -> anyhow::Result<Self> {
        config::create_private_dir(&config.data_dir)?;
        // Before the key is read or generated and the databases are opened: a second process
        // on this DATA_DIR stops here, not after migrating the database under the running one.
        let data_dir_lock = DataDirLock::acquire(&config.data_dir)?;
        let keys = Arc::new(Keys::load_or_generate_for(
            config.secret_key.as_ref(),
            &config.data_dir,
            config.host_engine_url.is_none(),
        )?);
        let (host, embedded): (Arc<dyn HostEngine>, _) = match &config.host_engine_url {
            Some(url) => (
                Arc::new(RemoteHost::new(url, config.host_engine_token.as_ref())?),
                None,
            ),
            None => {
                let embedded =
                    EmbeddedHost::open(&config.data_dir, keys.clone()).map_err(|e| match e {
                        OpenError::Config(e) => anyhow::Error::from(e),
                        other => anyhow::Error::from(other),
                    })?;
                (Arc::new(embedded.clone()), Some(embedded))
            }
        };
        let http = zoom::http_client(&config)?;
        let zoom_oauth = ZoomOAuth::new(http.clone(), &config);
        let metrics = Arc::new(Metrics::new());
        let webhooks = Arc::new(webhook::Webhooks::open(
            &config,
            &metrics,
            data_dir_lock.clone(),
        )?);
        Ok(Self {
            flows: Arc::new(
                Flows::new(*keys.state_signing_key(), config.oauth_state_ttl)
                    .over_https(config.webhook_scheme == config::Scheme::Https),
            ),
            links: Arc::new(SetupLinks::new(
                *keys.link_signing_key(),
                config.setup_link_ttl,
                config.setup_access,
            )),
            credentials: Arc::new(Credentials::new(
                // A remote host lists only active connections: the keep-alive task also
                // refreshes the others routing knows are set up.
                match &embedded {
                    Some(_) => host.clone(),
                    None => Arc::new(webhook::routing::ListingKnown::new(
                        host.clone(),
                        webhooks.routing.clone(),
                    )),
                },
                zoom_oauth.clone(),
                config.default_app.clone(),
                metrics.clone(),
            )),
            zoom_oauth,
            zoom_api: ZoomApi::new(http, &config, metrics.clone()),
            metrics,
            config: Arc::new(config),
            host,
            embedded,
            keys,
            webhooks,
            data_dir_lock,
        })
    }

    /// Tells webhook routing that a connection's variables changed (saved, re-authorized or
    /// deleted), so webhooks route by them at once: call it after writing a connection's
    /// variables. Routing also reloads every minute, and the embedded host reports its own
    /// changes, so a failure here only delays routing; it is logged, not returned.
    pub async fn connection_changed(&self, connection_id: &crate::ids::ConnectionId) {
        if let Err(e) = self
            .webhooks
            .routing
            .reload_connection(&*self.host, connection_id)
            .await
        {
            tracing::warn!(error = %e, %connection_id, "cannot refresh webhook routing for a changed connection; the periodic reload will");
        }
        // With a remote host, routing remembers the connections set up here in the outbox's
        // database (the host may not list them): have that committed before the owner is told
        // the setup is done, so a crash right after cannot forget it.
        if self.embedded.is_none()
            && tokio::time::timeout(
                std::time::Duration::from_secs(2),
                self.webhooks.outbox.flushed(),
            )
            .await
            .map_or(true, |committed| committed.is_err())
        {
            tracing::warn!(%connection_id, "the outbox has not committed what routing knows of a changed connection yet; it is kept in memory and committed with the next group");
        }
    }
}

/// How long shutdown waits for token refreshes in flight, after the servers have stopped.
const CREDENTIALS_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
/// How long shutdown waits, all together, for the background tasks (forwarder, routing
/// refresher, change follower, retry of unsaved tokens) to stop.
const BACKGROUND_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// How long shutdown waits for the outbox's last commit (delivery marks; webhooks were all
/// answered by then): past it, those events are delivered again after the next start.
const OUTBOX_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Waits for both servers to end; once `stop` is cancelled, for `grace` at most (in-flight
/// requests get that long to finish: a client holding a stream open cannot keep the process
/// alive past it), then aborts those still running. Returns the first server's failure (or
/// panic), the HTTP server's before the gRPC server's, also when the other one was still
/// draining at the deadline.
async fn wait_for_servers(
    http_server: tokio::task::JoinHandle<anyhow::Result<()>>,
    grpc_server: tokio::task::JoinHandle<anyhow::Result<()>>,
    stop: &CancellationToken,
    grace: std::time::Duration,
) -> anyhow::Result<()> {
    let aborts = [http_server.abort_handle(), grpc_server.abort_handle()];
    // Each result is kept as soon as its server ends: the deadline drops `servers` unfinished.
    let mut http = None;
    let mut grpc = None;
    let servers = async {
        tokio::join!(
            async { http = Some(http_server.await.context("HTTP server panicked")) },
            async { grpc = Some(grpc_server.await.context("gRPC server panicked")) },
        );
    };
    let deadline = async {
        stop.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        () = servers => {}
        () = deadline => {
            tracing::warn!(?grace, "requests still in flight after the shutdown timeout; exiting anyway");
            for abort in aborts {
                abort.abort();
            }
        }
    }
    for ended in [http, grpc].into_iter().flatten() {
        ended??;
    }
    Ok(())
}

/// Runs the service on the given listeners until `shutdown` completes, then stops both
/// servers gracefully: no new connections, in-flight requests get `SHUTDOWN_TIMEOUT` to finish.
pub async fn run(
    config: Config,
    http_listener: TcpListener,
    grpc_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = AppState::build(config)?;
    let http_addr = http_listener.local_addr()?;
    let grpc_addr = grpc_listener.local_addr()?;

    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            tokio::select! {
                () = shutdown => tracing::info!("shutting down"),
                () = stop.cancelled() => {}
            }
            stop.cancel();
        }
    });

    tokio::spawn(state.credentials.clone().keep_alive(
        state.config.token_keepalive,
        credentials::KEEP_ALIVE_INTERVAL,
        stop.clone(),
    ));
    let mut background = state.webhooks.start(
        state.host.clone(),
        state.embedded.clone(),
        state.credentials.clone(),
        stop.clone(),
    );
    // Refreshed tokens whose save failed are saved again in the background; in `background`,
    // so it has stopped (and let go of the slot it was saving) before `finish` saves the rest.
    background.push(tokio::spawn(
        state.credentials.clone().retry_unsaved(stop.clone()),
    ));
    // Variables written through VarsService (or by hand) must not leave a token cached for
    // what they replaced or deleted.
    if let Some(embedded) = &state.embedded {
        background.push(tokio::spawn(
            state
                .credentials
                .clone()
                .follow_changes(embedded.subscribe_changes(), stop.clone()),
        ));
        background.push(tokio::spawn(
            embedded
                .clone()
                .keep_events_for(state.config.event_retention, stop.clone()),
        ));
    }

    let grace = state.config.shutdown_timeout;
    let request_timeout = state.config.request_timeout;
    let router = http::router(state.clone());
    // Each server stops the other when it ends, whether on shutdown, on failure or by
    // panicking: the drop guard cancels `stop` in every case.
    let http_server = tokio::spawn({
        let stop = stop.clone();
        async move {
            let _stop_the_other = stop.clone().drop_guard();
            http::server::serve(http_listener, router, request_timeout, stop)
                .await
                .context("HTTP server failed")
        }
    });
    let grpc_server = tokio::spawn({
        let (state, stop) = (state.clone(), stop.clone());
        async move {
            let _stop_the_other = stop.clone().drop_guard();
            grpc::serve(grpc_listener, state, stop)
                .await
                .context("gRPC server failed")
        }
    });
    tracing::info!(
        %http_addr,
        %grpc_addr,
        host = state.host.kind(),
        "zoom-integration serving"
    );

    // A server that failed or panicked still gets the cleanup below (a rotated refresh token
    // saved, the outbox closed); its error is returned after it.
    let served = wait_for_servers(http_server, grpc_server, &stop, grace).await;
    stop.cancel();
    // The background tasks stop at their next await on `stop`; whatever they had not finished
    // is still in the outbox for the next start.
    let background_deadline = tokio::time::Instant::now() + BACKGROUND_GRACE;
    for task in background {
        let abort = task.abort_handle();
        if tokio::time::timeout_at(background_deadline, task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    // A refresh in flight may hold a refresh token Zoom has just rotated: let it be saved.
    state.credentials.finish(CREDENTIALS_GRACE).await;
    if tokio::time::timeout(OUTBOX_GRACE, state.webhooks.outbox.close())
        .await
        .is_err()
    {
        tracing::warn!(
            ?OUTBOX_GRACE,
            "the event outbox's last commit did not end in time; events it marked delivered may be delivered again after the next start"
        );
    }
    tracing::info!("stopped");
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    /// A server task that ends with `result`, stopping the other as `run`'s servers do.
    fn server_ending_with(
        stop: &CancellationToken,
        result: anyhow::Result<()>,
    ) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        let stop = stop.clone();
        tokio::spawn(async move {
            let _stop_the_other = stop.drop_guard();
            result
        })
    }

    /// A server task still draining when it is aborted.
    fn server_draining_forever() -> tokio::task::JoinHandle<anyhow::Result<()>> {
        tokio::spawn(std::future::pending())
    }

    #[tokio::test]
    async fn a_failed_server_is_reported_though_the_other_was_still_draining_at_the_deadline() {
        let grace = Duration::from_millis(50);
        for http_fails in [true, false] {
            let stop = CancellationToken::new();
            let failed = server_ending_with(&stop, Err(anyhow::anyhow!("the listener broke")));
            let draining = server_draining_forever();
            let draining_abort = draining.abort_handle();
            let (http, grpc) = if http_fails {
                (failed, draining)
            } else {
                (draining, failed)
            };
            let result = tokio::time::timeout(
                Duration::from_secs(5),
                wait_for_servers(http, grpc, &stop, grace),
            )
            .await
            .expect("ends at the deadline");
            let err = result.expect_err("the failure is not lost");
            assert!(format!("{err:#}").contains("the listener broke"), "{err:#}");
            tokio::task::yield_now().await;
            assert!(
                draining_abort.is_finished(),
                "the draining server is aborted"
            );
        }
    }

    #[tokio::test]
    async fn servers_that_stop_in_time_or_only_past_the_deadline_are_no_failure() {
        let grace = Duration::from_millis(50);
        let stop = CancellationToken::new();
        let http = server_ending_with(&stop, Ok(()));
        let grpc = server_ending_with(&stop, Ok(()));
        wait_for_servers(http, grpc, &stop, grace).await.unwrap();

        let stop = CancellationToken::new();
        stop.cancel();
        let result = wait_for_servers(
            server_draining_forever(),
            server_draining_forever(),
            &stop,
            grace,
        )
        .await;
        result.unwrap();
    }
}
