//! Zoom's REST API (`ZOOM_API_URL`).

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
}

impl ZoomApi {
    /// A client of `ZOOM_API_URL`.
    pub fn new(http: reqwest::Client, config: &Config) -> Self {
        Self {
            http,
            base: config.zoom_api_url.clone(),
        }
    }

    /// `GET /users/me`: who the access token belongs to.
    pub async fn me(&self, access_token: &Secret) -> Result<ZoomUser, ZoomError> {
        let request = self
            .http
            .get(self.base.join("/users/me"))
            .bearer_auth(access_token.expose());
        let user: ZoomUser = fetch_json(&self.http, request, "the user").await?;
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
        let page: Page = fetch_json(&self.http, request, "the user list").await?;
        Ok(page.total_records)
    }
}
