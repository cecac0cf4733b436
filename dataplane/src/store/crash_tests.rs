//! Crash tests: a seeded random workload (interleaved stores, aborts, deletes,
//! compaction — blocking and in the background — checkpoints, injected device faults — also while a checkpoint is being
//! written) on in-memory disks, with power cuts at random points and, now and then, a
//! damaged checkpoint slot. After every reboot:
//! - the index rebuilt from the checkpoints and the log tails is exactly the one a full
//!   scan of the logs gives;
//! - every object whose commit returned Ok (and not deleted since) is there, with
//!   identical bytes and the right refcount;
//! - no object is visible that no commit was ever attempted for (in-flight and aborted
//!   writes vanish); an operation that *failed* (device fault) is in doubt: it may or
//!   may not have taken effect, and the model allows both;
//! - nothing is ever read back with bytes that do not match its fingerprint.
//!
//! The disks complete operations late and out of order (the memory disk's default
//! latency model), so every test here runs the asynchronous store; the last one cuts
//! the power after every poll of one group commit of several operations in flight.

use std::collections::HashMap;

use nvme::mem::{Faults, MemDisk};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::checkpoint_tests::{index_of, logs_of, without_checkpoints};
use super::format::BLOCK_U64;
use super::tests::{cfg, check_accounting, data, devices, get_all, succeeded};
use super::*;

/// What the model knows of an object: its bytes, the refcount the running store
/// reports (`mem`), and how far the durable refcount may differ from it because
/// operations failed in doubt since the last reboot (a failed store may have landed:
/// `up`; a failed delete may have landed: `down`).
struct ModelObj {
    data: Vec<u8>,
    mem: u32,
    up: u32,
    down: u32,
}

impl ModelObj {
    fn certain(&self) -> bool {
        self.up == 0 && self.down == 0
    }
}

struct InFlight {
    id: WriteId,
    data: Vec<u8>,
    pos: usize,
}

/// Object contents come from a small alphabet so that dedup happens often.
fn alphabet() -> Vec<Vec<u8>> {
    const SIZES: [usize; 10] = [0, 1, 3, 4096, 5000, 16384, 20000, 33000, 50000, 70000];
    SIZES
        .iter()
        .enumerate()
        .map(|(i, &len)| data(1000 + i as u64, len))
        .collect()
}

struct Run {
    rng: StdRng,
    alphabet: Vec<Vec<u8>>,
    disks: Vec<MemDisk>,
    cfg: StoreConfig,
    store: Store,
    model: HashMap<Fingerprint, ModelObj>,
    inflight: Vec<InFlight>,
    reboots: u64,
    compactions: u64,
    dedups: u64,
    wraps: u64,
    /// Disks opened from a checkpoint (summed over reboots).
    from_checkpoint: u64,
    /// Background compaction steps that moved a head, and ones a power cut stopped.
    background: u64,
    cut_short: u64,
}

impl Run {
    fn new(seed: u64) -> Run {
        let disks: Vec<MemDisk> = (0..2)
            .map(|i| MemDisk::new(512 * 1024, seed * 16 + i))
            .collect();
        let cfg = cfg(16 * 1024);
        let store = Store::open_seeded(devices(&disks), cfg.clone(), 1, seed).expect("open");
        Run {
            rng: StdRng::seed_from_u64(seed),
            alphabet: alphabet(),
            disks,
            cfg,
            store,
            model: HashMap::new(),
            inflight: Vec::new(),
            reboots: 0,
            compactions: 0,
            dedups: 0,
            wraps: 0,
            from_checkpoint: 0,
            background: 0,
            cut_short: 0,
        }
    }

    fn committed(&mut self, fp: Fingerprint, bytes: Vec<u8>, refcount: u32) {
        let m = self.model.entry(fp).or_insert(ModelObj {
            data: bytes,
            mem: 0,
            up: 0,
            down: 0,
        });
        if m.certain() {
            assert_eq!(refcount, m.mem + 1, "refcount after commit of {fp}");
        }
        m.mem = refcount;
    }

