//! Which connections a webhook is for, and which secrets may sign webhooks at all.
//!
//! An in-memory index built from the host engine's connection variables: for every distinct
//! secret token (the default app's `ZOOM_SECRET_TOKEN` and each private app's
//! `private_secret_token`), the connections that use it, by Zoom account id. A webhook goes to
//! the connections whose account id equals `payload.account_id` *and* whose secret verified it.
//!
//! Requests read an immutable snapshot (`Arc`), so they never wait for a reload. The index is
//! loaded at start, reloaded periodically, and updated for one connection by
//! [`RoutingIndex::reload_connection`] whenever a connection is saved.
//!
//! A remote AutoKitteh host lists only its active connections (org-level ones, and those of
//! projects with an active deployment), so the listing is not the set of connections: the
//! index also keeps every connection it has read as set up, reads those again at each full
//! reload whether listed or not, and lets one go only when a read of it shows it deleted.
//! With a remote host that set is kept in the outbox's database, so a restart still knows the
//! connections set up here, and [`ListingKnown`] adds it to the listing the token keep-alive
//! task reads.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::connection::{AuthType, vars};
use crate::host::{HostEngine, HostError};
use crate::ids::ConnectionId;
use crate::secret::Secret;
use crate::webhook::outbox::Outbox;
use crate::webhook::verify::Verifier;

/// How one connection is routed.
#[derive(Clone, PartialEq, Eq)]
struct Route {
    /// `account_id` (or, for private apps, `private_account_id` when `account_id` is not set yet).
    account_id: String,
    /// The secret token that signs this connection's webhooks.
    secret: Secret,
}

/// One distinct secret token and the connections that use it.
struct SecretRoutes {
    verifier: Verifier,
    /// Mixed into the deduplication hash of the webhooks this secret verifies; `None` for the
    /// default app's secret (its hash is the body's alone, as before private apps had one).
    scope_tag: Option<[u8; 32]>,
    by_account: HashMap<String, Vec<ConnectionId>>,
}

/// What requests read: every distinct secret with its connections by account.
pub struct Snapshot {
    secrets: Vec<SecretRoutes>,
    /// For each account id, the secrets (indexes into `secrets`) with a connection on it.
    secrets_by_account: HashMap<String, Vec<usize>>,
    /// Whether `secrets[0]` is the default app's, which may sign a webhook of any account.
    has_default: bool,
    connections: usize,
    /// Until when a connection that could not be read yet (see [`Table::unread`]) may be the
    /// one a webhook was for: until then a webhook no route takes is answered 503, not 200.
    unsettled_until: Option<Instant>,
}

/// How long a connection that cannot be read makes unrouted webhooks 503 (Zoom retries them
/// after 5, 20 and 60 minutes). Past it they are answered 200 and dropped again: a connection
/// that never reads must not make Zoom disable the app's subscription.
pub const UNSETTLED_FOR: Duration = Duration::from_secs(10 * 60);

/// The secret that verified a request, as an index into the snapshot it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedBy(usize);

impl Snapshot {
    /// Which secret signed `body` with `signature` and `timestamp`, if any (every secret tried).
    /// Requests use [`Self::verify_among`] with [`Self::candidates`], to bound the work inline.
    #[cfg(test)]
    pub fn verify(&self, signature: &[u8], timestamp: &[u8], body: &[u8]) -> Option<VerifiedBy> {
        self.verify_among(self.candidates(None), signature, timestamp, body)
    }

    /// Every secret once, the likeliest to have signed a webhook that names `account_id` first:
    /// the default app's and those with a connection on that account. A forged body then costs
    /// one HMAC per secret only when it also misses those.
    pub fn candidates(&self, account_id: Option<&str>) -> impl Iterator<Item = VerifiedBy> + '_ {
        let default = self.has_default.then_some(0);
        let likely: &[usize] = account_id
            .and_then(|a| self.secrets_by_account.get(a))
            .map_or(&[], Vec::as_slice);
        let is_likely = move |i: &usize| default == Some(*i) || likely.contains(i);
        default
            .into_iter()
            .chain(likely.iter().copied().filter(move |&i| default != Some(i)))
            .chain((0..self.secrets.len()).filter(move |i| !is_likely(i)))
            .map(VerifiedBy)
    }

    /// The first of `candidates` whose secret signed `body` with `signature` and `timestamp`.
    pub fn verify_among(
        &self,
        candidates: impl IntoIterator<Item = VerifiedBy>,
        signature: &[u8],
        timestamp: &[u8],
        body: &[u8],
    ) -> Option<VerifiedBy> {
        candidates.into_iter().find(|by| {
            self.secrets[by.0]
                .verifier
                .verifies(signature, timestamp, body)
        })
    }

    /// The verifier of the secret that verified a request.
    pub fn verifier(&self, by: VerifiedBy) -> &Verifier {
        &self.secrets[by.0].verifier
    }

    /// The deduplication hash of a webhook `body` verified by `by`: the same body verified by
    /// two apps' secrets (two apps installed on one account) is two webhooks, each for its
    /// own connections, not a duplicate.
    pub fn dedupe_hash(&self, by: VerifiedBy, body: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        if let Some(tag) = &self.secrets[by.0].scope_tag {
            hash.update(tag);
        }
        hash.update(body);
        hash.finalize().into()
    }

    /// The connections of `account_id` whose secret is `by`.
    pub fn destinations(&self, by: VerifiedBy, account_id: &str) -> &[ConnectionId] {
        self.secrets[by.0]
            .by_account
            .get(account_id)
            .map_or(&[], Vec::as_slice)
    }

    /// How many distinct secrets can verify requests.
    pub fn secret_count(&self) -> usize {
        self.secrets.len()
    }

    /// How many connections are routable.
    pub fn connection_count(&self) -> usize {
        self.connections
    }

    /// Whether a connection the host engine could not read (for at most [`UNSETTLED_FOR`])
    /// may be the one a webhook that no route takes, or that no known secret verifies, was
    /// for: then it is answered 503, so Zoom sends it again.
    pub fn unsettled(&self) -> bool {
        self.unsettled_at(Instant::now())
    }

    fn unsettled_at(&self, now: Instant) -> bool {
        self.unsettled_until.is_some_and(|until| now < until)
    }
}

#[derive(Default)]
struct Table {
    routes: HashMap<ConnectionId, Route>,
    /// Bumped when a read of the host starts, so reads can be told apart by age.
    version: u64,
    /// For each connection reloaded on its own since the last full reload started, the version its
    /// applied read started at: a full reload keeps entries read after it started, and an
    /// older read of the same connection that ends later is ignored.
    changed_at: HashMap<ConnectionId, u64>,
    /// The version the last applied full reload started at: a single read started before
    /// that is older than what the full reload found, for the connections it read.
    reloaded_at: u64,
    /// The connections the last applied full reload read (set up or deleted). A connection it
    /// did not read (not listed and not known yet: just set up in a project not deployed) or
    /// could not read keeps what a single read started before it finds.
    full_read: HashSet<ConnectionId>,
    loaded: bool,
    /// Connections with no route whose last read failed (the host answered, but not for
    /// them), with when their reads started failing: retried every [`UNREAD_RETRY`].
    unread: HashMap<ConnectionId, Instant>,
    /// Every connection whose last applied read showed it set up, routed or not, with its
    /// `auth_type`: a full reload reads each of them again, listed by the host or not.
    known: HashMap<ConnectionId, String>,
}

