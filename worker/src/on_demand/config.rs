//! The on-demand sync API's settings.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;
use shared::{ConfigError, Settings};

use crate::clerk::ClerkConfig;

/// The on-demand sync API's settings. `Debug` never shows the token.
#[derive(Debug, Clone)]
pub struct OnDemandConfig {
    /// `WORKER_API_TOKEN`.
    pub token: SecretString,
    /// `WORKER_API_LISTEN`: an address of its own, or `None` for the worker's `WORKER_LISTEN`.
    pub listen: Option<SocketAddr>,
    /// `WORKER_API_TIMEOUT_MS`.
    pub timeout: Duration,
    /// `WORKER_API_REUSE_MS`.
    pub reuse: Duration,
    /// The Backend API (`CLERK_SECRET_KEY`, `CLERK_API_URL`, `CLERK_API_RATE_LIMIT`, …).
    pub clerk: ClerkConfig,
}

impl OnDemandConfig {
    /// `None` when `WORKER_API_TOKEN` is unset or blank; an error naming the variable when a
    /// setting is malformed, or when `CLERK_SECRET_KEY` is missing.
    pub fn from_settings(settings: &Settings) -> Result<Option<Self>, ConfigError> {
        let Some(token) = settings.worker_api_token() else {
            return Ok(None);
        };
        let listen = match settings
            .worker_api_listen
            .as_deref()
            .map(str::trim)
            .filter(|text| !text.is_empty())
        {
            None => None,
            Some(text) => Some(text.parse().map_err(|error| ConfigError::Malformed {
                variable: "WORKER_API_LISTEN",
                reason: format!("not an address like 0.0.0.0:3002 ({error})"),
            })?),
        };
        if settings.worker_api_timeout_ms == 0 {
            return Err(ConfigError::Malformed {
                variable: "WORKER_API_TIMEOUT_MS",
                reason: "must be at least 1".into(),
            });
        }
        Ok(Some(Self {
            token,
            listen,
            timeout: Duration::from_millis(settings.worker_api_timeout_ms),
            reuse: Duration::from_millis(settings.worker_api_reuse_ms),
            clerk: ClerkConfig::from_settings(settings)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(token: Option<&str>) -> Settings {
        Settings {
            worker_api_token: token.map(Into::into),
            clerk_secret_key: Some("sk_test_1".into()),
            ..Settings::default()
        }
    }

    #[test]
    fn the_api_is_off_without_a_token_and_on_with_one() {
        assert!(
            OnDemandConfig::from_settings(&settings(None))
                .expect("off")
                .is_none()
        );
        assert!(
            OnDemandConfig::from_settings(&settings(Some("  ")))
                .expect("off")
                .is_none()
        );
        let config = OnDemandConfig::from_settings(&settings(Some("s3cret-token")))
            .expect("valid")
            .expect("on");
        assert_eq!(config.listen, None);
        assert_eq!(config.timeout, Duration::from_secs(5));
        assert_eq!(config.reuse, Duration::from_secs(2));
        assert!(!format!("{config:?}").contains("s3cret-token"));
    }

    #[test]
    fn malformed_settings_and_a_missing_key_are_named() {
        let line = |settings: Settings| {
            OnDemandConfig::from_settings(&settings)
                .expect_err("refused")
                .to_string()
        };
        let no_key = Settings {
            clerk_secret_key: None,
            ..settings(Some("t"))
        };
        assert!(line(no_key).contains("CLERK_SECRET_KEY"));
        let listen = Settings {
            worker_api_listen: Some("port 3002".into()),
            ..settings(Some("t"))
        };
        assert!(line(listen).contains("WORKER_API_LISTEN"));
        let timeout = Settings {
            worker_api_timeout_ms: 0,
            ..settings(Some("t"))
        };
        assert!(line(timeout).contains("WORKER_API_TIMEOUT_MS"));
    }
}
