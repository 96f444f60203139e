//! Zoom's OAuth server (`ZOOM_OAUTH_URL`): the authorize URL with PKCE, the authorization-code
//! exchange (through the `oauth2` crate), and Server-to-Server `account_credentials` tokens.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use oauth2::basic::{
    BasicRevocationErrorResponse, BasicTokenIntrospectionResponse, BasicTokenResponse,
};
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError,
    StandardRevocableToken, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};

use super::{ZoomError, fetch_json, send};
use crate::config::{BaseUrl, Config, OAuthApp};
use crate::secret::Secret;

/// How long Zoom's access tokens live when the answer does not say.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// The longest `expires_in` believed. Zoom's tokens live an hour; a larger claim (a bug, or a
/// garbled answer) only makes the token be refreshed sooner than it had to be.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Tokens Zoom issued.
#[derive(Debug, Clone)]
pub struct Token {
    /// The access token.
    pub access_token: Secret,
    /// The refresh token (none for Server-to-Server apps).
    pub refresh_token: Option<Secret>,
    /// When the access token stops working.
    pub expires_at: DateTime<Utc>,
    /// Usually `bearer`.
    pub token_type: String,
}

/// A PKCE pair: the challenge goes in the authorize URL, the verifier stays here until the
/// code is exchanged.
pub struct Pkce {
    /// The S256 challenge.
    pub challenge: PkceCodeChallenge,
    /// The verifier (secret until the exchange).
    pub verifier: Secret,
}

impl Pkce {
    /// A fresh random pair (S256).
    pub fn new() -> Self {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        Self {
            challenge,
            verifier: Secret::new(verifier.secret().clone()),
        }
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Self::new()
    }
}

/// The error body of Zoom's token endpoint: `{"reason": "...", "error": "invalid_client"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZoomOAuthError {
    /// The OAuth error code.
    #[serde(default)]
    pub error: String,
    /// Zoom's explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The standard explanation field, in case Zoom uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
}

impl fmt::Display for ZoomOAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self
            .reason
            .as_deref()
            .or(self.error_description.as_deref())
            .filter(|t| !t.trim().is_empty())
            .unwrap_or(&self.error);
        f.write_str(&crate::ids::truncate(text, 200))
    }
}

impl oauth2::ErrorResponse for ZoomOAuthError {}

type CodeClient = oauth2::Client<
    ZoomOAuthError,
    BasicTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// Client of Zoom's OAuth server.
#[derive(Clone)]
pub struct ZoomOAuth {
    http: reqwest::Client,
    base: BaseUrl,
    redirect_uri: Option<String>,
}

impl ZoomOAuth {
    /// A client of `ZOOM_OAUTH_URL`, redirecting browsers back to the contract's redirect URI.
    pub fn new(http: reqwest::Client, config: &Config) -> Self {
        Self {
            http,
            base: config.zoom_oauth_url.clone(),
            redirect_uri: config.oauth_redirect_uri(),
        }
    }

    fn client(&self, app: &OAuthApp) -> Result<CodeClient, ZoomError> {
        let redirect_uri = self
            .redirect_uri
            .clone()
            .ok_or_else(|| ZoomError::Protocol("WEBHOOK_ADDRESS is not set".into()))?;
        let bad_url = |e: url::ParseError| ZoomError::Protocol(format!("bad URL: {e}"));
        Ok(oauth2::Client::new(ClientId::new(app.client_id.clone()))
            .set_client_secret(ClientSecret::new(app.client_secret.expose().to_string()))
            .set_auth_uri(AuthUrl::new(self.base.join("/oauth/authorize")).map_err(bad_url)?)
            .set_token_uri(TokenUrl::new(self.base.join("/oauth/token")).map_err(bad_url)?)
            .set_redirect_uri(RedirectUrl::new(redirect_uri).map_err(bad_url)?))
    }

