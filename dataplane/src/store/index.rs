//! The store's in-memory index: fingerprint → where the object is, ordered by
//! fingerprint, in about 28 bytes per small object.
//!
//! A node of small objects holds tens of millions of them, so the index is the term of
//! RAM that grows with the data. A general map costs far more than the facts it holds:
//! a `BTreeMap<Fingerprint, Entry>` with an extent list per object took about 140 bytes
//! per object. Here an object is one 28-byte slot — its fingerprint (16 bytes) and a
//! 12-byte packed value — in sorted chunks of at most [`CHUNK_MAX`] slots, each chunk a
//! vector grown in small steps (so its spare capacity stays under a sixteenth), found
//! by binary search over the chunks' first fingerprints. Ordered, so GET_CONTENTS walks
//! it with a cursor and each shard lists a contiguous range of it.
//!
//! The packed value holds what a packed object (at most 16 KiB, one packed record)
//! needs: its disk, the 16-byte unit of its record, its length and its reference
//! count. Anything else — an object of segment records, a disk number above 255, a
//! record beyond 16 TiB — keeps its whole [`Entry`] in a side slab, and the slot points
//! there: such objects are at least 16 KiB, so their entries cost under 1% of their
//! size. A packed object's write id is not kept: its record names its fingerprint,
//! which is what a read checks (see `aio`), and a checkpoint records its age as 1.
//!
//! Packed value layout (little-endian): bytes 0..8 a word `a`, bytes 8..12 the
//! refcount. In `a`: bits 0..40 the record's offset ÷ 16, bits 40..55 the length, bits
//! 55..63 the disk, bit 63 clear. A slab slot: bit 63 set, bits 0..32 its index.

use dosp::Fingerprint;

use super::format::{packed_size, PACKED_MAX_DATA, PACK_ALIGN};
use super::{DiskId, Entry, Extent, ObjectMeta};

/// Most slots in one chunk: inserting shifts at most this many 28-byte slots, and a
/// chunk's spare capacity is small next to the index.
pub(crate) const CHUNK_MAX: usize = 512;

const BIG: u64 = 1 << 63;
const POS_BITS: u32 = 40;
const LEN_BITS: u32 = 15;
const DISK_SHIFT: u32 = POS_BITS + LEN_BITS;
const _: () = assert!(PACKED_MAX_DATA < 1 << LEN_BITS);
const _: () = assert!(DISK_SHIFT + 8 == 63);

/// One object: its fingerprint and its packed value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
struct Slot {
    fp: [u8; 16],
    a: [u8; 8],
    refcount: [u8; 4],
}

const _: () = assert!(size_of::<Slot>() == 28);

/// See the module documentation.
#[derive(Default)]
pub(crate) struct Index {
    /// Sorted, none empty, each chunk's fingerprints below the next chunk's.
    chunks: Vec<Vec<Slot>>,
    /// The first fingerprint of each chunk, for the binary search.
    firsts: Vec<[u8; 16]>,
    len: usize,
    /// Entries that do not pack, by slab index.
    big: Vec<Option<Entry>>,
    free_big: Vec<u32>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("len", &self.len)
            .field("chunks", &self.chunks.len())
            .finish_non_exhaustive()
    }
}

/// The packed `a` word of an entry, if it packs.
fn pack(e: &Entry) -> Option<u64> {
    let [x] = e.extents[..] else { return None };
    let pos = x.hdr / PACK_ALIGN;
    let fits = x.packed
        && u64::from(x.len) == e.len
        && e.len < 1 << LEN_BITS
        && x.hdr.is_multiple_of(PACK_ALIGN)
        && pos < 1 << POS_BITS
        && e.disk.0 < 256;
    fits.then(|| pos | e.len << POS_BITS | u64::from(e.disk.0) << DISK_SHIFT)
}

/// The write id a packed entry reads back with: none is kept (see the module doc).
pub(crate) const PACKED_WRITE_ID: u64 = 0;

