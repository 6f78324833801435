//! A policy author's workflow end to end with the real `sandgate` binary: `new` → `cargo test`
//! → `build` → `test` in a fresh directory, a broken fixture failing by name, and the errors a
//! newcomer hits each saying what to do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test: a failed set-up should stop it loudly"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sandgate() -> PathBuf {
    sandgate_tests::sandgate_binary()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("command runs");
    eprintln!("$ {cmd:?}\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sandgate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Share the workspace's target directory so the SDK's dependencies are not built again.
fn in_crate(program: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(dir).env("CARGO_TARGET_DIR", sandgate_tests::workspace().join("target/policy-workflow"));
    cmd
}

#[test]
fn new_build_test_from_scratch_and_a_broken_fixture_is_named() {
    let root = temp_dir("workflow");
    let sdk = sandgate_tests::workspace().join("guest-policies/sdk");
    let out = run(Command::new(sandgate()).current_dir(&root).args(["new", "doc-access", "--sdk"]).arg(&sdk));
    assert!(out.status.success());
    let policy = root.join("doc-access");
    for file in ["Cargo.toml", "src/lib.rs", "fixtures.json"] {
        assert!(policy.join(file).is_file(), "{file} was not created");
    }

    let out = run(in_crate(Path::new("cargo"), &policy).args(["test", "--quiet"]));
    assert!(out.status.success(), "the scaffold's native tests fail");

    let out = run(in_crate(&sandgate(), &policy).args(["build"]));
    assert!(out.status.success());
    let report = text(&out);
    assert!(report.contains("sha256 ") && report.contains(" bytes"), "build prints digest and size: {report}");
    assert!(
        report.contains("contract sandgate:policy@0.2.0"),
        "a new policy is built against the current contract: {report}"
    );

    let out = run(in_crate(&sandgate(), &policy).args(["test"]));
    assert!(out.status.success());
    assert!(text(&out).contains("4 passed, 0 failed"));

    // The same crate with the standard toolchain's target: a component importing WASI.
    let out = run(in_crate(&sandgate(), &policy).args(["build", "--target", "wasm32-wasip2", "--out", "p2.wasm"]));
    assert!(out.status.success());
    let component = std::fs::read(policy.join("p2.wasm")).unwrap();
    assert!(component.windows(b"wasi:cli/".len()).any(|w| w == b"wasi:cli/"), "a wasip2 build imports wasi:cli");
    let out = run(in_crate(&sandgate(), &policy).args(["test", "--target", "wasm32-wasip2"]));
    assert!(out.status.success());
    assert!(text(&out).contains("4 passed, 0 failed"));

    // Break one expectation: `test` fails, naming the case and what differed.
    let fixtures = std::fs::read_to_string(policy.join("fixtures.json")).unwrap();
    let broken = fixtures.replace(r#""headers": { "x-user": "bob" }"#, r#""headers": { "x-user": "mallory" }"#);
    assert_ne!(fixtures, broken);
    std::fs::write(policy.join("fixtures.json"), broken).unwrap();
    let out = run(in_crate(&sandgate(), &policy).args(["test"]));
    assert!(!out.status.success(), "a failing case must fail the command");
    let report = text(&out);
    assert!(report.contains("FAILED  a writer may write"), "{report}");
    assert!(report.contains(r#"expected "mallory", got "bob""#), "{report}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Without `--sdk`, a new policy depends on the SDK from crates.io, so the crate builds on any
/// machine, not only beside this checkout.
#[test]
fn a_new_policy_depends_on_the_released_sdk() {
    let root = temp_dir("released-sdk");
    let out = run(Command::new(sandgate()).current_dir(&root).args(["new", "portable"]));
    assert!(out.status.success());
    let manifest = std::fs::read_to_string(root.join("portable/Cargo.toml")).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert!(manifest.contains(&format!("sandgate-policy-sdk = \"{version}\"")), "{manifest}");
    assert!(!manifest.contains("path ="), "no path to this checkout: {manifest}");
    let out = run(Command::new(sandgate()).current_dir(&root).args(["new", "local", "--sdk", "/nonexistent/sdk"]));
    assert!(!out.status.success(), "a missing --sdk is an error");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_fixture_typo_names_the_file_and_field() {
    let root = temp_dir("typo");
    std::fs::write(
        root.join("fixtures.json"),
        r#"{"cases": [{"name": "x", "request": {"path": "/", "methd": "GET"}, "expect": {"decision": "allow"}}]}"#,
    )
    .unwrap();
    let wasm = sandgate_tests::workspace().join("target/policies/rbac.wasm");
    let out = run(Command::new(sandgate())
        .arg("test")
        .arg("--policy")
        .arg(&wasm)
        .arg("--fixtures")
        .arg(root.join("fixtures.json")));
    assert_eq!(out.status.code(), Some(2));
    let report = text(&out);
    assert!(
        report.contains("fixtures.json") && report.contains("unknown field `methd`") && report.contains("line 1"),
        "{report}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_crate_that_is_not_a_policy_says_what_it_needs() {
    let root = temp_dir("notpolicy");
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::write(
        root.join("Cargo.toml"),
        "[package]\nname = \"plain\"\nversion = \"0.1.0\"\nedition = \"2024\"\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(root.join("src/lib.rs"), "pub fn f() {}\n").unwrap();
    let out = run(in_crate(&sandgate(), &root).args(["build"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("crate-type = [\\\"cdylib\\\"]") || text(&out).contains("cdylib"), "{}", text(&out));

    let out = run(Command::new(sandgate()).arg("build").arg(root.join("nope")));
    assert!(text(&out).contains("has no Cargo.toml"), "{}", text(&out));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_missing_wasm_target_gives_the_rustup_line() {
    let root = temp_dir("notarget");
    // A `rustup` that reports only the host target installed.
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("rustup");
    std::fs::write(&fake, "#!/bin/sh\necho x86_64-unknown-linux-gnu\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = run(Command::new(sandgate())
        .env("PATH", path)
        .arg("build")
        .arg(sandgate_tests::workspace().join("guest-policies/rbac")));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("rustup target add wasm32-unknown-unknown"), "{}", text(&out));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn bad_names_and_existing_directories_are_refused() {
    let root = temp_dir("badname");
    let out = run(Command::new(sandgate()).current_dir(&root).args(["new", "Bad Name"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("not a valid policy name"));
    std::fs::create_dir_all(root.join("taken")).unwrap();
    std::fs::write(root.join("taken/file"), "x").unwrap();
    let out = run(Command::new(sandgate()).current_dir(&root).args(["new", "taken"]));
    assert!(text(&out).contains("already exists"));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn eval_prints_any_decision_with_exit_0_and_bad_input_exits_2_with_a_message() {
    let root = temp_dir("eval");
    let workspace = sandgate_tests::workspace();
    let policy = workspace.join("target/policies/rbac.wasm");
    let data = workspace.join("examples/rbac-data.json");
    let request = root.join("req.json");
    let eval = |request: &Path| {
        run(Command::new(sandgate())
            .arg("eval")
            .arg("--policy")
            .arg(&policy)
            .arg("--request")
            .arg(request)
            .arg("--data")
            .arg(&data))
    };

    std::fs::write(
        &request,
        r#"{"method": "DELETE", "path": "/api/orders/7", "claims": {"sub": "alice", "roles": ["reader"]}}"#,
    )
    .unwrap();
    let out = eval(&request);
    assert_eq!(out.status.code(), Some(0), "a deny is still a successful evaluation");
    let decision: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (decision["decision"].as_str(), decision["status"].as_u64(), decision["reason"].as_str()),
        (Some("deny"), Some(403), Some("forbidden"))
    );

    std::fs::write(
        &request,
        r#"{"method": "GET", "path": "/api/orders/7", "claims": {"sub": "alice", "roles": ["reader"]}}"#,
    )
    .unwrap();
    let decision: serde_json::Value = serde_json::from_slice(&eval(&request).stdout).unwrap();
    assert_eq!(decision["decision"], "allow");

    std::fs::write(&request, r#"{"pth": "/api"}"#).unwrap();
    let out = eval(&request);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("unknown field `pth`"), "{}", text(&out));

    std::fs::write(&request, r#"{"path": "/"}"#).unwrap();
    let out = run(Command::new(sandgate())
        .arg("eval")
        .arg("--policy")
        .arg(root.join("missing.wasm"))
        .arg("--request")
        .arg(&request));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("cannot read policy"), "{}", text(&out));

    std::fs::write(root.join("notwasm.wasm"), "hello").unwrap();
    let out = run(Command::new(sandgate())
        .arg("eval")
        .arg("--policy")
        .arg(root.join("notwasm.wasm"))
        .arg("--request")
        .arg(&request));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("not a WebAssembly file"), "{}", text(&out));
    let _ = std::fs::remove_dir_all(&root);
}
