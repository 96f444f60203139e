//! The durable record of accepted webhooks: `DATA_DIR/outbox.journal` makes them durable,
//! `DATA_DIR/outbox.db` (a SQLite database of its own, so it works the same with the embedded
//! and with a remote host engine) keeps them until they are delivered.
//!
//! A writer thread owns the journal. Requests reach it through a bounded channel; it takes
//! everything waiting (up to [`OutboxSettings::max_group`]), sorts out duplicates (a body whose
//! SHA-256 was recorded within the replay window is answered "duplicate" and not recorded
//! again), appends the rest to the journal in one write and one fsync (group commit), and
//! answers. It then hands the group to an indexer thread, the only writer of the database,
//! which applies it in a transaction that does not wait for the disk: the journal already holds
//! it, and on the next start every journal entry the database had not applied is applied again
//! (see [`crate::webhook::journal`]). Once the journal passes [`OutboxSettings::journal_limit`],
//! the database is synced and the journal emptied.
//!
//! Rows leave the outbox when the forwarder has delivered them, or move to `dead_letters`
//! when the host engine refused them for good.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior, params};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::webhook::journal::{self, Journal};
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
    // 2: how far the journal is applied, and when the database was last synced.
    "CREATE TABLE journal_state (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        applied_seq INTEGER NOT NULL,
        synced_ms   INTEGER NOT NULL
    );
    INSERT INTO journal_state VALUES (1, 0, 0);",
];

/// Knobs of the outbox; the defaults suit production and tests alike.
#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// `OUTBOX_SYNC`: fsync the journal for every group (`Full`) or only survive process
    /// crashes (`Normal`).
    pub sync: crate::config::OutboxSync,
    /// Past this size the journal is emptied (after the database is synced).
    pub journal_limit: u64,
    /// Past this size the write-ahead log is checkpointed and truncated by the writer.
    pub wal_limit: u64,
    /// How long a body's hash is remembered for deduplication (the replay window).
    pub dedupe_window: Duration,
    /// How long a request waits for its commit before it is answered 503.
    pub record_timeout: Duration,
    /// Requests waiting for the writer at most; more are refused at once (503).
    pub queue_capacity: usize,
    /// Bytes of bodies waiting for the writer at most; more are refused at once (503).
    pub queue_bytes: usize,
    /// The most requests committed in one transaction.
    pub max_group: usize,
    /// How often expired deduplication keys are purged.
    pub purge_interval: Duration,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            sync: crate::config::OutboxSync::Full,
            journal_limit: 32 << 20,
            wal_limit: 64 << 20,
            dedupe_window: Duration::from_secs(90 * 60),
            record_timeout: Duration::from_secs(2),
            queue_capacity: 8192,
            queue_bytes: 64 << 20,
            max_group: 1024,
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
    /// The journal (or starting the outbox's threads) failed.
    #[error("cannot open the event outbox journal {path}: {source}")]
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
    /// Too much is already waiting for the writer.
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
    /// SHA-256 of the raw body.
    pub body_hash: [u8; 32],
    /// Connection ids to deliver to (at least one).
    pub destinations: Vec<String>,
    /// The webhook itself.
    pub received: Received,
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
}

enum Command {
    Record {
        record: Record,
        bytes: usize,
        reply: oneshot::Sender<Result<Recorded, RecordError>>,
    },
    Delivered(Vec<i64>),
    Failed {
        id: i64,
        error: String,
    },
    Flush(oneshot::Sender<()>),
    Close(oneshot::Sender<()>),
}

/// Handle of the outbox: cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Command>,
    queued_bytes: Arc<AtomicUsize>,
    committed: Arc<Notify>,
    reader: Arc<Mutex<Option<Connection>>>,
    settings: Arc<OutboxSettings>,
}

