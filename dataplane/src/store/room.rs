//! Room for new objects: what a store costs on a disk, whether a disk admits one, and
//! how many more of the smallest objects a disk reports it can take. Admission and
//! `objects_available` are both decided by [`Volume::stores_admitted`], so that the
//! number an operator or a client reads and the answer a STORE gets cannot disagree.
//!
//! Also here: what becomes of a write that finds no room. It is not refused: it goes on
//! hashing its bytes without writing them (see [`OpenWrite::unstore`]), so that a
//! STORE of an object the node already holds still gets its reference at commit, and
//! any other gets NO_SPACE there with nothing written for it.

use super::format::{packed_size, BLOCK_U64, PACKED_MAX_DATA};
use super::volume::Volume;
use super::{DiskId, DiskState, OpenWrite, Store, StoreError};

/// What a store of `n` bytes costs on a disk, in bytes of log. An object of at most
/// 16 KiB is one packed record: an 80-byte header and its data, padded to 16 bytes,
/// sharing blocks with its neighbours. A larger one is written as segments of at most
/// `segment_bytes`, each one record of one 4 KiB header block plus its data blocks
/// (the last zero-padded), so one header block per segment plus ceil(n / 4096) data
/// blocks in all.
pub(crate) fn store_footprint(n: u64, segment_bytes: u64) -> u64 {
    if n <= PACKED_MAX_DATA as u64 {
        return packed_size(n);
    }
    let segments = n.div_ceil(segment_bytes).max(1);
    segments * BLOCK_U64 + n.div_ceil(BLOCK_U64) * BLOCK_U64
}

/// The slack a store of `n` bytes needs on top of its footprint: a record that does
/// not fit before the physical end of the disk is preceded by a WRAP that skips the
/// bytes left there, fewer than the record's own size and a multiple of 4 KiB, so at
/// most the data blocks of its largest record. A packed record may also skip the rest
/// of a block (a segment record starts on a boundary, a packed header never straddles
/// one), and blocks are written whole: up to a block at the tail and one at the head.
/// Either kind of record may need those two blocks.
fn wrap_slack(n: u64, segment_bytes: u64) -> u64 {
    if n <= PACKED_MAX_DATA as u64 {
        return packed_size(n) + 2 * BLOCK_U64;
    }
    n.min(segment_bytes).div_ceil(BLOCK_U64) * BLOCK_U64 + 2 * BLOCK_U64
}

/// How many stores of `n` bytes each, one after the other, `room` bytes of log admit
/// when one WRAP may waste up to `slack` bytes of it: `(room - slack) / footprint`. The
/// slack is charged once, not per object: the room is less than one lap of the log,
/// so the log wraps at most once while it is used up.
fn stores_fitting(n: u64, room: u64, slack: u64, segment_bytes: u64) -> u64 {
    room.saturating_sub(slack) / store_footprint(n, segment_bytes)
}

/// Where a store of a given size can go, as [`Store::room_for`] judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Room {
    /// Some online disk's free space admits it now.
    Now,
    /// None does now, but this disk's would once compaction reclaimed its dead space.
    AfterCompacting(DiskId),
    /// No online disk could hold it.
    Nowhere,
}

impl Volume {
    /// Segment size this volume was opened with.
    fn segment_bytes(&self) -> u64 {
        self.seg_record - BLOCK_U64
    }

    /// Stores of `n` bytes its free space admits now, with the slack of their own WRAP.
    fn admitted_now(&self, n: u64) -> u64 {
        let seg = self.segment_bytes();
        stores_fitting(n, self.bytes_free(), wrap_slack(n, seg), seg)
    }

    /// Stores of `n` bytes its free space would admit after a compaction pass turned
    /// its dead space into free space. The pass moves live records to the tail and may
    /// itself leave one WRAP's waste behind, of a record of up to a full segment: that
    /// (at least the store's own slack) is the slack here, and the only WRAP of the lap.
    fn admitted_after_compacting(&self, n: u64) -> u64 {
        let seg = self.segment_bytes();
        stores_fitting(n, self.bytes_free() + self.bytes_dead(), seg, seg)
    }

    /// The one rule for room: how many stores of `n` bytes each (0: unknown, judged as
    /// the smallest object, 1 byte) this disk admits one after the other, compacting
    /// first when that is what makes room. A STORE is admitted where this is at least
    /// 1 (see [`Store::room_for`]); the disk's `objects_available` is this for `n` = 1.
    pub fn stores_admitted(&self, n: u64) -> u64 {
        let n = n.max(1);
        self.admitted_now(n).max(self.admitted_after_compacting(n))
    }
}

