//! A hostile policy for the runtime's tests. The request path picks the misbehaviour:
//!
//! | path | what it does | the host must answer |
//! |---|---|---|
//! | `/state` | counts in a `static`, a global cache, a `thread_local` and a lazy global, and reports the counts as headers | allow with every count at 1 (fresh instance) |
//! | `/loop` | spins forever | deny `policy_timeout` |
//! | `/.sandgate/probe` | spins forever: the runtime's probe before publishing | load refused (unless built with `SANDGATE_FIXTURE_SERVABLE` set: then it allows, so a sidecar can serve it) |
//! | `/memory-bomb` | allocates and touches memory without end | deny `policy_out_of_memory` |
//! | `/recursion` | recurses without end | deny `policy_stack_overflow` |
//! | `/panic` | panics | deny `policy_panicked` |
//! | `/abort` | aborts | deny `policy_panicked` |
//! | `/oversized` | answers an allow with 512 headers of 1 KiB | deny `policy_decision_too_large` |
//! | `/alias-decision` | answers an allow removing 100 headers whose names are one 1 MiB string (100 MiB to copy, 1 MiB of its memory) | deny `policy_transfer_too_large`, the host having copied at most 1 MiB |
//! | `/log-huge` | writes a 2 MiB log line | deny `policy_transfer_too_large` |
//! | `/malformed` | answers a deny with status 200 | deny `policy_malformed_decision` |
//! | `/residue` | reports whether a marker an earlier check wrote to memory is still there, then writes it | allow with `x-residue: clean` |
//!
//! Built for `wasm32-wasip2`, it also attacks WASI (the host grants nothing):
//!
//! | path | what it does | the host must answer |
//! |---|---|---|
//! | `/wasi/file` | reads `/etc/passwd` | deny `policy_panicked` (no directory is preopened) |
//! | `/wasi/env` | reads `PATH` from the environment | deny `policy_panicked` (the environment is empty) |
//! | `/wasi/clock-spin` | busy-waits a second on the monotonic clock | deny `policy_timeout` |
//! | `/wasi/exit` | calls `std::process::exit(7)` | deny `policy_exited` |
//! | `/wasi/sleep` | sleeps an hour | allow at once (virtual time), `x-slept-secs` ≥ 3600 |
//! | `/wasi/print` | prints to stdout and stderr | allow, the lines in the check's log |
//! | `/wasi/handles` | holds 50,000 pollables (host memory outside its own) | deny `policy_trap` (handles are capped) |
//! | `/wasi/observe` | reads the wall clock, randomness and stdin | allow, with what it saw as headers |
//! | `/echo` | reads every part of the request (contract 0.2.0's `request` interface) | allow, with what it read as headers |
//! | `/principal` | reads the credential only through `principal` and `claim` | allow, with what it read as headers |
//! | `/principal-after-credential` | the same, after reading the whole credential | the same answers |
//! | `/verify-flood` | asks the host to verify 10,000 tokens | deny `verified_all`, all but the first 16 answered `too_many_verifications` |
//! | `/verify-huge` | asks the host to verify a 512 KiB token | deny `verified_all`, answered `token_too_large` |
//! | `/log-id-token` | verifies the `x-id-token` header and writes it in a log line | allow; the decision record holds no token |
//! | `/verify-claim-token` | verifies the token in the bearer's `id_token` claim | allow; the decision record holds no token |
//! | anything else | allows | allow |

use sandgate_policy_sdk::{Decision, DecisionExt, LogLevel, Policy, Request, allow, deny, host};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

static COUNTER: AtomicU64 = AtomicU64::new(0);
static CACHE: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);
static LAZY: LazyLock<Mutex<u64>> = LazyLock::new(|| Mutex::new(0));
thread_local! {
    static LOCAL: Cell<u64> = const { Cell::new(0) };
}

/// Count in every kind of global state; return the counts.
pub fn bump_state() -> [u64; 4] {
    let counter = COUNTER.fetch_add(1, Ordering::SeqCst) + 1;
    let cached = {
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let entry = cache.get_or_insert_with(HashMap::new).entry("requests".into()).or_insert(0);
        *entry += 1;
        *entry
    };
    let local = LOCAL.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    let lazy = {
        let mut l = LAZY.lock().unwrap_or_else(|e| e.into_inner());
        *l += 1;
        *l
    };
    [counter, cached, local, lazy]
}

/// Memory an earlier check would have left its marker in, if instances were reused.
static mut RESIDUE: [u8; 16] = [0; 16];
const MARKER: &[u8; 16] = b"left-by-a-check!";

/// `clean` if no earlier check's marker is in memory; then leave one.
fn residue() -> &'static str {
    // SAFETY: this component has one thread; volatile, so the read is not folded away.
    unsafe {
        let slot = &raw mut RESIDUE;
        let found = std::ptr::read_volatile(slot) == *MARKER;
        std::ptr::write_volatile(slot, *MARKER);
        if found { "found" } else { "clean" }
    }
}

