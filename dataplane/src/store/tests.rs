//! Unit tests of the store on in-memory disks. Shared helpers live here too.

use super::*;
use nvme::mem::{Faults, MemDisk};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KIB: usize = 1024;
const MIB: u64 = 1 << 20;

pub(super) fn cfg(segment_bytes: usize) -> StoreConfig {
    StoreConfig {
        segment_bytes,
        max_open_writes: 16,
        max_object_bytes: 1 << 30,
        compact_dead_ratio: 0.5,
        // Off: these tests corrupt disks under objects and expect reads to notice.
        // The cache has its own tests.
        cache_bytes: 0,
        ..StoreConfig::default()
    }
}

pub(super) fn devices(disks: &[MemDisk]) -> Vec<Box<dyn BlockDevice>> {
    disks
        .iter()
        .map(|d| Box::new(d.device()) as Box<dyn BlockDevice>)
        .collect()
}

thread_local! {
    /// Seeds for formatting, distinct per open within a test (so that disks formatted
    /// at different opens get different identities) and reproducible per test thread.
    static OPEN_SEED: std::cell::Cell<u64> = const { std::cell::Cell::new(11) };
}

pub(super) fn next_seed() -> u64 {
    OPEN_SEED.with(|s| {
        s.set(s.get() + 1);
        s.get()
    })
}

pub(super) fn open(disks: &[MemDisk], cfg: &StoreConfig) -> Store {
    Store::open_seeded(devices(disks), cfg.clone(), 7, next_seed()).expect("open")
}

/// Deterministic pseudo-random bytes (xorshift: test data need not be good random,
/// only cheap and distinct per seed).
/// Whether a store's commit or delete event reports success (a read event: no).
pub(super) fn succeeded(e: &StoreEvent) -> bool {
    match e {
        StoreEvent::Committed { result, .. } => result.is_ok(),
        StoreEvent::Deleted { result, .. } => result.is_ok(),
        StoreEvent::Read { .. } => false,
    }
}

pub(super) fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Stores `bytes` in chunks of `chunk` bytes.
pub(super) fn put(s: &mut Store, bytes: &[u8], chunk: usize) -> Result<Committed, StoreError> {
    let id = s.begin()?;
    for c in bytes.chunks(chunk.max(1)) {
        s.append(id, c)?;
    }
    s.commit(id)
}

/// Reads a whole object.
pub(super) fn get_all(s: &mut Store, fp: &Fingerprint) -> Result<Vec<u8>, StoreError> {
    let len = s.get(fp).ok_or(StoreError::NotFound(*fp))?.len as usize;
    let mut out = vec![0u8; len];
    let n = s.read(fp, 0, &mut out)?;
    assert_eq!(n, len, "short read");
    Ok(out)
}

/// The store's own bookkeeping agrees with its index.
pub(super) fn check_accounting(s: &Store) {
    for v in &s.vols {
        if v.log_len == 0 {
            continue;
        }
        let entries: Vec<_> = s.index.values().filter(|e| e.disk == v.id).collect();
        assert_eq!(
            v.objects,
            entries.len() as u64,
            "object count of disk {:?}",
            v.id
        );
        let live: u64 = entries.iter().map(|e| e.footprint).sum();
        assert_eq!(v.live_bytes, live, "live bytes of disk {:?}", v.id);
        assert!(v.used() <= v.log_len);
        for e in entries {
            let sum: u64 = e.extents.iter().map(|x| u64::from(x.len)).sum();
            assert_eq!(sum, e.len);
        }
    }
}

fn state(s: &Store, d: u16) -> DiskState {
    s.disks()[usize::from(d)].state
}

#[test]
fn formats_a_blank_disk_and_keeps_its_identity() {
    let disk = MemDisk::new(4 * MIB, 1);
    let s = open(std::slice::from_ref(&disk), &cfg(64 * KIB));
    let r = &s.disks()[0];
    assert_eq!(r.state, DiskState::Online);
    assert_ne!(r.identity, [0; 16]);
    assert_eq!(r.backend, "memory");
    assert_eq!(r.bytes_total, 4 * MIB);
    assert!(r.bytes_free > 3 * MIB && r.bytes_free < 4 * MIB);
    assert_eq!((r.objects_used, r.bytes_dead, r.outstanding_ops), (0, 0, 0));
    let identity = r.identity;
    drop(s);
    let s = open(&[disk], &cfg(64 * KIB));
    assert_eq!(s.disks()[0].identity, identity);
    assert_eq!(s.disks()[0].state, DiskState::Online);
}

#[test]
fn small_objects_round_trip() {
    let disk = MemDisk::new(4 * MIB, 2);
    let mut s = open(std::slice::from_ref(&disk), &cfg(64 * KIB));
    let sizes = [0usize, 1, 4095, 4096, 4097, 8192, 12345];
    let mut fps = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let bytes = data(i as u64, len);
        let c = put(&mut s, &bytes, 1000 + i).unwrap();
        assert_eq!(c.fingerprint, Fingerprint::of(&bytes));
        assert_eq!((c.len, c.refcount, c.deduplicated), (len as u64, 1, false));
        assert_eq!(get_all(&mut s, &c.fingerprint).unwrap(), bytes);
        fps.push((c.fingerprint, bytes));
    }
    // One write + one flush per small object: a 4 KiB object is one packed record
    // of 4176 bytes, written with the rest of the tail's block (two blocks at most).
    let before = disk.stats();
    let c = put(&mut s, &data(99, 4096), 4096).unwrap();
    let after = disk.stats();
    assert_eq!(after.writes - before.writes, 1);
    assert_eq!(after.flushes - before.flushes, 1);
    assert!(after.bytes_written - before.bytes_written <= 8192);
    assert_eq!(s.index.at(&c.fingerprint).footprint, 4176);
    check_accounting(&s);
    drop(s);
    let mut s = open(&[disk], &cfg(64 * KIB));
    for (fp, bytes) in &fps {
        assert_eq!(&get_all(&mut s, fp).unwrap(), bytes);
    }
    assert_eq!(s.contents().len(), sizes.len() + 1);
    check_accounting(&s);
}

#[test]
fn multi_segment_objects_round_trip() {
    let disk = MemDisk::new(24 * MIB, 3);
    let c = cfg(64 * KIB);
    let mut s = open(std::slice::from_ref(&disk), &c);
    let mut objs = Vec::new();
    for (i, chunk) in [1000usize, 7919, 65536, 100_000, 3 << 20]
        .into_iter()
        .enumerate()
    {
        let bytes = data(100 + i as u64, 3 * (1 << 20) + i * 777);
        let r = put(&mut s, &bytes, chunk).unwrap();
        assert_eq!(r.fingerprint, Fingerprint::of(&bytes));
        assert!(s.index.at(&r.fingerprint).extents.len() > 40);
        assert_eq!(get_all(&mut s, &r.fingerprint).unwrap(), bytes);
        objs.push((r.fingerprint, bytes));
    }
    check_accounting(&s);
    drop(s);
    let mut s = open(&[disk], &c);
    for (fp, bytes) in &objs {
        assert_eq!(&get_all(&mut s, fp).unwrap(), bytes);
    }
}

#[test]
fn range_reads_at_edges() {
    let seg = 16 * KIB;
    let disk = MemDisk::new(4 * MIB, 4);
    let mut s = open(&[disk], &cfg(seg));
    let bytes = data(5, 3 * seg + 123);
    let fp = put(&mut s, &bytes, 5000).unwrap().fingerprint;
    let len = bytes.len() as u64;
    let offsets = [
        0,
        1,
        4095,
        4096,
        4097,
        seg as u64 - 1,
        seg as u64,
        len - 4097,
        len - 1,
        len,
    ];
    for &off in &offsets {
        for want in [0usize, 1, 7, 4096, 4097, seg + 5, 100_000] {
            let mut out = vec![0xAAu8; want + 3];
            // Misaligned destination on purpose.
            let n = s.read(&fp, off, &mut out[3..]).unwrap();
            let expect = (want as u64).min(len - off) as usize;
            assert_eq!(n, expect, "offset {off} want {want}");
            assert_eq!(&out[3..3 + n], &bytes[off as usize..off as usize + n]);
            assert!(out[3 + n..].iter().all(|&b| b == 0xAA), "wrote past n");
        }
    }
    assert!(matches!(
        s.read(&fp, len + 1, &mut [0; 4]),
        Err(StoreError::OutOfRange { offset, len: l }) if offset == len + 1 && l == len
    ));
    let missing = Fingerprint([9; 16]);
    assert!(
        matches!(s.read(&missing, 0, &mut [0; 4]), Err(StoreError::NotFound(f)) if f == missing)
    );
}

