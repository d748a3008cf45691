//! `?watch=true`: a stream of newline-delimited change events, resumable from a resource
//! version. Live changes come from the store's broadcast; history (and catching up after a
//! slow reader lagged behind the broadcast) from the store's `changes` table.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use crate::api::{watch_line, watch_line_of};
use crate::error::{ApiError, ErrorCode};
use crate::resources::Kind;
use crate::store::{ChangeEvent, ChangeType, Store};

type Sender = mpsc::Sender<Result<Bytes, Infallible>>;

pub async fn watch(
    store: Arc<Store>,
    kind: Kind,
    filter: impl Fn(&Value) -> bool + Send + Sync + 'static,
    resource_version: Option<&str>,
) -> Result<Response, ApiError> {
    let since = resource_version
        .filter(|v| !v.is_empty() && *v != "0")
        .map(|v| {
            v.parse::<i64>().map_err(|_| {
                ApiError::bad_request(format!("resourceVersion {v:?} is not a number"))
            })
        })
        .transpose()?;
    // Subscribe before reading history so that nothing falls between the two.
    let mut live = store.subscribe();
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    let mut initial = Vec::new();
    let mut last = match since {
        Some(version) => {
            let compacted = store.compacted_version().await?;
            if version < compacted {
                return Err(ApiError::new(
                    ErrorCode::Gone,
                    format!(
                        "resourceVersion {version} is older than the retained history (from {compacted}); list again"
                    ),
                ));
            }
            // A version the store has not reached was never served: a watch from it would
            // skip whatever comes until then, silently.
            let current = store.current_version().await?;
            if version > current {
                return Err(ApiError::new(
                    ErrorCode::Invalid,
                    format!(
                        "resourceVersion {version} is newer than the store's ({current}); watch from a version a list or watch returned"
                    ),
                )
                .with_details(serde_json::json!({"field": "resourceVersion", "current": current.to_string()})));
            }
            version
        }
        None => {
            let (version, items) = store.list_raw(kind, &Default::default()).await?;
            initial = items;
            version
        }
    };
    tokio::spawn(async move {
        for (_, body) in initial {
            if passes(&filter, &body)
                && tx
                    .send(Ok(watch_line_of(ChangeType::Added, &body)))
                    .await
                    .is_err()
            {
                return;
            }
        }
        if let Some(version) = since
            && !replay(&store, kind, &filter, &tx, version, &mut last).await
        {
            return;
        }
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                received = live.recv() => match received {
                    Ok(event) => {
                        if !send(&tx, kind, &filter, &event, &mut last).await {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        let from = last;
                        if !replay(&store, kind, &filter, &tx, from, &mut last).await {
                            return;
                        }
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

fn passes(filter: &impl Fn(&Value) -> bool, body: &str) -> bool {
    serde_json::from_str::<Value>(body).is_ok_and(|o| filter(&o))
}

/// Sends one event if it is new and selected; false once the client has gone.
async fn send(
    tx: &Sender,
    kind: Kind,
    filter: &impl Fn(&Value) -> bool,
    event: &ChangeEvent,
    last: &mut i64,
) -> bool {
    if event.kind != kind || event.resource_version <= *last {
        return true;
    }
    *last = event.resource_version;
    if !passes(filter, &event.body) {
        return true;
    }
    tx.send(Ok(watch_line(event))).await.is_ok()
}

async fn replay(
    store: &Store,
    kind: Kind,
    filter: &impl Fn(&Value) -> bool,
    tx: &Sender,
    from: i64,
    last: &mut i64,
) -> bool {
    match store.changes_after(kind, from).await {
        Ok(events) => {
            for event in &events {
                if !send(tx, kind, filter, event, last).await {
                    return false;
                }
            }
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "watch replay failed; closing the stream");
            false
        }
    }
}
