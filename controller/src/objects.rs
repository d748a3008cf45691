//! Object semantics on top of the store: create, apply (create-or-update with no-op detection),
//! delete with finalizers, status merge patches, and events.

use serde_json::{Map, Value, json};

use crate::error::{ApiError, ErrorCode};
use crate::resources::{Kind, ObjectMeta, RELEASE_FINALIZER, Submitted};
use crate::store::{Change, Store, StoreError};
use crate::time::now_rfc3339;

/// The object a create would store (without a resource version).
fn new_object(kind: Kind, submitted: &Submitted) -> Value {
    let meta = ObjectMeta {
        name: submitted.metadata.name.clone(),
        labels: submitted.metadata.labels.clone(),
        annotations: submitted.metadata.annotations.clone(),
        uid: Some(uuid::Uuid::new_v4().to_string()),
        resource_version: None,
        generation: Some(1),
        creation_timestamp: Some(now_rfc3339()),
        deletion_timestamp: None,
        finalizers: if kind.has_release_finalizer() {
            vec![RELEASE_FINALIZER.to_string()]
        } else {
            vec![]
        },
        owner: submitted.metadata.owner.clone(),
    };
    let status = match kind {
        Kind::Application | Kind::Dataset => json!({"phase": "Pending"}),
        Kind::Region => json!({"phase": "NotReady", "message": "waiting for the region driver"}),
        Kind::Task | Kind::Event | Kind::Token => json!({}),
    };
    json!({
        "apiVersion": crate::resources::API_VERSION,
        "kind": kind.as_str(),
        "metadata": meta,
        "spec": submitted.spec,
        "status": status,
    })
}

fn already_exists(kind: Kind, name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::AlreadyExists,
        format!("{} {name:?} already exists", kind.as_str()),
    )
    .with_details(json!({"kind": kind.as_str(), "name": name}))
}

fn conflict(kind: Kind, name: &str, message: String) -> ApiError {
    ApiError::new(ErrorCode::Conflict, message)
        .with_details(json!({"kind": kind.as_str(), "name": name}))
}

/// Checks a client's `metadata.resourceVersion` precondition against the stored object.
fn check_version(
    kind: Kind,
    name: &str,
    sent: Option<&str>,
    stored: &Value,
) -> Result<(), ApiError> {
    match (sent, stored["metadata"]["resourceVersion"].as_str()) {
        (Some(sent), Some(current)) if sent != current => Err(conflict(
            kind,
            name,
            format!(
                "{} {name:?} was modified: resourceVersion {sent} is stale (current {current}); read it again and retry",
                kind.as_str()
            ),
        )),
        _ => Ok(()),
    }
}

pub async fn create(
    store: &Store,
    kind: Kind,
    submitted: Submitted,
    dry_run: bool,
) -> Result<Value, ApiError> {
    let name = submitted.metadata.name.clone();
    let object = new_object(kind, &submitted);
    if dry_run {
        return match store.get(kind, &name).await? {
            Some(_) => Err(already_exists(kind, &name)),
            None => Ok(object),
        };
    }
    let written = store
        .write(kind, &name, |current| match current {
            Some(_) => Err(already_exists(kind, &name)),
            None => Ok(Change::Put(object)),
        })
        .await?;
    Ok(written.object.unwrap_or_default())
}

