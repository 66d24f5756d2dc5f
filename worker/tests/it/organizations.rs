//! Organizations and memberships: each rule through the real pipeline (events published to
//! RabbitMQ as the ingest does, a worker in-process, Postgres), and the record-level entry point
//! directly.
//!
//! Tests that depend on the order events are applied in run the worker with one transaction at
//! a time, so events apply in the order they were published.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use shared::headers;
use shared::organizations::{MembershipRecord, OrganizationRecord};
use test_support::events::{clerk_membership, clerk_organization, clerk_user, fixture};
use test_support::signing::svix_id;
use test_support::worker::apply_changes;
use test_support::{TestEnv, TestWorker, eventually};
use worker::apply::organizations::Change;

const WITHIN: Duration = Duration::from_secs(20);

/// Publishes the events in order and waits until every one is recorded.
async fn deliver(env: &TestEnv, events: &[(&str, &str, Value)]) {
    for (svix_id, event_type, data) in events {
        env.publish_event(svix_id, event_type, data.clone()).await;
    }
    let svix_ids: Vec<&str> = events.iter().map(|(id, _, _)| *id).collect();
    eventually(WITHIN, "every event recorded", || async {
        for id in &svix_ids {
            if env.processed(id).await.is_none() {
                return false;
            }
        }
        true
    })
    .await;
}

async fn outcome(env: &TestEnv, svix_id: &str) -> String {
    env.processed(svix_id).await.expect("processed").outcome
}

/// A worker applying one transaction at a time, in delivery order.
async fn in_order_worker(env: &TestEnv) -> TestWorker {
    let mut config = env.config();
    config.db_pool_size = 1;
    env.start_worker(config).await
}

