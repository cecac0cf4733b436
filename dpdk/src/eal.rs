//! The environment abstraction layer: initialised once per process, cleaned up when
//! its guard goes. Every other handle of the crate borrows the [`Eal`], so the
//! borrow checker keeps `rte_eal_cleanup` after the last of them.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::port::{Port, PortId};
use crate::sys;

/// Set by the first [`Eal::init`] that gets as far as calling `rte_eal_init`. DPDK
/// cannot be initialised twice in a process, not even after a failure or a cleanup.
static INIT_TRIED: AtomicBool = AtomicBool::new(false);

/// DPDK's port ids are below `RTE_MAX_ETHPORTS` (32 in Debian's build), so one bit
/// each in a `u64` records which ports have a [`Port`] handle.
const PORT_BITS: u16 = 64;

/// The initialised EAL of this process. Dropping it calls `rte_eal_cleanup`.
#[derive(Debug)]
pub struct Eal {
    /// Bit `p` is set while a [`Port`] handle for port `p` exists.
    ports_taken: AtomicU64,
    /// `rte_eal_cleanup` already ran (through [`Eal::cleanup`]).
    cleaned: bool,
}

impl Eal {
    /// Initialises DPDK with `args`, the EAL arguments without a program name (e.g.
    /// `["-l", "0", "--no-huge", "-m", "512", "--no-pci", "--no-shconf",
    /// "--vdev=net_ring0"]`).
    ///
    /// Only one call per process can succeed: a second one, even after a failed first
    /// one or a cleanup, returns [`Error::AlreadyInitialised`]. The calling thread
    /// becomes EAL's main lcore (EAL pins it to that lcore's CPU). The argument strings
    /// are kept for the life of the process, as EAL may hold on to them.
    pub fn init<I, S>(args: I) -> Result<Eal>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        if !crate::BUILT_WITH_DPDK {
            return Err(Error::Unavailable);
        }
        let mut owned = vec![CString::from(c"dosd")];
        for arg in args {
            let arg = arg.as_ref();
            owned.push(CString::new(arg).map_err(|_| Error::BadArgument(arg.to_owned()))?);
        }
        let argc =
            c_int::try_from(owned.len()).map_err(|_| Error::Invalid("too many EAL arguments"))?;
        if INIT_TRIED.swap(true, Ordering::SeqCst) {
            return Err(Error::AlreadyInitialised);
        }
        // EAL may keep pointers into argv (and permutes the array), so both live on.
        let mut argv: Vec<*mut c_char> = owned.into_iter().map(CString::into_raw).collect();
        argv.push(std::ptr::null_mut());
        let argv = argv.leak();
        // SAFETY: argv holds argc valid NUL-terminated strings and a final null, all
        // leaked, so valid for as long as EAL may look at them; INIT_TRIED makes this
        // the only rte_eal_init call in the process.
        let rc = unsafe { sys::rte_eal_init(argc, argv.as_mut_ptr()) };
        if rc < 0 {
            return Err(last_error("rte_eal_init"));
        }
        Ok(Eal {
            ports_taken: AtomicU64::new(0),
            cleaned: false,
        })
    }

    /// How many ethernet ports DPDK found (vdevs included).
    pub fn port_count(&self) -> u16 {
        // SAFETY: EAL is initialised (self exists); the call only reads ethdev state.
        unsafe { sys::rte_eth_dev_count_avail() }
    }

    /// The id of the port DPDK named `name` (a vdev's name, e.g. `net_ring0`).
    pub fn port_by_name(&self, name: &str) -> Result<PortId> {
        let c_name = CString::new(name).map_err(|_| Error::NoSuchPort(name.to_owned()))?;
        let mut id = 0u16;
        // SAFETY: c_name is NUL-terminated and outlives the call; id is a valid u16
        // to write.
        let rc = unsafe { sys::rte_eth_dev_get_port_by_name(c_name.as_ptr(), &mut id) };
        if rc != 0 {
            return Err(Error::NoSuchPort(name.to_owned()));
        }
        Ok(PortId(id))
    }

    /// Takes the port `id`: the one handle through which it is configured, started
    /// and polled. [`Error::Busy`] while another handle for it exists.
    pub fn port(&self, id: PortId) -> Result<Port<'_>> {
        // SAFETY: EAL is initialised; the call only checks the id.
        let valid = unsafe { sys::rte_eth_dev_is_valid_port(id.0) } == 1;
        if !valid || id.0 >= PORT_BITS {
            return Err(Error::NoSuchPort(id.0.to_string()));
        }
        let bit = 1u64 << id.0;
        if self.ports_taken.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return Err(Error::Busy(format!("port {}", id.0)));
        }
        Ok(Port::new(self, id))
    }

    /// Called by [`Port`]'s drop.
    pub(crate) fn release_port(&self, id: PortId) {
        if id.0 < PORT_BITS {
            self.ports_taken
                .fetch_and(!(1u64 << id.0), Ordering::AcqRel);
        }
    }

    /// The calling thread's EAL lcore id; `None` on a thread EAL did not create or
    /// adopt (such threads may poll queues, without a per-lcore mempool cache).
    pub fn lcore_id(&self) -> Option<u32> {
        // SAFETY: reads the calling thread's per-lcore variable.
        let id = unsafe { sys::dosd_rte_lcore_id() };
        (id != u32::MAX).then_some(id)
    }

    /// Adopts the calling thread as a (non-EAL) lcore (`rte_thread_register`), so that
    /// it gets an lcore id and with it the per-lcore caches of mempools; the thread
    /// gives the id back when the guard drops. One guard per thread at a time: a thread
    /// that already has an id (EAL's own, or an earlier guard's) keeps it.
    pub fn register_thread(&self) -> Result<Lcore<'_>> {
        if let Some(id) = self.lcore_id() {
            return Ok(Lcore {
                id,
                registered: false,
                _eal: std::marker::PhantomData,
            });
        }
        // SAFETY: EAL is initialised (self exists); registers the calling thread only.
        let rc = unsafe { sys::rte_thread_register() };
        if rc < 0 {
            return Err(last_error("rte_thread_register"));
        }
        let id = self
            .lcore_id()
            .ok_or_else(|| Error::Busy("rte_thread_register gave no lcore id".into()))?;
        Ok(Lcore {
            id,
            registered: true,
            _eal: std::marker::PhantomData,
        })
    }

    /// Releases EAL's resources (`rte_eal_cleanup`), reporting a failure; dropping the
    /// guard does the same and ignores it. EAL cannot be initialised again afterwards.
    pub fn cleanup(mut self) -> Result<()> {
        self.cleaned = true;
        // SAFETY: self is consumed, so no handle borrowing it is alive; runs once.
        let rc = unsafe { sys::rte_eal_cleanup() };
        if rc < 0 {
            return Err(errno_error("rte_eal_cleanup", -rc));
        }
        Ok(())
    }
}

