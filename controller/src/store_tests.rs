//! The store suite, run on SQLite and on PostgreSQL.

use serde_json::{Value, json};

use crate::error::ErrorCode;
use crate::objects;
use crate::resources::{Kind, RELEASE_FINALIZER, parse_submitted};
use crate::store::{Change, ChangeType, Query, StoreError, TaskResultRow, TelemetryRow};
use crate::testing::{TestStore, store_suite};

fn region(name: &str, cpu: u32) -> Value {
    json!({"apiVersion": "ceccm/v1", "kind": "Region", "metadata": {"name": name, "labels": {"tier": "edge"}},
           "spec": {"tier": "edge", "driver": "local", "capacity": {"cpu": cpu}}})
}

fn rv(object: &Value) -> i64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn put(ts: &TestStore, kind: Kind, name: &str, object: Value) -> Value {
    ts.store
        .write(kind, name, |_| -> Result<Change, StoreError> {
            Ok(Change::Put(object))
        })
        .await
        .unwrap()
        .object
        .unwrap()
}

async fn versions_grow_and_changes_are_replayable(ts: &TestStore) {
    let store = &ts.store;
    let a = put(ts, Kind::Region, "a", region("a", 1)).await;
    let b = put(ts, Kind::Region, "b", region("b", 1)).await;
    assert!(rv(&b) > rv(&a));
    let kept = store
        .write(Kind::Region, "a", |_| -> Result<Change, StoreError> {
            Ok(Change::Keep)
        })
        .await
        .unwrap();
    assert!(!kept.changed);
    assert_eq!(store.current_version().await.unwrap(), rv(&b));
    let a2 = put(ts, Kind::Region, "a", region("a", 2)).await;
    store
        .write(Kind::Region, "b", |_| -> Result<Change, StoreError> {
            Ok(Change::Delete)
        })
        .await
        .unwrap();
    let changes = store.changes_after(Kind::Region, rv(&a)).await.unwrap();
    let seen: Vec<(ChangeType, i64)> = changes
        .iter()
        .map(|c| (c.change, c.resource_version))
        .collect();
    assert_eq!(
        seen,
        [
            (ChangeType::Added, rv(&b)),
            (ChangeType::Modified, rv(&a2)),
            (ChangeType::Deleted, rv(&a2) + 1)
        ]
    );
    assert!(store.get(Kind::Region, "b").await.unwrap().is_none());
    assert!(
        store
            .changes_after(Kind::Application, 0)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn queries_filter_on_indexed_columns(ts: &TestStore) {
    for (i, (state, region, deadline)) in [
        ("Queued", "edge", None),
        ("Leased", "edge", Some("1970-01-01T00:00:01.000Z")),
        ("Leased", "cloud", Some("2999-01-01T00:00:00.000Z")),
        ("Queued", "cloud", None),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("job-{i:05}");
        let task = json!({"kind": "Task", "metadata": {"name": name},
            "spec": {"application": "job"},
            "status": {"state": state, "region": region, "leaseDeadline": deadline}});
        put(ts, Kind::Task, &name, task).await;
    }
    let names = |items: Vec<Value>| -> Vec<String> {
        items
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let store = &ts.store;
    let q = |phase, region| Query {
        phase,
        region,
        ..Default::default()
    };
    assert_eq!(
        names(
            store
                .list(Kind::Task, &q(Some("Queued"), Some("cloud")))
                .await
                .unwrap()
        ),
        ["job-00003"]
    );
    let expired = Query {
        phase: Some("Leased"),
        deadline_before_ms: Some(crate::time::now_millis()),
        ..Default::default()
    };
    assert_eq!(
        names(store.list(Kind::Task, &expired).await.unwrap()),
        ["job-00001"]
    );
    let page = Query {
        owner: Some("job"),
        after: Some("job-00000"),
        limit: Some(2),
        ..Default::default()
    };
    assert_eq!(
        names(store.list(Kind::Task, &page).await.unwrap()),
        ["job-00001", "job-00002"]
    );
    let counts = store.phase_counts().await.unwrap();
    assert!(counts.contains(&("Task".into(), "Leased".into(), 2)));
}

async fn apply_is_idempotent_and_guards_versions(ts: &TestStore) {
    let store = &ts.store;
    let submitted = parse_submitted(Kind::Region, region("edge-a", 2)).unwrap();
    let (first, created) = objects::apply(store, Kind::Region, submitted.clone(), false)
        .await
        .unwrap();
    assert!(created);
    assert_eq!(first["metadata"]["generation"], 1);
    assert_eq!(first["metadata"]["finalizers"], json!([RELEASE_FINALIZER]));
    let (again, created) = objects::apply(store, Kind::Region, submitted.clone(), false)
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(
        again["metadata"]["resourceVersion"],
        first["metadata"]["resourceVersion"]
    );

    let mut changed = region("edge-a", 4);
    changed["metadata"]["resourceVersion"] = first["metadata"]["resourceVersion"].clone();
    let (updated, _) = objects::apply(
        store,
        Kind::Region,
        parse_submitted(Kind::Region, changed.clone()).unwrap(),
        false,
    )
    .await
    .unwrap();
    assert_eq!(updated["metadata"]["generation"], 2);
    assert_eq!(updated["spec"]["capacity"]["cpu"], 4);
    assert_eq!(updated["metadata"]["uid"], first["metadata"]["uid"]);

    // The same body again now carries a stale version.
    changed["spec"]["capacity"]["cpu"] = json!(8);
    let stale = objects::apply(
        store,
        Kind::Region,
        parse_submitted(Kind::Region, changed).unwrap(),
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(stale.code, ErrorCode::Conflict);
    let exists = objects::create(store, Kind::Region, submitted, false)
        .await
        .unwrap_err();
    assert_eq!(exists.code, ErrorCode::AlreadyExists);
    let stored = store.get(Kind::Region, "edge-a").await.unwrap().unwrap();
    assert_eq!(stored, updated);
}

async fn deletion_waits_for_finalizers(ts: &TestStore) {
    let store = &ts.store;
    let submitted = parse_submitted(Kind::Region, region("edge-a", 2)).unwrap();
    objects::create(store, Kind::Region, submitted, false)
        .await
        .unwrap();
    let answered = objects::delete(store, Kind::Region, "edge-a", false)
        .await
        .unwrap();
    assert!(answered["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(answered["status"]["phase"], "Deleting");
    assert!(store.get(Kind::Region, "edge-a").await.unwrap().is_some());
    objects::remove_finalizer(store, Kind::Region, "edge-a", RELEASE_FINALIZER)
        .await
        .unwrap();
    assert!(store.get(Kind::Region, "edge-a").await.unwrap().is_none());
    let gone = objects::delete(store, Kind::Region, "edge-a", false)
        .await
        .unwrap_err();
    assert_eq!(gone.code, ErrorCode::NotFound);
}

async fn a_task_result_is_written_once(ts: &TestStore) {
    let store = &ts.store;
    for worker in ["w1", "w2"] {
        let task = json!({"kind": "Task", "metadata": {"name": "job-00000"},
            "spec": {"application": "job"}, "status": {"state": "Done", "worker": worker}});
        let row = TaskResultRow {
            task: "job-00000".into(),
            application: "job".into(),
            index: 0,
            worker: worker.into(),
            body: json!({"by": worker}).to_string(),
            telemetry: None,
        };
        store
            .write(Kind::Task, "job-00000", |_| -> Result<Change, StoreError> {
                Ok(Change::PutWithResult(task, row))
            })
            .await
            .unwrap();
    }
    let results = store.task_results("job").await.unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].1, "w1");
    store.delete_task_results("job").await.unwrap();
    assert!(store.task_results("job").await.unwrap().is_empty());
}

async fn telemetry_is_written_once_per_task_and_outlives_results_and_restarts(ts: &TestStore) {
    let store = &ts.store;
    // Task "job-00000" completes twice (the second write is a redelivery) under one uid, then
    // again after its application was re-created (a new uid): two samples, not three.
    for (uid, seconds) in [("uid-1", 1.0), ("uid-1", 9.0), ("uid-2", 2.0)] {
        let task = json!({"kind": "Task", "metadata": {"name": "job-00000", "uid": uid},
            "spec": {"application": "job"}, "status": {"state": "Done"}});
        let row = TaskResultRow {
            task: format!("job-00000-{uid}"),
            application: "job".into(),
            index: 0,
            worker: "w1".into(),
            body: "{}".into(),
            telemetry: Some(TelemetryRow {
                task_uid: uid.into(),
                region: "edge-a".into(),
                body: json!({"seconds": seconds}).to_string(),
            }),
        };
        store
            .write(Kind::Task, "job-00000", |_| -> Result<Change, StoreError> {
                Ok(Change::PutWithResult(task, row))
            })
            .await
            .unwrap();
    }
    let seconds = |bodies: &[String]| -> Vec<f64> {
        bodies
            .iter()
            .map(|b| {
                serde_json::from_str::<Value>(b).unwrap()["seconds"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let (count, bodies) = store.telemetry(10).await.unwrap();
    assert_eq!(count, 2);
    assert_eq!(seconds(&bodies), [1.0, 2.0], "oldest first");
    let (_, newest) = store.telemetry(1).await.unwrap();
    assert_eq!(seconds(&newest), [2.0]);

    store.delete_task_results("job").await.unwrap();
    store.close().await;
    let reopened = ts.reopen().await;
    let (count, bodies) = reopened.telemetry(10).await.unwrap();
    assert_eq!(count, 2);
    assert_eq!(seconds(&bodies), [1.0, 2.0]);
    reopened.close().await;
}

async fn state_survives_reopening(ts: &TestStore) {
    let before = put(ts, Kind::Region, "a", region("a", 1)).await;
    ts.store.close().await;
    let reopened = ts.reopen().await;
    assert_eq!(
        reopened.get(Kind::Region, "a").await.unwrap(),
        Some(before.clone())
    );
    assert_eq!(reopened.current_version().await.unwrap(), rv(&before));
    reopened.close().await;
}

/// Label selectors and owners are answered from the mirror's index, on either backend.
async fn indexed_lists_filter_on_labels_and_owner(ts: &TestStore) {
    for i in 0..6 {
        let mut r = region(&format!("r{i}"), 1);
        r["metadata"]["labels"]["batch"] = json!(if i % 2 == 0 { "even" } else { "odd" });
        if i < 2 {
            r["metadata"]["owner"] = json!("ana");
        }
        put(ts, Kind::Region, &format!("r{i}"), r).await;
    }
    let names = |found: Option<(i64, Vec<(String, String)>)>| -> Vec<String> {
        found.unwrap().1.into_iter().map(|(n, _)| n).collect()
    };
    let even = ts
        .store
        .list_indexed(Kind::Region, &Query::default(), |i| {
            i.labels.get("batch").map(String::as_str) == Some("even")
        })
        .await
        .unwrap();
    assert_eq!(names(even), ["r0", "r2", "r4"]);
    let page = Query {
        after: Some("r0"),
        limit: Some(2),
        ..Default::default()
    };
    let odd_after_r0 = ts
        .store
        .list_indexed(Kind::Region, &page, |i| i.labels["batch"] == "odd")
        .await
        .unwrap();
    assert_eq!(names(odd_after_r0), ["r1", "r3"]);
    let anas = ts
        .store
        .list_indexed(Kind::Region, &Query::default(), |i| {
            i.owner.as_deref() == Some("ana")
        })
        .await
        .unwrap();
    assert_eq!(names(anas), ["r0", "r1"]);
    // Tasks are not mirrored: their lists go to the database's columns.
    let tasks = ts
        .store
        .list_indexed(Kind::Task, &Query::default(), |_| true)
        .await
        .unwrap();
    assert!(tasks.is_none());
    assert_eq!(ts.store.names(Kind::Region).await.unwrap().len(), 6);
    assert_eq!(
        ts.store
            .count(Kind::Region, &Query::default())
            .await
            .unwrap(),
        6
    );
}

/// PostgreSQL: a store opened by another server reads every write acknowledged before the read
/// (from its mirror, brought up to the store's version first), with nothing following the
/// change log in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_another_servers_reads_see_every_acknowledged_write() {
    let Some(ts) = crate::testing::postgres().await else {
        return;
    };
    let other = ts.reopen().await;
    let mut last = 0;
    for i in 0..5 {
        let name = format!("r{i}");
        let mut r = region(&name, 1);
        r["metadata"]["labels"]["batch"] = json!(if i % 2 == 0 { "even" } else { "odd" });
        let written = put(&ts, Kind::Region, &name, r).await;
        let seen = other.get(Kind::Region, &name).await.unwrap().unwrap();
        assert_eq!(rv(&seen), rv(&written));
        last = rv(&written);
    }
    let (version, even) = other
        .list_indexed(Kind::Region, &Query::default(), |i| {
            i.labels.get("batch").map(String::as_str) == Some("even")
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(version, last);
    let even: Vec<&str> = even.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(even, ["r0", "r2", "r4"]);
    let deleted = ts
        .store
        .write(Kind::Region, "r1", |_| -> Result<Change, StoreError> {
            Ok(Change::Delete)
        })
        .await
        .unwrap();
    assert!(deleted.changed);
    assert_eq!(other.get(Kind::Region, "r1").await.unwrap(), None);
    assert_eq!(
        other.names(Kind::Region).await.unwrap(),
        ["r0", "r2", "r3", "r4"]
    );
    other.close().await;
    ts.cleanup().await;
}

/// A store from before tasks and events carried their owner: each gets the owner of what it
/// follows, once.
async fn owners_are_backfilled_once(ts: &TestStore) {
    let app = json!({"apiVersion": "ceccm/v1", "kind": "Application",
        "metadata": {"name": "fit", "owner": "ana"}, "spec": {"app": "container"}});
    put(ts, Kind::Application, "fit", app).await;
    let task = |name: &str, owner: Option<&str>| {
        let mut t = json!({"apiVersion": "ceccm/v1", "kind": "Task", "metadata": {"name": name},
            "spec": {"application": "fit", "index": 0}, "status": {"state": "Done"}});
        if let Some(owner) = owner {
            t["metadata"]["owner"] = json!(owner);
        }
        t
    };
    put(ts, Kind::Task, "fit-00000", task("fit-00000", None)).await;
    put(ts, Kind::Task, "fit-00001", task("fit-00001", Some("bob"))).await;
    let event = |name: &str, kind: &str, about: &str| {
        json!({"apiVersion": "ceccm/v1", "kind": "Event", "metadata": {"name": name},
               "involvedObject": {"kind": kind, "name": about}, "type": "Normal",
               "reason": "Test", "message": "m"})
    };
    put(
        ts,
        Kind::Event,
        "fit.1",
        event("fit.1", "Application", "fit"),
    )
    .await;
    put(
        ts,
        Kind::Event,
        "fit-00000.1",
        event("fit-00000.1", "Task", "fit-00000"),
    )
    .await;
    put(ts, Kind::Event, "edge.1", event("edge.1", "Region", "edge")).await;

    assert_eq!(objects::backfill_owners(&ts.store).await.unwrap(), 3);
    let owner = |kind: Kind, name: &'static str| {
        let store = ts.store.clone();
        async move { store.get(kind, name).await.unwrap().unwrap()["metadata"]["owner"].clone() }
    };
    assert_eq!(owner(Kind::Task, "fit-00000").await, "ana");
    assert_eq!(
        owner(Kind::Task, "fit-00001").await,
        "bob",
        "an owner is kept"
    );
    assert_eq!(owner(Kind::Event, "fit.1").await, "ana");
    assert_eq!(owner(Kind::Event, "fit-00000.1").await, "ana");
    assert_eq!(
        owner(Kind::Event, "edge.1").await,
        Value::Null,
        "regions are no one's"
    );
    // Once per store: later objects are stamped when written, never by this.
    put(ts, Kind::Task, "fit-00002", task("fit-00002", None)).await;
    assert_eq!(objects::backfill_owners(&ts.store).await.unwrap(), 0);
    assert_eq!(owner(Kind::Task, "fit-00002").await, Value::Null);
}

/// Several objects in one transaction: each gets its own version, in order, and an error
/// part-way writes none of them.
async fn write_many_commits_all_or_nothing(ts: &TestStore) {
    let before = ts.store.current_version().await.unwrap();
    let put_new = |name: &'static str| {
        (
            name,
            move |current: Option<Value>| -> Result<Change, StoreError> {
                Ok(match current {
                    Some(_) => Change::Keep,
                    None => Change::Put(region(name, 1)),
                })
            },
        )
    };
    let written = ts
        .store
        .write_many(Kind::Region, [put_new("a"), put_new("b"), put_new("c")])
        .await
        .unwrap();
    let versions: Vec<i64> = written
        .iter()
        .map(|w| rv(w.object.as_ref().unwrap()))
        .collect();
    assert_eq!(versions, [before + 1, before + 2, before + 3]);
    assert!(written.iter().all(|w| w.created && w.changed));
    // Again: nothing changes, no version is taken.
    let again = ts
        .store
        .write_many(Kind::Region, [put_new("a"), put_new("b")])
        .await
        .unwrap();
    assert!(again.iter().all(|w| !w.changed));
    assert_eq!(ts.store.current_version().await.unwrap(), before + 3);
    // The third write fails: the first two (new objects) are rolled back with it.
    let failing = |name: &'static str, fail: bool| {
        (
            name,
            move |_: Option<Value>| -> Result<Change, StoreError> {
                if fail {
                    Err(StoreError::Corrupt("refused".into()))
                } else {
                    Ok(Change::Put(region(name, 2)))
                }
            },
        )
    };
    let refused = ts
        .store
        .write_many(
            Kind::Region,
            [failing("d", false), failing("e", false), failing("f", true)],
        )
        .await;
    assert!(refused.is_err());
    for name in ["d", "e", "f"] {
        assert_eq!(ts.store.get(Kind::Region, name).await.unwrap(), None);
    }
    assert_eq!(ts.store.current_version().await.unwrap(), before + 3);
    assert_eq!(ts.store.names(Kind::Region).await.unwrap(), ["a", "b", "c"]);
}

store_suite!(
    write_many_commits_all_or_nothing,
    owners_are_backfilled_once,
    indexed_lists_filter_on_labels_and_owner,
    versions_grow_and_changes_are_replayable,
    queries_filter_on_indexed_columns,
    apply_is_idempotent_and_guards_versions,
    deletion_waits_for_finalizers,
    a_task_result_is_written_once,
    telemetry_is_written_once_per_task_and_outlives_results_and_restarts,
    state_survives_reopening,
);
