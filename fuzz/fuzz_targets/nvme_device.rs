//! What an NVMe controller hands back to the driver, from a hostile or broken device:
//! Identify Controller / Namespace, SMART and error log pages, and completion queue
//! entries. None of it may panic the driver; a queue pair fed arbitrary completions
//! must keep its command-id accounting consistent (never more outstanding than
//! submitted, never an id handed out twice).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvme::driver::ident;
use nvme::driver::queue::{Completion, QueuePair};
use nvme::driver::spec::{CommandId, CompletionEntry, StatusField, SubmissionEntry};

fuzz_target!(|data: &[u8]| {
    let _ = ident::parse_identify_controller(data);
    let _ = ident::parse_identify_namespace(data);
    let _ = ident::parse_smart_log(data);
    let _ = ident::parse_error_log_entry(data);

    // A queue pair of 8 entries; the input drives submissions and the bytes of the
    // completion ring the "controller" writes.
    let Some((&ops, rest)) = data.split_first() else { return };
    let mut qp = QueuePair::new(1, 8, 8).expect("valid size");
    let mut sq = vec![SubmissionEntry::default(); 8];
    let mut cq = vec![CompletionEntry::default(); 8];
    let mut out = [Completion { command_id: CommandId(0), status: StatusField(0), dw0: 0 }; 8];
    let mut live = std::collections::HashSet::new();
    for (round, chunk) in rest.chunks(16 * 8).enumerate() {
        for _ in 0..(ops >> (round % 8)) % 8 {
            if let Ok((cid, _tail)) = qp.submit(&mut sq[..], SubmissionEntry::new(2, 1)) {
                assert!(live.insert(cid.0), "command id {} handed out twice", cid.0);
            }
        }
        for (i, e) in chunk.chunks_exact(16).enumerate() {
            let w = |o: usize| u16::from_le_bytes([e[o], e[o + 1]]);
            cq[i] = CompletionEntry {
                dw0: u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                dw1: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                sq_head: w(8),
                sq_id: w(10),
                command_id: w(12),
                status: w(14),
            };
        }
        let p = qp.poll_completions(&cq[..], 8, &mut out);
        assert!(p.completed + p.invalid <= 8);
        for c in &out[..p.completed] {
            assert!(live.remove(&c.command_id.0), "completion for an idle id {}", c.command_id.0);
            let _ = c.status().to_string();
        }
        assert_eq!(qp.outstanding(), live.len());
    }
});
