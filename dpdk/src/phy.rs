//! smoltcp's link layer over DPDK mbufs: [`MbufDevice`] implements
//! [`smoltcp::phy::Device`] on one receive and one transmit queue of a [`Port`](crate::Port).
//!
//! The mbufs are the tokens, so no frame is copied between DPDK and smoltcp:
//! - receiving pulls bursts of up to [`BURST_MAX`] mbufs from the queue and hands them
//!   out one per [`Device::receive`]; the [`MbufRxToken`] lends smoltcp the mbuf's bytes
//!   in place and frees the mbuf when smoltcp is done with them;
//! - transmitting allocates an mbuf from the [`Mempool`] when smoltcp consumes the
//!   [`MbufTxToken`], lets smoltcp write the frame straight into the mbuf's data room
//!   ([`Mbuf::append`]), and queues the mbuf in a transmit burst. The burst goes to the
//!   driver when it is full ([`BURST_MAX`]) and whenever the poll loop calls
//!   [`MbufDevice::flush`] — once per turn, after `Interface::poll` — and on drop.
//!
//! It never blocks and never allocates on the data path. When the pool is empty (or the
//! driver's ring is full and the burst with it), a frame smoltcp has already built is
//! dropped and counted ([`PhyStats`]); TCP retransmits it. [`Device::transmit`] answers
//! `None` while the burst is full and the driver takes nothing, which smoltcp treats as
//! back-pressure.
//!
//! Frames are at most [`MAX_FRAME`] bytes (IP MTU [`MTU`] plus the Ethernet header).
//! A received packet of more than one segment (which the default 2048-byte data room
//! never produces at this MTU) is dropped and counted, since smoltcp wants one slice.
//!
//! Checksums: smoltcp computes every checksum it sends and, by default, verifies every
//! one it receives ([`ChecksumCapabilities::default`]). A kernel peer behind an offloading
//! interface can hand over frames whose TCP/UDP checksum is only *partial* (the kernel
//! expects the "hardware" to finish it): a veth does, see the project's DPDK reference.
//! DPDK's `net_tap` does not: it never turns on the tun device's checksum offload
//! (`TUNSETOFFLOAD`), so the kernel completes every checksum before the frame reaches
//! the tap, and the default (verify everything) is right for it — the `tap_tcp` test
//! runs with full verification to prove it. For a device that does pass partial
//! checksums, [`MbufDevice::set_checksums`] can relax verification (e.g. `Checksum::Tx`
//! for TCP and UDP) before the `Interface` is built; the interface copies the
//! capabilities when it is created. dosd's `DpdkPort` does so: it verifies the IPv4,
//! TCP and UDP checksums of every received frame itself, before smoltcp sees it (the
//! dataplane's frame check, through [`MbufDevice::peek_rx`] and
//! [`MbufDevice::discard_rx`]), and leaves smoltcp only to compute them.

use smoltcp::phy::{ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::mbuf::{Burst, Mbuf, Mempool, BURST_MAX};
use crate::port::{RxQueue, TxQueue};

/// The IP MTU the device announces to smoltcp.
pub const MTU: usize = 1500;

/// The largest Ethernet frame (without FCS) the device sends or accepts: [`MTU`] plus
/// the 14-byte Ethernet header.
pub const MAX_FRAME: usize = MTU + 14;

/// How many times [`MbufDevice`]'s drop offers the transmit burst to the driver.
const DROP_FLUSH_TRIES: usize = 64;

/// What the device counted since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhyStats {
    /// Frames handed to smoltcp.
    pub rx_frames: u64,
    /// Received packets dropped because they had more than one segment.
    pub rx_dropped: u64,
    /// Frames the driver took for transmission.
    pub tx_frames: u64,
    /// Frames smoltcp built that were dropped because the pool had no mbuf.
    pub tx_no_mbuf: u64,
    /// Frames smoltcp built that were dropped because the burst was full and the
    /// driver would take none of it, or because they did not fit an mbuf.
    pub tx_dropped: u64,
}