/// Create-or-update. Returns the object and whether it was created.
pub async fn apply(
    store: &Store,
    kind: Kind,
    submitted: Submitted,
    dry_run: bool,
) -> Result<(Value, bool), ApiError> {
    let name = submitted.metadata.name.clone();
    let decide = |current: Option<Value>| -> Result<Change, ApiError> {
        let Some(mut stored) = current else {
            // A resourceVersion is a precondition on an object that exists: it never creates.
            if let Some(sent) = submitted.metadata.resource_version.as_deref() {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!(
                        "{} {name:?} does not exist, so resourceVersion {sent} cannot match; \
                         send it without metadata.resourceVersion to create it",
                        kind.as_str()
                    ),
                ));
            }
            return Ok(Change::Put(new_object(kind, &submitted)));
        };
        check_version(
            kind,
            &name,
            submitted.metadata.resource_version.as_deref(),
            &stored,
        )?;
        if stored["metadata"]["deletionTimestamp"].is_string() {
            return Err(conflict(
                kind,
                &name,
                format!("{} {name:?} is being deleted", kind.as_str()),
            ));
        }
        let labels = json!(submitted.metadata.labels);
        let annotations = json!(submitted.metadata.annotations);
        let or_empty = |v: &Value| if v.is_null() { json!({}) } else { v.clone() };
        let spec_changed = stored["spec"] != submitted.spec;
        if !spec_changed
            && or_empty(&stored["metadata"]["labels"]) == labels
            && or_empty(&stored["metadata"]["annotations"]) == annotations
        {
            return Ok(Change::Keep);
        }
        if spec_changed && kind == Kind::Application {
            let phase = stored["status"]["phase"].as_str().unwrap_or("Pending");
            let frozen = immutable_changes(&stored["spec"], &submitted.spec, phase);
            if !frozen.is_empty() {
                let causes: Vec<ceccm_federation::Violation> = frozen
                    .into_iter()
                    .map(|field| {
                        ceccm_federation::Violation::new(
                            field,
                            format!(
                                "is immutable once the application is scheduled (phase \
                                 {phase}); delete and re-create it to change it"
                            ),
                        )
                    })
                    .collect();
                return Err(ApiError::invalid(kind.as_str(), &name, &causes));
            }
        }
        let meta = &mut stored["metadata"];
        set_or_remove(meta, "labels", labels);
        set_or_remove(meta, "annotations", annotations);
        if spec_changed {
            let generation = meta["generation"].as_i64().unwrap_or(1);
            meta["generation"] = json!(generation + 1);
            stored["spec"] = submitted.spec.clone();
        }
        Ok(Change::Put(stored))
    };
    if dry_run {
        let current = store.get(kind, &name).await?;
        let created = current.is_none();
        let object = match decide(current.clone())? {
            Change::Put(o) | Change::PutWithResult(o, _) => o,
            Change::Keep | Change::Delete => current.unwrap_or_default(),
        };
        return Ok((object, created));
    }
    let written = store.write(kind, &name, decide).await?;
    Ok((written.object.unwrap_or_default(), written.created))
}

