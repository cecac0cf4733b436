//! Tests of the index checkpoint: what open reads with one, that replay from it gives
//! the index a full scan gives, and that a checkpoint which is damaged, torn, stale
//! (compaction passed it) or too large only ever costs the full scan, never an object.
//! Shared helpers for the crash and property tests live here too.

use std::time::Instant;

use nvme::file::FileDevice;
use nvme::mem::{Faults, MemDisk};

use super::format::{CkptHeader, BLOCK_U64};
use super::tests::{cfg, data, devices, get_all, put};
use super::*;

const KIB: usize = 1024;
const MIB: u64 = 1 << 20;

/// A copy of `disk` with both checkpoint headers zeroed: opening it scans the whole log,
/// as the store did before checkpoints.
pub(super) fn without_checkpoints(disk: &MemDisk) -> MemDisk {
    let size = disk.size_bytes();
    let copy = MemDisk::new(size, 0);
    let (mut src, mut dst) = (disk.device(), copy.device());
    let mut buf = AlignedBuf::new(1 << 20);
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        src.read_at(at, &mut buf[..n]).expect("copy read");
        dst.write_at(at, &buf[..n]).expect("copy write");
        at += n as u64;
    }
    let zero = AlignedBuf::new(2 * BLOCK);
    dst.write_at(2 * BLOCK_U64, &zero).expect("wipe headers");
    dst.flush().expect("copy flush");
    copy
}

/// One index entry, comparable.
type EntryKey = (Fingerprint, u16, u64, u32, u64, Vec<(u64, u32)>, u64);

/// The whole index, sorted, every field of every entry.
pub(super) fn index_of(s: &Store) -> Vec<EntryKey> {
    let mut all: Vec<EntryKey> = s
        .index
        .iter()
        .map(|(fp, e)| {
            (
                fp,
                e.disk.0,
                e.len,
                e.refcount,
                e.write_id,
                e.extents.iter().map(|x| (x.hdr, x.len)).collect(),
                e.footprint,
            )
        })
        .collect();
    all.sort_unstable_by_key(|e| e.0);
    all
}

/// Each disk's log as recovered: head seq, used bytes, next seq, live bytes, objects.
pub(super) fn logs_of(s: &Store) -> Vec<(u64, u64, u64, u64, u64)> {
    s.vols
        .iter()
        .map(|v| (v.head_seq, v.used(), v.next_seq, v.live_bytes, v.objects))
        .collect()
}

/// Opens `disks` twice — as they are, and copies without checkpoints — and checks that
/// both give the same index and logs. Returns the store opened as they are.
pub(super) fn open_both_ways(disks: &[MemDisk], c: &StoreConfig, seed: u64) -> Store {
    let twins: Vec<MemDisk> = disks.iter().map(without_checkpoints).collect();
    let s = Store::open_seeded(devices(disks), c.clone(), 7, seed).expect("open");
    let full = Store::open_seeded(devices(&twins), c.clone(), 7, seed).expect("open copy");
    assert!(full.vols.iter().all(|v| v.ckpt.loaded.is_none()));
    assert_eq!(
        index_of(&s),
        index_of(&full),
        "index from checkpoint vs full scan"
    );
    assert_eq!(
        logs_of(&s),
        logs_of(&full),
        "log from checkpoint vs full scan"
    );
    s
}

fn reads_to_open(disk: &MemDisk, c: &StoreConfig) -> (u64, Store) {
    let before = disk.stats().reads;
    let s = Store::open_seeded(devices(std::slice::from_ref(disk)), c.clone(), 7, 1).unwrap();
    (disk.stats().reads - before, s)
}

