//! The node's health rule: what makes it `ok`, `degraded` or `failing`, and why.
//!
//! The rule ([`assess`]) is a pure function of the published disk reports, how long
//! each dataplane loop has gone without a turn, the state of the DOSP listener, and the
//! thresholds in force, so it is tested here without a node. The [`Monitor`] is the one
//! place that applies it to the running node — for `/v1/health`, for the heartbeats
//! and for the node-failing announcement alike — and publishes the verdict in the
//! node's state. What it must never do: look at a disk itself (the dataplane owns the
//! disks; this only reads what it published).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use dataplane::handle::DataplaneHandle;
use dataplane::node::{NodeHealth, Verdict};
use dataplane::stats::{ListenerState, NodeStats};
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

impl From<Status> for Verdict {
    fn from(s: Status) -> Verdict {
        match s {
            Status::Ok => Verdict::Ok,
            Status::Degraded => Verdict::Degraded,
            Status::Failing => Verdict::Failing,
        }
    }
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
    /// A dataplane loop has not turned for longer than `dataplane_stall_ms`.
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
    /// The dataplane core concerned, for liveness and listener reasons: loop `n`
    /// runs on core `n + 1` (core 0 is left to the management core and the kernel, ARCHITECTURE.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub core: Option<u16>,
    /// The dataplane loop concerned (thread `dataplane-N`), for liveness and listener
    /// reasons.
    #[serde(rename = "loop", skip_serializing_if = "Option::is_none")]
    pub loop_index: Option<u16>,
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
    /// Time since the dataplane loop that has been quiet longest was last seen to turn.
    pub dataplane_quiet_ms: u64,
}

