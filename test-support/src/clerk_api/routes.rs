//! The stand-in's routes: the gate every request passes (key, faults, outage), the listings
//! and their pages, and the single objects.

use std::ops::Bound;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};

use super::{Collection, Fault, Served, Shared, State, lock};

/// 200 with `body` as JSON, its text rewritten as the test asked.
fn ok_json(state: &State, body: &Value) -> HttpResponse {
    let mut text = body.to_string();
    for (from, to) in &state.rewrites {
        text = text.replace(from.as_str(), to);
    }
    HttpResponse::Ok()
        .content_type("application/json")
        .body(text)
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
    let fault = state.faults.pop_front().or_else(|| state.outage.clone());
    let answer = match fault {
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

/// The query parameters of a request, repeated ones kept (`user_id` may be).
type Params = web::Query<Vec<(String, String)>>;

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// Answers through the gate, records the answer.
fn answer(
    request: &HttpRequest,
    shared: &Shared,
    respond: impl FnOnce(&State) -> HttpResponse,
) -> HttpResponse {
    if let Some(answer) = gate(request, shared) {
        return answer;
    }
    let mut state = lock(&shared.state);
    let answer = respond(&state);
    record(&mut state, request, answer.status());
    answer
}

/// Waits as [`ClerkApi::slow_listings`] says.
async fn listing_delay(shared: &Shared) {
    let delay = lock(&shared.state).listing_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

pub(super) async fn instance(request: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    answer(&request, &shared, |state| {
        let (id, environment_type) = &state.instance;
        HttpResponse::Ok().json(json!({
            "object": "instance", "id": id, "environment_type": environment_type,
            "allowed_origins": null, "workspace_id": null,
        }))
    })
}

pub(super) async fn list(
    request: HttpRequest,
    shared: web::Data<Shared>,
    params: Params,
) -> HttpResponse {
    listing_delay(&shared).await;
    answer(&request, &shared, |state| {
        let page = match &state.generated {
            Some(generated) => generated.page(state, &params).map(|page| json!(page)),
            None => page(state, &state.users, &params, true).map(|page| json!(page)),
        };
        match page {
            Ok(page) => ok_json(state, &page),
            Err((status, code, message)) => error(status, code, message),
        }
    })
}

pub(super) async fn list_organizations(
    request: HttpRequest,
    shared: web::Data<Shared>,
    params: Params,
) -> HttpResponse {
    listing_delay(&shared).await;
    answer(&request, &shared, |state| {
        data_page(state, &state.organizations, &params)
    })
}

pub(super) async fn list_memberships(
    request: HttpRequest,
    shared: web::Data<Shared>,
    params: Params,
) -> HttpResponse {
    listing_delay(&shared).await;
    answer(&request, &shared, |state| {
        data_page(state, &state.memberships, &params)
    })
}

/// `{"data": [...], "total_count": N}` of a listing without a cursor.
fn data_page(state: &State, collection: &Collection, params: &[(String, String)]) -> HttpResponse {
    match page(state, collection, params, false) {
        Ok(page) => ok_json(
            state,
            &json!({"data": page, "total_count": collection.objects.len()}),
        ),
        Err((status, code, message)) => error(status, code, message),
    }
}

/// Why a listing request is refused: the status and Clerk's error code and message.
pub(super) type Refusal = (StatusCode, &'static str, &'static str);

/// What a listing request asks: `limit`, `offset`, `order_by` and (where a cursor is allowed)
/// `starting_after`.
pub(super) struct Listing<'a> {
    pub(super) limit: usize,
    pub(super) offset: usize,
    pub(super) ascending: bool,
    pub(super) after: Option<&'a str>,
}

impl<'a> Listing<'a> {
    pub(super) fn read(params: &'a [(String, String)], cursor: bool) -> Result<Self, Refusal> {
        let invalid = |message| {
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                "form_param_value_invalid",
                message,
            )
        };
        let limit = match param(params, "limit").map(str::parse::<usize>) {
            None => 10,
            Some(Ok(limit)) if (1..=500).contains(&limit) => limit,
            Some(_) => return Err(invalid("limit must be between 1 and 500")),
        };
        let offset = match param(params, "offset").map(str::parse::<usize>) {
            None => 0,
            Some(Ok(offset)) => offset,
            Some(Err(_)) => return Err(invalid("offset must be a number")),
        };
        let ascending = match param(params, "order_by") {
            None | Some("-created_at") => false,
            Some("+created_at" | "created_at") => true,
            Some(_) => return Err(invalid("order_by is not supported by this stand-in")),
        };
        let after = param(params, "starting_after").filter(|_| cursor);
        if after.is_some() && offset > 0 {
            return Err(invalid(
                "starting_after cannot be combined with a non-zero offset",
            ));
        }
        Ok(Self {
            limit,
            offset,
            ascending,
            after,
        })
    }
}

/// The answer to a listing request that starts at `start` (0-based, in the listing's order):
/// 500 when the test made the listing fail from there on.
pub(super) fn failing_from(state: &State, start: usize) -> Result<(), Refusal> {
    if state
        .failing_listing_from
        .is_some_and(|position| start >= position)
    {
        return Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_clerk_error",
            "Something went wrong",
        ));
    }
    Ok(())
}

