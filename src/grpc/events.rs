//! `autokitteh.events.v1.EventsService`, served by the embedded host: the log of events that
//! webhooks produced, for people and tools to read when no host engine is configured.

use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::grpc::integrations::check_integration;
use crate::host::embedded::{EmbeddedHost, EventFilter};
use crate::proto::autokitteh::events::v1 as pb;
use crate::proto::autokitteh::events::v1::events_service_server::EventsService;
use crate::proto::autokitteh::values::v1 as pb_values;
use crate::values;

/// Events listed when the request does not say how many.
pub const DEFAULT_LIST_LIMIT: u32 = 100;
/// The most events one List returns.
pub const MAX_LIST_LIMIT: u32 = 1000;

/// EventsService over the embedded host's event log.
pub struct EventsApi {
    host: EmbeddedHost,
}

impl EventsApi {
    /// Serves `host`'s event log.
    pub fn new(host: EmbeddedHost) -> Self {
        Self { host }
    }
}

/// The longest `event_type` `Save` accepts, in bytes.
pub const MAX_EVENT_TYPE: usize = 256;
/// The most values and keys (at every depth) an event's `data` may hold: as many as a webhook's
/// event may (`webhook::normalize::MAX_VALUES`), so every event in the log can be read back
/// within the same memory.
pub const MAX_EVENT_VALUES: usize = crate::webhook::normalize::MAX_VALUES;
/// The most `memo` entries `Save` accepts.
pub const MAX_MEMO_ENTRIES: usize = 64;
/// The longest `memo` key or value `Save` accepts, in bytes.
pub const MAX_MEMO_TEXT: usize = 4096;

/// `destination_id` must be a connection or trigger id (`what` names the field).
fn check_destination(id: &str, what: &str) -> Result<(), ApiError> {
    if crate::ids::is_destination_id(id) {
        return Ok(());
    }
    Err(ApiError::InvalidArgument(format!(
        "{what} {:?} is malformed: expected a connection id (con_ and 26 lower-case base32 characters) or a trigger id (trg_...)",
        crate::ids::truncate(id, 64)
    )))
}

/// What `Save` checks beyond what the log itself requires: ids and sizes, so a caller cannot
/// fill the log with events nobody can route or read.
fn check_saved(event: &pb::Event) -> Result<(), ApiError> {
    if !event.destination_id.is_empty() {
        check_destination(&event.destination_id, "event.destination_id")?;
    }
    if event.event_type.len() > MAX_EVENT_TYPE {
        return Err(ApiError::InvalidArgument(format!(
            "event.event_type is longer than {MAX_EVENT_TYPE} bytes"
        )));
    }
    if !within_value_budget(&event.data) {
        return Err(ApiError::InvalidArgument(format!(
            "event.data holds more than {MAX_EVENT_VALUES} values and keys"
        )));
    }
    if event.memo.len() > MAX_MEMO_ENTRIES {
        return Err(ApiError::InvalidArgument(format!(
            "event.memo has more than {MAX_MEMO_ENTRIES} entries"
        )));
    }
    if event
        .memo
        .iter()
        .any(|(k, v)| k.len() > MAX_MEMO_TEXT || v.len() > MAX_MEMO_TEXT)
    {
        return Err(ApiError::InvalidArgument(format!(
            "event.memo keys and values are at most {MAX_MEMO_TEXT} bytes"
        )));
    }
    Ok(())
}

/// Whether `data`'s keys and values, at every depth, number at most [`MAX_EVENT_VALUES`].
fn within_value_budget(data: &std::collections::HashMap<String, pb_values::Value>) -> bool {
    let mut budget = MAX_EVENT_VALUES;
    data.values().all(|value| match budget.checked_sub(1) {
        // The key, then the value and what it holds.
        Some(left) => {
            budget = left;
            values::take_values(value, &mut budget)
        }
        None => false,
    })
}

/// With `json_values`, AutoKitteh returns every data value as a string holding its JSON.
fn present(mut event: pb::Event, json_values: bool) -> pb::Event {
    if json_values {
        for value in event.data.values_mut() {
            *value = values::string(values::to_json(value).to_string());
        }
    }
    event
}

#[tonic::async_trait]
impl EventsService for EventsApi {
    async fn save(
        &self,
        request: Request<pb::SaveRequest>,
    ) -> Result<Response<pb::SaveResponse>, Status> {
        let event = request
            .into_inner()
            .event
            .ok_or_else(|| ApiError::InvalidArgument("event is required".into()))?;
        check_saved(&event)?;
        let event_id = self.host.save_event(event).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::SaveResponse { event_id }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let req = request.into_inner();
        if req.event_id.is_empty() {
            return Err(ApiError::InvalidArgument("event_id is required".into()).into());
        }
        if !crate::ids::is_event_id(&req.event_id) {
            return Err(ApiError::InvalidArgument(format!(
                "event_id {:?} is malformed: expected evt_ and 26 lower-case base32 characters",
                crate::ids::truncate(&req.event_id, 64)
            ))
            .into());
        }
        let event = self
            .host
            .get_event(&req.event_id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no event {:?}",
                    crate::ids::truncate(&req.event_id, 64)
                ))
            })?;
        Ok(Response::new(pb::GetResponse {
            event: Some(present(event, req.json_values)),
        }))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let req = request.into_inner();
        if !req.integration_id.is_empty() {
            check_integration(&req.integration_id)?;
        }
        if !req.project_id.is_empty() || !req.org_id.is_empty() {
            return Err(ApiError::InvalidArgument(
                "the embedded host has no projects or orgs: leave project_id and org_id empty"
                    .into(),
            )
            .into());
        }
        let ascending = match req.order.to_ascii_uppercase().as_str() {
            "" | "DESC" => false,
            "ASC" => true,
            _ => {
                return Err(ApiError::InvalidArgument("order must be ASC or DESC".into()).into());
            }
        };
        let limit = match req.max_results {
            0 => DEFAULT_LIST_LIMIT,
            n => n.min(MAX_LIST_LIMIT),
        };
        if !req.destination_id.is_empty() {
            check_destination(&req.destination_id, "destination_id")?;
        }
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        let events = self
            .host
            .list_events(EventFilter {
                destination_id: non_empty(req.destination_id),
                event_type: non_empty(req.event_type),
                limit,
                ascending,
            })
            .await
            .map_err(ApiError::from)?;
        // Listed without their data, as AutoKitteh lists them: a page of large webhooks would
        // otherwise outgrow a client's message limit. `Get` has the data.
        Ok(Response::new(pb::ListResponse {
            events: events
                .into_iter()
                .map(|e| present(e, req.json_values))
                .collect(),
        }))
    }
}
