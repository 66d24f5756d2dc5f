//! A typed client for the parts of Clerk's Backend API that reconcile reads.
//!
//! Every request carries the pinned `Clerk-API-Version`, the bearer key and a timeout, and passes
//! a client-side rate limit first. The retry policy:
//! - 429 is waited out for as long as its `Retry-After` says (a bounded number of times in a
//!   row), and does not use up the retries below;
//! - 5xx, timeouts and connection failures are retried with exponential back-off and jitter, a
//!   bounded number of times, then the call fails;
//! - 401 and 403 stop at once: the key is wrong, missing or of no use, and waiting will not fix it;
//! - any other status fails the call with Clerk's error code.
//!
//! A client someone is waiting for ([`ClerkClient::impatient`], the on-demand sync API) draws on
//! the same rate limit, but waits for it only so long, answers a 429 at once with
//! [`ClerkError::RateLimited`], and retries a failure only once, quickly.
//!
//! Errors name the call (`GET /v1/users`), the status and Clerk's `errors[0].code`; never the key.

mod config;
mod error;
mod limiter;
mod pages;

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;

pub use config::{ClerkConfig, RATE_WINDOW, default_rate_limit};
pub use error::ClerkError;
use error::{ErrorBody, clerk_reason, transport_error};
use limiter::RateLimiter;
pub use pages::{OffsetPages, UserPages};

/// The Backend API version every request pins, so a change of Clerk's default never changes what
/// this client reads.
pub const API_VERSION: &str = "2025-11-10";

/// The largest page Clerk serves.
pub const MAX_PAGE: u32 = 500;

/// How many 429 answers in a row one call waits out before it fails.
const RATE_LIMITED_IN_A_ROW: u32 = 20;

/// The longest `Retry-After` honoured as given; a longer one is waited this long and asked again.
const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(60);

/// `GET /v1/instance`: the instance a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct KeyInstance {
    /// `ins_…`, the `instance_id` of the instance's webhook events.
    pub id: String,
    /// `development` or `production`.
    pub environment_type: String,
}

#[derive(Debug, Deserialize)]
struct TotalCount {
    total_count: u64,
}

/// A page of the listings that answer `{"data": [...], "total_count": N}`.
#[derive(Debug, Deserialize)]
struct DataPage {
    data: Vec<Box<RawValue>>,
    total_count: u64,
}

/// The `id` of an object as Clerk wrote it, read without building the rest of it.
pub fn object_id(object: &RawValue) -> Option<String> {
    #[derive(Deserialize)]
    struct Id {
        id: Option<String>,
    }
    shared::json::from_slice::<Id>(object.get().as_bytes())
        .ok()?
        .id
}

/// One answer that is neither a success nor final.
enum Retry {
    /// 429: wait this long, then ask again.
    After(Duration, String),
    /// 5xx, timeout, connection: back off, then ask again.
    BackOff(String),
}

/// How a client takes being held back.
#[derive(Debug, Clone, Copy)]
enum Patience {
    /// Waits for the rate limit and waits out 429s (a reconcile).
    Waits,
    /// Waits for the rate limit at most this long, and answers a 429 at once (a request someone
    /// is waiting for).
    AtMost(Duration),
}

/// The Backend API client. Cheap to share by reference; one rate limit per client and the
/// clients made from it by [`ClerkClient::impatient`].
pub struct ClerkClient {
    http: reqwest::Client,
    config: ClerkConfig,
    limiter: Arc<RateLimiter>,
    patience: Patience,
}

impl ClerkClient {
    pub fn new(config: ClerkConfig) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("clerk-sync/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let limiter = Arc::new(RateLimiter::new(config.rate_limit, RATE_WINDOW));
        Ok(Self {
            http,
            config,
            limiter,
            patience: Patience::Waits,
        })
    }

    /// A client for calls someone is waiting for, on the same rate limit and connections as
    /// this one: it waits for the limit at most `patience` (else [`ClerkError::RateLimited`]
    /// with the time until there is room), answers Clerk's 429 at once the same way, gives each
    /// request at most `patience`, and retries a 5xx, a timeout or a connection failure once.
    pub fn impatient(&self, patience: Duration) -> Self {
        Self {
            http: self.http.clone(),
            config: ClerkConfig {
                timeout: self.config.timeout.min(patience),
                retries: 1,
                retry_base: Duration::from_millis(50),
                retry_max: Duration::from_millis(200),
                ..self.config.clone()
            },
            limiter: self.limiter.clone(),
            patience: Patience::AtMost(patience),
        }
    }

    /// `GET /v1/instance`: the instance the key belongs to.
    pub async fn instance(&self) -> Result<KeyInstance, ClerkError> {
        let call = "GET /v1/instance";
        let body = self.get(call, "/v1/instance", &[]).await?;
        decode(call, &body)
    }

    /// `GET /v1/users/count`: how many users the instance holds.
    pub async fn count_users(&self) -> Result<u64, ClerkError> {
        let call = "GET /v1/users/count";
        let body = self.get(call, "/v1/users/count", &[]).await?;
        Ok(decode::<TotalCount>(call, &body)?.total_count)
    }

