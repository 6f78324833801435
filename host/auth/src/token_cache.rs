//! A bounded cache of verified tokens, so a token seen again skips its signature check.
//!
//! - **Key**: SHA-256 of the whole token and the key-set version it was verified against. A
//!   rotation or JWKS refresh is a new version, so a token whose key has left the key set is
//!   never found and is verified (and rejected) again.
//! - **Expiry**: an entry is used only while `now < exp` (and never longer than
//!   [`MAX_AGE`]); a token without `exp` is not cached.
//! - **Revocation is not cached**: the caller checks it on every request against the pinned
//!   snapshot.
//! - **Bounded**: at most `capacity` entries, in shards; a full shard drops an arbitrary entry.
//! - **Admitted on the second sighting**: the first verification of a token only remembers its
//!   key (a "doorkeeper" set, cleared when full); the credential is stored when the token is
//!   verified again. A stream of tokens that never repeat then costs a hash-set insert per
//!   request instead of copying and evicting whole credentials, and does not flush the tokens
//!   that do repeat.

use crate::VerifiedToken;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// The longest an entry is used, whatever the token's `exp`.
pub const MAX_AGE: u64 = 300;
const SHARDS: usize = 16;

/// What the cache knows a token by: SHA-256 of the token and the key-set version.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key([u8; 32], u64);

struct Entry {
    credential: VerifiedToken,
    /// Unix seconds after which the entry is not used.
    until: u64,
}

#[derive(Default)]
struct Shard {
    entries: HashMap<Key, Entry>,
    /// Keys of tokens verified once and not stored yet.
    seen_once: HashSet<Key>,
}

/// The cache. See the module documentation.
pub struct TokenCache {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
}

impl TokenCache {
    /// A cache of at most `capacity` tokens; `None` for 0 (no cache).
    pub fn new(capacity: usize) -> Option<Self> {
        (capacity > 0).then(|| TokenCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS),
        })
    }

    /// The key of `token` verified under key-set version `key_set` (computed once per request,
    /// for the lookup and, on a miss, the insert).
    pub fn key(token: &str, key_set: u64) -> Key {
        Key(Sha256::digest(token.as_bytes()).into(), key_set)
    }

    fn shard(&self, key: &Key) -> &Mutex<Shard> {
        &self.shards[key.0[0] as usize % SHARDS]
    }

    /// The credential the token of `key` verified to, if cached and still within its `exp` at
    /// `now`.
    pub fn get(&self, key: &Key, now: u64) -> Option<VerifiedToken> {
        let mut shard = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        match shard.entries.get(key) {
            Some(entry) if now < entry.until => Some(entry.credential.clone()),
            Some(_) => {
                shard.entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remember that the token of `key` verified to `credential` at `now` (stored from the
    /// second time it is verified).
    pub fn insert(&self, key: Key, now: u64, credential: &VerifiedToken) {
        let Some(exp) = credential.claims.expires_at else { return };
        let until = exp.min(now.saturating_add(MAX_AGE));
        if until <= now {
            return;
        }
        let mut shard = self.shard(&key).lock().unwrap_or_else(|e| e.into_inner());
        if !shard.seen_once.remove(&key) {
            if shard.seen_once.len() >= self.per_shard {
                shard.seen_once.clear();
            }
            shard.seen_once.insert(key);
            return;
        }
        // Full: drop an arbitrary entry (O(1); scanning for expired ones on every insert
        // would make a stream of distinct tokens slower than no cache). Expired entries are
        // dropped when looked up.
        if shard.entries.len() >= self.per_shard
            && let Some(victim) = shard.entries.keys().next().copied()
        {
            shard.entries.remove(&victim);
        }
        shard.entries.insert(key, Entry { credential: credential.clone(), until });
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).entries.len()).sum()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
