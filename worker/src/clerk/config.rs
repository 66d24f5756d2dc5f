//! How the client talks to the API: the URL, the key, the timeout, the rate limit and the
//! retries, from the settings.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

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
}
