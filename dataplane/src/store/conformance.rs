//! The object store's own test suite, run on any [`BlockDevice`] backend: a bounded,
//! seeded, model-checked exercise of the whole [`Store`] API for devices the caller
//! opens — in particular real NVMe devices driven by the user-space driver inside a QEMU
//! guest, where nothing but the devices themselves is available.
//!
//! [`run`] takes a factory that opens the devices (the same underlying storage at every
//! call, so that a store can be dropped and opened again to check persistence) and
//! checks every result against an in-memory model: fingerprint → content, refcount and
//! disk. Contents are not kept in memory but regenerated on demand from a seed (any
//! byte of any object can be computed directly), so the model of 100 MB of objects
//! costs a few kilobytes. Any disagreement — a wrong byte, a wrong length or
//! refcount, a missing or extra object, a report that does not add up, an error where
//! success was due — ends the run with an `Err` describing what differed and where in
//! the run it happened. The suite itself never panics on a bad result.
//!
//! # What a run does
//!
//! 1. **Preflight** (whole devices): writes a distinct pattern into blocks spread over
//!    each device (every power of two, the block before it, sixteen evenly spaced ones
//!    and the last block), reads them back, and checks that a read past the end fails.
//!    A driver that truncates or aliases addresses fails here, before the store could
//!    mistake it for rot.
//! 2. **Log wrap** (a window at the *end* of each device, a few MiB, segments of
//!    256 KiB): the store is given only that window, so that its circular log goes
//!    round the disk — and through the device's highest blocks — within a bounded
//!    amount of I/O. Seeded churn of stores, dedup re-stores, deletes, compaction
//!    (forced when the disks fill, and `maybe_compact`), checkpoints, a write kept open
//!    across compactions, and a reopen (alternately after a checkpoint and without one)
//!    at the end of each round, verifying everything; until every disk's log has
//!    wrapped. Then everything is deleted, compacted (the logs must end up empty) and
//!    reopened.
//! 3. **Whole devices** (segments of 1 MiB, the production default): round trips of
//!    0 B, 1 B, 4095, 4096, 4097, 128 KiB ± 1, 1 MiB + 17, segment ± 1 and several
//!    multi-segment objects, each appended in odd chunk sizes and read back at once;
//!    range reads at the edges (start, block and segment boundaries, end, past the
//!    end); dedup (refcount 2, one delete keeps the object, the second removes it, a
//!    third is NotFound, a re-store brings it back); aborts (nothing visible, the id
//!    dead, nothing resurrected by a reopen); Busy and TooLarge; interleaved writes;
//!    a reopen without checkpoint; then `rounds` rounds of random stores (every seventh
//!    a dedup) and deletes, `maybe_compact` (and in the last round a full compaction of
//!    every disk), reading back a third of the objects, then a reopen (the last one after
//!    a checkpoint, alternating before it) and a byte-exact read of every object.
//!
//! After every step the store's listing ([`Store::contents`]) must equal the model, each
//! object's [`Store::get`] its length, refcount and disk, every disk must be Online
//! with its identity unchanged, and the store's space accounting must add up. A
//! checkpoint must be the one the next open starts from.
//!
//! # Making the devices blank
//!
//! The store formats a disk whose block 0 is all zero and whose two superblock copies
//! (blocks 0 and 1) are both invalid (format.rs, "Superblock"); anything else on the
//! disk is either behind a valid superblock or ignored (old log records carry another
//! log's nonce; checkpoints are only read through their headers in blocks 2 and 3, which
//! must match the new identity and nonce). So each phase zeroes the first 64 KiB of its
//! region and flushes. The formatting seed (identity and log nonce) is derived from
//! `Options::seed` and a hash of what the devices held before the run, so that a run
//! over the remains of an identical earlier run never gets that run's nonce (whose stale
//! records could otherwise pass for the new log's), while equal devices and equal
//! options still give an identical run.
//!
//! # Cost
//!
//! With [`Options::default`] a run on one 256 MiB device stores about 65 MB of object
//! data (log-wrap phase: 1.25 times the 12 MiB window; whole devices: about 20 MB of
//! fixed sizes, dedup, aborts and interleaved writes, plus `rounds × objects` random
//! objects of up to `max_object_bytes`), which with headers, aborted and deduplicated
//! writes and compaction's moves comes to about 120 MB written to the device and
//! 230 MB read from it (every object is read back after its commit and after every
//! reopen). The sizes scale with the options; see [`Report`] for what a run did. On
//! in-memory disks it takes 0.6 s optimised, 4 s in a debug build.

use std::collections::{BTreeSet, HashMap};

use md5::{Digest, Md5};
use nvme::{AlignedBuf, BlockDevice, DevError, DeviceInfo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use dosp::Fingerprint;

use super::format::{packed_size, record_size, BLOCK, BLOCK_U64, PACKED_MAX_DATA};
use super::{Committed, DiskId, DiskState, Store, StoreConfig, StoreError, WriteId};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const MIB_U64: u64 = 1 << 20;

/// Node id the suite formats its disks with.
const NODE_ID: u64 = 0xC0F0_4A1C;
/// Bytes zeroed at the start of a region to make it blank (the store looks at 4 blocks).
const BLANK_BYTES: u64 = 64 * 1024;
/// Smallest device the suite accepts.
const MIN_DEVICE_BYTES: u64 = 16 * MIB_U64;
/// Segment size of the whole-device phase (the production default).
const SEG_FULL: usize = MIB;
/// Segment size of the log-wrap phase.
const SEG_WRAP: usize = 256 * KIB;
/// The object data the store may hold at once, as a share of its capacity: beyond it the
/// suite deletes objects before storing more, so compaction always has room to work.
const LIVE_SHARE: f64 = 0.4;
/// Largest single append (and the size of the suite's buffers beyond the largest
/// object, if that is smaller).
const BUF_MAX: usize = 8 * MIB;
/// Chunk sizes appends are drawn from (besides the whole rest of the object).
const CHUNKS: [usize; 12] = [
    1, 7, 100, 511, 4095, 4096, 4097, 12_289, 65_537, 131_071, 333_333, 1_048_583,
];
/// At most this many appends per object (small chunks are only drawn for small objects).
const MAX_APPENDS: usize = 2048;

/// What [`run`] does: all sizes and counts scale with these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Seeds every content, size, chunking and choice of operation. Equal devices and
    /// equal options give an identical run.
    pub seed: u64,
    /// Random objects stored per round of the whole-device phase.
    pub objects: usize,
    /// Largest random object of the whole-device phase (and of the fixed sizes); the
    /// log-wrap window is sized from it too (3 × this, at least 8 MiB, split over the
    /// devices, 4 to 16 MiB each).
    pub max_object_bytes: usize,
    /// Rounds of churn (stores, deletes, compaction, reopen) in each phase.
    pub rounds: usize,
}

impl Default for Options {
    /// About 65 MB of object data, 120 MB of device writes on one device (see the
    /// module doc).
    fn default() -> Self {
        Options {
            seed: 0xD05D,
            objects: 16,
            max_object_bytes: 4 * MIB,
            rounds: 2,
        }
    }
}

/// What a successful [`run`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Devices the factory returned.
    pub disks: usize,
    /// Blocks written and read back by the preflight address probe.
    pub blocks_probed: u64,
    /// Successful commits, deduplicated ones included.
    pub objects_stored: u64,
    /// Object bytes of those commits.
    pub bytes_stored: u64,
    /// Commits that found their object already stored.
    pub dedup_hits: u64,
    /// Successful deletes (one reference each).
    pub deletes: u64,
    /// Writes aborted on purpose.
    pub aborts: u64,
    /// Stores dropped and opened again through the factory (formats not counted).
    pub reopens: u64,
    /// Disks that a reopen started from a checkpoint (summed over reopens).
    pub disks_from_checkpoint: u64,
    pub checkpoints: u64,
    /// Compaction steps the store made (explicit and `maybe_compact`).
    pub compactions: u64,
    pub bytes_reclaimed: u64,
    /// Times a disk's log went round its region (WRAP records written).
    pub wraps: u64,
    /// `read` calls whose outcome (bytes and length, or error) matched the model.
    pub verified_reads: u64,
    /// Object bytes those reads returned.
    pub bytes_verified: u64,
    /// I/O that reached the devices through the store, summed over every open.
    pub device_bytes_written: u64,
    pub device_bytes_read: u64,
}

