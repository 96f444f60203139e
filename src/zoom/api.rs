//! Zoom's REST API (`ZOOM_API_URL`).

use std::time::Duration;

use serde::Deserialize;

use super::{ZoomError, fetch_json};
use crate::config::{BaseUrl, Config};
use crate::secret::Secret;

/// The parts of a Zoom user this service uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ZoomUser {
    /// The user's id.
    pub id: String,
    /// The account the user belongs to.
    pub account_id: String,
    /// E-mail address.
    #[serde(default)]
    pub email: String,
    /// Display name, if set.
    #[serde(default)]
    pub display_name: String,
    /// First name.
    #[serde(default)]
    pub first_name: String,
    /// Last name.
    #[serde(default)]
    pub last_name: String,
}

impl ZoomUser {
    /// The user in words, for people: display name (or first and last name), and e-mail.
    pub fn describe(&self) -> String {
        let name = if self.display_name.trim().is_empty() {
            format!("{} {}", self.first_name.trim(), self.last_name.trim())
                .trim()
                .to_string()
        } else {
            self.display_name.trim().to_string()
        };
        match (name.is_empty(), self.email.is_empty()) {
            (false, false) => format!("{name} <{}>", self.email),
            (false, true) => name,
            (true, false) => self.email.clone(),
            (true, true) => self.id.clone(),
        }
    }
}

/// Client of Zoom's REST API.
#[derive(Clone)]
pub struct ZoomApi {
    http: reqwest::Client,
    base: BaseUrl,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl ZoomApi {
    /// A client of `ZOOM_API_URL`.
    pub fn new(
        http: reqwest::Client,
        config: &Config,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            http,
            base: config.zoom_api_url.clone(),
            metrics,
        }
    }

    /// Counts one API call by the status Zoom answered (`error` when it did not).
    fn count(&self, status: Option<u16>) {
        let label = status.map_or_else(|| "error".to_string(), |s| s.to_string());
        self.metrics
            .zoom_api_calls
            .with_label_values(&[label.as_str()])
            .inc();
    }

    /// Counts the outcome of a [`fetch_json`].
    fn count_result<T>(&self, result: &Result<T, ZoomError>) {
        self.count(match result {
            Ok(_) => Some(200),
            Err(ZoomError::Rejected { status, .. }) => Some(*status),
            Err(_) => None,
        });
    }

    /// `GET /users/me`: who the access token belongs to.
    pub async fn me(&self, access_token: &Secret) -> Result<ZoomUser, ZoomError> {
        let request = self
            .http
            .get(self.base.join("/users/me"))
            .bearer_auth(access_token.expose());
        let user = fetch_json::<ZoomUser>(&self.http, request, "the user").await;
        self.count_result(&user);
        let user = user?;
        if user.id.is_empty() || user.account_id.is_empty() {
            return Err(ZoomError::Protocol(
                "the user has no id or account id".into(),
            ));
        }
        Ok(user)
    }

    /// `GET /users?page_size=1`: how many users the token's account lists.
    pub async fn count_users(&self, access_token: &Secret) -> Result<u64, ZoomError> {
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            total_records: u64,
        }
        let request = self
            .http
            .get(self.base.join("/users"))
            .query(&[("page_size", "1")])
            .bearer_auth(access_token.expose());
        let page = fetch_json::<Page>(&self.http, request, "the user list").await;
        self.count_result(&page);
        let page = page?;
        Ok(page.total_records)
    }
}

/// The most a call waits for one `Retry-After` of a rate limit before giving up.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);
/// The time a retried call keeps for itself after a `Retry-After` wait, and then for its
/// answer to reach the caller, before the caller's deadline.
pub const RETRY_MARGIN: Duration = Duration::from_secs(1);
/// How many times a rate-limited call is retried.
pub const MAX_RATE_LIMIT_RETRIES: u32 = 3;
/// How long a call waits after a rate limit that names no `Retry-After` (Zoom's per-second
/// limits), before retrying.
pub const DEFAULT_RETRY_WAIT: Duration = Duration::from_secs(1);

