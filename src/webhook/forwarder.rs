//! Delivers recorded webhooks from the outbox to the host engine, at least once.
//!
//! One background task reads undelivered (event, connection) pairs in id order, a bounded
//! batch at a time, and hands them to the host engine: the embedded host takes a whole batch in
//! one transaction; a remote host gets concurrent `DispatcherService.Dispatch` calls, a bounded
//! number at a time. Delivered rows are then removed from the outbox. While the host is
//! unavailable the same batch is retried with exponential back-off; rows the host refuses for
//! good (or that keep failing) move to the outbox's dead letters so they cannot block the rest.
//! Undelivered rows survive restarts: the next start reads them again.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::connection::vars;
use crate::host::embedded::EmbeddedHost;
use crate::host::{HostEngine, HostError, Var};
use crate::ids::ConnectionId;
use crate::proto::autokitteh::events::v1::Event;
use crate::webhook::Counters;
use crate::webhook::normalize;
use crate::webhook::outbox::{Outbox, Pending};

/// Zoom's event for an app removed from an account.
pub const APP_DEAUTHORIZED: &str = "app_deauthorized";
/// The `connection_error` a deauthorized connection gets.
pub const DEAUTHORIZED_MESSAGE: &str = "deauthorized in Zoom: reconnect";

/// Knobs of the forwarder.
#[derive(Debug, Clone)]
pub struct ForwarderSettings {
    /// Rows read from the outbox at a time.
    pub batch_rows: usize,
    /// Bytes of bodies read from the outbox at a time (at least one row is always read).
    pub batch_bytes: usize,
    /// Dispatch calls in flight at once to a remote host.
    pub concurrency: usize,
    /// First wait after the host was unavailable; doubled after each failure.
    pub backoff_start: Duration,
    /// Longest wait between retries.
    pub backoff_max: Duration,
    /// Attempts at a row that fails with an error other than "unavailable" before it becomes
    /// a dead letter.
    pub max_attempts: u32,
    /// How long to let new rows accumulate after a wake-up before reading them: fewer, larger
    /// deliveries (one host transaction each) instead of one per commit of the outbox.
    pub linger: Duration,
}

impl Default for ForwarderSettings {
    fn default() -> Self {
        Self {
            batch_rows: 512,
            batch_bytes: 16 << 20,
            concurrency: 32,
            backoff_start: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            max_attempts: 10,
            linger: Duration::from_millis(20),
        }
    }
}

/// Where events go.
#[derive(Clone)]
pub struct Target {
    /// The host engine (deauthorization writes its variables; remote dispatch).
    pub host: Arc<dyn HostEngine>,
    /// The embedded host, when it is the host engine: events are saved a batch at a time.
    pub embedded: Option<EmbeddedHost>,
}

/// One row being delivered and how often it failed.
struct Attempt {
    row: Pending,
    failures: u32,
}

enum Outcome {
    Delivered,
    Retry(String),
    Refused(String),
}

/// Runs [`run`] on a thread of its own, at a lower CPU priority (nice 10) than the threads
/// that answer requests: when the machine is busy, answering Zoom within its 3-second deadline
/// comes first, and the forwarder catches up once the burst is over (the outbox holds what it
/// has not delivered yet, on disk). The returned task completes when the forwarder has ended.
pub fn spawn(
    outbox: Outbox,
    target: Target,
    counters: Arc<Counters>,
    settings: ForwarderSettings,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (ended, on_end) = tokio::sync::oneshot::channel::<()>();
    let started = std::thread::Builder::new()
        .name("forwarder".into())
        .spawn(move || {
            lower_priority();
            // Its blocking threads (database reads, the embedded host's writes) are started
            // from this one, and keep its priority.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                // Named apart from the request runtime's threads, so `top -H` (and the
                // benchmark) can tell the forwarder's work from the requests'.
                .thread_name("forwarder-io")
                .build();
            match runtime {
                Ok(runtime) => runtime.block_on(run(outbox, target, counters, settings, stop)),
                Err(e) => tracing::error!(error = %e, "cannot start the forwarder's runtime; events stay in the outbox"),
            }
            drop(ended);
        });
    if let Err(e) = started {
        tracing::error!(error = %e, "cannot start the forwarder thread; events stay in the outbox");
    }
    tokio::spawn(async move {
        let _ = on_end.await;
    })
}

