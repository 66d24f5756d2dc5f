//! One batch, one transaction: events read as the worker reads them and applied together through
//! `apply_batch`, each with the outcome and effect it would have had alone; and "batch, then one
//! by one" (`write_with`) telling a source every turn.

use std::ops::ControlFlow;
use std::time::Duration;

use sea_orm::DbErr;
use serde_json::{Value, json};
use shared::Roles;
use test_support::TestEnv;
use test_support::events::clerk_user;
use test_support::signing::svix_id;
use worker::Outcome;
use worker::apply::{ApplyError, Event, Message, Next, Settle, Source, apply_batch, write_with};

fn event(svix_id: &str, event_type: &str, data: Value) -> Event {
    let body = json!({"type": event_type, "object": "event", "timestamp": 1, "data": data});
    let body = body.to_string();
    Event::read(
        &Message::new(body.as_bytes(), svix_id, Source::Webhook),
        &Roles::default(),
    )
    .expect("a readable event")
}

fn deleted(id: &str) -> Value {
    json!({"deleted": true, "id": id, "object": "user"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_versions_deletes_copies_and_swapped_emails_ends_as_one_by_one() {
    let env = TestEnv::new().await;
    let before = [
        event(
            &svix_id(),
            "user.created",
            clerk_user("user_c", Some("x@example.org"), None, 100),
        ),
        event(
            &svix_id(),
            "user.created",
            clerk_user("user_d", Some("y@example.org"), None, 100),
        ),
        event(
            &svix_id(),
            "user.created",
            clerk_user("user_g", Some("w@example.org"), None, 400),
        ),
    ];
    let outcomes = apply_batch(env.db(), &before).await.expect("first batch");
    assert_eq!(outcomes, [Outcome::Applied; 3]);

    let copied = svix_id();
    let batch = [
        // Three versions of user_a, the newest in the middle.
        event(
            &svix_id(),
            "user.created",
            clerk_user("user_a", Some("a@example.org"), None, 100),
        ),
        event(
            &svix_id(),
            "user.updated",
            clerk_user("user_a", Some("a2@example.org"), Some("admin"), 300),
        ),
        event(
            &svix_id(),
            "user.updated",
            clerk_user("user_a", Some("a@example.org"), None, 200),
        ),
        // user_b created, deleted and updated late, all at once: the delete wins.
        event(
            &svix_id(),
            "user.created",
            clerk_user("user_b", None, None, 100),
        ),
        event(&svix_id(), "user.deleted", deleted("user_b")),
        event(
            &svix_id(),
            "user.updated",
            clerk_user("user_b", None, None, 500),
        ),
        // user_c and user_d swap their addresses; user_c's event comes twice.
        event(
            &copied,
            "user.updated",
            clerk_user("user_c", Some("y@example.org"), None, 200),
        ),
        event(
            &svix_id(),
            "user.updated",
            clerk_user("user_d", Some("x@example.org"), None, 200),
        ),
        event(
            &copied,
            "user.updated",
            clerk_user("user_c", Some("y@example.org"), None, 200),
        ),
        // Two users want one address: the newer version wins it.
        event(
            &svix_id(),
            "user.created",
            clerk_user("user_e", Some("z@example.org"), None, 100),
        ),
        event(
            &svix_id(),
            "user.created",
            clerk_user("user_f", Some("z@example.org"), None, 150),
        ),
        // An address held by a newer stored user stays with it; one held by an older stored
        // user moves.
        event(
            &svix_id(),
            "user.created",
            clerk_user("user_h", Some("w@example.org"), None, 300),
        ),
        event(
            &svix_id(),
            "user.created",
            clerk_user("user_i", Some("a@example.org"), None, 50),
        ),
        event(&svix_id(), "session.created", json!({"id": "sess_1"})),
    ];
    let outcomes = apply_batch(env.db(), &batch).await.expect("the batch");
    use Outcome::{Applied, Duplicate, Ignored, Stale};
    assert_eq!(
        outcomes,
        [
            Stale, Applied, Stale, Stale, Applied, Stale, Applied, Applied, Duplicate, Applied,
            Applied, Applied, Applied, Ignored
        ]
    );

    let a = env.user("user_a").await.expect("user_a");
    assert_eq!(
        (
            a.email.as_deref(),
            a.role.as_str(),
            a.updated_at.timestamp_millis()
        ),
        (Some("a2@example.org"), "admin", 300)
    );
    assert!(env.user("user_b").await.is_none(), "user_b deleted");
    assert!(env.tombstoned("user_b").await);
    let email = |id: &'static str| {
        let env = &env;
        async move { env.user(id).await.expect(id).email }
    };
    assert_eq!(email("user_c").await.as_deref(), Some("y@example.org"));
    assert_eq!(email("user_d").await.as_deref(), Some("x@example.org"));
    assert_eq!(email("user_e").await, None);
    assert_eq!(email("user_f").await.as_deref(), Some("z@example.org"));
    assert_eq!(email("user_g").await.as_deref(), Some("w@example.org"));
    assert_eq!(email("user_h").await, None);
    // user_a's newest version left a@ free, so the older user_i gets it.
    assert_eq!(email("user_i").await.as_deref(), Some("a@example.org"));
    // 3 + 14 events, one of them a copy.
    assert_eq!(env.processed_count().await, 16);

    // The whole batch again: every event is a duplicate and nothing changes.
    let synced = env.user("user_a").await.expect("user_a").synced_at;
    let outcomes = apply_batch(env.db(), &batch)
        .await
        .expect("the batch again");
    assert_eq!(outcomes, [Duplicate; 14]);
    assert_eq!(env.user("user_a").await.expect("user_a").synced_at, synced);
    assert_eq!(env.processed_count().await, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_holder_that_is_older_loses_its_address_to_a_batch_member() {
    let env = TestEnv::new().await;
    let first = [event(
        &svix_id(),
        "user.created",
        clerk_user("user_old", Some("m@example.org"), None, 100),
    )];
    apply_batch(env.db(), &first).await.expect("first");
    let second = [
        event(
            &svix_id(),
            "user.created",
            clerk_user("user_new", Some("m@example.org"), None, 200),
        ),
        event(
            &svix_id(),
            "user.created",
            clerk_user("user_other", Some("n@example.org"), None, 200),
        ),
    ];
    let outcomes = apply_batch(env.db(), &second).await.expect("second");
    assert_eq!(outcomes, [Outcome::Applied; 2]);
    assert_eq!(env.user("user_old").await.expect("old").email, None);
    assert_eq!(
        env.user("user_new").await.expect("new").email.as_deref(),
        Some("m@example.org")
    );
    assert_eq!(
        env.user("user_other")
            .await
            .expect("other")
            .email
            .as_deref(),
        Some("n@example.org")
    );
}

/// A source's turns, written down in order, that retries the failing event once.
#[derive(Default)]
struct Turns(Vec<String>);

impl Settle for Turns {
    type Stop = ();

    async fn batch_unavailable(&mut self, _error: DbErr, _retry: u32) -> ControlFlow<()> {
        self.0.push("batch unavailable".into());
        ControlFlow::Break(())
    }

    fn batch_applied(&mut self, events: &[Event], _outcomes: Vec<Outcome>, _took: Duration) {
        self.0.push(format!("batch of {} applied", events.len()));
    }

    fn going_alone(&mut self, _error: &DbErr) {
        self.0.push("one by one".into());
    }

    fn event_applied(&mut self, index: usize, _event: &Event, outcome: Outcome, _took: Duration) {
        self.0.push(format!("{index} {}", outcome.as_str()));
    }

    async fn event_failed(
        &mut self,
        index: usize,
        _event: &Event,
        error: ApplyError,
        retry: u32,
    ) -> Next<()> {
        assert!(matches!(error, ApplyError::Message(_)), "{error}");
        self.0.push(format!("{index} failed, try {retry}"));
        if retry < 2 { Next::Retry } else { Next::Skip }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_then_one_by_one_settles_every_event_through_the_sources_turns() {
    let env = TestEnv::new().await;
    let mut unstorable = clerk_user("user_bad", None, None, 100);
    // Before 4713 BC: Postgres refuses the timestamp (22008), the event's own fault.
    unstorable["created_at"] = json!(-300_000_000_000_000_i64);
    let events = [
        event(
            &svix_id(),
            "user.created",
            clerk_user("user_1", None, None, 100),
        ),
        event(&svix_id(), "user.created", unstorable),
        event(
            &svix_id(),
            "user.created",
            clerk_user("user_2", None, None, 100),
        ),
    ];
    let mut turns = Turns::default();
    write_with(env.db(), &events, &mut turns)
        .await
        .expect("no stop");
    assert_eq!(
        turns.0,
        [
            "one by one",
            "0 applied",
            "1 failed, try 1",
            "1 failed, try 2",
            "2 applied"
        ]
    );
    assert!(env.user("user_1").await.is_some());
    assert!(env.user("user_bad").await.is_none());

    let mut turns = Turns::default();
    write_with(env.db(), &events[2..], &mut turns)
        .await
        .expect("no stop");
    assert_eq!(turns.0, ["batch of 1 applied"]);
}