impl Outbox {
    /// Opens (creating if needed) `outbox.db` and `outbox.journal` in `data_dir`, applies what
    /// the journal holds beyond the database, and starts the writer and indexer threads, which
    /// end when the last handle is dropped.
    pub fn open(data_dir: &Path, settings: OutboxSettings) -> Result<Self, OpenError> {
        let path = data_dir.join(OUTBOX_FILE);
        let journal_path = data_dir.join(journal::JOURNAL_FILE);
        let err = |source| OpenError::Database {
            path: path.clone(),
            source,
        };
        let journal_err = |source| OpenError::Journal {
            path: journal_path.clone(),
            source,
        };
        let mut conn = open_connection(&path).map_err(err)?;
        crate::db::migrate(&mut conn, MIGRATIONS).map_err(err)?;
        // Checkpoints run on the reader's connection (see `checkpoint`) and, past the WAL
        // limit, on the indexer between transactions: never on the path requests wait for.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(err)?;
        let sync = settings.sync == crate::config::OutboxSync::Full;
        let (mut journal, entries) = Journal::open(data_dir, sync).map_err(journal_err)?;
        let next_seq =
            recover(&mut conn, &mut journal, entries, &settings).map_err(|e| match e {
                RecoverError::Database(e) => err(e),
                RecoverError::Journal(e) => journal_err(e),
            })?;
        let reader = open_connection(&path).map_err(err)?;
        let lookups = open_connection(&path).map_err(err)?;
        let (tx, rx) = mpsc::channel(settings.queue_capacity.max(1));
        let (to_indexer, indexer_rx) = std::sync::mpsc::sync_channel(INDEX_BACKLOG);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let committed = Arc::new(Notify::new());
        let applied = Arc::new(AtomicU64::new(next_seq - 1));
        let settings = Arc::new(settings);
        let indexer = Indexer {
            conn,
            applied: applied.clone(),
            queued_bytes: queued_bytes.clone(),
            committed: committed.clone(),
            settings: settings.clone(),
            wal: wal_path(&path),
        };
        std::thread::Builder::new()
            .name("outbox-indexer".into())
            .spawn(move || indexer.run(indexer_rx))
            .map_err(journal_err)?;
        let writer = Writer {
            lookups,
            journal,
            next_seq,
            frames: Vec::new(),
            recent: VecDeque::new(),
            recent_set: HashMap::new(),
            applied,
            queued_bytes: queued_bytes.clone(),
            indexer: to_indexer,
            settings: settings.clone(),
        };
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(journal_err)?;
        Ok(Self {
            tx,
            queued_bytes,
            committed,
            reader: Arc::new(Mutex::new(Some(reader))),
            settings,
        })
    }

