//! The embedded host: a SQLite database (WAL mode) under `DATA_DIR` that holds connection
//! variables and the event log, for running with no host engine at all.
//!
//! Secret variables are sealed with AES-256-GCM (see [`crate::crypto`]), bound to their
//! connection and name. The database remembers the fingerprint of the key that sealed them and
//! refuses to start with another one, instead of failing later on every secret.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};
use tokio_util::sync::CancellationToken;

use super::{HostEngine, HostError, Var, check_var, check_var_name};
use crate::config::ConfigError;
use crate::crypto::Keys;
use crate::ids::{ConnectionId, new_typeid};
use crate::proto::autokitteh::events::v1::Event;

/// File name of the database inside `DATA_DIR`.
pub const DB_FILE: &str = "zoom-integration.db";

/// The newest schema version; each step in [`MIGRATIONS`] raises `user_version` by one.
const MIGRATIONS: &[&str] = &[
    // 1: variables, the event log, and facts about the database itself.
    "CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE vars (
        scope_id    TEXT NOT NULL,
        name        TEXT NOT NULL,
        value       BLOB NOT NULL,
        is_secret   INTEGER NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        updated_ms  INTEGER NOT NULL,
        PRIMARY KEY (scope_id, name)
    ) WITHOUT ROWID;
    CREATE INDEX vars_by_name_value ON vars (name, value);
    CREATE TABLE events (
        seq            INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id       TEXT NOT NULL UNIQUE,
        destination_id TEXT NOT NULL,
        event_type     TEXT NOT NULL,
        created_ms     INTEGER NOT NULL,
        event          BLOB NOT NULL
    );
    CREATE INDEX events_by_destination ON events (destination_id, seq);
    CREATE INDEX events_by_type ON events (event_type, seq);",
    // 2: the outbox's key of each delivery, so a delivery repeated after a crash (the event was
    // saved, the outbox had not yet heard) is not logged twice.
    "ALTER TABLE events ADD COLUMN delivery TEXT;
    CREATE UNIQUE INDEX events_by_delivery ON events (delivery) WHERE delivery IS NOT NULL;",
    // 3: listing by destination and type together reads only what it returns, and trimming
    // past the retention finds the old events without reading the others.
    "CREATE INDEX events_by_destination_type ON events (destination_id, event_type, seq);
    CREATE INDEX events_by_created ON events (created_ms);",
];

/// The latest `created_at` a strict reader accepts: the end of year 9999 (Go's CheckValid).
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// How many events one trimming transaction deletes: the lock is let go between batches.
pub const TRIM_BATCH: usize = 5_000;

/// Inserts or replaces one variable.
const UPSERT_VAR: &str =
    "INSERT INTO vars (scope_id, name, value, is_secret, description, updated_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
     ON CONFLICT (scope_id, name) DO UPDATE SET
       value = excluded.value, is_secret = excluded.is_secret,
       description = excluded.description, updated_ms = excluded.updated_ms";

/// Runs [`UPSERT_VAR`] for `var`, sealing it first when it is a secret.
fn upsert_var(
    stmt: &mut rusqlite::CachedStatement<'_>,
    keys: &Keys,
    scope: &ConnectionId,
    var: &Var,
    now: i64,
) -> rusqlite::Result<()> {
    let stored = if var.is_secret {
        keys.seal(var.value.as_bytes(), &seal_context(scope, &var.name))
    } else {
        var.value.as_bytes().to_vec()
    };
    stmt.execute(params![
        scope.as_str(),
        var.name,
        stored,
        var.is_secret,
        var.description,
        now
    ])?;
    Ok(())
}

/// Runs [`upsert_var`] for each of `vars` of one `scope`, inside the caller's transaction.
fn upsert_vars(
    tx: &rusqlite::Transaction<'_>,
    keys: &Keys,
    scope: &ConnectionId,
    vars: &[Var],
    now: i64,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(UPSERT_VAR)?;
    for var in vars {
        upsert_var(&mut stmt, keys, scope, var, now)?;
    }
    Ok(())
}

/// Why the embedded database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A setting is wrong (for example `SECRET_KEY` does not match the database).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database file could not be opened or migrated.
    #[error("cannot open the embedded database {path}: {source}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
}

/// Which events to list, newest first unless `ascending`.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only events for this connection.
    pub destination_id: Option<String>,
    /// Only events of this type.
    pub event_type: Option<String>,
    /// At most this many.
    pub limit: u32,
    /// Oldest first.
    pub ascending: bool,
}

/// The embedded host engine.
#[derive(Clone)]
pub struct EmbeddedHost {
    conn: Arc<Mutex<Connection>>,
    keys: Arc<Keys>,
    path: PathBuf,
    changes: tokio::sync::broadcast::Sender<ConnectionId>,
}

/// An event ready for the log: checked, given its id and creation time, and encoded, so a
/// batch holds bytes rather than trees of values (each value is hundreds of bytes in memory).
pub struct LogEntry {
    event_id: String,
    destination_id: String,
    event_type: String,
    created_ms: i64,
    encoded: Vec<u8>,
    delivery: Option<String>,
}