impl Store {
    /// Where a store of `size_hint` bytes (0: unknown, judged as the smallest object)
    /// can go: cheap enough to ask on every STORE.
    pub fn room_for(&self, size_hint: u64) -> Room {
        let n = size_hint.max(1);
        let online = || {
            self.vols
                .iter()
                .filter(|v| v.state == DiskState::Online && v.log_len > 0)
        };
        if online().any(|v| v.admitted_now(n) >= 1) {
            return Room::Now;
        }
        online()
            .filter(|v| v.admitted_after_compacting(n) >= 1)
            .max_by_key(|v| (v.bytes_free() + v.bytes_dead(), std::cmp::Reverse(v.id)))
            .map_or(Room::Nowhere, |v| Room::AfterCompacting(v.id))
    }

    /// The disk a new write of `size_hint` bytes (0: unknown) goes to, and whether its
    /// data will be written there: the online disk with the most free space left after
    /// what the writes open on it may take, among those whose free space admits it; if
    /// none does, the online disk with the most free space, for a write that only
    /// hashes. `NoUsableDisk` when no disk is online.
    pub(crate) fn choose_disk(&self, size_hint: u64) -> Result<(usize, bool), StoreError> {
        let online = || {
            self.vols
                .iter()
                .enumerate()
                .filter(|(_, v)| v.state == DiskState::Online && v.log_len > 0)
        };
        let n = size_hint.max(1);
        let admitted = online()
            .filter(|(_, v)| v.admitted_now(n) >= 1)
            .max_by_key(|(i, v)| {
                let open = u64::from(v.open_writes) * v.seg_record;
                // Ties go to the lowest slot, as they always have.
                (v.bytes_free().saturating_sub(open), std::cmp::Reverse(*i))
            });
        if let Some((i, _)) = admitted {
            return Ok((i, true));
        }
        online()
            .max_by_key(|(i, v)| (v.bytes_free(), std::cmp::Reverse(*i)))
            .map(|(i, _)| (i, false))
            .ok_or(StoreError::NoUsableDisk)
    }
}

impl OpenWrite {
    /// The write ran out of room (or never had any): what it wrote so far is dead space
    /// from now on, and the rest of its bytes are only hashed, so that commit can still
    /// add a reference if the object is stored already, and answers NoSpace otherwise.
    /// Its disk stops keeping compaction away from its records.
    pub(crate) fn unstore(&mut self, vol: &mut Volume) {
        vol.open_bytes = vol.open_bytes.saturating_sub(self.bytes);
        self.bytes = 0;
        self.first_lp = None;
        self.fill = 0;
        self.crc = 0;
        self.st.crcs.clear();
        self.st.extents.clear();
        self.unstored = true;
    }

    /// Feeds bytes of a write that is not being stored to its fingerprint only.
    pub(crate) fn hash_only(&mut self, data: &[u8]) {
        use md5::Digest;
        self.md5.update(data);
        self.total += data.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 1 << 20;
    const B: u64 = BLOCK_U64;

    #[test]
    fn footprint_is_a_packed_record_or_a_header_block_per_segment_plus_the_data_blocks() {
        // Up to 16 KiB: an 80-byte header and the data, to 16 bytes.
        assert_eq!(store_footprint(0, SEG), 80);
        assert_eq!(store_footprint(1, SEG), 96);
        assert_eq!(store_footprint(1024, SEG), 1104);
        assert_eq!(store_footprint(4096, SEG), 4176);
        assert_eq!(store_footprint(16384, SEG), 16464);
        assert_eq!(store_footprint(16385, SEG), B + 5 * B);
        assert_eq!(store_footprint(SEG, SEG), B + SEG);
        assert_eq!(store_footprint(SEG + 1, SEG), 2 * B + SEG + B);
        assert_eq!(store_footprint(3 * SEG, SEG), 3 * B + 3 * SEG);
    }

    #[test]
    fn admission_charges_one_wrap_on_top_of_the_footprints() {
        let own = |n| wrap_slack(n, SEG);
        // The smallest object: 96 bytes, plus itself and two blocks of slack once.
        assert_eq!(own(1), 96 + 2 * B);
        assert_eq!(stores_fitting(1, 2 * B + 191, own(1), SEG), 0);
        assert_eq!(stores_fitting(1, 2 * B + 192, own(1), SEG), 1);
        assert_eq!(stores_fitting(1, 2 * B + 288, own(1), SEG), 2);
        assert_eq!(stores_fitting(1, 0, own(1), SEG), 0);
        // 100 KB: 25 data blocks and a header, slack of 25 blocks and two.
        assert_eq!(stores_fitting(100_000, 53 * B - 1, own(100_000), SEG), 0);
        assert_eq!(stores_fitting(100_000, 53 * B, own(100_000), SEG), 1);
        // Past one segment the slack is one segment's data and two blocks.
        assert_eq!(own(3 * SEG), SEG + 2 * B);
        assert_eq!(
            stores_fitting(3 * SEG, 5 * B + 4 * SEG, own(3 * SEG), SEG),
            1
        );
        assert_eq!(
            stores_fitting(3 * SEG, 5 * B + 4 * SEG - 1, own(3 * SEG), SEG),
            0
        );
    }
}
