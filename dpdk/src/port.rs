//! Ethernet ports: configuration (queues, RSS), start and stop, stats, link state,
//! MAC address, and the receive and transmit queues that poll loops own.
//!
//! A [`Port`] is the one handle of its port in the process. Configuring, starting
//! and stopping take `&mut Port`; queues borrow `&Port`, so no queue can be polled
//! while the port is being reconfigured or stopped. Each queue has one handle at a
//! time ([`Error::Busy`] otherwise), which a poll loop owns: DPDK's bursts on one
//! queue are not thread-safe, bursts on different queues are.

#![allow(unsafe_code)]

use std::ffi::c_uint;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::eal::{check, Eal};
use crate::error::{Error, Result};
use crate::mbuf::{Burst, Mempool};
use crate::sys;

/// A DPDK ethernet port id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u16);

/// A receive or transmit queue of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u16);

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "port {}", self.0)
    }
}

/// How to configure a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortConfig {
    /// Receive queues (one per poll loop); more than one turns RSS on where the
    /// device offers it.
    pub rx_queues: u16,
    /// Transmit queues.
    pub tx_queues: u16,
    /// Descriptors per receive queue (the driver may round it).
    pub rx_desc: u16,
    /// Descriptors per transmit queue (the driver may round it).
    pub tx_desc: u16,
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig {
            rx_queues: 1,
            tx_queues: 1,
            rx_desc: 1024,
            tx_desc: 1024,
        }
    }
}

/// A port's counters since start (or the last reset), from `rte_eth_stats_get`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets the device dropped because its receive queues were full.
    pub rx_missed: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Transmit errors.
    pub tx_errors: u64,
    /// Receive failures for want of an mbuf.
    pub rx_no_mbuf: u64,
}

/// A port's link state, from `rte_eth_link_get_nowait`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// Whether the link is up.
    pub up: bool,
    /// Speed in Mbit/s (0 if unknown).
    pub speed_mbps: u32,
    /// Full duplex.
    pub full_duplex: bool,
    /// Autonegotiated.
    pub autoneg: bool,
}

/// An ethernet MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The one handle of a port. Dropping it stops the port.
#[derive(Debug)]
pub struct Port<'e> {
    eal: &'e Eal,
    id: PortId,
    rx_queues: u16,
    tx_queues: u16,
    started: bool,
    rss: bool,
    /// Receive queues' handle flags, then transmit queues'.
    taken: Box<[AtomicBool]>,
}

impl<'e> Port<'e> {
    pub(crate) fn new(eal: &'e Eal, id: PortId) -> Self {
        Port {
            eal,
            id,
            rx_queues: 0,
            tx_queues: 0,
            started: false,
            rss: false,
            taken: Box::new([]),
        }
    }

    /// The port's id.
    pub fn id(&self) -> PortId {
        self.id
    }

    /// Configures the (stopped) port with `config`'s queues, receiving into mbufs of
    /// `pool`. With more than one receive queue, RSS spreads flows over them by their
    /// IP/TCP/UDP hash where the device can ([`Port::rss_active`] says whether it did).
    pub fn configure(&mut self, config: &PortConfig, pool: &Mempool<'e>) -> Result<()> {
        if self.started {
            return Err(Error::PortState(self.id.0, "stop it before configuring it"));
        }
        if config.rx_queues == 0 || config.tx_queues == 0 {
            return Err(Error::Invalid(
                "a port needs at least one receive and one transmit queue",
            ));
        }
        if config.rx_desc == 0 || config.tx_desc == 0 {
            return Err(Error::Invalid("a queue needs at least one descriptor"));
        }
        let port = self.id.0;
        self.rx_queues = 0;
        self.tx_queues = 0;
        let mut rss = 0;
        // SAFETY: the port is valid and stopped, and this handle is its only one.
        let rc =
            unsafe { sys::dosd_eth_configure(port, config.rx_queues, config.tx_queues, &mut rss) };
        check("rte_eth_dev_configure", rc)?;
        self.rss = rss != 0;
        let (mut rx_desc, mut tx_desc) = (config.rx_desc, config.tx_desc);
        // SAFETY: the port is configured; both pointers are to local u16s.
        let rc = unsafe { sys::rte_eth_dev_adjust_nb_rx_tx_desc(port, &mut rx_desc, &mut tx_desc) };
        check("rte_eth_dev_adjust_nb_rx_tx_desc", rc)?;
        // SAFETY: reads the port's NUMA node; -1 (any) becomes SOCKET_ID_ANY as unsigned.
        let socket = unsafe { sys::rte_eth_dev_socket_id(port) } as c_uint;
        for q in 0..config.rx_queues {
            // SAFETY: the port is configured with rx_queues queues and stopped; a
            // null rxconf means the driver's defaults; pool is a live packet-mbuf
            // pool, and pools are never freed before EAL cleanup.
            let rc = unsafe {
                sys::rte_eth_rx_queue_setup(
                    port,
                    q,
                    rx_desc,
                    socket,
                    std::ptr::null(),
                    pool.as_ptr(),
                )
            };
            check("rte_eth_rx_queue_setup", rc)?;
        }
        for q in 0..config.tx_queues {
            // SAFETY: as above; a null txconf means the driver's defaults.
            let rc =
                unsafe { sys::rte_eth_tx_queue_setup(port, q, tx_desc, socket, std::ptr::null()) };
            check("rte_eth_tx_queue_setup", rc)?;
        }
        self.rx_queues = config.rx_queues;
        self.tx_queues = config.tx_queues;
        self.taken = (0..usize::from(config.rx_queues) + usize::from(config.tx_queues))
            .map(|_| AtomicBool::new(false))
            .collect();
        Ok(())
    }

