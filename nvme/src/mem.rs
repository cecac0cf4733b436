//! The in-memory disk with deterministic fault injection.
//!
//! This module owns [`MemDisk`] (the simulated medium, shared by every handle to it) and
//! [`MemDevice`] (a [`BlockDevice`] over it). It exists so the object store's tests can
//! crash a disk at any point and check recovery, in the manner of TigerBeetle's testing
//! storage: writes land in a volatile cache until a flush makes them durable, and a
//! [`MemDisk::crash`] decides — from a seeded RNG, so a failing seed replays exactly —
//! what became of each write that no flush covered: kept whole, lost whole, or torn at
//! 512-byte sector boundaries.
//!
//! Storage is sparse (only written blocks are kept), so a terabyte-sized `MemDisk`
//! costs nothing until it is written.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{
    check_transfer, BlockDevice, Completion, DevError, DeviceInfo, IoKind, IoOp, IoTag, BLOCK_SIZE,
};

/// The atomic unit of a write on real media: a power cut can leave a block with some
/// of its sectors new and others old, never a sector half-written.
pub const SECTOR_SIZE: usize = 512;

const BLOCK: u64 = BLOCK_SIZE as u64;

/// A simulated disk. Clones are handles to the same disk.
#[derive(Clone, Debug)]
pub struct MemDisk {
    state: Arc<Mutex<State>>,
}

/// Faults to inject, set with [`MemDisk::set_faults`]. They stay in force across
/// [`MemDisk::crash`] until replaced: a test that wants a clean reboot clears them with
/// `set_faults(Faults::default())`.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// After this many more successful writes, every write fails with
    /// [`DevError::Injected`] and changes nothing. Counted from the `set_faults` call.
    pub fail_writes_after: Option<u64>,
    /// Reads touching any of these byte ranges (end exclusive) fail with
    /// [`DevError::Injected`].
    pub fail_reads: Vec<Range<u64>>,
    /// Every flush fails with [`DevError::Injected`] and makes nothing durable.
    pub fail_flush: bool,
}

/// Operation counts over the life of a [`MemDisk`], across devices and crashes.
/// Only calls that succeeded are counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// A [`BlockDevice`] over a [`MemDisk`], valid until the disk's next crash; after that
/// every call returns [`DevError::Injected`] (the machine it belonged to lost power).
#[derive(Debug)]
pub struct MemDevice {
    state: Arc<Mutex<State>>,
    /// The disk's crash count when this device was made.
    generation: u64,
    info: DeviceInfo,
    /// Submitted, not yet completed.
    queue: Vec<Queued>,
    /// Polls so far: the device's clock for latencies.
    polls: u64,
}

/// A completed write that no flush has covered yet.
struct Pending {
    offset: u64,
    data: Box<[u8]>,
    /// Its place among all completed writes ([`State::writes_done`] when it landed).
    done_no: u64,
}

/// When submitted operations complete, set with [`MemDisk::set_latency`]: each waits
/// a seeded number of polls in `0..=max_polls`, and operations due in the same poll
/// complete in a seeded order when `reorder` is set — as a real device's queue does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latency {
    pub max_polls: u32,
    pub reorder: bool,
}

impl Default for Latency {
    /// Late and out of order: what the store must cope with on any real device.
    fn default() -> Self {
        Latency {
            max_polls: 3,
            reorder: true,
        }
    }
}

/// An operation waiting in a device's queue.
#[derive(Debug)]
struct Queued {
    tag: IoTag,
    op: IoOp,
    /// The device's poll count at which it may complete.
    due: u64,
    /// For a flush: the writes it covers are those with `done_no` below this.
    covers: u64,
}

