//! `nvme-guest`: checks and benchmarks of the user-space NVMe driver against a real
//! controller. Built for and run inside the QEMU test guest (`qemu/test nvme`), where
//! the controllers are QEMU's emulated NVMe devices; each subcommand exits non-zero
//! with a `FAIL:` line when a check fails.
//!
//! It needs root, an IOMMU and vfio-pci: it takes the controller from the kernel's
//! nvme driver itself (and gives it back on exit).
#![deny(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use nvme::driver::{
    self, BufId, Controller, CtrlOptions, IoCmd, IoDone, IoQueue, NvmeDevice, QueueOptions,
};
use nvme::{AlignedBuf, BlockDevice};

#[derive(Parser)]
#[command(about = "Guest-side checks of dosd's user-space NVMe driver")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring-up and Identify match what the controller was given.
    Identify {
        spec: String,
        #[arg(long)]
        expect_serial: String,
        #[arg(long)]
        expect_bytes: u64,
    },
    /// Write/read/verify across PRP shapes and unaligned tails; flush; write zeroes;
    /// deallocate.
    Rw { spec: String },
    /// Several queue pairs used from several threads at once.
    Threads {
        spec: String,
        #[arg(long, default_value_t = 4)]
        threads: usize,
        #[arg(long, default_value_t = 200)]
        ops: usize,
    },
    /// Print the SMART / health log and the error log.
    Smart { spec: String },
    /// Clean shutdown, then a new bring-up: the unsafe-shutdown count must not grow.
    ShutdownCycle { spec: String },
    /// I/O until the harness pulls the device (`device_del ID`); the driver must fail
    /// I/O cleanly and the process keep running.
    Hotplug {
        spec: String,
        #[arg(long)]
        device_id: String,
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// The object store's conformance suite on NVMe devices.
    Store {
        specs: Vec<String>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// 4 KiB random reads or writes at a queue depth; prints IOPS and CPU per I/O.
    Bench {
        spec: String,
        #[arg(long, default_value = "read")]
        rw: String,
        #[arg(long, default_value_t = 1)]
        qd: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Span of the device to address, in MiB.
        #[arg(long, default_value_t = 256)]
        span_mib: u64,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Identify {
            spec,
            expect_serial,
            expect_bytes,
        } => identify(&spec, &expect_serial, expect_bytes),
        Cmd::Rw { spec } => rw(&spec),
        Cmd::Threads { spec, threads, ops } => threads_test(&spec, threads, ops),
        Cmd::Smart { spec } => smart(&spec),
        Cmd::ShutdownCycle { spec } => shutdown_cycle(&spec),
        Cmd::Hotplug {
            spec,
            device_id,
            timeout_s,
        } => hotplug(&spec, &device_id, timeout_s),
        Cmd::Store { specs, seed } => store(&specs, seed),
        Cmd::Bench {
            spec,
            rw,
            qd,
            seconds,
            span_mib,
        } => bench(&spec, &rw, qd, seconds, span_mib),
    };
    if let Err(e) = r {
        println!("FAIL: {e:#}");
        std::process::exit(1);
    }
}

fn open(spec: &str, queues: u16) -> Result<driver::Opened> {
    let opts = CtrlOptions {
        io_queues: queues,
        command_timeout: Duration::from_secs(30),
        ..CtrlOptions::default()
    };
    driver::open(spec, &opts).map_err(anyhow::Error::msg)
}

fn identify(spec: &str, serial: &str, bytes: u64) -> Result<()> {
    let o = open(spec, 1)?;
    let c = &o.ctrl;
    println!(
        "identify: pci {} serial {:?} model {:?} firmware {:?} version {:#x} ns bytes {} block {} mdts {} vwc {} oncs {:#x} dlfeat {:#x} hugepages {}",
        c.pci(),
        c.info.serial,
        c.info.model,
        c.info.firmware,
        c.version,
        c.ns.size_bytes(),
        c.ns.block_size,
        c.mdts_bytes(),
        c.info.volatile_write_cache,
        c.info.oncs,
        c.ns.dlfeat,
        c.hugepages()
    );
    ensure!(
        c.info.serial == serial,
        "serial {:?}, expected {serial:?}",
        c.info.serial
    );
    ensure!(
        c.ns.size_bytes() == bytes,
        "namespace {} bytes, expected {bytes}",
        c.ns.size_bytes()
    );
    ensure!(
        c.version >= 0x0001_0000,
        "version register {:#x}",
        c.version
    );
    println!("ok: identify");
    Ok(())
}

/// A deterministic pattern: every 8 bytes hold (seed, position).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, ch) in v.chunks_mut(8).enumerate() {
        let x = (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            ^ (i as u64).wrapping_mul(0xff51_afd7_ed55_8ccd);
        ch.copy_from_slice(&x.to_le_bytes()[..ch.len()]);
    }
    v
}

