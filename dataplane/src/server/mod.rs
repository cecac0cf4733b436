//! The dataplane loop: TCP sessions and UDP cluster services over one network port
//! ([`port::NetPort`]: kernel sockets polled with epoll by default, a simulated network
//! in tests), run to completion on one core.
//!
//! Several loops run side by side, one per core (`--dataplane-cores`), each with its
//! own port (its own SO_REUSEPORT listener on the kernel backend), its own shard of the
//! store and its own counters; work for another loop's shard crosses over bounded
//! single-producer queues (see [`shards`] for the protocol, [`mesh`] for the queues).
//!
//! Each turn, in bounded batches: accept new connections, drive ready sessions, serve
//! datagrams, fire timers (idle compaction, checkpoint, timeouts). The loop sleeps in
//! the port's wait (epoll) when idle, so an idle node does not burn its core; the poll
//! timeout is bounded so shutdown and timers are noticed promptly.

pub mod accept;
pub mod auth;
pub mod cluster;
#[cfg(feature = "dpdk")]
pub mod dpdk_port;
pub mod frame_check;
pub mod http;
pub mod mesh;
pub mod ops;
pub mod port;
#[cfg(feature = "dpdk")]
pub mod rx_guard;
pub mod session;
pub mod shards;
#[cfg(test)]
mod sim_tests;
#[cfg(test)]
mod simnet;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, DefaultHasher};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::cluster::Cluster;
use self::ops::{Ctx, NodeView};
use self::port::{ConnId, Dgram, KernelPort, KernelPortOptions, NetPort, Ready};
use self::session::{Deadlines, Drive, Session};
use self::shards::{Event, Shards};
use crate::handle::{Command, CommandError, DataplaneEnd, COMMANDS_PER_TURN};
use crate::stats::NodeStats;

/// The session table, hashed with fixed keys: the loop walks it (timeouts, shutdown)
/// in the same order on every run, so a simulation seed replays exactly.
type Sessions = HashMap<ConnId, Session, BuildHasherDefault<DefaultHasher>>;

/// The port's wakeup key of the mesh's eventfd (disks use their index, below 2^16).
const MESH_WAKEUP: usize = 1 << 20;
/// Idle sessions looked at, when the table is full, before a newcomer is refused.
const EVICT_TRIES: usize = 8;
/// How often every online disk is probed with a one-block read. With the publish
/// interval and the announcer's tick this bounds how late a dead disk is announced
/// (dosp/PROTOCOL.md, "ANNOUNCE").
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How often each online disk's health log (NVMe SMART) is re-read: less often than
/// the probe, since on NVMe it is an admin command the driver waits for on the loop
/// (see `Store::refresh_health`), unlike the probe's read, which is asynchronous; often
/// enough that a critical warning reaches `/v1/health` within seconds (the QEMU nvme
/// suite allows 30).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// How often the disk reports are republished for the management core.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(250);
/// How often the index's size is measured for `/metrics`.
const INDEX_FIGURES_INTERVAL: Duration = Duration::from_secs(10);
/// How often sessions are checked for timeouts.
const TIMEOUT_SCAN: Duration = Duration::from_millis(100);

/// What the dataplane needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub multicast_group: SocketAddrV4,
    pub multicast_if: Ipv4Addr,
    pub chunk_max: u32,
    pub connections_max: usize,
    /// Longest the loop sleeps in epoll when idle.
    pub idle_sleep: Duration,
    /// How often the store checkpoints when it has new commits.
    pub checkpoint_interval: Duration,
    /// A connection silent this long in the middle of a request is closed (its STORE
    /// aborted). Also the window over which `transfer_rate_min` is measured.
    pub request_timeout: Duration,
    /// A connection silent this long between requests is closed.
    pub idle_timeout: Duration,
    /// A request's header and In structure must arrive within this of their first byte.
    pub header_timeout: Duration,
    /// Bytes per second a connection must move while the node waits on it mid-request
    /// (STORE chunks in, a reply out); 0: no minimum.
    pub transfer_rate_min: u64,
    /// Test-only: `None` in production. See [`TestStall`].
    pub test_stall: Option<TestStall>,
    /// The cluster key and replay memory, shared by every loop: `None` on a node
    /// without a key, which serves unsigned requests (dosp/PROTOCOL.md §7).
    pub auth: Option<Arc<auth::NodeAuth>>,
}

