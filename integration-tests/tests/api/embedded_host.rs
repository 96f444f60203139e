//! The embedded host through its gRPC services: variables and events, across restarts.

use zoom_integration::ids::ConnectionId;
use zoom_integration::proto::autokitteh::events::v1 as events;
use zoom_integration::proto::autokitteh::values::v1 as values;
use zoom_integration::proto::autokitteh::vars::v1 as vars;

use crate::helpers::{spawn_app_in, var, zoom_id};

const CLIENT_SECRET: &str = "cs-9f8e7d6c5b4a-Geheimnis-ÄÖÜ";
const REFRESH_TOKEN: &str = "rt-eyJhbGciOiJIUzUxMiJ9-distinctive";

#[tokio::test]
async fn variables_survive_a_restart_and_secrets_stay_sealed_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let cid = ConnectionId::generate().to_string();

    let app = spawn_app_in(dir.path(), &[]).await;
    app.vars()
        .set(vars::SetRequest {
            vars: vec![
                var(&cid, "auth_type", "oauthPrivate", false),
                var(&cid, "private_client_id", "client-id-visible", false),
                var(&cid, "private_client_secret", CLIENT_SECRET, true),
                // A caller that forgets the flag on one of the integration's secrets.
                var(&cid, "oauth_refresh_token", REFRESH_TOKEN, false),
            ],
        })
        .await
        .unwrap();
    app.stop().await.expect("graceful stop");

    let mut files = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        // A database's -wal and -shm files go when its last handle closes, which may be a
        // moment after the stop returns (a blocking task finishing).
        let bytes = match std::fs::read(entry.unwrap().path()) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{e}"),
        };
        files += 1;
        for secret in [CLIENT_SECRET, REFRESH_TOKEN] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a secret is readable in the data directory"
            );
        }
    }
    assert!(files >= 1, "the database file expected");
    assert!(
        dir.path()
            .join(zoom_integration::host::embedded::DB_FILE)
            .is_file()
    );

    let app = spawn_app_in(dir.path(), &[]).await;
    let stored = app.stored_vars(&cid, &[]).await;
    let find = |name: &str| stored.iter().find(|v| v.name == name).unwrap().clone();
    assert_eq!(stored.len(), 4);
    assert_eq!(find("private_client_secret").value, CLIENT_SECRET);
    assert!(find("private_client_secret").is_secret);
    assert_eq!(find("oauth_refresh_token").value, REFRESH_TOKEN);
    assert!(find("oauth_refresh_token").is_secret);
    assert_eq!(find("private_client_id").value, "client-id-visible");

    let found = app
        .vars()
        .find_active_connection_i_ds(vars::FindActiveConnectionIDsRequest {
            integration_id: zoom_id(),
            name: "private_client_id".into(),
            value: "client-id-visible".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .connection_ids;
    assert_eq!(found, vec![cid.clone()]);

    app.vars()
        .delete(vars::DeleteRequest {
            scope_id: cid.clone(),
            names: vec!["oauth_refresh_token".into()],
        })
        .await
        .unwrap();
    let left = app.stored_vars(&cid, &["oauth_refresh_token"]).await;
    assert!(left.is_empty());
    // An empty Set changes nothing and succeeds, as AutoKitteh's does.
    app.vars()
        .set(vars::SetRequest { vars: vec![] })
        .await
        .expect("an empty set is OK");
    assert_eq!(app.stored_vars(&cid, &[]).await.len(), 3);
}

#[tokio::test]
async fn a_restart_with_another_secret_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path(), &[]).await;
    app.stop().await.unwrap();

    let config = zoom_integration::config::Config::load(vec![
        ("DATA_DIR".to_string(), dir.path().display().to_string()),
        (
            "SECRET_KEY".to_string(),
            "a different key material of 32+ chars".to_string(),
        ),
    ])
    .unwrap();
    let err = zoom_integration::AppState::build(config)
        .err()
        .expect("must refuse");
    let config_err = err
        .downcast_ref::<zoom_integration::config::ConfigError>()
        .expect("a configuration error");
    assert_eq!(config_err.variable, "SECRET_KEY");
}