impl Index {
    pub fn new() -> Index {
        Index::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The chunk that holds `fp` or would: the last whose first fingerprint is not
    /// above it (the first chunk for anything below every chunk).
    fn chunk_of(&self, fp: &Fingerprint) -> usize {
        self.firsts
            .partition_point(|f| *f <= fp.0)
            .saturating_sub(1)
    }

    /// (chunk, position in it) of `fp`, or where it would go.
    fn find(&self, fp: &Fingerprint) -> (usize, Result<usize, usize>) {
        let c = self.chunk_of(fp);
        match self.chunks.get(c) {
            Some(chunk) => (c, chunk.binary_search_by(|s| s.fp.cmp(&fp.0))),
            None => (0, Err(0)),
        }
    }

    fn decode(&self, s: &Slot) -> Entry {
        let a = u64::from_le_bytes(s.a);
        if a & BIG != 0 {
            // Slab indexes in slots are only ever written by `encode`.
            if let Some(Some(e)) = self.big.get((a & 0xffff_ffff) as usize) {
                return e.clone();
            }
        }
        let len = (a >> POS_BITS) & ((1 << LEN_BITS) - 1);
        Entry {
            disk: DiskId(((a >> DISK_SHIFT) & 0xff) as u16),
            len,
            refcount: u32::from_le_bytes(s.refcount),
            write_id: PACKED_WRITE_ID,
            extents: vec![Extent {
                hdr: (a & ((1 << POS_BITS) - 1)) * PACK_ALIGN,
                len: len as u32,
                packed: true,
            }],
            footprint: packed_size(len),
        }
    }

    /// The slot for `e`, reusing `old`'s slab place if it had one.
    fn encode(&mut self, fp: &Fingerprint, e: &Entry, old: Option<&Slot>) -> Slot {
        let old_big = old
            .map(|s| u64::from_le_bytes(s.a))
            .filter(|a| a & BIG != 0)
            .map(|a| (a & 0xffff_ffff) as u32);
        let a = match pack(e) {
            Some(a) => {
                if let Some(i) = old_big {
                    self.free_slab(i);
                }
                a
            }
            None => {
                let i = match old_big {
                    Some(i) => i,
                    None => match self.free_big.pop() {
                        Some(i) => i,
                        None => {
                            self.big.push(None);
                            (self.big.len() - 1) as u32
                        }
                    },
                };
                self.big[i as usize] = Some(e.clone());
                BIG | u64::from(i)
            }
        };
        Slot {
            fp: fp.0,
            a: a.to_le_bytes(),
            refcount: e.refcount.to_le_bytes(),
        }
    }

    fn free_slab(&mut self, i: u32) {
        if let Some(place) = self.big.get_mut(i as usize) {
            *place = None;
            self.free_big.push(i);
        }
    }

    fn release(&mut self, s: &Slot) {
        let a = u64::from_le_bytes(s.a);
        if a & BIG != 0 {
            self.free_slab((a & 0xffff_ffff) as u32);
        }
    }

    pub fn get(&self, fp: &Fingerprint) -> Option<Entry> {
        match self.find(fp) {
            (c, Ok(i)) => Some(self.decode(&self.chunks[c][i])),
            _ => None,
        }
    }

    /// The entry of `fp`, which must be there (tests).
    #[cfg(test)]
    pub fn at(&self, fp: &Fingerprint) -> Entry {
        self.get(fp).expect("in the index")
    }

    /// Disk, length and refcount of `fp`, without building its extent list.
    pub fn meta(&self, fp: &Fingerprint) -> Option<ObjectMeta> {
        match self.find(fp) {
            (c, Ok(i)) => Some(self.slot_meta(&self.chunks[c][i])),
            _ => None,
        }
    }

    pub fn contains_key(&self, fp: &Fingerprint) -> bool {
        self.find(fp).1.is_ok()
    }

    /// The entry of `fp` to change in place: written back when the guard drops.
    pub fn get_mut(&mut self, fp: &Fingerprint) -> Option<EntryMut<'_>> {
        let entry = self.get(fp)?;
        Some(EntryMut {
            index: self,
            fp: *fp,
            entry,
        })
    }