fn write_read(q: &mut IoQueue, b: BufId, offset: u64, data: &[u8]) -> Result<()> {
    let len = data.len() as u32;
    q.buf(b).write_from(0, data);
    q.run(
        IoCmd::Write {
            offset,
            len,
            fua: false,
        },
        Some(b),
    )
    .with_context(|| format!("write {len} at {offset}"))?;
    q.buf(b).zero();
    q.run(IoCmd::Read { offset, len }, Some(b))
        .with_context(|| format!("read {len} at {offset}"))?;
    let mut back = vec![0u8; data.len()];
    q.buf(b).read_into(0, &mut back);
    if back != data {
        let at = back.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0);
        bail!("read back of {len} bytes at {offset} differs at byte {at}");
    }
    Ok(())
}

/// Reads `len` bytes at `offset` and says whether they are all zero.
fn reads_zeroes(q: &mut IoQueue, b: BufId, offset: u64, len: usize) -> Result<bool> {
    q.buf(b).write_from(0, &vec![0xa5; len]);
    let len32 = len as u32;
    q.run(IoCmd::Read { offset, len: len32 }, Some(b))
        .with_context(|| format!("read {len} at {offset}"))?;
    let mut back = vec![1u8; len];
    q.buf(b).read_into(0, &mut back);
    Ok(back.iter().all(|&x| x == 0))
}

fn rw(spec: &str) -> Result<()> {
    let o = open(spec, 1)?;
    let ctrl = o.ctrl.clone();
    let mut q = IoQueue::new(&ctrl, QueueOptions::default())?;
    let bs = ctrl.ns.block_size as usize;
    let max = q.buffer_bytes();
    let size = ctrl.ns.size_bytes();
    let b = q.take_buf().context("no buffer")?;
    // Lengths: one block, tails that end mid-page, exactly one and two pages (PRP2
    // direct), three and more pages (PRP list), the largest buffer (MDTS bound).
    let mut lens: Vec<usize> = vec![
        bs,
        4096 - bs,
        4096,
        4096 + bs,
        8192,
        8192 + bs,
        12288,
        65536 + bs,
        max - bs,
        max,
    ];
    lens.retain(|&l| l > 0 && l <= max && l % bs == 0);
    let mut n = 0;
    for (i, &len) in lens.iter().enumerate() {
        for offset in [0u64, (i as u64 + 1) * (1 << 20), size - len as u64] {
            write_read(&mut q, b, offset, &pattern(i as u64 * 7 + offset, len))?;
            n += 1;
        }
    }
    println!("ok: {n} write/read/verify transfers, lengths {lens:?}");

    q.run(IoCmd::Flush, None).context("flush")?;
    println!("ok: flush");

    let off = 8 << 20;
    let len = 64 * 1024;
    write_read(&mut q, b, off, &pattern(99, len))?;
    if ctrl.info.supports_write_zeroes() {
        q.run(
            IoCmd::WriteZeroes {
                offset: off,
                len: len as u32,
            },
            None,
        )
        .context("write zeroes")?;
        ensure!(
            reads_zeroes(&mut q, b, off, len)?,
            "write zeroes left data behind"
        );
        println!("ok: write zeroes then read zeroes");
    } else {
        println!(
            "skip: controller does not support Write Zeroes (ONCS {:#x})",
            ctrl.info.oncs
        );
    }

    write_read(&mut q, b, off, &pattern(100, len))?;
    if ctrl.info.supports_dataset_management() {
        q.run(
            IoCmd::Deallocate {
                offset: off,
                len: len as u32,
            },
            None,
        )
        .context("deallocate")?;
        let zeroes = reads_zeroes(&mut q, b, off, len)?;
        if ctrl.ns.deallocated_reads_zero() {
            ensure!(
                zeroes,
                "deallocated blocks did not read as zeroes (DLFEAT {:#x})",
                ctrl.ns.dlfeat
            );
            println!("ok: deallocate then read zeroes");
        } else {
            println!("ok: deallocate accepted (DLFEAT {:#x}: reads of deallocated blocks are not defined as zeroes)", ctrl.ns.dlfeat);
        }
    } else {
        println!("skip: controller does not support Dataset Management");
    }

    // Errors: a read past the end of the namespace is refused by the controller with a
    // named status, and the queue keeps working after it.
    let e = q.run(
        IoCmd::Read {
            offset: size,
            len: bs as u32,
        },
        Some(b),
    );
    match e {
        Err(driver::NvmeError::Status { status, .. }) => {
            println!("ok: read past the end refused: {status}")
        }
        other => bail!("read past the end: expected an NVMe status, got {other:?}"),
    }
    write_read(&mut q, b, 0, &pattern(5, 4096)).context("queue after an error")?;

    // The BlockDevice face: a 1 MiB transfer split into pieces in flight together.
    drop(q);
    let mut dev = NvmeDevice::new(&ctrl, QueueOptions::default())?;
    let data = pattern(77, 1 << 20);
    let mut wbuf = AlignedBuf::new(data.len());
    wbuf.copy_from_slice(&data);
    dev.write_at(16 << 20, &wbuf)?;
    dev.flush()?;
    let mut rbuf = AlignedBuf::new(data.len());
    dev.read_at(16 << 20, &mut rbuf)?;
    ensure!(rbuf[..] == data[..], "1 MiB BlockDevice round trip differs");
    ensure!(
        dev.read_at(size, &mut rbuf).is_err(),
        "read past the end accepted"
    );
    println!(
        "ok: BlockDevice 1 MiB round trip in {} pieces",
        data.len().div_ceil(dev_piece(&ctrl))
    );
    Ok(())
}

