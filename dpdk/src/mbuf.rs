//! Packet-mbuf pools, mbufs and bursts of them, and external buffers.
//!
//! An [`Mbuf`] owns one DPDK mbuf (the chain hanging off it included) and frees it on
//! drop. Its bytes are readable as `&[u8]`; they are writable only while they belong
//! to this mbuf alone (its own data room, one reference), never those of an external
//! buffer, which stay the owner's. A [`Burst`] is a fixed array of up to
//! [`BURST_MAX`] mbufs: what a receive fills and a transmit drains, with no
//! allocation.

#![allow(unsafe_code)]

use std::ffi::{c_void, CString};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;

use crate::eal::{check, last_error, Eal};
use crate::error::{Error, Result};
use crate::sys::{self, ExtSharedInfo, RteMbuf, RteMempool};

/// The most mbufs a [`Burst`] holds: one receive or transmit call's worth.
pub const BURST_MAX: usize = 32;

/// DPDK's `SOCKET_ID_ANY`.
const SOCKET_ID_ANY: i32 = -1;

/// A pool of packet mbufs (`rte_pktmbuf_pool_create`). Pools are made at start-up
/// and live as long as the [`Eal`]: dropping the handle does not free the pool
/// (`rte_eal_cleanup` releases its memory), so mbufs from it never dangle.
#[derive(Debug)]
pub struct Mempool<'e> {
    ptr: NonNull<RteMempool>,
    name: Box<str>,
    _eal: PhantomData<&'e Eal>,
}

// SAFETY: a DPDK mempool is multi-producer/multi-consumer (the default ring
// handler); threads without an lcore use it without a cache.
unsafe impl Send for Mempool<'_> {}
// SAFETY: as for Send; every method takes &self and DPDK synchronises.
unsafe impl Sync for Mempool<'_> {}

impl<'e> Mempool<'e> {
    /// The data room of DPDK's default mbuf (`RTE_MBUF_DEFAULT_BUF_SIZE`): 2048 bytes
    /// of frame after 128 bytes of headroom.
    pub const DEFAULT_DATA_ROOM: u16 = 2048 + 128;