#[test]
fn dedup_counts_references() {
    let disk = MemDisk::new(4 * MIB, 5);
    let c = cfg(16 * KIB);
    let mut s = open(std::slice::from_ref(&disk), &c);
    let bytes = data(6, 50_000);
    let a = put(&mut s, &bytes, 3000).unwrap();
    let b = put(&mut s, &bytes, 7000).unwrap();
    assert!(!a.deduplicated && b.deduplicated);
    assert_eq!(b.refcount, 2);
    assert_eq!(a.fingerprint, b.fingerprint);
    assert_eq!(s.counters().dedup_hits, 1);
    let fp = a.fingerprint;
    drop(s);
    let mut s = open(std::slice::from_ref(&disk), &c);
    assert_eq!(s.get(&fp).unwrap().refcount, 2);
    assert_eq!(s.delete(&fp).unwrap(), 1);
    assert_eq!(get_all(&mut s, &fp).unwrap(), bytes);
    drop(s);
    let mut s = open(std::slice::from_ref(&disk), &c);
    assert_eq!(s.get(&fp).unwrap().refcount, 1);
    assert_eq!(s.delete(&fp).unwrap(), 0);
    assert!(s.get(&fp).is_none());
    assert!(matches!(s.delete(&fp), Err(StoreError::NotFound(_))));
    assert!(matches!(
        s.read(&fp, 0, &mut [0; 1]),
        Err(StoreError::NotFound(_))
    ));
    check_accounting(&s);
    drop(s);
    let s = open(&[disk], &c);
    assert!(s.get(&fp).is_none());
    assert!(s.contents().is_empty());
}

#[test]
fn interleaved_writes() {
    let disk = MemDisk::new(8 * MIB, 6);
    let c = cfg(16 * KIB);
    let mut s = open(std::slice::from_ref(&disk), &c);
    let objs: Vec<Vec<u8>> = (0..5)
        .map(|i| data(200 + i, 20_000 + i as usize * 13_001))
        .collect();
    let ids: Vec<WriteId> = objs.iter().map(|_| s.begin().unwrap()).collect();
    let mut pos = vec![0usize; objs.len()];
    let mut rng = StdRng::seed_from_u64(1);
    while pos.iter().zip(&objs).any(|(p, o)| *p < o.len()) {
        let i = rng.gen_range(0..objs.len());
        let n = rng.gen_range(0..9000).min(objs[i].len() - pos[i]);
        s.append(ids[i], &objs[i][pos[i]..pos[i] + n]).unwrap();
        pos[i] += n;
    }
    assert_eq!(s.disks()[0].outstanding_ops, 5);
    s.abort(ids[2]);
    let mut fps = Vec::new();
    for i in [4, 0, 3, 1] {
        let r = s.commit(ids[i]).unwrap();
        assert_eq!(r.fingerprint, Fingerprint::of(&objs[i]));
        fps.push((i, r.fingerprint));
    }
    assert_eq!(s.disks()[0].outstanding_ops, 0);
    assert!(matches!(s.commit(ids[2]), Err(StoreError::UnknownWrite)));
    assert!(s.get(&Fingerprint::of(&objs[2])).is_none());
    check_accounting(&s);
    assert!(
        s.disks()[0].bytes_dead > 0,
        "aborted write's segments are dead"
    );
    drop(s);
    let mut s = open(&[disk], &c);
    for (i, fp) in fps {
        assert_eq!(get_all(&mut s, &fp).unwrap(), objs[i]);
    }
    assert_eq!(s.contents().len(), 4);
}

#[test]
fn abort_leaves_nothing() {
    let disk = MemDisk::new(4 * MIB, 7);
    let c = cfg(16 * KIB);
    let mut s = open(std::slice::from_ref(&disk), &c);
    let id = s.begin().unwrap();
    s.append(id, &data(1, 100_000)).unwrap();
    s.abort(id);
    s.abort(id); // twice is harmless
    assert!(matches!(s.append(id, b"x"), Err(StoreError::UnknownWrite)));
    assert!(s.contents().is_empty());
    s.checkpoint().unwrap();
    drop(s);
    let s = open(&[disk], &c);
    assert!(s.contents().is_empty());
    assert_eq!(s.disks()[0].objects_used, 0);
}

#[test]
fn an_object_that_breaks_its_expectations_is_refused_before_any_write() {
    let disk = MemDisk::new(4 * MIB, 8);
    let c = cfg(64 * KIB);
    let mut s = open(std::slice::from_ref(&disk), &c);
    let bytes = data(3, 10_000);
    let fp = Fingerprint::of(&bytes);
    let stage = |s: &mut Store, bytes: &[u8]| {
        let id = s.begin().unwrap();
        s.append(id, bytes).unwrap();
        id
    };
    let refused = [
        // The client said 10 000 bytes and sent 4 000 (LAST came early).
        (
            Expect {
                md5: None,
                len: Some(10_000),
            },
            &bytes[..4000],
            Mismatched::Len,
        ),
        (
            Expect {
                md5: Some(fp),
                len: None,
            },
            &bytes[..4000],
            Mismatched::Md5,
        ),
        // Both promised: the length is reported, and a right length with a wrong MD5.
        (
            Expect {
                md5: Some(fp),
                len: Some(10_000),
            },
            &bytes[..9999],
            Mismatched::Len,
        ),
        (
            Expect {
                md5: Some(Fingerprint::ZERO),
                len: Some(10_000),
            },
            &bytes[..],
            Mismatched::Md5,
        ),
    ];
    for (expect, sent, want) in refused {
        let aborts = s.counters().aborts;
        let writes = disk.stats().writes;
        let id = stage(&mut s, sent);
        match s.commit_expect(id, &expect) {
            Err(StoreError::Mismatch {
                what,
                len,
                fingerprint,
                ..
            }) => {
                assert_eq!(what, want);
                assert_eq!(len, sent.len() as u64);
                assert_eq!(fingerprint, Fingerprint::of(sent));
            }
            other => panic!("{expect:?}: {other:?}"),
        }
        assert_eq!(
            disk.stats().writes,
            writes,
            "nothing written for {expect:?}"
        );
        assert_eq!(s.counters().aborts, aborts + 1);
        assert!(s.contents().is_empty());
        assert!(matches!(s.commit(id), Err(StoreError::UnknownWrite)));
    }
    // Kept promises commit as usual; a refused copy of a stored object adds no reference.
    let id = stage(&mut s, &bytes);
    let done = s
        .commit_expect(
            id,
            &Expect {
                md5: Some(fp),
                len: Some(10_000),
            },
        )
        .unwrap();
    assert_eq!((done.fingerprint, done.len, done.refcount), (fp, 10_000, 1));
    let id = stage(&mut s, &bytes);
    let wrong = Expect {
        md5: None,
        len: Some(1),
    };
    assert!(matches!(
        s.commit_expect(id, &wrong),
        Err(StoreError::Mismatch { .. })
    ));
    assert_eq!(s.get(&fp).unwrap().refcount, 1);
    let id = stage(&mut s, &bytes);
    assert!(s.commit_expect(id, &Expect::NONE).unwrap().deduplicated);
    check_accounting(&s);
    drop(s);
    let s = open(&[disk], &c);
    assert_eq!(s.contents().len(), 1);
    assert_eq!(s.get(&fp).unwrap().refcount, 2);
}

/// Blocks of a checkpoint body holding `objects` objects with `extents` extents.
pub(super) fn ckpt_body_blocks(objects: u64, extents: u64) -> u64 {
    (objects * 32 + extents * 12).div_ceil(4096)
}

