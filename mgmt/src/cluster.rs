//! The management core's voice on the cluster group: periodic heartbeats and
//! announcements of events (disk down/up, node failing, node leaving).
//!
//! It runs on its own thread and learns everything from the dataplane handle and the
//! health [`Monitor`]: the node's state (who it is, where it speaks), the disk snapshot
//! the dataplane publishes, and the health verdict. It compares each snapshot with the previous one, so an event is announced
//! once when it happens (then repeated a bounded number of times with the same seq,
//! because multicast is unreliable). It never touches a disk or the data path.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dataplane::handle::DataplaneHandle;
use dataplane::stats::NodeStats;
use dataplane::store::{DiskReport, DiskState};

use crate::health::{Monitor, Status as Health};
use dosp::codec::encode_response;
use dosp::wire::{AnnounceKind, Opcode, ALL_DISKS};
use zerocopy::IntoBytes;

/// How often the announcer looks at the dataplane's state.
const TICK: Duration = Duration::from_millis(50);

/// How often the announcer speaks (who is speaking, and to which group from which
/// interface, is the node's published state).
#[derive(Debug, Clone)]
pub struct AnnouncerConfig {
    pub heartbeat_interval: Duration,
    /// Copies of each announcement (the first included).
    pub repeat: u32,
    pub repeat_gap: Duration,
    /// Speak through the dataplane's own network port (`--net dpdk`: the multicast
    /// interface is an address on the DPDK port, which the kernel does not have): the
    /// datagrams go to loop 0 ([`DataplaneHandle::send_datagram`]), which sends them
    /// from its multicast endpoint. Otherwise a kernel socket on the interface.
    pub via_dataplane: bool,
    /// With a cluster key: heartbeats and announcements are signed with its first key
    /// (dosp/PROTOCOL.md §7).
    pub auth: Option<Arc<dataplane::server::auth::NodeAuth>>,
}

/// Where the speaker's datagrams leave.
enum Outlet {
    Kernel(UdpSocket),
    Dataplane,
}