    fn in_doubt_commit(&mut self, bytes: Vec<u8>) {
        let fp = Fingerprint::of(&bytes);
        let m = self.model.entry(fp).or_insert(ModelObj {
            data: bytes,
            mem: 0,
            up: 0,
            down: 0,
        });
        m.up += 1;
    }

    fn step(&mut self) {
        // A compaction step in the background moves on with every poll (the blocking
        // operations below poll too); its end is taken here, as the server does.
        match self.store.compact_tick() {
            Some(Ok(r)) if r.bytes_scanned > 0 => self.background += 1,
            None
            | Some(Ok(_))
            | Some(Err(
                StoreError::NoSpace | StoreError::DiskFailed { .. } | StoreError::DiskOffline(_),
            )) => {}
            Some(Err(e)) => panic!("background compaction: {e}"),
        }
        let op = self.rng.gen_range(0..100);
        if std::env::var("CRASH_TRACE").is_ok() {
            eprintln!(
                "op {op} inflight {} model {:?}",
                self.inflight.len(),
                self.model
                    .iter()
                    .map(|(f, m)| (f.to_hex()[..6].to_string(), m.mem, m.up, m.down))
                    .collect::<Vec<_>>()
            );
        }
        match op {
            0..=19 if self.inflight.len() < 3 => match self.store.begin() {
                Ok(id) => {
                    let data = self.alphabet[self.rng.gen_range(0..self.alphabet.len())].clone();
                    self.inflight.push(InFlight { id, data, pos: 0 });
                }
                Err(StoreError::NoSpace) => {
                    let _ = self.store.maybe_compact();
                }
                Err(StoreError::NoUsableDisk) => {}
                Err(e) => panic!("begin: {e}"),
            },
            0..=59 if !self.inflight.is_empty() => {
                let i = self.rng.gen_range(0..self.inflight.len());
                let w = &mut self.inflight[i];
                let n = self.rng.gen_range(0..=40_000).min(w.data.len() - w.pos);
                if let Err(e) = self.store.append(w.id, &w.data[w.pos..w.pos + n]) {
                    assert!(
                        matches!(e, StoreError::NoSpace | StoreError::DiskFailed { .. }),
                        "append: {e}"
                    );
                    self.inflight.swap_remove(i);
                    return;
                }
                w.pos += n;
                if w.pos == w.data.len() {
                    let w = self.inflight.swap_remove(i);
                    let r = self.store.commit(w.id);
                    if std::env::var("CRASH_TRACE").is_ok() {
                        eprintln!("commit: {r:?}");
                    }
                    match r {
                        Ok(c) => {
                            assert_eq!(c.fingerprint, Fingerprint::of(&w.data));
                            assert_eq!(c.len, w.data.len() as u64);
                            self.committed(c.fingerprint, w.data, c.refcount);
                        }
                        // Nothing was written for the commit.
                        Err(StoreError::NoSpace) => {}
                        Err(_) => self.in_doubt_commit(w.data),
                    }
                }
            }
            60..=62 if !self.inflight.is_empty() => {
                let i = self.rng.gen_range(0..self.inflight.len());
                let w = self.inflight.swap_remove(i);
                self.store.abort(w.id);
            }
            63..=74 => {
                let Some(fp) = self.pick() else { return };
                let m = &self.model[&fp];
                let (certain, mem) = (m.certain(), m.mem);
                let r = self.store.delete(&fp);
                if std::env::var("CRASH_TRACE").is_ok() {
                    eprintln!("delete {fp}: {r:?}");
                }
                match r {
                    Ok(left) => {
                        if certain {
                            assert_eq!(left + 1, mem, "delete of {fp}");
                        }
                        self.model.get_mut(&fp).expect("picked").mem = left;
                    }
                    Err(StoreError::NotFound(_)) => assert!(mem == 0 || !certain, "{fp} vanished"),
                    Err(StoreError::NoSpace) => {}
                    Err(_) => self.model.get_mut(&fp).expect("picked").down += 1,
                }
            }
            75..=84 => {
                let Some(fp) = self.pick() else { return };
                self.check_read(&fp);
            }
            85..=86 => {
                let d = DiskId(self.rng.gen_range(0..2));
                match self.store.compact(d) {
                    Ok(_) | Err(StoreError::NoSpace | StoreError::DiskFailed { .. }) => {}
                    Err(e) => panic!("compact: {e}"),
                }
            }
            87..=89 => match self.store.maybe_compact() {
                Ok(_) | Err(StoreError::DiskFailed { .. }) => {}
                Err(e) => panic!("maybe_compact: {e}"),
            },
            90..=91 => {
                let _ = self.store.checkpoint();
            }
            92 => {
                let d = self.rng.gen_range(0..2);
                let faults = if self.rng.gen_bool(0.3) {
                    Faults {
                        fail_flush: true,
                        ..Faults::default()
                    }
                } else {
                    Faults {
                        fail_writes_after: Some(self.rng.gen_range(0..4)),
                        ..Faults::default()
                    }
                };
                self.disks[d].set_faults(faults);
            }
            93..=94 => self.reboot(true),
            95 => self.reboot(false),
            96..=97 => {
                // A compaction step in the background, interleaved with what follows
                // (and cut short by the next power cut).
                if self.rng.gen_bool(0.5) {
                    self.store.compact_soon(DiskId(self.rng.gen_range(0..2)));
                } else {
                    self.store.compact_start();
                }
            }
            _ => {}
        }
    }

