//! Delivers recorded webhooks from the outbox to the host engine, at least once.
//!
//! One background task reads undelivered (event, connection) pairs in id order, a bounded
//! batch at a time, and hands them to the host engine: the embedded host takes a whole batch in
//! one transaction; a remote host gets concurrent `DispatcherService.Dispatch` calls, a bounded
//! number at a time. Each delivered row is marked in the outbox as its delivery returns (a stop
//! keeps the marks of the calls answered by then), and removed with the outbox's next commit.
//!
//! Three kinds of failure, three answers:
//! - the host is unavailable (down, overloaded, or refusing our credentials): nothing can be
//!   delivered, so the rows are held and each round, with exponential back-off, sends the host
//!   a single probe (alternately the oldest held row and one new row); the held rows go again
//!   once the host answers a probe;
//! - the host says the event itself is invalid: retried a few times (`max_attempts`), then
//!   moved to the outbox's dead letters;
//! - the host failed on it (`INTERNAL`, `UNKNOWN`: what AutoKitteh answers for a database or
//!   workflow-engine hiccup): the row is retried on its own back-off while the rows after it go
//!   on, and becomes a dead letter only once it has failed `max_attempts` times over at least
//!   `give_up_after`, so a host that fails for a while loses nothing.
//!
//! Undelivered rows survive restarts: the next start reads them again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::connection::vars;
use crate::credentials::Credentials;
use crate::host::embedded::{EmbeddedHost, LogEntry};
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
    /// Attempts at a row that fails with an error other than "unavailable" before it can become
    /// a dead letter.
    pub max_attempts: u32,
    /// How long a row the host fails on (rather than calls invalid) keeps being retried before
    /// it can become a dead letter.
    pub give_up_after: Duration,
    /// Longest wait between two attempts at a row the host failed on or called invalid.
    pub row_backoff_max: Duration,
    /// Rows held for a later attempt at most; while that many wait, no new rows are read.
    pub max_waiting: usize,
    /// Bytes of bodies held for a later attempt at most; past it no new rows are read.
    pub max_waiting_bytes: usize,
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
            give_up_after: Duration::from_secs(60 * 60),
            row_backoff_max: Duration::from_secs(30),
            max_waiting: 1024,
            max_waiting_bytes: 64 << 20,
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
    /// Told when a connection is deauthorized, so its cached token is not handed out again.
    pub credentials: Arc<Credentials>,
}

/// One row being delivered, how often it failed, and when it may be tried again.
struct Attempt {
    row: Pending,
    failures: u32,
    /// When the host first failed on it (not counting "unavailable").
    first_failed: Option<Instant>,
    /// Not before then.
    due: Instant,
    /// Whether the row's `side_effect_done` is committed in the outbox (not only set here).
    side_effect_saved: bool,
}

impl Attempt {
    fn new(row: Pending) -> Self {
        Self {
            side_effect_saved: row.side_effect_done,
            row,
            failures: 0,
            first_failed: None,
            due: Instant::now(),
        }
    }
}

/// What became of one attempt.
enum Outcome {
    Delivered,
    /// The host is unavailable: nothing can be delivered now.
    Unavailable(String),
    /// The host says the event is invalid.
    Invalid(String),
    /// The host failed on the event.
    Failed(String),
    /// This service cannot make an event of the row (refused like [`Outcome::Invalid`]); says
    /// nothing of the host.
    Unconvertible(String),
    /// Handling the row panicked here (retried like [`Outcome::Failed`]); says nothing of the
    /// host.
    Panicked(String),
}

