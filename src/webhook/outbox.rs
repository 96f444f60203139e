//! The durable record of accepted webhooks: `DATA_DIR/outbox.db`, a SQLite database of its
//! own (so it works the same with the embedded and with a remote host engine), keeps each
//! (event, connection) pair until the forwarder has delivered it.
//!
//! Group commit: a request checks its body's key against the deduplication keys in memory,
//! adds its webhook to the open group and waits for that group's commit. The committer thread,
//! woken by the first request to find it idle, takes the open group, writes it in one
//! transaction (one fsync of the write-ahead log with `OUTBOX_SYNC=full`), answers every request
//! of the group at once, and goes on with the group that filled meanwhile until none is left.
//! Nothing crosses a thread per webhook: under load the committer never sleeps, and a request
//! costs one short lock and one wake-up.
//!
//! Deduplication: a body whose SHA-256 was committed within the replay window is answered
//! "duplicate" and not recorded again; one arriving while the same body waits for its commit
//! shares that commit's outcome. The keys (the first 8 bytes of the hash) live in memory, in
//! generations of 1/16 of the window, and are saved with each group, one row of keys per
//! group, so they survive restarts. A group that fails to commit forgets its keys: Zoom's retry
//! is then recorded.
//!
//! Rows leave the outbox when the forwarder has delivered them, or move to `dead_letters`
//! when the host engine refused them for good; those changes ride along with the next group.
//!
//! The database also keeps the connections webhook routing knows are set up (see
//! [`crate::webhook::routing`]): with a remote host, which lists only the active ones, they are
//! how a restarted service still knows a connection of a project not deployed yet. They change
//! when a connection does, never per webhook, and ride along with the next group too.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::Notify;

use crate::webhook::journal;
use crate::webhook::normalize::Received;

/// File name of the outbox inside `DATA_DIR`.
pub const OUTBOX_FILE: &str = "outbox.db";

const MIGRATIONS: &[&str] = &[
    // 1: pending deliveries, deduplication keys, and deliveries the host refused for good.
    "CREATE TABLE outbox (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        destination TEXT NOT NULL,
        received_ms INTEGER NOT NULL,
        event_type  TEXT NOT NULL,
        memo        TEXT NOT NULL,
        body        BLOB NOT NULL
    );
    CREATE TABLE dedupe (
        hash       BLOB PRIMARY KEY,
        expires_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX dedupe_by_expiry ON dedupe (expires_ms);
    CREATE TABLE dead_letters (
        id          INTEGER PRIMARY KEY,
        destination TEXT NOT NULL,
        received_ms INTEGER NOT NULL,
        event_type  TEXT NOT NULL,
        memo        TEXT NOT NULL,
        body        BLOB NOT NULL,
        failed_ms   INTEGER NOT NULL,
        error       TEXT NOT NULL
    );",
    // 2: how far the journal of earlier versions is applied, and when the database was last
    // synced.
    "CREATE TABLE journal_state (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        applied_seq INTEGER NOT NULL,
        synced_ms   INTEGER NOT NULL
    );
    INSERT INTO journal_state VALUES (1, 0, 0);",
    // 3: deduplication keys a group at a time (8 bytes each, in `keys`), instead of a row per
    // key at a random place in a B-tree. Ids grow with time, and so does `expires_ms`.
    "CREATE TABLE dedupe_keys (
        id         INTEGER PRIMARY KEY,
        expires_ms INTEGER NOT NULL,
        keys       BLOB NOT NULL
    );
    INSERT INTO dedupe_keys (expires_ms, keys)
        SELECT expires_ms, substr(hash, 1, 8) FROM dedupe ORDER BY expires_ms;
    DROP TABLE dedupe;",
    // 4: whether a row's side effect in the host (app_deauthorized's) is done, so a delivery
    // retried after a restart does not do it again.
    "ALTER TABLE outbox ADD COLUMN side_effect_done INTEGER NOT NULL DEFAULT 0;",
    // 5: a dead letter keeps that mark, so a redriven `app_deauthorized` does not deauthorize
    // again a connection its owner reconnected meanwhile.
    "ALTER TABLE dead_letters ADD COLUMN side_effect_done INTEGER NOT NULL DEFAULT 0;",
    // 6: each row of keys keeps its anchor, so it lives a window after it under whatever
    // window the service runs with now (a raised WEBHOOK_REPLAY_WINDOW kept keys only until
    // the old window's end). Rows from before have none, and keep their `expires_ms`.
    "ALTER TABLE dedupe_keys ADD COLUMN anchor_ms INTEGER;",
    // 7: the connections this service knows are set up, with their `auth_type`: a remote
    // host lists only the active ones, and those the routing index keeps after a restart.
    "CREATE TABLE known_connections (
        connection_id TEXT PRIMARY KEY,
        auth_type     TEXT NOT NULL
    ) WITHOUT ROWID;",
];

/// Knobs of the outbox; the defaults suit production and tests alike.
#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// `OUTBOX_SYNC`: fsync every commit (`Full`) or only survive process crashes (`Normal`).
    pub sync: crate::config::OutboxSync,
    /// Past this length the committer copies the write-ahead log into the database and starts
    /// it over (the file keeps its size, and is cut back to this one if it grew past it).
    pub wal_limit: u64,
    /// How long a body's key is remembered for deduplication (the replay window).
    pub dedupe_window: Duration,
    /// Deduplication keys held at most (16 to 32 bytes of memory each); past it webhooks are
    /// refused (503) until keys expire. The default holds 90 minutes of 1,500 webhooks/s.
    pub dedupe_capacity: usize,
    /// How long a request waits for its commit before it is answered 503.
    pub record_timeout: Duration,
    /// Webhooks waiting for a commit at most; more are refused at once (503).
    pub queue_capacity: usize,
    /// Bytes of bodies waiting for a commit at most; more are refused at once (503).
    pub queue_bytes: usize,
    /// How often expired deduplication keys are purged from the database.
    pub purge_interval: Duration,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            sync: crate::config::OutboxSync::Full,
            wal_limit: 64 << 20,
            dedupe_window: Duration::from_secs(90 * 60),
            dedupe_capacity: 8 << 20,
            record_timeout: Duration::from_secs(2),
            queue_capacity: 8192,
            queue_bytes: 64 << 20,
            purge_interval: Duration::from_secs(60),
        }
    }
}

/// Why the outbox could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The database failed.
    #[error("cannot open the event outbox {path}: {source}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// Another process (or another outbox in this one) has this data directory's outbox open.
    #[error(
        "the event outbox {path} is in use by another process: is the service already running on this DATA_DIR?"
    )]
    InUse {
        /// The lock file.
        path: PathBuf,
    },
    /// The lock file could not be made.
    #[error("cannot lock the event outbox {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The committer thread could not be started.
    #[error("cannot start the event outbox committer: {source}")]
    Thread {
        /// What the system said.
        source: std::io::Error,
    },
    /// The journal left by an earlier version could not be read or removed.
    #[error("cannot read the event outbox journal {path}: {source}")]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
}

/// Why a webhook was not recorded. Every case means "not durable": answer 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Too much is already waiting for a commit, or too many keys are remembered.
    #[error("the event outbox is busy")]
    Busy,
    /// The commit did not complete within the record timeout (it may still complete later).
    #[error("the event outbox did not commit in time")]
    TimedOut,
    /// The database failed.
    #[error("the event outbox failed: {0}")]
    Storage(String),
}

/// A webhook to record: its body hash for deduplication, and one row per destination.
pub struct Record {
    /// What deduplicates it: SHA-256 of the raw body (and of the verifying secret's scope tag,
    /// for a private app's secret; see [`crate::webhook::routing::Snapshot::dedupe_hash`]).
    pub body_hash: [u8; 32],
    /// Connection ids to deliver to (at least one).
    pub destinations: Vec<String>,
    /// The webhook itself.
    pub received: Received,
    /// The end of the second of Zoom's timestamp of the request (Unix ms; 0 when unknown). A
    /// replay of it is accepted until a window after that, so its key is kept until then at
    /// least, even when Zoom's clock is ahead of ours.
    pub signed_at_ms: i64,
}

/// What recording did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded now, durably.
    New,
    /// The same body was recorded within the window; nothing was written.
    Duplicate,
}

/// One undelivered (event, connection) pair.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Row id; rows are read in id order.
    pub id: i64,
    /// The connection id.
    pub destination: String,
    /// The webhook.
    pub received: Received,
    /// Whether the event's side effect in the host is done (see [`Outbox::side_effect_done`]).
    pub side_effect_done: bool,
}

/// Handle of the outbox: cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
    committer: Arc<Committer>,
}

/// The committer thread, woken when a group opens and no commit runs; dropped with the last
/// handle, which lets it end.
struct Committer(std::thread::Thread);

impl Drop for Committer {
    fn drop(&mut self) {
        self.0.unpark();
    }
}

/// What requests, the committer and the forwarder share.
struct Shared {
    state: Mutex<State>,
    /// The only writing connection; the committer's while it runs. `None` once closed.
    writer: Mutex<Option<Writer>>,
    /// The forwarder's reading connection. `None` once closed.
    reader: Mutex<Option<Connection>>,
    /// Notified after a commit that inserted rows.
    committed: Notify,
    /// Rows in `outbox` (undelivered pairs) as of the last commit.
    rows: AtomicU64,
    settings: OutboxSettings,
}