    /// A random object the model says may exist.
    fn pick(&mut self) -> Option<Fingerprint> {
        let mut fps: Vec<_> = self
            .model
            .iter()
            .filter(|(_, m)| m.mem + m.up > 0)
            .map(|(f, _)| *f)
            .collect();
        fps.sort_unstable();
        (!fps.is_empty()).then(|| fps[self.rng.gen_range(0..fps.len())])
    }

    fn check_read(&mut self, fp: &Fingerprint) {
        let m = &self.model[fp];
        match get_all(&mut self.store, fp) {
            Ok(bytes) => {
                assert_eq!(
                    Fingerprint::of(&bytes),
                    *fp,
                    "bytes do not match their fingerprint"
                );
                assert_eq!(bytes, m.data);
            }
            Err(StoreError::NotFound(_)) => assert!(m.mem == 0 || !m.certain(), "{fp} vanished"),
            Err(StoreError::DiskFailed { disk, .. }) => {
                assert_eq!(
                    self.store.disks()[usize::from(disk.0)].state,
                    DiskState::Down
                )
            }
            Err(e) => panic!("read of {fp}: {e}"),
        }
    }

    /// Power cut (or a clean stop), then a reboot with healthy devices and a full check.
    fn reboot(&mut self, crash: bool) {
        self.inflight.clear();
        if crash && self.store.compact_busy() {
            self.cut_short += 1;
        }
        if crash {
            for d in &self.disks {
                d.crash();
            }
        } else {
            let _ = self.store.checkpoint();
        }
        for d in &self.disks {
            d.set_faults(Faults::default());
        }
        if self.rng.gen_bool(0.15) {
            // Rot or a stray write in a checkpoint slot: costs a full scan at most.
            let d = self.rng.gen_range(0..self.disks.len());
            let geo = self.store.vols[d].geo;
            let slot = self.rng.gen_range(0..2u8);
            let (start, len) = if self.rng.gen_bool(0.5) {
                (geo.ckpt_header(slot), BLOCK_U64)
            } else {
                (geo.ckpt_body(slot), geo.ckpt_body_bytes())
            };
            self.disks[d].corrupt(start + self.rng.gen_range(0..len), 1);
        }
        if std::env::var("CRASH_TRACE").is_ok() {
            eprintln!(
                "reboot crash={crash} {:?} {:?}",
                self.store.counters(),
                self.store
                    .disks()
                    .iter()
                    .map(|d| (d.state, d.bytes_free, d.bytes_dead, d.objects_used))
                    .collect::<Vec<_>>()
            );
        }
        self.reboots += 1;
        self.compactions += self.store.counters().compactions;
        self.dedups += self.store.counters().dedup_hits;
        self.wraps += self.store.vols.iter().map(|v| v.wraps).sum::<u64>();
        let seed = self.rng.gen();
        let twins: Vec<MemDisk> = self.disks.iter().map(without_checkpoints).collect();
        self.store =
            Store::open_seeded(devices(&self.disks), self.cfg.clone(), 1, seed).expect("reopen");
        for r in self.store.disks() {
            assert_eq!(r.state, DiskState::Online, "disk {:?} after reboot", r.id);
        }
        let full = Store::open_seeded(devices(&twins), self.cfg.clone(), 1, seed)
            .expect("reopen by full scan");
        assert_eq!(
            index_of(&self.store),
            index_of(&full),
            "index: checkpoint vs full scan"
        );
        assert_eq!(
            logs_of(&self.store),
            logs_of(&full),
            "logs: checkpoint vs full scan"
        );
        self.from_checkpoint += self
            .store
            .vols
            .iter()
            .filter(|v| v.ckpt.loaded.is_some())
            .count() as u64;
        check_accounting(&self.store);
        let contents = self.store.contents();
        for (fp, _) in &contents {
            let meta = self.store.get(fp).expect("listed");
            let m = self
                .model
                .get_mut(fp)
                .unwrap_or_else(|| panic!("{fp} is visible but was never committed"));
            let (min, max) = (m.mem.saturating_sub(m.down), m.mem + m.up);
            assert!(
                min <= meta.refcount && meta.refcount <= max,
                "{fp}: refcount {} not in {min}..={max}",
                meta.refcount,
            );
            (m.mem, m.up, m.down) = (meta.refcount, 0, 0);
            let bytes = get_all(&mut self.store, fp).expect("read after reboot");
            assert_eq!(
                Fingerprint::of(&bytes),
                *fp,
                "bytes do not match their fingerprint"
            );
            assert_eq!(bytes, m.data);
        }
        self.model.retain(|fp, m| {
            let present = contents.binary_search_by(|(f, _)| f.cmp(fp)).is_ok();
            assert!(
                present || m.mem <= m.down,
                "{fp} was acknowledged but is gone"
            );
            present
        });
    }
}