    /// Creates the pool `name` (unique in the process) of `mbufs` mbufs, each with a
    /// `data_room`-byte buffer (headroom included), and a per-lcore cache of
    /// `cache` mbufs. Pools are allocated at start-up and bound everything: an empty
    /// pool makes [`Mempool::alloc`] fail, it never grows.
    pub fn new(_eal: &'e Eal, name: &str, mbufs: u32, cache: u32, data_room: u16) -> Result<Self> {
        if mbufs == 0 {
            return Err(Error::Invalid("a mempool needs at least one mbuf"));
        }
        let c_name =
            CString::new(name).map_err(|_| Error::Invalid("mempool name contains a NUL byte"))?;
        // SAFETY: EAL is initialised (a borrow of it was passed); c_name outlives the
        // call, which copies it.
        let ptr = unsafe {
            sys::rte_pktmbuf_pool_create(c_name.as_ptr(), mbufs, cache, 0, data_room, SOCKET_ID_ANY)
        };
        let ptr = NonNull::new(ptr).ok_or_else(|| last_error("rte_pktmbuf_pool_create"))?;
        Ok(Mempool {
            ptr,
            name: name.into(),
            _eal: PhantomData,
        })
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many mbufs are free (not counting other lcores' caches exactly).
    pub fn available(&self) -> u32 {
        // SAFETY: ptr is a live mempool (pools outlive their handles).
        unsafe { sys::rte_mempool_avail_count(self.ptr.as_ptr()) }
    }

    /// A fresh mbuf with no data; [`Error::PoolEmpty`] when none is free.
    pub fn alloc(&self) -> Result<Mbuf<'e>> {
        // SAFETY: ptr is a live packet-mbuf pool.
        let m = unsafe { sys::dosd_rte_pktmbuf_alloc(self.ptr.as_ptr()) };
        NonNull::new(m)
            .map(Mbuf::from_raw)
            .ok_or_else(|| Error::PoolEmpty(self.name.to_string()))
    }

    /// An mbuf whose data is `owner`'s bytes, attached as an external buffer: no copy.
    ///
    /// The bytes stay where `owner` keeps them (which is why `owner` moves in: it is
    /// held, untouched, at a fixed address) until the last mbuf referring to them is
    /// freed — by dosd, or by a driver once it has sent them — and then `on_free`
    /// gets `owner` back, exactly once, on whichever thread freed the mbuf. If no
    /// mbuf can be made, `on_free` runs before the error is returned, so the owner
    /// always gets it back. The bytes are read-only through the mbuf
    /// ([`Mbuf::data_mut`] refuses them); they may be at most 65535 bytes (an mbuf's
    /// buffer length is 16 bits).
    ///
    /// Their IO address is the virtual one in IOVA-as-VA mode; in physical mode it is
    /// what EAL can look up, so DMA-capable drivers need the memory registered with
    /// DPDK (`rte_extmem_register`) first. Software vdevs copy with the CPU and need
    /// nothing.
    pub fn alloc_external<T, F>(&self, owner: T, on_free: F) -> Result<Mbuf<'e>>
    where
        T: AsRef<[u8]> + Send + 'static,
        F: FnOnce(T) + Send + 'static,
    {
        let holder = Box::new(ExtHolder {
            shinfo: ExtSharedInfo {
                free_cb: Some(ext_free::<T, F>),
                fcb_opaque: std::ptr::null_mut(),
                refcnt: 1,
            },
            payload: Some((owner, on_free)),
        });
        let holder = Box::into_raw(holder);
        // SAFETY: holder came from Box::into_raw just above and is not shared yet;
        // the shared info must name the allocation it lives in so that ext_free can
        // rebuild the box.
        unsafe { (*holder).shinfo.fcb_opaque = holder.cast() };
        // SAFETY: payload is Some (set above) and no one else can reach it; the slice
        // stays valid while the box lives, since the owner is neither moved nor
        // touched until ext_free takes it out.
        let bytes: &[u8] = match unsafe { &(*holder).payload } {
            Some((owner, _)) => owner.as_ref(),
            None => &[],
        };
        let (addr, len) = (bytes.as_ptr().cast_mut().cast::<c_void>(), bytes.len());
        let give_back = |error: Error| {
            // SAFETY: no mbuf refers to the holder (attach did not happen), so this
            // is the only owner; ext_free runs the callback and frees the box.
            unsafe { ext_free::<T, F>(addr, holder.cast()) };
            error
        };
        let Ok(len) = u16::try_from(len) else {
            return Err(give_back(Error::NoRoom(
                "an external buffer holds at most 65535 bytes",
            )));
        };
        let m = match self.alloc() {
            Ok(m) => m,
            Err(e) => return Err(give_back(e)),
        };
        // ExtHolder is repr(C) with the shared info first.
        let shinfo = holder.cast::<ExtSharedInfo>();
        // SAFETY: reads EAL's IOVA mode (and, in physical mode, the page map) only.
        let iova = unsafe { sys::dosd_ext_iova(addr) };
        // SAFETY: m is a fresh direct mbuf; addr..addr+len stays valid and unchanged
        // until the shared info's callback runs; the shared info lives in the holder,
        // freed only by that callback; refcnt is 1 for this one mbuf.
        unsafe { sys::dosd_rte_pktmbuf_attach_extbuf(m.ptr.as_ptr(), addr, iova, len, shinfo) };
        // From here the mbuf owns the holder: dropping m runs ext_free.
        // SAFETY: m is a live mbuf whose buffer (after attach) is exactly len bytes
        // with data_off 0, so appending len bytes marks the whole buffer as data.
        let tail = unsafe { sys::dosd_rte_pktmbuf_append(m.ptr.as_ptr(), len) };
        if tail.is_null() && len > 0 {
            return Err(Error::NoRoom("external buffer does not fit its mbuf"));
        }
        Ok(m)
    }

    pub(crate) fn as_ptr(&self) -> *mut RteMempool {
        self.ptr.as_ptr()
    }
}

/// What an external buffer's shared info points back to: the shared info itself (at
/// a fixed address for as long as an mbuf uses it), the owner of the bytes and the
/// callback that gets the owner back.
#[repr(C)]
struct ExtHolder<T, F> {
    shinfo: ExtSharedInfo,
    payload: Option<(T, F)>,
}

/// DPDK's free callback for [`Mempool::alloc_external`] buffers: runs when the last
/// mbuf using the buffer is freed, hands the owner back and frees the holder.
unsafe extern "C" fn ext_free<T, F>(_addr: *mut c_void, opaque: *mut c_void)
where
    F: FnOnce(T),
{
    // SAFETY: opaque is the Box<ExtHolder<T, F>> that alloc_external leaked, and DPDK
    // calls this once, when the shared refcount drops to zero, after which it no
    // longer touches the shared info inside it.
    let mut holder = unsafe { Box::from_raw(opaque.cast::<ExtHolder<T, F>>()) };
    if let Some((owner, on_free)) = holder.payload.take() {
        // A panic must not unwind into DPDK's C frames.
        let _ = catch_unwind(AssertUnwindSafe(move || on_free(owner)));
    }
}

/// One packet mbuf (and any segments chained to it), freed on drop.
#[repr(transparent)]
#[derive(Debug)]
pub struct Mbuf<'e> {
    ptr: NonNull<RteMbuf>,
    _eal: PhantomData<&'e Eal>,
}