/// A test-only hook that blocks the dataplane loop, so the integration tests can prove
/// that the management core notices a stalled core (`/v1/health` `failing`, a
/// node-failing announcement) and that the node recovers when the loop resumes.
///
/// Whoever holds `trigger` sets it; the loop clears it at the top of its next turn and
/// then sleeps `duration` once, serving nothing meanwhile, exactly as a core stuck in
/// a bad device or a livelock would look from outside.
///
/// Only the loop numbered `loop_index` stalls (every loop may hold the same hook).
#[derive(Debug, Clone)]
pub struct TestStall {
    pub trigger: Arc<AtomicBool>,
    pub duration: Duration,
    pub loop_index: usize,
}

/// Options for the kernel port of a node with one dataplane loop: it listens on
/// `cfg.listen`, serves UDP unicast there and joins the multicast group, as the node
/// always has. (With several loops on one address, only one port serves UDP.)
pub fn single_loop_port(cfg: &ServerConfig) -> KernelPortOptions {
    KernelPortOptions {
        listen: cfg.listen,
        connections_max: cfg.connections_max,
        udp_unicast: true,
        multicast: Some((cfg.multicast_group, cfg.multicast_if)),
    }
}

/// A bound, ready-to-run dataplane loop over a network port.
#[derive(Debug)]
pub struct Server<P: NetPort = KernelPort> {
    port: P,
    cluster: Cluster,
    sessions: Sessions,
    /// HTTP connections (signed URLs), when the node serves them; they share the
    /// port's connection ids (and so the store's `user` values) with `sessions`.
    http: HashMap<ConnId, http::HttpConn, BuildHasherDefault<DefaultHasher>>,
    /// The last HTTP accept pass stopped before the queue was empty.
    http_accept_more: bool,
    /// Buffers for at most `connections_max` sessions, reused as sessions close.
    bufs: session::BufPool,
    store: Shards,
    stats: Arc<NodeStats>,
    end: DataplaneEnd,
    id: NodeView,
    cfg: ServerConfig,
    t: Turns,
}

/// What the loop carries from one turn to the next: its scratch lists and timers.
#[derive(Debug)]
struct Turns {
    ready: Vec<Ready>,
    store_events: Vec<Event>,
    accepted: Vec<(ConnId, SocketAddr)>,
    /// Sessions to drive next turn without waiting for an event (bound hit, or
    /// waiting on the store).
    more: Vec<ConnId>,
    /// A datagram burst left data queued.
    datagrams_more: bool,
    last_compact: Instant,
    last_checkpoint: Instant,
    last_timeout_scan: Instant,
    last_publish: Instant,
    last_probe: Instant,
    last_health: Instant,
    last_index_figures: Instant,
    last_rate: (Instant, u64),
    dirty_since_checkpoint: bool,
    last_ops: u64,
}

/// This loop's own counters, from the handle's set.
fn loop_stats(end: &DataplaneEnd) -> io::Result<Arc<NodeStats>> {
    end.stats
        .of_loop(usize::from(end.loop_index))
        .cloned()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no dataplane loop {} in the handle", end.loop_index),
            )
        })
}

impl Server<KernelPort> {
    /// Binds every socket of a single-loop node (see [`single_loop_port`]). Errors
    /// here are start-up errors (address in use, …).
    pub fn bind(cfg: ServerConfig, store: Shards, end: DataplaneEnd) -> io::Result<Server> {
        let stats = loop_stats(&end)?;
        let port = KernelPort::bind(&single_loop_port(&cfg), stats)?;
        Server::with_port(port, cfg, store, end)
    }

