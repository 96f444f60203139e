//! The functions workflows call through `IntegrationsService.Call`: a general `api` and named
//! functions for the common jobs. Arguments and results are `autokitteh.values.v1.Value`s;
//! Zoom's answers are converted losslessly (integers stay integers, text exactly as sent).
//!
//! The connection is named the way AutoKitteh's SDK does it: the function value's `data`
//! holds the connection id (a `connection_id` keyword argument is accepted too).
//!
//! Zoom refusing, rate limits, bad arguments and unusable connections all come back as the
//! call's *error* (a value with Zoom's `code` and `message`), never as a failed gRPC call.

use std::collections::HashMap;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::credentials::{Access, CredentialError, Credentials};
use crate::host::HostError;
use crate::ids::ConnectionId;
use crate::proto::autokitteh::values::v1 as pb;
use crate::values::{self, to_json};
use crate::zoom::ZoomError;
use crate::zoom::api::{CallError, ZoomApi};

/// One function: its name, its parameters (in positional order) and what it does.
pub struct FunctionSpec {
    /// The name workflows call.
    pub name: &'static str,
    /// Parameter names, positional order; `*` marks required ones.
    pub params: &'static [&'static str],
    /// One line for people.
    pub doc: &'static str,
}

/// Every function, as the README documents them.
pub const FUNCTIONS: &[FunctionSpec] = &[
    FunctionSpec {
        name: "api",
        params: &["method*", "path*", "query", "body"],
        doc: "any Zoom API call: method (GET, POST, PATCH, PUT, DELETE), path relative to ZOOM_API_URL, query dict, JSON body; returns {status, body}",
    },
    FunctionSpec {
        name: "get_user",
        params: &["user_id"],
        doc: "GET /users/{user_id} (default me)",
    },
    FunctionSpec {
        name: "list_meetings",
        params: &["user_id", "type", "page_size", "next_page_token"],
        doc: "GET /users/{user_id}/meetings (default me)",
    },
    FunctionSpec {
        name: "get_meeting",
        params: &["meeting_id*"],
        doc: "GET /meetings/{meeting_id}",
    },
    FunctionSpec {
        name: "create_meeting",
        params: &["meeting", "user_id"],
        doc: "POST /users/{user_id}/meetings with the meeting dict and any other keyword arguments (topic, type, start_time, duration, timezone, agenda, settings, ...) as its body",
    },
    FunctionSpec {
        name: "update_meeting",
        params: &["meeting_id*", "meeting"],
        doc: "PATCH /meetings/{meeting_id} with the meeting dict and any other keyword arguments as its body",
    },
    FunctionSpec {
        name: "delete_meeting",
        params: &["meeting_id*"],
        doc: "DELETE /meetings/{meeting_id}",
    },
    FunctionSpec {
        name: "list_recordings",
        params: &["user_id", "from", "to", "page_size", "next_page_token"],
        doc: "GET /users/{user_id}/recordings (default me); from and to are dates (yyyy-mm-dd)",
    },
];

/// The functions as AutoKitteh describes a module (the integration descriptor's `module`).
pub fn module() -> crate::proto::autokitteh::module::v1::Module {
    use crate::proto::autokitteh::module::v1 as module;
    module::Module {
        functions: FUNCTIONS
            .iter()
            .map(|f| {
                let input = f
                    .params
                    .iter()
                    .map(|p| module::FunctionField {
                        name: p.trim_end_matches('*').into(),
                        optional: !p.ends_with('*'),
                        ..Default::default()
                    })
                    .collect();
                let function = module::Function {
                    description: f.doc.into(),
                    input,
                    ..Default::default()
                };
                (f.name.to_string(), function)
            })
            .collect(),
        variables: HashMap::new(),
    }
}