    /// `GET /v1/users/{id}`: the user as Clerk holds it, or `None` when Clerk answers 404.
    pub async fn user(&self, id: &str) -> Result<Option<Value>, ClerkError> {
        self.get_found("GET /v1/users/{id}", &["v1", "users", id], &[])
            .await
    }

    /// `GET /v1/organizations/{id}`: the organization as Clerk holds it, or `None` when Clerk
    /// answers 404 (deleted).
    pub async fn organization(&self, id: &str) -> Result<Option<Value>, ClerkError> {
        self.get_found(
            "GET /v1/organizations/{id}",
            &["v1", "organizations", id],
            &[],
        )
        .await
    }

    /// `GET /v1/organizations/{id}/memberships?user_id=…`: the memberships Clerk holds for this
    /// organization and user (at most one), or `None` when the organization is gone (404). No
    /// endpoint reads a single membership by its id: this is the narrowest question.
    pub async fn memberships_of(
        &self,
        organization_id: &str,
        user_id: &str,
    ) -> Result<Option<Vec<Value>>, ClerkError> {
        let call = "GET /v1/organizations/{id}/memberships";
        let query = [("user_id", user_id.to_owned()), ("limit", "10".to_owned())];
        let found = self
            .get_found(
                call,
                &["v1", "organizations", organization_id, "memberships"],
                &query,
            )
            .await?;
        // Read from a value already parsed, so not as raw text like the listings' pages.
        #[derive(Deserialize)]
        struct Memberships {
            data: Vec<Value>,
        }
        found
            .map(serde_json::from_value::<Memberships>)
            .transpose()
            .map(|page| page.map(|page| page.data))
            .map_err(|error| ClerkError::Decode {
                call: call.into(),
                reason: error.to_string(),
            })
    }

    /// `GET /v1/organizations/{id}/memberships`, every page: all the memberships of the
    /// organization, or `None` when Clerk answers 404 (the organization is gone).
    pub async fn organization_memberships(
        &self,
        organization_id: &str,
    ) -> Result<Option<Vec<Value>>, ClerkError> {
        let call = "GET /v1/organizations/{id}/memberships";
        #[derive(Deserialize)]
        struct Page {
            data: Vec<Value>,
        }
        let mut memberships = Vec::new();
        loop {
            let query = [
                ("limit", MAX_PAGE.to_string()),
                ("offset", memberships.len().to_string()),
                ("order_by", "+created_at".to_owned()),
            ];
            let Some(found) = self
                .get_found(
                    call,
                    &["v1", "organizations", organization_id, "memberships"],
                    &query,
                )
                .await?
            else {
                return Ok(None);
            };
            let page =
                serde_json::from_value::<Page>(found).map_err(|error| ClerkError::Decode {
                    call: call.into(),
                    reason: error.to_string(),
                })?;
            let last = page.data.len() < MAX_PAGE as usize;
            memberships.extend(page.data);
            if last {
                return Ok(Some(memberships));
            }
        }
    }

    /// A GET of one resource by path segments (escaped); `None` when Clerk answers 404.
    async fn get_found(
        &self,
        call: &str,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<Option<Value>, ClerkError> {
        let mut url = self.url("")?;
        url.path_segments_mut()
            .map_err(|()| ClerkError::Request {
                call: call.into(),
                reason: "CLERK_API_URL cannot take a path".into(),
            })?
            .pop_if_empty()
            .extend(segments);
        match self.send(call, url, query).await {
            Ok(body) => decode(call, &body).map(Some),
            Err(Answer::NotFound) => Ok(None),
            Err(Answer::Failed(error)) => Err(error),
        }
    }

    /// Every user, oldest first, as pages of at most `limit` users (see [`UserPages`]).
    pub fn users(&self, limit: u32) -> UserPages<'_> {
        UserPages {
            client: self,
            limit: limit.clamp(1, MAX_PAGE),
            cursor: None,
            done: false,
        }
    }