#[test]
fn open_after_checkpoint_reads_the_checkpoint_and_the_tail_only() {
    let c = cfg(16 * KIB);
    let mut counts = Vec::new();
    for n in [300u64, 3000] {
        let disk = MemDisk::new(32 * MIB, n);
        let mut s =
            Store::open_seeded(devices(std::slice::from_ref(&disk)), c.clone(), 7, 1).unwrap();
        for i in 0..n {
            put(&mut s, &data(i, 1000), 1000).unwrap();
        }
        s.checkpoint().unwrap();
        drop(s);
        // One read for the superblocks and checkpoint headers, one for the body (3000
        // objects take 129 KiB, under one transfer), one where the scan stops (inside
        // a block of packed records) and one at the next block boundary (where a
        // segment record could follow them), and the tail's block read again to
        // become the image new records join.
        let (clean, s) = reads_to_open(&disk, &c);
        assert_eq!(clean, 5, "{n} objects");
        assert_eq!(s.vols[0].ckpt.loaded, Some(s.vols[0].next_seq));
        assert_eq!(s.contents().len() as u64, n);
        // Five more objects, then a stop without a checkpoint: their five headers are
        // read as well, and the data of the last (written after the last flush the
        // log vouches for) is verified — a header and a data block.
        let mut s = s;
        for i in 0..5 {
            put(&mut s, &data(n + i, 1000), 1000).unwrap();
        }
        drop(s);
        let (tail, s) = reads_to_open(&disk, &c);
        assert_eq!(s.vols[0].replayed, 5);
        assert!(s.vols[0].ckpt.loaded.is_some());
        assert_eq!(s.contents().len() as u64, n + 5);
        counts.push((clean, tail));
        // Without the checkpoint, the full scan reads every block of the log.
        let twin = without_checkpoints(&disk);
        let (full, s) = reads_to_open(&twin, &c);
        assert!(full > n * 1000 / 4096, "{full} reads for {n} objects");
        assert!(s.vols[0].ckpt.loaded.is_none());
    }
    assert_eq!(
        counts[0], counts[1],
        "reads at open do not grow with the objects"
    );
    // The five packed records share a block or two: read once each.
    assert!(counts[0].1 <= 5 + 3, "{counts:?}");
}

#[test]
fn long_replay_is_checkpointed_at_open() {
    let c = cfg(16 * KIB);
    let disk = MemDisk::new(32 * MIB, 5);
    let mut s = Store::open_seeded(devices(std::slice::from_ref(&disk)), c.clone(), 7, 1).unwrap();
    let n = checkpoint::REPLAY_CHECKPOINT_RECORDS + 10;
    for i in 0..n {
        put(&mut s, &data(i, 100), 100).unwrap();
    }
    disk.crash();
    let s = Store::open_seeded(devices(std::slice::from_ref(&disk)), c.clone(), 7, 2).unwrap();
    assert_eq!(s.vols[0].replayed, n);
    assert_eq!(
        s.vols[0].ckpt.seq,
        Some(s.vols[0].next_seq),
        "written at open"
    );
    drop(s);
    disk.crash();
    let (reads, s) = reads_to_open(&disk, &c);
    assert_eq!((s.vols[0].replayed, reads), (0, 5));
    assert_eq!(s.contents().len() as u64, n);
}

/// Objects, deletes and dedups around two checkpoints, one write open across the
/// second and a tail after it. Returns the disk, what must be there (bytes and
/// refcount), and the seqs the two checkpoints cover.
fn two_checkpoints_and_a_tail() -> (MemDisk, Vec<(Vec<u8>, u32)>, u64, u64) {
    let c = cfg(16 * KIB);
    let disk = MemDisk::new(8 * MIB, 41);
    let mut s = Store::open_seeded(devices(std::slice::from_ref(&disk)), c.clone(), 7, 1).unwrap();
    let objs: Vec<Vec<u8>> = (0..12)
        .map(|i| data(500 + i, 3000 + 9000 * i as usize))
        .collect();
    let fps: Vec<Fingerprint> = objs.iter().map(|o| Fingerprint::of(o)).collect();
    for o in &objs[..6] {
        put(&mut s, o, 5000).unwrap();
    }
    put(&mut s, &objs[1], 5000).unwrap(); // refcount 2
    s.checkpoint().unwrap();
    let s1 = s.vols[0].next_seq;
    s.delete(&fps[2]).unwrap();
    put(&mut s, &objs[6], 5000).unwrap();
    put(&mut s, &objs[3], 5000).unwrap(); // refcount 2
                                          // A write begun before the second checkpoint, committed after it: its first
                                          // segments are only in the checkpoint's pending writes.
    let open = s.begin().unwrap();
    s.append(open, &objs[7][..40_000]).unwrap();
    // And one begun before it and never finished.
    let lost = s.begin().unwrap();
    s.append(lost, &data(9999, 50_000)).unwrap();
    s.checkpoint().unwrap();
    let s2 = s.vols[0].next_seq;
    s.append(open, &objs[7][40_000..]).unwrap();
    assert_eq!(s.commit(open).unwrap().fingerprint, fps[7]);
    s.delete(&fps[0]).unwrap();
    s.delete(&fps[1]).unwrap(); // refcount 1
    put(&mut s, &objs[8], 5000).unwrap();
    put(&mut s, &objs[4], 5000).unwrap(); // refcount 2
    drop(s);
    disk.crash();
    let want = vec![
        (objs[1].clone(), 1),
        (objs[3].clone(), 2),
        (objs[4].clone(), 2),
        (objs[5].clone(), 1),
        (objs[6].clone(), 1),
        (objs[7].clone(), 1),
        (objs[8].clone(), 1),
    ];
    (disk, want, s1, s2)
}