impl Outcome {
    /// Whether the host engine itself answered: only then is it known to be up.
    fn is_the_host_s(&self) -> bool {
        matches!(
            self,
            Outcome::Delivered | Outcome::Invalid(_) | Outcome::Failed(_)
        )
    }
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
                Ok(runtime) => runtime.block_on(supervised(outbox, target, counters, settings, stop)),
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

/// Runs [`run`] until `stop`, starting it again a second after a panic (a bug outside any one
/// delivery): events keep flowing, read again from the outbox, instead of waiting there for a
/// restart of the service.
async fn supervised(
    outbox: Outbox,
    target: Target,
    counters: Arc<Counters>,
    settings: ForwarderSettings,
    stop: CancellationToken,
) {
    loop {
        let ran = caught(run(
            outbox.clone(),
            target.clone(),
            counters.clone(),
            settings.clone(),
            stop.clone(),
        ))
        .await;
        if ran.is_ok() || sleep_or_stop(Duration::from_secs(1), &stop).await {
            return;
        }
        tracing::warn!("starting the forwarder again after its panic");
    }
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
    // Rows the host was unavailable for, oldest first: while any are held the host is taken
    // to be down, and each round only probes it.
    let mut held: Vec<Attempt> = Vec::new();
    // Whether the next probe is a new row (when there is one) rather than the oldest held.
    let mut probe_new = false;
    // Turns through the held rows after the oldest, for the probes no new row can be (none
    // left, or no room for more): one row the host keeps refusing must not be every probe.
    let mut probe_turn = 0usize;
    // Rows the host failed on or called invalid, each waiting until it is due.
    let mut waiting: Vec<Attempt> = Vec::new();
    let mut backoff = settings.backoff_start;
    let mut last_checkpoint = Instant::now();
    let mut last_failure_warning: Option<Instant> = None;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let now = Instant::now();
        // While the host is down, a round sends it one event, a probe, and nothing else (an
        // overloaded host gets one call per back-off, not a batch): alternately the oldest
        // held row and a new one. Once the host answers a probe (takes it, or refuses that
        // event), the held rows go again with the next round; if the host then takes others
        // but not them, their trouble is their own (an event too large for the host, say), and
        // they wait on their own back-off instead of holding back every event after them.
        let host_down = !held.is_empty();
        let mut batch = Vec::new();
        if !host_down {
            let (due, later): (Vec<Attempt>, Vec<Attempt>) =
                waiting.into_iter().partition(|a| a.due <= now);
            waiting = later;
            batch.extend(due);
        }
        // Held rows count too: while the host is down, each round may add a new one.
        let waiting_bytes: usize = waiting
            .iter()
            .chain(&held)
            .map(|a| a.row.received.body.len())
            .sum();
        let room = if waiting_bytes >= settings.max_waiting_bytes {
            0
        } else if host_down {
            usize::from(probe_new && held.len() < settings.batch_rows)
        } else {
            settings
                .batch_rows
                .saturating_sub(batch.len())
                .min(settings.max_waiting.saturating_sub(waiting.len()))
        };
        if room > 0 {
            match outbox.pending(cursor, room, settings.batch_bytes).await {
                Ok(rows) => {
                    if let Some(last) = rows.last() {
                        cursor = cursor.max(last.id);
                    }
                    batch.extend(rows.into_iter().map(Attempt::new));
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading the event outbox failed");
                    if batch.is_empty() && !host_down {
                        if sleep_or_stop(backoff, &stop).await {
                            return;
                        }
                        backoff = (backoff * 2).min(settings.backoff_max);
                        continue;
                    }
                }
            }
        }
        if host_down {
            if batch.is_empty() {
                // The oldest held row, or on a new row's turn, another one in turn.
                let at = if probe_new && held.len() > 1 {
                    probe_turn = probe_turn.wrapping_add(1);
                    1 + probe_turn % (held.len() - 1)
                } else {
                    0
                };
                batch.push(held.remove(at));
            }
            probe_new = !probe_new;
        }
        if batch.is_empty() {
            // A safety net only: commits wake the forwarder.
            let wake = waiting
                .iter()
                .map(|a| a.due)
                .min()
                .unwrap_or(now + Duration::from_secs(30));
            tokio::select! {
                () = outbox.committed() => {
                    if sleep_or_stop(settings.linger, &stop).await {
                        return;
                    }
                }
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(wake.into()) => {}
            }
            continue;
        }

        // Delivered rows are marked in the outbox as their calls return, not here: a stop
        // mid-batch keeps the marks of the calls that were answered.
        let results = deliver(&target, &outbox, batch, &settings, &stop).await;
        let mut delivered = 0u64;
        let mut why_unavailable = None;
        let mut why_failed = None;
        let now = Instant::now();
        let host_answered = results.iter().any(|(_, outcome)| outcome.is_the_host_s());
        for (mut attempt, outcome) in results {
            let why = match outcome {
                Outcome::Delivered => {
                    delivered += 1;
                    continue;
                }
                Outcome::Unavailable(why) if !host_answered => {
                    why_unavailable.get_or_insert(why);
                    let at = held.partition_point(|a| a.row.id < attempt.row.id);
                    held.insert(at, attempt);
                    continue;
                }
                Outcome::Invalid(why) | Outcome::Unconvertible(why) => why,
                // The host took or judged other events of this round: it is up, and this
                // event is what it cannot take (or this service failed on it).
                Outcome::Unavailable(why) | Outcome::Failed(why) | Outcome::Panicked(why) => {
                    attempt.first_failed.get_or_insert(now);
                    why
                }
            };
            attempt.failures += 1;
            let failing_since = attempt.first_failed.map_or(Duration::MAX, |t| now - t);
            if attempt.failures >= settings.max_attempts && failing_since >= settings.give_up_after
            {
                tracing::error!(
                    row = attempt.row.id,
                    event_type = %attempt.row.received.event_type,
                    destination = %attempt.row.destination,
                    attempts = attempt.failures,
                    error = %why,
                    "the host engine did not take an event; kept as a dead letter in the outbox"
                );
                counters.dead_letters.inc();
                outbox.failed(attempt.row.id, why).await;
            } else {
                attempt.due = now + row_backoff(&settings, attempt.failures);
                why_failed.get_or_insert((why, attempt.failures));
                waiting.push(attempt);
            }
        }
        counters.delivered.inc_by(delivered);
        if host_answered && !held.is_empty() {
            // The host answered a probe: it is up, and the held rows go with the next round.
            for mut attempt in held.drain(..) {
                attempt.due = now;
                waiting.push(attempt);
            }
        }
        if last_checkpoint.elapsed() >= Duration::from_millis(500) {
            last_checkpoint = Instant::now();
            outbox.checkpoint().await;
        }
        if let Some((why, failures)) = why_failed {
            // A line every 10 s at most while a host keeps failing, however fast events come.
            if last_failure_warning.is_none_or(|t| t.elapsed() >= FAILURE_WARNING_INTERVAL) {
                last_failure_warning = Some(Instant::now());
                tracing::warn!(error = %why, attempts = failures, waiting = waiting.len(), "the host engine failed to take events; each is retried on its own back-off");
            }
        }
        if held.is_empty() {
            backoff = settings.backoff_start;
        } else {
            counters.retries.inc();
            if let Some(why) = why_unavailable {
                tracing::warn!(error = %why, pending = held.len(), retry_in = ?backoff, "host engine unavailable; will retry");
            }
            if sleep_or_stop(backoff, &stop).await {
                return;
            }
            backoff = (backoff * 2).min(settings.backoff_max);
        }
    }
}

/// How often at most it is logged that the host failed on events.
const FAILURE_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// The wait before the next attempt at a row that failed `failures` times.
fn row_backoff(settings: &ForwarderSettings, failures: u32) -> Duration {
    settings
        .backoff_start
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(settings.row_backoff_max)
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
        HostError::Unavailable(m) => Outcome::Unavailable(m),
        HostError::Database(e) => Outcome::Unavailable(e.to_string()),
        HostError::InvalidArgument(m) | HostError::NotFound(m) => Outcome::Invalid(m),
        other => Outcome::Failed(other.to_string()),
    }
}

