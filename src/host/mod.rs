//! The host engine: where connection variables live and where events go.
//!
//! One trait, two implementations: [`embedded::EmbeddedHost`] (a SQLite file under `DATA_DIR`,
//! the default) and [`remote::RemoteHost`] (an AutoKitteh-compatible host over gRPC).

pub mod embedded;
pub mod remote;

use std::fmt;

use async_trait::async_trait;

use crate::ids::ConnectionId;
use crate::proto::autokitteh::events::v1::Event;

/// One connection variable.
#[derive(Clone, PartialEq, Eq)]
pub struct Var {
    /// Variable name, e.g. `auth_type`.
    pub name: String,
    /// Its value (plaintext in memory; secrets are encrypted at rest by the embedded host).
    pub value: String,
    /// Secret variables are encrypted at rest and never logged.
    pub is_secret: bool,
    /// Free text for people reading the host's UI.
    pub description: String,
}

impl Var {
    /// A non-secret variable.
    pub fn plain(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
            is_secret: false,
            description: String::new(),
        }
    }

    /// A secret variable.
    pub fn secret(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            is_secret: true,
            ..Self::plain(name, value)
        }
    }
}

impl fmt::Debug for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value: &dyn fmt::Debug = if self.is_secret {
            &"[redacted]"
        } else {
            &self.value
        };
        f.debug_struct("Var")
            .field("name", &self.name)
            .field("value", value)
            .field("is_secret", &self.is_secret)
            .finish()
    }
}

/// What went wrong talking to the host engine.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The request itself is wrong (bad name, oversized value, malformed id).
    #[error("{0}")]
    InvalidArgument(String),
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The host engine cannot be reached or is overloaded; worth retrying later.
    #[error("host engine unavailable: {0}")]
    Unavailable(String),
    /// The embedded database failed.
    #[error("embedded database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// A stored secret did not decrypt.
    #[error("stored secret {name:?} of {scope} cannot be decrypted")]
    Undecryptable {
        /// The connection the variable belongs to.
        scope: String,
        /// The variable's name.
        name: String,
    },
    /// The remote host engine answered with an error we do not map.
    #[error("host engine error: {0}")]
    Remote(String),
    /// Anything else inside this process (a panicked worker, a corrupt stored event).
    #[error("{0}")]
    Internal(String),
}

impl HostError {
    /// What callers are told of a stored secret that does not decrypt: which one, and the way
    /// out (retrying cannot help).
    pub fn with_way_out(&self) -> String {
        format!("{self}: set the connection up again")
    }
}