fn deleted_organization(id: &str) -> Value {
    json!({"object": "organization", "id": id, "slug": "x", "deleted": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_organization_and_membership_events_are_stored_with_their_fields() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let ids: Vec<String> = (0..4).map(|_| svix_id()).collect();
    for (id, name) in ids.iter().zip([
        "organization.created",
        "organizationMembership.created",
        "organization.updated",
        "organizationMembership.updated",
    ]) {
        env.publish(id, name, &fixture(name)).await;
    }
    eventually(WITHIN, "four events recorded", || async {
        env.processed_count().await == 4
    })
    .await;
    let organization = env
        .organization("org_2g7np7Hrk0SN6kj5EDMLDaKNL0S")
        .await
        .expect("organization");
    let updated: Value = serde_json::from_slice(&fixture("organization.updated")).expect("fixture");
    assert_eq!(organization.name, "Acme Corp Updated");
    assert_eq!(organization.slug.as_deref(), Some("acme-corp-updated"));
    assert_eq!(
        organization.created_by.as_deref(),
        Some("user_29w83sxmDNGwOuEthce5gg56FcC")
    );
    assert_eq!(
        organization.updated_at.timestamp_millis(),
        1_716_883_500_000
    );
    assert_eq!(organization.clerk_data, updated["data"]);
    let membership = env
        .membership("orgmem_2g7np7Hrk0SN6kj5EDMLDaKNL0S")
        .await
        .expect("membership");
    let membership_updated: Value =
        serde_json::from_slice(&fixture("organizationMembership.updated")).expect("fixture");
    assert_eq!(
        membership.organization_id,
        "org_2g7np7Hrk0SN6kj5EDMLDaKNL0S"
    );
    assert_eq!(membership.user_id, "user_29w83sxmDNGwOuEthce5gg56FcC");
    assert_eq!(membership.role, "org:admin");
    assert_eq!(
        membership.permissions,
        json!(["org:sys_profile:read", "org:sys_memberships:read"])
    );
    assert_eq!(membership.created_at.timestamp_millis(), 1_716_883_200_000);
    assert_eq!(membership.updated_at.timestamp_millis(), 1_716_883_500_000);
    assert_eq!(membership.clerk_data, membership_updated["data"]);
    let (_, metrics) = worker.get("/metrics").await;
    assert!(
        metrics.contains(
            "clerk_sync_worker_events_total{outcome=\"applied\",type=\"organizationMembership.updated\"} 1"
        ),
        "{metrics}"
    );

    // The documented membership delete keeps the old updated_at, and still deletes.
    let delete = svix_id();
    env.publish(
        &delete,
        "organizationMembership.deleted",
        &fixture("organizationMembership.deleted"),
    )
    .await;
    eventually(WITHIN, "the membership gone", || async {
        env.membership("orgmem_2g7np7Hrk0SN6kj5EDMLDaKNL0S")
            .await
            .is_none()
    })
    .await;
    assert_eq!(outcome(&env, &delete).await, "deleted");
    let delete = svix_id();
    env.publish(
        &delete,
        "organization.deleted",
        &fixture("organization.deleted"),
    )
    .await;
    eventually(WITHIN, "the organization gone", || async {
        env.organization("org_2g7np7Hrk0SN6kj5EDMLDaKNL0S")
            .await
            .is_none()
    })
    .await;
    assert!(
        env.has_tombstone("organization_tombstones", "org_2g7np7Hrk0SN6kj5EDMLDaKNL0S")
            .await
    );
    worker.stop().await;
    assert_eq!(env.ready(&env.topology.queue).await, 0, "all acknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_delivered_before_its_organization_and_its_user_is_kept() {
    let env = TestEnv::new().await;
    let worker = in_order_worker(&env).await;
    let org_v100 = clerk_organization("org_a", "Acme", 100);
    let (membership, created, updated) = (svix_id(), svix_id(), svix_id());
    deliver(
        &env,
        &[
            (
                &membership,
                "organizationMembership.created",
                clerk_membership("orgmem_1", &org_v100, "user_1", "org:member", 100, 100),
            ),
            (&created, "organization.created", org_v100.clone()),
            (
                &updated,
                "organization.updated",
                clerk_organization("org_a", "Acme Renamed", 200),
            ),
        ],
    )
    .await;
    assert_eq!(outcome(&env, &membership).await, "applied");
    // The snapshot had created the organization at the same version already.
    assert_eq!(outcome(&env, &created).await, "stale");
    assert_eq!(outcome(&env, &updated).await, "applied");
    let row = env.membership("orgmem_1").await.expect("membership kept");
    assert_eq!(
        (row.organization_id.as_str(), row.user_id.as_str()),
        ("org_a", "user_1")
    );
    assert!(env.user("user_1").await.is_none(), "no user row needed");
    assert_eq!(
        env.organization("org_a").await.expect("organization").name,
        "Acme Renamed"
    );

    // The user arriving later changes nothing about the membership.
    let user = svix_id();
    deliver(
        &env,
        &[(
            &user,
            "user.created",
            clerk_user("user_1", Some("u1@example.org"), None, 50),
        )],
    )
    .await;
    assert!(env.membership("orgmem_1").await.is_some());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_versions_of_an_organization_and_a_membership_change_nothing() {
    let env = TestEnv::new().await;
    let worker = in_order_worker(&env).await;
    let org_v300 = clerk_organization("org_a", "Newest", 300);
    let org_v100 = clerk_organization("org_a", "Oldest", 100);
    let ids: Vec<String> = (0..5).map(|_| svix_id()).collect();
    deliver(
        &env,
        &[
            (&ids[0], "organization.updated", org_v300.clone()),
            (&ids[1], "organization.created", org_v100.clone()),
            (
                &ids[2],
                "organizationMembership.updated",
                clerk_membership("orgmem_1", &org_v300, "user_1", "org:admin", 50, 300),
            ),
            // An older membership version, whose older snapshot must not move the
            // organization back either.
            (
                &ids[3],
                "organizationMembership.created",
                clerk_membership("orgmem_1", &org_v100, "user_1", "org:member", 50, 50),
            ),
            // The same version again under another svix-id: equal is not newer.
            (&ids[4], "organization.updated", org_v300),
        ],
    )
    .await;
    assert_eq!(outcome(&env, &ids[0]).await, "applied");
    assert_eq!(outcome(&env, &ids[1]).await, "stale");
    assert_eq!(outcome(&env, &ids[2]).await, "applied");
    assert_eq!(outcome(&env, &ids[3]).await, "stale");
    assert_eq!(outcome(&env, &ids[4]).await, "stale");
    let organization = env.organization("org_a").await.expect("organization");
    assert_eq!(
        (
            organization.name.as_str(),
            organization.updated_at.timestamp_millis()
        ),
        ("Newest", 300)
    );
    let membership = env.membership("orgmem_1").await.expect("membership");
    assert_eq!(
        (
            membership.role.as_str(),
            membership.updated_at.timestamp_millis()
        ),
        ("org:admin", 300)
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_delete_with_an_old_updated_at_wins_and_late_versions_stay_out() {
    let env = TestEnv::new().await;
    let worker = in_order_worker(&env).await;
    let org = clerk_organization("org_a", "Acme", 100);
    let ids: Vec<String> = (0..4).map(|_| svix_id()).collect();
    deliver(
        &env,
        &[
            (
                &ids[0],
                "organizationMembership.created",
                clerk_membership("orgmem_1", &org, "user_1", "org:member", 100, 100),
            ),
            (
                &ids[1],
                "organizationMembership.updated",
                clerk_membership("orgmem_1", &org, "user_1", "org:admin", 100, 200),
            ),
            // Clerk's delete keeps the membership's previous updated_at: older than the row.
            (
                &ids[2],
                "organizationMembership.deleted",
                clerk_membership("orgmem_1", &org, "user_1", "org:member", 100, 100),
            ),
            (
                &ids[3],
                "organizationMembership.updated",
                clerk_membership("orgmem_1", &org, "user_1", "org:admin", 100, 999),
            ),
        ],
    )
    .await;
    assert_eq!(outcome(&env, &ids[2]).await, "deleted");
    assert_eq!(outcome(&env, &ids[3]).await, "stale");
    assert!(
        env.membership("orgmem_1").await.is_none(),
        "deleted for good"
    );
    assert!(env.has_tombstone("membership_tombstones", "orgmem_1").await);
    assert!(
        env.organization("org_a").await.is_some(),
        "the organization stays"
    );

    // A delete that arrives before anything of its membership.
    let (delete, create) = (svix_id(), svix_id());
    deliver(
        &env,
        &[
            (
                &delete,
                "organizationMembership.deleted",
                clerk_membership("orgmem_2", &org, "user_2", "org:member", 100, 100),
            ),
            (
                &create,
                "organizationMembership.created",
                clerk_membership("orgmem_2", &org, "user_2", "org:member", 100, 100),
            ),
        ],
    )
    .await;
    assert_eq!(outcome(&env, &create).await, "stale");
    assert!(env.membership("orgmem_2").await.is_none());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_update_after_an_organization_delete_does_not_bring_it_back() {
    let env = TestEnv::new().await;
    let worker = in_order_worker(&env).await;
    let ids: Vec<String> = (0..3).map(|_| svix_id()).collect();
    let late = clerk_organization("org_a", "Late", 999);
    deliver(
        &env,
        &[
            (
                &ids[0],
                "organization.created",
                clerk_organization("org_a", "Acme", 100),
            ),
            (
                &ids[1],
                "organization.deleted",
                deleted_organization("org_a"),
            ),
            (&ids[2], "organization.updated", late),
        ],
    )
    .await;
    assert_eq!(outcome(&env, &ids[1]).await, "deleted");
    assert_eq!(outcome(&env, &ids[2]).await, "stale");
    assert!(env.organization("org_a").await.is_none());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_and_readded_member_keeps_the_new_membership_when_the_old_delete_arrives_last() {
    let env = TestEnv::new().await;
    let worker = in_order_worker(&env).await;
    let org = clerk_organization("org_a", "Acme", 100);
    // Truth: orgmem_old from 100 to 200, removed; orgmem_new created at 300.
    let old_created = clerk_membership("orgmem_old", &org, "user_1", "org:member", 100, 100);
    let old_updated = clerk_membership("orgmem_old", &org, "user_1", "org:admin", 100, 200);
    let new_created = clerk_membership("orgmem_new", &org, "user_1", "org:member", 300, 300);
    let ids: Vec<String> = (0..4).map(|_| svix_id()).collect();
    deliver(
        &env,
        &[
            (&ids[0], "organizationMembership.created", old_created),
            (&ids[1], "organizationMembership.created", new_created),
            (
                &ids[2],
                "organizationMembership.updated",
                old_updated.clone(),
            ),
            (&ids[3], "organizationMembership.deleted", old_updated),
        ],
    )
    .await;
    assert_eq!(outcome(&env, &ids[1]).await, "applied");
    assert_eq!(
        outcome(&env, &ids[2]).await,
        "stale",
        "an old membership's late update"
    );
    assert_eq!(outcome(&env, &ids[3]).await, "deleted");
    assert!(env.membership("orgmem_old").await.is_none());
    let current = env.membership("orgmem_new").await.expect("new membership");
    assert_eq!(current.user_id, "user_1");
    assert!(
        env.has_tombstone("membership_tombstones", "orgmem_old")
            .await
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_organization_removes_its_memberships_and_blocks_late_ones() {
    let env = TestEnv::new().await;
    let worker = in_order_worker(&env).await;
    let org_a = clerk_organization("org_a", "Acme", 100);
    let org_b = clerk_organization("org_b", "Bravo", 100);
    let mut events: Vec<(String, &str, Value)> = [
        ("orgmem_a1", &org_a, "user_1"),
        ("orgmem_a2", &org_a, "user_2"),
        ("orgmem_b1", &org_b, "user_1"),
    ]
    .into_iter()
    .map(|(id, org, user)| {
        (
            svix_id(),
            "organizationMembership.created",
            clerk_membership(id, org, user, "org:member", 100, 100),
        )
    })
    .collect();
    events.push((
        svix_id(),
        "organization.deleted",
        deleted_organization("org_a"),
    ));
    // Late: a membership created before the delete, and an organization update.
    let late_membership = svix_id();
    events.push((
        late_membership.clone(),
        "organizationMembership.created",
        clerk_membership(
            "orgmem_a3",
            &clerk_organization("org_a", "Acme", 150),
            "user_3",
            "org:admin",
            150,
            150,
        ),
    ));
    let borrowed: Vec<(&str, &str, Value)> = events
        .iter()
        .map(|(id, kind, data)| (id.as_str(), *kind, data.clone()))
        .collect();
    deliver(&env, &borrowed).await;
    for id in ["orgmem_a1", "orgmem_a2", "orgmem_a3"] {
        assert!(env.membership(id).await.is_none(), "{id} left behind");
    }
    assert_eq!(outcome(&env, &late_membership).await, "stale");
    assert!(
        env.organization("org_a").await.is_none(),
        "not recreated by the snapshot"
    );
    assert!(env.membership("orgmem_b1").await.is_some(), "another org's");
    assert!(env.organization("org_b").await.is_some());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_user_removes_their_memberships_and_blocks_late_ones() {
    let env = TestEnv::new().await;
    let worker = in_order_worker(&env).await;
    let org_a = clerk_organization("org_a", "Acme", 100);
    let org_b = clerk_organization("org_b", "Bravo", 100);
    let ids: Vec<String> = (0..6).map(|_| svix_id()).collect();
    deliver(
        &env,
        &[
            (
                &ids[0],
                "user.created",
                clerk_user("user_1", Some("u1@example.org"), None, 100),
            ),
            (
                &ids[1],
                "organizationMembership.created",
                clerk_membership("orgmem_a1", &org_a, "user_1", "org:admin", 100, 100),
            ),
            (
                &ids[2],
                "organizationMembership.created",
                clerk_membership("orgmem_b1", &org_b, "user_1", "org:member", 100, 100),
            ),
            (
                &ids[3],
                "organizationMembership.created",
                clerk_membership("orgmem_a2", &org_a, "user_2", "org:member", 100, 100),
            ),
            (
                &ids[4],
                "user.deleted",
                json!({"deleted": true, "id": "user_1", "object": "user"}),
            ),
            (
                &ids[5],
                "organizationMembership.updated",
                clerk_membership("orgmem_a1", &org_a, "user_1", "org:member", 100, 999),
            ),
        ],
    )
    .await;
    assert!(env.membership("orgmem_a1").await.is_none());
    assert!(env.membership("orgmem_b1").await.is_none());
    assert_eq!(outcome(&env, &ids[5]).await, "stale");
    assert!(
        env.membership("orgmem_a2").await.is_some(),
        "another member's"
    );
    assert!(env.organization("org_a").await.is_some());
    assert!(env.organization("org_b").await.is_some());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invitations_and_domains_are_ignored_and_duplicates_change_nothing() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let (invitation, domain, created) = (svix_id(), svix_id(), svix_id());
    deliver(
        &env,
        &[
            (
                &invitation,
                "organizationInvitation.created",
                json!({"object": "organization_invitation", "id": "orginv_1", "organization_id": "org_a"}),
            ),
            (
                &domain,
                "organizationDomain.created",
                json!({"object": "organization_domain", "id": "orgdmn_1", "organization_id": "org_a"}),
            ),
            (
                &created,
                "organization.created",
                clerk_organization("org_a", "Acme", 100),
            ),
        ],
    )
    .await;
    assert_eq!(outcome(&env, &invitation).await, "ignored");
    assert_eq!(outcome(&env, &domain).await, "ignored");
    let synced_once = env.organization("org_a").await.expect("org").synced_at;
    // The same svix-id again, even with other data, is a duplicate.
    env.publish_event(
        &created,
        "organization.created",
        clerk_organization("org_a", "Other", 500),
    )
    .await;
    eventually(WITHIN, "the duplicate counted", || async {
        worker.metrics.duplicates.get() == 1
    })
    .await;
    let organization = env.organization("org_a").await.expect("org");
    assert_eq!(
        (organization.name.as_str(), organization.synced_at),
        ("Acme", synced_once)
    );
    assert_eq!(env.processed_count().await, 3);
    worker.stop().await;
}

fn text(table: &FieldTable, name: &str) -> Option<String> {
    match table.inner().get(name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.to_string()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_without_a_user_and_a_delete_without_an_id_are_dead_lettered_at_once() {
    let env = TestEnv::new().await;
    let worker = env.start_worker(env.config()).await;
    let mut without_user = clerk_membership(
        "orgmem_1",
        &clerk_organization("org_a", "Acme", 100),
        "user_1",
        "org:member",
        100,
        100,
    );
    without_user["public_user_data"] = Value::Null;
    env.publish_event(&svix_id(), "organizationMembership.created", without_user)
        .await;
    env.publish_event(
        &svix_id(),
        "organization.deleted",
        json!({"object": "organization", "deleted": true}),
    )
    .await;
    eventually(WITHIN, "two dead letters", || async {
        env.ready(&env.topology.dead_queue).await == 2
    })
    .await;
    worker.stop().await;
    for (table, _) in env.take_dead_letters().await {
        assert_eq!(
            text(&table, headers::ERROR_KIND).as_deref(),
            Some(headers::KIND_PERMANENT)
        );
    }
    assert!(env.membership("orgmem_1").await.is_none());
    assert_eq!(env.processed_count().await, 0);
}

fn organization_record(id: &str, name: &str, updated_at: i64) -> OrganizationRecord {
    OrganizationRecord::from_data(clerk_organization(id, name, updated_at)).expect("organization")
}

fn membership_record(
    id: &str,
    organization: &Value,
    user_id: &str,
    created_at: i64,
    updated_at: i64,
) -> MembershipRecord {
    MembershipRecord::from_data(clerk_membership(
        id,
        organization,
        user_id,
        "org:member",
        created_at,
        updated_at,
    ))
    .expect("membership")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_apply_without_events_by_the_same_rules() {
    let env = TestEnv::new().await;
    let org_v100 = clerk_organization("org_a", "Acme", 100);
    let upsert = |record: MembershipRecord| Change::UpsertMembership(Box::new(record));
    // The newer membership of a pair replaces the older one, whichever comes first.
    let written = apply_changes(
        env.db(),
        &[
            upsert(membership_record(
                "orgmem_new",
                &org_v100,
                "user_1",
                300,
                300,
            )),
            upsert(membership_record(
                "orgmem_old",
                &org_v100,
                "user_1",
                100,
                100,
            )),
            upsert(membership_record("orgmem_b", &org_v100, "user_2", 100, 100)),
        ],
    )
    .await
    .expect("apply");
    assert_eq!(written, [true, false, true]);
    assert!(env.membership("orgmem_old").await.is_none());
    assert!(
        env.has_tombstone("membership_tombstones", "orgmem_old")
            .await,
        "the superseded membership is known to be gone"
    );
    assert!(env.membership("orgmem_new").await.is_some());

    // A snapshot advances the organization; an older organization version does not move it back.
    let written = apply_changes(
        env.db(),
        &[
            upsert(membership_record(
                "orgmem_b",
                &clerk_organization("org_a", "Acme Newer", 200),
                "user_2",
                100,
                100,
            )),
            Change::UpsertOrganization(Box::new(organization_record("org_a", "Acme Old", 150))),
        ],
    )
    .await
    .expect("apply");
    assert_eq!(
        written,
        [true, false],
        "the snapshot alone counts as a write"
    );
    assert_eq!(
        env.organization("org_a").await.expect("org").name,
        "Acme Newer"
    );

    // Deleting the organization takes its memberships and its future along.
    apply_changes(
        env.db(),
        &[Change::DeleteOrganization { id: "org_a".into() }],
    )
    .await
    .expect("delete");
    assert!(env.membership("orgmem_new").await.is_none());
    assert!(env.membership("orgmem_b").await.is_none());
    let written = apply_changes(
        env.db(),
        &[upsert(membership_record(
            "orgmem_c",
            &clerk_organization("org_a", "Acme", 999),
            "user_3",
            999,
            999,
        ))],
    )
    .await
    .expect("apply");
    assert_eq!(written, [false]);
    assert!(env.organization("org_a").await.is_none());
}
