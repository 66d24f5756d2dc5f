//! A replayed dead letter goes all the way: a real worker (in-process) applies it to a fresh
//! Postgres database.

use crate::common;

use std::time::{Duration, Instant};

use common::{Fixture, Letter, run};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use test_support::TestDatabase;
use test_support::signing::svix_id;

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
    // Empty: the worker applies the migrations at start.
    let database = TestDatabase::empty().await;
    let body = test_support::events::fixture("user.created");
    let svix_id = svix_id();
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

    let db = &database.db;
    let user_id = "user_29w83sxmDNGwOuEthce5gg56FcC";
    let deadline = Instant::now() + Duration::from_secs(20);
    let email = loop {
        if let Some(email) = stored_email(db, user_id).await {
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
}
