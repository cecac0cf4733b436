//! Property test: random sequences of stores (from a small alphabet, so dedup
//! happens), deletes, half-finished writes, compactions, checkpoints, clean reopens
//! with and without a checkpoint, power cuts (also in the middle of writing a
//! checkpoint) and damaged checkpoint slots, on 2–3 small in-memory disks, against a
//! model `HashMap<Fingerprint, (bytes, refcount)>`. Device faults are only injected
//! into checkpoints immediately followed by a power cut, and a checkpoint changes no
//! object, so every operation has a definite outcome and the model is exact.
//!
//! At every reopen the disks are also opened as copies without their checkpoints: the
//! index rebuilt from checkpoint + tail must equal the one from the full scan, entry
//! for entry (extents, write ids, refcounts) and log for log.

use std::collections::HashMap;

use nvme::mem::{Faults, MemDisk};
use proptest::prelude::*;

use super::checkpoint_tests::{index_of, logs_of, without_checkpoints};
use super::format::BLOCK_U64;
use super::tests::{cfg, check_accounting, data, devices, get_all, put};
use super::*;

const SIZES: [usize; 10] = [
    0, 1, 4095, 4096, 4097, 65_536, 100_000, 300_000, 600_000, 900_000,
];

#[derive(Clone, Debug)]
enum Op {
    /// Store alphabet[i] in chunks of the given size.
    Store(usize, usize),
    Delete(usize),
    /// Begin a store of alphabet[i] and leave it half done (it pins compaction).
    Partial(usize),
    AbortPartial,
    /// Append the rest of the oldest half-done write and commit it (a write that
    /// spans whatever happened meanwhile: checkpoints, compactions).
    FinishPartial,
    /// Checkpoint, then reopen.
    Reopen,
    /// Reopen after a clean stop that wrote no checkpoint.
    ReopenWithoutCheckpoint,
    /// Flip a byte of a checkpoint slot: (disk, slot, header or body, offset).
    DamageCheckpoint(usize, u8, bool, u64),
    /// Fail the k-th device write of a checkpoint on every disk, then cut the power.
    CrashInCheckpoint(u64),
    Compact(u16),
    MaybeCompact,
    Checkpoint,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let n = SIZES.len();
    prop_oneof![
        10 => (0..n, 1..60_000usize).prop_map(|(i, c)| Op::Store(i, c)),
        5 => (0..n).prop_map(Op::Delete),
        3 => (0..n).prop_map(Op::Partial),
        1 => Just(Op::AbortPartial),
        3 => Just(Op::FinishPartial),
        1 => Just(Op::Reopen),
        1 => Just(Op::ReopenWithoutCheckpoint),
        1 => (0..3usize, 0..2u8, any::<bool>(), any::<u64>())
            .prop_map(|(d, slot, header, at)| Op::DamageCheckpoint(d, slot, header, at)),
        1 => (0..6u64).prop_map(Op::CrashInCheckpoint),
        2 => (0..3u16).prop_map(Op::Compact),
        1 => Just(Op::MaybeCompact),
        2 => Just(Op::Checkpoint),
        1 => Just(Op::Crash),
    ]
}

struct Harness {
    disks: Vec<MemDisk>,
    cfg: StoreConfig,
    store: Store,
    model: HashMap<Fingerprint, (usize, u32)>,
    alphabet: Vec<Vec<u8>>,
    /// Half-done writes: their id and alphabet index.
    partial: Vec<(WriteId, usize)>,
    seed: u64,
    /// Times a log went round its disk (summed over reopens).
    wraps: u64,
    /// Disks opened from a checkpoint, and in all (summed over reopens).
    from_checkpoint: u64,
    opened: u64,
}

impl Harness {
    fn reopen(&mut self) {
        self.wraps += self.store.vols.iter().map(|v| v.wraps).sum::<u64>();
        self.partial.clear();
        self.seed += 1;
        let twins: Vec<MemDisk> = self.disks.iter().map(without_checkpoints).collect();
        self.store = Store::open_seeded(devices(&self.disks), self.cfg.clone(), 3, self.seed)
            .expect("reopen");
        for r in self.store.disks() {
            assert_eq!(r.state, DiskState::Online);
        }
        let full = Store::open_seeded(devices(&twins), self.cfg.clone(), 3, self.seed)
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
        self.opened += self.store.vols.len() as u64;
        self.from_checkpoint += self
            .store
            .vols
            .iter()
            .filter(|v| v.ckpt.loaded.is_some())
            .count() as u64;
        // Everything reads back exactly.
        for (fp, (i, _)) in &self.model {
            let bytes = get_all(&mut self.store, fp).expect("read after reopen");
            assert_eq!(&bytes, &self.alphabet[*i]);
        }
    }

    /// A commit of alphabet[i] succeeded.
    fn committed(&mut self, i: usize, c: Committed) {
        let fp = Fingerprint::of(&self.alphabet[i]);
        assert_eq!(c.fingerprint, fp);
        let was = self.model.get(&fp).map(|m| m.1);
        assert_eq!(c.deduplicated, was.is_some());
        let rc = was.unwrap_or(0) + 1;
        assert_eq!(c.refcount, rc);
        self.model.insert(fp, (i, rc));
    }

