//! Compaction steps in the background: stores, deletes and dedups interleaved with
//! every point of a step, and power cuts at every point of one. After each (re)open
//! the index is the model's and the full scan's: nothing acknowledged is lost,
//! nothing deleted comes back, no refcount is counted twice or lost.

use std::collections::{HashMap, HashSet};

use nvme::mem::MemDisk;

use super::checkpoint_tests::{index_of, logs_of, without_checkpoints};
use super::tests::{cfg, check_accounting, data, devices, get_all, put, succeeded};
use super::*;

/// Users of the operations made while the step runs.
const DEL_SMALL: u64 = 1;
const DEL_BIG: u64 = 2;
const DEDUP_SMALL: u64 = 3;
const DEDUP_BIG: u64 = 4;
const DEL_AGAIN: u64 = 5;
const STORE_AGAIN: u64 = 6;
const STORE_NEW: u64 = 7;
const USERS: usize = 7;

struct Setup {
    disk: MemDisk,
    objects: Vec<Vec<u8>>,
    new: Vec<u8>,
}

/// A disk whose log holds live objects (packed and of several segments) between
/// deleted ones, so that a compaction step moves most of what it reclaims around.
fn setup(seed: u64) -> (Setup, Store) {
    let disk = MemDisk::new(4 << 20, seed);
    let mut s = Store::open_seeded(
        devices(std::slice::from_ref(&disk)),
        cfg(16 * 1024),
        1,
        seed,
    )
    .unwrap();
    let objects: Vec<Vec<u8>> = (0..24)
        .map(|i| {
            let len = match i % 4 {
                0 => 300 + i * 11,
                1 => 3000,
                2 => 40_000 + i * 100,
                _ => 20_000,
            };
            data(seed * 1000 + i as u64, len)
        })
        .collect();
    for o in &objects {
        put(&mut s, o, 7000).unwrap();
    }
    // Every third object deleted: dead space among the live ones.
    for o in objects.iter().step_by(3) {
        s.delete(&Fingerprint::of(o)).unwrap();
    }
    let new = data(seed * 1000 + 999, 25_000);
    (Setup { disk, objects, new }, s)
}

/// Indexes (into `objects`) of the live objects the operations touch: a small and a
/// multi-segment one deleted, a small and a multi-segment one deduplicated, one
/// deleted and stored again.
const SMALL_DEL: usize = 1;
const BIG_DEL: usize = 2;
const SMALL_DEDUP: usize = 4;
const BIG_DEDUP: usize = 5;
const AGAIN: usize = 7;

fn store_async(s: &mut Store, bytes: &[u8], user: u64) {
    let id = s.begin().unwrap();
    for piece in bytes.chunks(7000) {
        s.append(id, piece).unwrap();
    }
    s.commit_start(id, &Expect::NONE, user).unwrap();
}

/// The operations made while the step runs, all in flight at once.
fn act(st: &Setup, s: &mut Store) {
    let fp = |i: usize| Fingerprint::of(&st.objects[i]);
    s.delete_start(&fp(SMALL_DEL), DEL_SMALL).unwrap();
    s.delete_start(&fp(BIG_DEL), DEL_BIG).unwrap();
    store_async(s, &st.objects[SMALL_DEDUP], DEDUP_SMALL);
    store_async(s, &st.objects[BIG_DEDUP], DEDUP_BIG);
    s.delete_start(&fp(AGAIN), DEL_AGAIN).unwrap();
    store_async(s, &st.objects[AGAIN], STORE_AGAIN);
    store_async(s, &st.new, STORE_NEW);
}

/// Runs an urgent compaction pass, polling; the operations go in after `act_at`
/// polls; the run stops after `cut` polls if given (for a power cut). Returns the
/// acknowledged operations, whether everything finished, the bytes the pass scanned,
/// and where the pass was when the operations went in (`None`: over).
fn run(
    st: &Setup,
    s: &mut Store,
    act_at: usize,
    cut: Option<usize>,
) -> (HashSet<u64>, bool, u64, Option<&'static str>) {
    s.compact_soon(DiskId(0));
    let mut acked = HashSet::new();
    let mut events = Vec::new();
    let (mut polls, mut acted, mut scanned, mut acted_mid) = (0usize, false, 0u64, None);
    loop {
        if polls == act_at && !acted {
            acted_mid = s
                .compact_phase()
                .or(s.compacting().then_some("not started"));
            act(st, s);
            acted = true;
        }
        if cut == Some(polls) {
            return (acked, false, scanned, acted_mid);
        }
        if let Some(r) = s.compact_tick() {
            scanned += r.expect("compaction step").bytes_scanned;
        }
        s.poll(&mut events);
        polls += 1;
        for e in events.drain(..) {
            assert!(succeeded(&e), "act_at {act_at}: {e:?}");
            acked.insert(e.user());
        }
        if acted && acked.len() == USERS && !s.compacting() && !s.compact_busy() {
            return (acked, true, scanned, acted_mid);
        }
        assert!(polls < 100_000, "act_at {act_at}: the pass never ends");
    }
}

