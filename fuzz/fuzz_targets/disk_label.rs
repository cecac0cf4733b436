//! Block 0 of a disk, as a broken or hostile disk may hand it to dosd at start-up: the
//! label that carves the disk into one region per dataplane loop. Decoding never
//! panics, and a label it accepts describes regions that lie inside the disk, after
//! the label, aligned, and apart from each other.
#![no_main]

use dataplane::store::label::{decode, Found};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((size, block)) = data.split_first_chunk::<8>() else { return };
    let disk_bytes = u64::from_le_bytes(*size);
    if let Found::Label(l) = decode(block, disk_bytes) {
        let mut end = 4096;
        for k in 0..l.shards {
            let (base, len) = l.region(k);
            assert!(base >= end, "region {k} overlaps what comes before it");
            assert!(base % 4096 == 0 && len % 4096 == 0 && len > 0);
            end = base.checked_add(len).expect("no overflow");
            assert!(end <= disk_bytes, "region {k} runs past the disk");
        }
    }
});
