//! The suite's own broker and database survive the faults it injects the way the real ones do:
//! what was confirmed or committed before the crash is there after the restart. If these did not
//! hold, a scenario's "lost" count would measure the harness, not the pipeline.

use fault_suite::rabbit::{self, RabbitNode};
use fault_suite::support;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use std::time::Duration;
use test_support::eventually;
use test_support::private_postgres::{self as postgres, PgCluster};

fn workdir() -> tempfile::TempDir {
    support::workdir("fault-suite-test-").expect("temp dir")
}

fn rabbitmq_server() -> std::path::PathBuf {
    rabbit::find_server(None).expect("rabbitmq-server")
}

#[tokio::test]
async fn a_killed_rabbitmq_node_restarts_with_the_messages_it_confirmed() {
    let dir = workdir();
    let mut node = RabbitNode::start(&rabbitmq_server(), &dir.path().join("rabbitmq"))
        .await
        .expect("node starts");

    let connection = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    channel
        .queue_declare(
            "kept".into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .expect("declare");
    // The suite declares its queues and restarts the node cleanly before any fault: RabbitMQ
    // 3.10 writes out its registry of quorum queues lazily, and a queue declared shortly before
    // a SIGKILL does not come back (see the README).
    node.stop().await.expect("stop");
    node.restart().await.expect("start");
    let connection = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for n in 0..3 {
        let confirm = channel
            .basic_publish(
                "".into(),
                "kept".into(),
                BasicPublishOptions::default(),
                format!("message {n}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
    }

    node.kill().await.expect("kill");
    assert!(
        node.ready_messages("kept").await.is_err(),
        "the node is down after SIGKILL"
    );
    node.restart().await.expect("restart");
    // A quorum queue reports its depth once it has recovered its log, shortly after the start.
    eventually(
        Duration::from_secs(30),
        "the three messages back",
        || async { node.ready_messages("kept").await.expect("depth") == 3 },
    )
    .await;
}

#[tokio::test]
async fn a_postgres_cluster_stopped_in_immediate_mode_restarts_with_its_committed_rows() {
    let dir = workdir();
    let bin = postgres::find_bin_dir().expect("postgres binaries");
    let mut cluster = PgCluster::start(&bin, &dir.path().join("postgres"))
        .await
        .expect("cluster starts");
    cluster.create_database("kept").await.expect("database");

    let db = Database::connect(cluster.url("kept"))
        .await
        .expect("connect");
    db.execute_unprepared("CREATE TABLE t (n int); INSERT INTO t VALUES (1), (2), (3)")
        .await
        .expect("insert");
    db.close().await.expect("close");

    cluster.stop_immediate().await.expect("stop");
    assert!(
        Database::connect(cluster.url("kept")).await.is_err(),
        "the cluster is down after an immediate stop"
    );
    cluster.start_server().await.expect("restart");

    let db = Database::connect(cluster.url("kept"))
        .await
        .expect("reconnect");
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM t",
        ))
        .await
        .expect("query")
        .expect("a row");
    assert_eq!(row.try_get::<i64>("", "n").expect("count"), 3);
    db.close().await.expect("close");
}
