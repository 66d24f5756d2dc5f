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

mod limiter;
mod pages;

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;

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

/// How the client talks to the API. `Debug` never shows the key.
#[derive(Debug, Clone)]
pub struct ClerkConfig {
    /// `CLERK_API_URL`, e.g. `https://api.clerk.com`.
    pub api_url: String,
    /// `CLERK_SECRET_KEY`.
    pub secret_key: SecretString,
    /// `CLERK_API_TIMEOUT_MS`: the limit of one request, connection and body included.
    pub timeout: Duration,
    /// `CLERK_API_RATE_LIMIT` requests per [`RATE_WINDOW`] at most; unset, by the key's kind
    /// ([`default_rate_limit`]).
    pub rate_limit: u32,
    /// Retries of a 5xx, a timeout or a connection failure before the call fails.
    pub retries: usize,
    /// The first back-off step of those retries; doubled each time, with jitter, up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
}

/// The window of `CLERK_API_RATE_LIMIT`, the one Clerk's own limits are stated in.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Clerk's Backend API limit per instance, by the kind of the key: 1000 requests per 10 s for a
/// production instance (`sk_live_…`), 100 for a development one (`sk_test_…`); a key of neither
/// kind gets the smaller.
pub fn default_rate_limit(secret_key: &SecretString) -> u32 {
    if secret_key.expose_secret().trim().starts_with("sk_live_") {
        1000
    } else {
        100
    }
}

impl ClerkConfig {
    /// Production defaults around an API URL and a key: 30 s timeout, the rate limit of the
    /// key's kind ([`default_rate_limit`]), five retries from 500 ms up to 30 s.
    pub fn new(api_url: impl Into<String>, secret_key: SecretString) -> Self {
        Self {
            api_url: api_url.into(),
            rate_limit: default_rate_limit(&secret_key),
            secret_key,
            timeout: Duration::from_secs(30),
            retries: 5,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
        }
    }

    /// From the loaded settings: `CLERK_SECRET_KEY` (required), `CLERK_API_URL`,
    /// `CLERK_API_RATE_LIMIT`, `CLERK_API_TIMEOUT_MS`.
    pub fn from_settings(settings: &shared::Settings) -> Result<Self, shared::ConfigError> {
        let secret_key = settings.clerk_secret_key()?;
        let api_url = settings
            .clerk_api_url
            .trim()
            .trim_end_matches('/')
            .to_owned();
        if reqwest::Url::parse(&api_url).is_err() {
            return Err(shared::ConfigError::Malformed {
                variable: "CLERK_API_URL",
                reason: "not a URL like https://api.clerk.com".into(),
            });
        }
        if settings.clerk_api_rate_limit == Some(0) {
            return Err(shared::ConfigError::Malformed {
                variable: "CLERK_API_RATE_LIMIT",
                reason: "must be at least 1".into(),
            });
        }
        if settings.clerk_api_timeout_ms == 0 {
            return Err(shared::ConfigError::Malformed {
                variable: "CLERK_API_TIMEOUT_MS",
                reason: "must be at least 1".into(),
            });
        }
        let by_key = Self::new(api_url, secret_key);
        Ok(Self {
            rate_limit: settings.clerk_api_rate_limit.unwrap_or(by_key.rate_limit),
            timeout: Duration::from_millis(settings.clerk_api_timeout_ms),
            ..by_key
        })
    }
}

