//! A hash table that lives in managed memory pages.
//!
//! The keyed aggregation keeps its whole state here, so that its memory is
//! exactly what the slot's [`MemoryManager`] granted: fixed-width entries in
//! entry pages, variable-length encoded keys in an arena of key pages, and an
//! open-addressing index in index pages, of 8-byte slots that hold an entry
//! id and a 32-bit tag of the key's hash, so that a probe passes over other
//! keys' slots without loading their entries. Growing any part
//! takes pages from the budget; a refusal is a [`MemoryError`] that leaves the
//! table unchanged (the caller fails or, later, spills).
//!
//! Entry layout: `hash: u64 | key_len: u32 | key_page: u32 | key_offset: u32
//! | pad: u32 | inline key: 16 bytes | accumulators: acc_width bytes`. Keys of
//! at most 16 encoded bytes (every single fixed-width key) live inline, so a
//! probe touches one entry; longer keys live in the arena. Entries per page
//! and index slots per page are powers of two, so locating one is a shift.

use crate::memory::{MemoryError, MemoryManager, Page};

pub(crate) const INLINE_KEY: usize = 16;
const ENTRY_HEADER: usize = 24 + INLINE_KEY;
/// Index slots hold `tag << 32 | (entry id + 1)`; an id of 0 is empty.
const EMPTY: u32 = 0;
/// Bytes of an index slot.
const SLOT_BYTES: usize = 8;
/// Slots [`PagedHashTable::first_candidate`] looks at past the home slot.
const CANDIDATE_PROBES: usize = 4;

/// The tag of a hash in an index slot: its high half (the slot position
/// comes from the low bits).
#[inline]
fn tag_of(hash: u64) -> u64 {
    hash >> 32
}

#[inline]
fn slot_value(hash: u64, id: usize) -> u64 {
    (tag_of(hash) << 32) | (id as u64 + 1)
}
/// What [`PagedHashTable::first_candidate`] returns for an empty slot.
pub const NO_CANDIDATE: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(
        "an encoded key of {key_bytes} bytes does not fit a managed memory page of {page_bytes} bytes"
    )]
    KeyTooLarge { key_bytes: usize, page_bytes: usize },
    #[error("hash table is full ({entries} entries)")]
    Full { entries: usize },
}

pub struct PagedHashTable {
    mem: MemoryManager,
    page_size: usize,
    entry_width: usize,
    /// log2 of entries per entry page.
    entry_shift: u32,
    /// log2 of index slots per index page.
    slot_shift: u32,
    entry_pages: Vec<Page>,
    entry_count: usize,
    key_pages: Vec<Page>,
    key_used: usize,
    index_pages: Vec<Page>,
    index_capacity: usize,
}

impl PagedHashTable {
    pub fn new(mem: MemoryManager, acc_width: usize) -> Result<Self, TableError> {
        Self::with_capacity(mem, acc_width, 0)
    }

    /// A table whose index takes `entry_count` entries without growing: the
    /// index a table grows to for that many entries, allocated at once. A
    /// checkpoint restore rebuilds a table this way, so it takes the pages
    /// the snapshotted table held, without the transient old-plus-new index
    /// of each doubling.
    pub fn with_capacity(
        mem: MemoryManager,
        acc_width: usize,
        entry_count: usize,
    ) -> Result<Self, TableError> {
        let page_size = mem.page_size_bytes();
        assert!(page_size.is_power_of_two());
        let entry_width = (ENTRY_HEADER + acc_width).next_multiple_of(8);
        assert!(entry_width <= page_size, "accumulators wider than a page");
        let per_page = page_size / entry_width;
        let entry_shift = usize::BITS - 1 - per_page.leading_zeros();
        if entry_count >= u32::MAX as usize - 1 {
            return Err(TableError::Full {
                entries: entry_count,
            });
        }
        // Inserts grow the index while `count * 2 > capacity`.
        let index_capacity = (entry_count * 2)
            .next_power_of_two()
            .max(page_size / SLOT_BYTES);
        let mut index_pages =
            mem.allocate_pages((index_capacity * SLOT_BYTES).div_ceil(page_size))?;
        // Pages come back from the pool as their last user left them.
        for page in &mut index_pages {
            page.as_mut_slice().fill(0);
        }
        Ok(Self {
            page_size,
            entry_width,
            entry_shift,
            slot_shift: (page_size / SLOT_BYTES).trailing_zeros(),
            entry_pages: Vec::new(),
            entry_count: 0,
            key_pages: Vec::new(),
            key_used: page_size,
            index_capacity,
            index_pages,
            mem,
        })
    }