/// The running announcer.
#[derive(Debug)]
pub struct Announcer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Announcer {
    /// Starts speaking for the node whose state the management core published on
    /// `handle.node` (it must be published first: its interface is bound here).
    pub fn start(
        cfg: AnnouncerConfig,
        handle: DataplaneHandle,
        monitor: Arc<Monitor>,
    ) -> io::Result<Announcer> {
        let out = if cfg.via_dataplane {
            Outlet::Dataplane
        } else {
            let iface: Ipv4Addr = handle.node.snapshot().addrs.multicast_if;
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
            sock.bind(&SocketAddr::V4(SocketAddrV4::new(iface, 0)).into())?;
            // Out of the configured interface only, looped back to listeners on this
            // machine, one hop at most: cluster chatter never leaves the segment.
            sock.set_multicast_if_v4(&iface)?;
            sock.set_multicast_loop_v4(true)?;
            sock.set_multicast_ttl_v4(1)?;
            Outlet::Kernel(sock.into())
        };
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("mgmt-announce".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || Speaker::new(cfg, handle, monitor, out).run(&stop)
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
    monitor: Arc<Monitor>,
    out: Outlet,
    seq: u32,
    pending: Vec<Pending>,
    last_states: Vec<DiskState>,
    last_health: Health,
}

impl Speaker {
    fn new(
        cfg: AnnouncerConfig,
        handle: DataplaneHandle,
        monitor: Arc<Monitor>,
        out: Outlet,
    ) -> Speaker {
        let last_states = handle.disks.snapshot().iter().map(|d| d.state).collect();
        Speaker {
            cfg,
            handle,
            monitor,
            out,
            seq: 0,
            pending: Vec::new(),
            last_states,
            last_health: Health::Ok,
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        let mut next_heartbeat = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let disks = self.handle.disks.snapshot();
            self.disk_events(&disks);
            // Publishes the verdict in the node's state, which the heartbeat reads.
            let assessed = self.monitor.assess(now);
            let health = assessed.status;
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
                self.heartbeat(&disks);
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
        let out = dataplane::node::announcement(
            &self.handle.node.snapshot(),
            self.seq,
            kind,
            disk,
            reason,
        );
        let mut message = Vec::new();
        encode_response(&mut message, Opcode::Announce as u16, 0, &[out.as_bytes()]);
        // Signed once: the repetitions are the same message, which receivers keep once.
        if let Some(auth) = &self.cfg.auth {
            auth.sign(&mut message, 0);
        }
        tracing::info!(kind = kind.name(), disk, reason, "announcing");
        self.pending.push(Pending {
            message,
            left: self.cfg.repeat.max(1),
            next_at: Instant::now(),
        });
    }

    fn heartbeat(&mut self, disks: &[DiskReport]) {
        let out = dataplane::node::heartbeat(
            &self.handle.node.snapshot(),
            disks,
            &self.handle.stats.load(),
            Instant::now(),
        );
        let mut message = Vec::new();
        encode_response(&mut message, Opcode::Heartbeat as u16, 0, &[out.as_bytes()]);
        if let Some(auth) = &self.cfg.auth {
            auth.sign(&mut message, 0);
        }
        self.send(&message);
        let stats = self.handle.stats.mgmt();
        NodeStats::inc(&stats.heartbeats_sent);
    }

    /// Sends every repetition that is due.
    fn flush(&mut self, now: Instant) {
        let gap = self.cfg.repeat_gap;
        let mut pending = std::mem::take(&mut self.pending);
        for p in pending.iter_mut().filter(|p| p.next_at <= now) {
            self.emit(&p.message, "announcement");
            p.left -= 1;
            p.next_at = now + gap;
        }
        pending.retain(|p| p.left > 0);
        self.pending = pending;
    }

    fn send(&self, message: &[u8]) {
        self.emit(message, "heartbeat");
    }

    /// One datagram to the cluster group, through the outlet.
    fn emit(&self, message: &[u8], what: &str) {
        let group = self.handle.node.snapshot().addrs.multicast_group;
        match &self.out {
            Outlet::Kernel(sock) => {
                if let Err(e) = sock.send_to(message, SocketAddr::V4(group)) {
                    tracing::debug!(error = %e, "{what} send failed");
                }
            }
            Outlet::Dataplane => {
                let out = dataplane::handle::Outgoing {
                    to: group,
                    bytes: message.to_vec(),
                };
                if !self.handle.send_datagram(out) {
                    tracing::debug!("{what} dropped: the dataplane's queue is full");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::node::{Addresses, NodeState};
    use dosp::wire::{AnnounceOut, NodeName};
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
        handle.node.publish(NodeState::new(
            7,
            Some(NodeName::new("seven").unwrap()),
            3,
            Addresses {
                dosp: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7370),
                multicast_group: target,
                multicast_if: Ipv4Addr::LOCALHOST,
                mgmt: None,
            },
        ));
        let cfg = AnnouncerConfig {
            heartbeat_interval: Duration::from_secs(3600),
            repeat: 3,
            repeat_gap: Duration::from_millis(10),
            via_dataplane: false,
            auth: None,
        };
        let monitor = Arc::new(Monitor::new(
            handle.clone(),
            crate::Thresholds::default(),
            Instant::now(),
        ));
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut speaker = Speaker::new(cfg, handle, monitor, Outlet::Kernel(sock));
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

    #[test]
    fn through_the_dataplane_heartbeats_go_to_loop_0s_outbox() {
        let (handle, mut ends) = dataplane::handle::handle_for(2);
        let group = SocketAddrV4::new(Ipv4Addr::new(239, 255, 1, 2), 7371);
        handle.node.publish(NodeState::new(
            9,
            None,
            1,
            Addresses {
                dosp: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 7370),
                multicast_group: group,
                multicast_if: Ipv4Addr::new(10, 0, 0, 2),
                mgmt: None,
            },
        ));
        let cfg = AnnouncerConfig {
            heartbeat_interval: Duration::from_secs(3600),
            repeat: 2,
            repeat_gap: Duration::from_millis(10),
            via_dataplane: true,
            auth: None,
        };
        let monitor = Arc::new(Monitor::new(
            handle.clone(),
            crate::Thresholds::default(),
            Instant::now(),
        ));
        let mut speaker = Speaker::new(cfg, handle, monitor, Outlet::Dataplane);
        speaker.heartbeat(&[]);
        speaker.announce(AnnounceKind::DiskDown, 1, "gone");
        let t0 = Instant::now();
        for i in 0..5 {
            speaker.flush(t0 + Duration::from_millis(100) * i);
        }
        assert!(ends[1].outbox.is_none(), "only loop 0 sends for the node");
        let outbox = ends[0].outbox.take().unwrap();
        let got: Vec<_> = outbox.try_iter().collect();
        let ops: Vec<u16> = got
            .iter()
            .map(|o| {
                assert_eq!(o.to, group);
                dosp::wire::Header::read_from_prefix(&o.bytes)
                    .unwrap()
                    .0
                    .opcode
                    .get()
            })
            .collect();
        assert_eq!(
            ops,
            [
                Opcode::Heartbeat as u16,
                Opcode::Announce as u16,
                Opcode::Announce as u16
            ]
        );
    }
}
