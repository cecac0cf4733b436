//! The management core's voice on the cluster group: periodic heartbeats and
//! announcements of events (disk down/up, node failing, node leaving).
//!
//! It runs on its own thread and learns everything from the dataplane handle: the disk
//! snapshot the dataplane publishes and the loop-turn counter that proves the dataplane
//! is alive. It compares each snapshot with the previous one, so an event is announced
//! once when it happens (then repeated a bounded number of times with the same seq,
//! because multicast is unreliable). It never touches a disk or the data path.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dataplane::handle::DataplaneHandle;
use dataplane::stats::{ListenerState, NodeStats};
use dataplane::store::{DiskReport, DiskState};

use crate::health::{assess, Status as Health, Thresholds};
use dosp::codec::encode_response;
use dosp::wire::{
    AnnounceKind, AnnounceOut, HeartbeatOut, NodeName, Opcode, OutHead, Status, ALL_DISKS,
};
use zerocopy::IntoBytes;

/// How often the announcer looks at the dataplane's state.
const TICK: Duration = Duration::from_millis(50);

/// Who is speaking and where.
#[derive(Debug, Clone)]
pub struct AnnouncerConfig {
    pub group: SocketAddrV4,
    pub iface: Ipv4Addr,
    pub node_id: u64,
    /// Carried in heartbeats and announcements when the node has one.
    pub node_name: Option<NodeName>,
    pub epoch: u64,
    /// The node's DOSP address, carried in heartbeats.
    pub dosp: SocketAddrV4,
    pub heartbeat_interval: Duration,
    /// Copies of each announcement (the first included).
    pub repeat: u32,
    pub repeat_gap: Duration,
    /// The node health rule's thresholds (shared with `/v1/health`).
    pub thresholds: Thresholds,
}

/// Health as carried on the wire: 0 ok, 1 degraded, 2 failing.
fn health_byte(h: Health) -> u8 {
    match h {
        Health::Ok => 0,
        Health::Degraded => 1,
        Health::Failing => 2,
    }
}

/// The running announcer.
#[derive(Debug)]
pub struct Announcer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Announcer {
    pub fn start(cfg: AnnouncerConfig, handle: DataplaneHandle) -> io::Result<Announcer> {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        sock.bind(&SocketAddr::V4(SocketAddrV4::new(cfg.iface, 0)).into())?;
        // Out of the configured interface only, looped back to listeners on this
        // machine, one hop at most: cluster chatter never leaves the segment.
        sock.set_multicast_if_v4(&cfg.iface)?;
        sock.set_multicast_loop_v4(true)?;
        sock.set_multicast_ttl_v4(1)?;
        let sock: UdpSocket = sock.into();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("mgmt-announce".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || Speaker::new(cfg, handle, sock).run(&stop)
            })?;
        Ok(Announcer {
            stop,
            thread: Some(thread),
        })
    }

    /// Announces node-leaving (all repetitions), then stops.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Pending {
    message: Vec<u8>,
    left: u32,
    next_at: Instant,
}

struct Speaker {
    cfg: AnnouncerConfig,
    handle: DataplaneHandle,
    sock: UdpSocket,
    seq: u32,
    pending: Vec<Pending>,
    last_states: Vec<DiskState>,
    last_health: Health,
    turns: u64,
    turns_seen_at: Instant,
    started: Instant,
}

impl Speaker {
    fn new(cfg: AnnouncerConfig, handle: DataplaneHandle, sock: UdpSocket) -> Speaker {
        let last_states = handle.disks.snapshot().iter().map(|d| d.state).collect();
        let turns = NodeStats::get(&handle.stats.loop_turns);
        Speaker {
            cfg,
            handle,
            sock,
            seq: 0,
            pending: Vec::new(),
            last_states,
            last_health: Health::Ok,
            turns,
            turns_seen_at: Instant::now(),
            started: Instant::now(),
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        let mut next_heartbeat = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let disks = self.handle.disks.snapshot();
            let quiet = self.quiet(now);
            self.disk_events(&disks);
            let listener =
                ListenerState::from_gauge(NodeStats::get(&self.handle.stats.listener_state));
            let assessed = assess(&disks, quiet, listener, &self.cfg.thresholds);
            let health = assessed.status;
            NodeStats::set(&self.handle.stats.health, health_byte(health).into());
            if health == Health::Failing && self.last_health != Health::Failing {
                let reason = assessed
                    .reasons
                    .iter()
                    .find(|r| r.status == Health::Failing)
                    .map(|r| r.message.as_str())
                    .unwrap_or("health threshold crossed");
                self.announce(AnnounceKind::NodeFailing, ALL_DISKS, reason);
            }
            self.last_health = health;
            if now >= next_heartbeat {
                self.heartbeat(&disks, health);
                next_heartbeat = now + self.cfg.heartbeat_interval;
            }
            self.flush(now);
            std::thread::sleep(TICK);
        }
        self.announce(AnnounceKind::NodeLeaving, ALL_DISKS, "clean shutdown");
        // Deliver every repetition still owed, the leaving notice included (bounded:
        // `repeat` copies, `repeat_gap` apart).
        let deadline = Instant::now() + self.cfg.repeat_gap * (self.cfg.repeat + 1);
        while !self.pending.is_empty() && Instant::now() < deadline {
            self.flush(Instant::now());
            std::thread::sleep(self.cfg.repeat_gap.min(TICK));
        }
    }

    /// How long the dataplane loop has gone without a turn.
    fn quiet(&mut self, now: Instant) -> Duration {
        let turns = NodeStats::get(&self.handle.stats.loop_turns);
        if turns != self.turns {
            self.turns = turns;
            self.turns_seen_at = now;
        }
        now.saturating_duration_since(self.turns_seen_at)
    }