/// Lowers the calling thread's CPU priority to nice 10 (on Linux, a thread's own).
fn lower_priority() {
    // SAFETY: gettid and setpriority take no pointers; they only read and set this thread's
    // scheduling priority, and failing leaves it as it was.
    let failed = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10) != 0
    };
    if failed {
        tracing::debug!("cannot lower the forwarder's priority; it runs at the normal one");
    }
}

/// Delivers until `stop` is cancelled.
pub async fn run(
    outbox: Outbox,
    target: Target,
    counters: Arc<Counters>,
    settings: ForwarderSettings,
    stop: CancellationToken,
) {
    let mut cursor = 0i64;
    let mut retry: Vec<Attempt> = Vec::new();
    let mut backoff = settings.backoff_start;
    let mut last_checkpoint = std::time::Instant::now();
    loop {
        if stop.is_cancelled() {
            return;
        }
        let batch = if retry.is_empty() {
            match outbox
                .pending(cursor, settings.batch_rows, settings.batch_bytes)
                .await
            {
                Ok(rows) => rows
                    .into_iter()
                    .map(|row| Attempt { row, failures: 0 })
                    .collect(),
                Err(e) => {
                    tracing::error!(error = %e, "reading the event outbox failed");
                    if sleep_or_stop(backoff, &stop).await {
                        return;
                    }
                    backoff = (backoff * 2).min(settings.backoff_max);
                    continue;
                }
            }
        } else {
            std::mem::take(&mut retry)
        };
        let Some(last) = batch.last() else {
            tokio::select! {
                () = outbox.committed() => {}
                () = stop.cancelled() => return,
                // A safety net only: commits wake the forwarder.
                () = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
            if sleep_or_stop(settings.linger, &stop).await {
                return;
            }
            continue;
        };
        cursor = cursor.max(last.row.id);

        let results = tokio::select! {
            results = deliver(&target, batch, &settings) => results,
            () = stop.cancelled() => return,
        };
        let mut delivered = Vec::new();
        let mut unavailable = None;
        for (mut attempt, outcome) in results {
            match outcome {
                Outcome::Delivered => delivered.push(attempt.row.id),
                Outcome::Retry(why) => {
                    unavailable.get_or_insert(why);
                    retry.push(attempt);
                }
                Outcome::Refused(why) => {
                    attempt.failures += 1;
                    if attempt.failures >= settings.max_attempts {
                        tracing::error!(
                            row = attempt.row.id,
                            event_type = %attempt.row.received.event_type,
                            destination = %attempt.row.destination,
                            error = %why,
                            "the host engine refused an event; kept as a dead letter in the outbox"
                        );
                        counters.dead_letters.inc();
                        outbox.failed(attempt.row.id, why).await;
                    } else {
                        retry.push(attempt);
                    }
                }
            }
        }
        counters.delivered.inc_by(delivered.len() as u64);
        outbox.delivered(delivered).await;
        if last_checkpoint.elapsed() >= Duration::from_millis(500) {
            last_checkpoint = std::time::Instant::now();
            outbox.checkpoint().await;
        }
        if retry.is_empty() {
            backoff = settings.backoff_start;
        } else {
            counters.retries.inc();
            if let Some(why) = unavailable {
                tracing::warn!(error = %why, pending = retry.len(), retry_in = ?backoff, "host engine unavailable; will retry");
            }
            if sleep_or_stop(backoff, &stop).await {
                return;
            }
            backoff = (backoff * 2).min(settings.backoff_max);
        }
    }
}

/// Sleeps for `d`; true if `stop` was cancelled meanwhile.
async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = stop.cancelled() => true,
    }
}

fn classify(err: HostError) -> Outcome {
    match err {
        HostError::Unavailable(m) => Outcome::Retry(m),
        HostError::Database(e) => Outcome::Retry(e.to_string()),
        other => Outcome::Refused(other.to_string()),
    }
}

