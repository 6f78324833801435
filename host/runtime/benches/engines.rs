//! The same authorization rules, on the same inputs, in one run, through five engines:
//! Sandgate's fresh-instance Wasm path, the reused-instance floor (isolation off, for
//! comparison only), native Rust (the same policy code), Rego via `regorus`, and Cedar via
//! `cedar-policy`. Rule sets: the RBAC example (roles from a data document → methods and path
//! patterns) and tenant isolation. Before timing, every engine must agree on every input.
//!
//! Run: `scripts/build-policies.sh && cargo bench -p sandgate-runtime --features bench --bench engines`. After criterion's
//! runs, each rule set is timed again with the engines interleaved (see [`interleaved`]): the
//! figures to compare on a noisy machine.
//!
//! What each engine is handed: Sandgate gets the check request as the server builds one, a copy
//! of the request's strings and of the verified credential the token cache holds (built once
//! per input, copied per decision); native Rust gets the same request in the SDK's types;
//! regorus gets the same facts as a JSON input document; Cedar gets a principal entity (the
//! subject, with its roles as parents and its tenant as an attribute) and a resource entity (the
//! path, and the tenant id the host parsed out of it, since Cedar cannot split strings).
//! Building those inputs is timed, as copying the check request is.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark: a failed set-up should stop it loudly"
)]

use cedar_policy::{Authorizer, Context, Entities, Entity, EntityUid, PolicySet, RestrictedExpression};
use criterion::{Criterion, criterion_group};
use sandgate_policy_sdk::{Policy, testing};
use sandgate_runtime::PolicyData;
use sandgate_runtime::ReusedInstance;
use sandgate_runtime::bindings::sandgate::policy::types::{CheckRequest, Decision, SnapshotVersions};
use sandgate_runtime::{EvalContext, PolicyModule, Runtime, RuntimeConfig, Start, spec as request};
use sandgate_spec::RequestSpec;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::hint::black_box;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// One authorization question, in the form every engine is built from.
#[derive(Clone)]
struct Input {
    method: &'static str,
    path: &'static str,
    subject: &'static str,
    roles: Vec<&'static str>,
    tenant: Option<&'static str>,
}