/// Checks a store against what the operations allow: `acked` are certain, the others
/// may or may not have landed. Every object visible reads back whole.
fn check(s: &mut Store, st: &Setup, acked: &HashSet<u64>, at: &str) {
    let fp = |i: usize| Fingerprint::of(&st.objects[i]);
    let rc = |s: &Store, i: usize| s.get(&fp(i)).map_or(0, |m| m.refcount);
    for (i, o) in st.objects.iter().enumerate() {
        let f = Fingerprint::of(o);
        let got = s.get(&f).map(|m| m.refcount);
        match i {
            _ if i % 3 == 0 => assert_eq!(got, None, "{at}: deleted object {i} is back"),
            SMALL_DEL | BIG_DEL => {
                let user = if i == SMALL_DEL { DEL_SMALL } else { DEL_BIG };
                if acked.contains(&user) {
                    assert_eq!(got, None, "{at}: acknowledged delete of {i} lost");
                } else {
                    assert!(matches!(got, None | Some(1)), "{at}: {i} has {got:?}");
                }
            }
            SMALL_DEDUP | BIG_DEDUP => {
                let user = if i == SMALL_DEDUP {
                    DEDUP_SMALL
                } else {
                    DEDUP_BIG
                };
                let r = rc(s, i);
                if acked.contains(&user) {
                    assert_eq!(r, 2, "{at}: dedup of {i}");
                } else {
                    assert!(r == 1 || r == 2, "{at}: dedup of {i}: refcount {r}");
                }
            }
            AGAIN => {
                // Deleted then stored again: gone only if the store did not land.
                if acked.contains(&STORE_AGAIN) {
                    assert_eq!(got, Some(1), "{at}: object stored again");
                }
                assert!(matches!(got, None | Some(1)), "{at}: {i} has {got:?}");
            }
            _ => assert_eq!(got, Some(1), "{at}: object {i}"),
        }
        if got.is_some() {
            assert_eq!(&get_all(s, &f).unwrap(), o, "{at}: object {i}");
        }
    }
    let nf = Fingerprint::of(&st.new);
    match s.get(&nf) {
        Some(m) => {
            assert_eq!(m.refcount, 1, "{at}: new object");
            assert_eq!(get_all(s, &nf).unwrap(), st.new, "{at}: new object");
        }
        None => assert!(!acked.contains(&STORE_NEW), "{at}: new object lost"),
    }
    for (f, _) in s.contents() {
        let bytes = get_all(s, &f).unwrap();
        assert_eq!(Fingerprint::of(&bytes), f, "{at}");
    }
    check_accounting(s);
}

/// Reopens after a power cut and checks the index two ways (from the checkpoints and
/// by a full scan) and against the operations.
fn reopen_and_check(st: &Setup, acked: &HashSet<u64>, seed: u64, at: &str) -> Store {
    st.disk.crash();
    let one = std::slice::from_ref(&st.disk);
    let twin = without_checkpoints(&st.disk);
    let mut s = Store::open_seeded(devices(one), cfg(16 * 1024), 1, seed).unwrap();
    let full = Store::open_seeded(devices(&[twin]), cfg(16 * 1024), 1, seed).unwrap();
    assert_eq!(index_of(&s), index_of(&full), "{at}: index");
    assert_eq!(logs_of(&s), logs_of(&full), "{at}: logs");
    check(&mut s, st, acked, at);
    s
}