/// Everything a request touches, under one short lock.
struct State {
    /// The group filling now.
    open: Group,
    /// Whether the committer is committing (or has been woken to).
    committing: bool,
    /// The outcome of the group being committed as a whole (its webhooks and the forwarder's
    /// changes), while one is.
    committing_outcome: Option<Arc<Outcome>>,
    /// Keys of the bodies in the open and the committing group, with their group's outcome:
    /// one per webhook waiting for a commit (a second with the same key is a duplicate).
    in_flight: HashMap<u64, Arc<Outcome>, KeyHasher>,
    /// Keys committed within the window.
    keys: Keys,
    /// Bytes of bodies waiting for a commit (the open and committing groups).
    queued_bytes: usize,
    /// Set by `close`: recording fails from then on.
    closed: bool,
    /// When it was last logged that the keys are at capacity (Unix ms).
    warned_full_ms: i64,
}

/// The webhooks and forwarder changes of one transaction, and its outcome.
#[derive(Default)]
struct Group {
    records: Vec<Record>,
    changes: Vec<Change>,
    bytes: usize,
    /// Whether its webhooks were committed: what their requests wait for.
    outcome: Arc<Outcome>,
    /// Whether its webhooks and the forwarder's changes (those tried again included) were all
    /// committed: what [`Outbox::flushed`] waits for (the changes may be rolled back alone).
    /// A caller that finds a change of its own not yet committed asks again later (the
    /// forwarder holds an `app_deauthorized` until its mark is saved), so a change that keeps
    /// failing holds back those callers, never the webhooks.
    whole: Arc<Outcome>,
}

impl Group {
    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.changes.is_empty()
    }
}

/// A change from the forwarder, applied with the next group.
#[derive(Clone)]
enum Change {
    /// Delivered rows to remove.
    Delivered(Vec<i64>),
    /// A row the host refused for good.
    Failed { id: i64, error: String },
    /// A row whose side effect in the host is done.
    SideEffectDone(i64),
    /// A connection set up with this `auth_type`, or (`None`) no longer set up.
    Known {
        connection_id: String,
        auth_type: Option<String>,
    },
}

/// The outcome of one group's commit, which all its requests wait for.
#[derive(Default)]
struct Outcome {
    result: OnceLock<Result<(), String>>,
    done: Notify,
}

impl Outcome {
    /// Sets the result and wakes one waiter, which wakes the others (see `wait`).
    fn finish(&self, result: Result<(), String>) {
        let _ = self.result.set(result);
        // The committer is not a runtime thread: every task it wakes goes through the
        // runtime's shared queue and may cost a system call to wake a worker, while the
        // woken worker can take the CPU from the committer in the middle of the list. One
        // such wake per group; the rest are woken from inside the runtime, cheaply.
        self.done.notify_one();
    }

    async fn wait(&self) -> Result<(), String> {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            // Registered before looking, so a finish in between is not missed.
            done.as_mut().enable();
            if let Some(result) = self.result.get() {
                // Whoever sees the result first wakes the others waiting (none: a no-op).
                // A waiter given the one wake but gone (timed out) hands it on to the next.
                self.done.notify_waiters();
                return result.clone();
            }
            done.await;
        }
    }
}

/// The deduplication key of a body: the first 8 bytes of its SHA-256. Bodies are signed by
/// Zoom, so nobody can aim for a collision, and by chance one is about one in 10^12 even with
/// millions of keys held.
fn dedupe_key(hash: &[u8; 32]) -> u64 {
    u64::from_le_bytes(hash[..8].try_into().expect("8 bytes"))
}

/// Keys are already uniformly random: hashing them again is wasted work.
#[derive(Default)]
struct KeyHash(u64);

impl Hasher for KeyHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type KeyHasher = BuildHasherDefault<KeyHash>;

/// The keys committed within the window, in generations of 1/16 of it: a key is kept at
/// least the window after its anchor (its commit, or Zoom's timestamp of the request when that
/// is later) and at most 1/16 longer, and expiring is dropping a whole generation.
struct Keys {
    window_ms: i64,
    span_ms: i64,
    /// Oldest first: when each generation started, and its keys. A generation holds the keys
    /// anchored from its start to a span after it.
    generations: VecDeque<(i64, HashSet<u64, KeyHasher>)>,
    len: usize,
}

impl Keys {
    fn new(window: Duration) -> Self {
        let window_ms = window.as_millis() as i64;
        Self {
            window_ms,
            span_ms: window_ms / 16,
            generations: VecDeque::new(),
            len: 0,
        }
    }

    fn expire(&mut self, now: i64) {
        while let Some((started, keys)) = self.generations.front() {
            if started + self.span_ms + self.window_ms > now {
                break;
            }
            self.len -= keys.len();
            self.generations.pop_front();
        }
    }

    fn contains(&mut self, key: u64, now: i64) -> bool {
        self.expire(now);
        self.generations.iter().any(|(_, keys)| keys.contains(&key))
    }

    /// Adds keys anchored at `at` (Unix ms): each is kept until at least a window after it.
    /// Expiring is left to [`Self::contains`], which knows the time: `at` may be ahead of it.
    fn extend(&mut self, keys: impl IntoIterator<Item = u64>, at: i64) {
        let generation = self.generation_for(at);
        let before = generation.len();
        generation.extend(keys);
        let added = generation.len() - before;
        self.len += added;
    }