/// Runs the suite on the devices `open_devices` returns (see the module doc). Every
/// call of `open_devices` must return the same devices in the same order, freshly
/// opened over the same storage; the previous ones are always dropped first. Their
/// contents at the start do not matter (and are destroyed). Devices of 64–512 MiB are
/// the intended size; at least 16 MiB is required.
///
/// Returns what was done, or the first disagreement with the model, described.
pub fn run(
    open_devices: &mut dyn FnMut() -> Result<Vec<Box<dyn BlockDevice>>, String>,
    opts: &Options,
) -> Result<Report, String> {
    if opts.max_object_bytes == 0 || opts.max_object_bytes > 1 << 30 {
        return Err(format!(
            "max_object_bytes must be between 1 and 1 GiB, got {}",
            opts.max_object_bytes
        ));
    }
    let mut report = Report::default();
    let mut devs = open_devices().map_err(|e| format!("opening the devices: {e}"))?;
    if devs.is_empty() {
        return Err("the factory returned no device".into());
    }
    if devs.len() > 64 {
        return Err(format!("too many devices: {}", devs.len()));
    }
    report.disks = devs.len();
    let sizes: Vec<u64> = devs.iter().map(|d| d.info().size_bytes).collect();
    for (i, &size) in sizes.iter().enumerate() {
        if size < MIN_DEVICE_BYTES || !size.is_multiple_of(BLOCK_U64) {
            return Err(format!(
                "device {i} ({}) has {size} bytes: at least {MIN_DEVICE_BYTES}, a multiple of {BLOCK}, needed",
                devs[i].info().location
            ));
        }
    }
    let window = window_len(opts, &sizes);
    let entropy = old_contents_hash(&mut devs, window, opts.seed)?;
    report.blocks_probed = preflight(&mut devs, opts.seed)?;
    drop(devs);

    {
        let mut h = Harness::new(open_devices, opts, &mut report, sizes.len());
        h.window = Some(window);
        h.cfg = config(SEG_WRAP);
        h.fmt_seed = mix(entropy, 0x57A9);
        let r = phase_wrap(&mut h, opts);
        h.finish(r).map_err(|e| {
            format!(
                "log wrap phase ({} KiB at the end of each device), {e}",
                window >> 10
            )
        })?;
    }
    {
        let mut h = Harness::new(open_devices, opts, &mut report, sizes.len());
        h.cfg = config(SEG_FULL);
        h.cfg.max_object_bytes = max_object(opts) as u64;
        h.fmt_seed = mix(entropy, 0xF011);
        h.next_content = 1 << 32;
        let r = phase_full(&mut h, opts);
        h.finish(r)
            .map_err(|e| format!("whole-device phase, {e}"))?;
    }
    Ok(report)
}

fn config(segment_bytes: usize) -> StoreConfig {
    StoreConfig {
        segment_bytes,
        max_open_writes: 8,
        max_object_bytes: 1 << 30,
        compact_dead_ratio: 0.5,
        // The suite is about the device: every read must reach it.
        cache_bytes: 0,
        ..StoreConfig::default()
    }
}

/// The largest object of the whole-device phase: the options' maximum, but at least
/// the largest fixed size.
fn max_object(opts: &Options) -> usize {
    opts.max_object_bytes.max(3 * SEG_FULL + 12_345)
}

/// Bytes of each device's log-wrap window: 3 × `max_object_bytes` (8 to 32 MiB) split over the
/// devices, 4 to 16 MiB each, at most half the device.
fn window_len(opts: &Options, sizes: &[u64]) -> u64 {
    let total = (3 * opts.max_object_bytes as u64).clamp(8 * MIB_U64, 32 * MIB_U64);
    let per = (total / sizes.len().max(1) as u64).clamp(4 * MIB_U64, 16 * MIB_U64);
    let smallest = sizes.iter().copied().min().unwrap_or(0);
    let w = per.min(smallest / 2);
    w - w % BLOCK_U64
}

/// splitmix64 of `a` and `b`.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn dev_err(what: &str, i: usize, e: DevError) -> String {
    format!("{what} on device {i}: {e}")
}

/// A hash of the first blocks of every region the run will format, as they were before
/// the run (see "Making the devices blank" in the module doc).
fn old_contents_hash(
    devs: &mut [Box<dyn BlockDevice>],
    window: u64,
    seed: u64,
) -> Result<u64, String> {
    let mut md5 = Md5::new();
    md5.update(seed.to_le_bytes());
    let mut buf = AlignedBuf::new(4 * BLOCK);
    for (i, d) in devs.iter_mut().enumerate() {
        let size = d.info().size_bytes;
        for at in [0, size - window] {
            d.read_at(at, &mut buf)
                .map_err(|e| dev_err("reading the old contents", i, e))?;
            md5.update(&buf[..]);
        }
    }
    let digest: [u8; 16] = md5.finalize().into();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    Ok(u64::from_le_bytes(first))
}

/// Offsets the address probe writes on a device of `size` bytes.
fn probe_offsets(size: u64) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    set.insert(0);
    set.insert(size - BLOCK_U64);
    let mut p = BLOCK_U64;
    while p < size {
        set.insert(p);
        set.insert(p - BLOCK_U64);
        p = p.saturating_mul(2);
    }
    let blocks = size / BLOCK_U64;
    for i in 1..16 {
        set.insert(blocks * i / 16 * BLOCK_U64);
    }
    set
}

/// Writes a distinct block at offsets spread over each device, reads them all back, and
/// checks that a read past the end fails. Returns the blocks probed.
fn preflight(devs: &mut [Box<dyn BlockDevice>], seed: u64) -> Result<u64, String> {
    let mut blk = AlignedBuf::new(BLOCK);
    let mut want = vec![0u8; BLOCK];
    let mut probed = 0;
    for (i, d) in devs.iter_mut().enumerate() {
        let size = d.info().size_bytes;
        let offsets = probe_offsets(size);
        let content = |at: u64| Content {
            seed: mix(mix(seed, 0x9B0B ^ i as u64), at),
            len: BLOCK,
        };
        for &at in &offsets {
            content(at).fill(0, &mut blk);
            d.write_at(at, &blk)
                .map_err(|e| dev_err("address probe: write", i, e))?;
        }
        d.flush()
            .map_err(|e| dev_err("address probe: flush", i, e))?;
        for &at in &offsets {
            d.read_at(at, &mut blk)
                .map_err(|e| dev_err("address probe: read", i, e))?;
            content(at).fill(0, &mut want);
            if blk[..] != want[..] {
                // Whose block is it?
                let whose = offsets
                    .iter()
                    .find(|&&o| {
                        content(o).fill(0, &mut want);
                        blk[..] == want[..]
                    })
                    .map_or_else(
                        || "no probed block's".to_string(),
                        |o| format!("the block written at offset {o}'s"),
                    );
                return Err(format!(
                    "address probe: block at offset {at} of device {i} ({size} bytes) reads back \
                     {whose} contents (addresses truncated or aliased?)"
                ));
            }
            probed += 1;
        }
        if d.read_at(size, &mut blk).is_ok() {
            return Err(format!(
                "device {i}: reading the block at offset {size}, past its end ({size} bytes), succeeded"
            ));
        }
    }
    Ok(probed)
}

/// An object's bytes, regenerated on demand: byte `o` is byte `o % 8` of a hash of
/// `(seed, o / 8)`, so any range can be produced without the bytes before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Content {
    seed: u64,
    len: usize,
}

impl Content {
    /// Fills `out` with the bytes at `offset..offset + out.len()`.
    fn fill(&self, offset: u64, out: &mut [u8]) {
        let mut word = offset / 8;
        let skip = (offset % 8) as usize;
        let mut rest: &mut [u8] = out;
        if skip != 0 {
            let w = mix(self.seed, word).to_le_bytes();
            let n = (8 - skip).min(rest.len());
            let (head, tail) = rest.split_at_mut(n);
            head.copy_from_slice(&w[skip..skip + n]);
            rest = tail;
            word += 1;
        }
        let mut chunks = rest.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&mix(self.seed, word).to_le_bytes());
            word += 1;
        }
        let tail = chunks.into_remainder();
        let n = tail.len();
        tail.copy_from_slice(&mix(self.seed, word).to_le_bytes()[..n]);
    }
}

/// The model's view of an object.
#[derive(Clone, Copy, Debug)]
struct Obj {
    content: Content,
    refcount: u32,
    disk: DiskId,
}

/// Log footprint of an object of `len` bytes written in segments of `seg` bytes: one
/// packed record if it fits one segment and the packed limit, else its segments.
fn footprint(len: u64, seg: u64) -> u64 {
    if len <= seg.min(PACKED_MAX_DATA as u64) {
        return packed_size(len);
    }
    let (full, rest) = (len / seg, len % seg);
    let last = if rest > 0 || full == 0 {
        record_size(rest)
    } else {
        0
    };
    full * record_size(seg) + last
}

type Opener<'o> = dyn FnMut() -> Result<Vec<Box<dyn BlockDevice>>, String> + 'o;