    fn compact_all(&mut self) {
        for d in 0..self.disks.len() {
            match self.store.compact(DiskId(d as u16)) {
                Ok(_) | Err(StoreError::NoSpace) => {}
                Err(e) => panic!("compact: {e}"),
            }
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Store(i, chunk) => {
                let bytes = self.alphabet[i].clone();
                let fp = Fingerprint::of(&bytes);
                let mut r = put(&mut self.store, &bytes, chunk);
                if matches!(r, Err(StoreError::NoSpace)) {
                    self.compact_all();
                    r = put(&mut self.store, &bytes, chunk);
                }
                match r {
                    Ok(c) => {
                        assert_eq!(c.fingerprint, fp);
                        self.committed(i, c);
                    }
                    // Pinned by half-done writes or genuinely full: nothing changed.
                    Err(StoreError::NoSpace) => {}
                    Err(e) => panic!("store: {e}"),
                }
            }
            Op::Delete(i) => {
                let fp = Fingerprint::of(&self.alphabet[i]);
                match (self.store.delete(&fp), self.model.get_mut(&fp)) {
                    (Ok(left), Some(m)) => {
                        assert_eq!(left + 1, m.1);
                        m.1 = left;
                        if left == 0 {
                            self.model.remove(&fp);
                        }
                    }
                    (Err(StoreError::NotFound(_)), None) => {}
                    (r, m) => panic!("delete: {r:?} with model {:?}", m.map(|m| m.1)),
                }
            }
            Op::Partial(i) => {
                if self.partial.len() < 4 {
                    if let Ok(id) = self.store.begin() {
                        let bytes = &self.alphabet[i];
                        match self.store.append(id, &bytes[..bytes.len() / 2]) {
                            Ok(()) => self.partial.push((id, i)),
                            Err(StoreError::NoSpace) => {}
                            Err(e) => panic!("append: {e}"),
                        }
                    }
                }
            }
            Op::AbortPartial => {
                if !self.partial.is_empty() {
                    let (id, _) = self.partial.remove(0);
                    self.store.abort(id);
                }
            }
            Op::FinishPartial => {
                if !self.partial.is_empty() {
                    let (id, i) = self.partial.remove(0);
                    let bytes = &self.alphabet[i];
                    let r = self
                        .store
                        .append(id, &bytes[bytes.len() / 2..])
                        .and_then(|()| self.store.commit(id));
                    match r {
                        Ok(c) => self.committed(i, c),
                        Err(StoreError::NoSpace) => {}
                        Err(e) => panic!("finish: {e}"),
                    }
                }
            }
            Op::Reopen => {
                self.store.checkpoint().expect("checkpoint");
                self.reopen();
            }
            Op::Compact(d) => {
                if usize::from(d) < self.disks.len() {
                    match self.store.compact(DiskId(d)) {
                        Ok(_) | Err(StoreError::NoSpace) => {}
                        Err(e) => panic!("compact: {e}"),
                    }
                }
            }
            Op::MaybeCompact => {
                self.store.maybe_compact().expect("maybe_compact");
            }
            Op::Checkpoint => self.store.checkpoint().expect("checkpoint"),
            Op::ReopenWithoutCheckpoint => self.reopen(),
            Op::DamageCheckpoint(d, slot, header, at) => {
                if let Some(vol) = self.store.vols.get(d) {
                    let (start, len) = if header {
                        (vol.geo.ckpt_header(slot), BLOCK_U64)
                    } else {
                        (vol.geo.ckpt_body(slot), vol.geo.ckpt_body_bytes())
                    };
                    self.disks[d].corrupt(start + at % len, 1);
                }
            }
            Op::CrashInCheckpoint(k) => {
                for d in &self.disks {
                    d.set_faults(Faults {
                        fail_writes_after: Some(k),
                        ..Faults::default()
                    });
                }
                let _ = self.store.checkpoint();
                for d in &self.disks {
                    d.crash();
                    d.set_faults(Faults::default());
                }
                self.reopen();
            }
            Op::Crash => {
                for d in &self.disks {
                    d.crash();
                }
                self.reopen();
            }
        }
        // After every operation the index is exactly the model.
        let mut want: Vec<_> = self.model.keys().copied().collect();
        want.sort_unstable();
        let got: Vec<_> = self
            .store
            .contents()
            .into_iter()
            .map(|(fp, _)| fp)
            .collect();
        assert_eq!(got, want, "after {op:?}");
        for (fp, (_, rc)) in &self.model {
            assert_eq!(
                self.store.get(fp).map(|m| m.refcount),
                Some(*rc),
                "after {op:?}"
            );
        }
        check_accounting(&self.store);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(
        n_disks in 2..=3usize,
        disk_mib in 4..=6u64,
        seg_kib in prop::sample::select(vec![16usize, 32, 64]),
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..150),
    ) {
        let disks: Vec<MemDisk> = (0..n_disks)
            .map(|i| MemDisk::new(disk_mib << 20, seed ^ i as u64))
            .collect();
        let cfg = cfg(seg_kib * 1024);
        let store = Store::open_seeded(devices(&disks), cfg.clone(), 3, seed).expect("open");
        let mut h = Harness {
            disks,
            cfg,
            store,
            model: HashMap::new(),
            alphabet: SIZES.iter().enumerate().map(|(i, &n)| data(7 + i as u64, n)).collect(),
            partial: Vec::new(),
            seed,
            wraps: 0,
            from_checkpoint: 0,
            opened: 0,
        };
        for op in &ops {
            h.apply(op);
        }
        for d in &h.disks {
            d.crash();
        }
        h.reopen();
        if std::env::var("PROP_STATS").is_ok() {
            eprintln!(
                "ops {} wraps {} disks opened {} from a checkpoint {}",
                ops.len(),
                h.wraps,
                h.opened,
                h.from_checkpoint
            );
        }
    }
}
