//! The state store: every object as JSON in one table, through sqlx on SQLite (default, WAL) or
//! PostgreSQL, with the same migrations and the same code.
//!
//! Writes go through one in-process lock (and, on PostgreSQL, a transaction-scoped advisory
//! lock shared by every server on the database), so resource versions commit in order: a
//! watcher that saw version N has seen every change up to N. Each write also appends to
//! `changes`, which watches replay from, and is then broadcast to live watchers. On SQLite this
//! process is the only writer (one server per data directory) and applies its own writes; on
//! PostgreSQL several servers may write, so each follows `changes` in order, its own writes
//! included ([`Store::catch_up`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use serde_json::Value;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{AnyPool, ConnectOptions, Connection, Row};
use tokio::sync::{Mutex, broadcast};

use crate::resources::{IndexColumns, Kind};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How many changes watches can resume from.
pub const RETAINED_CHANGES: i64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(#[from] sqlx::Error),
    #[error("store holds a malformed object: {0}")]
    Corrupt(String),
    #[error("store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

impl ChangeType {
    fn as_str(self) -> &'static str {
        match self {
            ChangeType::Added => "ADDED",
            ChangeType::Modified => "MODIFIED",
            ChangeType::Deleted => "DELETED",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "ADDED" => Ok(ChangeType::Added),
            "MODIFIED" => Ok(ChangeType::Modified),
            "DELETED" => Ok(ChangeType::Deleted),
            other => Err(StoreError::Corrupt(format!("change type {other:?}"))),
        }
    }
}

/// One committed change, as watchers receive it.
#[derive(Debug, Clone)]
pub struct ChangeEvent {
    pub resource_version: i64,
    pub kind: Kind,
    pub change: ChangeType,
    /// The object as JSON text.
    pub body: Arc<str>,
}

/// What a write closure decides, given the current object (if any).
pub enum Change {
    Keep,
    Put(Value),
    /// Put, and record a task's result in the same transaction unless one exists already.
    PutWithResult(Value, TaskResultRow),
    Delete,
}

pub struct TaskResultRow {
    pub task: String,
    pub application: String,
    pub index: i64,
    pub worker: String,
    pub body: String,
    /// The finished task's telemetry sample, recorded once with its result.
    pub telemetry: Option<TelemetryRow>,
}

/// One row of `telemetry`: a sample as JSON (`ceccm_scheduler::TelemetrySample`).
pub struct TelemetryRow {
    pub task_uid: String,
    pub region: String,
    pub body: String,
}

/// The object after a write (`None` once deleted), and whether anything was written.
pub struct Written {
    pub object: Option<Value>,
    pub changed: bool,
    pub created: bool,
}

/// Filters over the indexed columns.
#[derive(Debug, Default, Clone)]
pub struct Query<'a> {
    pub phase: Option<&'a str>,
    pub region: Option<&'a str>,
    pub owner: Option<&'a str>,
    /// Only objects whose deadline lies before this instant (ms since the epoch).
    pub deadline_before_ms: Option<i64>,
    /// Names strictly after this one (pagination).
    pub after: Option<&'a str>,
    pub limit: Option<i64>,
}

pub struct Store {
    pool: AnyPool,
    backend: Backend,
    write: Mutex<()>,
    /// Held while following `changes` (PostgreSQL), so that changes are applied once, in order.
    following: Mutex<()>,
    changes: broadcast::Sender<ChangeEvent>,
    mirror: RwLock<Mirror>,
}

/// The session-level advisory lock the leading server holds, under the schema's own key (the
/// stores of several schemas in one database elect apart).
const LEADER_LOCK_KEY: i32 = 1;

/// A term of leadership: on PostgreSQL, the session holding the leader's lock.
pub struct LeaderTerm {
    session: Option<sqlx::AnyConnection>,
}

impl LeaderTerm {
    /// Whether the lock is still held: its session answers.
    pub async fn still_held(&mut self) -> bool {
        let Some(session) = &mut self.session else {
            return true;
        };
        let ping = sqlx::query("SELECT 1").execute(&mut *session);
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(5), ping).await,
            Ok(Ok(_))
        )
    }
}

