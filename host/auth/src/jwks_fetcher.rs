//! Fetching issuers' JWKS: at start, periodically, and when a token names an unknown `kid`.
//!
//! - **Single flight**: one fetch per issuer at a time; requests waiting on an unknown `kid`
//!   queue behind it and, once it lands, find the key without fetching again.
//! - **Rate limit**: after an attempt, unknown-`kid` fetches wait `jwks_min_refetch_ms`, so
//!   tokens with random `kid`s cannot make Sandgate hammer the issuer.
//! - **Stale keys kept**: a failed fetch changes nothing; the keys already known keep working.
//! - **Failures are not answers**: a failed fetch is never remembered as "no such key"; the
//!   next attempt after the interval fetches again.
//! - Each successful fetch publishes a new snapshot with a new key-set version.

use crate::config::IssuerConfig;
use crate::keys::{Key, KeyError, KeySets, keys_from_jwks};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where fetched keys go: the server's snapshot store. The fetcher reads the current key sets
/// to see whether a `kid` is known, publishes an issuer's fetched keys as a new key-set
/// version, and reports every fetch's outcome (for metrics).
pub trait KeyStore: Send + Sync {
    /// The key sets of the current snapshot.
    fn key_sets(&self) -> Arc<KeySets>;
    /// Replace `issuer`'s JWKS-endpoint keys with `keys`; returns the new key-set version.
    fn publish_fetched(&self, issuer: &str, keys: Vec<Key>) -> u64;
    /// A fetch for `issuer` finished, successfully or not.
    fn fetch_finished(&self, issuer: &str, ok: bool);
}