    /// Whether the last [`Port::configure`] turned RSS on.
    pub fn rss_active(&self) -> bool {
        self.rss
    }

    /// Starts the configured port.
    pub fn start(&mut self) -> Result<()> {
        if self.rx_queues == 0 {
            return Err(Error::PortState(
                self.id.0,
                "configure it before starting it",
            ));
        }
        if self.started {
            return Ok(());
        }
        // SAFETY: the port is configured with its queues set up, and no queue handle
        // exists (they borrow self, which is borrowed mutably here).
        let rc = unsafe { sys::rte_eth_dev_start(self.id.0) };
        check("rte_eth_dev_start", rc)?;
        self.started = true;
        Ok(())
    }

    /// Stops the port (the driver frees the mbufs its queues still hold).
    pub fn stop(&mut self) -> Result<()> {
        if !self.started {
            return Ok(());
        }
        self.started = false;
        // SAFETY: no queue handle exists (they borrow self, borrowed mutably here),
        // so no burst is in flight.
        let rc = unsafe { sys::rte_eth_dev_stop(self.id.0) };
        check("rte_eth_dev_stop", rc).map(drop)
    }

    /// Whether the port is started.
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// Puts the port in promiscuous mode (drivers without the mode say so).
    pub fn enable_promiscuous(&mut self) -> Result<()> {
        // SAFETY: a valid port, this handle its only one.
        let rc = unsafe { sys::rte_eth_promiscuous_enable(self.id.0) };
        check("rte_eth_promiscuous_enable", rc).map(drop)
    }

    /// Receives every multicast frame (the cluster group's, which the device's unicast
    /// filter would drop); drivers without the mode say so.
    pub fn enable_allmulticast(&mut self) -> Result<()> {
        // SAFETY: a valid port, this handle its only one.
        let rc = unsafe { sys::rte_eth_allmulticast_enable(self.id.0) };
        check("rte_eth_allmulticast_enable", rc).map(drop)
    }

    /// The port's counters.
    pub fn stats(&self) -> Result<PortStats> {
        let mut s = sys::PortStatsC::default();
        // SAFETY: a valid port; s is a local of the shim's struct layout.
        let rc = unsafe { sys::dosd_eth_stats(self.id.0, &mut s) };
        check("rte_eth_stats_get", rc)?;
        Ok(PortStats {
            rx_packets: s.ipackets,
            tx_packets: s.opackets,
            rx_bytes: s.ibytes,
            tx_bytes: s.obytes,
            rx_missed: s.imissed,
            rx_errors: s.ierrors,
            tx_errors: s.oerrors,
            rx_no_mbuf: s.rx_nombuf,
        })
    }

    /// Zeroes the port's counters.
    pub fn reset_stats(&self) -> Result<()> {
        // SAFETY: a valid port.
        let rc = unsafe { sys::rte_eth_stats_reset(self.id.0) };
        check("rte_eth_stats_reset", rc).map(drop)
    }

    /// The link state, without waiting for autonegotiation.
    pub fn link(&self) -> Result<Link> {
        let mut l = sys::LinkC::default();
        // SAFETY: a valid port; l is a local of the shim's struct layout.
        let rc = unsafe { sys::dosd_eth_link(self.id.0, &mut l) };
        check("rte_eth_link_get_nowait", rc)?;
        Ok(Link {
            up: l.up != 0,
            speed_mbps: l.speed_mbps,
            full_duplex: l.full_duplex != 0,
            autoneg: l.autoneg != 0,
        })
    }

