//! dosd configuration: command-line flags over an optional TOML file over defaults.
//!
//! Every option has a default that starts a working node on any Linux box: four sparse
//! 1 GiB file-backed disks under `./dosd-data`, DOSP on 127.0.0.1:7370, the cluster
//! group 239.255.73.70:7371 on the loopback interface (so a default node never sends
//! multicast beyond the machine).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use clap::Parser;
use dosp::wire::NodeName;
use serde::Deserialize;

pub const LISTEN_DEFAULT: &str = "127.0.0.1:7370";
/// The DOSP port of [`LISTEN_DEFAULT`] (the default with `--net dpdk`).
pub const LISTEN_PORT_DEFAULT: u16 = 7370;
pub const MGMT_LISTEN_DEFAULT: &str = "127.0.0.1:7380";
/// Administratively scoped (RFC 2365) group; "7370" echoes the DOSP port.
pub const MULTICAST_DEFAULT: &str = "239.255.73.70:7371";
pub const MULTICAST_IF_DEFAULT: Ipv4Addr = Ipv4Addr::LOCALHOST;
pub const DISKS_DEFAULT: u16 = 4;
pub const DISK_SIZE_DEFAULT: u64 = 1 << 30;
/// Smallest disk the store can use: superblocks plus a few segments.
pub const DISK_SIZE_MIN: u64 = 16 << 20;
pub const HEARTBEAT_MS_DEFAULT: u64 = 1000;
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 30_000;
pub const IDLE_TIMEOUT_MS_DEFAULT: u64 = 600_000;
/// A request's header and In structure (at most 64 KiB) must arrive within this of
/// their first byte: generous for any real link, short enough that a client sending a
/// byte at a time cannot hold a connection.
pub const HEADER_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Mid-request, a connection must move this many bytes a second (measured over
/// request-timeout windows): a 4 MiB chunk in a minute, which any real client beats,
/// while a trickle of a few bytes a second is closed.
pub const TRANSFER_RATE_MIN_DEFAULT: u64 = 64 << 10;
/// Connections the dataplane serves at once. Each holds a file descriptor and up to
/// about 1 MiB of buffers (256 KiB in, up to 768 KiB out), touched only as used.
pub const CONNECTIONS_MAX_DEFAULT: usize = 1024;
/// Most dataplane loops (the most regions a disk is carved into).
pub const DATAPLANE_CORES_MAX: u16 = 64;
/// A bound on `connections_max`, so a typo cannot ask for millions of descriptors.
pub const CONNECTIONS_MAX_LIMIT: usize = 65_536;
/// One disk down degrades the node; two make it failing.
pub const DISKS_DOWN_MAX_DEFAULT: u16 = 1;
/// The dataplane loop turns at least every 100 ms when idle (its idle sleep), so 2 s
/// without a turn is a stall, not a quiet node.
pub const DATAPLANE_STALL_MS_DEFAULT: u64 = 2000;
/// The stall threshold must stay well above the loop's idle sleep (100 ms).
pub const DATAPLANE_STALL_MS_MIN: u64 = 500;
/// How long the `--test-hooks` stall blocks the dataplane loop: past the default stall
/// threshold, so the node is seen `failing`.
pub const TEST_STALL_MS_DEFAULT: u64 = 3000;

/// Command-line flags. Each overrides the same key of the `--config` file.
#[derive(Parser, Debug, Default)]
#[command(
    name = "dosd",
    version,
    about = "dosd — an intelligent storage node serving DOSP"
)]
pub struct Flags {
    /// TOML file with any of the keys below (snake_case, e.g. data_dir = "/srv/dosd").
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Directory holding the disk images, the node id and the epoch [default: ./dosd-data]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// DOSP address, TCP and UDP [default: 127.0.0.1:7370]
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Management (REST) address [default: 127.0.0.1:7380]
    #[arg(long)]
    pub mgmt_listen: Option<SocketAddr>,
    /// Cluster multicast group GROUP:PORT [default: 239.255.73.70:7371]
    #[arg(long)]
    pub multicast: Option<SocketAddrV4>,
    /// Local interface address for multicast (heartbeats, announcements, the LOCATE
    /// group) [default: 127.0.0.1; with --net dpdk: the DPDK port's address]
    #[arg(long)]
    pub multicast_if: Option<Ipv4Addr>,
    /// Number of file-backed disks [default: 4]
    #[arg(long)]
    pub disks: Option<u16>,
    /// A disk to serve, repeatable, in place of the data directory's images:
    /// `nvme:SERIAL`, `nvme:PCI_ADDRESS` (the user-space NVMe driver; as root dosd
    /// binds the controller to vfio-pci and gives it back on exit) or `file:PATH`
    /// (a file or block device of --disk-size bytes)
    #[arg(long = "disk", value_name = "SPEC")]
    pub disk: Vec<String>,
    /// Size of each disk, e.g. 1G, 512M, 4096 (bytes) [default: 1G]
    #[arg(long)]
    pub disk_size: Option<String>,
    /// Memory for the hot-object cache of verified small objects, e.g. 64M; 0 turns it
    /// off [default: 64M]
    #[arg(long)]
    pub cache_bytes: Option<String>,
    /// Node id: a number (decimal, 0x-prefixed hex or 16 hex digits) or a name (1 to 32
    /// printable ASCII characters, no spaces), whose wire id is the first 8 bytes of
    /// its MD5 [default: generated once and kept in the data directory]
    #[arg(long, value_name = "ID|NAME")]
    pub node_id: Option<String>,
    /// Heartbeat interval in milliseconds [default: 1000]
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Close a connection silent this long mid-request, aborting its STORE [default: 30000]
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,
    /// Close a connection silent this long between requests [default: 600000]
    #[arg(long)]
    pub idle_timeout_ms: Option<u64>,
    /// Close a connection whose request header (and In structure) has not all arrived
    /// this long after its first byte [default: 10000]
    #[arg(long)]
    pub header_timeout_ms: Option<u64>,
    /// Bytes per second a connection must move mid-request (STORE chunks in, a reply
    /// out), over request-timeout windows, or be closed; e.g. 64K; 0 for no minimum
    /// [default: 64K]
    #[arg(long)]
    pub transfer_rate_min: Option<String>,
    /// Connections served at once, 1 to 65536; when all are taken, the one idle the
    /// longest is closed to admit a new one [default: 1024]
    #[arg(long)]
    pub connections_max: Option<usize>,
    /// Dataplane loops, each a thread pinned to its own core with its own shard of
    /// the index, log space on every disk and connections, 1 to 64. Disks are carved
    /// for this number when first used and keep it [default: the number the disks
    /// were carved for; on blank disks, every core but the management core's, at
    /// least 1]
    #[arg(long)]
    pub dataplane_cores: Option<u16>,
    /// Bearer token for the REST endpoints that change things (disk offline/online);
    /// without one they are disabled
    #[arg(long, env = "DOSD_MGMT_TOKEN", hide_env_values = true)]
    pub mgmt_token: Option<String>,
    /// Serve the REST endpoint over HTTPS only (TLS 1.2 and 1.3) with this certificate
    /// chain, PEM, the node's certificate first; needs --mgmt-tls-key [default: plain
    /// HTTP]
    #[arg(long, value_name = "FILE")]
    pub mgmt_tls_cert: Option<PathBuf>,
    /// The private key of --mgmt-tls-cert: PEM, unencrypted, PKCS#8, PKCS#1 (RSA) or
    /// SEC1 (EC)
    #[arg(long, value_name = "FILE")]
    pub mgmt_tls_key: Option<PathBuf>,
    /// Health: more disks down than this makes the node failing [default: 1]
    #[arg(long)]
    pub disks_down_max: Option<u16>,
    /// Health: a dataplane loop silent this long makes the node failing [default: 2000]
    #[arg(long)]
    pub dataplane_stall_ms: Option<u64>,
    /// Network backend of the dataplane: `kernel` (sockets) or `dpdk` (smoltcp on a
    /// DPDK port, one receive and transmit queue per dataplane loop; needs a build with
    /// --features dpdk) [default: kernel]
    #[arg(long, value_name = "kernel|dpdk")]
    pub net: Option<String>,
    /// With --net dpdk: the EAL arguments, split on whitespace (e.g. "-l 0 --no-huge -m
    /// 1024 --no-pci --vdev=net_tap0,iface=dosd0"); DOSP uses the first port
    #[arg(long, value_name = "EAL ARGS", allow_hyphen_values = true)]
    pub dpdk_args: Option<String>,
    /// With --net dpdk: the node's address on the DPDK port, ADDR/PREFIX
    #[arg(long, value_name = "ADDR/PREFIX")]
    pub dpdk_ip: Option<String>,
    /// With --net dpdk: the default route's next hop on the DPDK port (optional)
    #[arg(long, value_name = "ADDR")]
    pub dpdk_gateway: Option<Ipv4Addr>,
    /// The appliance's EFI System Partition, mounted read-write by its init: enables
    /// POST /v1/update (A/B slots in EFI/Linux) and marking a boot good; without it
    /// updates are disabled
    #[arg(long, value_name = "DIR")]
    pub boot_esp: Option<PathBuf>,
    /// With --boot-esp: the slot this boot runs from, a or b [default: dosd.slot= on
    /// the kernel command line, /proc/cmdline]
    #[arg(long, value_name = "a|b")]
    pub boot_slot: Option<String>,
    /// With --boot-esp: the command that reboots the machine, split on whitespace
    /// (e.g. "reboot"), run for POST /v1/update?reboot=true
    #[arg(long, value_name = "COMMAND")]
    pub reboot_command: Option<String>,
    /// Cluster key file (`ID HEXSECRET` a line, at least 32 secret bytes, `#`
    /// comments): every DOSP request must then be signed with one of its keys, and the
    /// node signs its heartbeats and announcements with the first [default: none: any
    /// client that reaches the node may store and delete]
    #[arg(long, value_name = "FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// Serve signed URLs (`dosp url`) over HTTP/1.1 on this address: GET and HEAD of
    /// objects, with Range (dosp/HTTP.md); needs --cluster-key-file; with --net dpdk
    /// on the DPDK port's address (or 0.0.0.0) [default: off]
    #[arg(long, value_name = "ADDR:PORT")]
    pub http_listen: Option<SocketAddr>,
    /// Also accept requests signed with the specification's double MD5 (weaker than the
    /// default HMAC-SHA256)
    #[arg(long)]
    pub auth_allow_md5: bool,
    /// How far a signed request's timestamp may be from the node's clock, either way,
    /// in seconds [default: 300]
    #[arg(long, value_name = "SECS")]
    pub auth_window_secs: Option<u64>,
    /// STOREs and DELETEs remembered against replay (about 64 bytes each, allocated at
    /// start-up); when it is full of requests still inside the window, new ones get
    /// AUTH_FAILED [default: 262144]
    #[arg(long, value_name = "N")]
    pub auth_replay_max: Option<usize>,

