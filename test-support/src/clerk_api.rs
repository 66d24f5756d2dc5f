//! A stand-in for the users part of Clerk's Backend API, served on a free port of this process,
//! written from Clerk's published description:
//! - `GET /v1/users`: a bare JSON array; `limit` 1–500 (default 10), `offset`, `order_by`
//!   `+created_at`/`-created_at` (default `-created_at`), and the `starting_after` cursor (a user
//!   id; needs `created_at` ordering and no offset, else 422);
//! - `GET /v1/users/count`: `{"object":"total_count","total_count":N}`;
//! - `GET /v1/users/{id}`: the user, or 404 with Clerk's error body (`resource_not_found`);
//! - bearer auth: a missing or wrong key is 401 `authentication_invalid`.
//!
//! A test can make the next requests answer 429 (with `Retry-After`) or a 5xx, make the listing
//! fail from some position on, and read back every request served.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::{Value, json};

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

/// Users keyed by (`created_at`, id): the order of `+created_at`, with ties broken by id.
type Key = (i64, String);

#[derive(Default)]
struct State {
    users: BTreeMap<Key, Value>,
    keys: HashMap<String, Key>,
    faults: VecDeque<Fault>,
    failing_listing_from: Option<usize>,
    hidden: std::collections::HashSet<String>,
    served: Vec<Served>,
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
        let state = Arc::new(Mutex::new(State::default()));
        let shared = web::Data::new(Shared {
            key: secret_key.to_owned(),
            state: state.clone(),
        });
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .route("/v1/users", web::get().to(list))
                .route("/v1/users/count", web::get().to(count))
                .route("/v1/users/{id}", web::get().to(get_one))
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
        let mut state = self.state();
        put(&mut state, user);
    }

    /// Adds or replaces many users at once.
    pub fn put_users(&self, users: impl IntoIterator<Item = Value>) {
        let mut state = self.state();
        for user in users {
            put(&mut state, user);
        }
    }

    /// Deletes a user, as deleting it in Clerk's dashboard would.
    pub fn delete_user(&self, id: &str) {
        let mut state = self.state();
        if let Some(key) = state.keys.remove(id) {
            state.users.remove(&key);
        }
    }

    /// How many users it holds.
    pub fn user_count(&self) -> usize {
        self.state().users.len()
    }

    /// The next requests, whatever they ask, get these answers, one each, in order.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state().faults.extend(faults);
    }

    /// Every listing request that starts at or beyond `position` (0-based, in the listing's
    /// order) answers 500, however often it is tried: a listing that fails part-way.
    pub fn fail_listing_from(&self, position: usize) {
        self.state().failing_listing_from = Some(position);
    }

    /// Leaves a user out of the listing while its own GET still finds it, as an offset walk
    /// does when users before it are deleted meanwhile.
    pub fn hide_from_listing(&self, id: &str) {
        self.state().hidden.insert(id.to_owned());
    }

    /// Every request served so far, oldest first.
    pub fn served(&self) -> Vec<Served> {
        self.state().served.clone()
    }
}

impl Drop for ClerkApi {
    fn drop(&mut self) {
        // Sends the stop at once; the returned future only waits for it to finish.
        drop(self.handle.stop(false));
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    match state.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn put(state: &mut State, user: Value) {
    let id = user
        .get("id")
        .and_then(Value::as_str)
        .expect("a stand-in user needs a string id")
        .to_owned();
    let created_at = user.get("created_at").and_then(Value::as_i64).unwrap_or(0);
    let key = (created_at, id.clone());
    if let Some(old) = state.keys.insert(id, key.clone()) {
        state.users.remove(&old);
    }
    state.users.insert(key, user);
}

/// Clerk's error body.
fn error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(json!({
        "errors": [{"message": message, "long_message": message, "code": code, "meta": {}}],
        "clerk_trace_id": "trace_stand_in"
    }))
}

/// Records the request, then answers the first of: an injected fault, a failed bearer check.
fn gate(request: &HttpRequest, shared: &Shared) -> Option<HttpResponse> {
    let mut state = lock(&shared.state);
    let expected = format!("Bearer {}", shared.key);
    let authorized = request
        .headers()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        == Some(expected.as_str());
    let answer = match state.faults.pop_front() {
        Some(Fault::RateLimited { retry_after }) => Some(
            HttpResponse::TooManyRequests()
                .insert_header(("Retry-After", retry_after.to_string()))
                .json(json!({"errors": [{"message": "Too many requests",
                    "long_message": "Too many requests, retry later", "code": "too_many_requests"}]})),
        ),
        Some(Fault::Status(status)) => Some(error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "internal_clerk_error",
            "Something went wrong",
        )),
        None if !authorized => Some(error(
            StatusCode::UNAUTHORIZED,
            "authentication_invalid",
            "Invalid authentication",
        )),
        None => None,
    };
    if let Some(answer) = &answer {
        record(&mut state, request, answer.status());
    }
    answer
}

