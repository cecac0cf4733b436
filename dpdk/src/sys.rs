//! The raw C interface: DPDK's real functions, declared by hand (only those used),
//! and the `dosd_*` functions of `shim/shim.c` that stand in for DPDK's static-inline
//! fast path and for structs whose layout Rust should not mirror.
//!
//! Built without the `dpdk` feature, every declaration becomes a Rust function of the
//! same signature that returns a failure value (-ENOTSUP, a null pointer, zero). They
//! are never reached: every wrapper needs an [`crate::Eal`], and `Eal::init` refuses
//! first. They exist so that the safe layer compiles, and is linted, the same way in
//! both builds.
//!
//! Nothing outside this crate sees these items.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_uint, c_void};

/// `struct rte_mbuf`: opaque, reached only through DPDK and the shim.
#[repr(C)]
pub struct RteMbuf {
    _opaque: [u8; 0],
}

/// `struct rte_mempool`: opaque.
#[repr(C)]
pub struct RteMempool {
    _opaque: [u8; 0],
}

/// `rte_mbuf_extbuf_free_callback_t`.
pub type ExtFreeCb = unsafe extern "C" fn(addr: *mut c_void, opaque: *mut c_void);

/// `struct rte_mbuf_ext_shared_info` (rte_mbuf_core.h). The shim asserts the same
/// size and offsets at compile time.
#[repr(C)]
pub struct ExtSharedInfo {
    pub free_cb: Option<ExtFreeCb>,
    pub fcb_opaque: *mut c_void,
    pub refcnt: u16,
}
const _: () = assert!(std::mem::size_of::<ExtSharedInfo>() == 24);
const _: () = assert!(std::mem::offset_of!(ExtSharedInfo, refcnt) == 16);

/// `struct rte_ether_addr`: six bytes, two-byte aligned.
#[repr(C, align(2))]
#[derive(Default)]
pub struct EtherAddr {
    pub bytes: [u8; 6],
}
const _: () = assert!(std::mem::size_of::<EtherAddr>() == 6);

/// `struct dosd_port_stats` of the shim: the scalar part of `struct rte_eth_stats`.
#[repr(C)]
#[derive(Default)]
pub struct PortStatsC {
    pub ipackets: u64,
    pub opackets: u64,
    pub ibytes: u64,
    pub obytes: u64,
    pub imissed: u64,
    pub ierrors: u64,
    pub oerrors: u64,
    pub rx_nombuf: u64,
}

/// `struct dosd_link` of the shim: `struct rte_eth_link` without its bit fields.
#[repr(C)]
#[derive(Default)]
pub struct LinkC {
    pub speed_mbps: u32,
    pub up: u8,
    pub full_duplex: u8,
    pub autoneg: u8,
    pub pad: u8,
}

/// The value a stub returns in a build without DPDK.
#[cfg(not(feature = "dpdk"))]
trait Stub {
    fn stub() -> Self;
}

#[cfg(not(feature = "dpdk"))]
mod stub_values {
    use super::Stub;
    /// ENOTSUP, negated as DPDK's ethdev functions return errors.
    const ENOTSUP: i32 = 95;
    impl Stub for () {
        fn stub() -> Self {}
    }
    impl Stub for i32 {
        fn stub() -> Self {
            -ENOTSUP
        }
    }
    impl Stub for u16 {
        fn stub() -> Self {
            0
        }
    }
    impl Stub for u32 {
        fn stub() -> Self {
            0
        }
    }
    impl Stub for u64 {
        fn stub() -> Self {
            0
        }
    }
    impl<T> Stub for *mut T {
        fn stub() -> Self {
            std::ptr::null_mut()
        }
    }
    impl<T> Stub for *const T {
        fn stub() -> Self {
            std::ptr::null()
        }
    }
}

