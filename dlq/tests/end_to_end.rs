//! A replayed dead letter goes all the way: a real worker (in-process) applies it to a fresh
//! Postgres database.

mod common;

use std::time::{Duration, Instant};

use common::{Fixture, Letter, run};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn admin_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_string())
}

/// A database of its own, dropped (with its sessions) when the guard is.
struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    async fn create() -> Self {
        let name = format!("dlq_test_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(admin_url())
            .await
            .expect("admin database");
        admin
            .execute_unprepared(&format!(r#"CREATE DATABASE "{name}""#))
            .await
            .expect("create the test database");
        let _ = admin.close().await;
        let base = admin_url();
        let prefix = base
            .rsplit_once('/')
            .map_or(base.as_str(), |(prefix, _)| prefix);
        Self {
            url: format!("{prefix}/{name}"),
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("clean-up runtime");
            runtime.block_on(async move {
                let admin = Database::connect(admin_url())
                    .await
                    .expect("admin database");
                admin
                    .execute_unprepared(&format!(
                        r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#
                    ))
                    .await
                    .expect("drop the test database");
                let _ = admin.close().await;
            });
        });
        if dropped.join().is_err() && !std::thread::panicking() {
            panic!("dropping database {} failed", self.name);
        }
    }
}

async fn stored_email(db: &DatabaseConnection, user_id: &str) -> Option<Option<String>> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT email FROM users WHERE id = $1",
            [user_id.into()],
        ))
        .await
        .ok()??;
    row.try_get::<Option<String>>("", "email").ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_dead_letter_is_applied_by_the_worker_and_lands_in_postgres() {
    let fixture = Fixture::new().await;
    let database = TestDatabase::create().await;
    let body = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/clerk/user.created.json"
    ))
    .expect("the Clerk fixture");
    let svix_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
    fixture
        .dead_letters(&[Letter::new(&svix_id, "user.created")
            .body(&body)
            .exhausted(5, "database was unreachable")])
        .await;

    let mut settings = fixture.settings();
    settings.database_url = Some(database.url.clone().into());
    settings.worker_listen = "127.0.0.1:0".into();
    let config = worker::WorkerConfig::from_settings(&settings).expect("worker settings");
    let app = worker::Application::build(config)
        .await
        .expect("the worker starts");
    let stop = app.stop_handle();
    let running = tokio::spawn(app.run_until_stopped());

    let (result, out, _) = run(&settings, &["replay", "--id", &svix_id]).await;
    result.expect("replay succeeds");
    assert_eq!(out, "replayed 1, skipped 0, failed 0\n");

    let db = Database::connect(database.url.as_str())
        .await
        .expect("test database");
    let user_id = "user_29w83sxmDNGwOuEthce5gg56FcC";
    let deadline = Instant::now() + Duration::from_secs(20);
    let email = loop {
        if let Some(email) = stored_email(&db, user_id).await {
            break email;
        }
        assert!(
            Instant::now() < deadline,
            "the replayed user never reached Postgres"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(email.as_deref(), Some("example@example.org"));
    fixture
        .wait_for_ready(&fixture.topology.dead_queue, 0)
        .await;

    stop.stop();
    running
        .await
        .expect("the worker task")
        .expect("the worker stops cleanly");
    let _ = db.close().await;
}