/// What `IntegrationsService.Configure` gives a host engine for connection `cid`: one function
/// value per function, as AutoKitteh's SDK makes them (the integration as executor, the
/// connection id as `data`), for the host to hand to workflows and pass back to `Call`.
///
/// Without a connection (`None`) the values carry no data, as AutoKitteh's modules configure
/// them; a call through one then needs a `connection_id` keyword argument.
pub fn configured(executor_id: &str, cid: Option<&ConnectionId>) -> HashMap<String, pb::Value> {
    let descriptions = module().functions;
    FUNCTIONS
        .iter()
        .map(|f| {
            let value = pb::Value {
                function: Some(pb::Function {
                    executor_id: executor_id.into(),
                    name: f.name.into(),
                    desc: descriptions.get(f.name).cloned(),
                    data: cid.map(|c| c.to_string().into_bytes()).unwrap_or_default(),
                    flags: Vec::new(),
                }),
                ..Default::default()
            };
            (f.name.to_string(), value)
        })
        .collect()
}

/// A failed call, as the caller's program sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallFailure {
    /// The HTTP status Zoom answered, if it did.
    pub status: Option<u16>,
    /// Zoom's error code, if it gave one.
    pub code: Option<i64>,
    /// What went wrong.
    pub message: String,
    /// Zoom's details of a refusal, as sent (the `errors` of a validation failure: which field
    /// and why).
    pub errors: Option<Box<pb::Value>>,
}

impl CallFailure {
    fn new(message: impl Into<String>) -> Self {
        Self {
            status: None,
            code: None,
            message: message.into(),
            errors: None,
        }
    }

    /// The failure as a value: a dict of `message`, and `status`, `code` and `errors` when
    /// Zoom gave them.
    pub fn to_value(&self) -> pb::Value {
        let mut items = vec![("message".to_string(), values::string(&self.message))];
        if let Some(status) = self.status {
            items.push(("status".into(), values::integer(i64::from(status))));
        }
        if let Some(code) = self.code {
            items.push(("code".into(), values::integer(code)));
        }
        if let Some(errors) = &self.errors {
            items.push(("errors".into(), (**errors).clone()));
        }
        values::dict(items)
    }
}

/// Arguments by position and by name.
struct Args {
    spec: &'static FunctionSpec,
    by_name: HashMap<String, pb::Value>,
}

impl Args {
    fn new(
        spec: &'static FunctionSpec,
        args: Vec<pb::Value>,
        mut kwargs: HashMap<String, pb::Value>,
    ) -> Result<Self, CallFailure> {
        if args.len() > spec.params.len() {
            return Err(CallFailure::new(format!(
                "{} takes at most {} positional arguments",
                spec.name,
                spec.params.len()
            )));
        }
        for (param, value) in spec.params.iter().zip(args) {
            let name = param.trim_end_matches('*');
            if kwargs.insert(name.to_string(), value).is_some() {
                return Err(CallFailure::new(format!(
                    "{}: {name} given twice",
                    spec.name
                )));
            }
        }
        for param in spec.params.iter().filter(|p| p.ends_with('*')) {
            let name = param.trim_end_matches('*');
            if !kwargs.contains_key(name) {
                return Err(CallFailure::new(format!(
                    "{}: {name} is required",
                    spec.name
                )));
            }
        }
        for (name, value) in &mut kwargs {
            // `list_recordings` takes dates; everything else Zoom's date-times.
            let date_only = spec.name == "list_recordings" && (name == "from" || name == "to");
            times_for_zoom(value, date_only);
        }
        Ok(Self {
            spec,
            by_name: kwargs,
        })
    }

    /// An argument as JSON, if given and not None. JSON has no NaN or infinity, so a value
    /// holding one is refused rather than sent as null.
    fn take(&mut self, name: &str) -> Result<Option<serde_json::Value>, CallFailure> {
        let Some(value) = self.by_name.remove(name) else {
            return Ok(None);
        };
        self.json(name, &value)
    }

    fn json(
        &self,
        name: &str,
        value: &pb::Value,
    ) -> Result<Option<serde_json::Value>, CallFailure> {
        if has_non_finite_float(value) {
            return Err(CallFailure::new(format!(
                "{}: {name} holds a number that is not finite (NaN or infinity)",
                self.spec.name
            )));
        }
        Ok(Some(to_json(value)).filter(|v| !v.is_null()))
    }