#[test]
fn clean_reopen_reads_headers_only() {
    let disk = MemDisk::new(16 * MIB, 8);
    let c = cfg(64 * KIB);
    let mut s = open(std::slice::from_ref(&disk), &c);
    let mut objs = Vec::new();
    for i in 0..20 {
        let bytes = data(300 + i, 150_000);
        objs.push((put(&mut s, &bytes, 65536).unwrap().fingerprint, bytes));
    }
    s.checkpoint().unwrap();
    let records: u64 = s.index.values().map(|e| e.extents.len() as u64).sum();
    drop(s);
    let before = disk.stats();
    let mut s = open(std::slice::from_ref(&disk), &c);
    let read = disk.stats().bytes_read - before.bytes_read;
    // Superblocks and checkpoint headers, the checkpoint body, and the block where the
    // scan stops: no record header at all.
    let body = ckpt_body_blocks(20, records);
    assert_eq!(read, 16384 + (body + 1) * 4096, "open read payload");
    for (fp, bytes) in &objs {
        assert_eq!(&get_all(&mut s, fp).unwrap(), bytes);
    }
    // Without a checkpoint, durable_seq in the headers still spares the data reads
    // of everything before the last flush.
    let extra = put(&mut s, &data(1, 150_000), 65536).unwrap();
    drop(s);
    let before = disk.stats();
    let mut s = open(std::slice::from_ref(&disk), &c);
    let read = disk.stats().bytes_read - before.bytes_read;
    // The same checkpoint, the headers after it (3, and where the scan stops), and the
    // data of the one object written after the last flush (3 headers, 37 blocks),
    // which is verified.
    assert_eq!(read, 16384 + (body + 4) * 4096 + 40 * 4096);
    assert_eq!(
        get_all(&mut s, &extra.fingerprint).unwrap(),
        data(1, 150_000)
    );
}