    /// The generation for keys anchored at `at`: one that started at most a span before it
    /// (not after, or the key would expire early), else a new one starting at `at`. Anchors
    /// come mostly in order, so that is mostly the newest generation.
    fn generation_for(&mut self, at: i64) -> &mut HashSet<u64, KeyHasher> {
        let fits = |started: i64| started <= at && at < started + self.span_ms;
        let i = match self.generations.back() {
            Some((started, _)) if fits(*started) => self.generations.len() - 1,
            _ => {
                // The first generation starting after `at`; the one before it may fit.
                let after = self
                    .generations
                    .partition_point(|(started, _)| *started <= at);
                if after > 0 && fits(self.generations[after - 1].0) {
                    after - 1
                } else {
                    self.generations.insert(after, (at, HashSet::default()));
                    after
                }
            }
        };
        &mut self.generations[i].1
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Outbox {
    /// Opens (creating if needed) `outbox.db` in `data_dir`, applies what a journal left by
    /// an earlier version holds beyond it, and loads the deduplication keys of the window.
    /// Takes the data directory's lock first; see [`Self::open_locked`] for a caller that
    /// holds it already.
    pub fn open(data_dir: &Path, settings: OutboxSettings) -> Result<Self, OpenError> {
        Self::open_locked(data_dir, DataDirLock::acquire(data_dir)?, settings)
    }

    /// [`Self::open`] under `lock`, the caller's lock on `data_dir`, which the outbox keeps
    /// until it is closed.
    pub fn open_locked(
        data_dir: &Path,
        lock: DataDirLock,
        settings: OutboxSettings,
    ) -> Result<Self, OpenError> {
        let path = data_dir.join(OUTBOX_FILE);
        let err = |source| OpenError::Database {
            path: path.clone(),
            source,
        };
        let mut conn = open_connection(&path).map_err(err)?;
        crate::db::migrate(&mut conn, MIGRATIONS).map_err(err)?;
        conn.pragma_update(None, "synchronous", synchronous(&settings))
            .map_err(err)?;
        // Checkpoints run on the reader's connection (see `checkpoint`) and on the committer
        // between groups (see `Writer::maintain`): never inside a commit requests wait for.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(err)?;
        // A log that once grew past the limit (readers kept it from starting over) is cut
        // back to it the next time it starts over.
        conn.pragma_update(None, "journal_size_limit", settings.wal_limit as i64)
            .map_err(err)?;
        let page_size: i64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(err)?;
        recover_journal(data_dir, &mut conn, &settings)?;
        let mut keys = Keys::new(settings.dedupe_window);
        load_keys(&conn, &mut keys, settings.dedupe_window).map_err(err)?;
        let reader = open_connection(&path).map_err(err)?;
        // Counted once here; the committer keeps the count from then on, so a metrics scrape
        // does not walk a large backlog.
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))
            .map_err(err)?;
        let writer = Writer {
            conn,
            _lock: lock,
            last_purge: Instant::now(),
            unchecked: 0,
            logged: 0,
            // Each page goes to the log with a 24-byte frame header.
            frame_bytes: page_size.max(512) as u64 + 24,
            warned_changes: None,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                open: Group::default(),
                committing: false,
                committing_outcome: None,
                in_flight: HashMap::default(),
                keys,
                queued_bytes: 0,
                closed: false,
                warned_full_ms: 0,
            }),
            writer: Mutex::new(Some(writer)),
            reader: Mutex::new(Some(reader)),
            rows: AtomicU64::new(rows as u64),
            committed: Notify::new(),
            settings,
        });
        // A thread of its own rather than the caller's runtime: it is not slowed down with
        // whatever runtime calls `delivered` (the forwarder runs at a lower priority).
        let weak = Arc::downgrade(&shared);
        let thread = std::thread::Builder::new()
            .name("outbox-committer".into())
            .spawn(move || {
                loop {
                    std::thread::park();
                    let Some(shared) = weak.upgrade() else { return };
                    commit_until_idle(&shared);
                }
            })
            .map_err(|source| OpenError::Thread { source })?;
        Ok(Self {
            shared,
            committer: Arc::new(Committer(thread.thread().clone())),
        })
    }

    /// Records a webhook durably, or says why not within the record timeout.
    pub async fn record(&self, record: Record) -> Result<Recorded, RecordError> {
        self.record_until(
            record,
            tokio::time::Instant::now() + self.shared.settings.record_timeout,
        )
        .await
    }

    /// Like [`Self::record`], giving up at `deadline` if that comes before the record timeout.
    pub async fn record_until(
        &self,
        record: Record,
        deadline: tokio::time::Instant,
    ) -> Result<Recorded, RecordError> {
        let settings = &self.shared.settings;
        let deadline = deadline.min(tokio::time::Instant::now() + settings.record_timeout);
        let key = dedupe_key(&record.body_hash);
        // The body is held once however many connections it is for: a body within the
        // webhook limit always fits an empty queue.
        let bytes = record.received.body.len();
        let (outcome, duplicate) = {
            let mut state = lock(&self.shared.state);
            if state.closed {
                return Err(RecordError::Storage("the event outbox is closed".into()));
            }
            let now = crate::db::now_ms();
            if let Some(outcome) = state.in_flight.get(&key) {
                (outcome.clone(), true)
            } else if state.keys.contains(key, now) {
                return Ok(Recorded::Duplicate);
            } else {
                if state.in_flight.len() >= settings.queue_capacity
                    || state.queued_bytes + bytes > settings.queue_bytes
                {
                    return Err(RecordError::Busy);
                }
                if state.keys.len + state.in_flight.len() >= settings.dedupe_capacity {
                    if now - state.warned_full_ms >= 60_000 {
                        state.warned_full_ms = now;
                        tracing::warn!(
                            keys = settings.dedupe_capacity,
                            "the event outbox holds as many deduplication keys as it may; webhooks get 503 until old ones expire"
                        );
                    }
                    return Err(RecordError::Busy);
                }
                let outcome = state.open.outcome.clone();
                state.in_flight.insert(key, outcome.clone());
                state.queued_bytes += bytes;
                state.open.bytes += bytes;
                state.open.records.push(record);
                self.start_committer(&mut state);
                (outcome, false)
            }
        };
        match tokio::time::timeout_at(deadline, outcome.wait()).await {
            Ok(Ok(())) if duplicate => Ok(Recorded::Duplicate),
            Ok(Ok(())) => Ok(Recorded::New),
            Ok(Err(e)) => Err(RecordError::Storage(e)),
            Err(_) => Err(RecordError::TimedOut),
        }
    }

    /// Wakes the committer unless it is committing: it takes the open group when it can.
    fn start_committer(&self, state: &mut State) {
        if state.committing {
            return;
        }
        state.committing = true;
        self.committer.0.unpark();
    }

    /// Up to `max_rows` undelivered rows after `after_id`, in id order, stopping early once
    /// their bodies add up to `max_bytes`.
    pub async fn pending(
        &self,
        after_id: i64,
        max_rows: usize,
        max_bytes: usize,
    ) -> Result<Vec<Pending>, RecordError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, destination, received_ms, event_type, memo, body, side_effect_done
                 FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let mut rows = stmt.query(params![after_id, max_rows as i64])?;
            let (mut out, mut bytes) = (Vec::new(), 0usize);
            while let Some(row) = rows.next()? {
                let memo: String = row.get(4)?;
                let body: Vec<u8> = row.get(5)?;
                bytes += body.len();
                out.push(Pending {
                    id: row.get(0)?,
                    destination: row.get(1)?,
                    received: Received {
                        received_ms: row.get(2)?,
                        event_type: row.get(3)?,
                        memo: serde_json::from_str(&memo).unwrap_or_default(),
                        body,
                    },
                    side_effect_done: row.get(6)?,
                });
                if bytes >= max_bytes {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    /// Runs `f` on the reading connection, on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, RecordError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let reader = lock(&shared.reader);
            f(reader.as_ref().ok_or(rusqlite::Error::InvalidQuery)?)
        })
        .await
        .map_err(|e| RecordError::Storage(e.to_string()))?
        .map_err(|e| RecordError::Storage(e.to_string()))
    }

    /// Copies committed WAL pages into the database without blocking commits (a PASSIVE
    /// checkpoint), so the WAL stops growing. The forwarder calls it between batches.
    pub async fn checkpoint(&self) {
        let result = self
            .read(|conn| conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())))
            .await;
        if let Err(e) = result
            && !lock(&self.shared.state).closed
        {
            tracing::warn!(error = %e, "event outbox checkpoint failed");
        }
    }

    /// Removes delivered rows (with the next group; a crash before that means the rows are
    /// delivered again: at least once).
    pub async fn delivered(&self, ids: Vec<i64>) {
        if !ids.is_empty() {
            self.change(Change::Delivered(ids));
        }
    }

    /// Moves a row the host engine refused for good to `dead_letters`, with the reason.
    pub async fn failed(&self, id: i64, error: String) {
        self.change(Change::Failed { id, error });
    }

    /// Notes that a row's side effect in the host is done (with the next group), so a
    /// delivery retried after a restart does not do it again.
    pub async fn side_effect_done(&self, id: i64) {
        self.change(Change::SideEffectDone(id));
    }

    /// Notes that `connection_id` is set up with `auth_type`, or (`None`) is no longer set up,
    /// with the next group; [`Self::known_connections`] reads them back after a restart.
    /// Called when a connection changes, never per webhook.
    pub fn know_connection(&self, connection_id: &str, auth_type: Option<&str>) {
        self.change(Change::Known {
            connection_id: connection_id.to_string(),
            auth_type: auth_type.map(String::from),
        });
    }

    /// The connections [`Self::know_connection`] noted as set up, with their `auth_type`, in
    /// id order. Reads on this thread: for start-up, before requests arrive.
    pub fn known_connections(&self) -> rusqlite::Result<Vec<(String, String)>> {
        let reader = lock(&self.shared.reader);
        let conn = reader.as_ref().ok_or(rusqlite::Error::InvalidQuery)?;
        let mut stmt = conn.prepare(
            "SELECT connection_id, auth_type FROM known_connections ORDER BY connection_id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    fn change(&self, change: Change) {
        let mut state = lock(&self.shared.state);
        state.open.changes.push(change);
        self.start_committer(&mut state);
    }

    /// Waits until everything handed to the outbox before this call is committed (or failed).
    pub async fn flush(&self) {
        let _ = self.flushed().await;
    }

    /// Like [`Self::flush`], saying whether the last commit it waited for failed (what it
    /// held is then tried again with the next one).
    pub async fn flushed(&self) -> Result<(), String> {
        let outcome = {
            let state = lock(&self.shared.state);
            if state.open.is_empty() {
                state.committing_outcome.clone()
            } else {
                Some(state.open.whole.clone())
            }
        };
        match outcome {
            Some(outcome) => outcome.wait().await,
            None => Ok(()),
        }
    }

    /// Commits what was handed over before, then closes the database, so its files are
    /// complete and settled when this returns. Recording fails (503) from then on.
    pub async fn close(&self) {
        lock(&self.shared.state).closed = true;
        self.flush().await;
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            // Waits for a commit in progress (a change handed over meanwhile) to end.
            lock(&shared.writer).take();
            lock(&shared.reader).take();
        })
        .await;
    }

    /// Completes after a commit inserted new rows (or at once if one did since the last wait).
    pub async fn committed(&self) {
        self.shared.committed.notified().await;
    }

    /// How many pairs wait for delivery (as of the last commit, counted in memory), and when
    /// the oldest was received (Unix ms). Ids grow with time, so the oldest is the lowest id:
    /// no scan.
    pub async fn depth(&self) -> Result<(u64, Option<i64>), RecordError> {
        let oldest = self
            .read(|conn| {
                conn.query_row(
                    "SELECT received_ms FROM outbox ORDER BY id LIMIT 1",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
            })
            .await?;
        Ok((self.shared.rows.load(Ordering::Relaxed), oldest))
    }

    /// Counts of undelivered rows and dead letters.
    pub async fn counts(&self) -> Result<(u64, u64), RecordError> {
        self.read(|conn| {
            conn.query_row(
                "SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM dead_letters)",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
        })
        .await
    }
}

/// The committer: commits groups until none is open.
fn commit_until_idle(shared: &Shared) {
    loop {
        let group = {
            let mut state = lock(&shared.state);
            if state.open.is_empty() {
                state.committing = false;
                state.committing_outcome = None;
                return;
            }
            let group = std::mem::take(&mut state.open);
            state.committing_outcome = Some(group.whole.clone());
            group
        };
        let mut group = group;
        let mut writer = lock(&shared.writer);
        let result = match writer.as_mut() {
            Some(writer) => writer
                .commit(&group, shared.settings.dedupe_window)
                .map_err(|e| {
                    tracing::error!(error = %e, webhooks = group.records.len(), "event outbox database commit failed; the webhooks are answered 503");
                    e.to_string()
                }),
            None => Err("the event outbox is closed".into()),
        };
        // The forwarder's changes not applied: all of them after a failed commit, else those
        // that failed alone.
        let (result, changes, unapplied) = match result {
            Ok(committed) => {
                // Only the committer changes it: a plain read and store.
                let rows = shared.rows.load(Ordering::Relaxed) as i64;
                shared
                    .rows
                    .store((rows + committed.added).max(0) as u64, Ordering::Relaxed);
                let changes = if !committed.unapplied.is_empty() {
                    Err("some of the forwarder's changes could not be committed".to_string())
                } else {
                    Ok(())
                };
                (Ok(()), changes, committed.unapplied)
            }
            Err(e) => (Err(e.clone()), Err(e), std::mem::take(&mut group.changes)),
        };
        let inserted = result.is_ok() && !group.records.is_empty();
        // The forwarder's changes are not lost with a failed commit: they go again with the
        // next group (deleting or dead-lettering a row twice is harmless), after a pause
        // unless webhooks were committed, so a lasting failure does not spin.
        let retry_changes = !unapplied.is_empty() && writer.is_some();
        let pause = retry_changes && !inserted;
        {
            let mut state = lock(&shared.state);
            // Whatever asks from now on has nothing of this group's to wait for.
            state.committing_outcome = None;
            if retry_changes {
                let mut changes = unapplied;
                changes.append(&mut state.open.changes);
                state.open.changes = changes;
            }
            let now = crate::db::now_ms();
            for record in &group.records {
                let key = dedupe_key(&record.body_hash);
                state.in_flight.remove(&key);
                if inserted {
                    state.keys.extend([key], now.max(record.signed_at_ms));
                }
            }
            state.queued_bytes -= group.bytes;
        }
        group.whole.finish(result.clone().and(changes));
        group.outcome.finish(result);
        if inserted {
            shared.committed.notify_one();
        }
        if let Some(writer) = writer.as_mut() {
            writer.maintain(&shared.settings);
        }
        drop(writer);
        if pause {
            std::thread::sleep(CHANGE_RETRY_PAUSE);
        }
    }
}

/// How long a statement waits for the database's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the committer waits for readers to start the log over.
const RESTART_WAIT: Duration = Duration::from_millis(50);

/// How long the committer waits before it tries a failed group's forwarder changes again.
const CHANGE_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// The file whose lock says an outbox is open on a data directory.
pub const LOCK_FILE: &str = "outbox.lock";

/// How long opening waits for another holder of the outbox lock to let go (a process still
/// exiting, an outbox of this process being dropped).
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// The lock that says a process runs on a data directory: [`LOCK_FILE`] in it, locked with
/// `flock`. The service takes it at start, before it reads a key or opens a database there, so
/// a second process on the same directory stops before it changes anything; it is let go when
/// the last clone is dropped, or the process ends however it ends.
#[derive(Debug, Clone)]
pub struct DataDirLock {
    _file: Arc<std::fs::File>,
}

impl DataDirLock {
    /// Takes the lock on `data_dir` (which must exist), waiting up to [`LOCK_WAIT`] for
    /// another holder to let go (a process still exiting, an outbox of this process being
    /// dropped); [`OpenError::InUse`] past that.
    pub fn acquire(data_dir: &Path) -> Result<Self, OpenError> {
        lock_data_dir(data_dir).map(|file| Self {
            _file: Arc::new(file),
        })
    }
}

/// Takes the data directory's lock (released when the file is closed, or the process ends
/// however it ends), waiting up to [`LOCK_WAIT`] for it.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, OpenError> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match try_lock_data_dir(data_dir) {
            Err(OpenError::InUse { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

fn try_lock_data_dir(data_dir: &Path) -> Result<std::fs::File, OpenError> {
    use std::os::fd::AsRawFd;
    let path = data_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| OpenError::Lock {
            path: path.clone(),
            source,
        })?;
    // SAFETY: a plain system call on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let source = std::io::Error::last_os_error();
        return Err(if source.kind() == std::io::ErrorKind::WouldBlock {
            OpenError::InUse { path }
        } else {
            OpenError::Lock { path, source }
        });
    }
    Ok(file)
}

/// Moves every dead letter back into the outbox, to be delivered again (after the cause was
/// fixed: a host that refused them, say); returns how many. Refused while the outbox is open
/// (the service is running on `data_dir`).
pub fn redrive_dead_letters(data_dir: &Path) -> Result<usize, OpenError> {
    let _lock = lock_data_dir(data_dir)?;
    let path = data_dir.join(OUTBOX_FILE);
    let err = |source| OpenError::Database {
        path: path.clone(),
        source,
    };
    if !path.is_file() {
        return Ok(0);
    }
    let mut conn = open_connection(&path).map_err(err)?;
    crate::db::migrate(&mut conn, MIGRATIONS).map_err(err)?;
    let tx = conn.transaction().map_err(err)?;
    let moved = tx
        .execute(
            "INSERT INTO outbox
                 (destination, received_ms, event_type, memo, body, side_effect_done)
             SELECT destination, received_ms, event_type, memo, body, side_effect_done
             FROM dead_letters ORDER BY id",
            [],
        )
        .map_err(err)?;
    tx.execute("DELETE FROM dead_letters", []).map_err(err)?;
    tx.commit().map_err(err)?;
    Ok(moved)
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    use std::os::unix::fs::PermissionsExt;
    let conn = Connection::open(path)?;
    // Bodies name accounts and people: keep them to this user.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    Ok(conn)
}

/// SQLite's `synchronous` for `OUTBOX_SYNC`: `FULL` fsyncs the log at every commit.
fn synchronous(settings: &OutboxSettings) -> &'static str {
    match settings.sync {
        crate::config::OutboxSync::Full => "FULL",
        crate::config::OutboxSync::Normal => "NORMAL",
    }
}