    pub fn len(&self) -> usize {
        self.entry_count
    }
    pub fn is_empty(&self) -> bool {
        self.entry_count == 0
    }
    /// Managed bytes held by the table.
    pub fn memory_bytes(&self) -> usize {
        (self.entry_pages.len() + self.key_pages.len() + self.index_pages.len()) * self.page_size
    }

    #[inline]
    fn slot(&self, i: usize) -> u64 {
        let mask = (1usize << self.slot_shift) - 1;
        read_u64(
            self.index_pages[i >> self.slot_shift].as_slice(),
            (i & mask) * SLOT_BYTES,
        )
    }

    fn set_slot(pages: &mut [Page], shift: u32, i: usize, v: u64) {
        let mask = (1usize << shift) - 1;
        write_u64(pages[i >> shift].as_mut_slice(), (i & mask) * SLOT_BYTES, v);
    }

    #[inline]
    fn entry(&self, id: usize) -> &[u8] {
        let mask = (1usize << self.entry_shift) - 1;
        let page = &self.entry_pages[id >> self.entry_shift];
        &page.as_slice()[(id & mask) * self.entry_width..][..self.entry_width]
    }

    #[inline]
    fn entry_mut(&mut self, id: usize) -> &mut [u8] {
        let (w, shift) = (self.entry_width, self.entry_shift);
        let mask = (1usize << shift) - 1;
        let page = &mut self.entry_pages[id >> shift];
        &mut page.as_mut_slice()[(id & mask) * w..][..w]
    }

    /// The encoded key of an entry.
    #[inline]
    pub fn key(&self, id: usize) -> &[u8] {
        let e = self.entry(id);
        let len = read_u32(e, 8) as usize;
        if len <= INLINE_KEY {
            return &e[24..24 + len];
        }
        let page = read_u32(e, 12) as usize;
        let offset = read_u32(e, 16) as usize;
        &self.key_pages[page].as_slice()[offset..offset + len]
    }

    /// The hash an entry was inserted with.
    #[inline]
    pub fn hash(&self, id: usize) -> u64 {
        read_u64(self.entry(id), 0)
    }

    /// The accumulator bytes of an entry.
    #[inline]
    pub fn acc(&self, id: usize) -> &[u8] {
        &self.entry(id)[ENTRY_HEADER..]
    }

    #[inline]
    pub fn acc_mut(&mut self, id: usize) -> &mut [u8] {
        &mut self.entry_mut(id)[ENTRY_HEADER..]
    }

    /// The first entry from `hash`'s home slot on whose slot carries
    /// `hash`'s tag (looking at a few slots), or [`NO_CANDIDATE`]: the
    /// likely match, to be confirmed with [`Self::matches`]. Reads only the
    /// index.
    #[inline]
    pub fn first_candidate(&self, hash: u64) -> u32 {
        let mask = self.index_capacity - 1;
        let mut i = (hash as usize) & mask;
        for _ in 0..CANDIDATE_PROBES {
            let v = self.slot(i);
            let id = v as u32;
            if id == EMPTY {
                return NO_CANDIDATE;
            }
            if v >> 32 == tag_of(hash) {
                return id - 1;
            }
            i = (i + 1) & mask;
        }
        NO_CANDIDATE
    }

    /// Whether entry `id` holds `key` hashed to `hash`.
    #[inline]
    pub fn matches(&self, id: usize, hash: u64, key: &[u8]) -> bool {
        id < self.entry_count && read_u64(self.entry(id), 0) == hash && self.key(id) == key
    }

    /// [`Self::matches`] for a key of `len` bytes held zero-padded in
    /// `key` (see `keycodec::encode_fixed_keys`): inline keys are stored
    /// zero-padded, so the comparison is two words, not a `memcmp`.
    #[inline]
    pub fn matches_fixed(&self, id: usize, hash: u64, key: &[u8; INLINE_KEY], len: usize) -> bool {
        if id >= self.entry_count {
            return false;
        }
        let e = self.entry(id);
        let mut inline = [0u8; INLINE_KEY];
        inline.copy_from_slice(&e[24..24 + INLINE_KEY]);
        read_u64(e, 0) == hash
            && read_u32(e, 8) as usize == len
            && u128::from_le_bytes(inline) == u128::from_le_bytes(*key)
    }