    fn disk_events(&mut self, disks: &[DiskReport]) {
        for d in disks {
            let i = usize::from(d.id.0);
            let before = self
                .last_states
                .get(i)
                .copied()
                .unwrap_or(DiskState::Online);
            match (before, d.state) {
                (DiskState::Online, DiskState::Down) => {
                    let reason = format!("down after {} errors", d.errors);
                    self.announce(AnnounceKind::DiskDown, d.id.0, &reason);
                }
                (DiskState::Online, DiskState::Offline) => {
                    self.announce(
                        AnnounceKind::DiskDown,
                        d.id.0,
                        "taken offline by an operator",
                    );
                }
                (DiskState::Offline | DiskState::Down, DiskState::Online) => {
                    self.announce(AnnounceKind::DiskUp, d.id.0, "back in service");
                }
                _ => {}
            }
        }
        self.last_states = disks.iter().map(|d| d.state).collect();
    }

    fn announce(&mut self, kind: AnnounceKind, disk: u16, reason: &str) {
        self.seq = self.seq.wrapping_add(1);
        let out = AnnounceOut::new(
            self.cfg.node_id,
            self.cfg.node_name.as_ref(),
            self.cfg.epoch,
            self.seq,
            kind,
            disk,
            reason,
        );
        let mut message = Vec::new();
        encode_response(&mut message, Opcode::Announce as u16, 0, &[out.as_bytes()]);
        tracing::info!(kind = kind.name(), disk, reason, "announcing");
        self.pending.push(Pending {
            message,
            left: self.cfg.repeat.max(1),
            next_at: Instant::now(),
        });
    }

    fn heartbeat(&mut self, disks: &[DiskReport], health: Health) {
        let online: Vec<&DiskReport> = disks
            .iter()
            .filter(|d| d.state == DiskState::Online)
            .collect();
        let out = HeartbeatOut {
            head: OutHead::new(Status::Success, 0),
            node_id: self.cfg.node_id.into(),
            epoch: self.cfg.epoch.into(),
            uptime_ms: (self.started.elapsed().as_millis() as u64).into(),
            role: 0,
            health: health_byte(health),
            disks_online: (online.len() as u16).into(),
            disks_total: (disks.len() as u16).into(),
            port: self.cfg.dosp.port().into(),
            addr: self.cfg.dosp.ip().octets(),
            ops_outstanding: (NodeStats::get(&self.handle.stats.ops_outstanding) as u32).into(),
            bytes_free: online.iter().map(|d| d.bytes_available).sum::<u64>().into(),
            bytes_total: disks.iter().map(|d| d.bytes_total).sum::<u64>().into(),
            objects: disks.iter().map(|d| d.objects_used).sum::<u64>().into(),
            ops_per_sec: (NodeStats::get(&self.handle.stats.ops_per_sec) as u32).into(),
            reserved1: 0.into(),
            name: NodeName::field(self.cfg.node_name.as_ref()),
        };
        let mut message = Vec::new();
        encode_response(&mut message, Opcode::Heartbeat as u16, 0, &[out.as_bytes()]);
        self.send(&message);
        NodeStats::inc(&self.handle.stats.heartbeats_sent);
    }

    /// Sends every repetition that is due.
    fn flush(&mut self, now: Instant) {
        let group = SocketAddr::V4(self.cfg.group);
        let gap = self.cfg.repeat_gap;
        for p in self.pending.iter_mut().filter(|p| p.next_at <= now) {
            if let Err(e) = self.sock.send_to(&p.message, group) {
                tracing::debug!(error = %e, "announcement send failed");
            }
            p.left -= 1;
            p.next_at = now + gap;
        }
        self.pending.retain(|p| p.left > 0);
    }

    fn send(&self, message: &[u8]) {
        if let Err(e) = self.sock.send_to(message, SocketAddr::V4(self.cfg.group)) {
            tracing::debug!(error = %e, "heartbeat send failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromBytes;

    #[test]
    fn announcements_repeat_a_bounded_number_of_times_then_leave() {
        let (handle, _end) = dataplane::handle::handle_pair();
        let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let SocketAddr::V4(target) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        // Unicast target instead of a group: the sending path is the same.
        let cfg = AnnouncerConfig {
            group: target,
            iface: Ipv4Addr::LOCALHOST,
            node_id: 7,
            node_name: Some(NodeName::new("seven").unwrap()),
            epoch: 3,
            dosp: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7370),
            heartbeat_interval: Duration::from_secs(3600),
            repeat: 3,
            repeat_gap: Duration::from_millis(10),
            thresholds: Thresholds::default(),
        };
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut speaker = Speaker::new(cfg, handle, sock);
        speaker.announce(AnnounceKind::DiskDown, 2, "test");
        let t0 = Instant::now();
        for i in 0..10 {
            speaker.flush(t0 + Duration::from_millis(100) * i);
        }
        let mut copies = 0;
        let mut buf = [0u8; 512];
        while let Ok(n) = listener.recv(&mut buf) {
            let (h, body) = dosp::wire::Header::read_from_prefix(&buf[..n]).unwrap();
            assert_eq!(h.opcode.get(), Opcode::Announce as u16);
            let a = AnnounceOut::read_from_prefix(body).unwrap().0;
            assert_eq!(
                (a.node_id.get(), a.epoch.get(), a.seq.get(), a.disk.get()),
                (7, 3, 1, 2)
            );
            assert_eq!(a.reason(), "test");
            assert_eq!(NodeName::from_field(&a.name).unwrap().as_str(), "seven");
            copies += 1;
            if copies == 3 {
                break;
            }
        }
        assert_eq!(copies, 3);
        assert!(speaker.pending.is_empty(), "no fourth copy is owed");
    }
}
