//! HPACK static table (RFC 7541 Appendix A) and the dynamic table (§2.3.2, §4).

use std::collections::VecDeque;

use super::HpackError;

/// Per-entry overhead counted towards the table size (RFC 7541 §4.1).
pub const ENTRY_OVERHEAD: usize = 32;

/// The static table; HPACK index `i` (1-based) is `STATIC[i - 1]`.
pub const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// A name and value.
type Entry = (Vec<u8>, Vec<u8>);

/// Entries kept for reuse once evicted: a client that indexes one new field per request
/// (grpc-go's `grpc-timeout`) then inserts and evicts one entry per request, and reusing
/// its buffers spares two allocations and two frees (each wiped) per request.
const POOL_ENTRIES: usize = 4;
/// Buffers above this capacity are freed rather than kept in the pool.
const POOL_CAPACITY: usize = 256;

/// The decoder's copy of the peer's dynamic table.
#[derive(Debug)]
pub struct DynamicTable {
    /// Newest entry first: HPACK index 62 is `entries[0]`.
    entries: VecDeque<Entry>,
    /// Current size in RFC 7541 §4.1 terms.
    size: usize,
    /// Current maximum size (set by dynamic table size updates).
    max_size: usize,
    /// Set between [`DynamicTable::checkpoint`] and its release or rollback.
    undo: Option<Undo>,
    /// The evicted list's buffer, kept from one checkpoint to the next.
    spare: Vec<Entry>,
    /// Evicted entries, emptied and zeroed, for the next inserts.
    pool: Vec<Entry>,
}

/// What puts the table back as it was at the checkpoint.
#[derive(Debug)]
struct Undo {
    size: usize,
    max_size: usize,
    /// Entries added since, still in the table (at its front).
    added: usize,
    /// Entries that were in the table at the checkpoint and were evicted since, in order.
    evicted: Vec<Entry>,
}