/// smoltcp's [`Device`] on one receive and one transmit queue of a port, with mbufs
/// from one pool. One poll loop owns it (as it owns the queues).
#[derive(Debug)]
pub struct MbufDevice<'p, 'e> {
    rx: RxQueue<'p, 'e>,
    /// What the last receive burst brought: `held[next..end]` are still to hand out.
    held: [Option<Mbuf<'e>>; BURST_MAX],
    next: usize,
    end: usize,
    /// Receive scratch burst (empty between receives).
    rx_burst: Burst<'e>,
    rx_frames: u64,
    rx_dropped: u64,
    tx: TxSide<'p, 'e>,
    caps: DeviceCapabilities,
}

/// The transmit half, which a [`MbufTxToken`] borrows while an [`MbufRxToken`] is out.
#[derive(Debug)]
struct TxSide<'p, 'e> {
    queue: TxQueue<'p, 'e>,
    pool: &'p Mempool<'e>,
    burst: Burst<'e>,
    /// Where smoltcp writes a frame that has no mbuf to go into (it is then dropped).
    spill: Vec<u8>,
    tx_frames: u64,
    tx_no_mbuf: u64,
    tx_dropped: u64,
}

impl<'p, 'e> MbufDevice<'p, 'e> {
    /// A device receiving from `rx` and transmitting on `tx`, building frames in mbufs
    /// of `pool`. Capabilities: Ethernet, [`MAX_FRAME`]-byte frames, every checksum
    /// computed and verified by smoltcp.
    pub fn new(rx: RxQueue<'p, 'e>, tx: TxQueue<'p, 'e>, pool: &'p Mempool<'e>) -> Self {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps.max_burst_size = Some(BURST_MAX);
        caps.checksum = ChecksumCapabilities::default();
        MbufDevice {
            rx,
            held: [const { None }; BURST_MAX],
            next: 0,
            end: 0,
            rx_burst: Burst::new(),
            rx_frames: 0,
            rx_dropped: 0,
            tx: TxSide {
                queue: tx,
                pool,
                burst: Burst::new(),
                spill: vec![0; MAX_FRAME],
                tx_frames: 0,
                tx_no_mbuf: 0,
                tx_dropped: 0,
            },
            caps,
        }
    }

    /// Replaces the checksum capabilities (see the module's note on partial
    /// checksums). Call it before building the smoltcp `Interface`, which copies the
    /// capabilities when it is created.
    pub fn set_checksums(&mut self, checksums: ChecksumCapabilities) {
        self.caps.checksum = checksums;
    }

    /// Hands the queued transmit burst to the driver; returns how many frames it took.
    /// Frames it did not take (its ring was full) stay queued for the next flush. The
    /// poll loop calls this once per turn, after `Interface::poll`.
    pub fn flush(&mut self) -> usize {
        self.tx.flush()
    }

    /// Frames queued for transmission and not yet handed to the driver.
    pub fn tx_pending(&self) -> usize {
        self.tx.burst.len()
    }

    /// The device's counters.
    pub fn stats(&self) -> PhyStats {
        PhyStats {
            rx_frames: self.rx_frames,
            rx_dropped: self.rx_dropped,
            tx_frames: self.tx.tx_frames,
            tx_no_mbuf: self.tx.tx_no_mbuf,
            tx_dropped: self.tx.tx_dropped,
        }
    }

    /// Makes `held[next]` the next received one-segment mbuf, polling the queue when
    /// none is held; whether there is one. Multi-segment packets met on the way are
    /// dropped and counted.
    fn fill(&mut self) -> bool {
        loop {
            if self.next == self.end {
                self.next = 0;
                self.end = 0;
                if self.rx.rx_burst(&mut self.rx_burst) == 0 {
                    return false;
                }
                for (slot, m) in self.held.iter_mut().zip(self.rx_burst.drain()) {
                    *slot = Some(m);
                    self.end += 1;
                }
            }
            match &self.held[self.next] {
                Some(m) if m.segments() == 1 => return true,
                Some(_) => {
                    self.held[self.next] = None;
                    self.rx_dropped += 1;
                }
                None => {}
            }
            self.next += 1;
        }
    }

    /// The next received one-segment mbuf, polling the queue when none is held.
    fn next_rx(&mut self) -> Option<Mbuf<'e>> {
        if !self.fill() {
            return None;
        }
        let m = self.held[self.next].take();
        self.next += 1;
        if m.is_some() {
            self.rx_frames += 1;
        }
        m
    }