fn run_seed(seed: u64, steps: usize) -> Run {
    eprintln!("seed {seed}");
    let mut run = Run::new(seed);
    for _ in 0..steps {
        run.step();
    }
    run.reboot(true);
    run
}

#[test]
fn crash_at_random_points() {
    // CRASH_SEED=n replays from seed n (with CRASH_TRACE=1 for an op-by-op trace).
    let from = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (mut reboots, mut objects, mut compactions, mut dedups, mut wraps) = (0, 0, 0, 0, 0);
    let (mut from_checkpoint, mut background, mut cut_short) = (0, 0, 0);
    for seed in from..200 {
        let run = run_seed(seed, 200);
        reboots += run.reboots;
        objects += run.model.len();
        compactions += run.compactions;
        dedups += run.dedups;
        wraps += run.wraps;
        from_checkpoint += run.from_checkpoint;
        background += run.background;
        cut_short += run.cut_short;
    }
    eprintln!("reboots {reboots} objects {objects} compactions {compactions} dedups {dedups} wrapped {wraps} disks opened from a checkpoint {from_checkpoint} background compaction steps {background} (cut short {cut_short})");
    // The workload must actually exercise what it claims to.
    if from == 0 {
        assert!(reboots > 500, "{reboots}");
        assert!(objects > 200, "{objects}");
        assert!(compactions > 100, "{compactions}");
        assert!(dedups > 100, "{dedups}");
        assert!(wraps > 10, "{wraps}");
        assert!(from_checkpoint > 200, "{from_checkpoint}");
        assert!(background > 20 && cut_short > 5, "{background} {cut_short}");
    }
}