fn check_exactly(s: &mut Store, want: &[(Vec<u8>, u32)]) {
    assert_eq!(s.contents().len(), want.len());
    for (bytes, rc) in want {
        let fp = Fingerprint::of(bytes);
        assert_eq!(s.get(&fp).map(|m| m.refcount), Some(*rc), "{fp}");
        assert_eq!(&get_all(s, &fp).unwrap(), bytes);
    }
    super::tests::check_accounting(s);
}

#[test]
fn tail_after_checkpoint_replays_exactly() {
    let (disk, want, _, s2) = two_checkpoints_and_a_tail();
    let mut s = open_both_ways(std::slice::from_ref(&disk), &cfg(16 * KIB), 3);
    assert_eq!(s.vols[0].ckpt.loaded, Some(s2));
    check_exactly(&mut s, &want);
}

#[test]
fn damaged_checkpoints_fall_back_to_the_older_one_then_to_the_full_scan() {
    let c = cfg(16 * KIB);
    let geo = format::Geometry::for_size(8 * MIB);
    // The first checkpoint went to slot 0, the second to slot 1.
    let (header0, header1) = (geo.ckpt_header(0), geo.ckpt_header(1));
    let body1 = geo.ckpt_body(1);
    enum Use {
        First,
        Second,
        FullScan,
    }
    let cases: Vec<(Vec<(u64, usize)>, Use)> = vec![
        (vec![(header1, 1)], Use::First),
        (vec![(header1 + 60, 1)], Use::First),
        (vec![(header1 + 124, 4)], Use::First),
        (vec![(body1, 1)], Use::First),
        (vec![(body1 + 100, 1)], Use::First),
        (vec![(header0 + 30, 1)], Use::Second),
        (vec![(body1 + 7, 2), (header0 + 100, 1)], Use::FullScan),
        (vec![(header1 + 50, 1), (header0 + 50, 1)], Use::FullScan),
    ];
    for (damage, expect) in cases {
        let (disk, want, s1, s2) = two_checkpoints_and_a_tail();
        for &(at, len) in &damage {
            disk.corrupt(at, len);
        }
        let mut s = open_both_ways(std::slice::from_ref(&disk), &c, 3);
        let expected = match expect {
            Use::First => Some(s1),
            Use::Second => Some(s2),
            Use::FullScan => None,
        };
        assert_eq!(s.vols[0].ckpt.loaded, expected, "{damage:?}");
        check_exactly(&mut s, &want);
    }
}

