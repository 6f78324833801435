//! A deterministic, deny-all WASI for `wasm32-wasip2` policies (`wasmtime-wasi`, preview 2).
//!
//! A policy built with the standard toolchain imports `wasi:cli`, `wasi:io`, `wasi:clocks` and
//! `wasi:random` from its standard library. Sandgate links them with a context that grants
//! nothing and answers the same way every time the same check is replayed:
//!
//! | interface | what the policy gets |
//! |---|---|
//! | `wasi:cli/environment` | no variables, no arguments |
//! | `wasi:cli/stdin` | a closed stream (reads end at once) |
//! | `wasi:cli/stdout`, `stderr` | the check's policy log lines (`info` and `warn`), bounded |
//! | `wasi:cli/exit` | the check ends in a deny, `policy_exited` |
//! | `wasi:clocks/wall-clock` | the check's pinned `now`, always the same second |
//! | `wasi:clocks/monotonic-clock` | virtual time: 1 ns more at each read (the first reads 1), and a sleep returns at once having moved the clock on; busy-waiting never ends and is stopped by the timeout |
//! | `wasi:random/*` | bytes derived from the request id (SHA-256 in counter mode): a replay is exact, two checks differ. The request id is sent to the client, so these bytes are **public**: never a secret, never a choice a client must not steer |
//! | `wasi:filesystem/*` | no preopened directory: there is nothing to open |
//!
//! Anything else (`wasi:sockets`, `wasi:http`, …) is refused when the policy is loaded, naming
//! the import. No host call here can block, so the epoch deadline still bounds every check:
//! every pollable a policy can reach is ready at once, and `LogPipe::check_write` never
//! answers 0 (a blocking write would otherwise spin in the host). Resource handles are capped
//! per check ([`crate::runtime::MAX_HANDLES`]).

use crate::host_state::HostState;
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// The WASI interfaces a policy may import, without their `@version`: the deny-all set above.
pub(crate) const ALLOWED_WASI: [&str; 20] = [
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
];

/// Whether `import` (`wasi:cli/stdout@0.2.6`) is one of [`ALLOWED_WASI`] at a 0.2 version.
pub(crate) fn allowed(import: &str) -> bool {
    let Some((name, version)) = import.split_once('@') else { return false };
    version.starts_with("0.2.") && ALLOWED_WASI.contains(&name)
}

/// Bytes of stdout, and of stderr, kept per check; the rest is accepted and dropped.
const MAX_OUTPUT: usize = crate::MAX_LOG_LINES * crate::MAX_LOG_LINE;
/// The most random bytes one call may ask for (a larger request traps: a deny).
const MAX_RANDOM: u64 = 64 << 10;

/// Link exactly the WASI set of [`ALLOWED_WASI`] into `linker`, with the virtual monotonic
/// clock. Nothing else is linked, so a policy importing anything more (sockets, HTTP) would
/// fail to instantiate even if the check at load let it through.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
    use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
    use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, random, sync};
    use wasmtime_wasi::random::WasiRandom;
    let l = linker;
    cli::environment::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::exit::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::stdin::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::stdout::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::stderr::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_input::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_output::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdin::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdout::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_stderr::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    wasmtime_wasi_io::bindings::wasi::io::error::add_to_linker::<HostState, WasiIo>(l, |s| s.ctx().table)?;
    sync::io::poll::add_to_linker::<HostState, WasiIo>(l, |s| s.ctx().table)?;
    sync::io::streams::add_to_linker::<HostState, WasiIo>(l, |s| s.ctx().table)?;
    clocks::wall_clock::add_to_linker::<HostState, WasiClocks>(l, HostState::clocks)?;
    clocks::monotonic_clock::add_to_linker::<HostState, VirtualClock>(l, HostState::wasi_state)?;
    random::random::add_to_linker::<HostState, WasiRandom>(l, |s| s.ctx().ctx.random())?;
    random::insecure::add_to_linker::<HostState, WasiRandom>(l, |s| s.ctx().ctx.random())?;
    random::insecure_seed::add_to_linker::<HostState, WasiRandom>(l, |s| s.ctx().ctx.random())?;
    sync::filesystem::types::add_to_linker::<HostState, WasiFilesystem>(l, HostState::filesystem)?;
    filesystem::preopens::add_to_linker::<HostState, WasiFilesystem>(l, HostState::filesystem)?;
    Ok(())
}

/// `wasi:io` works on the check's resource table alone.
struct WasiIo;

impl HasData for WasiIo {
    type Data<'a> = &'a mut ResourceTable;
}

/// One check's WASI state: the context, its resources, the virtual clock and the output.
pub(crate) struct WasiState {
    ctx: WasiCtx,
    table: ResourceTable,
    /// The monotonic clock, in nanoseconds.
    ticks: u64,
    stdout: LogPipe,
    stderr: LogPipe,
}

impl WasiState {
    /// The context for the check `request_id` at `now` (Unix seconds).
    pub(crate) fn new(request_id: &str, now: u64) -> Self {
        let (stdout, stderr) = (LogPipe::default(), LogPipe::default());
        let ctx = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .wall_clock(Pinned(now))
            // Not read (the linker's monotonic clock is `VirtualClock`), but never the host's.
            .monotonic_clock(Pinned(0))
            .secure_random(SeededRng::new(request_id, "random"))
            .insecure_random(SeededRng::new(request_id, "insecure"))
            .insecure_random_seed(u128::from_be_bytes(
                seed(request_id, "insecure-seed", 0)[..16].try_into().unwrap_or_default(),
            ))
            .max_random_size(MAX_RANDOM)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(2 * crate::runtime::MAX_HANDLES);
        WasiState { ctx, table, ticks: 0, stdout, stderr }
    }