struct State {
    size: u64,
    /// What survives a crash. Missing blocks are zeros.
    durable: HashMap<u64, Box<[u8]>>,
    /// Latest contents of blocks written since the last flush: what reads see on top of
    /// `durable`, as a drive serves reads from its write cache.
    cache: HashMap<u64, Box<[u8]>>,
    /// Unflushed writes in completion order, so that a crash can rule on each one.
    pending: Vec<Pending>,
    /// Number of crashes so far; devices from an older generation are dead.
    generation: u64,
    rng: StdRng,
    faults: Faults,
    /// Successful writes left before `fail_writes_after` trips.
    writes_left: Option<u64>,
    stats: MemStats,
    /// Writes completed so far, across devices: orders writes against flushes.
    writes_done: u64,
    latency: Latency,
    /// Draws latencies and completion orders (apart from `rng`, so that changing the
    /// latency model leaves crash outcomes of a seed alone).
    lat_rng: StdRng,
}

impl fmt::Debug for State {
    /// A summary: the block maps may hold gigabytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("size", &self.size)
            .field("durable_blocks", &self.durable.len())
            .field("cached_blocks", &self.cache.len())
            .field("pending_writes", &self.pending.len())
            .field("generation", &self.generation)
            .field("faults", &self.faults)
            .field("writes_left", &self.writes_left)
            .field("stats", &self.stats)
            .finish()
    }
}

