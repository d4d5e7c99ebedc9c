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

/// The decoder's copy of the peer's dynamic table.
#[derive(Debug)]
pub struct DynamicTable {
    /// Newest entry first: HPACK index 62 is `entries[0]`.
    entries: VecDeque<(Vec<u8>, Vec<u8>)>,
    /// Current size in RFC 7541 §4.1 terms.
    size: usize,
    /// Current maximum size (set by dynamic table size updates).
    max_size: usize,
}

impl DynamicTable {
    /// An empty table holding at most `max_size` bytes (RFC 7541 §4.1 sizes).
    pub fn new(max_size: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max_size,
        }
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
    pub fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let entry_size = name
            .len()
            .saturating_add(value.len())
            .saturating_add(ENTRY_OVERHEAD);
        if entry_size > self.max_size {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - entry_size);
        self.size += entry_size;
        self.entries.push_front((name, value));
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            match self.entries.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + ENTRY_OVERHEAD,
                None => {
                    self.size = 0;
                    break;
                }
            }
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

    #[test]
    fn insertion_order_and_eviction() {
        let mut t = DynamicTable::new(100);
        t.insert(b"a".to_vec(), b"1".to_vec()); // 34
        t.insert(b"b".to_vec(), b"2".to_vec()); // 68
        assert_eq!(t.get(62).unwrap(), (&b"b"[..], &b"2"[..]));
        assert_eq!(t.get(63).unwrap(), (&b"a"[..], &b"1"[..]));
        t.insert(b"c".to_vec(), b"3".to_vec()); // evicts "a"
        assert_eq!(t.len(), 2);
        assert_eq!(t.size(), 68);
        assert_eq!(t.get(63).unwrap(), (&b"b"[..], &b"2"[..]));
        t.insert(vec![b'x'; 100], Vec::new()); // too big: empties the table
        assert_eq!((t.len(), t.size()), (0, 0));
        t.insert(b"d".to_vec(), b"4".to_vec());
        t.set_max_size(0);
        assert_eq!((t.len(), t.size()), (0, 0));
    }
}