/// Delivers `batch`, marking each delivered row in the outbox (its change rides with the
/// outbox's next commit, which a shutdown waits for). A stop ends it early: what the host had
/// answered by then is returned (and its rows marked); the rest stays in the outbox.
async fn deliver(
    target: &Target,
    outbox: &Outbox,
    batch: Vec<Attempt>,
    settings: &ForwarderSettings,
    stop: &CancellationToken,
) -> Vec<(Attempt, Outcome)> {
    match &target.embedded {
        // One transaction, whose rows are marked once it commits; cut short by a stop, it is
        // delivered again at the next start, and logged once (each under its row's key).
        Some(embedded) => tokio::select! {
            results = deliver_embedded(target, outbox, embedded, batch) => results,
            () = stop.cancelled() => Vec::new(),
        },
        None => deliver_concurrently(target, outbox, batch, settings.concurrency, stop).await,
    }
}

/// Marks the delivered rows of `results` in the outbox.
async fn mark_delivered(outbox: &Outbox, results: &[(Attempt, Outcome)]) {
    let ids = results
        .iter()
        .filter(|(_, outcome)| matches!(outcome, Outcome::Delivered))
        .map(|(attempt, _)| attempt.row.id)
        .collect();
    outbox.delivered(ids).await;
}

/// The embedded host: side effects one by one (rare), then every event in one transaction.
async fn deliver_embedded(
    target: &Target,
    outbox: &Outbox,
    embedded: &EmbeddedHost,
    batch: Vec<Attempt>,
) -> Vec<(Attempt, Outcome)> {
    let mut done = Vec::new();
    let mut attempts = Vec::with_capacity(batch.len());
    let mut entries = Vec::with_capacity(batch.len());
    for mut attempt in batch {
        match log_entry(target, outbox, &mut attempt).await {
            Ok(entry) => {
                attempts.push(attempt);
                entries.push(entry);
            }
            Err(outcome) => done.push((attempt, outcome)),
        }
    }
    match embedded.save_deliveries(entries).await {
        Ok(_) => {
            let from = done.len();
            done.extend(attempts.into_iter().map(|a| (a, Outcome::Delivered)));
            mark_delivered(outbox, &done[from..]).await;
        }
        Err(HostError::InvalidArgument(_)) => {
            // One bad event must not hold back the rest: save them one at a time.
            let from = done.len();
            for mut attempt in attempts {
                let outcome = match log_entry(target, outbox, &mut attempt).await {
                    Ok(entry) => match embedded.save_deliveries(vec![entry]).await {
                        Ok(_) => Outcome::Delivered,
                        Err(e) => classify(e),
                    },
                    Err(outcome) => outcome,
                };
                done.push((attempt, outcome));
            }
            mark_delivered(outbox, &done[from..]).await;
        }
        Err(e) => {
            let why = e.to_string();
            done.extend(
                attempts
                    .into_iter()
                    .map(|a| (a, Outcome::Unavailable(why.clone()))),
            );
        }
    }
    done
}

/// A row's event for the embedded host's log, encoded at once: a batch holds bytes, not the
/// events' trees of values.
async fn log_entry(
    target: &Target,
    outbox: &Outbox,
    attempt: &mut Attempt,
) -> Result<LogEntry, Outcome> {
    let entry = unwind_to_failure(async {
        let event = prepare(target, outbox, attempt).await?;
        LogEntry::new(event, Some(delivery_key(&attempt.row))).map_err(classify)
    })
    .await;
    entry.unwrap_or_else(Err)
}

/// Runs one row's delivery work, turning a panic in it (a bug, met with this event) into the
/// row's failure: it is retried on its back-off and ends as a dead letter like any event the
/// host fails on, instead of its row being lost track of until a restart, or the forwarder
/// ending.
async fn unwind_to_failure<T>(work: impl Future<Output = T>) -> Result<T, Outcome> {
    caught(work)
        .await
        .map_err(|why| Outcome::Panicked(format!("delivering the event panicked: {why}")))
}

/// `work`'s output, or what it panicked with (logged).
async fn caught<T>(work: impl Future<Output = T>) -> Result<T, String> {
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work.as_mut().poll(cx))) {
            Ok(std::task::Poll::Ready(done)) => std::task::Poll::Ready(Ok(done)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(panic = %why, "the forwarder panicked");
                std::task::Poll::Ready(Err(why))
            }
        }
    })
    .await
}

/// The key of one delivery in the embedded host's log, so a delivery repeated after a crash is
/// logged once. Row ids are never reused within one outbox; the time of receipt tells a new
/// outbox's rows from an old one's.
fn delivery_key(row: &Pending) -> String {
    format!("outbox/{}/{}", row.received.received_ms, row.id)
}

/// A remote host: one Dispatch per row, `concurrency` at a time. Each delivered row is marked
/// in the outbox as soon as its call returns (with the others answered by then: one change),
/// so a stop or a crash later in the batch does not send it again. After `stop` no call is
/// started; the calls answered by then are kept, those still waiting are dropped (their rows
/// are delivered again at the next start: at least once).
async fn deliver_concurrently(
    target: &Target,
    outbox: &Outbox,
    batch: Vec<Attempt>,
    concurrency: usize,
    stop: &CancellationToken,
) -> Vec<(Attempt, Outcome)> {
    let mut done = Vec::with_capacity(batch.len());
    let mut running = JoinSet::new();
    let mut queue = batch.into_iter();
    loop {
        while running.len() < concurrency.max(1) && !stop.is_cancelled() {
            let Some(mut attempt) = queue.next() else {
                break;
            };
            let target = target.clone();
            let outbox = outbox.clone();
            running.spawn(async move {
                let outcome = unwind_to_failure(async {
                    match prepare(&target, &outbox, &mut attempt).await {
                        Ok(event) => match target.host.dispatch(event).await {
                            Ok(_) => Outcome::Delivered,
                            Err(e) => classify(e),
                        },
                        Err(outcome) => outcome,
                    }
                })
                .await;
                (attempt, outcome.unwrap_or_else(|failed| failed))
            });
        }
        let joined = tokio::select! {
            joined = running.join_next() => joined,
            () = stop.cancelled() => None,
        };
        let Some(joined) = joined else {
            // Done, or stopping: keep the calls answered meanwhile too.
            let from = done.len();
            while let Some(joined) = running.try_join_next() {
                keep(&mut done, joined);
            }
            mark_delivered(outbox, &done[from..]).await;
            return done;
        };
        let from = done.len();
        keep(&mut done, joined);
        while let Some(joined) = running.try_join_next() {
            keep(&mut done, joined);
        }
        mark_delivered(outbox, &done[from..]).await;
    }
}

