//! The Sandgate policy runtime: the WebAssembly sandbox every check runs in.
//!
//! It compiles policy components once and evaluates every check in a new instance with time and
//! memory limits; any failure is a deny with its own reason code. It knows nothing of HTTP, JWT
//! or configuration files: the server hands it a [`CheckRequest`](bindings::sandgate::policy::types::CheckRequest)
//! and an [`EvalContext`], and gets an [`Evaluation`] back.
//!
//! - [`bindings`]: the types and traits `bindgen!` generates from the WIT contract, 0.1.0
//!   (the host's own types) and 0.2.0 (`bindings::v0_2`); the one place it runs.
//! - [`Contract`]: the contract versions a policy may be built against, told apart at load.
//! - [`Runtime`]: engine, pooling allocator, epoch ticker; [`Runtime::load`],
//!   [`Runtime::probe`], [`Runtime::check`] / [`Runtime::evaluate`].
//! - [`PolicyModule`] and [`LoadError`]: a validated, pre-instantiated component, or why not.
//! - `prepare`: a policy's memory prepared once per data version by its `prepare` export
//!   ([`Start`] says whether a check may start from it).
//! - [`Evaluation`] and [`PolicyFault`]: what a check produced.
//! - [`PolicyData`], [`TokenVerifier`], [`PolicyLog`]: what a policy may consult and write.
//! - `wasi`: the deterministic, deny-all WASI a `wasm32-wasip2` policy gets (`wasmtime-wasi`).
//! - [`contract`]: the rules every decision is held to.
//! - [`spec`]: check requests from their JSON form, outcomes for fixtures.

pub mod bindings;
pub mod contract;
mod contract_v0_2;
mod fault;
mod host_state;
mod policy;
mod policy_data;
mod pool;
mod prepare;
#[cfg(feature = "bench-internals")]
mod reused;
mod runtime;
pub mod spec;
mod wasi;

pub use fault::{Evaluation, PolicyFault, Timings};
pub use host_state::{MAX_LOG_LINE, MAX_LOG_LINES, MAX_VERIFY_JWT, MAX_VERIFY_JWT_BYTES, PolicyLog, TokenVerifier};
pub use policy::{Contract, LoadError, PolicyModule, sha256_hex};
pub use policy_data::{MAX_INDEXED_NODES, PolicyData};
pub use prepare::{PREPARE_FUEL, PrepareCounts, Start};
#[cfg(feature = "bench-internals")]
pub use reused::ReusedInstance;
pub use runtime::{EvalContext, MAX_TRANSFER, Runtime, RuntimeConfig};
