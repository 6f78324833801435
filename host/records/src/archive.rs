//! The archive: every module and data document that served a captured check, by SHA-256, in
//! the module cache's layout (`DIR/blobs/sha256/<hex>`, files 0600 in 0700 directories, written
//! whole or not at all). Replay reads modules and data from it by the digests a record names;
//! a module cache (`[registry] cache_dir`) is an archive of the modules it pulled.

use sandgate_registry::Cache;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Mutex, mpsc};

/// Writes blobs to an archive directory from its own thread; a check never waits on the disk.
pub struct Archive {
    /// Digests already handed to the writer.
    kept: Mutex<HashSet<String>>,
    writer: Mutex<mpsc::Sender<Vec<u8>>>,
    dir: PathBuf,
}

impl Archive {
    /// An archive in `dir`, written by a thread of its own.
    pub fn start(dir: PathBuf) -> std::io::Result<Archive> {
        let (writer, blobs) = mpsc::channel::<Vec<u8>>();
        let cache = Cache::new(dir.clone());
        std::thread::Builder::new().name("sandgate-archive".into()).spawn(move || {
            for blob in blobs {
                if let Err(e) = cache.write_blob(&blob) {
                    tracing::error!(dir = %cache.dir().display(), error = %e, "cannot archive a module or data document: replay will miss it");
                }
            }
        })?;
        Ok(Archive { kept: Mutex::new(HashSet::new()), writer: Mutex::new(writer), dir })
    }

    /// Where it lives.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Keep the blob with `digest` (`sha256:…`), made by `bytes` only if it is not kept yet.
    pub fn keep(&self, digest: &str, bytes: impl FnOnce() -> Vec<u8>) {
        {
            let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            if kept.contains(digest) {
                return;
            }
            kept.insert(digest.to_owned());
        }
        let _ = self.writer.lock().unwrap_or_else(|e| e.into_inner()).send(bytes());
    }

    /// Whether `digest` was handed to the writer already (a cheap check before building bytes).
    pub fn has(&self, digest: &str) -> bool {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).contains(digest)
    }
}
