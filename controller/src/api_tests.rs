//! HTTP tests through `app(state)` and `oneshot`, on SQLite and on PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::StreamExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::{ApiConfig, AppState};
use crate::reconcile::{Action, Context};
use crate::resources::Kind;
use crate::testing::{TestStore, context, store_suite};

/// The administrator token of the test servers; every request presents it unless it sets an
/// `Authorization` of its own.
const ADMIN: &str =
    "ceccm_00000000000000ad_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The join token of the test servers (agents exchange it for their region's token).
const JOIN: &str =
    "ceccm_00000000000000a1_abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789";

/// The API as served, with the administrator's token added to requests that carry none.
fn app(state: AppState) -> Router {
    super::app(state).layer(axum::middleware::map_request(
        |mut request: Request<Body>| async move {
            if !request.headers().contains_key("authorization") {
                request
                    .headers_mut()
                    .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
            }
            request
        },
    ))
}

fn state(ts: &TestStore) -> AppState {
    state_with(ts, ApiConfig::new(ts.dir.path().to_path_buf()))
}

fn state_with(ts: &TestStore, config: ApiConfig) -> AppState {
    let admin = crate::tokens::StaticToken::new(ADMIN, "admin", crate::auth::Role::Admin);
    let join = crate::tokens::StaticToken::new(JOIN, "join", crate::auth::Role::Join);
    AppState {
        store: ts.store.clone(),
        config: Arc::new(ApiConfig {
            static_tokens: admin.into_iter().chain(join).collect(),
            ..config
        }),
        metrics: Default::default(),
        predictor: Default::default(),
        live_logs: Default::default(),
    }
}

struct Answer {
    status: StatusCode,
    body: Value,
    text: String,
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    content_type: &str,
    body: impl Into<Body>,
) -> Answer {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", content_type)
        .body(body.into())
        .unwrap();
    send(app, request).await
}