/// Applies what the journal of an earlier version holds beyond the database (a crash came
/// between the two), then removes the journal.
fn recover_journal(
    data_dir: &Path,
    conn: &mut Connection,
    settings: &OutboxSettings,
) -> Result<(), OpenError> {
    let journal_path = data_dir.join(journal::JOURNAL_FILE);
    if !journal_path.exists() {
        return Ok(());
    }
    let journal_err = |source| OpenError::Journal {
        path: journal_path.clone(),
        source,
    };
    let db_err = |source| OpenError::Database {
        path: data_dir.join(OUTBOX_FILE),
        source,
    };
    let entries = journal::read(data_dir).map_err(journal_err)?;
    let applied = applied_seq(conn).map_err(db_err)?;
    let replay: Vec<(u64, Record)> = entries
        .into_iter()
        .filter(|e| e.seq > applied)
        .map(journal::Entry::into_record)
        .collect();
    if !replay.is_empty() {
        tracing::info!(
            entries = replay.len(),
            "applying journaled webhooks the outbox database had not recorded (an earlier version stopped in between)"
        );
    }
    for chunk in replay.chunks(512) {
        let last = chunk.last().map_or(applied, |(seq, _)| *seq);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let records = chunk.iter().map(|(_, r)| r);
        insert_records(&tx, records, settings.dedupe_window).map_err(db_err)?;
        tx.execute(
            "UPDATE journal_state SET applied_seq = ?1 WHERE id = 1",
            [last as i64],
        )
        .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
    }
    // Durable before the journal goes, whatever `OUTBOX_SYNC` says.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(db_err)?;
    conn.execute(
        "UPDATE journal_state SET synced_ms = ?1 WHERE id = 1",
        [crate::db::now_ms()],
    )
    .map_err(db_err)?;
    std::fs::remove_file(&journal_path).map_err(journal_err)?;
    conn.pragma_update(None, "synchronous", synchronous(settings))
        .map_err(db_err)
}

/// The last journal sequence number the database has applied.
fn applied_seq(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT applied_seq FROM journal_state WHERE id = 1",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|seq| seq as u64)
}

/// A row of keys' anchor in SQL: its own, or (rows from before migration 6) its expiry less
/// the window `?1`, which keeps the expiry it was saved with.
const ANCHOR_SQL: &str = "coalesce(anchor_ms, expires_ms - ?1)";

/// Loads the keys whose window (the one configured now) has not passed.
fn load_keys(conn: &Connection, keys: &mut Keys, window: Duration) -> rusqlite::Result<()> {
    let now = crate::db::now_ms();
    let window = window.as_millis() as i64;
    let mut stmt = conn.prepare(&format!(
        "SELECT {ANCHOR_SQL}, keys FROM dedupe_keys WHERE {ANCHOR_SQL} + ?1 > ?2 ORDER BY id"
    ))?;
    let mut rows = stmt.query([window, now])?;
    while let Some(row) = rows.next()? {
        let anchor: i64 = row.get(0)?;
        let blob = row.get_ref(1)?.as_blob()?;
        let group = blob
            .chunks_exact(8)
            .map(|k| u64::from_le_bytes(k.try_into().expect("8 bytes")));
        keys.extend(group, anchor);
    }
    Ok(())
}

/// Inserts a row per (webhook, destination) and one row of the webhooks' keys, kept a window
/// after the latest of the commit and their requests' timestamps (Zoom's clock may be ahead
/// of ours: the keys must outlive every replay the window accepts).
fn insert_records<'a>(
    conn: &Connection,
    records: impl Iterator<Item = &'a Record>,
    window: Duration,
) -> rusqlite::Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT INTO outbox (destination, received_ms, event_type, memo, body)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut anchor = crate::db::now_ms();
    let mut keys = Vec::new();
    for record in records {
        anchor = anchor.max(record.signed_at_ms);
        keys.extend_from_slice(&record.body_hash[..8]);
        let r = &record.received;
        let memo = memo_json(&r.memo);
        for destination in &record.destinations {
            insert.execute(params![
                destination,
                r.received_ms,
                r.event_type,
                memo,
                r.body
            ])?;
        }
    }
    if !keys.is_empty() {
        conn.prepare_cached(
            "INSERT INTO dedupe_keys (anchor_ms, expires_ms, keys) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![anchor, anchor + window.as_millis() as i64, keys])?;
    }
    Ok(())
}