    /// What the policy wrote to stdout and stderr.
    pub(crate) fn output(&self) -> [(&'static str, Vec<u8>); 2] {
        [("info", self.stdout.take()), ("warn", self.stderr.take())]
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let state = self.wasi_state();
        WasiCtxView { ctx: &mut state.ctx, table: &mut state.table }
    }
}

impl HostState {
    /// This check's WASI state. The runtime gives every store of a WASI policy its own
    /// ([`WasiState::new`] with the check's request id and `now`); a policy without WASI
    /// imports cannot call WASI, so the empty context made here is never reached.
    fn wasi_state(&mut self) -> &mut WasiState {
        self.wasi.get_or_insert_with(|| Box::new(WasiState::new("", 0)))
    }
}

/// A clock that always reads the same: the wall clock at the check's pinned second.
struct Pinned(u64);

impl wasmtime_wasi::HostMonotonicClock for Pinned {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        self.0
    }
}

impl wasmtime_wasi::HostWallClock for Pinned {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::from_secs(self.0)
    }
}

/// `wasi:clocks/monotonic-clock` on virtual time.
struct VirtualClock;

impl HasData for VirtualClock {
    type Data<'a> = &'a mut WasiState;
}

impl wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host for &mut WasiState {
    fn now(&mut self) -> wasmtime::Result<u64> {
        self.ticks = self.ticks.saturating_add(1);
        Ok(self.ticks)
    }

    fn resolution(&mut self) -> wasmtime::Result<u64> {
        Ok(1)
    }

    fn subscribe_instant(&mut self, when: u64) -> wasmtime::Result<Resource<DynPollable>> {
        self.ticks = self.ticks.max(when);
        ready(&mut self.table)
    }

    fn subscribe_duration(&mut self, duration: u64) -> wasmtime::Result<Resource<DynPollable>> {
        self.ticks = self.ticks.saturating_add(duration);
        ready(&mut self.table)
    }
}

/// A pollable that is ready at once: a sleep has already moved the virtual clock on.
struct Ready;

#[wasmtime_wasi::async_trait]
impl Pollable for Ready {
    async fn ready(&mut self) {}
}

fn ready(table: &mut ResourceTable) -> wasmtime::Result<Resource<DynPollable>> {
    let resource = table.push(Ready)?;
    wasmtime_wasi::p2::subscribe(table, resource)
}

/// 32 bytes derived from the request id, a purpose and a block number.
fn seed(request_id: &str, purpose: &str, block: u64) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(b"sandgate-wasi-random\0");
    hash.update(purpose.as_bytes());
    hash.update([0]);
    hash.update(request_id.as_bytes());
    hash.update(block.to_be_bytes());
    hash.finalize().into()
}

/// Random bytes as SHA-256 of (purpose, request id, block number), block after block: the same
/// for the same check, different for every other.
struct SeededRng {
    request_id: Arc<str>,
    purpose: &'static str,
    block: u64,
    buffer: [u8; 32],
    used: usize,
}

impl SeededRng {
    fn new(request_id: &str, purpose: &'static str) -> Self {
        SeededRng { request_id: request_id.into(), purpose, block: 0, buffer: [0; 32], used: 32 }
    }
}

impl rand_core::TryRng for SeededRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut bytes = [0; 4];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut bytes = [0; 8];
        self.try_fill_bytes(&mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for byte in dst {
            if self.used == self.buffer.len() {
                self.buffer = seed(&self.request_id, self.purpose, self.block);
                self.block += 1;
                self.used = 0;
            }
            *byte = self.buffer[self.used];
            self.used += 1;
        }
        Ok(())
    }
}

/// Stdout or stderr of one check: kept up to [`MAX_OUTPUT`] bytes, the rest accepted and
/// dropped (a policy that prints a lot is not failed for it).
#[derive(Clone, Default)]
struct LogPipe(Arc<Mutex<Vec<u8>>>);

impl LogPipe {
    fn push(&self, bytes: &[u8]) {
        let mut buffer = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let room = MAX_OUTPUT.saturating_sub(buffer.len());
        buffer.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl wasmtime_wasi::cli::IsTerminal for LogPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for LogPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogPipe {
    async fn ready(&mut self) {}
}

impl OutputStream for LogPipe {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for LogPipe {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        self.push(bytes);
        Poll::Ready(Ok(bytes.len()))
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
    use rand_core::Rng;

    #[test]
    fn only_the_deny_all_set_at_a_0_2_version_is_allowed() {
        assert!(allowed("wasi:cli/stdout@0.2.6"));
        assert!(allowed("wasi:random/insecure-seed@0.2.0"));
        assert!(!allowed("wasi:sockets/tcp@0.2.6"));
        assert!(!allowed("wasi:http/outgoing-handler@0.2.6"));
        assert!(!allowed("wasi:cli/stdout@0.3.0"));
        assert!(!allowed("wasi:cli/stdout"));
    }

    #[test]
    fn randomness_is_the_same_for_a_request_id_and_differs_between_them() {
        let bytes = |id: &str| {
            let mut rng = SeededRng::new(id, "random");
            let mut out = [0u8; 100];
            rng.fill_bytes(&mut out);
            out
        };
        assert_eq!(bytes("a"), bytes("a"));
        assert_ne!(bytes("a"), bytes("b"));
        assert_ne!(bytes("a")[..32], bytes("a")[32..64], "blocks differ");
        let mut insecure = SeededRng::new("a", "insecure");
        assert_ne!(insecure.next_u64().to_le_bytes(), bytes("a")[..8], "purposes differ");
    }
}