#[test]
fn crash_right_after_each_write_of_a_commit() {
    // Fail the k-th device write from a given point, cut the power, and check: a
    // sweep over every write of a multi-segment store, a dedup, a delete and a
    // compaction.
    for k in 0..40u64 {
        let disks = [MemDisk::new(1536 * 1024, k)];
        let c = cfg(16 * 1024);
        let mut s = Store::open_seeded(devices(&disks), c.clone(), 1, k).unwrap();
        let keep = data(1, 40_000);
        let kept = super::tests::put(&mut s, &keep, 7000).unwrap().fingerprint;
        let gone = super::tests::put(&mut s, &data(2, 30_000), 7000)
            .unwrap()
            .fingerprint;
        disks[0].set_faults(Faults {
            fail_writes_after: Some(k),
            ..Faults::default()
        });
        let a = super::tests::put(&mut s, &data(3, 50_000), 9000).is_ok();
        let b = super::tests::put(&mut s, &keep, 9000).is_ok();
        let d = s.delete(&gone).is_ok();
        let _ = s.compact(DiskId(0));
        let e = super::tests::put(&mut s, &data(4, 5000), 9000).is_ok();
        disks[0].crash();
        disks[0].set_faults(Faults::default());
        let mut s = Store::open_seeded(devices(&disks), c, 1, k + 1).unwrap();
        assert_eq!(get_all(&mut s, &kept).unwrap(), keep, "k={k}");
        let rc = s.get(&kept).unwrap().refcount;
        assert!(rc == 1 + u32::from(b) || (!b && rc == 2), "k={k} rc={rc}");
        if a {
            assert_eq!(
                get_all(&mut s, &Fingerprint::of(&data(3, 50_000))).unwrap(),
                data(3, 50_000)
            );
        }
        if e {
            assert!(s.get(&Fingerprint::of(&data(4, 5000))).is_some());
        }
        if d {
            assert!(s.get(&gone).is_none(), "k={k}");
        } else if let Some(m) = s.get(&gone) {
            assert_eq!(m.refcount, 1);
            assert_eq!(get_all(&mut s, &gone).unwrap(), data(2, 30_000));
        }
        for (fp, _) in s.contents() {
            let bytes = get_all(&mut s, &fp).unwrap();
            assert_eq!(Fingerprint::of(&bytes), fp);
        }
        check_accounting(&s);
    }
}