    /// A text argument (numbers are accepted as their digits; a float without a fraction as
    /// an integer's, so 8.5746065432e10 names meeting 85746065432).
    fn text(&mut self, name: &str) -> Result<Option<String>, CallFailure> {
        match self.take(name)? {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s)),
            Some(serde_json::Value::Number(n)) => Ok(Some(number_text(&n))),
            Some(_) => Err(CallFailure::new(format!(
                "{}: {name} must be text",
                self.spec.name
            ))),
        }
    }

    fn required_text(&mut self, name: &str) -> Result<String, CallFailure> {
        self.text(name)?
            .filter(|t| !t.is_empty())
            .ok_or_else(|| CallFailure::new(format!("{}: {name} is required", self.spec.name)))
    }

    /// The named query parameters that were given.
    fn query(&mut self, names: &[&str]) -> Result<Vec<(String, String)>, CallFailure> {
        let mut query = Vec::new();
        for name in names {
            if let Some(value) = self.text(name)? {
                query.push((name.to_string(), value));
            }
        }
        Ok(query)
    }

    /// `meeting` (a dict) merged with every keyword argument left but those that are None.
    fn body(&mut self, dict_name: &str) -> Result<serde_json::Value, CallFailure> {
        let mut body = match self.take(dict_name)? {
            None => serde_json::Map::new(),
            Some(serde_json::Value::Object(map)) => map,
            Some(_) => {
                return Err(CallFailure::new(format!(
                    "{}: {dict_name} must be a dict",
                    self.spec.name
                )));
            }
        };
        for (name, value) in std::mem::take(&mut self.by_name) {
            // None leaves the field out, as for every other optional argument; an explicit
            // null goes in through the dict.
            if value.nothing.is_some() {
                continue;
            }
            if has_non_finite_float(&value) {
                self.json(&name, &value)?;
            }
            body.insert(name, to_json(&value));
        }
        Ok(serde_json::Value::Object(body))
    }

    fn no_more(&self) -> Result<(), CallFailure> {
        match self.by_name.keys().next() {
            Some(name) => Err(CallFailure::new(format!(
                "{}: unexpected argument {name}",
                self.spec.name
            ))),
            None => Ok(()),
        }
    }
}

/// The largest float whose integer part is exact: 2^53.
const MAX_EXACT_FLOAT: f64 = 9_007_199_254_740_992.0;

/// Time values anywhere in `value` as the text Zoom takes: `yyyy-MM-ddTHH:mm:ssZ` in UTC
/// (whole seconds), or `yyyy-MM-dd` with `date_only`.
fn times_for_zoom(value: &mut pb::Value, date_only: bool) {
    if let Some(ts) = value.time.as_ref().and_then(|t| t.v.as_ref()) {
        let format = if date_only {
            "%Y-%m-%d"
        } else {
            "%Y-%m-%dT%H:%M:%SZ"
        };
        // Out of chrono's range: left as it is (to_json makes it null).
        if let Some(t) = chrono::DateTime::from_timestamp(ts.seconds, 0) {
            *value = values::string(t.format(format).to_string());
        }
        return;
    }
    let children = value
        .list
        .iter_mut()
        .flat_map(|l| l.vs.iter_mut())
        .chain(value.set.iter_mut().flat_map(|l| l.vs.iter_mut()))
        .chain(
            value
                .dict
                .iter_mut()
                .flat_map(|d| d.items.iter_mut().filter_map(|i| i.v.as_mut())),
        )
        .chain(
            value
                .r#struct
                .iter_mut()
                .flat_map(|s| s.fields.values_mut()),
        );
    for child in children {
        times_for_zoom(child, date_only);
    }
}

/// A number as text: its digits, and a float without a fraction as an integer's.
fn number_text(n: &serde_json::Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() <= MAX_EXACT_FLOAT => {
            format!("{}", f as i64)
        }
        _ => n.to_string(),
    }
}