    /// Adds or replaces `fp`'s entry; returns the one replaced.
    pub fn insert(&mut self, fp: Fingerprint, e: Entry) -> Option<Entry> {
        let (c, at) = self.find(&fp);
        match at {
            Ok(i) => {
                let old_slot = self.chunks[c][i];
                let old = self.decode(&old_slot);
                let slot = self.encode(&fp, &e, Some(&old_slot));
                self.chunks[c][i] = slot;
                Some(old)
            }
            Err(i) => {
                let slot = self.encode(&fp, &e, None);
                if self.chunks.is_empty() {
                    self.chunks.push(Vec::with_capacity(4));
                    self.firsts.push(fp.0);
                }
                let chunk = &mut self.chunks[c];
                if chunk.len() == chunk.capacity() {
                    chunk.reserve_exact((chunk.len() / 16).max(4));
                }
                chunk.insert(i, slot);
                if i == 0 {
                    self.firsts[c] = fp.0;
                }
                self.len += 1;
                if self.chunks[c].len() > CHUNK_MAX {
                    let chunk = &mut self.chunks[c];
                    let right: Vec<Slot> = chunk.split_off(chunk.len() / 2);
                    chunk.shrink_to(chunk.len() + chunk.len() / 16);
                    self.firsts.insert(c + 1, right[0].fp);
                    self.chunks.insert(c + 1, right);
                }
                None
            }
        }
    }

    pub fn remove(&mut self, fp: &Fingerprint) -> Option<Entry> {
        let (c, Ok(i)) = self.find(fp) else {
            return None;
        };
        let slot = self.chunks[c].remove(i);
        let old = self.decode(&slot);
        self.release(&slot);
        self.len -= 1;
        let n = self.chunks[c].len();
        if n == 0 {
            self.chunks.remove(c);
            self.firsts.remove(c);
            return Some(old);
        }
        if i == 0 {
            self.firsts[c] = self.chunks[c][0].fp;
        }
        // A chunk left small joins its right neighbour when both fit one.
        if n < CHUNK_MAX / 4
            && c + 1 < self.chunks.len()
            && n + self.chunks[c + 1].len() <= CHUNK_MAX
        {
            let right = self.chunks.remove(c + 1);
            self.firsts.remove(c + 1);
            self.chunks[c].extend_from_slice(&right);
        }
        let chunk = &mut self.chunks[c];
        if chunk.capacity() > chunk.len() + chunk.len() / 8 + 8 {
            chunk.shrink_to(chunk.len() + chunk.len() / 16);
        }
        Some(old)
    }

