//! Zoom's OAuth server (`ZOOM_OAUTH_URL`): the authorize URL with PKCE (built by the `oauth2`
//! crate), the authorization-code exchange, refreshes, and Server-to-Server
//! `account_credentials` tokens (requests and answers handled here, so every answer keeps its
//! status and no rotated refresh token is dropped over a detail of its form).

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use oauth2::basic::{
    BasicRevocationErrorResponse, BasicTokenIntrospectionResponse, BasicTokenResponse,
};
use oauth2::{
    AuthUrl, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet, PkceCodeChallenge,
    RedirectUrl, StandardRevocableToken, TokenUrl,
};
use serde::{Deserialize, Serialize};

use super::{ZoomError, send};
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
    /// How long a refresh may take (see [`MIN_REFRESH_TIMEOUT`]).
    refresh_timeout: Duration,
}

/// The least time a refresh is given, whatever `ZOOM_HTTP_TIMEOUT` says: Zoom rotates the
/// refresh token when it takes the request, so a refresh given up on before its answer
/// arrives loses the new token, and with it the connection. Still within the default
/// `SHUTDOWN_TIMEOUT`, which a refresh in flight holds the shutdown for.
pub const MIN_REFRESH_TIMEOUT: Duration = Duration::from_secs(20);

impl ZoomOAuth {
    /// A client of `ZOOM_OAUTH_URL`, redirecting browsers back to the contract's redirect URI.
    pub fn new(http: reqwest::Client, config: &Config) -> Self {
        Self {
            http,
            base: config.zoom_oauth_url.clone(),
            redirect_uri: config.oauth_redirect_uri(),
            refresh_timeout: config.zoom_http_timeout.max(MIN_REFRESH_TIMEOUT),
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
    /// An answer without a refresh token is refused: the connection would stop working when
    /// its first access token expires.
    pub async fn exchange_code(
        &self,
        app: &OAuthApp,
        code: &str,
        verifier: &Secret,
    ) -> Result<Token, ZoomError> {
        let redirect_uri = self
            .redirect_uri
            .as_deref()
            .ok_or_else(|| ZoomError::Protocol("WEBHOOK_ADDRESS is not set".into()))?;
        let request = self.token_endpoint(app).form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", verifier.expose()),
        ]);
        let token = self.token(request, None).await?;
        if token.refresh_token.is_none() {
            return Err(ZoomError::Protocol("Zoom issued no refresh token".into()));
        }
        Ok(token)
    }

    /// Exchanges a refresh token for new tokens. Zoom rotates refresh tokens: the one sent
    /// stops working at once, so the answer must be saved before anything else happens, and
    /// any answer of 200 that holds an access token is taken (whatever its content type, with
    /// or without `token_type`), so a rotated refresh token is not thrown away over a detail.
    /// A refresh token Zoom no longer accepts gives [`ZoomError::InvalidGrant`].
    pub async fn refresh(
        &self,
        app: &OAuthApp,
        refresh_token: &Secret,
    ) -> Result<Token, ZoomError> {
        let request = self
            .token_endpoint(app)
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token.expose()),
            ])
            .timeout(self.refresh_timeout);
        self.token(request, Some(refresh_token)).await
    }

    /// A Server-to-Server token: `grant_type=account_credentials` for `account_id`, with the
    /// app's credentials in the Basic header. Zoom's reason comes back when it refuses.
    pub async fn account_credentials(
        &self,
        app: &OAuthApp,
        account_id: &str,
    ) -> Result<Token, ZoomError> {
        // In the query string of a POST without a body, as Zoom's Server-to-Server docs show.
        let request = self.token_endpoint(app).query(&[
            ("grant_type", "account_credentials"),
            ("account_id", account_id),
        ]);
        self.token(request, None).await
    }

    /// A POST to `/oauth/token` with the app's credentials in the Basic header, as Zoom
    /// documents it (`base64(client_id:client_secret)`), for every grant alike.
    fn token_endpoint(&self, app: &OAuthApp) -> reqwest::RequestBuilder {
        self.http
            .post(self.base.join("/oauth/token"))
            .basic_auth(&app.client_id, Some(app.client_secret.expose()))
            .header(reqwest::header::ACCEPT, "application/json")
    }

    async fn token(
        &self,
        request: reqwest::RequestBuilder,
        refresh_token: Option<&Secret>,
    ) -> Result<Token, ZoomError> {
        let request = request
            .build()
            .map_err(|e| ZoomError::Protocol(e.without_url().to_string()))?;
        // Zoom issues the token after this, so it lives at least `expires_in` from now: a slow
        // answer is not taken to have been issued later than it was.
        let sent = Utc::now();
        let raw = send(&self.http, request).await?;
        let token = token_answer(raw.status, &raw.body, refresh_token, sent);
        if refresh_token.is_some()
            && raw.status.is_success()
            && let Err(e) = &token
        {
            // Zoom has rotated the refresh token, and its answer cannot be used.
            tracing::error!(error = %e, "Zoom accepted a refresh but its answer cannot be read: the connection's refresh token is probably lost");
        }
        token
    }
}

