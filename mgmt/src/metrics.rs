//! `GET /metrics`: the Prometheus text format (exposition format 0.0.4).
//!
//! Every counter of [`NodeStats`] is exported (the table below lists each field once;
//! a test checks the table against the struct and that the dataplane increments each),
//! plus per-disk gauges from the latest published disk reports.

use std::fmt::Write;

use dataplane::stats::NodeStats;
use dataplane::store::{DiskReport, DiskState};

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
        connections_refused => "dosd_connections_refused_total", Counter, "Connections refused (table full)";
        ops_total => "dosd_ops_total", Counter, "Requests completed";
        ops_outstanding => "dosd_ops_outstanding", Gauge, "Requests in progress";
        bytes_in => "dosd_bytes_in_total", Counter, "Bytes received";
        bytes_out => "dosd_bytes_out_total", Counter, "Bytes sent";
        errors_total => "dosd_errors_total", Counter, "Replies with a non-success status";
        bad_requests => "dosd_bad_requests_total", Counter, "Malformed input (connection closed)";
        unknown_opcodes => "dosd_unknown_opcodes_total", Counter, "Requests with an unknown opcode";
        stores_aborted => "dosd_stores_aborted_total", Counter, "STOREs abandoned mid-stream";
        sessions_timed_out => "dosd_sessions_timed_out_total", Counter, "Connections closed after going quiet";
        checksum_mismatches => "dosd_checksum_mismatches_total", Counter, "Object data failing its checksum";
        stores => "dosd_stores_total", Counter, "STORE requests";
        retrieves => "dosd_retrieves_total", Counter, "RETRIEVE and RETRIEVE_RANGE requests";
        deletes => "dosd_deletes_total", Counter, "DELETE requests";
        udp_requests => "dosd_udp_requests_total", Counter, "Datagram requests";
        udp_bad => "dosd_udp_bad_total", Counter, "Malformed datagrams dropped";
        locate_answers => "dosd_locate_answers_total", Counter, "LOCATE answers sent";
        heartbeats_sent => "dosd_heartbeats_sent_total", Counter, "Heartbeats multicast";
        loop_turns => "dosd_loop_turns_total", Counter, "Dataplane loop turns";
    }
}

/// The whole exposition: node counters, then per-disk gauges.
pub fn render(s: &NodeStats, disks: &[DiskReport]) -> String {
    let mut out = String::with_capacity(4096 + disks.len() * 1024);
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

    /// Field names of `NodeStats`, read from its source.
    fn stats_fields(src: &str) -> Vec<String> {
        let body = &src[src
            .find("pub struct NodeStats")
            .expect("NodeStats in stats.rs")..];
        let body = &body[..body.find("\n}").expect("end of NodeStats")];
        body.lines()
            .filter_map(|l| l.trim().strip_prefix("pub "))
            .filter_map(|l| l.split_once(": AtomicU64"))
            .map(|(name, _)| name.to_string())
            .collect()
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
        let mut want: Vec<&str> = fields.iter().map(String::as_str).collect();
        want.sort_unstable();
        assert_eq!(names, want, "the metrics table and NodeStats disagree");

        let mut src = String::new();
        rust_sources(&root, &mut src);
        // The management core's own speaker counts the heartbeats it sends.
        rust_sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut src);
        for e in &exported {
            // `stats.FIELD)` or `stats.FIELD,` inside an increment: the closing
            // character keeps `connections` from matching `connections_total`.
            let used = src.lines().any(|l| {
                (l.contains("NodeStats::inc(") || l.contains("NodeStats::add("))
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
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "no TYPE for {name}"
            );
        }
    }
}