struct Harness<'a, 'o> {
    open: &'a mut Opener<'o>,
    report: &'a mut Report,
    disks: usize,
    /// Bytes at the end of each device the store gets, or `None` for whole devices.
    window: Option<u64>,
    cfg: StoreConfig,
    store: Option<Store>,
    model: HashMap<Fingerprint, Obj>,
    identities: Vec<[u8; 16]>,
    rng: StdRng,
    seed: u64,
    fmt_seed: u64,
    open_seed: u64,
    next_content: u64,
    /// WRAP records per disk, summed over the stores already dropped.
    wraps: Vec<u64>,
    /// An object `put` must not delete to make room.
    keep: Option<Fingerprint>,
    /// Where the run is, for error messages.
    ctx: String,
    buf: Vec<u8>,
    want: Vec<u8>,
}

impl<'a, 'o> Harness<'a, 'o> {
    fn new(
        open: &'a mut Opener<'o>,
        opts: &Options,
        report: &'a mut Report,
        disks: usize,
    ) -> Harness<'a, 'o> {
        let len = max_object(opts).min(BUF_MAX).max(CHUNKS[CHUNKS.len() - 1]) + 2 * BLOCK;
        Harness {
            open,
            report,
            disks,
            window: None,
            cfg: config(SEG_FULL),
            store: None,
            model: HashMap::new(),
            identities: Vec::new(),
            rng: StdRng::seed_from_u64(opts.seed),
            seed: opts.seed,
            fmt_seed: 0,
            open_seed: opts.seed,
            next_content: 0,
            wraps: vec![0; disks],
            keep: None,
            ctx: "start".into(),
            buf: vec![0; len],
            want: vec![0; len],
        }
    }

    fn step(&mut self, ctx: impl Into<String>) {
        self.ctx = ctx.into();
    }

    /// Accounts for the store still open and prefixes an error with where it happened.
    fn finish(&mut self, r: Result<(), String>) -> Result<(), String> {
        if let Some(s) = self.store.take() {
            self.retire(&s);
        }
        r.map_err(|e| format!("{}: {e}", self.ctx))
    }

    fn store(&mut self) -> Result<&mut Store, String> {
        self.store
            .as_mut()
            .ok_or_else(|| "no store is open".to_string())
    }

    fn fresh(&mut self, len: usize) -> Content {
        self.next_content += 1;
        Content {
            seed: mix(self.seed, self.next_content),
            len,
        }
    }

    fn seg(&self) -> u64 {
        self.cfg.segment_bytes as u64
    }

    /// The devices from the factory, each cut down to its window if there is one.
    fn devices(&mut self) -> Result<Vec<Box<dyn BlockDevice>>, String> {
        let devs = (self.open)().map_err(|e| format!("opening the devices: {e}"))?;
        if devs.len() != self.disks {
            return Err(format!(
                "the factory returned {} devices, {} before",
                devs.len(),
                self.disks
            ));
        }
        match self.window {
            None => Ok(devs),
            Some(len) => devs.into_iter().map(|d| Window::wrap(d, len)).collect(),
        }
    }

    /// Counts what a store about to be dropped did.
    fn retire(&mut self, s: &Store) {
        let c = s.counters();
        self.report.compactions += c.compactions;
        self.report.bytes_reclaimed += c.bytes_reclaimed;
        for (i, v) in s.vols.iter().enumerate() {
            self.report.wraps += v.wraps;
            if let Some(w) = self.wraps.get_mut(i) {
                *w += v.wraps;
            }
        }
        for d in s.disks() {
            self.report.device_bytes_written += d.io.write_bytes;
            self.report.device_bytes_read += d.io.read_bytes;
        }
    }

    /// Zeroes the start of every region and opens a store on it, which must format
    /// every disk.
    fn format(&mut self) -> Result<(), String> {
        self.step("making the devices blank");
        let mut devs = self.devices()?;
        let mut zeros = AlignedBuf::new(BLANK_BYTES as usize);
        for (i, d) in devs.iter_mut().enumerate() {
            zeros.fill(0);
            d.write_at(0, &zeros)
                .map_err(|e| dev_err("zeroing", i, e))?;
            d.flush().map_err(|e| dev_err("flush", i, e))?;
            d.read_at(0, &mut zeros)
                .map_err(|e| dev_err("reading back zeros", i, e))?;
            if let Some(at) = zeros.iter().position(|&b| b != 0) {
                return Err(format!(
                    "device {i}: byte {at} reads back {:#04x} after zeros were written and flushed",
                    zeros[at]
                ));
            }
        }
        drop(devs);
        self.step("formatting");
        let devs = self.devices()?;
        let sizes: Vec<u64> = devs.iter().map(|d| d.info().size_bytes).collect();
        let s = Store::open_seeded(devs, self.cfg.clone(), NODE_ID, self.fmt_seed)
            .map_err(|e| format!("open of blank devices failed: {e}"))?;
        let reports = s.disks();
        for (r, &size) in reports.iter().zip(&sizes) {
            if r.state != DiskState::Online {
                return Err(format!(
                    "disk {} is {:?} after formatting a blank device ({:?})",
                    r.id.0, r.state, r.last_error
                ));
            }
            if r.bytes_total != size || r.objects_used != 0 || r.bytes_dead != 0 {
                return Err(format!(
                    "fresh disk {} reports {} bytes total (device: {size}), {} objects, {} dead bytes",
                    r.id.0, r.bytes_total, r.objects_used, r.bytes_dead
                ));
            }
            if r.identity == [0; 16] {
                return Err(format!("fresh disk {} has a zero identity", r.id.0));
            }
        }
        let identities: Vec<[u8; 16]> = reports.iter().map(|r| r.identity).collect();
        let distinct: BTreeSet<_> = identities.iter().collect();
        if distinct.len() != identities.len() {
            return Err("two fresh disks got the same identity".into());
        }
        if let Some((fp, _)) = s.contents().first() {
            return Err(format!("freshly formatted store lists object {fp}"));
        }
        self.identities = identities;
        self.store = Some(s);
        self.model.clear();
        self.check_state()
    }

    /// Drops the store (after a checkpoint if asked) and opens it again through the
    /// factory; then everything in the model must read back exactly.
    fn reopen(&mut self, checkpoint: bool) -> Result<(), String> {
        let mut s = self
            .store
            .take()
            .ok_or_else(|| "no store is open".to_string())?;
        let mut covered = vec![None; self.disks];
        if checkpoint {
            s.checkpoint()
                .map_err(|e| format!("checkpoint failed: {e}"))?;
            self.report.checkpoints += 1;
            for (i, v) in s.vols.iter().enumerate() {
                if v.ckpt.seq != Some(v.next_seq) && !v.ckpt.diverged {
                    return Err(format!(
                        "after a checkpoint disk {i}'s checkpoint covers up to seq {:?}, its log to {}",
                        v.ckpt.seq, v.next_seq
                    ));
                }
                covered[i] = v.ckpt.seq;
            }
        }
        self.retire(&s);
        drop(s);
        let devs = self.devices()?;
        self.open_seed = mix(self.open_seed, 1);
        let s = Store::open_seeded(devs, self.cfg.clone(), NODE_ID, self.open_seed)
            .map_err(|e| format!("reopen failed: {e}"))?;
        self.report.reopens += 1;
        for (i, v) in s.vols.iter().enumerate() {
            if let Some(seq) = covered.get(i).copied().flatten() {
                if v.ckpt.loaded != Some(seq) {
                    return Err(format!(
                        "disk {i} did not start from the checkpoint written just before (seq {seq}; \
                         started from {:?})",
                        v.ckpt.loaded
                    ));
                }
            }
            if v.ckpt.loaded.is_some() {
                self.report.disks_from_checkpoint += 1;
            }
        }
        self.store = Some(s);
        self.check_state()?;
        self.verify_all()
    }

