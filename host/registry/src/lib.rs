//! Policy modules as OCI artifacts: `oci://` references, pulls verified by digest, pushes in
//! the CNCF Wasm artifact layout, and the on-disk content-addressed cache that lets a sidecar
//! start while its registry is down. It moves and verifies bytes; it knows nothing of
//! WebAssembly (the caller validates the module) or of the server.
//!
//! - [`ModuleRef`]: `oci://HOST/REPO:TAG` or `oci://HOST/REPO@sha256:…`.
//! - [`Registry`]: [`Registry::pull`] and [`Registry::push`] with [`RegistrySettings`].
//! - [`Cache`]: `blobs/sha256/<hex>` and the digest each tag last resolved to.

mod cache;
mod client;
mod reference;

pub use cache::{Cache, sha256_digest, write_atomically};
pub use client::{
    Credentials, Origin, Pulled, Pushed, Registry, RegistryError, RegistrySettings, TagFallback, WASM_CONFIG_V0,
    WASM_CONFIG_V1, WASM_LAYER, WASM_LAYER_LEGACY,
};
pub use reference::{BadReference, ModuleRef, SCHEME, is_loopback_host, valid_digest};
