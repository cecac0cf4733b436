//! The node's state — who it is, where it can be reached, its role and its health —
//! and the one place it is kept, plus the one builder of the answers that show it
//! (HEARTBEAT, ANNOUNCE).
//!
//! The management core is the only writer: it builds the [`NodeState`] at start-up,
//! publishes it on the [`NodeBoard`], and publishes a new one when something changes
//! (the health verdict; later the role). Everyone else reads an `Arc` snapshot. A
//! dataplane loop keeps its own snapshot in a [`NodeCache`] and looks at the board
//! once per turn: one atomic load of the board's generation, and a lock (a pointer
//! copy) only when the generation moved. What this module must never do: let a
//! dataplane loop write the state, or make a loop take a lock per request.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use dosp::wire::{AnnounceKind, AnnounceOut, HeartbeatOut, NodeName, OutHead, Status};

use crate::stats::Load;
use crate::store::{DiskReport, DiskState};

/// The node's role in a failover pair (dosp/PROTOCOL.md, HEARTBEAT `role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    Standalone,
    Active,
    Passive,
}

impl Role {
    /// The HEARTBEAT `role` byte: 0 standalone, 1 active, 2 passive.
    pub fn wire(self) -> u8 {
        match self {
            Role::Standalone => 0,
            Role::Active => 1,
            Role::Passive => 2,
        }
    }
}

/// The verdict of the node's health rule (the rule itself is the management core's,
/// mgmt/src/health.rs), worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Ok,
    Degraded,
    Failing,
}

impl Verdict {
    /// The HEARTBEAT `health` byte: 0 ok, 1 degraded, 2 failing.
    pub fn wire(self) -> u8 {
        match self {
            Verdict::Ok => 0,
            Verdict::Degraded => 1,
            Verdict::Failing => 2,
        }
    }
}

/// The node's health as last assessed: the verdict and, when it is not `ok`, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHealth {
    pub verdict: Verdict,
    /// One sentence per reason, worst rules first as the assessment found them.
    pub reasons: Vec<String>,
}

/// Where the node can be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The DOSP address (TCP and unicast UDP) other nodes and managers reach the node
    /// at: the bound address, or the multicast interface's when bound to any.
    pub dosp: SocketAddrV4,
    /// The cluster's multicast group.
    pub multicast_group: SocketAddrV4,
    /// The local interface multicast is sent from.
    pub multicast_if: Ipv4Addr,
    /// The management REST endpoint, once it is bound.
    pub mgmt: Option<SocketAddr>,
}

/// Everything the node says about itself: identity, epoch, role, addresses, health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub node_id: u64,
    /// The operator's name for the node, if it was given one.
    pub name: Option<NodeName>,
    /// +1 on every start of the node.
    pub epoch: u64,
    pub role: Role,
    pub addrs: Addresses,
    /// When the node started (uptimes count from here).
    pub started: Instant,
    /// `None` until the management core has assessed the node once.
    pub health: Option<NodeHealth>,
}

impl NodeState {
    /// A standalone node not yet assessed, started now.
    pub fn new(node_id: u64, name: Option<NodeName>, epoch: u64, addrs: Addresses) -> NodeState {
        NodeState {
            node_id,
            name,
            epoch,
            role: Role::Standalone,
            addrs,
            started: Instant::now(),
            health: None,
        }
    }

    /// The name as its wire field (all zero: no name).
    pub fn name_field(&self) -> [u8; dosp::wire::NODE_NAME_MAX] {
        NodeName::field(self.name.as_ref())
    }

    /// Milliseconds since the node started, as of `now`.
    pub fn uptime_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX)
    }
}

/// Unpublished: what a reader sees before the management core's first publication
/// (the node starts its loops only after it, so nothing answers with it).
impl Default for NodeState {
    fn default() -> Self {
        let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
        NodeState::new(
            0,
            None,
            0,
            Addresses {
                dosp: any,
                multicast_group: any,
                multicast_if: Ipv4Addr::UNSPECIFIED,
                mgmt: None,
            },
        )
    }
}

/// Where the management core publishes the [`NodeState`]: a snapshot swapped under a
/// lock held only for a pointer copy, and a generation counter that moves with every
/// publication so a reader can tell, with one atomic load, that it must re-read.
#[derive(Debug, Default)]
pub struct NodeBoard {
    generation: AtomicU64,
    state: Mutex<Arc<NodeState>>,
}