#[test]
fn torn_checkpoint_write_leaves_the_previous_one() {
    // Fail the k-th write of a checkpoint (body blocks, header, superblock) and cut
    // the power: the previous checkpoint or the new one is used, and nothing is lost.
    // Small transfer buffers make the body several writes.
    let c = cfg(16 * KIB);
    let mut seen_new = false;
    let mut seen_old = false;
    for k in 0..8u64 {
        for seed in 0..4u64 {
            let disk = MemDisk::new(8 * MIB, 100 * k + seed);
            let mut s =
                Store::open_seeded(devices(std::slice::from_ref(&disk)), c.clone(), 7, 1).unwrap();
            s.ckpt_bufs = vec![AlignedBuf::new(BLOCK)];
            let objs: Vec<Vec<u8>> = (0..150).map(|i| data(i, 100 + i as usize)).collect();
            for o in &objs[..100] {
                put(&mut s, o, 5000).unwrap();
            }
            s.checkpoint().unwrap();
            let s1 = s.vols[0].next_seq;
            for o in &objs[100..] {
                put(&mut s, o, 5000).unwrap();
            }
            let s2 = s.vols[0].next_seq;
            disk.set_faults(Faults {
                fail_writes_after: Some(k),
                ..Faults::default()
            });
            let done = s.checkpoint().is_ok();
            drop(s);
            disk.crash();
            disk.set_faults(Faults::default());
            let want: Vec<_> = objs.iter().map(|o| (o.clone(), 1)).collect();
            let mut s = open_both_ways(std::slice::from_ref(&disk), &c, 5);
            let loaded = s.vols[0].ckpt.loaded;
            assert!(loaded == Some(s1) || loaded == Some(s2), "k={k} {loaded:?}");
            if done {
                assert_eq!(loaded, Some(s2), "k={k}");
            }
            seen_new |= loaded == Some(s2);
            seen_old |= loaded == Some(s1);
            check_exactly(&mut s, &want);
        }
    }
    assert!(seen_new && seen_old);
}

#[test]
fn compaction_past_the_checkpoint_falls_back_to_the_full_scan() {
    let c = cfg(16 * KIB);
    let disk = MemDisk::new(4 * MIB, 43);
    let mut s = Store::open_seeded(devices(std::slice::from_ref(&disk)), c.clone(), 7, 1).unwrap();
    let objs: Vec<Vec<u8>> = (0..6).map(|i| data(700 + i, 60_000)).collect();
    for o in &objs {
        put(&mut s, o, 9000).unwrap();
    }
    s.checkpoint().unwrap();
    let ckpt = s.vols[0].next_seq;
    for o in &objs[..3] {
        s.delete(&Fingerprint::of(o)).unwrap();
    }
    s.compact(DiskId(0)).unwrap();
    assert!(
        s.vols[0].head_seq > ckpt,
        "the head moved past the checkpoint"
    );
    drop(s);
    disk.crash();
    let mut s = open_both_ways(std::slice::from_ref(&disk), &c, 3);
    assert_eq!(s.vols[0].ckpt.loaded, None);
    let want: Vec<_> = objs[3..].iter().map(|o| (o.clone(), 1)).collect();
    check_exactly(&mut s, &want);
    // The next checkpoint is usable again.
    s.checkpoint().unwrap();
    drop(s);
    let s = open_both_ways(std::slice::from_ref(&disk), &c, 4);
    assert!(s.vols[0].ckpt.loaded.is_some());
}

#[test]
fn compaction_short_of_the_checkpoint_replays_the_moves() {
    // A bounded compaction step that moves objects but leaves the head before the
    // checkpoint: replay from the checkpoint meets the moved copies (absolute
    // refcounts, new extents) after it, and must end where the full scan ends.
    let c = cfg(16 * KIB);
    let disk = MemDisk::new(4 * MIB, 44);
    let mut s = Store::open_seeded(devices(std::slice::from_ref(&disk)), c.clone(), 7, 1).unwrap();
    let a = data(801, 300_000);
    let b = data(802, 300_000);
    let small = data(803, 20_000);
    let later = data(804, 20_000);
    for o in [&a, &b, &small] {
        put(&mut s, o, 9000).unwrap();
    }
    put(&mut s, &b, 9000).unwrap(); // refcount 2, moved with it
    s.checkpoint().unwrap();
    let ckpt = s.vols[0].next_seq;
    put(&mut s, &later, 9000).unwrap();
    s.delete(&Fingerprint::of(&a)).unwrap();
    s.delete(&Fingerprint::of(&later)).unwrap();
    let head = s.vols[0].head_seq;
    let r = s.maybe_compact().unwrap().expect("a compaction step");
    assert!(r.objects_moved >= 1, "{r:?}");
    assert!(
        s.vols[0].head_seq > head && s.vols[0].head_seq <= ckpt,
        "head within the checkpoint"
    );
    drop(s);
    disk.crash();
    let mut s = open_both_ways(std::slice::from_ref(&disk), &c, 3);
    assert_eq!(s.vols[0].ckpt.loaded, Some(ckpt));
    check_exactly(&mut s, &[(b, 2), (small, 1)]);
}

