//! The Sandgate sidecar: the served state and every writer of it, the protocol-agnostic
//! decision path, the listeners (HTTP forward-auth, Envoy ext_authz gRPC, admin), the decision
//! log, metrics and configuration. The only crate that names hyper and tonic.
//!
//! - [`Config`]: the TOML configuration; binds and loads nothing.
//! - [`Sidecar`]: built from a config (state loaded, listeners bound), run until shutdown,
//!   drained; it owns every background task.
//! - [`State`]: the [`SnapshotStore`] and every change to it (admin API, policy directory,
//!   JWKS fetches), each read-your-writes.
//! - [`Authorizer::decide`]: one check, whatever protocol it came in, as an [`Answer`].
//! - [`ForwardAuth`], [`ext_authz`], [`AdminApi`]: the protocol adapters; handlers take any
//!   body type, so tests call them without a socket.

pub mod admin_api;
mod answer;
mod compiler;
pub mod config;
mod credential;
pub mod decide;
pub mod decision_log;
pub mod ext_authz;
pub mod fleet;
pub mod forward_auth;
pub mod listener;
pub mod log_sink;
pub mod metrics;
pub mod original_request;
pub mod otel;
pub mod policy_dir;
pub mod sidecar;
pub mod snapshot;
pub mod state;

pub use admin_api::AdminApi;
pub use config::{Config, ConfigError, ModuleSource, ProxyKind};
pub use decide::{Answer, Authorizer, unix_now};
pub use decision_log::DecisionLog;
pub use forward_auth::ForwardAuth;
pub use original_request::OriginalRequest;
pub use sidecar::Sidecar;
pub use snapshot::{LoadedPolicy, OciSource, Snapshot, SnapshotStore};
pub use state::{ChangeError, RevocationChange, StartError, State};
