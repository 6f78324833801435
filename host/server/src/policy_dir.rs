//! The watched policy directory: `ID.wasm` (and `ID.json`, its data) load as policy `ID`
//! through the same [`State`] calls as the admin API.

use crate::state::{ChangeError, State};
use bytes::Bytes;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// What identifies a file's content between scans: its size, modification time and inode,
/// read through symlinks (a Kubernetes ConfigMap swaps its `..data` link to a new directory:
/// the names stay, every target changes).
type Stamp = (u64, SystemTime, u64);

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?; // follows symlinks
    Ok((meta.len(), meta.modified().unwrap_or(UNIX_EPOCH), meta.ino()))
}

/// Watch `dir`: `ID.wasm` (and `ID.json`, its data) are loaded when they appear or change,
/// symlinks followed, and the policy is unloaded when its module disappears (its routes then
/// answer 403). A file is loaded once it has stayed the same for one scan, so a half-written
/// copy is not read. A scan that fails (the directory unreadable for a moment, a link
/// mid-swap) tells nothing: nothing is unloaded on it. Every load and unload is logged.
pub async fn watch(state: Arc<State>, dir: PathBuf, every: Duration, stop: CancellationToken) {
    let mut seen: HashMap<PathBuf, Stamp> = HashMap::new();
    let mut loaded: HashMap<PathBuf, Stamp> = HashMap::new();
    let mut failing = false;
    loop {
        match scan(&dir) {
            Ok(files) => {
                failing = false;
                for (path, stamp) in &files {
                    let Some(stamp) = stamp else { continue }; // unreadable now: no information
                    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
                    let stable = seen.insert(path.clone(), *stamp) == Some(*stamp);
                    if stable && loaded.get(path) != Some(stamp) && load_from_dir(&state, path, ext).await {
                        loaded.insert(path.clone(), *stamp);
                    }
                }
                for gone in loaded.keys().filter(|p| !files.contains_key(*p)).cloned().collect::<Vec<_>>() {
                    loaded.remove(&gone);
                    seen.remove(&gone);
                    unload(&state, &gone);
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read the policy directory; keeping what is loaded");
                }
                failing = true;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// The `.wasm` and `.json` files in `dir`, each with its stamp (`None`: present but unreadable
/// right now).
fn scan(dir: &Path) -> std::io::Result<HashMap<PathBuf, Option<Stamp>>> {
    let mut files = HashMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if matches!(path.extension().and_then(|e| e.to_str()), Some("wasm" | "json")) {
            let stamp = stamp(&path).ok();
            files.insert(path, stamp);
        }
    }
    Ok(files)
}

fn unload(state: &State, path: &Path) {
    if path.extension().is_none_or(|e| e != "wasm") {
        return;
    }
    let Some(id) = path.file_stem().and_then(|s| s.to_str()) else { return };
    match state.remove_policy(id, true) {
        Ok(snapshot) => {
            tracing::info!(policy = id, file = %path.display(), snapshot = snapshot.version, "unloaded: its module left the policy directory")
        }
        Err(e) => tracing::warn!(policy = id, error = %e, "module removed from the policy directory"),
    }
}

/// Load one file; `false` when the failure may pass (a read error, no free instance for the
/// probe, the host failing), so the next scan tries again. A module or document that is
/// refused for what it is waits until the file changes.
async fn load_from_dir(state: &State, path: &Path, ext: &str) -> bool {
    let Some(id) = path.file_stem().and_then(|s| s.to_str()) else { return true };
    let result = match (ext, std::fs::read(path)) {
        ("wasm", Ok(bytes)) => state.put_policy(id, Bytes::from(bytes)).await.map(|_| ()),
        ("json", Ok(bytes)) if state.store.load().policies.contains_key(id) => match serde_json::from_slice(&bytes) {
            Ok(value) => state.put_data(id, value).map(|_| ()),
            Err(e) => Err(ChangeError::BadInput(format!("not JSON: {e}"))),
        },
        (_, Ok(_)) => Ok(()), // data for a module not loaded yet: loaded with it
        (_, Err(e)) => {
            tracing::warn!(policy = id, file = %path.display(), error = %e, "cannot read; will retry");
            return false;
        }
    };
    let transient = matches!(
        &result,
        Err(ChangeError::Probe(sandgate_runtime::PolicyFault::Overloaded) | ChangeError::Internal(_))
    );
    match &result {
        Ok(()) => tracing::info!(policy = id, file = %path.display(), "loaded from the policy directory"),
        Err(e) => {
            tracing::warn!(policy = id, file = %path.display(), error = %e, retry = transient, "not loaded; the previous version keeps serving")
        }
    }
    // A module loaded after its data file: give it the data now.
    if ext == "wasm" && state.store.load().policies.get(id).is_some_and(|p| p.data.version == 0) {
        let data_path = path.with_extension("json");
        if let Ok(bytes) = std::fs::read(&data_path)
            && let Ok(value) = serde_json::from_slice::<Value>(&bytes)
        {
            let _ = state.put_data(id, value);
        }
    }
    !transient
}