    /// The bytes of the frame the next [`Device::receive`] will hand to smoltcp,
    /// polling the queue when none is held; `None` when nothing was received. A frame
    /// checker looks at it here and either lets smoltcp have it or
    /// [`discard_rx`](Self::discard_rx)s it, so a frame smoltcp must not see never
    /// reaches it.
    pub fn peek_rx(&mut self) -> Option<&[u8]> {
        if !self.fill() {
            return None;
        }
        self.held[self.next].as_ref().map(|m| m.data())
    }

    /// Frees the frame [`peek_rx`](Self::peek_rx) showed (the next one received) without
    /// handing it to smoltcp. Not counted here: the caller counts why.
    pub fn discard_rx(&mut self) {
        if self.fill() {
            self.held[self.next] = None;
            self.next += 1;
        }
    }
}

impl TxSide<'_, '_> {
    /// A scratch buffer of `len` bytes for a frame that will be dropped.
    fn spill(&mut self, len: usize) -> &mut [u8] {
        if self.spill.len() < len {
            self.spill.resize(len, 0);
        }
        &mut self.spill[..len]
    }

    fn flush(&mut self) -> usize {
        let n = self.queue.tx_burst(&mut self.burst);
        self.tx_frames += n as u64;
        n
    }

    /// Whether a frame could be queued now (flushing a full burst first).
    fn has_room(&mut self) -> bool {
        if self.burst.is_full() {
            self.flush();
        }
        !self.burst.is_full()
    }
}

impl<'e> TxSide<'_, 'e> {
    /// Queues a built frame, sending the burst once it is full.
    fn queue(&mut self, m: Mbuf<'e>) {
        if !self.has_room() {
            self.tx_dropped += 1;
            return;
        }
        if self.burst.push(m).is_err() {
            self.tx_dropped += 1;
        }
        if self.burst.is_full() {
            self.flush();
        }
    }
}

impl Drop for MbufDevice<'_, '_> {
    fn drop(&mut self) {
        for _ in 0..DROP_FLUSH_TRIES {
            if self.tx.burst.is_empty() {
                break;
            }
            self.tx.flush();
        }
        // What the driver still refused, and undelivered received mbufs, are freed
        // by their bursts' and options' drops.
    }
}

impl<'p, 'e> Device for MbufDevice<'p, 'e> {
    type RxToken<'a>
        = MbufRxToken<'e>
    where
        Self: 'a;
    type TxToken<'a>
        = MbufTxToken<'a, 'p, 'e>
    where
        Self: 'a;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let mbuf = self.next_rx()?;
        Some((MbufRxToken { mbuf }, MbufTxToken { tx: &mut self.tx }))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        if !self.tx.has_room() {
            return None;
        }
        Some(MbufTxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.caps.clone()
    }
}

/// A received frame: smoltcp reads the mbuf's bytes in place; the mbuf is freed after.
#[derive(Debug)]
pub struct MbufRxToken<'e> {
    mbuf: Mbuf<'e>,
}

impl smoltcp::phy::RxToken for MbufRxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.mbuf.data())
        // self.mbuf drops here: freed back to its pool.
    }
}

/// The right to send one frame: consuming it builds the frame in a fresh mbuf and
/// queues that mbuf in the transmit burst.
#[derive(Debug)]
pub struct MbufTxToken<'a, 'p, 'e> {
    tx: &'a mut TxSide<'p, 'e>,
}

impl smoltcp::phy::TxToken for MbufTxToken<'_, '_, '_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let tx = self.tx;
        let mut m = match tx.pool.alloc() {
            Ok(m) => m,
            Err(_) => {
                tx.tx_no_mbuf += 1;
                return f(tx.spill(len));
            }
        };
        let r = match m.append(len) {
            Ok(buf) => f(buf),
            Err(_) => {
                // Longer than an mbuf's data room: smoltcp never asks for more than
                // MAX_FRAME, so this is a pool made too small.
                tx.tx_dropped += 1;
                drop(m);
                return f(tx.spill(len));
            }
        };
        tx.queue(m);
        r
    }
}
