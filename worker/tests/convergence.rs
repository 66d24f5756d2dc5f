//! The promise, as a property: for random histories of several users (creates, updates, emails
//! moving between them, role changes, deletes), delivered shuffled and with duplicates through
//! RabbitMQ to two workers at once, the `users` table ends equal to each user's last true state.
//!
//! Each case uses a fresh database and queue, so cases are few by default (8); set
//! `PROPTEST_CASES` for more.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use proptest::prelude::*;
use sea_orm::EntityTrait;
use serde_json::{Value, json};
use test_support::events::clerk_user;
use test_support::rows::users;
use test_support::signing::svix_id;
use test_support::{TestEnv, eventually};

const USERS: usize = 4;
const EMAILS: usize = 3;
const ROLES: [Option<&str>; 5] = [
    None,
    Some("admin"),
    Some("trainer"),
    Some("client"),
    Some("owner"),
];

/// One raw choice; [`history`] turns a list of them into a history Clerk could have produced.
#[derive(Debug, Clone)]
struct Step {
    user: usize,
    delete: bool,
    email: usize, // EMAILS means no email
    role: usize,
}

fn step() -> impl Strategy<Value = Step> {
    (
        0..USERS,
        prop::bool::weighted(0.12),
        0..=EMAILS,
        0..ROLES.len(),
    )
        .prop_map(|(user, delete, email, role)| Step {
            user,
            delete,
            email,
            role,
        })
}

/// A user's state in Clerk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    email: Option<String>,
    role: String,
    first_name: String,
    updated_at: i64,
}

struct Published {
    svix_id: String,
    event_type: &'static str,
    data: Value,
}

/// Interprets the steps in order, with a clock that only moves forward: a user is created by its
/// first step, updated by later ones, and gone for good once deleted; an email is only taken when
/// no other live user holds it at that moment. Returns the events and the final truth.
fn history(steps: &[Step]) -> (Vec<Published>, BTreeMap<String, Expected>) {
    let mut live: BTreeMap<String, Expected> = BTreeMap::new();
    let mut deleted: HashSet<String> = HashSet::new();
    let mut events = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        let now = 1_000 + n as i64 * 10;
        let id = format!("user_{}", step.user);
        if deleted.contains(&id) {
            continue;
        }
        let exists = live.contains_key(&id);
        if step.delete && exists {
            live.remove(&id);
            deleted.insert(id.clone());
            events.push(Published {
                svix_id: svix_id(),
                event_type: "user.deleted",
                data: json!({"deleted": true, "id": id, "object": "user"}),
            });
            continue;
        }
        let wanted = (step.email < EMAILS).then(|| format!("e{}@example.org", step.email));
        let taken = wanted.as_ref().is_some_and(|email| {
            live.iter()
                .any(|(other, state)| *other != id && state.email.as_ref() == Some(email))
        });
        let email = if taken { None } else { wanted };
        let role = ROLES[step.role];
        let first_name = format!("v{now}");
        let mut data = clerk_user(&id, email.as_deref(), role, now);
        data["first_name"] = json!(first_name);
        events.push(Published {
            svix_id: svix_id(),
            event_type: if exists {
                "user.updated"
            } else {
                "user.created"
            },
            data,
        });
        let role = role
            .filter(|role| ["admin", "trainer", "client"].contains(role))
            .unwrap_or("client");
        live.insert(
            id,
            Expected {
                email,
                role: role.to_owned(),
                first_name,
                updated_at: now,
            },
        );
    }
    (events, live)
}

async fn run_case(steps: Vec<Step>, order: Vec<u32>, duplicates: Vec<usize>) {
    let (events, truth) = history(&steps);
    // Delivery order: sorted by a random key per event, with some events sent twice.
    let mut deliveries: Vec<(u32, usize)> = events
        .iter()
        .enumerate()
        .map(|(i, _)| (order[i % order.len()].wrapping_add(i as u32), i))
        .collect();
    for (k, &d) in duplicates.iter().enumerate() {
        if !events.is_empty() {
            deliveries.push((order[(d + k) % order.len()], d % events.len()));
        }
    }
    deliveries.sort();

    let env = TestEnv::new().await;
    let mut config = env.config();
    config.batch_size = 4;
    config.prefetch = 8;
    let first = env.start_worker(config.clone()).await;
    let second = env.start_worker(config).await;
    for (_, i) in &deliveries {
        let event = &events[*i];
        env.publish_event(&event.svix_id, event.event_type, event.data.clone())
            .await;
    }
    // Done when every event is recorded and every extra copy was met as a duplicate (so none
    // is still waiting in a prefetch buffer when the workers stop).
    let copies = (deliveries.len() - events.len()) as u64;
    eventually(
        Duration::from_secs(60),
        "every delivery handled",
        || async {
            env.processed_count().await == events.len() as u64
                && first.metrics.duplicates.get() + second.metrics.duplicates.get() >= copies
        },
    )
    .await;
    first.stop().await;
    second.stop().await;

    let rows: BTreeMap<String, Expected> = users::Entity::find()
        .all(env.db())
        .await
        .expect("users")
        .into_iter()
        .map(|user| {
            (
                user.id,
                Expected {
                    email: user.email,
                    role: user.role,
                    first_name: user.first_name.unwrap_or_default(),
                    updated_at: user.updated_at.timestamp_millis(),
                },
            )
        })
        .collect();
    assert_eq!(rows, truth, "table differs from the truth");
    assert_eq!(env.ready(&env.topology.dead_queue).await, 0, "dead letters");
    assert_eq!(env.ready(&env.topology.queue).await, 0, "unacknowledged");
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(8)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // Every case costs a database and a queue: shrink a little, not for ever.
        max_shrink_iters: 16,
        ..ProptestConfig::default()
    })]

    #[test]
    fn shuffled_duplicated_histories_converge_to_each_users_last_true_state(
        steps in prop::collection::vec(step(), 1..40),
        order in prop::collection::vec(any::<u32>(), 40),
        duplicates in prop::collection::vec(0usize..40, 0..12),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(run_case(steps, order, duplicates));
    }
}