#[tokio::test]
async fn a_second_process_on_a_data_dir_in_use_stops_before_touching_it() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().display().to_string();
    let key = "the running service's key material, 32+ chars";
    let running = zoom_integration::AppState::build(
        zoom_integration::config::Config::load(vec![
            ("DATA_DIR".to_string(), data_dir.clone()),
            ("SECRET_KEY".to_string(), key.to_string()),
        ])
        .unwrap(),
    )
    .unwrap();

    // Started without SECRET_KEY, it would generate a key file; with another key, it would
    // find the database sealed with the running one's. Either way the lock comes first.
    for secret_key in [None, Some("another key material, also 32+ chars")] {
        let mut env = vec![("DATA_DIR".to_string(), data_dir.clone())];
        env.extend(secret_key.map(|k| ("SECRET_KEY".to_string(), k.to_string())));
        let config = zoom_integration::config::Config::load(env).unwrap();
        let err = zoom_integration::AppState::build(config)
            .err()
            .expect("must refuse");
        assert!(
            format!("{err:#}").contains("in use by another process"),
            "{err:#}"
        );
        assert!(
            !dir.path().join(zoom_integration::crypto::KEY_FILE).exists(),
            "no key file generated"
        );
    }
    drop(running);
}

#[tokio::test]
async fn events_saved_in_the_embedded_host_are_listed_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path(), &[]).await;
    let cid = ConnectionId::generate().to_string();
    let big = values::Value {
        integer: Some(values::Integer { v: 85_746_065_432 }),
        ..Default::default()
    };
    let text = values::Value {
        string: Some(values::String {
            v: "Café ☕ 会議".into(),
        }),
        ..Default::default()
    };
    let saved = app
        .events()
        .save(events::SaveRequest {
            event: Some(events::Event {
                destination_id: cid.clone(),
                event_type: "meeting.started".into(),
                data: [
                    ("id".to_string(), big.clone()),
                    ("topic".to_string(), text.clone()),
                ]
                .into(),
                memo: [("account_id".to_string(), "acc-1".to_string())].into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .event_id;
    assert!(saved.starts_with("evt_"));

    let got = app
        .events()
        .get(events::GetRequest {
            event_id: saved.clone(),
            json_values: false,
        })
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    assert_eq!(got.data["id"], big);
    assert_eq!(got.data["topic"], text);
    assert_eq!(got.memo["account_id"], "acc-1");
    assert_eq!(got.destination_id, cid);

    // Listed without their data, as AutoKitteh lists them; Get has it.
    let listed = app
        .events()
        .list(events::ListRequest {
            integration_id: zoom_id(),
            destination_id: cid.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].event_id, saved);
    assert_eq!(listed[0].memo["account_id"], "acc-1");
    assert!(listed[0].data.is_empty());

    let as_json = app
        .events()
        .get(events::GetRequest {
            event_id: saved.clone(),
            json_values: true,
        })
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    assert_eq!(as_json.data["id"].string.as_ref().unwrap().v, "85746065432");
    assert_eq!(
        as_json.data["topic"].string.as_ref().unwrap().v,
        "\"Café ☕ 会議\""
    );

    let other = app
        .events()
        .list(events::ListRequest {
            event_type: "meeting.ended".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(other.is_empty());
}

#[tokio::test]
async fn events_that_cannot_be_routed_or_read_are_refused_and_nothing_is_saved() {
    let app = crate::helpers::spawn_app().await;
    let cid = ConnectionId::generate().to_string();
    let event = |destination_id: &str| events::Event {
        destination_id: destination_id.into(),
        event_type: "meeting.started".into(),
        ..Default::default()
    };
    let mut long_type = event(&cid);
    long_type.event_type = "t".repeat(257);
    let mut wide_memo = event(&cid);
    wide_memo.memo = (0..65)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    let mut long_memo = event(&cid);
    long_memo.memo = [("k".to_string(), "v".repeat(4097))].into();
    let mut past_year_9999 = event(&cid);
    past_year_9999.created_at = Some(prost_types::Timestamp {
        seconds: 1_000_000_000_000,
        nanos: 0,
    });
    for bad in [
        event("x"),
        event("con_tooshort"),
        long_type,
        wide_memo,
        long_memo,
        past_year_9999,
    ] {
        let refused = app
            .events()
            .save(events::SaveRequest { event: Some(bad) })
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    }
    let refused = app
        .events()
        .list(events::ListRequest {
            destination_id: "not-a-connection".into(),
            ..Default::default()
        })
        .await
        .expect_err("a malformed filter is refused, not an empty list");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    // A trigger id is a destination too.
    app.events()
        .save(events::SaveRequest {
            event: Some(event("trg_01jf3x0000000000000000000a")),
        })
        .await
        .unwrap();
    let all = app
        .events()
        .list(events::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(all.len(), 1, "only the valid event was saved");
}

#[tokio::test]
async fn events_holding_more_values_than_a_webhook_may_are_refused_before_they_are_saved() {
    let app = crate::helpers::spawn_app().await;
    let cid = ConnectionId::generate().to_string();
    // The key, the list and its elements: one over the bound, then exactly at it.
    let event = |elements: usize| events::Event {
        destination_id: cid.clone(),
        event_type: "meeting.started".into(),
        data: [(
            "payload".to_string(),
            values::Value {
                list: Some(values::List {
                    vs: vec![Default::default(); elements],
                }),
                ..Default::default()
            },
        )]
        .into(),
        ..Default::default()
    };
    let bound = zoom_integration::grpc::events::MAX_EVENT_VALUES;
    let refused = app
        .events()
        .save(events::SaveRequest {
            event: Some(event(bound - 1)),
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("100000 values"), "{refused:?}");
    // Past the request limit, before anything is decoded (2 bytes on the wire per element).
    let refused = app
        .events()
        .save(events::SaveRequest {
            event: Some(event(zoom_integration::grpc::MAX_EVENTS_REQUEST_BYTES / 2)),
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    let listed = |app: &crate::helpers::TestApp| {
        let mut events = app.events();
        async move {
            events
                .list(events::ListRequest::default())
                .await
                .unwrap()
                .into_inner()
                .events
                .len()
        }
    };
    assert_eq!(listed(&app).await, 0, "nothing was saved");

    let saved = app
        .events()
        .save(events::SaveRequest {
            event: Some(event(bound - 2)),
        })
        .await
        .unwrap()
        .into_inner();
    let read = app
        .events()
        .get(events::GetRequest {
            event_id: saved.event_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    assert_eq!(
        read.data["payload"].list.as_ref().unwrap().vs.len(),
        bound - 2
    );
    assert_eq!(listed(&app).await, 1);
}

#[tokio::test]
async fn events_older_than_the_retention_are_deleted_and_newer_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app_in(dir.path(), &[]).await;
    let cid = ConnectionId::generate().to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (days_ago, event_type) in [(40, "old"), (29, "recent"), (0, "new")] {
        app.events()
            .save(events::SaveRequest {
                event: Some(events::Event {
                    destination_id: cid.clone(),
                    event_type: event_type.into(),
                    created_at: Some(prost_types::Timestamp {
                        seconds: now - days_ago * 86_400,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    app.stop().await.unwrap();

    // The log is trimmed as the service starts (then hourly), to the default 30 days.
    let app = spawn_app_in(dir.path(), &[]).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let types: Vec<String> = app
            .events()
            .list(events::ListRequest {
                order: "ASC".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events
            .into_iter()
            .map(|e| e.event_type)
            .collect();
        if types == ["recent", "new"] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {types:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