/// Adds a finished delivery task's result to `done`.
fn keep(
    done: &mut Vec<(Attempt, Outcome)>,
    joined: Result<(Attempt, Outcome), tokio::task::JoinError>,
) {
    match joined {
        Ok(result) => done.push(result),
        // Cancelled (the runtime is shutting down): the row is read again at the next start.
        // Panics do not get here.
        Err(e) => tracing::error!(error = %e, "an event delivery task failed"),
    }
}

/// The event for a row, after the side effects its type needs.
///
/// `app_deauthorized`'s side effect runs once, not again with a retry of the delivery, nor
/// after a restart: the owner may have reconnected meanwhile. It is recorded in the row before
/// the event goes to the host, so only a crash between the two can repeat it.
async fn prepare(
    target: &Target,
    outbox: &Outbox,
    attempt: &mut Attempt,
) -> Result<Event, Outcome> {
    let row = &mut attempt.row;
    let event = normalize::event(&row.received, &row.destination)
        .map_err(|e| Outcome::Unconvertible(e.to_string()))?;
    if row.received.event_type == APP_DEAUTHORIZED && !attempt.side_effect_saved {
        if !row.side_effect_done {
            let cid = ConnectionId::parse(&row.destination)
                .map_err(|e| Outcome::Unconvertible(e.to_string()))?;
            let (user, at) = deauthorization(&row.received.body, row.received.received_ms);
            // With no refresh of the connection in flight, which could save its tokens again
            // after they were removed.
            let change = deauthorize(&*target.host, &cid, user.as_deref(), at);
            target
                .credentials
                .deauthorize_with(&cid, change)
                .await
                .map_err(classify)?;
            // Marked before anything else is awaited: a shutdown cancels this mid-way.
            row.side_effect_done = true;
            outbox.side_effect_done(row.id).await;
        }
        // Not delivered before the mark is saved: a failed commit's changes go again with
        // the next one, and meanwhile `side_effect_done` keeps this process from repeating
        // the side effect.
        outbox.flushed().await.map_err(|e| {
            Outcome::Unavailable(format!("cannot record app_deauthorized as handled: {e}"))
        })?;
        attempt.side_effect_saved = true;
    }
    Ok(event)
}

/// Who removed the app and when, from an `app_deauthorized` body: `payload.user_id`, and the
/// earliest of `payload.deauthorization_time`, `payload.event_ts`, `event_ts` (Unix ms, as a
/// number or as text) and `received_ms`, when it arrived here. The event may arrive late (Zoom
/// retrying a 503, a restart), after the owner reconnected: what counts is when Zoom removed it.
fn deauthorization(body: &[u8], received_ms: i64) -> (Option<String>, i64) {
    #[derive(serde::Deserialize)]
    struct Body {
        payload: Option<Payload>,
        event_ts: Option<serde_json::Value>,
    }
    #[derive(serde::Deserialize)]
    struct Payload {
        user_id: Option<serde_json::Value>,
        deauthorization_time: Option<serde_json::Value>,
        event_ts: Option<serde_json::Value>,
    }
    let millis = |v: &serde_json::Value| match v {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    let Ok(body) = serde_json::from_slice::<Body>(body) else {
        return (None, received_ms);
    };
    let (mut user, mut removed, mut payload_ts) = (None, None, None);
    if let Some(payload) = body.payload {
        user = match payload.user_id {
            Some(serde_json::Value::String(user)) if !user.is_empty() => Some(user),
            _ => None,
        };
        removed = payload
            .deauthorization_time
            .as_ref()
            .and_then(|t| t.as_str())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_millis());
        payload_ts = payload.event_ts.as_ref().and_then(millis);
    }
    let top_ts = body.event_ts.as_ref().and_then(millis);
    let at = [removed, payload_ts, top_ts, Some(received_ms)]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(received_ms);
    (user, at)
}