    /// Records a webhook durably, or says why not within the record timeout.
    pub async fn record(&self, record: Record) -> Result<Recorded, RecordError> {
        let bytes = record.received.body.len() * record.destinations.len();
        let before = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > self.settings.queue_bytes {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(RecordError::Busy);
        }
        let (reply, answer) = oneshot::channel();
        if self
            .tx
            .try_send(Command::Record {
                record,
                bytes,
                reply,
            })
            .is_err()
        {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(RecordError::Busy);
        }
        match tokio::time::timeout(self.settings.record_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RecordError::Storage("the writer stopped".into())),
            Err(_) => Err(RecordError::TimedOut),
        }
    }

    /// Up to `max_rows` undelivered rows after `after_id`, in id order, stopping early once
    /// their bodies add up to `max_bytes`.
    pub async fn pending(
        &self,
        after_id: i64,
        max_rows: usize,
        max_bytes: usize,
    ) -> Result<Vec<Pending>, RecordError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let guard = reader.lock().unwrap_or_else(|e| e.into_inner());
            let conn = guard.as_ref().ok_or(rusqlite::Error::InvalidQuery)?;
            let mut stmt = conn.prepare_cached(
                "SELECT id, destination, received_ms, event_type, memo, body FROM outbox
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
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
                });
                if bytes >= max_bytes {
                    break;
                }
            }
            Ok::<_, rusqlite::Error>(out)
        })
        .await
        .map_err(|e| RecordError::Storage(e.to_string()))?
        .map_err(|e| RecordError::Storage(e.to_string()))
    }

    /// Copies committed WAL pages into the database without blocking the writer (a PASSIVE
    /// checkpoint), so the WAL stops growing. The forwarder calls it between batches.
    pub async fn checkpoint(&self) {
        let reader = self.reader.clone();
        let result = tokio::task::spawn_blocking(move || {
            let guard = reader.lock().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref() {
                Some(conn) => conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())),
                None => Ok(()),
            }
        })
        .await;
        if let Ok(Err(e)) = result {
            tracing::warn!(error = %e, "event outbox checkpoint failed");
        }
    }

    /// Removes delivered rows (in the writer's next group; a crash before that means the
    /// rows are delivered again: at least once).
    pub async fn delivered(&self, ids: Vec<i64>) {
        if !ids.is_empty() {
            let _ = self.tx.send(Command::Delivered(ids)).await;
        }
    }

    /// Moves a row the host engine refused for good to `dead_letters`, with the reason.
    pub async fn failed(&self, id: i64, error: String) {
        let _ = self.tx.send(Command::Failed { id, error }).await;
    }

    /// Waits until everything sent to the writer before this call is committed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Commits what was sent before, then closes the database, so its files are complete and
    /// settled when this returns. Recording fails (503) from then on.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let reader = self.reader.clone();
        let _ = tokio::task::spawn_blocking(move || {
            reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        })
        .await;
    }

    /// Completes after the writer commits new rows (or at once if it did since the last wait).
    pub async fn committed(&self) {
        self.committed.notified().await;
    }

    /// How many pairs wait for delivery, and when the oldest was received (Unix ms).
    /// Ids grow with time, so the oldest is the lowest id: no scan.
    pub async fn depth(&self) -> Result<(u64, Option<i64>), RecordError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let guard = reader.lock().unwrap_or_else(|e| e.into_inner());
            let conn = guard.as_ref().ok_or(rusqlite::Error::InvalidQuery)?;
            conn.query_row(
                "SELECT (SELECT count(*) FROM outbox),
                        (SELECT received_ms FROM outbox ORDER BY id LIMIT 1)",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Option<i64>>(1)?)),
            )
        })
        .await
        .map_err(|e| RecordError::Storage(e.to_string()))?
        .map_err(|e| RecordError::Storage(e.to_string()))
    }

    /// Counts of undelivered rows and dead letters.
    pub async fn counts(&self) -> Result<(u64, u64), RecordError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let guard = reader.lock().unwrap_or_else(|e| e.into_inner());
            let conn = guard.as_ref().ok_or(rusqlite::Error::InvalidQuery)?;
            conn.query_row(
                "SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM dead_letters)",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
        })
        .await
        .map_err(|e| RecordError::Storage(e.to_string()))?
        .map_err(|e| RecordError::Storage(e.to_string()))
    }
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    use std::os::unix::fs::PermissionsExt;
    let conn = Connection::open(path)?;
    // Bodies name accounts and people: keep them to this user.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL (in WAL mode): commits do not wait for the disk. What was answered 200 is
    // durable in the journal; the database is synced before the journal is emptied.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// The write-ahead log of the database at `path`.
fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    wal.into()
}

/// Groups handed from the writer to the indexer at most; then the writer waits (and
/// requests time out with 503) until the database catches up.
const INDEX_BACKLOG: usize = 64;

/// A change the indexer applies to the database.
enum Change {
    /// A journaled webhook (its journal sequence number and queued bytes): its deduplication
    /// key and rows.
    Insert(u64, usize, Record),
    /// Delivered rows to remove.
    Delivered(Vec<i64>),
    /// A row the host refused for good.
    Failed { id: i64, error: String },
}

/// What the writer hands the indexer, in order.
enum IndexCommand {
    /// Apply these changes in one transaction.
    Apply(Vec<Change>),
    /// Answer once everything before is applied.
    Flush(oneshot::Sender<()>),
    /// Apply everything before, then make the database durable; answer whether it is.
    Sync(std::sync::mpsc::SyncSender<bool>),
    /// Apply everything before, close the database, then answer.
    Close(std::sync::mpsc::SyncSender<()>),
}

enum RecoverError {
    Database(rusqlite::Error),
    Journal(std::io::Error),
}

/// Applies the journal entries the database has not seen (a crash came between the two),
/// then syncs the database and empties the journal. Returns the next sequence number.
fn recover(
    conn: &mut Connection,
    journal: &mut Journal,
    entries: Vec<journal::Entry>,
    settings: &OutboxSettings,
) -> Result<u64, RecoverError> {
    let applied = applied_seq(conn).map_err(RecoverError::Database)?;
    let last = entries.last().map_or(0, |e| e.seq);
    let replay: Vec<Change> = entries
        .into_iter()
        .filter(|e| e.seq > applied)
        .map(|e| {
            let (seq, record) = e.into_record();
            Change::Insert(seq, 0, record)
        })
        .collect();
    if !replay.is_empty() {
        tracing::info!(
            entries = replay.len(),
            "applying journaled webhooks the outbox database had not recorded (the service stopped in between)"
        );
    }
    for chunk in replay.chunks(512) {
        apply(conn, chunk, settings.dedupe_window).map_err(RecoverError::Database)?;
    }
    if !journal.is_empty() {
        sync_database(conn).map_err(RecoverError::Database)?;
        journal.reset().map_err(RecoverError::Journal)?;
    }
    Ok(applied.max(last) + 1)
}

