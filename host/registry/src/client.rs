//! Pulling and pushing policy modules: one [`Registry`] per process, holding the clients, the
//! credentials and the cache.
//!
//! A pull verifies everything it reads: the manifest against the digest it was asked for (or,
//! for a tag, the digest the registry reports, which is then pinned), the module layer against
//! the digest and size in the manifest, and the size against [`RegistrySettings::max_module_bytes`]
//! before and while it downloads. Only verified bytes enter the cache, so nothing half-pulled
//! is ever loaded.

use crate::cache::{Cache, SignatureProof, sha256_digest};
use crate::reference::ModuleRef;
use base64::Engine;
use bytes::Bytes;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// The config media type of the CNCF Wasm artifact layout, which `sandgate push` writes.
pub const WASM_CONFIG_V0: &str = "application/vnd.wasm.config.v0+json";
/// The config media type Kubewarden (`kwctl`) and wasm-to-oci write.
pub const WASM_CONFIG_V1: &str = "application/vnd.wasm.config.v1+json";
/// The module layer's media type in the CNCF Wasm artifact layout.
pub const WASM_LAYER: &str = "application/wasm";
/// The older module layer media type of Kubewarden and wasm-to-oci, accepted on pull.
pub const WASM_LAYER_LEGACY: &str = "application/vnd.wasm.content.layer.v1+wasm";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Largest manifest read from the cache (a policy artifact's is well under 1 KiB).
const MAX_MANIFEST: u64 = 1 << 20;

/// Credentials for one registry.
#[derive(Clone)]
pub enum Credentials {
    /// HTTP basic authentication, or the user and password offered to the registry's token
    /// service when it answers with a bearer challenge.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// A bearer token presented as it is.
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            Credentials::Bearer(_) => write!(f, "Bearer(***)"),
        }
    }
}

/// How to reach registries and where to cache what they serve.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// The content-addressed cache; `None`: nothing is cached.
    pub cache_dir: Option<PathBuf>,
    /// Never contact a registry: only cached artifacts (a tag by the digest it last resolved to).
    pub offline: bool,
    /// Largest module layer pulled.
    pub max_module_bytes: u64,
    /// Registries (`host:port`) reached over plain HTTP.
    pub plain_http: Vec<String>,
    /// Reach loopback registries (`localhost`, `127.0.0.0/8`, `[::1]`) over plain HTTP unless
    /// listed in `tls`.
    pub loopback_plain_http: bool,
    /// Registries reached over TLS even when they are loopback.
    pub tls: Vec<String>,
    /// Extra trusted root certificates (PEM), for registries with a private CA.
    pub ca_pem: Vec<Vec<u8>>,
    /// Credentials by registry (`host:port`); anonymous for the others.
    pub credentials: HashMap<String, Credentials>,
    /// Connect timeout, and the longest wait for any read.
    pub timeout: Duration,
    /// The longest a whole pull (manifest, signatures, layer) may take.
    pub pull_deadline: Duration,
    /// Registries (`host:port`) modules may come from; empty: any.
    pub allowed_registries: Vec<String>,
    /// Cosign public keys (PEM); when any is set, a module is pulled only if one of them signed
    /// its manifest digest (cosign's `.sig` tag layout).
    pub cosign_keys: Vec<Vec<u8>>,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        RegistrySettings {
            cache_dir: None,
            offline: false,
            max_module_bytes: 32 << 20,
            plain_http: Vec::new(),
            loopback_plain_http: true,
            tls: Vec::new(),
            ca_pem: Vec::new(),
            credentials: HashMap::new(),
            timeout: Duration::from_secs(30),
            pull_deadline: Duration::from_secs(120),
            allowed_registries: Vec::new(),
            cosign_keys: Vec::new(),
        }
    }
}

