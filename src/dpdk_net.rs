//! `--net dpdk`: the dataplane loops on one DPDK port, each with its own receive and
//! transmit queue and smoltcp over its mbufs ([`DpdkPort`]). EAL is once per process
//! and makes the thread that initialises it its main lcore (pinned as `-l` says), and
//! the port's handles borrow the EAL guard: so everything is made on the `dataplane-0`
//! thread, which runs loop 0 itself and loops 1… on scoped threads (pinned like the
//! kernel backend's: cores 1, 2, …); each reports back over a channel once it is ready
//! to serve (or why it is not).
//!
//! The NIC spreads flows over the queues (RSS where the device has it; a `net_tap`'s
//! kernel side picks the queue by flow hash); a request that lands on a loop that does
//! not own its object's shard crosses to the owner through the mesh, as on the kernel
//! backend. ARP frames are shared between the loops ([`ArpShare`]). With
//! `--http-listen`, each loop's port also listens on the HTTP port (signed URLs), its
//! connections sharing the loop's `connections_max` with DOSP's.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use dataplane::handle::DataplaneEnd;
use dataplane::server::dpdk_port::{ArpShare, DpdkPort, DpdkPortOptions};
use dataplane::server::shards::Shards;
use dataplane::server::{Server, ServerConfig};
use dpdk::{Eal, MbufDevice, Mempool, PortConfig, PortId, QueueId};

use crate::config::DpdkNet;

/// How long start-up (EAL, the port, smoltcp) may take before dosd gives up.
const READY_WAIT: Duration = Duration::from_secs(60);
/// The port's mbuf pool: enough for its receive ring, bursts in flight and the
/// per-lcore cache.
const MBUFS: u32 = 8191;
const MBUF_CACHE: u32 = 64;