impl Table {
    /// Whether a read of `cid` that started at version `asked` is older than what a full
    /// reload or a later read of it already applied (two saves in a row: the first one's
    /// read may end after the second's), so its outcome must not be applied.
    fn superseded(&self, cid: &ConnectionId, asked: u64) -> bool {
        (asked <= self.reloaded_at && self.full_read.contains(cid))
            || self.changed_at.get(cid).is_some_and(|v| *v > asked)
    }
}

/// How often connections that could not be read are read again.
pub const UNREAD_RETRY: Duration = Duration::from_secs(2);

/// The routing index. Cheap to share: clone the `Arc` it lives in.
pub struct RoutingIndex {
    default_secret: Option<Secret>,
    table: Mutex<Table>,
    snapshot: RwLock<Option<Arc<Snapshot>>>,
    /// Where the known connections are kept across restarts (with a remote host).
    store: Option<Outbox>,
}

/// The variables routing reads.
fn routing_var_names() -> Vec<String> {
    [
        vars::AUTH_TYPE,
        vars::ACCOUNT_ID,
        vars::PRIVATE_ACCOUNT_ID,
        vars::PRIVATE_SECRET_TOKEN,
    ]
    .map(String::from)
    .to_vec()
}

impl RoutingIndex {
    /// An empty, not yet loaded index; `default_secret` is `ZOOM_SECRET_TOKEN`.
    pub fn new(default_secret: Option<Secret>) -> Self {
        Self {
            default_secret,
            table: Mutex::new(Table::default()),
            snapshot: RwLock::new(None),
            store: None,
        }
    }

    /// This index, keeping the connections it knows are set up in `outbox`'s database and
    /// starting from those kept there: for a remote host, which does not list them all. They
    /// are read at the first load like the listed ones.
    pub fn remembering_in(mut self, outbox: Outbox) -> rusqlite::Result<Self> {
        let table = self.table.get_mut().unwrap_or_else(|e| e.into_inner());
        for (cid, auth_type) in outbox.known_connections()? {
            match ConnectionId::parse(&cid) {
                Ok(cid) => {
                    table.known.insert(cid, auth_type);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a malformed connection id kept in the event outbox")
                }
            }
        }
        self.store = Some(outbox);
        Ok(self)
    }

    /// The connections known to be set up with `auth_type` (any, when empty), listed by the
    /// host or not.
    pub fn known(&self, auth_type: &str) -> Vec<ConnectionId> {
        let mut known: Vec<ConnectionId> = self
            .lock()
            .known
            .iter()
            .filter(|(_, a)| auth_type.is_empty() || a.as_str() == auth_type)
            .map(|(cid, _)| cid.clone())
            .collect();
        known.sort();
        known
    }

    /// The current snapshot, or `None` until the first load completed.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads every connection from the host engine (those it lists, and those this index
    /// knows of that it does not) and replaces the index. On failure the index keeps what it
    /// had.
    pub async fn reload_all(&self, host: &dyn HostEngine) -> Result<(), HostError> {
        let started_at = self.lock().version;
        let listed = host.find_connections(vars::AUTH_TYPE, "").await?;
        // A remote host lists only active connections: one set up in a project not deployed
        // yet is read on its own, and keeps its route until a read shows it deleted.
        let listed_ids: HashSet<&ConnectionId> = listed.iter().collect();
        let ids: Vec<ConnectionId> = {
            let table = self.lock();
            let mut seen = listed_ids.clone();
            let unlisted: Vec<ConnectionId> = table
                .known
                .keys()
                .chain(table.routes.keys())
                .chain(table.unread.keys())
                .filter(|cid| seen.insert(cid))
                .cloned()
                .collect();
            listed.iter().cloned().chain(unlisted).collect()
        };
        let mut routes = HashMap::new();
        let mut unread = HashMap::new();
        // What the reads showed: set up (with the `auth_type`), or not (`None`).
        let mut read = Vec::new();
        // Reads of listed connections the host failed (unavailable), and the first such error.
        let (mut host_failures, mut first_host_error) = (0usize, None);
        for chunk in ids.chunks(16) {
            let reads = chunk
                .iter()
                .map(|cid| async move { (cid, host.get_vars(cid, &routing_var_names()).await) });
            for (cid, result) in join_all(reads).await {
                let found = match result {
                    Ok(found) => found,
                    // One connection that cannot be read (deleted meanwhile, a variable that
                    // does not decrypt) must not keep every other one from its webhooks.
                    // A connection routed before keeps its route through a failure of its own
                    // (a remote host's INTERNAL for one read): dropping it would answer its
                    // webhooks 200 "unrouted" until the next reload, and Zoom never resends those.
                    Err(HostError::NotFound(_)) => {
                        read.push((cid.clone(), None));
                        continue;
                    }
                    Err(e) => {
                        // The host failing for a connection it lists: if it fails for all of
                        // them it is down, and the index stays as it is (below); one it keeps
                        // failing for must not stop every reload.
                        let host_failed =
                            matches!(e, HostError::Unavailable(_) | HostError::Database(_))
                                && listed_ids.contains(cid);
                        let (previous, since) = {
                            let table = self.lock();
                            (
                                table.routes.get(cid).cloned(),
                                table.unread.get(cid).copied(),
                            )
                        };
                        match previous {
                            Some(previous) => {
                                if !host_failed {
                                    tracing::warn!(connection_id = %cid, error = %e, "cannot read a connection's variables; it keeps its routing until it can be read");
                                }
                                routes.insert(cid.clone(), previous);
                            }
                            None => {
                                if !host_failed {
                                    tracing::warn!(connection_id = %cid, error = %e, "cannot read a connection's variables; webhooks no route takes are answered 503 until it can be read");
                                }
                                unread.insert(cid.clone(), since.unwrap_or_else(Instant::now));
                            }
                        }
                        if host_failed {
                            host_failures += 1;
                            first_host_error.get_or_insert(e);
                        }
                        continue;
                    }
                };
                read.push((cid.clone(), auth_type_of(&found)));
                if let Some(route) = self.route_of(cid, &found) {
                    routes.insert(cid.clone(), route);
                }
            }
        }
        if let Some(e) = first_host_error {
            // Not one read answered: the host is down, and the index stays as it is.
            if read.is_empty() {
                return Err(e);
            }
            tracing::warn!(connections = host_failures, error = %e, "the host engine failed to read some connections; they keep their routing until they can be read");
        }
        let mut table = self.lock();
        table.full_read = read.iter().map(|(cid, _)| cid.clone()).collect();
        // Connections saved while this reload ran keep what their own reload found.
        for (cid, auth_type) in read {
            if table.changed_at.get(&cid).is_none_or(|v| *v <= started_at) {
                self.know(&mut table, &cid, auth_type);
            }
        }
        let newer: Vec<(ConnectionId, Option<Route>)> = table
            .changed_at
            .iter()
            .filter(|(_, v)| **v > started_at)
            .map(|(cid, _)| (cid.clone(), table.routes.get(cid).cloned()))
            .collect();
        for (cid, route) in newer {
            match table.unread.get(&cid) {
                Some(since) => unread.insert(cid.clone(), *since),
                None => unread.remove(&cid),
            };
            match route {
                Some(route) => routes.insert(cid, route),
                None => routes.remove(&cid),
            };
        }
        table.routes = routes;
        table.unread = unread;
        // Entries newer than this reload stay: a slow read of the same connection that
        // started before them (but after this reload) must still be told it is superseded.
        table.changed_at.retain(|_, v| *v > started_at);
        table.reloaded_at = started_at;
        table.loaded = true;
        self.publish(&table);
        Ok(())
    }