/// Why a JWKS could not be fetched. The keys already known keep working.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The issuer has neither `jwks_url` nor `discovery_url`.
    #[error("issuer `{0}` has no JWKS endpoint")]
    NoEndpoint(String),
    /// A URL that does not parse.
    #[error("invalid URL `{0}`")]
    Url(String, #[source] hyper::http::uri::InvalidUri),
    /// A URL over plain http to a host that is not loopback.
    #[error("`{0}` is not https; keys are only fetched over https (or from loopback)")]
    NotHttps(String),
    /// No answer in time.
    #[error("`{0}` timed out")]
    Timeout(String),
    /// The request failed.
    #[error("cannot fetch `{0}`")]
    Request(String, #[source] hyper_util::client::legacy::Error),
    /// A non-2xx answer.
    #[error("`{0}` answered {1}")]
    Status(String, hyper::StatusCode),
    /// The body could not be read (or was larger than 1 MiB).
    #[error("cannot read `{0}`: {1}")]
    Body(String, String),
    /// The body is not the JSON expected.
    #[error("`{0}` did not return {1}")]
    NotJson(String, &'static str, #[source] serde_json::Error),
    /// The discovery document names another issuer.
    #[error("the discovery document for `{0}` names issuer {1}")]
    DiscoveryIssuer(String, String),
    /// The discovery document names no JWKS.
    #[error("the discovery document has no `jwks_uri`")]
    NoJwksUri,
    /// The JWKS has no usable key.
    #[error("`{0}` returned no usable keys; keeping the keys already known")]
    Keys(String, #[source] KeyError),
    /// The system's root certificates could not be loaded.
    #[error("cannot load the system's root certificates for JWKS over https")]
    Roots(#[source] std::io::Error),
}

/// Clears an issuer's in-flight marker when dropped.
struct ClearInflight<'a>(&'a JwksFetcher, &'a str);

impl Drop for ClearInflight<'_> {
    fn drop(&mut self) {
        self.0.clear_inflight(self.1);
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_JWKS_BYTES: usize = 1 << 20;

struct Gate {
    /// The JWKS URL, once known (configured, or found by discovery).
    url: Option<String>,
    last_attempt: Option<Instant>,
}

struct Source {
    /// The fetch started for an unknown `kid`, if one is running: every waiter watches it.
    inflight: std::sync::Mutex<Option<tokio::sync::watch::Receiver<bool>>>,
    discovery_url: Option<String>,
    min_refetch: Duration,
    refresh: Duration,
    gate: tokio::sync::Mutex<Gate>,
}

/// The fetcher for every issuer with a JWKS endpoint.
pub struct JwksFetcher {
    client: HttpsClient,
    sources: HashMap<String, Source>,
    store: Arc<dyn KeyStore>,
}

impl JwksFetcher {
    /// A fetcher for the issuers in `issuers` that have a `jwks_url` or `discovery_url`.
    pub fn new(issuers: &[IssuerConfig], store: Arc<dyn KeyStore>) -> Result<Self, FetchError> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(FetchError::Roots)?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let sources = issuers
            .iter()
            .filter(|i| i.jwks_url.is_some() || i.discovery_url.is_some())
            .map(|i| {
                let source = Source {
                    inflight: std::sync::Mutex::new(None),
                    discovery_url: i.discovery_url.clone(),
                    min_refetch: Duration::from_millis(i.jwks_min_refetch_ms),
                    refresh: Duration::from_secs(i.jwks_refresh_secs.max(1)),
                    gate: tokio::sync::Mutex::new(Gate { url: i.jwks_url.clone(), last_attempt: None }),
                };
                (i.issuer.clone(), source)
            })
            .collect();
        Ok(JwksFetcher { client, sources, store })
    }

    /// Fetch every issuer's JWKS now (at start); the first error is returned, after all tried.
    pub async fn fetch_all(&self) -> Result<(), FetchError> {
        let mut first_error = None;
        for issuer in self.sources.keys() {
            if let Err(e) = self.fetch(issuer).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Fetch `issuer`'s JWKS now and publish it.
    pub async fn fetch(&self, issuer: &str) -> Result<(), FetchError> {
        let Some(source) = self.sources.get(issuer) else { return Err(FetchError::NoEndpoint(issuer.to_owned())) };
        let mut gate = source.gate.lock().await;
        self.fetch_locked(issuer, source, &mut gate).await
    }

    /// A token from `issuer` names `kid`, which the current snapshot lacks. Fetch (once, for
    /// all waiters, at most every `jwks_min_refetch_ms`) and say whether the key is now known.
    ///
    /// The fetch runs in a task of its own: a waiter that gives up (its check's deadline, a
    /// proxy closing the connection) stops waiting, never the fetch, so a slow identity
    /// provider's rotated key still arrives for the next check. The fetch is bounded by its own
    /// timeouts, and its outcome is logged and counted like every fetch.
    pub async fn resolve_unknown_kid(self: &Arc<Self>, issuer: &str, kid: &str) -> bool {
        let Some(source) = self.sources.get(issuer) else { return false };
        if self.store.key_sets().has_kid(issuer, kid) {
            return true;
        }
        let mut done = {
            let mut inflight = source.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match &*inflight {
                Some(done) => done.clone(),
                None => {
                    let (finished, done) = tokio::sync::watch::channel(false);
                    *inflight = Some(done.clone());
                    let (this, issuer, kid) = (self.clone(), issuer.to_owned(), kid.to_owned());
                    tokio::spawn(async move {
                        // Cleared however the task ends (a panic, the runtime shutting down), so
                        // a later unknown kid can start a fetch again.
                        let _clear = ClearInflight(&this, &issuer);
                        this.fetch_for_unknown_kid(&issuer, &kid).await;
                        let _ = finished.send(true);
                    });
                    done
                }
            }
        };
        let _ = done.wait_for(|finished| *finished).await;
        self.store.key_sets().has_kid(issuer, kid)
    }

    fn clear_inflight(&self, issuer: &str) {
        if let Some(source) = self.sources.get(issuer) {
            source.inflight.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    async fn fetch_for_unknown_kid(&self, issuer: &str, kid: &str) {
        let Some(source) = self.sources.get(issuer) else { return };
        let mut gate = source.gate.lock().await;
        // Whoever held the gate before may have fetched this very key.
        if self.store.key_sets().has_kid(issuer, kid) {
            return;
        }
        if gate.last_attempt.is_some_and(|t| t.elapsed() < source.min_refetch) {
            tracing::debug!(issuer, "unknown kid: a fetch ran less than jwks_min_refetch_ms ago");
            return;
        }
        let _ = self.fetch_locked(issuer, source, &mut gate).await;
    }

    /// Refresh every issuer periodically on `tasks` until `stop` is cancelled.
    pub fn spawn_refresh(
        self: &Arc<Self>,
        tasks: &tokio_util::task::TaskTracker,
        stop: &tokio_util::sync::CancellationToken,
    ) {
        for (issuer, source) in &self.sources {
            let (this, issuer, period, stop) = (self.clone(), issuer.clone(), source.refresh, stop.clone());
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(period) => {}
                    }
                    if let Err(e) = this.fetch(&issuer).await {
                        tracing::warn!(issuer, error = %crate::error_chain(&e), "JWKS refresh failed; keeping the keys already known");
                    }
                }
            });
        }
    }

    async fn fetch_locked(&self, issuer: &str, source: &Source, gate: &mut Gate) -> Result<(), FetchError> {
        gate.last_attempt = Some(Instant::now());
        let result = self.fetch_and_publish(issuer, source, gate).await;
        self.store.fetch_finished(issuer, result.is_ok());
        if let Err(e) = &result {
            tracing::warn!(issuer, error = %crate::error_chain(e), "JWKS fetch failed");
        }
        result
    }

    async fn fetch_and_publish(&self, issuer: &str, source: &Source, gate: &mut Gate) -> Result<(), FetchError> {
        let url = match (&gate.url, &source.discovery_url) {
            (Some(url), _) => url.clone(),
            (None, Some(discovery)) => {
                let doc = self
                    .get_json(&format!("{}/.well-known/openid-configuration", discovery.trim_end_matches('/')))
                    .await?;
                // OpenID Connect Discovery §4.3: the document must name the issuer asked for.
                if doc["issuer"].as_str() != Some(issuer) {
                    return Err(FetchError::DiscoveryIssuer(issuer.to_owned(), doc["issuer"].to_string()));
                }
                let url = doc["jwks_uri"].as_str().ok_or(FetchError::NoJwksUri)?.to_owned();
                gate.url = Some(url.clone());
                url
            }
            (None, None) => return Err(FetchError::NoEndpoint(issuer.to_owned())),
        };
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(self.get_json(&url).await?)
            .map_err(|e| FetchError::NotJson(url.clone(), "a JWKS", e))?;
        // An empty set is the provider saying it has no keys now: published as such. A set
        // whose keys are all unusable is an error, and the keys already known stay.
        let fetched = keys_from_jwks(&set, true).map_err(|e| FetchError::Keys(url.clone(), e))?;
        let key_set = self.store.publish_fetched(issuer, fetched);
        tracing::info!(issuer, key_set, "published JWKS");
        Ok(())
    }

    async fn get_json(&self, url: &str) -> Result<serde_json::Value, FetchError> {
        let uri: hyper::Uri = url.parse().map_err(|e| FetchError::Url(url.to_owned(), e))?;
        // Keys over plain http could be replaced by anyone on the path; only loopback (a
        // local key server, the tests) may use it.
        let loopback = uri
            .host()
            .is_some_and(|h| h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()));
        if uri.scheme_str() != Some("https") && !loopback {
            return Err(FetchError::NotHttps(url.to_owned()));
        }
        let response = tokio::time::timeout(FETCH_TIMEOUT, self.client.get(uri))
            .await
            .map_err(|_| FetchError::Timeout(url.to_owned()))?
            .map_err(|e| FetchError::Request(url.to_owned(), e))?;
        if !response.status().is_success() {
            return Err(FetchError::Status(url.to_owned(), response.status()));
        }
        let body = tokio::time::timeout(FETCH_TIMEOUT, Limited::new(response.into_body(), MAX_JWKS_BYTES).collect())
            .await
            .map_err(|_| FetchError::Timeout(url.to_owned()))?
            .map_err(|e| FetchError::Body(url.to_owned(), e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| FetchError::NotJson(url.to_owned(), "JSON", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Issuer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const ISSUER: &str = "https://issuer.test";
    /// The EC P-256 public key of RFC 7517, Appendix A.1.
    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"ec-1","alg":"ES256","use":"sig",
        "x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}]}"#;

    struct Store(std::sync::Mutex<Arc<KeySets>>);

    impl KeyStore for Store {
        fn key_sets(&self) -> Arc<KeySets> {
            self.0.lock().unwrap().clone()
        }

        fn publish_fetched(&self, issuer: &str, keys: Vec<Key>) -> u64 {
            let mut current = self.0.lock().unwrap();
            *current = Arc::new(current.with_issuer(issuer, |i| i.with_fetched_keys(keys)));
            current.version
        }

        fn fetch_finished(&self, _: &str, _: bool) {}
    }

    /// A JWKS endpoint that answers every request after `delay`.
    async fn slow_jwks(delay: Duration) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = stream.read(&mut request).await;
                    tokio::time::sleep(delay).await;
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{JWKS}",
                        JWKS.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn a_waiter_giving_up_does_not_cancel_the_fetch() {
        let url = slow_jwks(Duration::from_millis(300)).await;
        let config = IssuerConfig {
            issuer: ISSUER.into(),
            audiences: Vec::new(),
            algorithms: vec!["ES256".into()],
            leeway_secs: 0,
            keys: Vec::new(),
            jwks_url: Some(url),
            discovery_url: None,
            jwks_refresh_secs: 300,
            jwks_min_refetch_ms: 10_000,
            jwks_max_stale_secs: None,
        };
        let issuer = Issuer::from_config(&config).unwrap();
        let keys = KeySets { version: 1, issuers: HashMap::from([(ISSUER.to_owned(), Arc::new(issuer))]) };
        let store = Arc::new(Store(std::sync::Mutex::new(Arc::new(keys))));
        let fetcher = Arc::new(JwksFetcher::new(std::slice::from_ref(&config), store.clone()).unwrap());
        // The check waiting for the key gives up long before the provider answers.
        let waited = tokio::time::timeout(Duration::from_millis(50), fetcher.resolve_unknown_kid(ISSUER, "ec-1")).await;
        assert!(waited.is_err());
        // The fetch goes on and publishes the key for the next check.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !store.key_sets().has_kid(ISSUER, "ec-1") {
            assert!(Instant::now() < deadline, "the fetch was cancelled with its waiter");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(fetcher.resolve_unknown_kid(ISSUER, "ec-1").await);
    }
}
