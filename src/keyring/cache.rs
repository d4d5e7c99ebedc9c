//! Bounded LRU of unwrapped local KEKs, keyed by a hash of (root key_id, wrapped bytes).
//!
//! Decrypt costs one root unwrap per distinct local KEK, not per call; concurrent misses
//! for the same wrapped key share one unwrap (single flight). An evicted cipher is dropped
//! as soon as the last in-flight user lets go, and dropping zeroizes its key schedule.

use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};

use lru::LruCache;
use tokio::sync::OnceCell;

use crate::envelope::{KekCipher, fingerprint};

/// Identifies one wrapped local KEK under one root.
pub type CacheId = [u8; 32];

type Slot = Arc<OnceCell<Arc<KekCipher>>>;

/// The cache. Cheap to share behind an `Arc`.
pub struct KekCache {
    slots: Mutex<LruCache<CacheId, Slot>>,
    capacity: usize,
}

impl KekCache {
    /// A cache holding at most `capacity` unwrapped keys (at least one).
    pub fn new(capacity: usize) -> Self {
        let cap = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            slots: Mutex::new(LruCache::new(cap)),
            capacity: cap.get(),
        }
    }

    /// The id of `wrapped` as wrapped by the root with `key_id`.
    pub fn id(key_id: &str, wrapped: &[u8]) -> CacheId {
        fingerprint(b"kms-plugin kek cache", &[key_id.as_bytes(), wrapped])
    }

    /// Stores a key this plugin just made, so Decrypt of fresh data needs no root call.
    pub fn insert(&self, id: CacheId, cipher: Arc<KekCipher>) {
        let slot = Arc::new(OnceCell::new_with(Some(cipher)));
        self.lock().put(id, slot);
    }

    /// The cached key, if it is already unwrapped (never waits, never unwraps).
    pub fn get(&self, id: &CacheId) -> Option<Arc<KekCipher>> {
        self.lock().get(id).and_then(|slot| slot.get().cloned())
    }

    /// Returns the cached key, or runs `unwrap` once for all concurrent callers.
    /// A failed unwrap is not cached: the next call tries again.
    pub async fn get_or_unwrap<F, Fut, E>(
        &self,
        id: CacheId,
        unwrap: F,
    ) -> Result<Arc<KekCipher>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<KekCipher, E>>,
    {
        let slot = {
            let mut slots = self.lock();
            match slots.get(&id) {
                Some(slot) => slot.clone(),
                None => {
                    let slot: Slot = Arc::new(OnceCell::new());
                    slots.put(id, slot.clone());
                    slot
                }
            }
        };
        let result = slot
            .get_or_try_init(|| async { unwrap().await.map(Arc::new) })
            .await
            .cloned();
        if result.is_err() {
            let mut slots = self.lock();
            // Drop the empty slot unless a concurrent caller has filled it meanwhile.
            if slots
                .peek(&id)
                .is_some_and(|s| Arc::ptr_eq(s, &slot) && !s.initialized())
            {
                slots.pop(&id);
            }
        }
        result
    }

    /// Number of entries (including unwraps in flight).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<CacheId, Slot>> {
        // The map holds no invariant a panicking holder could break half-way.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
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
                    .get_or_unwrap(id, || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, ()>(cipher())
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
            .get_or_unwrap(id, || async { Ok::<_, ()>(cipher()) })
            .await
            .expect("ok");
        assert!(cache.get(&id).is_some_and(|c| Arc::ptr_eq(&c, &cipher)));
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let cache = KekCache::new(4);
        let id = KekCache::id("file-a", b"w");
        let err = cache
            .get_or_unwrap(id, || async { Err::<KekCipher, _>("down") })
            .await;
        assert!(err.is_err());
        assert!(cache.is_empty());
        let ok = cache
            .get_or_unwrap(id, || async { Ok::<_, &str>(cipher()) })
            .await;
        assert!(ok.is_ok());
        assert_eq!(cache.len(), 1);
    }

    #[tokio::test]
    async fn eviction_is_lru_and_drops_the_key() {
        let cache = KekCache::new(2);
        let ids: Vec<CacheId> = (0u8..3).map(|i| KekCache::id("file-a", &[i])).collect();
        let first = Arc::new(cipher());
        let weak_first = Arc::downgrade(&first);
        cache.insert(ids[0], first);
        cache.insert(ids[1], Arc::new(cipher()));
        // Touch ids[1] so ids[0] is the least recently used.
        let _ = cache
            .get_or_unwrap(ids[1], || async { Err::<KekCipher, ()>(()) })
            .await;
        cache.insert(ids[2], Arc::new(cipher()));
        assert_eq!(cache.len(), 2);
        assert!(
            weak_first.upgrade().is_none(),
            "evicted key must be dropped"
        );
        let refetch = cache
            .get_or_unwrap(ids[0], || async { Err::<KekCipher, &str>("gone") })
            .await;
        assert!(refetch.is_err(), "evicted entry must need a new unwrap");
    }

    #[test]
    fn key_schedules_zeroize_on_drop() {
        fn zeroizes_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroizes_on_drop::<aes::Aes256>();
        zeroizes_on_drop::<crate::secret::Key256>();
    }
}