    // Test-only flags, hidden from --help and absent from the config file on purpose: a
    // production node must never carry them. dosd warns loudly at start-up when one is
    // set. Without them SIGUSR1 and SIGUSR2 are not handled at all.
    /// TEST ONLY: wrap disk N in a fault injector; SIGUSR1 then makes every I/O on it
    /// fail (the disk goes down, as on a real device error).
    #[arg(long, hide = true, value_name = "N")]
    pub fault_inject_disk: Option<u16>,
    /// TEST ONLY: the --fault-inject-disk disk completes every I/O this much later (a
    /// slow disk).
    #[arg(long, hide = true, value_name = "MS", requires = "fault_inject_disk")]
    pub test_disk_latency_ms: Option<u64>,
    /// TEST ONLY: SIGUSR2 makes the dataplane loop block once for --test-stall-ms.
    #[arg(long, hide = true)]
    pub test_hooks: bool,
    /// TEST ONLY: how long the --test-hooks stall lasts [default: 3000]
    #[arg(long, hide = true, requires = "test_hooks")]
    pub test_stall_ms: Option<u64>,
    /// TEST ONLY: which dataplane loop (thread dataplane-N) the --test-hooks stall
    /// blocks [default: 0]
    #[arg(long, hide = true, value_name = "N", requires = "test_hooks")]
    pub test_stall_loop: Option<usize>,
}

/// The same keys, from the TOML file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub mgmt_listen: Option<SocketAddr>,
    pub multicast: Option<SocketAddrV4>,
    pub multicast_if: Option<Ipv4Addr>,
    pub disks: Option<u16>,
    pub disk: Option<Vec<String>>,
    pub disk_size: Option<toml::Value>,
    pub cache_bytes: Option<toml::Value>,
    pub node_id: Option<toml::Value>,
    pub heartbeat_ms: Option<u64>,
    pub request_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub header_timeout_ms: Option<u64>,
    pub transfer_rate_min: Option<toml::Value>,
    pub connections_max: Option<usize>,
    pub dataplane_cores: Option<u16>,
    pub mgmt_token: Option<String>,
    pub mgmt_tls_cert: Option<PathBuf>,
    pub mgmt_tls_key: Option<PathBuf>,
    pub disks_down_max: Option<u16>,
    pub dataplane_stall_ms: Option<u64>,
    pub net: Option<String>,
    pub dpdk_args: Option<String>,
    pub dpdk_ip: Option<String>,
    pub dpdk_gateway: Option<Ipv4Addr>,
    pub boot_esp: Option<PathBuf>,
    pub boot_slot: Option<String>,
    pub reboot_command: Option<String>,
    pub cluster_key_file: Option<PathBuf>,
    pub http_listen: Option<SocketAddr>,
    pub auth_allow_md5: Option<bool>,
    pub auth_window_secs: Option<u64>,
    pub auth_replay_max: Option<usize>,
}