/// Applies the rule. `quiet[n]` is how long dataplane loop `n` has gone without a
/// turn; any one past the threshold makes the node failing, with that loop named.
/// `listener` is what the dataplane last saw of its DOSP listener (served by loop 0):
/// shedding new connections for want of descriptors degrades the node (it still serves
/// the connections it has); not accepting at all makes it failing.
pub fn assess(
    disks: &[DiskReport],
    quiet: &[Duration],
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
                        loop_index: None,
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
                    loop_index: None,
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
                    loop_index: None,
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
            loop_index: None,
            message: "the dataplane has not published its disks yet".into(),
        });
    }
    if down > t.disks_down_max {
        reasons.push(Reason {
            status: Status::Failing,
            kind: ReasonKind::TooManyDisksDown,
            disk: None,
            core: None,
            loop_index: None,
            message: format!(
                "{down} disks are down, more than disks_down_max = {}",
                t.disks_down_max
            ),
        });
    }
    let ms = |d: &Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    for (n, quiet_ms) in quiet.iter().map(ms).enumerate() {
        if quiet_ms > t.dataplane_stall_ms {
            let n = u16::try_from(n).unwrap_or(u16::MAX);
            reasons.push(Reason {
                status: Status::Failing,
                kind: ReasonKind::DataplaneStalled,
                disk: None,
                core: Some(n.saturating_add(1)),
                loop_index: Some(n),
                message: format!(
                    "dataplane-{n} has not turned for {quiet_ms} ms, more than dataplane_stall_ms = {}",
                    t.dataplane_stall_ms
                ),
            });
        }
    }
    let quiet_ms = quiet.iter().map(ms).max().unwrap_or(0);
    match listener {
        ListenerState::Accepting => {}
        ListenerState::Shedding => reasons.push(Reason {
            status: Status::Degraded,
            kind: ReasonKind::ListenerShedding,
            disk: None,
            core: Some(1),
            loop_index: Some(0),
            message: "the node is out of file descriptors: new DOSP connections are answered BUSY and closed".into(),
        }),
        ListenerState::Stuck => reasons.push(Reason {
            status: Status::Failing,
            kind: ReasonKind::ListenerStuck,
            disk: None,
            core: Some(1),
            loop_index: Some(0),
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
        loop_index: None,
        message,
    }
}

/// Watches the dataplane loops' turn counters ([`dataplane::stats::LoopBeats`]):
/// remembers, per loop, when its counter last changed.
///
/// Sampled on a timer by the management core, so a stall is seen even when nobody
/// asks for `/v1/health`; the lock is only ever taken by the management core.
#[derive(Debug)]
pub struct Liveness {
    seen: Mutex<Vec<(u64, Instant)>>,
}

impl Liveness {
    /// Starts watching from `turns` (by loop number) as of `now`.
    pub fn new(turns: &[u64], now: Instant) -> Liveness {
        Liveness {
            seen: Mutex::new(turns.iter().map(|&t| (t, now)).collect()),
        }
    }

    /// Records a sample of every loop's counter taken at `now`.
    pub fn observe(&self, turns: &[u64], now: Instant) {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The loop count is fixed at start-up; a longer sample only adds loops.
        if seen.len() < turns.len() {
            seen.resize(turns.len(), (u64::MAX, now));
        }
        for (s, &t) in seen.iter_mut().zip(turns) {
            if t != s.0 {
                *s = (t, now);
            }
        }
    }

    /// How long each loop's counter has not changed, as of `now`, by loop number.
    pub fn quiet(&self, now: Instant) -> Vec<Duration> {
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.iter()
            .map(|&(_, at)| now.saturating_duration_since(at))
            .collect()
    }
}

/// What a published verdict is compared by: the status and which rules fired, not
/// their wording (a stalled loop's message changes with every sample).
type VerdictKey = (Status, Vec<(ReasonKind, Option<u16>, Option<u16>)>);

/// The node's health monitor: the one place the health rule is applied to the running
/// node, shared by `/v1/health`, the heartbeats and the announcements.
///
/// Each assessment samples the loops' beats, applies [`assess`] to what the dataplane
/// published, and, when the verdict changed, publishes it in the node's state (which
/// the dataplane's HEARTBEAT answers read) and in the `dosd_health` gauge.
#[derive(Debug)]
pub struct Monitor {
    handle: DataplaneHandle,
    thresholds: Thresholds,
    liveness: Liveness,
    /// The verdict last published; held while publishing, so two assessments at once
    /// publish in order.
    published: Mutex<Option<VerdictKey>>,
}

impl Monitor {
    pub fn new(handle: DataplaneHandle, thresholds: Thresholds, now: Instant) -> Monitor {
        let mut turns = Vec::new();
        handle.beats.turns(&mut turns);
        Monitor {
            liveness: Liveness::new(&turns, now),
            handle,
            thresholds,
            published: Mutex::new(None),
        }
    }

    pub fn thresholds(&self) -> &Thresholds {
        &self.thresholds
    }

    /// Samples every loop's turn counter.
    pub fn observe(&self, now: Instant) {
        let mut turns = Vec::with_capacity(self.handle.beats.loops());
        self.handle.beats.turns(&mut turns);
        self.liveness.observe(&turns, now);
    }

    /// Assesses the node now and publishes the verdict if it changed.
    pub fn assess(&self, now: Instant) -> Health {
        self.observe(now);
        let health = assess(
            &self.handle.disks.snapshot(),
            &self.liveness.quiet(now),
            self.handle.stats.listener_state(),
            &self.thresholds,
        );
        let key: VerdictKey = (
            health.status,
            health
                .reasons
                .iter()
                .map(|r| (r.kind, r.disk, r.loop_index))
                .collect(),
        );
        let mut published = self
            .published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if published.as_ref() != Some(&key) {
            let verdict = Verdict::from(health.status);
            let reasons = health.reasons.iter().map(|r| r.message.clone()).collect();
            self.handle.node.update(|s| {
                s.health = Some(NodeHealth { verdict, reasons });
            });
            let stats = self.handle.stats.mgmt();
            NodeStats::set(&stats.health, verdict.wire().into());
            *published = Some(key);
        }
        health
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
            bytes_used: 0,
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
            &[Duration::from_millis(100)],
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
            &[Duration::ZERO],
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
                &[Duration::ZERO],
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
            &[Duration::ZERO],
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
            assess(
                &[bad.clone()],
                &[Duration::ZERO],
                ListenerState::Accepting,
                &T
            )
            .status,
            Status::Ok
        );
        // On a disk that is down as well, both are said.
        bad.corrupt_objects = 1;
        bad.state = DiskState::Down;
        let kinds: Vec<_> = assess(&[bad], &[Duration::ZERO], ListenerState::Accepting, &T)
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
            &[Duration::ZERO],
            ListenerState::Accepting,
            &T,
        );
        assert_eq!(h.status, Status::Degraded);
        assert_eq!(h.reasons.len(), 1);
        assert_eq!(h.reasons[0].kind, ReasonKind::DiskOffline);
        assert_eq!(h.reasons[0].disk, Some(1));

        let h = assess(
            &[disk(0, DiskState::Down), disk(1, DiskState::Online)],
            &[Duration::ZERO],
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
        let h = assess(&disks, &[Duration::ZERO], ListenerState::Accepting, &T);
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
            assess(&disks, &[Duration::ZERO], ListenerState::Accepting, &loose).status,
            Status::Degraded
        );
        // Offline disks do not count as down.
        let offline = [disk(0, DiskState::Offline), disk(1, DiskState::Offline)];
        assert_eq!(
            assess(&offline, &[Duration::ZERO], ListenerState::Accepting, &T).status,
            Status::Degraded
        );
    }

    #[test]
    fn a_stalled_loop_is_failing_only_past_the_threshold() {
        let disks = [disk(0, DiskState::Online)];
        assert_eq!(
            assess(
                &disks,
                &[Duration::from_millis(2000)],
                ListenerState::Accepting,
                &T
            )
            .status,
            Status::Ok
        );
        let h = assess(
            &disks,
            &[Duration::from_millis(2001)],
            ListenerState::Accepting,
            &T,
        );
        assert_eq!(h.status, Status::Failing);
        assert_eq!(h.reasons[0].kind, ReasonKind::DataplaneStalled);
        assert_eq!(h.reasons[0].core, Some(1));
        assert_eq!(h.reasons[0].loop_index, Some(0));
        assert!(
            h.reasons[0]
                .message
                .starts_with("dataplane-0 has not turned for 2001 ms"),
            "{}",
            h.reasons[0].message
        );
        assert_eq!(h.dataplane_quiet_ms, 2001);
    }

    #[test]
    fn a_stall_of_any_loop_fails_the_node_and_names_that_loop() {
        let disks = [disk(0, DiskState::Online)];
        let turning = Duration::from_millis(100);
        let stalled = Duration::from_millis(2100);
        let h = assess(
            &disks,
            &[turning, stalled, turning],
            ListenerState::Accepting,
            &T,
        );
        assert_eq!(h.status, Status::Failing);
        assert_eq!(h.reasons.len(), 1, "{h:?}");
        let r = &h.reasons[0];
        assert_eq!(
            (r.kind, r.loop_index, r.core),
            (ReasonKind::DataplaneStalled, Some(1), Some(2))
        );
        assert!(
            r.message.contains("dataplane-1 has not turned for 2100 ms"),
            "{}",
            r.message
        );
        assert_eq!(h.dataplane_quiet_ms, 2100);
        let json = serde_json::to_value(r).unwrap();
        assert_eq!((&json["loop"], &json["core"]), (&1.into(), &2.into()));
        // Two stalled: both named, in loop order.
        let h = assess(
            &disks,
            &[stalled, turning, stalled],
            ListenerState::Accepting,
            &T,
        );
        let loops: Vec<_> = h.reasons.iter().map(|r| r.loop_index).collect();
        assert_eq!(loops, [Some(0), Some(2)]);
        // All turning: ok.
        assert_eq!(
            assess(&disks, &[turning; 4], ListenerState::Accepting, &T).status,
            Status::Ok
        );
    }

    #[test]
    fn the_monitor_names_the_stalled_loop_and_publishes_the_verdict() {
        let (handle, _ends) = dataplane::handle::handle_for(2);
        handle.disks.publish(vec![disk(0, DiskState::Online)]);
        let t0 = Instant::now();
        let m = Monitor::new(handle.clone(), T, t0);
        handle.beats.beat(0);
        handle.beats.beat(1);
        let h = m.assess(t0 + Duration::from_millis(100));
        assert_eq!(h.status, Status::Ok);
        let published = handle.node.snapshot().health.clone().unwrap();
        assert_eq!(published.verdict, Verdict::Ok);
        let generation = handle.node.generation();
        // Loop 0 keeps turning, loop 1 stops.
        handle.beats.beat(0);
        let h = m.assess(t0 + Duration::from_millis(1000));
        assert_eq!(h.status, Status::Ok);
        assert_eq!(
            handle.node.generation(),
            generation,
            "nothing new to publish"
        );
        handle.beats.beat(0);
        let h = m.assess(t0 + Duration::from_millis(2200));
        assert_eq!(h.status, Status::Failing);
        assert_eq!(h.reasons[0].loop_index, Some(1));
        let published = handle.node.snapshot().health.clone().unwrap();
        assert_eq!(published.verdict, Verdict::Failing);
        assert!(published.reasons[0].starts_with("dataplane-1 has not turned"));
        assert_eq!(NodeStats::get(&handle.stats.sum().health), 2);
        // It turns again: ok, published.
        handle.beats.beat(1);
        assert_eq!(
            m.assess(t0 + Duration::from_millis(2300)).status,
            Status::Ok
        );
        assert_eq!(
            handle.node.snapshot().health.as_ref().map(|h| h.verdict),
            Some(Verdict::Ok)
        );
    }

    #[test]
    fn a_listener_that_sheds_degrades_and_one_that_cannot_accept_fails() {
        let disks = [disk(0, DiskState::Online)];
        let h = assess(&disks, &[Duration::ZERO], ListenerState::Shedding, &T);
        assert_eq!(h.status, Status::Degraded);
        assert_eq!(h.reasons.len(), 1);
        assert_eq!(h.reasons[0].kind, ReasonKind::ListenerShedding);
        assert!(h.reasons[0].message.contains("file descriptors"));
        let h = assess(&disks, &[Duration::ZERO], ListenerState::Stuck, &T);
        assert_eq!(h.status, Status::Failing);
        assert_eq!(h.reasons[0].kind, ReasonKind::ListenerStuck);
        assert_eq!(
            assess(&disks, &[Duration::ZERO], ListenerState::Accepting, &T).status,
            Status::Ok
        );
    }

    #[test]
    fn no_reports_yet_is_degraded() {
        let h = assess(&[], &[Duration::ZERO], ListenerState::Accepting, &T);
        assert_eq!(h.status, Status::Degraded);
        assert_eq!(h.reasons[0].kind, ReasonKind::NoDiskReports);
    }

    #[test]
    fn liveness_measures_from_the_last_change() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let l = Liveness::new(&[5, 9], t0);
        l.observe(&[5, 10], t0 + s(1));
        assert_eq!(l.quiet(t0 + s(3)), [s(3), s(2)]);
        l.observe(&[6, 10], t0 + s(3));
        assert_eq!(l.quiet(t0 + s(4)), [s(1), s(3)]);
        // A clock sample from before the change never underflows.
        assert_eq!(l.quiet(t0), [Duration::ZERO; 2]);
    }
}