    /// The store's listing, metadata, disk reports and space accounting agree with the
    /// model.
    fn check_state(&mut self) -> Result<(), String> {
        let seg = self.seg();
        let Harness {
            store,
            model,
            identities,
            disks,
            ..
        } = self;
        let s = store
            .as_mut()
            .ok_or_else(|| "no store is open".to_string())?;
        let listed = s.contents();
        let mut want: Vec<Fingerprint> = model.keys().copied().collect();
        want.sort_unstable();
        let got: Vec<Fingerprint> = listed.iter().map(|(fp, _)| *fp).collect();
        if got != want {
            let extra = got.iter().find(|fp| !model.contains_key(fp));
            let missing = want.iter().find(|fp| !got.contains(fp));
            return Err(format!(
                "contents lists {} objects, the model has {}; first unexpected: {}, first missing: {}",
                got.len(),
                want.len(),
                extra.map_or("none".into(), |f| f.to_string()),
                missing.map_or("none".into(), |f| f.to_string()),
            ));
        }
        let mut per_disk = vec![0u64; *disks];
        for (fp, disk) in &listed {
            let o = model
                .get(fp)
                .ok_or_else(|| format!("object {fp} listed but not in the model"))?;
            let m = s
                .get(fp)
                .ok_or_else(|| format!("object {fp} listed but unknown to get()"))?;
            if m.len != o.content.len as u64 || m.refcount != o.refcount || m.disk != *disk {
                return Err(format!(
                    "object {fp}: get() says {} bytes, refcount {}, disk {} (listed on disk {}); \
                     the model {} bytes, refcount {}, disk {}",
                    m.len, m.refcount, m.disk.0, disk.0, o.content.len, o.refcount, o.disk.0
                ));
            }
            if m.disk != o.disk {
                return Err(format!(
                    "object {fp} moved from disk {} to disk {}",
                    o.disk.0, m.disk.0
                ));
            }
            match per_disk.get_mut(usize::from(disk.0)) {
                Some(n) => *n += 1,
                None => return Err(format!("object {fp} on disk {} of {disks}", disk.0)),
            }
        }
        let reports = s.disks();
        if reports.len() != *disks {
            return Err(format!("{} disk reports for {disks} disks", reports.len()));
        }
        for (i, r) in reports.iter().enumerate() {
            if r.state != DiskState::Online {
                return Err(format!(
                    "disk {i} is {:?} (last error: {:?})",
                    r.state, r.last_error
                ));
            }
            if r.errors != 0 {
                return Err(format!(
                    "disk {i} counts {} errors (last: {:?})",
                    r.errors, r.last_error
                ));
            }
            if identities.get(i) != Some(&r.identity) {
                return Err(format!("disk {i} changed identity"));
            }
            if r.objects_used != per_disk[i] {
                return Err(format!(
                    "disk {i} reports {} objects, the listing has {}",
                    r.objects_used, per_disk[i]
                ));
            }
            if r.bytes_free > r.bytes_available || r.bytes_available > r.bytes_total {
                return Err(format!(
                    "disk {i} reports {} bytes free, {} available, {} total",
                    r.bytes_free, r.bytes_available, r.bytes_total
                ));
            }
        }
        // The store's own bookkeeping against its index (as the unit tests check it).
        for v in &s.vols {
            let entries: Vec<_> = s.index.values().filter(|e| e.disk == v.id).collect();
            let live: u64 = entries.iter().map(|e| e.footprint).sum();
            if v.objects != entries.len() as u64 || v.live_bytes != live || v.used() > v.log_len {
                return Err(format!(
                    "disk {}: accounting says {} objects and {} live bytes, the index {} and {}; \
                     {} of {} log bytes used",
                    v.id.0,
                    v.objects,
                    v.live_bytes,
                    entries.len(),
                    live,
                    v.used(),
                    v.log_len
                ));
            }
        }
        for (fp, e) in s.index.iter() {
            let sum: u64 = e.extents.iter().map(|x| u64::from(x.len)).sum();
            let want = footprint(e.len, seg);
            let shape_ok = e
                .extents
                .split_last()
                .is_some_and(|(_, body)| body.iter().all(|x| u64::from(x.len) == seg));
            if sum != e.len || e.footprint != want || !shape_ok {
                return Err(format!(
                    "object {fp}: {} bytes in {} extents summing to {sum}, footprint {} (expected {want} \
                     for segments of {seg})",
                    e.len,
                    e.extents.len(),
                    e.footprint
                ));
            }
        }
        Ok(())
    }

    /// Bytes of log the model's objects take, and the store's capacity for data.
    fn room(&self) -> Result<(u64, u64), String> {
        let s = self
            .store
            .as_ref()
            .ok_or_else(|| "no store is open".to_string())?;
        let live = self
            .model
            .values()
            .map(|o| footprint(o.content.len as u64, self.seg()))
            .sum();
        let cap = s.vols.iter().map(|v| v.capacity()).sum();
        Ok((live, cap))
    }

    fn content(&self, fp: &Fingerprint) -> Result<Content, String> {
        self.model
            .get(fp)
            .map(|o| o.content)
            .ok_or_else(|| format!("{fp} is not in the model"))
    }

    /// A random object of the model, if any (deterministic: by sorted fingerprint).
    fn pick(&mut self) -> Option<Fingerprint> {
        if self.model.is_empty() {
            return None;
        }
        let mut fps: Vec<Fingerprint> = self.model.keys().copied().collect();
        fps.sort_unstable();
        let i = self.rng.gen_range(0..fps.len());
        fps.get(i).copied()
    }

    /// A random object of the model that `put` may delete to make room.
    fn pick_victim(&mut self) -> Option<Fingerprint> {
        let keep = self.keep;
        if self.model.len() == usize::from(keep.is_some_and(|k| self.model.contains_key(&k))) {
            return None;
        }
        loop {
            let fp = self.pick()?;
            if Some(fp) != keep {
                return Some(fp);
            }
        }
    }

    /// A chunk length for an object of `len` bytes.
    fn chunk(rng: &mut StdRng, len: usize) -> usize {
        let ok: Vec<usize> = CHUNKS
            .iter()
            .copied()
            .filter(|&c| c.saturating_mul(MAX_APPENDS) >= len)
            .collect();
        let whole = len.clamp(1, BUF_MAX);
        match rng.gen_range(0..=ok.len()) {
            i if i < ok.len() => ok[i],
            _ => whole,
        }
    }

    /// Checks a successful commit of `content`, whose MD5 is `fp`, against the model
    /// and records it.
    fn committed(&mut self, fp: Fingerprint, content: Content, c: Committed) -> Result<(), String> {
        let prev = self.model.get(&fp).copied();
        let want_rc = prev.map_or(0, |o| o.refcount) + 1;
        if c.fingerprint != fp
            || c.len != content.len as u64
            || c.deduplicated != prev.is_some()
            || c.refcount != want_rc
            || prev.is_some_and(|o| o.disk != c.disk)
            || usize::from(c.disk.0) >= self.disks
        {
            return Err(format!(
                "commit of {} bytes returned {c:?}; expected fingerprint {fp}, deduplicated {}, \
                 refcount {want_rc}{}",
                content.len,
                prev.is_some(),
                prev.map_or(String::new(), |o| format!(", disk {}", o.disk.0))
            ));
        }
        self.model.insert(
            fp,
            Obj {
                content: prev.map_or(content, |o| o.content),
                refcount: want_rc,
                disk: c.disk,
            },
        );
        self.report.objects_stored += 1;
        self.report.bytes_stored += content.len as u64;
        if c.deduplicated {
            self.report.dedup_hits += 1;
        }
        Ok(())
    }

    /// Appends `content[from..to]` to write `id` in random chunks, feeding `md5`.
    /// `Ok(false)`: the store ran out of space (and aborted the write).
    fn append_range(
        &mut self,
        id: WriteId,
        content: Content,
        from: usize,
        to: usize,
        md5: &mut Md5,
    ) -> Result<bool, String> {
        let Harness {
            store, rng, buf, ..
        } = self;
        let s = store
            .as_mut()
            .ok_or_else(|| "no store is open".to_string())?;
        let mut off = from;
        while off < to {
            let n = Self::chunk(rng, content.len).min(to - off).min(buf.len());
            let chunk = &mut buf[..n];
            content.fill(off as u64, chunk);
            md5.update(&*chunk);
            match s.append(id, chunk) {
                Ok(()) => {}
                Err(StoreError::NoSpace) => {
                    return match s.append(id, b"x") {
                        Err(StoreError::UnknownWrite) => Ok(false),
                        other => Err(format!(
                            "append after NoSpace returned {other:?}: the write was not aborted"
                        )),
                    };
                }
                Err(e) => {
                    return Err(format!(
                        "append of {n} bytes at {off} of {} failed: {e}",
                        content.len
                    ))
                }
            }
            off += n;
        }
        Ok(true)
    }

    /// Stores `content` once. `Ok(None)`: no space (nothing changed).
    fn try_put(&mut self, content: Content) -> Result<Option<Fingerprint>, String> {
        let id = match self.store()?.begin() {
            Ok(id) => id,
            Err(StoreError::NoSpace) => return Ok(None),
            Err(e) => return Err(format!("begin failed: {e}")),
        };
        let mut md5 = Md5::new();
        if !self.append_range(id, content, 0, content.len, &mut md5)? {
            return Ok(None);
        }
        let fp = Fingerprint(md5.finalize().into());
        match self.store()?.commit(id) {
            Ok(c) => {
                self.committed(fp, content, c)?;
                Ok(Some(fp))
            }
            Err(StoreError::NoSpace) => Ok(None),
            Err(e) => Err(format!(
                "commit of {} bytes ({fp}) failed: {e}",
                content.len
            )),
        }
    }

