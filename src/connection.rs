//! A Zoom connection as its variables describe it: the names of those variables, the three
//! kinds of authentication, and the status a host engine shows for it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::host::Var;

/// Names of connection variables, as fixed by the contract.
pub mod vars {
    /// How the connection authenticates: see [`super::AuthType`].
    pub const AUTH_TYPE: &str = "auth_type";
    /// Private apps: the Zoom account id (Server-to-Server needs it to get tokens).
    pub const PRIVATE_ACCOUNT_ID: &str = "private_account_id";
    /// Private apps: client id.
    pub const PRIVATE_CLIENT_ID: &str = "private_client_id";
    /// Private apps: client secret (secret).
    pub const PRIVATE_CLIENT_SECRET: &str = "private_client_secret";
    /// Private apps: webhook secret token (secret).
    pub const PRIVATE_SECRET_TOKEN: &str = "private_secret_token";
    /// OAuth access token (secret).
    pub const OAUTH_ACCESS_TOKEN: &str = "oauth_access_token";
    /// OAuth refresh token (secret).
    pub const OAUTH_REFRESH_TOKEN: &str = "oauth_refresh_token";
    /// When the access token expires, RFC 3339.
    pub const OAUTH_EXPIRY: &str = "oauth_expiry";
    /// Usually `bearer`.
    pub const OAUTH_TOKEN_TYPE: &str = "oauth_token_type";
    /// Default-app connections: the client id of the default app (`ZOOM_CLIENT_ID`) that
    /// issued the tokens; only that app can refresh them.
    pub const OAUTH_CLIENT_ID: &str = "oauth_client_id";
    /// The Zoom account the connection belongs to; routes webhooks.
    pub const ACCOUNT_ID: &str = "account_id";
    /// The Zoom user who authorized the connection.
    pub const USER_ID: &str = "user_id";
    /// The Zoom user in words (name and e-mail), for the connection page.
    pub const USER_NAME: &str = "user_name";
    /// Set when the connection stopped working and needs to be set up again; the value says why.
    pub const CONNECTION_ERROR: &str = "connection_error";
    /// Set while Zoom refuses the connection's token requests for a reason other than a dead
    /// grant (a private app's client id or secret, say): the value says why. Token requests
    /// go on (after a back-off); the next token Zoom issues, or a new setup, clears it.
    pub const TOKEN_ERROR: &str = "token_error";

    /// Every variable that connection setup writes; a new setup replaces all of them, so
    /// nothing of an earlier authentication type is left behind.
    pub const MANAGED: &[&str] = &[
        AUTH_TYPE,
        PRIVATE_ACCOUNT_ID,
        PRIVATE_CLIENT_ID,
        PRIVATE_CLIENT_SECRET,
        PRIVATE_SECRET_TOKEN,
        OAUTH_ACCESS_TOKEN,
        OAUTH_REFRESH_TOKEN,
        OAUTH_EXPIRY,
        OAUTH_TOKEN_TYPE,
        OAUTH_CLIENT_ID,
        ACCOUNT_ID,
        USER_ID,
        USER_NAME,
        CONNECTION_ERROR,
        TOKEN_ERROR,
    ];

    /// Variables that are stored with `is_secret = true`.
    pub const SECRETS: &[&str] = &[
        PRIVATE_CLIENT_SECRET,
        PRIVATE_SECRET_TOKEN,
        OAUTH_ACCESS_TOKEN,
        OAUTH_REFRESH_TOKEN,
    ];
}

/// How a connection authenticates with Zoom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthType {
    /// The server-wide default OAuth app (`ZOOM_CLIENT_ID`).
    OAuthDefault,
    /// The connection's own OAuth app.
    OAuthPrivate,
    /// The connection's own Server-to-Server app (`account_credentials` grant).
    ServerToServer,
}

impl AuthType {
    /// The value stored in `auth_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthType::OAuthDefault => "oauthDefault",
            AuthType::OAuthPrivate => "oauthPrivate",
            AuthType::ServerToServer => "serverToServer",
        }
    }

    /// In words, for people.
    pub fn describe(self) -> &'static str {
        match self {
            AuthType::OAuthDefault => "default OAuth app",
            AuthType::OAuthPrivate => "private OAuth app",
            AuthType::ServerToServer => "private Server-to-Server app",
        }
    }
}

impl fmt::Display for AuthType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `auth_type` value this service does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown auth type")]
pub struct UnknownAuthType;

impl FromStr for AuthType {
    type Err = UnknownAuthType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "oauthDefault" => Ok(AuthType::OAuthDefault),
            "oauthPrivate" => Ok(AuthType::OAuthPrivate),
            "serverToServer" => Ok(AuthType::ServerToServer),
            _ => Err(UnknownAuthType),
        }
    }
}

/// `autokitteh.common.v1.Status`.
pub use crate::proto::autokitteh::common::v1::Status;
/// Status codes of `autokitteh.common.v1.Status`.
pub use crate::proto::autokitteh::common::v1::status::Code as StatusCode;

