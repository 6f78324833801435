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
use crate::keys::{KeySets, keys_from_jwks};
use crate::metrics::{FetchLabels, Metrics};
use crate::snapshot::SnapshotStore;
use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_JWKS_BYTES: usize = 1 << 20;

struct Gate {
    /// The JWKS URL, once known (configured, or found by discovery).
    url: Option<String>,
    last_attempt: Option<Instant>,
}

struct Source {
    discovery_url: Option<String>,
    min_refetch: Duration,
    refresh: Duration,
    gate: tokio::sync::Mutex<Gate>,
}

/// The fetcher for every issuer with a JWKS endpoint.
pub struct JwksFetcher {
    client: HttpsClient,
    sources: HashMap<String, Source>,
    store: Arc<SnapshotStore>,
    metrics: Arc<Metrics>,
}

impl JwksFetcher {
    /// A fetcher for the issuers in `issuers` that have a `jwks_url` or `discovery_url`.
    pub fn new(issuers: &[IssuerConfig], store: Arc<SnapshotStore>, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .context("cannot load the system's root certificates for JWKS over https")?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let sources = issuers
            .iter()
            .filter(|i| i.jwks_url.is_some() || i.discovery_url.is_some())
            .map(|i| {
                let source = Source {
                    discovery_url: i.discovery_url.clone(),
                    min_refetch: Duration::from_millis(i.jwks_min_refetch_ms),
                    refresh: Duration::from_secs(i.jwks_refresh_secs.max(1)),
                    gate: tokio::sync::Mutex::new(Gate { url: i.jwks_url.clone(), last_attempt: None }),
                };
                (i.issuer.clone(), source)
            })
            .collect();
        Ok(JwksFetcher { client, sources, store, metrics })
    }

    /// Fetch every issuer's JWKS now (at start); the first error is returned, after all tried.
    pub async fn fetch_all(&self) -> anyhow::Result<()> {
        let mut first_error = None;
        for issuer in self.sources.keys() {
            if let Err(e) = self.fetch(issuer).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Fetch `issuer`'s JWKS now and publish it.
    pub async fn fetch(&self, issuer: &str) -> anyhow::Result<()> {
        let Some(source) = self.sources.get(issuer) else { bail!("issuer `{issuer}` has no JWKS endpoint") };
        let mut gate = source.gate.lock().await;
        self.fetch_locked(issuer, source, &mut gate).await
    }

    /// A token from `issuer` names `kid`, which the current snapshot lacks. Fetch (once, for
    /// all waiters, at most every `jwks_min_refetch_ms`) and say whether the key is now known.
    pub async fn resolve_unknown_kid(&self, issuer: &str, kid: &str) -> bool {
        let Some(source) = self.sources.get(issuer) else { return false };
        let mut gate = source.gate.lock().await;
        // Whoever held the gate before us may have fetched this very key.
        if self.store.load().keys.has_kid(issuer, kid) {
            return true;
        }
        if gate.last_attempt.is_some_and(|t| t.elapsed() < source.min_refetch) {
            return false;
        }
        let _ = self.fetch_locked(issuer, source, &mut gate).await;
        self.store.load().keys.has_kid(issuer, kid)
    }

    /// Refresh every issuer periodically until the process ends.
    pub fn spawn_refresh(self: &Arc<Self>) {
        for (issuer, source) in &self.sources {
            let (this, issuer, period) = (self.clone(), issuer.clone(), source.refresh);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(period).await;
                    if let Err(e) = this.fetch(&issuer).await {
                        tracing::warn!(issuer, error = format!("{e:#}"), "JWKS refresh failed; keeping the keys already known");
                    }
                }
            });
        }
    }

    async fn fetch_locked(&self, issuer: &str, source: &Source, gate: &mut Gate) -> anyhow::Result<()> {
        gate.last_attempt = Some(Instant::now());
        let result = self.fetch_and_publish(issuer, source, gate).await;
        let label = FetchLabels { issuer: issuer.to_owned(), result: if result.is_ok() { "ok" } else { "error" } };
        self.metrics.jwks_fetches.get_or_create(&label).inc();
        if let Err(e) = &result {
            tracing::warn!(issuer, error = format!("{e:#}"), "JWKS fetch failed");
        }
        result
    }

    async fn fetch_and_publish(&self, issuer: &str, source: &Source, gate: &mut Gate) -> anyhow::Result<()> {
        let url = match (&gate.url, &source.discovery_url) {
            (Some(url), _) => url.clone(),
            (None, Some(discovery)) => {
                let doc = self.get_json(&format!("{}/.well-known/openid-configuration", discovery.trim_end_matches('/'))).await?;
                let url = doc["jwks_uri"].as_str().context("the discovery document has no `jwks_uri`")?.to_owned();
                gate.url = Some(url.clone());
                url
            }
            (None, None) => bail!("issuer `{issuer}` has no JWKS endpoint"),
        };
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_value(self.get_json(&url).await?).with_context(|| format!("`{url}` did not return a JWKS"))?;
        let fetched = keys_from_jwks(&set, true)?;
        if fetched.is_empty() {
            bail!("`{url}` returned no keys; keeping the keys already known");
        }
        let published = self.store.update(|snapshot| {
            let mut issuers = snapshot.keys.issuers.clone();
            if let Some(current) = issuers.get(issuer) {
                let updated = Arc::new(current.with_fetched_keys(fetched));
                issuers.insert(issuer.to_owned(), updated);
            }
            snapshot.keys = Arc::new(KeySets { version: snapshot.keys.version + 1, issuers });
        });
        tracing::info!(issuer, key_set = published.keys.version, "published JWKS");
        Ok(())
    }

    async fn get_json(&self, url: &str) -> anyhow::Result<serde_json::Value> {
        let uri: hyper::Uri = url.parse().with_context(|| format!("invalid URL `{url}`"))?;
        // Keys over plain http could be replaced by anyone on the path; only loopback (a
        // local key server, the tests) may use it.
        let loopback = uri.host().is_some_and(|h| h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()));
        if uri.scheme_str() != Some("https") && !loopback {
            bail!("`{url}` is not https; keys are only fetched over https (or from loopback)");
        }
        let response = tokio::time::timeout(FETCH_TIMEOUT, self.client.get(uri))
            .await
            .with_context(|| format!("`{url}` timed out"))?
            .with_context(|| format!("cannot fetch `{url}`"))?;
        if !response.status().is_success() {
            bail!("`{url}` answered {}", response.status());
        }
        let body = tokio::time::timeout(FETCH_TIMEOUT, Limited::new(response.into_body(), MAX_JWKS_BYTES).collect())
            .await
            .with_context(|| format!("`{url}` timed out"))?
            .map_err(|e| anyhow::anyhow!("cannot read `{url}`: {e}"))?
            .to_bytes();
        serde_json::from_slice(&body).with_context(|| format!("`{url}` did not return JSON"))
    }
}