/// The WASI attacks (see the module documentation).
fn wasi(path: &str) -> Option<Decision> {
    use std::hash::BuildHasher;
    use std::io::Read;
    use std::time::{Duration, Instant, SystemTime};
    Some(match path {
        "/wasi/file" => {
            let text = std::fs::read_to_string("/etc/passwd").expect("cannot open a file");
            allow().set_header("x-stolen", text.lines().next().unwrap_or_default())
        }
        "/wasi/env" => {
            let path = std::env::var("PATH").expect("cannot read the environment");
            allow().set_header("x-stolen", &path)
        }
        "/wasi/clock-spin" => {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(1) {
                std::hint::spin_loop();
            }
            allow()
        }
        "/wasi/exit" => std::process::exit(7),
        "/wasi/sleep" => {
            let start = Instant::now();
            std::thread::sleep(Duration::from_secs(3600));
            allow().set_header("x-slept-secs", &start.elapsed().as_secs().to_string())
        }
        #[cfg(target_os = "wasi")]
        "/wasi/handles" => {
            let held: Vec<_> = (0..50_000).map(|_| wasip2::clocks::monotonic_clock::subscribe_duration(0)).collect();
            allow().set_header("x-held", &held.len().to_string())
        }
        "/wasi/print" => {
            println!("hello from stdout");
            eprintln!("hello from stderr");
            allow()
        }
        "/wasi/observe" => {
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let random = std::collections::hash_map::RandomState::new().hash_one("sandgate");
            let mut stdin = Vec::new();
            let read = std::io::stdin().read_to_end(&mut stdin).map(|_| stdin.len().to_string());
            allow()
                .set_header("x-wall-clock", &now.to_string())
                .set_header("x-random", &random.to_string())
                .set_header("x-stdin", &read.unwrap_or_else(|e| format!("error: {e}")))
                .set_header("x-env-count", &std::env::vars().count().to_string())
                .set_header("x-args-count", &std::env::args().count().to_string())
        }
        _ => return None,
    })
}

#[inline(never)]
#[allow(unconditional_recursion, reason = "runaway recursion is the point: it must overflow the stack")]
fn recurse(depth: u64) -> u64 {
    std::hint::black_box(recurse(std::hint::black_box(depth + 1))) + 1
}

/// The hostile policy.
pub struct Hostile;

impl Policy for Hostile {
    /// With data `{"prepare": "state"}`, counts once in every kind of state a check counts in
    /// (a prepared instance must start every check from that, never from a check's writes);
    /// with `{"prepare": "loop"}`, never returns.
    fn prepare() -> bool {
        match sandgate_policy_sdk::host::data_get("/prepare").as_deref() {
            Some("\"state\"") => {
                bump_state();
                true
            }
            Some("\"loop\"") => loop {
                std::hint::black_box(());
            },
            _ => false,
        }
    }

    fn check(request: &Request) -> Decision {
        match request.path() {
            "/state" => {
                let [counter, cache, local, lazy] = bump_state();
                allow()
                    .set_header("x-static-counter", &counter.to_string())
                    .set_header("x-global-cache", &cache.to_string())
                    .set_header("x-thread-local", &local.to_string())
                    .set_header("x-lazy-global", &lazy.to_string())
            }
            // The runtime probes every policy before publishing it; this one loops there.
            "/.sandgate/probe" if option_env!("SANDGATE_FIXTURE_SERVABLE").is_some() => allow(),
            "/loop" | "/.sandgate/probe" => {
                let mut i = 0u64;
                loop {
                    i = std::hint::black_box(i.wrapping_add(1));
                }
            }
            "/memory-bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            // One check that writes 1 MiB of its memory and allows: the slot it ran in must
            // serve later checks as fast as a clean one (`decision` benchmark, "polluted slot").
            "/write-1mib" => {
                let written = std::hint::black_box(vec![1u8; 1 << 20]);
                allow().set_header("x-written", &written.len().to_string())
            }
            "/recursion" => allow().set_header("x-depth", &recurse(0).to_string()),
            "/panic" => panic!("policy gave up"),
            "/abort" => std::process::abort(),
            "/oversized" => (0..512).fold(allow(), |d, i| d.set_header(&format!("x-filler-{i}"), &"x".repeat(1024))),
            "/alias-decision" => alias_decision(),
            "/log-huge" => {
                host::log(LogLevel::Info, &"x".repeat(2 << 20));
                allow()
            }
            "/malformed" => deny(200, "not_really_a_denial"),
            "/residue" => allow().set_header("x-residue", residue()),
            "/echo" => echo(request),
            "/principal" => principal(request),
            "/principal-after-credential" => {
                std::hint::black_box(request.verdict());
                principal(request)
            }
            // Host work the guest asks for outside its own memory: as many token verifications
            // as its time allows, and one token as long as its memory allows.
            "/verify-flood" => verify_all((0..10_000).map(|i| format!("not.a.token{i}"))),
            "/verify-huge" => verify_all(std::iter::once("x".repeat(512 << 10))),
            // A token the policy verified, written where the record keeps what the policy says.
            "/log-id-token" => {
                let token = request.header("x-id-token").unwrap_or_default();
                let verdict = host::verify_jwt(&token).map_or_else(|e| e.reason, |_| "verified".into());
                host::log(LogLevel::Info, &format!("id token {token}: {verdict}"));
                allow()
            }
            // A token that reaches the policy only inside the verified bearer's claims.
            "/verify-claim-token" => {
                let token = request.claim("id_token").and_then(|t| t.as_str().map(str::to_owned)).unwrap_or_default();
                match host::verify_jwt(&token) {
                    Ok(_) => allow(),
                    Err(e) => deny(403, &e.reason),
                }
            }
            path => wasi(path).unwrap_or_else(allow),
        }
    }
}