impl NodeBoard {
    /// The latest state (cheap: an `Arc` clone).
    pub fn snapshot(&self) -> Arc<NodeState> {
        Arc::clone(&self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Publications so far; 0 before the first.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Replaces the state. For the management core only.
    pub fn publish(&self, state: NodeState) {
        let fresh = Arc::new(state);
        let mut slot = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = fresh;
        // Under the lock, after the swap: a reader that sees the new generation and
        // then takes the lock finds the new state (or a newer one).
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Publishes a changed copy of the current state. For the management core only
    /// (it is the only writer, so nothing is lost between the read and the publish).
    pub fn update(&self, change: impl FnOnce(&mut NodeState)) {
        let mut state = NodeState::clone(&self.snapshot());
        change(&mut state);
        self.publish(state);
    }
}

/// A dataplane loop's copy of the published state, refreshed once per turn.
#[derive(Debug)]
pub struct NodeCache {
    board: Arc<NodeBoard>,
    seen: u64,
    state: Arc<NodeState>,
}

impl NodeCache {
    pub fn new(board: Arc<NodeBoard>) -> NodeCache {
        let seen = board.generation();
        let state = board.snapshot();
        NodeCache { board, seen, state }
    }

    /// Re-reads the board if the management core published since the last look.
    /// Costs one atomic load when nothing changed. Returns whether it re-read.
    pub fn refresh(&mut self) -> bool {
        let now = self.board.generation();
        if now == self.seen {
            return false;
        }
        self.seen = now;
        self.state = self.board.snapshot();
        true
    }

    pub fn get(&self) -> &NodeState {
        &self.state
    }
}

/// The HEARTBEAT answer (dosp/PROTOCOL.md, HEARTBEAT): the one builder, used by the
/// dataplane's UDP answers and by the management core's periodic heartbeats.
///
/// `disks` are the node's disk reports and `load` the counters summed over every
/// loop. The health byte is the published verdict, but never better than the disks
/// say now: a disk that left service since the last assessment already makes the node
/// degraded (and a node not yet assessed says what its disks say).
pub fn heartbeat(
    state: &NodeState,
    disks: &[DiskReport],
    load: &Load,
    now: Instant,
) -> HeartbeatOut {
    let online = || disks.iter().filter(|d| d.state == DiskState::Online);
    let disks_online = online().count();
    let by_disks = if disks_online < disks.len() {
        Verdict::Degraded
    } else {
        Verdict::Ok
    };
    let health = state
        .health
        .as_ref()
        .map_or(by_disks, |h| h.verdict.max(by_disks));
    HeartbeatOut {
        head: OutHead::new(Status::Success, 0),
        node_id: state.node_id.into(),
        epoch: state.epoch.into(),
        uptime_ms: state.uptime_ms(now).into(),
        role: state.role.wire(),
        health: health.wire(),
        disks_online: u16::try_from(disks_online).unwrap_or(u16::MAX).into(),
        disks_total: u16::try_from(disks.len()).unwrap_or(u16::MAX).into(),
        port: state.addrs.dosp.port().into(),
        addr: state.addrs.dosp.ip().octets(),
        ops_outstanding: u32::try_from(load.ops_outstanding)
            .unwrap_or(u32::MAX)
            .into(),
        bytes_free: online().map(|d| d.bytes_available).sum::<u64>().into(),
        bytes_total: disks.iter().map(|d| d.bytes_total).sum::<u64>().into(),
        objects: disks.iter().map(|d| d.objects_used).sum::<u64>().into(),
        ops_per_sec: u32::try_from(load.ops_per_sec).unwrap_or(u32::MAX).into(),
        reserved1: 0.into(),
        name: state.name_field(),
    }
}

/// An announcement from this node (dosp/PROTOCOL.md, ANNOUNCE): identity and epoch
/// from the state, the rest from the caller.
pub fn announcement(
    state: &NodeState,
    seq: u32,
    kind: AnnounceKind,
    disk: u16,
    reason: &str,
) -> AnnounceOut {
    AnnounceOut::new(
        state.node_id,
        state.name.as_ref(),
        state.epoch,
        seq,
        kind,
        disk,
        reason,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DiskId;
    use std::time::Duration;
    use zerocopy::IntoBytes;

    fn disk(id: u16, state: DiskState) -> DiskReport {
        DiskReport {
            id: DiskId(id),
            identity: [0; 16],
            state,
            backend: "memory",
            location: String::new(),
            bytes_total: 1000,
            bytes_free: 400,
            bytes_available: 500,
            objects_used: 3,
            objects_available: 10,
            outstanding_ops: 0,
            bytes_dead: 0,
            bytes_used: 0,
            errors: 0,
            io: Default::default(),
            last_error: None,
            corrupt_objects: 0,
            corrupt_blocks: 0,
            health: None,
        }
    }

    fn state() -> NodeState {
        NodeState::new(
            0x0102_0304_0506_0708,
            Some(NodeName::new("node-a").unwrap()),
            9,
            Addresses {
                dosp: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 7), 7370),
                multicast_group: SocketAddrV4::new(Ipv4Addr::new(239, 255, 73, 70), 7371),
                multicast_if: Ipv4Addr::new(10, 0, 0, 7),
                mgmt: None,
            },
        )
    }

    #[test]
    fn heartbeat_carries_the_state_the_disks_and_the_load_at_their_offsets() {
        let mut s = state();
        s.health = Some(NodeHealth {
            verdict: Verdict::Ok,
            reasons: Vec::new(),
        });
        let load = Load {
            ops_outstanding: 4,
            ops_per_sec: 250,
            ..Load::default()
        };
        let disks = [disk(0, DiskState::Online), disk(1, DiskState::Online)];
        let out = heartbeat(&s, &disks, &load, s.started + Duration::from_millis(1234));
        let b = out.as_bytes();
        assert_eq!(b.len(), 112);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        assert_eq!(u64_at(8), 0x0102_0304_0506_0708, "node_id");
        assert_eq!(u64_at(16), 9, "epoch");
        assert_eq!(u64_at(24), 1234, "uptime_ms");
        assert_eq!((b[32], b[33]), (0, 0), "role standalone, health ok");
        assert_eq!((u16_at(34), u16_at(36)), (2, 2), "disks online / total");
        assert_eq!(u16_at(38), 7370, "port");
        assert_eq!(&b[40..44], &[10, 0, 0, 7], "addr");
        assert_eq!(u32_at(44), 4, "ops_outstanding");
        assert_eq!(u64_at(48), 1000, "bytes_free: available on online disks");
        assert_eq!(u64_at(56), 2000, "bytes_total");
        assert_eq!(u64_at(64), 6, "objects");
        assert_eq!(u32_at(72), 250, "ops_per_sec");
        assert_eq!(&b[80..86], b"node-a", "name at offset 80");
    }

    #[test]
    fn heartbeat_health_is_the_verdict_but_never_better_than_the_disks() {
        let mut s = state();
        let load = Load::default();
        let all = [disk(0, DiskState::Online), disk(1, DiskState::Online)];
        let one_off = [disk(0, DiskState::Online), disk(1, DiskState::Offline)];
        // Not assessed yet: the disks speak.
        assert_eq!(heartbeat(&s, &all, &load, s.started).health, 0);
        assert_eq!(heartbeat(&s, &one_off, &load, s.started).health, 1);
        let verdict = |v| NodeHealth {
            verdict: v,
            reasons: vec!["why".into()],
        };
        s.health = Some(verdict(Verdict::Failing));
        assert_eq!(heartbeat(&s, &one_off, &load, s.started).health, 2);
        s.health = Some(verdict(Verdict::Ok));
        assert_eq!(heartbeat(&s, &one_off, &load, s.started).health, 1);
        assert_eq!(heartbeat(&s, &all, &load, s.started).health, 0);
        s.role = Role::Passive;
        assert_eq!(heartbeat(&s, &all, &load, s.started).role, 2);
    }

    #[test]
    fn a_cache_rereads_only_after_a_publication() {
        let board = Arc::new(NodeBoard::default());
        assert_eq!(board.generation(), 0);
        let mut cache = NodeCache::new(Arc::clone(&board));
        assert!(!cache.refresh());
        assert_eq!(cache.get().node_id, 0, "unpublished");
        board.publish(state());
        assert!(cache.refresh());
        assert_eq!(cache.get().epoch, 9);
        assert!(!cache.refresh());
        board.update(|s| {
            s.health = Some(NodeHealth {
                verdict: Verdict::Degraded,
                reasons: vec!["disk 1 is offline".into()],
            })
        });
        assert_eq!(board.generation(), 2);
        assert!(cache.refresh());
        assert_eq!(
            cache.get().health.as_ref().map(|h| h.verdict),
            Some(Verdict::Degraded)
        );
        assert_eq!(cache.get().node_id, 0x0102_0304_0506_0708, "the rest kept");
    }

    #[test]
    fn an_announcement_carries_identity_and_epoch() {
        let s = state();
        let a = announcement(&s, 5, AnnounceKind::DiskDown, 1, "down");
        assert_eq!(
            (a.node_id.get(), a.epoch.get(), a.seq.get()),
            (s.node_id, 9, 5)
        );
        assert_eq!(a.reason(), "down");
        assert_eq!(a.name, s.name_field());
    }
}
