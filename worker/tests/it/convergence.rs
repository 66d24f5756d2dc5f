//! The promise, as a property: for random histories of several users (creates, updates, emails
//! moving between them, role changes, deletes), organizations (creates, updates, deletes) and
//! memberships (added, role changed, removed, added again under a new id), delivered shuffled
//! and with duplicates through RabbitMQ to two workers at once, the `users`, `organizations` and
//! `organization_memberships` tables end equal to Clerk's final state. Batch sizes range from
//! one event to more than a whole history, and the workers start either before the events
//! (small batches as they trickle in) or after (full batches from a backlog, with several
//! versions of one user, duplicates and deletes in one batch).
//!
//! Each case uses a fresh database and queue, so cases are few by default (8); set
//! `PROPTEST_CASES` for more.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use proptest::prelude::*;
use sea_orm::EntityTrait;
use serde_json::{Value, json};
use test_support::events::{clerk_membership, clerk_organization, clerk_user};
use test_support::rows::{organization_memberships, organizations, users};
use test_support::signing::svix_id;
use test_support::{TestEnv, eventually};

const USERS: usize = 4;
const ORGANIZATIONS: usize = 2;
const EMAILS: usize = 3;
const ROLES: [Option<&str>; 5] = [
    None,
    Some("admin"),
    Some("trainer"),
    Some("client"),
    Some("owner"),
];
const MEMBER_ROLES: [&str; 3] = ["org:admin", "org:member", "basic_member"];

/// One raw choice; [`history`] turns a list of them into a history Clerk could have produced.
#[derive(Debug, Clone)]
enum Step {
    User {
        user: usize,
        delete: bool,
        email: usize, // EMAILS means no email
        role: usize,
        /// On delete, whether Clerk also sends a membership delete per membership (undocumented).
        announce: bool,
    },
    Organization {
        organization: usize,
        delete: bool,
        announce: bool,
    },
    Membership {
        organization: usize,
        user: usize,
        remove: bool,
        role: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (
            0..USERS,
            prop::bool::weighted(0.12),
            0..=EMAILS,
            0..ROLES.len(),
            prop::bool::weighted(0.3),
        )
            .prop_map(|(user, delete, email, role, announce)| Step::User {
                user,
                delete,
                email,
                role,
                announce,
            }),
        // Deletes often enough that late memberships of deleted organizations are common.
        3 => (0..ORGANIZATIONS, prop::bool::weighted(0.25), prop::bool::weighted(0.3)).prop_map(
            |(organization, delete, announce)| Step::Organization {
                organization,
                delete,
                announce,
            }
        ),
        5 => (0..ORGANIZATIONS, 0..USERS, prop::bool::weighted(0.3), 0..MEMBER_ROLES.len())
            .prop_map(|(organization, user, remove, role)| Step::Membership {
                organization,
                user,
                remove,
                role,
            }),
    ]
}

/// A user's state in Clerk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    email: Option<String>,
    role: String,
    first_name: String,
    updated_at: i64,
}

/// An organization's state in Clerk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExpectedOrganization {
    name: String,
    slug: Option<String>,
    updated_at: i64,
}

/// A membership's state in Clerk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExpectedMembership {
    organization_id: String,
    user_id: String,
    role: String,
    created_at: i64,
    updated_at: i64,
}

/// Clerk's final state.
#[derive(Debug, Default, PartialEq, Eq)]
struct Truth {
    users: BTreeMap<String, Expected>,
    organizations: BTreeMap<String, ExpectedOrganization>,
    memberships: BTreeMap<String, ExpectedMembership>,
}

struct Published {
    svix_id: String,
    event_type: &'static str,
    data: Value,
}

impl Truth {
    /// The organization as a snapshot inside a membership event.
    fn snapshot(&self, organization_id: &str) -> Value {
        let organization = &self.organizations[organization_id];
        clerk_organization(organization_id, &organization.name, organization.updated_at)
    }

