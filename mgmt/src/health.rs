//! The node's health rule: what makes it `ok`, `degraded` or `failing`, and why.
//!
//! The rule is a pure function of the published disk reports, how long the dataplane
//! loop has gone without a turn, the state of the DOSP listener, and the thresholds in
//! force, so it is tested here without a node. What it must never do: look at a disk itself (the dataplane owns
//! the disks; this only reads what it published).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use dataplane::stats::ListenerState;
use dataplane::store::{DiskReport, DiskState};
use serde::Serialize;
use utoipa::ToSchema;

/// Thresholds written in the configuration and reported by `/v1/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Thresholds {
    /// More disks than this `down` makes the node `failing` (one or more: `degraded`).
    pub disks_down_max: u16,
    /// A dataplane loop that has not turned for longer than this makes the node
    /// `failing`. The loop turns at least every 100 ms when idle.
    pub dataplane_stall_ms: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            disks_down_max: 1,
            dataplane_stall_ms: 2000,
        }
    }
}

/// Overall status, worst first in severity order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Degraded,
    Failing,
}

/// Which rule a reason comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReasonKind {
    /// A disk was taken out of service by an operator.
    DiskOffline,
    /// A disk failed or was set down.
    DiskDown,
    /// More disks are down than `disks_down_max`.
    TooManyDisksDown,
    /// The dataplane loop has not turned for longer than `dataplane_stall_ms`.
    DataplaneStalled,
    /// The dataplane has published no disk reports yet (start-up).
    NoDiskReports,
    /// A disk's device reports a critical warning in its health log (NVMe SMART):
    /// spare below threshold, temperature, degraded reliability, read-only media, or
    /// a failed backup of volatile memory. Replace it before it fails.
    DiskCriticalWarning,
    /// The process is out of file descriptors: new DOSP connections are answered BUSY
    /// and closed; connections already open are served.
    ListenerShedding,
    /// The DOSP listener cannot accept connections at all, not even to refuse them:
    /// new clients wait in the kernel's queue.
    ListenerStuck,
    /// Objects of a disk failed their checksum (found by a read or by compaction):
    /// their bytes are lost on this node and are never served. Restore them from a
    /// replica; the disk's `last_error` names the latest one.
    DiskCorruptObjects,
}

/// The critical warning bits of the NVMe SMART / Health Information log (byte 0), in
/// words an operator can act on.
pub fn critical_warning_text(bits: u8) -> String {
    const NAMES: [&str; 6] = [
        "available spare below threshold",
        "temperature outside its thresholds",
        "reliability degraded by media errors",
        "media placed in read-only mode",
        "volatile memory backup failed",
        "persistent memory region read-only",
    ];
    let mut words: Vec<String> = NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, n)| (*n).to_string())
        .collect();
    if bits & 0xc0 != 0 {
        words.push(format!("reserved bits {:#04x}", bits & 0xc0));
    }
    words.join(", ")
}

/// One reason the node is not `ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Reason {
    /// What this reason alone makes the node.
    pub status: Status,
    pub kind: ReasonKind,
    /// The disk concerned, for disk reasons.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<u16>,
    /// The dataplane core concerned, for liveness reasons.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub core: Option<u16>,
    pub message: String,
}

/// The node's health, as `/v1/health` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Health {
    pub status: Status,
    /// Empty when `ok`.
    pub reasons: Vec<Reason>,
    pub thresholds: Thresholds,
    pub disks_online: u16,
    pub disks_offline: u16,
    pub disks_down: u16,
    /// Time since the dataplane loop was last seen to turn.
    pub dataplane_quiet_ms: u64,
}