fn dev_piece(ctrl: &Controller) -> usize {
    let m = ctrl.mdts_bytes() as usize;
    QueueOptions::default()
        .buffer_bytes
        .min(if m == 0 { usize::MAX } else { m })
}

fn threads_test(spec: &str, threads: usize, ops: usize) -> Result<()> {
    let o = open(spec, threads as u16)?;
    let ctrl = o.ctrl.clone();
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let ctrl = ctrl.clone();
            std::thread::spawn(move || -> Result<(u16, usize)> {
                let mut q = IoQueue::new(
                    &ctrl,
                    QueueOptions {
                        entries: 16,
                        buffers: 8,
                        buffer_bytes: 16384,
                    },
                )?;
                let qid = q.qid();
                let base = (t as u64 + 1) * (32 << 20);
                let mut done: Vec<IoDone> = Vec::with_capacity(16);
                let mut submitted = 0usize;
                let mut completed = 0usize;
                // Writes at queue depth 8, then read back and verify each.
                while completed < ops {
                    while submitted < ops {
                        let Some(b) = q.take_buf() else { break };
                        let off = base + (submitted as u64) * 16384;
                        q.buf(b).write_from(0, &pattern(off, 16384));
                        q.submit(
                            IoCmd::Write {
                                offset: off,
                                len: 16384,
                                fua: false,
                            },
                            Some(b),
                            submitted as u64,
                        )?;
                        submitted += 1;
                    }
                    q.ring();
                    done.clear();
                    q.poll(usize::MAX, &mut done);
                    for d in done.drain(..) {
                        d.result
                            .with_context(|| format!("thread {t} write {}", d.tag))?;
                        if let Some(b) = d.buf {
                            q.give_buf(b);
                        }
                        completed += 1;
                    }
                }
                let b = q.take_buf().context("buffer")?;
                for i in 0..ops {
                    let off = base + (i as u64) * 16384;
                    q.run(
                        IoCmd::Read {
                            offset: off,
                            len: 16384,
                        },
                        Some(b),
                    )?;
                    let mut back = vec![0u8; 16384];
                    q.buf(b).read_into(0, &mut back);
                    ensure!(back == pattern(off, 16384), "thread {t}: block {i} differs");
                }
                Ok((qid, ops))
            })
        })
        .collect();
    let mut qids = Vec::new();
    for h in handles {
        let (qid, _) = h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
        qids.push(qid);
    }
    qids.sort();
    qids.dedup();
    ensure!(qids.len() == threads, "queues were shared: {qids:?}");
    println!(
        "ok: {threads} threads on queue pairs {qids:?}, {ops} writes of 16 KiB each at depth 8, all verified, {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn smart(spec: &str) -> Result<()> {
    let o = open(spec, 1)?;
    let s = o.ctrl.smart_log()?;
    println!("smart: {s:?}");
    ensure!(
        s.temperature_kelvin > 200 && s.temperature_kelvin < 400,
        "implausible temperature {} K",
        s.temperature_kelvin
    );
    let errors = o.ctrl.error_log(16)?;
    println!("error log: {} entries {errors:?}", errors.len());
    println!("ok: SMART log read");
    Ok(())
}