/// Why a module could not be pulled or pushed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry has no such tag, digest or repository.
    #[error("`{0}` is not in the registry")]
    NotFound(String),
    /// The registry refused the credentials, or wants some and none are configured.
    #[error("the registry `{0}` refused access: check the credentials configured for it")]
    Unauthorized(String),
    /// The registry could not be reached or failed on its side.
    #[error("the registry `{0}` is unreachable or failing")]
    Unreachable(String, #[source] OciDistributionError),
    /// The artifact is something other than one Wasm module.
    #[error("`{reference}` is not a Wasm policy artifact: {reason}")]
    NotWasm {
        /// The reference pulled.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// Bytes that do not hash to the digest they were fetched by.
    #[error("`{reference}`: the {what} does not match its digest (expected `{expected}`, got `{actual}`)")]
    DigestMismatch {
        /// The reference pulled.
        reference: String,
        /// `manifest` or `module layer`.
        what: &'static str,
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        actual: String,
    },
    /// A module layer over the size limit.
    #[error("`{reference}`: the module layer is over the {limit}-byte limit ({size} bytes)")]
    TooLarge {
        /// The reference pulled.
        reference: String,
        /// Its size, as announced or as far as it was read.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Offline, and the artifact is not cached.
    #[error("`{0}` is not in the cache, and registries are not contacted (offline)")]
    NotCached(String),
    /// Pushing needs a tag to push to.
    #[error("`{0}` names no tag to push to")]
    NoTag(String),
    /// Any other failure of the registry protocol.
    #[error("`{0}`: the registry call failed")]
    Registry(String, #[source] OciDistributionError),
    /// The registry is not one the settings allow modules from.
    #[error("modules are not pulled from `{0}`: it is not in [registry] allowed_registries")]
    NotAllowed(String),
    /// A pull took longer than its deadline (a registry that answers too slowly).
    #[error("the registry `{0}` did not deliver within {1:?}")]
    Deadline(String, Duration),
    /// Signatures are required and none by a configured key covers the manifest.
    #[error("`{reference}` has no valid cosign signature by a configured key: {reason}")]
    Unsigned {
        /// The reference pulled.
        reference: String,
        /// What was found instead.
        reason: String,
    },
    /// A configured CA certificate or cosign key cannot be used.
    #[error("the registry settings are not usable: {0}")]
    Setup(String),
}

impl RegistryError {
    /// Whether the failure is the registry being unreachable (not a refusal or bad content):
    /// the case where a tag may fall back to the digest it last resolved to.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, RegistryError::Unreachable(..) | RegistryError::Deadline(..))
    }
}

/// Where a pulled module came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Fetched from the registry now.
    Registry,
    /// Read from the cache (a digest reference, or offline).
    Cache,
    /// A tag whose registry is unreachable, served by the digest it last resolved to.
    CachedTag,
}

/// Whether a tag whose registry is unreachable may be served from the digest it last resolved
/// to (at start: yes, so a sidecar starts while its registry is down; on a hot-load asked for
/// by an operator: no, the operator wants the tag as it is now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagFallback {
    /// Fail instead.
    Never,
    /// Use the cached resolution when the registry is unreachable.
    WhenUnreachable,
}

/// A verified module and the digests it was pinned by.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The reference asked for.
    pub reference: ModuleRef,
    /// The manifest digest: what the module is pinned by.
    pub manifest_digest: String,
    /// The module layer's digest (the SHA-256 of [`Pulled::module`]).
    pub layer_digest: String,
    /// The module.
    pub module: Bytes,
    /// Where it came from.
    pub origin: Origin,
}

impl Pulled {
    /// The reference pinned to its manifest digest: `oci://HOST/REPO@sha256:…`.
    pub fn pinned(&self) -> ModuleRef {
        self.reference.pinned(&self.manifest_digest)
    }
}

/// A pushed module.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The manifest digest.
    pub manifest_digest: String,
    /// The module layer's digest.
    pub layer_digest: String,
    /// The reference pinned to the manifest digest.
    pub pinned: ModuleRef,
}

/// Registries, their credentials and the cache.
pub struct Registry {
    https: oci_client::Client,
    http: oci_client::Client,
    settings: RegistrySettings,
    cache: Option<Cache>,
    /// The configured cosign keys.
    cosign_keys: Vec<sigstore::crypto::CosignVerificationKey>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("settings", &self.settings).finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Option<Vec<serde_json::Value>>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: i64,
}