/// Applies the rule. `quiet` is how long the (single) dataplane loop has gone without
/// a turn; core ids count from 1 since core 0 is the management core (DESIGN.md §3).
/// `listener` is what the dataplane last saw of its DOSP listener: shedding new
/// connections for want of descriptors degrades the node (it still serves the
/// connections it has); not accepting at all makes it failing.
pub fn assess(
    disks: &[DiskReport],
    quiet: Duration,
    listener: ListenerState,
    t: &Thresholds,
) -> Health {
    let mut reasons = Vec::new();
    let (mut online, mut offline, mut down) = (0u16, 0u16, 0u16);
    for d in disks {
        match d.state {
            DiskState::Online => {
                online += 1;
                if let Some(h) = d.health.filter(|h| h.critical_warning != 0) {
                    reasons.push(Reason {
                        status: Status::Degraded,
                        kind: ReasonKind::DiskCriticalWarning,
                        disk: Some(d.id.0),
                        core: None,
                        message: format!(
                            "disk {} reports a critical warning ({:#04x}): {}",
                            d.id.0,
                            h.critical_warning,
                            critical_warning_text(h.critical_warning)
                        ),
                    });
                }
            }
            DiskState::Offline => {
                offline += 1;
                reasons.push(Reason {
                    status: Status::Degraded,
                    kind: ReasonKind::DiskOffline,
                    disk: Some(d.id.0),
                    core: None,
                    message: format!("disk {} is offline (taken out of service)", d.id.0),
                });
            }
            DiskState::Down => {
                down += 1;
                reasons.push(Reason {
                    status: Status::Degraded,
                    kind: ReasonKind::DiskDown,
                    disk: Some(d.id.0),
                    core: None,
                    message: format!("disk {} is down ({} errors)", d.id.0, d.errors),
                });
            }
        }
    }
    for d in disks.iter().filter(|d| d.corrupt_objects > 0) {
        reasons.push(corrupt_objects_reason(d));
    }
    if disks.is_empty() {
        reasons.push(Reason {
            status: Status::Degraded,
            kind: ReasonKind::NoDiskReports,
            disk: None,
            core: None,
            message: "the dataplane has not published its disks yet".into(),
        });
    }
    if down > t.disks_down_max {
        reasons.push(Reason {
            status: Status::Failing,
            kind: ReasonKind::TooManyDisksDown,
            disk: None,
            core: None,
            message: format!(
                "{down} disks are down, more than disks_down_max = {}",
                t.disks_down_max
            ),
        });
    }
    let quiet_ms = u64::try_from(quiet.as_millis()).unwrap_or(u64::MAX);
    if quiet_ms > t.dataplane_stall_ms {
        reasons.push(Reason {
            status: Status::Failing,
            kind: ReasonKind::DataplaneStalled,
            disk: None,
            core: Some(1),
            message: format!(
                "dataplane core 1 has not turned for {quiet_ms} ms, more than dataplane_stall_ms = {}",
                t.dataplane_stall_ms
            ),
        });
    }
    match listener {
        ListenerState::Accepting => {}
        ListenerState::Shedding => reasons.push(Reason {
            status: Status::Degraded,
            kind: ReasonKind::ListenerShedding,
            disk: None,
            core: Some(1),
            message: "the node is out of file descriptors: new DOSP connections are answered BUSY and closed".into(),
        }),
        ListenerState::Stuck => reasons.push(Reason {
            status: Status::Failing,
            kind: ReasonKind::ListenerStuck,
            disk: None,
            core: Some(1),
            message: "the DOSP listener cannot accept connections: new clients wait unanswered".into(),
        }),
    }
    Health {
        status: reasons.iter().map(|r| r.status).max().unwrap_or(Status::Ok),
        reasons,
        thresholds: *t,
        disks_online: online,
        disks_offline: offline,
        disks_down: down,
        dataplane_quiet_ms: quiet_ms,
    }
}

/// A disk holds objects that failed their checksum: whatever its state, those objects
/// cannot be served from this node, so the node is degraded until they are deleted
/// (and stored again from a good copy).
fn corrupt_objects_reason(d: &DiskReport) -> Reason {
    let n = d.corrupt_objects;
    let mut message = format!(
        "disk {} holds {n} {} that failed {} checksum",
        d.id.0,
        if n == 1 { "object" } else { "objects" },
        if n == 1 { "its" } else { "their" },
    );
    if let Some(e) = &d.last_error {
        message.push_str(&format!("; last error: {}", e.message));
    }
    Reason {
        status: Status::Degraded,
        kind: ReasonKind::DiskCorruptObjects,
        disk: Some(d.id.0),
        core: None,
        message,
    }
}

/// Watches the dataplane's loop counter: remembers when it last changed.
///
/// Sampled on a timer by the management core, so a stall is seen even when nobody
/// asks for `/v1/health`; the lock is only ever taken by the management core.
#[derive(Debug)]
pub struct Liveness {
    seen: Mutex<(u64, Instant)>,
}

impl Liveness {
    pub fn new(turns: u64, now: Instant) -> Liveness {
        Liveness {
            seen: Mutex::new((turns, now)),
        }
    }

    /// Records a sample of the loop counter taken at `now`.
    pub fn observe(&self, turns: u64, now: Instant) {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if turns != seen.0 {
            *seen = (turns, now);
        }
    }