/// One group commit of several stores, a dedup reference and a delete, all in flight
/// together on a disk that completes out of order, with the power cut after every
/// possible number of polls. After each reboot: every acknowledged operation is
/// there (an object whole, with its bytes), the reference count is one the
/// acknowledgements allow, and every object visible at all reads back whole and
/// matching its fingerprint — never half a store.
#[test]
fn power_cut_at_every_step_of_a_group_commit() {
    let mut cuts_tried = 0u32;
    let mut acked_before_cut = 0u32;
    let mut grouped_flushes = 0u64;
    for seed in 0..40u64 {
        let c = cfg(16 * 1024);
        let sizes = [1usize, 4096, 5000, 40_000, 100, 70_000];
        let objects: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| data(seed * 100 + i as u64, n))
            .collect();
        let base = data(seed * 100 + 99, 3000);
        let mut cut = 0usize;
        loop {
            let disk = MemDisk::new(8 << 20, seed);
            let mut s =
                Store::open_seeded(devices(std::slice::from_ref(&disk)), c.clone(), 1, seed)
                    .unwrap();
            // A durable object to reference and then delete in the same batch.
            let base_fp = super::tests::put(&mut s, &base, 4096).unwrap().fingerprint;
            let flushes_before = disk.stats().flushes;
            let mut ids = Vec::new();
            for o in &objects {
                let id = s.begin().unwrap();
                for piece in o.chunks(7000) {
                    s.append(id, piece).unwrap();
                }
                ids.push(id);
            }
            for (user, id) in ids.into_iter().enumerate() {
                s.commit_start(id, &Expect::NONE, user as u64).unwrap();
            }
            let dedup = s.begin().unwrap();
            s.append(dedup, &base).unwrap();
            s.commit_start(dedup, &Expect::NONE, 100).unwrap();
            s.delete_start(&base_fp, 101).unwrap();

            let mut acked: HashMap<u64, bool> = HashMap::new();
            let mut events = Vec::new();
            let mut polls = 0usize;
            while polls < cut && acked.len() < objects.len() + 2 {
                s.poll(&mut events);
                polls += 1;
                for e in events.drain(..) {
                    assert!(succeeded(&e), "seed {seed} cut {cut}: {e:?}");
                    acked.insert(e.user(), true);
                }
            }
            let finished = acked.len() == objects.len() + 2;
            if finished {
                // Grouped: fewer flushes than the eight operations they made durable.
                let flushes = disk.stats().flushes - flushes_before;
                assert!(flushes < 8, "seed {seed}: {flushes} flushes for 8 commits");
                grouped_flushes += flushes;
            }
            acked_before_cut += acked.len() as u32;
            cuts_tried += 1;
            drop(s);
            disk.crash();
            let mut s =
                Store::open_seeded(devices(std::slice::from_ref(&disk)), c.clone(), 1, seed)
                    .unwrap();
            for (i, o) in objects.iter().enumerate() {
                let fp = Fingerprint::of(o);
                match get_all(&mut s, &fp) {
                    Ok(bytes) => assert_eq!(&bytes, o, "seed {seed} cut {cut}: object {i}"),
                    Err(StoreError::NotFound(_)) => assert!(
                        !acked.contains_key(&(i as u64)),
                        "seed {seed} cut {cut}: acknowledged object {i} lost"
                    ),
                    Err(e) => panic!("seed {seed} cut {cut}: object {i}: {e}"),
                }
            }
            // The dedup record precedes the delete in the log, which is durable as a
            // prefix: an acknowledged delete implies the dedup is durable too.
            let rc = s.get(&base_fp).map_or(0, |m| m.refcount);
            let allowed: &[u32] = match (acked.contains_key(&100), acked.contains_key(&101)) {
                (_, true) => &[1],
                (true, false) => &[1, 2],
                (false, false) => &[1, 2],
            };
            assert!(
                allowed.contains(&rc),
                "seed {seed} cut {cut}: base refcount {rc}, acked {acked:?}"
            );
            if rc > 0 {
                assert_eq!(get_all(&mut s, &base_fp).unwrap(), base);
            }
            check_accounting(&s);
            if finished {
                break;
            }
            cut += 1;
        }
    }
    eprintln!(
        "{cuts_tried} power cuts, {acked_before_cut} acknowledgements before them; \
         {grouped_flushes} flushes for 40 × 8 operations"
    );
    assert!(cuts_tried > 200 && acked_before_cut > 100);
}

