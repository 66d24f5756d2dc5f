//! The scale bench's short form (`test_support::scale`; the figures are the example
//! `worker-scale-bench`'s, in BENCHMARKS.md): a reconcile backfill and a run with nothing
//! changed over 20,000 users, and a rebuild over 20,000 subjects, each as a process beside a
//! worker applying live events, on a Postgres cluster of each test's own with default settings.
//! They check what each step did, never how fast.

use std::time::Duration;

use test_support::amqp_url;
use test_support::private_postgres::PgCluster;
use test_support::scale::history::{self, HistoryScenario};
use test_support::scale::reconcile::{self, KeyKind, ReconcileScenario};
use test_support::scale::{Phase, Setup};

const USERS: usize = 20_000;
const SUBJECTS: u64 = 20_000;

/// Every live event published while the command ran was applied, and its latency computed.
fn live_events_measured(phase: &Phase) {
    for latency in [&phase.idle, &phase.during] {
        assert!(
            latency.published > 0,
            "{}: live events published",
            phase.name
        );
        assert_eq!(
            latency.applied, latency.published,
            "{}: every live event applied",
            phase.name
        );
        assert!(
            latency.p50.is_some() && latency.p99.is_some() && latency.max.is_some(),
            "{}: latency computed",
            phase.name
        );
    }
    assert!(
        phase.command_peak_kib.is_some(),
        "{}: peak RSS read",
        phase.name
    );
}

/// A Postgres cluster of the test's own, with default settings, and the bench's setup on it.
async fn setup() -> (PgCluster, Setup) {
    let cluster = PgCluster::start_temporary()
        .await
        .expect("a private Postgres cluster");
    let setup = Setup {
        admin_url: cluster.url("postgres"),
        amqp_url: amqp_url(),
        worker_bin: env!("CARGO_BIN_EXE_worker").into(),
        live_rate: 200,
        idle: Duration::from_secs(2),
        command_timeout: Duration::from_secs(300),
        env: Vec::new(),
    };
    (cluster, setup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_of_20k_users_beside_live_events_syncs_every_user() {
    let (_cluster, setup) = setup().await;
    let figures = reconcile::run(
        &setup,
        ReconcileScenario {
            users: USERS,
            key: KeyKind::Production,
            // The short form is about correctness: no pacing.
            rate_limit: Some(10_000_000),
            unchanged: true,
        },
    )
    .await
    .expect("the reconcile scenario runs");
    for phase in &figures.phases {
        let summary = phase.outcome.as_ref().expect("reconcile succeeded");
        assert_eq!(summary["users"]["listed"], USERS, "every user listed");
        assert_eq!(summary["users"]["deleted"], 0, "no user deleted");
        live_events_measured(phase);
    }
    let [backfill, unchanged] = &figures.phases[..] else {
        panic!("a backfill and a run with nothing changed");
    };
    let written = &backfill.outcome.as_ref().expect("backfill")["users"];
    assert_eq!(
        written["created"].as_u64().unwrap_or_default()
            + written["stale"].as_u64().unwrap_or_default(),
        USERS as u64,
        "each user created, or found newer from a live event"
    );
    let again = &unchanged.outcome.as_ref().expect("again")["users"];
    assert_eq!(again["created"], 0, "nothing created the second time");
    assert_eq!(again["updated"], 0, "nothing rewritten the second time");
    assert_eq!(figures.stored_users, USERS as u64, "every user synced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_of_20k_subjects_beside_live_events_on_default_settings_succeeds() {
    let (_cluster, setup) = setup().await;
    let figures = history::run(
        &setup,
        HistoryScenario {
            rows: SUBJECTS,
            subjects: SUBJECTS,
            rebuild: true,
            replay: false,
        },
    )
    .await
    .expect("the history scenario runs");
    for phase in &figures.phases {
        let summary = phase.outcome.as_ref().expect("rebuild succeeded");
        assert_eq!(summary["committed"], true, "the rebuild committed");
        live_events_measured(phase);
    }
    assert_eq!(figures.stored_users, SUBJECTS, "every subject rebuilt");
}
