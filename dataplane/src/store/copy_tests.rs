//! The copy ledger on every storage backend: a STORE copies each payload byte once
//! (receive buffer → staging buffer, MD5 and CRC in that pass), a read copies none
//! (the store lends the buffers the device read into), and a cache fill copies a
//! small object once, after which hits lend the cache entry itself.

use super::format::BLOCK_U64;
use super::tests::{cfg, data, next_seed, put};
use super::*;
use crate::copies::{Copies, Site, SITES};
use nvme::file::FileDevice;
use nvme::mem::MemDisk;

const DISK_BYTES: u64 = 64 << 20;

/// Reads `len` bytes at `offset` and takes the lent piece, waiting if need be.
fn lend(s: &mut Store, fp: &Fingerprint, offset: u64, len: usize) -> Piece {
    match s.read_start(fp, offset, len, 1).expect("read") {
        ReadStart::Ready(p) => p,
        ReadStart::Pending(id) => match s.wait_for(1) {
            StoreEvent::Read { id: got, .. } if got == id => s.read_take(id).expect("take"),
            other => panic!("unexpected event {other:?}"),
        },
    }
}

/// The piece holds exactly `want`, compared part by part (not copied out).
fn assert_holds(p: &Piece, want: &[u8]) {
    assert_eq!(p.len(), want.len());
    let mut at = 0;
    for s in p.slices() {
        assert_eq!(s, &want[at..at + s.len()], "bytes at {at}");
        at += s.len();
    }
    assert_eq!(at, want.len());
}

fn only(site: Site, n: u64) -> [u64; SITES] {
    let mut v = [0; SITES];
    v[site as usize] = n;
    v
}

fn plus(mut a: [u64; SITES], site: Site, n: u64) -> [u64; SITES] {
    a[site as usize] += n;
    a
}

/// The proof on one backend (`devs` opens a fresh set of its devices).
fn copies_on(devs: &dyn Fn() -> Vec<Box<dyn BlockDevice>>) {
    // Small segments: an object spans many extents, and reads cross them.
    let mut c = cfg(64 * 1024);
    c.cache_bytes = 1 << 20;
    c.cache_object_bytes_max = 16 * 1024;
    let mut s = Store::open_seeded(devs(), c, 7, next_seed()).expect("open");
    let ledger = Copies::default();
    s.set_copies(ledger.clone());

    // STORE of N bytes, in chunks that do not line up with blocks: N bytes copied,
    // all at the append.
    let big = data(1, 1_000_003);
    let n = big.len() as u64;
    let fp = put(&mut s, &big, 10_007).expect("store").fingerprint;
    assert_eq!(
        ledger.all(),
        only(Site::Append, n),
        "STORE copies each byte once"
    );

    // RETRIEVE (whole) and RANGEs (inside one block, across extents, with and
    // without a header block in front): nothing copied, the device's buffers lent.
    for (offset, len) in [
        (0, big.len()),
        (5, 17),
        (65_530, 300_000),
        (4096 * 40 + 1, 4096 * 3),
        (n - 9, 9),
    ] {
        let p = lend(&mut s, &fp, offset, len);
        assert!(p.slices().count() >= 1);
        assert_holds(&p, &big[offset as usize..offset as usize + len]);
        s.read_give(p);
        assert_eq!(
            ledger.all(),
            only(Site::Append, n),
            "a read at {offset}+{len} copies nothing"
        );
    }

    // A small object: stored as a packed record (a second copy, into the tail's
    // block image); its first whole read fills the cache (one copy, after the MD5
    // check); hits lend the cache entry itself.
    let small = data(2, 10_000);
    let sfp = put(&mut s, &small, 4096).expect("store").fingerprint;
    let stored = plus(
        only(Site::Append, n + small.len() as u64),
        Site::Pack,
        small.len() as u64,
    );
    assert_eq!(ledger.all(), stored);
    let p = lend(&mut s, &sfp, 0, small.len());
    assert_holds(&p, &small);
    s.read_give(p);
    let filled = plus(stored, Site::CacheFill, small.len() as u64);
    assert_eq!(ledger.all(), filled, "the cache fill is the one copy");
    for (offset, len) in [(0, small.len()), (100, 1000)] {
        let p = match s.read_start(&sfp, offset, len, 1).expect("read") {
            ReadStart::Ready(p) => p,
            ReadStart::Pending(_) => panic!("a cached object is served at once"),
        };
        assert_holds(&p, &small[offset as usize..offset as usize + len]);
        s.read_give(p);
    }
    assert_eq!(ledger.all(), filled, "cache hits copy nothing");
    assert_eq!(s.cache_stats().hits, 2);

    // The blocking read, for tools and tests, copies into its caller's buffer.
    let mut out = vec![0u8; 1000];
    assert_eq!(s.read(&fp, 0, &mut out).expect("read"), 1000);
    assert_eq!(out, big[..1000]);
    assert_eq!(ledger.at(Site::ReadOut), 1000);
    assert_eq!(ledger.at(Site::CrossLoop) + ledger.at(Site::Session), 0);
}

#[test]
fn a_store_copies_each_byte_once_and_a_read_none_on_memory_disks() {
    let disk = MemDisk::new(DISK_BYTES, 1);
    copies_on(&|| vec![Box::new(disk.device()) as Box<dyn BlockDevice>]);
}

#[test]
fn a_store_copies_each_byte_once_and_a_read_none_on_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    copies_on(&|| {
        vec![
            Box::new(FileDevice::open(&path, DISK_BYTES).expect("open file"))
                as Box<dyn BlockDevice>,
        ]
    });
}

#[test]
fn a_read_that_fails_its_checksum_lends_nothing() {
    let disk = MemDisk::new(DISK_BYTES, 1);
    let mut s = Store::open_seeded(
        vec![Box::new(disk.device()) as Box<dyn BlockDevice>],
        cfg(64 * 1024),
        7,
        next_seed(),
    )
    .expect("open");
    let big = data(3, 200_000);
    let c = put(&mut s, &big, 65_536).expect("store");
    // Flip a byte in the object's second data block, wherever the log put it.
    let e = s.index.get(&c.fingerprint).expect("indexed");
    let at = e.extents[0].hdr + BLOCK_U64 + BLOCK_U64 + 7;
    disk.corrupt(at, 1);
    match s.read_start(&c.fingerprint, 0, big.len(), 1).expect("read") {
        ReadStart::Pending(id) => {
            let _ = s.wait_for(1);
            assert!(matches!(s.read_take(id), Err(StoreError::Corrupt { .. })));
        }
        ReadStart::Ready(_) => panic!("not cached"),
    }
}