/// Whether a float anywhere in `value` is NaN or infinite.
fn has_non_finite_float(value: &pb::Value) -> bool {
    value.float.as_ref().is_some_and(|f| !f.v.is_finite())
        || value
            .list
            .as_ref()
            .is_some_and(|l| l.vs.iter().any(has_non_finite_float))
        || value
            .set
            .as_ref()
            .is_some_and(|l| l.vs.iter().any(has_non_finite_float))
        || value.dict.as_ref().is_some_and(|d| {
            d.items
                .iter()
                .any(|i| i.k.iter().chain(&i.v).any(has_non_finite_float))
        })
        || value
            .r#struct
            .as_ref()
            .is_some_and(|s| s.fields.values().any(has_non_finite_float))
}

/// `api`'s query dict as parameters: text as it is, numbers and booleans as their JSON text,
/// None left out (as for the named functions' optional arguments); a list or a dict has no
/// single text to send, so it is refused.
fn query_of(
    map: serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<(String, String)>, CallFailure> {
    let mut query = Vec::with_capacity(map.len());
    for (name, value) in map {
        match value {
            serde_json::Value::Null => {}
            serde_json::Value::String(s) => query.push((name, s)),
            serde_json::Value::Number(n) => query.push((name, number_text(&n))),
            serde_json::Value::Bool(b) => query.push((name, b.to_string())),
            serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
                return Err(CallFailure::new(format!(
                    "api: query parameter {:?} must be text, a number or a boolean",
                    crate::ids::truncate(&name, 64)
                )));
            }
        }
    }
    Ok(query)
}

/// Whether an answer was meant as JSON: it opens an object or a list.
fn looks_like_json(body: &[u8]) -> bool {
    matches!(
        body.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'{' | b'[')
    )
}

/// Characters left as they are in a path segment built from an argument.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'@')
    .remove(b'~');

fn segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// A call that did not reach Zoom or got no answer, as the call's failure.
fn call_error(e: CallError) -> CallFailure {
    match e {
        CallError::BadPath(e) => CallFailure::new(e.to_string()),
        CallError::Zoom(e) => CallFailure::new(e.to_string()),
        e @ CallError::Unanswered { .. } => CallFailure::new(e.to_string()),
    }
}

/// Runs the functions of [`FUNCTIONS`] through a connection.
pub struct Functions {
    credentials: std::sync::Arc<Credentials>,
    api: ZoomApi,
}

impl Functions {
    /// Functions using `credentials` and `api`.
    pub fn new(credentials: std::sync::Arc<Credentials>, api: ZoomApi) -> Self {
        Self { credentials, api }
    }

    /// A token for a call through `cid`, or the call's failure.
    async fn access_token(&self, cid: &ConnectionId) -> Result<Access, CallFailure> {
        self.credentials
            .access_token(cid)
            .await
            .map_err(|e| match e {
                CredentialError::Host(e @ HostError::Undecryptable { .. }) => {
                    tracing::error!(error = %e, "stored data is corrupt");
                    CallFailure::new(format!(
                        "the connection cannot be used: {}",
                        e.with_way_out()
                    ))
                }
                CredentialError::Host(HostError::NotFound(_)) => {
                    CallFailure::new("the connection does not exist (anymore)")
                }
                CredentialError::Host(HostError::InvalidArgument(message)) => {
                    CallFailure::new(format!("the host engine refused the connection: {message}"))
                }
                CredentialError::Host(e @ HostError::Unavailable(_)) => {
                    tracing::warn!(connection_id = %cid, error = %e, "cannot read the connection for a call");
                    CallFailure::new("the host engine is unavailable: try again later")
                }
                CredentialError::Host(e) => {
                    tracing::error!(connection_id = %cid, error = %e, "cannot read the connection for a call");
                    CallFailure::new("the connection could not be read (the error is in this service's log)")
                }
                // Zoom's token endpoint busy or down: the connection is fine, and the call can
                // be tried again (a 429 has its `status`, as the API's own has).
                CredentialError::Zoom(ZoomError::Rejected { status: 429, .. }) => CallFailure {
                    status: Some(429),
                    ..CallFailure::new(
                        "Zoom is limiting the connection's token requests right now: try again in a few seconds",
                    )
                },
                CredentialError::Zoom(e @ (ZoomError::Unavailable(_) | ZoomError::Timeout)) => {
                    CallFailure::new(format!(
                        "Zoom could not issue the connection's token ({e}): try again later"
                    ))
                }
                other => CallFailure::new(format!("the connection cannot be used: {other}")),
            })
    }