/// The spec fields an update changes that may no longer change: everything but `suspend` once
/// an application has left `Pending` (its work is planned and placed from the spec it had).
/// Parameters are named one by one (`spec.parameters.moments`).
pub fn immutable_changes(stored: &Value, submitted: &Value, phase: &str) -> Vec<String> {
    if phase == "Pending" {
        return vec![];
    }
    let empty = Map::new();
    let (old, new) = (
        stored.as_object().unwrap_or(&empty),
        submitted.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut fields = Vec::new();
    for key in keys {
        if key == "suspend" || old.get(key) == new.get(key) {
            continue;
        }
        match (old.get(key), new.get(key)) {
            (Some(Value::Object(a)), Some(Value::Object(b))) if key == "parameters" => {
                let mut inner: Vec<&String> = a.keys().chain(b.keys()).collect();
                inner.sort();
                inner.dedup();
                fields.extend(
                    inner
                        .into_iter()
                        .filter(|k| a.get(*k) != b.get(*k))
                        .map(|k| format!("spec.parameters.{k}")),
                );
            }
            _ => fields.push(format!("spec.{key}")),
        }
    }
    fields
}

fn set_or_remove(meta: &mut Value, key: &str, value: Value) {
    let empty = value.as_object().is_none_or(Map::is_empty);
    if let Some(m) = meta.as_object_mut() {
        if empty {
            m.remove(key);
        } else {
            m.insert(key.to_string(), value);
        }
    }
}

/// Deletes, or marks for deletion while finalizers remain. Returns the object as it was
/// answered to the client.
pub async fn delete(
    store: &Store,
    kind: Kind,
    name: &str,
    dry_run: bool,
) -> Result<Value, ApiError> {
    if !kind.user_writable() {
        return Err(crate::resources::read_only(kind));
    }
    let decide = |current: Option<Value>| -> Result<Change, ApiError> {
        let Some(mut object) = current else {
            return Err(ApiError::not_found(kind.as_str(), name));
        };
        let has_finalizers = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if !has_finalizers {
            return Ok(Change::Delete);
        }
        if object["metadata"]["deletionTimestamp"].is_string() {
            return Ok(Change::Keep);
        }
        object["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        if object["status"].is_object() {
            object["status"]["phase"] = json!("Deleting");
        }
        Ok(Change::Put(object))
    };
    if dry_run {
        let current = store.get(kind, name).await?;
        return match decide(current.clone())? {
            Change::Put(o) => Ok(o),
            _ => Ok(current.unwrap_or_default()),
        };
    }
    let mut before = None;
    let written = store
        .write(kind, name, |current| {
            before.clone_from(&current);
            decide(current)
        })
        .await?;
    Ok(written.object.or(before).unwrap_or_default())
}

/// Removes `finalizer`; an object marked for deletion with no finalizer left goes away.
pub async fn remove_finalizer(
    store: &Store,
    kind: Kind,
    name: &str,
    finalizer: &str,
) -> Result<(), StoreError> {
    store
        .write(kind, name, |current| -> Result<Change, StoreError> {
            let Some(mut object) = current else {
                return Ok(Change::Keep);
            };
            let Some(list) = object["metadata"]["finalizers"].as_array_mut() else {
                return Ok(Change::Keep);
            };
            let before = list.len();
            list.retain(|f| f.as_str() != Some(finalizer));
            if list.len() == before {
                return Ok(Change::Keep);
            }
            if list.is_empty() && object["metadata"]["deletionTimestamp"].is_string() {
                return Ok(Change::Delete);
            }
            Ok(Change::Put(object))
        })
        .await?;
    Ok(())
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let map = target.as_object_mut().expect("made an object above");
            for (key, value) in fields {
                if value.is_null() {
                    map.remove(key);
                } else {
                    merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// `PATCH .../status`: body `{"status": {...}}` with an optional `metadata.resourceVersion`
/// precondition; anything else in the body is a bad request.
pub async fn patch_status(
    store: &Store,
    kind: Kind,
    name: &str,
    body: Value,
) -> Result<Value, ApiError> {
    let Value::Object(fields) = &body else {
        return Err(ApiError::bad_request("a status patch is a JSON object"));
    };
    if let Some(key) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "status" | "metadata"))
    {
        return Err(ApiError::bad_request(format!(
            "a status patch may only hold \"status\" and \"metadata.resourceVersion\", not {key:?}"
        )));
    }
    // Merging a non-object would replace the whole status with it.
    if fields.get("status").is_some_and(|s| !s.is_object()) {
        return Err(ApiError::bad_request(
            "a status patch's \"status\" must be an object",
        ));
    }
    let sent_version = match &body["metadata"] {
        Value::Null => None,
        Value::Object(m) if m.keys().all(|k| k == "resourceVersion") => {
            match m.get("resourceVersion") {
                None | Some(Value::Null) => None,
                Some(Value::String(v)) => Some(v.clone()),
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "a status patch's metadata.resourceVersion must be a string",
                    ));
                }
            }
        }
        _ => {
            return Err(ApiError::bad_request(
                "a status patch's metadata may only hold resourceVersion",
            ));
        }
    };
    let written = store
        .write(kind, name, |current| {
            let Some(mut object) = current else {
                return Err(ApiError::not_found(kind.as_str(), name));
            };
            check_version(kind, name, sent_version.as_deref(), &object)?;
            let before = object["status"].clone();
            // A patch without `status` changes nothing (merging its absence, a null, would
            // erase the whole status).
            if body["status"].is_object() {
                merge_patch(&mut object["status"], &body["status"]);
            }
            Ok(if object["status"] == before {
                Change::Keep
            } else {
                Change::Put(object)
            })
        })
        .await?;
    Ok(written.object.unwrap_or_default())
}