/// A Zoom API answer, whatever its status.
#[derive(Debug)]
pub struct ApiAnswer {
    /// The HTTP status.
    pub status: u16,
    /// The body (JSON, or empty for 204).
    pub body: Vec<u8>,
}

/// Why a path was refused before anything was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadPath(pub String);

/// Checks that `path` names a resource under `ZOOM_API_URL` and nothing else: it starts with
/// `/`, has no scheme or host, no `..` (plain or percent-encoded), no query or fragment (those
/// go in `query`), no backslash and no control characters.
pub fn check_path(path: &str) -> Result<(), BadPath> {
    let refuse = |why: &str| {
        Err(BadPath(format!(
            "path {:?} is refused: {why}",
            crate::ids::truncate(path, 80)
        )))
    };
    if !path.starts_with('/') || path.starts_with("//") {
        return refuse("it must be relative to ZOOM_API_URL and start with one /");
    }
    if path.contains("://") {
        return refuse("a full URL is not allowed");
    }
    if path.len() > 1024 || path.chars().any(|c| c.is_control() || c == '\\') {
        return refuse("it has control characters or backslashes, or is too long");
    }
    if path.contains(['?', '#']) {
        return refuse("put query parameters in query, not in the path");
    }
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    if path.split('/').any(|s| s == "." || s == "..")
        || decoded.split('/').any(|s| s == "." || s == "..")
    {
        return refuse("`.` and `..` segments are not allowed");
    }
    Ok(())
}

/// When a 429 may be retried: `Retry-After` in seconds or as an HTTP date, or
/// [`DEFAULT_RETRY_WAIT`] without one; `None` for a daily limit, a `Retry-After` that cannot be
/// read, or a wait longer than [`MAX_RETRY_WAIT`].
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let daily = headers
        .get("x-ratelimit-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.eq_ignore_ascii_case("daily-limit"));
    if daily {
        return None;
    }
    let Some(value) = headers.get(reqwest::header::RETRY_AFTER) else {
        return Some(DEFAULT_RETRY_WAIT);
    };
    let value = value.to_str().ok()?.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                .to_std()
                .unwrap_or_default()
        }
    };
    (wait <= MAX_RETRY_WAIT).then_some(wait)
}

impl ZoomApi {
    /// Calls the API: `method` on `path` (relative to `ZOOM_API_URL`, checked with
    /// [`check_path`]) with `query` and an optional JSON body. Any HTTP status comes back as an
    /// answer, 5xx included; a short rate limit (429, see [`retry_after`]) is waited out and
    /// retried up to [`MAX_RATE_LIMIT_RETRIES`] times, unless the wait would not leave the
    /// retry [`RETRY_MARGIN`] and its answer another before `deadline` (the caller's): then,
    /// like a daily limit, the 429 is answered at once, so the caller learns why instead of
    /// timing out. A retry still unanswered [`RETRY_MARGIN`] before the deadline is given up:
    /// a `GET` for the same 429; any other method as a timeout, since Zoom may have done it.
    pub async fn call(
        &self,
        access_token: &Secret,
        method: reqwest::Method,
        path: &str,
        query: &[(String, String)],
        body: Option<&serde_json::Value>,
        deadline: tokio::time::Instant,
    ) -> Result<ApiAnswer, CallError> {
        check_path(path).map_err(CallError::BadPath)?;
        let mut retries = 0;
        // The last rate limit's answer, while its retry runs.
        let mut limited: Option<ApiAnswer> = None;
        loop {
            let mut request = self
                .http
                .request(method.clone(), self.base.join(path))
                .query(query)
                .bearer_auth(access_token.expose())
                .header(reqwest::header::ACCEPT, "application/json");
            if let Some(body) = body {
                request = request.json(body);
            }
            let request = request
                .build()
                .map_err(|e| ZoomError::Protocol(e.without_url().to_string()))?;
            let sent = super::send_any(&self.http, request);
            // Given up on a margin before the caller's deadline, so the caller hears why (and
            // whether Zoom may have done it) instead of being cut off.
            let cutoff = answer_cutoff(deadline);
            let response = match limited.take() {
                None => match tokio::time::timeout_at(cutoff, sent).await {
                    Ok(response) => response,
                    Err(_) => {
                        tracing::info!(%method, "Zoom did not answer before the caller's deadline");
                        return Err(CallError::Unanswered {
                            may_have_run: method != reqwest::Method::GET,
                        });
                    }
                },
                Some(last) => match tokio::time::timeout_at(cutoff, sent).await {
                    Ok(response) => response,
                    Err(_) if method == reqwest::Method::GET => {
                        tracing::info!(
                            retries,
                            "Zoom did not answer a retry in time; answering its rate limit"
                        );
                        return Ok(last);
                    }
                    Err(_) => {
                        tracing::info!(retries, %method, "Zoom did not answer a retry in time");
                        return Err(CallError::Unanswered { may_have_run: true });
                    }
                },
            };
            self.count(response.as_ref().ok().map(|r| r.status.as_u16()));
            let response = match response {
                Err(ZoomError::Timeout) => {
                    return Err(CallError::Unanswered {
                        may_have_run: method != reqwest::Method::GET,
                    });
                }
                other => other?,
            };
            if response.status == reqwest::StatusCode::TOO_MANY_REQUESTS
                && retries < MAX_RATE_LIMIT_RETRIES
                && let Some(wait) = retry_after(&response.headers)
                && tokio::time::Instant::now() + wait + 2 * RETRY_MARGIN <= deadline
            {
                retries += 1;
                tracing::info!(?wait, retries, "Zoom rate limit; waiting before retrying");
                limited = Some(ApiAnswer {
                    status: response.status.as_u16(),
                    body: response.body,
                });
                tokio::time::sleep(wait).await;
                continue;
            }
            return Ok(ApiAnswer {
                status: response.status.as_u16(),
                body: response.body,
            });
        }
    }
}

