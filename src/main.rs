//! dosd — the storage node. This binary only wires the parts together: it resolves the
//! configuration, opens the disks, starts the dataplane and the management core, and
//! stops them cleanly on SIGTERM/SIGINT.
#![deny(unsafe_code)]

mod config;
mod datadir;
#[cfg(feature = "dpdk")]
mod dpdk_net;
mod fdlimit;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::config::{Config, DiskSpec, Flags, Net};

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DOSD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let flags = Flags::parse();
    match run(flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, without repeating a cause that an outer
/// message already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// A disk as opened once: what each dataplane loop's handle on it is made from.
enum Disk {
    File(nvme::file::FileDevice),
    Nvme(nvme::driver::Opened),
}

/// The node's disks: the explicit `--disk` list, or the data directory's images.
/// An NVMe controller is opened with `queues` I/O queue pairs, one per dataplane loop;
/// dropping it (after the stores, which hold its queues) shuts it down cleanly and
/// gives it back to the kernel's driver.
fn open_disks(cfg: &Config, dir: &datadir::DataDir, queues: u16) -> anyhow::Result<Vec<Disk>> {
    if cfg.disk_specs.is_empty() {
        return Ok(dir
            .open_disks(cfg.disks, cfg.disk_size)?
            .into_iter()
            .map(Disk::File)
            .collect());
    }
    let mut disks = Vec::new();
    for (i, spec) in cfg.disk_specs.iter().enumerate() {
        match spec {
            DiskSpec::File(path) => {
                let dev = nvme::file::FileDevice::open(path, cfg.disk_size)
                    .with_context(|| format!("cannot open disk {i} (file:{})", path.display()))?;
                disks.push(Disk::File(dev));
            }
            DiskSpec::Nvme(name) => {
                let opts = nvme::driver::CtrlOptions {
                    io_queues: queues.max(2),
                    ..Default::default()
                };
                let opened = nvme::driver::open(name, &opts)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("cannot open disk {i} (nvme:{name})"))?;
                disks.push(Disk::Nvme(opened));
            }
        }
    }
    Ok(disks)
}

/// One dataplane loop's handles on every disk: its own io_uring on a file (the same
/// open file, so the same flock), its own queue pair on an NVMe controller.
fn handles(disks: &[Disk]) -> anyhow::Result<Vec<Box<dyn nvme::BlockDevice>>> {
    disks
        .iter()
        .enumerate()
        .map(|(i, d)| -> anyhow::Result<Box<dyn nvme::BlockDevice>> {
            Ok(match d {
                Disk::File(f) => Box::new(
                    f.another()
                        .with_context(|| format!("cannot open another ring on disk {i}"))?,
                ),
                Disk::Nvme(o) => Box::new(
                    nvme::driver::NvmeDevice::new(&o.ctrl, Default::default())
                        .with_context(|| format!("cannot create a queue pair on disk {i}"))?,
                ),
            })
        })
        .collect()
}