fn input(method: &'static str, path: &'static str, roles: &[&'static str], tenant: Option<&'static str>) -> Input {
    Input { method, path, subject: "alice", roles: roles.to_vec(), tenant }
}

fn rbac_inputs() -> Vec<Input> {
    vec![
        input("GET", "/api/orders/7", &["reader"], None),
        input("POST", "/api/orders/7", &["reader"], None),
        input("POST", "/api/orders/7", &["reader", "writer"], None),
        input("PUT", "/api/users/1", &["writer"], None),
        input("DELETE", "/admin/cache", &["admin"], None),
        input("GET", "/apix/secret", &["reader"], None),
        input("GET", "/api/x", &["superuser"], None),
        input("GET", "/api/x", &[], None),
    ]
}

fn tenant_inputs() -> Vec<Input> {
    vec![
        input("GET", "/tenants/acme/orders", &[], Some("acme")),
        input("GET", "/tenants/globex/orders", &[], Some("acme")),
        input("GET", "/tenants/acme2/orders", &[], Some("acme")),
        input("GET", "/tenants/globex/orders", &["platform-admin"], Some("acme")),
        input("GET", "/tenants/acme/orders", &[], None),
        input("GET", "/health/deep", &[], Some("acme")),
    ]
}

const REGO_RBAC: &str = r#"
package sandgate.rbac
import rego.v1

default allow := false

allow if {
    some role in input.roles
    some rule in data.roles[role]
    method_ok(rule.methods)
    some pattern in rule.paths
    path_ok(pattern)
}

method_ok(methods) if "*" in methods
method_ok(methods) if upper(input.method) in methods

path_ok(pattern) if glob.match(pattern, ["/"], input.path)
path_ok(pattern) if {
    endswith(pattern, "/**")
    input.path == trim_suffix(pattern, "/**")
}
"#;

const REGO_TENANT: &str = r#"
package sandgate.tenant
import rego.v1

default allow := false

segments := split(input.path, "/")
tenant_path if {
    segments[1] == "tenants"
    count(segments) > 2
    segments[2] != ""
}

allow if not tenant_path
allow if {
    tenant_path
    segments[2] == input.tenant
}
allow if {
    tenant_path
    some role in input.roles
    role in data.cross_tenant_roles
}
"#;

const CEDAR_TENANT: &str = r#"
permit(principal, action, resource) when { !(resource has tenant) };
permit(principal, action, resource) when { resource has tenant && principal has tenant && principal.tenant == resource.tenant };
permit(principal in Role::"platform-admin", action, resource) when { resource has tenant };
"#;

/// The Cedar policies equivalent to the RBAC data document: one `permit` per role rule.
fn cedar_rbac(data: &Value) -> String {
    let mut text = String::new();
    for (role, rules) in data["roles"].as_object().into_iter().flatten() {
        for rule in rules.as_array().into_iter().flatten() {
            let methods: Vec<&str> =
                rule["methods"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            let action = if methods.contains(&"*") {
                "action".to_owned()
            } else {
                let list: Vec<String> = methods.iter().map(|m| format!("Action::{m:?}")).collect();
                format!("action in [{}]", list.join(", "))
            };
            let paths: Vec<String> = rule["paths"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|p| match p.strip_suffix("/**") {
                    Some(prefix) => format!("resource.path == {prefix:?} || resource.path like \"{prefix}/*\""),
                    None => format!("resource.path == {p:?}"),
                })
                .collect();
            text += &format!(
                "permit(principal in Role::{role:?}, {action}, resource) when {{ {} }};\n",
                paths.join(" || ")
            );
        }
    }
    text
}

struct Engines {
    runtime: Runtime,
    module: PolicyModule,
    /// The floor's own runtime: a reused instance writes far more of its memory than a check
    /// does, and a pool slot that once held it would copy those pages back on every later
    /// reset (see docs/BENCHMARKS.md), slowing the fresh path it shared the pool with.
    floor_runtime: Runtime,
    floor_module: PolicyModule,
    context: EvalContext,
    data: Value,
    native: fn(&sandgate_policy_sdk::Request) -> sandgate_policy_sdk::Decision,
    rego: regorus::Engine,
    rego_rule: String,
    cedar: PolicySet,
}

fn spec(i: &Input) -> RequestSpec {
    let mut claims =
        json!({ "iss": "https://issuer.example", "sub": i.subject, "exp": 1_900_000_000u64, "roles": i.roles });
    if let Some(t) = i.tenant {
        claims["tenant"] = json!(t);
    }
    serde_json::from_value(json!({ "method": i.method, "path": i.path, "claims": claims })).expect("spec")
}

fn check_request(i: &Input, digest: &str) -> CheckRequest {
    let versions = SnapshotVersions { snapshot: 1, policy_digest: digest.into(), key_set: 1, revocations: 1, data: 1 };
    request::from_spec(&spec(i), 1_767_225_600, versions)
}

impl Engines {
    fn new(
        policy: &str,
        data: Value,
        native: fn(&sandgate_policy_sdk::Request) -> sandgate_policy_sdk::Decision,
    ) -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let bytes = std::fs::read(root.join(format!("target/policies/{policy}.wasm")))
            .expect("run scripts/build-policies.sh first");
        let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
        let module = runtime.load(&bytes).expect("policy loads");
        let floor_runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
        let floor_module = floor_runtime.load(&bytes).expect("policy loads");
        let context =
            EvalContext { data: Arc::new(PolicyData::new(data.clone(), 1)), verifier: None, start: Start::Prepared };
        let mut rego = regorus::Engine::new();
        let (rego_text, rego_rule) = if policy == "rbac" {
            (REGO_RBAC, "data.sandgate.rbac.allow")
        } else {
            (REGO_TENANT, "data.sandgate.tenant.allow")
        };
        rego.add_policy(format!("{policy}.rego"), rego_text.to_owned()).expect("rego parses");
        rego.add_data(regorus::Value::from_json_str(&data.to_string()).expect("data")).expect("rego data");
        let cedar_text = if policy == "rbac" { cedar_rbac(&data) } else { CEDAR_TENANT.to_owned() };
        let cedar = PolicySet::from_str(&cedar_text).expect("cedar parses");
        Engines {
            runtime,
            module,
            floor_runtime,
            floor_module,
            context,
            data,
            native,
            rego,
            rego_rule: rego_rule.to_owned(),
            cedar,
        }
    }

    fn sandgate(&self, check: &CheckRequest) -> bool {
        let check = Arc::new(check.clone());
        matches!(self.runtime.evaluate(&self.module, &check, &self.context).decision, Decision::Allow(_))
    }

    fn native(&self, request: &sandgate_policy_sdk::Request) -> bool {
        let request = request.clone();
        matches!((self.native)(&request), sandgate_policy_sdk::Decision::Allow(_))
    }

    fn rego(&mut self, i: &Input) -> bool {
        let input =
            json!({ "method": i.method, "path": i.path, "subject": i.subject, "roles": i.roles, "tenant": i.tenant });
        self.rego.set_input(regorus::Value::from_json_str(&input.to_string()).expect("input"));
        self.rego.eval_rule(self.rego_rule.clone()).expect("rego evaluates") == regorus::Value::from(true)
    }

    fn cedar(&self, i: &Input) -> bool {
        let principal = EntityUid::from_str(&format!("User::{:?}", i.subject)).expect("uid");
        let parents: HashSet<EntityUid> =
            i.roles.iter().map(|r| EntityUid::from_str(&format!("Role::{r:?}")).expect("role")).collect();
        let mut user_attrs = HashMap::new();
        if let Some(t) = i.tenant {
            user_attrs.insert("tenant".to_owned(), RestrictedExpression::new_string(t.to_owned()));
        }
        let resource = EntityUid::from_str(r#"Resource::"request""#).expect("uid");
        let mut resource_attrs =
            HashMap::from([("path".to_owned(), RestrictedExpression::new_string(i.path.to_owned()))]);
        let segments: Vec<&str> = i.path.split('/').collect();
        if segments.len() > 2 && segments[1] == "tenants" && !segments[2].is_empty() {
            resource_attrs.insert("tenant".to_owned(), RestrictedExpression::new_string(segments[2].to_owned()));
        }
        let entities = Entities::from_entities(
            [
                Entity::new(principal.clone(), user_attrs, parents).expect("user"),
                Entity::new(resource.clone(), resource_attrs, HashSet::new()).expect("resource"),
            ],
            None,
        )
        .expect("entities");
        let action = EntityUid::from_str(&format!("Action::{:?}", i.method)).expect("action");
        let request = cedar_policy::Request::new(principal, action, resource, Context::empty(), None).expect("request");
        Authorizer::new().is_authorized(&request, &self.cedar, &entities).decision() == cedar_policy::Decision::Allow
    }
}

fn rule_set(c: &mut Criterion, name: &str, mut engines: Engines, inputs: Vec<Input>) {
    // Agreement first: a benchmark of engines that decide differently would compare nothing.
    testing::set_data(engines.data.clone());
    let checks: Vec<CheckRequest> = inputs.iter().map(|i| check_request(i, engines.module.digest())).collect();
    let natives: Vec<sandgate_policy_sdk::Request> =
        inputs.iter().map(|i| testing::request_from_spec(&spec(i), 1_767_225_600)).collect();
    for ((i, check), native) in inputs.iter().zip(&checks).zip(&natives) {
        let answers = [engines.sandgate(check), engines.native(native), engines.rego(i), engines.cedar(i)];
        assert!(
            answers.iter().all(|a| *a == answers[0]),
            "{name}: engines disagree on {} {} roles {:?} tenant {:?}: sandgate/native/rego/cedar = {answers:?}",
            i.method,
            i.path,
            i.roles,
            i.tenant
        );
    }
    let allowed = checks.iter().filter(|c| engines.sandgate(c)).count();
    eprintln!("{name}: all engines agree on {} inputs ({allowed} allowed)", inputs.len());

    let mut group = c.benchmark_group(name);
    // Each iteration decides every input once; times are per decision.
    group.throughput(criterion::Throughput::Elements(inputs.len() as u64));
    group.bench_function("sandgate_fresh_instance", |b| {
        b.iter(|| {
            for check in &checks {
                black_box(engines.sandgate(check));
            }
        })
    });
    group.bench_function("reused_instance_floor", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let chunk = left.min(100);
                let mut reused = ReusedInstance::new(&engines.floor_runtime, &engines.floor_module, &engines.context)
                    .expect("instance");
                let started = std::time::Instant::now();
                for _ in 0..chunk {
                    for check in &checks {
                        // The same work as the fresh path: copy the request, then decide.
                        black_box(reused.check(&Arc::new(check.clone())).expect("check"));
                    }
                }
                elapsed += started.elapsed();
                left -= chunk;
            }
            elapsed
        })
    });
    group.bench_function("native_rust", |b| {
        b.iter(|| {
            for request in &natives {
                black_box(engines.native(request));
            }
        })
    });
    group.bench_function("regorus", |b| {
        b.iter(|| {
            for i in &inputs {
                black_box(engines.rego(i));
            }
        })
    });
    group.bench_function("cedar", |b| {
        b.iter(|| {
            for i in &inputs {
                black_box(engines.cedar(i));
            }
        })
    });
    group.finish();
    interleaved(name, &mut engines, &inputs, &checks, &natives);
}