    /// Finds the entry for `key` (hashed to `hash`) without inserting.
    #[inline]
    pub fn find(&self, hash: u64, key: &[u8]) -> Option<usize> {
        let mask = self.index_capacity - 1;
        let mut i = (hash as usize) & mask;
        loop {
            let v = self.slot(i);
            if v as u32 == EMPTY {
                return None;
            }
            let id = (v as u32 - 1) as usize;
            if v >> 32 == tag_of(hash) && read_u64(self.entry(id), 0) == hash && self.key(id) == key
            {
                return Some(id);
            }
            i = (i + 1) & mask;
        }
    }

    /// Finds the entry for `key` (hashed to `hash`), inserting it with
    /// accumulators set by `init` when absent. Returns the entry id.
    #[inline]
    pub fn find_or_insert(
        &mut self,
        hash: u64,
        key: &[u8],
        init: impl FnOnce(&mut [u8]),
    ) -> Result<usize, TableError> {
        let mask = self.index_capacity - 1;
        let mut i = (hash as usize) & mask;
        loop {
            let v = self.slot(i);
            if v as u32 == EMPTY {
                break;
            }
            let id = (v as u32 - 1) as usize;
            if v >> 32 == tag_of(hash) && read_u64(self.entry(id), 0) == hash && self.key(id) == key
            {
                return Ok(id);
            }
            i = (i + 1) & mask;
        }
        self.insert_at(i, hash, key, init)
    }

    #[cold]
    fn insert_at(
        &mut self,
        i: usize,
        hash: u64,
        key: &[u8],
        init: impl FnOnce(&mut [u8]),
    ) -> Result<usize, TableError> {
        // Reserve everything the insert needs before changing anything.
        if key.len() > self.page_size {
            return Err(TableError::KeyTooLarge {
                key_bytes: key.len(),
                page_bytes: self.page_size,
            });
        }
        if self.entry_count >= u32::MAX as usize - 1 {
            return Err(TableError::Full {
                entries: self.entry_count,
            });
        }
        if (self.entry_count + 1) * 2 > self.index_capacity {
            self.grow_index()?;
            return self.find_or_insert(hash, key, init);
        }
        let inline = key.len() <= INLINE_KEY;
        if !inline && (self.key_pages.is_empty() || self.key_used + key.len() > self.page_size) {
            self.key_pages.extend(self.mem.allocate_pages(1)?);
            self.key_used = 0;
        }
        let id = self.entry_count;
        if id >> self.entry_shift == self.entry_pages.len() {
            self.entry_pages.extend(self.mem.allocate_pages(1)?);
        }
        let (key_page, key_offset) = if inline {
            (0, 0)
        } else {
            let page = self.key_pages.len() - 1;
            let offset = self.key_used;
            self.key_pages[page].as_mut_slice()[offset..offset + key.len()].copy_from_slice(key);
            self.key_used += key.len();
            (page, offset)
        };
        let e = self.entry_mut(id);
        e.fill(0);
        e[0..8].copy_from_slice(&hash.to_le_bytes());
        e[8..12].copy_from_slice(&(key.len() as u32).to_le_bytes());
        e[12..16].copy_from_slice(&(key_page as u32).to_le_bytes());
        e[16..20].copy_from_slice(&(key_offset as u32).to_le_bytes());
        if inline {
            e[24..24 + key.len()].copy_from_slice(key);
        }
        init(&mut e[ENTRY_HEADER..]);
        self.entry_count += 1;
        Self::set_slot(
            &mut self.index_pages,
            self.slot_shift,
            i,
            slot_value(hash, id),
        );
        Ok(id)
    }