    /// Calls `name` with `args` and `kwargs` through connection `cid`, for a caller that
    /// waits until `deadline`.
    pub async fn call(
        &self,
        cid: &ConnectionId,
        name: &str,
        args: Vec<pb::Value>,
        kwargs: HashMap<String, pb::Value>,
        deadline: tokio::time::Instant,
    ) -> Result<pb::Value, CallFailure> {
        let spec = FUNCTIONS.iter().find(|f| f.name == name).ok_or_else(|| {
            CallFailure::new(format!(
                "unknown function {:?}",
                crate::ids::truncate(name, 64)
            ))
        })?;
        let mut args = Args::new(spec, args, kwargs)?;
        let user = |args: &mut Args| -> Result<String, CallFailure> {
            match args.text("user_id")? {
                None => Ok("me".into()),
                // Would make `/users//…`, which Zoom answers with a puzzling 404.
                Some(user) if user.is_empty() => Err(CallFailure::new(format!(
                    "{name}: user_id must not be empty (leave it out for \"me\")"
                ))),
                Some(user) => Ok(segment(&user)),
            }
        };
        let (method, path, query, body, wrap) = match name {
            "api" => {
                let method = args.required_text("method")?.to_ascii_uppercase();
                let method = match method.as_str() {
                    "GET" | "POST" | "PATCH" | "PUT" | "DELETE" => {
                        reqwest::Method::from_bytes(method.as_bytes()).map_err(|_| {
                            CallFailure::new("api: method must be GET, POST, PATCH, PUT or DELETE")
                        })?
                    }
                    _ => {
                        return Err(CallFailure::new(
                            "api: method must be GET, POST, PATCH, PUT or DELETE",
                        ));
                    }
                };
                let path = args.required_text("path")?;
                let query = match args.take("query")? {
                    None => Vec::new(),
                    Some(serde_json::Value::Object(map)) => query_of(map)?,
                    Some(_) => return Err(CallFailure::new("api: query must be a dict")),
                };
                let body = args.take("body")?;
                args.no_more()?;
                (method, path, query, body, true)
            }
            "get_user" => {
                let path = format!("/users/{}", user(&mut args)?);
                args.no_more()?;
                (reqwest::Method::GET, path, Vec::new(), None, false)
            }
            "list_meetings" => {
                let path = format!("/users/{}/meetings", user(&mut args)?);
                let query = args.query(&["type", "page_size", "next_page_token"])?;
                args.no_more()?;
                (reqwest::Method::GET, path, query, None, false)
            }
            "get_meeting" | "delete_meeting" => {
                let path = format!("/meetings/{}", segment(&args.required_text("meeting_id")?));
                args.no_more()?;
                let method = if name == "get_meeting" {
                    reqwest::Method::GET
                } else {
                    reqwest::Method::DELETE
                };
                (method, path, Vec::new(), None, false)
            }
            "create_meeting" => {
                let path = format!("/users/{}/meetings", user(&mut args)?);
                let body = args.body("meeting")?;
                (reqwest::Method::POST, path, Vec::new(), Some(body), false)
            }
            "update_meeting" => {
                let path = format!("/meetings/{}", segment(&args.required_text("meeting_id")?));
                let body = args.body("meeting")?;
                (reqwest::Method::PATCH, path, Vec::new(), Some(body), false)
            }
            "list_recordings" => {
                let path = format!("/users/{}/recordings", user(&mut args)?);
                let query = args.query(&["from", "to", "page_size", "next_page_token"])?;
                args.no_more()?;
                (reqwest::Method::GET, path, query, None, false)
            }
            _ => unreachable!("every function in FUNCTIONS is handled"),
        };

        // Refuse a bad path before a token is fetched for it.
        crate::zoom::api::check_path(&path).map_err(|e| CallFailure::new(e.to_string()))?;
        // A token request in flight (this call's or another's) is waited for until a second
        // before the caller's deadline; it goes on without the caller.
        let cutoff = deadline
            .checked_sub(crate::zoom::api::RETRY_MARGIN)
            .unwrap_or(deadline);
        let access = tokio::time::timeout_at(cutoff, self.access_token(cid))
            .await
            .map_err(|_| {
                CallFailure::new(
                    "the connection's token did not come in time (Zoom is slow to issue it): try again",
                )
            })??;
        let send = async |token: &crate::secret::Secret| {
            self.api
                .call(
                    token,
                    method.clone(),
                    &path,
                    &query,
                    body.as_ref(),
                    deadline,
                )
                .await
                .map_err(call_error)
        };
        let mut answer = send(&access.token).await?;
        if answer.status == 401 {
            // A token Zoom no longer accepts (revoked, or the app was deauthorized): never
            // used again. Zoom carried out nothing it answered 401, so the request is sent
            // once more, whatever its method, with a new token if one comes in time.
            // Within the caller's deadline, waiting for another caller's token request
            // included: past it, the caller gets the 401.
            let cutoff = deadline
                .checked_sub(2 * crate::zoom::api::RETRY_MARGIN)
                .unwrap_or(deadline);
            let renewal = async {
                self.credentials.reject(cid, &access.token).await;
                self.access_token(cid).await
            };
            if let Ok(renewed) = tokio::time::timeout_at(cutoff, renewal).await {
                let renewed = renewed?;
                if renewed.token != access.token {
                    answer = send(&renewed.token).await?;
                    if answer.status == 401 {
                        let rejected = self.credentials.reject(cid, &renewed.token);
                        let _ = tokio::time::timeout_at(deadline, rejected).await;
                    }
                }
            }
        }
        let body = if answer.body.iter().all(u8::is_ascii_whitespace) {
            values::nothing()
        } else {
            match crate::webhook::normalize::value(&answer.body) {
                Ok(value) => value,
                // JSON past the limits of a value (too many values, too deep, a number out of
                // range): passing it on as text would hand the workflow something else than
                // Zoom's answer without saying so.
                Err(e) if looks_like_json(&answer.body) => {
                    return Err(CallFailure {
                        status: Some(answer.status),
                        code: None,
                        message: format!(
                            "Zoom answered HTTP {} with JSON that cannot be passed on as a value: {}",
                            answer.status,
                            e.reason()
                        ),
                        errors: None,
                    });
                }
                // Not JSON (a proxy's page, say): a success is still a success, as text.
                Err(_) => match std::str::from_utf8(&answer.body) {
                    Ok(text) if answer.status < 400 => crate::values::string(text),
                    _ => {
                        return Err(CallFailure {
                            status: Some(answer.status),
                            code: None,
                            message: format!(
                                "Zoom answered HTTP {} with something that is not JSON",
                                answer.status
                            ),
                            errors: None,
                        });
                    }
                },
            }
        };
        if answer.status >= 400 {
            let json = to_json(&body);
            return Err(CallFailure {
                status: Some(answer.status),
                code: json.get("code").and_then(serde_json::Value::as_i64),
                message: json
                    .get("message")
                    .and_then(serde_json::Value::as_str)
                    .map_or_else(
                        || format!("Zoom answered HTTP {}", answer.status),
                        str::to_string,
                    ),
                errors: body.dict.as_ref().and_then(|d| {
                    d.items
                        .iter()
                        .find(|i| {
                            i.k.as_ref()
                                .and_then(|k| k.string.as_ref())
                                .is_some_and(|k| k.v == "errors")
                        })
                        .and_then(|i| i.v.clone())
                        .map(Box::new)
                }),
            });
        }
        Ok(if wrap {
            values::dict(vec![
                ("status".into(), values::integer(i64::from(answer.status))),
                ("body".into(), body),
            ])
        } else {
            body
        })
    }
}