impl LogEntry {
    /// `event` checked and encoded; `delivery` is the key of a forwarder's delivery, unique to
    /// it, or `None` for an event saved through the API.
    pub fn new(mut event: Event, delivery: Option<String>) -> Result<Self, HostError> {
        if event.destination_id.is_empty() {
            return Err(HostError::InvalidArgument(
                "event.destination_id is required".into(),
            ));
        }
        if event.event_type.is_empty() {
            return Err(HostError::InvalidArgument(
                "event.event_type is required".into(),
            ));
        }
        if !event.event_id.is_empty() {
            return Err(HostError::InvalidArgument(
                "event.event_id must be empty: the host assigns it".into(),
            ));
        }
        event.event_id = new_typeid("evt");
        event.seq = 0;
        let created_ms = match &event.created_at {
            // A Timestamp's nanos are 0..=999,999,999 (what strict readers, Go's CheckValid,
            // insist on when it is read back).
            Some(ts) => ((0..1_000_000_000).contains(&ts.nanos)
                && ts.seconds <= MAX_TIMESTAMP_SECONDS)
                .then(|| ts.seconds.checked_mul(1000))
                .flatten()
                .and_then(|ms| ms.checked_add(i64::from(ts.nanos / 1_000_000)))
                .filter(|ms| *ms >= 0)
                .ok_or_else(|| {
                    HostError::InvalidArgument("event.created_at is out of range".into())
                })?,
            None => {
                let now = crate::db::now_ms();
                event.created_at = Some(prost_types::Timestamp {
                    seconds: now / 1000,
                    nanos: ((now % 1000) * 1_000_000) as i32,
                });
                now
            }
        };
        Ok(Self {
            encoded: crate::values::encode_event(&event),
            event_id: event.event_id,
            destination_id: event.destination_id,
            event_type: event.event_type,
            created_ms,
            delivery,
        })
    }
}

/// The fingerprint of the key that sealed the secrets of the database in `data_dir`, read
/// without changing the database (opened read-only); `None` when there is no database yet, or
/// one that names no key yet.
pub fn stored_key_fingerprint(data_dir: &Path) -> rusqlite::Result<Option<String>> {
    let path = data_dir.join(DB_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let conn = Connection::open_with_flags(
        &path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let has_meta: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'meta')",
        [],
        |r| r.get(0),
    )?;
    if !has_meta {
        return Ok(None);
    }
    conn.query_row(
        "SELECT value FROM meta WHERE key = 'key_fingerprint'",
        [],
        |r| r.get(0),
    )
    .optional()
}