/// The dataplane's network backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Net {
    /// The kernel's sockets (epoll).
    Kernel,
    /// smoltcp on a DPDK port.
    Dpdk(DpdkNet),
}

/// `--net dpdk`: how the DPDK port is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpdkNet {
    /// EAL arguments (without a program name).
    pub eal_args: Vec<String>,
    /// The node's address on the port, and its prefix length.
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
}

/// Whether this binary was built with the `dpdk` feature.
pub const BUILT_WITH_DPDK: bool = cfg!(feature = "dpdk");

/// Parses `ADDR/PREFIX` (IPv4, prefix 1 to 32).
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (a, p) = s
        .trim()
        .split_once('/')
        .ok_or_else(|| "expected ADDR/PREFIX, e.g. 10.0.0.2/24".to_string())?;
    let addr: Ipv4Addr = a
        .parse()
        .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| format!("prefix {p:?} must be 1 to 32"))?;
    if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() {
        return Err("must be a unicast address".into());
    }
    Ok((addr, prefix))
}

/// One explicitly named disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSpec {
    /// A controller for the user-space NVMe driver: serial number or PCI address.
    Nvme(String),
    /// A file or block device through the kernel (io_uring).
    File(PathBuf),
}

impl DiskSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("nvme", rest)) if !rest.is_empty() => Ok(DiskSpec::Nvme(rest.to_string())),
            Some(("file", rest)) if !rest.is_empty() => Ok(DiskSpec::File(PathBuf::from(rest))),
            _ => Err("expected nvme:SERIAL, nvme:PCI_ADDRESS or file:PATH".into()),
        }
    }
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub mgmt_listen: SocketAddr,
    pub multicast: SocketAddrV4,
    pub multicast_if: Ipv4Addr,
    pub disks: u16,
    /// Explicit disks (`--disk`); empty means the data directory's images.
    pub disk_specs: Vec<DiskSpec>,
    pub disk_size: u64,
    /// Bytes of the hot-object cache (0: off).
    pub cache_bytes: u64,
    pub node_id: Option<NodeId>,
    pub heartbeat_ms: u64,
    pub request_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub header_timeout_ms: u64,
    /// Bytes per second; 0: no minimum.
    pub transfer_rate_min: u64,
    pub connections_max: usize,
    /// Dataplane loops asked for; `None`: as the disks are carved, or the default.
    pub dataplane_cores: Option<u16>,
    /// `None`: the REST endpoints that change things are disabled.
    pub mgmt_token: Option<String>,
    /// The REST endpoint's certificate and key (both given, or neither); `None`: plain
    /// HTTP. Read when the management core starts.
    pub mgmt_tls: Option<mgmt::tls::TlsFiles>,
    pub disks_down_max: u16,
    pub dataplane_stall_ms: u64,
    /// The dataplane's network backend.
    pub net: Net,
    /// The appliance's ESP (`--boot-esp`); `None`: updates disabled.
    pub boot_esp: Option<PathBuf>,
    /// The running slot if given (`--boot-slot`); else the kernel command line's.
    pub boot_slot: Option<mgmt::update::Slot>,
    /// Program and arguments that reboot the machine.
    pub reboot_command: Option<Vec<String>>,
    /// The cluster key file; `None`: requests are not authenticated.
    pub cluster_key_file: Option<PathBuf>,
    /// Where signed URLs are served over HTTP; `None`: not at all.
    pub http_listen: Option<SocketAddr>,
    /// Accept double-MD5 certificates too.
    pub auth_allow_md5: bool,
    /// Clock window of signed requests, in seconds (at least 1).
    pub auth_window_secs: u64,
    /// Replay memory, in requests (at least 1).
    pub auth_replay_max: usize,
    /// Test only (flags, never the file): the disk wrapped in a fault injector.
    pub fault_inject_disk: Option<u16>,
    /// Test only: latency the fault injector adds to that disk's every I/O.
    pub test_disk_latency_ms: Option<u64>,
    /// Test only: how long SIGUSR2 stalls the dataplane loop; `None` without
    /// `--test-hooks`.
    pub test_stall_ms: Option<u64>,
    /// Test only: which loop the stall blocks (0 unless `--test-stall-loop`).
    pub test_stall_loop: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {key} {value:?}: {why}")]
    Invalid {
        key: &'static str,
        value: String,
        why: String,
    },
}

/// Parses a size: a number of bytes with an optional K/M/G/T suffix (powers of 1024;
/// `KiB`, `MB`, `G` all accepted).
/// Default clock window of signed requests (dosp/PROTOCOL.md §7).
pub const AUTH_WINDOW_SECS_DEFAULT: u64 = 300;
/// Default replay memory: see `dataplane::server::auth::REPLAY_MAX_DEFAULT`.
pub const AUTH_REPLAY_MAX_DEFAULT: usize = dataplane::server::auth::REPLAY_MAX_DEFAULT;
/// Largest replay memory accepted (about 1 GiB): a typo should not eat the machine.
pub const AUTH_REPLAY_MAX_MAX: usize = 16 << 20;
/// The hot-object cache's default size: small against a storage node's RAM, large
/// enough to hold 16,000 objects of 4 KiB.
pub const CACHE_BYTES_DEFAULT: u64 = 64 << 20;
/// Largest cache accepted: a typo of a unit should not eat the machine.
pub const CACHE_BYTES_MAX: u64 = 64 << 30;

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a number of bytes, optionally with K, M, G or T".to_string())?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => return Err(format!("unknown unit {other:?} (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| "size overflows 64 bits".to_string())
}

/// Who the node is: the 64-bit id it has on the wire and, if its operator named it,
/// its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId {
    pub id: u64,
    pub name: Option<NodeName>,
}

/// Parses a node id as `--node-id`, `node_id` and the data directory's `node-id` file
/// spell it: `0x` and hex digits, exactly 16 hex digits, or decimal digits is a number;
/// anything else is a name, whose id is [`NodeName::node_id`] (the first 8 bytes of its
/// MD5, little-endian).
pub fn parse_node_id(s: &str) -> Result<NodeId, String> {
    let t = s.trim();
    let number = if let Some(h) = t.strip_prefix("0x") {
        Some(u64::from_str_radix(h, 16))
    } else if t.len() == 16 && t.chars().all(|c| c.is_ascii_hexdigit()) {
        Some(u64::from_str_radix(t, 16))
    } else if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()) {
        Some(t.parse())
    } else {
        None
    };
    match number {
        Some(Ok(id)) => Ok(NodeId { id, name: None }),
        Some(Err(_)) => {
            Err("a number must be 64-bit: decimal, 0x-prefixed hex or 16 hex digits".to_string())
        }
        None => NodeName::new(t)
            .map(|name| NodeId {
                id: name.node_id(),
                name: Some(name),
            })
            .map_err(|e| format!("expected a 64-bit number or a name: {e}")),
    }
}