    /// Every entry in fingerprint order.
    pub fn iter(&self) -> impl Iterator<Item = (Fingerprint, Entry)> + '_ {
        self.chunks
            .iter()
            .flatten()
            .map(|s| (Fingerprint(s.fp), self.decode(s)))
    }

    pub fn values(&self) -> impl Iterator<Item = Entry> + '_ {
        self.iter().map(|(_, e)| e)
    }

    /// Disk, length and refcount of the entries in `range`, in order, without
    /// building their extent lists: what listings and the shards' directory need.
    pub fn range_meta(
        &self,
        range: (std::ops::Bound<Fingerprint>, std::ops::Bound<Fingerprint>),
    ) -> impl Iterator<Item = (Fingerprint, ObjectMeta)> + '_ {
        self.range_slots(range)
            .map(|s| (Fingerprint(s.fp), self.slot_meta(s)))
    }

    fn slot_meta(&self, s: &Slot) -> ObjectMeta {
        let a = u64::from_le_bytes(s.a);
        if a & BIG != 0 {
            if let Some(Some(e)) = self.big.get((a & 0xffff_ffff) as usize) {
                return ObjectMeta {
                    len: e.len,
                    disk: e.disk,
                    refcount: e.refcount,
                };
            }
        }
        ObjectMeta {
            len: (a >> POS_BITS) & ((1 << LEN_BITS) - 1),
            disk: DiskId(((a >> DISK_SHIFT) & 0xff) as u16),
            refcount: u32::from_le_bytes(s.refcount),
        }
    }

    fn range_slots(
        &self,
        range: (std::ops::Bound<Fingerprint>, std::ops::Bound<Fingerprint>),
    ) -> impl Iterator<Item = &Slot> + '_ {
        use std::ops::Bound;
        let (c, i) = match range.0 {
            Bound::Unbounded => (0, 0),
            Bound::Included(fp) => match self.find(&fp) {
                (c, Ok(i)) | (c, Err(i)) => (c, i),
            },
            Bound::Excluded(fp) => match self.find(&fp) {
                (c, Ok(i)) => (c, i + 1),
                (c, Err(i)) => (c, i),
            },
        };
        let end = range.1;
        self.chunks
            .iter()
            .enumerate()
            .skip(c)
            .flat_map(move |(k, chunk)| chunk[if k == c { i.min(chunk.len()) } else { 0 }..].iter())
            .take_while(move |s| match end {
                Bound::Unbounded => true,
                Bound::Included(b) => s.fp <= b.0,
                Bound::Excluded(b) => s.fp < b.0,
            })
    }

    /// Bytes of memory the index holds: the chunks' capacity, their headers and the
    /// search array, and the slab with the extent lists of its entries.
    pub fn memory_bytes(&self) -> u64 {
        // The allocator's own header of each chunk's block.
        const MALLOC_OVERHEAD: usize = 16;
        let chunks: usize = self
            .chunks
            .iter()
            .map(|c| c.capacity() * size_of::<Slot>() + MALLOC_OVERHEAD)
            .sum();
        let slab: usize = self
            .big
            .iter()
            .flatten()
            .map(|e| e.extents.capacity() * size_of::<Extent>() + MALLOC_OVERHEAD)
            .sum();
        (chunks
            + self.chunks.capacity() * size_of::<Vec<Slot>>()
            + self.firsts.capacity() * 16
            + self.big.capacity() * size_of::<Option<Entry>>()
            + self.free_big.capacity() * 4
            + slab) as u64
    }
}

/// An entry being changed in place (see [`Index::get_mut`]).
pub(crate) struct EntryMut<'a> {
    index: &'a mut Index,
    fp: Fingerprint,
    entry: Entry,
}

impl std::ops::Deref for EntryMut<'_> {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        &self.entry
    }
}

impl std::ops::DerefMut for EntryMut<'_> {
    fn deref_mut(&mut self) -> &mut Entry {
        &mut self.entry
    }
}

impl Drop for EntryMut<'_> {
    fn drop(&mut self) {
        let (c, at) = self.index.find(&self.fp);
        if let Ok(i) = at {
            let old = self.index.chunks[c][i];
            let slot = self.index.encode(&self.fp, &self.entry, Some(&old));
            self.index.chunks[c][i] = slot;
        }
    }
}