fn shutdown_cycle(spec: &str) -> Result<()> {
    let before = {
        let o = open(spec, 1)?;
        let s = o.ctrl.smart_log()?;
        o.ctrl.shutdown().context("normal shutdown")?;
        s
    };
    let o = open(spec, 1)?;
    let after = o.ctrl.smart_log()?;
    println!(
        "unsafe shutdowns before {} after {}, power cycles before {} after {}",
        before.unsafe_shutdowns, after.unsafe_shutdowns, before.power_cycles, after.power_cycles
    );
    ensure!(
        after.unsafe_shutdowns == before.unsafe_shutdowns,
        "a clean shutdown was counted as unsafe"
    );
    // The controller works after the cycle.
    let mut dev = NvmeDevice::new(&o.ctrl, QueueOptions::default())?;
    let mut b = AlignedBuf::new(4096);
    dev.read_at(0, &mut b)?;
    println!("ok: clean shutdown and restart, no unsafe shutdown counted");
    Ok(())
}

fn hotplug(spec: &str, device_id: &str, timeout_s: u64) -> Result<()> {
    let o = open(spec, 1)?;
    let mut dev = NvmeDevice::new(&o.ctrl, QueueOptions::default())?;
    drop(o.ctrl);
    let size = dev.info().size_bytes;
    let mut buf = AlignedBuf::new(64 * 1024);
    let mut ok_ops = 0u64;
    let start = Instant::now();
    let mut asked = None;
    let err = loop {
        let off = (ok_ops * 65536) % (size - 65536);
        buf[..8].copy_from_slice(&ok_ops.to_le_bytes());
        let r = if ok_ops.is_multiple_of(2) {
            dev.write_at(off, &buf)
        } else {
            dev.read_at(off, &mut buf)
        };
        match r {
            Ok(()) => ok_ops += 1,
            Err(e) => break e,
        }
        if ok_ops == 50 && asked.is_none() {
            println!("DOSD-HOST: device_del {device_id}");
            asked = Some(Instant::now());
        }
        if start.elapsed() > Duration::from_secs(timeout_s) {
            bail!("device still answering after {timeout_s} s ({ok_ops} ops)");
        }
    };
    let noticed = asked.map(|t| t.elapsed()).unwrap_or_default();
    println!(
        "I/O failed after {ok_ops} good ops, {:.1} s after the removal request: {err}",
        noticed.as_secs_f64()
    );
    ensure!(
        asked.is_some(),
        "I/O failed before the device was pulled: {err}"
    );
    let msg = format!("{err:#}");
    ensure!(
        msg.contains("removed") || msg.contains("gone"),
        "unexpected error for a pulled device: {msg}"
    );
    // Later calls fail at once with the same reason; nothing hangs or crashes.
    let t = Instant::now();
    let again = dev
        .read_at(0, &mut buf)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    ensure!(
        again.contains("gone"),
        "second call after removal: {again:?}"
    );
    ensure!(
        t.elapsed() < Duration::from_secs(1),
        "second call took {:?}",
        t.elapsed()
    );
    drop(dev);
    // The kernel finishes the removal once the device is released.
    let gone_by = Instant::now() + Duration::from_secs(60);
    let pci = o.binding.as_ref().map(|b| b.pci.clone());
    if let Some(pci) = pci {
        let path = format!("/sys/bus/pci/devices/{pci}");
        while std::path::Path::new(&path).exists() {
            ensure!(
                Instant::now() < gone_by,
                "{pci} still present 60 s after release"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("ok: {pci} removed by the kernel after the driver released it");
    }
    println!("ok: surprise removal failed I/O cleanly with: {msg}");
    Ok(())
}

fn store(specs: &[String], seed: u64) -> Result<()> {
    ensure!(!specs.is_empty(), "name at least one device");
    let mut opened = Vec::new();
    for s in specs {
        opened.push(open(s, 2)?);
    }
    let ctrls: Vec<Arc<Controller>> = opened.iter().map(|o| o.ctrl.clone()).collect();
    let mut factory = || -> Result<Vec<Box<dyn BlockDevice>>, String> {
        ctrls
            .iter()
            .map(|c| {
                NvmeDevice::new(c, QueueOptions::default())
                    .map(|d| Box::new(d) as Box<dyn BlockDevice>)
                    .map_err(|e| e.to_string())
            })
            .collect()
    };
    let opts = dataplane::store::conformance::Options {
        seed,
        ..Default::default()
    };
    let start = Instant::now();
    let report =
        dataplane::store::conformance::run(&mut factory, &opts).map_err(anyhow::Error::msg)?;
    println!(
        "ok: store conformance on {} NVMe device(s) in {:.1} s: {report:?}",
        specs.len(),
        start.elapsed().as_secs_f64()
    );
    // The suite used each whole device as one log; dosd carves disks with a label in
    // block 0. Leave them blank (block 0 zero), as found, for whoever comes next.
    for mut dev in factory().map_err(anyhow::Error::msg)? {
        let zero = nvme::AlignedBuf::new(nvme::BLOCK_SIZE);
        let mut early = Vec::new();
        let (_, r) = nvme::run_blocking(
            dev.as_mut(),
            nvme::IoOp::Write {
                offset: 0,
                buf: zero,
            },
            &mut early,
        );
        r.context("cannot blank block 0 after the conformance suite")?;
        let (_, r) = nvme::run_blocking(dev.as_mut(), nvme::IoOp::Flush, &mut early);
        r.context("cannot flush after blanking block 0")?;
    }
    Ok(())
}

fn cpu_seconds() -> f64 {
    // /proc/self/stat fields 14 and 15: user and system time in clock ticks.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn bench(spec: &str, rw: &str, qd: usize, seconds: u64, span_mib: u64) -> Result<()> {
    let write = match rw {
        "read" => false,
        "write" => true,
        other => bail!("--rw must be read or write, not {other:?}"),
    };
    let o = open(spec, 1)?;
    let entries = (qd + 1).max(2) as u16;
    let mut q = IoQueue::new(
        &o.ctrl,
        QueueOptions {
            entries,
            buffers: qd as u16,
            buffer_bytes: 4096,
        },
    )?;
    let blocks = (span_mib << 20) / 4096;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * 4096
    };
    let mut done: Vec<IoDone> = Vec::with_capacity(qd);
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut ios = 0u64;
    let mut inflight = 0usize;
    loop {
        let now_done = Instant::now() >= end;
        while !now_done && inflight < qd {
            let Some(b) = q.take_buf() else { break };
            let offset = next();
            let cmd = if write {
                IoCmd::Write {
                    offset,
                    len: 4096,
                    fua: false,
                }
            } else {
                IoCmd::Read { offset, len: 4096 }
            };
            q.submit(cmd, Some(b), 0)?;
            inflight += 1;
        }
        q.ring();
        done.clear();
        q.poll(usize::MAX, &mut done);
        for d in done.drain(..) {
            d.result?;
            if let Some(b) = d.buf {
                q.give_buf(b);
            }
            inflight -= 1;
            ios += 1;
        }
        if now_done && inflight == 0 {
            break;
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    println!(
        "bench: engine=dosd-nvme rw={rw} qd={qd} ios={ios} seconds={wall:.2} iops={:.0} cpu_us_per_io={:.1}",
        ios as f64 / wall,
        cpu * 1e6 / ios.max(1) as f64
    );
    Ok(())
}
