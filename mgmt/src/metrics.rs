//! `GET /metrics`: the Prometheus text format (exposition format 0.0.4).
//!
//! Every counter of [`NodeStats`] is exported (the table below lists each field once;
//! a test checks the table against the struct and that the dataplane increments each),
//! then its labelled families (errors by status, latency histograms by operation,
//! received frames a DPDK port dropped by reason),
//! then per-disk gauges and counters from the latest published disk reports.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use dataplane::server::frame_check::RxDrop;
use dataplane::stats::{Histogram, NodeStats, OpClass};
use dataplane::store::{DiskReport, DiskState};
use dosp::signed::Refusal;
use dosp::wire::Status;

/// Prometheus metric kinds used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// One exported [`NodeStats`] field.
#[derive(Debug)]
struct Exported {
    /// The field's name in `NodeStats` (for the completeness test).
    #[cfg_attr(not(test), allow(dead_code))]
    field: &'static str,
    name: &'static str,
    kind: Kind,
    help: &'static str,
    value: u64,
}

macro_rules! exported {
    ($s:ident; $($field:ident => $name:literal, $kind:ident, $help:literal;)*) => {
        [$(Exported {
            field: stringify!($field),
            name: $name,
            kind: Kind::$kind,
            help: $help,
            value: NodeStats::get(&$s.$field),
        }),*]
    };
}

/// Every [`NodeStats`] field, once.
fn node_counters(s: &NodeStats) -> impl IntoIterator<Item = Exported> {
    exported! { s;
        connections => "dosd_connections", Gauge, "Connections open now";
        connections_total => "dosd_connections_total", Counter, "Connections accepted";
        connections_refused => "dosd_connections_refused_total", Counter, "Connections answered BUSY and closed (table full of busy connections, or out of file descriptors)";
        connections_evicted => "dosd_connections_evicted_total", Counter, "Idle connections closed to admit a new one into a full table";
        accept_failures => "dosd_accept_failures_total", Counter, "Accepts that failed for want of file descriptors or memory";
        listener_state => "dosd_listener_state", Gauge, "DOSP listener: 0 accepting, 1 out of descriptors and shedding with BUSY, 2 cannot accept";
        ops_total => "dosd_ops_total", Counter, "Replies sent, over TCP and UDP, and HTTP responses to signed URLs";
        ops_outstanding => "dosd_ops_outstanding", Gauge, "Requests in progress";
        ops_per_sec => "dosd_ops_per_second", Gauge, "Requests completed in the last second";
        health => "dosd_health", Gauge, "Node health: 0 ok, 1 degraded, 2 failing";
        bytes_in => "dosd_bytes_in_total", Counter, "Bytes received";
        bytes_out => "dosd_bytes_out_total", Counter, "Bytes sent";
        errors_total => "dosd_errors_total", Counter, "Replies with a non-success status";
        bad_requests => "dosd_bad_requests_total", Counter, "Malformed requests, answered or dropped";
        unknown_opcodes => "dosd_unknown_opcodes_total", Counter, "Requests with an unknown opcode";
        stores_aborted => "dosd_stores_aborted_total", Counter, "STOREs ended by their connection before their last chunk";
        sessions_timed_out => "dosd_sessions_timed_out_total", Counter, "Connections closed after going quiet";
        checksum_mismatches => "dosd_checksum_mismatches_total", Counter, "Object data failing its checksum";
        stores => "dosd_stores_total", Counter, "STORE requests";
        retrieves => "dosd_retrieves_total", Counter, "RETRIEVE and RETRIEVE_RANGE requests";
        deletes => "dosd_deletes_total", Counter, "DELETE requests";
        udp_requests => "dosd_udp_requests_total", Counter, "Datagram requests";
        udp_bad => "dosd_udp_bad_total", Counter, "Malformed datagrams, answered or dropped";
        locate_answers => "dosd_locate_answers_total", Counter, "LOCATE answers sent";
        heartbeats_sent => "dosd_heartbeats_sent_total", Counter, "Heartbeats multicast";
        loop_turns => "dosd_loop_turns_total", Counter, "Dataplane loop turns";
        cache_hits => "dosd_cache_hits_total", Counter, "Object reads served from the hot-object cache";
        cache_misses => "dosd_cache_misses_total", Counter, "Reads of objects small enough to cache (64 KiB) that went to a disk";
        cache_objects => "dosd_cache_objects", Gauge, "Objects in the hot-object cache";
        cache_bytes => "dosd_cache_bytes", Gauge, "Bytes of objects in the hot-object cache";
        cache_capacity_bytes => "dosd_cache_capacity_bytes", Gauge, "Capacity of the hot-object cache (cache_bytes; 0 disables it)";
        index_objects => "dosd_index_objects", Gauge, "Objects in the in-memory index";
        index_bytes => "dosd_index_bytes", Gauge, "Memory the in-memory index takes (its allocations: 28-byte slots in sorted chunks, and the entries of objects larger than 16 KiB)";
    }
}