/// The figures `docs/BENCHMARKS.md` reports: every engine in turn for a short burst (100 passes
/// over the inputs), 51 rounds, so that a burst of noise on this shared machine lands in one
/// round rather than on one engine. Prints each engine's median µs per decision over the rounds
/// and, for each ratio the targets name, the median (and middle half) of the rounds' ratios.
fn interleaved(
    name: &str,
    engines: &mut Engines,
    inputs: &[Input],
    checks: &[CheckRequest],
    natives: &[sandgate_policy_sdk::Request],
) {
    const ROUNDS: usize = 51;
    const PASSES: usize = 100;
    let per_decision =
        |started: std::time::Instant| started.elapsed().as_secs_f64() * 1e6 / (PASSES * inputs.len()) as f64;
    let mut rounds: Vec<[f64; 5]> = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        // µs per decision of `PASSES` passes of `pass` (one pass decides every input once).
        let time = |pass: &mut dyn FnMut()| {
            let started = std::time::Instant::now();
            (0..PASSES).for_each(|_| pass());
            per_decision(started)
        };
        let mut reused =
            ReusedInstance::new(&engines.floor_runtime, &engines.floor_module, &engines.context).expect("instance");
        rounds.push([
            time(&mut || checks.iter().for_each(|c| _ = black_box(engines.sandgate(c)))),
            time(&mut || checks.iter().for_each(|c| _ = black_box(reused.check(&Arc::new(c.clone())).expect("check")))),
            time(&mut || natives.iter().for_each(|r| _ = black_box(engines.native(r)))),
            time(&mut || inputs.iter().for_each(|i| _ = black_box(engines.rego(i)))),
            time(&mut || inputs.iter().for_each(|i| _ = black_box(engines.cedar(i)))),
        ]);
    }
    let quartiles = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 4], v[v.len() / 2], v[v.len() * 3 / 4])
    };
    let names = ["sandgate_fresh_instance", "reused_instance_floor", "native_rust", "regorus", "cedar"];
    eprintln!(
        "{name}, interleaved ({ROUNDS} rounds of {PASSES} passes), median µs per decision and ratio to Sandgate:"
    );
    for (i, engine) in names.iter().enumerate() {
        let (_, time, _) = quartiles(rounds.iter().map(|r| r[i]).collect());
        let (_, ratio, _) = quartiles(rounds.iter().map(|r| r[i] / r[0]).collect());
        eprintln!("  {engine:24} {time:7.2}  {ratio:5.2}");
    }
    for (label, a, b) in [("fresh / floor", 0, 1), ("regorus / fresh", 3, 0), ("fresh / cedar", 0, 4)] {
        let (low, mid, high) = quartiles(rounds.iter().map(|r| r[a] / r[b]).collect());
        eprintln!("  {label:16} {mid:.2} (middle half of rounds {low:.2}–{high:.2})");
    }
}

fn engines(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let rbac_data: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("examples/rbac-data.json")).expect("rbac data"))
            .expect("json");
    rule_set(c, "rbac", Engines::new("rbac", rbac_data, sandgate_policy_rbac::Rbac::check), rbac_inputs());
    let tenant_data = json!({ "cross_tenant_roles": ["platform-admin"] });
    rule_set(
        c,
        "tenant",
        Engines::new("tenant", tenant_data, sandgate_policy_tenant::TenantIsolation::check),
        tenant_inputs(),
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = engines
}
criterion::criterion_main!(benches);