    /// Deletes random objects until the model's objects and `need` more bytes of log
    /// take at most [`LIVE_SHARE`] of the capacity.
    fn make_room(&mut self, need: u64) -> Result<(), String> {
        loop {
            let (live, cap) = self.room()?;
            if (live + need) as f64 <= cap as f64 * LIVE_SHARE {
                return Ok(());
            }
            match self.pick_victim() {
                Some(fp) => self.delete_all(&fp)?,
                // Only the object kept is left: try anyway.
                None if !self.model.is_empty() => return Ok(()),
                None => {
                    return Err(format!(
                        "{need} bytes of log do not fit the disks ({cap} bytes of capacity)"
                    ))
                }
            }
        }
    }

    /// [`Harness::make_room`], then compaction if the disks' free space (on the one with
    /// the most) is short of `need`: for writes that cannot simply be retried.
    fn make_free(&mut self, need: u64) -> Result<(), String> {
        self.make_room(need)?;
        let free = self.store()?.disks().iter().map(|r| r.bytes_free).max();
        if free.unwrap_or(0) < need + 4 * self.seg() {
            self.compact_all()?;
        }
        Ok(())
    }

    /// Stores `content`, making room first (deleting objects so that the model stays
    /// under [`LIVE_SHARE`] of the capacity, compacting on NoSpace).
    fn put(&mut self, content: Content) -> Result<Fingerprint, String> {
        self.make_room(footprint(content.len as u64, self.seg()))?;
        for attempt in 0..4 {
            if let Some(fp) = self.try_put(content)? {
                return Ok(fp);
            }
            if attempt >= 2 {
                if let Some(fp) = self.pick_victim() {
                    self.delete_all(&fp)?;
                }
            }
            self.compact_all()?;
        }
        let (live, cap) = self.room()?;
        Err(format!(
            "no space for {} bytes with {live} bytes of {cap} in use, even after compaction",
            content.len
        ))
    }

    /// Stores `content` and reads it back at once.
    fn put_verified(&mut self, content: Content) -> Result<Fingerprint, String> {
        let fp = self.put(content)?;
        self.verify(&fp)?;
        Ok(fp)
    }

    /// Drops one reference of a model object.
    fn delete(&mut self, fp: &Fingerprint) -> Result<u32, String> {
        let o = *self
            .model
            .get(fp)
            .ok_or_else(|| format!("delete of {fp}, which is not in the model"))?;
        let left = self
            .store()?
            .delete(fp)
            .map_err(|e| format!("delete of {fp} (refcount {}) failed: {e}", o.refcount))?;
        if left + 1 != o.refcount {
            return Err(format!(
                "delete of {fp} with refcount {} left {left}",
                o.refcount
            ));
        }
        self.report.deletes += 1;
        if left == 0 {
            self.model.remove(fp);
            self.check_gone(fp)?;
        } else if let Some(m) = self.model.get_mut(fp) {
            m.refcount = left;
        }
        Ok(left)
    }

    /// Deletes every reference of a model object.
    fn delete_all(&mut self, fp: &Fingerprint) -> Result<(), String> {
        while self.delete(fp)? > 0 {}
        Ok(())
    }

    /// An object that is not stored: unknown to get, read and delete.
    fn check_gone(&mut self, fp: &Fingerprint) -> Result<(), String> {
        let s = self.store()?;
        if let Some(m) = s.get(fp) {
            return Err(format!("deleted object {fp} is still there: {m:?}"));
        }
        match s.read(fp, 0, &mut [0u8; 1]) {
            Err(StoreError::NotFound(f)) if f == *fp => {}
            other => return Err(format!("read of deleted object {fp} returned {other:?}")),
        }
        match s.delete(fp) {
            Err(StoreError::NotFound(f)) if f == *fp => {}
            other => return Err(format!("delete of deleted object {fp} returned {other:?}")),
        }
        self.report.verified_reads += 1;
        Ok(())
    }

