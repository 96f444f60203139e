//! The HTML of connection setup: the connection page and the pages that end a flow. Served
//! from the binary with no external assets; a per-response nonce lets the one inline style
//! sheet through a strict Content-Security-Policy, and no script runs at all (the page shows
//! each authentication type's fields with CSS alone).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::form::Target;
use crate::connection::AuthType;

const STYLE: &str = r#"
:root { color-scheme: light; --blue: #0b5cff; --ink: #1d1d1f; --muted: #5f6368; --line: #dadce0; --bad: #b3261e; --good: #146c2e; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); background: #f5f7fb; }
main { max-width: 34rem; margin: 3rem auto; padding: 2rem; background: #fff; border: 1px solid var(--line); border-radius: 12px; }
header { display: flex; align-items: center; gap: .75rem; margin-bottom: 1.25rem; }
header img { width: 40px; height: 40px; }
h1 { font-size: 1.35rem; margin: 0; }
#connection { color: var(--muted); font-size: .9rem; margin: 0 0 1rem; }
#connection code { color: var(--ink); word-break: break-all; }
#link-expiry { color: var(--muted); font-size: .9rem; margin: 0 0 1rem; }
.field small code { color: var(--ink); word-break: break-all; }
.status { padding: .6rem .8rem; border-radius: 8px; background: #eef3fe; margin-bottom: 1.25rem; }
.status.error { background: #fce8e6; color: var(--bad); }
.status.ok { background: #e6f4ea; color: var(--good); }
fieldset { border: 0; padding: 0; margin: 0 0 1rem; }
legend { font-weight: 600; margin-bottom: .5rem; }
.choice { display: block; padding: .6rem .8rem; border: 1px solid var(--line); border-radius: 8px; margin-bottom: .5rem; cursor: pointer; }
.choice:has(input:checked) { border-color: var(--blue); background: #f3f7ff; }
.choice:has(input:disabled) { cursor: not-allowed; color: var(--muted); }
.choice small { display: block; color: var(--muted); margin-left: 1.6rem; }
.field { margin-bottom: .9rem; }
.field label { display: block; font-weight: 600; margin-bottom: .25rem; }
.field input { width: 100%; padding: .5rem .6rem; border: 1px solid var(--line); border-radius: 6px; font: inherit; }
.field small { color: var(--muted); }
button { font: inherit; font-weight: 600; color: #fff; background: var(--blue); border: 0; border-radius: 8px; padding: .6rem 1.2rem; cursor: pointer; }
@supports selector(:has(*)) {
  .field, #save { display: none; }
  form:has(#auth-oauthPrivate:checked) .for-private,
  form:has(#auth-serverToServer:checked) .for-s2s { display: block; }
  form:has(#auth-serverToServer:checked) #save { display: inline-block; }
  form:has(#auth-serverToServer:checked) #start { display: none; }
}
.message { font-size: 1.05rem; }
.message.error { color: var(--bad); }
a { color: var(--blue); }
"#;

/// A page of this service: a status code, a title and an HTML body.
pub struct Page {
    status: StatusCode,
    title: String,
    body: String,
}

impl Page {
    /// A page with `body` (already escaped HTML).
    pub fn new(status: StatusCode, title: impl Into<String>, body: String) -> Self {
        Self {
            status,
            title: title.into(),
            body,
        }
    }
}

impl IntoResponse for Page {
    fn into_response(self) -> Response {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).expect("the operating system's random source failed");
        let nonce = hex::encode(nonce);
        let html = format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>{title}</title><style nonce=\"{nonce}\">{STYLE}</style></head>\
             <body><main><header><img src=\"/zoom/logo.svg\" alt=\"\"><h1>{title}</h1></header>\
             {body}</main></body></html>\n",
            title = escape(&self.title),
            body = self.body,
        );
        let csp = format!(
            "default-src 'none'; style-src 'nonce-{nonce}'; img-src 'self'; \
             base-uri 'none'; frame-ancestors 'none'"
        );
        let mut response = (self.status, html).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        if let Ok(csp) = HeaderValue::from_str(&csp) {
            headers.insert(header::CONTENT_SECURITY_POLICY, csp);
        }
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // The redirect page's URL carries Zoom's one-time code: never pass it on.
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        response
    }
}

/// How the connection stands, for the top of the page.
pub enum CurrentStatus {
    /// Never set up.
    NotSetUp,
    /// Working; the text says as whom.
    Connected(String),
    /// Set up but broken; the text says why.
    Error(String),
    /// The host engine did not answer.
    Unknown,
}

/// What the connection page needs to know.
pub struct ConnectionPage<'a> {
    /// The connection and origin.
    pub target: &'a Target,
    /// Its current status.
    pub status: CurrentStatus,
    /// The choice to preselect.
    pub selected: AuthType,
    /// Whether the server-wide default app is configured.
    pub default_app_configured: bool,
    /// Where Zoom sends the browser back after sign-in, `None` without `WEBHOOK_ADDRESS`
    /// (no OAuth flow can run then).
    pub redirect_url: Option<&'a str>,
    /// Where Zoom sends the app's events, `None` without `WEBHOOK_ADDRESS`.
    pub event_url: Option<&'a str>,
    /// How long the setup link that opened the page still works, when one did: the form
    /// carries it, so it must be sent before then.
    pub link_time_left: Option<std::time::Duration>,
    /// The private app's non-secret fields already stored, to prefill.
    pub account_id: &'a str,
    /// See `account_id`.
    pub client_id: &'a str,
}

impl ConnectionPage<'_> {
    /// The page.
    pub fn render(&self) -> Page {
        let (class, text) = match &self.status {
            CurrentStatus::NotSetUp => ("", "Not set up yet.".to_string()),
            CurrentStatus::Connected(who) => ("ok", format!("Connected {who}.")),
            CurrentStatus::Error(why) => ("error", format!("Error: {why}")),
            CurrentStatus::Unknown => (
                "error",
                "Status unknown: the host engine did not answer.".to_string(),
            ),
        };
        let choice = |auth: AuthType, label: &str, note: &str, disabled: bool| {
            format!(
                "<label class=\"choice\"><input type=\"radio\" name=\"auth_type\" id=\"auth-{value}\" \
                 value=\"{value}\"{checked}{disabled}> {label}<small>{note}</small></label>",
                value = auth.as_str(),
                checked = if auth == self.selected && !disabled {
                    " checked"
                } else {
                    ""
                },
                disabled = if disabled { " disabled" } else { "" },
            )
        };
        const NO_ADDRESS: &str = "Not available: this server does not know its public address \
             (its operator has not set WEBHOOK_ADDRESS), which Zoom's sign-in returns to.";
        let oauth = self.redirect_url.is_some();
        let default_note = if !oauth {
            NO_ADDRESS
        } else if self.default_app_configured {
            "The app this server's operator set up. You sign in to Zoom and approve it."
        } else {
            "Not available: this server has no default app (its operator has not set \
             ZOOM_CLIENT_ID and ZOOM_CLIENT_SECRET). Use a private app instead."
        };
        // What to enter in the app's own settings in the Zoom App Marketplace.
        let urls = match (self.redirect_url, self.event_url) {
            (Some(redirect), Some(events)) => format!(
                "<div class=\"field for-private\" id=\"redirect-url\"><label>In your OAuth app</label>\
                 <small>Redirect URL for OAuth, also on the OAuth allow list: <code>{redirect}</code></small></div>\
                 <div class=\"field for-private for-s2s\" id=\"event-url\"><label>To receive the app's events</label>\
                 <small>Event notification endpoint URL, under Event Subscriptions: <code>{events}</code>. \
                 Validate it once this connection is set up: until then its secret token is unknown here.</small></div>",
                redirect = escape(redirect),
                events = escape(events),
            ),
            _ => String::new(),
        };
        let body = format!(
            "<p id=\"connection\">Connection <code>{cid}</code>. Whoever runs this \
             connection's workflows acts with the Zoom account you connect: connect only a \
             connection you opened from your own project.</p>\
             <p class=\"status {class}\" id=\"status\">{status}</p>{expiry}\
             <form method=\"post\" action=\"/zoom/save\" autocomplete=\"off\">\
             <input type=\"hidden\" name=\"cid\" value=\"{cid}\">\
             <input type=\"hidden\" name=\"origin\" value=\"{origin}\">{grant}\
             <fieldset><legend>Authentication type</legend>{c1}{c2}{c3}</fieldset>\
             <div class=\"field for-s2s\"><label for=\"account_id\">Account ID</label>\
             <input id=\"account_id\" name=\"account_id\" maxlength=\"128\" value=\"{account_id}\">\
             <small>Server-to-Server apps only, required. From the app's page in the Zoom App Marketplace.</small></div>\
             <div class=\"field for-private for-s2s\"><label for=\"client_id\">Client ID</label>\
             <input id=\"client_id\" name=\"client_id\" maxlength=\"128\" value=\"{client_id}\">\
             <small>Private and Server-to-Server apps, required.</small></div>\
             <div class=\"field for-private for-s2s\"><label for=\"client_secret\">Client secret</label>\
             <input id=\"client_secret\" name=\"client_secret\" type=\"password\" maxlength=\"512\" autocomplete=\"new-password\">\
             <small>Private and Server-to-Server apps, required. Stored encrypted; never shown again.</small></div>\
             <div class=\"field for-private for-s2s\"><label for=\"secret_token\">Secret token</label>\
             <input id=\"secret_token\" name=\"secret_token\" type=\"password\" maxlength=\"512\" autocomplete=\"new-password\">\
             <small>Private and Server-to-Server apps, optional: needed to receive the app's events (webhooks). Left empty, the one saved for this app (same client ID) is kept.</small></div>\
             {urls}\
             <button type=\"submit\" id=\"start\">Start OAuth Flow</button>\
             <button type=\"submit\" id=\"save\">Save</button>\
             </form>",
            status = escape(&text),
            expiry = self.link_time_left.map_or_else(String::new, |left| {
                let minutes = left.as_secs().div_ceil(60);
                format!(
                    "<p id=\"link-expiry\">This setup link works for {about}{minutes} more \
                     minute{s}: send the form before then (setting up a Zoom app can take \
                     longer), or open the connection again from your workflow platform.</p>",
                    about = if minutes > 1 { "about " } else { "" },
                    s = if minutes == 1 { "" } else { "s" },
                )
            }),
            cid = escape(self.target.cid.as_str()),
            origin = escape(&self.target.origin),
            grant = self
                .target
                .grant
                .as_deref()
                .map_or_else(String::new, |g| format!(
                    "<input type=\"hidden\" name=\"grant\" value=\"{}\">",
                    escape(g)
                )),
            c1 = choice(
                AuthType::OAuthDefault,
                "Default OAuth app",
                default_note,
                !self.default_app_configured || !oauth
            ),
            c2 = choice(
                AuthType::OAuthPrivate,
                "Private OAuth app",
                if oauth {
                    "Your own OAuth app in the Zoom App Marketplace."
                } else {
                    NO_ADDRESS
                },
                !oauth
            ),
            c3 = choice(
                AuthType::ServerToServer,
                "Private Server-to-Server app",
                "Your own Server-to-Server OAuth app: no sign-in, the app acts for its account.",
                false
            ),
            account_id = escape(self.account_id),
            client_id = escape(self.client_id),
        );
        Page::new(StatusCode::OK, "Connect Zoom", body)
    }
}

/// A page that ends a flow: success, or what went wrong and how to go on.
pub fn message_page(status: StatusCode, title: &str, message: &str, back: Option<&Target>) -> Page {
    let class = if status.is_success() {
        "message"
    } else {
        "message error"
    };
    let mut body = format!(
        "<p class=\"{class}\" id=\"message\">{}</p>",
        escape(message)
    );
    if back.is_none() && !status.is_success() {
        body.push_str(
            "<p id=\"again\">To try again, open the connection's setup page again from your \
             workflow platform.</p>",
        );
    }
    if let Some(target) = back {
        let grant = target
            .grant
            .as_deref()
            .map_or_else(String::new, |g| format!("&amp;grant={}", escape(g)));
        body.push_str(&format!(
            "<p><a id=\"back\" href=\"/zoom/?cid={}&amp;origin={}{grant}\">Back to the connection page</a></p>",
            escape(target.cid.as_str()),
            escape(&target.origin)
        ));
    }
    Page::new(status, title, body)
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape("<a href=\"x\">'Zoë' & co</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;Zoë&#39; &amp; co&lt;/a&gt;"
        );
    }
}