/// The writer thread: decides duplicates, journals and answers. Nothing on its path waits
/// for the database's writes; those are the indexer's.
struct Writer {
    /// A read-only connection for deduplication lookups.
    lookups: Connection,
    journal: Journal,
    /// The sequence number of the next journal entry.
    next_seq: u64,
    /// The frames of one group, reused.
    frames: Vec<u8>,
    /// Journaled webhooks the indexer has not yet committed, oldest first: until it has,
    /// their hashes deduplicate here.
    recent: VecDeque<(u64, [u8; 32])>,
    /// The same hashes, with when they stop deduplicating (Unix ms).
    recent_set: HashMap<[u8; 32], i64>,
    /// The last sequence number the indexer committed.
    applied: Arc<AtomicU64>,
    /// Bytes of bodies accepted and not yet in the database (the indexer releases inserts).
    queued_bytes: Arc<AtomicUsize>,
    indexer: std::sync::mpsc::SyncSender<IndexCommand>,
    settings: Arc<OutboxSettings>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let settings = self.settings.clone();
        let mut group = Vec::with_capacity(settings.max_group);
        while let Some(first) = rx.blocking_recv() {
            group.push(first);
            while group.len() < settings.max_group {
                match rx.try_recv() {
                    Ok(command) => group.push(command),
                    Err(_) => break,
                }
            }
            if let Some(reply) = self.group(group.drain(..)) {
                self.empty_journal();
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                if self.indexer.send(IndexCommand::Close(tx)).is_ok() {
                    let _ = rx.recv();
                }
                drop(self);
                let _ = reply.send(());
                return;
            }
            if self.journal.len() > settings.journal_limit {
                self.empty_journal();
            }
        }
    }

    /// Handles one group of commands: journal and answer the new webhooks, and hand them to
    /// the indexer. Returns the reply of a `Close` in the group.
    fn group(&mut self, group: impl Iterator<Item = Command>) -> Option<oneshot::Sender<()>> {
        let applied = self.applied.load(Ordering::Acquire);
        while let Some(&(seq, hash)) = self.recent.front() {
            if seq > applied {
                break;
            }
            self.recent.pop_front();
            self.recent_set.remove(&hash);
        }
        let now = crate::db::now_ms();
        let expires = now + self.settings.dedupe_window.as_millis() as i64;
        let mut seen = HashSet::new();
        let mut fresh = Vec::new();
        let mut changes = Vec::new();
        let mut flushes = Vec::new();
        let mut close = None;
        self.frames.clear();
        for command in group {
            match command {
                Command::Record {
                    record,
                    bytes,
                    reply,
                } => {
                    let hash = record.body_hash;
                    let recent = self.recent_set.get(&hash).is_some_and(|e| *e > now);
                    let duplicate = if seen.contains(&hash) || recent {
                        Ok(true)
                    } else {
                        is_duplicate(&self.lookups, &hash, now)
                    };
                    let answer = match duplicate {
                        Ok(true) => Ok(Recorded::Duplicate),
                        Ok(false) => {
                            seen.insert(hash);
                            let seq = self.next_seq + fresh.len() as u64;
                            journal::encode(seq, &record, &mut self.frames);
                            fresh.push((seq, bytes, record, reply));
                            continue;
                        }
                        Err(e) => Err(RecordError::Storage(e.to_string())),
                    };
                    self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                    let _ = reply.send(answer);
                }
                Command::Delivered(ids) => changes.push(Change::Delivered(ids)),
                Command::Failed { id, error } => changes.push(Change::Failed { id, error }),
                Command::Flush(reply) => flushes.push(reply),
                Command::Close(reply) => close = Some(reply),
            }
        }
        let journaled = if fresh.is_empty() {
            Ok(())
        } else {
            self.journal.append(&self.frames)
        };
        let mut inserts = Vec::with_capacity(fresh.len() + changes.len());
        match journaled {
            Ok(()) => {
                self.next_seq += fresh.len() as u64;
                for (seq, bytes, record, reply) in fresh {
                    let _ = reply.send(Ok(Recorded::New));
                    self.recent.push_back((seq, record.body_hash));
                    self.recent_set.insert(record.body_hash, expires);
                    inserts.push(Change::Insert(seq, bytes, record));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, journal = %self.journal.path().display(), requests = fresh.len(), "cannot write the event outbox journal");
                for (_, bytes, _, reply) in fresh {
                    self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                    let _ = reply.send(Err(RecordError::Storage(e.to_string())));
                }
            }
        }
        inserts.append(&mut changes);
        // Blocks while the indexer's backlog is full: requests then wait, and time out.
        if !inserts.is_empty() {
            let _ = self.indexer.send(IndexCommand::Apply(inserts));
        }
        for reply in flushes {
            let _ = self.indexer.send(IndexCommand::Flush(reply));
        }
        close
    }

    /// Waits until the indexer has applied and synced everything journaled, then empties
    /// the journal. If the database cannot be synced, the journal stays for the next try
    /// (or the next start).
    fn empty_journal(&mut self) {
        if self.journal.is_empty() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let synced = self.indexer.send(IndexCommand::Sync(tx)).is_ok() && rx.recv() == Ok(true);
        if !synced {
            tracing::warn!("the event outbox database could not be synced; its journal is kept");
            return;
        }
        if let Err(e) = self.journal.reset() {
            tracing::warn!(error = %e, "cannot empty the event outbox journal; trying again later");
        }
    }
}