    fn membership_data(&self, id: &str, membership: &ExpectedMembership) -> Value {
        clerk_membership(
            id,
            &self.snapshot(&membership.organization_id),
            &membership.user_id,
            &membership.role,
            membership.created_at,
            membership.updated_at,
        )
    }

    /// Removes the memberships `which` selects; with `announce`, Clerk sends a delete for each
    /// (carrying the membership's last `updated_at`, as Clerk's deletes do).
    fn remove_memberships(
        &mut self,
        which: impl Fn(&ExpectedMembership) -> bool,
        announce: bool,
        events: &mut Vec<Published>,
    ) {
        let gone: Vec<String> = self
            .memberships
            .iter()
            .filter(|(_, membership)| which(membership))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if announce {
                events.push(Published {
                    svix_id: svix_id(),
                    event_type: "organizationMembership.deleted",
                    data: self.membership_data(&id, &self.memberships[&id]),
                });
            }
            self.memberships.remove(&id);
        }
    }
}

/// Interprets the steps in order, with a clock that only moves forward: a user or organization
/// is created by its first step, updated by later ones, and gone for good once deleted, taking
/// its memberships along; an email is only taken when no other live user holds it at that
/// moment; a membership needs a live organization and user, and one added again after a removal
/// gets a new id. Returns the events and the final truth.
fn history(steps: &[Step]) -> (Vec<Published>, Truth) {
    let mut truth = Truth::default();
    let mut deleted: HashSet<String> = HashSet::new();
    let mut events = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        let now = 1_000 + n as i64 * 10;
        match *step {
            Step::User {
                user,
                delete,
                email,
                role,
                announce,
            } => {
                let id = format!("user_{user}");
                if deleted.contains(&id) {
                    continue;
                }
                let exists = truth.users.contains_key(&id);
                if delete && exists {
                    truth.users.remove(&id);
                    deleted.insert(id.clone());
                    truth.remove_memberships(|m| m.user_id == id, announce, &mut events);
                    events.push(Published {
                        svix_id: svix_id(),
                        event_type: "user.deleted",
                        data: json!({"deleted": true, "id": id, "object": "user"}),
                    });
                    continue;
                }
                let wanted = (email < EMAILS).then(|| format!("e{email}@example.org"));
                let taken = wanted.as_ref().is_some_and(|email| {
                    truth
                        .users
                        .iter()
                        .any(|(other, state)| *other != id && state.email.as_ref() == Some(email))
                });
                let email = if taken { None } else { wanted };
                let role = ROLES[role];
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
                truth.users.insert(
                    id,
                    Expected {
                        email,
                        role: role.to_owned(),
                        first_name,
                        updated_at: now,
                    },
                );
            }
            Step::Organization {
                organization,
                delete,
                announce,
            } => {
                let id = format!("org_{organization}");
                if deleted.contains(&id) {
                    continue;
                }
                let exists = truth.organizations.contains_key(&id);
                if delete && exists {
                    truth.remove_memberships(|m| m.organization_id == id, announce, &mut events);
                    truth.organizations.remove(&id);
                    deleted.insert(id.clone());
                    events.push(Published {
                        svix_id: svix_id(),
                        event_type: "organization.deleted",
                        data: json!({"object": "organization", "id": id, "deleted": true}),
                    });
                    continue;
                }
                let name = format!("o{now}");
                events.push(Published {
                    svix_id: svix_id(),
                    event_type: if exists {
                        "organization.updated"
                    } else {
                        "organization.created"
                    },
                    data: clerk_organization(&id, &name, now),
                });
                truth.organizations.insert(
                    id,
                    ExpectedOrganization {
                        slug: Some(name.clone()),
                        name,
                        updated_at: now,
                    },
                );
            }
            Step::Membership {
                organization,
                user,
                remove,
                role,
            } => {
                let (organization_id, user_id) =
                    (format!("org_{organization}"), format!("user_{user}"));
                if !truth.organizations.contains_key(&organization_id)
                    || !truth.users.contains_key(&user_id)
                {
                    continue;
                }
                let current = truth
                    .memberships
                    .iter()
                    .find(|(_, m)| m.organization_id == organization_id && m.user_id == user_id)
                    .map(|(id, m)| (id.clone(), m.clone()));
                match (current, remove) {
                    (Some((id, _)), true) => {
                        truth.remove_memberships(
                            |m| m.organization_id == organization_id && m.user_id == user_id,
                            true,
                            &mut events,
                        );
                        debug_assert!(!truth.memberships.contains_key(&id));
                    }
                    (Some((id, mut membership)), false) => {
                        membership.role = MEMBER_ROLES[role].to_owned();
                        membership.updated_at = now;
                        events.push(Published {
                            svix_id: svix_id(),
                            event_type: "organizationMembership.updated",
                            data: truth.membership_data(&id, &membership),
                        });
                        truth.memberships.insert(id, membership);
                    }
                    (None, true) => continue,
                    (None, false) => {
                        let id = format!("orgmem_{n}");
                        let membership = ExpectedMembership {
                            organization_id,
                            user_id,
                            role: MEMBER_ROLES[role].to_owned(),
                            created_at: now,
                            updated_at: now,
                        };
                        events.push(Published {
                            svix_id: svix_id(),
                            event_type: "organizationMembership.created",
                            data: truth.membership_data(&id, &membership),
                        });
                        truth.memberships.insert(id, membership);
                    }
                }
            }
        }
    }
    (events, truth)
}