/// [`NodeStats`] fields that are not single counters, each exported as a labelled
/// family by [`render_families`] (field → metric name; for the completeness test).
#[cfg_attr(not(test), allow(dead_code))]
const FAMILIES: [(&str, &str); 5] = [
    ("auth_failed", "dosd_auth_failed_total"),
    ("http_responses", "dosd_http_requests_total"),
    ("errors_by_status", "dosd_errors_by_status_total"),
    ("latency", "dosd_op_latency_seconds"),
    ("net_rx_dropped", "dosd_net_rx_dropped_total"),
];

/// Microseconds as seconds with all six decimals (exact, no float rounding).
fn seconds(out: &mut String, us: u64) {
    let _ = write!(out, "{}.{:06}", us / 1_000_000, us % 1_000_000);
}

/// Errors by status, and the latency histograms in the Prometheus histogram layout
/// (cumulative `_bucket{le}` ending in `+Inf`, then `_sum` and `_count`).
fn render_families(out: &mut String, s: &NodeStats) {
    // A separate name from `dosd_errors_total`, which stays the unlabelled total:
    // one family may not hold both a total and its parts, or sum() counts twice.
    let _ = write!(
        out,
        "# HELP dosd_errors_by_status_total Replies with a non-success status, by status (they sum to dosd_errors_total)\n\
         # TYPE dosd_errors_by_status_total counter\n"
    );
    for status in Status::ALL.into_iter().filter(|&st| st != Status::Success) {
        let n = s
            .errors_by_status
            .get(status as usize)
            .map_or(0, NodeStats::get);
        let _ = writeln!(
            out,
            "dosd_errors_by_status_total{{status=\"{}\"}} {n}",
            status.name()
        );
    }

    // Every reason, zero included, so that rate() has a series from the start.
    let _ = write!(
        out,
        "# HELP dosd_auth_failed_total Requests refused with AUTH_FAILED (or dropped, sent to the group) by a node with a cluster key, by reason (dosp/PROTOCOL.md section 7)\n\
         # TYPE dosd_auth_failed_total counter\n"
    );
    for reason in Refusal::ALL {
        let _ = writeln!(
            out,
            "dosd_auth_failed_total{{reason=\"{}\"}} {}",
            reason.name(),
            s.auth_failed_count(reason)
        );
    }

    // Every status, zero included.
    let _ = write!(
        out,
        "# HELP dosd_http_requests_total HTTP responses to signed-URL requests, by status (dosp/HTTP.md)\n\
         # TYPE dosd_http_requests_total counter\n"
    );
    for status in dataplane::stats::HTTP_STATUSES {
        let _ = writeln!(
            out,
            "dosd_http_requests_total{{status=\"{status}\"}} {}",
            s.http_response_count(status)
        );
    }

    let _ = write!(
        out,
        "# HELP dosd_net_rx_dropped_total Received frames the DPDK port dropped before its TCP/IP stack, by reason (SYNs refused at the connection bound included)\n\
         # TYPE dosd_net_rx_dropped_total counter\n"
    );
    for reason in RxDrop::ALL {
        let _ = writeln!(
            out,
            "dosd_net_rx_dropped_total{{reason=\"{}\"}} {}",
            reason.name(),
            s.rx_dropped_count(reason)
        );
    }

    let name = "dosd_op_latency_seconds";
    let _ = write!(
        out,
        "# HELP {name} Request latency, from the request's arrival to its reply (a stream's final status)\n\
         # TYPE {name} histogram\n"
    );
    for op in OpClass::ALL {
        let h = s.latency(op).snapshot();
        let mut cumulative = 0u64;
        for (k, n) in h.buckets.iter().enumerate() {
            cumulative = cumulative.wrapping_add(*n);
            let _ = write!(out, "{name}_bucket{{op=\"{}\",le=\"", op.name());
            match Histogram::upper_bound_us(k) {
                Some(us) => seconds(out, us),
                None => out.push_str("+Inf"),
            }
            let _ = writeln!(out, "\"}} {cumulative}");
        }
        let _ = write!(out, "{name}_sum{{op=\"{}\"}} ", op.name());
        seconds(out, h.sum_us);
        let _ = writeln!(out, "\n{name}_count{{op=\"{}\"}} {}", op.name(), h.count());
    }
}