/// What a group's transaction did.
struct Committed {
    /// Rows it added to `outbox` (fewer than none when more were delivered).
    added: i64,
    /// The forwarder's changes (down to single rows of a delivery) that could not be applied,
    /// each rolled back alone; the others were applied.
    unapplied: Vec<Change>,
}

/// Applies the forwarder's `changes`; how many `outbox` rows they removed.
fn apply_changes(conn: &Connection, changes: &[Change]) -> rusqlite::Result<i64> {
    let now = crate::db::now_ms();
    let mut removed = 0i64;
    let mut delete = conn.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
    let mut delete_range = conn.prepare_cached("DELETE FROM outbox WHERE id >= ?1 AND id <= ?2")?;
    let mut dead = conn.prepare_cached(
        "INSERT OR REPLACE INTO dead_letters
             (id, destination, received_ms, event_type, memo, body, failed_ms, error,
              side_effect_done)
         SELECT id, destination, received_ms, event_type, memo, body, ?2, ?3,
                side_effect_done
         FROM outbox WHERE id = ?1",
    )?;
    let mut mark = conn.prepare_cached("UPDATE outbox SET side_effect_done = 1 WHERE id = ?1")?;
    let mut know = conn.prepare_cached(
        "INSERT OR REPLACE INTO known_connections (connection_id, auth_type)
         VALUES (?1, ?2)",
    )?;
    let mut forget =
        conn.prepare_cached("DELETE FROM known_connections WHERE connection_id = ?1")?;
    for change in changes {
        match change {
            Change::Delivered(ids) => {
                // A batch is mostly consecutive ids: one range delete each run.
                let mut ids = ids.clone();
                ids.sort_unstable();
                let mut i = 0;
                while i < ids.len() {
                    let mut j = i;
                    while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
                        j += 1;
                    }
                    removed += delete_range.execute([ids[i], ids[j]])? as i64;
                    i = j + 1;
                }
            }
            Change::Failed { id, error } => {
                dead.execute(params![id, now, error])?;
                removed += delete.execute([id])? as i64;
            }
            Change::SideEffectDone(id) => {
                mark.execute([id])?;
            }
            Change::Known {
                connection_id,
                auth_type: Some(auth_type),
            } => {
                know.execute([connection_id, auth_type])?;
            }
            Change::Known {
                connection_id,
                auth_type: None,
            } => {
                forget.execute([connection_id])?;
            }
        }
    }
    Ok(removed)
}

/// Applies `changes` under a savepoint of `tx`: `Ok(Ok(removed))` once applied, `Ok(Err(_))`
/// when they failed and were rolled back alone, `Err` when the failure ended the whole
/// transaction (a full disk, I/O: the group's webhooks are gone with it).
fn apply_alone(
    tx: &mut rusqlite::Transaction<'_>,
    changes: &[Change],
) -> rusqlite::Result<rusqlite::Result<i64>> {
    let savepoint = tx.savepoint()?;
    match apply_changes(&savepoint, changes) {
        Ok(removed) => {
            savepoint.commit()?;
            Ok(Ok(removed))
        }
        Err(e) => {
            // Dropped, the savepoint rolls back.
            drop(savepoint);
            if tx.is_autocommit() {
                Err(e)
            } else {
                Ok(Err(e))
            }
        }
    }
}

/// About this much written to the write-ahead log, the committer copies it into the database
/// (a checkpoint), so the next commits start the log over instead of growing it.
const CHECKPOINT_BYTES: u64 = 4 << 20;

/// The writing connection and its upkeep.
struct Writer {
    conn: Connection,
    /// Held while the outbox is open: two committers on one database would each trust their
    /// own count and keys.
    _lock: DataDirLock,
    last_purge: Instant,
    /// Roughly the bytes written to the log since the last checkpoint.
    unchecked: u64,
    /// Roughly the log's length: the bytes written since it last started over (known exactly
    /// at each checkpoint, estimated in between).
    logged: u64,
    /// The bytes one page takes in the log.
    frame_bytes: u64,
    /// When it was last logged that some of the forwarder's changes fail.
    warned_changes: Option<Instant>,
}

impl Writer {
    /// One transaction for a group: its webhooks, and the forwarder's changes under a savepoint
    /// of their own, so changes that fail (a row the database cannot delete, say) are rolled
    /// back alone and the webhooks are still committed: intake never waits on them.
    fn commit(&mut self, group: &Group, window: Duration) -> rusqlite::Result<Committed> {
        let mut tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        insert_records(&tx, group.records.iter(), window)?;
        let added: i64 = group
            .records
            .iter()
            .map(|r| r.destinations.len() as i64)
            .sum();
        let mut committed = Committed {
            added,
            unapplied: Vec::new(),
        };
        if !group.changes.is_empty() {
            match apply_alone(&mut tx, &group.changes)? {
                Ok(removed) => committed.added -= removed,
                // Rolled back alone; then each change alone (a delivery row by row), so only
                // what fails waits for the next group and the list never grows with good ones.
                Err(e) => {
                    let mut last_error = e;
                    for change in &group.changes {
                        let parts = match change {
                            Change::Delivered(ids) if ids.len() > 1 => {
                                ids.iter().map(|id| Change::Delivered(vec![*id])).collect()
                            }
                            other => vec![other.clone()],
                        };
                        for part in parts {
                            match apply_alone(&mut tx, std::slice::from_ref(&part))? {
                                Ok(removed) => committed.added -= removed,
                                Err(e) => {
                                    committed.unapplied.push(part);
                                    last_error = e;
                                }
                            }
                        }
                    }
                    let now = Instant::now();
                    let quiet = self
                        .warned_changes
                        .is_some_and(|at| now.duration_since(at) < Duration::from_secs(60));
                    if !committed.unapplied.is_empty() && !quiet {
                        self.warned_changes = Some(now);
                        tracing::error!(
                            error = %last_error,
                            failed = committed.unapplied.len(),
                            "some of the forwarder's changes to the event outbox fail; webhooks are committed without them, and they are tried again with each group (logged at most once a minute)"
                        );
                    }
                }
            }
        }
        tx.commit()?;
        // Bodies, their rows' other columns and index entries, and the pages deletes touch.
        let written = (group.bytes + 256 * group.records.len() + 4096 * group.changes.len()) as u64;
        self.unchecked += written;
        self.logged += written;
        Ok(committed)
    }

    /// Between groups: keep the WAL bounded and purge expired deduplication keys.
    fn maintain(&mut self, settings: &OutboxSettings) {
        // A log that grows makes every commit's fsync write the file's size too: two disk
        // flushes instead of one. Copied into the database, it is written over from the start.
        if self.unchecked >= CHECKPOINT_BYTES {
            self.unchecked = 0;
            match self
                .conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1))
            {
                Ok(frames) => self.logged = frames.max(0) as u64 * self.frame_bytes,
                Err(e) => tracing::warn!(error = %e, "event outbox checkpoint failed"),
            }
        }
        // The reader's passive checkpoints copy most of the log, but under continuous writes it
        // is never found fully copied and unused at once, so SQLite never starts it over:
        // without this it grows without bound (a soak run showed 1 GiB a minute). RESTART, not
        // TRUNCATE: the next commits write over the file from its start, where cutting it to
        // nothing and syncing that held the next group's webhooks for ~30 ms each time.
        if self.logged > settings.wal_limit {
            // RESTART waits for readers (a metrics scrape, the forwarder): the next group's
            // webhooks wait behind it, so it waits briefly and tries again after a later group
            // rather than for the full busy timeout.
            let _ = self.conn.busy_timeout(RESTART_WAIT);
            let restarted = self
                .conn
                .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0));
            let _ = self.conn.busy_timeout(BUSY_TIMEOUT);
            match restarted {
                Ok(0) => self.logged = 0,
                Ok(_) => tracing::debug!("event outbox log still in use; starting it over later"),
                Err(e) => tracing::warn!(error = %e, "event outbox checkpoint failed"),
            }
        }
        if self.last_purge.elapsed() >= settings.purge_interval {
            self.last_purge = Instant::now();
            if let Err(e) = purge(&self.conn, settings.dedupe_window) {
                tracing::warn!(error = %e, "purging expired deduplication keys failed");
            }
        }
    }
}

fn memo_json(memo: &HashMap<String, String>) -> String {
    serde_json::to_string(memo).unwrap_or_else(|_| "{}".into())
}