/// Why a call to the Backend API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClerkError {
    /// 401 or 403: the key is wrong, revoked or lacks access.
    #[error(
        "{call}: {status}{}: check CLERK_SECRET_KEY (the secret key of the instance to reconcile)",
        clerk_reason(.code, .message)
    )]
    Unauthorized {
        call: String,
        status: StatusCode,
        code: Option<String>,
        message: Option<String>,
    },
    /// A status that retrying does not change (4xx other than 401, 403, 404 and 429).
    #[error("{call}: {status}{}", clerk_reason(.code, .message))]
    Rejected {
        call: String,
        status: StatusCode,
        code: Option<String>,
        message: Option<String>,
    },
    /// 5xx, timeouts or connection failures that outlasted the retries, or 429s that kept coming.
    #[error("{call}: gave up after {attempts} attempts: {last}")]
    GaveUp {
        call: String,
        attempts: u32,
        last: String,
    },
    /// The rate limit was reached, for an impatient client: Clerk answered 429, or the shared
    /// client-side limit (`CLERK_API_RATE_LIMIT`) has no room soon enough.
    #[error("{call}: rate limited, next request possible in {} ms", retry_after.as_millis())]
    RateLimited { call: String, retry_after: Duration },
    /// A 2xx whose body is not what the API describes.
    #[error("{call}: unexpected answer: {reason}")]
    Decode { call: String, reason: String },
    /// The request could not even be built or sent (e.g. a malformed URL).
    #[error("{call}: {reason}")]
    Request { call: String, reason: String },
}

fn clerk_reason(code: &Option<String>, message: &Option<String>) -> String {
    match (code, message) {
        (Some(code), Some(message)) => format!(" ({code}: {message})"),
        (Some(code), None) => format!(" ({code})"),
        (None, Some(message)) => format!(" ({message})"),
        (None, None) => String::new(),
    }
}

/// Clerk's error body: `{"errors": [{"message", "long_message", "code", "meta"}], "clerk_trace_id"}`.
#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
}

#[derive(Debug, Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

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
    serde_json::from_str::<Id>(object.get()).ok()?.id
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
        let error = serde_json::from_slice::<ErrorBody>(&body).unwrap_or_default();
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

/// A transport error in one line with its causes (reqwest's own line hides them), without the
/// URL.
fn transport_error(error: reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "transport error"
    };
    let error = error.without_url();
    let mut line = kind.to_owned();
    let mut cause: Option<&dyn std::error::Error> = Some(&error);
    while let Some(current) = cause {
        line.push_str(": ");
        line.push_str(&current.to_string());
        cause = current.source();
    }
    line
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
    serde_json::from_slice(&body).map_err(|error| ClerkError::Decode {
        call: call.into(),
        reason: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_defaults_by_the_kind_of_key_and_the_setting_overrides_it() {
        let settings = |key: &str, limit: Option<u32>| shared::Settings {
            clerk_secret_key: Some(key.to_owned().into()),
            clerk_api_rate_limit: limit,
            ..shared::Settings::default()
        };
        let limit = |key, setting| {
            ClerkConfig::from_settings(&settings(key, setting))
                .expect("valid")
                .rate_limit
        };
        assert_eq!(limit("sk_live_abc", None), 1000);
        assert_eq!(limit("sk_test_abc", None), 100);
        assert_eq!(limit("something_else", None), 100);
        assert_eq!(limit("sk_live_abc", Some(250)), 250);
        assert_eq!(limit("sk_test_abc", Some(250)), 250);
        let line = ClerkConfig::from_settings(&settings("sk_live_abc", Some(0)))
            .expect_err("zero")
            .to_string();
        assert!(line.contains("CLERK_API_RATE_LIMIT"), "{line}");
    }

    #[test]
    fn a_config_never_shows_its_key() {
        let config = ClerkConfig::new("https://api.clerk.com", "sk_test_hunter2".into());
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn an_unauthorized_error_names_the_call_the_code_and_the_setting() {
        let error = ClerkError::Unauthorized {
            call: "GET /v1/users/count".into(),
            status: StatusCode::UNAUTHORIZED,
            code: Some("authentication_invalid".into()),
            message: Some("Invalid authentication".into()),
        };
        assert_eq!(
            error.to_string(),
            "GET /v1/users/count: 401 Unauthorized (authentication_invalid: Invalid \
             authentication): check CLERK_SECRET_KEY (the secret key of the instance to reconcile)"
        );
    }
}