    /// Re-reads one connection from the host engine: call it after a connection's variables
    /// were saved or deleted, so webhooks route by them at once.
    pub async fn reload_connection(
        &self,
        host: &dyn HostEngine,
        cid: &ConnectionId,
    ) -> Result<(), HostError> {
        let asked = {
            let mut table = self.lock();
            table.version += 1;
            table.version
        };
        let found = match host.get_vars(cid, &routing_var_names()).await {
            Ok(found) => found,
            Err(e) => {
                let mut table = self.lock();
                if table.superseded(cid, asked) {
                    return Err(e);
                }
                // What this read learned is recorded as newer than a full reload that started
                // before it, so that reload keeps it.
                let unread = match e {
                    // Deleted meanwhile: nothing to wait for, and nothing to route to.
                    HostError::NotFound(_) => {
                        table.changed_at.insert(cid.clone(), asked);
                        self.know(&mut table, cid, None);
                        let was_unread = table.unread.remove(cid).is_some();
                        table.routes.remove(cid).is_some() || was_unread
                    }
                    // A routed connection keeps its route (see `reload_all`). This read
                    // learned nothing: a full reload that read the connection meanwhile (its
                    // new secret, say) has the newer route.
                    _ if table.routes.contains_key(cid) => false,
                    _ => {
                        table.changed_at.insert(cid.clone(), asked);
                        let new = !table.unread.contains_key(cid);
                        if new {
                            table.unread.insert(cid.clone(), Instant::now());
                        }
                        new
                    }
                };
                if unread && table.loaded {
                    self.publish(&table);
                }
                return Err(e);
            }
        };
        let route = self.route_of(cid, &found);
        let mut table = self.lock();
        if table.superseded(cid, asked) {
            return Ok(());
        }
        table.changed_at.insert(cid.clone(), asked);
        self.know(&mut table, cid, auth_type_of(&found));
        let read_again = table.unread.remove(cid).is_some();
        let changed = match route {
            Some(route) => table.routes.insert(cid.clone(), route.clone()) != Some(route),
            None => table.routes.remove(cid).is_some(),
        };
        if (changed || read_again) && table.loaded {
            self.publish(&table);
        }
        Ok(())
    }

    /// The connections with no route whose reads have failed for less than
    /// [`UNSETTLED_FOR`], to read again every [`UNREAD_RETRY`]. Past it, the full reload
    /// every minute is enough.
    pub fn unread(&self) -> Vec<ConnectionId> {
        let now = Instant::now();
        self.lock()
            .unread
            .iter()
            .filter(|(_, since)| now < **since + UNSETTLED_FOR)
            .map(|(cid, _)| cid.clone())
            .collect()
    }

    /// Reads the [`Self::unread`] connections again, 16 at a time.
    pub async fn retry_unread(&self, host: &dyn HostEngine) {
        for chunk in self.unread().chunks(16) {
            let reads = chunk.iter().map(|cid| async move {
                if let Err(e) = self.reload_connection(host, cid).await {
                    tracing::debug!(error = %e, connection_id = %cid, "a connection still cannot be read");
                }
            });
            join_all(reads).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies what a read showed of `cid`: set up with `auth_type`, or (`None`) not set up
    /// (deleted). Under the table's lock, so the store sees the changes in the order applied.
    fn know(&self, table: &mut Table, cid: &ConnectionId, auth_type: Option<String>) {
        let changed = match auth_type {
            Some(auth_type) => {
                table.known.insert(cid.clone(), auth_type.clone()) != Some(auth_type)
            }
            None => table.known.remove(cid).is_some(),
        };
        if changed && let Some(store) = &self.store {
            let auth_type = table.known.get(cid).map(String::as_str);
            store.know_connection(cid.as_str(), auth_type);
        }
    }

    fn route_of(&self, cid: &ConnectionId, found: &[crate::host::Var]) -> Option<Route> {
        let get = |name: &str| {
            found
                .iter()
                .find(|v| v.name == name)
                .map(|v| v.value.trim())
                .filter(|v| !v.is_empty())
        };
        let auth_type = get(vars::AUTH_TYPE)?.parse::<AuthType>().ok()?;
        let (secret, account_id) = match auth_type {
            AuthType::OAuthDefault => (self.default_secret.clone(), get(vars::ACCOUNT_ID)),
            AuthType::OAuthPrivate | AuthType::ServerToServer => (
                get(vars::PRIVATE_SECRET_TOKEN).map(Secret::new),
                get(vars::ACCOUNT_ID).or_else(|| get(vars::PRIVATE_ACCOUNT_ID)),
            ),
        };
        match (secret, account_id) {
            (Some(secret), Some(account_id)) => Some(Route {
                account_id: account_id.to_string(),
                secret,
            }),
            (None, _) => {
                tracing::debug!(connection_id = %cid, %auth_type, "connection has no webhook secret token: its webhooks cannot be verified");
                None
            }
            (_, None) => {
                tracing::debug!(connection_id = %cid, %auth_type, "connection has no account id yet: no webhooks routed to it");
                None
            }
        }
    }

    fn publish(&self, table: &Table) {
        let mut secrets: Vec<SecretRoutes> = Vec::new();
        // Each distinct secret's index in `secrets`.
        let mut index: HashMap<&str, usize> = HashMap::new();
        // The default secret verifies requests (URL validation) even with no connection.
        if let Some(default) = &self.default_secret {
            secrets.push(SecretRoutes {
                verifier: Verifier::new(default),
                scope_tag: None,
                by_account: HashMap::new(),
            });
            index.insert(default.expose(), 0);
        }
        let mut secrets_by_account: HashMap<String, Vec<usize>> = HashMap::new();
        for (cid, route) in &table.routes {
            let i = *index.entry(route.secret.expose()).or_insert_with(|| {
                let verifier = Verifier::new(&route.secret);
                secrets.push(SecretRoutes {
                    scope_tag: Some(verifier.scope_tag()),
                    verifier,
                    by_account: HashMap::new(),
                });
                secrets.len() - 1
            });
            secrets[i]
                .by_account
                .entry(route.account_id.clone())
                .or_default()
                .push(cid.clone());
            secrets_by_account
                .entry(route.account_id.clone())
                .or_default()
                .push(i);
        }
        for routes in &mut secrets {
            for list in routes.by_account.values_mut() {
                list.sort();
            }
        }
        for list in secrets_by_account.values_mut() {
            list.sort_unstable();
            list.dedup();
        }
        let snapshot = Snapshot {
            secrets,
            secrets_by_account,
            has_default: self.default_secret.is_some(),
            connections: table.routes.len(),
            unsettled_until: table
                .unread
                .values()
                .max()
                .map(|since| *since + UNSETTLED_FOR),
        };
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(snapshot));
    }
}

/// A connection's `auth_type` among the variables read of it: set when it is set up.
fn auth_type_of(found: &[crate::host::Var]) -> Option<String> {
    crate::connection::value_of(found, vars::AUTH_TYPE)
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
}

/// A host engine whose listing of connections by `auth_type` also names those `routing` knows
/// are set up: a remote AutoKitteh host lists only active ones (org-level, or of a project
/// with an active deployment), and the token keep-alive task must also refresh the others.
/// Everything else goes to the host as it is.
pub struct ListingKnown {
    host: Arc<dyn HostEngine>,
    routing: Arc<RoutingIndex>,
}

impl ListingKnown {
    /// `host`, listing `routing`'s known connections too.
    pub fn new(host: Arc<dyn HostEngine>, routing: Arc<RoutingIndex>) -> Self {
        Self { host, routing }
    }
}

#[async_trait::async_trait]
impl HostEngine for ListingKnown {
    fn kind(&self) -> &'static str {
        self.host.kind()
    }