/// Deletes the rows of keys whose window has passed: the oldest rows, up to the first that
/// has not expired (ids grow with time, and so do anchors, but for a request timestamped
/// ahead of our clock: that row only holds the purge back until it expires), so only what
/// goes is read.
fn purge(conn: &Connection, window: Duration) -> rusqlite::Result<usize> {
    let now = crate::db::now_ms();
    let first_live: Option<i64> = conn
        .query_row(
            &format!("SELECT id FROM dedupe_keys WHERE {ANCHOR_SQL} + ?1 > ?2 ORDER BY id LIMIT 1"),
            [window.as_millis() as i64, now],
            |r| r.get(0),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    match first_live {
        Some(id) => conn.execute("DELETE FROM dedupe_keys WHERE id < ?1", [id]),
        None => conn.execute("DELETE FROM dedupe_keys", []),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn record(body: &str, destinations: &[&str]) -> Record {
        use sha2::Digest;
        Record {
            body_hash: sha2::Sha256::digest(body.as_bytes()).into(),
            destinations: destinations.iter().map(|d| d.to_string()).collect(),
            received: Received {
                event_type: "meeting.started".into(),
                memo: HashMap::from([("account_id".into(), "acc".into())]),
                received_ms: 1,
                body: body.as_bytes().to_vec(),
            },
            signed_at_ms: 0,
        }
    }

    #[tokio::test]
    async fn a_reader_holding_an_old_snapshot_does_not_hold_up_webhooks_past_the_log_limit() {
        let dir = tempfile::tempdir().unwrap();
        let settings = OutboxSettings {
            wal_limit: 1,
            ..OutboxSettings::default()
        };
        let outbox = Outbox::open(dir.path(), settings).unwrap();
        outbox.record(record("{\"a\":0}", &["c"])).await.unwrap();
        let reader = Connection::open(dir.path().join(OUTBOX_FILE)).unwrap();
        reader
            .execute_batch("BEGIN; SELECT count(*) FROM outbox;")
            .unwrap();
        for n in 1..4 {
            let started = std::time::Instant::now();
            let body = format!("{{\"a\":{n}}}");
            assert_eq!(
                outbox.record(record(&body, &["c"])).await,
                Ok(Recorded::New)
            );
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{:?}",
                started.elapsed()
            );
        }
        reader.execute_batch("COMMIT").unwrap();
    }

    #[tokio::test]
    async fn the_write_ahead_log_stays_bounded_under_continuous_writes() {
        let dir = tempfile::tempdir().unwrap();
        let settings = OutboxSettings {
            wal_limit: 256 << 10,
            ..OutboxSettings::default()
        };
        let outbox = Outbox::open(dir.path(), settings).unwrap();
        // Writers and a reader at once, as webhooks and the forwarder are: the reader's
        // passive checkpoints alone never leave the log fully copied and unused.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = tokio::spawn({
            let (outbox, stop) = (outbox.clone(), stop.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    outbox.checkpoint().await;
                    let _ = outbox.depth().await;
                }
            }
        });
        let mut writers = Vec::new();
        for w in 0..4 {
            let outbox = outbox.clone();
            writers.push(tokio::spawn(async move {
                let padding = "x".repeat(4096);
                for n in 0..400 {
                    let body = format!("{{\"w\":{w},\"n\":{n},\"pad\":\"{padding}\"}}");
                    outbox.record(record(&body, &["con_a"])).await.unwrap();
                }
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        reader.await.unwrap();
        let wal = std::fs::metadata(dir.path().join("outbox.db-wal"))
            .unwrap()
            .len();
        assert!(wal < 2 << 20, "6 MiB written, the log is {wal} bytes");
    }

    #[tokio::test]
    async fn a_body_for_many_connections_counts_once_against_the_queue_limit() {
        let dir = tempfile::tempdir().unwrap();
        let settings = OutboxSettings {
            queue_bytes: 1 << 20,
            ..OutboxSettings::default()
        };
        let outbox = Outbox::open(dir.path(), settings).unwrap();
        let body = format!("{{\"event\":\"x\",\"pad\":\"{}\"}}", "x".repeat(600 << 10));
        let recorded = outbox
            .record(record(&body, &["con_a", "con_b", "con_c"]))
            .await;
        assert_eq!(recorded, Ok(Recorded::New));
        assert_eq!(outbox.counts().await.unwrap(), (3, 0));
    }

    #[tokio::test]
    async fn records_survive_reopening_and_duplicates_are_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
            assert_eq!(
                outbox.record(record("{\"a\":1}", &["c1", "c2"])).await,
                Ok(Recorded::New)
            );
            assert_eq!(
                outbox.record(record("{\"a\":1}", &["c1", "c2"])).await,
                Ok(Recorded::Duplicate)
            );
            assert_eq!(
                outbox.record(record("{\"a\":2}", &["c1"])).await,
                Ok(Recorded::New)
            );
        }
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        let pending = outbox.pending(0, 100, usize::MAX).await.unwrap();
        let rows: Vec<(&str, &[u8])> = pending
            .iter()
            .map(|p| (p.destination.as_str(), p.received.body.as_slice()))
            .collect();
        assert_eq!(
            rows,
            [
                ("c1", &b"{\"a\":1}"[..]),
                ("c2", b"{\"a\":1}"),
                ("c1", b"{\"a\":2}")
            ]
        );
        assert_eq!(pending[0].received.memo["account_id"], "acc");
        assert_eq!(
            outbox.record(record("{\"a\":1}", &["c1"])).await,
            Ok(Recorded::Duplicate),
            "deduplication survives a restart"
        );

        outbox.delivered(vec![pending[0].id, pending[1].id]).await;
        outbox.failed(pending[2].id, "refused".into()).await;
        outbox.flush().await;
        assert_eq!(outbox.counts().await.unwrap(), (0, 1));
    }

    #[tokio::test]
    async fn known_connections_are_kept_in_order_of_their_changes_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
            assert!(outbox.known_connections().unwrap().is_empty());
            outbox.know_connection("con_b", Some("oauthDefault"));
            outbox.know_connection("con_a", Some("oauthPrivate"));
            outbox.know_connection("con_c", Some("serverToServer"));
            // Changed, then gone: the last change of each stays.
            outbox.know_connection("con_b", Some("serverToServer"));
            outbox.know_connection("con_c", None);
            outbox.know_connection("con_never", None);
            // Closing commits what was handed over.
            outbox.close().await;
        }
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        let known = outbox.known_connections().unwrap();
        let known: Vec<(&str, &str)> = known
            .iter()
            .map(|(cid, auth)| (cid.as_str(), auth.as_str()))
            .collect();
        assert_eq!(
            known,
            [("con_a", "oauthPrivate"), ("con_b", "serverToServer")]
        );
    }

    #[tokio::test]
    async fn the_depth_counted_in_memory_follows_records_deliveries_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let depth = async |outbox: &Outbox| {
            let (rows, _) = outbox.counts().await.unwrap();
            let (depth, oldest) = outbox.depth().await.unwrap();
            assert_eq!(depth, rows, "the count in memory is the table's");
            (depth, oldest.is_some())
        };
        {
            let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
            assert_eq!(depth(&outbox).await, (0, false));
            outbox
                .record(record("{\"a\":1}", &["c1", "c2", "c3"]))
                .await
                .unwrap();
            outbox.record(record("{\"a\":1}", &["c1"])).await.unwrap();
            outbox.record(record("{\"a\":2}", &["c1"])).await.unwrap();
            assert_eq!(depth(&outbox).await, (4, true));
            let pending = outbox.pending(0, 100, usize::MAX).await.unwrap();
            // Delivered twice (a retry after a lost answer) and a row that is gone already.
            let ids = vec![pending[0].id, pending[1].id, pending[0].id, 999];
            outbox.delivered(ids).await;
            outbox.failed(pending[2].id, "refused".into()).await;
            outbox.flush().await;
            assert_eq!(depth(&outbox).await, (1, true));
        }
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        assert_eq!(depth(&outbox).await, (1, true));
        let pending = outbox.pending(0, 100, usize::MAX).await.unwrap();
        outbox.delivered(vec![pending[0].id]).await;
        outbox.flush().await;
        assert_eq!(depth(&outbox).await, (0, false));
    }

    #[tokio::test]
    async fn an_expired_key_no_longer_deduplicates() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(
            dir.path(),
            OutboxSettings {
                dedupe_window: Duration::ZERO,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(outbox.record(record("{}", &["c"])).await, Ok(Recorded::New));
        assert_eq!(outbox.record(record("{}", &["c"])).await, Ok(Recorded::New));
        outbox.flush().await;
        assert_eq!(outbox.counts().await.unwrap(), (2, 0));
    }

    #[tokio::test]
    async fn keys_saved_under_a_shorter_window_live_the_longer_one_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let short = OutboxSettings {
            dedupe_window: Duration::from_secs(1),
            ..Default::default()
        };
        let outbox = Outbox::open(dir.path(), short).unwrap();
        assert_eq!(
            outbox.record(record("{\"a\":1}", &["c"])).await,
            Ok(Recorded::New)
        );
        drop(outbox);
        // A row from before migration 6 has no anchor, and keeps its saved expiry.
        let conn = Connection::open(dir.path().join(OUTBOX_FILE)).unwrap();
        conn.execute(
            "INSERT INTO dedupe_keys (expires_ms, keys) VALUES (?1, ?2)",
            params![crate::db::now_ms() + 1_000, 7u64.to_le_bytes().to_vec()],
        )
        .unwrap();
        drop(conn);
        // Past the old window (and its generation's slack), with the window raised.
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        let long = OutboxSettings {
            dedupe_window: Duration::from_secs(60),
            purge_interval: Duration::ZERO,
            ..Default::default()
        };
        let outbox = Outbox::open(dir.path(), long.clone()).unwrap();
        assert_eq!(
            outbox.record(record("{\"a\":1}", &["c"])).await,
            Ok(Recorded::Duplicate),
            "kept a window after its anchor, under the window configured now"
        );
        // A commit purges expired rows; this one is not, nor lost on the next start.
        assert_eq!(
            outbox.record(record("{\"b\":1}", &["c"])).await,
            Ok(Recorded::New)
        );
        outbox.flush().await;
        drop(outbox);
        let conn = Connection::open(dir.path().join(OUTBOX_FILE)).unwrap();
        let rows: Vec<Option<i64>> = conn
            .prepare("SELECT anchor_ms FROM dedupe_keys ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        // The purge walks from the oldest row to the first live one: a's row holds it.
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert!(rows[0].is_some() && rows[2].is_some(), "{rows:?}");
        drop(conn);
        let outbox = Outbox::open(dir.path(), long).unwrap();
        assert_eq!(
            outbox.record(record("{\"a\":1}", &["c"])).await,
            Ok(Recorded::Duplicate)
        );
    }

    #[tokio::test]
    async fn a_body_signed_ahead_of_our_clock_is_deduplicated_until_a_window_after_its_timestamp() {
        let dir = tempfile::tempdir().unwrap();
        let settings = OutboxSettings {
            dedupe_window: Duration::from_secs(4),
            ..Default::default()
        };
        let start = tokio::time::Instant::now();
        let signed_at_ms = crate::db::now_ms() + 3_200;
        let ahead = |body: &str| Record {
            signed_at_ms,
            ..record(body, &["c"])
        };
        let outbox = Outbox::open(dir.path(), settings.clone()).unwrap();
        for body in ["{\"a\":1}", "{\"b\":1}"] {
            assert_eq!(outbox.record(ahead(body)).await, Ok(Recorded::New));
        }
        // Anchored at their commit, the keys would be gone 4.25 s after it; a replay is
        // accepted until 4 s after the timestamp, 7.2 s from now (room for a busy machine).
        tokio::time::sleep_until(start + Duration::from_millis(4_800)).await;
        assert_eq!(
            outbox.record(ahead("{\"a\":1}")).await,
            Ok(Recorded::Duplicate)
        );
        drop(outbox);
        let outbox = Outbox::open(dir.path(), settings).unwrap();
        assert_eq!(
            outbox.record(ahead("{\"b\":1}")).await,
            Ok(Recorded::Duplicate),
            "the key came back from the database"
        );
        tokio::time::sleep_until(start + Duration::from_millis(7_900)).await;
        for body in ["{\"a\":1}", "{\"b\":1}"] {
            assert_eq!(outbox.record(ahead(body)).await, Ok(Recorded::New));
        }
    }

    #[tokio::test]
    async fn pending_reads_are_bounded_by_rows_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        for i in 0..10 {
            outbox
                .record(record(&format!("{{\"i\":{i}}}"), &["c"]))
                .await
                .unwrap();
        }
        outbox.flush().await;
        let first = outbox.pending(0, 4, usize::MAX).await.unwrap();
        assert_eq!(first.len(), 4);
        let next = outbox.pending(first[3].id, 100, 1).await.unwrap();
        assert_eq!(next.len(), 1, "stops once the byte budget is reached");
        assert_eq!(next[0].id, first[3].id + 1);
    }

    #[tokio::test]
    async fn a_locked_database_answers_within_the_record_timeout_and_commits_late() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(
            dir.path(),
            OutboxSettings {
                record_timeout: Duration::from_millis(200),
                queue_capacity: 3,
                ..Default::default()
            },
        )
        .unwrap();
        let blocker = Connection::open(dir.path().join(OUTBOX_FILE)).unwrap();
        blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
        // Nothing is answered "recorded" while the database cannot commit.
        let started = Instant::now();
        for n in 0..3 {
            let body = format!("{{\"n\":{n}}}");
            assert_eq!(
                outbox.record(record(&body, &["c"])).await,
                Err(RecordError::TimedOut)
            );
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        // Waiting webhooks are bounded: past the queue, refused at once.
        let started = Instant::now();
        assert_eq!(
            outbox.record(record("{\"n\":3}", &["c"])).await,
            Err(RecordError::Busy)
        );
        // Busy, not TimedOut, already says it was not waited for; the bound is for a busy
        // machine.
        assert!(started.elapsed() < Duration::from_secs(1));
        blocker.execute_batch("COMMIT").unwrap();
        outbox.flush().await;
        // The ones that timed out went through late; Zoom's retries are then duplicates.
        assert_eq!(outbox.counts().await.unwrap(), (3, 0));
        assert_eq!(
            outbox.record(record("{\"n\":0}", &["c"])).await,
            Ok(Recorded::Duplicate)
        );
        assert_eq!(
            outbox.record(record("{\"n\":3}", &["c"])).await,
            Ok(Recorded::New)
        );
    }

    #[tokio::test]
    async fn a_deadline_sooner_than_the_record_timeout_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(
            dir.path(),
            OutboxSettings {
                record_timeout: Duration::from_secs(5),
                ..Default::default()
            },
        )
        .unwrap();
        let blocker = Connection::open(dir.path().join(OUTBOX_FILE)).unwrap();
        blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        assert_eq!(
            outbox.record_until(record("{}", &["c"]), deadline).await,
            Err(RecordError::TimedOut)
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        blocker.execute_batch("COMMIT").unwrap();
    }

    #[test]
    fn a_held_data_dir_lock_keeps_another_out_until_its_last_clone_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let lock = DataDirLock::acquire(dir.path()).unwrap();
        let outbox =
            Outbox::open_locked(dir.path(), lock.clone(), OutboxSettings::default()).unwrap();
        drop(outbox);
        let err = DataDirLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(err, OpenError::InUse { .. }), "{err}");
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
        drop(lock);
        DataDirLock::acquire(dir.path()).unwrap();
    }

    #[tokio::test]
    async fn one_outbox_at_a_time_and_dead_letters_can_be_driven_back() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        assert!(matches!(
            Outbox::open(dir.path(), OutboxSettings::default()),
            Err(OpenError::InUse { .. })
        ));
        for n in 0..3 {
            outbox
                .record(record(&format!("{{\"n\":{n}}}"), &["c"]))
                .await
                .unwrap();
        }
        let rows = outbox.pending(0, 10, 1 << 20).await.unwrap();
        // The first one's side effect (app_deauthorized's) was done before the host refused it.
        outbox.side_effect_done(rows[0].id).await;
        for row in &rows[..2] {
            outbox.failed(row.id, "the host said no".into()).await;
        }
        outbox.flush().await;
        assert_eq!(outbox.counts().await.unwrap(), (1, 2));
        // Not while the outbox is open: the service would not see the rows.
        assert!(matches!(
            redrive_dead_letters(dir.path()),
            Err(OpenError::InUse { .. })
        ));
        outbox.close().await;

        assert_eq!(redrive_dead_letters(dir.path()).unwrap(), 2);
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        assert_eq!(outbox.counts().await.unwrap(), (3, 0));
        let rows: Vec<(Vec<u8>, bool)> = outbox
            .pending(0, 10, 1 << 20)
            .await
            .unwrap()
            .into_iter()
            .map(|row| (row.received.body, row.side_effect_done))
            .collect();
        assert_eq!(
            rows,
            [
                (b"{\"n\":2}".to_vec(), false),
                (b"{\"n\":0}".to_vec(), true),
                (b"{\"n\":1}".to_vec(), false)
            ],
            "the one never refused first, then the redriven ones in their order, each with its \
             side effect's mark (not done again after a reconnect)"
        );
        // Nothing left to move.
        outbox.close().await;
        assert_eq!(redrive_dead_letters(dir.path()).unwrap(), 0);
    }

    #[tokio::test]
    async fn a_failed_commit_answers_an_error_and_forgets_its_keys() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        let other = Connection::open(dir.path().join(OUTBOX_FILE)).unwrap();
        other
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON outbox
                 BEGIN SELECT RAISE(ABORT, 'the disk says no'); END;",
            )
            .unwrap();
        let (first, duplicate) = tokio::join!(
            outbox.record(record("{\"a\":1}", &["c"])),
            outbox.record(record("{\"a\":1}", &["c"]))
        );
        assert!(matches!(first, Err(RecordError::Storage(_))), "{first:?}");
        assert_eq!(
            duplicate, first,
            "a duplicate waiting for it shares the outcome"
        );
        other.execute_batch("DROP TRIGGER refuse").unwrap();
        assert_eq!(
            outbox.record(record("{\"a\":1}", &["c"])).await,
            Ok(Recorded::New),
            "the retry is recorded"
        );
        assert_eq!(outbox.counts().await.unwrap(), (1, 0));
    }

    #[tokio::test]
    async fn the_forwarders_changes_survive_a_failed_commit() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        outbox.record(record("{\"a\":1}", &["c"])).await.unwrap();
        let id = outbox.pending(0, 10, 1 << 20).await.unwrap()[0].id;
        let other = Connection::open(dir.path().join(OUTBOX_FILE)).unwrap();
        other
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE DELETE ON outbox
                 BEGIN SELECT RAISE(ABORT, 'the disk says no'); END;",
            )
            .unwrap();
        outbox.delivered(vec![id]).await;
        outbox.flush().await;
        assert_eq!(outbox.counts().await.unwrap(), (1, 0), "the commit failed");
        other.execute_batch("DROP TRIGGER refuse").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while outbox.counts().await.unwrap() != (0, 0) {
            assert!(
                std::time::Instant::now() < deadline,
                "the delivered row was never removed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn webhooks_are_recorded_while_the_forwarders_changes_keep_failing() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        for n in 1..=4 {
            let body = format!("{{\"a\":{n}}}");
            outbox.record(record(&body, &["c"])).await.unwrap();
        }
        let ids: Vec<i64> = outbox
            .pending(0, 10, 1 << 20)
            .await
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect();
        let stuck = ids[0];
        let other = Connection::open(dir.path().join(OUTBOX_FILE)).unwrap();
        other
            .execute_batch(&format!(
                "CREATE TRIGGER refuse BEFORE DELETE ON outbox WHEN OLD.id = {stuck}
                 BEGIN SELECT RAISE(ABORT, 'this row cannot go'); END;"
            ))
            .unwrap();
        let rows = async || outbox.counts().await.unwrap().0;
        // One delivery of two rows, one of which cannot go: the other goes, and the forwarder
        // hears that its change is not all committed.
        outbox.delivered(vec![stuck, ids[1]]).await;
        assert!(outbox.flushed().await.is_err());
        assert_eq!(rows().await, 3);
        // New webhooks ride with the failing row, and are committed all the same.
        for n in 5..=7 {
            let body = format!("{{\"a\":{n}}}");
            let recorded = outbox.record(record(&body, &["c"])).await;
            assert!(matches!(recorded, Ok(Recorded::New)), "{recorded:?}");
        }
        assert_eq!(rows().await, 6);
        // A later delivery goes; flushing still says something handed over is not committed.
        outbox.delivered(vec![ids[2]]).await;
        assert!(outbox.flushed().await.is_err());
        assert_eq!(rows().await, 5);
        other.execute_batch("DROP TRIGGER refuse").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rows().await != 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "the stuck row was never removed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(outbox.flushed().await.is_ok());
    }

    #[tokio::test]
    async fn concurrent_webhooks_share_commits_and_duplicates_among_them_are_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..200 {
            let outbox = outbox.clone();
            // Each body twice, at about the same time.
            tasks.spawn(async move {
                let body = format!("{{\"n\":{}}}", n / 2);
                outbox.record(record(&body, &["c1", "c2"])).await
            });
        }
        let (mut new, mut duplicates) = (0, 0);
        while let Some(answer) = tasks.join_next().await {
            match answer.unwrap() {
                Ok(Recorded::New) => new += 1,
                Ok(Recorded::Duplicate) => duplicates += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((new, duplicates), (100, 100));
        assert_eq!(outbox.counts().await.unwrap(), (200, 0));
        let groups: i64 = outbox
            .read(|c| c.query_row("SELECT count(*) FROM dedupe_keys", [], |r| r.get(0)))
            .await
            .unwrap();
        assert!(groups < 100, "{groups} commits for 100 webhooks");
    }

    #[tokio::test]
    async fn every_waiter_hears_the_outcome_even_when_the_first_has_gone() {
        let outcome = Arc::new(Outcome::default());
        // The first waiter is the one the committer's single wake reaches; it gives up (as a
        // request that timed out does) after it has been registered.
        let first = {
            let outcome = outcome.clone();
            tokio::spawn(async move { outcome.wait().await })
        };
        tokio::task::yield_now().await;
        let mut others = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let outcome = outcome.clone();
            others.spawn(async move { outcome.wait().await });
        }
        tokio::task::yield_now().await;
        first.abort();
        let _ = first.await;
        outcome.finish(Err("the disk says no".into()));
        let all = tokio::time::timeout(Duration::from_secs(5), others.join_all())
            .await
            .expect("every waiter is woken");
        assert_eq!(all, vec![Err("the disk says no".to_string()); 20]);
        // A waiter that comes after the outcome does not wait.
        assert_eq!(outcome.wait().await, Err("the disk says no".into()));
    }

    /// Writes the journal an earlier version left when it died before its database commit.
    fn journal_entries(dir: &Path, entries: &[(u64, &str)]) {
        let mut frames = Vec::new();
        for (seq, body) in entries {
            journal::encode(*seq, &record(body, &["c1", "c2"]), &mut frames);
        }
        std::fs::write(dir.join(journal::JOURNAL_FILE), frames).unwrap();
    }

    fn bodies(pending: &[Pending]) -> Vec<(&str, &str)> {
        pending
            .iter()
            .map(|p| {
                (
                    p.destination.as_str(),
                    std::str::from_utf8(&p.received.body).unwrap(),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn a_journal_left_by_an_earlier_version_is_applied_once_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        journal_entries(dir.path(), &[(1, "{\"a\":1}"), (2, "{\"a\":2}")]);
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        let pending = outbox.pending(0, 100, usize::MAX).await.unwrap();
        assert_eq!(
            bodies(&pending),
            [
                ("c1", "{\"a\":1}"),
                ("c2", "{\"a\":1}"),
                ("c1", "{\"a\":2}"),
                ("c2", "{\"a\":2}")
            ]
        );
        assert_eq!(pending[0].received.memo["account_id"], "acc");
        let journal = dir.path().join(journal::JOURNAL_FILE);
        assert!(!journal.exists(), "removed");
        assert_eq!(
            outbox.record(record("{\"a\":2}", &["c1"])).await,
            Ok(Recorded::Duplicate),
            "replayed webhooks deduplicate"
        );
        outbox.close().await;

        // A journal whose entries the database already holds (a crash after applying, before
        // removing it) adds only what is new.
        journal_entries(dir.path(), &[(2, "{\"a\":2}"), (3, "{\"a\":3}")]);
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        let pending = outbox.pending(0, 100, usize::MAX).await.unwrap();
        assert_eq!(pending.len(), 6);
        assert_eq!(
            bodies(&pending[4..]),
            [("c1", "{\"a\":3}"), ("c2", "{\"a\":3}")]
        );
        assert!(!journal.exists(), "removed");
    }

    #[tokio::test]
    async fn past_the_key_capacity_webhooks_are_refused_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let settings = OutboxSettings {
            dedupe_capacity: 2,
            ..Default::default()
        };
        let outbox = Outbox::open(dir.path(), settings.clone()).unwrap();
        for n in 0..2 {
            let body = format!("{{\"n\":{n}}}");
            assert_eq!(
                outbox.record(record(&body, &["c"])).await,
                Ok(Recorded::New)
            );
        }
        assert_eq!(
            outbox.record(record("{\"n\":2}", &["c"])).await,
            Err(RecordError::Busy)
        );
        assert_eq!(
            outbox.record(record("{\"n\":1}", &["c"])).await,
            Ok(Recorded::Duplicate),
            "duplicates are still recognized"
        );
        outbox.close().await;
        // The keys come back after a restart, and count.
        let outbox = Outbox::open(dir.path(), settings).unwrap();
        assert_eq!(
            outbox.record(record("{\"n\":2}", &["c"])).await,
            Err(RecordError::Busy)
        );
        assert_eq!(outbox.counts().await.unwrap(), (2, 0));
    }

    #[test]
    fn a_key_anchored_ahead_or_out_of_order_is_kept_a_window_after_its_anchor() {
        let mut keys = Keys::new(Duration::from_secs(160));
        // Generations of 10 s.
        keys.extend([1], 1_000_000);
        keys.extend([2], 1_060_000);
        keys.extend([3], 1_001_000);
        keys.extend([4], 1_030_000);
        let starts: Vec<i64> = keys.generations.iter().map(|(s, _)| *s).collect();
        assert_eq!(starts, [1_000_000, 1_030_000, 1_060_000]);
        assert!(keys.contains(3, 1_169_999));
        assert!(!keys.contains(3, 1_170_000));
        assert!(!keys.contains(1, 1_170_000));
        assert!(keys.contains(4, 1_030_000 + 169_999));
        assert!(keys.contains(2, 1_060_000 + 169_999));
        assert!(!keys.contains(4, 1_030_000 + 170_000));
        assert!(keys.contains(2, 1_060_000 + 169_999));
        assert!(!keys.contains(2, 1_060_000 + 170_000));
        assert_eq!(keys.len, 0);
    }

    #[test]
    fn keys_are_kept_for_the_window_and_expire_a_generation_at_a_time() {
        let mut keys = Keys::new(Duration::from_secs(160));
        // Generations of 10 s.
        keys.extend([1, 2], 1_000_000);
        keys.extend([3], 1_005_000);
        keys.extend([4], 1_010_000);
        assert_eq!((keys.generations.len(), keys.len), (2, 4));
        assert!(keys.contains(1, 1_000_000 + 160_000 - 1));
        assert!(keys.contains(3, 1_000_000 + 169_999));
        assert!(!keys.contains(9, 1_000_000));
        // The first generation (keys 1 to 3) ends 10 s after it started, plus the window.
        assert!(!keys.contains(3, 1_000_000 + 170_000));
        assert!(!keys.contains(1, 1_000_000 + 170_000));
        assert_eq!(keys.len, 1);
        assert!(keys.contains(4, 1_000_000 + 170_000));
    }
}