async fn stored(env: &TestEnv) -> Truth {
    let users = users::Entity::find()
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
    let organizations = organizations::Entity::find()
        .all(env.db())
        .await
        .expect("organizations")
        .into_iter()
        .map(|organization| {
            (
                organization.id,
                ExpectedOrganization {
                    name: organization.name,
                    slug: organization.slug,
                    updated_at: organization.updated_at.timestamp_millis(),
                },
            )
        })
        .collect();
    let memberships = organization_memberships::Entity::find()
        .all(env.db())
        .await
        .expect("memberships")
        .into_iter()
        .map(|membership| {
            (
                membership.id,
                ExpectedMembership {
                    organization_id: membership.organization_id,
                    user_id: membership.user_id,
                    role: membership.role,
                    created_at: membership.created_at.timestamp_millis(),
                    updated_at: membership.updated_at.timestamp_millis(),
                },
            )
        })
        .collect();
    Truth {
        users,
        organizations,
        memberships,
    }
}

/// Batch sizes in the mix (`WORKER_BATCH_SIZE`); prefetch is twice the batch.
const BATCH_SIZES: [usize; 4] = [1, 4, 16, 64];

async fn run_case(
    steps: Vec<Step>,
    order: Vec<u32>,
    duplicates: Vec<usize>,
    batch_size: usize,
    backlog: bool,
) {
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
    config.batch_size = batch_size;
    config.prefetch = u16::try_from(2 * batch_size).expect("small prefetch");
    let publish_all = || async {
        for (_, i) in &deliveries {
            let event = &events[*i];
            env.publish_event(&event.svix_id, event.event_type, event.data.clone())
                .await;
        }
    };
    if backlog {
        publish_all().await;
    }
    let first = env.start_worker(config.clone()).await;
    let second = env.start_worker(config).await;
    if !backlog {
        publish_all().await;
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

    let rows = stored(&env).await;
    assert_eq!(rows.users, truth.users, "users differ from the truth");
    assert_eq!(
        rows.organizations, truth.organizations,
        "organizations differ from the truth"
    );
    assert_eq!(
        rows.memberships, truth.memberships,
        "memberships differ from the truth"
    );
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
    fn shuffled_duplicated_histories_converge_to_clerks_final_state(
        steps in prop::collection::vec(step(), 1..48),
        order in prop::collection::vec(any::<u32>(), 48),
        duplicates in prop::collection::vec(0usize..48, 0..12),
        batch_size in prop::sample::select(BATCH_SIZES.to_vec()),
        backlog in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(run_case(steps, order, duplicates, batch_size, backlog));
    }
}
