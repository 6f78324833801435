//! The watched policy directory follows symlinks (a Kubernetes ConfigMap swaps its `..data`
//! link) and treats a failed scan as "no information", never as "every policy is gone".
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a test: a failed set-up should stop it loudly"
)]

use sandgate_server::{Config, State};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn config(dir: &Path) -> Config {
    let mut config: Config =
        config_from_toml(&format!("[server]\nproxy = \"envoy\"\npolicy_dir = \"{}\"\n", dir.display()));
    config.server.policy_dir_poll_ms = 20;
    config
}

fn config_from_toml(text: &str) -> Config {
    let path = std::env::temp_dir().join(format!("sandgate-policy-dir-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    Config::from_file(&path).unwrap()
}

/// The digest of policy `id` once `check` holds for it, waiting at most 10 s.
async fn wait_for(state: &State, id: &str, check: impl Fn(Option<&str>) -> bool) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snapshot = state.store.load();
        let digest = snapshot.policies.get(id).map(|p| p.module.digest().to_owned());
        if check(digest.as_deref()) || Instant::now() > deadline {
            return digest;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_symlink_reloads_and_a_failed_scan_unloads_nothing() {
    let root = std::env::temp_dir().join(format!("sandgate-policy-dir-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (v1, v2, dir) = (root.join("v1"), root.join("v2"), root.join("policies"));
    for d in [&v1, &v2, &dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(v1.join("live.wasm"), sandgate_tests::policy_bytes("versioned-v1")).unwrap();
    std::fs::write(v2.join("live.wasm"), sandgate_tests::policy_bytes("versioned-v2")).unwrap();
    // The ConfigMap layout: `..data` → a version directory, `live.wasm` → `..data/live.wasm`.
    std::os::unix::fs::symlink(&v1, dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/live.wasm", dir.join("live.wasm")).unwrap();

    let config = config(&dir);
    let state = State::from_config(&config).await.unwrap();
    let stop = CancellationToken::new();
    let watcher = tokio::spawn(sandgate_server::policy_dir::watch(
        state.clone(),
        dir.clone(),
        Duration::from_millis(20),
        stop.clone(),
    ));

    let first = wait_for(&state, "live", |d| d.is_some()).await.expect("loaded through the symlink");
    // Swap `..data` atomically, as the kubelet does.
    std::os::unix::fs::symlink(&v2, root.join("next")).unwrap();
    std::fs::rename(root.join("next"), dir.join("..data")).unwrap();
    let second = wait_for(&state, "live", |d| d.is_some_and(|d| d != first)).await;
    assert!(second.as_deref().is_some_and(|d| d != first), "the new target was never loaded");

    // The directory unreadable for a while (here: moved away): nothing is unloaded.
    std::fs::rename(&dir, root.join("away")).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(Arc::clone(&state).store.load().policies.contains_key("live"), "a failed scan unloaded the policy");
    std::fs::rename(root.join("away"), &dir).unwrap();

    // And a module that really leaves is unloaded.
    std::fs::remove_file(dir.join("live.wasm")).unwrap();
    assert_eq!(wait_for(&state, "live", |d| d.is_none()).await, None);
    stop.cancel();
    watcher.await.unwrap();
    let _ = std::fs::remove_dir_all(&root);
}
