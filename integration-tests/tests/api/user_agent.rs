//! A browser-like HTTP client for the OAuth tests: it follows redirects across the service
//! and the fake Zoom, and keeps the service's cookies, as a browser would.

use std::sync::Mutex;

use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use url::Url;

/// One page the agent ended on.
#[derive(Debug)]
pub struct Visit {
    pub status: StatusCode,
    pub url: Url,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
    /// Every URL requested on the way, the first included.
    pub hops: Vec<Url>,
}

impl Visit {
    /// The `href` of the element with `id`, resolved against the page's URL.
    pub fn link(&self, id: &str) -> Url {
        let marker = format!("id=\"{id}\" href=\"");
        let start = self
            .body
            .find(&marker)
            .unwrap_or_else(|| panic!("no link #{id} in {}", self.body))
            + marker.len();
        let href = &self.body[start..];
        let href = &href[..href.find('"').unwrap()];
        self.url.join(&href.replace("&amp;", "&")).unwrap()
    }

    /// The text of the element with `id` (the first text node after its start tag).
    pub fn text_of(&self, id: &str) -> String {
        let marker = format!("id=\"{id}\"");
        let start = self
            .body
            .find(&marker)
            .unwrap_or_else(|| panic!("no #{id} in {}", self.body));
        let rest = &self.body[start..];
        let rest = &rest[rest.find('>').unwrap() + 1..];
        rest[..rest.find('<').unwrap()].to_string()
    }

    /// The hop that went to Zoom's authorize URL.
    pub fn authorize_url(&self) -> Url {
        self.hops
            .iter()
            .find(|u| u.path() == "/oauth/authorize")
            .cloned()
            .expect("the browser went to Zoom's authorize URL")
    }
}

pub struct UserAgent {
    client: reqwest::Client,
    /// Cookies set by the service: (name, value, path), oldest first, the order in which a
    /// browser sends cookies of the same path. Paths are honored coarsely: the service sets
    /// flow cookies only for `/oauth/redirect/zoom`.
    cookies: Mutex<Vec<(String, String, String)>>,
    service: String,
}

impl UserAgent {
    /// A browser for the service at `service_base` (`http://127.0.0.1:port`).
    pub fn new(service_base: &str) -> Self {
        Self {
            client: crate::helpers::http_client_builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(std::time::Duration::from_secs(20))
                .build()
                .unwrap(),
            cookies: Mutex::default(),
            service: service_base.trim_end_matches('/').to_string(),
        }
    }

    pub async fn get(&self, url: &str) -> Visit {
        let url = Url::parse(url).unwrap();
        self.follow(self.client.get(url.clone()), url).await
    }

    pub async fn post_form(&self, url: &str, form: &[(&str, &str)]) -> Visit {
        let url = Url::parse(url).unwrap();
        self.follow(self.client.post(url.clone()).form(form), url)
            .await
    }

    /// One request, redirects not followed.
    pub async fn get_once(&self, url: &str) -> Visit {
        let url = Url::parse(url).unwrap();
        let response = self
            .with_cookies(self.client.get(url.clone()), &url)
            .send()
            .await
            .expect("request succeeds");
        self.keep_cookies(&url, &response);
        Visit {
            status: response.status(),
            url: url.clone(),
            headers: response.headers().clone(),
            body: response.text().await.unwrap(),
            hops: vec![url],
        }
    }

    /// The names of the service's cookies this browser holds.
    pub fn cookie_names(&self) -> Vec<String> {
        self.cookies
            .lock()
            .unwrap()
            .iter()
            .map(|(name, _, _)| name.clone())
            .collect()
    }

    fn with_cookies(&self, request: reqwest::RequestBuilder, url: &Url) -> reqwest::RequestBuilder {
        if !url.as_str().starts_with(&self.service) {
            return request;
        }
        let cookies: Vec<String> = self
            .cookies
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, path)| url.path().starts_with(path.as_str()))
            .map(|(name, value, _)| format!("{name}={value}"))
            .collect();
        if cookies.is_empty() {
            request
        } else {
            request.header(COOKIE, cookies.join("; "))
        }
    }

    fn keep_cookies(&self, url: &Url, response: &reqwest::Response) {
        if !url.as_str().starts_with(&self.service) {
            return;
        }
        for set in response.headers().get_all(SET_COOKIE) {
            let set = set.to_str().unwrap();
            let mut parts = set.split(';').map(str::trim);
            let (name, value) = parts.next().unwrap().split_once('=').unwrap();
            let mut path = "/".to_string();
            let mut expired = value.is_empty();
            for attr in parts {
                if let Some(p) = attr.strip_prefix("Path=") {
                    path = p.to_string();
                }
                if attr == "Max-Age=0" {
                    expired = true;
                }
            }
            let mut cookies = self.cookies.lock().unwrap();
            if expired {
                cookies.retain(|(n, _, _)| n != name);
            } else if let Some(cookie) = cookies.iter_mut().find(|(n, _, _)| n == name) {
                (cookie.1, cookie.2) = (value.to_string(), path);
            } else {
                cookies.push((name.to_string(), value.to_string(), path));
            }
        }
    }

    async fn follow(&self, first: reqwest::RequestBuilder, mut url: Url) -> Visit {
        let mut hops = vec![url.clone()];
        let mut request = self.with_cookies(first, &url);
        for _ in 0..10 {
            let response = request.send().await.expect("request succeeds");
            self.keep_cookies(&url, &response);
            let status = response.status();
            let location = response
                .headers()
                .get(LOCATION)
                .map(|l| url.join(l.to_str().unwrap()).unwrap());
            match location {
                Some(next) if status.is_redirection() && next.scheme() == "http" => {
                    hops.push(next.clone());
                    request = self.with_cookies(self.client.get(next.clone()), &next);
                    url = next;
                }
                _ => {
                    return Visit {
                        status,
                        url,
                        headers: response.headers().clone(),
                        body: response.text().await.unwrap(),
                        hops,
                    };
                }
            }
        }
        panic!("more than 10 redirects, last {url}");
    }
}