/// Forgets a connection's OAuth tokens and marks it broken; both steps can be repeated. A
/// connection that belongs to another Zoom user than `user` (when both are known) is left as
/// it is: on an account where several users authorized the app, one user removing it does
/// not end the others' authorizations. So is one whose tokens were issued after the app was
/// removed (`removed_ms`, see [`deauthorization`]): Zoom refuses refreshes once the app is
/// removed, so those come from a reconnect. True if the connection was deauthorized.
async fn deauthorize(
    host: &dyn HostEngine,
    cid: &ConnectionId,
    user: Option<&str>,
    removed_ms: i64,
) -> Result<bool, HostError> {
    let stored = host
        .get_vars(cid, &[vars::USER_ID, vars::OAUTH_EXPIRY].map(String::from))
        .await?;
    if let Some(user) = user
        && let Some(own) = crate::connection::value_of(&stored, vars::USER_ID)
        && own != user
    {
        tracing::info!(connection_id = %cid, "app removed in Zoom by another user of the account: connection left as it is");
        return Ok(false);
    }
    // Tokens obtained after the app was removed are a reconnect's.
    if let Some(expiry) = crate::connection::value_of(&stored, vars::OAUTH_EXPIRY)
        .and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok())
        && crate::credentials::obtained_at(expiry.to_utc()).timestamp_millis() > removed_ms
    {
        tracing::info!(connection_id = %cid, "app removed in Zoom before the connection's current tokens were issued (reconnected since): connection left as it is");
        return Ok(false);
    }
    let tokens = [
        vars::OAUTH_ACCESS_TOKEN,
        vars::OAUTH_REFRESH_TOKEN,
        vars::OAUTH_EXPIRY,
    ]
    .map(String::from);
    // One change where the host allows it; otherwise the mark comes first. A connection
    // deleted meanwhile gets no mark: it would be the one variable left of it.
    match host
        .replace_vars_if_set_up(
            cid,
            vec![Var::plain(vars::CONNECTION_ERROR, DEAUTHORIZED_MESSAGE)],
            &tokens,
        )
        .await
    {
        Ok(()) => {}
        Err(HostError::NotFound(_)) => {
            tracing::info!(connection_id = %cid, "app removed in Zoom for a connection already deleted");
            return Ok(false);
        }
        Err(e) => return Err(e),
    }
    tracing::info!(connection_id = %cid, "connection deauthorized in Zoom: tokens removed");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use async_trait::async_trait;
    use sha2::Digest;

    use super::*;
    use crate::webhook::normalize::Received;
    use crate::webhook::outbox::{OutboxSettings, Record};

    /// How the fake host fails: the text that marks the events it fails on, and the error.
    type Poison = (String, fn(String) -> HostError);

    /// A host engine that takes events, except those whose body contains the poison's text,
    /// which it answers with the poison's error while one is set.
    #[derive(Default)]
    struct FakeHost {
        poison: Mutex<Option<Poison>>,
        taken: Mutex<Vec<Event>>,
        /// Attempts at poisoned events.
        poisoned: Mutex<u32>,
        /// Events whose body contains this text are never answered (a call left hanging).
        stall: Mutex<Option<String>>,
    }

    #[async_trait]
    impl HostEngine for FakeHost {
        fn kind(&self) -> &'static str {
            "fake"
        }

        async fn get_vars(&self, _: &ConnectionId, _: &[String]) -> Result<Vec<Var>, HostError> {
            Ok(Vec::new())
        }

        async fn set_vars(&self, _: &ConnectionId, _: Vec<Var>) -> Result<(), HostError> {
            Ok(())
        }

        async fn delete_vars(&self, _: &ConnectionId, _: &[String]) -> Result<(), HostError> {
            Ok(())
        }

        async fn find_connections(&self, _: &str, _: &str) -> Result<Vec<ConnectionId>, HostError> {
            Ok(Vec::new())
        }

        async fn dispatch(&self, event: Event) -> Result<String, HostError> {
            let text = format!("{:?}", event.data);
            let stall = self.stall.lock().unwrap().clone();
            if stall.is_some_and(|stall| text.contains(stall.as_str())) {
                std::future::pending::<()>().await;
            }
            // Copied out, so an error function that panics does not poison the lock.
            let poison = self.poison.lock().unwrap().clone();
            if let Some((poison, error)) = poison
                && text.contains(poison.as_str())
            {
                *self.poisoned.lock().unwrap() += 1;
                return Err(error(format!("the fake host fails on {poison}")));
            }
            let mut taken = self.taken.lock().unwrap();
            taken.push(event);
            Ok(format!("evt_{}", taken.len()))
        }

        async fn check(&self) -> Result<(), HostError> {
            Ok(())
        }
    }

    impl FakeHost {
        fn taken_bodies(&self) -> Vec<String> {
            self.taken
                .lock()
                .unwrap()
                .iter()
                .map(|e| format!("{:?}", e.data))
                .collect()
        }
    }

    /// Where a forwarder under test delivers: `host` (`embedded` when it is the embedded one).
    fn target(host: Arc<dyn HostEngine>, embedded: Option<EmbeddedHost>) -> Target {
        Target {
            credentials: Arc::new(Credentials::with_unreachable_zoom(host.clone())),
            host,
            embedded,
        }
    }

    fn record(n: u32) -> Record {
        let body = format!(r#"{{"event":"meeting.started","payload":{{"n":"row-{n}"}}}}"#);
        Record {
            body_hash: sha2::Sha256::digest(body.as_bytes()).into(),
            destinations: vec![ConnectionId::generate().to_string()],
            received: Received {
                event_type: "meeting.started".into(),
                memo: HashMap::new(),
                received_ms: 1,
                body: body.into_bytes(),
            },
            signed_at_ms: 0,
        }
    }

    /// A running forwarder: its host, outbox, counters, stop, and the outbox's directory.
    type Running = (
        Arc<FakeHost>,
        Outbox,
        Arc<Counters>,
        CancellationToken,
        tempfile::TempDir,
    );

    /// A forwarder with short waits over a fresh outbox holding rows 0..5, row 2 poisoned.
    async fn start(error: fn(String) -> HostError, give_up_after: Duration) -> Running {
        start_with(0..5, "row-2", error, give_up_after).await
    }

    /// A forwarder with short waits over a fresh outbox holding `rows`, `poison` poisoned.
    async fn start_with(
        rows: std::ops::Range<u32>,
        poison: &str,
        error: fn(String) -> HostError,
        give_up_after: Duration,
    ) -> Running {
        let settings = ForwarderSettings {
            backoff_start: Duration::from_millis(5),
            row_backoff_max: Duration::from_millis(20),
            max_attempts: 3,
            give_up_after,
            ..ForwarderSettings::default()
        };
        start_configured(rows, poison, error, settings).await
    }

    /// A forwarder with `settings` over a fresh outbox holding `rows`, `poison` poisoned.
    async fn start_configured(
        rows: std::ops::Range<u32>,
        poison: &str,
        error: fn(String) -> HostError,
        settings: ForwarderSettings,
    ) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        for n in rows {
            outbox.record(record(n)).await.unwrap();
        }
        let host = Arc::new(FakeHost::default());
        *host.poison.lock().unwrap() = Some((poison.into(), error));
        let counters = Arc::new(Counters::new(&crate::metrics::Metrics::new()));
        let stop = CancellationToken::new();
        tokio::spawn(run(
            outbox.clone(),
            target(host.clone(), None),
            counters.clone(),
            settings,
            stop.clone(),
        ));
        (host, outbox, counters, stop, dir)
    }

    async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check().await {
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn app_deauthorized_is_not_delivered_before_its_side_effect_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        let body = r#"{"event":"app_deauthorized","payload":{"account_id":"a"}}"#;
        outbox
            .record(Record {
                body_hash: sha2::Sha256::digest(body.as_bytes()).into(),
                destinations: vec![ConnectionId::generate().to_string()],
                received: Received {
                    event_type: APP_DEAUTHORIZED.into(),
                    memo: HashMap::new(),
                    received_ms: 1,
                    body: body.as_bytes().to_vec(),
                },
                signed_at_ms: 0,
            })
            .await
            .unwrap();
        let other =
            rusqlite::Connection::open(dir.path().join(crate::webhook::outbox::OUTBOX_FILE))
                .unwrap();
        other
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE UPDATE ON outbox
                 BEGIN SELECT RAISE(ABORT, 'the disk says no'); END;",
            )
            .unwrap();
        let host = Arc::new(FakeHost::default());
        let stop = CancellationToken::new();
        tokio::spawn(run(
            outbox.clone(),
            target(host.clone(), None),
            Arc::new(Counters::new(&crate::metrics::Metrics::new())),
            ForwarderSettings {
                backoff_start: Duration::from_millis(5),
                backoff_max: Duration::from_millis(20),
                ..ForwarderSettings::default()
            },
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            host.taken_bodies().is_empty(),
            "delivered before the mark was saved"
        );
        other.execute_batch("DROP TRIGGER refuse").unwrap();
        eventually("delivered once the mark is saved", async || {
            host.taken_bodies().len() == 1
        })
        .await;
        stop.cancel();
    }

    #[test]
    fn only_the_host_s_own_answers_say_it_is_up() {
        let from_host = [
            Outcome::Delivered,
            Outcome::Invalid("refused".into()),
            Outcome::Failed("failed".into()),
        ];
        assert!(from_host.iter().all(Outcome::is_the_host_s));
        let not = [
            Outcome::Unavailable("down".into()),
            Outcome::Unconvertible("too deep".into()),
            Outcome::Panicked("a bug".into()),
        ];
        assert!(!not.iter().any(Outcome::is_the_host_s));
    }

    #[tokio::test]
    async fn an_event_the_host_is_always_unavailable_for_does_not_hold_back_later_ones() {
        // Alone at first (so the host looks down), then with others, then both again.
        let (host, outbox, counters, stop, _dir) = start_with(
            0..1,
            "row-0",
            HostError::Unavailable,
            Duration::from_secs(3600),
        )
        .await;
        eventually("a few attempts at the stuck one", async || {
            *host.poisoned.lock().unwrap() >= 3
        })
        .await;
        for n in 1..4 {
            outbox.record(record(n)).await.unwrap();
        }
        eventually("the later three delivered", async || {
            host.taken_bodies().len() == 3
        })
        .await;
        let tried = *host.poisoned.lock().unwrap();
        eventually("the stuck one still tried", async || {
            *host.poisoned.lock().unwrap() > tried
        })
        .await;
        outbox.record(record(4)).await.unwrap();
        eventually("one more delivered", async || {
            host.taken_bodies().len() == 4
        })
        .await;
        assert_eq!(counters.dead_letters.get(), 0);
        *host.poison.lock().unwrap() = None;
        eventually("the stuck one delivered", async || {
            host.taken_bodies().iter().any(|b| b.contains("row-0"))
        })
        .await;
        stop.cancel();
    }

    #[tokio::test]
    async fn a_stop_mid_batch_keeps_the_deliveries_the_host_answered_and_starts_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        for n in 0..3 {
            outbox.record(record(n)).await.unwrap();
        }
        let host = Arc::new(FakeHost::default());
        // Row 0 is taken, row 1's call hangs (the batch never ends), row 2 waits for a slot.
        *host.stall.lock().unwrap() = Some("row-1".into());
        let stop = CancellationToken::new();
        let forwarder = tokio::spawn(run(
            outbox.clone(),
            target(host.clone(), None),
            Arc::new(Counters::new(&crate::metrics::Metrics::new())),
            ForwarderSettings {
                concurrency: 1,
                ..ForwarderSettings::default()
            },
            stop.clone(),
        ));
        eventually("row 0 taken", async || host.taken_bodies().len() == 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), forwarder)
            .await
            .expect("the forwarder ends on stop")
            .unwrap();
        // What a shutdown does after the forwarder ended: the outbox commits what it holds.
        outbox.close().await;
        let db = rusqlite::Connection::open(dir.path().join(crate::webhook::outbox::OUTBOX_FILE))
            .unwrap();
        let left: Vec<String> = db
            .prepare("SELECT body FROM outbox ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .unwrap()
            .map(|b| String::from_utf8(b.unwrap()).unwrap())
            .collect();
        assert_eq!(left.len(), 2, "only the answered row is gone: {left:?}");
        assert!(left[0].contains("row-1") && left[1].contains("row-2"));
        assert_eq!(
            host.taken_bodies().len(),
            1,
            "no call started after the stop"
        );
    }

    #[tokio::test]
    async fn a_host_that_is_down_gets_one_probe_per_back_off_and_the_held_rows_once_it_answers() {
        // Every event is answered UNAVAILABLE (an overloaded host).
        let settings = ForwarderSettings {
            backoff_start: Duration::from_millis(5),
            backoff_max: Duration::from_millis(20),
            ..ForwarderSettings::default()
        };
        let (host, _outbox, counters, stop, _dir) =
            start_configured(0..20, "row-", HostError::Unavailable, settings).await;
        eventually("ten rounds while the host is down", async || {
            counters.retries.get() >= 10
        })
        .await;
        let calls = u64::from(*host.poisoned.lock().unwrap());
        let rounds = counters.retries.get();
        // The first round tried all 20; each later one a single probe (one round may be under
        // way, its call counted but not yet its round).
        assert!(
            calls <= 20 + rounds,
            "{calls} calls in {rounds} rounds while the host was down"
        );
        *host.poison.lock().unwrap() = None;
        eventually("all 20 delivered once a probe is taken", async || {
            host.taken_bodies().len() >= 20
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(host.taken_bodies().len(), 20, "each delivered once");
        assert_eq!(counters.dead_letters.get(), 0);
        stop.cancel();
    }

    #[tokio::test]
    async fn a_held_row_the_host_keeps_refusing_does_not_stop_the_probes_of_the_others() {
        // Held rows filling the batch (no room for a new one), then with no new row left.
        for (rows, batch_rows) in [(20, 4), (3, 512)] {
            let settings = ForwarderSettings {
                backoff_start: Duration::from_millis(5),
                backoff_max: Duration::from_millis(10),
                row_backoff_max: Duration::from_millis(20),
                batch_rows,
                ..ForwarderSettings::default()
            };
            let (host, _outbox, counters, stop, _dir) =
                start_configured(0..rows, "row-", HostError::Unavailable, settings).await;
            eventually("a few rounds while the host is down", async || {
                counters.retries.get() >= 5
            })
            .await;
            // The host is back, but stays unavailable for the oldest row alone.
            *host.poison.lock().unwrap() = Some(("row-0\"".into(), HostError::Unavailable));
            eventually("every other row delivered", async || {
                host.taken_bodies().len() == rows as usize - 1
            })
            .await;
            assert!(!host.taken_bodies().iter().any(|b| b.contains("row-0\"")));
            stop.cancel();
        }
    }

    #[tokio::test]
    async fn an_event_the_host_fails_on_waits_for_it_without_holding_back_the_others() {
        let (host, outbox, counters, stop, _dir) = start(
            |m| HostError::Remote(format!("Internal: {m}")),
            Duration::from_secs(3600),
        )
        .await;
        eventually("the other four delivered", async || {
            host.taken_bodies().len() == 4
        })
        .await;
        assert!(host.taken_bodies().iter().all(|b| !b.contains("row-2")));
        // Far more attempts than `max_attempts`, and still not a dead letter: the host failed,
        // the event is fine.
        eventually("ten attempts at the failing one", async || {
            *host.poisoned.lock().unwrap() >= 10
        })
        .await;
        assert_eq!(outbox.counts().await.unwrap(), (1, 0));
        assert_eq!(counters.dead_letters.get(), 0);
        // The host recovers: the event arrives.
        *host.poison.lock().unwrap() = None;
        eventually("the failing one delivered", async || {
            host.taken_bodies().iter().any(|b| b.contains("row-2"))
        })
        .await;
        outbox.flush().await;
        eventually("the outbox empty", async || {
            outbox.flush().await;
            outbox.counts().await.unwrap() == (0, 0)
        })
        .await;
        stop.cancel();
    }

    #[tokio::test]
    async fn an_event_the_host_keeps_failing_on_becomes_a_dead_letter_only_after_give_up_after() {
        let started = Instant::now();
        let give_up_after = Duration::from_millis(600);
        let (host, outbox, counters, stop, _dir) = start(
            |m| HostError::Remote(format!("Unknown: {m}")),
            give_up_after,
        )
        .await;
        eventually("a dead letter", async || counters.dead_letters.get() == 1).await;
        assert!(
            started.elapsed() >= give_up_after,
            "dead after {:?}",
            started.elapsed()
        );
        assert!(*host.poisoned.lock().unwrap() >= 3);
        assert_eq!(host.taken_bodies().len(), 4, "the others delivered");
        eventually("one dead letter, nothing pending", async || {
            outbox.flush().await;
            outbox.counts().await.unwrap() == (0, 1)
        })
        .await;
        stop.cancel();
    }

    #[tokio::test]
    async fn a_delivery_that_panics_fails_like_any_other_and_the_forwarder_goes_on() {
        let (host, outbox, counters, stop, dir) =
            start(|m| panic!("a bug met with {m}"), Duration::from_millis(100)).await;
        eventually("a dead letter", async || counters.dead_letters.get() == 1).await;
        assert!(
            *host.poisoned.lock().unwrap() >= 3,
            "retried on its back-off"
        );
        assert_eq!(host.taken_bodies().len(), 4, "the others delivered");
        outbox.record(record(9)).await.unwrap();
        eventually("a later event delivered too", async || {
            host.taken_bodies().len() == 5
        })
        .await;
        outbox.flush().await;
        let db = rusqlite::Connection::open(dir.path().join(crate::webhook::outbox::OUTBOX_FILE))
            .unwrap();
        let error: String = db
            .query_row("SELECT error FROM dead_letters", [], |r| r.get(0))
            .unwrap();
        assert!(
            error.contains(
                "delivering the event panicked: a bug met with the fake host fails on row-2"
            ),
            "{error}"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn an_event_the_host_calls_invalid_becomes_a_dead_letter_after_max_attempts() {
        let (host, outbox, counters, stop, _dir) =
            start(HostError::InvalidArgument, Duration::from_secs(3600)).await;
        eventually("a dead letter", async || counters.dead_letters.get() == 1).await;
        assert_eq!(*host.poisoned.lock().unwrap(), 3, "max_attempts");
        assert_eq!(host.taken_bodies().len(), 4, "the others delivered");
        eventually("one dead letter, nothing pending", async || {
            outbox.flush().await;
            outbox.counts().await.unwrap() == (0, 1)
        })
        .await;
        stop.cancel();
    }

    #[tokio::test]
    async fn a_delivery_repeated_after_a_crash_is_logged_once_by_the_embedded_host() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        for n in 0..3 {
            outbox.record(record(n)).await.unwrap();
        }
        let keys = Arc::new(crate::crypto::Keys::from_material(&[7; 32]));
        let embedded = EmbeddedHost::open(dir.path(), keys).unwrap();
        let target = target(Arc::new(embedded.clone()), Some(embedded.clone()));
        let rows = outbox.pending(0, 100, 1 << 20).await.unwrap();
        assert_eq!(rows.len(), 3);
        let batch = |rows: &[Pending]| -> Vec<Attempt> {
            rows.iter().map(|r| Attempt::new(r.clone())).collect()
        };
        // Saved, then the process dies before the outbox hears: the rows are delivered again,
        // once in a batch and once one at a time.
        for _ in 0..2 {
            let outcomes = deliver_embedded(&target, &outbox, &embedded, batch(&rows)).await;
            assert!(
                outcomes
                    .iter()
                    .all(|(_, o)| matches!(o, Outcome::Delivered))
            );
        }
        let one = batch(&rows[..1]).pop().unwrap();
        let event = prepare(&target, &outbox, &mut Attempt::new(one.row))
            .await
            .ok()
            .unwrap();
        let again = embedded
            .save_deliveries(vec![
                LogEntry::new(event, Some(delivery_key(&rows[0]))).unwrap(),
            ])
            .await
            .unwrap();
        let logged = embedded
            .list_events(crate::host::embedded::EventFilter {
                limit: 100,
                ascending: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(logged.len(), 3, "each delivery logged once");
        assert_eq!(again, [logged[0].event_id.clone()], "the first id is kept");
        // The same rows of another outbox (ids start again) are other deliveries.
        let mut reborn = batch(&rows);
        for attempt in &mut reborn {
            attempt.row.received.received_ms += 60_000;
        }
        deliver_embedded(&target, &outbox, &embedded, reborn).await;
        let logged = embedded
            .list_events(crate::host::embedded::EventFilter {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(logged.len(), 6);
    }

    #[tokio::test]
    async fn app_deauthorized_for_a_connection_deleted_meanwhile_leaves_nothing_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let keys = std::sync::Arc::new(crate::crypto::Keys::from_material(&[7; 32]));
        let host = crate::host::embedded::EmbeddedHost::open(dir.path(), keys).unwrap();
        let (kept, deleted) = (ConnectionId::generate(), ConnectionId::generate());
        for cid in [&kept, &deleted] {
            let setup = vec![
                Var::plain(vars::AUTH_TYPE, "oauthDefault"),
                Var::secret(vars::OAUTH_ACCESS_TOKEN, "access"),
            ];
            host.set_vars(cid, setup).await.unwrap();
        }
        host.delete_vars(&deleted, &[]).await.unwrap();
        let now = crate::db::now_ms();
        assert!(!deauthorize(&host, &deleted, None, now).await.unwrap());
        assert!(host.get_vars(&deleted, &[]).await.unwrap().is_empty());
        assert!(deauthorize(&host, &kept, None, now).await.unwrap());
        let left = host.get_vars(&kept, &[]).await.unwrap();
        let left = crate::host::names_and_values(&left);
        assert_eq!(
            left,
            [
                (vars::AUTH_TYPE, "oauthDefault"),
                (vars::CONNECTION_ERROR, DEAUTHORIZED_MESSAGE)
            ]
        );
    }

    #[test]
    fn the_app_counts_as_removed_when_zoom_says_or_else_when_the_event_arrived() {
        let sample =
            include_bytes!("../../integration-tests/fixtures/zoom-samples/app_deauthorized.json");
        let received = 1_700_000_000_000;
        // deauthorization_time 2022-03-23T12:40:00.000Z, event_ts "1648039200000": the same.
        assert_eq!(
            deauthorization(sample, received),
            (Some("tUo7WohjTs6ELvl9WR3JAA".into()), 1_648_039_200_000)
        );
        let late = br#"{"event":"app_deauthorized","event_ts":1700000000500,
            "payload":{"deauthorization_time":"2023-11-14T22:13:00Z","user_id":""}}"#;
        assert_eq!(
            deauthorization(late, received + 60_000),
            (None, 1_699_999_980_000)
        );
        // Nothing to go by, or times after the arrival: the arrival.
        for body in [
            &br#"{"event":"app_deauthorized","payload":{}}"#[..],
            br#"{"event":"app_deauthorized","event_ts":"soon","payload":{"event_ts":9999999999999}}"#,
            b"not json",
        ] {
            assert_eq!(deauthorization(body, received).1, received);
        }
    }

    #[tokio::test]
    async fn app_deauthorized_received_before_a_reconnect_leaves_the_new_tokens_alone() {
        let dir = tempfile::tempdir().unwrap();
        let keys = std::sync::Arc::new(crate::crypto::Keys::from_material(&[7; 32]));
        let host = crate::host::embedded::EmbeddedHost::open(dir.path(), keys).unwrap();
        let received = chrono::Utc::now() - chrono::Duration::minutes(10);
        let connection = |issued: chrono::DateTime<chrono::Utc>| {
            let expiry = (issued + chrono::Duration::seconds(3599))
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            vec![
                Var::plain(vars::AUTH_TYPE, "oauthDefault"),
                Var::secret(vars::OAUTH_ACCESS_TOKEN, "access"),
                Var::secret(vars::OAUTH_REFRESH_TOKEN, "refresh"),
                Var::plain(vars::OAUTH_EXPIRY, &expiry),
            ]
        };
        // Reconnected 5 minutes after the event arrived: left as it is.
        let reconnected = ConnectionId::generate();
        let fresh = connection(received + chrono::Duration::minutes(5));
        host.set_vars(&reconnected, fresh).await.unwrap();
        let at = received.timestamp_millis();
        assert!(!deauthorize(&host, &reconnected, None, at).await.unwrap());
        let left = host.get_vars(&reconnected, &[]).await.unwrap();
        assert!(crate::connection::value_of(&left, vars::OAUTH_REFRESH_TOKEN).is_some());
        assert!(crate::connection::value_of(&left, vars::CONNECTION_ERROR).is_none());
        // Tokens issued (or refreshed) before the event: removed.
        let stale = ConnectionId::generate();
        let old = connection(received - chrono::Duration::minutes(20));
        host.set_vars(&stale, old).await.unwrap();
        assert!(deauthorize(&host, &stale, None, at).await.unwrap());
        let left = host.get_vars(&stale, &[]).await.unwrap();
        assert!(crate::connection::value_of(&left, vars::OAUTH_REFRESH_TOKEN).is_none());
        assert_eq!(
            crate::connection::value_of(&left, vars::CONNECTION_ERROR),
            Some(DEAUTHORIZED_MESSAGE)
        );
    }
}
