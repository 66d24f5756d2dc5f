//! A stand-in for the parts of Clerk's Backend API that reconcile reads (users, organizations and
//! organization memberships), served on a free port of this process, written from Clerk's
//! published description:
//! - `GET /v1/users`: a bare JSON array; `limit` 1–500 (default 10), `offset`, `order_by`
//!   `+created_at`/`-created_at` (default `-created_at`), and the `starting_after` cursor (a user
//!   id; needs `created_at` ordering and no offset, else 422);
//! - `GET /v1/users/count`: `{"object":"total_count","total_count":N}`;
//! - `GET /v1/users/{id}`: the user, or 404 with Clerk's error body (`resource_not_found`);
//! - `GET /v1/organizations` and `GET /v1/organization_memberships` (the instance's): `{"data":
//!   [...], "total_count": N}`, with the same `limit`, `offset` and `order_by` and no cursor;
//! - `GET /v1/organizations/{id}`: the organization, or 404 with Clerk's error body;
//! - `GET /v1/organizations/{id}/memberships`: `{"data", "total_count"}` of that organization's
//!   memberships, filtered by `user_id` (repeatable) when given; 404 when the organization is
//!   gone;
//! - `GET /v1/instance`: `{"object":"instance","id","environment_type",…}`, the instance the key
//!   belongs to: [`INSTANCE_ID`] unless the test sets another ([`ClerkApi::set_instance`]),
//!   `production` for a `sk_live_` key and `development` for any other;
//! - bearer auth: a missing or wrong key is 401 `authentication_invalid`.
//!
//! A test can make the next requests answer 429 (with `Retry-After`) or a 5xx, make every request
//! answer so until told otherwise ([`ClerkApi::go_down`], [`ClerkApi::throttle`]), slow every
//! answer down ([`ClerkApi::answer_after`]) or only the listings, make the listings fail from
//! some position on, rewrite the text of the answers (to serve what a `serde_json::Value` cannot
//! hold, like a lone surrogate escape), and read back every request served (all of them, or the
//! number per path with [`ClerkApi::calls`]).
//!
//! For the scale benchmarks it can also serve a million users or more without holding them:
//! [`ClerkApi::generate_users`] makes each user from its position when a page or a GET asks
//! for it.

mod generated;
mod routes;

pub use generated::generated_user_id;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix_web::dev::{ServerHandle, Service as _};
use actix_web::{App, HttpServer, web};
use serde_json::Value;

use routes::{
    count, get_organization, get_user, instance, list, list_memberships, list_memberships_of,
    list_organizations, membership_organization, not_found,
};

/// The instance id every stand-in's `GET /v1/instance` answers unless told otherwise
/// ([`ClerkApi::set_instance`]): the tests of one database that start several stand-ins see one
/// instance.
pub const INSTANCE_ID: &str = "ins_standin";

/// An answer forced on a request, whatever it asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 429 with `Retry-After: seconds`.
    RateLimited { retry_after: u64 },
    /// This status (e.g. 500, 502, 503) with Clerk's error body.
    Status(u16),
}

/// One request as the stand-in saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub path: String,
    pub query: String,
    pub status: u16,
    /// The `Clerk-API-Version` header, if any.
    pub api_version: Option<String>,
}

/// Objects keyed by (`created_at`, id): the order of `+created_at`, with ties broken by id.
type Key = (i64, String);

/// One kind of object, in listing order and by id.
#[derive(Default)]
struct Collection {
    objects: BTreeMap<Key, Value>,
    keys: HashMap<String, Key>,
}

impl Collection {
    /// Adds the object or replaces the one with its id. It needs a string `id`; `created_at`
    /// (milliseconds) orders the listing.
    fn put(&mut self, object: Value) {
        let id = object
            .get("id")
            .and_then(Value::as_str)
            .expect("a stand-in object needs a string id")
            .to_owned();
        let created_at = object
            .get("created_at")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let key = (created_at, id.clone());
        if let Some(old) = self.keys.insert(id, key.clone()) {
            self.objects.remove(&old);
        }
        self.objects.insert(key, object);
    }

    fn remove(&mut self, id: &str) {
        if let Some(key) = self.keys.remove(id) {
            self.objects.remove(&key);
        }
    }

    fn get(&self, id: &str) -> Option<&Value> {
        self.keys.get(id).and_then(|key| self.objects.get(key))
    }
}