/// Changes an object's status with `update`; writes only if the status changed.
pub async fn update_status(
    store: &Store,
    kind: Kind,
    name: &str,
    update: impl FnOnce(&mut Value),
) -> Result<Option<Value>, StoreError> {
    let written = store
        .write(kind, name, |current| -> Result<Change, StoreError> {
            let Some(mut object) = current else {
                return Ok(Change::Keep);
            };
            let before = object["status"].clone();
            update(&mut object["status"]);
            Ok(if object["status"] == before {
                Change::Keep
            } else {
                Change::Put(object)
            })
        })
        .await?;
    Ok(written.object)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// Records an event about `object` (an object as stored). The event has the object's owner,
/// so that it is seen by whoever sees the object (`auth::sees`).
/// The counter that says the owners were backfilled (`migrations/0003_owner_backfill.sql`).
const OWNERS_BACKFILLED: &str = "ownersBackfilled";

/// Tasks and events stored before they carried their owner get the owner of what they follow
/// (a task its application's, an event that of the object it is about), once per store: to a
/// user an owned object without an owner is nobody's (`auth::sees`). Idempotent: an object
/// that has an owner keeps it. Returns how many objects were given one.
pub async fn backfill_owners(store: &Store) -> Result<usize, StoreError> {
    if store.counter(OWNERS_BACKFILLED).await? != 0 {
        return Ok(0);
    }
    let mut owners: std::collections::HashMap<(Kind, String), Option<String>> = Default::default();
    let mut given = 0;
    // Tasks first: events about a task then find its owner.
    for kind in [Kind::Task, Kind::Event] {
        let mut after: Option<String> = None;
        loop {
            let page = crate::store::Query {
                after: after.as_deref(),
                limit: Some(1000),
                ..Default::default()
            };
            let (_, rows) = store.list_raw(kind, &page).await?;
            let Some((last, _)) = rows.last() else {
                break;
            };
            after = Some(last.clone());
            for (name, body) in rows {
                let Ok(object) = serde_json::from_str::<Value>(&body) else {
                    continue;
                };
                if object["metadata"]["owner"].is_string() {
                    continue;
                }
                let Some(follows) = followed(kind, &object) else {
                    continue;
                };
                if !owners.contains_key(&follows) {
                    let owner = store
                        .get(follows.0, &follows.1)
                        .await?
                        .and_then(|o| o["metadata"]["owner"].as_str().map(str::to_string));
                    owners.insert(follows.clone(), owner);
                }
                let Some(owner) = owners[&follows].clone() else {
                    continue;
                };
                let written = store
                    .write(kind, &name, |current| -> Result<Change, StoreError> {
                        match current {
                            Some(mut o) if !o["metadata"]["owner"].is_string() => {
                                o["metadata"]["owner"] = json!(owner);
                                Ok(Change::Put(o))
                            }
                            _ => Ok(Change::Keep),
                        }
                    })
                    .await?;
                given += usize::from(written.changed);
            }
        }
    }
    store.set_counter(OWNERS_BACKFILLED, 1).await?;
    Ok(given)
}

/// The owned object whose owner `object` (a task or an event) follows.
fn followed(kind: Kind, object: &Value) -> Option<(Kind, String)> {
    let text = |v: &Value| v.as_str().map(str::to_string);
    match kind {
        Kind::Task => Some((Kind::Application, text(&object["spec"]["application"])?)),
        Kind::Event => {
            let about = match object["involvedObject"]["kind"].as_str()? {
                "Application" => Kind::Application,
                "Dataset" => Kind::Dataset,
                "Task" => Kind::Task,
                _ => return None,
            };
            Some((about, text(&object["involvedObject"]["name"])?))
        }
        _ => None,
    }
}

pub async fn record_event(
    store: &Store,
    object: &Value,
    event_type: EventType,
    reason: &str,
    message: &str,
) -> Result<(), StoreError> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let involved = object["metadata"]["name"].as_str().unwrap_or_default();
    let uid = object["metadata"]["uid"].as_str().unwrap_or_default();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("{involved}.{}", &id[..12]);
    let now = now_rfc3339();
    let mut metadata = json!({"name": name, "uid": id, "creationTimestamp": now});
    if let Some(owner) = object["metadata"]["owner"].as_str() {
        metadata["owner"] = json!(owner);
    }
    let event = json!({
        "apiVersion": crate::resources::API_VERSION,
        "kind": "Event",
        "metadata": metadata,
        "involvedObject": {"kind": kind, "name": involved, "uid": uid},
        "type": match event_type { EventType::Normal => "Normal", EventType::Warning => "Warning" },
        "reason": reason,
        "message": message,
        "count": 1,
        "firstTimestamp": now,
        "lastTimestamp": now,
    });
    store
        .write(Kind::Event, &name, |_| -> Result<Change, StoreError> {
            Ok(Change::Put(event))
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "h": [1]}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "h": [1]}));
        let mut scalar = json!(1);
        merge_patch(&mut scalar, &json!({"x": 1}));
        assert_eq!(scalar, json!({"x": 1}));
    }

    #[test]
    fn a_scheduled_application_refuses_spec_changes_but_suspend() {
        let old = json!({"app": "astro-fit", "parameters": {"moments": 2, "degree": 4},
                         "suspend": false});
        let new = json!({"app": "astro-fit", "parameters": {"moments": 4, "degree": 4},
                         "suspend": true, "objective": "energy"});
        assert!(immutable_changes(&old, &new, "Pending").is_empty());
        assert_eq!(
            immutable_changes(&old, &new, "Running"),
            ["spec.objective", "spec.parameters.moments"]
        );
        let only_suspend = json!({"app": "astro-fit", "parameters": {"moments": 2, "degree": 4},
                                  "suspend": true});
        assert!(immutable_changes(&old, &only_suspend, "Running").is_empty());
    }
}
