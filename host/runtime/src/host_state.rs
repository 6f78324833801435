//! The host side of the WIT `host` interface: what a policy may call during a check, and the
//! per-store state behind it. Everything here lives and dies with one check's store.

use crate::PolicyData;
use crate::bindings::sandgate::policy::host::{Host, LogLevel};
use crate::bindings::sandgate::policy::types::{CheckRequest, CredentialError, VerifiedCredential};
use std::borrow::Cow;
use std::sync::Arc;

/// Verifies tokens a policy found itself (the `verify-jwt` import).
pub trait TokenVerifier: Send + Sync {
    /// Verify `token` with the pinned key sets and revocations.
    fn verify(&self, token: &str) -> Result<VerifiedCredential, CredentialError>;
}

/// One line a policy logged.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PolicyLog {
    /// `debug`, `info`, `warn` or `error`.
    pub level: &'static str,
    /// The message, truncated to [`MAX_LOG_LINE`] bytes.
    pub message: String,
}

/// Log lines kept per check; later ones are counted, not kept.
pub const MAX_LOG_LINES: usize = 32;
/// Bytes kept of one log line.
pub const MAX_LOG_LINE: usize = 1024;
/// `verify-jwt` calls one check may make; later calls are answered `too_many_verifications`
/// without verifying. Each verification is host work outside the guest's memory cap and, with
/// `capture = "input"`, an answer kept for the decision record.
pub const MAX_VERIFY_JWT: u32 = 16;
/// Bytes of a token `verify-jwt` accepts; a longer one is answered `token_too_large` without
/// decoding it. The same as the request headers' cap.
pub const MAX_VERIFY_JWT_BYTES: usize = 64 << 10;

/// Fails memory growth past a cap, and remembers that it did so a trap can be told apart.
pub(crate) struct MemoryCap {
    max_bytes: usize,
    exceeded: bool,
    /// `memory.grow` calls after the initial allocation; a well-sized guest makes none.
    pub(crate) grows: u32,
}

impl MemoryCap {
    pub(crate) fn exceeded(&self) -> bool {
        self.exceeded
    }
}

impl wasmtime::ResourceLimiter for MemoryCap {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if current > 0 {
            self.grows += 1;
        }
        if desired > self.max_bytes {
            self.exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The state of one check's store.
pub(crate) struct HostState {
    /// The check being decided: contract 0.2.0's `request` interface answers from it.
    pub(crate) request: Arc<CheckRequest>,
    pub(crate) limiter: MemoryCap,
    pub(crate) logs: Vec<PolicyLog>,
    dropped_logs: usize,
    data: Arc<PolicyData>,
    verifier: Option<Arc<dyn TokenVerifier>>,
    /// `verify-jwt` calls made so far.
    verifications: u32,
    /// The deny-all WASI of a `wasm32-wasip2` policy (`None` for a policy without WASI imports).
    pub(crate) wasi: Option<Box<crate::wasi::WasiState>>,
}

impl HostState {
    pub(crate) fn new(
        request: Arc<CheckRequest>,
        data: Arc<PolicyData>,
        verifier: Option<Arc<dyn TokenVerifier>>,
        memory_limit: usize,
    ) -> Self {
        HostState {
            request,
            limiter: MemoryCap { max_bytes: memory_limit, exceeded: false, grows: 0 },
            logs: Vec::new(),
            dropped_logs: 0,
            data,
            verifier,
            verifications: 0,
            wasi: None,
        }
    }

    /// Turn what a WASI policy wrote to stdout (`info`) and stderr (`warn`) into log lines,
    /// after the ones it logged through `host.log`.
    pub(crate) fn collect_output(&mut self) {
        let Some(wasi) = self.wasi.as_ref() else { return };
        for (level, bytes) in wasi.output() {
            for line in String::from_utf8_lossy(&bytes).lines().filter(|l| !l.trim().is_empty()) {
                self.push_log(level, line.to_owned());
            }
        }
    }

    pub(crate) fn push_log(&mut self, level: &'static str, mut message: String) {
        if self.logs.len() >= MAX_LOG_LINES {
            self.dropped_logs += 1;
            if let Some(last) = self.logs.last_mut() {
                last.message = format!("({} more lines dropped)", self.dropped_logs);
            }
            return;
        }
        if message.len() > MAX_LOG_LINE {
            let mut end = MAX_LOG_LINE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        self.logs.push(PolicyLog { level, message });
    }

    /// The `data-get` import of either contract.
    pub(crate) fn data_at(&self, pointer: &str) -> Option<String> {
        self.data.get(pointer).map(Cow::into_owned)
    }

    /// The `verify-jwt` import of either contract. The limits are the same whether or not the
    /// answers are recorded, so a replayed check makes the same calls.
    pub(crate) fn verify(&mut self, token: &str) -> Result<VerifiedCredential, CredentialError> {
        if self.verifications >= MAX_VERIFY_JWT {
            return Err(CredentialError {
                reason: "too_many_verifications".into(),
                message: format!("a check may verify at most {MAX_VERIFY_JWT} tokens"),
            });
        }
        self.verifications += 1;
        if token.len() > MAX_VERIFY_JWT_BYTES {
            return Err(CredentialError {
                reason: "token_too_large".into(),
                message: format!("the token is longer than {MAX_VERIFY_JWT_BYTES} bytes"),
            });
        }
        match &self.verifier {
            Some(verifier) => verifier.verify(token),
            None => Err(CredentialError {
                reason: "verification_unavailable".into(),
                message: "this host has no token verification configured".into(),
            }),
        }
    }
}

impl crate::bindings::sandgate::policy::types::Host for HostState {}

impl Host for HostState {
    fn log(&mut self, level: LogLevel, message: String) {
        let level = match level {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        };
        self.push_log(level, message);
    }

    fn data_get(&mut self, pointer: String) -> Option<String> {
        self.data_at(&pointer)
    }

    fn verify_jwt(&mut self, token: String) -> Result<VerifiedCredential, CredentialError> {
        self.verify(&token)
    }
}