/// A checkpoint written in the background, started with records not yet durable and
/// with stores and a delete committed while it runs, and the power cut after every possible number of polls until it and they
/// are over: every step of it (body chunks, header, its flush, the verified mark's
/// superblock write and flush). Half the runs have an earlier checkpoint in the other
/// slot, which must stay usable. After each reboot every acknowledged object is there
/// with its bytes, an acknowledged delete is durable, and the index from the
/// checkpoints equals the full scan's.
#[test]
fn power_cut_at_every_step_of_a_background_checkpoint() {
    let (mut cuts, mut opened_from_it, mut from_older) = (0u32, 0u32, 0u32);
    for seed in 0..16u64 {
        let c = cfg(16 * 1024);
        let base: Vec<Vec<u8>> = (0..150)
            .map(|i| data(seed * 1000 + i, 1 + (i as usize * 53) % 5000))
            .collect();
        let extra: Vec<Vec<u8>> = (0..3)
            .map(|i| data(seed * 1000 + 500 + i, 3000 + 20_000 * i as usize))
            .collect();
        let mut cut = 0usize;
        loop {
            let disk = MemDisk::new(8 << 20, seed);
            let one = std::slice::from_ref(&disk);
            let mut s = Store::open_seeded(devices(one), c.clone(), 1, seed).unwrap();
            let (early, late) = base.split_at(100);
            for o in early {
                super::tests::put(&mut s, o, 4096).unwrap();
            }
            let older = (seed % 2 == 0).then(|| {
                s.checkpoint().unwrap();
                s.vols[0].ckpt.seq.expect("checkpoint written")
            });
            for o in late {
                super::tests::put(&mut s, o, 4096).unwrap();
            }
            let gone = Fingerprint::of(&base[1]);
            s.delete(&gone).unwrap();
            let victim = Fingerprint::of(&base[0]);
            for b in s.ckpt_bufs.iter_mut() {
                *b = AlignedBuf::new(BLOCK);
            }
            // Records before the checkpoint's start not durable yet: the first extra
            // object's commit and the others' segments (open writes, which the
            // snapshot carries as pending).
            let mut ids = Vec::new();
            for o in &extra {
                let id = s.begin().unwrap();
                for piece in o.chunks(7000) {
                    s.append(id, piece).unwrap();
                }
                ids.push(id);
            }
            s.commit_start(ids[0], &Expect::NONE, 0).unwrap();
            let start = s.vols[0].next_seq;
            assert!(s.vols[0].durable_seq < start);
            assert!(s.checkpoint_start());
            for (user, id) in ids.into_iter().enumerate().skip(1) {
                s.commit_start(id, &Expect::NONE, user as u64).unwrap();
            }
            s.delete_start(&victim, 10).unwrap();
            let mut acked = std::collections::HashSet::new();
            let mut outcome = None;
            let mut events = Vec::new();
            let mut polls = 0usize;
            while polls < cut && (outcome.is_none() || acked.len() < extra.len() + 1) {
                s.poll(&mut events);
                polls += 1;
                for e in events.drain(..) {
                    assert!(succeeded(&e), "seed {seed} cut {cut}: {e:?}");
                    acked.insert(e.user());
                }
                if outcome.is_none() {
                    outcome = s.checkpoint_tick();
                }
            }
            let finished = outcome.is_some() && acked.len() == extra.len() + 1;
            if let Some(r) = outcome {
                r.unwrap();
                assert_eq!(s.vols[0].ckpt.seq, Some(start));
            }
            cuts += 1;
            drop(s);
            disk.crash();
            let twin = without_checkpoints(&disk);
            let mut s = Store::open_seeded(devices(one), c.clone(), 1, seed).unwrap();
            let full = Store::open_seeded(devices(&[twin]), c.clone(), 1, seed).unwrap();
            let at = format!("seed {seed} cut {cut}");
            assert_eq!(index_of(&s), index_of(&full), "{at}: index");
            assert_eq!(logs_of(&s), logs_of(&full), "{at}: logs");
            match s.vols[0].ckpt.loaded {
                Some(l) if l == start => opened_from_it += 1,
                Some(l) if Some(l) == older => from_older += 1,
                _ => {}
            }
            if finished {
                assert_eq!(s.vols[0].ckpt.loaded, Some(start), "{at}");
            }
            for o in &base[2..] {
                let fp = Fingerprint::of(o);
                assert_eq!(&get_all(&mut s, &fp).unwrap(), o, "{at}: {fp}");
            }
            assert!(s.get(&gone).is_none(), "{at}: deleted object back");
            if let Some(m) = s.get(&victim) {
                assert!(!acked.contains(&10), "{at}: acknowledged delete lost");
                assert_eq!(m.refcount, 1);
                assert_eq!(get_all(&mut s, &victim).unwrap(), base[0]);
            }
            for (user, o) in extra.iter().enumerate() {
                let fp = Fingerprint::of(o);
                match get_all(&mut s, &fp) {
                    Ok(bytes) => assert_eq!(&bytes, o, "{at}: extra {user}"),
                    Err(StoreError::NotFound(_)) => {
                        assert!(!acked.contains(&(user as u64)), "{at}: acked {user} lost")
                    }
                    Err(e) => panic!("{at}: extra {user}: {e}"),
                }
            }
            check_accounting(&s);
            if finished {
                break;
            }
            cut += 1;
        }
    }
    eprintln!(
        "{cuts} power cuts; reopened from the background checkpoint {opened_from_it} times, \
         from the older one {from_older} times"
    );
    assert!(cuts > 100 && opened_from_it > 16 && from_older > 8);
}
