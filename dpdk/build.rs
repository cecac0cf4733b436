//! Links DPDK statically (glibc stays dynamic) when the `dpdk` feature is on, and
//! compiles `shim/shim.c`. Without the feature it does nothing, so the crate builds
//! on machines without libdpdk-dev.
//!
//! `pkg-config --static --libs libdpdk` is not usable on Debian: it whole-archives
//! every driver and then wants `libsystemd.a`, which Debian does not ship. So the
//! archives are picked here: the drivers and buses, which register themselves in
//! ELF constructors that nothing references, are linked whole (`+whole-archive`);
//! the libraries they use are ordinary static archives, listed after their users.

use std::env;
use std::path::Path;
use std::process::Command;

/// Drivers, buses and the mempool handler: registered by constructors, so linked whole.
const WHOLE: &[&str] = &[
    "rte_net_ring",
    "rte_net_null",
    "rte_net_tap",
    "rte_net_af_packet",
    "rte_net_virtio",
    "rte_bus_vdev",
    "rte_bus_pci",
    "rte_mempool_ring",
];

/// The libraries, each after every library that uses it.
const LIBS: &[&str] = &[
    "rte_gso",
    "rte_hash",
    "rte_ethdev",
    "rte_meter",
    "rte_net",
    "rte_mbuf",
    "rte_mempool",
    "rte_rcu",
    "rte_ring",
    "rte_pci",
    "rte_eal",
    "rte_telemetry",
    "rte_kvargs",
];

/// What DPDK needs from outside, also static (Debian ships these archives).
const SYSTEM: &[&str] = &["numa", "bsd", "md"];

fn pkg_config(args: &[&str]) -> String {
    let out = Command::new("pkg-config")
        .args(args)
        .arg("libdpdk")
        .output()
        .unwrap_or_else(|e| panic!("the dpdk feature needs pkg-config: {e}"));
    assert!(
        out.status.success(),
        "the dpdk feature needs DPDK's development files \
         (apt-get install dpdk-dev libdpdk-dev pkg-config): pkg-config {args:?} libdpdk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("pkg-config prints UTF-8")
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=shim/shim.c");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    if env::var_os("CARGO_FEATURE_DPDK").is_none() {
        return;
    }

    // All of DPDK's cflags, both for the headers and for the code they inline.
    let cflags = pkg_config(&["--cflags"]);
    let mut build = cc::Build::new();
    build
        .file("shim/shim.c")
        .warnings(true)
        .extra_warnings(true);
    for flag in cflags.split_whitespace() {
        build.flag(flag);
    }
    // Before the DPDK archives: the shim references them, not the other way round.
    build.compile("dosd_dpdk_shim");

    let libdir = pkg_config(&["--variable=libdir"]);
    let libdir = libdir.trim();
    println!("cargo:rustc-link-search=native={libdir}");
    for lib in WHOLE.iter().chain(LIBS) {
        assert!(
            Path::new(libdir).join(format!("lib{lib}.a")).exists(),
            "lib{lib}.a is missing from {libdir}: install libdpdk-dev"
        );
    }
    for lib in WHOLE {
        println!("cargo:rustc-link-lib=static:+whole-archive,-bundle={lib}");
    }
    for lib in LIBS {
        println!("cargo:rustc-link-lib=static:-bundle={lib}");
    }
    for lib in SYSTEM {
        println!("cargo:rustc-link-lib=static:-bundle={lib}");
    }
}