#[test]
fn snapshot_too_large_for_its_slot_is_skipped() {
    let c = cfg(16 * KIB);
    let disk = MemDisk::new(4 * MIB, 45);
    let mut s = Store::open_seeded(devices(std::slice::from_ref(&disk)), c.clone(), 7, 1).unwrap();
    let objs: Vec<Vec<u8>> = (0..20).map(|i| data(900 + i, 5000)).collect();
    for o in &objs[..10] {
        put(&mut s, o, 5000).unwrap();
    }
    s.checkpoint().unwrap();
    let first = s.vols[0].ckpt;
    for o in &objs[10..] {
        put(&mut s, o, 5000).unwrap();
    }
    // As if the slot were sized for fewer objects than the disk holds.
    // (20 objects of one extent take 20 × 29 bytes on a 4 MiB disk.)
    s.vols[0].ckpt.capacity = 15 * 29;
    s.checkpoint().unwrap();
    let now = s.vols[0].ckpt;
    assert_eq!(
        (now.seq, now.slot, now.generation),
        (first.seq, first.slot, first.generation)
    );
    assert_eq!(
        s.vols[0].sb.verified_seq, s.vols[0].next_seq,
        "superblock still updated"
    );
    drop(s);
    disk.crash();
    let mut s = open_both_ways(std::slice::from_ref(&disk), &c, 3);
    assert_eq!(
        s.vols[0].ckpt.loaded, first.seq,
        "the first one is still in use"
    );
    let want: Vec<_> = objs.iter().map(|o| (o.clone(), 1)).collect();
    check_exactly(&mut s, &want);
}