/// Zoom's answer to a token request, as tokens or as the error it stands for. `refresh_token`
/// is the one a refresh sent: kept should the answer not rotate it. `sent`: when the request
/// left, from which the token's lifetime counts.
fn token_answer(
    status: reqwest::StatusCode,
    body: &[u8],
    refresh_token: Option<&Secret>,
    sent: DateTime<Utc>,
) -> Result<Token, ZoomError> {
    #[derive(Deserialize)]
    struct Answer {
        access_token: String,
        #[serde(default)]
        refresh_token: Option<String>,
        #[serde(default)]
        token_type: Option<String>,
        #[serde(default, deserialize_with = "lenient_seconds")]
        expires_in: Option<u64>,
    }
    if status.is_success() {
        let answer: Answer = serde_json::from_slice(body)
            .ok()
            .filter(|a: &Answer| !a.access_token.is_empty())
            .ok_or_else(|| ZoomError::Protocol("the token response cannot be read".into()))?;
        return Ok(Token {
            access_token: Secret::new(answer.access_token),
            // Zoom always rotates; should it ever not, the old refresh token stays valid.
            refresh_token: answer
                .refresh_token
                .filter(|t| !t.is_empty())
                .map(Secret::new)
                .or_else(|| refresh_token.cloned()),
            expires_at: expires_after(sent, answer.expires_in.map(Duration::from_secs)),
            token_type: answer.token_type.unwrap_or_else(|| "bearer".into()),
        });
    }
    let error = serde_json::from_slice::<ZoomOAuthError>(body).ok();
    let reason = super::error_reason(status, body);
    match error {
        Some(e) if e.error == "invalid_grant" => Err(ZoomError::InvalidGrant(reason)),
        // Zoom's answer to a dead refresh token in earlier years.
        Some(e)
            if refresh_token.is_some()
                && e.error == "invalid_request"
                && e.reason.as_deref() == Some("Invalid Token!") =>
        {
            Err(ZoomError::InvalidGrant(reason))
        }
        _ => Err(ZoomError::Rejected {
            status: status.as_u16(),
            reason,
        }),
    }
}

/// `expires_in` as a number of seconds, or as text holding one; a negative one counts as 0
/// (a token already expired), anything else as absent (the default lifetime).
fn lenient_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let seconds = |n: f64| (n.is_finite()).then(|| n.max(0.0) as u64);
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Number(n) => n.as_u64().or_else(|| n.as_f64().and_then(seconds)),
        serde_json::Value::String(s) => {
            let s = s.trim();
            s.parse().ok().or_else(|| s.parse().ok().and_then(seconds))
        }
        _ => None,
    })
}