/// The transaction-scoped advisory lock every PostgreSQL write takes first (under the schema's
/// own key): writes of all servers on one store commit one after another, in
/// resource-version order.
const WRITE_LOCK_KEY: i32 = 2;

/// In-memory copy of the user kinds (regions, applications, datasets: read often), kept in step
/// after each commit (by `write` on SQLite, by following `changes` on PostgreSQL), so that gets
/// and lists of them never read bodies from the database (on PostgreSQL one query first asks
/// how far the store has got, [`Store::mirror_current`]). Each object is held once, as its JSON text,
/// with what lists filter on read out of it when it is stored ([`ObjectIndex`]): a label
/// selector over ten thousand applications parses none of them.
#[derive(Default)]
struct Mirror {
    version: i64,
    objects: HashMap<Kind, BTreeMap<String, MirroredObject>>,
}

struct MirroredObject {
    body: Arc<str>,
    index: ObjectIndex,
}

/// What lists filter on, read once from an object as it is stored.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ObjectIndex {
    /// `metadata.owner`: the user it belongs to (`auth::sees`).
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub labels: BTreeMap<String, String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    Ok(
        <Option<BTreeMap<String, String>> as serde::Deserialize>::deserialize(d)?
            .unwrap_or_default(),
    )
}

/// An object's name and index, read from its JSON text without building the whole tree.
pub fn object_head(body: &str) -> Option<(String, ObjectIndex)> {
    #[derive(serde::Deserialize)]
    struct Head {
        metadata: Meta,
    }
    #[derive(serde::Deserialize)]
    struct Meta {
        name: String,
        #[serde(flatten)]
        index: ObjectIndex,
    }
    let head: Head = serde_json::from_str(body).ok()?;
    Some((head.metadata.name, head.metadata.index))
}

impl MirroredObject {
    fn of(body: Arc<str>) -> Option<(String, MirroredObject)> {
        let (name, index) = object_head(&body)?;
        Some((name, MirroredObject { body, index }))
    }
}

fn mirrored(kind: Kind) -> bool {
    matches!(kind, Kind::Region | Kind::Application | Kind::Dataset)
}

impl Store {
    /// Opens (creating if needed) the store and applies the embedded migrations.
    /// `database_url` of `None` means `DATA_DIR/ceccm.db` on SQLite in WAL mode.
    pub async fn open(data_dir: &Path, database_url: Option<&str>) -> Result<Store, StoreError> {
        install_default_drivers();
        let (url, backend) = match database_url {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                (url.to_string(), Backend::Postgres)
            }
            Some(url) => (url.to_string(), Backend::Sqlite),
            None => {
                let path = data_dir.join("ceccm.db");
                (format!("sqlite://{}", path.display()), Backend::Sqlite)
            }
        };
        if backend == Backend::Sqlite {
            // WAL is a property of the database file: set it once, every later connection uses it.
            let mut conn = SqliteConnectOptions::from_str(&url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .connect()
                .await?;
            conn.ping().await?;
            conn.close().await?;
        }
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 8 } else { 16 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout = 5000")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        MIGRATOR.run(&pool).await?;
        let (changes, _) = broadcast::channel(4096);
        let store = Store {
            pool,
            backend,
            write: Mutex::new(()),
            following: Mutex::new(()),
            changes,
            mirror: RwLock::new(Mirror::default()),
        };
        store.load_mirror().await?;
        Ok(store)
    }