fn value_str(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Config {
    pub fn resolve(flags: Flags) -> Result<Config, ConfigError> {
        let file = match &flags.config {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
        };
        let invalid = |key, value: &str, why: String| ConfigError::Invalid {
            key,
            value: value.to_string(),
            why,
        };
        let disk_size = match flags.disk_size.or(file.disk_size.as_ref().map(value_str)) {
            None => DISK_SIZE_DEFAULT,
            Some(s) => parse_size(&s).map_err(|why| invalid("disk size", &s, why))?,
        };
        if disk_size < DISK_SIZE_MIN {
            return Err(invalid(
                "disk size",
                &disk_size.to_string(),
                format!("must be at least {DISK_SIZE_MIN} bytes (16M)"),
            ));
        }
        let cache_bytes = match flags
            .cache_bytes
            .or(file.cache_bytes.as_ref().map(value_str))
        {
            None => CACHE_BYTES_DEFAULT,
            Some(s) => parse_size(&s).map_err(|why| invalid("cache size", &s, why))?,
        };
        if cache_bytes > CACHE_BYTES_MAX {
            return Err(invalid(
                "cache size",
                &cache_bytes.to_string(),
                format!("at most {CACHE_BYTES_MAX} bytes (64G)"),
            ));
        }
        let node_id = match flags.node_id.or(file.node_id.as_ref().map(value_str)) {
            None => None,
            Some(s) => Some(parse_node_id(&s).map_err(|why| invalid("node id", &s, why))?),
        };
        let spec_strings = if flags.disk.is_empty() {
            file.disk.clone().unwrap_or_default()
        } else {
            flags.disk.clone()
        };
        let mut disk_specs = Vec::with_capacity(spec_strings.len());
        for s in &spec_strings {
            disk_specs.push(DiskSpec::parse(s).map_err(|why| invalid("disk", s, why))?);
        }
        if !disk_specs.is_empty() && flags.disks.or(file.disks).is_some() {
            return Err(invalid(
                "disks",
                &flags.disks.or(file.disks).unwrap_or(0).to_string(),
                "give either a number of data-directory disks or an explicit --disk list, not both"
                    .into(),
            ));
        }
        let disks = if disk_specs.is_empty() {
            flags.disks.or(file.disks).unwrap_or(DISKS_DEFAULT)
        } else {
            u16::try_from(disk_specs.len()).unwrap_or(u16::MAX)
        };
        if disks == 0 || usize::from(disks) > dosp::wire::DISKS_MAX {
            return Err(invalid(
                "disks",
                &disks.to_string(),
                format!("must be 1 to {}", dosp::wire::DISKS_MAX),
            ));
        }
        let heartbeat_ms = flags
            .heartbeat_ms
            .or(file.heartbeat_ms)
            .unwrap_or(HEARTBEAT_MS_DEFAULT);
        if heartbeat_ms == 0 {
            return Err(invalid(
                "heartbeat interval",
                "0",
                "must be at least 1 ms".into(),
            ));
        }
        let mgmt_token = flags.mgmt_token.or(file.mgmt_token);
        if mgmt_token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(invalid(
                "mgmt token",
                "",
                "must not be empty (leave it out to disable the mutating endpoints)".into(),
            ));
        }
        let mgmt_tls = match (
            flags.mgmt_tls_cert.or(file.mgmt_tls_cert),
            flags.mgmt_tls_key.or(file.mgmt_tls_key),
        ) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(mgmt::tls::TlsFiles { cert, key }),
            (Some(cert), None) => {
                return Err(invalid(
                    "mgmt_tls_cert",
                    &cert.display().to_string(),
                    "HTTPS needs the key too: set mgmt_tls_key (--mgmt-tls-key)".into(),
                ))
            }
            (None, Some(key)) => {
                return Err(invalid(
                    "mgmt_tls_key",
                    &key.display().to_string(),
                    "HTTPS needs the certificate too: set mgmt_tls_cert (--mgmt-tls-cert)".into(),
                ))
            }
        };
        let dataplane_stall_ms = flags
            .dataplane_stall_ms
            .or(file.dataplane_stall_ms)
            .unwrap_or(DATAPLANE_STALL_MS_DEFAULT);
        if dataplane_stall_ms < DATAPLANE_STALL_MS_MIN {
            return Err(invalid(
                "dataplane stall threshold",
                &dataplane_stall_ms.to_string(),
                format!("must be at least {DATAPLANE_STALL_MS_MIN} ms (the loop sleeps up to 100 ms when idle)"),
            ));
        }
        if let Some(n) = flags.fault_inject_disk {
            if n >= disks {
                return Err(invalid(
                    "fault-inject disk",
                    &n.to_string(),
                    format!("the node has disks 0 to {}", disks - 1),
                ));
            }
        }
        let header_timeout_ms = flags
            .header_timeout_ms
            .or(file.header_timeout_ms)
            .unwrap_or(HEADER_TIMEOUT_MS_DEFAULT);
        if header_timeout_ms == 0 {
            return Err(invalid(
                "header_timeout_ms",
                "0",
                "must be at least 1 ms".into(),
            ));
        }
        let transfer_rate_min = match flags
            .transfer_rate_min
            .or(file.transfer_rate_min.as_ref().map(value_str))
        {
            None => TRANSFER_RATE_MIN_DEFAULT,
            Some(s) => parse_size(&s).map_err(|why| invalid("transfer_rate_min", &s, why))?,
        };
        let connections_max = flags
            .connections_max
            .or(file.connections_max)
            .unwrap_or(CONNECTIONS_MAX_DEFAULT);
        if !(1..=CONNECTIONS_MAX_LIMIT).contains(&connections_max) {
            return Err(invalid(
                "connections_max",
                &connections_max.to_string(),
                format!("must be 1 to {CONNECTIONS_MAX_LIMIT}"),
            ));
        }
        let dataplane_cores = flags.dataplane_cores.or(file.dataplane_cores);
        if let Some(n) = dataplane_cores {
            if !(1..=DATAPLANE_CORES_MAX).contains(&n) {
                return Err(invalid(
                    "dataplane_cores",
                    &n.to_string(),
                    format!("must be 1 to {DATAPLANE_CORES_MAX}"),
                ));
            }
        }
        let listen_asked = flags.listen.or(file.listen);
        let net_name = flags.net.or(file.net).unwrap_or_else(|| "kernel".into());
        let net = match net_name.trim() {
            "kernel" => Net::Kernel,
            "dpdk" => {
                if !BUILT_WITH_DPDK {
                    return Err(invalid(
                        "net",
                        "dpdk",
                        "this dosd was built without DPDK (cargo build --features dpdk)".into(),
                    ));
                }
                let args = flags.dpdk_args.or(file.dpdk_args).ok_or_else(|| {
                    invalid(
                        "net",
                        "dpdk",
                        "--net dpdk needs --dpdk-args (dpdk_args), the EAL arguments".into(),
                    )
                })?;
                let eal_args: Vec<String> = args.split_whitespace().map(String::from).collect();
                if eal_args.is_empty() {
                    return Err(invalid(
                        "dpdk_args",
                        &args,
                        "must not be empty (the EAL arguments)".into(),
                    ));
                }
                let ip = flags.dpdk_ip.or(file.dpdk_ip).ok_or_else(|| {
                    invalid(
                        "net",
                        "dpdk",
                        "--net dpdk needs --dpdk-ip (dpdk_ip), ADDR/PREFIX on the DPDK port".into(),
                    )
                })?;
                let (addr, prefix_len) =
                    parse_cidr(&ip).map_err(|why| invalid("dpdk_ip", &ip, why))?;
                Net::Dpdk(DpdkNet {
                    eal_args,
                    addr,
                    prefix_len,
                    gateway: flags.dpdk_gateway.or(file.dpdk_gateway),
                })
            }
            other => return Err(invalid("net", other, "expected kernel or dpdk".into())),
        };
        // With --net dpdk, --listen gives the DOSP port on the DPDK address: its
        // address must be that address or 0.0.0.0 (meaning it); without --listen,
        // the DPDK address on the default port.
        let listen = match (&net, listen_asked) {
            (Net::Kernel, l) => {
                l.unwrap_or_else(|| LISTEN_DEFAULT.parse().expect("constant address"))
            }
            (Net::Dpdk(d), None) => SocketAddr::from((d.addr, LISTEN_PORT_DEFAULT)),
            (Net::Dpdk(d), Some(l)) => {
                let ok_ip = match l.ip() {
                    std::net::IpAddr::V4(ip) => ip == d.addr || ip.is_unspecified(),
                    std::net::IpAddr::V6(_) => false,
                };
                if !ok_ip {
                    return Err(invalid(
                        "listen",
                        &l.to_string(),
                        format!(
                            "with --net dpdk the DOSP address is on the DPDK port: use {}:PORT or 0.0.0.0:PORT",
                            d.addr
                        ),
                    ));
                }
                if l.port() == 0 {
                    return Err(invalid(
                        "listen",
                        &l.to_string(),
                        "with --net dpdk the DOSP port must be given (not 0)".into(),
                    ));
                }
                SocketAddr::from((d.addr, l.port()))
            }
        };
        // With --net dpdk the cluster group is spoken on the DPDK port: the multicast
        // interface is its address (the default), which the kernel does not have.
        let multicast_if_asked = flags.multicast_if.or(file.multicast_if);
        let multicast_if = match (&net, multicast_if_asked) {
            (Net::Kernel, m) => m.unwrap_or(MULTICAST_IF_DEFAULT),
            (Net::Dpdk(d), None) => d.addr,
            (Net::Dpdk(d), Some(m)) if m == d.addr || m.is_unspecified() => d.addr,
            (Net::Dpdk(d), Some(m)) => {
                return Err(invalid(
                    "multicast_if",
                    &m.to_string(),
                    format!(
                        "with --net dpdk heartbeats, announcements and multicast LOCATE use the DPDK port: use {} (or leave it out)",
                        d.addr
                    ),
                ))
            }
        };
        let boot_slot = match flags.boot_slot.or(file.boot_slot) {
            None => None,
            Some(s) => Some(
                mgmt::update::Slot::parse(&s)
                    .ok_or_else(|| invalid("boot slot", &s, "must be a or b".into()))?,
            ),
        };
        let reboot_command = match flags.reboot_command.or(file.reboot_command) {
            None => None,
            Some(c) => {
                let words: Vec<String> = c.split_whitespace().map(str::to_string).collect();
                if words.is_empty() {
                    return Err(invalid(
                        "reboot command",
                        &c,
                        "must not be empty (leave it out)".into(),
                    ));
                }
                Some(words)
            }
        };
        let test_stall_ms = flags
            .test_hooks
            .then(|| flags.test_stall_ms.unwrap_or(TEST_STALL_MS_DEFAULT));
        let auth_window_secs = flags
            .auth_window_secs
            .or(file.auth_window_secs)
            .unwrap_or(AUTH_WINDOW_SECS_DEFAULT);
        if auth_window_secs == 0 {
            return Err(invalid(
                "auth_window_secs",
                "0",
                "must be at least 1".into(),
            ));
        }
        let auth_replay_max = flags
            .auth_replay_max
            .or(file.auth_replay_max)
            .unwrap_or(AUTH_REPLAY_MAX_DEFAULT);
        if !(1..=AUTH_REPLAY_MAX_MAX).contains(&auth_replay_max) {
            return Err(invalid(
                "auth_replay_max",
                &auth_replay_max.to_string(),
                format!("must be 1 to {AUTH_REPLAY_MAX_MAX}"),
            ));
        }
        let cluster_key_file = flags.cluster_key_file.or(file.cluster_key_file);
        let http_listen = flags.http_listen.or(file.http_listen);
        if let Some(addr) = http_listen {
            if cluster_key_file.is_none() {
                return Err(invalid(
                    "http_listen",
                    &addr.to_string(),
                    "signed URLs need the cluster key: set cluster_key_file (--cluster-key-file)"
                        .into(),
                ));
            }
        }
        // With --net dpdk, as for --listen: the HTTP address is on the DPDK port (its
        // address or 0.0.0.0, meaning it), on a port of its own.
        let http_listen = match (&net, http_listen) {
            (Net::Dpdk(d), Some(h)) => {
                let ok_ip = match h.ip() {
                    std::net::IpAddr::V4(ip) => ip == d.addr || ip.is_unspecified(),
                    std::net::IpAddr::V6(_) => false,
                };
                if !ok_ip {
                    return Err(invalid(
                        "http_listen",
                        &h.to_string(),
                        format!(
                            "with --net dpdk signed URLs are served on the DPDK port: use {}:PORT or 0.0.0.0:PORT",
                            d.addr
                        ),
                    ));
                }
                if h.port() == 0 {
                    return Err(invalid(
                        "http_listen",
                        &h.to_string(),
                        "with --net dpdk the HTTP port must be given (not 0)".into(),
                    ));
                }
                if h.port() == listen.port() {
                    return Err(invalid(
                        "http_listen",
                        &h.to_string(),
                        format!(
                            "with --net dpdk the HTTP port must differ from the DOSP port ({})",
                            listen.port()
                        ),
                    ));
                }
                Some(SocketAddr::from((d.addr, h.port())))
            }
            (_, h) => h,
        };
        Ok(Config {
            cluster_key_file,
            http_listen,
            auth_allow_md5: flags.auth_allow_md5 || file.auth_allow_md5.unwrap_or(false),
            auth_window_secs,
            auth_replay_max,
            boot_esp: flags.boot_esp.or(file.boot_esp),
            boot_slot,
            reboot_command,
            fault_inject_disk: flags.fault_inject_disk,
            test_disk_latency_ms: flags.test_disk_latency_ms,
            test_stall_ms,
            test_stall_loop: flags.test_stall_loop.unwrap_or(0),
            mgmt_token,
            mgmt_tls,
            disks_down_max: flags
                .disks_down_max
                .or(file.disks_down_max)
                .unwrap_or(DISKS_DOWN_MAX_DEFAULT),
            dataplane_stall_ms,
            data_dir: flags
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("dosd-data")),
            listen,
            net,
            mgmt_listen: flags
                .mgmt_listen
                .or(file.mgmt_listen)
                .unwrap_or_else(|| MGMT_LISTEN_DEFAULT.parse().expect("constant address")),
            multicast: flags
                .multicast
                .or(file.multicast)
                .unwrap_or_else(|| MULTICAST_DEFAULT.parse().expect("constant address")),
            multicast_if,
            disks,
            disk_specs,
            disk_size,
            cache_bytes,
            node_id,
            heartbeat_ms,
            request_timeout_ms: flags
                .request_timeout_ms
                .or(file.request_timeout_ms)
                .unwrap_or(REQUEST_TIMEOUT_MS_DEFAULT)
                .max(1),
            idle_timeout_ms: flags
                .idle_timeout_ms
                .or(file.idle_timeout_ms)
                .unwrap_or(IDLE_TIMEOUT_MS_DEFAULT)
                .max(1),
            header_timeout_ms,
            transfer_rate_min,
            connections_max,
            dataplane_cores,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn node_ids_are_numbers_or_names() {
        let number = |id| Ok(NodeId { id, name: None });
        assert_eq!(parse_node_id("0x10"), number(16));
        assert_eq!(parse_node_id("00000000000000ff"), number(255));
        assert_eq!(parse_node_id("42"), number(42));
        assert_eq!(parse_node_id(" 42\n"), number(42));
        let named = parse_node_id("node-a").unwrap();
        assert_eq!(named.name.as_ref().map(NodeName::as_str), Some("node-a"));
        assert_eq!(
            named.id, 0x5ce8_3ab3_5b8a_ec6c,
            "first 8 bytes of MD5, little-endian"
        );
        // Not all hex, or not 16 long: a name.
        assert_eq!(
            parse_node_id("deadbeef").unwrap().name.unwrap().as_str(),
            "deadbeef"
        );
        assert_eq!(
            parse_node_id(&"n".repeat(32))
                .unwrap()
                .name
                .unwrap()
                .as_str()
                .len(),
            32
        );
        for bad in [
            "",
            "0xZZ",
            "99999999999999999999",
            "node a",
            "caf\u{e9}",
            &"n".repeat(33),
        ] {
            assert!(parse_node_id(bad).is_err(), "{bad:?}");
        }
        let e = parse_node_id(&"n".repeat(33)).unwrap_err();
        assert!(e.contains("at most 32"), "{e}");

        let parse = |args: &[&str]| Flags::try_parse_from([&["dosd"], args].concat());
        let c = Config::resolve(parse(&["--node-id", "node-a"]).unwrap()).unwrap();
        assert_eq!(c.node_id, Some(named.clone()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dosd.toml");
        std::fs::write(&path, "node_id = \"node-a\"\n").unwrap();
        let c = Config::resolve(Flags {
            config: Some(path.clone()),
            ..Flags::default()
        })
        .unwrap();
        assert_eq!(c.node_id, Some(named));
        std::fs::write(&path, "node_id = 42\n").unwrap();
        let c = Config::resolve(Flags {
            config: Some(path),
            ..Flags::default()
        })
        .unwrap();
        assert_eq!(c.node_id.map(|n| n.id), Some(42));
    }

    #[test]
    fn defaults_and_file_and_flags() {
        let c = Config::resolve(Flags::default()).unwrap();
        assert_eq!(c.listen.to_string(), LISTEN_DEFAULT);
        assert_eq!(c.disks, 4);
        assert_eq!(c.multicast_if, Ipv4Addr::LOCALHOST);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dosd.toml");
        std::fs::write(
            &path,
            "disks = 2\ndisk_size = \"64M\"\nlisten = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        let flags = Flags {
            config: Some(path.clone()),
            disks: Some(3),
            ..Flags::default()
        };
        let c = Config::resolve(flags).unwrap();
        assert_eq!(c.disks, 3, "flag wins over file");
        assert_eq!(c.disk_size, 64 << 20);
        assert_eq!(c.listen.port(), 9000);

        std::fs::write(&path, "disks = 2\nbogus = 1\n").unwrap();
        let err = Config::resolve(Flags {
            config: Some(path),
            ..Flags::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");

        let err = Config::resolve(Flags {
            disk_size: Some("1M".into()),
            ..Flags::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("at least"), "{err}");
    }

    #[test]
    fn management_keys() {
        let c = Config::resolve(Flags::default()).unwrap();
        assert_eq!(
            c.mgmt_token, None,
            "mutations are off unless a token is given"
        );
        assert_eq!(c.disks_down_max, DISKS_DOWN_MAX_DEFAULT);
        assert_eq!(c.dataplane_stall_ms, DATAPLANE_STALL_MS_DEFAULT);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dosd.toml");
        std::fs::write(
            &path,
            "mgmt_token = \"file-token\"\ndisks_down_max = 3\ndataplane_stall_ms = 5000\n",
        )
        .unwrap();
        let c = Config::resolve(Flags {
            config: Some(path.clone()),
            mgmt_token: Some("flag-token".into()),
            ..Flags::default()
        })
        .unwrap();
        assert_eq!(c.mgmt_token.as_deref(), Some("flag-token"), "flag wins");
        assert_eq!((c.disks_down_max, c.dataplane_stall_ms), (3, 5000));

        for bad in [
            Flags {
                mgmt_token: Some(" ".into()),
                ..Flags::default()
            },
            Flags {
                dataplane_stall_ms: Some(100),
                ..Flags::default()
            },
        ] {
            assert!(Config::resolve(bad).is_err());
        }
    }

    #[test]
    fn mgmt_tls_needs_both_files() {
        let c = Config::resolve(Flags::default()).unwrap();
        assert_eq!(c.mgmt_tls, None, "plain HTTP unless a certificate is given");

        let parse = |args: &[&str]| Flags::try_parse_from([&["dosd"], args].concat());
        let c = Config::resolve(
            parse(&[
                "--mgmt-tls-cert",
                "/etc/dosd/cert.pem",
                "--mgmt-tls-key",
                "k.pem",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            c.mgmt_tls,
            Some(mgmt::tls::TlsFiles {
                cert: "/etc/dosd/cert.pem".into(),
                key: "k.pem".into(),
            })
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dosd.toml");
        std::fs::write(
            &path,
            "mgmt_tls_cert = \"file-cert.pem\"\nmgmt_tls_key = \"file-key.pem\"\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let c = Config::resolve(parse(&["--config", file]).unwrap()).unwrap();
        let tls = c.mgmt_tls.unwrap();
        assert_eq!(
            (tls.cert, tls.key),
            ("file-cert.pem".into(), "file-key.pem".into())
        );
        // A flag wins over the file's key of the same name, each on its own.
        let c = Config::resolve(parse(&["--config", file, "--mgmt-tls-key", "flag.pem"]).unwrap());
        let tls = c.unwrap().mgmt_tls.unwrap();
        assert_eq!(
            (tls.cert, tls.key),
            ("file-cert.pem".into(), "flag.pem".into())
        );

        let e = Config::resolve(parse(&["--mgmt-tls-cert", "c.pem"]).unwrap()).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("mgmt_tls_cert") && e.contains("--mgmt-tls-key"),
            "{e}"
        );
        let e = Config::resolve(parse(&["--mgmt-tls-key", "k.pem"]).unwrap()).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("mgmt_tls_key") && e.contains("--mgmt-tls-cert"),
            "{e}"
        );
        std::fs::write(&path, "mgmt_tls_key = \"only-key.pem\"\n").unwrap();
        let e = Config::resolve(parse(&["--config", file]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("only-key.pem"), "{e}");
    }

    #[test]
    fn boot_keys() {
        let c = Config::resolve(Flags::default()).unwrap();
        assert_eq!(
            (c.boot_esp, c.boot_slot, c.reboot_command),
            (None, None, None)
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dosd.toml");
        std::fs::write(
            &path,
            "boot_esp = \"/boot/efi\"\nboot_slot = \"b\"\nreboot_command = \"/sbin/reboot -f\"\n",
        )
        .unwrap();
        let c = Config::resolve(Flags {
            config: Some(path),
            ..Flags::default()
        })
        .unwrap();
        assert_eq!(c.boot_esp, Some(PathBuf::from("/boot/efi")));
        assert_eq!(c.boot_slot, Some(mgmt::update::Slot::B));
        assert_eq!(
            c.reboot_command,
            Some(vec!["/sbin/reboot".to_string(), "-f".to_string()])
        );
        for bad in [
            Flags {
                boot_slot: Some("c".into()),
                ..Flags::default()
            },
            Flags {
                reboot_command: Some("  ".into()),
                ..Flags::default()
            },
        ] {
            assert!(Config::resolve(bad).is_err());
        }
    }

    #[test]
    fn connections_max_from_flag_or_file_and_checked() {
        let c = Config::resolve(Flags::default()).unwrap();
        assert_eq!(c.connections_max, CONNECTIONS_MAX_DEFAULT);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dosd.toml");
        std::fs::write(&path, "connections_max = 300\n").unwrap();
        let from_file = Flags {
            config: Some(path.clone()),
            ..Flags::default()
        };
        assert_eq!(Config::resolve(from_file).unwrap().connections_max, 300);
        let parse = |args: &[&str]| Flags::try_parse_from([&["dosd"], args].concat());
        let flag = parse(&["--config", path.to_str().unwrap(), "--connections-max", "7"]);
        assert_eq!(Config::resolve(flag.unwrap()).unwrap().connections_max, 7);

        for bad in ["0", "65537"] {
            let e = Config::resolve(parse(&["--connections-max", bad]).unwrap()).unwrap_err();
            assert!(e.to_string().contains("1 to 65536"), "{bad}: {e}");
        }
        assert!(parse(&["--connections-max", "-1"]).is_err());
    }

    #[test]
    fn header_timeout_and_transfer_rate() {
        let c = Config::resolve(Flags::default()).unwrap();
        assert_eq!(c.header_timeout_ms, HEADER_TIMEOUT_MS_DEFAULT);
        assert_eq!(c.transfer_rate_min, 64 << 10);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dosd.toml");
        std::fs::write(
            &path,
            "header_timeout_ms = 2500\ntransfer_rate_min = \"1M\"\n",
        )
        .unwrap();
        let parse = |args: &[&str]| Flags::try_parse_from([&["dosd"], args].concat());
        let c = Config::resolve(parse(&["--config", path.to_str().unwrap()]).unwrap()).unwrap();
        assert_eq!((c.header_timeout_ms, c.transfer_rate_min), (2500, 1 << 20));
        std::fs::write(&path, "transfer_rate_min = 0\n").unwrap();
        let c = Config::resolve(parse(&["--config", path.to_str().unwrap()]).unwrap()).unwrap();
        assert_eq!(c.transfer_rate_min, 0, "0 turns the minimum off");
        let c = Config::resolve(parse(&["--transfer-rate-min", "4096"]).unwrap()).unwrap();
        assert_eq!(c.transfer_rate_min, 4096);

        let e = Config::resolve(parse(&["--header-timeout-ms", "0"]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("header_timeout_ms"), "{e}");
        let e = Config::resolve(parse(&["--transfer-rate-min", "fast"]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("transfer_rate_min"), "{e}");
    }

    #[test]
    fn auth_keys_from_flags_and_file() {
        let c = Config::resolve(Flags::default()).unwrap();
        assert_eq!(c.cluster_key_file, None);
        assert!(!c.auth_allow_md5);
        assert_eq!(c.auth_window_secs, AUTH_WINDOW_SECS_DEFAULT);
        assert_eq!(c.auth_replay_max, AUTH_REPLAY_MAX_DEFAULT);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dosd.toml");
        std::fs::write(
            &path,
            "cluster_key_file = \"/etc/dosd/keys\"\nauth_allow_md5 = true\n\
             auth_window_secs = 30\nauth_replay_max = 1000\n",
        )
        .unwrap();
        let parse = |args: &[&str]| Flags::try_parse_from([&["dosd"], args].concat());
        let c = Config::resolve(parse(&["--config", path.to_str().unwrap()]).unwrap()).unwrap();
        assert_eq!(c.cluster_key_file, Some(PathBuf::from("/etc/dosd/keys")));
        assert!(c.auth_allow_md5);
        assert_eq!((c.auth_window_secs, c.auth_replay_max), (30, 1000));
        let c = Config::resolve(
            parse(&[
                "--config",
                path.to_str().unwrap(),
                "--cluster-key-file",
                "k",
                "--auth-window-secs",
                "60",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(c.cluster_key_file, Some(PathBuf::from("k")));
        assert_eq!(c.auth_window_secs, 60);

        let e = Config::resolve(parse(&["--auth-window-secs", "0"]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("auth_window_secs"), "{e}");
        let e = Config::resolve(parse(&["--auth-replay-max", "0"]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("auth_replay_max"), "{e}");
    }

    #[test]
    fn test_hooks_are_hidden_and_checked() {
        use clap::CommandFactory;
        let help = Flags::command().render_long_help().to_string();
        for hidden in ["fault-inject", "test-hooks", "test-stall"] {
            assert!(!help.contains(hidden), "--help shows {hidden}");
        }
        let c = Config::resolve(Flags::default()).unwrap();
        assert_eq!((c.fault_inject_disk, c.test_stall_ms), (None, None));

        let parse = |args: &[&str]| Flags::try_parse_from([&["dosd"], args].concat());
        let c = Config::resolve(
            parse(&["--disks", "2", "--fault-inject-disk", "1", "--test-hooks"]).unwrap(),
        )
        .unwrap();
        assert_eq!(c.fault_inject_disk, Some(1));
        assert_eq!(c.test_stall_ms, Some(TEST_STALL_MS_DEFAULT));
        let c = Config::resolve(parse(&["--test-hooks", "--test-stall-ms", "700"]).unwrap());
        let c = c.unwrap();
        assert_eq!((c.test_stall_ms, c.test_stall_loop), (Some(700), 0));
        let c = Config::resolve(parse(&["--test-hooks", "--test-stall-loop", "1"]).unwrap());
        assert_eq!(c.unwrap().test_stall_loop, 1);
        assert!(
            parse(&["--test-stall-loop", "1"]).is_err(),
            "a stalled loop without --test-hooks is a mistake"
        );
        let err = Config::resolve(parse(&["--disks", "2", "--fault-inject-disk", "2"]).unwrap());
        assert!(err.unwrap_err().to_string().contains("disks 0 to 1"));
        assert!(
            parse(&["--test-stall-ms", "700"]).is_err(),
            "a stall length without --test-hooks is a mistake"
        );
    }

    #[test]
    fn explicit_disks_are_parsed_and_checked() {
        let parse = |args: &[&str]| Flags::try_parse_from([&["dosd"], args].concat());
        let c = Config::resolve(
            parse(&[
                "--disk",
                "nvme:DOSDNVME0",
                "--disk",
                "file:/tmp/d.img",
                "--disk",
                "nvme:0000:01:00.0",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(c.disks, 3);
        assert_eq!(
            c.disk_specs,
            vec![
                DiskSpec::Nvme("DOSDNVME0".into()),
                DiskSpec::File("/tmp/d.img".into()),
                DiskSpec::Nvme("0000:01:00.0".into()),
            ]
        );
        for bad in ["DOSDNVME0", "nvme:", "disk:x", "file:"] {
            let e = Config::resolve(parse(&["--disk", bad]).unwrap()).unwrap_err();
            assert!(e.to_string().contains("nvme:SERIAL"), "{bad}: {e}");
        }
        let e = Config::resolve(parse(&["--disks", "2", "--disk", "nvme:X"]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        let c = Config::resolve(Flags::default()).unwrap();
        assert!(c.disk_specs.is_empty());
    }

    #[test]
    fn net_backend_is_checked() {
        let c = Config::resolve(Flags::default()).unwrap();
        assert_eq!(c.net, Net::Kernel);
        let err = Config::resolve(Flags {
            net: Some("rdma".into()),
            ..Flags::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("kernel or dpdk"), "{err}");
        assert_eq!(
            parse_cidr("10.0.0.2/24"),
            Ok(("10.0.0.2".parse().unwrap(), 24))
        );
        for bad in ["10.0.0.2", "10.0.0.2/33", "10.0.0.2/0", "x/24", "0.0.0.0/8"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        let dpdk = |listen: Option<&str>, cores: Option<u16>, ip: Option<&str>| Flags {
            net: Some("dpdk".into()),
            dpdk_args: Some("-l 0 --no-huge  --vdev=net_tap0".into()),
            dpdk_ip: ip.map(String::from),
            listen: listen.map(|l| l.parse().unwrap()),
            dataplane_cores: cores,
            ..Flags::default()
        };
        if !BUILT_WITH_DPDK {
            let err = Config::resolve(dpdk(None, None, Some("10.0.0.2/24"))).unwrap_err();
            assert!(
                err.to_string()
                    .contains("built without DPDK (cargo build --features dpdk)"),
                "{err}"
            );
            return;
        }
        let c = Config::resolve(dpdk(None, None, Some("10.0.0.2/24"))).unwrap();
        assert_eq!(c.listen.to_string(), "10.0.0.2:7370");
        let Net::Dpdk(d) = &c.net else {
            panic!("{:?}", c.net)
        };
        assert_eq!(d.eal_args, ["-l", "0", "--no-huge", "--vdev=net_tap0"]);
        assert_eq!(d.prefix_len, 24);
        // Heartbeats and the group live on the DPDK port: its address by default, and
        // nothing else will do.
        assert_eq!(c.multicast_if, Ipv4Addr::new(10, 0, 0, 2));
        let err = Config::resolve(Flags {
            multicast_if: Some(Ipv4Addr::LOCALHOST),
            ..dpdk(None, None, Some("10.0.0.2/24"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("use 10.0.0.2"), "{err}");
        let c2 = Config::resolve(dpdk(None, Some(2), Some("10.0.0.2/24"))).unwrap();
        assert_eq!(c2.dataplane_cores, Some(2), "several loops on DPDK");
        let c = Config::resolve(dpdk(Some("0.0.0.0:9000"), Some(1), Some("10.0.0.2/24"))).unwrap();
        assert_eq!(c.listen.to_string(), "10.0.0.2:9000");
        for (flags, says) in [
            (dpdk(None, None, None), "--dpdk-ip"),
            (
                dpdk(Some("127.0.0.1:7370"), None, Some("10.0.0.2/24")),
                "DPDK port",
            ),
            (dpdk(Some("10.0.0.2:0"), None, Some("10.0.0.2/24")), "not 0"),
            (
                Flags {
                    dpdk_args: None,
                    ..dpdk(None, None, Some("10.0.0.2/24"))
                },
                "--dpdk-args",
            ),
        ] {
            let err = Config::resolve(flags).unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
        // Signed URLs over HTTP on the DPDK port: its address (0.0.0.0 meaning it), a
        // port of its own, and the cluster key as on the kernel backend.
        let http = |addr: &str, key: bool| Flags {
            http_listen: Some(addr.parse().unwrap()),
            cluster_key_file: key.then(|| PathBuf::from("/k")),
            ..dpdk(None, None, Some("10.0.0.2/24"))
        };
        for asked in ["10.0.0.2:8080", "0.0.0.0:8080"] {
            let c = Config::resolve(http(asked, true)).unwrap();
            assert_eq!(
                c.http_listen,
                Some("10.0.0.2:8080".parse().unwrap()),
                "{asked}"
            );
        }
        for (flags, says) in [
            (http("10.0.0.2:8080", false), "cluster_key_file"),
            (
                http("127.0.0.1:8080", true),
                "use 10.0.0.2:PORT or 0.0.0.0:PORT",
            ),
            (http("[::1]:8080", true), "DPDK port"),
            (http("10.0.0.2:0", true), "not 0"),
            (
                http("10.0.0.2:7370", true),
                "differ from the DOSP port (7370)",
            ),
        ] {
            let err = Config::resolve(flags).unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
    }
}
