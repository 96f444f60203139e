//! The connection form (`/zoom/save`) and the page's query, checked before anything is
//! stored or sent anywhere.

use serde::Deserialize;

use crate::config::OAuthApp;
use crate::connection::AuthType;
use crate::ids::ConnectionId;
use crate::secret::{Raw, Secret, presence};

/// The longest id accepted (account id, client id).
pub const MAX_ID_LEN: usize = 128;
/// The longest secret accepted (client secret, secret token).
pub const MAX_SECRET_LEN: usize = 512;
/// The longest `origin` accepted.
pub const MAX_ORIGIN_LEN: usize = 32;

/// Whether a URL's `query` carries a secret field with a value: `GET /zoom/save` takes the
/// form from the query (the contract names it), which suits the default app only.
pub fn secrets_in_query(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .any(|(k, v)| (k == "client_secret" || k == "secret_token") && !v.is_empty())
    })
}

/// The form as sent: every field optional text, so that a missing field gets our message.
/// `Debug` hides the grant and the secret fields.
#[derive(Default, Deserialize)]
pub struct RawForm {
    cid: Option<String>,
    origin: Option<String>,
    grant: Option<String>,
    auth_type: Option<String>,
    account_id: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    secret_token: Option<String>,
}

impl std::fmt::Debug for RawForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawForm")
            .field("cid", &self.cid)
            .field("origin", &self.origin)
            .field("grant", &Raw(presence(&self.grant)))
            .field("auth_type", &self.auth_type)
            .field("account_id", &self.account_id)
            .field("client_id", &self.client_id)
            .field("client_secret", &Raw(presence(&self.client_secret)))
            .field("secret_token", &Raw(presence(&self.secret_token)))
            .finish()
    }
}

/// `cid` and `origin`, as the page and `/oauth/start/zoom` take them. `Debug` hides the grant.
#[derive(Default, Deserialize)]
pub struct RawTarget {
    cid: Option<String>,
    origin: Option<String>,
    grant: Option<String>,
}

impl std::fmt::Debug for RawTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawTarget")
            .field("cid", &self.cid)
            .field("origin", &self.origin)
            .field("grant", &Raw(presence(&self.grant)))
            .finish()
    }
}

/// Which connection is being set up, and where the host wants the browser at the end.
/// `Debug` hides the grant.
#[derive(Clone)]
pub struct Target {
    /// The connection.
    pub cid: ConnectionId,
    /// `web`, `dash`, `vscode`, … or empty.
    pub origin: String,
    /// The signed setup link's grant, if the request carried one (see [`super::links`]).
    pub grant: Option<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("cid", &self.cid)
            .field("origin", &self.origin)
            .field("grant", &Raw(presence(&self.grant)))
            .finish()
    }
}

/// A private app's fields.
#[derive(Debug, Clone)]
pub struct PrivateApp {
    /// Client id and secret.
    pub app: OAuthApp,
    /// Webhook secret token, if given.
    pub secret_token: Option<Secret>,
}

/// What the form asks for.
#[derive(Debug, Clone)]
pub enum Choice {
    /// The default OAuth app.
    Default,
    /// A private OAuth app.
    Private(PrivateApp),
    /// A private Server-to-Server app of `account_id`.
    ServerToServer {
        /// The app.
        app: PrivateApp,
        /// The Zoom account id.
        account_id: String,
    },
}

/// A checked form.
#[derive(Debug, Clone)]
pub struct SetupForm {
    /// Which connection.
    pub target: Target,
    /// What to do.
    pub choice: Choice,
}

/// A form problem, said so people can fix it. Never contains the value of a secret field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormError(pub String);

impl RawTarget {
    /// Checks `cid` and `origin`.
    pub fn check(self) -> Result<Target, FormError> {
        check_target(self.cid, self.origin, self.grant)
    }
}

fn check_target(
    cid: Option<String>,
    origin: Option<String>,
    grant: Option<String>,
) -> Result<Target, FormError> {
    let cid = ConnectionId::parse(cid.as_deref().unwrap_or_default().trim())
        .map_err(|e| FormError(format!("{e} (the cid parameter)")))?;
    let origin = origin.unwrap_or_default();
    let origin = origin.trim();
    check_origin(origin)?;
    // A grant is hex, digits and dots; anything else cannot be one (and is not echoed).
    let grant = grant.filter(|g| {
        !g.is_empty() && g.len() <= 128 && g.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
    });
    Ok(Target {
        cid,
        origin: origin.to_string(),
        grant,
    })
}

/// Checks an `origin`: at most [`MAX_ORIGIN_LEN`] letters, digits or `_` (it ends up in URLs).
pub fn check_origin(origin: &str) -> Result<(), FormError> {
    if origin.len() > MAX_ORIGIN_LEN
        || !origin
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(FormError(format!(
            "origin must be at most {MAX_ORIGIN_LEN} letters, digits or _"
        )));
    }
    Ok(())
}