impl FromIterator<(Fingerprint, Entry)> for Index {
    fn from_iter<I: IntoIterator<Item = (Fingerprint, Entry)>>(iter: I) -> Index {
        let mut all: Vec<(Fingerprint, Entry)> = iter.into_iter().collect();
        all.sort_unstable_by_key(|e| e.0);
        all.dedup_by(|b, a| a.0 == b.0);
        let mut index = Index::new();
        // Chunks filled to three quarters: room to grow before the first split.
        for part in all.chunks(CHUNK_MAX * 3 / 4) {
            let mut chunk = Vec::with_capacity(part.len() + part.len() / 16);
            for (fp, e) in part {
                let slot = index.encode(fp, e, None);
                chunk.push(slot);
            }
            index.firsts.push(part[0].0 .0);
            index.chunks.push(chunk);
            index.len += part.len();
        }
        index
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::ops::Bound;

    use proptest::prelude::*;

    use super::*;

    fn fp(i: u32) -> Fingerprint {
        Fingerprint::of(&i.to_le_bytes())
    }

    fn packed(disk: u16, hdr: u64, len: u32, refcount: u32) -> Entry {
        Entry {
            disk: DiskId(disk),
            len: u64::from(len),
            refcount,
            write_id: PACKED_WRITE_ID,
            extents: vec![Extent {
                hdr,
                len,
                packed: true,
            }],
            footprint: packed_size(u64::from(len)),
        }
    }

    fn big(disk: u16, write_id: u64, lens: &[u32]) -> Entry {
        let extents: Vec<Extent> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| Extent {
                hdr: 4096 * (1 + i as u64 * 300),
                len,
                packed: false,
            })
            .collect();
        Entry {
            disk: DiskId(disk),
            len: lens.iter().map(|&l| u64::from(l)).sum(),
            refcount: 3,
            write_id,
            footprint: extents.iter().map(Extent::size).sum(),
            extents,
        }
    }

    fn same(a: &Entry, b: &Entry) -> bool {
        (
            a.disk,
            a.len,
            a.refcount,
            a.write_id,
            &a.extents,
            a.footprint,
        ) == (
            b.disk,
            b.len,
            b.refcount,
            b.write_id,
            &b.extents,
            b.footprint,
        )
    }

    #[test]
    fn packed_and_big_entries_round_trip() {
        let mut ix = Index::new();
        let cases = [
            packed(0, 0, 0, 1),
            packed(3, 16 * 12345, 1024, 7),
            packed(255, ((1 << 40) - 1) * 16, 16384, u32::MAX),
            // Not packable: disk 256, a record past 16 TiB, several segments.
            packed(256, 16, 5, 1),
            packed(1, (1 << 40) * 16, 5, 1),
            big(2, 77, &[1 << 20, 1 << 20, 5]),
        ];
        for (i, e) in cases.iter().enumerate() {
            assert!(ix.insert(fp(i as u32), e.clone()).is_none());
        }
        for (i, e) in cases.iter().enumerate() {
            assert!(same(&ix.get(&fp(i as u32)).unwrap(), e), "case {i}");
        }
        assert_eq!(ix.big.iter().flatten().count(), 3);
        // Replacing a big entry by a packed one frees its slab place.
        ix.insert(fp(5), packed(0, 32, 3, 1));
        assert_eq!(ix.big.iter().flatten().count(), 2);
        // Changed in place.
        ix.get_mut(&fp(1)).unwrap().refcount = 9;
        assert_eq!(ix.get(&fp(1)).unwrap().refcount, 9);
        ix.get_mut(&fp(4)).unwrap().refcount = 8;
        assert_eq!(ix.get(&fp(4)).unwrap().refcount, 8);
        assert!(ix.remove(&fp(3)).is_some());
        assert_eq!(ix.big.iter().flatten().count(), 1);
        assert_eq!(ix.len(), 5);
    }