/// An allow removing 100 headers that all name the same 1 MiB string: the list holds 100
/// pointers to one buffer, so the answer costs the policy 1 MiB of its memory and a host that
/// copied it whole 100 MiB of its own.
fn alias_decision() -> Decision {
    let name = std::mem::ManuallyDrop::new("x".repeat(1 << 20));
    let names = (0..100)
        // SAFETY: none, on purpose: a hostile policy. Every `String` claims the same buffer;
        // none is ever written or freed (the instance is dropped after the check).
        .map(|_| unsafe { String::from_raw_parts(name.as_ptr().cast_mut(), name.len(), name.capacity()) })
        .collect();
    Decision::Allow(sandgate_policy_sdk::AllowResponse { set_headers: Vec::new(), remove_headers: names })
}

/// Verify every token; deny, naming how many were verified or rejected for each reason.
fn verify_all(tokens: impl Iterator<Item = String>) -> Decision {
    let mut answers: Vec<(String, u32)> = Vec::new();
    for token in tokens {
        let reason = match host::verify_jwt(&token) {
            Ok(_) => "verified".to_owned(),
            Err(e) => e.reason,
        };
        match answers.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => answers.push((reason, 1)),
        }
    }
    let summary: Vec<String> = answers.iter().map(|(r, n)| format!("{r}={n}")).collect();
    deny(403, "verified_all").message(&summary.join(" "))
}

/// Every part of the request, as the policy reads it, in headers (`-` for none).
fn echo(request: &Request) -> Decision {
    let subject = match request.credential() {
        Some(c) => format!("{} {} {}", c.claims.subject, c.claims.roles.join(","), c.algorithm),
        None => "-".into(),
    };
    let headers: Vec<String> = request.headers().iter().map(|h| format!("{}={}", h.name, h.value)).collect();
    let versions = request.versions();
    allow()
        .set_header("x-request-id", request.request_id())
        .set_header("x-method", request.method())
        .set_header("x-scheme", request.scheme())
        .set_header("x-host", request.host())
        .set_header("x-query", request.query().unwrap_or("-"))
        .set_header("x-user-agent", &request.header("User-Agent").unwrap_or_else(|| "-".into()))
        .set_header("x-absent", &request.header("x-absent").unwrap_or_else(|| "-".into()))
        .set_header("x-headers", &headers.join(";"))
        .set_header("x-peer", request.peer().unwrap_or("-"))
        .set_header("x-body", &request.body().map_or("-".into(), |b| String::from_utf8_lossy(b).into_owned()))
        .set_header("x-subject", &subject)
        .set_header("x-bearer", &request.bearer_token().unwrap_or_else(|| "-".into()))
        .set_header("x-now", &request.now().to_string())
        .set_header("x-versions", &format!("{} {} {}", versions.snapshot, versions.data, versions.policy_digest))
}

/// What the narrow credential getters answer, read before anything else could read the whole
/// credential.
fn principal(request: &Request) -> Decision {
    let subject = request.subject().unwrap_or("-").to_owned();
    let roles = request.roles().join(",");
    let claim = |name: &str| request.claim(name).map_or("-".into(), |v| v.to_string());
    let (tenant, nested, absent) = (claim("tenant"), claim("org"), claim("absent"));
    let unauthenticated = request.unauthenticated().map_or("-".into(), |d| match d {
        Decision::Deny(d) => d.reason,
        Decision::Allow(_) => "allow".into(),
    });
    allow()
        .set_header("x-subject", &subject)
        .set_header("x-roles", &roles)
        .set_header("x-scopes", &format!("{} {}", request.has_scope("orders:read"), request.has_scope("orders")))
        .set_header("x-claims", &format!("{tenant} {nested} {absent}"))
        .set_header("x-unauthenticated", &unauthenticated)
}

sandgate_policy_sdk::export_policy!(Hostile);