impl RawForm {
    /// Checks every field the chosen authentication type needs, and ignores the others.
    pub fn check(self) -> Result<SetupForm, FormError> {
        let target = check_target(self.cid, self.origin, self.grant)?;
        let auth_type: AuthType = self
            .auth_type
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| FormError("choose an authentication type".into()))?
            .parse()
            .map_err(|_| {
                FormError(
                    "authentication type must be oauthDefault, oauthPrivate or serverToServer"
                        .into(),
                )
            })?;
        let private = |client_id: Option<String>,
                       client_secret: Option<String>,
                       secret_token: Option<String>| {
            Ok::<_, FormError>(PrivateApp {
                app: OAuthApp {
                    client_id: id_field("Client ID", client_id)?,
                    client_secret: Secret::new(secret_field("Client secret", client_secret)?),
                },
                secret_token: optional_secret_field("Secret token", secret_token)?.map(Secret::new),
            })
        };
        let choice = match auth_type {
            AuthType::OAuthDefault => Choice::Default,
            AuthType::OAuthPrivate => Choice::Private(private(
                self.client_id,
                self.client_secret,
                self.secret_token,
            )?),
            AuthType::ServerToServer => {
                let account_id = id_field("Account ID", self.account_id)?;
                Choice::ServerToServer {
                    app: private(self.client_id, self.client_secret, self.secret_token)?,
                    account_id,
                }
            }
        };
        Ok(SetupForm { target, choice })
    }
}

/// A required id: letters, digits, `-` and `_`.
fn id_field(label: &str, value: Option<String>) -> Result<String, FormError> {
    let value = value.unwrap_or_default();
    let value = value.trim();
    if value.is_empty() {
        return Err(FormError(format!("{label} is required")));
    }
    if value.len() > MAX_ID_LEN {
        return Err(FormError(format!(
            "{label} is too long (at most {MAX_ID_LEN} characters)"
        )));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(FormError(format!(
            "{label} may contain only letters, digits, - and _"
        )));
    }
    Ok(value.to_string())
}

/// A required secret: printable text without spaces or control characters.
fn secret_field(label: &str, value: Option<String>) -> Result<String, FormError> {
    optional_secret_field(label, value)?.ok_or_else(|| FormError(format!("{label} is required")))
}

fn optional_secret_field(label: &str, value: Option<String>) -> Result<Option<String>, FormError> {
    let value = value.unwrap_or_default();
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > MAX_SECRET_LEN {
        return Err(FormError(format!(
            "{label} is too long (at most {MAX_SECRET_LEN} characters)"
        )));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(FormError(format!(
            "{label} must not contain spaces or control characters"
        )));
    }
    Ok(Some(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_names_no_grant_or_secret() {
        let raw = form(&[
            ("grant", "GRANT-VALUE"),
            ("client_id", "client-id"),
            ("client_secret", "CLIENT-SECRET-VALUE"),
            ("secret_token", "SECRET-TOKEN-VALUE"),
        ]);
        let target = RawTarget {
            cid: raw.cid.clone(),
            origin: None,
            grant: Some("GRANT-VALUE".into()),
        };
        let checked = Target {
            cid: ConnectionId::generate(),
            origin: "web".into(),
            grant: Some("GRANT-VALUE".into()),
        };
        let printed = format!("{raw:?} {target:?} {checked:?}");
        for secret in ["GRANT-VALUE", "CLIENT-SECRET-VALUE", "SECRET-TOKEN-VALUE"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(printed.contains("client-id") && printed.contains("Some([redacted])"));
    }

    fn form(pairs: &[(&str, &str)]) -> RawForm {
        let mut f = RawForm {
            cid: Some(ConnectionId::generate().to_string()),
            ..RawForm::default()
        };
        for (k, v) in pairs {
            let v = Some(v.to_string());
            match *k {
                "cid" => f.cid = v,
                "origin" => f.origin = v,
                "grant" => f.grant = v,
                "auth_type" => f.auth_type = v,
                "account_id" => f.account_id = v,
                "client_id" => f.client_id = v,
                "client_secret" => f.client_secret = v,
                "secret_token" => f.secret_token = v,
                _ => unreachable!(),
            }
        }
        f
    }

    #[test]
    fn each_choice_needs_its_own_fields() {
        assert!(matches!(
            form(&[("auth_type", "oauthDefault"), ("client_id", "ignored!")])
                .check()
                .unwrap()
                .choice,
            Choice::Default
        ));
        let err = form(&[("auth_type", "oauthPrivate"), ("client_id", "abc")])
            .check()
            .unwrap_err();
        assert_eq!(err.0, "Client secret is required");
        let err = form(&[
            ("auth_type", "serverToServer"),
            ("client_id", "abc"),
            ("client_secret", "s"),
        ])
        .check()
        .unwrap_err();
        assert_eq!(err.0, "Account ID is required");
        let ok = form(&[
            ("auth_type", "serverToServer"),
            ("account_id", " acc-1_x "),
            ("client_id", "abc"),
            ("client_secret", "s3cr3t"),
            ("secret_token", ""),
        ])
        .check()
        .unwrap();
        let Choice::ServerToServer { app, account_id } = ok.choice else {
            panic!("S2S expected")
        };
        assert_eq!(account_id, "acc-1_x");
        assert!(app.secret_token.is_none());
    }

    #[test]
    fn bad_values_are_refused_without_echoing_secrets() {
        let cases: &[&[(&str, &str)]] = &[
            &[("auth_type", "basic")],
            &[],
            &[("auth_type", "oauthDefault"), ("cid", "con_nope")],
            &[("auth_type", "oauthDefault"), ("origin", "https://evil")],
            &[
                ("auth_type", "oauthPrivate"),
                ("client_id", "a b"),
                ("client_secret", "s"),
            ],
            &[
                ("auth_type", "oauthPrivate"),
                ("client_id", &"a".repeat(129)),
                ("client_secret", "s"),
            ],
            &[
                ("auth_type", "oauthPrivate"),
                ("client_id", "a"),
                ("client_secret", "top\u{7}secret"),
            ],
        ];
        for case in cases {
            let err = form(case).check().unwrap_err();
            assert!(!err.0.contains("top\u{7}secret"), "{err}");
            assert!(!err.0.is_empty());
        }
    }
}