/// Starts the dataplane threads serving DOSP on DPDK port 0 at `net.addr` and
/// `listen`'s port (and signed URLs over HTTP on `http`'s port, when given), one loop
/// per shard, and waits until every loop serves. Returns the thread of loop 0 (it runs
/// the others and joins them), the DOSP address and the HTTP one.
pub fn start(
    net: &DpdkNet,
    listen: SocketAddr,
    http: Option<SocketAddr>,
    cfg: ServerConfig,
    shards: Vec<Shards>,
    ends: Vec<DataplaneEnd>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<(
    JoinHandle<io::Result<Shards>>,
    SocketAddrV4,
    Option<SocketAddrV4>,
)> {
    let local = SocketAddrV4::new(net.addr, listen.port());
    // Each loop's port listens on the HTTP port too (its own listeners, like DOSP's).
    let http_local = http.map(|h| SocketAddrV4::new(net.addr, h.port()));
    let opts = DpdkPortOptions {
        addr: net.addr,
        prefix_len: net.prefix_len,
        gateway: net.gateway,
        port: listen.port(),
        http_port: http_local.map(|h| h.port()),
        connections_max: cfg.connections_max,
        // Every loop: RSS puts a datagram on any queue.
        udp_unicast: true,
        multicast: Some(cfg.multicast_group),
    };
    anyhow::ensure!(
        shards.len() == ends.len() && !shards.is_empty(),
        "one shard and one dataplane end per loop"
    );
    let args = net.eal_args.clone();
    let (ready_tx, ready_rx) = mpsc::channel();
    let loops = shards.len();
    let thread = std::thread::Builder::new()
        .name("dataplane-0".into())
        .spawn({
            let stop = Arc::clone(stop);
            move || {
                let result = serve(&args, &opts, cfg, shards, ends, &ready_tx, &stop);
                // A loop that ends ends the node.
                stop.store(true, Ordering::Relaxed);
                result.map_err(|e| {
                    let text = format!("{e:#}");
                    // Heard only while start-up is still being waited for.
                    let _ = ready_tx.send(Err(text.clone()));
                    io::Error::other(text)
                })
            }
        })
        .context("cannot start the dataplane thread")?;
    for _ in 0..loops {
        match ready_rx.recv_timeout(READY_WAIT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                stop.store(true, Ordering::Relaxed);
                let _ = thread.join();
                anyhow::bail!("the DPDK backend did not start: {e}")
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                stop.store(true, Ordering::Relaxed);
                anyhow::bail!("the DPDK backend was not ready after {READY_WAIT:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
                anyhow::bail!("the DPDK dataplane thread ended before it was ready")
            }
        }
    }
    Ok((thread, local, http_local))
}

/// On the dataplane-0 thread: EAL, port 0 with one receive and one transmit queue per
/// loop, then loop 0 here and loops 1… on threads of their own (scoped: the queues
/// borrow the port, which borrows EAL), until `stop`.
fn serve(
    args: &[String],
    opts: &DpdkPortOptions,
    cfg: ServerConfig,
    shards: Vec<Shards>,
    ends: Vec<DataplaneEnd>,
    ready: &mpsc::Sender<Result<(), String>>,
    stop: &AtomicBool,
) -> anyhow::Result<Shards> {
    let loops = shards.len();
    let queues = u16::try_from(loops).context("too many dataplane loops for one port")?;
    let eal = Eal::init(args).context("cannot initialise DPDK (EAL; see --dpdk-args)")?;
    let ports = eal.port_count();
    anyhow::ensure!(
        ports > 0,
        "DPDK found no port (--dpdk-args must give a --vdev or allow a bound PCI device)"
    );
    if ports > 1 {
        tracing::warn!(ports, "DPDK found several ports; DOSP uses port 0");
    }
    // A pool per loop: no loop takes mbufs from another's. Loops 1… register their
    // threads as (non-EAL) lcores, so each pool's per-lcore cache works for its loop.
    let pools = (0..loops)
        .map(|k| {
            Mempool::new(
                &eal,
                &format!("dosd_pool_{k}"),
                MBUFS,
                MBUF_CACHE,
                Mempool::DEFAULT_DATA_ROOM,
            )
            .with_context(|| format!("cannot create the mbuf pool of loop {k}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut port = eal.port(PortId(0)).context("cannot take DPDK port 0")?;
    let config = PortConfig {
        rx_queues: queues,
        tx_queues: queues,
        ..PortConfig::default()
    };
    port.configure(&config, &pools[0]).with_context(|| {
        format!("cannot configure DPDK port 0 with {queues} receive and transmit queues (one per dataplane loop)")
    })?;
    port.start().context("cannot start DPDK port 0")?;
    // The cluster group's frames (heartbeats, multicast LOCATE) are multicast: a real
    // NIC filters them out unless told otherwise.
    if let Err(e) = port.enable_allmulticast() {
        tracing::warn!(error = %e, "DPDK port 0 cannot receive all multicast: multicast LOCATE may not reach this node");
    }
    let mac = port.mac().context("cannot read DPDK port 0's MAC")?;
    if loops > 1 && !port.rss_active() {
        tracing::warn!(
            loops,
            "DPDK port 0 offers no RSS: which queue (loop) a flow lands on is the device's choice"
        );
    }
    tracing::info!(
        addr = %opts.addr,
        prefix_len = opts.prefix_len,
        port = opts.port,
        mac = %mac,
        queues,
        rss = port.rss_active(),
        lcore = ?eal.lcore_id(),
        "DPDK port 0 started"
    );
    let port = &port;
    let mut arp = dataplane::server::dpdk_port::arp_shares(loops).into_iter();
    let mut work: Vec<_> = shards
        .into_iter()
        .zip(ends)
        .zip(pools.iter())
        .map(|((shard, end), pool)| (shard, end, pool, arp.next()))
        .collect();
    let first = work.remove(0);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let eal = &eal;
    std::thread::scope(|scope| {
        let mut others = Vec::new();
        for (i, (shard, end, pool, arp)) in work.into_iter().enumerate() {
            let k = i + 1;
            let pin = (cores.len() > 1).then(|| cores[(1 + k) % cores.len()]);
            let cfg = cfg.clone();
            let ready = ready.clone();
            let t = std::thread::Builder::new()
                .name(format!("dataplane-{k}"))
                .spawn_scoped(scope, move || {
                    if let Some(core) = pin {
                        if !core_affinity::set_for_current(core) {
                            tracing::warn!(
                                core = core.id,
                                "could not pin the dataplane; running unpinned"
                            );
                        }
                    }
                    // An lcore id gives the loop its pool's per-lcore cache.
                    let _lcore = eal
                        .register_thread()
                        .map_err(|e| tracing::warn!(loop_index = k, error = %e, "dataplane loop is no EAL lcore: its mbuf pool has no per-lcore cache"))
                        .ok();
                    let r = one_loop(port, k, mac, pool, arp, opts, cfg, shard, end, &ready, stop);
                    // A loop that ends ends the node.
                    stop.store(true, Ordering::Relaxed);
                    if let Err(e) = &r {
                        let _ = ready.send(Err(format!("{e:#}")));
                    }
                    r
                })
                .context("cannot start a dataplane thread")?;
            others.push(t);
        }
        let (shard, end, pool, arp) = first;
        let r0 = one_loop(port, 0, mac, pool, arp, opts, cfg, shard, end, ready, stop);
        stop.store(true, Ordering::Relaxed);
        let mut result = r0;
        for t in others {
            let r = t
                .join()
                .map_err(|_| anyhow::anyhow!("a dataplane thread panicked"))
                .and_then(|r| r.map(|_| ()));
            if let (Ok(_), Err(e)) = (&result, r) {
                result = Err(e);
            }
        }
        result
    })
}

/// One loop: its queues of the port, smoltcp on them, the loop until `stop`.
#[allow(clippy::too_many_arguments)]
fn one_loop<'e>(
    port: &dpdk::Port<'e>,
    k: usize,
    mac: dpdk::MacAddr,
    pool: &Mempool<'e>,
    arp: Option<ArpShare>,
    opts: &DpdkPortOptions,
    cfg: ServerConfig,
    shard: Shards,
    end: DataplaneEnd,
    ready: &mpsc::Sender<Result<(), String>>,
    stop: &AtomicBool,
) -> anyhow::Result<Shards> {
    let q = QueueId(u16::try_from(k).context("queue number")?);
    let rx = port
        .rx_queue(q)
        .with_context(|| format!("cannot take port 0's receive queue {k}"))?;
    let tx = port
        .tx_queue(q)
        .with_context(|| format!("cannot take port 0's transmit queue {k}"))?;
    let device = MbufDevice::new(rx, tx, pool);
    let mut dport = DpdkPort::new(device, mac, opts)
        .with_context(|| format!("cannot set up smoltcp on port 0 queue {k}"))?;
    if let Some(arp) = arp {
        dport.share_arp(arp);
    }
    // Frames the port drops before smoltcp are counted in the loop's own counters.
    if let Some(stats) = end.stats.of_loop(usize::from(end.loop_index)) {
        dport.count_into(Arc::clone(stats));
    }
    let server = Server::with_port(dport, cfg, shard, end)
        .with_context(|| format!("cannot start dataplane loop {k} on the DPDK port"))?;
    tracing::info!(
        loop_index = k,
        queue = k,
        http = ?opts.http_port,
        "dataplane loop serving DOSP on the DPDK port"
    );
    let _ = ready.send(Ok(()));
    server
        .run(stop)
        .with_context(|| format!("dataplane loop {k} failed"))
}
