//! The on-disk, content-addressed cache of pulled artifacts.
//!
//! ```text
//! CACHE_DIR/blobs/sha256/<hex>   manifests and module layers, named by their own digest
//! CACHE_DIR/tags/<hex>.json      {"reference": "oci://…:TAG", "digest": "sha256:…"}: the digest a
//!                                tag last resolved to (file named by the SHA-256 of the reference)
//! CACHE_DIR/signed/<hex>         the fingerprints (SHA-256 of the PEM) of the cosign keys whose
//!                                signature over manifest <hex> was verified, one per line
//! ```
//!
//! Every file is written to a temporary name, flushed and renamed, so a crash never leaves a
//! half-written entry under its final name; and every blob is hashed again when it is read, so
//! a corrupted or tampered file is a miss (and is removed), never a wrong module.

use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A content-addressed cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TagEntry {
    reference: String,
    digest: String,
}

impl Cache {
    /// A cache in `dir` (created when first written).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Cache { dir: dir.into() }
    }

    /// Where it lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        crate::reference::valid_digest(digest)
            .then(|| self.dir.join("blobs").join("sha256").join(digest.trim_start_matches("sha256:")))
    }

    fn tag_path(&self, reference: &str) -> PathBuf {
        self.dir.join("tags").join(format!("{}.json", hex::encode(Sha256::digest(reference.as_bytes()))))
    }

    /// The blob with `digest`, if cached, at most `limit` bytes, and its bytes still hash to
    /// `digest`. A corrupted file is removed and reported as a miss.
    pub fn read_blob(&self, digest: &str, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
        let Some(path) = self.blob_path(digest) else { return Ok(None) };
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() > limit => return Ok(None),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if sha256_digest(&bytes) != digest {
            tracing::warn!(path = %path.display(), digest, "a cached blob does not match its digest; removing it");
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Store `bytes` under their own digest.
    pub fn write_blob(&self, bytes: &[u8]) -> std::io::Result<String> {
        let digest = sha256_digest(bytes);
        let Some(path) = self.blob_path(&digest) else { return Err(std::io::Error::other("unreachable digest form")) };
        if !path.exists() {
            write_atomically(&path, bytes)?;
        }
        Ok(digest)
    }

    /// The digest `reference` (a tag reference) last resolved to.
    pub fn read_tag(&self, reference: &str) -> std::io::Result<Option<String>> {
        let text = match std::fs::read(self.tag_path(reference)) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let entry: Option<TagEntry> = serde_json::from_slice(&text).ok();
        Ok(entry.filter(|e| e.reference == reference && crate::reference::valid_digest(&e.digest)).map(|e| e.digest))
    }

    /// Remember that `reference` resolved to `digest`.
    pub fn write_tag(&self, reference: &str, digest: &str) -> std::io::Result<()> {
        let entry = TagEntry { reference: reference.to_owned(), digest: digest.to_owned() };
        let text = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        write_atomically(&self.tag_path(reference), &text)
    }
}

impl Cache {
    fn signed_path(&self, digest: &str) -> Option<PathBuf> {
        crate::reference::valid_digest(digest)
            .then(|| self.dir.join("signed").join(digest.trim_start_matches("sha256:")))
    }

    /// The fingerprints of the keys whose signature over manifest `digest` was verified.
    pub fn signed_by(&self, digest: &str) -> std::io::Result<Vec<String>> {
        let Some(path) = self.signed_path(digest) else { return Ok(Vec::new()) };
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Remember that the key with `fingerprint` signed manifest `digest`.
    pub fn write_signed_by(&self, digest: &str, fingerprint: &str) -> std::io::Result<()> {
        let Some(path) = self.signed_path(digest) else { return Ok(()) };
        let mut known = self.signed_by(digest)?;
        if !known.iter().any(|k| k == fingerprint) {
            known.push(fingerprint.to_owned());
            write_atomically(&path, (known.join("\n") + "\n").as_bytes())?;
        }
        Ok(())
    }
}

/// `sha256:` and the hex SHA-256 of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("a cache path has no parent"))?;
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
    // Unique per process and write, so concurrent writers of one entry never share a file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temporary = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip_and_a_corrupted_blob_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let digest = cache.write_blob(b"module bytes").unwrap();
        assert_eq!(digest, sha256_digest(b"module bytes"));
        assert_eq!(cache.read_blob(&digest, 1 << 20).unwrap().as_deref(), Some(&b"module bytes"[..]));
        // Over the caller's limit: not returned.
        assert_eq!(cache.read_blob(&digest, 4).unwrap(), None);
        // Tampered on disk: a miss, and the file is gone.
        let path = dir.path().join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
        std::fs::write(&path, b"module bytez").unwrap();
        assert_eq!(cache.read_blob(&digest, 1 << 20).unwrap(), None);
        assert!(!path.exists());
        // Not a digest: never a path.
        assert_eq!(cache.read_blob("sha256:../../etc/passwd", 1 << 20).unwrap(), None);
    }

    #[test]
    fn tags_remember_their_last_digest() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        let r = "oci://localhost:5000/rbac:v1";
        assert_eq!(cache.read_tag(r).unwrap(), None);
        let d1 = sha256_digest(b"1");
        let d2 = sha256_digest(b"2");
        cache.write_tag(r, &d1).unwrap();
        cache.write_tag(r, &d2).unwrap();
        assert_eq!(cache.read_tag(r).unwrap(), Some(d2));
        assert_eq!(cache.read_tag("oci://localhost:5000/rbac:v2").unwrap(), None);
    }
}