    /// Reads `want_len` bytes of `fp` at `offset` and checks the outcome against the
    /// model: the bytes, a short read at the end, OutOfRange past it.
    fn check_range(
        &mut self,
        fp: &Fingerprint,
        offset: u64,
        want_len: usize,
    ) -> Result<(), String> {
        let Harness {
            store,
            model,
            buf,
            want,
            report,
            ..
        } = self;
        let s = store
            .as_mut()
            .ok_or_else(|| "no store is open".to_string())?;
        let o = model
            .get(fp)
            .ok_or_else(|| format!("read of {fp}, which is not in the model"))?;
        let len = o.content.len as u64;
        let want_len = want_len.min(buf.len());
        let r = s.read(fp, offset, &mut buf[..want_len]);
        if offset > len {
            return match r {
                Err(StoreError::OutOfRange { offset: o, len: l }) if o == offset && l == len => {
                    report.verified_reads += 1;
                    Ok(())
                }
                other => Err(format!(
                    "read of {want_len} bytes at {offset} of {fp} ({len} bytes), past the end, \
                     returned {other:?} instead of OutOfRange"
                )),
            };
        }
        let expect = (want_len as u64).min(len - offset) as usize;
        let n = r.map_err(|e| {
            format!("read of {want_len} bytes at {offset} of {fp} ({len} bytes) failed: {e}")
        })?;
        if n != expect {
            return Err(format!(
                "read of {want_len} bytes at {offset} of {fp} ({len} bytes) returned {n} bytes, \
                 expected {expect}"
            ));
        }
        o.content.fill(offset, &mut want[..n]);
        if buf[..n] != want[..n] {
            let at = buf[..n]
                .iter()
                .zip(&want[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(format!(
                "object {fp} ({len} bytes) differs at byte {}: read {:#04x}, stored {:#04x} \
                 (read of {want_len} bytes at {offset})",
                offset + at as u64,
                buf[at],
                want[at]
            ));
        }
        report.verified_reads += 1;
        report.bytes_verified += n as u64;
        Ok(())
    }

    /// Reads a whole object back: in one read into a larger buffer if it is small,
    /// else in pieces of an odd size; and the empty read at its end.
    fn verify(&mut self, fp: &Fingerprint) -> Result<(), String> {
        let o = *self
            .model
            .get(fp)
            .ok_or_else(|| format!("{fp} is not in the model"))?;
        let m = self
            .store()?
            .get(fp)
            .ok_or_else(|| format!("object {fp} ({} bytes) is missing", o.content.len))?;
        if m.len != o.content.len as u64 || m.refcount != o.refcount || m.disk != o.disk {
            return Err(format!(
                "object {fp}: get() says {m:?}, the model {} bytes, refcount {}, disk {}",
                o.content.len, o.refcount, o.disk.0
            ));
        }
        let len = o.content.len;
        if len < 256 * KIB {
            self.check_range(fp, 0, len + 1)?;
        } else {
            let piece = MIB - 1;
            let mut off = 0;
            while off < len {
                self.check_range(fp, off as u64, piece)?;
                off += piece;
            }
        }
        self.check_range(fp, len as u64, 4096)
    }

    /// Reads back one object in `n` of the model, chosen at random.
    fn verify_sample(&mut self, n: u32) -> Result<(), String> {
        let mut fps: Vec<Fingerprint> = self.model.keys().copied().collect();
        fps.sort_unstable();
        for fp in &fps {
            if self.rng.gen_ratio(1, n.max(1)) {
                self.verify(fp)?;
            }
        }
        Ok(())
    }

    fn verify_all(&mut self) -> Result<(), String> {
        let mut fps: Vec<Fingerprint> = self.model.keys().copied().collect();
        fps.sort_unstable();
        for fp in &fps {
            self.verify(fp)?;
        }
        Ok(())
    }

    /// Compacts every disk fully, then checks the state.
    fn compact_all(&mut self) -> Result<(), String> {
        for d in 0..self.disks {
            match self.store()?.compact(DiskId(d as u16)) {
                Ok(_) | Err(StoreError::NoSpace) => {}
                Err(e) => return Err(format!("compaction of disk {d} failed: {e}")),
            }
        }
        self.check_state()
    }

    /// `maybe_compact` until it has nothing worth doing (at most 64 steps).
    fn maybe_compact(&mut self) -> Result<(), String> {
        for _ in 0..64 {
            match self.store()?.maybe_compact() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Err(format!("maybe_compact failed: {e}")),
            }
        }
        self.check_state()
    }

    /// Outstanding writes the disk reports add up to.
    fn outstanding(&mut self) -> Result<u32, String> {
        Ok(self
            .store()?
            .disks()
            .iter()
            .map(|r| r.outstanding_ops)
            .sum())
    }

    /// A random object size up to `max`.
    fn size(&mut self, max: usize) -> usize {
        let max = max.max(1);
        match self.rng.gen_range(0..10) {
            0 | 1 => self.rng.gen_range(0..=(8 * KIB).min(max)),
            2..=5 => self.rng.gen_range(0..=(256 * KIB).min(max)),
            6..=8 => self.rng.gen_range(0..=max / 2),
            _ => self.rng.gen_range(max / 2..=max),
        }
    }
}

/// Phase 2: the log goes round each disk's window (see the module doc).
fn phase_wrap(h: &mut Harness, opts: &Options) -> Result<(), String> {
    h.format()?;
    let (log_total, max_obj) = {
        let s = h.store()?;
        let total: u64 = s.vols.iter().map(|v| v.log_len).sum();
        let smallest = s.vols.iter().map(|v| v.log_len).min().unwrap_or(0);
        (total, (smallest / 10) as usize)
    };
    let max_obj = max_obj.min(opts.max_object_bytes).max(1);
    // 1.25 times the logs in all (with headers, REFs and compaction's moves the logs
    // take more), then more (up to as much again) until every disk wrapped.
    let target = log_total + log_total / 4;
    let rounds = opts.rounds.max(1) as u64;
    let mut written = 0u64;
    let mut round = 0u64;
    loop {
        let all_wrapped = {
            let wraps = h.wraps.clone();
            let s = h.store()?;
            s.vols.iter().zip(&wraps).all(|(v, w)| v.wraps + w > 0)
        };
        if written >= target && all_wrapped && round >= rounds {
            break;
        }
        if written >= 2 * target {
            return Err(format!(
                "a log has not wrapped after {written} bytes were stored on {} bytes of log (wraps: {:?})",
                log_total, h.wraps
            ));
        }
        h.step(format!("churn round {round}"));
        let quota = target.div_ceil(rounds);
        let start = written;
        let mut ops = 0u64;
        while written - start < quota {
            ops += 1;
            match h.rng.gen_range(0..20) {
                0..=11 => {
                    let len = h.size(max_obj);
                    let c = h.fresh(len);
                    let fp = h.put(c)?;
                    if ops.is_multiple_of(4) {
                        h.verify(&fp)?;
                    }
                    written += len as u64;
                }
                12 | 13 => {
                    // The same bytes again, in other chunks: a dedup.
                    if let Some(fp) = h.pick() {
                        let c = h.content(&fp)?;
                        h.keep = Some(fp);
                        let got = h.put(c)?;
                        h.keep = None;
                        if got != fp {
                            return Err(format!("re-store of {fp} gave {got}"));
                        }
                        written += c.len as u64;
                    }
                }
                14..=17 => {
                    if let Some(fp) = h.pick() {
                        h.delete(&fp)?;
                    }
                }
                18 => h.maybe_compact()?,
                _ => {
                    h.store()?
                        .checkpoint()
                        .map_err(|e| format!("checkpoint failed: {e}"))?;
                    h.report.checkpoints += 1;
                }
            }
            if ops.is_multiple_of(16) {
                h.check_state()?;
            }
        }
        h.step(format!(
            "churn round {round}: a write kept open across compactions"
        ));
        pinned_write(h, max_obj)?;
        h.step(format!("churn round {round}: compaction"));
        h.compact_all()?;
        h.step(format!("churn round {round}: reopen"));
        h.reopen(round.is_multiple_of(2))?;
        round += 1;
    }
    h.step("deleting everything");
    let mut fps: Vec<Fingerprint> = h.model.keys().copied().collect();
    fps.sort_unstable();
    for fp in &fps {
        h.delete_all(fp)?;
    }
    h.compact_all()?;
    for r in h.store()?.disks() {
        if r.objects_used != 0 || r.bytes_dead != 0 {
            return Err(format!(
                "disk {} holds {} objects and {} dead bytes after everything was deleted and compacted",
                r.id.0, r.objects_used, r.bytes_dead
            ));
        }
    }
    h.step("reopen after deleting everything");
    h.reopen(true)
}

/// A write begun and half appended, compactions and a checkpoint while it is open,
/// then finished and committed.
fn pinned_write(h: &mut Harness, max_obj: usize) -> Result<(), String> {
    let len = (max_obj / 2).max(3 * SEG_WRAP / 2).min(max_obj);
    let c = h.fresh(len);
    let id = match h.store()?.begin() {
        Ok(id) => id,
        Err(StoreError::NoSpace) => return Ok(()),
        Err(e) => return Err(format!("begin failed: {e}")),
    };
    let mut md5 = Md5::new();
    if !h.append_range(id, c, 0, len / 2, &mut md5)? {
        return Ok(());
    }
    if h.outstanding()? != 1 {
        return Err(format!(
            "one write is open, the disks report {}",
            h.outstanding()?
        ));
    }
    h.compact_all()?;
    h.maybe_compact()?;
    h.store()?
        .checkpoint()
        .map_err(|e| format!("checkpoint with a write open failed: {e}"))?;
    h.report.checkpoints += 1;
    if !h.append_range(id, c, len / 2, len, &mut md5)? {
        return Ok(());
    }
    let fp = Fingerprint(md5.finalize().into());
    match h.store()?.commit(id) {
        Ok(r) => h.committed(fp, c, r)?,
        Err(StoreError::NoSpace) => return Ok(()),
        Err(e) => return Err(format!("commit of the pinned write failed: {e}")),
    }
    h.verify(&fp)
}

/// Phase 3: whole devices (see the module doc).
fn phase_full(h: &mut Harness, opts: &Options) -> Result<(), String> {
    h.format()?;
    let seg = SEG_FULL;

    h.step("round trips of fixed sizes");
    let mut sizes = vec![
        0,
        1,
        4095,
        4096,
        4097,
        128 * KIB - 1,
        128 * KIB,
        128 * KIB + 1,
        MIB + 17,
        seg - 1,
        seg,
        seg + 1,
        2 * seg + 4097,
        3 * seg + 12_345,
    ];
    if opts.max_object_bytes > 3 * seg + 12_345 {
        sizes.push(opts.max_object_bytes);
    }
    let mut fixed: Vec<(usize, Fingerprint, Content)> = Vec::new();
    for &len in &sizes {
        h.step(format!("round trip of {len} bytes"));
        let c = h.fresh(len);
        let fp = h.put_verified(c)?;
        h.step(format!("range reads at the edges of {len} bytes"));
        edge_reads(h, &fp, len, len == 3 * seg + 12_345)?;
        fixed.push((len, fp, c));
    }
    h.check_state()?;
    let unknown = Fingerprint([0xA5; 16]);
    if !h.model.contains_key(&unknown) {
        match h.store()?.read(&unknown, 0, &mut [0u8; 16]) {
            Err(StoreError::NotFound(f)) if f == unknown => h.report.verified_reads += 1,
            other => return Err(format!("read of an unknown object returned {other:?}")),
        }
    }
    let content_of = |want: usize| {
        fixed
            .iter()
            .find(|(len, _, _)| *len == want)
            .map(|(_, _, c)| *c)
            .ok_or_else(|| format!("no fixed object of {want} bytes"))
    };

    h.step("dedup");
    let c = h.fresh(200_001);
    let a = h.put_verified(c)?;
    h.keep = Some(a);
    let b = h.put_verified(c)?;
    h.keep = None;
    if a != b || h.model.get(&a).map(|o| o.refcount) != Some(2) {
        return Err(format!("storing the same bytes twice gave {a} and {b}"));
    }
    h.delete(&a)?;
    h.verify(&a)?;
    h.delete(&a)?;
    // Gone (checked by delete); stored again, it comes back as new.
    h.put_verified(c)?;
    // The empty object, a second time.
    h.put_verified(content_of(0)?)?;
    h.check_state()?;

    h.step("aborts");
    h.make_free(footprint((4 * seg) as u64, h.seg()))?;
    let before = h.store()?.contents();
    // A write with segments on disk already.
    let c = h.fresh(2 * seg + seg / 2);
    let id = h
        .store()?
        .begin()
        .map_err(|e| format!("begin failed: {e}"))?;
    let mut md5 = Md5::new();
    if !h.append_range(id, c, 0, c.len, &mut md5)? {
        return Err("no space for a write to abort".into());
    }
    let aborted = Fingerprint(md5.finalize().into());
    let s = h.store()?;
    s.abort(id);
    s.abort(id);
    match s.append(id, b"x") {
        Err(StoreError::UnknownWrite) => {}
        other => return Err(format!("append to an aborted write returned {other:?}")),
    }
    match s.commit(id) {
        Err(StoreError::UnknownWrite) => {}
        other => return Err(format!("commit of an aborted write returned {other:?}")),
    }
    if let Some(m) = s.get(&aborted) {
        return Err(format!("aborted object {aborted} is visible: {m:?}"));
    }
    // A write of an object already stored, aborted: its refcount stays.
    let dup = content_of(seg - 1)?;
    let id = h
        .store()?
        .begin()
        .map_err(|e| format!("begin failed: {e}"))?;
    let mut md5 = Md5::new();
    if !h.append_range(id, dup, 0, dup.len, &mut md5)? {
        return Err("no space for a write to abort".into());
    }
    h.store()?.abort(id);
    // An empty write, aborted.
    let id = h
        .store()?
        .begin()
        .map_err(|e| format!("begin failed: {e}"))?;
    h.store()?.abort(id);
    h.report.aborts += 3;
    if h.store()?.contents() != before || h.outstanding()? != 0 {
        return Err("aborted writes changed the contents or stayed outstanding".into());
    }
    h.check_state()?;

    h.step("limits: Busy and TooLarge");
    let max_open = h.cfg.max_open_writes;
    let mut ids = Vec::new();
    for _ in 0..max_open {
        ids.push(
            h.store()?
                .begin()
                .map_err(|e| format!("begin failed: {e}"))?,
        );
    }
    match h.store()?.begin() {
        Err(StoreError::Busy) => {}
        other => {
            return Err(format!(
                "begin with {max_open} writes open returned {other:?}, not Busy"
            ))
        }
    }
    if h.outstanding()? != max_open as u32 {
        return Err(format!(
            "{max_open} writes open, the disks report {}",
            h.outstanding()?
        ));
    }
    let max = h.cfg.max_object_bytes;
    let first = ids.first().copied().ok_or("no write")?;
    if max <= 64 * MIB_U64 {
        let too_big = vec![0u8; max as usize + 1];
        match h.store()?.append(first, &too_big) {
            Err(StoreError::TooLarge { max: m }) if m == max => {}
            other => {
                return Err(format!(
                    "append of {} bytes returned {other:?}",
                    too_big.len()
                ))
            }
        }
        match h.store()?.commit(first) {
            Err(StoreError::UnknownWrite) => {}
            other => return Err(format!("commit after TooLarge returned {other:?}")),
        }
    } else {
        h.store()?.abort(first);
    }
    for &id in &ids[1..] {
        h.store()?.abort(id);
    }
    h.report.aborts += ids.len() as u64;
    if h.outstanding()? != 0 {
        return Err("writes still outstanding after they were all aborted".into());
    }
    h.check_state()?;

    h.step("interleaved writes");
    interleaved(h, 4, 3 * seg / 2)?;
    h.check_state()?;

    h.step("reopen without checkpoint");
    h.reopen(false)?;
    if h.store()?.get(&aborted).is_some() {
        return Err(format!("aborted object {aborted} came back at reopen"));
    }

    let max_obj = max_object(opts);
    for round in 0..opts.rounds {
        h.step(format!("round {round}: stores and deletes"));
        for k in 0..opts.objects {
            if k % 7 == 6 {
                if let Some(fp) = h.pick() {
                    let c = h.content(&fp)?;
                    h.keep = Some(fp);
                    h.put_verified(c)?;
                    h.keep = None;
                    continue;
                }
            }
            let len = h.size(max_obj);
            let c = h.fresh(len);
            h.put_verified(c)?;
            if k % 2 == 1 {
                if let Some(fp) = h.pick() {
                    h.delete(&fp)?;
                }
            }
        }
        h.check_state()?;
        // Compaction moves the live objects: a full pass in the last round only, as it
        // rewrites everything live; `maybe_compact` (bounded) in every round.
        let last = round + 1 == opts.rounds;
        h.step(format!("round {round}: compaction"));
        if last {
            h.compact_all()?;
        }
        h.maybe_compact()?;
        h.verify_sample(3)?;
        // Every other round after a checkpoint, the last one always.
        h.step(format!("round {round}: reopen"));
        h.reopen((opts.rounds - 1 - round).is_multiple_of(2))?;
    }
    if opts.rounds == 0 {
        h.step("checkpoint and reopen");
        h.reopen(true)?;
    }
    Ok(())
}

/// Range reads of an object of `len` bytes at its edges: start, block and segment
/// boundaries, end and past the end; the full set of lengths for `full`.
fn edge_reads(h: &mut Harness, fp: &Fingerprint, len: usize, full: bool) -> Result<(), String> {
    let (len, seg, b) = (len as u64, h.seg(), BLOCK_U64);
    let mut offsets = BTreeSet::from([0, 1, b - 1, b, b + 1, len, len + 1, len + b]);
    for near in [seg, 2 * seg, len] {
        for at in [near.saturating_sub(b + 1), near - near.min(1), near + 1] {
            offsets.insert(at);
        }
    }
    let lens: &[usize] = if full {
        &[0, 1, 7, 4095, 4096, 4097, 65_537, SEG_FULL + 5]
    } else if len <= 64 * KIB as u64 {
        &[0, 1, 7, 4096, 4097]
    } else {
        &[0, 1, 4095, 4097, 65_537]
    };
    for &off in offsets.iter().filter(|&&o| full || o <= len + b) {
        for &n in lens {
            h.check_range(fp, off, n)?;
        }
    }
    Ok(())
}

/// `n` writes open at once, appended in turns in random chunks, committed in reverse
/// order, each read back.
fn interleaved(h: &mut Harness, n: usize, max_len: usize) -> Result<(), String> {
    let lens: Vec<usize> = (0..n).map(|i| max_len / (i + 1) + i * 4097).collect();
    let need = lens.iter().map(|&l| footprint(l as u64, h.seg())).sum();
    h.make_free(need)?;
    let mut writes = Vec::new();
    for len in lens {
        let c = h.fresh(len);
        let id = h
            .store()?
            .begin()
            .map_err(|e| format!("begin failed: {e}"))?;
        writes.push((id, c, 0usize, Md5::new()));
    }
    while writes.iter().any(|(_, c, at, _)| *at < c.len) {
        let i = h.rng.gen_range(0..writes.len());
        let (id, c, at, mut md5) = writes[i].clone();
        let to = (at + Harness::chunk(&mut h.rng, c.len)).min(c.len);
        if !h.append_range(id, c, at, to, &mut md5)? {
            return Err("no space for interleaved writes".into());
        }
        writes[i] = (id, c, to, md5);
    }
    if h.outstanding()? != n as u32 {
        return Err(format!(
            "{n} writes open, the disks report {}",
            h.outstanding()?
        ));
    }
    for (id, c, _, md5) in writes.into_iter().rev() {
        let fp = Fingerprint(md5.finalize().into());
        let r = h
            .store()?
            .commit(id)
            .map_err(|e| format!("commit of an interleaved write failed: {e}"))?;
        h.committed(fp, c, r)?;
        h.verify(&fp)?;
    }
    Ok(())
}

/// The last `len` bytes of a device, as a device of their own.
struct Window {
    dev: Box<dyn BlockDevice>,
    base: u64,
    info: DeviceInfo,
    /// Operations outside the window, completed with their error at the next poll.
    refused: Vec<nvme::Completion>,
}

impl Window {
    fn wrap(dev: Box<dyn BlockDevice>, len: u64) -> Result<Box<dyn BlockDevice>, String> {
        let size = dev.info().size_bytes;
        let len = len.min(size) - len.min(size) % BLOCK_U64;
        if len == 0 {
            return Err(format!("device of {size} bytes has no room for a window"));
        }
        let base = size - len;
        let info = DeviceInfo {
            size_bytes: len,
            backend: dev.info().backend,
            location: format!("{} [{base}..{size})", dev.info().location),
        };
        Ok(Box::new(Window {
            dev,
            base,
            info,
            refused: Vec::new(),
        }))
    }
}

impl BlockDevice for Window {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, tag: nvme::IoTag, op: nvme::IoOp) {
        let op = match op {
            nvme::IoOp::Read { offset, buf } => {
                if let Err(e) = nvme::check_transfer(offset, &buf, self.info.size_bytes) {
                    self.refused
                        .push(nvme::IoOp::Read { offset, buf }.complete(tag, Err(e)));
                    return;
                }
                nvme::IoOp::Read {
                    offset: self.base + offset,
                    buf,
                }
            }
            nvme::IoOp::Write { offset, buf } => {
                if let Err(e) = nvme::check_transfer(offset, &buf, self.info.size_bytes) {
                    self.refused
                        .push(nvme::IoOp::Write { offset, buf }.complete(tag, Err(e)));
                    return;
                }
                nvme::IoOp::Write {
                    offset: self.base + offset,
                    buf,
                }
            }
            nvme::IoOp::Flush => nvme::IoOp::Flush,
        };
        self.dev.submit(tag, op);
    }