/// How many dataplane loops to run: as asked, else as the disks are carved, else
/// every core but the management core's (at least one).
fn loops_for(
    asked: Option<u16>,
    devices: &mut [Box<dyn nvme::BlockDevice>],
) -> anyhow::Result<u16> {
    use dataplane::store::label;
    if let Some(n) = asked {
        return Ok(n);
    }
    for (i, dev) in devices.iter_mut().enumerate() {
        let mut block = nvme::AlignedBuf::new(nvme::BLOCK_SIZE);
        <Box<dyn nvme::BlockDevice> as nvme::BlockDevice>::read_at(dev, 0, &mut block)
            .with_context(|| format!("cannot read the label of disk {i}"))?;
        if let label::Found::Label(l) = label::decode(&block, dev.info().size_bytes) {
            return Ok(l.shards);
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(u16::try_from(cores.saturating_sub(1).max(1))
        .unwrap_or(1)
        .min(dataplane::store::label::SHARDS_MAX))
}

/// Each loop's regions: `handles[loop][disk]` windowed onto the region the disk's
/// label gives that loop.
fn carve(
    handles: Vec<Vec<Box<dyn nvme::BlockDevice>>>,
    labels: &[dataplane::store::label::Label],
) -> anyhow::Result<Vec<Vec<Box<dyn nvme::BlockDevice>>>> {
    handles
        .into_iter()
        .enumerate()
        .map(|(k, disks)| {
            disks
                .into_iter()
                .zip(labels)
                .enumerate()
                .map(
                    |(d, (dev, l))| -> anyhow::Result<Box<dyn nvme::BlockDevice>> {
                        let (base, len) = l.region(k as u16);
                        Ok(Box::new(nvme::Region::new(dev, base, len).with_context(
                            || format!("disk {d}: region {k} does not fit the disk"),
                        )?))
                    },
                )
                .collect()
        })
        .collect()
}

/// TEST ONLY (`--fault-inject-disk N`): puts disk `disk` behind the fault injector
/// `switch`. The store sees the same device, so the disk opens, serves and
/// fails exactly as a plain one would; only SIGUSR1 (see [`TestSignals`]) throws the
/// switch.
fn wrap_faulty(
    devices: Vec<Box<dyn nvme::BlockDevice>>,
    disk: u16,
    switch: &Arc<nvme::faulty::FaultSwitch>,
) -> Vec<Box<dyn nvme::BlockDevice>> {
    devices
        .into_iter()
        .enumerate()
        .map(|(i, dev)| -> Box<dyn nvme::BlockDevice> {
            if i == usize::from(disk) {
                Box::new(nvme::faulty::FaultyDevice::new(dev, Arc::clone(switch)))
            } else {
                dev
            }
        })
        .collect()
}

/// TEST ONLY: the signals that drive the test hooks, handled on their own thread so
/// the handler itself only records the signal (signal-hook's iterator) and the work —
/// logging, throwing a switch — happens outside signal context. Nothing is registered
/// unless a test flag is set: a production node leaves SIGUSR1/SIGUSR2 alone.
///
/// - SIGUSR1 with `--fault-inject-disk N`: disk N fails every I/O from now on.
/// - SIGUSR2 with `--test-hooks`: dataplane loop `--test-stall-loop` (default 0) blocks
///   once for `--test-stall-ms`.
struct TestSignals {
    handle: signal_hook::iterator::Handle,
    thread: std::thread::JoinHandle<()>,
}

impl TestSignals {
    fn start(
        fault: Option<(u16, Arc<nvme::faulty::FaultSwitch>)>,
        stall: Option<Arc<AtomicBool>>,
    ) -> anyhow::Result<Option<TestSignals>> {
        use signal_hook::consts::{SIGUSR1, SIGUSR2};
        let mut wanted = Vec::new();
        if fault.is_some() {
            wanted.push(SIGUSR1);
        }
        if stall.is_some() {
            wanted.push(SIGUSR2);
        }
        if wanted.is_empty() {
            return Ok(None);
        }
        let mut signals = signal_hook::iterator::Signals::new(&wanted)
            .context("cannot install the test-hook signal handlers")?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("test-hooks".into())
            .spawn(move || {
                for sig in signals.forever() {
                    match (sig, &fault, &stall) {
                        (SIGUSR1, Some((disk, switch)), _) => {
                            tracing::warn!(
                                disk = *disk,
                                "test hook: SIGUSR1, the disk now fails every I/O"
                            );
                            switch.fail_now();
                        }
                        (SIGUSR2, _, Some(trigger)) => {
                            tracing::warn!("test hook: SIGUSR2, stalling the dataplane loop");
                            trigger.store(true, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
            })
            .context("cannot start the test-hook thread")?;
        Ok(Some(TestSignals { handle, thread }))
    }

    fn stop(self) {
        self.handle.close();
        let _ = self.thread.join();
    }
}

fn run(flags: Flags) -> anyhow::Result<()> {
    let cfg = Config::resolve(flags)?;
    // Before anything is opened: every descriptor the configuration may need must be
    // there when it is needed, or the node does not start.
    match fdlimit::ensure(cfg.connections_max, cfg.disks)? {
        fdlimit::Outcome::Enough { soft } => {
            tracing::debug!(limit = soft, "file descriptor limit suffices")
        }
        fdlimit::Outcome::RaisedSoft { from, to } | fdlimit::Outcome::RaisedHard { from, to } => {
            tracing::info!(
                from,
                to,
                "raised the file descriptor limit for connections_max"
            )
        }
    }
    let dir = datadir::DataDir::open(&cfg.data_dir)?;
    let node = match cfg.node_id.clone() {
        Some(node) => node,
        None => dir.node_id()?,
    };
    let node_id = node.id;
    let node_name = node.name;
    let epoch = dir.next_epoch()?;
    let asked = cfg.dataplane_cores;
    // `disks` keeps the NVMe controllers (and their vfio-pci bindings) until the
    // stores, which hold their queues, are gone: it is declared before them.
    // Queue pairs asked of each NVMe controller: one per loop, as many as a disk can
    // be carved for while the number of loops is not known yet (the controller grants
    // what it has; each loop creates its own when it opens the disk).
    let disks = open_disks(
        &cfg,
        &dir,
        asked.unwrap_or(dataplane::store::label::SHARDS_MAX),
    )?;
    let mut first = handles(&disks)?;
    let loops = loops_for(asked, &mut first)?;
    let mut labels = Vec::with_capacity(first.len());
    {
        let mut rng = rand::thread_rng();
        for (i, dev) in first.iter_mut().enumerate() {
            let l = dataplane::store::label::open_or_label(dev.as_mut(), Some(loops), &mut rng)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("disk {i} ({})", dev.info().location))?;
            labels.push(l);
        }
    }
    let mut handles_per_loop = vec![first];
    for _ in 1..loops {
        handles_per_loop.push(handles(&disks)?);
    }
    let mut handles = handles_per_loop;
    let mut fault = None;
    if let Some(disk) = cfg.fault_inject_disk {
        // The configuration checked that `disk` is one of the node's disks. Every
        // loop's handle on it goes behind the same switch.
        let switch = nvme::faulty::FaultSwitch::new();
        for h in handles.iter_mut() {
            let devs = std::mem::take(h);
            *h = wrap_faulty(devs, disk, &switch);
        }
        tracing::warn!(
            disk,
            "TEST HOOK ARMED (--fault-inject-disk): SIGUSR1 makes every I/O on this disk fail; never use this in production"
        );
        if let Some(ms) = cfg.test_disk_latency_ms {
            tracing::warn!(
                disk,
                ms,
                "TEST HOOK ARMED (--test-disk-latency-ms): every I/O on this disk completes late"
            );
            switch.set_latency(std::time::Duration::from_millis(ms));
        }
        fault = Some((disk, switch));
    }
    let regions = carve(handles, &labels)?;
    let stall_trigger = cfg.test_stall_ms.map(|ms| {
        tracing::warn!(
            stall_ms = ms,
            "TEST HOOKS ARMED (--test-hooks): SIGUSR2 stalls the dataplane loop; never use this in production"
        );
        Arc::new(AtomicBool::new(false))
    });

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("cannot install signal handler")?;
    }

    let store_cfg = dataplane::store::StoreConfig {
        cache_bytes: usize::try_from(cfg.cache_bytes).unwrap_or(usize::MAX) / usize::from(loops),
        ..dataplane::store::StoreConfig::default()
    };
    let mut stores = Vec::with_capacity(usize::from(loops));
    for (k, devs) in regions.into_iter().enumerate() {
        let store = dataplane::store::Store::open(devs, store_cfg.clone(), node_id)
            .with_context(|| format!("cannot open shard {k} of the object store"))?;
        stores.push(store);
    }
    for d in dataplane::handle::merge_reports(&stores.iter().map(|s| s.disks()).collect::<Vec<_>>())
    {
        tracing::info!(
            disk = d.id.0,
            identity = %hex::encode(d.identity),
            state = ?d.state,
            backend = d.backend,
            location = %d.location,
            objects = d.objects_used,
            bytes_free = d.bytes_free,
            "disk"
        );
    }
    let mut meshes: Vec<Option<dataplane::server::mesh::MeshEnd>> = if loops > 1 {
        dataplane::server::mesh::mesh(loops)
            .context("cannot create the queues between dataplane loops")?
            .into_iter()
            .map(Some)
            .collect()
    } else {
        vec![None]
    };
    let mut shards: Vec<dataplane::server::shards::Shards> = stores
        .into_iter()
        .zip(meshes.iter_mut())
        .map(|(store, mesh)| dataplane::server::shards::Shards::new(store, mesh.take()))
        .collect();
    let dups = dataplane::server::shards::build_directories(&mut shards);
    if dups > 0 {
        tracing::error!(dups, "objects found held by two shards");
    }
    tracing::info!(loops, "dataplane loops (one shard each)");
    anyhow::ensure!(
        cfg.test_stall_ms.is_none() || cfg.test_stall_loop < usize::from(loops),
        "--test-stall-loop {}: the node runs dataplane loops 0 to {}",
        cfg.test_stall_loop,
        loops - 1
    );
    let auth = node_auth(&cfg)?;
    let (handle, ends) = dataplane::handle::handle_for(loops);
    let server_cfg = |loops: u16| dataplane::server::ServerConfig {
        listen: cfg.listen,
        multicast_group: cfg.multicast,
        multicast_if: cfg.multicast_if,
        chunk_max: dosp::wire::CHUNK_MAX_DEFAULT,
        // The kernel spreads connections over the loops; each admits its share.
        connections_max: cfg.connections_max.div_ceil(usize::from(loops)),
        idle_sleep: Duration::from_millis(100),
        checkpoint_interval: Duration::from_secs(5),
        request_timeout: Duration::from_millis(cfg.request_timeout_ms),
        idle_timeout: Duration::from_millis(cfg.idle_timeout_ms),
        header_timeout: Duration::from_millis(cfg.header_timeout_ms),
        transfer_rate_min: cfg.transfer_rate_min,
        auth: auth.clone(),
        test_stall: stall_trigger
            .as_ref()
            .zip(cfg.test_stall_ms)
            .map(|(trigger, ms)| dataplane::server::TestStall {
                trigger: Arc::clone(trigger),
                duration: Duration::from_millis(ms),
                loop_index: cfg.test_stall_loop,
            }),
    };
    let mut servers = Vec::with_capacity(usize::from(loops));
    // With --net dpdk: the one loop's thread, already serving (it is made on its own
    // thread: EAL and the port live there). And where signed URLs are served over
    // HTTP, when they are.
    let (local, http_local, dpdk_thread): (
        _,
        Option<std::net::SocketAddr>,
        Option<std::thread::JoinHandle<std::io::Result<_>>>,
    ) = match &cfg.net {
        Net::Kernel => {
            let listeners = dataplane::server::accept::bind_group(
                cfg.listen,
                cfg.connections_max,
                usize::from(loops),
            )
            .with_context(|| format!("cannot bind DOSP on {}", cfg.listen))?;
            for (k, ((shard, end), listener)) in
                shards.into_iter().zip(ends).zip(listeners).enumerate()
            {
                // Loop 0 also serves UDP: unicast queries and the multicast group.
                let server = dataplane::server::Server::bind_loop(
                    server_cfg(loops),
                    listener,
                    k == 0,
                    shard,
                    end,
                )
                .with_context(|| {
                    format!(
                        "cannot bind DOSP on {} / multicast {}",
                        cfg.listen, cfg.multicast
                    )
                })?;
                servers.push(server);
            }
            if let Some(addr) = cfg.http_listen {
                let listeners = dataplane::server::accept::bind_group(
                    addr,
                    cfg.connections_max,
                    usize::from(loops),
                )
                .with_context(|| format!("cannot bind HTTP on {addr}"))?;
                for (server, listener) in servers.iter_mut().zip(listeners) {
                    server
                        .serve_http(listener)
                        .with_context(|| format!("cannot serve HTTP on {addr}"))?;
                }
            }
            let http_local = servers.first().and_then(|s| s.http_addr());
            (servers[0].local_addr()?, http_local, None)
        }
        #[cfg(feature = "dpdk")]
        Net::Dpdk(net) => {
            let (thread, local, http_local) = dpdk_net::start(
                net,
                cfg.listen,
                cfg.http_listen,
                server_cfg(loops),
                shards,
                ends,
                &stop,
            )?;
            (
                std::net::SocketAddr::V4(local),
                http_local.map(std::net::SocketAddr::V4),
                Some(thread),
            )
        }
        #[cfg(not(feature = "dpdk"))]
        Net::Dpdk(_) => {
            // The configuration refuses it first; kept for a clear word all the same.
            drop((shards, ends));
            anyhow::bail!("this dosd was built without DPDK (cargo build --features dpdk)")
        }
    };
    if let Some(local) = http_local {
        tracing::info!(%local, "serving signed URLs over HTTP (dosp/HTTP.md)");
    }
    // The node's state, owned and published by the management core from here on.
    let node_state = dataplane::node::NodeState::new(
        node_id,
        node_name.clone(),
        epoch,
        dataplane::node::Addresses {
            dosp: match local {
                std::net::SocketAddr::V4(a) if !a.ip().is_unspecified() => a,
                _ => std::net::SocketAddrV4::new(cfg.multicast_if, local.port()),
            },
            multicast_group: cfg.multicast,
            multicast_if: cfg.multicast_if,
            mgmt: None,
        },
    );
    let boot = match &cfg.boot_esp {
        None => None,
        Some(esp) => {
            let slot = match cfg.boot_slot {
                Some(slot) => slot,
                None => {
                    let cmdline = std::fs::read_to_string("/proc/cmdline")
                        .context("--boot-esp: cannot read /proc/cmdline for dosd.slot=")?;
                    mgmt::update::slot_from_cmdline(&cmdline).with_context(|| {
                        format!(
                            "--boot-esp: the kernel command line has no dosd.slot=a|b \
                             (and no --boot-slot was given): {}",
                            cmdline.trim()
                        )
                    })?
                }
            };
            Some(mgmt::update::BootConfig {
                esp: esp.clone(),
                slot,
                reboot_command: cfg.reboot_command.clone(),
            })
        }
    };
    let mgmt_cfg = mgmt::MgmtConfig {
        listen: cfg.mgmt_listen,
        tls: cfg.mgmt_tls.clone(),
        network_backend: match cfg.net {
            Net::Kernel => "kernel",
            Net::Dpdk(_) => "dpdk",
        }
        .into(),
        token: cfg.mgmt_token.clone(),
        thresholds: mgmt::Thresholds {
            disks_down_max: cfg.disks_down_max,
            dataplane_stall_ms: cfg.dataplane_stall_ms,
        },
        command_wait: Duration::from_secs(5),
        boot,
        restarts_file: Some(cfg.data_dir.join(mgmt::supervisor::FILE)),
    };
    let mgmt = mgmt::Mgmt::start(mgmt_cfg, handle.clone(), node_state)
        .with_context(|| format!("cannot start the management core on {}", cfg.mgmt_listen))?;
    let announcer_cfg = mgmt::cluster::AnnouncerConfig {
        heartbeat_interval: Duration::from_millis(cfg.heartbeat_ms),
        repeat: 3,
        repeat_gap: Duration::from_millis(100),
        // With --net dpdk the multicast interface is the DPDK port's: loop 0 speaks.
        via_dataplane: matches!(cfg.net, Net::Dpdk(_)),
        auth: auth.clone(),
    };
    let announcer = mgmt::cluster::Announcer::start(announcer_cfg, handle, mgmt.monitor())
        .with_context(|| {
            format!(
                "cannot start heartbeats on {} via {}",
                cfg.multicast, cfg.multicast_if
            )
        })?;
    // Before the ready line, so a test may signal as soon as it reads that line.
    let test_signals = TestSignals::start(fault, stall_trigger)?;
    tracing::info!(
        node_id = %format!("{node_id:016x}"),
        node_name = node_name.as_ref().map_or("-", |n| n.as_str()),
        epoch,
        dosp = %local,
        multicast = %cfg.multicast,
        multicast_if = %cfg.multicast_if,
        mgmt = %mgmt.url(),
        data_dir = %cfg.data_dir.display(),
        "dosd ready"
    );
    // One machine-readable line on stdout for scripts and tests (the port is real even
    // when --listen asked for port 0); `name=` only for a named node.
    let name_field = node_name
        .as_ref()
        .map(|n| format!(" name={n}"))
        .unwrap_or_default();
    // `http=` only when signed URLs are served (on DPDK: the DPDK address, as dosp=).
    let http_field = http_local.map(|a| format!(" http={a}")).unwrap_or_default();
    // `mgmt_tls=on` only when the REST endpoint speaks HTTPS (and only HTTPS).
    let mgmt_tls_field = if mgmt.https() { " mgmt_tls=on" } else { "" };
    println!(
        "listening dosp={local} mgmt={} node={node_id:016x}{name_field}{http_field}{mgmt_tls_field}",
        mgmt.local_addr()
    );

    // Each dataplane loop runs on its own thread `dataplane-K`, pinned to its own core
    // when the machine has more than one: core 0 stays with the management core and
    // the kernel's housekeeping (ARCHITECTURE.md), the loops take cores 1, 2, … and wrap
    // around when there are more loops than cores. This thread waits for them.
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut threads = Vec::with_capacity(servers.len() + 1);
    threads.extend(dpdk_thread);
    for (k, server) in servers.into_iter().enumerate() {
        let pin = (cores.len() > 1).then(|| cores[(1 + k) % cores.len()]);
        let t = std::thread::Builder::new()
            .name(format!("dataplane-{k}"))
            .spawn({
                let stop = Arc::clone(&stop);
                move || {
                    match pin {
                        Some(core) if core_affinity::set_for_current(core) => {
                            tracing::info!(core = core.id, "dataplane pinned");
                        }
                        Some(core) => tracing::warn!(
                            core = core.id,
                            "could not pin the dataplane; running unpinned"
                        ),
                        None => tracing::info!("one core: dataplane unpinned"),
                    }
                    let result = server.run(&stop);
                    // A loop that ends (an error, or the stop flag) ends the node: the
                    // other loops would wait forever for its shard's answers.
                    stop.store(true, Ordering::Relaxed);
                    result
                }
            })
            .context("cannot start a dataplane thread")?;
        threads.push(t);
    }
    // Any loop ending ends the node: the others are told to stop too.
    let mut result = Ok(Ok(()));
    for t in threads {
        let r = t.join();
        stop.store(true, Ordering::Relaxed);
        if result.as_ref().is_ok_and(|r| r.is_ok()) {
            result = r.map(|r| r.map(|_| ()));
        }
    }
    if let Some(t) = test_signals {
        t.stop();
    }
    // Tell the cluster this node is leaving (repeated, bounded), then stop serving REST.
    announcer.stop();
    mgmt.stop();
    match result {
        Ok(Ok(())) => {
            tracing::info!("dosd stopped cleanly");
            Ok(())
        }
        Ok(Err(e)) => Err(e).context("dataplane failed"),
        Err(_) => anyhow::bail!("dataplane thread panicked"),
    }
}

/// The signature gate's state, from `--cluster-key-file`; `None` without a key, said
/// loudly: such a node serves anyone who reaches it (dosp/PROTOCOL.md §7).
fn node_auth(cfg: &Config) -> anyhow::Result<Option<Arc<dataplane::server::auth::NodeAuth>>> {
    let Some(path) = &cfg.cluster_key_file else {
        tracing::warn!(
            "NO CLUSTER KEY (--cluster-key-file): DOSP requests are not authenticated; any client that can reach this node can store, fetch and delete any object"
        );
        return Ok(None);
    };
    let ring = dosp::auth::KeyRing::load(path)
        .with_context(|| format!("cannot use cluster key file {}", path.display()))?;
    if ring.readable_by_others() {
        tracing::warn!(
            file = %path.display(),
            mode = %format!("{:o}", ring.file_mode().unwrap_or(0)),
            "the cluster key file is readable by group or others: chmod 600 it"
        );
    }
    let ids: Vec<&str> = ring.keys().iter().map(|k| k.id()).collect();
    tracing::info!(
        keys = %ids.join(","),
        signer = ring.signer().id(),
        allow_md5 = cfg.auth_allow_md5,
        window_secs = cfg.auth_window_secs,
        replay_max = cfg.auth_replay_max,
        "DOSP requests must be signed with a cluster key"
    );
    Ok(Some(Arc::new(dataplane::server::auth::NodeAuth::new(
        ring,
        cfg.auth_allow_md5,
        Duration::from_secs(cfg.auth_window_secs),
        cfg.auth_replay_max,
    ))))
}