impl EmbeddedHost {
    /// Opens (creating if needed) the database in `data_dir`, migrates it, and checks that
    /// `keys` is the key its secrets were sealed with.
    pub fn open(data_dir: &Path, keys: Arc<Keys>) -> Result<Self, OpenError> {
        let path = data_dir.join(DB_FILE);
        let db_err = |source| OpenError::Database {
            path: path.clone(),
            source,
        };
        // The service checked it at start-up (once: it warns about a directory open to
        // others); a test or benchmark opening the host alone may need it made.
        if !data_dir.is_dir() {
            crate::config::create_private_dir(data_dir)?;
        }
        let mut conn = Connection::open(&path).map_err(db_err)?;
        // The database holds account ids and sealed secrets: keep it to this user.
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        // FULL: an acknowledged write survives power loss, not only a crash of this process.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db_err)?;
        crate::db::migrate(&mut conn, MIGRATIONS).map_err(db_err)?;

        let stored: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'key_fingerprint'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        match stored {
            Some(fp) if fp != keys.fingerprint() => {
                return Err(ConfigError::new(
                    "SECRET_KEY",
                    format!(
                        "is not the key that sealed the secrets in {} (fingerprint {fp}); restore that key",
                        path.display()
                    ),
                )
                .into());
            }
            Some(_) => {}
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('key_fingerprint', ?1)",
                    [keys.fingerprint()],
                )
                .map_err(db_err)?;
            }
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            keys,
            path,
            changes: tokio::sync::broadcast::channel(1024).0,
        })
    }

    /// The connection ids whose variables change from now on, each sent after its change is
    /// committed. A receiver that falls behind gets `Lagged` and should re-read everything.
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<ConnectionId> {
        self.changes.subscribe()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f`, which changes the variables of `scopes` and answers whether it did, like
    /// [`Self::with_db`], and announces the change once `f` has committed it. The announcement
    /// is sent from the blocking thread: a caller that goes away meanwhile (cancelled, timed
    /// out) cannot stop a committed change from being announced.
    async fn change_vars<F>(&self, scopes: Vec<ConnectionId>, f: F) -> Result<bool, HostError>
    where
        F: FnOnce(&mut Connection, &Keys) -> Result<bool, HostError> + Send + 'static,
    {
        let changes = self.changes.clone();
        self.with_db(move |conn, keys| {
            if !f(conn, keys)? {
                return Ok(false);
            }
            let scopes: std::collections::BTreeSet<ConnectionId> = scopes.into_iter().collect();
            for scope in scopes {
                // No receiver is not an error: nobody is interested yet.
                let _ = changes.send(scope);
            }
            Ok(true)
        })
        .await
    }

    /// Runs `f` on the database connection on the blocking thread pool.
    async fn with_db<T, F>(&self, f: F) -> Result<T, HostError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &Keys) -> Result<T, HostError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let keys = Arc::clone(&self.keys);
        tokio::task::spawn_blocking(move || {
            let mut conn = conn
                .lock()
                .map_err(|_| HostError::Internal("embedded database lock poisoned".into()))?;
            f(&mut conn, &keys)
        })
        .await
        .map_err(|e| HostError::Internal(format!("embedded database worker failed: {e}")))?
    }

    /// Sets variables of any number of connections in one transaction: all or none.
    pub async fn set_scoped_vars(&self, vars: Vec<(ConnectionId, Var)>) -> Result<(), HostError> {
        for (_, var) in &vars {
            check_var(var)?;
        }
        let scopes: Vec<ConnectionId> = vars.iter().map(|(scope, _)| scope.clone()).collect();
        self.change_vars(scopes, move |conn, keys| {
            let now = crate::db::now_ms();
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(UPSERT_VAR)?;
                for (scope, var) in &vars {
                    upsert_var(&mut stmt, keys, scope, var, now)?;
                }
            }
            tx.commit()?;
            Ok(true)
        })
        .await?;
        Ok(())
    }

    /// Appends `event` to the event log, giving it an id, a creation time and a sequence
    /// number; returns the id.
    pub async fn save_event(&self, event: Event) -> Result<String, HostError> {
        let mut ids = self.save_events(vec![event]).await?;
        Ok(ids.pop().unwrap_or_default())
    }

    /// Appends `events` to the event log in one transaction, all or none (an invalid event
    /// fails the whole call with `InvalidArgument`); returns their ids in order.
    pub async fn save_events(&self, events: Vec<Event>) -> Result<Vec<String>, HostError> {
        let entries = events
            .into_iter()
            .map(|e| LogEntry::new(e, None))
            .collect::<Result<Vec<_>, _>>()?;
        self.save_entries(entries).await
    }

    /// Like [`Self::save_events`], for deliveries each under a key unique to it (see
    /// [`LogEntry::new`]): an event whose key the log already holds (a delivery repeated after
    /// a crash) is not added again, and its id is the one logged first.
    pub async fn save_deliveries(&self, entries: Vec<LogEntry>) -> Result<Vec<String>, HostError> {
        self.save_entries(entries).await
    }

    async fn save_entries(&self, entries: Vec<LogEntry>) -> Result<Vec<String>, HostError> {
        self.with_db(move |conn, _| {
            let tx = conn.transaction()?;
            let mut ids = Vec::with_capacity(entries.len());
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO events
                       (event_id, destination_id, event_type, created_ms, event, delivery)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (delivery) WHERE delivery IS NOT NULL DO NOTHING",
                )?;
                let mut earlier =
                    tx.prepare_cached("SELECT event_id FROM events WHERE delivery = ?1")?;
                for entry in entries {
                    let added = stmt.execute(params![
                        entry.event_id,
                        entry.destination_id,
                        entry.event_type,
                        entry.created_ms,
                        entry.encoded,
                        entry.delivery
                    ])?;
                    ids.push(match (added, &entry.delivery) {
                        (0, Some(key)) => earlier.query_row([key], |r| r.get(0))?,
                        _ => entry.event_id,
                    });
                }
            }
            tx.commit()?;
            Ok(ids)
        })
        .await
    }

    /// One event by id.
    pub async fn get_event(&self, event_id: &str) -> Result<Option<Event>, HostError> {
        let event_id = event_id.to_string();
        self.with_db(move |conn, _| {
            conn.query_row(
                "SELECT seq, event FROM events WHERE event_id = ?1",
                [event_id],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?)),
            )
            .optional()?
            .map(decode_event)
            .transpose()
        })
        .await
    }

    /// Events matching `filter`, without their data (as AutoKitteh lists them; [`Self::get_event`]
    /// has it): each stored blob is read up to its data, so a page of large webhooks costs
    /// their headers (while it holds the database, the forwarder and token reads wait).
    pub async fn list_events(&self, filter: EventFilter) -> Result<Vec<Event>, HostError> {
        self.with_db(move |conn, _| {
            let mut args: Vec<&dyn rusqlite::ToSql> = Vec::new();
            if let Some(d) = &filter.destination_id {
                args.push(d);
            }
            if let Some(t) = &filter.event_type {
                args.push(t);
            }
            args.push(&filter.limit);
            let mut stmt = conn.prepare_cached(&list_sql(&filter))?;
            let seqs = stmt
                .query_map(args.as_slice(), |row| row.get::<_, i64>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut events = Vec::with_capacity(seqs.len());
            for seq in seqs {
                let header = read_header(conn, seq)?;
                events.push(Event {
                    event_id: header.event_id,
                    destination_id: header.destination_id,
                    event_type: header.event_type,
                    data: Default::default(),
                    memo: header.memo,
                    created_at: header.created_at,
                    seq: seq as u64,
                });
            }
            Ok(events)
        })
        .await
    }

    /// Sets `vars` on `scope` and deletes those named `remove` in one transaction, if
    /// `condition` holds, checked in that same transaction: a delete either came first and is
    /// seen, or comes after and removes these too. Answers whether it wrote.
    async fn replace(
        &self,
        scope: &ConnectionId,
        vars: Vec<Var>,
        remove: &[String],
        condition: Condition,
    ) -> Result<bool, HostError> {
        for var in &vars {
            check_var(var)?;
        }
        for name in remove {
            check_var_name(name)?;
        }
        let scope = scope.clone();
        let remove = super::not_set(remove, &vars);
        self.change_vars(vec![scope.clone()], move |conn, keys| {
            let now = crate::db::now_ms();
            let tx = conn.transaction()?;
            if !matches!(condition, Condition::None) {
                let set_up: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM vars
                     WHERE scope_id = ?1 AND name = ?2 AND length(value) > 0)",
                    params![scope.as_str(), crate::connection::vars::AUTH_TYPE],
                    |r| r.get(0),
                )?;
                if !set_up {
                    return Err(super::not_set_up(&scope));
                }
            }
            if let Condition::SetUpAndHolds { name, current } = &condition {
                let stored = tx
                    .query_row(
                        "SELECT value, is_secret FROM vars WHERE scope_id = ?1 AND name = ?2",
                        params![scope.as_str(), name],
                        |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, bool>(1)?)),
                    )
                    .optional()?;
                let stored = match stored {
                    None => None,
                    Some((sealed, true)) => Some(
                        keys.open(&sealed, &seal_context(&scope, name))
                            .map_err(|_| HostError::Undecryptable {
                                scope: scope.to_string(),
                                name: name.clone(),
                            })?,
                    ),
                    Some((plain, false)) => Some(plain),
                };
                let holds = stored.is_some_and(|v| current.iter().any(|c| c.as_bytes() == v));
                if !holds {
                    return Ok(false);
                }
            }
            {
                let mut delete =
                    tx.prepare_cached("DELETE FROM vars WHERE scope_id = ?1 AND name = ?2")?;
                for name in &remove {
                    delete.execute(params![scope.as_str(), name])?;
                }
            }
            upsert_vars(&tx, keys, &scope, &vars, now)?;
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    /// Deletes up to `batch` events created before `before_ms` (Unix ms); returns how many.
    pub async fn trim_events(&self, before_ms: i64, batch: usize) -> Result<usize, HostError> {
        self.with_db(move |conn, _| {
            Ok(conn.execute(
                "DELETE FROM events WHERE seq IN
                   (SELECT seq FROM events WHERE created_ms < ?1 LIMIT ?2)",
                params![before_ms, batch as i64],
            )?)
        })
        .await
    }

    /// Keeps the event log to `retention`: trims it now and every [`TRIM_INTERVAL`], a
    /// [`TRIM_BATCH`] at a time, until `stop`.
    pub async fn keep_events_for(self, retention: std::time::Duration, stop: CancellationToken) {
        loop {
            let before_ms = crate::db::now_ms() - retention.as_millis() as i64;
            let mut trimmed = 0;
            loop {
                match self.trim_events(before_ms, TRIM_BATCH).await {
                    Ok(n) => {
                        trimmed += n;
                        if n < TRIM_BATCH {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "trimming the event log failed; trying again later");
                        break;
                    }
                }
                // Between batches: webhooks, tokens and callers get the database.
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                    () = stop.cancelled() => return,
                }
            }
            if trimmed > 0 {
                tracing::info!(
                    trimmed,
                    "events past EVENT_RETENTION_DAYS deleted from the event log"
                );
            }
            tokio::select! {
                () = tokio::time::sleep(TRIM_INTERVAL) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

#[async_trait]
impl HostEngine for EmbeddedHost {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn get_vars(
        &self,
        scope: &ConnectionId,
        names: &[String],
    ) -> Result<Vec<Var>, HostError> {
        let scope = scope.clone();
        let names = names.to_vec();
        self.with_db(move |conn, keys| {
            let mut stmt = conn.prepare_cached(
                "SELECT name, value, is_secret, description FROM vars
                 WHERE scope_id = ?1 ORDER BY name",
            )?;
            let rows = stmt.query_map([scope.as_str()], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, Vec<u8>>(1)?,
                    row.get::<_, bool>(2)?,
                    row.get::<_, String>(3)?,
                ))
            })?;
            let mut vars = Vec::new();
            for row in rows {
                let (name, stored, is_secret, description) = row?;
                if !names.is_empty() && !names.contains(&name) {
                    continue;
                }
                let value = if is_secret {
                    keys.open(&stored, &seal_context(&scope, &name))
                        .ok()
                        .and_then(|v| String::from_utf8(v).ok())
                        .ok_or_else(|| HostError::Undecryptable {
                            scope: scope.to_string(),
                            name: name.clone(),
                        })?
                } else {
                    String::from_utf8(stored).map_err(|_| {
                        HostError::Internal(format!("variable {name:?} is not UTF-8"))
                    })?
                };
                vars.push(Var {
                    name,
                    value,
                    is_secret,
                    description,
                });
            }
            Ok(vars)
        })
        .await
    }

    async fn set_vars(&self, scope: &ConnectionId, vars: Vec<Var>) -> Result<(), HostError> {
        self.set_scoped_vars(vars.into_iter().map(|v| (scope.clone(), v)).collect())
            .await
    }

    async fn delete_vars(&self, scope: &ConnectionId, names: &[String]) -> Result<(), HostError> {
        for name in names {
            check_var_name(name)?;
        }
        let scope = scope.clone();
        let names = names.to_vec();
        self.change_vars(vec![scope.clone()], move |conn, _| {
            let tx = conn.transaction()?;
            if names.is_empty() {
                tx.execute("DELETE FROM vars WHERE scope_id = ?1", [scope.as_str()])?;
            } else {
                let mut stmt =
                    tx.prepare_cached("DELETE FROM vars WHERE scope_id = ?1 AND name = ?2")?;
                for name in &names {
                    stmt.execute(params![scope.as_str(), name])?;
                }
                drop(stmt);
            }
            tx.commit()?;
            Ok(true)
        })
        .await?;
        Ok(())
    }

    async fn replace_vars(
        &self,
        scope: &ConnectionId,
        vars: Vec<Var>,
        remove: &[String],
    ) -> Result<(), HostError> {
        self.replace(scope, vars, remove, Condition::None).await?;
        Ok(())
    }

    async fn replace_vars_if_set_up(
        &self,
        scope: &ConnectionId,
        vars: Vec<Var>,
        remove: &[String],
    ) -> Result<(), HostError> {
        self.replace(scope, vars, remove, Condition::SetUp).await?;
        Ok(())
    }

    async fn replace_vars_if_current(
        &self,
        scope: &ConnectionId,
        vars: Vec<Var>,
        remove: &[String],
        name: &str,
        current: &[&str],
    ) -> Result<bool, HostError> {
        check_var_name(name)?;
        let condition = Condition::SetUpAndHolds {
            name: name.to_string(),
            current: current.iter().map(|c| c.to_string()).collect(),
        };
        self.replace(scope, vars, remove, condition).await
    }

    async fn find_connections(
        &self,
        name: &str,
        value: &str,
    ) -> Result<Vec<ConnectionId>, HostError> {
        if name.is_empty() && !value.is_empty() {
            return Err(HostError::InvalidArgument(
                "a value to match needs a variable name".into(),
            ));
        }
        if !name.is_empty() {
            check_var_name(name)?;
        }
        let (name, value) = (name.to_string(), value.to_string());
        // As AutoKitteh's: a value matches non-secret variables only, so the answer is no
        // oracle for guessing a secret.
        self.with_db(move |conn, _keys| {
            // One statement per shape, so a named search uses the (name, value) index.
            let (sql, params): (&str, Vec<&dyn rusqlite::ToSql>) =
                match (name.is_empty(), value.is_empty()) {
                    (true, _) => (
                        "SELECT DISTINCT scope_id FROM vars ORDER BY scope_id",
                        vec![],
                    ),
                    (false, true) => (
                        "SELECT DISTINCT scope_id FROM vars WHERE name = ?1 ORDER BY scope_id",
                        vec![&name],
                    ),
                    (false, false) => (
                        "SELECT DISTINCT scope_id FROM vars
                         WHERE name = ?1 AND value = CAST(?2 AS BLOB) AND is_secret = 0
                         ORDER BY scope_id",
                        vec![&name, &value],
                    ),
                };
            let mut stmt = conn.prepare_cached(sql)?;
            let rows = stmt.query_map(params.as_slice(), |row| row.get::<_, String>(0))?;
            let mut ids: Vec<ConnectionId> = Vec::new();
            for scope in rows {
                if let Ok(id) = ConnectionId::parse(&scope?) {
                    ids.push(id);
                }
            }
            Ok(ids)
        })
        .await
    }

    async fn dispatch(&self, event: Event) -> Result<String, HostError> {
        self.save_event(event).await
    }

    async fn check(&self) -> Result<(), HostError> {
        self.with_db(|conn, _| {
            conn.query_row("SELECT count(*) FROM meta", [], |r| r.get::<_, i64>(0))?;
            Ok(())
        })
        .await
    }
}

/// When [`EmbeddedHost::replace`] writes.
enum Condition {
    /// Always.
    None,
    /// While the connection has an `auth_type`.
    SetUp,
    /// While the connection has an `auth_type` and its variable `name` holds one of `current`.
    SetUpAndHolds { name: String, current: Vec<String> },
}

/// What a sealed variable is bound to: moving it to another connection or name breaks it.
fn seal_context(scope: &ConnectionId, name: &str) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(scope.as_str().len() + 1 + name.len());
    ctx.extend_from_slice(scope.as_str().as_bytes());
    ctx.push(0);
    ctx.extend_from_slice(name.as_bytes());
    ctx
}

/// How often the event log is trimmed to its retention.
pub const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);

/// A stored event as listed: every field of [`Event`] but `data` (field 4), which decoding
/// skips over unread, and `seq`, which is the row's.
#[derive(Clone, PartialEq, Message)]
struct EventHeader {
    #[prost(string, tag = "1")]
    event_id: String,
    #[prost(string, tag = "2")]
    destination_id: String,
    #[prost(string, tag = "3")]
    event_type: String,
    #[prost(map = "string, string", tag = "5")]
    memo: std::collections::HashMap<String, String>,
    #[prost(message, optional, tag = "6")]
    created_at: Option<prost_types::Timestamp>,
}

/// The query [`EmbeddedHost::list_events`] runs for `filter`: only the conditions it has, so
/// SQLite reads the index that matches them (a condition that may be void defeats indexes).
fn list_sql(filter: &EventFilter) -> String {
    let mut conditions = Vec::new();
    if filter.destination_id.is_some() {
        conditions.push("destination_id = ?");
    }
    if filter.event_type.is_some() {
        conditions.push("event_type = ?");
    }
    let filter_sql = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let order = if filter.ascending { "ASC" } else { "DESC" };
    format!("SELECT seq FROM events {filter_sql} ORDER BY seq {order} LIMIT ?")
}

/// The stored event `seq` without its data, read field by field from its blob. Events are
/// stored with their data last ([`crate::values::encode_event`]): once `created_at` has been
/// read, the first `data` entry (field 4) ends the header, and the data is not read at all.
/// Events stored by versions before it have their data before `memo` and `created_at`: each
/// entry is skipped by its length (SQLite still walks the pages in between).
fn read_header(conn: &Connection, seq: i64) -> Result<EventHeader, HostError> {
    use std::io::{BufRead, Read};
    const DATA: u64 = 4;
    const CREATED_AT: u64 = 6;
    let corrupt = |what: &str| HostError::Internal(format!("stored event {seq} {what}"));
    let blob = conn.blob_open(rusqlite::MAIN_DB, "events", "event", seq, true)?;
    let blob_len = blob.len() as u64;
    let mut reader = std::io::BufReader::with_capacity(4096, blob);
    let mut header = Vec::new();
    let mut created_at_read = false;
    let read_varint = |reader: &mut std::io::BufReader<rusqlite::blob::Blob<'_>>| {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let mut byte = [0u8];
            if reader
                .read(&mut byte)
                .map_err(|_| corrupt("cannot be read"))?
                == 0
            {
                return Err(corrupt("is cut short"));
            }
            value |= u64::from(byte[0] & 0x7f) << shift;
            if byte[0] < 0x80 {
                return Ok(value);
            }
        }
        Err(corrupt("has a malformed varint"))
    };
    while !reader
        .fill_buf()
        .map_err(|_| corrupt("cannot be read"))?
        .is_empty()
    {
        let key = read_varint(&mut reader)?;
        let len = match key & 7 {
            0 => {
                prost::encoding::encode_varint(key, &mut header);
                let v = read_varint(&mut reader)?;
                prost::encoding::encode_varint(v, &mut header);
                continue;
            }
            1 => 8,
            2 => read_varint(&mut reader)?,
            5 => 4,
            _ => return Err(corrupt("has an unknown wire type")),
        };
        if len > blob_len {
            return Err(corrupt("has a field longer than itself"));
        }
        if key >> 3 == DATA {
            if created_at_read {
                break;
            }
            let len = i64::try_from(len).map_err(|_| corrupt("has a field too long"))?;
            reader
                .seek_relative(len)
                .map_err(|_| corrupt("is cut short"))?;
            continue;
        }
        created_at_read |= key >> 3 == CREATED_AT;
        prost::encoding::encode_varint(key, &mut header);
        if key & 7 == 2 {
            prost::encoding::encode_varint(len, &mut header);
        }
        let start = header.len();
        let len = usize::try_from(len).map_err(|_| corrupt("has a field too long"))?;
        header.resize(start + len, 0);
        reader
            .read_exact(&mut header[start..])
            .map_err(|_| corrupt("is cut short"))?;
    }
    EventHeader::decode(header.as_slice())
        .map_err(|e| HostError::Internal(format!("stored event cannot be decoded: {e}")))
}

fn decode_event((seq, bytes): (i64, Vec<u8>)) -> Result<Event, HostError> {
    let mut event = Event::decode(bytes.as_slice())
        .map_err(|e| HostError::Internal(format!("stored event cannot be decoded: {e}")))?;
    event.seq = seq as u64;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event of the log (up to 10), oldest first, without their data.
    async fn all_events(host: &EmbeddedHost) -> Vec<Event> {
        host.list_events(EventFilter {
            limit: 10,
            ascending: true,
            ..Default::default()
        })
        .await
        .unwrap()
    }

    fn keys(material: &[u8]) -> Arc<Keys> {
        Arc::new(Keys::from_material(material))
    }

    #[test]
    fn an_event_created_out_of_range_is_invalid_not_an_overflow() {
        let at = |seconds: i64| Event {
            destination_id: "con_x".into(),
            event_type: "x".into(),
            created_at: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            ..Default::default()
        };
        for seconds in [i64::MAX, i64::MIN, -1, MAX_TIMESTAMP_SECONDS + 1] {
            assert!(matches!(
                LogEntry::new(at(seconds), None),
                Err(HostError::InvalidArgument(_))
            ));
        }
        assert_eq!(
            LogEntry::new(at(1_700_000_000), None).unwrap().created_ms,
            1_700_000_000_000
        );
    }

    const KEY: &[u8] = b"test key material, at least 32 bytes";

    fn sample_vars() -> Vec<Var> {
        vec![
            Var::plain("auth_type", "oauthPrivate"),
            Var::plain("private_client_id", "client-id-1"),
            Var::secret("private_client_secret", "Sekr1t-client-secret-XYZ"),
            Var::secret("oauth_refresh_token", "refresh-token-ÄÖÜ-日本"),
        ]
    }

    #[tokio::test]
    async fn vars_round_trip_with_secrets_decrypted() {
        let dir = tempfile::tempdir().unwrap();
        let host = EmbeddedHost::open(dir.path(), keys(KEY)).unwrap();
        let cid = ConnectionId::generate();
        host.set_vars(&cid, sample_vars()).await.unwrap();

        let mut all = host.get_vars(&cid, &[]).await.unwrap();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let mut expected = sample_vars();
        expected.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(all, expected);

        let some = host
            .get_vars(&cid, &["auth_type".into(), "missing".into()])
            .await
            .unwrap();
        assert_eq!(some, vec![Var::plain("auth_type", "oauthPrivate")]);

        host.set_vars(&cid, vec![Var::plain("auth_type", "oauthDefault")])
            .await
            .unwrap();
        host.delete_vars(&cid, &["private_client_id".into()])
            .await
            .unwrap();
        let names: Vec<String> = host
            .get_vars(&cid, &[])
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(
            names,
            ["auth_type", "oauth_refresh_token", "private_client_secret"]
        );
        host.delete_vars(&cid, &[]).await.unwrap();
        assert!(host.get_vars(&cid, &[]).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn secrets_are_not_readable_in_the_raw_database_files() {
        let dir = tempfile::tempdir().unwrap();
        let host = EmbeddedHost::open(dir.path(), keys(KEY)).unwrap();
        let cid = ConnectionId::generate();
        host.set_vars(&cid, sample_vars()).await.unwrap();

        let mut saw_plain_value = false;
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            for needle in [
                "Sekr1t-client-secret-XYZ".as_bytes(),
                "refresh-token-ÄÖÜ-日本".as_bytes(),
            ] {
                assert!(!bytes.windows(needle.len()).any(|w| w == needle));
            }
            saw_plain_value |= bytes.windows(11).any(|w| w == b"client-id-1");
        }
        // Plain variables are stored as they are: proof that the scan reads the stored data.
        assert!(saw_plain_value, "the scan found no variables at all");
    }

    #[tokio::test]
    async fn every_filtered_listing_reads_an_index_in_order_not_the_whole_log() {
        let dir = tempfile::tempdir().unwrap();
        let host = EmbeddedHost::open(dir.path(), keys(KEY)).unwrap();
        let conn = host.conn.lock().unwrap();
        for (destination, event_type) in [(true, false), (false, true), (true, true)] {
            for ascending in [false, true] {
                let filter = EventFilter {
                    destination_id: destination.then(|| "con_x".to_string()),
                    event_type: event_type.then(|| "meeting.started".to_string()),
                    limit: 10,
                    ascending,
                };
                let sql = format!("EXPLAIN QUERY PLAN {}", list_sql(&filter));
                let mut stmt = conn.prepare(&sql).unwrap();
                let count = sql.matches('?').count();
                let args = vec![&"x" as &dyn rusqlite::ToSql; count];
                let plan: Vec<String> = stmt
                    .query_map(args.as_slice(), |r| r.get::<_, String>(3))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                let plan = plan.join("; ");
                assert!(
                    plan.contains("USING INDEX") || plan.contains("USING COVERING INDEX"),
                    "{filter:?}: {plan}"
                );
                assert!(!plan.contains("TEMP B-TREE"), "{filter:?}: {plan}");
            }
        }
    }

    #[tokio::test]
    async fn events_past_the_retention_are_trimmed_a_batch_at_a_time_and_newer_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let host = EmbeddedHost::open(dir.path(), keys(KEY)).unwrap();
        let cid = ConnectionId::generate();
        let day_ms = 86_400_000;
        let now = crate::db::now_ms();
        let at = |ms: i64, t: &str| Event {
            destination_id: cid.to_string(),
            event_type: t.into(),
            created_at: Some(prost_types::Timestamp {
                seconds: ms / 1000,
                nanos: 0,
            }),
            ..Default::default()
        };
        let mut events: Vec<Event> = (0..5).map(|d| at(now - (40 + d) * day_ms, "old")).collect();
        events.push(at(now - day_ms, "new"));
        events.push(at(now + day_ms, "ahead"));
        host.save_events(events).await.unwrap();

        let cutoff = now - 30 * day_ms;
        assert_eq!(host.trim_events(cutoff, 3).await.unwrap(), 3);
        assert_eq!(host.trim_events(cutoff, 3).await.unwrap(), 2);
        assert_eq!(host.trim_events(cutoff, 3).await.unwrap(), 0);
        let left = all_events(&host).await;
        let types: Vec<&str> = left.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["new", "ahead"]);
    }

    #[tokio::test]
    async fn a_listing_leaves_the_data_out_and_get_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let host = EmbeddedHost::open(dir.path(), keys(KEY)).unwrap();
        let cid = ConnectionId::generate();
        let mut event = Event {
            destination_id: cid.to_string(),
            event_type: "meeting.started".into(),
            memo: [("account_id".to_string(), "acc-1".to_string())].into(),
            ..Default::default()
        };
        event
            .data
            .insert("topic".into(), crate::values::string("Grüße 会議"));
        let id = host.save_event(event).await.unwrap();
        let listed = host
            .list_events(EventFilter {
                destination_id: Some(cid.to_string()),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].event_id, id);
        assert_eq!(listed[0].memo["account_id"], "acc-1");
        assert!(listed[0].created_at.is_some());
        assert_eq!(listed[0].seq, 1);
        assert!(listed[0].data.is_empty());
        let got = host.get_event(&id).await.unwrap().unwrap();
        assert_eq!(
            crate::values::to_json(&got.data["topic"]),
            serde_json::json!("Grüße 会議")
        );
    }

    #[tokio::test]
    async fn a_listing_skips_the_data_wherever_it_lies_in_the_stored_event() {
        let dir = tempfile::tempdir().unwrap();
        let host = EmbeddedHost::open(dir.path(), keys(KEY)).unwrap();
        let cid = ConnectionId::generate();
        let event = |n: usize| {
            let mut event = Event {
                event_id: format!("evt_{n}"),
                destination_id: cid.to_string(),
                event_type: "recording.completed".into(),
                memo: [("x-zm-trackingid".to_string(), format!("v={n}"))].into(),
                created_at: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000 + n as i64,
                    nanos: 0,
                }),
                ..Default::default()
            };
            for key in ["event", "payload", "event_ts"] {
                let text = format!("{key} {}", "Ø".repeat(200_000));
                event.data.insert(key.into(), crate::values::string(text));
            }
            event
        };
        // As this version stores it (the data last), and as prost writes it (the data between
        // `event_type` and `memo`).
        host.save_event(Event {
            event_id: String::new(),
            ..event(1)
        })
        .await
        .unwrap();
        {
            let conn = host.conn.lock().unwrap();
            let e = event(2);
            conn.execute(
                "INSERT INTO events (event_id, destination_id, event_type, created_ms, event)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    e.event_id,
                    e.destination_id,
                    e.event_type,
                    1_700_000_002_000i64,
                    e.encode_to_vec()
                ],
            )
            .unwrap();
        }
        let listed = all_events(&host).await;
        assert_eq!(listed.len(), 2);
        for (n, listed) in [1usize, 2].into_iter().zip(&listed) {
            let mut expected = event(n);
            expected.data.clear();
            expected.seq = n as u64;
            if n == 1 {
                // `save_event` gives the event an id of its own.
                expected.event_id = listed.event_id.clone();
            }
            assert_eq!(listed, &expected);
        }
    }

    #[tokio::test]
    async fn data_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cid = ConnectionId::generate();
        {
            let host = EmbeddedHost::open(dir.path(), keys(KEY)).unwrap();
            host.set_vars(&cid, sample_vars()).await.unwrap();
            host.save_event(Event {
                destination_id: cid.to_string(),
                event_type: "meeting.started".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let host = EmbeddedHost::open(dir.path(), keys(KEY)).unwrap();
        assert_eq!(host.get_vars(&cid, &[]).await.unwrap().len(), 4);
        let events = host
            .list_events(EventFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event_type, "meeting.started");
    }

    #[tokio::test]
    async fn a_different_secret_key_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        EmbeddedHost::open(dir.path(), keys(KEY)).unwrap();
        let err = EmbeddedHost::open(dir.path(), keys(b"another key material of 32+ bytes"))
            .err()
            .unwrap();
        match err {
            OpenError::Config(e) => assert_eq!(e.variable, "SECRET_KEY"),
            other => panic!("unexpected {other}"),
        }
    }

    #[tokio::test]
    async fn a_sealed_value_moved_to_another_connection_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let host = EmbeddedHost::open(dir.path(), keys(KEY)).unwrap();
        let (a, b) = (ConnectionId::generate(), ConnectionId::generate());
        host.set_vars(&a, sample_vars()).await.unwrap();
        {
            let conn = host.conn.lock().unwrap();
            conn.execute(
                "INSERT INTO vars SELECT ?1, name, value, is_secret, description, updated_ms
                 FROM vars WHERE scope_id = ?2",
                [b.as_str(), a.as_str()],
            )
            .unwrap();
        }
        assert!(matches!(
            host.get_vars(&b, &[]).await,
            Err(HostError::Undecryptable { .. })
        ));
    }

    #[tokio::test]
    async fn connections_are_found_by_variable_value() {
        let dir = tempfile::tempdir().unwrap();
        let host = EmbeddedHost::open(dir.path(), keys(KEY)).unwrap();
        let (a, b) = (ConnectionId::generate(), ConnectionId::generate());
        host.set_vars(
            &a,
            vec![Var::plain("account_id", "acc-1"), Var::secret("tok", "x")],
        )
        .await
        .unwrap();
        host.set_vars(
            &b,
            vec![Var::plain("account_id", "acc-2"), Var::secret("tok", "x")],
        )
        .await
        .unwrap();
        assert_eq!(
            host.find_connections("account_id", "acc-2").await.unwrap(),
            vec![b.clone()]
        );
        // Secrets match no value: the answer must not confirm a guessed secret.
        assert!(host.find_connections("tok", "x").await.unwrap().is_empty());
        assert_eq!(host.find_connections("tok", "").await.unwrap().len(), 2);
        assert_eq!(host.find_connections("", "").await.unwrap().len(), 2);
        assert!(
            host.find_connections("account_id", "nope")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(matches!(
            host.find_connections("", "acc-1").await,
            Err(HostError::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn invalid_variables_are_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let host = EmbeddedHost::open(dir.path(), keys(KEY)).unwrap();
        let cid = ConnectionId::generate();
        for bad in [
            Var::plain("", "x"),
            Var::plain("has space", "x"),
            Var::plain("1starts_with_digit", "x"),
            Var::plain("big", "x".repeat(MAX_VALUE_FOR_TEST + 1)),
        ] {
            let result = host
                .set_vars(&cid, vec![Var::plain("ok_first", "written?"), bad])
                .await;
            assert!(matches!(result, Err(HostError::InvalidArgument(_))));
        }
        assert!(host.get_vars(&cid, &[]).await.unwrap().is_empty());
    }

    const MAX_VALUE_FOR_TEST: usize = super::super::MAX_VAR_VALUE;

    #[tokio::test]
    async fn events_get_ids_and_list_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let host = EmbeddedHost::open(dir.path(), keys(KEY)).unwrap();
        let cid = ConnectionId::generate();
        let mut ids = Vec::new();
        for t in ["meeting.started", "meeting.ended", "meeting.started"] {
            ids.push(
                host.save_event(Event {
                    destination_id: cid.to_string(),
                    event_type: t.into(),
                    ..Default::default()
                })
                .await
                .unwrap(),
            );
        }
        let got = host.get_event(&ids[1]).await.unwrap().unwrap();
        assert_eq!(got.event_type, "meeting.ended");
        assert_eq!(got.seq, 2);
        assert!(got.created_at.is_some());
        assert!(host.get_event("evt_missing").await.unwrap().is_none());

        let started = host
            .list_events(EventFilter {
                event_type: Some("meeting.started".into()),
                limit: 10,
                ascending: true,
                ..Default::default()
            })
            .await
            .unwrap();
        let seqs: Vec<u64> = started.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 3]);
        let newest = host
            .list_events(EventFilter {
                limit: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(newest[0].event_id, ids[2]);
        let with_id = host
            .save_event(Event {
                event_id: "evt_given".into(),
                destination_id: cid.to_string(),
                event_type: "x".into(),
                ..Default::default()
            })
            .await;
        assert!(matches!(with_id, Err(HostError::InvalidArgument(_))));
    }

    #[tokio::test]
    async fn a_batch_of_events_is_saved_all_or_none_and_variable_changes_are_announced() {
        let dir = tempfile::tempdir().unwrap();
        let host = EmbeddedHost::open(dir.path(), keys(KEY)).unwrap();
        let cid = ConnectionId::generate();
        let event = |t: &str| Event {
            destination_id: cid.to_string(),
            event_type: t.into(),
            ..Default::default()
        };
        let ids = host
            .save_events(vec![event("a"), event("b")])
            .await
            .unwrap();
        assert_eq!(ids.len(), 2);
        assert_ne!(ids[0], ids[1]);
        let refused = host.save_events(vec![event("c"), event("")]).await;
        assert!(matches!(refused, Err(HostError::InvalidArgument(_))));
        let all = all_events(&host).await;
        let types: Vec<&str> = all.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["a", "b"], "nothing of the refused batch was saved");

        let mut changes = host.subscribe_changes();
        host.set_vars(&cid, vec![Var::plain("account_id", "acc")])
            .await
            .unwrap();
        assert_eq!(changes.try_recv().unwrap(), cid);
        host.delete_vars(&cid, &[]).await.unwrap();
        assert_eq!(changes.try_recv().unwrap(), cid);
        assert!(changes.try_recv().is_err(), "one announcement per change");
    }

    #[test]
    fn an_event_whose_creation_time_is_not_a_valid_timestamp_is_refused() {
        let at = |seconds, nanos| {
            LogEntry::new(
                Event {
                    destination_id: "con_x".into(),
                    event_type: "t".into(),
                    created_at: Some(prost_types::Timestamp { seconds, nanos }),
                    ..Default::default()
                },
                None,
            )
        };
        for (seconds, nanos) in [(1, -1), (1, 1_000_000_000), (-1, 0), (i64::MAX, 0)] {
            assert!(
                matches!(at(seconds, nanos), Err(HostError::InvalidArgument(_))),
                "{seconds}s {nanos}ns"
            );
        }
        let entry = at(1_700_000_000, 999_999_999).unwrap();
        assert_eq!(entry.created_ms, 1_700_000_000_999);
    }

    #[tokio::test]
    async fn a_change_whose_caller_went_away_before_it_was_committed_is_still_announced() {
        let dir = tempfile::tempdir().unwrap();
        let host = EmbeddedHost::open(dir.path(), keys(KEY)).unwrap();
        let cid = ConnectionId::generate();
        let mut changes = host.subscribe_changes();
        for change in 0..3 {
            // The database is busy, so the write waits on the blocking pool while its caller
            // gives up (a cancelled gRPC call, a request timeout).
            let (locked, is_locked) = std::sync::mpsc::channel();
            let (release, released) = std::sync::mpsc::channel::<()>();
            let conn = host.conn.clone();
            let busy = std::thread::spawn(move || {
                let _busy = conn.lock().unwrap();
                locked.send(()).unwrap();
                let _ = released.recv();
            });
            is_locked.recv().unwrap();
            let write = async {
                match change {
                    0 => {
                        host.set_vars(&cid, vec![Var::plain("account_id", "a")])
                            .await
                    }
                    1 => {
                        let names = ["account_id".to_string()];
                        host.replace_vars(&cid, vec![Var::plain("user_id", "u")], &names)
                            .await
                    }
                    _ => host.delete_vars(&cid, &[]).await,
                }
            };
            let gave_up = tokio::time::timeout(std::time::Duration::ZERO, write).await;
            assert!(gave_up.is_err(), "the caller went away first");
            release.send(()).unwrap();
            busy.join().unwrap();
            let announced =
                tokio::time::timeout(std::time::Duration::from_secs(5), changes.recv()).await;
            assert_eq!(announced.unwrap().unwrap(), cid, "change {change}");
        }
        assert!(host.get_vars(&cid, &[]).await.unwrap().is_empty());
    }
}
