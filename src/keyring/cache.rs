//! Unwrapped local KEKs, keyed by the annotations they travel with.
//!
//! Decrypt costs one root unwrap per distinct local KEK, not per call; concurrent misses
//! for the same wrapped key share one unwrap (single flight). Three separate places, so
//! that nothing a caller sends can push out a good key:
//! - `ready`: a bounded LRU of opened keys; only a successful unwrap enters it;
//! - `pending`: unwraps in flight (bounded by the callers waiting on them);
//! - `failed`: a bounded LRU of wrapped keys that did not authenticate, answered without
//!   another root call.
//!
//! `ready` is keyed by a [`SetId`]: the digest of the whole annotation map
//! ([`crate::envelope::annotations::digest`], which Decrypt computes anyway for the
//! ciphertext's associated data). It covers every annotation key (each names the root
//! key_id a copy is wrapped under) and every wrapped copy's exact bytes, so an entry is
//! found only for byte-identical wrapped copies under the same key_ids, as with the
//! per-copy id used before, and a cache hit needs no second SHA-256. All ciphertexts of
//! one local KEK carry the same annotations, so there is one entry per local KEK.
//! `pending` and `failed` stay per wrapped copy ([`KekCache::id`]): a root unwraps one copy.
//!
//! An evicted cipher is dropped as soon as the last in-flight user lets go, and dropping
//! zeroizes its key schedule.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use lru::LruCache;
use tokio::sync::OnceCell;

use crate::envelope::{KekCipher, fingerprint};
use crate::root::{ErrorKind, RootError};

/// Identifies one wrapped local KEK under one root.
pub type CacheId = [u8; 32];

/// Identifies the annotations a local KEK travels with: their digest.
pub type SetId = [u8; 32];

/// Wrapped keys remembered as not authenticating (32 bytes each).
pub const FAILED_CAPACITY: usize = 4096;

type Slot = Arc<OnceCell<Arc<KekCipher>>>;

/// The cache. Cheap to share behind an `Arc`.
pub struct KekCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

struct Inner {
    ready: LruCache<SetId, Arc<KekCipher>>,
    pending: HashMap<CacheId, Slot>,
    failed: LruCache<CacheId, ()>,
}

impl KekCache {
    /// A cache holding at most `capacity` unwrapped keys (at least one).
    pub fn new(capacity: usize) -> Self {
        let cap = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        let failed = NonZeroUsize::new(FAILED_CAPACITY).unwrap_or(NonZeroUsize::MIN);
        Self {
            inner: Mutex::new(Inner {
                ready: LruCache::new(cap),
                pending: HashMap::new(),
                failed: LruCache::new(failed),
            }),
            capacity: cap.get(),
        }
    }

    /// The id of `wrapped` as wrapped by the root with `key_id`.
    pub fn id(key_id: &str, wrapped: &[u8]) -> CacheId {
        fingerprint(b"kms-plugin kek cache", [key_id.as_bytes(), wrapped])
    }

    /// Stores a key this plugin just made (and verified), with the annotations digest
    /// `set` and the ids of its wrapped `copies`, so Decrypt of fresh data needs no root
    /// call.
    pub fn insert(&self, set: SetId, copies: &[CacheId], cipher: Arc<KekCipher>) {
        let mut inner = self.lock();
        for id in copies {
            inner.failed.pop(id);
        }
        inner.ready.put(set, cipher);
    }

    /// The cached key for these annotations, if it is already unwrapped (never waits,
    /// never unwraps).
    pub fn get(&self, set: &SetId) -> Option<Arc<KekCipher>> {
        self.lock().ready.get(set).cloned()
    }

