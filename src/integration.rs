//! How the `zoom` integration describes itself to host engines.

use std::collections::HashMap;

use crate::config::Config;
use crate::connection::init_required;
use crate::ids::{INTEGRATION_ID, INTEGRATION_NAME};
use crate::proto::autokitteh::connections::v1::Capabilities;
use crate::proto::autokitteh::integrations::v1::Integration;

/// Path of the connection page.
pub const CONNECTION_PATH: &str = "/zoom/";
/// Path of the logo.
pub const LOGO_PATH: &str = "/zoom/logo.svg";

/// The integration descriptor returned by `IntegrationsService.Get` and `List`.
pub fn descriptor(config: &Config) -> Integration {
    Integration {
        integration_id: INTEGRATION_ID.clone(),
        unique_name: INTEGRATION_NAME.into(),
        display_name: "Zoom".into(),
        description: "Zoom meetings, users and recordings for workflows, and Zoom webhook events \
                      (meetings, participants, recordings) as triggers."
            .into(),
        logo_url: config
            .public_url(LOGO_PATH)
            .unwrap_or_else(|| LOGO_PATH.into()),
        user_links: HashMap::from([
            (
                "1 REST API reference".into(),
                "https://developers.zoom.us/docs/api/".into(),
            ),
            (
                "2 Webhook events".into(),
                "https://developers.zoom.us/docs/api/webhooks/".into(),
            ),
        ]),
        // Absolute: a host engine sends browsers here from its own site.
        connection_url: config
            .public_url(CONNECTION_PATH)
            .unwrap_or_else(|| CONNECTION_PATH.into()),
        module: Some(crate::functions::module()),
        connection_capabilities: Some(Capabilities {
            supports_connection_test: true,
            supports_connection_init: true,
            requires_connection_init: true,
        }),
        initial_connection_status: Some(init_required()),
    }
}

/// True when `name_or_id` names this integration (by id or by unique name).
pub fn is_this_integration(name_or_id: &str) -> bool {
    name_or_id == INTEGRATION_ID.as_str() || name_or_id == INTEGRATION_NAME
}