#[test]
fn corrupt_data_is_reported_never_returned() {
    let disk = MemDisk::new(4 * MIB, 9);
    let c = cfg(16 * KIB);
    let mut s = open(std::slice::from_ref(&disk), &c);
    let bytes = data(10, 40_000);
    let fp = put(&mut s, &bytes, 4096).unwrap().fingerprint;
    let ext = s.index.at(&fp).extents[1];
    // Second block of the second segment: object bytes 16384+4096 .. 16384+8192.
    disk.corrupt(ext.hdr + 2 * 4096 + 17, 1);
    let mut out = vec![0u8; bytes.len()];
    assert!(
        matches!(s.read(&fp, 0, &mut out), Err(StoreError::Corrupt { fp: f, disk: DiskId(0) }) if f == fp)
    );
    let mut one = [0u8; 1];
    assert!(matches!(
        s.read(&fp, 16384 + 4096 + 17, &mut one),
        Err(StoreError::Corrupt { .. })
    ));
    // Blocks around it still read fine.
    let mut part = vec![0u8; 4096];
    assert_eq!(s.read(&fp, 16384, &mut part).unwrap(), 4096);
    assert_eq!(&part[..], &bytes[16384..20480]);
    assert_eq!(s.read(&fp, 16384 + 8192, &mut part).unwrap(), 4096);
    assert_eq!(&part[..], &bytes[16384 + 8192..16384 + 12288]);
    assert!(s.counters().corrupt_blocks >= 2);
    assert!(s.disks()[0].errors >= 2);
    let last = s.disks()[0].last_error.clone().expect("a last error");
    assert!(last.message.contains("checksum"), "{last:?}");
    assert_eq!(state(&s, 0), DiskState::Online, "rot is not a disk failure");

    // After a clean restart (data not re-verified at open) it is still caught, and
    // compaction moves it without laundering the checksum.
    let other = data(11, 9000);
    let fp2 = put(&mut s, &other, 9000).unwrap().fingerprint;
    s.checkpoint().unwrap();
    drop(s);
    let mut s = open(std::slice::from_ref(&disk), &c);
    assert!(matches!(
        s.read(&fp, 0, &mut out),
        Err(StoreError::Corrupt { .. })
    ));
    s.compact(DiskId(0)).unwrap();
    assert!(s.index.at(&fp).extents[0].hdr != ext.hdr, "moved");
    assert!(matches!(
        s.read(&fp, 0, &mut out),
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(s.read(&fp, 16384, &mut part).unwrap(), 4096);
    assert_eq!(&part[..], &bytes[16384..20480]);
    assert_eq!(get_all(&mut s, &fp2).unwrap(), other);

    // A rotten segment header is reported on read; compaction moves the object with
    // checksums that can never match, so it keeps reading as corrupt.
    let hdr = s.index.at(&fp2).extents[0].hdr;
    disk.corrupt(hdr + 200, 1);
    s.hdr_cache.forget_disk(DiskId(0));
    assert!(matches!(
        s.read(&fp2, 0, &mut out),
        Err(StoreError::Corrupt { .. })
    ));
    s.compact(DiskId(0)).unwrap();
    assert!(matches!(
        s.read(&fp2, 0, &mut out),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(get_all(&mut s, &fp2).is_err());
}

/// Damage is counted on the disk that holds it — per object (once, however often it
/// is read) and per bad block — and the disk's last error names the object, whether a
/// read or compaction found it; deleting the object takes it off the count.
#[test]
fn corruption_is_counted_on_its_disk_per_object() {
    let disks = [MemDisk::new(4 * MIB, 40), MemDisk::new(4 * MIB, 41)];
    let c = cfg(16 * KIB);
    let mut s = open(&disks, &c);
    let fps: Vec<Fingerprint> = (0..4)
        .map(|i| {
            put(&mut s, &data(60 + i, 20_000), 5000)
                .unwrap()
                .fingerprint
        })
        .collect();
    let (bad, by_compaction) = (fps[0], fps[1]);
    let on = |s: &Store, fp: &Fingerprint| usize::from(s.index.at(fp).disk.0);
    let (d_bad, d_comp) = (on(&s, &bad), on(&s, &by_compaction));
    for fp in [bad, by_compaction] {
        let ext = s.index.at(&fp).extents[0];
        disks[on(&s, &fp)].corrupt(ext.hdr + 4096 + 5, 1);
    }
    let mut out = vec![0u8; 20_000];
    for _ in 0..3 {
        assert!(matches!(
            s.read(&bad, 0, &mut out),
            Err(StoreError::Corrupt { .. })
        ));
    }
    let r = s.disks()[d_bad].clone();
    assert_eq!((r.corrupt_objects, r.corrupt_blocks, r.errors), (1, 3, 3));
    let last = r.last_error.expect("a last error");
    assert!(
        last.message.contains(&bad.to_hex()) && last.message.contains("on read"),
        "{last:?}"
    );
    let healthy = 1 - d_bad;
    if d_comp != d_bad {
        assert_eq!(s.disks()[healthy].corrupt_objects, 0);
    }

    // Nobody reads the other damaged object; compaction meets it while moving it.
    s.checkpoint().unwrap();
    drop(s);
    let mut s = open(&disks, &c);
    assert!(
        s.disks().iter().all(|r| r.corrupt_objects == 0),
        "since open"
    );
    s.compact(DiskId(d_comp as u16)).unwrap();
    let r = s.disks()[d_comp].clone();
    assert!(r.corrupt_objects >= 1 && r.corrupt_blocks >= 1, "{r:?}");
    let last = r.last_error.expect("a last error");
    assert!(
        last.message.contains(&by_compaction.to_hex()) && last.message.contains("compaction"),
        "{last:?}"
    );
    // Deleting the damaged objects takes them off the count; blocks stay counted.
    for fp in [bad, by_compaction] {
        assert_eq!(s.delete(&fp).unwrap(), 0);
    }
    assert!(s.disks().iter().all(|r| r.corrupt_objects == 0));
    assert!(s.disks()[d_comp].corrupt_blocks >= 1);
    for (i, fp) in fps.iter().enumerate().skip(2) {
        assert_eq!(get_all(&mut s, fp).unwrap(), data(60 + i as u64, 20_000));
    }
}

#[test]
fn rotten_log_header_takes_the_disk_down_instead_of_truncating() {
    // The rotten header of the third object is in the part of the log open must read:
    // all of it without a checkpoint, the part after it with one. Every record after
    // it is acknowledged, so the log cannot be cut there.
    for checkpoint_after in [None, Some(2)] {
        let disk = MemDisk::new(4 * MIB, 34);
        let c = cfg(16 * KIB);
        let mut s = open(std::slice::from_ref(&disk), &c);
        let mut fps = Vec::new();
        for i in 0..6 {
            if checkpoint_after == Some(i) {
                s.checkpoint().unwrap();
            }
            fps.push(
                put(&mut s, &data(i as u64, 9000), 9000)
                    .unwrap()
                    .fingerprint,
            );
        }
        let hdr = s.index.at(&fps[2]).extents[0].hdr;
        drop(s);
        // Inside the header's crc, past its magic and nonce.
        disk.corrupt(hdr + 50, 1);
        assert!(
            matches!(
                Store::open_seeded(devices(std::slice::from_ref(&disk)), c.clone(), 7, 1),
                Err(StoreError::NoUsableDisk)
            ),
            "checkpoint after {checkpoint_after:?}"
        );
    }
}

#[test]
fn rotten_log_header_before_the_checkpoint_is_a_corrupt_object() {
    // Covered by a checkpoint, the header is not read at open: the disk comes up, and
    // the damage is reported where it matters, on reading that object.
    let disk = MemDisk::new(4 * MIB, 34);
    let c = cfg(16 * KIB);
    let mut s = open(std::slice::from_ref(&disk), &c);
    let fps: Vec<_> = (0..6)
        .map(|i| put(&mut s, &data(i, 9000), 9000).unwrap().fingerprint)
        .collect();
    s.checkpoint().unwrap();
    let hdr = s.index.at(&fps[2]).extents[0].hdr;
    drop(s);
    disk.corrupt(hdr + 100, 1);
    let mut s = open(std::slice::from_ref(&disk), &c);
    assert_eq!(s.contents().len(), 6);
    for (i, fp) in fps.iter().enumerate() {
        match get_all(&mut s, fp) {
            Ok(bytes) => assert!(i != 2 && bytes == data(i as u64, 9000)),
            Err(e) => assert!(i == 2 && matches!(e, StoreError::Corrupt { .. }), "{e}"),
        }
    }
}

#[test]
fn full_disk_then_delete_and_compact_makes_room() {
    let disk = MemDisk::new(MIB, 10);
    let c = cfg(16 * KIB);
    let mut s = open(std::slice::from_ref(&disk), &c);
    let mut fps = Vec::new();
    let err = loop {
        let bytes = data(1000 + fps.len() as u64, 60_000);
        match put(&mut s, &bytes, 10_000) {
            Ok(r) => fps.push(r.fingerprint),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, StoreError::NoSpace), "{err}");
    assert!(fps.len() >= 8, "{} objects fit", fps.len());
    // Full: a new object fails at commit with nothing of it left live; one already
    // stored gets a reference instead.
    let full = s.disks()[0].clone();
    assert!(matches!(
        put(&mut s, &data(999, 60_000), 10_000),
        Err(StoreError::NoSpace)
    ));
    let last = fps.len() as u64 - 1;
    let again = put(&mut s, &data(1000 + last, 60_000), 10_000).unwrap();
    assert!(again.deduplicated && again.refcount == 2, "{again:?}");
    assert_eq!(s.disks()[0].objects_used, full.objects_used);
    check_accounting(&s);
    // Delete all but the last two; compaction brings the space back.
    for fp in &fps[..fps.len() - 2] {
        assert_eq!(s.delete(fp).unwrap(), 0);
    }
    let before = s.disks()[0].clone();
    assert!(before.bytes_available > before.bytes_free);
    let r = s.compact(DiskId(0)).unwrap();
    assert!(r.bytes_reclaimed > 0);
    let after = s.disks()[0].clone();
    assert!(
        after.bytes_free > before.bytes_free + 400_000,
        "{before:?} {after:?}"
    );
    check_accounting(&s);
    for fp in &fps[fps.len() - 2..] {
        let i = fps.iter().position(|f| f == fp).unwrap();
        assert_eq!(get_all(&mut s, fp).unwrap(), data(1000 + i as u64, 60_000));
    }
    // And the log wraps around the disk several times without losing anything.
    let mut live = fps[fps.len() - 2..].to_vec();
    for round in 0..60u64 {
        let bytes = data(5000 + round, 30_000 + (round as usize % 7) * 3000);
        let fp = match put(&mut s, &bytes, 7777) {
            Ok(r) => r.fingerprint,
            Err(StoreError::NoSpace) => {
                s.compact(DiskId(0)).unwrap();
                put(&mut s, &bytes, 7777).unwrap().fingerprint
            }
            Err(e) => panic!("{e}"),
        };
        live.push(fp);
        if live.len() > 6 {
            let old = live.remove(2);
            s.delete(&old).unwrap();
        }
        if round % 10 == 9 {
            s.maybe_compact().unwrap();
        }
    }
    assert!(s.vols[0].tail_lp > 3 * s.vols[0].log_len, "log wrapped");
    check_accounting(&s);
    let expect: Vec<_> = live
        .iter()
        .map(|fp| (*fp, get_all(&mut s, fp).unwrap()))
        .collect();
    drop(s);
    let mut s = open(&[disk], &c);
    for (fp, bytes) in &expect {
        assert_eq!(&get_all(&mut s, fp).unwrap(), bytes);
        assert_eq!(Fingerprint::of(bytes), *fp);
    }
    assert_eq!(s.contents().len(), live.len());
    check_accounting(&s);
}

#[test]
fn blank_disk_among_used_ones() {
    let c = cfg(16 * KIB);
    let disks = [MemDisk::new(4 * MIB, 11), MemDisk::new(4 * MIB, 12)];
    let mut s = open(&disks, &c);
    let mut objs = Vec::new();
    for i in 0..6 {
        let b = data(400 + i, 20_000);
        objs.push((put(&mut s, &b, 5000).unwrap().fingerprint, b));
    }
    drop(s);
    let all = [
        MemDisk::new(4 * MIB, 13),
        disks[0].clone(),
        disks[1].clone(),
    ];
    let mut s = open(&all, &c);
    assert!(s.disks().iter().all(|d| d.state == DiskState::Online));
    assert_eq!(s.disks()[0].objects_used, 0);
    for (fp, b) in &objs {
        assert_eq!(&get_all(&mut s, fp).unwrap(), b);
        assert_ne!(s.get(fp).unwrap().disk, DiskId(0));
    }
    // The blank disk has the most free space now.
    assert_eq!(put(&mut s, &data(1, 10), 10).unwrap().disk, DiskId(0));
}

#[test]
fn new_objects_go_to_the_disk_with_most_free_space() {
    let c = cfg(16 * KIB);
    let disks = [
        MemDisk::new(4 * MIB, 14),
        MemDisk::new(6 * MIB, 15),
        MemDisk::new(5 * MIB, 16),
    ];
    let mut s = open(&disks, &c);
    for i in 0..80 {
        let free: Vec<u64> = s.disks().iter().map(|d| d.bytes_free).collect();
        let max = *free.iter().max().unwrap();
        let r = put(&mut s, &data(500 + i, 50_000), 50_000).unwrap();
        assert_eq!(free[usize::from(r.disk.0)], max, "round {i}: {free:?}");
    }
    let used: Vec<u64> = s.disks().iter().map(|d| d.objects_used).collect();
    assert!(used.iter().all(|&n| n > 0), "{used:?}");
}

#[test]
fn corrupt_superblock_takes_only_that_disk_down() {
    let c = cfg(16 * KIB);
    let disks = [MemDisk::new(4 * MIB, 17), MemDisk::new(4 * MIB, 18)];
    let mut s = open(&disks, &c);
    let mut on = [Vec::new(), Vec::new()];
    for i in 0..8 {
        let r = put(&mut s, &data(600 + i, 10_000), 4096).unwrap();
        on[usize::from(r.disk.0)].push(r.fingerprint);
    }
    assert!(!on[0].is_empty() && !on[1].is_empty());
    drop(s);
    disks[0].corrupt(0, 8192);
    let mut s = open(&disks, &c);
    assert_eq!(state(&s, 0), DiskState::Down);
    assert_eq!(state(&s, 1), DiskState::Online);
    for fp in &on[1] {
        assert!(get_all(&mut s, fp).is_ok());
    }
    for fp in &on[0] {
        assert!(s.get(fp).is_none());
    }
    assert_eq!(put(&mut s, &data(1, 100), 100).unwrap().disk, DiskId(1));
    // An operator cannot bring a failed disk back.
    s.set_disk_state(DiskId(0), DiskState::Online);
    assert_eq!(state(&s, 0), DiskState::Down);
    drop(s);
    disks[1].corrupt(4096, 1); // one copy only: the other still holds
    let s = open(&disks, &c);
    assert_eq!(state(&s, 1), DiskState::Online);
    drop(s);
    disks[1].corrupt(0, 1);
    disks[1].corrupt(4096, 1);
    assert!(matches!(
        Store::open_seeded(devices(&disks), c.clone(), 7, 1),
        Err(StoreError::NoUsableDisk)
    ));
}

#[test]
fn unknown_format_version_takes_the_disk_down() {
    let c = cfg(16 * KIB);
    let disks = [MemDisk::new(4 * MIB, 19), MemDisk::new(4 * MIB, 20)];
    drop(open(&disks, &c));
    // Rewrite both copies as version 1 (the format before checkpoints).
    let mut dev = disks[0].device();
    let mut buf = AlignedBuf::new(8192);
    dev.read_at(0, &mut buf).unwrap();
    buf[8] = 1;
    buf[4096 + 8] = 1;
    dev.write_at(0, &buf).unwrap();
    dev.flush().unwrap();
    let s = open(&disks, &c);
    assert_eq!(state(&s, 0), DiskState::Down);
    assert_eq!(state(&s, 1), DiskState::Online);
}

#[test]
fn device_errors_take_the_disk_down() {
    let c = cfg(16 * KIB);
    let disks = [MemDisk::new(4 * MIB, 21), MemDisk::new(4 * MIB, 22)];
    let mut s = open(&disks, &c);
    let a = put(&mut s, &data(1, 30_000), 30_000).unwrap();
    assert_eq!(a.disk, DiskId(0));
    disks[0].set_faults(Faults {
        fail_writes_after: Some(0),
        ..Faults::default()
    });
    // The next write lands on disk 1 (more free space); make disk 0 the target.
    let b = put(&mut s, &data(2, 30_000), 30_000).unwrap();
    assert_eq!(b.disk, DiskId(1));
    let err = put(&mut s, &data(3, 100), 100).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::DiskFailed {
                disk: DiskId(0),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(state(&s, 0), DiskState::Down);
    assert_eq!(s.disks()[0].errors, 1);
    let last = s.disks()[0].last_error.clone().expect("a last error");
    assert!(last.message.contains("injected fault"), "{last:?}");
    assert!(last.at_unix_ms > 0);
    assert_eq!(s.disks()[1].last_error, None);
    // Its objects are still listed, but unavailable.
    assert_eq!(s.get(&a.fingerprint).unwrap().disk, DiskId(0));
    assert!(matches!(
        s.read(&a.fingerprint, 0, &mut [0; 8]),
        Err(StoreError::DiskFailed { .. })
    ));
    assert!(matches!(
        s.delete(&a.fingerprint),
        Err(StoreError::DiskFailed { .. })
    ));
    // Storing the same object again cannot add a reference on a failed disk.
    assert!(put(&mut s, &data(1, 30_000), 30_000).is_err());
    // The node goes on with the other disk.
    assert_eq!(put(&mut s, &data(4, 100), 100).unwrap().disk, DiskId(1));
    assert_eq!(get_all(&mut s, &b.fingerprint).unwrap(), data(2, 30_000));

    // A read error does the same.
    let ext = s.index.at(&b.fingerprint).extents[0];
    let bad_block = ext.hdr + 4096..ext.hdr + 8192;
    disks[1].set_faults(Faults {
        fail_reads: vec![bad_block],
        ..Faults::default()
    });
    assert!(matches!(
        s.read(&b.fingerprint, 0, &mut [0; 8]),
        Err(StoreError::DiskFailed {
            disk: DiskId(1),
            ..
        })
    ));
    assert_eq!(state(&s, 1), DiskState::Down);
    assert!(matches!(s.begin(), Err(StoreError::NoUsableDisk)));

    // After a restart with healthy devices everything is back.
    for d in &disks {
        d.set_faults(Faults::default());
    }
    drop(s);
    let mut s = open(&disks, &c);
    assert_eq!(get_all(&mut s, &a.fingerprint).unwrap(), data(1, 30_000));
    assert_eq!(get_all(&mut s, &b.fingerprint).unwrap(), data(2, 30_000));
}

#[test]
fn probe_notices_a_disk_that_died_while_idle() {
    let c = cfg(16 * KIB);
    let disks = [MemDisk::new(4 * MIB, 31), MemDisk::new(4 * MIB, 32)];
    let mut s = open(&disks, &c);
    let a = put(&mut s, &data(1, 10_000), 10_000).unwrap();
    assert_eq!(s.probe(), Vec::<DiskId>::new(), "healthy disks stay online");
    disks[1].set_faults(Faults {
        fail_reads: std::iter::once(0..4 * MIB).collect(),
        ..Faults::default()
    });
    assert_eq!(s.probe(), vec![DiskId(1)]);
    assert_eq!(state(&s, 1), DiskState::Down);
    assert_eq!(state(&s, 0), DiskState::Online);
    // A down disk is not probed again; the other keeps serving.
    assert_eq!(s.probe(), Vec::<DiskId>::new());
    assert_eq!(get_all(&mut s, &a.fingerprint).unwrap(), data(1, 10_000));
}

/// The probe as the loop runs it: `probe_start` submits, only `poll` is called (nothing
/// blocks), the failed read takes the disk Down (counted as its error) and the disk is
/// reported once; a second start while a probe is in flight submits nothing.
#[test]
fn async_probe_takes_a_failing_disk_down_and_reports_it() {
    let c = cfg(16 * KIB);
    let disks = [MemDisk::new(4 * MIB, 33), MemDisk::new(4 * MIB, 34)];
    let mut s = open(&disks, &c);
    let a = put(&mut s, &data(1, 10_000), 10_000).unwrap();
    disks[1].set_faults(Faults {
        fail_reads: std::iter::once(0..BLOCK as u64).collect(),
        ..Faults::default()
    });
    let reads_before = disks[0].stats().reads;
    let errors_before = s.disks()[1].errors;
    s.probe_start();
    assert!(s.probing());
    // Not yet polled: nothing is known, nothing is down.
    assert_eq!(state(&s, 1), DiskState::Online);
    s.probe_start();
    let mut events = Vec::new();
    let mut polls = 0;
    while s.probing() {
        s.poll(&mut events);
        polls += 1;
        assert!(polls < 10_000, "probe never completed");
    }
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(
        disks[0].stats().reads - reads_before,
        1,
        "one probe per disk"
    );
    assert_eq!(state(&s, 1), DiskState::Down);
    assert_eq!(state(&s, 0), DiskState::Online);
    assert_eq!(s.disks()[1].errors, errors_before + 1);
    assert_eq!(s.probe_take_down(), vec![DiskId(1)]);
    assert_eq!(s.probe_take_down(), Vec::<DiskId>::new(), "reported once");
    // A down disk is not probed again; the healthy one is, and stays online.
    s.probe_start();
    while s.probing() {
        s.poll(&mut events);
    }
    assert_eq!(disks[0].stats().reads - reads_before, 2);
    assert_eq!(s.probe_take_down(), Vec::<DiskId>::new());
    assert_eq!(get_all(&mut s, &a.fingerprint).unwrap(), data(1, 10_000));
}

#[test]
fn offline_disk_refuses_reads_and_writes() {
    let c = cfg(16 * KIB);
    let disks = [MemDisk::new(4 * MIB, 23), MemDisk::new(4 * MIB, 24)];
    let mut s = open(&disks, &c);
    let a = put(&mut s, &data(1, 5000), 5000).unwrap();
    s.set_disk_state(a.disk, DiskState::Offline);
    assert!(
        matches!(s.read(&a.fingerprint, 0, &mut [0; 8]), Err(StoreError::DiskOffline(d)) if d == a.disk)
    );
    assert!(matches!(
        s.delete(&a.fingerprint),
        Err(StoreError::DiskOffline(_))
    ));
    for i in 0..5 {
        assert_ne!(put(&mut s, &data(10 + i, 5000), 5000).unwrap().disk, a.disk);
    }
    s.set_disk_state(a.disk, DiskState::Down);
    assert!(matches!(
        s.read(&a.fingerprint, 0, &mut [0; 8]),
        Err(StoreError::DiskFailed { .. })
    ));
    s.set_disk_state(a.disk, DiskState::Online);
    assert_eq!(get_all(&mut s, &a.fingerprint).unwrap(), data(1, 5000));
    assert_eq!(s.delete(&a.fingerprint).unwrap(), 0);
}

#[test]
fn limits_busy_too_large_and_bad_config() {
    let disk = MemDisk::new(4 * MIB, 25);
    let mut c = cfg(16 * KIB);
    c.max_open_writes = 2;
    c.max_object_bytes = 10_000;
    let mut s = open(std::slice::from_ref(&disk), &c);
    let a = s.begin().unwrap();
    let b = s.begin().unwrap();
    assert!(matches!(s.begin(), Err(StoreError::Busy)));
    s.append(a, &[1; 9000]).unwrap();
    assert!(matches!(
        s.append(a, &[1; 1001]),
        Err(StoreError::TooLarge { max: 10_000 })
    ));
    assert!(
        matches!(s.commit(a), Err(StoreError::UnknownWrite)),
        "aborted on error"
    );
    s.append(b, &[2; 10_000]).unwrap();
    s.append(b, &[]).unwrap();
    assert_eq!(s.commit(b).unwrap().len, 10_000);
    for bad in [0, 4095, 8 << 20] {
        let mut c = cfg(16 * KIB);
        c.segment_bytes = bad;
        assert!(matches!(
            Store::open_seeded(devices(std::slice::from_ref(&disk)), c, 7, 1),
            Err(StoreError::Format(_))
        ));
    }
    assert!(matches!(
        Store::open_seeded(Vec::new(), cfg(16 * KIB), 7, 1),
        Err(StoreError::NoUsableDisk)
    ));
    // A disk too small for the segment size is Down, not a panic.
    let tiny = MemDisk::new(64 * 1024, 1);
    assert!(matches!(
        Store::open_seeded(devices(&[tiny]), cfg(16 * KIB), 7, 1),
        Err(StoreError::NoUsableDisk)
    ));
}

#[test]
fn maybe_compact_only_when_worth_it() {
    let disk = MemDisk::new(4 * MIB, 26);
    let c = cfg(16 * KIB);
    let mut s = open(std::slice::from_ref(&disk), &c);
    let mut fps = Vec::new();
    for i in 0..20 {
        fps.push(
            put(&mut s, &data(700 + i, 40_000), 40_000)
                .unwrap()
                .fingerprint,
        );
    }
    assert_eq!(s.maybe_compact().unwrap(), None);
    for fp in &fps[..15] {
        s.delete(fp).unwrap();
    }
    let mut steps = 0;
    while let Some(r) = s.maybe_compact().unwrap() {
        assert_eq!(r.disk, Some(DiskId(0)));
        steps += 1;
        assert!(steps < 50);
    }
    assert!(steps >= 1);
    let d = &s.disks()[0];
    assert!(d.bytes_dead * 2 <= s.vols[0].used(), "{d:?}");
    for (i, fp) in fps.iter().enumerate().skip(15) {
        assert_eq!(get_all(&mut s, fp).unwrap(), data(700 + i as u64, 40_000));
    }
    check_accounting(&s);
    assert!(s.counters().compactions >= 1 && s.counters().bytes_reclaimed > 0);
}

#[test]
fn compaction_keeps_open_writes_intact() {
    let disk = MemDisk::new(4 * MIB, 27);
    let c = cfg(16 * KIB);
    let mut s = open(std::slice::from_ref(&disk), &c);
    let dead = put(&mut s, &data(1, 40_000), 40_000).unwrap().fingerprint;
    let open_bytes = data(2, 70_000);
    let w = s.begin().unwrap();
    s.append(w, &open_bytes[..50_000]).unwrap();
    let keep = put(&mut s, &data(3, 40_000), 40_000).unwrap().fingerprint;
    s.delete(&dead).unwrap();
    // The head may move up to the open write's first segment, not past it.
    s.compact(DiskId(0)).unwrap();
    let first = s.writes[&w].first_lp.unwrap();
    assert_eq!(s.vols[0].head_lp, first);
    s.append(w, &open_bytes[50_000..]).unwrap();
    let r = s.commit(w).unwrap();
    assert_eq!(get_all(&mut s, &r.fingerprint).unwrap(), open_bytes);
    assert_eq!(get_all(&mut s, &keep).unwrap(), data(3, 40_000));
    s.compact(DiskId(0)).unwrap();
    drop(s);
    let mut s = open(&[disk], &c);
    assert_eq!(get_all(&mut s, &r.fingerprint).unwrap(), open_bytes);
    assert_eq!(get_all(&mut s, &keep).unwrap(), data(3, 40_000));
    assert!(s.get(&dead).is_none());
}

#[test]
fn refcounts_survive_compaction_and_reopen() {
    let disk = MemDisk::new(4 * MIB, 28);
    let c = cfg(16 * KIB);
    let mut s = open(std::slice::from_ref(&disk), &c);
    let x = data(1, 20_000);
    let fp = put(&mut s, &x, 20_000).unwrap().fingerprint;
    for _ in 0..4 {
        put(&mut s, &x, 20_000).unwrap();
    }
    s.delete(&fp).unwrap();
    assert_eq!(s.get(&fp).unwrap().refcount, 4);
    s.compact(DiskId(0)).unwrap();
    s.delete(&fp).unwrap();
    drop(s);
    let mut s = open(std::slice::from_ref(&disk), &c);
    assert_eq!(s.get(&fp).unwrap().refcount, 3);
    s.compact(DiskId(0)).unwrap();
    s.compact(DiskId(0)).unwrap();
    drop(s);
    let mut s = open(&[disk], &c);
    assert_eq!(s.get(&fp).unwrap().refcount, 3);
    assert_eq!(get_all(&mut s, &fp).unwrap(), x);
}

#[test]
fn flush_failure_is_an_error_and_the_disk_goes_down() {
    let disk = MemDisk::new(4 * MIB, 29);
    let c = cfg(16 * KIB);
    let mut s = open(std::slice::from_ref(&disk), &c);
    let ok = put(&mut s, &data(1, 5000), 5000).unwrap().fingerprint;
    disk.set_faults(Faults {
        fail_flush: true,
        ..Faults::default()
    });
    assert!(matches!(
        put(&mut s, &data(2, 5000), 5000),
        Err(StoreError::DiskFailed { .. })
    ));
    assert_eq!(state(&s, 0), DiskState::Down);
    disk.set_faults(Faults::default());
    disk.crash();
    let mut s = open(&[disk], &c);
    assert_eq!(get_all(&mut s, &ok).unwrap(), data(1, 5000));
    // The failed store may or may not have survived; if it did, it is intact.
    if let Some(m) = s.get(&Fingerprint::of(&data(2, 5000))) {
        assert_eq!(m.len, 5000);
        assert_eq!(
            get_all(&mut s, &Fingerprint::of(&data(2, 5000))).unwrap(),
            data(2, 5000)
        );
    }
}

#[test]
fn same_disk_twice_is_refused() {
    let disk = MemDisk::new(4 * MIB, 30);
    let c = cfg(16 * KIB);
    drop(open(std::slice::from_ref(&disk), &c));
    let s = open(&[disk.clone(), disk], &c);
    assert_eq!(state(&s, 0), DiskState::Online);
    assert_eq!(state(&s, 1), DiskState::Down);
}

#[test]
fn object_on_two_disks_is_merged() {
    // Disk 1 is missing at one open while an object it holds is stored again.
    let c = cfg(16 * KIB);
    let disks = [MemDisk::new(4 * MIB, 31), MemDisk::new(4 * MIB, 32)];
    let x = data(1, 9000);
    let mut s = open(&disks, &c);
    s.set_disk_state(DiskId(0), DiskState::Offline);
    let first = put(&mut s, &x, 9000).unwrap();
    assert_eq!(first.disk, DiskId(1));
    put(&mut s, &x, 9000).unwrap();
    drop(s);
    let mut s = open(&disks[..1], &c);
    assert!(s.get(&first.fingerprint).is_none());
    assert_eq!(put(&mut s, &x, 9000).unwrap().disk, DiskId(0));
    drop(s);
    let s = open(&disks, &c);
    let m = s.get(&first.fingerprint).unwrap();
    assert_eq!((m.disk, m.refcount), (DiskId(0), 3));
    assert_eq!(s.disks()[1].objects_used, 0);
    check_accounting(&s);
    drop(s);
    let s = open(&disks, &c);
    assert_eq!(s.get(&first.fingerprint).unwrap().refcount, 3);
    assert_eq!(s.disks()[1].objects_used, 0);
}

/// Stores as the server does: compacts on demand when only compaction makes room,
/// begins with the size as its hint, appends in `chunk`s.
fn put_hinted(s: &mut Store, bytes: &[u8], chunk: usize) -> Result<Committed, StoreError> {
    let len = bytes.len() as u64;
    if let Room::AfterCompacting(disk) = s.room_for(len) {
        match s.compact(disk) {
            Ok(_) | Err(StoreError::NoSpace) => {}
            Err(e) => return Err(e),
        }
    }
    let id = s.begin_for(len)?;
    for c in bytes.chunks(chunk.max(1)) {
        s.append(id, c)?;
    }
    s.commit(id)
}

/// Stores 16-byte objects (packed, they cost what the smallest does: 96 bytes) while
/// the disk reports
/// more than `down_to` objects available: each must be admitted, and take one off the
/// count unless the store had to compact first.
fn fill_small(s: &mut Store, down_to: u64, seed: &mut u64, stored: &mut Vec<Fingerprint>) {
    let available = |s: &Store| s.disks()[0].objects_available;
    while available(s) > down_to {
        let before = available(s);
        let compacts = s.room_for(16) != Room::Now;
        let bytes = data(*seed, 16);
        *seed += 1;
        let r = put_hinted(s, &bytes, 16).unwrap_or_else(|e| {
            panic!("{before} objects available, but: {e} ({:?})", s.disks()[0])
        });
        assert!(!r.deduplicated);
        stored.push(r.fingerprint);
        if !compacts {
            // One less, or two when its header skipped the last bytes of a block
            // (a packed header never straddles two).
            let now = available(s);
            assert!(
                now == before - 1 || now == before - 2,
                "{before} -> {now}: {:?}",
                s.disks()[0]
            );
        }
    }
}

/// `objects_available` and admission are one rule: while a disk reports room for
/// more of the smallest objects a new one is stored, and when it reports none a new
/// one gets NoSpace with nothing written. A duplicate still gets its reference on the
/// full disk — when it runs out of room part way, when its size hint does not fit,
/// and when the disk has no room at all.
#[test]
fn objects_available_is_what_admission_admits_and_a_full_disk_still_dedups() {
    let disk = MemDisk::new(MIB, 51);
    let c = cfg(16 * KIB);
    let mut s = open(std::slice::from_ref(&disk), &c);
    // Three segments: 20 KiB records, bigger than what is left at the end.
    let big = data(500, 40_000);
    let big_fp = put_hinted(&mut s, &big, 7000).unwrap().fingerprint;
    let mut seed = 600;
    while put_hinted(&mut s, &data(seed, 30_000), 30_000).is_ok() {
        seed += 1;
    }
    let mut small = Vec::new();
    for (left, refs) in [(3, 2), (1, 3)] {
        fill_small(&mut s, left, &mut seed, &mut small);
        // Room for a 20 KiB record or two at most: a duplicate of unknown size runs
        // out of room part way (after one segment, or at its first) and is referenced
        // all the same.
        let r = put(&mut s, &big, 7000).unwrap();
        assert!(r.deduplicated && r.fingerprint == big_fp, "{r:?}");
        assert_eq!(r.refcount, refs);
    }
    fill_small(&mut s, 0, &mut seed, &mut small);
    let (last, last_seed) = (*small.last().unwrap(), seed - 1);
    let full = s.disks()[0].clone();
    assert_eq!(s.room_for(1), Room::Nowhere, "{full:?}");
    // Nothing new of any size is admitted, and refusing writes nothing.
    for len in [0, 1, 4096, 40_000] {
        let bytes = data(seed, len);
        seed += 1;
        let r = put_hinted(&mut s, &bytes, 7000);
        assert!(matches!(r, Err(StoreError::NoSpace)), "{len} bytes: {r:?}");
        let now = s.disks()[0].clone();
        assert_eq!(
            (now.objects_used, now.bytes_free, now.objects_available),
            (full.objects_used, full.bytes_free, 0)
        );
    }
    // Duplicates still are: with a hint that does not fit, and of the smallest size.
    let r = put_hinted(&mut s, &big, 40_000).unwrap();
    assert!(r.deduplicated && r.refcount == 4, "{r:?}");
    let r = put_hinted(&mut s, &data(last_seed, 16), 16).unwrap();
    assert!(r.deduplicated && r.fingerprint == last, "{r:?}");
    assert_eq!(s.disks()[0].objects_used, full.objects_used);
    check_accounting(&s);
    // The references are durable, the refused writes left nothing visible.
    let objects = s.contents().len();
    drop(s);
    let mut s = open(std::slice::from_ref(&disk), &c);
    assert_eq!(s.contents().len(), objects);
    assert_eq!(s.get(&big_fp).unwrap().refcount, 4);
    assert_eq!(s.get(&last).unwrap().refcount, 2);
    assert_eq!(get_all(&mut s, &big_fp).unwrap(), big);
    for fp in &small {
        assert_eq!(get_all(&mut s, fp).unwrap().len(), 16);
    }
    check_accounting(&s);
}

#[test]
fn reports_add_up() {
    let disk = MemDisk::new(4 * MIB, 33);
    let c = cfg(16 * KIB);
    let mut s = open(std::slice::from_ref(&disk), &c);
    let a = put(&mut s, &data(1, 100_000), 100_000).unwrap().fingerprint;
    put(&mut s, &data(2, 100_000), 100_000).unwrap();
    s.delete(&a).unwrap();
    let r = s.disks()[0].clone();
    assert_eq!(r.bytes_available, r.bytes_free + r.bytes_dead);
    // The smallest object costs 96 bytes (packed), and admission keeps its own size
    // and two blocks for a WRAP and whole-block writes once — or, counting what
    // compaction would reclaim, a segment (16 KiB here) for one that moving live
    // records may cause.
    let now = (r.bytes_free - 96 - 8192) / 96;
    let after_compacting = (r.bytes_available - 16 * 1024) / 96;
    assert_eq!(r.objects_available, now.max(after_compacting));
    assert_eq!(r.objects_used, 1);
    assert!(r.bytes_dead >= 100_000);
    let n = s.counters().clone();
    assert_eq!((n.stores, n.deletes), (2, 1));
}

/// The per-disk I/O counters see every call that reached the device, from format and
/// recovery on: they agree with the in-memory disk's own count of successful calls.
#[test]
fn disk_io_counters_match_the_device() {
    let c = cfg(16 * KIB);
    let disks = [MemDisk::new(4 * MIB, 31), MemDisk::new(4 * MIB, 32)];
    let check = |s: &Store| {
        for (d, r) in disks.iter().zip(s.disks()) {
            let m = d.stats();
            assert_eq!(
                r.io,
                super::DiskIo {
                    read_ops: m.reads,
                    read_bytes: m.bytes_read,
                    write_ops: m.writes,
                    write_bytes: m.bytes_written,
                    flushes: m.flushes,
                },
                "disk {}",
                r.id.0
            );
        }
    };
    let mut s = open(&disks, &c);
    check(&s);
    let a = put(&mut s, &data(1, 50_000), 50_000).unwrap();
    check(&s);
    let i = usize::from(a.disk.0);
    let after = s.disks()[i].io;
    assert!(
        after.write_bytes >= 50_000 && after.flushes >= 1,
        "{after:?}"
    );
    assert_eq!(get_all(&mut s, &a.fingerprint).unwrap(), data(1, 50_000));
    check(&s);
    assert!(s.disks()[i].io.read_bytes >= 50_000);
    s.delete(&a.fingerprint).unwrap();
    check(&s);
    // Counters start again at each open, and count the recovery's reads too.
    drop(s);
    let base: Vec<_> = disks.iter().map(MemDisk::stats).collect();
    let s = open(&disks, &c);
    for ((d, r), b) in disks.iter().zip(s.disks()).zip(base) {
        assert_eq!(r.io.read_ops, d.stats().reads - b.reads);
        assert_eq!(r.io.flushes, d.stats().flushes - b.flushes);
        assert!(r.io.read_ops > 0);
        assert_eq!(r.last_error, None);
    }
}

/// What the index costs per object, as `/metrics` reports it: printed for the README's
/// memory arithmetic, and bounded so that a change which bloats it is noticed.
#[test]
fn index_bytes_per_small_object() {
    let disks = [MemDisk::new(512 * MIB, 77)];
    let mut s = open(&disks, &cfg(64 * KIB));
    let n = 20_000u32;
    for i in 0..n {
        put(&mut s, &i.to_le_bytes(), 16).unwrap();
    }
    let (objects, bytes) = s.index_footprint();
    assert_eq!(objects, u64::from(n));
    let per = bytes / objects;
    eprintln!("index: {bytes} bytes for {objects} objects, {per} B per object");
    // The goal: 32 bytes per object (a 28-byte slot and the chunks' slack).
    assert!(per <= 32, "{per} B per object");
}

/// The hot-object cache: a second read of a small object is served from memory (no
/// device read) with the same bytes; a deleted object is never served from it; an
/// object whose bytes rotted on disk is never cached, and a cached object read whole
/// from memory is the one its fingerprint names.
#[test]
fn the_cache_serves_verified_bytes_and_forgets_deleted_objects() {
    let disk = MemDisk::new(4 * MIB, 21);
    let c = StoreConfig {
        cache_bytes: 1 << 20,
        ..cfg(16 * KIB)
    };
    let mut s = open(std::slice::from_ref(&disk), &c);
    let small = data(30, 3000);
    let fp = put(&mut s, &small, 4096).unwrap().fingerprint;
    assert_eq!(get_all(&mut s, &fp).unwrap(), small);
    let reads = disk.stats().reads;
    // Hits: whole and in part, and no device read.
    assert_eq!(get_all(&mut s, &fp).unwrap(), small);
    let mut part = [0u8; 10];
    assert_eq!(s.read(&fp, 100, &mut part).unwrap(), 10);
    assert_eq!(&part[..], &small[100..110]);
    assert_eq!(disk.stats().reads, reads, "served from the cache");
    assert!(s.cache_stats().hits >= 2 && s.cache_stats().objects == 1);

    // Deleted: gone from the cache at once, and a fresh store of the same bytes is
    // read from its new record.
    assert_eq!(s.delete(&fp).unwrap(), 0);
    assert!(matches!(
        s.read(&fp, 0, &mut part),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.cache_stats().objects, 0);

    // Rot on disk before the first read: the read fails, nothing is cached, and the
    // next read goes to the disk and fails again.
    let other = data(31, 2000);
    let fp2 = put(&mut s, &other, 4096).unwrap().fingerprint;
    let hdr = s.index.at(&fp2).extents[0].hdr;
    // A byte of its data, behind its packed header.
    disk.corrupt(hdr + 80 + 5, 1);
    let mut out = vec![0u8; other.len()];
    assert!(matches!(
        s.read(&fp2, 0, &mut out),
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(s.cache_stats().objects, 0, "rotten bytes were cached");
    assert!(matches!(
        s.read(&fp2, 0, &mut out),
        Err(StoreError::Corrupt { .. })
    ));

    // A cache of 0 bytes holds nothing.
    let c0 = StoreConfig {
        cache_bytes: 0,
        ..cfg(16 * KIB)
    };
    drop(s);
    let disk0 = MemDisk::new(4 * MIB, 22);
    let mut s = open(std::slice::from_ref(&disk0), &c0);
    let fp3 = put(&mut s, &small, 4096).unwrap().fingerprint;
    get_all(&mut s, &fp3).unwrap();
    let reads = disk0.stats().reads;
    get_all(&mut s, &fp3).unwrap();
    assert!(disk0.stats().reads > reads);
}

/// GET_CONTENTS walks the index by cursor: pieces in fingerprint order, every object
/// present throughout listed exactly once although others come and go between pieces,
/// objects not yet acknowledged never listed.
#[test]
fn contents_walk_by_cursor_survives_changes_between_pieces() {
    let disks = [MemDisk::new(64 * MIB, 23)];
    let mut s = open(&disks, &cfg(16 * KIB));
    let mut kept = Vec::new();
    for i in 0..300u32 {
        kept.push(put(&mut s, &i.to_le_bytes(), 16).unwrap().fingerprint);
    }
    kept.sort_unstable();
    let doomed: Vec<Fingerprint> = kept.iter().copied().step_by(7).collect();
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut round = 0u32;
    loop {
        let last = s.contents_after(cursor, 40, |fp, d| {
            assert_eq!(d, DiskId(0));
            seen.push(fp);
        });
        let Some(fp) = last else { break };
        cursor = Some(fp);
        // Between pieces: delete some objects, store new ones.
        if round < 5 {
            for fp in doomed.iter().skip(round as usize * 5).take(5) {
                s.delete(fp).unwrap();
            }
            put(&mut s, &(1000 + round).to_le_bytes(), 16).unwrap();
        }
        round += 1;
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order, no repeats");
    let deleted: std::collections::HashSet<_> = doomed.iter().take(25).collect();
    for fp in &kept {
        if !deleted.contains(fp) {
            assert!(
                seen.binary_search(fp).is_ok(),
                "{fp} present throughout, not listed"
            );
        }
    }
    // A commit in flight is not listed.
    let id = s.begin().unwrap();
    s.append(id, b"in flight").unwrap();
    s.commit_start(id, &Expect::NONE, 7).unwrap();
    let fp = Fingerprint::of(b"in flight");
    let mut all = Vec::new();
    s.contents_after(None, usize::MAX, |f, _| all.push(f));
    assert!(!all.contains(&fp));
    assert_eq!(s.objects(), all.len() as u64);
}

/// Stores `n` distinct objects of `len` bytes, `at_once` open at a time (committed
/// together, so that their records share flushes and, packed, blocks), and returns
/// the bytes of log each takes as the disk reports it.
fn log_bytes_per_object(len: usize, n: usize, at_once: usize) -> f64 {
    let disk = MemDisk::new(64 * MIB, 61);
    let mut s = open(std::slice::from_ref(&disk), &cfg(64 * KIB));
    let mut seed = 0u64;
    while seed < n as u64 {
        let batch: Vec<(WriteId, Vec<u8>)> = (0..at_once.min(n - seed as usize))
            .map(|_| {
                seed += 1;
                (s.begin_for(len as u64).unwrap(), data(seed, len))
            })
            .collect();
        for (i, (id, bytes)) in batch.iter().enumerate() {
            s.append(*id, bytes).unwrap();
            s.commit_start(*id, &Expect::default(), i as u64).unwrap();
        }
        s.settle();
        let mut events = Vec::new();
        s.poll(&mut events);
    }
    let r = &s.disks()[0];
    assert_eq!(r.objects_used, n as u64);
    check_accounting(&s);
    r.bytes_used as f64 / n as f64
}

/// Small objects share blocks: measured by what the disk reports (`bytes_used` over
/// `objects_used`), stored one at a time (each commit its own flush, the tail's block
/// written again each time) and 16 at once (one group commit).
#[test]
fn small_objects_are_packed_into_shared_blocks() {
    for at_once in [1, 16] {
        let kib1 = log_bytes_per_object(1024, 3000, at_once);
        assert!(kib1 <= 1.25 * 1024.0, "1 KiB objects: {kib1} bytes each");
        let kib4 = log_bytes_per_object(4096, 3000, at_once);
        assert!(kib4 <= 4.5 * 1024.0, "4 KiB objects: {kib4} bytes each");
        let tiny = log_bytes_per_object(10, 3000, at_once);
        assert!(tiny <= 100.0, "10-byte objects: {tiny} bytes each");
        eprintln!("{at_once} at once: bytes of log per object: 1 KiB {kib1:.1}, 4 KiB {kib4:.1}, 10 B {tiny:.1}");
    }
}

/// A power cut tearing the rewrite of a shared block (in any mix of its old and new
/// 512-byte sectors) never damages the acknowledged records already in it.
#[test]
fn a_torn_rewrite_of_a_shared_block_keeps_the_records_before() {
    for seed in 0..40 {
        let disk = MemDisk::new(4 * MIB, 100 + seed);
        let c = cfg(64 * KIB);
        let mut s = open(std::slice::from_ref(&disk), &c);
        let acked: Vec<(Fingerprint, Vec<u8>)> = (0..5)
            .map(|i| {
                let b = data(seed * 100 + i, 700);
                (put(&mut s, &b, 700).unwrap().fingerprint, b)
            })
            .collect();
        // Three more join the same block, written but never flushed.
        for i in 0..3 {
            let id = s.begin().unwrap();
            s.append(id, &data(seed * 100 + 50 + i, 900)).unwrap();
            s.commit_start(id, &Expect::default(), 7).unwrap();
        }
        let mut events = Vec::new();
        s.poll(&mut events);
        drop(s);
        disk.crash();
        let mut s = open(std::slice::from_ref(&disk), &c);
        for (fp, b) in &acked {
            assert_eq!(&get_all(&mut s, fp).unwrap(), b, "seed {seed}");
        }
        assert!(s.contents().len() >= acked.len());
        check_accounting(&s);
    }
}