    /// Loads the mirror from one snapshot of the database: its version and every object of
    /// the mirrored kinds as of that version.
    async fn load_mirror(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            // PostgreSQL's default isolation takes a new snapshot per statement.
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *tx)
                .await?;
        }
        let mut mirror = Mirror {
            version: current_version(&mut tx).await?,
            ..Default::default()
        };
        for kind in Kind::ALL.into_iter().filter(|k| mirrored(*k)) {
            let rows = sqlx::query("SELECT body FROM objects WHERE kind = $1")
                .bind(kind.as_str())
                .fetch_all(&mut *tx)
                .await?;
            mirror.objects.insert(
                kind,
                rows.into_iter()
                    .filter_map(|r| MirroredObject::of(Arc::from(r.get::<String, _>(0))))
                    .collect(),
            );
        }
        tx.commit().await?;
        *self.mirror.write().unwrap_or_else(|e| e.into_inner()) = mirror;
        Ok(())
    }

    /// Objects of a mirrored kind whose index `keep` accepts, from memory, by name (after
    /// `query.after`, at most `query.limit` of those kept); `None` where the mirror does not
    /// serve `kind` or `query` filters on a database column.
    pub async fn list_indexed(
        &self,
        kind: Kind,
        query: &Query<'_>,
        keep: impl Fn(&ObjectIndex) -> bool,
    ) -> Result<Option<(i64, Vec<(String, String)>)>, StoreError> {
        let plain = query.phase.is_none()
            && query.region.is_none()
            && query.owner.is_none()
            && query.deadline_before_ms.is_none();
        if !mirrored(kind) || !plain {
            return Ok(None);
        }
        self.mirror_current().await?;
        Ok(Some(self.list_mirrored(kind, query, keep)))
    }

    fn list_mirrored(
        &self,
        kind: Kind,
        query: &Query<'_>,
        keep: impl Fn(&ObjectIndex) -> bool,
    ) -> (i64, Vec<(String, String)>) {
        let mirror = self.mirror.read().unwrap_or_else(|e| e.into_inner());
        let Some(objects) = mirror.objects.get(&kind) else {
            return (mirror.version, Vec::new());
        };
        let range = match query.after {
            Some(after) => objects
                .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => objects.range::<str, _>(..),
        };
        let limit = query.limit.map_or(usize::MAX, |l| l.max(0) as usize);
        let items = range
            .filter(|(_, o)| keep(&o.index))
            .take(limit)
            .map(|(n, o)| (n.clone(), o.body.to_string()))
            .collect();
        (mirror.version, items)
    }

    /// The names of every object of `kind` (a controller's full resync).
    pub async fn names(&self, kind: Kind) -> Result<Vec<String>, StoreError> {
        if mirrored(kind) {
            self.mirror_current().await?;
            let mirror = self.mirror.read().unwrap_or_else(|e| e.into_inner());
            return Ok(mirror
                .objects
                .get(&kind)
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default());
        }
        let rows = sqlx::query("SELECT name FROM objects WHERE kind = $1 ORDER BY name")
            .bind(kind.as_str())
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|r| r.get::<String, _>(0)).collect())
    }

    /// Brings the mirror up to every write committed before this call, before a read from it.
    /// On SQLite this server is the only writer and applies its writes as it commits them. On
    /// PostgreSQL other servers write too: as the Kubernetes API server's consistent reads from
    /// its watch cache, read the store's current version (one query) and, if the mirror is
    /// behind it, follow the change log up to it first. A read on any server then sees every
    /// write acknowledged before it.
    async fn mirror_current(&self) -> Result<(), StoreError> {
        if self.backend == Backend::Sqlite {
            return Ok(());
        }
        let mut conn = self.pool.acquire().await?;
        let committed = current_version(&mut conn).await?;
        drop(conn);
        let applied = self
            .mirror
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .version;
        if applied < committed {
            self.catch_up().await?;
        }
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ChangeEvent> {
        self.changes.subscribe()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub async fn get(&self, kind: Kind, name: &str) -> Result<Option<Value>, StoreError> {
        self.get_raw(kind, name)
            .await?
            .map(|b| parse(&b))
            .transpose()
    }

    /// The object as stored JSON text.
    pub async fn get_raw(&self, kind: Kind, name: &str) -> Result<Option<String>, StoreError> {
        if mirrored(kind) {
            self.mirror_current().await?;
            let mirror = self.mirror.read().unwrap_or_else(|e| e.into_inner());
            return Ok(mirror
                .objects
                .get(&kind)
                .and_then(|m| m.get(name))
                .map(|o| o.body.to_string()));
        }
        let row = sqlx::query("SELECT body FROM objects WHERE kind = $1 AND name = $2")
            .bind(kind.as_str())
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get::<String, _>(0)))
    }

    /// Objects of `kind` matching `query`, by name, as JSON text; with the store's resource
    /// version read in the same transaction.
    pub async fn list_raw(
        &self,
        kind: Kind,
        query: &Query<'_>,
    ) -> Result<(i64, Vec<(String, String)>), StoreError> {
        match self.list_indexed(kind, query, |_| true).await? {
            Some(found) => Ok(found),
            None => self.list_from_database(kind, query).await,
        }
    }

    async fn list_from_database(
        &self,
        kind: Kind,
        query: &Query<'_>,
    ) -> Result<(i64, Vec<(String, String)>), StoreError> {
        let (mut sql, binds) = select_where("name, body", kind, query);
        sql.push_str(" ORDER BY name");
        if let Some(limit) = query.limit {
            sql.push_str(&format!(" LIMIT {}", limit.max(0)));
        }
        let mut tx = self.pool.begin().await?;
        let version = current_version(&mut tx).await?;
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = q.bind(b.as_str());
        }
        let rows = q.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        let items = rows
            .into_iter()
            .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
            .collect();
        Ok((version, items))
    }

    pub async fn list(&self, kind: Kind, query: &Query<'_>) -> Result<Vec<Value>, StoreError> {
        let (_, rows) = self.list_raw(kind, query).await?;
        rows.iter().map(|(_, body)| parse(body)).collect()
    }

    /// Every task of `application` (reconcilers, logs and the cancel/retry operations).
    pub async fn tasks_of(&self, application: &str) -> Result<Vec<Value>, StoreError> {
        let query = Query {
            owner: Some(application),
            ..Default::default()
        };
        self.list(Kind::Task, &query).await
    }

    /// How many objects of `kind` match `query` (counted by the database, over its indexes).
    pub async fn count(&self, kind: Kind, query: &Query<'_>) -> Result<i64, StoreError> {
        let (sql, binds) = select_where("COUNT(*)", kind, query);
        let mut q = sqlx::query(&sql);
        for b in &binds {
            q = q.bind(b.as_str());
        }
        Ok(q.fetch_one(&self.pool).await?.get::<i64, _>(0))
    }

    /// Object counts by kind and phase (for metrics).
    pub async fn phase_counts(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT kind, COALESCE(phase, ''), COUNT(*) FROM objects GROUP BY kind, COALESCE(phase, '')",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get::<i64, _>(2)))
            .collect())
    }

    pub async fn current_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .mirror
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .version)
    }

    /// A store-wide counter (`counters`), 0 if it was never set.
    pub async fn counter(&self, name: &str) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT value FROM counters WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map_or(0, |r| r.get(0)))
    }

    pub async fn set_counter(&self, name: &str, value: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO counters (name, value) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(name)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The oldest resource version a watch can resume after.
    pub async fn compacted_version(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT value FROM counters WHERE name = 'compactedVersion'")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get(0))
    }

    /// Applies one committed change to the mirror and tells live watchers.
    fn apply(&self, event: ChangeEvent) {
        {
            let mut mirror = self.mirror.write().unwrap_or_else(|e| e.into_inner());
            mirror.version = mirror.version.max(event.resource_version);
            if mirrored(event.kind)
                && let Some((name, object)) = MirroredObject::of(event.body.clone())
            {
                let objects = mirror.objects.entry(event.kind).or_default();
                if event.change == ChangeType::Deleted {
                    objects.remove(&name);
                } else {
                    objects.insert(name, object);
                }
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.changes.send(event);
    }

    /// Applies, in order, every change committed since the last one applied: this server's
    /// and every other server's on the same PostgreSQL database. A server that fell further
    /// behind than the change log reaches reloads its mirror (watchers of it resume by listing,
    /// as after a compaction).
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        let _following = self.following.lock().await;
        let applied = self
            .mirror
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .version;
        let rows = sqlx::query(
            "SELECT resource_version, kind, event_type, body FROM changes \
             WHERE resource_version > $1 ORDER BY resource_version",
        )
        .bind(applied)
        .fetch_all(&self.pool)
        .await?;
        // Every version is one change, committed in order: a first change past the next version
        // means those in between were compacted away, and the mirror is reloaded.
        if rows
            .first()
            .is_some_and(|first| first.get::<i64, _>(0) > applied + 1)
        {
            return self.load_mirror().await;
        }
        for row in rows {
            let kind: String = row.get(1);
            let mut known = Kind::ALL.into_iter().chain([Kind::Token]);
            let Some(kind) = known.find(|k| k.as_str() == kind) else {
                return Err(StoreError::Corrupt(format!("change of kind {kind:?}")));
            };
            self.apply(ChangeEvent {
                resource_version: row.get(0),
                kind,
                change: ChangeType::parse(&row.get::<String, _>(2))?,
                body: Arc::from(row.get::<String, _>(3)),
            });
        }
        Ok(())
    }

    /// Takes leadership if no other server holds it (`crate::leader`): on PostgreSQL a
    /// session-level advisory lock on a connection of its own, released when that session
    /// ends; on SQLite this server is the only one and always leads.
    pub async fn try_lead(&self) -> Result<Option<LeaderTerm>, StoreError> {
        if self.backend == Backend::Sqlite {
            return Ok(Some(LeaderTerm { session: None }));
        }
        // Detached from the pool: the lock must end with this connection, never be handed on.
        let mut session = self.pool.acquire().await?.detach();
        let row = sqlx::query("SELECT pg_try_advisory_lock(hashtext(current_schema()), $1)")
            .bind(LEADER_LOCK_KEY)
            .fetch_one(&mut session)
            .await?;
        Ok(row.get::<bool, _>(0).then_some(LeaderTerm {
            session: Some(session),
        }))
    }

    /// Follows the other servers' writes until `stop` (PostgreSQL; SQLite has one writer).
    pub async fn follow_other_writers(
        self: Arc<Self>,
        every: std::time::Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        if self.backend != Backend::Postgres {
            return;
        }
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.catch_up().await {
                tracing::warn!(error = %e, "following the change log failed");
            }
        }
    }

    /// Changes to `kind` after `version`, oldest first.
    pub async fn changes_after(
        &self,
        kind: Kind,
        version: i64,
    ) -> Result<Vec<ChangeEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT resource_version, event_type, body FROM changes \
             WHERE kind = $1 AND resource_version > $2 ORDER BY resource_version",
        )
        .bind(kind.as_str())
        .bind(version)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(ChangeEvent {
                    resource_version: r.get(0),
                    kind,
                    change: ChangeType::parse(&r.get::<String, _>(1))?,
                    body: Arc::from(r.get::<String, _>(2)),
                })
            })
            .collect()
    }

    /// Reads the object, lets `decide` choose what to write, and writes it atomically with a
    /// new resource version. `decide` runs under the store's write lock: it must not block.
    pub async fn write<E>(
        &self,
        kind: Kind,
        name: &str,
        decide: impl FnOnce(Option<Value>) -> Result<Change, E>,
    ) -> Result<Written, E>
    where
        E: From<StoreError>,
    {
        let written = self.write_many(kind, [(name, decide)]).await?;
        Ok(written
            .into_iter()
            .next()
            .expect("write_many answers each write it is given"))
    }

    /// [`Store::write`] of several objects of `kind` in one transaction, in order, each with its
    /// own resource version: all are written or none (the first error rolls every one back).
    /// One commit for many objects (an application's tasks) instead of one each.
    pub async fn write_many<'n, E, F>(
        &self,
        kind: Kind,
        writes: impl IntoIterator<Item = (&'n str, F)>,
    ) -> Result<Vec<Written>, E>
    where
        E: From<StoreError>,
        F: FnOnce(Option<Value>) -> Result<Change, E>,
    {
        let _guard = self.write.lock().await;
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext(current_schema()), $1)")
                .bind(WRITE_LOCK_KEY)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
        let mut written = Vec::new();
        let mut events = Vec::new();
        for (name, decide) in writes {
            let (one, event) = write_in(&mut tx, kind, name, decide).await?;
            written.push(one);
            events.extend(event);
        }
        tx.commit().await.map_err(StoreError::from)?;
        if events.is_empty() {
            return Ok(written);
        }
        match self.backend {
            Backend::Sqlite => events.into_iter().for_each(|e| self.apply(e)),
            // Other servers' changes before these are applied first: read-your-writes, and
            // watchers see every change in order.
            Backend::Postgres => {
                if let Err(e) = self.catch_up().await {
                    tracing::warn!(error = %e, "the write is stored; following the change log failed");
                }
            }
        }
        Ok(written)
    }

    /// Results of an application's tasks, by task index, as `(task, worker, body)`.
    pub async fn task_results(
        &self,
        application: &str,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT task, worker, body FROM task_results WHERE application = $1 ORDER BY task_index",
        )
        .bind(application)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// How many telemetry samples the store holds, and the newest `limit` of them as JSON,
    /// oldest first.
    pub async fn telemetry(&self, limit: i64) -> Result<(i64, Vec<String>), StoreError> {
        let count: i64 = sqlx::query("SELECT COUNT(*) FROM telemetry")
            .fetch_one(&self.pool)
            .await?
            .get(0);
        let rows =
            sqlx::query("SELECT body FROM telemetry ORDER BY resource_version DESC LIMIT $1")
                .bind(limit.max(0))
                .fetch_all(&self.pool)
                .await?;
        let mut bodies: Vec<String> = rows.into_iter().map(|r| r.get(0)).collect();
        bodies.reverse();
        Ok((count, bodies))
    }

    pub async fn delete_task_results(&self, application: &str) -> Result<(), StoreError> {
        let _guard = self.write.lock().await;
        sqlx::query("DELETE FROM task_results WHERE application = $1")
            .bind(application)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

fn modified_or_added(existed: bool) -> ChangeType {
    if existed {
        ChangeType::Modified
    } else {
        ChangeType::Added
    }
}

/// One object's write inside the writer's open transaction: the object after it, and the
/// change to announce once the transaction commits.
async fn write_in<E>(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    kind: Kind,
    name: &str,
    decide: impl FnOnce(Option<Value>) -> Result<Change, E>,
) -> Result<(Written, Option<ChangeEvent>), E>
where
    E: From<StoreError>,
{
    let current = sqlx::query("SELECT body FROM objects WHERE kind = $1 AND name = $2")
        .bind(kind.as_str())
        .bind(name)
        .fetch_optional(&mut **tx)
        .await
        .map_err(StoreError::from)?
        .map(|r| parse(&r.get::<String, _>(0)))
        .transpose()?;
    let existed = current.is_some();
    let (mut object, result, change) = match decide(current.clone())? {
        Change::Keep => {
            let unchanged = Written {
                object: current,
                changed: false,
                created: false,
            };
            return Ok((unchanged, None));
        }
        Change::Delete => match current {
            None => {
                let absent = Written {
                    object: None,
                    changed: false,
                    created: false,
                };
                return Ok((absent, None));
            }
            Some(obj) => (obj, None, ChangeType::Deleted),
        },
        Change::Put(obj) => (obj, None, modified_or_added(existed)),
        Change::PutWithResult(obj, row) => (obj, Some(row), modified_or_added(existed)),
    };
    let version = next_version(tx).await?;
    object["metadata"]["resourceVersion"] = Value::String(version.to_string());
    let body = object.to_string();
    if change == ChangeType::Deleted {
        sqlx::query("DELETE FROM objects WHERE kind = $1 AND name = $2")
            .bind(kind.as_str())
            .bind(name)
            .execute(&mut **tx)
            .await
            .map_err(StoreError::from)?;
    } else {
        let index = IndexColumns::of(kind, &object);
        sqlx::query(
                "INSERT INTO objects (kind, name, resource_version, phase, owner, region, deadline_ms, body) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (kind, name) DO UPDATE SET resource_version = excluded.resource_version, \
                 phase = excluded.phase, owner = excluded.owner, region = excluded.region, \
                 deadline_ms = excluded.deadline_ms, body = excluded.body",
            )
            .bind(kind.as_str())
            .bind(name)
            .bind(version)
            .bind(index.phase)
            .bind(index.owner)
            .bind(index.region)
            .bind(index.deadline_ms)
            .bind(body.as_str())
            .execute(&mut **tx)
            .await
            .map_err(StoreError::from)?;
    }
    if let Some(mut row) = result {
        if let Some(sample) = row.telemetry.take() {
            // Ordered by the write's resource version: the predictor holds out the newest.
            sqlx::query(
                "INSERT INTO telemetry (task_uid, resource_version, region, body) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (task_uid) DO NOTHING",
            )
            .bind(sample.task_uid)
            .bind(version)
            .bind(sample.region)
            .bind(sample.body)
            .execute(&mut **tx)
            .await
            .map_err(StoreError::from)?;
        }
        sqlx::query(
            "INSERT INTO task_results (task, application, task_index, worker, body, written_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (task) DO NOTHING",
        )
        .bind(row.task)
        .bind(row.application)
        .bind(row.index)
        .bind(row.worker)
        .bind(row.body)
        .bind(crate::time::now_rfc3339())
        .execute(&mut **tx)
        .await
        .map_err(StoreError::from)?;
    }
    sqlx::query(
        "INSERT INTO changes (resource_version, kind, event_type, body) VALUES ($1, $2, $3, $4)",
    )
    .bind(version)
    .bind(kind.as_str())
    .bind(change.as_str())
    .bind(body.as_str())
    .execute(&mut **tx)
    .await
    .map_err(StoreError::from)?;
    if version % 1000 == 0 {
        compact(tx, version - RETAINED_CHANGES).await?;
    }
    let event = ChangeEvent {
        resource_version: version,
        kind,
        change,
        body: Arc::from(body),
    };
    let written = Written {
        object: (change != ChangeType::Deleted).then_some(object),
        changed: true,
        created: !existed,
    };
    Ok((written, Some(event)))
}

/// `SELECT what FROM objects WHERE` the kind and `query`'s column filters hold, with the
/// values to bind in order.
fn select_where(what: &str, kind: Kind, query: &Query<'_>) -> (String, Vec<String>) {
    let mut sql = format!("SELECT {what} FROM objects WHERE kind = $1");
    let mut binds: Vec<String> = vec![kind.as_str().to_string()];
    for (condition, value) in [
        ("phase =", query.phase),
        ("region =", query.region),
        ("owner =", query.owner),
        ("name >", query.after),
    ] {
        if let Some(value) = value {
            binds.push(value.to_string());
            sql.push_str(&format!(" AND {condition} ${}", binds.len()));
        }
    }
    if let Some(ms) = query.deadline_before_ms {
        sql.push_str(&format!(" AND deadline_ms < {ms}"));
    }
    (sql, binds)
}

fn parse(body: &str) -> Result<Value, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt(e.to_string()))
}

async fn current_version(conn: &mut sqlx::AnyConnection) -> Result<i64, StoreError> {
    let row = sqlx::query("SELECT value FROM counters WHERE name = 'resourceVersion'")
        .fetch_one(&mut *conn)
        .await?;
    Ok(row.get(0))
}

async fn next_version(conn: &mut sqlx::AnyConnection) -> Result<i64, StoreError> {
    let row = sqlx::query(
        "UPDATE counters SET value = value + 1 WHERE name = 'resourceVersion' RETURNING value",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(row.get(0))
}

async fn compact(conn: &mut sqlx::AnyConnection, up_to: i64) -> Result<(), StoreError> {
    if up_to <= 0 {
        return Ok(());
    }
    sqlx::query("DELETE FROM changes WHERE resource_version <= $1")
        .bind(up_to)
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE counters SET value = $1 WHERE name = 'compactedVersion'")
        .bind(up_to)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