/// Deletes (to zero, and to zero then stored again), dedups and a new store made at
/// every point of a compaction step (each number of polls from its start until it is
/// over), then the step finished: the running index is the model's, and after a
/// power cut and reopen so is the recovered one, from the checkpoint and by a full
/// scan. Also the objects moved with the refcount their dedups gave them.
#[test]
fn deletes_and_dedups_at_every_point_of_a_compaction_step() {
    let mut phases: HashMap<&'static str, u32> = HashMap::new();
    let mut runs = 0u32;
    for seed in 0..3u64 {
        for act_at in 0.. {
            let (st, mut s) = setup(seed);
            let before = s.vols[0].head_seq;
            let (acked, finished, scanned, acted_mid) = run(&st, &mut s, act_at, None);
            let at = format!("seed {seed} act_at {act_at}");
            assert!(finished, "{at}");
            assert!(scanned > 0, "{at}: nothing compacted");
            assert!(s.vols[0].head_seq > before, "{at}");
            check(&mut s, &st, &acked, &format!("{at} (running)"));
            let running = index_of(&s);
            drop(s);
            let s = reopen_and_check(&st, &acked, seed, &at);
            assert_eq!(index_of(&s), running, "{at}: reopened vs running");
            runs += 1;
            let Some(phase) = acted_mid else {
                // The operations came after the pass: every point has been tried.
                break;
            };
            *phases.entry(phase).or_default() += 1;
        }
    }
    eprintln!("{runs} runs; where the step was when the operations came: {phases:?}");
    // "not started": the step begins with their records in flight and waits for them
    // (its settle point).
    for phase in [
        "not started",
        "window",
        "move",
        "durable",
        "head write",
        "head flush",
    ] {
        assert!(
            phases.contains_key(phase),
            "never during {phase}: {phases:?}"
        );
    }
}

/// The power cut after every number of polls of a compaction pass (its window read,
/// moves, flush, superblock write and flush), with deletes, dedups and stores made
/// at its start or in its middle: after each reboot nothing acknowledged is lost,
/// nothing deleted is back, and the recovered index is the full scan's.
#[test]
fn power_cut_at_every_step_of_a_compaction_step() {
    let mut cuts = 0u32;
    for seed in 0..2u64 {
        for act_at in [0usize, 3, 8] {
            for cut in 0.. {
                let (st, mut s) = setup(seed);
                let (acked, finished, _, _) = run(&st, &mut s, act_at, Some(cut));
                drop(s);
                let at = format!("seed {seed} act_at {act_at} cut {cut}");
                reopen_and_check(&st, &acked, seed, &at);
                cuts += 1;
                if finished {
                    break;
                }
            }
        }
    }
    eprintln!("{cuts} power cuts during compaction");
    assert!(cuts > 50, "{cuts}");
}

/// A disk full to the brim (data up to its reserves, then dedup references until even
/// the metadata reserve is used up): a delete gets NoSpace without the loop waiting,
/// and asks for a compaction in the background; once that is over the delete goes
/// through, and everything survives a power cut.
#[test]
fn a_delete_on_a_full_disk_starts_a_background_compaction() {
    let disk = MemDisk::new(2 << 20, 5);
    let one = std::slice::from_ref(&disk);
    let mut s = Store::open_seeded(devices(one), cfg(16 * 1024), 1, 5).unwrap();
    let mut kept = Vec::new();
    for i in 0.. {
        let o = data(5000 + i, 9000);
        match put(&mut s, &o, 9000) {
            Ok(_) => kept.push(o),
            Err(StoreError::NoSpace) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let popular = kept[0].clone();
    let mut refs = 1u32;
    loop {
        match put(&mut s, &popular, 9000) {
            Ok(c) => {
                refs += 1;
                assert_eq!(c.refcount, refs);
            }
            Err(StoreError::NoSpace) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(refs < 100_000);
    }
    // The dedup that failed asked for a compaction already; a delete does the same.
    let victim = Fingerprint::of(&kept[1]);
    assert!(matches!(
        s.delete_start(&victim, 1),
        Err(StoreError::NoSpace)
    ));
    assert!(s.compacting());
    let mut events = Vec::new();
    let mut reclaimed = 0;
    while s.compacting() || s.compact_busy() {
        if let Some(r) = s.compact_tick() {
            reclaimed += r.unwrap().bytes_reclaimed;
        }
        s.poll(&mut events);
    }
    assert!(reclaimed > 0);
    s.delete_start(&victim, 1).unwrap();
    let ev = s.wait_for(1);
    assert!(
        matches!(ev, StoreEvent::Deleted { result: Ok(0), .. }),
        "{ev:?}"
    );
    drop(s);
    disk.crash();
    let mut s = Store::open_seeded(devices(one), cfg(16 * 1024), 1, 6).unwrap();
    assert!(s.get(&victim).is_none());
    assert_eq!(s.get(&Fingerprint::of(&popular)).unwrap().refcount, refs);
    for o in &kept[2..] {
        assert_eq!(&get_all(&mut s, &Fingerprint::of(o)).unwrap(), o);
    }
    check_accounting(&s);
}