    /// Returns the cached key for the annotations `set`, or runs `unwrap` of the copy `id`
    /// once for all concurrent callers.
    ///
    /// A wrapped key that failed to authenticate is remembered and refused from then on
    /// without calling `unwrap`; any other failure is not remembered (the root may be back
    /// on the next call).
    pub async fn get_or_unwrap<F, Fut>(
        &self,
        set: SetId,
        id: CacheId,
        unwrap: F,
    ) -> Result<Arc<KekCipher>, RootError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<KekCipher, RootError>>,
    {
        let slot = {
            let mut inner = self.lock();
            if let Some(cipher) = inner.ready.get(&set) {
                return Ok(cipher.clone());
            }
            if inner.failed.get(&id).is_some() {
                crate::metrics::negative_cache_hit();
                return Err(RootError::bare(ErrorKind::NotAuthentic));
            }
            inner
                .pending
                .entry(id)
                .or_insert_with(|| Arc::new(OnceCell::new()))
                .clone()
        };
        let result = slot
            .get_or_try_init(|| async {
                // A waiter that runs after the leader failed: its verdict may be in.
                if self.lock().failed.get(&id).is_some() {
                    crate::metrics::negative_cache_hit();
                    return Err(RootError::bare(ErrorKind::NotAuthentic));
                }
                unwrap().await.map(Arc::new)
            })
            .await
            .cloned();
        let mut inner = self.lock();
        if inner
            .pending
            .get(&id)
            .is_some_and(|s| Arc::ptr_eq(s, &slot))
        {
            inner.pending.remove(&id);
        }
        match &result {
            Ok(cipher) => {
                inner.ready.put(set, cipher.clone());
            }
            Err(e) if e.kind() == ErrorKind::NotAuthentic => {
                inner.failed.put(id, ());
            }
            Err(_) => {}
        }
        result
    }

    /// Number of unwrapped keys held.
    pub fn len(&self) -> usize {
        self.lock().ready.len()
    }

    /// True when no unwrapped key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of wrapped keys remembered as not authenticating.
    pub fn failed_len(&self) -> usize {
        self.lock().failed.len()
    }

    /// The configured bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The maps hold no invariant a panicking holder could break half-way.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::secret::Key256;

    fn cipher() -> KekCipher {
        KekCipher::new(&Key256::generate())
    }

    fn down() -> RootError {
        RootError::new(ErrorKind::Unavailable, "down")
    }