#[derive(Default)]
struct State {
    users: Collection,
    organizations: Collection,
    memberships: Collection,
    faults: VecDeque<Fault>,
    failing_listing_from: Option<usize>,
    hidden: std::collections::HashSet<String>,
    /// Text replaced in every successful answer's body: (from, to).
    rewrites: Vec<(String, String)>,
    served: Vec<Served>,
    /// Answered to every request while set (after the injected faults).
    outage: Option<Fault>,
    /// How long every answer waits before it is made.
    latency: Duration,
    /// `GET /v1/instance`'s `id` and `environment_type`.
    instance: (String, String),
    /// How long each listing request waits before it answers.
    listing_delay: Duration,
    /// Users made from their position, served instead of `users` when set.
    generated: Option<generated::Generated>,
}

/// The running stand-in. Dropped, it stops.
pub struct ClerkApi {
    url: String,
    key: String,
    state: Arc<Mutex<State>>,
    handle: ServerHandle,
}

struct Shared {
    key: String,
    state: Arc<Mutex<State>>,
}

impl ClerkApi {
    /// Starts a stand-in that accepts `secret_key` as its bearer key.
    pub async fn start(secret_key: &str) -> Self {
        let environment = if secret_key.starts_with("sk_live_") {
            "production"
        } else {
            "development"
        };
        let state = Arc::new(Mutex::new(State {
            instance: (INSTANCE_ID.to_owned(), environment.to_owned()),
            ..State::default()
        }));
        let shared = web::Data::new(Shared {
            key: secret_key.to_owned(),
            state: state.clone(),
        });
        let delays = state.clone();
        let server = HttpServer::new(move || {
            let delays = delays.clone();
            App::new()
                .wrap_fn(move |request, service| {
                    let latency = lock(&delays).latency;
                    // The handler runs when the call is polled: after the wait.
                    let call = service.call(request);
                    async move {
                        if !latency.is_zero() {
                            tokio::time::sleep(latency).await;
                        }
                        call.await
                    }
                })
                .app_data(shared.clone())
                .route("/v1/instance", web::get().to(instance))
                .route("/v1/users", web::get().to(list))
                .route("/v1/users/count", web::get().to(count))
                .route("/v1/users/{id}", web::get().to(get_user))
                .route("/v1/organizations", web::get().to(list_organizations))
                .route("/v1/organizations/{id}", web::get().to(get_organization))
                .route(
                    "/v1/organizations/{id}/memberships",
                    web::get().to(list_memberships_of),
                )
                .route(
                    "/v1/organization_memberships",
                    web::get().to(list_memberships),
                )
                .default_service(web::to(not_found))
        })
        .workers(1)
        .disable_signals()
        .bind(("127.0.0.1", 0))
        .expect("bind the Clerk stand-in");
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            url: format!("http://127.0.0.1:{port}"),
            key: secret_key.to_owned(),
            state,
            handle,
        }
    }

    /// The base URL, for `CLERK_API_URL`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The key it accepts, for `CLERK_SECRET_KEY`.
    pub fn secret_key(&self) -> &str {
        &self.key
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Adds a user, or replaces the one with its id. It needs a string `id`; `created_at`
    /// (milliseconds) orders the listing.
    pub fn put_user(&self, user: Value) {
        self.state().stored_users().put(user);
    }

    /// Adds or replaces many users at once.
    pub fn put_users(&self, users: impl IntoIterator<Item = Value>) {
        let mut state = self.state();
        let stored = state.stored_users();
        for user in users {
            stored.put(user);
        }
    }

    /// Deletes a user, as deleting it in Clerk's dashboard would.
    pub fn delete_user(&self, id: &str) {
        self.state().stored_users().remove(id);
    }

    /// How many users it holds.
    pub fn user_count(&self) -> usize {
        self.state().user_count()
    }

    /// Serves `count` users made when asked: the user at position `p` (0-based, in the order
    /// of `+created_at`) is `user(p)` with its `id` set to [`generated_user_id`]`(p)`, so
    /// nothing but the function is held, whatever the count. `user` should give `created_at`
    /// values that grow with the position, as the listing's order is the positions' order.
    /// From then on the users are these alone: [`ClerkApi::put_user`] and
    /// [`ClerkApi::delete_user`] refuse.
    pub fn generate_users(
        &self,
        count: usize,
        user: impl Fn(usize) -> Value + Send + Sync + 'static,
    ) {
        self.state().generated = Some(generated::Generated::new(count, user));
    }

    /// Adds an organization, or replaces the one with its id (like [`ClerkApi::put_user`]).
    pub fn put_organization(&self, organization: Value) {
        self.state().organizations.put(organization);
    }

    /// Adds or replaces many organizations at once.
    pub fn put_organizations(&self, organizations: impl IntoIterator<Item = Value>) {
        let mut state = self.state();
        for organization in organizations {
            state.organizations.put(organization);
        }
    }

    /// Deletes an organization and its memberships, as Clerk does.
    pub fn delete_organization(&self, id: &str) {
        let mut state = self.state();
        state.organizations.remove(id);
        let members: Vec<String> = state
            .memberships
            .objects
            .values()
            .filter(|membership| membership_organization(membership) == Some(id))
            .filter_map(|membership| membership.get("id").and_then(Value::as_str))
            .map(str::to_owned)
            .collect();
        for membership in members {
            state.memberships.remove(&membership);
        }
    }

    /// Adds a membership (Clerk's OrganizationMembership JSON, with its `organization`
    /// snapshot and `public_user_data.user_id`), or replaces the one with its id.
    pub fn put_membership(&self, membership: Value) {
        self.state().memberships.put(membership);
    }

    /// Adds or replaces many memberships at once.
    pub fn put_memberships(&self, memberships: impl IntoIterator<Item = Value>) {
        let mut state = self.state();
        for membership in memberships {
            state.memberships.put(membership);
        }
    }

    /// Removes a member from an organization, by membership id.
    pub fn delete_membership(&self, id: &str) {
        self.state().memberships.remove(id);
    }

    /// The next requests, whatever they ask, get these answers, one each, in order.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state().faults.extend(faults);
    }

    /// Every listing request (of users, organizations or memberships) that starts at or beyond
    /// `position` (0-based, in the listing's order) answers 500, however often it is tried: a
    /// listing that fails part-way.
    pub fn fail_listing_from(&self, position: usize) {
        self.state().failing_listing_from = Some(position);
    }

    /// Leaves an object (a user, an organization or a membership) out of its listing while its
    /// own GET still finds it, as an offset walk does when objects before it are deleted
    /// meanwhile.
    pub fn hide_from_listing(&self, id: &str) {
        self.state().hidden.insert(id.to_owned());
    }

    /// From now on, replaces `from` by `to` in the text of every successful answer: e.g. a
    /// marker placed in a user's field by a lone surrogate escape (the six characters `\ud800`),
    /// which no `serde_json::Value` can hold.
    pub fn rewrite_answers(&self, from: &str, to: &str) {
        self.state().rewrites.push((from.to_owned(), to.to_owned()));
    }

    /// Every request from now on answers 503 (after any injected faults), as an outage of the
    /// Backend API does, until [`ClerkApi::come_back`].
    pub fn go_down(&self) {
        self.state().outage = Some(Fault::Status(503));
    }

    /// Every request from now on answers 429 with `Retry-After: retry_after`, until
    /// [`ClerkApi::come_back`].
    pub fn throttle(&self, retry_after: u64) {
        self.state().outage = Some(Fault::RateLimited { retry_after });
    }

    /// Ends [`ClerkApi::go_down`] and [`ClerkApi::throttle`].
    pub fn come_back(&self) {
        self.state().outage = None;
    }

    /// Every answer from now on waits this long before it is made (zero: none).
    pub fn answer_after(&self, latency: Duration) {
        self.state().latency = latency;
    }

    /// How many requests for exactly this path (no query) were served, whatever the answer.
    pub fn calls(&self, path: &str) -> usize {
        self.state()
            .served
            .iter()
            .filter(|served| served.path == path)
            .count()
    }

    /// Every request served so far, oldest first.
    pub fn served(&self) -> Vec<Served> {
        self.state().served.clone()
    }

    /// Makes `GET /v1/instance` answer this id and environment type (`development` or
    /// `production`): a stand-in of another instance.
    pub fn set_instance(&self, id: &str, environment_type: &str) {
        self.state().instance = (id.to_owned(), environment_type.to_owned());
    }

    /// Makes every listing request wait this long before it answers, so a run lasts.
    pub fn slow_listings(&self, delay: Duration) {
        self.state().listing_delay = delay;
    }
}

impl Drop for ClerkApi {
    fn drop(&mut self) {
        // Sends the stop at once; the returned future only waits for it to finish.
        drop(self.handle.stop(false));
    }
}

impl State {
    /// The users put one by one; refused once they are generated.
    fn stored_users(&mut self) -> &mut Collection {
        assert!(
            self.generated.is_none(),
            "the stand-in's users are generated: they cannot be put or deleted one by one"
        );
        &mut self.users
    }

    /// How many users it serves.
    fn user_count(&self) -> usize {
        match &self.generated {
            Some(generated) => generated.count,
            None => self.users.objects.len(),
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    match state.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}