// SAFETY: an Mbuf is the only handle to its mbuf; DPDK mbufs may move between threads
// (free returns them to their thread-safe pool).
unsafe impl Send for Mbuf<'_> {}

impl<'e> Mbuf<'e> {
    fn from_raw(ptr: NonNull<RteMbuf>) -> Self {
        Mbuf {
            ptr,
            _eal: PhantomData,
        }
    }

    /// Gives up ownership: the caller (a transmit) now frees it.
    fn into_raw(self) -> *mut RteMbuf {
        let p = self.ptr.as_ptr();
        std::mem::forget(self);
        p
    }

    /// Bytes of data in the first segment.
    pub fn data_len(&self) -> usize {
        // SAFETY: ptr is a live mbuf owned by self.
        usize::from(unsafe { sys::dosd_rte_pktmbuf_data_len(self.ptr.as_ptr()) })
    }

    /// Bytes of data in the whole packet (every segment).
    pub fn pkt_len(&self) -> usize {
        // SAFETY: ptr is a live mbuf owned by self.
        unsafe { sys::dosd_rte_pktmbuf_pkt_len(self.ptr.as_ptr()) as usize }
    }

    /// How many segments the packet has.
    pub fn segments(&self) -> u16 {
        // SAFETY: ptr is a live mbuf owned by self.
        unsafe { sys::dosd_rte_pktmbuf_nb_segs(self.ptr.as_ptr()) }
    }

    /// Free bytes before the data in the first segment.
    pub fn headroom(&self) -> usize {
        // SAFETY: ptr is a live mbuf owned by self.
        usize::from(unsafe { sys::dosd_rte_pktmbuf_headroom(self.ptr.as_ptr()) })
    }

    /// Free bytes after the data in the first segment.
    pub fn tailroom(&self) -> usize {
        // SAFETY: ptr is a live mbuf owned by self.
        usize::from(unsafe { sys::dosd_rte_pktmbuf_tailroom(self.ptr.as_ptr()) })
    }

    /// Whether the data is an external buffer or shared with another mbuf (and so
    /// read-only here).
    pub fn is_shared(&self) -> bool {
        // SAFETY: ptr is a live mbuf owned by self.
        unsafe { sys::dosd_rte_pktmbuf_is_exclusive(self.ptr.as_ptr()) == 0 }
    }

