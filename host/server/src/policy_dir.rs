//! The watched policy directory: `ID.wasm` (and `ID.json`, its data) load as policy `ID`
//! through the same [`State`] calls as the admin API.

use crate::state::{ChangeError, State};
use bytes::Bytes;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// Watch `dir`: `ID.wasm` (and `ID.json`, its data) are loaded when they appear or change,
/// and the policy is unloaded when its module disappears (its routes then answer 403). A file is loaded once it has stayed
/// the same size and modification time for one scan, so a half-written copy is not read.
pub async fn watch(state: Arc<State>, dir: PathBuf, every: Duration, stop: CancellationToken) {
    type Stamp = (u64, SystemTime);
    {
        let mut seen: HashMap<PathBuf, Stamp> = HashMap::new();
        let mut loaded: HashMap<PathBuf, Stamp> = HashMap::new();
        loop {
            let mut present = HashSet::new();
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    let Some(ext) = path.extension().and_then(|e| e.to_str()) else { continue };
                    if ext != "wasm" && ext != "json" {
                        continue;
                    }
                    let Ok(meta) = entry.metadata() else { continue };
                    let stamp = (meta.len(), meta.modified().unwrap_or(UNIX_EPOCH));
                    present.insert(path.clone());
                    let stable = seen.insert(path.clone(), stamp) == Some(stamp);
                    if stable && loaded.get(&path) != Some(&stamp) {
                        loaded.insert(path.clone(), stamp);
                        load_from_dir(&state, &path, ext).await;
                    }
                }
            }
            for gone in loaded.keys().filter(|p| !present.contains(*p)).cloned().collect::<Vec<_>>() {
                loaded.remove(&gone);
                seen.remove(&gone);
                if gone.extension().is_some_and(|e| e == "wasm")
                    && let Some(id) = gone.file_stem().and_then(|s| s.to_str())
                    && let Err(e) = state.remove_policy(id, true)
                {
                    tracing::warn!(policy = id, error = %e, "module removed from the policy directory");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

async fn load_from_dir(state: &State, path: &Path, ext: &str) {
    let Some(id) = path.file_stem().and_then(|s| s.to_str()) else { return };
    let result = match (ext, std::fs::read(path)) {
        ("wasm", Ok(bytes)) => state.put_policy(id, Bytes::from(bytes)).await.map(|_| ()),
        ("json", Ok(bytes)) if state.store.load().policies.contains_key(id) => match serde_json::from_slice(&bytes) {
            Ok(value) => state.put_data(id, value).map(|_| ()),
            Err(e) => Err(ChangeError::BadInput(format!("not JSON: {e}"))),
        },
        (_, Ok(_)) => Ok(()), // data for a module not loaded yet: loaded with it
        (_, Err(e)) => Err(ChangeError::BadInput(format!("cannot read: {e}"))),
    };
    match result {
        Ok(()) => tracing::info!(policy = id, file = %path.display(), "loaded from the policy directory"),
        Err(e) => {
            tracing::warn!(policy = id, file = %path.display(), error = %e, "not loaded; the previous version keeps serving")
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
}