/// One list of C functions: an `extern "C"` block with the feature, stubs without.
macro_rules! c_functions {
    ($( $(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?; )*) => {
        #[cfg(feature = "dpdk")]
        unsafe extern "C" {
            $( $(#[$meta])* pub fn $name($($arg: $ty),*) $(-> $ret)?; )*
        }
        $(
            #[cfg(not(feature = "dpdk"))]
            $(#[$meta])*
            #[allow(unused_variables)]
            /// # Safety
            /// A stub: it touches nothing.
            pub unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
                Stub::stub()
            }
        )*
    };
}

c_functions! {
    // EAL (rte_eal.h, rte_errno.h)
    fn rte_eal_init(argc: c_int, argv: *mut *mut c_char) -> c_int;
    fn rte_eal_cleanup() -> c_int;
    fn rte_thread_register() -> c_int;
    fn rte_thread_unregister();
    fn rte_strerror(errnum: c_int) -> *const c_char;

    // Mempools (rte_mbuf.h)
    fn rte_pktmbuf_pool_create(
        name: *const c_char,
        n: c_uint,
        cache_size: c_uint,
        priv_size: u16,
        data_room_size: u16,
        socket_id: c_int,
    ) -> *mut RteMempool;
    fn rte_mempool_avail_count(mp: *const RteMempool) -> c_uint;

    // Ports (rte_ethdev.h)
    fn rte_eth_dev_count_avail() -> u16;
    fn rte_eth_dev_is_valid_port(port_id: u16) -> c_int;
    fn rte_eth_dev_get_port_by_name(name: *const c_char, port_id: *mut u16) -> c_int;
    fn rte_eth_dev_socket_id(port_id: u16) -> c_int;
    fn rte_eth_dev_adjust_nb_rx_tx_desc(port_id: u16, nb_rx_desc: *mut u16, nb_tx_desc: *mut u16) -> c_int;
    fn rte_eth_rx_queue_setup(
        port_id: u16,
        rx_queue_id: u16,
        nb_rx_desc: u16,
        socket_id: c_uint,
        rx_conf: *const c_void,
        mb_pool: *mut RteMempool,
    ) -> c_int;
    fn rte_eth_tx_queue_setup(
        port_id: u16,
        tx_queue_id: u16,
        nb_tx_desc: u16,
        socket_id: c_uint,
        tx_conf: *const c_void,
    ) -> c_int;
    fn rte_eth_dev_start(port_id: u16) -> c_int;
    fn rte_eth_dev_stop(port_id: u16) -> c_int;
    fn rte_eth_stats_reset(port_id: u16) -> c_int;
    fn rte_eth_macaddr_get(port_id: u16, mac_addr: *mut EtherAddr) -> c_int;
    fn rte_eth_promiscuous_enable(port_id: u16) -> c_int;
    fn rte_eth_allmulticast_enable(port_id: u16) -> c_int;

    // The shim (shim/shim.c)
    fn dosd_rte_errno() -> c_int;
    fn dosd_rte_lcore_id() -> c_uint;
    fn dosd_rte_eth_rx_burst(port: u16, queue: u16, pkts: *mut *mut RteMbuf, n: u16) -> u16;
    fn dosd_rte_eth_tx_burst(port: u16, queue: u16, pkts: *mut *mut RteMbuf, n: u16) -> u16;
    fn dosd_rte_pktmbuf_alloc(mp: *mut RteMempool) -> *mut RteMbuf;
    fn dosd_rte_pktmbuf_free(m: *mut RteMbuf);
    fn dosd_rte_pktmbuf_append(m: *mut RteMbuf, len: u16) -> *mut c_char;
    fn dosd_rte_pktmbuf_prepend(m: *mut RteMbuf, len: u16) -> *mut c_char;
    fn dosd_rte_pktmbuf_adj(m: *mut RteMbuf, len: u16) -> *mut c_char;
    fn dosd_rte_pktmbuf_trim(m: *mut RteMbuf, len: u16) -> c_int;
    fn dosd_rte_pktmbuf_chain(head: *mut RteMbuf, tail: *mut RteMbuf) -> c_int;
    fn dosd_rte_pktmbuf_mtod(m: *mut RteMbuf) -> *mut c_void;
    fn dosd_rte_pktmbuf_data_len(m: *const RteMbuf) -> u16;
    fn dosd_rte_pktmbuf_pkt_len(m: *const RteMbuf) -> u32;
    fn dosd_rte_pktmbuf_nb_segs(m: *const RteMbuf) -> u16;
    fn dosd_rte_pktmbuf_headroom(m: *const RteMbuf) -> u16;
    fn dosd_rte_pktmbuf_tailroom(m: *const RteMbuf) -> u16;
    fn dosd_rte_pktmbuf_is_exclusive(m: *const RteMbuf) -> c_int;
    fn dosd_rte_pktmbuf_attach_extbuf(
        m: *mut RteMbuf,
        buf_addr: *mut c_void,
        buf_iova: u64,
        buf_len: u16,
        shinfo: *mut ExtSharedInfo,
    );
    /// Unused by the safe layer: it carves the shared info out of the buffer's own
    /// tail, and dosd attaches buffers that hold object bytes to their last byte.
    #[allow(dead_code)]
    fn dosd_rte_pktmbuf_ext_shinfo_init_helper(
        buf_addr: *mut c_void,
        buf_len: *mut u16,
        free_cb: Option<ExtFreeCb>,
        fcb_opaque: *mut c_void,
    ) -> *mut ExtSharedInfo;
    fn dosd_ext_iova(addr: *mut c_void) -> u64;
    fn dosd_eth_configure(port: u16, nb_rx: u16, nb_tx: u16, rss_active: *mut c_int) -> c_int;
    fn dosd_eth_stats(port: u16, out: *mut PortStatsC) -> c_int;
    fn dosd_eth_link(port: u16, out: *mut LinkC) -> c_int;
}
