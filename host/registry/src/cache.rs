//! The on-disk, content-addressed cache of pulled artifacts.
//!
//! ```text
//! CACHE_DIR/blobs/sha256/<hex>   manifests and module layers, named by their own digest
//! CACHE_DIR/tags/<hex>.json      {"reference": "oci://…:TAG", "digest": "sha256:…"}: the digest a
//!                                tag last resolved to (file named by the SHA-256 of the reference)
//! CACHE_DIR/signed/<hex>.json    the cosign signatures (payload and signature) verified for
//!                                manifest <hex> when it was pulled; verified again when read
//! ```
//!
//! The directory is created private (0700). Every file is written to a fresh temporary name
//! (never an existing file or link), flushed and renamed, so a crash never leaves a
//! half-written entry under its final name; every read opens a regular file without following
//! a link and reads at most the caller's limit; and every blob is hashed again when it is read,
//! so a corrupted or tampered file is a miss (and is removed), never a wrong module.

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A content-addressed cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    /// Leave a blob that does not match its digest where it is (an archive read by replay:
    /// whoever keeps it decides what to do with a damaged file).
    keep_damaged: bool,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TagEntry {
    reference: String,
    digest: String,
}

impl Cache {
    /// A cache in `dir` (created when first written).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Cache { dir: dir.into(), keep_damaged: false }
    }

    /// The same directory read without removing anything: a blob that does not match its digest
    /// is a miss, and stays.
    pub fn keeping_damaged(mut self) -> Self {
        self.keep_damaged = true;
        self
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
    /// `digest`. A corrupted file is a miss, and is removed (unless [`Cache::keeping_damaged`]).
    pub fn read_blob(&self, digest: &str, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
        let Some(path) = self.blob_path(digest) else { return Ok(None) };
        let Some(bytes) = read_file(&path, limit)? else { return Ok(None) };
        if sha256_digest(&bytes) != digest {
            if self.keep_damaged {
                tracing::warn!(path = %path.display(), digest, "a blob does not match its digest; not used");
            } else {
                tracing::warn!(path = %path.display(), digest, "a cached blob does not match its digest; removing it");
                let _ = std::fs::remove_file(&path);
            }
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
        let Some(text) = read_file(&self.tag_path(reference), 64 << 10)? else { return Ok(None) };
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

/// A cosign signature as it was verified: the simple-signing payload and its base64 signature.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SignatureProof {
    /// The payload bytes, base64.
    pub payload: String,
    /// The signature over them, base64 (as in cosign's annotation).
    pub signature: String,
}

impl Cache {
    fn signed_path(&self, digest: &str) -> Option<PathBuf> {
        crate::reference::valid_digest(digest)
            .then(|| self.dir.join("signed").join(format!("{}.json", digest.trim_start_matches("sha256:"))))
    }

    /// The signatures verified for manifest `digest` when it was pulled (to be verified again).
    pub fn signatures(&self, digest: &str) -> std::io::Result<Vec<SignatureProof>> {
        let Some(path) = self.signed_path(digest) else { return Ok(Vec::new()) };
        let Some(text) = read_file(&path, 1 << 20)? else { return Ok(Vec::new()) };
        Ok(serde_json::from_slice(&text).unwrap_or_default())
    }

    /// Remember `proof`, a signature verified for manifest `digest`.
    pub fn write_signature(&self, digest: &str, proof: &SignatureProof) -> std::io::Result<()> {
        let Some(path) = self.signed_path(digest) else { return Ok(()) };
        let mut known = self.signatures(digest)?;
        if !known.contains(proof) {
            known.push(proof.clone());
            write_atomically(&path, &serde_json::to_vec(&known).map_err(std::io::Error::other)?)?;
        }
        Ok(())
    }
}

/// At most `limit` bytes of the regular file at `path` (`None` if it is missing, larger, or not
/// a regular file). The last component is not followed if it is a link.
fn read_file(path: &Path, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let file = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // ELOOP: a link where a file should be.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() > limit {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Ok(None);
    }
    Ok(Some(bytes))
}

/// `sha256:` and the hex SHA-256 of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Write `bytes` to `path` so that a reader sees the old file or the whole new one, never part
/// of it: a fresh 0600 temporary file beside it (in a directory created 0700), never an existing
/// file or link, flushed to disk and renamed over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("a cache path has no parent"))?;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
    // Unique per process and write, so concurrent writers of one entry never share a file.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temporary = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temporary)?;
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
        // Tampered on disk: a miss. Read as an archive (replay), the file stays for whoever
        // keeps it; read as a cache, it is gone.
        let path = dir.path().join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
        std::fs::write(&path, b"module bytez").unwrap();
        assert_eq!(cache.clone().keeping_damaged().read_blob(&digest, 1 << 20).unwrap(), None);
        assert_eq!(std::fs::read(&path).unwrap(), b"module bytez");
        assert_eq!(cache.read_blob(&digest, 1 << 20).unwrap(), None);
        assert!(!path.exists());
        // Not a digest: never a path.
        assert_eq!(cache.read_blob("sha256:../../etc/passwd", 1 << 20).unwrap(), None);
        // A link planted under a blob's name is not followed, nor a non-file read.
        let other = cache.write_blob(b"other").unwrap();
        let other_path = dir.path().join("blobs/sha256").join(other.trim_start_matches("sha256:"));
        std::fs::remove_file(&other_path).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &other_path).unwrap();
        assert_eq!(cache.read_blob(&other, 1 << 20).unwrap(), None);
    }

    #[test]
    fn the_cache_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("oci"));
        let digest = cache.write_blob(b"x").unwrap();
        let blob = dir.path().join("oci/blobs/sha256").join(digest.trim_start_matches("sha256:"));
        assert_eq!(std::fs::metadata(dir.path().join("oci")).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(blob).unwrap().permissions().mode() & 0o777, 0o600);
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