    #[tokio::test]
    async fn concurrent_misses_unwrap_once() {
        let cache = Arc::new(KekCache::new(4));
        let calls = Arc::new(AtomicUsize::new(0));
        let id = KekCache::id("file-a", b"wrapped");
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (cache, calls) = (cache.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_unwrap(id, id, || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(cipher())
                    })
                    .await
            }));
        }
        let mut first: Option<Arc<KekCipher>> = None;
        for t in tasks {
            let got = t.await.expect("join").expect("unwrapped");
            if let Some(f) = &first {
                assert!(Arc::ptr_eq(f, &got));
            }
            first = Some(got);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn get_only_returns_finished_unwraps() {
        let cache = KekCache::new(4);
        let id = KekCache::id("file-a", b"w");
        assert!(cache.get(&id).is_none());
        let cipher = cache
            .get_or_unwrap(id, id, || async { Ok(cipher()) })
            .await
            .expect("ok");
        assert!(cache.get(&id).is_some_and(|c| Arc::ptr_eq(&c, &cipher)));
    }

    #[tokio::test]
    async fn transient_failures_are_not_cached() {
        let cache = KekCache::new(4);
        let id = KekCache::id("file-a", b"w");
        assert!(
            cache
                .get_or_unwrap(id, id, || async { Err(down()) })
                .await
                .is_err()
        );
        assert!(cache.is_empty());
        assert_eq!(cache.failed_len(), 0);
        let ok = cache.get_or_unwrap(id, id, || async { Ok(cipher()) }).await;
        assert!(ok.is_ok());
        assert_eq!(cache.len(), 1);
    }

    #[tokio::test]
    async fn keys_that_do_not_authenticate_are_refused_without_a_second_unwrap() {
        let cache = KekCache::new(4);
        let calls = AtomicUsize::new(0);
        let id = KekCache::id("file-a", b"junk");
        for _ in 0..3 {
            let got = cache
                .get_or_unwrap(id, id, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(RootError::bare(ErrorKind::NotAuthentic))
                })
                .await;
            assert!(matches!(got, Err(e) if e.kind() == ErrorKind::NotAuthentic));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.failed_len(), 1);
    }

    #[tokio::test]
    async fn failed_unwraps_never_evict_good_keys() {
        let cache = KekCache::new(2);
        let good: Vec<CacheId> = (0u8..2).map(|i| KekCache::id("file-a", &[i])).collect();
        for id in &good {
            cache.insert(*id, &[*id], Arc::new(cipher()));
        }
        for i in 0u32..10_000 {
            let junk = KekCache::id("file-a", &i.to_be_bytes());
            let error = if i % 2 == 0 {
                RootError::bare(ErrorKind::NotAuthentic)
            } else {
                down()
            };
            assert!(
                cache
                    .get_or_unwrap(junk, junk, || async { Err(error) })
                    .await
                    .is_err()
            );
        }
        assert!(good.iter().all(|id| cache.get(id).is_some()));
        assert_eq!(cache.failed_len(), FAILED_CAPACITY);
    }

    #[tokio::test]
    async fn eviction_is_lru_and_drops_the_key() {
        let cache = KekCache::new(2);
        let ids: Vec<CacheId> = (0u8..3).map(|i| KekCache::id("file-a", &[i])).collect();
        let second = Arc::new(cipher());
        let weak_second = Arc::downgrade(&second);
        cache.insert(ids[0], &[], Arc::new(cipher()));
        cache.insert(ids[1], &[], second);
        // Use the oldest entry: least recently used is now ids[1] (a FIFO would drop ids[0]).
        assert!(cache.get(&ids[0]).is_some());
        cache.insert(ids[2], &[], Arc::new(cipher()));
        assert_eq!(cache.len(), 2);
        assert!(
            cache.get(&ids[0]).is_some(),
            "recently used entry was evicted"
        );
        assert!(cache.get(&ids[1]).is_none());
        assert!(
            weak_second.upgrade().is_none(),
            "evicted key must be dropped"
        );
        let refetch = cache
            .get_or_unwrap(ids[1], ids[1], || async { Err(down()) })
            .await;
        assert!(refetch.is_err(), "evicted entry must need a new unwrap");
    }

    /// What the cache holds is a `KekCipher`: dropping one must wipe its key schedule and
    /// GHASH key, not just satisfy a trait bound. Drops one in place and reads what is left.
    #[test]
    #[allow(unsafe_code)] // reads the bytes a dropped cipher leaves, see SAFETY
    fn a_dropped_cipher_leaves_no_key_material() {
        let key = Key256::from_slice(&[0x5a; 32]).expect("32 bytes");
        let mut slot = std::mem::MaybeUninit::<KekCipher>::uninit();
        slot.write(KekCipher::new(&key));
        let size = std::mem::size_of::<KekCipher>();
        // SAFETY: the slot is initialised and outlives both views; the cipher is plain data
        // (arrays of words), so its bytes are initialised, and after drop_in_place the
        // storage still belongs to `slot`.
        let view = |slot: &std::mem::MaybeUninit<KekCipher>| unsafe {
            std::slice::from_raw_parts(slot.as_ptr().cast::<u8>(), size).to_vec()
        };
        let live = view(&slot);
        let set = live.iter().filter(|b| **b != 0).count();
        assert!(set >= 240, "no key schedule seen");
        // SAFETY: initialised above and dropped exactly once.
        unsafe { std::ptr::drop_in_place(slot.as_mut_ptr()) };
        let dropped = view(&slot);
        assert!(
            dropped.iter().all(|b| *b == 0),
            "{} of {size} bytes of a dropped cipher are not zero",
            dropped.iter().filter(|b| **b != 0).count()
        );
    }

    #[test]
    fn key_types_zeroize_on_drop() {
        fn zeroizes_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroizes_on_drop::<crate::secret::Key256>();
    }
}
