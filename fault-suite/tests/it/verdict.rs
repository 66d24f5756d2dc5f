//! The verdict can fail: given a database and queues filled by hand, it passes when they match the
//! ledger and counts each kind of damage when they do not. Without this, a suite that always
//! prints "lost 0" would prove nothing.

use std::sync::Arc;

use fault_suite::check;
use fault_suite::history::{self, ExpectedState};
use fault_suite::rabbit::{self, RabbitNode};
use fault_suite::support;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use shared::Topology;
use test_support::private_postgres::{self as postgres, PgCluster};

fn millis(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).expect("a valid timestamp")
}

#[tokio::test]
async fn the_verdict_passes_a_faithful_copy_and_counts_a_lost_event_a_wrong_row_and_a_dead_letter()
{
    let dir = support::workdir("fault-suite-test-").expect("temp dir");
    let cluster = PgCluster::start(
        &postgres::find_bin_dir().expect("postgres binaries"),
        &dir.path().join("postgres"),
    )
    .await
    .expect("cluster");
    let server = rabbit::find_server(None).expect("rabbitmq-server");
    let node = RabbitNode::start(&server, &dir.path().join("rabbitmq"))
        .await
        .expect("node");

    let topology = Topology::prefixed("verdict");
    let connection = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    topology.declare(&channel).await.expect("declare");

    cluster.create_database("verdict").await.expect("database");
    let db = check::connect(&cluster.url("verdict"))
        .await
        .expect("connect");
    Migrator::up(&db, None).await.expect("migrations");

    // The pipeline's work, done by hand: every event recorded, the final state written.
    let ledger: Vec<Arc<history::PlannedEvent>> =
        history::plan(60, 5).into_iter().map(Arc::new).collect();
    for event in &ledger {
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO processed_events (svix_id, event_type, outcome, processed_at) \
             VALUES ($1, $2, 'applied', now())",
            [event.svix_id.clone().into(), event.event_type.into()],
        ))
        .await
        .expect("processed event");
    }
    let expected = ExpectedState::from_events(ledger.iter().map(Arc::as_ref));
    assert!(!expected.users.is_empty() && !expected.deleted.is_empty());
    for user in expected.users.values() {
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO users (id, email, first_name, last_name, role, phone, created_at, \
             updated_at, synced_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())",
            [
                user.id.clone().into(),
                user.email.clone().into(),
                user.first_name.clone().into(),
                user.last_name.clone().into(),
                user.role.clone().into(),
                user.phone.clone().into(),
                millis(user.created_at_ms).into(),
                millis(user.updated_at_ms).into(),
            ],
        ))
        .await
        .expect("user");
    }
    for id in &expected.deleted {
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO user_tombstones (id, deleted_at) VALUES ($1, now())",
            [id.clone().into()],
        ))
        .await
        .expect("tombstone");
    }

    let faithful = check::verify(&node, &topology, &db, &ledger)
        .await
        .expect("verify");
    assert!(faithful.passed(), "{faithful:?}");
    assert_eq!((faithful.applied, faithful.lost), (60, 0));

    // Damage of each kind.
    db.execute_unprepared(&format!(
        "DELETE FROM processed_events WHERE svix_id = '{}'",
        ledger[7].svix_id
    ))
    .await
    .expect("lose an event");
    let some_user = expected.users.keys().next().expect("a user");
    db.execute_unprepared(&format!(
        "UPDATE users SET first_name = 'Mallory' WHERE id = '{some_user}'"
    ))
    .await
    .expect("corrupt a row");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let confirm = channel
        .basic_publish(
            "".into(),
            topology.dead_queue.as_str().into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());

    let damaged = check::verify(&node, &topology, &db, &ledger)
        .await
        .expect("verify");
    assert!(!damaged.passed());
    assert_eq!(damaged.lost, 1, "{damaged:?}");
    assert_eq!(damaged.applied, 59);
    assert_eq!(damaged.state_mismatches, 1, "{damaged:?}");
    assert_eq!(damaged.dead_lettered, 1);
    db.close().await.expect("close");
}