impl DynamicTable {
    /// An empty table holding at most `max_size` bytes (RFC 7541 §4.1 sizes).
    pub fn new(max_size: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max_size,
            undo: None,
            spare: Vec::new(),
            pool: Vec::new(),
        }
    }

    /// Remembers the table as it is, for [`DynamicTable::rollback`]; evicted entries are
    /// kept (not freed) until [`DynamicTable::release`] or the rollback.
    pub fn checkpoint(&mut self) {
        self.undo = Some(Undo {
            size: self.size,
            max_size: self.max_size,
            added: 0,
            evicted: std::mem::take(&mut self.spare),
        });
    }

    /// Keeps the changes made since the checkpoint.
    pub fn release(&mut self) {
        if let Some(undo) = self.undo.take() {
            let mut evicted = undo.evicted;
            for entry in evicted.drain(..) {
                self.recycle(entry);
            }
            self.spare = evicted;
        }
    }

    /// Puts the table back as it was at the checkpoint.
    pub fn rollback(&mut self) {
        let Some(mut undo) = self.undo.take() else {
            return;
        };
        for _ in 0..undo.added {
            if let Some(entry) = self.entries.pop_front() {
                self.recycle(entry);
            }
        }
        // Evicted oldest first: the first one evicted goes back last.
        while let Some(entry) = undo.evicted.pop() {
            self.entries.push_back(entry);
        }
        self.size = undo.size;
        self.max_size = undo.max_size;
        self.spare = undo.evicted;
    }

    /// Current size, in RFC 7541 §4.1 bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Looks up a 1-based HPACK index across the static and dynamic tables.
    pub fn get(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        if index == 0 {
            return Err(HpackError::InvalidIndex(0));
        }
        if let Some((n, v)) = STATIC.get(index - 1) {
            return Ok((n, v));
        }
        self.entries
            .get(index - 1 - STATIC.len())
            .map(|(n, v)| (n.as_slice(), v.as_slice()))
            .ok_or(HpackError::InvalidIndex(index))
    }

    /// Changes the maximum size, evicting as needed (§4.3).
    pub fn set_max_size(&mut self, max_size: usize) {
        self.max_size = max_size;
        self.evict_to(max_size);
    }

    /// Adds an entry, evicting old ones first; an entry larger than the whole
    /// table empties it and is not added (§4.4).
    pub fn insert(&mut self, name: &[u8], value: &[u8]) {
        let entry_size = name
            .len()
            .saturating_add(value.len())
            .saturating_add(ENTRY_OVERHEAD);
        if entry_size > self.max_size {
            self.evict_to(0);
            return;
        }
        self.evict_to(self.max_size - entry_size);
        self.size += entry_size;
        let (mut n, mut v) = self.pool.pop().unwrap_or_default();
        n.extend_from_slice(name);
        v.extend_from_slice(value);
        self.entries.push_front((n, v));
        if let Some(undo) = &mut self.undo {
            undo.added += 1;
        }
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            let Some((n, v)) = self.entries.pop_back() else {
                self.size = 0;
                break;
            };
            self.size -= n.len() + v.len() + ENTRY_OVERHEAD;
            if let Some(undo) = &mut self.undo {
                // The entries added since the checkpoint are the front `added` ones: the
                // one just taken from the back was one of them when no other is left.
                if self.entries.len() < undo.added {
                    undo.added -= 1;
                } else {
                    undo.evicted.push((n, v));
                    continue;
                }
            }
            self.recycle((n, v));
        }
    }

    /// Keeps a small entry's buffers for a later insert, zeroed like a freed block.
    fn recycle(&mut self, (mut n, mut v): Entry) {
        if self.pool.len() < POOL_ENTRIES
            && n.capacity() <= POOL_CAPACITY
            && v.capacity() <= POOL_CAPACITY
        {
            n.fill(0);
            v.fill(0);
            n.clear();
            v.clear();
            self.pool.push((n, v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_lookups() {
        let t = DynamicTable::new(4096);
        assert_eq!(t.get(1).unwrap(), (&b":authority"[..], &b""[..]));
        assert_eq!(t.get(2).unwrap(), (&b":method"[..], &b"GET"[..]));
        assert_eq!(t.get(61).unwrap(), (&b"www-authenticate"[..], &b""[..]));
        assert_eq!(t.get(0), Err(HpackError::InvalidIndex(0)));
        assert_eq!(t.get(62), Err(HpackError::InvalidIndex(62)));
        assert_eq!(t.get(usize::MAX), Err(HpackError::InvalidIndex(usize::MAX)));
    }

    fn snapshot(t: &DynamicTable) -> (Vec<Entry>, usize, usize) {
        (t.entries.iter().cloned().collect(), t.size, t.max_size)
    }

    #[test]
    fn rollback_restores_the_table_after_any_changes() {
        // Pseudo-random inserts (some larger than the table), size changes and
        // checkpoints; each rolled back change must leave exactly the table before it.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n) as usize
        };
        let mut t = DynamicTable::new(300);
        for round in 0..3000 {
            let before = snapshot(&t);
            t.checkpoint();
            for _ in 0..next(6) {
                match next(10) {
                    0 => t.set_max_size(next(400)),
                    1 => t.insert(&vec![b'n'; next(400)], &[]),
                    _ => t.insert(&vec![b'n'; next(20) + 1], &vec![round as u8; next(60)]),
                }
            }
            if next(2) == 0 {
                t.rollback();
                assert_eq!(snapshot(&t), before, "round {round}");
            } else {
                t.release();
            }
            let size: usize = t.entries.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
            assert_eq!(size, t.size);
            assert!(t.size <= t.max_size);
            assert!(t.pool.len() <= POOL_ENTRIES);
            assert!(t.pool.iter().all(|(n, v)| n.is_empty() && v.is_empty()));
        }
    }

    #[test]
    fn insertion_order_and_eviction() {
        let mut t = DynamicTable::new(100);
        t.insert(b"a", b"1"); // 34
        t.insert(b"b", b"2"); // 68
        assert_eq!(t.get(62).unwrap(), (&b"b"[..], &b"2"[..]));
        assert_eq!(t.get(63).unwrap(), (&b"a"[..], &b"1"[..]));
        t.insert(b"c", b"3"); // evicts "a"
        assert_eq!(t.len(), 2);
        assert_eq!(t.size(), 68);
        assert_eq!(t.get(63).unwrap(), (&b"b"[..], &b"2"[..]));
        t.insert(&[b'x'; 100], &[]); // too big: empties the table
        assert_eq!((t.len(), t.size()), (0, 0));
        t.insert(b"d", b"4");
        t.set_max_size(0);
        assert_eq!((t.len(), t.size()), (0, 0));
    }

    #[test]
    fn an_insert_reuses_the_buffers_of_an_evicted_entry() {
        // Full table, one entry in and one out per block: grpc-go's grpc-timeout.
        let mut t = DynamicTable::new(3 * 45);
        for i in 0..3u8 {
            t.insert(b"grpc-timeout", &[b'0' + i]);
        }
        t.checkpoint();
        t.insert(b"grpc-timeout", b"3");
        t.release();
        let pooled = t.pool.last().map(|(n, v)| (n.as_ptr(), v.as_ptr()));
        assert!(pooled.is_some(), "the evicted entry was kept");
        t.checkpoint();
        t.insert(b"grpc-timeout", b"4");
        t.release();
        let newest = t.entries.front().map(|(n, v)| (n.as_ptr(), v.as_ptr()));
        assert_eq!(newest, pooled, "the new entry took the pooled buffers");
        assert_eq!(t.get(62).unwrap(), (&b"grpc-timeout"[..], &b"4"[..]));
        assert_eq!(t.get(64).unwrap(), (&b"grpc-timeout"[..], &b"2"[..]));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn large_or_surplus_entries_are_freed_not_pooled() {
        let mut t = DynamicTable::new(4096);
        t.insert(b"big", &[1; POOL_CAPACITY + 1]);
        for i in 0..10u8 {
            t.insert(b"small", &[i]);
        }
        t.set_max_size(0);
        assert_eq!(t.pool.len(), POOL_ENTRIES);
        assert!(
            t.pool
                .iter()
                .all(|(n, v)| n.capacity() <= POOL_CAPACITY && v.capacity() <= POOL_CAPACITY)
        );
    }
}