/// When a token issued at `now` with `expires_in` stops working: the lifetime is capped at
/// [`MAX_TOKEN_LIFETIME`], so no answer of Zoom's can overflow the date.
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

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    fn answer(status: u16, body: &str, refresh: Option<&str>) -> Result<Token, ZoomError> {
        let refresh = refresh.map(Secret::new);
        token_answer(
            StatusCode::from_u16(status).unwrap(),
            body.as_bytes(),
            refresh.as_ref(),
            Utc::now(),
        )
    }

    #[test]
    fn any_answer_of_200_with_an_access_token_is_taken_with_its_rotated_refresh_token() {
        // No token_type, expires_in as text: still the new pair.
        let token = answer(
            200,
            r#"{"access_token":"a2","refresh_token":"r2","expires_in":"3599"}"#,
            Some("r1"),
        )
        .unwrap();
        assert_eq!(token.access_token.expose(), "a2");
        assert_eq!(token.refresh_token.unwrap().expose(), "r2");
        assert_eq!(token.token_type, "bearer");
        let lifetime = token.expires_at - Utc::now();
        assert!(
            (3590..=3599).contains(&lifetime.num_seconds()),
            "{lifetime}"
        );
        // Not rotated: the one sent stays.
        let token = answer(
            200,
            r#"{"access_token":"a2","refresh_token":""}"#,
            Some("r1"),
        )
        .unwrap();
        assert_eq!(token.refresh_token.unwrap().expose(), "r1");
        // Unusable answers are protocol errors.
        for body in [
            "",
            "not json",
            r#"{"access_token":""}"#,
            r#"{"refresh_token":"r2"}"#,
        ] {
            assert!(
                matches!(answer(200, body, Some("r1")), Err(ZoomError::Protocol(_))),
                "{body}"
            );
        }
    }

    #[test]
    fn refusals_keep_zooms_status_and_reason_and_dead_grants_are_told_apart() {
        match answer(403, r#"{"code":4700,"message":"App disabled"}"#, Some("r1")) {
            Err(ZoomError::Rejected { status, reason }) => {
                assert_eq!((status, reason.as_str()), (403, "App disabled"));
            }
            other => panic!("{other:?}"),
        }
        match answer(
            401,
            r#"{"reason":"Invalid client_id or client_secret","error":"invalid_client"}"#,
            None,
        ) {
            Err(ZoomError::Rejected { status, reason }) => {
                assert_eq!(
                    (status, reason.as_str()),
                    (401, "Invalid client_id or client_secret")
                );
            }
            other => panic!("{other:?}"),
        }
        match answer(
            429,
            r#"{"code":429,"message":"Too many requests."}"#,
            Some("r1"),
        ) {
            Err(ZoomError::Rejected { status, .. }) => assert_eq!(status, 429),
            other => panic!("{other:?}"),
        }
        for (body, refresh) in [
            (
                r#"{"reason":"Invalid Token!","error":"invalid_grant"}"#,
                Some("r1"),
            ),
            (
                r#"{"reason":"Invalid Token!","error":"invalid_request"}"#,
                Some("r1"),
            ),
            (
                r#"{"reason":"Invalid authorization code","error":"invalid_grant"}"#,
                None,
            ),
        ] {
            assert!(
                matches!(answer(400, body, refresh), Err(ZoomError::InvalidGrant(_))),
                "{body}"
            );
        }
        // The same words on another request say nothing of a grant.
        assert!(matches!(
            answer(
                400,
                r#"{"reason":"Invalid Token!","error":"invalid_request"}"#,
                None
            ),
            Err(ZoomError::Rejected { status: 400, .. })
        ));
        match answer(400, "<html>bad gateway</html>", Some("r1")) {
            Err(ZoomError::Rejected { status, reason }) => {
                assert_eq!((status, reason.as_str()), (400, "HTTP 400 Bad Request"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_negative_or_zero_expires_in_counts_as_a_token_already_expired() {
        for expires_in in ["-5", "\"-5\"", "-0.5", "0", "\"0\""] {
            let body = format!(r#"{{"access_token":"a2","expires_in":{expires_in}}}"#);
            let token = answer(200, &body, Some("r1")).unwrap();
            let lifetime = token.expires_at - Utc::now();
            assert!(lifetime.num_seconds() <= 0, "{expires_in}: {lifetime}");
        }
        // Fractions are whole seconds; what is not a number at all is Zoom's hour.
        let token = answer(200, r#"{"access_token":"a2","expires_in":59.9}"#, None).unwrap();
        assert!((58..=59).contains(&(token.expires_at - Utc::now()).num_seconds()));
        let token = answer(200, r#"{"access_token":"a2","expires_in":"soon"}"#, None).unwrap();
        assert!((token.expires_at - Utc::now()).num_seconds() > 3500);
    }

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