fn record(state: &mut State, request: &HttpRequest, status: StatusCode) {
    state.served.push(Served {
        path: request.path().to_owned(),
        query: request.query_string().to_owned(),
        status: status.as_u16(),
        api_version: request
            .headers()
            .get("clerk-api-version")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned),
    });
}

async fn list(
    request: HttpRequest,
    shared: web::Data<Shared>,
    query: web::Query<HashMap<String, String>>,
) -> HttpResponse {
    if let Some(answer) = gate(&request, &shared) {
        return answer;
    }
    let mut state = lock(&shared.state);
    let answer = list_page(&state, &query);
    record(&mut state, &request, answer.status());
    answer
}

fn list_page(state: &State, query: &HashMap<String, String>) -> HttpResponse {
    let invalid = |message: &str| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "form_param_value_invalid",
            message,
        )
    };
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => 10,
        Some(Ok(limit)) if (1..=500).contains(&limit) => limit,
        Some(_) => return invalid("limit must be between 1 and 500"),
    };
    let offset = match query.get("offset").map(|o| o.parse::<usize>()) {
        None => 0,
        Some(Ok(offset)) => offset,
        Some(Err(_)) => return invalid("offset must be a number"),
    };
    let ascending = match query.get("order_by").map(String::as_str) {
        None | Some("-created_at") => false,
        Some("+created_at" | "created_at") => true,
        Some(_) => return invalid("order_by is not supported by this stand-in"),
    };
    let cursor = query.get("starting_after");
    if cursor.is_some() && offset > 0 {
        return invalid("starting_after cannot be combined with a non-zero offset");
    }
    // Where the page starts in the listing's order, and the users from there on.
    let (start, rest): (usize, Box<dyn Iterator<Item = &Value>>) = match cursor {
        Some(id) => {
            let Some(key) = state.keys.get(id) else {
                return error(
                    StatusCode::NOT_FOUND,
                    "resource_not_found",
                    "starting_after names no user",
                );
            };
            if ascending {
                let start = state.users.range(..=key.clone()).count();
                let range = state
                    .users
                    .range((Bound::Excluded(key.clone()), Bound::Unbounded));
                (start, Box::new(range.map(|(_, user)| user)))
            } else {
                let start = state.users.range(key.clone()..).count();
                let range = state.users.range(..key.clone()).rev();
                (start, Box::new(range.map(|(_, user)| user)))
            }
        }
        None if ascending => (offset, Box::new(state.users.values().skip(offset))),
        None => (offset, Box::new(state.users.values().rev().skip(offset))),
    };
    if state
        .failing_listing_from
        .is_some_and(|position| start >= position)
    {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_clerk_error",
            "Something went wrong",
        );
    }
    let page: Vec<&Value> = rest
        .filter(|user| {
            let id = user.get("id").and_then(Value::as_str).unwrap_or_default();
            !state.hidden.contains(id)
        })
        .take(limit)
        .collect();
    HttpResponse::Ok().json(page)
}

async fn count(request: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    if let Some(answer) = gate(&request, &shared) {
        return answer;
    }
    let mut state = lock(&shared.state);
    let answer =
        HttpResponse::Ok().json(json!({"object": "total_count", "total_count": state.users.len()}));
    record(&mut state, &request, answer.status());
    answer
}

async fn get_one(
    request: HttpRequest,
    shared: web::Data<Shared>,
    id: web::Path<String>,
) -> HttpResponse {
    if let Some(answer) = gate(&request, &shared) {
        return answer;
    }
    let mut state = lock(&shared.state);
    let user = state
        .keys
        .get(id.as_str())
        .and_then(|key| state.users.get(key));
    let answer = match user {
        Some(user) => HttpResponse::Ok().json(user),
        None => error(StatusCode::NOT_FOUND, "resource_not_found", "not found"),
    };
    record(&mut state, &request, answer.status());
    answer
}

async fn not_found(request: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    let mut state = lock(&shared.state);
    let answer = error(StatusCode::NOT_FOUND, "resource_not_found", "not found");
    record(&mut state, &request, answer.status());
    answer
}
