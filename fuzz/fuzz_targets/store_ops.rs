//! The object store driven by arbitrary operation sequences on a fault-injecting memory
//! disk: stores, deletes, compaction, power loss, and bit flips anywhere on the disk
//! followed by recovery. Whatever happens, nothing panics and no read returns bytes
//! that differ from what the fingerprint names.
#![no_main]

use dataplane::store::{DiskId, Store, StoreConfig};
use dosp::Fingerprint;
use libfuzzer_sys::fuzz_target;
use md5::{Digest, Md5};
use nvme::mem::MemDisk;

const DISK_BYTES: u64 = 2 << 20;

fn open(disks: &[MemDisk]) -> Option<Store> {
    let cfg = StoreConfig {
        segment_bytes: 16 * 1024,
        ..StoreConfig::default()
    };
    let devs: Vec<Box<dyn nvme::BlockDevice>> =
        disks.iter().map(|d| Box::new(d.device()) as _).collect();
    Store::open(devs, cfg, 7).ok()
}

fn check_all(store: &mut Store) {
    for (fp, _) in store.contents() {
        let Some(meta) = store.get(&fp) else { continue };
        let mut buf = vec![0u8; meta.len as usize];
        if store.read(&fp, 0, &mut buf).is_ok() {
            assert_eq!(
                Fingerprint(Md5::digest(&buf).into()),
                fp,
                "read returned wrong bytes"
            );
        }
    }
}

fuzz_target!(|ops: &[u8]| {
    let disks = [MemDisk::new(DISK_BYTES, 1), MemDisk::new(DISK_BYTES, 2)];
    let Some(mut store) = open(&disks) else {
        return;
    };
    let mut known: Vec<Fingerprint> = Vec::new();
    let mut it = ops.chunks(4);
    for op in it.by_ref().take(64) {
        let arg = |i: usize| op.get(i).copied().unwrap_or(0) as usize;
        match arg(0) % 6 {
            0 => {
                let len = arg(1) * 131 + arg(2);
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + arg(3)) as u8).collect();
                if let Ok(w) = store.begin() {
                    if store.append(w, &data).is_ok() {
                        if let Ok(c) = store.commit(w) {
                            known.push(c.fingerprint);
                        }
                    }
                }
            }
            1 => {
                if !known.is_empty() {
                    let fp = known[arg(1) % known.len()];
                    let _ = store.delete(&fp);
                }
            }
            2 => {
                drop(store);
                disks[arg(1) % 2].crash();
                let Some(s) = open(&disks) else { return };
                store = s;
            }
            3 => {
                drop(store);
                let offset = ((arg(1) << 8 | arg(2)) as u64 * 64) % DISK_BYTES;
                disks[arg(3) % 2].corrupt(offset, 1 + arg(3) % 8);
                let Some(s) = open(&disks) else { return };
                store = s;
            }
            4 => {
                let _ = store.compact(DiskId((arg(1) % 2) as u16));
            }
            _ => {
                if !known.is_empty() {
                    let fp = known[arg(1) % known.len()];
                    if let Some(meta) = store.get(&fp) {
                        let off = (arg(2) as u64 * 97).min(meta.len);
                        let mut buf = vec![0u8; arg(3) * 61];
                        let _ = store.read(&fp, off, &mut buf);
                    }
                }
            }
        }
        check_all(&mut store);
    }
});
