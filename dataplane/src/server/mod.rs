//! The dataplane loop on the kernel backend: TCP sessions and UDP cluster services,
//! polled with epoll (mio), run to completion on one core.
//!
//! Sharding: this backend runs one dataplane loop that owns every disk and the whole
//! index, so no request crosses cores. When more loops run (DPDK backend), objects are
//! sharded by the first byte of the fingerprint (`fp.0[0] % loops`) and a request that
//! lands on the wrong loop is forwarded over a bounded single-producer queue.
//!
//! Each turn, in bounded batches: accept new connections, drive ready sessions, serve
//! datagrams, fire timers (idle compaction, checkpoint, timeouts). The loop sleeps in
//! epoll when idle, so an idle node does not burn its core; the poll timeout is bounded
//! so shutdown and timers are noticed promptly.

pub mod accept;
pub mod cluster;
pub mod mesh;
pub mod ops;
pub mod session;
pub mod shards;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};

use self::accept::{Pass, Reserve, Shed, Step, ACCEPT_BURST, ACCEPT_RETRY};
use self::cluster::Cluster;
use self::ops::{Ctx, NodeView};
use self::session::{Deadlines, Drive, Session};
use self::shards::{Event, Shards};
use crate::handle::{Command, CommandError, DataplaneEnd, COMMANDS_PER_TURN};
use crate::stats::{ListenerState, NodeStats};

const LISTENER: Token = Token(0);
const UDP_UNICAST: Token = Token(1);
const UDP_MULTICAST: Token = Token(2);
/// The waker other loops poke when they queue a message for this one.
const MESH_WAKE: Token = Token(3);
const FIRST_SESSION: usize = 16;
/// Tokens of the disks' completion descriptors: `NOTIFY_BASE + disk`, far above any
/// session's token (those count up from FIRST_SESSION).
const NOTIFY_BASE: usize = usize::MAX / 2;
/// Idle sessions looked at, when the table is full, before a newcomer is refused.
const EVICT_TRIES: usize = 8;
/// Events handled per epoll wait.
const EVENTS_MAX: usize = 256;
/// How often every online disk is probed with a one-block read. With the publish
/// interval and the announcer's tick this bounds how late a dead disk is announced
/// (dosp/PROTOCOL.md, "ANNOUNCE").
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
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
    /// Whether this loop serves the UDP side (unicast queries on the DOSP port and
    /// the multicast group): exactly one loop does.
    pub cluster: bool,
    /// Test-only: `None` in production. See [`TestStall`].
    pub test_stall: Option<TestStall>,
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

/// A bound, ready-to-run dataplane.
#[derive(Debug)]
pub struct Server {
    poll: Poll,
    listener: TcpListener,
    /// When the loop must run an accept pass without waiting for a readiness event
    /// (the last pass stopped before the queue was empty; see `accept.rs`).
    accept_at: Option<Instant>,
    /// The spare descriptor that lets the listener refuse connections when the
    /// process is out of descriptors.
    reserve: Reserve,
    /// What the listener last saw, as published in `stats.listener_state`.
    listener_state: ListenerState,
    /// The UDP side, on the one loop that serves it.
    cluster: Option<Cluster>,
    sessions: HashMap<Token, Session>,
    /// Buffers for at most `connections_max` sessions, reused as sessions close.
    bufs: session::BufPool,
    next_token: usize,
    store: Shards,
    stats: Arc<NodeStats>,
    end: DataplaneEnd,
    id: NodeView,
    cfg: ServerConfig,
}

impl Server {
    /// Binds every socket. Errors here are start-up errors (address in use, …).
    pub fn bind(cfg: ServerConfig, store: Shards, end: DataplaneEnd) -> io::Result<Server> {
        let listener = accept::bind(cfg.listen, cfg.connections_max)?;
        Server::bind_with(cfg, listener, store, end)
    }