    async fn get_vars(
        &self,
        scope: &ConnectionId,
        names: &[String],
    ) -> Result<Vec<crate::host::Var>, HostError> {
        self.host.get_vars(scope, names).await
    }

    async fn set_vars(
        &self,
        scope: &ConnectionId,
        vars: Vec<crate::host::Var>,
    ) -> Result<(), HostError> {
        self.host.set_vars(scope, vars).await
    }

    async fn delete_vars(&self, scope: &ConnectionId, names: &[String]) -> Result<(), HostError> {
        self.host.delete_vars(scope, names).await
    }

    async fn replace_vars(
        &self,
        scope: &ConnectionId,
        vars: Vec<crate::host::Var>,
        remove: &[String],
    ) -> Result<(), HostError> {
        self.host.replace_vars(scope, vars, remove).await
    }

    async fn replace_vars_if_set_up(
        &self,
        scope: &ConnectionId,
        vars: Vec<crate::host::Var>,
        remove: &[String],
    ) -> Result<(), HostError> {
        self.host.replace_vars_if_set_up(scope, vars, remove).await
    }

    async fn replace_vars_if_current(
        &self,
        scope: &ConnectionId,
        vars: Vec<crate::host::Var>,
        remove: &[String],
        name: &str,
        current: &[&str],
    ) -> Result<bool, HostError> {
        self.host
            .replace_vars_if_current(scope, vars, remove, name, current)
            .await
    }

    async fn find_connections(
        &self,
        name: &str,
        value: &str,
    ) -> Result<Vec<ConnectionId>, HostError> {
        let mut found = self.host.find_connections(name, value).await?;
        if name == vars::AUTH_TYPE {
            let listed: HashSet<ConnectionId> = found.iter().cloned().collect();
            let known = self.routing.known(value);
            found.extend(known.into_iter().filter(|cid| !listed.contains(cid)));
        }
        Ok(found)
    }

    async fn dispatch(
        &self,
        event: crate::proto::autokitteh::events::v1::Event,
    ) -> Result<String, HostError> {
        self.host.dispatch(event).await
    }

    async fn check(&self) -> Result<(), HostError> {
        self.host.check().await
    }
}