impl Registry {
    /// Clients for `settings`.
    ///
    /// # Errors
    /// [`RegistryError::Setup`] when a CA certificate is not PEM.
    pub fn new(settings: RegistrySettings) -> Result<Self, RegistryError> {
        let mut cosign_keys = Vec::new();
        for pem in &settings.cosign_keys {
            let key = sigstore::crypto::CosignVerificationKey::try_from_pem(pem)
                .map_err(|e| RegistryError::Setup(format!("a cosign public key is not usable: {e}")))?;
            cosign_keys.push(key);
        }
        let mut roots = Vec::new();
        for pem in &settings.ca_pem {
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(RegistryError::Setup("no `-----BEGIN CERTIFICATE-----` block in the PEM file".into()));
            }
            roots.push(Certificate { encoding: CertificateEncoding::Pem, data: pem.clone() });
        }
        let config = |protocol| ClientConfig {
            protocol,
            extra_root_certificates: roots.clone(),
            // An image index is refused with a clear error, never resolved to some platform.
            platform_resolver: None,
            connect_timeout: Some(settings.timeout),
            read_timeout: Some(settings.timeout),
            user_agent: concat!("sandgate/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        Ok(Registry {
            https: oci_client::Client::new(config(ClientProtocol::Https)),
            http: oci_client::Client::new(config(ClientProtocol::Http)),
            cache: settings.cache_dir.clone().map(Cache::new),
            cosign_keys,
            settings,
        })
    }

    /// The settings it was made with.
    pub fn settings(&self) -> &RegistrySettings {
        &self.settings
    }

    /// The cache, if one is configured.
    pub fn cache(&self) -> Option<&Cache> {
        self.cache.as_ref()
    }

    /// Whether `registry` is spoken to over plain HTTP.
    pub fn uses_plain_http(&self, registry: &str) -> bool {
        let listed = |list: &[String]| list.iter().any(|h| h.eq_ignore_ascii_case(registry));
        listed(&self.settings.plain_http)
            || (self.settings.loopback_plain_http
                && crate::reference::is_loopback_host(registry)
                && !listed(&self.settings.tls))
    }

    fn client(&self, reference: &ModuleRef) -> &oci_client::Client {
        if self.uses_plain_http(reference.registry()) { &self.http } else { &self.https }
    }

    fn auth(&self, reference: &ModuleRef) -> RegistryAuth {
        match self.settings.credentials.get(reference.registry()) {
            Some(Credentials::Basic { username, password }) => RegistryAuth::Basic(username.clone(), password.clone()),
            Some(Credentials::Bearer(token)) => RegistryAuth::Bearer(token.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    /// Pull and verify the module `reference` names. A digest reference is served from the
    /// cache when it is there, without the network; a tag is resolved by the registry (or, as
    /// `fallback` allows, by the cache when the registry is unreachable).
    ///
    /// # Errors
    /// Every [`RegistryError`] but `NoTag` and `Setup`.
    pub async fn pull(&self, reference: &ModuleRef, fallback: TagFallback) -> Result<Pulled, RegistryError> {
        let allowed = &self.settings.allowed_registries;
        if !allowed.is_empty() && !allowed.iter().any(|r| r.eq_ignore_ascii_case(reference.registry())) {
            return Err(RegistryError::NotAllowed(reference.registry().to_owned()));
        }
        if let Some(digest) = reference.digest() {
            if let Some(pulled) = self.cached(reference, digest, Origin::Cache) {
                return Ok(pulled);
            }
            if self.settings.offline {
                return Err(RegistryError::NotCached(reference.to_string()));
            }
            return self.fetch_within_deadline(reference).await;
        }
        if self.settings.offline {
            return self.cached_tag(reference, Origin::Cache);
        }
        match self.fetch_within_deadline(reference).await {
            Err(e) if e.is_unreachable() && fallback == TagFallback::WhenUnreachable => {
                match self.cached_tag(reference, Origin::CachedTag) {
                    Ok(pulled) => {
                        tracing::warn!(
                            reference = %reference,
                            pinned = %pulled.pinned(),
                            error = %error_chain(&e),
                            "the registry is unreachable; using the digest this tag last resolved to"
                        );
                        Ok(pulled)
                    }
                    Err(RegistryError::NotCached(_)) => Err(e),
                    Err(other) => Err(other),
                }
            }
            other => other,
        }
    }

    async fn fetch_within_deadline(&self, reference: &ModuleRef) -> Result<Pulled, RegistryError> {
        let deadline = self.settings.pull_deadline;
        tokio::time::timeout(deadline, self.fetch(reference))
            .await
            .unwrap_or_else(|_| Err(RegistryError::Deadline(reference.registry().to_owned(), deadline)))
    }

    fn cached_tag(&self, reference: &ModuleRef, origin: Origin) -> Result<Pulled, RegistryError> {
        let not_cached = || RegistryError::NotCached(reference.to_string());
        let cache = self.cache.as_ref().ok_or_else(not_cached)?;
        let digest = match cache.read_tag(&reference.to_string()) {
            Ok(digest) => digest.ok_or_else(not_cached)?,
            Err(e) => {
                tracing::warn!(cache = %cache.dir().display(), error = %e, "cannot read the module cache");
                return Err(not_cached());
            }
        };
        self.cached(reference, &digest, origin).ok_or_else(not_cached)
    }

    /// The module pinned by manifest `digest`, if the cache holds the manifest and its layer,
    /// both still matching their digests. A cache that cannot be read is a miss.
    fn cached(&self, reference: &ModuleRef, digest: &str, origin: Origin) -> Option<Pulled> {
        let cache = self.cache.as_ref()?;
        let read = |digest: &str, limit| match cache.read_blob(digest, limit) {
            Ok(blob) => blob,
            Err(e) => {
                tracing::warn!(cache = %cache.dir().display(), error = %e, "cannot read the module cache");
                None
            }
        };
        let manifest = read(digest, MAX_MANIFEST)?;
        if !self.cosign_keys.is_empty() {
            // Only a module whose stored signature verifies now, with the keys configured now.
            let proofs = cache.signatures(digest).unwrap_or_default();
            if !proofs.iter().any(|p| self.proof_accepted(reference, digest, p)) {
                return None;
            }
        }
        let layer = self.module_layer(reference, &manifest).ok()?;
        let module = read(&layer.digest, self.settings.max_module_bytes)?;
        if module.len() as u64 != layer.size as u64 {
            return None;
        }
        Some(Pulled {
            reference: reference.clone(),
            manifest_digest: digest.to_owned(),
            layer_digest: layer.digest,
            module: Bytes::from(module),
            origin,
        })
    }

    async fn fetch(&self, reference: &ModuleRef) -> Result<Pulled, RegistryError> {
        let client = self.client(reference);
        let oci = reference.to_oci();
        let accepted = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST];
        let (manifest, reported) = client
            .pull_manifest_raw(&oci, &self.auth(reference), &accepted)
            .await
            .map_err(|e| self.classify(reference, "manifest", e))?;
        let actual = sha256_digest(&manifest);
        let expected = reference.digest().unwrap_or(&reported);
        if actual != expected || actual != reported {
            return Err(RegistryError::DigestMismatch {
                reference: reference.to_string(),
                what: "manifest",
                expected: expected.to_owned(),
                actual,
            });
        }
        let layer = self.module_layer(reference, &manifest)?;
        let signature = self.verify_signature(reference, &actual).await?;
        let descriptor = OciDescriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: layer.size,
            ..OciDescriptor::default()
        };
        // No more than the manifest announced (checked against the limit already).
        let mut out = CappedBuffer { bytes: Vec::new(), limit: layer.size as u64 };
        client.pull_blob(&oci, &descriptor, &mut out).await.map_err(|e| match e {
            OciDistributionError::IoError(io) if io.kind() == std::io::ErrorKind::FileTooLarge => {
                RegistryError::TooLarge {
                    reference: reference.to_string(),
                    size: out.bytes.len() as u64,
                    limit: self.settings.max_module_bytes,
                }
            }
            e => self.classify(reference, "module layer", e),
        })?;
        let module = out.bytes;
        let module_digest = sha256_digest(&module);
        if module_digest != layer.digest || module.len() as u64 != layer.size as u64 {
            return Err(RegistryError::DigestMismatch {
                reference: reference.to_string(),
                what: "module layer",
                expected: layer.digest,
                actual: module_digest,
            });
        }
        if let Some(cache) = &self.cache {
            // The layer before the manifest: a manifest in the cache always has its layer. A
            // cache that cannot be written costs a later start its fallback, not this pull.
            let written = cache
                .write_blob(&module)
                .and_then(|_| match &signature {
                    Some(proof) => cache.write_signature(&actual, proof),
                    None => Ok(()),
                })
                .and_then(|_| cache.write_blob(&manifest))
                .and_then(|_| match reference.digest() {
                    None => cache.write_tag(&reference.to_string(), &actual),
                    Some(_) => Ok(()),
                });
            if let Err(e) = written {
                tracing::warn!(cache = %cache.dir().display(), error = %e, "cannot write to the module cache");
            }
        }
        Ok(Pulled {
            reference: reference.clone(),
            manifest_digest: actual,
            layer_digest: module_digest,
            module: Bytes::from(module),
            origin: Origin::Registry,
        })
    }

    /// With cosign keys configured: a signature (cosign's `.sig` tag for `manifest_digest`) by
    /// one of them over a payload naming exactly `manifest_digest` and this repository. Without
    /// keys: `None`, nothing checked.
    async fn verify_signature(
        &self,
        reference: &ModuleRef,
        manifest_digest: &str,
    ) -> Result<Option<SignatureProof>, RegistryError> {
        use sigstore::cosign::{ClientBuilder, CosignCapabilities};
        if self.cosign_keys.is_empty() {
            return Ok(None);
        }
        let unsigned = |reason: String| RegistryError::Unsigned { reference: reference.to_string(), reason };
        let protocol = if self.uses_plain_http(reference.registry()) {
            sigstore::registry::ClientProtocol::Http
        } else {
            sigstore::registry::ClientProtocol::Https
        };
        let config = sigstore::registry::ClientConfig {
            protocol,
            extra_root_certificates: self
                .settings
                .ca_pem
                .iter()
                .map(|pem| sigstore::registry::Certificate {
                    encoding: sigstore::registry::CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            ..Default::default()
        };
        let mut client = ClientBuilder::default()
            .with_oci_client_config(config)
            .build()
            .map_err(|e| RegistryError::Setup(format!("the signature client cannot be built: {e}")))?;
        let auth = match self.settings.credentials.get(reference.registry()) {
            Some(Credentials::Basic { username, password }) => {
                sigstore::registry::Auth::Basic(username.clone(), password.clone())
            }
            Some(Credentials::Bearer(token)) => sigstore::registry::Auth::Bearer(token.clone()),
            None => sigstore::registry::Auth::Anonymous,
        };
        let pinned = sigstore::registry::OciReference::with_digest(
            reference.registry().to_owned(),
            reference.repository().to_owned(),
            manifest_digest.to_owned(),
        );
        let layers = client
            .trusted_signature_layers(&auth, &pinned)
            .await
            .map_err(|e| unsigned(format!("its signatures cannot be read: {e}")))?;
        let proofs: Vec<SignatureProof> = layers
            .iter()
            .filter_map(|layer| {
                Some(SignatureProof {
                    payload: base64::engine::general_purpose::STANDARD.encode(&layer.raw_data),
                    signature: layer.signature.clone()?,
                })
            })
            .collect();
        if let Some(proof) = proofs.iter().find(|p| self.proof_accepted(reference, manifest_digest, p)) {
            return Ok(Some(proof.clone()));
        }
        let about_this =
            layers.iter().filter(|l| l.signature.is_some() && names(reference, manifest_digest, &l.raw_data)).count();
        if about_this == 0 {
            return Err(unsigned(format!(
                "no signature of this manifest digest in this repository (looked for the tag `sha256-{}.sig`)",
                manifest_digest.trim_start_matches("sha256:")
            )));
        }
        Err(unsigned(format!("{about_this} signature(s), none by a configured key")))
    }

    /// Whether `proof` is a signature by a configured key over a payload naming exactly
    /// `manifest_digest` in `reference`'s repository. The payload is read here, not trusted
    /// from whoever parsed it before: the same check for a fresh pull and a cached module.
    fn proof_accepted(&self, reference: &ModuleRef, manifest_digest: &str, proof: &SignatureProof) -> bool {
        let Ok(payload) = base64::engine::general_purpose::STANDARD.decode(&proof.payload) else { return false };
        names(reference, manifest_digest, &payload)
            && self.cosign_keys.iter().any(|key| {
                key.verify_signature(sigstore::crypto::Signature::Base64Encoded(proof.signature.as_bytes()), &payload)
                    .is_ok()
            })
    }

    /// The one Wasm module layer of `manifest`, checked against the size limit.
    fn module_layer(&self, reference: &ModuleRef, manifest: &[u8]) -> Result<Descriptor, RegistryError> {
        let not_wasm = |reason: String| RegistryError::NotWasm { reference: reference.to_string(), reason };
        let parsed: Manifest =
            serde_json::from_slice(manifest).map_err(|e| not_wasm(format!("the manifest is not valid: {e}")))?;
        let media_type = parsed.media_type.as_deref().unwrap_or(OCI_MANIFEST);
        if parsed.manifests.is_some() || media_type == OCI_INDEX || media_type == DOCKER_LIST {
            return Err(not_wasm("it is an image index (a list of manifests), not one Wasm artifact".into()));
        }
        let config = parsed.config.ok_or_else(|| not_wasm("the manifest has no config".into()))?;
        if config.media_type != WASM_CONFIG_V0 && config.media_type != WASM_CONFIG_V1 {
            return Err(not_wasm(format!(
                "its config media type is `{}`, not `{WASM_CONFIG_V0}` (or `{WASM_CONFIG_V1}`)",
                config.media_type
            )));
        }
        let found: Vec<&str> = parsed.layers.iter().map(|l| l.media_type.as_str()).collect();
        let mut wasm = parsed.layers.iter().filter(|l| l.media_type == WASM_LAYER || l.media_type == WASM_LAYER_LEGACY);
        let (Some(layer), None) = (wasm.next(), wasm.next()) else {
            return Err(not_wasm(format!(
                "a policy artifact has exactly one layer of media type `{WASM_LAYER}` (or `{WASM_LAYER_LEGACY}`); its layers are {found:?}"
            )));
        };
        if !crate::reference::valid_digest(&layer.digest) {
            return Err(not_wasm(format!("its module layer's digest `{}` is not a sha256 digest", layer.digest)));
        }
        let limit = self.settings.max_module_bytes;
        if layer.size < 0 || layer.size as u64 > limit {
            return Err(RegistryError::TooLarge {
                reference: reference.to_string(),
                size: layer.size.max(0) as u64,
                limit,
            });
        }
        Ok(Descriptor { media_type: layer.media_type.clone(), digest: layer.digest.clone(), size: layer.size })
    }

    fn classify(&self, reference: &ModuleRef, what: &'static str, error: OciDistributionError) -> RegistryError {
        let registry = reference.registry().to_owned();
        match error {
            OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
                RegistryError::Unauthorized(registry)
            }
            OciDistributionError::ImageManifestNotFoundError(_) => RegistryError::NotFound(reference.to_string()),
            OciDistributionError::RegistryError { ref envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes.iter().any(|c| matches!(c, OciErrorCode::Toomanyrequests)) {
                    RegistryError::Unreachable(registry, error)
                } else if codes.iter().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                    RegistryError::Unauthorized(registry)
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                    )
                }) {
                    RegistryError::NotFound(reference.to_string())
                } else {
                    RegistryError::Registry(reference.to_string(), error)
                }
            }
            OciDistributionError::ServerError { code: 404, .. } => RegistryError::NotFound(reference.to_string()),
            OciDistributionError::ServerError { code: 401 | 403, .. } => RegistryError::Unauthorized(registry),
            OciDistributionError::ServerError { code, .. } if code >= 500 || code == 429 => {
                RegistryError::Unreachable(registry, error)
            }
            OciDistributionError::RequestError(ref e) if e.is_connect() || e.is_timeout() || e.is_request() => {
                RegistryError::Unreachable(registry, error)
            }
            OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
                expected,
                actual,
            }) => RegistryError::DigestMismatch { reference: reference.to_string(), what, expected, actual },
            other => RegistryError::Registry(reference.to_string(), other),
        }
    }

    /// Push `module` (already validated by the caller) to `reference`'s tag in the CNCF Wasm
    /// artifact layout: config `application/vnd.wasm.config.v0+json`, one `application/wasm`
    /// layer. The same module always gives the same manifest digest.
    ///
    /// # Errors
    /// [`RegistryError::NoTag`] without a tag; the registry's failures as for a pull.
    pub async fn push(&self, module: &[u8], reference: &ModuleRef) -> Result<Pushed, RegistryError> {
        if reference.tag().is_none() {
            return Err(RegistryError::NoTag(reference.to_string()));
        }
        let target = ModuleRef::with_tag(reference, reference.tag().unwrap_or_default());
        let layer_digest = sha256_digest(module);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "wasm",
            "os": "wasip2",
            "layerDigests": [layer_digest],
        }))
        .map_err(|e| RegistryError::Setup(e.to_string()))?;
        let config_digest = sha256_digest(&config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": { "mediaType": WASM_CONFIG_V0, "digest": config_digest, "size": config.len() },
            "layers": [{ "mediaType": WASM_LAYER, "digest": layer_digest, "size": module.len() }],
        }))
        .map_err(|e| RegistryError::Setup(e.to_string()))?;
        let client = self.client(&target);
        let oci = target.to_oci();
        client.store_auth_if_needed(oci.resolve_registry(), &self.auth(&target)).await;
        let target = &target;
        let fail = |what| move |e| self.classify(target, what, e);
        client.push_blob(&oci, Bytes::copy_from_slice(module), &layer_digest).await.map_err(fail("module layer"))?;
        client.push_blob(&oci, config, &config_digest).await.map_err(fail("config"))?;
        let manifest_digest = sha256_digest(&manifest);
        let content_type = http::HeaderValue::from_static(OCI_MANIFEST);
        client.push_manifest_raw(&oci, manifest, content_type).await.map_err(fail("manifest"))?;
        Ok(Pushed { pinned: target.pinned(&manifest_digest), manifest_digest, layer_digest })
    }
}