    /// Every organization, oldest first, as pages of at most `limit` (see [`OffsetPages`]).
    pub fn organizations(&self, limit: u32) -> OffsetPages<'_> {
        OffsetPages::new(self, "GET /v1/organizations", "/v1/organizations", limit)
    }

    /// Every organization membership of the instance, oldest first, as pages of at most
    /// `limit` (see [`OffsetPages`]).
    pub fn memberships(&self, limit: u32) -> OffsetPages<'_> {
        OffsetPages::new(
            self,
            "GET /v1/organization_memberships",
            "/v1/organization_memberships",
            limit,
        )
    }

    async fn get(
        &self,
        call: &str,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Vec<u8>, ClerkError> {
        let url = self.url(path)?;
        match self.send(call, url, query).await {
            Ok(body) => Ok(body),
            Err(Answer::NotFound) => Err(ClerkError::Rejected {
                call: call.into(),
                status: StatusCode::NOT_FOUND,
                code: None,
                message: None,
            }),
            Err(Answer::Failed(error)) => Err(error),
        }
    }

    fn url(&self, path: &str) -> Result<reqwest::Url, ClerkError> {
        reqwest::Url::parse(&format!("{}{path}", self.config.api_url)).map_err(|error| {
            ClerkError::Request {
                call: path.into(),
                reason: format!("CLERK_API_URL does not make a URL: {error}"),
            }
        })
    }

    /// Sends a GET under the rate limit and the retry policy of this module.
    async fn send(
        &self,
        call: &str,
        url: reqwest::Url,
        query: &[(&str, String)],
    ) -> Result<Vec<u8>, Answer> {
        let backoff = shared::Backoff {
            base: self.config.retry_base,
            max: self.config.retry_max,
        };
        // Retries of failures (not of 429s, which wait as told) so far.
        let mut backed_off = 0_usize;
        let mut attempts = 0;
        let mut rate_limited = 0;
        loop {
            match self.patience {
                Patience::Waits => self.limiter.acquire().await,
                Patience::AtMost(longest) => {
                    if let Err(retry_after) = self.limiter.acquire_within(longest).await {
                        return Err(Answer::Failed(ClerkError::RateLimited {
                            call: call.into(),
                            retry_after,
                        }));
                    }
                }
            }
            attempts += 1;
            let retry = match self.attempt(call, url.clone(), query).await {
                Ok(body) => return Ok(body),
                Err(Attempt::Final(answer)) => return Err(answer),
                Err(Attempt::Retry(retry)) => retry,
            };
            let (delay, last) = match retry {
                Retry::After(delay, _) if matches!(self.patience, Patience::AtMost(_)) => {
                    return Err(Answer::Failed(ClerkError::RateLimited {
                        call: call.into(),
                        retry_after: delay,
                    }));
                }
                Retry::After(delay, last) => {
                    rate_limited += 1;
                    if rate_limited > RATE_LIMITED_IN_A_ROW {
                        return Err(Answer::Failed(ClerkError::GaveUp {
                            call: call.into(),
                            attempts,
                            last,
                        }));
                    }
                    (delay, last)
                }
                Retry::BackOff(last) => {
                    rate_limited = 0;
                    backed_off += 1;
                    if backed_off > self.config.retries {
                        return Err(Answer::Failed(ClerkError::GaveUp {
                            call: call.into(),
                            attempts,
                            last,
                        }));
                    }
                    let retry = u32::try_from(backed_off).unwrap_or(u32::MAX);
                    (backoff.jittered_delay(retry), last)
                }
            };
            tracing::warn!(call, attempt = attempts, error = %last, next_attempt_in = ?delay, "Backend API call failed, retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(
        &self,
        call: &str,
        url: reqwest::Url,
        query: &[(&str, String)],
    ) -> Result<Vec<u8>, Attempt> {
        let response = self
            .http
            .get(url)
            .query(query)
            .timeout(self.config.timeout)
            .bearer_auth(self.config.secret_key.expose_secret())
            .header("Clerk-API-Version", API_VERSION)
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(error) if error.is_builder() => {
                return Err(Attempt::Final(Answer::Failed(ClerkError::Request {
                    call: call.into(),
                    reason: error.without_url().to_string(),
                })));
            }
            // Timeouts, refused or reset connections: worth another try.
            Err(error) => {
                return Err(Attempt::Retry(Retry::BackOff(transport_error(error))));
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = match response.bytes().await {
            Ok(body) => body.to_vec(),
            Err(error) => return Err(Attempt::Retry(Retry::BackOff(transport_error(error)))),
        };
        if status.is_success() {
            return Ok(body);
        }
        let error = shared::json::from_slice::<ErrorBody>(&body).unwrap_or_default();
        let first = error.errors.into_iter().next();
        let (code, message) = first.map_or((None, None), |e| (e.code, e.message));
        let described = format!("{status}{}", clerk_reason(&code, &message));
        Err(match status {
            StatusCode::TOO_MANY_REQUESTS => Attempt::Retry(Retry::After(
                retry_after
                    .unwrap_or(Duration::from_secs(1))
                    .min(LONGEST_RETRY_AFTER),
                described,
            )),
            StatusCode::NOT_FOUND => Attempt::Final(Answer::NotFound),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Attempt::Final(Answer::Failed(ClerkError::Unauthorized {
                    call: call.into(),
                    status,
                    code,
                    message,
                }))
            }
            status if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT => {
                Attempt::Retry(Retry::BackOff(described))
            }
            status => Attempt::Final(Answer::Failed(ClerkError::Rejected {
                call: call.into(),
                status,
                code,
                message,
            })),
        })
    }
}

/// How one attempt ended, when it did not succeed.
enum Attempt {
    Final(Answer),
    Retry(Retry),
}

/// How a call ended, when it did not succeed: 404 is an answer the caller may want.
enum Answer {
    NotFound,
    Failed(ClerkError),
}

/// Reads an answer's body without what Postgres cannot store (see [`shared::sanitize`]): a lone
/// surrogate in any object would make serde_json refuse the whole body where it builds strings.
fn decode<T: DeserializeOwned>(call: &str, body: &[u8]) -> Result<T, ClerkError> {
    let body = shared::sanitize::strip_unstorable(body);
    shared::json::from_slice(&body).map_err(|error| ClerkError::Decode {
        call: call.into(),
        reason: error.to_string(),
    })
}