    /// How long the counter has not changed, as of `now`.
    pub fn quiet(&self, now: Instant) -> Duration {
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        now.saturating_duration_since(seen.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::store::DiskId;

    fn disk(id: u16, state: DiskState) -> DiskReport {
        DiskReport {
            id: DiskId(id),
            identity: [id as u8; 16],
            state,
            backend: "file",
            location: format!("disk{id}.img"),
            bytes_total: 1 << 30,
            bytes_free: 1 << 29,
            bytes_available: 1 << 29,
            objects_used: 0,
            objects_available: 1 << 16,
            outstanding_ops: 0,
            bytes_dead: 0,
            errors: 3,
            io: Default::default(),
            last_error: None,
            corrupt_objects: 0,
            corrupt_blocks: 0,
            health: None,
        }
    }

    const T: Thresholds = Thresholds {
        disks_down_max: 1,
        dataplane_stall_ms: 2000,
    };

    #[test]
    fn all_online_and_turning_is_ok() {
        let h = assess(
            &[disk(0, DiskState::Online), disk(1, DiskState::Online)],
            Duration::from_millis(100),
            ListenerState::Accepting,
            &T,
        );
        assert_eq!(h.status, Status::Ok);
        assert!(h.reasons.is_empty());
        assert_eq!((h.disks_online, h.disks_offline, h.disks_down), (2, 0, 0));
        assert_eq!(h.thresholds, T);
    }

    #[test]
    fn a_smart_critical_warning_degrades_and_says_what_it_means() {
        let mut warned = disk(1, DiskState::Online);
        let healthy = nvme::driver::SmartLog {
            temperature_kelvin: 310,
            ..Default::default()
        };
        let mut quiet = disk(0, DiskState::Online);
        quiet.health = Some(healthy);
        warned.health = Some(nvme::driver::SmartLog {
            critical_warning: 0b0000_0110,
            ..healthy
        });
        let h = assess(
            &[quiet.clone(), warned],
            Duration::ZERO,
            ListenerState::Accepting,
            &T,
        );
        assert_eq!(h.status, Status::Degraded);
        assert_eq!(h.reasons.len(), 1);
        assert_eq!(h.reasons[0].kind, ReasonKind::DiskCriticalWarning);
        assert_eq!(h.reasons[0].disk, Some(1));
        let m = &h.reasons[0].message;
        assert!(
            m.contains("0x06") && m.contains("temperature") && m.contains("reliability"),
            "{m}"
        );
        // No health log (file disks) or no warning: nothing to say.
        assert_eq!(
            assess(
                &[quiet, disk(2, DiskState::Online)],
                Duration::ZERO,
                ListenerState::Accepting,
                &T
            )
            .status,
            Status::Ok
        );
        assert!(critical_warning_text(0x80).contains("reserved bits 0x80"));
    }

    #[test]
    fn corrupt_objects_degrade_and_name_the_disk_the_count_and_the_object() {
        let mut bad = disk(1, DiskState::Online);
        bad.corrupt_objects = 2;
        bad.corrupt_blocks = 7;
        bad.last_error = Some(dataplane::store::LastError {
            message: "object 0123abcd failed its checksum on read: bad block".into(),
            at_unix_ms: 1,
        });
        let h = assess(
            &[disk(0, DiskState::Online), bad.clone()],
            Duration::ZERO,
            ListenerState::Accepting,
            &T,
        );
        assert_eq!(h.status, Status::Degraded);
        assert_eq!(h.reasons.len(), 1, "{h:?}");
        let r = &h.reasons[0];
        assert_eq!(
            (r.kind, r.disk, r.status),
            (ReasonKind::DiskCorruptObjects, Some(1), Status::Degraded)
        );
        assert!(
            r.message.contains("disk 1 holds 2 objects") && r.message.contains("0123abcd"),
            "{}",
            r.message
        );
        // Bad blocks alone (the object since deleted) leave the node ok.
        bad.corrupt_objects = 0;
        assert_eq!(
            assess(&[bad.clone()], Duration::ZERO, ListenerState::Accepting, &T).status,
            Status::Ok
        );
        // On a disk that is down as well, both are said.
        bad.corrupt_objects = 1;
        bad.state = DiskState::Down;
        let kinds: Vec<_> = assess(&[bad], Duration::ZERO, ListenerState::Accepting, &T)
            .reasons
            .iter()
            .map(|r| r.kind)
            .collect();
        assert_eq!(
            kinds,
            [ReasonKind::DiskDown, ReasonKind::DiskCorruptObjects]
        );
    }

    #[test]
    fn an_offline_or_down_disk_degrades_and_names_the_disk() {
        let h = assess(
            &[disk(0, DiskState::Online), disk(1, DiskState::Offline)],
            Duration::ZERO,
            ListenerState::Accepting,
            &T,
        );
        assert_eq!(h.status, Status::Degraded);
        assert_eq!(h.reasons.len(), 1);
        assert_eq!(h.reasons[0].kind, ReasonKind::DiskOffline);
        assert_eq!(h.reasons[0].disk, Some(1));

        let h = assess(
            &[disk(0, DiskState::Down), disk(1, DiskState::Online)],
            Duration::ZERO,
            ListenerState::Accepting,
            &T,
        );
        assert_eq!(
            h.status,
            Status::Degraded,
            "one down is within disks_down_max"
        );
        assert_eq!(h.reasons[0].kind, ReasonKind::DiskDown);
        assert_eq!(h.reasons[0].disk, Some(0));
    }

    #[test]
    fn more_disks_down_than_the_threshold_is_failing() {
        let disks = [
            disk(0, DiskState::Down),
            disk(1, DiskState::Down),
            disk(2, DiskState::Online),
        ];
        let h = assess(&disks, Duration::ZERO, ListenerState::Accepting, &T);
        assert_eq!(h.status, Status::Failing);
        assert!(h
            .reasons
            .iter()
            .any(|r| r.kind == ReasonKind::TooManyDisksDown && r.status == Status::Failing));
        // The same disks under a looser threshold only degrade the node.
        let loose = Thresholds {
            disks_down_max: 2,
            ..T
        };
        assert_eq!(
            assess(&disks, Duration::ZERO, ListenerState::Accepting, &loose).status,
            Status::Degraded
        );
        // Offline disks do not count as down.
        let offline = [disk(0, DiskState::Offline), disk(1, DiskState::Offline)];
        assert_eq!(
            assess(&offline, Duration::ZERO, ListenerState::Accepting, &T).status,
            Status::Degraded
        );
    }

    #[test]
    fn a_stalled_loop_is_failing_only_past_the_threshold() {
        let disks = [disk(0, DiskState::Online)];
        assert_eq!(
            assess(
                &disks,
                Duration::from_millis(2000),
                ListenerState::Accepting,
                &T
            )
            .status,
            Status::Ok
        );
        let h = assess(
            &disks,
            Duration::from_millis(2001),
            ListenerState::Accepting,
            &T,
        );
        assert_eq!(h.status, Status::Failing);
        assert_eq!(h.reasons[0].kind, ReasonKind::DataplaneStalled);
        assert_eq!(h.reasons[0].core, Some(1));
        assert_eq!(h.dataplane_quiet_ms, 2001);
    }

    #[test]
    fn a_listener_that_sheds_degrades_and_one_that_cannot_accept_fails() {
        let disks = [disk(0, DiskState::Online)];
        let h = assess(&disks, Duration::ZERO, ListenerState::Shedding, &T);
        assert_eq!(h.status, Status::Degraded);
        assert_eq!(h.reasons.len(), 1);
        assert_eq!(h.reasons[0].kind, ReasonKind::ListenerShedding);
        assert!(h.reasons[0].message.contains("file descriptors"));
        let h = assess(&disks, Duration::ZERO, ListenerState::Stuck, &T);
        assert_eq!(h.status, Status::Failing);
        assert_eq!(h.reasons[0].kind, ReasonKind::ListenerStuck);
        assert_eq!(
            assess(&disks, Duration::ZERO, ListenerState::Accepting, &T).status,
            Status::Ok
        );
    }

    #[test]
    fn no_reports_yet_is_degraded() {
        let h = assess(&[], Duration::ZERO, ListenerState::Accepting, &T);
        assert_eq!(h.status, Status::Degraded);
        assert_eq!(h.reasons[0].kind, ReasonKind::NoDiskReports);
    }

    #[test]
    fn liveness_measures_from_the_last_change() {
        let t0 = Instant::now();
        let l = Liveness::new(5, t0);
        l.observe(5, t0 + Duration::from_secs(1));
        assert_eq!(l.quiet(t0 + Duration::from_secs(3)), Duration::from_secs(3));
        l.observe(6, t0 + Duration::from_secs(3));
        assert_eq!(l.quiet(t0 + Duration::from_secs(4)), Duration::from_secs(1));
        // A clock sample from before the change never underflows.
        assert_eq!(l.quiet(t0), Duration::ZERO);
    }
}