/// Counters of the management core itself (the dataplane's are in [`NodeStats`]).
#[derive(Debug, Default)]
pub struct MgmtCounters {
    /// TLS handshakes on the REST listener that failed or timed out ([`crate::tls`]).
    pub tls_handshake_failures: AtomicU64,
}

/// The management core's own counters, after [`render`]'s. Exported whether or not TLS
/// is on, so that a dashboard's query has a series either way.
pub fn render_mgmt(out: &mut String, m: &MgmtCounters) {
    let _ = write!(
        out,
        "# HELP dosd_mgmt_tls_handshake_failures_total TLS handshakes on the management listener that failed or did not complete in time (0 without --mgmt-tls-cert)\n\
         # TYPE dosd_mgmt_tls_handshake_failures_total counter\n\
         dosd_mgmt_tls_handshake_failures_total {}\n",
        m.tls_handshake_failures.load(Ordering::Relaxed)
    );
}

/// The whole exposition: node counters, labelled families, then per-disk gauges.
pub fn render(s: &NodeStats, disks: &[DiskReport]) -> String {
    let mut out = String::with_capacity(8192 + disks.len() * 2048);
    for e in node_counters(s) {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n",
            name = e.name,
            help = e.help,
            kind = e.kind.as_str(),
            value = e.value
        );
    }
    render_families(&mut out, s);
    if disks.is_empty() {
        return out;
    }
    // One family at a time, as the format requires: HELP and TYPE, then a sample per disk.
    let family = |out: &mut String,
                  name: &str,
                  kind: Kind,
                  help: &str,
                  value: &dyn Fn(&DiskReport) -> u64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {}\n",
            kind.as_str()
        );
        for d in disks {
            let _ = writeln!(out, "{name}{{disk=\"{}\"}} {}", d.id.0, value(d));
        }
    };
    family(
        &mut out,
        "dosd_disk_bytes_total",
        Kind::Gauge,
        "Disk size in bytes",
        &|d| d.bytes_total,
    );
    family(
        &mut out,
        "dosd_disk_bytes_free",
        Kind::Gauge,
        "Bytes not used by live or dead records",
        &|d| d.bytes_free,
    );
    family(
        &mut out,
        "dosd_disk_bytes_used",
        Kind::Gauge,
        "Bytes of log between head and tail (live, dead and open records)",
        &|d| d.bytes_used,
    );
    family(
        &mut out,
        "dosd_disk_bytes_available",
        Kind::Gauge,
        "Free plus reclaimable dead bytes",
        &|d| d.bytes_available,
    );
    family(
        &mut out,
        "dosd_disk_bytes_dead",
        Kind::Gauge,
        "Bytes of deleted or superseded records awaiting compaction",
        &|d| d.bytes_dead,
    );
    family(
        &mut out,
        "dosd_disk_objects_used",
        Kind::Gauge,
        "Objects stored on the disk",
        &|d| d.objects_used,
    );
    family(
        &mut out,
        "dosd_disk_objects_available",
        Kind::Gauge,
        "Smallest objects that would still fit",
        &|d| d.objects_available,
    );
    family(
        &mut out,
        "dosd_disk_outstanding_ops",
        Kind::Gauge,
        "Open writes on the disk",
        &|d| u64::from(d.outstanding_ops),
    );
    family(
        &mut out,
        "dosd_disk_errors_total",
        Kind::Counter,
        "Errors of the disk: device errors, checksum failures, failure to open",
        &|d| d.errors,
    );
    family(
        &mut out,
        "dosd_disk_corrupt_objects",
        Kind::Gauge,
        "Objects of the disk found failing their checksum and still stored",
        &|d| d.corrupt_objects,
    );
    family(
        &mut out,
        "dosd_disk_corrupt_blocks_total",
        Kind::Counter,
        "Blocks of the disk found failing their checksum (each time one is met)",
        &|d| d.corrupt_blocks,
    );
    // Device I/O, named as node_exporter names the kernel's disk statistics so that
    // the usual dashboards and rate() queries read them alike.
    family(
        &mut out,
        "dosd_disk_reads_completed_total",
        Kind::Counter,
        "Reads completed on the device",
        &|d| d.io.read_ops,
    );
    family(
        &mut out,
        "dosd_disk_read_bytes_total",
        Kind::Counter,
        "Bytes read from the device",
        &|d| d.io.read_bytes,
    );
    family(
        &mut out,
        "dosd_disk_writes_completed_total",
        Kind::Counter,
        "Writes completed on the device",
        &|d| d.io.write_ops,
    );
    family(
        &mut out,
        "dosd_disk_written_bytes_total",
        Kind::Counter,
        "Bytes written to the device",
        &|d| d.io.write_bytes,
    );
    family(
        &mut out,
        "dosd_disk_flushes_completed_total",
        Kind::Counter,
        "Flushes completed on the device",
        &|d| d.io.flushes,
    );
    // Seconds since the epoch, the Prometheus convention for "when did X last happen"
    // (`time() - dosd_disk_last_error_timestamp_seconds` is its age); 0: no error yet.
    let _ = write!(
        out,
        "# HELP dosd_disk_last_error_timestamp_seconds When the disk's last error happened (0: never)\n# TYPE dosd_disk_last_error_timestamp_seconds gauge\n"
    );
    for d in disks {
        let ms = d.last_error.as_ref().map_or(0, |e| e.at_unix_ms);
        let _ = writeln!(
            out,
            "dosd_disk_last_error_timestamp_seconds{{disk=\"{}\"}} {}.{:03}",
            d.id.0,
            ms / 1000,
            ms % 1000
        );
    }
    // The device's own health log, only for disks whose backend reads one (NVMe): a
    // file disk has no such sample rather than a made-up zero.
    type HealthValue = fn(&nvme::driver::SmartLog) -> u128;
    let smart: [(&str, Kind, &str, HealthValue); 5] = [
        (
            "dosd_disk_temperature_kelvin",
            Kind::Gauge,
            "Composite temperature from the device health log",
            |h| h.temperature_kelvin.into(),
        ),
        (
            "dosd_disk_critical_warning",
            Kind::Gauge,
            "Critical warning bits from the device health log (0: none)",
            |h| h.critical_warning.into(),
        ),
        (
            "dosd_disk_percentage_used",
            Kind::Gauge,
            "Device estimate of life used, percent",
            |h| h.percentage_used.into(),
        ),
        (
            "dosd_disk_media_errors_total",
            Kind::Counter,
            "Unrecovered media and data integrity errors over the device's life",
            |h| h.media_errors,
        ),
        (
            "dosd_disk_unsafe_shutdowns_total",
            Kind::Counter,
            "Power losses without a shutdown notification over the device's life",
            |h| h.unsafe_shutdowns,
        ),
    ];
    if disks.iter().any(|d| d.health.is_some()) {
        for (name, kind, help, value) in smart {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {}\n",
                kind.as_str()
            );
            for d in disks {
                if let Some(h) = &d.health {
                    let _ = writeln!(out, "{name}{{disk=\"{}\"}} {}", d.id.0, value(h));
                }
            }
        }
    }
    // The state as a one-hot gauge per state, the usual Prometheus encoding of an enum.
    let _ = write!(
        out,
        "# HELP dosd_disk_state Disk state (1 for the current one)\n# TYPE dosd_disk_state gauge\n"
    );
    for d in disks {
        for (state, label) in [
            (DiskState::Online, "online"),
            (DiskState::Offline, "offline"),
            (DiskState::Down, "down"),
        ] {
            let _ = writeln!(
                out,
                "dosd_disk_state{{disk=\"{}\",state=\"{label}\"}} {}",
                d.id.0,
                u8::from(d.state == state)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Fields of `NodeStats`, read from its source: (name, type).
    fn stats_fields(src: &str) -> Vec<(String, String)> {
        let body = &src[src
            .find("pub struct NodeStats")
            .expect("NodeStats in stats.rs")..];
        let body = &body[..body.find("\n}").expect("end of NodeStats")];
        body.lines()
            .filter_map(|l| l.trim().strip_prefix("pub "))
            .filter_map(|l| l.split_once(": "))
            .map(|(name, ty)| (name.to_string(), ty.trim_end_matches(',').to_string()))
            .collect()
    }

    /// The metric family a sample belongs to: a histogram's `_bucket`, `_sum` and
    /// `_count` samples belong to the histogram's name.
    fn family_of<'a>(text: &str, sample: &'a str) -> &'a str {
        let name = sample.split(['{', ' ']).next().unwrap();
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                if text.contains(&format!("# TYPE {base} histogram\n")) {
                    return base;
                }
            }
        }
        name
    }

    fn rust_sources(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).expect("read dataplane sources") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                rust_sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).expect("read source"));
            }
        }
    }

    /// Every counter that exists is exported, and every exported counter is
    /// incremented (or added to) somewhere in the dataplane.
    #[test]
    fn every_counter_is_exported_and_incremented_somewhere() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dataplane/src");
        let fields = stats_fields(&std::fs::read_to_string(root.join("stats.rs")).unwrap());
        let exported: Vec<Exported> = node_counters(&NodeStats::default()).into_iter().collect();
        let mut names: Vec<&str> = exported.iter().map(|e| e.field).collect();
        names.sort_unstable();
        // Plain counters go in the table; anything else must be a labelled family.
        let mut want: Vec<&str> = fields
            .iter()
            .filter(|(_, ty)| ty == "AtomicU64")
            .map(|(name, _)| name.as_str())
            .collect();
        want.sort_unstable();
        assert_eq!(names, want, "the metrics table and NodeStats disagree");
        let mut families: Vec<&str> = FAMILIES.iter().map(|(f, _)| *f).collect();
        families.sort_unstable();
        let mut want: Vec<&str> = fields
            .iter()
            .filter(|(_, ty)| ty != "AtomicU64")
            .map(|(name, _)| name.as_str())
            .collect();
        want.sort_unstable();
        assert_eq!(families, want, "FAMILIES and NodeStats disagree");
        let text = render(&NodeStats::default(), &[]);
        for (field, metric) in FAMILIES {
            assert!(
                text.contains(&format!("# TYPE {metric} ")),
                "{field} is not exported as {metric}"
            );
        }

        // The families are fed from the request paths of the dataplane: errors through
        // NodeStats::error, latencies through NodeStats::latency(..).record for every
        // class of operation.
        let mut server = String::new();
        rust_sources(&root.join("server"), &mut server);
        assert!(
            server.contains("NodeStats::error(ctx.stats, "),
            "errors_by_status is never counted"
        );
        assert!(
            server.contains(".latency(") && server.contains(".record("),
            "latency is never recorded"
        );
        assert!(
            server.contains(".auth_failed(reason)"),
            "auth_failed is never counted"
        );
        assert!(
            server.contains(".rx_dropped(reason)"),
            "net_rx_dropped is never counted"
        );
        for op in OpClass::ALL {
            let variant = format!("{op:?}");
            assert!(
                server.contains(&format!("OpClass::{variant}")),
                "no latency is ever recorded for OpClass::{variant}"
            );
        }

        let mut src = String::new();
        rust_sources(&root, &mut src);
        // The management core's own speaker counts the heartbeats it sends.
        rust_sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut src);
        for e in &exported {
            // `stats.FIELD)` or `stats.FIELD,` inside an increment: the closing
            // character keeps `connections` from matching `connections_total`.
            let used = src.lines().any(|l| {
                (l.contains("NodeStats::inc(")
                    || l.contains("NodeStats::add(")
                    || l.contains("NodeStats::set("))
                    && (l.contains(&format!("stats.{})", e.field))
                        || l.contains(&format!("stats.{},", e.field)))
            });
            assert!(
                used,
                "{} ({}) is exported but never incremented",
                e.name, e.field
            );
            if e.kind == Kind::Counter {
                assert!(
                    e.name.ends_with("_total"),
                    "{} is a counter without _total",
                    e.name
                );
            }
        }
    }

    #[test]
    fn exposition_has_help_type_and_one_sample_per_disk() {
        let s = NodeStats::default();
        NodeStats::add(&s.stores, 7);
        let disks = [dataplane::store::DiskReport {
            id: dataplane::store::DiskId(3),
            identity: [0; 16],
            state: DiskState::Offline,
            backend: "file",
            location: "x".into(),
            bytes_total: 100,
            bytes_free: 50,
            bytes_available: 60,
            objects_used: 2,
            objects_available: 1,
            outstanding_ops: 0,
            bytes_dead: 10,
            bytes_used: 30,
            errors: 1,
            io: dataplane::store::DiskIo {
                read_ops: 4,
                read_bytes: 16384,
                write_ops: 2,
                write_bytes: 8192,
                flushes: 1,
            },
            last_error: Some(dataplane::store::LastError {
                message: "boom".into(),
                at_unix_ms: 1_700_000_000_250,
            }),
            corrupt_objects: 2,
            corrupt_blocks: 5,
            health: None,
        }];
        let text = render(&s, &disks);
        assert!(text.contains("\ndosd_stores_total 7\n"), "{text}");
        assert!(
            text.contains("dosd_disk_bytes_free{disk=\"3\"} 50\n"),
            "{text}"
        );
        assert!(text.contains("dosd_disk_state{disk=\"3\",state=\"offline\"} 1\n"));
        assert!(text.contains("dosd_disk_state{disk=\"3\",state=\"online\"} 0\n"));
        for sample in [
            "dosd_disk_errors_total{disk=\"3\"} 1\n",
            "dosd_disk_corrupt_objects{disk=\"3\"} 2\n",
            "dosd_disk_corrupt_blocks_total{disk=\"3\"} 5\n",
            "dosd_disk_reads_completed_total{disk=\"3\"} 4\n",
            "dosd_disk_read_bytes_total{disk=\"3\"} 16384\n",
            "dosd_disk_writes_completed_total{disk=\"3\"} 2\n",
            "dosd_disk_written_bytes_total{disk=\"3\"} 8192\n",
            "dosd_disk_flushes_completed_total{disk=\"3\"} 1\n",
            "dosd_disk_last_error_timestamp_seconds{disk=\"3\"} 1700000000.250\n",
        ] {
            assert!(text.contains(sample), "{sample} missing:\n{text}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = family_of(&text, line);
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "no TYPE for {name}"
            );
        }
    }

    #[test]
    fn smart_series_only_for_disks_with_a_health_log() {
        let s = NodeStats::default();
        let mut file = dataplane::store::DiskReport {
            id: dataplane::store::DiskId(0),
            identity: [0; 16],
            state: DiskState::Online,
            backend: "file",
            location: "x".into(),
            bytes_total: 100,
            bytes_free: 50,
            bytes_available: 60,
            objects_used: 0,
            objects_available: 1,
            outstanding_ops: 0,
            bytes_dead: 0,
            bytes_used: 0,
            errors: 0,
            io: Default::default(),
            last_error: None,
            corrupt_objects: 0,
            corrupt_blocks: 0,
            health: None,
        };
        let text = render(&s, std::slice::from_ref(&file));
        assert!(!text.contains("dosd_disk_temperature_kelvin"), "{text}");
        let mut nvme = file.clone();
        nvme.id = dataplane::store::DiskId(1);
        nvme.backend = "nvme";
        nvme.health = Some(nvme::driver::SmartLog {
            critical_warning: 2,
            temperature_kelvin: 330,
            percentage_used: 7,
            media_errors: 5,
            unsafe_shutdowns: 1,
            ..Default::default()
        });
        file.id = dataplane::store::DiskId(0);
        let text = render(&s, &[file, nvme]);
        for sample in [
            "dosd_disk_temperature_kelvin{disk=\"1\"} 330\n",
            "dosd_disk_critical_warning{disk=\"1\"} 2\n",
            "dosd_disk_percentage_used{disk=\"1\"} 7\n",
            "dosd_disk_media_errors_total{disk=\"1\"} 5\n",
            "dosd_disk_unsafe_shutdowns_total{disk=\"1\"} 1\n",
            "# TYPE dosd_disk_media_errors_total counter\n",
        ] {
            assert!(text.contains(sample), "{sample} missing:\n{text}");
        }
        assert!(
            !text.contains("dosd_disk_temperature_kelvin{disk=\"0\"}"),
            "{text}"
        );
    }

    #[test]
    fn errors_by_status_and_latency_histograms() {
        let s = NodeStats::default();
        NodeStats::error(&s, Status::NotFound);
        NodeStats::error(&s, Status::NotFound);
        NodeStats::error(&s, Status::DiskOffline);
        let h = s.latency(OpClass::Retrieve);
        h.record(std::time::Duration::from_micros(3)); // le 4 µs
        h.record(std::time::Duration::from_micros(1500)); // le 2048 µs
        h.record(std::time::Duration::from_secs(60)); // +Inf only
        let text = render(&s, &[]);
        for sample in [
            "\ndosd_errors_total 3\n",
            "\ndosd_errors_by_status_total{status=\"NOT_FOUND\"} 2\n",
            "\ndosd_errors_by_status_total{status=\"DISK_OFFLINE\"} 1\n",
            "\ndosd_errors_by_status_total{status=\"BUSY\"} 0\n",
            "\ndosd_op_latency_seconds_bucket{op=\"retrieve\",le=\"0.000002\"} 0\n",
            "\ndosd_op_latency_seconds_bucket{op=\"retrieve\",le=\"0.000004\"} 1\n",
            "\ndosd_op_latency_seconds_bucket{op=\"retrieve\",le=\"0.002048\"} 2\n",
            "\ndosd_op_latency_seconds_bucket{op=\"retrieve\",le=\"16.777216\"} 2\n",
            "\ndosd_op_latency_seconds_bucket{op=\"retrieve\",le=\"+Inf\"} 3\n",
            "\ndosd_op_latency_seconds_sum{op=\"retrieve\"} 60.001503\n",
            "\ndosd_op_latency_seconds_count{op=\"retrieve\"} 3\n",
            "\ndosd_op_latency_seconds_count{op=\"store\"} 0\n",
            "\n# TYPE dosd_op_latency_seconds histogram\n",
        ] {
            assert!(text.contains(sample), "{sample:?} missing:\n{text}");
        }
        assert!(!text.contains("status=\"SUCCESS\""), "SUCCESS is no error");
        s.rx_dropped(RxDrop::IpFragment);
        s.rx_dropped(RxDrop::IpFragment);
        let text = render(&s, &[]);
        assert!(text.contains("\n# TYPE dosd_net_rx_dropped_total counter\n"));
        assert!(text.contains("\ndosd_net_rx_dropped_total{reason=\"ip_fragment\"} 2\n"));
        for reason in RxDrop::ALL {
            let sample = format!(
                "\ndosd_net_rx_dropped_total{{reason=\"{}\"}} ",
                reason.name()
            );
            assert!(text.contains(&sample), "{sample:?} missing");
        }
        // Per operation: buckets cumulative and increasing in `le`, ending in +Inf,
        // which equals _count.
        for op in OpClass::ALL {
            let prefix = format!("dosd_op_latency_seconds_bucket{{op=\"{}\",le=\"", op.name());
            let buckets: Vec<(&str, u64)> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&prefix))
                .map(|l| {
                    let (le, n) = l.split_once("\"} ").unwrap();
                    (le, n.parse().unwrap())
                })
                .collect();
            assert_eq!(buckets.len(), dataplane::stats::LATENCY_BUCKETS);
            assert_eq!(buckets.last().unwrap().0, "+Inf");
            for w in buckets.windows(2) {
                assert!(w[0].1 <= w[1].1, "{op:?}: not cumulative");
                if w[1].0 != "+Inf" {
                    let (a, b): (f64, f64) = (w[0].0.parse().unwrap(), w[1].0.parse().unwrap());
                    assert!(a < b, "{op:?}: le not increasing");
                }
            }
            let count = format!(
                "dosd_op_latency_seconds_count{{op=\"{}\"}} {}\n",
                op.name(),
                buckets.last().unwrap().1
            );
            assert!(text.contains(&count), "{count:?} missing");
        }
    }
}