    #[test]
    fn small_objects_take_under_32_bytes_each() {
        let mut ix = Index::new();
        let n = 300_000u32;
        for i in 0..n {
            ix.insert(
                fp(i),
                packed((i % 4) as u16, 16 * u64::from(i) * 70, 1024, 1),
            );
        }
        let each = ix.memory_bytes() as f64 / f64::from(n);
        eprintln!("index: {each:.1} bytes per object ({n} random inserts)");
        assert!(each <= 32.0, "{each} bytes per object");
        // Half deleted: what is left stays compact.
        for i in (0..n).step_by(2) {
            ix.remove(&fp(i));
        }
        let each = ix.memory_bytes() as f64 / f64::from(n / 2);
        eprintln!("index: {each:.1} bytes per object after deleting half");
        assert!(each <= 36.0, "{each} bytes per object");
        let loaded: Index = ix.iter().collect();
        let each = loaded.memory_bytes() as f64 / f64::from(n / 2);
        eprintln!("index: {each:.1} bytes per object loaded at open");
        assert!(each <= 32.0, "{each} bytes per object");
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u16, bool),
        Remove(u16),
        Bump(u16),
        Range(u16, u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<u16>(), any::<bool>()).prop_map(|(k, b)| Op::Insert(k % 3000, b)),
            2 => any::<u16>().prop_map(|k| Op::Remove(k % 3000)),
            1 => any::<u16>().prop_map(|k| Op::Bump(k % 3000)),
            1 => (any::<u16>(), any::<u16>()).prop_map(|(a, b)| Op::Range(a % 3000, b % 3000)),
        ]
    }

    proptest! {
        /// Against a BTreeMap: every lookup, removal, update and ordered range agrees.
        #[test]
        fn behaves_like_an_ordered_map(ops in prop::collection::vec(op(), 1..3000)) {
            let mut ix = Index::new();
            let mut model: BTreeMap<Fingerprint, Entry> = BTreeMap::new();
            for (n, o) in ops.iter().enumerate() {
                match o {
                    Op::Insert(k, is_big) => {
                        let e = if *is_big {
                            big(1, n as u64 + 1, &[16385, 7])
                        } else {
                            packed(*k % 4, 16 * u64::from(*k), u32::from(*k), 1)
                        };
                        let got = ix.insert(fp(u32::from(*k)), e.clone());
                        let want = model.insert(fp(u32::from(*k)), e);
                        prop_assert_eq!(got.is_some(), want.is_some());
                    }
                    Op::Remove(k) => {
                        let got = ix.remove(&fp(u32::from(*k)));
                        let want = model.remove(&fp(u32::from(*k)));
                        prop_assert_eq!(got.is_some(), want.is_some());
                        if let (Some(g), Some(w)) = (got, want) {
                            prop_assert!(same(&g, &w));
                        }
                    }
                    Op::Bump(k) => {
                        if let Some(mut e) = ix.get_mut(&fp(u32::from(*k))) {
                            e.refcount += 1;
                        }
                        if let Some(e) = model.get_mut(&fp(u32::from(*k))) {
                            e.refcount += 1;
                        }
                    }
                    Op::Range(a, b) => {
                        let (a, b) = (fp(u32::from(*a)), fp(u32::from(*b)));
                        for r in [
                            (Bound::Excluded(a), Bound::Unbounded),
                            (Bound::Included(a), Bound::Excluded(b)),
                            (Bound::Unbounded, Bound::Included(b)),
                        ] {
                            if matches!((r.0, r.1), (Bound::Included(x) | Bound::Excluded(x), Bound::Included(y) | Bound::Excluded(y)) if x > y) {
                                continue;
                            }
                            let got: Vec<Fingerprint> = ix.range_meta(r).map(|(f, _)| f).collect();
                            let want: Vec<Fingerprint> = model.range(r).map(|(f, _)| *f).collect();
                            prop_assert_eq!(got, want);
                        }
                    }
                }
                prop_assert_eq!(ix.len(), model.len());
            }
            let got: Vec<(Fingerprint, Entry)> = ix.iter().collect();
            prop_assert_eq!(got.len(), model.len());
            for ((gf, ge), (wf, we)) in got.iter().zip(model.iter()) {
                prop_assert_eq!(gf, wf);
                prop_assert!(same(ge, we));
            }
            let reloaded: Index = ix.iter().collect();
            prop_assert_eq!(reloaded.iter().count(), model.len());
            for (f, e) in &model {
                prop_assert!(same(&reloaded.get(f).unwrap(), e));
            }
            // The chunks are sorted and none is empty or overfull.
            for w in ix.chunks.windows(2) {
                prop_assert!(w[0].last().unwrap().fp < w[1][0].fp);
            }
            for (c, f) in ix.chunks.iter().zip(&ix.firsts) {
                prop_assert!(!c.is_empty() && c.len() <= CHUNK_MAX && c[0].fp == *f);
            }
        }
    }
}
