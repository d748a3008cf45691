//! Test stores: SQLite in a temporary directory, and PostgreSQL in a fresh schema per test when
//! `CECCM_TEST_POSTGRES_URL` is set (so parallel tests never see each other's rows).

use std::sync::Arc;

use crate::store::Store;

pub struct TestStore {
    pub store: Arc<Store>,
    pub dir: tempfile::TempDir,
    /// The URL this store was opened with (`None`: SQLite in `dir`), to reopen it.
    pub url: Option<String>,
    schema: Option<(String, String)>,
}

impl TestStore {
    pub async fn reopen(&self) -> Store {
        Store::open(self.dir.path(), self.url.as_deref())
            .await
            .expect("reopen store")
    }

    /// Drops the PostgreSQL schema (SQLite's directory goes with `dir`).
    pub async fn cleanup(self) {
        self.store.close().await;
        if let Some((base, schema)) = self.schema {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&base).await.expect("connect");
            sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(&mut conn)
                .await
                .expect("drop schema");
        }
    }
}

pub async fn sqlite() -> TestStore {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), None)
        .await
        .expect("open sqlite store");
    TestStore {
        store: Arc::new(store),
        dir,
        url: None,
        schema: None,
    }
}

pub async fn postgres() -> Option<TestStore> {
    let Ok(base) = std::env::var("CECCM_TEST_POSTGRES_URL") else {
        eprintln!(
            "skipped: PostgreSQL half of the store suite needs CECCM_TEST_POSTGRES_URL \
             (e.g. postgres://postgres@127.0.0.1:5432/ceccm_test; .ci/run sets it)"
        );
        return None;
    };
    use sqlx::Connection;
    let schema = format!("t{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .expect("CECCM_TEST_POSTGRES_URL is set but PostgreSQL is not reachable");
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .expect("create schema");
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), Some(&url))
        .await
        .expect("open postgres store");
    Some(TestStore {
        store: Arc::new(store),
        dir,
        url: Some(url),
        schema: Some((base, schema)),
    })
}

/// Runs each listed `async fn(&TestStore)` on SQLite and on PostgreSQL.
macro_rules! store_suite {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let ts = $crate::testing::sqlite().await;
                    super::$test(&ts).await;
                    ts.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let Some(ts) = $crate::testing::postgres().await else { return };
                    super::$test(&ts).await;
                    ts.cleanup().await;
                }
            )*
        }
    };
}
pub(crate) use store_suite;

/// Polls an async probe every 50 ms until it returns `Some`, for at most 20 s.
pub async fn poll<T, F, Fut>(mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within 20 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A reconcilers' context over `ts`, whose local driver's workers run `true`.
pub fn context(ts: &TestStore) -> crate::reconcile::Context {
    crate::reconcile::Context {
        store: ts.store.clone(),
        driver: Arc::new(ceccm_federation::local::LocalDriver::new(
            ceccm_federation::local::WorkerCommand {
                program: "true".into(),
                args: vec![],
                env: vec![],
            },
        )),
        data_dir: ts.dir.path().to_path_buf(),
        predictor: Default::default(),
        region_grace: std::time::Duration::from_secs(40),
    }
}
