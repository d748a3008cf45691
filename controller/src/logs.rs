//! Application logs: per task a header line, its captured output and its last error. With
//! `follow`, the stream stays open and each task's section is sent once it has finished, until
//! the application ends.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::resources::Kind;
use crate::store::Store;

/// The log section of one task.
pub fn section(task: &Value) -> String {
    let name = task["metadata"]["name"].as_str().unwrap_or_default();
    let status = &task["status"];
    let mut text = format!(
        "==> {name} [{}] worker={} attempts={}\n",
        status["state"].as_str().unwrap_or("?"),
        status["worker"].as_str().unwrap_or("-"),
        status["attempts"]
    );
    for stream in ["stdout", "stderr"] {
        if let Some(out) = status["result"][stream].as_str().filter(|s| !s.is_empty()) {
            text.push_str(out);
            if !out.ends_with('\n') {
                text.push('\n');
            }
        }
    }
    if let Some(error) = status["error"].as_str() {
        text.push_str(&format!("error: {error}\n"));
    }
    text
}

fn finished(task: &Value) -> bool {
    matches!(
        task["status"]["state"].as_str(),
        Some("Done" | "DeadLettered")
    )
}

async fn tasks_of(
    store: &Store,
    application: &str,
    only: Option<&str>,
) -> Result<Vec<Value>, ApiError> {
    let tasks = store.tasks_of(application).await?;
    Ok(tasks
        .into_iter()
        .filter(|t| only.is_none_or(|o| t["metadata"]["name"] == o))
        .collect())
}

pub async fn logs(
    store: Arc<Store>,
    application: String,
    only: Option<String>,
    follow: bool,
) -> Result<Response, ApiError> {
    if store
        .get_raw(Kind::Application, &application)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found("Application", &application));
    }
    let content_type = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !follow {
        let text: String = tasks_of(&store, &application, only.as_deref())
            .await?
            .iter()
            .map(section)
            .collect();
        return Ok((content_type, text).into_response());
    }
    let mut changes = store.subscribe();
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        let mut shown = HashSet::new();
        loop {
            // Read the phase first: tasks finished before the application did are then all seen.
            let phase = match store.get(Kind::Application, &application).await {
                Ok(Some(app)) => app["status"]["phase"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                _ => return,
            };
            let Ok(tasks) = tasks_of(&store, &application, only.as_deref()).await else {
                return;
            };
            for task in tasks.iter().filter(|t| finished(t)) {
                let name = task["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if shown.insert(name) && tx.send(Ok(Bytes::from(section(task)))).await.is_err() {
                    return;
                }
            }
            if matches!(phase.as_str(), "Succeeded" | "Failed") {
                return;
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = changes.recv() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    });
    Ok((
        content_type,
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response())
}