    /// [`Server::bind`] on a listener bound already (one of a group sharing the
    /// address with SO_REUSEPORT, one per loop; see [`accept::bind_group`]).
    pub fn bind_with(
        cfg: ServerConfig,
        listener: (TcpListener, u32),
        store: Shards,
        end: DataplaneEnd,
    ) -> io::Result<Server> {
        let stats = end
            .stats
            .of_loop(usize::from(end.loop_index))
            .cloned()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("no dataplane loop {} in the handle", end.loop_index),
                )
            })?;
        let poll = Poll::new()?;
        let (mut listener, backlog) = listener;
        let mut store = store;
        if let Some(mesh) = store.mesh() {
            mesh.set_waker(mio::Waker::new(poll.registry(), MESH_WAKE)?);
        }
        store.set_board(Arc::clone(&end.disks));
        let local = listener.local_addr()?;
        tracing::info!(
            %local,
            backlog,
            connections_max = cfg.connections_max,
            "DOSP listener bound"
        );
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let cluster = if cfg.cluster {
            let mut c = Cluster::bind(local, cfg.multicast_group, cfg.multicast_if)?;
            poll.registry()
                .register(&mut c.unicast, UDP_UNICAST, Interest::READABLE)?;
            poll.registry()
                .register(&mut c.multicast, UDP_MULTICAST, Interest::READABLE)?;
            Some(c)
        } else {
            None
        };
        for (disk, fd) in store.notify_fds() {
            poll.registry().register(
                &mut mio::unix::SourceFd(&fd),
                Token(NOTIFY_BASE + usize::from(disk.0)),
                Interest::READABLE,
            )?;
        }
        let id = NodeView {
            node: crate::node::NodeCache::new(Arc::clone(&end.node)),
            all: Arc::clone(&end.stats),
            chunk_max: cfg.chunk_max,
        };
        // The first reports go out now, not when the loop starts on its thread: the
        // node says it is ready once bound, and the management core must know its
        // disks from then on (not answer 404 for each, nor "no disk reports yet").
        end.disks.publish_from(end.loop_index, store.disks());
        Ok(Server {
            poll,
            listener,
            accept_at: None,
            reserve: Reserve::new()?,
            listener_state: ListenerState::Accepting,
            cluster,
            sessions: HashMap::new(),
            bufs: session::BufPool::new(cfg.connections_max),
            next_token: FIRST_SESSION,
            store,
            stats,
            end,
            id,
            cfg,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Runs until `stop` is set, then checkpoints the store and returns it.
    pub fn run(mut self, stop: &AtomicBool) -> io::Result<Shards> {
        let mut events = Events::with_capacity(EVENTS_MAX);
        let mut store_events = Vec::new();
        let mut more: Vec<Token> = Vec::new();
        let mut last_compact = Instant::now();
        let mut last_checkpoint = Instant::now();
        let mut last_timeout_scan = Instant::now();
        let mut last_publish = Instant::now();
        let mut last_probe = Instant::now();
        self.publish_index_figures();
        let mut last_index_figures = Instant::now();
        let mut last_rate = (Instant::now(), NodeStats::get(&self.stats.ops_total));
        self.end
            .disks
            .publish_from(self.end.loop_index, self.store.disks());
        let mut dirty_since_checkpoint = false;
        let ops_at_checkpoint =
            NodeStats::get(&self.stats.stores) + NodeStats::get(&self.stats.deletes);
        let mut last_ops = ops_at_checkpoint;
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
            NodeStats::inc(&self.stats.loop_turns);
            self.end.beats.beat(usize::from(self.end.loop_index));
            self.id.node.refresh();
            // With device operations in flight the loop polls without sleeping, unless
            // every one of them will wake it through its disk's completion descriptor
            // (io_uring's eventfd, registered with epoll).
            let timeout = if more.is_empty()
                && self.store.can_sleep()
                && self.store.mesh().is_none_or(|m| m.may_sleep())
            {
                match self.accept_at {
                    Some(at) => at
                        .saturating_duration_since(Instant::now())
                        .min(self.cfg.idle_sleep),
                    None => self.cfg.idle_sleep,
                }
            } else {
                Duration::ZERO
            };
            let polled = self.poll.poll(&mut events, Some(timeout));
            if let Some(m) = self.store.mesh() {
                m.awake();
            }
            match polled {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let mut ready: Vec<Token> = std::mem::take(&mut more);
            // A STORE waiting for room: one bounded compaction step per turn.
            if let Some(r) = self.store.compact_tick() {
                match r {
                    Ok(step) => tracing::debug!(?step, "compaction step for a waiting store"),
                    Err(e) => tracing::warn!(error = %e, "compaction for a waiting store failed"),
                }
            }
            // Device completions: each finished operation goes to its session, which
            // is then driven with the others.
            self.store.poll(&mut store_events);
            for ev in store_events.drain(..) {
                let token = Token(ev.user() as usize);
                if ev.user() & cluster::CLUSTER_USER != 0 && ev.user() != u64::MAX {
                    let mut ctx = Ctx {
                        store: &mut self.store,
                        stats: &self.stats,
                        id: &self.id,
                    };
                    if let Some(c) = self.cluster.as_mut() {
                        c.on_event(&mut ctx, ev);
                    }
                    continue;
                }
                match self.sessions.get_mut(&token) {
                    Some(session) => {
                        let mut ctx = Ctx {
                            store: &mut self.store,
                            stats: &self.stats,
                            id: &self.id,
                        };
                        session.on_store_event(&mut ctx, ev);
                        ready.push(token);
                    }
                    None => {
                        if let Event::Store(crate::store::StoreEvent::Read { id, .. }) = ev {
                            self.store.read_release(id);
                        }
                    }
                }
            }
            let mut accepted = false;
            for ev in events.iter() {
                match ev.token() {
                    MESH_WAKE => {}
                    Token(t) if t >= NOTIFY_BASE => {
                        self.store
                            .drain_notify(crate::store::DiskId((t - NOTIFY_BASE) as u16));
                    }
                    LISTENER => {
                        accepted = true;
                        self.accept(&mut more);
                    }
                    UDP_UNICAST | UDP_MULTICAST => {
                        let mut ctx = Ctx {
                            store: &mut self.store,
                            stats: &self.stats,
                            id: &self.id,
                        };
                        // A burst left data queued: come back next turn.
                        if self.cluster.as_mut().is_some_and(|c| c.poll(&mut ctx)) {
                            more.push(ev.token());
                        }
                    }
                    t => ready.push(t),
                }
            }
            for t in ready {
                if t == UDP_UNICAST || t == UDP_MULTICAST {
                    let mut ctx = Ctx {
                        store: &mut self.store,
                        stats: &self.stats,
                        id: &self.id,
                    };
                    if self.cluster.as_mut().is_some_and(|c| c.poll(&mut ctx)) {
                        more.push(t);
                    }
                    continue;
                }
                self.drive(t, &mut more);
            }
            if !accepted && self.accept_at.is_some_and(|at| at <= Instant::now()) {
                self.accept(&mut more);
            }
            more.sort_unstable();
            more.dedup();

            let now = Instant::now();
            let ops = NodeStats::get(&self.stats.stores) + NodeStats::get(&self.stats.deletes);
            if ops != last_ops {
                dirty_since_checkpoint = true;
                last_ops = ops;
            }
            if now.duration_since(last_rate.0) >= Duration::from_secs(1) {
                let ops = NodeStats::get(&self.stats.ops_total);
                let secs = now.duration_since(last_rate.0).as_secs_f64();
                let rate = ((ops - last_rate.1) as f64 / secs) as u64;
                NodeStats::set(&self.stats.ops_per_sec, rate);
                last_rate = (now, ops);
            }
            // A disk that dies while nothing touches it is found by the probe; publish
            // at once so the management core announces it without waiting.
            let mut changed = false;
            if now.duration_since(last_probe) >= PROBE_INTERVAL {
                last_probe = now;
                for disk in self.store.probe() {
                    tracing::error!(disk = disk.0, "disk failed its health probe: down");
                    changed = true;
                }
            }
            changed |= self.serve_commands();
            if changed || now.duration_since(last_publish) >= PUBLISH_INTERVAL {
                last_publish = now;
                self.end
                    .disks
                    .publish_from(self.end.loop_index, self.store.disks());
                self.publish_store_figures();
                if now.duration_since(last_index_figures) >= INDEX_FIGURES_INTERVAL {
                    last_index_figures = now;
                    self.publish_index_figures();
                }
            }
            if now.duration_since(last_timeout_scan) >= TIMEOUT_SCAN {
                last_timeout_scan = now;
                self.close_timed_out(now);
            }
            // Background work only when the node is otherwise quiet.
            let idle = events.is_empty() && more.is_empty();
            if idle && now.duration_since(last_compact) >= Duration::from_secs(1) {
                last_compact = now;
                match self.store.maybe_compact() {
                    Ok(Some(r)) => {
                        tracing::info!(?r, "compacted");
                        // Compaction moved the log head, possibly past the last
                        // checkpoint: write a new one soon, or a crash before the next
                        // store would cost a full scan at start-up.
                        dirty_since_checkpoint = true;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "compaction failed"),
                }
            }
            if idle
                && dirty_since_checkpoint
                && now.duration_since(last_checkpoint) >= self.cfg.checkpoint_interval
            {
                last_checkpoint = now;
                dirty_since_checkpoint = false;
                if let Err(e) = self.store.checkpoint() {
                    tracing::error!(error = %e, "checkpoint failed");
                }
            }
        }

        tracing::info!(sessions = self.sessions.len(), "dataplane stopping");
        let tokens: Vec<Token> = self.sessions.keys().copied().collect();
        for t in tokens {
            self.close(t);
        }
        if let Err(e) = self.store.checkpoint() {
            tracing::error!(error = %e, "final checkpoint failed");
        }
        Ok(self.store)
    }

    /// One accept pass: takes connections until the queue is empty or the per-turn
    /// bound is hit, sheds them with BUSY while the process is out of descriptors, and
    /// arranges to come back when it stopped before the queue was empty.
    fn accept(&mut self, more: &mut Vec<Token>) {
        self.accept_at = None;
        let mut short = false;
        let mut failure = None;
        let mut pass = Pass::Bound;
        for _ in 0..ACCEPT_BURST {
            match accept::next(&self.listener) {
                Step::Connection(stream, peer) => self.admit(stream, peer, more),
                Step::Empty => {
                    pass = Pass::Drained;
                    break;
                }
                Step::Failed(e) if accept::is_shortage(&e) => {
                    NodeStats::inc(&self.stats.accept_failures);
                    if !short {
                        tracing::debug!(error = %e, "accept: out of descriptors, shedding");
                    }
                    short = true;
                    failure = Some(e);
                    match self.reserve.shed_one(&self.listener) {
                        Shed::Refused(peer) => {
                            NodeStats::inc(&self.stats.connections_refused);
                            tracing::debug!(%peer, "refused a connection: out of file descriptors");
                        }
                        Shed::Empty => {
                            pass = Pass::Drained;
                            break;
                        }
                        Shed::Cannot => {
                            pass = Pass::Failed;
                            break;
                        }
                    }
                }
                Step::Failed(e) => {
                    // Not a shortage and not one connection's: the listener itself is
                    // in trouble. Say so, and try again later.
                    NodeStats::inc(&self.stats.accept_failures);
                    tracing::error!(error = %e, "accept failed");
                    failure = Some(e);
                    pass = Pass::Failed;
                    break;
                }
            }
        }
        let state = match pass {
            Pass::Failed => ListenerState::Stuck,
            _ if short => ListenerState::Shedding,
            _ if self.listener_state == ListenerState::Accepting => ListenerState::Accepting,
            // Short before, nothing to accept now: are descriptors back?
            _ if self.reserve.spare_available() => ListenerState::Accepting,
            _ if self.reserve.held() => ListenerState::Shedding,
            _ => ListenerState::Stuck,
        };
        self.set_listener_state(state, failure.as_ref());
        self.accept_at = match (pass, state) {
            (Pass::Bound, _) => Some(Instant::now()),
            (_, ListenerState::Accepting) => None,
            _ => Some(Instant::now() + ACCEPT_RETRY),
        };
    }

    fn set_listener_state(&mut self, state: ListenerState, error: Option<&io::Error>) {
        if state == self.listener_state {
            return;
        }
        let error = error.map(ToString::to_string).unwrap_or_default();
        match state {
            ListenerState::Accepting => {
                tracing::info!("DOSP listener accepting again: file descriptors are back")
            }
            ListenerState::Shedding => tracing::warn!(
                %error,
                "DOSP listener out of file descriptors: refusing new connections with BUSY"
            ),
            ListenerState::Stuck => tracing::error!(
                %error,
                "DOSP listener cannot accept connections, not even to refuse them"
            ),
        }
        self.listener_state = state;
        NodeStats::set(&self.stats.listener_state, state as u64);
    }

    /// The session idle the longest that can be closed without harm: between
    /// requests, and with no input waiting unread (a request just arrived). At most
    /// EVICT_TRIES candidates are looked at, oldest first.
    fn longest_idle(&self) -> Option<(Instant, Token)> {
        let mut skipped = [Token(usize::MAX); EVICT_TRIES];
        for n in 0..EVICT_TRIES {
            let (since, token) = self
                .sessions
                .iter()
                .filter(|(t, _)| !skipped[..n].contains(t))
                .filter_map(|(t, s)| Some((s.idle_since()?, *t)))
                .min()?;
            if !self.sessions[&token].has_unread_input() {
                return Some((since, token));
            }
            skipped[n] = token;
        }
        None
    }

    /// Gives a new connection a session. When the table is full, the session idle the
    /// longest (between requests) is closed to make room; only when every session is
    /// in the middle of a request is the newcomer refused with BUSY. Idle connections
    /// so cannot lock new clients out: the cost is a scan of the table, and only when
    /// it is full.
    fn admit(&mut self, stream: mio::net::TcpStream, peer: SocketAddr, more: &mut Vec<Token>) {
        if self.sessions.len() >= self.cfg.connections_max {
            match self.longest_idle() {
                Some((since, victim)) => {
                    // Routine under pressure, and counted: not worth a line each.
                    if let Some(s) = self.sessions.get(&victim) {
                        tracing::debug!(
                            peer = %s.peer,
                            idle_ms = since.elapsed().as_millis() as u64,
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
                    let max = u32::try_from(self.cfg.connections_max).unwrap_or(u32::MAX);
                    accept::refuse(stream, max);
                    return;
                }
            }
        }
        // The pool holds (or may still make) one pair of buffers per allowed connection, and a
        // session gives its pair back when it closes: with the table below its
        // maximum there is always one.
        let Some(bufs) = self.bufs.take() else {
            NodeStats::inc(&self.stats.connections_refused);
            let max = u32::try_from(self.cfg.connections_max).unwrap_or(u32::MAX);
            accept::refuse(stream, max);
            return;
        };
        let _ = stream.set_nodelay(true);
        let token = Token(self.next_token);
        self.next_token += 1;
        let mut session = Session::new(stream, peer, self.cfg.chunk_max, token.0 as u64, bufs);
        if let Err(e) = self.poll.registry().register(
            session.stream_mut(),
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(%peer, error = %e, "cannot register connection");
            self.bufs.give(session.into_bufs());
            return;
        }
        NodeStats::inc(&self.stats.connections);
        NodeStats::inc(&self.stats.connections_total);
        tracing::debug!(%peer, "connection accepted");
        self.sessions.insert(token, session);
        // Whatever the client sent with its handshake is read now; a session that
        // hits its step bound is driven again next turn like any other.
        self.drive(token, more);
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

    /// Index figures for `/metrics`: walking every entry's extents costs O(objects),
    /// so this runs every INDEX_FIGURES_INTERVAL only.
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
            }
        }
        any
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
            .filter_map(|(t, s)| Some((*t, s.peer, s.timed_out(now, &deadlines)?)))
            .collect();
        for (t, peer, why) in stale {
            tracing::info!(%peer, "closing a connection: {}", why.reason());
            NodeStats::inc(&self.stats.sessions_timed_out);
            self.close(t);
        }
    }

    fn drive(&mut self, token: Token, more: &mut Vec<Token>) {
        let Some(session) = self.sessions.get_mut(&token) else {
            return;
        };
        let mut ctx = Ctx {
            store: &mut self.store,
            stats: &self.stats,
            id: &self.id,
        };
        match session.drive(&mut ctx) {
            Drive::Idle => {}
            Drive::More => more.push(token),
            Drive::Close => self.close(token),
        }
    }

    fn close(&mut self, token: Token) {
        if let Some(mut session) = self.sessions.remove(&token) {
            let mut ctx = Ctx {
                store: &mut self.store,
                stats: &self.stats,
                id: &self.id,
            };
            session.close(&mut ctx);
            let _ = self.poll.registry().deregister(session.stream_mut());
            NodeStats::dec(&self.stats.connections);
            tracing::debug!(peer = %session.peer, "connection closed");
            self.bufs.give(session.into_bufs());
        }
    }
}