/// The 404 of a cursor that names no user.
pub(super) const UNKNOWN_CURSOR: Refusal = (
    StatusCode::NOT_FOUND,
    "resource_not_found",
    "starting_after names no user",
);

/// One page of a listing, by `limit`, `offset`, `order_by` and (where `cursor` is allowed)
/// `starting_after`.
fn page<'a>(
    state: &State,
    collection: &'a Collection,
    params: &[(String, String)],
    cursor: bool,
) -> Result<Vec<&'a Value>, Refusal> {
    let Listing {
        limit,
        offset,
        ascending,
        after,
    } = Listing::read(params, cursor)?;
    let objects = &collection.objects;
    // Where the page starts in the listing's order, and the objects from there on.
    let (start, rest): (usize, Box<dyn Iterator<Item = &Value>>) = match after {
        Some(id) => {
            let Some(key) = collection.keys.get(id) else {
                return Err(UNKNOWN_CURSOR);
            };
            if ascending {
                let start = objects.range(..=key.clone()).count();
                let range = objects.range((Bound::Excluded(key.clone()), Bound::Unbounded));
                (start, Box::new(range.map(|(_, object)| object)))
            } else {
                let start = objects.range(key.clone()..).count();
                let range = objects.range(..key.clone()).rev();
                (start, Box::new(range.map(|(_, object)| object)))
            }
        }
        None if ascending => (offset, Box::new(objects.values().skip(offset))),
        None => (offset, Box::new(objects.values().rev().skip(offset))),
    };
    failing_from(state, start)?;
    Ok(rest
        .filter(|object| {
            let id = object.get("id").and_then(Value::as_str).unwrap_or_default();
            !state.hidden.contains(id)
        })
        .take(limit)
        .collect())
}

pub(super) async fn count(request: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    answer(&request, &shared, |state| {
        HttpResponse::Ok().json(json!({"object": "total_count", "total_count": state.user_count()}))
    })
}

pub(super) async fn get_user(
    request: HttpRequest,
    shared: web::Data<Shared>,
    id: web::Path<String>,
) -> HttpResponse {
    answer(&request, &shared, |state| match &state.generated {
        Some(generated) => found(state, generated.get(&id).as_ref()),
        None => found(state, state.users.get(&id)),
    })
}

pub(super) async fn get_organization(
    request: HttpRequest,
    shared: web::Data<Shared>,
    id: web::Path<String>,
) -> HttpResponse {
    answer(&request, &shared, |state| {
        found(state, state.organizations.get(&id))
    })
}

/// The organization's memberships, of the `user_id`s given (each may carry a `+`), paginated by
/// `limit` and `offset`.
pub(super) async fn list_memberships_of(
    request: HttpRequest,
    shared: web::Data<Shared>,
    id: web::Path<String>,
    params: Params,
) -> HttpResponse {
    answer(&request, &shared, |state| {
        if state.organizations.get(&id).is_none() {
            return found(state, None);
        }
        let users: Vec<&str> = params
            .iter()
            .filter(|(key, _)| key == "user_id")
            .map(|(_, value)| value.trim_start_matches('+'))
            .collect();
        let members: Vec<&Value> = state
            .memberships
            .objects
            .values()
            .filter(|membership| membership_organization(membership) == Some(id.as_str()))
            .filter(|membership| {
                let user = membership
                    .pointer("/public_user_data/user_id")
                    .and_then(Value::as_str);
                users.is_empty() || user.is_some_and(|user| users.contains(&user))
            })
            .collect();
        let limit = param(&params, "limit")
            .and_then(|limit| limit.parse().ok())
            .unwrap_or(10);
        let offset = param(&params, "offset")
            .and_then(|offset| offset.parse().ok())
            .unwrap_or(0);
        let data: Vec<&Value> = members.iter().skip(offset).take(limit).copied().collect();
        ok_json(state, &json!({"data": data, "total_count": members.len()}))
    })
}

pub(super) fn membership_organization(membership: &Value) -> Option<&str> {
    membership
        .pointer("/organization/id")
        .and_then(Value::as_str)
}

/// The object, or 404 with Clerk's error body.
fn found(state: &State, object: Option<&Value>) -> HttpResponse {
    match object {
        Some(object) => ok_json(state, object),
        None => error(StatusCode::NOT_FOUND, "resource_not_found", "not found"),
    }
}

pub(super) async fn not_found(request: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    let mut state = lock(&shared.state);
    let answer = error(StatusCode::NOT_FOUND, "resource_not_found", "not found");
    record(&mut state, &request, answer.status());
    answer
}