/// Sends `request` through `app` and reads the whole answer.
async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Answer {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

async fn json_call(app: &Router, method: &str, uri: &str, body: &Value) -> Answer {
    call(app, method, uri, "application/json", body.to_string()).await
}

async fn get(app: &Router, uri: &str) -> Answer {
    call(app, "GET", uri, "application/json", Body::empty()).await
}

fn region(name: &str, cpu: u32, tier: &str) -> Value {
    json!({"apiVersion": "ceccm/v1", "kind": "Region",
           "metadata": {"name": name, "labels": {"tier": tier}},
           "spec": {"tier": tier, "driver": "local", "capacity": {"cpu": cpu}}})
}

fn batch(name: &str, tasks: usize, regions: &[&str]) -> Value {
    let tasks: Vec<Value> = (0..tasks)
        .map(|i| json!({"command": "echo", "args": [i.to_string()]}))
        .collect();
    json!({"apiVersion": "ceccm/v1", "kind": "Application", "metadata": {"name": name},
           "spec": {"app": "container", "tasks": tasks, "maxAttempts": 2,
                    "placement": {"regions": regions}}})
}

fn assert_error(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.text);
    assert_eq!(answer.body["error"]["code"], code, "{}", answer.text);
    assert!(
        answer.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(
        answer.body["error"]["details"].is_object(),
        "{}",
        answer.text
    );
}

async fn crud_follows_kubectl_conventions(ts: &TestStore) {
    let app = app(state(ts));
    let created = json_call(
        &app,
        "POST",
        "/api/v1/regions",
        &region("edge-a", 2, "edge"),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert_eq!(created.body["metadata"]["generation"], 1);
    assert!(created.body["metadata"]["uid"].is_string());
    let again = json_call(
        &app,
        "POST",
        "/api/v1/regions",
        &region("edge-a", 2, "edge"),
    )
    .await;
    assert_error(&again, StatusCode::CONFLICT, "AlreadyExists");

    let fetched = get(&app, "/api/v1/regions/edge-a").await;
    assert_eq!(fetched.body, created.body);
    let same = json_call(
        &app,
        "PUT",
        "/api/v1/regions/edge-a",
        &region("edge-a", 2, "edge"),
    )
    .await;
    assert_eq!(same.status, StatusCode::OK);
    assert_eq!(
        same.body["metadata"]["resourceVersion"],
        created.body["metadata"]["resourceVersion"]
    );

    let mut bigger = region("edge-a", 4, "edge");
    bigger["metadata"]["resourceVersion"] = created.body["metadata"]["resourceVersion"].clone();
    let updated = json_call(&app, "PUT", "/api/v1/regions/edge-a", &bigger).await;
    assert_eq!(updated.status, StatusCode::OK);
    assert_eq!(updated.body["metadata"]["generation"], 2);
    let fresh = json_call(
        &app,
        "PUT",
        "/api/v1/regions/cloud-b",
        &region("cloud-b", 8, "cloud"),
    )
    .await;
    assert_eq!(fresh.status, StatusCode::CREATED);

    let list = get(&app, "/api/v1/regions").await;
    assert_eq!(list.body["kind"], "RegionList");
    assert_eq!(list.body["items"].as_array().unwrap().len(), 2);
    assert_eq!(
        list.body["metadata"]["resourceVersion"],
        fresh.body["metadata"]["resourceVersion"]
    );

    let deleted = call(
        &app,
        "DELETE",
        "/api/v1/regions/edge-a",
        "application/json",
        Body::empty(),
    )
    .await;
    assert_eq!(deleted.status, StatusCode::OK);
    assert!(deleted.body["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(deleted.body["status"]["phase"], "Deleting");
    assert_error(
        &get(&app, "/api/v1/regions/nope").await,
        StatusCode::NOT_FOUND,
        "NotFound",
    );
    assert_error(
        &get(&app, "/api/v1/widgets").await,
        StatusCode::NOT_FOUND,
        "NotFound",
    );
    assert_error(
        &get(&app, "/nowhere").await,
        StatusCode::NOT_FOUND,
        "NotFound",
    );
}

async fn bad_input_answers_errors_and_changes_nothing(ts: &TestStore) {
    let mut config = ApiConfig::new(ts.dir.path().to_path_buf());
    config.max_body_bytes = 4096;
    let app = app(state_with(ts, config));
    assert_eq!(
        json_call(
            &app,
            "POST",
            "/api/v1/regions",
            &region("edge-a", 2, "edge")
        )
        .await
        .status,
        StatusCode::CREATED
    );
    let first_version = ts.store.current_version().await.unwrap().to_string();
    json_call(
        &app,
        "PUT",
        "/api/v1/regions/edge-a",
        &region("edge-a", 3, "edge"),
    )
    .await;
    let before = ts.store.current_version().await.unwrap();
    let stored_before = get(&app, "/api/v1/regions/edge-a").await.body;

    let malformed_json = call(
        &app,
        "POST",
        "/api/v1/regions",
        "application/json",
        "{\"metadata\": ",
    )
    .await;
    assert_error(&malformed_json, StatusCode::BAD_REQUEST, "BadRequest");
    let malformed_yaml = call(
        &app,
        "POST",
        "/api/v1/regions",
        "application/yaml",
        "metadata: [unclosed",
    )
    .await;
    assert_error(&malformed_yaml, StatusCode::BAD_REQUEST, "BadRequest");
    let mut unknown = region("edge-b", 2, "edge");
    unknown["spec"]["colour"] = json!("red");
    let answer = json_call(&app, "POST", "/api/v1/regions", &unknown).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "BadRequest");
    assert!(answer.text.contains("colour"));
    let answer = json_call(
        &app,
        "POST",
        "/api/v1/regions",
        &region("Edge_B", 2, "edge"),
    )
    .await;
    assert_error(&answer, StatusCode::UNPROCESSABLE_ENTITY, "Invalid");
    assert_eq!(
        answer.body["error"]["details"]["causes"][0]["field"],
        "metadata.name"
    );
    let mut stale = region("edge-a", 4, "edge");
    stale["metadata"]["resourceVersion"] = json!(first_version);
    let answer = json_call(&app, "PUT", "/api/v1/regions/edge-a", &stale).await;
    assert_error(&answer, StatusCode::CONFLICT, "Conflict");
    let mut huge = region("edge-c", 2, "edge");
    huge["metadata"]["annotations"] = json!({"note": "x".repeat(5000)});
    assert_error(
        &json_call(&app, "POST", "/api/v1/regions", &huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "PayloadTooLarge",
    );
    let streamed =
        Body::from_stream(futures::stream::iter((0..10).map(|_| {
            Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![b' '; 1000]))
        })));
    assert_error(
        &call(
            &app,
            "POST",
            "/api/v1/regions",
            "application/json",
            streamed,
        )
        .await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "PayloadTooLarge",
    );
    let answer = json_call(
        &app,
        "POST",
        "/api/v1/applications",
        &batch("job", 1, &["atlantis"]),
    )
    .await;
    assert_error(&answer, StatusCode::UNPROCESSABLE_ENTITY, "Invalid");
    assert!(answer.text.contains("atlantis"));
    let answer = json_call(
        &app,
        "PUT",
        "/api/v1/regions/other",
        &region("edge-a", 2, "edge"),
    )
    .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "BadRequest");
    assert_error(
        &json_call(&app, "POST", "/api/v1/tasks", &json!({})).await,
        StatusCode::FORBIDDEN,
        "Forbidden",
    );
    assert_error(
        &call(
            &app,
            "POST",
            "/api/v1/regions?dryRun=Some",
            "application/json",
            region("x", 1, "edge").to_string(),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "BadRequest",
    );
    assert_error(
        &get(&app, "/api/v1/regions?labelSelector=tier%20in%20edge").await,
        StatusCode::BAD_REQUEST,
        "BadRequest",
    );
    assert_error(
        &get(&app, "/api/v1/regions?limit=many").await,
        StatusCode::BAD_REQUEST,
        "BadRequest",
    );

    assert_eq!(ts.store.current_version().await.unwrap(), before);
    assert_eq!(
        get(&app, "/api/v1/regions/edge-a").await.body,
        stored_before
    );
    assert_eq!(
        get(&app, "/api/v1/regions").await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

async fn yaml_bodies_and_dry_runs(ts: &TestStore) {
    let app = app(state(ts));
    let yaml = "apiVersion: ceccm/v1\nkind: Region\nmetadata: {name: edge-y}\nspec:\n  tier: edge\n  driver: local\n  capacity: {cpu: 1}\n";
    let dry = call(
        &app,
        "POST",
        "/api/v1/regions?dryRun=All",
        "application/yaml",
        yaml,
    )
    .await;
    assert_eq!(dry.status, StatusCode::CREATED, "{}", dry.text);
    assert_error(
        &get(&app, "/api/v1/regions/edge-y").await,
        StatusCode::NOT_FOUND,
        "NotFound",
    );
    let created = call(&app, "POST", "/api/v1/regions", "application/yaml", yaml).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let version = ts.store.current_version().await.unwrap();
    let dry_delete = call(
        &app,
        "DELETE",
        "/api/v1/regions/edge-y?dryRun=All",
        "application/json",
        Body::empty(),
    )
    .await;
    assert_eq!(dry_delete.status, StatusCode::OK);
    assert_eq!(ts.store.current_version().await.unwrap(), version);
    assert!(
        get(&app, "/api/v1/regions/edge-y").await.body["metadata"]["deletionTimestamp"].is_null()
    );
}

async fn lists_select_and_paginate(ts: &TestStore) {
    let app = app(state(ts));
    for (i, tier) in ["edge", "cloud", "edge", "hpc", "edge"].iter().enumerate() {
        let r = json_call(
            &app,
            "POST",
            "/api/v1/regions",
            &region(&format!("r{i}"), 1, tier),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let names = |a: &Answer| -> Vec<String> {
        a.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names(&get(&app, "/api/v1/regions?labelSelector=tier%3Dedge").await),
        ["r0", "r2", "r4"]
    );
    assert_eq!(
        names(&get(&app, "/api/v1/regions?labelSelector=tier%20notin%20(edge)").await),
        ["r1", "r3"]
    );
    for selector in ["", "labelSelector=tier!%3Dhpc&"] {
        let mut seen = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let uri = match &token {
                Some(t) => format!("/api/v1/regions?{selector}limit=2&continue={t}"),
                None => format!("/api/v1/regions?{selector}limit=2"),
            };
            let page = get(&app, &uri).await;
            let page_names = names(&page);
            assert!(page_names.len() <= 2);
            seen.extend(page_names);
            match page.body["metadata"]["continue"].as_str() {
                Some(t) => token = Some(t.to_string()),
                None => break,
            }
        }
        let expected: &[&str] = if selector.is_empty() {
            &["r0", "r1", "r2", "r3", "r4"]
        } else {
            &["r0", "r1", "r2", "r4"]
        };
        assert_eq!(seen, expected, "selector {selector:?}");
    }
}

/// Reads NDJSON lines from a streaming response until `n` lines arrived.
async fn read_lines(body: Body, n: usize) -> Vec<Value> {
    let mut stream = body.into_data_stream();
    let mut buffer = String::new();
    let mut lines = Vec::new();
    while lines.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a watch event within 10 s")
            .expect("stream open")
            .unwrap();
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buffer.find('\n') {
            lines.push(serde_json::from_str(&buffer[..end]).unwrap());
            buffer.drain(..=end);
        }
    }
    lines
}

async fn watches_stream_changes_and_resume(ts: &TestStore) {
    let app = app(state(ts));
    json_call(&app, "POST", "/api/v1/regions", &region("r0", 1, "edge")).await;
    let start = ts.store.current_version().await.unwrap();
    let request = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
    let from_now = app
        .clone()
        .oneshot(request("/api/v1/regions?watch=true"))
        .await
        .unwrap();
    assert_eq!(from_now.status(), StatusCode::OK);
    json_call(&app, "PUT", "/api/v1/regions/r0", &region("r0", 2, "edge")).await;
    json_call(&app, "POST", "/api/v1/regions", &region("r1", 1, "cloud")).await;
    json_call(&app, "POST", "/api/v1/applications", &batch("job", 1, &[])).await;
    let lines = read_lines(from_now.into_body(), 3).await;
    let seen: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["type"].as_str().unwrap(),
                l["object"]["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, [("ADDED", "r0"), ("MODIFIED", "r0"), ("ADDED", "r1")]);

    let resumed = app
        .clone()
        .oneshot(request(&format!(
            "/api/v1/regions?watch=true&resourceVersion={start}&labelSelector=tier%3Dcloud"
        )))
        .await
        .unwrap();
    let lines = read_lines(resumed.into_body(), 1).await;
    assert_eq!(lines[0]["object"]["metadata"]["name"], "r1");
    assert_eq!(lines[0]["type"], "ADDED");
    let bad = get(&app, "/api/v1/regions?watch=true&resourceVersion=abc").await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "BadRequest");
}

async fn dataset_content_is_streamed_checksummed_and_bounded(ts: &TestStore) {
    let mut config = ApiConfig::new(ts.dir.path().to_path_buf());
    config.max_upload_bytes = 1000;
    let app = app(state_with(ts, config));
    let ds = json!({"metadata": {"name": "cube"}, "spec": {"format": "fits"}});
    assert_eq!(
        json_call(&app, "POST", "/api/v1/datasets", &ds)
            .await
            .status,
        StatusCode::CREATED
    );
    let content: Vec<u8> = (0..900u32).map(|i| (i % 251) as u8).collect();
    let up = call(
        &app,
        "PUT",
        "/api/v1/datasets/cube/content",
        "application/octet-stream",
        content.clone(),
    )
    .await;
    assert_eq!(up.status, StatusCode::OK, "{}", up.text);
    use sha2::Digest;
    assert_eq!(
        up.body["status"]["sha256"],
        hex::encode(sha2::Sha256::digest(&content))
    );
    assert_eq!(up.body["status"]["size"], 900);
    assert_eq!(up.body["status"]["phase"], "Ready");
    let down = app
        .clone()
        .oneshot(
            Request::get("/api/v1/datasets/cube/content")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let bytes = axum::body::to_bytes(down.into_body(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(bytes.as_ref(), content.as_slice());

    let version = ts.store.current_version().await.unwrap();
    let too_big = call(
        &app,
        "PUT",
        "/api/v1/datasets/cube/content",
        "application/octet-stream",
        vec![0u8; 1001],
    )
    .await;
    assert_error(&too_big, StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge");
    assert_eq!(ts.store.current_version().await.unwrap(), version);
    let down = app
        .clone()
        .oneshot(
            Request::get("/api/v1/datasets/cube/content")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        axum::body::to_bytes(down.into_body(), usize::MAX)
            .await
            .unwrap()
            .len(),
        900
    );
    let leftovers = std::fs::read_dir(ts.dir.path().join("datasets"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 1, "a refused upload leaves no file behind");
    assert_error(
        &call(
            &app,
            "PUT",
            "/api/v1/datasets/nope/content",
            "application/octet-stream",
            vec![1u8],
        )
        .await,
        StatusCode::NOT_FOUND,
        "NotFound",
    );
    assert_eq!(
        call(
            &app,
            "DELETE",
            "/api/v1/datasets/cube",
            "application/json",
            Body::empty()
        )
        .await
        .status,
        StatusCode::OK
    );
    assert!(!ts.dir.path().join("datasets/cube").exists());
}

async fn status_patches_merge_and_guard(ts: &TestStore) {
    let app = app(state(ts));
    json_call(&app, "POST", "/api/v1/regions", &region("r0", 1, "edge")).await;
    let patched = call(
        &app,
        "PATCH",
        "/api/v1/regions/r0/status",
        "application/merge-patch+json",
        json!({"status": {"phase": "Ready", "load": 0.5}}).to_string(),
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.text);
    assert_eq!(patched.body["status"]["phase"], "Ready");
    assert_eq!(patched.body["status"]["load"], 0.5);
    let cleared = call(
        &app,
        "PATCH",
        "/api/v1/regions/r0/status",
        "application/json",
        json!({"status": {"message": null}}).to_string(),
    )
    .await;
    assert!(cleared.body["status"].get("message").is_none());
    let not_status = call(
        &app,
        "PATCH",
        "/api/v1/regions/r0/status",
        "application/json",
        json!({"spec": {}}).to_string(),
    )
    .await;
    assert_error(&not_status, StatusCode::BAD_REQUEST, "BadRequest");
    let stale = call(
        &app,
        "PATCH",
        "/api/v1/regions/r0/status",
        "application/json",
        json!({"metadata": {"resourceVersion": "1"}, "status": {"load": 1.0}}).to_string(),
    )
    .await;
    assert_error(&stale, StatusCode::CONFLICT, "Conflict");
    // A status that is not an object would replace the whole status: refused.
    for not_an_object in [json!(null), json!(5), json!("Ready"), json!([])] {
        let replaced = call(
            &app,
            "PATCH",
            "/api/v1/regions/r0/status",
            "application/merge-patch+json",
            json!({"status": not_an_object}).to_string(),
        )
        .await;
        assert_error(&replaced, StatusCode::BAD_REQUEST, "BadRequest");
    }
    let kept = get(&app, "/api/v1/regions/r0").await;
    assert_eq!(kept.body["status"]["phase"], "Ready", "{}", kept.text);
}

/// Runs the application reconciler until it asks to wait for a change.
async fn settle(ctx: &Context, name: &str) -> Value {
    for _ in 0..20 {
        let Some(app) = ctx.store.get(Kind::Application, name).await.unwrap() else {
            break;
        };
        match crate::reconcile::application::reconcile(app, ctx)
            .await
            .unwrap()
        {
            Action::Requeue(d) if d.is_zero() => continue,
            _ => break,
        }
    }
    ctx.store
        .get(Kind::Application, name)
        .await
        .unwrap()
        .unwrap_or(Value::Null)
}

async fn tasks_flow_through_leases_to_a_succeeded_application(ts: &TestStore) {
    let app = app(state(ts));
    let ctx = context(ts);
    json_call(
        &app,
        "POST",
        "/api/v1/regions",
        &region("edge-a", 2, "edge"),
    )
    .await;
    json_call(
        &app,
        "POST",
        "/api/v1/applications",
        &batch("job", 3, &["edge-a"]),
    )
    .await;
    let waiting = settle(&ctx, "job").await;
    assert_eq!(waiting["status"]["phase"], "Scheduling");
    assert_eq!(
        waiting["status"]["conditions"][0]["reason"],
        "Unschedulable"
    );
    mark_ready(&app, "edge-a").await;
    let running = settle(&ctx, "job").await;
    assert_eq!(running["status"]["phase"], "Running");
    assert_eq!(running["status"]["placements"][0]["region"], "edge-a");
    assert_eq!(running["status"]["placements"][0]["tasks"], 3);
    assert!(
        running["status"]["explanation"]
            .as_str()
            .unwrap()
            .contains("edge-a")
    );

    let lease = |worker: &str| json!({"worker": worker, "region": "edge-a", "leaseSeconds": 30});
    let first = json_call(&app, "POST", "/api/v1/tasks:lease", &lease("w1")).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(first.body["metadata"]["name"], "job-00000");
    assert_eq!(first.body["status"]["state"], "Leased");
    let hb = json_call(
        &app,
        "POST",
        "/api/v1/tasks/job-00000/heartbeat",
        &json!({"worker": "w1", "leaseSeconds": 30}),
    )
    .await;
    assert_eq!(hb.status, StatusCode::OK);
    let thief = json_call(
        &app,
        "POST",
        "/api/v1/tasks/job-00000/heartbeat",
        &json!({"worker": "w2"}),
    )
    .await;
    assert_error(&thief, StatusCode::CONFLICT, "Conflict");
    let done = json_call(
        &app,
        "POST",
        "/api/v1/tasks/job-00000/complete",
        &json!({"worker": "w1", "result": {"stdout": "0\n"}, "cpuSeconds": 0.5}),
    )
    .await;
    assert_eq!(done.body["status"]["state"], "Done");
    let twice = json_call(
        &app,
        "POST",
        "/api/v1/tasks/job-00000/complete",
        &json!({"worker": "w2", "result": {"stdout": "dup"}}),
    )
    .await;
    assert_error(&twice, StatusCode::CONFLICT, "Conflict");

    // Task 1 fails twice (maxAttempts 2): dead-lettered; task 2 completes.
    for worker in ["w1", "w2"] {
        let leased = json_call(&app, "POST", "/api/v1/tasks:lease", &lease(worker)).await;
        assert_eq!(leased.body["metadata"]["name"], "job-00001");
        let failed = json_call(
            &app,
            "POST",
            "/api/v1/tasks/job-00001/fail",
            &json!({"worker": worker, "error": "exit 1"}),
        )
        .await;
        assert_eq!(failed.status, StatusCode::OK, "{}", failed.text);
    }
    assert_eq!(
        get(&app, "/api/v1/tasks/job-00001").await.body["status"]["state"],
        "DeadLettered"
    );
    let leased = json_call(&app, "POST", "/api/v1/tasks:lease", &lease("w1")).await;
    assert_eq!(leased.body["metadata"]["name"], "job-00002");
    json_call(
        &app,
        "POST",
        "/api/v1/tasks/job-00002/complete",
        &json!({"worker": "w1", "result": {}}),
    )
    .await;
    let empty = json_call(&app, "POST", "/api/v1/tasks:lease", &lease("w1")).await;
    assert_eq!(empty.status, StatusCode::NO_CONTENT);

    let failed = settle(&ctx, "job").await;
    assert_eq!(failed["status"]["phase"], "Failed");
    assert_eq!(
        failed["status"]["progress"],
        json!({"done": 2, "failed": 1, "total": 3})
    );
    assert_eq!(ts.store.task_results("job").await.unwrap().len(), 2);
    let events = get(
        &app,
        "/api/v1/events?fieldSelector=involvedObject.kind%3DApplication,involvedObject.name%3Djob",
    )
    .await;
    let reasons: Vec<&str> = events.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    for reason in [
        "Scheduling",
        "Unschedulable",
        "Scheduled",
        "TaskDeadLettered",
    ] {
        assert!(reasons.contains(&reason), "{reasons:?}");
    }
    let logs = get(&app, "/api/v1/applications/job/logs?task=job-00001").await;
    assert!(logs.text.contains("error: exit 1"), "{}", logs.text);

    // Deleting releases tasks and results, then the finalizer lets the object go.
    call(
        &app,
        "DELETE",
        "/api/v1/applications/job",
        "application/json",
        Body::empty(),
    )
    .await;
    settle(&ctx, "job").await;
    assert_error(
        &get(&app, "/api/v1/applications/job").await,
        StatusCode::NOT_FOUND,
        "NotFound",
    );
    assert!(
        get(&app, "/api/v1/tasks").await.body["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(ts.store.task_results("job").await.unwrap().is_empty());
}

async fn expired_leases_requeue(ts: &TestStore) {
    let app = app(state(ts));
    let ctx = context(ts);
    json_call(
        &app,
        "POST",
        "/api/v1/regions",
        &region("edge-a", 1, "edge"),
    )
    .await;
    mark_ready(&app, "edge-a").await;
    json_call(&app, "POST", "/api/v1/applications", &batch("job", 1, &[])).await;
    settle(&ctx, "job").await;
    let leased = json_call(
        &app,
        "POST",
        "/api/v1/tasks:lease",
        &json!({"worker": "w1", "region": "edge-a", "leaseSeconds": 1}),
    )
    .await;
    assert_eq!(leased.status, StatusCode::OK);
    let requeued = crate::testing::poll(|| async {
        let n = crate::queue::expire_leases(&ts.store).await.unwrap();
        (!n.is_empty()).then_some(n)
    })
    .await;
    assert_eq!(requeued[0]["status"]["state"], "Queued");
    assert_eq!(requeued[0]["status"]["attempts"], 1);
    // Not pinned to the region that lost it: it waits for the scheduler to place it again.
    assert_eq!(requeued[0]["status"]["region"], Value::Null);
    let unplaced = json_call(
        &app,
        "POST",
        "/api/v1/tasks:lease",
        &json!({"worker": "w2", "region": "edge-a"}),
    )
    .await;
    assert_eq!(unplaced.status, StatusCode::NO_CONTENT, "{}", unplaced.text);
    settle(&ctx, "job").await;
    let task = get(&app, "/api/v1/tasks/job-00000").await;
    assert_eq!(task.body["status"]["region"], "edge-a");
    let late = json_call(
        &app,
        "POST",
        "/api/v1/tasks/job-00000/heartbeat",
        &json!({"worker": "w1"}),
    )
    .await;
    assert_error(&late, StatusCode::CONFLICT, "Conflict");
    let again = json_call(
        &app,
        "POST",
        "/api/v1/tasks:lease",
        &json!({"worker": "w2", "region": "edge-a"}),
    )
    .await;
    assert_eq!(again.body["status"]["attempts"], 2);
}

async fn health_readiness_and_metrics(ts: &TestStore) {
    let app = app(state(ts));
    assert_eq!(get(&app, "/healthz").await.status, StatusCode::OK);
    assert_eq!(get(&app, "/readyz").await.status, StatusCode::OK);
    json_call(&app, "POST", "/api/v1/regions", &region("r0", 1, "edge")).await;
    get(&app, "/api/v1/regions/r0").await;
    let metrics = get(&app, "/metrics").await.text;
    assert!(metrics.contains("ceccm_http_requests_total{method=\"GET\",route=\"/api/v1/{plural}/{name}\",status=\"200\"} 1"), "{metrics}");
    assert!(
        metrics.contains("ceccm_objects{kind=\"Region\",phase=\"NotReady\"} 1"),
        "{metrics}"
    );
    ts.store.close().await;
    assert_error(
        &get(&app, "/readyz").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
    );
}

async fn followed_logs_stream_each_finished_task_until_the_end(ts: &TestStore) {
    let app = app(state(ts));
    let ctx = context(ts);
    json_call(
        &app,
        "POST",
        "/api/v1/regions",
        &region("edge-a", 1, "edge"),
    )
    .await;
    mark_ready(&app, "edge-a").await;
    json_call(&app, "POST", "/api/v1/applications", &batch("job", 2, &[])).await;
    settle(&ctx, "job").await;
    let followed = app
        .clone()
        .oneshot(
            Request::get("/api/v1/applications/job/logs?follow=true")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(followed.status(), StatusCode::OK);
    for (i, out) in ["zero", "one"].iter().enumerate() {
        let lease = json!({"worker": "w1", "region": "edge-a"});
        let leased = json_call(&app, "POST", "/api/v1/tasks:lease", &lease).await;
        let name = leased.body["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(name, format!("job-{i:05}"));
        json_call(
            &app,
            "POST",
            &format!("/api/v1/tasks/{name}/complete"),
            &json!({"worker": "w1", "result": {"stdout": format!("{out}\n")}}),
        )
        .await;
    }
    assert_eq!(settle(&ctx, "job").await["status"]["phase"], "Succeeded");
    // The stream ends by itself once the application has.
    let bytes = tokio::time::timeout(
        Duration::from_secs(20),
        axum::body::to_bytes(followed.into_body(), usize::MAX),
    )
    .await
    .expect("the followed log ends with the application")
    .unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert_eq!(
        text,
        "==> job-00000 [Done] worker=w1 attempts=1\nzero\n==> job-00001 [Done] worker=w1 attempts=1\none\n"
    );
}

/// The API and the reconciler sharing one predictor, as `ceccm server` wires them.
fn learning_pair(ts: &TestStore) -> (Router, Context) {
    let predictor = crate::predictor::SharedPredictor::default();
    let mut state = state(ts);
    state.predictor = predictor.clone();
    let mut ctx = context(ts);
    ctx.predictor = predictor;
    (app(state), ctx)
}

/// Marks a region Ready, as its agent's status report would.
async fn mark_ready(app: &Router, name: &str) {
    call(
        app,
        "PATCH",
        &format!("/api/v1/regions/{name}/status"),
        "application/json",
        json!({"status": {"phase": "Ready"}}).to_string(),
    )
    .await;
}

/// A ready region with a power model (10 W per busy core).
async fn ready_region(app: &Router, name: &str) {
    let mut body = region(name, 2, "cloud");
    body["spec"]["energy"] = json!({"wattsPerCore": 10.0});
    let created = json_call(app, "POST", "/api/v1/regions", &body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    mark_ready(app, name).await;
}

/// Leases the next task of `region` and completes it, reporting `seconds`.
async fn run_one(app: &Router, region: &str, seconds: f64) -> Answer {
    let leased = json_call(
        app,
        "POST",
        "/api/v1/tasks:lease",
        &json!({"worker": "w1", "region": region}),
    )
    .await;
    assert_eq!(leased.status, StatusCode::OK, "{}", leased.text);
    let name = leased.body["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    json_call(
        app,
        "POST",
        &format!("/api/v1/tasks/{name}/complete"),
        &json!({"worker": "w1", "result": {}, "seconds": seconds}),
    )
    .await
}

async fn telemetry_is_recorded_on_completion_and_survives_a_restart(ts: &TestStore) {
    let (app, ctx) = learning_pair(ts);
    ready_region(&app, "edge-a").await;
    json_call(&app, "POST", "/api/v1/applications", &batch("job", 3, &[])).await;
    assert_eq!(settle(&ctx, "job").await["status"]["phase"], "Running");

    let before = get(&app, "/api/v1/predictor").await;
    assert_eq!(before.status, StatusCode::OK, "{}", before.text);
    assert_eq!(before.body["state"], "prior");
    assert_eq!(before.body["trained"], false);
    assert_eq!(before.body["model"], "analytic-prior");
    assert_eq!(before.body["samples"], 0);
    assert_eq!(before.body["minSamples"], 60);
    assert!(before.body.get("runtimeMape").is_none(), "{}", before.text);

    // The load at the lease is the sample's, whatever the load at completion.
    let loaded = |load: f64| json!({"status": {"load": load}}).to_string();
    let patch = "/api/v1/regions/edge-a/status";
    call(&app, "PATCH", patch, "application/json", loaded(0.5)).await;
    let leased = json_call(
        &app,
        "POST",
        "/api/v1/tasks:lease",
        &json!({"worker": "w1", "region": "edge-a"}),
    )
    .await;
    assert_eq!(leased.body["status"]["startLoad"], 0.5, "{}", leased.text);
    call(&app, "PATCH", patch, "application/json", loaded(0.0)).await;
    let name = leased.body["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let done = json_call(
        &app,
        "POST",
        &format!("/api/v1/tasks/{name}/complete"),
        &json!({"worker": "w1", "result": {}, "seconds": 2.5}),
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.text);

    // Bad telemetry is refused with the API's error shape, stores nothing, and leaves the task
    // leased so that a correct report can follow.
    let leased = json_call(
        &app,
        "POST",
        "/api/v1/tasks:lease",
        &json!({"worker": "w1", "region": "edge-a"}),
    )
    .await;
    let name = leased.body["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let complete = format!("/api/v1/tasks/{name}/complete");
    for bad in [
        json!({"worker": "w1", "result": {}, "seconds": -1.0}),
        json!({"worker": "w1", "result": {}, "seconds": 0.0}),
        json!({"worker": "w1", "result": {}, "seconds": 1.0, "joules": -5.0}),
    ] {
        let refused = json_call(&app, "POST", &complete, &bad).await;
        assert_error(&refused, StatusCode::UNPROCESSABLE_ENTITY, "Invalid");
    }
    // JSON has no NaN: a worker that sends one sends a malformed request.
    let nan = call(
        &app,
        "POST",
        &complete,
        "application/json",
        r#"{"worker": "w1", "result": {}, "seconds": NaN}"#,
    )
    .await;
    assert_error(&nan, StatusCode::BAD_REQUEST, "BadRequest");
    let nan_text = json_call(
        &app,
        "POST",
        &complete,
        &json!({"worker": "w1", "result": {}, "seconds": "NaN"}),
    )
    .await;
    assert_error(&nan_text, StatusCode::BAD_REQUEST, "BadRequest");
    assert_eq!(ts.store.telemetry(10).await.unwrap().0, 1);
    assert_eq!(
        get(&app, &format!("/api/v1/tasks/{name}")).await.body["status"]["state"],
        "Leased"
    );
    let measured = json_call(
        &app,
        "POST",
        &complete,
        &json!({"worker": "w1", "result": {}, "seconds": 1.5, "joules": 30.0, "cpuSeconds": 1.4}),
    )
    .await;
    assert_eq!(measured.status, StatusCode::OK, "{}", measured.text);
    // Without a measured time the sample is the time since the lease; none is stored if
    // that is not positive, but the completion itself always counts.
    let leased = json_call(
        &app,
        "POST",
        "/api/v1/tasks:lease",
        &json!({"worker": "w1", "region": "edge-a"}),
    )
    .await;
    let name = leased.body["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let unmeasured = json_call(
        &app,
        "POST",
        &format!("/api/v1/tasks/{name}/complete"),
        &json!({"worker": "w1", "result": {}}),
    )
    .await;
    assert_eq!(
        unmeasured.body["status"]["state"], "Done",
        "{}",
        unmeasured.text
    );

    let (count, bodies) = ts.store.telemetry(10).await.unwrap();
    let observed = get(&app, "/api/v1/predictor").await.body["samples"]
        .as_i64()
        .unwrap();
    assert!((2..=3).contains(&count), "{count}");
    assert_eq!(observed, count, "the predictor saw what the store holds");
    let first: Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(first["seconds"], 2.5);
    assert_eq!(first["cpuModel"], "edge-a");
    assert_eq!(first["cores"], 1.0);
    assert_eq!(first["joules"], Value::Null);
    assert_eq!(first["features"]["spectra"], 100);
    assert_eq!(first["load"], 0.5);
    let second: Value = serde_json::from_str(&bodies[1]).unwrap();
    assert_eq!(second["joules"], 30.0);

    // A restarted controller rebuilds its predictor from the store.
    ts.store.close().await;
    let reopened = ts.reopen().await;
    let restored = crate::predictor::SharedPredictor::load(
        &reopened,
        ceccm_scheduler::PredictorConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(restored.read().report().samples as i64, count);
    reopened.close().await;
}

async fn the_learned_predictor_moves_work_to_the_region_telemetry_shows_faster(ts: &TestStore) {
    let (app, ctx) = learning_pair(ts);
    // Two regions alike in every declared respect; telemetry will show "b" four times faster.
    ready_region(&app, "a").await;
    ready_region(&app, "b").await;
    let probe = |name: &str| {
        let mut body = batch(name, 4, &[]);
        body["spec"]["objective"] = json!("energy");
        body
    };
    let on_b = |app: &Value| -> u64 {
        app["status"]["placements"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["region"] == "b")
            .map(|p| p["tasks"].as_u64().unwrap())
            .sum()
    };
    json_call(&app, "POST", "/api/v1/applications", &probe("before")).await;
    let before = settle(&ctx, "before").await;
    let explanation = before["status"]["explanation"].as_str().unwrap();
    assert!(
        explanation
            .ends_with("priced by the analytic prior (0 of 60 telemetry samples needed to learn)"),
        "{explanation}"
    );
    assert!(
        on_b(&before) < 4,
        "the prior sees no difference: {explanation}"
    );

    for region in ["a", "b"] {
        json_call(
            &app,
            "POST",
            "/api/v1/applications",
            &batch(&format!("train-{region}"), 40, &[region]),
        )
        .await;
        assert_eq!(
            settle(&ctx, &format!("train-{region}")).await["status"]["phase"],
            "Running"
        );
    }
    for i in 0..40 {
        // A few percent of noise, as real run times have.
        let jitter = 1.0 + 0.02 * ((i % 5) as f64 - 2.0);
        assert_eq!(
            run_one(&app, "a", 4.0 * jitter).await.status,
            StatusCode::OK
        );
        assert_eq!(
            run_one(&app, "b", 1.0 * jitter).await.status,
            StatusCode::OK
        );
    }

    let report = get(&app, "/api/v1/predictor").await;
    assert_eq!(report.body["state"], "learned", "{}", report.text);
    assert_eq!(report.body["trained"], true);
    assert_eq!(report.body["samples"], 80);
    let mape = report.body["runtimeMape"].as_f64().unwrap();
    assert!(mape < 0.1, "{}", report.text);
    assert_eq!(report.body["model"], report.body["runtime"]["model"]);
    assert!(
        report.body.get("energyMape").is_none(),
        "no measured joules: {}",
        report.text
    );

    json_call(&app, "POST", "/api/v1/applications", &probe("after")).await;
    let after = settle(&ctx, "after").await;
    let explanation = after["status"]["explanation"].as_str().unwrap();
    assert_eq!(on_b(&after), 4, "{explanation}");
    assert!(
        explanation.contains("priced by the learned model") && explanation.contains("MAPE"),
        "{explanation}"
    );
    let b = after["status"]["placements"][0]["predictedSeconds"]
        .as_f64()
        .unwrap();
    assert!(b > 0.0, "{after}");

    // A restarted controller has learned the same from the store, without new telemetry.
    let restored = crate::predictor::SharedPredictor::load(
        &ts.store,
        ceccm_scheduler::PredictorConfig::default(),
    )
    .await
    .unwrap();
    let restored = restored.read();
    assert!(restored.trained());
    assert_eq!(restored.report().samples, 80);
}

/// Region `edge-a` ready and an application `job` of `tasks` echo tasks placed on it.
async fn job_on_a_ready_region(app: &Router, ctx: &Context, tasks: usize) {
    json_call(app, "POST", "/api/v1/regions", &region("edge-a", 2, "edge")).await;
    json_call(
        app,
        "POST",
        "/api/v1/applications",
        &batch("job", tasks, &["edge-a"]),
    )
    .await;
    mark_ready(app, "edge-a").await;
    settle(ctx, "job").await;
}

/// A worker on the server's host hands an artifact over by naming a file of its region's
/// cache; the server takes it only if it is there and hashes to its name.
async fn artifacts_are_handed_over_from_the_regions_cache(ts: &TestStore) {
    use sha2::Digest;
    let app = app(state(ts));
    job_on_a_ready_region(&app, &context(ts), 1).await;
    let lease = json!({"worker": "w1", "region": "edge-a", "leaseSeconds": 30});
    let leased = json_call(&app, "POST", "/api/v1/tasks:lease", &lease).await;
    assert_eq!(leased.status, StatusCode::OK, "{}", leased.text);

    let cache = crate::content::cache_root(ts.dir.path()).join("edge-a");
    std::fs::create_dir_all(&cache).unwrap();
    let content = b"chunk result".repeat(50);
    let sha = hex::encode(sha2::Sha256::digest(&content));
    let hand_over = |sha: String, from: &'static str| {
        let app = app.clone();
        async move {
            let request = Request::builder()
                .method("PUT")
                .uri(format!("/api/v1/tasks/job-00000/artifacts/{sha}"))
                .header(super::CONTENT_FROM_HEADER, from)
                .body(Body::empty())
                .unwrap();
            app.oneshot(request).await.unwrap().status()
        }
    };
    // Not in the cache: 404, and the worker sends the body instead.
    assert_eq!(
        hand_over(sha.clone(), "region-cache").await,
        StatusCode::NOT_FOUND
    );
    // In the cache under a name that is not its hash: refused, nothing stored.
    let wrong = hex::encode(sha2::Sha256::digest(b"something else"));
    std::fs::write(cache.join(&wrong), &content).unwrap();
    assert_eq!(
        hand_over(wrong.clone(), "region-cache").await,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let stored = get(&app, &format!("/api/v1/applications/job/artifacts/{wrong}")).await;
    assert_eq!(stored.status, StatusCode::NOT_FOUND);
    assert_eq!(
        hand_over(sha.clone(), "elsewhere").await,
        StatusCode::BAD_REQUEST
    );

    std::fs::write(cache.join(&sha), &content).unwrap();
    assert_eq!(hand_over(sha.clone(), "region-cache").await, StatusCode::OK);
    let stored = get(&app, &format!("/api/v1/applications/job/artifacts/{sha}")).await;
    assert_eq!(stored.status, StatusCode::OK);
    assert_eq!(stored.text.as_bytes(), content.as_slice());
}

/// `call` with the caller's own `Authorization` (`None`: none at all).
async fn call_as(
    app: &Router,
    token: Option<&str>,
    method: &str,
    uri: &str,
    body: Option<&Value>,
) -> Answer {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    request = match token {
        Some(t) => request.header("authorization", format!("Bearer {t}")),
        // Present but empty of a token, so the test layer adds none.
        None => request.header("authorization", "none"),
    };
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    send(app, request.body(body).unwrap()).await
}

/// Every role against every kind and verb: what `auth::authorize`'s table allows is never
/// refused with 401/403, and everything else is a 403 with the error JSON.
async fn every_role_may_do_what_its_table_says_and_nothing_else(ts: &TestStore) {
    use crate::auth::{Action, Role, authorize};
    let app = app(state(ts));
    let mut tokens = std::collections::BTreeMap::new();
    for role in crate::auth::Role::GRANTABLE.map(crate::auth::Role::as_str) {
        let made = json_call(
            &app,
            "POST",
            "/api/v1/tokens",
            &json!({"user": format!("{role}-1"), "role": role}),
        )
        .await;
        assert_eq!(made.status, StatusCode::CREATED, "{}", made.text);
        tokens.insert(role, made.body["token"].as_str().unwrap().to_string());
    }
    // Agents get their token by joining with the join token; it is bound to their region.
    let joined = call_as(
        &app,
        Some(JOIN),
        "POST",
        "/api/v1/agents:join",
        Some(&json!({"region": "r-agent", "agent": "site-1", "cpu": 2})),
    )
    .await;
    assert_eq!(joined.status, StatusCode::OK, "{}", joined.text);
    tokens.insert("agent", joined.body["token"].as_str().unwrap().to_string());
    tokens.insert("join", JOIN.to_string());
    json_call(&app, "POST", "/api/v1/regions", &region("r1", 2, "edge")).await;
    let dataset = |name: &str| {
        json!({"apiVersion": "ceccm/v1", "kind": "Dataset", "metadata": {"name": name},
               "spec": {"format": "cube"}})
    };
    json_call(&app, "POST", "/api/v1/datasets", &dataset("d1")).await;
    // A user sees only datasets of their own: theirs to reference.
    let made = call_as(
        &app,
        Some(&tokens["user"]),
        "POST",
        "/api/v1/datasets",
        Some(&dataset("d-user")),
    )
    .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text);
    // The administrator's job, run far enough to have tasks and events: another user's
    // objects of every kind, for the reads below.
    let ctx = context(ts);
    let made = json_call(
        &app,
        "POST",
        "/api/v1/applications",
        &batch("owned-job", 1, &["r1"]),
    )
    .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text);
    mark_ready(&app, "r1").await;
    settle(&ctx, "owned-job").await;
    let first_name = |answer: Answer| {
        answer.body["items"][0]["metadata"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("no item: {}", answer.text))
            .to_string()
    };
    let admins_task = first_name(get(&app, "/api/v1/tasks").await);
    let admins_event = first_name(
        get(
            &app,
            "/api/v1/events?fieldSelector=involvedObject.kind%3DApplication,involvedObject.name%3Downed-job",
        )
        .await,
    );
    let existing = |kind: Kind| match kind {
        Kind::Region => "r1".to_string(),
        Kind::Application => "owned-job".to_string(),
        Kind::Dataset => "d1".to_string(),
        Kind::Task => admins_task.clone(),
        _ => admins_event.clone(),
    };
    let manifest = |kind: Kind, name: &str, input: &str| match kind {
        Kind::Region => region(name, 1, "cloud"),
        Kind::Dataset => dataset(name),
        _ => json!({"apiVersion": "ceccm/v1", "kind": kind.as_str(), "metadata": {"name": name},
                    "spec": {"app": "astro-fit", "inputs": [{"dataset": input}]}}),
    };
    let refused = |answer: &Answer, what: &str| {
        assert_eq!(
            answer.status,
            StatusCode::FORBIDDEN,
            "{what}: {}",
            answer.text
        );
        assert_eq!(answer.body["error"]["code"], "Forbidden", "{what}");
    };
    let allowed = |answer: &Answer, what: &str| {
        assert!(
            ![StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&answer.status),
            "{what}: {} {}",
            answer.status,
            answer.text
        );
    };
    for role_name in Role::ALL.map(Role::as_str) {
        let role = Role::parse(role_name).unwrap();
        let token = Some(tokens[role_name].as_str());
        for kind in Kind::ALL {
            let plural = kind.plural();
            let what = |verb: &str| format!("{role_name} {verb} {plural}");
            let list = call_as(&app, token, "GET", &format!("/api/v1/{plural}"), None).await;
            // Users own Applications, Datasets, their Tasks, and the Events about them: the
            // administrator's are not there for them (404, left out of lists).
            let others_hidden = role == Role::User && kind != Kind::Region;
            if authorize(role, Action::Read(kind)) {
                assert_eq!(list.status, StatusCode::OK, "{}", what("lists"));
                let listed = list.body["items"].as_array().unwrap();
                let admins = listed
                    .iter()
                    .filter(|o| o["metadata"]["owner"] == "admin")
                    .count();
                if others_hidden {
                    assert_eq!(admins, 0, "{}: {}", what("lists"), list.text);
                    assert!(
                        listed.iter().all(|o| o["metadata"]["owner"] == "user-1"
                            || o["involvedObject"]["kind"] == "Region"),
                        "{}: {}",
                        what("lists"),
                        list.text
                    );
                } else if kind != Kind::Region {
                    assert!(admins > 0, "{}: {}", what("lists"), list.text);
                }
            } else {
                refused(&list, &what("lists"));
            }
            let theirs = existing(kind);
            let read = call_as(
                &app,
                token,
                "GET",
                &format!("/api/v1/{plural}/{theirs}"),
                None,
            )
            .await;
            if !authorize(role, Action::Read(kind)) {
                refused(&read, &what("gets"));
            } else if others_hidden {
                assert_error(&read, StatusCode::NOT_FOUND, "NotFound");
            } else {
                assert_eq!(
                    read.status,
                    StatusCode::OK,
                    "{}: {}",
                    what("gets"),
                    read.text
                );
                assert_eq!(
                    read.body["metadata"]["name"],
                    theirs.as_str(),
                    "{}",
                    what("gets")
                );
            }
            let name = format!("x-{role_name}");
            let created = call_as(
                &app,
                token,
                "POST",
                &format!("/api/v1/{plural}"),
                Some(&manifest(
                    kind,
                    &name,
                    if role == Role::User { "d-user" } else { "d1" },
                )),
            )
            .await;
            if authorize(role, Action::Write(kind)) && kind.user_writable() {
                assert_eq!(
                    created.status,
                    StatusCode::CREATED,
                    "{}: {}",
                    what("creates"),
                    created.text
                );
            } else {
                refused(&created, &what("creates"));
            }
            let deleted = call_as(
                &app,
                token,
                "DELETE",
                &format!("/api/v1/{plural}/nothing"),
                None,
            )
            .await;
            // Tasks and events belong to the control plane: read-only for everyone.
            if authorize(role, Action::Write(kind)) && kind.user_writable() {
                allowed(&deleted, &what("deletes"));
            } else {
                refused(&deleted, &what("deletes"));
            }
            let patched = call_as(
                &app,
                token,
                "PATCH",
                &format!("/api/v1/{plural}/nothing/status"),
                Some(&json!({"status": {"phase": "Succeeded"}})),
            )
            .await;
            if authorize(role, Action::WriteStatus(kind)) && kind.user_writable() {
                allowed(&patched, &what("writes the status of"));
            } else {
                refused(&patched, &what("writes the status of"));
            }
        }
        let listed = call_as(&app, token, "GET", "/api/v1/tokens", None).await;
        // An agent acts for its own region only (checked across regions below).
        let own = if role == Role::Agent { "r-agent" } else { "r1" };
        let leased = call_as(
            &app,
            token,
            "POST",
            "/api/v1/tasks:lease",
            Some(&json!({"worker": "w", "region": own})),
        )
        .await;
        let join = call_as(
            &app,
            token,
            "POST",
            "/api/v1/agents:join",
            Some(&json!({"region": format!("j-{role_name}"), "agent": "a", "cpu": 1})),
        )
        .await;
        let beat = call_as(
            &app,
            token,
            "POST",
            "/api/v1/regions/r-agent/heartbeat",
            Some(&json!({"agent": "site-1", "cpu": 2, "workers": 0, "cpuSeconds": 0.0})),
        )
        .await;
        let host = call_as(
            &app,
            token,
            "POST",
            "/api/v1/applications",
            Some(&batch(&format!("sh-{role_name}"), 1, &["r1"])),
        )
        .await;
        let metrics = call_as(&app, token, "GET", "/metrics", None).await;
        for (answer, action, what) in [
            (&listed, Action::ManageTokens, "lists tokens"),
            (&leased, Action::RunTasks, "leases a task"),
            (&host, Action::RunHostCommands, "runs host commands"),
            (&metrics, Action::ReadMetrics, "reads metrics"),
            (&join, Action::JoinRegion, "joins a region"),
            (&beat, Action::ReportRegion, "reports a region's heartbeat"),
        ] {
            let what = format!("{role_name} {what}");
            if authorize(role, action) {
                allowed(answer, &what);
            } else {
                refused(answer, &what);
            }
        }
        // No secret is ever listed.
        if role == Role::Admin {
            assert!(
                listed.body["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|t| t.get("token").is_none())
            );
            assert!(!listed.text.contains(&tokens["viewer"][23..]));
        }
    }
    // NodeRestriction: the agent of r-agent, and the join token, act for no other region.
    let agent = Some(tokens["agent"].as_str());
    for (token, method, uri, body) in [
        (
            agent,
            "POST",
            "/api/v1/tasks:lease",
            json!({"worker": "w", "region": "r1"}),
        ),
        (
            agent,
            "POST",
            "/api/v1/regions/r1/heartbeat",
            json!({"agent": "site-1", "cpu": 2, "workers": 0, "cpuSeconds": 0.0}),
        ),
        (
            Some(JOIN),
            "POST",
            "/api/v1/regions/r-agent/heartbeat",
            json!({"agent": "site-1", "cpu": 2, "workers": 0, "cpuSeconds": 0.0}),
        ),
        (
            Some(JOIN),
            "POST",
            "/api/v1/tasks:lease",
            json!({"worker": "w", "region": "r-agent"}),
        ),
        (
            agent,
            "POST",
            "/api/v1/agents:join",
            json!({"region": "r1", "agent": "thief", "cpu": 1}),
        ),
    ] {
        refused(
            &call_as(&app, token, method, uri, Some(&body)).await,
            &format!("{uri} {body}"),
        );
    }
}

/// Without a valid token only the health checks answer; a revoked or expired token is refused.
async fn requests_without_a_valid_token_are_refused(ts: &TestStore) {
    let app = app(state(ts));
    for uri in ["/healthz", "/readyz"] {
        assert_eq!(
            call_as(&app, None, "GET", uri, None).await.status,
            StatusCode::OK,
            "{uri}"
        );
    }
    for uri in [
        "/api/v1/regions",
        "/api/v1/applications/a/results",
        "/metrics",
        "/api/v1/predictor",
    ] {
        let answer = call_as(&app, None, "GET", uri, None).await;
        assert_error(&answer, StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    for bad in [
        "not-a-token",
        &ADMIN[..ADMIN.len() - 1],
        "ceccm_00000000000000ad_ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    ] {
        let answer = call_as(&app, Some(bad), "GET", "/api/v1/regions", None).await;
        assert_error(&answer, StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let made = json_call(
        &app,
        "POST",
        "/api/v1/tokens",
        &json!({"user": "ana", "role": "viewer"}),
    )
    .await;
    let token = made.body["token"].as_str().unwrap().to_string();
    let id = made.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        call_as(&app, Some(&token), "GET", "/api/v1/regions", None)
            .await
            .status,
        StatusCode::OK
    );
    let revoked = call(
        &app,
        "DELETE",
        &format!("/api/v1/tokens/{id}"),
        "application/json",
        Body::empty(),
    )
    .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.text);
    assert_eq!(revoked.body["user"], "ana");
    let answer = call_as(&app, Some(&token), "GET", "/api/v1/regions", None).await;
    assert_error(&answer, StatusCode::UNAUTHORIZED, "Unauthorized");

    let made = json_call(
        &app,
        "POST",
        "/api/v1/tokens",
        &json!({"user": "bo", "role": "viewer", "ttlSeconds": 1}),
    )
    .await;
    assert!(made.body["expiresAt"].is_string(), "{}", made.text);
    let token = made.body["token"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = call_as(&app, Some(&token), "GET", "/api/v1/regions", None).await;
        if answer.status == StatusCode::UNAUTHORIZED {
            assert!(answer.text.contains("expired"), "{}", answer.text);
            break;
        }
        assert_eq!(answer.status, StatusCode::OK);
        assert!(
            std::time::Instant::now() < deadline,
            "the token never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for bad in [
        json!({"user": "x", "role": "root"}),
        json!({"user": "../x", "role": "viewer"}),
        json!({"user": "x", "role": "viewer", "ttlSeconds": 0}),
    ] {
        let answer = json_call(&app, "POST", "/api/v1/tokens", &bad).await;
        assert_error(&answer, StatusCode::UNPROCESSABLE_ENTITY, "Invalid");
    }
}

/// Names from URLs never address files outside their place (issue 16's first attack).
async fn names_in_urls_never_reach_other_files(ts: &TestStore) {
    let app = app(state(ts));
    std::fs::create_dir_all(ts.dir.path().join("results")).unwrap();
    std::fs::write(ts.dir.path().join("secret"), "do not serve").unwrap();
    for uri in [
        "/api/v1/applications/..%2F..%2F..%2F..%2F..%2F..%2Fetc/results/hostname",
        "/api/v1/applications/%2E%2E/results/secret",
        "/api/v1/applications/%2E%2E/results",
        "/api/v1/applications/%2E%2E/artifacts/0000000000000000000000000000000000000000000000000000000000000000",
        "/api/v1/datasets/%2E%2E%2Fsecret/content",
        "/api/v1/applications/%2E%2E/logs",
    ] {
        let answer = get(&app, uri).await;
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "{uri}: {}",
            answer.text
        );
        assert!(!answer.text.contains("do not serve"), "{uri}");
    }
}

/// Inputs refused the way the Kubernetes API server refuses them (issue 16's smaller items):
/// nothing is stored, and the answer says why.
async fn hardened_inputs_are_refused_and_change_nothing(ts: &TestStore) {
    let config = ApiConfig {
        max_upload_bytes: 1000,
        ..ApiConfig::new(ts.dir.path().to_path_buf())
    };
    let app = app(state_with(ts, config));
    let answer = call(
        &app,
        "POST",
        "/api/v1/regions",
        "text/plain",
        region("a", 1, "edge").to_string(),
    )
    .await;
    assert_error(
        &answer,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UnsupportedMediaType",
    );

    let nan = "apiVersion: ceccm/v1\nkind: Dataset\nmetadata: {name: d}\nspec:\n  format: cube\n  description: \".nan\"\n";
    let answer = call(&app, "POST", "/api/v1/datasets", "application/yaml", nan).await;
    assert_eq!(
        answer.status,
        StatusCode::CREATED,
        "a quoted .nan is a string: {}",
        answer.text
    );
    let nan = "apiVersion: ceccm/v1\nkind: Application\nmetadata: {name: f}\nspec:\n  app: astro-fit\n  inputs: [{dataset: d}]\n  parameters: {redshift: .nan}\n";
    let answer = call(
        &app,
        "POST",
        "/api/v1/applications",
        "application/yaml",
        nan,
    )
    .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "BadRequest");
    assert!(
        answer.text.contains("spec.parameters.redshift"),
        "{}",
        answer.text
    );

    let deep_json = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let answer = call(
        &app,
        "POST",
        "/api/v1/regions",
        "application/json",
        deep_json,
    )
    .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "BadRequest");
    let deep_yaml = format!("a: {}{}", "[".repeat(200), "]".repeat(200));
    let answer = call(
        &app,
        "POST",
        "/api/v1/regions",
        "application/yaml",
        deep_yaml,
    )
    .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "BadRequest");
    let indented: String = (0..300)
        .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
        .collect();
    let answer = call(
        &app,
        "POST",
        "/api/v1/regions",
        "application/yaml",
        indented,
    )
    .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "BadRequest");

    let mut stale = region("ghost", 1, "edge");
    stale["metadata"]["resourceVersion"] = json!("5");
    let answer = json_call(&app, "PUT", "/api/v1/regions/ghost", &stale).await;
    assert_error(&answer, StatusCode::NOT_FOUND, "NotFound");
    assert_eq!(
        get(&app, "/api/v1/regions/ghost").await.status,
        StatusCode::NOT_FOUND
    );

    let future = get(&app, "/api/v1/regions?watch=true&resourceVersion=999999").await;
    assert_error(&future, StatusCode::UNPROCESSABLE_ENTITY, "Invalid");
    for limit in ["0", "-1", "3000000000"] {
        let answer = get(&app, &format!("/api/v1/regions?limit={limit}")).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "BadRequest");
    }

    let request = Request::builder()
        .method("PUT")
        .uri("/api/v1/datasets/d/content")
        .header("content-length", "4294967296")
        .body(Body::from(vec![0u8; 10]))
        .unwrap();
    let answer = send(&app, request).await;
    assert_error(&answer, StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge");
    let stored = get(&app, "/api/v1/datasets/d").await;
    assert_eq!(
        stored.body["status"]["phase"], "Pending",
        "nothing was stored"
    );

    // A whole number written with a fraction is an integer, as JSON Schema (the OpenAPI spec)
    // counts it; a real fraction in an integer field is still refused.
    let lease =
        |seconds: Value| json!({"worker": "w", "region": "nowhere", "leaseSeconds": seconds});
    let answer = json_call(&app, "POST", "/api/v1/tasks:lease", &lease(json!(30.0))).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text);
    let answer = json_call(&app, "POST", "/api/v1/tasks:lease", &lease(json!(30.5))).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "BadRequest");
}

/// Users see only their own Applications and Datasets: another user's answer 404 on every
/// route, lists and watches leave them out, and a reference to them reads as missing.
async fn users_see_only_their_own_applications_and_datasets(ts: &TestStore) {
    let app = app(state(ts));
    let mut tokens = Vec::new();
    for user in ["ana", "bo"] {
        let made = json_call(
            &app,
            "POST",
            "/api/v1/tokens",
            &json!({"user": user, "role": "user"}),
        )
        .await;
        tokens.push(made.body["token"].as_str().unwrap().to_string());
    }
    let (ana, bo) = (Some(tokens[0].as_str()), Some(tokens[1].as_str()));
    let dataset = json!({"apiVersion": "ceccm/v1", "kind": "Dataset", "metadata": {"name": "cube-a", "owner": "bo"},
                         "spec": {"format": "cube"}});
    let made = call_as(&app, ana, "POST", "/api/v1/datasets", Some(&dataset)).await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text);
    assert_eq!(
        made.body["metadata"]["owner"], "ana",
        "the server sets the owner"
    );
    let fit = |name: &str| {
        json!({"apiVersion": "ceccm/v1", "kind": "Application", "metadata": {"name": name},
                                   "spec": {"app": "astro-fit", "inputs": [{"dataset": "cube-a"}]}})
    };
    let made = call_as(
        &app,
        ana,
        "POST",
        "/api/v1/applications",
        Some(&fit("fit-a")),
    )
    .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text);

    for uri in [
        "/api/v1/datasets/cube-a",
        "/api/v1/datasets/cube-a/content",
        "/api/v1/applications/fit-a",
        "/api/v1/applications/fit-a/results",
        "/api/v1/applications/fit-a/logs",
    ] {
        let answer = call_as(&app, bo, "GET", uri, None).await;
        assert_error(&answer, StatusCode::NOT_FOUND, "NotFound");
        // The owner reaches them (a dataset without content has none to stream).
        if !uri.ends_with("content") {
            let mine = call_as(&app, ana, "GET", uri, None).await;
            assert_eq!(mine.status, StatusCode::OK, "{uri}: {}", mine.text);
        }
    }
    for (method, uri) in [
        ("DELETE", "/api/v1/applications/fit-a"),
        ("POST", "/api/v1/applications/fit-a/cancel"),
        ("DELETE", "/api/v1/datasets/cube-a"),
    ] {
        let answer = call_as(&app, bo, method, uri, Some(&json!({}))).await;
        assert_error(&answer, StatusCode::NOT_FOUND, "NotFound");
    }
    let taken = call_as(
        &app,
        bo,
        "PUT",
        "/api/v1/applications/fit-a",
        Some(&fit("fit-a")),
    )
    .await;
    assert_error(&taken, StatusCode::NOT_FOUND, "NotFound");
    let borrowed = call_as(
        &app,
        bo,
        "POST",
        "/api/v1/applications",
        Some(&fit("fit-b")),
    )
    .await;
    assert_error(&borrowed, StatusCode::UNPROCESSABLE_ENTITY, "Invalid");
    for plural in ["applications", "datasets"] {
        let theirs = call_as(&app, bo, "GET", &format!("/api/v1/{plural}"), None).await;
        assert_eq!(theirs.body["items"], json!([]), "{plural}");
        let mine = call_as(&app, ana, "GET", &format!("/api/v1/{plural}"), None).await;
        assert_eq!(mine.body["items"].as_array().unwrap().len(), 1, "{plural}");
        // An administrator sees everything.
        let all = get(&app, &format!("/api/v1/{plural}")).await;
        assert_eq!(all.body["items"].as_array().unwrap().len(), 1, "{plural}");
    }
    let still = get(&app, "/api/v1/applications/fit-a").await;
    assert_eq!(still.body["metadata"]["owner"], "ana");
    assert!(still.body["metadata"]["deletionTimestamp"].is_null());

    // Tasks and Events follow their application's owner. An administrator acting as ana
    // submits a job of host commands; its tasks and events are ana's.
    let ctx = context(ts);
    let admin_as = |user: &'static str| {
        let app = app.clone();
        async move {
            let made = json_call(
                &app,
                "POST",
                "/api/v1/tokens",
                &json!({"user": user, "role": "admin"}),
            )
            .await;
            made.body["token"].as_str().unwrap().to_string()
        }
    };
    let ana_admin = admin_as("ana").await;
    json_call(
        &app,
        "POST",
        "/api/v1/regions",
        &region("edge-a", 2, "edge"),
    )
    .await;
    mark_ready(&app, "edge-a").await;
    let made = call_as(
        &app,
        Some(&ana_admin),
        "POST",
        "/api/v1/applications",
        Some(&batch("job", 2, &["edge-a"])),
    )
    .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text);
    assert_eq!(settle(&ctx, "job").await["status"]["phase"], "Running");
    // bo watches tasks from before anything of theirs exists.
    let watch = app
        .clone()
        .oneshot(
            Request::get("/api/v1/tasks?watch=true")
                .header("authorization", format!("Bearer {}", tokens[1]))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(watch.status(), StatusCode::OK);
    let tasks = get(
        &app,
        "/api/v1/tasks?labelSelector=ceccm%2Fapplication%3Djob",
    )
    .await;
    let task_names: Vec<String> = tasks.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(
                t["metadata"]["owner"], "ana",
                "a task has its application's owner"
            );
            t["metadata"]["name"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(task_names.len(), 2, "{}", tasks.text);
    let events = get(
        &app,
        "/api/v1/events?fieldSelector=involvedObject.kind%3DApplication,involvedObject.name%3Djob",
    )
    .await;
    let event_names: Vec<String> = events.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(
                e["metadata"]["owner"], "ana",
                "an event has its object's owner"
            );
            e["metadata"]["name"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(!event_names.is_empty(), "{}", events.text);
    let mut uris: Vec<String> = task_names
        .iter()
        .map(|t| format!("/api/v1/tasks/{t}"))
        .chain(event_names.iter().map(|e| format!("/api/v1/events/{e}")))
        .collect();
    uris.push(format!(
        "/api/v1/applications/job/logs?task={}",
        task_names[0]
    ));
    for uri in &uris {
        let theirs = call_as(&app, bo, "GET", uri, None).await;
        assert_error(&theirs, StatusCode::NOT_FOUND, "NotFound");
        let mine = call_as(&app, ana, "GET", uri, None).await;
        assert_eq!(mine.status, StatusCode::OK, "{uri}: {}", mine.text);
    }
    for uri in [
        "/api/v1/tasks",
        "/api/v1/events",
        "/api/v1/events?fieldSelector=involvedObject.kind%3DApplication,involvedObject.name%3Djob",
        "/api/v1/tasks?labelSelector=ceccm%2Fapplication%3Djob",
    ] {
        let theirs = call_as(&app, bo, "GET", uri, None).await;
        assert_eq!(theirs.status, StatusCode::OK, "{uri}: {}", theirs.text);
        let items = theirs.body["items"].as_array().unwrap();
        assert!(
            items.iter().all(|o| o["metadata"]["owner"] != "ana"),
            "{uri}: {}",
            theirs.text
        );
        let mine = call_as(&app, ana, "GET", uri, None).await;
        let items = mine.body["items"].as_array().unwrap();
        assert!(!items.is_empty(), "{uri}: {}", mine.text);
        assert!(
            items.iter().all(|o| o["metadata"]["owner"] == "ana"
                || o["involvedObject"]["kind"] == "Region"),
            "{uri}: {}",
            mine.text
        );
    }
    // bo's watch shows bo's own task first: ana's, made before, were left out.
    let bo_admin = admin_as("bo").await;
    let made = call_as(
        &app,
        Some(&bo_admin),
        "POST",
        "/api/v1/applications",
        Some(&batch("job-bo", 1, &["edge-a"])),
    )
    .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text);
    settle(&ctx, "job-bo").await;
    let lines = read_lines(watch.into_body(), 1).await;
    assert_eq!(lines[0]["type"], "ADDED");
    assert_eq!(
        lines[0]["object"]["metadata"]["owner"], "bo",
        "{:?}",
        lines[0]
    );
}

/// A worker reports only on the task whose lease it holds (the lease's secret), as Kubernetes'
/// NodeRestriction limits a kubelet to its own pods: another worker of the same role cannot
/// complete, fail or heartbeat it, nor upload its artifacts.
async fn a_worker_reports_only_on_the_task_whose_lease_it_holds(ts: &TestStore) {
    let app = app(state(ts));
    job_on_a_ready_region(&app, &context(ts), 2).await;
    let made = json_call(
        &app,
        "POST",
        "/api/v1/tokens",
        &json!({"user": "w", "role": "worker"}),
    )
    .await;
    let worker = made.body["token"].as_str().unwrap().to_string();
    let lease = |who: &str| {
        let app = app.clone();
        let body = json!({"worker": who, "region": "edge-a", "leaseSeconds": 30}).to_string();
        let token = worker.clone();
        async move {
            let request = Request::builder()
                .method("POST")
                .uri("/api/v1/tasks:lease")
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap();
            let response = app.oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let secret = response.headers()[super::LEASE_SECRET_HEADER]
                .to_str()
                .unwrap()
                .to_string();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let task: Value = serde_json::from_slice(&bytes).unwrap();
            (
                task["metadata"]["name"].as_str().unwrap().to_string(),
                secret,
            )
        }
    };
    let (first, first_secret) = lease("w1").await;
    let (second, second_secret) = lease("w2").await;
    assert_ne!(first, second);
    let report = |task: &str, what: &str, secret: Option<&str>, body: Value| {
        let mut request = Request::builder()
            .method("POST")
            .uri(format!("/api/v1/tasks/{task}/{what}"))
            .header("authorization", format!("Bearer {worker}"))
            .header("content-type", "application/json");
        if let Some(secret) = secret {
            request = request.header(super::LEASE_SECRET_HEADER, secret);
        }
        send(&app, request.body(Body::from(body.to_string())).unwrap())
    };
    let done = json!({"worker": "w1", "result": {"exitCode": 0, "stdout": "forged", "stderr": ""}});
    // Without the secret, or with the other lease's: refused, nothing recorded.
    for secret in [None, Some(second_secret.as_str())] {
        for (what, body) in [
            ("complete", done.clone()),
            ("fail", json!({"worker": "w1", "error": "forged"})),
            ("heartbeat", json!({"worker": "w1", "leaseSeconds": 30})),
        ] {
            let answer = report(&first, what, secret, body).await;
            assert_error(&answer, StatusCode::FORBIDDEN, "Forbidden");
        }
    }
    let request = Request::builder()
        .method("PUT")
        .uri(format!(
            "/api/v1/tasks/{first}/artifacts/{}",
            "0".repeat(64)
        ))
        .header("authorization", format!("Bearer {worker}"))
        .header(super::LEASE_SECRET_HEADER, second_secret.as_str())
        .body(Body::from("x"))
        .unwrap();
    assert_error(
        &send(&app, request).await,
        StatusCode::FORBIDDEN,
        "Forbidden",
    );
    let still = get(&app, &format!("/api/v1/tasks/{first}")).await;
    assert_eq!(still.body["status"]["state"], "Leased");
    // Its output while it runs: only the holder sends it, and the application's logs show it.
    let log = |secret: &str, offset: &str, chunk: &'static str| {
        let request = Request::builder()
            .method("POST")
            .uri(format!("/api/v1/tasks/{first}/log"))
            .header("authorization", format!("Bearer {worker}"))
            .header("content-type", "application/octet-stream")
            .header(super::LEASE_SECRET_HEADER, secret)
            .header(super::LOG_OFFSET_HEADER, offset)
            .body(Body::from(chunk))
            .unwrap();
        send(&app, request)
    };
    let application = still.body["spec"]["application"].as_str().unwrap();
    let logs_uri = format!("/api/v1/applications/{application}/logs");
    let answer = log(&second_secret, "0", "forged\n").await;
    assert_error(&answer, StatusCode::FORBIDDEN, "Forbidden");
    let answer = log(&first_secret, "-1", "working\n").await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "BadRequest");
    assert!(!get(&app, &logs_uri).await.text.contains("forged"));
    let answer = log(&first_secret, "0", "working\n").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.body["received"], 8);
    let shown = get(&app, &logs_uri).await.text;
    assert!(
        shown.contains(&format!(
            "==> {first} [Leased] worker=w1 attempts=1\nworking\n"
        )),
        "{shown}"
    );
    // The holder reports.
    let answer = report(&first, "complete", Some(&first_secret), done).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.body["status"]["state"], "Done");
}

/// Every mutating request is in the audit log with its user and outcome, refusals included;
/// reads are not; only administrators read it.
async fn mutating_requests_are_audited_with_their_user(ts: &TestStore) {
    let app = app(state(ts));
    let made = json_call(
        &app,
        "POST",
        "/api/v1/tokens",
        &json!({"user": "ana", "role": "viewer"}),
    )
    .await;
    let viewer = made.body["token"].as_str().unwrap().to_string();
    json_call(&app, "POST", "/api/v1/regions", &region("r1", 1, "edge")).await;
    get(&app, "/api/v1/regions").await;
    let refused = call_as(&app, Some(&viewer), "DELETE", "/api/v1/regions/r1", None).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let log = get(&app, "/api/v1/audit").await;
    assert_eq!(log.status, StatusCode::OK, "{}", log.text);
    let entries: Vec<(String, String, String, u64)> = log.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["user"].as_str().unwrap().to_string(),
                e["method"].as_str().unwrap().to_string(),
                e["path"].as_str().unwrap().to_string(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected = [
        ("admin", "POST", "/api/v1/tokens", 201),
        ("admin", "POST", "/api/v1/regions", 201),
        ("ana", "DELETE", "/api/v1/regions/r1", 403),
    ]
    .map(|(u, m, p, s)| (u.to_string(), m.to_string(), p.to_string(), s));
    assert_eq!(entries, expected);
    assert!(
        !log.text.contains(&viewer[23..]),
        "no secret in the audit log"
    );
    let denied = call_as(&app, Some(&viewer), "GET", "/api/v1/audit", None).await;
    assert_error(&denied, StatusCode::FORBIDDEN, "Forbidden");
}

/// Runs the region reconciler once over `name`.
async fn reconcile_region(ctx: &Context, name: &str) -> Value {
    let region = ctx.store.get(Kind::Region, name).await.unwrap().unwrap();
    crate::reconcile::region::reconcile(region, ctx)
        .await
        .unwrap();
    // Null once a deleted region's finalizer has run.
    ctx.store
        .get(Kind::Region, name)
        .await
        .unwrap()
        .unwrap_or(Value::Null)
}

/// An agent joins with the join token, heartbeats for its region only, and when it falls
/// silent its region turns NotReady and, past the application's toleration, its work is placed
/// elsewhere; what the lost agent reports late is refused and changes nothing.
async fn agents_join_heartbeat_and_their_work_moves_when_they_fall_silent(ts: &TestStore) {
    let app = app(state(ts));
    let mut ctx = context(ts);
    ctx.region_grace = Duration::from_millis(300);
    let join = |body: Value, token: &'static str| {
        let app = app.clone();
        async move {
            call_as(
                &app,
                Some(token),
                "POST",
                "/api/v1/agents:join",
                Some(&body),
            )
            .await
        }
    };
    let beat = |token: String, region: &'static str, body: Value| {
        let app = app.clone();
        async move {
            call_as(
                &app,
                Some(&token),
                "POST",
                &format!("/api/v1/regions/{region}/heartbeat"),
                Some(&body),
            )
            .await
        }
    };
    let report = json!({"agent": "site-1", "cpu": 2, "workers": 0, "cpuSeconds": 1.5});
    // Bad joins change nothing.
    let wrong =
        "ceccm_00000000000000a1_0000000000000000000000000000000000000000000000000000000000000000";
    assert_error(
        &join(json!({"region": "edge", "agent": "a", "cpu": 2}), wrong).await,
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
    );
    json_call(
        &app,
        "POST",
        "/api/v1/regions",
        &region("cloud", 2, "cloud"),
    )
    .await;
    assert_error(
        &join(json!({"region": "cloud", "agent": "a", "cpu": 2}), JOIN).await,
        StatusCode::CONFLICT,
        "Conflict",
    );
    assert_error(
        &join(
            json!({"region": "Not_A_Name", "agent": "a", "cpu": 2}),
            JOIN,
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
    );
    assert_error(
        &join(json!({"region": "edge", "agent": "a", "cpu": 0}), JOIN).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
    );
    assert_eq!(
        get(&app, "/api/v1/regions/edge").await.status,
        StatusCode::NOT_FOUND
    );

    // The first join makes the region; a second one replaces the first agent's token.
    let first = join(json!({"region": "edge", "agent": "site-0", "cpu": 2}), JOIN).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(first.body["created"], true);
    let joined = join(json!({"region": "edge", "agent": "site-1", "cpu": 2}), JOIN).await;
    assert_eq!(joined.body["created"], false, "{}", joined.text);
    let old = first.body["token"].as_str().unwrap().to_string();
    let token = joined.body["token"].as_str().unwrap().to_string();
    assert_error(
        &beat(old, "edge", report.clone()).await,
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
    );
    let edge = get(&app, "/api/v1/regions/edge").await.body;
    assert_eq!(edge["spec"]["driver"], "agent");
    assert_eq!(edge["spec"]["tier"], "edge");

    // Silent so far: NotReady, saying why.
    let seen = reconcile_region(&ctx, "edge").await;
    assert_eq!(seen["status"]["phase"], "NotReady");
    assert!(
        seen["status"]["message"]
            .as_str()
            .unwrap()
            .contains("no agent")
    );
    let negative = json!({"agent": "site-1", "cpu": 2, "workers": 0, "cpuSeconds": -1.0});
    assert_error(
        &beat(token.clone(), "edge", negative).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
    );
    let orders = beat(token.clone(), "edge", report.clone()).await;
    assert_eq!(orders.status, StatusCode::OK, "{}", orders.text);
    assert_eq!(orders.body["wantedWorkers"], 0);
    let seen = reconcile_region(&ctx, "edge").await;
    assert_eq!(seen["status"]["phase"], "Ready", "{}", seen["status"]);
    assert_eq!(seen["status"]["agent"]["name"], "site-1");
    assert_eq!(seen["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(seen["status"]["conditions"][0]["status"], "True");
    mark_ready(&app, "cloud").await;

    // Work placed on the edge; the heartbeat asks for workers; the agent leases one task.
    let mut job = batch("job", 3, &[]);
    job["spec"]["placement"] = json!({"tiers": ["edge"], "tolerations": [
        {"key": "ceccm/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 0}]});
    let created = json_call(&app, "POST", "/api/v1/applications", &job).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    settle(&ctx, "job").await;
    let orders = beat(token.clone(), "edge", report.clone()).await;
    assert_eq!(orders.body["queued"], 3, "{}", orders.text);
    // Three reference chunks are a few seconds of predicted work: one worker drains them well
    // within the autoscaler's target, though the agent's two cores could run two.
    assert_eq!(orders.body["wantedWorkers"], 1, "{}", orders.text);
    let lease = call_as(
        &app,
        Some(&token),
        "POST",
        "/api/v1/tasks:lease",
        Some(&json!({"worker": "edge-w1", "region": "edge"})),
    )
    .await;
    assert_eq!(lease.status, StatusCode::OK, "{}", lease.text);
    let held = lease.body["metadata"]["name"].as_str().unwrap().to_string();
    let secret = lease.body["status"]["leaseSecretSha256"].clone();
    assert!(secret.is_string());

    // The agent falls silent past the grace: NotReady, then its tasks are evicted (toleration 0)
    // and the scheduler places them on the cloud, which must tolerate nothing more than tiers.
    let gone = crate::testing::poll(|| async {
        let seen = reconcile_region(&ctx, "edge").await;
        (seen["status"]["phase"] == "NotReady").then_some(seen)
    })
    .await;
    assert!(
        gone["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not heard from"),
        "{}",
        gone["status"]
    );
    reconcile_region(&ctx, "edge").await;
    let tasks = ts.store.tasks_of("job").await.unwrap();
    for task in &tasks {
        assert_eq!(task["status"]["state"], "Queued", "{task}");
        assert_eq!(task["status"]["region"], Value::Null, "{task}");
        assert!(
            task["status"]["evicted"]
                .as_str()
                .unwrap()
                .contains("NotReady")
        );
        // An eviction is not the task's fault: the attempt is given back.
        assert_eq!(task["status"]["attempts"], 0, "{task}");
    }
    // The tiers allow only the edge: nowhere to go, and the application says so.
    settle(&ctx, "job").await;
    let events = get(
        &app,
        "/api/v1/events?fieldSelector=involvedObject.kind=Application,involvedObject.name=job",
    )
    .await;
    assert!(events.text.contains("FailedScheduling"), "{}", events.text);
    // Widened to any tier (the spec is frozen after Pending, so through a new application).
    let mut job2 = batch("job2", 2, &[]);
    job2["spec"]["placement"] = json!({"regions": ["edge"], "tolerations": [
        {"key": "ceccm/not-ready", "operator": "Exists", "effect": "NoExecute"}]});
    json_call(&app, "POST", "/api/v1/applications", &job2).await;
    settle(&ctx, "job2").await;
    // Tolerating NotReady for ever (an edge-pinned job), job2 stays where it is.
    reconcile_region(&ctx, "edge").await;
    for task in ts.store.tasks_of("job2").await.unwrap() {
        assert_eq!(task["status"]["region"], "edge", "{task}");
    }

    // The lost agent's late report on the task it held is refused and stores nothing.
    let late = call_as(
        &app,
        Some(&token),
        "POST",
        &format!("/api/v1/tasks/{held}/complete"),
        Some(&json!({"worker": "edge-w1", "result": {"late": true}})),
    )
    .await;
    assert_eq!(late.status, StatusCode::FORBIDDEN, "{}", late.text);
    assert!(ts.store.task_results("job").await.unwrap().is_empty());

    // Deleting the edge region takes job2's work off it too.
    let deleted = call(
        &app,
        "DELETE",
        "/api/v1/regions/edge",
        "application/json",
        Body::empty(),
    )
    .await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.text);
    reconcile_region(&ctx, "edge").await;
    for task in ts.store.tasks_of("job2").await.unwrap() {
        assert_eq!(task["status"]["region"], Value::Null, "{task}");
        assert!(
            task["status"]["evicted"]
                .as_str()
                .unwrap()
                .contains("deleted")
        );
    }
    assert_eq!(
        get(&app, "/api/v1/regions/edge").await.status,
        StatusCode::NOT_FOUND
    );
}

/// `drain` cordons a region and moves its queued work; running work finishes there.
async fn a_drained_region_keeps_its_running_work_and_gives_up_the_rest(ts: &TestStore) {
    let app = app(state(ts));
    let ctx = context(ts);
    for name in ["edge-a", "edge-b"] {
        json_call(&app, "POST", "/api/v1/regions", &region(name, 1, "edge")).await;
        mark_ready(&app, name).await;
    }
    json_call(
        &app,
        "POST",
        "/api/v1/applications",
        &batch("job", 3, &["edge-a"]),
    )
    .await;
    settle(&ctx, "job").await;
    let leased = json_call(
        &app,
        "POST",
        "/api/v1/tasks:lease",
        &json!({"worker": "w1", "region": "edge-a"}),
    )
    .await;
    assert_eq!(leased.status, StatusCode::OK, "{}", leased.text);
    let drained = json_call(&app, "POST", "/api/v1/regions/edge-a/drain", &json!({})).await;
    assert_eq!(drained.status, StatusCode::OK, "{}", drained.text);
    assert_eq!(
        drained.body,
        json!({"region": "edge-a", "evicted": 2, "running": 1})
    );
    let region_now = get(&app, "/api/v1/regions/edge-a").await.body;
    assert_eq!(region_now["spec"]["unschedulable"], true);
    // Cordoned: the application (pinned to edge-a) cannot place what was drained, and says why.
    settle(&ctx, "job").await;
    let events = get(
        &app,
        "/api/v1/events?fieldSelector=involvedObject.kind=Application,involvedObject.name=job",
    )
    .await;
    assert!(
        events.text.contains("ceccm/unschedulable"),
        "{}",
        events.text
    );
    // A second application without the pin goes to edge-b.
    json_call(
        &app,
        "POST",
        "/api/v1/applications",
        &batch("other", 2, &[]),
    )
    .await;
    settle(&ctx, "other").await;
    for task in ts.store.tasks_of("other").await.unwrap() {
        assert_eq!(task["status"]["region"], "edge-b", "{task}");
    }
    assert_error(
        &json_call(&app, "POST", "/api/v1/regions/nowhere/drain", &json!({})).await,
        StatusCode::NOT_FOUND,
        "NotFound",
    );
}

/// A dataset held at an edge: its agent's announcement makes it Ready without content on the
/// server; the first download asks the edge (503) and the agent's next heartbeat carries the
/// order; only that agent may send the copy, only of the announced content and encoding, and
/// bytes that are not what the headers say are refused and nothing is kept. The agent's side
/// (hashing, TARSIS-encoding a real cube, sending a non-cube as it is) runs on real files.
async fn a_dataset_held_at_an_edge_is_sent_by_its_agent_only_as_announced(ts: &TestStore) {
    use crate::uplink::{
        CONTENT_SHA256_HEADER, ENCODED_SHA256_HEADER, ENCODING_HEADER, EdgeDatasets, UplinkEncoding,
    };
    use sha2::Digest;
    let app = app(state(ts));
    let token_of = |answer: Answer| answer.body["token"].as_str().unwrap().to_string();
    let edge = token_of(
        call_as(
            &app,
            Some(JOIN),
            "POST",
            "/api/v1/agents:join",
            Some(&json!({"region": "edge", "agent": "site-e", "cpu": 1})),
        )
        .await,
    );
    let cloud = token_of(
        call_as(
            &app,
            Some(JOIN),
            "POST",
            "/api/v1/agents:join",
            Some(&json!({"region": "cloud", "agent": "site-c", "cpu": 1})),
        )
        .await,
    );
    let ds = json!({"metadata": {"name": "cube"}, "spec": {"format": "cube", "region": "edge"}});
    assert_eq!(
        json_call(&app, "POST", "/api/v1/datasets", &ds)
            .await
            .status,
        StatusCode::CREATED
    );

    // The edge's files: the sample cube (gzipped FITS) and a text file.
    let site = tempfile::tempdir().unwrap();
    let held_dir = site.path().join("datasets");
    std::fs::create_dir_all(&held_dir).unwrap();
    std::fs::write(held_dir.join("cube"), crate::demo::SAMPLE_CUBE).unwrap();
    std::fs::write(held_dir.join("notes"), b"observing log\n").unwrap();
    std::fs::write(held_dir.join(".arriving"), b"half a file").unwrap();
    let cache = site.path().join("cache/edge");
    let mut datasets = EdgeDatasets::new(held_dir, cache.clone(), UplinkEncoding::Tarsis);
    let held = tokio::task::spawn_blocking(move || {
        let held = datasets.scan();
        (datasets, held)
    })
    .await
    .unwrap();
    let (datasets, held) = held;
    let names: Vec<&str> = held.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["cube", "notes"], "hidden files are not taken");
    let cube = held[0].clone();
    let sha256 = hex::encode(sha2::Sha256::digest(crate::demo::SAMPLE_CUBE));
    assert_eq!(cube.sha256, sha256);
    assert_eq!(cube.size, crate::demo::SAMPLE_CUBE.len() as u64);
    assert_eq!(cube.encoding, UplinkEncoding::Tarsis);
    assert!(cube.encoded_size < cube.size, "{cube:?}");
    assert_eq!(held[1].encoding, UplinkEncoding::Identity, "not a cube");
    assert!(
        cache.join(&sha256).exists(),
        "its workers find it by sha256"
    );
    let (container, _) = datasets.to_send("cube").unwrap();
    let container = std::fs::read(container).unwrap();

    let beat = |token: String, region: &'static str, held: Vec<crate::uplink::HeldDataset>| {
        let app = app.clone();
        async move {
            let report = json!({"agent": "a", "cpu": 1, "workers": 0, "cpuSeconds": 0.0,
                                "datasets": held});
            call_as(
                &app,
                Some(&token),
                "POST",
                &format!("/api/v1/regions/{region}/heartbeat"),
                Some(&report),
            )
            .await
        }
    };
    let orders = beat(edge.clone(), "edge", held.clone()).await;
    assert_eq!(orders.status, StatusCode::OK, "{}", orders.text);
    assert!(orders.body["uploads"].is_null(), "nothing asked yet");
    assert!(
        orders.body["refusedDatasets"][0]
            .as_str()
            .unwrap()
            .contains("\"notes\" is not declared"),
        "{}",
        orders.text
    );
    let announced = get(&app, "/api/v1/datasets/cube").await.body;
    assert_eq!(announced["status"]["phase"], "Ready");
    assert_eq!(announced["status"]["sha256"], sha256.as_str());
    assert_eq!(announced["status"]["uplink"]["region"], "edge");
    assert_eq!(
        announced["status"]["uplink"]["encodedSize"],
        cube.encoded_size
    );
    // Another region's agent cannot claim it.
    let claimed = beat(cloud.clone(), "cloud", vec![cube.clone()]).await;
    assert!(
        claimed.body["refusedDatasets"][0]
            .as_str()
            .unwrap()
            .contains("declares spec.region \"edge\""),
        "{}",
        claimed.text
    );
    let mut bad = cube.clone();
    bad.sha256 = "not-a-sha".into();
    let region_before = get(&app, "/api/v1/regions/edge").await.body;
    assert_error(
        &beat(edge.clone(), "edge", vec![bad]).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
    );
    assert_eq!(get(&app, "/api/v1/datasets/cube").await.body, announced);
    assert_eq!(
        get(&app, "/api/v1/regions/edge").await.body,
        region_before,
        "nothing of a refused heartbeat is recorded"
    );

    // A task elsewhere asks: 503, and the edge's next heartbeat carries the order.
    let asked = get(&app, "/api/v1/datasets/cube/content").await;
    assert_error(&asked, StatusCode::SERVICE_UNAVAILABLE, "Unavailable");
    assert_eq!(asked.body["error"]["details"]["region"], "edge");
    let orders = beat(edge.clone(), "edge", held.clone()).await;
    assert_eq!(orders.body["uploads"], json!(["cube"]), "{}", orders.text);
    assert!(
        beat(cloud.clone(), "cloud", vec![]).await.body["uploads"].is_null(),
        "only the edge is asked"
    );

    let send = |token: String, encoding: &'static str, content: String, bytes: Vec<u8>| {
        let app = app.clone();
        async move {
            let request = Request::builder()
                .method("PUT")
                .uri("/api/v1/datasets/cube/uplink")
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/octet-stream")
                .header(ENCODING_HEADER, encoding)
                .header(CONTENT_SHA256_HEADER, content)
                .body(Body::from(bytes))
                .unwrap();
            send(&app, request).await
        }
    };
    let before = get(&app, "/api/v1/datasets/cube").await.body;
    for (answer, status, code) in [
        (
            send(cloud.clone(), "tarsis", sha256.clone(), container.clone()).await,
            StatusCode::FORBIDDEN,
            "Forbidden",
        ),
        (
            send(edge.clone(), "tarsis", "ab".repeat(32), container.clone()).await,
            StatusCode::CONFLICT,
            "Conflict",
        ),
        (
            send(edge.clone(), "identity", sha256.clone(), container.clone()).await,
            StatusCode::CONFLICT,
            "Conflict",
        ),
        (
            send(
                edge.clone(),
                "tarsis",
                sha256.clone(),
                b"not a container".to_vec(),
            )
            .await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
        ),
        (
            send(edge.clone(), "gzip", sha256.clone(), container.clone()).await,
            StatusCode::BAD_REQUEST,
            "BadRequest",
        ),
    ] {
        assert_error(&answer, status, code);
    }
    assert_eq!(get(&app, "/api/v1/datasets/cube").await.body, before);
    assert_error(
        &get(&app, "/api/v1/datasets/cube/content").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
    );

    let sent = send(edge.clone(), "tarsis", sha256.clone(), container.clone()).await;
    assert_eq!(sent.status, StatusCode::OK, "{}", sent.text);
    let container_sha256 = hex::encode(sha2::Sha256::digest(&container));
    let uplink = &sent.body["status"]["uplink"];
    assert_eq!(uplink["encodedSha256"], container_sha256.as_str());
    assert_eq!(uplink["encodedSize"], container.len());
    assert!(uplink["transferSeconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(
        sent.body["status"]["sha256"],
        sha256.as_str(),
        "still pinned by the original"
    );
    let response = app
        .clone()
        .oneshot(
            Request::get("/api/v1/datasets/cube/content")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let header = |h: &str| response.headers()[h].to_str().unwrap().to_string();
    assert_eq!(header(ENCODING_HEADER), "tarsis");
    assert_eq!(header(CONTENT_SHA256_HEADER), sha256);
    assert_eq!(header(ENCODED_SHA256_HEADER), container_sha256);
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(body.as_ref(), container.as_slice());
    assert!(
        beat(edge.clone(), "edge", held.clone()).await.body["uploads"].is_null(),
        "sent: no longer asked"
    );
}

/// `--user-quota-bytes`: what each user stores (their datasets' content, their applications'
/// artifacts) stays within the quota; an upload past it is a 403 naming the user and the
/// figures, and nothing of it is kept.
async fn user_quotas_bound_what_each_user_stores(ts: &TestStore) {
    use sha2::Digest;
    let config = ApiConfig {
        quotas: crate::quota::Quotas::new(Some(1000)),
        ..ApiConfig::new(ts.dir.path().to_path_buf())
    };
    let app = app(state_with(ts, config));
    let mut tokens = Vec::new();
    for user in ["ana", "bo"] {
        let made = json_call(
            &app,
            "POST",
            "/api/v1/tokens",
            &json!({"user": user, "role": "user"}),
        )
        .await;
        tokens.push(made.body["token"].as_str().unwrap().to_string());
    }
    let (ana, bo) = (tokens[0].as_str(), tokens[1].as_str());
    let dataset = |name: &str| {
        json!({"apiVersion": "ceccm/v1", "kind": "Dataset", "metadata": {"name": name},
               "spec": {"format": "cube"}})
    };
    for (token, name) in [(ana, "a1"), (ana, "a2"), (bo, "b1")] {
        let made = call_as(
            &app,
            Some(token),
            "POST",
            "/api/v1/datasets",
            Some(&dataset(name)),
        )
        .await;
        assert_eq!(made.status, StatusCode::CREATED, "{}", made.text);
    }
    let upload = |token: &str, name: &str, bytes: usize, declared: Option<u64>| {
        let mut request = Request::builder()
            .method("PUT")
            .uri(format!("/api/v1/datasets/{name}/content"))
            .header("content-type", "application/octet-stream")
            .header("authorization", format!("Bearer {token}"));
        if let Some(n) = declared {
            request = request.header("content-length", n.to_string());
        }
        send(&app, request.body(Body::from(vec![7u8; bytes])).unwrap())
    };
    let stored = upload(ana, "a1", 600, None).await;
    assert_eq!(stored.status, StatusCode::OK, "{}", stored.text);

    // Past the quota: refused with the figures, nothing kept.
    let refused = upload(ana, "a2", 600, None).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "Forbidden");
    assert!(
        refused.text.contains("exceeded quota") && refused.text.contains("\"ana\""),
        "{}",
        refused.text
    );
    assert_eq!(refused.body["error"]["details"]["usedBytes"], 600);
    assert_eq!(refused.body["error"]["details"]["quotaBytes"], 1000);
    assert!(!crate::content::dataset_path(ts.dir.path(), "a2").exists());
    let a2 = get(&app, "/api/v1/datasets/a2").await;
    assert_eq!(a2.body["status"]["phase"], "Pending", "{}", a2.text);
    // A declared length past the remainder is refused before the body is read.
    let refused = upload(ana, "a2", 10, Some(5000)).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "Forbidden");
    // Replacing a dataset's content counts the new size, not both.
    let replaced = upload(ana, "a1", 900, None).await;
    assert_eq!(replaced.status, StatusCode::OK, "{}", replaced.text);
    // Quotas are per user.
    let other = upload(bo, "b1", 900, None).await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.text);
    // Deleting makes room.
    let deleted = call_as(&app, Some(ana), "DELETE", "/api/v1/datasets/a1", None).await;
    assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.text);
    let stored = upload(ana, "a2", 600, None).await;
    assert_eq!(stored.status, StatusCode::OK, "{}", stored.text);

    // Artifacts count for the application's owner (here the administrator), whoever uploads.
    job_on_a_ready_region(&app, &context(ts), 1).await;
    let artifact = |content: Vec<u8>| {
        let sha = hex::encode(sha2::Sha256::digest(&content));
        let request = Request::builder()
            .method("PUT")
            .uri(format!("/api/v1/tasks/job-00000/artifacts/{sha}"))
            .header("content-type", "application/octet-stream")
            .body(Body::from(content))
            .unwrap();
        send(&app, request)
    };
    let kept = artifact(vec![1u8; 700]).await;
    assert_eq!(kept.status, StatusCode::OK, "{}", kept.text);
    let refused = artifact(vec![2u8; 700]).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "Forbidden");
    assert!(refused.text.contains("\"admin\""), "{}", refused.text);
    let files = std::fs::read_dir(crate::content::artifacts_dir(ts.dir.path(), "job"))
        .unwrap()
        .count();
    assert_eq!(files, 1, "the refused artifact is not kept");
}

/// A transport's worker claims the task its message names (docs/amqp.md): leased once; a
/// duplicate, another task under the name, a finished task or one placed elsewhere is refused
/// with the reason the worker decides by.
async fn a_claim_leases_the_named_task_once(ts: &TestStore) {
    let app = app(state(ts));
    let ctx = context(ts);
    json_call(
        &app,
        "POST",
        "/api/v1/regions",
        &region("edge-a", 2, "edge"),
    )
    .await;
    mark_ready(&app, "edge-a").await;
    json_call(
        &app,
        "POST",
        "/api/v1/applications",
        &batch("job", 2, &["edge-a"]),
    )
    .await;
    assert_eq!(settle(&ctx, "job").await["status"]["phase"], "Running");
    let uid = get(&app, "/api/v1/tasks/job-00001").await.body["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let claim = |worker: &str, name: &str, uid: &str, region: &str| {
        json!({"worker": worker, "region": region, "leaseSeconds": 30,
               "task": {"name": name, "uid": uid}})
    };
    let reason = |answer: &Answer| answer.body["error"]["details"]["reason"].clone();
    // Not the first queued task: the one named.
    let first = json_call(
        &app,
        "POST",
        "/api/v1/tasks:lease",
        &claim("w1", "job-00001", &uid, "edge-a"),
    )
    .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(first.body["metadata"]["name"], "job-00001");
    assert_eq!(first.body["status"]["worker"], "w1");
    let twice = json_call(
        &app,
        "POST",
        "/api/v1/tasks:lease",
        &claim("w2", "job-00001", &uid, "edge-a"),
    )
    .await;
    assert_error(&twice, StatusCode::CONFLICT, "Conflict");
    assert_eq!(reason(&twice), "Leased");
    let other = json_call(
        &app,
        "POST",
        "/api/v1/tasks:lease",
        &claim("w2", "job-00000", "not-its-uid", "edge-a"),
    )
    .await;
    assert_eq!(reason(&other), "OtherTask");
    let gone = json_call(
        &app,
        "POST",
        "/api/v1/tasks:lease",
        &claim("w2", "job-00099", &uid, "edge-a"),
    )
    .await;
    assert_error(&gone, StatusCode::NOT_FOUND, "NotFound");
    let done = json_call(
        &app,
        "POST",
        "/api/v1/tasks/job-00001/complete",
        &json!({"worker": "w1", "result": {}}),
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.text);
    let after = json_call(
        &app,
        "POST",
        "/api/v1/tasks:lease",
        &claim("w2", "job-00001", &uid, "edge-a"),
    )
    .await;
    assert_eq!(reason(&after), "Finished");
    assert_eq!(ts.store.task_results("job").await.unwrap().len(), 1);
    // The other task is queued in edge-a: a worker of another region may not take it.
    json_call(
        &app,
        "POST",
        "/api/v1/regions",
        &region("cloud-b", 2, "cloud"),
    )
    .await;
    let uid0 = get(&app, "/api/v1/tasks/job-00000").await.body["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let elsewhere = json_call(
        &app,
        "POST",
        "/api/v1/tasks:lease",
        &claim("w3", "job-00000", &uid0, "cloud-b"),
    )
    .await;
    assert_eq!(reason(&elsewhere), "Moved");
    assert_eq!(
        elsewhere.body["error"]["details"]["regionUnschedulable"],
        false
    );
}

store_suite!(
    crud_follows_kubectl_conventions,
    bad_input_answers_errors_and_changes_nothing,
    yaml_bodies_and_dry_runs,
    lists_select_and_paginate,
    watches_stream_changes_and_resume,
    dataset_content_is_streamed_checksummed_and_bounded,
    status_patches_merge_and_guard,
    tasks_flow_through_leases_to_a_succeeded_application,
    a_claim_leases_the_named_task_once,
    expired_leases_requeue,
    health_readiness_and_metrics,
    followed_logs_stream_each_finished_task_until_the_end,
    telemetry_is_recorded_on_completion_and_survives_a_restart,
    the_learned_predictor_moves_work_to_the_region_telemetry_shows_faster,
    artifacts_are_handed_over_from_the_regions_cache,
    every_role_may_do_what_its_table_says_and_nothing_else,
    requests_without_a_valid_token_are_refused,
    names_in_urls_never_reach_other_files,
    hardened_inputs_are_refused_and_change_nothing,
    users_see_only_their_own_applications_and_datasets,
    a_worker_reports_only_on_the_task_whose_lease_it_holds,
    mutating_requests_are_audited_with_their_user,
    agents_join_heartbeat_and_their_work_moves_when_they_fall_silent,
    a_drained_region_keeps_its_running_work_and_gives_up_the_rest,
    a_dataset_held_at_an_edge_is_sent_by_its_agent_only_as_announced,
    user_quotas_bound_what_each_user_stores,
);

#[test]
fn committed_openapi_matches_the_router() {
    let generated = crate::api::openapi_yaml();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/openapi.yaml");
    if std::env::var_os("CECCM_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "api/openapi.yaml differs from what the router generates; regenerate it with \
         `CECCM_UPDATE_OPENAPI=1 cargo test -p ceccm-controller committed_openapi` and commit it"
    );
}

/// Keys a test OIDC issuer signs with: an RSA key (RS256) and two P-256 keys (ES256), the
/// second not yet in the JWKS.
struct TestIssuer {
    rsa: jsonwebtoken::EncodingKey,
    rsa_jwk: Value,
    ec: Vec<(jsonwebtoken::EncodingKey, Value)>,
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl TestIssuer {
    fn new() -> TestIssuer {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::traits::PublicKeyParts;
        let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        let rsa = jsonwebtoken::EncodingKey::from_rsa_der(key.to_pkcs1_der().unwrap().as_bytes());
        let rsa_jwk = json!({"kty": "RSA", "kid": "rsa-1", "alg": "RS256", "use": "sig",
                             "n": b64url(&key.n().to_bytes_be()), "e": b64url(&key.e().to_bytes_be())});
        let ec = (1..=3)
            .map(|i| {
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
                let point = key.public_key_raw();
                let jwk = json!({"kty": "EC", "crv": "P-256", "kid": format!("ec-{i}"),
                                 "x": b64url(&point[1..33]), "y": b64url(&point[33..65])});
                (
                    jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der()),
                    jwk,
                )
            })
            .collect();
        TestIssuer { rsa, rsa_jwk, ec }
    }

    fn jwks(&self, ec_keys: usize) -> String {
        let mut keys = vec![self.rsa_jwk.clone()];
        keys.extend(self.ec.iter().take(ec_keys).map(|(_, jwk)| jwk.clone()));
        json!({"keys": keys}).to_string()
    }

    /// A token signed with the RSA key (`ec: None`) or the EC key of that index, with `kid`.
    fn sign(&self, ec: Option<usize>, kid: &str, claims: &Value) -> String {
        let (alg, key) = match ec {
            None => (jsonwebtoken::Algorithm::RS256, &self.rsa),
            Some(i) => (jsonwebtoken::Algorithm::ES256, &self.ec[i].0),
        };
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }
}

/// OIDC ID tokens: a valid one (RS256 or ES256) acts with the role its groups map to, as
/// `oidc:`-prefixed user that owns what it makes; every other token is a 401 with the error
/// JSON, and a valid one whose groups map to no role a 403.
#[tokio::test]
async fn oidc_id_tokens_authenticate_with_the_role_their_groups_map_to() {
    let ts = crate::testing::sqlite().await;
    let issuer = TestIssuer::new();
    let jwks = ts.dir.path().join("jwks.json");
    std::fs::write(&jwks, issuer.jwks(2)).unwrap();
    let config = crate::oidc::OidcArgs {
        oidc_issuer: Some("https://iam.example.org/".into()),
        oidc_audience: Some("ceccm".into()),
        oidc_jwks: Some(jwks.display().to_string()),
        oidc_username_claim: "sub".into(),
        oidc_username_prefix: "oidc:".into(),
        oidc_groups_claim: "groups".into(),
        oidc_roles: vec![
            "astro=user".into(),
            "ops=operator".into(),
            "guests=viewer".into(),
        ],
    }
    .config()
    .unwrap()
    .unwrap();
    let verifier = crate::oidc::Verifier::new(config).await.unwrap();
    let app = app(state_with(
        &ts,
        ApiConfig {
            oidc: Some(Arc::new(verifier)),
            ..ApiConfig::new(ts.dir.path().to_path_buf())
        },
    ));
    let now = crate::time::now_millis() / 1000;
    let claims = |sub: &str, groups: &[&str]| {
        json!({"iss": "https://iam.example.org/", "aud": "ceccm", "sub": sub,
               "groups": groups, "iat": now, "nbf": now, "exp": now + 600})
    };
    let dataset = |name: &str| {
        json!({"apiVersion": "ceccm/v1", "kind": "Dataset", "metadata": {"name": name},
               "spec": {"format": "cube"}})
    };

    // RS256, a user: makes and owns a dataset, may not make a region.
    let ana = issuer.sign(None, "rsa-1", &claims("ana", &["astro", "unmapped"]));
    let made = call_as(
        &app,
        Some(&ana),
        "POST",
        "/api/v1/datasets",
        Some(&dataset("cube-ana")),
    )
    .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text);
    assert_eq!(made.body["metadata"]["owner"], "oidc:ana");
    let refused = call_as(
        &app,
        Some(&ana),
        "POST",
        "/api/v1/regions",
        Some(&region("r-ana", 1, "edge")),
    )
    .await;
    assert_error(&refused, StatusCode::FORBIDDEN, "Forbidden");
    assert!(refused.text.contains("oidc:ana"), "{}", refused.text);

    // ES256, an operator: makes a region; sees ana's dataset (operators see everything).
    let olu = issuer.sign(Some(0), "ec-1", &claims("olu", &["ops", "astro"]));
    let made = call_as(
        &app,
        Some(&olu),
        "POST",
        "/api/v1/regions",
        Some(&region("r-olu", 1, "edge")),
    )
    .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text);
    let seen = call_as(&app, Some(&olu), "GET", "/api/v1/datasets/cube-ana", None).await;
    assert_eq!(seen.status, StatusCode::OK, "{}", seen.text);
    // A token user named like the OIDC user's bare name is someone else.
    let made = json_call(
        &app,
        "POST",
        "/api/v1/tokens",
        &json!({"user": "ana", "role": "user"}),
    )
    .await;
    let token_ana = made.body["token"].as_str().unwrap().to_string();
    let other = call_as(
        &app,
        Some(&token_ana),
        "GET",
        "/api/v1/datasets/cube-ana",
        None,
    )
    .await;
    assert_error(&other, StatusCode::NOT_FOUND, "NotFound");

    // Refused with 401: each way a token can be wrong.
    let mut wrong_issuer = claims("ana", &["astro"]);
    wrong_issuer["iss"] = json!("https://evil.example.org/");
    let mut wrong_audience = claims("ana", &["astro"]);
    wrong_audience["aud"] = json!(["other-client"]);
    let mut expired = claims("ana", &["astro"]);
    expired["exp"] = json!(now - 3600);
    expired["iat"] = json!(now - 7200);
    expired["nbf"] = json!(now - 7200);
    let mut early = claims("ana", &["astro"]);
    early["nbf"] = json!(now + 3600);
    early["exp"] = json!(now + 7200);
    let mut no_exp = claims("ana", &["astro"]);
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut no_sub = claims("ana", &["astro"]);
    no_sub.as_object_mut().unwrap().remove("sub");
    let valid = claims("ana", &["astro"]);
    let parts: Vec<&str> = ana.split('.').collect();
    let (header, payload, signature) = (parts[0], parts[1], parts[2]);
    let forged_payload = b64url(claims("ana", &["ops"]).to_string().as_bytes());
    let none_header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let hs_header = b64url(br#"{"alg":"HS256","typ":"JWT","kid":"rsa-1"}"#);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong issuer",
            issuer.sign(None, "rsa-1", &wrong_issuer),
            "issuer",
        ),
        (
            "wrong audience",
            issuer.sign(Some(0), "ec-1", &wrong_audience),
            "audience",
        ),
        ("expired", issuer.sign(None, "rsa-1", &expired), "expired"),
        (
            "not yet valid",
            issuer.sign(Some(1), "ec-2", &early),
            "not valid yet",
        ),
        (
            "without exp",
            issuer.sign(None, "rsa-1", &no_exp),
            "\"exp\"",
        ),
        (
            "without sub",
            issuer.sign(None, "rsa-1", &no_sub),
            "\"sub\"",
        ),
        // Signed by a key the JWKS does not hold, under the id of one it does.
        (
            "bad signature",
            issuer.sign(Some(2), "ec-1", &valid),
            "signature",
        ),
        (
            "payload swapped",
            format!("{header}.{forged_payload}.{signature}"),
            "signature",
        ),
        ("unknown kid", issuer.sign(Some(2), "ec-3", &valid), "key"),
        (
            "alg none",
            format!("{none_header}.{payload}."),
            "RS256 or ES256",
        ),
        (
            "alg HS256",
            format!("{hs_header}.{payload}.c2ln"),
            "RS256 or ES256",
        ),
        // An RS256 token under an EC key's id: the key does not fit the algorithm.
        (
            "alg and key mismatched",
            issuer.sign(None, "ec-1", &valid),
            "key",
        ),
    ];
    for (what, token, says) in &cases {
        let answer = call_as(&app, Some(token), "GET", "/api/v1/datasets", None).await;
        assert_error(&answer, StatusCode::UNAUTHORIZED, "Unauthorized");
        let message = answer.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{what}: {message}");
    }
    // Authenticated, but no group maps to a role: 403, whatever the request.
    let nobody = issuer.sign(None, "rsa-1", &claims("eve", &["students"]));
    for (method, uri) in [("GET", "/api/v1/datasets"), ("POST", "/api/v1/datasets")] {
        let answer = call_as(&app, Some(&nobody), method, uri, Some(&dataset("cube-eve"))).await;
        assert_error(&answer, StatusCode::FORBIDDEN, "Forbidden");
        assert!(answer.text.contains("maps to a role"), "{}", answer.text);
    }

    // The issuer rotates: a new key in the JWKS file is taken without a restart.
    let rotated = issuer.sign(Some(2), "ec-3", &claims("ana", &["astro"]));
    std::fs::write(&jwks, issuer.jwks(3)).unwrap();
    let answer = call_as(&app, Some(&rotated), "GET", "/api/v1/datasets", None).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.body["items"][0]["metadata"]["name"], "cube-ana");
    ts.cleanup().await;
}