impl MemDisk {
    /// A zero-filled disk of `size_bytes` rounded down to [`BLOCK_SIZE`]. `seed` drives
    /// every random decision (crash outcomes), so equal seeds and equal call sequences
    /// give equal disks.
    pub fn new(size_bytes: u64, seed: u64) -> MemDisk {
        let state = State {
            size: size_bytes - size_bytes % BLOCK,
            durable: HashMap::new(),
            cache: HashMap::new(),
            pending: Vec::new(),
            generation: 0,
            rng: StdRng::seed_from_u64(seed),
            faults: Faults::default(),
            writes_left: None,
            stats: MemStats::default(),
            writes_done: 0,
            latency: Latency::default(),
            lat_rng: StdRng::seed_from_u64(seed ^ 0x6c61_7465_6e63_7921),
        };
        MemDisk {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// A device over the disk as it is now. After a [`MemDisk::crash`] this is the
    /// "reboot": the new device sees what survived.
    pub fn device(&self) -> MemDevice {
        let state = self.lock();
        MemDevice {
            state: Arc::clone(&self.state),
            generation: state.generation,
            info: DeviceInfo {
                size_bytes: state.size,
                backend: "memory",
                location: "memory".to_string(),
            },
            queue: Vec::new(),
            polls: 0,
        }
    }

    /// Replaces the latency model of every device of this disk.
    pub fn set_latency(&self, latency: Latency) {
        self.lock().latency = latency;
    }

    /// Power loss. Each write not covered by a flush is, in order and as drawn from the
    /// seeded RNG, kept whole, lost whole, or torn (each of its 512-byte sectors lands
    /// or not independently). Flushed data is untouched. Every device obtained before
    /// this call is dead from now on.
    pub fn crash(&self) {
        self.lock().crash();
    }

    /// Replaces the injected faults.
    pub fn set_faults(&self, faults: Faults) {
        let mut state = self.lock();
        state.writes_left = faults.fail_writes_after;
        state.faults = faults;
    }

    /// Inverts every bit of the bytes in `offset..offset + len` (clamped to the disk):
    /// in the durable contents, in what reads currently see, and in any unflushed write
    /// covering them, so the damage is visible now and survives any crash — like media
    /// rot under the drive's own ECC. For testing checksums.
    pub fn corrupt(&self, offset: u64, len: usize) {
        self.lock().corrupt(offset, len);
    }

    /// Counts of successful operations so far.
    pub fn stats(&self) -> MemStats {
        self.lock().stats
    }

    /// Usable size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.lock().size
    }

    /// How many completed writes are not yet covered by a flush (at risk in a crash).
    pub fn pending_writes(&self) -> usize {
        self.lock().pending.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

/// A panic in another test thread while holding the lock leaves the state consistent
/// (every mutation is completed before anything can panic), so poisoning is ignored.
fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    fn block(map: &HashMap<u64, Box<[u8]>>, index: u64) -> Option<&[u8]> {
        map.get(&index).map(|b| &b[..])
    }

    fn durable_mut(&mut self, index: u64) -> &mut [u8] {
        self.durable
            .entry(index)
            .or_insert_with(|| vec![0; BLOCK_SIZE].into_boxed_slice())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) {
        for (i, chunk) in buf.chunks_exact_mut(BLOCK_SIZE).enumerate() {
            let index = offset / BLOCK + i as u64;
            match Self::block(&self.cache, index).or_else(|| Self::block(&self.durable, index)) {
                Some(data) => chunk.copy_from_slice(data),
                None => chunk.fill(0),
            }
        }
    }

    fn write(&mut self, offset: u64, buf: &[u8]) {
        for (i, chunk) in buf.chunks_exact(BLOCK_SIZE).enumerate() {
            self.cache.insert(offset / BLOCK + i as u64, chunk.into());
        }
        self.pending.push(Pending {
            offset,
            data: buf.into(),
            done_no: self.writes_done,
        });
        self.writes_done += 1;
    }

    /// Makes durable the pending writes that completed before `covers` writes had:
    /// exactly what a flush submitted at that moment promises, and no more.
    fn flush(&mut self, covers: u64) {
        if self.pending.iter().all(|p| p.done_no < covers) {
            // The cache holds the latest contents of every block the pending writes
            // touched, which is exactly the result of applying them in order.
            self.durable.extend(self.cache.drain());
            self.pending.clear();
            return;
        }
        // Pending writes are in completion order: land the covered prefix in order;
        // the cache keeps serving the latest contents to reads.
        let k = self.pending.partition_point(|p| p.done_no < covers);
        let landed: Vec<Pending> = self.pending.drain(..k).collect();
        for w in &landed {
            for (i, chunk) in w.data.chunks_exact(BLOCK_SIZE).enumerate() {
                self.durable_mut(w.offset / BLOCK + i as u64)
                    .copy_from_slice(chunk);
            }
        }
    }

    fn crash(&mut self) {
        for write in std::mem::take(&mut self.pending) {
            let sectors = write.data.len() / SECTOR_SIZE;
            match self.rng.gen_range(0..3u8) {
                0 => {}
                1 => (0..sectors).for_each(|s| self.land_sector(&write, s)),
                _ => {
                    for s in 0..sectors {
                        if self.rng.gen_bool(0.5) {
                            self.land_sector(&write, s);
                        }
                    }
                }
            }
        }
        self.cache.clear();
        self.generation += 1;
    }

    fn land_sector(&mut self, write: &Pending, sector: usize) {
        let at = write.offset + (sector * SECTOR_SIZE) as u64;
        let within = (at % BLOCK) as usize;
        let src = &write.data[sector * SECTOR_SIZE..(sector + 1) * SECTOR_SIZE];
        self.durable_mut(at / BLOCK)[within..within + SECTOR_SIZE].copy_from_slice(src);
    }

    fn corrupt(&mut self, offset: u64, len: usize) {
        let end = offset.saturating_add(len as u64).min(self.size);
        if offset >= end {
            return;
        }
        let flip = |bytes: &mut [u8]| bytes.iter_mut().for_each(|b| *b = !*b);
        let mut at = offset;
        while at < end {
            let index = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let n = ((end - at) as usize).min(BLOCK_SIZE - within);
            flip(&mut self.durable_mut(index)[within..within + n]);
            if let Some(block) = self.cache.get_mut(&index) {
                flip(&mut block[within..within + n]);
            }
            at += n as u64;
        }
        for write in &mut self.pending {
            let w_end = write.offset + write.data.len() as u64;
            let (lo, hi) = (offset.max(write.offset), end.min(w_end));
            if lo < hi {
                let start = (lo - write.offset) as usize;
                flip(&mut write.data[start..start + (hi - lo) as usize]);
            }
        }
    }
}

impl MemDevice {
    /// Locks the disk, failing if it crashed since this device was made.
    fn live(&self, offset: u64) -> Result<MutexGuard<'_, State>, DevError> {
        let state = lock(&self.state);
        if state.generation != self.generation {
            return Err(DevError::Injected { offset });
        }
        Ok(state)
    }
}

impl MemDevice {
    /// Carries out one operation against the medium, now.
    fn execute(&mut self, q: Queued) -> Completion {
        let Queued {
            tag, op, covers, ..
        } = q;
        let (kind, offset, mut buf) = op.into_parts();
        let result = self.execute_inner(kind, offset, &mut buf, covers);
        Completion {
            tag,
            kind,
            offset,
            buf,
            result,
        }
    }