/// The host engine, as this service uses it.
#[async_trait]
pub trait HostEngine: Send + Sync + 'static {
    /// `embedded` or `remote`, for logs and readiness.
    fn kind(&self) -> &'static str;

    /// The variables of `scope` named in `names`, or all of them when `names` is empty.
    /// Missing names are simply absent from the answer.
    async fn get_vars(&self, scope: &ConnectionId, names: &[String])
    -> Result<Vec<Var>, HostError>;

    /// Sets `vars` on `scope`, all or none.
    async fn set_vars(&self, scope: &ConnectionId, vars: Vec<Var>) -> Result<(), HostError>;

    /// Deletes the variables named `names` from `scope` (all of them when `names` is empty).
    async fn delete_vars(&self, scope: &ConnectionId, names: &[String]) -> Result<(), HostError>;

    /// Sets `vars` on `scope` and deletes the variables named `remove` (none when empty), as
    /// one change where the host can do that; otherwise setting comes first, so a failure
    /// half-way leaves the new values, never a connection without them (the delete is tried
    /// again while the host is briefly unavailable). A name both set and removed keeps its
    /// new value.
    async fn replace_vars(
        &self,
        scope: &ConnectionId,
        vars: Vec<Var>,
        remove: &[String],
    ) -> Result<(), HostError> {
        let remove = not_set(remove, &vars);
        self.set_vars(scope, vars).await?;
        if remove.is_empty() {
            return Ok(());
        }
        // The new values have landed: a brief outage now would leave stale ones beside them
        // (an old connection_error, another app's secret token), so the delete is retried.
        let mut attempt = 1;
        loop {
            match self.delete_vars(scope, &remove).await {
                Err(HostError::Unavailable(_)) if attempt < DELETE_ATTEMPTS => {
                    tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(attempt)))
                        .await;
                    attempt += 1;
                }
                deleted => return deleted,
            }
        }
    }

    /// [`replace_vars`](Self::replace_vars), only while `scope` is still set up (it has an
    /// `auth_type`), else `NotFound`: tokens a refresh obtained, or a broken mark written,
    /// while the connection was being deleted must not bring it back. The default reads, then
    /// replaces: a remote host offers nothing atomic, so a delete landing within that one
    /// round trip can still be undone.
    async fn replace_vars_if_set_up(
        &self,
        scope: &ConnectionId,
        vars: Vec<Var>,
        remove: &[String],
    ) -> Result<(), HostError> {
        let found = self
            .get_vars(scope, &[crate::connection::vars::AUTH_TYPE.to_string()])
            .await?;
        if crate::connection::value_of(&found, crate::connection::vars::AUTH_TYPE).is_none() {
            return Err(not_set_up(scope));
        }
        self.replace_vars(scope, vars, remove).await
    }

    /// [`replace_vars_if_set_up`](Self::replace_vars_if_set_up), only while the variable
    /// `name` holds one of `current`; answers `Ok(false)`, having written nothing, when it
    /// holds something else or nothing. A refreshed token pair is saved this way, so it never
    /// lands over a refresh token stored by someone else meanwhile, and a refused one's
    /// tokens are removed this way, so a live pair stored meanwhile stays. The default reads,
    /// then writes.
    async fn replace_vars_if_current(
        &self,
        scope: &ConnectionId,
        vars: Vec<Var>,
        remove: &[String],
        name: &str,
        current: &[&str],
    ) -> Result<bool, HostError> {
        use crate::connection::{value_of, vars::AUTH_TYPE};
        let names = [AUTH_TYPE.to_string(), name.to_string()];
        let found = self.get_vars(scope, &names).await?;
        if value_of(&found, AUTH_TYPE).is_none() {
            return Err(not_set_up(scope));
        }
        if !value_of(&found, name).is_some_and(|v| current.contains(&v)) {
            return Ok(false);
        }
        // A remote host has no compare-and-set: a value stored by someone else between the
        // read above and this write (one round trip) is overwritten. The window is narrow,
        // and the alternative, never saving, would lose a rotated refresh token for sure.
        self.replace_vars(scope, vars, remove).await?;
        Ok(true)
    }

    /// Connections of this integration with a variable `name` (any, when empty) whose value is
    /// `value` (any, when empty). A remote AutoKitteh host names only the active ones: org-level
    /// connections and those of projects with an active deployment.
    async fn find_connections(
        &self,
        name: &str,
        value: &str,
    ) -> Result<Vec<ConnectionId>, HostError>;

    /// Hands one event to the host; returns the host's event id.
    async fn dispatch(&self, event: Event) -> Result<String, HostError>;

    /// Succeeds when the host engine is reachable and working.
    async fn check(&self) -> Result<(), HostError>;
}

/// The names in `remove` that `vars` does not set: a name both set and removed keeps its new
/// value.
pub(crate) fn not_set(remove: &[String], vars: &[Var]) -> Vec<String> {
    remove
        .iter()
        .filter(|name| !vars.iter().any(|v| &v.name == *name))
        .cloned()
        .collect()
}

/// What [`HostEngine::replace_vars_if_set_up`] answers for a connection no longer set up.
pub fn not_set_up(scope: &ConnectionId) -> HostError {
    HostError::NotFound(format!("connection {scope} is no longer set up"))
}

/// How many times the default [`HostEngine::replace_vars`] tries its delete.
const DELETE_ATTEMPTS: u32 = 3;

/// The longest variable name accepted.
pub const MAX_VAR_NAME: usize = 128;
/// The largest variable value accepted, in bytes: AutoKitteh's default `max_value_size`, so
/// what the embedded host takes a real host takes too, and a value too large for one fails
/// here with its name rather than as the host's error.
pub const MAX_VAR_VALUE: usize = 8092;