    /// The first segment's data.
    pub fn data(&self) -> &[u8] {
        let len = self.data_len();
        if len == 0 {
            return &[];
        }
        // SAFETY: ptr is a live mbuf owned by self.
        let p = unsafe { sys::dosd_rte_pktmbuf_mtod(self.ptr.as_ptr()) };
        // SAFETY: mtod points at data_len initialised bytes of the mbuf's buffer,
        // which live as long as the mbuf and are not written while &self is held
        // (writes need &mut self, and shared buffers are never written).
        unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) }
    }

    /// The first segment's data, writable; [`Error::Shared`] for an external or
    /// shared buffer.
    pub fn data_mut(&mut self) -> Result<&mut [u8]> {
        if self.is_shared() {
            return Err(Error::Shared);
        }
        let len = self.data_len();
        if len == 0 {
            return Ok(&mut []);
        }
        // SAFETY: ptr is a live mbuf owned by self.
        let p = unsafe { sys::dosd_rte_pktmbuf_mtod(self.ptr.as_ptr()) };
        // SAFETY: as in data(), and the buffer belongs to this mbuf alone, borrowed
        // mutably through &mut self.
        Ok(unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) })
    }

    /// Grows the data by `len` bytes at the end and returns them to fill (their
    /// previous contents are unspecified). Only for a one-segment mbuf with its own
    /// buffer; [`Error::NoRoom`] without enough tailroom.
    pub fn append(&mut self, len: usize) -> Result<&mut [u8]> {
        if self.is_shared() || self.segments() != 1 {
            return Err(Error::Shared);
        }
        let len16 = u16::try_from(len).map_err(|_| Error::NoRoom("append longer than an mbuf"))?;
        // SAFETY: ptr is a live one-segment mbuf owned by self.
        let p = unsafe { sys::dosd_rte_pktmbuf_append(self.ptr.as_ptr(), len16) };
        if p.is_null() {
            return Err(Error::NoRoom("not enough tailroom"));
        }
        // SAFETY: append returned the start of len bytes inside this mbuf's own
        // buffer, now part of its data; borrowed mutably through &mut self.
        Ok(unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) })
    }

    /// Grows the data by `len` bytes at the front (into the headroom) and returns
    /// them to fill. Only for an mbuf with its own buffer.
    pub fn prepend(&mut self, len: usize) -> Result<&mut [u8]> {
        if self.is_shared() {
            return Err(Error::Shared);
        }
        let len16 = u16::try_from(len).map_err(|_| Error::NoRoom("prepend longer than an mbuf"))?;
        // SAFETY: ptr is a live mbuf owned by self.
        let p = unsafe { sys::dosd_rte_pktmbuf_prepend(self.ptr.as_ptr(), len16) };
        if p.is_null() {
            return Err(Error::NoRoom("not enough headroom"));
        }
        // SAFETY: prepend returned the new start of the data, len bytes of this
        // mbuf's own buffer; borrowed mutably through &mut self.
        Ok(unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) })
    }

    /// Drops `len` bytes from the front of the first segment.
    pub fn adj(&mut self, len: usize) -> Result<()> {
        let len16 = u16::try_from(len).map_err(|_| Error::NoRoom("adj longer than an mbuf"))?;
        // SAFETY: ptr is a live mbuf owned by self; adj checks the length.
        let p = unsafe { sys::dosd_rte_pktmbuf_adj(self.ptr.as_ptr(), len16) };
        if p.is_null() {
            return Err(Error::NoRoom("adj longer than the first segment"));
        }
        Ok(())
    }

    /// Drops `len` bytes from the end of the last segment.
    pub fn trim(&mut self, len: usize) -> Result<()> {
        let len16 = u16::try_from(len).map_err(|_| Error::NoRoom("trim longer than an mbuf"))?;
        // SAFETY: ptr is a live mbuf owned by self; trim checks the length.
        let rc = unsafe { sys::dosd_rte_pktmbuf_trim(self.ptr.as_ptr(), len16) };
        if rc != 0 {
            return Err(Error::NoRoom("trim longer than the last segment"));
        }
        Ok(())
    }

    /// Chains `tail` (and its segments) after this packet's last segment: e.g. a
    /// header mbuf followed by an external buffer of object bytes. On failure (too
    /// many segments) `tail` is freed.
    pub fn chain(&mut self, tail: Mbuf<'e>) -> Result<()> {
        let tail = tail.into_raw();
        // SAFETY: both are live mbufs; chain takes ownership of tail on success.
        let rc = unsafe { sys::dosd_rte_pktmbuf_chain(self.ptr.as_ptr(), tail) };
        if rc != 0 {
            // SAFETY: on failure tail was not linked; it is still ours to free.
            unsafe { sys::dosd_rte_pktmbuf_free(tail) };
            return check("rte_pktmbuf_chain", rc).map(drop);
        }
        Ok(())
    }
}

impl Drop for Mbuf<'_> {
    fn drop(&mut self) {
        // SAFETY: self owns the mbuf and its chain; nothing refers to it afterwards.
        unsafe { sys::dosd_rte_pktmbuf_free(self.ptr.as_ptr()) };
    }
}

/// Up to [`BURST_MAX`] mbufs in a fixed array: filled by
/// [`RxQueue::rx_burst`](crate::RxQueue::rx_burst), drained by
/// [`TxQueue::tx_burst`](crate::TxQueue::tx_burst). Frees what it still holds on drop.
#[derive(Debug)]
pub struct Burst<'e> {
    /// `slots[..len]` are owned, non-null mbufs; the rest are not owned (null, or
    /// mbufs a transmit took) and never read.
    slots: [*mut RteMbuf; BURST_MAX],
    len: usize,
    _mbufs: PhantomData<Mbuf<'e>>,
}

// SAFETY: a Burst owns its mbufs as Mbuf does.
unsafe impl Send for Burst<'_> {}