    /// The port's MAC address.
    pub fn mac(&self) -> Result<MacAddr> {
        let mut a = sys::EtherAddr::default();
        // SAFETY: a valid port; a is a local rte_ether_addr.
        let rc = unsafe { sys::rte_eth_macaddr_get(self.id.0, &mut a) };
        check("rte_eth_macaddr_get", rc)?;
        Ok(MacAddr(a.bytes))
    }

    /// The handle of receive queue `q` of the started port.
    pub fn rx_queue(&self, q: QueueId) -> Result<RxQueue<'_, 'e>> {
        self.take(q, self.rx_queues, 0)?;
        Ok(RxQueue {
            port: self,
            queue: q,
        })
    }

    /// The handle of transmit queue `q` of the started port.
    pub fn tx_queue(&self, q: QueueId) -> Result<TxQueue<'_, 'e>> {
        self.take(q, self.tx_queues, usize::from(self.rx_queues))?;
        Ok(TxQueue {
            port: self,
            queue: q,
        })
    }

    fn take(&self, q: QueueId, configured: u16, base: usize) -> Result<()> {
        if !self.started {
            return Err(Error::PortState(self.id.0, "start it before polling it"));
        }
        if q.0 >= configured {
            return Err(Error::NoSuchQueue {
                queue: q.0,
                configured,
            });
        }
        let flag = self
            .taken
            .get(base + usize::from(q.0))
            .ok_or(Error::NoSuchQueue {
                queue: q.0,
                configured,
            })?;
        if flag.swap(true, Ordering::AcqRel) {
            return Err(Error::Busy(format!("queue {} of port {}", q.0, self.id.0)));
        }
        Ok(())
    }

    fn release(&self, index: usize) {
        if let Some(flag) = self.taken.get(index) {
            flag.store(false, Ordering::Release);
        }
    }
}

impl Drop for Port<'_> {
    fn drop(&mut self) {
        let _ = self.stop();
        self.eal.release_port(self.id);
    }
}

/// The handle of one receive queue: owned by one poll loop at a time.
#[derive(Debug)]
pub struct RxQueue<'p, 'e> {
    port: &'p Port<'e>,
    queue: QueueId,
}

impl<'e> RxQueue<'_, 'e> {
    /// Receives up to the burst's free room; returns how many arrived (appended to
    /// `burst`). Never blocks.
    pub fn rx_burst(&mut self, burst: &mut Burst<'e>) -> usize {
        let (slots, room) = burst.spare();
        if room == 0 {
            return 0;
        }
        // room <= BURST_MAX (32), so it fits the u16.
        let room = room as u16;
        // SAFETY: the port is started (the handle exists only then and stop needs
        // &mut Port), this handle is the queue's only one, and slots has room
        // writable entries; the driver writes at most room mbuf pointers, which
        // become burst's.
        let n = unsafe { sys::dosd_rte_eth_rx_burst(self.port.id.0, self.queue.0, slots, room) };
        let n = usize::from(n.min(room));
        burst.commit(n);
        n
    }

    /// The queue's id.
    pub fn id(&self) -> QueueId {
        self.queue
    }
}

impl Drop for RxQueue<'_, '_> {
    fn drop(&mut self) {
        self.port.release(usize::from(self.queue.0));
    }
}

/// The handle of one transmit queue: owned by one poll loop at a time.
#[derive(Debug)]
pub struct TxQueue<'p, 'e> {
    port: &'p Port<'e>,
    queue: QueueId,
}

impl<'e> TxQueue<'_, 'e> {
    /// Hands the burst's mbufs to the driver, in order; returns how many it took.
    /// Those it did not take (its ring was full) stay in `burst`, at the front, to
    /// retry or to drop with [`Burst::clear`]. Never blocks.
    pub fn tx_burst(&mut self, burst: &mut Burst<'e>) -> usize {
        let (pkts, len) = burst.filled();
        if len == 0 {
            return 0;
        }
        // len <= BURST_MAX (32), so it fits the u16.
        let len16 = len as u16;
        // SAFETY: the port is started, this handle is the queue's only one, and
        // pkts[..len] are owned mbufs; the driver takes the first n of them.
        let n = unsafe { sys::dosd_rte_eth_tx_burst(self.port.id.0, self.queue.0, pkts, len16) };
        let n = usize::from(n).min(len);
        burst.consumed(n);
        n
    }

    /// The queue's id.
    pub fn id(&self) -> QueueId {
        self.queue
    }
}

impl Drop for TxQueue<'_, '_> {
    fn drop(&mut self) {
        self.port
            .release(usize::from(self.port.rx_queues) + usize::from(self.queue.0));
    }
}