    fn grow_index(&mut self) -> Result<(), TableError> {
        let capacity = self.index_capacity * 2;
        let pages_needed = (capacity * SLOT_BYTES).div_ceil(self.page_size);
        let mut pages = self.mem.allocate_pages(pages_needed)?;
        for p in &mut pages {
            p.as_mut_slice().fill(0);
        }
        let mask = capacity - 1;
        let slot_mask = (1usize << self.slot_shift) - 1;
        for id in 0..self.entry_count {
            let hash = read_u64(self.entry(id), 0);
            let mut i = (hash as usize) & mask;
            loop {
                let page = pages[i >> self.slot_shift].as_slice();
                if read_u64(page, (i & slot_mask) * SLOT_BYTES) as u32 == EMPTY {
                    break;
                }
                i = (i + 1) & mask;
            }
            Self::set_slot(&mut pages, self.slot_shift, i, slot_value(hash, id));
        }
        self.index_pages = pages;
        self.index_capacity = capacity;
        Ok(())
    }
}

#[inline]
pub fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
pub fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

#[inline]
pub fn write_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PagePool;
    use std::collections::HashMap;

    #[test]
    fn finds_what_it_inserted_across_growth() {
        let pool = PagePool::new(64 << 20, 4096);
        let mut t = PagedHashTable::new(pool.slot_manager(0, 64 << 20), 8).unwrap();
        let mut reference = HashMap::new();
        for i in 0..20_000u64 {
            let k = (i * 7919) % 9_001;
            // Short keys live inline in the entry, long ones in the arena.
            let key = if k % 2 == 0 {
                format!("key-{k}")
            } else {
                format!("a-key-long-enough-for-the-arena-{k}")
            };
            let h = crate::kernels::cpu::hash::hash_bytes(key.as_bytes()) & 0xFF; // force collisions
            let id = t
                .find_or_insert(h, key.as_bytes(), |acc| acc.fill(0))
                .unwrap();
            let c = read_u64(t.acc(id), 0) + 1;
            write_u64(t.acc_mut(id), 0, c);
            *reference.entry(key).or_insert(0u64) += 1;
        }
        assert_eq!(t.len(), reference.len());
        for id in 0..t.len() {
            let key = std::str::from_utf8(t.key(id)).unwrap();
            assert_eq!(read_u64(t.acc(id), 0), reference[key]);
        }
    }

    #[test]
    fn a_table_sized_up_front_takes_the_pages_a_grown_one_holds() {
        let pool = PagePool::new(64 << 20, 4096);
        for count in [0usize, 1, 511, 512, 513, 5_000] {
            let mut grown = PagedHashTable::new(pool.slot_manager(0, 64 << 20), 16).unwrap();
            let mut sized =
                PagedHashTable::with_capacity(pool.slot_manager(1, 64 << 20), 16, count).unwrap();
            let sized_bytes = sized.memory_bytes();
            for k in 0..count as u64 {
                grown
                    .find_or_insert(k, &k.to_le_bytes(), |a| a.fill(0))
                    .unwrap();
                let id = sized
                    .find_or_insert(k, &k.to_le_bytes(), |a| a.fill(0))
                    .unwrap();
                assert_eq!(id as u64, k);
            }
            assert_eq!(
                sized.memory_bytes(),
                grown.memory_bytes(),
                "{count} entries"
            );
            // The index did not grow while the entries went in.
            let entry_pages = sized.entry_pages.len() + sized.key_pages.len();
            assert_eq!(sized_bytes, sized.memory_bytes() - entry_pages * 4096);
            for k in 0..count as u64 {
                assert_eq!(sized.find(k, &k.to_le_bytes()), Some(k as usize));
            }
        }
    }

    #[test]
    fn budget_refusal_leaves_the_table_usable() {
        let pool = PagePool::new(64 * 4096, 4096);
        let mut t = PagedHashTable::new(pool.slot_manager(0, 8 * 4096), 16).unwrap();
        let mut inserted = 0u64;
        let err = loop {
            match t.find_or_insert(inserted, &inserted.to_le_bytes(), |a| a.fill(0)) {
                Ok(_) => inserted += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(
            err,
            TableError::Memory(MemoryError::BudgetExceeded { .. })
        ));
        assert_eq!(t.len() as u64, inserted);
        for k in 0..inserted {
            let id = t
                .find_or_insert(k, &k.to_le_bytes(), |_| panic!("must exist"))
                .unwrap();
            assert_eq!(t.key(id), k.to_le_bytes());
        }
    }
}