/// The indexer thread: owns the only writing database connection and applies what the
/// writer journaled (and the forwarder's deliveries), a group per transaction, without
/// waiting for the disk.
struct Indexer {
    conn: Connection,
    applied: Arc<AtomicU64>,
    queued_bytes: Arc<AtomicUsize>,
    committed: Arc<Notify>,
    settings: Arc<OutboxSettings>,
    wal: PathBuf,
}

impl Indexer {
    fn run(mut self, rx: std::sync::mpsc::Receiver<IndexCommand>) {
        let mut last_purge = Instant::now();
        while let Ok(first) = rx.recv() {
            let mut changes = Vec::new();
            let mut after = Vec::new();
            let mut next = Some(first);
            // Everything waiting, in one transaction.
            while let Some(command) = next {
                match command {
                    IndexCommand::Apply(mut more) => changes.append(&mut more),
                    other => after.push(other),
                }
                next = if changes.len() < 4096 {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            self.apply_until_done(&changes);
            for command in after {
                match command {
                    IndexCommand::Flush(reply) => {
                        let _ = reply.send(());
                    }
                    IndexCommand::Sync(reply) => {
                        let synced = sync_database(&self.conn);
                        if let Err(e) = &synced {
                            tracing::warn!(error = %e, "cannot sync the event outbox database");
                        }
                        let _ = reply.send(synced.is_ok());
                    }
                    IndexCommand::Close(reply) => {
                        drop(self);
                        let _ = reply.send(());
                        return;
                    }
                    IndexCommand::Apply(_) => unreachable!("applied above"),
                }
            }
            self.maintain(&mut last_purge);
        }
    }

    /// Applies `changes`, retrying with back-off while the database fails: they are
    /// journaled and answered, so they must not be dropped. Meanwhile the backlog fills and
    /// new webhooks are answered 503.
    fn apply_until_done(&mut self, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            match apply(&mut self.conn, changes, self.settings.dedupe_window) {
                Ok(inserted) => {
                    let mut bytes = 0;
                    let mut last_seq = None;
                    for change in changes {
                        match change {
                            Change::Insert(seq, b, _) => {
                                bytes += b;
                                last_seq = Some(*seq);
                            }
                            Change::Delivered(_) | Change::Failed { .. } => {}
                        }
                    }
                    if let Some(seq) = last_seq {
                        self.applied.store(seq, Ordering::Release);
                    }
                    self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                    if inserted {
                        self.committed.notify_one();
                    }
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, changes = changes.len(), retry_in = ?backoff, "event outbox database commit failed; webhooks wait in the journal");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Between transactions: keep the WAL bounded and purge expired deduplication keys.
    fn maintain(&mut self, last_purge: &mut Instant) {
        // The reader's passive checkpoints copy most of the log, but under continuous writes it
        // is never found fully copied and unused at once, so SQLite never restarts it: without
        // this it grows without bound (a soak run showed 1 GiB a minute).
        if std::fs::metadata(&self.wal).is_ok_and(|m| m.len() > self.settings.wal_limit) {
            let truncated = self
                .conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    r.get::<_, i64>(0)
                });
            match truncated {
                Ok(0) => {}
                Ok(_) => tracing::debug!("event outbox log still in use; truncating later"),
                Err(e) => tracing::warn!(error = %e, "event outbox checkpoint failed"),
            }
        }
        if last_purge.elapsed() >= self.settings.purge_interval {
            *last_purge = Instant::now();
            if let Err(e) = purge(&self.conn) {
                tracing::warn!(error = %e, "purging expired deduplication keys failed");
            }
        }
    }
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

/// Whether a body with this hash was recorded within the window.
fn is_duplicate(conn: &Connection, hash: &[u8; 32], now: i64) -> rusqlite::Result<bool> {
    let mut stmt =
        conn.prepare_cached("SELECT 1 FROM dedupe WHERE hash = ?1 AND expires_ms > ?2")?;
    stmt.exists(params![&hash[..], now])
}

/// Makes every committed transaction durable: a commit at `synchronous = FULL` syncs the
/// write-ahead log, and with it every commit before.
fn sync_database(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "synchronous", "FULL")?;
    let synced = conn.execute(
        "UPDATE journal_state SET synced_ms = ?1 WHERE id = 1",
        [crate::db::now_ms()],
    );
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    synced.map(drop)
}

/// One transaction for a group of changes; whether any outbox row was inserted.
fn apply(conn: &mut Connection, changes: &[Change], window: Duration) -> rusqlite::Result<bool> {
    let now = crate::db::now_ms();
    let expires = now + window.as_millis() as i64;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut inserted = false;
    {
        let mut dedupe = tx.prepare_cached(
            "INSERT INTO dedupe (hash, expires_ms) VALUES (?1, ?2)
             ON CONFLICT (hash) DO UPDATE SET expires_ms = excluded.expires_ms",
        )?;
        let mut insert = tx.prepare_cached(
            "INSERT INTO outbox (destination, received_ms, event_type, memo, body)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
        let mut delete_range =
            tx.prepare_cached("DELETE FROM outbox WHERE id >= ?1 AND id <= ?2")?;
        let mut dead = tx.prepare_cached(
            "INSERT OR REPLACE INTO dead_letters
             SELECT id, destination, received_ms, event_type, memo, body, ?2, ?3
             FROM outbox WHERE id = ?1",
        )?;
        let already = applied_seq(&tx)?;
        let mut applied_seq = None;
        for change in changes {
            match change {
                // Already applied (a replay racing a writer that was still finishing):
                // applying twice would deliver twice.
                Change::Insert(seq, _, _) if *seq <= already => {}
                Change::Insert(seq, _, record) => {
                    dedupe.execute(params![&record.body_hash[..], expires])?;
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
                        inserted = true;
                    }
                    applied_seq = Some(*seq);
                }
                Change::Delivered(ids) => {
                    // A batch is mostly consecutive ids: one range delete each run of them.
                    let mut ids = ids.clone();
                    ids.sort_unstable();
                    let mut i = 0;
                    while i < ids.len() {
                        let mut j = i;
                        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
                            j += 1;
                        }
                        delete_range.execute([ids[i], ids[j]])?;
                        i = j + 1;
                    }
                }
                Change::Failed { id, error } => {
                    dead.execute(params![id, now, error])?;
                    delete.execute([id])?;
                }
            }
        }
        if let Some(seq) = applied_seq {
            tx.execute(
                "UPDATE journal_state SET applied_seq = ?1 WHERE id = 1",
                [seq as i64],
            )?;
        }
    }
    tx.commit()?;
    Ok(inserted)
}

fn memo_json(memo: &HashMap<String, String>) -> String {
    serde_json::to_string(memo).unwrap_or_else(|_| "{}".into())
}

fn purge(conn: &Connection) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM dedupe WHERE hash IN
         (SELECT hash FROM dedupe WHERE expires_ms <= ?1 ORDER BY expires_ms LIMIT 10000)",
        [crate::db::now_ms()],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
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
    async fn a_locked_database_holds_webhooks_in_the_journal_until_its_backlog_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(
            dir.path(),
            OutboxSettings {
                record_timeout: Duration::from_millis(200),
                ..Default::default()
            },
        )
        .unwrap();
        let blocker = Connection::open(dir.path().join(OUTBOX_FILE)).unwrap();
        blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
        // The journal makes webhooks durable without the database, until the backlog the
        // database has to catch up on is full; then they are not claimed.
        // Held at most: what the indexer took into its stuck transaction (what the backlog
        // held when it looked, plus the group it woke for), the backlog, and the group whose
        // hand-off blocks the writer.
        let bound = 2 * INDEX_BACKLOG + 2;
        let mut recorded = 0;
        let timed_out = loop {
            assert!(recorded <= bound, "the backlog is bounded");
            let body = format!("{{\"n\":{recorded}}}");
            let started = Instant::now();
            match outbox.record(record(&body, &["c"])).await {
                Ok(Recorded::New) => recorded += 1,
                Err(RecordError::TimedOut) => {
                    assert!(started.elapsed() < Duration::from_secs(1));
                    break body;
                }
                other => panic!("{other:?}"),
            }
        };
        assert!(recorded >= INDEX_BACKLOG, "{recorded} recorded");
        blocker.execute_batch("COMMIT").unwrap();
        outbox.flush().await;
        // The one not claimed went through late; Zoom's retry is then a duplicate.
        assert_eq!(outbox.counts().await.unwrap(), (recorded as u64 + 1, 0));
        assert_eq!(
            outbox.record(record(&timed_out, &["c"])).await,
            Ok(Recorded::Duplicate)
        );
    }

    /// Writes journal entries as a writer that died before its database commit left them.
    fn journal_entries(dir: &Path, entries: &[(u64, &str)]) {
        let (mut journal, _) = Journal::open(dir, true).unwrap();
        let mut frames = Vec::new();
        for (seq, body) in entries {
            journal::encode(*seq, &record(body, &["c1", "c2"]), &mut frames);
        }
        journal.append(&frames).unwrap();
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
    async fn journaled_webhooks_the_database_missed_are_applied_once_on_opening() {
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
        assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0, "emptied");
        assert_eq!(
            outbox.record(record("{\"a\":2}", &["c1"])).await,
            Ok(Recorded::Duplicate),
            "replayed webhooks deduplicate"
        );
        assert_eq!(
            outbox.record(record("{\"a\":3}", &["c1"])).await,
            Ok(Recorded::New)
        );
        outbox.close().await;
        assert_eq!(
            std::fs::metadata(&journal).unwrap().len(),
            0,
            "a clean stop leaves nothing to apply"
        );

        // A journal whose entries the database already holds (the journal was not emptied
        // before a crash) adds only what is new.
        journal_entries(
            dir.path(),
            &[(2, "{\"a\":2}"), (3, "{\"a\":3}"), (4, "{\"a\":4}")],
        );
        let outbox = Outbox::open(dir.path(), OutboxSettings::default()).unwrap();
        let pending = outbox.pending(0, 100, usize::MAX).await.unwrap();
        assert_eq!(pending.len(), 7);
        assert_eq!(
            bodies(&pending[5..]),
            [("c1", "{\"a\":4}"), ("c2", "{\"a\":4}")]
        );
        // Sequence numbers continue past everything seen.
        assert_eq!(
            outbox.record(record("{\"a\":5}", &["c1"])).await,
            Ok(Recorded::New)
        );
        drop(outbox);
        let (_, entries) = Journal::open(dir.path(), true).unwrap();
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [5]);
    }

    #[tokio::test]
    async fn the_journal_is_emptied_once_past_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let settings = OutboxSettings {
            journal_limit: 64 << 10,
            ..OutboxSettings::default()
        };
        let outbox = Outbox::open(dir.path(), settings).unwrap();
        let padding = "x".repeat(1000);
        let journal = dir.path().join(journal::JOURNAL_FILE);
        let mut largest = 0;
        for n in 0..500 {
            let body = format!("{{\"n\":{n},\"pad\":\"{padding}\"}}");
            outbox.record(record(&body, &["c"])).await.unwrap();
            largest = largest.max(std::fs::metadata(&journal).unwrap().len());
        }
        assert!(largest > 32 << 10, "it was used: {largest} bytes");
        assert!(
            largest < 80 << 10,
            "500 kB written, the journal reached {largest} bytes"
        );
        outbox.flush().await;
        assert_eq!(outbox.counts().await.unwrap(), (500, 0));
    }
}