/// Checks a variable name: an identifier of ASCII letters, digits and `_`, not starting with a digit.
pub fn check_var_name(name: &str) -> Result<(), HostError> {
    let mut chars = name.chars();
    let valid = name.len() <= MAX_VAR_NAME
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(HostError::InvalidArgument(format!(
            "variable name {:?} is invalid: use letters, digits and _ (at most {MAX_VAR_NAME})",
            crate::ids::truncate(name, 64)
        )))
    }
}

/// Checks a variable before it is stored.
pub fn check_var(var: &Var) -> Result<(), HostError> {
    check_var_name(&var.name)?;
    if var.value.len() > MAX_VAR_VALUE {
        return Err(HostError::InvalidArgument(format!(
            "variable {:?} is larger than {MAX_VAR_VALUE} bytes",
            var.name
        )));
    }
    if var.description.len() > 1024 {
        return Err(HostError::InvalidArgument(format!(
            "description of variable {:?} is longer than 1024 bytes",
            var.name
        )));
    }
    Ok(())
}

/// Each variable's name and value, in order: what tests compare.
#[cfg(test)]
pub(crate) fn names_and_values(vars: &[Var]) -> Vec<(&str, &str)> {
    vars.iter()
        .map(|v| (v.name.as_str(), v.value.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded host through the trait's own `replace_vars` (as a remote host uses it).
    struct Defaults(embedded::EmbeddedHost);

    #[async_trait]
    impl HostEngine for Defaults {
        fn kind(&self) -> &'static str {
            "test"
        }
        async fn get_vars(&self, s: &ConnectionId, n: &[String]) -> Result<Vec<Var>, HostError> {
            self.0.get_vars(s, n).await
        }
        async fn set_vars(&self, s: &ConnectionId, v: Vec<Var>) -> Result<(), HostError> {
            self.0.set_vars(s, v).await
        }
        async fn delete_vars(&self, s: &ConnectionId, n: &[String]) -> Result<(), HostError> {
            self.0.delete_vars(s, n).await
        }
        async fn find_connections(&self, n: &str, v: &str) -> Result<Vec<ConnectionId>, HostError> {
            self.0.find_connections(n, v).await
        }
        async fn dispatch(&self, e: Event) -> Result<String, HostError> {
            self.0.dispatch(e).await
        }
        async fn check(&self) -> Result<(), HostError> {
            Ok(())
        }
    }

    /// An embedded host in a temporary directory (kept as long as the first value lives), for
    /// the tests to compare with [`Defaults`] over it.
    fn embedded_host() -> (tempfile::TempDir, embedded::EmbeddedHost) {
        let dir = tempfile::tempdir().unwrap();
        let keys = std::sync::Arc::new(crate::crypto::Keys::from_material(
            b"host test key material, 32+ bytes",
        ));
        let embedded = embedded::EmbeddedHost::open(dir.path(), keys).unwrap();
        (dir, embedded)
    }

    #[tokio::test]
    async fn a_name_both_set_and_removed_keeps_its_new_value_in_every_host() {
        let (_dir, embedded) = embedded_host();
        let hosts: [&dyn HostEngine; 2] = [&embedded, &Defaults(embedded.clone())];
        for host in hosts {
            let cid = ConnectionId::generate();
            host.set_vars(&cid, vec![Var::plain("a", "old"), Var::plain("b", "old")])
                .await
                .unwrap();
            host.replace_vars(
                &cid,
                vec![Var::plain("a", "new")],
                &["a".to_string(), "b".to_string()],
            )
            .await
            .unwrap();
            let left = host.get_vars(&cid, &[]).await.unwrap();
            let left = names_and_values(&left);
            assert_eq!(left, [("a", "new")], "{}", host.kind());
        }
    }

    #[tokio::test]
    async fn a_conditional_replace_writes_nothing_on_a_connection_no_longer_set_up() {
        let (_dir, embedded) = embedded_host();
        let hosts: [&dyn HostEngine; 2] = [&embedded, &Defaults(embedded.clone())];
        let auth_type = crate::connection::vars::AUTH_TYPE;
        for host in hosts {
            let (kept, deleted) = (ConnectionId::generate(), ConnectionId::generate());
            for cid in [&kept, &deleted] {
                let setup = vec![
                    Var::plain(auth_type, "oauthDefault"),
                    Var::plain("t", "old"),
                ];
                host.set_vars(cid, setup).await.unwrap();
            }
            host.delete_vars(&deleted, &[]).await.unwrap();
            let mark = || vec![Var::plain("connection_error", "broken")];
            let t = ["t".to_string()];
            let refused = host.replace_vars_if_set_up(&deleted, mark(), &t).await;
            assert!(
                matches!(refused, Err(HostError::NotFound(_))),
                "{}: {refused:?}",
                host.kind()
            );
            assert!(host.get_vars(&deleted, &[]).await.unwrap().is_empty());
            host.replace_vars_if_set_up(&kept, mark(), &t)
                .await
                .unwrap();
            let left = host.get_vars(&kept, &[]).await.unwrap();
            let left = names_and_values(&left);
            assert_eq!(
                left,
                [(auth_type, "oauthDefault"), ("connection_error", "broken")],
                "{}",
                host.kind()
            );
        }
    }

    #[tokio::test]
    async fn a_replace_if_current_writes_only_over_one_of_the_values_it_was_given() {
        let (_dir, embedded) = embedded_host();
        let hosts: [&dyn HostEngine; 2] = [&embedded, &Defaults(embedded.clone())];
        let auth_type = crate::connection::vars::AUTH_TYPE;
        for host in hosts {
            let cid = ConnectionId::generate();
            let setup = vec![
                Var::plain(auth_type, "oauthDefault"),
                Var::secret("refresh", "r1"),
            ];
            host.set_vars(&cid, setup).await.unwrap();
            let pair = |r: &str| vec![Var::plain("access", r), Var::secret("refresh", r)];
            let kind = host.kind();
            // Someone else stored r1's successor meanwhile: ours (from r0) is not written.
            let written = host
                .replace_vars_if_current(&cid, pair("r9"), &[], "refresh", &["r0", "r9"])
                .await;
            assert!(!written.unwrap(), "{kind}");
            let stored = host.get_vars(&cid, &[]).await.unwrap();
            assert_eq!(
                names_and_values(&stored),
                [(auth_type, "oauthDefault"), ("refresh", "r1")],
                "{kind}"
            );
            // Over the value it started from, or over itself (saved already), it is.
            for current in ["r1", "r2"] {
                let written = host
                    .replace_vars_if_current(&cid, pair("r2"), &[], "refresh", &[current, "r2"])
                    .await;
                assert!(written.unwrap(), "{kind}");
            }
            let stored = host.get_vars(&cid, &[]).await.unwrap();
            assert_eq!(
                names_and_values(&stored),
                [
                    ("access", "r2"),
                    (auth_type, "oauthDefault"),
                    ("refresh", "r2")
                ],
                "{kind}"
            );
            // Removing goes by the same condition.
            let dead = ["access".to_string(), "refresh".to_string()];
            let mark = || vec![Var::plain("connection_error", "broken")];
            for (over, removed) in [("r1", false), ("r2", true)] {
                let written = host
                    .replace_vars_if_current(&cid, mark(), &dead, "refresh", &[over])
                    .await;
                assert_eq!(written.unwrap(), removed, "{kind}");
            }
            let stored = host.get_vars(&cid, &[]).await.unwrap();
            assert_eq!(
                names_and_values(&stored),
                [(auth_type, "oauthDefault"), ("connection_error", "broken")],
                "{kind}"
            );
            // Nothing stored under the name: not written either; deleted: not set up.
            let written = host
                .replace_vars_if_current(&cid, pair("r3"), &[], "other", &["broken"])
                .await;
            assert!(!written.unwrap(), "{kind}");
            host.delete_vars(&cid, &[]).await.unwrap();
            let refused = host
                .replace_vars_if_current(&cid, pair("r3"), &[], "refresh", &["r2"])
                .await;
            assert!(matches!(refused, Err(HostError::NotFound(_))), "{kind}");
            assert!(host.get_vars(&cid, &[]).await.unwrap().is_empty(), "{kind}");
        }
    }
}