impl Drop for Eal {
    fn drop(&mut self) {
        if !self.cleaned {
            self.cleaned = true;
            // SAFETY: nothing borrows self any more (drop has &mut); runs once.
            unsafe { sys::rte_eal_cleanup() };
        }
    }
}

/// The calling thread's lcore id while it lasts ([`Eal::register_thread`]). Not `Send`:
/// the registration belongs to the thread that made it.
#[derive(Debug)]
pub struct Lcore<'e> {
    id: u32,
    registered: bool,
    /// Borrows EAL (it must outlive the registration) and pins the guard to its thread.
    _eal: std::marker::PhantomData<(&'e Eal, *const ())>,
}

impl Lcore<'_> {
    /// The lcore id.
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for Lcore<'_> {
    fn drop(&mut self) {
        if self.registered {
            // SAFETY: this thread registered itself (the guard is not Send) and EAL is
            // still initialised (the guard borrows it).
            unsafe { sys::rte_thread_unregister() };
        }
    }
}

/// The error for `call`, from the calling thread's `rte_errno`.
pub(crate) fn last_error(call: &'static str) -> Error {
    // SAFETY: reads the calling thread's per-lcore rte_errno.
    let errno = unsafe { sys::dosd_rte_errno() };
    errno_error(call, errno)
}

/// The error for `call` that failed with the positive error number `errno`.
pub(crate) fn errno_error(call: &'static str, errno: i32) -> Error {
    // SAFETY: rte_strerror only formats the number (a null in a build without DPDK).
    let p = unsafe { sys::rte_strerror(errno) };
    let message = if p.is_null() {
        String::from("unknown error")
    } else {
        // SAFETY: p points to a NUL-terminated static or thread-local string, copied
        // out before anything else on this thread can change it.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    Error::Dpdk {
        call,
        errno,
        message,
    }
}

/// `Ok(rc)` for a non-negative return of `call`, else the error it encodes (ethdev
/// functions return `-errno`).
pub(crate) fn check(call: &'static str, rc: c_int) -> Result<c_int> {
    if rc < 0 {
        Err(errno_error(call, -rc))
    } else {
        Ok(rc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "dpdk"))]
    #[test]
    fn without_dpdk_init_says_so() {
        assert_eq!(Eal::init(["--no-huge"]).unwrap_err(), Error::Unavailable);
        const { assert!(!crate::BUILT_WITH_DPDK) };
    }

    #[test]
    fn ethdev_errors_decode() {
        assert!(check("x", 0).is_ok());
        match check("rte_eth_dev_start", -22) {
            Err(Error::Dpdk { call, errno, .. }) => {
                assert_eq!((call, errno), ("rte_eth_dev_start", 22))
            }
            other => panic!("{other:?}"),
        }
    }
}