/// Whether a simple-signing `payload` names exactly `manifest_digest`, in `reference`'s
/// repository (cosign's `critical.identity.docker-reference`): a signature of another
/// artifact, or of this one pushed elsewhere, does not count.
fn names(reference: &ModuleRef, manifest_digest: &str, payload: &[u8]) -> bool {
    let Ok(payload) = serde_json::from_slice::<serde_json::Value>(payload) else { return false };
    let critical = &payload["critical"];
    let repository = format!("{}/{}", reference.registry(), reference.repository());
    critical["image"]["docker-manifest-digest"].as_str() == Some(manifest_digest)
        && critical["identity"]["docker-reference"].as_str().is_some_and(|r| r.eq_ignore_ascii_case(&repository))
        && critical["type"].as_str() == Some("cosign container image signature")
}

/// An error and its causes, `: `-joined.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A download target that refuses to grow past `limit` (a registry that sends more than the
/// manifest said, or than the limit allows, is cut off mid-stream).
struct CappedBuffer {
    bytes: Vec<u8>,
    limit: u64,
}

impl tokio::io::AsyncWrite for &mut CappedBuffer {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if (this.bytes.len() + buf.len()) as u64 > this.limit {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                "over the module size limit",
            )));
        }
        this.bytes.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(limit: u64) -> Registry {
        Registry::new(RegistrySettings { max_module_bytes: limit, ..RegistrySettings::default() }).unwrap()
    }

    fn manifest(config_type: &str, layers: &[(&str, i64)]) -> Vec<u8> {
        let digest = format!("sha256:{}", "ab".repeat(32));
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": { "mediaType": config_type, "digest": digest, "size": 2 },
            "layers": layers.iter().map(|(t, size)| serde_json::json!({ "mediaType": t, "digest": digest, "size": size })).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    fn reason(registry: &Registry, manifest: &[u8]) -> String {
        let r: ModuleRef = "oci://localhost:5000/p:v1".parse().unwrap();
        registry.module_layer(&r, manifest).map(|l| l.media_type).unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn one_wasm_layer_in_either_layout_and_nothing_else() {
        let r = registry(1000);
        assert_eq!(reason(&r, &manifest(WASM_CONFIG_V0, &[(WASM_LAYER, 10)])), WASM_LAYER);
        assert_eq!(reason(&r, &manifest(WASM_CONFIG_V1, &[(WASM_LAYER_LEGACY, 10)])), WASM_LAYER_LEGACY);
        // A container image.
        let image =
            manifest("application/vnd.oci.image.config.v1+json", &[("application/vnd.oci.image.layer.v1.tar", 10)]);
        assert!(reason(&r, &image).contains("its config media type is `application/vnd.oci.image.config.v1+json`"));
        // No Wasm layer, two Wasm layers.
        assert!(reason(&r, &manifest(WASM_CONFIG_V0, &[("text/plain", 10)])).contains("exactly one layer"));
        assert!(
            reason(&r, &manifest(WASM_CONFIG_V0, &[(WASM_LAYER, 10), (WASM_LAYER, 10)])).contains("exactly one layer")
        );
        // Over the limit (or a negative size) before a byte is downloaded.
        assert!(reason(&r, &manifest(WASM_CONFIG_V0, &[(WASM_LAYER, 1001)])).contains("over the 1000-byte limit"));
        assert!(reason(&r, &manifest(WASM_CONFIG_V0, &[(WASM_LAYER, -1)])).contains("over the 1000-byte limit"));
        // An index is never resolved to some platform's entry.
        let index = br#"{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}"#;
        assert!(reason(&r, index).contains("image index"));
        assert!(reason(&r, b"<html>").contains("the manifest is not valid"));
    }

    #[test]
    fn a_download_past_the_limit_is_cut_off() {
        use tokio::io::AsyncWriteExt;
        let mut buffer = CappedBuffer { bytes: Vec::new(), limit: 8 };
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let mut writer = &mut buffer;
            writer.write_all(b"12345678").await.unwrap();
            let error = writer.write_all(b"9").await.unwrap_err();
            assert_eq!(error.kind(), std::io::ErrorKind::FileTooLarge);
        });
        assert_eq!(buffer.bytes, b"12345678");
    }

    #[test]
    fn plain_http_only_where_configured() {
        let r = Registry::new(RegistrySettings {
            plain_http: vec!["registry.internal:5000".into()],
            tls: vec!["localhost:5443".into()],
            ..RegistrySettings::default()
        })
        .unwrap();
        assert!(r.uses_plain_http("registry.internal:5000"));
        assert!(!r.uses_plain_http("registry.example"));
        assert!(r.uses_plain_http("127.0.0.1:5000"));
        assert!(!r.uses_plain_http("localhost:5443"));
        let strict =
            Registry::new(RegistrySettings { loopback_plain_http: false, ..RegistrySettings::default() }).unwrap();
        assert!(!strict.uses_plain_http("127.0.0.1:5000"));
    }
}