/// Why a call did not reach Zoom or got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The path is not allowed.
    #[error(transparent)]
    BadPath(BadPath),
    /// Zoom could not be reached, timed out, or its answer could not be read.
    #[error(transparent)]
    Zoom(#[from] ZoomError),
    /// Zoom had not answered a margin before the caller's deadline; a request other than a
    /// `GET` may have been carried out all the same.
    #[error("Zoom did not answer in time{}", if *may_have_run { " (it may have carried the request out: check before sending it again)" } else { "" })]
    Unanswered {
        /// Whether Zoom may have done what was asked.
        may_have_run: bool,
    },
}

/// When a request still unanswered is given up: [`RETRY_MARGIN`] before `deadline`, or half
/// the time left when that is less than twice the margin.
fn answer_cutoff(deadline: tokio::time::Instant) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let left = deadline.saturating_duration_since(now);
    if left >= 2 * RETRY_MARGIN {
        deadline - RETRY_MARGIN
    } else {
        now + left / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_under_the_api_base_are_allowed() {
        for ok in [
            "/users/me",
            "/meetings/123/recordings",
            "/users/a%40b.com",
            "/report/daily",
        ] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "users/me",
            "//evil.example/x",
            "https://evil.example/x",
            "/users/../admin",
            "/users/%2e%2e/admin",
            "/users/%2E%2E",
            "/./users",
            "/users?x=1",
            "/users#x",
            "/users\\..\\x",
            "/users/\n",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date_or_a_second_when_absent_and_not_a_daily_limit() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "1".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(1)));
        h.insert("retry-after", "3600".parse().unwrap());
        assert_eq!(retry_after(&h), None, "too long to wait inside a call");
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(3))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        h.insert("retry-after", soon.parse().unwrap());
        assert!(retry_after(&h).is_some_and(|w| w <= Duration::from_secs(3)));
        h.insert("x-ratelimit-type", "Daily-limit".parse().unwrap());
        assert_eq!(retry_after(&h), None);
        h.insert("x-ratelimit-type", "QPS".parse().unwrap());
        h.insert("retry-after", "2020-05-31T00:00:00Z".parse().unwrap());
        assert_eq!(retry_after(&h), None, "not a form HTTP allows");
        h.remove("retry-after");
        assert_eq!(
            retry_after(&h),
            Some(DEFAULT_RETRY_WAIT),
            "a per-second limit"
        );
    }
}
