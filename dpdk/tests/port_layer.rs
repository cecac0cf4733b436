//! The port layer on DPDK's software vdevs, without hugepages or privileges:
//! `net_ring0` (a ring that loops each transmitted mbuf back to its receive side) and
//! `net_null0` (which frees what it transmits and counts it).
//!
//! EAL can be initialised once per process, so this binary has one test that runs the
//! steps in order.

#![cfg(feature = "dpdk")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dpdk::{Burst, Eal, Error, Mempool, PortConfig, QueueId, BURST_MAX};

/// Distinct payload of packet `i`: its length and every byte depend on `i`.
fn payload(i: usize) -> Vec<u8> {
    (0..60 + i * 7).map(|j| (i * 31 + j) as u8).collect()
}

/// Receives from `rx` until `want` mbufs arrived or a bounded number of polls passed.
fn rx_until<'e>(rx: &mut dpdk::RxQueue<'_, 'e>, burst: &mut Burst<'e>, want: usize) {
    for _ in 0..1000 {
        if burst.len() >= want || burst.is_full() {
            return;
        }
        rx.rx_burst(burst);
    }
}

#[test]
fn port_layer_on_net_ring_and_net_null() {
    let args = [
        "-l",
        "0",
        "--no-huge",
        "-m",
        "512",
        "--no-pci",
        "--no-shconf",
        "--no-telemetry",
        "--log-level=warning",
    ];
    let args = args
        .iter()
        .copied()
        .chain(["--vdev=net_ring0", "--vdev=net_null0"]);
    let eal = Eal::init(args).expect("EAL init");
    // Once per process: a second init is an error, not undefined behaviour.
    assert_eq!(
        Eal::init(["--no-huge"]).unwrap_err(),
        Error::AlreadyInitialised
    );
    assert_eq!(eal.port_count(), 2);
    // A thread EAL did not make has no lcore id until it registers; the id goes back
    // when the guard drops. EAL's own thread keeps its id.
    assert_eq!(
        eal.register_thread().expect("main lcore").id(),
        eal.lcore_id().unwrap()
    );
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(eal.lcore_id(), None);
            let lcore = eal.register_thread().expect("rte_thread_register");
            assert_eq!(eal.lcore_id(), Some(lcore.id()));
            assert_ne!(Some(lcore.id()), {
                let main = s.spawn(|| eal.lcore_id());
                main.join().unwrap()
            });
            drop(lcore);
            assert_eq!(eal.lcore_id(), None, "unregistered on drop");
        });
    });

    let pool =
        Mempool::new(&eal, "test_pool", 1023, 0, Mempool::DEFAULT_DATA_ROOM).expect("mempool");
    let free_at_start = pool.available();
    assert_eq!(free_at_start, 1023);

    // --- net_ring: 32 distinct packets out and back in.
    let ring_id = eal.port_by_name("net_ring0").expect("net_ring0");
    assert!(matches!(
        eal.port_by_name("net_nope"),
        Err(Error::NoSuchPort(_))
    ));
    let mut ring = eal.port(ring_id).expect("port");
    assert!(
        matches!(eal.port(ring_id), Err(Error::Busy(_))),
        "one handle per port"
    );
    assert!(
        matches!(ring.rx_queue(QueueId(0)), Err(Error::PortState(..))),
        "not started"
    );
    ring.configure(&PortConfig::default(), &pool)
        .expect("configure");
    assert!(!ring.rss_active());
    ring.start().expect("start");
    assert!(ring.link().expect("link").up);
    // net_ring's address is all zeroes; what matters is that it reads.
    assert_eq!(ring.mac().expect("mac").to_string(), "00:00:00:00:00:00");
    ring.reset_stats().expect("reset stats");
    {
        let mut rx = ring.rx_queue(QueueId(0)).expect("rx queue");
        let mut tx = ring.tx_queue(QueueId(0)).expect("tx queue");
        assert!(
            matches!(ring.rx_queue(QueueId(0)), Err(Error::Busy(_))),
            "one handle per queue"
        );
        assert!(matches!(
            ring.tx_queue(QueueId(1)),
            Err(Error::NoSuchQueue { .. })
        ));

        let mut out = Burst::new();
        for i in 0..BURST_MAX {
            let mut m = pool.alloc().expect("alloc");
            let p = payload(i);
            m.append(p.len()).expect("append").copy_from_slice(&p);
            assert_eq!(m.data(), &p[..]);
            out.push(m).expect("room in the burst");
        }
        assert!(out.is_full());
        assert_eq!(tx.tx_burst(&mut out), BURST_MAX);
        assert!(out.is_empty());

        let mut got = Burst::new();
        rx_until(&mut rx, &mut got, BURST_MAX);
        assert_eq!(got.len(), BURST_MAX);
        for (i, m) in got.as_mut_slice().iter_mut().enumerate() {
            assert_eq!(m.data(), &payload(i)[..], "packet {i}");
            assert_eq!(m.pkt_len(), payload(i).len());
            // Received mbufs are the receiver's to edit.
            m.data_mut().expect("own buffer")[0] = 0xee;
            m.prepend(14).expect("headroom").fill(0xaa);
            m.adj(14).expect("adj");
            m.trim(1).expect("trim");
            assert_eq!(m.data().len(), payload(i).len() - 1);
            assert_eq!(m.data()[0], 0xee);
        }
        got.clear();

        // net_ring counts packets, not bytes (the bytes were checked above).
        let stats = ring.stats().expect("stats");
        assert_eq!(
            (stats.tx_packets, stats.rx_packets),
            (BURST_MAX as u64, BURST_MAX as u64)
        );
        assert_eq!(
            (stats.tx_errors, stats.rx_errors, stats.rx_no_mbuf),
            (0, 0, 0)
        );

        // --- An external buffer goes out without a copy; its owner gets it back once.
        let freed = Arc::new(AtomicUsize::new(0));
        let returned = Arc::new(std::sync::Mutex::new(None::<Vec<u8>>));
        let object: Vec<u8> = (0..1500u32).map(|j| (j * 7) as u8).collect();
        let ext = {
            let (freed, returned) = (freed.clone(), returned.clone());
            pool.alloc_external(object.clone(), move |buf: Vec<u8>| {
                freed.fetch_add(1, Ordering::SeqCst);
                *returned.lock().unwrap() = Some(buf);
            })
        }
        .expect("external mbuf");
        assert!(ext.is_shared());
        assert_eq!(ext.data(), &object[..]);
        let mut ext = ext;
        assert_eq!(
            ext.data_mut().unwrap_err(),
            Error::Shared,
            "the owner's bytes are read-only"
        );
        assert_eq!(ext.append(1).unwrap_err(), Error::Shared);
        // A header in a pool mbuf, the object chained after it.
        let mut head = pool.alloc().expect("alloc");
        head.append(42).expect("append").fill(0x42);
        head.chain(ext).expect("chain");
        assert_eq!((head.segments(), head.pkt_len()), (2, 42 + 1500));
        let mut out = Burst::new();
        out.push(head).expect("room");
        assert_eq!(tx.tx_burst(&mut out), 1);
        assert_eq!(freed.load(Ordering::SeqCst), 0, "still in the ring");
        let mut got = Burst::new();
        rx_until(&mut rx, &mut got, 1);
        assert_eq!(got.len(), 1);
        let m = got.pop().expect("one packet");
        assert_eq!(
            (m.segments(), m.pkt_len(), m.data()),
            (2, 1542, &[0x42u8; 42][..])
        );
        assert_eq!(
            freed.load(Ordering::SeqCst),
            0,
            "the received packet still holds it"
        );
        drop(m);
        assert_eq!(
            freed.load(Ordering::SeqCst),
            1,
            "free callback ran on the last free"
        );
        assert_eq!(
            returned.lock().unwrap().as_deref(),
            Some(&object[..]),
            "the owner got its buffer back"
        );

        // If no mbuf can be made the owner still gets its buffer back, once.
        let refused = Arc::new(AtomicUsize::new(0));
        let r = refused.clone();
        let too_big = pool.alloc_external(vec![0u8; 70_000], move |_| {
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert!(matches!(too_big, Err(Error::NoRoom(_))));
        assert_eq!(refused.load(Ordering::SeqCst), 1);
    }
    assert_eq!(
        pool.available(),
        free_at_start,
        "every mbuf back in the pool"
    );
    ring.stop().expect("stop");
    assert!(!ring.is_started());

    // --- Reconfigured with two queue pairs: net_ring has no RSS (so none is asked
    // of it) and loops transmit queue i to receive queue i; each queue has its own
    // handle, usable from its own thread.
    let two = PortConfig {
        rx_queues: 2,
        tx_queues: 2,
        ..PortConfig::default()
    };
    ring.configure(&two, &pool).expect("configure two queues");
    assert!(!ring.rss_active());
    ring.start().expect("start");
    // Counters survive a stop and a start.
    assert_eq!(
        ring.stats().expect("stats").rx_packets,
        BURST_MAX as u64 + 1
    );
    ring.reset_stats().expect("reset stats");
    std::thread::scope(|s| {
        for q in 0..2u16 {
            let (mut rx, mut tx) = (
                ring.rx_queue(QueueId(q)).expect("rx queue"),
                ring.tx_queue(QueueId(q)).expect("tx queue"),
            );
            let pool = &pool;
            s.spawn(move || {
                let mut out = Burst::new();
                for i in 0..8 {
                    let mut m = pool.alloc().expect("alloc");
                    m.append(16).expect("append").fill(q as u8 * 100 + i);
                    out.push(m).expect("room");
                }
                assert_eq!(tx.tx_burst(&mut out), 8);
                let mut got = Burst::new();
                rx_until(&mut rx, &mut got, 8);
                let firsts: Vec<u8> = got.drain().map(|m| m.data()[0]).collect();
                let want: Vec<u8> = (0..8).map(|i| q as u8 * 100 + i).collect();
                assert_eq!(firsts, want, "queue {q} got its own packets, in order");
            });
        }
    });
    assert_eq!(ring.stats().expect("stats").rx_packets, 16);
    ring.stop().expect("stop");
    assert_eq!(pool.available(), free_at_start);

    // A second pool of the same name is an error value from DPDK.
    match Mempool::new(&eal, "test_pool", 63, 0, Mempool::DEFAULT_DATA_ROOM) {
        Err(Error::Dpdk { call, errno, .. }) => {
            assert_eq!((call, errno), ("rte_pktmbuf_pool_create", 17), "EEXIST")
        }
        other => panic!("duplicate pool name: {other:?}"),
    }

    // --- net_null: transmit counts in stats (the driver frees what it sends).
    let null_id = eal.port_by_name("net_null0").expect("net_null0");
    let mut null = eal.port(null_id).expect("port");
    null.configure(
        &PortConfig {
            rx_queues: 1,
            tx_queues: 1,
            rx_desc: 64,
            tx_desc: 64,
        },
        &pool,
    )
    .expect("configure");
    null.start().expect("start");
    null.reset_stats().expect("reset");
    {
        let mut tx = null.tx_queue(QueueId(0)).expect("tx queue");
        let mut sent = 0;
        for round in 0..4 {
            let mut out = Burst::new();
            for i in 0..BURST_MAX {
                let mut m = pool.alloc().expect("alloc");
                m.append(64)
                    .expect("append")
                    .fill((round * BURST_MAX + i) as u8);
                out.push(m).expect("room");
            }
            sent += tx.tx_burst(&mut out);
            out.clear();
        }
        assert_eq!(sent, 4 * BURST_MAX);
        let stats = null.stats().expect("stats");
        assert_eq!(stats.tx_packets, sent as u64);
        // Like net_ring, net_null in DPDK 22.11 counts packets only.
        assert_eq!(stats.tx_errors, 0);
    }
    drop(null);
    drop(ring);
    eal.cleanup().expect("EAL cleanup");
}