    /// One of several loops sharing an address: its port on `listener` (one of the
    /// group [`accept::bind_group`] bound), serving UDP (unicast and the multicast
    /// group) only if `udp` — exactly one loop of a node does.
    pub fn bind_loop(
        cfg: ServerConfig,
        listener: (mio::net::TcpListener, u32),
        udp: bool,
        store: Shards,
        end: DataplaneEnd,
    ) -> io::Result<Server> {
        let stats = loop_stats(&end)?;
        let opts = KernelPortOptions {
            listen: listener.0.local_addr()?,
            connections_max: cfg.connections_max,
            udp_unicast: udp,
            multicast: udp.then_some((cfg.multicast_group, cfg.multicast_if)),
        };
        let port = KernelPort::on(&opts, listener, stats)?;
        Server::with_port(port, cfg, store, end)
    }

    /// Also serves signed URLs over HTTP on `listener` (one of a group bound with
    /// [`accept::bind_group`]). Needs a cluster key ([`ServerConfig::auth`]).
    pub fn serve_http(&mut self, listener: (mio::net::TcpListener, u32)) -> io::Result<()> {
        if self.cfg.auth.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "signed URLs over HTTP need a cluster key",
            ));
        }
        self.port.serve_http(listener.0)
    }
}

impl<P: NetPort> Server<P> {
    /// The HTTP listener's address, if the node serves HTTP.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.port.http_addr()
    }

    /// A loop over `port`; the store's completion descriptors are registered with it.
    /// A port that serves HTTP already ([`NetPort::http_addr`]: the DPDK port's
    /// listeners are made with it) needs a cluster key, as [`Server::serve_http`] does.
    pub fn with_port(
        mut port: P,
        cfg: ServerConfig,
        mut store: Shards,
        end: DataplaneEnd,
    ) -> io::Result<Server<P>> {
        if port.http_addr().is_some() && cfg.auth.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "signed URLs over HTTP need a cluster key",
            ));
        }
        let stats = loop_stats(&end)?;
        for (disk, fd) in store.notify_fds() {
            port.register_wakeup(fd, usize::from(disk.0))?;
        }
        if let Some(fd) = store.mesh().map(|m| m.wake_fd()) {
            port.register_wakeup(fd, MESH_WAKEUP)?;
        }
        store.set_board(Arc::clone(&end.disks));
        let now = port.now();
        let id = NodeView {
            node: crate::node::NodeCache::new(Arc::clone(&end.node)),
            all: Arc::clone(&end.stats),
            chunk_max: cfg.chunk_max,
            auth: cfg.auth.clone(),
        };
        // The first reports go out now, not when the loop starts on its thread: the
        // node says it is ready once bound, and the management core must know its
        // disks from then on (not answer 404 for each, nor "no disk reports yet").
        end.disks.publish_from(end.loop_index, store.disks());
        let ops = NodeStats::get(&stats.stores) + NodeStats::get(&stats.deletes);
        Ok(Server {
            port,
            cluster: Cluster::new(cfg.multicast_group),
            sessions: Sessions::default(),
            http: HashMap::default(),
            http_accept_more: false,
            bufs: session::BufPool::new(cfg.connections_max),
            store,
            end,
            id,
            t: Turns {
                ready: Vec::new(),
                store_events: Vec::new(),
                accepted: Vec::new(),
                more: Vec::new(),
                datagrams_more: false,
                last_compact: now,
                last_checkpoint: now,
                last_timeout_scan: now,
                last_publish: now,
                last_probe: now,
                last_health: now,
                last_index_figures: now,
                last_rate: (now, NodeStats::get(&stats.ops_total)),
                dirty_since_checkpoint: false,
                last_ops: ops,
            },
            stats,
            cfg,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.port.local_addr())
    }

    /// The loop's network port (its counters, for tests and diagnostics).
    pub fn port(&self) -> &P {
        &self.port
    }

    /// Runs until `stop` is set, then checkpoints the store and returns it.
    pub fn run(mut self, stop: &AtomicBool) -> io::Result<Shards> {
        self.publish_index_figures();
        self.end
            .disks
            .publish_from(self.end.loop_index, self.store.disks());
        NodeStats::inc(&self.stats.loop_turns);
        while !stop.load(Ordering::Relaxed) {
            if let Some(stall) = self
                .cfg
                .test_stall
                .as_ref()
                .filter(|s| s.loop_index == usize::from(self.end.loop_index))
            {
                // A plain load per turn while armed (the swap only once it fires);
                // nothing at all in production, where the hook is `None`.
                if stall.trigger.load(Ordering::Relaxed)
                    && stall.trigger.swap(false, Ordering::Relaxed)
                {
                    tracing::warn!(
                        ms = stall.duration.as_millis() as u64,
                        loop_index = stall.loop_index,
                        "test hook: stalling the dataplane loop"
                    );
                    std::thread::sleep(stall.duration);
                    tracing::warn!("test hook: dataplane loop resumes");
                }
            }
            self.turn()?;
        }
        Ok(self.shut_down())
    }

    /// Closes every session and checkpoints the store; returns it.
    pub fn shut_down(mut self) -> Shards {
        tracing::info!(sessions = self.sessions.len(), "dataplane stopping");
        let conns: Vec<ConnId> = self
            .sessions
            .keys()
            .chain(self.http.keys())
            .copied()
            .collect();
        for c in conns {
            self.close(c);
        }
        if let Err(e) = self.store.checkpoint() {
            tracing::error!(error = %e, "final checkpoint failed");
        }
        self.store
    }

    /// One turn of the loop: wait (bounded) for readiness, then in bounded batches
    /// device completions, new connections, ready sessions, datagrams and timers.
    pub fn turn(&mut self) -> io::Result<()> {
        NodeStats::inc(&self.stats.loop_turns);
        self.end.beats.beat(usize::from(self.end.loop_index));
        self.id.node.refresh();
        // With device operations in flight the loop polls without sleeping, unless
        // every one of them will wake it through its disk's completion descriptor
        // (io_uring's eventfd, registered with the port).
        let waiting = self.t.more.is_empty() && !self.t.datagrams_more && !self.http_accept_more;
        let timeout =
            if waiting && self.store.can_sleep() && self.store.mesh().is_none_or(|m| m.may_sleep())
            {
                match self.port.accept_due() {
                    Some(at) => at
                        .saturating_duration_since(self.port.now())
                        .min(self.cfg.idle_sleep),
                    None => self.cfg.idle_sleep,
                }
            } else {
                Duration::ZERO
            };
        let mut ready = std::mem::take(&mut self.t.ready);
        ready.clear();
        let waited = self.port.wait(timeout, &mut ready);
        if let Some(m) = self.store.mesh() {
            m.awake();
        }
        waited?;
        let now = self.port.now();
        let mut drive: Vec<ConnId> = std::mem::take(&mut self.t.more);
        let mut datagrams = std::mem::take(&mut self.t.datagrams_more);
        // Compaction runs in the background (a STORE waiting for room, or the idle
        // step started below); its steps start and end here.
        if let Some(r) = self.store.compact_tick() {
            match r {
                Ok(step) => {
                    tracing::debug!(?step, "compaction step");
                    if step.bytes_scanned > 0 {
                        // Compaction moved the log head, possibly past the last
                        // checkpoint: write a new one soon, or a crash before the
                        // next store would cost a full scan at start-up.
                        self.t.dirty_since_checkpoint = true;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "compaction step failed"),
            }
        }
        // Device completions: each finished operation goes to its session, which
        // is then driven with the others.
        let mut store_events = std::mem::take(&mut self.t.store_events);
        self.store.poll(&mut store_events);
        for ev in store_events.drain(..) {
            if ev.user() & cluster::CLUSTER_USER != 0 && ev.user() != u64::MAX {
                let mut ctx = Ctx {
                    store: &mut self.store,
                    stats: &self.stats,
                    id: &self.id,
                };
                self.cluster.on_event(&mut self.port, &mut ctx, ev);
                continue;
            }
            let conn = ConnId(ev.user());
            if let Some(h) = self.http.get_mut(&conn) {
                let mut ctx = Ctx {
                    store: &mut self.store,
                    stats: &self.stats,
                    id: &self.id,
                };
                h.on_store_event(&mut ctx, ev);
                drive.push(conn);
                continue;
            }
            match self.sessions.get_mut(&conn) {
                Some(session) => {
                    let mut ctx = Ctx {
                        store: &mut self.store,
                        stats: &self.stats,
                        id: &self.id,
                    };
                    session.on_store_event(&mut ctx, now, ev);
                    drive.push(conn);
                }
                None => {
                    if let Event::Store(crate::store::StoreEvent::Read { id, .. }) = ev {
                        self.store.read_release(id);
                    }
                }
            }
        }
        self.t.store_events = store_events;
        let mut accepted = false;
        for r in ready.iter() {
            match *r {
                Ready::Wakeup(MESH_WAKEUP) => {
                    if let Some(m) = self.store.mesh() {
                        m.drain_wake();
                    }
                }
                Ready::Wakeup(disk) => {
                    self.store.drain_notify(crate::store::DiskId(disk as u16));
                }
                Ready::Listener => {
                    accepted = true;
                    self.accept(now);
                }
                Ready::HttpListener => self.http_accept_more = true,
                Ready::Datagrams => datagrams = true,
                Ready::Conn(c) => drive.push(c),
            }
        }
        if datagrams {
            let mut ctx = Ctx {
                store: &mut self.store,
                stats: &self.stats,
                id: &self.id,
            };
            // A burst left data queued: come back next turn.
            self.t.datagrams_more = self.cluster.poll(&mut self.port, &mut ctx);
        }
        for c in drive {
            self.drive(c, now);
        }
        if !accepted && self.port.accept_due().is_some_and(|at| at <= now) {
            self.accept(now);
        }
        if std::mem::take(&mut self.http_accept_more) {
            self.accept_http(now);
        }
        self.t.more.sort_unstable();
        self.t.more.dedup();
        let idle = ready.is_empty() && self.t.more.is_empty();
        self.t.ready = ready;
        self.timers(now, idle);
        Ok(())
    }

    /// Rates, probes, publication, timeouts, and background work when idle.
    fn timers(&mut self, now: Instant, idle: bool) {
        let ops = NodeStats::get(&self.stats.stores) + NodeStats::get(&self.stats.deletes);
        if ops != self.t.last_ops {
            self.t.dirty_since_checkpoint = true;
            self.t.last_ops = ops;
        }
        if now.duration_since(self.t.last_rate.0) >= Duration::from_secs(1) {
            let ops = NodeStats::get(&self.stats.ops_total);
            let secs = now.duration_since(self.t.last_rate.0).as_secs_f64();
            let rate = ((ops - self.t.last_rate.1) as f64 / secs) as u64;
            NodeStats::set(&self.stats.ops_per_sec, rate);
            self.t.last_rate = (now, ops);
        }
        // A disk that dies while nothing touches it is found by the probe (its read
        // completes in the store's poll, failed); publish at once so the management
        // core announces it without waiting.
        let mut changed = false;
        if now.duration_since(self.t.last_probe) >= PROBE_INTERVAL {
            self.t.last_probe = now;
            self.store.probe_start();
        }
        for disk in self.store.probe_take_down() {
            tracing::error!(disk = disk.0, "disk failed its health probe: down");
            changed = true;
        }
        if now.duration_since(self.t.last_health) >= HEALTH_INTERVAL {
            self.t.last_health = now;
            self.store.refresh_health();
        }
        changed |= self.serve_commands();
        self.send_outbox();
        if changed || now.duration_since(self.t.last_publish) >= PUBLISH_INTERVAL {
            self.t.last_publish = now;
            self.end
                .disks
                .publish_from(self.end.loop_index, self.store.disks());
            self.publish_store_figures();
            if now.duration_since(self.t.last_index_figures) >= INDEX_FIGURES_INTERVAL {
                self.t.last_index_figures = now;
                self.publish_index_figures();
            }
        }
        if now.duration_since(self.t.last_timeout_scan) >= TIMEOUT_SCAN {
            self.t.last_timeout_scan = now;
            self.close_timed_out(now);
        }
        // The checkpoint in the background moves on with every poll; its end is
        // reported here.
        if let Some(Err(e)) = self.store.checkpoint_tick() {
            tracing::error!(error = %e, "checkpoint failed");
        }
        // Background work only when the node is otherwise quiet, one task at a time:
        // a compaction step (its end is reported by compact_tick above) or a
        // checkpoint.
        if idle
            && !self.store.checkpoint_busy()
            && !self.store.compact_busy()
            && now.duration_since(self.t.last_compact) >= Duration::from_secs(1)
        {
            self.t.last_compact = now;
            self.store.compact_start();
        }
        if idle
            && self.t.dirty_since_checkpoint
            && !self.store.checkpoint_busy()
            && !self.store.compact_busy()
            && now.duration_since(self.t.last_checkpoint) >= self.cfg.checkpoint_interval
        {
            self.t.last_checkpoint = now;
            self.t.dirty_since_checkpoint = false;
            // Snapshots taken now; the writes go out without the loop waiting.
            self.store.checkpoint_start();
        }
    }

    /// Takes new connections from the port and gives each a session.
    fn accept(&mut self, now: Instant) {
        let mut accepted = std::mem::take(&mut self.t.accepted);
        self.port.accept(&mut accepted);
        for (conn, peer) in accepted.drain(..) {
            self.admit(conn, peer, now);
        }
        self.t.accepted = accepted;
    }

    /// Takes new HTTP connections. At the connection bound (DOSP and HTTP together)
    /// the connection idle the longest is closed to make room, or, with none idle,
    /// the newcomer.
    fn accept_http(&mut self, now: Instant) {
        let mut accepted = std::mem::take(&mut self.t.accepted);
        self.http_accept_more = self.port.accept_http(&mut accepted);
        for (conn, peer) in accepted.drain(..) {
            if self.sessions.len() + self.http.len() >= self.cfg.connections_max {
                // As for DOSP (`admit`): the connection idle the longest makes room;
                // with none idle, the newcomer is closed (HTTP has no BUSY before a
                // request).
                match self.longest_idle() {
                    Some((_, victim)) => {
                        NodeStats::inc(&self.stats.connections_evicted);
                        self.close(victim);
                    }
                    None => {
                        NodeStats::inc(&self.stats.connections_refused);
                        tracing::debug!(%peer, "refusing an HTTP connection: the table is full");
                        self.port.close(conn);
                        continue;
                    }
                }
            }
            // Below the bound the pool always has a buffer (see `admit`).
            let Some(bufs) = self.bufs.take() else {
                NodeStats::inc(&self.stats.connections_refused);
                self.port.close(conn);
                continue;
            };
            NodeStats::inc(&self.stats.connections);
            NodeStats::inc(&self.stats.connections_total);
            self.http.insert(conn, http::HttpConn::new(peer, now, bufs));
            self.drive(conn, now);
        }
        self.t.accepted = accepted;
    }

    /// The session idle the longest that can be closed without harm: between
    /// requests, and with no input waiting unread (a request just arrived). At most
    /// EVICT_TRIES candidates are looked at, oldest first.
    fn longest_idle(&mut self) -> Option<(Instant, ConnId)> {
        let mut skipped = [ConnId(u64::MAX); EVICT_TRIES];
        for n in 0..EVICT_TRIES {
            // DOSP sessions and HTTP connections alike: they share the bound.
            let dosp = self
                .sessions
                .iter()
                .filter_map(|(c, s)| Some((s.idle_since()?, *c)));
            let http = self
                .http
                .iter()
                .filter_map(|(c, h)| Some((h.idle_since()?, *c)));
            let (since, conn) = dosp
                .chain(http)
                .filter(|(_, c)| !skipped[..n].contains(c))
                .min()?;
            // Closing a connection with unread input sends a reset, which can destroy
            // replies still in flight; one with none closes with a FIN.
            if !self.port.conn_state(conn).unread_input {
                return Some((since, conn));
            }
            skipped[n] = conn;
        }
        None
    }

    /// Gives a new connection a session. When the table is full, the session idle the
    /// longest (between requests) is closed to make room; only when every session is
    /// in the middle of a request is the newcomer refused with BUSY. Idle connections
    /// so cannot lock new clients out: the cost is a scan of the table, and only when
    /// it is full.
    fn admit(&mut self, conn: ConnId, peer: SocketAddr, now: Instant) {
        let max = u32::try_from(self.cfg.connections_max).unwrap_or(u32::MAX);
        if self.sessions.len() + self.http.len() >= self.cfg.connections_max {
            match self.longest_idle() {
                Some((since, victim)) => {
                    // Routine under pressure, and counted: not worth a line each.
                    if let Some(s) = self.sessions.get(&victim) {
                        tracing::debug!(
                            peer = %s.peer,
                            idle_ms = now.saturating_duration_since(since).as_millis() as u64,
                            "session table full: closing the connection idle the longest"
                        );
                    }
                    NodeStats::inc(&self.stats.connections_evicted);
                    self.close(victim);
                }
                None => {
                    NodeStats::inc(&self.stats.connections_refused);
                    tracing::warn!(
                        %peer,
                        max = self.cfg.connections_max,
                        "refusing connection: every session is in the middle of a request"
                    );
                    self.port.refuse(conn, &accept::busy_reply(max));
                    return;
                }
            }
        }
        // The pool holds (or may still make) one buffer per allowed connection, and a
        // session gives its buffer back when it closes: with the table below its
        // maximum there is always one.
        let Some(bufs) = self.bufs.take() else {
            NodeStats::inc(&self.stats.connections_refused);
            self.port.refuse(conn, &accept::busy_reply(max));
            return;
        };
        let session = Session::new(peer, self.cfg.chunk_max, conn.0, bufs, now);
        NodeStats::inc(&self.stats.connections);
        NodeStats::inc(&self.stats.connections_total);
        tracing::debug!(%peer, "connection accepted");
        self.sessions.insert(conn, session);
        // Whatever the client sent with its handshake is read now; a session that
        // hits its step bound is driven again next turn like any other.
        self.drive(conn, now);
    }

    /// Cache and index figures for `/metrics`.
    fn publish_store_figures(&self) {
        let c = self.store.cache_stats();
        NodeStats::set(&self.stats.cache_hits, c.hits);
        NodeStats::set(&self.stats.cache_misses, c.misses);
        NodeStats::set(&self.stats.cache_objects, c.objects);
        NodeStats::set(&self.stats.cache_bytes, c.bytes);
        NodeStats::set(&self.stats.cache_capacity_bytes, c.capacity_bytes);
    }

    /// Index figures for `/metrics`: counting its allocations walks its chunks and the
    /// entries of large objects, so this runs every INDEX_FIGURES_INTERVAL only.
    fn publish_index_figures(&self) {
        let (objects, bytes) = self.store.index_footprint();
        NodeStats::set(&self.stats.index_objects, objects);
        NodeStats::set(&self.stats.index_bytes, bytes);
    }

    /// Carries out up to COMMANDS_PER_TURN management commands; true if any came.
    fn serve_commands(&mut self) -> bool {
        let mut any = false;
        for _ in 0..COMMANDS_PER_TURN {
            let Ok(cmd) = self.end.commands.try_recv() else {
                break;
            };
            any = true;
            match cmd {
                Command::SetDiskState { disk, state, reply } => {
                    let result = if usize::from(disk.0) < self.store.disks().len() {
                        self.store.set_disk_state(disk, state);
                        tracing::info!(
                            disk = disk.0,
                            ?state,
                            "disk state set by the management core"
                        );
                        self.store
                            .disks()
                            .into_iter()
                            .find(|d| d.id == disk)
                            .ok_or(CommandError::NoSuchDisk(disk.0))
                    } else {
                        Err(CommandError::NoSuchDisk(disk.0))
                    };
                    // The asker may have given up waiting; that is fine.
                    let _ = reply.try_send(result);
                }
                Command::Addresses { change, reply } => {
                    // Every loop holds the address; one announces it.
                    let change = match change {
                        Some(port::AddressChange::Add {
                            addr,
                            prefix_len,
                            announce,
                        }) => Some(port::AddressChange::Add {
                            addr,
                            prefix_len,
                            announce: announce && self.end.loop_index == 0,
                        }),
                        other => other,
                    };
                    let result = self
                        .port
                        .change_address(change)
                        .map_err(CommandError::Refused);
                    let _ = reply.try_send(result);
                }
            }
        }
        any
    }

    /// Sends what the management core queued for the cluster group (loop 0 only; see
    /// [`crate::handle::Outgoing`]). Bounded by the queue's size per turn.
    fn send_outbox(&mut self) {
        let Some(outbox) = self.end.outbox.as_ref() else {
            return;
        };
        for _ in 0..crate::handle::OUTBOX {
            let Ok(out) = outbox.try_recv() else {
                break;
            };
            if let Err(e) =
                self.port
                    .send_datagram(Dgram::Multicast, &out.bytes, SocketAddr::V4(out.to))
            {
                tracing::warn!(to = %out.to, error = %e, "cannot send a cluster datagram");
            }
        }
    }

    fn close_timed_out(&mut self, now: Instant) {
        let deadlines = Deadlines {
            request: self.cfg.request_timeout,
            idle: self.cfg.idle_timeout,
            header: self.cfg.header_timeout,
            rate_min_bytes_per_sec: self.cfg.transfer_rate_min,
        };
        let stale: Vec<_> = self
            .sessions
            .iter_mut()
            .filter_map(|(c, s)| Some((*c, s.peer, s.timed_out(now, &deadlines)?)))
            .collect();
        let stale_http: Vec<_> = self
            .http
            .iter_mut()
            .filter_map(|(c, h)| Some((*c, h.peer, h.timed_out(now, &deadlines)?)))
            .collect();
        for (t, peer, why) in stale.into_iter().chain(stale_http) {
            tracing::info!(%peer, "closing a connection: {}", why.reason());
            NodeStats::inc(&self.stats.sessions_timed_out);
            self.close(t);
        }
    }

    fn drive(&mut self, conn: ConnId, now: Instant) {
        if let Some(h) = self.http.get_mut(&conn) {
            let Some(auth) = self.cfg.auth.as_ref() else {
                return self.close(conn);
            };
            let mut ctx = Ctx {
                store: &mut self.store,
                stats: &self.stats,
                id: &self.id,
            };
            let now_unix_s = auth.now_unix_s();
            let keys = http::UrlKeys {
                ring: auth.ring(),
                allow_md5: auth.allow_md5(),
            };
            match h.drive(&mut self.port, conn, &mut ctx, keys, now_unix_s, now) {
                Drive::Idle => {}
                Drive::More => self.t.more.push(conn),
                Drive::Close => self.close(conn),
            }
            return;
        }
        let Some(session) = self.sessions.get_mut(&conn) else {
            return;
        };
        let mut ctx = Ctx {
            store: &mut self.store,
            stats: &self.stats,
            id: &self.id,
        };
        match session.drive(&mut self.port, conn, &mut ctx, now) {
            Drive::Idle => {}
            Drive::More => self.t.more.push(conn),
            Drive::Close => self.close(conn),
        }
    }

    fn close(&mut self, conn: ConnId) {
        if let Some(mut h) = self.http.remove(&conn) {
            let mut ctx = Ctx {
                store: &mut self.store,
                stats: &self.stats,
                id: &self.id,
            };
            h.close(&mut ctx);
            self.port.close(conn);
            NodeStats::dec(&self.stats.connections);
            tracing::debug!(peer = %h.peer, "HTTP connection closed");
            self.bufs.give(h.into_bufs());
            return;
        }
        if let Some(mut session) = self.sessions.remove(&conn) {
            let mut ctx = Ctx {
                store: &mut self.store,
                stats: &self.stats,
                id: &self.id,
            };
            session.close(&mut ctx);
            self.port.close(conn);
            NodeStats::dec(&self.stats.connections);
            tracing::debug!(peer = %session.peer, "connection closed");
            self.bufs.give(session.into_bufs());
        }
    }
}