/// A status with a message.
pub fn status(code: StatusCode, message: impl Into<String>) -> Status {
    Status {
        code: code.into(),
        message: message.into(),
    }
}

/// The status of a connection that has not been set up.
pub fn init_required() -> Status {
    status(StatusCode::InitRequired, "Init required")
}

/// The value of the variable `name` among `vars`, if it is there and not empty.
pub fn value_of<'a>(vars: &'a [Var], name: &str) -> Option<&'a str> {
    vars.iter()
        .find(|v| v.name == name)
        .map(|v| v.value.as_str())
        .filter(|v| !v.is_empty())
}

/// The status of a connection with these variables.
pub fn connection_status(vars: &[Var]) -> Status {
    let get = |name: &str| value_of(vars, name);
    if let Some(reason) = get(vars::CONNECTION_ERROR) {
        return status(StatusCode::Error, reason);
    }
    let Some(auth_type) = get(vars::AUTH_TYPE) else {
        return init_required();
    };
    let Ok(auth_type) = auth_type.parse::<AuthType>() else {
        return status(
            StatusCode::Error,
            format!(
                "unknown auth type {:?}: set the connection up again",
                crate::ids::truncate(auth_type, 32)
            ),
        );
    };
    let needs_token = matches!(auth_type, AuthType::OAuthDefault | AuthType::OAuthPrivate);
    if needs_token
        && get(vars::OAUTH_REFRESH_TOKEN).is_none()
        && get(vars::OAUTH_ACCESS_TOKEN).is_none()
    {
        return status(
            StatusCode::Error,
            format!(
                "using {}, but no OAuth token is stored: reconnect",
                auth_type.describe()
            ),
        );
    }
    if let Some(reason) = get(vars::TOKEN_ERROR) {
        return status(StatusCode::Error, reason);
    }
    status(StatusCode::Ok, format!("using {}", auth_type.describe()))
}

/// Why a connection set up with the default OAuth app cannot use the one configured now
/// (`configured`: its client id, if any), if it cannot: none is configured, or the tokens were
/// issued to another app (`oauth_client_id`), whose refresh token this one would see refused.
pub fn default_app_mismatch(vars: &[Var], configured: Option<&str>) -> Option<String> {
    if value_of(vars, vars::AUTH_TYPE) != Some(AuthType::OAuthDefault.as_str()) {
        return None;
    }
    let Some(configured) = configured else {
        return Some("the default OAuth app is no longer configured on this server".into());
    };
    let issuer = value_of(vars, vars::OAUTH_CLIENT_ID)?;
    (issuer != configured).then(|| {
        format!(
            "the connection was authorized with default OAuth app {}, not the one configured now (ZOOM_CLIENT_ID): connect again, or configure that app",
            crate::ids::truncate(issuer, 64)
        )
    })
}

/// The connection's non-secret settings, by variable name.
pub fn public_config(vars: &[Var]) -> BTreeMap<String, String> {
    vars.iter()
        .filter(|v| !v.is_secret && !vars::SECRETS.contains(&v.name.as_str()))
        .map(|v| (v.name.clone(), v.value.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(vars: &[Var]) -> (StatusCode, String) {
        let s = connection_status(vars);
        (s.code(), s.message)
    }

    #[test]
    fn status_follows_the_variables() {
        assert_eq!(code_of(&[]).0, StatusCode::InitRequired);
        assert_eq!(
            code_of(&[
                Var::plain("auth_type", "oauthDefault"),
                Var::secret("oauth_refresh_token", "r"),
            ]),
            (StatusCode::Ok, "using default OAuth app".into())
        );
        assert_eq!(
            code_of(&[Var::plain("auth_type", "serverToServer")]),
            (StatusCode::Ok, "using private Server-to-Server app".into())
        );
        assert_eq!(
            code_of(&[Var::plain("auth_type", "oauthPrivate")]).0,
            StatusCode::Error
        );
        assert_eq!(
            code_of(&[Var::plain("auth_type", "basic")]).0,
            StatusCode::Error
        );
        assert_eq!(
            code_of(&[
                Var::plain("auth_type", "serverToServer"),
                Var::plain("connection_error", "deauthorized in Zoom: reconnect"),
            ]),
            (StatusCode::Error, "deauthorized in Zoom: reconnect".into())
        );
        assert_eq!(
            code_of(&[
                Var::plain("auth_type", "serverToServer"),
                Var::plain(
                    "token_error",
                    "Zoom refused the private app's client id or secret"
                ),
            ]),
            (
                StatusCode::Error,
                "Zoom refused the private app's client id or secret".into()
            )
        );
    }

    #[test]
    fn public_config_leaves_out_secrets() {
        let config = public_config(&[
            Var::plain("auth_type", "oauthPrivate"),
            Var::plain("private_client_id", "id"),
            Var::secret("private_client_secret", "s"),
            // Marked plain by mistake, but its name says secret: still left out.
            Var::plain("oauth_access_token", "t"),
        ]);
        assert_eq!(config.len(), 2);
        assert_eq!(config["private_client_id"], "id");
    }
}