    fn poll(&mut self, max: usize, out: &mut Vec<nvme::Completion>) -> usize {
        let n = self.refused.len().min(max);
        out.extend(self.refused.drain(..n));
        let from = out.len();
        let m = self.dev.poll(max - n, out);
        for c in &mut out[from..] {
            if c.kind != nvme::IoKind::Flush {
                c.offset -= self.base;
            }
        }
        n + m
    }

    fn in_flight(&self) -> usize {
        self.refused.len() + self.dev.in_flight()
    }

    fn wait(&mut self, timeout: std::time::Duration) {
        if self.refused.is_empty() {
            self.dev.wait(timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvme::mem::MemDisk;

    type Devs = Result<Vec<Box<dyn BlockDevice>>, String>;

    fn opener(disks: &[MemDisk]) -> impl FnMut() -> Devs + '_ {
        move || {
            Ok(disks
                .iter()
                .map(|d| Box::new(d.device()) as Box<dyn BlockDevice>)
                .collect())
        }
    }

    fn small(seed: u64) -> Options {
        Options {
            seed,
            objects: 12,
            max_object_bytes: 2 * MIB,
            rounds: 2,
        }
    }

    #[test]
    fn content_ranges_agree() {
        let c = Content { seed: 5, len: 100 };
        let mut whole = [0u8; 100];
        c.fill(0, &mut whole);
        for from in 0..20 {
            for len in 0..30 {
                let mut part = vec![0u8; len];
                c.fill(from as u64, &mut part);
                assert_eq!(part[..], whole[from..from + len]);
            }
        }
        // Packed: an 80-byte header and the data, to 16 bytes.
        assert_eq!(footprint(0, 4096), 80);
        assert_eq!(footprint(1, 4096), 96);
        assert_eq!(footprint(4096, 4096), 4176);
        assert_eq!(footprint(8193, 16384), 8288);
        assert_eq!(footprint(16384, 1 << 20), 16464);
        // Segments: a header block each, the data in whole blocks.
        assert_eq!(footprint(8192, 4096), 16384);
        assert_eq!(footprint(8193, 4096), 24576);
        assert_eq!(footprint(16385, 1 << 20), 4096 + 20480);
    }

    /// Fills the first and last MiB of a disk with garbage.
    fn garbage(disk: &MemDisk) {
        let mut dev = disk.device();
        let size = disk.size_bytes();
        let mut buf = AlignedBuf::new(MIB);
        Content { seed: 99, len: MIB }.fill(0, &mut buf);
        dev.write_at(0, &buf).unwrap();
        dev.write_at(size - MIB_U64, &buf).unwrap();
        dev.flush().unwrap();
    }

    #[test]
    fn passes_on_one_memory_disk() {
        let disks = [MemDisk::new(64 * MIB_U64, 1)];
        garbage(&disks[0]);
        let t = std::time::Instant::now();
        let r = run(&mut opener(&disks), &small(1)).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{:?} in {:?}", r, t.elapsed());
        assert!(r.wraps >= 1, "{r:?}");
        assert!(r.compactions > 0 && r.bytes_reclaimed > 0, "{r:?}");
        assert!(r.reopens >= 6 && r.disks_from_checkpoint >= 3, "{r:?}");
        assert!(
            r.dedup_hits >= 3 && r.deletes > 10 && r.verified_reads > 100,
            "{r:?}"
        );
    }

    #[test]
    fn passes_on_three_disks_of_different_sizes_twice() {
        // The second run finds the first one's stores on the disks.
        let disks = [
            MemDisk::new(64 * MIB_U64, 2),
            MemDisk::new(96 * MIB_U64, 3),
            MemDisk::new(80 * MIB_U64 + 4096, 4),
        ];
        for seed in [2, 2, 3] {
            let r = run(&mut opener(&disks), &small(seed)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.disks, 3);
            assert!(r.wraps >= 3, "{r:?}");
        }
    }

    #[test]
    fn default_options_stay_within_budget() {
        let disks = [MemDisk::new(256 * MIB_U64, 5)];
        let t = std::time::Instant::now();
        let r = run(&mut opener(&disks), &Options::default()).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{:?} in {:?}", r, t.elapsed());
        assert!(r.device_bytes_written < 150_000_000, "{r:?}");
    }

    /// Flips one bit of the byte at `at` in every read that covers it.
    struct FlipOnRead {
        dev: Box<dyn BlockDevice>,
        at: u64,
    }

    impl BlockDevice for FlipOnRead {
        fn info(&self) -> &DeviceInfo {
            self.dev.info()
        }
        fn submit(&mut self, tag: nvme::IoTag, op: nvme::IoOp) {
            self.dev.submit(tag, op)
        }
        fn poll(&mut self, max: usize, out: &mut Vec<nvme::Completion>) -> usize {
            let from = out.len();
            let n = self.dev.poll(max, out);
            for c in &mut out[from..] {
                if c.kind == nvme::IoKind::Read && c.result.is_ok() {
                    if let Some(i) = self.at.checked_sub(c.offset) {
                        if let Some(b) = c.buf.get_mut(i as usize) {
                            *b ^= 0x10;
                        }
                    }
                }
            }
            n
        }
        fn in_flight(&self) -> usize {
            self.dev.in_flight()
        }
        fn wait(&mut self, timeout: std::time::Duration) {
            self.dev.wait(timeout)
        }
    }

    /// Sends every access to `offset % modulo`: a driver truncating addresses.
    struct Aliasing {
        dev: Box<dyn BlockDevice>,
        modulo: u64,
    }

    impl BlockDevice for Aliasing {
        fn info(&self) -> &DeviceInfo {
            self.dev.info()
        }
        fn submit(&mut self, tag: nvme::IoTag, op: nvme::IoOp) {
            let op = match op {
                nvme::IoOp::Read { offset, buf } => nvme::IoOp::Read {
                    offset: offset % self.modulo,
                    buf,
                },
                nvme::IoOp::Write { offset, buf } => nvme::IoOp::Write {
                    offset: offset % self.modulo,
                    buf,
                },
                nvme::IoOp::Flush => nvme::IoOp::Flush,
            };
            self.dev.submit(tag, op)
        }
        fn poll(&mut self, max: usize, out: &mut Vec<nvme::Completion>) -> usize {
            self.dev.poll(max, out)
        }
        fn in_flight(&self) -> usize {
            self.dev.in_flight()
        }
        fn wait(&mut self, timeout: std::time::Duration) {
            self.dev.wait(timeout)
        }
    }

    #[test]
    fn detects_a_flipped_byte_in_the_data() {
        let size = 64 * MIB_U64;
        // In the first objects of the whole-device phase, and in the log-wrap window.
        for at in [2 * MIB_U64 + 12_345, size - 3 * MIB_U64 + 777] {
            let disk = MemDisk::new(size, 6);
            let mut open = || -> Devs {
                Ok(vec![Box::new(FlipOnRead {
                    dev: Box::new(disk.device()),
                    at,
                }) as Box<dyn BlockDevice>])
            };
            let err = run(&mut open, &small(6)).expect_err("a flipped byte went unnoticed");
            eprintln!("flip at {at}: {err}");
            assert!(!err.starts_with("address probe"), "{err}");
        }
    }

    #[test]
    fn detects_aliased_addresses() {
        let disk = MemDisk::new(64 * MIB_U64, 7);
        let mut open = || -> Devs {
            Ok(vec![Box::new(Aliasing {
                dev: Box::new(disk.device()),
                modulo: 32 * MIB_U64,
            }) as Box<dyn BlockDevice>])
        };
        let err = run(&mut open, &small(7)).expect_err("aliasing went unnoticed");
        assert!(err.contains("address probe"), "{err}");
    }

    #[test]
    fn passes_on_the_smallest_device() {
        let disks = [MemDisk::new(MIN_DEVICE_BYTES, 10)];
        for opts in [small(10), Options::default()] {
            let r = run(&mut opener(&disks), &opts).unwrap_or_else(|e| panic!("{e}"));
            assert!(r.wraps >= 1, "{r:?}");
        }
    }

    #[test]
    fn refuses_bad_setups() {
        let tiny = [MemDisk::new(8 * MIB_U64, 8)];
        assert!(run(&mut opener(&tiny), &small(8)).is_err());
        assert!(run(&mut || -> Devs { Ok(Vec::new()) }, &small(8)).is_err());
        assert!(
            run(&mut || -> Devs { Err("no such device".into()) }, &small(8))
                .is_err_and(|e| e.contains("no such device"))
        );
        let disks = [MemDisk::new(64 * MIB_U64, 9)];
        let mut bad = small(9);
        bad.max_object_bytes = 0;
        assert!(run(&mut opener(&disks), &bad).is_err());
    }
}
