//! `--net dpdk`: the one dataplane loop on a DPDK port, smoltcp over its mbufs
//! ([`DpdkPort`]). EAL is once per process and makes the thread that initialises it its
//! main lcore (pinned as `-l` says), and the port's handles borrow the EAL guard: so
//! everything is made on the `dataplane-0` thread itself, which reports back over a
//! channel once the loop is ready to serve (or why it is not).

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use dataplane::handle::DataplaneEnd;
use dataplane::server::dpdk_port::{DpdkPort, DpdkPortOptions};
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

/// Starts the `dataplane-0` thread serving DOSP on DPDK port 0 at `net.addr` and
/// `listen`'s port, and waits until it serves. Returns the thread and the DOSP
/// address.
pub fn start(
    net: &DpdkNet,
    listen: SocketAddr,
    cfg: ServerConfig,
    shards: Shards,
    end: DataplaneEnd,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<(JoinHandle<io::Result<Shards>>, SocketAddrV4)> {
    let local = SocketAddrV4::new(net.addr, listen.port());
    let opts = DpdkPortOptions {
        addr: net.addr,
        prefix_len: net.prefix_len,
        gateway: net.gateway,
        port: listen.port(),
        connections_max: cfg.connections_max,
        udp_unicast: true,
        multicast: Some(cfg.multicast_group),
    };
    let args = net.eal_args.clone();
    let (ready_tx, ready_rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("dataplane-0".into())
        .spawn({
            let stop = Arc::clone(stop);
            move || {
                let result = serve(&args, &opts, cfg, shards, end, &ready_tx, &stop);
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
    match ready_rx.recv_timeout(READY_WAIT) {
        Ok(Ok(())) => Ok((thread, local)),
        Ok(Err(e)) => {
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

/// On the dataplane thread: EAL, port 0, smoltcp, the loop until `stop`.
fn serve(
    args: &[String],
    opts: &DpdkPortOptions,
    cfg: ServerConfig,
    shards: Shards,
    end: DataplaneEnd,
    ready: &mpsc::Sender<Result<(), String>>,
    stop: &AtomicBool,
) -> anyhow::Result<Shards> {
    let eal = Eal::init(args).context("cannot initialise DPDK (EAL; see --dpdk-args)")?;
    let ports = eal.port_count();
    anyhow::ensure!(
        ports > 0,
        "DPDK found no port (--dpdk-args must give a --vdev or allow a bound PCI device)"
    );
    if ports > 1 {
        tracing::warn!(ports, "DPDK found several ports; DOSP uses port 0");
    }
    let pool = Mempool::new(
        &eal,
        "dosd_pool",
        MBUFS,
        MBUF_CACHE,
        Mempool::DEFAULT_DATA_ROOM,
    )
    .context("cannot create the mbuf pool")?;
    let mut port = eal.port(PortId(0)).context("cannot take DPDK port 0")?;
    port.configure(&PortConfig::default(), &pool)
        .context("cannot configure DPDK port 0")?;
    port.start().context("cannot start DPDK port 0")?;
    let mac = port.mac().context("cannot read DPDK port 0's MAC")?;
    let rx = port
        .rx_queue(QueueId(0))
        .context("cannot take port 0's receive queue")?;
    let tx = port
        .tx_queue(QueueId(0))
        .context("cannot take port 0's transmit queue")?;
    let device = MbufDevice::new(rx, tx, &pool);
    let mut dport = DpdkPort::new(device, mac, opts).context("cannot set up smoltcp on port 0")?;
    // Frames the port drops before smoltcp are counted in the loop's own counters.
    if let Some(stats) = end.stats.of_loop(usize::from(end.loop_index)) {
        dport.count_into(Arc::clone(stats));
    }
    let server = Server::with_port(dport, cfg, shards, end)
        .context("cannot start the dataplane loop on the DPDK port")?;
    tracing::info!(
        addr = %opts.addr,
        prefix_len = opts.prefix_len,
        port = opts.port,
        mac = %mac,
        lcore = ?eal.lcore_id(),
        "DPDK port 0 serving DOSP"
    );
    let _ = ready.send(Ok(()));
    server.run(stop).context("dataplane loop failed")
}