/// Fills a 2 MiB disk with distinct objects of `len` bytes (and the empty object):
/// the store, the number stored, and the snapshot's body size.
fn fill_with(len: usize, c: &StoreConfig, disk: &MemDisk) -> (Store, u64, u64) {
    let mut s = Store::open_seeded(devices(std::slice::from_ref(disk)), c.clone(), 7, 1).unwrap();
    put(&mut s, &[], 1).unwrap();
    let mut n = 0u64;
    loop {
        let mut b = data(n, len);
        b[..8.min(len)].copy_from_slice(&n.to_le_bytes()[..8.min(len)]);
        match put(&mut s, &b, 1) {
            Ok(_) => n += 1,
            Err(StoreError::NoSpace) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let extents: u64 = s.index.values().map(|e| e.extents.len() as u64).sum();
    assert_eq!(extents, n + 1);
    let w = format::ckpt_width(2 * MIB);
    let body = (n + 1) * (format::ckpt_entry_bytes(w) + format::ckpt_extent_bytes(w));
    (s, n, body)
}

#[test]
fn a_disk_full_of_4k_objects_fits_its_checkpoint_and_smaller_ones_fall_back_to_the_scan() {
    // The checkpoint area is sized for one extent per 4 KiB of disk: a disk full of
    // 4 KiB objects (4176 bytes of log each, packed) fits, with little to spare.
    let c = cfg(64 * KIB);
    let disk = MemDisk::new(2 * MIB, 46);
    let (mut s, n, body) = fill_with(4096, &c, &disk);
    let cap = s.vols[0].ckpt.capacity;
    assert!(body <= cap, "{body} > {cap}");
    // (The reserves for compaction and metadata keep a disk this small from the
    // bound.)
    assert!(body * 2 > cap, "{body} bytes hardly fill {cap}");
    s.checkpoint().unwrap();
    assert_eq!(s.vols[0].ckpt.seq, Some(s.vols[0].next_seq), "written");
    drop(s);
    let s = open_both_ways(std::slice::from_ref(&disk), &c, 3);
    assert!(s.vols[0].ckpt.loaded.is_some());
    assert_eq!(s.contents().len() as u64, n + 1);

    // A disk full of 8-byte objects (96 bytes of log each) outgrows it: the snapshot
    // is skipped with a warning, and the next open scans the log and finds them all.
    let disk = MemDisk::new(2 * MIB, 47);
    let (mut s, n, body) = fill_with(8, &c, &disk);
    assert!(body > s.vols[0].ckpt.capacity);
    assert!(n > 15_000, "{n} packed objects in 2 MiB");
    s.checkpoint().unwrap();
    assert_eq!(s.vols[0].ckpt.seq, None, "skipped");
    drop(s);
    let s = open_both_ways(std::slice::from_ref(&disk), &c, 3);
    assert!(s.vols[0].ckpt.loaded.is_none());
    assert_eq!(s.contents().len() as u64, n + 1);
}

#[test]
fn forged_checkpoint_fields_are_refused() {
    // Well-sealed headers whose contents do not fit the disk or the log: each is
    // refused (and the full scan used), never trusted, never a panic.
    let c = cfg(16 * KIB);
    let (disk, want, _, _) = two_checkpoints_and_a_tail();
    let mut dev = disk.device();
    let mut blocks = AlignedBuf::new(2 * BLOCK);
    dev.read_at(2 * BLOCK_U64, &mut blocks).unwrap();
    let real = CkptHeader::decode(&blocks[BLOCK..]).expect("slot 1 header");
    type Forge = Box<dyn Fn(&mut CkptHeader)>;
    let forgeries: Vec<(&str, Forge)> = vec![
        ("epoch from the future", Box::new(|h| h.epoch = 1000)),
        ("position outside the log", Box::new(|h| h.position = 0)),
        ("misaligned position", Box::new(|h| h.position += 1)),
        ("more records than room", Box::new(|h| h.seq += 1_000_000)),
        ("counts against length", Box::new(|h| h.objects += 1)),
        (
            "body larger than the slot",
            Box::new(|h| {
                h.objects += 1_000_000;
                h.extents += 1_000_000;
                h.body_len += 44_000_000;
            }),
        ),
        ("wrong slot", Box::new(|h| h.slot = 0)),
        ("body crc", Box::new(|h| h.body_crc ^= 1)),
        ("seq behind the head", Box::new(|h| h.seq = 0)),
    ];
    for (what, forge) in forgeries {
        let copy = without_checkpoints(&disk);
        let mut h = real;
        forge(&mut h);
        let mut block = AlignedBuf::new(BLOCK);
        h.encode(&mut block);
        let mut d = copy.device();
        d.write_at(3 * BLOCK_U64, &block).unwrap();
        d.flush().unwrap();
        let mut s = open_both_ways(std::slice::from_ref(&copy), &c, 3);
        assert_eq!(s.vols[0].ckpt.loaded, None, "{what}");
        check_exactly(&mut s, &want);
    }
}

#[test]
fn large_snapshots_are_written_only_when_worth_it() {
    // A 4 TB disk: 35 bytes a small object. Small indexes: whenever anything changed.
    let w = 4;
    assert!(checkpoint::snapshot_worth(0, w, 0));
    assert!(checkpoint::snapshot_worth(100_000, w, 1));
    // 100 million objects take 3.5 GB: worth it once the next open would otherwise
    // read as many bytes of record headers, 854,493 of them.
    assert!(!checkpoint::snapshot_worth(100_000_000, w, 1));
    assert!(!checkpoint::snapshot_worth(100_000_000, w, 854_492));
    assert!(checkpoint::snapshot_worth(100_000_000, w, 854_493));
    assert!(checkpoint::snapshot_worth(u64::MAX, w, u64::MAX));
    // A disk that changed is due; one that did not is not.
    let disk = MemDisk::new(4 * MIB, 47);
    let mut s =
        Store::open_seeded(devices(std::slice::from_ref(&disk)), cfg(16 * KIB), 7, 1).unwrap();
    assert!(checkpoint::snapshot_due(&s.vols[0]), "none written yet");
    s.checkpoint().unwrap();
    assert!(!checkpoint::snapshot_due(&s.vols[0]));
    put(&mut s, &data(1, 10), 10).unwrap();
    assert!(checkpoint::snapshot_due(&s.vols[0]));
}

/// Start-up time with many small objects on a real file (O_DIRECT where the
/// filesystem allows it), from a checkpoint, by the full scan, and from a checkpoint
/// plus a tail. Run by hand, in release mode:
/// `cargo test -p dataplane --release startup_time -- --ignored --nocapture`
/// (`STARTUP_OBJECTS=n` for another count). Prints; asserts nothing about time.
#[test]
#[ignore]
fn startup_time_with_many_small_objects() {
    let n: u64 = std::env::var("STARTUP_OBJECTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    let size = (n * 8192 + (64 << 20)).next_power_of_two();
    let c = cfg(1 << 20);
    let dev = |p: &std::path::Path| -> Vec<Box<dyn BlockDevice>> {
        vec![Box::new(FileDevice::open(p, size).expect("open file"))]
    };
    let timed_open = |what: &str, seed: u64| {
        let t = Instant::now();
        let s = Store::open_seeded(dev(&path), c.clone(), 1, seed).expect("reopen");
        eprintln!(
            "{what}: {} objects, {} records replayed, in {:?}",
            s.contents().len(),
            s.vols[0].replayed,
            t.elapsed()
        );
        s
    };
    let mut s = Store::open_seeded(dev(&path), c.clone(), 1, 1).expect("open");
    let t = Instant::now();
    for i in 0..n {
        put(&mut s, &data(i, 100), 100).expect("put");
    }
    eprintln!("stored {n} objects in {:?}", t.elapsed());
    let t = Instant::now();
    s.checkpoint().expect("checkpoint");
    eprintln!(
        "checkpoint of {n} objects ({} bytes of body) in {:?}",
        n * (format::ckpt_entry_bytes(format::ckpt_width(size))
            + format::ckpt_extent_bytes(format::ckpt_width(size))),
        t.elapsed()
    );
    drop(s);
    for round in 0..3 {
        drop(timed_open(
            &format!("open from checkpoint {round}"),
            2 + round,
        ));
    }
    // The same disk with its checkpoint headers wiped: the scan of every record
    // header (which then writes a fresh checkpoint, included in the time).
    for round in 0..2 {
        let mut d = FileDevice::open(&path, size).expect("open file");
        d.write_at(2 * BLOCK_U64, &AlignedBuf::new(2 * BLOCK))
            .expect("wipe");
        d.flush().expect("flush");
        drop(d);
        drop(timed_open(
            &format!("open by full scan {round}"),
            10 + round,
        ));
    }
    // A crash-like stop 1,000 objects after the last checkpoint.
    let mut s = timed_open("open", 20);
    for i in 0..1000 {
        put(&mut s, &data(n + i, 100), 100).expect("put");
    }
    drop(s);
    drop(timed_open("open from checkpoint + 1000-record tail", 21));
}

/// A checkpoint written in the background (started, then moved along by the poll
/// only) while new stores, dedup references and deletes are committed through the
/// same poll: it covers exactly the records before its start, and the store reopens
/// from it (plus the log after it) to the model and to what a full scan gives.
#[test]
fn background_checkpoint_while_stores_and_deletes_commit() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    enum Op {
        Store(Vec<u8>),
        Delete(Fingerprint),
    }
    let c = cfg(16 * KIB);
    let disks = [MemDisk::new(32 * MIB, 41), MemDisk::new(32 * MIB, 42)];
    let mut s = Store::open_seeded(devices(&disks), c.clone(), 7, 3).unwrap();
    let mut model: HashMap<Fingerprint, (Vec<u8>, u32)> = HashMap::new();
    for i in 0..400u64 {
        let d = data(i, 1 + (i as usize * 37) % 3000);
        let r = put(&mut s, &d, 4096).unwrap();
        model.insert(r.fingerprint, (d, r.refcount));
    }
    // One-block transfers: the body goes out as many writes.
    for b in s.ckpt_bufs.iter_mut() {
        *b = AlignedBuf::new(BLOCK);
    }
    let starts: Vec<u64> = s.vols.iter().map(|v| v.next_seq).collect();
    assert!(s.checkpoint_start());
    assert!(s.checkpoint_busy());
    assert!(!s.checkpoint_start(), "one checkpoint at a time");

    let mut rng = StdRng::seed_from_u64(5);
    let mut pending: HashMap<u64, Op> = HashMap::new();
    let (mut user, mut turns, mut acked_meanwhile) = (0u64, 0u32, 0u32);
    let mut outcome = None;
    let mut events = Vec::new();
    while outcome.is_none() || !pending.is_empty() {
        turns += 1;
        assert!(turns < 100_000, "never finished");
        if outcome.is_none() && pending.len() < 6 {
            user += 1;
            let mut fps: Vec<Fingerprint> = model.keys().copied().collect();
            fps.sort_unstable();
            let pick = fps[rng.gen_range(0..fps.len())];
            match rng.gen_range(0..3) {
                0 => {
                    let _ = s.delete_start(&pick, user).map(|()| {
                        pending.insert(user, Op::Delete(pick));
                    });
                }
                k => {
                    // A new object, or another reference to a stored one.
                    let d = if k == 1 {
                        data(10_000 + user, 1 + rng.gen_range(0..40_000))
                    } else {
                        model[&pick].0.clone()
                    };
                    let id = s.begin().unwrap();
                    for piece in d.chunks(7000) {
                        s.append(id, piece).unwrap();
                    }
                    s.commit_start(id, &Expect::NONE, user).unwrap();
                    pending.insert(user, Op::Store(d));
                }
            }
        }
        s.poll(&mut events);
        for e in events.drain(..) {
            let op = pending.remove(&e.user()).expect("an operation of ours");
            match (e, op) {
                (StoreEvent::Committed { result, .. }, Op::Store(d)) => {
                    let r = result.unwrap();
                    model.insert(r.fingerprint, (d, r.refcount));
                }
                (StoreEvent::Deleted { result, .. }, Op::Delete(fp)) => match result.unwrap() {
                    0 => {
                        model.remove(&fp);
                    }
                    left => model.get_mut(&fp).expect("deleted object").1 = left,
                },
                (e, _) => panic!("unexpected {e:?}"),
            }
            if outcome.is_none() {
                acked_meanwhile += 1;
            }
        }
        if outcome.is_none() {
            outcome = s.checkpoint_tick();
        }
    }
    outcome.unwrap().unwrap();
    eprintln!("{turns} turns, {acked_meanwhile} acknowledged while the checkpoint ran");
    assert!(!s.checkpoint_busy());
    assert!(
        acked_meanwhile > 3,
        "{acked_meanwhile} operations acknowledged meanwhile"
    );
    for (v, &at) in s.vols.iter().zip(&starts) {
        assert_eq!(v.ckpt.seq, Some(at), "disk {}", v.id.0);
        assert!(
            v.next_seq > at,
            "disk {}: nothing written meanwhile",
            v.id.0
        );
        assert!(v.sb.verified_seq >= at);
    }
    drop(s);
    let mut s = open_both_ways(&disks, &c, 9);
    for (v, &at) in s.vols.iter().zip(&starts) {
        assert_eq!(v.ckpt.loaded, Some(at), "disk {} opened from it", v.id.0);
    }
    let contents = s.contents();
    assert_eq!(contents.len(), model.len());
    for (fp, _) in contents {
        let (bytes, rc) = &model[&fp];
        assert_eq!(s.get(&fp).unwrap().refcount, *rc, "{fp}");
        assert_eq!(&get_all(&mut s, &fp).unwrap(), bytes);
    }
}