/// Runs futures concurrently on this task and returns their results in order.
async fn join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (f, slot) in pending.iter_mut().zip(results.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results.into_iter().map(Option::unwrap).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Keys;
    use crate::host::Var;
    use crate::host::embedded::EmbeddedHost;

    async fn host() -> (tempfile::TempDir, EmbeddedHost) {
        let dir = tempfile::tempdir().unwrap();
        let host = EmbeddedHost::open(
            dir.path(),
            Arc::new(Keys::from_material(b"routing test key material, 32+ bytes")),
        )
        .unwrap();
        (dir, host)
    }

    fn signed(secret: &str, body: &[u8]) -> String {
        Verifier::new(&Secret::new(secret)).sign("1", body)
    }

    /// The connections `index` routes a webhook for `account` signed with `default-secret` to.
    fn routed_by_default(index: &RoutingIndex, account: &str) -> Vec<ConnectionId> {
        let snap = index.snapshot().unwrap();
        let by = snap
            .verify(signed("default-secret", b"x").as_bytes(), b"1", b"x")
            .unwrap();
        snap.destinations(by, account).to_vec()
    }

    /// A full reload of `index` from `host`, in a task of its own (to hold it part-way).
    fn spawn_full_reload(
        index: &Arc<RoutingIndex>,
        host: &Arc<TestHost>,
    ) -> tokio::task::JoinHandle<Result<(), HostError>> {
        let (index, host) = (index.clone(), host.clone());
        tokio::spawn(async move { index.reload_all(&*host).await })
    }

    /// A host with two default-app connections on `acc-A`.
    async fn two_on_one_account() -> (tempfile::TempDir, EmbeddedHost, ConnectionId, ConnectionId) {
        let (dir, host) = host().await;
        let (a, b) = (ConnectionId::generate(), ConnectionId::generate());
        for cid in [&a, &b] {
            host.set_vars(
                cid,
                vec![
                    Var::plain("auth_type", "oauthDefault"),
                    Var::plain("account_id", "acc-A"),
                ],
            )
            .await
            .unwrap();
        }
        (dir, host, a, b)
    }

    /// The embedded host, except that reading `failing`'s variables fails as a remote host's
    /// INTERNAL does, and that with `hold_next` set the next read is held back after reading
    /// until `release` is notified (`read` is notified once it has read).
    struct TestHost {
        inner: EmbeddedHost,
        failing: std::sync::Mutex<Option<ConnectionId>>,
        /// Reading this one's variables answers as a host refusing us does (Unavailable).
        refusing: std::sync::Mutex<Option<ConnectionId>>,
        /// Reading this one's variables answers NOT_FOUND (deleted).
        missing: std::sync::Mutex<Option<ConnectionId>>,
        hold_next: std::sync::atomic::AtomicBool,
        read: tokio::sync::Notify,
        release: tokio::sync::Notify,
        /// With `hold_find` set, the next listing (a full reload's first step) is held back
        /// until `find_release` is notified (`find_started` is notified once it is).
        hold_find: std::sync::atomic::AtomicBool,
        find_started: tokio::sync::Notify,
        find_release: tokio::sync::Notify,
        /// Connections the listing leaves out, as a remote host does those of projects with
        /// no active deployment; reading them still works.
        inactive: std::sync::Mutex<Vec<ConnectionId>>,
    }

    impl TestHost {
        fn over(inner: EmbeddedHost) -> Self {
            Self {
                inner,
                failing: std::sync::Mutex::new(None),
                refusing: std::sync::Mutex::new(None),
                missing: std::sync::Mutex::new(None),
                hold_next: false.into(),
                read: tokio::sync::Notify::new(),
                release: tokio::sync::Notify::new(),
                hold_find: false.into(),
                find_started: tokio::sync::Notify::new(),
                find_release: tokio::sync::Notify::new(),
                inactive: std::sync::Mutex::new(Vec::new()),
            }
        }
    }

    #[async_trait::async_trait]
    impl HostEngine for TestHost {
        fn kind(&self) -> &'static str {
            "test"
        }
        async fn get_vars(
            &self,
            scope: &ConnectionId,
            names: &[String],
        ) -> Result<Vec<Var>, HostError> {
            if self.missing.lock().unwrap().as_ref() == Some(scope) {
                return Err(HostError::NotFound("no such connection".into()));
            }
            if self.failing.lock().unwrap().as_ref() == Some(scope) {
                return Err(HostError::Remote("Internal: database hiccup".into()));
            }
            if self.refusing.lock().unwrap().as_ref() == Some(scope) {
                return Err(HostError::Unavailable("PermissionDenied: no access".into()));
            }
            let found = self.inner.get_vars(scope, names).await;
            if self
                .hold_next
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                self.read.notify_one();
                self.release.notified().await;
            }
            found
        }
        async fn set_vars(&self, scope: &ConnectionId, vars: Vec<Var>) -> Result<(), HostError> {
            self.inner.set_vars(scope, vars).await
        }
        async fn delete_vars(
            &self,
            scope: &ConnectionId,
            names: &[String],
        ) -> Result<(), HostError> {
            self.inner.delete_vars(scope, names).await
        }
        async fn find_connections(
            &self,
            name: &str,
            value: &str,
        ) -> Result<Vec<ConnectionId>, HostError> {
            if self
                .hold_find
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                self.find_started.notify_one();
                self.find_release.notified().await;
            }
            let mut found = self.inner.find_connections(name, value).await?;
            let inactive = self.inactive.lock().unwrap();
            found.retain(|cid| !inactive.contains(cid));
            Ok(found)
        }
        async fn dispatch(
            &self,
            event: crate::proto::autokitteh::events::v1::Event,
        ) -> Result<String, HostError> {
            self.inner.dispatch(event).await
        }
        async fn check(&self) -> Result<(), HostError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_connection_the_host_does_not_list_keeps_its_route_until_a_read_shows_it_deleted() {
        let (_dir, inner, a, b) = two_on_one_account().await;
        let host = TestHost::over(inner);
        *host.inactive.lock().unwrap() = vec![a.clone(), b.clone()];
        let index = RoutingIndex::new(Some(Secret::new("default-secret")));
        index.reload_all(&host).await.unwrap();
        assert!(routed_by_default(&index, "acc-A").is_empty(), "none listed");

        // Both set up through this service: each reloaded on its own.
        for cid in [&a, &b] {
            index.reload_connection(&host, cid).await.unwrap();
        }
        let mut both = vec![a.clone(), b.clone()];
        both.sort();
        assert_eq!(routed_by_default(&index, "acc-A"), both);
        assert_eq!(index.known("oauthDefault"), both);
        // Still not listed: the full reload reads them on their own and keeps them.
        index.reload_all(&host).await.unwrap();
        assert_eq!(routed_by_default(&index, "acc-A"), both);
        // One the host cannot read just now keeps its route too.
        *host.failing.lock().unwrap() = Some(a.clone());
        index.reload_all(&host).await.unwrap();
        assert_eq!(routed_by_default(&index, "acc-A"), both);
        *host.failing.lock().unwrap() = None;
        // So does one it refuses us (as an unavailable host answers), and the reload goes on
        // for the others: a listed connection saved elsewhere meanwhile is routed.
        *host.refusing.lock().unwrap() = Some(a.clone());
        let listed = ConnectionId::generate();
        host.inner
            .set_vars(
                &listed,
                vec![
                    Var::plain("auth_type", "oauthDefault"),
                    Var::plain("account_id", "acc-listed"),
                ],
            )
            .await
            .unwrap();
        index.reload_all(&host).await.unwrap();
        assert_eq!(routed_by_default(&index, "acc-A"), both);
        assert_eq!(
            routed_by_default(&index, "acc-listed"),
            std::slice::from_ref(&listed)
        );
        *host.refusing.lock().unwrap() = None;
        host.inner.delete_vars(&listed, &[]).await.unwrap();

        // Deleted: its variables are gone (the embedded host answers none), or the host no
        // longer knows it (NOT_FOUND). Each read as such loses its route and is forgotten.
        host.inner.delete_vars(&b, &[]).await.unwrap();
        index.reload_all(&host).await.unwrap();
        assert_eq!(routed_by_default(&index, "acc-A"), std::slice::from_ref(&a));
        assert_eq!(index.known(""), std::slice::from_ref(&a));
        *host.missing.lock().unwrap() = Some(a.clone());
        index.reload_all(&host).await.unwrap();
        assert!(routed_by_default(&index, "acc-A").is_empty());
        assert!(index.known("").is_empty());
    }

    #[tokio::test]
    async fn a_listed_connection_the_host_keeps_failing_for_does_not_stop_every_reload() {
        let (_dir, inner, a, b) = two_on_one_account().await;
        let host = TestHost::over(inner);
        let index = RoutingIndex::new(Some(Secret::new("default-secret")));
        index.reload_all(&host).await.unwrap();
        let mut both = vec![a.clone(), b.clone()];
        both.sort();
        assert_eq!(routed_by_default(&index, "acc-A"), both);

        // The host answers "unavailable" for every read of one listed connection (a
        // permission it lost, say); the other is deleted elsewhere, unannounced.
        *host.refusing.lock().unwrap() = Some(a.clone());
        host.inner.delete_vars(&b, &[]).await.unwrap();
        index.reload_all(&host).await.unwrap();
        assert_eq!(
            routed_by_default(&index, "acc-A"),
            std::slice::from_ref(&a),
            "the failing one keeps its route, the deleted one loses its own"
        );
        // Not one read answered: the host is down, and the index stays as it is.
        assert!(index.reload_all(&host).await.is_err());
        assert_eq!(routed_by_default(&index, "acc-A"), std::slice::from_ref(&a));
    }

    #[tokio::test]
    async fn known_connections_are_kept_in_the_outbox_and_read_again_after_a_restart() {
        use crate::webhook::outbox::OutboxSettings;
        let (_dir, inner, a, b) = two_on_one_account().await;
        let host = TestHost::over(inner);
        *host.inactive.lock().unwrap() = vec![a.clone(), b.clone()];
        let outbox_dir = tempfile::tempdir().unwrap();
        let restarted = || {
            let outbox = Outbox::open(outbox_dir.path(), OutboxSettings::default()).unwrap();
            let index = RoutingIndex::new(Some(Secret::new("default-secret")))
                .remembering_in(outbox.clone())
                .unwrap();
            (outbox, index)
        };

        let (outbox, index) = restarted();
        index.reload_all(&host).await.unwrap();
        index.reload_connection(&host, &a).await.unwrap();
        assert_eq!(routed_by_default(&index, "acc-A"), std::slice::from_ref(&a));
        outbox.close().await;
        drop((outbox, index));

        // Known before the first load: what the keep-alive task lists at start.
        let (outbox, index) = restarted();
        assert_eq!(index.known("oauthDefault"), std::slice::from_ref(&a));
        assert!(index.known("oauthPrivate").is_empty());
        index.reload_all(&host).await.unwrap();
        assert_eq!(
            routed_by_default(&index, "acc-A"),
            std::slice::from_ref(&a),
            "routed after a restart, though not listed (and b, never read, is not)"
        );
        // Deleted: forgotten, in the outbox too.
        host.inner.delete_vars(&a, &[]).await.unwrap();
        index.reload_all(&host).await.unwrap();
        assert!(routed_by_default(&index, "acc-A").is_empty());
        outbox.close().await;
        drop((outbox, index));
        let (_outbox, index) = restarted();
        assert!(index.known("").is_empty());
    }

    #[tokio::test]
    async fn the_keep_alive_listing_names_the_known_connections_the_host_does_not_list() {
        let (_dir, inner, a, b) = two_on_one_account().await;
        let private = ConnectionId::generate();
        inner
            .set_vars(&private, vec![Var::plain("auth_type", "oauthPrivate")])
            .await
            .unwrap();
        let host = Arc::new(TestHost::over(inner));
        *host.inactive.lock().unwrap() = vec![a.clone(), private.clone()];
        let index = Arc::new(RoutingIndex::new(Some(Secret::new("default-secret"))));
        for cid in [&a, &private] {
            index.reload_connection(&*host, cid).await.unwrap();
        }
        let listing = ListingKnown::new(host.clone(), index.clone());
        let sorted = |mut ids: Vec<ConnectionId>| {
            ids.sort();
            ids
        };
        assert_eq!(
            sorted(
                listing
                    .find_connections("auth_type", "oauthDefault")
                    .await
                    .unwrap()
            ),
            sorted(vec![a.clone(), b.clone()]),
            "each once, and only of that auth_type"
        );
        assert_eq!(
            listing
                .find_connections("auth_type", "oauthPrivate")
                .await
                .unwrap(),
            std::slice::from_ref(&private)
        );
        assert_eq!(
            listing
                .find_connections("auth_type", "")
                .await
                .unwrap()
                .len(),
            3
        );
        // Listings by other variables are the host's own.
        assert_eq!(
            listing
                .find_connections("account_id", "acc-A")
                .await
                .unwrap(),
            std::slice::from_ref(&b)
        );
    }

    #[tokio::test]
    async fn a_slow_read_of_an_earlier_save_does_not_undo_a_later_one() {
        let (_dir, inner) = host().await;
        let host = Arc::new(TestHost::over(inner));
        let cid = ConnectionId::generate();
        let on = |account: &str| {
            vec![
                Var::plain("auth_type", "oauthDefault"),
                Var::plain("account_id", account),
            ]
        };
        let index = Arc::new(RoutingIndex::new(Some(Secret::new("default-secret"))));
        index.reload_all(&*host).await.unwrap();
        let routed_to = |account: &str| routed_by_default(&index, account);

        // Saves on acc-old, starts reloading it (the read held back once done), saves on
        // acc-new: the held reload is the slow read of the earlier save.
        // The reload's handle is awaited later, on purpose: after the later save is applied.
        #[allow(clippy::async_yields_async)]
        let saved_twice_first_read_held = async || {
            host.set_vars(&cid, on("acc-old")).await.unwrap();
            host.hold_next
                .store(true, std::sync::atomic::Ordering::SeqCst);
            let slow = tokio::spawn({
                let (index, host, cid) = (index.clone(), host.clone(), cid.clone());
                async move { index.reload_connection(&*host, &cid).await }
            });
            host.read.notified().await;
            host.set_vars(&cid, on("acc-new")).await.unwrap();
            slow
        };

        // The earlier save's read is slow; the later save is read and applied meanwhile.
        let slow = saved_twice_first_read_held().await;
        index.reload_connection(&*host, &cid).await.unwrap();
        assert_eq!(routed_to("acc-new"), std::slice::from_ref(&cid));
        host.release.notify_one();
        slow.await.unwrap().unwrap();
        assert_eq!(
            routed_to("acc-new"),
            std::slice::from_ref(&cid),
            "the later save wins"
        );
        assert!(routed_to("acc-old").is_empty());

        // The same with a full reload in between, which clears what single reads left.
        let slow = saved_twice_first_read_held().await;
        index.reload_all(&*host).await.unwrap();
        host.release.notify_one();
        slow.await.unwrap().unwrap();
        assert_eq!(routed_to("acc-new"), std::slice::from_ref(&cid));
    }

    #[tokio::test]
    async fn a_slow_read_that_started_before_a_later_save_loses_even_when_a_full_reload_ends_between()
     {
        let (_dir, inner) = host().await;
        let host = Arc::new(TestHost::over(inner));
        let cid = ConnectionId::generate();
        let on = |account: &str| {
            vec![
                Var::plain("auth_type", "oauthDefault"),
                Var::plain("account_id", account),
            ]
        };
        host.set_vars(&cid, on("acc-old")).await.unwrap();
        let index = Arc::new(RoutingIndex::new(Some(Secret::new("default-secret"))));
        index.reload_all(&*host).await.unwrap();

        // A full reload starts (the periodic one), and is held at its listing.
        host.hold_find
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let full = spawn_full_reload(&index, &host);
        host.find_started.notified().await;
        // A save's reload reads acc-old and is held; a later save to acc-new is applied.
        host.hold_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let slow = tokio::spawn({
            let (index, host, cid) = (index.clone(), host.clone(), cid.clone());
            async move { index.reload_connection(&*host, &cid).await }
        });
        host.read.notified().await;
        host.set_vars(&cid, on("acc-new")).await.unwrap();
        index.reload_connection(&*host, &cid).await.unwrap();
        // The full reload ends, then the slow read.
        host.find_release.notify_one();
        full.await.unwrap().unwrap();
        host.release.notify_one();
        slow.await.unwrap().unwrap();

        assert_eq!(
            routed_by_default(&index, "acc-new"),
            std::slice::from_ref(&cid)
        );
        assert!(routed_by_default(&index, "acc-old").is_empty());
    }

    #[tokio::test]
    async fn a_full_reload_that_did_not_read_a_new_connection_does_not_overrule_its_own_read() {
        let (_dir, inner) = host().await;
        let host = Arc::new(TestHost::over(inner));
        let index = Arc::new(RoutingIndex::new(Some(Secret::new("default-secret"))));
        index.reload_all(&*host).await.unwrap();
        // Set up in a project not deployed: the host does not list it.
        let cid = ConnectionId::generate();
        *host.inactive.lock().unwrap() = vec![cid.clone()];
        host.set_vars(
            &cid,
            vec![
                Var::plain("auth_type", "oauthDefault"),
                Var::plain("account_id", "acc-A"),
            ],
        )
        .await
        .unwrap();
        // Its own reload reads it and is held; a full reload starts and ends meanwhile.
        host.hold_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let own = tokio::spawn({
            let (index, host, cid) = (index.clone(), host.clone(), cid.clone());
            async move { index.reload_connection(&*host, &cid).await }
        });
        host.read.notified().await;
        index.reload_all(&*host).await.unwrap();
        host.release.notify_one();
        own.await.unwrap().unwrap();

        assert_eq!(
            routed_by_default(&index, "acc-A"),
            std::slice::from_ref(&cid)
        );
        assert_eq!(index.known(""), std::slice::from_ref(&cid));
    }

    #[tokio::test]
    async fn a_connection_read_as_deleted_loses_its_route_at_once_and_a_full_reload_does_not_bring_it_back()
     {
        let (_dir, inner, kept, deleted) = two_on_one_account().await;
        let host = Arc::new(TestHost::over(inner));
        let index = Arc::new(RoutingIndex::new(Some(Secret::new("default-secret"))));
        index.reload_all(&*host).await.unwrap();
        let routed = || routed_by_default(&index, "acc-A");
        assert_eq!(routed().len(), 2);

        // A full reload starts before the remote host deletes the connection (it still
        // lists it), and ends after the deletion was read.
        host.hold_find
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let full = spawn_full_reload(&index, &host);
        host.find_started.notified().await;
        *host.missing.lock().unwrap() = Some(deleted.clone());
        assert!(matches!(
            index.reload_connection(&*host, &deleted).await,
            Err(HostError::NotFound(_))
        ));
        assert_eq!(routed(), std::slice::from_ref(&kept), "gone at once");
        host.find_release.notify_one();
        full.await.unwrap().unwrap();
        assert_eq!(routed(), std::slice::from_ref(&kept), "and stays gone");
    }

    #[tokio::test]
    async fn a_failed_read_of_a_routed_connection_does_not_undo_what_a_full_reload_read_meanwhile()
    {
        let (_dir, inner, moved, other) = two_on_one_account().await;
        let host = Arc::new(TestHost::over(inner));
        let index = Arc::new(RoutingIndex::new(Some(Secret::new("default-secret"))));
        index.reload_all(&*host).await.unwrap();

        // The connection moves to another account; a full reload starts (held at its
        // listing), and the change's own read fails (the host hiccups).
        host.inner
            .set_vars(&moved, vec![Var::plain("account_id", "acc-B")])
            .await
            .unwrap();
        host.hold_find
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let full = spawn_full_reload(&index, &host);
        host.find_started.notified().await;
        *host.failing.lock().unwrap() = Some(moved.clone());
        assert!(index.reload_connection(&*host, &moved).await.is_err());
        *host.failing.lock().unwrap() = None;
        // The full reload reads the new account: it wins over the read that learned nothing.
        host.find_release.notify_one();
        full.await.unwrap().unwrap();
        assert_eq!(
            routed_by_default(&index, "acc-B"),
            std::slice::from_ref(&moved)
        );
        assert_eq!(
            routed_by_default(&index, "acc-A"),
            std::slice::from_ref(&other)
        );
    }

    #[tokio::test]
    async fn a_routed_connection_keeps_its_route_through_a_failed_read_of_its_own() {
        let (_dir, inner, kept, deleted) = two_on_one_account().await;
        let host = TestHost::over(inner);
        let index = RoutingIndex::new(Some(Secret::new("default-secret")));
        index.reload_all(&host).await.unwrap();
        assert_eq!(index.snapshot().unwrap().connection_count(), 2);

        // The next reload cannot read `kept` (the host hiccups), and `deleted` is gone.
        *host.failing.lock().unwrap() = Some(kept.clone());
        host.inner.delete_vars(&deleted, &[]).await.unwrap();
        index.reload_all(&host).await.unwrap();
        assert_eq!(
            routed_by_default(&index, "acc-A"),
            std::slice::from_ref(&kept)
        );
    }

    #[tokio::test]
    async fn a_new_connection_that_cannot_be_read_unsettles_routing_until_read_or_for_ten_minutes()
    {
        let (_dir, inner) = host().await;
        let (routed, new) = (ConnectionId::generate(), ConnectionId::generate());
        let on_account = vec![
            Var::plain("auth_type", "oauthDefault"),
            Var::plain("account_id", "acc-A"),
        ];
        inner.set_vars(&routed, on_account.clone()).await.unwrap();
        let host = TestHost::over(inner);
        let index = RoutingIndex::new(Some(Secret::new("default-secret")));
        index.reload_all(&host).await.unwrap();
        assert!(!index.snapshot().unwrap().unsettled());

        // A routed connection that cannot be read keeps its route: nothing is unsettled.
        *host.failing.lock().unwrap() = Some(routed.clone());
        assert!(index.reload_connection(&host, &routed).await.is_err());
        assert!(!index.snapshot().unwrap().unsettled());

        // A new one, saved and then not readable, is, by its own reload and by a full one.
        host.inner.set_vars(&new, on_account).await.unwrap();
        *host.failing.lock().unwrap() = Some(new.clone());
        assert!(index.reload_connection(&host, &new).await.is_err());
        let snap = index.snapshot().unwrap();
        assert!(snap.unsettled());
        assert!(!snap.unsettled_at(Instant::now() + UNSETTLED_FOR));
        assert_eq!(index.unread(), std::slice::from_ref(&new));
        index.reload_all(&host).await.unwrap();
        assert!(index.snapshot().unwrap().unsettled());

        // Read at last: routed, and settled.
        *host.failing.lock().unwrap() = None;
        index.reload_connection(&host, &new).await.unwrap();
        let snap = index.snapshot().unwrap();
        assert!(!snap.unsettled());
        assert!(index.unread().is_empty());
        assert_eq!(snap.connection_count(), 2);

        // Deleted while unreadable: nothing left to wait for.
        let gone = ConnectionId::generate();
        *host.failing.lock().unwrap() = Some(gone.clone());
        assert!(index.reload_connection(&host, &gone).await.is_err());
        assert!(index.snapshot().unwrap().unsettled());
        *host.failing.lock().unwrap() = None;
        *host.missing.lock().unwrap() = Some(gone.clone());
        assert!(matches!(
            index.reload_connection(&host, &gone).await,
            Err(HostError::NotFound(_))
        ));
        assert!(!index.snapshot().unwrap().unsettled());
        assert!(index.unread().is_empty());
    }

    #[tokio::test]
    async fn a_failed_read_during_a_full_reload_is_not_forgotten_when_the_reload_ends() {
        let (_dir, inner) = host().await;
        let on_account = vec![
            Var::plain("auth_type", "oauthDefault"),
            Var::plain("account_id", "acc-A"),
        ];
        let routed = ConnectionId::generate();
        inner.set_vars(&routed, on_account.clone()).await.unwrap();
        let host = Arc::new(TestHost::over(inner));
        let index = Arc::new(RoutingIndex::new(Some(Secret::new("default-secret"))));
        index.reload_all(&*host).await.unwrap();

        // A full reload has listed the connections and is reading them (held back) when a
        // new one is saved and its own read fails.
        host.hold_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let full = spawn_full_reload(&index, &host);
        host.read.notified().await;
        let new = ConnectionId::generate();
        host.inner.set_vars(&new, on_account).await.unwrap();
        *host.failing.lock().unwrap() = Some(new.clone());
        assert!(index.reload_connection(&*host, &new).await.is_err());
        host.release.notify_one();
        full.await.unwrap().unwrap();
        assert_eq!(index.unread(), std::slice::from_ref(&new));
        assert!(index.snapshot().unwrap().unsettled());
    }

    #[tokio::test]
    async fn routes_follow_account_and_secret() {
        let (_dir, host) = host().await;
        let (default_a, private_a, private_b, no_account) = (
            ConnectionId::generate(),
            ConnectionId::generate(),
            ConnectionId::generate(),
            ConnectionId::generate(),
        );
        host.set_vars(
            &default_a,
            vec![
                Var::plain("auth_type", "oauthDefault"),
                Var::plain("account_id", "acc-A"),
            ],
        )
        .await
        .unwrap();
        host.set_vars(
            &private_a,
            vec![
                Var::plain("auth_type", "serverToServer"),
                Var::plain("private_account_id", "acc-A"),
                Var::secret("private_secret_token", "private-1"),
            ],
        )
        .await
        .unwrap();
        host.set_vars(
            &private_b,
            vec![
                Var::plain("auth_type", "oauthPrivate"),
                Var::plain("account_id", "acc-B"),
                Var::secret("private_secret_token", "private-1"),
            ],
        )
        .await
        .unwrap();
        host.set_vars(&no_account, vec![Var::plain("auth_type", "oauthDefault")])
            .await
            .unwrap();

        let index = RoutingIndex::new(Some(Secret::new("default-secret")));
        assert!(index.snapshot().is_none(), "not loaded yet");
        index.reload_all(&host).await.unwrap();
        let snap = index.snapshot().unwrap();
        assert_eq!(snap.secret_count(), 2);
        assert_eq!(snap.connection_count(), 3);

        let by_default = snap
            .verify(signed("default-secret", b"x").as_bytes(), b"1", b"x")
            .unwrap();
        let by_private = snap
            .verify(signed("private-1", b"x").as_bytes(), b"1", b"x")
            .unwrap();
        assert!(
            snap.verify(signed("other", b"x").as_bytes(), b"1", b"x")
                .is_none()
        );
        assert_eq!(
            snap.destinations(by_default, "acc-A"),
            std::slice::from_ref(&default_a)
        );
        assert_eq!(
            snap.destinations(by_private, "acc-A"),
            std::slice::from_ref(&private_a)
        );
        assert_eq!(
            snap.destinations(by_private, "acc-B"),
            std::slice::from_ref(&private_b)
        );
        assert!(snap.destinations(by_default, "acc-B").is_empty());

        // A connection saved later is routable as soon as it is reloaded.
        let later = ConnectionId::generate();
        host.set_vars(
            &later,
            vec![
                Var::plain("auth_type", "oauthDefault"),
                Var::plain("account_id", "acc-B"),
            ],
        )
        .await
        .unwrap();
        index.reload_connection(&host, &later).await.unwrap();
        let snap = index.snapshot().unwrap();
        let by_default = snap
            .verify(signed("default-secret", b"x").as_bytes(), b"1", b"x")
            .unwrap();
        assert_eq!(
            snap.destinations(by_default, "acc-B"),
            std::slice::from_ref(&later)
        );

        // And gone once its variables are.
        host.delete_vars(&later, &[]).await.unwrap();
        index.reload_connection(&host, &later).await.unwrap();
        let snap = index.snapshot().unwrap();
        let by_default = snap
            .verify(signed("default-secret", b"x").as_bytes(), b"1", b"x")
            .unwrap();
        assert!(snap.destinations(by_default, "acc-B").is_empty());
    }

    #[tokio::test]
    async fn candidates_are_every_secret_once_the_default_and_the_account_s_first() {
        let (_dir, host) = host().await;
        for (account, secret) in [
            ("acc-A", "s1"),
            ("acc-B", "s2"),
            ("acc-A", "s3"),
            ("acc-C", "s2"),
        ] {
            host.set_vars(
                &ConnectionId::generate(),
                vec![
                    Var::plain("auth_type", "oauthPrivate"),
                    Var::plain("account_id", account),
                    Var::secret("private_secret_token", secret),
                ],
            )
            .await
            .unwrap();
        }
        for default in [Some("default-secret"), None] {
            let index = RoutingIndex::new(default.map(Secret::new));
            index.reload_all(&host).await.unwrap();
            let snap = index.snapshot().unwrap();
            // Which secret each candidate is, by what it signs.
            let names = |account: Option<&str>| -> Vec<&str> {
                snap.candidates(account)
                    .map(|by| {
                        ["default-secret", "s1", "s2", "s3"]
                            .into_iter()
                            .find(|s| {
                                snap.verify_among([by], signed(s, b"x").as_bytes(), b"1", b"x")
                                    .is_some()
                            })
                            .unwrap()
                    })
                    .collect()
            };
            let with_default = |rest: &[&'static str]| -> Vec<&'static str> {
                default.into_iter().chain(rest.iter().copied()).collect()
            };
            let mut all = names(None);
            assert_eq!(all.len(), snap.secret_count());
            all.sort();
            let mut expected = with_default(&["s1", "s2", "s3"]);
            expected.sort();
            assert_eq!(all, expected, "each secret once");

            let first = |account| names(Some(account))[..].to_vec();
            let a = first("acc-A");
            assert_eq!(a.len(), snap.secret_count());
            let likely = with_default(&[]).len() + 2;
            let mut head = a[..likely].to_vec();
            head.sort();
            let mut expected = with_default(&["s1", "s3"]);
            expected.sort();
            assert_eq!(head, expected);
            assert_eq!(&a[likely..], ["s2"]);
            assert_eq!(first("acc-C")[..likely - 1], with_default(&["s2"])[..]);
            assert_eq!(first("nobody").len(), snap.secret_count());
        }
    }

    #[tokio::test]
    async fn with_no_secret_at_all_nothing_verifies() {
        let (_dir, host) = host().await;
        let index = RoutingIndex::new(None);
        index.reload_all(&host).await.unwrap();
        let snap = index.snapshot().unwrap();
        assert_eq!(snap.secret_count(), 0);
        assert!(
            snap.verify(signed("", b"x").as_bytes(), b"1", b"x")
                .is_none()
        );
    }
}