async fn deliver(
    target: &Target,
    batch: Vec<Attempt>,
    settings: &ForwarderSettings,
) -> Vec<(Attempt, Outcome)> {
    match &target.embedded {
        Some(embedded) => deliver_embedded(&*target.host, embedded, batch).await,
        None => deliver_concurrently(target.host.clone(), batch, settings.concurrency).await,
    }
}

/// The embedded host: side effects one by one (rare), then every event in one transaction.
async fn deliver_embedded(
    host: &dyn HostEngine,
    embedded: &EmbeddedHost,
    batch: Vec<Attempt>,
) -> Vec<(Attempt, Outcome)> {
    let mut done = Vec::new();
    let mut ready: Vec<(Attempt, Event)> = Vec::with_capacity(batch.len());
    for attempt in batch {
        match prepare(host, &attempt.row).await {
            Ok(event) => ready.push((attempt, event)),
            Err(outcome) => done.push((attempt, outcome)),
        }
    }
    let (attempts, events): (Vec<Attempt>, Vec<Event>) = ready.into_iter().unzip();
    match embedded.save_events(events).await {
        Ok(_) => done.extend(attempts.into_iter().map(|a| (a, Outcome::Delivered))),
        Err(HostError::InvalidArgument(_)) => {
            // One bad event must not hold back the rest: save them one at a time.
            for attempt in attempts {
                let outcome = match prepare(host, &attempt.row).await {
                    Ok(event) => match embedded.save_event(event).await {
                        Ok(_) => Outcome::Delivered,
                        Err(e) => classify(e),
                    },
                    Err(outcome) => outcome,
                };
                done.push((attempt, outcome));
            }
        }
        Err(e) => {
            let why = e.to_string();
            done.extend(
                attempts
                    .into_iter()
                    .map(|a| (a, Outcome::Retry(why.clone()))),
            );
        }
    }
    done
}

/// A remote host: one Dispatch per row, `concurrency` at a time.
async fn deliver_concurrently(
    host: Arc<dyn HostEngine>,
    batch: Vec<Attempt>,
    concurrency: usize,
) -> Vec<(Attempt, Outcome)> {
    let mut done = Vec::with_capacity(batch.len());
    let mut running = JoinSet::new();
    let mut queue = batch.into_iter();
    loop {
        while running.len() < concurrency.max(1) {
            let Some(attempt) = queue.next() else { break };
            let host = host.clone();
            running.spawn(async move {
                let outcome = match prepare(&*host, &attempt.row).await {
                    Ok(event) => match host.dispatch(event).await {
                        Ok(_) => Outcome::Delivered,
                        Err(e) => classify(e),
                    },
                    Err(outcome) => outcome,
                };
                (attempt, outcome)
            });
        }
        match running.join_next().await {
            Some(Ok(result)) => done.push(result),
            Some(Err(e)) => {
                // A panicked delivery loses track of its row until the next start, which reads
                // it again; nothing else can be done with it here.
                tracing::error!(error = %e, "an event delivery task failed");
            }
            None => return done,
        }
    }
}

/// The event for a row, after the side effects its type needs.
async fn prepare(host: &dyn HostEngine, row: &Pending) -> Result<Event, Outcome> {
    let event = normalize::event(&row.received, &row.destination)
        .map_err(|e| Outcome::Refused(e.to_string()))?;
    if row.received.event_type == APP_DEAUTHORIZED {
        let cid =
            ConnectionId::parse(&row.destination).map_err(|e| Outcome::Refused(e.to_string()))?;
        deauthorize(host, &cid).await.map_err(classify)?;
    }
    Ok(event)
}

/// Forgets a connection's OAuth tokens and marks it broken; both steps can be repeated.
async fn deauthorize(host: &dyn HostEngine, cid: &ConnectionId) -> Result<(), HostError> {
    let tokens = [
        vars::OAUTH_ACCESS_TOKEN,
        vars::OAUTH_REFRESH_TOKEN,
        vars::OAUTH_EXPIRY,
    ]
    .map(String::from);
    // One change where the host allows it; otherwise the mark comes first.
    host.replace_vars(
        cid,
        vec![Var::plain(vars::CONNECTION_ERROR, DEAUTHORIZED_MESSAGE)],
        &tokens,
    )
    .await?;
    tracing::info!(connection_id = %cid, "connection deauthorized in Zoom: tokens removed");
    Ok(())
}