    /// The `oauth2` crate's requests, run on our HTTP client.
    fn executor(
        &self,
    ) -> impl Fn(
        oauth2::HttpRequest,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<oauth2::HttpResponse, ZoomError>> + Send>,
    > {
        let http = self.http.clone();
        move |request| {
            let http = http.clone();
            Box::pin(async move { execute(&http, request).await })
        }
    }

    /// Where to send the browser: `/oauth/authorize` with `response_type=code`, the app's
    /// client id, the redirect URI, the PKCE challenge (S256) and `state`.
    pub fn authorize_url(
        &self,
        app: &OAuthApp,
        state: &str,
        challenge: PkceCodeChallenge,
    ) -> Result<String, ZoomError> {
        let state = state.to_string();
        let (url, _) = self
            .client(app)?
            .authorize_url(move || CsrfToken::new(state))
            .set_pkce_challenge(challenge)
            .url();
        Ok(url.into())
    }

    /// Exchanges an authorization code (with its PKCE verifier) for tokens. The client
    /// credentials go in the Basic header; the body carries `redirect_uri` and `code_verifier`.
    pub async fn exchange_code(
        &self,
        app: &OAuthApp,
        code: &str,
        verifier: &Secret,
    ) -> Result<Token, ZoomError> {
        let response = self
            .client(app)?
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.expose().to_string()))
            .request_async(&self.executor())
            .await
            .map_err(token_error)?;
        Ok(Token {
            access_token: Secret::new(response.access_token().secret().clone()),
            refresh_token: response
                .refresh_token()
                .map(|t| Secret::new(t.secret().clone())),
            expires_at: expires_at(response.expires_in()),
            token_type: response.token_type().as_ref().to_string(),
        })
    }

    /// Exchanges a refresh token for new tokens. Zoom rotates refresh tokens: the one sent
    /// stops working at once, so the answer must be saved before anything else happens.
    /// A refresh token Zoom no longer accepts gives [`ZoomError::InvalidGrant`].
    pub async fn refresh(
        &self,
        app: &OAuthApp,
        refresh_token: &Secret,
    ) -> Result<Token, ZoomError> {
        let response = self
            .client(app)?
            .exchange_refresh_token(&RefreshToken::new(refresh_token.expose().to_string()))
            .request_async(&self.executor())
            .await
            .map_err(token_error)?;
        Ok(Token {
            access_token: Secret::new(response.access_token().secret().clone()),
            // Zoom always rotates; should it ever not, the old refresh token stays valid.
            refresh_token: Some(response.refresh_token().map_or_else(
                || refresh_token.clone(),
                |t| Secret::new(t.secret().clone()),
            )),
            expires_at: expires_at(response.expires_in()),
            token_type: response.token_type().as_ref().to_string(),
        })
    }

    /// A Server-to-Server token: `grant_type=account_credentials` for `account_id`, with the
    /// app's credentials in the Basic header. Zoom's reason comes back when it refuses.
    pub async fn account_credentials(
        &self,
        app: &OAuthApp,
        account_id: &str,
    ) -> Result<Token, ZoomError> {
        #[derive(Deserialize)]
        struct Answer {
            access_token: String,
            #[serde(default)]
            token_type: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let request = self
            .http
            .post(self.base.join("/oauth/token"))
            .basic_auth(&app.client_id, Some(app.client_secret.expose()))
            .query(&[
                ("grant_type", "account_credentials"),
                ("account_id", account_id),
            ]);
        let answer: Answer = fetch_json(&self.http, request, "the token response").await?;
        Ok(Token {
            access_token: Secret::new(answer.access_token),
            refresh_token: None,
            expires_at: expires_at(answer.expires_in.map(Duration::from_secs)),
            token_type: answer.token_type.unwrap_or_else(|| "bearer".into()),
        })
    }
}

/// A failed token request of the `oauth2` crate, as a [`ZoomError`].
fn token_error(err: RequestTokenError<ZoomError, ZoomOAuthError>) -> ZoomError {
    match err {
        RequestTokenError::ServerResponse(e) if e.error == "invalid_grant" => {
            ZoomError::InvalidGrant(e.to_string())
        }
        // Zoom answers 401 for these; the crate does not pass the status on.
        RequestTokenError::ServerResponse(e) if e.error == "invalid_client" => {
            ZoomError::Rejected {
                status: 401,
                reason: e.to_string(),
            }
        }
        RequestTokenError::ServerResponse(e) => ZoomError::Rejected {
            status: 400,
            reason: e.to_string(),
        },
        RequestTokenError::Request(e) => e,
        RequestTokenError::Parse(..) => {
            ZoomError::Protocol("the token response cannot be read".into())
        }
        RequestTokenError::Other(m) => ZoomError::Protocol(m),
    }
}

/// When a token issued now with `expires_in` stops working: the lifetime is capped at
/// [`MAX_TOKEN_LIFETIME`], so no answer of Zoom's can overflow the date.
fn expires_at(expires_in: Option<Duration>) -> DateTime<Utc> {
    expires_after(Utc::now(), expires_in)
}

fn expires_after(now: DateTime<Utc>, expires_in: Option<Duration>) -> DateTime<Utc> {
    let lifetime = expires_in
        .unwrap_or(DEFAULT_TOKEN_LIFETIME)
        .min(MAX_TOKEN_LIFETIME);
    // Only a clock at the end of chrono's range fails here; the token then counts as expired.
    chrono::Duration::from_std(lifetime)
        .ok()
        .and_then(|lifetime| now.checked_add_signed(lifetime))
        .unwrap_or(now)
}

/// Runs one request of the `oauth2` crate on our HTTP client.
async fn execute(
    http: &reqwest::Client,
    request: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, ZoomError> {
    let request = reqwest::Request::try_from(request)
        .map_err(|e| ZoomError::Protocol(e.without_url().to_string()))?;
    let raw = send(http, request).await?;
    // Not an OAuth error, whatever its body: the request was fine, only too early.
    if raw.status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        return Err(ZoomError::Rejected {
            status: raw.status.as_u16(),
            reason: super::error_reason(raw.status, &raw.body),
        });
    }
    let mut response = oauth2::HttpResponse::new(raw.body);
    *response.status_mut() = raw.status;
    *response.headers_mut() = raw.headers;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_expires_in_gives_an_expiry_within_a_day() {
        let now = Utc::now();
        let day = chrono::Duration::days(1);
        for huge in [10_u64.pow(13), u64::MAX, 86_401] {
            assert_eq!(
                expires_after(now, Some(Duration::from_secs(huge))),
                now + day,
                "expires_in {huge}"
            );
        }
        assert_eq!(
            expires_after(now, Some(Duration::from_secs(3599))),
            now + chrono::Duration::seconds(3599)
        );
        assert_eq!(expires_after(now, None), now + chrono::Duration::hours(1));
        assert_eq!(expires_after(now, Some(Duration::ZERO)), now);
        assert_eq!(
            expires_after(DateTime::<Utc>::MAX_UTC, Some(Duration::from_secs(60))),
            DateTime::<Utc>::MAX_UTC
        );
    }
}
