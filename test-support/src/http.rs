//! An HTTP/1.1 client for the services' endpoints, and reading a Prometheus series.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// How long one request may take before the test fails.
const TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<String>,
    pub body: String,
}

impl Answer {
    /// The body as JSON; fails the test when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("JSON answer: {self:?}"))
    }
}

/// A client that keeps its connections alive between requests. Works on any Tokio runtime,
/// `#[actix_web::test]`'s included.
#[derive(Clone)]
pub struct Client {
    inner: HyperClient<HttpConnector, Full<Bytes>>,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Self {
        Self {
            inner: HyperClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// POSTs a JSON `body` with `headers`; `Err` when no answer came (refused, reset, timed out).
    pub async fn try_post(
        &self,
        url: &str,
        headers: &[(String, String)],
        body: &[u8],
    ) -> anyhow::Result<Answer> {
        let mut request = hyper::Request::post(url).header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request.body(Full::new(Bytes::copy_from_slice(body)))?;
        self.send(request).await
    }

    /// GETs `url`; `Err` when no answer came.
    pub async fn try_get(&self, url: &str) -> anyhow::Result<Answer> {
        self.try_get_with(url, &[]).await
    }

    /// GETs `url` with `headers`; `Err` when no answer came.
    pub async fn try_get_with(
        &self,
        url: &str,
        headers: &[(String, String)],
    ) -> anyhow::Result<Answer> {
        let mut request = hyper::Request::get(url);
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        self.send(request.body(Full::new(Bytes::new()))?).await
    }

    async fn send(&self, request: hyper::Request<Full<Bytes>>) -> anyhow::Result<Answer> {
        let exchange = async {
            let response = self.inner.request(request).await?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok(Answer {
                status,
                retry_after,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {TIMEOUT:?}"))?
    }
}

/// POSTs a JSON `body` with `headers` on a connection of its own; fails the test without an
/// answer.
pub async fn post(url: &str, headers: &[(String, String)], body: &[u8]) -> Answer {
    Client::new()
        .try_post(url, headers, body)
        .await
        .unwrap_or_else(|error| panic!("POST {url}: {error:#}"))
}

/// GETs `url` on a connection of its own: the status and body, or status 0 and the error when
/// no answer came (a service not listening yet, say).
pub async fn get(url: &str) -> (u16, String) {
    match Client::new().try_get(url).await {
        Ok(answer) => (answer.status, answer.body),
        Err(error) => (0, format!("{error:#}")),
    }
}

/// The value of a metric line such as `clerk_sync_ingest_requests_total{outcome="accepted"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}