    fn execute_inner(
        &mut self,
        kind: IoKind,
        offset: u64,
        buf: &mut [u8],
        covers: u64,
    ) -> Result<(), DevError> {
        let mut state = self.live(offset)?;
        match kind {
            IoKind::Read => {
                check_transfer(offset, buf, state.size)?;
                let end = offset + buf.len() as u64;
                if state
                    .faults
                    .fail_reads
                    .iter()
                    .any(|r| r.start < end && offset < r.end)
                {
                    return Err(DevError::Injected { offset });
                }
                state.read(offset, buf);
                state.stats.reads += 1;
                state.stats.bytes_read += buf.len() as u64;
            }
            IoKind::Write => {
                check_transfer(offset, buf, state.size)?;
                match state.writes_left {
                    Some(0) => return Err(DevError::Injected { offset }),
                    Some(n) => state.writes_left = Some(n - 1),
                    None => {}
                }
                state.write(offset, buf);
                state.stats.writes += 1;
                state.stats.bytes_written += buf.len() as u64;
            }
            IoKind::Flush => {
                if state.faults.fail_flush {
                    return Err(DevError::Injected { offset: 0 });
                }
                state.flush(covers);
                state.stats.flushes += 1;
            }
        }
        Ok(())
    }
}

impl BlockDevice for MemDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, tag: IoTag, op: IoOp) {
        let mut state = lock(&self.state);
        let delay = match state.latency.max_polls {
            0 => 0,
            m => state.lat_rng.gen_range(0..=u64::from(m)),
        };
        // A flush covers what completed before it was submitted, wherever it lands
        // in the queue.
        let covers = state.writes_done;
        drop(state);
        self.queue.push(Queued {
            tag,
            op,
            due: self.polls + delay,
            covers,
        });
    }

    fn poll(&mut self, max: usize, out: &mut Vec<Completion>) -> usize {
        self.polls += 1;
        let now = self.polls;
        let mut due: Vec<usize> = (0..self.queue.len())
            .filter(|&i| self.queue[i].due <= now)
            .collect();
        if due.is_empty() || max == 0 {
            return 0;
        }
        {
            let mut state = lock(&self.state);
            if state.latency.reorder {
                // Fisher-Yates from the seeded stream: a failing seed replays.
                for i in (1..due.len()).rev() {
                    let j = state.lat_rng.gen_range(0..=i);
                    due.swap(i, j);
                }
            }
        }
        due.truncate(max);
        // Take them out of the queue (highest index first keeps the others valid),
        // then carry them out in the drawn order.
        let mut picked: Vec<(usize, Queued)> = Vec::with_capacity(due.len());
        let mut order: Vec<usize> = due.clone();
        order.sort_unstable_by(|a, b| b.cmp(a));
        for i in order {
            let q = self.queue.swap_remove(i);
            picked.push((i, q));
        }
        // `swap_remove` from the highest index down never moves an element that is
        // still to be picked, so each `(index, op)` pair above is the op at `index`.
        picked.sort_by_key(|(i, _)| due.iter().position(|d| d == i));
        let n = picked.len();
        for (_, q) in picked {
            let c = self.execute(q);
            out.push(c);
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.queue.len()
    }

    fn wait(&mut self, _timeout: std::time::Duration) {
        // Time passes: everything queued is due at the next poll.
        let now = self.polls + 1;
        for q in &mut self.queue {
            q.due = q.due.min(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AlignedBuf;
    use proptest::prelude::*;
    // Explicit: proptest's prelude re-exports another rand's `Rng`.
    use rand::Rng;

    const SECTORS: usize = BLOCK_SIZE / SECTOR_SIZE;

    fn filled(blocks: usize, seed: u64) -> AlignedBuf {
        let mut buf = AlignedBuf::new(blocks * BLOCK_SIZE);
        StdRng::seed_from_u64(seed).fill(&mut buf[..]);
        buf
    }

    fn read(dev: &mut MemDevice, offset: u64, blocks: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::new(blocks * BLOCK_SIZE);
        dev.read_at(offset, &mut buf).unwrap();
        buf
    }

    fn injected<T>(r: Result<T, DevError>) -> bool {
        matches!(r, Err(DevError::Injected { .. }))
    }

    #[test]
    fn info_and_sparse_size() {
        let disk = MemDisk::new((1 << 40) + 100, 1);
        let mut dev = disk.device();
        assert_eq!(dev.info().size_bytes, 1 << 40);
        assert_eq!(dev.info().backend, "memory");
        assert_eq!(dev.info().location, "memory");
        let last = read(&mut dev, (1 << 40) - BLOCK, 1);
        assert!(last.iter().all(|&b| b == 0));
    }

    #[test]
    fn enforces_the_transfer_contract() {
        let mut dev = MemDisk::new(1 << 20, 1).device();
        let mut buf = AlignedBuf::new(2 * BLOCK_SIZE);
        assert!(matches!(
            dev.read_at(1, &mut buf[..BLOCK_SIZE]),
            Err(DevError::Misaligned { .. })
        ));
        assert!(matches!(
            dev.write_at(0, &buf[4..BLOCK_SIZE + 4]),
            Err(DevError::Misaligned { .. })
        ));
        assert!(matches!(
            dev.write_at(1 << 20, &buf[..BLOCK_SIZE]),
            Err(DevError::OutOfRange { .. })
        ));
    }

    #[test]
    fn reads_see_unflushed_writes() {
        let disk = MemDisk::new(1 << 20, 1);
        let mut dev = disk.device();
        let data = filled(3, 7);
        dev.write_at(BLOCK, &data).unwrap();
        assert_eq!(&read(&mut dev, BLOCK, 3)[..], &data[..]);
        // A second device on the same generation shares the cache.
        assert_eq!(&read(&mut disk.device(), BLOCK, 3)[..], &data[..]);
        assert_eq!(disk.pending_writes(), 1);
        dev.flush().unwrap();
        assert_eq!(disk.pending_writes(), 0);
    }

    #[test]
    fn flushed_writes_survive_a_crash_exactly() {
        let disk = MemDisk::new(1 << 20, 3);
        let mut dev = disk.device();
        let data = filled(4, 1);
        dev.write_at(0, &data).unwrap();
        dev.flush().unwrap();
        disk.crash();
        let mut dev = disk.device();
        assert_eq!(&read(&mut dev, 0, 4)[..], &data[..]);
    }

    #[test]
    fn crash_kills_old_devices() {
        let disk = MemDisk::new(1 << 20, 3);
        let mut old = disk.device();
        disk.crash();
        let mut buf = AlignedBuf::new(BLOCK_SIZE);
        assert!(injected(old.read_at(0, &mut buf)));
        assert!(injected(old.write_at(0, &buf)));
        assert!(injected(old.flush()));
        assert_eq!(old.info().backend, "memory");
        let mut new = disk.device();
        new.write_at(0, &buf).unwrap();
        new.flush().unwrap();
    }

    #[test]
    fn crash_keeps_loses_and_tears_writes() {
        // With one pending write per crash, count each outcome. The seed fixes the
        // sequence, so this is deterministic; 300 draws make every outcome appear.
        let disk = MemDisk::new(1 << 20, 42);
        let (mut kept, mut lost, mut torn) = (0, 0, 0);
        for round in 0..300u64 {
            let mut dev = disk.device();
            let old = read(&mut dev, 0, 1);
            let new = filled(1, round + 1000);
            dev.write_at(0, &new).unwrap();
            disk.crash();
            let got = read(&mut disk.device(), 0, 1);
            let mut from_new = 0;
            for s in 0..SECTORS {
                let r = s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE;
                if got[r.clone()] == new[r.clone()] {
                    from_new += 1;
                } else {
                    assert_eq!(got[r.clone()], old[r], "sector {s} is neither old nor new");
                }
            }
            match from_new {
                0 => lost += 1,
                SECTORS => kept += 1,
                _ => torn += 1,
            }
        }
        assert!(
            kept > 0 && lost > 0 && torn > 0,
            "kept {kept} lost {lost} torn {torn}"
        );
    }

    #[test]
    fn same_seed_replays_exactly() {
        let run = |seed: u64| {
            let disk = MemDisk::new(64 * BLOCK, seed);
            for round in 0..20u64 {
                let mut dev = disk.device();
                for i in 0..8u64 {
                    let at = (round * 7 + i * 3) % 62 * BLOCK;
                    dev.write_at(at, &filled(2, round * 100 + i)).unwrap();
                    if i == 4 && round % 3 == 0 {
                        dev.flush().unwrap();
                    }
                }
                disk.crash();
            }
            read(&mut disk.device(), 0, 64).to_vec()
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10), "different seeds should tear differently");
    }

    #[test]
    fn fail_writes_after_counts_successes() {
        let disk = MemDisk::new(1 << 20, 1);
        let mut dev = disk.device();
        let a = filled(1, 1);
        let b = filled(1, 2);
        dev.write_at(0, &a).unwrap(); // before the fault is set: not counted
        disk.set_faults(Faults {
            fail_writes_after: Some(2),
            ..Faults::default()
        });
        dev.write_at(BLOCK, &a).unwrap();
        dev.write_at(2 * BLOCK, &a).unwrap();
        assert!(injected(dev.write_at(0, &b)));
        assert!(injected(dev.write_at(3 * BLOCK, &b)));
        // The failed writes changed nothing; reads and flushes still work.
        assert_eq!(&read(&mut dev, 0, 1)[..], &a[..]);
        assert!(read(&mut dev, 3 * BLOCK, 1).iter().all(|&x| x == 0));
        dev.flush().unwrap();
        assert_eq!(disk.stats().writes, 3);
        disk.set_faults(Faults::default());
        dev.write_at(0, &b).unwrap();
    }

    #[test]
    fn fail_reads_touching_ranges() {
        let disk = MemDisk::new(1 << 20, 1);
        disk.set_faults(Faults {
            fail_reads: vec![3 * BLOCK + 100..3 * BLOCK + 101, 10 * BLOCK..12 * BLOCK],
            ..Faults::default()
        });
        let mut dev = disk.device();
        let mut one = AlignedBuf::new(BLOCK_SIZE);
        let mut four = AlignedBuf::new(4 * BLOCK_SIZE);
        assert!(injected(dev.read_at(3 * BLOCK, &mut one)));
        assert!(injected(dev.read_at(0, &mut four)));
        dev.read_at(2 * BLOCK, &mut one).unwrap();
        dev.read_at(4 * BLOCK, &mut one).unwrap();
        assert!(injected(dev.read_at(11 * BLOCK, &mut one)));
        // Range ends are exclusive.
        dev.read_at(12 * BLOCK, &mut one).unwrap();
        // Writes to a bad range still succeed: the fault is in reading.
        dev.write_at(3 * BLOCK, &one).unwrap();
        assert_eq!(disk.stats().reads, 3);
    }

    #[test]
    fn fail_flush_leaves_writes_pending() {
        let disk = MemDisk::new(1 << 20, 1);
        let mut dev = disk.device();
        dev.write_at(0, &filled(1, 5)).unwrap();
        disk.set_faults(Faults {
            fail_flush: true,
            ..Faults::default()
        });
        assert!(injected(dev.flush()));
        assert_eq!(disk.pending_writes(), 1);
        assert_eq!(disk.stats().flushes, 0);
        disk.set_faults(Faults::default());
        dev.flush().unwrap();
        assert_eq!(disk.pending_writes(), 0);
    }

    #[test]
    fn faults_persist_across_crash() {
        let disk = MemDisk::new(1 << 20, 1);
        disk.set_faults(Faults {
            fail_flush: true,
            ..Faults::default()
        });
        disk.crash();
        assert!(injected(disk.device().flush()));
    }

    #[test]
    fn corrupt_is_visible_and_durable() {
        let disk = MemDisk::new(1 << 20, 1);
        let mut dev = disk.device();
        let data = filled(2, 3);
        dev.write_at(0, &data).unwrap();
        dev.flush().unwrap();
        // Spans a block boundary.
        disk.corrupt(BLOCK - 2, 4);
        let mut expected = data.clone();
        expected[BLOCK_SIZE - 2..BLOCK_SIZE + 2]
            .iter_mut()
            .for_each(|b| *b = !*b);
        assert_eq!(&read(&mut dev, 0, 2)[..], &expected[..]);
        disk.crash();
        assert_eq!(&read(&mut disk.device(), 0, 2)[..], &expected[..]);
        // Past the end is clamped, not a panic.
        disk.corrupt((1 << 20) - 1, 100);
        disk.corrupt(1 << 30, 100);
    }

    #[test]
    fn corrupt_reaches_unflushed_writes() {
        // Whatever a crash keeps of a pending write, the corrupted bytes stay corrupted.
        let disk = MemDisk::new(1 << 20, 5);
        for round in 0..20u64 {
            let mut dev = disk.device();
            let before = read(&mut dev, 0, 1);
            let new = filled(1, round);
            dev.write_at(0, &new).unwrap();
            disk.corrupt(10, 1);
            assert_eq!(read(&mut dev, 0, 1)[10], !new[10]);
            disk.crash();
            let got = read(&mut disk.device(), 0, 1);
            assert!(got[10] == !new[10] || got[10] == !before[10]);
        }
    }

    #[test]
    fn stats_count_successful_calls() {
        let disk = MemDisk::new(1 << 20, 1);
        let mut dev = disk.device();
        dev.write_at(0, &filled(2, 1)).unwrap();
        dev.write_at(0, &filled(1, 1)).unwrap();
        read(&mut dev, 0, 3);
        dev.flush().unwrap();
        let mut bad = AlignedBuf::new(BLOCK_SIZE);
        let _ = dev.read_at(1 << 20, &mut bad);
        assert_eq!(
            disk.stats(),
            MemStats {
                reads: 1,
                writes: 2,
                flushes: 1,
                bytes_read: 3 * BLOCK,
                bytes_written: 3 * BLOCK,
            }
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write {
            block: u64,
            blocks: usize,
            seed: u64,
        },
        Flush,
        Crash,
    }

    const MODEL_BLOCKS: u64 = 16;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..MODEL_BLOCKS, 1..=3usize, any::<u64>()).prop_map(|(block, blocks, seed)| Op::Write {
                block,
                blocks: blocks.min((MODEL_BLOCKS - block) as usize),
                seed,
            }),
            2 => Just(Op::Flush),
            1 => Just(Op::Crash),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Against a model that tracks, per block, the durable contents and every version
        /// written since the last flush: reads always see the latest version; after a
        /// crash a block no unflushed write touched is exactly its durable contents, and
        /// every sector of a block an unflushed write touched is one of its versions.
        #[test]
        fn crash_outcomes_match_the_model(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..60)) {
            let disk = MemDisk::new(MODEL_BLOCKS * BLOCK, seed);
            let mut dev = disk.device();
            let mut durable = vec![vec![0u8; BLOCK_SIZE]; MODEL_BLOCKS as usize];
            let mut versions: Vec<Vec<Vec<u8>>> = vec![Vec::new(); MODEL_BLOCKS as usize];
            let latest = |durable: &[Vec<u8>], versions: &[Vec<Vec<u8>>], b: usize| {
                versions[b].last().unwrap_or(&durable[b]).clone()
            };

            for op in ops {
                match op {
                    Op::Write { block, blocks, seed } => {
                        let data = filled(blocks, seed);
                        dev.write_at(block * BLOCK, &data).unwrap();
                        for (i, chunk) in data.chunks(BLOCK_SIZE).enumerate() {
                            versions[block as usize + i].push(chunk.to_vec());
                        }
                    }
                    Op::Flush => {
                        dev.flush().unwrap();
                        for b in 0..MODEL_BLOCKS as usize {
                            durable[b] = latest(&durable, &versions, b);
                            versions[b].clear();
                        }
                    }
                    Op::Crash => {
                        disk.crash();
                        let mut buf = AlignedBuf::new(BLOCK_SIZE);
                        prop_assert!(injected(dev.read_at(0, &mut buf)));
                        dev = disk.device();
                        let all = read(&mut dev, 0, MODEL_BLOCKS as usize);
                        for (b, got) in all.chunks(BLOCK_SIZE).enumerate() {
                            if versions[b].is_empty() {
                                prop_assert_eq!(got, &durable[b][..], "block {} changed", b);
                            } else {
                                for s in 0..SECTORS {
                                    let r = s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE;
                                    let ok = got[r.clone()] == durable[b][r.clone()]
                                        || versions[b].iter().any(|v| got[r.clone()] == v[r.clone()]);
                                    prop_assert!(ok, "block {} sector {} is no version of it", b, s);
                                }
                            }
                            durable[b] = got.to_vec();
                            versions[b].clear();
                        }
                    }
                }
                let all = read(&mut dev, 0, MODEL_BLOCKS as usize);
                for (b, got) in all.chunks(BLOCK_SIZE).enumerate() {
                    prop_assert_eq!(got, &latest(&durable, &versions, b)[..], "read of block {}", b);
                }
            }
        }
    }

    /// Submits everything, then polls until all complete; returns the tags in
    /// completion order.
    fn drain(dev: &mut MemDevice, out: &mut Vec<Completion>) -> Vec<u64> {
        let mut order = Vec::new();
        for _ in 0..100 {
            let mut got = Vec::new();
            dev.poll(usize::MAX, &mut got);
            order.extend(got.iter().map(|c| c.tag.0));
            out.extend(got);
            if dev.in_flight() == 0 {
                break;
            }
        }
        order
    }

    #[test]
    fn completions_come_late_and_out_of_order_and_replay_by_seed() {
        let run = |seed: u64| {
            let disk = MemDisk::new(1 << 20, seed);
            let mut dev = disk.device();
            for i in 0..32u64 {
                dev.submit(
                    IoTag(i),
                    IoOp::Read {
                        offset: i * BLOCK,
                        buf: AlignedBuf::new(BLOCK_SIZE),
                    },
                );
            }
            assert_eq!(dev.in_flight(), 32);
            let mut out = Vec::new();
            let order = drain(&mut dev, &mut out);
            assert!(out.iter().all(|c| c.result.is_ok()));
            order
        };
        let a = run(7);
        assert_eq!(a.len(), 32);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_ne!(a, sorted, "32 reads all in submission order: no reordering");
        assert_eq!(a, run(7), "same seed, same order");
    }

    #[test]
    fn a_flush_covers_only_writes_completed_before_it_was_submitted() {
        let disk = MemDisk::new(1 << 20, 3);
        disk.set_latency(Latency {
            max_polls: 0,
            reorder: false,
        });
        let mut dev = disk.device();
        // Write A completes; then a flush and write B are in flight together.
        dev.submit(
            IoTag(1),
            IoOp::Write {
                offset: 0,
                buf: filled(1, 1),
            },
        );
        let mut out = Vec::new();
        drain(&mut dev, &mut out);
        dev.submit(IoTag(2), IoOp::Flush);
        dev.submit(
            IoTag(3),
            IoOp::Write {
                offset: BLOCK,
                buf: filled(1, 2),
            },
        );
        drain(&mut dev, &mut out);
        assert!(out.iter().all(|c| c.result.is_ok()));
        // B completed before the flush ran (no reordering, FIFO) but after it was
        // submitted: only A is promised, and only A is durable.
        assert_eq!(disk.pending_writes(), 1);
        disk.set_faults(Faults::default());
        disk.crash();
        let mut dev = disk.device();
        assert_eq!(read(&mut dev, 0, 1)[..], filled(1, 1)[..]);
    }

    #[test]
    fn operations_of_a_crashed_device_fail() {
        let disk = MemDisk::new(1 << 20, 5);
        let mut dev = disk.device();
        dev.submit(
            IoTag(9),
            IoOp::Read {
                offset: 0,
                buf: AlignedBuf::new(BLOCK_SIZE),
            },
        );
        disk.crash();
        let mut out = Vec::new();
        drain(&mut dev, &mut out);
        assert!(injected(out.pop().unwrap().result));
    }
}
