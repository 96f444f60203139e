//! End-to-end tests: the whole service started on port 0 (in process, or as a real process),
//! talked to through real HTTP and gRPC clients, with fakes only for the outside world.

mod fake_host;
mod fake_zoom;
mod helpers;
mod user_agent;
mod webdriver;

mod bounds;
mod browser;
mod calls;
mod connect_protocol;
mod connection_setup;
mod embedded_host;
mod faults;
mod fresh_tokens;
mod inactive_connections;
mod integrations_api;
mod metrics;
mod process;
mod remote_host;
mod secrets;
mod setup_links;
mod webhooks;