impl Default for Burst<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'e> Burst<'e> {
    /// An empty burst.
    pub fn new() -> Self {
        Burst {
            slots: [std::ptr::null_mut(); BURST_MAX],
            len: 0,
            _mbufs: PhantomData,
        }
    }

    /// How many mbufs it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether it holds [`BURST_MAX`].
    pub fn is_full(&self) -> bool {
        self.len == BURST_MAX
    }

    /// Adds `m` at the end; gives it back when the burst is full.
    pub fn push(&mut self, m: Mbuf<'e>) -> std::result::Result<(), Mbuf<'e>> {
        if self.is_full() {
            return Err(m);
        }
        self.slots[self.len] = m.into_raw();
        self.len += 1;
        Ok(())
    }

    /// Takes the last mbuf out.
    pub fn pop(&mut self) -> Option<Mbuf<'e>> {
        self.len = self.len.checked_sub(1)?;
        let p = std::mem::replace(&mut self.slots[self.len], std::ptr::null_mut());
        NonNull::new(p).map(Mbuf::from_raw)
    }

    /// The mbufs, in order.
    pub fn as_slice(&self) -> &[Mbuf<'e>] {
        // SAFETY: Mbuf is repr(transparent) over NonNull<RteMbuf>, which has the
        // layout of *mut RteMbuf, and slots[..len] are non-null owned mbufs.
        unsafe { std::slice::from_raw_parts(self.slots.as_ptr().cast::<Mbuf<'e>>(), self.len) }
    }

    /// The mbufs, in order, mutably (to edit their data).
    pub fn as_mut_slice(&mut self) -> &mut [Mbuf<'e>] {
        // SAFETY: as in as_slice; the slice borrows self mutably, so the mbufs cannot
        // be moved out or freed meanwhile.
        unsafe {
            std::slice::from_raw_parts_mut(self.slots.as_mut_ptr().cast::<Mbuf<'e>>(), self.len)
        }
    }

    /// Takes every mbuf out, in order. Those the iterator does not yield are freed
    /// when it is dropped.
    pub fn drain(&mut self) -> Drain<'_, 'e> {
        let end = std::mem::take(&mut self.len);
        Drain {
            burst: self,
            next: 0,
            end,
        }
    }

    /// Frees every mbuf.
    pub fn clear(&mut self) {
        self.drain();
    }

    /// The free slots, to receive into; `commit(n)` then counts `n` of them in.
    pub(crate) fn spare(&mut self) -> (*mut *mut RteMbuf, usize) {
        (self.slots[self.len..].as_mut_ptr(), BURST_MAX - self.len)
    }

    /// Counts in `n` mbufs a receive wrote into the spare slots.
    pub(crate) fn commit(&mut self, n: usize) {
        debug_assert!(n <= BURST_MAX - self.len);
        self.len = (self.len + n).min(BURST_MAX);
    }

    /// The held mbufs as a pointer array, to transmit.
    pub(crate) fn filled(&mut self) -> (*mut *mut RteMbuf, usize) {
        (self.slots.as_mut_ptr(), self.len)
    }

    /// Forgets the first `n` mbufs (a transmit took them) and moves the rest to the
    /// front. The slots past the new length keep stale pointers, never read again
    /// (clearing them cost the forwarding loop of `benches/throughput/testpmd.rs` a
    /// memset of 256 bytes per burst).
    pub(crate) fn consumed(&mut self, n: usize) {
        let n = n.min(self.len);
        if n < self.len {
            self.slots.copy_within(n..self.len, 0);
        }
        self.len -= n;
    }
}

impl Drop for Burst<'_> {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The iterator of [`Burst::drain`].
#[derive(Debug)]
pub struct Drain<'b, 'e> {
    burst: &'b mut Burst<'e>,
    next: usize,
    end: usize,
}

impl<'e> Iterator for Drain<'_, 'e> {
    type Item = Mbuf<'e>;

    fn next(&mut self) -> Option<Mbuf<'e>> {
        while self.next < self.end {
            let p = std::mem::replace(&mut self.burst.slots[self.next], std::ptr::null_mut());
            self.next += 1;
            if let Some(p) = NonNull::new(p) {
                return Some(Mbuf::from_raw(p));
            }
        }
        None
    }
}

impl Drop for Drain<'_, '_> {
    fn drop(&mut self) {
        for m in self.by_ref() {
            drop(m);
        }
    }
}
